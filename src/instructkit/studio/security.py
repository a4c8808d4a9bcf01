"""Who may talk to the studio, and which paths a request may name.

Like Jupyter: on 127.0.0.1 (the default) no token is needed; on any other address every request needs
the token, given once as `?token=...` (it is then kept in an HttpOnly cookie) or as `Authorization:
Bearer ...`. Requests that name a run give its name relative to `--runs`; the name is checked part by
part and its resolved path must stay inside the resolved runs directory, so neither `..` nor a symlink
leads out of it.
"""

from __future__ import annotations

import hmac
import re
from pathlib import Path
from urllib.parse import urlencode, urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1")
COOKIE = "instructkit_studio_token"
# One path component of a run name: what `run_name` may be, so it is also a safe directory name.
NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_DEPTH = 3  # runs/NAME, sweeps/STUDY/trial-000: deeper names are refused before touching the disk


class StudioError(Exception):
    """A request the studio refuses: HTTP status and a message that says what, where and the fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    return host.strip("[]") in LOOPBACK


def check_name(name: str) -> str:
    """A run name from a request: relative parts of letters, digits, `._-`, no `..`."""
    parts = name.split("/") if name else []
    if not parts or len(parts) > MAX_DEPTH or not all(NAME_PART.fullmatch(p) and p not in (".", "..")
                                                       for p in parts):
        raise StudioError(400, f"'{name}' is not a run name. Fix: use the name shown in the runs list "
                               "(letters, digits, '.', '_', '-', at most 3 folder levels, no '..').")
    return name


def resolve_run(root: Path, name: str) -> Path:
    """The directory of run `name` under `root`, or StudioError (400 bad name, 404 outside or absent)."""
    check_name(name)
    base = root.resolve()
    path = (root / name).resolve()
    if path == base or not path.is_relative_to(base):  # `..` was refused above: this is a symlink leading out
        raise StudioError(404, f"run '{name}' is outside the runs directory {root} (a symlink leads out of it); "
                               "the studio only opens runs inside --runs. Fix: move or copy the run into it.")
    return path


class Gate:
    """The token rule and the same-origin rule for one server."""

    def __init__(self, host: str, port: int, token: str | None):
        self.host, self.port, self.token = host, port, token

    def url(self, path: str = "/") -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        query = f"?{urlencode({'token': self.token})}" if self.token else ""
        return f"http://{shown}:{self.port}{path}{query}"

    def token_ok(self, given: str | None) -> bool:
        return bool(self.token) and given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def check(self, method: str, headers: dict, cookies: dict, query_token: str | None) -> str | None:
        """None when the request may go on, else why it is refused (403). A loopback server answers only to
        loopback Host names (a DNS-rebinding page cannot reach it); a state-changing request must come from
        the studio's own pages (its Origin, when sent, is this server)."""
        host_header = headers.get("host", "")
        if self.token is None and not is_loopback(urlsplit(f"//{host_header}").hostname or ""):
            return f"Host '{host_header}' is not this machine; the studio on {self.host} answers only to 127.0.0.1"
        origin = headers.get("origin")
        if method not in ("GET", "HEAD") and origin and urlsplit(origin).netloc != host_header:
            return f"a request from {origin} to change something was refused: only the studio's own pages may"
        if self.token is None:
            return None
        bearer = headers.get("authorization", "")
        # Any one valid credential admits: the address's token first, so the URL a restarted studio prints
        # works even while the browser still holds the previous studio's cookie.
        given = [bearer[7:]] if bearer.lower().startswith("bearer ") else [query_token, cookies.get(COOKIE)]
        if any(self.token_ok(token) for token in given):
            return None
        return ("this studio needs its token: open the URL that `instructkit studio` printed (it ends in "
                "?token=...), or send 'Authorization: Bearer TOKEN'")
