#!/usr/bin/env bash
# Installs from apt whatever bench/run.sh needs and this machine lacks: NGINX,
# HAProxy, ss (iproute2) and the TTF the charts are lettered with (DejaVu
# Sans). Run by bench/run.sh, and by .ci/run for the bench smoke test.
set -euo pipefail
missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v ss >/dev/null || missing+=(iproute2)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench/deps.sh: apt-get install ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
