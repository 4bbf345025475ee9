#!/usr/bin/env bash
# Builds CI's stand-in for deploy/Dockerfile's image without pulling a base
# image (CI reaches no container registry): `FROM scratch` holding BINARY,
# exactly the shared libraries it links (from ldd) and the dynamic loader,
# /etc/passwd and /etc/group with the nonroot user 65532, the CA bundle
# (rustls-native-certs reads it for wss:// targets) and the container config,
# with the runtime stage's USER, EXPOSE, STOPSIGNAL, HEALTHCHECK, ENTRYPOINT
# and CMD. deploy/image/check.sh proves those equal the Dockerfile's.
#
#   deploy/image/build.sh [BINARY]
#
# BINARY defaults to a `cargo build --release` one (see check.sh for why not
# the dist profile the published image ships). Commits $MUXGATE_IMAGE
# (localhost/muxgate:ci) in docker format, the one that keeps HEALTHCHECK,
# to buildah's local storage; with MUXGATE_IMAGE_ARCHIVE=FILE it also
# writes a docker-archive that `docker load` / `podman load` read.
set -euo pipefail
# BINARY as given, relative to the caller's directory.
given=${1:+$(realpath "$1")}
cd "$(dirname "$0")/../.."
. deploy/image/common.sh
image_deps

image_binary deploy/image/build.sh "$given"

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

# Without debug info, as deploy/Dockerfile builds it (cargo already leaves
# it out of the release and dist profiles; this keeps a binary given from
# a profile with debug info the image's size).
install -d -m 0755 "$root/usr/local/bin"
objcopy --strip-debug "$binary" "$root/usr/local/bin/muxgate"
chmod 0755 "$root/usr/local/bin/muxgate"
# Every library ldd resolves ("name => /path (addr)") and the loader (the
# line that is a bare absolute path), each at the path the binary asks
# for, symlinks followed.
ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
  sort -u | while read -r lib; do
    install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
  done
install -d -m 0755 "$root/etc/muxgate" "$root/etc/ssl/certs"
install -d -m 1777 "$root/tmp"
install -d -m 0700 -o 65532 -g 65532 "$root/home/nonroot"
install -m 0644 deploy/container/upstreams.yaml "$root/etc/muxgate/upstreams.yaml"
install -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
# As distroless writes them.
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
chmod 0644 "$root/etc/passwd" "$root/etc/group"

ctr=$("${BUILDAH[@]}" from --format docker scratch)
trap '"${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true; rm -rf "$root"' EXIT
"${BUILDAH[@]}" copy --quiet "$ctr" "$root/" / >/dev/null
# The runtime stage of deploy/Dockerfile. buildah splits --healthcheck on
# spaces (it takes no JSON array), which gives the exec form
# ["CMD", "/usr/local/bin/muxgate", "health"] that HEALTHCHECK CMD [...] does.
"${BUILDAH[@]}" config \
  --user 65532:65532 \
  --port 8080/tcp --port 9090/tcp \
  --stop-signal SIGTERM \
  --healthcheck "CMD /usr/local/bin/muxgate health" \
  --healthcheck-interval 10s --healthcheck-timeout 3s \
  --healthcheck-start-period 5s --healthcheck-retries 3 \
  --entrypoint '["/usr/local/bin/muxgate"]' \
  --cmd '["--config", "/etc/muxgate/upstreams.yaml", "--log-format", "json"]' \
  --label org.opencontainers.image.title=muxgate \
  --label org.opencontainers.image.source=deploy/Dockerfile \
  "$ctr"
"${BUILDAH[@]}" commit --quiet --format docker --rm "$ctr" "$IMAGE" >/dev/null
trap 'rm -rf "$root"' EXIT
echo "deploy/image/build.sh: committed $IMAGE from $binary"
if [ -n "${MUXGATE_IMAGE_ARCHIVE:-}" ]; then
  "${BUILDAH[@]}" push --quiet "$IMAGE" "docker-archive:$MUXGATE_IMAGE_ARCHIVE:$IMAGE"
  echo "deploy/image/build.sh: wrote $MUXGATE_IMAGE_ARCHIVE ($(du -h "$MUXGATE_IMAGE_ARCHIVE" | cut -f1))"
fi
