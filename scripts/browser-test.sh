#!/usr/bin/env bash
# Browser test: Swagger UI in headless Chromium (Debian's chromium package,
# driven by playwright-core from npm; no browser is downloaded). Starts the
# api on a fresh database, then tests/browser/swagger.mjs opens /swagger,
# authorizes with a user's token, places an order with "Try it out" and
# expects 201. Screenshot: target/browser/swagger-order-201.png.
#
#   scripts/browser-test.sh
#
# Installs what it needs: chromium with apt-get when /usr/bin/chromium is
# missing (needs root), the npm packages of tests/browser.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$PWD/target/browser
mkdir -p "$OUT"
log() { echo "browser-test.sh: $*" >&2; }

CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [[ ! -x $CHROMIUM ]]; then
  log "installing Debian's chromium"
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
"$CHROMIUM" --version 2>/dev/null || true

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  log "node and npm are needed (apt-get install nodejs npm)"
  exit 1
fi
log "installing npm packages of tests/browser"
(cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)

# shellcheck source=scripts/api-under-test.sh
source scripts/api-under-test.sh

log "driving Swagger UI at $BASE/swagger"
BASE_URL="$BASE" TOKEN="$USER_TOKEN" SCREENSHOT="$OUT/swagger-order-201.png" CHROMIUM="$CHROMIUM" \
  node tests/browser/swagger.mjs
