#!/usr/bin/env bash
# permessage-deflate's cost in memory, and what it saves on the wire: a
# multiplexed broker (the broker terminates compression with its clients)
# in front of the demo upstream holds BENCH_COMPRESSED_SESSIONS idle
# sessions, three ways: uncompressed; compressed with context takeover (the
# default); compressed with server_ and client_no_context_takeover. Each
# session first sends one chat-JSON message of BENCH_WARM bytes and reads
# its echo, so that the broker has made whatever compression state it keeps.
# Reports the broker's RSS growth per session and the bytes on the client
# wire for those messages, before and after compression (the broker's
# muxgate_compression_bytes_total). Writes the section to
# bench/compression.md, which bench/run.sh puts into BENCHMARKS.md, puts it
# into BENCHMARKS.md now, and prints it.
#
# Usage: bench/compression.sh   Settings come from the environment [defaults]:
#   BENCH_COMPRESSED_SESSIONS [5000]   idle sessions per variant
#   BENCH_WARM [1024]                  bytes of the one message each session sends
#   BENCH_BIN                          take the binaries from this directory, no build
#   BENCH_OUT [repo root]              where BENCHMARKS.md and bench/compression.md go
set -euo pipefail
sessions=${BENCH_COMPRESSED_SESSIONS:-5000}
warm=${BENCH_WARM:-1024}
source "$(dirname "$0")/common.sh"
out=${BENCH_OUT:-$root}
rev=$(git -C "$root" describe --always --dirty)
# Apart from the other scripts' ports, so that one of them may run meanwhile.
up_port=3120 port=8200 admin=9300
# The broker pings each client every $ping s (the idle clients do not
# answer; pong_wait is far longer than the run): the first ping after a
# session's message keeps its compressor, the second lets it go.
ping=5

"$bin/demo-upstream" "127.0.0.1:$up_port" & pids+=($!)
wait_port "$up_port"

# compressed_bytes FORM: the broker's client-hop bytes of that form, both ways.
compressed_bytes() {
  metrics "$admin" | awk -v f="form=\"$1\"" 'index($0, "muxgate_compression_bytes_total{") == 1 && index($0, f) {s += $NF} END {print s + 0}'
}

rows=""
for variant in plain takeover no-takeover; do
  compression="{}"
  idle_args=(--warm "$warm")
  case $variant in
    takeover) idle_args+=(--deflate) ;;
    no-takeover) idle_args+=(--deflate)
      compression="{server_no_context_takeover: true, client_no_context_takeover: true}" ;;
  esac
  cat > "$work/muxgate.yaml" <<YAML
server: {listen: "127.0.0.1:$port", admin_listen: "127.0.0.1:$admin", max_connections: 100000}
upstreams:
  - name: chat
    routes: [{external_path: /ws, internal_path: /echo}]
    targets: [{url: "ws://127.0.0.1:$up_port"}]
    websocket_config: {enable_direct_communication: false, envelope: binary, pool_size: 4,
                       ping_period: ${ping}s, pong_wait: 180s, compression: $compression}
YAML
  "$bin/muxgate" --config "$work/muxgate.yaml" --log-level warn & broker=$!; pids+=($broker)
  wait_port "$admin"
  for _ in $(seq 200); do
    metrics "$admin" | awk '/^muxgate_mux_connections\{.*state="live"/ {l += $NF} END {exit !(l >= 4)}' && break
    sleep 0.05
  done
  before=$(rss_kib "$broker")
  hold_idle "ws://127.0.0.1:$port/ws" "$sessions"
  wait_sessions "$admin" "$sessions"
  after=$(rss_kib "$broker")
  per=$(( (after - before) * 1024 / sessions ))
  if [ "$variant" = plain ]; then
    wire="$((2 * warm * sessions / 1024)) KiB (uncompressed)"
  else
    message=$(compressed_bytes uncompressed) packed=$(compressed_bytes compressed)
    wire="$((message / 1024)) KiB as $((packed / 1024)) KiB ($(awk -v a="$packed" -v b="$message" 'BEGIN {printf "%.0f%%", 100 * a / b}'))"
  fi
  rows+="| $variant | $sessions | $before | $after | $per | $wire |"$'\n'
  echo "$variant: $per B per session, $wire" >&2
  if [ "$variant" = takeover ]; then
    # Two pings later (each session's second ping after its message).
    sleep $((2 * ping + 2))
    later=$(rss_kib "$broker")
    rows+="| takeover, two pings later | $sessions | $before | $later | $(( (later - before) * 1024 / sessions )) | |"$'\n'
    echo "takeover, two pings later: $(( (later - before) * 1024 / sessions )) B per session" >&2
  fi
  release_idle
  wait_no_sessions "$admin" >/dev/null
  kill "$broker"; wait "$broker" 2>/dev/null || true
done

section=$(cat <<MD
## Compression's memory

\`bench/compression.sh\` ($rev, $(date -u +%Y-%m-%d)): a multiplexed broker, which terminates
permessage-deflate with its clients, holds $sessions idle sessions of the demo upstream, each of which
first sent one message of $warm bytes of chat JSON and read its echo. RSS per session is the broker's
growth over those sessions; the wire is both directions' message bytes on the client sockets (from
\`muxgate_compression_bytes_total\`).

| variant | sessions | RSS before, KiB | RSS after, KiB | RSS per session, B | those messages on the wire |
| --- | --- | --- | --- | --- | --- |
${rows}
- takeover: the default; each session keeps its compressor (zlib-rs, window 15) and its inflater
  between messages. Two of the broker's pings (ping_period ${ping}s here) without a compressed message
  between let the compressor go; the inflater stays, as the client's context takeover requires.
- no-takeover: \`server_no_context_takeover\` and \`client_no_context_takeover\`: both states are
  dropped after every message, so an idle session holds none (they are kept as a few spares per
  thread for the next message, see *Memory per idle session*); each message compresses from an
  empty window.
MD
)
put_section "$section" compression.md
