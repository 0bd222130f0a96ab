#!/usr/bin/env bash
# Side-by-side benchmark of vendgate against Mosquitto on this machine
# (BENCHMARKS.md explains every row). Installs nothing: Mosquitto is used if
# `mosquitto` is on PATH (Debian package `mosquitto`), started here on a free
# loopback port with TCP_NODELAY, and stopped by its PID. Needs jq and
# python3 (for free ports). Loopback only; every load is bounded.
#
#   bench/compare.sh            # full run (~2 minutes on 2 cores)
#   MACHINES=2000 bench/compare.sh
#
# Before/after a change, in one session: build the old revision in a
# worktree, then run both back to back on a quiet machine:
#   BIN_DIR=/old/target/release HUB_BENCH=/old/target/release/deps/hub-<hash> bench/compare.sh
# BIN_DIR: prebuilt `vendgate` and `vendgate-sim` (nothing is built);
# HUB_BENCH: a prebuilt `hub` bench executable for row (b);
# ONLY="a d": only the rows named (MACHINES=64 saves provisioning for a).
set -euo pipefail
cd "$(dirname "$0")/.."

MACHINES=${MACHINES:-10000}
OFFLINE=${OFFLINE:-1000}
DURATION=${DURATION:-10s}
export RUST_LOG=${RUST_LOG:-warn}

ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
if [ -n "${BIN_DIR:-}" ]; then
  B=$BIN_DIR
else
  cargo build --release -q -p vendgate -p vendgate-sim
  B=$PWD/target/release
fi
W=$(mktemp -d -t vendgate-compare-XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do
    [ -n "$p" ] || continue
    kill -CONT "$p" 2>/dev/null || true
    kill "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
rss_kb() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
now_ms() { date +%s%3N; }
ROWS=()
row() { ROWS+=("| $1 | $2 | $3 | $4 |"); }
report() {
  echo
  echo "vendgate vs Mosquitto — $(nproc) cores, $(uname -m), $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "| measure | vendgate | Mosquitto | vendgate/Mosquitto |"
  echo "| --- | --- | --- | --- |"
  printf '%s\n' "${ROWS[@]}"
  exit 0
}
# ONLY="a d": just those rows (e.g. ONLY=a MACHINES=64 for a quick broker
# comparison, ONLY=d for memory).
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b+0==0) print "–"; else printf "%.2f×", a/b }'; }

# ---------------------------------------------------------------- vendgate
VM=$(port); VH=$(port)
D=$W/vendgate
# No merchant rate limit: the load generator is the only client. No machine
# publish rate either: in (c) 64 simulated machines answer ~1,000 orders/s,
# far beyond what one real machine sends (mqtt.machine_publish_rate). Every
# simulated machine connects from 127.0.0.1, so no per-address limits.
VENDGATE_HTTP__RATE_LIMIT=0 VENDGATE_MQTT__MACHINE_PUBLISH_RATE=0 VENDGATE_MQTT__MAX_CONNECTIONS_PER_ADDRESS=0 VENDGATE_MQTT__ACCEPT_RATE_PER_ADDRESS=0 "$B/vendgate" serve --data-dir "$D" --mqtt-addr 127.0.0.1:$VM --http-addr 127.0.0.1:$VH \
  >"$W/vendgate.log" 2>&1 &
GW=$!; PIDS+=($GW)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$VH/healthz" >/dev/null && break; sleep 0.1; done
"$B/vendgate" merchant add --name bench --data-dir "$D" >"$W/merchant"
APPID=$(sed -n 's/^appid=//p' "$W/merchant"); APPSECRET=$(sed -n 's/^appsecret=//p' "$W/merchant")
"$B/vendgate" service add --name rr --data-dir "$D" >"$W/service"
SU=$(sed -n 's/^username=//p' "$W/service"); SP=$(sed -n 's/^password=//p' "$W/service")
"$B/vendgate" machine add --merchant "$APPID" --count "$MACHINES" --first 10000000 \
  --secrets-out "$W/secrets.csv" --data-dir "$D" >/dev/null

