#!/usr/bin/env bash
# The demo (`make demo`): the embedded Shakespeare corpus -> byte-level BPE tokenizer ->
# train/val token shards -> tiny-cpu pretraining -> a sample from the checkpoint; then the
# verifiable demo task -> SFT data -> supervised fine-tuning -> held-out exact-match before and
# after SFT -> a chat through `gpt chat`. About 6 minutes on 2 CPU cores (5 min 47 s measured 2026-11-29). Re-running skips what is finished: the tokenizer is kept, the
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

step "1/8 tokenizer: byte-level BPE, vocab 4096, trained on data/shakespeare.jsonl.gz"
if [ -f "$RUN/tokenizer.json" ]; then
  echo "kept $RUN/tokenizer.json"
else
  "$PY" -m data_prep.train_tokenizer --source data/shakespeare.jsonl.gz --vocab_size 4096 \
    --out "$RUN/tokenizer.json"
fi

step "2/8 shards: tokenize with 2 processes, hold out 10% of the documents for validation"
"$PY" -m data_prep.make_shards --source data/shakespeare.jsonl.gz --tokenizer "$RUN/tokenizer.json" \
  --out "$RUN/shards" --num_proc 2 --val_fraction 0.1

step "3/8 pretrain: recipes/configs/tiny-cpu.yaml into $RUN/pretrain (resumes its last.ckpt if present)"
"$PY" -m recipes.pretrain --config recipes/configs/tiny-cpu.yaml --ckpt_path last

step "4/8 sample from the checkpoint"
"$PY" -m gpt sample --checkpoint "$RUN/pretrain/checkpoints/last.ckpt" \
  --prompt "ROMEO:" --max_new_tokens 200 --temperature 0.8 --top_k 50 --seed 0

# ---- SFT: the demo task, SFT data, fine-tuning, exact-match before and after, a chat ------------
CHAT="$RUN/sft/checkpoints/last.ckpt"

step "5/8 demo task and SFT data: 7 families of instructions with exact answers (held-out phrasings and values)"
if [ -f "$RUN/task/train.jsonl" ] && [ -f "$RUN/task/val.jsonl" ]; then
  echo "kept $RUN/task/train.jsonl and val.jsonl"
else
  "$PY" -m data_prep.make_demo_task --out "$RUN/task" --train 20000 --val 500
fi
"$PY" -m data_prep.make_sft --source "$RUN/task/train.jsonl" --val_source "$RUN/task/val.jsonl" \
  --tokenizer "$RUN/tokenizer.json" --out "$RUN/sft_data" --block_size 256 --num_proc 2 --progress false

step "6/8 SFT: recipes/configs/sft-tiny-cpu.yaml from $RUN/pretrain's weights into $RUN/sft (resumes its last.ckpt if present)"
"$PY" -m recipes.sft --config recipes/configs/sft-tiny-cpu.yaml --ckpt_path last

step "7/8 held-out exact-match (300 conversations, greedy): the pretrained model, then after SFT"
"$PY" -m gpt.evaluate --checkpoint "$RUN/pretrain/checkpoints/last.ckpt" --n 300 --max_new_tokens 24 --batch_size 100
"$PY" -m gpt.evaluate --checkpoint "$CHAT" --n 300 --max_new_tokens 24 --batch_size 100

step "8/8 a chat with the fine-tuned model (gpt chat, a conversation on stdin)"
printf '%s\n' 'Remember the word "king".' 'What was the word?' 'Which is larger, 3 or 8?' \
  | "$PY" -m gpt chat --checkpoint "$CHAT" --system "Be brief." --temperature 0 --max_new_tokens 24
