//! Guardrails and gate semantics end to end through the HTTP API: a real server on a
//! loopback port (in this process, so the test controls its clock), real requests, and
//! restarts that close and reopen the store.

use holdpoint::journal::{request_hash, EventKind, GateSpec, RunId, SledStore, Verdict};
use holdpoint::journal::{ApproverLevel, TimeoutOutcome};
use holdpoint::prelude::*;
use holdpoint::server::{Caller, Tokens};
use holdpoint::{fold, Acted, Condition, Engine, ManualClock, Op, Policy, Rule, Workers};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Pay {
    to: String,
    amount_cents: u64,
}

/// The payments tool: what actually ran, with which args.
#[derive(Default)]
struct Bank {
    paid: Mutex<Vec<Pay>>,
}

async fn payer(ctx: Ctx, payments: Vec<Pay>, bank: Arc<Bank>) -> Result<Vec<String>, Failure> {
    let mut out = Vec::new();
    for p in payments {
        let acted = ctx
            .act("send_money", p)
            .context(json!({"note": "refund"}))
            .run(|args: Pay| {
                let bank = bank.clone();
                async move {
                    bank.paid.lock().unwrap().push(args.clone());
                    Ok(args.amount_cents)
                }
            })
            .await?;
        out.push(match acted {
            Acted::Done { output, .. } => format!("paid {output}"),
            Acted::Denied { reason, .. } => format!("denied: {reason}"),
            Acted::Rejected { reason, by } => format!("rejected by {by}: {reason}"),
        });
    }
    Ok(out)
}

const AGENT: &str = "agent-host-token-000000";
const ALICE: &str = "alice-token-0000000000";
const BOB: &str = "bob-token-000000000000";
const CAROL: &str = "carol-token-0000000000";
const DAVE: &str = "dave-token-00000000000";
const FIONA: &str = "fiona-finance-token-00";
const TED: &str = "ted-teamlead-token-000";

fn tokens() -> Tokens {
    let mut t = Tokens::default();
    for (token, who, roles) in [
        (AGENT, "agent-host", vec!["operator", "reviewer"]),
        (ALICE, "alice", vec!["operator", "reviewer"]),
        (BOB, "bob", vec!["reviewer"]),
        (CAROL, "carol", vec!["reviewer"]),
        (DAVE, "dave", vec!["reviewer"]),
        (FIONA, "fiona", vec!["finance"]),
        (TED, "ted", vec!["team-lead"]),
    ] {
        t.add(token, Caller::new(who, &roles)).unwrap();
    }
    t
}

struct Api {
    url: String,
    engine: Engine<SledStore>,
    workers: Option<Workers>,
    server: Option<common::Server>,
    bank: Arc<Bank>,
}

async fn boot(dir: &Path, clock: &ManualClock, policy: Policy, bank: Arc<Bank>) -> Api {
    let b = bank.clone();
    let registry = Registry::new().workflow("payer", 1, move |ctx, p| payer(ctx, p, b.clone()));
    let engine = Engine::builder(SledStore::open(dir).unwrap(), registry)
        .clock(clock.clone())
        .policy(policy)
        .build()
        .unwrap();
    let workers = engine.spawn_workers();
    let server = common::serve(engine.clone(), tokens()).await;
    Api {
        url: server.url.clone(),
        engine,
        workers: Some(workers),
        server: Some(server),
        bank,
    }
}

impl Api {
    /// Stops the server and workers and closes the store (a restart's first half).
    async fn shutdown(mut self) {
        self.server.take().unwrap().stop().await;
        self.workers.take().unwrap().shutdown().await;
        let engine = self.engine.clone();
        drop(self);
        // The server's connection tasks may still be dropping their handles.
        engine.into_store_when_released().await.close().unwrap();
    }

    async fn call(&self, method: &'static str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
        common::call(&self.url, method, path, Some(token), body).await
    }

