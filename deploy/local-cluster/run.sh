#!/usr/bin/env bash
# A vendgate cluster on loopback: 3 NATS servers, a throwaway PostgreSQL,
# haproxy and N gateway nodes, all in one temp dir, stopped by PID.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: deploy/local-cluster/run.sh [--nodes N] [--machines M] [--foreground | --detach]
                                   [--print-env] [--infra-only] [--state FILE]
       deploy/local-cluster/run.sh stop [--state FILE]

Starts on 127.0.0.1: three nats-server nodes (one cluster, no JetStream),
PostgreSQL (initdb in a temp dir), haproxy (MQTT sticky on the client id,
the open API, health checks on /readyz) and N vendgate nodes gw1..gwN in
cluster mode; provisions a demo merchant and M machines; prints every
endpoint and credential. target/release/vendgate is (re)built with cargo
first unless VGCLUSTER_BIN names a binary.

  --nodes N       gateway nodes (default 3)
  --machines M    demo machines, numbered from 10000001 (default 3)
  --foreground    stay until Ctrl-C, then stop everything (default)
  --detach        return once ready; PIDs go to the state file; `run.sh stop`
  --print-env     also print `export VGCLUSTER_...` lines on stdout (all other
                  output is on stderr): eval "$(run.sh --detach --print-env)"
  --infra-only    NATS, PostgreSQL and haproxy, plus the nodes' config files;
                  no gateway started, nothing provisioned
  --state FILE    default: $VGCLUSTER_STATE, else /tmp/vendgate-local-cluster.state

Ports are free ones picked at start unless set in the environment:
VGCLUSTER_MQTT_PORT, VGCLUSTER_HTTP_PORT, VGCLUSTER_STATS_PORT (haproxy),
VGCLUSTER_PG_PORT, VGCLUSTER_NATS_PORT, VGCLUSTER_NATS_ROUTE_PORT,
VGCLUSTER_NATS_MONITOR_PORT (the first server; +1, +2 for the others),
VGCLUSTER_NODE_MQTT_PORT, VGCLUSTER_NODE_HTTP_PORT (gw1; +1 per node).

The variables are VGCLUSTER_*, not VENDGATE_*: vendgate reads every VENDGATE_
variable as a setting and refuses unknown ones, so a test that sourced such
lines could not start vendgate.
EOF
}

log() { printf '%s\n' "run.sh: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE=${VGCLUSTER_STATE:-${TMPDIR:-/tmp}/vendgate-local-cluster.state}
NODES=3
MACHINES=3
MODE=foreground
PRINT_ENV=0
INFRA_ONLY=0
ACTION=start

while [ $# -gt 0 ]; do
  case $1 in
    stop) ACTION=stop ;;
    --nodes) NODES=${2:?--nodes N}; shift ;;
    --machines) MACHINES=${2:?--machines M}; shift ;;
    --foreground) MODE=foreground ;;
    --detach) MODE=detach ;;
    --print-env) PRINT_ENV=1 ;;
    --infra-only) INFRA_ONLY=1 ;;
    --state) STATE=${2:?--state FILE}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done
case $NODES in '' | *[!0-9]* | 0) die "--nodes wants a number >= 1" ;; esac
case $MACHINES in '' | *[!0-9]*) die "--machines wants a number" ;; esac
[ "$MACHINES" -le 1000 ] || die "--machines: at most 1000"

# --- processes, stopped by PID -------------------------------------------

# Every process we start, as "name pid starttime": the start time (field 22
# of /proc/PID/stat) keeps `stop` from killing an unrelated process that
# reused a PID.
PROCS=()
DIR=
PGDATA=

# "STATE STARTTIME" of a PID, or failure if there is no such process.
proc_stat() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  s=${s##*) } # after the command name, which may hold spaces
  # shellcheck disable=SC2086 # split into fields on purpose
  set -- $s
  printf '%s %s\n' "$1" "${20}"
}

