"""`instructkit report RUN`: one page that says whether tuning worked (or, for SWEEP_DIR, which trial won).

A self-contained HTML file (plots embedded as PNG data) and a Markdown twin (plots beside it) with the
config summary, train and eval loss curves, throughput and MFU over time, the before/after metric
table, and sample generations side by side. It only reads the run directory.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import yaml

from instructkit.errors import user_error
from instructkit.metrics import read_metrics

SAMPLES = 6


def _plot_losses(records: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.plot(*zip(*train), label="train loss", color="#1f77b4")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="#d62728")
    ax.set_xlabel("optimizer step")
    preference = any("pref_accuracy" in r for r in records)
    ax.set_ylabel("preference loss per pair" if preference else "loss per supervised token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


REWARD_COLORS = (("rewards_chosen", "#2ca02c"), ("rewards_rejected", "#d62728"), ("reward_margin", "#1f77b4"))


def _plot_preference(records: list[dict], path: Path) -> bool:
    """A preference run's rewards (chosen, rejected, their margin) and how often the pair is ranked right,
    on the training steps and the held-out pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any("pref_accuracy" in r or "eval_pref_accuracy" in r for r in records):
        return False
    fig, (rewards, accuracy) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for prefix, style in (("", "-"), ("eval_", "o--")):
        for key, color in REWARD_COLORS:
            points = [(r["step"], r[prefix + key]) for r in records if prefix + key in r]
            if points:
                rewards.plot(*zip(*points), style, color=color, label=prefix + key)
        points = [(r["step"], r[prefix + "pref_accuracy"]) for r in records if prefix + "pref_accuracy" in r]
        if points:
            accuracy.plot(*zip(*points), style, color="#9467bd", label=prefix + "pref_accuracy")
    for ax, label in ((rewards, "reward"), (accuracy, "pairs ranked right")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _plot_throughput(records: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["step"], r["tokens_per_s"], r.get("mfu")) for r in records if "tokens_per_s" in r]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    steps, speed, mfu = zip(*points)
    lines = ax.plot(steps, speed, color="#2ca02c", label="real tokens/s")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("real tokens/s")
    if any(m is not None for m in mfu):
        twin = ax.twinx()
        lines += twin.plot(steps, [100 * (m or 0) for m in mfu], color="#9467bd", linestyle="--", label="MFU (%)")
        twin.set_ylabel("MFU (%)")
    ax.legend(lines, [line.get_label() for line in lines], loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _summary(run_dir: Path) -> list[tuple[str, str]]:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    tc = cfg["train"]
    params = manifest.get("parameters", {})
    rows = [("run", f"{cfg['run_name']} ({manifest.get('status', '?')})"),
            ("model", f"{cfg['model']['name_or_path']} ({cfg['method']}, {manifest.get('precision', '?')})"),
            ("trainable parameters", f"{params.get('trainable', 0):,} of {params.get('total', 0):,}"),
            ("data", f"{cfg['data']['train_file']} (template {manifest.get('data', {}).get('template', '?')})"),
            ("batch", f"{tc['per_device_train_batch_size']} x accumulation {tc['gradient_accumulation_steps']}"),
            ("learning rate", f"{tc['learning_rate']} ({tc['lr_scheduler_type']}, warmup {tc['warmup_ratio']})"),
            ("steps", str(manifest.get("total_steps", "?"))),
            ("time", f"{manifest.get('start_time', '?')} to {manifest.get('end_time', '?')}"),
            ("device", str(manifest.get("device", "?")))]
    if cfg["method"] == "lora":
        rows.insert(3, ("LoRA", f"r {cfg['lora']['r']}, alpha {cfg['lora']['alpha']}, {cfg['lora']['target_modules']}"))
    return rows


RECIPE_KEYS = ("lora.r", "lora.alpha", "lora.target_modules", "train.per_device_train_batch_size",
               "train.gradient_accumulation_steps", "train.learning_rate", "train.num_train_epochs", "train.max_steps",
               "train.warmup_ratio", "train.lr_scheduler_type", "data.val_size", "train.eval_steps",
               "train.final_weights", "train.best_metric", "train.early_stopping_patience")


def _hyperparameters(run_dir: Path) -> list[list[str]]:
    """[key, value, how it was chosen] for the recipe: `auto` with its reason, or set in the config;
    then which weights final/ holds."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    resolved = manifest.get("resolved", {})
    rows = []
    for key in RECIPE_KEYS:
        if key.startswith("lora.") and cfg["method"] != "lora":
            continue
        section, name = key.split(".")
        value = cfg.get(section, {}).get(name)
        how = f"auto: {resolved[key]['why']}" if key in resolved else "config (or its default)"
        if isinstance(value, float) and value.is_integer() and key != "train.learning_rate":
            value = int(value)  # 20 rows, 3 epochs: counts read as counts
        rows.append([key, json.dumps(value) if isinstance(value, list) else str(value), how])
    best = manifest.get("best") or {}
    if best.get("step") is not None:
        metric, value = next((k, v) for k, v in best.items() if k != "step")
        step = manifest.get("held_step") or best["step"]
        held = (f"the best weights, step {step} ({metric} {value:.4f})" if step == best["step"] else
                f"the weights of step {step}, within one standard error of the best {metric} {value:.4f} "
                f"(step {best['step']})")
        if manifest.get("final_weights") != "best":
            held = f"the last weights, step {manifest.get('last_step')}"
        early = f"; stopped early at step {manifest.get('last_step')}" if manifest.get("stopped_early") else ""
        rows.append(["final/", held + early, f"train.final_weights: {cfg['train'].get('final_weights')}"])
    return rows


GENERATION_ROWS = (("loss", "{:.4f}", "{:+.4f}"), ("perplexity", "{:.3f}", "{:+.3f}"),
                   ("exact_match", "{:.1%}", "{:+.1f} pts"), ("rouge_l", "{:.1%}", "{:+.1f} pts"))
# `eval` on preference pairs: how often each model ranks the chosen answer first, and by how much.
PAIR_ROWS = (("pref_accuracy", "{:.1%}", "{:+.1f} pts"), ("pref_accuracy_per_token", "{:.1%}", "{:+.1f} pts"),
             ("margin", "{:.3f}", "{:+.3f}"), ("chosen_logp", "{:.3f}", "{:+.3f}"))


def _compare_rows(tuned: dict, base: dict | None, specs: tuple) -> list[list[str]]:
    rows = []
    for m, fmt, diff in specs:
        change = (tuned[m] - base[m]) * (100 if "pts" in diff else 1) if base else None
        rows.append([m, fmt.format(base[m]) if base else "-", fmt.format(tuned[m]),
                     diff.format(change) if base else "-"])
    return rows


def _metric_rows(results: dict) -> list[list[str]]:
    tuned, base = results["tuned"], results.get("base")
    if results.get("kind") == "preference":
        return _compare_rows(tuned, base, PAIR_ROWS)
    rows = _compare_rows(tuned, base, GENERATION_ROWS)
    for task, t in tuned["per_task"].items():
        b = base["per_task"][task] if base else None
        rows.append([f"exact match: {task}", f"{b['exact_match']:.1%}" if b else "-", f"{t['exact_match']:.1%}",
                     f"{100 * (t['exact_match'] - b['exact_match']):+.1f} pts" if b else "-"])
    return rows


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    clean = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                     + ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows])


def build_report(run: str | Path) -> tuple[Path, Path]:
    """Write RUN/report/report.html and report.md (with its PNGs), or a sweep's report for a sweep
    directory; returns their paths."""
    run_dir = Path(run)
    if is_sweep_dir(run_dir):
        return build_sweep_report(run_dir)
    if not ((run_dir / "config.yaml").is_file() and (run_dir / "manifest.json").is_file()):
        raise user_error(f"{run_dir} is not a run directory (it needs config.yaml and manifest.json)", str(run_dir),
                         "pass the output_dir of a run, e.g. runs/NAME")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    records = read_metrics(run_dir)
    plots = [(name, title) for name, title, draw in (("loss.png", "Loss", _plot_losses),
                                                     ("preference.png", "Preference rewards", _plot_preference),
                                                     ("throughput.png", "Throughput and MFU", _plot_throughput))
             if draw(records, out / name)]
    summary = [[k, v] for k, v in _summary(run_dir)]
    eval_path = run_dir / "eval/eval.json"
    results = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    predictions = []
    if (run_dir / "eval/predictions.jsonl").is_file():
        predictions = [json.loads(x) for x in (run_dir / "eval/predictions.jsonl").read_text().splitlines()][:SAMPLES]
    samples = [[p["prompt"] + (f"\n{p['input']}" if p.get("input") else ""), p["reference"], p.get("base") or "-",
                p["tuned"]] for p in predictions]
    no_eval = (f"No evaluation yet: run `instructkit eval {run_dir} --data FILE --baseline`, "
               "or set eval.generate: true.")
    title = f"instructkit report: {summary[0][1]}"

    md = [f"# {title}", "", _md_table(["", ""], summary), ""]
    page = [f"<h1>{html.escape(title)}</h1>", _html_table(["", ""], summary)]
    hyper, header = _hyperparameters(run_dir), ["key", "value", "chosen by"]
    md += ["## Hyperparameters", "", _md_table(header, hyper), ""]
    page += ["<h2>Hyperparameters</h2>", _html_table(header, hyper)]
    for name, heading in plots:
        data = base64.b64encode((out / name).read_bytes()).decode()
        md += [f"## {heading}", "", f"![{heading}]({name})", ""]
        page += [f"<h2>{heading}</h2>", f'<img alt="{heading}" src="data:image/png;base64,{data}">']
    md.append("## Before and after")
    page.append("<h2>Before and after</h2>")
    if results:
        header = ["metric", "base", "tuned", "difference"]
        md += ["", f"{results['tuned']['n']} rows of {results.get('data', '')}", "",
               _md_table(header, _metric_rows(results)), ""]
        page += [f"<p>{results['tuned']['n']} rows of {html.escape(str(results.get('data', '')))}</p>",
                 _html_table(header, _metric_rows(results))]
    else:
        md += ["", no_eval, ""]
        page.append(f"<p>{html.escape(no_eval)}</p>")
    if samples:
        header = ["prompt", "reference", "base", "tuned"]
        md += ["## Sample generations", "", _md_table(header, samples), ""]
        page += ["<h2>Sample generations</h2>", _html_table(header, samples)]
    return _write_pages(out, title, md, page)


def _write_pages(out: Path, title: str, md: list[str], page: list[str]) -> tuple[Path, Path]:
    style = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
             "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;"
             "text-align:left;vertical-align:top;white-space:pre-wrap}img{max-width:100%}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
                                     f"</title><style>{style}</style></head><body>{''.join(page)}</body></html>\n")
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out / "report.html", out / "report.md"


def is_sweep_dir(path: Path) -> bool:
    """A directory of `instructkit sweep` (its study or leaderboard), not a run."""
    return not (path / "config.yaml").is_file() and ((path / "leaderboard.json").is_file()
                                                     or (path / "study.db").is_file())


def _trial_dir(sweep_dir: Path, run_dir: str | None) -> Path | None:
    """A trial's run directory as recorded (relative to where the sweep ran), else by name in the sweep dir."""
    if not run_dir:
        return None
    for candidate in (Path(run_dir), sweep_dir / Path(run_dir).name):
        if (candidate / "metrics.jsonl").is_file():
            return candidate
    return None


def _plot_sweep(sweep_dir: Path, rows: list[dict], path: Path, metric: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, seen = [], set()
    for row in rows:  # a retried trial shares its directory with its retry, which comes first (ranked)
        run = _trial_dir(sweep_dir, row["run_dir"])
        if run in seen:
            continue
        seen.add(run)
        points = [(r["step"], r[metric]) for r in read_metrics(run) if metric in r] if run else []
        if points:
            curves.append((row, points))
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    styles = {"COMPLETE": "-", "PRUNED": "--"}
    for row, points in curves:
        ax.plot(*zip(*points), styles.get(row["state"], ":"), marker=".", label=f"trial {row['trial']}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if len(curves) <= 12:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def build_sweep_report(sweep_dir: Path) -> tuple[Path, Path]:
    """SWEEP_DIR/report/report.html and report.md: the sweep's summary, curves of the metric it ranks by for
    its trials (solid complete, dashed pruned, dotted failed) and the leaderboard."""
    from instructkit.sweep_board import best_text, board_table, metric_header

    if not (sweep_dir / "leaderboard.json").is_file():
        raise user_error(f"{sweep_dir} holds a study but no leaderboard.json yet", str(sweep_dir),
                         "run the same `instructkit sweep` command again: it writes the leaderboard as it starts")
    board = json.loads((sweep_dir / "leaderboard.json").read_text())
    rows, best = board["trials"], board.get("best")
    metric = board.get("metric", "eval_loss")  # a leaderboard from before the metric ranked by eval loss
    plotted = "eval_loss" if metric == "auto" else metric  # not resolved yet: no trial reported anything
    states = ", ".join(f"{sum(r['state'] == s for r in rows)} {s.lower()}"
                       for s in dict.fromkeys(r["state"] for r in rows))
    summary = [["study", f"{board.get('study')} ({board.get('storage')})"],
               ["trials", f"{len(rows)} ({states or 'none yet'}); --trials {board.get('trials_wanted')}"],
               ["search space", "; ".join(f"{k}: {v}" for k, v in board.get("space", {}).items())],
               ["ranked by", metric_header(metric)],
               ["best", f"trial {best['trial']}, {best_text(best)}, run {best['run_dir']}; config "
                        f"{sweep_dir / 'best.yaml'}" if best else "no trial has completed yet"]]
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    title = f"instructkit sweep: {board.get('study')}"
    header, cells = board_table(rows, metric)
    md = [f"# {title}", "", _md_table(["", ""], summary), ""]
    page = [f"<h1>{html.escape(title)}</h1>", _html_table(["", ""], summary)]
    if _plot_sweep(sweep_dir, rows, out / f"{plotted}.png", plotted):
        data = base64.b64encode((out / f"{plotted}.png").read_bytes()).decode()
        md += [f"## {plotted} of each trial", "", f"![{plotted} of each trial]({plotted}.png)", ""]
        page += [f"<h2>{plotted} of each trial</h2>", f'<img alt="{plotted}" src="data:image/png;base64,{data}">']
    md += ["## Leaderboard", "", _md_table(header, cells), ""]
    page += ["<h2>Leaderboard</h2>", _html_table(header, cells)]
    return _write_pages(out, title, md, page)
