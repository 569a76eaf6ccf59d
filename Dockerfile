# samvad for Cloud Run. Build: `gcloud builds submit --tag IMAGE` (deploy/deploy.sh does it)
# or `docker build -t samvad .`; run locally: `docker run -p 8080:8080 -e SAMVAD_AUTH=none
# -e FIRESTORE_EMULATOR_HOST=host.docker.internal:8085 samvad`.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: a virtualenv with samvad and its runtime dependencies, nothing else ----------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INPUT=1
WORKDIR /src
RUN python -m venv /opt/venv
# Dependencies first, in their own layer: a code change does not reinstall grpcio and friends.
COPY pyproject.toml README.md ./
RUN mkdir samvad && touch samvad/__init__.py \
 && /opt/venv/bin/pip install . \
 && /opt/venv/bin/pip uninstall -y samvad
COPY samvad ./samvad
# The runtime only: no [dev] extras. pip and setuptools leave too: nothing installs at run time.
RUN /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/python -c "import samvad.app, samvad.cli, samvad.api.dashboard as d; d.dashboard_html()" \
 && /opt/venv/bin/pip uninstall -y pip setuptools

# ---- runtime: the interpreter, the virtualenv and an unprivileged user ----------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8080
RUN groupadd --system --gid 10001 samvad \
 && useradd --system --uid 10001 --gid samvad --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin samvad
COPY --from=builder /opt/venv /opt/venv
WORKDIR /tmp
USER 10001:10001
# Cloud Run sets PORT (8080 unless told otherwise); the app listens on $HOST:$PORT.
EXPOSE 8080
# Cloud Run ignores HEALTHCHECK (it uses the probes in deploy/service.yaml); docker and compose
# use it.
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/healthz', timeout=2)"]
# Exec form: python is PID 1 and gets SIGTERM itself. aiohttp's run_app handles it: in-flight
# requests get 1 s, then the write-behind flushes within SAMVAD_SHUTDOWN_FLUSH_BUDGET seconds,
# inside Cloud Run's 10 s grace period.
ENTRYPOINT ["python", "-m", "samvad"]