    async fn start(&self, token: &str, payments: Value) -> RunId {
        let (st, b) = self
            .call(
                "POST",
                "/v1/runs",
                token,
                Some(json!({"workflow": "payer", "input": payments})),
            )
            .await;
        assert_eq!(st, 201, "{b}");
        let run: RunId = b["run"].as_str().unwrap().parse().unwrap();
        self.settle(run).await;
        run
    }

    async fn settle(&self, run: RunId) -> Value {
        let (st, b) = self.call("GET", &format!("/v1/runs/{run}/wait"), BOB, None).await;
        assert_eq!(st, 200, "{b}");
        assert_eq!(b["settled"], true);
        b
    }

    async fn decide(&self, run: RunId, gate: u64, token: &str, decision: Value) -> (u16, Value) {
        self.call(
            "POST",
            &format!("/v1/runs/{run}/gates/{gate}/decision"),
            token,
            Some(decision),
        )
        .await
    }

    async fn pending_for(&self, run: RunId) -> Vec<Value> {
        let (_, b) = self.call("GET", "/v1/pending", BOB, None).await;
        b.as_array()
            .unwrap()
            .iter()
            .filter(|g| g["run"] == json!(run))
            .cloned()
            .collect()
    }

    fn paid(&self) -> Vec<Pay> {
        self.bank.paid.lock().unwrap().clone()
    }
}

fn refunds_policy() -> Policy {
    Policy::new(Verdict::RequireApproval)
        .rule(
            Rule::new("refunds.small", "send_money", Verdict::Allow).when(Condition::compare(
                "amount_cents",
                Op::Le,
                10_000,
            )),
        )
        .rule(
            Rule::new("blocklist", "send_money", Verdict::Deny).when(Condition::compare(
                "to",
                Op::Eq,
                "mallory",
            )),
        )
        .rule(Rule::new("refunds.large", "send_money", Verdict::RequireApproval))
}

fn spec_policy(spec: GateSpec) -> Policy {
    Policy::new(Verdict::RequireApproval)
        .rule(Rule::new("guarded", "send_money", Verdict::RequireApproval).gate(spec))
}

fn clock() -> ManualClock {
    ManualClock::new(
        chrono::DateTime::parse_from_rfc3339("2026-03-01T09:00:00Z")
            .unwrap()
            .to_utc(),
    )
}

