#!/usr/bin/env bash
# The fault suite (issue 6; docs/RELIABILITY.md): the real hosts under load
# while runners and the API are killed (kill -9), RabbitMQ's connections are
# dropped and the broker is stopped and started, and PostgreSQL is restarted;
# then every order is checked (ok / lost / duplicated / unexpected).
#
# Faults restart servers, so this script starts a PRIVATE PostgreSQL cluster
# (pg_createcluster, port 25432) and a PRIVATE RabbitMQ node
# (faults@localhost, port 25682) and removes both at the end. The shared
# servers on 5432/5672 are never touched. Needs root (or the postgres and
# rabbitmq users' rights) and Debian's PostgreSQL and RabbitMQ packages.
#
#   scripts/fault-suite.sh                 short run: 1,000 orders per fault
#   scripts/fault-suite.sh --full          10,000 orders per fault
#   scripts/fault-suite.sh --orders N      N orders per fault
#   scripts/fault-suite.sh --release       release build of the hosts
#   scripts/fault-suite.sh ... -- FILTER   only the tests matching FILTER
#   scripts/fault-suite.sh --kafka         faults 1 (runner kill -9) and 5 (three
#                                          runners, two schedulers) with the hosts
#                                          on Kafka: a PRIVATE Tansu broker
#                                          (scripts/kafka-broker.sh, port 29092)
#                                          instead of the RabbitMQ node
#
# Ports and names can be changed with FAULTS_PG_PORT, FAULTS_AMQP_PORT,
# FAULTS_DIST_PORT, FAULTS_NODE, FAULTS_KAFKA_PORT (keep it below the kernel's
# ephemeral range, /proc/sys/net/ipv4/ip_local_port_range, or a client's
# local port may take it). Exits non-zero if any fault run fails.
set -euo pipefail
cd "$(dirname "$0")/.."

orders=1000
cargo_profile=()
filter=()
kafka=
while (($#)); do
  case $1 in
    --full) orders=10000 ;;
    --kafka) kafka=1 ;;
    --orders)
      orders=${2:?--orders needs a number}
      shift
      ;;
    --release) cargo_profile=(--release) ;;
    --)
      shift
      filter=("$@")
      break
      ;;
    -h | --help)
      sed -n '2,30p' "$0"
      exit 0
      ;;
    *)
      echo "fault-suite: unknown argument $1 (see --help)" >&2
      exit 2
      ;;
  esac
  shift
done
if ! [[ $orders =~ ^[1-9][0-9]*$ ]]; then
  echo "fault-suite: --orders must be a positive number, got $orders" >&2
  exit 2
fi

tools=(pg_createcluster pg_ctlcluster pg_dropcluster pg_isready)
if [[ -z $kafka ]]; then tools+=(rabbitmq-server rabbitmqctl); fi
for tool in "${tools[@]}"; do
  if ! command -v "$tool" >/dev/null; then
    echo "fault-suite: $tool not found (Debian's postgresql and rabbitmq-server packages are needed)" >&2
    exit 1
  fi
done

pg_version=$(ls /etc/postgresql | sort -V | tail -n1)
# A Kafka run has servers of its own (another cluster, port and folder), so
# it can run beside a RabbitMQ run.
pg_port=${FAULTS_PG_PORT:-$([[ -n $kafka ]] && echo 25433 || echo 25432)}
amqp_port=${FAULTS_AMQP_PORT:-25682}
dist_port=${FAULTS_DIST_PORT:-25692}
node=${FAULTS_NODE:-faults@localhost}
kafka_port=${FAULTS_KAFKA_PORT:-29092}
cluster=faults${kafka:+_kafka}
state=/tmp/order-saga-fault-suite${kafka:+-kafka}
for port in "$pg_port" "$amqp_port" "$dist_port" "$kafka_port"; do
  if [[ $port == 5432 || $port == 5672 || $port == 25672 || $port == 19092 ]]; then
    echo "fault-suite: port $port belongs to the shared servers; choose another" >&2
    exit 2
  fi
done

# The private RabbitMQ node: its own name, ports, data, logs and config (no
# plugins, so no management port clash), started through Debian's wrapper
# (which runs it as the rabbitmq user, sharing that user's Erlang cookie with
# rabbitmqctl).
export RABBITMQ_NODENAME=$node
export RABBITMQ_NODE_PORT=$amqp_port
export RABBITMQ_DIST_PORT=$dist_port
export RABBITMQ_MNESIA_BASE=$state/rabbitmq/mnesia
export RABBITMQ_LOG_BASE=$state/rabbitmq/log
export RABBITMQ_PID_FILE=$state/rabbitmq/pid
export RABBITMQ_ENABLED_PLUGINS_FILE=$state/rabbitmq/enabled_plugins
export RABBITMQ_CONFIG_FILE=$state/rabbitmq/rabbitmq.conf
export RABBITMQ_CONF_ENV_FILE=$state/rabbitmq/rabbitmq-env.conf
export ERL_EPMD_ADDRESS=127.0.0.1
rmqctl=(rabbitmqctl -q -n "$node")

