//! The Qwen2 / Qwen2.5 decoder: grouped-query attention with RoPE, RMSNorm, SwiGLU MLP,
//! q/k/v biases, tied or untied embeddings. Built from differentiable ops (see `ops`).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use super::ModelError;
use super::config::Qwen2Config;
use super::kv_cache::KvCache;
use super::layer_checkpoint;
use super::ops::{self, AttentionMask, KeyRanges, OpsMode, RopePositions, RopeTables};
use super::rng::Rng;

/// One layer's weights (transformers names in comments).
#[derive(Clone, Debug)]
pub(super) struct Layer {
    q_w: Tensor, // self_attn.q_proj.weight (heads·hd, d)
    q_b: Tensor,
    k_w: Tensor,
    k_b: Tensor,
    v_w: Tensor,
    v_b: Tensor,
    o_w: Tensor,
    gate_w: Tensor, // mlp.gate_proj.weight (i, d)
    up_w: Tensor,
    down_w: Tensor,
    in_norm: Tensor,   // input_layernorm.weight
    post_norm: Tensor, // post_attention_layernorm.weight
}

/// All weights, either the trainable variables or detached views of the same storage.
#[derive(Clone, Debug)]
struct Weights {
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Option<Tensor>,
}

impl Layer {
    /// Every tensor, in a fixed order (the checkpointed layer hands their gradients back in it).
    pub(super) fn tensors(&self) -> [&Tensor; 12] {
        [
            &self.q_w,
            &self.q_b,
            &self.k_w,
            &self.k_b,
            &self.v_w,
            &self.v_b,
            &self.o_w,
            &self.gate_w,
            &self.up_w,
            &self.down_w,
            &self.in_norm,
            &self.post_norm,
        ]
    }
}

impl Weights {
    fn build(cfg: &Qwen2Config, get: &dyn Fn(&str) -> Tensor) -> Self {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = |s: &str| get(&format!("model.layers.{i}.{s}"));
                Layer {
                    q_w: p("self_attn.q_proj.weight"),
                    q_b: p("self_attn.q_proj.bias"),
                    k_w: p("self_attn.k_proj.weight"),
                    k_b: p("self_attn.k_proj.bias"),
                    v_w: p("self_attn.v_proj.weight"),
                    v_b: p("self_attn.v_proj.bias"),
                    o_w: p("self_attn.o_proj.weight"),
                    gate_w: p("mlp.gate_proj.weight"),
                    up_w: p("mlp.up_proj.weight"),
                    down_w: p("mlp.down_proj.weight"),
                    in_norm: p("input_layernorm.weight"),
                    post_norm: p("post_attention_layernorm.weight"),
                }
            })
            .collect();
        Self {
            embed: get("model.embed_tokens.weight"),
            layers,
            norm: get("model.norm.weight"),
            lm_head: (!cfg.tie_word_embeddings).then(|| get("lm_head.weight")),
        }
    }
}

/// The names and shapes of every parameter, in transformers' order.
pub fn parameter_shapes(cfg: &Qwen2Config) -> Vec<(String, Vec<usize>)> {
    let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, d],
    )];
    for l in 0..cfg.num_hidden_layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        out.extend([
            (p("self_attn.q_proj.weight"), vec![q, d]),
            (p("self_attn.q_proj.bias"), vec![q]),
            (p("self_attn.k_proj.weight"), vec![kv, d]),
            (p("self_attn.k_proj.bias"), vec![kv]),
            (p("self_attn.v_proj.weight"), vec![kv, d]),
            (p("self_attn.v_proj.bias"), vec![kv]),
            (p("self_attn.o_proj.weight"), vec![d, q]),
            (p("mlp.gate_proj.weight"), vec![i, d]),
            (p("mlp.up_proj.weight"), vec![i, d]),
            (p("mlp.down_proj.weight"), vec![d, i]),
            (p("input_layernorm.weight"), vec![d]),
            (p("post_attention_layernorm.weight"), vec![d]),
        ]);
    }
    out.push(("model.norm.weight".to_string(), vec![d]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, d]));
    }
    out
}

