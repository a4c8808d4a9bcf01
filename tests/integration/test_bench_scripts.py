"""The benchmark scripts run (their numbers come from `make bench` and bench/gpu.sh, never from tests)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_gpu_benchmark_smoke_runs_on_cpu():
    out = subprocess.run([sys.executable, str(ROOT / "bench/gpu.py"), "--smoke"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    results = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("JSON "))[5:])
    assert [r["method"] for r in results] == ["full", "lora"]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in results)
