#!/usr/bin/env bash
# Side-by-side benchmark: the demo echo upstream reached with no proxy, through
# NGINX, HAProxy, muxgate direct and muxgate multiplexed (binary envelope),
# all in one run on this machine. Writes BENCHMARKS.md with ratios against
# NGINX and against no proxy. Installs nginx and haproxy from apt if missing.
#
# Usage: bench/run.sh [DURATION] [IDLE]   (default 10s per throughput run,
# 1000 idle connections for the memory column)
#
# Measures: echo round trips/s with 100 connections at 64 B and at 4 KiB,
# with p50/p99/p99.9 latency of those runs; RSS per idle proxied connection.
# Not yet: latency at a fixed moderate rate, 5,000/19,000-session scale, PNG
# charts (see the issue notes).
set -euo pipefail
duration=${1:-10s}
idle=${2:-1000}
source "$(dirname "$0")/common.sh"

if ! command -v nginx >/dev/null || ! command -v haproxy >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light haproxy >/dev/null
fi
nginx=$(command -v nginx); haproxy=$(command -v haproxy)

"$bin/demo-upstream" 127.0.0.1:3100 & pids+=($!)
cat > "$work/nginx.conf" <<CONF
worker_processes auto;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
daemon off;
events { worker_connections 20000; }
http {
  access_log off;
  map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
  server {
    listen 127.0.0.1:8280;
    location / {
      proxy_pass http://127.0.0.1:3100;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection \$connection_upgrade;
      proxy_read_timeout 1h;
    }
  }
}
CONF
cat > "$work/haproxy.cfg" <<CONF
global
  # The machine allows 20,000 open files per process; HAProxy needs two per connection.
  maxconn 9500
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend fe
  bind 127.0.0.1:8380
  default_backend be
backend be
  server s1 127.0.0.1:3100
CONF
# One muxgate process per mode, so each one's memory is measured alone.
for mode in direct mux; do
  if [ "$mode" = direct ]; then port=8180; admin=9190; ws='enable_direct_communication: true'
  else port=8181; admin=9191; ws='enable_direct_communication: false, envelope: binary, pool_size: 2'; fi
  cat > "$work/muxgate-$mode.yaml" <<YAML
server: {listen: "127.0.0.1:$port", admin_listen: "127.0.0.1:$admin", max_connections: 100000}
upstreams:
  - name: $mode
    routes: [{external_path: /ws, internal_path: /echo}]
    targets: [{url: "ws://127.0.0.1:3100"}]
    websocket_config: {$ws, ping_period: 120s, pong_wait: 180s}
YAML
done
"$nginx" -c "$work/nginx.conf" & nginx_pid=$!; pids+=($nginx_pid)
"$haproxy" -f "$work/haproxy.cfg" & haproxy_pid=$!; pids+=($haproxy_pid)
"$bin/muxgate" --config "$work/muxgate-direct.yaml" --log-level warn & direct_pid=$!; pids+=($direct_pid)
"$bin/muxgate" --config "$work/muxgate-mux.yaml" --log-level warn & mux_pid=$!; pids+=($mux_pid)
for p in 3100 8280 8380 8180 8181; do wait_port $p; done

# Sum of the RSS of a process and its children (NGINX's workers), in KiB.
tree_rss() { local total=0; for p in $1 $(pgrep -P "$1" || true); do total=$((total + $(rss_kib "$p"))); done; echo "$total"; }

declare -A url=(
  [none]="ws://127.0.0.1:3100/echo"
  [nginx]="ws://127.0.0.1:8280/echo"
  [haproxy]="ws://127.0.0.1:8380/echo"
  [muxgate-direct]="ws://127.0.0.1:8180/ws"
  [muxgate-mux]="ws://127.0.0.1:8181/ws"
)
declare -A pid=([nginx]=$nginx_pid [haproxy]=$haproxy_pid [muxgate-direct]=$direct_pid [muxgate-mux]=$mux_pid)
order=(none nginx haproxy muxgate-direct muxgate-mux)
declare -A r64 r4k p99_64 mem
field() { sed -E "s/.*$1=([0-9]+).*/\\1/" <<<"$2"; }
# Memory first, on fresh processes (an allocator keeps what it freed, so
# growth measured after the throughput runs would read low).
for name in nginx haproxy muxgate-direct muxgate-mux; do
  before=$(tree_rss "${pid[$name]}")
  rm -f "$work/idle.out"; mkfifo "$work/idle.out"
  "$bin/loadgen" idle --url "${url[$name]}" -c "$idle" --hold 120s > "$work/idle.out" & idle_pid=$!
  read -r _ < "$work/idle.out"
  after=$(tree_rss "${pid[$name]}")
  mem[$name]=$(( (after - before) * 1024 / idle ))
  kill "$idle_pid"; wait "$idle_pid" 2>/dev/null || true
  echo "$name: $(( mem[$name] )) B per idle connection"
done

for name in "${order[@]}"; do
  out=$("$bin/loadgen" echo --url "${url[$name]}" -c 100 --size 64 --duration "$duration")
  r64[$name]=$(rate "$out"); p99_64[$name]=$(field p99_us "$out")
  echo "$name 64B: $out"
  out=$("$bin/loadgen" echo --url "${url[$name]}" -c 100 --size 4096 --duration "$duration")
  r4k[$name]=$(rate "$out")
  echo "$name 4KiB: $out"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
{
  echo "# Benchmarks"
  echo
  echo "Written by \`bench/run.sh $duration $idle\` on $(date -u +%Y-%m-%d), $(nproc) cores, $(uname -r);"
  echo "$($nginx -v 2>&1 | head -1), $($haproxy -v | head -1 | cut -d' ' -f1-3), muxgate $(git -C "$root" rev-parse --short HEAD)."
  echo "Everything (load generator, proxies, demo echo upstream) shares the same 2 cores, so a proxy costs"
  echo "about half the no-proxy rate whatever it is; compare the proxies with each other."
  echo
  echo "| path | echo rt/s, 64 B | vs NGINX | vs no proxy | p99 µs, 64 B | echo rt/s, 4 KiB | vs NGINX | RSS per idle connection |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  for name in "${order[@]}"; do
    m=${mem[$name]:-}
    echo "| $name | ${r64[$name]} | $(ratio "${r64[$name]}" "${r64[nginx]}") | $(ratio "${r64[$name]}" "${r64[none]}") | ${p99_64[$name]} | ${r4k[$name]} | $(ratio "${r4k[$name]}" "${r4k[nginx]}") | ${m:+$m B} |"
  done
  echo
  echo "RSS per idle connection: the proxy's RSS growth holding $idle idle client connections (two sockets"
  echo "each for NGINX, HAProxy and muxgate direct; one for muxgate multiplexed, whose $idle sessions share"
  echo "2 upstream sockets), divided by $idle."
  echo
  echo "Not measured yet (issue 6): latency at a fixed moderate rate, 5,000 direct and 19,000 multiplexed"
  echo "sessions, PNG charts."
} > "$root/BENCHMARKS.md"
cat "$root/BENCHMARKS.md"
