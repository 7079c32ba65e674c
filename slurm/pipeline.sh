#!/usr/bin/env bash
# The whole pipeline on a Slurm cluster in one submission: the stages of a pipeline YAML as Slurm
# jobs, each waiting for the stages it reads (--dependency=afterok). From the repository root:
#
#   slurm/pipeline.sh [--wait] [sbatch options] -- PIPELINE.yaml [pipeline options]
#   slurm/pipeline.sh --partition=gpu --account=myproj --time=24:00:00 -- recipes/configs/pipeline-tiny-cpu.yaml
#
# Before `--`: sbatch options given to every job (partition, account, time, QOS), and --wait: stay
# until the chain has ended, print its summary, exit 0 or 1. After `--`: the pipeline YAML (the
# one `python -m recipes.pipeline` runs on a laptop) and that command's options (--dir, --group,
# --force [STAGE]). A stage's own resources are in the YAML: `sbatch:` (nodes, tasks per node, GPUs,
# CPUs) and, for data prep, `array_tasks:`.
#
# Submitted, per stage (a stage finished with unchanged inputs gets no job):
#   prep: ...      slurm/data_prep.sh: the job array, then its merge
#   recipe: ...    slurm/train.sbatch RECIPE CONFIG ARGS --group G --run_dir DIR/NAME
#                  (srun over the allocation; requeued with its last.ckpt on preemption)
#   the rest       one small job: python -m recipes.pipeline --only NAME [--after_main]: the stage's
#                  evaluations and exports, plots, its log DIR/logs/NAME.log and its done-marker
#   report         after every job, whatever happened: DIR/summary.json + summary.md, the table, and
#                  one line naming a failed stage, its job and its log
# A failed job cancels every job after it (--kill-on-invalid-dep=yes). Fix it and run the same
# command again: finished stages are skipped, a failed training stage resumes from its last.ckpt.
# Logs go under ./runs/slurm of the folder this is run from: gpt-<stage>-<job id>.out (data prep:
# gpt-data-prep-<array id>_<task>.out and gpt-data-prep-merge-<job id>.out). Relative paths in
# the YAML are relative to the repository (every job runs there). Prints the jobs and their logs.

set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() {  # the comment block above, without its leading "# "
    sed -n '2,/^$/{/^#/!q;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}
export GPT_REPO="${GPT_REPO:-$(dirname "$here")}"  # every job cds there, wherever this is run from
submit_dir="$(pwd)"
cd "$GPT_REPO" && source slurm/common.sh && cd "$submit_dir"  # die, PYTHON
case "$PYTHON" in /*) ;; */*) PYTHON="$GPT_REPO/$PYTHON" ;; esac
export PYTHON

wait_end=0
sbatch_opts=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --wait) wait_end=1; shift ;;
        *) sbatch_opts+=("$1"); shift ;;
    esac
