//! `SledStore`: the embedded default store, on sled 0.34.7.
//!
//! Trees (all keys big-endian so sled's byte order is the logical order):
//!
//! | tree        | key                          | value                     |
//! |-------------|------------------------------|---------------------------|
//! | `events`    | run (16) ++ seq (8)          | record (see `codec`)      |
//! | `runs`      | run (16)                     | summary (`stored_summary`) |
//! | `by_status` | status (1) ++ run (16)       | empty                     |
//! | `pending`   | run (16) ++ gate (4)         | `PendingGate` JSON        |
//! | `ready`     | wake ms (8) ++ run (16)      | empty                     |
//! | `leases`    | run (16)                     | `Lease` JSON              |
//! | `starts`    | idempotency key              | run (16) ++ request hash  |
//! | `deadlines` | due ms (8) ++ run (16) ++ gate (4) | empty               |
//! | `rule_decisions` | rule ++ 0 ++ ms (8) ++ run (16) ++ gate (4) | `RuleDecision` JSON |
//! | `outbox`    | endpoint ++ 0 ++ id (8)      | `Notification` JSON       |
//! | `intents`   | run (16)                     | commit intent (see below) |
//! | `dirty`     | run (16)                     | empty                     |
//!
//! **Write path.** sled's multi-tree transactions (and batches) switch the whole
//! process to a global reader-writer lock that `Db::flush` holds for its entire I/O
//! wait, so every commit stalled behind every group commit; the store uses neither.
//! Writes are plain inserts and removes, serialized per run by its commit lock, in a
//! fixed order that recovery can finish or undo: an append encodes its records outside
//! the lock, then under it checks the expected seq and the lease, and writes
//! 1. a *dirty mark* for the run, unless it has one already,
//! 2. the events but the last,
//! 3. the webhook notifications the events raise, in each endpoint's outbox,
//! 4. the last event, as a record that ends its commit (record format 3,
//!    [`codec::ends_commit`]): the commit point,
//! 5. the other index changes [`RunSummary::apply`] derived (pending gates, ready
//!    queue, deadlines, idempotency keys, rule history).
//!
//! The mark stays across the run's commits and is removed when the run's activation
//! ends (`release`), when the run ends, and on `close`: a run makes about six commits
//! and leaves about four marks behind, where a per-commit intent cost two writes each.
//!
//! The run's **summary and status key** are written when its mark goes, not by every
//! commit: the mark's entry in memory ([`Marked`]) keeps the latest summary (with the
//! seq its commit began at) and the status key stored, readers take the summary from
//! there first, `count_runs` and `list_runs` read the status index through those
//! entries, and whatever removes the mark writes both first (`clear_dirty`, `close`;
//! after a crash the open derives them from the journal). A creation writes its
//! summary at once (it is a creation's commit point, and so every run is in `runs`),
//! and past [`SledOptions::kept_summaries`] marks commits write theirs through. A standard run
//! writes three summaries and three status keys where it wrote six and seven.
//!
//! Readers never see an index entry before the summary that covers it (a gate shows in
//! `pending` only once `read` returns its event), and `summary` takes the run's commit
//! lock, so it never returns a summary whose index changes are still being written.
//! Then the caller joins the next group commit: one flusher thread runs `Db::flush`
//! (which writes sled's buffers with `sync_file_range`) and then `fdatasync` on sled's
//! data file through our own handle, and wakes every append that was waiting when the
//! flush began (under load, after a group of several, the flusher first lets the
//! next group gather for [`SledOptions::group_window`]). So an acknowledged append survives a process crash, a kernel crash and a power loss (given a disk that
//! honours flushes), and concurrent appends share one sync.
//!
//! **Recovery.** sled recovers a prefix of its log, and a run's commits are written one
//! after another, so after a crash only a marked run's last commit can be unfinished,
//! and it is cut somewhere after the mark. On open, every marked run is checked from
//! its stored summary on (the summary of its last release, end or creation):
//! - with no summary at all, the creation was cut: its events are removed;
//! - the records past the summary are read in order, each checked (checksum, place,
//!   link to the one before): the commits are whole up to the last record that ends
//!   one, and records after it are a commit cut before its last record, never
//!   acknowledged: they are removed. A record that fails its checks is damage, not a
//!   cut (sled recovers only whole log messages): nothing is removed and the run is
//!   parked for an operator;
//! - the last whole commit may be cut in its index changes: the summary before it is
//!   the fold of the journal up to the commit's first seq (what `check_indexes`
//!   derives for every run), and from it and the commit's events the summary and every
//!   index change but the notifications are derived again and written (each write is
//!   idempotent). The commits before it finished their index changes before it began.
//!   The notifications were queued before the commit's last record, so they are not
//!   queued again: a mark that outlives its run's last commit (a release not yet
//!   flushed when the process died) costs no duplicate delivery;
//! - its status key is written again from the summary.
//!
//! The notifications of every run checked past the end of its whole commits are
//! removed from the outbox (one pass over it, when endpoints are named): a commit of
//! one event queues them before its only record, so a cut there leaves no record to
//! find. Readers of the outbox never see them anyway: a commit's queue ids are hidden
//! until its group commit's fsync, and every later id waits for them (`OutboxIds`), so
//! a webhook only reports durable events.
//!
//! Either way a commit recovery undoes was never acknowledged. Directories written
//! before commits ended in a marked record recover as they did: none of their records
//! ends a commit, so records past the stored summary (then written by every commit) are
//! a cut commit. `mark_stuck`, which writes no events, still writes a per-commit
//! *intent* (the seq before and after, the reason), and intents left by earlier
//! versions are still finished the same way.
//!
//! **With the write-ahead log** ([`SledOptions::wal`], off by default; a directory
//! that has a log keeps it): a commit's records, outbox entries and idempotency key are
//! appended to the log ([`crate::wal`]) under the run's commit lock and kept with the
//! run's entry in memory (`Marked::pending`); once the log has synced it, whichever
//! of the run's committers gets the lock first writes every synced commit of the run
//! to sled in log order (notifications, key, then the summary kept and the index
//! changes, as above), and only then is it acknowledged and readable. Its records are
//! not written then but *held* with the entry (`Marked::held`), where readers take them
//! (`read_to` and `records_between` read sled up to the first held seq, then the held
//! records), and stored as one value, the records of every commit since the entry's
//! summary was last written together, when it is written (the run's end, a checkpoint,
//! `close`, `mark_stuck`, past `kept_summaries`) or once they pass [`HOLD_BYTES`]. A
//! release leaves the entry as it is while entries number at most half of
//! `kept_summaries` (`SledStore::keeps_released`; past that it writes them as without
//! the log), and a checkpoint drops the entries of released runs it wrote
//! (`clear_dirty`, as a release does). The pending entries of the gates its commits
//! open are kept with the entry too (`Marked::gates`) and written with its summary:
//! `pending` and `count_pending` read them before sled (an entry written meanwhile is
//! then found in both, and listed once), and a decision or a vote finds its gate's
//! entry there first. So a standard run decided before either stores its journal in
//! one value and its status key once, and its release writes nothing at all, nor its
//! decision a removal from `pending`. No dirty mark is written: the log's records past the last
//! checkpoint name every run the open must finish. A commit that conflicts with one logged but not yet written waits
//! for it first, so the caller's re-read finds it. A **checkpoint** (once the log has
//! grown [`SledOptions::checkpoint_bytes`], and at open and close) takes the first LSN
//! not yet written to sled (the log's end if none), writes every entry's summary and
//! status key and the wake-ups only memory holds, stores the LSN in `meta` and flushes
//! sled (sled recovers a prefix of its log, so a stored checkpoint comes with all
//! written before it), then removes the segments before it. The records it stores
//! may include a commit logged past its LSN (one synced while the checkpoint ran). The
//! **open** replays the log from the checkpoint: the records (a stored value that began
//! before a run's first logged commit is first cut back to the records before it, so
//! none is stored twice) and outbox entries (with their queue ids:
//! a delivered notification may go out again, at least once as before) are written
//! again, and each run's summary and index changes are derived again from its journal
//! from its first logged commit on, its status key written and the run made ready;
//! every step is idempotent, so a crash during the open only repeats it. The mode
//! exists for the store issue 6 needs (ARCHITECTURE.md, "The write-ahead log, and the
//! store it is for").
//!
//! **Leases** live in memory (sled allows one process per directory, so a lease dies
//! with its process anyway). A claimed run keeps its wake-up until its release, so a
//! run whose activation a crash interrupted is driven again after the restart.
//!
//! **Wake-ups** are mirrored in memory for claims, and only some are in the `ready`
//! tree. Those a commit sets (a run started, a gate decided) stay in memory: the commit
//! marked the run dirty before its first write, and the open makes every run still
//! marked ready, due at once (an activation with nothing to do suspends again). So a
//! standard run writes no `ready` entry at all, where it wrote and removed two. The
//! wake-up goes to the tree before anything removes the mark: a release stores the one
//! it leaves (a timer, a retry), a close stores every one left, and the open stores one
//! for each marked run it checks. Recovery's own wake-ups are stored too.

use crate::codec::{self, ChainHash};
use crate::error::{Error, Result};
use crate::event::{Event, EventKind};
use crate::ids::{GateId, LeaseToken, RunId, Seq, WorkerId};
use crate::store::{
    check_append_limits, Append, AppendConflict, Appended, Created, DueDeadline, GateChange, IndexChange,
    Lease, NewRun, Notification, Outgoing, PendingGate, RuleDecision, RunStatus, RunSummary, Store,
};
use crate::stored_summary::decode as decode_summary;
use crate::wal::{Lsn, Wal, WalOptions};
use chrono::{DateTime, TimeZone, Utc};
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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
    /// Period of sled's background thread (default 20 ms; sled's own default is 500).
    /// Each round it writes what sled has buffered (acknowledgements never wait for
    /// it: they have their own group commit), reclaims space by moving the live pages
    /// out of mostly-garbage log segments for up to half the period, and syncs sled's
    /// file. Space is reclaimed only there, so a shorter period keeps the directory
    /// smaller under load: 2,456 against 3,650 bytes per run over a 100,000-run churn
    /// (README, Performance). When idle a round finds nothing to do.
    pub flush_every_ms: u64,
    /// Most events one run may have (default 100,000).
    pub max_run_events: u64,
    /// Most bytes one run's records may take (default 64 MiB).
    pub max_run_bytes: u64,
    /// Webhook endpoints (by name) whose notifications are queued in the outbox, in the
    /// same transaction as the events they come from. Queues of endpoints no longer
    /// named are dropped on open. Default: none.
    pub outbox_endpoints: Vec<String>,
    /// zstd level for sled's log in a directory this open creates (default `Some(-3)`,
    /// one of zstd's fast levels; `None`: not compressed). sled compresses every message
    /// it writes, whole pages above all, which are most of what it writes: a standard
    /// run leaves about 1,200 bytes on disk against 2,700–2,800 uncompressed, for about
    /// 30% more CPU per run (README, Performance). sled records the choice in the
    /// directory, and an existing directory is opened the way it was created, whatever
    /// this says (`Some` only sets the level of what is written).
    pub compression: Option<i32>,
    /// How many marked runs (activations under way, runs started or decided and not
    /// yet claimed) may keep their latest summaries in memory, to be written when their
    /// marks go (default 16,384, a few hundred bytes each); past it, commits write their
    /// summaries as they go. 0: every commit writes its summary. With the log
    /// ([`SledOptions::wal`]), released runs' entries count too: while the entries
    /// number at most half of this, a release keeps the run's summary, status key and
    /// records in memory (about 1.6 KB for the standard workflow's run) until the run
    /// ends or a checkpoint writes them.
    pub kept_summaries: usize,
    /// Store a commit of several events as one value ([`codec::RECORD_FORMAT_PACKED`],
    /// default `true`): one sled write per commit instead of one per event, and a
    /// commit is then whole or absent after a crash by construction. `false` writes
    /// each record under its own key, the layout of builds before 2026-12-07, which
    /// every build still reads and recovers (tests of that recovery use it).
    pub pack_commits: bool,
    /// Make commits durable in the store's own write-ahead log (`<dir>/wal`,
    /// [`crate::wal`]) instead of by flushing sled: a commit is logged under its run's
    /// lock, and written to sled once the log has synced it; sled is flushed only at
    /// checkpoints, and no dirty marks are written (the log's records past the last
    /// checkpoint name every run recovery must finish). Default `false` while the
    /// mode is new. A directory that has a log is opened with it whatever this says.
    pub wal: bool,
    /// With `wal`: a checkpoint (sled flushed, the log's segments before it removed)
    /// follows once the log has grown this much since the last (default 64 MiB).
    pub checkpoint_bytes: u64,
    /// Under load, how long a group commit (sled's flush, or with `wal` the log's write)
    /// lets the next group gather before it starts (default 100 µs; zero: never): only
    /// after a group of [`crate::wal::GROUP_WINDOW_FROM`] commits or more, so a lone
    /// commit never waits for it. Fewer syncs per commit under load.
    pub group_window: Duration,
    /// Whether appends share fsyncs through the group-commit thread (the default). Off,
    /// each append flushes sled and syncs its file itself, in the caller, before it
    /// returns: slower under concurrency, but an acknowledgement's timing then depends
    /// on the caller alone, which a deterministic simulation needs (`TestEnv::seeded`).
    pub group_commit: bool,
}

/// With the log, a sled leaf of 4 keys or more also splits once its keys and values pass
/// this many bytes (`sled::Config::leaf_split_bytes`, vendor/sled/HOLDPOINT.md 19). sled
/// rewrites a leaf whole every 15 changes and at a split, so an insert costs in
/// proportion to its leaf's bytes: with the log a run's journal is one value of about
/// 1.4 KB, and 64 of them made leaves of up to 90 KB. Without the log values are small
/// and leaves split by their count of keys only, as more leaves would cost a restarted
/// server memory (ARCHITECTURE.md, "Twelfth session: a released run stays in memory,
/// and leaves split by their bytes").
pub const LOG_LEAF_BYTES: usize = 16 * 1024;

/// zstd level used for a compressed directory opened with `compression: None`.
pub const DEFAULT_COMPRESSION_LEVEL: i32 = -3;

/// A sled configuration for `dir` that matches how it was created (compressed or not),
/// for tools and tests that open a store's directory with sled directly. sled refuses to
/// open a directory with the other setting.
pub fn raw_config(dir: impl AsRef<Path>) -> sled::Config {
    sled_config(dir.as_ref(), None)
}

/// sled's configuration for `dir`: compressed as the directory was created, or, for a new
/// one, as `compression` says (at its level, or the default one).
fn sled_config(dir: &Path, compression: Option<i32>) -> sled::Config {
    let compressed = created_compressed(dir).unwrap_or(compression.is_some());
    sled::Config::new()
        .path(dir)
        .use_compression(compressed)
        .compression_factor(compression.unwrap_or(DEFAULT_COMPRESSION_LEVEL))
}

/// Whether sled created `dir` compressed: `None` when it holds no sled configuration yet
/// (a new directory), else the `use_compression` line sled wrote in `<dir>/conf`.
fn created_compressed(dir: &Path) -> Option<bool> {
    let conf = std::fs::read(dir.join("conf")).ok()?;
    let text = String::from_utf8_lossy(&conf);
    text.lines()
        .find_map(|l| l.strip_prefix("use_compression: "))
        .map(|v| v.trim() == "true")
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            cache_bytes: 64 * 1024 * 1024,
            flush_every_ms: 20,
            max_run_events: 100_000,
            max_run_bytes: 64 * 1024 * 1024,
            outbox_endpoints: Vec::new(),
            compression: Some(DEFAULT_COMPRESSION_LEVEL),
            kept_summaries: 16_384,
            pack_commits: true,
            wal: false,
            checkpoint_bytes: 64 << 20,
            group_window: WalOptions::default().group_window,
            group_commit: true,
        }
    }
}

/// What one of the store's trees holds ([`SledStore::live_bytes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeBytes {
    pub tree: &'static str,
    pub entries: u64,
    /// Keys and values.
    pub bytes: u64,
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
    /// Queue ids of the outbox, and those not yet deliverable.
    outbox_ids: Mutex<OutboxIds>,
    /// Leases and the ready queue's mirror: held briefly, never across an await.
    state: Mutex<State>,
    /// Commits to one run are serialized by the stripe its id falls in (creations with
    /// an idempotency key by the key's); commits to other runs go on at once.
    stripes: Box<[Mutex<()>]>,
    /// The runs `dirty` holds (written under the run's commit lock), with what their
    /// commits left for the mark's removal to write ([`Marked`]). With the log, the
    /// runs with commits not yet written to sled or summaries kept in memory (no
    /// mark is written).
    dirty: Mutex<HashMap<RunId, Marked>>,
    /// The write-ahead log, when the directory uses one ([`SledOptions::wal`]).
    wal: Option<Wal>,
    /// LSNs of logged commits not yet written to sled: a checkpoint goes no further
    /// than the first. Appends to the log are made under this lock, so a checkpoint
    /// reading it and the log's end sees every logged commit on one side or the other.
    unapplied: Mutex<BTreeSet<u64>>,
    /// Idempotency keys of logged creations not yet written to sled: key -> what
    /// `starts` will hold.
    starting: Mutex<HashMap<String, Vec<u8>>>,
    /// Held by the one checkpoint running; the LSN of the last.
    checkpoint: Mutex<u64>,
}

/// A commit in the log, not yet written to sled: what its writing needs.
#[derive(Clone, Debug)]
struct Logged {
    lsn: u64,
    end: u64,
    /// The values it stores in `events`, by the seq they are stored under.
    values: Vec<(Seq, Vec<u8>)>,
    /// Its notifications' outbox entries.
    notes: Vec<(Vec<u8>, Vec<u8>)>,
    /// A creation's idempotency key, and what `starts` holds for it.
    start: Option<(String, Vec<u8>)>,
    summary: RunSummary,
    commit_from: Seq,
    changes: Vec<IndexChange>,
}