# True while that very process runs (a zombie counts as gone).
running() {
  local st
  st=$(proc_stat "$1") || return 1
  [ "${st#* }" = "$2" ] && [ "${st%% *}" != Z ]
}

# Start a command in its own session (so a Ctrl-C reaches only this script,
# which then stops everything in order) and record it.
spawn() {
  local name=$1 logfile=$2 pid st
  shift 2
  setsid "$@" >"$logfile" 2>&1 </dev/null &
  pid=$!
  st=$(proc_stat "$pid") || die "$name exited at once; see $logfile"
  PROCS+=("$name $pid ${st#* }")
}

# stop_proc NAME PID STARTTIME GRACE: SIGTERM, then SIGKILL after GRACE seconds.
stop_proc() {
  local name=$1 pid=$2 start=$3 grace=$4 i
  running "$pid" "$start" || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < grace * 10; i++)); do
    running "$pid" "$start" || break
    sleep 0.1
  done
  if running "$pid" "$start"; then
    log "$name (pid $pid) ignored SIGTERM for ${grace}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

as_postgres() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# Gateways first (they drain and deregister while NATS and the database are
# still there), then haproxy, NATS, PostgreSQL.
stop_all() {
  local kind p name pid start
  for kind in gw haproxy nats; do
    for p in "${PROCS[@]}"; do
      read -r name pid start <<<"$p"
      # A gateway's shutdown steps take up to 10 s each.
      case $kind:$name in
        gw:gw*) stop_proc "$name" "$pid" "$start" 75 ;;
        haproxy:haproxy | nats:nats*) stop_proc "$name" "$pid" "$start" 20 ;;
      esac
    done
  done
  if [ -n "$PGDATA" ] && [ -f "$PGDATA/postmaster.pid" ]; then
    as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w -t 20 stop >/dev/null 2>&1 || {
      pid=$(head -n1 "$PGDATA/postmaster.pid" 2>/dev/null || true)
      if [ -n "$pid" ]; then
        log "pg_ctl stop failed: SIGQUIT to postmaster $pid"
        kill -QUIT "$pid" 2>/dev/null || true
      fi
    }
  fi
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  # A failed start: the logs go with the temp dir, so show their ends first.
  if [ "$rc" != 0 ] && [ "$rc" != 130 ] && [ "$rc" != 143 ] && [ -n "$DIR" ] && [ -d "$DIR/logs" ]; then
    local f
    for f in "$DIR"/logs/*.log "$DIR"/pgrun/postgresql.log; do
      [ -s "$f" ] || continue
      log "--- last lines of ${f#"$DIR"/}:"
      tail -n 8 "$f" >&2
    done
  fi
  if [ -n "$DIR" ]; then
    log "stopping ${#PROCS[@]} processes and PostgreSQL"
    stop_all
    rm -rf "$DIR"
    log "removed $DIR"
  fi
  exit "$rc"
}

PG_BIN=${VGCLUSTER_PG_BIN:-/usr/lib/postgresql/15/bin}

write_state() {
  local tmp=$STATE.tmp p
  {
    printf 'dir %s\n' "$DIR"
    printf 'pgdata %s\n' "$PGDATA"
    printf 'pgbin %s\n' "$PG_BIN"
    for p in "${PROCS[@]}"; do printf 'proc %s\n' "$p"; done
  } >"$tmp"
  mv "$tmp" "$STATE"
}

read_state() {
  local key a b c
  while read -r key a b c; do
    case $key in
      dir) DIR=$a ;;
      pgdata) PGDATA=$a ;;
      pgbin) PG_BIN=$a ;;
      proc) PROCS+=("$a $b $c") ;;
    esac
  done <"$1"
}

state_alive() {
  local p name pid start
  for p in "${PROCS[@]}"; do
    read -r name pid start <<<"$p"
    running "$pid" "$start" && return 0
  done
  [ -n "$PGDATA" ] && [ -f "$PGDATA/postmaster.pid" ]
}

if [ "$ACTION" = stop ]; then
  [ -f "$STATE" ] || die "no state file $STATE (nothing detached, or another --state)"
  read_state "$STATE"
  case $DIR in /*/vendgate-cluster.*) ;; *) die "state file $STATE names an odd dir '$DIR'" ;; esac
  log "stopping the cluster in $DIR"
  stop_all
  rm -rf "$DIR"
  rm -f "$STATE"
  log "stopped"
  exit 0
