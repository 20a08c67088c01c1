//! Starting a sidecar as a local child process (single-machine mode and tests).
//!
//! The child runs `sandbox-sidecar serve --listen 127.0.0.1:0 ...` in its own process
//! group, prints `listening on ADDR` on stdout once ready, and is stopped with SIGTERM (it
//! then kills its sessions and commands) and, if it lingers, SIGKILL to its whole group.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, ChildStdout, Command};

use crate::client::SidecarClient;

/// Environment variable naming the sidecar binary, when not given in [`SpawnOptions`].
pub const BINARY_ENV: &str = "SANDBOX_SIDECAR_BIN";
/// The line prefix the server prints on stdout when ready.
pub const READY_PREFIX: &str = "listening on ";

#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// The `sandbox-sidecar` binary; `$SANDBOX_SIDECAR_BIN`, else `sandbox-sidecar` on PATH.
    pub binary: Option<PathBuf>,
    /// Arguments before `serve`, for a program that serves as the sidecar among other
    /// things (`trainer sidecar serve …`).
    pub binary_args: Vec<String>,
    pub workspace: PathBuf,
    /// A random token when `None`.
    pub token: Option<String>,
    /// `127.0.0.1:0` (any free port) when `None`.
    pub listen: Option<String>,
    /// Further `serve` arguments (e.g. `--timeout-ms`, `--metrics-listen`).
    pub extra_args: Vec<String>,
    /// Environment variables set for the sidecar (and so for its commands).
    pub env: Vec<(String, String)>,
    /// Send the sidecar's log (stderr) to our stderr instead of discarding it.
    pub show_logs: bool,
    pub startup_timeout: Duration,
}

impl SpawnOptions {
    pub fn new(workspace: impl Into<PathBuf>) -> Self {
        Self {
            binary: None,
            binary_args: Vec::new(),
            workspace: workspace.into(),
            token: None,
            listen: None,
            extra_args: Vec::new(),
            env: Vec::new(),
            show_logs: false,
            startup_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot write the token file: {0}")]
    TokenFile(#[source] std::io::Error),
    #[error("cannot start {binary}: {source}")]
    Start {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the sidecar did not report its address within {0:?}")]
    StartupTimeout(Duration),
    #[error("the sidecar exited before it was ready: {0}")]
    EarlyExit(String),
    #[error("the sidecar printed an unexpected line: {0:?}")]
    BadReadyLine(String),
    #[error(transparent)]
    Connect(#[from] crate::client::Error),
}

/// A running local sidecar; killed (with its process group) when dropped.
pub struct SpawnedSidecar {
    child: Option<Child>,
    pid: u32,
    addr: SocketAddr,
    token: String,
    _stdout: BufReader<ChildStdout>,
}

fn write_token_file(token: &str) -> std::io::Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = std::env::temp_dir().join(format!(
        "sidecar-token-{}",
        hex::encode(rand::random::<[u8; 8]>())
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(token.as_bytes())?;
    Ok(path)
}

impl SpawnedSidecar {
    pub async fn spawn(opts: SpawnOptions) -> Result<Self, SpawnError> {
        let token = opts
            .token
            .clone()
            .unwrap_or_else(|| hex::encode(rand::random::<[u8; 24]>()));
        let binary = opts
            .binary
            .clone()
            .or_else(|| std::env::var_os(BINARY_ENV).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("sandbox-sidecar"));
        let token_file = write_token_file(&token).map_err(SpawnError::TokenFile)?;
        let result = Self::start(&binary, &opts, &token_file, token).await;
        // The server reads the token at start; the file is not needed after that.
        let _ = std::fs::remove_file(&token_file);
        result
    }

    async fn start(
        binary: &Path,
        opts: &SpawnOptions,
        token_file: &Path,
        token: String,
    ) -> Result<Self, SpawnError> {
        let mut cmd = Command::new(binary);
        cmd.args(&opts.binary_args)
            .arg("serve")
            .arg("--listen")
            .arg(opts.listen.as_deref().unwrap_or("127.0.0.1:0"))
            .arg("--workspace")
            .arg(&opts.workspace)
            .arg("--token-file")
            .arg(token_file)
            .args(&opts.extra_args)
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if opts.show_logs {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| SpawnError::Start {
            binary: binary.display().to_string(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let Some(stdout) = child.stdout.take() else {
            return Err(SpawnError::EarlyExit("no stdout".into()));
        };
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        let read = tokio::time::timeout(opts.startup_timeout, stdout.read_line(&mut line)).await;
        match read {
            Err(_) => {
                kill_group(pid);
                return Err(SpawnError::StartupTimeout(opts.startup_timeout));
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                let status = child
                    .wait()
                    .await
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                return Err(SpawnError::EarlyExit(status));
            }
            Ok(Ok(_)) => {}
        }
        let addr = line
            .trim()
            .strip_prefix(READY_PREFIX)
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .ok_or_else(|| SpawnError::BadReadyLine(line.clone()))?;
        Ok(Self {
            child: Some(child),
            pid,
            addr,
            token,
            _stdout: stdout,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub async fn connect(&self) -> Result<SidecarClient, crate::client::Error> {
        SidecarClient::connect(self.addr.to_string(), &self.token).await
    }

    /// SIGTERM, wait up to `grace` for the sidecar to clean up, then SIGKILL its group.
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(self.pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                kill_group(self.pid);
                let _ = child.wait().await;
            }
        }
    }
}

fn kill_group(pid: u32) {
    if let Ok(p) = i32::try_from(pid)
        && p > 1
    {
        let _ = killpg(Pid::from_raw(p), Signal::SIGKILL);
    }
}

impl Drop for SpawnedSidecar {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Give the sidecar a moment to kill its sessions (they live in their own process
        // sessions), then make sure its group is gone.
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        for _ in 0..100 {
            if matches!(child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        kill_group(self.pid);
    }
}
