# Shared by the bench/*.sh scripts (sourced, not run): builds the shipped
# binaries, Cargo's `dist` profile (or takes prebuilt ones from BENCH_BIN), makes a scratch
# directory, stops every process the script recorded in `pids` when it
# exits, and holds the helpers the scripts share.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${BENCH_BIN:-}" ]; then
  bin=$BENCH_BIN
else
  cargo build --profile dist --quiet --manifest-path "$root/Cargo.toml" \
    -p muxgate -p muxgate-backend -p muxgate-bench
  bin=$root/target/dist
fi
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 143' TERM INT   # so that a killed script still cleans up
# Waits (bounded) until something listens on 127.0.0.1:$1.
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
rate() { sed -E 's/.*round_trips_per_sec=([0-9]+).*/\1/' <<<"$1"; }
# The value of `NAME=number` in a loadgen result line: field NAME LINE.
field() { sed -nE "s/.*(^| )$1=([0-9.]+).*/\\2/p" <<<"$2"; }

# A process and its children (NGINX's workers).
tree_pids() { echo "$1" $(pgrep -P "$1" || true); }
# Sum of the RSS of a process and its children, in KiB.
tree_rss() { local p total=0; for p in $(tree_pids "$1"); do total=$((total + $(rss_kib "$p"))); done; echo "$total"; }
# CPU time (user and system, every thread) a process and its children have
# used so far, in milliseconds.
tree_cpu_ms() {
  local p ticks=0
  for p in $(tree_pids "$1"); do
    ticks=$((ticks + $(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$p/stat")))
  done
  echo $((ticks * 1000 / $(getconf CLK_TCK)))
}
# Nanoseconds every thread of a process and its children has run so far
# (schedstat: exact, where the user/system ticks above are sampled).
tree_run_ns() {
  local p f total=0 ns
  for p in $(tree_pids "$1"); do
    for f in /proc/"$p"/task/*/schedstat; do read -r ns _ < "$f"; total=$((total + ns)); done
  done
  echo "$total"
}
# The most open files any one process of the tree holds.
tree_max_fds() { local p n most=0; for p in $(tree_pids "$1"); do n=$(ls "/proc/$p/fd" | wc -l); [ "$n" -gt "$most" ] && most=$n; done; echo "$most"; }
# Established TCP connections to 127.0.0.1:$2 that the tree of process $1 owns.
tree_sockets_to() {
  local owners; owners=$(tree_pids "$1" | tr ' ' '|')
  ss -Htnp state established "( dst 127.0.0.1:$2 )" | grep -cE "pid=($owners)," || true
}

# The Prometheus text of the muxgate whose admin listener is on port $1.
metrics() { (exec 3<>"/dev/tcp/127.0.0.1/$1"; printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3; cat <&3); }
# Waits (bounded) until the muxgate with admin port $1 counts $2 open
# sessions and has nothing left in its mux write queues (every `open` frame
# is written to the upstream).
wait_sessions() {
  for _ in $(seq 200); do
    metrics "$1" | awk -v n="$2" '/^muxgate_sessions_active/ {s += $NF}
      /^muxgate_mux_write_queue_depth/ {q += $NF} END {exit !(s >= n && q == 0)}' && return 0
    sleep 0.05
  done
  echo "muxgate (admin :$1) never reported $2 open sessions" >&2; exit 1
}

# Opens $2 idle WebSocket connections to $1 and returns once every handshake
# is done. They come from several loadgen processes, at most 5,000 each
# (the hard limit is 20,000 open files per process), each starting at its
# own source address in 127.0.0.0/8; release_idle closes them. The array
# idle_args, if set, adds loadgen options (`--deflate --warm 1024`).
hold_idle() {
  local url=$1 total=$2 procs i n fd line
  procs=$(( (total + 4999) / 5000 )); [ "$procs" -ge 2 ] || procs=2
  idle_pids=(); idle_fds=()
  for ((i = 0; i < procs; i++)); do
    n=$(( total / procs + (i < total % procs ? 1 : 0) ))
    rm -f "$work/idle-$i"; mkfifo "$work/idle-$i"
    "$bin/loadgen" idle --url "$url" -c "$n" --source-offset $(( 1 + i * 254 / procs )) --hold 1h \
      ${idle_args[@]+"${idle_args[@]}"} > "$work/idle-$i" & idle_pids+=($!); pids+=($!)
  done
  # Open every fifo before reading any, so that all loadgens start at once.
  for ((i = 0; i < procs; i++)); do exec {fd}<"$work/idle-$i"; idle_fds+=("$fd"); done
  for fd in "${idle_fds[@]}"; do
    read -r -t 300 line <&"$fd" && [[ $line == open* ]] || { echo "loadgen idle to $url failed" >&2; exit 1; }
  done
}
# Waits (bounded) until the muxgate with admin port $1 has closed every
# session, so that closing thousands of them does not run beside the next
# measurement; prints how long that took.
wait_no_sessions() {
  local start=$SECONDS
  for _ in $(seq 1200); do
    metrics "$1" | awk '/^muxgate_sessions_active/ {s += $NF} END {exit !(s == 0)}' && { echo $((SECONDS - start)); return 0; }
    sleep 0.05
  done
  echo "muxgate (admin :$1) still had sessions 60 s after their clients left" >&2; exit 1
}
release_idle() {
  local fd
  kill "${idle_pids[@]}"; wait "${idle_pids[@]}" 2>/dev/null || true
  for fd in "${idle_fds[@]}"; do exec {fd}<&-; done
}

# muxgate_yaml MODE PORT ADMIN_PORT UPSTREAM_PORT SERVER POOL_SIZE: a muxgate
# config with one upstream on /ws (the demo upstream's /echo), in MODE
# (direct or mux: binary envelope, POOL_SIZE connections); SERVER adds
# settings to `server` (", workers: 1").
muxgate_yaml() {
  local ws='enable_direct_communication: true'
  [ "$1" = direct ] || ws="enable_direct_communication: false, envelope: binary, pool_size: $6"
  cat <<YAML
server: {listen: "127.0.0.1:$2", admin_listen: "127.0.0.1:$3"$5}
upstreams:
  - name: $1
    routes: [{external_path: /ws, internal_path: /echo}]
    targets: [{url: "ws://127.0.0.1:$4"}]
    websocket_config: {$ws, ping_period: 120s, pong_wait: 180s}
YAML
}

# nginx_conf PORT UPSTREAM_PORT PROCESSES: NGINX as a WebSocket proxy from
# PORT to the demo upstream, in the foreground; PROCESSES holds the
# main-context lines on workers (one per line).
nginx_conf() {
  cat <<CONF
$3
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
daemon off;
events { worker_connections 20000; }
http {
  access_log off;
  map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
  server {
    listen 127.0.0.1:$1;
    location / {
      proxy_pass http://127.0.0.1:$2;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection \$connection_upgrade;
      proxy_read_timeout 1h;
    }
  }
}
CONF
}

# haproxy_conf PORT UPSTREAM_PORT GLOBAL: HAProxy (HTTP mode) from PORT to
# the demo upstream; GLOBAL holds extra lines of its `global` section.
haproxy_conf() {
  cat <<CONF
global
  # The machine allows 20,000 open files per process; HAProxy needs two per connection.
  maxconn 9500
$3
defaults
  mode http
  maxconn 9500
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend fe
  bind 127.0.0.1:$1
  default_backend be
backend be
  server s1 127.0.0.1:$2
CONF
}

# Writes the BENCHMARKS.md section $1 (its first line its `## ` heading) to
# $out/bench/$2, and into $out/BENCHMARKS.md: in place of the section of an
# earlier run, else before the hand-kept part that bench/run.sh appends
# (bench/why.md); then prints it. For the scripts that measure on their own
# (bench/run.sh takes in what they last wrote to bench/).
put_section() {
  local file=$out/bench/$2 heading
  printf '%s\n' "$1" > "$file"
  heading=$(head -n 1 "$file")
  awk -v file="$file" -v heading="$heading" '
    function put() { while ((getline line < file) > 0) print line; print ""; done = 1 }
    $0 == heading { if (!done) put(); skip = 1; next }
    skip && /^## / { skip = 0 }
    skip { next }
    /^## Why the relay is shaped as it is$/ && !done { put() }
    { print }
    END { if (!done) { print ""; put() } }
  ' "$out/BENCHMARKS.md" > "$work/BENCHMARKS.md"
  cp "$work/BENCHMARKS.md" "$out/BENCHMARKS.md"
  printf '%s\n' "$1"
}
