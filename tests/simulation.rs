//! Deterministic simulation. A seed chooses a scenario — several runs of an agent with
//! steps, a durable sleep, a question and an approval gate, in half of the runs the gate
//! beside the rest (`futures::join!`) — and then, tick by tick,
//! what happens: workers drive what is due, a person decides one of the open gates, the
//! clock moves, the process crashes after a chosen number of events (the store drops
//! everything past that point), or the work moves to another worker. Everything runs on
//! one thread with a manual clock and seeded run ids, so the same seed gives the same
//! trace, and its hash, every time.
//!
//! For every seed: the trace hash is the same on a second run; every run ends; each
//! (position, attempt) ran at most once; every sent payment was approved or edited with
//! exactly those args; re-running the code over each finished journal appends nothing.
//!
//! Seeds: `HOLDPOINT_SIM_SEEDS` (default 64). One seed: `HOLDPOINT_SIM_SEED=n`.

use holdpoint::journal::{Decision, EventKind, GateKind, RunId, RunStatus};
use holdpoint::prelude::*;
use holdpoint::testing::{logical_journal, TestEnv};
use holdpoint::{fold, replay, Policy, Replay};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

use common::pick;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Plan {
    steps: u32,
    sleep_secs: u64,
    ask: bool,
    amount: u64,
    /// The gate and its send beside the rest (`futures::join!`) rather than after it.
    concurrent: bool,
}

type Effects = Arc<Mutex<Vec<(String, u32, Value)>>>;

/// The steps never fail; the crashes the simulation injects interrupt them, each
/// interruption counting as an attempt. Three in a row (seed 4836 of 5,000) would fail
/// the run by the default policy, which is the policy doing its job, not what is tested.
fn crashes_aside() -> RetryPolicy {
    RetryPolicy::attempts(1_000)
}

async fn agent(ctx: Ctx, plan: Plan, effects: Effects) -> Result<Vec<Value>, Failure> {
    let prepare = async {
        let mut out = Vec::new();
        for i in 0..plan.steps {
            let effects = effects.clone();
            let v = ctx
                .step(&format!("s{i}"), || {
                    let effects = effects.clone();
                    async move {
                        let info = StepInfo::current().unwrap();
                        effects
                            .lock()
                            .unwrap()
                            .push((info.idempotency_key, info.attempt, Value::Null));
                        Ok(i)
                    }
                })
                .retry(crashes_aside())
                .await?;
            out.push(json!(v));
        }
        if plan.sleep_secs > 0 {
            ctx.sleep(Duration::from_secs(plan.sleep_secs)).await;
        }
        if plan.ask {
            match ctx.ask::<Value>("which account?").await? {
                Answer::Responded { value, .. } => out.push(value),
                Answer::Declined { reason, .. } => out.push(json!(reason)),
            }
        }
        Ok::<_, Failure>(out)
    };
    let send = async {
        match ctx
            .gate("send", json!({"amount": plan.amount}), json!(null))
            .await?
        {
            Gated::Approved { args, .. } | Gated::Edited { args, .. } => {
                let effects = effects.clone();
                ctx.step("send", || {
                    let (effects, args) = (effects.clone(), args.clone());
                    async move {
                        let info = StepInfo::current().unwrap();
                        effects
                            .lock()
                            .unwrap()
                            .push((info.idempotency_key, info.attempt, args.clone()));
                        Ok(args)
                    }
                })
                .retry(crashes_aside())
                .await
            }
            Gated::Rejected { reason, .. } => Ok(json!(reason)),
        }
    };
    // Concurrent: the gate opens beside the steps, the sleep and the question, and a
    // decision, a timer or a crash lands between them in any order.
    let (mut out, sent) = if plan.concurrent {
        let (out, sent) = futures::join!(prepare, send);
        (out?, sent?)
    } else {
        let out = prepare.await?;
        (out, send.await?)
    };
    out.push(sent);
    Ok(out)
}

fn registry(effects: Effects) -> Registry {
    Registry::new().workflow("agent", 1, move |ctx, plan| agent(ctx, plan, effects.clone()))
}

