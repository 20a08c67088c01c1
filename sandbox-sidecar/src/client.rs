//! The Rust client other crates use to drive a sidecar.
//!
//! Errors separate infrastructure failures ([`Error::is_infrastructure`]: the sidecar is
//! unreachable, dead, misconfigured) from refusals of a request (path outside the
//! workspace, no match for a search/replace, a patch that does not apply). A command that
//! runs and fails is neither: it is a [`CommandResult`] with its exit code.
//!
//! Mutating calls get a fresh request id when the request carries none, and calls that fail
//! with `UNAVAILABLE` are retried with the same id, so a retry never runs a command twice.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::auth::AUTH_HEADER;
use crate::error::{MATCHES_KEY, REASON_KEY, reason};
use crate::proto::sidecar_client::SidecarClient as RawClient;
pub use crate::proto::*;

/// Errors of client calls.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The sidecar could not be reached (refused, DNS, TLS, timeout).
    #[error("cannot connect to the sidecar at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The call failed in transport or inside the sidecar (connection lost, sidecar died,
    /// internal error, cancelled).
    #[error("sidecar call failed ({}): {}", .0.code(), .0.message())]
    Transport(Status),
    /// The token was missing or wrong.
    #[error("sidecar refused the token: {0}")]
    Unauthenticated(String),
    #[error("{0}")]
    InvalidAddress(String),
    /// A path outside the workspace (`..`, absolute, symlink pointing out).
    #[error("{0}")]
    PathRefused(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// Search/replace: `old_str` does not occur.
    #[error("{0}")]
    NoMatch(String),
    /// Search/replace: `old_str` occurs `count` times.
    #[error("{message}")]
    MultipleMatches { count: u64, message: String },
    /// The patch does not apply (nothing was changed).
    #[error("{0}")]
    PatchRejected(String),
    /// Diff/Reset against a snapshot that was never taken.
    #[error("{0}")]
    NoSnapshot(String),
    /// Sessions or tests need bash, which the image lacks.
    #[error("{0}")]
    NoShell(String),
    #[error("{0}")]
    RequestIdConflict(String),
    /// Any other refusal.
    #[error("sidecar refused the request ({}): {}", .0.code(), .0.message())]
    Other(Status),
}

impl Error {
    /// True for failures of the sandbox machinery rather than of what the agent asked for:
    /// the engine treats these as infrastructure errors, never as a negative reward.
    pub fn is_infrastructure(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. }
                | Error::Transport(_)
                | Error::Unauthenticated(_)
                | Error::InvalidAddress(_)
        )
    }

    pub fn from_status(s: Status) -> Self {
        let why = s
            .metadata()
            .get(REASON_KEY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let msg = s.message().to_string();
        match (s.code(), why.as_str()) {
            (Code::Unauthenticated, _) => Error::Unauthenticated(msg),
            (_, reason::PATH_REFUSED) => Error::PathRefused(msg),
            (_, reason::INVALID_ARGUMENT) => Error::InvalidArgument(msg),
            (_, reason::NOT_FOUND) => Error::NotFound(msg),
            (_, reason::ALREADY_EXISTS) => Error::AlreadyExists(msg),
            (_, reason::NO_MATCH) => Error::NoMatch(msg),
            (_, reason::MULTIPLE_MATCHES) => Error::MultipleMatches {
                count: s
                    .metadata()
                    .get(MATCHES_KEY)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                message: msg,
            },
            (_, reason::PATCH_REJECTED) => Error::PatchRejected(msg),
            (_, reason::NO_SNAPSHOT) => Error::NoSnapshot(msg),
            (_, reason::NO_SHELL) => Error::NoShell(msg),
            (_, reason::REQUEST_ID_CONFLICT) => Error::RequestIdConflict(msg),
            (
                Code::Unavailable
                | Code::Unknown
                | Code::Internal
                | Code::Cancelled
                | Code::DeadlineExceeded
                | Code::DataLoss
                | Code::ResourceExhausted
                | Code::Unimplemented,
                _,
            ) => Error::Transport(s),
            _ => Error::Other(s),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Clone)]
pub struct AuthInterceptor {
    header: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        req.metadata_mut().insert(AUTH_HEADER, self.header.clone());
        Ok(req)
    }
}

