#!/usr/bin/env bash
# One GPU check of the whole pipeline, for a single rented GPU with no network (about 5 minutes on an H200).
#
#   OUT=/tmp/gpu_out bash scripts/gpu_check.sh                            # on the GPU machine, from the repo root
#   OUT=/tmp/gpu_out GPU_CHECK_DEVICE=cpu PYTHON=.venv/bin/python \
#       GPU_CHECK_WHEELS=/tmp/whl311 bash scripts/gpu_check.sh            # the same commands on a CPU, fewer steps
# (/tmp/whl311: .gpu/whl with the cp311 builds of pydantic_core and multiprocess in place of the cp312
# ones, for a Python 3.11 venv; the GPU machine's python3 is 3.12.)
#
# Needs .gpu/ (git-ignored, carried to the machine; `bash scripts/gpu_prepare.sh` after `make demo` builds it):
# .gpu/whl/ wheels of what the machine lacks
# (jsonargparse, deepspeed, pydantic, datasets, ... at the versions of our .venv) and .gpu/data/ (a
# copy of runs/demo's tokenizer.json, shards/, sft_data/, pairs/, task/{val,dev,post}.jsonl and the
# SFT export sft/hf, laid out as in runs/demo). The wheels go into /tmp/site (--no-deps), nothing
# else is installed. W&B is off (--wandb false); nothing reaches the network.
#
# Checks (each timed, each under `timeout`, none stopping the others):
#   a pytest     tests/test_gpu.py (CUDA against the CPU: logits, greedy tokens, bf16 training, RL log-probs)
#   b pretrain   recipes.pretrain (tiny-cpu.yaml) on the GPU in bf16-mixed, 60 steps with a checkpoint at 30;
#                a second run stopped at 30 and resumed (--ckpt_path last) to 60: losses of steps 31-60 compared
#                (schedule constant in both, so that a 30-step run and a 60-step run share their lr)
#   c zero2/3    the same pretraining, 20 steps, under gpt.zero.ZeroStrategy (recipes/deepspeed/zero{2,3}.json)
#   d sft        recipes.sft from the SFT export, then python -m gpt.evaluate (exact match)
#   e reward, dpo, grpo, ppo   each recipe from the SFT export, a few steps, final CSV metrics
#   f sample, chat   gpt sample and a two-turn gpt chat on the GPU (the chat's transcript against the CPU's)
#   g throughput GPT-2 124M shape (gpt2-124m.yaml, vocab 4096), 30 steps bf16: tokens/s and MFU
# Results: $OUT/summary.md (one row per check), $OUT/details.md (numbers), $OUT/results.jsonl (a JSON line per
# check), $OUT/gpu_check.log (every command's whole output), $OUT/runs_csv.tgz (each run's CSV metrics and config).
#
# Environment: OUT (required on the device; default /tmp/gpu_check_out), GPU_CHECK_DEVICE=gpu|cpu,
# PYTHON (default python3), GPU_CHECK_WHEELS (default .gpu/whl), GPU_CHECK_BUDGET_S (default 330: a check
# that would start later is skipped), GPU_CHECK_HARD_S (default budget + 90: no command runs past it; each
# command's own timeout is cut to what is left), GPU_CHECK_ONLY (e.g. "b c g": only the checks of those
# letters; c compares with b's run), GPU_CHECK_WORK (run directories, default /tmp/gpu_check).
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
DEV=${GPU_CHECK_DEVICE:-gpu}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
WHL=${GPU_CHECK_WHEELS:-.gpu/whl}
BUDGET=${GPU_CHECK_BUDGET_S:-330}
HARD=${GPU_CHECK_HARD_S:-$((BUDGET + 90))}
ONLY=${GPU_CHECK_ONLY:-}
W=${GPU_CHECK_WORK:-/tmp/gpu_check}
DATA=.gpu/data
mkdir -p "$OUT" && rm -rf "$W" && mkdir -p "$W" || exit 1
LOG=$OUT/gpu_check.log SUMMARY=$OUT/summary.md DETAILS=$OUT/details.md RESULTS=$OUT/results.jsonl
: >"$LOG"; : >"$DETAILS"; : >"$RESULTS"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled WANDB_SILENT=true HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$W/torch_extensions} \
       PYTHONWARNINGS=ignore

