# syntax=docker/dockerfile:1
# gla-serve image. GPU (default):   docker build -t gla-serve .
#                  CPU variant:     docker build --build-arg VARIANT=cpu -t gla-serve:cpu .
# Run: docker run --gpus all -p 8000:8000 gla-serve    (settings via GLA_* env vars, see docs/operations.md)
ARG VARIANT=cuda

# Both bases ship Python 3.12. torch's CUDA wheels bring their own CUDA libraries; the CUDA runtime
# base adds the driver-facing pieces and matches what NVIDIA's container toolkit expects.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS base-cuda
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

FROM ubuntu:24.04 AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# The tag is the chosen base stage above (hadolint cannot resolve the build argument).
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ARG DEBIAN_FRONTEND=noninteractive
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# Triton compiles a small launcher with the C compiler and Python headers at run time, so gcc and
# python3-dev stay in the final image. Distro versions track the base image's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM base AS build
ARG TORCH_VERSION=2.13.0
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kernels/ kernels/
COPY model/ model/
COPY server/ server/
# Non-editable install: the package, its bundled model (package data) and triton from PyPI.
RUN pip install . && python -c "import server, model, kernels, torch, triton"

FROM base AS runtime
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin gla
COPY --from=build /opt/venv /opt/venv
# Triton's kernel cache must be writable; on Kubernetes an emptyDir is mounted here.
ENV TRITON_CACHE_DIR=/home/gla/.triton \
    GLA_HOST=0.0.0.0 \
    GLA_PORT=8000
USER 10001:10001
WORKDIR /home/gla
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('GLA_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["gla-serve", "serve"]
