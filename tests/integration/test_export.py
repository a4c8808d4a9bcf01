"""merge and export-gguf: the merged model equals base + adapter; GGUF files read back through
transformers' GGUF loader give the source's logits and tokens."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from instructkit.cli import main
from tests.conftest import make_byte_tokenizer

TEXT = "Hello world! 2024, émoji 🙂 <|im_start|>user\nhi<|im_end|>"


@pytest.fixture(scope="module")
def lora_run(tiny_lora_run):
    return tiny_lora_run


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_merged_model_equals_base_plus_adapter(lora_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructkit.export import load_merged
    from instructkit.generate import load_for_inference

    out = tmp_path / "merged"
    assert main(["merge", str(lora_run), "--out", str(out), "--dtype", "fp32", "--max-shard-size", "200KB"]) == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    adapter = load_for_inference(str(lora_run), precision="fp32")
    ids = adapter.tokenizer(TEXT)["input_ids"]
    assert (logits(merged, ids) - logits(adapter.model, ids)).abs().max() <= 1e-4
    base = AutoModelForCausalLM.from_pretrained(json.loads((lora_run / "final/adapter_config.json").read_text())
                                                ["base_model_name_or_path"], dtype=torch.float32)
    assert (logits(base, ids) - logits(merged, ids)).abs().max() > 1e-3  # the adapter did change the model
    assert AutoTokenizer.from_pretrained(out).chat_template == adapter.tokenizer.chat_template
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert load_merged(str(out))[0].dtype == torch.float32
    assert main(["merge", str(lora_run), "--out", str(out)]) == 2  # exists: refused, nothing lost
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", str(lora_run), "--out", str(out), "--overwrite"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).dtype == base.dtype == torch.float32  # the base's own precision
    bf16_base = tmp_path / "bf16-base"  # a base published in bf16 merges to bf16 by default
    base.to(torch.bfloat16).save_pretrained(bf16_base)
    adapter_dir = tmp_path / "adapter"
    shutil.copytree(lora_run / "final", adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(bf16_base)}))
    assert main(["merge", str(adapter_dir), "--out", str(tmp_path / "merged-bf16")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged-bf16").dtype == torch.bfloat16


LONG_TEXT = (Path(__file__).parents[2] / "README.md").read_text()[:2000]


def round_trip(source: str, out: Path, dtype: str) -> dict:
    """Export `source` to `out`, read it back through transformers' GGUF loader and compare: logits on
    a text of a few hundred tokens, the tokenizer's ids and the chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructkit.export import load_merged

    assert main(["export-gguf", source, "--out", str(out), "--dtype", dtype]) == 0
    model, tokenizer, _ = load_merged(source)
    gguf_model = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    gguf_tokenizer = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    ids = tokenizer(LONG_TEXT)["input_ids"][:300]
    a, b = logits(model, ids)[0], logits(gguf_model, ids)[0]
    pa, pb = a.log_softmax(-1), b.log_softmax(-1)
    return {"max_diff": (a - b).abs().max().item(), "scale": a.abs().max().item(),
            "kl": (pa.exp() * (pa - pb)).sum(-1).mean().item(),
            "top1": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            "tokens": all(gguf_tokenizer(t)["input_ids"] == tokenizer(t)["input_ids"] for t in (TEXT, LONG_TEXT)),
            "template": gguf_tokenizer.chat_template == tokenizer.chat_template}


def close_enough(result: dict, dtype: str) -> bool:
    """The stated tolerances. f16: every logit within 0.5% of the largest (rounding only). q8_0: mean
    KL divergence from the source's next-token distribution at most 0.01 nats (measured on SmolLM2:
    0.0014, with the greedy token unchanged at 98.8% of positions)."""
    if dtype == "f16":
        return result["max_diff"] <= 0.005 * result["scale"]
    return result["kl"] <= 0.01


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_gguf_of_a_tiny_lora_run_reads_back_with_its_logits_and_tokens(lora_run, tmp_path, dtype):
    result = round_trip(str(lora_run), tmp_path / f"tiny-{dtype}.gguf", dtype)
    assert close_enough(result, dtype) and result["tokens"] and result["template"], result


def test_gguf_of_a_tiny_qwen2(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = make_byte_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # qkv biases are Qwen2's difference from Llama: make them matter
                param.normal_()
    model.save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    result = round_trip(str(tmp_path / "qwen"), tmp_path / "qwen.gguf", "f16")
    assert close_enough(result, "f16") and result["tokens"], result


def test_gguf_of_a_llama2_style_byte_fallback_tokenizer(tmp_path):
    """Llama 2 / Mistral 7B vocabularies: sentencepiece-style BPE with <0xNN> byte pieces ("llama")."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), *"abcdefghijklmnopqrstuvwxyz",
              "\u2581", "\u2581h", "\u2581he", "\u2581hel", "\u2581hell", "\u2581hello"]
    merges = [("\u2581", "h"), ("\u2581h", "e"), ("\u2581he", "l"), ("\u2581hel", "l"), ("\u2581hell", "o")]
    tokenizer = LlamaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=merges)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(pieces), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, bos_token_id=1,
                                 eos_token_id=2)).save_pretrained(tmp_path / "llama2")
    tokenizer.save_pretrained(tmp_path / "llama2")
    result = round_trip(str(tmp_path / "llama2"), tmp_path / "llama2.gguf", "f16")
    assert close_enough(result, "f16") and result["tokens"], result  # TEXT has a newline and an emoji: bytes
    import gguf

    reader = gguf.GGUFReader(str(tmp_path / "llama2.gguf"))
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[3:259] == [6] * 256 and types[259] == 1 and types[1] == 3  # bytes, "a", <s>


def test_export_refuses_bad_output_and_unsupported_models(lora_run, tmp_path, tiny_model_dir):
    assert main(["export-gguf", str(lora_run), "--out", str(tmp_path / "model.bin")]) == 2
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(tmp_path / "gpt2")
    make_byte_tokenizer().save_pretrained(tmp_path / "gpt2")
    assert main(["export-gguf", str(tmp_path / "gpt2"), "--out", str(tmp_path / "g.gguf")]) == 2
    assert not (tmp_path / "g.gguf").exists()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="SmolLM2 conversion is tested on Linux")
@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_gguf_of_smollm2_reads_back(tmp_path, dtype):
    from instructkit.models import resolve_model

    source = resolve_model("smollm2-135m-instruct")
    result = round_trip(source, tmp_path / f"smol-{dtype}.gguf", dtype)
    assert close_enough(result, dtype) and result["tokens"] and result["template"], result
    assert result["top1"] >= 0.95, result
