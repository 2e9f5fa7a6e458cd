# Sourced by scripts/schemathesis.sh and scripts/browser-test.sh: builds the
# api binary and starts it on a free port against a fresh database (dropped
# on exit), then registers a user. Sets BASE, API_PID, USER_TOKEN,
# ADMIN_TOKEN; the api's log is "$OUT/api.log".
#
# Needs: OUT (a folder), PostgreSQL at DATABASE_URL's server (default
# 127.0.0.1:5432, user postgres), python3, curl, cargo. RabbitMQ is not
# needed: the api keeps its outbox rows and nothing is published.

DB_SERVER=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB_SERVER=${DB_SERVER%/*}

log "building the api"
cargo build --quiet --bin api
API_BIN=${CARGO_TARGET_DIR:-target}/debug/api

DB_NAME="api_test_$(date +%s)_$$"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"
psql_admin() { psql "$DB_SERVER/postgres" -v ON_ERROR_STOP=1 -q -c "$1" >/dev/null; }
psql_admin "CREATE DATABASE \"$DB_NAME\""
API_PID=
stop_api() {
  if [[ -n $API_PID ]]; then
    kill "$API_PID" 2>/dev/null || true
    wait "$API_PID" 2>/dev/null || true
  fi
  psql_admin "DROP DATABASE IF EXISTS \"$DB_NAME\" WITH (FORCE)" || true
}
trap stop_api EXIT

ADMIN_PASSWORD="admin-$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
log "starting the api on $BASE (database $DB_NAME, log $OUT/api.log)"
APP__API__LISTEN="127.0.0.1:$PORT" \
APP__API__PUBLIC_URL="$BASE" \
APP__DATABASE__URL="$DB_SERVER/$DB_NAME" \
APP__RABBITMQ__URL="amqp://guest:guest@127.0.0.1:1/%2f" \
APP__RABBITMQ__CONNECT_RETRY_SECONDS=1 \
APP__LOGGING__FILTER="warn,hosts=info" \
APP__SEED__ADMIN_EMAIL=admin@example.com \
APP__SEED__ADMIN_PASSWORD="$ADMIN_PASSWORD" \
  "$API_BIN" >"$OUT/api.log" 2>&1 &
API_PID=$!

deadline=$((SECONDS + 60))
until curl -fsS "$BASE/health" >/dev/null 2>&1; do
  if ! kill -0 "$API_PID" 2>/dev/null; then
    log "the api exited; its log:"
    cat "$OUT/api.log" >&2
    exit 1
  fi
  if ((SECONDS >= deadline)); then
    log "the api did not answer /health within 60 s"
    exit 1
  fi
  sleep 0.2
done

login() { # login <email> <password>: prints a bearer token
  curl -fsS -XPOST "$BASE/api/auth/login" -H 'content-type: application/json' \
    -d "{\"email\":\"$1\",\"password\":\"$2\"}" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])'
}
USER_EMAIL="tester-$$@example.com"
USER_PASSWORD="tester-password-$$"
curl -fsS -XPOST "$BASE/api/users" -H 'content-type: application/json' \
  -d "{\"name\":\"Tester\",\"email\":\"$USER_EMAIL\",\"password\":\"$USER_PASSWORD\"}" >/dev/null
USER_TOKEN=$(login "$USER_EMAIL" "$USER_PASSWORD")
ADMIN_TOKEN=$(login admin@example.com "$ADMIN_PASSWORD")
