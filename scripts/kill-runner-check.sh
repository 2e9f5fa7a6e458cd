#!/usr/bin/env bash
# By-hand crash check: start the hosts (debug builds) on a scratch database
# and scratch queues, place N orders, kill -9 the runner while they are in
# flight, restart it, wait until every order is terminal, and check that each
# order got exactly one payment decision and at most one notification of each
# type. Real payment delay (5 s) and success rate (0.5); the processing
# timeout is shortened so expiry is seen within a minute.
#
#   scripts/kill-runner-check.sh [ORDERS]      (default 200)
set -euo pipefail
cd "$(dirname "$0")/.."
orders=${1:-200}
run=$(date +%s)
db="order_saga_check_$run"
port=$((20000 + RANDOM % 10000))
base="http://127.0.0.1:$port"
logs=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # The run's queues (its exchange stays: rabbitmqctl cannot delete one).
  for q in $(rabbitmqctl -q list_queues name 2>/dev/null | grep "^check\.$run\."); do
    rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
}
trap cleanup EXIT

cargo build -q -p hosts --bins
psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE $db"
export APP_CONFIG_DIR=$PWD/configuration
export APP__DATABASE__URL="postgres://postgres@127.0.0.1:5432/$db"
export APP__RABBITMQ__EXCHANGE="check.$run.events" APP__RABBITMQ__QUEUE_PREFIX="check.$run"
export APP__API__LISTEN="127.0.0.1:$port" APP__API__PUBLIC_URL="$base"
export APP__EXPIRATION__PROCESSING_TIMEOUT_SECONDS=20 APP__EXPIRATION__SWEEP_INTERVAL_SECONDS=2
export NO_COLOR=1
bin=${CARGO_TARGET_DIR:-target}/debug

start() { "$bin/$1" >>"$logs/$1.log" 2>&1 & pids+=($!); echo $!; }
start api >/dev/null
until curl -sf "$base/health" >/dev/null; do sleep 0.2; done
runner=$(start runner)
start scheduler >/dev/null

email="check-$run@example.com"
curl -sf -X POST "$base/api/users" -H 'content-type: application/json' \
  -d "{\"name\":\"Check\",\"email\":\"$email\",\"password\":\"check-password\"}" >/dev/null
token=$(curl -sf -X POST "$base/api/auth/login" -H 'content-type: application/json' \
  -d "{\"email\":\"$email\",\"password\":\"check-password\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
place() { # place <from> <to>
  for i in $(seq "$1" "$2"); do
    curl -sf -X POST "$base/api/orders" -H "authorization: Bearer $token" -H 'content-type: application/json' \
      -d "{\"items\":[{\"product_id\":$((1 + i % 4)),\"quantity\":1}]}" >/dev/null
  done
}
sql() { psql -h 127.0.0.1 -U postgres -d "$db" -Atc "$1"; }
statuses() { sql "SELECT string_agg(status || '=' || n, ' ') FROM (SELECT status, count(*) n FROM orders GROUP BY status ORDER BY status) s"; }
half=$((orders / 2))
echo "placing $orders orders; the runner is killed after $half"
place 1 "$half"
echo "before kill: $(statuses)"
kill -9 "$runner"
echo "runner $runner killed with SIGKILL"
place $((half + 1)) "$orders"
echo "while down:  $(statuses)"
start runner >/dev/null
echo "runner restarted"
deadline=$((SECONDS + 120))
until [ "$(sql "SELECT count(*) FROM orders WHERE status IN ('pending','processing')")" = 0 ]; do
  if ((SECONDS > deadline)); then echo "FAIL: orders still open after 120 s" >&2; exit 1; fi
  sleep 1
done
# Notifications are written by the notifications consumer just after.
until [ "$(sql "SELECT count(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM notifications n WHERE n.order_id = o.id AND n.event_type = CASE o.status WHEN 'completed' THEN 'OrderCompleted' ELSE 'OrderExpired' END)")" = 0 ]; do
  if ((SECONDS > deadline)); then echo "FAIL: terminal notifications missing" >&2; exit 1; fi
  sleep 1
done
echo "final:       $(sql "SELECT string_agg(status || '=' || n, ' ') FROM (SELECT status, count(*) n FROM orders GROUP BY status ORDER BY status) s")"
decided=$(sql "SELECT count(DISTINCT correlation_id) FROM saga_transitions WHERE trigger = 'PaymentDecided' AND outcome = 'applied'")
twice=$(sql "SELECT count(*) FROM (SELECT correlation_id FROM saga_transitions WHERE trigger = 'PaymentDecided' AND outcome = 'applied' GROUP BY correlation_id HAVING count(*) > 1) d")
dupes=$(sql "SELECT count(*) FROM (SELECT order_id, event_type FROM notifications GROUP BY 1, 2 HAVING count(*) > 1) d")
terminal_events=$(sql "SELECT count(*) FROM (SELECT correlation_id FROM saga_outbox WHERE message_type IN ('OrderCompleted','OrderExpired') GROUP BY 1 HAVING count(*) > 1) d")
emails=$(grep -c 'FAKE E-MAIL' "$logs/runner.log" || true)
completed=$(sql "SELECT count(*) FROM orders WHERE status = 'completed'")
echo "orders with a payment decision: $decided of $orders; decided twice: $twice"
echo "(order, event) pairs with two notifications: $dupes; orders with two terminal events: $terminal_events"
echo "fake e-mails logged: $emails for $completed completed orders"
echo "runner log: $(grep -c 'resubscrib\|reconnect' "$logs/runner.log" || true) reconnect lines; logs in $logs"
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE $db WITH (FORCE)" >/dev/null
[ "$decided" = "$orders" ] && [ "$twice" = 0 ] && [ "$dupes" = 0 ] && [ "$terminal_events" = 0 ]
echo "PASS"
