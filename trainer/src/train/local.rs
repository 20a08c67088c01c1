//! `trainer local`: the whole loop on one machine — sandboxes are local sidecar processes,
//! progress goes to `DIR/status.json`, checkpoints to `DIR/checkpoints/step-N/`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use thiserror::Error;

use crate::engine::docker::{DockerProvider, DockerProviderConfig};
use crate::engine::error::InfraError;
use crate::engine::local::{Isolation, LocalProvider, LocalProviderConfig};
use crate::engine::machine::MachineProvider;
use crate::engine::policy::Policy;
use crate::engine::prompts::ChatMarkup;
use crate::engine::roles::EngineSettings;
use crate::grpo::{GrpoError, GrpoSettings, GrpoTrainer};
use crate::policy::{CandlePolicy, ModelError, compute_dtype};

use super::config::{self, ConfigError, LocalRun};
use super::device::{DeviceError, devices};
use super::driver::{
    LoopError, LoopState, PolicyView, RunDirs, StepSummary, TrainLoop, latest_checkpoint,
    read_loop_state,
};
use super::heldout::HeldOutPlan;
use super::metrics::TrainerMetrics;
use super::report::{LocalCheckpoints, ReportError, StatusFile};
use super::step::StepObserver;
use super::tensorboard::EventWriter;
use crate::eval::EvalPool;

