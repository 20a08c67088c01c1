//! Where each attempt's policy comes from, and the sandboxes of an instance with a
//! `base_commit`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

use crate::engine::error::{InfraError, InfraKind, OpError};
use crate::engine::ops::Ops;
use crate::engine::policy::{Generation, Policy, PolicyError, SamplingParams, TokenCodec};
use crate::engine::sandbox::{Sandbox, SandboxProvider};
use crate::policy::{CandlePolicy, Rng};

/// Hands each attempt the policy it samples from.
pub trait AttemptPolicy: Send + Sync {
    /// The policy of the attempt whose sampling seed is `seed`.
    fn for_attempt(&self, seed: u64) -> Arc<dyn Policy>;
}

/// A model whose every attempt draws from its own generator, seeded per attempt: results do
/// not depend on the order or concurrency of attempts.
pub struct SeededAttempts(pub Arc<CandlePolicy>);

impl AttemptPolicy for SeededAttempts {
    fn for_attempt(&self, seed: u64) -> Arc<dyn Policy> {
        Arc::new(SeededPolicy {
            base: self.0.clone(),
            rng: Mutex::new(Rng::seed(seed)),
        })
    }
}

/// One policy for every attempt, seeds ignored (scripted and deterministic policies).
pub struct SharedAttempts(pub Arc<dyn Policy>);

impl AttemptPolicy for SharedAttempts {
    fn for_attempt(&self, _seed: u64) -> Arc<dyn Policy> {
        self.0.clone()
    }
}

struct SeededPolicy {
    base: Arc<CandlePolicy>,
    rng: Mutex<Rng>,
}

impl Policy for SeededPolicy {
    fn codec(&self) -> &dyn TokenCodec {
        self.base.codec()
    }

    fn generate(
        &self,
        contexts: &[Vec<u32>],
        params: &SamplingParams,
    ) -> Result<Vec<Generation>, PolicyError> {
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        self.base.generate_with_rng(contexts, params, &mut rng)
    }

    fn version(&self) -> u64 {
        self.base.version()
    }
}

/// The seed of attempt `attempt` of instance `id`: from the evaluation's seed and the
/// instance's id (not its position), so adding or reordering instances changes nobody's draws.
pub fn attempt_seed(seed: u64, id: &str, attempt: usize) -> u64 {
    // FNV-1a over the id, then SplitMix64's finaliser over the mix.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = seed ^ h.rotate_left(17) ^ (attempt as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Sandboxes of `inner` with the repository checked out at `commit` (an instance's
/// `base_commit` on a local repository with history). The solver's workspace then drops the
/// history, as in training.
pub struct AtCommit<'a, P: SandboxProvider + ?Sized> {
    pub inner: &'a P,
    pub commit: Option<String>,
}

impl<P: SandboxProvider + ?Sized> SandboxProvider for AtCommit<'_, P> {
    fn acquire<'a>(&'a self, pool: &'a str) -> BoxFuture<'a, Result<Sandbox, InfraError>> {
        Box::pin(async move {
            let sandbox = self.inner.acquire(pool).await?;
            let Some(commit) = &self.commit else {
                return Ok(sandbox);
            };
            // A commit id is passed as one quoted word; anything else is refused up front.
            if !commit
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' || c == '/')
            {
                let _ = sandbox.release().await;
                return Err(InfraError::new(
                    InfraKind::Setup,
                    format!("base_commit {commit:?} is not a commit name"),
                ));
            }
            let script = format!("git checkout -q --force --detach '{commit}' && git clean -qfdx");
            let r = Ops::new(sandbox.client())
                .exec_shell(&script, Duration::from_secs(120))
                .await;
            let failed = match r {
                Ok(r) if r.exit_code == 0 => None,
                Ok(r) => Some(String::from_utf8_lossy(&r.stderr).trim().to_string()),
                Err(OpError::Refused(m)) => Some(m),
                Err(OpError::Infra(i)) => Some(i.to_string()),
            };
            match failed {
                None => Ok(sandbox),
                Some(why) => {
                    let _ = sandbox.release().await;
                    Err(InfraError::new(
                        InfraKind::Setup,
                        format!("checking out base_commit {commit}: {why}"),
                    ))
                }
            }
        })
    }

    fn pools(&self) -> Vec<String> {
        self.inner.pools()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_differ_by_instance_attempt_and_seed_and_repeat() {
        let a = attempt_seed(0, "x", 0);
        assert_eq!(a, attempt_seed(0, "x", 0));
        assert_ne!(a, attempt_seed(0, "x", 1));
        assert_ne!(a, attempt_seed(0, "y", 0));
        assert_ne!(a, attempt_seed(1, "x", 0));
    }
}
