# Sourced by deploy/image/*.sh: buildah and podman as CI runs them (as root,
# in a sandbox without overlay mounts or a daemon) and the image's name.
# No RUN step runs in the image, but chroot isolation is what works here
# if one ever does.
export BUILDAH_ISOLATION=chroot
IMAGE=${MUXGATE_IMAGE:-localhost/muxgate:ci}
BUILDAH=(buildah --storage-driver vfs)
PODMAN=(podman --storage-driver vfs)

# Installs from apt what the image scripts need and this machine lacks, as
# bench/deps.sh does for the bench.
image_deps() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v podman >/dev/null || missing+=(podman)
  command -v runc >/dev/null || [ -x /usr/sbin/runc ] || missing+=(runc)
  command -v objcopy >/dev/null || missing+=(binutils)
  [ -f /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "deploy/image: apt-get install ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# The binary to put in the image: $1 if given (checked to be executable),
# else a `cargo build --release` one (check.sh says why not dist). Sets
# `binary`; `who` names the calling script in its error.
image_binary() {
  local who=$1
  binary=$2
  if [ -z "$binary" ]; then
    echo "-- cargo build --release --locked -p muxgate"
    cargo build --release --locked -p muxgate
    binary="${CARGO_TARGET_DIR:-target}/release/muxgate"
  fi
  [ -x "$binary" ] || { echo "$who: $binary: not an executable" >&2; exit 1; }
}