/// What a marked run's commits left in memory for the mark's removal to write: its
/// latest summary, unless the `runs` tree holds it, and its status key. `clear_dirty`
/// (or `close`, or recovery from the journal) writes them. Readers read the summary
/// here first, and [`SledStore::count_runs`] and `list_runs` read the status index
/// through these entries, so neither is ever behind for a reader. A standard run so
/// writes three summaries and three status keys where it wrote six and seven.
#[derive(Clone, Debug)]
struct Marked {
    /// The status key `by_status` holds (`None`: none, for a run created since).
    stored: Option<RunStatus>,
    /// The status of the run's summary.
    status: RunStatus,
    /// The run's summary and the seq its commit began at, while `runs` holds an older
    /// one (recovery finds a commit's end by its last record, [`codec::ends_commit`]).
    /// With the log: the summary of the commits written to sled, what readers see.
    summary: Option<Box<(RunSummary, Seq)>>,
    /// With the log: the commits logged and not yet written to sled, in order (the
    /// last one's summary is what the next commit builds on).
    pending: std::collections::VecDeque<Logged>,
    /// Whether readers know the run: false for a logged creation not yet written.
    visible: bool,
    /// With the log: the records of commits written to sled but for their records,
    /// which wait here to be stored as one value ([`SledStore::store_held`]) when the
    /// entry's summary is, or once they pass [`HOLD_BYTES`]. In seq order, following on
    /// from what `events` holds; readers take them from here.
    held: Vec<(Seq, sled::IVec)>,
    /// With the log: the entries of the run's open gates that `pending` does not hold,
    /// opened by commits written to sled since the entry's summary last was: kept here
    /// until it is ([`SledStore::write_kept`]), so that a gate opened and decided
    /// between two checkpoints never reaches sled. In gate order; readers of `pending`
    /// read through them ([`SledStore::kept_gates`]).
    gates: Vec<PendingGate>,
}

impl Marked {
    /// Where `gates` keeps the entry of `gate`, if it does (they are in gate order).
    fn gate_index(&self, gate: GateId) -> Option<usize> {
        self.gates.binary_search_by_key(&gate, |g| g.gate).ok()
    }

    /// What `by_status` holds for the run, as [`Writer::put_status`] takes it.
    fn prior(&self) -> Prior {
        self.stored.map_or(Prior::Nothing, Prior::Was)
    }

    /// Whether `by_status` shows the run under `status` though it is not, or does not
    /// though it is.
    fn stale_for(&self, status: RunStatus) -> Option<bool> {
        if !self.visible {
            return None;
        }
        let listed = self.stored == Some(status);
        let is = self.status == status;
        (listed != is).then_some(is)
    }
}

/// What [`SledStore::stored_to`] finds: the record before the range, and the range's.
type StoredRecords = (Option<sled::IVec>, Vec<(Seq, sled::IVec)>);

/// Journals up to this many records long are read with point reads (`read_to`).
const POINT_READS_UP_TO: u64 = 16;
/// With the log: a run's held records are stored once they are this many bytes, even
/// if its summary stays in memory (a long activation's).
const HOLD_BYTES: usize = 32 * 1024;
const STRIPES: usize = 64;

/// The outbox's queue ids: the next one, and those queued by commits not yet durable.
/// [`Store::outbox`] shows only ids below the smallest of both, so a webhook never
/// reports an event a crash could still undo, and each queue is read in id order.
#[derive(Default)]
struct OutboxIds {
    next: u64,
    unsynced: BTreeSet<u64>,
}

impl OutboxIds {
    /// Every id below this was queued by a commit that is durable (or by recovery).
    fn deliverable_below(&self) -> u64 {
        self.unsynced
            .first()
            .map_or(self.next, |&first| first.min(self.next))
    }
}

#[derive(Clone)]
struct Trees {
    events: sled::Tree,
    runs: sled::Tree,
    by_status: sled::Tree,
    pending: sled::Tree,
    ready: sled::Tree,
    /// Written by earlier versions only: leases are in memory now. Emptied on open.
    leases: sled::Tree,
    starts: sled::Tree,
    deadlines: sled::Tree,
    rule_decisions: sled::Tree,
    /// Notifications to deliver, per endpoint: `endpoint \0 id(8, big-endian)`.
    outbox: sled::Tree,
    /// Commits in progress: run -> [`Intent`] (`mark_stuck`, and earlier versions).
    intents: sled::Tree,
    /// Runs written since their activation last ended: run -> empty. Recovery checks
    /// their last commit. (Not written by a store with the log.)
    dirty: sled::Tree,
    /// `wal_checkpoint` -> the log's checkpoint LSN (8 bytes), in a directory with a log.
    meta: sled::Tree,
}

/// The key in `meta` of the log's checkpoint.
const WAL_CHECKPOINT: &[u8] = b"wal_checkpoint";

/// What the writers share: the leases and the ready queue's mirror.
#[derive(Default)]
struct State {
    leases: HashMap<RunId, Lease>,
    /// Every run's wake-up: run -> due (ms) and whether the `ready` tree holds it. A run
    /// has at most one.
    wake: HashMap<RunId, Wake>,
    /// The entries of runs no worker holds, by due time: what `claim` takes.
    ready: BTreeSet<(u64, RunId)>,
    next_token: u64,
}

/// A run's wake-up in the ready queue's mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Wake {
    /// Due, in ms since the Unix epoch.
    ms: u64,
    /// Whether the `ready` tree holds it. One that does not is covered by the run's dirty
    /// mark instead (see [`Durability::Covered`]).
    stored: bool,
}

/// How a wake-up survives a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Durability {
    /// Written to the `ready` tree.
    Stored,
    /// Kept in memory only: set by a commit, so the run has a dirty mark, and every run
    /// still marked at open is made ready (`finish_dirty`). Whatever removes the mark
    /// first stores the wake-up (`release`, `close`) or ends the run.
    Covered,
}

impl State {
    fn leased(&self, run: RunId, token: LeaseToken) -> bool {
        self.leases.get(&run).is_some_and(|l| l.token == token)
    }
}

/// A run's events as decoded and verified, each with its chain hash, and the records
/// they came from (for the byte count).
type VerifiedPrefix = (Vec<(Event, ChainHash)>, Vec<sled::IVec>);

/// An unfinished commit, as stored under `intents`: enough to finish it or undo it.
struct Intent {
    /// The run's next seq once the commit's events are all written.
    target: Seq,
    /// The commit also parks the run (`mark_stuck`), with this reason.
    stuck: Option<String>,
    /// The run before the commit.
    old: Before,
}

/// What recovery did with an unfinished commit.
enum Finished {
    /// Some of its events were missing: it was removed.
    Undone,
    /// Its summary and index changes were written again.
    Done,
}

/// Whether recovery queues a finished commit's notifications.
enum Requeue {
    /// Its notifications may be missing (an intent: queued after the summary).
    Yes,
    /// They were queued before the commit's end (its last record; for a creation and
    /// in earlier versions, its summary) was written.
    No,
}

/// What an intent knows of the run before its commit.
enum Before {
    /// Nothing: the commit creates the run.
    Created,
    /// The summary as stored (intents written before summaries were re-derived).
    Stored(Vec<u8>),
    /// The run had this many events; its summary is their fold (as `check_indexes`
    /// derives it) with the stored summary's `stuck`, which no commit with events changes.
    Journal(Seq),
}

impl Intent {
    /// `target` (8), stuck flag (1), reason length (4), reason, then what came before:
    /// 0 (created), 1 and the old summary's bytes (stored), or 2 and its next seq (8).
    fn encode(&self) -> Vec<u8> {
        let stuck = self.stuck.as_deref().unwrap_or_default().as_bytes();
        let mut v = Vec::with_capacity(22 + stuck.len());
        v.extend_from_slice(&self.target.0.to_be_bytes());
        v.push(u8::from(self.stuck.is_some()));
        v.extend_from_slice(&(stuck.len() as u32).to_be_bytes());
        v.extend_from_slice(stuck);
        match &self.old {
            Before::Created => v.push(0),
            Before::Stored(old) => {
                v.push(1);
                v.extend_from_slice(old);
            }
            Before::Journal(seq) => {
                v.push(2);
                v.extend_from_slice(&seq.0.to_be_bytes());
            }
        }
        v
    }

