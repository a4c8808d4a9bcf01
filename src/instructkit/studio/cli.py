"""`instructkit studio` on the command line: its flags, the token rule, and the start.

Nothing heavy is imported at module level, so `instructkit --help` still answers at once.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
from pathlib import Path

from instructkit.errors import UserError

TOKEN_ENV = "INSTRUCTKIT_STUDIO_TOKEN"


def add_studio_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("studio", help="local web app: new runs, live curves, compare, chat, evaluate, export")
    p.add_argument("--runs", default="runs", metavar="DIR", help="the directory of run directories (default runs)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; any other needs the token)")
    p.add_argument("--port", type=int, default=7860, help="default 7860")
    p.set_defaults(func=run_studio)


def _token(host: str) -> str | None:
    """None on loopback; else INSTRUCTKIT_STUDIO_TOKEN, or a random one (printed in the URL)."""
    from instructkit.studio.security import is_loopback

    if is_loopback(host):
        return None
    token = os.environ.get(TOKEN_ENV)
    if token is not None and not token.strip():
        raise UserError(f"{TOKEN_ENV} is set but empty, and --host {host} needs a token. Fix: set a long random "
                        f"value, or unset it for a random token")
    return token.strip() if token else secrets.token_urlsafe(24)


def _check_port(host: str, port: int) -> None:
    """Refuse at once (exit 2) when the port is taken, instead of a traceback from uvicorn."""
    if not 0 < port < 65536:
        raise UserError(f"--port {port} is not a TCP port. Fix: give 1..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}). Fix: choose another --port, "
                            f"or stop what uses it") from None


def run_studio(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise UserError("instructkit studio needs FastAPI and uvicorn, which are not installed. "
                        "Fix: pip install fastapi uvicorn (or reinstall instructkit, which depends on them)")
    runs = Path(args.runs)
    if runs.exists() and not runs.is_dir():
        raise UserError(f"--runs {runs} is not a directory. Fix: give the directory your runs are in")
    runs.mkdir(parents=True, exist_ok=True)
    _check_port(args.host, args.port)
    token = _token(args.host)

    from instructkit.studio.security import Gate
    from instructkit.studio.server import Studio, run_server

    studio = Studio(runs=args.runs.rstrip("/") or ".", gate=Gate(args.host, args.port, token))
    print(f"instructkit studio: runs in {runs.resolve()}; open {studio.gate.url()}", flush=True)
    if token:
        print("anyone with this URL (its token) can start, stop and delete runs here", file=sys.stderr)
    print("Ctrl-C stops the studio; runs it started go on", flush=True)
    run_server(studio, args.host, args.port)
    return 0
