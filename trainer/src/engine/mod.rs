//! The self-play engine: agent protocol, episodes, consistency validation, evaluation, rewards.
//!
//! * [`protocol`] — the tool-call format (bash / edit / create / submit), parsed strictly.
//! * [`prompts`] — the prompt templates of `trainer/prompts/` and the chat markup.
//! * [`episode`] — the episode driver over a [`policy::Policy`] and a sandbox.
//! * [`trajectory`] — per-turn tokens, log-probs and observation tokens; end reasons.
//! * [`validation`] — the seven consistency checks of injector artifacts.
//! * [`solver`] — the solver's task, evaluation of its patch, higher-order bugs.
//! * [`roles`] — both roles end to end (setup, episode, validation / grading).
//! * [`rewards`] — solver ±1; injector −1 / −α / 1−(1+α)s.
//! * [`sandbox`] — the [`sandbox::SandboxProvider`] trait; [`local`] — the local provider.

pub mod artifacts;
pub mod diffs;
pub mod docker;
pub mod episode;
pub mod error;
pub mod local;
pub mod machine;
pub mod ops;
pub mod policy;
mod procs;
pub mod prompts;
pub mod protocol;
pub mod rewards;
pub mod roles;
pub mod sample;
pub mod sandbox;
pub mod solver;
pub mod surface;
pub mod toolchain;
pub mod trajectory;
pub mod validation;

pub use error::{InfraError, InfraKind, OpError};
pub use procs::processes_inside;
