#!/usr/bin/env bash
# Cluster benchmark (docs/scale-out.md "Capacity"): the 3-node loopback
# cluster of deploy/local-cluster/run.sh (3 NATS servers, PostgreSQL,
# haproxy, 3 vendgate nodes), measured side by side in one run:
#
#   (f) full orders when the order lands on the machine's node vs on
#       another node (the cross-node NATS hop), c=1 and c=64;
#   (g) one node on SQLite vs one node on PostgreSQL, c=64 (no cluster);
#   (h) 10,000 machines connected to the 3 nodes, and every node's view.
#
# On 2 cores the cluster shows correctness and overhead, not linear scaling:
# three nodes, three NATS servers, PostgreSQL, haproxy and the load
# generators all share the same two cores.
#
# Needs the Debian packages nats-server, postgresql, haproxy, plus jq, curl
# and python3. Everything runs on loopback and is stopped by PID.
#
#   bench/cluster.sh                 # ~3 minutes on 2 cores
#   MACHINES=2000 DURATION=5s bench/cluster.sh
#   PARTS=h bench/cluster.sh         # only (h); PARTS is any of f, g, h
#
# Before/after a change: BIN_DIR names prebuilt `vendgate` and
# `vendgate-sim` (nothing is built), e.g. an older revision's
# target/release.
set -euo pipefail
cd "$(dirname "$0")/.."

MACHINES=${MACHINES:-10000}
DURATION=${DURATION:-10s}
PARTS=${PARTS:-fgh}
export RUST_LOG=${RUST_LOG:-warn}
# The load generator is the only merchant; 64 simulated machines answer far
# more orders per second than a real machine would publish.
export VENDGATE_HTTP__RATE_LIMIT=0 VENDGATE_MQTT__MACHINE_PUBLISH_RATE=0 VENDGATE_MQTT__MAX_CONNECTIONS_PER_ADDRESS=0 VENDGATE_MQTT__ACCEPT_RATE_PER_ADDRESS=0

ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
if [ -n "${BIN_DIR:-}" ]; then
  B=$BIN_DIR
else
  cargo build --release -q -p vendgate -p vendgate-sim
  B=${CARGO_TARGET_DIR:-$PWD/target}/release
fi
W=$(mktemp -d -t vendgate-cluster-bench-XXXXXX)
export VGCLUSTER_STATE=$W/cluster.state VGCLUSTER_BIN=$B/vendgate
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do
    [ -n "$p" ] || continue
    kill "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  deploy/local-cluster/run.sh stop >/dev/null 2>&1 || true
  rm -rf "$W"
}
trap cleanup EXIT

port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
ROWS=()
row() { ROWS+=("| $1 | $2 | $3 |"); }

eval "$(deploy/local-cluster/run.sh --detach --print-env --nodes 3 --machines 0 2>"$W/run.log")"
read -r -a NODE_HTTP <<<"$VGCLUSTER_NODE_HTTP"
read -r -a NODE_MQTT <<<"$VGCLUSTER_NODE_MQTT"
read -r -a NODE_PIDS <<<"$VGCLUSTER_NODE_PIDS"
read -r -a NODE_CONFIGS <<<"$VGCLUSTER_NODE_CONFIGS"
CONF=${NODE_CONFIGS[0]}
APPID=$VGCLUSTER_APPID APPSECRET=$VGCLUSTER_APPSECRET
if [ -z "$APPID" ]; then
  "$B/vendgate" merchant add --name bench --config "$CONF" >"$W/merchant"
  APPID=$(sed -n 's/^appid=//p' "$W/merchant"); APPSECRET=$(sed -n 's/^appsecret=//p' "$W/merchant")
fi

# One load run: prints "orders/s p50 p99 cpu_us_per_order(of pid)".
load() { # api machines_csv concurrency pid
  local t0 t1
  t0=$(cpu_ticks "$4")
  VENDGATE_SIM_APPSECRET=$APPSECRET "$B/vendgate-sim" load --api "$1" --appid "$APPID" \
    --machines "$2" --concurrency "$3" --duration "$DURATION" --json >"$W/load.json"
  t1=$(cpu_ticks "$4")
  local ok thr p50 p99
  ok=$(jq .ok "$W/load.json"); thr=$(jq '.ok / .elapsed_s' "$W/load.json")
  p50=$(jq .latency.p50_ms "$W/load.json"); p99=$(jq .latency.p99_ms "$W/load.json")
  awk -v t="$thr" -v a="$p50" -v b="$p99" -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v n="$ok" \
    'BEGIN{ printf "%.0f %.2f %.2f %s\n", t, a, b, (n==0 ? "–" : sprintf("%.0f", d/hz*1e6/n)) }'
}

