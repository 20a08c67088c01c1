//! `trainer sft`: the loss mask against the rendered conversation, the loss against an
//! independent log-softmax, learning on a small chat set, the saved model reproducing the
//! trained log-probs, exact resume, episode replay, and errors that name the bad line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{D, DType, Device};
use selfplay_trainer::engine::policy::TokenCodec;
use selfplay_trainer::engine::prompts::ChatMarkup;
use selfplay_trainer::engine::trajectory::{EndReason, Role, Trajectory, Turn};
use selfplay_trainer::grpo::{GrpoSettings, GrpoTrainer};
use selfplay_trainer::policy::{ByteCodec, CandlePolicy, HfCodec};
use selfplay_trainer::sft::chat::parse_messages;
use selfplay_trainer::sft::{
    Example, LoadOptions, SftError, SftOptions, SftTrainer, load_dataset, mean_nll,
    render_conversation,
};
use selfplay_trainer::train::step::{EpisodeRecord, SolverDetail};

const SEED: u64 = 11;

fn tiny_model_dir(dir: &Path) -> PathBuf {
    let policy = CandlePolicy::tiny(SEED, 32, 2, DType::F32, &Device::Cpu).expect("tiny");
    GrpoTrainer::new(Arc::new(policy), GrpoSettings::default())
        .expect("trainer")
        .save_checkpoint(&dir.join("base"))
        .expect("save")
}

fn load(dir: &Path) -> CandlePolicy {
    CandlePolicy::load(dir, None, DType::F32, &Device::Cpu, SEED).expect("load")
}

fn opts() -> LoadOptions {
    LoadOptions {
        solved_only: true,
        max_tokens: 4096,
        context: 4096,
        vocab_size: ByteCodec::VOCAB_SIZE,
    }
}

fn options(steps: u64, batch: usize) -> SftOptions {
    SftOptions {
        learning_rate: 1e-2,
        warmup_steps: 2,
        total_steps: steps,
        batch_size: batch,
        micro_batch_size: 2,
        max_grad_norm: 1.0,
        weight_decay: 0.0,
        seed: 5,
    }
}

/// Four small agent conversations in the SWE-smith message format.
fn chat_lines() -> Vec<String> {
    let convs = [
        ("fix add", "ls", "add.py", "sed -i s/-/+/ add.py"),
        (
            "fix mul",
            "cat mul.py",
            "def mul(a, b): return a + b",
            "sed -i s/+/*/ mul.py",
        ),
        (
            "fix sub",
            "grep -n sub *.py",
            "sub.py:1",
            "sed -i s/+/-/ sub.py",
        ),
        ("fix div", "ls", "div.py", "sed -i s/*/\\//g div.py"),
    ];
    convs
        .iter()
        .map(|(task, first, out, fix)| {
            serde_json::json!({"messages": [
                {"role": "system", "content": "You fix bugs."},
                {"role": "user", "content": task},
                {"role": "assistant", "content": format!("<bash>{first}</bash>")},
                {"role": "tool", "content": out},
                {"role": "assistant", "content": [{"type": "text", "text": format!("<bash>{fix}</bash>")}]},
                {"role": "tool", "content": ""},
                {"role": "assistant", "content": "<submit/>"},
            ]})
            .to_string()
        })
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").expect("write");
}

