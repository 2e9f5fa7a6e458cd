# Sourced by scripts/browser-test.sh and scripts/console-browser-test.sh:
# makes sure Debian's chromium is there (installs it with apt-get when
# /usr/bin/chromium is missing; needs root or sudo) and installs the npm
# packages of tests/browser (playwright-core; no browser is downloaded).
# Sets CHROMIUM. Needs log() from the sourcing script.

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
