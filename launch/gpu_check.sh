#!/usr/bin/env bash
# One-call GPU acceptance run: on one H100/H200 with torch and triton preinstalled plus the wheels that
# launch/gpu_wheels.sh gathers, in about 8 minutes, every figure under one folder:
#   1. the kernel tests, compiled by Triton for the GPU (TRITON_INTERPRET=0, not interpreted);
#   2. the kernel benchmark: fused vs torch vs reference vs base, bf16, 7B gate and down, 2k-8k tokens;
#   3. a few ZeRO-3 steps of both demo stages on the GPU, NCCL backend, through the deepspeed launcher;
#   4. the bench_train GPU row (the real 1.8B shapes, a few timed steps per stage).
# Each part has its own time limit and its own log; a part that fails is recorded and the next one runs.
# GPU_CHECK_QUICK=1 shrinks every part (small shapes, one or two steps): a check of the script itself, on a CPU.
#
#   bash launch/gpu_wheels.sh                      # here, once: wheels into .whl/ (git-ignored)
#   bash launch/gpu_check.sh OUT_DIR               # there: OUT_DIR gets summary.txt, logs.txt (every part's
#                                                  # output), bench_kernels.json/.png, bench_train.json, demo_report.md
# With the device tool: run(command="bash launch/gpu_check.sh $OUT", carry=[".whl"], timeout_s=600).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: launch/gpu_check.sh OUT_DIR}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 MEDCARE_KERNELS=auto

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "error: installing .whl/ failed" | tee "$OUT/summary.txt"; exit 2; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="/tmp/site/bin:$PATH"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

summary="$OUT/summary.txt"
: > "$summary"
: > "$OUT/logs.txt"
LOGS=$(mktemp -d)  # per-part logs; $OUT keeps few files (the device tool returns at most eight)
{
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/gpu /'
    python3 - <<'EOF'
import importlib
for name in ("torch", "triton", "deepspeed", "transformers", "datasets", "peft"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # a missing wheel shows here, before any part needs it
        print(name, "MISSING", type(e).__name__, e)
EOF
} >> "$summary" 2>&1

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log it, record the outcome and the time
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    { echo "===== $name: $*"; cat "$LOGS/$name.log"; } >> "$OUT/logs.txt"
    local verdict=ok
    [ $rc -eq 124 ] && verdict="timed out after ${limit}s"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="failed (exit $rc)"
    echo "part $name: $verdict in $((SECONDS - t0)) s" | tee -a "$summary"
}

QUICK=${GPU_CHECK_QUICK:-0}
KERNEL_SHAPES=(--models 7b --projs gate,down --tokens 2048,4096,8192 --dtype bf16)
DEMO_STEPS=(stage1.max_steps=6 stage2.max_steps=4)
TRAIN_ARGS=(--steps 3)
if [ "$QUICK" = 1 ]; then
    KERNEL_SHAPES=(--quick)
    DEMO_STEPS=(stage1.max_steps=2 stage2.max_steps=1)
    TRAIN_ARGS=(--quick --steps 1 --stage 2)
fi

# 1. Kernel tests, compiled for this GPU.
part kernel_tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py
tail -n 3 "$LOGS/kernel_tests.log" | sed 's/^/  /' >> "$summary"

# 2. Kernel benchmark table (also written as JSON and a PNG plot).
part bench_kernels 100 python3 launch/bench_kernels.py "${KERNEL_SHAPES[@]}" --out "$OUT/bench_kernels.json"

# 3. A few ZeRO-3 steps of the demo on the GPU, NCCL, one rank, both stages and the merges.
part demo_zero3 150 deepspeed --num_gpus 1 launch/train.py --recipe launch/recipes/demo.yaml \
    output_dir="$LOGS/demo_run" "${DEMO_STEPS[@]}" evaluation.report_models=[final] \
    evaluation.general_retention=false logging.progress_bar=false
grep -E "backend|nccl|NCCL|tokens/s|step [0-9]+/" "$LOGS/demo_zero3.log" | tail -n 6 | sed 's/^/  /' >> "$summary"
[ -f "$LOGS/demo_run/report.md" ] && cp "$LOGS/demo_run/report.md" "$OUT/demo_report.md"

# 4. The bench_train GPU row.
part bench_train 110 python3 launch/bench_train.py "${TRAIN_ARGS[@]}" --out "$OUT/bench_train.json"
tail -n 12 "$LOGS/bench_train.log" | sed 's/^/  /' >> "$summary"

cat "$summary"
