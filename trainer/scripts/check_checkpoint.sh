#!/usr/bin/env bash
# Loads a trainer checkpoint with transformers (in the PyTorch reference venv) and compares
# its per-token log-probs with `trainer score`. Usage: check_checkpoint.sh CHECKPOINT_DIR
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$("$root/trainer/scripts/ref_venv.sh")"
cargo build -q -p selfplay-trainer --bin trainer --manifest-path "$root/Cargo.toml"
"$venv/bin/python" "$root/trainer/scripts/check_checkpoint.py" "$1" --trainer "$root/target/debug/trainer"
