//! `trainer bench rollout`: aggregate sampling throughput of N concurrent multi-turn
//! episodes on a Qwen2-shaped random model, with and without sessions.
//!
//! Each episode is a thread that opens a session and plays fixed-length turns: a prompt,
//! then `--turns` generations of `--turn-tokens` tokens, with `--observation-tokens` of
//! simulated tool output appended between them. With `--no-session` (or in the table's
//! "replay" rows) every turn instead sends the whole conversation to `generate`, which
//! prefills it again: the behaviour before sessions. Both are measured in one run, in
//! alternating order over `--rounds` rounds, and the medians reported.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};

use super::bench::ModelShape;
use crate::engine::policy::{Policy, SamplingParams};
use crate::policy::{ByteCodec, CandlePolicy, Qwen2Config, Qwen2Model, Rng};

/// Arguments of `trainer bench rollout`.
#[derive(clap::Args, Debug)]
pub struct RolloutArgs {
    /// Concurrent episodes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_value = "1,8")]
    pub episodes: Vec<usize>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// `cpu` or `cuda` (the first GPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Measure only the replay of the whole conversation every turn (no sessions).
    #[arg(long)]
    pub no_session: bool,
    /// Rounds per configuration; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(long, default_value_t = 4)]
    pub turns: usize,
    #[arg(long, default_value_t = 256)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 32)]
    pub turn_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub observation_tokens: usize,
    /// Episode `e`'s turns sample `(e mod 4) × stagger` tokens more than `--turn-tokens`, so
    /// that the episodes' turns end, and their tool outputs are prefilled, at different steps
    /// (as real episodes' do) instead of all at once.
    #[arg(long, default_value_t = 0)]
    pub stagger: usize,
    /// Model shape: hidden size (heads of 64), layers and vocabulary.
    #[arg(long, default_value_t = 512)]
    pub hidden: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 32000)]
    pub vocab: usize,
    /// A named model shape instead of `--hidden`, `--layers` and `--vocab`.
    #[arg(long, value_enum)]
    pub shape: Option<ModelShape>,
    /// Every episode starts from the same prompt, as the members of a GRPO group do (a
    /// step's solvers of one bug, its injectors on one repository): the batch then prefills
    /// the prompt once and the other episodes copy its keys and values.
    #[arg(long)]
    pub shared_prompt: bool,
    /// The first N prompt tokens are the same in every episode and the rest its own, as
    /// prompts rendered from one role's template are (its instructions and tool list, then
    /// the episode's task): the batch copies the common part as it does a shared prompt.
    #[arg(long, default_value_t = 0, conflicts_with = "shared_prompt")]
    pub common_prefix: usize,
    /// Precision of the sampling forwards' products on the CPU: `f32`, or `bf16` (inputs
    /// rounded to bf16, sums in f32) on AMX tiles or AVX-512, which the CPU must have.
    #[arg(long, value_enum, default_value = "f32")]
    pub sampling_precision: SamplingPrecision,
    /// Nucleus of the sampling (1, a run's default, samples the full distribution).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
}

/// `--sampling-precision`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplingPrecision {
    F32,
    Bf16,
}

/// One measured configuration.
#[derive(Clone, Copy, Debug)]
struct Measure {
    tokens_per_s: f64,
    /// Tokens per second of the process's CPU time: what batching saves on a machine whose
    /// cores other work also uses, where wall time mostly measures the share it got.
    tokens_per_cpu_s: f64,
    prefill_per_episode: f64,
    /// Context tokens per episode copied from another episode's cache instead of computed.
    shared_per_episode: f64,
    /// Milliseconds per forward that only decoded (with its LM head), and per prefilled token
    /// (the forwards that prefilled, with any decoding rows riding along, by their context).
    decode_ms_per_step: f64,
    prefill_ms_per_token: f64,
    /// Wall seconds of the run, tokens sampled, and context tokens prefilled (all episodes).
    seconds: f64,
    sampled: f64,
    prefilled: f64,
}

/// The speedup over `base` that `run` could reach at most if its decoding cost what `base`'s
/// does however many rows each step carries, so that only its prefill adds: `run`'s prefilled
/// tokens at the faster of the two runs' rates per prefilled token, plus everything `base`
/// spent outside its prefill (decoding, sampling, the rest). Batching shares a decoding
/// step's weight stream between rows, not a prefill's arithmetic, which each episode pays in
/// full (less what it copies from a shared prompt); so the bench reports this next to the
/// measured speedup, to show how much of the gap batching can still close. Optimistic on
/// purpose: copies are taken as free and a mixed forward's riding decoding rows are charged
/// to the prefill rate.
fn speedup_ceiling(base: &Measure, run: &Measure) -> f64 {
    let base_rate = base.prefill_ms_per_token / 1000.0;
    let rate = base_rate.min(run.prefill_ms_per_token / 1000.0);
    let base_rest = (base.seconds - base.prefilled * base_rate).max(0.0);
    let floor = run.prefilled * rate + base_rest;
    (run.sampled / floor) / (base.sampled / base.seconds)
}

