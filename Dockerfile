# One image for serve and the learner: `kto-loop serve` by default, `kto-loop learn` for the
# learner (`kto-loop up` runs both, on the embedded default).
#
#   docker build -t kto-loop .                                                      CPU
#   docker build -t kto-loop:cuda --build-arg BASE_IMAGE=nvidia/cuda:13.2.0-base-ubuntu24.04 .
#
# torch follows the base image. On a CUDA base (nvidia/cuda images set CUDA_VERSION) the image
# installs exactly uv.lock: PyPI's Linux torch wheel, which ships its own CUDA 13 libraries as
# nvidia-* wheels, so the small `base` flavour of nvidia/cuda is enough and the driver comes
# from the host (NVIDIA Container Toolkit). On a CPU base those libraries (several GB with triton)
# would never run, so the CPU image takes the same torch version from PyTorch's CPU wheel index
# and every other package exactly as locked. TORCH_CPU_INDEX= (empty) takes the locked wheel on
# a CPU base too: for a builder that reaches only PyPI, or one image for CPU and GPU hosts.
ARG BASE_IMAGE=python:3.11-slim-bookworm
# uv installs the locked environment at build time; the image itself keeps no uv.
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

FROM ${BASE_IMAGE}
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG PYTHON_VERSION=3.11
# Bytecode is compiled at build time (the app user cannot write it at run time). A base without
# Python (nvidia/cuda) gets uv's own CPython build, installed where the app user can read it.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy \
    UV_PYTHON=${PYTHON_VERSION} UV_PYTHON_INSTALL_DIR=/opt/python

WORKDIR /app
# Dependencies first, so that a code change does not reinstall torch.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv \
    --mount=type=cache,target=/root/.cache/uv \
    set -eu; \
    if [ -n "${CUDA_VERSION:-}" ] || [ -z "${TORCH_CPU_INDEX}" ]; then \
        uv sync --locked --no-dev --no-install-project; \
    else \
        uv export --locked --no-dev --no-emit-project --no-hashes --no-annotate --no-header \
            -o /tmp/locked.txt; \
        torch="$(grep -E '^torch==' /tmp/locked.txt | cut -d' ' -f1)"; \
        [ -n "$torch" ] || { echo "no torch pin in uv.lock" >&2; exit 1; }; \
        grep -vE '^(torch==|triton==|nvidia-|cuda-)' /tmp/locked.txt > /tmp/cpu.txt; \
        uv venv .venv; \
        uv pip install --no-deps --index-url "${TORCH_CPU_INDEX}" "$torch"; \
        uv pip install --no-deps -r /tmp/cpu.txt; \
        rm /tmp/locked.txt /tmp/cpu.txt; \
    fi
COPY kto_loop kto_loop
COPY serve serve
COPY ingest ingest
COPY learner learner
COPY registry registry
# The project itself, without touching the dependencies; `pip check` proves the set is whole.
RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv \
    --mount=type=cache,target=/root/.cache/uv \
    uv pip install --no-deps . && uv pip check

RUN useradd --create-home --uid 10001 kto && mkdir -p /data && chown kto /data
USER kto
# HF_HOME on the data volume: a hub model is downloaded once, not on every container start.
# KTO_AUTH=api-key: a container listens on every interface, where only a verified credential
# may name a user (header mode there needs KTO_TRUSTED_PROXIES; see docs/auth.md).
ENV PATH=/app/.venv/bin:$PATH KTO_DATA_DIR=/data KTO_HOST=0.0.0.0 KTO_PORT=8000 \
    HF_HOME=/data/huggingface KTO_AUTH=api-key
VOLUME /data
EXPOSE 8000
# Liveness of `kto-loop serve` on KTO_PORT. The learner answers /healthz on its own port
# (KTO_METRICS_PORT): its container overrides this check (deploy/docker-compose.yml does).
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KTO_PORT', '8000'), timeout=2)"
CMD ["kto-loop", "serve"]
