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
    // Sequential creations, each acknowledged before the next: groups of one, which
    // never wait for a group to gather.
    assert_eq!(store.group_windows(), 0);
    let syncs = append_from_each(&store, &runs, 10).await;
    // 640 acknowledged appends; with group commit far fewer syncs than appends.
    assert!(syncs < 640, "{syncs} syncs for 640 appends");
    assert!(syncs > 0);
    // 64 appenders at once make groups of several, after which the next one gathers.
    assert!(store.group_windows() >= 1, "{syncs} syncs, no group window");
}

/// Appends `steps` steps to each of `runs` (created, at seq 1), a task per run, all at
/// once; returns how many syncs the store made meanwhile.
async fn append_from_each(store: &SledStore, runs: &[RunId], steps: u32) -> u64 {
    let before = store.sync_count();
    let mut tasks = Vec::new();
    for &run in runs {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..steps {
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
    store.sync_count() - before
}

/// With `group_commit` off each append syncs in its caller: one sync per append, even
/// from 16 concurrent appenders, never a group window, and every append is there after
/// a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_group_commit_each_append_syncs_itself() {
    let dir = tempfile::tempdir().unwrap();
    let options = || SledOptions {
        group_commit: false,
        ..SledOptions::default()
    };
    let store = SledStore::open_with(dir.path(), options()).unwrap();
    let mut runs = Vec::new();
    for _ in 0..16 {
        runs.push(store.create_run(new_run("w")).await.unwrap().run());
    }
    let syncs = append_from_each(&store, &runs, 5).await;
    assert_eq!(syncs, 16 * 5, "one sync per append");
    assert_eq!(store.group_windows(), 0);
    store.close().unwrap();
    let store = SledStore::open_with(dir.path(), options()).unwrap();
    for run in runs {
        assert_eq!(store.read(run, Seq::ZERO).await.unwrap().len(), 6);
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
        deadline: Some(Utc::now() + chrono::Duration::hours(1)),
        rule: None,
        spec: None,
    }
}

fn approve(p: u32) -> EventKind {
    EventKind::DecisionRecorded {
        gate: GateId(p),
        decision: Decision::Approve,
        by: Principal::new("alice"),
        comment: None,
        idempotency_key: Some(format!("d{p}")),
        request_hash: None,
    }
}

/// A store in `dir` with its write-ahead log, keeping up to `kept_summaries` entries.
fn open_with_the_log(dir: &std::path::Path, kept_summaries: usize) -> SledStore {
    SledStore::open_with(
        dir,
        SledOptions {
            wal: true,
            kept_summaries,
            ..SledOptions::default()
        },
    )
    .unwrap()
}

/// A new run, claimed, its first step and a gate appended, released: waiting at gate 1.
async fn waiting_at_a_gate(store: &SledStore) -> RunId {
    let run = store.create_run(new_run("w")).await.unwrap().run();
    let lease = store
        .claim(WorkerId::new(), Utc::now(), Duration::from_secs(30), 1)
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(lease.run, run);
    let mut a = append(run, 1, vec![step(0), gate(1)]);
    a.lease = Some(lease.token);
    store.append(a).await.unwrap().unwrap();
    store.release(&lease, None).await.unwrap();
    run
}

/// How many keys sled holds in `tree`.
fn entries(store: &SledStore, tree: &str) -> u64 {
    let trees = store.live_bytes().unwrap();
    trees.iter().find(|t| t.tree == tree).unwrap().entries
}

/// Appends at whatever seq the run is at now (another writer may land first).
async fn append_now(store: &SledStore, run: RunId, event: EventKind) -> bool {
    loop {
        let s = store.summary(run).await.unwrap().unwrap();
        match store.append(append(run, s.next_seq.0, vec![event.clone()])).await {
            Ok(Ok(_)) => return true,
            Ok(Err(_conflict)) => continue,
            Err(Error::RunEnded(_)) => return false,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Commits to different runs go on in parallel (one lock per stripe of runs), and
/// decisions race leased activations on the same runs: every index still agrees with
/// every journal afterwards, and no lease was ever handed out twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_commits_keep_every_index_in_step() {
    parallel_commits(SledOptions::default()).await
}

/// The same with the write-ahead log: a commit racing one that is logged but not yet
/// written to sled gets its conflict only once that one is readable (on this one-thread
/// runtime the retrying task would otherwise starve the one that writes it).
#[tokio::test]
async fn parallel_commits_keep_every_index_in_step_with_the_log() {
    parallel_commits(SledOptions {
        wal: true,
        ..SledOptions::default()
    })
    .await
}

async fn parallel_commits(options: SledOptions) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open_with(dir.path(), options).unwrap();
    let mut tasks = Vec::new();
    for t in 0..8u32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let worker = WorkerId::new();
            let mut ended = 0;
            for i in 0..25u32 {
                let mut run = new_run("w");
                run.idempotency_key = Some(format!("start-{t}-{i}"));
                let id = store.create_run(run).await.unwrap().run();
                // A worker takes some ready run (not necessarily this one) and drives it
                // one step; a reviewer decides this run's gate meanwhile.
                let leases = store
                    .claim(worker, Utc::now(), Duration::from_secs(30), 1)
                    .await
                    .unwrap();
                assert!(append_now(&store, id, gate(0)).await);
                let reviewer = store.clone();
                let decided = tokio::spawn(async move { append_now(&reviewer, id, approve(0)).await });
                for lease in &leases {
                    let s = store.summary(lease.run).await.unwrap().unwrap();
                    let mut a = append(lease.run, s.next_seq.0, vec![step(9)]);
                    a.lease = Some(lease.token);
                    // A conflict is fine (the reviewer's decision landed first), and so is
                    // an ended run (its own task completed it meanwhile).
                    match store.append(a).await {
                        Ok(_) | Err(Error::RunEnded(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                    store.release(lease, None).await.unwrap();
                }
                assert!(decided.await.unwrap());
                if append_now(&store, id, EventKind::RunCompleted { output: json!(i) }).await {
                    ended += 1;
                }
            }
            ended
        }));
    }
    let mut ended = 0;
    for t in tasks {
        ended += t.await.unwrap();
    }
    assert_eq!(ended, 200, "every run ended once");
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    assert_eq!(store.count_runs(RunStatus::Completed).unwrap(), 200);
    assert_eq!(store.count_pending().unwrap(), 0);
    assert_eq!(
        store.next_deadline().await.unwrap(),
        None,
        "every deadline cleared"
    );
    store.close().unwrap();
    // And again after a reopen.
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
}

/// A directory written before summaries went binary keeps working: its JSON summaries
/// read as they were, and the summary a run's next commit leaves is stored in the new format.
#[tokio::test]
async fn summaries_stored_as_json_read_and_are_rewritten_in_the_binary_layout() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let run = store.create_run(new_run("w")).await.unwrap().run();
    assert!(append_now(&store, run, gate(0)).await);
    let before = store.summary(run).await.unwrap().unwrap();
    store.close().unwrap();
    {
        // The earlier layout: the summary as JSON (without its wake-up, as then).
        let db = holdpoint_journal::sled_raw_config(dir.path()).open().unwrap();
        let runs = db.open_tree("runs").unwrap();
        let stored = runs.get(run.as_bytes()).unwrap().unwrap();
        assert_eq!(stored[0], stored_summary::SUMMARY_FORMAT);
        runs.insert(run.as_bytes(), serde_json::to_vec(&before).unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.summary(run).await.unwrap().unwrap(), before);
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    assert!(append_now(&store, run, approve(0)).await);
    assert_eq!(store.read(run, Seq::ZERO).await.unwrap().len(), 3);
    store.close().unwrap();
    let db = holdpoint_journal::sled_raw_config(dir.path()).open().unwrap();
    let stored = db
        .open_tree("runs")
        .unwrap()
        .get(run.as_bytes())
        .unwrap()
        .unwrap();
    assert_eq!(
        stored[0],
        stored_summary::SUMMARY_FORMAT,
        "rewritten in the new format"
    );
    let after = stored_summary::decode(run, &stored).unwrap();
    assert_eq!(after.next_seq, Seq(3));
}

/// `live_bytes` counts every entry of every tree, keys and values.
#[tokio::test]
async fn live_bytes_counts_keys_and_values_per_tree() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let a = store.create_run(new_run("w")).await.unwrap().run();
    let b = store.create_run(new_run("w")).await.unwrap().run();
    assert!(append_now(&store, a, step(0)).await);
    let trees = store.live_bytes().unwrap();
    let tree = |name: &str| trees.iter().find(|t| t.tree == name).unwrap().clone();
    let mut record_bytes = 0;
    for (run, seq) in [(a, 0), (a, 1), (b, 0)] {
        record_bytes += 24 + store.raw_record(run, Seq(seq)).unwrap().unwrap().len() as u64;
    }
    assert_eq!(tree("events").entries, 3);
    assert_eq!(tree("events").bytes, record_bytes);
    assert_eq!(
        tree("runs").entries,
        0,
        "marked runs' summaries, their creations' too, are written when their marks go"
    );
    assert_eq!(
        tree("by_status").entries,
        0,
        "marked runs' status keys are written when their marks go"
    );
    assert_eq!(tree("intents").entries, 0, "no commit left unfinished");
    assert_eq!(
        tree("dirty").entries,
        2,
        "both runs were written and no activation of theirs ended"
    );
    assert_eq!(trees.len(), 13, "every tree is counted");
}

