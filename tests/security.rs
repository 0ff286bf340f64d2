//! Who gets in, and who may do what: every route without a valid token, and the
//! authorization table, through the real API.

use holdpoint::journal::{ApproverLevel, GateSpec, SledStore, Verdict};
use holdpoint::prelude::*;
use holdpoint::server::{self, Caller, Tokens};
use holdpoint::{Engine, Policy, Rule};
use serde_json::{json, Value};

mod common;

const AGENT: &str = "agent-bot-token-000000";
const INITIATOR: &str = "ivan-initiator-token-0";
const OUTSIDER: &str = "olga-outsider-token-00";
const APPROVER: &str = "fay-approver-token-000";
const ADMIN: &str = "root-admin-token-00000";

fn tokens() -> Tokens {
    let mut t = Tokens::default();
    for (token, who, roles) in [
        (AGENT, "bot", vec!["agent"]),
        (INITIATOR, "ivan", vec!["operator", "finance", "reviewer"]),
        (OUTSIDER, "olga", vec!["marketing"]),
        (APPROVER, "fay", vec!["finance", "reviewer"]),
        (ADMIN, "root", vec!["admin"]),
    ] {
        t.add(token, Caller::new(who, &roles)).unwrap();
    }
    t
}

async fn guarded(ctx: Ctx, kind: String) -> Result<(), Failure> {
    if kind == "question" {
        let _: Answer<Value> = ctx.ask("which account?").await?;
    } else {
        ctx.act("send_money", json!({"amount_cents": 50_000}))
            .run(|_: Value| async { Ok(()) })
            .await?;
    }
    Ok(())
}

async fn setup() -> (
    tempfile::TempDir,
    Engine<SledStore>,
    holdpoint::Workers,
    common::Server,
) {
    let dir = tempfile::tempdir().unwrap();
    // Payments need two finance approvers (four-eyes): the initiator never counts.
    let policy = Policy::new(Verdict::RequireApproval).rule(
        Rule::new("payments", "send_money", Verdict::RequireApproval).gate(GateSpec {
            levels: vec![ApproverLevel {
                roles: vec!["finance".into()],
                timeout_secs: None,
            }],
            quorum: 2,
            ..GateSpec::default()
        }),
    );
    let engine = Engine::builder(
        SledStore::open(dir.path()).unwrap(),
        Registry::new().workflow("guarded", 1, guarded),
    )
    .policy(policy)
    .build()
    .unwrap();
    let workers = engine.spawn_workers();
    let server = common::serve(engine.clone(), tokens()).await;
    (dir, engine, workers, server)
}

