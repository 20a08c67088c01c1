//! Spawning commands with limits, and killing everything a command started.
//!
//! Every child starts in a new session (`setsid`), so its session id is its pid. On timeout
//! the whole process group is killed, then any process still in that session (background
//! jobs that moved to their own process group) is found in `/proc` and killed too.

use std::io;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::child::CommandSpec;
use crate::output::CappedOutput;

/// Resource limits set in the child before `exec`; `None` leaves the inherited limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rlimits {
    pub memory_bytes: Option<u64>,
    pub max_processes: Option<u64>,
    pub max_file_size_bytes: Option<u64>,
    /// RLIMIT_CPU in seconds: a busy loop ends with SIGXCPU, then SIGKILL.
    pub cpu_seconds: Option<u64>,
}

/// How long to keep reading a command's pipes after it exited and its group was killed;
/// only a process that escaped into its own session can hold them open that long.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);
const READ_CHUNK: usize = 64 * 1024;
const STREAM_SEND_PATIENCE: Duration = Duration::from_secs(2);

/// Puts the child in its own session, makes it die with the sidecar, sets rlimits, and
/// applies [`crate::confine`] (seccomp; confinement with `serve --confine`).
pub fn prepare(cmd: &mut Command, rlimits: Rlimits) -> io::Result<()> {
    let hardening = crate::confine::current()?;
    // SAFETY: the closure runs between fork and exec and only makes raw system calls
    // (setsid, prctl, setrlimit, and those of `confine::apply`), which are
    // async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(io::Error::from)?;
            nix::sys::prctl::set_pdeathsig(Some(Signal::SIGKILL)).map_err(io::Error::from)?;
            if let Some(v) = rlimits.memory_bytes {
                setrlimit(Resource::RLIMIT_AS, v, v).map_err(io::Error::from)?;
            }
            if let Some(v) = rlimits.max_processes {
                setrlimit(Resource::RLIMIT_NPROC, v, v).map_err(io::Error::from)?;
            }
            if let Some(v) = rlimits.max_file_size_bytes {
                setrlimit(Resource::RLIMIT_FSIZE, v, v).map_err(io::Error::from)?;
            }
            if let Some(v) = rlimits.cpu_seconds {
                // The soft limit sends SIGXCPU; the hard one, a second later, SIGKILL.
                setrlimit(Resource::RLIMIT_CPU, v, v.saturating_add(1)).map_err(io::Error::from)?;
            }
            match crate::confine::apply(&hardening) {
                0 => Ok(()),
                e => Err(io::Error::from_raw_os_error(e)),
            }
        });
    }
    Ok(())
}

/// Only [`crate::confine`], for helpers the sidecar runs itself (git).
pub fn harden(cmd: &mut Command) -> io::Result<()> {
    let hardening = crate::confine::current()?;
    // SAFETY: as in `prepare`: raw system calls only.
    unsafe {
        cmd.pre_exec(move || match crate::confine::apply(&hardening) {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        });
    }
    Ok(())
}

/// Direct children the sidecar spawned and has not reaped yet (their pid is also their
/// session id). Spawning holds the lock, so the init-mode reaper never takes a child that
/// tokio is about to wait for.
static TRACKED: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

fn tracked() -> std::sync::MutexGuard<'static, Vec<u32>> {
    TRACKED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Spawns `cmd` and remembers its pid until [`untrack`].
pub fn spawn_tracked(cmd: &mut Command) -> io::Result<tokio::process::Child> {
    tracking(|| cmd.spawn(), tokio::process::Child::id)
}

/// Runs `spawn` holding the tracking lock and records the new child's pid.
fn tracking<C>(
    spawn: impl FnOnce() -> io::Result<C>,
    pid: impl Fn(&C) -> Option<u32>,
) -> io::Result<C> {
    let mut t = tracked();
    let child = spawn()?;
    if let Some(p) = pid(&child) {
        t.push(p);
    }
    Ok(child)
}

