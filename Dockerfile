# patchwork-bridge: one image for every role (producer, webhook, run) and the demo helpers.
#
#   docker build -t patchwork-bridge .
#   docker run --rm -e BRIDGE_AMQP_URL=... -e BRIDGE_PATCHWORK_URL=... patchwork-bridge producer
#
# The builder installs the package and its dependencies into a virtualenv; the final stage
# copies only that virtualenv onto a clean slim base, so no compiler, pip cache or source
# tree ends up in the image. Every dependency ships manylinux wheels: no build tools needed.

FROM python:3.11-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
# Only what the wheel needs (see .dockerignore): tests and deploy files stay out.
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/patchwork-bridge --version

FROM python:3.11-slim
LABEL org.opencontainers.image.title="patchwork-bridge" \
      org.opencontainers.image.description="Polls Patchwork's events API once; fans events out over RabbitMQ and signed webhooks." \
      org.opencontainers.image.licenses="GPL-2.0-or-later"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BRIDGE_STATE_DIR=/var/lib/patchwork-bridge

# A fixed numeric uid/gid, so volumes and Kubernetes' runAsNonRoot see the same user.
RUN groupadd --system --gid 10001 bridge \
    && useradd --system --uid 10001 --gid bridge --no-create-home \
       --home-dir /var/lib/patchwork-bridge --shell /usr/sbin/nologin bridge \
    && install -d -o bridge -g bridge -m 0750 /var/lib/patchwork-bridge

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /var/lib/patchwork-bridge
# The producer's cursor lives here; a new named volume inherits the bridge user's ownership.
VOLUME ["/var/lib/patchwork-bridge"]

# /metrics, /healthz and /readyz (BRIDGE_HTTP_PORT); the event stream (BRIDGE_STREAM_PORT).
EXPOSE 9464 9470
# No curl in slim images: python's urllib fails the check on any non-2xx or timeout.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('BRIDGE_HTTP_PORT', '9464'), timeout=4)"]

ENTRYPOINT ["patchwork-bridge"]
CMD ["run"]
