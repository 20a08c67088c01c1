#!/usr/bin/env bash
# candle vs PyTorch on the CPU, same Qwen2-shaped model (~12.6M parameters) and same token
# ids: GRPO training-step tokens/s (batch 4 × 512) and batched sampling tokens/s (8 prompts
# of 64 tokens, 128 new tokens each, log-probs kept). Prints one table.
#   THREADS=N (default: all cores) sets both sides' thread count.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$("$root/trainer/scripts/ref_venv.sh")"
threads="${THREADS:-$(nproc)}"
model="$root/target/bench-model"
if [ ! -f "$model/bench_inputs.json" ]; then
  mkdir -p "$model"
  "$venv/bin/python" "$here/bench_torch.py" --model-dir "$model" --make >/dev/null 2>&1
fi
cd "$root"
cargo bench -q -p selfplay-trainer --bench policy_throughput --no-run >/dev/null 2>&1 || cargo bench -p selfplay-trainer --bench policy_throughput --no-run
candle="$(RAYON_NUM_THREADS="$threads" cargo bench -q -p selfplay-trainer --bench policy_throughput -- --model-dir "$model" 2>/dev/null | tail -n 1)"
torch="$(OMP_NUM_THREADS="$threads" "$venv/bin/python" "$here/bench_torch.py" --model-dir "$model" --threads "$threads" 2>/dev/null | tail -n 1)"
"$venv/bin/python" - "$candle" "$torch" <<'PY'
import json, sys
c, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"CPU, {c['threads']} threads; model target/bench-model (Qwen2-shaped, 12.6M parameters, f32)")
print(f"{'benchmark':<34}{'candle':>12}{'pytorch':>12}{'candle/pytorch':>16}")
for key, name in [("train_tokens_per_s", "GRPO train step, 4x512 (tok/s)"), ("sample_tokens_per_s", "sampling, 8x(64+128) (tok/s)")]:
    print(f"{name:<34}{c[key]:>12.0f}{t[key]:>12.0f}{c[key] / t[key]:>16.2f}")
PY