fleet() { # gateway csv outfile [extra args]
  local gw=$1 csv=$2 out=$3; shift 3
  "$B/vendgate-sim" fleet --gateway "$gw" --secrets "$csv" "$@" >"$out" 2>/dev/null &
  PIDS+=($!)
  for _ in $(seq 600); do grep -q "connected in" "$out" 2>/dev/null && return 0; sleep 0.1; done
  echo "fleet did not connect: $(cat "$out")" >&2; return 1
}

# ------------------------------------------------ (f) the cross-node hop
if [[ $PARTS == *f* ]]; then
"$B/vendgate" machine add --merchant "$APPID" --count 64 --first 20000000 \
  --secrets-out "$W/s64.csv" --config "$CONF" >/dev/null
fleet "${NODE_MQTT[0]}" "$W/s64.csv" "$W/fleet64.out" --products 1:1000000:100
F64=${PIDS[-1]}
# Wait until the other nodes' views have the machines.
for _ in $(seq 100); do
  n=$(curl -sf -H "Appid: $APPID" -H "AppSecret: $APPSECRET" \
    "${NODE_HTTP[1]}/api/openapi/v1/machines?online=true&page_size=100" | jq '.data.total // 0')
  [ "$n" -ge 64 ] && break; sleep 0.1
done
for c in 1 64; do
  read -r t1 a1 b1 u1 < <(load "${NODE_HTTP[0]}" "$W/s64.csv" $c "${NODE_PIDS[0]}")
  read -r t2 a2 b2 u2 < <(load "${NODE_HTTP[1]}" "$W/s64.csv" $c "${NODE_PIDS[1]}")
  row "(f) orders c=$c, order on the machine's node: orders/s, p50/p99 ms" "$t1, $a1/$b1" ""
  row "(f) orders c=$c, order on another node: orders/s, p50/p99 ms" "$t2, $a2/$b2" \
    "$(awk -v a="$a1" -v b="$a2" 'BEGIN{ printf "hop adds %+.2f ms to p50", b-a }')"
done
kill "$F64" 2>/dev/null; wait "$F64" 2>/dev/null || true
fi

