//! Starting the server: the gRPC listener, the metrics/health listener, shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;

use crate::auth::TokenCheck;
use crate::idempotency::IdempotencyCache;
use crate::metrics::Metrics;
use crate::oracle::Oracle;
use crate::paths::Workspace;
use crate::process;
use crate::proto::sidecar_server::SidecarServer;
use crate::service::{Defaults, SidecarService, State};
use crate::session::Sessions;
use crate::snapshot::Snapshots;

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// A listening TCP socket inherited as this file descriptor, used instead of binding
    /// `listen`: a sandbox without network (its own network namespace) can still serve
    /// on a socket its parent bound on the host's loopback.
    pub listen_fd: Option<i32>,
    pub workspace: PathBuf,
    pub token: String,
    pub metrics_listen: Option<SocketAddr>,
    /// Where snapshots and scripts go; a fresh private directory under the system's
    /// temporary directory when `None` (removed at shutdown).
    pub state_dir: Option<PathBuf>,
    pub defaults: Defaults,
    /// Remembered request ids (oldest forgotten first).
    pub idempotency_capacity: usize,
    /// Confine every command (see [`crate::confine`]): hide the state directory and these
    /// directories, drop capabilities. `None`: no confinement (the seccomp filter still
    /// applies).
    pub confine: Option<Vec<PathBuf>>,
    /// Directories emptied before a test run that asks for a clean start (`/tmp`,
    /// `/dev/shm` where they are private to the sandbox).
    pub scratch_dirs: Vec<PathBuf>,
    /// Caps of a snapshot's or diff's walk of the workspace.
    pub walk_limits: crate::snapshot::WalkLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("workspace {path}: {source}")]
    Workspace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--confine: commands cannot be confined here ({0}); the sidecar needs CAP_SYS_ADMIN \
         in its user namespace (run it under `bwrap --unshare-user` or as root in a pod \
         with that capability), or start it without --confine"
    )]
    Confine(String),
    #[error("--hide {path}: {source}")]
    Hide {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A bound, not yet serving, sidecar.
pub struct Bound {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    state: Arc<State>,
    token: TokenCheck,
    owned_state_dir: Option<PathBuf>,
}

/// Takes ownership of an inherited listening socket.
fn inherited_listener(fd: i32) -> std::io::Result<TcpListener> {
    use std::os::fd::FromRawFd as _;
    // Owning a descriptor that is not open would abort at close: check it first.
    if fd < 3 || unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) } < 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("file descriptor {fd} is not an open listening socket"),
        ));
    }
    // SAFETY: the descriptor is open and was handed to this process to own; nothing else
    // in the process refers to it.
    let std_listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    std_listener.set_nonblocking(true)?;
    std_listener.local_addr()?;
    TcpListener::from_std(std_listener)
}

