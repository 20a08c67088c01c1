//! Starting the server: the gRPC listener, the metrics/health listener, shutdown.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UnixListener};
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
    /// Serve on a Unix socket at this path instead of TCP (a container without network
    /// whose socket directory is bind-mounted from the host). A stale socket there is
    /// replaced; the socket is made 0666 and removed at shutdown.
    pub listen_unix: Option<PathBuf>,
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
    /// The environment every command, test script and session starts from (before a
    /// request's own variables): what `serve --env-from-shell` captured. `None`: the
    /// sidecar's own environment at startup.
    pub base_env: Option<Vec<(OsString, OsString)>>,
}

/// Where the gRPC listener is bound; shown as the client's address syntax (`host:port`,
/// `unix:/path`), which is what `listening on ` and the ready file carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listening {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Listening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listening::Tcp(a) => write!(f, "{a}"),
            Listening::Unix(p) => write!(f, "{}{}", crate::client::UNIX_PREFIX, p.display()),
        }
    }
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
    #[error("cannot listen on the Unix socket {path}: {source}")]
    BindUnix {
        path: PathBuf,
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

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, UnixSocketFile),
}

/// The socket file `--listen-unix` created, identified by device and inode so that
/// shutdown removes only our own socket, not one a later sidecar bound at the same path.
struct UnixSocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl UnixSocketFile {
    fn remove(&self) {
        use std::os::unix::fs::MetadataExt as _;
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && m.dev() == self.dev
            && m.ino() == self.ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds a Unix socket at `path`, replacing a stale socket left by a sidecar that died,
/// and opens it to every user: the trainer connecting from the host is not the
/// container's user, and the directory holding the socket is private on the host.
fn bind_unix(path: &Path) -> Result<(UnixListener, UnixSocketFile), ServeError> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
    let err = |source| ServeError::BindUnix {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // A socket that still accepts belongs to a live server: taking over its path
            // would cut that server off from its clients.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another server is listening on it",
                )));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket (left in place)",
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    let file = (|| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        let m = std::fs::symlink_metadata(path)?;
        Ok(UnixSocketFile {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        })
    })();
    match file {
        Ok(f) => Ok((listener, f)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(err(e))
        }
    }
}

/// A bound, not yet serving, sidecar.
pub struct Bound {
    pub addr: Listening,
    pub metrics_addr: Option<SocketAddr>,
    listener: Listener,
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
    let base_env: Arc<[(OsString, OsString)]> = match &cfg.base_env {
        Some(env) => env.clone().into(),
        None => std::env::vars_os().collect(),
    };
    let state = Arc::new(State {
        ws,
        defaults: cfg.defaults.clone(),
        bash: bash.clone(),
        base_env: base_env.clone(),
        state_dir: state_dir.clone(),
        scratch_dirs: cfg.scratch_dirs.clone(),
        sessions: Sessions::new(bash, base_env, Box::new(move |n| gauge.set(n))),
        snapshots: Mutex::new(snapshots),
        oracle: Mutex::new(Oracle::default()),
        metrics,
        idem: IdempotencyCache::new(cfg.idempotency_capacity),
        started: Instant::now(),
    });
    // Metrics first: the Unix socket is a file that must not be left behind when a later
    // step fails.
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
    let (listener, addr) = if let Some(path) = &cfg.listen_unix {
        let (l, file) = bind_unix(path)?;
        (Listener::Unix(l, file), Listening::Unix(path.clone()))
    } else {
        let bind_err = |source| ServeError::Bind {
            addr: cfg.listen,
            source,
        };
        let l = match cfg.listen_fd {
            Some(fd) => inherited_listener(fd),
            None => TcpListener::bind(cfg.listen).await,
        }
        .map_err(bind_err)?;
        let a = l.local_addr().map_err(bind_err)?;
        (Listener::Tcp(l), Listening::Tcp(a))
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
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        tokio::spawn(async move {
            shutdown.await;
            // Running commands would hold the graceful shutdown open: end them first.
            process::kill_all_tracked();
            st.sessions.close_all().await;
            let _ = stop_tx.send(());
        });
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(svc);
        let stop = async {
            let _ = stop_rx.await;
        };
        let (result, socket_file) = match listener {
            Listener::Tcp(l) => {
                // Nagle's algorithm plus delayed ACKs would add tens of milliseconds to
                // small calls.
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(l).map(|s| {
                    if let Ok(s) = &s {
                        let _ = s.set_nodelay(true);
                    }
                    s
                });
                (
                    router.serve_with_incoming_shutdown(incoming, stop).await,
                    None,
                )
            }
            Listener::Unix(l, file) => {
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(l);
                (
                    router.serve_with_incoming_shutdown(incoming, stop).await,
                    Some(file),
                )
            }
        };
        process::kill_all_tracked();
        state.sessions.close_all().await;
        if let Some(f) = socket_file {
            f.remove();
        }
        if let Some(d) = owned_state_dir {
            let _ = std::fs::remove_dir_all(d);
        }
        result.map_err(ServeError::from)
    }
}
