#!/usr/bin/env bash
# Two builds of muxgate against each other, round by round, for a change
# that must not cost anything (a restructuring, a dependency bump) on a
# day when bench/run.sh's rounds move by more than the change could.
#
# Each round runs both builds, the order alternating, on the same upstream
# and load generator: direct and multiplexed 64 B echo throughput (100
# connections), the broker's CPU per message at 5,000 msg/s (every
# thread's run time from schedstat), and its RSS per idle direct session
# (BENCH_AB_IDLE sessions). It prints every round, then per measure each
# build's median, new/old of the medians, and in how many rounds new was
# at least as good as old in the same round.
#
# Usage: bench/ab.sh OLD_DIR NEW_DIR   (each holding a release `muxgate`;
#   loadgen and demo-upstream come from NEW_DIR). BENCH_AB_ROUNDS [6],
#   BENCH_AB_DURATION [4s], BENCH_AB_IDLE [5000], BENCH_PORT_BASE [3400].
#   About 40 s a round.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: bench/ab.sh OLD_DIR NEW_DIR" >&2; exit 2; }
old=$1 new=$2
BENCH_BIN=$new source "$(dirname "$0")/common.sh"
rounds=${BENCH_AB_ROUNDS:-6} duration=${BENCH_AB_DURATION:-4s} idle=${BENCH_AB_IDLE:-5000}
read -r up_port client_port admin_port < <(seq "${BENCH_PORT_BASE:-3400}" $(( ${BENCH_PORT_BASE:-3400} + 2 )) | xargs)

"$bin/demo-upstream" "127.0.0.1:$up_port" & pids+=($!)
wait_port "$up_port"
cat > "$work/muxgate.yaml" <<YAML
server:
  listen: 127.0.0.1:$client_port
  admin_listen: 127.0.0.1:$admin_port
upstreams:
  - name: direct
    routes: [{external_path: /ws/direct, internal_path: /echo}]
    targets: [{url: "ws://127.0.0.1:$up_port"}]
    websocket_config: {enable_direct_communication: true, ping_period: 120s, pong_wait: 180s}
  - name: mux
    routes: [{external_path: /ws/mux, internal_path: /echo}]
    targets: [{url: "ws://127.0.0.1:$up_port"}]
    websocket_config: {enable_direct_communication: false, pool_size: 2, ping_period: 120s, pong_wait: 180s}
YAML
url() { echo "ws://127.0.0.1:$client_port/ws/$1"; }

# One build's measures, as "name=value" words.
measure() {
  local broker out="" path line before ran n
  "$1/muxgate" --config "$work/muxgate.yaml" --log-level warn & broker=$!
  wait_port "$client_port"
  for path in direct mux; do
    line=$("$bin/loadgen" echo --url "$(url "$path")" -c 100 --size 64 --duration "$duration")
    out+=" ${path}_rt_per_s=$(rate "$line")"
  done
  for path in direct mux; do
    before=$(tree_run_ns "$broker")
    line=$("$bin/loadgen" latency --url "$(url "$path")" -c 100 --size 64 --rate 5000 --duration "$duration" --warmup 1s)
    ran=$(( $(tree_run_ns "$broker") - before )); n=$(field measured "$line")
    out+=" ${path}_cpu_ns_per_msg=$(( ran / n ))"
  done
  before=$(rss_kib "$broker")
  hold_idle "$(url direct)" "$idle"
  out+=" idle_direct_b_per_session=$(( ($(rss_kib "$broker") - before) * 1024 / idle ))"
  release_idle
  kill "$broker"; wait "$broker" 2>/dev/null || true
  echo "$out"
}

for ((r = 1; r <= rounds; r++)); do
  order=(old new); ((r % 2)) || order=(new old)
  for which in "${order[@]}"; do
    dir=$old; [ "$which" = new ] && dir=$new
    echo "round $r $which$(measure "$dir")" | tee -a "$work/rounds"
  done
done

# Higher is better for rates, lower for CPU and memory.
awk '
  { for (i = 4; i <= NF; i++) { split($i, kv, "="); v[$3, kv[1], $2] = kv[2]; names[kv[1]] = 1 } rounds[$2] = 1 }
  function median(which, name,   a, n, r, i, j, t) {
    n = 0; for (r in rounds) a[++n] = v[which, name, r] + 0
    for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  END {
    print "\n| measure | old median | new median | new/old | rounds new as good |"
    print "| --- | --- | --- | --- | --- |"
    for (name in names) {
      higher = name ~ /rt_per_s/; good = 0; n = 0
      for (r in rounds) { n++; d = v["new", name, r] - v["old", name, r]; if (higher ? d >= 0 : d <= 0) good++ }
      o = median("old", name); m = median("new", name)
      printf "| %s | %s | %s | %.3f | %d of %d |\n", name, o, m, m / o, good, n
    }
  }' "$work/rounds"
