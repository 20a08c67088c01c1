//! The command line: `sandbox-sidecar serve ...` runs the server; `sandbox-sidecar client ...`
//! talks to one and prints JSON.
//!
//! A library function rather than only a binary so that another program (the trainer) can
//! re-execute itself as `trainer sidecar serve ...` and run this, and a fresh clone needs no
//! separately built sidecar binary.

use std::ffi::OsString;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::client::{self, Error as ClientError, SidecarClient};
use crate::output::DEFAULT_OUTPUT_CAP;
use crate::process::Rlimits;
use crate::proto::*;
use crate::server::{self, ServeConfig};
use crate::service::Defaults;
use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "sandbox-sidecar",
    version,
    about = "Execution server for agent sandboxes, and its client"
)]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Call a running server; prints JSON on stdout. Exit status 1: the request was
    /// refused; 2: the sidecar could not be reached or failed.
    Client(ClientArgs),
    /// Copy this executable to DIR/sandbox-sidecar (atomically; DIR is created if
    /// needed) and print the installed path. For an init container of an image without a
    /// shell or `cp`.
    Install {
        /// The directory to install into.
        #[arg(long)]
        to: PathBuf,
    },
    /// Copy the contents of directory SRC into directory DST (created if missing):
    /// files with their permission bits and times, directories with their modes plus
    /// u+w, symlinks as they are (never followed), hard links as separate files; fifos,
    /// sockets and devices are skipped with a warning. Nothing is chowned. Prints a
    /// summary line. For an init container copying a root-owned repository for a
    /// non-root sandbox, in an image that may have no `cp`.
    Copy {
        /// The directory whose contents are copied.
        #[arg(long, value_name = "SRC")]
        from: PathBuf,
        /// The directory they are copied into.
        #[arg(long, value_name = "DST")]
        to: PathBuf,
    },
    /// Do nothing until SIGTERM or SIGINT (or, with --lease-file, until the lease is free),
    /// reaping orphans: the holder of a pod's shared volumes when Docker runs the pod (as
    /// the kubelet's pause container holds a pod's namespaces): a tmpfs volume lives while
    /// a container uses it, so the init containers' files survive until the sandbox runs.
    Pause {
        /// Stop once this file's exclusive lock can be taken (its holder is gone).
        #[arg(long)]
        lease_file: Option<PathBuf>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Address of the gRPC listener; port 0 picks a free port. The bound address is
    /// printed on stdout as `listening on ADDR`.
    #[arg(long, default_value = "0.0.0.0:7070")]
    listen: SocketAddr,
    /// Serve on an inherited, already listening TCP socket (this file descriptor) instead
    /// of binding `--listen`; for sandboxes without network whose parent binds the port.
    #[arg(long, conflicts_with = "listen")]
    listen_fd: Option<i32>,
    /// Serve on a Unix socket at PATH instead of TCP (a container without network, its
    /// socket directory bind-mounted from the host). A stale socket at PATH is replaced;
    /// the socket is made 0666 and removed at shutdown. Printed as `listening on
    /// unix:PATH`, the address the client takes.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["listen", "listen_fd"])]
    listen_unix: Option<PathBuf>,
    /// Bash code run once before serving (`source /opt/miniconda3/bin/activate
    /// testbed`), in the workspace, with the sidecar's environment; the environment it
    /// leaves is the base of every command, test script and session. The sidecar does
    /// not start when bash is missing or the script fails or takes over 60 s.
    #[arg(long, value_name = "SCRIPT")]
    env_from_shell: Option<String>,
    /// A file the trainer holds an exclusive flock on for as long as it lives. Checked
    /// every second; once the lock is free (its holder died) or the file cannot be
    /// opened, the sidecar shuts down as on SIGTERM. It must be openable at startup.
    #[arg(long, value_name = "PATH")]
    lease_file: Option<PathBuf>,
    /// The workspace every path is relative to (the repository).
    #[arg(long)]
    workspace: PathBuf,
    /// File holding the token every call must carry.
    #[arg(long, env = "SIDECAR_TOKEN_FILE")]
    token_file: PathBuf,
    /// Address of the HTTP listener for /metrics, /healthz and /readyz.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Where snapshots and scripts are kept (outside the workspace). Default: a fresh
    /// private directory in the system's temporary directory, removed at exit.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Also write the bound address to this file once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Default command timeout.
    #[arg(long, default_value_t = 120_000)]
    timeout_ms: u64,
    /// Longest timeout a request may ask for.
    #[arg(long, default_value_t = 3_600_000)]
    max_timeout_ms: u64,
    /// Default output cap per stream; head and tail are kept.
    #[arg(long, default_value_t = DEFAULT_OUTPUT_CAP as u64)]
    output_cap_bytes: u64,
    /// Default RLIMIT_AS of commands (unlimited when not given).
    #[arg(long)]
    memory_bytes: Option<u64>,
    /// Default RLIMIT_NPROC of commands (counted per user by the kernel).
    #[arg(long)]
    max_processes: Option<u64>,
    /// Default RLIMIT_FSIZE of commands.
    #[arg(long)]
    max_file_size_bytes: Option<u64>,
    /// Default RLIMIT_CPU of each process a command starts, in seconds.
    #[arg(long)]
    cpu_seconds: Option<u64>,
    /// How many request ids are remembered for idempotent retries.
    #[arg(long, default_value_t = 4096)]
    idempotency_capacity: usize,
    /// Worker threads (default: number of CPUs, at most 4).
    #[arg(long)]
    threads: Option<usize>,
    /// Confine every command: a private mount namespace in which the state directory, the
    /// directory of the token file and every --hide directory are covered by an empty
    /// read-only tmpfs, and no capabilities. Needs CAP_SYS_ADMIN (in the sidecar's user
    /// namespace); the sidecar refuses to start when it cannot do it.
    #[arg(long)]
    confine: bool,
    /// A snapshot or diff of a workspace whose regular files add up to more bytes than
    /// this is refused (ResourceExhausted) instead of running into its deadline.
    #[arg(long, default_value_t = 8 << 30)]
    max_workspace_bytes: u64,
    /// Likewise for the number of entries (files, directories, symlinks).
    #[arg(long, default_value_t = 1_000_000)]
    max_workspace_files: u64,
    /// A directory emptied (its content, never the directory itself nor the state
    /// directory inside it) before a test run that asks for a clean start; repeatable.
    /// Give only directories private to the sandbox (`/tmp`, `/dev/shm` under bwrap).
    #[arg(long, value_name = "DIR")]
    scratch_dir: Vec<PathBuf>,
    /// Another directory commands must not see (with --confine); repeatable.
    #[arg(long, value_name = "DIR", requires = "confine")]
    hide: Vec<PathBuf>,
}

