#!/usr/bin/env bash
# The broker's memory per idle WebSocket session over HTTP/2 (RFC 8441:
# many WebSockets as extended CONNECT streams of one HTTP/2 connection)
# beside HTTP/1.1 (one TCP connection and upgrade each): a broker serving
# both (`server.http2: true`, cleartext, prior knowledge) in front of the
# demo upstream holds BENCH_HTTP2_SESSIONS idle sessions, four ways: direct
# mode over HTTP/1.1 and over HTTP/2, multiplexed (binary envelope,
# pool_size 4) over HTTP/1.1 and over HTTP/2, a fresh broker each time.
# Reports the broker's RSS growth per session, the client connections it
# served them on and its open files meanwhile.
#
# Then what relaying costs over each: for direct and multiplexed, one broker
# each, 100 WebSockets echo 64 B (one message in flight each, loadgen echo)
# for BENCH_HTTP2_DURATION after a 2 s warm-up, over HTTP/1.1 (100
# connections) and over HTTP/2 (one connection, 100 streams), in turn
# BENCH_HTTP2_ROUNDS times (HTTP/1.1, HTTP/2, HTTP/1.1, ...). Reports the
# medians of the round trips per second and of the broker's CPU per round
# trip (every thread's run time, schedstat, over the measured window,
# divided by the round trips it relayed meanwhile). Writes the section to
# bench/http2.md, which bench/run.sh puts into BENCHMARKS.md, puts it into
# BENCHMARKS.md now, and prints it.
#
# Usage: bench/http2.sh   Settings come from the environment [defaults]:
#   BENCH_HTTP2_SESSIONS [5000]   idle sessions per variant
#   BENCH_HTTP2_STREAMS [100]     WebSockets per HTTP/2 connection (and the broker's
#                                 http2_max_concurrent_streams)
#   BENCH_HTTP2_DURATION [10s]    measured time per echo run, whole seconds (Ns)
#   BENCH_HTTP2_ROUNDS [3]        echo runs per variant, interleaved; the medians count
#   BENCH_PORT_BASE [3140]        3 consecutive ports from this one
#   BENCH_BIN                     take the binaries from this directory, no build
#   BENCH_OUT [repo root]         where BENCHMARKS.md and bench/http2.md go
set -euo pipefail
sessions=${BENCH_HTTP2_SESSIONS:-5000}
streams=${BENCH_HTTP2_STREAMS:-100}
pool_size=4
duration=${BENCH_HTTP2_DURATION:-10s}
rounds=${BENCH_HTTP2_ROUNDS:-3}
[[ $duration =~ ^[1-9][0-9]*s$ ]] || { echo "BENCH_HTTP2_DURATION: whole seconds (10s), not $duration" >&2; exit 2; }
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_HTTP2_ROUNDS: a count, not $rounds" >&2; exit 2; }
# The echo runs': WebSockets (all on one HTTP/2 connection), message size, warm-up.
echo_ws=100 echo_size=64 warmup=2s
source "$(dirname "$0")/common.sh"
out=${BENCH_OUT:-$root}
rev=$(git -C "$root" describe --always --dirty)
# Apart from the other scripts' ports, so that one of them may run meanwhile.
read -r up_port port admin < <(seq "${BENCH_PORT_BASE:-3140}" $(( ${BENCH_PORT_BASE:-3140} + 2 )) | xargs)

"$bin/demo-upstream" "127.0.0.1:$up_port" & pids+=($!)
wait_port "$up_port"

# sessions_over VERSION: the broker's open sessions whose WebSocket came
# over HTTP VERSION (1.1 or 2).
sessions_over() {
  metrics "$admin" | awk -v v="http_version=\"$1\"" 'index($0, "muxgate_sessions_active{") == 1 && index($0, v) {s += $NF} END {print s + 0}'
}
# Established client connections to the broker (its side of each).
client_connections() { ss -Htn state established "( sport = :$port )" | wc -l; }

