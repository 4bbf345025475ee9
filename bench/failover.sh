#!/usr/bin/env bash
# Time from a target's death to its last new session, direct and
# multiplexed: two demo upstreams, sessions arriving at a steady rate
# through muxgate, one upstream killed (SIGKILL) mid-run. Reads the broker's
# JSON log: in direct mode the last attempt to reach the dead target, in
# multiplexed mode the moment its mux connections were withdrawn (no session
# binds to a target without a live connection).
# Usage: bench/failover.sh [RATE]   (new sessions per second, default 200)
set -euo pipefail
source "$(dirname "$0")/common.sh"
rate=${1:-200}

for mode in direct multiplexed; do
  "$bin/demo-upstream" 127.0.0.1:3101 & victim=$!; pids+=($victim)
  "$bin/demo-upstream" 127.0.0.1:3102 & pids+=($!)
  direct=$([ "$mode" = direct ] && echo true || echo false)
  cat > "$work/muxgate.yaml" <<YAML
server: {listen: "127.0.0.1:8180", admin_listen: "127.0.0.1:9190"}
upstreams:
  - name: echo
    routes: [{external_path: /ws/echo, internal_path: /echo}]
    targets: [{url: "ws://127.0.0.1:3101"}, {url: "ws://127.0.0.1:3102"}]
    health_checks: {passive: true, threshold: 3, interval: 60}
    websocket_config: {enable_direct_communication: $direct, pool_size: 2}
YAML
  "$bin/muxgate" --config "$work/muxgate.yaml" --log-format json --log-level 'info,muxgate::direct=debug' > "$work/$mode.log" & broker=$!; pids+=($broker)
  wait_port 3101; wait_port 3102; wait_port 8180
  "$bin/loadgen" churn --url ws://127.0.0.1:8180/ws/echo --rate "$rate" --duration 3s > "$work/$mode.churn" &
  churn=$!
  sleep 1.5
  killed_at=$(date -u +%s.%N)
  kill -9 "$victim"
  wait "$churn" || true
  kill "$broker"; wait "$broker" 2>/dev/null || true
  python3 - "$mode" "$killed_at" "$work/$mode.log" "$work/$mode.churn" <<'PY'
import json, sys, datetime
mode, killed, log, churn = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
def ts(line):
    return datetime.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()
dead = "ws://127.0.0.1:3101"
last = None
for raw in open(log):
    line = json.loads(raw)
    msg = line.get("message", "")
    if mode == "direct" and msg == "upstream connect failed" and line.get("target_url") == dead:
        last = ts(line)
    if mode == "multiplexed" and msg == "mux connection failed" and dead in line.get("cause", "") and last is None:
        last = ts(line)
totals = open(churn).read().strip().splitlines()[-1]
if last is None:
    print(f"{mode}: no new session ever went to the dead target after the kill; clients: {totals}")
else:
    print(f"{mode}: last new session on the dead target {1000 * (last - killed):.1f} ms after its death; clients: {totals}")
PY
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=()
done
