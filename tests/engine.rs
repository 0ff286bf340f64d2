//! Engine behaviour through its public API, on real sled stores in temp directories.

use holdpoint::journal::{Decision, DecisionKind, EventKind, Position, RunStatus, Store};
use holdpoint::prelude::*;
use holdpoint::workflows::refund::{self, Payment, RefundOutcome, RefundRequest};
use holdpoint::workflows::Ledger;
use holdpoint::{fold, replay, Answer, EngineConfig, Error, ManualClock, Replay};
use serde_json::json;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn bob() -> Principal {
    Principal::new("bob")
}

struct Env {
    _dir: tempfile::TempDir,
    engine: Engine<SledStore>,
    ledger: Arc<Ledger>,
}

fn env_with(extra: impl FnOnce(Registry) -> Registry) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Ledger::new(dir.path().join("ledger.jsonl")));
    let store = SledStore::open(dir.path().join("data")).unwrap();
    let registry = extra(refund::register(Registry::new(), ledger.clone()));
    let engine = Engine::new(store, registry).unwrap();
    Env {
        _dir: dir,
        engine,
        ledger,
    }
}

fn env() -> Env {
    env_with(|r| r)
}

fn big_refund() -> RefundRequest {
    RefundRequest {
        order_id: "A-1".into(),
        amount_cents: 25_000,
        reason: "damaged".into(),
    }
}

async fn only_gate(engine: &Engine<SledStore>, run: RunId) -> GateId {
    let view = engine.get(run).await.unwrap();
    let open: Vec<_> = view.state.open_gates().collect();
    assert_eq!(
        open.len(),
        1,
        "expected exactly one open gate: {:?}",
        view.state.gates
    );
    open[0].gate
}

#[tokio::test]
async fn approve_runs_the_action_once_with_the_proposed_args() {
    let env = env();
    let e = &env.engine;
    let run = e.start("refund", &big_refund(), None).await.unwrap();
    e.drain().await.unwrap();
    let summary = e.store().summary(run).await.unwrap().unwrap();
    assert_eq!(summary.status, RunStatus::Waiting);
    assert!(
        env.ledger.entries().unwrap().is_empty(),
        "nothing is paid before approval"
    );
    let pending = e.pending(None, 10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].action, "send_money");
    let proposed: Payment = serde_json::from_value(pending[0].args.clone()).unwrap();

    let gate = only_gate(e, run).await;
    e.decide(run, DecisionRequest::approve(gate, bob()).comment("ok"))
        .await
        .unwrap();
    e.drain().await.unwrap();

    let view = e.get(run).await.unwrap();
    assert_eq!(view.summary.status, RunStatus::Completed);
    let outcome: RefundOutcome = serde_json::from_value(view.state.output.unwrap()).unwrap();
    assert_eq!(
        outcome,
        RefundOutcome::Refunded {
            payment: proposed.clone(),
            drafts: 1
        }
    );
    let paid = env.ledger.entries().unwrap();
    assert_eq!(paid.len(), 1);
    assert_eq!(paid[0].amount_cents, proposed.amount_cents);
    assert!(e.pending(None, 10).await.unwrap().is_empty());
    // Who approved is in the journal.
    let decided = view.state.gates[&gate].decision.clone().unwrap();
    assert_eq!(decided.by, bob());
    assert_eq!(decided.comment.as_deref(), Some("ok"));
}

#[tokio::test]
async fn edit_changes_what_is_actually_paid() {
    let env = env();
    let e = &env.engine;
    let run = e.start("refund", &big_refund(), None).await.unwrap();
    e.drain().await.unwrap();
    let gate = only_gate(e, run).await;
    let edited = Payment {
        to: "customer-of-A-1".into(),
        amount_cents: 12_345,
        memo: "partial refund".into(),
    };
    e.decide(
        run,
        DecisionRequest::edit(gate, serde_json::to_value(&edited).unwrap(), bob()),
    )
    .await
    .unwrap();
    e.drain().await.unwrap();
    let paid = env.ledger.entries().unwrap();
    assert_eq!(paid.len(), 1);
    assert_eq!(paid[0].amount_cents, 12_345);
    assert_eq!(paid[0].memo, "partial refund");
}

#[tokio::test]
async fn reject_never_runs_the_action_and_the_agent_sees_the_reason() {
    let env = env();
    let e = &env.engine;
    let run = e.start("refund", &big_refund(), None).await.unwrap();
    e.drain().await.unwrap();
    let first = only_gate(e, run).await;
    e.decide(run, DecisionRequest::reject(first, "too much", bob()))
        .await
        .unwrap();
    e.drain().await.unwrap();
    assert!(
        env.ledger.entries().unwrap().is_empty(),
        "a rejected action never runs"
    );
    // The agent drafted again (half the amount): a new gate, whose context carries the reason.
    let second = only_gate(e, run).await;
    assert_ne!(first, second);
    let view = e.get(run).await.unwrap();
    assert_eq!(
        view.state.gates[&second].context["previous_rejection"],
        json!("too much")
    );
    e.decide(run, DecisionRequest::reject(second, "still no", bob()))
        .await
        .unwrap();
    e.drain().await.unwrap();
    let third = only_gate(e, run).await;
    e.decide(run, DecisionRequest::reject(third, "no", bob()))
        .await
        .unwrap();
    e.drain().await.unwrap();
    let view = e.get(run).await.unwrap();
    assert_eq!(view.summary.status, RunStatus::Completed);
    let outcome: RefundOutcome = serde_json::from_value(view.state.output.unwrap()).unwrap();
    assert_eq!(
        outcome,
        RefundOutcome::GaveUp {
            last_reason: "no".into(),
            drafts: 3
        }
    );
    assert!(env.ledger.entries().unwrap().is_empty());
}

