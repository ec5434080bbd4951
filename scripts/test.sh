#!/usr/bin/env bash
# Installs everything the test suite drives for real, then runs it.
# Extra arguments go to pytest (e.g. scripts/test.sh -k tailcat).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: Prometheus and promtool, the Pebble ACME CA, HAProxy, Nginx with
# the stream module (libnginx-mod-stream has no command, so check its module file), and
# podman with runc and mmdebstrap to build and run the image (tests/container.py), and ss
# (iproute2), which the TCP_INFO test compares against.
missing=0
for cmd in promtool prometheus pebble pebble-challtestsrv haproxy nginx podman runc mmdebstrap ss; do
    command -v "$cmd" >/dev/null || missing=1
done
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing=1
if [ "$missing" = 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    # Installing must not start the packaged services (they would take :80, :9090).
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    apt-get update -q
    apt-get install -y -q --no-install-recommends prometheus pebble haproxy nginx libnginx-mod-stream iproute2
    # With its recommends: netavark, aardvark-dns and iptables publish the containers' ports.
    apt-get install -y -q podman runc mmdebstrap
    if [ "$created_policy" = 1 ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
fi
# The tests start their own instances on loopback: the packages' services stay off at boot.
if [ "$(id -u)" = 0 ]; then
    for unit in prometheus prometheus-node-exporter haproxy nginx; do
        if command -v systemctl >/dev/null; then
            systemctl disable --quiet "$unit" 2>/dev/null || true
        fi
        if command -v update-rc.d >/dev/null && [ -e "/etc/init.d/$unit" ]; then
            update-rc.d "$unit" disable >/dev/null 2>&1 || true
        fi
    done
fi
DERPBOX_EXTRAS=test
. scripts/venv.sh
# Tailscale's own derper (built unmodified, beside the checkout) for the mesh interop tests.
if [ -z "${DERPER_BIN:-}" ] && [ -x ../shared/goref/derper ]; then
    DERPER_BIN="$(realpath ../shared/goref/derper)"
    export DERPER_BIN
fi
exec .venv/bin/python -m pytest "$@"
