"""examples/quickstart.ipynb runs top to bottom through the Python API (nbclient, CPU, SmolLM2,
2 training steps and 4 eval rows)."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.slow


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("QUICKSTART_MAX_STEPS", "2")
    monkeypatch.setenv("QUICKSTART_EVAL_ROWS", "4")
    monkeypatch.setenv("QUICKSTART_OUTPUT_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(ROOT / "examples/quickstart.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "examples")}}).execute()
    outputs = ["".join(o.get("text", "") for o in cell.get("outputs", [])) for cell in notebook.cells
               if cell.cell_type == "code"]
    assert "torch" in outputs[1]                      # the environment check
    assert "instruction" in outputs[2]                # raw rows
    assert "final" in outputs[4]                      # the run directory after training
    assert outputs[5].strip()                         # a generation
    assert "exact match" in outputs[6].lower()        # tuned vs base
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    assert os.environ["QUICKSTART_MAX_STEPS"] == "2"
