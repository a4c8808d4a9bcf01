"""The Python API that the CLI wraps, for notebooks and scripts:

    from instructkit.api import load_config, train, load_for_inference, generate, Message
    cfg = load_config("configs/quickstart.yaml", ["train.max_steps=10"])
    run_dir = train(cfg)
    print(generate(load_for_inference(str(run_dir)), [(Message("user", "Say hi"),)])[0])

The functions live here rather than on the package because `instructkit.train`, `instructkit.generate`
and `instructkit.evaluate` are the modules of the same names. Importing this module loads torch (about a
second); transformers, peft and accelerate load when a function first needs them.
"""

from instructkit.config import RunConfig, load_config
from instructkit.data.formats import Message
from instructkit.errors import UserError
from instructkit.estimate import estimate_table
from instructkit.evaluate import evaluate
from instructkit.export import export_gguf, merge_lora
from instructkit.generate import generate, load_for_inference, messages_from_cli
from instructkit.report import build_report
from instructkit.train import train

__all__ = ["RunConfig", "load_config", "Message", "UserError", "evaluate", "generate", "load_for_inference",
           "messages_from_cli", "build_report", "train", "merge_lora", "export_gguf", "estimate_table"]