fi

# --- start --------------------------------------------------------------

for tool in nats-server haproxy curl python3 setsid "$PG_BIN/initdb" "$PG_BIN/pg_ctl" psql; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || die "running as root needs a postgres user (initdb refuses root)"
fi
if [ "$MODE" = detach ] && [ -f "$STATE" ]; then
  read_state "$STATE"
  if state_alive; then
    die "a detached cluster is running ($STATE): run.sh stop first"
  fi
  log "removing stale state file $STATE"
  rm -f "$STATE"
  [ -n "$DIR" ] && case $DIR in /*/vendgate-cluster.*) rm -rf "$DIR" ;; esac
  PROCS=()
  DIR=
  PGDATA=
fi

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The binary: cargo rebuilds only what changed, so a tree that just got the
# cluster mode merged is never run with an older binary.
if [ -n "${VGCLUSTER_BIN:-}" ]; then
  BIN=$VGCLUSTER_BIN
else
  BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/vendgate
  if command -v cargo >/dev/null; then
    log "cargo build --release -p vendgate"
    (cd "$REPO" && cargo build --release -p vendgate) >&2 || die "the build failed"
  fi
fi
[ -x "$BIN" ] || die "no vendgate binary at $BIN"

DIR=$(mktemp -d "${TMPDIR:-/tmp}/vendgate-cluster.XXXXXX")
# The postgres user must reach its directories below; the files with secrets
# are 0600 themselves.
chmod 711 "$DIR"
umask 077
LOGS=$DIR/logs
mkdir -p "$LOGS" "$DIR/nats"

# --- ports --------------------------------------------------------------

# Distinct free loopback ports: all bound at once, then released.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}
read -r -a FREE <<<"$(free_ports $((3 * 3 + 2 * NODES + 4)))"
NEXT_FREE=0
# pick VAR OVERRIDE_BASE OFFSET: OVERRIDE_BASE + OFFSET if set, else a free port.
pick() {
  if [ -n "$2" ]; then
    printf -v "$1" '%s' $(($2 + $3))
  else
    printf -v "$1" '%s' "${FREE[NEXT_FREE]}"
    NEXT_FREE=$((NEXT_FREE + 1))
  fi
  if ss -Hltn "sport = :${!1}" | grep -q .; then
    die "port ${!1} is in use (from ${4:-a free-port pick}); choose another"
  fi
}

MQTT_PORT='' HTTP_PORT='' STATS_PORT='' PG_PORT=''
pick MQTT_PORT "${VGCLUSTER_MQTT_PORT:-}" 0 VGCLUSTER_MQTT_PORT
pick HTTP_PORT "${VGCLUSTER_HTTP_PORT:-}" 0 VGCLUSTER_HTTP_PORT
pick STATS_PORT "${VGCLUSTER_STATS_PORT:-}" 0 VGCLUSTER_STATS_PORT
pick PG_PORT "${VGCLUSTER_PG_PORT:-}" 0 VGCLUSTER_PG_PORT
declare -a NATS_PORT NATS_ROUTE NATS_MON NODE_MQTT NODE_HTTP
for i in 1 2 3; do
  pick "NATS_PORT[$i]" "${VGCLUSTER_NATS_PORT:-}" $((i - 1)) VGCLUSTER_NATS_PORT
  pick "NATS_ROUTE[$i]" "${VGCLUSTER_NATS_ROUTE_PORT:-}" $((i - 1)) VGCLUSTER_NATS_ROUTE_PORT
  pick "NATS_MON[$i]" "${VGCLUSTER_NATS_MONITOR_PORT:-}" $((i - 1)) VGCLUSTER_NATS_MONITOR_PORT
done
for ((i = 1; i <= NODES; i++)); do
  pick "NODE_MQTT[$i]" "${VGCLUSTER_NODE_MQTT_PORT:-}" $((i - 1)) VGCLUSTER_NODE_MQTT_PORT
  pick "NODE_HTTP[$i]" "${VGCLUSTER_NODE_HTTP_PORT:-}" $((i - 1)) VGCLUSTER_NODE_HTTP_PORT
done

secret() { od -An -tx1 -N16 /dev/urandom | tr -d ' \n'; }
NATS_PASSWORD=$(secret)
NATS_ROUTE_PASSWORD=$(secret)
PG_PASSWORD=$(secret)
OPERATOR_PASSWORD=$(secret)

# Polls "$@" every 0.2 s for up to $1 seconds.
wait_for() {
  local seconds=$1 i
  shift
  for ((i = 0; i < seconds * 5; i++)); do
    "$@" && return 0
    sleep 0.2
  done
  return 1
}

# --- NATS: the production configs with loopback ports ---------------------

NATS_URLS=()
for i in 1 2 3; do
  conf=$DIR/nats/n$i.conf
  sed -e "s/^server_name: .*/server_name: n$i/" \
    -e "s|^listen: 0\.0\.0\.0:4222\$|listen: 127.0.0.1:${NATS_PORT[i]}|" \
    -e "s|^http: 0\.0\.0\.0:8222\$|http: 127.0.0.1:${NATS_MON[i]}|" \
    -e "s|^  listen: 0\.0\.0\.0:6222\$|  listen: 127.0.0.1:${NATS_ROUTE[i]}|" \
    "$REPO/deploy/nats/nats-$i.conf" >"$conf"
  [ "$(grep -c '127\.0\.0\.1' "$conf")" = 3 ] ||
    die "deploy/nats/nats-$i.conf changed shape: the three listen lines were not all replaced"
  NATS_URLS+=("nats://127.0.0.1:${NATS_PORT[i]}")
