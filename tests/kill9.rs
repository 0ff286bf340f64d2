//! The kill harness: real process crashes. This binary is both sides.
//!
//! - The parent (default) runs cycles on one data directory. Each cycle spawns the child,
//!   lets it work, and kills it with SIGKILL at a random moment — or arms a failpoint
//!   (feature `failpoints`) so the child aborts inside the engine: between an append and
//!   its flush, inside a group commit before the fsync, inside a commit, or between a
//!   step's effect and its record. After every cycle the parent reopens the directory
//!   and checks: every acknowledged decision is in the journal (as acknowledged), no
//!   step position completed twice, every executed payment was allowed (no gate, or an
//!   approve/edit with exactly those args), every journal verifies. At the end it finishes every run.
//!   Every fourth cycle's child writes each record under its own key (the layout before
//!   packed commits), so the directory holds both layouts, as one upgraded in place does.
//! - The child (`HOLDPOINT_KILL9_CHILD=<dir>`) starts the runs (idempotently), runs
//!   workers, and is a scripted reviewer that writes each acknowledged decision to its
//!   own fsynced ledger before telling the parent.
//!
//! `HOLDPOINT_KILL9_CYCLES` (default 20), `HOLDPOINT_KILL9_RUNS` (default 10,000, a third
//! of them gated), `HOLDPOINT_KILL9_SEED` (default: from the clock; printed).

use futures::future::join_all;
use holdpoint::journal::{
    Decision, EventKind, GateId, Position, RecordedDecision, RunId, RunStatus, SledOptions, SledStore, Store,
};
use holdpoint::prelude::*;
use holdpoint::{EngineConfig, Gated};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

mod common;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

use common::pick;