#[tokio::test]
async fn first_decision_wins_and_same_key_retry_is_a_no_op() {
    let env = env();
    let e = &env.engine;
    let run = e.start("refund", &big_refund(), None).await.unwrap();
    e.drain().await.unwrap();
    let gate = only_gate(e, run).await;
    let approve = DecisionRequest::approve(gate, bob()).idempotency_key("k1");
    let first = e.decide(run, approve.clone()).await.unwrap();
    assert!(matches!(first, Decided::Recorded(_)));
    // The same decision, same key: success, nothing new recorded.
    let again = e.decide(run, approve).await.unwrap();
    assert!(matches!(again, Decided::AlreadyRecorded(ref d) if d.seq == first.decision().unwrap().seq));
    // A different decision: conflict naming the recorded one.
    let err = e
        .decide(run, DecisionRequest::reject(gate, "no", Principal::new("eve")))
        .await
        .unwrap_err();
    match err {
        Error::DecisionConflict { recorded, .. } => {
            assert_eq!(recorded.decision, Decision::Approve);
            assert_eq!(recorded.by, bob());
        }
        other => panic!("expected a conflict, got {other}"),
    }
    let decisions = e
        .events(run)
        .await
        .unwrap()
        .iter()
        .filter(|ev| matches!(ev.event, EventKind::DecisionRecorded { .. }))
        .count();
    assert_eq!(decisions, 1);
}

#[tokio::test]
async fn concurrent_conflicting_decisions_record_exactly_one() {
    let env = env();
    let e = &env.engine;
    let run = e.start("refund", &big_refund(), None).await.unwrap();
    e.drain().await.unwrap();
    let gate = only_gate(e, run).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let e = e.clone();
        tasks.push(tokio::spawn(async move {
            let req = if i % 2 == 0 {
                DecisionRequest::approve(gate, Principal::new(format!("p{i}")))
            } else {
                DecisionRequest::reject(gate, format!("no {i}"), Principal::new(format!("p{i}")))
            };
            e.decide(run, req).await
        }));
    }
    let mut wins = 0;
    let mut conflicts = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(Decided::Recorded(_)) => wins += 1,
            Err(Error::DecisionConflict { .. }) => conflicts += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((wins, conflicts), (1, 15));
}

#[tokio::test]
async fn refused_decisions_leave_no_trace() {
    let env = env();
    let e = &env.engine;
    let run = e.start("refund", &big_refund(), None).await.unwrap();
    e.drain().await.unwrap();
    let gate = only_gate(e, run).await;
    let before = e.events(run).await.unwrap().len();

    let err = e
        .decide(run, DecisionRequest::respond(gate, json!("x"), bob()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::DecisionNotAllowed {
                kind: DecisionKind::Respond,
                ..
            }
        ),
        "{err}"
    );
    let err = e
        .decide(run, DecisionRequest::edit(gate, json!({"to": "x"}), bob()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidEdit { .. }), "{err}");
    let err = e
        .decide(run, DecisionRequest::reject(gate, "  ", bob()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidDecision(_)), "{err}");
    let err = e
        .decide(run, DecisionRequest::approve(GateId(99), bob()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownGate { .. }), "{err}");
    let err = e
        .decide(RunId::new(), DecisionRequest::approve(gate, bob()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownRun(_)), "{err}");

    assert_eq!(e.events(run).await.unwrap().len(), before);
    assert_eq!(e.pending(None, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn start_is_idempotent_by_key_and_validates_input() {
    let env = env();
    let e = &env.engine;
    let a = e.start("refund", &big_refund(), Some("req-1")).await.unwrap();
    let b = e.start("refund", &big_refund(), Some("req-1")).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(e.list(None, None, 100).await.unwrap().len(), 1);
    let mut other = big_refund();
    other.amount_cents = 1;
    let err = e.start("refund", &other, Some("req-1")).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Journal(holdpoint::journal::Error::StartConflict { .. })
        ),
        "{err}"
    );
    let err = e.start("refund", &json!({"nope": 1}), None).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    let err = e.start("no-such", &json!({}), None).await.unwrap_err();
    assert!(matches!(err, Error::UnknownWorkflow { .. }), "{err}");
}

#[tokio::test]
async fn small_refunds_need_no_approval() {
    let env = env();
    let e = &env.engine;
    let run = e
        .start(
            "refund",
            &RefundRequest {
                order_id: "B".into(),
                amount_cents: 900,
                reason: "late".into(),
            },
            None,
        )
        .await
        .unwrap();
    e.drain().await.unwrap();
    assert_eq!(e.get(run).await.unwrap().summary.status, RunStatus::Completed);
    assert_eq!(env.ledger.entries().unwrap().len(), 1);
}

// A question, a sleep, journaled values, and a step that fails then succeeds.
static FLAKY_CALLS: AtomicU32 = AtomicU32::new(0);

async fn assistant(ctx: Ctx, _: ()) -> Result<serde_json::Value, Failure> {
    let t0 = ctx.now().await;
    let id = ctx.uuid().await;
    let r = ctx.random().await;
    let answer = match ctx.ask::<String>("which table?").await? {
        Answer::Responded { value, by } => format!("{value} from {by}"),
        Answer::Declined { reason, .. } => format!("declined: {reason}"),
    };
    ctx.sleep(Duration::from_secs(3600)).await;
    let flaky = ctx
        .step("flaky", || async {
            if FLAKY_CALLS.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(Failure::retryable("first call fails"))
            } else {
                Ok(7)
            }
        })
        .retry(RetryPolicy::attempts(3).with_backoff(Duration::ZERO))
        .await?;
    Ok(json!({"t0": t0, "id": id, "r": r, "answer": answer, "flaky": flaky}))
}

