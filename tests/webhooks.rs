//! Webhooks end to end, in this process: a real HTTP receiver on loopback that is down
//! (503) at first, an endpoint that is dead for good, and gates that open, escalate,
//! time out and are decided under a manual clock. (Across a SIGKILL of the real server:
//! `tests/cli.rs`.)

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use holdpoint::journal::{
    ApproverLevel, GateSpec, NotificationKind, SledOptions, SledStore, Store, TimeoutOutcome, Verdict,
};
use holdpoint::prelude::*;
use holdpoint::webhooks::{self, DeliveryOptions, WebhookConfig, Webhooks};
use holdpoint::{Acted, Engine, ManualClock, Policy, Rule};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const SECRET: &str = "a-secret-of-some-length";

async fn payer(ctx: Ctx, amount: u64) -> Result<String, Failure> {
    let acted = ctx
        .act("send_money", json!({"to": "ben", "amount_cents": amount}))
        .run(|args: Value| async move { Ok(args) })
        .await?;
    Ok(match acted {
        Acted::Done { .. } => "paid".into(),
        Acted::Denied { reason, .. } => reason,
        Acted::Rejected { reason, by } => format!("rejected by {by}: {reason}"),
    })
}

/// What the receiver saw: (headers, body) of each accepted delivery.
struct Receiver {
    url: String,
    got: mpsc::UnboundedReceiver<(HeaderMap, Bytes)>,
    attempts: Arc<AtomicUsize>,
}

