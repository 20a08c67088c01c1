//! Shared helpers of the engine tests: the sample repository, its artifact sets, local
//! sandboxes, and scripted policies that speak the real tool protocol.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use selfplay_trainer::engine::artifacts::Artifacts;
use selfplay_trainer::engine::local::{Isolation, LocalProvider, LocalProviderConfig};
use selfplay_trainer::engine::policy::{
    FinishReason, Generation, Policy, PolicyError, SamplingParams, TokenCodec,
};
use selfplay_trainer::engine::sample::materialize_sample_repo;

pub fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets")
}

/// A file of `trainer/assets/` as text.
pub fn read_asset(p: &str) -> String {
    std::fs::read_to_string(assets().join(p)).expect("asset")
}

pub fn artifact_set(name: &str) -> Artifacts {
    Artifacts::from_dir(&assets().join("artifacts").join(name)).expect("artifact set")
}

/// A fresh copy of the sample repository with its git history.
pub fn sample_repo() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = dir.path().join("tinytext");
    materialize_sample_repo(&repo).expect("materialize the sample repository");
    (dir, repo)
}

pub fn provider(repo: &Path) -> LocalProvider {
    provider_with(repo, Isolation::Auto)
}

pub fn provider_with(repo: &Path, isolation: Isolation) -> LocalProvider {
    let mut cfg = LocalProviderConfig::single(repo);
    cfg.isolation = isolation;
    LocalProvider::new(cfg).expect(
        "local provider (is the sidecar built? `cargo build -p sandbox-sidecar`, or set SELFPLAY_SIDECAR_BIN)",
    )
}

/// Bytes are their own ids; 256 is the end of text (as the tiny model's codec).
pub struct ByteCodec;

impl TokenCodec for ByteCodec {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }
    fn decode(&self, ids: &[u32]) -> String {
        let b: Vec<u8> = ids.iter().filter_map(|&i| u8::try_from(i).ok()).collect();
        String::from_utf8_lossy(&b).into_owned()
    }
}

/// A policy that writes scripted turns. Each script is chosen by a key that its episode's
/// context contains (e.g. a phrase of the role's prompt); each call takes the next turn.
/// Every context it was given is kept, to check what the engine sent.
pub struct ScriptedPolicy {
    codec: ByteCodec,
    scripts: Mutex<Vec<(String, VecDeque<String>)>>,
    pub contexts: Mutex<Vec<Vec<u32>>>,
    pub params: Mutex<Vec<SamplingParams>>,
}

impl ScriptedPolicy {
    pub fn new(scripts: Vec<(&str, Vec<String>)>) -> Self {
        Self {
            codec: ByteCodec,
            scripts: Mutex::new(
                scripts
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.into()))
                    .collect(),
            ),
            contexts: Mutex::new(Vec::new()),
            params: Mutex::new(Vec::new()),
        }
    }

    /// One script for every context.
    pub fn single(turns: Vec<String>) -> Self {
        Self::new(vec![("", turns)])
    }

    /// Deterministic stand-in log-probs, distinct per position.
    pub fn logprob(i: usize) -> f32 {
        -0.05 - (i % 7) as f32 * 0.1
    }
}

impl Policy for ScriptedPolicy {
    fn codec(&self) -> &dyn TokenCodec {
        &self.codec
    }

    fn generate(
        &self,
        contexts: &[Vec<u32>],
        params: &SamplingParams,
    ) -> Result<Vec<Generation>, PolicyError> {
        let mut scripts = self.scripts.lock().unwrap();
        self.params.lock().unwrap().push(params.clone());
        let mut out = Vec::new();
        for ctx in contexts {
            self.contexts.lock().unwrap().push(ctx.clone());
            let text = self.codec.decode(ctx);
            let Some((_, turns)) = scripts.iter_mut().find(|(k, _)| text.contains(k.as_str()))
            else {
                return Err(PolicyError::Failed("no script for this context".into()));
            };
            let turn = turns.pop_front().unwrap_or_else(|| "<submit/>".to_string());
            let mut tokens = self.codec.encode(&turn);
            let finish = if tokens.len() > params.max_new_tokens {
                tokens.truncate(params.max_new_tokens);
                FinishReason::Length
            } else {
                FinishReason::Stop
            };
            let logprobs = (0..tokens.len()).map(Self::logprob).collect();
            out.push(Generation {
                tokens,
                logprobs,
                finish,
            });
        }
        Ok(out)
    }

    fn version(&self) -> u64 {
        7
    }
}

/// A bash tool call.
pub fn bash(cmd: &str) -> String {
    format!("Let me run a command.\n<bash>\n{cmd}\n</bash>")
}

/// The fix of the sample's valid bug as a solver writes it: `slug.py` back as it was, and
/// the package's exports restored with two edits.
pub fn sample_fix_calls() -> Vec<String> {
    let slug = read_asset("sample-repo/tinytext/slug.py");
    vec![
        create("tinytext/slug.py", &slug),
        edit(
            "tinytext/__init__.py",
            "from .slug import slugify\n",
            "from .slug import slugify\nfrom .stats import word_count, top_words\nfrom .case import snake_case, camel_case\n",
        ),
        edit(
            "tinytext/__init__.py",
            "__all__ = [\"wrap\", \"fill\", \"slugify\"]\n",
            "__all__ = [\"wrap\", \"fill\", \"slugify\", \"word_count\", \"top_words\", \"snake_case\", \"camel_case\"]\n",
        ),
    ]
}

/// A create tool call.
pub fn create(path: &str, content: &str) -> String {
    format!("<create path=\"{path}\">\n{content}</create>")
}

/// An edit tool call.
pub fn edit(path: &str, search: &str, replace: &str) -> String {
    format!(
        "<edit path=\"{path}\">\n<<<<<<< SEARCH\n{search}=======\n{replace}>>>>>>> REPLACE\n</edit>"
    )
}
