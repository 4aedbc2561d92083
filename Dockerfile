# One image for every widget-identity process. The command picks the role:
#   serve token-issuance | session-resolution | history | all   (HTTP API on $PORT)
#   consume history                                              (merge consumer)
#   migrate                                                      (schema, then exit 0)
# deploy/ runs one Deployment per role from this same image.
#
# Build:  docker build -t widget-identity:$(git rev-parse --short HEAD) .
# Pin PYTHON_IMAGE to a digest in CI for reproducible builds.
ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: resolve and install into a self-contained venv -----------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# Same path as in the runtime stage: a venv's scripts hard-code their interpreter path.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Everything the build backend needs; .dockerignore keeps tests, deploy/ and local state out.
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services

# Every dependency ships manylinux wheels for CPython 3.11 (asyncpg, hiredis, cryptography,
# msgspec, uvloop), so no compiler is needed even here. If one ever has to be built from
# source, apt-get install build-essential in this stage only.
# Non-editable install: the package (with its SQL migrations as package data) lands in
# site-packages and /src is not needed at run time. pip byte-compiles while installing, so
# the read-only root filesystem at run time costs nothing. The import runs from / so that it
# loads the installed copy, not /src: it proves the wheel is complete.
RUN pip install . \
 && test -x /opt/venv/bin/widget-identity \
 && cd / && python -c "import services.cli"

# --- runtime: interpreter + venv, nothing else -------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PORT=8080

# Numeric uid/gid 10001: Kubernetes' runAsNonRoot can only verify a numeric USER, and the
# manifests pin runAsUser: 10001 to match. No home directory, no login shell.
RUN groupadd --system --gid 10001 widget \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin widget

COPY --from=builder /opt/venv /opt/venv

# A neutral, writable working directory (Kubernetes mounts an emptyDir at /tmp).
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080

# The app handles SIGTERM itself (readiness 503 at once, drain within SHUTDOWN_TIMEOUT), and
# exec-form ENTRYPOINT makes it PID 1 so it receives the signal directly.
ENTRYPOINT ["widget-identity"]
CMD ["serve", "all"]
