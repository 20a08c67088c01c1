//! Token codecs: the byte-level vocabulary of tiny models and `tokenizer.json` through the
//! `tokenizers` crate.

use std::path::Path;

use crate::engine::policy::TokenCodec;

use super::ModelError;

/// Bytes are their own ids (0–255); id 256 is the end of text.
#[derive(Clone, Copy, Debug, Default)]
pub struct ByteCodec;

impl ByteCodec {
    pub const EOS: u32 = 256;
    pub const VOCAB_SIZE: usize = 257;
}

impl TokenCodec for ByteCodec {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().filter_map(|&i| u8::try_from(i).ok()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// A Hugging Face `tokenizer.json`. Text is encoded without added special tokens (prompts
/// carry their chat markup as text); decoding keeps special tokens visible.
pub struct HfCodec {
    tokenizer: tokenizers::Tokenizer,
}

impl std::fmt::Debug for HfCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfCodec")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .finish()
    }
}

impl HfCodec {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let tokenizer = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self { tokenizer })
    }

    /// Like [`TokenCodec::encode`], with the error instead of an empty result.
    pub fn try_encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The id of a special token such as `<|im_end|>`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }
}

impl TokenCodec for HfCodec {
    fn encode(&self, text: &str) -> Vec<u32> {
        self.try_encode(text).unwrap_or_else(|e| {
            tracing::error!(error = %e, "tokenizer failed to encode text");
            Vec::new()
        })
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, false).unwrap_or_else(|e| {
            tracing::error!(error = %e, "tokenizer failed to decode ids");
            String::new()
        })
    }
}
