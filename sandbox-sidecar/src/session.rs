//! Persistent bash sessions.
//!
//! Each session is one `bash --noprofile --norc` reading commands on its stdin. A short
//! command is sent as one line, `eval '<command, single-quoted>' </dev/null; __sc_end $?`:
//! quoted, its text is a literal to the shell's parser, so a syntax error in it is eval's
//! error and cannot eat the protocol; a long one, or one holding a NUL byte, is written to a
//! file and sourced. Either way it runs with stdin from `/dev/null`, then `__sc_end` (defined
//! once when the shell starts) prints a sentinel line carrying `$?` on stdout and another on
//! stderr. The sentinel holds a random nonce, so output cannot fake it.
//!
//! The line is kept short because bash reads a pipe one byte per system call: with the
//! sentinel printing written out in every line and the command read by `read -d ''`, the
//! round trip of `echo hello` from a C driver (`bench/bash_protocol.c`, driver and bash
//! pinned to one CPU) took 80–100 µs; this way, 40–56 µs.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::Mutex;

use crate::error::{Result, SidecarError};
use crate::output::CappedOutput;
use crate::process::{self, Rlimits};

/// How a session is started.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    pub cwd: PathBuf,
    pub env: HashMap<String, String>,
    pub rlimits: Rlimits,
}

/// The result of one session command.
#[derive(Debug)]
pub struct SessionOutcome {
    pub exit_code: i32,
    pub stdout: CappedOutput,
    pub stderr: CappedOutput,
    pub timed_out: bool,
    pub duration: Duration,
    pub restarted: bool,
    pub notice: String,
}

struct Shell {
    child: Child,
    stdin: ChildStdin,
    stdout: PipeReader<ChildStdout>,
    stderr: PipeReader<ChildStderr>,
    sid: u32,
    /// Starts both sentinel lines (stdout's carries `$?` after it).
    marker: Vec<u8>,
    /// Defines `__sc_end`; sent ahead of the first command.
    setup: Option<Vec<u8>>,
    /// Sources `cmd_file`.
    file_line: Vec<u8>,
    /// In-memory file the shell holds as [`CMD_FD`]: a file in the state directory would be
    /// hidden from a confined shell, and rewritable by the agent where it is not.
    cmd_file: std::os::fd::OwnedFd,
}

/// Longer commands go through a file: bash parses its input one byte per system call.
const INLINE_MAX: usize = 16 * 1024;
/// Where the shell finds long commands: high, so scripts' own redirections (bash saves
/// descriptors from 10 up) do not take it.
const CMD_FD: i32 = 250;
/// Ends every command line: prints the sentinels (see the module's documentation).
const END: &str = " </dev/null; __sc_end $?\n";

struct Slot {
    options: SessionOptions,
    shell: Option<Shell>,
    /// Why the shell went away; reported with the next command, which starts a new one.
    pending_restart: Option<String>,
}

/// All sessions of one sidecar.
pub struct Sessions {
    bash: Option<PathBuf>,
    /// Every shell's environment before its own variables (see `State::base_env`).
    base_env: Arc<[(OsString, OsString)]>,
    slots: std::sync::Mutex<HashMap<String, Arc<Mutex<Slot>>>>,
    active: Arc<std::sync::atomic::AtomicI64>,
    on_active_change: Box<dyn Fn(i64) + Send + Sync>,
}

impl Sessions {
    pub fn new(
        bash: Option<PathBuf>,
        base_env: Arc<[(OsString, OsString)]>,
        on_active_change: Box<dyn Fn(i64) + Send + Sync>,
    ) -> Self {
        Self {
            bash,
            base_env,
            slots: std::sync::Mutex::new(HashMap::new()),
            active: Arc::new(std::sync::atomic::AtomicI64::new(0)),
            on_active_change,
        }
    }

