#!/usr/bin/env bash
# Builds selfplay/sample-env:latest, a repository image laid out like SWE-bench's instance
# images (see images/sample-env/Dockerfile), from local files only: no registry is needed.
#
#   images/sample-env/build.sh
#
# Two phases:
#   (a) base image: a Debian root file system (bash, git, python3, venv, pytest, setuptools)
#       made with mmdebstrap from the Debian archive, cached as a tarball under
#       ${CARGO_TARGET_DIR:-<repo>/target}/sample-env/rootfs-<key>.tar, and `docker import`ed as
#       selfplay/debian-python-rootfs:<key> (and :latest) only when that tag is missing. <key>
#       hashes the package list, the mmdebstrap options and ROOTFS_VERSION below: change any of
#       them and a new rootfs is made. Delete the tag and the tarball to force a rebuild.
#   (b) `docker build --network none` of images/sample-env/Dockerfile on that base, with the
#       sample repository's git bundle (trainer/assets/sample-repo.bundle) staged in a small
#       build context under target/sample-env/context.
# A warm re-run (base tag present, Docker layer cache intact) takes seconds.
#
# Needs: docker (a running daemon this user may use), flock (util-linux), sha256sum, and for
# phase (a) only mmdebstrap (apt-get install mmdebstrap) plus network access to the Debian
# mirror. mmdebstrap runs in its `auto` mode: as root it uses chroot directly; as another user
# it uses `unshare` mode, which needs unprivileged user namespaces and subordinate ids
# (apt-get install uidmap; an entry for the user in /etc/subuid and /etc/subgid). Otherwise
# run this script as root (sudo). MMDEBSTRAP_MODE overrides the mode.
#
# Environment: DOCKER (default docker), CARGO_TARGET_DIR, DEBIAN_SUITE (default bookworm),
# DEBIAN_MIRROR (default http://deb.debian.org/debian), DEBIAN_SECURITY_MIRROR
# (default http://deb.debian.org/debian-security), MMDEBSTRAP_MODE (default auto),
# IMAGE (default selfplay/sample-env:latest), BASE_REPO (default selfplay/debian-python-rootfs).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo_root=$PWD

# Bump when the way the rootfs is made changes in a way the key below does not capture.
ROOTFS_VERSION=1
DOCKER=${DOCKER:-docker}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
MODE=${MMDEBSTRAP_MODE:-auto}
IMAGE=${IMAGE:-selfplay/sample-env:latest}
BASE_REPO=${BASE_REPO:-selfplay/debian-python-rootfs}
BUNDLE=trainer/assets/sample-repo.bundle
DOCKERFILE=images/sample-env/Dockerfile
OUT=${CARGO_TARGET_DIR:-$repo_root/target}/sample-env
CTX=$OUT/context

# minbase: Essential: yes packages plus apt (no Priority: important set); then what the image
# needs. python3-venv brings the ensurepip wheels (pip, setuptools) for the venv; pytest and
# setuptools come from Debian and reach the venv through --system-site-packages; setuptools 66
# (bookworm) builds the editable wheel with the `wheel` package, hence python3-wheel.
PACKAGES=(bash coreutils git python3 python3-venv python3-pytest python3-setuptools python3-wheel)
MMDEBSTRAP_OPTS=(
  --variant=minbase
  --aptopt='APT::Install-Recommends "false"'
  --aptopt='APT::Install-Suggests "false"'
  # No documentation, manual pages or translations (copyright files stay).
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
)

