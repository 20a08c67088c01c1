//! The local sandbox provider: per sandbox a fresh copy of the repository and a spawned
//! sidecar (`sandbox-sidecar serve`, or the trainer itself as `trainer sidecar serve`) on
//! loopback, isolated with bubblewrap where it works.
//!
//! Isolation (bwrap): no network, no view of the host but the system directories (`/usr`,
//! `/etc`, …) and the toolchain (see [`toolchain`]), read-only; the workspace copy is the
//! only writable host directory; private `/tmp` and `/dev/shm`; its own PID namespace, so
//! killing the sandbox kills everything in it. The run's output directory, the pool's
//! repository and other sandboxes are not mounted at all. The sidecar inside confines the
//! agent's commands further (`serve --confine`: its state and token hidden, no
//! capabilities, it cannot be signalled). The sidecar cannot bind a port the trainer can
//! reach (its network namespace has only its own loopback), so the trainer binds the
//! listening socket and hands it over as a file descriptor (`serve --listen-fd 3`).
//!
//! The environment is cleared: a sandbox gets `PATH` (the toolchain's `bin` directories),
//! `HOME`, `LANG`, and what the pool's template sets, never the trainer's variables.
//!
//! Without bwrap, teardown sends SIGTERM (the sidecar kills its sessions and commands), then
//! SIGKILL to its process group, then kills any process left in the sessions of its
//! children or working inside the sandbox directory.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use sandbox_sidecar::SidecarClient;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

use super::error::{InfraError, InfraKind};
use super::procs;
use super::sandbox::{Lease, Sandbox, SandboxProvider};
use super::toolchain::{Toolchain, is_system_path};

/// Environment variable naming the sidecar binary.
pub const SIDECAR_BIN_ENV: &str = "SELFPLAY_SIDECAR_BIN";
const SIDECAR_NAME: &str = "sandbox-sidecar";
/// The trainer binary, which serves as the sidecar too (`trainer sidecar …`).
const TRAINER_NAME: &str = "trainer";
/// The trainer's subcommand that runs the sidecar's command line.
pub const TRAINER_SIDECAR_ARG: &str = "sidecar";
const READY_PREFIX: &str = "listening on ";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Fd number the listening socket gets in the sidecar.
const LISTEN_FD: i32 = 3;
/// Where the sandbox's home and temporary files live (a private tmpfs under bwrap).
const SANDBOX_TMP: &str = "/tmp";

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

/// How to start a sidecar: a program and the arguments before `serve`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarProgram {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl SidecarProgram {
    /// The standalone `sandbox-sidecar` binary.
    pub fn standalone(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
        }
    }

    /// The trainer binary, serving as the sidecar (`trainer sidecar …`).
    pub fn trainer(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: vec![TRAINER_SIDECAR_ARG.into()],
        }
    }
}

/// Set by the trainer binary: the running executable serves as the sidecar.
static SELF_IS_SIDECAR: OnceLock<()> = OnceLock::new();

/// Declares that the running executable is the trainer, which serves as the sidecar, so
/// that a fresh build needs no separate `sandbox-sidecar` binary.
pub fn serve_sidecar_from_this_executable() {
    let _ = SELF_IS_SIDECAR.set(());
}

/// Limits of each command in a sandbox (rlimits the sidecar sets on its children).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxLimits {
    /// RLIMIT_AS of each process.
    pub memory_bytes: u64,
    /// RLIMIT_NPROC (per user of the sandbox's user namespace under bwrap).
    pub max_processes: u64,
    /// RLIMIT_FSIZE: the largest file a command may write.
    pub max_file_size_bytes: u64,
    /// RLIMIT_CPU of each process, in seconds.
    pub cpu_seconds: u64,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 4 << 30,
            max_processes: 1024,
            max_file_size_bytes: 1 << 30,
            cpu_seconds: 600,
        }
    }
}

