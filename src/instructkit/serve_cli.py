"""`instructkit serve` on the command line: its flags, where the API key comes from, and the start.

Kept apart from cli.py because serve has many flags of its own (the request limits). Nothing heavy is
imported at module level, so `instructkit --help` still answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from instructkit.errors import UserError

EXIT_OK = 0


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """The `serve` subcommand and its flags."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API (chat, completions, streaming)")
    p.add_argument("run_or_model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", help="require 'Authorization: Bearer KEY', KEY read from this file "
                                          "(or set INSTRUCTKIT_API_KEY)")
    p.add_argument("--api-key", help="the key itself (visible in ps: prefer --api-key-file)")
    p.add_argument("--model-name", help="the model id clients ask for (default: the run's directory name)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin weights (unpickled)")
    for name, kind, what in SERVE_LIMIT_FLAGS.values():
        p.add_argument(f"--{name}", type=kind, help=what)
    p.set_defaults(func=run_serve)


# The limits of `serve` (instructkit.serve_types.ServeLimits, not imported here: --help must answer at once).
SERVE_LIMIT_FLAGS = {
    "max_body_bytes": ("max-body-bytes", int, "largest request body (default 1048576)"),
    "max_messages": ("max-messages", int, "most messages in a chat request (default 128)"),
    "max_prompt_chars": ("max-prompt-chars", int, "most characters in a prompt (default 100000)"),
    "max_stop_strings": ("max-stop-strings", int, "most stop strings in a request (default 4)"),
    "max_stop_chars": ("max-stop-chars", int, "longest stop string (default 128)"),
    "max_queue": ("max-queue", int, "requests that may wait for the model; past it 429 (default 64)"),
    "max_batch": ("max-batch", int, "requests generated together in one batch (default 8)"),
    "request_timeout": ("request-timeout", float, "seconds a request may take, waiting included (default 300)"),
    "drain_timeout": ("drain-timeout", float, "seconds running requests may finish after SIGTERM (default 2)"),
}


def run_serve(args: argparse.Namespace) -> int:
    """Load the model and serve it until SIGTERM or Ctrl-C."""
    import importlib.util

    from instructkit.generate import load_for_inference

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise UserError("instructkit serve needs FastAPI and uvicorn, which are not installed. "
                        "Fix: pip install 'instructkit[serve]'")
    from instructkit.serve import serve, served_name
    from instructkit.serve_types import ServeLimits

    api_key = _serve_api_key(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who reaches this port can use the model",
              file=sys.stderr)
    try:
        limits = ServeLimits(**{k: v for k, v in vars(args).items() if k in SERVE_LIMIT_FLAGS and v is not None})
    except ValueError as exc:
        raise UserError(f"{exc}. Fix: give a positive number.") from None
    loaded = load_for_inference(args.run_or_model, precision=args.precision, allow_pickle=args.allow_pickle)
    name = args.model_name or served_name(args.run_or_model)
    print(f"serving {loaded.source} as model '{name}' on http://{args.host}:{args.port}/v1"
          + (" (bearer key required)" if api_key else ""), flush=True)
    serve(loaded, name, args.host, args.port, api_key, limits)
    return EXIT_OK


def _serve_api_key(args: argparse.Namespace) -> str | None:
    """--api-key-file, else INSTRUCTKIT_API_KEY, else --api-key (which every user of `ps` can read)."""
    if args.api_key_file and args.api_key:
        raise UserError("serve: both --api-key-file and --api-key were given. Fix: give only --api-key-file.")
    if args.api_key_file:
        from pathlib import Path

        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UserError(f"--api-key-file {args.api_key_file}: cannot read it ({exc.strerror}). "
                            "Fix: give a readable file that holds the key on one line.") from None
        if not key:
            raise UserError(f"--api-key-file {args.api_key_file} is empty. Fix: write the key into it.")
        return key
    if args.api_key:
        print("warning: --api-key shows the key to anyone who can list processes (ps); "
              "use --api-key-file or INSTRUCTKIT_API_KEY instead", file=sys.stderr)
        return args.api_key
    return os.environ.get("INSTRUCTKIT_API_KEY") or None
