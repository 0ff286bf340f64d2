//! The test kit, as a workflow author uses it — and workflows it must catch.

use holdpoint::journal::{GateSpec, RunStatus, TimeoutOutcome, Verdict};
use holdpoint::prelude::*;
use holdpoint::testing::*;
use holdpoint::workflows::refund::{self, RefundRequest};
use holdpoint::workflows::Ledger;
use holdpoint::{Policy, Rule};
use proptest::prelude::*;
use serde_json::json;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

fn ledger() -> (tempfile::TempDir, Arc<Ledger>) {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Ledger::new(dir.path().join("ledger.jsonl")));
    (dir, ledger)
}

#[test]
fn the_refund_agent_replays_deterministically_under_crashes_and_decisions() {
    let (_dir, ledger) = ledger();
    let input = (1u64..500_000, "[A-Z]-[0-9]{1,4}").prop_map(|(amount_cents, order_id)| RefundRequest {
        order_id,
        amount_cents,
        reason: "damaged".into(),
    });
    check_replay(refund::register(Registry::new(), ledger), "refund", input);
}

/// Runs `check_replay` and returns its failure message (it must fail).
fn failure_of(registry: Registry, workflow: &str) -> String {
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check_replay(registry, workflow, Just(()));
    }));
    let payload = caught.expect_err("check_replay must catch this workflow");
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

// Branches on wall-clock time: a replay at another instant takes the other branch.
async fn wall_clock(ctx: Ctx, _: ()) -> Result<(), Failure> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let name = if nanos % 2 == 0 { "even" } else { "odd" };
    ctx.step(name, || async { Ok(()) }).await?;
    Ok(())
}

// Iterates a HashMap: each map has its own random order.
async fn hashmap_order(ctx: Ctx, _: ()) -> Result<(), Failure> {
    ctx.step("setup", || async { Ok(()) }).await?;
    let tasks: HashMap<&str, u32> = [("email", 1), ("invoice", 2)].into();
    for name in tasks.keys() {
        ctx.step(name, || async { Ok(()) }).await?;
    }
    Ok(())
}

// Draws a random number outside a step (instead of `ctx.random()`).
async fn unrecorded_random(ctx: Ctx, _: ()) -> Result<(), Failure> {
    ctx.step("fetch", || async { Ok(()) }).await?;
    ctx.step("plan", || async { Ok(()) }).await?;
    let coin = std::collections::hash_map::RandomState::new().hash_one(0u8) % 2;
    let _ = ctx
        .gate(if coin == 0 { "heads" } else { "tails" }, json!({}), json!(null))
        .await?;
    Ok(())
}

#[test]
fn branching_on_wall_clock_time_is_caught_at_its_position() {
    let msg = failure_of(Registry::new().workflow("w", 1, wall_clock), "w");
    // Caught by replay (HP-ND01) or, when a crash came first, as a journal difference.
    assert!(msg.contains("HP-ND01") || msg.contains("differs"), "{msg}");
    assert!(msg.contains("at position 0"), "{msg}");
    assert!(msg.contains("even") && msg.contains("odd"), "{msg}");
    assert!(msg.contains("shrunk case"), "{msg}");
}

#[test]
fn hashmap_iteration_order_is_caught_at_its_position() {
    let msg = failure_of(Registry::new().workflow("w", 1, hashmap_order), "w");
    assert!(msg.contains("HP-ND01") || msg.contains("differs"), "{msg}");
    assert!(msg.contains("at position 1"), "{msg}");
}

#[test]
fn an_unrecorded_random_number_is_caught_at_its_position() {
    let msg = failure_of(Registry::new().workflow("w", 1, unrecorded_random), "w");
    assert!(msg.contains("HP-ND01") || msg.contains("differs"), "{msg}");
    assert!(msg.contains("at position 2"), "{msg}");
    assert!(msg.contains("heads") && msg.contains("tails"), "{msg}");
}

