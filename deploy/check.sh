#!/usr/bin/env bash
# Every check of deploy/ this machine can run without Docker or Kubernetes.
# Exits non-zero if any check fails; a check that cannot run here says why.
#   deploy/check.sh [--bin PATH]   PATH: a vendgate binary of this tree, to
#                                  load the compose and k8s settings with it
#                                  (default: target/release/vendgate if it
#                                  knows [cluster])
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN=
while [ $# -gt 0 ]; do
  case $1 in
    --bin) BIN=${2:?--bin PATH}; shift ;;
    -h | --help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

FAILED=()
SKIPPED=()
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

ok() { printf 'ok    %s\n' "$1"; }
fail() {
  printf 'FAIL  %s\n' "$1"
  [ -z "${2:-}" ] || printf '%s\n' "$2" | sed 's/^/      /'
  FAILED+=("$1")
}
skip() {
  printf 'skip  %s: %s\n' "$1" "$2"
  SKIPPED+=("$1")
}
# check NAME CMD...: ok if CMD exits 0, else FAIL with its output.
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then ok "$name"; else fail "$name" "$out"; fi
}

APT_UPDATED=0
# have TOOL PACKAGE: TOOL is on PATH, installed with apt-get if need be.
have() {
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    if [ "$APT_UPDATED" = 0 ]; then
      apt-get update -qq >/dev/null 2>&1 || true
      APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1 || true
  fi
  command -v "$1" >/dev/null 2>&1
}

# --- haproxy ----------------------------------------------------------------

if have haproxy haproxy; then
  # The gw1..gw3 names resolve only inside compose: their "could not resolve"
  # warnings are expected; anything else is not.
  if out=$(haproxy -c -f deploy/haproxy.cfg 2>&1); then
    extra=$(grep -E '\[(WARNING|ALERT)\]' <<<"$out" | grep -v 'could not resolve address' || true)
    if [ -z "$extra" ]; then ok "haproxy -c -f deploy/haproxy.cfg"; else fail "haproxy -c -f deploy/haproxy.cfg (warnings)" "$extra"; fi
  else
    fail "haproxy -c -f deploy/haproxy.cfg" "$out"
  fi
  # With the names resolvable, not one warning.
  sed -E 's/ gw([0-9]):/ 127.0.0.1:/' deploy/haproxy.cfg >"$TMP/haproxy.cfg"
  if out=$(haproxy -c -f "$TMP/haproxy.cfg" 2>&1) && ! grep -qE '\[(WARNING|ALERT)\]' <<<"$out"; then
    ok "haproxy -c (servers resolvable): no warnings"
  else
    fail "haproxy -c (servers resolvable)" "$out"
  fi
else
  fail "haproxy" "haproxy is not installed and could not be installed"
fi

# --- NATS -------------------------------------------------------------------

if have nats-server nats-server; then
  if nats-server --help 2>&1 | grep -qE '^ +-t +Test configuration'; then
    for f in deploy/nats/*.conf; do
      # Placeholder secrets: the configs take them from the environment.
      check "nats-server -t -c $f" env NATS_VENDGATE_PASSWORD=x NATS_ROUTE_PASSWORD=y \
        NATS_ROUTE_1=nats-route://route:y@nats-1:6222 NATS_ROUTE_2=nats-route://route:y@nats-2:6222 \
        NATS_ROUTE_3=nats-route://route:y@nats-3:6222 nats-server -t -c "$f"
    done
  else
    fail "nats-server -t" "this nats-server has no -t (config test) flag"
  fi
else
  fail "nats-server" "nats-server is not installed and could not be installed"
fi

# --- systemd ----------------------------------------------------------------

if have systemd-analyze systemd; then
  # verify needs ExecStart's binary to exist: point it at a stand-in.
  mkdir -p "$TMP/systemd"
  printf '#!/bin/sh\nexit 0\n' >"$TMP/systemd/vendgate"
  chmod 755 "$TMP/systemd/vendgate"
  sed "s|^ExecStart=/usr/local/bin/vendgate |ExecStart=$TMP/systemd/vendgate |" \
    deploy/systemd/vendgate.service >"$TMP/systemd/vendgate.service"
  if ! grep -q "^ExecStart=$TMP/systemd/vendgate " "$TMP/systemd/vendgate.service"; then
    fail "systemd-analyze verify" "ExecStart does not start with /usr/local/bin/vendgate"
  # verify exits 0 on unknown keys and bad values, printing them: any output fails.
  elif out=$(systemd-analyze verify "$TMP/systemd/vendgate.service" 2>&1) && [ -z "$out" ]; then
    ok "systemd-analyze verify deploy/systemd/vendgate.service"
  else
    fail "systemd-analyze verify deploy/systemd/vendgate.service" "$out"
  fi
  # The sandbox must not regress (1.6 today; threshold in tenths).
  if out=$(systemd-analyze security --offline=yes --threshold=20 "$TMP/systemd/vendgate.service" 2>&1); then
    ok "systemd-analyze security: $(grep -o 'exposure level.*' <<<"$out")"
  else
    fail "systemd-analyze security --threshold=20" "$(tail -n 3 <<<"$out")"
  fi
else
  skip "systemd-analyze verify" "systemd-analyze is missing and 'apt-get install systemd' failed or was not possible"
fi

# --- YAML -------------------------------------------------------------------

PY=python3
if ! "$PY" -c 'import yaml' 2>/dev/null; then
  have /usr/bin/python3 python3 || true
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-yaml >/dev/null 2>&1 || true
  fi
  PY=/usr/bin/python3
fi
if "$PY" -c 'import yaml' 2>/dev/null; then
  yaml_files=(deploy/compose.yaml deploy/k8s/*.yaml deploy/prometheus.yml deploy/prometheus/*.yml
    deploy/vendgate-alerts.yml deploy/grafana/provisioning/*/*.yml)
  check "YAML parses: ${yaml_files[*]}" "$PY" - "${yaml_files[@]}" <<'PY'
