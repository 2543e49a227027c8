#!/usr/bin/env bash
# The one place the Docker files take their Flower version from: the `flwr` CLI of this
# host (the project's .venv, else the one on PATH), i.e. whatever the README's set-up
# resolved. The SuperLink, SuperNode and SuperExec containers must run the same Flower as
# the CLI that talks to them, so no file in docker/ names a Flower release.
#
#   eval "$(docker/env.sh)"                     # export FLWR_VERSION and the image names
#   docker compose -f docker/compose.yml up -d  # (or docker-compose -f ...)
#
# demo.sh and build_image.sh source this file. It sets, unless already set:
#   FLWR              the flwr CLI (.venv/bin/flwr, else `command -v flwr`)
#   FLWR_VERSION      its version, e.g. 1.42.0
#   FEDPRIME_IMAGE    fedprime-superexec:latest
#   SUPERLINK_IMAGE   flwr/superlink:$FLWR_VERSION
#   SUPERNODE_IMAGE   flwr/supernode:$FLWR_VERSION
#   BASE_IMAGE        flwr/superexec:$FLWR_VERSION (base of the app image)
#   FEDPRIME_PYTHON   the Python next to that CLI

_fp_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${FLWR:-}" ]; then
    if [ -x "$_fp_root/.venv/bin/flwr" ]; then FLWR="$_fp_root/.venv/bin/flwr"; else FLWR=$(command -v flwr || true); fi
fi
if [ -z "${FEDPRIME_PYTHON:-}" ]; then
    if [ -n "$FLWR" ] && [ -x "$(dirname "$FLWR")/python" ]; then
        FEDPRIME_PYTHON="$(dirname "$FLWR")/python"
    else
        FEDPRIME_PYTHON=$(command -v python3 || true)
    fi
fi
if [ -z "${FLWR_VERSION:-}" ] && [ -n "$FLWR" ]; then
    FLWR_VERSION=$("$FLWR" --version 2>/dev/null | sed -n 's/^Flower version: *//p')
fi
if [ -z "${FLWR_VERSION:-}" ]; then
    echo "docker/env.sh: no flwr CLI found (looked in $_fp_root/.venv/bin and on PATH); run the" \
        "README's set-up first, or set FLWR_VERSION to the Flower release the images should run" >&2
    FLWR_VERSION=""
fi
FEDPRIME_IMAGE=${FEDPRIME_IMAGE:-fedprime-superexec:latest}
SUPERLINK_IMAGE=${SUPERLINK_IMAGE:-flwr/superlink:$FLWR_VERSION}
SUPERNODE_IMAGE=${SUPERNODE_IMAGE:-flwr/supernode:$FLWR_VERSION}
BASE_IMAGE=${BASE_IMAGE:-flwr/superexec:$FLWR_VERSION}
unset _fp_root

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    # Executed: print the exports for `eval`.
    [ -n "$FLWR_VERSION" ] || exit 1
    for _v in FLWR_VERSION FEDPRIME_IMAGE SUPERLINK_IMAGE SUPERNODE_IMAGE BASE_IMAGE; do
        printf 'export %s=%q\n' "$_v" "${!_v}"
    done
else
    export FLWR FLWR_VERSION FEDPRIME_IMAGE SUPERLINK_IMAGE SUPERNODE_IMAGE BASE_IMAGE FEDPRIME_PYTHON
fi
