"""PyTorch side of trainer/scripts/gpu-check.sh: a GRPO training step and sampling on a
Qwen2-shaped model with random weights, for each sequence length, the way the trainer does
them, so that the two can be compared. Prints one JSON object per line and measurement.

What it runs, to match the trainer (`trainer bench memory` / `trainer bench rollout`):
  * f32 master weights and AdamW, forward and backward under bf16 autocast (f32 on the CPU),
    attention through `scaled_dot_product_attention`;
  * layers checkpointed (recomputed in the backward) from 4096 tokens, as the trainer's
    `CHECKPOINT_FROM_TOKENS`;
  * the LM head and log-softmax in checkpointed blocks of rows, log-probs in f32, never the
    whole (tokens x vocabulary) logits: the trainer's blocked head;
  * the GRPO loss of one sequence with advantage 1 whose old log-probs are its own (ratio 1,
    as the trainer's recomputed pi_old makes it), every token after the first trained on;
  * sampling: a prompt of N random tokens, then `--new-tokens` tokens drawn at temperature 1
    from the full distribution, with a KV cache; tokens/s counts the drawn tokens over the
    whole time (prefill included), as `trainer bench rollout` does.

The model is transformers' Qwen2ForCausalLM (SDPA) when transformers is installed, else a
hand-written Qwen2 (`--impl manual`: the same architecture, so the same shapes and work).
"""

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# The trainer's shapes (trainer/src/cli/bench/mod.rs, `ModelShape`).
SHAPES = {
    "qwen2.5-0.5b": dict(vocab=151936, hidden=896, intermediate=4864, layers=24, heads=14,
                         kv_heads=2, head_dim=64, tie=True),
    "bench": dict(vocab=4096, hidden=256, intermediate=768, layers=4, heads=8, kv_heads=2,
                  head_dim=32, tie=False),
}
ROPE_THETA = 1_000_000.0
RMS_EPS = 1e-6
CHECKPOINT_FROM_TOKENS = 4096
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
HEAD_BLOCK_ROWS = 4096


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        # In f32 as Qwen2 does, whatever the autocast dtype.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)
        return self.weight * x.to(dtype)


def rope_tables(head_dim, positions, device):
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    f = positions.float()[:, None] * inv[None, :]
    emb = torch.cat([f, f], -1)
    return emb.cos(), emb.sin()


def rotate(x, cos, sin):
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


def sdpa(q, k, v, causal):
    """SDPA with grouped-query attention: natively where torch has it (2.5 on), else with
    the key/value heads repeated, as transformers does."""
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    except TypeError:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


class Block(nn.Module):
    def __init__(self, s):
        super().__init__()
        d, hd = s["hidden"], s["head_dim"]
        self.heads, self.kv, self.hd = s["heads"], s["kv_heads"], hd
        self.ln1, self.ln2 = RMSNorm(d), RMSNorm(d)
        self.q = nn.Linear(d, self.heads * hd)
        self.k = nn.Linear(d, self.kv * hd)
        self.v = nn.Linear(d, self.kv * hd)
        self.o = nn.Linear(self.heads * hd, d, bias=False)
        self.gate = nn.Linear(d, s["intermediate"], bias=False)
        self.up = nn.Linear(d, s["intermediate"], bias=False)
        self.down = nn.Linear(s["intermediate"], d, bias=False)

    def forward(self, x, cos, sin, cache=None):
        b, t, _ = x.shape
        y = self.ln1(x)
        q = self.q(y).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k(y).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v(y).view(b, t, self.kv, self.hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        past = 0
        if cache is not None:
            if cache:
                past = cache[0].shape[2]
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        # A new row attends to every cached key; a prompt is causal.
        a = sdpa(q, k, v, past == 0 and t > 1)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        y = self.ln2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class Qwen2(nn.Module):
    """Qwen2 (RMSNorm, RoPE, grouped-query attention with q/k/v biases, SwiGLU)."""

    def __init__(self, s):
        super().__init__()
        self.s = s
        self.embed = nn.Embedding(s["vocab"], s["hidden"])
        self.layers = nn.ModuleList(Block(s) for _ in range(s["layers"]))
        self.norm = RMSNorm(s["hidden"])
        self.lm_head = None if s["tie"] else nn.Linear(s["hidden"], s["vocab"], bias=False)

    def head_weight(self):
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def hidden(self, ids, checkpointed, caches=None, start=0):
        t = ids.shape[1]
        pos = torch.arange(start, start + t, device=ids.device)
        cos, sin = rope_tables(self.s["head_dim"], pos, ids.device)
        x = self.embed(ids)
        for i, layer in enumerate(self.layers):
            if checkpointed:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, None if caches is None else caches[i])
        return self.norm(x)


