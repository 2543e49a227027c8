#!/usr/bin/env bash
# Start a FedPrime SuperLink (Flower 1.42) with only the Fleet API open to the sites.
#
#   scripts/start_superlink.sh [--port 9092] [--host 0.0.0.0] [--control-port 9093] \
#       [--certs DIR] [--auth] [--state FILE] [--expose-control-api]
#
#   --port P, --host H  where the sites' SuperNodes connect (their --superlink H:P): the Fleet
#                       API only, through fedprime_core/tools/fleet_gate.py
#   --control-port C    the SuperLink itself (Control, Runtime and Fleet APIs), on 127.0.0.1:C
#                       only; `flwr run`/`ls`/`stop`/`supernode register` connect here, on this
#                       machine or through an SSH tunnel (ssh -N -L C:127.0.0.1:C server)
#   --certs DIR         serve TLS with DIR/ca.crt, DIR/server.pem, DIR/server.key (scripts/gen_certs.sh)
#   --auth              only SuperNodes registered with `flwr supernode register` may connect (needs --certs)
#   --state FILE        keep the SuperLink state in a SQLite file (survives a SuperLink restart)
#   --expose-control-api  no gate: the SuperLink itself on H:P, Control API included (Flower's
#                       default; anyone who reaches H:P can register nodes and start runs)
#
# Without --certs both run without TLS (plain HTTP): for a trusted network or a demo only.
set -euo pipefail
port=9092 host=0.0.0.0 control=9093 certs="" auth=0 state="" expose=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) port=$2; shift 2 ;;
    --host) host=$2; shift 2 ;;
    --control-port) control=$2; shift 2 ;;
    --certs) certs=$2; shift 2 ;;
    --auth) auth=1; shift ;;
    --state) state=$2; shift 2 ;;
    --expose-control-api) expose=1; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
args=(--disable-runtime-dependency-installation)
if [[ $expose -eq 1 ]]; then
  args+=(--host "$host" --port "$port")
else
  [[ $port != "$control" ]] || { echo "--port and --control-port must differ" >&2; exit 2; }
  args+=(--host 127.0.0.1 --port "$control")
fi
if [[ -n "$certs" ]]; then
  for f in ca.crt server.pem server.key; do
    [[ -f "$certs/$f" ]] || { echo "missing $certs/$f; create it with scripts/gen_certs.sh $certs <hostnames>" >&2; exit 2; }
  done
  args+=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" --ssl-keyfile "$certs/server.key")
else
  [[ $auth -eq 0 ]] || { echo "--auth needs TLS: pass --certs DIR" >&2; exit 2; }
  args+=(--insecure)
fi
[[ $auth -eq 1 ]] && args+=(--enable-supernode-auth)
[[ -n "$state" ]] && args+=(--database "$state")
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# The ServerApp's SuperExec polls for a run to start once a second by default; every 0.1 s here.
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL=${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.1}
if [[ $expose -eq 1 ]]; then
  echo "WARNING: --expose-control-api: whoever reaches $host:$port can register SuperNodes, start and stop runs" >&2
  exec flower-superlink "${args[@]}"
fi
flower-superlink "${args[@]}" &
superlink=$!
gate=(--listen "$host:$port" --upstream "127.0.0.1:$control" --watch-pid "$superlink")
[[ -n "$certs" ]] && gate+=(--certs "$certs")
echo "SuperLink: Control API on 127.0.0.1:$control (this machine only); sites connect to $host:$port (Fleet API only)" >&2
"${PYTHON:-python3}" -m fedprime_core.tools.fleet_gate "${gate[@]}" &
gate_pid=$!
trap 'kill "$superlink" "$gate_pid" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
wait -n  # whichever ends first ends both
