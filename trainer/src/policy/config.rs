//! The Qwen2 `config.json`, as written by transformers 4.x (`rope_theta`, `torch_dtype`) and
//! 5.x (`rope_parameters`, `dtype`).

use serde_json::{Value, json};

use super::ModelError;

/// The architecture settings the model needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The file as read, written back (with the dtype updated) into checkpoints so that
    /// fields this crate does not use survive a round trip.
    pub raw: Value,
}

fn bad(msg: impl Into<String>) -> ModelError {
    ModelError::Config(msg.into())
}

fn usize_field(v: &Value, key: &str) -> Result<Option<usize>, ModelError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| Some(n as usize))
            .ok_or_else(|| bad(format!("`{key}` must be a positive integer, got {x}"))),
    }
}

fn required(v: &Value, key: &str) -> Result<usize, ModelError> {
    usize_field(v, key)?.ok_or_else(|| bad(format!("`{key}` is missing")))
}

fn token_ids(v: &Value, key: &str) -> Result<Vec<u32>, ModelError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Number(n)) => Ok(vec![
            n.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad(format!("`{key}`: bad id {n}")))?,
        ]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| bad(format!("`{key}`: bad id {x}")))
            })
            .collect(),
        Some(x) => Err(bad(format!(
            "`{key}` must be an id or a list of ids, got {x}"
        ))),
    }
}

impl Qwen2Config {
    /// Parses a `config.json`.
    pub fn from_json(raw: Value) -> Result<Self, ModelError> {
        let v = &raw;
        if !v.is_object() {
            return Err(bad("config.json is not a JSON object"));
        }
        if let Some(mt) = v.get("model_type").and_then(Value::as_str)
            && mt != "qwen2"
        {
            return Err(bad(format!(
                "model_type `{mt}` is not supported (only qwen2)"
            )));
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(bad(format!(
                "hidden_act `{act}` is not supported (only silu)"
            )));
        }
        if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            return Err(bad("sliding-window attention is not supported"));
        }
        if let Some(types) = v.get("layer_types").and_then(Value::as_array)
            && types.iter().any(|t| t.as_str() != Some("full_attention"))
        {
            return Err(bad("only full_attention layers are supported"));
        }
        // transformers 5.x: rope_parameters {rope_type, rope_theta}; 4.x: rope_theta + rope_scaling.
        let rope_params = v.get("rope_parameters").filter(|p| !p.is_null());
        let scaling = v.get("rope_scaling").filter(|p| !p.is_null());
        for p in [rope_params, scaling].into_iter().flatten() {
            let kind = p
                .get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind != "default" {
                return Err(bad(format!(
                    "rope type `{kind}` is not supported (only default)"
                )));
            }
        }
        let rope_theta = rope_params
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .map(|t| {
                t.as_f64()
                    .filter(|t| *t > 0.0)
                    .ok_or_else(|| bad(format!("bad rope_theta {t}")))
            })
            .transpose()?
            .unwrap_or(10000.0);
        let hidden_size = required(v, "hidden_size")?;
        let num_attention_heads = required(v, "num_attention_heads")?;
        let num_key_value_heads =
            usize_field(v, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim = usize_field(v, "head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(bad(format!(
                "head_dim {head_dim} must be even and positive"
            )));
        }
        let rms_norm_eps = match v.get("rms_norm_eps") {
            None | Some(Value::Null) => 1e-6,
            Some(x) => x
                .as_f64()
                .filter(|e| *e > 0.0)
                .ok_or_else(|| bad(format!("bad rms_norm_eps {x}")))?,
        };
        let pad = token_ids(v, "pad_token_id")?;
        let bos = token_ids(v, "bos_token_id")?;
        Ok(Self {
            vocab_size: required(v, "vocab_size")?,
            hidden_size,
            intermediate_size: required(v, "intermediate_size")?,
            num_hidden_layers: required(v, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: usize_field(v, "max_position_embeddings")?.unwrap_or(32768),
            rms_norm_eps,
            rope_theta,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: bos.first().copied(),
            eos_token_ids: token_ids(v, "eos_token_id")?,
            pad_token_id: pad.first().copied(),
            raw,
        })
    }

    /// The config of a tiny model with the byte-level vocabulary (`ByteCodec`).
    pub fn tiny(hidden_size: usize, num_layers: usize) -> Result<Self, ModelError> {
        if hidden_size < 8 || !hidden_size.is_multiple_of(8) {
            return Err(bad(format!(
                "tiny model: hidden size {hidden_size} must be a multiple of 8, at least 8"
            )));
        }
        // Heads of 16 dims (8 for the smallest), two query heads per key/value head.
        let head_dim = if hidden_size >= 32 { 16 } else { 8 };
        let heads = hidden_size / head_dim;
        let kv = if heads.is_multiple_of(2) {
            heads / 2
        } else {
            heads
        };
        let vocab = super::codec::ByteCodec::VOCAB_SIZE;
        let eos = super::codec::ByteCodec::EOS;
        let raw = json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": vocab,
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 3,
            "num_hidden_layers": num_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": 65536,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "tie_word_embeddings": true,
            "use_sliding_window": false,
            "bos_token_id": eos,
            "eos_token_id": eos,
            "pad_token_id": eos,
            "selfplay_tokenizer": "bytes",
        });
        Self::from_json(raw)
    }

    /// Whether the model uses the byte-level vocabulary instead of a `tokenizer.json`.
    pub fn byte_tokenizer(&self) -> bool {
        self.raw.get("selfplay_tokenizer").and_then(Value::as_str) == Some("bytes")
    }

    /// The JSON to write next to saved weights, with the dtype fields set to `dtype`
    /// (`"float32"` or `"bfloat16"`); both the 4.x and 5.x names are written.
    pub fn to_json(&self, dtype: &str) -> Value {
        let mut raw = self.raw.clone();
        if let Some(obj) = raw.as_object_mut() {
            obj.insert("torch_dtype".into(), json!(dtype));
            obj.insert("dtype".into(), json!(dtype));
            obj.insert("rope_theta".into(), json!(self.rope_theta));
        }
        raw
    }

    /// Parameter count of the decoder (embeddings included once when tied).
    pub fn num_parameters(&self) -> usize {
        let (d, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let layer = d * q + q + 2 * (d * kv + kv) + q * d + 3 * d * i + 2 * d;
        let emb = self.vocab_size * d;
        emb * if self.tie_word_embeddings { 1 } else { 2 } + self.num_hidden_layers * layer + d
    }
}
