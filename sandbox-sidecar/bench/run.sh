#!/usr/bin/env bash
# Side-by-side benchmark of sandbox-sidecar and SWE-ReX 1.4 on loopback; prints one table.
# Installs SWE-ReX (and aiohttp, which its client imports but does not declare) in a venv
# under target/. Extra arguments go to the bench (e.g. --errors-n 10000 --peer-errors-n 500).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
venv="${CARGO_TARGET_DIR:-$root/target}/py-venvs/sidecar-bench"
if ! "$venv/bin/python" -c 'import swerex, aiohttp' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'swe-rex==1.4.*' aiohttp
fi
extra=()
# The OpenHands agent-server needs Python >= 3.12; it is measured when one is found.
py312=""
for cand in python3.13 python3.12 "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3; do
  if "$cand" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then py312="$cand"; break; fi
done
ohvenv="${CARGO_TARGET_DIR:-$root/target}/py-venvs/sidecar-bench-openhands"
if [ -n "$py312" ]; then
  if ! "$ohvenv/bin/python" -c 'import openhands.agent_server, httpx' 2>/dev/null; then
    "$py312" -m venv "$ohvenv"
    "$ohvenv/bin/pip" install --quiet --disable-pip-version-check openhands-agent-server || true
  fi
  "$ohvenv/bin/python" -c 'import openhands.agent_server' 2>/dev/null && extra+=(--openhands-python "$ohvenv/bin/python")
else
  echo "no python3.12: the OpenHands agent-server column stays n/a" >&2
fi
cargo bench -p sandbox-sidecar --bench sidecar_bench -- --peer-python "$venv/bin/python" "${extra[@]}" "$@"
