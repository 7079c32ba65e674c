#!/usr/bin/env bash
# The demo (`make demo`): the whole pipeline on the embedded Shakespeare corpus and the demo task,
# on a laptop CPU — recipes/configs/pipeline-tiny-cpu.yaml run by recipes/pipeline.py:
#   tokenizer -> shards -> pretrain (+ held-out loss/bpb, HF export) -> a sample
#   -> demo task -> SFT data -> SFT -> preference pairs -> reward model -> DPO -> GRPO -> a chat.
# It prints a line per stage with its ETA, each stage's own output (also in runs/demo/logs/), and
# at the end one table: each stage's metric, wall time, checkpoint, HF export and W&B run (also
# runs/demo/summary.json and summary.md, with the curves under runs/demo/STAGE/plots/).
# Re-running skips the finished stages; Ctrl-C stops inside a stage after a checkpoint and the same
# command resumes there. Extra arguments go to the runner: `make demo ARGS="--force sft"`, `--dry_run`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# W&B offline unless the user configured it (the recipes decide); the Hub is never contacted.
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" -m recipes.pipeline --config recipes/configs/pipeline-tiny-cpu.yaml "$@"
