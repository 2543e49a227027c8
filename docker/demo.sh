#!/usr/bin/env bash
# FedPrime multi-client demo on Flower's Deployment Runtime with Docker Compose.
#
#   docker/demo.sh [--tls] [--gpu] [--no-build] [--keep] [--kill-site] [--clean]
#
# Prepares three site folders and the server's held-out folder on this host (the embedded
# dataset, or DEMO_DATASET_DIR, split by `python -m fedprime_core.data.prepare split` with
# label skew and the per-site missing mixtures of docker/missing-table.yaml applied to the
# files), builds the app image, starts a SuperLink, its ServerApp executor and three
# SuperNodes with their ClientApp executors (docker/compose.yml; each executor mounts only
# its own site folder), runs a small FedPrime federation on them with
# `flwr run . <connection>`, waits for it to finish, prints the results and tears the stack
# down (also when anything fails).
#
#   --tls       TLS between SuperNodes / ServerApp executor / flwr CLI and the SuperLink
#               (docker/compose.tls.yml; certificates from docker/gen_certs.sh)
#   --gpu       one GPU per ClientApp executor (docker/compose.gpu.yml; needs the NVIDIA
#               container toolkit and a CUDA build of torch in the image, see docker/Dockerfile)
#   --no-build  use the existing $FEDPRIME_IMAGE
#   --keep      leave the stack running (stop it with the `down` command printed at the end)
#   --kill-site kill site 3 (its SuperNode and ClientApp executor) once round 1 is done and
#               leave it down: the federation carries on with the two other sites (the run
#               has 3 rounds then); the demo sets min-available-nodes=2 and node-wait=120
#   --clean     also delete the model-cache volume at teardown (kept by default, so that a
#               second demo does not prepare the backbone again)
#
# Environment (optional)
#   FLWR_VERSION          Flower release of the images; default: the flwr installed on this
#                         host (docker/env.sh), so the containers match the `flwr` CLI
#   BASE_IMAGE            base of the app image; default flwr/superexec:$FLWR_VERSION if it can
#                         be pulled, else fedprime-base:local (made by docker/make_base_image.sh)
#   FEDPRIME_IMAGE        app image tag, default fedprime-superexec:latest
#   DEMO_RUN_CONFIG       extra run-config overrides, e.g. 'num-server-rounds=5 method="pfpt"'
#   DEMO_TIMEOUT          seconds to wait for the run, default 1800
#   FEDPRIME_RESULTS_DIR  where results land on this host, default docker/.build/results
#   FEDPRIME_SITES_DIR    where the site folders are prepared, default docker/.build/sites
#   DEMO_DATASET_DIR      a dataset folder to split into the sites instead of the embedded
#                         one (jsonl or arrow layout), read as DEMO_DATASET (default food101)
#   DEMO_LABEL_ALPHA      label skew across the sites (Dirichlet), default 1.0
#   FEDPRIME_CACHE_SEED   a host folder of already prepared models (a FEDPRIME_CACHE, e.g.
#                         ~/.cache/fedprime) copied into the shared model cache first, so
#                         model-init finds the model there instead of preparing it again
#   COMPOSE_PROJECT_NAME  default fedprime-demo
#
# The last line printed on success is `RESULTS <folder>`.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TLS=0 GPU=0 BUILD=1 KEEP=0 KILL_SITE=0 CLEAN=0
for arg in "$@"; do
    case "$arg" in
        --tls) TLS=1 ;;
        --gpu) GPU=1 ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        --kill-site) KILL_SITE=1 ;;
        --clean) CLEAN=1 ;;
        -h | --help)
            sed -n '2,45p' "$0"
            exit 0
            ;;
        *)
            echo "unknown option $arg (see --help)" >&2
            exit 2
            ;;
    esac
done

# Image choices the user made; the rest is derived from the host's flwr (docker/env.sh).
USER_BASE_IMAGE=${BASE_IMAGE:-} USER_SUPERLINK_IMAGE=${SUPERLINK_IMAGE:-} USER_SUPERNODE_IMAGE=${SUPERNODE_IMAGE:-}
unset BASE_IMAGE SUPERLINK_IMAGE SUPERNODE_IMAGE
# shellcheck source=env.sh
. "$HERE/env.sh"
if [ -z "$FLWR" ] || [ -z "$FLWR_VERSION" ]; then
    echo "the flwr CLI is needed on this host: run the README's set-up (pip install -e .)" >&2
    exit 1
fi
PY=$FEDPRIME_PYTHON
OFFICIAL_BASE=$BASE_IMAGE
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-fedprime-demo}
export FEDPRIME_RESULTS_DIR=${FEDPRIME_RESULTS_DIR:-$HERE/.build/results}
export FEDPRIME_SITES_DIR=${FEDPRIME_SITES_DIR:-$HERE/.build/sites}
DEMO_TIMEOUT=${DEMO_TIMEOUT:-1800}
T0=$(date +%s)
stamp() { echo "[demo $(($(date +%s) - T0))s] $*"; }

