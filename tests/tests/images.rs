//! The container images: `scripts/build-images.sh` (what `make images` runs) builds the static
//! release binaries under `target/images/` and the sandbox-sidecar, operator and CPU trainer
//! images with the local Docker Engine, pulling nothing; each binary then runs from its image as
//! the image's non-root user, and the sidecar installs itself the way the sandbox pod's init
//! container has it do. The CUDA trainer's Dockerfile is built on a local stand-in for its base.
//!
//! Skipped, with the reason printed, only when `docker` is not installed or its daemon does not
//! answer. The first run builds the release binaries (minutes); later runs reuse them.

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

use selfplay_operator::config::OperatorConfig;
use selfplay_tests::paths::{chart_dir, scratch_dir, workspace_root};
use serde_yaml::Value;

const REGISTRY: &str = "ghcr.io/selfplay-dev";
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The uid and gid every image runs as (`USER` in images/Dockerfile).
const IMAGE_USER: u32 = 65532;
const IMAGES: [&str; 3] = ["sandbox-sidecar", "operator", "trainer"];

fn image(name: &str) -> String {
    format!("{REGISTRY}/{name}:{VERSION}")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Why Docker cannot be used here, if it cannot.
fn docker_missing() -> Option<String> {
    match Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
    {
        Err(e) => Some(format!("docker is not installed ({e})")),
        Ok(out) if !out.status.success() => Some(format!(
            "the Docker daemon does not answer: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// Environment variable that turns the image tests on.
const IMAGE_TESTS_ENV: &str = "SELFPLAY_IMAGE_TESTS";

fn skip(test: &str) -> bool {
    // The images hold static release binaries: a cold build of the three is about half an
    // hour on two cores, more than the whole test suite, so `cargo test --workspace` (and
    // CI) leaves these tests to `make images-test`.
    if std::env::var_os(IMAGE_TESTS_ENV).is_none_or(|v| v != "1") {
        eprintln!(
            "\n\n!!!!! SKIPPING {test}: set {IMAGE_TESTS_ENV}=1 (or run `make images-test`) to build the images and run it\n\n"
        );
        return true;
    }
    match docker_missing() {
        Some(reason) => {
            eprintln!("\n\n!!!!! SKIPPING {test}: {reason}\n\n");
            true
        }
        None => false,
    }
}

/// Runs the build script once for all tests of this file (with the CUDA Dockerfile check);
/// its stdout.
fn build() -> &'static str {
    static BUILT: OnceLock<Result<String, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let started = std::time::Instant::now();
        let out = Command::new(workspace_root().join("scripts/build-images.sh"))
            .arg("--check-cuda")
            .current_dir(workspace_root())
            .output()
            .map_err(|e| format!("running scripts/build-images.sh: {e}"))?;
        eprintln!("build-images.sh took {:.1?}", started.elapsed());
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("scripts/build-images.sh failed: {}", text(&out)))
        }
    });
    match built {
        Ok(stdout) => stdout,
        Err(e) => panic!("{e}"),
    }
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("docker {args:?}: {e}"))
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(out.status.success(), "docker {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn release_binary(name: &str) -> PathBuf {
    workspace_root()
        .join("target/images/x86_64-unknown-linux-gnu/release")
        .join(name)
}

