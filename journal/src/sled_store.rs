//! `SledStore`: the embedded default store, on sled 0.34.7.
//!
//! Trees (all keys big-endian so sled's byte order is the logical order):
//!
//! | tree        | key                          | value                     |
//! |-------------|------------------------------|---------------------------|
//! | `events`    | run (16) ++ seq (8)          | record (see `codec`)      |
//! | `runs`      | run (16)                     | `RunSummary` JSON         |
//! | `by_status` | status (1) ++ run (16)       | empty                     |
//! | `pending`   | run (16) ++ gate (4)         | `PendingGate` JSON        |
//! | `ready`     | wake ms (8) ++ run (16)      | empty                     |
//! | `leases`    | run (16)                     | `Lease` JSON              |
//! | `starts`    | idempotency key              | run (16) ++ request hash  |
//! | `deadlines` | due ms (8) ++ run (16) ++ gate (4) | empty               |
//! | `rule_decisions` | rule ++ 0 ++ ms (8) ++ run (16) ++ gate (4) | `RuleDecision` JSON |
//!
//! **Write path.** An append encodes its records outside any transaction (sled retries
//! transaction closures, so they must stay pure and cheap), then one multi-tree
//! transaction checks the expected seq and the lease, inserts the records and applies
//! [`RunSummary::apply`]'s index changes. Then the caller joins the next group commit:
//! one flusher thread runs `Db::flush` (which writes sled's buffers with
//! `sync_file_range`) and then `fdatasync` on sled's data file through our own handle,
//! and wakes every append that was waiting when the flush began. So an acknowledged
//! append survives a process crash, a kernel crash and a power loss (given a disk that
//! honours flushes), and concurrent appends share one sync.
//!
//! **Recovery.** Events and indexes are written in one transaction, so they never
//! disagree. Leases die with their process: on open, every lease left in the file is
//! turned back into a ready entry, so an activation a crash interrupted is driven again.

use crate::codec::{self, ChainHash};
use crate::error::{Error, Result};
use crate::event::{Event, EventKind};
use crate::ids::{GateId, LeaseToken, RunId, Seq, WorkerId};
use crate::store::{
    check_run_limits, closes, Append, AppendConflict, Appended, Created, DueDeadline, IndexChange, Lease,
    NewRun, Outgoing, PendingGate, RuleDecision, RunStatus, RunSummary, Store,
};
use chrono::{DateTime, TimeZone, Utc};
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};
use sled::Transactional;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// Default cap on one encoded event.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 64 * 1024;

/// Options for [`SledStore::open_with`].
#[derive(Clone, Debug)]
pub struct SledOptions {
    /// Largest encoded event accepted (default 64 KiB; sled stores larger values in
    /// separate blob files, which we avoid).
    pub max_event_bytes: usize,
    /// sled's page cache size.
    pub cache_bytes: u64,
    /// Most events one run may have (default 100,000).
    pub max_run_events: u64,
    /// Most bytes one run's records may take (default 64 MiB).
    pub max_run_bytes: u64,
    /// Webhook endpoints (by name) whose notifications are queued in the outbox, in the
    /// same transaction as the events they come from. Queues of endpoints no longer
    /// named are dropped on open. Default: none.
    pub outbox_endpoints: Vec<String>,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            cache_bytes: 64 * 1024 * 1024,
            max_run_events: 100_000,
            max_run_bytes: 64 * 1024 * 1024,
            outbox_endpoints: Vec::new(),
        }
    }
}

/// The sled-backed [`Store`]. Cheap to clone (shares one database).
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    db: sled::Db,
    trees: Trees,
    flusher: GroupCommit,
    changes: watch::Sender<u64>,
    options: SledOptions,
    outbox_next: AtomicU64,
}

#[derive(Clone)]
struct Trees {
    events: sled::Tree,
    runs: sled::Tree,
    by_status: sled::Tree,
    pending: sled::Tree,
    ready: sled::Tree,
    leases: sled::Tree,
    starts: sled::Tree,
    deadlines: sled::Tree,
    rule_decisions: sled::Tree,
    /// Notifications to deliver, per endpoint: `endpoint \0 id(8, big-endian)`.
    outbox: sled::Tree,
}

// Positions of the trees in the slice every transaction uses.
const EVENTS: usize = 0;
const RUNS: usize = 1;
const BY_STATUS: usize = 2;
const PENDING: usize = 3;
const READY: usize = 4;
const LEASES: usize = 5;
const STARTS: usize = 6;
const DEADLINES: usize = 7;
const RULE_DECISIONS: usize = 8;
const OUTBOX: usize = 9;

