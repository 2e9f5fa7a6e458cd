#!/usr/bin/env bash
# Browser test of the operator console (/console) in headless Chromium
# (Debian's chromium, driven by playwright-core; no browser download), on
# the real hosts: the api, runner and scheduler binaries on a fresh
# database, an exchange and queue prefix of their own, payments approved
# after 3 s. tests/browser/console.mjs then logs in, watches an order go
# pending -> processing -> completed without a reload (it pauses the runner
# with SIGSTOP while it places the order, so the page can show it pending,
# then lets it go on with SIGCONT), resumes a parked order, re-drives its
# dead letter (counts before and after), and checks that markup in a
# product name and an error text stays text.
#
#   scripts/console-browser-test.sh
#
# The parked order and its dead letter are made by real means: an order of
# a product named like a script is placed while no runner runs (its
# OrderCreated waits in the queue), its saga is parked (budget spent, as if
# it had failed three times), then the runner starts, refuses the message
# for the parked saga and dead-letters it.
#
# Screenshots: target/browser/console-*.png; host logs:
# target/browser/console-logs/. Needs PostgreSQL (DATABASE_URL's server,
# default 127.0.0.1:5432, user postgres), RabbitMQ at 127.0.0.1:5672
# (guest) with rabbitmqctl (to delete the run's queues; its exchange stays),
# python3, curl, psql, cargo, node and npm.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$PWD/target/browser
LOGS=$OUT/console-logs
mkdir -p "$OUT" "$LOGS"
rm -f "$OUT"/console-*.png "$LOGS"/*.log
log() { echo "console-browser-test.sh: $*" >&2; }

# shellcheck source=scripts/browser-setup.sh
source scripts/browser-setup.sh

DB_SERVER=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB_SERVER=${DB_SERVER%/*}
run="$(date +%s)_$$"
DB_NAME="console_test_$run"
PREFIX="console.$run"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
API_PORT=$(free_port)
RUNNER_PORT=$(free_port)
SCHEDULER_PORT=$(free_port)
BASE="http://127.0.0.1:$API_PORT"
psql_admin() { psql "$DB_SERVER/postgres" -v ON_ERROR_STOP=1 -q -c "$1" >/dev/null; }
sql() { psql "$DB_SERVER/$DB_NAME" -v ON_ERROR_STOP=1 -qAt "$@"; }

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # The test pauses the runner for a moment; a paused process would not exit.
  for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  psql_admin "DROP DATABASE IF EXISTS \"$DB_NAME\" WITH (FORCE)" || true
  for q in $(rabbitmqctl -q list_queues name 2>/dev/null | grep -F "$PREFIX." || true); do
    rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
}
trap cleanup EXIT

start() { # start <binary>; sets STARTED to its pid
  "$BIN/$1" >"$LOGS/$1.log" 2>&1 &
  STARTED=$!
  pids+=("$STARTED")
}
wait_until() { # wait_until <seconds> <what> <command...>
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "$what: not within the deadline; host logs in $LOGS"
      tail -n 30 "$LOGS"/*.log >&2 || true
      exit 1
    fi
    sleep 0.2
  done
}

log "building api, runner and scheduler"
cargo build --quiet --bin api --bin runner --bin scheduler
BIN=${CARGO_TARGET_DIR:-target}/debug
psql_admin "CREATE DATABASE \"$DB_NAME\""

ADMIN_EMAIL=admin@example.com
ADMIN_PASSWORD="admin-$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
export APP_CONFIG_DIR=$PWD/configuration
export APP__DATABASE__URL="$DB_SERVER/$DB_NAME"
export APP__RABBITMQ__URL="amqp://guest:guest@127.0.0.1:5672/%2f"
export APP__RABBITMQ__EXCHANGE="$PREFIX.events" APP__RABBITMQ__QUEUE_PREFIX="$PREFIX"
export APP__API__LISTEN="127.0.0.1:$API_PORT" APP__API__PUBLIC_URL="$BASE"
export APP__MONITORING__RUNNER_LISTEN="127.0.0.1:$RUNNER_PORT"
export APP__MONITORING__SCHEDULER_LISTEN="127.0.0.1:$SCHEDULER_PORT"
export APP__PAYMENT__DELAY_MS=3000 APP__PAYMENT__SUCCESS_RATE=1
export APP__OUTBOX__POLL_INTERVAL_MS=100 APP__EXPIRATION__SWEEP_INTERVAL_SECONDS=2
export APP__SEED__ADMIN_EMAIL="$ADMIN_EMAIL" APP__SEED__ADMIN_PASSWORD="$ADMIN_PASSWORD"
export APP__LOGGING__FILTER="info,sqlx=warn,lapin=warn" NO_COLOR=1

log "starting the api on $BASE (database $DB_NAME, queues $PREFIX.*)"
start api
wait_until 60 "the api answers /health" curl -fsS "$BASE/health"
TOKEN=$(curl -fsS -XPOST "$BASE/api/auth/login" -H 'content-type: application/json' \
  -d "{\"email\":\"$ADMIN_EMAIL\",\"password\":\"$ADMIN_PASSWORD\"}" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')

# Markup where data goes: a product's name and description, an error text.
PRODUCT_NAME="<script>window.__pwned='product';alert('product')</script>Keyboard"
PRODUCT_DESCRIPTION="<img src=x onerror=\"window.__pwned='description'\">"
HOSTILE_ERROR="<img src=x onerror=\"window.__pwned='error';alert('error')\"> payment provider said: <script>window.__pwned='error'</script>"
PRODUCT_ID=$(python3 -c 'import json, sys; print(json.dumps({"name": sys.argv[1], "description": sys.argv[2], "price": "2.50", "stock": 100}))' \
  "$PRODUCT_NAME" "$PRODUCT_DESCRIPTION" |
  curl -fsS -XPOST "$BASE/api/products" -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' -d @- |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
PARKED_ID=$(curl -fsS -XPOST "$BASE/api/orders" -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \
  -d "{\"items\":[{\"product_id\":$PRODUCT_ID,\"quantity\":1}]}" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
unsent() { [[ $(sql -c "SELECT count(*) FROM saga_outbox WHERE sent_at IS NULL") == 0 ]]; }
wait_until 30 "the api's relay publishes OrderCreated of order $PARKED_ID" unsent
log "order $PARKED_ID waits in $PREFIX.order-saga; parking its saga"
sql -c "UPDATE saga_instances SET faulted = true, attempts = 3, last_error = 'effect failed', updated_at = now() \
        WHERE saga_type = 'order' AND correlation_id = '$PARKED_ID'"

log "starting the runner and the scheduler"
start runner
RUNNER_PID=$STARTED
start scheduler
wait_until 60 "the runner is ready" curl -fsS "http://127.0.0.1:$RUNNER_PORT/health/ready"
dead_lettered() {
  [[ $(sql -c "SELECT count(*) FROM saga_transitions WHERE correlation_id = '$PARKED_ID' AND outcome = 'parked'") -ge 1 ]]
}
wait_until 30 "the runner refuses OrderCreated for the parked saga" dead_lettered
# The error text an operator will read (the runner wrote its own).
sql -v error="$HOSTILE_ERROR" <<SQL
UPDATE saga_instances SET last_error = :'error' WHERE saga_type = 'order' AND correlation_id = '$PARKED_ID';
SQL

log "driving the console at $BASE/console"
BASE_URL="$BASE" ADMIN_EMAIL="$ADMIN_EMAIL" ADMIN_PASSWORD="$ADMIN_PASSWORD" TOKEN="$TOKEN" \
  PARKED_ID="$PARKED_ID" RUNNER_PID="$RUNNER_PID" PRODUCT_NAME="$PRODUCT_NAME" HOSTILE_ERROR="$HOSTILE_ERROR" \
  OUT="$OUT" CHROMIUM="$CHROMIUM" \
  node tests/browser/console.mjs
