#!/usr/bin/env bash
# Start or stop a private Docker engine on a machine that has none running (no systemd).
#
#   docker/local-engine.sh start    # start dockerd in the background unless an engine answers
#   docker/local-engine.sh stop     # stop the dockerd that `start` started (by its PID), nothing else
#   docker/local-engine.sh status
#
# Only needed where no Docker engine runs (CI-like machines, this project's dev machines);
# on a workstation with Docker Desktop or a systemd-managed dockerd, skip it.
# It installs Debian's docker.io (and the docker-compose it ships) if dockerd is missing.
# State (PID file, log) lives in $FEDPRIME_DOCKER_STATE (default /tmp/fedprime-docker).
set -euo pipefail

STATE_DIR=${FEDPRIME_DOCKER_STATE:-/tmp/fedprime-docker}
PID_FILE="$STATE_DIR/dockerd.started-by-fedprime.pid"
LOG_FILE="$STATE_DIR/dockerd.log"

engine_up() { docker info >/dev/null 2>&1; }

install_engine() {
    if command -v dockerd >/dev/null 2>&1 && command -v docker >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "dockerd is not installed and this is not root: install Docker first" >&2
        exit 1
    fi
    echo "installing Debian's docker.io and docker-compose ..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        docker.io docker-compose iptables ca-certificates >/dev/null
}

start() {
    if engine_up; then
        echo "a Docker engine is already reachable; not starting another"
        return 0
    fi
    install_engine
    mkdir -p "$STATE_DIR"
    # setsid: the engine must outlive this script (and the test process that called it).
    setsid nohup dockerd --host unix:///var/run/docker.sock \
        --pidfile "$STATE_DIR/dockerd.pid" >"$LOG_FILE" 2>&1 < /dev/null &
    echo $! >"$PID_FILE"
    for _ in $(seq 1 60); do
        if engine_up; then
            echo "dockerd started (PID $(cat "$PID_FILE"), log $LOG_FILE)"
            return 0
        fi
        sleep 1
    done
    echo "dockerd did not come up within 60 s; see $LOG_FILE" >&2
    tail -20 "$LOG_FILE" >&2 || true
    exit 1
}

stop() {
    if [ ! -f "$PID_FILE" ]; then
        echo "no dockerd started by this script (no $PID_FILE); nothing to stop"
        return 0
    fi
    pid=$(cat "$PID_FILE")
    if kill -0 "$pid" 2>/dev/null && grep -q dockerd "/proc/$pid/cmdline" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 1 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "dockerd $pid did not stop in 30 s; sending SIGKILL" >&2
            kill -KILL "$pid" || true
        fi
        echo "dockerd $pid stopped"
    else
        echo "dockerd $pid is not running"
    fi
    rm -f "$PID_FILE"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status)
        if engine_up; then echo "engine reachable"; else echo "no engine"; fi
        [ -f "$PID_FILE" ] && echo "started by this script: PID $(cat "$PID_FILE")"
        true
        ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
