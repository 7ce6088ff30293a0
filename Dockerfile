# syntax=docker/dockerfile:1
# The code-location image: the curation_assets package with the `cluster` extra (dagster-postgres,
# dagster-celery, dagster-k8s, redis). The same image serves the code server, the run workers and
# the step pods the K8sRunLauncher and k8s_job_executor start, and the celery workers
# (deploy/README.md).
#
#   docker build -t REGISTRY/curation-assets:TAG .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t ...:TAG-cpu .
#
# TORCH_INDEX_URL: empty (default) installs torch and torchvision from PyPI; on Linux x86_64 those
# wheels carry the CUDA runtime (several GB) and run on CPU-only nodes too. Set it to a CPU-only
# index (https://download.pytorch.org/whl/cpu) for a much smaller image without GPU support; torch
# and torchvision then both come from that index, so their compiled ops match.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=""

# DAGSTER_HOME: the Helm chart's dagsterHome (run and step pods mount the instance ConfigMap there).
# CURATION_HOME: the local cache of objects staged from the store (cache.folder); mount a volume.
# CURATION_PROJECTS: project files beside the packaged ones (a mounted ConfigMap in Kubernetes).
# HF_HUB_OFFLINE: weights are local files; nothing is fetched from the Hugging Face hub at run time.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    CURATION_HOME=/var/lib/curation \
    CURATION_PROJECTS=/etc/curation/projects \
    HF_HUB_OFFLINE=1

WORKDIR /opt/curation

# Dependencies first, in their own layer: it depends only on pyproject.toml and setup.cfg, so
# editing the code does not reinstall torch. The package itself is a placeholder here.
COPY pyproject.toml setup.cfg ./
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" torch torchvision; \
    fi \
    && mkdir -p curation_assets && touch curation_assets/__init__.py README.md \
    && pip install '.[cluster]' \
    && pip uninstall -y curation_assets \
    && rm -rf curation_assets README.md build ./*.egg-info

# The package (no dependency changes past this point).
COPY README.md ./
COPY curation_assets ./curation_assets
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
    && rm -rf build ./*.egg-info

# An unprivileged user; the folders it writes are created and owned here. In Kubernetes,
# DAGSTER_HOME is replaced by the chart's instance ConfigMap and CURATION_HOME by a volume.
RUN useradd --create-home --uid 10001 curation \
    && mkdir -p "$DAGSTER_HOME" "$CURATION_HOME" "$CURATION_PROJECTS" \
    && chown -R curation:curation "$DAGSTER_HOME" "$CURATION_HOME" /opt/curation
USER 10001

EXPOSE 4000

# A Dagster code server for the code location. No ENTRYPOINT: the Helm chart's user deployment
# passes its own `args` (dagster code-server start -h 0.0.0.0 -p <port> <codeServerArgs>), and
# run/step pods run `dagster api execute_run` / `execute_step` in this image.
CMD ["dagster", "code-server", "start", "-m", "curation_assets.definitions", "-h", "0.0.0.0", "-p", "4000"]