#[tokio::test]
async fn ask_sleep_values_and_retries_replay_identically() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(chrono::Utc::now());
    let registry = Registry::new().workflow("assistant", 1, assistant);
    let e = Engine::builder(SledStore::open(dir.path()).unwrap(), registry.clone())
        .clock(clock.clone())
        .build()
        .unwrap();
    let run = e.start("assistant", &(), None).await.unwrap();
    e.drain().await.unwrap();
    let gate = only_gate(&e, run).await;
    let err = e
        .decide(run, DecisionRequest::approve(gate, bob()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::DecisionNotAllowed { .. }),
        "questions take respond, not approve"
    );
    e.decide(run, DecisionRequest::respond(gate, json!("orders"), bob()))
        .await
        .unwrap();
    e.drain().await.unwrap();
    // Sleeping: nothing happens until the clock passes the timer.
    let s = e.store().summary(run).await.unwrap().unwrap();
    assert_eq!(s.status, RunStatus::Waiting);
    assert_eq!(s.open_timers.len(), 1);
    assert_eq!(e.drain().await.unwrap(), 0);
    clock.advance(Duration::from_secs(3601));
    e.drain().await.unwrap();
    let view = e.get(run).await.unwrap();
    assert_eq!(view.summary.status, RunStatus::Completed, "{:?}", view.summary);
    let out = view.state.output.clone().unwrap();
    assert_eq!(out["answer"], json!("orders from bob"));
    assert_eq!(out["flaky"], json!(7));
    assert_eq!(FLAKY_CALLS.load(Ordering::SeqCst), 2);
    let flaky = view.state.steps.values().find(|s| s.name == "flaky").unwrap();
    assert_eq!(flaky.attempts, 2);

    // I3: re-running the code over the complete journal appends nothing and reaches
    // the same output (values, uuid and random come from the journal).
    let events = e.events(run).await.unwrap();
    assert_eq!(
        replay(&registry, &events).await,
        Replay::Consistent { would_append: vec![] }
    );
    assert_eq!(
        FLAKY_CALLS.load(Ordering::SeqCst),
        2,
        "replay never runs a step body"
    );
}

#[tokio::test]
async fn fold_of_every_prefix_agrees_with_the_index() {
    let env = env();
    let e = &env.engine;
    let run = e.start("refund", &big_refund(), None).await.unwrap();
    e.drain().await.unwrap();
    let gate = only_gate(e, run).await;
    e.decide(run, DecisionRequest::reject(gate, "no", bob()))
        .await
        .unwrap();
    e.drain().await.unwrap();
    let gate = only_gate(e, run).await;
    e.decide(run, DecisionRequest::approve(gate, bob()))
        .await
        .unwrap();
    e.drain().await.unwrap();
    let events = e.events(run).await.unwrap();
    // Replaying the store's index derivation over each prefix must agree with fold.
    let first = holdpoint::journal::NewRun {
        id: run,
        started_by: None,
        workflow: "refund".into(),
        version: 1,
        input: json!(null),
        idempotency_key: None,
        at: events[0].at,
    };
    let mut summary = holdpoint::journal::RunSummary::start(&first);
    for n in 1..=events.len() {
        summary.apply(&events[n - 1], Default::default());
        let st = fold(&events[..n]);
        // Folded by value (moved, not copied), the state is the same.
        assert_eq!(fold(events[..n].to_vec()), st, "prefix of {n} events, by value");
        assert_eq!(st.status, summary.status, "prefix of {n} events");
        let open: Vec<_> = st.open_gates().map(|g| g.gate).collect();
        assert_eq!(open, summary.open_gates, "prefix of {n} events");
        assert_eq!(st.next_seq, summary.next_seq);
    }
    let stored = e.store().summary(run).await.unwrap().unwrap();
    assert_eq!(stored.status, summary.status);
    assert_eq!(stored.open_gates, summary.open_gates);
}

#[tokio::test]
async fn cancel_closes_gates_and_stops_the_run() {
    let env = env();
    let e = &env.engine;
    let run = e.start("refund", &big_refund(), None).await.unwrap();
    e.drain().await.unwrap();
    let gate = only_gate(e, run).await;
    e.cancel(run, bob(), Some("customer withdrew".into()))
        .await
        .unwrap();
    assert!(e.pending(None, 10).await.unwrap().is_empty());
    assert_eq!(e.get(run).await.unwrap().summary.status, RunStatus::Cancelled);
    let err = e
        .decide(run, DecisionRequest::approve(gate, bob()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RunEnded(_)), "{err}");
    assert!(matches!(
        e.cancel(run, bob(), None).await.unwrap_err(),
        Error::RunEnded(_)
    ));
    e.drain().await.unwrap();
    assert!(env.ledger.entries().unwrap().is_empty());
}

// I9: a run stays on the version it started with.
async fn v1(ctx: Ctx, _: ()) -> Result<String, Failure> {
    let _ = ctx.gate("go", json!({}), json!(null)).await?;
    Ok("v1".into())
}
async fn v2(ctx: Ctx, _: ()) -> Result<String, Failure> {
    ctx.step("new first step", || async { Ok(()) }).await?;
    let _ = ctx.gate("go", json!({}), json!(null)).await?;
    Ok("v2".into())
}

#[tokio::test]
async fn paused_runs_keep_their_workflow_version() {
    let dir = tempfile::tempdir().unwrap();
    let old = {
        let e = Engine::new(
            SledStore::open(dir.path()).unwrap(),
            Registry::new().workflow("w", 1, v1),
        )
        .unwrap();
        let run = e.start("w", &(), None).await.unwrap();
        e.drain().await.unwrap();
        e.into_store().ok().unwrap().close().unwrap();
        run
    };
    // Deploy v2 alongside v1: the old run resumes on v1, new runs start on v2.
    let e = Engine::new(
        SledStore::open(dir.path()).unwrap(),
        Registry::new().workflow("w", 1, v1).workflow("w", 2, v2),
    )
    .unwrap();
    let new = e.start("w", &(), None).await.unwrap();
    e.drain().await.unwrap();
    for run in [old, new] {
        let gate = only_gate(&e, run).await;
        e.decide(run, DecisionRequest::approve(gate, bob()))
            .await
            .unwrap();
    }
    e.drain().await.unwrap();
    assert_eq!(e.get(old).await.unwrap().state.output, Some(json!("v1")));
    assert_eq!(e.get(new).await.unwrap().state.output, Some(json!("v2")));
}

