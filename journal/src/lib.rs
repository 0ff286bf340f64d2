//! `holdpoint-journal`: the append-only journal of every run.
//!
//! Event types ([`event`]), their stored form with checksum and hash chain ([`codec`]),
//! the [`Store`] trait every backend implements, and [`SledStore`], the embedded
//! default. This crate knows nothing of workflows.

pub mod codec;
pub mod error;
pub mod event;
pub mod failpoint;
pub mod ids;
pub mod sled_store;
pub mod store;
pub mod stored_summary;
pub mod wal;

pub use codec::{hex, ChainHash};
pub use error::{Error, Result};
pub use event::{
    request_hash, ApproverLevel, Decision, DecisionKind, Event, EventKind, GateKind, GateSpec,
    TimeoutOutcome, ValueSource, Verdict, FORMAT_VERSION,
};
pub use ids::{GateId, LeaseToken, Position, Principal, RunId, Seq, WorkerId};
pub use sled_store::{
    raw_config as sled_raw_config, SledOptions, SledStore, TreeBytes, DEFAULT_COMPRESSION_LEVEL,
    DEFAULT_MAX_EVENT_BYTES,
};
pub use store::{
    check_append_limits, check_run_limits, closes, Append, AppendConflict, Appended, Created, DueDeadline,
    GateChange, IndexChange, Lease, NewRun, Notification, NotificationKind, Outgoing, PendingGate,
    RecordedDecision, RuleDecision, RunStatus, RunSummary, Store,
};