type Inner = RawClient<InterceptedService<Channel, AuthInterceptor>>;

/// A connection to one sidecar. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct SidecarClient {
    inner: Inner,
    addr: String,
    retries: u32,
}

static REQUEST_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A request id unique to this process and run.
pub fn new_request_id() -> String {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let prefix = PREFIX.get_or_init(|| hex::encode(rand::random::<[u8; 8]>()));
    format!(
        "{prefix}-{}",
        REQUEST_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn fill_id(id: &mut String) {
    if id.is_empty() {
        *id = new_request_id();
    }
}

/// The address prefix of a Unix socket: `unix:/run/sidecar/sock`.
pub const UNIX_PREFIX: &str = "unix:";

/// Accepts `host:port` or a full `http://host:port` URL.
fn endpoint_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

macro_rules! call {
    ($self:ident, $method:ident, $req:expr) => {{
        let req = $req;
        let mut attempt = 0u32;
        loop {
            let mut c = $self.inner.clone();
            match c.$method(req.clone()).await {
                Ok(r) => break Ok(r.into_inner()),
                Err(s) if s.code() == Code::Unavailable && attempt < $self.retries => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50 * 4u64.pow(attempt - 1))).await;
                }
                Err(s) => break Err(Error::from_status(s)),
            }
        }
    }};
}

impl SidecarClient {
    /// Connects to `addr` (`127.0.0.1:7000`, `http://host:port`, or `unix:/abs/path` for a
    /// Unix socket) with `token`. [`addr`](Self::addr) returns `addr` as given.
    pub async fn connect(addr: impl Into<String>, token: impl AsRef<str>) -> Result<Self> {
        let addr = addr.into();
        let channel = match addr.strip_prefix(UNIX_PREFIX) {
            Some(path) => Self::unix_channel(&addr, path).await?,
            None => {
                let endpoint =
                    Self::tune(Endpoint::from_shared(endpoint_url(&addr)).map_err(|e| {
                        Error::InvalidAddress(format!("bad sidecar address {addr:?}: {e}"))
                    })?);
                endpoint.connect().await.map_err(|source| Error::Connect {
                    addr: addr.clone(),
                    source,
                })?
            }
        };
        Self::from_channel(channel, addr, token)
    }

    fn tune(endpoint: Endpoint) -> Endpoint {
        endpoint
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
    }

