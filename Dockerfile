# One image for serve and the learner. CPU by default; the PyPI torch wheel carries its own CUDA
# libraries, so the same image uses a GPU when run with the NVIDIA container runtime. For a CUDA
# base image instead: --build-arg BASE_IMAGE=<a CUDA image with Python 3.11>.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy
RUN pip install --no-cache-dir uv

WORKDIR /app
# Dependencies first, so code changes do not re-download torch.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-dev --no-install-project
COPY kto_loop kto_loop
COPY serve serve
COPY ingest ingest
COPY learner learner
COPY registry registry
RUN uv sync --locked --no-dev

RUN useradd --create-home --uid 10001 kto && mkdir -p /data && chown kto /data
USER kto
ENV PATH=/app/.venv/bin:$PATH KTO_DATA_DIR=/data KTO_HOST=0.0.0.0 KTO_PORT=8000
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["kto-loop", "serve"]
