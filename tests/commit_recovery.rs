//! A sled commit cut by a crash: after its events reached the disk but before its index
//! changes (its summary, and those of the run's commits since its creation, only in
//! memory), reopening finishes it; before its last event, which ends it (a commit of
//! several events is one value, written last), or between its events (as builds before
//! packed commits wrote them), reopening undoes it (see `sled_store`'s module docs). The crashes are real: a
//! child process aborts at a failpoint, after a flush, so the half-done commit is what
//! the next open finds. The store queues webhook notifications, which a commit writes
//! before its last event: an undone commit's are dropped, a finished commit's are not
//! queued twice.
#![cfg(feature = "failpoints")]

use chrono::Utc;
use holdpoint::journal::*;
use std::path::Path;

mod common;

use common::{claim_only, gate_with, queued, the_creation};

const CHILD: &str = "HOLDPOINT_COMMIT_CHILD";

/// The child (see [`common::write_four_commits`]).
async fn write_until_crash(dir: &Path) {
    common::write_four_commits(&open(dir)).await;
}

/// Set for a child that writes a commit's records under keys of their own, as builds
/// before packed commits did.
const UNPACKED: &str = "HOLDPOINT_COMMIT_UNPACKED";

/// The store, queueing notifications for one endpoint.
fn open(dir: &Path) -> SledStore {
    SledStore::open_with(
        dir,
        SledOptions {
            outbox_endpoints: vec!["ops".into()],
            pack_commits: std::env::var_os(UNPACKED).is_none(),
            ..SledOptions::default()
        },
    )
    .unwrap()
}

/// Runs the test `test` as a child writing into `dir` until `point` aborts it at its
/// `pass`-th pass.
fn crash_at(dir: &Path, test: &str, point: &str, pass: u32) {
    crash_child(dir, test, point, pass, true)
}

/// [`crash_at`], with the child writing each record under its own key.
fn crash_unpacked_at(dir: &Path, test: &str, point: &str, pass: u32) {
    crash_child(dir, test, point, pass, false)
}

fn crash_child(dir: &Path, test: &str, point: &str, pass: u32, packed: bool) {
    let env: &[(&str, &str)] = if packed { &[] } else { &[(UNPACKED, "1")] };
    common::crash_child(CHILD, dir, test, point, pass, env);
}

/// The one run in `store` and its journal's length, after checking the indexes.
async fn the_run(store: &SledStore) -> (RunId, usize) {
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    let dirty = store
        .live_bytes()
        .unwrap()
        .into_iter()
        .find(|t| t.tree == "dirty");
    assert_eq!(
        dirty.map(|t| t.entries),
        Some(0),
        "every mark was checked and removed"
    );
    let runs = store.list_runs(None, None, 10).await.unwrap();
    assert_eq!(runs.len(), 1);
    let run = runs[0].id;
    (run, store.read(run, Seq::ZERO).await.unwrap().len())
}

#[tokio::test]
async fn a_commit_cut_before_its_last_event_is_undone_on_open() {
    const TEST: &str = "a_commit_cut_before_its_last_event_is_undone_on_open";
    if let Some(dir) = std::env::var_os(CHILD) {
        write_until_crash(Path::new(&dir)).await;
        return;
    }
    // The gate's commit: its notification queued, its one event not written.
    let dir = tempfile::tempdir().unwrap();
    crash_at(dir.path(), TEST, "commit-before-last-event", 1);
    let store = open(dir.path());
    let (run, events) = the_run(&store).await;
    assert_eq!(events, 1, "the gate's event is gone");
    assert!(store.pending(None, 10).await.unwrap().is_empty());
    assert!(
        queued(&store).await.is_empty(),
        "the undone gate's notification is dropped with it"
    );
    assert_eq!(store.summary(run).await.unwrap().unwrap().next_seq, Seq(1));
    // The run goes on from where the acknowledged commits left it.
    let appended = store
        .append(Append {
            run,
            expected: Seq(1),
            at: Utc::now(),
            events: vec![gate_with(0, None, None)],
            lease: None,
        })
        .await
        .unwrap();
    assert!(appended.is_ok());
    assert_eq!(store.pending(None, 10).await.unwrap().len(), 1);
    assert_eq!(queued(&store).await, ["gate.opened@1"]);
    store.close().unwrap();
}

#[tokio::test]
async fn a_commit_cut_between_its_events_is_undone_on_open() {
    const TEST: &str = "a_commit_cut_between_its_events_is_undone_on_open";
    if let Some(dir) = std::env::var_os(CHILD) {
        write_until_crash(Path::new(&dir)).await;
        return;
    }
    // The two gates' commit, written a record per key (as builds before packed commits
    // wrote every commit): the first gate's event on disk, the second's not. A packed
    // commit has no such point (next test).
    let dir = tempfile::tempdir().unwrap();
    crash_unpacked_at(dir.path(), TEST, "commit-between-events", 1);
    let store = open(dir.path());
    neither_gate_is_there(store).await;
}

/// After the two gates' commit was undone: the run's first three events, no gate
/// pending, and the acknowledged commits' notifications once each.
async fn neither_gate_is_there(store: SledStore) {
    let (run, events) = the_run(&store).await;
    assert_eq!(events, 3, "neither gate of the cut commit is there");
    assert!(store.pending(None, 10).await.unwrap().is_empty());
    let summary = store.summary(run).await.unwrap().unwrap();
    assert_eq!((summary.next_seq, summary.open_gates.len()), (Seq(3), 0));
    assert_eq!(
        queued(&store).await,
        ["gate.opened@1", "gate.decided@2"],
        "the acknowledged commits' notifications, once each"
    );
    store.close().unwrap();
}

