//! `trainer cluster`: the same loop as `trainer local`, inside the trainer pod the operator
//! creates. Sandboxes come from the operator's broker (no RBAC on the API server), progress
//! goes to the run's status through the broker, checkpoints are registered as `Checkpoint`s.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sandbox_sidecar::SidecarClient;
use selfplay_broker::BrokerClient;
use selfplay_crds::ProgressSnapshot;

use crate::engine::error::{InfraError, InfraKind};
use crate::engine::policy::Policy;
use crate::engine::prompts::ChatMarkup;
use crate::engine::roles::EngineSettings;
use crate::engine::sandbox::{Lease, Sandbox, SandboxProvider};
use crate::grpo::{GrpoSettings, GrpoTrainer};
use crate::policy::CandlePolicy;

use super::device::devices;
use super::driver::{LoopState, RunDirs, TrainLoop, read_loop_state};
use super::heldout::HeldOutPlan;
use super::local::model_dtype;
use super::metrics::TrainerMetrics;
use super::report::{
    CheckpointRecord, CheckpointSink, LocalCheckpoints, ProgressReporter, ReportError,
};
use super::step::Quiet;
use crate::eval::EvalPool;

/// How long an acquire waits for a Ready sandbox before it counts as an infrastructure error.
const ACQUIRE_WAIT: Duration = Duration::from_secs(300);

/// Sandboxes handed out by the operator's broker.
pub struct BrokerProvider {
    broker: BrokerClient,
    pools: Vec<String>,
}

struct BrokerLease {
    broker: Option<BrokerClient>,
    sandbox: String,
}

impl Lease for BrokerLease {
    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<(), InfraError>> {
        let broker = self.broker.take();
        let sandbox = std::mem::take(&mut self.sandbox);
        Box::pin(async move {
            match broker {
                Some(b) => b.release(&sandbox).await.map_err(|e| {
                    InfraError::new(InfraKind::Acquire, format!("release {sandbox}: {e}"))
                }),
                None => Ok(()),
            }
        })
    }
}

impl Drop for BrokerLease {
    fn drop(&mut self) {
        // Use-and-destroy even when an episode is abandoned: release in the background.
        if let (Some(b), Ok(rt)) = (self.broker.take(), tokio::runtime::Handle::try_current()) {
            let sandbox = std::mem::take(&mut self.sandbox);
            rt.spawn(async move {
                if let Err(e) = b.release(&sandbox).await {
                    tracing::warn!(%sandbox, error = %e, "release of an abandoned sandbox failed");
                }
            });
        }
    }
}

impl SandboxProvider for BrokerProvider {
    fn acquire<'a>(&'a self, pool: &'a str) -> BoxFuture<'a, Result<Sandbox, InfraError>> {
        Box::pin(async move {
            let lease = self.broker.acquire(pool, ACQUIRE_WAIT).await.map_err(|e| {
                InfraError::new(InfraKind::Acquire, format!("broker acquire on {pool}: {e}"))
            })?;
            let guard = BrokerLease {
                broker: Some(self.broker.clone()),
                sandbox: lease.sandbox.clone(),
            };
            let client = SidecarClient::connect(lease.address.clone(), &lease.token)
                .await
                .map_err(|e| {
                    InfraError::new(
                        InfraKind::Sidecar,
                        format!("sandbox {}: {e}", lease.sandbox),
                    )
                })?;
            Ok(Sandbox::new(
                lease.sandbox.clone(),
                pool,
                client,
                None,
                Box::new(guard),
            ))
        })
    }

    fn pools(&self) -> Vec<String> {
        self.pools.clone()
    }
}

/// The injector episodes' wheel over the run's pools and their environments (as the
/// broker lists them): every pool keeps its weight's share, spread evenly over its
/// environments (keys `POOL/ENVIRONMENT`), and pools are interleaved so that consecutive
/// episodes visit different pools. A pool without environments is its bare name; without
/// any environments the pools are returned as they are.
pub fn environment_wheel(
    pools: &[(String, u32)],
    environments: &[Vec<String>],
) -> Vec<(String, u32)> {
    if environments.iter().all(Vec::is_empty) {
        return pools.to_vec();
    }
    let most = environments
        .iter()
        .map(|e| e.len().max(1))
        .max()
        .unwrap_or(1);
    // Each pool's slots, its environments in turn: weight × the most environments of any
    // pool, so that a pool of 500 images and one of a single repository keep their weights.
    let mut lanes: Vec<(i64, Vec<String>)> = pools
        .iter()
        .enumerate()
        .map(|(i, (pool, w))| {
            let envs = environments.get(i).filter(|e| !e.is_empty());
            let slots = (*w).max(1) as usize * most;
            let keys = (0..slots)
                .map(|k| match envs {
                    Some(e) => selfplay_crds::environments::environment_key(pool, &e[k % e.len()]),
                    None => pool.clone(),
                })
                .collect();
            (0, keys)
        })
        .collect();
    let total: i64 = lanes.iter().map(|l| l.1.len() as i64).sum();
    let sizes: Vec<i64> = lanes.iter().map(|l| l.1.len() as i64).collect();
    let mut next = vec![0usize; lanes.len()];
    let mut wheel = Vec::with_capacity(total as usize);
    // Smooth weighted round robin (as nginx balances upstreams): no pool's slots bunch up.
    for _ in 0..total {
        for (lane, size) in lanes.iter_mut().zip(&sizes) {
            lane.0 += size;
        }
        let Some(best) = (0..lanes.len()).max_by_key(|&i| (lanes[i].0, std::cmp::Reverse(i)))
        else {
            break;
        };
        lanes[best].0 -= total;
        wheel.push((lanes[best].1[next[best]].clone(), 1));
        next[best] += 1;
    }
    wheel
}

