# Shared by the bench/*.sh scripts (sourced, not run): builds the release
# binaries, makes a scratch directory, and stops every process the script
# recorded in `pids` when it exits.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cargo build --release --quiet --manifest-path "$root/Cargo.toml" \
  -p muxgate -p muxgate-backend -p muxgate-bench
bin=$root/target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# Waits (bounded) until something listens on 127.0.0.1:$1.
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
rate() { sed -E 's/.*round_trips_per_sec=([0-9]+).*/\1/' <<<"$1"; }
