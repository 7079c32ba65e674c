#!/usr/bin/env bash
# Submit the data-prep job array and the merge that runs after all its tasks succeed.
# Usually run from the repository root:
#
#   slurm/data_prep.sh --tasks 16 --cpus-per-task=8 --partition=cpu -- \
#       --source 'crawl/*.jsonl.gz' --tokenizer tok/tokenizer.json --out data/shards/crawl
#
# Before `--`: --tasks N (array size, default 4) and any sbatch options, given to both jobs.
# After `--`: the arguments of python -m data_prep.make_shards (--out is required: the merge
# writes --out/manifest.json; `python -m data_prep.make_shards --help` lists them all).
# DATA_PREP_JOB=data_prep.make_sft in the environment submits the chat data prep instead.
# Prints "ARRAY_JOB_ID MERGE_JOB_ID" on stdout. The jobs run in the repository (relative paths
# are relative to it); logs go under ./runs/slurm of the folder this is run from:
# gpt-data-prep-<array id>_<task>.out and gpt-data-prep-merge-<merge id>.out.
# If a task fails the merge is cancelled, not left waiting; fix, re-submit: finished tasks skip,
# unless their input changed since (then they are redone).

set -euo pipefail
die() { echo "error: $*" >&2; exit 2; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() {  # the comment block above, without its leading "# "
    sed -n '2,/^$/{/^#/!q;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}
export GPT_REPO="${GPT_REPO:-$(dirname "$here")}"  # the jobs cd there, wherever this is run from

tasks=4
sbatch_opts=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --tasks) [ $# -ge 2 ] || die "--tasks needs a value"; tasks="$2"; shift 2 ;;
        --tasks=*) tasks="${1#--tasks=}"; shift ;;
        *) sbatch_opts+=("$1"); shift ;;
    esac
done
[ $# -gt 0 ] || die "usage: slurm/data_prep.sh [--tasks N] [sbatch options] -- make_shards args (no '--' given; --help)"
shift
[[ "$tasks" =~ ^[1-9][0-9]*$ ]] || die "--tasks must be a positive integer, got '$tasks'"

out=""
prev=""
for a in "$@"; do
    if [ "$prev" = "--out" ]; then out="$a"; fi
    case "$a" in --out=*) out="${a#--out=}" ;; esac
    prev="$a"
done
[ -n "$out" ] || die "make_shards needs --out DIR (the merge writes DIR/manifest.json)"

# A --dependency among the sbatch options is the array's (e.g. slurm/pipeline.sh chaining it after
# the tokenizer job): the merge waits for the array alone, which already waited for it.
merge_opts=()
skip_next=0
for o in "${sbatch_opts[@]}"; do
    if [ "$skip_next" = 1 ]; then skip_next=0; continue; fi
    case "$o" in
        --dependency=* | -d?*) ;;
        --dependency | -d) skip_next=1 ;;
        *) merge_opts+=("$o") ;;
    esac
done

mkdir -p runs/slurm  # Slurm does not create the folder of --output itself
array_id="$(sbatch --parsable --array="0-$((tasks - 1))" "${sbatch_opts[@]}" \
    "$here/data_prep.sbatch" shard "$@")"
array_id="${array_id%%;*}"  # --parsable prints "id;cluster" on multi-cluster set-ups
merge_id="$(sbatch --parsable --dependency="afterok:${array_id}" --kill-on-invalid-dep=yes \
    "${merge_opts[@]}" --job-name=gpt-data-prep-merge --output='runs/slurm/%x-%j.out' \
    "$here/data_prep.sbatch" merge --out "$out")"
merge_id="${merge_id%%;*}"
echo "submitted data prep: array job ${array_id} (${tasks} tasks), merge job ${merge_id} (afterok)" >&2
echo "${array_id} ${merge_id}"
