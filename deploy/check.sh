#!/usr/bin/env bash
# Validates the Prometheus alert rules offline: `promtool check rules` on
# deploy/prometheus/alerts.yaml and its unit tests, alerts_test.yaml.
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
