//! Workspace-level tests for selfplay, and the helpers they share: where the workspace is,
//! the real tools the checks run (Helm, promtool, Lua, kubernetes-validate) and how to get
//! them, and the metric-name contract.

pub mod helm;
pub mod lua;
pub mod metric_names;
pub mod paths;
pub mod rbac;
pub mod tools;
