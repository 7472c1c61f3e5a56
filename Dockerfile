# Autopull worker image. The same image runs the worker (the default command),
# `autopull ingest`, and the simulators (`python -m autopull.sim ...`).
#
#   docker build -t autopull:local .
#
# Stage 1 installs the hash-checked lock file and the project into a virtual
# environment. Every package in requirements.lock has a manylinux wheel, and
# PIP_ONLY_BINARY makes the build fail rather than compile one, so neither
# stage needs a compiler.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ONLY_BINARY=:all:

RUN python -m venv /opt/autopull

COPY requirements.lock /src/requirements.lock
RUN /opt/autopull/bin/pip install --require-hashes -r /src/requirements.lock

COPY pyproject.toml README.md /src/
COPY streams /src/streams
COPY connectors /src/connectors
COPY schemas /src/schemas
COPY sim /src/sim
RUN /opt/autopull/bin/pip install --no-deps --no-build-isolation /src

# The lock file also pins the `dev` extra of pyproject.toml (test, lint and
# build tools). The ones no runtime dependency needs are removed here, and
# `pip check` fails the build if one was needed after all. pip itself goes
# last. tests/integration/test_deploy.py checks this list against the `dev`
# extra: cryptography, for one, stays because msal and google-auth need it.
RUN /opt/autopull/bin/pip uninstall --yes \
        pytest pytest-asyncio pytest-timeout hypothesis ruff mypy types-PyYAML \
        kubernetes-validate \
        setuptools wheel \
    && /opt/autopull/bin/pip check \
    && /opt/autopull/bin/pip uninstall --yes pip


FROM ${PYTHON_IMAGE}

# A fixed numeric user, so that Kubernetes can verify runAsNonRoot and volume
# ownership can be set with fsGroup. /data is where docker-compose.yml mounts
# its volumes; /app/.cache holds the table stores of a container started
# without AUTOPULL_DATA_DIR (the default data_dir is .cache/worker).
RUN groupadd --system --gid 10001 autopull \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /app --shell /usr/sbin/nologin autopull \
    && mkdir -p /app/.cache /data \
    && chown 10001:10001 /app/.cache /data

COPY --from=build /opt/autopull /opt/autopull
COPY examples /app/examples

# Byte code is compiled at install time. With a read-only root file system,
# Python must not try to write more of it at run time. No AUTOPULL_* variable
# is set here, because the environment overrides the YAML settings file.
ENV PATH=/opt/autopull/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app
USER 10001:10001

# The worker's web server: REST API, /metrics, /livez and /readyz. It binds
# 127.0.0.1 unless AUTOPULL_WEB_HOST says otherwise (0.0.0.0 in a container
# that other containers or probes must reach).
EXPOSE 6066

ENTRYPOINT ["autopull"]
CMD ["worker"]
