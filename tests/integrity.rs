//! Corrupt journals and changed workflow code: typed errors, the bad run parked, the
//! others untouched (I7, I8).

use holdpoint::journal::{Error as JournalError, EventKind, RunStatus, Seq, Store};
use holdpoint::prelude::*;
use holdpoint::{replay, Replay};
use serde_json::json;
use std::path::Path;

mod common;

async fn two_steps_then_gate(ctx: Ctx, _: ()) -> Result<String, Failure> {
    ctx.step("fetch", || async { Ok(1) }).await?;
    ctx.step("plan", || async { Ok(2) }).await?;
    let _ = ctx
        .gate("delete_data", json!({"table": "users"}), json!(null))
        .await?;
    ctx.step("delete", || async { Ok(()) }).await?;
    Ok("done".into())
}

/// The same workflow after someone renamed a step and swapped two calls.
async fn changed(ctx: Ctx, _: ()) -> Result<String, Failure> {
    ctx.step("fetch", || async { Ok(1) }).await?;
    ctx.step("plan_v2", || async { Ok(2) }).await?;
    let _ = ctx
        .gate("delete_data", json!({"table": "users"}), json!(null))
        .await?;
    ctx.step("delete", || async { Ok(()) }).await?;
    Ok("done".into())
}

/// Same calls, but the gate now proposes different arguments than the reviewer saw.
async fn changed_args(ctx: Ctx, _: ()) -> Result<String, Failure> {
    ctx.step("fetch", || async { Ok(1) }).await?;
    ctx.step("plan", || async { Ok(2) }).await?;
    let _ = ctx
        .gate("delete_data", json!({"table": "orders"}), json!(null))
        .await?;
    ctx.step("delete", || async { Ok(()) }).await?;
    Ok("done".into())
}

fn engine(dir: &Path, registry: Registry) -> Engine<SledStore> {
    Engine::new(SledStore::open(dir).unwrap(), registry).unwrap()
}

async fn paused_run(dir: &Path) -> RunId {
    let e = engine(dir, Registry::new().workflow("w", 1, two_steps_then_gate));
    let run = e.start("w", &(), None).await.unwrap();
    e.drain().await.unwrap();
    assert_eq!(e.get(run).await.unwrap().summary.status, RunStatus::Waiting);
    e.into_store().ok().unwrap().close().unwrap();
    run
}

