#!/usr/bin/env bash
# Creates (or reuses) the PyTorch reference venv under target/ and writes trainer/fixtures/.
# Needs python3 with venv and PyPI access. Not run by CI: the fixtures are committed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${TRAINER_REF_VENV:-$root/target/py-venvs/trainer-ref}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch, transformers, safetensors' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q 'torch==2.15.0' 'transformers==5.23.0' 'safetensors>=0.6'
fi
exec "$venv/bin/python" "$here/make_fixtures.py" --out "$root/trainer/fixtures" "$@"
