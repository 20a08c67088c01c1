//! `serve --env-from-shell SCRIPT`: the environment an activation script leaves is what
//! every command, test script and session starts from.

use std::os::unix::fs::PermissionsExt as _;

use sandbox_sidecar::client::{BuiltinParser, ExecRequest, RunTestsRequest, TestStatus};

mod common;

#[tokio::test]
async fn commands_sessions_and_tests_start_from_the_captured_environment() {
    let tools = tempfile::tempdir().unwrap();
    let bin = tools.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let tool = bin.join("sc-tool");
    std::fs::write(&tool, "#!/bin/sh\necho tool-ran\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    // What it prints on stdout must not end up in the environment.
    let script = format!(
        "echo noise-on-stdout; echo SC_FAKE=1; echo noise-on-stderr >&2\n\
         export SC_ACTIVATED=yes-$SC_FROM_SIDECAR\n\
         export PATH={}:$PATH\n\
         unset SC_UNSET_ME\n\
         export SC_MULTI=$'line1\\nline2'",
        bin.display()
    );
    let h = common::start_with(|o| {
        o.env = vec![
            ("SC_FROM_SIDECAR".into(), "sidecar".into()),
            ("SC_UNSET_ME".into(), "still-here".into()),
        ];
        o.extra_args.push("--env-from-shell".into());
        o.extra_args.push(script.clone());
    })
    .await;
    let c = &h.client;

    // argv[0] is looked up in the captured PATH.
    let r = c.exec_argv(&["sc-tool"], None).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "tool-ran\n");

    let r = c
        .exec_shell(
            "echo \"$SC_ACTIVATED|${SC_UNSET_ME-unset}|${SC_FAKE-none}|${PATH%%:*}\"; printf %s \"$SC_MULTI\"",
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        format!("yes-sidecar|unset|none|{}\nline1\nline2", bin.display())
    );

    // A request's own variables still come on top; clear_env still clears.
    let r = c
        .exec(ExecRequest {
            shell: "echo \"$SC_ACTIVATED ${EXTRA}\"".into(),
            env: [("EXTRA".to_string(), "x".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "yes-sidecar x\n");
    let r = c
        .exec(ExecRequest {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo \"[${SC_ACTIVATED-}]\"".into(),
            ],
            clear_env: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "[]\n");

    let r = c
        .session_run(
            "s1",
            "echo $SC_ACTIVATED; sc-tool; echo ${SC_UNSET_ME-unset}",
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "yes-sidecar\ntool-ran\nunset\n"
    );

    let r = c
        .run_tests(RunTestsRequest {
            script: "echo \"PASSED test_env.py::test_$SC_ACTIVATED\"; sc-tool".into(),
            builtin: BuiltinParser::Pytest as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let run = r.run.as_ref().unwrap();
    assert!(
        String::from_utf8_lossy(&run.stdout).contains("tool-ran"),
        "{run:?}"
    );
    assert_eq!(
        r.statuses_typed().get("test_env.py::test_yes-sidecar"),
        Some(&TestStatus::Passed),
        "{:?}",
        r.statuses_typed()
    );
}

#[test]
fn a_failing_script_stops_serve_with_its_message() {
    let dir = tempfile::tempdir().unwrap();
    let script = "echo activation-broke >&2; false";
    let (code, stdout, stderr) = common::serve_failing(dir.path(), &["--env-from-shell", script]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        !stdout.contains("listening on"),
        "it must not serve: {stdout}"
    );
    assert!(stderr.contains("--env-from-shell"), "{stderr}");
    assert!(stderr.contains(script), "names the script: {stderr}");
    assert!(
        stderr.contains("activation-broke"),
        "quotes its stderr: {stderr}"
    );
    assert!(stderr.contains("exit status: 1"), "{stderr}");

    // A script that ends the shell early gives no environment: also an error.
    let (code, _, stderr) = common::serve_failing(dir.path(), &["--env-from-shell", "exit 0"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("ended before"), "{stderr}");
}
