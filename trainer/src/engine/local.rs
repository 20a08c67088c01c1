//! The local sandbox provider: per sandbox a fresh copy of the repository and a spawned
//! `sandbox-sidecar serve` on loopback, isolated with bubblewrap where it works.
//!
//! Isolation (bwrap): no network (`--unshare-net`), the host read-only, only the workspace
//! writable, a private `/tmp`, and its own PID namespace so that killing the sandbox kills
//! everything in it. The sidecar inside cannot bind a port the trainer can reach (its
//! network namespace has only its own loopback), so the trainer binds the listening socket
//! in its own namespace and hands it over as a file descriptor (`serve --listen-fd 3`).
//! The host toolchain stays on PATH (the host is mounted read-only, the environment is
//! inherited), so a repository whose tests need `pytest` from a venv on PATH works.
//!
//! Without bwrap, teardown sends SIGTERM (the sidecar kills its sessions and commands), then
//! SIGKILL to its process group, then kills any process left in the sessions of its
//! children or working inside the sandbox directory.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use sandbox_sidecar::SidecarClient;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

use super::error::{InfraError, InfraKind};
use super::procs;
use super::sandbox::{Lease, Sandbox, SandboxProvider};

/// Environment variable naming the sidecar binary.
pub const SIDECAR_BIN_ENV: &str = "SELFPLAY_SIDECAR_BIN";
const SIDECAR_NAME: &str = "sandbox-sidecar";
const READY_PREFIX: &str = "listening on ";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Fd number the listening socket gets in the sidecar.
const LISTEN_FD: i32 = 3;

/// How sandboxes are isolated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Isolation {
    /// bubblewrap when it is installed and works here, else none (with a warning).
    #[default]
    Auto,
    /// bubblewrap or an error.
    Bubblewrap,
    /// No isolation: the sidecar runs as a plain child process.
    Off,
}

#[derive(Clone, Debug)]
pub struct LocalProviderConfig {
    /// Pool name → repository directory.
    pub pools: BTreeMap<String, PathBuf>,
    /// The sidecar binary; see [`find_sidecar_binary`] when `None`.
    pub sidecar_bin: Option<PathBuf>,
    pub isolation: Isolation,
    /// Where sandbox directories go (the system's temporary directory when `None`).
    pub work_dir: Option<PathBuf>,
    /// Further `serve` arguments.
    pub serve_args: Vec<String>,
    /// Directories put in front of PATH for everything in the sandbox (e.g. a venv's `bin`
    /// holding the repository's test runner).
    pub extra_path: Vec<PathBuf>,
}

impl LocalProviderConfig {
    /// One pool, `default`, on `repo`.
    pub fn single(repo: impl Into<PathBuf>) -> Self {
        Self {
            pools: [("default".to_string(), repo.into())].into_iter().collect(),
            sidecar_bin: None,
            isolation: Isolation::Auto,
            work_dir: None,
            serve_args: Vec::new(),
            extra_path: Vec::new(),
        }
    }
}

/// The sidecar binary: `$SELFPLAY_SIDECAR_BIN`, else next to the current executable or in
/// its parent directory (test binaries live in `target/<profile>/deps`), else on PATH.
pub fn find_sidecar_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(SIDECAR_BIN_ENV) {
        return Some(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent();
        for _ in 0..2 {
            let Some(d) = dir else { break };
            let candidate = d.join(SIDECAR_NAME);
            if candidate.is_file() {
                return Some(candidate);
            }
            dir = d.parent();
        }
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(SIDECAR_NAME))
        .find(|p| p.is_file())
}

/// The local provider.
#[derive(Debug)]
pub struct LocalProvider {
    pools: BTreeMap<String, PathBuf>,
    bin: PathBuf,
    bwrap: Option<PathBuf>,
    work_dir: PathBuf,
    serve_args: Vec<String>,
    /// PATH of the sidecar and so of every command in the sandbox.
    path: Option<std::ffi::OsString>,
    counter: AtomicU64,
}