#[test]
fn the_mask_covers_exactly_the_assistant_turns_and_their_end_of_turn_markers() {
    let record = serde_json::json!({"messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "fix it"},
        {"role": "assistant", "content": "<bash>ls</bash>"},
        {"role": "tool", "content": "a.py"},
        {"role": "assistant", "content": "<submit/>"},
        {"role": "user", "content": "trailing, no loss"},
    ]});
    let messages = parse_messages(&record).expect("parse");
    // The expected text, piece by piece, with which pieces are trained.
    let pieces: [(&str, bool); 6] = [
        (
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nfix it<|im_end|>\n<|im_start|>assistant\n",
            false,
        ),
        ("<bash>ls</bash>", true),
        ("<|im_end|>", true),
        (
            "\n<|im_start|>user\na.py<|im_end|>\n<|im_start|>assistant\n",
            false,
        ),
        ("<submit/>", true),
        ("<|im_end|>", true),
    ];
    let (tokens, mask) =
        render_conversation(&messages, &ByteCodec, &ChatMarkup::chatml()).expect("render");
    let mut want_tokens = Vec::new();
    let mut want_mask = Vec::new();
    for (text, trained) in pieces {
        want_tokens.extend(text.bytes().map(u32::from));
        want_mask.extend(std::iter::repeat_n(trained, text.len()));
    }
    assert_eq!(tokens, want_tokens);
    assert_eq!(mask, want_mask);

    // With the Qwen2 tokenizer the end of turn is the single <|im_end|> token.
    let hf = HfCodec::from_file(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/tokenizer/tokenizer.json"
    )))
    .expect("tokenizer");
    let im_end = hf.token_id("<|im_end|>").expect("im_end");
    let (tokens, mask) =
        render_conversation(&messages, &hf, &ChatMarkup::chatml()).expect("render");
    let full: String = pieces.iter().map(|(t, _)| *t).collect();
    assert_eq!(hf.decode(&tokens), full);
    let trained: Vec<u32> = tokens
        .iter()
        .zip(&mask)
        .filter(|(_, m)| **m)
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(
        hf.decode(&trained),
        "<bash>ls</bash><|im_end|><submit/><|im_end|>"
    );
    assert_eq!(trained.iter().filter(|&&t| t == im_end).count(), 2);
    let last = tokens
        .iter()
        .zip(&mask)
        .rposition(|(_, m)| *m)
        .expect("trained");
    assert_eq!(tokens[last], im_end);
    assert!(!mask[0]);
}

/// The loss of the first update against log-softmax of the model's logits, taken at the
/// positions of the assistant text found in the decoded sequence (not from the mask).
#[test]
fn the_loss_is_the_mean_nll_of_the_assistant_tokens_only() {
    let tmp = tempfile::tempdir().expect("tmp");
    let base = tiny_model_dir(tmp.path());
    let data_path = tmp.path().join("chat.jsonl");
    let lines = chat_lines();
    write_lines(&data_path, &lines);
    let data = load_dataset(&data_path, &ByteCodec, &ChatMarkup::chatml(), &opts()).expect("load");
    assert_eq!(data.examples.len(), 4);
    assert_eq!(data.chat_records, 4);

    let policy = load(&base);
    let mut nll = 0f64;
    let mut count = 0usize;
    for e in &data.examples {
        let text = ByteCodec.decode(&e.tokens);
        let logits = policy
            .model()
            .forward_logits(std::slice::from_ref(&e.tokens))
            .expect("logits")
            .to_dtype(DType::F64)
            .expect("f64");
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)
            .expect("log_softmax")
            .squeeze(0)
            .expect("squeeze")
            .to_vec2::<f64>()
            .expect("vec");
        // Every "<|im_start|>assistant\n" opens a turn that runs to and through "<|im_end|>".
        let open = "<|im_start|>assistant\n";
        let mut from = 0;
        while let Some(k) = text[from..].find(open) {
            let start = from + k + open.len();
            let end = start + text[start..].find("<|im_end|>").expect("end") + "<|im_end|>".len();
            for i in start..end {
                nll -= logp[i - 1][e.tokens[i] as usize];
                count += 1;
            }
            from = end;
        }
    }
    assert_eq!(count, data.policy_tokens());
    let reference = nll / count as f64;

    let mut t = SftTrainer::new(Arc::new(policy), options(1, 4)).expect("trainer");
    let s = t.train_step(&data.examples).expect("step");
    assert_eq!(s.tokens, count);
    assert!(
        (s.loss - reference).abs() < 1e-5 * reference,
        "loss {} vs reference {reference}",
        s.loss
    );
}

