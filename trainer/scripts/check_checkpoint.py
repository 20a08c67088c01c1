"""Loads a checkpoint written by the trainer with transformers and compares its per-token
log-probs with `trainer score` on the same ids: the check that a checkpoint is a model
transformers can use, not only files with the right names.

    trainer/scripts/check_checkpoint.sh CHECKPOINT_DIR      # makes the venv, builds, runs

Prints one JSON line: the largest absolute log-prob difference, and exits 1 above 1e-4.
"""

import argparse
import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--trainer", required=True, help="the trainer binary")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (1, 96), generator=g)
    with torch.no_grad():
        logits = model(ids).logits.double()
    lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]

    out = subprocess.run(
        [args.trainer, "score", "--model", args.checkpoint, "--token-ids",
         ",".join(str(int(i)) for i in ids[0]), "--json"],
        check=True, capture_output=True, text=True,
    )
    ours = torch.tensor(json.loads(out.stdout)["logprobs"], dtype=torch.float64)
    diff = (ours - lp).abs().max().item()
    print(json.dumps({
        "checkpoint": args.checkpoint,
        "model_class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens": int(ids.shape[1]),
        "max_abs_logprob_diff": diff,
        "tolerance": args.tol,
    }))
    sys.exit(0 if diff <= args.tol else 1)


if __name__ == "__main__":
    main()
