"""The GPU check's summary: every part's status and figures as JSON, the side-by-side table of the training
runs, the issue's targets met or not, and the same as Markdown beside the JSON."""

from __future__ import annotations

import json
import platform
import time
from typing import Any

# The runs compared, in the table's order: (part, tool and settings).
COMPARED = [
    ("seed-recipe", "HF Trainer, the seed article's recipe"),
    ("trl-sft", "TRL SFTTrainer"),
    ("lora", "instructkit LoRA"),
    ("lora-liger", "instructkit LoRA, Liger kernels"),
    ("recipe-fp16", "instructkit, the article's settings"),
    ("lora-gc", "instructkit LoRA, gradient checkpointing"),
    ("qlora", "instructkit QLoRA"),
    ("full", "instructkit full"),
    ("full-liger", "instructkit full, Liger kernels"),
]


def side_by_side(results: dict[str, dict]) -> list[dict]:
    """One row per training run that finished: tokens/s, MFU, peak GPU memory, and the ratios to the seed
    recipe and to TRL on the same model and rows."""
    done = {name: r["figures"] for name, r in results.items() if r.get("status") == "ok" and "figures" in r}
    rows = []
    for name, tool in COMPARED:
        if name not in done:
            continue
        f = done[name]
        row = {"part": name, "tool": tool, "precision": f.get("precision"), "tokens_per_s": f["tokens_per_s"],
               "mfu": f["mfu"], "peak_mem_gib": f.get("peak_mem_gib"), "loss": f.get("loss")}
        for base in ("seed-recipe", "trl-sft"):
            if base in done and name != base:
                row[f"vs_{base}"] = round(f["tokens_per_s"] / done[base]["tokens_per_s"], 2)
        rows.append(row)
    return rows


def _best(rows: list[dict], names: tuple[str, ...], key: str) -> dict | None:
    found = [r for r in rows if r["part"] in names and r.get(key) is not None]
    return max(found, key=lambda r: r[key]) if found else None


def targets(rows: list[dict]) -> list[dict]:
    """The issue's GPU targets against the best instructkit run of each kind (None: not measured)."""
    full = _best(rows, ("full", "full-liger"), "mfu")
    lora = _best(rows, ("lora", "lora-liger"), "tokens_per_s")
    trl = next((r for r in rows if r["part"] == "trl-sft"), None)

    def target(what: str, value: Any, met: bool | None) -> dict:
        return {"target": what, "value": value, "met": met}

    out = [target("full fine-tuning MFU >= 45%", full and full["mfu"], full and full["mfu"] >= 0.45)]
    for base, ratio in (("seed-recipe", 2.0), ("trl-sft", 1.5)):
        value = lora and lora.get(f"vs_{base}")
        out.append(target(f"LoRA tokens/s >= {ratio}x {base}", value, None if value is None else value >= ratio))
    mem = bool(lora and trl and lora["peak_mem_gib"] is not None and trl["peak_mem_gib"] is not None)
    pair = [lora["peak_mem_gib"], trl["peak_mem_gib"]] if mem else None
    out.append(target("LoRA peak memory (GiB) below TRL's", pair, pair[0] < pair[1] if pair else None))
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _brief(result: dict) -> str:
    if result["status"] != "ok":
        return (result.get("reason") or "").replace("|", "/").replace("\n", " ")[:300]
    figures = result.get("figures") or {}
    keys = ("summary", "tokens_per_s", "mfu", "peak_mem_gib", "loss", "eval_loss", "kernels", "model", "size_mb",
            "ready_s", "request_s", "reply", "rows", "wall_s", "exact_match", "rouge_l", "mean_example_tokens",
            "peak_tflops")
    shown = {k: figures[k] for k in keys if k in figures}
    return json.dumps(shown)[:300].replace("|", "/")


def markdown(report: dict) -> str:
    lines = [f"GPU check ({report['mode']}), {report['date']}, {report['device']}; `{report['command']}`; "
             f"{report['wall_s']:.0f} s", "", "| part | status | s | figures, or why not |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['name']} | {r['status']} | {_cell(r.get('seconds'))} | {_brief(r)} |" for r in report["parts"]]
    if report["side_by_side"]:
        lines += ["", "| run | precision | tokens/s | MFU | peak GiB | loss | vs seed | vs TRL |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['tool']} | {r['precision']} | {r['tokens_per_s']} | {r['mfu']:.1%} | "
                  f"{_cell(r['peak_mem_gib'])} | {_cell(r['loss'])} | {_cell(r.get('vs_seed-recipe'))} | "
                  f"{_cell(r.get('vs_trl-sft'))} |" for r in report["side_by_side"]]
    lines += ["", "| target | value | met |", "| --- | --- | --- |"]
    lines += [f"| {t['target']} | {_cell(t['value'])} | {_cell(t['met'])} |" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def write_report(check, command: str, parts: list) -> dict:
    """Write the JSON (every part, run or not yet) and the Markdown beside it; returns the report."""
    results = [check.results.get(p.name, {"name": p.name, "what": p.what, "status": "pending"}) for p in parts]
    setup = check.results.get("setup", {}).get("figures", {})
    rows = side_by_side(check.results)
    gpus = (check.results.get("env", {}).get("figures") or {}).get("gpus") or []
    report = {"mode": check.mode, "command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
              "device": ", ".join(g.get("name", "?") for g in gpus) or f"CPU ({platform.processor() or 'x86_64'})",
              "wall_s": round(time.time() - check.started, 1), "peak_tflops": setup.get("peak_tflops"),
              "parts": results, "side_by_side": rows,
              # a tiny model on a CPU measures nothing the targets are about
              "targets": [{**t, "met": None} for t in targets(rows)] if check.smoke else targets(rows)}
    check.out.parent.mkdir(parents=True, exist_ok=True)
    check.out.write_text(json.dumps(report, indent=1))
    check.out.with_suffix(".md").write_text(markdown(report))
    return report
