#!/usr/bin/env bash
# Builds a statically linked sandbox-sidecar (glibc static-pie) for Docker sandboxes on one
# machine: it is bind-mounted into repository images of any distribution and runs as their
# PID 1. Prints the binary's path on stdout.
#
#   scripts/build-static-sidecar.sh            debug profile (fast to build; what tests use)
#   scripts/build-static-sidecar.sh --release  release profile
#
# `trainer local` finds the result under target/static/ by itself. Environment: CARGO
# (default cargo), CARGO_TARGET_DIR (default target).
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
TRIPLE=x86_64-unknown-linux-gnu
TARGET_ROOT=${CARGO_TARGET_DIR:-$PWD/target}
profile=debug
flags=()
if [ "${1:-}" = "--release" ]; then profile=release; flags=(--release); fi

mkdir -p "$TARGET_ROOT/static"
exec 9>"$TARGET_ROOT/static/.build.lock"
flock 9
# Set exactly (never the caller's flags), and only for --target: build scripts and proc
# macros stay dynamic. A target dir of its own leaves the normal build untouched.
unset CARGO_ENCODED_RUSTFLAGS
# Variables cargo sets for a test that runs this script would make build scripts that watch
# them (ring's) look changed; drop them so every caller reuses the same artifacts.
while IFS= read -r var; do
  case "$var" in
    CARGO_PKG_* | CARGO_MANIFEST_* | CARGO_CRATE_NAME | CARGO_BIN_* | CARGO_PRIMARY_PACKAGE | \
      CARGO_TARGET_TMPDIR | CARGO_CFG_* | CARGO_FEATURE_* | CARGO_RUSTC_CURRENT_DIR | OUT_DIR)
      unset "$var" ;;
  esac
done < <(compgen -e)
RUSTFLAGS="-C target-feature=+crt-static" "$CARGO" build --quiet --locked -p sandbox-sidecar \
  --bin sandbox-sidecar --target "$TRIPLE" --target-dir "$TARGET_ROOT/static" "${flags[@]}" >&2
bin="$TARGET_ROOT/static/$TRIPLE/$profile/sandbox-sidecar"
if ! ldd "$bin" 2>&1 | grep -qE 'statically linked|not a dynamic executable'; then
  echo "build-static-sidecar: $bin is dynamically linked" >&2
  exit 1
fi
echo "$bin"