#[tokio::test]
async fn an_unregistered_version_parks_the_run_as_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let run = {
        let e = Engine::new(
            SledStore::open(dir.path()).unwrap(),
            Registry::new().workflow("w", 1, v1),
        )
        .unwrap();
        let run = e.start("w", &(), None).await.unwrap();
        e.drain().await.unwrap();
        let gate = only_gate(&e, run).await;
        e.decide(run, DecisionRequest::approve(gate, bob()))
            .await
            .unwrap();
        e.into_store().ok().unwrap().close().unwrap();
        run
    };
    let e = Engine::new(
        SledStore::open(dir.path()).unwrap(),
        Registry::new().workflow("w", 2, v2),
    )
    .unwrap();
    e.drain().await.unwrap();
    let s = e.store().summary(run).await.unwrap().unwrap();
    assert_eq!(s.status, RunStatus::Stuck);
    assert!(s.stuck.unwrap().contains("version 1 is not registered"));
    assert_eq!(
        e.drain().await.unwrap(),
        0,
        "stuck runs are not retried in a loop"
    );
}

#[tokio::test]
async fn workers_wake_on_decisions_without_polling() {
    let env = env();
    let e = &env.engine;
    let workers = e.spawn_workers();
    let run = e.start("refund", &big_refund(), None).await.unwrap();
    let s = e.settled(run).await.unwrap();
    assert_eq!(s.status, RunStatus::Waiting);
    let gate = only_gate(e, run).await;
    e.decide(run, DecisionRequest::approve(gate, bob()))
        .await
        .unwrap();
    let s = e.settled(run).await.unwrap();
    assert_eq!(s.status, RunStatus::Completed);
    workers.shutdown().await;
    assert_eq!(env.ledger.entries().unwrap().len(), 1);
}

#[tokio::test]
async fn many_runs_with_concurrent_workers_complete_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Ledger::new(dir.path().join("ledger.jsonl")));
    let e = Engine::builder(
        SledStore::open(dir.path().join("data")).unwrap(),
        refund::register(Registry::new(), ledger.clone()),
    )
    .config(EngineConfig {
        concurrency: 8,
        ..EngineConfig::default()
    })
    .build()
    .unwrap();
    let workers = e.spawn_workers();
    let mut runs = Vec::new();
    for i in 0..40 {
        let mut req = big_refund();
        req.order_id = format!("O-{i}");
        runs.push(e.start("refund", &req, None).await.unwrap());
    }
    for &run in &runs {
        e.settled(run).await.unwrap();
        let gate = only_gate(&e, run).await;
        e.decide(run, DecisionRequest::approve(gate, bob()))
            .await
            .unwrap();
    }
    for &run in &runs {
        assert_eq!(e.settled(run).await.unwrap().status, RunStatus::Completed);
    }
    workers.shutdown().await;
    let paid = ledger.entries().unwrap();
    assert_eq!(paid.len(), 40);
    let keys: std::collections::BTreeSet<_> = paid.iter().map(|p| p.idempotency_key.clone()).collect();
    assert_eq!(keys.len(), 40);
    // No step completed twice anywhere.
    for &run in &runs {
        let mut seen = std::collections::BTreeSet::new();
        for ev in e.events(run).await.unwrap() {
            if let EventKind::StepCompleted { position, .. } = ev.event {
                assert!(seen.insert(position), "position {position} completed twice");
            }
        }
        assert!(seen.contains(&Position(0)));
    }
}

// Concurrent steps: positions are taken in call order, so replay is deterministic
// whatever order the bodies finish in.
async fn fan_out(ctx: Ctx, _: ()) -> Result<Vec<u32>, Failure> {
    let (a, b, c) = futures::join!(
        ctx.step("a", || async {
            tokio::task::yield_now().await;
            Ok(1u32)
        }),
        ctx.step("b", || async { Ok(2u32) }),
        ctx.step("c", || async {
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            Ok(3u32)
        }),
    );
    let g = ctx.gate("go", json!({"sum": a? + b? + c?}), json!(null)).await?;
    let (d, e) = futures::join!(
        ctx.step("d", || async { Ok(4u32) }),
        ctx.step("e", || async { Ok(5u32) })
    );
    Ok(vec![g.into_args().map(|_| 0).unwrap_or(9), d?, e?])
}

#[tokio::test]
async fn joined_steps_take_positions_in_call_order_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::new().workflow("fan", 1, fan_out);
    let e = Engine::new(SledStore::open(dir.path()).unwrap(), registry.clone()).unwrap();
    let run = e.start("fan", &(), None).await.unwrap();
    e.drain().await.unwrap();
    let view = e.get(run).await.unwrap();
    let names: Vec<_> = view
        .state
        .steps
        .iter()
        .map(|(p, s)| (p.0, s.name.clone()))
        .collect();
    assert_eq!(names, vec![(0, "a".into()), (1, "b".into()), (2, "c".into())]);
    let gate = only_gate(&e, run).await;
    assert_eq!(gate, GateId(3));
    assert_eq!(view.state.gates[&gate].args, json!({"sum": 6}));
    e.decide(run, DecisionRequest::approve(gate, bob()))
        .await
        .unwrap();
    e.drain().await.unwrap();
    let view = e.get(run).await.unwrap();
    assert_eq!(view.state.output, Some(json!([0, 4, 5])));
    assert_eq!(view.state.steps[&Position(4)].name, "d");
    assert_eq!(
        replay(&registry, &e.events(run).await.unwrap()).await,
        Replay::Consistent { would_append: vec![] }
    );
}

static TERMINAL_CALLS: AtomicU32 = AtomicU32::new(0);