import sys, yaml
for path in sys.argv[1:]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    if not docs:
        sys.exit(f"{path}: empty")
    if "/k8s/" in path:
        for d in docs:
            for key in ("apiVersion", "kind"):
                if key not in d:
                    sys.exit(f"{path}: a document without {key}")
            if not d.get("metadata", {}).get("name"):
                sys.exit(f"{path}: {d['kind']} without metadata.name")
PY
  # What compose mounts and builds exists; what it waits for can be healthy.
  check "compose.yaml: mounted files, build context and healthchecks" "$PY" - deploy/compose.yaml <<'PY'
import os, sys, yaml
path = sys.argv[1]
base = os.path.dirname(path)
doc = yaml.safe_load(open(path))
services = doc["services"]
problems = []
for name, s in services.items():
    for v in s.get("volumes", []):
        src = v.split(":")[0]
        if src.startswith("."):
            if not os.path.exists(os.path.join(base, src)):
                problems.append(f"{name}: {src} does not exist")
        elif src not in (doc.get("volumes") or {}):
            problems.append(f"{name}: volume {src} is not declared")
    b = s.get("build")
    if b:
        ctx = os.path.join(base, b["context"])
        if not os.path.isfile(os.path.join(ctx, b.get("dockerfile", "Dockerfile"))):
            problems.append(f"{name}: no Dockerfile {b.get('dockerfile')} in {ctx}")
    for dep, cond in (s.get("depends_on") or {}).items():
        if dep not in services:
            problems.append(f"{name}: depends on unknown {dep}")
        elif cond.get("condition") == "service_healthy":
            d = services[dep]
            # The vendgate image has its own HEALTHCHECK.
            if "healthcheck" not in d and "build" not in d:
                problems.append(f"{name}: waits for {dep} to be healthy, which has no healthcheck")
if problems:
    sys.exit("\n".join(problems))
PY
else
  fail "YAML" "no python3 with the yaml module (apt-get install python3-yaml failed)"
fi

if command -v promtool >/dev/null; then
  mkdir -p "$TMP/prom"
  cp deploy/prometheus/prometheus.yml deploy/vendgate-alerts.yml "$TMP/prom/"
  check "promtool check config deploy/prometheus/prometheus.yml (with the alert rules)" \
    promtool check config "$TMP/prom/prometheus.yml"
  check "promtool check config deploy/prometheus.yml" promtool check config deploy/prometheus.yml
else
  skip "promtool" "not installed (apt-get install prometheus provides it); YAML parse only"
fi

# --- shell ------------------------------------------------------------------

for f in deploy/local-cluster/run.sh deploy/check.sh; do
  check "bash -n $f" bash -n "$f"
done
if have shellcheck shellcheck; then
  check "shellcheck deploy/local-cluster/run.sh deploy/check.sh" \
    shellcheck deploy/local-cluster/run.sh deploy/check.sh
else
  skip "shellcheck" "not installed and 'apt-get install shellcheck' failed or was not possible"
fi
check "run.sh --help" deploy/local-cluster/run.sh --help

# --- Dockerfile -------------------------------------------------------------

# Every COPY source exists and is not excluded by .dockerignore (docker build
# would fail on it); the exec-form JSON lines parse.
check "Dockerfile: COPY sources exist and are in the build context" "${PY:-python3}" - deploy/Dockerfile .dockerignore <<'PY'
import json, os, re, sys
dockerfile, ignore_file = sys.argv[1:]
text = open(dockerfile).read().replace("\\\n", " ")
ignored = [l.strip().rstrip("/") for l in open(ignore_file)
           if l.strip() and not l.startswith("#") and not l.startswith("!")]