/// Set for a child that writes a commit's records under keys of their own.
const UNPACKED: &str = "HOLDPOINT_KILL9_UNPACKED";
/// Set for a child (and a parent) whose store makes commits durable in its write-ahead
/// log, checkpointing every 256 KiB of it (`SledOptions::wal`).
const WAL: &str = "HOLDPOINT_KILL9_WAL";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Payment {
    to: String,
    amount_cents: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Order {
    i: u64,
    amount_cents: u64,
}

fn order(i: u64) -> Order {
    Order {
        i,
        // A third above the threshold: those wait for a person.
        amount_cents: if i % 3 == 0 { 20_000 + i } else { 1_000 + i },
    }
}

/// The outside world: every payment made, appended to a file (a single write each, so a
/// kill never tears a line; the page cache survives a process kill).
struct Effects {
    file: Mutex<std::fs::File>,
}

impl Effects {
    fn open(path: &Path) -> Effects {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        Effects {
            file: Mutex::new(file),
        }
    }
    fn pay(&self, p: &Payment) {
        let info = StepInfo::current().unwrap();
        let mut line =
            serde_json::to_vec(&json!({"key": info.idempotency_key, "attempt": info.attempt, "args": p}))
                .unwrap();
        line.push(b'\n');
        self.file.lock().unwrap().write_all(&line).unwrap();
    }
}

/// Each crash counts as an attempt of every step it interrupts, and a run can be caught
/// mid-step by many of the cycles (a slow machine finishes few runs per cycle): with the
/// default three attempts such runs end failed ("attempt 3 was interrupted"), which is
/// the retry budget working, not what this test checks. Every run must complete.
fn crash_proof() -> RetryPolicy {
    RetryPolicy::attempts(100_000)
}

async fn pay(ctx: Ctx, o: Order, effects: Arc<Effects>) -> Result<String, Failure> {
    let i = o.i;
    ctx.step("plan", || async move { Ok(json!({"plan": i})) })
        .retry(crash_proof())
        .await?;
    let proposed = Payment {
        to: format!("customer-{i}"),
        amount_cents: o.amount_cents,
    };
    let payment = if o.amount_cents > 10_000 {
        match ctx.gate("send_money", proposed, json!({"order": i})).await? {
            Gated::Approved { args, .. } | Gated::Edited { args, .. } => args,
            Gated::Rejected { reason, .. } => return Ok(format!("rejected: {reason}")),
        }
    } else {
        proposed
    };
    ctx.step("send_money", || {
        let (effects, payment) = (effects.clone(), payment.clone());
        async move {
            effects.pay(&payment);
            Ok(payment.amount_cents)
        }
    })
    .retry(crash_proof())
    .await?;
    Ok("paid".into())
}

fn engine(dir: &Path) -> Engine<SledStore> {
    let effects = Arc::new(Effects::open(&dir.join("effects.jsonl")));
    // A child told so writes each record under its own key, as builds before packed
    // commits did.
    let options = SledOptions {
        pack_commits: std::env::var_os(UNPACKED).is_none(),
        wal: std::env::var_os(WAL).is_some(),
        checkpoint_bytes: 256 << 10,
        ..SledOptions::default()
    };
    Engine::builder(
        SledStore::open_with(dir.join("data"), options).expect("reopen after a crash"),
        Registry::new().workflow("pay", 1, move |ctx, o| pay(ctx, o, effects.clone())),
    )
    .config(EngineConfig {
        concurrency: 256,
        ..EngineConfig::default()
    })
    .build()
    .unwrap()
}

/// The scripted reviewer's decision (mostly approvals; some edits and rejections).
fn decision(seed: u64, run: RunId, gate: GateId, args: &Value) -> DecisionRequest {
    let by = Principal::new(format!(
        "reviewer-{}",
        pick(seed, &format!("{run}/{gate}/who"), 3)
    ));
    let req = match pick(seed, &format!("{run}/{gate}"), 10) {
        0..=6 => DecisionRequest::approve(gate, by),
        7..=8 => {
            let mut p: Payment = serde_json::from_value(args.clone()).unwrap();
            p.amount_cents /= 3;
            DecisionRequest::edit(gate, serde_json::to_value(p).unwrap(), by)
        }
        _ => DecisionRequest::reject(gate, "not this much", by),
    };
    req.idempotency_key(format!("{run}/{gate}"))
}

async fn start_all(e: &Engine<SledStore>, runs: u64) -> Vec<RunId> {
    let mut ids = Vec::with_capacity(runs as usize);
    let all: Vec<u64> = (0..runs).collect();
    for chunk in all.chunks(512) {
        let orders: Vec<(Order, String)> = chunk.iter().map(|&i| (order(i), format!("kill9-{i}"))).collect();
        let started = join_all(orders.iter().map(|(o, key)| e.start("pay", o, Some(key))));
        for r in started.await {
            ids.push(r.expect("start"));
        }
    }
    ids
}

async fn child(dir: &Path, seed: u64, runs: u64, cycle: u64) {
    let witness = format!("cycle {cycle}, pid {}", std::process::id());
    let e = engine(dir);
    let workers = e.spawn_workers();
    let out = std::io::stdout();
    start_all(&e, runs).await;
    writeln!(out.lock(), "started").unwrap();
    let mut acked = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("acked.jsonl"))
        .unwrap();
    let mut changes = e.store().changes();
    loop {
        changes.borrow_and_update();
        let pending = e.pending(None, 1000).await.unwrap();
        for gate in &pending {
            let req = decision(seed, gate.run, gate.gate, &gate.args).comment(witness.clone());
            if let Ok(Some(d)) = e.decide(gate.run, req).await.map(|d| d.decision().cloned()) {
                let line =
                    json!({"run": gate.run, "gate": gate.gate, "decision": d.decision, "comment": d.comment});
                writeln!(acked, "{line}").unwrap();
                acked.sync_data().unwrap(); // durable before anyone is told
                writeln!(out.lock(), "acked").unwrap();
            }
        }
        if pending.is_empty() {
            let store = e.store();
            let ended: usize = [RunStatus::Completed, RunStatus::Failed, RunStatus::Cancelled]
                .into_iter()
                .map(|s| store.count_runs(s).unwrap())
                .sum();
            if ended as u64 >= runs {
                writeln!(out.lock(), "all-done").unwrap();
                workers.shutdown().await;
                return std::future::pending().await;
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

#[derive(Default, Debug)]
struct Figures {
    acked: usize,
    completed: usize,
    payments: usize,
    retried_payments: usize,
    /// A few runs that ended otherwise than completed: id, status, error.
    unfinished: Vec<String>,
}

/// The invariants, checked on the directory as the crash left it.
async fn check(dir: &Path, runs: u64) -> Result<Figures, String> {
    let store = SledStore::open(dir.join("data")).map_err(|e| format!("reopen failed: {e}"))?;
    // Every index agrees with the journals: no commit a crash cut is left half-done.
    let problems = store.check_indexes().map_err(|e| e.to_string())?;
    if !problems.is_empty() {
        return Err(format!("indexes disagree with journals: {problems:?}"));
    }
    let mut fig = Figures::default();
    // Journals: each verifies; no position completes twice; what each gate allowed.
    let mut allowed: BTreeMap<String, Option<Payment>> = BTreeMap::new(); // key run/pos -> allowed args (None: not allowed)
    let mut gated_runs = BTreeSet::new();
    let mut after = None;
    let mut decisions: BTreeMap<(RunId, GateId), RecordedDecision> = BTreeMap::new();
    loop {
        let page = store
            .list_runs(None, after, 1000)
            .await
            .map_err(|e| e.to_string())?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for s in &page {
            let events = store
                .read(s.id, holdpoint::journal::Seq::ZERO)
                .await
                .map_err(|e| e.to_string())?;
            let state = holdpoint::fold(&events);
            if s.status == RunStatus::Completed {
                fig.completed += 1;
            } else if fig.unfinished.len() < 3 {
                fig.unfinished
                    .push(format!("{} {}: {:?}", s.id, s.status, state.error));
            }
            let mut completed = BTreeSet::new();
            for e in &events {
                if let EventKind::StepCompleted { position, .. } = e.event {
                    if !completed.insert(position) {
                        return Err(format!("run {}: position {position} completed twice", s.id));
                    }
                }
            }
            for (gate, g) in &state.gates {
                gated_runs.insert(s.id);
                let args = match g.decision.as_ref().map(|d| &d.decision) {
                    Some(Decision::Approve) => serde_json::from_value(g.args.clone()).ok(),
                    Some(Decision::Edit { args }) => serde_json::from_value(args.clone()).ok(),
                    _ => None,
                };
                if let Some(d) = &g.decision {
                    decisions.insert((s.id, *gate), d.clone());
                }
                allowed.insert(format!("{}/{}", s.id, Position(gate.0 + 1)), args);
            }
        }
    }
    if fig.completed as u64 > runs {
        return Err("more runs than were started".into());
    }
    // Every acknowledged decision is in the journal, exactly as acknowledged.
    let acked = std::fs::read_to_string(dir.join("acked.jsonl")).unwrap_or_default();
    for line in acked.lines() {
        let Ok(a) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        fig.acked += 1;
        let run: RunId = serde_json::from_value(a["run"].clone()).unwrap();
        let gate: GateId = serde_json::from_value(a["gate"].clone()).unwrap();
        let want: Decision = serde_json::from_value(a["decision"].clone()).unwrap();
        match decisions.get(&(run, gate)) {
            Some(d) if d.decision == want && d.comment == a["comment"].as_str().map(str::to_string) => {}
            other => {
                return Err(format!(
                    "acknowledged {want} at {run}/{gate} is missing or different: {other:?}"
                ))
            }
        }
    }
    // Every payment made was allowed: no gate, or an approve/edit with exactly these args.
    let effects = std::fs::read_to_string(dir.join("effects.jsonl")).unwrap_or_default();
    let mut seen = BTreeSet::new();
    for line in effects.lines() {
        let Ok(e) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        fig.payments += 1;
        let key = e["key"].as_str().unwrap().to_string();
        if !seen.insert(key.clone()) {
            fig.retried_payments += 1;
        }
        let run: RunId = key.split('/').next().unwrap().parse().unwrap();
        let paid: Payment = serde_json::from_value(e["args"].clone()).unwrap();
        if gated_runs.contains(&run) {
            match allowed.get(&key) {
                Some(Some(args)) if *args == paid => {}
                other => {
                    return Err(format!(
                        "payment {key} {paid:?} ran without an approval of those args: {other:?}"
                    ))
                }
            }
        }
    }
    store.close().map_err(|e| e.to_string())?;
    Ok(fig)
}

fn parent() -> Result<(), String> {
    let seed = env_u64(
        "HOLDPOINT_KILL9_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let cycles = env_u64("HOLDPOINT_KILL9_CYCLES", 20);
    let runs = env_u64("HOLDPOINT_KILL9_RUNS", 10_000);
    let store = match std::env::var_os(WAL) {
        Some(_) => "the write-ahead log",
        None => "dirty marks and sled's flush",
    };
    println!("kill9: seed {seed} (HOLDPOINT_KILL9_SEED={seed} reproduces the choices), {cycles} cycles, {runs} runs, commits durable by {store}");
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let wal = std::env::var_os(WAL).is_some();
    let failpoints: &[&str] = if wal {
        &[
            "wal-before-apply",
            "wal-apply-before-indexes",
            "checkpoint-before-flush",
            "checkpoint-before-remove",
            "step-after-effect",
        ]
    } else {
        &[
            "append-before-flush",
            "group-commit-before-fsync",
            "step-after-effect",
            "commit-between-events",
            "commit-before-last-event",
            "commit-before-indexes",
        ]
    };
    let (mut kills, mut aborts, mut finished_early) = (0, 0, 0);
    let gated = runs.div_ceil(3);
    for cycle in 0..cycles {
        let mut cmd = Command::new(&exe);
        cmd.env("HOLDPOINT_KILL9_CHILD", dir.path())
            .env("HOLDPOINT_KILL9_SEED", seed.to_string())
            .env("HOLDPOINT_KILL9_RUNS", runs.to_string())
            .env("HOLDPOINT_KILL9_CYCLE", cycle.to_string())
            .env_remove("HOLDPOINT_FAILPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // Every fourth cycle the child writes a commit's records under keys of their own,
        // as builds before packed commits did: the directory holds both layouts, as one
        // upgraded in place does, and a commit can be cut between its events.
        let unpacked = cycle % 4 == 3 && !wal;
        if unpacked {
            cmd.env(UNPACKED, "1");
        }
        let points: Vec<&str> = failpoints
            .iter()
            .copied()
            .filter(|p| unpacked || *p != "commit-between-events")
            .collect();
        // Every other cycle (with the feature), a crash point inside the engine instead.
        let armed = cfg!(feature = "failpoints") && cycle % 2 == 1;
        let mut how = "SIGKILL".to_string();
        if armed {
            let point = points[pick(seed, &format!("fp {cycle}"), points.len() as u64) as usize];
            let after = 1 + pick(seed, &format!("fp n {cycle}"), 400);
            cmd.env("HOLDPOINT_FAILPOINT", format!("{point}:{after}"));
            how = format!("failpoint {point} after {after} passes");
        }
        if unpacked {
            how.push_str(", a record per key");
        }
        let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
        // Kill after a random share of this cycle's expected decisions.
        let kill_after = 1 + pick(
            seed,
            &format!("cycle {cycle}"),
            (2 * gated / cycles.max(1)).max(2),
        );
        let (mut acks, mut done) = (0, false);
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let Ok(line) = line else { break };
            acks += (line == "acked") as u64;
            done = line == "all-done";
            if done || acks >= kill_after {
                break;
            }
        }
        let _ = child.kill();
        let status = child.wait().map_err(|e| e.to_string())?;
        match (done, status.code()) {
            (true, _) => finished_early += 1,
            (false, None) if !armed => kills += 1,
            (false, None) => aborts += 1,
            (false, Some(code)) => return Err(format!("the child exited by itself with {code} (a panic?)")),
        }
        let fig = rt
            .block_on(check(dir.path(), runs))
            .map_err(|e| format!("after cycle {cycle} ({how}): {e}"))?;
        println!(
            "kill9: cycle {cycle:>3}: {how}, after {acks} decisions in this cycle; {} acknowledged, all present; {} runs completed; {} payments ({} retried with the same key)",
            fig.acked, fig.completed, fig.payments, fig.retried_payments
        );
        if done {
            break;
        }
    }
    // Finish every run here, and check once more.
    rt.block_on(async {
        let e = engine(dir.path());
        let workers = e.spawn_workers();
        let ids = start_all(&e, runs).await;
        for &run in &ids {
            loop {
                let s = e.settled(run).await.map_err(|e| e.to_string())?;
                if s.status.is_terminal() {
                    break;
                }
                if s.status == RunStatus::Stuck {
                    return Err(format!("run {run} is stuck: {:?}", s.stuck));
                }
                if s.status == RunStatus::Running && s.wake_at.is_none() {
                    return Err(format!(
                        "run {run} is running with no worker on it and no wake-up: nothing will drive it"
                    ));
                }
                for g in e
                    .pending(None, 1000)
                    .await
                    .unwrap()
                    .into_iter()
                    .filter(|g| g.run == run)
                {
                    e.decide(run, decision(seed, run, g.gate, &g.args))
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        workers.shutdown().await;
        e.into_store().ok().unwrap().close().map_err(|e| e.to_string())
    })?;
    let fig = rt.block_on(check(dir.path(), runs))?;
    if fig.completed as u64 != runs {
        return Err(format!(
            "{} of {runs} runs completed; for example {:?}",
            fig.completed, fig.unfinished
        ));
    }
    println!(
        "kill9: {kills} SIGKILLs, {aborts} failpoint aborts, {finished_early} cycles finished before the kill; {runs} runs completed; {} decisions acknowledged and present; {} payments, {} of them retries deduplicated by key; 0 completed twice, 0 unapproved",
        fig.acked, fig.payments, fig.retried_payments
    );
    Ok(())
}

fn main() {
    if let Some(dir) = std::env::var_os("HOLDPOINT_KILL9_CHILD") {
        let seed = env_u64("HOLDPOINT_KILL9_SEED", 0);
        let runs = env_u64("HOLDPOINT_KILL9_RUNS", 10_000);
        let cycle = env_u64("HOLDPOINT_KILL9_CYCLE", 0);
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(child(&PathBuf::from(dir), seed, runs, cycle));
        return;
    }
    // Both ways a commit is made durable, each on a directory of its own (a directory
    // with a log keeps it); the children inherit the mode.
    let mut failed = 0;
    for wal in [false, true] {
        if wal {
            std::env::set_var(WAL, "1");
        } else {
            std::env::remove_var(WAL);
        }
        if let Err(e) = parent() {
            eprintln!("kill9: FAILED: {e}");
            failed += 1;
        }
    }
    println!("kill9: {} passed, {failed} failed", 2 - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}
