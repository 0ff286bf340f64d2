//! The sled store against the `Store` contract, on real sled in temp directories.

use chrono::Utc;
use holdpoint_journal::*;
use serde_json::json;
use std::time::Duration;

fn new_run(workflow: &str) -> NewRun {
    NewRun {
        id: RunId::new(),
        started_by: None,
        workflow: workflow.into(),
        version: 1,
        input: json!({"n": 1}),
        idempotency_key: None,
        at: Utc::now(),
    }
}

fn step(p: u32) -> EventKind {
    EventKind::StepCompleted {
        position: Position(p),
        output: json!(p),
    }
}

fn gate(p: u32) -> EventKind {
    EventKind::ApprovalRequested {
        gate: GateId(p),
        kind: GateKind::Approval,
        action: "send_money".into(),
        args: json!({"amount": p}),
        context: json!(null),
        reason: "test".into(),
        allowed: vec![DecisionKind::Approve, DecisionKind::Reject],
        deadline: None,
        rule: None,
        spec: None,
    }
}

fn append(run: RunId, expected: u64, events: Vec<EventKind>) -> Append {
    Append {
        run,
        expected: Seq(expected),
        at: Utc::now(),
        events,
        lease: None,
    }
}

#[tokio::test]
async fn append_at_wrong_seq_is_a_conflict_value_saying_what_is_there() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let run = store.create_run(new_run("w")).await.unwrap().run();
    let ok = store
        .append(append(run, 1, vec![step(0), step(1)]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ok.next, Seq(3));
    let conflict = store
        .append(append(run, 1, vec![step(2)]))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(conflict.expected, Seq(1));
    assert_eq!(conflict.found, Seq(3));
    let events = store.read(run, Seq::ZERO).await.unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events.iter().map(|e| e.seq.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    // Reading from the middle verifies the link to the event before.
    assert_eq!(store.read(run, Seq(2)).await.unwrap().len(), 1);
    assert!(matches!(
        store
            .append(append(RunId::new(), 0, vec![step(0)]))
            .await
            .unwrap_err(),
        Error::UnknownRun(_)
    ));
}

#[tokio::test]
async fn oversized_event_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open_with(
        dir.path(),
        SledOptions {
            max_event_bytes: 1024,
            ..Default::default()
        },
    )
    .unwrap();
    let run = store.create_run(new_run("w")).await.unwrap().run();
    let big = EventKind::StepCompleted {
        position: Position(0),
        output: json!("x".repeat(2000)),
    };
    let err = store
        .append(append(run, 1, vec![step(0), big]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::EventTooLarge { limit: 1024, .. }), "{err}");
    assert_eq!(store.read(run, Seq::ZERO).await.unwrap().len(), 1);
    assert_eq!(store.summary(run).await.unwrap().unwrap().next_seq, Seq(1));
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let _first = SledStore::open(dir.path()).unwrap();
    let err = SledStore::open(dir.path()).err().expect("second open must fail");
    match &err {
        Error::Locked { dir: d, .. } => assert_eq!(d, dir.path()),
        other => panic!("expected Locked, got {other}"),
    }
    assert!(err.to_string().contains(&dir.path().display().to_string()));
}

