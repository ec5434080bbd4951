# derpbox: a Tailscale-compatible DERP relay.
#   docker build -t derpbox .
#   docker run -e DERP_DOMAIN=derp.example.com -p 443:443 -p 80:80 -p 3478:3478/udp \
#     --sysctl net.ipv4.ip_unprivileged_port_start=0 -v derpbox:/var/lib/derpbox derpbox
# The server runs as UID/GID 10001; ports 443 and 80 need the sysctl above
# (set in compose/*.yml), or map them to high ports and set DERP_ADDR/DERP_HTTP_PORT.
# The base is a build argument so an offline CI can build on a local Debian image
# (tests/container.py); the public default is what everyone else gets.
ARG BASE=python:3.11.11-slim-bookworm
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies and package first; the entrypoint changes more often.
COPY pyproject.toml README.md ./
COPY derpbox ./derpbox
RUN python3 -m pip install --no-cache-dir . \
    && groupadd --system --gid 10001 derpbox \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/derpbox \
       --no-create-home --shell /usr/sbin/nologin derpbox \
    && mkdir -p /var/lib/derpbox/certs \
    && chown -R 10001:10001 /var/lib/derpbox \
    && chmod 0700 /var/lib/derpbox

COPY entrypoint.py /app/entrypoint.py

# The node key and the certificates (and ACME account) live in the volume, so a
# re-created container keeps its identity; entrypoint.py lets an alias such as
# DERP_KEY_FILE or CERT_DIR replace these defaults.
ENV HOME=/var/lib/derpbox \
    DERP_CONFIG_PATH=/var/lib/derpbox/derper.key \
    DERP_CERT_DIR=/var/lib/derpbox/certs
VOLUME ["/var/lib/derpbox"]

EXPOSE 443/tcp 80/tcp 3478/udp

USER 10001:10001

# Through the entrypoint so DERP_EXTRA_ARGS applies to the check as to the server.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python3", "/app/entrypoint.py", "healthcheck"]

# Exec form; entrypoint.py execs derpbox, which is then PID 1 and receives SIGTERM.
ENTRYPOINT ["python3", "/app/entrypoint.py"]