pub fn untrack(pid: u32) {
    tracked().retain(|p| *p != pid);
}

/// Kills every command and session still running (shutdown).
pub fn kill_all_tracked() {
    let pids: Vec<u32> = tracked().clone();
    for pid in pids {
        kill_session(pid);
    }
}

/// When the sidecar is PID 1 (a container's entrypoint) or a child subreaper, orphaned
/// processes are re-parented to it and must be reaped, or they stay zombies. Reaps zombie children that are not ours.
///
/// As PID 1 nothing else is needed: the kernel re-parents every orphan of the container to
/// PID 1 whether or not `PR_SET_CHILD_SUBREAPER` is set (it is set anyway, harmlessly), and
/// this task starts for either reason. Orphans that died before serving started (during
/// `--env-from-shell`) are found by the first scan. The scan reads `/proc`, which must be
/// the sidecar's own PID namespace's (Docker and Kubernetes mount it so); a waitpid(-1)
/// instead would take the exit status of children tokio waits for. SIGTERM and SIGINT,
/// which PID 1 would otherwise ignore, have handlers from the start of `serve` (see
/// `cli::Signals`). `tests/pid1.rs` runs the sidecar as PID 1 of a new PID namespace.
pub fn spawn_init_reaper() {
    let subreaper = {
        let mut v: libc::c_int = 0;
        // SAFETY: PR_GET_CHILD_SUBREAPER writes an int to the given address.
        unsafe { libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &raw mut v, 0, 0, 0) == 0 && v != 0 }
    };
    if std::process::id() != 1 && !subreaper {
        return;
    }
    tokio::spawn(async {
        let Ok(mut sigchld) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        else {
            return;
        };
        loop {
            tokio::select! {
                _ = sigchld.recv() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            reap_orphans();
            // At most a few scans a second, however many children exit.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

pub(crate) fn reap_orphans() {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    let t = tracked();
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some(st) = read_stat(pid)
            && st.ppid == me
            && st.state == 'Z'
            && !t.contains(&(pid as u32))
        {
            let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
        }
    }
}

/// Kills the process group `pgid` (cheap: one system call).
pub fn kill_group(pgid: u32) {
    if let Ok(raw) = i32::try_from(pgid)
        && raw > 1
    {
        let _ = killpg(Pid::from_raw(raw), Signal::SIGKILL);
    }
}

/// Kills the process group `sid` and every other process still in session `sid` (reads
/// `/proc`, so a millisecond or two; used on timeouts and cancellation).
pub fn kill_session(sid: u32) {
    let Ok(raw) = i32::try_from(sid) else { return };
    if raw <= 1 {
        return;
    }
    let _ = killpg(Pid::from_raw(raw), Signal::SIGKILL);
    // Two passes: a process caught mid-fork in the first may have a child in the second.
    for _ in 0..2 {
        for pid in pids_in_session(raw) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Processes whose session id is `sid`, read from `/proc/<pid>/stat`.
pub fn pids_in_session(sid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Some(stat) = read_stat(pid)
            && stat.session == sid
            && stat.state != 'Z'
        {
            out.push(pid);
        }
    }
    out
}

#[derive(Debug, Clone, Copy)]
pub struct ProcStat {
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
}

pub fn read_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    // The command name is in parentheses and may itself contain spaces or ')'.
    let after = &text[text.rfind(')')? + 1..];
    let mut f = after.split_ascii_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    let session = f.next()?.parse().ok()?;
    Some(ProcStat {
        state,
        ppid,
        pgrp,
        session,
    })
}

/// Finds bash: the usual places first, then `PATH`.
pub fn find_bash() -> Option<PathBuf> {
    for p in ["/bin/bash", "/usr/bin/bash", "/usr/local/bin/bash"] {
        if is_executable(Path::new(p)) {
            return Some(PathBuf::from(p));
        }
    }
    find_in_path("bash")
}

pub fn find_in_path(name: &str) -> Option<PathBuf> {
    find_in(&std::env::var_os("PATH")?, std::ffi::OsStr::new(name))
}

/// The first executable file called `name` in the directories of `path` (a `PATH` value).
pub(crate) fn find_in(path: &std::ffi::OsStr, name: &std::ffi::OsStr) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Where a chunk of streamed output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// What a finished command left.
#[derive(Debug)]
pub struct Outcome {
    pub status: Option<ExitStatus>,
    pub stdout: CappedOutput,
    pub stderr: CappedOutput,
    pub timed_out: bool,
    pub duration: Duration,
}

impl Outcome {
    /// The exit code, or -1 when the command was killed by a signal or never reported.
    pub fn exit_code(&self) -> i32 {
        self.status.and_then(|s| s.code()).unwrap_or(-1)
    }

    pub fn signal(&self) -> i32 {
        self.status.and_then(|s| s.signal()).unwrap_or(0)
    }
}

/// Live output for streaming callers: chunks go to `tx` until `cap` bytes per stream were
/// sent; the rest is kept (head and tail) in the outcome.
pub struct Streaming {
    pub tx: mpsc::Sender<(Stream, Vec<u8>)>,
    pub cap: usize,
}

struct Sink {
    kept: CappedOutput,
    streamed: usize,
}

impl Sink {
    fn new(cap: usize, streaming: bool) -> Self {
        // When streaming, what is not sent live is capped at half the cap again.
        let kept_cap = if streaming { cap / 2 } else { cap };
        Self {
            kept: CappedOutput::new(kept_cap),
            streamed: 0,
        }
    }

    async fn push(&mut self, which: Stream, data: &[u8], live: Option<&Streaming>) {
        let Some(live) = live else {
            self.kept.push(data);
            return;
        };
        let room = live.cap.saturating_sub(self.streamed);
        let send = room.min(data.len());
        if send > 0 {
            self.streamed += send;
            // A client that stops reading must not stall the command (and its timeout):
            // after a while its chunks are kept instead, and nothing more is streamed.
            let sent = tokio::time::timeout(
                STREAM_SEND_PATIENCE,
                live.tx.send((which, data[..send].to_vec())),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            if !sent {
                self.streamed = live.cap;
                self.kept.push(&data[..send]);
            }
        }
        if send < data.len() {
            self.kept.push(&data[send..]);
        }
    }
}

/// Runs `spec` to completion: feeds `stdin`, captures both streams under `cap`, and kills
/// the whole session of the command when `timeout` passes or when it exits (leftover
/// background jobs of a one-off command do not outlive it).
pub async fn run(
    spec: &CommandSpec,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
    cap: usize,
    rlimits: Rlimits,
    streaming: Option<Streaming>,
) -> io::Result<Outcome> {
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + timeout);
    let mut child = tracking(
        || crate::child::spawn(spec, stdin.is_some(), rlimits),
        |c| Some(c.id()),
    )?;
    let sid = child.id();
    let mut guard = SessionGuard(sid);

    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        tokio::spawn(async move {
            // The command may exit without reading its input; that is not our error.
            let _ = pipe.write_all(&data).await;
            let _ = pipe.shutdown().await;
        });
    }
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let mut out = Sink::new(cap, streaming.is_some());
    let mut err = Sink::new(cap, streaming.is_some());
    // Read into spare capacity: most commands print little, and zeroing two 64 KiB buffers
    // per command is measurable next to a 1 ms exec.
    let mut out_buf = Vec::with_capacity(READ_CHUNK);
    let mut err_buf = Vec::with_capacity(READ_CHUNK);
    let mut status: Option<ExitStatus> = None;
    let mut timed_out = false;
    let mut drain_until: Option<tokio::time::Instant> = None;

    loop {
        if status.is_some() && out_pipe.is_none() && err_pipe.is_none() {
            break;
        }
        let stop_at = drain_until.unwrap_or(deadline);
        tokio::select! {
            r = read_opt(&mut out_pipe, &mut out_buf) => match r {
                Ok(0) | Err(_) => out_pipe = None,
                Ok(_) => {
                    out.push(Stream::Stdout, &out_buf, streaming.as_ref()).await;
                    out_buf.clear();
                }
            },
            r = read_opt(&mut err_pipe, &mut err_buf) => match r {
                Ok(0) | Err(_) => err_pipe = None,
                Ok(_) => {
                    err.push(Stream::Stderr, &err_buf, streaming.as_ref()).await;
                    err_buf.clear();
                }
            },
            s = child.wait(), if status.is_none() => {
                status = Some(s?);
                untrack(sid);
                // Background jobs left in the command's group do not outlive it.
                kill_group(sid);
                guard.0 = 0;
                drain_until = Some(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
            }
            _ = tokio::time::sleep_until(stop_at) => {
                if drain_until.is_none() {
                    timed_out = true;
                    kill_session(sid);
                    guard.0 = 0;
                    status = Some(child.wait().await?);
                    untrack(sid);
                    drain_until = Some(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
                } else {
                    break;
                }
            }
        }
    }
    drop(guard);
    Ok(Outcome {
        status,
        stdout: out.kept,
        stderr: err.kept,
        timed_out,
        duration: start.elapsed(),
    })
}

/// Appends what the pipe has to `buf` (empty, with capacity) without zeroing it first.
async fn read_opt<R: AsyncRead + Unpin>(
    pipe: &mut Option<R>,
    buf: &mut Vec<u8>,
) -> io::Result<usize> {
    match pipe {
        Some(p) => p.read_buf(buf).await,
        None => std::future::pending().await,
    }
}

/// Kills the command's session if the future running it is dropped (client gone); the
/// child itself is then reaped by its own `Drop`. Disarmed (0) once the command was reaped,
/// so a recycled pid is never hit.
struct SessionGuard(u32);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.0 != 0 {
            kill_session(self.0);
            untrack(self.0);
        }
    }
}

/// Turns a spawn failure of an argv command into what a shell would report.
pub fn spawn_failure_outcome(program: &str, e: &io::Error) -> Outcome {
    let code = if e.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    };
    let mut stderr = CappedOutput::new(4096);
    stderr.push(format!("sandbox-sidecar: cannot run {program:?}: {e}\n").as_bytes());
    Outcome {
        status: Some(ExitStatus::from_raw(code << 8)),
        stdout: CappedOutput::new(0),
        stderr,
        timed_out: false,
        duration: Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The test's own session id can be 0 (its session leader lives outside this PID
    // namespace, as in CI containers), so check a child that `prepare` put in a new
    // session instead: its session and group ids must both be its pid.
    #[tokio::test]
    async fn prepared_child_leads_its_own_session() {
        let me = std::process::id() as i32;
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        prepare(&mut cmd, Rlimits::default()).expect("prepare");
        let mut child = spawn_tracked(&mut cmd).expect("spawn sleep");
        let pid = child.id().expect("pid") as i32;
        let st = read_stat(pid).expect("stat of the child");
        assert_eq!(st.ppid, me);
        assert_eq!(st.session, pid);
        assert_eq!(st.pgrp, pid);
        assert_eq!(pids_in_session(pid), vec![pid]);
        kill_session(pid as u32);
        let status = child.wait().await.expect("wait");
        untrack(pid as u32);
        assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
    }

    #[test]
    fn stat_parses_a_name_with_spaces_and_parens() {
        let st = parse_stat("4242 (a b) (c)) S 7 4242 4242 0 -1 4194560 0").expect("parses");
        assert_eq!(
            (st.state, st.ppid, st.pgrp, st.session),
            ('S', 7, 4242, 4242)
        );
        assert!(parse_stat("4242 (no close S 7 1 1").is_none());
        assert!(parse_stat("4242 (x) S notanumber 1 1").is_none());
    }
}
