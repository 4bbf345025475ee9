#!/usr/bin/env bash
# Runs the Autobahn TestSuite (cases 1-10, and 12-13 for permessage-deflate)
# through muxgate in direct mode, in both directions and through both relays,
# each beside a direct baseline:
#
# - fuzzingclient: Autobahn plays a client against the bundled echo upstream,
#   directly and through the broker (frame relay: a route without message
#   plugins; message relay: the same upstream with a message plugin that
#   passes everything);
# - fuzzingclient, sections 12 and 13 (permessage-deflate): the same, the
#   demo's echo taking the extension, and once more through multiplexed
#   mode (with mux_compression); the frame relay passes it end to end, the
#   message relay and multiplexed mode terminate it;
# - fuzzingserver: Autobahn plays a misbehaving server, and an echoing client
#   (scripts/autobahn_echo_client.py, Python `websockets`) connects to it
#   directly and through the broker (both relays again).
#
# Prints one summary line per run (agent, cases, FAILED count and list,
# seconds) and, for each broker run, the cases whose verdict differs from
# its direct baseline; exits non-zero if the broker made any case FAILED.
# Too slow for CI; run it by hand:  scripts/autobahn.sh
# (AUTOBAHN_PARTS="deflate" runs only sections 12-13; see below).
# Needs pyenv's CPython 2.7.18 (virtualenv<20.22, pins in
# ../shared/tools/autobahn-py27-requirements.txt or scripts/autobahn-requirements.txt),
# and python3 with `websockets` (examples/python_upstream/requirements.txt).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${AUTOBAHN_WORK:-$here/target/autobahn}
target_dir=${CARGO_TARGET_DIR:-$here/target}
venv=$work/venv
mkdir -p "$work"
rm -rf "$work/client-reports" "$work/server-reports" "$work/deflate-reports" "$work/times"
mkdir -p "$work/times"

if [ ! -x "$venv/bin/wstest" ]; then
  py27=${PY27:-$(pyenv root 2>/dev/null)/versions/2.7.18/bin/python2.7}
  [ -x "$py27" ] || { echo "autobahn: needs CPython 2.7 at $py27 (pyenv install 2.7.18)" >&2; exit 1; }
  python3 -m pip install -q 'virtualenv<20.22'
  python3 -m virtualenv -q -p "$py27" "$venv"
  "$venv/bin/pip" install -q -r "$here/scripts/autobahn-requirements.txt"
fi
python3 -c 'import websockets' 2>/dev/null ||
  python3 -m pip install -q -r "$here/examples/python_upstream/requirements.txt"

cargo build --release --manifest-path "$here/Cargo.toml" --bin muxgate

# 9001: the broker; 9002: the demo echo upstream; 9003: the fuzzingserver.
# The routes of each relay's upstream; the fuzzing server's, under a prefix.
fuzz_routes() {
  for p in runCase getCaseCount updateReports; do
    echo "      - {external_path: /$1/$p, internal_path: /$p}"
  done
}
pass_all='plugins: [{name: message_size, stage: post_response, settings: {max_bytes: 64MiB}}]'
ws_config='websocket_config:
      enable_direct_communication: true
      max_message_size: 64MiB
      read_buffer_size: 64KiB
      write_buffer_size: 64KiB'
cat > "$work/muxgate.yaml" <<YAML
server:
  listen: 127.0.0.1:9001
  admin_listen: 127.0.0.1:9091
upstreams:
  - name: echo-frames
    routes: [{external_path: /, internal_path: /}]
    targets: [{url: "ws://127.0.0.1:9002"}]
    $ws_config
  - name: echo-messages
    routes: [{external_path: /messages, internal_path: /}]
    targets: [{url: "ws://127.0.0.1:9002"}]
    $pass_all
    $ws_config
  - name: echo-mux
    routes: [{external_path: /mux, internal_path: /echo}]
    targets: [{url: "ws://127.0.0.1:9002"}]
    websocket_config:
      enable_direct_communication: false
      compression: {mux_compression: true}
      max_message_size: 64MiB
      read_buffer_size: 64KiB
      write_buffer_size: 64KiB
  - name: fuzz-frames
    routes:
$(fuzz_routes frames)
    targets: [{url: "ws://127.0.0.1:9003"}]
    health_checks: {passive: false}
    $ws_config
  - name: fuzz-messages
    routes:
$(fuzz_routes messages)
    targets: [{url: "ws://127.0.0.1:9003"}]
    health_checks: {passive: false}
    $pass_all
    $ws_config
YAML

pids=()
# (A killed child's status is not the run's: `|| true` under set -e.)
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null || true; done' EXIT
wait_for_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "autobahn: nothing listens on port $1" >&2
  exit 1
}
# Runs the rest of the line, writing its wall time in seconds to times/$1.
timed() {
  local name=$1 start
  shift
  start=$(date +%s.%N)
  "$@"
  echo "$(date +%s.%N) - $start" | bc > "$work/times/$name"
}

"$target_dir/release/muxgate" --config "$work/muxgate.yaml" --demo 127.0.0.1:9002 --log-level warn &
pids+=($!)
wait_for_port 9001
wait_for_port 9002