if [ "$DEV" = gpu ]; then
  ACC=gpu PREC=bf16-mixed DEVFLAG=cuda
  PRE_STEPS=60 PRE_HALF=30 ZERO_STEPS=20 SFT_STEPS=100 EM_N=300 CHAT_N=300
  RM_STEPS=60 DPO_STEPS=40 GRPO_ROLLOUTS=8 PPO_ROLLOUTS=4 RL_PROMPTS=64 RL_VAL=300 TPUT_STEPS=30
  T_SHORT=150 T_LONG=240 VAL_N=256 VAL_PAIRS=400
else
  ACC=cpu PREC=bf16-mixed DEVFLAG=cpu
  PRE_STEPS=8 PRE_HALF=4 ZERO_STEPS=4 SFT_STEPS=6 EM_N=20 CHAT_N=20
  RM_STEPS=4 DPO_STEPS=4 GRPO_ROLLOUTS=2 PPO_ROLLOUTS=2 RL_PROMPTS=4 RL_VAL=16 TPUT_STEPS=2
  T_SHORT=200 T_LONG=300 VAL_N=32 VAL_PAIRS=32
fi
HW=(--trainer.accelerator "$ACC" --trainer.devices 1 --trainer.precision "$PREC" --wandb false
    --trainer.enable_progress_bar false --trainer.log_every_n_steps 1)

# ---- helpers ------------------------------------------------------------------------------------
cat >"$W/gc.py" <<'PYEOF'
"""Helpers of scripts/gpu_check.sh: derived configs, CSV metrics, comparisons (one line out, rc 0/1)."""
import csv, json, math, sys
from pathlib import Path