kafka_broker() { # kafka_broker start|stop: the private Tansu broker
  KAFKA_PORT=$kafka_port KAFKA_BROKER_PIDFILE=$state/kafka.pid KAFKA_BROKER_LOG=$state/kafka.log \
    scripts/kafka-broker.sh "$1"
}
stop_servers() {
  if [[ -n $kafka ]]; then
    if [[ -f $state/kafka.pid ]]; then kafka_broker stop >/dev/null 2>&1 || true; fi
  else
    "${rmqctl[@]}" shutdown >/dev/null 2>&1 || true
  fi
  if pg_lsclusters -h 2>/dev/null | awk '{print $1, $2}' | grep -qx "$pg_version $cluster"; then
    pg_dropcluster --stop "$pg_version" "$cluster" >/dev/null 2>&1 || true
  fi
  rm -rf "$state"
}
test_pid=
cleanup() {
  local status=$?
  # The tests and the hosts they started run in a session of their own
  # (setsid below): if the run was interrupted, nothing of it outlives us.
  if [[ -n $test_pid ]]; then kill -KILL -- "-$test_pid" 2>/dev/null || true; fi
  if [[ -n $kafka ]]; then broker_name="Kafka broker"; else broker_name="RabbitMQ node"; fi
  echo "fault-suite: removing the private PostgreSQL cluster and $broker_name"
  stop_servers
  exit "$status"
}

wait_for() { # wait_for <seconds> <description> <command...>
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      echo "fault-suite: $what did not come up within $1 s" >&2
      return 1
    fi
    sleep 0.5
  done
}

# Idempotent: whatever an earlier (interrupted) run left is replaced.
if [[ -n $kafka ]]; then
  echo "fault-suite: starting a private PostgreSQL $pg_version cluster on port $pg_port and a Kafka broker (Tansu) on port $kafka_port"
else
  echo "fault-suite: starting a private PostgreSQL $pg_version cluster on port $pg_port and RabbitMQ node $node on port $amqp_port"
fi
stop_servers
trap cleanup EXIT
trap 'exit 130' INT TERM

pg_createcluster "$pg_version" "$cluster" -p "$pg_port" -- --auth-host=trust --auth-local=trust >/dev/null
pg_ctlcluster --skip-systemctl-redirect "$pg_version" "$cluster" start
wait_for 60 "PostgreSQL on $pg_port" pg_isready -h 127.0.0.1 -p "$pg_port" -q

if [[ -n $kafka ]]; then
  mkdir -p "$state"
  if (exec 3<>"/dev/tcp/127.0.0.1/$kafka_port") 2>/dev/null; then
    echo "fault-suite: something already listens on 127.0.0.1:$kafka_port; choose FAULTS_KAFKA_PORT" >&2
    exit 1
  fi
  kafka_broker start
else
  mkdir -p "$state/rabbitmq/mnesia" "$state/rabbitmq/log"
  : >"$state/rabbitmq/enabled_plugins"
  echo "listeners.tcp.local = 127.0.0.1:$amqp_port" >"$state/rabbitmq/rabbitmq.conf"
  {
    echo "NODENAME=$node"
    echo 'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"'
  } >"$state/rabbitmq/rabbitmq-env.conf"
  chmod 755 "$state"
  chown -R rabbitmq:rabbitmq "$state/rabbitmq"
  rabbitmq-server -detached
  # `await_startup` fails at once while the node has not registered yet.
  wait_for 120 "RabbitMQ node $node" "${rmqctl[@]}" await_startup
fi
echo "fault-suite: private servers are up"

export FAULTS_DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
export DATABASE_URL=$FAULTS_DATABASE_URL
export FAULTS_RESTART_POSTGRES="pg_ctlcluster --skip-systemctl-redirect $pg_version $cluster restart"
if [[ -n $kafka ]]; then
  export FAULTS_KAFKA_BOOTSTRAP="127.0.0.1:$kafka_port"
  export KAFKA_BOOTSTRAP=$FAULTS_KAFKA_BOOTSTRAP
  unset FAULTS_AMQP_URL FAULTS_RABBITMQCTL
  # Faults 1 and 5: the others restart RabbitMQ (3) or are RabbitMQ-only (6).
  if ((${#filter[@]} == 0)); then filter=(fault_1_ fault_5_); fi
else
  export FAULTS_AMQP_URL="amqp://guest:guest@127.0.0.1:$amqp_port/%2f"
  export AMQP_URL=$FAULTS_AMQP_URL
  export FAULTS_RABBITMQCTL="rabbitmqctl -q -n $node"
  unset FAULTS_KAFKA_BOOTSTRAP
fi
export FAULTS_ORDERS=$orders
export FAULTS_REPORT=$state/report.md
: >"$FAULTS_REPORT"

echo "fault-suite: $orders orders per fault${cargo_profile:+ (release build)}${kafka:+, hosts on Kafka}"
set +e
setsid cargo test "${cargo_profile[@]}" -p hosts --test faults -- --ignored --test-threads=1 --nocapture "${filter[@]}" &
test_pid=$!
wait "$test_pid"
status=$?
set -e

echo
echo "fault-suite: summary (${kafka:+Kafka; }$orders orders per fault; $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
echo "| fault | orders | faults | ok | lost | duplicated | unexpected | e-mails missing | client retries | load + settle |"
echo "|---|---|---|---|---|---|---|---|---|---|"
grep '^|' "$FAULTS_REPORT" || echo "(no fault run finished)"
grep -v '^|' "$FAULTS_REPORT" || true
if ((status == 0)); then
  echo "fault-suite: PASS"
else
  echo "fault-suite: FAIL (cargo test exited with $status)"
fi
exit "$status"