/// With the log, a run's records wait in memory from its creation to the end of its
/// activation (readers find them there, from any seq) and are then stored as one value;
/// a second activation's records make a second.
#[tokio::test]
async fn with_the_log_an_activations_records_are_stored_as_one_value_when_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_the_log(dir.path(), SledOptions::default().kept_summaries);
    let kinds = |events: Vec<Event>| events.into_iter().map(|e| e.event).collect::<Vec<_>>();
    let run = store.create_run(new_run("w")).await.unwrap().run();
    let worker = WorkerId::new();
    let lease = store
        .claim(worker, Utc::now(), Duration::from_secs(30), 1)
        .await
        .unwrap()
        .pop()
        .unwrap();
    let mut expected = vec![store.read(run, Seq::ZERO).await.unwrap()[0].event.clone()];
    for (seq, events) in [(1, vec![step(0)]), (2, vec![step(1), gate(2)])] {
        let mut a = append(run, seq, events.clone());
        a.lease = Some(lease.token);
        store.append(a).await.unwrap().unwrap();
        expected.extend(events);
    }
    assert_eq!(
        entries(&store, "events"),
        0,
        "the records are held while the activation goes on"
    );
    assert_eq!(kinds(store.read(run, Seq::ZERO).await.unwrap()), expected);
    for from in 1..=4 {
        assert_eq!(
            kinds(store.read(run, Seq(from)).await.unwrap()),
            expected[from as usize..],
            "read from seq {from}"
        );
    }
    store.release(&lease, None).await.unwrap();
    assert_eq!(
        entries(&store, "events"),
        0,
        "a released run's entry keeps its records (the log holds them)"
    );
    assert_eq!(kinds(store.read(run, Seq::ZERO).await.unwrap()), expected);
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    // A decision, held with the rest; readers see every record from every seq.
    assert!(append_now(&store, run, approve(2)).await);
    expected.push(approve(2));
    assert_eq!(entries(&store, "events"), 0);
    for from in 0..=5 {
        assert_eq!(
            kinds(store.read(run, Seq(from)).await.unwrap()),
            expected[from as usize..],
            "read from seq {from} after the decision"
        );
    }
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    store.checkpoint().unwrap();
    assert_eq!(
        entries(&store, "events"),
        1,
        "a checkpoint stores what the entry held: creation, activation and decision in one value"
    );
    assert_eq!(
        store.raw_record(run, Seq(2)).unwrap().map(|r| r[0]),
        Some(codec::RECORD_FORMAT)
    );
    assert_eq!(
        store.raw_record(run, Seq(3)).unwrap().map(|r| r[0]),
        Some(codec::RECORD_FORMAT_COMMIT_END),
        "each commit still ends in its marked record"
    );
    assert_eq!(kinds(store.read(run, Seq(3)).await.unwrap()), expected[3..]);
    // The entry went with the checkpoint: the run's end stores its own value.
    assert!(append_now(&store, run, EventKind::RunCompleted { output: json!(1) }).await);
    expected.push(EventKind::RunCompleted { output: json!(1) });
    assert_eq!(
        entries(&store, "events"),
        2,
        "the run's end stores its records at once"
    );
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    store.close().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(kinds(store.read(run, Seq::ZERO).await.unwrap()), expected);
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
}

