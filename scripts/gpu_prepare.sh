#!/usr/bin/env bash
# Build .gpu/ for scripts/gpu_check.sh: wheels of what the GPU machine's image lacks (its python3 is
# 3.12; versions as in our .venv) and a copy of the demo's data and SFT export. Run after `make demo`:
#
#   bash scripts/gpu_prepare.sh          # then carry .gpu (git-ignored, ~25 MiB) to the GPU machine
#
# DeepSpeed ships no wheel on PyPI: one is built here without compiled ops (DS_BUILD_OPS=0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl .gpu/data/task .gpu/data/sft
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
for pkg in jsonargparse docstring_parser typeshed_client hjson pydantic pydantic_core annotated_types \
           typing_inspection typing_extensions datasets dill multiprocess fsspec; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl "$pkg==$(version "$pkg")"
done
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$(version deepspeed)" -w .gpu/whl
cp -r runs/demo/tokenizer.json runs/demo/shards runs/demo/sft_data runs/demo/pairs .gpu/data/
cp runs/demo/task/val.jsonl runs/demo/task/dev.jsonl runs/demo/task/post.jsonl .gpu/data/task/
cp -r runs/demo/sft/hf .gpu/data/sft/
ls .gpu/whl && du -sh .gpu