pub fn run(args: RolloutArgs) -> anyhow::Result<ExitCode> {
    if args.episodes.is_empty() || args.episodes.contains(&0) {
        anyhow::bail!("--episodes needs positive counts");
    }
    if args.rounds == 0 || args.turns == 0 || args.turn_tokens == 0 || args.prompt_tokens == 0 {
        anyhow::bail!("--rounds, --turns, --turn-tokens and --prompt-tokens must be positive");
    }
    if args.common_prefix > args.prompt_tokens {
        anyhow::bail!(
            "--common-prefix {} is longer than --prompt-tokens {}",
            args.common_prefix,
            args.prompt_tokens
        );
    }
    if args.hidden < 64 || !args.hidden.is_multiple_of(64) || args.vocab < 2 {
        anyhow::bail!("--hidden must be a multiple of 64 and --vocab at least 2");
    }
    let device = super::bench::device(&args.device)?;
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let policy = Arc::new(bench_policy(&args, dtype, &device)?);
    if args.sampling_precision == SamplingPrecision::Bf16 {
        if !device.is_cpu() {
            anyhow::bail!(
                "--sampling-precision bf16 is for the CPU (CUDA samples in bf16 already)"
            );
        }
        if !policy.set_sampling_bf16(true) {
            anyhow::bail!(
                "--sampling-precision bf16 needs a CPU with AMX (and a kernel that grants its tiles) or AVX-512"
            );
        }
    }
    let modes: &[bool] = if args.no_session {
        &[false]
    } else {
        &[true, false]
    };
    let mut results: Vec<(usize, bool, Vec<Measure>)> = args
        .episodes
        .iter()
        .flat_map(|&n| modes.iter().map(move |&s| (n, s, Vec::new())))
        .collect();
    // Warm-up (allocations, caches), not measured.
    play(&policy, &args, 1, true)?;
    for round in 0..args.rounds {
        // Alternate the order so slow phases of a noisy machine spread over both sides.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..results.len()).collect()
        } else {
            (0..results.len()).rev().collect()
        };
        for i in order {
            let (n, session, ref mut runs) = results[i];
            runs.push(play(&policy, &args, n, session)?);
        }
    }
    let mut out = std::io::stdout().lock();
    let base: Vec<(bool, f64, f64, &[Measure])> = results
        .iter()
        .filter(|r| r.0 == args.episodes[0])
        .map(|r| {
            (
                r.1,
                median(r.2.iter().map(|m| m.tokens_per_s)),
                median(r.2.iter().map(|m| m.tokens_per_cpu_s)),
                r.2.as_slice(),
            )
        })
        .collect();
    if !args.json {
        let cfg = policy.model().config();
        writeln!(
            out,
            "rollout bench: {} layers, hidden {}, vocab {}, {} on {:?}, sampling products {}; {} turns of {} tokens (+{} by episode), {}, tool output {}; medians of {} rounds",
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.vocab_size,
            dtype.as_str(),
            device.location(),
            match (
                policy.sampling_bf16(),
                CandlePolicy::bf16_products_backend()
            ) {
                (true, Some(backend)) => format!("bf16 ({backend})"),
                _ => "f32".to_string(),
            },
            args.turns,
            args.turn_tokens,
            args.stagger,
            if args.shared_prompt {
                format!("shared prompt {}", args.prompt_tokens)
            } else if args.common_prefix > 0 {
                format!(
                    "prompt {} common + {} own",
                    args.common_prefix,
                    args.prompt_tokens - args.common_prefix
                )
            } else {
                format!("own prompt {}", args.prompt_tokens)
            },
            args.observation_tokens,
            args.rounds
        )?;
        writeln!(
            out,
            "{:>8} {:>8} {:>12} {:>10} {:>10} {:>14} {:>10} {:>16} {:>15} {:>10} {:>15}",
            "episodes",
            "mode",
            "tokens/s",
            "speedup",
            "ceiling",
            "tokens/cpu-s",
            "speedup",
            "prefill/episode",
            "copied/episode",
            "ms/decode",
            "ms/prefill-tok"
        )?;
    }
    for (n, session, runs) in &results {
        let tps = median(runs.iter().map(|m| m.tokens_per_s));
        let cpu_tps = median(runs.iter().map(|m| m.tokens_per_cpu_s));
        let prefill = median(runs.iter().map(|m| m.prefill_per_episode));
        let copied = median(runs.iter().map(|m| m.shared_per_episode));
        let decode_ms = median(runs.iter().map(|m| m.decode_ms_per_step));
        let prefill_ms = median(runs.iter().map(|m| m.prefill_ms_per_token));
        let (speedup, cpu_speedup, ceiling) =
            base.iter()
                .find(|b| b.0 == *session)
                .map_or((f64::NAN, f64::NAN, f64::NAN), |b| {
                    // Round by round: each round's run against the same round's base.
                    let ceiling = median(b.3.iter().zip(runs).map(|(b, r)| speedup_ceiling(b, r)));
                    (tps / b.1, cpu_tps / b.2, ceiling)
                });
        if args.json {
            serde_json::to_writer(
                &mut out,
                &serde_json::json!({
                    "episodes": n,
                    "tokens_per_s": tps,
                    "prefill_tokens": prefill,
                    "shared_prefix_tokens": copied,
                    "tokens_per_cpu_s": cpu_tps,
                    "speedup": speedup,
                    "speedup_ceiling": ceiling,
                    "decode_ms_per_step": decode_ms,
                    "prefill_ms_per_token": prefill_ms,
                    "session": session,
                }),
            )?;
            writeln!(out)?;
        } else {
            writeln!(
                out,
                "{:>8} {:>8} {:>12.1} {:>9.2}x {:>9.2}x {:>14.1} {:>9.2}x {:>16.0} {:>15.0} {:>10.2} {:>15.3}",
                n,
                if *session { "session" } else { "replay" },
                tps,
                speedup,
                ceiling,
                cpu_tps,
                cpu_speedup,
                prefill,
                copied,
                decode_ms,
                prefill_ms
            )?;
        }
    }
    if !args.json && args.episodes.len() > 1 {
        writeln!(
            out,
            "ceiling: the speedup if decoding cost what it does for {} episode(s) however many rows a step carries, so that only the prefill adds (copies from a shared prompt free)",
            args.episodes[0]
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A Qwen2-shaped random model (`--shape`, else heads of 64 dims, 2 query heads per key/value
/// head), with no end-of-sequence token so every turn has its full length.
fn bench_policy(args: &RolloutArgs, dtype: DType, device: &Device) -> anyhow::Result<CandlePolicy> {
    if let Some(shape) = args.shape {
        let model = Qwen2Model::random(shape.config(32768)?, 1, dtype, device)?;
        return Ok(CandlePolicy::new(model, Arc::new(ByteCodec), Vec::new(), 7));
    }
    let heads = args.hidden / 64;
    let kv = if heads.is_multiple_of(2) {
        heads / 2
    } else {
        heads
    };
    let raw = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 11 / 4,
        "num_hidden_layers": args.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
    });
    let cfg = Qwen2Config::from_json(raw)?;
    let model = Qwen2Model::random(cfg, 1, dtype, device)?;
    Ok(CandlePolicy::new(model, Arc::new(ByteCodec), Vec::new(), 7))
}

/// Plays `n` concurrent episodes; returns the aggregate sampling rate and the context tokens
/// run through the model per episode.
fn play(
    policy: &Arc<CandlePolicy>,
    args: &RolloutArgs,
    n: usize,
    session: bool,
) -> anyhow::Result<Measure> {
    let params = SamplingParams {
        temperature: 1.0,
        top_p: args.top_p,
        max_new_tokens: args.turn_tokens,
        stop: Vec::new(),
    };
    let vocab = policy.model().config().vocab_size as u64;
    let before = policy.rollout_stats();
    let cpu_before = process_cpu_seconds();
    let started = Instant::now();
    let sampled: Vec<anyhow::Result<usize>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|e| {
                let mut params = params.clone();
                params.max_new_tokens += (e % 4) * args.stagger;
                s.spawn(move || -> anyhow::Result<usize> {
                    let mut rng = Rng::seed(1000 + e as u64);
                    let mut tokens = |k: usize| -> Vec<u32> {
                        (0..k).map(|_| (rng.next_u64() % vocab) as u32).collect()
                    };
                    let common = if args.shared_prompt {
                        args.prompt_tokens
                    } else {
                        args.common_prefix
                    };
                    let mut group = Rng::seed(999);
                    let mut context: Vec<u32> = (0..common)
                        .map(|_| (group.next_u64() % vocab) as u32)
                        .collect();
                    context.extend(tokens(args.prompt_tokens - common));
                    let mut conv = session
                        .then(|| Policy::open_session(policy.clone()))
                        .flatten();
                    let mut sampled = 0;
                    for turn in 0..args.turns {
                        let g = match conv.as_mut() {
                            Some(c) => c.continue_turn(&context, &params)?,
                            None => policy
                                .generate(std::slice::from_ref(&context), &params)?
                                .pop()
                                .context("no generation")?,
                        };
                        sampled += g.tokens.len();
                        context.extend(&g.tokens);
                        if turn + 1 < args.turns {
                            context.extend(tokens(args.observation_tokens));
                        }
                    }
                    Ok(sampled)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("an episode panicked")))
            })
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds() - cpu_before;
    let mut total = 0;
    for r in sampled {
        total += r?;
    }
    let after = policy.rollout_stats();
    Ok(Measure {
        tokens_per_s: total as f64 / seconds,
        tokens_per_cpu_s: total as f64 / cpu,
        prefill_per_episode: (after.prefill_tokens - before.prefill_tokens) as f64 / n as f64,
        shared_per_episode: (after.shared_prefix_tokens - before.shared_prefix_tokens) as f64
            / n as f64,
        decode_ms_per_step: (after.decode_micros - before.decode_micros) as f64
            / 1000.0
            / ((after.decode_steps - after.mixed_steps)
                - (before.decode_steps - before.mixed_steps))
                .max(1) as f64,
        prefill_ms_per_token: (after.prefill_micros - before.prefill_micros) as f64
            / 1000.0
            / (after.prefill_tokens - before.prefill_tokens).max(1) as f64,
        seconds,
        sampled: total as f64,
        prefilled: (after.prefill_tokens - before.prefill_tokens) as f64,
    })
}