    pub fn active(&self) -> i64 {
        self.active.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn add_active(&self, delta: i64) {
        let now = self
            .active
            .fetch_add(delta, std::sync::atomic::Ordering::Relaxed)
            + delta;
        (self.on_active_change)(now);
    }

    fn slot(&self, id: &str, options: impl FnOnce() -> SessionOptions) -> (Arc<Mutex<Slot>>, bool) {
        let mut map = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(id) {
            return (s.clone(), false);
        }
        let slot = Arc::new(Mutex::new(Slot {
            options: options(),
            shell: None,
            pending_restart: None,
        }));
        map.insert(id.to_string(), slot.clone());
        (slot, true)
    }

    /// Creates a session with explicit options; false when it already existed.
    pub async fn open(&self, id: &str, options: SessionOptions) -> Result<bool> {
        validate_id(id)?;
        let (slot, created) = self.slot(id, || options);
        if created {
            let mut slot = slot.lock().await;
            self.ensure_shell(id, &mut slot).await?;
        }
        Ok(created)
    }

    pub async fn close(&self, id: &str) -> bool {
        let slot = {
            let mut map = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            map.remove(id)
        };
        let Some(slot) = slot else { return false };
        let mut slot = slot.lock().await;
        if let Some(shell) = slot.shell.take() {
            self.kill_shell(shell).await;
        }
        true
    }

    /// Kills every session (shutdown).
    pub async fn close_all(&self) {
        let ids: Vec<String> = {
            let map = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            map.keys().cloned().collect()
        };
        for id in ids {
            self.close(&id).await;
        }
    }

    async fn kill_shell(&self, mut shell: Shell) {
        process::kill_session(shell.sid);
        let _ = shell.child.wait().await;
        process::untrack(shell.sid);
        self.add_active(-1);
    }

    async fn ensure_shell(&self, id: &str, slot: &mut Slot) -> Result<()> {
        if slot.shell.is_some() {
            return Ok(());
        }
        let Some(bash) = &self.bash else {
            return Err(SidecarError::NoShell(
                "bash is not installed in this image; sessions need bash (Exec with argv still works)"
                    .into(),
            ));
        };
        let shell = spawn_shell(bash, &self.base_env, id, &slot.options)
            .map_err(|e| SidecarError::io("starting bash", e))?;
        slot.shell = Some(shell);
        self.add_active(1);
        Ok(())
    }

    /// Runs `command` in session `id`, creating the session on first use.
    pub async fn run(
        &self,
        id: &str,
        command: &str,
        timeout: Duration,
        cap: usize,
        default_cwd: &Path,
    ) -> Result<SessionOutcome> {
        validate_id(id)?;
        let (slot, _) = self.slot(id, || SessionOptions {
            cwd: default_cwd.to_path_buf(),
            ..Default::default()
        });
        let mut slot = slot.lock().await;
        let restarted_notice = slot.pending_restart.take();
        self.ensure_shell(id, &mut slot).await?;
        let start = Instant::now();
        let mut stdout = CappedOutput::new(cap);
        let mut stderr = CappedOutput::new(cap);
        let Some(shell) = slot.shell.as_mut() else {
            return Err(SidecarError::NoShell("session shell missing".into()));
        };
        let result = tokio::time::timeout(
            timeout,
            run_in_shell(shell, command, &mut stdout, &mut stderr),
        )
        .await;
        let mut notice = String::new();
        let restarted = restarted_notice.is_some();
        if let Some(n) = &restarted_notice {
            notice.push_str(n);
        }
        let (exit_code, timed_out) = match result {
            Ok(Ok(Some(code))) => (code, false),
            Ok(Ok(None)) | Ok(Err(_)) => {
                // The shell ended (`exit`, `set -e`, killed): report its status, restart
                // on the next command.
                let Some(mut shell) = slot.shell.take() else {
                    return Err(SidecarError::NoShell("session shell missing".into()));
                };
                process::kill_session(shell.sid);
                let status = shell.child.wait().await.ok();
                process::untrack(shell.sid);
                self.add_active(-1);
                let code = status.and_then(|s| s.code()).unwrap_or(-1);
                slot.pending_restart = Some(format!(
                    "the shell of session {id:?} exited (status {code}) during the previous command; \
                     a new shell was started: working directory and environment are back to their initial values"
                ));
                push_notice(
                    &mut notice,
                    &format!(
                        "the shell exited with status {code}; the next command starts a new one"
                    ),
                );
                (code, false)
            }
            Err(_elapsed) => {
                let Some(shell) = slot.shell.take() else {
                    return Err(SidecarError::NoShell("session shell missing".into()));
                };
                self.kill_shell(shell).await;
                slot.pending_restart = Some(format!(
                    "the previous command timed out and session {id:?} was restarted: \
                     working directory and environment are back to their initial values"
                ));
                push_notice(
                    &mut notice,
                    &format!(
                        "command timed out after {} ms; all its processes were killed and the session will be restarted",
                        timeout.as_millis()
                    ),
                );
                (-1, true)
            }
        };
        Ok(SessionOutcome {
            exit_code,
            stdout,
            stderr,
            timed_out,
            duration: start.elapsed(),
            restarted,
            notice,
        })
    }
}

fn push_notice(notice: &mut String, s: &str) {
    if !notice.is_empty() {
        notice.push_str("; ");
    }
    notice.push_str(s);
}

fn validate_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 128 {
        return Err(SidecarError::InvalidArgument(
            "session_id must be 1 to 128 characters".into(),
        ));
    }
    Ok(())
}