impl Trees {
    fn all(&self) -> [&sled::Tree; 10] {
        [
            &self.events,
            &self.runs,
            &self.by_status,
            &self.pending,
            &self.ready,
            &self.leases,
            &self.starts,
            &self.deadlines,
            &self.rule_decisions,
            &self.outbox,
        ]
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir` with default options.
    pub fn open(dir: impl AsRef<Path>) -> Result<SledStore> {
        Self::open_with(dir, SledOptions::default())
    }

    pub fn open_with(dir: impl AsRef<Path>, options: SledOptions) -> Result<SledStore> {
        let dir = dir.as_ref().to_path_buf();
        let db = sled::Config::new()
            .path(&dir)
            .cache_capacity(options.cache_bytes)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => Error::Locked {
                    dir: dir.clone(),
                    detail: io.to_string(),
                },
                other => Error::Storage(format!("opening {}: {other}", dir.display())),
            })?;
        let trees = Trees {
            events: db.open_tree("events")?,
            runs: db.open_tree("runs")?,
            by_status: db.open_tree("by_status")?,
            pending: db.open_tree("pending")?,
            ready: db.open_tree("ready")?,
            leases: db.open_tree("leases")?,
            starts: db.open_tree("starts")?,
            deadlines: db.open_tree("deadlines")?,
            rule_decisions: db.open_tree("rule_decisions")?,
            outbox: db.open_tree("outbox")?,
        };
        // sled keeps its log in `<dir>/db`; we fsync it ourselves (see module docs).
        let data_file = File::open(dir.join("db"))?;
        let flusher = GroupCommit::start(db.clone(), data_file);
        let (changes, _) = watch::channel(0);
        let store = SledStore {
            inner: Arc::new(Inner {
                dir,
                db,
                trees,
                flusher,
                changes,
                options,
                outbox_next: AtomicU64::new(0),
            }),
        };
        store.recover_leases()?;
        store.open_outboxes()?;
        Ok(store)
    }

    /// Closes the store: flushes, stops the group-commit thread, and returns once sled
    /// has let go of the directory, so it can be reopened at once by this process.
    ///
    /// Dropping a store also closes it, but sled's background threads release their
    /// last handles (and with them the directory's file lock) a moment later, so an
    /// immediate reopen after a plain drop may see [`Error::Locked`]. `close` waits on
    /// that lock (a blocking `flock`, no polling). Fails if other clones are alive.
    pub fn close(self) -> Result<()> {
        let inner = Arc::try_unwrap(self.inner).map_err(|_| {
            Error::Storage("cannot close the store: other handles to it are still alive".into())
        })?;
        inner.db.flush()?;
        let db_file = inner.dir.join("db");
        drop(inner);
        let file = File::open(&db_file)?;
        fs2::FileExt::lock_exclusive(&file)?;
        fs2::FileExt::unlock(&file)?;
        Ok(())
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// How many group commits (flush + fsync) have run since open.
    pub fn sync_count(&self) -> u64 {
        self.inner.flusher.shared.syncs.load(Ordering::Relaxed)
    }

    /// sled's own estimate of its files' size.
    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.inner.db.size_on_disk()?)
    }

    /// How many runs have this status (a scan of the status index's prefix).
    pub fn count_runs(&self, status: RunStatus) -> Result<usize> {
        let mut n = 0;
        for item in self.inner.trees.by_status.scan_prefix([status.code()]).keys() {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// How many gates are open (a scan of the pending index).
    pub fn count_pending(&self) -> Result<usize> {
        let mut n = 0;
        for item in self.inner.trees.pending.iter().keys() {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// All run ids, in creation order (for `verify` and exports).
    pub fn run_ids(&self) -> impl Iterator<Item = Result<RunId>> + '_ {
        self.inner.trees.runs.iter().keys().map(|k| {
            let k = k?;
            run_from_key(&k).ok_or_else(|| Error::Storage("malformed key in runs tree".into()))
        })
    }

    /// Reads `[from, summary.next_seq)`: the events the summary (read first) knows.
    /// Events below `next_seq` never change, so this is a consistent view even while
    /// appends land; events appended after the summary was read are left for the next
    /// read. (Reading to the end of the tree instead made a read racing an append see
    /// events "past the summary" and report a healthy journal as corrupt.)
    fn read_to(&self, run: RunId, from: Seq, summary: &RunSummary) -> Result<Vec<Event>> {
        let events_tree = &self.inner.trees.events;
        let before = match from.0.checked_sub(1) {
            Some(at) => events_tree.get(event_key(run, Seq(at)))?,
            None => None,
        };
        let records = events_tree
            .range(event_key(run, from)..event_key(run, summary.next_seq))
            .map(|item| {
                let (key, record) = item?;
                let seq = key
                    .get(16..24)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(|b| Seq(u64::from_be_bytes(b)))
                    .ok_or_else(|| Error::Corrupt {
                        run,
                        seq: from,
                        reason: "malformed event key".into(),
                    })?;
                Ok((seq, record))
            });
        codec::verify_records(run, from, before, records, summary.next_seq, &summary.head)
    }

    /// Verifies a whole journal strictly, for offline checks (no writer running): every
    /// event read and chained, and nothing stored past what the summary knows.
    /// Returns the number of events and the head.
    pub fn verify_run(&self, run: RunId) -> Result<(Seq, ChainHash)> {
        let Some(summary) = self.summary_now(run)? else {
            return Err(Error::UnknownRun(run));
        };
        self.read_to(run, Seq::ZERO, &summary)?;
        let past = self
            .inner
            .trees
            .events
            .range(event_key(run, summary.next_seq)..=event_key(run, Seq(u64::MAX)))
            .next();
        if past.is_some() {
            return Err(codec::past_summary(run, summary.next_seq));
        }
        Ok((summary.next_seq, summary.head))
    }

    /// The chain hash of the run's event at `seq`, verifying every record up to it. With
    /// a head saved earlier (`holdpoint verify --head`), this tells whether the journal
    /// still begins with what it held then.
    pub fn chain_hash_at(&self, run: RunId, seq: Seq) -> Result<ChainHash> {
        let mut prev = ChainHash::GENESIS;
        for i in 0..=seq.0 {
            let at = Seq(i);
            let Some(record) = self.inner.trees.events.get(event_key(run, at))? else {
                return Err(Error::Corrupt {
                    run,
                    seq: at,
                    reason: "event is missing".into(),
                });
            };
            prev = codec::decode(run, at, &record, &prev)?.1;
        }
        Ok(prev)
    }

    /// One stored record, as it is on disk (corruption tests).
    #[doc(hidden)]
    pub fn raw_record(&self, run: RunId, seq: Seq) -> Result<Option<Vec<u8>>> {
        Ok(self
            .inner
            .trees
            .events
            .get(event_key(run, seq))?
            .map(|v| v.to_vec()))
    }

    /// Overwrites one stored record behind the store's back (corruption tests).
    #[doc(hidden)]
    pub fn overwrite_record(&self, run: RunId, seq: Seq, record: &[u8]) -> Result<()> {
        self.inner.trees.events.insert(event_key(run, seq), record)?;
        Ok(())
    }

    /// Waits until everything written so far is durable.
    pub async fn sync(&self) -> Result<()> {
        self.inner.flusher.wait().await
    }

    /// Every lease left in the file belongs to a process that is gone (sled allows one
    /// process per directory): put those runs back on the ready queue.
    fn recover_leases(&self) -> Result<()> {
        // Due at once, whatever clock the engine runs on.
        let now = DateTime::<Utc>::UNIX_EPOCH;
        let runs: Vec<RunId> = self
            .inner
            .trees
            .leases
            .iter()
            .keys()
            .filter_map(|k| k.ok().and_then(|k| run_from_key(&k)))
            .collect();
        for run in runs {
            self.transact(|t| {
                t[LEASES].remove(&run.as_bytes()[..])?;
                if let Some(mut summary) = get_summary(&t[RUNS], run)? {
                    if !summary.status.is_terminal() && summary.stuck.is_none() {
                        schedule(t, &mut summary, now)?;
                        put_summary(t, &summary, None)?;
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Drops queued notifications of endpoints the options no longer name, and seeds
    /// the queue ids past every one queued.
    fn open_outboxes(&self) -> Result<()> {
        let named = &self.inner.options.outbox_endpoints;
        let mut dropped = 0usize;
        let mut next = u64::try_from(Utc::now().timestamp_micros()).unwrap_or(0);
        for item in self.inner.trees.outbox.iter().keys() {
            let key = item?;
            let endpoint = key.split(|b| *b == 0).next().unwrap_or_default();
            if !named.iter().any(|n| n.as_bytes() == endpoint) {
                self.inner.trees.outbox.remove(&key)?;
                dropped += 1;
            } else if let Some(id) = key.len().checked_sub(8).and_then(|at| key.get(at..)) {
                let id = u64::from_be_bytes(id.try_into().unwrap_or([0; 8]));
                next = next.max(id.saturating_add(1));
            }
        }
        self.inner.outbox_next.store(next, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "dropped queued notifications of webhook endpoints no longer configured"
            );
        }
        Ok(())
    }

    fn transact<T>(&self, f: impl Fn(&[TransactionalTree]) -> std::result::Result<T, Tx>) -> Result<T> {
        let all = self.inner.trees.all();
        let trees: &[&sled::Tree] = &all;
        let r: std::result::Result<T, TransactionError<Error>> = trees.transaction(|t| {
            f(t).map_err(|e| match e {
                Tx::Abort(e) => ConflictableTransactionError::Abort(e),
                Tx::Sled(e) => e.into(),
            })
        });
        match r {
            Ok(v) => Ok(v),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    fn outbox(&self) -> Outbox<'_> {
        Outbox {
            endpoints: &self.inner.options.outbox_endpoints,
            next_id: &self.inner.outbox_next,
        }
    }

    fn bump(&self) {
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn summary_now(&self, run: RunId) -> Result<Option<RunSummary>> {
        match self.inner.trees.runs.get(run.as_bytes())? {
            None => Ok(None),
            Some(v) => decode_summary(run, &v).map(Some),
        }
    }
}

/// The error type inside transaction closures.
enum Tx {
    Abort(Error),
    Sled(UnabortableTransactionError),
}

impl From<UnabortableTransactionError> for Tx {
    fn from(e: UnabortableTransactionError) -> Self {
        Tx::Sled(e)
    }
}

fn event_key(run: RunId, seq: Seq) -> [u8; 24] {
    let mut k = [0; 24];
    k[..16].copy_from_slice(run.as_bytes());
    k[16..].copy_from_slice(&seq.0.to_be_bytes());
    k
}

fn gate_key(run: RunId, gate: GateId) -> [u8; 20] {
    let mut k = [0; 20];
    k[..16].copy_from_slice(run.as_bytes());
    k[16..].copy_from_slice(&gate.0.to_be_bytes());
    k
}

fn ms(t: DateTime<Utc>) -> u64 {
    t.timestamp_millis().max(0) as u64
}

fn ready_key(at: DateTime<Utc>, run: RunId) -> [u8; 24] {
    let mut k = [0; 24];
    k[..8].copy_from_slice(&ms(at).to_be_bytes());
    k[8..].copy_from_slice(run.as_bytes());
    k
}

fn deadline_key(at: DateTime<Utc>, run: RunId, gate: GateId) -> [u8; 28] {
    let mut k = [0; 28];
    k[..8].copy_from_slice(&ms(at).to_be_bytes());
    k[8..24].copy_from_slice(run.as_bytes());
    k[24..].copy_from_slice(&gate.0.to_be_bytes());
    k
}

fn status_key(status: RunStatus, run: RunId) -> [u8; 17] {
    let mut k = [0; 17];
    k[0] = status.code();
    k[1..].copy_from_slice(run.as_bytes());
    k
}

fn run_from_key(k: &[u8]) -> Option<RunId> {
    let b: [u8; 16] = k.get(..16)?.try_into().ok()?;
    Some(RunId::from_bytes(b))
}

fn decode_summary(run: RunId, bytes: &[u8]) -> Result<RunSummary> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt {
        run,
        seq: Seq::ZERO,
        reason: format!("run summary does not decode: {e}"),
    })
}

fn get_summary(t: &TransactionalTree, run: RunId) -> std::result::Result<Option<RunSummary>, Tx> {
    match t.get(run.as_bytes())? {
        None => Ok(None),
        Some(v) => decode_summary(run, &v).map(Some).map_err(Tx::Abort),
    }
}

fn json<T: serde::Serialize>(v: &T) -> std::result::Result<Vec<u8>, Tx> {
    serde_json::to_vec(v).map_err(|e| Tx::Abort(e.into()))
}

/// Writes the summary and keeps `by_status` in step with it.
fn put_summary(
    t: &[TransactionalTree],
    summary: &RunSummary,
    old_status: Option<RunStatus>,
) -> std::result::Result<(), Tx> {
    match old_status {
        Some(old) if old == summary.status => {}
        Some(old) => {
            t[BY_STATUS].remove(&status_key(old, summary.id)[..])?;
            t[BY_STATUS].insert(&status_key(summary.status, summary.id)[..], &[][..])?;
        }
        None => {
            // Status unknown to the caller: clear every other status key.
            for st in RunStatus::ALL {
                if st != summary.status {
                    t[BY_STATUS].remove(&status_key(st, summary.id)[..])?;
                }
            }
            t[BY_STATUS].insert(&status_key(summary.status, summary.id)[..], &[][..])?;
        }
    }
    t[RUNS].insert(&summary.id.as_bytes()[..], json(summary)?)?;
    Ok(())
}

/// Makes the run ready at `at` (or earlier, if it already was): into the ready queue,
/// or, while a worker holds it, onto the lease to be queued at release.
fn schedule(
    t: &[TransactionalTree],
    summary: &mut RunSummary,
    at: DateTime<Utc>,
) -> std::result::Result<(), Tx> {
    let run = summary.id;
    if let Some(bytes) = t[LEASES].get(run.as_bytes())? {
        let mut lease: Lease = serde_json::from_slice(&bytes)
            .map_err(|e| Tx::Abort(Error::Storage(format!("lease of run {run} does not decode: {e}"))))?;
        lease.rewake_at = Some(lease.rewake_at.map_or(at, |r| r.min(at)));
        t[LEASES].insert(&run.as_bytes()[..], json(&lease)?)?;
        return Ok(());
    }
    if let Some(old) = summary.wake_at {
        if old <= at {
            return Ok(());
        }
        t[READY].remove(&ready_key(old, run)[..])?;
    }
    t[READY].insert(&ready_key(at, run)[..], &[][..])?;
    summary.wake_at = Some(at);
    Ok(())
}

fn unschedule(t: &[TransactionalTree], summary: &mut RunSummary) -> std::result::Result<(), Tx> {
    if let Some(old) = summary.wake_at.take() {
        t[READY].remove(&ready_key(old, summary.id)[..])?;
    }
    Ok(())
}

fn outbox_key(endpoint: &str, id: u64) -> Vec<u8> {
    let mut k = endpoint.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Where [`IndexChange::Notify`] goes.
struct Outbox<'a> {
    endpoints: &'a [String],
    /// Next queue id. In memory (sled is one process per directory), seeded on open past
    /// every queued id and the clock; sled's own `generate_id` must not be called inside
    /// a transaction (it can wait on the transaction's own locks).
    next_id: &'a AtomicU64,
}

fn apply_changes(
    t: &[TransactionalTree],
    summary: &mut RunSummary,
    changes: Vec<IndexChange>,
    outbox: &Outbox<'_>,
) -> std::result::Result<(), Tx> {
    for change in changes {
        match change {
            IndexChange::Notify(mut n) => {
                if outbox.endpoints.is_empty() {
                    continue;
                }
                if n.action.is_none() {
                    // Decided or escalated: the gate's entry is still open here.
                    if let Some(bytes) = t[PENDING].get(&gate_key(summary.id, n.gate)[..])? {
                        n.action = serde_json::from_slice::<PendingGate>(&bytes)
                            .ok()
                            .map(|g| g.action);
                    }
                }
                let value = json(&n)?;
                for endpoint in outbox.endpoints {
                    // Ids only grow, so each queue keeps a run's notifications in the
                    // order its events were written.
                    let id = outbox.next_id.fetch_add(1, Ordering::Relaxed);
                    t[OUTBOX].insert(outbox_key(endpoint, id), value.clone())?;
                }
            }
            IndexChange::GateOpened(gate) => {
                t[PENDING].insert(&gate_key(gate.run, gate.gate)[..], json(&*gate)?)?;
            }
            IndexChange::GateClosed(gate) => {
                t[PENDING].remove(&gate_key(summary.id, gate)[..])?;
            }
            IndexChange::Wake(at) => schedule(t, summary, at)?,
            IndexChange::Ended => unschedule(t, summary)?,
            IndexChange::DeadlineSet { gate, at, old } => {
                if let Some(old) = old {
                    t[DEADLINES].remove(&deadline_key(old, summary.id, gate)[..])?;
                }
                t[DEADLINES].insert(&deadline_key(at, summary.id, gate)[..], &[][..])?;
            }
            IndexChange::Decided { gate, kind, by, at } => {
                // The gate's entry is still there (it is closed after this change).
                if let Some(bytes) = t[PENDING].get(&gate_key(summary.id, gate)[..])? {
                    if let Some(rule) = serde_json::from_slice::<PendingGate>(&bytes)
                        .ok()
                        .and_then(|g| g.rule)
                    {
                        let mut key = rule.into_bytes();
                        key.push(0);
                        key.extend_from_slice(&ms(at).to_be_bytes());
                        key.extend_from_slice(&gate_key(summary.id, gate));
                        let entry = RuleDecision {
                            auto: false,
                            kind,
                            by,
                            at,
                            run: summary.id,
                            gate,
                        };
                        t[RULE_DECISIONS].insert(key, json(&entry)?)?;
                    }
                }
            }
            IndexChange::TrustedAllow { rule, position, at } => {
                let gate = GateId(position.0);
                let mut key = rule.into_bytes();
                key.push(0);
                key.extend_from_slice(&ms(at).to_be_bytes());
                key.extend_from_slice(&gate_key(summary.id, gate));
                let entry = RuleDecision {
                    auto: true,
                    kind: crate::event::DecisionKind::Approve,
                    by: crate::ids::Principal::system(),
                    at,
                    run: summary.id,
                    gate,
                };
                t[RULE_DECISIONS].insert(key, json(&entry)?)?;
            }
            IndexChange::DeadlineCleared { gate, at } => {
                t[DEADLINES].remove(&deadline_key(at, summary.id, gate)[..])?;
            }
            IndexChange::GateChanged(gate, change) => {
                let key = gate_key(summary.id, gate);
                if let Some(bytes) = t[PENDING].get(&key[..])? {
                    let mut entry: PendingGate = serde_json::from_slice(&bytes).map_err(|e| {
                        Tx::Abort(Error::Storage(format!(
                            "pending entry of run {} does not decode: {e}",
                            summary.id
                        )))
                    })?;
                    entry.change(&change);
                    t[PENDING].insert(&key[..], json(&entry)?)?;
                }
            }
        }
    }
    Ok(())
}

impl Store for SledStore {
    async fn create_run(&self, run: NewRun) -> Result<Created> {
        let event = Event {
            run: run.id,
            seq: Seq::ZERO,
            at: run.at,
            v: 1,
            event: EventKind::RunStarted {
                workflow: run.workflow.clone(),
                version: run.version,
                input: run.input.clone(),
                idempotency_key: run.idempotency_key.clone(),
                started_by: run.started_by.clone(),
            },
        };
        let event = Event {
            v: event.event.format(),
            ..event
        };
        let (record, head) = codec::encode(&event, &ChainHash::GENESIS, self.inner.options.max_event_bytes)?;
        let hash = run.request_hash()?;
        let created = self.transact(|t| {
            if let Some(key) = &run.idempotency_key {
                if let Some(existing) = t[STARTS].get(key.as_bytes())? {
                    let existing_run = run_from_key(&existing)
                        .ok_or_else(|| Tx::Abort(Error::Storage("malformed starts entry".into())))?;
                    if existing.get(16..) != Some(&hash[..]) {
                        return Err(Tx::Abort(Error::StartConflict {
                            key: key.clone(),
                            existing: existing_run,
                        }));
                    }
                    return Ok(Created::Existing(existing_run));
                }
                let mut v = run.id.as_bytes().to_vec();
                v.extend_from_slice(&hash);
                t[STARTS].insert(key.as_bytes(), v)?;
            }
            if t[RUNS].get(run.id.as_bytes())?.is_some() {
                return Err(Tx::Abort(Error::Storage(format!(
                    "run {} already exists",
                    run.id
                ))));
            }
            let mut summary = RunSummary::start(&run);
            summary.bytes = record.len() as u64;
            let changes = summary.apply(&event, head);
            t[EVENTS].insert(&event_key(run.id, Seq::ZERO)[..], record.clone())?;
            apply_changes(t, &mut summary, changes, &self.outbox())?;
            put_summary(t, &summary, None)?;
            Ok(Created::New(run.id))
        })?;
        // Even an existing run is synced before answering: its start may have been
        // acknowledged to nobody yet (a crash right after the first attempt's write).
        self.inner.flusher.wait().await?;
        self.bump();
        Ok(created)
    }

    async fn append(&self, append: Append) -> Result<std::result::Result<Appended, AppendConflict>> {
        let run = append.run;
        let expected = append.expected;
        let lease = append.lease;
        // Encoded here, outside the transaction: sled may run the closure more than once.
        let prepared =
            codec::prepare_append(self.summary_now(run)?, append, self.inner.options.max_event_bytes)?;
        let (current, codec::Encoded { records, events }) = match prepared {
            Ok(p) => p,
            Err(conflict) => return Ok(Err(conflict)),
        };
        let outcome = self.transact(|t| {
            let Some(mut summary) = get_summary(&t[RUNS], run)? else {
                return Err(Tx::Abort(Error::UnknownRun(run)));
            };
            if summary.next_seq != expected || summary.head != current.head {
                return Ok(Err(AppendConflict {
                    run,
                    expected,
                    found: summary.next_seq,
                }));
            }
            if summary.status.is_terminal() {
                return Err(Tx::Abort(Error::RunEnded(run)));
            }
            if let Some(token) = lease {
                let held = match t[LEASES].get(run.as_bytes())? {
                    Some(b) => serde_json::from_slice::<Lease>(&b)
                        .map(|l| l.token == token)
                        .unwrap_or(false),
                    None => false,
                };
                if !held {
                    return Err(Tx::Abort(Error::LeaseLost(run)));
                }
            }
            let added_bytes: u64 = records.iter().map(|r| r.len() as u64).sum();
            let events_after = summary.next_seq.0 + events.len() as u64;
            let bytes_after = summary.bytes + added_bytes;
            let limits = &self.inner.options;
            let closing = events.iter().all(|(e, _)| closes(&e.event));
            check_run_limits(
                run,
                events_after,
                bytes_after,
                limits.max_run_events,
                limits.max_run_bytes,
                closing,
            )
            .map_err(Tx::Abort)?;
            summary.bytes = bytes_after;
            let old_status = summary.status;
            for ((event, hash), record) in events.iter().zip(&records) {
                t[EVENTS].insert(&event_key(run, event.seq)[..], record.clone())?;
                let changes = summary.apply(event, *hash);
                apply_changes(t, &mut summary, changes, &self.outbox())?;
            }
            put_summary(t, &summary, Some(old_status))?;
            Ok(Ok(Appended {
                next: summary.next_seq,
                head: summary.head,
            }))
        })?;
        if outcome.is_ok() {
            crate::failpoint::hit("append-before-flush");
            self.inner.flusher.wait().await?;
            self.bump();
        }
        Ok(outcome)
    }

    async fn read(&self, run: RunId, from: Seq) -> Result<Vec<Event>> {
        let Some(summary) = self.summary_now(run)? else {
            return Err(Error::UnknownRun(run));
        };
        self.read_to(run, from, &summary)
    }

    async fn summary(&self, run: RunId) -> Result<Option<RunSummary>> {
        self.summary_now(run)
    }

    async fn list_runs(
        &self,
        status: Option<RunStatus>,
        after: Option<RunId>,
        limit: usize,
    ) -> Result<Vec<RunSummary>> {
        let mut out = Vec::new();
        match status {
            Some(st) => {
                let start = match after {
                    Some(a) => {
                        let mut k = status_key(st, a).to_vec();
                        k.push(0);
                        k
                    }
                    None => vec![st.code()],
                };
                for item in self.inner.trees.by_status.range(start..) {
                    let (k, _) = item?;
                    if k.first() != Some(&st.code()) || out.len() >= limit {
                        break;
                    }
                    if let Some(run) = run_from_key(&k[1..]) {
                        if let Some(s) = self.summary_now(run)? {
                            out.push(s);
                        }
                    }
                }
            }
            None => {
                let iter = match after {
                    Some(a) => {
                        let mut k = a.as_bytes().to_vec();
                        k.push(0);
                        self.inner.trees.runs.range(k..)
                    }
                    None => self.inner.trees.runs.iter(),
                };
                for item in iter.take(limit) {
                    let (k, v) = item?;
                    let run = run_from_key(&k)
                        .ok_or_else(|| Error::Storage("malformed key in runs tree".into()))?;
                    out.push(decode_summary(run, &v)?);
                }
            }
        }
        Ok(out)
    }

    async fn pending(&self, after: Option<(RunId, GateId)>, limit: usize) -> Result<Vec<PendingGate>> {
        let iter = match after {
            Some((run, gate)) => {
                let mut k = gate_key(run, gate).to_vec();
                k.push(0);
                self.inner.trees.pending.range(k..)
            }
            None => self.inner.trees.pending.iter(),
        };
        let mut out = Vec::new();
        for item in iter.take(limit) {
            let (k, v) = item?;
            let run = run_from_key(&k).unwrap_or_default();
            out.push(serde_json::from_slice(&v).map_err(|e| Error::Corrupt {
                run,
                seq: Seq::ZERO,
                reason: format!("pending gate entry does not decode: {e}"),
            })?);
        }
        Ok(out)
    }

    async fn claim(
        &self,
        owner: WorkerId,
        now: DateTime<Utc>,
        ttl: Duration,
        max: usize,
    ) -> Result<Vec<Lease>> {
        let expires_at = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(60));
        let mut out = Vec::new();
        // Runs whose lease expired without a release (a stalled worker): take them over.
        let mut expired = Vec::new();
        for item in self.inner.trees.leases.iter() {
            let (_, v) = item?;
            if let Ok(lease) = serde_json::from_slice::<Lease>(&v) {
                if lease.expires_at <= now {
                    expired.push(lease);
                }
            }
        }
        for old in expired.into_iter().take(max) {
            let token = LeaseToken(self.inner.db.generate_id()?);
            let lease = Lease {
                run: old.run,
                owner,
                token,
                expires_at,
                rewake_at: None,
            };
            let taken = self.transact(|t| {
                let current = t[LEASES].get(old.run.as_bytes())?;
                let still = current
                    .and_then(|b| serde_json::from_slice::<Lease>(&b).ok())
                    .is_some_and(|l| l.token == old.token);
                if !still {
                    return Ok(false);
                }
                t[LEASES].insert(&old.run.as_bytes()[..], json(&lease)?)?;
                Ok(true)
            })?;
            if taken {
                out.push(lease);
            }
        }
        let limit_key = ready_key(now, RunId::from_bytes([0xff; 16]));
        let candidates: Vec<sled::IVec> = self
            .inner
            .trees
            .ready
            .range(..=limit_key)
            .keys()
            .take(max.saturating_sub(out.len()))
            .collect::<std::result::Result<_, _>>()?;
        for key in candidates {
            let Some(run) = key.get(8..).and_then(run_from_key) else {
                continue;
            };
            let token = LeaseToken(self.inner.db.generate_id()?);
            let lease = Lease {
                run,
                owner,
                token,
                expires_at,
                rewake_at: None,
            };
            let taken = self.transact(|t| {
                if t[READY].get(&key)?.is_none() {
                    return Ok(false);
                }
                t[READY].remove(&key)?;
                let Some(mut summary) = get_summary(&t[RUNS], run)? else {
                    return Ok(false);
                };
                summary.wake_at = None;
                if t[LEASES].get(run.as_bytes())?.is_some() {
                    // Leased already (should not happen: wake-ups of leased runs go on
                    // the lease). Keep the wake-up for when it is released.
                    schedule(t, &mut summary, now)?;
                    put_summary(t, &summary, Some(summary.status))?;
                    return Ok(false);
                }
                put_summary(t, &summary, Some(summary.status))?;
                if summary.status.is_terminal() || summary.stuck.is_some() {
                    return Ok(false);
                }
                t[LEASES].insert(&run.as_bytes()[..], json(&lease)?)?;
                Ok(true)
            })?;
            if taken {
                out.push(lease);
            }
        }
        Ok(out)
    }

    async fn release(&self, lease: &Lease, wake: Option<DateTime<Utc>>) -> Result<()> {
        let run = lease.run;
        self.transact(|t| {
            let Some(bytes) = t[LEASES].get(run.as_bytes())? else {
                return Ok(());
            };
            let current: Lease = serde_json::from_slice(&bytes)
                .map_err(|e| Tx::Abort(Error::Storage(format!("lease of run {run} does not decode: {e}"))))?;
            if current.token != lease.token {
                return Ok(());
            }
            t[LEASES].remove(&run.as_bytes()[..])?;
            let at = match (wake, current.rewake_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let (Some(at), Some(mut summary)) = (at, get_summary(&t[RUNS], run)?) {
                if !summary.status.is_terminal() && summary.stuck.is_none() {
                    schedule(t, &mut summary, at)?;
                    put_summary(t, &summary, Some(summary.status))?;
                }
            }
            Ok(())
        })?;
        self.bump();
        Ok(())
    }

    async fn renew(&self, lease: &Lease, now: DateTime<Utc>, ttl: Duration) -> Result<Option<Lease>> {
        let run = lease.run;
        let expires_at = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(60));
        self.transact(|t| {
            let Some(bytes) = t[LEASES].get(run.as_bytes())? else {
                return Ok(None);
            };
            let Ok(mut current) = serde_json::from_slice::<Lease>(&bytes) else {
                return Ok(None);
            };
            if current.token != lease.token {
                return Ok(None);
            }
            current.expires_at = expires_at;
            t[LEASES].insert(&run.as_bytes()[..], json(&current)?)?;
            Ok(Some(current))
        })
    }

    async fn mark_stuck(&self, lease: &Lease, reason: String) -> Result<()> {
        let run = lease.run;
        self.transact(|t| {
            let held = t[LEASES]
                .get(run.as_bytes())?
                .and_then(|b| serde_json::from_slice::<Lease>(&b).ok())
                .is_some_and(|l| l.token == lease.token);
            if !held {
                return Err(Tx::Abort(Error::LeaseLost(run)));
            }
            t[LEASES].remove(&run.as_bytes()[..])?;
            let Some(mut summary) = get_summary(&t[RUNS], run)? else {
                return Err(Tx::Abort(Error::UnknownRun(run)));
            };
            let old = summary.status;
            unschedule(t, &mut summary)?;
            summary.stuck = Some(reason.clone());
            if !summary.status.is_terminal() {
                summary.status = RunStatus::Stuck;
            }
            put_summary(t, &summary, Some(old))?;
            Ok(())
        })?;
        self.bump();
        Ok(())
    }

    async fn is_leased(&self, run: RunId) -> Result<bool> {
        Ok(self.inner.trees.leases.contains_key(run.as_bytes())?)
    }

    async fn next_wake(&self) -> Result<Option<DateTime<Utc>>> {
        let ready = match self.inner.trees.ready.first()? {
            Some((k, _)) => {
                let ms = u64::from_be_bytes(
                    k.get(..8)
                        .and_then(|b| b.try_into().ok())
                        .ok_or_else(|| Error::Storage("malformed ready key".into()))?,
                );
                Utc.timestamp_millis_opt(ms as i64).single()
            }
            None => None,
        };
        // A lease running out is a wake-up too: its run is taken over then. (Leases are
        // the activations in flight: a short scan.)
        let mut expiring: Option<DateTime<Utc>> = None;
        for item in self.inner.trees.leases.iter().values() {
            if let Ok(lease) = serde_json::from_slice::<Lease>(&item?) {
                expiring = Some(expiring.map_or(lease.expires_at, |e| e.min(lease.expires_at)));
            }
        }
        Ok(match (ready, expiring) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    async fn due_deadlines(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<DueDeadline>> {
        let end = deadline_key(now, RunId::from_bytes([0xff; 16]), GateId(u32::MAX));
        let mut out = Vec::new();
        for key in self.inner.trees.deadlines.range(..=end).keys().take(limit) {
            let key = key?;
            if key.len() != 28 {
                return Err(Error::Storage("malformed deadline key".into()));
            }
            let ms = u64::from_be_bytes(key[..8].try_into().unwrap_or_default());
            let (Some(run), Some(at)) = (
                run_from_key(&key[8..24]),
                Utc.timestamp_millis_opt(ms as i64).single(),
            ) else {
                return Err(Error::Storage("malformed deadline key".into()));
            };
            let gate = GateId(u32::from_be_bytes(key[24..28].try_into().unwrap_or_default()));
            out.push(DueDeadline { run, gate, at });
        }
        Ok(out)
    }

    async fn rule_history(&self, rule: &str, limit: usize) -> Result<Vec<RuleDecision>> {
        let mut prefix = rule.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self
            .inner
            .trees
            .rule_decisions
            .scan_prefix(&prefix)
            .rev()
            .take(limit)
        {
            let (_, v) = item?;
            out.push(
                serde_json::from_slice(&v)
                    .map_err(|e| Error::Storage(format!("rule history entry does not decode: {e}")))?,
            );
        }
        Ok(out)
    }

    async fn next_deadline(&self) -> Result<Option<DateTime<Utc>>> {
        let Some((k, _)) = self.inner.trees.deadlines.first()? else {
            return Ok(None);
        };
        let ms = u64::from_be_bytes(
            k[..8]
                .try_into()
                .map_err(|_| Error::Storage("malformed deadline key".into()))?,
        );
        Ok(Utc.timestamp_millis_opt(ms as i64).single())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    async fn runs_with_status(&self, status: RunStatus) -> Result<usize> {
        self.count_runs(status)
    }

    async fn open_gates(&self) -> Result<usize> {
        self.count_pending()
    }

    async fn outbox(&self, endpoint: &str, limit: usize) -> Result<Vec<Outgoing>> {
        let mut prefix = endpoint.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.inner.trees.outbox.scan_prefix(&prefix).take(limit) {
            let (k, v) = item?;
            let key = k
                .get(prefix.len()..)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| Error::Storage("malformed key in the outbox".into()))?;
            let notification = serde_json::from_slice(&v)
                .map_err(|e| Error::Storage(format!("outbox entry {key} does not decode: {e}")))?;
            out.push(Outgoing { key, notification });
        }
        Ok(out)
    }

    async fn outbox_done(&self, endpoint: &str, key: u64) -> Result<()> {
        self.inner.trees.outbox.remove(outbox_key(endpoint, key))?;
        Ok(())
    }

    fn max_event_bytes(&self) -> usize {
        self.inner.options.max_event_bytes
    }
}

/// Group commit: appenders that finished their transaction wait here; one thread
/// flushes for all of them. A waiter is only woken by a flush that *started* after it
/// registered, so the flush covers its writes.
struct GroupCommit {
    shared: Arc<FlushShared>,
    thread: Option<JoinHandle<()>>,
}

struct FlushShared {
    queue: Mutex<FlushQueue>,
    wake: Condvar,
    syncs: AtomicU64,
}

#[derive(Default)]
struct FlushQueue {
    waiters: Vec<oneshot::Sender<std::result::Result<(), String>>>,
    shutdown: bool,
}

impl GroupCommit {
    fn start(db: sled::Db, data_file: File) -> GroupCommit {
        let shared = Arc::new(FlushShared {
            queue: Mutex::new(FlushQueue::default()),
            wake: Condvar::new(),
            syncs: AtomicU64::new(0),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("holdpoint-group-commit".into())
            .spawn(move || loop {
                let batch = {
                    let mut q = s.queue.lock().unwrap_or_else(|p| p.into_inner());
                    while q.waiters.is_empty() && !q.shutdown {
                        q = s.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                    }
                    if q.waiters.is_empty() && q.shutdown {
                        return;
                    }
                    std::mem::take(&mut q.waiters)
                };
                let result = db.flush().map_err(|e| format!("flush failed: {e}")).and_then(|_| {
                    crate::failpoint::hit("group-commit-before-fsync");
                    data_file.sync_data().map_err(|e| format!("fsync failed: {e}"))
                });
                s.syncs.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = &result {
                    tracing::error!(error = %e, "group commit failed; appends in this batch are not acknowledged");
                }
                for w in batch {
                    let _ = w.send(result.clone());
                }
            })
            .ok();
        GroupCommit { shared, thread }
    }

    async fn wait(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.shutdown || self.thread.is_none() {
                return Err(Error::Storage("store is closed".into()));
            }
            q.waiters.push(tx);
        }
        self.shared.wake.notify_one();
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Storage(e)),
            Err(_) => Err(Error::Storage("group commit thread stopped".into())),
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