/// A receiver that answers 503 to its first `down_for` requests, then 200.
async fn receiver(down_for: usize) -> Receiver {
    let (tx, got) = mpsc::unbounded_channel();
    let attempts = Arc::new(AtomicUsize::new(0));
    let seen = attempts.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, body: Bytes| {
            let tx = tx.clone();
            let seen = seen.clone();
            async move {
                if seen.fetch_add(1, Ordering::SeqCst) < down_for {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                let _ = tx.send((headers, body));
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Receiver { url, got, attempts }
}

fn clock() -> ManualClock {
    ManualClock::new(
        chrono::DateTime::parse_from_rfc3339("2026-03-01T09:00:00Z")
            .unwrap()
            .to_utc(),
    )
}

/// Checks one delivery's signature and headers; returns its body.
fn checked(headers: &HeaderMap, body: &[u8]) -> Value {
    let sig = headers[webhooks::SIGNATURE_HEADER].to_str().unwrap();
    let now = chrono::Utc::now().timestamp();
    webhooks::verify_signature(SECRET, sig, body, now, Duration::from_secs(300))
        .expect("signed with the secret");
    assert!(webhooks::verify_signature(
        "another-secret-entirely",
        sig,
        body,
        now,
        Duration::from_secs(300)
    )
    .is_err());
    let mut tampered = body.to_vec();
    tampered[2] ^= 1;
    assert!(webhooks::verify_signature(SECRET, sig, &tampered, now, Duration::from_secs(300)).is_err());
    assert!(
        webhooks::verify_signature(SECRET, sig, body, now + 3600, Duration::from_secs(300)).is_err(),
        "a replay an hour later is refused"
    );
    let v: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(
        headers[webhooks::DELIVERY_HEADER].to_str().unwrap(),
        v["id"].as_str().unwrap()
    );
    assert_eq!(
        headers[webhooks::EVENT_HEADER].to_str().unwrap(),
        v["type"].as_str().unwrap()
    );
    v
}

/// The next accepted delivery, checked.
async fn next(rx: &mut Receiver) -> Value {
    let (h, b) = rx.got.recv().await.unwrap();
    checked(&h, &b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gates_opening_escalating_timing_out_and_decided_reach_the_receiver_signed_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut rx = receiver(2).await;
    let config = WebhookConfig::from_toml(&format!(
        r#"
        public_url = "https://inbox.example.com/"
        [[endpoints]]
        name = "ops"
        url = "{}"
        secret = "{SECRET}"
        [[endpoints]]
        name = "dead"
        url = "http://127.0.0.1:1/never"
        secret = "{SECRET}"
        "#,
        rx.url
    ))
    .unwrap();

    let store = SledStore::open_with(
        dir.path(),
        SledOptions {
            outbox_endpoints: config.names(),
            ..Default::default()
        },
    )
    .unwrap();
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
    let policy = Policy::new(Verdict::RequireApproval)
        .rule(Rule::new("guarded", "send_money", Verdict::RequireApproval).gate(spec));
    let engine = Engine::builder(store, Registry::new().workflow("payer", 1, payer))
        .clock(clock.clone())
        .policy(policy)
        .build()
        .unwrap();
    let workers = engine.spawn_workers();
    let hooks = Webhooks::spawn(
        engine.store().clone(),
        &config,
        config.public_url.clone().unwrap(),
        DeliveryOptions {
            backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(20),
            timeout: Duration::from_secs(5),
        },
    );

    // Run 1: opens (delivered after the receiver's two 503s), escalates, times out.
    let first = engine.start("payer", &48_000, None).await.unwrap();
    engine.settled(first).await.unwrap();
    let opened = next(&mut rx).await;
    assert_eq!(opened["type"], "gate.opened");
    assert_eq!(opened["run"], json!(first));
    assert_eq!(opened["action"], "send_money");
    assert_eq!(opened["workflow"], "payer");
    assert_eq!(opened["deadline"], "2026-03-01T10:00:00Z");
    let gate = opened["gate"].as_u64().unwrap();
    assert_eq!(
        opened["link"],
        format!("https://inbox.example.com/runs/{first}/gates/{gate}")
    );
    assert_eq!(opened["id"], format!("{first}:{}", opened["seq"]));

    clock.advance(Duration::from_secs(3601));
    let escalated = next(&mut rx).await;
    assert_eq!(
        (&escalated["type"], &escalated["level"], &escalated["action"]),
        (&json!("gate.escalated"), &json!(1), &json!("send_money"))
    );
    clock.advance(Duration::from_secs(3601));
    let timed_out = next(&mut rx).await;
    assert_eq!(timed_out["type"], "gate.timed_out");
    assert_eq!(timed_out["decision"], "reject");
    assert_eq!(timed_out["by"], "system");
    let done = engine.settled(first).await.unwrap();
    assert_eq!(done.status, RunStatus::Completed);

    // Run 2: opened, then decided by a team lead. The dead endpoint blocks nothing.
    let second = engine.start("payer", &48_000, None).await.unwrap();
    engine.settled(second).await.unwrap();
    let opened = next(&mut rx).await;
    assert_eq!(
        (&opened["type"], &opened["run"]),
        (&json!("gate.opened"), &json!(second))
    );
    let mut req = DecisionRequest::approve(
        GateId(opened["gate"].as_u64().unwrap() as u32),
        Principal::new("ted"),
    );
    req.roles = Some(vec!["team-lead".into()]);
    engine.decide(second, req).await.unwrap();
    let decided = next(&mut rx).await;
    assert_eq!(
        (&decided["type"], &decided["decision"], &decided["by"]),
        (&json!("gate.decided"), &json!("approve"), &json!("ted"))
    );
    assert_eq!(engine.settled(second).await.unwrap().status, RunStatus::Completed);
    assert_eq!(
        rx.attempts.load(Ordering::SeqCst),
        5 + 2,
        "two refused attempts, then five deliveries"
    );

    hooks.shutdown().await;
    workers.shutdown().await;
    let store = engine.store();
    assert!(
        store.outbox("ops", 100).await.unwrap().is_empty(),
        "delivered notifications leave the queue"
    );
    let dead: Vec<NotificationKind> = store
        .outbox("dead", 100)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.notification.kind)
        .collect();
    assert_eq!(
        dead,
        vec![
            NotificationKind::GateOpened,
            NotificationKind::GateEscalated,
            NotificationKind::GateTimedOut,
            NotificationKind::GateOpened,
            NotificationKind::GateDecided,
        ],
        "the dead endpoint's queue keeps everything, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_only_gets_the_kinds_it_asked_for_and_a_dropped_endpoint_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let mut rx = receiver(0).await;
    let config = WebhookConfig::from_toml(&format!(
        "[[endpoints]]\nname = \"decisions\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\nevents = [\"gate.decided\"]\n",
        rx.url
    ))
    .unwrap();
    let open = |names: Vec<String>| {
        SledStore::open_with(
            dir.path(),
            SledOptions {
                outbox_endpoints: names,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let engine = Engine::builder(
        open(vec!["decisions".into(), "old".into()]),
        Registry::new().workflow("payer", 1, payer),
    )
    .build()
    .unwrap();
    let workers = engine.spawn_workers();
    let hooks = Webhooks::spawn(
        engine.store().clone(),
        &config,
        "http://localhost".into(),
        DeliveryOptions::default(),
    );
    let run = engine.start("payer", &5, None).await.unwrap();
    engine.settled(run).await.unwrap();
    let gate = engine.pending(None, 1).await.unwrap()[0].gate;
    engine
        .decide(run, DecisionRequest::approve(gate, Principal::new("bob")))
        .await
        .unwrap();
    let (h, b) = rx.got.recv().await.unwrap();
    assert_eq!(checked(&h, &b)["type"], "gate.decided", "gate.opened was skipped");
    hooks.shutdown().await;
    workers.shutdown().await;
    assert_eq!(rx.attempts.load(Ordering::SeqCst), 1);
    let store = engine.into_store().ok().unwrap();
    assert_eq!(store.outbox("old", 10).await.unwrap().len(), 2);
    store.close().unwrap();
    // Reopened without "old": its queue is dropped, not kept forever.
    let store = open(vec!["decisions".into()]);
    assert!(store.outbox("old", 10).await.unwrap().is_empty());
}

#[test]
fn a_bad_webhooks_file_is_refused_with_the_reason() {
    for (text, says) in [
        ("[[endpoints]]\nname = \"a\"\nurl = \"ftp://x\"\nsecret = \"0123456789abcdef\"", "http"),
        ("[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\nsecret = \"short\"", "at least 16"),
        (
            "[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\nsecret = \"0123456789abcdef\"\n[[endpoints]]\nname = \"a\"\nurl = \"http://y\"\nsecret = \"0123456789abcdef\"",
            "twice",
        ),
        ("[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\nsecret = \"0123456789abcdef\"\nevents = [\"gate.exploded\"]", "unknown variant"),
        ("[[endpoint]]\nname = \"a\"", "unknown field"),
    ] {
        let err = WebhookConfig::from_toml(text).unwrap_err();
        assert!(err.contains(says), "{text}: {err}");
    }
    let d = DeliveryOptions::default();
    assert_eq!(
        (d.delay(1), d.delay(2), d.delay(4), d.delay(40)),
        (
            Duration::from_secs(1),
            Duration::from_secs(2),
            Duration::from_secs(8),
            Duration::from_secs(300)
        )
    );
}
