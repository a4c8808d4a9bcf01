"""JSON endpoints the pages call: form checks, data preview, start/stop/resume/delete, metrics, chat, jobs.

Every run a request names goes through resolve_run (inside --runs); every process started is an
`instructkit` subcommand (children.command).
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import yaml
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from instructkit.files import write_text
from instructkit.rundir import RunDirPlan, claim_run_dir, write_config
from instructkit.studio import chat, children, form, runs
from instructkit.studio.security import StudioError, resolve_run

router = APIRouter(prefix="/api")


async def _body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise StudioError(400, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise StudioError(400, "the request body must be a JSON object")
    return body


def _field(body: dict, key: str, kind: type = str):
    value = body.get(key)
    if not isinstance(value, kind):
        raise StudioError(400, f"'{key}' is missing or not a {kind.__name__}")
    return value


def _number(body: dict, key: str, default: int) -> int:
    """An optional whole number of the request (a count, a token budget); 400 when it is something else."""
    value = body.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise StudioError(400, f"'{key}' must be a whole number, not {value!r}") from None


def _run_dir(request: Request, name: str) -> Path:
    """runs/NAME as the user wrote --runs (so commands and paths read as in a terminal), once its resolved
    path is known to be inside it."""
    root = request.app.state.studio.root
    if not runs.is_run(resolve_run(root, name)):
        raise StudioError(404, f"there is no run '{name}' in {request.app.state.studio.runs}")
    return root / name


def _checked(request: Request, body: dict) -> form.Checked:
    values = _field(body, "values", dict)
    studio = request.app.state.studio
    return form.check({k: str(v) for k, v in values.items()}, studio.runs, studio.root)


@router.get("/runs")
def list_runs(request: Request) -> list[dict]:
    root = request.app.state.studio.root
    return [runs.summary(root, name) for name in runs.list_runs(root)]


@router.post("/form/check")
async def check_form(request: Request) -> dict:
    checked = _checked(request, await _body(request))
    return {"errors": checked.errors, "yaml": checked.yaml}


@router.post("/form/parse")
async def parse_yaml(request: Request) -> dict:
    """YAML text (a config file's content) -> form values: the other half of the YAML round trip."""
    text = _field(await _body(request), "yaml")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise StudioError(400, f"not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise StudioError(400, "a config is a mapping of keys to values")
    return {"values": form.values_from_config(raw)}


def _require_valid(checked: form.Checked) -> None:
    if checked.errors:
        first = next(iter(checked.errors.items()))
        raise StudioError(400, f"the config has problems ({first[0] or 'config'}: {first[1][0]['message']}). "
                               "Fix: correct the fields marked in red")


@router.post("/form/validate")
async def validate(request: Request) -> dict:
    """`instructkit validate` on the form's YAML (data rows, model, template, this machine), in a child."""
    checked = _checked(request, await _body(request))
    with tempfile.TemporaryDirectory(prefix="instructkit-studio-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(checked.yaml)
        argv = children.command("validate", str(path))
        done = await run_in_threadpool(subprocess.run, argv, capture_output=True, text=True, timeout=600,
                                       env=children.child_env(), stdin=subprocess.DEVNULL)
    output = (done.stdout + done.stderr).replace(str(path), "config.yaml").strip()
    return {"returncode": done.returncode, "output": output, "command": "instructkit validate config.yaml"}


@router.post("/data/preview")
async def data_preview(request: Request) -> dict:
    from instructkit.config import RunConfig
    from instructkit.studio.preview import safe_preview

    body = await _body(request)
    checked = _checked(request, body)
    if any(k.startswith(("model.", "data.")) or k in ("", "seed") for k in checked.errors):
        _require_valid(checked)
    cfg = RunConfig.model_validate({**checked.config, "run_name": "preview", "output_dir": None})
    n = max(1, min(_number(body, "n", 3), 20))
    return await run_in_threadpool(safe_preview, cfg, n)


@router.post("/runs/start")
async def start(request: Request) -> dict:
    """Claim runs/NAME, write its config.yaml, and run `instructkit train RUN/config.yaml` on it.

    config.yaml holds the validated config in full (train compares a run directory's config.yaml with the
    config it is given, key by key); the form's YAML, the same config with defaults left out, is kept
    beside it as RUN/studio/config.yaml."""
    from instructkit.config import RunConfig

    checked = _checked(request, await _body(request))
    _require_valid(checked)
    name = checked.config["run_name"]
    resolve_run(request.app.state.studio.root, name)
    run_dir = request.app.state.studio.root / name
    cfg = RunConfig.model_validate(checked.config)
    claim_run_dir(RunDirPlan(run_dir, "new"))  # form.check refused a folder that holds anything
    write_config(run_dir, cfg)
    write_text(run_dir / "studio" / "config.yaml", checked.yaml)
    runs.start_training(run_dir)
    return {"name": name, "url": f"/run?name={name}"}


@router.get("/run")
def run_state(request: Request, name: str, have: int = 0, last_step: int | None = None) -> dict:
    run_dir = _run_dir(request, name)
    return {"run": runs.summary(request.app.state.studio.root, name),
            "metrics": runs.metrics_since(run_dir, max(have, 0), last_step), "log": runs.log_tail(run_dir)}


@router.post("/run/stop")
async def stop(request: Request) -> dict:
    name = _field(await _body(request), "name")
    runs.stop(_run_dir(request, name), name)
    return {"ok": True, "message": "stopping: the run finishes its step, writes a checkpoint and exits (130)"}


@router.post("/run/resume")
async def resume(request: Request) -> dict:
    name = _field(await _body(request), "name")
    runs.resume(_run_dir(request, name), name)
    return {"ok": True}


@router.post("/run/delete")
async def delete(request: Request) -> dict:
    body = await _body(request)
    name = _field(body, "name")
    if body.get("confirm") != name:
        raise StudioError(400, f"deleting '{name}' needs confirmation: send confirm equal to the run's name")
    left = runs.delete(_run_dir(request, name), name)
    return {"ok": True, "left": left}


@router.post("/chat")
async def chat_turn(request: Request) -> dict:
    body = await _body(request)
    name = _field(body, "name")
    run_dir = _run_dir(request, name)
    turns = body.get("turns") or []
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("user"), str) for t in turns):
        raise StudioError(400, "'turns' must be a list of {user, tuned, base}")
    return await run_in_threadpool(chat.answer, run_dir, name, _field(body, "prompt"), str(body.get("system") or ""),
                                   turns, bool(body.get("base", True)), _number(body, "max_new_tokens", 128))


def _job_steps(run_dir: Path, kind: str, body: dict) -> tuple[list[tuple[str, list[str]]], str | None]:
    run = str(run_dir)
    if kind == "eval":
        data = _field(body, "data").strip()
        if not Path(data).is_file():
            raise StudioError(400, f"--data {data}: no such file (paths are relative to {Path.cwd()}). "
                                   "Fix: give a JSONL file with references, e.g. examples/data/test.jsonl")
        return [("evaluate against the base model", children.command("eval", run, "--data", data, "--baseline")),
                ("write the report", children.command("report", run))], str(run_dir / "report" / "report.html")
    if kind == "merge":
        dtype = body.get("dtype") or None
        if dtype not in (None, "fp16", "bf16", "fp32"):
            raise StudioError(400, f"dtype {dtype!r}: choose fp16, bf16 or fp32 (or none for the base's own)")
        out = run_dir / "export" / "merged"
        return [("merge the adapter into the base", children.command(
            "merge", run, "--out", str(out), "--overwrite", *(["--dtype", dtype] if dtype else [])))], str(out)
    if kind == "gguf":
        dtype = body.get("dtype") or "f16"
        if dtype not in ("f16", "q8_0"):
            raise StudioError(400, f"dtype {dtype!r}: choose f16 or q8_0")
        out = run_dir / "export" / f"{run_dir.name}-{dtype}.gguf"
        return [("write the GGUF file", children.command("export-gguf", run, "--out", str(out), "--dtype", dtype,
                                                         "--overwrite"))], str(out)
    raise StudioError(404, f"no job '{kind}': eval, merge or gguf")


@router.post("/jobs/{kind}")
async def start_job(request: Request, kind: str) -> dict:
    body = await _body(request)
    name = _field(body, "name")
    run_dir = _run_dir(request, name)
    if not (run_dir / "final").is_dir():
        raise StudioError(409, f"run '{name}' has no final/ model yet. Fix: let it finish, or resume it")
    steps, result = _job_steps(run_dir, kind, body)
    children.start_job(run_dir, kind, steps, result)
    return _job_view(run_dir, kind)


def _job_view(run_dir: Path, kind: str) -> dict:
    state = children.read_job(run_dir, kind) or {"kind": kind, "status": "none"}
    result = state.get("result")
    if state.get("status") == "completed" and result and Path(result).exists():
        path = Path(result)
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        state["result_size_mib"] = round(size / 2**20, 2)
    return state


@router.get("/job")
def job_state(request: Request, name: str, kind: str) -> dict:
    if kind not in ("eval", "merge", "gguf"):
        raise StudioError(404, f"no job '{kind}': eval, merge or gguf")
    return _job_view(_run_dir(request, name), kind)
