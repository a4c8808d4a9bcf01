"""Eager against torch.compile'd elementwise parts of the decoder, switched batch by batch in one process.

    python bench/compiled_parts.py                       # RMSNorm, SwiGLU and rotary, 10 batches, 5 repeats
    python bench/compiled_parts.py --parts rms --batches 4

On a CPU 40-45% of a LoRA step is outside the matmuls, much of it elementwise passes that a compiler would fuse.
This asks whether compiling only those parts pays, without compiling the whole decoder (`train.compile`, which
ran slower): Llama's RMSNorm, its MLP's SiLU-and-multiply and its rotary embedding are each wrapped in
`torch.compile(dynamic=True)` (inductor's C++ kernels on a CPU), and a switch picks the eager or the compiled
function on every call. Forward + backward of the training loss on the quickstart's LoRA model (train mode,
padding-free batches of 8, the run's precision under autocast), eager and compiled alternating batch by batch
so that both see the same machine. Reports the compile warm-up, the first losses both ways (close, not equal:
fused kernels round differently; in bf16 68.81 against 68.98 on the first batch) and per side the sum over
batches of each batch's fastest and median time. Llama-architecture models only (SmolLM2 is one); the classes
are patched in this process only.
"""

from __future__ import annotations

import argparse
import time

import torch
PARTS = ("rms", "mlp", "rope")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as transformers computes it (fp32 statistics, cast back before the weight)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def patch(parts: list[str], compiled: list[bool]) -> None:
    """Route the chosen parts through eager or compiled functions, as compiled[0] says at each call."""
    import transformers.models.llama.modeling_llama as llama

    c_rms, c_swiglu = torch.compile(rms_norm, dynamic=True), torch.compile(swiglu, dynamic=True)
    rope = llama.apply_rotary_pos_emb
    c_rope = torch.compile(rope, dynamic=True)
    if "rms" in parts:
        llama.LlamaRMSNorm.forward = lambda self, x: (c_rms if compiled[0] else rms_norm)(
            x, self.weight, self.variance_epsilon)
    if "mlp" in parts:
        llama.LlamaMLP.forward = lambda self, x: self.down_proj(
            (c_swiglu if compiled[0] else swiglu)(self.gate_proj(x), self.up_proj(x)))
    if "rope" in parts:
        llama.apply_rotary_pos_emb = lambda *a, **k: (c_rope if compiled[0] else rope)(*a, **k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts takes {', '.join(PARTS)}; got {args.parts}")

    from instructkit.data.packing import padding_free_batch
    from interleaved import alternate, setup, shuffled_groups, train_step

    _, examples, run, objective = setup("/tmp/compiled-parts-bench", 256)
    compiled = [False]
    patch(parts, compiled)
    batches = [padding_free_batch(g) for g in shuffled_groups(examples, args.batches)]
    step = train_step(objective, run.plan.compute_precision)

    def on(side: bool, batch: dict) -> float:
        compiled[0] = side
        return step(batch)

    start = time.perf_counter()
    first = [round(on(True, b), 3) for b in batches[:2]]
    print(f"{run.plan.compute_precision}; compiling {parts} and two batches: {time.perf_counter() - start:.1f} s")
    print(f"first losses: eager {[round(on(False, b), 3) for b in batches[:2]]}, compiled {first}")
    alternate({"eager": lambda i: on(False, batches[i]), "compiled": lambda i: on(True, batches[i])},
              len(batches), args.repeats)

if __name__ == "__main__":
    main()
