//! Side effects across a crash between a step's effect and its `step-completed`: with a
//! deduplicating tool the effect happens once; an at-most-once step is never re-run, and
//! the run waits for a person to say what became of it.

use holdpoint::journal::{Decision, RunStatus};
use holdpoint::prelude::*;
use holdpoint::testing::TestEnv;
use holdpoint::OUTCOME_UNKNOWN;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

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
    let (t1, t2) = (tool.clone(), tool);
    Registry::new()
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
    let mut env = TestEnv::new(registry(tool.clone()));
    env.restart(Some(2));
    let run = env.start(workflow, &()).await.unwrap();
    let _ = env.engine().drain().await;
    assert!(env.engine().store().crashed(), "the crash point was reached");
    assert_eq!(tool.effects(), 1, "the effect happened before the crash");
    env.restart(None);
    (env, run)
}

#[tokio::test]
async fn a_deduplicating_tool_sees_the_retry_and_the_effect_happens_once() {
    let tool = Arc::new(Tool::default());
    let (env, run) = crash_mid_step(&tool, "dedup").await;
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
