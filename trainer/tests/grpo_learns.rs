//! GRPO learns: the RL libraries' sanity task, run end to end through the real pieces.
//!
//! A tiny model from a fixed seed samples groups of completions with its own sampler
//! (`CandlePolicy::generate`, temperature 1); each completion is rewarded by the fraction of
//! its token budget spent on lowercase ASCII letters (a reward on what it generates, about
//! 0.1 for the untrained policy); the group's leave-one-out advantages and samples are made
//! by the very function a training step uses (`train::step::push_group`, method.md "advantage:
//! leave-one-out within the group"); the clipped objective, token normalisation and AdamW
//! are `GrpoTrainer::train_step`'s; half-way, the trainer is checkpointed, dropped and
//! resumed from disk, so the second half learns from restored weights, moments and RNG.
//!
//! The second test runs the very same loop with every advantage negated after `push_group`
//! (the only difference) and shows that the assertion of the first then fails and the reward
//! does not rise: the first test sees the direction of learning, not just motion. The flip is
//! done here, on the samples, so production code has no knob to train backwards.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use selfplay_crds::run::LrSchedule;
use selfplay_trainer::engine::policy::{Generation, Policy, SamplingParams};
use selfplay_trainer::engine::trajectory::{EndReason, Role, Trajectory, Turn};
use selfplay_trainer::grpo::{GrpoSettings, GrpoTrainer, Sample};
use selfplay_trainer::policy::CandlePolicy;
use selfplay_trainer::train::step::push_group;

/// The default run's tiny model (`assets/default-run.yaml`: hidden 64, 2 layers), seed fixed.
const MODEL_SEED: u64 = 0;
const HIDDEN: usize = 64;
const LAYERS: usize = 2;
const STEPS: usize = 40;
/// Steps averaged at each end of the curve.
const K: usize = 8;
const PROMPTS: [&[u8]; 2] = [b"fix: ", b"bug? "];
const GROUP: usize = 8;
const NEW_TOKENS: usize = 8;
/// The untrained policy scores about 26/257 ≈ 0.1; learning must take it well past this.
const THRESHOLD: f64 = 0.4;
/// The least rise of the last K steps' mean over the first K's that counts as learning.
const MARGIN: f64 = 0.2;

fn settings() -> GrpoSettings {
    GrpoSettings {
        // A tiny model needs a large step to move within a few dozen updates.
        learning_rate: 1e-2,
        lr_schedule: LrSchedule::Constant,
        warmup_steps: 0,
        total_steps: STEPS as u64,
        // Several micro-batches per update, so accumulation is part of what is tested.
        micro_batch_size: 5,
        seed: 7,
        ..GrpoSettings::default()
    }
}

/// The reward of one completion: lowercase letters per token of the budget. A fixed
/// denominator, so stopping early (EOS) is never a way to a higher fraction.
fn reward(g: &Generation) -> f64 {
    let hits = g
        .tokens
        .iter()
        .filter(|&&t| (u32::from(b'a')..=u32::from(b'z')).contains(&t))
        .count();
    hits as f64 / NEW_TOKENS as f64
}

/// One episode of one policy turn, as the engine records it.
fn trajectory(prompt: &[u32], g: &Generation, version: u64) -> Trajectory {
    Trajectory {
        role: Role::Solver,
        prompt_tokens: prompt.to_vec(),
        turns: vec![Turn {
            policy_tokens: g.tokens.clone(),
            policy_logprobs: g.logprobs.clone(),
            finish: Some(g.finish),
            policy_version: version,
            tool: None,
            format_error: None,
            tool_failed: false,
            observation_tokens: vec![],
        }],
        end_reason: EndReason::Submitted,
        infra_error: None,
    }
}

/// Samples every group, trains once; returns the mean reward of what was sampled.
fn rl_step(t: &mut GrpoTrainer, advantage_sign: f64) -> f64 {
    let policy = t.policy().clone();
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: NEW_TOKENS,
        stop: vec![],
    };
    let (mut samples, mut total) = (Vec::<Sample>::new(), 0.0);
    for (g, prompt) in PROMPTS.iter().enumerate() {
        let ctx: Vec<u32> = prompt.iter().map(|&b| u32::from(b)).collect();
        let gens = policy
            .generate(&vec![ctx.clone(); GROUP], &params)
            .expect("sampling");
        let rewards: Vec<f64> = gens.iter().map(reward).collect();
        total += rewards.iter().sum::<f64>();
        let trajs: Vec<Trajectory> = gens
            .iter()
            .map(|gen_| trajectory(&ctx, gen_, policy.version()))
            .collect();
        let members: Vec<&Trajectory> = trajs.iter().collect();
        push_group(&mut samples, &members, &rewards, g as u64);
    }
    for s in &mut samples {
        s.advantage *= advantage_sign;
    }
    t.train_step(&samples).expect("GRPO update");
    total / (PROMPTS.len() * GROUP) as f64
}

/// The mean reward of each step of a run of `STEPS` updates, checkpointed and resumed
/// half-way.
fn curve(advantage_sign: f64) -> Vec<f64> {
    let started = Instant::now();
    let policy =
        CandlePolicy::tiny(MODEL_SEED, HIDDEN, LAYERS, DType::F32, &Device::Cpu).expect("model");
    let mut t = GrpoTrainer::new(Arc::new(policy), settings()).expect("trainer");
    let mut rewards: Vec<f64> = (0..STEPS / 2)
        .map(|_| rl_step(&mut t, advantage_sign))
        .collect();
    let updates = t.step();
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = t
        .save_checkpoint(&dir.path().join("half-way"))
        .expect("checkpoint");
    drop(t);
    let mut t = GrpoTrainer::resume(&ckpt, settings(), DType::F32, &Device::Cpu).expect("resume");
    assert_eq!(t.step(), updates, "resumed at the wrong step");
    rewards.extend((STEPS / 2..STEPS).map(|_| rl_step(&mut t, advantage_sign)));
    eprintln!(
        "advantage sign {advantage_sign:+}: {:.2?} for {STEPS} steps; mean reward per step {:.3?}",
        started.elapsed(),
        rewards
    );
    rewards
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Whether a curve shows learning: the last K steps beat the first K by `MARGIN` and reach
/// `THRESHOLD`, which the untrained policy does not.
fn learned(rewards: &[f64]) -> Result<(), String> {
    let (first, last) = (mean(&rewards[..K]), mean(&rewards[rewards.len() - K..]));
    if last >= first + MARGIN && last >= THRESHOLD {
        Ok(())
    } else {
        Err(format!(
            "mean reward of the first {K} steps {first:.3}, of the last {K} {last:.3}: \
             wanted a rise of {MARGIN} to at least {THRESHOLD}"
        ))
    }
}

#[test]
fn grpo_raises_the_reward_of_a_tiny_model() {
    let rewards = curve(1.0);
    // The untrained policy's own score, so the threshold means something.
    assert!(
        rewards[0] < THRESHOLD,
        "the untrained policy already scores {:.3}",
        rewards[0]
    );
    if let Err(e) = learned(&rewards) {
        panic!("GRPO did not learn: {e}; curve {rewards:.3?}");
    }
}

#[test]
fn grpo_with_the_advantage_sign_flipped_does_not() {
    let rewards = curve(-1.0);
    assert!(
        learned(&rewards).is_err(),
        "trained against its reward, the policy still passed the learning test: {rewards:.3?}"
    );
    let (first, last) = (mean(&rewards[..K]), mean(&rewards[rewards.len() - K..]));
    assert!(
        last <= first,
        "trained against its reward, the mean reward rose from {first:.3} to {last:.3}"
    );
}
