#!/usr/bin/env bash
# A local development relay: derpbox -dev (plain HTTP on 127.0.0.1:3340, STUN on UDP
# 3478, a fresh key in memory), from the virtual environment in .venv (made on first use).
# Extra arguments go to derpbox (e.g. scripts/dev.sh -verbose).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
exec derpbox -dev "$@"
