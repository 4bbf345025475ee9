#!/usr/bin/env bash
# Long paired echo rounds: NGINX, muxgate direct, and `relay` (a bare
# tokio byte copier, the least a proxy on tokio can do), for when run.sh's
# short rounds cannot tell two paths apart.
#
# On this 2-core machine the load generator and the upstream share the
# cores with the proxy and use two thirds of the CPU of every round trip,
# so one round's rate moves by a few percent with whatever else the machine
# does. Each round here visits every path in turn, starting one path later
# each time; the report gives each path's mean rate, in how many rounds it
# was at least NGINX's, and the proxy's CPU per round trip (every thread's
# run time from /proc/PID/task/*/schedstat, in nanoseconds: exact, where
# the user/system split of /proc/PID/stat is sampled at ticks).
#
# Usage: bench/paired.sh   (about 3.5 minutes with the binaries built)
#   BENCH_PAIRED_ROUNDS [12], BENCH_PAIRED_DURATION [5s], BENCH_PAIRED_SIZE [64],
#   and BENCH_BIN, BENCH_PORT_BASE as for bench/run.sh.
set -euo pipefail
"$(dirname "$0")/deps.sh"
source "$(dirname "$0")/common.sh"
rounds=${BENCH_PAIRED_ROUNDS:-12}
duration=${BENCH_PAIRED_DURATION:-5s}
size=${BENCH_PAIRED_SIZE:-64}
read -r up_port nginx_port direct_port direct_admin relay_port \
  < <(seq "${BENCH_PORT_BASE:-3100}" $(( ${BENCH_PORT_BASE:-3100} + 4 )) | xargs)
nginx=$(command -v nginx || echo /usr/sbin/nginx)

"$bin/demo-upstream" "127.0.0.1:$up_port" & pids+=($!)
nginx_conf "$nginx_port" "$up_port" "worker_processes auto;" > "$work/nginx.conf"
muxgate_yaml direct "$direct_port" "$direct_admin" "$up_port" ", max_connections: 100000" 2 > "$work/direct.yaml"
"$nginx" -c "$work/nginx.conf" & nginx_pid=$!; pids+=($nginx_pid)
"$bin/muxgate" --config "$work/direct.yaml" --log-level warn & direct_pid=$!; pids+=($direct_pid)
"$bin/relay" --listen "127.0.0.1:$relay_port" --upstream "127.0.0.1:$up_port" & relay_pid=$!; pids+=($relay_pid)
for p in $up_port $nginx_port $direct_port $relay_port; do wait_port "$p"; done

paths=(nginx muxgate-direct relay)
declare -A url=(
  [nginx]="ws://127.0.0.1:$nginx_port/echo"
  [muxgate-direct]="ws://127.0.0.1:$direct_port/ws"
  [relay]="ws://127.0.0.1:$relay_port/echo"
)
declare -A pid=([nginx]=$nginx_pid [muxgate-direct]=$direct_pid [relay]=$relay_pid)
# Nanoseconds every thread of a process tree has run so far.
tree_run_ns() {
  local p f total=0 ns
  for p in $(tree_pids "$1"); do
    for f in /proc/"$p"/task/*/schedstat; do read -r ns _ < "$f"; total=$((total + ns)); done
  done
  echo "$total"
}

declare -A rate_sum cpu_sum won rate_of
for round in $(seq "$rounds"); do
  k=$(( round % ${#paths[@]} ))
  for name in "${paths[@]:k}" "${paths[@]:0:k}"; do
    before=$(tree_run_ns "${pid[$name]}")
    # No warm-up: the CPU is then that of exactly the round trips counted
    # (and of 100 handshakes, a few milliseconds' worth).
    line=$("$bin/loadgen" echo --url "${url[$name]}" -c 100 --size "$size" --duration "$duration" --warmup 0s)
    after=$(tree_run_ns "${pid[$name]}")
    total=$(field total "$line"); rate=$(rate "$line")
    ns=$(( (after - before) / total ))
    rate_of[$name]=$rate
    rate_sum[$name]=$(( ${rate_sum[$name]:-0} + rate ))
    cpu_sum[$name]=$(( ${cpu_sum[$name]:-0} + ns ))
    echo "round $round, $name: $rate rt/s, proxy CPU $ns ns per round trip" >&2
  done
  for name in "${paths[@]}"; do
    [ "${rate_of[$name]}" -ge "${rate_of[nginx]}" ] && won[$name]=$(( ${won[$name]:-0} + 1 ))
  done
done

echo "Echo, 100 connections, $size B, one message in flight on each; $rounds rounds of $duration that visit"
echo "every path in turn, each round starting one path later."
echo
echo "| path | mean rt/s | vs NGINX | rounds at least NGINX's | proxy CPU ns per round trip | vs NGINX |"
echo "| --- | --- | --- | --- | --- | --- |"
for name in "${paths[@]}"; do
  mean=$(( rate_sum[$name] / rounds )); cpu=$(( cpu_sum[$name] / rounds ))
  wins="${won[$name]:-0} of $rounds"; [ "$name" = nginx ] && wins="-"
  echo "| $name | $mean | $(awk -v a="$mean" -v b="$(( rate_sum[nginx] / rounds ))" 'BEGIN {printf "%.3f", a / b}') | $wins | $cpu | $(awk -v a="$cpu" -v b="$(( cpu_sum[nginx] / rounds ))" 'BEGIN {printf "%.3f", a / b}') |"
done
