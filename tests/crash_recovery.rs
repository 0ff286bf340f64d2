//! Property test: generated workflows (steps that fail and retry, approval gates with
//! random decisions, questions, durable sleeps, journaled values) run once without a
//! crash and once with a crash injected at a random event boundary: the engine is
//! dropped, the store reopened, and a different worker finishes the run.
//!
//! Checks, for every case:
//! - the final journal equals the uncrashed one, ignoring timestamps, run ids, values
//!   that are random by nature (uuid, random), and the attempts a crash interrupted;
//! - no step recorded completed before the crash runs again after it (I2);
//! - no gated action runs without an approve/edit, and it runs with exactly the
//!   approved or edited args (I1);
//! - every decision acknowledged before the crash is in the journal (I4);
//! - re-running the code over the final journal appends nothing (I3), and the store's
//!   indexes agree with `fold`.
//!
//! Cases: `HOLDPOINT_PROPTEST_CASES` (default 48).

use holdpoint::journal::{Event, EventKind, GateId, PendingGate, Position, RunStatus, Seq, SledStore, Store};
use holdpoint::prelude::*;
use holdpoint::testing::{logical_journal, FaultyStore};
use holdpoint::{fold, replay, Answer, ManualClock, Replay};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Op {
    /// A step whose first `fails` executions fail (retryably).
    Step {
        fails: u8,
    },
    /// An approval gate before an action `act{i}`.
    Gate,
    Ask,
    Sleep {
        secs: u16,
    },
    Now,
    Uuid,
    Random,
}

#[derive(Clone, Debug)]
enum Dec {
    Approve,
    Edit(u32),
    Reject,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..=1).prop_map(|fails| Op::Step { fails }),
        3 => Just(Op::Gate),
        1 => Just(Op::Ask),
        1 => (1u16..3600).prop_map(|secs| Op::Sleep { secs }),
        1 => Just(Op::Now),
        1 => Just(Op::Uuid),
        1 => Just(Op::Random),
    ]
}

fn dec() -> impl Strategy<Value = Dec> {
    prop_oneof![
        Just(Dec::Approve),
        (1u32..10_000).prop_map(Dec::Edit),
        Just(Dec::Reject)
    ]
}

/// Executions of step bodies: the outside world, which survives crashes.
#[derive(Default)]
struct World {
    phase: AtomicU64,
    runs: Mutex<Vec<Execution>>,
}

/// One execution of a step body.
#[derive(Clone, Debug)]
struct Execution {
    op: usize,
    /// 0 before the crash, 1 after.
    phase: u64,
    key: String,
    args: Value,
    attempt: u32,
}

impl World {
    fn record(&self, op: usize, args: Value) -> usize {
        let info = StepInfo::current().unwrap();
        let mut runs = self.runs.lock().unwrap();
        runs.push(Execution {
            op,
            phase: self.phase.load(Ordering::SeqCst),
            key: info.idempotency_key,
            args,
            attempt: info.attempt,
        });
        runs.iter().filter(|r| r.op == op).count()
    }
}

async fn generated(ctx: Ctx, ops: Vec<Op>, world: Arc<World>) -> Result<Value, Failure> {
    let mut out = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Step { fails } => {
                let fails = *fails as usize;
                let v = ctx
                    .step(&format!("s{i}"), || {
                        let world = world.clone();
                        async move {
                            if world.record(i, Value::Null) <= fails {
                                Err(Failure::retryable("flaky"))
                            } else {
                                Ok(i * 10)
                            }
                        }
                    })
                    .retry(RetryPolicy::attempts(4).with_backoff(Duration::ZERO))
                    .await?;
                out.push(json!(v));
            }
            Op::Gate => {
                let args = json!({"op": i, "amount": 100 + i});
                match ctx.gate("act", args, json!({"why": i})).await? {
                    Gated::Approved { args, .. } | Gated::Edited { args, .. } => {
                        let done = ctx
                            .step(&format!("act{i}"), || {
                                let world = world.clone();
                                let args = args.clone();
                                async move {
                                    world.record(i, args.clone());
                                    Ok(args)
                                }
                            })
                            .await?;
                        out.push(done);
                    }
                    Gated::Rejected { reason, .. } => out.push(json!(reason)),
                }
            }
            Op::Ask => match ctx.ask::<Value>(&format!("q{i}")).await? {
                Answer::Responded { value, .. } => out.push(value),
                Answer::Declined { reason, .. } => out.push(json!(reason)),
            },
            Op::Sleep { secs } => ctx.sleep(Duration::from_secs(*secs as u64)).await,
            Op::Now => out.push(json!(ctx.now().await)),
            Op::Uuid => {
                ctx.uuid().await;
            }
            Op::Random => {
                ctx.random().await;
            }
        }
    }
    Ok(json!(out))
}