def init_(model):
    # transformers' Qwen2 init, as the trainer's random model: N(0, 0.02), biases 0, norms 1.
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or ".ln" in name and name.endswith("weight"):
            nn.init.ones_(p)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.normal_(p, 0.0, 0.02)


class Manual:
    name = "hand-written Qwen2"

    def __init__(self, s, device):
        self.model = Qwen2(s).to(device)
        init_(self.model)

    def parameters(self):
        return self.model.parameters()

    def hidden(self, ids, checkpointed):
        return self.model.hidden(ids, checkpointed)

    def head_weight(self):
        return self.model.head_weight()

    @torch.no_grad()
    def sample(self, prompt, new_tokens, gen):
        caches = [[] for _ in self.model.layers]
        ids, start, out = prompt, 0, []
        for _ in range(new_tokens):
            h = self.model.hidden(ids, False, caches, start)[:, -1]
            logits = F.linear(h, self.model.head_weight()).float()
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
            start += ids.shape[1]
            ids = nxt
            out.append(nxt)
        return torch.cat(out, 1)


class Transformers:
    def __init__(self, s, device):
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(
            vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
            num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
            num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
            max_position_embeddings=32768, rms_norm_eps=RMS_EPS,
            # transformers 5 reads rope_parameters, 4.x rope_theta.
            rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
            rope_theta=ROPE_THETA, tie_word_embeddings=s["tie"], use_sliding_window=False,
            eos_token_id=None, bos_token_id=None, pad_token_id=0,
        )
        import transformers

        self.model = Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa")
        self.model.to(device=device, dtype=torch.float32)
        attn = self.model.config._attn_implementation
        self.name = f"transformers {transformers.__version__} Qwen2ForCausalLM ({attn})"
        self.checkpointed = False

    def parameters(self):
        return self.model.parameters()

    def hidden(self, ids, checkpointed):
        if checkpointed != self.checkpointed:
            if checkpointed:
                self.model.gradient_checkpointing_enable({"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_disable()
            self.checkpointed = checkpointed
        self.model.train()
        return self.model.model(input_ids=ids, use_cache=False).last_hidden_state

    def head_weight(self):
        return self.model.lm_head.weight

    @torch.no_grad()
    def sample(self, prompt, new_tokens, gen):
        self.model.eval()
        out = self.model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
            temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, pad_token_id=0,
        )
        return out[:, prompt.shape[1]:]


def check_manual(s, device):
    """The hand-written Qwen2 against transformers' with the same weights: the largest
    difference of the final hidden states, of a full forward and of the last row decoded
    from a KV cache."""
    t = Transformers(s, device)
    init_(t.model)
    m = Manual(s, device)
    hf = dict(t.model.named_parameters())
    names = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm",
             "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
             "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
             "down": "mlp.down_proj"}
    with torch.no_grad():
        m.model.embed.weight.copy_(hf["model.embed_tokens.weight"])
        m.model.norm.weight.copy_(hf["model.norm.weight"])
        if m.model.lm_head is not None:
            m.model.lm_head.weight.copy_(hf["lm_head.weight"])
        for i, layer in enumerate(m.model.layers):
            for ours, theirs in names.items():
                mod = getattr(layer, ours)
                mod.weight.copy_(hf[f"model.layers.{i}.{theirs}.weight"])
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(hf[f"model.layers.{i}.{theirs}.bias"])
        ids = torch.randint(0, s["vocab"], (1, 100), device=device)
        want = t.hidden(ids, False)
        full = m.hidden(ids, False)
        caches = [[] for _ in m.model.layers]
        m.model.hidden(ids[:, :99], False, caches, 0)
        last = m.model.hidden(ids[:, 99:], False, caches, 99)
    return {"check": "hand-written Qwen2 vs transformers", "params": sum(p.numel() for p in m.parameters()),
            "forward_max_abs": (full - want).abs().max().item(),
            "cached_decode_max_abs": (last[0, -1] - want[0, -1]).abs().max().item(),
            "scale": want.abs().max().item()}


