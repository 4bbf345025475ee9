#!/usr/bin/env bash
# Runs the Autobahn TestSuite's fuzzingclient (cases 1-10) against muxgate in
# direct mode in front of the bundled echo upstream, and prints the summary.
# Too slow for CI; run it by hand:  scripts/autobahn.sh
# Needs pyenv's CPython 2.7.18 (virtualenv<20.22, pins in
# ../shared/tools/autobahn-py27-requirements.txt or scripts/autobahn-requirements.txt).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${AUTOBAHN_WORK:-$here/target/autobahn}
venv=$work/venv
mkdir -p "$work"

if [ ! -x "$venv/bin/wstest" ]; then
  py27=${PY27:-$(pyenv root 2>/dev/null)/versions/2.7.18/bin/python2.7}
  [ -x "$py27" ] || { echo "autobahn: needs CPython 2.7 at $py27 (pyenv install 2.7.18)" >&2; exit 1; }
  python3 -m pip install -q 'virtualenv<20.22'
  python3 -m virtualenv -q -p "$py27" "$venv"
  "$venv/bin/pip" install -q -r "$here/scripts/autobahn-requirements.txt"
fi

cargo build --release --manifest-path "$here/Cargo.toml" --bin muxgate
cat > "$work/muxgate.yaml" <<YAML
server:
  listen: 127.0.0.1:9001
  admin_listen: 127.0.0.1:9091
upstreams:
  - name: echo
    routes: [{external_path: /, internal_path: /}]
    targets: [{url: "ws://127.0.0.1:9002"}]
    websocket_config:
      enable_direct_communication: true
      max_message_size: 64MiB
      read_buffer_size: 64KiB
      write_buffer_size: 64KiB
YAML
"$here/target/release/muxgate" --config "$work/muxgate.yaml" --demo 127.0.0.1:9002 --log-level warn &
broker=$!
trap 'kill $broker 2>/dev/null; wait $broker 2>/dev/null' EXIT
for _ in $(seq 50); do
  (exec 3<>/dev/tcp/127.0.0.1/9001) 2>/dev/null && break
  sleep 0.1
done

cat > "$work/fuzzingclient.json" <<JSON
{
  "outdir": "$work/reports",
  "servers": [{"agent": "muxgate", "url": "ws://127.0.0.1:9001/"}],
  "cases": ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"],
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
JSON
(cd "$work" && "$venv/bin/wstest" -m fuzzingclient -s fuzzingclient.json)

python3 - "$work/reports/index.json" <<'PY'
import json, sys, collections
index = json.load(open(sys.argv[1]))
for agent, cases in index.items():
    counts = collections.Counter(c["behavior"] for c in cases.values())
    close = collections.Counter(c["behaviorClose"] for c in cases.values())
    print(f"{agent}: {len(cases)} cases; behavior {dict(counts)}; close {dict(close)}")
    bad = sorted((k for k, c in cases.items() if c["behavior"] == "FAILED" or c["behaviorClose"] == "FAILED"),
                 key=lambda k: [int(x) for x in k.split(".")])
    print("FAILED:", " ".join(bad) if bad else "none")
    sys.exit(1 if bad else 0)
PY
