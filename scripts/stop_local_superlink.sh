#!/usr/bin/env bash
# Stop the background local SuperLink that `flwr run` started for your FLWR_HOME, by its process id.
#
#   scripts/stop_local_superlink.sh            # FLWR_HOME, default ~/.flwr
#
# `flwr run` in simulation leaves a local SuperLink running and every later `flwr run` uses it
# with the environment it was first started with (FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION,
# FLWR_LOG_LEVEL, the folder its simulated ClientApps import code from). This finds the one
# whose --log-file lies in your FLWR_HOME (the path `flwr run` gives it) and stops that process
# id only; unlike `pkill -f flower-superlink` it never touches another user's or checkout's
# SuperLink on a shared machine. The next `flwr run` starts a fresh one.
set -euo pipefail
home=${FLWR_HOME:-$HOME/.flwr}
if [[ ! -d $home ]]; then
  echo "no Flower home at $home; nothing to stop" >&2
  exit 0
fi
# flwr writes FLWR_HOME into --log-file as given; also accept its absolute forms.
homes=("${home%/}" "$(cd "$home" && pwd)" "$(cd "$home" && pwd -P)")
pids=()
while read -r pid args; do
  [[ $args == *flower-superlink* ]] || continue
  for h in "${homes[@]}"; do
    if [[ $args == *" --log-file $h/local-superlink/superlink.log"* ]]; then
      pids+=("$pid")
      break
    fi
  done
done < <(ps -ww -eo pid=,args=)  # -ww: whole command lines, whatever COLUMNS says
if [[ ${#pids[@]} -eq 0 ]]; then
  echo "no local SuperLink of $home is running"
  exit 0
fi
for pid in "${pids[@]}"; do
  kill "$pid" 2>/dev/null || true
done
for _ in $(seq 50); do
  alive=()
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
  [[ ${#alive[@]} -eq 0 ]] && break
  sleep 0.2
done
for pid in "${alive[@]:-}"; do
  [[ -n $pid ]] && kill -9 "$pid" 2>/dev/null || true
done
echo "stopped the local SuperLink of $home (pid ${pids[*]})"