/// Runs one seed; returns the trace hash and a one-line summary. With `concurrent`, half
/// of the runs have their gate beside the rest.
async fn simulate(seed: u64, concurrent: bool) -> Result<(String, String), String> {
    let effects: Effects = Arc::default();
    let reg = registry(effects.clone());
    let mut env = TestEnv::seeded(reg.clone(), Policy::default(), seed);
    let mut trace: Vec<String> = Vec::new();
    let n = 2 + pick(seed, "runs", 5);
    let mut runs = Vec::new();
    for r in 0..n {
        let plan = Plan {
            steps: pick(seed, &format!("steps {r}"), 4) as u32,
            sleep_secs: [0, 0, 60, 3600][pick(seed, &format!("sleep {r}"), 4) as usize],
            ask: pick(seed, &format!("ask {r}"), 3) == 0,
            amount: 100 + pick(seed, &format!("amount {r}"), 10_000),
            concurrent: concurrent && pick(seed, &format!("concurrent {r}"), 2) == 0,
        };
        runs.push(env.start("agent", &plan).await.map_err(|e| e.to_string())?);
    }
    let (mut crashes, mut handovers, mut decisions) = (0, 0, 0);
    for tick in 0..600u64 {
        let action = pick(seed, &format!("tick {tick}"), 12);
        let label = match action {
            0..=4 => {
                let _ = env.engine().drain().await;
                "drain".to_string()
            }
            5..=7 => {
                let mut pending = env.engine().pending(None, 100).await.unwrap_or_default();
                pending.sort_by_key(|g| (g.run, g.gate));
                if pending.is_empty() {
                    "nothing to decide".to_string()
                } else {
                    let g = &pending[pick(seed, &format!("which {tick}"), pending.len() as u64) as usize];
                    let d = match (g.kind, pick(seed, &format!("decide {tick}"), 4)) {
                        (GateKind::Question, 0) => Decision::Reject {
                            reason: "no idea".into(),
                        },
                        (GateKind::Question, _) => Decision::Respond {
                            input: json!(format!("acct-{tick}")),
                        },
                        (_, 0) => Decision::Reject {
                            reason: format!("no at {tick}"),
                        },
                        (_, 1) => Decision::Edit {
                            args: json!({"amount": pick(seed, &format!("edit {tick}"), 100)}),
                        },
                        _ => Decision::Approve,
                    };
                    let label = format!("decide {} {} {d}", g.run, g.gate);
                    let req = DecisionRequest::new(g.gate, d, Principal::new("person"));
                    if env.engine().decide(g.run, req).await.is_ok() {
                        decisions += 1;
                    }
                    label
                }
            }
            8..=9 => {
                let secs = [1, 60, 3600, 86_400][pick(seed, &format!("advance {tick}"), 4) as usize];
                env.advance(Duration::from_secs(secs));
                format!("advance {secs}s")
            }
            10 => {
                let after = 1 + pick(seed, &format!("crash {tick}"), 12);
                env.restart(Some(after));
                format!("crash after {after} events")
            }
            _ => {
                handovers += 1;
                env.restart(None);
                "handover".to_string()
            }
        };
        if env.engine().store().crashed() {
            crashes += 1;
            env.restart(None);
            trace.push(format!("{label}; crashed"));
        } else {
            trace.push(label);
        }
        let mut ended = true;
        for r in &runs {
            ended &= env
                .engine()
                .store()
                .summary(*r)
                .await
                .ok()
                .flatten()
                .is_some_and(|s| s.status.is_terminal());
        }
        if ended {
            break;
        }
    }
    // Make sure no crash is still armed, then let everything finish.
    env.restart(None);
    for r in &runs {
        let done = env
            .run_to_end(
                *r,
                &holdpoint::testing::Reviewer::approve_all().respond(|_| json!("late")),
            )
            .await?;
        if done.status != RunStatus::Completed {
            return Err(format!(
                "run {r} ended {}: {:?} {:?}",
                done.status, done.error, done.stuck
            ));
        }
    }
    // Invariants.
    let mut seen = BTreeSet::new();
    for e in env.executions() {
        if !seen.insert((e.run, e.position, e.attempt)) {
            return Err(format!(
                "{} position {} attempt {} ran twice",
                e.run, e.position, e.attempt
            ));
        }
    }
    let mut hasher = Sha256::new();
    for t in &trace {
        hasher.update(t.as_bytes());
        hasher.update([0]);
    }
    for r in &runs {
        let events = env.engine().events(*r).await.map_err(|e| e.to_string())?;
        match replay(&reg, &events).await {
            Replay::Consistent { would_append } if would_append.is_empty() => {}
            other => return Err(format!("run {r} does not replay cleanly: {other:?}")),
        }
        let state = fold(&events);
        let sent_at = events.iter().find_map(|e| match &e.event {
            EventKind::StepStarted { position, name, .. } if name == "send" => Some(*position),
            _ => None,
        });
        if let Some(pos) = sent_at {
            // The one `send` gate (beside the rest, it need not be just before the step).
            let gate = match state.gates.values().find(|g| g.action == "send") {
                Some(gate) => gate,
                None => return Err(format!("run {r}: sent without a gate")),
            };
            let allowed = match gate.decision.as_ref().map(|d| &d.decision) {
                Some(Decision::Approve) => gate.args.clone(),
                Some(Decision::Edit { args }) => args.clone(),
                other => return Err(format!("run {r}: sent after {other:?}")),
            };
            for (key, _, args) in effects.lock().unwrap().iter() {
                if key == &format!("{r}/{pos}") && *args != allowed {
                    return Err(format!("run {r}: sent {args} but {allowed} was allowed"));
                }
            }
        }
        for v in logical_journal(&events) {
            hasher.update(v.to_string().as_bytes());
        }
    }
    for (key, attempt, args) in effects.lock().unwrap().iter() {
        hasher.update(format!("{key} {attempt} {args}").as_bytes());
    }
    let hash = holdpoint::journal::hex(&hasher.finalize()[..8]);
    let summary = format!(
        "{n} runs, {} ticks, {decisions} decisions, {crashes} crashes, {handovers} handovers",
        trace.len()
    );
    let _: Vec<RunId> = runs;
    Ok((hash, summary))
}