/// The dtype master weights (and so the optimiser's moments and accumulated gradients) are
/// kept in: f32, or f64 when computing in f64. A bf16 weight cannot move by a step of 1e-6
/// (its spacing near 0.02 is 1.2e-4), so half-precision models train f32 masters and compute
/// with half-precision copies of them.
pub fn master_dtype(compute: DType) -> DType {
    if compute == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// A Qwen2 causal language model.
pub struct Qwen2Model {
    cfg: Qwen2Config,
    dtype: DType,
    device: Device,
    /// Master weights, in [`master_dtype`].
    params: Vec<(String, Var)>,
    /// The weights the forward reads, in `dtype`: the masters themselves (same storage) when
    /// `dtype` is the master dtype, else copies refreshed by [`Qwen2Model::refresh_compute`].
    compute: Vec<Var>,
    train: Weights,
    infer: Weights,
    rope: Arc<RopeTables>,
    ops: OpsMode,
    /// Differentiable forwards of at least this many tokens recompute each layer in the
    /// backward instead of keeping its activations; `None`: never.
    checkpoint_from: Option<usize>,
}

/// Tokens from which layers are checkpointed by default: below it a step's activations are
/// small and the recompute (about a third more work) would only slow the step down.
pub const CHECKPOINT_FROM_TOKENS: usize = 4096;

impl std::fmt::Debug for Qwen2Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qwen2Model")
            .field("dtype", &self.dtype)
            .field("params", &self.params.len())
            .finish()
    }
}

/// Rows of a batch run through the decoder.
pub(crate) struct BatchInput<'a> {
    /// `(b, t)` token ids.
    pub ids: &'a Tensor,
    /// Position of every token (`b·t`, row-major).
    pub positions: Arc<Vec<u32>>,
    pub mask: AttentionMask,
}

