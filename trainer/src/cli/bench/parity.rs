//! `trainer bench parity`: the device's forward and backward against the CPU's on the
//! committed fixtures (`trainer/fixtures`: tiny Qwen2 models, with PyTorch's f64 log-probs
//! for some). The reference side is the CPU kernels in f32, which the test suite checks
//! against PyTorch; the checked side runs the composite ops (the only ones a GPU has) on
//! `--device`, in f32 and in bf16. Compared: every token's log-prob and entropy, and the
//! gradient of Σ wᵢ·log pᵢ with respect to every parameter; the log-probs also against
//! PyTorch's f64 values where the fixture has them. With `--device cpu` the same code checks
//! the GPU's code path on the CPU: the dry run of `trainer/scripts/gpu-check.sh`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use candle_core::{D, DType, Device, Tensor};
use serde_json::{Value, json};

use crate::policy::{OpsMode, Qwen2Config, Qwen2Model, weights};

/// Arguments of `trainer bench parity`.
#[derive(clap::Args, Debug)]
pub struct ParityArgs {
    /// The folder of fixtures: each subfolder with `config.json` and a `reference.json`
    /// holding `sequences` is checked.
    #[arg(long, default_value = "trainer/fixtures")]
    pub fixtures: PathBuf,
    /// `cuda` (the first GPU) or `cpu` (the GPU's code path on the CPU).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// One JSON object per fixture and dtype instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What one model computes on a fixture's sequences.
struct Scores {
    logprobs: Vec<f64>,
    entropy: Vec<f64>,
    /// The gradient of Σ wᵢ·log pᵢ for each parameter, in [`Qwen2Model::parameters`] order.
    grads: Vec<Vec<f64>>,
}

/// How far the checked side may be from the CPU's f32 kernels. f32: the same arithmetic in
/// another order, bounded ~100× above what the CPU's composite path gives (≤ 2e-6; candle
/// keeps TF32 off for f32 matmuls unless asked). bf16: weights and activations rounded to 8
/// bits of mantissa; the composite path on the CPU gives up to 3.9e-2 (log-prob), 5.1e-3
/// (entropy) and 6.7e-2 (gradient) on the fixtures (`trainer bench parity --device cpu`),
/// and the bounds are 4–20× that: a wrong kernel is off by O(1).
#[derive(Clone, Copy, Debug)]
struct Tolerance {
    logprob: f64,
    entropy: f64,
    grad_rel: f64,
}

fn tolerance(dtype: DType) -> Tolerance {
    if dtype == DType::F32 {
        Tolerance {
            logprob: 1e-4,
            entropy: 1e-4,
            grad_rel: 1e-3,
        }
    } else {
        Tolerance {
            logprob: 0.2,
            entropy: 0.1,
            grad_rel: 0.25,
        }
    }
}

pub fn run(args: ParityArgs) -> anyhow::Result<ExitCode> {
    let device = super::device(&args.device)?;
    let fixtures = fixture_dirs(&args.fixtures)?;
    if fixtures.is_empty() {
        anyhow::bail!(
            "no fixture (a folder with config.json and reference.json) in {}",
            args.fixtures.display()
        );
    }
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "{:?} (composite ops) against the CPU kernels in f32, on {}",
            device.location(),
            args.fixtures.display()
        )?;
        writeln!(
            out,
            "{:<18} {:>5} {:>10} {:>11} {:>10} {:>14}  ok",
            "fixture", "dtype", "|Δ logp|", "|Δ entropy|", "grad rel", "vs PyTorch f64"
        )?;
    }
    let mut all_ok = true;
    for dir in &fixtures {
        let name = dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
        let seqs = sequences(dir)?;
        let reference = pytorch_logprobs(dir, seqs.len())?;
        let cpu = load(dir, DType::F32, &Device::Cpu, OpsMode::Auto)?;
        let want = scores(&cpu, &seqs).with_context(|| format!("{name} on the CPU"))?;
        for dtype in [DType::F32, DType::BF16] {
            let model = load(dir, dtype, &device, OpsMode::Composite)?;
            let got = scores(&model, &seqs)
                .with_context(|| format!("{name} in {} on {:?}", dtype.as_str(), device))?;
            let tol = tolerance(dtype);
            let lp = max_abs_diff(&got.logprobs, &want.logprobs);
            let ent = max_abs_diff(&got.entropy, &want.entropy);
            let grad = got
                .grads
                .iter()
                .zip(&want.grads)
                .map(|(g, w)| max_abs_diff(g, w) / max_abs(w).max(1e-30))
                .fold(0.0, nan_max);
            let vs_ref = reference.as_ref().map(|r| max_abs_diff(&got.logprobs, r));
            let ok = lp <= tol.logprob
                && ent <= tol.entropy
                && grad <= tol.grad_rel
                && vs_ref.is_none_or(|d| d <= tol.logprob);
            all_ok &= ok;
            if args.json {
                writeln!(
                    out,
                    "{}",
                    json!({
                        "fixture": name,
                        "dtype": dtype.as_str(),
                        "device": args.device,
                        "tokens": got.logprobs.len(),
                        "logprob_max_abs": lp,
                        "entropy_max_abs": ent,
                        "grad_max_rel": grad,
                        "logprob_vs_reference_max_abs": vs_ref,
                        "tolerance": {
                            "logprob": tol.logprob,
                            "entropy": tol.entropy,
                            "grad_rel": tol.grad_rel,
                        },
                        "ok": ok,
                    })
                )?;
            } else {
                writeln!(
                    out,
                    "{:<18} {:>5} {:>10.1e} {:>11.1e} {:>10.1e} {:>14}  {}",
                    name,
                    dtype.as_str(),
                    lp,
                    ent,
                    grad,
                    vs_ref.map_or("-".into(), |d| format!("{d:.1e}")),
                    if ok { "ok" } else { "FAILED" }
                )?;
            }
        }
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn fixture_dirs(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("reading {}", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").is_file() && p.join("reference.json").is_file())
        .collect();
    dirs.sort();
    Ok(dirs)
}

fn sequences(dir: &Path) -> anyhow::Result<Vec<Vec<u32>>> {
    let path = dir.join("reference.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| path.display().to_string())?;
    let seqs: Vec<Vec<u32>> = serde_json::from_value(
        v.get("sequences").cloned().unwrap_or(Value::Null),
    )
    .with_context(|| {
        format!(
            "{}: `sequences` is not a list of token lists",
            path.display()
        )
    })?;
    if seqs.is_empty() || seqs.iter().any(|s| s.len() < 2) {
        anyhow::bail!("{}: every sequence needs two tokens", path.display());
    }
    Ok(seqs)
}

/// PyTorch's f64 log-probs of every sequence, end to end, if the fixture has them.
fn pytorch_logprobs(dir: &Path, n: usize) -> anyhow::Result<Option<Vec<f64>>> {
    let path = dir.join("reference.safetensors");
    if !path.is_file() {
        return Ok(None);
    }
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for k in 0..n {
        match tensors.get(&format!("logprobs.{k}")) {
            Some(t) => out.extend(t.to_dtype(DType::F64)?.to_vec1::<f64>()?),
            None => return Ok(None),
        }
    }
    Ok(Some(out))
}

fn load(dir: &Path, dtype: DType, device: &Device, ops: OpsMode) -> anyhow::Result<Qwen2Model> {
    let path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let cfg = Qwen2Config::from_json(
        serde_json::from_str(&text).with_context(|| path.display().to_string())?,
    )?;
    let tensors = weights::load_files(&weights::weight_files(dir)?)?;
    // `from_tensors`, not `load_model`: the latter computes in f32 on the CPU whatever the
    // dtype, and the dry run wants bf16 there too.
    let mut model = Qwen2Model::from_tensors(cfg, tensors, dtype, device)?;
    model.set_ops_mode(ops);
    Ok(model)
}

/// Log-probs and entropies of every token after the first, and the gradient of
/// Σ wᵢ·log pᵢ with fixed weights of both signs.
fn scores(model: &Qwen2Model, seqs: &[Vec<u32>]) -> anyhow::Result<Scores> {
    let picks: Vec<(usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(s, seq)| (1..seq.len()).map(move |i| (s, i)))
        .collect();
    let s = model.score_positions(seqs, &picks, true)?;
    let values = s.detach().to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let n = picks.len();
    let w: Vec<f64> = (0..n).map(|i| ((i * 7 % 5) as f64 - 2.0) * 0.3).collect();
    let w = Tensor::from_vec(w, n, model.device())?.to_dtype(s.dtype())?;
    let lp = s.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
    let grads = (lp * w)?.sum_all()?.backward()?;
    let mut out = Vec::new();
    for ((name, _), p) in model.parameters().iter().zip(model.compute_parameters()) {
        let g = grads
            .get(p.as_tensor())
            .with_context(|| format!("no gradient for {name}"))?;
        out.push(g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
    }
    Ok(Scores {
        logprobs: values.iter().map(|v| v[0]).collect(),
        entropy: values.iter().map(|v| v[1]).collect(),
        grads: out,
    })
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, nan_max)
}

/// The larger of two, NaN if either is: a NaN must fail the check (`NaN <= tolerance` is
/// false), where `f64::max` would drop it.
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

fn max_abs(a: &[f64]) -> f64 {
    a.iter().fold(0.0, |m, x| m.max(x.abs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nan_or_a_length_mismatch_is_never_within_tolerance() {
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.5, 2.0]), 0.5);
        assert!(max_abs_diff(&[f64::NAN, 2.0], &[1.0, 2.0]).is_nan());
        assert!(max_abs_diff(&[1.0, f64::NAN], &[1.0, 2.0]).is_nan());
        assert_eq!(max_abs_diff(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        assert!(nan_max(0.0, f64::NAN).is_nan() && nan_max(f64::NAN, 0.0).is_nan());
    }
}
