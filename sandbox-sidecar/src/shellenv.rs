//! `serve --env-from-shell SCRIPT`: the environment an activation script leaves behind
//! (`source /opt/miniconda3/bin/activate testbed`, `. /root/.bashrc`), captured once at
//! startup and used as the base environment of everything the sidecar runs.
//!
//! Repository images set up their toolchain in shell code, not in the image's environment,
//! and the sidecar runs commands without a login shell; without this, tests would run with
//! whatever interpreter comes first on the image's bare `PATH`.
//!
//! The script runs in `bash --noprofile --norc -c`, its stdout sent to stderr so that what it
//! prints cannot be mistaken for the environment, which is printed after it with bash
//! builtins (`compgen -e`, `printf`): an image may lack coreutils' `env`, which is only the
//! fallback for a bash built without `compgen`. An end marker follows, so a script that
//! ends the shell early (`exit 0`) is an error rather than an empty environment.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};

/// How long the script may take.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// How much of the script's stderr an error quotes.
const STDERR_TAIL: usize = 2048;
/// How long to keep reading after bash exited (a background job may hold the pipes).
const DRAIN: Duration = Duration::from_secs(2);
/// The last record of the output.
const END_MARKER: &[u8] = b"__SANDBOX_SIDECAR_ENV_END__";
/// Variables bash maintains itself; a child's shell sets its own.
const SHELL_BOOKKEEPING: [&[u8]; 4] = [b"_", b"SHLVL", b"PWD", b"OLDPWD"];

#[derive(Debug, thiserror::Error)]
pub enum ShellEnvError {
    #[error("--env-from-shell {script:?}: bash is needed to run it and was not found")]
    NoBash { script: String },
    #[error("--env-from-shell {script:?}: cannot start {bash}: {source}")]
    Start {
        script: String,
        bash: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--env-from-shell {script:?} failed ({status}); its output ends with:\n{tail}")]
    Failed {
        script: String,
        status: String,
        tail: String,
    },
    #[error(
        "--env-from-shell {script:?} did not finish within {timeout:?} and was killed; its \
         output ends with:\n{tail}"
    )]
    Timeout {
        script: String,
        timeout: Duration,
        tail: String,
    },
    #[error("--env-from-shell {script:?}: {why}; its output ends with:\n{tail}")]
    Malformed {
        script: String,
        why: String,
        tail: String,
    },
}

/// The program bash runs: the script, then the environment as `NAME=value` records each
/// ended by a NUL byte, then the end marker record.
fn program(script: &str) -> String {
    let end = String::from_utf8_lossy(END_MARKER);
    // The script's status decides, as `bash -c SCRIPT` would report it; a `||` would turn
    // off `set -e` inside the script.
    format!(
        "{{\n{script}\n}} >&2 </dev/null\n\
         __sidecar_status=$?\n\
         if [ \"$__sidecar_status\" != 0 ]; then exit \"$__sidecar_status\"; fi\n\
         if builtin compgen -e >/dev/null 2>&1; then\n\
         for __sidecar_name in $(builtin compgen -e); do\n\
         if [[ -v $__sidecar_name ]]; then builtin printf '%s=%s\\0' \"$__sidecar_name\" \"${{!__sidecar_name}}\"; fi\n\
         done\n\
         else\n\
         env -0 || exit 125\n\
         fi\n\
         builtin printf '%s\\0' '{end}'\n"
    )
}

/// Splits the NUL-separated output into variables, without bash's own bookkeeping; later
/// duplicates win.
pub fn parse_env0(out: &[u8]) -> Result<Vec<(OsString, OsString)>, String> {
    let mut records: Vec<&[u8]> = out.split(|b| *b == 0).collect();
    if records.last().is_some_and(|r| r.is_empty()) {
        records.pop();
    }
    if records.pop() != Some(END_MARKER) {
        return Err(
            "the shell ended before printing its environment (does the script \
                    `exit` or `exec`?)"
                .into(),
        );
    }
    let mut vars: Vec<(OsString, OsString)> = Vec::with_capacity(records.len());
    for r in records {
        let Some(eq) = memchr::memchr(b'=', r).filter(|&i| i > 0) else {
            return Err(format!(
                "the environment holds a record that is not NAME=value: {:?}",
                String::from_utf8_lossy(r)
            ));
        };
        let (name, value) = (&r[..eq], &r[eq + 1..]);
        if SHELL_BOOKKEEPING.contains(&name) {
            continue;
        }
        let name = OsString::from_vec(name.to_vec());
        let value = OsString::from_vec(value.to_vec());
        match vars.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => vars.push((name, value)),
        }
    }
    Ok(vars)
}

/// Keeps the last `STDERR_TAIL` bytes read.
async fn read_tail(mut r: impl AsyncRead + Unpin, into: Arc<Mutex<Vec<u8>>>) {
    let mut buf = vec![0u8; 8192];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let mut t = into.lock().unwrap_or_else(|p| p.into_inner());
        t.extend_from_slice(&buf[..n]);
        if t.len() > 2 * STDERR_TAIL {
            let cut = t.len() - STDERR_TAIL;
            t.drain(..cut);
        }
    }
}

fn tail_text(t: &Mutex<Vec<u8>>) -> String {
    let t = t.lock().unwrap_or_else(|p| p.into_inner());
    let start = t.len().saturating_sub(STDERR_TAIL);
    let s = String::from_utf8_lossy(&t[start..]).trim_end().to_string();
    if s.is_empty() { "(nothing)".into() } else { s }
}

