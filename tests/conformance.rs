//! One suite, every store: the `Store` contract checked on sled (temp directories; with
//! dirty marks, writing summaries through, and with its write-ahead log) and on
//! PostgreSQL (a fresh schema per test in the database named by `HOLDPOINT_PG_URL`,
//! default `postgres://postgres@127.0.0.1:5432/test`). A missing PostgreSQL is a
//! failure, never a skip. Sled-only behaviour (directory locks, reopen, group commit)
//! stays in `journal/tests/sled_store.rs`.

use chrono::Utc;
mod common;

use common::{approve, gate_with};
use holdpoint::journal::*;
use holdpoint_pg::{PgOptions, PgStore};
use serde_json::json;
use std::time::Duration;

/// Limits every suite store is opened with (small, so the limit cases are quick).
#[derive(Clone, Default)]
struct Opts {
    max_event_bytes: Option<usize>,
    max_run_events: Option<u64>,
    outbox: Vec<String>,
}

/// A store under test, with what the cases need beyond the trait.
trait Subject: Store + Clone {
    /// Overwrites one byte of a stored record's JSON (bit rot, or an edit).
    fn corrupt(&self, run: RunId, seq: Seq) -> impl std::future::Future<Output = ()> + Send;
    /// Stores `record` in place of the one at `seq` (an edit that keeps the checksum
    /// valid).
    fn rewrite(&self, run: RunId, seq: Seq, record: Vec<u8>) -> impl std::future::Future<Output = ()> + Send;
}

struct SledSubject {
    store: SledStore,
    _dir: tempfile::TempDir,
}

async fn sled(opts: Opts) -> SledSubject {
    sled_keeping(opts, SledOptions::default().kept_summaries, false)
}

/// The sled store with commits durable in its write-ahead log (`SledOptions::wal`), its
/// records held in memory until a release.
async fn sled_with_the_log(opts: Opts) -> SledSubject {
    sled_keeping(opts, SledOptions::default().kept_summaries, true)
}

/// The sled store with no summary kept in memory: every commit writes its summary, as
/// past `SledOptions::kept_summaries` marks.
async fn sled_writing_through(opts: Opts) -> SledSubject {
    sled_keeping(opts, 0, false)
}

fn sled_keeping(opts: Opts, kept_summaries: usize, wal: bool) -> SledSubject {
    let dir = tempfile::tempdir().unwrap();
    let d = SledOptions::default();
    let store = SledStore::open_with(
        dir.path(),
        SledOptions {
            max_event_bytes: opts.max_event_bytes.unwrap_or(d.max_event_bytes),
            max_run_events: opts.max_run_events.unwrap_or(d.max_run_events),
            outbox_endpoints: opts.outbox,
            kept_summaries,
            wal,
            ..d
        },
    )
    .unwrap();
    SledSubject { store, _dir: dir }
}

/// Flips a bit inside the record's JSON (past its header), so the checksum catches it.
fn flip(mut record: Vec<u8>) -> Vec<u8> {
    let at = record.len() - 3;
    record[at] ^= 0x20;
    record
}

impl Subject for SledStore {
    async fn corrupt(&self, run: RunId, seq: Seq) {
        let record = self.raw_record(run, seq).unwrap().unwrap();
        self.overwrite_record(run, seq, &flip(record)).unwrap();
    }
    async fn rewrite(&self, run: RunId, seq: Seq, record: Vec<u8>) {
        self.overwrite_record(run, seq, &record).unwrap();
    }
}

pub fn pg_url() -> String {
    std::env::var("HOLDPOINT_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn pg(opts: Opts) -> PgStore {
    let d = PgOptions::default();
    let schema = format!("hp_test_{}", uuid::Uuid::now_v7().simple());
    PgStore::connect(
        &pg_url(),
        PgOptions {
            schema,
            pool_size: 8,
            max_event_bytes: opts.max_event_bytes.unwrap_or(d.max_event_bytes),
            max_run_events: opts.max_run_events.unwrap_or(d.max_run_events),
            outbox_endpoints: Some(opts.outbox),
            ..d
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is required for the conformance suite ({e}); set HOLDPOINT_PG_URL or start it on 127.0.0.1:5432"
        )
    })
}