/// Checks, from the journal, that each executed action ran with exactly the args a
/// person approved or edited: the step's args hash equals the decided request's hash.
async fn assert_executed_args_match_decisions(api: &Api, run: RunId) {
    let events = api.engine.events(run).await.unwrap();
    let state = fold(&events);
    let mut checked = 0;
    for e in &events {
        if let EventKind::StepStarted {
            position,
            args_hash: Some(hash),
            ..
        } = &e.event
        {
            // The gate (if any) is the position before the step.
            let gate = state.gates.get(&holdpoint::journal::GateId(position.0 - 1));
            if let Some(gate) = gate {
                let d = gate
                    .decision
                    .clone()
                    .expect("a step after a gate runs only after a decision");
                let args = match &d.decision {
                    holdpoint::journal::Decision::Approve => gate.args.clone(),
                    holdpoint::journal::Decision::Edit { args } => args.clone(),
                    other => panic!("action ran after {other}"),
                };
                assert_eq!(
                    hash,
                    &request_hash("send_money", &args),
                    "executed args differ from decided args"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "no gated action was checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_allows_denies_and_asks_and_the_verdict_is_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let api = boot(dir.path(), &clock, refunds_policy(), Arc::default()).await;
    let run = api
        .start(
            AGENT,
            json!([
                {"to": "ana", "amount_cents": 5_000},
                {"to": "mallory", "amount_cents": 20_000},
                {"to": "ben", "amount_cents": 48_000}
            ]),
        )
        .await;
    // Allowed ran at once; denied never ran; the large one waits for a person.
    assert_eq!(
        api.paid(),
        vec![Pay {
            to: "ana".into(),
            amount_cents: 5_000
        }]
    );
    let pending = api.pending_for(run).await;
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["rule"], "refunds.large");
    assert!(pending[0]["reason"]
        .as_str()
        .unwrap()
        .contains("(rule refunds.large)"));
    let hash = pending[0]["request_hash"].as_str().unwrap().to_string();
    let gate = pending[0]["gate"].as_u64().unwrap();
    let (st, _) = api
        .decide(
            run,
            gate,
            BOB,
            json!({"decision": {"kind": "approve"}, "request_hash": hash}),
        )
        .await;
    assert_eq!(st, 200);
    let done = api.settle(run).await;
    assert_eq!(done["summary"]["status"], "completed");
    let out = &done["state"]["output"];
    assert_eq!(out[0], "paid 5000");
    assert!(
        out[1]
            .as_str()
            .unwrap()
            .starts_with("denied: send_money: to \"mallory\""),
        "{out}"
    );
    assert_eq!(out[2], "paid 48000");
    assert_eq!(api.paid().len(), 2);
    let verdicts: Vec<Verdict> = fold(api.engine.events(run).await.unwrap())
        .verdicts
        .values()
        .map(|v| v.verdict)
        .collect();
    assert_eq!(
        verdicts,
        vec![Verdict::Allow, Verdict::Deny, Verdict::RequireApproval]
    );
    assert_executed_args_match_decisions(&api, run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_is_what_executes_and_a_changed_policy_does_not_reach_a_paused_run() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let bank: Arc<Bank> = Arc::default();
    let api = boot(dir.path(), &clock, refunds_policy(), bank.clone()).await;
    let run = api
        .start(AGENT, json!([{"to": "ben", "amount_cents": 48_000}]))
        .await;
    api.shutdown().await;
    // Redeploy with a policy that would deny every payment: the paused run keeps the
    // verdict it got (journaled), so the person's decision still counts.
    let deny_all = Policy::new(Verdict::Deny);
    let api = boot(dir.path(), &clock, deny_all, bank).await;
    let gate = api.pending_for(run).await[0]["gate"].as_u64().unwrap();
    let edited = json!({"to": "ben", "amount_cents": 30_000});
    let (st, b) = api
        .decide(
            run,
            gate,
            CAROL,
            json!({"decision": {"kind": "edit", "args": edited}}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    api.settle(run).await;
    assert_eq!(
        api.paid(),
        vec![Pay {
            to: "ben".into(),
            amount_cents: 30_000
        }]
    );
    assert_executed_args_match_decisions(&api, run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_a_stale_request_are_refused_without_a_trace() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let spec = GateSpec {
        levels: vec![ApproverLevel {
            roles: vec!["finance".into()],
            timeout_secs: None,
        }],
        ..GateSpec::default()
    };
    let api = boot(dir.path(), &clock, spec_policy(spec), Arc::default()).await;
    let run = api
        .start(AGENT, json!([{"to": "ben", "amount_cents": 48_000}]))
        .await;
    let g = &api.pending_for(run).await[0];
    assert_eq!(g["roles"], json!(["finance"]));
    let gate = g["gate"].as_u64().unwrap();
    let before = api.engine.events(run).await.unwrap().len();
    // Bob is a reviewer but not finance: 403. A viewer-like operator: 403 too.
    let (st, b) = api
        .decide(run, gate, BOB, json!({"decision": {"kind": "approve"}}))
        .await;
    assert_eq!((st, b["error"]["code"].as_str()), (403, Some("forbidden")), "{b}");
    // Finance with a hash of some other request: 409 stale.
    let (st, b) = api
        .decide(
            run,
            gate,
            FIONA,
            json!({"decision": {"kind": "approve"}, "request_hash": "0123456789abcdef"}),
        )
        .await;
    assert_eq!((st, b["error"]["code"].as_str()), (409, Some("stale")), "{b}");
    assert_eq!(
        api.engine.events(run).await.unwrap().len(),
        before,
        "refusals leave no trace"
    );
    let hash = g["request_hash"].as_str().unwrap();
    let (st, b) = api
        .decide(
            run,
            gate,
            FIONA,
            json!({"decision": {"kind": "approve"}, "request_hash": hash}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    api.settle(run).await;
    assert_eq!(api.paid().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_quorum_counts_distinct_people_and_never_the_initiator() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let spec = GateSpec {
        quorum: 2,
        ..GateSpec::default()
    };
    let api = boot(dir.path(), &clock, spec_policy(spec), Arc::default()).await;
    // Alice starts the run herself.
    let run = api
        .start(ALICE, json!([{"to": "ben", "amount_cents": 48_000}]))
        .await;
    let gate = api.pending_for(run).await[0]["gate"].as_u64().unwrap();
    let approve = json!({"decision": {"kind": "approve"}});
    let (st, b) = api.decide(run, gate, ALICE, approve.clone()).await;
    assert_eq!(st, 403, "the initiator cannot approve: {b}");
    let (st, b) = api.decide(run, gate, BOB, approve.clone()).await;
    assert_eq!(
        (st, &b["voted"], &b["needed"]),
        (200, &json!(true), &json!(2)),
        "{b}"
    );
    // Bob again: counts once.
    let (st, b) = api.decide(run, gate, BOB, approve.clone()).await;
    assert_eq!(st, 200);
    assert_eq!(b["approvals"], json!(["bob"]));
    assert_eq!(api.pending_for(run).await[0]["approvals"], json!(["bob"]));
    assert!(api.paid().is_empty(), "one approval of two runs nothing");
    let (st, b) = api.decide(run, gate, CAROL, approve.clone()).await;
    assert_eq!((st, &b["recorded"]), (200, &json!(true)), "{b}");
    assert!(b["decision"]["comment"].as_str().unwrap().contains("bob, carol"));
    api.settle(run).await;
    assert_eq!(api.paid().len(), 1);
    let votes = api
        .engine
        .events(run)
        .await
        .unwrap()
        .iter()
        .filter(|e| matches!(e.event, EventKind::VoteRecorded { .. }))
        .count();
    assert_eq!(votes, 2);
    // A later decision conflicts with the recorded one.
    let (st, _) = api.decide(run, gate, DAVE, approve).await;
    assert_eq!(st, 409);
    assert_executed_args_match_decisions(&api, run).await;

    // Any reject ends a quorum gate.
    let run = api
        .start(ALICE, json!([{"to": "cy", "amount_cents": 48_000}]))
        .await;
    let gate = api.pending_for(run).await[0]["gate"].as_u64().unwrap();
    api.decide(run, gate, BOB, json!({"decision": {"kind": "approve"}}))
        .await;
    let (st, _) = api
        .decide(
            run,
            gate,
            DAVE,
            json!({"decision": {"kind": "reject", "reason": "not this customer"}}),
        )
        .await;
    assert_eq!(st, 200);
    let done = api.settle(run).await;
    assert_eq!(done["state"]["output"][0], "rejected by dave: not this customer");
    assert_eq!(api.paid().len(), 1, "the rejected payment never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_vote_makes_earlier_approvals_stale() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let spec = GateSpec {
        quorum: 2,
        ..GateSpec::default()
    };
    let api = boot(dir.path(), &clock, spec_policy(spec), Arc::default()).await;
    let run = api
        .start(AGENT, json!([{"to": "ben", "amount_cents": 48_000}]))
        .await;
    let g = &api.pending_for(run).await[0];
    let gate = g["gate"].as_u64().unwrap();
    let h0 = g["request_hash"].as_str().unwrap().to_string();
    api.decide(
        run,
        gate,
        BOB,
        json!({"decision": {"kind": "approve"}, "request_hash": h0}),
    )
    .await;
    // Carol edits: a new version; Bob's approval was for other args.
    let edited = json!({"to": "ben", "amount_cents": 20_000});
    let (st, b) = api
        .decide(
            run,
            gate,
            CAROL,
            json!({"decision": {"kind": "edit", "args": edited}, "request_hash": h0}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["approvals"], json!(["carol"]));
    // Dave decides on what he saw before the edit: stale.
    let (st, b) = api
        .decide(
            run,
            gate,
            DAVE,
            json!({"decision": {"kind": "approve"}, "request_hash": h0}),
        )
        .await;
    assert_eq!((st, b["error"]["code"].as_str()), (409, Some("stale")), "{b}");
    let h1 = b["error"]["current_request_hash"].as_str().unwrap().to_string();
    assert_eq!(h1, request_hash("send_money", &edited));
    let (st, b) = api
        .decide(
            run,
            gate,
            DAVE,
            json!({"decision": {"kind": "approve"}, "request_hash": h1}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["decision"]["decision"], json!({"kind": "edit", "args": edited}));
    api.settle(run).await;
    assert_eq!(
        api.paid(),
        vec![Pay {
            to: "ben".into(),
            amount_cents: 20_000
        }]
    );
    assert_executed_args_match_decisions(&api, run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passed_while_the_server_was_down_is_applied_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let spec = GateSpec {
        levels: vec![ApproverLevel {
            roles: vec![],
            timeout_secs: Some(3600),
        }],
        quorum: 1,
        on_timeout: TimeoutOutcome::Reject,
        allowed: vec![],
    };
    let bank: Arc<Bank> = Arc::default();
    let api = boot(dir.path(), &clock, spec_policy(spec.clone()), bank.clone()).await;
    let run = api
        .start(AGENT, json!([{"to": "ben", "amount_cents": 48_000}]))
        .await;
    let g = &api.pending_for(run).await[0];
    assert_eq!(g["deadline"], "2026-03-01T10:00:00Z");
    api.shutdown().await;
    // Two hours pass with the server down.
    clock.advance(Duration::from_secs(2 * 3600));
    let api = boot(dir.path(), &clock, spec_policy(spec), bank).await;
    let done = api.settle(run).await;
    assert_eq!(done["summary"]["status"], "completed", "{done}");
    let out = done["state"]["output"][0].as_str().unwrap();
    assert!(out.starts_with("rejected by system: timed out"), "{out}");
    assert!(api.paid().is_empty(), "a timed-out action never runs");
    let (_, stats) = api.call("GET", "/v1/stats", BOB, None).await;
    assert_eq!(stats[0]["timed_out"], 1);
    assert_eq!(stats[0]["rejected"], 0, "a timeout is not a person's rejection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_gate_escalates_to_the_next_group() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let spec = GateSpec {
        levels: vec![
            ApproverLevel {
                roles: vec!["team-lead".into()],
                timeout_secs: Some(3600),
            },
            ApproverLevel {
                roles: vec!["finance".into()],
                timeout_secs: Some(3600),
            },
        ],
        quorum: 1,
        on_timeout: TimeoutOutcome::Reject,
        allowed: vec![],
    };
    let api = boot(dir.path(), &clock, spec_policy(spec), Arc::default()).await;
    let run = api
        .start(AGENT, json!([{"to": "ben", "amount_cents": 48_000}]))
        .await;
    let gate = api.pending_for(run).await[0]["gate"].as_u64().unwrap();
    // Finance may not decide yet: the gate is with the team leads.
    let (st, _) = api
        .decide(run, gate, FIONA, json!({"decision": {"kind": "approve"}}))
        .await;
    assert_eq!(st, 403);
    let mut changes = api.engine.store().changes();
    clock.advance(Duration::from_secs(3601));
    // The running worker's timer fires; wait (by notification) for the escalation.
    loop {
        changes.borrow_and_update();
        let g = api.pending_for(run).await;
        if g[0]["level"] == 1 {
            assert_eq!(g[0]["roles"], json!(["finance"]));
            assert_eq!(g[0]["deadline"], "2026-03-01T11:00:01Z");
            break;
        }
        changes.changed().await.unwrap();
    }
    let (st, _) = api
        .decide(run, gate, TED, json!({"decision": {"kind": "approve"}}))
        .await;
    assert_eq!(st, 403, "the team lead's turn has passed");
    let (st, b) = api
        .decide(run, gate, FIONA, json!({"decision": {"kind": "approve"}}))
        .await;
    assert_eq!(st, 200, "{b}");
    api.settle(run).await;
    assert_eq!(api.paid().len(), 1);
    assert_executed_args_match_decisions(&api, run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_grows_with_unchanged_approvals_spot_checks_and_resets_after_an_edit() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let policy = Policy::new(Verdict::RequireApproval)
        .rule(Rule::new("payouts", "send_money", Verdict::RequireApproval).trust_after(2));
    let api = boot(dir.path(), &clock, policy, Arc::default()).await;
    let mut n = 0;
    let mut next = || {
        n += 1;
        json!([{"to": "ben", "amount_cents": n}])
    };
    // Starts a run; answers its gate (if asked) with `decision` as `token`.
    async fn run(api: &Api, input: Value, answer: Option<(&str, Value)>) -> bool {
        let run = api.start(AGENT, input).await;
        let pending = api.pending_for(run).await;
        let asked = !pending.is_empty();
        if let (true, Some((token, decision))) = (asked, answer) {
            let gate = pending[0]["gate"].as_u64().unwrap();
            let (st, b) = api
                .decide(run, gate, token, json!({ "decision": decision }))
                .await;
            assert_eq!(st, 200, "{b}");
            api.settle(run).await;
        }
        asked
    }
    let approve = json!({"kind": "approve"});
    assert!(
        run(&api, next(), Some((BOB, approve.clone()))).await,
        "asked at first"
    );
    assert!(run(&api, next(), Some((CAROL, approve.clone()))).await);
    // Two unchanged approvals by two people: the next one runs on trust...
    assert!(!run(&api, next(), None).await, "trusted");
    // ...and after two runs on trust, one is asked again: a spot check.
    assert!(!run(&api, next(), None).await, "trusted");
    assert!(
        run(
            &api,
            next(),
            Some((
                DAVE,
                json!({"kind": "edit", "args": {"to": "ben", "amount_cents": 1}})
            ))
        )
        .await,
        "spot check"
    );
    // The edit took the trust away: asked until two fresh unchanged approvals.
    assert!(run(&api, next(), Some((BOB, approve.clone()))).await);
    assert!(
        run(&api, next(), Some((BOB, approve.clone()))).await,
        "one person twice does not count"
    );
    assert!(run(&api, next(), Some((CAROL, approve.clone()))).await);
    assert!(!run(&api, next(), None).await, "trusted again");
    let trusted: Vec<_> = api.engine.list(None, None, 100).await.unwrap();
    let mut reasons = Vec::new();
    for r in trusted {
        for v in fold(api.engine.events(r.id).await.unwrap()).verdicts.values() {
            reasons.push((v.verdict, v.reason.starts_with("trusted:")));
        }
    }
    assert_eq!(reasons.iter().filter(|(_, t)| *t).count(), 3);
    assert_eq!(api.paid().len(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_takes_only_the_decisions_its_rule_allows() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let spec = GateSpec {
        allowed: vec![
            holdpoint::journal::DecisionKind::Approve,
            holdpoint::journal::DecisionKind::Reject,
        ],
        ..GateSpec::default()
    };
    let api = boot(dir.path(), &clock, spec_policy(spec), Arc::default()).await;
    let run = api
        .start(AGENT, json!([{"to": "ben", "amount_cents": 48_000}]))
        .await;
    let g = &api.pending_for(run).await[0];
    assert_eq!(g["allowed"], json!(["approve", "reject"]));
    let gate = g["gate"].as_u64().unwrap();
    let before = api.engine.events(run).await.unwrap().len();
    let edit = json!({"decision": {"kind": "edit", "args": {"to": "ben", "amount_cents": 1}}});
    let (st, b) = api.decide(run, gate, BOB, edit).await;
    assert_eq!((st, b["error"]["code"].as_str()), (422, Some("invalid")), "{b}");
    assert_eq!(api.engine.events(run).await.unwrap().len(), before, "no trace");
    let (st, _) = api
        .decide(run, gate, BOB, json!({"decision": {"kind": "approve"}}))
        .await;
    assert_eq!(st, 200);
    api.settle(run).await;
    assert_eq!(
        api.paid(),
        vec![Pay {
            to: "ben".into(),
            amount_cents: 48_000
        }]
    );
}
