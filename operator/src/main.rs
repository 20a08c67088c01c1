//! `operator`: runs the selfplay controllers and broker (`operator run`), or prints the
//! objects it would create for a pool or run file (`operator render -f FILE`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use selfplay_crds::{Checkpoint, SandboxPool, SelfPlayRun};
use selfplay_operator::broker::{Broker, BrokerSettings, KubeBackend};
use selfplay_operator::config::OperatorConfig;
use selfplay_operator::controller::{self, Context, http::Health, leader};
use selfplay_operator::metrics::Metrics;
use selfplay_operator::names::{COMPONENT_SANDBOX, COMPONENT_TRAINER, LABEL_COMPONENT, MANAGER};
use tokio::sync::{Notify, watch};

#[derive(Parser)]
#[command(name = "operator", version, about = "The selfplay Kubernetes operator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the controllers and the broker (in a cluster, or with a kubeconfig).
    Run(RunArgs),
    /// Print the objects the operator would create for the SandboxPools and SelfPlayRuns of a YAML file.
    Render(RenderArgs),
}

#[derive(Args, Clone)]
struct Images {
    /// Image holding the static sandbox-sidecar binary (the sandbox pods' init container).
    #[arg(long, env = "SELFPLAY_SIDECAR_IMAGE", default_value_t = OperatorConfig::default().sidecar_image)]
    sidecar_image: String,
    /// Path of the sidecar binary inside the sidecar image.
    #[arg(long, env = "SELFPLAY_SIDECAR_BINARY", default_value_t = OperatorConfig::default().sidecar_binary_path)]
    sidecar_binary_path: String,
    /// Trainer image, for runs that do not name one.
    #[arg(long, env = "SELFPLAY_TRAINER_IMAGE", default_value_t = OperatorConfig::default().trainer_image)]
    trainer_image: String,
    /// Address trainer pods dial to reach the broker (the operator's Service).
    #[arg(long, env = "SELFPLAY_BROKER_ADDRESS", default_value_t = OperatorConfig::default().broker_address)]
    broker_address: String,
    /// Pull policy of the sidecar and trainer images (cluster default when unset).
    #[arg(long, env = "SELFPLAY_IMAGE_PULL_POLICY")]
    image_pull_policy: Option<String>,
    /// Most sandbox pods one namespace may hold, warm and started on demand (0: no limit
    /// beyond each pool's `max`).
    #[arg(
        long,
        env = "SELFPLAY_MAX_SANDBOXES_PER_NAMESPACE",
        default_value_t = 0
    )]
    max_sandboxes_per_namespace: u32,
}

impl Images {
    fn config(&self) -> OperatorConfig {
        OperatorConfig {
            sidecar_image: self.sidecar_image.clone(),
            sidecar_binary_path: self.sidecar_binary_path.clone(),
            trainer_image: self.trainer_image.clone(),
            broker_address: self.broker_address.clone(),
            image_pull_policy: self.image_pull_policy.clone(),
            max_sandboxes_per_namespace: self.max_sandboxes_per_namespace,
        }
    }
}

#[derive(Args)]
struct RenderArgs {
    /// YAML file with SandboxPools and/or SelfPlayRuns (`-` for standard input).
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Namespace of objects that name none.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    #[command(flatten)]
    images: Images,
}