fn spawn_shell(
    bash: &PathBuf,
    base_env: &[(OsString, OsString)],
    id: &str,
    options: &SessionOptions,
) -> io::Result<Shell> {
    let nonce = hex::encode(rand::random::<[u8; 12]>());
    let cmd_file = crate::confine::memfd_with(c"session-command", b"")?;
    let mut cmd = Command::new(bash);
    cmd.arg("--noprofile")
        .arg("--norc")
        .current_dir(&options.cwd)
        .env_clear()
        .envs(base_env.iter().map(|(k, v)| (k, v)))
        .env("PAGER", "cat")
        .env("GIT_PAGER", "cat")
        .env("SANDBOX_SESSION", id)
        .envs(&options.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let raw = std::os::fd::AsRawFd::as_raw_fd(&cmd_file);
    // SAFETY: dup2 is async-signal-safe; it leaves the copy open across exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, CMD_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    process::prepare(&mut cmd, options.rlimits)?;
    let mut child = process::spawn_tracked(&mut cmd)?;
    let sid = child.id().unwrap_or(0);
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(io::Error::other("bash pipes missing"));
    };
    // `builtin`: a user's own `printf` function must not replace the sentinels.
    let setup = format!(
        "__sc_end() {{ builtin printf '\\n__SC_{nonce}_%d\\n' \"$1\"; builtin printf '\\n__SC_{nonce}_\\n' >&2; }}\n"
    );
    let file_line = format!(". /proc/self/fd/{CMD_FD}{END}");
    Ok(Shell {
        child,
        stdin,
        stdout: PipeReader::new(stdout),
        stderr: PipeReader::new(stderr),
        sid,
        marker: format!("\n__SC_{nonce}_").into_bytes(),
        setup: Some(setup.into_bytes()),
        file_line: file_line.into_bytes(),
        cmd_file,
    })
}

/// Single-quotes `s` for bash.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Runs one command; `Ok(None)` when the shell ended before printing its sentinel.
async fn run_in_shell(
    shell: &mut Shell,
    command: &str,
    stdout: &mut CappedOutput,
    stderr: &mut CappedOutput,
) -> io::Result<Option<i32>> {
    let mut msg = shell.setup.take().unwrap_or_default();
    if command.len() <= INLINE_MAX && !command.contains('\0') {
        msg.extend_from_slice(b"eval ");
        msg.extend_from_slice(shell_quote(command).as_bytes());
        msg.extend_from_slice(END.as_bytes());
    } else {
        crate::confine::memfd_replace(&shell.cmd_file, command.as_bytes())?;
        msg.extend_from_slice(&shell.file_line);
    }
    shell.stdin.write_all(&msg).await?;
    shell.stdin.flush().await?;
    let (rc, err_done) = tokio::join!(
        shell.stdout.read_until_marker(&shell.marker, stdout),
        shell.stderr.read_until_marker(&shell.marker, stderr),
    );
    let (Some(rc), Some(_)) = (rc?, err_done?) else {
        return Ok(None);
    };
    let code = std::str::from_utf8(&rc)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .unwrap_or(-1);
    Ok(Some(code))
}

/// A pipe read up to sentinel lines; bytes after a sentinel stay for the next command.
struct PipeReader<R> {
    pipe: R,
    pending: Vec<u8>,
    buf: Vec<u8>,
    eof: bool,
}

impl<R: AsyncRead + Unpin> PipeReader<R> {
    fn new(pipe: R) -> Self {
        Self {
            pipe,
            pending: Vec::new(),
            buf: vec![0u8; 64 * 1024],
            eof: false,
        }
    }

    /// Moves output into `out` up to `marker`, and returns the rest of the marker's line;
    /// `None` at end of file.
    async fn read_until_marker(
        &mut self,
        marker: &[u8],
        out: &mut CappedOutput,
    ) -> io::Result<Option<Vec<u8>>> {
        let finder = memchr::memmem::Finder::new(marker);
        loop {
            if let Some(pos) = finder.find(&self.pending) {
                let after = pos + marker.len();
                if let Some(nl) = memchr::memchr(b'\n', &self.pending[after..]) {
                    out.push(&self.pending[..pos]);
                    let tail = self.pending[after..after + nl].to_vec();
                    self.pending.drain(..after + nl + 1);
                    return Ok(Some(tail));
                }
            } else {
                // Flush everything that cannot be the start of a marker.
                let keep = marker.len().saturating_sub(1);
                if self.pending.len() > keep {
                    let cut = self.pending.len() - keep;
                    out.push(&self.pending[..cut]);
                    self.pending.drain(..cut);
                }
            }
            if self.eof {
                out.push(&self.pending);
                self.pending.clear();
                return Ok(None);
            }
            let n = self.pipe.read(&mut self.buf).await?;
            if n == 0 {
                self.eof = true;
            } else {
                self.pending.extend_from_slice(&self.buf[..n]);
            }
        }
    }
}
