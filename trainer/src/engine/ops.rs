//! The engine's view of one sandbox: the sidecar client's calls, each under a deadline, with
//! errors sorted into refusals and infrastructure failures.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use sandbox_sidecar::SidecarClient;
use sandbox_sidecar::client::{
    self as sc, CommandResult, ExecRequest, FileChange, RunTestsRequest, SessionOpenRequest,
};

use super::error::{InfraError, InfraKind, OpError};

/// Extra time a call gets beyond its command's own timeout before the sidecar counts as
/// hung: the server enforces command timeouts, so only a dead or stuck sidecar hits this.
const RPC_MARGIN: Duration = Duration::from_secs(30);
/// Deadline of calls that run no command (files, snapshots, patches).
const RPC_DEADLINE: Duration = Duration::from_secs(300);

/// Environment of every command the engine runs: no `.pyc` files, so that diffs of the
/// workspace hold only what the agent changed.
pub fn command_env() -> std::collections::HashMap<String, String> {
    [("PYTHONDONTWRITEBYTECODE".to_string(), "1".to_string())]
        .into_iter()
        .collect()
}

/// Per-test status, as the sidecar reports it.
pub use sandbox_sidecar::client::TestStatus;

/// One run of a test script and its parser.
#[derive(Clone, Debug, PartialEq)]
pub struct TestRun {
    pub statuses: BTreeMap<String, TestStatus>,
    /// The parser failed (crashed, timed out, printed no JSON object); `statuses` is empty.
    pub parser_error: Option<String>,
    pub timed_out: bool,
    pub exit_code: i32,
    /// The end of the script's output, for details of failures.
    pub output_tail: String,
}

impl TestRun {
    pub fn passed(&self, test: &str) -> bool {
        self.statuses.get(test) == Some(&TestStatus::Passed)
    }
}

/// Calls of one sandbox.
#[derive(Clone, Copy)]
pub struct Ops<'a> {
    pub client: &'a SidecarClient,
}

async fn deadline<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, sc::Error>>,
) -> Result<T, OpError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(OpError::from),
        Err(_) => Err(OpError::Infra(InfraError::new(
            InfraKind::Timeout,
            format!("sidecar call {what} did not answer within {limit:?}"),
        ))),
    }
}

/// A refusal of a call the engine makes on its own behalf (snapshot names, restores) is a
/// failure of the machinery, not of the policy.
fn infra(e: OpError) -> InfraError {
    match e {
        OpError::Infra(i) => i,
        OpError::Refused(m) => InfraError::new(InfraKind::Sidecar, m),
    }
}

fn tail(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[start..].to_string()
}

impl<'a> Ops<'a> {
    pub fn new(client: &'a SidecarClient) -> Self {
        Self { client }
    }

    /// Opens the agent's bash session with the engine's environment.
    pub async fn session_open(&self, session: &str) -> Result<(), InfraError> {
        let req = SessionOpenRequest {
            session_id: session.to_string(),
            env: command_env(),
            ..Default::default()
        };
        deadline(RPC_DEADLINE, "SessionOpen", self.client.session_open(req))
            .await
            .map_err(infra)?;
        Ok(())
    }

    pub async fn session_run(
        &self,
        session: &str,
        command: &str,
        timeout: Duration,
    ) -> Result<CommandResult, OpError> {
        let limits = sc::limits_with_timeout(timeout);
        deadline(
            timeout + RPC_MARGIN,
            "SessionRun",
            self.client.session_run(session, command, Some(limits)),
        )
        .await
    }

    pub async fn session_close(&self, session: &str) -> Result<(), InfraError> {
        deadline(
            RPC_DEADLINE,
            "SessionClose",
            self.client.session_close(session),
        )
        .await
        .map_err(infra)?;
        Ok(())
    }

    /// `bash -c script` in the workspace root.
    pub async fn exec_shell(
        &self,
        script: &str,
        timeout: Duration,
    ) -> Result<CommandResult, OpError> {
        let req = ExecRequest {
            shell: script.to_string(),
            env: command_env(),
            limits: Some(sc::limits_with_timeout(timeout)),
            ..Default::default()
        };
        deadline(timeout + RPC_MARGIN, "Exec", self.client.exec(req)).await
    }

    /// The file's bytes; `None` when it does not exist.
    pub async fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, OpError> {
        match tokio::time::timeout(RPC_DEADLINE, self.client.read_file(path)).await {
            Ok(Ok(b)) => Ok(Some(b)),
            Ok(Err(sc::Error::NotFound(_))) => Ok(None),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(OpError::Infra(InfraError::new(
                InfraKind::Timeout,
                "ReadFile timed out",
            ))),
        }
    }

