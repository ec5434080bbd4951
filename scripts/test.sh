#!/usr/bin/env bash
# Installs everything the test suite drives for real, then runs it.
# Extra arguments go to pytest (e.g. scripts/test.sh -k tailcat).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null || ! command -v pebble >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    # Installing must not start the packaged services (Prometheus would take :9090).
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
    fi
    apt-get update -q
    apt-get install -y -q --no-install-recommends prometheus pebble
fi
python3 -m pip install --quiet -e '.[test]'
exec python3 -m pytest "$@"
