//! A pool's repository environments: those it lists and those read from a list in SWE-bench's
//! instance format, and the pool spec one environment's sandboxes are made from.
//!
//! An environment is addressed as `POOL/ENVIRONMENT` wherever one string names where a sandbox
//! comes from (the trainer's pool keys, the broker's claims): pool names are DNS labels and
//! environment names label values, neither holds a `/`.

use std::collections::BTreeSet;

use serde_json::Value;
use thiserror::Error;

use crate::pool::{Environment, EnvironmentsSource, SandboxPoolSpec};

/// SWE-bench's activation of its instance images' environment.
pub const SWE_BENCH_SHELL_INIT: &str =
    "source /opt/miniconda3/bin/activate && conda activate testbed";
/// SWE-bench's instance images.
pub const SWE_BENCH_IMAGE_PATTERN: &str = "swebench/sweb.eval.x86_64.{id}:latest";
/// Where SWE-bench-style images hold their repository.
pub const SWE_BENCH_WORKDIR: &str = "/testbed";
/// Separates a pool from an environment in one key.
pub const ENVIRONMENT_SEPARATOR: char = '/';

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnvironmentsError {
    #[error("instance list, entry {entry}: {message}")]
    Entry { entry: usize, message: String },
    #[error("environment {0:?} is listed twice")]
    Duplicate(String),
}

/// `POOL/ENVIRONMENT`.
pub fn environment_key(pool: &str, environment: &str) -> String {
    format!("{pool}{ENVIRONMENT_SEPARATOR}{environment}")
}

/// The pool and environment of a key (`None` for a bare pool name).
pub fn split_key(key: &str) -> (&str, Option<&str>) {
    match key.split_once(ENVIRONMENT_SEPARATOR) {
        Some((p, e)) => (p, Some(e)),
        None => (key, None),
    }
}

/// The id SWE-bench's image names use for an instance: Docker Hub refuses `__`.
pub fn swe_bench_image_id(instance_id: &str) -> String {
    instance_id.replace("__", "_1776_").to_lowercase()
}

/// A label value standing for `id`: lower case, other characters as `-`, at most 63
/// characters (a long id keeps its start and a hash of the whole, so names stay unique).
pub fn environment_name(id: &str) -> String {
    let mut s: String = id
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    s = s
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    if s.len() > 63 {
        // FNV-1a: a stable, dependency-free hash is all a name suffix needs.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in id.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let head = s[..54]
            .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
            .to_string();
        s = format!("{head}-{:08x}", h as u32);
    }
    if s.is_empty() { "env".to_string() } else { s }
}

/// Environments from `text`: a JSON array, or JSON Lines, of SWE-bench-style instances.
pub fn parse_instances(
    text: &str,
    source: &EnvironmentsSource,
) -> Result<Vec<Environment>, EnvironmentsError> {
    let entries: Vec<Result<Value, String>> = if text.trim_start().starts_with('[') {
        match serde_json::from_str::<Vec<Value>>(text) {
            Ok(v) => v.into_iter().map(Ok).collect(),
            Err(e) => {
                return Err(EnvironmentsError::Entry {
                    entry: 0,
                    message: format!("not a JSON array: {e}"),
                });
            }
        }
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str::<Value>(l).map_err(|e| e.to_string()))
            .collect()
    };
    let pattern = source
        .image_pattern
        .as_deref()
        .unwrap_or(SWE_BENCH_IMAGE_PATTERN);
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.into_iter().enumerate() {
        let entry = i + 1;
        let v = e.map_err(|message| EnvironmentsError::Entry { entry, message })?;
        let id = v
            .get("instance_id")
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| EnvironmentsError::Entry {
                entry,
                message: "no instance_id".to_string(),
            })?;
        let image = match v.get("image_name").and_then(Value::as_str) {
            Some(img) if !img.trim().is_empty() => img.to_string(),
            _ => pattern.replace("{id}", &swe_bench_image_id(id)),
        };
        out.push(Environment {
            name: environment_name(id),
            image,
            workdir: Some(
                source
                    .workdir
                    .clone()
                    .unwrap_or_else(|| SWE_BENCH_WORKDIR.to_string()),
            ),
            shell_init: Some(
                source
                    .shell_init
                    .clone()
                    .unwrap_or_else(|| SWE_BENCH_SHELL_INIT.to_string()),
            ),
            warm: None,
        });
    }
    Ok(out)
}

/// The pool's environments: those listed, then those read from its source (`from_source`);
/// names must be unique.
pub fn all_environments(
    spec: &SandboxPoolSpec,
    from_source: Vec<Environment>,
) -> Result<Vec<Environment>, EnvironmentsError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(spec.environments.len() + from_source.len());
    for e in spec.environments.iter().cloned().chain(from_source) {
        if !seen.insert(e.name.clone()) {
            return Err(EnvironmentsError::Duplicate(e.name));
        }
        out.push(e);
    }
    Ok(out)
}

/// The spec one environment's sandboxes are made from: the template with the environment's
/// image, working directory and activation.
pub fn spec_for(spec: &SandboxPoolSpec, env: &Environment) -> SandboxPoolSpec {
    let mut s = spec.clone();
    s.environments.clear();
    s.environments_from = None;
    s.template.image = env.image.clone();
    if let Some(w) = &env.workdir {
        s.template.workdir = w.clone();
    }
    if let Some(i) = &env.shell_init {
        s.template.shell_init = Some(i.clone());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_label_values() {
        assert_eq!(
            environment_name("astropy__astropy-12907"),
            "astropy__astropy-12907"
        );
        assert_eq!(environment_name("Org/Repo.v2 x"), "org-repo.v2-x");
        let long = "a".repeat(100);
        let n = environment_name(&long);
        assert!(n.len() <= 63, "{n}");
        assert_ne!(n, environment_name(&"a".repeat(101)));
    }

    #[test]
    fn swe_bench_lines_and_arrays() {
        let src = EnvironmentsSource::default();
        let jsonl = "{\"instance_id\": \"astropy__astropy-12907\", \"FAIL_TO_PASS\": \"[]\"}\n\n\
                     {\"instance_id\": \"x__y-1\", \"image_name\": \"jyangballin/swesmith.x86_64.x\"}\n";
        let envs = parse_instances(jsonl, &src).unwrap();
        assert_eq!(
            envs[0].image,
            "swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest"
        );
        assert_eq!(envs[0].workdir.as_deref(), Some("/testbed"));
        assert_eq!(envs[0].shell_init.as_deref(), Some(SWE_BENCH_SHELL_INIT));
        assert_eq!(envs[1].image, "jyangballin/swesmith.x86_64.x");
        let array = format!("[{}]", jsonl.trim().replace("\n\n", ",").replace('\n', ","));
        assert_eq!(parse_instances(&array, &src).unwrap(), envs);
        let err = parse_instances("{\"repo\": \"a/b\"}\n", &src).unwrap_err();
        assert_eq!(
            err,
            EnvironmentsError::Entry {
                entry: 1,
                message: "no instance_id".to_string()
            }
        );
        assert!(matches!(
            parse_instances("{\"instance_id\": \"a\"}\nnot json\n", &src),
            Err(EnvironmentsError::Entry { entry: 2, .. })
        ));
    }

    #[test]
    fn keys_round_trip() {
        assert_eq!(split_key(&environment_key("p", "e")), ("p", Some("e")));
        assert_eq!(split_key("p"), ("p", None));
    }
}