    fn decode(run: RunId, bytes: &[u8]) -> Result<Intent> {
        let bad = || Error::Storage(format!("commit intent of run {run} is malformed"));
        let target = Seq(u64::from_be_bytes(
            bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(bad)?,
        ));
        let has_stuck = *bytes.get(8).ok_or_else(bad)? == 1;
        let len =
            u32::from_be_bytes(bytes.get(9..13).and_then(|b| b.try_into().ok()).ok_or_else(bad)?) as usize;
        let stuck = bytes.get(13..13 + len).ok_or_else(bad)?;
        let stuck = has_stuck.then(|| String::from_utf8_lossy(stuck).into_owned());
        let rest = bytes.get(14 + len..).unwrap_or_default();
        let old = match *bytes.get(13 + len).ok_or_else(bad)? {
            0 => Before::Created,
            1 => Before::Stored(rest.to_vec()),
            2 => Before::Journal(Seq(u64::from_be_bytes(rest.try_into().map_err(|_| bad())?))),
            _ => return Err(bad()),
        };
        if matches!(old, Before::Journal(from) if from > target) {
            return Err(bad());
        }
        Ok(Intent { target, stuck, old })
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir` with default options.
    pub fn open(dir: impl AsRef<Path>) -> Result<SledStore> {
        Self::open_with(dir, SledOptions::default())
    }

    pub fn open_with(dir: impl AsRef<Path>, options: SledOptions) -> Result<SledStore> {
        let dir = dir.as_ref().to_path_buf();
        // With the log, a run's journal is one value of a kilobyte or more
        // (`keeps_released`): leaves split by their bytes as well (LOG_LEAF_BYTES). sled's
        // configuration is fixed before the `meta` tree says whether the directory has
        // a log, so its `wal` directory tells; a directory cut off between the two only
        // misses the limit (how leaves split changes nothing on disk).
        let logged = options.wal || dir.join("wal").is_dir();
        let db = sled_config(&dir, options.compression)
            .leaf_split_bytes(if logged { LOG_LEAF_BYTES } else { usize::MAX })
            .cache_capacity(options.cache_bytes)
            .flush_every_ms(Some(options.flush_every_ms.max(1)))
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
            intents: db.open_tree("intents")?,
            dirty: db.open_tree("dirty")?,
            meta: db.open_tree("meta")?,
        };
        // A directory with a log keeps it, whatever the options say.
        let checkpoint = match trees.meta.get(WAL_CHECKPOINT)? {
            Some(v) => Some(u64::from_be_bytes(<[u8; 8]>::try_from(v.as_ref()).map_err(
                |_| Error::Storage("the write-ahead log's checkpoint is malformed".into()),
            )?)),
            None => None,
        };
        let mut logged = Vec::new();
        let wal = match (checkpoint, options.wal) {
            (None, false) => None,
            (checkpoint, _) => {
                if checkpoint.is_none() {
                    // Known to be a directory with a log before the log exists.
                    trees.meta.insert(WAL_CHECKPOINT, &0u64.to_be_bytes())?;
                    db.flush()?;
                }
                let from = Lsn(checkpoint.unwrap_or(0));
                let wal_options = WalOptions {
                    group_window: options.group_window,
                    ..WalOptions::default()
                };
                let (wal, _) = Wal::open(&dir.join("wal"), wal_options, from, |lsn, payload| {
                    logged.push(decode_logged(lsn, payload)?);
                    Ok(())
                })?;
                Some(wal)
            }
        };
        let last_checkpoint = checkpoint.unwrap_or(0);
        // sled keeps its log in `<dir>/db`; we fsync it ourselves (see module docs).
        let data_file = File::open(dir.join("db"))?;
        let flusher = match options.group_commit {
            true => GroupCommit::start(db.clone(), data_file, options.group_window),
            false => GroupCommit::inline(db.clone(), data_file),
        };
        let (changes, _) = watch::channel(0);
        let state = State {
            // Fencing tokens only grow, across restarts too.
            next_token: u64::try_from(Utc::now().timestamp_micros()).unwrap_or(1),
            ..State::default()
        };
        let store = SledStore {
            inner: Arc::new(Inner {
                dir,
                db,
                trees,
                flusher,
                changes,
                options,
                outbox_ids: Mutex::new(OutboxIds::default()),
                state: Mutex::new(state),
                stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
                dirty: Mutex::new(HashMap::new()),
                wal,
                unapplied: Mutex::new(BTreeSet::new()),
                starting: Mutex::new(HashMap::new()),
                checkpoint: Mutex::new(last_checkpoint),
            }),
        };
        let spans = store.replay_logged(logged)?;
        store.open_outboxes()?;
        store.load_ready()?;
        store.finish_intents()?;
        store.finish_dirty()?;
        store.redo_logged(spans)?;
        // What the log replayed is in sled now: a checkpoint, so a crash from here on
        // replays from the end.
        store.checkpoint()?;
        store.recover_leases()?;
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
        let still_held =
            || Error::Storage("cannot close the store: other handles to it are still alive".into());
        if Arc::strong_count(&self.inner) > 1 {
            return Err(still_held());
        }
        // With the log: everything it holds goes to sled; the log restarts from its end.
        self.checkpoint()?;
        let inner = Arc::try_unwrap(self.inner).map_err(|_| still_held())?;
        // The marks are about to go: store the wake-ups they covered first, and the
        // summaries and status keys their commits left.
        store_wakes(&inner)?;
        {
            let w = Writer::of(&inner);
            for (run, marked) in lock(&inner.dirty).iter().filter(|(_, m)| m.visible) {
                write_marked(&w, *run, marked.prior(), marked.status, marked.summary.as_deref())?;
                write_gates(&inner.trees, &marked.gates)?;
            }
        }
        // Every commit is whole (no other handle is alive): no run needs checking.
        for key in inner.trees.dirty.iter().keys() {
            inner.trees.dirty.remove(key?)?;
        }
        inner.db.flush()?;
        let db_file = inner.dir.join("db");
        drop(inner);
        let file = File::open(&db_file)?;
        fs2::FileExt::lock_exclusive(&file)?;
        fs2::FileExt::unlock(&file)?;
        Ok(())
    }

    /// The bytes past which sled splits a leaf whatever its count of keys: [`LOG_LEAF_BYTES`]
    /// for a directory with the log, else `usize::MAX` (none).
    pub fn leaf_split_bytes(&self) -> usize {
        self.inner.db.leaf_split_bytes()
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// How many keys the store has written (inserts and removes that changed a key, in
    /// every tree) since it was opened: what `holdpoint bench` reports per run.
    pub fn key_writes(&self) -> u64 {
        self.inner.db.key_writes()
    }

    /// How many group commits (flush + fsync, and with the log its syncs) have run
    /// since open.
    pub fn sync_count(&self) -> u64 {
        let log = self.inner.wal.as_ref().map_or(0, Wal::syncs);
        self.inner.flusher.shared.syncs.load(Ordering::Relaxed) + log
    }

    /// Times a group commit (sled's flush, and the log's write) waited for its group to
    /// gather ([`SledOptions::group_window`]) since open.
    pub fn group_windows(&self) -> u64 {
        let log = self.inner.wal.as_ref().map_or(0, Wal::windows);
        self.inner.flusher.shared.windows.load(Ordering::Relaxed) + log
    }

    /// sled's own estimate of its files' size, plus the write-ahead log's segments (with
    /// the zeros written ahead of its records), if it has one.
    pub fn size_on_disk(&self) -> Result<u64> {
        let mut bytes = self.inner.db.size_on_disk()?;
        if let Some(wal) = &self.inner.wal {
            for (_, path) in wal.segments() {
                match std::fs::metadata(path) {
                    Ok(m) => bytes += m.len(),
                    // Removed by a checkpoint meanwhile.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(bytes)
    }

    /// Entries and bytes of keys and values held now, per tree (what sled's files would
    /// hold with no garbage and no framing): `size_on_disk` against their sum is sled's
    /// space amplification. Reads every entry.
    pub fn live_bytes(&self) -> Result<Vec<TreeBytes>> {
        let t = &self.inner.trees;
        let trees: [(&'static str, &sled::Tree); 13] = [
            ("events", &t.events),
            ("runs", &t.runs),
            ("by_status", &t.by_status),
            ("pending", &t.pending),
            ("ready", &t.ready),
            ("leases", &t.leases),
            ("starts", &t.starts),
            ("deadlines", &t.deadlines),
            ("rule_decisions", &t.rule_decisions),
            ("outbox", &t.outbox),
            ("intents", &t.intents),
            ("dirty", &t.dirty),
            ("meta", &t.meta),
        ];
        let mut out = Vec::new();
        for (name, tree) in trees {
            let (mut entries, mut bytes) = (0u64, 0u64);
            for item in tree.iter() {
                let (k, v) = item?;
                entries += 1;
                bytes += (k.len() + v.len()) as u64;
            }
            out.push(TreeBytes {
                tree: name,
                entries,
                bytes,
            });
        }
        Ok(out)
    }

    /// How many runs have this status: a scan of the status index's prefix, corrected
    /// for the marked runs whose keys are not written yet (see [`Marked`]). Exact when
    /// no commit is under way; one racing it may be counted on either side.
    pub fn count_runs(&self, status: RunStatus) -> Result<usize> {
        let (mut added, mut removed) = (0usize, 0usize);
        for marked in lock(&self.inner.dirty).values() {
            match marked.stale_for(status) {
                Some(true) => added += 1,
                Some(false) => removed += 1,
                None => {}
            }
        }
        let mut n = 0usize;
        for item in self.inner.trees.by_status.scan_prefix([status.code()]).keys() {
            item?;
            n += 1;
        }
        Ok((n + added).saturating_sub(removed))
    }

    /// How many gates are open (a scan of the pending index, and the entries kept in
    /// memory with the log).
    pub fn count_pending(&self) -> Result<usize> {
        // Memory first: an entry written to sled meanwhile is then counted once.
        let kept: BTreeSet<[u8; 20]> = self
            .kept_gates(None, usize::MAX, |_| ())
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let mut n = kept.len();
        for key in self.inner.trees.pending.iter().keys() {
            if !kept.contains(key?.as_ref()) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// With the log: the first `limit` pending entries past the key `past` that the
    /// runs' entries keep in memory ([`Marked::gates`]), by their key in `pending`, in
    /// key order, each as `take` makes it.
    fn kept_gates<T>(
        &self,
        past: Option<[u8; 20]>,
        limit: usize,
        take: impl Fn(&PendingGate) -> T,
    ) -> Vec<([u8; 20], T)> {
        if self.inner.wal.is_none() {
            return Vec::new();
        }
        let marks = lock(&self.inner.dirty);
        let mut found: Vec<([u8; 20], &PendingGate)> = marks
            .iter()
            .filter(|(_, m)| m.visible)
            .flat_map(|(run, m)| m.gates.iter().map(|g| (gate_key(*run, g.gate), g)))
            .filter(|(key, _)| past.is_none_or(|past| *key > past))
            .collect();
        found.sort_unstable_by_key(|a| a.0);
        found.truncate(limit);
        found.into_iter().map(|(key, gate)| (key, take(gate))).collect()
    }

    /// All run ids, in creation order (for `verify` and exports).
    pub fn run_ids(&self) -> impl Iterator<Item = Result<RunId>> + '_ {
        self.run_ids_after(None)
    }

    /// The run ids after `after` (all with `None`), in order: the `runs` tree's, merged
    /// with the marked runs created since their marks were last cleared, whose
    /// summaries are still in memory only (as of this call).
    fn run_ids_after(&self, after: Option<RunId>) -> impl Iterator<Item = Result<RunId>> + '_ {
        let mut kept: Vec<RunId> = lock(&self.inner.dirty)
            .iter()
            .filter(|(run, m)| m.stored.is_none() && m.summary.is_some() && after.is_none_or(|a| **run > a))
            .map(|(run, _)| *run)
            .collect();
        kept.sort_unstable();
        let stored = match after {
            Some(a) => {
                let mut k = a.as_bytes().to_vec();
                k.push(0);
                self.inner.trees.runs.range(k..)
            }
            None => self.inner.trees.runs.iter(),
        };
        let stored = stored.keys().map(|k| {
            let k = k?;
            run_from_key(&k).ok_or_else(|| Error::Storage("malformed key in runs tree".into()))
        });
        MergedRunIds {
            stored: stored.peekable(),
            kept: kept.into_iter().peekable(),
        }
    }

    /// Reads `[from, summary.next_seq)`: the events the summary (read first) knows.
    /// Events below `next_seq` never change, so this is a consistent view even while
    /// appends land; events appended after the summary was read are left for the next
    /// read. (Reading to the end of the tree instead made a read racing an append see
    /// events "past the summary" and report a healthy journal as corrupt.)
    fn read_to(&self, run: RunId, from: Seq, summary: &RunSummary) -> Result<Vec<Event>> {
        let next = summary.next_seq;
        // With the log, the latest records may still be held in memory: sled holds those
        // below the first of them.
        let held = self.held(run);
        let stored_to = held.first().map_or(next, |&(seq, _)| seq.min(next));
        let (mut before, mut records) = self.stored_to(run, from, stored_to)?;
        for (seq, record) in held.into_iter().take_while(|&(seq, _)| seq < next) {
            if from.0 > 0 && seq.0 == from.0 - 1 {
                before = Some(record);
            } else if seq >= from {
                records.push((seq, record));
            }
        }
        codec::verify_records(
            run,
            from,
            before,
            records.into_iter().map(Ok),
            next,
            &summary.head,
        )
    }

    /// The records sled stores of `run` in `[from, to)`, and the one before `from` (whose
    /// hash the first links to), as found: [`codec::verify_records`] finds what is
    /// missing.
    fn stored_to(&self, run: RunId, from: Seq, to: Seq) -> Result<StoredRecords> {
        let first = from.0.saturating_sub(1);
        if first >= to.0 {
            return Ok((None, Vec::new()));
        }
        // A short journal is read by key: a sled range scan copies the whole leaf it
        // starts in (up to 64 entries, a reference taken on each value) to hand out a
        // few, while `get_many` descends once and reads the neighbouring keys from the
        // leaf it found (the record before `from` too, whose hash the first one links
        // to). A key inside a packed value has no value of its own: the value, under
        // its first seq, holds it. Longer journals, and any read that finds a record
        // missing (whose error the scan words, naming the next stored seq) or the
        // record before `from` inside an earlier value, go through the scan.
        let wanted = to.0.saturating_sub(from.0);
        if wanted <= POINT_READS_UP_TO {
            let keys: Vec<_> = (first..to.0)
                .map(|seq| codec::record_key(run, Seq(seq)))
                .collect();
            let values = self.inner.trees.events.get_many(&keys)?;
            let mut before = None;
            let mut records = Vec::with_capacity(wanted as usize);
            // Seqs below `covered` were found, alone or in a packed value.
            let mut covered = first;
            let mut whole = true;
            for (seq, value) in (first..to.0).zip(values) {
                match value {
                    Some(value) if seq >= covered => {
                        each_record(run, Seq(seq), &value, |at, record| {
                            if from.0 > 0 && at.0 == first {
                                before = Some(record);
                            } else if at >= from && at < to {
                                records.push((at, record));
                            }
                            covered = at.0 + 1;
                        })?;
                    }
                    None if seq < covered => {}
                    _ => {
                        whole = false;
                        break;
                    }
                }
            }
            if whole && records.len() as u64 == wanted && (from.0 == 0 || before.is_some()) {
                return Ok((before, records));
            }
        }
        let mut records = self.stored_between(run, Seq(first), Some(to))?;
        let before = match records.first() {
            Some((at, _)) if from.0 > 0 && at.0 == first => Some(records.remove(0).1),
            _ => None,
        };
        Ok((before, records))
    }

    /// The stored records of `run` with seqs in `[from, to)` (to the end with `None`),
    /// in order, each with its seq; a packed commit's one by one. Read from the value
    /// that holds `from`, which a packed commit keeps under an earlier seq. Gaps are
    /// left for the caller to find (the seqs say where they are).
    fn records_between(&self, run: RunId, from: Seq, to: Option<Seq>) -> Result<Vec<(Seq, sled::IVec)>> {
        // With the log, the latest records may still be held in memory.
        let held = self.held(run);
        // The lesser of the first held seq and `to`, where there are either.
        let stored_to = held.first().map(|&(seq, _)| seq).into_iter().chain(to).min();
        let mut out = match stored_to {
            Some(stored_to) if stored_to <= from => Vec::new(),
            _ => self.stored_between(run, from, stored_to)?,
        };
        out.extend(
            held.into_iter()
                .filter(|&(seq, _)| seq >= from && to.is_none_or(|to| seq < to)),
        );
        Ok(out)
    }

    /// [`SledStore::records_between`] in sled alone.
    fn stored_between(&self, run: RunId, from: Seq, to: Option<Seq>) -> Result<Vec<(Seq, sled::IVec)>> {
        let events = &self.inner.trees.events;
        let held = match from {
            Seq::ZERO => None,
            _ => self.value_holding(run, from)?,
        };
        let start = held
            .and_then(|(key, _)| <[u8; 24]>::try_from(key.as_ref()).ok())
            .unwrap_or(codec::record_key(run, from));
        let end = match to {
            Some(to) => Bound::Excluded(codec::record_key(run, to)),
            None => Bound::Included(codec::record_key(run, Seq(u64::MAX))),
        };
        let mut out = Vec::new();
        for item in events.range((Bound::Included(start), end)) {
            let (key, value) = item?;
            each_record(run, seq_of_key(run, &key)?, &value, |seq, record| {
                if seq >= from && to.is_none_or(|to| seq < to) {
                    out.push((seq, record));
                }
            })?;
        }
        Ok(out)
    }

    /// The stored value of `run` that may hold its record at `seq`, with its key: the
    /// last one stored at or below `seq` (the record itself, or a packed commit that
    /// began earlier).
    fn value_holding(&self, run: RunId, seq: Seq) -> Result<Option<(sled::IVec, sled::IVec)>> {
        let range = codec::record_key(run, Seq::ZERO)..=codec::record_key(run, seq);
        Ok(self.inner.trees.events.range(range).next_back().transpose()?)
    }

    /// The stored records of `run` from `from` up to `to` (to the end with `None`) that
    /// follow on from `from` without a gap.
    fn contiguous_records(&self, run: RunId, from: Seq, to: Option<Seq>) -> Result<Vec<sled::IVec>> {
        let found = self.records_between(run, from, to)?;
        Ok(found
            .into_iter()
            .zip(from.0..)
            .map_while(|((seq, record), expected)| (seq == Seq(expected)).then_some(record))
            .collect())
    }

    /// Verifies a whole journal strictly, for offline checks (no writer running): every
    /// event read and chained, and nothing stored past what the summary knows.
    /// Returns the number of events and the head.
    pub fn verify_run(&self, run: RunId) -> Result<(Seq, ChainHash)> {
        let Some(summary) = self.summary_now(run)? else {
            return Err(Error::UnknownRun(run));
        };
        self.read_to(run, Seq::ZERO, &summary)?;
        // From the record before the end: a packed commit under it may reach past it.
        let last = Seq(summary.next_seq.0.saturating_sub(1));
        let past = self.records_between(run, last, None)?;
        if past.iter().any(|(seq, _)| *seq >= summary.next_seq) {
            return Err(codec::past_summary(run, summary.next_seq));
        }
        Ok((summary.next_seq, summary.head))
    }

    /// The chain hash of the run's event at `seq`, verifying every record up to it. With
    /// a head saved earlier (`holdpoint verify --head`), this tells whether the journal
    /// still begins with what it held then.
    pub fn chain_hash_at(&self, run: RunId, seq: Seq) -> Result<ChainHash> {
        let mut prev = ChainHash::GENESIS;
        let mut records = self
            .records_between(run, Seq::ZERO, Some(seq.next()))?
            .into_iter();
        for i in 0..=seq.0 {
            let at = Seq(i);
            let Some((_, record)) = records.next().filter(|(s, _)| *s == at) else {
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

    /// One stored record, as it is on disk (corruption tests): alone or in its packed
    /// commit.
    #[doc(hidden)]
    pub fn raw_record(&self, run: RunId, seq: Seq) -> Result<Option<Vec<u8>>> {
        let found = self.records_between(run, seq, Some(seq.next()))?;
        Ok(found.into_iter().next().map(|(_, record)| record.to_vec()))
    }

    /// Overwrites one stored record behind the store's back (corruption tests), in
    /// place in its packed value if it is in one. Records held in memory are stored
    /// first, so the damage is on disk, where it would be.
    #[doc(hidden)]
    pub fn overwrite_record(&self, run: RunId, seq: Seq, record: &[u8]) -> Result<()> {
        {
            let _run = self.run_lock(run);
            self.store_held(run)?;
        }
        let events = &self.inner.trees.events;
        if let Some((key, value)) = self.value_holding(run, seq)? {
            let at = seq_of_key(run, &key)?;
            let ranges = codec::unpack(run, at, &value)?;
            if ranges.len() > 1 && ranges.iter().any(|(s, _)| *s == seq) {
                let records = ranges
                    .into_iter()
                    .map(|(s, r)| {
                        if s == seq {
                            record.to_vec()
                        } else {
                            value[r].to_vec()
                        }
                    })
                    .collect();
                events.insert(key, codec::pack(records))?;
                return Ok(());
            }
        }
        events.insert(codec::record_key(run, seq), record)?;
        Ok(())
    }

    /// Waits until everything written so far is durable.
    pub async fn sync(&self) -> Result<()> {
        if let Some(wal) = &self.inner.wal {
            wal.wait(wal.end()).await?;
        }
        self.inner.flusher.wait().await
    }

    /// Whether the store makes its commits durable in its write-ahead log.
    pub fn has_wal(&self) -> bool {
        self.inner.wal.is_some()
    }

    /// Leases left in the `leases` tree by an earlier version belong to a process that
    /// is gone: put those runs back on the ready queue and empty the tree.
    fn recover_leases(&self) -> Result<()> {
        let trees = &self.inner.trees;
        let runs: Vec<(sled::IVec, RunId)> = trees
            .leases
            .iter()
            .keys()
            .filter_map(|k| k.ok())
            .filter_map(|k| run_from_key(&k).map(|r| (k, r)))
            .collect();
        for (key, run) in runs {
            self.make_ready_at_once(run)?;
            trees.leases.remove(key)?;
        }
        Ok(())
    }

    /// Makes `run` ready, due at once whatever clock the engine runs on, with its wake-up
    /// stored, unless it ended, is parked or does not exist. For the open's recovery.
    fn make_ready_at_once(&self, run: RunId) -> Result<()> {
        match self.summary_now(run)? {
            Some(s) if !s.status.is_terminal() && s.stuck.is_none() => {
                Writer::new(self).schedule(run, DateTime::<Utc>::UNIX_EPOCH)
            }
            _ => Ok(()),
        }
    }

    /// Mirrors the ready queue in memory, keeping the earliest entry of each run (a crash
    /// between writing a new entry and removing the old one leaves two).
    fn load_ready(&self) -> Result<()> {
        let mut st = self.state();
        let mut extra = Vec::new();
        for key in self.inner.trees.ready.iter().keys() {
            let key = key?;
            let (Some(ms), Some(run)) = (
                key.get(..8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes),
                key.get(8..).and_then(run_from_key),
            ) else {
                return Err(Error::Storage("malformed key in the ready queue".into()));
            };
            let stored = Wake { ms, stored: true };
            match st.wake.get(&run).map(|w| w.ms) {
                Some(first) if first <= ms => extra.push(key),
                Some(later) => {
                    extra.push(ready_key(later, run).to_vec().into());
                    st.ready.remove(&(later, run));
                    st.wake.insert(run, stored);
                    st.ready.insert((ms, run));
                }
                None => {
                    st.wake.insert(run, stored);
                    st.ready.insert((ms, run));
                }
            }
        }
        for key in extra {
            self.inner.trees.ready.remove(key)?;
        }
        Ok(())
    }

    /// Finishes or undoes every commit a crash interrupted (see the module docs).
    fn finish_intents(&self) -> Result<()> {
        let pending: Vec<(RunId, Intent)> = self
            .inner
            .trees
            .intents
            .iter()
            .map(|item| {
                let (k, v) = item?;
                let run =
                    run_from_key(&k).ok_or_else(|| Error::Storage("malformed commit intent key".into()))?;
                Ok((run, Intent::decode(run, &v)?))
            })
            .collect::<Result<_>>()?;
        if !pending.is_empty() {
            tracing::warn!(commits = pending.len(), "finishing commits a crash interrupted");
        }
        for (run, intent) in pending {
            // Earlier versions queued a commit's notifications after its summary: an
            // intent's commit may not have queued them yet.
            match self.finish_intent(run, intent, Requeue::Yes)? {
                Finished::Undone => {
                    tracing::warn!(%run, "undid a commit a crash cut short (it was never acknowledged)")
                }
                Finished::Done => tracing::warn!(%run, "finished a commit a crash interrupted"),
            }
            self.inner.trees.intents.remove(run.as_bytes())?;
        }
        Ok(())
    }

    /// Checks the commits of every run marked dirty since its stored summary (see the
    /// module docs): undoes one cut before its last record, writes the summary and the
    /// index changes of the last whole one again, makes the run ready (its commits'
    /// wake-ups were covered by the mark, not stored) and removes the marks.
    fn finish_dirty(&self) -> Result<()> {
        let trees = &self.inner.trees;
        let marked: Vec<RunId> = trees
            .dirty
            .iter()
            .keys()
            .map(|k| run_from_key(&k?).ok_or_else(|| Error::Storage("malformed dirty mark key".into())))
            .collect::<Result<_>>()?;
        // Where each marked run's whole commits end: its notifications from there on are
        // a cut commit's (queued before the commit's last record, perhaps before its
        // first).
        let mut ends = HashMap::new();
        let mut undone = 0usize;
        for &run in &marked {
            let stored = match trees.runs.get(run.as_bytes())? {
                Some(bytes) => Some(crate::stored_summary::decode_stored(run, &bytes)?),
                None => None,
            };
            // A run with no stored summary is a creation whose summary was kept with
            // its mark: its journal is checked from the start.
            let next = stored.as_ref().map_or(Seq::ZERO, |s| s.summary.next_seq);
            let values: Vec<(sled::IVec, sled::IVec)> = self
                .events_from(run, next)
                .collect::<std::result::Result<_, _>>()?;
            // The commits past the stored summary are whole up to the last record that
            // ends one.
            let (mut end, mut last_from) = match &stored {
                Some(stored) => (next, stored.commit_from.unwrap_or(next)),
                None => (Seq::ZERO, Seq::ZERO),
            };
            let mut prev = stored.as_ref().map_or(ChainHash::GENESIS, |s| s.summary.head);
            let mut damaged = None;
            // Each record past the summary, with the value (alone or a packed commit)
            // it is stored in.
            let mut past = Vec::new();
            for (index, (key, value)) in values.iter().enumerate() {
                let expected = Seq(next.0 + past.len() as u64);
                let at = seq_of_key(run, key).ok().filter(|at| *at == expected);
                match at.map(|at| codec::unpack(run, at, value)) {
                    Some(Ok(ranges)) => past.extend(ranges.into_iter().map(|(_, r)| (index, r))),
                    _ => {
                        damaged = Some(expected);
                        break;
                    }
                }
            }
            for (i, (index, range)) in past.iter().enumerate() {
                let seq = Seq(next.0 + i as u64);
                let checked = match codec::check(run, seq, &values[*index].1[range.clone()]) {
                    Ok(c) if c.prev == prev => c,
                    _ => {
                        damaged = Some(damaged.map_or(seq, |d: Seq| d.min(seq)));
                        break;
                    }
                };
                prev = checked.hash();
                if codec::ends_commit(&checked) {
                    (last_from, end) = (end, Seq(seq.0 + 1));
                }
            }
            let whole = (end.0 - next.0) as usize;
            if damaged.is_none() && whole > 0 && whole < past.len() && past[whole - 1].0 == past[whole].0 {
                // A commit ends inside a packed value: never written so.
                damaged = Some(end);
            }
            if stored.is_none() && end == Seq::ZERO {
                if damaged.is_some() {
                    // Its `run-started` is there but fails its checks: damage, not a cut
                    // (sled recovers whole log messages). Nothing is removed; with no
                    // summary to park, the run is not listed.
                    tracing::error!(
                        %run,
                        "the run-started record of a run created just before the store stopped is damaged: \
                         the run is not listed, its records are kept for inspection"
                    );
                } else {
                    // A creation cut before its `run-started` (its commit point): never
                    // acknowledged, undone.
                    for (key, _) in &values {
                        trees.events.remove(key)?;
                    }
                    undone += 1;
                    tracing::warn!(%run, "undid a creation a crash cut short (it was never acknowledged)");
                }
                ends.insert(run, Seq::ZERO);
                trees.dirty.remove(run.as_bytes())?;
                continue;
            }
            if let Some(seq) = damaged {
                // sled recovers only whole log messages, so this is damage, not a cut:
                // nothing is removed, and the run waits for an operator.
                let reason = format!(
                    "journal damaged at seq {seq}, past the summary, found when recovering from a crash"
                );
                tracing::error!(%run, %seq, "{reason}");
                let summary = match stored {
                    Some(stored) => stored.summary,
                    // A creation kept in memory: its whole commits' fold.
                    None => self.summary_upto(run, end)?,
                };
                self.write_parked(summary, &reason)?;
                trees.dirty.remove(run.as_bytes())?;
                continue;
            }
            ends.insert(run, end);
            if past.len() > whole {
                // Cut before its last record: never acknowledged (only a commit stored
                // one record per key can be cut so).
                let first_cut = past[whole].0;
                for (key, _) in &values[first_cut..] {
                    trees.events.remove(key)?;
                }
                undone += 1;
                tracing::warn!(%run, "undid a commit a crash cut short (it was never acknowledged)");
            }
            if last_from < end {
                // The last whole commit may be cut in its index changes, and the
                // summary of every commit since the stored one was in memory: the
                // summary before the last commit is the fold of the journal up to its
                // first seq, and from it the summary and the index changes are derived
                // again and written. Its notifications were queued before its last
                // record: not again.
                let intent = Intent {
                    target: end,
                    stuck: None,
                    old: if last_from == Seq::ZERO {
                        Before::Created
                    } else {
                        Before::Journal(last_from)
                    },
                };
                if let Finished::Undone = self.finish_intent(run, intent, Requeue::No)? {
                    ends.insert(run, last_from);
                    undone += 1;
                }
            }
            // The mark covered the wake-ups of the run's commits since its last release
            // and its status key: store both before the mark goes. An activation with
            // nothing to do just suspends again.
            if let Some(bytes) = trees.runs.get(run.as_bytes())? {
                let summary = decode_summary(run, &bytes)?;
                Writer::new(self).put_status(run, summary.status, Prior::Unknown)?;
            }
            self.make_ready_at_once(run)?;
            trees.dirty.remove(run.as_bytes())?;
        }
        self.drop_notifications(&ends)?;
        if !marked.is_empty() {
            tracing::info!(
                runs = marked.len(),
                undone,
                "checked the commits of runs written when the store last stopped"
            );
        }
        Ok(())
    }

    /// Removes the queued notifications of events recovery undid or never found: those
    /// of `cut`'s runs from the seq given. A commit queues them before its last record,
    /// so a commit cut after them leaves them queued. One pass over the outbox, when
    /// the open found marked runs and endpoints are named.
    fn drop_notifications(&self, cut: &HashMap<RunId, Seq>) -> Result<()> {
        if cut.is_empty() || self.inner.options.outbox_endpoints.is_empty() {
            return Ok(());
        }
        let outbox = &self.inner.trees.outbox;
        let mut dropped = 0usize;
        for item in outbox.iter() {
            let (key, value) = item?;
            let Ok(n) = serde_json::from_slice::<Notification>(&value) else {
                continue;
            };
            if cut.get(&n.run).is_some_and(|from| n.seq >= *from) {
                outbox.remove(key)?;
                dropped += 1;
            }
        }
        if dropped > 0 {
            tracing::warn!(dropped, "dropped notifications of commits a crash cut short");
        }
        Ok(())
    }

    /// A run's stored records from `from` to its end, by key.
    fn events_from(&self, run: RunId, from: Seq) -> sled::Iter {
        self.inner
            .trees
            .events
            .range(codec::record_key(run, from)..=codec::record_key(run, Seq(u64::MAX)))
    }

    /// Lets readers of the outbox see the notifications of a commit now durable.
    fn deliverable(&self, hidden: &[u64]) {
        if hidden.is_empty() {
            return;
        }
        let mut ids = lock(&self.inner.outbox_ids);
        for id in hidden {
            ids.unsynced.remove(id);
        }
    }

    /// Marks `run` dirty before a commit's first write, unless it is already; `stored`
    /// is the status key `by_status` holds for it (that of its summary, as the run is
    /// not marked; `None` for a creation), `status` its summary's. Under the run's
    /// commit lock (or, for a creation, before anyone knows the run).
    fn mark_dirty(&self, run: RunId, stored: Option<RunStatus>, status: RunStatus) -> Result<()> {
        if lock(&self.inner.dirty).contains_key(&run) {
            return Ok(());
        }
        // With the log, its records past the checkpoint name the run instead.
        if self.inner.wal.is_none() {
            self.inner.trees.dirty.insert(run.as_bytes(), &[])?;
        }
        let marked = Marked {
            stored,
            status,
            summary: None,
            pending: Default::default(),
            // With the log, a creation is seen once it is written to sled.
            visible: stored.is_some() || self.inner.wal.is_none(),
            held: Vec::new(),
            gates: Vec::new(),
        };
        lock(&self.inner.dirty).insert(run, marked);
        Ok(())
    }

    /// Keeps the summary a commit of the marked `run` (its events from `commit_from`)
    /// left, for the mark's removal to write, or writes it at once past
    /// [`SledOptions::kept_summaries`] marks. Under the run's commit lock, after the commit's
    /// last record.
    fn keep_summary(&self, w: &Writer<'_>, summary: &RunSummary, commit_from: Seq) -> Result<()> {
        {
            let mut marks = lock(&self.inner.dirty);
            let many = marks.len() > self.inner.options.kept_summaries;
            if let Some(marked) = marks.get_mut(&summary.id) {
                marked.status = summary.status;
                if !many {
                    marked.summary = Some(Box::new((summary.clone(), commit_from)));
                    return Ok(());
                }
                marked.summary = None;
            }
        }
        // Past the limit, what memory holds for the run goes to sled with its summary.
        self.store_held(summary.id)?;
        w.put_summary_only(summary, commit_from)
    }

    /// The summary the mark of `run` keeps in memory, if any.
    fn kept_summary(&self, run: RunId) -> Option<RunSummary> {
        let marks = lock(&self.inner.dirty);
        marks.get(&run)?.summary.as_ref().map(|kept| kept.0.clone())
    }

    /// With the log: stores the records held with `run`'s entry as one value, under the
    /// first one's key, then drops them from the entry. Under the run's commit lock, so
    /// none is added meanwhile; a reader that took them from the entry before reads the
    /// same records either way.
    fn store_held(&self, run: RunId) -> Result<()> {
        let held = match lock(&self.inner.dirty).get(&run) {
            Some(m) => m.held.clone(),
            None => return Ok(()),
        };
        let Some(&(first, _)) = held.first() else {
            return Ok(());
        };
        let records: Vec<&[u8]> = held.iter().map(|(_, r)| r.as_ref()).collect();
        self.inner
            .trees
            .events
            .insert(codec::record_key(run, first), codec::pack_all(&records))?;
        if let Some(m) = lock(&self.inner.dirty).get_mut(&run) {
            m.held.clear();
        }
        Ok(())
    }

    /// With the log: the records held with `run`'s entry, in seq order (none without the
    /// log). Taken after the summary a reader reads to: its records are held or stored.
    fn held(&self, run: RunId) -> Vec<(Seq, sled::IVec)> {
        if self.inner.wal.is_none() {
            return Vec::new();
        }
        lock(&self.inner.dirty)
            .get(&run)
            .map(|m| m.held.clone())
            .unwrap_or_default()
    }

    /// With the log, whether a released run's entry stays, keeping its summary, status
    /// and held records in memory past the release: until the run's end (when they are
    /// written together, its records as one value), a checkpoint, or `close`. The log
    /// holds every commit they cover, so nothing is lost to a crash. Only while the
    /// entries number at most half of [`SledOptions::kept_summaries`], so the runs
    /// under way keep the other half (past the limit every commit writes its summary:
    /// with the whole room taken by released runs, a 100,000-run bench wrote 15.4 keys
    /// per run instead of 10.9); past it, a release writes them as without the log.
    /// Under the run's commit lock.
    fn keeps_released(&self, run: RunId) -> bool {
        if self.inner.wal.is_none() {
            return false;
        }
        let marks = lock(&self.inner.dirty);
        marks.len() <= self.inner.options.kept_summaries / 2
            && marks
                .get(&run)
                .is_some_and(|m| m.visible && m.summary.is_some() && !m.status.is_terminal())
    }

    /// Removes `run`'s mark, once its commits so far are whole, after writing the summary
    /// and the status key its commits left in memory. Under its commit lock.
    fn clear_dirty(&self, run: RunId) -> Result<()> {
        // With the log, commits logged since may wait to be written to sled: the entry
        // stays for them, with what sled now holds.
        if self.write_kept(run)? != Some(false) {
            return Ok(());
        }
        lock(&self.inner.dirty).remove(&run);
        if self.inner.wal.is_none() {
            self.inner.trees.dirty.remove(run.as_bytes())?;
        }
        Ok(())
    }

    /// Writes the summary and status key the entry of `run` keeps in memory (unless
    /// readers do not know the run yet) and notes that sled holds them. Under its
    /// commit lock. Returns whether logged commits still wait in the entry (`None`: no
    /// entry, or one not visible).
    fn write_kept(&self, run: RunId) -> Result<Option<bool>> {
        let Some((prior, status, summary)) = lock(&self.inner.dirty)
            .get(&run)
            .filter(|m| m.visible)
            .map(|m| (m.prior(), m.status, m.summary.clone()))
        else {
            return Ok(None);
        };
        self.store_held(run)?;
        write_marked(&Writer::new(self), run, prior, status, summary.as_deref())?;
        // The gates' entries go with the summary that names them open; written before
        // they leave memory, so a reader of `pending` finds each in one place or both.
        let gates = lock(&self.inner.dirty)
            .get(&run)
            .map(|m| m.gates.clone())
            .unwrap_or_default();
        write_gates(&self.inner.trees, &gates)?;
        let mut marks = lock(&self.inner.dirty);
        let Some(m) = marks.get_mut(&run) else {
            return Ok(Some(false));
        };
        m.stored = Some(status);
        m.summary = None;
        m.gates.clear();
        Ok(Some(!m.pending.is_empty()))
    }

    /// The summary the next commit of `run` builds on, if its entry keeps one: that of
    /// its last logged commit, else the one readers see.
    fn kept_for_commit(&self, run: RunId) -> Option<RunSummary> {
        let marks = lock(&self.inner.dirty);
        let marked = marks.get(&run)?;
        match marked.pending.back() {
            Some(logged) => Some(logged.summary.clone()),
            None => marked.summary.as_ref().map(|kept| kept.0.clone()),
        }
    }

    /// Appends a commit of its run (marked, under its commit lock) to the log and keeps it
    /// in the run's entry until [`SledStore::apply_logged`] writes it to sled. Returns
    /// the log's end after it: the commit is durable once the log is synced that far.
    fn log_commit(&self, wal: &Wal, mut logged: Logged) -> Result<Lsn> {
        let (run, to) = (logged.summary.id, logged.summary.next_seq);
        let payload = encode_logged(run, logged.commit_from, to, &logged.values, &logged.notes);
        let appended = {
            let mut unapplied = lock(&self.inner.unapplied);
            let appended = wal.append(&payload)?;
            unapplied.insert(appended.lsn.0);
            appended
        };
        logged.lsn = appended.lsn.0;
        logged.end = appended.end.0;
        if let Some((key, value)) = &logged.start {
            lock(&self.inner.starting).insert(key.clone(), value.clone());
        }
        let mut marks = lock(&self.inner.dirty);
        let marked = marks
            .get_mut(&run)
            .ok_or_else(|| Error::Storage(format!("run {run} has no entry for its logged commit")))?;
        marked.pending.push_back(logged);
        Ok(appended.end)
    }

    /// The end of a logged commit of `run`: waits for the log to sync it, writes it to
    /// sled, shows its notifications, wakes the watchers, and checkpoints if the log
    /// has grown enough. A failed sync leaves the commit's notifications hidden: the
    /// next open decides from the log whether the commit happened.
    async fn finish_logged(&self, wal: &Wal, end: Lsn, run: RunId, hidden: &[u64]) -> Result<()> {
        wal.wait(end).await?;
        crate::failpoint::hit("wal-before-apply");
        self.apply_logged(run)?;
        self.deliverable(hidden);
        self.bump();
        self.maybe_checkpoint();
        Ok(())
    }

    /// Before a conflict is answered: waits until the commits of `run` logged so far are
    /// written to sled, so that the caller, reading the run again to catch up, finds
    /// the commit it conflicted with (readers see a logged commit once it is written).
    async fn settle_logged(&self, run: RunId) -> Result<()> {
        let Some(wal) = &self.inner.wal else {
            return Ok(());
        };
        let end = lock(&self.inner.dirty)
            .get(&run)
            .and_then(|m| m.pending.back().map(|p| Lsn(p.end)));
        if let Some(end) = end {
            wal.wait(end).await?;
            self.apply_logged(run)?;
        }
        Ok(())
    }

    /// [`SledStore::apply_logged_locked`] under the run's commit lock.
    fn apply_logged(&self, run: RunId) -> Result<()> {
        let _run = self.run_lock(run);
        self.apply_logged_locked(run)
    }

    /// Writes to sled, in order, the logged commits of `run` the log has synced: their
    /// records, notifications and idempotency key, then (as a commit without the log
    /// does) the summary kept with the entry and the index changes. Under the run's
    /// commit lock. Whichever of a run's committers gets here first writes every synced
    /// one, so they reach sled in the order they were logged.
    fn apply_logged_locked(&self, run: RunId) -> Result<()> {
        let Some(wal) = &self.inner.wal else {
            return Ok(());
        };
        let durable = wal.durable().0;
        let trees = &self.inner.trees;
        loop {
            let next = {
                let mut marks = lock(&self.inner.dirty);
                match marks.get_mut(&run) {
                    Some(m) if m.pending.front().is_some_and(|p| p.end <= durable) => m.pending.pop_front(),
                    _ => None,
                }
            };
            let Some(logged) = next else { return Ok(()) };
            // The records are held with the entry, to be stored as one value with the
            // activation's others; before the summary, which readers read first.
            let mut held = Vec::new();
            for (seq, value) in logged.values {
                each_record(run, seq, &sled::IVec::from(value), |seq, record| {
                    held.push((seq, record))
                })?;
            }
            let full = match lock(&self.inner.dirty).get_mut(&run) {
                Some(m) => {
                    m.held.extend(held);
                    m.held.iter().map(|(_, r)| r.len()).sum::<usize>() >= HOLD_BYTES
                }
                None => {
                    return Err(Error::Storage(format!(
                        "run {run} has no entry for its logged commit"
                    )))
                }
            };
            if full {
                self.store_held(run)?;
            }
            crate::failpoint::hit_after("wal-apply-before-indexes", || {
                let _ = self.inner.db.flush();
            });
            for (key, value) in logged.notes {
                trees.outbox.insert(key, value)?;
            }
            if let Some((key, value)) = logged.start {
                trees.starts.insert(key.as_bytes(), value)?;
                lock(&self.inner.starting).remove(&key);
            }
            let w = Writer::commit(self);
            if let Some(m) = lock(&self.inner.dirty).get_mut(&run) {
                m.visible = true;
            }
            self.keep_summary(&w, &logged.summary, logged.commit_from)?;
            w.apply_changes(&logged.summary, logged.changes)?;
            lock(&self.inner.unapplied).remove(&logged.lsn);
            let rest = lock(&self.inner.dirty).get(&run).map_or(0, |m| m.pending.len());
            if rest == 0 && logged.summary.status.is_terminal() {
                // Nothing writes to an ended run again.
                self.clear_dirty(run)?;
            }
        }
    }

    /// A checkpoint, if the log has grown [`SledOptions::checkpoint_bytes`] since the
    /// last and none is running. Its failure is logged, not returned: the commit that
    /// called it is durable either way, and the log keeps what sled may lack.
    fn maybe_checkpoint(&self) {
        let Some(wal) = &self.inner.wal else { return };
        let mut last = match self.inner.checkpoint.try_lock() {
            Ok(last) => last,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if wal.end().0.saturating_sub(*last) < self.inner.options.checkpoint_bytes {
            return;
        }
        if let Err(e) = self.checkpoint_locked(wal, &mut last) {
            tracing::error!(error = %e, "checkpoint failed; the log keeps every commit since the last");
        }
    }

    /// Makes sled hold everything the log holds before some LSN, durably, and lets the
    /// log drop it (see the module docs). Nothing if the store has no log.
    pub fn checkpoint(&self) -> Result<()> {
        let Some(wal) = &self.inner.wal else {
            return Ok(());
        };
        let mut last = lock(&self.inner.checkpoint);
        self.checkpoint_locked(wal, &mut last)
    }

    fn checkpoint_locked(&self, wal: &Wal, last: &mut u64) -> Result<()> {
        // Every commit logged before `at` is in sled's memory: none is waiting to be
        // written (appends are made under the same lock).
        let at = {
            let unapplied = lock(&self.inner.unapplied);
            unapplied.first().copied().unwrap_or(wal.end().0)
        };
        // What runs' entries keep in memory goes to sled: their summaries and status
        // keys, then the wake-ups only memory holds. A commit after `at` may have
        // changed them already; the log replays it anyway.
        let runs: Vec<RunId> = lock(&self.inner.dirty).keys().copied().collect();
        for run in runs {
            let _run = self.run_lock(run);
            self.apply_logged_locked(run)?;
            // A run not under way (released, `keeps_released`, or not yet claimed) is
            // done with its entry, as a release without the log would be.
            if self.state().leases.contains_key(&run) {
                self.write_kept(run)?;
            } else {
                self.clear_dirty(run)?;
            }
        }
        store_wakes(&self.inner)?;
        crate::failpoint::hit("checkpoint-before-flush");
        // Written last and flushed with the rest: sled recovers a prefix of its log, so
        // a checkpoint it recovers comes with everything written before it.
        self.inner.trees.meta.insert(WAL_CHECKPOINT, &at.to_be_bytes())?;
        self.inner.db.flush()?;
        crate::failpoint::hit("checkpoint-before-remove");
        wal.remove_before(Lsn(at))?;
        *last = at;
        Ok(())
    }

    /// Writes to sled what every commit the log holds past the checkpoint stored: its
    /// records and its outbox entries (of every endpoint: [`SledStore::open_outboxes`],
    /// which runs next, drops those no longer named and seeds the queue ids past the
    /// rest). Returns each run's span, in the order the log first names them, for
    /// [`SledStore::redo_logged`].
    fn replay_logged(&self, logged: Vec<LoggedRecord>) -> Result<LoggedSpans> {
        let trees = &self.inner.trees;
        let mut spans = LoggedSpans {
            commits: logged.len(),
            ..LoggedSpans::default()
        };
        let mut index: HashMap<RunId, usize> = HashMap::new();
        for commit in logged {
            if !index.contains_key(&commit.run) {
                self.cut_before(commit.run, commit.from)?;
            }
            for (seq, value) in &commit.values {
                trees
                    .events
                    .insert(codec::record_key(commit.run, *seq), value.as_slice())?;
            }
            for (key, value) in &commit.notes {
                trees.outbox.insert(key.as_slice(), value.as_slice())?;
            }
            // A run's commits are logged in seq order: the last one logged ends its span.
            match index.get(&commit.run) {
                Some(&i) => (spans.runs[i].2, spans.runs[i].3) = (commit.from, commit.to),
                None => {
                    index.insert(commit.run, spans.runs.len());
                    spans.runs.push((commit.run, commit.from, commit.from, commit.to));
                }
            }
        }
        Ok(spans)
    }

    /// Cuts the stored value of `run` that began before `from` back to its records
    /// before `from`, if it reaches past. Records held with an entry are stored as one
    /// value when a checkpoint writes the entry, and a commit logged past the
    /// checkpoint's LSN may be among them; the replay stores that commit again under its
    /// own key, where a reader would find its records twice.
    fn cut_before(&self, run: RunId, from: Seq) -> Result<()> {
        let Some((key, value)) = self.value_holding(run, from)? else {
            return Ok(());
        };
        let at = seq_of_key(run, &key)?;
        if at >= from {
            return Ok(());
        }
        let mut kept = Vec::new();
        let mut past = false;
        each_record(run, at, &value, |seq, record| {
            if seq < from {
                kept.push(record);
            } else {
                past = true;
            }
        })?;
        if past {
            self.inner.trees.events.insert(key, codec::pack_all(&kept))?;
        }
        Ok(())
    }

    /// For each run the log named past the checkpoint ([`SledStore::replay_logged`]):
    /// its summary and index changes derived again from its journal (as `finish_intent`
    /// does for one commit), its status key, and a wake-up at once. A run whose journal
    /// does not verify is parked.
    fn redo_logged(&self, spans: LoggedSpans) -> Result<()> {
        if spans.runs.is_empty() {
            return Ok(());
        }
        let mut damaged = 0usize;
        for &(run, from, last_from, to) in &spans.runs {
            if let Err(e) = self.redo_run(run, from, last_from, to) {
                damaged += 1;
                let reason = format!("journal damaged, found when replaying the write-ahead log: {e}");
                tracing::error!(%run, "{reason}");
                if let Some(bytes) = self.inner.trees.runs.get(run.as_bytes())? {
                    self.write_parked(decode_summary(run, &bytes)?, &reason)?;
                }
            }
        }
        tracing::info!(
            commits = spans.commits,
            runs = spans.runs.len(),
            damaged,
            "replayed the write-ahead log past the last checkpoint"
        );
        Ok(())
    }

    /// Parks `summary`'s run for an operator: the summary written parked, with its
    /// status key, and the run taken off the ready queue.
    fn write_parked(&self, mut summary: RunSummary, reason: &str) -> Result<()> {
        park(&mut summary, reason);
        let w = Writer::new(self);
        w.put_summary(&summary, Prior::Unknown, summary.next_seq)?;
        w.unschedule(summary.id)
    }

    /// Derives the summary and index changes of `run`'s commits from `from` to `to`
    /// again from its journal and writes them, with its status key and a wake-up.
    fn redo_run(&self, run: RunId, from: Seq, last_from: Seq, to: Seq) -> Result<()> {
        let old = match from {
            Seq::ZERO => None,
            _ => Some(self.summary_upto(run, from)?),
        };
        let records = self.contiguous_records(run, from, Some(to))?;
        let head = old.as_ref().map_or(ChainHash::GENESIS, |s| s.head);
        let (events, bad) = decode_from(run, from, head, &records);
        if let Some(e) = bad {
            return Err(e);
        }
        if (events.len() as u64) < to.0 - from.0 {
            return Err(Error::Corrupt {
                run,
                seq: Seq(from.0 + events.len() as u64),
                reason: "a logged event is missing".into(),
            });
        }
        // Their notifications came back from the log with their queue ids.
        self.rederive(run, old, &events, &records, Requeue::No, None, last_from)?;
        self.make_ready_at_once(run)
    }

    /// Writes again what the events `events` (the run's from `old` on, decoded from
    /// `records`) derive, for commits recovery finishes: a creation's idempotency key
    /// (with no `old`), the summary of commits whose last began at `commit_from` (parked
    /// with `stuck`, and then off the ready queue), its status key, and the index
    /// changes, their notifications only with [`Requeue::Yes`].
    #[allow(clippy::too_many_arguments)]
    fn rederive(
        &self,
        run: RunId,
        old: Option<RunSummary>,
        events: &[(Event, ChainHash)],
        records: &[sled::IVec],
        requeue: Requeue,
        stuck: Option<&str>,
        commit_from: Seq,
    ) -> Result<()> {
        if let (None, Some((first, _))) = (&old, events.first()) {
            let new = new_run_from(first)?;
            if let Some(key) = &new.idempotency_key {
                let mut v = run.as_bytes().to_vec();
                v.extend_from_slice(&new.request_hash()?);
                self.inner.trees.starts.insert(key.as_bytes(), v)?;
            }
        }
        let Some((mut summary, mut changes)) = fold_records(old, events, records)? else {
            return Ok(());
        };
        if let Requeue::No = requeue {
            changes.retain(|c| !matches!(c, IndexChange::Notify(_)));
        }
        if let Some(reason) = stuck {
            park(&mut summary, reason);
        }
        let w = Writer::new(self);
        w.put_summary(&summary, Prior::Unknown, commit_from)?;
        w.apply_changes(&summary, changes)?;
        if stuck.is_some() {
            w.unschedule(run)?;
        }
        Ok(())
    }

    /// A run's stored events below `upto` (all of them with `None`), each verified from
    /// the first, with the records they were decoded from.
    fn journal_prefix(&self, run: RunId, upto: Option<Seq>) -> Result<VerifiedPrefix> {
        let records = self.contiguous_records(run, Seq::ZERO, upto)?;
        let found = records.len() as u64;
        if upto.is_some_and(|upto| found < upto.0) {
            return Err(Error::Corrupt {
                run,
                seq: Seq(found),
                reason: "event is missing".into(),
            });
        }
        let (events, bad) = decode_from(run, Seq::ZERO, ChainHash::GENESIS, &records);
        if let Some(e) = bad {
            return Err(e);
        }
        Ok((events, records))
    }

    /// The summary of a run's first `upto` events, as stored: their fold, parked as the
    /// stored summary is (see [`Before::Journal`]).
    fn summary_upto(&self, run: RunId, upto: Seq) -> Result<RunSummary> {
        let (events, records) = self.journal_prefix(run, Some(upto))?;
        let (mut summary, _) = fold_records(None, &events, &records)?.ok_or(Error::Corrupt {
            run,
            seq: Seq::ZERO,
            reason: "an unfinished commit follows a run with no events".into(),
        })?;
        if let Some(stored) = self.inner.trees.runs.get(run.as_bytes())? {
            if let Some(reason) = decode_summary(run, &stored)?.stuck {
                park(&mut summary, &reason);
            }
        }
        Ok(summary)
    }

    /// Finishes or undoes the commit `intent` describes (the caller removes the intent
    /// or mark that named it).
    fn finish_intent(&self, run: RunId, intent: Intent, requeue: Requeue) -> Result<Finished> {
        let trees = &self.inner.trees;
        let old = match &intent.old {
            Before::Created => None,
            Before::Stored(bytes) => Some(decode_summary(run, bytes)?),
            Before::Journal(upto) => Some(self.summary_upto(run, *upto)?),
        };
        let from = old.as_ref().map_or(Seq::ZERO, |s| s.next_seq);
        let records = self.contiguous_records(run, from, Some(intent.target))?;
        // Decoded again (their hashes chain from the old head); a record that does not
        // decode counts as missing.
        let head = old.as_ref().map_or(ChainHash::GENESIS, |s| s.head);
        let (events, bad) = decode_from(run, from, head, &records);
        if let Some(e) = bad {
            tracing::error!(%run, error = %e, "an unacknowledged commit does not decode");
        }
        let w = Writer::new(self);
        if (events.len() as u64) < intent.target.0 - from.0 {
            // Cut before its last event: nothing after the events was written. Undo
            // (a commit's records, packed or not, are stored under its seqs).
            let keys = trees
                .events
                .range(codec::record_key(run, from)..codec::record_key(run, intent.target))
                .keys();
            for key in keys {
                trees.events.remove(key?)?;
            }
            match &old {
                Some(old) => {
                    w.put_summary(old, Prior::Unknown, old.next_seq)?;
                }
                None => {
                    trees.runs.remove(run.as_bytes())?;
                    for st in RunStatus::ALL {
                        trees.by_status.remove(status_key(st, run))?;
                    }
                }
            }
            return Ok(Finished::Undone);
        }
        // Complete: derive the summary and the index changes again and write them.
        self.rederive(
            run,
            old,
            &events,
            &records,
            requeue,
            intent.stuck.as_deref(),
            from,
        )?;
        Ok(Finished::Done)
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
        lock(&self.inner.outbox_ids).next = next;
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "dropped queued notifications of webhook endpoints no longer configured"
            );
        }
        Ok(())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    /// The lock serializing commits to `run`.
    fn run_lock(&self, run: RunId) -> MutexGuard<'_, ()> {
        // v7 ids end in random bits.
        lock(&self.inner.stripes[usize::from(run.as_bytes()[15]) % STRIPES])
    }

    /// The lock serializing creations with this idempotency key.
    fn key_lock(&self, key: &str) -> MutexGuard<'_, ()> {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let h = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(key);
        lock(&self.inner.stripes[(h % STRIPES as u64) as usize])
    }

    fn bump(&self) {
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The run's latest summary (kept by its mark, or stored), without its wake-up (see
    /// [`SledStore::with_wake`]).
    fn summary_now(&self, run: RunId) -> Result<Option<RunSummary>> {
        if let Some(kept) = self.kept_summary(run) {
            return Ok(Some(kept));
        }
        match self.inner.trees.runs.get(run.as_bytes())? {
            None => Ok(None),
            Some(v) => decode_summary(run, &v).map(Some),
        }
    }

    /// Fills in the summaries' wake-ups: the ready queue is the one record of them.
    fn with_wake(&self, mut summaries: Vec<RunSummary>) -> Vec<RunSummary> {
        let st = self.state();
        for s in &mut summaries {
            s.wake_at = st
                .wake
                .get(&s.id)
                .and_then(|w| Utc.timestamp_millis_opt(w.ms as i64).single());
        }
        summaries
    }

    /// Every index entry of every run agrees with the run's journal: its summary is the
    /// journal's fold, its status key is there and no other (for a marked run, the key its
    /// mark noted: see [`Marked`]), its open gates are the
    /// `pending` entries, and no commit is left unfinished. Returns what disagrees (an
    /// empty list when all is well). For offline checks and crash tests.
    pub fn check_indexes(&self) -> Result<Vec<String>> {
        let trees = &self.inner.trees;
        let mut problems = Vec::new();
        for item in trees.intents.iter().keys() {
            let key = item?;
            problems.push(format!("unfinished commit for {:?}", run_from_key(&key)));
        }
        let marked = lock(&self.inner.dirty).clone();
        let mut gates = 0usize;
        for run in self.run_ids() {
            let run = run?;
            let stored = match marked.get(&run).and_then(|m| m.summary.as_ref()) {
                Some(kept) => kept.0.clone(),
                None => match trees.runs.get(run.as_bytes())? {
                    Some(v) => decode_summary(run, &v)?,
                    None => {
                        problems.push(format!("run {run} has no summary"));
                        continue;
                    }
                },
            };
            let (events, records) = self.journal_prefix(run, None)?;
            let Some((mut derived, _)) = fold_records(None, &events, &records)? else {
                problems.push(format!("run {run} has a summary and no events"));
                continue;
            };
            if let Some(reason) = &stored.stuck {
                park(&mut derived, reason);
            }
            derived.wake_at = stored.wake_at;
            if derived != stored {
                problems.push(format!(
                    "run {run}: summary {stored:?} is not its journal's {derived:?}"
                ));
            }
            // A marked run's key is the one its mark noted (written when the mark goes).
            let key = match marked.get(&run) {
                Some(m) if m.status != stored.status => {
                    problems.push(format!("run {run}: marked {m:?}, summary {:?}", stored.status));
                    m.stored
                }
                Some(m) => m.stored,
                None => Some(stored.status),
            };
            for st in RunStatus::ALL {
                let present = trees.by_status.contains_key(status_key(st, run))?;
                if present != (Some(st) == key) {
                    problems.push(format!("run {run}: status key {st:?} present={present}"));
                }
            }
            let kept: &[PendingGate] = marked.get(&run).map_or(&[], |m| &m.gates);
            for gate in &derived.open_gates {
                gates += 1;
                let stored = trees.pending.contains_key(gate_key(run, *gate))?;
                let in_memory = kept.iter().any(|g| g.gate == *gate);
                if stored == in_memory {
                    problems.push(format!(
                        "run {run}: open gate {gate} is pending in sled: {stored}, in memory: {in_memory}"
                    ));
                }
            }
            for entry in kept {
                if !derived.open_gates.contains(&entry.gate) {
                    problems.push(format!(
                        "run {run}: gate {} is kept pending but not open",
                        entry.gate
                    ));
                }
            }
        }
        let pending = trees.pending.len() + marked.values().map(|m| m.gates.len()).sum::<usize>();
        if pending != gates {
            problems.push(format!("{pending} pending entries for {gates} open gates"));
        }
        Ok(problems)
    }
}

/// Two ascending streams of run ids merged into one, each id once.
struct MergedRunIds<S: Iterator<Item = Result<RunId>>> {
    stored: std::iter::Peekable<S>,
    kept: std::iter::Peekable<std::vec::IntoIter<RunId>>,
}

impl<S: Iterator<Item = Result<RunId>>> Iterator for MergedRunIds<S> {
    type Item = Result<RunId>;

    fn next(&mut self) -> Option<Result<RunId>> {
        let kept = self.kept.peek().copied();
        match (self.stored.peek(), kept) {
            (Some(Ok(stored)), Some(kept)) if kept < *stored => self.kept.next().map(Ok),
            (Some(Ok(stored)), Some(kept)) => {
                if kept == *stored {
                    self.kept.next();
                }
                self.stored.next()
            }
            (Some(Err(_)), _) | (Some(Ok(_)), None) => self.stored.next(),
            (None, _) => self.kept.next().map(Ok),
        }
    }
}

/// Parks a summary as `mark_stuck` does.
fn park(summary: &mut RunSummary, reason: &str) {
    summary.stuck = Some(reason.to_string());
    if !summary.status.is_terminal() {
        summary.status = RunStatus::Stuck;
    }
}

/// Folds a run's decoded events (and the records they came from, for the byte count)
/// into `base`, or, without one, into the summary their first event starts. Returns the
/// summary and the index changes, or `None` for no events and no base.
fn fold_records(
    base: Option<RunSummary>,
    events: &[(Event, ChainHash)],
    records: &[sled::IVec],
) -> Result<Option<(RunSummary, Vec<IndexChange>)>> {
    let mut summary = match (base, events.first()) {
        (Some(s), _) => s,
        (None, Some((first, _))) => RunSummary::start(&new_run_from(first)?),
        (None, None) => return Ok(None),
    };
    let mut changes = Vec::new();
    for ((event, head), record) in events.iter().zip(records) {
        summary.bytes += record.len() as u64;
        changes.extend(summary.apply(event, *head));
    }
    Ok(Some((summary, changes)))
}

/// The [`NewRun`] a run's first event records.
fn new_run_from(event: &Event) -> Result<NewRun> {
    match &event.event {
        EventKind::RunStarted {
            workflow,
            version,
            input,
            idempotency_key,
            started_by,
        } => Ok(NewRun {
            id: event.run,
            started_by: started_by.clone(),
            workflow: workflow.clone(),
            version: *version,
            input: input.clone(),
            idempotency_key: idempotency_key.clone(),
            at: event.at,
        }),
        other => Err(Error::Corrupt {
            run: event.run,
            seq: Seq::ZERO,
            reason: format!("the first event is {other:?}, not run-started"),
        }),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What `by_status` held for a run before a write.
#[derive(Clone, Copy)]
enum Prior {
    /// The run did not exist: no status key.
    Nothing,
    /// Not known (recovery): clear every other status.
    Unknown,
    /// The key of this status.
    Was(RunStatus),
}

/// Index maintenance shared by commits (under their run's lock) and recovery.
struct Writer<'a> {
    trees: &'a Trees,
    state: &'a Mutex<State>,
    endpoints: &'a [String],
    outbox_ids: &'a Mutex<OutboxIds>,
    /// How the wake-ups it sets survive a crash.
    wakes: Durability,
    /// With the log, for a commit: the runs' entries, which keep the pending entries of
    /// the gates their commits open ([`Marked::gates`]); `None` writes them to sled.
    kept: Option<&'a Mutex<HashMap<RunId, Marked>>>,
}

impl<'a> Writer<'a> {
    /// For recovery and tests: wake-ups go to the `ready` tree.
    fn new(store: &'a SledStore) -> Writer<'a> {
        Writer::of(&store.inner)
    }

    /// [`Writer::new`] for the store's insides (`close` has them alone).
    fn of(inner: &'a Inner) -> Writer<'a> {
        Writer {
            trees: &inner.trees,
            state: &inner.state,
            endpoints: &inner.options.outbox_endpoints,
            outbox_ids: &inner.outbox_ids,
            wakes: Durability::Stored,
            kept: None,
        }
    }

    /// For a commit, whose run is marked dirty before its first write: wake-ups stay in
    /// memory, covered by the mark.
    fn commit(store: &'a SledStore) -> Writer<'a> {
        Writer {
            wakes: Durability::Covered,
            kept: store.inner.wal.as_ref().map(|_| &store.inner.dirty),
            ..Writer::new(store)
        }
    }

    /// With the log, keeps `gate`'s pending entry with its run's entry instead of in
    /// `pending` (`None`); hands it back to be written otherwise.
    fn keep_gate(&self, run: RunId, gate: Box<PendingGate>) -> Option<Box<PendingGate>> {
        let Some(kept) = self.kept else {
            return Some(gate);
        };
        let mut marks = lock(kept);
        let Some(marked) = marks.get_mut(&run).filter(|m| m.visible) else {
            return Some(gate);
        };
        let at = marked.gates.partition_point(|g| g.gate < gate.gate);
        marked.gates.insert(at, *gate);
        None
    }

    /// The pending entry of `run`'s `gate`, taken out of its run's entry if kept there.
    fn take_kept_gate(&self, run: RunId, gate: GateId) -> Option<PendingGate> {
        let mut marks = lock(self.kept?);
        let marked = marks.get_mut(&run)?;
        let at = marked.gate_index(gate)?;
        Some(marked.gates.remove(at))
    }

    /// Applies `change` to the pending entry of `run`'s `gate` if its run's entry keeps
    /// it; whether it did.
    fn change_kept_gate(&self, run: RunId, gate: GateId, change: &GateChange) -> bool {
        let Some(kept) = self.kept else { return false };
        let mut marks = lock(kept);
        let Some(marked) = marks.get_mut(&run) else {
            return false;
        };
        let Some(at) = marked.gate_index(gate) else {
            return false;
        };
        marked.gates[at].change(change);
        true
    }

    /// The action of `run`'s `gate` if its run's entry keeps the gate's pending entry.
    fn kept_action(&self, run: RunId, gate: GateId) -> Option<String> {
        let marks = lock(self.kept?);
        let marked = marks.get(&run)?;
        Some(marked.gates[marked.gate_index(gate)?].action.clone())
    }

    /// Keeps `by_status` in step with the summary.
    /// The new key is written before the old one is removed, so a crash between the two
    /// leaves the run under both (recovery writes its key again), never under neither.
    fn put_status(&self, run: RunId, status: RunStatus, prior: Prior) -> Result<()> {
        let by_status = &self.trees.by_status;
        match prior {
            Prior::Was(old) if old == status => {}
            Prior::Was(old) => {
                by_status.insert(status_key(status, run), &[])?;
                by_status.remove(status_key(old, run))?;
            }
            Prior::Nothing => {
                by_status.insert(status_key(status, run), &[])?;
            }
            Prior::Unknown => {
                // Status unknown to the caller: clear every other status key.
                by_status.insert(status_key(status, run), &[])?;
                for st in RunStatus::ALL {
                    if st != status {
                        by_status.remove(status_key(st, run))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the summary (its wake-up lives in the ready queue) and its status key, for
    /// a commit whose events began at `commit_from`.
    fn put_summary(&self, summary: &RunSummary, prior: Prior, commit_from: Seq) -> Result<()> {
        self.put_summary_only(summary, commit_from)?;
        self.put_status(summary.id, summary.status, prior)
    }

    /// Writes the summary without its status key: a commit's, whose run is marked (the
    /// key is written when the mark goes, [`SledStore::clear_dirty`]).
    fn put_summary_only(&self, summary: &RunSummary, commit_from: Seq) -> Result<()> {
        let bytes = crate::stored_summary::encode(summary, false, commit_from)?;
        self.trees.runs.insert(summary.id.as_bytes(), bytes)?;
        Ok(())
    }

    /// Makes the run ready at `at` (or earlier, if it already was): into the ready queue,
    /// or, while a worker holds it, onto the lease to be queued at release.
    fn schedule(&self, run: RunId, at: DateTime<Utc>) -> Result<()> {
        let mut st = lock(self.state);
        if let Some(lease) = st.leases.get_mut(&run) {
            lease.rewake_at = Some(lease.rewake_at.map_or(at, |r| r.min(at)));
            return Ok(());
        }
        set_wake(&mut st, self.trees, run, Some(ms(at)), self.wakes)
    }

    /// Takes the run off the ready queue, whoever holds it.
    fn unschedule(&self, run: RunId) -> Result<()> {
        set_wake(&mut lock(self.state), self.trees, run, None, self.wakes)
    }

    /// Queues the notifications among a commit's `changes` in every endpoint's outbox and
    /// takes them out of `changes`. An append calls this before its last record, which
    /// ends the commit, and a creation before its summary, so that (sled recovering a
    /// prefix of its log) a whole commit has its notifications queued, and recovery
    /// never queues them a second time; those of a commit cut before its end are
    /// dropped ([`SledStore::drop_notifications`]). Returns their queue ids, hidden from
    /// [`Store::outbox`] until the commit is durable and the caller passes them to
    /// [`SledStore::deliverable`].
    fn queue_notifications(&self, run: RunId, changes: &mut Vec<IndexChange>) -> Result<Vec<u64>> {
        self.notifications(run, changes, None)
    }

    /// [`Writer::queue_notifications`], but the outbox entries go to `notes` instead of
    /// sled (a logged commit writes them once the log has synced it).
    fn notifications(
        &self,
        run: RunId,
        changes: &mut Vec<IndexChange>,
        mut notes: Option<&mut Vec<(Vec<u8>, Vec<u8>)>>,
    ) -> Result<Vec<u64>> {
        let mut hidden = Vec::new();
        if !changes.iter().any(|c| matches!(c, IndexChange::Notify(_))) {
            return Ok(hidden);
        }
        let all = std::mem::take(changes);
        for change in all {
            match change {
                IndexChange::Notify(n) => {
                    self.queue(run, n, changes, Some(&mut hidden), notes.as_deref_mut())?
                }
                other => changes.push(other),
            }
        }
        Ok(hidden)
    }

    /// Queues one notification; `earlier` are the commit's changes before it, whose
    /// opened gates are not in `pending` yet. With `hidden`, its ids are kept from
    /// readers (and pushed there) until released; recovery queues without, as the
    /// events it reports are already on disk.
    fn queue(
        &self,
        run: RunId,
        mut n: Box<Notification>,
        earlier: &[IndexChange],
        mut hidden: Option<&mut Vec<u64>>,
        mut notes: Option<&mut Vec<(Vec<u8>, Vec<u8>)>>,
    ) -> Result<()> {
        if self.endpoints.is_empty() {
            return Ok(());
        }
        if n.action.is_none() {
            // Decided or escalated: the gate is open, in `pending` or opened by this commit.
            n.action = earlier.iter().rev().find_map(|c| match c {
                IndexChange::GateOpened(g) if g.gate == n.gate => Some(g.action.clone()),
                _ => None,
            });
            if n.action.is_none() {
                n.action = self.kept_action(run, n.gate);
            }
            if n.action.is_none() {
                if let Some(bytes) = self.trees.pending.get(gate_key(run, n.gate))? {
                    n.action = serde_json::from_slice::<PendingGate>(&bytes)
                        .ok()
                        .map(|g| g.action);
                }
            }
        }
        let value = serde_json::to_vec(&n)?;
        for endpoint in self.endpoints {
            // Ids only grow, so each queue keeps a run's notifications in the order its
            // events were written. Hidden in the same step as taken, before the entry
            // is written, so no reader sees it early.
            let id = {
                let mut ids = lock(self.outbox_ids);
                let id = ids.next;
                ids.next += 1;
                if let Some(hidden) = hidden.as_deref_mut() {
                    ids.unsynced.insert(id);
                    hidden.push(id);
                }
                id
            };
            match notes.as_deref_mut() {
                Some(notes) => notes.push((outbox_key(endpoint, id), value.clone())),
                None => {
                    self.trees
                        .outbox
                        .insert(outbox_key(endpoint, id), value.clone())?;
                }
            }
        }
        Ok(())
    }

    /// Writes a commit's index changes. Notifications still among them (recovery of an
    /// intent written by an earlier version, which queued them after the summary) are
    /// queued here.
    fn apply_changes(&self, summary: &RunSummary, changes: Vec<IndexChange>) -> Result<()> {
        let t = self.trees;
        let run = summary.id;
        // The gate whose entry a decision took out already (it is closed after it).
        let mut removed = None;
        for change in changes {
            match change {
                IndexChange::Notify(n) => self.queue(run, n, &[], None, None)?,
                IndexChange::GateOpened(gate) => {
                    if let Some(gate) = self.keep_gate(run, gate) {
                        t.pending
                            .insert(gate_key(gate.run, gate.gate), serde_json::to_vec(&*gate)?)?;
                    }
                }
                IndexChange::GateClosed(gate) if removed == Some(gate) => {}
                IndexChange::GateClosed(gate) => {
                    if self.take_kept_gate(run, gate).is_none() {
                        t.pending.remove(gate_key(run, gate))?;
                    }
                }
                // A parked run waits for an operator, whatever arrives (a decision, say):
                // it never goes back on the ready queue (PostgreSQL's claim filters it).
                IndexChange::Wake(at) if summary.stuck.is_none() => self.schedule(run, at)?,
                IndexChange::Wake(_) => {}
                IndexChange::Ended => self.unschedule(run)?,
                IndexChange::DeadlineSet { gate, at, old } => {
                    t.deadlines.insert(deadline_key(at, run, gate), &[])?;
                    if let Some(old) = old {
                        if old != at {
                            t.deadlines.remove(deadline_key(old, run, gate))?;
                        }
                    }
                }
                IndexChange::Decided { gate, kind, by, at } => {
                    // The gate is closed after this change, in the same commit: its
                    // entry is taken out here, where its rule is read from it.
                    removed = Some(gate);
                    let rule = match self.take_kept_gate(run, gate) {
                        Some(entry) => entry.rule,
                        None => t
                            .pending
                            .remove(gate_key(run, gate))?
                            .and_then(|bytes| rule_of(&bytes)),
                    };
                    if let Some(rule) = rule {
                        let entry = RuleDecision {
                            auto: false,
                            kind,
                            by,
                            at,
                            run,
                            gate,
                        };
                        t.rule_decisions
                            .insert(rule_key(rule, at, run, gate), serde_json::to_vec(&entry)?)?;
                    }
                }
                IndexChange::TrustedAllow { rule, position, at } => {
                    let gate = GateId(position.0);
                    let entry = RuleDecision {
                        auto: true,
                        kind: crate::event::DecisionKind::Approve,
                        by: crate::ids::Principal::system(),
                        at,
                        run,
                        gate,
                    };
                    t.rule_decisions
                        .insert(rule_key(rule, at, run, gate), serde_json::to_vec(&entry)?)?;
                }
                IndexChange::DeadlineCleared { gate, at } => {
                    t.deadlines.remove(deadline_key(at, run, gate))?;
                }
                IndexChange::GateChanged(gate, change) => {
                    let key = gate_key(run, gate);
                    if self.change_kept_gate(run, gate, &change) {
                        continue;
                    }
                    if let Some(bytes) = t.pending.get(key)? {
                        let mut entry: PendingGate = serde_json::from_slice(&bytes).map_err(|e| {
                            Error::Storage(format!("pending entry of run {run} does not decode: {e}"))
                        })?;
                        entry.change(&change);
                        t.pending.insert(key, serde_json::to_vec(&entry)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Writes what a marked run's commits left in memory: its summary, then its status key
/// moved to the summary's status (the run is still marked meanwhile, so after a crash
/// the open writes both again).
fn write_marked(
    w: &Writer<'_>,
    run: RunId,
    prior: Prior,
    status: RunStatus,
    summary: Option<&(RunSummary, Seq)>,
) -> Result<()> {
    if let Some(kept) = summary {
        w.put_summary_only(&kept.0, kept.1)?;
    }
    w.put_status(run, status, prior)
}

/// The rule a stored pending entry names, read without building the rest of it
/// (arguments, context).
fn rule_of(entry: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct RuleOf {
        #[serde(default)]
        rule: Option<String>,
    }
    serde_json::from_slice::<RuleOf>(entry).ok().and_then(|g| g.rule)
}

/// Writes the pending entries a run's entry kept ([`Marked::gates`]) to `pending`.
fn write_gates(trees: &Trees, gates: &[PendingGate]) -> Result<()> {
    for gate in gates {
        trees
            .pending
            .insert(gate_key(gate.run, gate.gate), serde_json::to_vec(gate)?)?;
    }
    Ok(())
}

/// The events of `records` (the run's from `from` on), decoded and chained from the
/// hash `prev`, up to the first that does not decode, with its error.
fn decode_from(
    run: RunId,
    from: Seq,
    mut prev: ChainHash,
    records: &[sled::IVec],
) -> (Vec<(Event, ChainHash)>, Option<Error>) {
    let mut events = Vec::with_capacity(records.len());
    for (i, record) in records.iter().enumerate() {
        match codec::decode(run, Seq(from.0 + i as u64), record, &prev) {
            Ok((event, head)) => {
                prev = head;
                events.push((event, head));
            }
            Err(e) => return (events, Some(e)),
        }
    }
    (events, None)
}

/// Writes to the `ready` tree every wake-up only memory holds (those a run's entry
/// covered), before what covered them goes: a close, or a checkpoint.
fn store_wakes(inner: &Inner) -> Result<()> {
    let mut st = lock(&inner.state);
    for (run, wake) in st.wake.iter_mut().filter(|(_, w)| !w.stored) {
        inner.trees.ready.insert(ready_key(wake.ms, *run), &[])?;
        wake.stored = true;
    }
    Ok(())
}

/// Sets the run's one wake-up (earlier or later than before), or removes it. With
/// [`Durability::Stored`] the `ready` tree gets it; with `Covered` it stays in memory,
/// and a stored one it replaces is removed from the tree. A new entry is written before
/// the old one is removed, so a crash between the two leaves both (`load_ready` keeps
/// the earlier), never neither.
fn set_wake(
    st: &mut State,
    trees: &Trees,
    run: RunId,
    at: Option<u64>,
    durability: Durability,
) -> Result<()> {
    let old = st.wake.get(&run).copied();
    if let Some(ms) = at {
        // An entry already stored at the same due time stays as it is.
        let already_stored = old.is_some_and(|o| o.ms == ms && o.stored);
        let stored = already_stored || durability == Durability::Stored;
        if stored && !already_stored {
            trees.ready.insert(ready_key(ms, run), &[])?;
        }
        st.wake.insert(run, Wake { ms, stored });
        if !st.leases.contains_key(&run) {
            st.ready.insert((ms, run));
        }
    } else {
        st.wake.remove(&run);
    }
    if let Some(old) = old.filter(|o| Some(o.ms) != at) {
        if old.stored {
            trees.ready.remove(ready_key(old.ms, run))?;
        }
        st.ready.remove(&(old.ms, run));
    }
    Ok(())
}

fn rule_key(rule: String, at: DateTime<Utc>, run: RunId, gate: GateId) -> Vec<u8> {
    let mut key = rule.into_bytes();
    key.push(0);
    key.extend_from_slice(&ms(at).to_be_bytes());
    key.extend_from_slice(&gate_key(run, gate));
    key
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

fn ready_key(ms: u64, run: RunId) -> [u8; 24] {
    let mut k = [0; 24];
    k[..8].copy_from_slice(&ms.to_be_bytes());
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

/// Hands `f` each record of the value stored under (`run`, `at`) with its seq: the value
/// itself when it is one record (no allocation), else each of its packed commit's.
fn each_record(run: RunId, at: Seq, value: &sled::IVec, mut f: impl FnMut(Seq, sled::IVec)) -> Result<()> {
    if value.first() != Some(&codec::RECORD_FORMAT_PACKED) {
        f(at, value.clone());
        return Ok(());
    }
    for (seq, range) in codec::unpack(run, at, value)? {
        f(seq, value.subslice(range.start, range.len()));
    }
    Ok(())
}

/// The seq of a record key of `run` (as the `events` tree holds them).
fn seq_of_key(run: RunId, key: &[u8]) -> Result<Seq> {
    key.get(16..24)
        .filter(|_| key.len() == 24 && key.get(..16) == Some(run.as_bytes().as_slice()))
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(|b| Seq(u64::from_be_bytes(b)))
        .ok_or_else(|| Error::Corrupt {
            run,
            seq: Seq::ZERO,
            reason: "malformed event key".into(),
        })
}

fn run_from_key(k: &[u8]) -> Option<RunId> {
    let b: [u8; 16] = k.get(..16)?.try_into().ok()?;
    Some(RunId::from_bytes(b))
}

fn outbox_key(endpoint: &str, id: u64) -> Vec<u8> {
    let mut k = endpoint.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn lease_ttl(now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(60))
}

impl Store for SledStore {
    async fn create_run(&self, run: NewRun) -> Result<Created> {
        let event = run.first_event();
        let (mut record, head) =
            codec::encode(&event, &ChainHash::GENESIS, self.inner.options.max_event_bytes)?;
        codec::end_commit(run.id, Seq::ZERO, &mut record);
        let hash = run.request_hash()?;
        let trees = &self.inner.trees;
        let mut hidden = Vec::new();
        let mut logged_end = None;
        let created = 'created: {
            let _key = run.idempotency_key.as_deref().map(|k| self.key_lock(k));
            let existing = match &run.idempotency_key {
                Some(key) => match lock(&self.inner.starting)
                    .get(key)
                    .map(|v| sled::IVec::from(v.as_slice()))
                    .map_or_else(|| trees.starts.get(key.as_bytes()), |v| Ok(Some(v)))?
                {
                    Some(existing) => {
                        let existing_run = run_from_key(&existing)
                            .ok_or_else(|| Error::Storage("malformed starts entry".into()))?;
                        if existing.get(16..) != Some(&hash[..]) {
                            return Err(Error::StartConflict {
                                key: key.clone(),
                                existing: existing_run,
                            });
                        }
                        Some(existing_run)
                    }
                    None => None,
                },
                None => None,
            };
            match existing {
                Some(existing) => Created::Existing(existing),
                None => {
                    if lock(&self.inner.dirty).contains_key(&run.id)
                        || trees.runs.contains_key(run.id.as_bytes())?
                    {
                        return Err(Error::Storage(format!("run {} already exists", run.id)));
                    }
                    let mut summary = RunSummary::start(&run);
                    summary.bytes = record.len() as u64;
                    let mut changes = summary.apply(&event, head);
                    self.mark_dirty(run.id, None, summary.status)?;
                    let w = Writer::commit(self);
                    if let Some(wal) = &self.inner.wal {
                        // Logged now, written to sled once the log has synced it.
                        let mut notes = Vec::new();
                        hidden = w.notifications(run.id, &mut changes, Some(&mut notes))?;
                        let start = run.idempotency_key.as_ref().map(|key| {
                            let mut v = run.id.as_bytes().to_vec();
                            v.extend_from_slice(&hash);
                            (key.clone(), v)
                        });
                        let logged = Logged {
                            lsn: 0,
                            end: 0,
                            values: vec![(Seq::ZERO, record)],
                            notes,
                            start,
                            summary,
                            commit_from: Seq::ZERO,
                            changes,
                        };
                        logged_end = Some(self.log_commit(wal, logged)?);
                        break 'created Created::New(run.id);
                    }
                    hidden = w.queue_notifications(run.id, &mut changes)?;
                    crate::failpoint::hit_after("create-before-record", || {
                        let _ = self.inner.db.flush();
                    });
                    // Its record, which ends its commit, is the creation's commit point
                    // (the open finishes a marked run whose `run-started` is there and
                    // undoes one whose is not). Its summary stays with the mark, as a
                    // commit's does, and its status key is written when the mark goes.
                    trees
                        .events
                        .insert(codec::record_key(run.id, Seq::ZERO), record)?;
                    self.keep_summary(&w, &summary, Seq::ZERO)?;
                    crate::failpoint::hit_after("create-before-indexes", || {
                        let _ = self.inner.db.flush();
                    });
                    if let Some(key) = &run.idempotency_key {
                        let mut v = run.id.as_bytes().to_vec();
                        v.extend_from_slice(&hash);
                        trees.starts.insert(key.as_bytes(), v)?;
                    }
                    w.apply_changes(&summary, changes)?;
                    Created::New(run.id)
                }
            }
        };
        // Even an existing run is synced before answering: its start may have been
        // acknowledged to nobody yet (a crash right after the first attempt's write).
        if let Some(wal) = &self.inner.wal {
            let id = match created {
                Created::New(id) | Created::Existing(id) => id,
            };
            let end = logged_end.unwrap_or_else(|| wal.end());
            self.finish_logged(wal, end, id, &hidden).await?;
            return Ok(created);
        }
        self.inner.flusher.wait().await?;
        self.deliverable(&hidden);
        self.bump();
        Ok(created)
    }

    async fn append(&self, append: Append) -> Result<std::result::Result<Appended, AppendConflict>> {
        let run = append.run;
        let expected = append.expected;
        let lease = append.lease;
        // Encoded here, outside the lock, against the summary the run's mark keeps or
        // the stored one.
        let kept = self.kept_for_commit(run);
        let seen = match kept {
            Some(_) => None,
            None => self.inner.trees.runs.get(run.as_bytes())?,
        };
        let current = match (kept, &seen) {
            (Some(kept), _) => Some(kept),
            (None, Some(bytes)) => Some(decode_summary(run, bytes)?),
            (None, None) => None,
        };
        let prepared = codec::prepare_append(current, append, self.inner.options.max_event_bytes)?;
        let (current, codec::Encoded { mut records, events }) = match prepared {
            Ok(p) => p,
            Err(conflict) => {
                self.settle_logged(run).await?;
                return Ok(Err(conflict));
            }
        };
        let trees = &self.inner.trees;
        let mut hidden = Vec::new();
        // With the log: where the log must be synced to before the commit is written.
        let mut logged_end = None;
        let outcome = 'commit: {
            let _run = self.run_lock(run);
            let mut summary = match self.kept_for_commit(run) {
                Some(kept) => kept,
                None => {
                    let Some(old_bytes) = trees.runs.get(run.as_bytes())? else {
                        return Err(Error::UnknownRun(run));
                    };
                    // Unchanged since it was read (the common case): no second decode.
                    if seen.as_ref() == Some(&old_bytes) {
                        current.clone()
                    } else {
                        decode_summary(run, &old_bytes)?
                    }
                }
            };
            if summary.next_seq != expected || summary.head != current.head {
                break 'commit Err(AppendConflict {
                    run,
                    expected,
                    found: summary.next_seq,
                });
            }
            if summary.status.is_terminal() {
                return Err(Error::RunEnded(run));
            }
            if let Some(token) = lease {
                if !self.state().leased(run, token) {
                    return Err(Error::LeaseLost(run));
                }
            }
            let limits = &self.inner.options;
            let (_, bytes_after) = check_append_limits(
                &summary,
                &records,
                &events,
                limits.max_run_events,
                limits.max_run_bytes,
            )?;
            self.mark_dirty(run, Some(summary.status), summary.status)?;
            let commit_from = summary.next_seq;
            summary.bytes = bytes_after;
            let mut changes = Vec::new();
            for (event, hash) in &events {
                changes.extend(summary.apply(event, *hash));
            }
            let w = Writer::commit(self);
            // The records, the notifications before the last one, which ends the
            // commit: a crash keeps the commit only if its last record is on disk, and
            // then its notifications are queued too.
            let mut queued = None;
            // The last record ends the commit: its commit point.
            if let (Some((event, _)), Some(record)) = (events.last(), records.last_mut()) {
                codec::end_commit(run, event.seq, record);
            }
            // One value for the whole commit (whole or absent after a crash), or a
            // record per key.
            let values: Vec<(Seq, Vec<u8>)> = if self.inner.options.pack_commits && records.len() > 1 {
                vec![(commit_from, codec::pack(records))]
            } else {
                events.iter().map(|(e, _)| e.seq).zip(records).collect()
            };
            if let Some(wal) = &self.inner.wal {
                // Logged now, written to sled once the log has synced it.
                let mut notes = Vec::new();
                hidden = w.notifications(run, &mut changes, Some(&mut notes))?;
                let logged = Logged {
                    lsn: 0,
                    end: 0,
                    values,
                    notes,
                    start: None,
                    summary: summary.clone(),
                    commit_from,
                    changes,
                };
                logged_end = Some(self.log_commit(wal, logged)?);
                break 'commit Ok(Appended {
                    next: summary.next_seq,
                    head: summary.head,
                });
            }
            let last = values.len().checked_sub(1);
            for (i, (seq, value)) in values.into_iter().enumerate() {
                if i > 0 {
                    crate::failpoint::hit_after("commit-between-events", || {
                        let _ = self.inner.db.flush();
                    });
                }
                if Some(i) == last {
                    queued = Some(w.queue_notifications(run, &mut changes)?);
                    crate::failpoint::hit_after("commit-before-last-event", || {
                        let _ = self.inner.db.flush();
                    });
                }
                trees.events.insert(codec::record_key(run, seq), value)?;
            }
            hidden = match queued {
                Some(hidden) => hidden,
                None => w.queue_notifications(run, &mut changes)?,
            };
            // The summary stays with the mark (written when it goes), the status key too.
            self.keep_summary(&w, &summary, commit_from)?;
            crate::failpoint::hit_after("commit-before-indexes", || {
                let _ = self.inner.db.flush();
            });
            w.apply_changes(&summary, changes)?;
            if summary.status.is_terminal() {
                // Nothing writes to an ended run again.
                self.clear_dirty(run)?;
            }
            Ok(Appended {
                next: summary.next_seq,
                head: summary.head,
            })
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(conflict) => {
                self.settle_logged(run).await?;
                return Ok(Err(conflict));
            }
        };
        if let (Some(wal), Some(end)) = (&self.inner.wal, logged_end) {
            self.finish_logged(wal, end, run, &hidden).await?;
            return Ok(Ok(outcome));
        }
        crate::failpoint::hit("append-before-flush");
        // A failed flush leaves the commit's notifications hidden: recovery decides on
        // the next open whether the commit happened.
        self.inner.flusher.wait().await?;
        self.deliverable(&hidden);
        self.bump();
        Ok(Ok(outcome))
    }

    async fn read(&self, run: RunId, from: Seq) -> Result<Vec<Event>> {
        let Some(summary) = self.summary_now(run)? else {
            return Err(Error::UnknownRun(run));
        };
        self.read_to(run, from, &summary)
    }

    async fn summary(&self, run: RunId) -> Result<Option<RunSummary>> {
        // Under the run's commit lock: a commit writes its summary before its index
        // changes, the wake-up among them, and a summary read between the two showed a
        // run that looked quiet (no wake-up, no deadline) just before it was woken.
        let summary = {
            let _run = self.run_lock(run);
            self.summary_now(run)?
        };
        Ok(summary.and_then(|s| self.with_wake(vec![s]).pop()))
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
                // The index, merged in run order with the marked runs it does not show
                // under `st` yet; each candidate is kept only if its summary says `st`
                // (a marked run's key may still name the status it had before).
                let mut missing: Vec<RunId> = lock(&self.inner.dirty)
                    .iter()
                    .filter(|(run, m)| m.stale_for(st) == Some(true) && after.is_none_or(|a| **run > a))
                    .map(|(run, _)| *run)
                    .collect();
                missing.sort_unstable();
                let mut missing = missing.into_iter().peekable();
                let mut indexed = self.inner.trees.by_status.range(start..).keys();
                let mut next_indexed = || -> Result<Option<RunId>> {
                    match indexed.next().transpose()? {
                        Some(k) if k.first() == Some(&st.code()) => Ok(run_from_key(&k[1..])),
                        _ => Ok(None),
                    }
                };
                let mut from_index = next_indexed()?;
                while out.len() < limit {
                    let run = match (from_index, missing.peek().copied()) {
                        (None, None) => break,
                        (Some(i), Some(m)) if m < i => missing.next(),
                        (Some(i), m) => {
                            if m == Some(i) {
                                missing.next();
                            }
                            from_index = next_indexed()?;
                            Some(i)
                        }
                        (None, Some(_)) => missing.next(),
                    };
                    if let Some(s) = run.map(|run| self.summary_now(run)).transpose()?.flatten() {
                        if s.status == st {
                            out.push(s);
                        }
                    }
                }
            }
            None => {
                // The `runs` tree, merged in run order with the runs created since
                // their marks were last cleared, whose summaries are in memory only.
                for run in self.run_ids_after(after).take(limit) {
                    if let Some(summary) = self.summary_now(run?)? {
                        out.push(summary);
                    }
                }
            }
        }
        Ok(self.with_wake(out))
    }

    async fn pending(&self, after: Option<(RunId, GateId)>, limit: usize) -> Result<Vec<PendingGate>> {
        // With the log, the entries kept in memory, read first: one written to sled
        // meanwhile is then found in both (and listed once), never in neither.
        let past = after.map(|(run, gate)| gate_key(run, gate));
        let kept = self.kept_gates(past, limit, PendingGate::clone);
        let iter = match after {
            Some((run, gate)) => {
                let mut k = gate_key(run, gate).to_vec();
                k.push(0);
                self.inner.trees.pending.range(k..)
            }
            None => self.inner.trees.pending.iter(),
        };
        let mut out = Vec::new();
        let mut kept = kept.into_iter().peekable();
        for item in iter.take(limit) {
            let (k, v) = item?;
            while let Some((_, gate)) = kept.next_if(|(key, _)| key.as_slice() < k.as_ref()) {
                out.push(gate);
            }
            // Written to sled since it was read from memory: the stored one, newer.
            kept.next_if(|(key, _)| key.as_slice() == k.as_ref());
            let run = run_from_key(&k).unwrap_or_default();
            out.push(serde_json::from_slice(&v).map_err(|e| Error::Corrupt {
                run,
                seq: Seq::ZERO,
                reason: format!("pending gate entry does not decode: {e}"),
            })?);
        }
        out.extend(kept.map(|(_, gate)| gate));
        out.truncate(limit);
        Ok(out)
    }

    async fn claim(
        &self,
        owner: WorkerId,
        now: DateTime<Utc>,
        ttl: Duration,
        max: usize,
    ) -> Result<Vec<Lease>> {
        let expires_at = lease_ttl(now, ttl);
        let mut out = Vec::new();
        // Runs whose lease expired without a release (a stalled activation): take them
        // over. The old holder's appends fail on its token from now on (the run's lock
        // keeps a commit of the old holder from straddling the change).
        let expired: Vec<RunId> = self
            .state()
            .leases
            .values()
            .filter(|l| l.expires_at <= now)
            .map(|l| l.run)
            .take(max)
            .collect();
        for run in expired {
            let _run = self.run_lock(run);
            let mut st = self.state();
            st.next_token += 1;
            let token = LeaseToken(st.next_token);
            let Some(lease) = st.leases.get_mut(&run) else {
                continue;
            };
            if lease.expires_at > now {
                continue;
            }
            lease.owner = owner;
            lease.token = token;
            lease.expires_at = expires_at;
            out.push(lease.clone());
        }
        let mut st = self.state();
        let now_ms = ms(now);
        while out.len() < max {
            let Some(&(at, run)) = st.ready.first() else { break };
            if at > now_ms {
                break;
            }
            st.ready.pop_first();
            st.next_token += 1;
            let lease = Lease {
                run,
                owner,
                token: LeaseToken(st.next_token),
                expires_at,
                rewake_at: None,
            };
            st.leases.insert(run, lease.clone());
            out.push(lease);
        }
        Ok(out)
    }

    async fn release(&self, lease: &Lease, wake: Option<DateTime<Utc>>) -> Result<()> {
        let run = lease.run;
        {
            let _run = self.run_lock(run);
            let current = {
                let mut st = self.state();
                if !st.leased(run, lease.token) {
                    return Ok(());
                }
                match st.leases.remove(&run) {
                    Some(current) => current,
                    None => return Ok(()),
                }
            };
            let at = match (wake, current.rewake_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let at = match at {
                Some(at) => match self.summary_now(run)? {
                    Some(s) if !s.status.is_terminal() && s.stuck.is_none() => Some(ms(at)),
                    _ => None,
                },
                None => None,
            };
            // Stored before the mark that covered the activation's wake-ups goes.
            set_wake(&mut self.state(), &self.inner.trees, run, at, Durability::Stored)?;
            // The activation's commits are all whole. With the log, the entry may stay
            // with what it keeps in memory (see `keeps_released`).
            if !self.keeps_released(run) {
                self.clear_dirty(run)?;
            }
        }
        self.bump();
        Ok(())
    }

    async fn renew(&self, lease: &Lease, now: DateTime<Utc>, ttl: Duration) -> Result<Option<Lease>> {
        let mut st = self.state();
        match st.leases.get_mut(&lease.run) {
            Some(current) if current.token == lease.token => {
                current.expires_at = lease_ttl(now, ttl);
                Ok(Some(current.clone()))
            }
            _ => Ok(None),
        }
    }

    async fn mark_stuck(&self, lease: &Lease, reason: String) -> Result<()> {
        let run = lease.run;
        let trees = &self.inner.trees;
        {
            let _run = self.run_lock(run);
            if !self.state().leased(run, lease.token) {
                return Err(Error::LeaseLost(run));
            }
            // With the log: the commits it has synced go to sled first, and those still
            // waiting for it (a decision, say) will write their summaries parked too.
            self.apply_logged_locked(run)?;
            self.store_held(run)?;
            if let Some(m) = lock(&self.inner.dirty).get_mut(&run) {
                for logged in m.pending.iter_mut() {
                    park(&mut logged.summary, &reason);
                }
            }
            let Some(mut summary) = self.summary_now(run)? else {
                return Err(Error::UnknownRun(run));
            };
            let intent = Intent {
                target: summary.next_seq,
                stuck: Some(reason.clone()),
                old: Before::Journal(summary.next_seq),
            };
            trees.intents.insert(run.as_bytes(), intent.encode())?;
            self.state().leases.remove(&run);
            // A marked run's key is the one its mark noted, not its summary's.
            let prior = match lock(&self.inner.dirty).get(&run) {
                Some(marked) => marked.prior(),
                None => Prior::Was(summary.status),
            };
            park(&mut summary, &reason);
            let w = Writer::new(self);
            w.put_summary(&summary, prior, summary.next_seq)?;
            if let Some(marked) = lock(&self.inner.dirty).get_mut(&run) {
                marked.stored = Some(summary.status);
                marked.status = summary.status;
                marked.summary = None;
            }
            w.unschedule(run)?;
            trees.intents.remove(run.as_bytes())?;
        }
        self.inner.flusher.wait().await?;
        self.bump();
        Ok(())
    }

    async fn is_leased(&self, run: RunId) -> Result<bool> {
        Ok(self.state().leases.contains_key(&run))
    }

    async fn next_wake(&self) -> Result<Option<DateTime<Utc>>> {
        let st = self.state();
        let ready = st
            .ready
            .first()
            .and_then(|(ms, _)| Utc.timestamp_millis_opt(*ms as i64).single());
        // A lease running out is a wake-up too: its run is taken over then.
        let expiring = st.leases.values().map(|l| l.expires_at).min();
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
        // Read before the scan: an entry written since has a larger id.
        let below = lock(&self.inner.outbox_ids).deliverable_below();
        let mut out = Vec::new();
        for item in self.inner.trees.outbox.scan_prefix(&prefix).take(limit) {
            let (k, v) = item?;
            let key = k
                .get(prefix.len()..)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| Error::Storage("malformed key in the outbox".into()))?;
            if key >= below {
                // This one and every later one wait for their commits' flush.
                break;
            }
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

/// What the open's replay of the log found: how many commits, and each run's span
/// (run, first commit's first seq, last commit's first seq, end), in the order the log
/// first names the runs.
#[derive(Default)]
struct LoggedSpans {
    commits: usize,
    runs: Vec<(RunId, Seq, Seq, Seq)>,
}

/// A commit as the log holds it (see [`encode_logged`]).
struct LoggedRecord {
    run: RunId,
    from: Seq,
    to: Seq,
    values: Vec<(Seq, Vec<u8>)>,
    notes: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The kind byte of a commit's log record.
const LOGGED_COMMIT: u8 = 1;

/// A commit's log record: kind (1), run (16), first seq and end (8 each), its values
/// (count (4), then seq (8), length (4) and bytes each, as stored in `events`) and its
/// outbox entries (count (4), then key length (4), key, value length (4), value each);
/// big endian.
fn encode_logged(
    run: RunId,
    from: Seq,
    to: Seq,
    values: &[(Seq, Vec<u8>)],
    notes: &[(Vec<u8>, Vec<u8>)],
) -> Vec<u8> {
    let size = 41
        + values.iter().map(|(_, v)| 12 + v.len()).sum::<usize>()
        + 4
        + notes.iter().map(|(k, v)| 8 + k.len() + v.len()).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.push(LOGGED_COMMIT);
    out.extend_from_slice(run.as_bytes());
    out.extend_from_slice(&from.0.to_be_bytes());
    out.extend_from_slice(&to.0.to_be_bytes());
    out.extend_from_slice(&(values.len() as u32).to_be_bytes());
    for (seq, value) in values {
        out.extend_from_slice(&seq.0.to_be_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
    }
    out.extend_from_slice(&(notes.len() as u32).to_be_bytes());
    for (key, value) in notes {
        out.extend_from_slice(&(key.len() as u32).to_be_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
    }
    out
}

/// Reads a commit's log record back ([`encode_logged`]). The log checked its checksum,
/// so a record that does not parse was written by something else: an error.
fn decode_logged(lsn: Lsn, payload: &[u8]) -> Result<LoggedRecord> {
    let mut r = crate::stored_summary::Reader::new(payload);
    if r.take::<1>() != Some([LOGGED_COMMIT]) {
        return Err(Error::Storage(format!(
            "the write-ahead log's record at LSN {lsn} is of an unknown kind"
        )));
    }
    let u32 = |r: &mut crate::stored_summary::Reader<'_>| r.take().map(u32::from_be_bytes);
    let u64 = |r: &mut crate::stored_summary::Reader<'_>| r.take().map(u64::from_be_bytes);
    let bytes = |r: &mut crate::stored_summary::Reader<'_>| {
        let n = u32(r)? as usize;
        r.slice(n).map(<[u8]>::to_vec)
    };
    let parsed = (|| {
        let run = RunId::from_bytes(r.take()?);
        let (from, to) = (Seq(u64(&mut r)?), Seq(u64(&mut r)?));
        let mut values = Vec::new();
        for _ in 0..u32(&mut r)? {
            let seq = Seq(u64(&mut r)?);
            values.push((seq, bytes(&mut r)?));
        }
        let mut notes = Vec::new();
        for _ in 0..u32(&mut r)? {
            let key = bytes(&mut r)?;
            notes.push((key, bytes(&mut r)?));
        }
        (r.is_done() && from <= to).then_some(LoggedRecord {
            run,
            from,
            to,
            values,
            notes,
        })
    })();
    parsed.ok_or_else(|| Error::Storage(format!("the write-ahead log's record at LSN {lsn} is malformed")))
}

/// Group commit: appenders that finished their transaction wait here; one thread
/// flushes for all of them. A waiter is only woken by a flush that *started* after it
/// registered, so the flush covers its writes.
struct GroupCommit {
    shared: Arc<FlushShared>,
    thread: Option<JoinHandle<()>>,
    /// Without a thread ([`SledOptions::group_commit`] off): what each waiter flushes
    /// and syncs itself.
    inline: Option<(sled::Db, File)>,
}

struct FlushShared {
    queue: Mutex<FlushQueue>,
    wake: Condvar,
    syncs: AtomicU64,
    /// Times a group gathered for the window before its flush.
    windows: AtomicU64,
}

#[derive(Default)]
struct FlushQueue {
    waiters: Vec<oneshot::Sender<std::result::Result<(), String>>>,
    shutdown: bool,
}

impl GroupCommit {
    fn start(db: sled::Db, data_file: File, window: Duration) -> GroupCommit {
        let shared = Arc::new(FlushShared {
            queue: Mutex::new(FlushQueue::default()),
            wake: Condvar::new(),
            syncs: AtomicU64::new(0),
            windows: AtomicU64::new(0),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("holdpoint-group-commit".into())
            .spawn(move || {
                // Commits in the last group; past `GROUP_WINDOW_FROM` the next one gathers
                // for `window` first (`SledOptions::group_window`).
                let mut last_group = 0;
                loop {
                let batch = {
                    let mut q = s.queue.lock().unwrap_or_else(|p| p.into_inner());
                    while q.waiters.is_empty() && !q.shutdown {
                        q = s.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                    }
                    if q.waiters.is_empty() && q.shutdown {
                        return;
                    }
                    if !q.shutdown {
                        q = crate::wal::gather(&s.queue, q, last_group, window, &s.windows);
                    }
                    last_group = q.waiters.len() as u64;
                    std::mem::take(&mut q.waiters)
                };
                let result = flush_and_sync(&db, &data_file, &s.syncs);
                if let Err(e) = &result {
                    tracing::error!(error = %e, "group commit failed; appends in this batch are not acknowledged");
                }
                for w in batch {
                    let _ = w.send(result.clone());
                }
                }
            })
            .ok();
        GroupCommit {
            shared,
            thread,
            inline: None,
        }
    }

    /// No thread: every [`GroupCommit::wait`] flushes and syncs in its caller.
    fn inline(db: sled::Db, data_file: File) -> GroupCommit {
        GroupCommit {
            shared: Arc::new(FlushShared {
                queue: Mutex::new(FlushQueue::default()),
                wake: Condvar::new(),
                syncs: AtomicU64::new(0),
                windows: AtomicU64::new(0),
            }),
            thread: None,
            inline: Some((db, data_file)),
        }
    }

    async fn wait(&self) -> Result<()> {
        if let Some((db, data_file)) = &self.inline {
            return flush_and_sync(db, data_file, &self.shared.syncs).map_err(Error::Storage);
        }
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.shutdown || self.thread.is_none() {
                return Err(Error::Storage("store is closed".into()));
            }
            q.waiters.push(tx);
            q.waiters.len() == 1
        };
        // The thread sleeps only on an empty queue, and checks it under the lock, so only
        // the waiter that made it non-empty needs to wake it: the others find it flushing
        // (it takes them on its next round) or about to take them. A notify is a futex
        // call even when no one sleeps; this saves one per append in a busy batch.
        if first {
            self.shared.wake.notify_one();
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Storage(e)),
            Err(_) => Err(Error::Storage("group commit thread stopped".into())),
        }
    }
}

/// One group commit's I/O: sled's flush, then `fdatasync` on its file; counted in
/// `syncs` whether it failed or not.
fn flush_and_sync(db: &sled::Db, data_file: &File, syncs: &AtomicU64) -> std::result::Result<(), String> {
    let result = db
        .flush()
        .map_err(|e| format!("flush failed: {e}"))
        .and_then(|_| {
            crate::failpoint::hit("group-commit-before-fsync");
            data_file.sync_data().map_err(|e| format!("fsync failed: {e}"))
        });
    syncs.fetch_add(1, Ordering::Relaxed);
    result
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NotificationKind;

    fn new_run(id: RunId) -> NewRun {
        NewRun {
            id,
            started_by: None,
            workflow: "w".into(),
            version: 1,
            input: serde_json::Value::Null,
            idempotency_key: None,
            at: Utc::now(),
        }
    }

    /// A checkpoint stores what an entry holds, and may store with it the records of a
    /// commit logged past its LSN; the open replays that commit under its own key and
    /// cuts it out of the value that held it, so no record is stored twice.
    #[tokio::test]
    async fn a_commit_replayed_from_the_log_is_cut_out_of_a_value_that_held_it() {
        let dir = tempfile::tempdir().unwrap();
        let options = || SledOptions {
            wal: true,
            ..SledOptions::default()
        };
        let run = RunId::new();
        let new = new_run(run);
        let step = |p: u32| EventKind::StepCompleted {
            position: crate::ids::Position(p),
            output: serde_json::json!(p),
        };
        {
            let store = SledStore::open_with(dir.path(), options()).unwrap();
            store.create_run(new).await.unwrap();
            // The creation is stored, and the log starts after it.
            store.checkpoint().unwrap();
            let append = Append {
                run,
                expected: Seq(1),
                at: Utc::now(),
                events: vec![step(0), step(1)],
                lease: None,
            };
            store.append(append).await.unwrap().unwrap();
            // What a checkpoint that took its LSN before this commit was written would
            // store: the commit's records with the creation's, in one value.
            {
                let _run = store.run_lock(run);
                let creation = store.stored_between(run, Seq::ZERO, Some(Seq(1))).unwrap();
                let mut marks = lock(&store.inner.dirty);
                let held = &mut marks.get_mut(&run).unwrap().held;
                assert_eq!(held.len(), 2, "the commit's records are held");
                held.splice(0..0, creation);
            }
            store.store_held(run).unwrap();
            let stored = store.inner.trees.events.get(codec::record_key(run, Seq::ZERO));
            let unpacked = codec::unpack(run, Seq::ZERO, &stored.unwrap().unwrap()).unwrap();
            assert_eq!(unpacked.len(), 3, "one value holds all three records");
            // Dropped without a close: the log still holds the commit.
        }
        let store = SledStore::open_with(dir.path(), options()).unwrap();
        let events = store.read(run, Seq::ZERO).await.unwrap();
        assert_eq!(
            events.iter().map(|e| e.seq.0).collect::<Vec<_>>(),
            [0, 1, 2],
            "each record once"
        );
        let first = store.inner.trees.events.get(codec::record_key(run, Seq::ZERO));
        let first = first.unwrap().unwrap();
        assert_eq!(
            codec::unpack(run, Seq::ZERO, &first).unwrap().len(),
            1,
            "cut back to the creation"
        );
        assert_eq!(store.check_indexes().unwrap(), Vec::<String>::new());
    }

    /// A commit's notifications stay out of `outbox` until the commit is durable, and a
    /// later commit's wait for every earlier one's, so each queue is read in order.
    #[tokio::test]
    async fn the_outbox_shows_notifications_of_durable_commits_only_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let options = SledOptions {
            outbox_endpoints: vec!["ops".into()],
            ..SledOptions::default()
        };
        let store = SledStore::open_with(dir.path(), options).unwrap();
        let run = RunId::new();
        let notify = |seq: u64| {
            IndexChange::Notify(Box::new(Notification {
                id: format!("{run}:{seq}"),
                kind: NotificationKind::GateOpened,
                run,
                gate: GateId(0),
                seq: Seq(seq),
                at: Utc::now(),
                workflow: "w".into(),
                action: Some("send_money".into()),
                reason: None,
                decision: None,
                by: None,
                level: None,
                deadline: None,
            }))
        };
        let shown = |store: &SledStore| {
            let store = store.clone();
            async move {
                let queued = store.outbox("ops", 10).await.unwrap();
                queued.iter().map(|o| o.notification.seq.0).collect::<Vec<_>>()
            }
        };
        let w = Writer::new(&store);
        let mut first = vec![notify(1)];
        let first_ids = w.queue_notifications(run, &mut first).unwrap();
        assert!(first.is_empty(), "taken out of the changes");
        let mut second = vec![notify(2)];
        let second_ids = w.queue_notifications(run, &mut second).unwrap();
        assert_eq!(
            shown(&store).await,
            Vec::<u64>::new(),
            "neither commit is durable"
        );
        store.deliverable(&second_ids);
        assert_eq!(
            shown(&store).await,
            Vec::<u64>::new(),
            "the second waits for the first"
        );
        store.deliverable(&first_ids);
        assert_eq!(shown(&store).await, [1, 2]);
        // Recovery's (events already on disk) are shown at once.
        w.apply_changes(&RunSummary::start(&new_run(run)), vec![notify(3)])
            .unwrap();
        assert_eq!(shown(&store).await, [1, 2, 3]);
    }

    #[test]
    fn intents_round_trip_and_the_earlier_layout_still_reads() {
        let run = RunId::new();
        for (stuck, old) in [
            (None, Before::Created),
            (Some("gone".to_string()), Before::Journal(Seq(7))),
            (None, Before::Stored(b"{\"x\":1}".to_vec())),
        ] {
            let intent = Intent {
                target: Seq(7),
                stuck,
                old,
            };
            let back = Intent::decode(run, &intent.encode()).unwrap();
            assert_eq!(back.target, intent.target);
            assert_eq!(back.stuck, intent.stuck);
            match (&back.old, &intent.old) {
                (Before::Created, Before::Created) => {}
                (Before::Journal(a), Before::Journal(b)) => assert_eq!(a, b),
                (Before::Stored(a), Before::Stored(b)) => assert_eq!(a, b),
                _ => panic!("what came before changed in the round trip"),
            }
        }
        // As the previous release wrote it: target, no reason, then 1 and the old summary.
        let mut earlier = 5u64.to_be_bytes().to_vec();
        earlier.extend_from_slice(&[0, 0, 0, 0, 0, 1]);
        earlier.extend_from_slice(b"{}");
        let intent = Intent::decode(run, &earlier).unwrap();
        assert!(matches!(intent.old, Before::Stored(ref b) if b == b"{}"));
        // Truncated or unknown: a typed error, never a panic.
        for bad in [&earlier[..3], &[0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 9][..]] {
            assert!(matches!(Intent::decode(run, bad), Err(Error::Storage(_))));
        }
        let mut past = Intent {
            target: Seq(2),
            stuck: None,
            old: Before::Journal(Seq(3)),
        }
        .encode();
        assert!(Intent::decode(run, &past).is_err());
        past.truncate(past.len() - 1);
        assert!(Intent::decode(run, &past).is_err());
    }
}