done
# Quoted: nats-server parses a variable's value as a config value (a hex
# password starting with a digit would not parse).
for i in 1 2 3; do
  spawn "nats$i" "$LOGS/nats$i.log" env \
    NATS_VENDGATE_PASSWORD="\"$NATS_PASSWORD\"" NATS_ROUTE_PASSWORD="\"$NATS_ROUTE_PASSWORD\"" \
    NATS_ROUTE_1="\"nats-route://route:$NATS_ROUTE_PASSWORD@127.0.0.1:${NATS_ROUTE[1]}\"" \
    NATS_ROUTE_2="\"nats-route://route:$NATS_ROUTE_PASSWORD@127.0.0.1:${NATS_ROUTE[2]}\"" \
    NATS_ROUTE_3="\"nats-route://route:$NATS_ROUTE_PASSWORD@127.0.0.1:${NATS_ROUTE[3]}\"" \
    nats-server -c "$DIR/nats/n$i.conf"
done
routes_of() {
  curl -fsS "http://127.0.0.1:$1/routez" 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["num_routes"])' 2>/dev/null
}
nats_formed() {
  local i
  for i in 1 2 3; do
    [ "$(routes_of "${NATS_MON[i]}")" = 2 ] || return 1
  done
}
wait_for 20 nats_formed || die "the NATS cluster did not form in 20 s (num_routes per server: $(
  for i in 1 2 3; do printf '%s ' "$(routes_of "${NATS_MON[i]}" || echo '?')"; done
))"
log "NATS cluster formed: 3 servers, 2 routes each"

# --- PostgreSQL -----------------------------------------------------------