/// With the log, a released run's entry keeps its summary, status key, records and open
/// gates' pending entries in memory until the run ends, when all are written together:
/// a run that waits at a gate and is decided before it is written stores its journal
/// in one value and its status key once, and its gate's entry never. Past
/// `kept_summaries` entries a release writes them at once.
#[tokio::test]
async fn with_the_log_a_released_run_is_written_at_its_end_or_past_the_kept_entries() {
    for kept in [16_384, 0] {
        let dir = tempfile::tempdir().unwrap();
        let store = open_with_the_log(dir.path(), kept);
        let run = waiting_at_a_gate(&store).await;
        let written = kept == 0;
        // Past the limit every commit writes through: the creation's value and the
        // activation's.
        assert_eq!(
            (
                entries(&store, "events"),
                entries(&store, "by_status"),
                entries(&store, "pending")
            ),
            if written { (2, 1, 1) } else { (0, 0, 0) },
            "kept_summaries {kept}: what the release wrote"
        );
        // Readers see the run waiting either way.
        assert_eq!(store.count_runs(RunStatus::Waiting).unwrap(), 1);
        let waiting = store.list_runs(Some(RunStatus::Waiting), None, 10).await.unwrap();
        assert_eq!(waiting.iter().map(|s| s.id).collect::<Vec<_>>(), vec![run]);
        assert_eq!(
            store.summary(run).await.unwrap().unwrap().status,
            RunStatus::Waiting
        );
        let pending = store.pending(None, 10).await.unwrap();
        assert_eq!(
            pending.iter().map(|p| (p.run, p.gate)).collect::<Vec<_>>(),
            vec![(run, GateId(1))]
        );
        assert_eq!(store.count_pending().unwrap(), 1);
        assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
        assert!(append_now(&store, run, approve(1)).await);
        assert_eq!(entries(&store, "pending"), 0, "kept_summaries {kept}: decided");
        assert_eq!(store.count_pending().unwrap(), 0);
        assert!(append_now(&store, run, EventKind::RunCompleted { output: json!(1) }).await);
        assert_eq!(
            entries(&store, "events"),
            if written { 4 } else { 1 },
            "kept_summaries {kept}: the journal's values at the end"
        );
        assert_eq!(store.count_runs(RunStatus::Waiting).unwrap(), 0);
        assert_eq!(store.count_runs(RunStatus::Completed).unwrap(), 1);
        assert_eq!(entries(&store, "by_status"), 1, "one status key: the run's last");
        assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
        assert_eq!(store.read(run, Seq::ZERO).await.unwrap().len(), 5);
        store.close().unwrap();
    }
}

/// With the log, sled's leaves split by their bytes as well as their keys (a run's
/// journal is one value of a kilobyte or more); without it by their keys only, and a
/// directory with a log keeps the limit when opened without asking for the log.
#[test]
fn leaves_split_by_bytes_in_directories_with_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let plain = SledStore::open(dir.path()).unwrap();
    assert_eq!(plain.leaf_split_bytes(), usize::MAX);
    plain.close().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let logged = open_with_the_log(dir.path(), SledOptions::default().kept_summaries);
    assert_eq!(logged.leaf_split_bytes(), sled_store::LOG_LEAF_BYTES);
    logged.close().unwrap();
    let reopened = SledStore::open(dir.path()).unwrap();
    assert!(reopened.has_wal());
    assert_eq!(reopened.leaf_split_bytes(), sled_store::LOG_LEAF_BYTES);
}

/// With the log, readers of the gates index read through the entries kept in memory:
/// with some runs' gates written to sled by a checkpoint and the rest kept, `pending`
/// pages through all of them in key order, each once; a decision takes a gate out
/// from where it is; after a close and an open every open gate is in sled.
#[tokio::test]
async fn with_the_log_pending_reads_gates_kept_in_memory_with_the_stored_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_the_log(dir.path(), SledOptions::default().kept_summaries);
    let mut runs = Vec::new();
    for i in 0..7 {
        runs.push(waiting_at_a_gate(&store).await);
        if i == 3 {
            store.checkpoint().unwrap();
        }
    }
    assert_eq!(
        entries(&store, "pending"),
        4,
        "the checkpoint wrote the first four"
    );
    let pages = |store: SledStore| async move {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store.pending(after, 2).await.unwrap();
            assert!(page.len() <= 2);
            let Some(last) = page.last() else { break };
            after = Some((last.run, last.gate));
            seen.extend(page.iter().map(|p| p.run));
        }
        seen
    };
    let mut sorted = runs.clone();
    sorted.sort();
    assert_eq!(pages(store.clone()).await, sorted);
    assert_eq!(store.count_pending().unwrap(), 7);
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    // One decided from sled, one from memory.
    for run in [runs[0], runs[6]] {
        assert!(append_now(&store, run, approve(1)).await);
    }
    assert_eq!(entries(&store, "pending"), 3);
    sorted.retain(|r| *r != runs[0] && *r != runs[6]);
    assert_eq!(pages(store.clone()).await, sorted);
    assert_eq!(store.count_pending().unwrap(), 5);
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    store.close().unwrap();
    let store = open_with_the_log(dir.path(), SledOptions::default().kept_summaries);
    assert_eq!(entries(&store, "pending"), 5, "the close wrote the kept ones");
    assert_eq!(pages(store.clone()).await, sorted);
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
}

/// With the log, a read of records held in memory returns exactly what the same read
/// returns once a checkpoint has stored them as one value in sled, from any seq, floats
/// included.
#[tokio::test]
async fn with_the_log_held_records_read_as_they_do_once_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_the_log(dir.path(), SledOptions::default().kept_summaries);
    let run = store.create_run(new_run("w")).await.unwrap().run();
    let events = vec![
        EventKind::StepCompleted {
            position: Position(0),
            output: json!({"amount": 130.65331632653061, "tiny": 5e-324, "list": [0.1, "x", null]}),
        },
        gate(1),
    ];
    store.append(append(run, 1, events)).await.unwrap().unwrap();
    assert!(append_now(&store, run, approve(1)).await);
    assert_eq!(entries(&store, "events"), 0, "every record is held in memory");
    let mut held = Vec::new();
    for from in 0..=5 {
        held.push(store.read(run, Seq(from)).await.unwrap());
    }
    assert_eq!(held[0].len(), 4);
    store.checkpoint().unwrap();
    assert_eq!(
        entries(&store, "events"),
        1,
        "the checkpoint stored them as one value"
    );
    for from in 0..=5u64 {
        let stored = store.read(run, Seq(from)).await.unwrap();
        assert_eq!(held[from as usize], stored, "from {from}");
    }
    store.close().unwrap();
}

