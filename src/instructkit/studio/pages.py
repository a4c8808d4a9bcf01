"""The HTML pages: runs list, new run, run, compare, chat and evaluate, export, and a run's report."""

from __future__ import annotations

from pathlib import Path

import yaml
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from instructkit.studio import compare, form, runs
from instructkit.studio.security import StudioError, resolve_run

router = APIRouter()
_env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape())


def render(template: str, **context) -> str:
    return _env.get_template(template).render(**context)


def _page(template: str, **context) -> HTMLResponse:
    return HTMLResponse(render(template, **context))


def _studio(request: Request):
    return request.app.state.studio


def _run(request: Request, name: str) -> Path:
    if not runs.is_run(resolve_run(_studio(request).root, name)):
        raise StudioError(404, f"there is no run '{name}' in {_studio(request).runs}. Fix: pick one from the runs list")
    return _studio(request).root / name


@router.get("/")
def index(request: Request):
    studio = _studio(request)
    rows = [runs.summary(studio.root, name) for name in runs.list_runs(studio.root)]
    return _page("index.html", rows=rows, runs=studio.runs)


@router.get("/new")
def new_run(request: Request, seed: str = "", from_run: str = ""):
    studio = _studio(request)
    seeds = studio.seeds()
    if from_run:
        raw = runs.read_config(_run(request, from_run))
        raw["run_name"] = f"{Path(from_run).name}-2"
        seed_label = f"run {from_run}"
    else:
        seed = seed or next((s for s in seeds if s.endswith("/quickstart.yaml")), "")
        if seed and seed not in seeds:
            raise StudioError(400, f"'{seed}' is not one of the shipped configs ({', '.join(seeds) or 'none'})")
        raw = yaml.safe_load(Path(seed).read_text()) if seed else {}
        seed_label = seed or "the defaults"
    values = form.values_from_config(raw)
    return _page("new.html", sections=form.sections(), values=values, seeds=seeds, seed=seed, seed_label=seed_label,
                 run_names=runs.list_runs(studio.root), runs=studio.runs)


@router.get("/run")
def run_page(request: Request, name: str):
    run_dir = _run(request, name)
    manifest = runs.read_manifest(run_dir)
    return _page("run.html", name=name, run=runs.summary(_studio(request).root, name), manifest=manifest,
                 command="instructkit " + " ".join(runs.train_argv(run_dir)[3:]))


@router.get("/run/report")
def report_page(request: Request, name: str):
    path = _run(request, name) / "report" / "report.html"
    if not path.is_file():
        raise StudioError(404, f"run '{name}' has no report yet. Fix: run Evaluate on its chat page (it writes the "
                               f"report), or `instructkit report {_studio(request).runs}/{name}`")
    return FileResponse(path, media_type="text/html")


@router.get("/compare")
def compare_page(request: Request, name: list[str] = Query(default=[])):
    if len(name) < 2:
        raise StudioError(400, "compare needs two or more runs. Fix: tick them in the runs list, then Compare")
    dirs = [_run(request, n) for n in name]
    header, rows = compare.eval_rows(dirs)
    return _page("compare.html", names=name, config_rows=compare.config_rows(dirs), eval_header=header,
                 eval_rows=rows)


@router.get("/chat")
def chat_page(request: Request, name: str):
    run_dir = _run(request, name)
    config = runs.read_config(run_dir)
    data = (config.get("data") or {}).get("eval_file")
    return _page("chat.html", name=name, run=runs.summary(_studio(request).root, name),
                 eval_data=data if isinstance(data, str) else "")


@router.get("/export")
def export_page(request: Request, name: str):
    _run(request, name)
    return _page("export.html", name=name, run=runs.summary(_studio(request).root, name))
