//! The episode driver: a role's task, the policy, and a sandbox, turn by turn.
//!
//! An [`Episode`] is a state machine over token ids. [`run_episodes`] advances many of them
//! together; [`run_episode`] runs one. With a policy that keeps sessions (the candle model),
//! every episode is a session that runs its turns on its own and the policy batches the
//! turns of all episodes in flight, appending each tool output to the episode's cache. With
//! any other policy, episodes advance in rounds: one batched `generate` call per round, the
//! tool calls of a round running concurrently.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use sandbox_sidecar::SidecarClient;
use sandbox_sidecar::client::CommandResult;
use selfplay_crds::run::{FormatErrorPolicy, SelfPlaySettings};

use super::error::{InfraError, InfraKind, OpError};
use super::ops::Ops;
use super::policy::{FinishReason, Generation, Policy, PolicySession, SamplingParams, TokenCodec};
use super::prompts::{ChatMarkup, PromptSet};
use super::protocol::{STOP_STRINGS, ToolCall, budget_notice, parse_tool_call};
use super::trajectory::{EndReason, Role, Trajectory, Turn};

/// The agent's bash session in every sandbox.
pub const AGENT_SESSION: &str = "agent";

/// Budgets and behaviour of episodes.
#[derive(Clone, Debug, PartialEq)]
pub struct EpisodeConfig {
    pub max_turns: usize,
    /// Tokens of the whole episode: prompt, policy turns and observations.
    pub max_tokens: usize,
    pub max_tokens_per_turn: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub format_error_policy: FormatErrorPolicy,
    /// Timeout of one bash command.
    pub command_timeout: Duration,
    /// A tool result longer than this (in bytes) keeps its head and tail.
    pub max_observation_bytes: usize,
}

impl Default for EpisodeConfig {
    fn default() -> Self {
        Self::from_settings(&SelfPlaySettings::default())
    }
}

impl EpisodeConfig {
    pub fn from_settings(s: &SelfPlaySettings) -> Self {
        let n = |v: i32| usize::try_from(v).unwrap_or(0);
        Self {
            max_turns: n(s.max_turns),
            max_tokens: n(s.max_tokens),
            max_tokens_per_turn: n(s.max_tokens_per_turn),
            temperature: s.temperature as f32,
            top_p: s.top_p as f32,
            format_error_policy: s.format_error_policy,
            command_timeout: Duration::from_secs(120),
            max_observation_bytes: 16 * 1024,
        }
    }
}

/// One episode in progress.
pub struct Episode {
    role: Role,
    cfg: EpisodeConfig,
    prompts: Arc<PromptSet>,
    markup: ChatMarkup,
    prompt_tokens: Vec<u32>,
    context: Vec<u32>,
    turns: Vec<Turn>,
    end: Option<EndReason>,
    infra_error: Option<InfraError>,
    session_open: bool,
}

