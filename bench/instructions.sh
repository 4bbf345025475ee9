#!/usr/bin/env bash
# User-space instructions per echoed round trip, counted by valgrind's
# callgrind: NGINX, HAProxy, muxgate direct and muxgate multiplexed, and
# where muxgate's go, function by function.
#
# Rates and CPU times on this machine move by several percent from one run
# to the next; an instruction count is the same twice for the same binary
# and load. It shows what a change to the relay costs or saves in user
# space, which at saturation is about a sixth of the broker's CPU (the rest
# is the kernel's, and level with NGINX's: the same system calls per
# message). Each proxy runs twice under callgrind, with 10 connections at
# 500 messages/s for 2 s and for 8 s after 1 s of warm-up; the difference
# between the two runs, divided by the 3,000 round trips between them,
# leaves out start-up and the handshakes.
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
round_trips=$(( (long - short) * rate ))

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

# profile NAME SECONDS: runs the proxy under callgrind for that long a load,
# leaving its function table in $work/NAME.SECONDS.
profile() {
  local out=$work/cg.$1.$2
  # shellcheck disable=SC2086 # the command line is split on purpose
  valgrind --tool=callgrind --callgrind-out-file="$out.%p" ${cmd[$1]} 2>/dev/null & local vg=$!
  wait_port "${port[$1]}"
  # A multiplexed path answers only once its pool connection is up.
  "$bin/loadgen" latency --url "${url[$1]}" -c 10 --size 64 --rate 1 --duration 1s --warmup 0s >/dev/null
  "$bin/loadgen" latency --url "${url[$1]}" -c 10 --size 64 --rate "$rate" --duration "${2}s" --warmup 1s >/dev/null
  kill -TERM "$vg"; wait "$vg" 2>/dev/null || true
  callgrind_annotate --threshold=100 "$out".* > "$work/$1.$2" 2>/dev/null
}
# per_rt NAME: instructions per round trip, and the functions' in
# $work/NAME.functions (highest first).
per_rt() {
  awk -v n="$round_trips" -v fns="$work/$1.functions" '
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
    }' "$work/$1.$short" "$work/$1.$long"
}

declare -A instructions
for name in "${order[@]}"; do
  profile "$name" "$short"
  profile "$name" "$long"
  instructions[$name]=$(per_rt "$name")
  echo "$name: ${instructions[$name]} instructions per round trip" >&2
done

echo "User-space instructions per echoed round trip (64 B, 10 connections at $rate msg/s; callgrind):"
echo
echo "| path | instructions per round trip | vs NGINX |"
echo "| --- | --- | --- |"
for name in "${order[@]}"; do
  echo "| $name | ${instructions[$name]} | $(awk -v a="${instructions[$name]}" -v b="${instructions[nginx]}" 'BEGIN { printf "%.2f", a / b }') |"
done
for name in muxgate-direct muxgate-mux; do
  echo
  echo "$name, by function (at least 20 per round trip):"
  echo
  echo '```'
  cat "$work/$name.functions"
  echo '```'
done