def head_logprobs(h, w, targets, autocast):
    """f32 log-probs of `targets` under `h @ w.T`, a block of rows at a time; each block is
    recomputed in the backward, so one block of logits is alive at a time."""

    def block(hb, w, tb):
        with autocast():
            z = F.linear(hb, w)
        return torch.log_softmax(z.float(), -1).gather(-1, tb[:, None])[:, 0]

    outs = []
    for r0 in range(0, h.shape[0], HEAD_BLOCK_ROWS):
        hb, tb = h[r0:r0 + HEAD_BLOCK_ROWS], targets[r0:r0 + HEAD_BLOCK_ROWS]
        outs.append(checkpoint(block, hb, w, tb, use_reentrant=False))
    return torch.cat(outs)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def train_step(m, opt, ids, autocast):
    t = ids.shape[1]
    with autocast():
        h = m.hidden(ids, t >= CHECKPOINT_FROM_TOKENS)
    lp = head_logprobs(h[0, :-1], m.head_weight(), ids[0, 1:], autocast)
    # GRPO with advantage 1 and pi_old = pi: ratio 1 inside the clip range, so the loss is
    # -ratio averaged over the tokens, whose gradient is the trainer's.
    ratio = torch.exp(lp - lp.detach())
    loss = -ratio.sum() / lp.numel()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(m.parameters()), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda or cpu (a dry run)")
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", default="2048,8192,16384", help="comma-separated lengths")
    ap.add_argument("--parts", default="train,sample", help="train and/or sample")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens drawn per sampling")
    ap.add_argument("--impl", default="auto", choices=["auto", "transformers", "manual"])
    ap.add_argument("--warmup-tokens", type=int, default=256)
    ap.add_argument("--check-manual", action="store_true",
                    help="compare the hand-written Qwen2 with transformers' (f32) and exit")
    args = ap.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check_torch: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    s = SHAPES[args.shape]
    if args.check_manual:
        torch.manual_seed(0)
        r = check_manual(s, device)
        r["ok"] = max(r["forward_max_abs"], r["cached_decode_max_abs"]) <= 1e-4 * max(r["scale"], 1.0)
        print(json.dumps(r))
        return 0 if r["ok"] else 1
    lengths = [int(x) for x in args.tokens.split(",") if x]
    if any(n < 2 for n in lengths):
        print("gpu_check_torch: every length must be at least 2 tokens", file=sys.stderr)
        return 2
    parts = [p for p in args.parts.split(",") if p]
    impl = args.impl
    if impl == "auto":
        try:
            import transformers  # noqa: F401

            impl = "transformers"
        except ImportError:
            impl = "manual"
    torch.manual_seed(0)
    m = Transformers(s, device) if impl == "transformers" else Manual(s, device)
    if impl == "transformers":
        init_(m.model)
    # bf16 compute on the GPU (the trainer's default dtype there); f32 on the CPU, as the
    # trainer computes there.
    if device.type == "cuda":
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        def autocast():
            return torch.autocast("cpu", enabled=False)
    params = sum(p.numel() for p in m.parameters())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(1)
    common = {"side": "pytorch", "impl": m.name, "torch": torch.__version__,
              "device": str(device), "params": params}

    def ids_of(n):
        return torch.randint(0, s["vocab"], (1, n), generator=gen, device=device)

    def measure(part, n, fn):
        reset_peak(device)
        sync(device)
        started = time.time()
        t0 = time.perf_counter()
        rec = dict(common, part=part, tokens=n)
        try:
            produced = fn()
            sync(device)
            secs = time.perf_counter() - t0
            rec.update(seconds=secs, tokens_per_s=produced / secs, peak_alloc_bytes=peak(device))
        except OOM as e:
            rec.update(error=f"out of memory: {str(e).splitlines()[0]}")
        rec.update(started=started, ended=time.time())
        print(json.dumps(rec), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # Warm-up (kernel loading, the optimiser's state), not reported.
    w = min(args.warmup_tokens, min(lengths))
    if "train" in parts and w >= 2:
        train_step(m, opt, ids_of(w), autocast)
    if "sample" in parts and w >= 1:
        with autocast():
            m.sample(ids_of(w), 2, gen)
    sync(device)

    for n in lengths:
        if "train" in parts:
            ids = ids_of(n)
            measure("train", n, lambda: (train_step(m, opt, ids, autocast), n)[1])
        if "sample" in parts:
            prompt = ids_of(n)

            def run_sample():
                with autocast():
                    out = m.sample(prompt, args.new_tokens, gen)
                return out.numel()

            measure("sample", n, run_sample)
    return 0


if __name__ == "__main__":
    sys.exit(main())