# ---------------------------------------------------------------- Mosquitto
MOSQ=""
if command -v mosquitto >/dev/null 2>&1; then
  MP=$(port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nmax_connections -1\n' "$MP" >"$W/mosquitto.conf"
  mosquitto -c "$W/mosquitto.conf" >"$W/mosquitto.log" 2>&1 &
  MOSQ=$!; PIDS+=($MOSQ)
  sleep 0.5
else
  echo "mosquitto not installed (apt-get install mosquitto): Mosquitto columns stay empty" >&2
fi

if want a; then
# (a) bare MQTT request/response, alternating brokers, with each broker's
# CPU per round trip (utime+stime of its process over the run / round trips)
HZ=$(getconf CLK_TCK)
rr_on() { # broker pid, out json, rr args...: prints "rt/s p99 cpu_µs_per_rt"
  local pid=$1 out=$2; shift 2
  local t0 t1
  t0=$(cpu_ticks "$pid")
  "$B/vendgate-sim" rr "$@" --json >"$out"
  t1=$(cpu_ticks "$pid")
  awk -v thr="$(jq .throughput "$out")" -v p99="$(jq .p99_ms "$out")" -v n="$(jq .count "$out")" \
      -v d=$((t1 - t0)) -v hz="$HZ" 'BEGIN{ printf "%.0f %.2f %s\n", thr, p99, (n==0 ? "–" : sprintf("%.1f", d/hz*1e6/n)) }'
}
rr_row() { # label, rr args...
  local label=$1; shift
  local v m="" cell_m="–" ratio_cpu="–"
  if [ -n "$MOSQ" ]; then
    m=$(rr_on "$MOSQ" "$W/rr-m.json" --broker 127.0.0.1:$MP "$@")
    cell_m=$(echo "$m" | awk '{printf "%s (%s), %s µs", $1, $2, $3}')
  fi
  v=$(rr_on "$GW" "$W/rr-v.json" --broker 127.0.0.1:$VM --username "$SU" --password "$SP" "$@")
  [ -n "$m" ] && ratio_cpu=$(ratio "$(echo "$v" | cut -d' ' -f3)" "$(echo "$m" | cut -d' ' -f3)")
  row "$label: rt/s (p99 ms), broker CPU µs/rt" "$(echo "$v" | awk '{printf "%s (%s), %s µs", $1, $2, $3}')" "$cell_m" \
      "$(ratio "$(echo "$v" | cut -d' ' -f1)" "$(echo "${m:-0}" | cut -d' ' -f1)") rt/s, $ratio_cpu CPU"
  LAST_M_THR=$(echo "${m:-}" | cut -d' ' -f1)
}
rr_row "(a) MQTT QoS 1 rr c=1" --concurrency 1 --count 5000
rr_row "(a) MQTT QoS 1 rr c=64" --concurrency 64 --count 50000
MOSQ_RR64=${LAST_M_THR:-}
# Many connections: 64 requesters (one request outstanding each) and one
# responder for all of them, then one responder per requester, each
# subscribed to its own topic (64 + 64 subscribed sessions).
rr_row "(a) rr 64 requester conns + 1 responder" --requesters 64 --responders 1 --concurrency 64 --count 100000
rr_row "(a) rr 64 requester conns + 64 responder conns" --requesters 64 --responders 64 --concurrency 64 --count 100000
fi

if want b; then
# (b) the hub's own command round trip (cmd/ping → pong), in-process bench
if [ -n "${HUB_BENCH:-}" ]; then
  "$HUB_BENCH" --bench 2>/dev/null | grep -E "ping round trip|connect -> online" >"$W/hub.txt" || true
else
  cargo bench -q -p vendgate-e2e --bench hub 2>/dev/null | grep -E "ping round trip|connect -> online" >"$W/hub.txt" || true
fi
while read -r line; do
  name=$(echo "$line" | sed -E 's/ +n=.*//'); rate=$(echo "$line" | sed -E 's/.*rate= *([0-9]+).*/\1/')
  p99=$(echo "$line" | sed -E 's/.*p99= *([0-9.]+)ms.*/\1/')
  row "(b) $name: per s (p99 ms)" "$rate ($p99)" "–" "–"
done <"$W/hub.txt"
fi

if want c; then
# (c) full orders through vendgate: 64 machines, HTTP load c=1 and c=64
head -64 "$W/secrets.csv" >"$W/s64.csv"
"$B/vendgate-sim" fleet --gateway 127.0.0.1:$VM --secrets "$W/s64.csv" --products 1:1000000:100 >"$W/fleet64.out" 2>/dev/null &
F64=$!; PIDS+=($F64)
for _ in $(seq 300); do grep -q "connected in" "$W/fleet64.out" 2>/dev/null && break; sleep 0.1; done
for c in 1 64; do
  t0=$(cpu_ticks $GW)
  VENDGATE_SIM_APPSECRET=$APPSECRET "$B/vendgate-sim" load --api "http://127.0.0.1:$VH" --appid "$APPID" \
    --machines "$W/s64.csv" --concurrency $c --duration "$DURATION" --json >"$W/load-$c.json"
  t1=$(cpu_ticks $GW)
  ok=$(jq .ok "$W/load-$c.json"); thr=$(jq '.ok / .elapsed_s' "$W/load-$c.json")
  p50=$(jq .latency.p50_ms "$W/load-$c.json"); p99=$(jq .latency.p99_ms "$W/load-$c.json")
  cpu_us=$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v n="$ok" 'BEGIN{ if (n==0) print "–"; else printf "%.0f", d/hz*1e6/n }')
  row "(c) orders c=$c: orders/s, p50/p99 ms, gateway CPU µs/order" "$(printf '%.0f, %.1f/%.1f, %s' "$thr" "$p50" "$p99" "$cpu_us")" "–" \
      "$([ $c = 64 ] && ratio "$thr" "${MOSQ_RR64:-0}" || echo –) of Mosquitto rr"