PGDATA=$DIR/pg
PGRUN=$DIR/pgrun
mkdir -p "$PGDATA" "$PGRUN"
printf '%s\n' "$PG_PASSWORD" >"$DIR/pg.pw"
if [ "$(id -u)" = 0 ]; then chown postgres: "$PGDATA" "$PGRUN" "$DIR/pg.pw"; fi
# Password (SCRAM) over TCP like a real deployment; trust on the socket.
as_postgres "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth-local=trust \
  --auth-host=scram-sha-256 --pwfile="$DIR/pg.pw" -E UTF8 --locale=C.UTF-8 \
  >"$LOGS/initdb.log" 2>&1 || die "initdb failed"
rm -f "$DIR/pg.pw"
# fsync off: a throwaway instance need not survive a power cut.
as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$PGRUN/postgresql.log" -w -t 30 \
  -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PGRUN -c fsync=off -c max_connections=200" \
  start >"$LOGS/pg_ctl.log" 2>&1 || die "PostgreSQL did not start"
PG_ADMIN_URL=postgres://postgres:$PG_PASSWORD@127.0.0.1:$PG_PORT/postgres
DATABASE_URL=postgres://postgres:$PG_PASSWORD@127.0.0.1:$PG_PORT/vendgate
psql -qX -v ON_ERROR_STOP=1 "$PG_ADMIN_URL" -c 'CREATE DATABASE vendgate' >/dev/null ||
  die "psql could not create the database"
[ "$(psql -qXAt "$DATABASE_URL" -c 'SELECT 1')" = 1 ] || die "psql cannot query the vendgate database"
log "PostgreSQL 127.0.0.1:$PG_PORT accepts psql (database vendgate)"

# --- gateway configs ------------------------------------------------------

OPERATOR_HASH=$(printf '%s\n' "$OPERATOR_PASSWORD" | "$BIN" hash-password) ||
  die "vendgate hash-password failed"
nats_list=$(printf '"%s", ' "${NATS_URLS[@]}")
nats_list="[${nats_list%, }]"
for ((i = 1; i <= NODES; i++)); do
  mkdir -p "$DIR/gw$i"
  cat >"$DIR/gw$i.toml" <<EOF
# gw$i of the local cluster (deploy/local-cluster/run.sh)
data_dir = "$DIR/gw$i"
database_url = "$DATABASE_URL"

[mqtt]
addr = "127.0.0.1:${NODE_MQTT[i]}"
# Behind haproxy every machine comes from one address: per-address connect
# limits would apply to the whole fleet at once.
max_connections_per_address = 0
accept_rate_per_address = 0

# Behind haproxy every machine comes from 127.0.0.1: a per-address throttle
# would lock them all out after a few failed CONNECTs.
[mqtt.auth_throttle]
max_failures_per_address = 0

[http]
addr = "127.0.0.1:${NODE_HTTP[i]}"

[notifier]
# One key for all nodes: any node signs any merchant's webhooks.
key_file = "$DIR/webhook.key"
# Webhook receivers on 127.0.0.1 (development only).
allow_private_targets = true

[operator]
username = "operator"
password = "$OPERATOR_HASH"

[cluster]
node_id = "gw$i"
nats_urls = $nats_list
nats_user = "vendgate"
nats_password = "$NATS_PASSWORD"
EOF
done

# --- haproxy: deploy/haproxy.cfg's shape on loopback ----------------------

