#!/usr/bin/env bash
# Runs schemathesis (from PyPI, in a cached venv) against a freshly started
# api binary on a fresh database and a free port, authenticated as a newly
# registered user, with schemathesis' default checks. Exits non-zero on any
# server error or schema violation.
#
#   scripts/schemathesis.sh               # about 2-4 minutes on 2 cores
#   ST_MAX_EXAMPLES=200 scripts/schemathesis.sh
#
# Needs PostgreSQL (DATABASE_URL's server, default 127.0.0.1:5432, user
# postgres), python3 with venv, curl and cargo. RabbitMQ is not needed: the
# api keeps its outbox rows and nothing is published.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=${SCHEMATHESIS_VERSION:-4.32.5}
VENV=${SCHEMATHESIS_VENV:-$HOME/.cache/order-saga/schemathesis-venv}
MAX_EXAMPLES=${ST_MAX_EXAMPLES:-40}
DB_SERVER=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB_SERVER=${DB_SERVER%/*}
OUT=target/schemathesis
mkdir -p "$OUT"

log() { echo "schemathesis.sh: $*" >&2; }

# 1. schemathesis, installed once into a cached venv.
if ! "$VENV/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  log "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
fi
"$VENV/bin/st" --version

# (--workers 1: with several workers, hypothesis on Python 3.11 sometimes
# crashes in ast.parse, "AST constructor recursion depth mismatch".)

# 2. the api binary.
log "building the api"
cargo build --quiet --bin api
API_BIN=${CARGO_TARGET_DIR:-target}/debug/api

# 3. a fresh database and a free port.
DB_NAME="st_$(date +%s)_$$"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"
psql_admin() { psql "$DB_SERVER/postgres" -v ON_ERROR_STOP=1 -q -c "$1" >/dev/null; }
psql_admin "CREATE DATABASE \"$DB_NAME\""
API_PID=
cleanup() {
  if [[ -n $API_PID ]]; then
    kill "$API_PID" 2>/dev/null || true
    wait "$API_PID" 2>/dev/null || true
  fi
  psql_admin "DROP DATABASE IF EXISTS \"$DB_NAME\" WITH (FORCE)" || true
}
trap cleanup EXIT

ADMIN_PASSWORD="admin-$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
log "starting the api on $BASE (database $DB_NAME, log $OUT/api.log)"
APP__API__LISTEN="127.0.0.1:$PORT" \
APP__API__PUBLIC_URL="$BASE" \
APP__DATABASE__URL="$DB_SERVER/$DB_NAME" \
APP__RABBITMQ__URL="amqp://guest:guest@127.0.0.1:1/%2f" \
APP__LOGGING__FILTER="warn,hosts=info" \
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

# 4. a user, the admin, and their tokens.
login() { # login <email> <password>
  curl -fsS -XPOST "$BASE/api/auth/login" -H 'content-type: application/json' \
    -d "{\"email\":\"$1\",\"password\":\"$2\"}" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])'
}
EMAIL="schemathesis-$$@example.com"
PASSWORD="schemathesis-password"
curl -fsS -XPOST "$BASE/api/users" -H 'content-type: application/json' \
  -d "{\"name\":\"Schemathesis\",\"email\":\"$EMAIL\",\"password\":\"$PASSWORD\"}" >/dev/null
USER_TOKEN=$(login "$EMAIL" "$PASSWORD")
ADMIN_TOKEN=$(login admin@example.com "$ADMIN_PASSWORD")

# 5. two runs with the default checks, every phase, bounded examples: as a
# user over every operation, then as the admin over the operations only
# admins can use (product writes, the user list).
run() { # run <name> <token> [st options...]
  local name=$1 token=$2
  shift 2
  log "run '$name' (max $MAX_EXAMPLES examples per operation)"
  "$VENV/bin/st" run "$BASE/openapi.json" \
    --header "Authorization: Bearer $token" \
    --max-examples "$MAX_EXAMPLES" \
    --seed "${ST_SEED:-20261124}" \
    --workers 1 \
    --request-timeout 10 \
    --report junit --report-junit-path "$OUT/junit-$name.xml" \
    "$@" 2>&1 | tee "$OUT/run-$name.log"
  return "${PIPESTATUS[0]}"
}
status=0
run user "$USER_TOKEN" || status=1
run admin "$ADMIN_TOKEN" --include-tag Products --include-tag Users || status=1
if grep -q "panicked" "$OUT/api.log"; then
  log "the api panicked; see $OUT/api.log"
  status=1
fi
for name in user admin; do
  log "$name: $(grep -E '^ +[0-9]+ generated' "$OUT/run-$name.log" | tail -n1 | sed 's/^ *//')"
done
log "exit status $status (reports and the api log in $OUT)"
exit "$status"