/// With the log, readers racing checkpoints that move kept gates to sled never miss a
/// gate nor list one twice: a writer makes runs wait (their gates kept) and checkpoints
/// after each, while a reader counts and pages the gates, which must number at least
/// the runs counted waiting before it began and at most one more than those counted
/// after it ended (the writer counts a run once its append has returned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_log_readers_racing_checkpoints_see_every_gate_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_the_log(dir.path(), SledOptions::default().kept_summaries);
    let waiting = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let (store, waiting) = (store.clone(), waiting.clone());
        tokio::spawn(async move {
            for _ in 0..400 {
                waiting_at_a_gate(&store).await;
                waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let store = store.clone();
                tokio::task::spawn_blocking(move || store.checkpoint().unwrap())
                    .await
                    .unwrap();
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() || reads == 0 {
        let before = waiting.load(std::sync::atomic::Ordering::SeqCst);
        let counted = store.count_pending().unwrap();
        let page = store.pending(None, 1_000).await.unwrap();
        let after = waiting.load(std::sync::atomic::Ordering::SeqCst);
        let mut keys: Vec<_> = page.iter().map(|p| (p.run, p.gate)).collect();
        let listed = keys.len();
        keys.dedup();
        assert_eq!(keys.len(), listed, "read {reads}: a gate listed twice");
        for n in [counted, listed] {
            assert!(
                (before..=after + 1).contains(&n),
                "read {reads}: {n} gates, {before} to {after} runs waiting"
            );
        }
        reads += 1;
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
    assert_eq!(store.count_pending().unwrap(), 400);
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
}

/// With the log, a checkpoint writes what released runs' entries kept and drops the
/// entries, so they make room for the next: with room for one released entry (half of
/// `kept_summaries`), a second run's release is kept only once a checkpoint has taken
/// the first's.
#[tokio::test]
async fn with_the_log_a_checkpoint_drops_the_entries_of_released_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_the_log(dir.path(), 2);
    let stored = |store: &SledStore| entries(store, "by_status");
    let mut runs = Vec::new();
    for checkpoint in [true, false] {
        let run = waiting_at_a_gate(&store).await;
        runs.push(run);
        // Only a checkpoint wrote a status key so far.
        assert_eq!(stored(&store), runs.len() as u64 - 1, "run {}: kept", runs.len());
        if checkpoint {
            store.checkpoint().unwrap();
            assert_eq!(
                stored(&store),
                1,
                "the checkpoint wrote the first run's status key"
            );
        }
    }
    assert_eq!(stored(&store), 1, "the second run's release was kept too");
    assert_eq!(store.count_runs(RunStatus::Waiting).unwrap(), 2);
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
}

/// Dirty marks (the runs recovery checks) come with a run's first commit, stay across
/// its commits, and go when its activation ends, when it ends, and on close.
#[tokio::test]
async fn dirty_marks_last_from_a_commit_to_the_end_of_the_activation() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let marks = |store: &SledStore| entries(store, "dirty");
    let a = store.create_run(new_run("w")).await.unwrap().run();
    let b = store.create_run(new_run("w")).await.unwrap().run();
    assert_eq!(marks(&store), 2, "created runs are marked");
    let leases = store
        .claim(WorkerId::new(), Utc::now(), Duration::from_secs(30), 10)
        .await
        .unwrap();
    assert_eq!(leases.len(), 2);
    let lease_a = leases.iter().find(|l| l.run == a).unwrap();
    let mut first = append(a, 1, vec![step(0)]);
    first.lease = Some(lease_a.token);
    store.append(first).await.unwrap().unwrap();
    let mut second = append(a, 2, vec![gate(1)]);
    second.lease = Some(lease_a.token);
    store.append(second).await.unwrap().unwrap();
    assert_eq!(marks(&store), 2, "one mark per run, whatever its commits");
    store.release(lease_a, None).await.unwrap();
    assert_eq!(marks(&store), 1, "a's activation ended");
    assert!(append_now(&store, a, approve(1)).await);
    assert_eq!(marks(&store), 2, "a decision marks the run again");
    assert!(append_now(&store, b, EventKind::RunCompleted { output: json!(1) }).await);
    assert_eq!(marks(&store), 1, "b ended");
    store.close().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(marks(&store), 0, "close left no run to check");
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
}

/// A marked run's status key is written when its mark goes, not by each commit:
/// `count_runs` and `list_runs` still answer with every run's current status, before
/// and after the key is written, and after a crash that left keys unwritten.
#[tokio::test]
async fn status_keys_wait_for_the_mark_and_readers_never_see_them_behind() {
    let dir = tempfile::tempdir().unwrap();
    let keys = |store: &SledStore| entries(store, "by_status");
    let listed = |store: SledStore, st: RunStatus, after: Option<RunId>, limit: usize| async move {
        let runs = store.list_runs(Some(st), after, limit).await.unwrap();
        let ids: Vec<RunId> = runs.iter().map(|s| s.id).collect();
        assert!(runs.iter().all(|s| s.status == st), "{runs:?}");
        (store, ids)
    };
    let counts = |store: &SledStore| {
        [RunStatus::Running, RunStatus::Waiting, RunStatus::Completed].map(|st| store.count_runs(st).unwrap())
    };
    let store = SledStore::open(dir.path()).unwrap();
    let mut ids = [
        store.create_run(new_run("w")).await.unwrap().run(),
        store.create_run(new_run("w")).await.unwrap().run(),
    ];
    ids.sort();
    let [a, b] = ids;
    assert_eq!(keys(&store), 0, "a creation writes no status key");
    assert_eq!(counts(&store), [2, 0, 0]);
    let (store, running) = listed(store, RunStatus::Running, None, 10).await;
    assert_eq!(running, [a, b]);
    let (store, page) = listed(store, RunStatus::Running, None, 1).await;
    assert_eq!(page, [a]);
    let (store, page) = listed(store, RunStatus::Running, Some(a), 10).await;
    assert_eq!(page, [b]);

    let leases = store
        .claim(WorkerId::new(), Utc::now(), Duration::from_secs(30), 10)
        .await
        .unwrap();
    let lease_a = leases.iter().find(|l| l.run == a).unwrap();
    let mut opened = append(a, 1, vec![gate(1)]);
    opened.lease = Some(lease_a.token);
    store.append(opened).await.unwrap().unwrap();
    assert_eq!(keys(&store), 0, "nor does a commit of a marked run");
    assert_eq!(counts(&store), [1, 1, 0]);
    let (store, waiting) = listed(store, RunStatus::Waiting, None, 10).await;
    assert_eq!(waiting, [a]);
    store.release(lease_a, None).await.unwrap();
    assert_eq!(keys(&store), 1, "the release wrote a's key");
    assert_eq!(counts(&store), [1, 1, 0]);
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());

    // Decided: a is running again, while its key still says waiting.
    assert!(append_now(&store, a, approve(1)).await);
    assert_eq!(counts(&store), [2, 0, 0]);
    let (store, waiting) = listed(store, RunStatus::Waiting, None, 10).await;
    assert!(waiting.is_empty(), "{waiting:?}");
    let (store, running) = listed(store, RunStatus::Running, None, 10).await;
    assert_eq!(running, [a, b]);
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());

    // A crash: both runs are marked, a's key is behind and b has none.
    drop(store);
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(keys(&store), 2, "the open wrote both keys");
    assert_eq!(counts(&store), [2, 0, 0]);
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());

    // An end writes the key at once (the mark goes with it); a close writes the rest.
    assert!(append_now(&store, b, EventKind::RunCompleted { output: json!(1) }).await);
    assert_eq!(counts(&store), [1, 0, 1]);
    assert!(append_now(&store, a, gate(2)).await);
    assert_eq!(counts(&store), [0, 1, 1]);
    store.close().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(counts(&store), [0, 1, 1]);
    let (store, completed) = listed(store, RunStatus::Completed, None, 10).await;
    assert_eq!(completed, [b]);
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
}

