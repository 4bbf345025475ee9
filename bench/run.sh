#!/usr/bin/env bash
# Side-by-side benchmark: the demo echo upstream reached with no
# proxy, through NGINX, HAProxy, muxgate direct and muxgate multiplexed
# (binary envelope, pool_size 2), all in one run on this machine. Measures,
# in this order:
#   1. proxy RSS per idle session: 5,000 direct sessions (two sockets each)
#      through NGINX, HAProxy and muxgate direct, and 19,000 multiplexed
#      sessions through muxgate (the most one process can hold under the
#      hard limit of 20,000 open files), each on a proxy that has served
#      nothing yet; with the upstream sockets and open files each proxy
#      holds meanwhile;
#   2. round-trip latency p50/p99/p99.9 at a fixed moderate rate (5,000
#      messages/s over 100 connections, 64 B), counted from each message's
#      scheduled send time, and each proxy's CPU time per message meanwhile;
#   3. echo throughput (round trips/s) with 100 connections at 64 B and 4 KiB.
# Writes BENCHMARKS.md (tables as ratios against NGINX and against no proxy,
# each target met or not), bench/results.tsv (one
# `measure path value` row per number) and PNG charts in bench/charts/.
# Installs nginx, haproxy and a font from apt if missing (bench/deps.sh).
#
# Usage: bench/run.sh   Settings come from the environment [defaults]:
#   BENCH_DURATION [3s]   each latency and throughput run, after BENCH_WARMUP [1s]
#   BENCH_ROUNDS [4]      latency rounds over all paths, interleaved; each number is the median
#   BENCH_ECHO_ROUNDS [6] throughput rounds, the same way (the proxies' rates differ by less
#                         than their spread over rounds, so these get more)
#   BENCH_RATE [5000]     messages/s of the latency runs
#   BENCH_IDLE_DIRECT [5000], BENCH_IDLE_MUX [19000]   idle sessions
#   BENCH_OUT [repo root] where BENCHMARKS.md, bench/results.tsv and bench/charts/ go
#   BENCH_BIN             take the binaries from this directory, no release build
#   BENCH_PORT_BASE       7 consecutive ports from this one [3100 8280 8380 8180 8181 9190 9191]
set -euo pipefail
duration=${BENCH_DURATION:-3s}
rounds=${BENCH_ROUNDS:-4}
echo_rounds=${BENCH_ECHO_ROUNDS:-6}
warmup=${BENCH_WARMUP:-1s}
rate=${BENCH_RATE:-5000}
idle_direct=${BENCH_IDLE_DIRECT:-5000}
idle_mux=${BENCH_IDLE_MUX:-19000}
pool_size=2
"$(dirname "$0")/deps.sh"
source "$(dirname "$0")/common.sh"
out=${BENCH_OUT:-$root}
# Before the run writes its results into the tree.
rev=$(git -C "$root" describe --always --dirty)
if [ -n "${BENCH_PORT_BASE:-}" ]; then
  read -r up_port nginx_port haproxy_port direct_port mux_port direct_admin mux_admin \
    < <(seq "$BENCH_PORT_BASE" $((BENCH_PORT_BASE + 6)) | xargs)
else
  up_port=3100 nginx_port=8280 haproxy_port=8380 direct_port=8180 mux_port=8181 direct_admin=9190 mux_admin=9191
fi
nginx=$(command -v nginx || echo /usr/sbin/nginx); haproxy=$(command -v haproxy || echo /usr/sbin/haproxy)

"$bin/demo-upstream" "127.0.0.1:$up_port" & pids+=($!)
# Each worker may hold all 10,000 sockets of the 5,000 sessions; the machine
# allows 20,000 open files per process.
nginx_conf "$nginx_port" "$up_port" "worker_processes auto;
worker_rlimit_nofile 20000;" > "$work/nginx.conf"
haproxy_conf "$haproxy_port" "$up_port" "" > "$work/haproxy.cfg"
# One muxgate process per mode, so each one's memory is measured alone.
muxgate_yaml direct "$direct_port" "$direct_admin" "$up_port" ", max_connections: 100000" "$pool_size" > "$work/muxgate-direct.yaml"
muxgate_yaml mux "$mux_port" "$mux_admin" "$up_port" ", max_connections: 100000" "$pool_size" > "$work/muxgate-mux.yaml"
"$nginx" -c "$work/nginx.conf" & nginx_pid=$!; pids+=($nginx_pid)
"$haproxy" -f "$work/haproxy.cfg" & haproxy_pid=$!; pids+=($haproxy_pid)
"$bin/muxgate" --config "$work/muxgate-direct.yaml" --log-level warn & direct_pid=$!; pids+=($direct_pid)
"$bin/muxgate" --config "$work/muxgate-mux.yaml" --log-level warn & mux_pid=$!; pids+=($mux_pid)
for p in $up_port $nginx_port $haproxy_port $direct_port $mux_port $direct_admin $mux_admin; do wait_port "$p"; done