#[tokio::test]
async fn replay_journal_checks_an_exported_journal_against_changed_code() {
    let (dir, ledger) = ledger();
    let registry = refund::register(Registry::new(), ledger.clone());
    let mut env = TestEnv::new(registry.clone());
    let run = env
        .start(
            "refund",
            &RefundRequest {
                order_id: "J-1".into(),
                amount_cents: 30_000,
                reason: "broken".into(),
            },
        )
        .await
        .unwrap();
    let done = env.run_to_end(run, &Reviewer::approve_all()).await.unwrap();
    assert_eq!(done.status, RunStatus::Completed);
    let path = dir.path().join("journal.jsonl");
    let lines: Vec<String> = done
        .events
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();

    replay_journal(&registry, &path)
        .await
        .expect("unchanged code replays");

    // The same workflow name with its first step renamed.
    async fn changed(ctx: Ctx, _: RefundRequest) -> Result<(), Failure> {
        ctx.step("lookup_order_v2", || async { Ok(()) }).await?;
        Ok(())
    }
    let err = replay_journal(&Registry::new().workflow("refund", 1, changed), &path)
        .await
        .unwrap_err();
    assert!(err.0.contains("at position 0"), "{err}");
    assert!(err.0.contains(r#"- journal: step "lookup_order""#), "{err}");
    assert!(err.0.contains(r#"+ code:    step "lookup_order_v2""#), "{err}");

    std::fs::write(&path, "not json\n").unwrap();
    let err = replay_journal(&registry, &path).await.unwrap_err();
    assert!(err.0.contains("line 1: not an event"), "{err}");
}

#[tokio::test]
async fn the_scripted_reviewer_and_the_clock_drive_gates_deadlines_and_timers() {
    let (_dir, ledger) = ledger();
    // A policy whose gates time out after an hour, default-safe (reject).
    let policy = Policy::new(Verdict::RequireApproval).rule(
        Rule::new("slow", "send_money", Verdict::RequireApproval).gate(GateSpec {
            levels: vec![holdpoint::journal::ApproverLevel {
                roles: vec![],
                timeout_secs: Some(3600),
            }],
            on_timeout: TimeoutOutcome::Reject,
            ..GateSpec::default()
        }),
    );
    async fn napper(ctx: Ctx, _: ()) -> Result<String, Failure> {
        ctx.sleep(Duration::from_secs(86_400)).await;
        let answer: holdpoint::Answer<String> = ctx.ask("which region?").await?;
        let acted = ctx
            .act("send_money", json!({"amount_cents": 5}))
            .run(|_args: serde_json::Value| async { Ok(()) })
            .await?;
        Ok(format!("{answer:?} / {acted:?}"))
    }
    let registry = refund::register(Registry::new(), ledger).workflow("napper", 1, napper);
    let mut env = TestEnv::with_policy(registry, policy);
    let t0 = holdpoint::Clock::now(env.clock());

    // Rejecting refunds over 100.00, editing the rest down; answering questions.
    let reviewer = Reviewer::default()
        .reject_if("too much", |g| {
            g.args["amount_cents"].as_u64().unwrap_or(0) > 100_000
        })
        .edit("send_money", |args| {
            let mut a = args.clone();
            a["amount_cents"] = json!(12_345);
            a
        })
        .respond(|_| json!("eu-west"));
    let big = env
        .start(
            "refund",
            &RefundRequest {
                order_id: "B".into(),
                amount_cents: 900_000,
                reason: "x".into(),
            },
        )
        .await
        .unwrap();
    let done = env.run_to_end(big, &reviewer).await.unwrap();
    assert_eq!(
        done.output.unwrap()["outcome"],
        "refunded",
        "the agent drafted smaller refunds until one was edited"
    );
    assert!(env.executions().iter().any(|e| e.position.0 > 0));

    // The nap and the deadline pass on the test's clock, instantly.
    let run = env.start("napper", &()).await.unwrap();
    let done = env
        .run_to_end(run, &Reviewer::approve_all().respond(|_| json!("eu-west")))
        .await;
    let done = done.unwrap();
    assert_eq!(done.status, RunStatus::Completed);
    let out = done.output.unwrap().as_str().unwrap().to_string();
    assert!(out.contains("eu-west"), "{out}");
    let elapsed = holdpoint::Clock::now(env.clock()) - t0;
    assert!(
        elapsed >= chrono::Duration::seconds(86_400),
        "the clock moved a day: {elapsed}"
    );

    // Nobody decides the payment gate: its deadline passes on the test's clock and the
    // default-safe outcome (reject, "timed out") is recorded by the system.
    let run = env.start("napper", &()).await.unwrap();
    let mut seen_gate = false;
    for _ in 0..100 {
        env.engine().drain().await.unwrap();
        let pending = env.engine().pending(None, 10).await.unwrap();
        if let Some(g) = pending.iter().find(|g| g.run == run) {
            if g.action == "ask" {
                env.engine()
                    .decide(
                        run,
                        DecisionRequest::respond(g.gate, json!("eu"), Principal::new("r")),
                    )
                    .await
                    .unwrap();
                continue;
            }
            seen_gate = true;
            env.advance(Duration::from_secs(3601));
            continue;
        }
        if env
            .engine()
            .store()
            .summary(run)
            .await
            .unwrap()
            .unwrap()
            .status
            .is_terminal()
        {
            break;
        }
        env.advance(Duration::from_secs(86_401));
    }
    assert!(seen_gate);
    let state = holdpoint::fold(env.engine().events(run).await.unwrap());
    let out = state.output.unwrap().as_str().unwrap().to_string();
    assert!(out.contains("Rejected") && out.contains("timed out"), "{out}");
    // A restart on the same store picks up where it was.
    env.restart(None);
    assert_eq!(
        env.engine().get(run).await.unwrap().summary.status,
        RunStatus::Completed
    );
}