# Waits (bounded) until the broker's mux pool is up.
wait_pool() {
  for _ in $(seq 200); do
    metrics "$admin" | awk -v n="$pool_size" '/^muxgate_mux_connections\{.*state="live"/ {l += $NF} END {exit !(l >= n)}' && return 0
    sleep 0.05
  done
}

rows=""
for variant in direct/1.1 direct/2 mux/1.1 mux/2; do
  mode=${variant%/*} version=${variant#*/}
  label="$([ "$mode" = direct ] && echo direct || echo multiplexed), HTTP/$version"
  muxgate_yaml "$mode" "$port" "$admin" "$up_port" \
    ", max_connections: 100000, http2: true, http2_max_concurrent_streams: $streams" "$pool_size" > "$work/muxgate.yaml"
  "$bin/muxgate" --config "$work/muxgate.yaml" --log-level warn & broker=$!; pids+=($broker)
  wait_port "$admin"
  # The pool up before the baseline, so the growth is the sessions' alone.
  [ "$mode" = direct ] || wait_pool
  before=$(rss_kib "$broker")
  idle_args=()
  [ "$version" = 1.1 ] || idle_args=(--http2 --streams-per-connection "$streams")
  hold_idle "ws://127.0.0.1:$port/ws" "$sessions"
  wait_sessions "$admin" "$sessions"
  after=$(rss_kib "$broker")
  fds=$(tree_max_fds "$broker")
  connections=$(client_connections)
  over=$(sessions_over "$version")
  [ "$over" = "$sessions" ] || { echo "$label: the broker counts $over of $sessions sessions over HTTP/$version" >&2; exit 1; }
  per=$(( (after - before) * 1024 / sessions ))
  rows+="| $label | $sessions | $connections | $before | $after | $per | $fds |"$'\n'
  echo "$label: $per B per session, $connections client connections, $fds open files" >&2
  release_idle
  wait_no_sessions "$admin" >/dev/null
  kill "$broker"; wait "$broker" 2>/dev/null || true
done