/// A marked run's summaries stay in memory until its mark goes: a crash loses them,
/// and the open rebuilds each from the commits whose last record reached the disk. A
/// record past the stored summary that fails its checks is damage, not a cut (sled
/// recovers only whole log messages): nothing is removed and the run is parked.
#[tokio::test]
async fn summaries_kept_in_memory_are_rebuilt_after_a_crash_and_damage_parks_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let a = store.create_run(new_run("w")).await.unwrap().run();
    let b = store.create_run(new_run("w")).await.unwrap().run();
    for run in [a, b] {
        assert!(append_now(&store, run, step(0)).await);
        assert!(append_now(&store, run, gate(1)).await);
    }
    let before = store.summary(a).await.unwrap().unwrap();
    assert_eq!((before.next_seq, before.status), (Seq(3), RunStatus::Waiting));
    // One bit of b's second record flips on disk.
    let mut record = store.raw_record(b, Seq(1)).unwrap().unwrap();
    let last = record.len() - 2;
    record[last] ^= 1;
    store.overwrite_record(b, Seq(1), &record).unwrap();
    // A crash: the marks stay, the summaries in memory are gone.
    drop(store);

    let store = SledStore::open(dir.path()).unwrap();
    let after = store.summary(a).await.unwrap().unwrap();
    assert_eq!(
        (after.next_seq, after.head, after.status),
        (before.next_seq, before.head, before.status)
    );
    assert_eq!(store.read(a, Seq::ZERO).await.unwrap().len(), 3);
    let gates: Vec<RunId> = store
        .pending(None, 10)
        .await
        .unwrap()
        .iter()
        .map(|p| p.run)
        .collect();
    assert!(gates.contains(&a), "{gates:?}");
    let parked = store.summary(b).await.unwrap().unwrap();
    assert_eq!(parked.status, RunStatus::Stuck);
    let reason = parked.stuck.unwrap_or_default();
    assert!(reason.contains("damaged at seq 1"), "{reason}");
    for seq in 1..3 {
        assert!(
            store.raw_record(b, Seq(seq)).unwrap().is_some(),
            "record {seq} kept for an operator"
        );
    }
    assert_eq!(store.count_runs(RunStatus::Stuck).unwrap(), 1);
    assert_eq!(store.count_runs(RunStatus::Waiting).unwrap(), 1);
}

/// A creation's summary stays with its mark until the mark goes, like a commit's:
/// listing runs merges, in run order, those stored in `runs` with those only in memory,
/// before and after the marks go, and after a crash.
#[tokio::test]
async fn runs_created_since_their_marks_went_are_listed_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let mut runs = Vec::new();
    for _ in 0..4 {
        runs.push(store.create_run(new_run("w")).await.unwrap().run());
    }
    runs.sort();
    let stored = |store: &SledStore| entries(store, "runs");
    let listed = |store: SledStore, after: Option<RunId>, limit: usize| async move {
        let ids: Vec<RunId> = store
            .list_runs(None, after, limit)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        (store, ids)
    };
    assert_eq!(stored(&store), 0, "no summary stored yet");
    // The second and third runs' activations end: their marks go, their summaries are
    // stored; the first and last stay in memory.
    let leases = store
        .claim(WorkerId::new(), Utc::now(), Duration::from_secs(30), 10)
        .await
        .unwrap();
    for lease in leases.iter().filter(|l| l.run == runs[1] || l.run == runs[2]) {
        store.release(lease, None).await.unwrap();
    }
    assert_eq!(stored(&store), 2);
    let (store, all) = listed(store, None, 10).await;
    assert_eq!(all, runs, "stored and kept, merged in order");
    let (store, page) = listed(store, Some(runs[0]), 2).await;
    assert_eq!(page, runs[1..3]);
    let (store, page) = listed(store, Some(runs[2]), 10).await;
    assert_eq!(page, runs[3..]);
    let ids: Vec<RunId> = store.run_ids().map(|r| r.unwrap()).collect();
    assert_eq!(ids, runs);
    let running: Vec<RunId> = store
        .list_runs(Some(RunStatus::Running), None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(running, runs);
    assert_eq!(store.count_runs(RunStatus::Running).unwrap(), 4);
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    // A crash: the kept summaries are gone from memory, the open derives them.
    drop(store);
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(stored(&store), 4);
    let (store, all) = listed(store, None, 10).await;
    assert_eq!(all, runs);
    assert_eq!(store.count_runs(RunStatus::Running).unwrap(), 4);
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    store.close().unwrap();
}

/// Past `kept_summaries` marks a commit writes its summary as it goes (0: always), so
/// `runs` holds the latest (here, with the gate it opened); with the default, a marked
/// run has no stored summary until the mark goes, not even its creation's (its
/// `run-started` is the creation's commit point). A crash recovers the same summary
/// either way.
#[tokio::test]
async fn kept_summaries_bounds_the_summaries_waiting_in_memory() {
    let mut stored_bytes = Vec::new();
    for kept in [0, SledOptions::default().kept_summaries] {
        let dir = tempfile::tempdir().unwrap();
        let options = || SledOptions {
            kept_summaries: kept,
            ..SledOptions::default()
        };
        let store = SledStore::open_with(dir.path(), options()).unwrap();
        let run = store.create_run(new_run("w")).await.unwrap().run();
        let created = store.live_bytes().unwrap();
        assert!(append_now(&store, run, step(0)).await);
        assert!(append_now(&store, run, gate(1)).await);
        let runs_bytes = |trees: Vec<TreeBytes>| trees.into_iter().find(|t| t.tree == "runs").unwrap().bytes;
        stored_bytes.push((runs_bytes(created), runs_bytes(store.live_bytes().unwrap())));
        let before = store.summary(run).await.unwrap().unwrap();
        // A crash: the marks stay, whatever was in memory is gone.
        drop(store);
        let store = SledStore::open_with(dir.path(), options()).unwrap();
        // The same but its wake-up: the open makes every marked run ready at once.
        let after = store.summary(run).await.unwrap().unwrap();
        assert_eq!(
            RunSummary {
                wake_at: None,
                ..after
            },
            RunSummary {
                wake_at: None,
                ..before
            },
            "kept {kept}"
        );
        assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
        store.close().unwrap();
    }
    let [(created, through), (created_again, kept)] = stored_bytes[..] else {
        panic!("{stored_bytes:?}")
    };
    assert!(through > created, "written through: {through} > {created}");
    assert!(created > 0, "written through at its creation too");
    assert_eq!(
        (created_again, kept),
        (0, 0),
        "kept in memory: no summary stored, from the creation on"
    );
}

