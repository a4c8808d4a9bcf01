"""What a CPU can give a small model's training step, next to the square-matmul peak MFU is taken against.

    python bench/cpu_ceiling.py [--dtype bfloat16] [--rows 640] [--repeats 5]

Prints, for the SmolLM2-135M shapes the quickstart trains (hidden 576, MLP 1536, 30 layers; `--rows`
tokens per step, the quickstart's padded batch is 8 x ~80):
- peak: a 1024-square matmul repeated on the same operands (best of `--repeats`): what `train` measures;
- chain: one forward pass of model-shaped matmuls, each layer with its own weights (q, o, gate, up, down),
  as a training step runs them: operands come from memory rather than the caches;
- elementwise: a multiply of two (rows x 1536) tensors, hot (the same operands again) and cold (a fresh
  pair each time, as a step's SwiGLU meets them), in microseconds.
The ratio chain / peak bounds the MFU a step can reach even with no elementwise work and no padding.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

HIDDEN, MLP, LAYERS = 576, 1536, 30


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def chain_tflops(rows: int, dtype: torch.dtype, repeats: int) -> list[float]:
    """TFLOP/s of every repeat of a forward chain through LAYERS layers of distinct weights."""
    linear = torch.nn.functional.linear
    shapes = [(HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP)]  # q, o, gate, up, down
    weights = [[torch.randn(*s, dtype=dtype) / s[1] ** 0.5 for s in shapes] for _ in range(LAYERS)]
    x = torch.randn(rows, HIDDEN, dtype=dtype)
    flops = LAYERS * 2 * rows * sum(a * b for a, b in shapes)

    def forward() -> None:
        h = x
        for q, o, gate, up, down in weights:
            h = linear(linear(h, q), o)
            linear(h, gate)
            h = linear(linear(h, up), down)

    forward()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward()
        out.append(flops / (time.perf_counter() - start) / 1e12)
    return out


def elementwise_us(rows: int, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    """(hot, cold) microseconds of one (rows x MLP) multiply."""
    a, b = torch.randn(rows, MLP, dtype=dtype), torch.randn(rows, MLP, dtype=dtype)
    hot = best_time(lambda: a * b, repeats * 10)
    pairs = [(torch.randn(rows, MLP, dtype=dtype), torch.randn(rows, MLP, dtype=dtype)) for _ in range(60)]
    start = time.perf_counter()
    for x, y in pairs:
        x * y
    return hot * 1e6, (time.perf_counter() - start) / len(pairs) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rows", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from instructkit.metrics import matmul_peak_tflops

    dtype = getattr(torch, args.dtype)
    peak = matmul_peak_tflops(args.dtype, size=1024, trials=args.repeats)
    chain = chain_tflops(args.rows, dtype, args.repeats)
    hot, cold = elementwise_us(args.rows, dtype, args.repeats)
    print(f"{args.dtype}, {torch.get_num_threads()} threads, {args.rows} rows")
    print(f"peak (1024-square, best of {args.repeats}): {peak:.3f} TFLOP/s")
    print(f"chain of model-shaped matmuls: median {statistics.median(chain):.3f}, best {max(chain):.3f} TFLOP/s "
          f"= {statistics.median(chain) / peak:.0%} of the peak (median)")
    print(f"multiply {args.rows}x{MLP}: hot {hot:.0f} us, cold {cold:.0f} us")


if __name__ == "__main__":
    main()
