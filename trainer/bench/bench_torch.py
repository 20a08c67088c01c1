"""PyTorch side of trainer/bench/run.sh: makes the shared benchmark model and times a GRPO
training step and batched sampling with transformers on the CPU. Prints one JSON line."""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def make_model(out: Path, args):
    cfg = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        eos_token_id=None,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).float()
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def inputs(args):
    g = torch.Generator().manual_seed(1)
    train = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    prompts = torch.randint(0, args.vocab, (args.gen_batch, args.prompt), generator=g)
    return train, prompts


def grpo_loss(logits, ids, old, adv, eps_low=0.2, eps_high=0.28):
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    ratio = torch.exp(lp - old)
    a = adv[:, None]
    tok = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
    return tok.sum() / tok.numel()


def bench_train(model, ids, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    adv = torch.linspace(-1, 1, ids.shape[0])
    with torch.no_grad():
        old = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        loss = grpo_loss(model(input_ids=ids).logits, ids, old, adv)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:  # the first step warms up
            times.append(time.perf_counter() - t)
    return ids.numel() * len(times) / sum(times), times


def bench_sample(model, prompts, new_tokens, reps):
    times = []
    for i in range(reps + 1):
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                return_dict_in_generate=True,
                output_logits=True,
            )
            # The log-prob of every sampled token, as the RL loop needs.
            new = out.sequences[:, prompts.shape[1]:]
            lps = torch.stack([torch.log_softmax(z.float(), -1) for z in out.logits], 1)
            lps.gather(-1, new[..., None])
        if i > 0:
            times.append(time.perf_counter() - t)
        n = new.numel()
    return n * len(times) / sum(times), times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--make", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d = Path(args.model_dir)
    if args.make:
        n = make_model(d, args)
        train, prompts = inputs(args)
        # Both sides read the same token ids.
        (d / "bench_inputs.json").write_text(json.dumps({"train": train.tolist(), "prompts": prompts.tolist(), "new_tokens": args.new_tokens, "steps": args.steps}))
        print(json.dumps({"parameters": n}))
        return
    model = Qwen2ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    ins = json.loads((d / "bench_inputs.json").read_text())
    train, prompts = torch.tensor(ins["train"]), torch.tensor(ins["prompts"])
    model.train()
    train_tps, train_times = bench_train(model, train, args.steps)
    model.eval()
    sample_tps, sample_times = bench_sample(model, prompts, args.new_tokens, max(1, args.steps - 1))
    print(json.dumps({
        "impl": f"pytorch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "train_tokens_per_s": train_tps,
        "train_step_s": train_times,
        "sample_tokens_per_s": sample_tps,
        "sample_s": sample_times,
    }))


if __name__ == "__main__":
    main()
