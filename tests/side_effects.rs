//! Side effects across a crash between a step's effect and its `step-completed`: with a
//! deduplicating tool the effect happens once; an at-most-once step is never re-run, and
//! the run waits for a person to say what became of it.

use holdpoint::journal::{Decision, EventKind, RunStatus};
use holdpoint::prelude::*;
use holdpoint::testing::TestEnv;
use holdpoint::OUTCOME_UNKNOWN;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// An external system: counts calls per idempotency key, and effects.
#[derive(Default)]
struct Tool {
    calls: Mutex<BTreeMap<String, u32>>,
    effects: Mutex<u32>,
}

impl Tool {
    /// Deduplicates by key, like a payment API.
    fn pay(&self, key: &str) -> u32 {
        let mut calls = self.calls.lock().unwrap();
        let n = calls.entry(key.to_string()).or_default();
        *n += 1;
        if *n == 1 {
            *self.effects.lock().unwrap() += 1;
        }
        42
    }
    /// Does not deduplicate: every call is an effect.
    fn fire(&self) -> u32 {
        *self.effects.lock().unwrap() += 1;
        7
    }
    fn effects(&self) -> u32 {
        *self.effects.lock().unwrap()
    }
}

fn registry(tool: Arc<Tool>) -> Registry {
    let (t1, t2, t3) = (tool.clone(), tool.clone(), tool);
    Registry::new()
        .workflow("lookup", 1, move |ctx: Ctx, _: ()| {
            let tool = t3.clone();
            async move {
                ctx.step("read", || {
                    let tool = tool.clone();
                    async move { Ok(tool.pay(&StepInfo::current().unwrap().idempotency_key)) }
                })
                .idempotent()
                .await
            }
        })
        .workflow("dedup", 1, move |ctx: Ctx, _: ()| {
            let tool = t1.clone();
            async move {
                ctx.step("charge", || {
                    let tool = tool.clone();
                    async move { Ok(tool.pay(&StepInfo::current().unwrap().idempotency_key)) }
                })
                .await
            }
        })
        .workflow("once", 1, move |ctx: Ctx, _: ()| {
            let tool = t2.clone();
            async move {
                ctx.step("launch", || {
                    let tool = tool.clone();
                    async move { Ok(tool.fire()) }
                })
                .at_most_once()
                .await
            }
        })
}

/// Starts `workflow` on a store that crashes right after the step's start is durable
/// (run-started + step-started = 2 events), i.e. after the effect, before its record.
async fn crash_mid_step(tool: &Arc<Tool>, workflow: &str) -> (TestEnv, RunId) {
    crash_after(tool, workflow, 2).await
}

/// Starts `workflow` on a store that crashes once `events` events are written, after the
/// step's effect, and restarts it.
async fn crash_after(tool: &Arc<Tool>, workflow: &str, events: u64) -> (TestEnv, RunId) {
    let mut env = TestEnv::new(registry(tool.clone()));
    env.restart(Some(events));
    let run = env.start(workflow, &()).await.unwrap();
    let _ = env.engine().drain().await;
    assert!(env.engine().store().crashed(), "the crash point was reached");
    assert_eq!(tool.effects(), 1, "the effect happened before the crash");
    env.restart(None);
    (env, run)
}

/// Drives `run` to its end after the crash: completed with the deduplicating tool's
/// answer, after two calls with one key and one effect.
async fn completes_with_one_effect(env: &TestEnv, run: RunId, tool: &Tool) -> holdpoint::RunView {
    env.engine().drain().await.unwrap();
    let view = env.engine().get(run).await.unwrap();
    assert_eq!(view.summary.status, RunStatus::Completed);
    assert_eq!(view.state.output, Some(json!(42)));
    let calls = tool.calls.lock().unwrap().clone();
    assert_eq!(
        calls.values().copied().collect::<Vec<_>>(),
        vec![2],
        "two calls, one key: {calls:?}"
    );
    assert_eq!(tool.effects(), 1);
    view
}

#[tokio::test]
async fn a_deduplicating_tool_sees_the_retry_and_the_effect_happens_once() {
    let tool = Arc::new(Tool::default());
    let (env, run) = crash_mid_step(&tool, "dedup").await;
    let view = completes_with_one_effect(&env, run, &tool).await;
    assert_eq!(view.state.steps.values().next().unwrap().attempts, 2);
}

async fn answer(env: &TestEnv, run: RunId, decision: Decision) {
    let gate = env.engine().pending(None, 10).await.unwrap()[0].gate;
    env.engine()
        .decide(run, DecisionRequest::new(gate, decision, Principal::new("ops")))
        .await
        .unwrap();
    env.engine().drain().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_at_most_once_step_is_not_rerun_after_a_crash_and_waits_for_a_person() {
    let tool = Arc::new(Tool::default());
    let (env, run) = crash_mid_step(&tool, "once").await;
    env.engine().drain().await.unwrap();
    assert_eq!(tool.effects(), 1, "not run again");
    let s = env.engine().store().summary(run).await.unwrap().unwrap();
    assert_eq!(s.status, RunStatus::Waiting);
    // The inbox shows the question (what `holdpoint pending` and GET /v1/pending list).
    let pending = env.engine().pending(None, 10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].action, OUTCOME_UNKNOWN);
    assert_eq!(pending[0].args["step"], "launch");
    assert!(pending[0].context["question"]
        .as_str()
        .unwrap()
        .contains("must not run twice"));

    // "It happened": recorded as completed with the given output; nothing re-runs.
    answer(
        &env,
        run,
        Decision::Respond {
            input: json!({"ran": true, "output": 7}),
        },
    )
    .await;
    let view = env.engine().get(run).await.unwrap();
    assert_eq!(view.summary.status, RunStatus::Completed);
    assert_eq!(view.state.output, Some(json!(7)));
    assert_eq!(tool.effects(), 1);
}