fn acquire_err(msg: impl Into<String>) -> InfraError {
    InfraError::new(InfraKind::Acquire, msg)
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether bwrap can actually build a sandbox here (user namespaces may be off, e.g. in a
/// container), with the options the provider uses.
fn bwrap_works(bwrap: &Path) -> Result<(), String> {
    let out = std::process::Command::new(bwrap)
        .args([
            "--die-with-parent",
            "--unshare-all",
            "--ro-bind",
            "/",
            "/",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
        ])
        .args(["--tmpfs", "/tmp", "--", "true"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bwrap.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Whether the sidecar can take its listening socket as a file descriptor.
fn sidecar_takes_listen_fd(bin: &Path) -> bool {
    std::process::Command::new(bin)
        .args(["serve", "--help"])
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--listen-fd"))
        .unwrap_or(false)
}

impl LocalProvider {
    pub fn new(cfg: LocalProviderConfig) -> Result<Self, InfraError> {
        if cfg.pools.is_empty() {
            return Err(acquire_err("no repository given"));
        }
        for (pool, repo) in &cfg.pools {
            if !repo.is_dir() {
                return Err(acquire_err(format!(
                    "pool {pool}: {} is not a directory",
                    repo.display()
                )));
            }
        }
        let bin = cfg.sidecar_bin.clone().or_else(find_sidecar_binary).ok_or_else(|| {
            acquire_err(format!(
                "cannot find the {SIDECAR_NAME} binary: set {SIDECAR_BIN_ENV}, put it next to this \
                 executable or on PATH (cargo build -p sandbox-sidecar)"
            ))
        })?;
        let bwrap = match cfg.isolation {
            Isolation::Off => None,
            Isolation::Auto | Isolation::Bubblewrap => {
                let found = find_in_path("bwrap");
                let usable = match &found {
                    None => Err("bwrap is not installed".to_string()),
                    Some(b) => bwrap_works(b).and_then(|()| {
                        if sidecar_takes_listen_fd(&bin) {
                            Ok(())
                        } else {
                            Err(format!(
                                "{} does not support serve --listen-fd",
                                bin.display()
                            ))
                        }
                    }),
                };
                match (usable, cfg.isolation) {
                    (Ok(()), _) => found,
                    (Err(why), Isolation::Bubblewrap) => {
                        return Err(acquire_err(format!(
                            "bubblewrap isolation unavailable: {why}"
                        )));
                    }
                    (Err(why), _) => {
                        tracing::warn!(reason = %why, "sandboxes run without bubblewrap isolation");
                        None
                    }
                }
            }
        };
        let work_dir = cfg.work_dir.clone().unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&work_dir)
            .map_err(|e| acquire_err(format!("creating {}: {e}", work_dir.display())))?;
        let path = if cfg.extra_path.is_empty() {
            None
        } else {
            let host = std::env::var_os("PATH").unwrap_or_default();
            let dirs = cfg
                .extra_path
                .iter()
                .cloned()
                .chain(std::env::split_paths(&host));
            Some(
                std::env::join_paths(dirs)
                    .map_err(|e| acquire_err(format!("bad extra PATH entry: {e}")))?,
            )
        };
        Ok(Self {
            pools: cfg.pools,
            bin,
            bwrap,
            work_dir,
            serve_args: cfg.serve_args,
            path,
            counter: AtomicU64::new(0),
        })
    }

    /// Whether sandboxes run under bubblewrap.
    pub fn isolated(&self) -> bool {
        self.bwrap.is_some()
    }

    pub fn sidecar_binary(&self) -> &Path {
        &self.bin
    }

    async fn start(&self, pool: &str) -> Result<Sandbox, InfraError> {
        let repo = self
            .pools
            .get(pool)
            .ok_or_else(|| acquire_err(format!("no pool named {pool:?}")))?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let dir = tempfile::Builder::new()
            .prefix(&format!("selfplay-sandbox-{n}-"))
            .tempdir_in(&self.work_dir)
            .map_err(|e| acquire_err(format!("creating a sandbox directory: {e}")))?;
        let root = dir.path().to_path_buf();
        let workspace = root.join("workspace");
        let private = root.join("private");
        for d in [&workspace, &private] {
            std::fs::create_dir_all(d)
                .map_err(|e| acquire_err(format!("creating {}: {e}", d.display())))?;
        }
        copy_tree(repo, &workspace).await?;
        let token = hex::encode(rand::random::<[u8; 24]>());
        let token_file = private.join("token");
        write_private(&token_file, &token)
            .map_err(|e| acquire_err(format!("writing the token file: {e}")))?;

        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| acquire_err(format!("binding a loopback port: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| acquire_err(e.to_string()))?;
        let mut cmd = match &self.bwrap {
            Some(bwrap) => {
                let mut c = Command::new(bwrap);
                c.args([
                    "--die-with-parent",
                    "--new-session",
                    "--unshare-all",
                    "--ro-bind",
                    "/",
                    "/",
                ])
                .args(["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]);
                // The sandbox's /tmp is its own, which hides the sidecar binary and PATH
                // directories kept under the host's /tmp (a checkout or a venv there): those
                // are bound back, read-only; for a `bin` directory, its parent (a venv or
                // prefix, whose `lib` the programs need).
                let bin = std::iter::once(self.bin.clone());
                let path_dirs = self.path.iter().flat_map(std::env::split_paths).map(|d| {
                    match (d.file_name(), d.parent()) {
                        (Some(n), Some(parent)) if n == "bin" && parent != Path::new("/tmp") => {
                            parent.to_path_buf()
                        }
                        _ => d,
                    }
                });
                for p in bin.chain(path_dirs).filter(|p| p.starts_with("/tmp")) {
                    c.arg("--ro-bind-try").arg(&p).arg(&p);
                }
                c.arg("--bind")
                    .arg(&workspace)
                    .arg(&workspace)
                    .arg("--ro-bind")
                    .arg(&token_file)
                    .arg(&token_file)
                    .arg("--chdir")
                    .arg(&workspace)
                    .arg("--")
                    .arg(&self.bin)
                    .args(["serve", "--listen-fd", &LISTEN_FD.to_string()]);
                pass_fd(&mut c, listener.as_raw_fd());
                c
            }
            None => {
                let mut c = Command::new(&self.bin);
                c.args(["serve", "--listen", "127.0.0.1:0"]);
                c
            }
        };
        cmd.arg("--workspace")
            .arg(&workspace)
            .arg("--token-file")
            .arg(&token_file)
            .args(&self.serve_args)
            .current_dir(&workspace)
            .envs(self.path.iter().map(|p| ("PATH", p)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // A session of its own (and so a process group): teardown kills by session and
        // group, and must never reach the trainer's own session.
        // SAFETY: setsid is async-signal-safe and allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let listener_keep = listener;
        let mut child = cmd
            .spawn()
            .map_err(|e| acquire_err(format!("starting {}: {e}", self.bin.display())))?;
        let pid = child.id().unwrap_or(0);
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let mut lease = LocalLease {
            child: Some(child),
            pid,
            dir: Some(dir),
            isolated: self.bwrap.is_some(),
        };
        // The child holds its own copy of the listening socket now.
        drop(listener_keep);
        // The sidecar's log goes to ours, at debug level.
        if let Some(err) = stderr {
            let id = n;
            tokio::spawn(async move {
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    tracing::debug!(sandbox = id, "sidecar: {l}");
                }
            });
        }
        let ready = async {
            let Some(out) = stdout else {
                return Err("no stdout".to_string());
            };
            let mut lines = BufReader::new(out).lines();
            loop {
                match lines.next_line().await {
                    Ok(Some(l)) => {
                        if let Some(a) = l.trim().strip_prefix(READY_PREFIX) {
                            return Ok(a.to_string());
                        }
                    }
                    Ok(None) => return Err("the sidecar exited before it was ready".to_string()),
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        let printed = match tokio::time::timeout(STARTUP_TIMEOUT, ready).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => return Err(acquire_err(format!("{e} ({})", lease.exit_status()))),
            Err(_) => {
                return Err(acquire_err(format!(
                    "the sidecar was not ready within {STARTUP_TIMEOUT:?}"
                )));
            }
        };
        // Under bwrap the sidecar reports the address of the socket it was handed.
        let connect_to = if self.bwrap.is_some() {
            addr.to_string()
        } else {
            printed
        };
        let client = SidecarClient::connect(connect_to.clone(), &token)
            .await
            .map_err(|e| acquire_err(format!("connecting to the sidecar at {connect_to}: {e}")))?;
        client
            .health()
            .await
            .map_err(|e| acquire_err(format!("the sidecar at {connect_to} is not healthy: {e}")))?;
        tracing::debug!(sandbox = n, pool, addr = %connect_to, isolated = self.isolated(), "sandbox ready");
        Ok(Sandbox::new(
            format!("local-{n}"),
            pool,
            client,
            Some(workspace),
            Box::new(lease),
        ))
    }
}

impl SandboxProvider for LocalProvider {
    fn acquire<'a>(&'a self, pool: &'a str) -> BoxFuture<'a, Result<Sandbox, InfraError>> {
        Box::pin(self.start(pool))
    }

    fn pools(&self) -> Vec<String> {
        self.pools.keys().cloned().collect()
    }
}

/// `cp -a repo/. workspace/`: modes, symlinks, `.git` and all.
async fn copy_tree(from: &Path, to: &Path) -> Result<(), InfraError> {
    let out = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| acquire_err(format!("running cp: {e}")))?;
    if !out.status.success() {
        return Err(acquire_err(format!(
            "copying {} failed: {}",
            from.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content.as_bytes())
}

/// Makes `fd` the child's fd [`LISTEN_FD`], inherited across exec.
fn pass_fd(cmd: &mut Command, fd: i32) {
    // SAFETY: runs between fork and exec; dup2 and fcntl are async-signal-safe and nothing
    // is allocated.
    unsafe {
        cmd.pre_exec(move || {
            if fd == LISTEN_FD {
                let flags = nix::libc::fcntl(fd, nix::libc::F_GETFD);
                if flags < 0
                    || nix::libc::fcntl(fd, nix::libc::F_SETFD, flags & !nix::libc::FD_CLOEXEC) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            } else if nix::libc::dup2(fd, LISTEN_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

struct LocalLease {
    child: Option<tokio::process::Child>,
    pid: u32,
    dir: Option<tempfile::TempDir>,
    isolated: bool,
}

impl LocalLease {
    fn exit_status(&mut self) -> String {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(s))) => s.to_string(),
            _ => "still running".to_string(),
        }
    }

    /// Stops the sidecar and everything it started. `wait` polls for the graceful exit.
    fn teardown(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let root = self.dir.as_ref().map(|d| d.path().to_path_buf());
        let tree = procs::descendants(self.pid);
        if !self.isolated {
            // The sidecar kills its sessions and commands on SIGTERM.
            procs::signal(self.pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = std::time::Instant::now() + grace;
            while std::time::Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        procs::kill_group(self.pid);
        let _ = child.start_kill();
        // Whatever escaped: processes of the sidecar's tree, in their sessions, or working
        // inside the sandbox directory.
        procs::kill_leftovers(&tree, root.as_deref());
        for _ in 0..200 {
            if matches!(child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Remove the files only once nothing can write into them any more.
        drop(self.dir.take());
    }
}

impl Lease for LocalLease {
    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<(), InfraError>> {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || self.teardown(Duration::from_secs(2)))
                .await
                .map_err(|e| {
                    InfraError::new(InfraKind::Acquire, format!("sandbox teardown failed: {e}"))
                })
        })
    }
}

impl Drop for LocalLease {
    fn drop(&mut self) {
        self.teardown(Duration::from_millis(500));
    }
}
