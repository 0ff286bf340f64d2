//! A real process crash. This binary is both sides:
//!
//! - the parent (default) spawns itself as a child on a fresh data directory, lets it
//!   start refund runs and decide their gates, SIGKILLs it at a random moment (after a
//!   random number of acknowledged decisions), and repeats on the same directory; then
//!   it reopens the directory itself, finishes every run, and checks the invariants;
//! - the child (`HOLDPOINT_KILL9_CHILD=<dir>`) serves the workload: workers drive runs,
//!   a scripted reviewer decides gates and writes each acknowledged decision to its
//!   own fsynced ledger before telling the parent.
//!
//! Checks: every acknowledged decision is in the journal, unchanged; every run
//! completes; no step position completes twice; every payment in the ledger was made
//! once per idempotency key, with exactly the args a person approved or edited.
//!
//! `HOLDPOINT_KILL9_CYCLES` (default 4), `HOLDPOINT_KILL9_RUNS` (default 40),
//! `HOLDPOINT_KILL9_SEED` (default: from the clock; printed, and reproduces the choices).

use holdpoint::journal::{Decision, EventKind, Position, RunStatus, SledStore, Store};
use holdpoint::prelude::*;
use holdpoint::workflows::refund::{self, Payment, RefundRequest};
use holdpoint::workflows::Ledger;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A number in 0..n chosen by the seed and a label: the same inputs, the same choice,
/// in every process.
fn pick(seed: u64, label: &str, n: u64) -> u64 {
    let d = Sha256::new()
        .chain_update(seed.to_be_bytes())
        .chain_update(label)
        .finalize();
    u64::from_be_bytes(d[..8].try_into().unwrap()) % n.max(1)
}

/// The scripted reviewer's decision for a gate.
fn decision(seed: u64, run: RunId, gate: GateId, args: &serde_json::Value) -> DecisionRequest {
    let by = Principal::new(format!(
        "reviewer-{}",
        pick(seed, &format!("{run}/{gate}/who"), 3)
    ));
    let req = match pick(seed, &format!("{run}/{gate}"), 10) {
        0..=5 => DecisionRequest::approve(gate, by),
        6..=7 => {
            let mut p: Payment = serde_json::from_value(args.clone()).unwrap();
            p.amount_cents /= 3;
            p.memo = format!("edited: {}", p.memo);
            DecisionRequest::edit(gate, serde_json::to_value(p).unwrap(), by)
        }
        _ => DecisionRequest::reject(gate, "not this much", by),
    };
    req.idempotency_key(format!("{run}/{gate}"))
}

fn request(i: u64) -> RefundRequest {
    RefundRequest {
        order_id: format!("K-{i}"),
        // Mostly above the auto-approve threshold, so most runs stop at a gate.
        amount_cents: if i % 5 == 0 { 4_000 } else { 20_000 + i * 100 },
        reason: "kill -9 test".into(),
    }
}

fn engine(dir: &Path) -> Engine<SledStore> {
    let ledger = Arc::new(Ledger::new(dir.join("ledger.jsonl")));
    let store = SledStore::open(dir.join("data")).expect("open data dir");
    Engine::new(store, refund::register(Registry::new(), ledger)).unwrap()
}

async fn child(dir: &Path, seed: u64, runs: u64, cycle: u64) {
    // Marks which process made a decision, so a decision lost in a crash and made again
    // (the same way) by a later process does not pass for the acknowledged one.
    let witness = format!("cycle {cycle}, pid {}", std::process::id());
    let e = engine(dir);
    let workers = e.spawn_workers();
    let mut acked = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("acked.jsonl"))
        .unwrap();
    let out = std::io::stdout();
    let mut run_ids = Vec::new();
    for i in 0..runs {
        // Idempotent: a restarted child gets the same runs back.
        run_ids.push(
            e.start("refund", &request(i), Some(&format!("kill9-{i}")))
                .await
                .unwrap(),
        );
    }
    writeln!(out.lock(), "started").unwrap();
    let mut changes = e.store().changes();
    loop {
        changes.borrow_and_update();
        for gate in e.pending(None, 1000).await.unwrap() {
            let req = decision(seed, gate.run, gate.gate, &gate.args).comment(witness.clone());
            if let Ok(Some(decided)) = e.decide(gate.run, req).await.map(|d| d.decision().cloned()) {
                let line = serde_json::json!({
                    "run": gate.run, "gate": gate.gate, "decision": decided.decision,
                    "by": decided.by, "comment": decided.comment,
                });
                // Durable before anyone is told.
                writeln!(acked, "{line}").unwrap();
                acked.sync_data().unwrap();
                writeln!(out.lock(), "acked {} {}", gate.run, gate.gate).unwrap();
            }
        }
        let mut done = true;
        for &run in &run_ids {
            let s = e.store().summary(run).await.unwrap().unwrap();
            done &= s.status.is_terminal();
        }
        if done {
            writeln!(out.lock(), "all-done").unwrap();
            workers.shutdown().await;
            return std::future::pending().await;
        }
        if changes.changed().await.is_err() {
            break;
        }
    }
}