cases='["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"]'
# AUTOBAHN_PARTS picks what runs: client (cases 1-10 as a client), deflate
# (12-13 as a client), server (1-10 as a server); all three by default.
parts=" ${AUTOBAHN_PARTS:-client deflate server} "
part() { [[ $parts == *" $1 "* ]]; }

# fuzzingclient: one wstest run per agent, so that each is timed alone.
part client && for run in "direct ws://127.0.0.1:9002/" "muxgate-frames ws://127.0.0.1:9001/" \
           "muxgate-messages ws://127.0.0.1:9001/messages"; do
  set -- $run
  cat > "$work/fuzzingclient-$1.json" <<JSON
{
  "outdir": "$work/client-reports/$1",
  "servers": [{"agent": "$1", "url": "$2"}],
  "cases": $cases,
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
JSON
  (cd "$work" && timed "client-$1" "$venv/bin/wstest" -m fuzzingclient -s "fuzzingclient-$1.json" >/dev/null)
done

# permessage-deflate (sections 12 and 13): against the demo's echo, which
# takes it (muxgate_backend::deflate), then through the frame relay in front
# of it (end to end), and through the message relay and multiplexed mode,
# where the broker terminates it (the message relay's upstream hop is
# uncompressed; multiplexed mode's mux connections compress on their own,
# mux_compression).
for run in "direct ws://127.0.0.1:9002/" "muxgate-frames ws://127.0.0.1:9001/" \
           "muxgate-messages ws://127.0.0.1:9001/messages" "muxgate-mux ws://127.0.0.1:9001/mux"; do
  part deflate || break
  set -- $run
  cat > "$work/fuzzingclient-deflate-$1.json" <<JSON
{
  "outdir": "$work/deflate-reports/$1",
  "servers": [{"agent": "$1", "url": "$2"}],
  "cases": ["12.*", "13.*"],
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
JSON
  (cd "$work" && timed "deflate-$1" "$venv/bin/wstest" -m fuzzingclient -s "fuzzingclient-deflate-$1.json" >/dev/null)
done

# fuzzingserver: one server, an echoing client per agent.
if part server; then
cat > "$work/fuzzingserver.json" <<JSON
{
  "url": "ws://127.0.0.1:9003",
  "outdir": "$work/server-reports",
  "cases": $cases,
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
JSON
(cd "$work" && exec "$venv/bin/wstest" -m fuzzingserver -s fuzzingserver.json >"$work/fuzzingserver.log" 2>&1) &
pids+=($!)
wait_for_port 9003
for run in "direct ws://127.0.0.1:9003" "muxgate-frames ws://127.0.0.1:9001/frames" \
           "muxgate-messages ws://127.0.0.1:9001/messages"; do
  set -- $run
  timed "server-$1" python3 "$here/scripts/autobahn_echo_client.py" "$2" "$1"
done
fi

python3 - "$work" <<'PY'
import glob, json, os, sys
work = sys.argv[1]

def key(case):
    return [int(x) for x in case.split(".")]

def verdict(c):
    return "FAILED" if "FAILED" in (c["behavior"], c["behaviorClose"]) else c["behavior"]

def load(pattern):
    agents = {}
    for path in glob.glob(pattern):
        agents.update(json.load(open(path)))
    return agents

differ = False  # the broker added a failure
for direction, prefix, pattern, runs in [
        ("fuzzingclient", "client", "client-reports/*/index.json",
         ["direct", "muxgate-frames", "muxgate-messages"]),
        ("fuzzingclient permessage-deflate", "deflate", "deflate-reports/*/index.json",
         ["direct", "muxgate-frames", "muxgate-messages", "muxgate-mux"]),
        ("fuzzingserver", "server", "server-reports/index.json",
         ["direct", "muxgate-frames", "muxgate-messages"])]:
    agents = load(os.path.join(work, pattern))
    if not agents:
        continue  # not run (AUTOBAHN_PARTS)
    base = agents.get("direct", {})
    for agent in runs:
        cases = agents.get(agent, {})
        failed = sorted((k for k, c in cases.items() if verdict(c) == "FAILED"), key=key)
        seconds = lambda a: float(open(os.path.join(work, "times", f"{prefix}-{a}")).read())
        secs = seconds(agent)
        ratio = "" if agent == "direct" else f" ({secs / seconds('direct'):.2f} x direct)"
        print(f"{direction} {agent}: {len(cases)} cases, {len(failed)} FAILED"
              f" ({' '.join(failed) or 'none'}), {secs:.1f} s{ratio}")
        if agent == "direct":
            continue
        # Any verdict that differs is listed; one the broker made FAILED
        # (or a case missing) is what the broker added, and fails the run.
        diff = sorted((k for k in set(base) | set(cases)
                       if k not in base or k not in cases or verdict(base[k]) != verdict(cases[k])),
                      key=key)
        show = lambda v: verdict(v) if v else "missing"
        for k in diff:
            b, c = base.get(k), cases.get(k)
            added = c is None or (verdict(c) == "FAILED" and (b is None or verdict(b) != "FAILED"))
            print(f"  {k}: direct {show(b)}, {agent} {show(c)}{' (added by the broker)' if added else ''}")
            differ |= added
sys.exit(1 if differ else 0)
PY
