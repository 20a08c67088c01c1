#!/usr/bin/env bash
# One GPU check of a CUDA build of the trainer, for a machine that has a GPU, CUDA and PyTorch
# but no Rust (the binary is built elsewhere and carried in, e.g. in the git-ignored gpu-bin/).
#
#   trainer/scripts/gpu-check.sh [options] [TRAINER_BIN]
#
#   TRAINER_BIN        the trainer binary (else $TRAINER_BIN, else gpu-bin/trainer)
#   --device cuda|cpu  cuda (default); cpu is a dry run of everything but the GPU (small shape)
#   --tokens LIST      sequence lengths, comma-separated (default 2048,8192,16384)
#   --shape NAME       qwen2.5-0.5b (default on cuda) or bench (default on cpu)
#   --new-tokens N     tokens drawn per sampling measurement (default 128)
#   env PYTHON         a python with torch (default python3); OUT a folder for the logs and
#                      raw JSON (default a new temporary one); BUDGET_S the whole check's
#                      time limit in seconds (default 450)
#
# In order, each part under its own timeout and all within BUDGET_S:
#   1. parity: `trainer bench parity` runs the committed fixtures (trainer/fixtures) on the
#      device in f32 and bf16 and compares log-probs, entropies and every parameter's
#      gradient with the CPU build's kernels (and the log-probs with PyTorch's f64 reference);
#   2. candle training: `trainer bench memory` (one GRPO step per length, random weights);
#   3. candle sampling: `trainer bench rollout`, one episode, one turn: a prompt of N tokens,
#      then --new-tokens tokens drawn, after an unreported warm-up turn of the same size;
#   4. the same two with PyTorch (gpu_check_torch.py beside this script: SDPA, bf16 autocast,
#      the same shapes) for the ratio.
# Training steps (both sides) and PyTorch's sampling run each length twice and report the
# second run: the first pays for what happens once per shape (kernels, allocator growth).
# Peak GPU memory: nvidia-smi is polled every 20 ms in the background while the parts run;
# a measurement's peak is the most device memory in use during it, less what was in use
# before the check started (so it includes the CUDA context, the weights and the optimiser's
# state). The polling can miss a peak shorter than its period; PyTorch's exact
# max_memory_allocated is shown beside it.
#
# Prints one table. Exits 0 when every part ran and parity passed, 1 when a part failed or
# timed out (the table says which), 2 when the machine or the binary cannot run the check.
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
device=cuda
tokens=2048,8192,16384
shape=""
new_tokens=128
bin="${TRAINER_BIN:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="${2:?--device needs a value}"; shift 2 ;;
    --tokens) tokens="${2:?--tokens needs a value}"; shift 2 ;;
    --shape) shape="${2:?--shape needs a value}"; shift 2 ;;
    --new-tokens) new_tokens="${2:?--new-tokens needs a value}"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^set /{exit} NR > 1' "$0"; exit 0 ;;
    -*) echo "gpu-check: unknown option $1" >&2; exit 2 ;;
    *) bin="$1"; shift ;;
  esac
done
bin="${bin:-$root/gpu-bin/trainer}"
python="${PYTHON:-python3}"
budget="${BUDGET_S:-450}"
case "$device" in
  cuda) shape="${shape:-qwen2.5-0.5b}" ;;
  cpu) shape="${shape:-bench}" ;;
  *) echo "gpu-check: --device must be cuda or cpu, not $device" >&2; exit 2 ;;
esac
if ! [[ "$tokens" =~ ^[0-9]+(,[0-9]+)*$ && "$new_tokens" =~ ^[0-9]+$ && "$budget" =~ ^[0-9]+$ ]]; then
  echo "gpu-check: --tokens needs comma-separated numbers, --new-tokens and BUDGET_S a number" >&2
  exit 2
fi
start=$(date +%s)
die() { echo "gpu-check: $*" >&2; exit 2; }
log() { echo "gpu-check [$(( $(date +%s) - start ))s] $*" >&2; }

