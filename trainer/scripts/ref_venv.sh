#!/usr/bin/env bash
# Prints the path of the PyTorch reference venv (target/py-venvs/trainer-ref), creating it
# from PyPI when missing. Shared by make_fixtures.sh and bench/run.sh.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${TRAINER_REF_VENV:-$root/target/py-venvs/trainer-ref}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch, transformers, safetensors' 2>/dev/null; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q 'torch==2.15.0' 'transformers==5.23.0' 'safetensors>=0.6' >&2
fi
echo "$venv"
