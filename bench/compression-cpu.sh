#!/usr/bin/env bash
# permessage-deflate's CPU per message, and the bytes it saves on each hop,
# for a chat workload: BENCH_CPU_CONNECTIONS clients send BENCH_CPU_SIZE
# bytes of chat JSON (text, every message different) through the broker to
# the demo upstream's echo, BENCH_CPU_RATE messages a second together (the
# same work for every variant, below what any of them saturates at), for
# BENCH_CPU_DURATION, five ways:
#
# - multiplexed, uncompressed;
# - multiplexed, the clients compressing (the broker terminates it: inflates
#   what they send, deflates what it sends back), mux connections plain;
# - the same with `mux_compression` (the mux connections compressed too);
# - direct mode's frame relay, uncompressed, and with the clients and the
#   demo compressing end to end (the broker relays compressed frames as
#   they are).
#
# Reports the broker's CPU (every thread's run time, schedstat) per round
# trip (one message each way), the latency, and the bytes on each hop that
# compresses (muxgate_compression_bytes_total: client and mux hops where
# the broker compresses; muxgate_message_bytes_total, the relayed payload,
# for the frame relay). Writes the section to bench/compression-cpu.md,
# which bench/run.sh puts into BENCHMARKS.md, puts it into BENCHMARKS.md
# now, and prints it.
#
# Usage: bench/compression-cpu.sh   Settings come from the environment [defaults]:
#   BENCH_CPU_CONNECTIONS [50]   clients
#   BENCH_CPU_SIZE [1024]        bytes of chat JSON per message
#   BENCH_CPU_RATE [5000]       messages per second, all clients together
#   BENCH_CPU_DURATION [10s]     measured time per variant (after a 2 s warm-up)
#   BENCH_CODEC_MESSAGES [100000] messages of each codec-alone run
#   BENCH_CODEC_STATES [5000]    the most sessions' states a codec-alone run goes through
#   BENCH_PORT_BASE [3130]       3 consecutive ports from this one
#   BENCH_BIN                    take the binaries from this directory, no build
#   BENCH_OUT [repo root]        where BENCHMARKS.md and bench/compression-cpu.md go
set -euo pipefail
connections=${BENCH_CPU_CONNECTIONS:-50}
size=${BENCH_CPU_SIZE:-1024}
rate=${BENCH_CPU_RATE:-5000}
duration=${BENCH_CPU_DURATION:-10s}
source "$(dirname "$0")/common.sh"
out=${BENCH_OUT:-$root}
rev=$(git -C "$root" describe --always --dirty)
codec_messages=${BENCH_CODEC_MESSAGES:-100000}
codec_states=${BENCH_CODEC_STATES:-5000}
# Apart from the other scripts' ports, so that one of them may run meanwhile.
read -r up_port port admin < <(seq "${BENCH_PORT_BASE:-3130}" $(( ${BENCH_PORT_BASE:-3130} + 2 )) | xargs)

"$bin/demo-upstream" "127.0.0.1:$up_port" & pids+=($!)
wait_port "$up_port"

# sum_metric NAME [FILTER...]: the sum of NAME's samples whose labels hold
# every FILTER (`label="value"`).
sum_metric() {
  local name=$1; shift
  metrics "$admin" | awk -v n="$name{" -v filters="$*" '
    index($0, n) == 1 {
      k = split(filters, f, " "); ok = 1
      for (i = 1; i <= k; i++) if (!index($0, f[i])) ok = 0
      if (ok) s += $NF
    }
    END { printf "%.0f", s + 0 }'
}
# hop_bytes HOP: "message bytes -> compressed bytes (share)" on that hop,
# both directions, where the broker compresses.
hop_bytes() {
  local m c
  m=$(sum_metric muxgate_compression_bytes_total "hop=\"$1\"" 'form="uncompressed"')
  c=$(sum_metric muxgate_compression_bytes_total "hop=\"$1\"" 'form="compressed"')
  [ "$m" -gt 0 ] || { echo "uncompressed"; return; }
  awk -v m="$m" -v c="$c" 'BEGIN {printf "%.1f MiB as %.1f MiB (%.0f%%)", m / 1048576, c / 1048576, 100 * c / m}'
}

rows=""
for variant in mux-plain mux-client mux-both frames-plain frames-end-to-end; do
  direct=false compression="{}" deflate=()
  case $variant in
    mux-client) deflate=(--deflate) ;;
    mux-both) deflate=(--deflate) compression="{mux_compression: true}" ;;
    frames-plain) direct=true ;;
    frames-end-to-end) direct=true deflate=(--deflate) ;;
  esac
  cat > "$work/muxgate.yaml" <<YAML
server: {listen: "127.0.0.1:$port", admin_listen: "127.0.0.1:$admin"}
upstreams:
  - name: chat
    routes: [{external_path: /ws, internal_path: /echo}]
    targets: [{url: "ws://127.0.0.1:$up_port"}]
    websocket_config: {enable_direct_communication: $direct, envelope: binary, pool_size: 2,
                       compression: $compression}