#[tokio::test]
async fn a_creation_cut_before_its_record_is_undone_on_open() {
    const TEST: &str = "a_creation_cut_before_its_record_is_undone_on_open";
    if let Some(dir) = std::env::var_os(CHILD) {
        write_until_crash(Path::new(&dir)).await;
        return;
    }
    // Its mark on disk, its `run-started` (the creation's commit point) not.
    let dir = tempfile::tempdir().unwrap();
    crash_at(dir.path(), TEST, "create-before-record", 1);
    let store = open(dir.path());
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    assert!(
        store.list_runs(None, None, 10).await.unwrap().is_empty(),
        "no run"
    );
    let trees = store.live_bytes().unwrap();
    for tree in ["events", "runs", "dirty", "starts", "by_status"] {
        let entries = trees.iter().find(|t| t.tree == tree).unwrap().entries;
        assert_eq!(entries, 0, "nothing left in {tree}");
    }
    assert!(queued(&store).await.is_empty());
    // Its idempotency key starts a new run.
    let created = store.create_run(the_creation()).await.unwrap();
    assert!(matches!(created, Created::New(_)), "{created:?}");
    store.close().unwrap();
}

#[tokio::test]
async fn a_creation_cut_before_its_indexes_is_finished_on_open() {
    const TEST: &str = "a_creation_cut_before_its_indexes_is_finished_on_open";
    if let Some(dir) = std::env::var_os(CHILD) {
        write_until_crash(Path::new(&dir)).await;
        return;
    }
    // Its `run-started` on disk, its summary in memory only, its idempotency key not
    // written yet.
    let dir = tempfile::tempdir().unwrap();
    crash_at(dir.path(), TEST, "create-before-indexes", 1);
    let store = open(dir.path());
    let (run, events) = the_run(&store).await;
    assert_eq!(events, 1);
    let summary = store.summary(run).await.unwrap().unwrap();
    assert_eq!((summary.status, summary.next_seq), (RunStatus::Running, Seq(1)));
    assert_eq!(store.count_runs(RunStatus::Running).unwrap(), 1);
    // The key names the run, and the run is driven.
    let again = store.create_run(the_creation()).await.unwrap();
    assert_eq!(again, Created::Existing(run));
    claim_only(&store, run).await;
    store.close().unwrap();
}

#[tokio::test]
async fn a_packed_commit_cut_before_its_value_is_undone_on_open() {
    const TEST: &str = "a_packed_commit_cut_before_its_value_is_undone_on_open";
    if let Some(dir) = std::env::var_os(CHILD) {
        write_until_crash(Path::new(&dir)).await;
        return;
    }
    // The two gates' commit, one value: its notifications queued, the value not
    // written. Nothing of it is there after the open, its notifications neither.
    let dir = tempfile::tempdir().unwrap();
    crash_at(dir.path(), TEST, "commit-before-last-event", 3);
    let store = open(dir.path());
    neither_gate_is_there(store).await;
}

#[tokio::test]
async fn a_commit_cut_before_its_indexes_is_finished_on_open() {
    const TEST: &str = "a_commit_cut_before_its_indexes_is_finished_on_open";
    if let Some(dir) = std::env::var_os(CHILD) {
        // In the child: write until the failpoint aborts the process.
        write_until_crash(Path::new(&dir)).await;
        return;
    }
    // Pass 1: the gate's commit (its event on disk, its summary in memory only, no
    // pending entry, no deadline entry yet).
    let dir = tempfile::tempdir().unwrap();
    crash_at(dir.path(), TEST, "commit-before-indexes", 1);
    let store = open(dir.path());
    the_run(&store).await;
    let pending = store.pending(None, 10).await.unwrap();
    assert_eq!(pending.len(), 1, "the gate the cut commit opened is pending");
    let run = pending[0].run;
    assert_eq!(store.read(run, Seq::ZERO).await.unwrap().len(), 2);
    let summary = store.summary(run).await.unwrap().unwrap();
    assert_eq!(summary.status, RunStatus::Waiting);
    assert!(store.next_deadline().await.unwrap().is_some());
    assert_eq!(
        queued(&store).await,
        ["gate.opened@1"],
        "queued before the commit's last event, so not again"
    );
    store.close().unwrap();

    // Pass 2: the decision's commit (the gate is decided in the journal; the summaries
    // of both commits were in memory only; its pending entry and deadline are still
    // there, the rule history and the wake-up not yet).
    let dir = tempfile::tempdir().unwrap();
    crash_at(dir.path(), TEST, "commit-before-indexes", 2);
    let store = open(dir.path());
    the_run(&store).await;
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
    assert_eq!(queued(&store).await, ["gate.opened@1", "gate.decided@2"]);
    store.close().unwrap();

    // Pass 3: the two gates' commit (both events on disk, the summaries of the last
    // three commits in memory only, neither gate pending yet).
    let dir = tempfile::tempdir().unwrap();
    crash_at(dir.path(), TEST, "commit-before-indexes", 3);
    let store = open(dir.path());
    let (run, events) = the_run(&store).await;
    assert_eq!(events, 5);
    let pending = store.pending(None, 10).await.unwrap();
    let gates: Vec<(RunId, GateId)> = pending.iter().map(|p| (p.run, p.gate)).collect();
    assert_eq!(
        gates,
        vec![(run, GateId(1)), (run, GateId(2))],
        "both gates are pending"
    );
    assert_eq!(
        queued(&store).await,
        [
            "gate.opened@1",
            "gate.decided@2",
            "gate.opened@3",
            "gate.opened@4"
        ]
    );
    store.close().unwrap();
}
