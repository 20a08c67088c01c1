#!/usr/bin/env bash
# Creates (or reuses) the PyTorch reference venv under target/ and writes trainer/fixtures/.
# Needs python3 with venv and PyPI access. Not run by CI: the fixtures are committed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$("$here/ref_venv.sh")"
exec "$venv/bin/python" "$here/make_fixtures.py" --out "$here/../fixtures" "$@"
