"""`instructkit serve` throughput: the same prompts one at a time, then from 8 concurrent clients, side by side.

    python bench/serve_bench.py                        # smollm2-135m-instruct, fp32, 16 prompts, 64 tokens each
    python bench/serve_bench.py --clients 8 --max-tokens 64 --repeats 3 --out bench/results-serve.json

The server runs as its own process (the real CLI, `--precision fp32`, port on 127.0.0.1); the clients are
threads here using the official openai client. Every request is greedy (temperature 0), so the concurrent
answers can be compared with the sequential ones: with batching they must be the same text. Half of the
concurrent clients stream, half do not: both kinds share batches.

Reported per mode: completion tokens (the server's usage figures, streams included), wall seconds,
aggregate completion tokens/s, latency p50 and max, and the mean size of the batches the server formed
(from the batch counts its /health reports).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, step by step.",
    "Give three tips for learning to play the guitar, with a sentence on each.",
    "Describe the water cycle to a ten-year-old.",
    "Write a polite email asking a colleague to review a report by Friday.",
    "What are the advantages and disadvantages of working from home?",
    "Summarize the plot of a heist movie you invent, in one paragraph.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a haiku sequence about autumn in a city.",
    "How does a bicycle stay upright when it moves?",
    "Plan a three-day trip to a mountain village, day by day.",
    "Explain what a neural network is without using jargon.",
    "Write a product description for a reusable water bottle.",
    "Why is the sky blue? Answer in a few sentences.",
    "Give a recipe for a simple tomato soup.",
    "Describe a busy train station at rush hour.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, max_batch: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "instructkit", "serve", model, "--port", str(port),
                             "--model-name", "bench", "--precision", "fp32", "--max-batch", str(max_batch)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 600  # the first use of the builtin model converts its GGUF (~30 s)
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the server did not start; its log:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def ask(client, prompt: str, max_tokens: int, stream: bool) -> tuple[str, int, float]:
    """(text, completion tokens, seconds) of one greedy request."""
    started = time.perf_counter()
    messages = [{"role": "user", "content": prompt}]
    if stream:
        chunks = list(client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        tokens = chunks[-1].usage.completion_tokens
    else:
        reply = client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens, temperature=0)
        text, tokens = reply.choices[0].message.content, reply.usage.completion_tokens
    return text, tokens, time.perf_counter() - started


def batches(port: int) -> dict[int, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
        return {int(k): v for k, v in json.loads(response.read())["batches"].items()}


def run_mode(client, port: int, clients: int, max_tokens: int) -> dict:
    """All prompts; with `clients` > 1 that many at once, every other client streaming."""
    before = batches(port)
    started = time.perf_counter()
    if clients == 1:
        answers = [ask(client, p, max_tokens, False) for p in PROMPTS]
    else:
        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(lambda ip: ask(client, ip[1], max_tokens, ip[0] % 2 == 1), enumerate(PROMPTS)))
    wall = time.perf_counter() - started
    latencies = sorted(a[2] for a in answers)
    tokens = sum(a[1] for a in answers)
    formed = {size: count - before.get(size, 0) for size, count in batches(port).items()}
    mean_batch = sum(size * n for size, n in formed.items()) / max(sum(formed.values()), 1)
    return {"mean_batch": round(mean_batch, 2), "clients": clients, "requests": len(answers), "completion_tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "latency_p50_s": round(statistics.median(latencies), 2),
            "latency_max_s": round(latencies[-1], 2), "texts": [a[0] for a in answers]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="alternating sequential/concurrent rounds")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    import openai

    port, log = free_port(), Path(tempfile.mkdtemp()) / "server.log"
    proc = start_server(args.model, port, args.clients, log)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        ask(client, "Hello", 8, False)  # warm-up
        rounds = {1: [], args.clients: []}
        for _ in range(args.repeats):
            for clients, results in rounds.items():
                results.append(run_mode(client, port, clients, args.max_tokens))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    report(args, rounds)


def report(args, rounds: dict[int, list[dict]]) -> None:
    sequential = rounds[1]
    median = {c: sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2] for c, rs in rounds.items()}
    same = [sum(a == b for a, b in zip(r["texts"], sequential[0]["texts"])) for rs in rounds.values() for r in rs]
    print(f"\nmodel {args.model} fp32, {len(PROMPTS)} prompts x {args.max_tokens} max tokens, greedy; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; median of {args.repeats} rounds\n")
    print("| mode | requests | completion tokens | wall s | tokens/s | latency p50 s | latency max s | mean batch "
          "| vs sequential |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for clients, r in median.items():
        name = "sequential (1 client)" if clients == 1 else f"{clients} concurrent clients (half streamed)"
        speedup = r["tokens_per_s"] / median[1]["tokens_per_s"]
        print(f"| {name} | {r['requests']} | {r['completion_tokens']} | {r['wall_s']} | {r['tokens_per_s']} | "
              f"{r['latency_p50_s']} | {r['latency_max_s']} | {r['mean_batch']} | {speedup:.2f}x |")
    print("\nall rounds, tokens/s: " + "; ".join(f"{c} client(s): {[r['tokens_per_s'] for r in rs]}"
                                                for c, rs in rounds.items()))
    print(f"answers identical to the first sequential round: {same} of {len(PROMPTS)} per round")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rounds": {str(c): rs for c, rs in rounds.items()},
                                              "identical_per_round": same}, indent=1))


if __name__ == "__main__":
    main()
