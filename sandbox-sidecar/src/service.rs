//! The gRPC service: each RPC checks its input, does the work (blocking file work on the
//! blocking pool), records metrics, and answers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::child::CommandSpec;
use crate::error::SidecarError;
use crate::idempotency::IdempotencyCache;
use crate::metrics::{Metrics, Outcome as MetricOutcome};
use crate::oracle::Oracle;
use crate::output::CappedOutput;
use crate::paths::Workspace;
use crate::process::{self, Rlimits, Streaming};
use crate::proto::sidecar_server::Sidecar;
use crate::proto::*;
use crate::session::{SessionOptions, Sessions};
use crate::snapshot::Snapshots;
use crate::{cleanup, editor, files, history, patch, testparse};

/// Output kept for parsing test results, far above the cap of what is returned.
const TEST_PARSE_CAP: usize = 64 * 1024 * 1024;
const DEFAULT_SNAPSHOT: &str = "baseline";

/// Server-wide defaults, from the command line.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub timeout: Duration,
    pub max_timeout: Duration,
    pub output_cap: usize,
    pub rlimits: Rlimits,
}

pub struct State {
    pub ws: Workspace,
    pub defaults: Defaults,
    pub bash: Option<PathBuf>,
    /// What every command, test script and session starts from (see
    /// `ServeConfig::base_env`), so that an environment activated once at startup
    /// (`serve --env-from-shell`) reaches all of them.
    pub base_env: Arc<[(std::ffi::OsString, std::ffi::OsString)]>,
    pub state_dir: PathBuf,
    /// See `serve --scratch-dir`.
    pub scratch_dirs: Vec<PathBuf>,
    pub sessions: Sessions,
    pub snapshots: Mutex<Snapshots>,
    pub oracle: Mutex<Oracle>,
    pub metrics: Arc<Metrics>,
    pub idem: IdempotencyCache,
    pub started: Instant,
}

#[derive(Clone)]
pub struct SidecarService {
    pub state: Arc<State>,
}

async fn blocking<T, F>(f: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, SidecarError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Status::from),
        Err(e) => Err(Status::internal(format!("worker failed: {e}"))),
    }
}

fn snapshot_name(name: &str) -> String {
    if name.is_empty() {
        DEFAULT_SNAPSHOT.to_string()
    } else {
        name.to_string()
    }
}

impl State {
    fn timeout(&self, l: Option<&Limits>) -> Duration {
        match l.map(|l| l.timeout_ms).unwrap_or(0) {
            0 => self.defaults.timeout,
            ms => Duration::from_millis(ms).min(self.defaults.max_timeout),
        }
    }

    fn cap(&self, l: Option<&Limits>) -> usize {
        match l.map(|l| l.output_cap_bytes).unwrap_or(0) {
            0 => self.defaults.output_cap,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        }
    }

    fn rlimits(&self, l: Option<&Limits>) -> Rlimits {
        let d = self.defaults.rlimits;
        let pick = |v: u64, def: Option<u64>| if v == 0 { def } else { Some(v) };
        match l {
            None => d,
            Some(l) => Rlimits {
                memory_bytes: pick(l.memory_bytes, d.memory_bytes),
                max_processes: pick(l.max_processes, d.max_processes),
                max_file_size_bytes: pick(l.max_file_size_bytes, d.max_file_size_bytes),
                cpu_seconds: pick(l.cpu_seconds, d.cpu_seconds),
            },
        }
    }

    fn cwd(&self, rel: &str) -> Result<PathBuf, SidecarError> {
        let p = self.ws.resolve(rel)?;
        if !p.is_dir() {
            return Err(SidecarError::InvalidArgument(format!(
                "cwd {rel:?} is not a directory"
            )));
        }
        Ok(p)
    }

    fn record(&self, kind: &str, r: &CommandResult) {
        let outcome = if r.timed_out {
            MetricOutcome::Timeout
        } else if r.exit_code == 0 {
            MetricOutcome::Ok
        } else {
            MetricOutcome::Error
        };
        self.metrics.observe(
            kind,
            outcome,
            r.duration_us as f64 / 1e6,
            (r.stdout.len() + r.stderr.len()) as u64,
        );
    }

