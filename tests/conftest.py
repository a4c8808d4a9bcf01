"""Offline fixtures: a byte-level tokenizer (one token per byte, so expectations can be written by
hand) and a tiny random-weight Llama built on the spot. Nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import yaml  # noqa: E402

ROWS = [
    {"instruction": "Say yes.", "output": "yes"},
    {"instruction": "Say no.", "output": "no"},
    {"instruction": "Repeat the word.", "input": "cat", "output": "cat"},
    {"instruction": "Repeat the word.", "input": "dog", "output": "dog"},
    {"instruction": "Add one.", "input": "2", "output": "3"},
    {"instruction": "Add one.", "input": "7", "output": "8"},
    {"instruction": "Name a color.", "output": "red"},
    {"instruction": "Name a fruit.", "output": "apple"},
]


def make_byte_tokenizer(extra_specials=("<|im_start|>", "<|im_end|>")):
    """A byte-level BPE tokenizer without merges: every byte is one token; specials are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=list(extra_specials))


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory):
    """Tokenized-data caches of tests go to a temporary INSTRUCTKIT_HOME; converted models are shared
    with the real cache (converting SmolLM2 takes about 30 s) through a symlink."""
    real = Path(os.environ.get("INSTRUCTKIT_HOME") or "~/.cache/instructkit").expanduser()
    (real / "models").mkdir(parents=True, exist_ok=True)
    home = tmp_path_factory.mktemp("instructkit-home")
    (home / "models").symlink_to(real / "models")
    os.environ["INSTRUCTKIT_HOME"] = str(home)
    yield home
    os.environ.pop("INSTRUCTKIT_HOME")


@pytest.fixture(scope="session")
def byte_tokenizer():
    return make_byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama and the byte tokenizer, saved like a Hugging Face model directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_run_config(root: Path, model_dir: Path, data: Path) -> dict:
    """A few quick steps on the tiny model, writing into root/run."""
    return {
        "run_name": "tiny", "output_dir": str(root / "run"), "seed": 1,
        # Pinned: `auto` measures the CPU and picks bf16 on some (AMD EPYC with avx512_bf16), which
        # changes every number a test compares. Tests of `auto` itself set it explicitly.
        "model": {"name_or_path": str(model_dir), "precision": "fp32"},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train_file": str(data), "max_length": 320},
        "train": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 4,
                  "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "no", "report_to": []},
    }


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir):
    """Write a config for a few quick steps on the tiny model; returns a function taking overrides."""
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)

    def make(**sections) -> Path:
        cfg = tiny_run_config(tmp_path, tiny_model_dir, data)
        for key, value in sections.items():
            if isinstance(value, dict):
                cfg.setdefault(key, {}).update(value)
            else:
                cfg[key] = value
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


@pytest.fixture(scope="session")
def finished_tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A completed run of tiny_config's defaults, trained once for the session: tests that only need some
    finished run copy it (shutil.copytree) instead of training again."""
    from instructkit.cli import main

    root = tmp_path_factory.mktemp("finished-run")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config(root, tiny_model_dir, write_jsonl(root / "train.jsonl", ROWS))))
    assert main(["train", str(path)]) == 0
    return root / "run"


def tree_digest(root: Path) -> dict:
    """sha256 of every file under root, by relative path: equal digests mean nothing was touched."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def wait_listening(port: int, timeout: float = 60, proc=None) -> None:
    """Return once something listens on 127.0.0.1:port; fail with its output as soon as `proc` has died."""
    import time

    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc is None or proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, f"nothing listens on {port}"
            time.sleep(0.2)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_lora_run(tmp_path_factory, tiny_model_dir):
    """A finished tiny LoRA run (all linear layers), trained far enough that the adapter is not zero."""
    from instructkit.cli import main

    root = tmp_path_factory.mktemp("lora-run")
    cfg = {"output_dir": str(root / "run"), "seed": 3,
           "model": {"name_or_path": str(tiny_model_dir), "precision": "fp32"},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
           "data": {"train_file": str(write_jsonl(root / "t.jsonl", ROWS))},
           "train": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 6,
                     "learning_rate": 5e-2, "save_strategy": "no", "report_to": []}}
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(root / "c.yaml")]) == 0
    return root / "run"