impl Subject for PgStore {
    async fn corrupt(&self, run: RunId, seq: Seq) {
        let record = self.raw_record(run, seq).await.unwrap().unwrap();
        self.overwrite_record(run, seq, &flip(record)).await.unwrap();
    }
    async fn rewrite(&self, run: RunId, seq: Seq, record: Vec<u8>) {
        self.overwrite_record(run, seq, &record).await.unwrap();
    }
}

/// Generates one test per case for a store kind.
macro_rules! suite {
    ($kind:ident, $open:expr, $close:expr) => {
        mod $kind {
            use super::*;
            suite!(@case $open, $close, append_at_wrong_seq_is_a_conflict_value_saying_what_is_there, Opts::default());
            suite!(@case $open, $close, oversized_event_is_refused_and_nothing_is_written, Opts { max_event_bytes: Some(1024), ..Opts::default() });
            suite!(@case $open, $close, gates_index_follows_events_and_pages_without_scanning_runs, Opts::default());
            suite!(@case $open, $close, leases_fence_appends, Opts::default());
            suite!(@case $open, $close, an_expired_lease_is_taken_over_and_the_old_holder_cannot_append, Opts::default());
            suite!(@case $open, $close, a_wake_up_during_a_lease_is_kept_for_its_release, Opts::default());
            suite!(@case $open, $close, reads_racing_appends_never_see_corruption, Opts::default());
            suite!(@case $open, $close, concurrent_claims_never_hand_out_a_run_twice, Opts::default());
            suite!(@case $open, $close, idempotent_starts_return_the_first_run_and_refuse_a_different_request, Opts::default());
            suite!(@case $open, $close, a_run_at_its_limit_refuses_growth_but_can_still_end, Opts { max_run_events: Some(5), ..Opts::default() });
            suite!(@case $open, $close, corruption_is_detected_and_names_the_event, Opts::default());
            suite!(@case $open, $close, a_read_from_past_the_end_gives_no_events, Opts::default());
            suite!(@case $open, $close, deadlines_and_rule_history_are_indexes, Opts::default());
            suite!(@case $open, $close, the_outbox_queues_notifications_per_endpoint_in_order, Opts { outbox: vec!["a".into(), "b".into()], ..Opts::default() });
            suite!(@case $open, $close, stuck_runs_are_parked_and_never_claimed, Opts::default());
            suite!(@case $open, $close, engine_runs_to_a_gate_decides_once_and_completes_replayably, Opts::default());
            suite!(@case $open, $close, engine_two_engines_on_one_store_drive_each_run_once, Opts::default());
        }
    };
    (@case $open:expr, $close:expr, $name:ident, $opts:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let subject = $open($opts).await;
            super::$name(store_of(&subject)).await;
            $close(subject).await;
        }
    };
}

fn store_of<T: AsStore>(s: &T) -> T::S {
    s.store()
}

trait AsStore {
    type S: Subject;
    fn store(&self) -> Self::S;
}

impl AsStore for SledSubject {
    type S = SledStore;
    fn store(&self) -> SledStore {
        self.store.clone()
    }
}

impl AsStore for PgStore {
    type S = PgStore;
    fn store(&self) -> PgStore {
        self.clone()
    }
}

async fn close_sled(_s: SledSubject) {}

async fn close_pg(s: PgStore) {
    s.drop_schema().await.unwrap();
}

suite!(sled_store, sled, close_sled);
suite!(sled_store_writing_through, sled_writing_through, close_sled);
suite!(sled_store_with_the_log, sled_with_the_log, close_sled);
suite!(pg_store, pg, close_pg);

// ----------------------------------------------------------------------------- helpers

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
    gate_with(p, None, None)
}

