//! Prometheus metrics of the sidecar; names follow docs/metrics.md exactly.

use prometheus::core::Collector;
use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    commands_total: IntCounterVec,
    command_duration: HistogramVec,
    timeouts_total: IntCounterVec,
    output_bytes_total: IntCounterVec,
    pub sessions_active: IntGauge,
}

/// How a command ended, the `outcome` label: `ok` (exit 0), `error` (non-zero exit or
/// could not start), `timeout`.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Ok,
    Error,
    Timeout,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
        }
    }
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let commands_total = IntCounterVec::new(
            Opts::new(
                "selfplay_sidecar_commands_total",
                "Commands run, by kind and outcome",
            ),
            &["kind", "outcome"],
        )?;
        let command_duration = HistogramVec::new(
            HistogramOpts::new(
                "selfplay_sidecar_command_duration_seconds",
                "Command wall time",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 300.0,
            ]),
            &["kind"],
        )?;
        let timeouts_total = IntCounterVec::new(
            Opts::new(
                "selfplay_sidecar_timeouts_total",
                "Commands killed by their timeout",
            ),
            &["kind"],
        )?;
        let output_bytes_total = IntCounterVec::new(
            Opts::new(
                "selfplay_sidecar_output_bytes_total",
                "Bytes of output returned (after the cap)",
            ),
            &["kind"],
        )?;
        let sessions_active =
            IntGauge::new("selfplay_sidecar_sessions_active", "Open bash sessions")?;
        let m = Self {
            registry,
            commands_total,
            command_duration,
            timeouts_total,
            output_bytes_total,
            sessions_active,
        };
        for c in m.collectors() {
            m.registry.register(c)?;
        }
        Ok(m)
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.commands_total.clone()),
            Box::new(self.command_duration.clone()),
            Box::new(self.timeouts_total.clone()),
            Box::new(self.output_bytes_total.clone()),
            Box::new(self.sessions_active.clone()),
        ]
    }

    pub fn observe(&self, kind: &str, outcome: Outcome, seconds: f64, output_bytes: u64) {
        self.commands_total
            .with_label_values(&[kind, outcome.label()])
            .inc();
        self.command_duration
            .with_label_values(&[kind])
            .observe(seconds);
        if matches!(outcome, Outcome::Timeout) {
            self.timeouts_total.with_label_values(&[kind]).inc();
        }
        self.output_bytes_total
            .with_label_values(&[kind])
            .inc_by(output_bytes);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    fn names(&self) -> Vec<String> {
        self.collectors()
            .iter()
            .flat_map(|c| {
                c.desc()
                    .into_iter()
                    .map(|d| d.fq_name.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// The names of every metric the sidecar registers, from the collectors' descriptors.
pub fn metric_names() -> Vec<String> {
    Metrics::new().map(|m| m.names()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_match_the_contract() {
        let mut names = super::metric_names();
        names.sort();
        assert_eq!(
            names,
            vec![
                "selfplay_sidecar_command_duration_seconds",
                "selfplay_sidecar_commands_total",
                "selfplay_sidecar_output_bytes_total",
                "selfplay_sidecar_sessions_active",
                "selfplay_sidecar_timeouts_total",
            ]
        );
    }
}