#[tokio::test]
async fn code_changed_under_a_paused_run_is_parked_as_stuck_with_a_diff() {
    let dir = tempfile::tempdir().unwrap();
    let run = paused_run(dir.path()).await;
    let e = engine(dir.path(), Registry::new().workflow("w", 1, changed));
    let gate = e.pending(None, 1).await.unwrap()[0].gate;
    e.decide(run, DecisionRequest::approve(gate, Principal::new("bob")))
        .await
        .unwrap();
    let before = e.events(run).await.unwrap();
    e.drain().await.unwrap();
    let s = e.store().summary(run).await.unwrap().unwrap();
    assert_eq!(s.status, RunStatus::Stuck);
    let why = s.stuck.unwrap();
    assert!(why.contains("HP-ND01"), "{why}");
    assert!(why.contains("position 1"), "{why}");
    assert!(why.contains(r#"- journal: step "plan""#), "{why}");
    assert!(why.contains(r#"+ code:    step "plan_v2""#), "{why}");
    // Nothing more was appended, and it is not retried in a loop.
    assert_eq!(e.events(run).await.unwrap(), before);
    assert_eq!(e.drain().await.unwrap(), 0);

    // The same check offline, before a deploy.
    match replay(&Registry::new().workflow("w", 1, changed), &before).await {
        Replay::Nondeterministic(nd) => {
            assert_eq!(nd.position.0, 1);
            assert_eq!(nd.seq, Seq(3));
        }
        other => panic!("expected nondeterminism, got {other:?}"),
    }
    assert!(matches!(
        replay(&Registry::new().workflow("w", 1, two_steps_then_gate), &before).await,
        Replay::Consistent { .. }
    ));
}

#[tokio::test]
async fn an_approval_is_bound_to_the_args_the_reviewer_saw() {
    let dir = tempfile::tempdir().unwrap();
    let run = paused_run(dir.path()).await;
    let e = engine(dir.path(), Registry::new().workflow("w", 1, changed_args));
    let gate = e.pending(None, 1).await.unwrap()[0].gate;
    e.decide(run, DecisionRequest::approve(gate, Principal::new("bob")))
        .await
        .unwrap();
    e.drain().await.unwrap();
    let s = e.store().summary(run).await.unwrap().unwrap();
    assert_eq!(s.status, RunStatus::Stuck);
    let why = s.stuck.unwrap();
    assert!(
        why.contains(r#""table":"users""#) && why.contains(r#""table":"orders""#),
        "{why}"
    );
    let deleted = e
        .events(run)
        .await
        .unwrap()
        .iter()
        .any(|ev| matches!(&ev.event, EventKind::StepStarted { name, .. } if name == "delete"));
    assert!(!deleted, "the action never ran with args nobody approved");
}

/// Flips one byte of one stored event, with the store closed, through sled directly.
fn flip_byte(dir: &Path, run: RunId, seq: u64, offset_from_end: usize) {
    let db = holdpoint::journal::sled_raw_config(dir).open().unwrap();
    let events = db.open_tree("events").unwrap();
    common::edit_record(&events, run, seq, |record| {
        let i = record.len() - offset_from_end;
        record[i] ^= 0x20;
    });
    drop(events);
    common::release_sled(db, dir);
}

#[tokio::test]
async fn a_flipped_byte_quarantines_that_run_only() {
    let dir = tempfile::tempdir().unwrap();
    let (bad, good) = {
        let e = engine(dir.path(), Registry::new().workflow("w", 1, two_steps_then_gate));
        let bad = e.start("w", &(), None).await.unwrap();
        let good = e.start("w", &(), None).await.unwrap();
        e.drain().await.unwrap();
        e.into_store().ok().unwrap().close().unwrap();
        (bad, good)
    };
    flip_byte(dir.path(), bad, 2, 5);

    let e = engine(dir.path(), Registry::new().workflow("w", 1, two_steps_then_gate));
    match e.events(bad).await.unwrap_err() {
        holdpoint::Error::Journal(JournalError::Corrupt { run, seq, reason }) => {
            assert_eq!(run, bad);
            assert_eq!(seq, Seq(2));
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected corruption, got {other}"),
    }
    // Deciding on the corrupt run refuses (it cannot be read), and records nothing.
    let gate = holdpoint::journal::GateId(2);
    assert!(e
        .decide(bad, DecisionRequest::approve(gate, Principal::new("bob")))
        .await
        .is_err());
    // The other run decides and completes.
    e.decide(good, DecisionRequest::approve(gate, Principal::new("bob")))
        .await
        .unwrap();
    e.drain().await.unwrap();
    assert_eq!(e.get(good).await.unwrap().summary.status, RunStatus::Completed);
}

#[tokio::test]
async fn a_worker_meeting_a_corrupt_journal_parks_it_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (bad, good) = {
        let e = engine(dir.path(), Registry::new().workflow("w", 1, two_steps_then_gate));
        let bad = e.start("w", &(), None).await.unwrap();
        let good = e.start("w", &(), None).await.unwrap();
        e.into_store().ok().unwrap().close().unwrap();
        (bad, good)
    };
    // Corrupt run-started of `bad` before any worker touched it.
    flip_byte(dir.path(), bad, 0, 3);
    let e = engine(dir.path(), Registry::new().workflow("w", 1, two_steps_then_gate));
    e.drain().await.unwrap();
    let s = e.store().summary(bad).await.unwrap().unwrap();
    assert_eq!(s.status, RunStatus::Stuck);
    let why = s.stuck.unwrap();
    assert!(why.contains("quarantined") && why.contains("seq 0"), "{why}");
    assert_eq!(e.get(good).await.unwrap().summary.status, RunStatus::Waiting);
}

#[tokio::test]
async fn an_edited_and_rechecksummed_event_breaks_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let run = paused_run(dir.path()).await;
    {
        // Rewrite step output 1 -> 9 and fix up the CRC, as a careful tamperer would.
        let db = holdpoint::journal::sled_raw_config(dir.path()).open().unwrap();
        let events = db.open_tree("events").unwrap();
        let key = common::event_key(run, 2);
        // Seq 2 is packed with seq 3 (one commit): the edit stays inside its record.
        assert_eq!(common::held_record(&events, run, 2).unwrap().2, 0);
        common::edit_record(&events, run, 2, |record| {
            // Record format 2: 37 header bytes, 14 envelope bytes, then the event
            // kind's JSON.
            let body = String::from_utf8(record[51..].to_vec()).unwrap();
            assert!(body.contains(r#""output":1"#), "{body}");
            let body = body.replace(r#""output":1"#, r#""output":9"#);
            record.truncate(51);
            record.extend_from_slice(body.as_bytes());
            // The checksum covers the record's place (run and seq) too.
            let mut crc = crc32fast::Hasher::new();
            crc.update(&key);
            crc.update(&record[5..]);
            record[1..5].copy_from_slice(&crc.finalize().to_be_bytes());
        });
        drop(events);
        common::release_sled(db, dir.path());
    }
    let e = engine(dir.path(), Registry::new().workflow("w", 1, two_steps_then_gate));
    match e.events(run).await.unwrap_err() {
        holdpoint::Error::Journal(JournalError::Corrupt { seq, reason, .. }) => {
            assert_eq!(seq, Seq(3), "the next event's link exposes the edit");
            assert!(reason.contains("hash chain"), "{reason}");
        }
        other => panic!("expected corruption, got {other}"),
    }
}

#[tokio::test]
async fn a_truncated_journal_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let run = paused_run(dir.path()).await;
    {
        let db = holdpoint::journal::sled_raw_config(dir.path()).open().unwrap();
        let events = db.open_tree("events").unwrap();
        let mut key = run.as_bytes().to_vec();
        key.extend_from_slice(&4u64.to_be_bytes());
        assert!(events.remove(key).unwrap().is_some());
        drop(events);
        common::release_sled(db, dir.path());
    }
    let e = engine(dir.path(), Registry::new().workflow("w", 1, two_steps_then_gate));
    match e.events(run).await.unwrap_err() {
        holdpoint::Error::Journal(JournalError::Corrupt { seq, reason, .. }) => {
            assert_eq!(seq, Seq(4));
            assert!(reason.contains("missing"), "{reason}");
        }
        other => panic!("expected corruption, got {other}"),
    }
}

async fn chatty(ctx: Ctx, n: u32) -> Result<u32, Failure> {
    for i in 0..n {
        ctx.step(&format!("s{i}"), || async { Ok("x".repeat(200)) })
            .await?;
    }
    Ok(n)
}

async fn chatty_then_gate(ctx: Ctx, n: u32) -> Result<String, Failure> {
    chatty(ctx.clone(), n).await?;
    match ctx.gate("send_money", json!({"amount": 1}), json!(null)).await? {
        holdpoint::Gated::Rejected { reason, .. } => Ok(format!("rejected: {reason}")),
        _ => Ok("approved".into()),
    }
}

fn limited(dir: &Path, events: u64, bytes: u64) -> Engine<SledStore> {
    let options = holdpoint::journal::SledOptions {
        max_run_events: events,
        max_run_bytes: bytes,
        ..Default::default()
    };
    Engine::new(
        SledStore::open_with(dir, options).unwrap(),
        Registry::new()
            .workflow("chatty", 1, chatty)
            .workflow("gated", 1, chatty_then_gate),
    )
    .unwrap()
}

#[tokio::test]
async fn a_run_over_its_event_or_byte_limit_fails_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let e = limited(dir.path(), 30, 1 << 20);
    let run = e.start("chatty", &100u32, None).await.unwrap();
    e.drain().await.unwrap();
    let view = e.get(run).await.unwrap();
    assert_eq!(view.summary.status, RunStatus::Failed);
    assert!(
        view.state.error.as_deref().unwrap().contains("reached its limit"),
        "{:?}",
        view.state.error
    );
    assert!(view.summary.next_seq.0 <= 30 + 1);
    // Another run under the limit is unaffected.
    let ok = e.start("chatty", &3u32, None).await.unwrap();
    e.drain().await.unwrap();
    assert_eq!(e.get(ok).await.unwrap().summary.status, RunStatus::Completed);

    let dir = tempfile::tempdir().unwrap();
    let e = limited(dir.path(), 100_000, 4096);
    let run = e.start("chatty", &100u32, None).await.unwrap();
    e.drain().await.unwrap();
    let view = e.get(run).await.unwrap();
    assert_eq!(view.summary.status, RunStatus::Failed);
    assert!(view.summary.bytes <= 4096 + 1024 * 1024);
}

#[tokio::test]
async fn a_run_at_its_limit_can_still_be_rejected_or_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    // 5 steps (10 events) + run-started + approval-requested = 12: exactly at the limit.
    let e = limited(dir.path(), 12, 1 << 20);
    let rejected = e.start("gated", &5u32, None).await.unwrap();
    let cancelled = e.start("gated", &5u32, None).await.unwrap();
    e.drain().await.unwrap();
    for run in [rejected, cancelled] {
        let s = e.store().summary(run).await.unwrap().unwrap();
        assert_eq!((s.status, s.next_seq.0), (RunStatus::Waiting, 12));
    }
    let gate = e.pending(None, 10).await.unwrap()[0].gate;
    e.decide(
        rejected,
        DecisionRequest::reject(gate, "over budget", Principal::new("bob")),
    )
    .await
    .unwrap();
    e.cancel(cancelled, Principal::new("op"), Some("stop".into()))
        .await
        .unwrap();
    e.drain().await.unwrap();
    let view = e.get(rejected).await.unwrap();
    assert_eq!(view.summary.status, RunStatus::Completed);
    assert_eq!(view.state.output, Some(json!("rejected: over budget")));
    assert_eq!(
        e.get(cancelled).await.unwrap().summary.status,
        RunStatus::Cancelled
    );
}

/// The same calls, but step "plan" now returns text where the journal holds a number.
async fn changed_output_type(ctx: Ctx, _: ()) -> Result<String, Failure> {
    ctx.step("fetch", || async { Ok(1) }).await?;
    let _plan: String = ctx.step("plan", || async { Ok("two".to_string()) }).await?;
    let _ = ctx
        .gate("delete_data", json!({"table": "users"}), json!(null))
        .await?;
    ctx.step("delete", || async { Ok(()) }).await?;
    Ok("done".into())
}

#[tokio::test]
async fn a_step_whose_output_type_changed_is_reported_with_the_recorded_output() {
    let dir = tempfile::tempdir().unwrap();
    let run = paused_run(dir.path()).await;
    let e = engine(dir.path(), Registry::new().workflow("w", 1, two_steps_then_gate));
    let journal = e.events(run).await.unwrap();
    match replay(&Registry::new().workflow("w", 1, changed_output_type), &journal).await {
        Replay::Nondeterministic(nd) => {
            assert_eq!(nd.position.0, 1);
            assert_eq!(nd.expected, r#"step "plan" with output 2"#);
            assert!(
                nd.found.contains("whose output type no longer reads it"),
                "{}",
                nd.found
            );
            assert!(nd.found.contains("expected a string"), "{}", nd.found);
        }
        other => panic!("expected nondeterminism, got {other:?}"),
    }
    // The typed outputs of the unchanged code still read back.
    assert!(matches!(
        replay(&Registry::new().workflow("w", 1, two_steps_then_gate), &journal).await,
        Replay::Consistent { .. }
    ));
}