problems, sources = [], []
for line in text.splitlines():
    words = line.split()
    if not words or words[0].upper() != "COPY":
        continue
    args = [w for w in words[1:] if not w.startswith("--")]
    if any(w.startswith("--from") for w in words[1:]):
        continue
    for src in args[:-1]:
        sources.append(src)
        if not os.path.exists(src):
            problems.append(f"COPY {src}: does not exist")
        for pat in ignored:
            if src.rstrip("/") == pat or src.startswith(pat + "/"):
                problems.append(f"COPY {src}: excluded by .dockerignore ({pat})")
for kw in ("CMD", "ENTRYPOINT"):
    for m in re.finditer(rf"^(?:HEALTHCHECK .*?)?{kw} (\[.*\])\s*$", text, re.M):
        try:
            json.loads(m.group(1))
        except ValueError as e:
            problems.append(f"{kw} {m.group(1)}: not JSON ({e})")
if not sources:
    problems.append("no COPY lines found")
if problems:
    sys.exit("\n".join(problems))
print("COPY", " ".join(sources))
PY

# The COPY set alone loads as the workspace, and Cargo.lock satisfies it
# (the image builds with --locked).
if command -v cargo >/dev/null; then
  mkdir -p "$TMP/context"
  sources=$(grep -E '^COPY ' deploy/Dockerfile | grep -v -- '--from' | awk '{for (i = 2; i < NF; i++) print $i}')
  host=$(rustc -vV 2>/dev/null | sed -n 's/^host: //p')
  # shellcheck disable=SC2086 # one word per source path
  if ! out=$(cp -r $sources "$TMP/context/" 2>&1); then
    fail "Dockerfile build context: copying the COPY sources" "$out"
  elif out=$(cd "$TMP/context" && cargo tree --locked --offline -p vendgate -e normal,build ${host:+--target "$host"} 2>&1 >/dev/null); then
    ok "Dockerfile build context: cargo tree --locked -p vendgate resolves"
  elif grep -q -- '--offline' <<<"$out" && ! grep -q 'lock file' <<<"$out"; then
    skip "Dockerfile build context" "crates not in the local cargo cache (offline): $(head -n 1 <<<"$out")"
  else
    fail "Dockerfile build context: cargo tree --locked" "$out"
  fi
else
  skip "Dockerfile build context" "no cargo"
fi

# --- settings, loaded by vendgate itself ------------------------------------

if [ -z "$BIN" ] && [ -x target/release/vendgate ]; then BIN=target/release/vendgate; fi
bin_knows_cluster() {
  printf '[cluster]\nnode_id = "x"\n' >"$TMP/probe.toml"
  env -i PATH="$PATH" "$BIN" config --config "$TMP/probe.toml" >/dev/null 2>&1
}
if [ -z "$BIN" ]; then
  skip "settings load" "no vendgate binary (build it, or give --bin PATH)"
elif ! bin_knows_cluster; then
  skip "settings load" "$BIN predates [cluster] settings (rebuild it)"
else
  # The k8s ConfigMap's TOML plus the Deployment's env.
  "${PY:-python3}" - deploy/k8s/vendgate.yaml "$TMP/k8s.toml" <<'PY'
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "ConfigMap":
        open(sys.argv[2], "w").write(d["data"]["vendgate.toml"])
PY
  check "vendgate config: k8s ConfigMap + Deployment env" env -i PATH="$PATH" \
    VENDGATE_CLUSTER__NODE_ID=vendgate-abc VENDGATE_DATABASE_URL=postgres://u:p@db:5432/vendgate \
    VENDGATE_CLUSTER__NATS_PASSWORD=x VENDGATE_OPERATOR__PASSWORD=x \
    "$BIN" config --config "$TMP/k8s.toml"
  # compose's gw1 environment, ${VAR:-default} expanded to the default.
  mapfile -t compose_env < <("${PY:-python3}" - deploy/compose.yaml <<'PY'
import re, sys, yaml
env = yaml.safe_load(open(sys.argv[1]))["services"]["gw1"]["environment"]
for k, v in env.items():
    v = re.sub(r"[$][{][A-Z_]+:-([^}]*)[}]", lambda m: m.group(1), str(v))
    print(k + "=" + v)
PY
  )
  if [ "${#compose_env[@]}" -lt 5 ]; then
    fail "vendgate config: compose gw1 environment" "could not read gw1's environment from deploy/compose.yaml"
  else
    check "vendgate config: compose gw1 environment" env -i PATH="$PATH" "${compose_env[@]}" "$BIN" config
  fi
fi

echo
if [ "${#SKIPPED[@]}" -gt 0 ]; then echo "skipped: ${SKIPPED[*]}"; fi
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "FAILED: ${#FAILED[@]} check(s)"
  exit 1
fi
echo "all checks passed"
