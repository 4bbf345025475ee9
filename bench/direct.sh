#!/usr/bin/env bash
# Quick direct-mode measurements (the full side-by-side benchmark with
# NGINX and HAProxy is bench/run.sh):
#   1. echo round trips/s, 100 connections, 64-byte messages: straight to the
#      upstream, then through muxgate in direct mode, and the ratio;
#   2. broker RSS holding 1,000 idle direct sessions.
# Usage: bench/direct.sh [DURATION]   (default 10s per run)
set -euo pipefail
source "$(dirname "$0")/common.sh"
duration=${1:-10s}


"$bin/demo-upstream" 127.0.0.1:3100 & pids+=($!)
cat > "$work/muxgate.yaml" <<YAML
server:
  listen: 127.0.0.1:8180
  admin_listen: 127.0.0.1:9190
upstreams:
  - name: echo
    routes: [{external_path: /ws/echo, internal_path: /echo}]
    targets: [{url: "ws://127.0.0.1:3100"}]
    websocket_config:
      enable_direct_communication: true
      ping_period: 60s
      pong_wait: 90s
YAML
"$bin/muxgate" --config "$work/muxgate.yaml" --log-level warn & broker=$!; pids+=($broker)
wait_port 3100; wait_port 8180

echo "## echo, 100 connections, 64 B, $duration"
straight=$("$bin/loadgen" echo --url ws://127.0.0.1:3100/echo -c 100 --size 64 --duration "$duration")
echo "no proxy: $straight"
proxied=$("$bin/loadgen" echo --url ws://127.0.0.1:8180/ws/echo -c 100 --size 64 --duration "$duration")
echo "muxgate:  $proxied"
awk -v a="$(rate "$proxied")" -v b="$(rate "$straight")" 'BEGIN { printf "ratio muxgate/no-proxy: %.3f\n", a / b }'

echo "## RSS, 1,000 idle direct sessions"
before=$(rss_kib "$broker")
mkfifo "$work/idle.out"
"$bin/loadgen" idle --url ws://127.0.0.1:8180/ws/echo -c 1000 --hold 60s > "$work/idle.out" & idle=$!; pids+=($idle)
read -r line < "$work/idle.out"   # "open 1000" once every session is up
after=$(rss_kib "$broker")
echo "$line; broker RSS before ${before} KiB, with 1000 sessions ${after} KiB, $(( (after - before) )) KiB for 1000 sessions = $(( (after - before) * 1024 / 1000 )) B per session (two sockets each)"
kill "$idle" 2>/dev/null || true
