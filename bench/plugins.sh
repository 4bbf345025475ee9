#!/usr/bin/env bash
# Echo throughput through a plugin chain (jwt via auth_required, rate_limit,
# regex_filter redacting card numbers) against the same route without
# plugins, direct mode, 100 connections, 64-byte messages; prints the ratio.
# Usage: bench/plugins.sh [DURATION]   (default 10s per run)
set -euo pipefail
source "$(dirname "$0")/common.sh"
duration=${1:-10s}

"$bin/demo-upstream" 127.0.0.1:3100 & pids+=($!)
export MUXGATE_BENCH_SECRET=bench-secret-with-enough-bytes
cat > "$work/muxgate.yaml" <<YAML
server: {listen: "127.0.0.1:8180", admin_listen: "127.0.0.1:9190"}
jwt: {secret: "\${MUXGATE_BENCH_SECRET}", issuer: bench}
upstreams:
  - name: plain
    routes: [{external_path: /ws/plain, internal_path: /echo}]
    targets: [{url: "ws://127.0.0.1:3100"}]
    websocket_config: {enable_direct_communication: true}
  - name: chain
    routes: [{external_path: /ws/chain, internal_path: /echo}]
    targets: [{url: "ws://127.0.0.1:3100"}]
    auth_required: true
    plugins:
      - {name: rate_limit, stage: pre_request, settings: {messages_per_second: 1000000, per: session}}
      - {name: regex_filter, stage: pre_request, settings: {presets: [card_number], action: redact}}
    websocket_config: {enable_direct_communication: true}
YAML
"$bin/muxgate" --config "$work/muxgate.yaml" --log-level warn & pids+=($!)
wait_port 3100; wait_port 8180
# An HS256 token for the chain route (header.payload.signature, by openssl).
b64() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
header=$(printf '{"alg":"HS256","typ":"JWT"}' | b64)
payload=$(printf '{"sub":"bench","iss":"bench","exp":%d}' $(( $(date +%s) + 3600 )) | b64)
sig=$(printf '%s.%s' "$header" "$payload" | openssl dgst -sha256 -hmac "$MUXGATE_BENCH_SECRET" -binary | b64)
token="$header.$payload.$sig"

plain=$("$bin/loadgen" echo --url ws://127.0.0.1:8180/ws/plain -c 100 --size 64 --duration "$duration")
echo "no plugins:   $plain"
chain=$("$bin/loadgen" echo --url ws://127.0.0.1:8180/ws/chain -c 100 --size 64 --duration "$duration" --header "Authorization: Bearer $token")
echo "jwt+rate_limit+regex_filter: $chain"
awk -v a="$(rate "$chain")" -v b="$(rate "$plain")" 'BEGIN { printf "ratio chain/no plugins: %.3f\n", a / b }'
