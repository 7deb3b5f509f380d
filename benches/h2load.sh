#!/usr/bin/env bash
# multiraft write throughput with h2load, the same way ../shared/bench's
# etcd-baseline.sh measures etcd: start a local cluster, send raw gRPC
# KV/Put calls (16-byte key, VALUE_LEN-byte value, C connections x M
# streams) to the leader of the key's partition, check that exactly the
# completed requests were applied, print one summary line
#     multiraft3 put ops/s: N      (multiraft1 with NODES=1)
#
# The request body is built below, the same bytes as an etcd Put of the
# same key and value: multiraft's PutRequest uses etcd's field numbers
# (key = 1, value = 2), and partition_id = 0 routes the key by hash.
#
# Needs: h2load (apt-get install nghttp2-client), python3, a release build
# (cargo build --release).
#
# Knobs (environment): NODES=3 PARTITIONS=8 C=8 M=64 DURATION_S=10
# VALUE_LEN=128 BASE_PORT=7400 TARGET=leader|follower SHARDS=
set -euo pipefail

NODES=${NODES:-3}
PARTITIONS=${PARTITIONS:-8}
C=${C:-8}
M=${M:-64}
DURATION_S=${DURATION_S:-10}
VALUE_LEN=${VALUE_LEN:-128}
BASE_PORT=${BASE_PORT:-7400}
TARGET=${TARGET:-leader}
SHARDS=${SHARDS:-}
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${BIN:-$HERE/../target/release/multiraft}

for b in h2load python3 "$BIN"; do
  command -v "$b" >/dev/null || { echo "missing $b" >&2; exit 2; }
done

WORK=$(mktemp -d /tmp/multiraft-h2load.XXXXXX)
CPID=
cleanup() {
  if [ -n "$CPID" ]; then kill -INT "$CPID" 2>/dev/null || true; wait "$CPID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" cluster --nodes "$NODES" --partitions "$PARTITIONS" --dir "$WORK/cluster" \
  --base-port "$BASE_PORT" ${SHARDS:+--shards "$SHARDS"} > "$WORK/cluster.out" 2> "$WORK/cluster.err" &
CPID=$!
for _ in $(seq 300); do grep -q '^ready:' "$WORK/cluster.out" 2>/dev/null && break; sleep 0.1; done
grep -q '^ready:' "$WORK/cluster.out" || { cat "$WORK/cluster.err" >&2; echo "cluster did not start" >&2; exit 1; }

# Leaders move for a few seconds after Bootstrap (they are spread over the
# nodes in small steps): measure once they stay put for a balancing round.
leaders() { "$BIN" status --addr "127.0.0.1:$((BASE_PORT + 1))" --json |
  python3 -c 'import json,sys; print(sorted((p["partitionId"], p["leaderId"]) for p in json.load(sys.stdin)["partitions"]))'; }
prev=$(leaders)
for _ in $(seq 10); do
  sleep 4
  now=$(leaders)
  [ "$now" = "$prev" ] && break
  prev=$now
done

BODY="$WORK/put.bin"
# 5-byte gRPC prefix + PutRequest { key = 1: 16 bytes, value = 2: VALUE_LEN }.
python3 - "$BODY" "$VALUE_LEN" <<'EOF'
import struct, sys
def varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)
def field(num, data):
    return varint(num << 3 | 2) + varint(len(data)) + data
key = b"bench-key-000000"
value = bytes((i * 31 + 7) % 256 for i in range(int(sys.argv[2])))
msg = field(1, key) + field(2, value)
open(sys.argv[1], "wb").write(struct.pack(">BI", 0, len(msg)) + msg)
EOF
api() { echo "127.0.0.1:$((BASE_PORT + $1))"; }

# One Put tells which partition the key lives in; Status tells its leader.
h2load -n 1 -c 1 -d "$BODY" -H 'content-type: application/grpc' -H 'te: trailers' \
  "http://$(api 1)/multiraft.kv.v1.KV/Put" >/dev/null
status() { "$BIN" status --addr "$(api "$1")" --json; }
read -r PART LEADER < <(status 1 | python3 -c '
import json, sys
st = json.load(sys.stdin)
busy = max(st["partitions"], key=lambda p: p["appliedIndex"])
print(busy["partitionId"], busy["leaderId"])')
if [ "$TARGET" = follower ] && [ "$NODES" -gt 1 ]; then N=$((LEADER % NODES + 1)); else N=$LEADER; fi
applied() { status "$1" | python3 -c 'import json,sys; print(sum(s["commandsApplied"] for s in json.load(sys.stdin)["shardStats"]))'; }

a0=$(applied "$N")
h2load -t 1 -c "$C" -m "$M" -D "$DURATION_S" -d "$BODY" \
  -H 'content-type: application/grpc' -H 'te: trailers' \
  "http://$(api "$N")/multiraft.kv.v1.KV/Put" > "$WORK/h2load.out"
# Calls still in flight when -D stopped may apply a moment later.
prev=-1; a1=$(applied "$N")
while [ "$a1" != "$prev" ]; do sleep 0.2; prev=$a1; a1=$(applied "$N"); done

python3 - "$WORK/h2load.out" "$a0" "$a1" "$NODES" "$C" "$M" "$VALUE_LEN" "$N" "$PART" "$DURATION_S" <<'EOF'
import re, sys
out = open(sys.argv[1]).read()
a0, a1, nodes, c, m, vlen, n, part, dur = sys.argv[2:11]
req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded", out)
tr = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", out)
done = int(req.group(3))
applied = int(a1) - int(a0)
# Every applied Put was acknowledged with grpc-status 0 unless it was
# still in flight at the end; h2load only sees HTTP status codes.
ok = "OK" if applied >= done else "MISMATCH"
print("detail: nodes=%s c=%s m=%s value=%sB target=node%s partition=%s h2load_done=%d applied=%d %s "
      "latency min/max/mean/sd=%s/%s/%s/%s" % (nodes, c, m, vlen, n, part, done, applied, ok, *tr.groups()))
print("multiraft%s put ops/s: %d" % (nodes, round(applied / float(dur))))
EOF