impl Qwen2Model {
    /// Wraps named weights (transformers names) into a model. Every parameter of the
    /// architecture must be present with its shape; a tied `lm_head.weight` is ignored.
    pub fn from_tensors(
        cfg: Qwen2Config,
        mut tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let mut params = Vec::new();
        for (name, shape) in parameter_shapes(&cfg) {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| ModelError::Weights(format!("tensor `{name}` is missing")))?;
            if t.dims() != shape.as_slice() {
                return Err(ModelError::Weights(format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    t.dims()
                )));
            }
            let t = t
                .to_device(device)?
                .to_dtype(master_dtype(dtype))?
                .contiguous()?;
            params.push((name, Var::from_tensor(&t)?));
        }
        if cfg.tie_word_embeddings {
            tensors.remove("lm_head.weight");
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(ModelError::Weights(format!(
                "unexpected tensor `{extra}` ({} unexpected in all) for a qwen2 model",
                tensors.len()
            )));
        }
        let compute = params
            .iter()
            .map(|(_, p)| {
                if p.dtype() == dtype {
                    Ok(p.clone())
                } else {
                    Var::from_tensor(&p.as_tensor().to_dtype(dtype)?)
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let by_name: HashMap<&str, &Var> = params
            .iter()
            .zip(&compute)
            .map(|((n, _), v)| (n.as_str(), v))
            .collect();
        let train = Weights::build(&cfg, &|n| by_name[n].as_tensor().clone());
        let infer = Weights::build(&cfg, &|n| by_name[n].as_detached_tensor());
        let max_pos = cfg.max_position_embeddings;
        let rope = Arc::new(RopeTables::new(
            cfg.head_dim,
            cfg.rope_theta,
            max_pos,
            dtype,
            device,
        )?);
        Ok(Self {
            cfg,
            dtype,
            device: device.clone(),
            params,
            compute,
            train,
            infer,
            rope,
            ops: OpsMode::Auto,
            checkpoint_from: Some(CHECKPOINT_FROM_TOKENS),
        })
    }

    /// A randomly initialised model (transformers' Qwen2 init: weights N(0, 0.02), biases 0,
    /// norms 1), deterministic in `seed`.
    pub fn random(
        cfg: Qwen2Config,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let mut rng = Rng::seed(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in parameter_shapes(&cfg) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| (0.02 * rng.normal()) as f32).collect()
            };
            tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        Self::from_tensors(cfg, tensors, dtype, device)
    }

    pub fn config(&self) -> &Qwen2Config {
        &self.cfg
    }

    /// The same model on `device`: its master weights copied there, the compute dtype, ops
    /// mode and checkpointing kept (a data-parallel worker's replica).
    pub fn replica_on(&self, device: &Device) -> Result<Self, ModelError> {
        let tensors = self
            .params
            .iter()
            // `copy`: on the same device `to_device` shares the storage, and the replica's
            // optimiser updates its weights in place.
            .map(|(n, p)| Ok((n.clone(), p.as_tensor().to_device(device)?.copy()?)))
            .collect::<Result<HashMap<_, _>, candle_core::Error>>()?;
        let mut m = Self::from_tensors(self.cfg.clone(), tensors, self.dtype, device)?;
        m.ops = self.ops;
        m.checkpoint_from = self.checkpoint_from;
        Ok(m)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The trainable parameters (the master weights) with their transformers names.
    pub fn parameters(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The weights the forward reads, in the order of [`Qwen2Model::parameters`]: gradients
    /// of a training forward are taken with respect to these.
    pub fn compute_parameters(&self) -> &[Var] {
        &self.compute
    }

    /// Copies the master weights into the compute copies (after an update; a no-op when the
    /// model computes in the master dtype). Callers hold the policy's weights write lock, so
    /// a generation never reads a half-refreshed model.
    pub fn refresh_compute(&self) -> Result<(), ModelError> {
        for ((_, master), copy) in self.params.iter().zip(&self.compute) {
            if master.dtype() != copy.dtype() {
                copy.set(&master.as_tensor().to_dtype(copy.dtype())?)?;
            }
        }
        Ok(())
    }

    /// Chooses fused CPU kernels (`Auto`, the default) or composite ops.
    pub fn set_ops_mode(&mut self, mode: OpsMode) {
        self.ops = mode;
    }

    pub fn ops_mode(&self) -> OpsMode {
        self.ops
    }

    /// Checkpoints the layers of differentiable forwards of at least `from_tokens` tokens
    /// (`Some(0)`: always; `None`: never). The gradients are the same either way.
    pub fn set_checkpointing(&mut self, from_tokens: Option<usize>) {
        self.checkpoint_from = from_tokens;
    }

    pub fn checkpointing(&self) -> Option<usize> {
        self.checkpoint_from
    }

    pub(crate) fn rope(&self) -> &RopeTables {
        &self.rope
    }

    fn weights(&self, grad: bool) -> &Weights {
        if grad { &self.train } else { &self.infer }
    }

    /// Final hidden states `(b·t, d)` of a batch; with `cache`, keys and values are appended
    /// to it and attention sees everything cached before. `grad` builds the backward graph.
    pub(crate) fn hidden(
        &self,
        input: &BatchInput<'_>,
        cache: Option<&mut KvCache>,
        grad: bool,
    ) -> Result<Tensor, ModelError> {
        self.hidden_in(input, KeyRanges::new(input.mask.clone()), cache, grad)
    }

    /// [`Self::hidden`] with the keys each query sees given as `ranges` (packed sequences).
    pub(crate) fn hidden_in(
        &self,
        input: &BatchInput<'_>,
        ranges: KeyRanges,
        mut cache: Option<&mut KvCache>,
        grad: bool,
    ) -> Result<Tensor, ModelError> {
        let w = self.weights(grad);
        let cfg = &self.cfg;
        let (b, t) = input.ids.dims2()?;
        let env = LayerEnv {
            b,
            eps: cfg.rms_norm_eps,
            kvh: cfg.num_key_value_heads,
            hd: cfg.head_dim,
            rope: self.rope.clone(),
            positions: Arc::new(RopePositions::new(input.positions.clone())),
            ranges,
            ops: self.ops,
        };
        let checkpoint =
            grad && cache.is_none() && self.checkpoint_from.is_some_and(|from| b * t >= from);
        let ids = input.ids.flatten_all()?;
        let mut x = w.embed.index_select(&ids, 0)?; // (b·t, d)
        for (li, l) in w.layers.iter().enumerate() {
            x = if checkpoint {
                layer_checkpoint::layer(&env, &self.infer.layers[li], l, &x)?
            } else {
                env.layer(l, &x, cache.as_deref_mut().map(|c| (li, c)))?
            };
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        Ok(ops::rms_norm(&x, &w.norm, cfg.rms_norm_eps, self.ops)?)
    }

    /// Final hidden states `(n, d)` of the last of the tokens `rows[i]` appended to each of
    /// `n` conversations, each with its own cache (batch 1, any length): projections and MLP
    /// run on all the rows' tokens at once, attention on each row against its own cache. One
    /// token per row is a decoding step; longer rows are prefills, and a step's prefills go
    /// together, so the weights are read (and packed by the GEMM) once for all of them. This
    /// is what lets conversations of different lengths, started at different times, run in
    /// one batch.
    pub(crate) fn hidden_rows(
        &self,
        rows: &[&[u32]],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor, ModelError> {
        let n = rows.len();
        if n == 0 || caches.len() != n || rows.iter().any(|r| r.is_empty()) {
            return Err(ModelError::Input(format!(
                "{n} rows (some empty?) for {} caches",
                caches.len()
            )));
        }
        for (ids, c) in rows.iter().zip(caches.iter_mut()) {
            self.check_extend(ids, c.len() + ids.len())?;
            c.reserve(ids.len())?;
        }
        let w = self.weights(false);
        let cfg = &self.cfg;
        let (kvh, hd) = (cfg.num_key_value_heads, cfg.head_dim);
        let scale = 1.0 / (hd as f64).sqrt();
        let total: usize = rows.iter().map(|r| r.len()).sum();
        let positions: Vec<u32> = rows
            .iter()
            .zip(caches.iter())
            .flat_map(|(ids, c)| (c.len()..c.len() + ids.len()).map(|p| p as u32))
            .collect();
        let positions = RopePositions::new(Arc::new(positions));
        let ids_t = Tensor::from_vec(rows.concat(), total, &self.device)?;
        let mut x = w.embed.index_select(&ids_t, 0)?; // (total, d)
        for (li, l) in w.layers.iter().enumerate() {
            let hn = ops::rms_norm(&x, &l.in_norm, cfg.rms_norm_eps, self.ops)?;
            let q = linear(&hn, &l.q_w, Some(&l.q_b), self.ops)?;
            let k = linear(&hn, &l.k_w, Some(&l.k_b), self.ops)?;
            let v = linear(&hn, &l.v_w, Some(&l.v_b), self.ops)?;
            let q = ops::rope_to_heads(&q, 1, &self.rope, &positions, self.ops)?; // (1, h, total, hd)
            let k = ops::rope_to_heads(&k, 1, &self.rope, &positions, self.ops)?; // (1, kvh, total, hd)
            let v = v
                .reshape((1, total, kvh, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            // In the caches' dtype once for all rows (a bf16 cache rounds what it stores),
            // not row by row.
            let cached = caches.first().map_or(k.dtype(), |c| c.dtype());
            let (k, v) = (k.to_dtype(cached)?, v.to_dtype(cached)?);
            let mut views = Vec::with_capacity(n);
            let mut start = 0;
            for (ids, c) in rows.iter().zip(caches.iter_mut()) {
                let t = ids.len();
                let offset = c.len();
                let (ck, cv) = c.append(
                    li,
                    &k.narrow(2, start, t)?.contiguous()?,
                    &v.narrow(2, start, t)?.contiguous()?,
                )?;
                views.push((start, t, offset, ck, cv));
                start += t;
            }
            let segments: Vec<ops::Segment<'_>> = views
                .iter()
                .map(|(start, t, offset, ck, cv)| ops::Segment {
                    q_batch: 0,
                    q_start: *start,
                    tq: *t,
                    k: ck,
                    v: cv,
                    kv_batch: 0,
                    offset: *offset,
                    key_start: 0,
                })
                .collect();
            // A decoding step's rows in one call; prompts row by row.
            let o = match ops::attention_segments(&q, &segments, scale, self.ops)? {
                Some(o) => o,
                None => {
                    let mut outs = Vec::with_capacity(n);
                    for (start, t, offset, ck, cv) in &views {
                        let mask = AttentionMask {
                            tq: *t,
                            offset: *offset,
                            key_start: Arc::new(vec![0]),
                        };
                        // A cache narrower than the queries (bf16 under f32 sampling) is
                        // read widened: these are prompts, whose own keys are most of it.
                        let widened = |c: &Tensor| c.to_dtype(q.dtype());
                        outs.push(ops::attention_heads(
                            &q.narrow(2, *start, *t)?.contiguous()?,
                            &widened(ck)?,
                            &widened(cv)?,
                            scale,
                            &mask,
                            self.ops,
                        )?);
                    }
                    Tensor::cat(&outs, 0)?
                }
            }; // (total, h·hd)
            x = residual(&x, &o, &l.o_w, self.ops)?;
            let hn = ops::rms_norm(&x, &l.post_norm, cfg.rms_norm_eps, self.ops)?;
            let a = ops::swiglu(
                &linear(&hn, &l.gate_w, None, self.ops)?,
                &linear(&hn, &l.up_w, None, self.ops)?,
                self.ops,
            )?;
            x = residual(&x, &a, &l.down_w, self.ops)?;
        }
        for (ids, c) in rows.iter().zip(caches.iter_mut()) {
            c.advance(ids.len());
        }
        let x = if total == n {
            x
        } else {
            let mut last = Vec::with_capacity(n);
            let mut end = 0u32;
            for ids in rows {
                end += ids.len() as u32;
                last.push(end - 1);
            }
            x.index_select(&Tensor::from_vec(last, n, &self.device)?, 0)?
        };
        Ok(ops::rms_norm(&x, &w.norm, cfg.rms_norm_eps, self.ops)?)
    }

    /// Refuses ids outside the vocabulary and conversations past the model's positions.
    fn check_extend(&self, ids: &[u32], total: usize) -> Result<(), ModelError> {
        let vocab = self.cfg.vocab_size as u32;
        if let Some(bad) = ids.iter().find(|&&id| id >= vocab) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        if ids.is_empty() || total > self.rope.max_positions() {
            return Err(ModelError::Input(format!(
                "a conversation of {total} tokens (adding {}) does not fit the model's {} positions",
                ids.len(),
                self.rope.max_positions()
            )));
        }
        Ok(())
    }

    /// The LM head's weight `(vocab, d)`: `lm_head`, or the embedding when tied.
    pub(crate) fn head_weight(&self, grad: bool) -> &Tensor {
        let w = self.weights(grad);
        w.lm_head.as_ref().unwrap_or(&w.embed)
    }

    /// Logits `(n, vocab)` of hidden-state rows `(n, d)`.
    pub(crate) fn logits(&self, hidden: &Tensor, grad: bool) -> Result<Tensor, ModelError> {
        Ok(linear(hidden, self.head_weight(grad), None, self.ops)?)
    }

    /// Logits for every position of right-padded sequences: `(b, t_max, vocab)`. Positions
    /// past a sequence's end hold values for padding and mean nothing.
    pub fn forward_logits(&self, seqs: &[Vec<u32>]) -> Result<Tensor, ModelError> {
        let (ids, t) = self.pad_batch(seqs)?;
        let b = seqs.len();
        let input = BatchInput {
            ids: &ids,
            positions: Arc::new(train_positions(b, t)),
            mask: AttentionMask::causal(b, t),
        };
        let h = self.hidden(&input, None, false)?;
        Ok(self
            .logits(&h, false)?
            .reshape((b, t, self.cfg.vocab_size))?)
    }

    /// Right-pads `seqs` into a `(b, t_max)` id tensor, checking ids and lengths.
    pub(crate) fn pad_batch(&self, seqs: &[Vec<u32>]) -> Result<(Tensor, usize), ModelError> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        if seqs.is_empty() || t == 0 {
            return Err(ModelError::Input("empty batch or empty sequence".into()));
        }
        if t > self.rope.max_positions() {
            return Err(ModelError::Input(format!(
                "sequence of {t} tokens exceeds the model's {} positions",
                self.rope.max_positions()
            )));
        }
        let vocab = self.cfg.vocab_size as u32;
        let mut ids = vec![0u32; seqs.len() * t];
        for (row, s) in seqs.iter().enumerate() {
            if let Some(bad) = s.iter().find(|&&id| id >= vocab) {
                return Err(ModelError::Input(format!(
                    "token id {bad} is outside the vocabulary of {vocab}"
                )));
            }
            ids[row * t..row * t + s.len()].copy_from_slice(s);
        }
        Ok((Tensor::from_vec(ids, (seqs.len(), t), &self.device)?, t))
    }
}

/// What the layers of one forward pass share.
#[derive(Clone, Debug)]
pub(super) struct LayerEnv {
    b: usize,
    eps: f64,
    kvh: usize,
    hd: usize,
    rope: Arc<RopeTables>,
    positions: Arc<RopePositions>,
    ranges: KeyRanges,
    ops: OpsMode,
}

impl LayerEnv {
    /// One decoder layer on the hidden states `x (b·t, d)`; with a cache (and the layer's
    /// index in it), keys and values are appended to it and attention sees all it holds.
    pub(super) fn layer(
        &self,
        l: &Layer,
        x: &Tensor,
        cache: Option<(usize, &mut KvCache)>,
    ) -> candle_core::Result<Tensor> {
        let (b, kvh, hd, ops) = (self.b, self.kvh, self.hd, self.ops);
        let t = x.dim(0)? / b;
        let scale = 1.0 / (hd as f64).sqrt();
        let hn = ops::rms_norm(x, &l.in_norm, self.eps, ops)?;
        let q = linear(&hn, &l.q_w, Some(&l.q_b), ops)?; // (b·t, h·hd)
        let k = linear(&hn, &l.k_w, Some(&l.k_b), ops)?; // (b·t, kvh·hd)
        let v = linear(&hn, &l.v_w, Some(&l.v_b), ops)?; // (b·t, kvh·hd)
        let q = ops::rope_to_heads(&q, b, &self.rope, &self.positions, ops)?; // (b, h, t, hd)
        let k = ops::rope_to_heads(&k, b, &self.rope, &self.positions, ops)?; // (b, kvh, t, hd)
        let o = match cache {
            Some((li, c)) => {
                let v = v.reshape((b, t, kvh, hd))?.transpose(1, 2)?.contiguous()?;
                let (k, v) = c.append(li, &k, &v)?;
                ops::attention_heads(&q, &k, &v, scale, &self.ranges.mask, ops)?
            }
            None => ops::attention(&q, &k, &v, scale, &self.ranges, ops)?,
        }; // (b·t, h·hd)
        let x = residual(x, &o, &l.o_w, ops)?;
        let hn = ops::rms_norm(&x, &l.post_norm, self.eps, ops)?;
        let a = ops::swiglu(
            &linear(&hn, &l.gate_w, None, ops)?,
            &linear(&hn, &l.up_w, None, ops)?,
            ops,
        )?;
        residual(&x, &a, &l.down_w, ops)
    }
}

/// Positions 0..t for each of `b` rows.
pub(crate) fn train_positions(b: usize, t: usize) -> Vec<u32> {
    (0..b).flat_map(|_| 0..t as u32).collect()
}

/// `r + x · wᵀ`: bf16 tiles where sampling allows them ([`ops::amx`]), the decoding kernel
/// for a few rows, else [`ops::linear_residual`].
fn residual(r: &Tensor, x: &Tensor, w: &Tensor, mode: OpsMode) -> candle_core::Result<Tensor> {
    if ops::amx::applies(x, w) {
        return ops::add_to_product(&ops::amx::linear_nt(x, w)?, r);
    }
    if ops::small_matmul::applies(x, w) {
        return ops::add_to_product(&ops::small_matmul::linear_nt(x, w)?, r);
    }
    ops::linear_residual(r, x, w, mode)
}

/// `x · wᵀ (+ bias)` for `x: (n, in)` and `w: (out, in)`: for the few rows of a decoding step
/// the in-place kernel of [`ops::small_matmul`], else [`ops::linear`] (one fused op with its
/// own backward on the CPU).
fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    mode: OpsMode,
) -> candle_core::Result<Tensor> {
    let bf16 = ops::amx::applies(x, w);
    if bf16 || ops::small_matmul::applies(x, w) {
        let y = if bf16 {
            ops::amx::linear_nt(x, w)?
        } else {
            ops::small_matmul::linear_nt(x, w)?
        };
        return match bias {
            Some(b) => ops::add_to_product(&y, b),
            None => Ok(y),
        };
    }
    ops::linear(x, w, bias, mode)
}
