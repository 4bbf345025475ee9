#!/usr/bin/env bash
# CI's check of the container image, offline (no base image can be pulled):
#  1. builds the broker (`cargo build --release`) unless BINARY is given,
#  2. builds the stand-in image with deploy/image/build.sh,
#  3. proves its config (USER, EXPOSE, STOPSIGNAL, ENTRYPOINT, CMD,
#     HEALTHCHECK) equals deploy/Dockerfile's runtime stage, and that it
#     holds the binary and the container config at their paths,
#  4. prints the image's size and file list,
#  5. runs it with podman and the demo upstream: /readyz 200 through the
#     published admin port, a WebSocket echo through the published port,
#     the HEALTHCHECK command 0 inside it, and `podman stop` (SIGTERM)
#     draining to exit 0.
#
#   deploy/image/check.sh [BINARY]
#
# The binary is a --release one: the dist profile (fat LTO) the published
# image ships via deploy/Dockerfile would add minutes to CI, and the image's
# layout and config, which is what this checks, do not depend on it.
# MUXGATE_IMAGE_RUN=no skips step 5; =auto (the default) skips it with a
# warning only if podman cannot start any container on the machine.
set -euo pipefail
# BINARY as given, relative to the caller's directory.
given=${1:+$(realpath "$1")}
cd "$(dirname "$0")/../.."
. deploy/image/common.sh
image_deps

image_binary deploy/image/check.sh "$given"
bash deploy/image/build.sh "$binary"

work=$(mktemp -d)
ctr=""
cleanup() {
  [ -n "$ctr" ] && "${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

echo "-- $IMAGE config vs deploy/Dockerfile's runtime stage"
"${BUILDAH[@]}" inspect --type image "$IMAGE" >"$work/inspect.json"
python3 deploy/image/compare.py deploy/Dockerfile "$work/inspect.json"

echo "-- $IMAGE contents"
ctr=$("${BUILDAH[@]}" from "$IMAGE")
mnt=$("${BUILDAH[@]}" mount "$ctr")
# What the Dockerfile's COPY lines put in place.
objcopy --strip-debug "$binary" "$work/muxgate"
cmp "$work/muxgate" "$mnt/usr/local/bin/muxgate"
cmp deploy/container/upstreams.yaml "$mnt/etc/muxgate/upstreams.yaml"
(cd "$mnt" && find . -mindepth 1 \( -type f -o -type l \) -printf '%M %u:%g %10s /%P\n' | sort -k4)
echo "size: $(du -sb "$mnt" | cut -f1) bytes unpacked;" \
  "$("${BUILDAH[@]}" images --format '{{.Size}}' "$IMAGE") as buildah counts it"
"${BUILDAH[@]}" umount "$ctr" >/dev/null
"${BUILDAH[@]}" rm "$ctr" >/dev/null
ctr=""

[ "${MUXGATE_IMAGE_RUN:-auto}" = no ] && { echo "-- podman run: skipped (MUXGATE_IMAGE_RUN=no)"; exit 0; }

# podman as this sandbox lets it run containers: runc (crun refuses the
# hybrid cgroup v1/v2 layout), cgroupfs (no systemd), and rlimits no higher
# than the machine's (podman's default RLIMIT_NOFILE and RLIMIT_NPROC are
# refused with EPERM).
run=("${PODMAN[@]}" --cgroup-manager cgroupfs)
run+=(--runtime runc)
# --no-healthcheck: podman runs HEALTHCHECK from systemd timers, and there
# is no systemd here; the check runs its command by `podman exec` instead.
nofile=$(ulimit -Hn)
[ "$nofile" = unlimited ] && nofile=1048576
limits=(--no-healthcheck --ulimit "nofile=$nofile:$nofile" --ulimit nproc=4096:4096)

echo "-- podman run $IMAGE --version"
if ! out=$("${run[@]}" run --rm "${limits[@]}" "$IMAGE" --version 2>&1); then
  if [ "${MUXGATE_IMAGE_RUN:-auto}" = auto ]; then
    echo "WARNING: podman cannot run containers here; the image was not run:" >&2
    echo "$out" >&2
    exit 0
  fi
  echo "$out" >&2
  exit 1
fi
echo "$out"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ws_port=$(free_port)
admin_port=$(free_port)
name="muxgate-check-$$"
echo "-- podman run -p 127.0.0.1:$ws_port:8080 -p 127.0.0.1:$admin_port:9090 $IMAGE (the image's CMD) --demo"
"${run[@]}" run -d --name "$name" "${limits[@]}" \
  -p "127.0.0.1:$ws_port:8080" -p "127.0.0.1:$admin_port:9090" \
  "$IMAGE" --config /etc/muxgate/upstreams.yaml --log-format json --demo >/dev/null
stop_container() {
  "${run[@]}" rm -f -t 0 "$name" >/dev/null 2>&1 || true
  cleanup
}
trap stop_container EXIT

python3 - "$ws_port" "$admin_port" <<'PY'
import asyncio, sys, time, urllib.request
ws_port, admin_port = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 15
while True:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2) as r:
            print(f"GET /readyz: {r.status}")
            assert r.status == 200
            break
    except Exception as e:
        if time.monotonic() > deadline:
            sys.exit(f"/readyz did not answer 200 within 15 s: {e}")
        time.sleep(0.2)

import websockets
async def echo():
    async with websockets.connect(f"ws://127.0.0.1:{ws_port}/ws/echo") as ws:
        await ws.send("hello through the container")
        got = await asyncio.wait_for(ws.recv(), 5)
        assert got == "hello through the container", got
        print(f"ws /ws/echo: upgraded (101), echoed {got!r}")
asyncio.run(echo())
PY

echo "-- the HEALTHCHECK command inside the container"
"${run[@]}" exec "$name" /usr/local/bin/muxgate health

echo "-- podman stop (STOPSIGNAL SIGTERM: drain, exit 0)"
"${run[@]}" stop -t 20 "$name" >/dev/null
code=$("${run[@]}" inspect --format '{{.State.ExitCode}}' "$name")
echo "exit code: $code"
if [ "$code" != 0 ]; then
  "${run[@]}" logs "$name" | tail -20 >&2
  exit 1
fi
echo "deploy/image/check.sh: ok"