/// A run whose mark outlives its last commit (its release was never written, as when a
/// crash comes between the commit's flush and the next) is checked on open, and its
/// last commit's notification, queued before that commit's summary, is not queued again.
#[tokio::test]
async fn a_run_checked_after_a_lost_release_queues_no_notification_twice() {
    let dir = tempfile::tempdir().unwrap();
    let options = || SledOptions {
        outbox_endpoints: vec!["ops".into()],
        ..SledOptions::default()
    };
    let store = SledStore::open_with(dir.path(), options()).unwrap();
    let run = store.create_run(new_run("w")).await.unwrap().run();
    assert!(append_now(&store, run, gate(1)).await);
    assert_eq!(store.outbox("ops", 10).await.unwrap().len(), 1);
    // Dropped, not closed: the run keeps its mark.
    drop(store);
    let store = SledStore::open_with(dir.path(), options()).unwrap();
    let queued = store.outbox("ops", 10).await.unwrap();
    let kinds: Vec<_> = queued.iter().map(|o| o.notification.kind).collect();
    assert_eq!(kinds, [NotificationKind::GateOpened]);
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
}

/// A commit's wake-up (a run started, a gate decided) is kept in memory, covered by the
/// run's dirty mark, not written to the `ready` tree. A crash loses the memory, so the
/// open makes every marked run ready; a close stores the wake-ups before it removes the
/// marks; a release stores the wake-up it leaves.
#[tokio::test]
async fn wake_ups_kept_in_memory_survive_a_crash_and_a_close() {
    let dir = tempfile::tempdir().unwrap();
    let stored = |store: &SledStore| entries(store, "ready");
    let claim_all = |store: SledStore| async move {
        let mut runs: Vec<RunId> = store
            .claim(WorkerId::new(), Utc::now(), Duration::from_secs(30), 10)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.run)
            .collect();
        runs.sort();
        (store, runs)
    };
    let store = SledStore::open(dir.path()).unwrap();
    let started = store.create_run(new_run("w")).await.unwrap().run();
    // `decided` waits at a gate with a timer due in an hour (stored), then is decided.
    let decided = store.create_run(new_run("w")).await.unwrap().run();
    let (store, claimed) = claim_all(store).await;
    assert_eq!(claimed.len(), 2);
    let lease = store
        .claim(WorkerId::new(), Utc::now(), Duration::from_secs(30), 10)
        .await
        .unwrap();
    assert!(lease.is_empty(), "both are held");
    assert_eq!(stored(&store), 0, "starting a run stores no wake-up");
    store.close().unwrap();

    // The close stored both wake-ups (the leases died with the process).
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(stored(&store), 2);
    let leases = store
        .claim(WorkerId::new(), Utc::now(), Duration::from_secs(30), 10)
        .await
        .unwrap();
    let lease = leases.iter().find(|l| l.run == decided).unwrap();
    let mut opened = append(decided, 1, vec![gate(1)]);
    opened.lease = Some(lease.token);
    store.append(opened).await.unwrap().unwrap();
    let in_an_hour = Utc::now() + chrono::Duration::hours(1);
    store.release(lease, Some(in_an_hour)).await.unwrap();
    let held = leases.iter().find(|l| l.run == started).unwrap();
    store.release(held, None).await.unwrap();
    assert_eq!(
        stored(&store),
        1,
        "the timer's wake-up is stored; `started` has none"
    );
    assert!(append_now(&store, decided, approve(1)).await);
    assert_eq!(
        stored(&store),
        0,
        "the decision's wake-up replaced the stored one"
    );
    // Its activation commits once more (a commit that wakes nothing: recovery's redo of
    // the last commit does not make it ready), then the process dies.
    let leases = store
        .claim(WorkerId::new(), Utc::now(), Duration::from_secs(30), 10)
        .await
        .unwrap();
    assert_eq!(leases.iter().map(|l| l.run).collect::<Vec<_>>(), vec![decided]);
    let lease = &leases[0];
    let mut next = append(decided, 3, vec![step(2)]);
    next.lease = Some(lease.token);
    store.append(next).await.unwrap().unwrap();
    // A crash: dropped, not closed, so the marks stay and the memory is gone.
    drop(store);

    let store = SledStore::open(dir.path()).unwrap();
    let (store, ready) = claim_all(store).await;
    assert_eq!(ready, vec![decided], "the decided run is ready after the crash");
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
}

fn snapshot_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snap."))
        .collect();
    names.sort();
    names
}

/// Starts `n` runs and takes each through a gate, its decision, a step and its end, from
/// eight tasks at once: inserts, rewrites and removals in every tree.
async fn churn(store: &SledStore, n: u32) -> Vec<RunId> {
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..n / 8 {
                let id = store.create_run(new_run("w")).await.unwrap().run();
                for event in [
                    gate(0),
                    approve(0),
                    step(1 + t + i),
                    EventKind::RunCompleted { output: json!(i) },
                ] {
                    assert!(append_now(&store, id, event).await);
                }
                ids.push(id);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    ids
}

/// A clean close leaves sled a snapshot of its page table (the vendored sled writes it;
/// sled 0.34.7 wrote one only while opening, so the first open after a long run replayed
/// every message since the previous open). The snapshot must be exactly what replaying
/// the whole log builds, which is what an open without it would recover: checked after
/// each of three sessions of writes, each opened from the previous one's snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_close_leaves_a_snapshot_equal_to_replaying_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    let mut previous = Vec::new();
    for session in 0..3 {
        let store = SledStore::open(dir.path()).unwrap();
        runs.extend(churn(&store, 400).await);
        store.close().unwrap();

        let snapshots = snapshot_files(dir.path());
        assert_eq!(snapshots.len(), 1, "session {session}: {snapshots:?}");
        assert!(
            snapshots > previous,
            "session {session}: {snapshots:?} after {previous:?}"
        );
        previous = snapshots;
        holdpoint_journal::sled_raw_config(dir.path())
            .verify_snapshot_against_log()
            .unwrap_or_else(|e| panic!("session {session}: {e}"));
    }

    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    assert_eq!(store.count_runs(RunStatus::Completed).unwrap(), runs.len());
    for run in &runs {
        store.verify_run(*run).unwrap();
    }
}

