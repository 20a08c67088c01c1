//! Writes the CRD YAML generated from the Rust types.
//!
//! `cargo run -p selfplay-crds --bin crdgen` writes `crds/generated/` and the Helm chart's
//! `charts/selfplay/crds/`; `--check` fails when the committed files differ.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let check = std::env::args().any(|a| a == "--check");
    let dirs = [
        root.join("crds/generated"),
        root.join("charts/selfplay/crds"),
    ];
    let mut stale = Vec::new();
    for crd in selfplay_crds::all_crds() {
        let yaml = match selfplay_crds::crd_yaml(&crd) {
            Ok(y) => y,
            Err(e) => {
                eprintln!("crdgen: cannot render CRD: {e}");
                return ExitCode::FAILURE;
            }
        };
        for dir in &dirs {
            let path = dir.join(selfplay_crds::crd_file_name(&crd));
            if check {
                if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                    stale.push(path.display().to_string());
                }
            } else if let Err(e) =
                std::fs::create_dir_all(dir).and_then(|_| std::fs::write(&path, &yaml))
            {
                eprintln!("crdgen: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            } else {
                println!("wrote {}", path.display());
            }
        }
    }
    if !stale.is_empty() {
        eprintln!(
            "crdgen: out of date (run `cargo run -p selfplay-crds --bin crdgen`): {}",
            stale.join(", ")
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