impl Episode {
    /// An episode whose first context is `task` as a user message.
    pub fn new(
        role: Role,
        task: &str,
        codec: &dyn TokenCodec,
        cfg: EpisodeConfig,
        prompts: Arc<PromptSet>,
        markup: ChatMarkup,
    ) -> Self {
        let prompt_tokens = codec.encode(&markup.first_prompt(task));
        let end = (prompt_tokens.len() >= cfg.max_tokens).then_some(EndReason::OutOfTokens);
        Self {
            role,
            cfg,
            prompts,
            markup,
            context: prompt_tokens.clone(),
            prompt_tokens,
            turns: Vec::new(),
            end,
            infra_error: None,
            session_open: false,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn is_done(&self) -> bool {
        self.end.is_some()
    }

    pub fn end_reason(&self) -> Option<EndReason> {
        self.end
    }

    /// Everything so far: the policy continues this.
    pub fn context(&self) -> &[u32] {
        &self.context
    }

    pub fn turns(&self) -> &[Turn] {
        &self.turns
    }

    /// The sampling settings of the next turn.
    pub fn sampling(&self) -> SamplingParams {
        let left = self.cfg.max_tokens.saturating_sub(self.context.len());
        SamplingParams {
            temperature: self.cfg.temperature,
            top_p: self.cfg.top_p,
            max_new_tokens: self.cfg.max_tokens_per_turn.min(left).max(1),
            stop: STOP_STRINGS.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Ends the episode on an infrastructure failure (masked in training).
    pub fn fail_infra(&mut self, e: &InfraError) {
        if self.end.is_none() {
            self.end = Some(EndReason::InfraError);
            self.infra_error = Some(e.clone());
        }
    }

    /// Ends the episode on a sandbox failure during the agent's own tool call: it may be the
    /// agent's doing, so the episode earns the failing reward (never a mask).
    pub fn fail_agent(&mut self, e: &InfraError) {
        if self.end.is_none() {
            self.end = Some(EndReason::SandboxBroken);
            self.infra_error = Some(e.clone());
        }
    }

    pub fn into_trajectory(self) -> Trajectory {
        Trajectory {
            role: self.role,
            prompt_tokens: self.prompt_tokens,
            turns: self.turns,
            end_reason: self.end.unwrap_or(EndReason::InfraError),
            infra_error: self.infra_error,
        }
    }

    /// Takes one generation of the policy: parses its tool call, runs it in the sandbox, and
    /// appends the observation (or ends the episode).
    pub async fn step(
        &mut self,
        generation: Generation,
        policy_version: u64,
        codec: &dyn TokenCodec,
        ops: Ops<'_>,
    ) {
        if self.end.is_some() {
            return;
        }
        if generation.tokens.len() != generation.logprobs.len() || generation.tokens.is_empty() {
            self.fail_infra(&InfraError::new(
                InfraKind::Policy,
                format!(
                    "the policy returned {} tokens and {} log-probs",
                    generation.tokens.len(),
                    generation.logprobs.len()
                ),
            ));
            return;
        }
        let text = codec.decode(&generation.tokens);
        self.context.extend_from_slice(&generation.tokens);
        let mut turn = Turn {
            policy_tokens: generation.tokens,
            policy_logprobs: generation.logprobs,
            finish: Some(generation.finish),
            policy_version,
            tool: None,
            format_error: None,
            tool_failed: false,
            observation_tokens: Vec::new(),
        };
        let turns_used = self.turns.len() + 1;
        let body = match parse_tool_call(&text) {
            Err(e) => {
                let mut msg = e.0;
                if generation.finish == FinishReason::Length {
                    msg = format!(
                        "{msg} (your turn reached its limit of {} tokens)",
                        self.cfg.max_tokens_per_turn
                    );
                }
                turn.format_error = Some(msg.clone());
                if self.cfg.format_error_policy == FormatErrorPolicy::EndEpisode {
                    self.turns.push(turn);
                    self.end = Some(EndReason::FormatError);
                    return;
                }
                Body::FormatError(msg)
            }
            Ok(ToolCall::Submit) => {
                turn.tool = Some("submit".into());
                self.turns.push(turn);
                self.end = Some(EndReason::Submitted);
                return;
            }
            Ok(call) => {
                turn.tool = Some(call.name().to_string());
                match self.execute(&call, ops).await {
                    Ok((out, failed)) => {
                        turn.tool_failed = failed;
                        Body::Output(out)
                    }
                    Err(e) => {
                        self.turns.push(turn);
                        self.fail_agent(&e);
                        return;
                    }
                }
            }
        };
        if turns_used >= self.cfg.max_turns {
            self.turns.push(turn);
            self.end = Some(EndReason::OutOfTurns);
            return;
        }
        match self.observation(&body, self.cfg.max_turns - turns_used, codec) {
            Some(ids) => {
                self.context.extend_from_slice(&ids);
                turn.observation_tokens = ids;
                self.turns.push(turn);
            }
            None => {
                self.turns.push(turn);
                self.end = Some(EndReason::OutOfTokens);
            }
        }
    }

    /// The observation's tokens with an exact budget notice; `None` when it does not fit.
    fn observation(
        &self,
        body: &Body,
        turns_left: usize,
        codec: &dyn TokenCodec,
    ) -> Option<Vec<u32>> {
        let base = self.context.len();
        let mut guess = self.cfg.max_tokens.saturating_sub(base);
        let mut ids = Vec::new();
        // The notice counts itself; a few rounds settle the digits.
        for _ in 0..4 {
            let notice = budget_notice(turns_left, guess);
            let text = match body {
                Body::Output(o) => self.prompts.observation(o, &notice),
                Body::FormatError(e) => self.prompts.format_error(e, &notice),
            };
            let text = match text {
                Ok(t) => t,
                Err(e) => format!("{e}\n{notice}"),
            };
            ids = codec.encode(&self.markup.observation(&text));
            let left = self
                .cfg
                .max_tokens
                .checked_sub(base + ids.len())
                .filter(|l| *l > 0)?;
            if left == guess {
                break;
            }
            guess = left;
        }
        Some(ids)
    }

    /// Runs a tool call. Ok((output, tool_failed)); Err only for infrastructure failures.
    async fn execute(
        &mut self,
        call: &ToolCall,
        ops: Ops<'_>,
    ) -> Result<(String, bool), InfraError> {
        let cap = self.cfg.max_observation_bytes;
        let refused = |e: OpError| match e {
            OpError::Refused(m) => Ok((cap_text(&format!("error: {m}"), cap), true)),
            OpError::Infra(i) => Err(i),
        };
        match call {
            ToolCall::Bash { command } => {
                if !self.session_open {
                    ops.session_open(AGENT_SESSION).await?;
                    self.session_open = true;
                }
                match ops
                    .session_run(AGENT_SESSION, command, self.cfg.command_timeout)
                    .await
                {
                    Ok(r) => Ok((
                        format_command(&r, self.cfg.command_timeout, cap),
                        r.timed_out,
                    )),
                    Err(e) => refused(e),
                }
            }
            ToolCall::Edit {
                path,
                search,
                replace,
            } => match ops.str_replace(path, search, replace).await {
                Ok(snippet) => Ok((cap_text(&format!("edited {path}:\n{snippet}"), cap), false)),
                Err(e) => refused(e),
            },
            ToolCall::Create { path, content } => match ops.create_file(path, content).await {
                Ok(_) => Ok((format!("wrote {path} ({} bytes)", content.len()), false)),
                Err(e) => refused(e),
            },
            ToolCall::Submit => Ok((String::new(), false)),
        }
    }
}

enum Body {
    Output(String),
    FormatError(String),
}

/// Keeps the head and tail of a long text, with a visible notice between them.
pub fn cap_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let half = max / 2;
    let mut head = half;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - half;
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{}\n[... {} bytes omitted ...]\n{}",
        &text[..head],
        tail - head,
        &text[tail..]
    )
}

fn format_command(r: &CommandResult, timeout: Duration, cap: usize) -> String {
    let mut out = String::from_utf8_lossy(&r.stdout).into_owned();
    let err = String::from_utf8_lossy(&r.stderr);
    if !err.is_empty() {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&err);
    }
    let mut out = cap_text(&out, cap);
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    if r.timed_out {
        out.push_str(&format!(
            "[the command timed out after {}s and was killed; the shell was restarted]",
            timeout.as_secs()
        ));
    } else if r.signal != 0 {
        out.push_str(&format!("[killed by signal {}]", r.signal));
    } else {
        out.push_str(&format!("[exit code {}]", r.exit_code));
    }
    if r.session_restarted && !r.timed_out {
        out.push_str(
            "\n[the shell was restarted before this command: cwd and variables are reset]",
        );
    }
    out
}

/// Advances every episode until all are done, each in its own sandbox (see the module doc).
pub async fn run_episodes(
    policy: Arc<dyn Policy>,
    episodes: &mut [Episode],
    sandboxes: &[&SidecarClient],
) {
    // An episode without a sandbox cannot run: it ends as an infrastructure error.
    for e in episodes.iter_mut().skip(sandboxes.len()) {
        e.fail_infra(&InfraError::new(
            InfraKind::Acquire,
            "no sandbox for this episode",
        ));
    }
    let sessions: Option<Vec<Box<dyn PolicySession>>> = episodes
        .iter()
        .take(sandboxes.len())
        .map(|_| policy.clone().open_session())
        .collect();
    match sessions {
        Some(sessions) => run_in_sessions(policy, episodes, sandboxes, sessions).await,
        None => run_in_rounds(policy, episodes, sandboxes).await,
    }
}

/// Every episode runs its own turns in its session; the policy batches them.
async fn run_in_sessions(
    policy: Arc<dyn Policy>,
    episodes: &mut [Episode],
    sandboxes: &[&SidecarClient],
    sessions: Vec<Box<dyn PolicySession>>,
) {
    let codec = policy.codec();
    let runs =
        episodes
            .iter_mut()
            .zip(sandboxes)
            .zip(sessions)
            .map(|((e, sandbox), mut session)| {
                let policy = policy.clone();
                async move {
                    while !e.is_done() {
                        let params = e.sampling();
                        let context = e.context().to_vec();
                        let version = policy.version();
                        // The session comes back with the turn; it is dropped (its cache freed)
                        // when the episode ends.
                        let turn = tokio::task::spawn_blocking(move || {
                            let g = session.continue_turn(&context, &params);
                            (session, g)
                        })
                        .await;
                        match turn {
                            Ok((s, Ok(g))) => {
                                session = s;
                                e.step(g, version, codec, Ops::new(sandbox)).await;
                            }
                            Ok((_, Err(err))) => {
                                e.fail_infra(&InfraError::new(InfraKind::Policy, err.to_string()));
                                break;
                            }
                            Err(err) => {
                                e.fail_infra(&InfraError::new(
                                    InfraKind::Policy,
                                    format!("the policy panicked: {err}"),
                                ));
                                break;
                            }
                        }
                    }
                }
            });
    join_all(runs).await;
}

/// Rounds of one batched `generate` call: the contexts of the live episodes that share
/// sampling settings.
async fn run_in_rounds(
    policy: Arc<dyn Policy>,
    episodes: &mut [Episode],
    sandboxes: &[&SidecarClient],
) {
    loop {
        let live: Vec<usize> = (0..episodes.len())
            .filter(|i| !episodes[*i].is_done())
            .collect();
        let Some(&first) = live.first() else { break };
        // One batch per round: the episodes with the same settings as the first live one.
        let params = episodes[first].sampling();
        let batch: Vec<usize> = live
            .into_iter()
            .filter(|i| episodes[*i].sampling() == params)
            .collect();
        let contexts: Vec<Vec<u32>> = batch
            .iter()
            .map(|i| episodes[*i].context().to_vec())
            .collect();
        let p = policy.clone();
        let version = policy.version();
        let gens = tokio::task::spawn_blocking(move || p.generate(&contexts, &params)).await;
        let gens = match gens {
            Ok(Ok(g)) if g.len() == batch.len() => g,
            other => {
                let msg = match other {
                    Ok(Ok(g)) => format!(
                        "the policy returned {} generations for {} contexts",
                        g.len(),
                        batch.len()
                    ),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => format!("the policy panicked: {e}"),
                };
                let err = InfraError::new(InfraKind::Policy, msg);
                for i in batch {
                    episodes[i].fail_infra(&err);
                }
                continue;
            }
        };
        let codec = policy.codec();
        let mut gens: Vec<Option<Generation>> = gens.into_iter().map(Some).collect();
        let steps = episodes
            .iter_mut()
            .enumerate()
            .filter_map(|(i, e)| batch.iter().position(|b| *b == i).map(|k| (i, k, e)))
            .map(|(i, k, e)| {
                let g = gens[k].take();
                let ops = Ops::new(sandboxes[i]);
                async move {
                    if let Some(g) = g {
                        e.step(g, version, codec, ops).await;
                    }
                }
            });
        join_all(steps).await;
    }
}

/// Runs one episode to its end.
pub async fn run_episode(
    policy: Arc<dyn Policy>,
    episode: Episode,
    sandbox: &SidecarClient,
) -> Trajectory {
    let mut eps = [episode];
    run_episodes(policy, &mut eps, &[sandbox]).await;
    let [e] = eps;
    e.into_trajectory()
}
