#!/usr/bin/env bash
# Make a local stand-in for Flower's base image where no image registry is reachable.
#
#   docker/make_base_image.sh [TAG]        # default TAG: fedprime-base:local
#
# With a registry you do not need this: docker/Dockerfile builds FROM flwr/superexec:$FLWR_VERSION (docker/env.sh).
# Without one, this script
#   1. makes sure a Docker engine answers (docker/local-engine.sh start: Debian's docker.io),
#   2. debootstraps a Debian bookworm root file system with Python 3.11, pip and venv,
#   3. lays it out like Flower's images (a virtualenv at /python/venv first on PATH, a
#      non-root user `app` with uid 49999 and home /app, WORKDIR /app, ENTRYPOINT
#      flower-superexec) and
#   4. `docker import`s it as TAG.
# Flower itself is not in this base; docker/Dockerfile installs flwr==$FLWR_VERSION
# (a no-op on the official base, which already has it).
#
# The root file system is built under $FEDPRIME_DOCKER_STATE (default /tmp/fedprime-docker)
# and deleted after the import. Needs root (debootstrap, chroot) and Debian's package mirror.
# FORCE=1 rebuilds an existing TAG.
set -euo pipefail

TAG=${1:-fedprime-base:local}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
STATE_DIR=${FEDPRIME_DOCKER_STATE:-/tmp/fedprime-docker}
HERE=$(cd "$(dirname "$0")" && pwd)

if [ "$(id -u)" != 0 ]; then
    echo "make_base_image.sh needs root (debootstrap and chroot)" >&2
    exit 1
fi

bash "$HERE/local-engine.sh" start

# One build at a time: a second caller waits, then finds the image made (two debootstraps
# into one root file system destroy each other).
mkdir -p "$STATE_DIR"
exec 9>"$STATE_DIR/make_base_image.lock"
flock 9

if docker image inspect "$TAG" >/dev/null 2>&1 && [ "${FORCE:-0}" != 1 ]; then
    echo "$TAG already exists (FORCE=1 rebuilds it)"
    exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

ROOTFS="$STATE_DIR/rootfs-$SUITE"
cleanup() {
    # debootstrap mounts proc/sys inside the root file system; never rm through a mount.
    for m in proc sys dev/pts dev; do
        mountpoint -q "$ROOTFS/$m" 2>/dev/null && umount -l "$ROOTFS/$m" || true
    done
    rm -rf "$ROOTFS"
}
trap cleanup EXIT
cleanup
mkdir -p "$STATE_DIR"

start=$(date +%s)
echo "debootstrap $SUITE into $ROOTFS (a few minutes) ..."
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,libsqlite3-0 \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$STATE_DIR/debootstrap.log" 2>&1 || {
    tail -30 "$STATE_DIR/debootstrap.log" >&2
    exit 1
}

# Flower's layout: /python/venv (owned by app), user app (uid 49999, home /app).
chroot "$ROOTFS" /bin/sh -euc '
    python3 -m venv /python/venv
    useradd --no-create-home --home-dir /app -c "" --uid 49999 app
    mkdir -p /app
    chown -R app:app /app /python/venv
    apt-get clean
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log /usr/share/doc/* /usr/share/man/*
'
for m in proc sys dev/pts dev; do
    mountpoint -q "$ROOTFS/$m" && umount -l "$ROOTFS/$m" || true
done

echo "docker import $TAG ..."
tar -C "$ROOTFS" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/python/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONIOENCODING=UTF-8 LANG=C.UTF-8 LC_ALL=C.UTF-8 HOME=/app' \
    --change 'WORKDIR /app' \
    --change 'USER app' \
    --change 'ENTRYPOINT ["flower-superexec"]' \
    - "$TAG" >/dev/null
echo "made $TAG in $(( $(date +%s) - start )) s: $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