/// What a pool's sandboxes see and may use besides their repository.
#[derive(Clone, Debug, Default)]
pub struct PoolSettings {
    /// Host directories visible read-only, whose `bin` directories (or themselves) go on
    /// PATH; `None`: the toolchain of the trainer's own PATH.
    pub toolchain: Option<Vec<PathBuf>>,
    /// Environment variables of the sandbox (the pool template's `env`).
    pub env: Vec<(String, String)>,
    pub limits: SandboxLimits,
}

#[derive(Clone, Debug)]
pub struct LocalProviderConfig {
    /// Pool name → repository directory.
    pub pools: BTreeMap<String, PathBuf>,
    /// Per pool (default settings for a pool not named here).
    pub pool_settings: BTreeMap<String, PoolSettings>,
    /// How to start the sidecar; see [`find_sidecar`] when `None`.
    pub sidecar: Option<SidecarProgram>,
    pub isolation: Isolation,
    /// Where sandbox directories go (the system's temporary directory when `None`).
    pub work_dir: Option<PathBuf>,
    /// Further `serve` arguments.
    pub serve_args: Vec<String>,
    /// Directories put in front of PATH for everything in the sandbox (e.g. a venv's `bin`
    /// holding the repository's test runner), visible read-only.
    pub extra_path: Vec<PathBuf>,
    /// Host paths a sandbox must never see (the run's output directory); a toolchain
    /// directory holding one of them is left out.
    pub hidden: Vec<PathBuf>,
}

impl LocalProviderConfig {
    /// One pool, `default`, on `repo`.
    pub fn single(repo: impl Into<PathBuf>) -> Self {
        Self {
            pools: [("default".to_string(), repo.into())].into_iter().collect(),
            pool_settings: BTreeMap::new(),
            sidecar: None,
            isolation: Isolation::Auto,
            work_dir: None,
            serve_args: Vec::new(),
            extra_path: Vec::new(),
            hidden: Vec::new(),
        }
    }
}

/// How to start a sidecar here: `$SELFPLAY_SIDECAR_BIN`; else this executable when it is
/// the trainer; else a `trainer` or `sandbox-sidecar` next to the current executable or in
/// its parent directory (test binaries live in `target/<profile>/deps`); else
/// `sandbox-sidecar` on PATH.
pub fn find_sidecar() -> Option<SidecarProgram> {
    if let Some(p) = std::env::var_os(SIDECAR_BIN_ENV) {
        return Some(SidecarProgram::standalone(p));
    }
    let exe = std::env::current_exe().ok();
    if SELF_IS_SIDECAR.get().is_some()
        && let Some(exe) = &exe
    {
        return Some(SidecarProgram::trainer(exe));
    }
    if let Some(exe) = &exe {
        let mut dir = exe.parent();
        for _ in 0..2 {
            let Some(d) = dir else { break };
            // The trainer first: cargo builds it for the trainer's own tests, so it is never
            // older than the code under test, where a standalone binary may be.
            let trainer = d.join(TRAINER_NAME);
            if trainer.is_file() {
                return Some(SidecarProgram::trainer(trainer));
            }
            let standalone = d.join(SIDECAR_NAME);
            if standalone.is_file() {
                return Some(SidecarProgram::standalone(standalone));
            }
            dir = d.parent();
        }
    }
    find_in_path(SIDECAR_NAME).map(SidecarProgram::standalone)
}

/// What one pool's sandboxes get, resolved once.
#[derive(Debug)]
struct PoolRuntime {
    repo: PathBuf,
    /// PATH inside the sandbox.
    path: OsString,
    /// Directories bound read-only (under bwrap).
    binds: Vec<PathBuf>,
    env: Vec<(String, String)>,
    limits: SandboxLimits,
}

