#!/usr/bin/env bash
# Two builds side by side: each starts its own local 3-node cluster with
# N partitions, and both take the same load at the same moment, so both
# see the machine as it is then. On a shared machine one build's runs vary
# by a third from one hour to the next, far more than most changes move
# them; running the two at once turns that drift into pairs of runs that
# can be compared.
#
# For each load (K active partitions, `multiraft bench --active-partitions
# K`, 8 x 64 in flight) and round, prints one line per build: Put/s, node
# CPU per Put (the three node processes, from /proc/PID/stat) and client
# CPU per Put. Then per K: the median node CPU per Put of each build, and
# in how many pairs A used less than B; the same once more divided by the
# client's CPU per Put (the client does the same work for both builds, so
# that tracks how fast the machine ran for each). Compare node CPU per
# Put, not Put/s: two clusters sharing the cores split them as the
# scheduler pleases, so neither build's Put/s is its own. The build in
# position A has come out about 2% cheaper than the same build in B;
# for small differences, run again with the two swapped.
#
# Usage: benches/pair.sh BIN_A BIN_B   (release builds of the two versions)
# Each build's cluster is loaded by that build's own `multiraft bench`;
# BENCH=path loads both with the same client (for changes the client
# shares, such as the allocator, so that its CPU per Put stays a fair
# yardstick).
# Needs: python3, Linux /proc.
#
# Knobs (environment): PARTITIONS=10000 ACTIVE="1024 16" ROUNDS=3
# BENCH_S=8 SETTLE_S=15 PORT_A=7800 PORT_B=8600 BENCH= ROUTE= (passed to
# bench as --route when set; builds before it have no such option)
set -euo pipefail

[ $# -eq 2 ] || { echo "usage: $0 BIN_A BIN_B" >&2; exit 2; }
BIN_A=$(realpath "$1")
BIN_B=$(realpath "$2")
PARTITIONS=${PARTITIONS:-10000}
ACTIVE=${ACTIVE:-"1024 16"}
ROUNDS=${ROUNDS:-3}
BENCH_S=${BENCH_S:-8}
SETTLE_S=${SETTLE_S:-15}
PORT_A=${PORT_A:-7800}
PORT_B=${PORT_B:-8600}
BENCH=${BENCH:-}
export ROUTE=${ROUTE:-}

for b in python3 "$BIN_A" "$BIN_B"; do
  command -v "$b" >/dev/null || { echo "missing $b" >&2; exit 2; }
done

WORK=$(mktemp -d /tmp/multiraft-pair.XXXXXX)
CPIDS=()
cleanup() {
  for c in "${CPIDS[@]}"; do kill -INT "$c" 2>/dev/null || true; done
  for c in "${CPIDS[@]}"; do wait "$c" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

addrs() { printf '127.0.0.1:%d,127.0.0.1:%d,127.0.0.1:%d' $(($1 + 1)) $(($1 + 2)) $(($1 + 3)); }
# Summed user + system ticks of the given processes.
ticks() { awk '{s += $14 + $15} END {print s}' $(printf '/proc/%s/stat ' "$@"); }

# start NAME BIN PORT: a cluster in $WORK/NAME; waits until it is ready.
start() {
  local dir=$WORK/$1
  "$2" cluster --nodes 3 --partitions "$PARTITIONS" --dir "$dir" --base-port "$3" \
    > "$WORK/$1.out" 2> "$WORK/$1.err" &
  CPIDS+=($!)
  for _ in $(seq 1200); do grep -q '^ready:' "$WORK/$1.out" 2>/dev/null && break; sleep 0.05; done
  grep -q '^ready:' "$WORK/$1.out" || { cat "$WORK/$1.err" >&2; echo "cluster $1 did not start" >&2; exit 1; }
}
node_pids() {
  for i in 1 2 3; do pgrep -f "serve --node-id $i .*$WORK/$1/node-$i" | head -1; done
}

# load NAME BIN PORT K: one bench run; writes "requests Put/s client_cpu_s".
load() {
  python3 - "$2" "$(addrs "$3")" "$4" "$BENCH_S" > "$WORK/$1.load" <<'PY'
import json, os, resource, subprocess, sys
bin_, addrs, k, secs = sys.argv[1:]
route = ["--route", os.environ["ROUTE"]] if os.environ.get("ROUTE") else []
out = subprocess.run([bin_, "bench", "--addr", addrs, "--active-partitions", k,
                      "--duration", f"{secs}s", "--verify-keys", "0", "--json"] + route,
                     capture_output=True, text=True, check=True).stdout
d = json.loads(out)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(d["requests"], d["ops_per_sec"], r.ru_utime + r.ru_stime)
PY
}

start a "$BIN_A" "$PORT_A"
start b "$BIN_B" "$PORT_B"
sleep "$SETTLE_S"
mapfile -t PIDS_A < <(node_pids a)
mapfile -t PIDS_B < <(node_pids b)
hz=$(getconf CLK_TCK)

echo "A: $BIN_A"
echo "B: $BIN_B"
declare -A rows=() norm=()
for round in $(seq "$ROUNDS"); do
  for k in $ACTIVE; do
    a0=$(ticks "${PIDS_A[@]}"); b0=$(ticks "${PIDS_B[@]}")
    load a "${BENCH:-$BIN_A}" "$PORT_A" "$k" & la=$!
    load b "${BENCH:-$BIN_B}" "$PORT_B" "$k" & lb=$!
    wait "$la" "$lb"
    a1=$(ticks "${PIDS_A[@]}"); b1=$(ticks "${PIDS_B[@]}")
    for x in a b; do
      read -r reqs rate client < "$WORK/$x.load"
      if [ $x = a ]; then t=$((a1 - a0)); else t=$((b1 - b0)); fi
      node_us=$(python3 -c "print(f'{$t / $hz * 1e6 / $reqs:.1f}')")
      client_us=$(python3 -c "print(f'{$client * 1e6 / $reqs:.1f}')")
      printf 'round %d, %s active, %s: %.0f Put/s, node %s µs/Put, client %s µs/Put\n' \
        "$round" "$k" "${x^^}" "$rate" "$node_us" "$client_us"
      rows[$k.$x]="${rows[$k.$x]:-} $node_us"
      norm[$k.$x]="${norm[$k.$x]:-} $(python3 -c "print($node_us / $client_us)")"
    done
  done
done

for k in $ACTIVE; do
  python3 - "$k" "${rows[$k.a]}" "${rows[$k.b]}" "${norm[$k.a]}" "${norm[$k.b]}" <<'PY'
import statistics, sys
k = sys.argv[1]
a, b, na, nb = (list(map(float, v.split())) for v in sys.argv[2:6])
def cmp(x, y):
    wins = sum(p < q for p, q in zip(x, y))
    return f"A/B median {statistics.median(p / q for p, q in zip(x, y)):.3f}, A lower in {wins} of {len(x)} pairs"
print(f"{k} active: node CPU per Put, median A {statistics.median(a):.1f} µs, "
      f"B {statistics.median(b):.1f} µs; {cmp(a, b)}")
# The client does the same work per Put in both: its CPU per Put tracks
# how fast the machine ran for that cluster, a check on the pairing.
print(f"{k} active: node CPU per Put / client CPU per Put: {cmp(na, nb)}")
PY
done