{
  cat <<EOF
# Generated by deploy/local-cluster/run.sh from deploy/haproxy.cfg's shape:
# loopback ports, per-node check ports, no MQTTS, maxconn within this
# machine's fd limit.
global
    log stdout format raw local0 info
    maxconn 4000

defaults
    log global
    mode tcp
    option tcplog
    option dontlognull
    timeout connect 3s
    retries 2
    option redispatch 1
    timeout client 5m
    timeout server 5m
    timeout client-fin 30s
    timeout server-fin 30s
    option clitcpka
    option srvtcpka
    default-server check inter 2s fall 3 rise 2 on-marked-down shutdown-sessions

frontend mqtt
    bind 127.0.0.1:$MQTT_PORT
    tcp-request inspect-delay 5s
    tcp-request content reject unless { req.payload(0,0),mqtt_is_valid }
    default_backend mqtt_nodes

backend mqtt_nodes
    balance leastconn
    stick-table type string len 64 size 200k expire 2h
    stick on req.payload(0,0),mqtt_field_value(connect,client_identifier)
    option httpchk GET /readyz
    http-check expect status 200
EOF
  for ((i = 1; i <= NODES; i++)); do
    echo "    server gw$i 127.0.0.1:${NODE_MQTT[i]} port ${NODE_HTTP[i]}"
  done
  cat <<EOF

frontend http_api
    mode http
    bind 127.0.0.1:$HTTP_PORT
    option httplog
    option forwardfor
    timeout http-request 10s
    timeout http-keep-alive 10s
    timeout client 30s
    http-request deny deny_status 404 if { path /metrics }
    default_backend http_nodes

backend http_nodes
    mode http
    balance leastconn
    timeout server 30s
    option httpchk GET /readyz
    http-check expect status 200
EOF
  for ((i = 1; i <= NODES; i++)); do
    echo "    server gw$i 127.0.0.1:${NODE_HTTP[i]}"
  done
  cat <<EOF

frontend stats
    mode http
    bind 127.0.0.1:$STATS_PORT
    timeout client 30s
    http-request use-service prometheus-exporter if { path /metrics }
    stats enable
    stats uri /stats
    stats refresh 10s
EOF
} >"$DIR/haproxy.cfg"
haproxy -c -q -f "$DIR/haproxy.cfg" >"$LOGS/haproxy-check.log" 2>&1 ||
  die "haproxy -c failed: $(cat "$LOGS/haproxy-check.log")"
spawn haproxy "$LOGS/haproxy.log" haproxy -f "$DIR/haproxy.cfg"
haproxy_up() { curl -fsS -o /dev/null "http://127.0.0.1:$STATS_PORT/stats" 2>/dev/null; }
wait_for 10 haproxy_up || die "haproxy did not start"
log "haproxy listening (MQTT 127.0.0.1:$MQTT_PORT, HTTP 127.0.0.1:$HTTP_PORT)"

# --- provisioning and gateway nodes -----------------------------------------

APPID=
APPSECRET=
MACHINE_LINES=()
if [ "$INFRA_ONLY" = 0 ]; then
  # Before the nodes start: one process runs the migrations, and the nodes
  # find their machines provisioned.
  out=$("$BIN" merchant add --name "Demo merchant" --config "$DIR/gw1.toml") ||
    die "vendgate merchant add failed (against $DATABASE_URL)"
  APPID=$(sed -n 's/^appid=//p' <<<"$out")
  APPSECRET=$(sed -n 's/^appsecret=//p' <<<"$out")
  if [ -z "$APPID" ] || [ -z "$APPSECRET" ]; then die "merchant add printed no credentials: $out"; fi
  if [ "$MACHINES" -gt 0 ]; then
    "$BIN" machine add --merchant "$APPID" --count "$MACHINES" --first 10000001 \
      --secrets-out "$DIR/machines.csv" --config "$DIR/gw1.toml" >"$LOGS/machine-add.log" ||
      die "vendgate machine add failed"
    mapfile -t MACHINE_LINES <"$DIR/machines.csv"
  fi
  log "provisioned merchant $APPID and $MACHINES machines"

  for ((i = 1; i <= NODES; i++)); do
    # NO_COLOR: plain text in the log files (tracing-subscriber honours it).
    spawn "gw$i" "$LOGS/gw$i.log" env NO_COLOR=1 "$BIN" serve --config "$DIR/gw$i.toml"
  done
  nodes_ready() {
    local i p name pid start
    for ((i = 1; i <= NODES; i++)); do
      for p in "${PROCS[@]}"; do
        read -r name pid start <<<"$p"
        if [ "$name" = "gw$i" ] && ! running "$pid" "$start"; then
          log "gw$i (pid $pid) exited; the end of $LOGS/gw$i.log:"
          tail -n 20 "$LOGS/gw$i.log" >&2
          exit 1
        fi
      done
      curl -fs -o /dev/null --max-time 2 "http://127.0.0.1:${NODE_HTTP[i]}/readyz" || return 1
    done
  }
  wait_for 90 nodes_ready || die "not every node answered /readyz 200 within 90 s"
  log "all $NODES nodes ready"
  # haproxy marks a node up after 2 good checks 2 s apart.
  haproxy_all_up() {
    local up
    up=$(curl -fsS "http://127.0.0.1:$STATS_PORT/stats;csv" |
      awk -F, '($1 == "mqtt_nodes" || $1 == "http_nodes") && $2 ~ /^gw/ && $18 == "UP"' | wc -l)
    [ "$up" = $((2 * NODES)) ]
  }
  wait_for 20 haproxy_all_up || die "haproxy does not see every node UP; http://127.0.0.1:$STATS_PORT/stats"
  log "haproxy sees every node UP"
