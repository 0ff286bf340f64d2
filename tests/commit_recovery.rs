//! A sled commit cut by a crash after its events and summary reached the disk but before
//! its index changes: reopening finishes it (see `sled_store`'s module docs). The crash
//! is real: a child process aborts at the `commit-before-indexes` failpoint, after a
//! flush, so the half-done commit is what the next open finds.
#![cfg(feature = "failpoints")]

use chrono::Utc;
use holdpoint::journal::*;
use serde_json::json;
use std::path::Path;
use std::process::Command;

mod common;

use common::{approve, gate_with};

const CHILD: &str = "HOLDPOINT_COMMIT_CHILD";

/// The child: one run, a gate with a deadline, then its decision. The failpoint fires at
/// the `n`-th commit that passes it.
async fn write_until_crash(dir: &Path) {
    let store = SledStore::open(dir).unwrap();
    let run = RunId::new();
    store
        .create_run(NewRun {
            id: run,
            started_by: None,
            workflow: "pay".into(),
            version: 1,
            input: json!({}),
            idempotency_key: Some("k1".into()),
            at: Utc::now(),
        })
        .await
        .unwrap();
    let deadline = Utc::now() + chrono::Duration::hours(1);
    for (expected, event) in [
        (1, gate_with(0, Some(deadline), Some("payments"))),
        (2, approve(0, "alice")),
    ] {
        store
            .append(Append {
                run,
                expected: Seq(expected),
                at: Utc::now(),
                events: vec![event],
                lease: None,
            })
            .await
            .unwrap()
            .unwrap();
    }
    println!("no crash");
}

fn crash_at(dir: &Path, pass: u32) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_commit_cut_before_its_indexes_is_finished_on_open",
            "--nocapture",
        ])
        .env(CHILD, dir)
        .env("HOLDPOINT_FAILPOINT", format!("commit-before-indexes:{pass}"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("failpoint commit-before-indexes"),
        "the child was to abort at the failpoint: {stderr}"
    );
}

#[tokio::test]
async fn a_commit_cut_before_its_indexes_is_finished_on_open() {
    if let Some(dir) = std::env::var_os(CHILD) {
        // In the child: write until the failpoint aborts the process.
        write_until_crash(Path::new(&dir)).await;
        return;
    }
    // Pass 1: the gate's commit (events and summary on disk, no pending entry, no
    // deadline entry yet).
    let dir = tempfile::tempdir().unwrap();
    crash_at(dir.path(), 1);
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    let pending = store.pending(None, 10).await.unwrap();
    assert_eq!(pending.len(), 1, "the gate the cut commit opened is pending");
    let run = pending[0].run;
    assert_eq!(store.read(run, Seq::ZERO).await.unwrap().len(), 2);
    let summary = store.summary(run).await.unwrap().unwrap();
    assert_eq!(summary.status, RunStatus::Waiting);
    assert!(store.next_deadline().await.unwrap().is_some());
    store.close().unwrap();

    // Pass 2: the decision's commit (the gate is decided in the journal and the
    // summary; its pending entry and deadline are still there, the rule history and the
    // wake-up not yet).
    let dir = tempfile::tempdir().unwrap();
    crash_at(dir.path(), 2);
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    assert!(
        store.pending(None, 10).await.unwrap().is_empty(),
        "the decided gate is closed"
    );
    assert_eq!(
        store.next_deadline().await.unwrap(),
        None,
        "its deadline is cleared"
    );
    let history = store.rule_history("payments", 10).await.unwrap();
    assert_eq!(history.len(), 1, "the decision is in the rule's history");
    let run = history[0].run;
    let summary = store.summary(run).await.unwrap().unwrap();
    assert_eq!(summary.status, RunStatus::Running);
    assert!(summary.wake_at.is_some(), "the decision woke the run");
    let leases = store
        .claim(
            WorkerId::new(),
            Utc::now(),
            std::time::Duration::from_secs(30),
            10,
        )
        .await
        .unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].run, run);
    store.close().unwrap();
}