/// Tokens after the last policy token are masked: appending them changes neither loss nor
/// gradient; the same tokens unmasked do.
#[test]
fn masked_tokens_get_no_gradient() {
    let tmp = tempfile::tempdir().expect("tmp");
    let base = tiny_model_dir(tmp.path());
    let e = Example {
        tokens: b"<|im_start|>user\nfix<|im_end|>\n<|im_start|>assistant\n<submit/><|im_end|>"
            .iter()
            .map(|&b| u32::from(b))
            .collect(),
        mask: Vec::new(),
        source: "test".into(),
    };
    let n_prefix = "<|im_start|>user\nfix<|im_end|>\n<|im_start|>assistant\n".len();
    let mask: Vec<bool> = (0..e.tokens.len()).map(|i| i >= n_prefix).collect();
    let e = Example { mask, ..e };
    let tail: Vec<u32> = b"\n<|im_start|>user\nmore text"
        .iter()
        .map(|&b| u32::from(b))
        .collect();
    let with_tail = |trained: bool| {
        let mut x = e.clone();
        x.tokens.extend(&tail);
        x.mask.extend(std::iter::repeat_n(trained, tail.len()));
        x
    };
    let first_step = |ex: Example| {
        let mut t = SftTrainer::new(Arc::new(load(&base)), options(1, 1)).expect("trainer");
        t.train_step(&[ex]).expect("step")
    };
    let plain = first_step(e.clone());
    let masked_tail = first_step(with_tail(false));
    let trained_tail = first_step(with_tail(true));
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * a.abs().max(b.abs());
    assert!(
        close(plain.loss, masked_tail.loss),
        "{plain:?} {masked_tail:?}"
    );
    assert!(
        close(plain.grad_norm, masked_tail.grad_norm),
        "{plain:?} {masked_tail:?}"
    );
    assert!(
        !close(plain.grad_norm, trained_tail.grad_norm),
        "{plain:?} {trained_tail:?}"
    );
}

#[test]
fn fine_tuning_lowers_the_nll_and_the_saved_model_reproduces_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let base = tiny_model_dir(tmp.path());
    let data_path = tmp.path().join("chat.jsonl");
    write_lines(&data_path, &chat_lines());
    let data = load_dataset(&data_path, &ByteCodec, &ChatMarkup::chatml(), &opts()).expect("load");
    let policy = Arc::new(load(&base));
    let before = mean_nll(&policy, &data.examples).expect("nll");
    let steps = 40;
    let mut t = SftTrainer::new(policy, options(steps, 4)).expect("trainer");
    let mut curve = Vec::new();
    while t.step() < steps {
        curve.push(t.train_step(&data.examples).expect("step").loss);
    }
    let after = mean_nll(t.policy(), &data.examples).expect("nll");
    eprintln!("NLL before {before:.4}, after {after:.4}; per-step loss {curve:.3?}");
    assert!(after < 0.5 * before, "before {before}, after {after}");

    let out = t
        .save_checkpoint(&tmp.path().join("model"), data.examples.len())
        .expect("save");
    let reloaded = load(&out);
    let seqs: Vec<Vec<u32>> = data.examples.iter().map(|e| e.tokens.clone()).collect();
    let trained = t.policy().score(&seqs).expect("score");
    let again = reloaded.score(&seqs).expect("score");
    assert_eq!(trained, again);
    let fresh = load(&base).score(&seqs).expect("score");
    assert_ne!(trained, fresh);
}

#[test]
fn a_resumed_run_ends_with_the_same_weights() {
    let tmp = tempfile::tempdir().expect("tmp");
    let base = tiny_model_dir(tmp.path());
    let data_path = tmp.path().join("chat.jsonl");
    write_lines(&data_path, &chat_lines());
    let data = load_dataset(&data_path, &ByteCodec, &ChatMarkup::chatml(), &opts()).expect("load");
    let n = data.examples.len();
    // Batches of 3 over 4 examples cross epoch boundaries.
    let o = options(6, 3);
    let mut straight = SftTrainer::new(Arc::new(load(&base)), o.clone()).expect("trainer");
    let mut first = SftTrainer::new(Arc::new(load(&base)), o.clone()).expect("trainer");
    for _ in 0..3 {
        straight.train_step(&data.examples).expect("step");
        first.train_step(&data.examples).expect("step");
    }
    let ckpt = first
        .save_checkpoint(&tmp.path().join("ckpt"), n)
        .expect("save");
    drop(first);
    let mut resumed =
        SftTrainer::resume(&ckpt, o.clone(), n, DType::F32, &Device::Cpu).expect("resume");
    assert_eq!(resumed.step(), 3);
    for _ in 0..3 {
        let a = straight.train_step(&data.examples).expect("step");
        let b = resumed.train_step(&data.examples).expect("step");
        assert_eq!(a, b);
    }
    let seqs: Vec<Vec<u32>> = data.examples.iter().map(|e| e.tokens.clone()).collect();
    assert_eq!(
        straight.policy().score(&seqs).expect("score"),
        resumed.policy().score(&seqs).expect("score")
    );
    // Other data or another batch size would not continue the same batches.
    let err = SftTrainer::resume(&ckpt, o, n + 1, DType::F32, &Device::Cpu)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("would not continue"), "{err}");
}

