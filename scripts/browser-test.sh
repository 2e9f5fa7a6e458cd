#!/usr/bin/env bash
# Browser test: Swagger UI in headless Chromium (Debian's chromium package,
# driven by playwright-core from npm; no browser is downloaded). Starts the
# api on a fresh database, then tests/browser/swagger.mjs opens /swagger,
# authorizes with a user's token, places an order with "Try it out" and
# expects 201. Screenshot: target/browser/swagger-order-201.png.
#
#   scripts/browser-test.sh
#
# Installs what it needs (scripts/browser-setup.sh): chromium with apt-get
# when /usr/bin/chromium is missing (needs root), the npm packages of
# tests/browser. The operator console has its own browser test,
# scripts/console-browser-test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$PWD/target/browser
mkdir -p "$OUT"
log() { echo "browser-test.sh: $*" >&2; }

# shellcheck source=scripts/browser-setup.sh
source scripts/browser-setup.sh

# shellcheck source=scripts/api-under-test.sh
source scripts/api-under-test.sh

log "driving Swagger UI at $BASE/swagger"
BASE_URL="$BASE" TOKEN="$USER_TOKEN" SCREENSHOT="$OUT/swagger-order-201.png" CHROMIUM="$CHROMIUM" \
  node tests/browser/swagger.mjs