#[tokio::test]
async fn gates_index_follows_events_and_pages_without_scanning_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let mut runs = Vec::new();
    for _ in 0..5 {
        let run = store.create_run(new_run("w")).await.unwrap().run();
        store
            .append(append(run, 1, vec![gate(0)]))
            .await
            .unwrap()
            .unwrap();
        runs.push(run);
    }
    // A run without a gate is not in the inbox.
    store.create_run(new_run("w")).await.unwrap();
    let page1 = store.pending(None, 3).await.unwrap();
    let page2 = store
        .pending(Some((page1[2].run, page1[2].gate)), 3)
        .await
        .unwrap();
    let all: Vec<RunId> = page1.iter().chain(&page2).map(|g| g.run).collect();
    assert_eq!(all, runs, "pending pages in run (creation) order");
    assert_eq!(
        store
            .list_runs(Some(RunStatus::Waiting), None, 100)
            .await
            .unwrap()
            .len(),
        5
    );
    assert_eq!(
        store
            .list_runs(Some(RunStatus::Running), None, 100)
            .await
            .unwrap()
            .len(),
        1
    );
    // A decision closes the gate and makes the run ready again.
    let decided = EventKind::DecisionRecorded {
        gate: GateId(0),
        decision: Decision::Approve,
        by: Principal::new("bob"),
        comment: None,
        idempotency_key: None,
        request_hash: None,
    };
    store
        .append(append(runs[0], 2, vec![decided]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.pending(None, 100).await.unwrap().len(), 4);
    let s = store.summary(runs[0]).await.unwrap().unwrap();
    assert_eq!(s.status, RunStatus::Running);
    assert!(s.wake_at.is_some());
    // Ending a run drops its open gates from the inbox.
    store
        .append(append(
            runs[1],
            2,
            vec![EventKind::RunCancelled {
                by: Principal::new("op"),
                reason: None,
            }],
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.pending(None, 100).await.unwrap().len(), 3);
    assert!(matches!(
        store.append(append(runs[1], 3, vec![step(0)])).await.unwrap_err(),
        Error::RunEnded(_)
    ));
}

#[tokio::test]
async fn leases_fence_appends_and_are_recovered_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let worker = WorkerId::new();
    let run;
    {
        let store = SledStore::open(dir.path()).unwrap();
        run = store.create_run(new_run("w")).await.unwrap().run();
        let leases = store
            .claim(worker, Utc::now(), Duration::from_secs(30), 10)
            .await
            .unwrap();
        assert_eq!(leases.len(), 1);
        assert!(store.is_leased(run).await.unwrap());
        // A second claim finds nothing: the run is held.
        assert!(store
            .claim(WorkerId::new(), Utc::now(), Duration::from_secs(30), 10)
            .await
            .unwrap()
            .is_empty());
        let mut stale = append(run, 1, vec![step(0)]);
        stale.lease = Some(LeaseToken(leases[0].token.0 + 1000));
        assert!(matches!(
            store.append(stale).await.unwrap_err(),
            Error::LeaseLost(_)
        ));
        let mut good = append(run, 1, vec![step(0)]);
        good.lease = Some(leases[0].token);
        store.append(good).await.unwrap().unwrap();
        // The process "dies" holding the lease.
        store.close().unwrap();
    }
    let store = SledStore::open(dir.path()).unwrap();
    assert!(!store.is_leased(run).await.unwrap());
    let leases = store
        .claim(worker, Utc::now(), Duration::from_secs(30), 10)
        .await
        .unwrap();
    assert_eq!(leases.iter().map(|l| l.run).collect::<Vec<_>>(), vec![run]);
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_the_old_holder_cannot_append() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let run = store.create_run(new_run("w")).await.unwrap().run();
    let t0 = Utc::now();
    let old = store
        .claim(WorkerId::new(), t0, Duration::from_secs(1), 1)
        .await
        .unwrap()
        .remove(0);
    let later = t0 + chrono::Duration::seconds(5);
    let new = store
        .claim(WorkerId::new(), later, Duration::from_secs(30), 1)
        .await
        .unwrap()
        .remove(0);
    assert!(new.token > old.token);
    let mut a = append(run, 1, vec![step(0)]);
    a.lease = Some(old.token);
    assert!(matches!(store.append(a).await.unwrap_err(), Error::LeaseLost(_)));
    assert_eq!(
        store.renew(&old, later, Duration::from_secs(30)).await.unwrap(),
        None
    );
    assert!(store
        .renew(&new, later, Duration::from_secs(30))
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn a_wake_up_during_a_lease_is_kept_for_its_release() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let run = store.create_run(new_run("w")).await.unwrap().run();
    let lease = store
        .claim(WorkerId::new(), Utc::now(), Duration::from_secs(30), 1)
        .await
        .unwrap()
        .remove(0);
    let mut a = append(run, 1, vec![gate(0)]);
    a.lease = Some(lease.token);
    store.append(a).await.unwrap().unwrap();
    // A decision lands while the worker still holds the run.
    let decided = EventKind::DecisionRecorded {
        gate: GateId(0),
        decision: Decision::Approve,
        by: Principal::new("bob"),
        comment: None,
        idempotency_key: None,
        request_hash: None,
    };
    store
        .append(append(run, 2, vec![decided]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.next_wake().await.unwrap(), None, "not queued while leased");
    store.release(&lease, None).await.unwrap();
    let again = store
        .claim(WorkerId::new(), Utc::now(), Duration::from_secs(30), 1)
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "the decision's wake-up survived the release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_group_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let mut runs = Vec::new();
    for _ in 0..64 {
        runs.push(store.create_run(new_run("w")).await.unwrap().run());
    }
    let before = store.sync_count();
    let mut tasks = Vec::new();
    for run in runs {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10u32 {
                store
                    .append(append(run, 1 + i as u64, vec![step(i)]))
                    .await
                    .unwrap()
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let syncs = store.sync_count() - before;
    // 640 acknowledged appends; with group commit far fewer syncs than appends.
    assert!(syncs < 640, "{syncs} syncs for 640 appends");
    assert!(syncs > 0);
}

/// Regression (found by `tests/races.rs`): `read` took the summary, then scanned the
/// events tree to its end; an append landing in between showed up as "events past the
/// summary", and a healthy journal was reported corrupt — which would have made a worker
/// quarantine a run a decision had just reached. `read` now scans only up to the
/// summary's `next_seq`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_racing_appends_never_see_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let run = store.create_run(new_run("w")).await.unwrap().run();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..400u32 {
                store
                    .append(append(run, 1 + i as u64, vec![step(i)]))
                    .await
                    .unwrap()
                    .unwrap();
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() {
        let events = store
            .read(run, Seq::ZERO)
            .await
            .expect("a read racing appends is consistent");
        assert!(events.windows(2).all(|w| w[1].seq == w[0].seq.next()));
        reads += 1;
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
    assert_eq!(store.read(run, Seq::ZERO).await.unwrap().len(), 401);
    assert!(reads > 1);
}