async fn declines(ctx: Ctx, _: ()) -> Result<(), Failure> {
    ctx.step("charge", || async {
        TERMINAL_CALLS.fetch_add(1, Ordering::SeqCst);
        Err::<(), _>(Failure::terminal("card declined"))
    })
    .retry(RetryPolicy::attempts(5).with_backoff(Duration::ZERO))
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_terminal_failure_is_not_retried_and_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::new(
        SledStore::open(dir.path()).unwrap(),
        Registry::new().workflow("declines", 1, declines),
    )
    .unwrap();
    let run = e.start("declines", &(), None).await.unwrap();
    e.drain().await.unwrap();
    let view = e.get(run).await.unwrap();
    assert_eq!(view.summary.status, RunStatus::Failed);
    assert_eq!(view.state.error.as_deref(), Some("card declined"));
    assert_eq!(TERMINAL_CALLS.load(Ordering::SeqCst), 1);
    let failed: Vec<_> = view
        .state
        .steps
        .values()
        .map(|s| (s.attempts, s.done, s.error.clone()))
        .collect();
    assert_eq!(failed, vec![(1, true, Some("card declined".to_string()))]);
}

async fn naps(ctx: Ctx, _: ()) -> Result<u32, Failure> {
    ctx.sleep(Duration::from_secs(24 * 3600)).await;
    ctx.step("after", || async { Ok(1u32) }).await
}

#[tokio::test]
async fn running_workers_fire_a_due_timer_and_waiting_runs_hold_no_lease() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(chrono::Utc::now());
    let e = Engine::builder(
        SledStore::open(dir.path()).unwrap(),
        Registry::new().workflow("naps", 1, naps),
    )
    .clock(clock.clone())
    .build()
    .unwrap();
    let workers = e.spawn_workers();
    let run = e.start("naps", &(), None).await.unwrap();
    let s = e.settled(run).await.unwrap();
    assert_eq!(s.status, RunStatus::Waiting);
    assert!(
        !e.store().is_leased(run).await.unwrap(),
        "a sleeping run holds no lease"
    );
    // A day passes (on the test's clock): the worker's timer fires, no polling.
    clock.advance(Duration::from_secs(24 * 3600 + 1));
    let s = e.settled(run).await.unwrap();
    assert_eq!(s.status, RunStatus::Completed);
    workers.shutdown().await;
}

/// A shutdown that awaits a task may move on while that task is still dropping its
/// engine handle; `into_store_when_released` waits for the drop instead of failing.
#[tokio::test]
async fn the_store_comes_back_once_the_last_handle_is_dropped() {
    let env = env();
    let held = env.engine.clone();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let holder = tokio::spawn(async move {
        released.await.unwrap();
        drop(held);
    });
    let engine = env.engine.clone();
    drop(env.engine);
    let engine = match engine.into_store() {
        Ok(_) => panic!("the store came back while a handle was alive"),
        Err(engine) => engine,
    };
    let waiting = tokio::spawn(engine.into_store_when_released());
    // One turn of this single-threaded runtime: the waiter looks, finds the held handle
    // and parks.
    tokio::task::yield_now().await;
    assert!(
        !waiting.is_finished(),
        "the store came back while a handle was alive"
    );
    release.send(()).unwrap();
    // The timeout only elapses if the drop was missed.
    let store = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the wait saw the last handle dropped")
        .unwrap();
    holder.await.unwrap();
    store.close().unwrap();
}

/// A gate opened in this activation, decided while a step beside it still runs: the
/// step's append meets the decision, which must be taken in and answer the gate.
#[tokio::test]
async fn a_gate_decided_while_a_step_beside_it_runs_is_answered_in_the_same_activation() {
    let dir = tempfile::tempdir().unwrap();
    let started = Arc::new(tokio::sync::Notify::new());
    let go = Arc::new(tokio::sync::Notify::new());
    let (s, g) = (started.clone(), go.clone());
    let registry = Registry::new().workflow("side", 1, move |ctx: Ctx, _: ()| {
        let (started, go) = (s.clone(), g.clone());
        async move {
            let (gated, slow) = futures::join!(
                ctx.gate("send", json!({"to": "x"}), json!(null)),
                ctx.step("slow", move || {
                    let (started, go) = (started.clone(), go.clone());
                    async move {
                        started.notify_one();
                        go.notified().await;
                        Ok(7u32)
                    }
                })
            );
            let approved = matches!(gated?, Gated::Approved { .. });
            Ok(json!({"approved": approved, "slow": slow?}))
        }
    });
    let e = Engine::new(SledStore::open(dir.path()).unwrap(), registry).unwrap();
    let workers = e.spawn_workers();
    let run = e.start("side", &(), None).await.unwrap();
    // The step's start is durable before its body runs, and the gate's request with it.
    started.notified().await;
    e.decide(run, DecisionRequest::approve(GateId(0), bob()))
        .await
        .unwrap();
    go.notify_one();
    let s = e.settled(run).await.unwrap();
    workers.shutdown().await;
    assert_eq!(s.status, RunStatus::Completed, "{s:?}");
    let view = e.get(run).await.unwrap();
    assert_eq!(view.state.output, Some(json!({"approved": true, "slow": 7})));
    // The decision answered the waiting gate at once: no second activation to replay.
    assert_eq!(e.metrics().activations.load(Ordering::Relaxed), 1);
}

