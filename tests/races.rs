//! Races: many people deciding the same gates at once, and two workers contending for
//! the same runs.
//!
//! Gates: `HOLDPOINT_RACE_GATES` (default 1,000), each with 32 concurrent decisions.

use holdpoint::journal::{EventKind, RunId, RunStatus, SledStore};
use holdpoint::prelude::*;
use holdpoint::server::{Caller, Tokens};
use holdpoint::{Engine, EngineConfig};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

mod common;

const DECIDERS: usize = 32;

async fn one_gate(ctx: Ctx, _: ()) -> Result<(), Failure> {
    let _ = ctx
        .gate("send_money", json!({"amount_cents": 100}), json!(null))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_conflicting_decisions_record_exactly_one_per_gate() {
    let gates: usize = std::env::var("HOLDPOINT_RACE_GATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(
        SledStore::open(dir.path()).unwrap(),
        Registry::new().workflow("g", 1, one_gate),
    )
    .unwrap();
    let mut runs = Vec::new();
    for i in 0..gates {
        runs.push(engine.start("g", &(), Some(&format!("race-{i}"))).await.unwrap());
    }
    engine.drain().await.unwrap();
    assert_eq!(engine.pending(None, gates + 1).await.unwrap().len(), gates);

    let mut tokens = Tokens::default();
    let token = |t: usize| format!("decider-token-{t:04}-xxxxxx");
    for t in 0..DECIDERS {
        tokens
            .add(&token(t), Caller::new(&format!("p{t}"), &["reviewer"]))
            .unwrap();
    }
    let server = common::serve(engine.clone(), tokens).await;
    let url = server.url.clone();
    let started = std::time::Instant::now();
    // Each decider walks the gates in the same order, so all 32 hit a gate together.
    let runs = Arc::new(runs);
    let handles: Vec<_> = (0..DECIDERS)
        .map(|t| {
            let (url, runs, token) = (url.clone(), runs.clone(), token(t));
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
                let mut out = Vec::new();
                for (g, run) in runs.iter().enumerate() {
                    let body = if t % 2 == 0 {
                        json!({"decision": {"kind": "approve"}, "idempotency_key": format!("k-{g}-{t}")})
                    } else {
                        json!({"decision": {"kind": "reject", "reason": format!("no from {t}")}, "idempotency_key": format!("k-{g}-{t}")})
                    };
                    let mut resp = agent
                        .post(format!("{url}/v1/runs/{run}/gates/0/decision"))
                        .header("Authorization", format!("Bearer {token}"))
                        .send_json(&body)
                        .unwrap();
                    let status = resp.status().as_u16();
                    let json: Value = resp.body_mut().read_json().unwrap();
                    out.push((g, t, body, status, json));
                }
                out
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let elapsed = started.elapsed();

    let mut winners: BTreeMap<usize, (usize, Value, Value)> = BTreeMap::new();
    let mut losers = 0;
    for (g, t, body, status, json) in &results {
        match status {
            200 => assert!(
                winners.insert(*g, (*t, body.clone(), json.clone())).is_none(),
                "two winners at gate {g}"
            ),
            409 => {
                losers += 1;
                assert_eq!(json["error"]["code"], "conflict");
                assert!(json["error"]["recorded"]["by"].is_string(), "{json}");
            }
            other => panic!("gate {g} decider {t}: {other} {json}"),
        }
    }
    assert_eq!(winners.len(), gates);
    assert_eq!(losers, gates * (DECIDERS - 1));
    // Every loser was told the winner.
    for (g, t, _, status, json) in &results {
        if *status == 409 {
            let winner = format!("p{}", winners[g].0);
            assert_eq!(
                json["error"]["recorded"]["by"],
                json!(winner),
                "gate {g} decider {t}"
            );
        }
    }
    // The journals hold exactly one decision per gate, the winner's.
    let mut recorded = 0;
    for (g, run) in runs.iter().enumerate() {
        for e in engine.events(*run).await.unwrap() {
            if let EventKind::DecisionRecorded { by, .. } = &e.event {
                recorded += 1;
                assert_eq!(by.as_str(), format!("p{}", winners[&g].0));
            }
        }
    }
    assert_eq!(recorded, gates);
    // A winner retrying with its key gets the identical success.
    for (g, (t, body, first)) in winners.iter().take(100) {
        let (status, again) = common::call(
            &url,
            "POST",
            &format!("/v1/runs/{}/gates/0/decision", runs[*g]),
            Some(&token(*t)),
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(again["decision"], first["decision"]);
    }
    println!(
        "races: {} requests on {gates} gates in {:.2}s ({:.0} requests/s): {gates} recorded, {losers} conflicts naming the winner",
        results.len(),
        elapsed.as_secs_f64(),
        results.len() as f64 / elapsed.as_secs_f64()
    );
    server.stop().await;
}

/// Per run: step bodies running now, and the most that ever ran at once.
#[derive(Default)]
struct Overlap {
    running: Mutex<BTreeMap<RunId, usize>>,
    worst: Mutex<usize>,
    by_engine: Mutex<BTreeMap<&'static str, usize>>,
    executed: Mutex<BTreeSet<(RunId, u32)>>,
}

async fn five_steps(ctx: Ctx, who: Arc<Overlap>, engine: &'static str) -> Result<(), Failure> {
    for i in 0..5u32 {
        let (who, run) = (who.clone(), ctx.run_id());
        ctx.step(&format!("s{i}"), || {
            let who = who.clone();
            async move {
                let info = StepInfo::current().unwrap();
                {
                    let mut running = who.running.lock().unwrap();
                    let n = running.entry(run).or_default();
                    *n += 1;
                    let mut worst = who.worst.lock().unwrap();
                    *worst = (*worst).max(*n);
                }
                assert!(
                    who.executed.lock().unwrap().insert((run, info.position.0)),
                    "a step ran twice"
                );
                *who.by_engine.lock().unwrap().entry(engine).or_default() += 1;
                tokio::task::yield_now().await;
                *who.running.lock().unwrap().get_mut(&run).unwrap() -= 1;
                Ok(())
            }
        })
        .await?;
        // A gate every other step makes the run change hands between activations.
        if i % 2 == 0 {
            ctx.sleep(std::time::Duration::ZERO).await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_never_drive_one_run_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let overlap = Arc::new(Overlap::default());
    let engine = |name: &'static str| {
        let o = overlap.clone();
        Engine::builder(
            store.clone(),
            Registry::new().workflow("five", 1, move |ctx, _: ()| five_steps(ctx, o.clone(), name)),
        )
        .config(EngineConfig {
            concurrency: 16,
            ..EngineConfig::default()
        })
        .build()
        .unwrap()
    };
    let (a, b) = (engine("a"), engine("b"));
    let (wa, wb) = (a.spawn_workers(), b.spawn_workers());
    let mut runs = Vec::new();
    for _ in 0..200 {
        runs.push(a.start("five", &(), None).await.unwrap());
    }
    for run in &runs {
        assert_eq!(a.settled(*run).await.unwrap().status, RunStatus::Completed);
    }
    wa.shutdown().await;
    wb.shutdown().await;
    let by_engine = overlap.by_engine.lock().unwrap().clone();
    println!("steps by engine: {by_engine:?}");
    assert_eq!(
        *overlap.worst.lock().unwrap(),
        1,
        "two step bodies of one run ran at once"
    );
    assert_eq!(overlap.executed.lock().unwrap().len(), 200 * 5);
    assert!(by_engine.len() == 2, "both workers took part: {by_engine:?}");
    for run in &runs {
        let positions: Vec<u32> = a
            .events(*run)
            .await
            .unwrap()
            .iter()
            .filter_map(|e| match e.event {
                EventKind::StepCompleted { position, .. } => Some(position.0),
                _ => None,
            })
            .collect();
        let unique: BTreeSet<u32> = positions.iter().copied().collect();
        assert_eq!(
            unique.len(),
            positions.len(),
            "run {run}: a position completed twice"
        );
    }
}