fn trajectory(prompt: &str, turns: &[(&str, &str)]) -> Trajectory {
    let enc = |s: &str| ByteCodec.encode(s);
    Trajectory {
        role: Role::Solver,
        prompt_tokens: enc(prompt),
        turns: turns
            .iter()
            .map(|(policy, obs)| Turn {
                policy_tokens: enc(policy),
                policy_logprobs: vec![-1.0; policy.len()],
                finish: None,
                policy_version: 0,
                tool: Some("bash".into()),
                format_error: None,
                tool_failed: false,
                observation_tokens: enc(obs),
            })
            .collect(),
        end_reason: EndReason::Submitted,
        infra_error: None,
    }
}

fn record(traj: &Trajectory, role: Role, solved: bool, with_tokens: bool) -> String {
    let r = EpisodeRecord {
        role,
        pool: "sample".into(),
        index: 0,
        end_reason: traj.end_reason,
        turns: traj.turns.len(),
        policy_tokens: traj.policy_tokens(),
        reward: Some(if solved { 1.0 } else { -1.0 }),
        infra_errors: Vec::new(),
        injector: None,
        solver: (role == Role::Solver).then(|| SolverDetail {
            order: 1,
            solved,
            patch: String::new(),
            dropped: Vec::new(),
            agent_failure: None,
            failing: Vec::new(),
        }),
        transcript: Vec::new(),
        tokens: with_tokens.then(|| traj.token_transcript()),
    };
    serde_json::to_string(&r).expect("json")
}

#[test]
fn a_runs_solved_episodes_replay_token_for_token() {
    let tmp = tempfile::tempdir().expect("tmp");
    let run = tmp.path().join("run");
    let solved = trajectory(
        "task A\n",
        &[("<bash>ls</bash>", "\nout\n"), ("<submit/>", "")],
    );
    let unsolved = trajectory(
        "task B\n",
        &[("<bash>pwd</bash>", "\n/\n"), ("<submit/>", "")],
    );
    let step1 = run.join("episodes/step-000001");
    let step2 = run.join("episodes/step-000002");
    std::fs::create_dir_all(&step1).expect("mkdir");
    std::fs::create_dir_all(&step2).expect("mkdir");
    write_lines(
        &step1.join("episodes.jsonl"),
        &[
            record(&solved, Role::Solver, true, true),
            record(&unsolved, Role::Solver, false, true),
        ],
    );
    write_lines(
        &step2.join("episodes.jsonl"),
        &[record(&unsolved, Role::Injector, false, true)],
    );
    let data = load_dataset(&run, &ByteCodec, &ChatMarkup::chatml(), &opts()).expect("load");
    assert_eq!(data.files.len(), 2);
    assert_eq!(data.episode_records, 3);
    assert_eq!(data.skipped_episodes, 2);
    assert_eq!(data.examples.len(), 1);
    let seq = solved.sequence();
    assert_eq!(data.examples[0].tokens, seq.tokens);
    assert_eq!(data.examples[0].mask, seq.policy_mask);

    let all = load_dataset(
        &run,
        &ByteCodec,
        &ChatMarkup::chatml(),
        &LoadOptions {
            solved_only: false,
            ..opts()
        },
    )
    .expect("load");
    assert_eq!(all.examples.len(), 3);

    // A solved episode recorded without its tokens cannot be replayed: the line is named.
    let old = tmp.path().join("old.jsonl");
    write_lines(
        &old,
        &[
            record(&unsolved, Role::Solver, false, false),
            record(&solved, Role::Solver, true, false),
        ],
    );
    let err = load_dataset(&old, &ByteCodec, &ChatMarkup::chatml(), &opts()).unwrap_err();
    assert!(err.to_string().contains("old.jsonl:2:"), "{err}");
    assert!(err.to_string().contains("without `tokens`"), "{err}");
}