/// A vote at a gate that needs two approvals, recorded while a step beside the gate
/// runs: the step's append meets the vote and must take it in, not give the run up.
/// Given up, the step's completion was never written and the step ran again.
#[tokio::test]
async fn a_vote_recorded_while_a_step_beside_its_gate_runs_loses_nothing() {
    use holdpoint::journal::{GateSpec, Verdict};
    use holdpoint::{Policy, Rule};
    let dir = tempfile::tempdir().unwrap();
    let started = Arc::new(tokio::sync::Notify::new());
    let go = Arc::new(tokio::sync::Notify::new());
    let slow_runs = Arc::new(AtomicU32::new(0));
    let paid = Arc::new(AtomicU32::new(0));
    let (s, g, n, p) = (started.clone(), go.clone(), slow_runs.clone(), paid.clone());
    let registry = Registry::new().workflow("vote", 1, move |ctx: Ctx, _: ()| {
        let (started, go, slow_runs, paid) = (s.clone(), g.clone(), n.clone(), p.clone());
        async move {
            // The step first: it takes its position before the action's three (policy,
            // gate, step), in the first activation and in the replay after the decision.
            let (slow, acted) = futures::join!(
                ctx.step("slow", move || {
                    let (started, go, slow_runs) = (started.clone(), go.clone(), slow_runs.clone());
                    async move {
                        // Held only the first time: a second run of the body is the bug.
                        if slow_runs.fetch_add(1, Ordering::SeqCst) == 0 {
                            started.notify_one();
                            go.notified().await;
                        }
                        Ok(7u32)
                    }
                }),
                ctx.act("send_money", json!({"to": "x"})).run(|_args| {
                    let paid = paid.clone();
                    async move {
                        paid.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    }
                })
            );
            acted?;
            slow
        }
    });
    let policy = Policy::new(Verdict::RequireApproval).rule(
        Rule::new("two", "send_money", Verdict::RequireApproval).gate(GateSpec {
            quorum: 2,
            ..GateSpec::default()
        }),
    );
    let e = Engine::builder(SledStore::open(dir.path()).unwrap(), registry)
        .policy(policy)
        .build()
        .unwrap();
    let workers = e.spawn_workers();
    let mut changes = e.store().changes();
    let run = e.start("vote", &(), None).await.unwrap();
    started.notified().await;
    // The gate's request reaches the inbox while the step beside it still runs.
    let appears = async {
        loop {
            changes.borrow_and_update();
            if let Some(open) = e.pending(None, 10).await.unwrap().first() {
                return open.gate;
            }
            changes.changed().await.unwrap();
        }
    };
    // A bound, not a wait: the request is appended before the step's body is let go.
    let gate = tokio::time::timeout(Duration::from_secs(60), appears)
        .await
        .expect("the gate's request reached the inbox while the step beside it ran");
    let voted = e
        .decide(run, DecisionRequest::approve(gate, bob()))
        .await
        .unwrap();
    assert!(matches!(voted, Decided::Voted { .. }), "{voted:?}");
    go.notify_one();
    // The run pauses at the gate again, with the step's result written.
    let s = e.settled(run).await.unwrap();
    assert_eq!(s.status, RunStatus::Waiting, "{s:?}");
    let completed = e
        .events(run)
        .await
        .unwrap()
        .into_iter()
        .filter(|ev| matches!(ev.event, EventKind::StepCompleted { .. }))
        .count();
    assert_eq!(completed, 1, "the step's completion is in the journal");
    e.decide(run, DecisionRequest::approve(gate, Principal::new("carol")))
        .await
        .unwrap();
    let s = e.settled(run).await.unwrap();
    workers.shutdown().await;
    assert_eq!(s.status, RunStatus::Completed, "{s:?}");
    assert_eq!(slow_runs.load(Ordering::SeqCst), 1, "the step ran once");
    assert_eq!(paid.load(Ordering::SeqCst), 1);
}

type Bodies = Arc<std::sync::Mutex<Vec<String>>>;

/// A gate that must be approved for the code to go on.
async fn go(ctx: &Ctx) -> Result<(), Failure> {
    match ctx.gate("go", json!({}), json!(null)).await? {
        Gated::Approved { .. } => Ok(()),
        other => Err(Failure::terminal(format!("not approved: {other:?}"))),
    }
}

/// A step that notes each run of its body.
async fn fetch(ctx: &Ctx, bodies: &Bodies, url: &str) -> Result<String, Failure> {
    let (bodies, url) = (bodies.clone(), url.to_string());
    ctx.step("fetch", move || {
        let (bodies, url) = (bodies.clone(), url.clone());
        async move {
            bodies.lock().unwrap().push(url.clone());
            Ok(url)
        }
    })
    .await
}

/// `join!(async { gate; fetch("one") }, fetch("two"))`.
fn gate_beside_a_step(bodies: &Bodies) -> Registry {
    let b = bodies.clone();
    Registry::new().workflow("branches", 1, move |ctx: Ctx, _: ()| {
        let bodies = b.clone();
        async move {
            let (after_gate, beside) = futures::join!(
                async {
                    go(&ctx).await?;
                    fetch(&ctx, &bodies, "one").await
                },
                fetch(&ctx, &bodies, "two")
            );
            Ok(json!({"after_gate": after_gate?, "beside": beside?}))
        }
    })
}

/// The run completed with `output`, each step body ran once (in `order`), and the code
/// replays over its journal without appending.
async fn completed_once(
    e: &Engine<SledStore>,
    run: RunId,
    registry: &Registry,
    bodies: &Bodies,
    output: serde_json::Value,
    order: &[&str],
) {
    let view = e.get(run).await.unwrap();
    assert_eq!(view.summary.status, RunStatus::Completed, "{:?}", view.summary);
    assert_eq!(view.state.output, Some(output));
    assert_eq!(*bodies.lock().unwrap(), order, "each body ran once");
    assert_eq!(
        replay(registry, &e.events(run).await.unwrap()).await,
        Replay::Consistent { would_append: vec![] }
    );
}

/// A call made after a gate within one branch of `join!`, where the other branch took
/// the next position while the gate waited. Replay must hand the gate's decision out
/// only once that position is taken again, or the branch after the gate takes it: with
/// a step of the same name there, it would read the other branch's output and the
/// other branch's step would run a second time.
#[tokio::test]
async fn a_call_after_a_gate_in_a_joined_branch_replays_at_its_own_position() {
    let dir = tempfile::tempdir().unwrap();
    let bodies: Bodies = Arc::default();
    let registry = gate_beside_a_step(&bodies);
    let e = Engine::new(SledStore::open(dir.path()).unwrap(), registry.clone()).unwrap();
    let run = e.start("branches", &(), None).await.unwrap();
    e.drain().await.unwrap();
    let gate = only_gate(&e, run).await;
    e.decide(run, DecisionRequest::approve(gate, bob()))
        .await
        .unwrap();
    e.drain().await.unwrap();
    completed_once(
        &e,
        run,
        &registry,
        &bodies,
        json!({"after_gate": "one", "beside": "two"}),
        &["two", "one"],
    )
    .await;
}

