//! Pure builders: the Kubernetes objects the operator creates, from validated specs.
//! Everything here is a function of its arguments (no clock, no API), so `render` prints
//! exactly what the controllers would create and tests can validate it against the schemas.

pub mod network_policy;
pub mod sandbox;
pub mod secret;
pub mod security;
pub mod trainer;

pub use network_policy::sandbox_network_policy;
pub use sandbox::{environment_sandbox_pod, environment_template_hash, sandbox_pod};
pub use secret::{generate_token, pool_token_secret, run_token_secret};
pub use trainer::{ResumePoint, trainer_config_map, trainer_pod};