done
kill $F64 2>/dev/null; wait $F64 2>/dev/null || true
fi

if want d; then
# (d) many machines connecting, then a reconnect storm
connect_fleet() { # broker port, out file; prints pid
  "$B/vendgate-sim" fleet --gateway 127.0.0.1:$1 --secrets "$W/secrets.csv" --machines "$MACHINES" --connect-rate "$2" >"$3" 2>/dev/null &
  echo $!
}
wait_connected() { for _ in $(seq 900); do grep -q "connected in" "$1" 2>/dev/null && { sed -E 's/.*connected in ([0-9.]+)s.*/\1/' "$1"; return; }; sleep 0.1; done; echo timeout; }
for target in vendgate mosquitto; do
  if [ $target = mosquitto ] && [ -z "$MOSQ" ]; then continue; fi
  P=$([ $target = vendgate ] && echo $VM || echo $MP); BP=$([ $target = vendgate ] && echo $GW || echo $MOSQ)
  r0=$(rss_kb $BP)
  F=$(connect_fleet $P 2000 "$W/fleet-$target.out"); PIDS+=($F)
  t=$(wait_connected "$W/fleet-$target.out"); r1=$(rss_kb $BP)
  per=$(awk -v a=$r0 -v b=$r1 -v n=$MACHINES 'BEGIN{printf "%.2f", (b-a)/n}')
  kill -9 $F; wait $F 2>/dev/null || true
  F=$(connect_fleet $P 0 "$W/storm-$target.out"); PIDS+=($F)
  ts=$(wait_connected "$W/storm-$target.out")
  kill $F; wait $F 2>/dev/null || true
  eval "D_$target='$t s, storm $ts s, $per KB/conn'"
done
row "(d) $MACHINES machines at 2,000/s: all connected, storm, RSS/conn" "${D_vendgate:-–}" "${D_mosquitto:-–}" "–"
fi

if want e; then
# (e) offline detection: $OFFLINE sockets closed at once, then one silent machine
online() { curl -s "http://127.0.0.1:$VH/api/openapi/v1/machines?online=true&page_size=1" -H "Appid: $APPID" -H "AppSecret: $APPSECRET" | jq '.data.total // 0'; }
head -"$OFFLINE" "$W/secrets.csv" >"$W/off.csv"
"$B/vendgate-sim" fleet --gateway 127.0.0.1:$VM --secrets "$W/off.csv" >"$W/off.out" 2>/dev/null &
F=$!; PIDS+=($F)
wait_connected "$W/off.out" >/dev/null
for _ in $(seq 200); do [ "$(online)" -ge "$OFFLINE" ] && break; sleep 0.05; done
t0=$(now_ms); kill -9 $F; wait $F 2>/dev/null || true
half=""; p99=""
for _ in $(seq 2000); do
  n=$(online); t=$(( $(now_ms) - t0 ))
  [ -z "$half" ] && [ "$n" -le $((OFFLINE / 2)) ] && half=$t
  [ "$n" -le $((OFFLINE / 100)) ] && { p99=$t; break; }
  sleep 0.01
done
row "(e) $OFFLINE sockets closed: offline p50 / p99 (ms, API view)" "${half:-–} / ${p99:-–}" "–" "–"
head -1 "$W/secrets.csv" >"$W/one.csv"
"$B/vendgate-sim" fleet --gateway 127.0.0.1:$VM --secrets "$W/one.csv" --keep-alive 2 >"$W/one.out" 2>/dev/null &
F=$!; PIDS+=($F)
wait_connected "$W/one.out" >/dev/null
for _ in $(seq 100); do [ "$(online)" -ge 1 ] && break; sleep 0.05; done
t0=$(now_ms); kill -STOP $F
for _ in $(seq 1000); do [ "$(online)" -eq 0 ] && break; sleep 0.02; done
row "(e) silent machine (keep alive 2 s, process stopped): offline after" "$(( $(now_ms) - t0 )) ms" "–" "–"
kill -CONT $F; kill $F 2>/dev/null || true
fi

report
