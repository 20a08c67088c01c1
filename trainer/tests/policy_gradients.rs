//! Gradients of the model: every parameter gets a finite, non-zero one (candle-nn's fused
//! ops would silently drop them), they agree with central finite differences in f64, and the
//! entropy (a reported figure) contributes none.

use candle_core::{D, DType, Device, Tensor, Var};
use selfplay_trainer::policy::{CandlePolicy, OpsMode};

fn seqs() -> Vec<Vec<u32>> {
    vec![
        (0..23u32).map(|i| (i * 37 + 5) % 256).collect(),
        (0..11u32).map(|i| (i * 11 + 3) % 256).collect(),
    ]
}

/// A loss of the log-probs, Σ wᵢ·logpᵢ, plus (with `entropy`) one of the entropies, Σ uᵢ·Hᵢ.
fn loss_with(policy: &CandlePolicy, picks: &[(usize, usize)], grad: bool, entropy: bool) -> Tensor {
    let s = policy
        .model()
        .score_positions(&seqs(), picks, grad)
        .unwrap();
    let n = picks.len();
    let w: Vec<f64> = (0..n).map(|i| ((i * 7 % 5) as f64 - 2.0) * 0.3).collect();
    let u: Vec<f64> = (0..n).map(|i| ((i * 3 % 4) as f64 - 1.5) * 0.2).collect();
    let w = Tensor::from_vec(w, n, &Device::Cpu)
        .unwrap()
        .to_dtype(s.dtype())
        .unwrap();
    let u = Tensor::from_vec(u, n, &Device::Cpu)
        .unwrap()
        .to_dtype(s.dtype())
        .unwrap();
    let lp = s.narrow(D::Minus1, 0, 1).unwrap().squeeze(1).unwrap();
    let h = s.narrow(D::Minus1, 1, 1).unwrap().squeeze(1).unwrap();
    let lp_term = (lp * w).unwrap().sum_all().unwrap();
    if entropy {
        (lp_term + (h * u).unwrap().sum_all().unwrap()).unwrap()
    } else {
        lp_term
    }
}

/// The log-prob loss the gradients are checked on (the entropy is never differentiated).
fn loss(policy: &CandlePolicy, picks: &[(usize, usize)], grad: bool) -> Tensor {
    loss_with(policy, picks, grad, false)
}

fn picks() -> Vec<(usize, usize)> {
    let s = seqs();
    let mut p: Vec<(usize, usize)> = (1..s[0].len()).map(|i| (0, i)).collect();
    p.extend((1..s[1].len()).map(|i| (1, i)));
    p
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    for mode in [OpsMode::Auto, OpsMode::Composite] {
        let mut policy = CandlePolicy::tiny(11, 32, 2, DType::F32, &Device::Cpu).unwrap();
        policy.model_mut().set_ops_mode(mode);
        let grads = loss(&policy, &picks(), true).backward().unwrap();
        for (name, p) in policy.model().parameters() {
            let g = grads
                .get(p.as_tensor())
                .unwrap_or_else(|| panic!("{mode:?}: no gradient for {name}"));
            let v: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{mode:?}: non-finite gradient for {name}"
            );
            let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!(norm > 0.0, "{mode:?}: zero gradient for {name}");
        }
    }
}

/// The entropy is reported, never trained on: it is detached from the graph, so adding
/// Σ uᵢ·Hᵢ to the loss leaves every parameter's gradient exactly as it was.
#[test]
fn the_entropy_adds_no_gradient() {
    for mode in [OpsMode::Auto, OpsMode::Composite] {
        let mut policy = CandlePolicy::tiny(11, 32, 2, DType::F32, &Device::Cpu).unwrap();
        policy.model_mut().set_ops_mode(mode);
        let with = loss_with(&policy, &picks(), true, true).backward().unwrap();
        let without = loss(&policy, &picks(), true).backward().unwrap();
        for (name, p) in policy.model().parameters() {
            let a: Vec<f32> = with
                .get(p.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f32> = without
                .get(p.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(a, b, "{mode:?}: the entropy changed the gradient of {name}");
        }
    }
}

fn value(policy: &CandlePolicy, picks: &[(usize, usize)]) -> f64 {
    loss(policy, picks, false).to_scalar::<f64>().unwrap()
}

fn nudge(var: &Var, idx: usize, delta: f64) {
    let shape = var.shape().clone();
    let mut v: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    v[idx] += delta;
    var.set(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
        .unwrap();
}

#[test]
fn gradients_match_finite_differences_in_f64() {
    let policy = CandlePolicy::tiny(5, 16, 2, DType::F64, &Device::Cpu).unwrap();
    // Random norms/biases, so that their gradients are generic too.
    for (name, p) in policy.model().parameters() {
        if name.ends_with(".bias") || name.contains("norm") {
            let n = p.elem_count();
            let v: Vec<f64> = (0..n)
                .map(|i| {
                    1.0 * f64::from(!name.ends_with(".bias")) + 0.1 * ((i * 13 % 7) as f64 - 3.0)
                })
                .collect();
            p.set(&Tensor::from_vec(v, p.shape().clone(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let picks = picks();
    let grads = loss(&policy, &picks, true).backward().unwrap();
    let h = 1e-6;
    let mut checked = 0;
    for (name, p) in policy.model().parameters() {
        let g: Vec<f64> = grads
            .get(p.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // The element with the largest gradient and one in the middle of the tensor.
        let big = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap()
            .0;
        for idx in [big, g.len() / 2] {
            nudge(p, idx, h);
            let up = value(&policy, &picks);
            nudge(p, idx, -2.0 * h);
            let down = value(&policy, &picks);
            nudge(p, idx, h);
            let fd = (up - down) / (2.0 * h);
            let err = (fd - g[idx]).abs() / g[idx].abs().max(1e-3);
            assert!(
                err < 1e-5,
                "{name}[{idx}]: backward {} vs finite difference {fd}",
                g[idx]
            );
            checked += 1;
        }
    }
    assert!(checked >= 2 * 20, "checked only {checked} elements");
}
