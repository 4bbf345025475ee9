#!/usr/bin/env bash
# Quick multiplexed-mode measurements (the full side-by-side benchmark is
# bench/run.sh):
#   1. echo round trips/s, 100 connections, 64-byte messages, multiplexed
#      (pool_size 2, both envelopes) over direct, through the same broker to
#      the same demo upstream, and the ratios;
#   2. broker RSS per idle multiplexed session at 10,000 sessions, and the
#      upstream sockets carrying them (clients per upstream socket).
# Usage: bench/mux.sh [DURATION] [SESSIONS]   (defaults 10s, 10000)
set -euo pipefail
source "$(dirname "$0")/common.sh"
duration=${1:-10s}
sessions=${2:-10000}

"$bin/demo-upstream" 127.0.0.1:3100 & upstream=$!; pids+=($upstream)
cat > "$work/muxgate.yaml" <<YAML
server:
  listen: 127.0.0.1:8180
  admin_listen: 127.0.0.1:9190
  max_connections: 100000
upstreams:
  - name: direct
    routes: [{external_path: /ws/direct, internal_path: /echo}]
    targets: [{url: "ws://127.0.0.1:3100"}]
    websocket_config: {enable_direct_communication: true, ping_period: 120s, pong_wait: 180s}
  - name: mux-json
    routes: [{external_path: /ws/mux-json, internal_path: /echo}]
    targets: [{url: "ws://127.0.0.1:3100"}]
    websocket_config: {enable_direct_communication: false, envelope: json, pool_size: 2, ping_period: 120s, pong_wait: 180s}
  - name: mux-binary
    routes: [{external_path: /ws/mux-binary, internal_path: /echo}]
    targets: [{url: "ws://127.0.0.1:3100"}]
    websocket_config: {enable_direct_communication: false, envelope: binary, pool_size: 2, ping_period: 120s, pong_wait: 180s}
YAML
"$bin/muxgate" --config "$work/muxgate.yaml" --log-level warn & broker=$!; pids+=($broker)
wait_port 3100; wait_port 8180

echo "## echo, 100 connections, 64 B, $duration each"
declare -A r
for route in direct mux-json mux-binary; do
  out=$("$bin/loadgen" echo --url "ws://127.0.0.1:8180/ws/$route" -c 100 --size 64 --duration "$duration")
  echo "$route: $out"
  r[$route]=$(rate "$out")
done
awk -v d="${r[direct]}" -v j="${r[mux-json]}" -v b="${r[mux-binary]}" \
  'BEGIN { printf "ratio multiplexed/direct: json %.3f, binary %.3f\n", j / d, b / d }'

echo "## RSS, $sessions idle multiplexed sessions (binary envelope, pool_size 2)"
before=$(rss_kib "$broker")
mkfifo "$work/idle.out"
"$bin/loadgen" idle --url ws://127.0.0.1:8180/ws/mux-binary -c "$sessions" --hold 120s > "$work/idle.out" & idle=$!; pids+=($idle)
read -r line < "$work/idle.out"
after=$(rss_kib "$broker")
echo "$line; broker RSS before ${before} KiB, after ${after} KiB: $(( (after - before) * 1024 / sessions )) B per idle multiplexed session"
# Every TCP connection from the broker to the upstream now (the direct
# route's sessions are all closed): the two pools of two.
up=$(ss -Htn state established '( dport = :3100 )' | wc -l)
echo "broker->upstream sockets: $up (mux-json pool 2 + mux-binary pool 2); clients per upstream socket on mux-binary: $(( sessions / 2 ))"
curl -s http://127.0.0.1:9190/metrics | grep -E '^muxgate_mux_connections\{.*live' || true
kill "$idle" 2>/dev/null || true