/// An open with no snapshot (after a crash there is none newer than the last open)
/// rebuilds the page table from the whole log. On a compressed directory (the default)
/// the vendored sled reads each message's header there without decompressing it, and
/// every page must still read back: the indexes agree and every journal verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_directory_without_its_snapshot_recovers_everything_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let runs = churn(&store, 400).await;
    store.close().unwrap();
    let conf = String::from_utf8_lossy(&std::fs::read(dir.path().join("conf")).unwrap()).into_owned();
    assert!(conf.contains("use_compression: true"), "{conf}");
    let snapshots = snapshot_files(dir.path());
    assert!(!snapshots.is_empty());
    for name in snapshots {
        std::fs::remove_file(dir.path().join(name)).unwrap();
    }

    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    assert_eq!(store.count_runs(RunStatus::Completed).unwrap(), runs.len());
    for run in &runs {
        store.verify_run(*run).unwrap();
        assert_eq!(store.read(*run, Seq::ZERO).await.unwrap().len(), 5);
    }
    store.close().unwrap();
}

/// A close with nothing written since the open (`holdpoint verify`, a server that only
/// served reads) leaves the snapshot the open found as it was: the shutdown snapshot is
/// the size of the page table (4 MB and an fsync for 1,000,000 runs), and it would be
/// the same one again.
#[tokio::test]
async fn a_close_with_nothing_written_since_the_open_writes_no_snapshot() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    // Each file by name and inode: writing a snapshot creates a new file and renames it.
    let snapshots = |dir: &std::path::Path| {
        snapshot_files(dir)
            .into_iter()
            .map(|name| {
                let inode = std::fs::metadata(dir.join(&name)).unwrap().ino();
                (name, inode)
            })
            .collect::<Vec<_>>()
    };
    let store = SledStore::open(dir.path()).unwrap();
    let runs = churn(&store, 400).await;
    store.close().unwrap();
    let written = snapshots(dir.path());
    assert_eq!(written.len(), 1, "{written:?}");

    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    for run in &runs {
        store.verify_run(*run).unwrap();
    }
    store.close().unwrap();
    assert_eq!(
        snapshots(dir.path()),
        written,
        "a read-only session wrote a snapshot"
    );

    let store = SledStore::open(dir.path()).unwrap();
    store.create_run(new_run("w")).await.unwrap();
    store.close().unwrap();
    let after_a_write = snapshots(dir.path());
    assert_eq!(after_a_write.len(), 1, "{after_a_write:?}");
    assert_ne!(
        after_a_write, written,
        "a session that wrote left the old snapshot"
    );
    holdpoint_journal::sled_raw_config(dir.path())
        .verify_snapshot_against_log()
        .unwrap();
}

/// A snapshot whose writer died before renaming it into place is ignored, not read (sled
/// 0.34.7 read it, failed its checksum and would not open the directory), and the next
/// snapshot written removes it.
#[tokio::test]
async fn a_snapshot_left_half_written_does_not_stop_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let runs = churn(&store, 400).await;
    store.close().unwrap();
    let written = snapshot_files(dir.path());
    assert_eq!(written.len(), 1);

    let torn = dir.path().join("snap.FFFFFFFFFFFFFFFF.generating");
    std::fs::write(&torn, b"a snapshot cut off by a crash").unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    for run in &runs {
        store.verify_run(*run).unwrap();
    }
    churn(&store, 16).await;
    store.close().unwrap();
    assert!(!torn.exists(), "{:?}", snapshot_files(dir.path()));
    assert_eq!(snapshot_files(dir.path()).len(), 1);
}

/// The same check on sled alone, arranged so that the snapshot carries what replaying only
/// the log's last segment could not restore: leaves changed once (a fragment each, not
/// yet folded into a new base) and then left alone while more than a segment of other
/// writes went by, and keys removed.
#[test]
fn a_snapshot_written_at_shutdown_keeps_fragments_older_than_the_last_segment() {
    let dir = tempfile::tempdir().unwrap();
    let open = || sled::Config::new().path(dir.path()).open().unwrap();
    let key = |i: u32| i.to_be_bytes();
    {
        let db = open();
        let leaves = db.open_tree("leaves").unwrap();
        for i in 0..20_000u32 {
            leaves.insert(key(i), &[1u8; 40][..]).unwrap();
        }
        db.flush().unwrap();
        // One change in every leaf (at most 64 keys each), some of them removals.
        for i in (0..20_000u32).step_by(50) {
            if i % 200 == 0 {
                leaves.remove(key(i)).unwrap();
            } else {
                leaves.insert(key(i), &[2u8; 40][..]).unwrap();
            }
        }
        db.flush().unwrap();
        let other = db.open_tree("other").unwrap();
        for i in 0..4_000u32 {
            other.insert(key(i), &[3u8; 500][..]).unwrap();
        }
        db.flush().unwrap();
    }
    sled::Config::new()
        .path(dir.path())
        .verify_snapshot_against_log()
        .unwrap();

    let db = open();
    let leaves = db.open_tree("leaves").unwrap();
    assert_eq!(leaves.len(), 20_000 - 100);
    for i in (0..20_000u32).step_by(50) {
        let expected = if i % 200 == 0 { None } else { Some(vec![2u8; 40]) };
        assert_eq!(
            leaves.get(key(i)).unwrap().map(|v| v.to_vec()),
            expected,
            "key {i}"
        );
    }
}