/// Progress to the run's status, through the broker.
pub struct BrokerReporter(BrokerClient);

impl ProgressReporter for BrokerReporter {
    async fn report(&self, snapshot: &ProgressSnapshot) -> Result<(), ReportError> {
        // A missed report is not worth a failed step: the next one carries the same fields.
        if let Err(e) = self.0.report_progress(snapshot).await {
            tracing::warn!(error = %e, "progress report to the broker failed");
        }
        Ok(())
    }
}

/// Checkpoints kept on the run's volume (keep-last-K on disk) and registered with the broker,
/// which creates the `Checkpoint` objects (and deletes those past keep-last-K).
pub struct BrokerCheckpoints {
    broker: BrokerClient,
    local: LocalCheckpoints,
}

impl CheckpointSink for BrokerCheckpoints {
    async fn register(&self, record: &CheckpointRecord) -> Result<(), ReportError> {
        self.local.register(record).await?;
        self.broker
            .register_checkpoint(
                record.step as i64,
                record.policy_version as i64,
                &record.dir.to_string_lossy(),
                record.size_bytes as i64,
                Some(&record.metrics),
            )
            .await
            .map(|name| tracing::info!(checkpoint = %name, "registered"))
            .map_err(|e| ReportError::Remote(e.to_string()))
    }
}

/// Options of `trainer cluster` (set by the operator's trainer pod).
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub run_file: PathBuf,
    pub checkpoint_dir: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    pub model_dir: Option<PathBuf>,
    pub resume_from: Option<PathBuf>,
}