fn parent() -> Result<(), String> {
    let seed = env_u64(
        "HOLDPOINT_KILL9_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let cycles = env_u64("HOLDPOINT_KILL9_CYCLES", 4);
    let runs = env_u64("HOLDPOINT_KILL9_RUNS", 40);
    println!("kill9: seed {seed} (HOLDPOINT_KILL9_SEED={seed} reproduces the choices), {cycles} cycles, {runs} runs");
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut kills = 0;
    for cycle in 0..cycles {
        let mut child = Command::new(&exe)
            .env("HOLDPOINT_KILL9_CHILD", dir.path())
            .env("HOLDPOINT_KILL9_SEED", seed.to_string())
            .env("HOLDPOINT_KILL9_RUNS", runs.to_string())
            .env("HOLDPOINT_KILL9_CYCLE", cycle.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn child: {e}"))?;
        let kill_after = 1 + pick(seed, &format!("cycle {cycle}"), 8);
        let mut seen = 0;
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for line in lines {
            let line = line.map_err(|e| e.to_string())?;
            if line.starts_with("acked") {
                seen += 1;
            }
            if seen >= kill_after || line == "all-done" {
                break;
            }
        }
        child.kill().map_err(|e| format!("SIGKILL: {e}"))?;
        let status = child.wait().map_err(|e| e.to_string())?;
        kills += 1;
        println!("kill9: cycle {cycle}: killed after {seen} acknowledged decisions ({status})");
    }

    // Recovery in this process: finish every run.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let e = engine(dir.path());
        let workers = e.spawn_workers();
        let mut run_ids = Vec::new();
        for i in 0..runs {
            run_ids.push(
                e.start("refund", &request(i), Some(&format!("kill9-{i}")))
                    .await
                    .unwrap(),
            );
        }
        for &run in &run_ids {
            loop {
                let s = e.settled(run).await.map_err(|e| e.to_string())?;
                if s.status.is_terminal() {
                    if s.status != RunStatus::Completed {
                        return Err(format!(
                            "run {run} ended {}: {:?}",
                            s.status,
                            e.get(run).await.map(|v| v.state.error)
                        ));
                    }
                    break;
                }
                if s.status == RunStatus::Stuck {
                    return Err(format!("run {run} is stuck: {:?}", s.stuck));
                }
                for gate in e
                    .pending(None, 1000)
                    .await
                    .unwrap()
                    .into_iter()
                    .filter(|g| g.run == run)
                {
                    e.decide(run, decision(seed, run, gate.gate, &gate.args))
                        .await
                        .map_err(|err| err.to_string())?;
                }
            }
        }
        workers.shutdown().await;
        verify(&e, dir.path(), &run_ids).await
    })?;
    println!("kill9: {kills} kills, {runs} runs, all invariants held");
    Ok(())
}

