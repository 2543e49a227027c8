#!/usr/bin/env bash
# Start one FedPrime SuperNode (one client, one GPU): a site with its own data, or a shard.
#
#   scripts/start_supernode.sh --superlink HOST:PORT --data-dir DIR [--client-id NAME] \
#       [--gpu K] [--device cpu|cuda|auto] [--port 9094] [--ca DIR/ca.crt] [--key KEYFILE]
#   scripts/start_supernode.sh --superlink HOST:PORT --partition-id PID --num-partitions N [...]
#
#   --data-dir DIR     this site's own data folder (jsonl or arrow layout, see docs/datasets.md, "Sites");
#                      the client trains and validates on all of it, nothing is partitioned
#   --client-id NAME   this client's name in the results (clients.json); default: the
#                      partition id, else node-<node id>
#   --partition-id PID, --num-partitions N
#                      instead of --data-dir: serve shard PID of N of the run's data-dir
#   --gpu K            pin this client to GPU K (sets CUDA_VISIBLE_DEVICES=K); omit on CPU machines
#   --device D         this node's compute device (auto, cpu, cuda), overriding the run config
#   --port P           local port of this SuperNode's ClientApp runtime API; give every SuperNode
#                      on one host its own (9094, 9095, ...)
#   --ca FILE          verify the SuperLink's TLS certificate with this CA (omit for --insecure)
#   --key FILE         private key of this SuperNode for SuperNode authentication
#                      (register FILE.pub first: flwr supernode register FILE.pub <connection>)
#   --node-config S    extra node-config entries, appended as they are
#   --worker-socket P  where the site's resident worker listens (a Unix socket, mode 0600);
#                      default ${TMPDIR:-/tmp}/fedprime-<uid>/site-<port>.sock. The worker runs on
#                      the Python of flower-supernode (FEDPRIME_PYTHON="/path/python" overrides it)
#   --no-worker        no resident worker: every message's ClientApp process loads torch, the
#                      backbone and the data itself (slow: for debugging)
#   -- ARGS...         passed on to flower-supernode as they are (e.g. -- --max-retries 10)
#
# Flower runs each message (query, train, evaluate) in a fresh ClientApp process. Beside the
# SuperNode this script starts the site's resident worker (python -m fedprime_core.site_worker),
# which loads the backbone and the site's data once per run and does the ClientApp's work; the
# node config names its socket (site-worker=...). Both stop together.
set -euo pipefail
superlink="" pid="" n="" gpu="" port=9094 ca="" key="" extra="" data_dir="" client_id="" device=""
worker=1 socket=""
passthrough=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --superlink) superlink=$2; shift 2 ;;
    --data-dir) data_dir=$2; shift 2 ;;
    --client-id) client_id=$2; shift 2 ;;
    --partition-id) pid=$2; shift 2 ;;
    --num-partitions) n=$2; shift 2 ;;
    --gpu) gpu=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --ca) ca=$2; shift 2 ;;
    --key) key=$2; shift 2 ;;
    --node-config) extra=$2; shift 2 ;;
    --worker-socket) socket=$2; shift 2 ;;
    --no-worker) worker=0; shift ;;
    --) shift; passthrough=("$@"); break ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$superlink" ]] || { echo "need --superlink (see --help)" >&2; exit 2; }
if [[ -z "$data_dir" && ( -z "$pid" || -z "$n" ) ]]; then
  echo "need --data-dir (this site's data) or --partition-id and --num-partitions (see --help)" >&2; exit 2
fi
if [[ -n "$data_dir" ]]; then
  [[ -d "$data_dir" ]] || { echo "--data-dir $data_dir is not a folder" >&2; exit 2; }
  data_dir=$(cd "$data_dir" && pwd)  # the ClientApp runs elsewhere: pass an absolute path
  case "$data_dir$client_id" in *'"'*|*\\*) echo "--data-dir and --client-id cannot contain quotes or backslashes" >&2; exit 2 ;; esac
fi
if [[ -n "$client_id" && ! "$client_id" =~ ^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$ ]]; then
  echo "--client-id '$client_id': 1-64 ASCII letters, digits and '._-@+', starting with a letter or digit" >&2; exit 2
fi
config=()
[[ -n "$data_dir" ]] && config+=("data-dir=\"$data_dir\"")
[[ -n "$client_id" ]] && config+=("client-id=\"$client_id\"")
[[ -n "$pid" ]] && config+=("partition-id=$pid" "num-partitions=$n")
[[ -n "$device" ]] && config+=("device=\"$device\"")
[[ -n "$extra" ]] && config+=("$extra")
[[ -n "$gpu" ]] && export CUDA_VISIBLE_DEVICES=$gpu
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# Flower's SuperExec asks the SuperNode for a message to run once a second by default; a round
# waits on that poll, so ask every 0.1 s (a local call; FLWR_SUPEREXEC_TASK_POLL_INTERVAL overrides).
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL=${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.1}
if (( worker )); then
  [[ -n "$socket" ]] || socket="${TMPDIR:-/tmp}/fedprime-$(id -u)/site-$port.sock"
  case "$socket" in /*) ;; *) socket="$PWD/$socket" ;; esac
  case "$socket" in *'"'*|*\\*|*' '*) echo "--worker-socket cannot contain quotes, backslashes or spaces" >&2; exit 2 ;; esac
  mkdir -p "$(dirname "$socket")" && chmod 700 "$(dirname "$socket")"
  # The worker runs on the Python that runs flower-supernode (FEDPRIME_PYTHON overrides it).
  read -r -a python <<< "${FEDPRIME_PYTHON:-}"
  if (( ${#python[@]} == 0 )); then
    shebang=$(head -n 1 "$(command -v flower-supernode)" 2>/dev/null || true)
    case "$shebang" in '#!'*python*) read -r -a python <<< "${shebang#\#!}" ;; *) python=(python3) ;; esac
  fi
  "${python[@]}" -m fedprime_core.site_worker --socket "$socket" --parent-pid $$ &
  worker_pid=$!
  trap 'kill "$worker_pid" 2>/dev/null || true' EXIT
  for _ in $(seq 300); do  # it binds its socket before importing torch: a second or two
    [[ -S "$socket" ]] && break
    kill -0 "$worker_pid" 2>/dev/null || { echo "the site worker did not start (see above)" >&2; exit 1; }
    sleep 0.2
  done
  [[ -S "$socket" ]] || { echo "the site worker did not create $socket within 60 s" >&2; exit 1; }
  config+=("site-worker=\"$socket\"")
fi
args=(--superlink "$superlink" --port "$port" --node-config "${config[*]}")
if [[ -n "$ca" ]]; then args+=(--root-certificates "$ca"); else args+=(--insecure); fi
[[ -n "$key" ]] && args+=(--auth-supernode-private-key "$key")
if (( ! worker )); then
  exec flower-supernode "${args[@]}" "${passthrough[@]}"
fi
# The SuperNode runs as a child so that the worker can be stopped with it; a signal to this
# script reaches the SuperNode, which then exits, and the EXIT trap stops the worker.
flower-supernode "${args[@]}" "${passthrough[@]}" &
node_pid=$!
trap 'kill -TERM "$node_pid" 2>/dev/null || true' TERM INT HUP
status=0
wait "$node_pid" || status=$?
while kill -0 "$node_pid" 2>/dev/null; do wait "$node_pid" || status=$?; done
exit "$status"