# ------------------------------------ (g) one node: SQLite vs PostgreSQL
single() { # name database_url-or-empty
  local d=$W/single-$1 mp hp pid
  mp=$(port); hp=$(port); mkdir -p "$d"
  VENDGATE_DATABASE_URL=$2 "$B/vendgate" serve --data-dir "$d" --mqtt-addr 127.0.0.1:$mp --http-addr 127.0.0.1:$hp \
    >"$d/log" 2>&1 &
  pid=$!; PIDS+=($pid)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$hp/readyz" >/dev/null && break; sleep 0.1; done
  VENDGATE_DATABASE_URL=$2 "$B/vendgate" merchant add --name bench --data-dir "$d" >"$d/merchant"
  local appid secret
  appid=$(sed -n 's/^appid=//p' "$d/merchant"); secret=$(sed -n 's/^appsecret=//p' "$d/merchant")
  VENDGATE_DATABASE_URL=$2 "$B/vendgate" machine add --merchant "$appid" --count 64 --first 40000000 \
    --secrets-out "$d/s64.csv" --data-dir "$d" >/dev/null
  fleet "127.0.0.1:$mp" "$d/s64.csv" "$d/fleet.out" --products 1:1000000:100
  local f=${PIDS[-1]}
  APPID=$appid APPSECRET=$secret load "http://127.0.0.1:$hp" "$d/s64.csv" 64 "$pid"
  kill "$f" "$pid" 2>/dev/null; wait "$f" "$pid" 2>/dev/null || true
}
if [[ $PARTS == *g* ]]; then
read -r st sa sb su < <(single sqlite "")
PGDB=${VGCLUSTER_DATABASE_URL%/*}/bench_single
psql "$VGCLUSTER_DATABASE_URL" -qc "CREATE DATABASE bench_single" >/dev/null
read -r pt pa pb pu < <(single postgres "$PGDB")
row "(g) one node, SQLite, c=64: orders/s, p50/p99 ms, CPU µs/order" "$st, $sa/$sb, $su" ""
row "(g) one node, PostgreSQL, c=64: orders/s, p50/p99 ms, CPU µs/order" "$pt, $pa/$pb, $pu" \
  "$(awk -v a="$pt" -v b="$st" 'BEGIN{ printf "%.2f× SQLite", a/b }')"
fi

# ------------------------------------ (h) 10,000 machines over 3 nodes
if [[ $PARTS == *h* ]]; then
# Straight to the nodes, a third each: through haproxy 10,000 machines need
# ~20,000 descriptors in haproxy alone, this machine's hard limit (run.sh
# keeps haproxy's maxconn at 4000 for that reason).
"$B/vendgate" machine add --merchant "$APPID" --count "$MACHINES" --first 30000000 \
  --secrets-out "$W/many.csv" --config "$CONF" >/dev/null
split -n l/3 -d "$W/many.csv" "$W/many-part-"
t0=$(date +%s%3N)
i=0
for part in "$W"/many-part-*; do
  "$B/vendgate-sim" fleet --gateway "${NODE_MQTT[$i]}" --secrets "$part" --connect-rate 700 >"$part.out" 2>/dev/null &
  PIDS+=($!); i=$((i + 1))
done
# The parts only (many-part-NN), not their .out files, which the glob would
# also match: waiting for "….out.out" cost 60 s each and put t1 minutes
# after the storm.
for part in "$W"/many-part-[0-9][0-9]; do
  for _ in $(seq 600); do grep -q "connected in" "$part.out" 2>/dev/null && break; sleep 0.1; done
done
t1=$(date +%s%3N)
# Every node's view converges on all machines online.
conv=""
for _ in $(seq 300); do
  all=1
  for h in "${NODE_HTTP[@]}"; do
    n=$(curl -sf -u "$VGCLUSTER_OPERATOR_USER:$VGCLUSTER_OPERATOR_PASSWORD" "$h/dashboard/api/cluster" | jq '.machines_online // 0')
    [ "$n" -ge "$MACHINES" ] || all=0
  done
  [ $all = 1 ] && { conv=$(( $(date +%s%3N) - t1 )); break; }
  sleep 0.1
done
spread=$(curl -sf -u "$VGCLUSTER_OPERATOR_USER:$VGCLUSTER_OPERATOR_PASSWORD" "${NODE_HTTP[0]}/dashboard/api/cluster" \
  | jq -r '[.nodes[] | "\(.node_id) \(.machines)"] | join(", ")')
rss=$(for p in "${NODE_PIDS[@]}"; do awk '/VmRSS/{print $2}' "/proc/$p/status"; done | awk '{s+=$1} END{print s+0}')
# How the views got there: notes applied, and what the database re-read had
# to correct (online: a note lost or late; offline: undone notes), all nodes.
views=$(for h in "${NODE_HTTP[@]}"; do
  curl -sf -u "$VGCLUSTER_OPERATOR_USER:$VGCLUSTER_OPERATOR_PASSWORD" "$h/dashboard/api/cluster" \
    | jq -r '[.view.notes_applied // 0, .view.resync_online // 0, .view.resync_offline // 0] | @tsv'
done | awk '{a+=$1; b+=$2; c+=$3} END{printf "notes %d, re-read online %d / offline %d", a, b, c}')
row "(h) $MACHINES machines, a third to each node at 700/s each: all connected; every node's view complete" \
  "$(awk -v a=$((t1 - t0)) 'BEGIN{printf "%.2f s", a/1000}'); +${conv:-?} ms" "per node: $spread; views: $views; RSS of the 3 nodes $((rss / 1024)) MB"
fi

echo
echo "vendgate cluster benchmark ($(date -u +%FT%TZ), $(nproc) cores, DURATION=$DURATION)"
echo
echo "| measure | figure | note |"
echo "| --- | --- | --- |"
printf '%s\n' "${ROWS[@]}"