def rows(run):
    out = []
    versions = sorted(Path(run, "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    for v in versions:
        with open(v / "metrics.csv") as f:
            for r in csv.DictReader(f):
                out.append({k: float(x) for k, x in r.items() if x not in ("", None)})
    return out


def by_step(run, key="train/loss"):
    return {int(r["step"]): r[key] for r in rows(run) if key in r and "step" in r}


def final(run):
    last = {}
    for r in rows(run):
        last.update({k: v for k, v in r.items() if k not in ("epoch",)})
    return last


def cmd_cfg(src, dst, data, chat_examples):
    import yaml
    cfg = yaml.safe_load(Path(src).read_text().replace("runs/demo/", data.rstrip("/") + "/"))
    for cb in (cfg.get("trainer") or {}).get("callbacks") or []:
        if str(cb.get("class_path", "")).endswith("ChatEval"):
            cb.setdefault("init_args", {})["examples"] = int(chat_examples)
    Path(dst).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return 0


def cmd_resume(a, b, lo, hi, tol):
    lo, hi, tol = int(lo), int(hi), float(tol)
    la, lb = by_step(a), by_step(b)
    steps = list(range(lo, hi))
    missing = [s for s in steps if s not in la or s not in lb]
    lines = ["| step | straight run | stopped + resumed | abs diff |", "|---|---|---|---|"]
    diffs = []
    for s in steps:
        if s in la and s in lb:
            d = abs(la[s] - lb[s])
            diffs.append(d)
            lines.append(f"| {s + 1} | {la[s]:.6f} | {lb[s]:.6f} | {d:.2e} |")
    finite = all(math.isfinite(v) for v in list(la.values()) + list(lb.values()))
    worst = max(diffs) if diffs else float("nan")
    first, end = la.get(0, float("nan")), la.get(hi - 1, float("nan"))
    ok = not missing and finite and worst <= tol and end < first
    note = (f"steps {lo + 1}-{hi}: max abs diff {worst:.2e} (tol {tol:g}); loss {first:.3f} -> {end:.3f}"
            + (f"; missing steps {missing[:5]}" if missing else "") + ("" if finite else "; NON-FINITE"))
    Path(sys.argv[-1]).write_text("\n".join(lines) + "\n")
    print(note)
    return 0 if ok else 1


def cmd_zero(plain, zero, step, tol):
    s, tol = int(step) - 1, float(tol)
    a, b = by_step(plain).get(s), by_step(zero).get(s)
    if a is None or b is None:
        print(f"no step-{step} loss (plain {a}, zero {b})")
        return 1
    d = abs(a - b)
    print(f"step-{step} loss {b:.4f} vs plain {a:.4f} (diff {d:.3f}, tol {tol:g})")
    return 0 if math.isfinite(b) and d <= tol else 1


def cmd_final(run, keys, need_step):
    f = final(run)
    got = {k: f[k] for k in keys.split(",") if k in f}
    # The last training row's step: optimizer steps done before it (automatic optimization logs before
    # the step, so a run of N steps ends at N - 1) or after it (RL's manual optimization: N).
    trained = [int(r["step"]) for r in rows(run) if "step" in r and any(k.startswith("train/") for k in r)]
    last = max(trained) if trained else -1
    ok = all(math.isfinite(v) for v in got.values()) and len(got) == len(keys.split(",")) and last + 1 >= int(need_step)
    print(f"last train row at step {last}: " + ", ".join(f"{k} {v:.4g}" for k, v in got.items())
          + ("" if len(got) == len(keys.split(",")) else f" (missing: {sorted(set(keys.split(',')) - set(got))})"))
    return 0 if ok else 1


def cmd_tput(run):
    f = final(run)
    tps, mfu = f.get("train/tokens_per_sec"), f.get("train/mfu")
    if tps is None:
        print("no train/tokens_per_sec in the CSV")
        return 1
    print(f"{tps:,.0f} tokens/s" + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ", no MFU") +
          f", loss {f.get('train/loss', float('nan')):.3f}")
    return 0


def cmd_pick(run, key):
    """The final value of `key` and of every `key/...` (per-family values), for the notes."""
    f = final(run)
    got = {k: v for k, v in f.items() if k == key or k.startswith(key + "/")}
    print(", ".join(f"{k.removeprefix(key + '/')} {v:.3f}" for k, v in got.items()) or f"no {key}")
    return 0 if key in got else 1


def cmd_em(path):
    r = json.loads(Path(path).read_text())
    fam = ", ".join(f"{k} {100 * v['exact_match']:.0f}%" for k, v in (r.get("per_family") or {}).items())
    print(f"exact match {100 * r['exact_match']:.1f}% of {r['n']} ({fam})")
    return 0


def cmd_same(a, b):
    ta, tb = Path(a).read_text(), Path(b).read_text()
    print("same transcript on both devices" if ta == tb else "TRANSCRIPTS DIFFER between devices")
    return 0 if ta == tb and ta.strip() else 1


if __name__ == "__main__":
    name, args = sys.argv[1], sys.argv[2:]
    try:
        fn = {"cfg": cmd_cfg, "resume": cmd_resume, "zero": cmd_zero, "final": cmd_final, "tput": cmd_tput,
              "em": cmd_em, "same": cmd_same, "pick": cmd_pick}[name]
        sys.exit(fn(*args[:fn.__code__.co_argcount]))
    except Exception as e:  # a missing file or CSV: the check fails with the reason on its line
        print(f"{type(e).__name__}: {e}")
        sys.exit(1)
PYEOF

T0=$SECONDS
log() { echo "$*" >>"$LOG"; }
# run TIMEOUT CMD...: one command, its output into the log, under timeout; returns its exit status.
run() {
  local t=$1 left=$((HARD - (SECONDS - T0))); shift
  if [ $left -lt 10 ]; then log "+ not run (${HARD}s hard limit): $*"; return 124; fi
  [ "$t" -gt $left ] && t=$left
  log "+ [$(date +%T)] $* (timeout ${t}s)"
  local s=$SECONDS
  timeout -k 10 "$t" "$@" >>"$LOG" 2>&1
  local rc=$?
  log "+ rc $rc after $((SECONDS - s))s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
  return $rc
}
tl() { local left=$((HARD - (SECONDS - T0))); [ $left -lt 1 ] && left=1; echo $(($1 < left ? $1 : left)); }
gc() { "$PY" "$W/gc.py" "$@" 2>>"$LOG"; }
# gcn PREFIX ARGS...: gc ARGS, its line noted after PREFIX; returns gc's status.
gcn() { local p=$1 out rc; shift; out=$(gc "$@"); rc=$?; note "${p:+$p }$out"; return $rc; }
NOTE=""
note() { NOTE="${NOTE:+$NOTE; }$*"; }
detail() { echo "$*" >>"$DETAILS"; }
# check NAME FUNCTION: times the function, one row in summary.md, one JSON line in results.jsonl.
check() {
  local name=$1 fn=$2 s=$SECONDS status
  NOTE=""
  log ""; log "======== $name ($(date +%T), $((s - T0))s into the check) ========"
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" ${name%% *} "* ]]; then
    return 0
  elif [ $((SECONDS - T0)) -ge "$BUDGET" ]; then
    status=SKIP NOTE="not started: ${BUDGET}s budget spent"
  elif $fn; then status=PASS; else status=FAIL; fi
  local dt=$((SECONDS - s))
  NOTE=$(echo "$NOTE" | tr '\n|' ' /')
  echo "| $name | $status | ${dt}s | $NOTE |" >>"$SUMMARY"
  "$PY" -c 'import json,sys; print(json.dumps(dict(zip(["check","status","seconds","note"], sys.argv[1:]))))' \
    "$name" "$status" "$dt" "$NOTE" >>"$RESULTS"
  log "======== $name: $status in ${dt}s: $NOTE"
}