#[derive(Debug, Error)]
pub enum LocalError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("bad training settings: {0}")]
    Settings(String),
    #[error("model: {0}")]
    Model(#[from] ModelError),
    #[error(transparent)]
    Grpo(#[from] GrpoError),
    #[error("sandboxes: {0}")]
    Sandbox(#[from] InfraError),
    #[error(transparent)]
    Loop(#[from] LoopError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(String),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("--resume: no complete checkpoint under {0}")]
    NothingToResume(PathBuf),
    #[error("spec.evaluation.tasks: {0}")]
    Evaluation(#[from] crate::eval::InstanceError),
    #[error("spec.selfPlay.prompts: {0}")]
    Prompts(#[from] crate::engine::prompts::PromptError),
}

/// Options of a local run.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// The run file; the built-in default when `None`.
    pub spec: Option<PathBuf>,
    /// Stop once this many steps are complete (overrides `spec.training.totalSteps`).
    pub steps: Option<u64>,
    pub out: Option<PathBuf>,
    pub resume: bool,
    pub metrics_listen: Option<SocketAddr>,
    pub isolation: Isolation,
    /// Draw progress bars (summary lines are printed either way).
    pub progress: bool,
}

/// How a local run ended.
#[derive(Debug)]
pub struct LocalOutcome {
    pub out: PathBuf,
    pub steps_done: u64,
    pub summaries: Vec<StepSummary>,
    pub interrupted: bool,
    pub metrics_addr: Option<SocketAddr>,
}

struct Bar(ProgressBar);

impl StepObserver for Bar {
    fn planned(&self, episodes: u64) {
        self.0.set_length(episodes);
    }
    fn episode_done(&self) {
        self.0.inc(1);
    }
}

/// Ctrl-C: the first finishes the current step, the second abandons it.
#[derive(Clone, Default)]
struct Interrupt(Arc<AtomicU8>, Arc<tokio::sync::Notify>);

impl Interrupt {
    fn listen(&self) {
        let me = self.clone();
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                let n = me.0.fetch_add(1, Ordering::SeqCst) + 1;
                if n == 1 {
                    eprintln!(
                        "\ninterrupted: finishing the current step (Ctrl-C again to abandon it)"
                    );
                } else {
                    eprintln!("\nabandoning the current step");
                    me.1.notify_waiters();
                }
            }
        });
    }
    fn count(&self) -> u8 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The sandbox provider of a local run: each directory pool's repository materialised under
/// `out/repos/`, its sandboxes under `out/sandboxes/`, none of them able to see `out`; image
/// pools as Docker containers.
pub fn local_provider(
    run: &LocalRun,
    out: &std::path::Path,
    isolation: Isolation,
) -> Result<MachineProvider, LocalError> {
    let mut repos = std::collections::BTreeMap::new();
    let mut images = std::collections::BTreeMap::new();
    // The evaluation's pool too, which need not be trained on.
    let mut all: Vec<&crate::train::config::LocalPool> = run.pools.iter().collect();
    if let Some(e) = &run.evaluation
        && !all.iter().any(|p| p.name == e.pool.name)
    {
        all.push(&e.pool);
    }
    for p in &all {
        match &p.repo_dir {
            Some(dir) => {
                repos.insert(
                    p.name.clone(),
                    repository(dir, &out.join("repos").join(&p.name))?,
                );
            }
            None if p.environments.is_empty() => {
                images.insert(p.name.clone(), p.spec.clone());
            }
            None => {
                for e in &p.environments {
                    images.insert(
                        selfplay_crds::environments::environment_key(&p.name, &e.name),
                        selfplay_crds::environments::spec_for(&p.spec, e),
                    );
                }
            }
        }
    }
    let local = if repos.is_empty() {
        None
    } else {
        Some(LocalProvider::new(LocalProviderConfig {
            pool_settings: all
                .iter()
                .filter(|p| repos.contains_key(&p.name))
                .map(|p| (p.name.clone(), p.sandbox_settings()))
                .collect(),
            pools: repos,
            sidecar: None,
            isolation,
            // Under the output directory, so a run leaves nothing elsewhere.
            work_dir: Some(out.join("sandboxes")),
            serve_args: Vec::new(),
            extra_path: Vec::new(),
            // Sandboxes never see the run's files (episodes, checkpoints, the repositories).
            hidden: vec![out.to_path_buf()],
        })?)
    };
    let docker = if images.is_empty() {
        None
    } else {
        let sidecar = find_static_sidecar().ok_or_else(|| {
            InfraError::new(
                crate::engine::error::InfraKind::Acquire,
                format!(
                    "pools {:?} run as Docker containers and need a statically linked sidecar: \
                     run scripts/build-static-sidecar.sh (or `make images`), or set {STATIC_SIDECAR_ENV}",
                    images.keys().collect::<Vec<_>>()
                ),
            )
        })?;
        Some(DockerProvider::new(DockerProviderConfig {
            run: run.name(),
            pools: images,
            sidecar,
            work_dir: out.join("sandboxes"),
            docker: std::env::var("DOCKER").unwrap_or_else(|_| "docker".to_string()),
            pids_limit: crate::engine::local::SandboxLimits::default().max_processes,
        })?)
    };
    Ok(MachineProvider { local, docker })
}

/// Environment variable naming a statically linked sidecar for Docker sandboxes.
pub const STATIC_SIDECAR_ENV: &str = "SELFPLAY_STATIC_SIDECAR";

/// A statically linked sidecar for Docker sandboxes: `$SELFPLAY_STATIC_SIDECAR`; this
/// executable when it is static (the trainer's image); else what
/// `scripts/build-static-sidecar.sh` or `make images` built in the `target/` directory this
/// executable lives in.
pub fn find_static_sidecar() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(STATIC_SIDECAR_ENV) {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    if crate::engine::docker::is_static_elf(&exe) {
        return Some(exe);
    }
    let triple = "x86_64-unknown-linux-gnu";
    for target in exe.ancestors().skip(1).take(3) {
        for rel in [
            format!("static/{triple}/debug/sandbox-sidecar"),
            format!("static/{triple}/release/sandbox-sidecar"),
            format!("images/{triple}/release/sandbox-sidecar"),
        ] {
            let p = target.join(rel);
            if crate::engine::docker::is_static_elf(&p) {
                return Some(p);
            }
        }
    }
    None
}

/// Runs a local training run. `view` wraps the policy used for sampling (tests use a
/// scripted policy that keeps the model's log-probs).
pub async fn run_local(
    opts: LocalOptions,
    view: Option<PolicyView>,
) -> Result<LocalOutcome, LocalError> {
    let run = config::load(opts.spec.as_deref())?;
    for w in &run.warnings {
        eprintln!("warning: {w}");
    }
    let name = run.name();
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("out").join(&name));
    let dirs = RunDirs::new(&out);
    for d in [&dirs.out, &dirs.checkpoints, &dirs.episodes] {
        std::fs::create_dir_all(d).map_err(|source| LocalError::Io {
            path: d.clone(),
            source,
        })?;
    }
    let metrics = TrainerMetrics::new(&name).map_err(|e| LocalError::Metrics(e.to_string()))?;
    let metrics_addr = match opts.metrics_listen {
        Some(addr) => {
            let bound = super::metrics::serve(addr, metrics.clone())
                .await
                .map_err(|e| LocalError::Metrics(format!("cannot listen on {addr}: {e}")))?;
            eprintln!("metrics: http://{bound}/metrics");
            Some(bound)
        }
        None => None,
    };

    let (grpo, state) = build_trainer(&run, &dirs, opts.resume)?;
    let provider = Arc::new(local_provider(&run, &dirs.out, opts.isolation)?);
    let sandboxes = provider.describe();
    let sp = &run.run.spec.self_play;
    let engine = engine_settings(&run, grpo.policy().chat_markup())?;
    let pools = run
        .pools
        .iter()
        .map(|p| (p.name.clone(), p.weight))
        .collect();
    let keep = run.run.spec.checkpoint.keep_last.max(1) as usize;
    let target = opts
        .steps
        .unwrap_or(run.run.spec.training.total_steps.max(1) as u64);
    let heldout = match &run.evaluation {
        None => None,
        Some(e) => {
            let instances = crate::eval::load_instances(&e.tasks)?;
            let pool = if e.pool.environments.is_empty() {
                EvalPool::Repository {
                    name: &e.pool.name,
                    history: e.pool.repo_dir.is_some(),
                }
            } else {
                EvalPool::Environments { name: &e.pool.name }
            };
            let plan = HeldOutPlan::new(
                &e.settings,
                &instances,
                pool,
                engine.clone(),
                run.run.spec.training.seed,
            )?;
            eprintln!(
                "held-out evaluation: {} task(s) of {} in pool {}, {} attempt(s) each, every {} step(s)",
                plan.tasks.len(),
                e.tasks.display(),
                e.pool.name,
                plan.opts.attempts,
                plan.every_steps,
            );
            Some(Arc::new(plan))
        }
    };
    let mut lp = TrainLoop::new(
        run.run.spec.clone(),
        engine,
        provider,
        StatusFile::new(&dirs.out),
        LocalCheckpoints::new(dirs.checkpoints.clone(), keep),
        metrics,
        dirs.clone(),
        pools,
        grpo,
        state,
    );
    lp.environments = run
        .pools
        .iter()
        .filter(|p| !p.environments.is_empty())
        .map(|p| {
            (
                p.name.clone(),
                p.environments.iter().map(|e| e.name.clone()).collect(),
            )
        })
        .collect();
    lp.heldout = heldout;
    if let Some(v) = view {
        lp.view = v;
    }
    eprintln!(
        "run {name} ({}) → {}: steps {}..{target}, {} pool(s), policy v{}",
        run.source,
        out.display(),
        lp.step() + 1,
        run.pools.len(),
        lp.grpo().map(|g| g.policy().version()).unwrap_or(0),
    );
    eprintln!("sandboxes: {sandboxes}");
    // A resumed run redoes the steps after its checkpoint, and a fresh run in the same
    // directory all of them: the new event file says from which step, and TensorBoard drops
    // the older files' points from there on.
    let mut curves = EventWriter::create(&dirs.out, lp.step() + 1)?;
    eprintln!(
        "curves: tensorboard --logdir {} (this run's event file: {})",
        dirs.out.display(),
        curves
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    eprintln!(
        "each step: {} injector episode(s) write a bug in a fresh sandbox; the seven checks \
         validate it; {} solver episode(s) per valid bug try to fix it, graded in fresh \
         sandboxes; then a GRPO update{}",
        sp.injector_episodes_per_step.max(1),
        sp.solver_group_size.max(2),
        if run.run.spec.checkpoint.every_steps > 0 {
            " and a checkpoint"
        } else {
            ""
        },
    );

    let interrupt = Interrupt::default();
    interrupt.listen();
    let mut summaries = Vec::new();
    let mut interrupted = false;
    while lp.step() < target {
        if interrupt.count() > 0 {
            interrupted = true;
            break;
        }
        let pb = ProgressBar::with_draw_target(
            Some(0),
            if opts.progress {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        pb.set_style(
            ProgressStyle::with_template("step {prefix} [{bar:30}] {pos}/{len} episodes {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.set_prefix((lp.step() + 1).to_string());
        eprintln!("step {}/{target}: playing episodes…", lp.step() + 1);
        pb.enable_steady_tick(Duration::from_millis(250));
        let bar = Bar(pb.clone());
        let abandon = interrupt.1.notified();
        let result = tokio::select! {
            r = lp.run_step(&bar) => Some(r),
            _ = abandon => None,
        };
        pb.finish_and_clear();
        match result {
            Some(Ok(summary)) => {
                println!("{}", summary.line());
                curves.write_step(&summary)?;
                summaries.push(summary);
            }
            Some(Err(e)) => return Err(e.into()),
            None => {
                // The step's futures are dropped: every sandbox lease kills its processes.
                interrupted = true;
                break;
            }
        }
    }
    if interrupted {
        eprintln!("stopped after step {}; resume with --resume", lp.step());
    }
    Ok(LocalOutcome {
        out,
        steps_done: lp.step(),
        summaries,
        interrupted,
        metrics_addr,
    })
}

/// The repository a pool's sandboxes copy: the directory itself, or a clone of a git bundle
/// (made once per output directory; the bundled sample comes from inside the binary).
fn repository(source: &std::path::Path, clone_to: &std::path::Path) -> Result<PathBuf, LocalError> {
    if !config::is_bundle(source) {
        return Ok(source.to_path_buf());
    }
    if clone_to.join(".git").is_dir() {
        return Ok(clone_to.to_path_buf());
    }
    let io = |e: std::io::Error| LocalError::Io {
        path: clone_to.to_path_buf(),
        source: e,
    };
    if clone_to.exists() {
        std::fs::remove_dir_all(clone_to).map_err(io)?;
    }
    if let Some(parent) = clone_to.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    if source == config::assets_dir().join("sample-repo.bundle") {
        crate::engine::sample::materialize_sample_repo(clone_to).map_err(io)?;
    } else {
        let out = std::process::Command::new("git")
            .args(["clone", "--quiet"])
            .arg(source)
            .arg(clone_to)
            .output()
            .map_err(io)?;
        if !out.status.success() {
            return Err(io(std::io::Error::other(format!(
                "git clone {}: {}",
                source.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))));
        }
    }
    Ok(clone_to.to_path_buf())
}

/// The dtype the spec's model trains in on `device` (shared with the cluster mode).
pub fn model_dtype(model: &selfplay_crds::run::ModelSource, device: &Device) -> DType {
    let requested = match model.dtype {
        selfplay_crds::run::ModelDtype::F32 => DType::F32,
        selfplay_crds::run::ModelDtype::Bf16 => DType::BF16,
    };
    compute_dtype(requested, device)
}

/// A fresh trainer from the spec's model, or the latest checkpoint with `--resume`.
fn build_trainer(
    run: &LocalRun,
    dirs: &RunDirs,
    resume: bool,
) -> Result<(GrpoTrainer, LoopState), LocalError> {
    let spec = &run.run.spec;
    let settings =
        GrpoSettings::try_from(&spec.training).map_err(|e| LocalError::Settings(e.to_string()))?;
    let devices = devices(spec.trainer.gpus)?;
    let device = &devices[0];
    if resume {
        let (step, dir) = latest_checkpoint(&dirs.checkpoints)
            .ok_or_else(|| LocalError::NothingToResume(dirs.checkpoints.clone()))?;
        let state = read_loop_state(&dir)?;
        let grpo = GrpoTrainer::resume(
            &dir,
            settings,
            model_dtype(&run.run.spec.model, device),
            device,
        )?
        .with_data_parallel(&devices)?;
        grpo.policy().sample_in_spec_precision(spec.model.dtype);
        eprintln!(
            "resuming from {} (step {step}, policy v{})",
            dir.display(),
            grpo.policy().version()
        );
        return Ok((grpo, state));
    }
    let policy = CandlePolicy::from_source(&spec.model, device, spec.training.seed)?;
    policy.sample_in_spec_precision(spec.model.dtype);
    Ok((
        GrpoTrainer::new(Arc::new(policy), settings)?.with_data_parallel(&devices)?,
        LoopState::default(),
    ))
}

/// Engine settings from the spec; pool timeouts from the first pool.
pub fn engine_settings(
    run: &LocalRun,
    chat_model: bool,
) -> Result<EngineSettings, crate::engine::prompts::PromptError> {
    let markup = if chat_model {
        ChatMarkup::chatml()
    } else {
        ChatMarkup::plain()
    };
    let mut engine = EngineSettings::from_settings(&run.run.spec.self_play, markup)?;
    if let Some(p) = run.pools.first() {
        engine.episode.command_timeout =
            Duration::from_secs(p.spec.command_timeout_seconds.max(1) as u64);
        engine.validation.test_timeout =
            Duration::from_secs(p.spec.test_timeout_seconds.max(1) as u64);
    }
    Ok(engine)
}