/// The one ready run, leased by a new worker for 30 s.
async fn claim_one<S: Subject>(store: &S) -> Lease {
    store
        .claim(WorkerId::new(), Utc::now(), Duration::from_secs(30), 1)
        .await
        .unwrap()
        .remove(0)
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

// ----------------------------------------------------------------------------- cases

async fn append_at_wrong_seq_is_a_conflict_value_saying_what_is_there<S: Subject>(store: S) {
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
    assert_eq!((conflict.expected, conflict.found), (Seq(1), Seq(3)));
    let events = store.read(run, Seq::ZERO).await.unwrap();
    assert_eq!(events.iter().map(|e| e.seq.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    // Reading from the middle verifies the link to the event before.
    assert_eq!(store.read(run, Seq(2)).await.unwrap().len(), 1);
    assert_eq!(store.read(run, Seq(3)).await.unwrap().len(), 0);
    assert!(matches!(
        store
            .append(append(RunId::new(), 0, vec![step(0)]))
            .await
            .unwrap_err(),
        Error::UnknownRun(_)
    ));
    assert!(matches!(
        store.read(RunId::new(), Seq::ZERO).await.unwrap_err(),
        Error::UnknownRun(_)
    ));
}

async fn oversized_event_is_refused_and_nothing_is_written<S: Subject>(store: S) {
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

async fn gates_index_follows_events_and_pages_without_scanning_runs<S: Subject>(store: S) {
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
    store.create_run(new_run("w")).await.unwrap();
    let page1 = store.pending(None, 3).await.unwrap();
    let page2 = store
        .pending(Some((page1[2].run, page1[2].gate)), 3)
        .await
        .unwrap();
    let all: Vec<RunId> = page1.iter().chain(&page2).map(|g| g.run).collect();
    assert_eq!(all, runs, "pending pages in run (creation) order");
    let waiting = store
        .list_runs(Some(RunStatus::Waiting), None, 100)
        .await
        .unwrap();
    assert_eq!(waiting.len(), 5);
    let after = store
        .list_runs(Some(RunStatus::Waiting), Some(runs[1]), 100)
        .await
        .unwrap();
    assert_eq!(after.iter().map(|s| s.id).collect::<Vec<_>>(), runs[2..].to_vec());
    assert_eq!(
        store
            .list_runs(Some(RunStatus::Running), None, 100)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(store.list_runs(None, None, 100).await.unwrap().len(), 6);
    store
        .append(append(runs[0], 2, vec![approve(0, "bob")]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.pending(None, 100).await.unwrap().len(), 4);
    let s = store.summary(runs[0]).await.unwrap().unwrap();
    assert_eq!(s.status, RunStatus::Running);
    assert!(s.wake_at.is_some());
    let cancel = EventKind::RunCancelled {
        by: Principal::new("op"),
        reason: None,
    };
    store
        .append(append(runs[1], 2, vec![cancel]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.pending(None, 100).await.unwrap().len(), 3);
    assert!(matches!(
        store.append(append(runs[1], 3, vec![step(0)])).await.unwrap_err(),
        Error::RunEnded(_)
    ));
}

async fn leases_fence_appends<S: Subject>(store: S) {
    let worker = WorkerId::new();
    let run = store.create_run(new_run("w")).await.unwrap().run();
    let leases = store
        .claim(worker, Utc::now(), Duration::from_secs(30), 10)
        .await
        .unwrap();
    assert_eq!(leases.len(), 1);
    assert!(store.is_leased(run).await.unwrap());
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
    store.release(&leases[0], None).await.unwrap();
    assert!(!store.is_leased(run).await.unwrap());
    // Released without a wake-up: nothing to claim.
    assert!(store
        .claim(worker, Utc::now(), Duration::from_secs(30), 10)
        .await
        .unwrap()
        .is_empty());
}

async fn an_expired_lease_is_taken_over_and_the_old_holder_cannot_append<S: Subject>(store: S) {
    let run = store.create_run(new_run("w")).await.unwrap().run();
    let t0 = Utc::now();
    let old = store
        .claim(WorkerId::new(), t0, Duration::from_secs(1), 1)
        .await
        .unwrap()
        .remove(0);
    let later = t0 + chrono::Duration::seconds(5);
    assert!(
        store.next_wake().await.unwrap().is_some_and(|w| w <= later),
        "an expiring lease is a wake-up: its run must be taken over"
    );
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
    // The old holder's release and stuck mark do nothing to the new lease.
    store.release(&old, Some(later)).await.unwrap();
    assert!(store.is_leased(run).await.unwrap());
    assert!(matches!(
        store.mark_stuck(&old, "no".into()).await.unwrap_err(),
        Error::LeaseLost(_)
    ));
}

async fn a_wake_up_during_a_lease_is_kept_for_its_release<S: Subject>(store: S) {
    let run = store.create_run(new_run("w")).await.unwrap().run();
    let lease = claim_one(&store).await;
    let mut a = append(run, 1, vec![gate(0)]);
    a.lease = Some(lease.token);
    store.append(a).await.unwrap().unwrap();
    store
        .append(append(run, 2, vec![approve(0, "bob")]))
        .await
        .unwrap()
        .unwrap();
    let claimable = store
        .claim(WorkerId::new(), Utc::now(), Duration::from_secs(30), 1)
        .await
        .unwrap();
    assert!(claimable.is_empty(), "not queued while leased");
    store.release(&lease, None).await.unwrap();
    let again = store
        .claim(WorkerId::new(), Utc::now(), Duration::from_secs(30), 1)
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "the decision's wake-up survived the release");
}

async fn reads_racing_appends_never_see_corruption<S: Subject>(store: S) {
    let run = store.create_run(new_run("w")).await.unwrap().run();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..200u32 {
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
    assert_eq!(store.read(run, Seq::ZERO).await.unwrap().len(), 201);
    assert!(reads > 1);
}

async fn concurrent_claims_never_hand_out_a_run_twice<S: Subject>(store: S) {
    let mut runs = Vec::new();
    for _ in 0..40 {
        runs.push(store.create_run(new_run("w")).await.unwrap().run());
    }
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let l = store
                    .claim(WorkerId::new(), Utc::now(), Duration::from_secs(30), 3)
                    .await
                    .unwrap();
                if l.is_empty() {
                    return got;
                }
                got.extend(l.into_iter().map(|l| l.run));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    let mut want = runs.clone();
    want.sort();
    assert_eq!(all, want, "every ready run claimed exactly once");
}

async fn idempotent_starts_return_the_first_run_and_refuse_a_different_request<S: Subject>(store: S) {
    let mut first = new_run("w");
    first.idempotency_key = Some("order-7".into());
    let run = store.create_run(first.clone()).await.unwrap();
    assert!(matches!(run, Created::New(_)));
    let mut again = new_run("w");
    again.idempotency_key = Some("order-7".into());
    assert_eq!(
        store.create_run(again).await.unwrap(),
        Created::Existing(run.run())
    );
    let mut different = new_run("w");
    different.idempotency_key = Some("order-7".into());
    different.input = json!({"n": 2});
    assert!(matches!(
        store.create_run(different).await.unwrap_err(),
        Error::StartConflict { existing, .. } if existing == run.run()
    ));
    assert_eq!(store.list_runs(None, None, 10).await.unwrap().len(), 1);
}

async fn a_run_at_its_limit_refuses_growth_but_can_still_end<S: Subject>(store: S) {
    let run = store.create_run(new_run("w")).await.unwrap().run();
    store
        .append(append(run, 1, (0..4).map(step).collect()))
        .await
        .unwrap()
        .unwrap();
    let err = store.append(append(run, 5, vec![step(9)])).await.unwrap_err();
    assert!(matches!(err, Error::RunLimit { .. }), "{err}");
    let fail = EventKind::RunFailed {
        error: "too long".into(),
    };
    store.append(append(run, 5, vec![fail])).await.unwrap().unwrap();
    assert_eq!(
        store.summary(run).await.unwrap().unwrap().status,
        RunStatus::Failed
    );
}

async fn corruption_is_detected_and_names_the_event<S: Subject>(store: S) {
    let run = store.create_run(new_run("w")).await.unwrap().run();
    store
        .append(append(run, 1, vec![step(0), step(1), step(2)]))
        .await
        .unwrap()
        .unwrap();
    store.corrupt(run, Seq(2)).await;
    match store.read(run, Seq::ZERO).await {
        Err(Error::Corrupt { seq, .. }) => assert_eq!(seq, Seq(2)),
        other => panic!("expected a corrupt journal at seq 2, got {other:?}"),
    }
    // Reading past the bad record still checks the link to it.
    assert!(store.read(run, Seq(3)).await.is_err());
}

async fn a_read_from_past_the_end_gives_no_events<S: Subject>(store: S) {
    let run = store.create_run(new_run("w")).await.unwrap().run();
    store
        .append(append(run, 1, vec![step(0), step(1)]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.read(run, Seq(1)).await.unwrap().len(), 2);
    assert!(store.read(run, Seq(3)).await.unwrap().is_empty(), "from the end");
    for past in [4, 10, u64::MAX] {
        let read = store.read(run, Seq(past)).await;
        assert!(
            matches!(&read, Ok(events) if events.is_empty()),
            "from {past}, past the end of 3 events: {read:?}"
        );
    }
    // The last record rewritten with another event, its checksum valid: a read from the
    // end still finds that it is not the record the run's head names.
    let events = store.read(run, Seq::ZERO).await.unwrap();
    let mut prev = ChainHash::GENESIS;
    for e in &events[..2] {
        prev = codec::encode(e, &prev, 65_536).unwrap().1;
    }
    let other = Event {
        event: step(7),
        ..events[2].clone()
    };
    let (record, _) = codec::encode(&other, &prev, 65_536).unwrap();
    store.rewrite(run, Seq(2), record).await;
    let read = store.read(run, Seq(3)).await;
    assert!(
        matches!(&read, Err(Error::Corrupt { seq, .. }) if *seq == Seq(2)),
        "from the end, the last record rewritten: {read:?}"
    );
}

async fn deadlines_and_rule_history_are_indexes<S: Subject>(store: S) {
    // Whole seconds: stores keep deadlines to the millisecond (sled) or microsecond.
    let t0 = chrono::DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
    let soon = t0 + chrono::Duration::seconds(60);
    let later = t0 + chrono::Duration::seconds(3600);
    let a = store.create_run(new_run("w")).await.unwrap().run();
    let b = store.create_run(new_run("w")).await.unwrap().run();
    store
        .append(append(a, 1, vec![gate_with(0, Some(later), Some("big"))]))
        .await
        .unwrap()
        .unwrap();
    store
        .append(append(b, 1, vec![gate_with(0, Some(soon), Some("big"))]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.next_deadline().await.unwrap(), Some(soon));
    assert!(store.due_deadlines(t0, 10).await.unwrap().is_empty());
    let due = store.due_deadlines(later, 10).await.unwrap();
    assert_eq!(
        due.iter().map(|d| d.run).collect::<Vec<_>>(),
        vec![b, a],
        "earliest first"
    );
    store
        .append(append(b, 2, vec![approve(0, "carol")]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.next_deadline().await.unwrap(),
        Some(later),
        "a decided gate's deadline is gone"
    );
    store
        .append(append(a, 2, vec![approve(0, "dave")]))
        .await
        .unwrap()
        .unwrap();
    let history = store.rule_history("big", 10).await.unwrap();
    let by: Vec<&str> = history.iter().map(|d| d.by.as_str()).collect();
    assert_eq!(by.len(), 2);
    assert!(by.contains(&"carol") && by.contains(&"dave"));
    assert!(store.rule_history("other", 10).await.unwrap().is_empty());
}

async fn the_outbox_queues_notifications_per_endpoint_in_order<S: Subject>(store: S) {
    let run = store.create_run(new_run("w")).await.unwrap().run();
    store
        .append(append(run, 1, vec![gate(0)]))
        .await
        .unwrap()
        .unwrap();
    store
        .append(append(run, 2, vec![approve(0, "bob")]))
        .await
        .unwrap()
        .unwrap();
    for endpoint in ["a", "b"] {
        let q = store.outbox(endpoint, 10).await.unwrap();
        let kinds: Vec<_> = q.iter().map(|o| o.notification.kind).collect();
        assert_eq!(
            kinds,
            vec![NotificationKind::GateOpened, NotificationKind::GateDecided]
        );
        assert_eq!(q[1].notification.action.as_deref(), Some("send_money"));
        assert_eq!(q[1].notification.id, format!("{run}:2"));
    }
    let q = store.outbox("a", 10).await.unwrap();
    store.outbox_done("a", q[0].key).await.unwrap();
    assert_eq!(store.outbox("a", 10).await.unwrap().len(), 1);
    assert_eq!(
        store.outbox("b", 10).await.unwrap().len(),
        2,
        "queues are per endpoint"
    );
    assert!(store.outbox("c", 10).await.unwrap().is_empty());
}

async fn stuck_runs_are_parked_and_never_claimed<S: Subject>(store: S) {
    let run = store.create_run(new_run("w")).await.unwrap().run();
    let lease = claim_one(&store).await;
    let mut opened = append(run, 1, vec![gate(0)]);
    opened.lease = Some(lease.token);
    store.append(opened).await.unwrap().unwrap();
    store.mark_stuck(&lease, "code changed".into()).await.unwrap();
    // A decision arriving at the parked run does not make it claimable.
    store
        .append(append(run, 2, vec![approve(0, "bob")]))
        .await
        .unwrap()
        .unwrap();
    let s = store.summary(run).await.unwrap().unwrap();
    assert_eq!(
        (s.status, s.stuck.as_deref()),
        (RunStatus::Stuck, Some("code changed"))
    );
    assert!(!store.is_leased(run).await.unwrap());
    assert!(store
        .claim(WorkerId::new(), Utc::now(), Duration::from_secs(30), 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store
            .list_runs(Some(RunStatus::Stuck), None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

// ----------------------------------------------------------------------------- engine cases

use holdpoint::{Ctx, DecisionRequest, Engine, Failure, Gated, Registry};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A step, a gate, and a step after it; counts how often each step body runs.
fn counting_registry(ran: Arc<AtomicUsize>) -> Registry {
    Registry::new().workflow("pay", 1, move |ctx: Ctx, amount: u64| {
        let ran = ran.clone();
        async move {
            let r = ran.clone();
            let plan = ctx
                .step("plan", move || {
                    let r = r.clone();
                    async move {
                        r.fetch_add(1, Ordering::SeqCst);
                        Ok(amount)
                    }
                })
                .await?;
            let paid = match ctx
                .gate("send_money", json!({"amount": plan}), json!(null))
                .await?
            {
                Gated::Approved { args, .. } | Gated::Edited { args, .. } => args,
                Gated::Rejected { reason, .. } => return Ok::<_, Failure>(json!(reason)),
            };
            let r = ran.clone();
            ctx.step("send", move || {
                let (r, paid) = (r.clone(), paid.clone());
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    Ok(paid)
                }
            })
            .await
        }
    })
}

async fn engine_runs_to_a_gate_decides_once_and_completes_replayably<S: Subject>(store: S) {
    let ran = Arc::new(AtomicUsize::new(0));
    let registry = counting_registry(ran.clone());
    let engine = Engine::new(store.clone(), counting_registry(ran.clone())).unwrap();
    let workers = engine.spawn_workers();
    let run = engine.start("pay", &700u64, None).await.unwrap();
    assert_eq!(engine.settled(run).await.unwrap().status, RunStatus::Waiting);
    let gate = engine.pending(None, 10).await.unwrap()[0].gate;
    engine
        .decide(run, DecisionRequest::approve(gate, Principal::new("bob")))
        .await
        .unwrap();
    let conflict = engine
        .decide(run, DecisionRequest::reject(gate, "no", Principal::new("eve")))
        .await
        .unwrap_err();
    assert!(
        matches!(conflict, holdpoint::Error::DecisionConflict { .. }),
        "{conflict}"
    );
    let done = engine.settled(run).await.unwrap();
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(
        engine.get(run).await.unwrap().state.output,
        Some(json!({"amount": 700}))
    );
    assert_eq!(ran.load(Ordering::SeqCst), 2, "each step body ran once");
    workers.shutdown().await;
    let events = store.read(run, Seq::ZERO).await.unwrap();
    assert!(matches!(
        holdpoint::replay(&registry, &events).await,
        holdpoint::Replay::Consistent { .. }
    ));
    assert_eq!(
        ran.load(Ordering::SeqCst),
        2,
        "replay answers steps from the journal"
    );
    assert!(matches!(
        engine
            .decide(
                RunId::new(),
                DecisionRequest::approve(gate, Principal::new("bob"))
            )
            .await
            .unwrap_err(),
        holdpoint::Error::UnknownRun(_) | holdpoint::Error::Journal(Error::UnknownRun(_))
    ));
}

async fn engine_two_engines_on_one_store_drive_each_run_once<S: Subject>(store: S) {
    let ran = Arc::new(AtomicUsize::new(0));
    let a = Engine::new(store.clone(), counting_registry(ran.clone())).unwrap();
    let b = Engine::new(store.clone(), counting_registry(ran.clone())).unwrap();
    let (wa, wb) = (a.spawn_workers(), b.spawn_workers());
    let mut runs = Vec::new();
    for i in 0..30u64 {
        runs.push(a.start("pay", &i, None).await.unwrap());
    }
    for &run in &runs {
        assert_eq!(b.settled(run).await.unwrap().status, RunStatus::Waiting);
        let gate = b
            .get(run)
            .await
            .unwrap()
            .state
            .gates
            .keys()
            .next()
            .copied()
            .unwrap();
        b.decide(run, DecisionRequest::approve(gate, Principal::new("bob")))
            .await
            .unwrap();
    }
    for &run in &runs {
        assert_eq!(a.settled(run).await.unwrap().status, RunStatus::Completed);
    }
    assert_eq!(
        ran.load(Ordering::SeqCst),
        60,
        "two step bodies per run, each once"
    );
    wa.shutdown().await;
    wb.shutdown().await;
}

/// PostgreSQL keeps the webhook endpoints in the database: a process that names none (a
/// worker) still queues for the ones `serve` configured, and a new list drops the
/// queues of endpoints no longer named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_workers_queue_notifications_for_the_servers_endpoints() {
    let server = pg(Opts {
        outbox: vec!["ops".into(), "old".into()],
        ..Opts::default()
    })
    .await;
    let worker = PgStore::connect(
        &pg_url(),
        PgOptions {
            schema: server.schema().to_string(),
            outbox_endpoints: None,
            ..PgOptions::default()
        },
    )
    .await
    .unwrap();
    let run = worker.create_run(new_run("w")).await.unwrap().run();
    worker
        .append(append(run, 1, vec![gate(0)]))
        .await
        .unwrap()
        .unwrap();
    for endpoint in ["ops", "old"] {
        let q = server.outbox(endpoint, 10).await.unwrap();
        assert_eq!(q.len(), 1, "{endpoint}");
        assert_eq!(q[0].notification.kind, NotificationKind::GateOpened);
    }
    let restarted = PgStore::connect(
        &pg_url(),
        PgOptions {
            schema: server.schema().to_string(),
            outbox_endpoints: Some(vec!["ops".into()]),
            ..PgOptions::default()
        },
    )
    .await
    .unwrap();
    assert!(restarted.outbox("old", 10).await.unwrap().is_empty());
    assert_eq!(restarted.outbox("ops", 10).await.unwrap().len(), 1);
    server.drop_schema().await.unwrap();
}
