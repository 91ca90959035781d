#!/bin/bash
# Submit MedCare's two stages as two SLURM jobs, stage 2 starting only after stage 1 succeeded.
#
#   launch/slurm/submit_two_stage.sh [--requeue] [--dry-run] [--stage1-args "SBATCH OPTS"]
#       [--stage2-args "SBATCH OPTS"] [SBATCH OPTION ...] -- --recipe RECIPE [key=value ...]
#
# e.g.
#   launch/slurm/submit_two_stage.sh --requeue --nodes=4 --stage2-args "--nodes=2 --time=8:00:00" -- \
#       --recipe launch/recipes/qwen1.5-14b.yaml model.path=/models/Qwen1.5-14B-Chat
#
# Job 1 runs `stage=1` (stage 1 + the TAIA merge) into output_dir; job 2 runs `stage=2 init_from=<that
# output_dir>` (stage 2 + the final merge + report) into the same output_dir, submitted with
# --dependency=afterok:<job 1> --kill-on-invalid-dep=yes: it waits for job 1 to finish successfully
# and is dropped if job 1 fails. With --requeue both use train_requeue.sbatch (checkpoint + requeue
# before the time limit; a requeued job 1 keeps job 2 waiting). Run it from the repository root.
# Prints the two job ids. The recipe and overrides are checked here, before anything is queued.
set -euo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=${MEDCARE_REPO:-$(cd "$SCRIPT_DIR/../.." && pwd)}
SBATCH_SCRIPT=$SCRIPT_DIR/train.sbatch
DRY=0
COMMON=()
S1=()
S2=()
while [ $# -gt 0 ]; do
    case "$1" in
        --requeue) SBATCH_SCRIPT=$SCRIPT_DIR/train_requeue.sbatch; shift ;;
        --dry-run) DRY=1; shift ;;
        --stage1-args) read -r -a S1 <<< "$2"; shift 2 ;;
        --stage2-args) read -r -a S2 <<< "$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        --) shift; break ;;
        *) COMMON+=("$1"); shift ;;
    esac
done
[ $# -gt 0 ] || { echo "error: nothing after --: give --recipe RECIPE [key=value ...]" >&2; usage 2; }
TRAIN_ARGS=("$@")
for a in "${TRAIN_ARGS[@]}"; do
    case "$a" in
        stage=*|init_from=*) echo "error: $a is set by this helper (stage=1, then stage=2 init_from=...)" >&2; exit 2 ;;
    esac
done

if [ -z "${MEDCARE_PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then MEDCARE_PYTHON="$REPO/.venv/bin/python"; else MEDCARE_PYTHON=python3; fi
fi
# The recipe's output_dir (after overrides), read by the project's own config loader: a bad recipe fails
# here rather than after hours in the queue.
OUT=$(cd "$REPO" && "$MEDCARE_PYTHON" - "${TRAIN_ARGS[@]}" <<'PY'
import argparse, sys
p = argparse.ArgumentParser(add_help=False)
p.add_argument("--recipe", required=True)
p.add_argument("overrides", nargs="*")
a = p.parse_args(sys.argv[1:])
from medcare_dist.config import ConfigError, load_config
try:
    print(load_config(a.recipe, a.overrides + ["stage=1"]).output_dir)
except ConfigError as e:
    sys.exit(f"error: {e}")
PY
) || exit 2

submit() {  # prints the job id
    local cmd=(sbatch --parsable "$@")
    if [ "$DRY" = 1 ]; then
        printf '%q ' "${cmd[@]}" >&2; echo >&2
        echo "DRYRUN$((RANDOM))"
        return
    fi
    local out
    out=$(cd "$REPO" && "${cmd[@]}") || { echo "error: sbatch failed: ${cmd[*]}" >&2; exit 1; }
    echo "${out%%;*}"   # --parsable prints "jobid" or "jobid;cluster"
}

J1=$(submit --job-name=medcare-s1 "${COMMON[@]}" "${S1[@]}" "$SBATCH_SCRIPT" "${TRAIN_ARGS[@]}" stage=1)
J2=$(submit --job-name=medcare-s2 --dependency="afterok:$J1" --kill-on-invalid-dep=yes "${COMMON[@]}" "${S2[@]}" \
     "$SBATCH_SCRIPT" "${TRAIN_ARGS[@]}" stage=2 "init_from=$OUT")
echo "stage 1: job $J1"
echo "stage 2: job $J2 (after $J1 succeeds)"
echo "output_dir: $OUT"
