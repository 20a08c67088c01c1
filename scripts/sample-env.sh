#!/usr/bin/env bash
# The Docker path in one command: builds the sample environment image (a SWE-bench-style
# repository image, from Debian's packages: nothing is pulled from a registry) and a static
# sidecar, then trains two steps on it with `trainer local`. Extra arguments go to
# `trainer local` (e.g. --steps 1).
set -euo pipefail
cd "$(dirname "$0")/.."
images/sample-env/build.sh >&2
SELFPLAY_STATIC_SIDECAR=$(scripts/build-static-sidecar.sh)
export SELFPLAY_STATIC_SIDECAR
exec cargo run -p selfplay-trainer --bin trainer -- local images/sample-env/run.yaml "$@"
