#!/usr/bin/env bash
# Builds the selfplay images from static release binaries, without pulling anything:
#
#   ghcr.io/selfplay-dev/sandbox-sidecar:<version>
#   ghcr.io/selfplay-dev/operator:<version>
#   ghcr.io/selfplay-dev/trainer:<version>          (CPU)
#
# <version> is the workspace's crate version: the tag the chart (appVersion) and the operator's
# defaults name. `make images` runs this script.
#
#   scripts/build-images.sh               static binaries (target/images/), then the three images
#   scripts/build-images.sh --cuda        also the CUDA trainer binary and image (needs nvcc and a
#                                         pullable nvidia/cuda base; tag <version>-cuda)
#   scripts/build-images.sh --check-cuda  build images/trainer-cuda.Dockerfile on a local stand-in
#                                         for its base (what can be checked without a registry)
#
# Environment: REGISTRY (default ghcr.io/selfplay-dev), TAG (default the crate version),
# DOCKER (default docker), CARGO (default cargo; set by cargo when a test runs this).
set -euo pipefail
cd "$(dirname "$0")/.."

REGISTRY=${REGISTRY:-ghcr.io/selfplay-dev}
DOCKER=${DOCKER:-docker}
CARGO=${CARGO:-cargo}
TRIPLE=x86_64-unknown-linux-gnu
OUT=target/images
BIN=$OUT/$TRIPLE/release
CTX=$OUT/context

cuda=0
check_cuda=0
for arg in "$@"; do
  case "$arg" in
    --cuda) cuda=1 ;;
    --check-cuda) check_cuda=1 ;;
    *) echo "build-images: unknown argument $arg" >&2; exit 2 ;;
  esac
done

# One run at a time: runs share the staged context and the tags (a test may run this while
# someone runs `make images`).
mkdir -p "$OUT"
exec 9>"$OUT/.build-images.lock"
flock 9

# The [workspace.package] version, which every crate inherits.
crate_version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
TAG=${TAG:-$crate_version}
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
describe=$(git describe --tags --always --dirty 2>/dev/null || echo "$crate_version")

# Static glibc (static-pie). Set exactly, not appended to the caller's RUSTFLAGS, so that any
# caller reuses the same artifacts; --target keeps the flag away from build scripts and proc
# macros. A separate target dir leaves the debug build alone.
unset CARGO_ENCODED_RUSTFLAGS
# When a test runs this script its environment holds what cargo set for the test
# (CARGO_PKG_NAME, CARGO_MANIFEST_DIR, …). Build scripts that watch those variables (ring's
# does) would then look changed and everything above them would be rebuilt, twice per run.
while IFS= read -r var; do
  case "$var" in
    CARGO_PKG_* | CARGO_MANIFEST_* | CARGO_CRATE_NAME | CARGO_BIN_* | CARGO_PRIMARY_PACKAGE | \
      CARGO_TARGET_TMPDIR | CARGO_CFG_* | CARGO_FEATURE_* | CARGO_RUSTC_CURRENT_DIR | OUT_DIR)
      unset "$var" ;;
  esac
done < <(compgen -e)
RUSTFLAGS='-C target-feature=+crt-static' "$CARGO" build --release --locked \
  --target "$TRIPLE" --target-dir "$OUT" \
  -p sandbox-sidecar -p selfplay-operator -p selfplay-trainer --bins

for b in sandbox-sidecar operator trainer; do
  # glibc's ldd says "statically linked" for static-pie, "not a dynamic executable" for static.
  if ! ldd "$BIN/$b" 2>&1 | grep -qE 'statically linked|not a dynamic executable'; then
    echo "build-images: $BIN/$b is not static:" >&2
    ldd "$BIN/$b" >&2 || true
    exit 1
  fi
done

# A small context: the 10 GB target/ must not be sent to the daemon.
rm -rf "$CTX"
mkdir -p "$CTX/bin"
cp images/rootfs -r "$CTX/rootfs"
mkdir -p "$CTX/rootfs/tmp"
chmod 1777 "$CTX/rootfs/tmp"
chmod 0644 "$CTX/rootfs/etc/passwd" "$CTX/rootfs/etc/group"
for b in sandbox-sidecar operator trainer; do
  cp "$BIN/$b" "$CTX/bin/$b"
done

build_args=(--build-arg "VERSION=$describe" --build-arg "REVISION=$revision")

for image in sandbox-sidecar operator trainer; do
  echo "build-images: $REGISTRY/$image:$TAG"
  "$DOCKER" build -q -f images/Dockerfile --target "$image" "${build_args[@]}" \
    -t "$REGISTRY/$image:$TAG" "$CTX" >/dev/null
done

if [ "$cuda" = 1 ]; then
  # Dynamic glibc: cudarc dlopens the CUDA libraries (see images/trainer-cuda.Dockerfile).
  "$CARGO" build --release --locked -p selfplay-trainer --features cuda --bins \
    --target-dir "$OUT/cuda"
  cp "$OUT/cuda/release/trainer" "$CTX/bin/trainer-cuda"
  echo "build-images: $REGISTRY/trainer:$TAG-cuda"
  "$DOCKER" build -q -f images/trainer-cuda.Dockerfile "${build_args[@]}" \
    -t "$REGISTRY/trainer:$TAG-cuda" "$CTX" >/dev/null
fi

if [ "$check_cuda" = 1 ]; then
  # Every instruction of the CUDA Dockerfile is evaluated by the daemon's builder, with a local
  # image in place of nvidia/cuda and the CPU binary in place of the CUDA one; then the stand-ins
  # are removed.
  standin=selfplay-check/cuda-base:stand-in
  checked=selfplay-check/trainer-cuda:check
  sctx=$OUT/cuda-standin
  rm -rf "$sctx" && mkdir -p "$sctx"
  cp images/rootfs/etc/passwd "$sctx/passwd"
  printf 'FROM scratch\nCOPY passwd /etc/passwd\n' >"$sctx/Dockerfile"
  "$DOCKER" build -q -t "$standin" "$sctx" >/dev/null
  made_standin_bin=0
  if [ ! -e "$CTX/bin/trainer-cuda" ]; then
    cp "$BIN/trainer" "$CTX/bin/trainer-cuda"
    made_standin_bin=1
  fi
  "$DOCKER" build -q -f images/trainer-cuda.Dockerfile "${build_args[@]}" \
    --build-arg "CUDA_BASE=$standin" -t "$checked" "$CTX" >/dev/null
  "$DOCKER" image inspect "$checked" \
    --format 'check-cuda: user={{.Config.User}} entrypoint={{json .Config.Entrypoint}} revision={{index .Config.Labels "org.opencontainers.image.revision"}}'
  "$DOCKER" run --rm "$checked" --version
  "$DOCKER" rmi -f "$checked" "$standin" >/dev/null
  [ "$made_standin_bin" = 0 ] || rm -f "$CTX/bin/trainer-cuda"
fi

"$DOCKER" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep "^$REGISTRY/" || true