/// The local provider.
#[derive(Debug)]
pub struct LocalProvider {
    pools: BTreeMap<String, PoolRuntime>,
    sidecar: SidecarProgram,
    bwrap: Option<PathBuf>,
    /// The sidecar supports `--confine` (and so the clean starts of its test runs).
    confine: bool,
    work_dir: PathBuf,
    serve_args: Vec<String>,
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

/// The bwrap arguments that make the sandbox's view of the host: system directories and
/// `binds` read-only, private `/tmp` and `/dev/shm`, nothing else.
fn bwrap_base_args(binds: &[PathBuf]) -> Vec<OsString> {
    let mut a: Vec<OsString> = ["--die-with-parent", "--new-session", "--unshare-all"]
        .map(OsString::from)
        .to_vec();
    for dir in super::toolchain::SYSTEM_DIRS {
        let p = Path::new(dir);
        match std::fs::symlink_metadata(p) {
            // `/bin` → `usr/bin` on merged-/usr systems: the same link inside.
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(p) {
                    a.extend(["--symlink".into(), target.into(), p.into()]);
                }
            }
            Ok(m) if m.is_dir() => a.extend(["--ro-bind".into(), p.into(), p.into()]),
            _ => {}
        }
    }
    a.extend(
        [
            "--dev",
            "/dev",
            "--proc",
            "/proc",
            "--tmpfs",
            SANDBOX_TMP,
            "--tmpfs",
            "/dev/shm",
        ]
        .map(OsString::from),
    );
    for b in binds {
        a.extend(["--ro-bind-try".into(), b.into(), b.into()]);
    }
    a
}