#[derive(Args)]
struct ClientArgs {
    /// The sidecar's address: `host:port`, `http://host:port` or `unix:/path`.
    #[arg(long, env = "SIDECAR_ADDR")]
    addr: String,
    #[arg(long, env = "SIDECAR_TOKEN_FILE")]
    token_file: PathBuf,
    #[command(subcommand)]
    command: ClientCommand,
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Health and version.
    Health,
    /// Run a command: argv directly, or with --shell through `bash -c` (the words joined by
    /// spaces); with --session in that persistent session.
    Exec {
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[arg(long)]
        shell: bool,
        #[arg(long)]
        session: Option<String>,
        #[arg(long, default_value = "")]
        cwd: String,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Print a file's content.
    Read { path: String },
    /// Write a file from --content, --from FILE, or stdin.
    Write {
        path: String,
        #[arg(long)]
        content: Option<String>,
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Edit a file: replace the one occurrence of --old with --new, create it with
    /// --create, or view it with --view.
    Edit {
        path: String,
        #[arg(long)]
        old: Option<String>,
        #[arg(long)]
        new: Option<String>,
        #[arg(long)]
        create: Option<String>,
        #[arg(long)]
        overwrite: bool,
        #[arg(long)]
        view: bool,
    },
    /// Apply a patch file (all or nothing).
    Apply {
        patch: PathBuf,
        #[arg(long)]
        reverse: bool,
        #[arg(long)]
        check: bool,
    },
    /// The diff of the workspace against a snapshot.
    Diff {
        #[arg(long)]
        snapshot: Option<String>,
        #[arg(long)]
        include: Vec<String>,
        #[arg(long)]
        exclude: Vec<String>,
    },
    /// Take a snapshot.
    Snapshot {
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        exclude: Vec<String>,
    },
    /// Reset the workspace to a snapshot.
    Reset {
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove .git and initialise an empty repository.
    History,
    /// Run a test script and parse its output.
    Test {
        /// The test script (bash).
        #[arg(long)]
        script: PathBuf,
        /// A parser script reading the output on stdin and printing JSON {test: status}.
        #[arg(long)]
        parser: Option<PathBuf>,
        #[arg(long)]
        builtin: Option<BuiltinArg>,
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum BuiltinArg {
    Pytest,
    Unittest,
    Cargo,
    Go,
}

/// Runs the command line given in `args` (the first item is the program name) and returns
/// the exit status the process should end with. Usage errors, `--help` and `--version` are
/// printed and answered as clap does (status 2 for errors, 0 otherwise).
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let code = match cli.command {
        Top::Serve(args) => match serve(*args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("sandbox-sidecar: {e:#}");
                1
            }
        },
        Top::Client(args) => client_main(args),
        Top::Install { to } => match crate::install::install_self(&to) {
            Ok(path) => {
                println!("{}", path.display());
                0
            }
            Err(e) => {
                eprintln!("sandbox-sidecar: {e}");
                1
            }
        },
        Top::Pause { lease_file } => pause(lease_file),
        Top::Copy { from, to } => {
            let mut warn = |p: &std::path::Path, kind: &str| {
                eprintln!(
                    "sandbox-sidecar: warning: skipped {}: {kind} (only files, directories \
                     and symlinks are copied)",
                    p.display()
                );
            };
            match crate::copy::copy_tree(&from, &to, &mut warn) {
                Ok(s) => {
                    println!("copied {} to {}: {s}", from.display(), to.display());
                    0
                }
                Err(e) => {
                    eprintln!("sandbox-sidecar: copy: {e}");
                    1
                }
            }
        }
    };
    ExitCode::from(code)
}

fn pause(lease_file: Option<PathBuf>) -> u8 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandbox-sidecar: pause: {e}");
            return 1;
        }
    };
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int), Ok(mut chld)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::child()),
        ) else {
            eprintln!("sandbox-sidecar: pause: cannot install signal handlers");
            return 1;
        };
        let lease = async {
            match lease_file {
                Some(p) => crate::lease::watch(p, std::time::Duration::from_secs(1)).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(lease);
        loop {
            tokio::select! {
                _ = term.recv() => return 0,
                _ = int.recv() => return 0,
                why = &mut lease => {
                    eprintln!("sandbox-sidecar: pause: {why}");
                    return 0;
                }
                // As PID 1, orphans of the container become ours: reap them.
                _ = chld.recv() => {
                    while let Ok(s) = nix::sys::wait::waitpid(
                        None,
                        Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                    ) {
                        if s == nix::sys::wait::WaitStatus::StillAlive {
                            break;
                        }
                    }
                }
            }
        }
    })
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // Other processes of the same user (the agent's commands) must not read our memory,
    // which holds the oracle files.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "could not mark the process non-dumpable");
    }
    let token = crate::auth::read_token_file(&args.token_file)
        .with_context(|| format!("reading the token file {}", args.token_file.display()))?;
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4)
    });
    crate::confine::warn_if_unsupported();
    crate::confine::protect_current_thread();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .max_blocking_threads(BLOCKING_THREADS)
        // Every thread's id joins the ids commands may not signal (see `confine`); threads
        // are kept, so the set is complete once the pool was filled below.
        .on_thread_start(crate::confine::protect_current_thread)
        .on_thread_stop(crate::confine::forget_current_thread)
        .thread_keep_alive(Duration::from_secs(365 * 24 * 3600))
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(fill_blocking_pool());
    if let Some(lease) = &args.lease_file
        && let crate::lease::Lease::Unopenable(e) = crate::lease::probe(lease)
    {
        bail!("--lease-file {}: {e}", lease.display());
    }
    let mut cfg = ServeConfig {
        listen: args.listen,
        listen_fd: args.listen_fd,
        listen_unix: args.listen_unix,
        workspace: args.workspace,
        token,
        metrics_listen: args.metrics_listen,
        state_dir: args.state_dir,
        defaults: Defaults {
            timeout: Duration::from_millis(args.timeout_ms.max(1)),
            max_timeout: Duration::from_millis(args.max_timeout_ms.max(1)),
            output_cap: usize::try_from(args.output_cap_bytes).unwrap_or(usize::MAX),
            rlimits: Rlimits {
                memory_bytes: args.memory_bytes,
                max_processes: args.max_processes,
                max_file_size_bytes: args.max_file_size_bytes,
                cpu_seconds: args.cpu_seconds,
            },
        },
        idempotency_capacity: args.idempotency_capacity.max(1),
        scratch_dirs: args.scratch_dir,
        walk_limits: crate::snapshot::WalkLimits {
            max_bytes: args.max_workspace_bytes,
            max_files: args.max_workspace_files,
        },
        confine: if args.confine {
            let mut hide = args.hide;
            match crate::confine::parent_to_hide(&args.token_file) {
                Some(d) => hide.push(d),
                None => bail!(
                    "--confine: the token file {} must be in a directory of its own (not /), \
                     which commands cannot see",
                    args.token_file.display()
                ),
            }
            Some(hide)
        } else {
            None
        },
        base_env: None,
    };
    let ready_file = args.ready_file;
    let lease_file = args.lease_file;
    let env_script = args.env_from_shell;
    rt.block_on(async move {
        // Before anything slow: as PID 1 (a container's entrypoint) the kernel drops
        // signals that have no handler, so until here SIGTERM would go unnoticed and
        // `docker stop` would wait for its SIGKILL.
        let mut signals = Signals::install().context("installing signal handlers")?;
        if let Some(script) = env_script {
            let bash = crate::process::find_bash();
            let capture = crate::shellenv::capture(
                &script,
                bash.as_deref(),
                &cfg.workspace,
                crate::shellenv::TIMEOUT,
            );
            let env = tokio::select! {
                r = capture => r?,
                () = signals.recv() => {
                    tracing::info!("terminated while running --env-from-shell");
                    return Ok(());
                }
            };
            tracing::info!(variables = env.len(), "environment from --env-from-shell");
            cfg.base_env = Some(env);
        }
        let bound = server::bind(cfg).await?;
        // The ready file first: whoever reads `listening on` may look for it at once.
        if let Some(f) = ready_file {
            std::fs::write(&f, bound.addr.to_string())
                .with_context(|| format!("writing {}", f.display()))?;
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}{}", crate::spawn::READY_PREFIX, bound.addr)?;
        out.flush()?;
        drop(out);
        tracing::info!(addr = %bound.addr, metrics = ?bound.metrics_addr, "sandbox-sidecar ready");
        bound
            .serve(async move {
                let lease = async {
                    match lease_file {
                        Some(p) => crate::lease::watch(p, crate::lease::INTERVAL).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = signals.recv() => tracing::info!("shutting down"),
                    why = lease => tracing::info!("shutting down: {why}"),
                }
            })
            .await?;
        Ok(())
    })
}