fn kill_group(pgid: Option<u32>) {
    if let Some(p) = pgid.and_then(|p| i32::try_from(p).ok())
        && p > 1
    {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Runs `script` with `bash` in `cwd` (stdin null, the sidecar's environment) and returns
/// the environment it leaves. Whatever the script started in its process group is killed
/// afterwards: the capture is a snapshot, and clean test runs would kill it anyway.
pub async fn capture(
    script: &str,
    bash: Option<&Path>,
    cwd: &Path,
    timeout: Duration,
) -> Result<Vec<(OsString, OsString)>, ShellEnvError> {
    let Some(bash) = bash else {
        return Err(ShellEnvError::NoBash {
            script: script.to_string(),
        });
    };
    let mut child = tokio::process::Command::new(bash)
        .arg("--noprofile")
        .arg("--norc")
        .arg("-c")
        .arg(program(script))
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ShellEnvError::Start {
            script: script.to_string(),
            bash: bash.to_path_buf(),
            source,
        })?;
    let pgid = child.id();
    let tail = Arc::new(Mutex::new(Vec::new()));
    let stderr_task = child
        .stderr
        .take()
        .map(|e| tokio::spawn(read_tail(e, tail.clone())));
    let stdout_task = child.stdout.take().map(|mut o| {
        tokio::spawn(async move {
            let mut v = Vec::new();
            let _ = o.read_to_end(&mut v).await;
            v
        })
    });
    let status = tokio::time::timeout(timeout, child.wait()).await;
    kill_group(pgid);
    let stdout = match stdout_task {
        Some(t) => tokio::time::timeout(DRAIN, t)
            .await
            .ok()
            .and_then(Result::ok),
        None => None,
    };
    if let Some(t) = stderr_task {
        let _ = tokio::time::timeout(DRAIN, t).await;
    }
    let status = match status {
        Err(_) => {
            return Err(ShellEnvError::Timeout {
                script: script.to_string(),
                timeout,
                tail: tail_text(&tail),
            });
        }
        Ok(Err(e)) => {
            return Err(ShellEnvError::Failed {
                script: script.to_string(),
                status: format!("waiting for bash failed: {e}"),
                tail: tail_text(&tail),
            });
        }
        Ok(Ok(s)) => s,
    };
    if !status.success() {
        return Err(ShellEnvError::Failed {
            script: script.to_string(),
            status: status.to_string(),
            tail: tail_text(&tail),
        });
    }
    let malformed = |why: String| ShellEnvError::Malformed {
        script: script.to_string(),
        why,
        tail: tail_text(&tail),
    };
    let Some(stdout) = stdout else {
        return Err(malformed(
            "its standard output stayed open after bash exited".into(),
        ));
    };
    parse_env0(&stdout).map_err(malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(vars: &'a [(OsString, OsString)], name: &str) -> Option<&'a OsString> {
        vars.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    #[test]
    fn parses_records_and_drops_bookkeeping() {
        let out = b"A=1\0_=/usr/bin/env\0B=x=y\nz\0SHLVL=1\0PWD=/w\0OLDPWD=/\0A=2\0__SANDBOX_SIDECAR_ENV_END__\0";
        let v = parse_env0(out).unwrap();
        assert_eq!(
            v,
            vec![("A".into(), "2".into()), ("B".into(), "x=y\nz".into())]
        );
    }

    #[test]
    fn a_missing_end_marker_or_a_bad_record_is_refused() {
        assert!(parse_env0(b"A=1\0").unwrap_err().contains("ended before"));
        assert!(parse_env0(b"").is_err());
        assert!(
            parse_env0(b"=x\0__SANDBOX_SIDECAR_ENV_END__\0")
                .unwrap_err()
                .contains("NAME=value")
        );
    }

    fn bash() -> Option<PathBuf> {
        crate::process::find_bash()
    }

    #[tokio::test]
    async fn captures_what_the_script_exports_and_not_what_it_prints() {
        let Some(b) = bash() else { return };
        let dir = tempfile::tempdir().unwrap();
        let v = capture(
            "echo to-stdout; export SC_T=$'two\\nlines'; unset HOME; export SC_CWD=$PWD",
            Some(&b),
            dir.path(),
            TIMEOUT,
        )
        .await
        .unwrap();
        assert_eq!(get(&v, "SC_T").unwrap(), "two\nlines");
        assert_eq!(
            Path::new(get(&v, "SC_CWD").unwrap())
                .canonicalize()
                .unwrap(),
            dir.path().canonicalize().unwrap()
        );
        assert!(get(&v, "HOME").is_none());
        assert!(get(&v, "SHLVL").is_none());
        assert!(get(&v, "PATH").is_some(), "inherited from the sidecar");
    }

    #[tokio::test]
    async fn exit_zero_before_the_dump_is_an_error() {
        let Some(b) = bash() else { return };
        let e = capture("exit 0", Some(&b), Path::new("/"), TIMEOUT)
            .await
            .unwrap_err();
        assert!(matches!(e, ShellEnvError::Malformed { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_script_over_its_time_is_killed_with_its_children() {
        let Some(b) = bash() else { return };
        let start = std::time::Instant::now();
        let e = capture(
            "echo started >&2; sleep 30 & sleep 30",
            Some(&b),
            Path::new("/"),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5));
        match e {
            ShellEnvError::Timeout { tail, .. } => assert!(tail.contains("started"), "{tail}"),
            e => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn set_e_in_the_script_still_stops_it() {
        let Some(b) = bash() else { return };
        let e = capture(
            "set -e\nfalse\nexport NOT_REACHED=1",
            Some(&b),
            Path::new("/"),
            TIMEOUT,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ShellEnvError::Failed { .. }), "{e}");
    }
}
