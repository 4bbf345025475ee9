#!/usr/bin/env bash
# User-space instructions per echoed round trip, counted by valgrind's
# callgrind: NGINX, HAProxy, muxgate direct and muxgate multiplexed, and
# where muxgate's go, function by function.
#
# Rates and CPU times on this machine move by several percent from one run
# to the next; an instruction count is the same twice for the same binary
# and load. It shows what a change to the relay costs or saves in user
# space, which at saturation is the smaller part of the broker's CPU (most
# is the kernel's, and level with NGINX's: the same system calls per
# message). Each proxy runs under callgrind with two loads, each twice (for
# a short and a long time): paced, 10 connections at 500 messages/s (every
# message wakes the proxy), and saturated, 100 connections each echoing as
# fast as the proxy under callgrind answers (many messages per wake, as at
# full speed). The difference between the short and the long run, divided
# by the round trips between them, leaves out start-up and the handshakes.
# The two loads can disagree: a change that saves work per wake may cost
# more per message when wakes are shared. And instructions are not cycles:
# an atomic read-modify-write or a cache miss counts as one, so a change
# can cut instructions here yet save no CPU at full speed (atomics in place
# of the work it spared): confirm a gain in CPU per round trip at
# saturation before keeping it.
#
# Usage: bench/instructions.sh   (installs valgrind from apt if missing;
# about a minute). BENCH_BIN and BENCH_PORT_BASE as for bench/run.sh.
set -euo pipefail
command -v valgrind >/dev/null || {
  echo "bench/instructions.sh: apt-get install valgrind" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
}
source "$(dirname "$0")/common.sh"
read -r up_port nginx_port haproxy_port direct_port mux_port direct_admin mux_admin \
  < <(seq "${BENCH_PORT_BASE:-3100}" $(( ${BENCH_PORT_BASE:-3100} + 6 )) | xargs)
nginx=$(command -v nginx || echo /usr/sbin/nginx); haproxy=$(command -v haproxy || echo /usr/sbin/haproxy)
short=2 long=8 rate=500

"$bin/demo-upstream" "127.0.0.1:$up_port" & pids+=($!)
wait_port "$up_port"
# One process each, so that callgrind sees all of a proxy's work.
nginx_conf "$nginx_port" "$up_port" "worker_processes 1;
master_process off;" > "$work/nginx.conf"
haproxy_conf "$haproxy_port" "$up_port" "  nbthread 1" > "$work/haproxy.cfg"
muxgate_yaml direct "$direct_port" "$direct_admin" "$up_port" ", workers: 1" 1 > "$work/muxgate-direct.yaml"
muxgate_yaml mux "$mux_port" "$mux_admin" "$up_port" ", workers: 1" 1 > "$work/muxgate-mux.yaml"
declare -A cmd=(
  [nginx]="$nginx -c $work/nginx.conf"
  [haproxy]="$haproxy -f $work/haproxy.cfg"
  [muxgate-direct]="$bin/muxgate --config $work/muxgate-direct.yaml --log-level warn"
  [muxgate-mux]="$bin/muxgate --config $work/muxgate-mux.yaml --log-level warn"
)
declare -A url=(
  [nginx]="ws://127.0.0.1:$nginx_port/echo"
  [haproxy]="ws://127.0.0.1:$haproxy_port/echo"
  [muxgate-direct]="ws://127.0.0.1:$direct_port/ws"
  [muxgate-mux]="ws://127.0.0.1:$mux_port/ws"
)
declare -A port=([nginx]=$nginx_port [haproxy]=$haproxy_port [muxgate-direct]=$direct_port [muxgate-mux]=$mux_port)
order=(nginx haproxy muxgate-direct muxgate-mux)

# profile NAME LOAD SECONDS: runs the proxy under callgrind for that long a
# LOAD (paced or saturated), leaving its function table in
# $work/NAME.LOAD.SECONDS and the round trips echoed in .rt beside it.
profile() {
  local out=$work/cg.$1.$2.$3 line
  # shellcheck disable=SC2086 # the command line is split on purpose
  valgrind --tool=callgrind --callgrind-out-file="$out.%p" ${cmd[$1]} 2>/dev/null & local vg=$!
  wait_port "${port[$1]}"
  # A multiplexed path answers only once its pool connection is up.
  "$bin/loadgen" latency --url "${url[$1]}" -c 10 --size 64 --rate 1 --duration 1s --warmup 0s >/dev/null
  if [ "$2" = paced ]; then
    "$bin/loadgen" latency --url "${url[$1]}" -c 10 --size 64 --rate "$rate" --duration "${3}s" --warmup 1s >/dev/null
    echo $(( $3 * rate )) > "$work/$1.$2.$3.rt"
  else
    line=$("$bin/loadgen" echo --url "${url[$1]}" -c 100 --size 64 --duration "${3}s" --warmup 0s)
    field total "$line" > "$work/$1.$2.$3.rt"
  fi
  kill -TERM "$vg"; wait "$vg" 2>/dev/null || true
  callgrind_annotate --threshold=100 "$out".* > "$work/$1.$2.$3" 2>/dev/null
}
# per_rt NAME LOAD: instructions per round trip, and the functions' in
# $work/NAME.LOAD.functions (highest first).
per_rt() {
  local n=$(( $(cat "$work/$1.$2.$long.rt") - $(cat "$work/$1.$2.$short.rt") ))
  awk -v n="$n" -v fns="$work/$1.$2.functions" '
    /Auto-annotated source|User-annotated source/ { done[FILENAME] = 1 }
    done[FILENAME] || !/^ *[0-9,]+ +\( *[0-9.]+%\)/ { next }
    {
      v = $1; gsub(",", "", v)
      sign = (FILENAME ~ /\.'"$long"'$/) ? 1 : -1
      if (/PROGRAM TOTALS/) { total += sign * v; next }
      name = $0; sub(/^ *[0-9,]+ +\( *[0-9.]+%\) +/, "", name); sub(/ \[.*$/, "", name); sub(/^[^:]*:/, "", name)
      f[name] += sign * v
    }
    END {
      for (k in f) if (f[k] / n >= 20) printf "%d\t%s\n", f[k] / n, k | "sort -rn > " fns
      printf "%d\n", total / n
    }' "$work/$1.$2.$short" "$work/$1.$2.$long"
}

declare -A instructions
for name in "${order[@]}"; do
  for load in paced saturated; do
    profile "$name" "$load" "$short"
    profile "$name" "$load" "$long"
    instructions[$name/$load]=$(per_rt "$name" "$load")
    echo "$name, $load: ${instructions[$name/$load]} instructions per round trip" >&2
  done
done

vs_nginx() { awk -v a="${instructions[$1/$2]}" -v b="${instructions[nginx/$2]}" 'BEGIN { printf "%.2f", a / b }'; }
echo "User-space instructions per echoed round trip, 64 B (callgrind): paced, 10 connections at $rate msg/s;"
echo "saturated, 100 connections echoing as fast as the proxy under callgrind answers."
echo
echo "| path | paced | vs NGINX | saturated | vs NGINX |"
echo "| --- | --- | --- | --- | --- |"
for name in "${order[@]}"; do
  echo "| $name | ${instructions[$name/paced]} | $(vs_nginx "$name" paced) | ${instructions[$name/saturated]} | $(vs_nginx "$name" saturated) |"
done
for name in muxgate-direct muxgate-mux; do
  for load in paced saturated; do
    echo
    echo "$name, $load, by function (at least 20 per round trip):"
    echo
    echo '```'
    cat "$work/$name.$load.functions"
    echo '```'
  done
done