#[test]
fn bad_input_is_an_error_naming_the_line() {
    let tmp = tempfile::tempdir().expect("tmp");
    let good = chat_lines()[0].clone();
    let long = serde_json::json!({"messages": [
        {"role": "user", "content": "x".repeat(300)},
        {"role": "assistant", "content": "y"},
    ]})
    .to_string();
    let cases = [
        (
            "malformed",
            vec![good.clone(), "{\"messages\": [".into()],
            ":2: not valid JSON",
        ),
        (
            "role",
            vec![serde_json::json!({"messages": [{"role": "robot", "content": "hi"}]}).to_string()],
            ":1: message 0: unknown role `robot`",
        ),
        (
            "empty",
            vec![
                good.clone(),
                good.clone(),
                serde_json::json!({"messages": [
                    {"role": "user", "content": "fix"},
                    {"role": "assistant", "content": "  "},
                ]})
                .to_string(),
            ],
            ":3: message 1: empty assistant message",
        ),
        ("long", vec![good.clone(), long], ":2: 3"),
        (
            "neither",
            vec![serde_json::json!({"prompt": "x"}).to_string()],
            ":1: neither a chat record",
        ),
        (
            "no-assistant",
            vec![serde_json::json!({"messages": [{"role": "user", "content": "x"}]}).to_string()],
            ":1: no assistant message",
        ),
        (
            "tool-calls",
            vec![
                serde_json::json!({"messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]},
                ]})
                .to_string(),
            ],
            ":1: message 1: assistant `tool_calls` are not supported",
        ),
    ];
    for (name, lines, want) in cases {
        let path = tmp.path().join(format!("{name}.jsonl"));
        write_lines(&path, &lines);
        let err = load_dataset(
            &path,
            &ByteCodec,
            &ChatMarkup::chatml(),
            &LoadOptions {
                context: 300,
                max_tokens: 300,
                ..opts()
            },
        )
        .unwrap_err();
        assert!(matches!(err, SftError::Line { .. }), "{name}: {err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("{name}.jsonl{want}")),
            "{name}: `{msg}` lacks `{want}`"
        );
        if name == "long" {
            assert!(
                msg.contains("longer than the model's context of 300"),
                "{msg}"
            );
        }
    }
}

/// The command end to end: a model directory in, a model directory out that loads, a loss
/// curve written.
#[test]
fn the_sft_command_writes_a_model_the_trainer_loads() {
    let tmp = tempfile::tempdir().expect("tmp");
    let base = tiny_model_dir(tmp.path());
    let data_path = tmp.path().join("chat.jsonl");
    write_lines(&data_path, &chat_lines());
    let out = tmp.path().join("sft");
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(["sft", "--model"])
            .arg(&base)
            .arg("--data")
            .arg(&data_path)
            .arg("--out")
            .arg(&out)
            .args([
                "--steps",
                "6",
                "--lr",
                "1e-2",
                "--batch-size",
                "2",
                "--checkpoint-every",
                "2",
                "--keep-last",
                "1",
            ])
            .args(extra)
            .output()
            .expect("run trainer")
    };
    let o = run(&[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("step 6/6"), "{stderr}");
    let metrics = std::fs::read_to_string(out.join("sft_metrics.jsonl")).expect("metrics");
    assert_eq!(metrics.lines().count(), 6);
    // Checkpoints at updates 2 and 4 (the last one writes model/), the newest kept.
    assert!(out.join("checkpoints/step-4/model.safetensors").is_file());
    assert!(!out.join("checkpoints/step-2").exists());
    let model = out.join("model");
    for f in ["config.json", "model.safetensors", "trainer_state.json"] {
        assert!(model.join(f).is_file(), "{f}");
    }
    let p = load(&model);
    assert_eq!(p.model().config().vocab_size, ByteCodec::VOCAB_SIZE);
    // It learnt its turns in ChatML, so self-play and `trainer eval` play it in ChatML (the
    // seeded tiny model it started from is played without markup).
    assert!(p.chat_markup());
    assert!(
        !CandlePolicy::tiny(SEED, 16, 1, DType::F32, &Device::Cpu)
            .expect("tiny")
            .chat_markup()
    );
    // The finished directory is never overwritten.
    let again = run(&[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("choose another --out"));
}
