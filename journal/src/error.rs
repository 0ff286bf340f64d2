//! `journal::Error`: everything the journal and its stores can report.

use crate::ids::{RunId, Seq};
use std::path::PathBuf;

/// Errors of the journal layer. Corruption, conflicts of identity and plain storage
/// failures are kept apart so callers can react to each differently: a corrupt run is
/// quarantined while the others go on; a storage failure stops the caller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A stored event failed its checksum, its hash chain, or its decoding. The run's
    /// journal cannot be trusted past `seq`; nothing after it is returned.
    #[error("journal of run {run} is corrupt at seq {seq}: {reason}")]
    Corrupt { run: RunId, seq: Seq, reason: String },

    /// A stored event was written by a newer format than this build reads.
    #[error("run {run} seq {seq} has event format v{version}; this build reads up to v{supported}")]
    UnknownFormat {
        run: RunId,
        seq: Seq,
        version: u16,
        supported: u16,
    },

    /// An event is larger than the store's per-event limit. Nothing was written.
    #[error("event for run {run} is {size} bytes; the limit is {limit} bytes")]
    EventTooLarge { run: RunId, size: usize, limit: usize },

    /// The run has reached its limit (events or bytes). Decisions, cancellation and
    /// failure can still be recorded (a small reserve past the limit), so the run can
    /// always be ended.
    #[error("run {run} has reached its limit: {detail}")]
    RunLimit { run: RunId, detail: String },

    /// Another process holds the data directory.
    #[error("data directory {dir} is in use by another process (is `holdpoint serve` running?): {detail}")]
    Locked { dir: PathBuf, detail: String },

    #[error("unknown run {0}")]
    UnknownRun(RunId),

    /// The run has ended (completed, failed or cancelled); nothing more may be appended.
    #[error("run {0} has ended; nothing more can be appended")]
    RunEnded(RunId),

    /// The caller's lease on the run is gone (expired and taken by another worker, or
    /// released). The append was refused; the caller must stop driving the run.
    #[error("lease on run {0} is no longer held by this worker")]
    LeaseLost(RunId),

    /// A start with an idempotency key that an earlier, different start already used.
    #[error(
        "idempotency key {key:?} was already used to start run {existing} with a different workflow or input"
    )]
    StartConflict { key: String, existing: RunId },

    /// The event could not be encoded (a bug: events are plain data).
    #[error("could not encode event: {0}")]
    Encode(#[from] serde_json::Error),

    /// The underlying storage failed. After a failed append the outcome is unknown:
    /// the events may or may not be durable. Retry with the same idempotency key.
    #[error("storage failure: {0}")]
    Storage(String),

    /// The write-ahead log is damaged somewhere other than a torn tail: a bad record
    /// before the last segment's end, a segment with the wrong header, or records
    /// missing between segments, before the checkpoint or after it (a log with no
    /// segments). Nothing was cut.
    #[error("write-ahead log segment {} is corrupt at offset {offset}: {reason}", segment.display())]
    WalCorrupt {
        segment: PathBuf,
        offset: u64,
        reason: String,
    },

    /// A fault injected by a test harness (crash simulation).
    #[error("injected fault: {0}")]
    Injected(String),
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
