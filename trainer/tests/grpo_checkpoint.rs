//! Checkpoints: resuming continues with exactly the losses of an uninterrupted run (sampling
//! included, so the RNG state must survive), writes are atomic, and a diverged model is
//! never saved.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use selfplay_trainer::engine::policy::{Policy, SamplingParams};
use selfplay_trainer::grpo::{
    EpisodeTokens, GrpoError, GrpoSettings, GrpoTrainer, group_advantages,
};
use selfplay_trainer::policy::CandlePolicy;

fn settings() -> GrpoSettings {
    GrpoSettings {
        learning_rate: 3e-3,
        micro_batch_size: 3,
        seed: 9,
        warmup_steps: 1,
        weight_decay: 0.01,
        ..GrpoSettings::default()
    }
}

fn fresh() -> GrpoTrainer {
    let policy = CandlePolicy::tiny(9, 16, 2, DType::F32, &Device::Cpu).unwrap();
    GrpoTrainer::new(Arc::new(policy), settings()).unwrap()
}

/// One self-contained RL step: sample groups from the policy, reward lowercase letters,
/// train. Returns the loss.
fn rl_step(t: &mut GrpoTrainer) -> f64 {
    let policy = t.policy().clone();
    let prompts = [b"fix: ".to_vec(), b"bug? ".to_vec()];
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        max_new_tokens: 10,
        stop: vec![],
    };
    let mut samples = Vec::new();
    for (g, prompt) in prompts.iter().enumerate() {
        let ctx: Vec<Vec<u32>> = vec![prompt.iter().map(|&b| u32::from(b)).collect(); 4];
        let gens = policy.generate(&ctx, &params).unwrap();
        let rewards: Vec<f64> = gens
            .iter()
            .map(|g| g.tokens.iter().filter(|&&t| (97..123).contains(&t)).count() as f64 / 10.0)
            .collect();
        let Some(adv) = group_advantages(&rewards) else {
            continue;
        };
        for (generation, a) in gens.iter().zip(adv) {
            let mut ep = EpisodeTokens::new(ctx[0].clone());
            ep.push_policy(generation, policy.version());
            samples.push(ep.into_sample(a, g as u64));
        }
    }
    t.train_step(&samples).unwrap().loss
}

#[test]
fn resume_reproduces_an_uninterrupted_run_exactly() {
    let mut a = fresh();
    let straight: Vec<f64> = (0..4).map(|_| rl_step(&mut a)).collect();
    assert!(
        straight.iter().all(|l| l.is_finite() && *l != 0.0),
        "{straight:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("run").join("step-2");
    let mut b = fresh();
    let mut resumed: Vec<f64> = (0..2).map(|_| rl_step(&mut b)).collect();
    b.save_checkpoint(&ckpt).unwrap();
    drop(b);
    for f in [
        "model.safetensors",
        "config.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(ckpt.join(f).is_file(), "{f} missing");
    }
    let leftovers: Vec<_> = std::fs::read_dir(ckpt.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "temporary files left: {leftovers:?}");

    let mut c = GrpoTrainer::resume(&ckpt, settings(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!((c.step(), c.policy().version()), (2, 2));
    resumed.extend((0..2).map(|_| rl_step(&mut c)));
    assert_eq!(
        straight, resumed,
        "losses after resuming differ from the uninterrupted run"
    );

    // A checkpoint never overwrites another.
    let err = c.save_checkpoint(&ckpt).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
}

#[test]
fn checkpoint_weights_are_transformers_safetensors() {
    let t = fresh();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = t.save_checkpoint(&dir.path().join("c")).unwrap();
    let bytes = std::fs::read(ckpt.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
    let tensors = meta.tensors();
    let names: Vec<&String> = tensors.keys().collect();
    assert!(
        names
            .iter()
            .any(|n| *n == "model.layers.1.mlp.down_proj.weight")
    );
    assert!(names.iter().any(|n| *n == "model.embed_tokens.weight"));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "qwen2");
    assert_eq!(cfg["torch_dtype"], "float32");
    // And it loads back as a policy that scores like the original.
    let back = CandlePolicy::load(&ckpt, None, DType::F32, &Device::Cpu, 0).unwrap();
    let seq = vec![vec![1u32, 2, 3, 4, 5]];
    assert_eq!(back.score(&seq).unwrap(), t.policy().score(&seq).unwrap());
}

fn snapshot(t: &GrpoTrainer) -> Vec<Vec<f32>> {
    t.policy()
        .model()
        .parameters()
        .iter()
        .map(|(_, p)| p.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn nan_stops_the_step_and_never_reaches_a_checkpoint() {
    let mut t = fresh();
    let good_dir = tempfile::tempdir().unwrap();
    let good = t.save_checkpoint(&good_dir.path().join("good")).unwrap();
    let before = std::fs::read(good.join("model.safetensors")).unwrap();

    let policy = t.policy().clone();
    let (name, p) = &policy.model().parameters()[3];
    let mut v: Vec<f32> = p.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    v[0] = f32::NAN;
    p.set(&Tensor::from_vec(v, p.shape().clone(), &Device::Cpu).unwrap())
        .unwrap();
    let weights = snapshot(&t);

    let ep = EpisodeTokens::new(vec![10, 11, 12]);
    // The NaN weight poisons sampling's distribution too: fixed policy tokens instead.
    let mut s = ep.into_sample(1.0, 0);
    s.tokens.extend([20, 21, 22]);
    s.policy_mask.extend([true; 3]);
    s.old_logprobs.extend([-5.0; 3]);
    let mut s2 = s.clone();
    s2.advantage = -1.0;
    let err = t.train_step(&[s, s2]).unwrap_err();
    assert!(matches!(err, GrpoError::NonFinite { .. }), "{err}");
    assert!(err.to_string().contains("not finite"), "{err}");
    assert_eq!(t.nonfinite_steps(), 1);
    assert_eq!(
        (t.step(), t.policy().version()),
        (0, 0),
        "a refused update must not count"
    );
    let after = snapshot(&t);
    for (i, (a, b)) in weights.iter().zip(&after).enumerate() {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(
            same,
            "parameter {i} changed by a refused update ({name} holds the NaN)"
        );
    }

    let bad = good_dir.path().join("bad");
    let err = t.save_checkpoint(&bad).unwrap_err();
    assert!(matches!(err, GrpoError::NonFiniteState), "{err}");
    assert!(!bad.exists());
    assert_eq!(
        std::fs::read_dir(good_dir.path()).unwrap().count(),
        1,
        "nothing but the good checkpoint"
    );
    assert_eq!(
        std::fs::read(good.join("model.safetensors")).unwrap(),
        before
    );
    assert!(resume_ok(&good));
}

fn resume_ok(dir: &Path) -> bool {
    GrpoTrainer::resume(dir, settings(), DType::F32, &Device::Cpu).is_ok()
}
