# Sourced by dev.sh and test.sh: a virtual environment in .venv with derpbox installed
# (editable) and the extras named in $DERPBOX_EXTRAS. Debian and Ubuntu refuse pip outside
# one (PEP 668). It sees the system's site-packages, so what the system already has is
# not downloaded again.
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        # Debian splits venv's pip bootstrap out of python3.
        if [ "$(id -u)" = 0 ]; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv >/dev/null \
                || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv; }
        else
            echo "derpbox: python3 cannot make a virtual environment; install it first: sudo apt install python3-venv" >&2
            exit 1
        fi
    fi
    python3 -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".${DERPBOX_EXTRAS:+[$DERPBOX_EXTRAS]}"
export PATH="$PWD/$VENV/bin:$PATH"
