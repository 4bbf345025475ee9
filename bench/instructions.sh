#!/usr/bin/env bash
# User-space instructions per echoed round trip, counted by valgrind's
# callgrind: NGINX, HAProxy, muxgate direct and muxgate multiplexed, and
# where muxgate direct's go, function by function.
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
cat > "$work/nginx.conf" <<CONF
worker_processes 1;
master_process off;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events {}
http {
  access_log off;
  map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
  server {
    listen 127.0.0.1:$nginx_port;
    location / {
      proxy_pass http://127.0.0.1:$up_port;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection \$connection_upgrade;
    }
  }
}
CONF
cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend fe
  bind 127.0.0.1:$haproxy_port
  default_backend be
backend be
  server s1 127.0.0.1:$up_port
CONF
for mode in direct mux; do
  if [ "$mode" = direct ]; then port=$direct_port; admin=$direct_admin; ws='enable_direct_communication: true'
  else port=$mux_port; admin=$mux_admin; ws='enable_direct_communication: false, envelope: binary, pool_size: 1'; fi
  cat > "$work/muxgate-$mode.yaml" <<YAML
server: {listen: "127.0.0.1:$port", admin_listen: "127.0.0.1:$admin", workers: 1}
upstreams:
  - name: $mode
    routes: [{external_path: /ws, internal_path: /echo}]
    targets: [{url: "ws://127.0.0.1:$up_port"}]
    websocket_config: {$ws, ping_period: 120s, pong_wait: 180s}
YAML
done
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
echo
echo "muxgate direct, by function (at least 20 per round trip):"
echo
echo '```'
cat "$work/muxgate-direct.functions"
echo '```'
