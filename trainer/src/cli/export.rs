//! `trainer export`: a run's valid bugs as a task set (see `crate::eval::export`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::engine::prompts::PromptSet;
use crate::eval::export::export_run;
use crate::eval::instance::to_jsonl;

/// The formats `trainer export` writes.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ExportFormat {
    /// SWE-bench's instance format, as JSON Lines, with a `selfplay` object per instance.
    SweBench,
}

/// Arguments of `trainer export`.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The run's output directory (`out/<run name>`).
    #[arg(long)]
    pub run: PathBuf,
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// Where to write the instances (JSON Lines).
    #[arg(long)]
    pub out: PathBuf,
    /// Prefix of the instance ids (default: the run directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// The run's SelfPlayRun file, when it set its own prompt templates
    /// (`spec.selfPlay.prompts`): the problem statements are then cut from its solver
    /// template, as its solvers saw them.
    #[arg(long)]
    pub spec: Option<PathBuf>,
}

pub fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let ExportFormat::SweBench = args.format;
    let name = match &args.name {
        Some(n) => n.clone(),
        None => std::path::absolute(&args.run)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
            .unwrap_or_else(|| "run".to_string()),
    };
    let prompts = match &args.spec {
        Some(path) => {
            let run = crate::train::config::load(Some(path))?;
            PromptSet::with_templates(run.run.spec.self_play.prompts.as_ref())
                .context("spec.selfPlay.prompts")?
        }
        None => PromptSet::default(),
    };
    let export = export_run(&args.run, &name, &prompts)?;
    let text = to_jsonl(&export.instances)?;
    std::fs::write(&args.out, text).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "{} instance(s) from {} valid bug(s) ({} duplicate(s)) → {}",
        export.instances.len(),
        export.valid_bugs,
        export
            .valid_bugs
            .saturating_sub(export.without_validation + export.instances.len()),
        args.out.display()
    );
    if export.without_validation > 0 {
        eprintln!(
            "left out {} valid bug(s) recorded without their validation result (runs before `trainer export` existed)",
            export.without_validation
        );
    }
    Ok(ExitCode::SUCCESS)
}