YAML
  "$bin/muxgate" --config "$work/muxgate.yaml" --log-level warn & broker=$!; pids+=($broker)
  wait_port "$admin"
  if [ "$direct" = false ]; then
    for _ in $(seq 200); do
      metrics "$admin" | awk '/^muxgate_mux_connections\{.*state="live"/ {l += $NF} END {exit !(l >= 2)}' && break
      sleep 0.05
    done
  fi
  before=$(tree_run_ns "$broker")
  line=$("$bin/loadgen" latency --url "ws://127.0.0.1:$port/ws" --connections "$connections" \
    --size "$size" --chat "${deflate[@]}" --rate "$rate" --duration "$duration" --warmup 2s)
  [ "$(field lost "$line")" = 0 ] || { echo "$variant: echoes lost: $line" >&2; exit 1; }
  ran=$(( $(tree_run_ns "$broker") - before ))
  # Every round trip the broker served, warm-up included, as its CPU was.
  trips=$(sum_metric muxgate_messages_total 'direction="client_to_upstream"')
  us=$(awk -v r="$ran" -v t="$trips" 'BEGIN {printf "%.1f", r / t / 1000}')
  case $variant in
    mux-plain) client="uncompressed" mux="uncompressed" ;;
    mux-client) client=$(hop_bytes client) mux="uncompressed" ;;
    mux-both) client=$(hop_bytes client) mux=$(hop_bytes mux) ;;
    frames-plain) client="uncompressed" mux="(direct)" ;;
    frames-end-to-end)
      relayed=$(sum_metric muxgate_message_bytes_total)
      client="$(awk -v r="$relayed" -v m="$((2 * size * trips))" 'BEGIN {printf "%.1f MiB as %.1f MiB (%.0f%%), by the peers", m / 1048576, r / 1048576, 100 * r / m}')"
      mux="(direct)" ;;
  esac
  p50=$(field p50_us "$line") p99=$(field p99_us "$line")
  rows+="| $variant | $trips | $us | $p50 / $p99 | $client | $mux |"$'\n'
  echo "$variant: $us us of broker CPU per round trip, p50/p99 $p50/$p99 us; client hop $client; mux hop $mux" >&2
  kill "$broker"; wait "$broker" 2>/dev/null || true
done

# The codec alone, for scale: the same messages, no sockets, over as many
# sessions' states in turn as there are clients here, one, and many.
codec_rows=""
for states in 1 "$connections" "$codec_states"; do
  line=$("$bin/loadgen" codec --states "$states" --size "$size" --messages "$codec_messages")
  codec_rows+="| $states | $(field deflate_us "$line") | $(field inflate_us "$line") | $(field compressed_percent "$line")% |"$'\n'
  echo "codec, $states states: $line" >&2
done

section=$(cat <<MD
## Compression's CPU

\`bench/compression-cpu.sh\` ($rev, $(date -u +%Y-%m-%d)): $connections clients send $size bytes of chat
JSON (text, each message different: rooms, users, ids, times and words vary) to the demo
upstream's echo through the broker, $rate messages a second together, for $duration after a 2 s
warm-up: the same work in every variant. CPU is the broker's (every thread's run time) over all
the round trips it served, each one message each way; latency is from each message's scheduled
send to its echo. Bytes are both directions' message bytes and what carried them, per hop.

| variant | round trips | broker CPU per round trip, µs | latency p50 / p99, µs | client hop | mux hop |
| --- | --- | --- | --- | --- | --- |
${rows}
- mux-client: the clients compress; the broker inflates each message and deflates each reply
  (level 1, context takeover), the mux connections carry plain envelopes.
- mux-both: and \`mux_compression\`: the envelopes of all sessions on a mux connection share one
  compressor per direction.
- frames-end-to-end: direct mode's frame relay passes the clients' and the demo's compression
  through; the broker spends nothing on it, and its relayed bytes are the compressed ones.

The codec alone (\`loadgen codec\`: the same messages, no sockets, level 1, window 15, context
takeover), its sessions' states used in turn:

| sessions' states | deflate per message, µs | inflate per message, µs | compressed share |
| --- | --- | --- | --- |
${codec_rows}
- A compressed message costs memory traffic more than arithmetic: each session's compressor holds
  about 380 KiB (zlib-rs's hash chains and window) and each message goes through the state of a
  session whose state other sessions' messages have pushed out of the caches since; one state used
  over and over stays cached. Hence the broker's cost per round trip (a deflate and an inflate,
  on the states of ${connections} sessions) is well above the codec's own with one state.
- \`mux_compression\` compresses every envelope once more, on the mux connection's one state per
  direction. What it saves over the clients' own compression is what sessions' messages have in
  common; these differ message by message, so the mux hop's share is the client hop's.
MD
)
put_section "$section" compression-cpu.md