# ---- set-up: carried wheels, environment --------------------------------------------------------
{
  echo "# GPU check ($DEV) $(date -u +%FT%TZ)"
  echo
} >"$SUMMARY"
log "installing $(ls "$WHL"/*.whl 2>/dev/null | wc -l) wheels from $WHL into /tmp/site"
rm -rf /tmp/site
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
  >>"$LOG" 2>&1 || echo "**wheel install failed** (see gpu_check.log)" >>"$SUMMARY"
export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
{
  echo '```'
  nvidia-smi -L 2>&1 | head -4
  "$PY" - <<'EOF' 2>&1
import importlib, platform, sys
import torch
print(f"python {platform.python_version()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"cuda available {torch.cuda.is_available()}"
      + (f" | {torch.cuda.get_device_name()} | bf16 {torch.cuda.is_bf16_supported()}"
         if torch.cuda.is_available() else ""))
vers = []
for m in ("lightning", "deepspeed", "jsonargparse", "pydantic", "datasets", "pyarrow", "fsspec", "huggingface_hub",
          "transformers", "tokenizers", "safetensors", "numpy"):
    try:
        mod = importlib.import_module(m)
        vers.append(f"{m} {getattr(mod, '__version__', '?')}")
    except Exception as e:
        vers.append(f"{m} MISSING ({type(e).__name__}: {str(e)[:80]})")
print(" | ".join(vers))
EOF
  echo '```'
  echo
  echo "| check | result | time | details |"
  echo "|---|---|---|---|"
} >>"$SUMMARY" 2>&1
cat "$SUMMARY" >>"$LOG"
for f in tiny-cpu sft-tiny-cpu reward-tiny-cpu dpo-tiny-cpu rl-tiny-cpu rl-ppo-tiny-cpu gpt2-124m; do
  gc cfg "recipes/configs/$f.yaml" "$W/$f.yaml" "$DATA" "$CHAT_N" || log "could not derive $f.yaml"
