#!/usr/bin/env bash
# Several broker processes on one port (server.reuse_port): BENCH_REPLICAS
# multiplexed brokers share one client port, each with an admin port of its
# own, in front of one demo upstream, and hold BENCH_REPLICA_SESSIONS idle
# sessions per process between them. Reports, per process: the sessions the
# kernel gave it (SO_REUSEPORT spreads connections by a hash of their
# addresses, so the split is even only on average), its RSS growth per
# session, its upstream sockets and open files; and the upstream's sockets
# in all (pool_size per process). Writes the section to bench/replicas.md,
# which bench/run.sh puts into BENCHMARKS.md, and puts it into
# BENCHMARKS.md now.
#
# Usage: bench/replicas.sh   Settings come from the environment [defaults]:
#   BENCH_REPLICAS [3]                   broker processes
#   BENCH_REPLICA_SESSIONS [19000]       idle sessions per process, on average (the hard limit
#                                        is 20,000 open files per process)
#   BENCH_BIN                            take the binaries from this directory, no release build
#   BENCH_OUT [repo root]                where BENCHMARKS.md and bench/replicas.md go
set -euo pipefail
replicas=${BENCH_REPLICAS:-3}
per_process=${BENCH_REPLICA_SESSIONS:-19000}
total=$((replicas * per_process))
pool_size=2
source "$(dirname "$0")/common.sh"
out=${BENCH_OUT:-$root}
rev=$(git -C "$root" describe --always --dirty)
# The command, as it ran (without BENCH_BIN's directory: a release build).
command="bench/replicas.sh"
[ -z "${BENCH_REPLICA_SESSIONS:-}" ] || command="BENCH_REPLICA_SESSIONS=$per_process $command"
[ -z "${BENCH_REPLICAS:-}" ] || command="BENCH_REPLICAS=$replicas $command"
# Apart from the other scripts' ports, so that one of them may run meanwhile.
up_port=3110 port=8190 admin_base=9290

"$bin/demo-upstream" "127.0.0.1:$up_port" & pids+=($!)
wait_port "$up_port"
broker=()
for ((i = 0; i < replicas; i++)); do
  # One event loop each: the processes share the cores between them.
  muxgate_yaml mux "$port" $((admin_base + i)) "$up_port" \
    ", max_connections: 100000, reuse_port: true, workers: 1" "$pool_size" > "$work/muxgate-$i.yaml"
  "$bin/muxgate" --config "$work/muxgate-$i.yaml" --log-level warn & broker+=($!); pids+=($!)
  wait_port $((admin_base + i))
done
wait_port "$port"
# Every pool connected before the baseline is taken.
for ((i = 0; i < replicas; i++)); do
  for _ in $(seq 200); do
    metrics $((admin_base + i)) | awk -v n="$pool_size" '/^muxgate_mux_connections\{.*state="live"/ {l += $NF} END {exit !(l >= n)}' && break
    sleep 0.05
  done
done

# sessions ADMIN_PORT: the open sessions of one broker.
sessions() { metrics "$1" | awk '/^muxgate_sessions_active/ {s += $NF} END {print s + 0}'; }
# Waits (bounded) until the brokers count $total sessions between them and
# have nothing left in their mux write queues.
wait_all_sessions() {
  local i s q
  for _ in $(seq 600); do
    s=0 q=0
    for ((i = 0; i < replicas; i++)); do
      read -r a b < <(metrics $((admin_base + i)) | awk '/^muxgate_sessions_active/ {s += $NF}
        /^muxgate_mux_write_queue_depth/ {q += $NF} END {print s + 0, q + 0}')
      s=$((s + a)) q=$((q + b))
    done
    [ "$s" -ge "$total" ] && [ "$q" -eq 0 ] && return 0
    sleep 0.05
  done
  echo "the brokers never reported $total open sessions (last: $s)" >&2; exit 1
}

before=()
for ((i = 0; i < replicas; i++)); do before+=("$(rss_kib "${broker[$i]}")"); done
start=$SECONDS
hold_idle "ws://127.0.0.1:$port/ws" "$total"
wait_all_sessions
opened=$((SECONDS - start))
rows="" most=0 least=$total grown=0
for ((i = 0; i < replicas; i++)); do
  n=$(sessions $((admin_base + i)))
  after=$(rss_kib "${broker[$i]}")
  per=$(( (after - before[i]) * 1024 / n ))
  grown=$((grown + after - before[i]))
  [ "$n" -gt "$most" ] && most=$n
  [ "$n" -lt "$least" ] && least=$n
  rows+="| $((i + 1)) | $n | $(awk -v n="$n" -v t="$total" 'BEGIN { printf "%.2f", n * 100 / t }') % | ${before[$i]} | $after | $per | $(tree_sockets_to "${broker[$i]}" "$up_port") | $(tree_max_fds "${broker[$i]}") |"$'\n'
done
upstream=$(ss -Htn state established "( dst 127.0.0.1:$up_port )" | wc -l)
release_idle

section=$(cat <<MD
## Three processes on one port

Written by \`$command\` on $(date -u +%Y-%m-%d) (muxgate $rev, $(nproc) cores, kernel $(uname -r)).
$replicas multiplexed brokers (binary envelope, pool_size $pool_size, \`workers: 1\` each) listen on one
client port with \`server.reuse_port: true\`, each with an admin port of its own, in front of one
demo upstream; $total idle sessions ($per_process per process on average) from $(( (total + 4999) / 5000 ))
load-generator processes spread over source addresses in 127.0.0.0/8, all open in $opened s. Sessions:
each process's \`muxgate_sessions_active\`; RSS per session: that process's RSS growth over its own
sessions; upstream sockets: established connections from that process to the upstream; open files:
the process's (limit $(ulimit -Hn)).

| process | sessions | share | RSS before, KiB | RSS after, KiB | RSS per session, B | upstream sockets | open files |
| --- | --- | --- | --- | --- | --- | --- | --- |
${rows}
- The kernel's split: $least to $most sessions per process (an even split is $per_process;
  SO_REUSEPORT hashes each connection's addresses and ports, so it is even on average only).
- RSS per session over all processes: $(( grown * 1024 / total )) B.
- The upstream holds $upstream sockets from the brokers: $replicas × pool_size ($pool_size), whatever the
  number of clients.
MD
)
put_section "$section" replicas.md
