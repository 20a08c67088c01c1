//! The bundled sample repository (`trainer/assets/sample-repo/`): a small Python package
//! whose tests need only `python3`. Its git history travels as a bundle inside the binary,
//! so the injector can read `git log` and revert real commits.

use std::path::Path;
use std::process::Command;

/// `git bundle` of the sample repository's full history.
pub const SAMPLE_REPO_BUNDLE: &[u8] = include_bytes!("../../assets/sample-repo.bundle");

/// Creates the sample repository, with its history, at `dest` (which must not exist or
/// be empty). Needs `git`.
pub fn materialize_sample_repo(dest: &Path) -> std::io::Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("selfplay-sample-bundle-")
        .tempdir()?;
    let bundle = tmp.path().join("sample-repo.bundle");
    std::fs::write(&bundle, SAMPLE_REPO_BUNDLE)?;
    let run = |args: &[&str], cwd: Option<&Path>| -> std::io::Result<()> {
        let mut c = Command::new("git");
        c.args(["-c", "init.defaultBranch=main"]).args(args);
        if let Some(d) = cwd {
            c.current_dir(d);
        }
        let out = c.output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "git {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    };
    run(
        &[
            "clone",
            "--quiet",
            &bundle.to_string_lossy(),
            &dest.to_string_lossy(),
        ],
        None,
    )?;
    // Agents may commit; give the clone an identity of its own.
    run(&["config", "user.name", "selfplay agent"], Some(dest))?;
    run(&["config", "user.email", "agent@selfplay.dev"], Some(dest))?;
    run(&["remote", "remove", "origin"], Some(dest))
}
