"""What this machine computes best: the precision and the attention implementation that `auto` resolves to.

On a CPU the choice is measured, not read from flags: a bf16 matmul is about 3x faster than fp32 on an
AMD EPYC with avx512_bf16 and slower on an Intel Xeon seen here, and the same flags promise neither.
"""

from __future__ import annotations

import functools
import importlib.util


def resolve_precision(precision: str) -> str:
    """auto -> bf16 on GPUs that support it, fp16 on older GPUs; on a CPU, bf16 only where a bf16
    matmul measures clearly faster than fp32 (CPU flags such as avx512_bf16 do not promise that)."""
    import torch

    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16_speedup() > BF16_MIN_SPEEDUP else "fp32"


BF16_MIN_SPEEDUP = 1.3


# A CPU with no bf16 matmul kernels (AVX2 only, as on one AMD EPYC seen here) runs bf16 about 100x slower than
# fp32: a 512 x 512 probe would take seconds there, so a 128 x 128 one answers first when bf16 is
# hopeless (a ratio near 0.003 there; 1.0-1.6 from the same small probe on the EPYC with avx512_bf16).
HOPELESS_BF16 = 0.05


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """bf16 over fp32 matmul throughput on this CPU, measured once per process (about 0.1 s)."""
    quick = _speedup(128, reps=4, trials=2)
    if quick < HOPELESS_BF16:
        return quick
    return _speedup(512)


def _speedup(size: int, reps: int = 6, trials: int = 3) -> float:
    """The best of interleaved trials of each dtype: on a shared machine a moment's contention slows one trial,
    and one slowed bf16 trial made a benchmark run pick fp32 and train at a third of the speed."""
    from instructkit.metrics import matmul_peak_tflops

    best = {"bfloat16": 0.0, "float32": 0.0}
    for _ in range(trials):
        for dtype in best:
            best[dtype] = max(best[dtype], matmul_peak_tflops(dtype, size=size, reps=reps, trials=1))
    return best["bfloat16"] / best["float32"]


def resolve_attention(attn: str, trust_remote_code: bool = False) -> str:
    """auto -> flash_attention_2 on CUDA when flash-attn is installed, else sdpa; on a CPU, instructkit's CPU
    attention (cpu_kernels.py: SDPA, with packed examples attended one by one and, in bf16/fp16, small score
    tensors as plain matmuls; the rule reads shapes and dtype per call)."""
    import torch

    if attn != "auto":
        return attn
    if torch.cuda.is_available():
        return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"
    if trust_remote_code:  # remote model code may branch on the name "sdpa" itself
        return "sdpa"
    from instructkit.cpu_kernels import register

    return register()