/// Runs the run to its `totalSteps`; returns the steps completed.
pub async fn run_cluster(opts: ClusterOptions, broker: BrokerClient) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(&opts.run_file)?;
    let run = selfplay_crds::validate::parse_run_yaml(&text)?;
    let name = run.metadata.name.clone().unwrap_or_else(|| "run".into());
    let mut spec = run.spec.clone();
    if let Some(dir) = &opts.model_dir {
        spec.model.path = Some(dir.to_string_lossy().into_owned());
    }
    if spec.trainer.nodes > 1 {
        tracing::warn!(
            nodes = spec.trainer.nodes,
            "multi-node training is not supported yet: this pod trains alone"
        );
    }
    let metrics = TrainerMetrics::new(&name)?;
    if let Some(addr) = opts.metrics_listen {
        super::metrics::serve(addr, metrics.clone()).await?;
    }
    let dirs = RunDirs {
        out: opts.checkpoint_dir.clone(),
        checkpoints: opts.checkpoint_dir.clone(),
        episodes: opts.checkpoint_dir.join("episodes"),
    };
    std::fs::create_dir_all(&dirs.episodes)?;

    let settings = GrpoSettings::try_from(&spec.training).map_err(|e| anyhow::anyhow!("{e}"))?;
    let devices = devices(spec.trainer.gpus)?;
    let device = &devices[0];
    let (grpo, state) = match &opts.resume_from {
        Some(dir) => resume(dir, &spec, settings, device)?,
        None => {
            let policy = CandlePolicy::from_source(&spec.model, device, spec.training.seed)?;
            (
                GrpoTrainer::new(Arc::new(policy), settings)?,
                LoopState::default(),
            )
        }
    };
    // One data-parallel worker per GPU of the pod (`grpo::data_parallel`).
    let grpo = grpo.with_data_parallel(&devices)?;
    grpo.policy().sample_in_spec_precision(spec.model.dtype);
    let markup = if grpo.policy().chat_markup() {
        ChatMarkup::chatml()
    } else {
        ChatMarkup::plain()
    };
    let engine = EngineSettings::from_settings(&spec.self_play, markup)
        .map_err(|e| anyhow::anyhow!("spec.selfPlay.prompts: {e}"))?;
    let pools: Vec<(String, u32)> = spec
        .pools
        .iter()
        .map(|p| (p.name.clone(), p.weight.max(1) as u32))
        .collect();
    // A pool's environments are the broker's to know (they may come from a ConfigMap): asked
    // once, at start; a bug's solvers and grading go to its environment by its key.
    let mut environments = Vec::with_capacity(pools.len());
    for (pool, _) in &pools {
        let names = broker
            .list_environments(pool)
            .await
            .map_err(|e| anyhow::anyhow!("listing the environments of pool {pool}: {e}"))?;
        tracing::info!(%pool, environments = names.len(), "pool");
        environments.push(names);
    }
    let pools = environment_wheel(&pools, &environments);
    let mut keys: Vec<String> = pools.iter().map(|p| p.0.clone()).collect();
    keys.sort();
    keys.dedup();
    // The held-out set, mounted from its ConfigMap by the operator; its pool's environments,
    // like the training pools', are the broker's to know.
    let heldout = match &spec.evaluation {
        None => None,
        Some(e) => {
            let file = std::path::Path::new(selfplay_crds::run::EVALUATION_TASKS_FILE);
            let instances = crate::eval::load_instances(file)
                .map_err(|err| anyhow::anyhow!("spec.evaluation.tasks: {err}"))?;
            let envs = broker.list_environments(&e.pool).await.map_err(|err| {
                anyhow::anyhow!(
                    "listing the environments of evaluation pool {}: {err}",
                    e.pool
                )
            })?;
            let pool = if envs.is_empty() {
                EvalPool::Repository {
                    name: &e.pool,
                    history: false,
                }
            } else {
                EvalPool::Environments { name: &e.pool }
            };
            let plan = HeldOutPlan::new(e, &instances, pool, engine.clone(), spec.training.seed)
                .map_err(|err| anyhow::anyhow!("spec.evaluation.tasks: {err}"))?;
            tracing::info!(
                pool = %e.pool,
                tasks = plan.tasks.len(),
                every_steps = plan.every_steps,
                "held-out evaluation"
            );
            keys.extend(plan.tasks.iter().map(|t| t.pool.clone()));
            keys.sort();
            keys.dedup();
            Some(Arc::new(plan))
        }
    };
    let provider = Arc::new(BrokerProvider {
        broker: broker.clone(),
        pools: keys,
    });
    let keep = spec.checkpoint.keep_last.max(1) as usize;
    let total = spec.training.total_steps.max(1) as u64;
    let mut lp = TrainLoop::new(
        spec,
        engine,
        provider,
        BrokerReporter(broker.clone()),
        BrokerCheckpoints {
            broker,
            local: LocalCheckpoints::new(dirs.checkpoints.clone(), keep),
        },
        metrics,
        dirs,
        pools,
        grpo,
        state,
    );
    lp.heldout = heldout;
    tracing::info!(run = %name, from = lp.step(), to = total, version = lp.grpo().map(|g| g.policy().version()).unwrap_or(0), "training");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    while lp.step() < total {
        tokio::select! {
            r = lp.run_step(&Quiet) => tracing::info!("{}", r?.line()),
            _ = term.recv() => {
                // Suspend or deletion: the step is abandoned; the last checkpoint stands.
                tracing::warn!(step = lp.step(), "SIGTERM: abandoning the current step");
                return Ok(lp.step());
            }
        }
    }
    Ok(lp.step())
}

fn resume(
    dir: &Path,
    spec: &selfplay_crds::run::SelfPlayRunSpec,
    settings: GrpoSettings,
    device: &candle_core::Device,
) -> anyhow::Result<(GrpoTrainer, LoopState)> {
    let grpo = GrpoTrainer::resume(dir, settings, model_dtype(&spec.model, device), device)?;
    // A checkpoint written by this loop carries its loop state; one from elsewhere starts at its step.
    let state = read_loop_state(dir).unwrap_or_else(|_| LoopState {
        step: grpo.step(),
        ..LoopState::default()
    });
    tracing::info!(checkpoint = %dir.display(), step = state.step, "resuming");
    Ok((grpo, state))
}

#[cfg(test)]
mod tests {
    use super::environment_wheel;

    #[test]
    fn environments_share_their_pools_weight_and_pools_interleave() {
        let pools = vec![("swe".to_string(), 2), ("own".to_string(), 1)];
        let plain = environment_wheel(&pools, &[vec![], vec![]]);
        assert_eq!(plain, pools);

        let envs = vec![
            vec!["x".to_string(), "y".to_string(), "z".to_string()],
            vec![],
        ];
        let wheel = environment_wheel(&pools, &envs);
        let count = |k: &str| wheel.iter().filter(|(w, _)| w == k).count();
        assert_eq!(wheel.len(), 9);
        assert_eq!((count("swe/x"), count("swe/y"), count("swe/z")), (2, 2, 2));
        assert_eq!(count("own"), 3, "the pool's weight kept: 2:1");
        // Never three of one pool in a row.
        for w in wheel.windows(3) {
            assert!(!w.iter().all(|(k, _)| k.starts_with("swe/")), "{wheel:?}");
        }
    }
}