    /// Builds the command of an Exec request.
    fn exec_command(&self, req: &ExecRequest) -> Result<(CommandSpec, String), SidecarError> {
        let (program, args): (PathBuf, Vec<String>) = if !req.argv.is_empty() {
            if !req.shell.is_empty() {
                return Err(SidecarError::InvalidArgument(
                    "give argv or shell, not both".into(),
                ));
            }
            (PathBuf::from(&req.argv[0]), req.argv[1..].to_vec())
        } else if !req.shell.is_empty() {
            let sh = self
                .bash
                .clone()
                .unwrap_or_else(|| PathBuf::from("/bin/sh"));
            (sh, vec!["-c".into(), req.shell.clone()])
        } else {
            return Err(SidecarError::InvalidArgument(
                "argv or shell is required".into(),
            ));
        };
        let mut cmd = CommandSpec::new(&program);
        cmd.args(&args).current_dir(self.cwd(&req.cwd)?);
        if req.clear_env {
            cmd.env_clear();
        } else {
            cmd.base_env(self.base_env.clone());
        }
        cmd.envs(&req.env);
        Ok((cmd, program.to_string_lossy().into_owned()))
    }
}

fn command_result(o: process::Outcome) -> CommandResult {
    let truncated = o.stdout.truncated() || o.stderr.truncated();
    let mut notice = String::new();
    if o.timed_out {
        notice = format!(
            "command timed out after {} ms; it and every process it started were killed",
            o.duration.as_millis()
        );
    }
    if truncated {
        if !notice.is_empty() {
            notice.push_str("; ");
        }
        notice.push_str("output was truncated: head and tail kept");
    }
    CommandResult {
        exit_code: o.exit_code(),
        signal: o.signal(),
        stdout_total_bytes: o.stdout.total(),
        stderr_total_bytes: o.stderr.total(),
        stdout: o.stdout.into_bytes(),
        stderr: o.stderr.into_bytes(),
        truncated,
        timed_out: o.timed_out,
        duration_us: o.duration.as_micros() as u64,
        session_restarted: false,
        notice,
    }
}

type ExecStreamOut = Pin<Box<dyn Stream<Item = Result<ExecEvent, Status>> + Send>>;

impl SidecarService {
    async fn run_exec(
        state: Arc<State>,
        req: ExecRequest,
        streaming: Option<Streaming>,
    ) -> Result<CommandResult, Status> {
        let limits = req.limits.as_ref();
        let timeout = state.timeout(limits);
        let cap = state.cap(limits);
        let rl = state.rlimits(limits);
        let (cmd, program) = state.exec_command(&req)?;
        let stdin = if req.stdin.is_empty() {
            None
        } else {
            Some(req.stdin.clone())
        };
        let outcome = match process::run(&cmd, stdin, timeout, cap, rl, streaming).await {
            Ok(o) => o,
            Err(e) if !req.argv.is_empty() => process::spawn_failure_outcome(&program, &e),
            Err(e) => return Err(SidecarError::io(format!("running {program}"), e).into()),
        };
        Ok(command_result(outcome))
    }
}