async fn start(url: &str, kind: &str) -> String {
    let (st, b) = common::call(
        url,
        "POST",
        "/v1/runs",
        Some(INITIATOR),
        Some(json!({"workflow": "guarded", "input": kind})),
    )
    .await;
    assert_eq!(st, 201, "{b}");
    let run = b["run"].as_str().unwrap().to_string();
    let (st, _) = common::call(url, "GET", &format!("/v1/runs/{run}/wait"), Some(ADMIN), None).await;
    assert_eq!(st, 200);
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_refuses_missing_malformed_and_wrong_tokens() {
    let (_dir, _engine, _workers, server) = setup().await;
    let run = start(&server.url, "approval").await;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut tried = 0;
    for (path, methods) in server::routes() {
        let path = path.replace("{run}", &run).replace("{gate}", "1");
        for method in methods {
            for auth in [
                None,
                Some("Bearer"),
                Some("Basic cm9vdDpyb290"),
                Some("Bearer wrong-token-000000000"),
                Some("bearer "),
            ] {
                let url = format!("{}{path}", server.url);
                let status = tokio::task::spawn_blocking({
                    let agent = agent.clone();
                    let method = method.to_string();
                    move || {
                        let resp = match method.as_str() {
                            "GET" => {
                                let mut r = agent.get(&url);
                                if let Some(a) = auth {
                                    r = r.header("Authorization", a);
                                }
                                r.call()
                            }
                            _ => {
                                let mut r = agent.post(&url);
                                if let Some(a) = auth {
                                    r = r.header("Authorization", a);
                                }
                                r.send_json(json!({"decision": {"kind": "approve"}}))
                            }
                        };
                        resp.unwrap().status().as_u16()
                    }
                })
                .await
                .unwrap();
                assert_eq!(status, 401, "{method} {path} with {auth:?}");
                tried += 1;
            }
        }
    }
    assert!(tried >= 50, "tried {tried} requests");
    // Nothing was recorded by any of them.
    let (_, events) = common::call(
        &server.url,
        "GET",
        &format!("/v1/runs/{run}/events"),
        Some(ADMIN),
        None,
    )
    .await;
    assert!(!events
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["event"]["type"] == "decision-recorded" || e["event"]["type"] == "vote-recorded"));
    // Only /healthz is open.
    assert_eq!(
        common::call(&server.url, "GET", "/healthz", None, None).await.0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_table_has_no_deviations() {
    let (_dir, _engine, _workers, server) = setup().await;
    let url = server.url.clone();
    let who = [
        ("agent", AGENT),
        ("initiator", INITIATOR),
        ("outsider", OUTSIDER),
        ("approver", APPROVER),
        ("admin", ADMIN),
    ];
    // Expected status for each (action, principal), in `who` order.
    let expected: [(&str, [u16; 5]); 6] = [
        ("view", [200, 200, 200, 200, 200]),
        ("approve", [403, 403, 403, 200, 200]),
        ("edit", [403, 403, 403, 200, 200]),
        ("reject", [403, 200, 403, 200, 200]),
        ("respond", [403, 200, 403, 200, 200]),
        ("cancel", [200, 200, 403, 403, 200]),
    ];
    let mut deviations = Vec::new();
    let mut table = String::from("action    agent initiator outsider approver admin\n");
    for (action, row) in expected {
        table.push_str(&format!("{action:<9}"));
        for (i, (name, token)) in who.iter().enumerate() {
            let run = start(
                &url,
                if action == "respond" {
                    "question"
                } else {
                    "approval"
                },
            )
            .await;
            let decision = |d: Value| Some(json!({ "decision": d }));
            let (status, body) = match action {
                "view" => common::call(&url, "GET", &format!("/v1/runs/{run}"), Some(token), None).await,
                "approve" => {
                    common::call(
                        &url,
                        "POST",
                        &format!("/v1/runs/{run}/gates/1/decision"),
                        Some(token),
                        decision(json!({"kind": "approve"})),
                    )
                    .await
                }
                "edit" => {
                    common::call(
                        &url,
                        "POST",
                        &format!("/v1/runs/{run}/gates/1/decision"),
                        Some(token),
                        decision(json!({"kind": "edit", "args": {"amount_cents": 10}})),
                    )
                    .await
                }
                "reject" => {
                    common::call(
                        &url,
                        "POST",
                        &format!("/v1/runs/{run}/gates/1/decision"),
                        Some(token),
                        decision(json!({"kind": "reject", "reason": "no"})),
                    )
                    .await
                }
                "respond" => {
                    common::call(
                        &url,
                        "POST",
                        &format!("/v1/runs/{run}/gates/0/decision"),
                        Some(token),
                        decision(json!({"kind": "respond", "input": "acct-1"})),
                    )
                    .await
                }
                _ => {
                    common::call(
                        &url,
                        "POST",
                        &format!("/v1/runs/{run}/cancel"),
                        Some(token),
                        Some(json!({})),
                    )
                    .await
                }
            };
            table.push_str(&format!(" {status:>5}"));
            if status != row[i] {
                deviations.push(format!(
                    "{action} by {name}: expected {}, got {status}: {body}",
                    row[i]
                ));
            }
            // A refusal leaves no trace.
            if status == 403 {
                let (_, events) =
                    common::call(&url, "GET", &format!("/v1/runs/{run}/events"), Some(ADMIN), None).await;
                let recorded = events.as_array().unwrap().iter().any(|e| {
                    matches!(
                        e["event"]["type"].as_str(),
                        Some("decision-recorded" | "vote-recorded" | "run-cancelled")
                    )
                });
                if recorded {
                    deviations.push(format!("{action} by {name} was refused but recorded something"));
                }
            }
        }
        table.push('\n');
    }
    println!("{table}");
    assert!(
        deviations.is_empty(),
        "{} deviations:\n{}\n{table}",
        deviations.len(),
        deviations.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_headers_are_refused_and_the_server_keeps_serving() {
    let (_dir, _engine, _workers, server) = setup().await;
    let url = format!("{}/v1/pending", server.url);
    let status = tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let big = "x".repeat(1 << 20);
        match agent
            .get(&url)
            .header("Authorization", format!("Bearer {big}"))
            .header("X-Junk", &big)
            .call()
        {
            Ok(r) => r.status().as_u16(),
            // The server may close the connection instead of answering.
            Err(_) => 431,
        }
    })
    .await
    .unwrap();
    assert!((400..500).contains(&status), "{status}");
    assert_eq!(
        common::call(&server.url, "GET", "/v1/pending", Some(ADMIN), None)
            .await
            .0,
        200
    );
}
