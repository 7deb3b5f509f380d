#!/usr/bin/env bash
# Many partitions per node: what idle groups cost, and what load on some
# of them gets. Starts a local 3-node cluster with N partitions (every
# node a member of every partition), then prints one table row per N:
#
#   partitions | Bootstrap | idle CPU per node | RSS per node | peer bytes/s
#     | leaders per node | Put/s with K active partitions (for each K)
#
# - Bootstrap: from launching `multiraft cluster` until it reports every
#   partition has a leader (node start-up included).
# - idle CPU: % of one core per node process, from /proc/PID/stat over
#   IDLE_S seconds, SETTLE_S seconds after Bootstrap (groups go quiet and
#   leaders even out meanwhile).
# - peer bytes/s: loopback traffic over the same window, divided by the
#   node count (with no clients, that is the nodes talking to each other).
# - Put/s: `multiraft bench` against the running cluster, loading only
#   partitions 1..=K (8 connections x 64 streams, 128-byte values), each
#   call sent to its partition's leader (ROUTE=any: over whichever
#   connection the worker has, so two calls in three reach a follower,
#   which forwards them). With
#   ROUNDS > 1 the K values are run in turn ROUNDS times and each column
#   is the median (a run pays for the snapshots the previous one left, and
#   single runs on a shared machine vary a lot); every run is also printed
#   to stderr.
#
# Needs: a release build (cargo build --release), python3, Linux /proc.
#
# Knobs (environment): PARTITIONS="1000 10000" ACTIVE="16 1024"
# SETTLE_S=20 IDLE_S=30 BENCH_S=10 ROUNDS=1 BASE_PORT=7700 SHARDS=
# ROUTE=leader
set -euo pipefail

PARTITIONS=${PARTITIONS:-"1000 10000"}
ACTIVE=${ACTIVE:-"16 1024"}
SETTLE_S=${SETTLE_S:-20}
IDLE_S=${IDLE_S:-30}
BENCH_S=${BENCH_S:-10}
ROUNDS=${ROUNDS:-1}
BASE_PORT=${BASE_PORT:-7700}
SHARDS=${SHARDS:-}
ROUTE=${ROUTE:-leader}
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${BIN:-$HERE/../target/release/multiraft}

for b in python3 "$BIN"; do
  command -v "$b" >/dev/null || { echo "missing $b" >&2; exit 2; }
done

WORK=$(mktemp -d /tmp/multiraft-partitions.XXXXXX)
CPID=
stop_cluster() {
  if [ -n "$CPID" ]; then kill -INT "$CPID" 2>/dev/null || true; wait "$CPID" 2>/dev/null || true; fi
  CPID=
}
trap 'stop_cluster; rm -rf "$WORK"' EXIT

ADDRS=$(for i in 1 2 3; do printf '127.0.0.1:%d,' $((BASE_PORT + i)); done)
ADDRS=${ADDRS%,}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
lo_bytes() { awk '$1 == "lo:" {print $2}' /proc/net/dev; }

printf '| partitions | Bootstrap | idle CPU per node | RSS per node | peer bytes/s per node | leaders per node |'
for k in $ACTIVE; do printf ' Put/s, %s active |' "$k"; done
printf '\n|---|---|---|---|---|---|'
for _ in $ACTIVE; do printf -- '---|'; done
printf '\n'

for n in $PARTITIONS; do
  dir="$WORK/c$n"
  t0=$(date +%s.%N)
  "$BIN" cluster --nodes 3 --partitions "$n" --dir "$dir" --base-port "$BASE_PORT" \
    ${SHARDS:+--shards "$SHARDS"} > "$WORK/out" 2> "$WORK/err" &
  CPID=$!
  for _ in $(seq 1200); do grep -q '^ready:' "$WORK/out" 2>/dev/null && break; sleep 0.05; done
  grep -q '^ready:' "$WORK/out" || { cat "$WORK/err" >&2; echo "cluster did not start" >&2; exit 1; }
  boot=$(python3 -c "import time; print(f'{time.time() - $t0:.1f} s')")
  sleep "$SETTLE_S"

  pids=()
  for i in 1 2 3; do pids+=("$(pgrep -f "serve --node-id $i .*$dir/node-$i" | head -1)"); done
  declare -A before=()
  for p in "${pids[@]}"; do before[$p]=$(cpu_ticks "$p"); done
  lo0=$(lo_bytes)
  sleep "$IDLE_S"
  lo1=$(lo_bytes)
  hz=$(getconf CLK_TCK)
  cpu=() rss=()
  for p in "${pids[@]}"; do
    cpu+=("$(python3 -c "print(f'{($(cpu_ticks "$p") - ${before[$p]}) * 100 / $hz / $IDLE_S:.1f}%')")")
    rss+=("$(awk '/VmRSS/ {printf "%d", $2 / 1024}' "/proc/$p/status")")
  done
  peer=$(python3 -c "print(f'{($lo1 - $lo0) / $IDLE_S / 3 / 1000:.1f} kB/s')")
  leaders=$(for i in 1 2 3; do
    "$BIN" status --addr "127.0.0.1:$((BASE_PORT + i))" --json |
      python3 -c 'import json,sys; print(sum(p["role"] == "ROLE_LEADER" for p in json.load(sys.stdin)["partitions"]))'
  done | paste -sd/)
  declare -A runs=()
  for _ in $(seq "$ROUNDS"); do
    for k in $ACTIVE; do
      # More active partitions than there are: all of them (the others
      # would only answer NOT_FOUND); the cell says so.
      v=$("$BIN" bench --addr "$ADDRS" --active-partitions "$((k < n ? k : n))" --duration "${BENCH_S}s" \
        --route "$ROUTE" --verify-keys 0 --json 2>/dev/null | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["ops_per_sec"]))')
      echo "partitions $n, $k active: $v Put/s" >&2
      runs[$k]="${runs[$k]:-} $v"
    done
  done
  puts=()
  for k in $ACTIVE; do
    m=$(python3 -c 'import statistics,sys; print(round(statistics.median(map(int, sys.argv[1:]))))' ${runs[$k]})
    if [ "$k" -gt "$n" ]; then m="$m (all $n)"; fi
    puts+=("$m")
  done
  unset runs
  stop_cluster
  printf '| %s | %s | %s | %s MiB | %s | %s |' "$n" "$boot" "$(IFS=/; echo "${cpu[*]}")" \
    "$(IFS=/; echo "${rss[*]}")" "$peer" "$leaders"
  for v in "${puts[@]}"; do printf ' %s |' "$v"; done
  printf '\n'
  rm -rf "$dir"
done