#[tonic::async_trait]
impl Sidecar for SidecarService {
    async fn health(
        &self,
        _req: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let s = &self.state;
        Ok(Response::new(HealthResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: s.started.elapsed().as_millis() as u64,
            workspace: s.ws.root().to_string_lossy().into_owned(),
            sessions_active: u32::try_from(s.sessions.active().max(0)).unwrap_or(0),
            git_available: history::git_available(),
            bash_path: s
                .bash
                .as_ref()
                .map(|b| b.to_string_lossy().into_owned())
                .unwrap_or_default(),
            pid: std::process::id(),
        }))
    }

    async fn session_open(
        &self,
        req: Request<SessionOpenRequest>,
    ) -> Result<Response<SessionOpenResponse>, Status> {
        let req = req.into_inner();
        let state = self.state.clone();
        let r = req.clone();
        let resp = self
            .state
            .idem
            .run("SessionOpen", &req.request_id, &req, async move {
                let options = SessionOptions {
                    cwd: state.cwd(&r.cwd)?,
                    env: r.env.into_iter().collect::<HashMap<_, _>>(),
                    rlimits: state.rlimits(r.limits.as_ref()),
                };
                let created = state.sessions.open(&r.session_id, options).await?;
                Ok(SessionOpenResponse {
                    session_id: r.session_id,
                    created,
                })
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn session_run(
        &self,
        req: Request<SessionRunRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let req = req.into_inner();
        let state = self.state.clone();
        let r = req.clone();
        let resp = self
            .state
            .idem
            .run("SessionRun", &req.request_id, &req, async move {
                let limits = r.limits.as_ref();
                let root = state.ws.root().to_path_buf();
                let o = state
                    .sessions
                    .run(
                        &r.session_id,
                        &r.command,
                        state.timeout(limits),
                        state.cap(limits),
                        &root,
                    )
                    .await?;
                let truncated = o.stdout.truncated() || o.stderr.truncated();
                let mut notice = o.notice;
                if truncated {
                    if !notice.is_empty() {
                        notice.push_str("; ");
                    }
                    notice.push_str("output was truncated: head and tail kept");
                }
                let result = CommandResult {
                    exit_code: o.exit_code,
                    signal: 0,
                    stdout_total_bytes: o.stdout.total(),
                    stderr_total_bytes: o.stderr.total(),
                    stdout: o.stdout.into_bytes(),
                    stderr: o.stderr.into_bytes(),
                    truncated,
                    timed_out: o.timed_out,
                    duration_us: o.duration.as_micros() as u64,
                    session_restarted: o.restarted,
                    notice,
                };
                state.record("session", &result);
                Ok(result)
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn session_close(
        &self,
        req: Request<SessionCloseRequest>,
    ) -> Result<Response<SessionCloseResponse>, Status> {
        let existed = self
            .state
            .sessions
            .close(&req.into_inner().session_id)
            .await;
        Ok(Response::new(SessionCloseResponse { existed }))
    }

    async fn exec(&self, req: Request<ExecRequest>) -> Result<Response<CommandResult>, Status> {
        let req = req.into_inner();
        let state = self.state.clone();
        let r = req.clone();
        let resp = self
            .state
            .idem
            .run("Exec", &req.request_id, &req, async move {
                let result = Self::run_exec(state.clone(), r, None).await?;
                state.record("exec", &result);
                Ok(result)
            })
            .await?;
        Ok(Response::new(resp))
    }

    type ExecStreamStream = ExecStreamOut;

    async fn exec_stream(
        &self,
        req: Request<ExecRequest>,
    ) -> Result<Response<Self::ExecStreamStream>, Status> {
        let req = req.into_inner();
        let state = self.state.clone();
        let cap = state.cap(req.limits.as_ref());
        // Check the request before answering, so errors come back as a status.
        state.exec_command(&req)?;
        let (chunk_tx, mut chunk_rx) = mpsc::channel::<(process::Stream, Vec<u8>)>(16);
        let (event_tx, event_rx) = mpsc::channel::<Result<ExecEvent, Status>>(16);
        tokio::spawn(async move {
            let streaming = Streaming { tx: chunk_tx, cap };
            let run = Self::run_exec(state.clone(), req, Some(streaming));
            tokio::pin!(run);
            let mut result = None;
            // Forward chunks while the command runs; the chunk channel closes when it ends
            // (the sender lives inside `run`), and only then does the result go out.
            loop {
                tokio::select! {
                    r = &mut run, if result.is_none() => result = Some(r),
                    chunk = chunk_rx.recv() => match chunk {
                        Some((which, data)) => {
                            let stream = match which {
                                process::Stream::Stdout => OutputStream::Stdout,
                                process::Stream::Stderr => OutputStream::Stderr,
                            };
                            let ev = ExecEvent {
                                event: Some(exec_event::Event::Output(OutputChunk { stream: stream as i32, data })),
                            };
                            let _ = event_tx.send(Ok(ev)).await;
                        }
                        None => {
                            if result.is_none() {
                                result = Some((&mut run).await);
                            }
                            break;
                        }
                    },
                }
            }
            let ev = match result {
                Some(Ok(r)) => {
                    state.record("exec_stream", &r);
                    Ok(ExecEvent {
                        event: Some(exec_event::Event::Result(r)),
                    })
                }
                Some(Err(s)) => Err(s),
                None => Err(Status::internal("command ended without a result")),
            };
            let _ = event_tx.send(ev).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(event_rx),
        )))
    }

    async fn read_file(
        &self,
        req: Request<ReadFileRequest>,
    ) -> Result<Response<ReadFileResponse>, Status> {
        let r = req.into_inner();
        let ws = self.state.ws.clone();
        let out = blocking(move || files::read(&ws, &r.path, r.offset, r.max_bytes)).await?;
        Ok(Response::new(ReadFileResponse {
            content: out.content,
            size: out.size,
            truncated: out.truncated,
            mode: out.mode,
        }))
    }

    async fn write_file(
        &self,
        req: Request<WriteFileRequest>,
    ) -> Result<Response<WriteFileResponse>, Status> {
        let req = req.into_inner();
        let ws = self.state.ws.clone();
        let r = req.clone();
        let resp = self
            .state
            .idem
            .run("WriteFile", &req.request_id, &req, async move {
                let n = r.content.len() as u64;
                let created = blocking(move || {
                    files::write(&ws, &r.path, &r.content, r.create_parents, r.mode)
                })
                .await?;
                Ok(WriteFileResponse {
                    bytes_written: n,
                    created,
                })
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn list_files(
        &self,
        req: Request<ListFilesRequest>,
    ) -> Result<Response<ListFilesResponse>, Status> {
        let r = req.into_inner();
        let ws = self.state.ws.clone();
        let (entries, truncated) = blocking(move || {
            files::list(
                &ws,
                &r.path,
                r.recursive,
                r.include_hidden,
                r.max_entries as usize,
            )
        })
        .await?;
        Ok(Response::new(ListFilesResponse { entries, truncated }))
    }

    async fn view(&self, req: Request<ViewRequest>) -> Result<Response<ViewResponse>, Status> {
        let r = req.into_inner();
        let ws = self.state.ws.clone();
        let (content, total_lines) =
            blocking(move || editor::view(&ws, &r.path, r.start_line, r.end_line)).await?;
        Ok(Response::new(ViewResponse {
            content,
            total_lines,
        }))
    }

    async fn str_replace(
        &self,
        req: Request<StrReplaceRequest>,
    ) -> Result<Response<EditResponse>, Status> {
        let req = req.into_inner();
        let ws = self.state.ws.clone();
        let r = req.clone();
        let resp = self
            .state
            .idem
            .run("StrReplace", &req.request_id, &req, async move {
                let path = r.path.clone();
                let snippet =
                    blocking(move || editor::str_replace(&ws, &r.path, &r.old_str, &r.new_str))
                        .await?;
                Ok(EditResponse { path, snippet })
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn create_file(
        &self,
        req: Request<CreateFileRequest>,
    ) -> Result<Response<EditResponse>, Status> {
        let req = req.into_inner();
        let ws = self.state.ws.clone();
        let r = req.clone();
        let resp = self
            .state
            .idem
            .run("CreateFile", &req.request_id, &req, async move {
                let path = r.path.clone();
                let snippet =
                    blocking(move || editor::create(&ws, &r.path, &r.content, r.overwrite)).await?;
                Ok(EditResponse { path, snippet })
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn apply_patch(
        &self,
        req: Request<ApplyPatchRequest>,
    ) -> Result<Response<ApplyPatchResponse>, Status> {
        let req = req.into_inner();
        let ws = self.state.ws.clone();
        let r = req.clone();
        let resp = self
            .state
            .idem
            .run("ApplyPatch", &req.request_id, &req, async move {
                let files =
                    blocking(move || patch::apply(&ws, &r.patch, r.reverse, r.check_only)).await?;
                Ok(ApplyPatchResponse { files })
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn diff(&self, req: Request<DiffRequest>) -> Result<Response<DiffResponse>, Status> {
        let r = req.into_inner();
        let state = self.state.clone();
        let d = blocking(move || {
            let snaps = state.snapshots.lock().unwrap_or_else(|p| p.into_inner());
            snaps.diff(
                &snapshot_name(&r.snapshot),
                &r.include_paths,
                &r.exclude_paths,
            )
        })
        .await?;
        Ok(Response::new(DiffResponse {
            diff: d.diff,
            files: d.files,
            binary_files: d.binary_files,
        }))
    }

    async fn snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotResponse>, Status> {
        let req = req.into_inner();
        let state = self.state.clone();
        let r = req.clone();
        let resp = self
            .state
            .idem
            .run("Snapshot", &req.request_id, &req, async move {
                let name = snapshot_name(&r.name);
                let n = name.clone();
                let st = blocking(move || {
                    let mut snaps = state.snapshots.lock().unwrap_or_else(|p| p.into_inner());
                    snaps.take(&n, &r.exclude_paths)
                })
                .await?;
                Ok(SnapshotResponse {
                    name,
                    files: st.files,
                    bytes: st.bytes,
                    duration_us: st.duration_us,
                })
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn reset(&self, req: Request<ResetRequest>) -> Result<Response<ResetResponse>, Status> {
        let req = req.into_inner();
        let state = self.state.clone();
        let r = req.clone();
        let resp = self
            .state
            .idem
            .run("Reset", &req.request_id, &req, async move {
                let st = blocking(move || {
                    let snaps = state.snapshots.lock().unwrap_or_else(|p| p.into_inner());
                    snaps.reset(&snapshot_name(&r.name))
                })
                .await?;
                Ok(ResetResponse {
                    restored: st.restored,
                    removed: st.removed,
                    unchanged: st.unchanged,
                    duration_us: st.duration_us,
                })
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn oracle_stash(
        &self,
        req: Request<OracleStashRequest>,
    ) -> Result<Response<OracleStashResponse>, Status> {
        let req = req.into_inner();
        let state = self.state.clone();
        let r = req.clone();
        let resp = self
            .state
            .idem
            .run("OracleStash", &req.request_id, &req, async move {
                let (stashed, missing) = blocking(move || {
                    let mut o = state.oracle.lock().unwrap_or_else(|p| p.into_inner());
                    o.stash(&state.ws, &r.paths, r.remove)
                })
                .await?;
                Ok(OracleStashResponse { stashed, missing })
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn oracle_restore(
        &self,
        req: Request<OracleRestoreRequest>,
    ) -> Result<Response<OracleRestoreResponse>, Status> {
        let req = req.into_inner();
        let state = self.state.clone();
        let resp = self
            .state
            .idem
            .run("OracleRestore", &req.request_id, &req, async move {
                let (restored, removed) = blocking(move || {
                    let o = state.oracle.lock().unwrap_or_else(|p| p.into_inner());
                    o.restore(&state.ws)
                })
                .await?;
                Ok(OracleRestoreResponse { restored, removed })
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn reset_history(
        &self,
        req: Request<ResetHistoryRequest>,
    ) -> Result<Response<ResetHistoryResponse>, Status> {
        let req = req.into_inner();
        let state = self.state.clone();
        let resp = self
            .state
            .idem
            .run("ResetHistory", &req.request_id, &req, async move {
                let out = history::reset_history(&state.ws, &state.state_dir).await?;
                // The snapshot store must not keep the history either.
                let st = state.clone();
                blocking(move || {
                    let mut snaps = st.snapshots.lock().unwrap_or_else(|p| p.into_inner());
                    snaps
                        .forget_git()
                        .map_err(|e| SidecarError::io("purging .git from the snapshot store", e))
                })
                .await?;
                Ok(ResetHistoryResponse {
                    removed: out.removed,
                    initialized: out.initialized,
                    git_available: out.git_available,
                    message: out.message,
                })
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn run_tests(
        &self,
        req: Request<RunTestsRequest>,
    ) -> Result<Response<RunTestsResponse>, Status> {
        let req = req.into_inner();
        let state = self.state.clone();
        let r = req.clone();
        let resp = self
            .state
            .idem
            .run("RunTests", &req.request_id, &req, async move {
                run_tests(state, r).await
            })
            .await?;
        Ok(Response::new(resp))
    }
}

/// The descriptor a test script or parser gets its program on; it reads it as
/// `/proc/self/fd/3`.
const SCRIPT_FD: i32 = 3;
const SCRIPT_PATH: &str = "/proc/self/fd/3";

/// How long killing leftover processes may keep retrying (a fork bomb keeps forking).
const LEFTOVER_PATIENCE: Duration = Duration::from_secs(5);

/// Kills every process the sidecar started and closes every session, then empties the
/// scratch directories (see `RunTestsRequest.clean_start`).
async fn clean_slate(state: &Arc<State>) -> Result<(), Status> {
    let none = std::collections::BTreeSet::new();
    let n = none.clone();
    blocking(move || Ok(cleanup::kill_descendants_except(&n, LEFTOVER_PATIENCE))).await?;
    // The shells are dead: closing their sessions only waits for their reaping.
    state.sessions.close_all().await;
    blocking(move || Ok(cleanup::kill_descendants_except(&none, LEFTOVER_PATIENCE))).await?;
    let dirs = state.scratch_dirs.clone();
    let keep = state.state_dir.clone();
    blocking(move || {
        // Compared by name below: both must be real paths, or a differently spelled
        // state directory inside a scratch directory would be emptied with it.
        let mut keep = vec![keep.canonicalize().unwrap_or(keep)];
        keep.extend(cleanup::mount_points());
        for d in &dirs {
            let d = d
                .canonicalize()
                .map_err(|e| SidecarError::io(format!("scratch directory {}", d.display()), e))?;
            cleanup::empty_dir(&d, &keep)
                .map_err(|e| SidecarError::io(format!("emptying {}", d.display()), e))?;
        }
        Ok(())
    })
    .await
}

fn script_fd(
    name: &std::ffi::CStr,
    content: &[u8],
) -> Result<Arc<std::os::fd::OwnedFd>, SidecarError> {
    crate::confine::memfd_with(name, content)
        .map(Arc::new)
        .map_err(|e| SidecarError::io("preparing a script", e))
}

async fn run_tests(state: Arc<State>, r: RunTestsRequest) -> Result<RunTestsResponse, Status> {
    if r.script.trim().is_empty() {
        return Err(SidecarError::InvalidArgument("script is empty".into()).into());
    }
    let builtin = BuiltinParser::try_from(r.builtin).unwrap_or(BuiltinParser::Unspecified);
    if r.parser_script.is_empty() && builtin == BuiltinParser::Unspecified {
        return Err(
            SidecarError::InvalidArgument("give parser_script or a builtin parser".into()).into(),
        );
    }
    let Some(bash) = state.bash.clone() else {
        return Err(SidecarError::NoShell("bash is needed to run test scripts".into()).into());
    };
    let limits = r.limits.as_ref();
    if r.clean_start {
        clean_slate(&state).await?;
    }
    let before = blocking(|| Ok(cleanup::descendants())).await?;
    let script = script_fd(c"test-script", r.script.as_bytes())?;
    let mut cmd = CommandSpec::new(&bash);
    // stderr joins stdout so the parser sees the output in the order it was written.
    cmd.arg("-c")
        .arg("exec 2>&1; exec \"$0\" \"$1\"")
        .arg(&bash)
        .arg(SCRIPT_PATH)
        .inherit_fd(script, SCRIPT_FD)
        .current_dir(state.ws.root())
        .base_env(state.base_env.clone())
        .envs(&r.env);
    let outcome = process::run(
        &cmd,
        None,
        state.timeout(limits),
        TEST_PARSE_CAP,
        state.rlimits(limits),
        None,
    )
    .await
    .map_err(|e| SidecarError::io("running the test script", e))?;
    // A test script must not leave daemons behind (they would answer the next run).
    let keep = before.clone();
    blocking(move || Ok(cleanup::kill_descendants_except(&keep, LEFTOVER_PATIENCE))).await?;
    let full = outcome.stdout.into_bytes();
    let full_text = String::from_utf8_lossy(&full).into_owned();
    let mut shown = CappedOutput::new(state.cap(limits));
    shown.push(&full);
    let run = CommandResult {
        exit_code: outcome.status.and_then(|s| s.code()).unwrap_or(-1),
        signal: {
            use std::os::unix::process::ExitStatusExt as _;
            outcome.status.and_then(|s| s.signal()).unwrap_or(0)
        },
        stdout_total_bytes: full.len() as u64,
        stderr_total_bytes: 0,
        truncated: shown.truncated(),
        stdout: shown.into_bytes(),
        stderr: Vec::new(),
        timed_out: outcome.timed_out,
        duration_us: outcome.duration.as_micros() as u64,
        session_restarted: false,
        notice: if outcome.timed_out {
            "the test script timed out; it and every process it started were killed".into()
        } else {
            String::new()
        },
    };
    state.record("test", &run);

    let (statuses, parser_stderr, parser_error) = if !r.parser_script.is_empty() {
        let parser = script_fd(c"test-parser", r.parser_script.as_bytes())?;
        let interp = if r.parser_interpreter.is_empty() {
            "python3".to_string()
        } else {
            r.parser_interpreter.clone()
        };
        let mut pcmd = CommandSpec::new(&interp);
        pcmd.arg(SCRIPT_PATH)
            .inherit_fd(parser, SCRIPT_FD)
            .current_dir(state.ws.root())
            .base_env(state.base_env.clone());
        let po = process::run(
            &pcmd,
            Some(full),
            state.timeout(limits),
            TEST_PARSE_CAP,
            state.rlimits(limits),
            None,
        )
        .await;
        match po {
            Err(e) => (
                Default::default(),
                String::new(),
                format!("cannot run the parser with {interp:?}: {e}"),
            ),
            Ok(po) => {
                let code = po.exit_code();
                let timed_out = po.timed_out;
                let perr = String::from_utf8_lossy(&po.stderr.into_bytes()).into_owned();
                let pout = String::from_utf8_lossy(&po.stdout.into_bytes()).into_owned();
                if timed_out {
                    (Default::default(), perr, "the parser timed out".to_string())
                } else if code != 0 {
                    (
                        Default::default(),
                        perr,
                        format!("the parser exited with status {code}"),
                    )
                } else {
                    match testparse::parse_script_json(&pout) {
                        Ok(m) => (m, perr, String::new()),
                        Err(e) => (Default::default(), perr, e),
                    }
                }
            }
        }
    } else {
        let m = match builtin {
            BuiltinParser::Pytest => testparse::parse_pytest(&full_text),
            BuiltinParser::Unittest => testparse::parse_unittest(&full_text),
            BuiltinParser::Cargo => testparse::parse_cargo(&full_text),
            BuiltinParser::GoTestJson => testparse::parse_go_json(&full_text),
            BuiltinParser::Unspecified => Default::default(),
        };
        (m, String::new(), String::new())
    };
    blocking(move || Ok(cleanup::kill_descendants_except(&before, LEFTOVER_PATIENCE))).await?;
    Ok(RunTestsResponse {
        statuses: statuses.into_iter().map(|(k, v)| (k, v as i32)).collect(),
        run: Some(run),
        parser_stderr,
        parser_error,
    })
}
