//! The operator's Prometheus metrics; names are the contract in `docs/metrics.md`.

use prometheus::core::Collector;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use selfplay_crds::RunPhase;

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub reconciliations: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: HistogramVec,
    pub pool_sandboxes: IntGaugeVec,
    pub acquire_duration: HistogramVec,
    pub acquire_total: IntCounterVec,
    pub acquire_waiting: IntGaugeVec,
    pub run_phase: IntGaugeVec,
    pub run_step: IntGaugeVec,
    pub run_last_checkpoint: GaugeVec,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition")
}
fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition")
}
fn histogram(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("static metric definition")
}

pub const RUN_PHASES: [RunPhase; 5] = [
    RunPhase::Pending,
    RunPhase::Running,
    RunPhase::Suspended,
    RunPhase::Succeeded,
    RunPhase::Failed,
];

pub fn phase_name(p: RunPhase) -> &'static str {
    match p {
        RunPhase::Pending => "Pending",
        RunPhase::Running => "Running",
        RunPhase::Suspended => "Suspended",
        RunPhase::Succeeded => "Succeeded",
        RunPhase::Failed => "Failed",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self {
            registry: Registry::new(),
            reconciliations: counter(
                "selfplay_operator_reconciliations_total",
                "Reconciles",
                &["kind"],
            ),
            reconcile_errors: counter(
                "selfplay_operator_reconcile_errors_total",
                "Failed reconciles, by error label",
                &["kind", "error"],
            ),
            reconcile_duration: histogram(
                "selfplay_operator_reconcile_duration_seconds",
                "Reconcile wall time",
                &["kind"],
                vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            ),
            pool_sandboxes: gauge(
                "selfplay_pool_sandboxes",
                "Sandboxes per pool and state",
                &["namespace", "pool", "state"],
            ),
            acquire_duration: histogram(
                "selfplay_broker_acquire_duration_seconds",
                "Time from an acquire request to a sandbox handed out",
                &["namespace", "pool"],
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0,
                ],
            ),
            acquire_total: counter(
                "selfplay_broker_acquire_total",
                "Acquire requests",
                &["namespace", "pool", "outcome"],
            ),
            acquire_waiting: gauge(
                "selfplay_broker_acquire_waiting",
                "Acquire requests waiting for a Ready sandbox",
                &["namespace", "pool"],
            ),
            run_phase: gauge(
                "selfplay_run_phase",
                "1 for the run's current phase, 0 for the others",
                &["namespace", "run", "phase"],
            ),
            run_step: gauge(
                "selfplay_run_step",
                "The step last reported by the run's trainer",
                &["namespace", "run"],
            ),
            run_last_checkpoint: GaugeVec::new(
                Opts::new(
                    "selfplay_run_last_checkpoint_timestamp_seconds",
                    "Unix time of the run's latest Ready checkpoint",
                ),
                &["namespace", "run"],
            )
            .expect("static metric definition"),
        };
        for c in m.collectors() {
            m.registry
                .register(c.box_clone())
                .expect("metric names are unique");
        }
        m
    }

    fn collectors(&self) -> Vec<Box<dyn CloneCollector>> {
        vec![
            Box::new(self.reconciliations.clone()),
            Box::new(self.reconcile_errors.clone()),
            Box::new(self.reconcile_duration.clone()),
            Box::new(self.pool_sandboxes.clone()),
            Box::new(self.acquire_duration.clone()),
            Box::new(self.acquire_total.clone()),
            Box::new(self.acquire_waiting.clone()),
            Box::new(self.run_phase.clone()),
            Box::new(self.run_step.clone()),
            Box::new(self.run_last_checkpoint.clone()),
        ]
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    pub fn set_run_phase(&self, namespace: &str, run: &str, phase: Option<RunPhase>) {
        for p in RUN_PHASES {
            self.run_phase
                .with_label_values(&[namespace, run, phase_name(p)])
                .set(i64::from(Some(p) == phase));
        }
    }

    /// Drops every series of a deleted run.
    pub fn forget_run(&self, namespace: &str, run: &str) {
        for p in RUN_PHASES {
            let _ = self
                .run_phase
                .remove_label_values(&[namespace, run, phase_name(p)]);
        }
        let _ = self.run_step.remove_label_values(&[namespace, run]);
        let _ = self
            .run_last_checkpoint
            .remove_label_values(&[namespace, run]);
    }

    pub fn set_pool_counts(
        &self,
        namespace: &str,
        pool: &str,
        ready: i32,
        claimed: i32,
        pending: i32,
    ) {
        for (state, v) in [("ready", ready), ("claimed", claimed), ("pending", pending)] {
            self.pool_sandboxes
                .with_label_values(&[namespace, pool, state])
                .set(i64::from(v));
        }
    }

    /// Drops every series of a deleted pool.
    pub fn forget_pool(&self, namespace: &str, pool: &str) {
        for state in ["ready", "claimed", "pending"] {
            let _ = self
                .pool_sandboxes
                .remove_label_values(&[namespace, pool, state]);
        }
        let _ = self.acquire_waiting.remove_label_values(&[namespace, pool]);
    }
}

/// A collector that can be registered as a boxed clone while the typed handle is kept.
trait CloneCollector: Collector {
    fn box_clone(&self) -> Box<dyn Collector>;
}
impl<T: Collector + Clone + 'static> CloneCollector for T {
    fn box_clone(&self) -> Box<dyn Collector> {
        Box::new(self.clone())
    }
}

/// Names of every metric the operator registers, from the collectors' descriptors.
pub fn metric_names() -> Vec<String> {
    let m = Metrics::new();
    let mut names: Vec<String> = m
        .collectors()
        .iter()
        .flat_map(|c| {
            c.desc()
                .into_iter()
                .map(|d| d.fq_name.clone())
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names
}