die() { echo "sample-env: $*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

# --- prerequisites ------------------------------------------------------------------------
command -v "$DOCKER" >/dev/null 2>&1 ||
  die "'$DOCKER' not found: install Docker Engine (apt-get install docker.io) or set DOCKER"
"$DOCKER" info >/dev/null 2>&1 ||
  die "cannot reach the Docker daemon with '$DOCKER info': start dockerd, or run as a user in the docker group"
command -v flock >/dev/null 2>&1 || die "flock not found: apt-get install util-linux"
command -v sha256sum >/dev/null 2>&1 || die "sha256sum not found: apt-get install coreutils"
[ -f "$BUNDLE" ] || die "$BUNDLE not found (run from a selfplay checkout)"

# One build at a time: concurrent callers (tests) share the staged context, the tarball and
# the tags. A waiting caller then finds everything cached.
mkdir -p "$OUT"
exec 9>"$OUT/.build.lock"
if ! flock -n 9; then
  echo "sample-env: waiting for another build (lock $OUT/.build.lock)" >&2
  flock 9
fi

t_total=$(now)

# --- (a) base image -----------------------------------------------------------------------
key=$(
  {
    echo "rootfs-version=$ROOTFS_VERSION"
    echo "suite=$SUITE mirror=$MIRROR security=$SECURITY_MIRROR"
    printf 'package=%s\n' "${PACKAGES[@]}"
    printf 'opt=%s\n' "${MMDEBSTRAP_OPTS[@]}"
  } | sha256sum | cut -c1-16
)
BASE_IMAGE=$BASE_REPO:$key
TARBALL=$OUT/rootfs-$key.tar

t_base=$(now)
if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "sample-env: base $BASE_IMAGE present"
else
  if [ -f "$TARBALL" ]; then
    echo "sample-env: rootfs tarball cached: $TARBALL"
  else
    t=$(now)
    command -v mmdebstrap >/dev/null 2>&1 ||
      die "mmdebstrap not found: apt-get install mmdebstrap (needed once, to make the base root file system)"
    if [ "$(id -u)" != 0 ] && [ "$MODE" = auto ]; then
      echo "sample-env: not root: mmdebstrap will use unshare mode (needs uidmap and /etc/subuid, /etc/subgid entries; else run as root)" >&2
    fi
    echo "sample-env: making the $SUITE root file system with mmdebstrap ($MODE mode) -> $TARBALL"
    include=$(IFS=,; echo "${PACKAGES[*]}")
    rm -f "$TARBALL.tmp"
    # stdin from /dev/null: mmdebstrap reads extra sources.list lines from a non-terminal stdin.
    if ! mmdebstrap --mode="$MODE" --format=tar "${MMDEBSTRAP_OPTS[@]}" \
      --include="$include" \
      "$SUITE" "$TARBALL.tmp" \
      "deb $MIRROR $SUITE main" \
      "deb $MIRROR $SUITE-updates main" \
      "deb $SECURITY_MIRROR $SUITE-security main" </dev/null; then
      rm -f "$TARBALL.tmp"
      die "mmdebstrap failed (it needs the Debian mirror $MIRROR; as non-root it needs unshare mode: apt-get install uidmap and /etc/subuid, /etc/subgid entries, or run as root)"
    fi
    mv "$TARBALL.tmp" "$TARBALL"
    echo "sample-env: rootfs $(du -h "$TARBALL" | cut -f1) in $(elapsed "$t")"
  fi
  t=$(now)
  "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "selfplay: Debian $SUITE + python3, git, pytest (mmdebstrap, key $key)" \
    "$TARBALL" "$BASE_IMAGE" >/dev/null ||
    die "docker import of $TARBALL failed"
  "$DOCKER" tag "$BASE_IMAGE" "$BASE_REPO:latest"
  echo "sample-env: imported $BASE_IMAGE in $(elapsed "$t")"
fi
echo "sample-env: phase base: $(elapsed "$t_base")"

# --- (b) repository image -----------------------------------------------------------------
t=$(now)
rm -rf "$CTX"
mkdir -p "$CTX"
cp "$BUNDLE" "$CTX/sample-repo.bundle"
sample_rev=$(git bundle list-heads "$BUNDLE" HEAD 2>/dev/null | cut -d' ' -f1)
selfplay_rev=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# The legacy builder (no BuildKit: nothing to pull for a frontend); --network none: no RUN
# step may use the network.
DOCKER_BUILDKIT=0 "$DOCKER" build --network none \
  -f "$DOCKERFILE" \
  --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --build-arg SAMPLE_REVISION="${sample_rev:-unknown}" \
  --build-arg REVISION="$selfplay_rev" \
  -t "$IMAGE" "$CTX" ||
  die "docker build of $IMAGE failed"
echo "sample-env: phase image: $(elapsed "$t")"
echo "sample-env: built $IMAGE on $BASE_IMAGE in $(elapsed "$t_total")"