/// sled records in a directory whether its log is compressed and refuses to open it the
/// other way; the store opens a directory the way it was created, whatever its options
/// ask for (they choose only for a new directory), and `sled_raw_config` matches it.
#[tokio::test]
async fn a_directory_keeps_the_compression_it_was_created_with() {
    // sled's conf: text lines, then a CRC.
    let conf = |dir: &std::path::Path| {
        String::from_utf8_lossy(&std::fs::read(dir.join("conf")).unwrap()).into_owned()
    };
    for (created, reopened) in [(None, Some(-3)), (Some(-3), None), (Some(1), Some(-5))] {
        let dir = tempfile::tempdir().unwrap();
        let options = |compression| SledOptions {
            compression,
            ..SledOptions::default()
        };
        let store = SledStore::open_with(dir.path(), options(created)).unwrap();
        let run = store.create_run(new_run("w")).await.unwrap().run();
        assert!(append_now(&store, run, gate(0)).await);
        store.close().unwrap();
        let compressed = created.is_some();
        assert!(
            conf(dir.path()).contains(&format!("use_compression: {compressed}")),
            "{created:?}: {}",
            conf(dir.path())
        );

        let store = SledStore::open_with(dir.path(), options(reopened)).unwrap();
        assert_eq!(store.read(run, Seq::ZERO).await.unwrap().len(), 2);
        assert!(append_now(&store, run, approve(0)).await);
        store.close().unwrap();
        assert!(conf(dir.path()).contains(&format!("use_compression: {compressed}")));

        // The other setting is refused by sled; the matching one opens and reads.
        let other = sled::Config::new()
            .path(dir.path())
            .use_compression(!compressed)
            .open();
        assert!(other.is_err(), "{created:?}");
        let db = holdpoint_journal::sled_raw_config(dir.path()).open().unwrap();
        assert_eq!(db.open_tree("events").unwrap().len(), 3);
        drop(db);
    }
}

/// A read from past the end of a journal answers the same for short journals (point
/// reads) as for long ones (a range scan), and panics for neither: from the end or past
/// it, no events (past it, the scan once reported the record before `from` as missing,
/// a corruption); from the end, the last record is still checked against the head.
#[tokio::test]
async fn a_read_from_past_the_end_of_a_journal_answers_alike_for_short_and_long() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    for events in [2u64, 40] {
        let run = store.create_run(new_run("w")).await.unwrap().run();
        for i in 1..events {
            assert!(append_now(&store, run, step(i as u32)).await);
        }
        assert_eq!(store.read(run, Seq::ZERO).await.unwrap().len(), events as usize);
        assert!(store.read(run, Seq(events)).await.unwrap().is_empty());
        for past in [events + 1, events + 3, events + 100] {
            let read = store.read(run, Seq(past)).await;
            assert!(
                matches!(&read, Ok(events) if events.is_empty()),
                "{events} events, from {past}: {read:?}"
            );
        }
        let last = Seq(events - 1);
        let mut record = store.raw_record(run, last).unwrap().unwrap();
        let end = record.len() - 1;
        record[end] ^= 0x01;
        store.overwrite_record(run, last, &record).unwrap();
        let read = store.read(run, Seq(events)).await;
        assert!(
            matches!(&read, Err(Error::Corrupt { seq, .. }) if *seq == last),
            "{events} events, from the end, the last record edited: {read:?}"
        );
    }
    store.close().unwrap();
}

/// Short journals are read by key, neighbouring keys from the leaf the first was found
/// in (`Tree::get_many`). With many journals in the tree, some of them straddle two
/// leaves: every read, from every offset, answers the journal's own events in order,
/// and an edited record is reported at its seq whichever offset the read starts from.
#[tokio::test]
async fn short_journals_read_alike_from_every_offset_across_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    const EVENTS: u64 = 12;
    let mut runs = Vec::new();
    for _ in 0..40 {
        runs.push(store.create_run(new_run("w")).await.unwrap().run());
    }
    // Round-robin, so the tree's leaves split while every journal grows.
    for i in 1..EVENTS {
        for &run in &runs {
            assert!(append_now(&store, run, step(i as u32)).await);
        }
    }
    for &run in &runs {
        let all = store.read(run, Seq::ZERO).await.unwrap();
        assert_eq!(all.len() as u64, EVENTS);
        for (i, event) in all.iter().enumerate() {
            assert_eq!((event.run, event.seq), (run, Seq(i as u64)));
        }
        for from in 0..=EVENTS {
            let read = store.read(run, Seq(from)).await.unwrap();
            assert_eq!(read, all[from as usize..], "run {run}, from {from}");
        }
    }
    let edited = Seq(7);
    for &run in &runs {
        let mut record = store.raw_record(run, edited).unwrap().unwrap();
        let end = record.len() - 1;
        record[end] ^= 0x01;
        store.overwrite_record(run, edited, &record).unwrap();
        for from in [0, 3, edited.0, edited.0 + 1] {
            let read = store.read(run, Seq(from)).await;
            assert!(
                matches!(&read, Err(Error::Corrupt { seq, .. }) if *seq == edited),
                "run {run}, from {from}: {read:?}"
            );
        }
        assert_eq!(
            store.read(run, Seq(edited.0 + 2)).await.unwrap().len() as u64,
            EVENTS - edited.0 - 2
        );
    }
    store.close().unwrap();
}

/// `Tree::get_many` (the vendored sled's, for `read`) answers every key as `get` does:
/// neighbouring keys, keys on both sides of a leaf's bounds, absent keys, keys in
/// descending order, keys in another tree's range, after removals that merge leaves.
#[test]
fn get_many_answers_every_key_as_get_does() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(dir.path()).open().unwrap();
    let tree = db.open_tree("t").unwrap();
    let key = |run: u32, seq: u64| {
        let mut k = run.to_be_bytes().to_vec();
        k.extend_from_slice(&seq.to_be_bytes());
        k
    };
    // Journals of 1 to 20 records: many leaves, and runs that straddle them.
    for run in 0..300u32 {
        for seq in 0..u64::from(run % 20 + 1) {
            tree.insert(key(run, seq), key(run, seq + 1000)).unwrap();
        }
    }
    let check = |keys: Vec<Vec<u8>>| {
        let many = tree.get_many(&keys).unwrap();
        let one: Vec<_> = keys.iter().map(|k| tree.get(k).unwrap()).collect();
        assert_eq!(many, one, "keys {keys:?}");
    };
    let mut answered = 0;
    for run in 0..300u32 {
        // The run's records and one past its end, and into the next run.
        check((0..22).map(|seq| key(run, seq)).collect());
        check(
            (0..3)
                .map(|seq| key(run + 1, seq))
                .chain((0..3).map(|seq| key(run, seq)))
                .collect(),
        );
        check((0..22).rev().map(|seq| key(run, seq)).collect());
        answered += tree
            .get_many(&(0..22).map(|seq| key(run, seq)).collect::<Vec<_>>())
            .unwrap()
            .iter()
            .flatten()
            .count();
    }
    assert_eq!(
        answered,
        (0..300u32).map(|r| (r % 20 + 1) as usize).sum::<usize>()
    );
    // Removals merge leaves; the answers follow.
    for run in (0..300u32).step_by(3) {
        for seq in 0..u64::from(run % 20 + 1) {
            tree.remove(key(run, seq)).unwrap();
        }
    }
    for run in 0..300u32 {
        check((0..22).map(|seq| key(run, seq)).collect());
    }
    check(Vec::new());
}