struct Outcome {
    events: Vec<Event>,
    world: Arc<World>,
    /// Decisions acknowledged to the reviewer: (gate, decision kind).
    acked: Vec<GateId>,
    /// Journal as it stood when the process died (durable part only).
    at_crash: Option<Vec<Event>>,
}

fn registry(world: Arc<World>) -> Registry {
    Registry::new().workflow("gen", 1, move |ctx, ops| generated(ctx, ops, world.clone()))
}

fn open(dir: &Path, world: &Arc<World>, clock: &ManualClock, budget: Option<u64>) -> Engine<FaultyStore> {
    let store = FaultyStore::new(SledStore::open(dir).unwrap(), budget);
    Engine::builder(store, registry(world.clone()))
        .clock(clock.clone())
        .build()
        .unwrap()
}

fn decision_for(gate: &PendingGate, decs: &[Dec]) -> DecisionRequest {
    let by = Principal::new("reviewer");
    let key = format!("decision-{}", gate.gate);
    let req = if gate.action == "ask" {
        let op: usize = gate.args["question"].as_str().unwrap()[1..].parse().unwrap();
        match decs[op] {
            Dec::Reject => DecisionRequest::reject(gate.gate, format!("declined {op}"), by),
            _ => DecisionRequest::respond(gate.gate, json!({"answer": op}), by),
        }
    } else {
        let op = gate.args["op"].as_u64().unwrap() as usize;
        match decs[op] {
            Dec::Approve => DecisionRequest::approve(gate.gate, by),
            Dec::Edit(amount) => DecisionRequest::edit(gate.gate, json!({"op": op, "amount": amount}), by),
            Dec::Reject => DecisionRequest::reject(gate.gate, format!("no {op}"), by),
        }
    };
    req.idempotency_key(key)
}

async fn execute(ops: &[Op], decs: &[Dec], budget: Option<u64>) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let world = Arc::new(World::default());
    let start = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .to_utc();
    let clock = ManualClock::new(start);
    let mut engine = open(dir.path(), &world, &clock, budget);
    let mut acked = Vec::new();
    let mut at_crash = None;
    let run = engine
        .start("gen", &ops, None)
        .await
        .expect("budget covers run-started");
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 200, "run did not finish");
        let crashed = engine.store().crashed();
        if crashed {
            // The process died: drop everything, reopen, resume with a new worker.
            let Ok(store) = engine.into_store() else {
                panic!("engine still shared")
            };
            store.into_inner().close().unwrap();
            let reopened = SledStore::open(dir.path()).unwrap();
            at_crash = Some(reopened.read(run, Seq::ZERO).await.unwrap());
            reopened.close().unwrap();
            world.phase.fetch_add(1, Ordering::SeqCst);
            engine = open(dir.path(), &world, &clock, None);
            continue;
        }
        if engine.drain().await.is_err() || engine.store().crashed() {
            continue;
        }
        let Ok(Some(s)) = engine.store().summary(run).await else {
            continue;
        };
        match s.status {
            RunStatus::Completed | RunStatus::Failed => break,
            RunStatus::Stuck => panic!("run stuck: {:?}", s.stuck),
            RunStatus::Waiting if !s.open_gates.is_empty() => {
                let Ok(pending) = engine.pending(None, 10).await else {
                    continue;
                };
                let gate = pending
                    .into_iter()
                    .find(|g| g.run == run)
                    .expect("open gate is listed");
                if engine.decide(run, decision_for(&gate, decs)).await.is_ok() {
                    acked.push(gate.gate);
                }
            }
            RunStatus::Waiting => clock.advance(Duration::from_secs(3600)),
            other => panic!("run is {other} but nothing is due: {s:?}"),
        }
    }
    let events = engine.events(run).await.unwrap();
    // Indexes agree with fold.
    let s = engine.store().summary(run).await.unwrap().unwrap();
    assert_eq!(s.status, fold(&events).status);
    assert!(engine.pending(None, 10).await.unwrap().is_empty());
    // I3: the code over the finished journal appends nothing.
    assert_eq!(
        replay(&registry(Arc::new(World::default())), &events).await,
        Replay::Consistent { would_append: vec![] }
    );
    Outcome {
        events,
        world,
        acked,
        at_crash,
    }
}

