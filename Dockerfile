# One image for every pulse_exports service in docker-compose.yml: the migration job, the Dagster
# code server, webserver and daemon differ only in their command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/home

WORKDIR /opt/dagster/app

# Only what `pip install .` and the services read, so the host's .venv and .git stay out of the image.
COPY pyproject.toml README.md ./
COPY pulse_exports ./pulse_exports
RUN pip install .
COPY workspace.yaml ./
COPY deploy/docker/workspace.yaml ./deploy/docker/workspace.yaml

# The production instance config (PostgreSQL storage, run queue limits); the embedded demo never reads it.
COPY dagster.yaml ${DAGSTER_HOME}/dagster.yaml

# Run as a non-root user; DAGSTER_HOME/storage (compute logs) is a volume shared by the Dagster services.
RUN useradd --system --uid 1000 --no-create-home --home-dir /opt/dagster dagster \
    && mkdir -p ${DAGSTER_HOME}/storage \
    && chown -R dagster ${DAGSTER_HOME}
USER dagster
