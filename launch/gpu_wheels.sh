#!/usr/bin/env bash
# Gather, here, the wheels launch/gpu_check.sh installs on a GPU machine that has torch, triton, transformers,
# peft and the scientific stack but not DeepSpeed or datasets (the device image: Python 3.12, x86-64).
# Versions are requirements.lock's. DeepSpeed is published as a source archive only: it is built here into a
# pure-Python wheel (its CUDA ops are JIT-compiled there, on first use).
#   bash launch/gpu_wheels.sh [DIR]      # default .whl/ (git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.whl}"
mkdir -p "$DIR"
pin() { grep -iE "^${1//[-_]/[-_]}==" requirements.lock | head -n 1; }  # pip freeze writes _ or -

# Python-version-specific wheels for the GPU machine's CPython 3.12 on x86-64.
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$DIR" \
    "$(pin datasets)" "$(pin dill)" "$(pin multiprocess)" "$(pin simple-icd-10-cm)" "$(pin hjson)" \
    "$(pin pydantic)" "$(pin pydantic-core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
    "$(pin transformers)" "$(pin tokenizers)" "$(pin huggingface-hub)" "$(pin peft)" "$(pin xxhash)"

if ! ls "$DIR"/deepspeed-*.whl >/dev/null 2>&1; then
    # Built without its ops (DS_BUILD_OPS=0), against this machine's torch only for setup's version checks.
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "$(pin deepspeed)"
fi
ls -1 "$DIR"
du -sh "$DIR"
