"""The studio's FastAPI app: the gate (token, Host and Origin rules), error pages, static files and routes.

Server-rendered pages (Jinja2) with a little JavaScript that polls JSON endpoints: polling rather than
server-sent events, because a poll holds no connection open (uvicorn stops at once, a page left open
in a background tab costs nothing between polls) and a second of delay does not matter for training curves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from instructkit.studio.security import COOKIE, Gate, StudioError

HERE = Path(__file__).parent


@dataclass
class Studio:
    """What every route needs: where runs live (as the user wrote it, for YAML, and on disk) and the gate."""

    runs: str
    gate: Gate
    configs: Path = field(default_factory=lambda: Path("configs"))

    @property
    def root(self) -> Path:
        return Path(self.runs)

    def seeds(self) -> list[str]:
        """Shipped configs to start from: configs/*.yaml of the directory the studio runs in."""
        return sorted(p.as_posix() for p in self.configs.glob("*.yaml")) if self.configs.is_dir() else []


def _error_response(request, status: int, message: str):
    from fastapi.responses import HTMLResponse, JSONResponse

    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    from instructkit.studio.pages import render

    return HTMLResponse(render("error.html", status=status, message=message), status_code=status)


def _gate_middleware(studio: Studio):
    async def gate(request, call_next):
        from fastapi.responses import RedirectResponse

        query_token = request.query_params.get("token")
        refused = studio.gate.check(request.method, {k.lower(): v for k, v in request.headers.items()},
                                    request.cookies, query_token)
        if refused:
            return _error_response(request, 403, refused)
        if request.method == "POST" and request.headers.get("content-type", "").split(";")[0] != "application/json":
            # A cross-site HTML form can post only form encodings; JSON needs the studio's own script.
            return _error_response(request, 415, "requests that change something must send JSON")
        if query_token and studio.gate.token_ok(query_token):  # into a cookie, out of the address bar
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            # One leading slash: "//host/x" would be a redirect to another site.
            target = "/" + request.url.path.lstrip("/") + (f"?{urlencode(rest)}" if rest else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(COOKIE, query_token, httponly=True, samesite="strict")
            return response
        return await call_next(request)

    return gate


def create_app(studio: Studio):
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles

    from instructkit.errors import UserError
    from instructkit.studio import endpoints, pages

    app = FastAPI(title="instructkit studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.studio = studio
    app.middleware("http")(_gate_middleware(studio))

    @app.exception_handler(StudioError)
    async def studio_error(request, exc: StudioError):
        return _error_response(request, exc.status, str(exc))

    @app.exception_handler(UserError)
    async def user_error(request, exc: UserError):
        return _error_response(request, 400, str(exc))

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(pages.router)
    app.include_router(endpoints.router)
    return app


def run_server(studio: Studio, host: str, port: int) -> None:
    """Serve until Ctrl-C or SIGTERM; runs it started go on (they are in their own sessions)."""
    import uvicorn

    uvicorn.run(create_app(studio), host=host, port=port, log_level="warning")
