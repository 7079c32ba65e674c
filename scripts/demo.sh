#!/usr/bin/env bash
# The demo (`make demo`): the embedded Shakespeare corpus -> byte-level BPE tokenizer ->
# train/val token shards -> tiny-cpu pretraining -> a sample from the checkpoint.
# A few minutes on 2 CPU cores. Re-running skips what is finished: the tokenizer is kept, the
# sharding job skips its finished tasks, and pretraining resumes from last.ckpt (returning at
# once when it already reached max_steps). Everything lands under runs/demo/: the tokenizer and
# shards, and the run directory runs/demo/pretrain/ (group "demo" in recipes/configs/tiny-cpu.yaml:
# checkpoints/, csv/, wandb/, config.yaml). Its log is plain progress lines when piped to a file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=runs/demo
# W&B offline unless the user configured it (the recipe decides); the Hub is never contacted.
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

step() { printf '\n== %s\n' "$*"; }

step "1/4 tokenizer: byte-level BPE, vocab 4096, trained on data/shakespeare.jsonl.gz"
if [ -f "$RUN/tokenizer.json" ]; then
  echo "kept $RUN/tokenizer.json"
else
  "$PY" -m data_prep.train_tokenizer --source data/shakespeare.jsonl.gz --vocab_size 4096 \
    --out "$RUN/tokenizer.json"
fi

step "2/4 shards: tokenize with 2 processes, hold out 10% of the documents for validation"
"$PY" -m data_prep.make_shards --source data/shakespeare.jsonl.gz --tokenizer "$RUN/tokenizer.json" \
  --out "$RUN/shards" --num_proc 2 --val_fraction 0.1

step "3/4 pretrain: recipes/configs/tiny-cpu.yaml into $RUN/pretrain (resumes its last.ckpt if present)"
"$PY" -m recipes.pretrain --config recipes/configs/tiny-cpu.yaml --ckpt_path last

step "4/4 sample from the checkpoint"
"$PY" -m gpt sample --checkpoint "$RUN/pretrain/checkpoints/last.ckpt" \
  --prompt "ROMEO:" --max_new_tokens 200 --temperature 0.8 --top_k 50 --seed 0