/// Whether bwrap can actually build a sandbox here (user namespaces may be off, e.g. in a
/// container), with the options the provider uses.
fn bwrap_works(bwrap: &Path) -> Result<(), String> {
    let out = std::process::Command::new(bwrap)
        .args(bwrap_base_args(&[]))
        .args(["--", "true"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bwrap.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// The `serve --help` text of the sidecar (to see which options it has).
fn serve_help(s: &SidecarProgram) -> String {
    std::process::Command::new(&s.program)
        .args(&s.args)
        .args(["serve", "--help"])
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
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
        let sidecar = cfg.sidecar.clone().or_else(find_sidecar).ok_or_else(|| {
            acquire_err(format!(
                "cannot find the sidecar: set {SIDECAR_BIN_ENV}, put {SIDECAR_NAME} next to this \
                 executable or on PATH (cargo build -p sandbox-sidecar)"
            ))
        })?;
        let help = serve_help(&sidecar);
        let bwrap = match cfg.isolation {
            Isolation::Off => None,
            Isolation::Auto | Isolation::Bubblewrap => {
                let found = find_in_path("bwrap");
                let usable = match &found {
                    None => Err("bwrap is not installed".to_string()),
                    Some(b) => bwrap_works(b).and_then(|()| {
                        if help.contains("--listen-fd") {
                            Ok(())
                        } else {
                            Err(format!(
                                "{} does not support serve --listen-fd",
                                sidecar.program.display()
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
        let confine = bwrap.is_some() && help.contains("--confine");
        if bwrap.is_some() && !confine {
            tracing::warn!(
                sidecar = %sidecar.program.display(),
                "this sidecar cannot confine commands (no serve --confine): agents can reach its state"
            );
        }
        let work_dir = cfg.work_dir.clone().unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&work_dir)
            .map_err(|e| acquire_err(format!("creating {}: {e}", work_dir.display())))?;
        // Nothing a sandbox must not see may come in through a toolchain directory.
        let mut hidden = cfg.hidden.clone();
        hidden.extend(cfg.pools.values().cloned());
        // Sandboxes are made in the work directory, under names of their own: a toolchain
        // that holds it would show them, one beside them (a venv under /tmp) shows nothing.
        let parents = [work_dir.clone()];
        let mut pools = BTreeMap::new();
        for (name, repo) in &cfg.pools {
            let settings = cfg.pool_settings.get(name).cloned().unwrap_or_default();
            let toolchain = match &settings.toolchain {
                Some(dirs) => Toolchain::from_dirs(&cfg.extra_path, dirs),
                None => Toolchain::from_path(
                    &cfg.extra_path,
                    &std::env::var_os("PATH").unwrap_or_default(),
                ),
            }
            .without(&hidden, &parents);
            let mut binds = toolchain.roots;
            if !is_system_path(&sidecar.program) {
                binds.push(sidecar.program.clone());
            }
            pools.insert(
                name.clone(),
                PoolRuntime {
                    repo: repo.clone(),
                    path: std::env::join_paths(&toolchain.path)
                        .map_err(|e| acquire_err(format!("bad PATH entry: {e}")))?,
                    binds,
                    env: settings.env,
                    limits: settings.limits,
                },
            );
        }
        Ok(Self {
            pools,
            sidecar,
            bwrap,
            confine,
            work_dir,
            serve_args: cfg.serve_args,
            counter: AtomicU64::new(0),
        })
    }

    /// Whether sandboxes run under bubblewrap.
    pub fn isolated(&self) -> bool {
        self.bwrap.is_some()
    }

    /// Whether the sidecar confines the agent's commands (its state and token hidden, no
    /// capabilities, test runs with a clean start).
    pub fn confined(&self) -> bool {
        self.confine
    }

    pub fn sidecar(&self) -> &SidecarProgram {
        &self.sidecar
    }

    /// PATH inside `pool`'s sandboxes.
    pub fn sandbox_path(&self, pool: &str) -> Option<&std::ffi::OsStr> {
        self.pools.get(pool).map(|p| p.path.as_os_str())
    }

    async fn start(&self, pool: &str) -> Result<Sandbox, InfraError> {
        let rt = self
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
        let state = root.join("state");
        for d in [&workspace, &private, &state] {
            std::fs::create_dir_all(d)
                .map_err(|e| acquire_err(format!("creating {}: {e}", d.display())))?;
        }
        copy_tree(&rt.repo, &workspace).await?;
        let token = hex::encode(rand::random::<[u8; 24]>());
        let token_file = private.join("token");
        write_private(&token_file, &token)
            .map_err(|e| acquire_err(format!("writing the token file: {e}")))?;

        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| acquire_err(format!("binding a loopback port: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| acquire_err(e.to_string()))?;
        let home = match &self.bwrap {
            Some(_) => PathBuf::from(SANDBOX_TMP),
            None => {
                let h = root.join("home");
                std::fs::create_dir_all(&h)
                    .map_err(|e| acquire_err(format!("creating {}: {e}", h.display())))?;
                h
            }
        };
        let mut cmd = match &self.bwrap {
            Some(bwrap) => {
                let mut c = Command::new(bwrap);
                c.args(bwrap_base_args(&rt.binds))
                    .arg("--bind")
                    .arg(&workspace)
                    .arg(&workspace)
                    .arg("--bind")
                    .arg(&state)
                    .arg(&state)
                    .arg("--ro-bind")
                    .arg(&token_file)
                    .arg(&token_file)
                    .arg("--chdir")
                    .arg(&workspace)
                    .arg("--")
                    .arg(&self.sidecar.program)
                    .args(&self.sidecar.args)
                    .args(["serve", "--listen-fd", &LISTEN_FD.to_string()]);
                if self.confine {
                    c.args([
                        "--confine",
                        "--scratch-dir",
                        SANDBOX_TMP,
                        "--scratch-dir",
                        "/dev/shm",
                    ]);
                }
                pass_fd(&mut c, listener.as_raw_fd());
                c
            }
            None => {
                let mut c = Command::new(&self.sidecar.program);
                c.args(&self.sidecar.args)
                    .args(["serve", "--listen", "127.0.0.1:0"]);
                c
            }
        };
        let limits = rt.limits;
        cmd.arg("--workspace")
            .arg(&workspace)
            .arg("--token-file")
            .arg(&token_file)
            .arg("--state-dir")
            .arg(&state)
            .arg(format!("--memory-bytes={}", limits.memory_bytes))
            .arg(format!("--max-processes={}", limits.max_processes))
            .arg(format!(
                "--max-file-size-bytes={}",
                limits.max_file_size_bytes
            ))
            .arg(format!("--cpu-seconds={}", limits.cpu_seconds))
            .args(&self.serve_args)
            .current_dir(&workspace)
            // Nothing of the trainer's environment: what the sandbox needs, and what the
            // pool sets.
            .env_clear()
            .env("PATH", &rt.path)
            .env("HOME", &home)
            .env("LANG", "C.UTF-8")
            .envs(rt.env.iter().map(|(k, v)| (k, v)))
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
        let cgroup = pids_cgroup(limits.max_processes);
        if let Some(cg) = &cgroup {
            join_cgroup(&mut cmd, cg)?;
        }
        let listener_keep = listener;
        let mut child = cmd.spawn().map_err(|e| {
            acquire_err(format!("starting {}: {e}", self.sidecar.program.display()))
        })?;
        let pid = child.id().unwrap_or(0);
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let mut lease = LocalLease {
            child: Some(child),
            pid,
            dir: Some(dir),
            isolated: self.bwrap.is_some(),
            cgroup,
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

/// A copy of the repository that belongs to the user the sandbox runs as, whoever owns the
/// source (an unpacked archive keeps its uid; a sandbox without capabilities could not
/// write such files): modes, symlinks, timestamps, `.git` and all, but not the owners.
async fn copy_tree(from: &Path, to: &Path) -> Result<(), InfraError> {
    let out = Command::new("cp")
        .args(["-a", "--no-preserve=ownership"])
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
    /// The sandbox's pids cgroup, removed once its processes are gone.
    cgroup: Option<PathBuf>,
}

/// Where per-sandbox pids cgroups go: cgroup v1's pids hierarchy, or the v2 hierarchy
/// (mounted at `/sys/fs/cgroup` or `/sys/fs/cgroup/unified`) when it has the pids
/// controller.
fn pids_cgroup_root() -> Option<PathBuf> {
    let v1 = Path::new("/sys/fs/cgroup/pids");
    if v1.join("cgroup.procs").is_file() {
        return Some(v1.join("selfplay"));
    }
    for v2 in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let v2 = Path::new(v2);
        let controllers =
            std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "pids") {
            return Some(v2.join("selfplay"));
        }
    }
    None
}

/// A pids cgroup holding at most `max` tasks, for one sandbox. RLIMIT_NPROC alone does not
/// hold when the trainer runs as root: the kernel never applies it to the initial
/// namespace's root user, which a bubblewrap sandbox's root maps to, and a fork bomb would
/// take the host's process table. `None` where cgroups cannot be written (not root, a
/// read-only cgroupfs): RLIMIT_NPROC then applies, as the user is not root.
fn pids_cgroup(max: u64) -> Option<PathBuf> {
    // Unique in this process whatever the number of providers, and across processes.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let root = pids_cgroup_root()?;
    if let Some(parent) = root.parent()
        && std::fs::read_to_string(parent.join("cgroup.subtree_control"))
            .is_ok_and(|c| !c.split_whitespace().any(|x| x == "pids"))
    {
        // cgroup v2: the parent must hand the pids controller down.
        let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+pids");
    }
    let dir = root.join(name);
    if let Err(e) = std::fs::create_dir_all(&root).and_then(|()| std::fs::create_dir(&dir)) {
        tracing::debug!(error = %e, "no pids cgroup for sandboxes");
        return None;
    }
    match std::fs::write(dir.join("pids.max"), max.to_string()) {
        Ok(()) => Some(dir),
        Err(e) => {
            tracing::debug!(error = %e, "no pids limit for sandboxes");
            // Ours, just made, and empty.
            let _ = std::fs::remove_dir(&dir);
            None
        }
    }
}

/// Moves the child into `cgroup` between fork and exec.
fn join_cgroup(cmd: &mut Command, cgroup: &Path) -> Result<(), InfraError> {
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes())
        .map_err(|e| acquire_err(format!("cgroup path: {e}")))?;
    // SAFETY: runs between fork and exec; open, write and close are async-signal-safe and
    // the path was built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = nix::libc::open(procs.as_ptr(), nix::libc::O_WRONLY | nix::libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0": the writing process itself.
            let n = nix::libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            nix::libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    Ok(())
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
        if let Some(cg) = self.cgroup.take() {
            for _ in 0..100 {
                if std::fs::remove_dir(&cg).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
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