#[derive(Args)]
struct RunArgs {
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "SELFPLAY_METRICS_LISTEN", default_value = "[::]:8080")]
    metrics_listen: SocketAddr,
    /// Address of the broker's gRPC service.
    #[arg(long, env = "SELFPLAY_BROKER_LISTEN", default_value = "[::]:7443")]
    broker_listen: SocketAddr,
    /// Watch only these namespaces (comma-separated; all namespaces when empty). The
    /// operator then needs a Role in each of them rather than a ClusterRole.
    #[arg(
        long,
        env = "SELFPLAY_WATCH_NAMESPACES",
        alias = "watch-namespace",
        value_delimiter = ','
    )]
    watch_namespaces: Vec<String>,
    /// Namespace of the leader-election Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, default_value = "selfplay-operator-leader")]
    lease_name: String,
    /// This replica's identity in the Lease and in Events (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "SELFPLAY_LOG_JSON")]
    log_json: bool,
    #[command(flatten)]
    images: Images,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Render(args) => match render(&args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("operator render: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
        Cmd::Run(args) => {
            init_logs(args.log_json);
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("operator: cannot start the runtime: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            match rt.block_on(run(args)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "operator stopped");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logs(json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn render(args: &RenderArgs) -> anyhow::Result<()> {
    let text = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?
    };
    let out = selfplay_operator::render::render(&text, &args.namespace, &args.images.config())?;
    for note in &out.notes {
        eprintln!("note: {note}");
    }
    print!("{}", selfplay_operator::render::to_yaml(&out.objects)?);
    Ok(())
}

/// A watch of `K` in the watched namespaces (all when none): one watcher, or one per
/// namespace merged into one stream (`controller::namespaces`); `store` is the reader of the
/// store the stream is reflected into (any reader for a stream that only triggers reconciles).
fn watch_in<K>(
    client: &Client,
    namespaces: &[String],
    cfg: watcher::Config,
    store: reflector::Store<K>,
) -> futures::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    match namespaces {
        [] => watcher(Api::<K>::all(client.clone()), cfg)
            .default_backoff()
            .boxed(),
        [ns] => watcher(Api::<K>::namespaced(client.clone(), ns), cfg)
            .default_backoff()
            .boxed(),
        many => {
            let streams = many
                .iter()
                .map(|ns| {
                    watcher(Api::<K>::namespaced(client.clone(), ns), cfg.clone())
                        .default_backoff()
                        .boxed()
                })
                .collect();
            controller::namespaces::merge(many.to_vec(), streams, store).boxed()
        }
    }
}

/// A reader of an empty store, for streams that are not reflected.
fn no_store<K>() -> reflector::Store<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    reflector::store::<K>().0
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster or kubeconfig)")?;
    let metrics = Metrics::new();
    let health = Health::default();
    let identity = args.identity.clone().unwrap_or_else(|| {
        format!(
            "operator-{}",
            &selfplay_operator::build::generate_token()[..8]
        )
    });

    // Our own pod, when we know it (in a cluster): the Service routes trainers to the pod
    // labelled as serving the broker. A restarted container may find the label still there.
    let own_pod: Option<(Api<Pod>, String)> = args
        .identity
        .clone()
        .map(|pod| (Api::namespaced(client.clone(), &args.lease_namespace), pod));
    if let Some((pods, pod)) = &own_pod {
        leader::mark_serving(pods, pod, false)
            .await
            .context("cannot unlabel this operator pod")?;
    }

    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .context("binding --metrics-listen")?;
    tokio::spawn(controller::http::serve(
        listener,
        metrics.clone(),
        health.clone(),
    ));

    // Leader election: a standby is healthy and ready, and waits.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &args.lease_namespace);
    let lease = leader::LeaseSettings::new(args.lease_name.clone(), identity.clone());
    let (leader_tx, mut leader_rx) = watch::channel(false);
    tokio::spawn(leader::run(leases.clone(), lease.clone(), leader_tx));
    health.ready.store(true, Ordering::Relaxed);
    tracing::info!(%identity, "waiting for leadership");
    leader_rx
        .wait_for(|l| *l)
        .await
        .context("leader election stopped")?;
    health.ready.store(false, Ordering::Relaxed);

    let ns: &[String] = &args.watch_namespaces;
    let cfg = args.images.config();

    // The sandbox pod reflector: shared by the pool controller (as its owned stream) and the broker.
    let changed = Arc::new(Notify::new());
    let (sandboxes, sandbox_writer) = reflector::store::<Pod>();
    let notify = changed.clone();
    let sandbox_stream = watch_in(
        &client,
        ns,
        watcher::Config::default().labels(&format!("{LABEL_COMPONENT}={COMPONENT_SANDBOX}")),
        sandboxes.clone(),
    )
    .reflect(sandbox_writer)
    .touched_objects()
    .inspect(move |_| notify.notify_waiters());

    // Pools have no finalizer: their metric series go when the watch sees them deleted.
    let (pool_store, pool_writer) = reflector::store::<SandboxPool>();
    let m = metrics.clone();
    let pool_stream = watch_in(&client, ns, watcher::Config::default(), pool_store.clone())
        .map_ok(move |ev| {
            controller::pool::on_pool_event(&m, &ev);
            ev
        })
        .reflect(pool_writer);
    let pool_stream = controller::predicates::changed_objects(
        pool_stream,
        controller::predicates::pool_for_pool_controller,
    );
    let pool_ctrl = Controller::for_stream(pool_stream, pool_store)
        .owns_stream(sandbox_stream)
        .watches_stream(
            controller::predicates::changed_objects(
                watch_in(
                    &client,
                    ns,
                    watcher::Config::default(),
                    no_store::<SelfPlayRun>(),
                ),
                controller::predicates::run_for_pools,
            ),
            |run: SelfPlayRun| {
                let ns = run.metadata.namespace.clone().unwrap_or_default();
                run.spec
                    .pools
                    .iter()
                    .map(|p| ObjectRef::new(&p.name).within(&ns))
                    .collect::<Vec<_>>()
            },
        )
        .with_config(ControllerConfig::default().concurrency(4));
    let (run_store, run_writer) = reflector::store::<SelfPlayRun>();
    let run_stream =
        watch_in(&client, ns, watcher::Config::default(), run_store.clone()).reflect(run_writer);
    let run_stream = controller::predicates::changed_objects(
        run_stream,
        controller::predicates::run_for_run_controller,
    );
    let run_ctrl = Controller::for_stream(run_stream, run_store)
        .owns_stream(
            watch_in(
                &client,
                ns,
                watcher::Config::default()
                    .labels(&format!("{LABEL_COMPONENT}={COMPONENT_TRAINER}")),
                no_store::<Pod>(),
            )
            .touched_objects(),
        )
        .owns_stream(
            watch_in(
                &client,
                ns,
                watcher::Config::default(),
                no_store::<Checkpoint>(),
            )
            .touched_objects(),
        )
        .with_config(ControllerConfig::default().concurrency(4));
    let (ckpt_store, ckpt_writer) = reflector::store::<Checkpoint>();
    let ckpt_ctrl = Controller::for_stream(
        watch_in(&client, ns, watcher::Config::default(), ckpt_store.clone())
            .reflect(ckpt_writer)
            .applied_objects(),
        ckpt_store,
    );

    let reporter = Reporter {
        controller: MANAGER.to_string(),
        instance: Some(identity.clone()),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        cfg,
        metrics.clone(),
        reporter,
        sandboxes.clone(),
        pool_ctrl.store(),
        run_ctrl.store(),
        changed.clone(),
    ));

    // Kubernetes stops a pod with SIGTERM; a terminal sends SIGINT.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let pools_done = pool_ctrl
        .graceful_shutdown_on(stopped())
        .run(
            controller::pool::reconcile,
            |obj, e, ctx| controller::on_error("SandboxPool", obj.as_ref(), e, &ctx),
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    let runs_done = run_ctrl
        .graceful_shutdown_on(stopped())
        .run(
            controller::run::reconcile,
            |obj, e, ctx| controller::on_error("SelfPlayRun", obj.as_ref(), e, &ctx),
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    let ckpts_done = ckpt_ctrl
        .graceful_shutdown_on(stopped())
        .run(
            controller::checkpoint::reconcile,
            |obj, e, ctx| controller::on_error("Checkpoint", obj.as_ref(), e, &ctx),
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));

    // The broker serves once the caches it hands sandboxes out of are synced.
    let broker = Arc::new(
        Broker::new(
            Arc::new(KubeBackend::new(client.clone())),
            sandboxes.clone(),
            ctx.pools.clone(),
            ctx.runs.clone(),
            changed,
            metrics.clone(),
            BrokerSettings {
                pods: ctx.config.clone(),
                ..BrokerSettings::default()
            },
        )
        .with_environments(ctx.environments.clone()),
    );
    let broker_addr = args.broker_listen;
    let (pools_store, runs_store, health2) = (ctx.pools.clone(), ctx.runs.clone(), health.clone());
    let broker_stop = stopped();
    let serving_pod = own_pod.clone();
    let broker_done = async move {
        let synced = async {
            sandboxes.wait_until_ready().await?;
            pools_store.wait_until_ready().await?;
            runs_store.wait_until_ready().await
        };
        if let Err(e) = synced.await {
            return Err(anyhow::anyhow!("caches never synced: {e}"));
        }
        health2.ready.store(true, Ordering::Relaxed);
        if let Some((pods, pod)) = &serving_pod {
            leader::mark_serving(pods, pod, true)
                .await
                .context("cannot label this pod as serving the broker")?;
        }
        tracing::info!(%broker_addr, "caches synced; broker serving");
        tonic::transport::Server::builder()
            .add_service(selfplay_operator::broker::service::service(broker))
            .serve_with_shutdown(broker_addr, broker_stop)
            .await
            .context("broker server")
    };

    let work = async { tokio::join!(pools_done, runs_done, ckpts_done) };
    tokio::pin!(work);
    tokio::pin!(broker_done);
    tokio::pin!(shutdown);
    let result = tokio::select! {
        _ = &mut shutdown => {
            tracing::info!("shutting down");
            stop_tx.send_replace(true);
            let _ = tokio::time::timeout(Duration::from_secs(20), &mut work).await;
            Ok(())
        }
        lost = leader_rx.wait_for(|l| !*l) => {
            let _ = lost;
            // Another replica may be leading now: stop at once rather than act twice.
            Err(anyhow::anyhow!("lost leadership"))
        }
        r = &mut broker_done => r.and(Err(anyhow::anyhow!("broker stopped"))),
        _ = &mut work => Err(anyhow::anyhow!("controllers stopped")),
    };
    // Trainers stop being routed here before another replica can take over.
    if let Some((pods, pod)) = &own_pod
        && let Err(e) = leader::mark_serving(pods, pod, false).await
    {
        tracing::warn!(error = %e, "cannot unlabel this operator pod");
    }
    leader::release(&leases, &lease).await;
    result
}