async fn verify(e: &Engine<SledStore>, dir: &Path, runs: &[RunId]) -> Result<(), String> {
    // 1. Every acknowledged decision is in the journal, as acknowledged.
    let acked = std::fs::read_to_string(dir.join("acked.jsonl")).unwrap_or_default();
    let mut n_acked = 0;
    for line in acked.lines() {
        let Ok(a) = serde_json::from_str::<serde_json::Value>(line) else {
            continue; // torn last line: never acknowledged
        };
        n_acked += 1;
        let run: RunId = serde_json::from_value(a["run"].clone()).unwrap();
        let gate: GateId = serde_json::from_value(a["gate"].clone()).unwrap();
        let want: Decision = serde_json::from_value(a["decision"].clone()).unwrap();
        let witness = a["comment"].as_str().map(str::to_string);
        let view = e.get(run).await.map_err(|e| e.to_string())?;
        let got = view.state.gates.get(&gate).and_then(|g| g.decision.clone());
        match got {
            Some(d) if d.decision == want && d.comment == witness => {}
            other => {
                return Err(format!(
                    "acknowledged decision {want} at {run}/{gate} missing: {other:?}"
                ))
            }
        }
    }
    if n_acked == 0 {
        return Err("no decision was acknowledged before the kills: the test proved nothing".into());
    }
    // 2. No position completes twice; 3. each payment matches what a person allowed.
    let mut expected_payments = BTreeMap::new();
    for &run in runs {
        let events = e.events(run).await.map_err(|e| e.to_string())?;
        let mut completed = BTreeSet::new();
        let mut allowed: Option<Payment> = None;
        let mut gates: BTreeMap<GateId, serde_json::Value> = BTreeMap::new();
        for ev in &events {
            match &ev.event {
                EventKind::StepCompleted { position, output } => {
                    if !completed.insert(*position) {
                        return Err(format!("run {run}: position {position} completed twice"));
                    }
                    if let Some(name) = step_name(&events, *position) {
                        if name == "send_money" {
                            let paid: Payment = serde_json::from_value(output.clone()).unwrap();
                            if !gates.is_empty() && allowed.as_ref() != Some(&paid) {
                                return Err(format!(
                                    "run {run}: paid {paid:?} but a person allowed {allowed:?}"
                                ));
                            }
                            expected_payments.insert(format!("{run}/{position}"), paid);
                        }
                    }
                }
                EventKind::ApprovalRequested { gate, args, .. } => {
                    gates.insert(*gate, args.clone());
                    allowed = None;
                }
                EventKind::DecisionRecorded { gate, decision, .. } => {
                    allowed = match decision {
                        Decision::Approve => serde_json::from_value(gates[gate].clone()).ok(),
                        Decision::Edit { args } => serde_json::from_value(args.clone()).ok(),
                        _ => None,
                    };
                }
                _ => {}
            }
        }
    }
    let ledger = Ledger::new(dir.join("ledger.jsonl"))
        .entries()
        .map_err(|e| e.to_string())?;
    let mut keys = BTreeSet::new();
    for entry in &ledger {
        if !keys.insert(entry.idempotency_key.clone()) {
            return Err(format!("paid twice for {}", entry.idempotency_key));
        }
        let Some(p) = expected_payments.get(&entry.idempotency_key) else {
            return Err(format!("ledger has a payment no run recorded: {entry:?}"));
        };
        if (p.amount_cents, &p.to) != (entry.amount_cents, &entry.to) {
            return Err(format!("ledger {entry:?} differs from the journal's {p:?}"));
        }
    }
    if keys.len() != expected_payments.len() {
        return Err(format!(
            "{} payments recorded in journals, {} in the ledger",
            expected_payments.len(),
            keys.len()
        ));
    }
    println!(
        "kill9: {n_acked} acknowledged decisions all present; {} payments, each once",
        keys.len()
    );
    Ok(())
}

fn step_name(events: &[holdpoint::journal::Event], position: Position) -> Option<&str> {
    events.iter().find_map(|e| match &e.event {
        EventKind::StepStarted {
            position: p, name, ..
        } if *p == position => Some(name.as_str()),
        _ => None,
    })
}

fn main() {
    if let Some(dir) = std::env::var_os("HOLDPOINT_KILL9_CHILD") {
        let seed = env_u64("HOLDPOINT_KILL9_SEED", 0);
        let runs = env_u64("HOLDPOINT_KILL9_RUNS", 40);
        let cycle = env_u64("HOLDPOINT_KILL9_CYCLE", 0);
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(child(Path::new(&dir), seed, runs, cycle));
        return;
    }
    match parent() {
        Ok(()) => println!("kill9: 1 passed, 0 failed"),
        Err(e) => {
            eprintln!("kill9: FAILED: {e}");
            println!("kill9: 0 passed, 1 failed");
            std::process::exit(1);
        }
    }
}
