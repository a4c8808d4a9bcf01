"""`instructkit sweep` on the command line: its flags and the call into sweep.py.

Kept apart from cli.py, like serve_cli.py, because the sweep has flags of its own. Nothing heavy is
imported at module level, so `instructkit --help` still answers at once.
"""

from __future__ import annotations

import argparse
import sys

from instructkit.sweep_metric import METRICS

EXIT_OK, EXIT_FAIL = 0, 1


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    """The `sweep` subcommand and its flags."""
    p = sub.add_parser("sweep", help="hyperparameter search (Optuna): trials are ordinary runs, ranked and pruned "
                                     "on the metric they select their weights by")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.path=value for every trial, e.g. data.val_size=0.1")
    p.add_argument("--trials", type=int, required=True, metavar="N",
                   help="trials wanted in total; running the command again starts only the missing ones")
    p.add_argument("--param", action="append", default=[], metavar="KEY=SPACE",
                   help="a searched key: LOW..HIGH, LOW..HIGH:log (int range when both are ints) or a,b,c; "
                        "repeat for several (default: a space per method, see the README)")
    p.add_argument("--sweep-dir", metavar="DIR", help="trial runs, study.db and leaderboard (default sweeps/RUN_NAME)")
    p.add_argument("--storage", metavar="URL",
                   help="an Optuna database URL shared by several workers (default sqlite:///SWEEP_DIR/study.db)")
    p.add_argument("--study-name", metavar="NAME", help="the study in the storage (default: the config's run_name)")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="trials at a time (default: one per visible GPU, each on its own GPU; 1 on CPU)")
    p.add_argument("--metric", default="auto", choices=["auto", *METRICS],
                   help="what trials are ranked and pruned by, and select their final/ weights by (train.best_metric "
                        "in every trial); auto: the config's train.best_metric, and when that is auto too, what the "
                        "first trial resolves it to (default auto)")
    p.set_defaults(func=run_sweep_command)


def run_sweep_command(args: argparse.Namespace) -> int:
    """Plan (exit 2 on bad input before any trial), run, and say where the best run and config are."""
    from instructkit.sweep import run_sweep
    from instructkit.sweep_board import best_text, cell
    from instructkit.sweep_study import plan_sweep

    plan = plan_sweep(args.config, args.overrides, args.trials, args.param, args.sweep_dir, args.storage,
                      args.study_name, args.jobs, args.metric)
    best = run_sweep(plan)
    if best is None:
        print(f"no trial completed: see the notes in {plan.sweep_dir / 'leaderboard.md'}", file=sys.stderr)
        return EXIT_FAIL
    shown = ", ".join(f"{k}={cell(v)}" for k, v in best["params"].items())
    print(f"best: trial {best['trial']}, {best_text(best)} ({shown})\n"
          f"best config: {plan.sweep_dir / 'best.yaml'}\nleaderboard: {plan.sweep_dir / 'leaderboard.md'}\n"
          f"best run directory: {best['run_dir']}")
    return EXIT_OK
