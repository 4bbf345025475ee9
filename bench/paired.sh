#!/usr/bin/env bash
# Long paired rounds over NGINX, HAProxy, muxgate direct and `relay` (a
# bare tokio byte copier, the least a proxy on tokio can do), for when
# run.sh's short rounds cannot tell the paths apart.
#
# On this 2-core machine the load generator and the upstream share the
# cores with the proxy, so one round's number moves by a few percent (a
# tail latency by much more) with whatever else the machine does. Each
# round here visits every path in turn, starting one path later each time.
#
#   bench/paired.sh echo      throughput: 100 connections, one 64 B message
#                             in flight on each; mean rate per path
#   bench/paired.sh latency   p99 at 5,000 messages/s over 100 connections
#                             (open loop, as run.sh); median p99 per path
#
# For each path: in how many rounds it was as good as NGINX and as good as
# HAProxy in the same round, and the proxy's CPU per message (every
# thread's run time from /proc/PID/task/*/schedstat, in nanoseconds: exact,
# where the user/system split of /proc/PID/stat is sampled at ticks).
#
# Usage: bench/paired.sh [echo|latency]   (about 4.5 minutes with the
#   binaries built). BENCH_PAIRED_ROUNDS [12], BENCH_PAIRED_DURATION [5s],
#   BENCH_PAIRED_SIZE [64], BENCH_RATE [5000], and BENCH_BIN,
#   BENCH_PORT_BASE as for bench/run.sh.
set -euo pipefail
mode=${1:-echo}
case $mode in echo | latency) ;; *) echo "usage: bench/paired.sh [echo|latency]" >&2; exit 2 ;; esac
"$(dirname "$0")/deps.sh"
source "$(dirname "$0")/common.sh"
rounds=${BENCH_PAIRED_ROUNDS:-12}
duration=${BENCH_PAIRED_DURATION:-5s}
size=${BENCH_PAIRED_SIZE:-64}
rate=${BENCH_RATE:-5000}
read -r up_port nginx_port haproxy_port direct_port direct_admin relay_port \
  < <(seq "${BENCH_PORT_BASE:-3100}" $(( ${BENCH_PORT_BASE:-3100} + 5 )) | xargs)
nginx=$(command -v nginx || echo /usr/sbin/nginx); haproxy=$(command -v haproxy || echo /usr/sbin/haproxy)

"$bin/demo-upstream" "127.0.0.1:$up_port" & pids+=($!)
nginx_conf "$nginx_port" "$up_port" "worker_processes auto;" > "$work/nginx.conf"
haproxy_conf "$haproxy_port" "$up_port" "" > "$work/haproxy.cfg"
muxgate_yaml direct "$direct_port" "$direct_admin" "$up_port" ", max_connections: 100000" 2 > "$work/direct.yaml"
"$nginx" -c "$work/nginx.conf" & nginx_pid=$!; pids+=($nginx_pid)
"$haproxy" -f "$work/haproxy.cfg" & haproxy_pid=$!; pids+=($haproxy_pid)
"$bin/muxgate" --config "$work/direct.yaml" --log-level warn & direct_pid=$!; pids+=($direct_pid)
"$bin/relay" --listen "127.0.0.1:$relay_port" --upstream "127.0.0.1:$up_port" & relay_pid=$!; pids+=($relay_pid)
for p in $up_port $nginx_port $haproxy_port $direct_port $relay_port; do wait_port "$p"; done

paths=(nginx haproxy muxgate-direct relay)
declare -A url=(
  [nginx]="ws://127.0.0.1:$nginx_port/echo"
  [haproxy]="ws://127.0.0.1:$haproxy_port/echo"
  [muxgate-direct]="ws://127.0.0.1:$direct_port/ws"
  [relay]="ws://127.0.0.1:$relay_port/echo"
)
declare -A pid=([nginx]=$nginx_pid [haproxy]=$haproxy_pid [muxgate-direct]=$direct_pid [relay]=$relay_pid)

# value[PATH/ROUND]: the round's number (rt/s, or p99 µs); cpu[PATH/ROUND]: ns per message.
declare -A value cpu
for round in $(seq "$rounds"); do
  k=$(( round % ${#paths[@]} ))
  for name in "${paths[@]:k}" "${paths[@]:0:k}"; do
    before=$(tree_run_ns "${pid[$name]}")
    # The CPU is per message sent, handshakes included (a few milliseconds'
    # worth): echo has no warm-up, and latency's `sent` counts the warm-up's.
    if [ "$mode" = echo ]; then
      line=$("$bin/loadgen" echo --url "${url[$name]}" -c 100 --size "$size" --duration "$duration" --warmup 0s)
      value[$name/$round]=$(rate "$line"); messages=$(field total "$line")
    else
      line=$("$bin/loadgen" latency --url "${url[$name]}" -c 100 --size "$size" --rate "$rate" --duration "$duration" --warmup 1s)
      value[$name/$round]=$(field p99_us "$line"); messages=$(field sent "$line")
    fi
    after=$(tree_run_ns "${pid[$name]}")
    cpu[$name/$round]=$(( (after - before) / messages ))
    echo "round $round, $name: ${value[$name/$round]} $([ "$mode" = echo ] && echo rt/s || echo "µs p99"), proxy CPU ${cpu[$name/$round]} ns per message" >&2
  done
done

# better A B: A is as good as B (a rate at least B, a latency at most B).
better() { if [ "$mode" = echo ]; then [ "$1" -ge "$2" ]; else [ "$1" -le "$2" ]; fi; }
if [ "$mode" = echo ]; then
  echo "Echo, 100 connections, $size B, one message in flight on each; $rounds rounds of $duration that visit"
  echo "every path in turn, each round starting one path later. Mean round trips per second."
  head="mean rt/s"
else
  echo "Open loop at $rate messages/s over 100 connections, $size B; $rounds rounds of $duration that visit"
  echo "every path in turn (after 1s of warm-up), each round starting one path later. Median p99 of the"
  echo "rounds, in µs."
  head="median p99 µs"
fi
echo
echo "| path | $head | vs NGINX | rounds as good as NGINX's | as HAProxy's | proxy CPU ns per message |"
echo "| --- | --- | --- | --- | --- | --- |"
# Per path: the mean (echo) or median (latency) of its rounds, the rounds
# as good as NGINX's and as HAProxy's, and its mean CPU per message.
declare -A summary
for name in "${paths[@]}"; do
  values=(); cpu_sum=0; vs_nginx=0; vs_haproxy=0
  for round in $(seq "$rounds"); do
    values+=("${value[$name/$round]}"); cpu_sum=$((cpu_sum + cpu[$name/$round]))
    better "${value[$name/$round]}" "${value[nginx/$round]}" && vs_nginx=$((vs_nginx + 1))
    better "${value[$name/$round]}" "${value[haproxy/$round]}" && vs_haproxy=$((vs_haproxy + 1))
  done
  if [ "$mode" = echo ]; then
    summary[$name]=$(printf '%s\n' "${values[@]}" | awk '{s += $1} END {printf "%.0f", s / NR}')
  else
    summary[$name]=$(printf '%s\n' "${values[@]}" | sort -n | awk '{v[NR] = $1} END {printf "%g", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}')
  fi
  echo "| $name | ${summary[$name]} | $(awk -v a="${summary[$name]}" -v b="${summary[nginx]}" 'BEGIN {printf "%.3f", a / b}') | $vs_nginx of $rounds | $vs_haproxy of $rounds | $((cpu_sum / rounds)) |"
done
