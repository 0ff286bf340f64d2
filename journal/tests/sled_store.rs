//! What only the sled store has: a directory lock, leases recovered on reopen, group
//! commit. The `Store` contract itself is checked on every store by
//! `tests/conformance.rs`.

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
