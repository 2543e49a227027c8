#!/usr/bin/env bash
# Build the FedPrime app image (docker/Dockerfile) from a minimal staged context.
#
#   docker/build_image.sh [TAG]             # default TAG: $FEDPRIME_IMAGE or fedprime-superexec:latest
#
# Environment
#   FLWR_VERSION      default: the flwr installed on this host (docker/env.sh)
#   BASE_IMAGE        default flwr/superexec:$FLWR_VERSION; e.g. fedprime-base:local (make_base_image.sh)
#   TORCH_SPEC        default torch==2.13.0
#   TORCH_INDEX_URL   default https://download.pytorch.org/whl/cpu, or empty when
#                     PIP_FROM_HOST=1 (pip's own index and find-links, as on the host)
#   PIP_FROM_HOST     1: replicate this host's pip settings in the build (index URL, extra
#                     http(s) indexes, CA bundle, local find-links wheels, proxy); default
#                     1 when BASE_IMAGE is not Flower's official image, else 0
#   DOCKER_BUILD_NETWORK  network of the build containers (default host: pip then reaches
#                     the index exactly as pip on this host does)
#
# The context (docker/.build/context, git-ignored) holds only what the image needs:
# pyproject.toml, README.md, the three packages and the staged pip settings (docker/pip/).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=env.sh
. "$ROOT/docker/env.sh"
[ -n "$FLWR_VERSION" ] || exit 1
TAG=${1:-$FEDPRIME_IMAGE}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
case "$BASE_IMAGE" in
    flwr/*) PIP_FROM_HOST=${PIP_FROM_HOST:-0} ;;
    *) PIP_FROM_HOST=${PIP_FROM_HOST:-1} ;;
esac
if [ "$PIP_FROM_HOST" = 1 ]; then
    TORCH_INDEX_URL=${TORCH_INDEX_URL-}
else
    TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
fi
PYTHON=${PYTHON_FOR_PIP:-$FEDPRIME_PYTHON}

CTX="$ROOT/docker/.build/context"
rm -rf "$CTX"
mkdir -p "$CTX/docker/pip"
cp "$ROOT/docker/pip/README.md" "$CTX/docker/pip/"
cp "$ROOT/pyproject.toml" "$ROOT/README.md" "$CTX/"
for pkg in fedprime_core fedprime_protocol server_app client_app; do
    (cd "$ROOT" && find "$pkg" -name '*.py' -o -name '*.json' -o -name '*.yaml' -o -name '*.txt') |
        grep -v __pycache__ | while read -r f; do
            mkdir -p "$CTX/$(dirname "$f")"
            cp "$ROOT/$f" "$CTX/$f"
        done
done
cp "$ROOT/docker/Dockerfile" "$CTX/docker/Dockerfile"
# The dependency list alone, so that the image's heavy layer is reused until it changes
# (pyproject.toml also holds the run-config table, which changes far more often).
"$PYTHON" -c '
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print("\n".join(d.replace("flwr[simulation]", "flwr") for d in deps))
' "$ROOT/pyproject.toml" >"$CTX/docker/pip/requirements.txt"

if [ "$PIP_FROM_HOST" = 1 ]; then
    # Replicate how pip reaches the package index on this host.
    PIP_DIR="$CTX/docker/pip"
    mkdir -p "$PIP_DIR/wheels"
    "$PYTHON" - "$PIP_DIR" <<'EOF'
import os
import shutil
import subprocess
import sys
from pathlib import Path

out = Path(sys.argv[1])
listing = subprocess.run(
    [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
).stdout
config: dict[str, str] = {}
for line in listing.splitlines():
    key, _, value = line.partition("=")
    name = key.split(".", 1)[-1]
    config.setdefault(name, value.strip().strip("'\""))  # the first (highest-priority) wins
for name in ("index-url", "extra-index-url", "find-links", "cert", "proxy", "trusted-host"):
    env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
    if env:
        config[name] = env

lines = ["[global]"]
if config.get("index-url", "").startswith(("http://", "https://")):
    lines.append(f"index-url = {config['index-url']}")
extra = [u for u in config.get("extra-index-url", "").split() if u.startswith(("http://", "https://"))]
if extra:
    lines.append("extra-index-url = " + " ".join(extra))
cert = config.get("cert") or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
if not cert:
    try:
        import certifi

        cert = certifi.where()
    except ImportError:
        cert = "/etc/ssl/certs/ca-certificates.crt"
if cert and Path(cert).is_file():
    shutil.copyfile(cert, out / "ca.crt")
    lines.append("cert = /tmp/pip-build/ca.crt")
wheels = 0
for link in config.get("find-links", "").split():
    path = Path(link.removeprefix("file://"))
    if path.is_dir():
        for wheel in sorted(path.glob("*.whl")):
            target = out / "wheels" / wheel.name
            try:
                os.link(wheel, target)
            except OSError:
                shutil.copyfile(wheel, target)
            wheels += 1
lines.append("find-links = /tmp/pip-build/wheels")
for name in ("proxy", "trusted-host"):
    if config.get(name):
        lines.append(f"{name} = {config[name]}")
(out / "pip.conf").write_text("\n".join(lines) + "\n")
print(f"pip settings from this host: {len(lines) - 1} settings, {wheels} local wheel(s)", file=sys.stderr)
EOF
fi

proxy_args=()
for v in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
    [ -n "${!v-}" ] && proxy_args+=(--build-arg "$v=${!v}")
done

echo "building $TAG from $BASE_IMAGE (flwr $FLWR_VERSION, torch: $TORCH_SPEC${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}) ..."
start=$(date +%s)
docker build \
    --network "${DOCKER_BUILD_NETWORK:-host}" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --build-arg "FLWR_VERSION=$FLWR_VERSION" \
    --build-arg "TORCH_SPEC=$TORCH_SPEC" \
    --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" \
    "${proxy_args[@]}" \
    -f "$CTX/docker/Dockerfile" -t "$TAG" "$CTX"
elapsed=$(( $(date +%s) - start ))
size=$(docker image inspect -f '{{.Size}}' "$TAG")
echo "built $TAG in ${elapsed} s; image size $(awk -v s="$size" 'BEGIN{printf "%.0f MB", s/1e6}')"
rm -rf "$CTX"
