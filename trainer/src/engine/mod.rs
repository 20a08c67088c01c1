//! The self-play engine: agent protocol, episodes, consistency validation, evaluation, rewards.

pub mod policy;