# The round trips the broker has relayed so far (messages from its clients).
trips() {
  metrics "$admin" | awk 'index($0, "muxgate_messages_total{") == 1 && index($0, "direction=\"client_to_upstream\"") {t += $NF}
    END {printf "%.0f\n", t}'
}
# echo_run VERSION: one echo run over HTTP/VERSION against $broker; sets
# rt (round trips per second, loadgen's) and ns (the broker's CPU per
# round trip, ns). The window measured here is loadgen's shifted by its
# setup (a few ms): both lie within the steady echo, after its
# connections are up and before they close.
echo_run() {
  local version=$1 args=() loadgen ns0 ns1 t0 t1 s0 line
  [ "$version" = 1.1 ] || args=(--http2 --streams-per-connection "$echo_ws")
  "$bin/loadgen" echo --url "ws://127.0.0.1:$port/ws" -c "$echo_ws" --size "$echo_size" \
    --duration "$duration" --warmup "$warmup" ${args[@]+"${args[@]}"} > "$work/echo" & loadgen=$!; pids+=($loadgen)
  sleep "$warmup"
  ns0=$(tree_run_ns "$broker") t0=$(trips) s0=$(sessions_over "$version")
  sleep "$duration"
  ns1=$(tree_run_ns "$broker") t1=$(trips)
  wait "$loadgen"
  line=$(cat "$work/echo")
  [ "$s0" = "$echo_ws" ] || { echo "echo over HTTP/$version: the broker counted $s0 of $echo_ws sessions over it" >&2; exit 1; }
  (( t1 > t0 )) || { echo "echo over HTTP/$version: no round trips in the window: $line" >&2; exit 1; }
  rt=$(rate "$line") ns=$(( (ns1 - ns0) / (t1 - t0) ))
}
# The median of "VALUES" (numbers, space-separated).
median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{ v[NR] = $1 } END { printf "%.1f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# cell "VALUES" SCALE FORMAT: their median / SCALE, the range in
# brackets, each in printf FORMAT.
cell() {
  local sorted; sorted=$(tr ' ' '\n' <<<"$1" | grep . | sort -n)
  awk -v m="$(median "$1")" -v lo="$(head -n 1 <<<"$sorted")" -v hi="$(tail -n 1 <<<"$sorted")" -v s="$2" -v f="$3" \
    'BEGIN { printf f " (" f "-" f ")", m / s, lo / s, hi / s }'
}

echo_rows=""
for mode in direct mux; do
  label=$([ "$mode" = direct ] && echo direct || echo multiplexed)
  muxgate_yaml "$mode" "$port" "$admin" "$up_port" \
    ", http2: true, http2_max_concurrent_streams: $(( streams > echo_ws ? streams : echo_ws ))" "$pool_size" > "$work/muxgate.yaml"
  "$bin/muxgate" --config "$work/muxgate.yaml" --log-level warn & broker=$!; pids+=($broker)
  wait_port "$admin"
  [ "$mode" = direct ] || wait_pool
  declare -A rates=() cpus=()
  for ((r = 1; r <= rounds; r++)); do
    for version in 1.1 2; do
      echo_run "$version"
      rates[$version]+=" $rt"
      cpus[$version]+=" $ns"
      echo "$label, HTTP/$version, round $r: $rt round trips/s, $ns ns of broker CPU per round trip" >&2
      wait_no_sessions "$admin" >/dev/null
    done
  done
  for version in 1.1 2; do
    rt_ratio=$(awk -v a="$(median "${rates[$version]}")" -v b="$(median "${rates[1.1]}")" 'BEGIN {printf "%.2f", a / b}')
    cpu_ratio=$(awk -v a="$(median "${cpus[$version]}")" -v b="$(median "${cpus[1.1]}")" 'BEGIN {printf "%.2f", a / b}')
    echo_rows+="| $label, HTTP/$version | $(cell "${rates[$version]}" 1 %.0f) | $(cell "${cpus[$version]}" 1000 %.1f) | $rt_ratio | $cpu_ratio |"$'\n'
  done
  unset rates cpus
  kill "$broker"; wait "$broker" 2>/dev/null || true
done

section=$(cat <<MD
## Memory per idle session over HTTP/2

\`bench/http2.sh\` ($rev, $(date -u +%Y-%m-%d)): a broker serving HTTP/1.1 and cleartext HTTP/2 on one
listener (\`server.http2: true\`) holds $sessions idle sessions of the demo upstream, a fresh broker for
each variant. RSS per session is the broker's growth over those sessions; client connections are the
TCP connections they came on; open files are the broker's while it holds them.

| variant | sessions | client connections | RSS before, KiB | RSS after, KiB | RSS per session, B | broker open files |
| --- | --- | --- | --- | --- | --- | --- |
${rows}
- HTTP/1.1: each WebSocket its own TCP connection (an upgrade, 101); HTTP/2: prior-knowledge h2c,
  $streams WebSockets on each connection as extended CONNECT streams (200), the broker's stream window
  256 KiB, the client's 64 KiB (its connection's 1 MiB).
- direct: each session its own upstream connection (one more open file); multiplexed: binary
  envelope, every session on the pool of $pool_size upstream connections.

### Relaying over HTTP/2

$echo_ws WebSockets echo $echo_size B binary messages through the broker to the demo upstream, one message
in flight on each (\`loadgen echo\`), for $duration after a $warmup warm-up; one broker per mode serves
both versions. CPU is the broker's (every thread's run time) over the measured window divided by the
round trips it relayed in it. Each number is the median of $rounds runs (range in brackets), the
versions in turn; the ratios are of the medians, to HTTP/1.1 in the same mode.

| variant | round trips/s | broker CPU per round trip, µs | round trips/s, to HTTP/1.1 | CPU per round trip, to HTTP/1.1 |
| --- | --- | --- | --- | --- |
${echo_rows}
- HTTP/1.1: $echo_ws connections, one WebSocket each; HTTP/2: one prior-knowledge h2c connection,
  its $echo_ws WebSockets extended CONNECT streams, the client's windows 1 MiB a stream and 16 MiB
  the connection (never what throttles the broker); client, broker and upstream on one
  $(nproc)-CPU machine, so the round trips per second are bounded by what all three spend.
MD
)
put_section "$section" http2.md
