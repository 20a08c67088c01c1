#!/usr/bin/env bash
# candle vs PyTorch on the CPU, same Qwen2-shaped model (~12.6M parameters) and same token
# ids: GRPO training-step tokens/s (batch 4 × 512) and batched sampling tokens/s (8 prompts
# of 64 tokens, 128 new tokens each, log-probs kept). Prints one table.
#   THREADS=N (default: all cores) sets both sides' thread count; ROUNDS=N (default 3) the
#   number of alternating rounds.
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
# The two sides alternate ROUNDS times (default 3) so that a noisy stretch of the machine hits
# both; the table gives each side's median and best round.
rounds="${ROUNDS:-3}"
candle=()
torch=()
for _ in $(seq "$rounds"); do
  candle+=("$(RAYON_NUM_THREADS="$threads" cargo bench -q -p selfplay-trainer --bench policy_throughput -- --model-dir "$model" 2>/dev/null | tail -n 1)")
  torch+=("$(OMP_NUM_THREADS="$threads" "$venv/bin/python" "$here/bench_torch.py" --model-dir "$model" --threads "$threads" 2>/dev/null | tail -n 1)")
done
"$venv/bin/python" - "$rounds" "${candle[@]}" "${torch[@]}" <<'PY'
import json, statistics, sys
n = int(sys.argv[1])
c = [json.loads(x) for x in sys.argv[2:2 + n]]
t = [json.loads(x) for x in sys.argv[2 + n:2 + 2 * n]]
print(f"CPU, {c[0]['threads']} threads; model target/bench-model (Qwen2-shaped, 12.6M parameters, f32); {n} alternating rounds")
print(f"{'benchmark':<34}{'candle med':>12}{'pytorch med':>13}{'ratio':>7}{'candle best':>13}{'pytorch best':>14}{'ratio':>7}")
for key, name in [("train_tokens_per_s", "GRPO train step, 4x512 (tok/s)"), ("sample_tokens_per_s", "sampling, 8x(64+128) (tok/s)")]:
    cv, tv = [r[key] for r in c], [r[key] for r in t]
    cm, tm, cb, tb = statistics.median(cv), statistics.median(tv), max(cv), max(tv)
    print(f"{name:<34}{cm:>12.0f}{tm:>13.0f}{cm / tm:>7.2f}{cb:>13.0f}{tb:>14.0f}{cb / tb:>7.2f}")
    print(f"{'  each round':<34}" + "  ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(cv, tv)))
PY