    /// A channel whose every connection (the first and each reconnect after the sidecar
    /// restarted) opens the socket at `path` afresh.
    async fn unix_channel(addr: &str, path: &str) -> Result<Channel> {
        // Relative paths would change meaning with the working directory between
        // reconnects.
        if !path.starts_with('/') {
            return Err(Error::InvalidAddress(format!(
                "bad sidecar address {addr:?}: a Unix socket address is unix:/absolute/path"
            )));
        }
        let path = std::path::PathBuf::from(path);
        // The URI is not dialled; it only fills the :authority of requests.
        let endpoint = Self::tune(Endpoint::from_static("http://localhost"));
        endpoint
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|source| Error::Connect {
                addr: addr.to_string(),
                source,
            })
    }

    /// Wraps an existing channel (custom TLS, timeouts, ...).
    pub fn from_channel(channel: Channel, addr: String, token: impl AsRef<str>) -> Result<Self> {
        let header = format!("Bearer {}", token.as_ref())
            .parse()
            .map_err(|_| Error::InvalidArgument("the token must be printable ASCII".into()))?;
        let inner = RawClient::with_interceptor(channel, AuthInterceptor { header })
            .max_decoding_message_size(256 * 1024 * 1024)
            .max_encoding_message_size(256 * 1024 * 1024);
        Ok(Self {
            inner,
            addr,
            retries: 2,
        })
    }

    /// How often a call failing with `UNAVAILABLE` is retried (default 2).
    pub fn with_retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The generated tonic client, for anything not wrapped here.
    pub fn raw(&self) -> Inner {
        self.inner.clone()
    }

    pub async fn health(&self) -> Result<HealthResponse> {
        call!(self, health, HealthRequest {})
    }

    // --- sessions -------------------------------------------------------------------

    pub async fn session_open(&self, mut req: SessionOpenRequest) -> Result<SessionOpenResponse> {
        fill_id(&mut req.request_id);
        call!(self, session_open, req)
    }

    /// Runs `command` in session `session_id` (created on first use).
    pub async fn session_run(
        &self,
        session_id: &str,
        command: &str,
        limits: Option<Limits>,
    ) -> Result<CommandResult> {
        self.session_run_request(SessionRunRequest {
            session_id: session_id.to_string(),
            command: command.to_string(),
            limits,
            request_id: String::new(),
        })
        .await
    }

    pub async fn session_run_request(&self, mut req: SessionRunRequest) -> Result<CommandResult> {
        fill_id(&mut req.request_id);
        call!(self, session_run, req)
    }

    /// Closes a session; false when it did not exist.
    pub async fn session_close(&self, session_id: &str) -> Result<bool> {
        let r: SessionCloseResponse = call!(
            self,
            session_close,
            SessionCloseRequest {
                session_id: session_id.to_string()
            }
        )?;
        Ok(r.existed)
    }

    // --- one-off commands --------------------------------------------------------------

    pub async fn exec(&self, mut req: ExecRequest) -> Result<CommandResult> {
        fill_id(&mut req.request_id);
        call!(self, exec, req)
    }

    /// Runs `argv` directly (no shell).
    pub async fn exec_argv(
        &self,
        argv: &[&str],
        timeout: Option<Duration>,
    ) -> Result<CommandResult> {
        self.exec(ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            limits: timeout.map(limits_with_timeout),
            ..Default::default()
        })
        .await
    }

    /// Runs `command` with `bash -c`.
    pub async fn exec_shell(
        &self,
        command: &str,
        timeout: Option<Duration>,
    ) -> Result<CommandResult> {
        self.exec(ExecRequest {
            shell: command.to_string(),
            limits: timeout.map(limits_with_timeout),
            ..Default::default()
        })
        .await
    }

    /// Runs a command and yields its output as it comes; the last item holds the result.
    pub async fn exec_stream(
        &self,
        mut req: ExecRequest,
    ) -> Result<BoxStream<'static, Result<ExecEvent>>> {
        fill_id(&mut req.request_id);
        let s: tonic::Streaming<ExecEvent> = call!(self, exec_stream, req)?;
        Ok(s.map(|r| r.map_err(Error::from_status)).boxed())
    }

    // --- files -------------------------------------------------------------------------

    /// The whole file (up to 64 MiB).
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        Ok(self
            .read_file_request(ReadFileRequest {
                path: path.into(),
                ..Default::default()
            })
            .await?
            .content)
    }

    pub async fn read_file_request(&self, req: ReadFileRequest) -> Result<ReadFileResponse> {
        call!(self, read_file, req)
    }

    /// Writes a file, creating missing parent directories.
    pub async fn write_file(
        &self,
        path: &str,
        content: impl Into<Vec<u8>>,
    ) -> Result<WriteFileResponse> {
        self.write_file_request(WriteFileRequest {
            path: path.into(),
            content: content.into(),
            create_parents: true,
            ..Default::default()
        })
        .await
    }

    pub async fn write_file_request(&self, mut req: WriteFileRequest) -> Result<WriteFileResponse> {
        fill_id(&mut req.request_id);
        call!(self, write_file, req)
    }

    pub async fn list_files(&self, req: ListFilesRequest) -> Result<ListFilesResponse> {
        call!(self, list_files, req)
    }

    // --- editor ------------------------------------------------------------------------

    /// Lines `start..=end` (1-based; 0 for the start / the end) numbered like `cat -n`.
    pub async fn view(&self, path: &str, start_line: u32, end_line: u32) -> Result<ViewResponse> {
        call!(
            self,
            view,
            ViewRequest {
                path: path.into(),
                start_line,
                end_line
            }
        )
    }

    /// Replaces the one occurrence of `old_str`; [`Error::NoMatch`] or
    /// [`Error::MultipleMatches`] otherwise, and the file is left as it was.
    pub async fn str_replace(
        &self,
        path: &str,
        old_str: &str,
        new_str: &str,
    ) -> Result<EditResponse> {
        call!(
            self,
            str_replace,
            StrReplaceRequest {
                path: path.into(),
                old_str: old_str.into(),
                new_str: new_str.into(),
                request_id: new_request_id(),
            }
        )
    }

    pub async fn create_file(
        &self,
        path: &str,
        content: &str,
        overwrite: bool,
    ) -> Result<EditResponse> {
        call!(
            self,
            create_file,
            CreateFileRequest {
                path: path.into(),
                content: content.into(),
                overwrite,
                request_id: new_request_id(),
            }
        )
    }

    // --- patches and snapshots ---------------------------------------------------------

    /// Applies a unified diff, all or nothing ([`Error::PatchRejected`] changes nothing).
    pub async fn apply_patch(
        &self,
        patch: impl Into<Vec<u8>>,
        reverse: bool,
        check_only: bool,
    ) -> Result<ApplyPatchResponse> {
        call!(
            self,
            apply_patch,
            ApplyPatchRequest {
                patch: patch.into(),
                reverse,
                check_only,
                request_id: new_request_id(),
            }
        )
    }

    /// The workspace's diff against `snapshot` (None: "baseline"), restricted to `include`
    /// (when not empty) and without `exclude`.
    pub async fn diff(
        &self,
        snapshot: Option<&str>,
        include: &[&str],
        exclude: &[&str],
    ) -> Result<DiffResponse> {
        call!(
            self,
            diff,
            DiffRequest {
                snapshot: snapshot.unwrap_or_default().to_string(),
                include_paths: include.iter().map(|s| s.to_string()).collect(),
                exclude_paths: exclude.iter().map(|s| s.to_string()).collect(),
            }
        )
    }

    /// Takes snapshot `name` (None: "baseline") of the workspace, without `exclude`.
    pub async fn snapshot(&self, name: Option<&str>, exclude: &[&str]) -> Result<SnapshotResponse> {
        call!(
            self,
            snapshot,
            SnapshotRequest {
                name: name.unwrap_or_default().to_string(),
                exclude_paths: exclude.iter().map(|s| s.to_string()).collect(),
                request_id: new_request_id(),
            }
        )
    }

    /// Puts the workspace back exactly as snapshot `name` (None: "baseline") found it.
    pub async fn reset(&self, name: Option<&str>) -> Result<ResetResponse> {
        call!(
            self,
            reset,
            ResetRequest {
                name: name.unwrap_or_default().to_string(),
                request_id: new_request_id(),
            }
        )
    }

    // --- oracle files, history, tests ---------------------------------------------------

    pub async fn oracle_stash(&self, paths: &[&str], remove: bool) -> Result<OracleStashResponse> {
        call!(
            self,
            oracle_stash,
            OracleStashRequest {
                paths: paths.iter().map(|s| s.to_string()).collect(),
                remove,
                request_id: new_request_id(),
            }
        )
    }

    pub async fn oracle_restore(&self) -> Result<OracleRestoreResponse> {
        call!(
            self,
            oracle_restore,
            OracleRestoreRequest {
                request_id: new_request_id()
            }
        )
    }

    pub async fn reset_history(&self) -> Result<ResetHistoryResponse> {
        call!(
            self,
            reset_history,
            ResetHistoryRequest {
                request_id: new_request_id()
            }
        )
    }

    pub async fn run_tests(&self, mut req: RunTestsRequest) -> Result<RunTestsResponse> {
        fill_id(&mut req.request_id);
        call!(self, run_tests, req)
    }
}

/// Limits with only a timeout set (the rest: server defaults).
pub fn limits_with_timeout(timeout: Duration) -> Limits {
    Limits {
        timeout_ms: u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1),
        ..Default::default()
    }
}

impl RunTestsResponse {
    /// Statuses as the enum instead of its wire integer.
    pub fn statuses_typed(&self) -> std::collections::BTreeMap<String, TestStatus> {
        self.statuses
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    TestStatus::try_from(*v).unwrap_or(TestStatus::Unspecified),
                )
            })
            .collect()
    }
}