    /// Whether a regular file exists at `path`.
    pub async fn file_exists(&self, path: &str) -> Result<bool, OpError> {
        let req = sc::ReadFileRequest {
            path: path.to_string(),
            offset: 0,
            max_bytes: 1,
        };
        match tokio::time::timeout(RPC_DEADLINE, self.client.read_file_request(req)).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(sc::Error::NotFound(_))) => Ok(false),
            // A directory or a path outside the workspace is no test file.
            Ok(Err(e)) if !e.is_infrastructure() => Ok(false),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(OpError::Infra(InfraError::new(
                InfraKind::Timeout,
                "ReadFile timed out",
            ))),
        }
    }

    /// Writes a file (parents created).
    pub async fn write_file(&self, path: &str, content: &[u8]) -> Result<(), OpError> {
        deadline(
            RPC_DEADLINE,
            "WriteFile",
            self.client.write_file(path, content.to_vec()),
        )
        .await?;
        Ok(())
    }

    /// Deletes a file; nothing happens when it does not exist.
    pub async fn remove_file(&self, path: &str) -> Result<(), OpError> {
        let req = ExecRequest {
            argv: vec!["rm".into(), "-f".into(), "--".into(), path.to_string()],
            limits: Some(sc::limits_with_timeout(Duration::from_secs(60))),
            ..Default::default()
        };
        let r = deadline(RPC_DEADLINE, "Exec", self.client.exec(req)).await?;
        if r.exit_code != 0 {
            return Err(OpError::Refused(format!(
                "cannot remove {path}: {}",
                String::from_utf8_lossy(&r.stderr).trim()
            )));
        }
        Ok(())
    }

    pub async fn str_replace(
        &self,
        path: &str,
        search: &str,
        replace: &str,
    ) -> Result<String, OpError> {
        let r = deadline(
            RPC_DEADLINE,
            "StrReplace",
            self.client.str_replace(path, search, replace),
        )
        .await?;
        Ok(r.snippet)
    }

    pub async fn create_file(&self, path: &str, content: &str) -> Result<String, OpError> {
        let r = deadline(
            RPC_DEADLINE,
            "CreateFile",
            self.client.create_file(path, content, true),
        )
        .await?;
        Ok(r.snippet)
    }

    /// Applies (or checks) a unified diff; the files it touches.
    pub async fn apply_patch(
        &self,
        patch: &str,
        reverse: bool,
        check_only: bool,
    ) -> Result<Vec<FileChange>, OpError> {
        let r = deadline(
            RPC_DEADLINE,
            "ApplyPatch",
            self.client
                .apply_patch(patch.as_bytes().to_vec(), reverse, check_only),
        )
        .await?;
        Ok(r.files)
    }

    /// The workspace's diff against snapshot `name`, without `exclude` and without binary
    /// files (a patch must apply as text elsewhere).
    pub async fn diff(&self, name: &str, exclude: &[String]) -> Result<String, InfraError> {
        let ex: Vec<&str> = exclude.iter().map(String::as_str).collect();
        let r = deadline(RPC_DEADLINE, "Diff", self.client.diff(Some(name), &[], &ex))
            .await
            .map_err(infra)?;
        if r.binary_files.is_empty() {
            return Ok(String::from_utf8_lossy(&r.diff).into_owned());
        }
        let mut ex = ex;
        ex.extend(r.binary_files.iter().map(String::as_str));
        let r = deadline(RPC_DEADLINE, "Diff", self.client.diff(Some(name), &[], &ex))
            .await
            .map_err(infra)?;
        Ok(String::from_utf8_lossy(&r.diff).into_owned())
    }

    pub async fn snapshot(&self, name: &str) -> Result<(), InfraError> {
        deadline(
            RPC_DEADLINE,
            "Snapshot",
            self.client.snapshot(Some(name), &[]),
        )
        .await
        .map_err(infra)?;
        Ok(())
    }

    pub async fn reset(&self, name: &str) -> Result<(), InfraError> {
        deadline(RPC_DEADLINE, "Reset", self.client.reset(Some(name)))
            .await
            .map_err(infra)?;
        Ok(())
    }

    /// Puts copies of `paths` aside outside the workspace.
    pub async fn oracle_stash(&self, paths: &[String]) -> Result<(), OpError> {
        let p: Vec<&str> = paths.iter().map(String::as_str).collect();
        deadline(
            RPC_DEADLINE,
            "OracleStash",
            self.client.oracle_stash(&p, false),
        )
        .await?;
        Ok(())
    }

    pub async fn oracle_restore(&self) -> Result<(), InfraError> {
        deadline(RPC_DEADLINE, "OracleRestore", self.client.oracle_restore())
            .await
            .map_err(infra)?;
        Ok(())
    }

    /// Removes `.git` and initialises an empty repository.
    pub async fn reset_history(&self) -> Result<(), InfraError> {
        deadline(RPC_DEADLINE, "ResetHistory", self.client.reset_history())
            .await
            .map_err(infra)?;
        Ok(())
    }

    /// Runs `script` with bash in the workspace root and `parser` (Python) on its output.
    /// Every run starts clean: no process left from earlier commands or runs, and the
    /// sandbox's private scratch directories (`/tmp`, `/dev/shm`) empty, so a script cannot
    /// keep state between runs.
    pub async fn run_tests(
        &self,
        script: &str,
        parser: &str,
        timeout: Duration,
    ) -> Result<TestRun, OpError> {
        let req = RunTestsRequest {
            script: script.to_string(),
            parser_script: parser.to_string(),
            limits: Some(sc::limits_with_timeout(timeout)),
            env: command_env(),
            clean_start: true,
            ..Default::default()
        };
        // The script and then the parser each get the timeout.
        let r = deadline(
            timeout * 2 + RPC_MARGIN,
            "RunTests",
            self.client.run_tests(req),
        )
        .await?;
        let statuses = r.statuses_typed();
        let run = r.run.unwrap_or_default();
        let parser_error = if r.parser_error.is_empty() {
            None
        } else if r.parser_stderr.trim().is_empty() {
            Some(r.parser_error.clone())
        } else {
            Some(format!(
                "{}; its stderr ends with: {}",
                r.parser_error,
                tail(r.parser_stderr.as_bytes(), 400)
            ))
        };
        Ok(TestRun {
            statuses,
            parser_error,
            timed_out: run.timed_out,
            exit_code: run.exit_code,
            output_tail: tail(&run.stdout, 2000),
        })
    }
}
