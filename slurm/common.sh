# Shared start-up for the sbatch scripts in slurm/ (sourced, not run).
#
# A batch script runs from a copy in Slurm's spool folder, so the scripts first `cd` to the
# repository (GPT_REPO, else the folder sbatch was called from) and then source this file:
#     cd "${GPT_REPO:-$SLURM_SUBMIT_DIR}" && source slurm/common.sh
# It picks the Python (PYTHON, else ./.venv/bin/python, else python3), keeps library threads
# to the CPUs Slurm gave each task, and offers the checks the scripts share.

set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

[ -d recipes ] && [ -d data_prep ] && [ -d slurm ] \
    || die "$(pwd) is not the gpt-pipeline repository: submit from its root or set GPT_REPO"

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON

# One process per task: its BLAS/OpenMP threads should use the task's CPUs, not the node's.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
# Slurm >= 22.05 no longer passes --cpus-per-task from sbatch to srun by itself.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi

# has_arg NAME ARGS...: whether `--NAME` or `--NAME=...` is among ARGS.
has_arg() {
    local name="$1"; shift
    local a
    for a in "$@"; do
        case "$a" in "--$name" | "--$name="*) return 0 ;; esac
    done
    return 1
}

# arg_value NAME ARGS...: the value of the last `--NAME V` / `--NAME=V` among ARGS (empty if none).
arg_value() {
    local name="$1"; shift
    local value="" prev=""
    local a
    for a in "$@"; do
        if [ "$prev" = "--$name" ]; then value="$a"; fi
        case "$a" in "--$name="*) value="${a#--"$name"=}" ;; esac
        prev="$a"
    done
    echo "$value"
}

# The address of the job's first node, as Slurm reaches it (NodeAddr: a hostname or an IP).
first_node_addr() {
    local first
    first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    scontrol show node "$first" -o | tr ' ' '\n' | sed -n 's/^NodeAddr=//p'
}
