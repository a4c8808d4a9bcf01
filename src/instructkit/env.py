"""Environment check: is CUDA there, which GPUs, which versions, can this machine train in bf16?"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import shutil
from pathlib import Path

PACKAGES = ("instructkit", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _imports(module: str) -> str:
    """'yes (version)', or 'no (reason)': import it for real, since installed is not the same as usable."""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable", with its reason
        return f"no ({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''})"
    return f"yes ({getattr(mod, '__version__', '?')})"


def cpu_info() -> dict:
    """CPU model and the bf16-related instruction set features it reports."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    except OSError:
        pass
    bf16 = sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16", "avx_ne_convert"))
    return {"model": model, "bf16_features": bf16}


def gpu_info() -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"index": index, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                     "capability": f"{props.major}.{props.minor}", "bf16": props.major >= 8})
    return gpus


def free_disk_gib(path: str | Path) -> float | None:
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return round(shutil.disk_usage(path).free / 2**30, 1)
    except OSError:
        return None


def collect(output_dir: str | Path = "runs") -> dict:
    """Everything `instructkit env` reports, as plain data."""
    import torch

    cuda = torch.cuda.is_available()
    nccl = None
    if cuda and hasattr(torch.cuda, "nccl"):
        try:
            nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:  # noqa: BLE001 - NCCL absent in this build
            nccl = None
    return {
        "versions": package_versions(),
        "torch_cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": nccl,
        "cuda_available": cuda,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpus": gpu_info(),
        "flash_attn": _imports("flash_attn"),
        "bitsandbytes": _imports("bitsandbytes"),
        "cpu": cpu_info(),
        "cpu_threads": torch.get_num_threads(),
        "output_dir": str(output_dir),
        "free_disk_gib": free_disk_gib(output_dir),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
    }


def device_summary() -> str:
    """One line for the manifest: the GPUs, or the CPU model."""
    import torch

    if torch.cuda.is_available():
        return ", ".join(f"cuda:{g['index']} {g['name']}" for g in gpu_info())
    return f"cpu ({cpu_info()['model']}, {torch.get_num_threads()} threads)"


def format_table(info: dict) -> str:
    rows = [(name, version or "not installed") for name, version in info["versions"].items()]
    rows += [
        ("CUDA (torch build)", info["torch_cuda_build"] or "none (CPU build)"),
        ("cuDNN", info["cudnn"] or "-"),
        ("NCCL", info["nccl"] or "-"),
        ("torch.cuda.is_available()", str(info["cuda_available"])),
        ("GPU count", str(info["gpu_count"])),
    ]
    for g in info["gpus"]:
        rows.append((f"GPU {g['index']}", f"{g['name']}, {g['memory_gib']} GiB, sm {g['capability']}, "
                     f"bf16 {'yes' if g['bf16'] else 'no'}"))
    rows += [
        ("flash-attn", info["flash_attn"]),
        ("bitsandbytes", info["bitsandbytes"]),
        ("CPU", info["cpu"]["model"]),
        ("CPU bf16 features", ", ".join(info["cpu"]["bf16_features"]) or "none"),
        ("torch CPU threads", str(info["cpu_threads"])),
        (f"free disk ({info['output_dir']})", f"{info['free_disk_gib']} GiB" if info["free_disk_gib"] is not None else "?"),
        ("platform", info["platform"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def gpu_problem(info: dict) -> str | None:
    """Why no GPU is usable, or None when one is."""
    if info["cuda_available"] and info["gpu_count"] > 0:
        return None
    if not info["torch_cuda_build"]:
        return "this torch is a CPU build (torch.version.cuda is None); install a CUDA build of torch"
    return ("torch is a CUDA build but sees no GPU: check the driver (nvidia-smi), and that the container "
            "was started with --gpus all")

