#!/usr/bin/env bash
# The broker's memory per idle WebSocket session over HTTP/2 (RFC 8441:
# many WebSockets as extended CONNECT streams of one HTTP/2 connection)
# beside HTTP/1.1 (one TCP connection and upgrade each): a broker serving
# both (`server.http2: true`, cleartext, prior knowledge) in front of the
# demo upstream holds BENCH_HTTP2_SESSIONS idle sessions, four ways: direct
# mode over HTTP/1.1 and over HTTP/2, multiplexed (binary envelope,
# pool_size 4) over HTTP/1.1 and over HTTP/2, a fresh broker each time.
# Reports the broker's RSS growth per session, the client connections it
# served them on and its open files meanwhile. Writes the section to
# bench/http2.md, which bench/run.sh puts into BENCHMARKS.md, puts it into
# BENCHMARKS.md now, and prints it.
#
# Usage: bench/http2.sh   Settings come from the environment [defaults]:
#   BENCH_HTTP2_SESSIONS [5000]   idle sessions per variant
#   BENCH_HTTP2_STREAMS [100]     WebSockets per HTTP/2 connection (and the broker's
#                                 http2_max_concurrent_streams)
#   BENCH_PORT_BASE [3140]        3 consecutive ports from this one
#   BENCH_BIN                     take the binaries from this directory, no build
#   BENCH_OUT [repo root]         where BENCHMARKS.md and bench/http2.md go
set -euo pipefail
sessions=${BENCH_HTTP2_SESSIONS:-5000}
streams=${BENCH_HTTP2_STREAMS:-100}
pool_size=4
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

rows=""
for variant in direct/1.1 direct/2 mux/1.1 mux/2; do
  mode=${variant%/*} version=${variant#*/}
  label="$([ "$mode" = direct ] && echo direct || echo multiplexed), HTTP/$version"
  muxgate_yaml "$mode" "$port" "$admin" "$up_port" \
    ", max_connections: 100000, http2: true, http2_max_concurrent_streams: $streams" "$pool_size" > "$work/muxgate.yaml"
  "$bin/muxgate" --config "$work/muxgate.yaml" --log-level warn & broker=$!; pids+=($broker)
  wait_port "$admin"
  if [ "$mode" = mux ]; then
    # The pool up before the baseline, so the growth is the sessions' alone.
    for _ in $(seq 200); do
      metrics "$admin" | awk -v n="$pool_size" '/^muxgate_mux_connections\{.*state="live"/ {l += $NF} END {exit !(l >= n)}' && break
      sleep 0.05
    done
  fi
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
MD
)
put_section "$section" http2.md
