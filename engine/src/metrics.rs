//! In-process metrics the engine keeps, rendered by the server as Prometheus text.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket bounds in seconds.
const BOUNDS: [f64; 12] = [
    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0, 3600.0,
];

/// A fixed-bucket histogram of durations, lock-free.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, bucket) in BOUNDS.iter().zip(&self.buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends this histogram in Prometheus text format.
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, bucket) in BOUNDS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// What an engine measures about itself.
#[derive(Default)]
pub struct Metrics {
    /// Wall time of step bodies (each attempt).
    pub step_duration: Histogram,
    /// From a gate opening to its decision being recorded.
    pub decision_latency: Histogram,
    pub activations: AtomicU64,
}

impl Metrics {
    pub fn render(&self, out: &mut String) {
        self.step_duration.render(
            "holdpoint_step_duration_seconds",
            "Wall time of step bodies, per attempt.",
            out,
        );
        self.decision_latency.render(
            "holdpoint_decision_latency_seconds",
            "Time from a gate opening to its decision being recorded.",
            out,
        );
        let _ = writeln!(
            out,
            "# HELP holdpoint_activations_total Activations (journal replays) run by this process.\n# TYPE holdpoint_activations_total counter\nholdpoint_activations_total {}",
            self.activations.load(Ordering::Relaxed)
        );
    }
}