#[tokio::test]
async fn answering_it_did_not_run_runs_it_again_and_rejecting_gives_up() {
    let tool = Arc::new(Tool::default());
    let (env, run) = crash_mid_step(&tool, "once").await;
    env.engine().drain().await.unwrap();
    answer(
        &env,
        run,
        Decision::Respond {
            input: json!({"ran": false}),
        },
    )
    .await;
    let view = env.engine().get(run).await.unwrap();
    assert_eq!(view.summary.status, RunStatus::Completed);
    assert_eq!(tool.effects(), 2, "run again on a person's word");
    assert_eq!(view.state.steps.values().next().unwrap().attempts, 2);

    let tool = Arc::new(Tool::default());
    let (env, run) = crash_mid_step(&tool, "once").await;
    env.engine().drain().await.unwrap();
    answer(
        &env,
        run,
        Decision::Reject {
            reason: "check with the vendor".into(),
        },
    )
    .await;
    let view = env.engine().get(run).await.unwrap();
    assert_eq!(view.summary.status, RunStatus::Failed);
    assert!(
        view.state.error.as_deref().unwrap().contains("gave up"),
        "{:?}",
        view.state.error
    );
    assert_eq!(tool.effects(), 1);
}

/// A crash during an idempotent step's body, before anything made its start durable
/// (its start goes with its result): on recovery the body runs again as the same
/// attempt, with the same key, and the journal shows one clean attempt.
#[tokio::test]
async fn an_idempotent_step_cut_before_its_start_was_durable_runs_again_as_the_same_attempt() {
    let tool = Arc::new(Tool::default());
    // run-started is the one event written before the crash: the next write is the
    // step's start, result and the run's end, together.
    let (env, run) = crash_after(&tool, "lookup", 1).await;
    let events = env.engine().events(run).await.unwrap();
    assert_eq!(events.len(), 1, "nothing of the step was durable: {events:?}");

    completes_with_one_effect(&env, run, &tool).await;
    let attempts: Vec<u32> = env
        .executions()
        .iter()
        .map(|e| {
            assert!(e.idempotent);
            e.attempt
        })
        .collect();
    assert_eq!(attempts, vec![1, 1], "the same attempt ran twice");
    let events = env.engine().events(run).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.event.tag()).collect();
    assert_eq!(
        kinds,
        ["run-started", "step-started", "step-completed", "run-completed"],
        "one attempt in the journal, no interrupted one"
    );
}

/// A step body that says it is running and waits to be let go, declared as `declare` says.
fn paused(running: Arc<Notify>, go: Arc<Notify>, declare: Declare) -> Registry {
    Registry::new().workflow("paused", 1, move |ctx: Ctx, _: ()| {
        let (running, go) = (running.clone(), go.clone());
        async move {
            let body: Box<dyn FnMut() -> BoxedBody + Send> = Box::new(move || {
                let (running, go) = (running.clone(), go.clone());
                Box::pin(async move {
                    running.notify_one();
                    go.notified().await;
                    Ok(1)
                })
            });
            declare(ctx.step("wait", body)).await
        }
    })
}

type BoxedBody = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u32, Failure>> + Send>>;
type Step<'a> = holdpoint::Step<'a, u32, Box<dyn FnMut() -> BoxedBody + Send + 'a>>;
/// How a case declares its step.
type Declare = fn(Step) -> Step;

/// Whether a step's start is durable when its body runs, read from the store while the
/// body waits: yes by default and for at-most-once steps, no for idempotent ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_idempotent_steps_body_runs_before_its_start_is_durable() {
    let cases: [(&str, Declare, bool); 4] = [
        ("default", |s| s, true),
        ("idempotent", |s| s.idempotent(), false),
        ("at most once", |s| s.at_most_once(), true),
        (
            "idempotent, then at most once",
            |s| s.idempotent().at_most_once(),
            true,
        ),
    ];
    for (case, declare, durable_first) in cases {
        let (running, go) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let env = TestEnv::new(paused(running.clone(), go.clone(), declare));
        let run = env.start("paused", &()).await.unwrap();
        let engine = env.engine().clone();
        let drive = tokio::spawn(async move { engine.drain().await });
        running.notified().await;
        let events = env.engine().events(run).await.unwrap();
        let started = events
            .iter()
            .any(|e| matches!(e.event, EventKind::StepStarted { .. }));
        assert_eq!(started, durable_first, "{case}: {events:?}");
        go.notify_one();
        drive.await.unwrap().unwrap();
        let view = env.engine().get(run).await.unwrap();
        assert_eq!(view.summary.status, RunStatus::Completed, "{case}");
        assert_eq!(view.state.output, Some(json!(1)), "{case}");
    }
}