done

# ---- a: tests/test_gpu.py -----------------------------------------------------------------------
check_pytest() {
  local env=()
  [ "$DEV" = cpu ] && env=(env GPU_TESTS_DEVICE=cpu)
  run "$T_SHORT" "${env[@]}" "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
  local rc=$?
  note "$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error|skipped)' "$LOG" | tail -1 | tr -d '=')"
  return $rc
}

# ---- b: pretraining on the GPU, and an exact resume --------------------------------------------
PRE=(-m recipes.pretrain --config "$W/tiny-cpu.yaml" "${HW[@]}" --data.data_dir "$DATA/shards"
     --data.tokenizer "$DATA/tokenizer.json" --model.schedule constant --print_every 10 --val_every "$PRE_HALF")
check_pretrain() {
  run "$T_SHORT" "$PY" "${PRE[@]}" --run_dir "$W/pre_a" --trainer.max_steps "$PRE_STEPS" \
    --checkpoint_every "$PRE_HALF" || { note "straight run failed"; return 1; }
  run "$T_SHORT" "$PY" "${PRE[@]}" --run_dir "$W/pre_b" --trainer.max_steps "$PRE_HALF" \
    --checkpoint_every "$PRE_HALF" || { note "first half failed"; return 1; }
  run "$T_SHORT" "$PY" "${PRE[@]}" --run_dir "$W/pre_b" --trainer.max_steps "$PRE_STEPS" \
    --checkpoint_every "$PRE_HALF" --ckpt_path last || { note "resume failed"; return 1; }
  grep -q "resuming .* at step $PRE_HALF" "$LOG" || note "no 'resuming ... at step $PRE_HALF' line"
  local table=$W/resume_table.md
  gcn "" resume "$W/pre_a" "$W/pre_b" "$PRE_HALF" "$PRE_STEPS" 2e-2 "$table"
  local rc=$?
  detail "## b: pretraining losses, straight vs stopped at $PRE_HALF and resumed"; cat "$table" >>"$DETAILS" 2>/dev/null
  detail ""
  return $rc
}

# ---- c: DeepSpeed ZeRO-2 / ZeRO-3 on one device -------------------------------------------------
check_zero() {  # $1 = zero2 | zero3
  local z=$1
  run "$T_SHORT" "$PY" "${PRE[@]}" --run_dir "$W/pre_$z" --trainer.max_steps "$ZERO_STEPS" --checkpoint_every 0 \
    --val_every 0 --trainer.strategy "{\"class_path\": \"gpt.zero.ZeroStrategy\",
                                       \"init_args\": {\"config\": \"recipes/deepspeed/$z.json\"}}" \
    || { note "run failed"; return 1; }
  [ -d "$W/pre_$z/checkpoints/last.ckpt" ] || note "no DeepSpeed last.ckpt directory"
  gcn "" zero "$W/pre_a" "$W/pre_$z" "$ZERO_STEPS" 0.15
}
check_zero2() { check_zero zero2; }
check_zero3() { check_zero zero3; }

# ---- d: SFT from the export, exact match --------------------------------------------------------
POST=("${HW[@]}" --init_from "$DATA/sft/hf" --print_every 10)
check_sft() {
  run "$T_LONG" "$PY" -m recipes.sft --config "$W/sft-tiny-cpu.yaml" "${POST[@]}" --run_dir "$W/sft" \
    --trainer.max_steps "$SFT_STEPS" --val_every "$SFT_STEPS" --checkpoint_every 0 --data.val_examples "$VAL_N" \
    || { note "SFT run failed"; return 1; }
  gcn SFT final "$W/sft" train/loss,val/loss "$SFT_STEPS" || return 1
  gcn "ChatEval (dev)" pick "$W/sft" val/exact_match || return 1
  run "$T_SHORT" "$PY" -m gpt.evaluate --checkpoint "$W/sft/checkpoints/last.ckpt" --n "$EM_N" --batch_size 100 \
    --device "$DEVFLAG" --json "$W/sft_em.json" || { note "gpt.evaluate failed"; return 1; }
  gcn gpt.evaluate em "$W/sft_em.json"
}

