//! The durable core in one screen: refund runs pause at approval gates, a reviewer
//! decides, the engine is shut down and reopened between the pause and the decision,
//! and the runs finish from their journals.
//!
//!     cargo run --release --example demo [DATA_DIR]

use holdpoint::journal::EventKind;
use holdpoint::prelude::*;
use holdpoint::workflows::refund::{self, RefundRequest};
use holdpoint::workflows::Ledger;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn engine(dir: &Path, ledger: &Arc<Ledger>) -> Result<Engine<SledStore>, Box<dyn std::error::Error>> {
    let store = SledStore::open(dir.join("data"))?;
    Ok(Engine::new(
        store,
        refund::register(Registry::new(), ledger.clone()),
    )?)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir: PathBuf = match std::env::args().nth(1) {
        Some(d) => d.into(),
        None => std::env::temp_dir().join(format!("holdpoint-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let ledger = Arc::new(Ledger::new(dir.join("ledger.jsonl")));
    println!("data directory: {}\n", dir.display());

    let e = engine(&dir, &ledger)?;
    let workers = e.spawn_workers();
    let requests = [
        ("small", 4_000, "late delivery"),
        ("big", 25_000, "arrived broken"),
        ("huge", 90_000, "never arrived"),
    ];
    let mut runs = Vec::new();
    for (order, cents, reason) in requests {
        let req = RefundRequest {
            order_id: order.into(),
            amount_cents: cents,
            reason: reason.into(),
        };
        let run = e.start("refund", &req, Some(&format!("demo-{order}"))).await?;
        let s = e.settled(run).await?;
        println!(
            "started refund of {:>8.2} for order {order:<5} -> {}",
            cents as f64 / 100.0,
            s.status
        );
        runs.push(run);
    }
    println!("\npending approvals (nothing risky ran without a person):");
    for g in e.pending(None, 10).await? {
        println!("  run {} gate {}: {} {}", g.run, g.gate, g.action, g.args);
    }

    // Everything stops. No process holds the paused runs; their journals do.
    workers.shutdown().await;
    e.into_store().map_err(|_| "engine still in use")?.close()?;
    println!("\nengine stopped; reopening the data directory...\n");

    let e = engine(&dir, &ledger)?;
    let workers = e.spawn_workers();
    let alice = Principal::new("alice");
    let bob = Principal::new("bob");
    for g in e.pending(None, 10).await? {
        let req = if g.args["amount_cents"].as_u64().unwrap_or(0) > 50_000 {
            let mut args = g.args.clone();
            args["amount_cents"] = 30_000.into();
            DecisionRequest::edit(g.gate, args, bob.clone()).comment("partial refund only")
        } else {
            DecisionRequest::approve(g.gate, alice.clone())
        };
        e.decide(g.run, req).await?;
    }
    for &run in &runs {
        e.settled(run).await?;
    }
    workers.shutdown().await;

    for &run in &runs {
        let view = e.get(run).await?;
        println!("run {run}: {}", view.summary.status);
        for ev in e.events(run).await? {
            let line = match &ev.event {
                EventKind::StepCompleted { position, output } => format!("step {position} done: {output}"),
                EventKind::ApprovalRequested {
                    gate, action, args, ..
                } => {
                    format!("gate {gate} asks to {action} {args}")
                }
                EventKind::DecisionRecorded {
                    gate,
                    decision,
                    by,
                    comment,
                    ..
                } => format!(
                    "gate {gate}: {decision} by {by}{}",
                    comment.as_ref().map(|c| format!(" ({c})")).unwrap_or_default()
                ),
                other => other.tag().to_string(),
            };
            println!("  {:>2} {line}", ev.seq);
        }
    }
    println!("\nledger (what was actually paid, once each):");
    for entry in ledger.entries()? {
        println!(
            "  {:>8.2} to {} ({})",
            entry.amount_cents as f64 / 100.0,
            entry.to,
            entry.idempotency_key
        );
    }
    let store = e.into_store().map_err(|_| "engine still in use")?;
    println!("\nsyncs this session: {}", store.sync_count());
    store.close()?;
    Ok(())
}
