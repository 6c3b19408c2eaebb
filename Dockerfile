# The candle stream gateway as a container image.
#
#   docker build -t candle-gateway:0.1.0 .          (or podman build)
#   docker run --rm -p 8080:8080 -p 9090:9090 -e GATEWAY_SERVER_HOST=0.0.0.0 \
#       -e GATEWAY_REDIS_URL=redis://redis:6379/0 candle-gateway:0.1.0
#
# Configured by GATEWAY_* variables alone (docs/OPERATIONS.md); arguments after
# the image name are added to `candle-gateway serve` (e.g. `--workers auto`).
# BASE is any Debian-like image with python3 (>= 3.11) and its venv module;
# tests/test_image.py builds this file on a local bookworm base made with
# debootstrap, where public images cannot be pulled.
ARG BASE=python:3.11-slim-bookworm

# -- requirements: what the package needs at run time, from setup.cfg alone ------
# A stage of its own, so that the dependency layer below changes only when
# install_requires does (not with the test tools in setup.cfg's extras).
FROM ${BASE} AS requirements
COPY setup.cfg /tmp/setup.cfg
RUN python3 -c "import configparser; c = configparser.ConfigParser(); c.read('/tmp/setup.cfg'); \
print('\n'.join(r.strip() for r in c['options']['install_requires'].splitlines() if r.strip()))" \
    > /requirements.txt

# -- build: the dependencies, then the package's wheel, into a venv ------------
FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/candle-gateway
WORKDIR /src
COPY --from=requirements /requirements.txt ./
# The dependencies (and what builds the wheel) first: this layer is reused
# until install_requires changes, and a change of code only rebuilds the wheel.
RUN /opt/candle-gateway/bin/pip install --requirement requirements.txt "setuptools>=68" wheel
# The package's sources: setup.cfg, pyproject.toml, README.md and gateway/, all
# that .dockerignore lets in, in one layer.
COPY . ./
# One wheel, installed without touching the dependencies above; pip,
# setuptools and wheel then leave the venv, which the final stage copies.
RUN /opt/candle-gateway/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
    && /opt/candle-gateway/bin/pip install --no-deps /wheels/candle_gateway-*.whl \
    && /opt/candle-gateway/bin/pip uninstall --yes pip setuptools wheel \
    && find /opt/candle-gateway -name '__pycache__' -prune -exec rm -rf {} + \
    && /opt/candle-gateway/bin/python -m compileall -q /opt/candle-gateway/lib

# -- the image: the base, a user and the venv; no compiler, no pip, no tests ---
FROM ${BASE}
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin candle-gateway
ENV PATH=/opt/candle-gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_SERVER_HOST=0.0.0.0
# Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
# server.port (the streams) and metrics.port (/metrics, never routed publicly).
EXPOSE 8080 9090
# Exec form: SIGTERM from the runtime reaches the gateway, which drains (docs/OPERATIONS.md, "Shutdown").
ENTRYPOINT ["candle-gateway", "serve"]
# Last, so that everything above stays cached when only the code changed. Owned by
# root and not writable by the user that runs it.
COPY --from=build /opt/candle-gateway /opt/candle-gateway