# ---- e: reward model, DPO, GRPO, PPO from the export --------------------------------------------
check_reward() {
  run "$T_SHORT" "$PY" -m recipes.reward --config "$W/reward-tiny-cpu.yaml" "${POST[@]}" --run_dir "$W/reward" \
    --trainer.max_steps "$RM_STEPS" --val_every "$RM_STEPS" --checkpoint_every 0 --data.val_pairs "$VAL_PAIRS" \
    || { note "run failed"; return 1; }
  gcn "" final "$W/reward" train/loss,val/accuracy "$RM_STEPS"
}
check_dpo() {
  run "$T_LONG" "$PY" -m recipes.dpo --config "$W/dpo-tiny-cpu.yaml" "${POST[@]}" --run_dir "$W/dpo" \
    --trainer.max_steps "$DPO_STEPS" --val_every "$DPO_STEPS" --checkpoint_every 0 --data.val_pairs "$VAL_PAIRS" \
    || { note "run failed"; return 1; }
  gcn "" final "$W/dpo" train/loss,val/loss,val/rewards/accuracies "$DPO_STEPS" || return 1
  gcn "ChatEval (dev)" pick "$W/dpo" val/exact_match
}
check_grpo() {
  run "$T_LONG" "$PY" -m recipes.rl --config "$W/rl-tiny-cpu.yaml" "${POST[@]}" --run_dir "$W/grpo" \
    --trainer.max_steps "$GRPO_ROLLOUTS" --val_every "$GRPO_ROLLOUTS" --checkpoint_every 0 \
    --data.micro_batch_size "$RL_PROMPTS" --data.val_examples "$RL_VAL" || { note "run failed"; return 1; }
  gcn "" final "$W/grpo" train/reward,val/verifier_reward "$GRPO_ROLLOUTS"
}
check_ppo() {
  local steps=$((PPO_ROLLOUTS * 2))  # ppo_epochs 2 x num_minibatches 1 optimizer steps per rollout
  run "$T_LONG" "$PY" -m recipes.rl --config "$W/rl-ppo-tiny-cpu.yaml" "${POST[@]}" --run_dir "$W/ppo" \
    --model.reward_model null --model.rm_weight 0 --model.verifier_weight 1.0 \
    --trainer.max_steps "$steps" --val_every "$steps" --checkpoint_every 0 \
    --data.micro_batch_size "$RL_PROMPTS" --data.val_examples "$RL_VAL" || { note "run failed"; return 1; }
  gcn "" final "$W/ppo" train/reward,train/value_loss,val/verifier_reward "$steps"
}