/// User and system CPU time of this process (Linux `/proc/self/stat`, in USER_HZ = 100 ticks
/// a second); NaN elsewhere.
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name, which may hold spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    match (tick(11), tick(12)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run of `episodes` episodes of 128 sampled tokens that prefilled `prefilled` tokens at
    /// `ms_per_token` and took `seconds`.
    fn measure(episodes: f64, prefilled: f64, ms_per_token: f64, seconds: f64) -> Measure {
        Measure {
            tokens_per_s: 128.0 * episodes / seconds,
            tokens_per_cpu_s: f64::NAN,
            prefill_per_episode: prefilled / episodes,
            shared_per_episode: 0.0,
            decode_ms_per_step: f64::NAN,
            prefill_ms_per_token: ms_per_token,
            seconds,
            sampled: 128.0 * episodes,
            prefilled,
        }
    }

    #[test]
    fn the_ceiling_adds_only_the_prefill_to_one_episodes_decoding() {
        // One episode: 450 tokens prefilled at 0.1 ms (45 ms) and 205 ms of the rest.
        let one = measure(1.0, 450.0, 0.1, 0.25);
        assert!((speedup_ceiling(&one, &one) - 1.0).abs() < 1e-12);
        // Eight with their own prompts prefill eight times as much: 360 + 205 ms for 1024
        // tokens, against 128 in 250 ms.
        let own = measure(8.0, 3600.0, 0.1, 0.9);
        let want = (1024.0 / 0.565) / (128.0 / 0.25);
        assert!((speedup_ceiling(&one, &own) - want).abs() < 1e-9);
        assert!(want < 4.0, "{want}");
        // Sharing a prompt halves their prefill, and the ceiling rises above 4.
        let shared = measure(8.0, 1800.0, 0.1, 0.6);
        let want = (1024.0 / 0.385) / (128.0 / 0.25);
        assert!((speedup_ceiling(&one, &shared) - want).abs() < 1e-9);
        assert!(want > 4.0, "{want}");
        // Whichever run prefilled faster sets the rate (the bound stays optimistic), and the
        // measured time of the run itself plays no part.
        let faster = measure(8.0, 3600.0, 0.08, 5.0);
        let want = (1024.0 / (0.288 + 0.205)) / (128.0 / 0.25);
        assert!((speedup_ceiling(&one, &faster) - want).abs() < 1e-9);
        let slower = measure(8.0, 3600.0, 0.2, 0.1);
        let want = (1024.0 / 0.565) / (128.0 / 0.25);
        assert!((speedup_ceiling(&one, &slower) - want).abs() < 1e-9);
    }
}
