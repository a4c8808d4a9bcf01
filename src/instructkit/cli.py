"""The `instructkit` command: parse, dispatch to the library, map outcomes to exit codes.

Exit codes: 0 success, 2 bad input (one paragraph, no traceback unless --debug), 1 internal
failure, 130 interrupted. Heavy imports happen inside the commands so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback

from instructkit.errors import TrainingInterrupted, UserError
from instructkit.serve_cli import add_serve_parser
from instructkit.studio.cli import add_studio_parser
from instructkit.sweep_cli import add_sweep_parser

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130



def _cmd_train(args) -> int:
    from instructkit.config import load_config
    from instructkit.train import train

    cfg = load_config(args.config, args.overrides)
    if args.nproc:
        return _launch_train(args, cfg)
    run_dir = train(cfg, overwrite=args.overwrite, allow_config_change=args.allow_config_change)
    if int(os.environ.get("RANK", "0")) != 0:  # one process of several: rank 0 reports
        return EXIT_OK
    if cfg.eval.generate:
        from instructkit.evaluate import evaluate_run, format_results

        # the run's own config.yaml: what every `auto` resolved to (the held-out split above all)
        print(format_results(evaluate_run(run_dir, load_config(run_dir / "config.yaml"))))
    print(f"run directory: {run_dir}")
    return EXIT_OK


def _launch_train(args, cfg) -> int:
    """`train --nproc N`: check what can be checked here (exit 2 at once), then run torchrun."""
    from instructkit.distributed import launch_job

    passthrough = [*args.overrides, *(["--overwrite"] if args.overwrite else []),
                   *(["--allow-config-change"] if args.allow_config_change else [])]
    return launch_job(cfg, args.config, ["--debug"] if args.debug else [], passthrough, args.nproc, args.nnodes,
                      args.node_rank, args.master_addr, args.master_port)


def _cmd_validate(args) -> int:
    import torch

    from instructkit.config import load_config
    from instructkit.data.pipeline import check_rows
    from instructkit.data.templates import resolve_template
    from instructkit.distributed import check_distributed
    from instructkit.models import check_runtime, load_config_tokenizer, locate_model
    from instructkit.prepare import template_note
    from instructkit.rundir import plan_run_dir

    cfg = load_config(args.config, args.overrides)
    check_runtime(cfg.model)
    check_distributed(cfg, torch.cuda.is_available())
    where = locate_model(cfg.model.name_or_path, cfg.model.allow_pickle)
    summary = check_rows(cfg.data, cfg.seed, cfg.objective)
    # The template is checked with the model's tokenizer, so a broken user template fails here too.
    tokenizer = load_config_tokenizer(cfg.model)[1]
    template = resolve_template(cfg.data.template, tokenizer)
    print(f"config OK: {args.config}")
    print(f"  model: {where}; method {cfg.method}; objective {cfg.objective}")
    print(f"  data: {summary}; template {template.name}")
    if note := template_note(cfg, template.name, bool(tokenizer.chat_template)):
        print(f"  {note}")
    try:
        plan = plan_run_dir(cfg, overwrite=False)
        what = {"new": "a new run", "restart": "starts over (no complete checkpoint)",
                "resume": f"resumes from {plan.checkpoint}"}[plan.action]
        print(f"  output_dir: {cfg.output_dir}: train {what}")
    except UserError as exc:
        print(f"  note: train would refuse: {exc}")
    return EXIT_OK


def _cmd_data_inspect(args) -> int:
    from instructkit.config import load_config
    from instructkit.data.inspect import format_inspection, inspect_data
    from instructkit.models import load_config_tokenizer

    cfg = load_config(args.config, args.overrides)
    _, tokenizer = load_config_tokenizer(cfg.model)
    report = inspect_data(cfg.data, tokenizer, cfg.seed, n=args.n)
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print(json.dumps(report, indent=1, ensure_ascii=False) if args.json else format_inspection(report, color))
    return EXIT_OK


def _cmd_data_prepare(args) -> int:
    from instructkit.config import load_config
    from instructkit.data.pipeline import build_datasets, describe_data
    from instructkit.models import load_config_tokenizer

    cfg = load_config(args.config, args.overrides)
    if not cfg.data.cache:
        raise UserError("data prepare fills the tokenized-data cache, and data.cache is false. "
                        "Fix: set data.cache: true (the default)")
    _, tokenizer = load_config_tokenizer(cfg.model)
    data = build_datasets(cfg.data, tokenizer, cfg.seed, progress=True)
    print(describe_data(data, cfg.data.max_length))
    print("train reads this cache at start, so no process waits on tokenizing")
    return EXIT_OK


def _cmd_estimate(args) -> int:
    from instructkit.config import load_config
    from instructkit.estimate import report

    print(report(load_config(args.config, args.overrides), args.gpus, args.gpu_memory, args.json))
    return EXIT_OK


def _sampling(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}


def _cmd_generate(args) -> int:
    from instructkit.generate import generate, generate_file, load_for_inference, messages_from_cli

    if (args.prompt is None) == (args.file is None):
        raise UserError("give either --prompt TEXT or --file PROMPTS.jsonl (with --output OUT.jsonl).")
    if args.file and not args.output:
        raise UserError("--file needs --output OUT.jsonl for the results.")
    loaded = load_for_inference(args.run_or_model, allow_pickle=args.allow_pickle)
    if args.file:
        n = generate_file(loaded, args.file, args.output, batch_size=args.batch_size, **_sampling(args))
        print(f"wrote {n} rows to {args.output}")
    else:
        print(generate(loaded, [messages_from_cli(args.prompt, args.input, args.system)], **_sampling(args))[0])
    return EXIT_OK


def _cmd_chat(args) -> int:
    from instructkit.generate import chat, load_for_inference

    loaded = load_for_inference(args.run_or_model, allow_pickle=args.allow_pickle)
    chat(loaded, input, print, system=args.system, **_sampling(args))
    return EXIT_OK


def _cmd_eval(args) -> int:
    from instructkit.evaluate import evaluate, format_results

    results = evaluate(args.run_or_model, args.data, baseline=args.baseline, out_dir=args.out,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       allow_pickle=args.allow_pickle)
    print(format_results(results))
    rows = "pairs.jsonl" if results.get("kind") == "preference" else "predictions.jsonl"
    print(f"wrote {results['out_dir']}/eval.json and {rows}")
    return EXIT_OK


def _cmd_report(args) -> int:
    from instructkit.report import build_report

    page, twin = build_report(args.run)
    print(f"report: {page}\nmarkdown: {twin}")
    return EXIT_OK


def _cmd_merge(args) -> int:
    from instructkit.export import merge_lora

    out = merge_lora(args.run, args.out, args.dtype, args.overwrite, args.max_shard_size, args.allow_pickle)
    print(f"merged model: {out} ({args.dtype or 'in the base model precision'}); load it with transformers, or: "
          f"instructkit export-gguf {out} --out model.gguf")
    return EXIT_OK


def _cmd_export_gguf(args) -> int:
    from instructkit.export import export_gguf

    out = export_gguf(args.model_or_run, args.out, args.dtype, args.overwrite, args.allow_pickle)
    print(f"GGUF file: {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.dtype}); e.g. llama-cli -m {out} -cnv")
    return EXIT_OK


def _cmd_env(args) -> int:
    from instructkit.env import collect, format_table, gpu_problem

    info = collect(args.output_dir)
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    problem = gpu_problem(info) if args.require_gpu else None
    if problem:
        print(f"no usable GPU: {problem}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def _add_allow_pickle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow .bin/.pt weights (unpickling can run code); default safetensors only")


def _add_sampling(parser: argparse.ArgumentParser, max_new: int = 256) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new, help=f"default {max_new}")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when temperature > 0")


def _config_command(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    """A subcommand that reads a run config: CONFIG and its key.path=value overrides."""
    p = sub.add_parser(name, help=help)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.path=value, e.g. train.learning_rate=1e-4")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructkit", description="Instruction tuning of causal language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_training_parsers(sub)
    _add_inference_parsers(sub)
    _add_export_parsers(sub)
    add_serve_parser(sub)
    add_sweep_parser(sub)
    add_studio_parser(sub)
    p = sub.add_parser("env", help="report Python, torch, CUDA, GPUs and CPU")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--require-gpu", action="store_true", help="exit 1 unless a GPU is usable")
    p.add_argument("--output-dir", default="runs", help="where free disk space is measured")
    p.set_defaults(func=_cmd_env)
    return parser


def _add_training_parsers(sub: argparse._SubParsersAction) -> None:
    """train, validate, data inspect/prepare, estimate: the commands that read a run config."""
    p = _config_command(sub, "train", "train a run from a YAML config", _cmd_train)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though result-changing config keys differ from the checkpoint's run")
    p.add_argument("--nproc", type=int, default=0, metavar="N",
                   help="launch N processes on this node through torchrun (one per GPU; gloo on CPUs)")
    p.add_argument("--nnodes", type=int, default=1, metavar="M", help="with --nproc: machines in the job")
    p.add_argument("--node-rank", type=int, default=0, metavar="R", help="with --nproc: this machine's index, 0..M-1")
    p.add_argument("--master-addr", default="127.0.0.1", metavar="A",
                   help="with --nproc: address of the node with --node-rank 0, reachable from every node")
    p.add_argument("--master-port", type=int, default=29500, metavar="P", help="with --nproc: a free TCP port there")

    _config_command(sub, "validate", "check a config, its data files and its model without training", _cmd_validate)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = _config_command(data_sub, "inspect", "show rendered examples with the supervised tokens marked, and "
                        "statistics", _cmd_data_inspect)
    p.add_argument("--n", type=int, default=3, help="examples to show (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON, with each shown example's input_ids and labels")
    _config_command(data_sub, "prepare", "tokenize the data into the cache ahead of a (multi-node) training launch",
                    _cmd_data_prepare)

    p = _config_command(sub, "estimate", "expected peak memory per device for full/LoRA/QLoRA x DDP/FSDP/ZeRO, "
                        "and what fits", _cmd_estimate)
    p.add_argument("--gpus", type=int, default=0, metavar="N", help="GPUs to plan for (default: those visible)")
    p.add_argument("--gpu-memory", metavar="SIZE", help="memory per GPU, e.g. 80GB (default: the visible GPU's)")
    p.add_argument("--json", action="store_true", help="print the table as JSON, bytes per part")


def _add_inference_parsers(sub: argparse._SubParsersAction) -> None:
    """generate, chat, eval, report: the commands that use a trained run or a model."""
    p = sub.add_parser("generate", help="generate from a run or model with its training template")
    p.add_argument("run_or_model")
    p.add_argument("--prompt", help="the instruction")
    p.add_argument("--input", help="optional context for the instruction (Alpaca 'input')")
    p.add_argument("--system", help="optional system prompt")
    p.add_argument("--file", help="JSONL of prompts (instruction/input or prompt)")
    p.add_argument("--output", help="JSONL to write: each input row plus 'output'")
    p.add_argument("--batch-size", type=int, default=8)
    _add_sampling(p)
    _add_allow_pickle(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat with a run or model")
    p.add_argument("run_or_model")
    p.add_argument("--system", help="optional system prompt")
    _add_sampling(p)
    _add_allow_pickle(p)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("eval", help="loss, perplexity, exact match and ROUGE-L, optionally against the base model")
    p.add_argument("run_or_model")
    p.add_argument("--data", required=True, help="rows with references (e.g. Alpaca with 'output')")
    p.add_argument("--baseline", action="store_true", help="also evaluate the base model before tuning")
    p.add_argument("--out", help="output directory (default RUN/eval)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    _add_allow_pickle(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("report", help="HTML and Markdown report of a run (curves, before/after, samples) or of a sweep")
    p.add_argument("run")
    p.set_defaults(func=_cmd_report)


def _add_export_parsers(sub: argparse._SubParsersAction) -> None:
    """merge and export-gguf: the tuned model as files other tools load."""
    p = sub.add_parser("merge", help="merge a run's LoRA adapter into its base: a standalone model directory")
    p.add_argument("run")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="precision of the merged weights (default: the base model's own)")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shards above this size (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_allow_pickle(p)
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("export-gguf", help="write a GGUF file (llama.cpp, Ollama) with tokenizer and chat template")
    p.add_argument("model_or_run")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--dtype", choices=["f16", "q8_0"], default="f16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_allow_pickle(p)
    p.set_defaults(func=_cmd_export_gguf)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """argparse, except that `key=value` overrides may also come after flags (`train c.yaml --overwrite a=1`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    return args


def _stopping(as_process: bool) -> None:
    """The process is already stopping on a signal: one more Ctrl-C while it exits (interpreter
    shutdown included) must not turn exit code 130 into death by SIGINT. Only when main() is the
    process entry point (argv None): a caller in the same process keeps its own handlers."""
    if as_process and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    code = _run(args, argv)
    if os.environ.get("INSTRUCTKIT_EXIT_DIR"):  # a worker of `train --nproc`: tell the launcher how it ended
        from instructkit.distributed import record_exit

        record_exit(code)
    return code


def _run(args, argv: list[str] | None) -> int:
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _stopping(argv is None)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingInterrupted as exc:
        _stopping(argv is None)
        if exc.checkpoint is not None:  # with several processes, rank 0 wrote it and says so
            print(str(exc), file=sys.stderr)
        return EXIT_INTERRUPTED if exc.signum == signal.SIGINT else 128 + exc.signum
    except Exception as exc:  # noqa: BLE001 - the one place internal failures become exit code 1
        if args.debug:
            traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAIL

