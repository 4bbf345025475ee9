#!/usr/bin/env bash
# Validates the Prometheus alert rules offline: `promtool check rules` on
# deploy/prometheus/alerts.yaml and its unit tests, alerts_test.yaml; and
# the PromQL of the Grafana dashboard, each panel's expression checked by
# promtool as a recording rule (Grafana's $__ variables replaced).
# Installs promtool (Debian's prometheus package) from apt when missing.
# The metric names the rules and the Grafana dashboard use are checked
# against a live broker's /metrics by `cargo test --test deploy`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null; then
  echo "deploy/check.sh: installing promtool (apt package prometheus)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=600 prometheus >/dev/null
fi

promtool check rules deploy/prometheus/alerts.yaml
promtool test rules deploy/prometheus/alerts_test.yaml

# The dashboard's expressions as recording rules (JSON is YAML), with
# Grafana's variables given values, for promtool's PromQL parser.
rules="$(mktemp --suffix=.yaml)"
trap 'rm -f "$rules"' EXIT
python3 - deploy/grafana/muxgate.json >"$rules" <<'PY'
import json, sys

def exprs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from exprs(item)

grafana = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
           "$instance": ".*", "$upstream": ".*"}
rules = []
for i, expr in enumerate(exprs(json.load(open(sys.argv[1])))):
    for var, value in grafana.items():
        expr = expr.replace(var, value)
    rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
print(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
PY
echo "deploy/grafana/muxgate.json: every panel expression parsed as PromQL:"
promtool check rules "$rules"