if ! docker info >/dev/null 2>&1; then
    echo "no Docker engine is reachable (docker info failed). Start one first" \
        "(on a machine without one: sudo docker/local-engine.sh start)." >&2
    exit 1
fi
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
else
    echo "neither 'docker compose' nor 'docker-compose' is installed" >&2
    exit 1
fi

# ------------------------------------------------------------------ site data
# Every site gets its own folder, the way real sites hold their data; each container mounts
# only its own. The mixtures of docker/missing-table.yaml are applied to the files.
DEMO_DATASET=${DEMO_DATASET:-food101}
if [ -z "${DEMO_DATASET_DIR:-}" ]; then
    DEMO_DATASET_DIR="$HERE/.build/foodtoy"
    stamp "writing the embedded dataset to $DEMO_DATASET_DIR"
    "$PY" -m fedprime_core.data.prepare export-embedded --out "$DEMO_DATASET_DIR" --force \
        --num-train 600 --num-dev 100 --num-test 200 >/dev/null
fi
stamp "preparing 3 site folders and the server's held-out folder in $FEDPRIME_SITES_DIR"
"$PY" -m fedprime_core.data.prepare split --dataset "$DEMO_DATASET" --dataset-dir "$DEMO_DATASET_DIR" \
    --num-sites 3 --out "$FEDPRIME_SITES_DIR" --force --label-alpha "${DEMO_LABEL_ALPHA:-1.0}" \
    --missing-table "$HERE/missing-table.yaml"
chmod -R a+rX "$FEDPRIME_SITES_DIR" # the containers read as uid 49999 (Flower's `app` user)

# ------------------------------------------------------------------ images
have_image() { docker image inspect "$1" >/dev/null 2>&1; }
pullable() { have_image "$1" || docker pull -q "$1" >/dev/null 2>&1; }

if [ "$BUILD" = 1 ] || ! have_image "$FEDPRIME_IMAGE"; then
    BASE_IMAGE=$USER_BASE_IMAGE
    if [ -z "$BASE_IMAGE" ]; then
        if pullable "$OFFICIAL_BASE"; then
            BASE_IMAGE=$OFFICIAL_BASE
        else
            BASE_IMAGE=fedprime-base:local
            stamp "$OFFICIAL_BASE cannot be pulled (no registry?); using the local base $BASE_IMAGE"
            have_image "$BASE_IMAGE" || bash "$HERE/make_base_image.sh" "$BASE_IMAGE"
        fi
    fi
    export BASE_IMAGE
    stamp "building $FEDPRIME_IMAGE from $BASE_IMAGE"
    bash "$HERE/build_image.sh" "$FEDPRIME_IMAGE"
fi
# SuperLink and SuperNodes: Flower's images where they can be had, else the app image
# (it holds the same flwr; compose.yml sets the entrypoints explicitly).
SUPERLINK_IMAGE=$USER_SUPERLINK_IMAGE SUPERNODE_IMAGE=$USER_SUPERNODE_IMAGE
if [ -z "$SUPERLINK_IMAGE" ]; then
    if pullable "flwr/superlink:$FLWR_VERSION"; then SUPERLINK_IMAGE="flwr/superlink:$FLWR_VERSION"; else SUPERLINK_IMAGE=$FEDPRIME_IMAGE; fi
fi
if [ -z "$SUPERNODE_IMAGE" ]; then
    if pullable "flwr/supernode:$FLWR_VERSION"; then SUPERNODE_IMAGE="flwr/supernode:$FLWR_VERSION"; else SUPERNODE_IMAGE=$FEDPRIME_IMAGE; fi
fi
export SUPERLINK_IMAGE SUPERNODE_IMAGE
stamp "images (flwr $FLWR_VERSION): app $FEDPRIME_IMAGE, superlink $SUPERLINK_IMAGE, supernode $SUPERNODE_IMAGE"

# ------------------------------------------------------------------ stack
FILES=(-f "$HERE/compose.yml")
if [ "$TLS" = 1 ]; then
    [ -f "$HERE/certs/ca.crt" ] || bash "$HERE/gen_certs.sh"
    FILES+=(-f "$HERE/compose.tls.yml")
fi
[ "$GPU" = 1 ] && FILES+=(-f "$HERE/compose.gpu.yml")
compose() { "${COMPOSE[@]}" "${FILES[@]}" "$@"; }