# ---- f: gpt sample, gpt chat --------------------------------------------------------------------
check_sample() {
  log "+ gpt sample on $DEVFLAG"
  timeout -k 10 "$(tl 90)" "$PY" -m gpt sample --checkpoint "$DATA/sft/hf" --prompt "ROMEO:" \
    --max_new_tokens 40 --seed 1 --device "$DEVFLAG" >"$W/sample.txt" 2>>"$LOG" \
    || { note "gpt sample failed"; return 1; }
  cat "$W/sample.txt" >>"$LOG"
  detail "## f: gpt sample on $DEVFLAG"; detail '```'; cat "$W/sample.txt" >>"$DETAILS"; detail '```'; detail ""
  note "\"$(tr '\n' ' ' <"$W/sample.txt" | head -c 80)...\""
  [ -s "$W/sample.txt" ]
}
CHAT_IN='Remember the word "king".
What was the word?
Which is larger, 3 or 8?
'
check_chat() {
  local d rc=0
  for d in "$DEVFLAG" cpu; do
    log "+ gpt chat on $d"
    printf '%s' "$CHAT_IN" | timeout -k 10 "$(tl 90)" "$PY" -m gpt chat --checkpoint "$DATA/sft/hf" \
      --system "Be brief." --temperature 0 --max_new_tokens 24 --device "$d" >"$W/chat_$d.txt" 2>>"$LOG" \
      || { rc=1; note "chat on $d failed"; }
    cat "$W/chat_$d.txt" >>"$LOG"
    [ "$d" = cpu ] && [ "$DEVFLAG" = cpu ] && break
  done
  detail "## f: gpt chat on $DEVFLAG (greedy)"; detail '```'
  cat "$W/chat_$DEVFLAG.txt" >>"$DETAILS"; detail '```'; detail ""
  if [ "$DEVFLAG" != cpu ]; then gcn "" same "$W/chat_$DEVFLAG.txt" "$W/chat_cpu.txt" || rc=1; fi
  note "$(tr '\n' ' ' <"$W/chat_$DEVFLAG.txt" | head -c 150)"
  return $rc
}

# ---- g: throughput of the GPT-2 124M shape ------------------------------------------------------
check_throughput() {
  local model='{"vocab_size": 4096}' mb=16
  # CPU dry run: the same command on a small model (the flags are what is checked there).
  [ "$DEV" = cpu ] && model='{"vocab_size": 4096, "n_layer": 2, "n_head": 2, "n_embd": 64}' mb=1
  run "$T_SHORT" "$PY" -m recipes.pretrain --config "$W/gpt2-124m.yaml" "${HW[@]}" --trainer.strategy auto \
    --run_dir "$W/tput" --data.data_dir "$DATA/shards" --data.tokenizer "$DATA/tokenizer.json" \
    --model.model_config "$model" --model.compile "${COMPILE:-false}" --data.micro_batch_size "$mb" \
    --trainer.accumulate_grad_batches 1 --data.num_workers 0 --data.val_windows 8 --trainer.max_steps "$TPUT_STEPS" \
    --model.warmup_steps 5 --val_every 0 --checkpoint_every 0 --print_every 5 || { note "run failed"; return 1; }
  local line
  line=$(grep -E "^training steps 0\.\.$TPUT_STEPS: |^step $TPUT_STEPS/$TPUT_STEPS " "$LOG" | tail -2)
  gcn "" tput "$W/tput"
  local rc=$?
  detail "## g: GPT-2 124M shape, micro-batch $mb x 1024, compile ${COMPILE:-false}"
  detail '```'; detail "$line"; detail '```'
  return $rc
}
check_throughput_compiled() { rm -rf "$W/tput"; COMPILE=true check_throughput; }

check "a pytest tests/test_gpu.py" check_pytest
check "b pretrain + resume" check_pretrain
check "c ZeRO-2" check_zero2
check "c ZeRO-3" check_zero3
check "d SFT + gpt.evaluate" check_sft
check "e reward model" check_reward
check "e DPO" check_dpo
check "e GRPO" check_grpo
check "e PPO (verifier only)" check_ppo
check "f gpt sample" check_sample
check "f gpt chat" check_chat
check "g throughput 124M" check_throughput
if [ "$DEV" = gpu ]; then
  BUDGET=$((BUDGET - 90)) check "g throughput 124M, torch.compile" check_throughput_compiled
fi
# Every run's CSV metrics and resolved config, for curves (one small file).
(cd "$W" && tar czf "$OUT/runs_csv.tgz" $(ls -d */csv */config.yaml 2>/dev/null)) 2>>"$LOG"
echo >>"$SUMMARY"
echo "total $((SECONDS - T0))s; details.md holds the numbers, gpu_check.log every command's output" >>"$SUMMARY"
cat "$SUMMARY"
grep -q '| FAIL |' "$SUMMARY" && exit 1
exit 0
