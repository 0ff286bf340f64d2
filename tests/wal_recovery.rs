//! The sled store with its write-ahead log (`SledOptions::wal`), cut by real crashes: a
//! child process aborts at a failpoint and the next open finds what it left. A commit
//! is durable once the log has synced it, so every commit the log synced is there
//! after the open, whether the crash came before sled had any of it
//! (`wal-before-apply`), with its records in sled but not its index changes
//! (`wal-apply-before-indexes`, after a flush), or in a checkpoint before or after
//! sled's flush. Each case checks the journal, the indexes (`check_indexes`), the open
//! gates, the idempotency key, the ready queue and the outbox (each notification once).
#![cfg(feature = "failpoints")]

use chrono::Utc;
use holdpoint::journal::*;
use std::path::Path;

mod common;

use common::{claim_only, gate_with, queued, the_creation};

const CHILD: &str = "HOLDPOINT_WAL_CHILD";
/// Set for a child whose store checkpoints after every commit.
const EVERY_COMMIT: &str = "HOLDPOINT_WAL_CHECKPOINT_EVERY_COMMIT";

fn open(dir: &Path) -> SledStore {
    let checkpoint_bytes = match std::env::var_os(EVERY_COMMIT) {
        Some(_) => 1,
        None => 64 << 20,
    };
    SledStore::open_with(
        dir,
        SledOptions {
            outbox_endpoints: vec!["ops".into()],
            wal: true,
            checkpoint_bytes,
            ..SledOptions::default()
        },
    )
    .unwrap()
}

/// The child (see [`common::write_four_commits`]).
async fn write_until_crash(dir: &Path) {
    common::write_four_commits(&open(dir)).await;
}

fn crash_at(dir: &Path, test: &str, point: &str, pass: u32, every_commit: bool) {
    let env: &[(&str, &str)] = if every_commit { &[(EVERY_COMMIT, "1")] } else { &[] };
    common::crash_child(CHILD, dir, test, point, pass, env);
}

/// What the store holds once the child's first `commits` commits are durable: checked
/// after the crash and again after a clean close and reopen.
async fn holds_the_first(dir: &Path, commits: usize) {
    for round in 0..2 {
        let store = open(dir);
        assert!(store.has_wal());
        assert_eq!(
            store.check_indexes().unwrap(),
            Vec::<String>::new(),
            "round {round}"
        );
        let runs = store.list_runs(None, None, 10).await.unwrap();
        assert_eq!(runs.len(), 1, "round {round}: the creation is durable");
        let run = runs[0].id;
        let events = store.read(run, Seq::ZERO).await.unwrap();
        let expected_events = [1, 2, 3, 5][commits - 1];
        assert_eq!(events.len(), expected_events, "round {round}, {commits} commits");
        let summary = store.summary(run).await.unwrap().unwrap();
        assert_eq!(summary.next_seq, Seq(expected_events as u64));
        let gates: Vec<GateId> = store
            .pending(None, 10)
            .await
            .unwrap()
            .iter()
            .map(|p| p.gate)
            .collect();
        let expected_gates: &[GateId] = match commits {
            2 => &[GateId(0)],
            4 => &[GateId(1), GateId(2)],
            _ => &[],
        };
        assert_eq!(gates, expected_gates, "round {round}, {commits} commits");
        assert_eq!(
            store.next_deadline().await.unwrap().is_some(),
            commits == 2,
            "the gate's deadline is set until its decision"
        );
        assert_eq!(
            store.rule_history("payments", 10).await.unwrap().len(),
            usize::from(commits >= 3),
            "the decision is in the rule's history"
        );
        let expected_notes: &[&str] = &[
            "gate.opened@1",
            "gate.decided@2",
            "gate.opened@3",
            "gate.opened@4",
        ][..[0, 1, 2, 4][commits - 1]];
        assert_eq!(queued(&store).await, expected_notes, "each once");
        // The idempotency key names the run.
        let again = store.create_run(the_creation()).await.unwrap();
        assert_eq!(again, Created::Existing(run));
        if round == 0 {
            // The open made the run ready: a worker takes it.
            let lease = claim_only(&store, run).await;
            store.release(&lease, None).await.unwrap();
        }
        store.close().unwrap();
    }
}

#[tokio::test]
async fn a_commit_the_log_synced_is_there_though_sled_had_none_of_it() {
    const TEST: &str = "a_commit_the_log_synced_is_there_though_sled_had_none_of_it";
    if let Some(dir) = std::env::var_os(CHILD) {
        write_until_crash(Path::new(&dir)).await;
        return;
    }
    for commit in 1..=4 {
        let dir = tempfile::tempdir().unwrap();
        crash_at(dir.path(), TEST, "wal-before-apply", commit, false);
        holds_the_first(dir.path(), commit as usize).await;
    }
}

#[tokio::test]
async fn a_commit_cut_in_its_sled_writes_is_finished_from_the_log() {
    const TEST: &str = "a_commit_cut_in_its_sled_writes_is_finished_from_the_log";
    if let Some(dir) = std::env::var_os(CHILD) {
        write_until_crash(Path::new(&dir)).await;
        return;
    }
    for commit in 1..=4 {
        let dir = tempfile::tempdir().unwrap();
        crash_at(dir.path(), TEST, "wal-apply-before-indexes", commit, false);
        holds_the_first(dir.path(), commit as usize).await;
    }
}

#[tokio::test]
async fn a_checkpoint_cut_before_or_after_its_flush_loses_nothing() {
    const TEST: &str = "a_checkpoint_cut_before_or_after_its_flush_loses_nothing";
    if let Some(dir) = std::env::var_os(CHILD) {
        write_until_crash(Path::new(&dir)).await;
        return;
    }
    // The open checkpoints first; then every commit does, once written to sled.
    for point in ["checkpoint-before-flush", "checkpoint-before-remove"] {
        for commit in 1..=4 {
            let dir = tempfile::tempdir().unwrap();
            crash_at(dir.path(), TEST, point, commit + 1, true);
            holds_the_first(dir.path(), commit as usize).await;
        }
    }
}

/// Without a failpoint: a store dropped without `close` (its summaries, status keys and
/// wake-ups in memory only, sled not flushed by it) comes back from the log, and a
/// directory with a log keeps it whatever the options say.
#[tokio::test]
async fn the_log_brings_back_what_memory_held_and_a_directory_keeps_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut runs = Vec::new();
    for _ in 0..20 {
        let run = store
            .create_run(NewRun {
                idempotency_key: None,
                ..the_creation()
            })
            .await
            .unwrap()
            .run();
        store
            .append(Append {
                run,
                expected: Seq(1),
                at: Utc::now(),
                events: vec![gate_with(0, None, None)],
                lease: None,
            })
            .await
            .unwrap()
            .unwrap();
        runs.push(run);
    }
    drop(store);
    let store = SledStore::open(dir.path()).unwrap();
    assert!(store.has_wal(), "the directory keeps its log");
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    assert_eq!(store.count_runs(RunStatus::Waiting).unwrap(), 20);
    assert_eq!(store.count_pending().unwrap(), 20);
    for run in &runs {
        assert_eq!(store.read(*run, Seq::ZERO).await.unwrap().len(), 2);
    }
    store.close().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.count_runs(RunStatus::Waiting).unwrap(), 20);
    store.close().unwrap();
}