declare -A url=(
  [none]="ws://127.0.0.1:$up_port/echo"
  [nginx]="ws://127.0.0.1:$nginx_port/echo"
  [haproxy]="ws://127.0.0.1:$haproxy_port/echo"
  [muxgate-direct]="ws://127.0.0.1:$direct_port/ws"
  [muxgate-mux]="ws://127.0.0.1:$mux_port/ws"
)
declare -A pid=([nginx]=$nginx_pid [haproxy]=$haproxy_pid [muxgate-direct]=$direct_pid [muxgate-mux]=$mux_pid)
declare -A admin=([muxgate-direct]=$direct_admin [muxgate-mux]=$mux_admin)
order=(none nginx haproxy muxgate-direct muxgate-mux)
proxies=(nginx haproxy muxgate-direct muxgate-mux)

declare -A res
measures=()
# record MEASURE PATH VALUE: keeps a number for the report and the charts.
record() {
  [[ $3 =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "bench: $1 of $2 is not a number: '$3'" >&2; exit 1; }
  [[ " ${measures[*]} " == *" $1 "* ]] || measures+=("$1")
  res[$1/$2]=$3
}
load=$(cut -d' ' -f1 /proc/loadavg)

# 1. Memory first, on fresh processes (an allocator keeps what it freed, so
# growth measured after the throughput runs would read low).
for name in "${proxies[@]}"; do
  n=$idle_direct; [ "$name" = muxgate-mux ] && n=$idle_mux
  before=$(tree_rss "${pid[$name]}")
  hold_idle "${url[$name]}" "$n"
  # NGINX, HAProxy and muxgate direct answer 101 only once the upstream
  # answered; a multiplexed session is through once its `open` is written.
  [ -z "${admin[$name]:-}" ] || wait_sessions "${admin[$name]}" "$n"
  after=$(tree_rss "${pid[$name]}")
  record idle_sessions "$name" "$n"
  record idle_bytes_per_session "$name" $(( (after - before) * 1024 / n ))
  record upstream_sockets "$name" "$(tree_sockets_to "${pid[$name]}" "$up_port")"
  record open_files "$name" "$(tree_max_fds "${pid[$name]}")"
  release_idle
  drained=""
  [ -z "${admin[$name]:-}" ] || drained=", all closed $(wait_no_sessions "${admin[$name]}") s after their clients left"
  echo "$name: $n idle sessions, ${res[idle_bytes_per_session/$name]} B each, ${res[upstream_sockets/$name]} upstream sockets, at most ${res[open_files/$name]} open files in one process$drained"
done

# Runs 2 and 3 go round the paths $rounds times, interleaved, and keep
# each number's median: this machine's speed drifts within minutes (other
# tenants) by more than the paths differ, so one run per path would rank
# the drift. Each round starts one path later, so no path always follows
# the same one.
declare -A runs
# rotated ROUND: the paths in the order of that round.
rotated() { local k=$(( ($1 - 1) % ${#order[@]} )); echo "${order[@]:k}" "${order[@]:0:k}"; }
# sample MEASURE PATH VALUE: one round's number.
sample() { runs[$1/$2]+="$3 "; }
median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m }'; }

# 2. Latency at a fixed rate, well under every path's saturation, and what
# each proxy spends on the same messages: CPU time drifts far less with the
# machine's other load than rates and tails do.
for round in $(seq "$rounds"); do
  for name in $(rotated "$round"); do
    [ -z "${pid[$name]:-}" ] || cpu_before=$(tree_cpu_ms "${pid[$name]}")
    line=$("$bin/loadgen" latency --url "${url[$name]}" -c 100 --size 64 --rate "$rate" --duration "$duration" --warmup "$warmup")
    echo "round $round, $name latency: $line"
    if [ -n "${pid[$name]:-}" ]; then
      cpu=$(( $(tree_cpu_ms "${pid[$name]}") - cpu_before ))
      sample cpu_us_per_message "$name" "$(awk -v ms="$cpu" -v n="$(field sent "$line")" 'BEGIN { printf "%.1f", ms * 1000 / n }')"
    fi
    sample latency_achieved_per_sec "$name" "$(field achieved_per_sec "$line")"
    sample latency_lost "$name" "$(field lost "$line")"
    for q in p50 p99 p999 max; do sample "latency_${q}_us" "$name" "$(field "${q}_us" "$line")"; done
  done
done

# 3. Throughput: one message in flight per connection.
for round in $(seq "$echo_rounds"); do
  for size in 64 4096; do
    for name in $(rotated "$round"); do
      line=$("$bin/loadgen" echo --url "${url[$name]}" -c 100 --size "$size" --duration "$duration" --warmup "$warmup")
      echo "round $round, $name echo $size B: $line"
      sample "echo_$([ "$size" = 64 ] && echo 64 || echo 4k)_per_sec" "$name" "$(field round_trips_per_sec "$line")"
    done
  done
done
for key in "${!runs[@]}"; do
  record "${key%/*}" "${key#*/}" "$(median "${runs[$key]}")"
done
# The spread of each throughput, for the report: lowest-highest over the rounds.
spread() { tr ' ' '\n' <<<"${runs[$1/$2]}" | grep . | sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { print lo "-" hi }'; }
# stalled PATH: in how many latency rounds a message waited over 20 ms.
stall_us=20000
stalled() { tr ' ' '\n' <<<"${runs[latency_max_us/$1]}" | awk -v t=$stall_us '$1 > t { n++ } END { print n + 0 }'; }

# The results file, path by path in the tables' order (the charts keep it).
results=$out/bench/results.tsv
mkdir -p "$out/bench"
{
  printf 'measure\tpath\tvalue\n'
  for name in "${order[@]}"; do
    for m in "${measures[@]}"; do
      [ -z "${res[$m/$name]:-}" ] || printf '%s\t%s\t%s\n' "$m" "$name" "${res[$m/$name]}"
    done
  done
} > "$results"
"$bin/charts" "$results" "$out/bench/charts"

# === the report ===
# ratio A B: A/B to two decimals.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
# holds A OP B: whether the comparison is true (awk, so decimals work).
holds() { awk -v a="$1" -v b="$3" "BEGIN { exit !(a $2 b) }"; }
verdict() { if holds "$@"; then echo met; else echo "**not met**"; fi; }
# The better of NGINX and HAProxy on MEASURE, where better is OP (> or <):
# prints its name.
better_proxy() { if holds "${res[$1/nginx]}" "$2" "${res[$1/haproxy]}"; then echo nginx; else echo haproxy; fi; }
# rounds_won MEASURE OP OTHER: in how many rounds muxgate direct's number
# was OP= OTHER's in the same round (the rounds of a path are in order).
rounds_won() {
  awk -v a="${runs[$1/muxgate-direct]}" -v b="${runs[$1/$3]}" -v op="$2" 'BEGIN {
    n = split(a, x, " "); split(b, y, " ")
    for (i = 1; i <= n; i++) won += (op == ">") ? (x[i] >= y[i]) : (x[i] <= y[i])
    printf "%d of %d", won, n }'
}
# One target line: direct against the better of NGINX and HAProxy.
direct_line() {
  local measure=$1 op=$2 what=$3 unit=$4 best won=""
  best=$(better_proxy "$measure" "$op")
  [ -z "${runs[$measure/$best]:-}" ] || won="; as good or better in $(rounds_won "$measure" "$op" "$best") rounds"
  echo "  - $what: $(verdict "${res[$measure/muxgate-direct]}" "$op=" "${res[$measure/$best]}") (${res[$measure/muxgate-direct]} $unit against $best's ${res[$measure/$best]}$won)"
}
elapsed=$SECONDS
{
  echo "# Benchmarks"
  echo
  echo "Written by \`bench/run.sh\` on $(date -u +%Y-%m-%d) in $((elapsed / 60)) min $((elapsed % 60)) s (everything, build included)."
  echo
  echo "- Machine: $(nproc) cores ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)),"
  echo "  $(awk '/^MemTotal/ {printf "%.0f", $2 / 1048576}' /proc/meminfo) GiB, kernel $(uname -r), Debian $(cat /etc/debian_version), at most $(ulimit -Hn) open files per process;"
  echo "  load average $load when the measurements began (anything above 0 is other work competing for the cores)."
  echo "- Versions: $("$nginx" -v 2>&1 | sed 's/^nginx version: //'), $("$haproxy" -v | head -1 | cut -d' ' -f1-3), muxgate $rev,"
  echo "  built by $(rustc --version | cut -d' ' -f1-2) ($([ -n "${BENCH_BIN:-}" ] && echo "binaries from $BENCH_BIN" || echo dist profile))."
  echo "- Paths: the demo echo upstream (\`demo-upstream\`, path /echo) with no proxy, through NGINX, through"
  echo "  HAProxy (HTTP mode), through muxgate direct, and through muxgate multiplexed (binary envelope, pool_size $pool_size)."
  echo "- Everything (load generator, proxies, upstream) shares the same $(nproc) cores, so a proxy costs a large"
  echo "  share of the no-proxy rate whatever it is; compare the proxies with each other."
  echo
  echo "## Targets"
  echo
  echo "- Direct mode at least as good as the better of NGINX and HAProxy on every measure:"
  direct_line echo_64_per_sec ">" "throughput, 64 B" "rt/s"
  direct_line echo_4k_per_sec ">" "throughput, 4 KiB" "rt/s"
  direct_line latency_p99_us "<" "p99 latency at $rate msg/s" "µs"
  direct_line idle_bytes_per_session "<" "RSS per idle direct session" "B"
  best=$(better_proxy cpu_us_per_message "<")
  echo "- Not a target, but the steadiest measure on this machine: proxy CPU per echoed message at $rate msg/s,"
  echo "  direct ${res[cpu_us_per_message/muxgate-direct]} µs against $best's ${res[cpu_us_per_message/$best]} µs ($(ratio "${res[cpu_us_per_message/muxgate-direct]}" "${res[cpu_us_per_message/$best]}"))."
  for size in 64 4k; do
    r=$(ratio "${res[echo_${size}_per_sec/muxgate-mux]}" "${res[echo_${size}_per_sec/muxgate-direct]}")
    label=$([ "$size" = 64 ] && echo "64 B" || echo "4 KiB")
    echo "- Multiplexed throughput at least 0.8 of direct, $label: $(verdict "$r" ">=" 0.8) ($r)"
  done
  m=${res[idle_bytes_per_session/muxgate-mux]}
  echo "- At most 4 KiB of broker RSS per idle multiplexed session: $(verdict "$m" "<=" 4096) ($m B at ${res[idle_sessions/muxgate-mux]} sessions)"
  s=${res[upstream_sockets/muxgate-mux]}
  echo "- Upstream sockets equal to pool_size ($pool_size) at ${res[idle_sessions/muxgate-mux]} clients: $(verdict "$s" "==" "$pool_size") ($s)"
  echo
  echo "## Throughput"
  echo
  echo "Echo round trips per second, 100 connections, one message in flight on each, $duration after $warmup of warm-up;"
  echo "the median of $echo_rounds rounds that visit every path in turn, each round starting one path later (their range"
  echo "in brackets)."
  echo
  echo "| path | 64 B, rt/s | vs NGINX | vs no proxy | 4 KiB, rt/s | vs NGINX | vs no proxy |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
  for name in "${order[@]}"; do
    a=${res[echo_64_per_sec/$name]} b=${res[echo_4k_per_sec/$name]}
    echo "| $name | $a ($(spread echo_64_per_sec "$name")) | $(ratio "$a" "${res[echo_64_per_sec/nginx]}") | $(ratio "$a" "${res[echo_64_per_sec/none]}") | $b ($(spread echo_4k_per_sec "$name")) | $(ratio "$b" "${res[echo_4k_per_sec/nginx]}") | $(ratio "$b" "${res[echo_4k_per_sec/none]}") |"
  done
  echo
  echo "![Echo throughput](bench/charts/throughput.png)"
  echo
  echo "## Latency"
  echo
  echo "Open loop at $rate messages/s in total, spread evenly over 100 connections, 64 B, $duration after $warmup"
  echo "of warm-up, the median of $rounds interleaved rounds (p99 range in brackets). Each latency counts from"
  echo "the instant the message was scheduled, not sent, so a stall delays every message behind it (no"
  echo "coordinated omission). The ratios are of p99. Stalled rounds: rounds in which some message waited"
  echo "over $((stall_us / 1000)) ms. They happen with no proxy too (the machine pausing every program on it),"
  echo "so one stalled round says little about a proxy, and the median of the rounds leaves it out."
  echo
  echo "| path | achieved msg/s | lost | p50 µs | p99 µs | p99.9 µs | stalled rounds | p99 vs NGINX | p99 vs no proxy |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for name in "${order[@]}"; do
    p99=${res[latency_p99_us/$name]}
    echo "| $name | ${res[latency_achieved_per_sec/$name]} | ${res[latency_lost/$name]} | ${res[latency_p50_us/$name]} | $p99 ($(spread latency_p99_us "$name")) | ${res[latency_p999_us/$name]} | $(stalled "$name") | $(ratio "$p99" "${res[latency_p99_us/nginx]}") | $(ratio "$p99" "${res[latency_p99_us/none]}") |"
  done
  echo
  echo "![Latency at a fixed rate](bench/charts/latency.png)"
  echo
  echo "## CPU"
  echo
  echo "CPU time (user and system, every process and thread of the proxy) per echoed message during the"
  echo "latency runs above: the same messages at the same rate through every proxy, so this is what each"
  echo "spends on the same work; the median of $rounds rounds (range in brackets). It includes the 100"
  echo "handshakes of each run. Unlike rates and tails, it hardly moves with the machine's other load."
  echo
  echo "| path | CPU µs per message | vs NGINX |"
  echo "| --- | --- | --- |"
  for name in "${proxies[@]}"; do
    c=${res[cpu_us_per_message/$name]}
    echo "| $name | $c ($(spread cpu_us_per_message "$name")) | $(ratio "$c" "${res[cpu_us_per_message/nginx]}") |"
  done
  echo
  echo "![Proxy CPU per message](bench/charts/cpu.png)"
  echo
  echo "## Memory"
  echo
  echo "RSS growth of the proxy's processes (NGINX's master and workers together) while it holds the idle"
  echo "sessions, divided by their number; each proxy had served nothing before. The sessions come from"
  echo "several load-generator processes spread over source addresses in 127.0.0.0/8. A direct session is"
  echo "two sockets in the proxy (client and upstream); multiplexed sessions share the upstream sockets of"
  echo "the pool. Upstream sockets: established connections from the proxy to the upstream while the"
  echo "sessions are open. Open files: the most held by any one process of the proxy (limit $(ulimit -Hn))."
  echo
  echo "| path | idle sessions | RSS per idle session, B | vs NGINX | upstream sockets | open files |"
  echo "| --- | --- | --- | --- | --- | --- |"
  for name in "${proxies[@]}"; do
    b=${res[idle_bytes_per_session/$name]}
    echo "| $name | ${res[idle_sessions/$name]} | $b | $(ratio "$b" "${res[idle_bytes_per_session/nginx]}") | ${res[upstream_sockets/$name]} | ${res[open_files/$name]} |"
  done
  echo
  echo "![RSS per idle session](bench/charts/memory.png)"
  echo
  echo "The numbers behind the tables and charts are in [bench/results.tsv](bench/results.tsv); the charts"
  echo "are redrawn from it by \`target/release/charts bench/results.tsv bench/charts\`."
  echo
  # What bench/replicas.sh, compression.sh, compression-cpu.sh and
  # http2.sh last measured into the same place, if they did.
  [ ! -f "$out/bench/replicas.md" ] || { cat "$out/bench/replicas.md"; echo; }
  [ ! -f "$out/bench/compression.md" ] || { cat "$out/bench/compression.md"; echo; }
  [ ! -f "$out/bench/compression-cpu.md" ] || { cat "$out/bench/compression-cpu.md"; echo; }
  [ ! -f "$out/bench/http2.md" ] || { cat "$out/bench/http2.md"; echo; }
  # The reasons behind the relay's shape, kept by hand.
  cat "$(dirname "$0")/why.md"
} > "$out/BENCHMARKS.md"
cat "$out/BENCHMARKS.md"
echo "bench/run.sh: done in $((elapsed / 60)) min $((elapsed % 60)) s"