# --- what the check needs, each probe bounded in time -----------------------------------
[ -x "$bin" ] || die "no trainer binary at $bin (pass its path, or set TRAINER_BIN)"
# The CUDA build links cuBLAS, cuRAND, NVRTC and NCCL dynamically. Where CUDA comes with
# PyTorch, those libraries are in the nvidia-* wheels beside torch: put their folders on the
# library path (after whatever the caller set).
if [ "$device" = cuda ]; then
  nv="$(timeout 60 "$python" -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null || true)"
  if [ -n "$nv" ] && [ -d "$nv" ]; then
    for d in "$nv"/*/lib; do
      [ -d "$d" ] && LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
    done
    export LD_LIBRARY_PATH
  fi
fi
timeout 20 "$bin" --version >/dev/null 2>&1 || die "$bin does not run here (built for another system?)"
if [ "$device" = cuda ]; then
  command -v nvidia-smi >/dev/null || die "no GPU: nvidia-smi is not installed (use --device cpu for a dry run)"
  gpu_name="$(timeout 20 nvidia-smi --query-gpu=name,memory.total --format=csv,noheader -i 0 2>&1)" \
    || die "no GPU: nvidia-smi fails: $gpu_name"
fi
timeout 60 "$python" -c 'import torch' 2>/dev/null || die "$python cannot import torch (set PYTHON)"
out="${OUT:-$(mktemp -d -t gpu-check.XXXXXX)}"
mkdir -p "$out" || die "cannot make the log folder $out"
if [ "$device" = cuda ]; then
  # A CPU build refuses --device cuda before anything else (the bad length comes after).
  probe="$(timeout 60 "$bin" bench memory --device cuda --tokens 1 2>&1)"
  case "$probe" in
    *"CUDA is not available"*) die "$bin cannot use the GPU: ${probe#trainer: }" ;;
  esac
  timeout 90 "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || die "no GPU for PyTorch: torch.cuda.is_available() is False"
  base_mib="$(timeout 20 nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -n 1)"
  # Polled into the log as "unix-seconds MiB" until this script ends.
  "$python" -c '
import signal, subprocess, sys, time
p = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                      "-i", "0", "-lms", "20"], stdout=subprocess.PIPE, text=True)
signal.signal(signal.SIGTERM, lambda *_: (p.kill(), sys.exit(0)))
with open(sys.argv[1], "w") as f:
    for line in p.stdout:
        f.write(f"{time.time():.3f} {line.strip()}\n")
        f.flush()
' "$out/gpu-memory.log" &
  poller=$!
  trap 'kill "$poller" 2>/dev/null' EXIT
else
  gpu_name="none (dry run on the CPU)"
  base_mib=0
fi
log "device $device ($gpu_name), shape $shape, tokens $tokens; logs in $out"

failed=0
# run NAME LIMIT CMD...: runs CMD with stdout to $out/NAME.json and stderr to $out/NAME.log,
# for at most LIMIT seconds and never past the budget; records its window and status.
run() {
  local name="$1" limit="$2"; shift 2
  local left=$(( budget - ($(date +%s) - start) ))
  if [ "$left" -lt 10 ]; then
    log "$name: skipped, the ${budget}s budget is spent"
    echo "$name skipped" >>"$out/status"
    failed=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "$name (at most ${limit}s)"
  local t0; t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.json" 2>"$out/$name.log"
  local rc=$?
  echo "$name $t0 $(date +%s.%N)" >>"$out/windows"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "$name timeout" >>"$out/status"; failed=1; log "$name: timed out after ${limit}s"
  elif [ "$rc" -ne 0 ]; then
    echo "$name failed" >>"$out/status"; failed=1
    log "$name: exit $rc: $(tail -n 3 "$out/$name.log" | tr '\n' ' ')"
  else
    echo "$name ok" >>"$out/status"
  fi
}
: >"$out/status"
: >"$out/windows"

IFS=, read -r -a lengths <<<"$tokens"
# Each length twice, the second run reported: the first pays for what is done once per shape
# (kernels loaded or tuned, allocator pools grown) on both sides.
twice="$(for n in "${lengths[@]}"; do printf '%s,%s,' "$n" "$n"; done)"
twice="${twice%,}"
run parity 60 "$bin" bench parity --device "$device" --fixtures "$root/trainer/fixtures" --json
run candle-train 150 "$bin" bench memory --device "$device" --shape "$shape" --tokens "$twice" --warmup --json
for n in "${lengths[@]}"; do
  run "candle-sample-$n" 45 "$bin" bench rollout --device "$device" --shape "$shape" --episodes 1 \
    --turns 1 --no-session --rounds 1 --prompt-tokens "$n" --turn-tokens "$new_tokens" --json
done
run torch 120 "$python" "$here/gpu_check_torch.py" --device "$device" --shape "$shape" \
  --tokens "$twice" --new-tokens "$new_tokens"

"$python" - "$out" "$device" "$gpu_name" "$shape" "$base_mib" "$new_tokens" "$(date +%s)" "$start" <<'PY'
import json, sys
from pathlib import Path

out, device, gpu, shape, base_mib, new_tokens, now, start = sys.argv[1:]
out, base_mib = Path(out), float(base_mib or 0)
status = dict(l.split(None, 1) for l in (out / "status").read_text().splitlines() if l)
windows = {l.split()[0]: (float(l.split()[1]), float(l.split()[2])) for l in (out / "windows").read_text().splitlines() if l}
mem = []
if (out / "gpu-memory.log").exists():
    for l in (out / "gpu-memory.log").read_text().splitlines():
        try:
            t, m = l.split()
            mem.append((float(t), float(m)))
        except ValueError:
            pass


def records(name):
    p = out / f"{name}.json"
    rows = []
    if p.exists():
        for l in p.read_text().splitlines():
            try:
                rows.append(json.loads(l))
            except ValueError:
                pass
    return rows


def gpu_peak(t0, t1):
    """The most device memory in use between t0 and t1, less the check's starting use."""
    seen = [m for t, m in mem if t0 <= t <= t1]
    return max(seen) - base_mib if seen else None


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


lines = []
parity = records("parity")
versions = [r for r in records("torch") if "torch" in r][:1]
params_c = next((r.get("params") for r in records("candle-train") if r.get("params")), None)
params_t = next((r.get("params") for r in records("torch") if r.get("params")), None)

def millions(n):
    return f"{n / 1e6:.1f}M" if n else "?"


print(f"GPU check on {gpu}; device {device}; model {shape} with random weights "
      f"({millions(params_c)} parameters in candle, {millions(params_t)} in PyTorch)"
      + (f"; PyTorch {versions[0]['torch']}, {versions[0]['impl']}" if versions else ""))
if params_c and params_t and params_c != params_t:
    print(f"WARNING: the two models differ in size ({params_c} vs {params_t} parameters)")
mem_note = ("peak MiB: device memory in use (nvidia-smi, every 20 ms) less the idle use; "
            "alloc: PyTorch's max_memory_allocated" if device == "cuda" else
            "peak MiB: candle's heap bytes above the step's start (the CPU bench's figure)")
print(mem_note)
head = f"{'check':<30}{'tokens':>7}{'candle s':>10}{'candle tok/s':>14}{'peak MiB':>10}{'torch s':>9}{'torch tok/s':>13}{'peak MiB':>10}{'alloc MiB':>11}{'speed ratio':>13}"
print(head)
print("-" * len(head))
for r in parity:
    ref = r.get("logprob_vs_reference_max_abs")
    what = f"parity {r['fixture']} {r['dtype']}"
    print(f"{what:<30}  |dlogp| {r['logprob_max_abs']:.1e}  |dH| {r['entropy_max_abs']:.1e}  "
          f"grad rel {r['grad_max_rel']:.1e}  vs PyTorch f64 {fmt(ref, '.1e')}  "
          f"{'ok' if r['ok'] else 'FAILED (tolerance ' + json.dumps(r['tolerance']) + ')'}")
if status.get("parity") != "ok":
    print(f"{'parity':<30}  {status.get('parity', 'not run')} (see {out}/parity.log)")

# The last record of each length: the second of its two runs.
train_c = {r["tokens"]: r for r in records("candle-train")}
torch_rows = records("torch")
train_t = {r["tokens"]: r for r in torch_rows if r.get("part") == "train"}
sample_t = {r["tokens"]: r for r in torch_rows if r.get("part") == "sample"}
lengths = sorted(set(train_c) | set(train_t) | set(sample_t) |
                 {int(n.rsplit('-', 1)[1]) for n in windows if n.startswith("candle-sample-")})


def row(what, n, c, c_peak, t):
    cs = c.get("seconds") if c else None
    ct = c.get("tokens_per_s") if c else None
    ts = t.get("seconds") if t else None
    tt = t.get("tokens_per_s") if t else None
    tp = gpu_peak(t["started"], t["ended"]) if t and "started" in t and device == "cuda" else None
    ta = t.get("peak_alloc_bytes") if t else None
    ratio = ct / tt if ct and tt else None
    note = ""
    if t and t.get("error"):
        note += f"  PyTorch: {t['error']}"
    print(f"{what:<30}{n:>7}{fmt(cs, '.2f'):>10}{fmt(ct, '.0f'):>14}{fmt(c_peak, '.0f'):>10}"
          f"{fmt(ts, '.2f'):>9}{fmt(tt, '.0f'):>13}{fmt(tp, '.0f'):>10}"
          f"{fmt(ta and ta / 2**20, '.0f'):>11}{fmt(ratio, '.2f'):>13}{note}")


for n in lengths:
    c = train_c.get(n)
    if c and device == "cuda":
        c_peak = gpu_peak(c["started"], c["ended"])
    else:
        c_peak = c["peak_bytes"] / 2**20 if c and c.get("peak_bytes") is not None else None
    row("GRPO train step", n, c, c_peak, train_t.get(n))
for n in lengths:
    name = f"candle-sample-{n}"
    c = next(iter(records(name)), None)
    if c:
        # tokens/s over the whole turn (prompt prefill included), as PyTorch's is measured.
        c = dict(c, seconds=int(new_tokens) / c["tokens_per_s"] if c.get("tokens_per_s") else None)
    c_peak = gpu_peak(*windows[name]) if c and name in windows and device == "cuda" else None
    row(f"sampling +{new_tokens} tokens", n, c, c_peak, sample_t.get(n))
print("-" * len(head))
bad = {k: v for k, v in status.items() if v != "ok"}
print(f"speed ratio: candle tokens/s over PyTorch's; {int(now) - int(start)} s in all; "
      + ("every part ran" if not bad else "NOT RUN OR FAILED: " + ", ".join(f"{k} ({v})" for k, v in bad.items()))
      + f"; logs and raw JSON in {out}")
PY
exit $failed
