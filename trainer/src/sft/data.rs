//! Fine-tuning data: JSONL files whose lines are chat records (`{"messages": […]}`) or
//! episode records of a `trainer local` run (`out/<run>/episodes/step-*/episodes.jsonl`),
//! the format detected per line. Every example is checked against the model before
//! training starts, and a line that cannot be trained on is an error naming it.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::engine::policy::TokenCodec;
use crate::engine::prompts::ChatMarkup;
use crate::engine::trajectory::TokenTranscript;

use super::SftError;
use super::chat::{parse_messages, render_conversation};

/// One sequence to fine-tune on.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    /// Per token: the loss is taken on it. The first token never is.
    pub mask: Vec<bool>,
    /// `FILE:LINE` it came from.
    pub source: String,
}

impl Example {
    pub fn policy_tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }
}

/// What the model accepts and which episodes to take.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Only solver episodes that solved their bug (rejection sampling); otherwise every
    /// episode record. Chat records are always taken.
    pub solved_only: bool,
    /// Sequences longer than this are left out (counted); at most `context`.
    pub max_tokens: usize,
    /// The model's context (`max_position_embeddings`): a longer sequence is an error.
    pub context: usize,
    pub vocab_size: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub examples: Vec<Example>,
    pub files: Vec<PathBuf>,
    pub chat_records: usize,
    pub episode_records: usize,
    /// Episode records left out by `solved_only`.
    pub skipped_episodes: usize,
    /// Sequences longer than `max_tokens`, left out.
    pub skipped_long: usize,
}

impl Dataset {
    pub fn policy_tokens(&self) -> usize {
        self.examples.iter().map(Example::policy_tokens).sum()
    }
}

/// Reads `path`: a JSONL file, or a directory searched (recursively) for `episodes.jsonl`
/// files, as a run's output directory holds them (under its `episodes/`, where it has one).
pub fn load_dataset(
    path: &Path,
    codec: &dyn TokenCodec,
    markup: &ChatMarkup,
    opts: &LoadOptions,
) -> Result<Dataset, SftError> {
    let files = if path.is_dir() {
        // A run's directory also holds its repositories and sandboxes: only its episodes.
        let root = path.join("episodes");
        let root = if root.is_dir() {
            root
        } else {
            path.to_path_buf()
        };
        let mut found = Vec::new();
        find_episode_files(&root, &mut found)?;
        found.sort();
        if found.is_empty() {
            return Err(SftError::Data(format!(
                "no episodes.jsonl under {}",
                path.display()
            )));
        }
        found
    } else {
        vec![path.to_path_buf()]
    };
    let mut data = Dataset::default();
    for f in &files {
        load_file(f, codec, markup, opts, &mut data)?;
    }
    data.files = files;
    if data.examples.is_empty() {
        return Err(SftError::Data(format!(
            "{}: no example to train on ({} episode records left out as unsolved, {} sequences longer than {} tokens)",
            path.display(),
            data.skipped_episodes,
            data.skipped_long,
            opts.max_tokens
        )));
    }
    Ok(data)
}

fn find_episode_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), SftError> {
    let io = |e| SftError::Io {
        path: dir.to_path_buf(),
        source: e,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        // Symbolic links are not followed: a link cycle would never end.
        let kind = entry.file_type().map_err(io)?;
        if kind.is_dir() {
            find_episode_files(&path, out)?;
        } else if kind.is_file() && path.file_name().is_some_and(|n| n == "episodes.jsonl") {
            out.push(path);
        }
    }
    Ok(())
}

fn load_file(
    path: &Path,
    codec: &dyn TokenCodec,
    markup: &ChatMarkup,
    opts: &LoadOptions,
    data: &mut Dataset,
) -> Result<(), SftError> {
    let text = std::fs::read_to_string(path).map_err(|source| SftError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_no = i + 1;
        let bad = |message: String| SftError::Line {
            path: path.to_path_buf(),
            line: line_no,
            message,
        };
        let record: Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let (tokens, mask) = if record.get("messages").is_some() {
            data.chat_records += 1;
            let messages = parse_messages(&record).map_err(bad)?;
            render_conversation(&messages, codec, markup).map_err(bad)?
        } else if record.get("end_reason").is_some() && record.get("role").is_some() {
            data.episode_records += 1;
            if opts.solved_only && !solved_solver(&record) {
                data.skipped_episodes += 1;
                continue;
            }
            episode_tokens(&record).map_err(bad)?
        } else {
            return Err(bad(
                "neither a chat record ({\"messages\": [...]}) nor an episode record of `trainer local`".into(),
            ));
        };
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= opts.vocab_size) {
            return Err(bad(format!(
                "token id {id} is outside the model's vocabulary of {} (episodes from a model with another tokenizer?)",
                opts.vocab_size
            )));
        }
        if tokens.len() > opts.context {
            return Err(bad(format!(
                "{} tokens, longer than the model's context of {}",
                tokens.len(),
                opts.context
            )));
        }
        if tokens.len() > opts.max_tokens {
            data.skipped_long += 1;
            continue;
        }
        if mask.first() == Some(&true) || !mask.contains(&true) {
            return Err(bad(
                "no policy token with a prefix to predict it from".into()
            ));
        }
        data.examples.push(Example {
            tokens,
            mask,
            source: format!("{}:{line_no}", path.display()),
        });
    }
    Ok(())
}

fn solved_solver(record: &Value) -> bool {
    record.get("role").and_then(Value::as_str) == Some("solver")
        && record
            .get("solver")
            .and_then(|s| s.get("solved"))
            .and_then(Value::as_bool)
            == Some(true)
}

fn episode_tokens(record: &Value) -> Result<(Vec<u32>, Vec<bool>), String> {
    let raw = record.get("tokens").ok_or(
        "episode record without `tokens` (written by a trainer that did not record token transcripts)",
    )?;
    let t: TokenTranscript =
        serde_json::from_value(raw.clone()).map_err(|e| format!("episode `tokens`: {e}"))?;
    let mask = t.mask().map_err(|e| format!("episode `tokens`: {e}"))?;
    Ok((t.tokens, mask))
}