fi

# --- report -----------------------------------------------------------------

words() { local IFS=' '; printf '%s' "$*"; }
node_http=()
node_mqtt=()
nats_mon=()
node_pids=()
nats_pids=()
for p in "${PROCS[@]}"; do
  read -r name pid _ <<<"$p"
  case $name in gw*) node_pids+=("$pid") ;; nats*) nats_pids+=("$pid") ;; esac
done
for ((i = 1; i <= NODES; i++)); do
  node_http+=("http://127.0.0.1:${NODE_HTTP[i]}")
  node_mqtt+=("127.0.0.1:${NODE_MQTT[i]}")
done
for i in 1 2 3; do nats_mon+=("http://127.0.0.1:${NATS_MON[i]}"); done
machines_list=()
for m in "${MACHINE_LINES[@]}"; do machines_list+=("${m%%,*}:${m#*,}"); done

emit_env() {
  local k v
  for k in DIR STATE BIN NODES MQTT HTTP STATS NODE_IDS NODE_MQTT NODE_HTTP NODE_CONFIGS \
    NODE_PIDS NATS_URLS NATS_MONITOR NATS_PIDS NATS_USER NATS_PASSWORD DATABASE_URL \
    OPERATOR_USER OPERATOR_PASSWORD APPID APPSECRET MACHINES MACHINES_CSV; do
    case $k in
      DIR) v=$DIR ;;
      STATE) v=''; if [ "$MODE" = detach ]; then v=$STATE; fi ;;
      BIN) v=$BIN ;;
      NODES) v=$NODES ;;
      MQTT) v=127.0.0.1:$MQTT_PORT ;;
      HTTP) v=http://127.0.0.1:$HTTP_PORT ;;
      STATS) v=http://127.0.0.1:$STATS_PORT ;;
      NODE_IDS) v=$(for ((i = 1; i <= NODES; i++)); do printf 'gw%s ' "$i"; done); v=${v% } ;;
      NODE_MQTT) v=$(words "${node_mqtt[@]}") ;;
      NODE_HTTP) v=$(words "${node_http[@]}") ;;
      NODE_CONFIGS) v=$(for ((i = 1; i <= NODES; i++)); do printf '%s ' "$DIR/gw$i.toml"; done); v=${v% } ;;
      NODE_PIDS) v=$(words "${node_pids[@]}") ;;
      NATS_URLS) v=$(IFS=,; printf '%s' "${NATS_URLS[*]}") ;;
      NATS_MONITOR) v=$(words "${nats_mon[@]}") ;;
      NATS_PIDS) v=$(words "${nats_pids[@]}") ;;
      NATS_USER) v=vendgate ;;
      NATS_PASSWORD) v=$NATS_PASSWORD ;;
      DATABASE_URL) v=$DATABASE_URL ;;
      OPERATOR_USER) v=operator ;;
      OPERATOR_PASSWORD) v=$OPERATOR_PASSWORD ;;
      APPID) v=$APPID ;;
      APPSECRET) v=$APPSECRET ;;
      MACHINES) v=$(words "${machines_list[@]}") ;;
      MACHINES_CSV) v=''; if [ "${#MACHINE_LINES[@]}" -gt 0 ]; then v=$DIR/machines.csv; fi ;;
    esac
    printf 'export VGCLUSTER_%s=%q\n' "$k" "$v"
  done
}
emit_env >"$DIR/env"