/// The example the known limit gave: an action (policy, gate, step) joined with a step,
/// the gate decided between activations. Replayed with every result handed out at
/// once, the action's step took the other step's position and the run was parked as
/// nondeterministic.
#[tokio::test]
async fn an_action_joined_with_a_step_resumes_after_its_decision() {
    use holdpoint::journal::Verdict;
    use holdpoint::Policy;
    let dir = tempfile::tempdir().unwrap();
    let bodies: Bodies = Arc::default();
    let b = bodies.clone();
    let registry = Registry::new().workflow("act_and_step", 1, move |ctx: Ctx, _: ()| {
        let bodies = b.clone();
        async move {
            let paid = bodies.clone();
            let (acted, beside) = futures::join!(
                ctx.act("send_money", json!({"to": "x"})).run(move |_args| {
                    let paid = paid.clone();
                    async move {
                        paid.lock().unwrap().push("send_money".into());
                        Ok(1u32)
                    }
                }),
                fetch(&ctx, &bodies, "beside")
            );
            let sent = match acted? {
                holdpoint::Acted::Done { output, .. } => output,
                other => return Err(Failure::terminal(format!("{other:?}"))),
            };
            Ok(json!({"sent": sent, "beside": beside?}))
        }
    });
    let e = Engine::builder(SledStore::open(dir.path()).unwrap(), registry.clone())
        .policy(Policy::new(Verdict::RequireApproval))
        .build()
        .unwrap();
    let run = e.start("act_and_step", &(), None).await.unwrap();
    e.drain().await.unwrap();
    let gate = only_gate(&e, run).await;
    e.decide(run, DecisionRequest::approve(gate, bob()))
        .await
        .unwrap();
    e.drain().await.unwrap();
    completed_once(
        &e,
        run,
        &registry,
        &bodies,
        json!({"sent": 1, "beside": "beside"}),
        &["beside", "send_money"],
    )
    .await;
}

/// A timer that fires at the start of an activation, in a branch joined with a step
/// that ran while it slept: the call after the timer waits until the replay has taken
/// the step's position again, as it went on only after it live.
#[tokio::test]
async fn a_call_after_a_timer_in_a_joined_branch_replays_at_its_own_position() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(chrono::Utc::now());
    let bodies: Bodies = Arc::default();
    let b = bodies.clone();
    let registry = Registry::new().workflow("sleeps", 1, move |ctx: Ctx, _: ()| {
        let bodies = b.clone();
        async move {
            let (after_sleep, beside) = futures::join!(
                async {
                    ctx.sleep(Duration::from_secs(60)).await;
                    fetch(&ctx, &bodies, "one").await
                },
                fetch(&ctx, &bodies, "two")
            );
            Ok(json!({"after_sleep": after_sleep?, "beside": beside?}))
        }
    });
    let e = Engine::builder(SledStore::open(dir.path()).unwrap(), registry.clone())
        .clock(clock.clone())
        .build()
        .unwrap();
    let run = e.start("sleeps", &(), None).await.unwrap();
    e.drain().await.unwrap();
    assert_eq!(
        e.store().summary(run).await.unwrap().unwrap().status,
        RunStatus::Waiting
    );
    clock.advance(Duration::from_secs(61));
    e.drain().await.unwrap();
    completed_once(
        &e,
        run,
        &registry,
        &bodies,
        json!({"after_sleep": "one", "beside": "two"}),
        &["two", "one"],
    )
    .await;
}

/// A decision that lands while the run is driven, taken in by the append of a branch
/// that has just gone on from its own step: the gate's branch goes on after that
/// branch's next position, not at the decision's seq. Replay must see where
/// (`gate-resumed`): handed out at the decision's seq, the gate's branch would be
/// ready together with that branch, go first, and take its position.
#[tokio::test]
async fn a_decision_taken_in_while_the_run_is_driven_is_replayed_where_it_was_taken() {
    let dir = tempfile::tempdir().unwrap();
    let (started_x, go_x) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let (started_y, go_y) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let held = |started: &Arc<tokio::sync::Notify>, go: &Arc<tokio::sync::Notify>| {
        let (started, go) = (started.clone(), go.clone());
        move || {
            let (started, go) = (started.clone(), go.clone());
            async move {
                started.notify_one();
                go.notified().await;
                Ok(0u32)
            }
        }
    };
    let (x, y) = (held(&started_x, &go_x), held(&started_y, &go_y));
    let registry = Registry::new().workflow("three", 1, move |ctx: Ctx, _: ()| {
        let (x, y) = (x.clone(), y.clone());
        async move {
            let (a, b, c) = futures::join!(
                async {
                    go(&ctx).await?;
                    ctx.step("after_gate", || async { Ok(1u32) }).await
                },
                async {
                    ctx.step("x1", x).await?;
                    ctx.step("x2", || async { Ok(2u32) }).await
                },
                ctx.step("y1", y)
            );
            Ok(json!([a?, b?, c?]))
        }
    });
    let e = Engine::new(SledStore::open(dir.path()).unwrap(), registry.clone()).unwrap();
    let workers = e.spawn_workers();
    let run = e.start("three", &(), None).await.unwrap();
    started_x.notified().await;
    started_y.notified().await;
    e.decide(run, DecisionRequest::approve(GateId(0), bob()))
        .await
        .unwrap();
    // x1 ends, x2 starts (its append takes the decision in), the gate's branch goes on.
    go_x.notify_one();
    let mut changes = e.store().changes();
    // The step after the gate starts (its start is durable before its body runs) while
    // y1 still runs.
    let after_gate_started = async {
        loop {
            changes.borrow_and_update();
            let events = e.events(run).await.unwrap();
            let started = events.iter().any(
                |ev| matches!(&ev.event, EventKind::StepStarted { position, .. } if *position == Position(4)),
            );
            if started {
                return events;
            }
            changes.changed().await.unwrap();
        }
    };
    // A bound, not a wait: the gate's branch goes on as soon as the decision is in.
    let events = tokio::time::timeout(Duration::from_secs(60), after_gate_started)
        .await
        .expect("the gate's branch went on in the same activation");
    go_y.notify_one();
    let s = e.settled(run).await.unwrap();
    workers.shutdown().await;
    assert_eq!(s.status, RunStatus::Completed, "{s:?}");
    let view = e.get(run).await.unwrap();
    assert_eq!(view.state.output, Some(json!([1, 2, 0])));
    let names: Vec<_> = view
        .state
        .steps
        .iter()
        .map(|(p, s)| (p.0, s.name.as_str()))
        .collect();
    assert_eq!(names, vec![(1, "x1"), (2, "y1"), (3, "x2"), (4, "after_gate")]);
    let at = |pred: fn(&EventKind) -> bool| events.iter().position(|ev| pred(&ev.event));
    let taken_in = at(|e| matches!(e, EventKind::DecisionTakenIn { .. })).expect("taking it in is journaled");
    let resumed =
        at(|e| matches!(e, EventKind::GateResumed { .. })).expect("the point it was taken is journaled");
    assert!(taken_in < resumed);
    assert_eq!(e.metrics().activations.load(Ordering::Relaxed), 1);
    let events = e.events(run).await.unwrap();
    assert_eq!(
        replay(&registry, &events).await,
        Replay::Consistent { would_append: vec![] }
    );
    // A crash before `gate-resumed` was written leaves the decision, then events written
    // before the code took it: replay must not hand it out at the decision's own seq.
    // (The check stops at the first append it refuses, so what it would write is not all
    // of what the next activation writes.)
    let cut = replay(&registry, &events[..resumed]).await;
    assert!(
        matches!(cut, Replay::Consistent { .. }),
        "the journal cut before gate-resumed does not replay: {cut:?}"
    );
}