done
[ $# -ge 2 ] || die "usage: slurm/pipeline.sh [--wait] [sbatch options] -- PIPELINE.yaml [pipeline options] (--help)"
shift
config="$1"
shift
[ -f "$config" ] || die "pipeline config '${config}' not found"
config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"

# The plan: one job per line, as shell words: NAME KIND AFTER [sbatch options] -- ARGS
# (gpt/pipeline_slurm.py). Stages that start afresh are cleaned now, before anything runs.
plan="$(cd "$GPT_REPO" && "$PYTHON" -m recipes.pipeline --config "$config" "$@" --slurm_plan)" \
    || die "could not plan the pipeline (the error is above)"
if [ -z "$plan" ]; then
    echo "nothing to submit: every stage is done with unchanged inputs (--force [STAGE] runs them again)"
    exit 0
fi

mkdir -p runs/slurm  # Slurm does not create the folder of --output itself
declare -A job_of=()  # job name in the plan -> the Slurm job id later jobs wait for
every=()              # every job id, for the report
report_jobs=()        # NAME=ID[:ID] for the report

job_script() {  # a batch script running this pipeline's runner with the given options
    printf '#!/usr/bin/env bash\ncd %q && exec %q -m recipes.pipeline' "$GPT_REPO" "$PYTHON"
    printf ' %q' "$@"
    printf '\n'
}

while IFS= read -r line; do
    eval "words=($line)"  # the plan's words, quoted by Python's shlex.join
    name="${words[0]}" kind="${words[1]}" after="${words[2]}"
    opts=() args=() in_args=0
    for w in "${words[@]:3}"; do
        if [ "$in_args" = 0 ] && [ "$w" = "--" ]; then in_args=1
        elif [ "$in_args" = 0 ]; then opts+=("$w")
        else args+=("$w"); fi
    done
    dep=()
    if [ "$after" != "-" ]; then
        ids=""
        IFS=, read -ra names <<< "$after"
        for n in "${names[@]}"; do ids+=":${job_of[$n]}"; done
        dep=(--dependency="afterok${ids}" --kill-on-invalid-dep=yes)
    fi
    case "$kind" in
        prep)  # opts: --tasks N + the stage's sbatch options; args: MODULE + its arguments
            ids="$(DATA_PREP_JOB="${args[0]}" "$here/data_prep.sh" "${opts[@]}" "${sbatch_opts[@]}" "${dep[@]}" \
                   -- "${args[@]:1}")"
            array_id="${ids% *}" id="${ids#* }"
            report_jobs+=("${name}=${array_id}:${id}")
            every+=("$array_id" "$id")
            log="runs/slurm/gpt-data-prep-${array_id}_*.out, runs/slurm/gpt-data-prep-merge-${id}.out" ;;
        train)  # args: RECIPE CONFIG + its arguments
            id="$(sbatch --parsable --job-name="gpt-${name}" "${dep[@]}" "${sbatch_opts[@]}" "${opts[@]}" \
                  "$here/train.sbatch" "${args[@]}")"
            id="${id%%;*}"
            report_jobs+=("${name}=${id}") every+=("$id")
            log="runs/slurm/gpt-${name}-${id}.out" ;;
        run)  # args: this runner's options
            id="$(job_script "${args[@]}" | sbatch --parsable --job-name="gpt-${name}" \
                  --output='runs/slurm/%x-%j.out' "${dep[@]}" "${sbatch_opts[@]}" --nodes=1 --ntasks=1)"
            id="${id%%;*}"
            report_jobs+=("${name}=${id}") every+=("$id")
            log="runs/slurm/gpt-${name}-${id}.out" ;;
        *) die "unknown job kind '${kind}' in the plan: ${line}" ;;
    esac
    job_of[$name]="$id"
    printf '%-16s job %-8s %-6s after %-24s log %s\n' "$name" "$id" "$kind" "$after" "$log"
done <<< "$plan"

report_args=(--config "$config" "$@" --report "$(IFS=,; echo "${report_jobs[*]}")")
report="$(job_script "${report_args[@]}" | sbatch --parsable --job-name=gpt-pipeline-report \
          --output='runs/slurm/%x-%j.out' --dependency="afterany:$(IFS=:; echo "${every[*]}")" \
          "${sbatch_opts[@]}" --nodes=1 --ntasks=1)"
report="${report%%;*}"
report_log="runs/slurm/gpt-pipeline-report-${report}.out"
printf '%-16s job %-8s %-6s after %-24s log %s\n' report "$report" run "every job" "$report_log"

if [ "$wait_end" = 1 ]; then
    while [ -n "$(squeue -h -j "$report" 2>/dev/null)" ]; do sleep 5; done
    cat "$report_log"
    exit_code="$(scontrol show job -o "$report" 2>/dev/null | tr ' ' '\n' | sed -n 's/^ExitCode=//p')"
    [ "${exit_code:-0:0}" = "0:0" ] || exit 1
fi