{
  echo
  echo "vendgate local cluster: $NODES nodes, 3 NATS servers, PostgreSQL, haproxy ($DIR)"
  echo "  MQTT via haproxy      127.0.0.1:$MQTT_PORT   (sticky on the MQTT client id)"
  echo "  HTTP via haproxy      http://127.0.0.1:$HTTP_PORT/api/openapi/v1/   (/readyz, /dashboard)"
  echo "  haproxy stats         http://127.0.0.1:$STATS_PORT/stats   (Prometheus: /metrics)"
  for ((i = 1; i <= NODES; i++)); do
    echo "  gw$i                   mqtt 127.0.0.1:${NODE_MQTT[i]}  http://127.0.0.1:${NODE_HTTP[i]}  (/readyz /healthz /metrics /dashboard)  config $DIR/gw$i.toml  log $LOGS/gw$i.log"
  done
  for i in 1 2 3; do
    echo "  nats n$i               nats://127.0.0.1:${NATS_PORT[i]}  monitoring http://127.0.0.1:${NATS_MON[i]}/routez  user vendgate / $NATS_PASSWORD"
  done
  echo "  PostgreSQL            $DATABASE_URL"
  echo "  operator (dashboard)  operator / $OPERATOR_PASSWORD"
  if [ "$INFRA_ONLY" = 1 ]; then
    echo
    echo "--infra-only: no gateway runs. Start node i with:"
    echo "  $BIN serve --config $DIR/gwI.toml"
    echo "(provision first with the same --config, e.g. $BIN merchant add --name demo --config $DIR/gw1.toml)"
  else
    echo "  merchant              appid=$APPID appsecret=$APPSECRET"
    for m in "${MACHINE_LINES[@]}"; do
      echo "  machine               machine_no=${m%%,*} secret=${m#*,}"
    done
    if [ "${#MACHINE_LINES[@]}" -gt 0 ]; then
      first=${MACHINE_LINES[0]}
      echo
      echo "A machine, and an order for it:"
      echo "  VENDGATE_SIM_SECRET=${first#*,} cargo run --release -p vendgate-sim -- run --gateway 127.0.0.1:$MQTT_PORT --machine-no ${first%%,*}"
      echo "  curl -s -X POST http://127.0.0.1:$HTTP_PORT/api/openapi/v1/orders -H 'Appid: $APPID' -H 'AppSecret: $APPSECRET' \\"
      echo "       -d '{\"machine_no\":\"${first%%,*}\",\"products\":[{\"product_id\":1,\"quantity\":1}]}'"
      echo "  all machines: cargo run --release -p vendgate-sim -- fleet --gateway 127.0.0.1:$MQTT_PORT --secrets $DIR/machines.csv"
    fi
  fi
  echo
  echo "Environment for tests: source $DIR/env"
} >&2

[ "$PRINT_ENV" = 1 ] && cat "$DIR/env"

if [ "$MODE" = detach ]; then
  write_state
  trap - EXIT INT TERM
  log "detached; stop with: $0 stop --state $STATE"
  exit 0
fi

log "running; Ctrl-C stops everything"
declare -A REPORTED=()
while :; do
  for p in "${PROCS[@]}"; do
    read -r name pid start <<<"$p"
    if [ -z "${REPORTED[$name]:-}" ] && ! running "$pid" "$start"; then
      REPORTED[$name]=1
      log "$name (pid $pid) exited; see $LOGS/$name.log"
    fi
  done
  # `wait` returns at once on a signal; a foreground sleep would make bash
  # skip the trap when only this process (not its group) got SIGINT.
  sleep 2 &
  wait $! || true
done