const BLOCKING_THREADS: usize = 64;

/// Starts every thread of the blocking pool now: a bash session's seccomp filter is built
/// when it starts and must already list the threads that exist later.
async fn fill_blocking_pool() {
    let all_started = std::sync::Arc::new(std::sync::Barrier::new(BLOCKING_THREADS));
    let tasks: Vec<_> = (0..BLOCKING_THREADS)
        .map(|_| {
            let b = all_started.clone();
            tokio::task::spawn_blocking(move || {
                b.wait();
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

/// SIGTERM and SIGINT, handled from the moment they are installed.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

fn client_main(args: ClientArgs) -> u8 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandbox-sidecar: cannot start the runtime: {e}");
            return 2;
        }
    };
    match rt.block_on(client_run(args)) {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            0
        }
        Err(e) => {
            let code = match e.downcast_ref::<ClientError>() {
                Some(ce) if ce.is_infrastructure() => 2,
                Some(_) => 1,
                None => 1,
            };
            eprintln!("sandbox-sidecar: {e:#}");
            code
        }
    }
}

/// Sets `key` to the bytes as text for people and, where they are not UTF-8 (the text then
/// has replacement characters), `<key>_base64` to the bytes exactly.
fn put_bytes(v: &mut serde_json::Value, key: &str, b: &[u8]) {
    use base64::Engine as _;
    v[key] = json!(String::from_utf8_lossy(b));
    if std::str::from_utf8(b).is_err() {
        v[format!("{key}_base64")] = json!(base64::engine::general_purpose::STANDARD.encode(b));
    }
}

fn result_json(r: &CommandResult) -> serde_json::Value {
    let mut v = json!({
        "exit_code": r.exit_code,
        "signal": r.signal,
        "truncated": r.truncated,
        "timed_out": r.timed_out,
        "duration_ms": r.duration_us as f64 / 1000.0,
        "session_restarted": r.session_restarted,
        "notice": r.notice,
    });
    put_bytes(&mut v, "stdout", &r.stdout);
    put_bytes(&mut v, "stderr", &r.stderr);
    v
}

fn change_json(files: &[FileChange]) -> serde_json::Value {
    files
        .iter()
        .map(|f| json!({"path": f.path, "change": f.change, "old_path": f.old_path}))
        .collect()
}

async fn client_run(args: ClientArgs) -> anyhow::Result<serde_json::Value> {
    let token = crate::auth::read_token_file(&args.token_file)
        .with_context(|| format!("reading the token file {}", args.token_file.display()))?;
    let c = SidecarClient::connect(args.addr, token).await?;
    Ok(match args.command {
        ClientCommand::Health => {
            let h = c.health().await?;
            json!({"version": h.version, "uptime_ms": h.uptime_ms, "workspace": h.workspace,
                   "sessions_active": h.sessions_active, "git_available": h.git_available,
                   "bash_path": h.bash_path, "pid": h.pid})
        }
        ClientCommand::Exec {
            timeout_ms,
            shell,
            session,
            cwd,
            cmd,
        } => {
            let limits =
                timeout_ms.map(|ms| client::limits_with_timeout(Duration::from_millis(ms)));
            let r = if let Some(s) = session {
                c.session_run(&s, &cmd.join(" "), limits).await?
            } else if shell {
                c.exec(ExecRequest {
                    shell: cmd.join(" "),
                    cwd,
                    limits,
                    ..Default::default()
                })
                .await?
            } else {
                c.exec(ExecRequest {
                    argv: cmd,
                    cwd,
                    limits,
                    ..Default::default()
                })
                .await?
            };
            result_json(&r)
        }
        ClientCommand::Read { path } => {
            let r = c
                .read_file_request(ReadFileRequest {
                    path: path.clone(),
                    ..Default::default()
                })
                .await?;
            let mut v =
                json!({"path": path, "size": r.size, "truncated": r.truncated, "mode": r.mode});
            put_bytes(&mut v, "content", &r.content);
            v
        }
        ClientCommand::Write {
            path,
            content,
            from,
        } => {
            let data = match (content, from) {
                (Some(s), None) => s.into_bytes(),
                (None, Some(f)) => {
                    std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?
                }
                (None, None) => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .context("reading stdin")?;
                    buf
                }
                (Some(_), Some(_)) => bail!("give --content or --from, not both"),
            };
            let r = c.write_file(&path, data).await?;
            json!({"path": path, "bytes_written": r.bytes_written, "created": r.created})
        }
        ClientCommand::Edit {
            path,
            old,
            new,
            create,
            overwrite,
            view,
        } => {
            if view {
                let r = c.view(&path, 0, 0).await?;
                json!({"path": path, "total_lines": r.total_lines, "content": r.content})
            } else if let Some(content) = create {
                let r = c.create_file(&path, &content, overwrite).await?;
                json!({"path": r.path, "snippet": r.snippet})
            } else {
                let (Some(old), Some(new)) = (old, new) else {
                    bail!("give --old and --new, or --create CONTENT, or --view");
                };
                let r = c.str_replace(&path, &old, &new).await?;
                json!({"path": r.path, "snippet": r.snippet})
            }
        }
        ClientCommand::Apply {
            patch,
            reverse,
            check,
        } => {
            let data =
                std::fs::read(&patch).with_context(|| format!("reading {}", patch.display()))?;
            let r = c.apply_patch(data, reverse, check).await?;
            json!({"files": change_json(&r.files), "checked_only": check})
        }
        ClientCommand::Diff {
            snapshot,
            include,
            exclude,
        } => {
            let inc: Vec<&str> = include.iter().map(|s| s.as_str()).collect();
            let exc: Vec<&str> = exclude.iter().map(|s| s.as_str()).collect();
            let r = c.diff(snapshot.as_deref(), &inc, &exc).await?;
            let mut v = json!({"files": change_json(&r.files), "binary_files": r.binary_files});
            put_bytes(&mut v, "diff", &r.diff);
            v
        }
        ClientCommand::Snapshot { name, exclude } => {
            let exc: Vec<&str> = exclude.iter().map(|s| s.as_str()).collect();
            let r = c.snapshot(name.as_deref(), &exc).await?;
            json!({"name": r.name, "files": r.files, "bytes": r.bytes, "duration_ms": r.duration_us as f64 / 1000.0})
        }
        ClientCommand::Reset { name } => {
            let r = c.reset(name.as_deref()).await?;
            json!({"restored": r.restored, "removed": r.removed, "unchanged": r.unchanged,
                   "duration_ms": r.duration_us as f64 / 1000.0})
        }
        ClientCommand::History => {
            let r = c.reset_history().await?;
            json!({"removed": r.removed, "initialized": r.initialized, "git_available": r.git_available, "message": r.message})
        }
        ClientCommand::Test {
            script,
            parser,
            builtin,
            timeout_ms,
        } => {
            let script = std::fs::read_to_string(&script)
                .with_context(|| format!("reading {}", script.display()))?;
            let parser_script = match parser {
                Some(p) => std::fs::read_to_string(&p)
                    .with_context(|| format!("reading {}", p.display()))?,
                None => String::new(),
            };
            let builtin = match builtin {
                None => BuiltinParser::Unspecified,
                Some(BuiltinArg::Pytest) => BuiltinParser::Pytest,
                Some(BuiltinArg::Unittest) => BuiltinParser::Unittest,
                Some(BuiltinArg::Cargo) => BuiltinParser::Cargo,
                Some(BuiltinArg::Go) => BuiltinParser::GoTestJson,
            };
            if parser_script.is_empty() && builtin == BuiltinParser::Unspecified {
                bail!("give --parser FILE or --builtin");
            }
            let r = c
                .run_tests(RunTestsRequest {
                    script,
                    parser_script,
                    builtin: builtin as i32,
                    limits: timeout_ms
                        .map(|ms| client::limits_with_timeout(Duration::from_millis(ms))),
                    ..Default::default()
                })
                .await?;
            let statuses: serde_json::Map<String, serde_json::Value> = r
                .statuses_typed()
                .into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        json!(
                            v.as_str_name()
                                .trim_start_matches("TEST_STATUS_")
                                .to_ascii_lowercase()
                        ),
                    )
                })
                .collect();
            json!({
                "statuses": statuses,
                "run": r.run.as_ref().map(result_json),
                "parser_stderr": r.parser_stderr,
                "parser_error": r.parser_error,
            })
        }
    })
}