fn yaml(path: PathBuf) -> Value {
    let s = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What the script tags is what a default install runs: the operator's defaults and the
/// chart's values (tags empty: the chart's appVersion) name the same images and binary path.
#[test]
fn chart_and_operator_defaults_name_the_images_the_script_builds() {
    let cfg = OperatorConfig::default();
    assert_eq!(cfg.sidecar_image, image("sandbox-sidecar"));
    assert_eq!(cfg.trainer_image, image("trainer"));

    let dockerfile =
        fs::read_to_string(workspace_root().join("images/Dockerfile")).expect("images/Dockerfile");
    assert!(
        dockerfile.contains(&format!(
            "COPY bin/sandbox-sidecar {}\n",
            cfg.sidecar_binary_path
        )),
        "the sidecar image must hold the binary at the operator's default path {}",
        cfg.sidecar_binary_path
    );

    let chart = yaml(chart_dir().join("Chart.yaml"));
    assert_eq!(chart["appVersion"].as_str(), Some(VERSION));
    let values = yaml(chart_dir().join("values.yaml"));
    for (key, name) in [
        ("image", "operator"),
        ("sidecar", "sandbox-sidecar"),
        ("trainer", "trainer"),
    ] {
        let img = if key == "image" {
            &values["image"]
        } else {
            &values[key]["image"]
        };
        let repo = format!("{REGISTRY}/{name}");
        assert_eq!(img["repository"].as_str(), Some(repo.as_str()), "{key}");
        assert_eq!(img["tag"].as_str(), Some(""), "{key}: the appVersion");
    }
    assert_eq!(values["sidecar"]["binaryPath"].as_str(), Some(""));

    let script = fs::read_to_string(workspace_root().join("scripts/build-images.sh"))
        .expect("scripts/build-images.sh");
    assert!(script.contains(&format!("REGISTRY=${{REGISTRY:-{REGISTRY}}}")));
}

#[test]
fn each_image_runs_its_binary_as_the_non_root_user() {
    if skip("each_image_runs_its_binary_as_the_non_root_user") {
        return;
    }
    let listing = build();
    for name in IMAGES {
        let img = image(name);
        assert!(
            listing.contains(&img),
            "{img} not in the script's listing:\n{listing}"
        );

        let config = docker_ok(&["image", "inspect", &img, "--format", "{{json .Config}}"]);
        let config: serde_json::Value = serde_json::from_str(&config).expect("config JSON");
        assert_eq!(
            config["User"].as_str(),
            Some(format!("{IMAGE_USER}:{IMAGE_USER}").as_str()),
            "{img}"
        );
        assert_eq!(
            config["Entrypoint"][0].as_str(),
            Some(format!("/usr/local/bin/{name}").as_str())
        );
        for label in ["source", "version", "revision"] {
            let key = format!("org.opencontainers.image.{label}");
            let value = config["Labels"][&key].as_str().unwrap_or("");
            assert!(
                !value.is_empty() && value != "unknown",
                "{img}: label {key} is {value:?}"
            );
        }

        // Read-only and without capabilities, as the pods run them.
        let out = docker_ok(&[
            "run",
            "--rm",
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--network",
            "none",
            &img,
            "--version",
        ]);
        assert_eq!(out, format!("{name} {VERSION}\n"), "{img}");
    }
}

/// The sandbox pod's init container: the sidecar image's binary copies itself into a volume,
/// as the image's user, with nothing else in the image.
#[test]
fn sidecar_image_installs_the_sidecar_into_a_volume() {
    if skip("sidecar_image_installs_the_sidecar_into_a_volume") {
        return;
    }
    build();
    let dir = scratch_dir("images-install");
    // The container's user (65532) must be able to write there, whoever runs the test.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
    let mount = format!("{}:/out", dir.display());
    let out = docker_ok(&[
        "run",
        "--rm",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--network",
        "none",
        "-v",
        &mount,
        &image("sandbox-sidecar"),
        "install",
        "--to",
        "/out",
    ]);
    assert_eq!(out.trim(), "/out/sandbox-sidecar");

    let installed = dir.join("sandbox-sidecar");
    let meta = fs::metadata(&installed).expect("installed binary");
    assert_eq!(meta.uid(), IMAGE_USER, "written by the image's user");
    assert_eq!(meta.mode() & 0o777, 0o755);
    let original = fs::read(release_binary("sandbox-sidecar")).expect("release binary");
    assert!(
        fs::read(&installed).expect("read installed") == original,
        "the installed file is the binary"
    );
    // Nothing else was left in the volume (the temporary file was renamed over the target).
    let entries: Vec<_> = fs::read_dir(&dir)
        .expect("read_dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert_eq!(entries, ["sandbox-sidecar"]);
    let _ = fs::remove_dir_all(&dir);
}

/// images/trainer-cuda.Dockerfile cannot be built here (its base is pulled from Docker Hub):
/// the script builds it on a local stand-in base with the CPU binary in the CUDA one's place.
#[test]
fn cuda_dockerfile_builds_on_a_stand_in_base() {
    if skip("cuda_dockerfile_builds_on_a_stand_in_base") {
        return;
    }
    let listing = build();
    assert!(
        listing.contains(&format!(
            "check-cuda: user={IMAGE_USER}:{IMAGE_USER} entrypoint=[\"/usr/local/bin/trainer\"]"
        )),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("trainer {VERSION}\n")),
        "{listing}"
    );
}
