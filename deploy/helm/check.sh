#!/usr/bin/env bash
# Offline checks of the Helm chart: installs check.py's pinned requirements
# (Helm's Go SDK as a wheel, kubernetes-validate and its schemas) with pip,
# then lints, renders and validates the chart (see check.py). No cluster,
# no network beyond PyPI, no helm binary.
# MUXGATE_BIN=path/to/muxgate also runs `muxgate check` on each rendered config.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r requirements.txt
exec python3 check.py ${MUXGATE_BIN:+--muxgate "$MUXGATE_BIN"}