fn check(ops: &[Op], decs: &[Dec], clean: &Outcome, crashed: &Outcome) -> Result<(), TestCaseError> {
    prop_assert_eq!(logical_journal(&clean.events), logical_journal(&crashed.events));

    let at_crash = crashed.at_crash.clone().unwrap_or_default();
    // I4: acknowledged decisions survived.
    for gate in &crashed.acked {
        let recorded = crashed
            .events
            .iter()
            .any(|e| matches!(&e.event, EventKind::DecisionRecorded { gate: g, .. } if g == gate));
        prop_assert!(recorded, "acknowledged decision at gate {} is missing", gate);
    }
    // I2: nothing completed before the crash ran after it.
    let completed_before: BTreeSet<Position> = at_crash
        .iter()
        .filter_map(|e| match e.event {
            EventKind::StepCompleted { position, .. } => Some(position),
            _ => None,
        })
        .collect();
    let names: BTreeMap<Position, String> = crashed
        .events
        .iter()
        .filter_map(|e| match &e.event {
            EventKind::StepStarted { position, name, .. } => Some((*position, name.clone())),
            _ => None,
        })
        .collect();
    let runs = crashed.world.runs.lock().unwrap().clone();
    // Every execution of a step body is accounted for: its attempt was durably
    // started before it ran, so the journal shows it even if a crash lost its outcome.
    let started: BTreeSet<(Position, u32)> = crashed
        .events
        .iter()
        .filter_map(|e| match e.event {
            EventKind::StepStarted {
                position, attempt, ..
            } => Some((position, attempt)),
            _ => None,
        })
        .collect();
    let mut executed = BTreeSet::new();
    for Execution { op, key, attempt, .. } in &runs {
        let position = Position(key.rsplit('/').next().unwrap().parse().unwrap());
        prop_assert!(
            executed.insert((position, *attempt)),
            "op {} attempt {} ran twice: a re-run must be a new, journaled attempt",
            op,
            attempt
        );
        prop_assert!(
            started.contains(&(position, *attempt)),
            "op {} attempt {} ran but the journal has no step-started for it",
            op,
            attempt
        );
    }
    for Execution { op, phase, key, .. } in &runs {
        if *phase == 0 {
            continue;
        }
        let position: Position = Position(key.rsplit('/').next().unwrap().parse().unwrap());
        prop_assert!(
            !completed_before.contains(&position),
            "op {} ({:?}) at position {} ran again after the crash although it had completed",
            op,
            names.get(&position),
            position
        );
    }
    // I1: a gated action ran only after approve/edit, with exactly those args.
    for (i, op) in ops.iter().enumerate() {
        if !matches!(op, Op::Gate) {
            continue;
        }
        let executed: Vec<&Value> = runs.iter().filter(|r| r.op == i).map(|r| &r.args).collect();
        match decs[i] {
            Dec::Reject => prop_assert!(executed.is_empty(), "rejected action {} ran", i),
            Dec::Approve => {
                prop_assert!(!executed.is_empty());
                for args in executed {
                    prop_assert_eq!(args, &json!({"op": i, "amount": 100 + i}));
                }
            }
            Dec::Edit(amount) => {
                prop_assert!(!executed.is_empty());
                for args in executed {
                    prop_assert_eq!(args, &json!({"op": i, "amount": amount}));
                }
            }
        }
        let keys: BTreeSet<&String> = runs.iter().filter(|r| r.op == i).map(|r| &r.key).collect();
        prop_assert!(keys.len() <= 1, "one idempotency key per action: {:?}", keys);
    }
    // Without a crash, every body ran exactly as often as the journal says.
    for (i, op) in ops.iter().enumerate() {
        let n = clean
            .world
            .runs
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.op == i)
            .count();
        let expected = match (op, decs.get(i)) {
            (Op::Step { fails }, _) => *fails as usize + 1,
            (Op::Gate, Some(Dec::Reject)) => 0,
            (Op::Gate, _) => 1,
            _ => 0,
        };
        prop_assert_eq!(n, expected, "op {} ran {} times", i, n);
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("HOLDPOINT_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_crash_at_any_event_boundary_changes_nothing(
        ops in proptest::collection::vec(op(), 1..8),
        decs in proptest::collection::vec(dec(), 8),
        crash in 0.0f64..1.0,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let clean = execute(&ops, &decs, None).await;
            let len = clean.events.len() as u64;
            // Crash once `budget` events are durable: anywhere from right after
            // run-started to right before the last event.
            let budget = 1 + ((len - 1) as f64 * crash) as u64;
            let crashed = execute(&ops, &decs, Some(budget)).await;
            check(&ops, &decs, &clean, &crashed)
        })?;
    }
}

/// Every crash point of one fixed, rich workflow, exhaustively.
#[tokio::test]
async fn every_crash_point_of_a_rich_workflow() {
    let ops = vec![
        Op::Step { fails: 1 },
        Op::Gate,
        Op::Now,
        Op::Ask,
        Op::Sleep { secs: 60 },
        Op::Gate,
        Op::Step { fails: 0 },
        Op::Gate,
        Op::Random,
    ];
    let decs = vec![
        Dec::Approve,
        Dec::Approve,
        Dec::Approve,
        Dec::Approve,
        Dec::Approve,
        Dec::Edit(7),
        Dec::Approve,
        Dec::Reject,
        Dec::Approve,
    ];
    let clean = execute(&ops, &decs, None).await;
    for budget in 1..clean.events.len() as u64 {
        let crashed = execute(&ops, &decs, Some(budget)).await;
        assert!(crashed.at_crash.is_some(), "budget {budget} crashed");
        if let Err(e) = check(&ops, &decs, &clean, &crashed) {
            panic!("crash after {budget} events: {e}");
        }
    }
}
