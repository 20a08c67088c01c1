"""Reference fixtures for the candle policy, computed with transformers + PyTorch.

For two tiny Qwen2 models (tied and untied embeddings, fixed seeds) this writes the model
directory (safetensors + config.json + tokenizer.json) and `reference.safetensors` /
`reference.json` holding, computed in float64:
  * logits of every position and the log-prob / entropy of every token given its prefix;
  * the GRPO loss of shared/reference/method.md (PPO clip-higher, optional dual clip,
    token-level aggregation over the whole batch) on given advantages, policy-token masks
    and old log-probs, and the gradient of every parameter.
The tied model is also written in bfloat16, with the f64 references of the bf16 weights and
the same quantities computed by PyTorch in bf16 (`torch_bf16.*`), and its
config.json is rewritten in the layout transformers 4.x writes (`rope_theta`,
`torch_dtype`); the untied one keeps the 5.x layout and is sharded.

Run through make_fixtures.sh (it makes the venv).
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Config, Qwen2ForCausalLM, PreTrainedTokenizerFast

VOCAB = 288
# Qwen2's pre-tokenizer split (its tokenizer.json), which needs look-ahead in Rust.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CODEC_STRINGS = [
    "def add(a, b):\n    return a + b\n",
    "It's 2025; we've got 3 bugs — fix them!",
    "  leading spaces\n\n\ttabs and ünïcödé 你好",
    "<|im_start|>user\nhello<|im_end|>",
]
EPS_LOW, EPS_HIGH, DUAL_CLIP = 0.2, 0.28, 3.0


def make_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "def fix_bug(self, x):\n    return x + 1\n",
        "The quick brown fox jumps over the lazy dog. " * 4,
        "import os\nimport sys\nfor i in range(10):\n    print(i)\n",
        "assert result == expected, 'test failed'\n",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(SPECIALS)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    return tok


def make_model(seed: int, tied: bool, eos: int) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=tied,
        bos_token_id=eos,
        eos_token_id=eos,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).float()
    # Non-trivial values everywhere (biases and norms too), so every weight matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model.eval()


def grpo_loss(logps, olds, advs, masks, dual_clip):
    """verl-style PPO clip-higher with optional dual clip; token mean over the global batch."""
    total = 0.0
    count = 0.0
    for logp, old, adv, mask in zip(logps, olds, advs, masks):
        ratio = torch.exp(logp - old)
        pg1 = -adv * ratio
        pg2 = -adv * torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH)
        clip1 = torch.maximum(pg1, pg2)
        if dual_clip is not None:
            clip2 = torch.minimum(torch.full_like(clip1, -adv * dual_clip), clip1)
            tok = torch.where(torch.tensor(adv < 0), clip2, clip1)
        else:
            tok = clip1
        total = total + (tok * mask).sum()
        count += float(mask.sum())
    return total / count


def per_sequence(model, seqs):
    """float64 logits (each sequence alone, no padding), log-probs and entropies."""
    logits, logps, ents = [], [], []
    for s in seqs:
        ids = torch.tensor([s])
        z = model(input_ids=ids).logits[0]  # (t, V)
        lsm = torch.log_softmax(z, dim=-1)
        logits.append(z)
        logps.append(lsm[:-1].gather(1, ids[0, 1:, None])[:, 0])
        ents.append(-(lsm[:-1].exp() * lsm[:-1]).sum(-1))
    return logits, logps, ents


def write_fixture(out: Path, name: str, model, tok_path: Path, seed: int, grads_for_dual: bool, shard: bool):
    d = out / name
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True, max_shard_size="64KB" if shard else "50GB")
    shutil.copy(tok_path, d / "tokenizer.json")

    g = torch.Generator().manual_seed(seed + 1)
    lengths = [14, 9, 11]
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]
    # Policy tokens: a prompt, then alternating policy turns and observations.
    masks = []
    for n in lengths:
        m = [False] * n
        for i in range(3, n):
            m[i] = (i // 3) % 2 == 1 or i == n - 1
        masks.append(m)
    advs = [1.0, -1.5, 0.5]

    m64 = model.double()
    with torch.no_grad():
        logits, logps, ents = per_sequence(m64, seqs)
    # Old log-probs: current ones shifted by noise so that ratios cover both clip edges and,
    # for the negative-advantage sequence, the dual clip.
    olds = []
    for k, lp in enumerate(logps):
        noise = 0.6 * torch.randn(lp.shape, generator=g, dtype=torch.float64)
        if k == 1:
            noise[::3] = -1.5  # ratio ≈ e^1.5 > 3
        olds.append((lp + noise).float().double())  # old log-probs are stored as f32

    tensors = {}
    meta = {"sequences": seqs, "policy_mask": masks, "advantages": advs, "eps_low": EPS_LOW, "eps_high": EPS_HIGH, "dual_clip": DUAL_CLIP}
    for k in range(len(seqs)):
        tensors[f"logits.{k}"] = logits[k].contiguous()
        tensors[f"logprobs.{k}"] = logps[k].contiguous()
        tensors[f"entropy.{k}"] = ents[k].contiguous()
        tensors[f"old_logprobs.{k}"] = olds[k].contiguous()
    # Token masks over positions 1.. (the log-prob of token i sits at index i-1).
    tmasks = [torch.tensor(m[1:], dtype=torch.float64) for m in masks]
    settings = [("plain", None)] + ([("dual", DUAL_CLIP)] if grads_for_dual else [])
    for tag, dual in settings:
        m64.zero_grad()
        _, lps, _ = per_sequence(m64, seqs)
        loss = grpo_loss(lps, olds, advs, tmasks, dual)
        loss.backward()
        meta[f"loss_{tag}"] = loss.item()
        for pname, p in m64.named_parameters():
            tensors[f"grad_{tag}.{pname}"] = p.grad.detach().clone().contiguous()
    meta["parameters"] = [n for n, _ in m64.named_parameters()]
    save_file(tensors, str(d / "reference.safetensors"))
    (d / "reference.json").write_text(json.dumps(meta, indent=1))
    model.float()
    return d


def to_4x_config(d: Path):
    """Rewrites config.json in the layout transformers 4.x writes."""
    cfg = json.loads((d / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.get("rope_theta", 10000.0)
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg.pop("layer_types", None)
    cfg["use_sliding_window"] = False
    cfg["sliding_window"] = None
    cfg["max_window_layers"] = 28
    cfg["transformers_version"] = "4.57.1"
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    tok = make_tokenizer()
    tok_dir = out / "tokenizer"
    shutil.rmtree(tok_dir, ignore_errors=True)
    tok_dir.mkdir()
    tok_path = tok_dir / "tokenizer.json"
    tok.save(str(tok_path))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tok_path))
    cases = [{"text": s, "ids": tok.encode(s, add_special_tokens=False).ids} for s in CODEC_STRINGS]
    for c in cases:
        assert fast.encode(c["text"], add_special_tokens=False) == c["ids"]
    (tok_dir / "encodings.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False))
    eos = tok.token_to_id("<|endoftext|>")

    tied = make_model(seed=1234, tied=True, eos=eos)
    d = write_fixture(out, "qwen2-tied", tied, tok_path, seed=1234, grads_for_dual=True, shard=False)
    to_4x_config(d)

    untied = make_model(seed=4321, tied=False, eos=eos)
    write_fixture(out, "qwen2-untied", untied, tok_path, seed=4321, grads_for_dual=False, shard=True)

    # bf16 weights of the tied model. In f64 from those weights: logits, log-probs, entropies
    # and the GRPO gradient of the tied fixture's batch (its masks, advantages and old
    # log-probs). Beside them, the same quantities computed by PyTorch in bf16 (weights and
    # activations bf16, as a bf16 forward on a GPU runs): the test holds candle's bf16 path
    # to PyTorch's own bf16 error, not to an absolute bound.
    bf = out / "qwen2-tied-bf16"
    shutil.rmtree(bf, ignore_errors=True)
    tied_bf16 = make_model(seed=1234, tied=True, eos=eos).to(torch.bfloat16)
    tied_bf16.save_pretrained(bf, safe_serialization=True)
    shutil.copy(tok_path, bf / "tokenizer.json")
    ref = json.loads((d / "reference.json").read_text())
    seqs = ref["sequences"]
    tied_ref = load_file(str(d / "reference.safetensors"))
    olds = [tied_ref[f"old_logprobs.{k}"] for k in range(len(seqs))]
    tmasks = [torch.tensor(m[1:], dtype=torch.float64) for m in ref["policy_mask"]]
    tensors = {}
    meta = {k: ref[k] for k in ["sequences", "policy_mask", "advantages", "eps_low", "eps_high", "dual_clip"]}
    # Loaded fresh so that RoPE's inverse frequencies are computed in f32, as from_pretrained
    # does for a bf16 checkpoint (`.to(bfloat16)` above also rounded them to bf16).
    for tag, dtype in [("", torch.float64), ("torch_bf16.", torch.bfloat16)]:
        m = Qwen2ForCausalLM.from_pretrained(bf, dtype=dtype, attn_implementation="eager").eval()
        with torch.no_grad():
            logits, logps, ents = per_sequence(m, seqs)
        for k in range(len(seqs)):
            tensors[f"{tag}logits.{k}"] = logits[k].double().contiguous()
            tensors[f"{tag}logprobs.{k}"] = logps[k].double().contiguous()
            tensors[f"{tag}entropy.{k}"] = ents[k].double().contiguous()
            if not tag:
                tensors[f"old_logprobs.{k}"] = olds[k].contiguous()
        m.zero_grad()
        _, lps, _ = per_sequence(m, seqs)
        loss = grpo_loss([lp.double() for lp in lps], olds, ref["advantages"], tmasks, None)
        loss.backward()
        meta[f"{tag}loss_plain"] = loss.item()
        for pname, p in m.named_parameters():
            tensors[f"{tag}grad_plain.{pname}"] = p.grad.detach().double().clone().contiguous()
        if not tag:
            meta["parameters"] = [n for n, _ in m.named_parameters()]
    save_file(tensors, str(bf / "reference.safetensors"))
    (bf / "reference.json").write_text(json.dumps(meta, indent=1))

    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"fixtures written to {out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
