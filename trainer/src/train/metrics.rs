//! The trainer's Prometheus metrics; names are the contract of `docs/metrics.md`.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};

/// Every trainer metric, registered in one registry with the constant label `run`.
#[derive(Clone)]
pub struct TrainerMetrics {
    pub registry: Registry,
    pub step: Gauge,
    pub policy_version: Gauge,
    pub loss: Gauge,
    pub nonfinite: IntCounter,
    pub policy_entropy: Gauge,
    pub logprob_mismatch: GaugeVec,
    pub mean_reward: GaugeVec,
    pub solve_rate: Gauge,
    pub injector_validity_rate: Gauge,
    pub heldout_solve_rate: Gauge,
    pub validation_failures: IntCounterVec,
    pub episodes: IntCounterVec,
    pub sandbox_errors: IntCounterVec,
    pub agent_sandbox_failures: IntCounterVec,
    pub protected_changes: IntCounterVec,
    pub tokens_per_second: Gauge,
    pub dropped_groups: IntCounter,
    pub stale_samples: IntCounter,
    pub last_checkpoint_timestamp: Gauge,
    pub step_duration: Histogram,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl TrainerMetrics {
    /// Creates the metrics of run `run`.
    pub fn new(run: &str) -> Result<Self, prometheus::Error> {
        let labels = std::iter::once(("run".to_string(), run.to_string())).collect();
        let registry = Registry::new_custom(None, Some(labels))?;
        let m = Self {
            step: Gauge::with_opts(opts("selfplay_trainer_step", "Completed training steps"))?,
            policy_version: Gauge::with_opts(opts(
                "selfplay_trainer_policy_version",
                "Optimiser updates applied",
            ))?,
            loss: Gauge::with_opts(opts(
                "selfplay_trainer_loss",
                "GRPO loss of the last update",
            ))?,
            nonfinite: IntCounter::with_opts(opts(
                "selfplay_trainer_nonfinite_total",
                "Updates stopped by a NaN or Inf loss or gradient",
            ))?,
            policy_entropy: Gauge::with_opts(opts(
                "selfplay_trainer_policy_entropy",
                "Mean per-token entropy of the sampled policy tokens, last step",
            ))?,
            logprob_mismatch: GaugeVec::new(
                opts(
                    "selfplay_trainer_logprob_mismatch",
                    "|log-prob of the trainer's forward - the sampler's| over the trained tokens of the last update (stat: mean, max)",
                ),
                &["stat"],
            )?,
            mean_reward: GaugeVec::new(
                opts(
                    "selfplay_trainer_mean_reward",
                    "Mean reward by role, last step",
                ),
                &["role"],
            )?,
            solve_rate: Gauge::with_opts(opts(
                "selfplay_trainer_solve_rate",
                "Solver success rate, last step",
            ))?,
            injector_validity_rate: Gauge::with_opts(opts(
                "selfplay_trainer_injector_validity_rate",
                "Injector artifacts passing consistency validation, last step",
            ))?,
            heldout_solve_rate: Gauge::with_opts(opts(
                "selfplay_trainer_heldout_solve_rate",
                "Solve rate on the held-out task set (spec.evaluation), latest evaluation",
            ))?,
            validation_failures: IntCounterVec::new(
                opts(
                    "selfplay_trainer_validation_failures_total",
                    "Injector episodes rejected, by first failed check",
                ),
                &["check"],
            )?,
            episodes: IntCounterVec::new(
                opts(
                    "selfplay_trainer_episodes_total",
                    "Episodes finished, by role and end reason",
                ),
                &["role", "end_reason"],
            )?,
            sandbox_errors: IntCounterVec::new(
                opts(
                    "selfplay_trainer_sandbox_errors_total",
                    "Sandbox (infrastructure) errors",
                ),
                &["kind"],
            )?,
            agent_sandbox_failures: IntCounterVec::new(
                opts(
                    "selfplay_trainer_agent_sandbox_failures_total",
                    "Episodes whose sandbox failed during or after the agent's own commands (failing reward, not masked), by role",
                ),
                &["role"],
            )?,
            protected_changes: IntCounterVec::new(
                opts(
                    "selfplay_trainer_protected_changes_total",
                    "Episodes that changed the protected test surface (solver patches: dropped before grading; bugs: rejected), by role",
                ),
                &["role"],
            )?,
            tokens_per_second: Gauge::with_opts(opts(
                "selfplay_trainer_tokens_per_second",
                "Generated tokens per second, last step",
            ))?,
            dropped_groups: IntCounter::with_opts(opts(
                "selfplay_trainer_dropped_groups_total",
                "GRPO groups dropped because every advantage was zero",
            ))?,
            stale_samples: IntCounter::with_opts(opts(
                "selfplay_trainer_stale_samples_total",
                "Samples dropped for being more than maxStaleness policy versions old",
            ))?,
            last_checkpoint_timestamp: Gauge::with_opts(opts(
                "selfplay_trainer_last_checkpoint_timestamp_seconds",
                "Unix time of the last complete checkpoint",
            ))?,
            step_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "selfplay_trainer_step_duration_seconds",
                    "Wall time of a training step",
                )
                .buckets(prometheus::exponential_buckets(1.0, 2.0, 14)?),
            )?,
            registry,
        };
        for c in m.collectors() {
            m.registry.register(c)?;
        }
        Ok(m)
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.step.clone()),
            Box::new(self.policy_version.clone()),
            Box::new(self.loss.clone()),
            Box::new(self.nonfinite.clone()),
            Box::new(self.policy_entropy.clone()),
            Box::new(self.logprob_mismatch.clone()),
            Box::new(self.mean_reward.clone()),
            Box::new(self.solve_rate.clone()),
            Box::new(self.injector_validity_rate.clone()),
            Box::new(self.heldout_solve_rate.clone()),
            Box::new(self.validation_failures.clone()),
            Box::new(self.episodes.clone()),
            Box::new(self.sandbox_errors.clone()),
            Box::new(self.agent_sandbox_failures.clone()),
            Box::new(self.protected_changes.clone()),
            Box::new(self.tokens_per_second.clone()),
            Box::new(self.dropped_groups.clone()),
            Box::new(self.stale_samples.clone()),
            Box::new(self.last_checkpoint_timestamp.clone()),
            Box::new(self.step_duration.clone()),
        ]
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Names of every metric the trainer registers (from the collectors' descriptors).
pub fn metric_names() -> Vec<String> {
    let Ok(m) = TrainerMetrics::new("names") else {
        return Vec::new();
    };
    let mut names: Vec<String> = m
        .collectors()
        .iter()
        .flat_map(|c| c.desc().into_iter().map(|d| d.fq_name.clone()))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Serves `/metrics` (and `/healthz`) on `addr` until the task is dropped.
pub async fn serve(
    addr: std::net::SocketAddr,
    metrics: TrainerMetrics,
) -> std::io::Result<std::net::SocketAddr> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], m.render()) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_contract() {
        let names = metric_names();
        assert_eq!(names.len(), 20);
        assert!(names.iter().all(|n| n.starts_with("selfplay_trainer_")));
        let doc = include_str!("../../../docs/metrics.md");
        for n in &names {
            assert!(
                doc.contains(&format!("`{n}`")),
                "{n} is not in docs/metrics.md"
            );
        }
    }

    #[test]
    fn rendered_metrics_carry_the_run_label() {
        let m = TrainerMetrics::new("demo").expect("metrics");
        m.step.set(3.0);
        let text = m.render();
        assert!(
            text.contains("selfplay_trainer_step{run=\"demo\"} 3"),
            "{text}"
        );
    }
}