fn seeds() -> Vec<u64> {
    match std::env::var("HOLDPOINT_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(one) => vec![one],
        None => (0..std::env::var("HOLDPOINT_SIM_SEEDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64))
            .collect(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn seeded_simulations_are_reproducible_and_keep_the_invariants() {
    let seeds = seeds();
    let rt = runtime();
    let (mut total_crashes, mut runs) = (0usize, 0usize);
    for seed in &seeds {
        let first = rt.block_on(simulate(*seed, false));
        let (hash, summary) = match first {
            Ok(x) => x,
            Err(e) => panic!("seed {seed} failed: {e}\nreproduce: HOLDPOINT_SIM_SEED={seed} cargo test --all-features --test simulation"),
        };
        let (again, _) = rt
            .block_on(simulate(*seed, false))
            .unwrap_or_else(|e| panic!("seed {seed}, second run: {e}"));
        assert_eq!(
            hash, again,
            "seed {seed}: the same seed gave two traces ({summary})"
        );
        total_crashes += summary
            .split(", ")
            .nth(3)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        runs += summary
            .split(' ')
            .next()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        println!("seed {seed:>4}: trace {hash} ({summary})");
    }
    println!(
        "simulation: {} seeds, each twice with the same trace hash; {runs} runs, {total_crashes} crashes",
        seeds.len()
    );
}

/// Half of the runs with the gate beside the steps, the sleep and the question
/// (`futures::join!`): replay must hand each recorded result out where the code got it
/// live, whatever lands between the branches (a decision, a timer, a crash). Where a
/// branch goes on depends on when its appends are acknowledged; the seeded env's store
/// syncs each in the caller (no commit thread), so a seed gives the same trace twice
/// here too.
#[test]
fn seeded_simulations_with_joined_branches_are_reproducible_and_keep_the_invariants() {
    let rt = runtime();
    let mut runs = 0usize;
    for seed in seeds() {
        let (hash, summary) = rt.block_on(simulate(seed, true)).unwrap_or_else(|e| {
            panic!("seed {seed} failed: {e}\nreproduce: HOLDPOINT_SIM_SEED={seed} cargo test --all-features --test simulation joined")
        });
        let (again, _) = rt
            .block_on(simulate(seed, true))
            .unwrap_or_else(|e| panic!("seed {seed}, second run: {e}"));
        assert_eq!(
            hash, again,
            "seed {seed}: the same seed gave two traces ({summary})"
        );
        runs += summary
            .split(' ')
            .next()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
    }
    assert!(runs > 0);
}
