//! `holdpoint bench`: the standard workload, measured.
//!
//! On a fresh temporary data directory, with every acknowledgement durable: N runs of
//! `plan` (a safe step) → `send_money` behind an approval gate → `notify` → completed.
//! Phase 1 starts all N and waits until every one waits at its gate; phase 2 approves
//! all N (through the engine API) and waits until every one has completed. Then, on
//! separate runs, 100 sequential decisions measure decision→completed latency.

use crate::journal::{RunId, RunStatus, SledStore, Store};
use crate::{DecisionRequest, Engine, EngineConfig, Failure, Gated, Registry};
use futures::future::join_all;
use serde::Serialize;
use serde_json::json;
use std::time::{Duration, Instant};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub runs: usize,
    /// Runs started or decided at once, and activations driven at once.
    pub concurrency: usize,
    /// Sequential decisions for the latency figures.
    pub latency_samples: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            runs: 10_000,
            concurrency: 256,
            latency_samples: 100,
        }
    }
}

/// The figures.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub runs: usize,
    pub concurrency: usize,
    pub phase1_runs_per_s: f64,
    pub phase2_runs_per_s: f64,
    pub events: u64,
    pub events_per_s: f64,
    pub fsyncs_per_run: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    pub peak_rss_mib: f64,
    pub bytes_on_disk_per_run: f64,
}

async fn standard(ctx: crate::Ctx, order: u64) -> Result<String, Failure> {
    let plan = ctx
        .step("plan", || async move {
            Ok(json!({"order": order, "amount_cents": 25_000}))
        })
        .await?;
    let paid = match ctx.gate("send_money", plan, json!({"order": order})).await? {
        Gated::Approved { args, .. } | Gated::Edited { args, .. } => args,
        Gated::Rejected { reason, .. } => return Ok(reason),
    };
    ctx.step("notify", || {
        let paid = paid.clone();
        async move { Ok(paid["order"].clone()) }
    })
    .await?;
    Ok("done".into())
}

async fn settle_all(engine: &Engine<SledStore>, runs: &[RunId], want: RunStatus) -> Result<(), String> {
    for &run in runs {
        let s = engine.settled(run).await.map_err(|e| e.to_string())?;
        if s.status != want {
            return Err(format!(
                "run {run} is {} (expected {want}): {:?}",
                s.status, s.stuck
            ));
        }
    }
    Ok(())
}

async fn start_many(
    engine: &Engine<SledStore>,
    orders: std::ops::Range<u64>,
    chunk: usize,
) -> Result<Vec<RunId>, String> {
    let mut runs = Vec::new();
    let all: Vec<u64> = orders.collect();
    for c in all.chunks(chunk.max(1)) {
        for r in join_all(c.iter().map(|o| engine.start("standard", o, None))).await {
            runs.push(r.map_err(|e| e.to_string())?);
        }
    }
    Ok(runs)
}

async fn approve_many(engine: &Engine<SledStore>, runs: &[RunId], chunk: usize) -> Result<(), String> {
    let by = crate::journal::Principal::new("bench");
    for c in runs.chunks(chunk.max(1)) {
        let decided = join_all(c.iter().map(|&run| {
            let by = by.clone();
            async move {
                let gate = crate::journal::GateId(1);
                engine.decide(run, DecisionRequest::approve(gate, by)).await
            }
        }))
        .await;
        for d in decided {
            d.map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Runs the standard workload.
pub async fn run(opts: &BenchOptions) -> Result<BenchReport, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let store = SledStore::open(dir.path()).map_err(|e| e.to_string())?;
    let engine = Engine::builder(store, Registry::new().workflow("standard", 1, standard))
        .config(EngineConfig {
            concurrency: opts.concurrency,
            ..EngineConfig::default()
        })
        .build()
        .map_err(|e| e.to_string())?;
    let workers = engine.spawn_workers();
    let syncs_before = engine.store().sync_count();

    let t = Instant::now();
    let runs = start_many(&engine, 0..opts.runs as u64, opts.concurrency).await?;
    settle_all(&engine, &runs, RunStatus::Waiting).await?;
    let phase1 = t.elapsed();

    let t = Instant::now();
    approve_many(&engine, &runs, opts.concurrency).await?;
    settle_all(&engine, &runs, RunStatus::Completed).await?;
    let phase2 = t.elapsed();
    let syncs = engine.store().sync_count() - syncs_before;

    let mut events = 0;
    for &run in &runs {
        events += engine
            .store()
            .summary(run)
            .await
            .map_err(|e| e.to_string())?
            .map_or(0, |s| s.next_seq.0);
    }
    let disk = engine.store().size_on_disk().map_err(|e| e.to_string())?;

    // Latency: one decision at a time on otherwise idle runs.
    let base = opts.runs as u64;
    let samples = start_many(
        &engine,
        base..base + opts.latency_samples as u64,
        opts.concurrency,
    )
    .await?;
    settle_all(&engine, &samples, RunStatus::Waiting).await?;
    let mut latencies = Vec::new();
    for &run in &samples {
        let t = Instant::now();
        engine
            .decide(
                run,
                DecisionRequest::approve(crate::journal::GateId(1), crate::journal::Principal::new("bench")),
            )
            .await
            .map_err(|e| e.to_string())?;
        let s = engine.settled(run).await.map_err(|e| e.to_string())?;
        if s.status != RunStatus::Completed {
            return Err(format!("latency run {run} is {}", s.status));
        }
        latencies.push(t.elapsed());
    }
    latencies.sort();
    workers.shutdown().await;
    let n = opts.runs.max(1) as f64;
    let total = (phase1 + phase2).as_secs_f64();
    Ok(BenchReport {
        runs: opts.runs,
        concurrency: opts.concurrency,
        phase1_runs_per_s: n / phase1.as_secs_f64(),
        phase2_runs_per_s: n / phase2.as_secs_f64(),
        events,
        events_per_s: events as f64 / total,
        fsyncs_per_run: syncs as f64 / n,
        latency_p50_ms: percentile(&latencies, 0.50),
        latency_p99_ms: percentile(&latencies, 0.99),
        latency_max_ms: latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        peak_rss_mib: peak_rss_mib(),
        bytes_on_disk_per_run: disk as f64 / n,
    })
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "standard workload: {} runs, concurrency {}, durable acknowledgements",
            self.runs, self.concurrency
        )?;
        writeln!(
            f,
            "  phase 1 (start, run to the gate):   {:>10.0} runs/s",
            self.phase1_runs_per_s
        )?;
        writeln!(
            f,
            "  phase 2 (approve, run to the end):  {:>10.0} runs/s",
            self.phase2_runs_per_s
        )?;
        writeln!(
            f,
            "  events:                             {:>10.0} events/s ({} events)",
            self.events_per_s, self.events
        )?;
        writeln!(
            f,
            "  fsyncs per run:                     {:>10.2}",
            self.fsyncs_per_run
        )?;
        writeln!(
            f,
            "  decision -> completed (sequential): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.latency_p50_ms, self.latency_p99_ms, self.latency_max_ms
        )?;
        writeln!(
            f,
            "  peak RSS:                           {:>10.1} MiB",
            self.peak_rss_mib
        )?;
        write!(
            f,
            "  disk per run:                       {:>10.0} bytes",
            self.bytes_on_disk_per_run
        )
    }
}