/// Code that no longer makes a call the journal records, while another call waits for
/// it to be taken: the run is nondeterministic, not left waiting for ever.
#[tokio::test]
async fn a_call_waiting_for_a_position_no_branch_takes_is_nondeterminism() {
    let dir = tempfile::tempdir().unwrap();
    let bodies: Bodies = Arc::default();
    let registry = gate_beside_a_step(&bodies);
    let e = Engine::new(SledStore::open(dir.path()).unwrap(), registry).unwrap();
    let run = e.start("branches", &(), None).await.unwrap();
    e.drain().await.unwrap();
    let gate = only_gate(&e, run).await;
    e.decide(run, DecisionRequest::approve(gate, bob()))
        .await
        .unwrap();
    // The same workflow without the branch beside the gate.
    let changed = Registry::new().workflow("branches", 1, move |ctx: Ctx, _: ()| async move {
        go(&ctx).await?;
        let one = ctx.step("fetch", || async { Ok("one".to_string()) }).await?;
        Ok(json!({"after_gate": one}))
    });
    match replay(&changed, &e.events(run).await.unwrap()).await {
        Replay::Nondeterministic(nd) => {
            assert_eq!(nd.position, Position(1), "{nd:?}");
            assert!(nd.expected.contains("fetch"), "{nd:?}");
        }
        other => panic!("expected nondeterminism, got {other:?}"),
    }
}

/// A number a step returned is replayed as the same f64 the live run saw, and an action
/// whose args carry it is approved and run after the activation that replays it: the
/// replayed call asks with the args the reviewer approved (their hash is the same), so
/// it runs, once, with those args. serde_json's default float parser reads this number
/// one unit in the last place off.
#[tokio::test]
async fn a_float_a_step_returned_replays_exactly_and_its_action_runs_once_approved() {
    use holdpoint::journal::Verdict;
    use holdpoint::Policy;
    const MEASURED: f64 = 130.65331632653061;
    let dir = tempfile::tempdir().unwrap();
    let bodies: Bodies = Arc::default();
    let b = bodies.clone();
    let registry = Registry::new().workflow("measure_and_pay", 1, move |ctx: Ctx, _: ()| {
        let bodies = b.clone();
        async move {
            let measured: f64 = ctx.step("measure", || async { Ok(MEASURED) }).await?;
            let paid = bodies.clone();
            let acted = ctx
                .act("send_money", json!({ "amount": measured }))
                .run(move |args| {
                    let paid = paid.clone();
                    async move {
                        paid.lock()
                            .unwrap()
                            .push(format!("send_money {}", args["amount"]));
                        Ok(args["amount"].clone())
                    }
                })
                .await?;
            match acted {
                holdpoint::Acted::Done { output, .. } => Ok(json!({ "measured": measured, "sent": output })),
                other => Err(Failure::terminal(format!("{other:?}"))),
            }
        }
    });
    let e = Engine::builder(SledStore::open(dir.path()).unwrap(), registry.clone())
        .policy(Policy::new(Verdict::RequireApproval))
        .build()
        .unwrap();
    let run = e.start("measure_and_pay", &(), None).await.unwrap();
    e.drain().await.unwrap();
    let pending = e.pending(None, 10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        pending[0].args["amount"].as_f64().map(f64::to_bits),
        Some(MEASURED.to_bits())
    );
    e.decide(
        run,
        DecisionRequest::approve(pending[0].gate, bob()).request_hash(pending[0].request_hash.clone()),
    )
    .await
    .unwrap();
    e.drain().await.unwrap();
    let view = e.get(run).await.unwrap();
    assert_eq!(view.summary.status, RunStatus::Completed, "{:?}", view.summary);
    let out = view.state.output.clone().unwrap();
    for key in ["measured", "sent"] {
        assert_eq!(
            out[key].as_f64().map(f64::to_bits),
            Some(MEASURED.to_bits()),
            "{key}: {out}"
        );
    }
    assert_eq!(*bodies.lock().unwrap(), vec![format!("send_money {MEASURED}")]);
    let events = e.events(run).await.unwrap();
    assert_eq!(
        replay(&registry, &events).await,
        Replay::Consistent { would_append: vec![] }
    );
}
