"""The GPU check (issue 18): every GPU-only path of instructkit run once, and the speed figures side by side.

    bash bench/gpu_check.sh [--out FILE]      # on one H100/H200: about 6 minutes, stops itself at 7.5
    python bench/gpu_check.py --smoke         # a dry run on the CPU with a tiny model, about 2 minutes

Parts, each in its own process with its own time limit (a hang costs that part, not the check): the
importable packages, `instructkit env`, `pytest tests/gpu`, random models (a ~1B Llama, and SmolLM2-135M's shape
for the quickstart) with the measured bf16 matmul peak, instructkit LoRA and full runs on packed 2048-token
rows in bf16, the seed article's settings (fp16, LoRA r8 q/v), gradient checkpointing, QLoRA, Liger's fused
kernels (model.kernels: liger against none), the seed recipe in HF Trainer and TRL's SFTTrainer on the same
model and rows, the quickstart, `merge`, `export-gguf`, `serve` (start, one request, stop) and batched `eval`.
A part the machine cannot run (no CUDA, a package missing, a part it needs failed, time ran out) is skipped
with the reason. The JSON (--out) and a Markdown table beside it are rewritten after every part.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_check_parts import (  # noqa: E402
    TOTAL_S,
    Check,
    Failed,
    Skip,
    baseline,
    env,
    evaluate,
    export_gguf,
    instructkit_run,
    merge,
    packages,
    quickstart,
    serve,
    setup,
    stop,
    tests_gpu,
)
from gpu_check_report import write_report  # noqa: E402


@dataclass
class Part:
    name: str
    what: str
    run: Callable[[Check], dict]
    limit_s: tuple[int, int]  # (GPU, smoke) seconds
    needs: tuple[str, ...] = ()  # modules that must import
    cuda: bool = False
    after: tuple[str, ...] = ()  # parts that must have succeeded


ONE_B = "the ~1B random Llama, packed 2048-token rows"
PARTS = [
    Part("packages", "which optional packages import", packages, (60, 40)),
    Part("env", "instructkit env", env, (40, 30), needs=("pydantic",)),
    Part("tests-gpu", "pytest tests/gpu", tests_gpu, (120, 60), needs=("pydantic",), cuda=True),
    Part("setup", "random models, the rows, the measured matmul peak", setup, (90, 40)),
    Part("lora", f"instructkit LoRA r8 q/v, bf16, {ONE_B}", instructkit_run("lora", "lora", {
        "precision": "bf16", "kernels": "none"}), (60, 40), ("pydantic",), after=("setup",)),
    Part("full", f"instructkit full fine-tuning, bf16, {ONE_B}", instructkit_run("full", "full", {
        "precision": "bf16", "kernels": "none"}), (75, 40), ("pydantic",), after=("setup",)),
    Part("seed-recipe", "the seed article's recipe in HF Trainer (fp16, LoRA r8 q/v, 4 x 8, padded)",
         baseline("seed", "fp16", (4, 8)), (75, 40), after=("setup",)),
    Part("trl-sft", "TRL SFTTrainer (bf16, LoRA r8 q/v, packed padding-free)", baseline("trl", "bf16"), (75, 50),
         ("trl", "datasets"), after=("setup",)),
    Part("recipe-fp16", "instructkit with the article's settings: fp16, LoRA r8 q/v", instructkit_run(
        "recipe-fp16", "lora", {"precision": "fp16", "kernels": "none"}), (60, 30), ("pydantic",), True, ("setup",)),
    Part("lora-liger", "instructkit LoRA bf16 with model.kernels: liger", instructkit_run(
        "lora-liger", "lora", {"precision": "bf16", "kernels": "liger"}), (60, 30), ("pydantic", "liger_kernel"),
         True, ("setup",)),
    Part("full-liger", "instructkit full bf16 with model.kernels: liger", instructkit_run(
        "full-liger", "full", {"precision": "bf16", "kernels": "liger"}), (75, 30), ("pydantic", "liger_kernel"),
         True, ("setup",)),
    Part("qlora", "instructkit QLoRA (4-bit NF4 base, bf16 compute)", instructkit_run("qlora", "lora", {
        "precision": "bf16", "kernels": "none", "load_in_4bit": True}), (60, 30), ("pydantic", "bitsandbytes"),
         True, ("setup",)),
    Part("lora-gc", "instructkit LoRA bf16 with gradient checkpointing", instructkit_run("lora-gc", "lora", {
        "precision": "bf16", "kernels": "none", "gradient_checkpointing": True}), (60, 40), ("pydantic",),
         after=("setup",)),
    Part("quickstart", "configs/quickstart.yaml", quickstart, (90, 60), ("pydantic",), after=("setup",)),
    Part("merge", "instructkit merge of the quickstart run", merge, (40, 30), ("pydantic",), after=("quickstart",)),
    Part("export-gguf", "instructkit export-gguf of the merged model", export_gguf, (40, 30), ("pydantic", "gguf"),
         after=("merge",)),
    Part("serve", "instructkit serve: start, one chat request, stop", serve, (60, 45),
         ("pydantic", "fastapi", "uvicorn"), after=("quickstart",)),
    Part("eval", "instructkit eval, batched generation on examples/data/test.jsonl", evaluate, (60, 45),
         ("pydantic", "rouge_score"), after=("quickstart",)),
]


def why_not(check: Check, part: Part) -> str | None:
    """Why `part` cannot run here, or None."""
    probe = check.results.get("packages", {}).get("figures", {})
    if part.cuda and (check.smoke or not probe.get("cuda", True)):
        return "needs CUDA: " + ("--smoke runs on the CPU" if check.smoke else "torch.cuda.is_available() is False")
    for module in part.needs:
        info = probe.get("modules", {}).get(module)
        if info and not info["ok"]:
            return f"needs the {module} package, which does not import here ({info['error']})"
        if info and info.get("usable") is False:
            return f"needs {module} usable: {info['why']}"
    for name in part.after:
        if check.results.get(name, {}).get("status") != "ok":
            return f"needs the part {name}, which did not succeed"
    return None


def run_part(check: Check, part: Part) -> dict:
    left = check.deadline - time.time()
    limit = min(part.limit_s[check.smoke], left)
    reason = why_not(check, part) or (None if limit >= 15 else
                                       f"out of time: {left:.0f} s of the check's {TOTAL_S[check.mode]} s left")
    result = {"name": part.name, "what": part.what, "limit_s": round(limit)}
    if reason:
        return {**result, "status": "skipped", "reason": reason}
    check.limit = limit
    start = time.perf_counter()
    try:
        figures = part.run(check)
        result.update(status="ok", figures=figures)
    except Skip as why:
        result.update(status="skipped", reason=str(why))
    except (Failed, OSError, KeyError, ValueError, json.JSONDecodeError) as err:
        result.update(status="failed", reason=f"{type(err).__name__}: {err}")
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def stop_with(check: Check) -> None:
    """On SIGTERM or SIGINT, stop the running part's process group too (it has a session of its own, which a
    signal to this process does not reach), then exit."""
    def handler(signum, _frame):
        if check.current is not None:
            stop(check.current)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def selected(only: str | None) -> set[str]:
    """The parts to run: all, or those named with the parts they need (and `packages`, which says what imports)."""
    if not only:
        return {p.name for p in PARTS}
    names, needs = {"packages", *only.split(",")}, {p.name: p.after for p in PARTS}
    unknown = names - set(needs)
    if unknown:
        sys.exit(f"--only: no part named {', '.join(sorted(unknown))}; parts: {', '.join(needs)}")
    while (more := {d for n in names for d in needs[n]} - names):
        names |= more
    return names


def run_all(check: Check, names: set[str], command: str) -> None:
    for part in PARTS:
        if part.name in names:
            check.results[part.name] = run_part(check, part)
        else:
            check.results[part.name] = {"name": part.name, "what": part.what, "status": "skipped",
                                        "reason": "not asked for (--only)"}
        r = check.results[part.name]
        print(f"[{time.time() - check.started:5.0f} s] {part.name}: {r['status']} "
              f"{r.get('reason') or json.dumps(r.get('figures'))[:300]}", flush=True)
        write_report(check, command, PARTS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU dry run: tiny model, a few steps")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/gpu-check.json")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/instructkit-gpu-check"))
    parser.add_argument("--only", help="comma-separated parts to run (with the parts they need); the rest skipped")
    args = parser.parse_args()
    names = selected(args.only)
    mode = "smoke" if args.smoke else "gpu"
    check = Check(args.smoke, args.workdir, args.out, time.time() + TOTAL_S[mode])
    check.work.mkdir(parents=True, exist_ok=True)
    stop_with(check)
    run_all(check, names, " ".join(["python", "bench/gpu_check.py", *sys.argv[1:]]))
    failed = [name for name, r in check.results.items() if r["status"] == "failed"]
    print(f"wrote {check.out} and {check.out.with_suffix('.md')}; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