/// Binds both listeners and builds the state; cheap (no workspace walk), so the sidecar is
/// ready within milliseconds.
pub async fn bind(cfg: ServeConfig) -> Result<Bound, ServeError> {
    let ws = Workspace::new(&cfg.workspace).map_err(|source| ServeError::Workspace {
        path: cfg.workspace.clone(),
        source,
    })?;
    let (state_dir, owned) = match &cfg.state_dir {
        Some(d) => (d.clone(), None),
        None => {
            let d = std::env::temp_dir().join(format!(
                "sandbox-sidecar-{}-{}",
                std::process::id(),
                hex::encode(rand::random::<[u8; 4]>())
            ));
            (d.clone(), Some(d))
        }
    };
    create_private_dir(&state_dir).map_err(|source| ServeError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    if let Some(extra) = &cfg.confine {
        let mut hide = Vec::with_capacity(extra.len() + 1);
        // Mount points are resolved by the kernel anyway; resolving here makes the error
        // for a missing directory name the directory, not an errno of the probe.
        for d in std::iter::once(&state_dir).chain(extra) {
            let real = d.canonicalize().map_err(|source| ServeError::Hide {
                path: d.clone(),
                source,
            })?;
            if real == std::path::Path::new("/") {
                return Err(ServeError::Hide {
                    path: d.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "hiding / would hide everything",
                    ),
                });
            }
            if !hide.contains(&real) {
                hide.push(real);
            }
        }
        crate::confine::enable_confinement(hide);
        probe_confinement().await?;
    }
    // Daemonised commands then stay our descendants, to be found and killed; see `cleanup`.
    if let Err(e) = crate::cleanup::become_subreaper() {
        tracing::warn!(error = %e, "cannot become a child subreaper: daemonised commands escape clean starts");
    }
    let metrics = Arc::new(Metrics::new()?);
    let gauge = metrics.sessions_active.clone();
    let snapshots = Snapshots::new(ws.clone(), &state_dir)
        .map_err(|source| ServeError::StateDir {
            path: state_dir.clone(),
            source,
        })?
        .with_limits(cfg.walk_limits);
    let bash = process::find_bash();
    let state = Arc::new(State {
        ws,
        defaults: cfg.defaults.clone(),
        bash: bash.clone(),
        state_dir: state_dir.clone(),
        scratch_dirs: cfg.scratch_dirs.clone(),
        sessions: Sessions::new(bash, Box::new(move |n| gauge.set(n))),
        snapshots: Mutex::new(snapshots),
        oracle: Mutex::new(Oracle::default()),
        metrics,
        idem: IdempotencyCache::new(cfg.idempotency_capacity),
        started: Instant::now(),
    });
    let listener = match cfg.listen_fd {
        Some(fd) => inherited_listener(fd),
        None => TcpListener::bind(cfg.listen).await,
    }
    .map_err(|source| ServeError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let (metrics_listener, metrics_addr) = match cfg.metrics_listen {
        Some(m) => {
            let l = TcpListener::bind(m)
                .await
                .map_err(|source| ServeError::Bind { addr: m, source })?;
            let a = l
                .local_addr()
                .map_err(|source| ServeError::Bind { addr: m, source })?;
            (Some(l), Some(a))
        }
        None => (None, None),
    };
    Ok(Bound {
        addr,
        metrics_addr,
        listener,
        metrics_listener,
        state,
        token: TokenCheck::new(&cfg.token),
        owned_state_dir: owned,
    })
}

/// Runs `true` the way every command will run, so a sidecar that cannot confine its
/// commands refuses to start instead of failing each command.
async fn probe_confinement() -> Result<(), ServeError> {
    let spec = crate::child::CommandSpec::new("true");
    let mut child = crate::child::spawn(&spec, false, process::Rlimits::default())
        .map_err(|e| ServeError::Confine(e.to_string()))?;
    let status = child
        .wait()
        .await
        .map_err(|e| ServeError::Confine(e.to_string()))?;
    if !status.success() {
        return Err(ServeError::Confine(format!("`true` ended with {status}")));
    }
    Ok(())
}

fn create_private_dir(p: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))
}

impl Bound {
    /// Serves until `shutdown` resolves; then kills every session and running command and
    /// removes the state directory it created.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let Bound {
            listener,
            metrics_listener,
            state,
            token,
            owned_state_dir,
            ..
        } = self;
        process::spawn_init_reaper();
        if let Some(ml) = metrics_listener {
            let st = state.clone();
            tokio::spawn(async move {
                let app = axum::Router::new()
                    .route(
                        "/metrics",
                        axum::routing::get({
                            let st = st.clone();
                            move || {
                                let st = st.clone();
                                async move {
                                    (
                                        [(
                                            axum::http::header::CONTENT_TYPE,
                                            "text/plain; version=0.0.4",
                                        )],
                                        st.metrics.render(),
                                    )
                                }
                            }
                        }),
                    )
                    .route("/healthz", axum::routing::get(|| async { "ok" }))
                    .route("/readyz", axum::routing::get(|| async { "ok" }));
                if let Err(e) = axum::serve(ml, app).await {
                    tracing::error!(error = %e, "metrics server stopped");
                }
            });
        }
        let svc = SidecarServer::new(SidecarService {
            state: state.clone(),
        })
        .max_decoding_message_size(256 * 1024 * 1024)
        .max_encoding_message_size(256 * 1024 * 1024);
        let svc =
            tonic::service::interceptor::InterceptedService::new(svc, move |req| token.check(req));
        // Nagle's algorithm plus delayed ACKs would add tens of milliseconds to small calls.
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
            if let Ok(s) = &s {
                let _ = s.set_nodelay(true);
            }
            s
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        tokio::spawn(async move {
            shutdown.await;
            // Running commands would hold the graceful shutdown open: end them first.
            process::kill_all_tracked();
            st.sessions.close_all().await;
            let _ = stop_tx.send(());
        });
        let result = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            })
            .await;
        process::kill_all_tracked();
        state.sessions.close_all().await;
        if let Some(d) = owned_state_dir {
            let _ = std::fs::remove_dir_all(d);
        }
        result.map_err(ServeError::from)
    }
}