SUPERLINK_PORT=${SUPERLINK_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export SUPERLINK_PORT
mkdir -p "$FEDPRIME_RESULTS_DIR"
chmod a+rwx "$FEDPRIME_RESULTS_DIR" # the containers write as uid 49999 (Flower's `app` user)
FLWR_HOME=$(mktemp -d "${TMPDIR:-/tmp}/fedprime-demo-flwr.XXXXXX")
export FLWR_HOME FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
LOGS="$FLWR_HOME/logs"
mkdir -p "$LOGS"

cleanup() {
    rc=$?
    set +e
    if [ "$KEEP" = 1 ] && [ "$rc" = 0 ]; then
        echo "stack left running; the flwr connection to it is kept in $FLWR_HOME:"
        echo "  FLWR_HOME=$FLWR_HOME $FLWR ls fedprime-docker"
        [ -n "${RUN_ID:-}" ] && echo "  FLWR_HOME=$FLWR_HOME $FLWR log $RUN_ID fedprime-docker --show"
        echo "stop it with (add -v to delete the model cache too):"
        echo "  COMPOSE_PROJECT_NAME=$COMPOSE_PROJECT_NAME ${COMPOSE[*]} ${FILES[*]} down && rm -rf $FLWR_HOME"
    else
        compose logs --no-color >"$LOGS/compose.log" 2>&1
        if [ "$rc" != 0 ]; then
            echo "---- last container logs ----" >&2
            tail -60 "$LOGS/compose.log" >&2
        fi
        # The model-cache volume stays unless --clean: a second demo finds the backbone prepared.
        if [ "$CLEAN" = 1 ]; then
            stamp "tearing down (and deleting the model-cache volume)"
            compose down -v --remove-orphans >/dev/null 2>&1
        else
            stamp "tearing down (the model-cache volume is kept; --clean deletes it)"
            compose down --remove-orphans >/dev/null 2>&1
        fi
    fi
    if [ -n "${RUN_DIR:-}" ] && [ -d "$RUN_DIR" ]; then
        cp "$LOGS"/* "$RUN_DIR/" 2>/dev/null
    fi
    # --keep: the connection stays usable for flwr ls / flwr log against the kept stack.
    if [ "$KEEP" != 1 ] || [ "$rc" != 0 ]; then
        rm -rf "$FLWR_HOME"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "${FEDPRIME_CACHE_SEED:-}" ]; then
    stamp "seeding the shared model cache from $FEDPRIME_CACHE_SEED"
    # As root: the host's cache may be readable by its owner only; the copy goes to uid 49999.
    compose run --rm -u 0 -v "$(cd "$FEDPRIME_CACHE_SEED" && pwd):/seed:ro" --entrypoint sh model-init -c \
        'cd /seed && for d in */; do if [ -f "$d/model.safetensors" ]; then cp -r "$d" /cache/fedprime/; fi; done
         chown -R 49999:49999 /cache && ls /cache/fedprime'
fi
stamp "preparing the shared model cache (model-init)"
compose run --rm model-init
stamp "starting the stack (SuperLink on 127.0.0.1:$SUPERLINK_PORT)"
compose up -d

# The flwr CLI's connection to this SuperLink, in a private FLWR_HOME.
{
    echo '[superlink]'
    echo 'default = "fedprime-docker"'
    echo
    echo '[superlink.fedprime-docker]'
    echo "address = \"127.0.0.1:$SUPERLINK_PORT\""
    if [ "$TLS" = 1 ]; then
        echo "root-certificates = \"$HERE/certs/ca.crt\""
    else
        echo 'insecure = true'
    fi
} >"$FLWR_HOME/config.toml"

json_field() { "$PY" -c "import json,sys
text = sys.stdin.read()
start = text.find('{')
data = json.loads(text[start:]) if start >= 0 else {}
print(eval(sys.argv[1], {'d': data}))" "$1"; }

stamp "waiting for 3 SuperNodes"
for i in $(seq 1 120); do
    online=$("$FLWR" supernode ls fedprime-docker --format json 2>/dev/null |
        json_field "sum(n.get('status') == 'online' for n in d.get('nodes', []))" 2>/dev/null || echo 0)
    [ "$online" -ge 3 ] && break
    if [ "$i" = 120 ]; then
        echo "only $online of 3 SuperNodes came online within 240 s" >&2
        exit 1
    fi
    sleep 2
done
stamp "$online SuperNodes online"

RUN_NAME="docker-demo-$(date +%Y%m%d-%H%M%S)"
# The sites' data is already incomplete (missing-setting "none": used as it is); the server
# evaluates on its own held-out folder, mounted at /data in its container.
# min-available-nodes below the 3 sites and a bounded node-wait: a site that goes down does
# not hold the two others up (see --kill-site).
ROUNDS=2
[ "$KILL_SITE" = 1 ] && ROUNDS=3
RUN_CONFIG="num-server-rounds=$ROUNDS max-test-samples=200 tau=8 kappa=2 min-available-nodes=2 node-wait=120.0"
RUN_CONFIG+=" dataset=\"$DEMO_DATASET\" data-dir=\"/data\" missing-setting=\"none\""
[ "$DEMO_DATASET_DIR" = "$HERE/.build/foodtoy" ] && RUN_CONFIG+=" text-max-length=24"
RUN_CONFIG+=" results-dir=\"/results\" run-name=\"$RUN_NAME\""
extra=()
[ -n "${DEMO_RUN_CONFIG:-}" ] && extra=(--run-config "$DEMO_RUN_CONFIG")
stamp "flwr run . fedprime-docker --run-config '$RUN_CONFIG'${DEMO_RUN_CONFIG:+ --run-config '$DEMO_RUN_CONFIG'}"
cd "$ROOT"
"$FLWR" run . fedprime-docker --run-config "$RUN_CONFIG" "${extra[@]}" --format json >"$LOGS/flwr-run.json"
RUN_ID=$(json_field "d['run-id']" <"$LOGS/flwr-run.json")
stamp "run $RUN_ID started; waiting for it to finish (flwr ls)"
RUN_T0=$(date +%s)
status=""
KILLED=0
done_rounds() {
    compose exec -T superexec-serverapp cat "/results/$RUN_NAME/checkpoint.json" 2>/dev/null |
        json_field "d.get('round', 0)" 2>/dev/null || echo 0
}
while :; do
    if [ "$KILL_SITE" = 1 ] && [ "$KILLED" = 0 ] && [ "$(done_rounds)" -ge 1 ]; then
        stamp "round 1 done: killing site 3 (supernode-3 and superexec-clientapp-3); it stays down"
        compose kill supernode-3 superexec-clientapp-3 >/dev/null
        KILLED=1
    fi
    status=$("$FLWR" ls fedprime-docker --run-id "$RUN_ID" --format json 2>/dev/null |
        json_field "d['runs'][0]['status']" 2>/dev/null || echo unknown)
    case "$status" in finished*) break ;; esac
    if [ $(($(date +%s) - RUN_T0)) -gt "$DEMO_TIMEOUT" ]; then
        echo "run $RUN_ID did not finish within $DEMO_TIMEOUT s (status: $status)" >&2
        "$FLWR" stop "$RUN_ID" fedprime-docker >/dev/null 2>&1 || true
        exit 1
    fi
    sleep 5
done
RUN_SECONDS=$(($(date +%s) - RUN_T0))
"$FLWR" log "$RUN_ID" fedprime-docker --show >"$LOGS/flwr-log.txt" 2>&1 || true
stamp "run $RUN_ID: $status after $RUN_SECONDS s"

RUN_DIR="$FEDPRIME_RESULTS_DIR/$RUN_NAME"
# The ServerApp writes as uid 49999 (Flower's `app` user): hand the run folder to whoever ran
# the demo, so that it can be read and deleted without sudo.
compose exec -T -u 0 superexec-serverapp chown -R "$(id -u):$(id -g)" "/results/$RUN_NAME" >/dev/null 2>&1 ||
    compose exec -T superexec-serverapp chmod -R a+rwX "/results/$RUN_NAME" >/dev/null 2>&1 || true
if [ "$status" != "finished:completed" ] || [ ! -f "$RUN_DIR/summary.md" ]; then
    echo "run $RUN_ID ended as '$status'; ServerApp log:" >&2
    tail -40 "$LOGS/flwr-log.txt" >&2
    exit 1
fi

echo
cat "$RUN_DIR/summary.md"
echo
"$PY" - "$RUN_DIR" <<'EOF'
import json
import sys
from pathlib import Path

run = Path(sys.argv[1])
clients = json.loads((run / "clients.json").read_text())
print("| site | train rows | complete | text-missing (real) | image-missing (real) | skipped rows | last round |")
print("|---|---|---|---|---|---|---|")
for key in sorted(clients):
    c = clients[key]
    print(
        f"| {c.get('client-id', key)} | {c['num-train']} | {c.get('complete', 0)} "
        f"| {c.get('text-missing', 0)} ({c.get('real-text-missing', 0)}) "
        f"| {c.get('image-missing', 0)} ({c.get('real-image-missing', 0)}) "
        f"| {c.get('skipped-no-modality', 0)} | {c.get('last-round', '')} |"
    )
rounds = [r for r in json.loads((run / "metrics.json").read_text()) if r.get("round", 0) > 0]
print()
print("accepted client updates per round:", ", ".join(f"round {r['round']}: {r.get('accepted')}" for r in rounds))
EOF
echo
stamp "done: build+stack+run in $(($(date +%s) - T0)) s (federation $RUN_SECONDS s)"
echo "RESULTS $RUN_DIR"
