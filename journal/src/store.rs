//! The `Store` trait: what the engine needs from a place that keeps journals.
//!
//! **API Boundary.** Backends (sled here, PostgreSQL later) implement this trait and pass
//! the same conformance tests. **Architecture Invariant:** a store derives every index
//! (run summary, status, pending gates, ready queue) from the events it appends, in the
//! same atomic write as the events, using [`RunSummary::apply`]. Callers never write an
//! index directly, so an index cannot disagree with the journal it describes.

use crate::codec::ChainHash;
use crate::error::Result;
use crate::event::{request_hash, Decision, DecisionKind, Event, EventKind, GateKind};
use crate::ids::{GateId, LeaseToken, Position, Principal, RunId, Seq, WorkerId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

/// A run to create: becomes `run-started` at seq 0.
#[derive(Clone, Debug)]
pub struct NewRun {
    pub id: RunId,
    /// Who started it (recorded; never allowed to approve its gates).
    pub started_by: Option<Principal>,
    pub workflow: String,
    pub version: u32,
    pub input: Value,
    /// A start retried with the same key returns the first run instead of a new one.
    pub idempotency_key: Option<String>,
    pub at: DateTime<Utc>,
}

/// Past a run's limit, events that end or decide it still fit in this reserve, so a
/// run at its limit can always be rejected, cancelled or failed.
pub const RESERVE_EVENTS: u64 = 64;
pub const RESERVE_BYTES: u64 = 1024 * 1024;

/// Events allowed into a run's reserve.
pub fn closes(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::DecisionRecorded { .. }
            | EventKind::VoteRecorded { .. }
            | EventKind::GateEscalated { .. }
            | EventKind::RunCancelled { .. }
            | EventKind::RunFailed { .. }
            | EventKind::RunCompleted { .. }
    )
}

/// Refuses growing a run past its limits, unless every new event closes something and
/// fits in the reserve. The one rule every store applies.
pub fn check_run_limits(
    run: RunId,
    events_after: u64,
    bytes_after: u64,
    max_events: u64,
    max_bytes: u64,
    closing: bool,
) -> Result<()> {
    if events_after <= max_events && bytes_after <= max_bytes {
        return Ok(());
    }
    let in_reserve = events_after <= max_events + RESERVE_EVENTS && bytes_after <= max_bytes + RESERVE_BYTES;
    if closing && in_reserve {
        return Ok(());
    }
    Err(crate::Error::RunLimit {
        run,
        detail: format!(
            "{events_after} events and {bytes_after} bytes; the limits are {max_events} events and {max_bytes} bytes"
        ),
    })
}

/// [`check_run_limits`] for an append of `records` (encoding `events`) to the run
/// `summary` describes. Returns the run's event count and bytes after it.
pub fn check_append_limits(
    summary: &RunSummary,
    records: &[Vec<u8>],
    events: &[(crate::event::Event, crate::codec::ChainHash)],
    max_events: u64,
    max_bytes: u64,
) -> Result<(u64, u64)> {
    let added: u64 = records.iter().map(|r| r.len() as u64).sum();
    let events_after = summary.next_seq.0 + events.len() as u64;
    let bytes_after = summary.bytes + added;
    let closing = events.iter().all(|(e, _)| closes(&e.event));
    check_run_limits(
        summary.id,
        events_after,
        bytes_after,
        max_events,
        max_bytes,
        closing,
    )?;
    Ok((events_after, bytes_after))
}

impl NewRun {
    /// What a start's idempotency key is bound to: workflow, version and input.
    pub fn request_hash(&self) -> Result<[u8; 32]> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.workflow.as_bytes());
        h.update([0]);
        h.update(self.version.to_be_bytes());
        h.update(serde_json::to_vec(&self.input)?);
        Ok(h.finalize().into())
    }

    /// The run's first event, `run-started`, as every store records it.
    pub fn first_event(&self) -> Event {
        let kind = EventKind::RunStarted {
            workflow: self.workflow.clone(),
            version: self.version,
            input: self.input.clone(),
            idempotency_key: self.idempotency_key.clone(),
            started_by: self.started_by.clone(),
        };
        Event {
            run: self.id,
            seq: Seq::ZERO,
            at: self.at,
            v: kind.format(),
            event: kind,
        }
    }
}

/// Result of [`Store::create_run`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// A new run, durable.
    New(RunId),
    /// The idempotency key was used before for the same workflow and input; this is
    /// that run.
    Existing(RunId),
}

impl Created {
    pub fn run(self) -> RunId {
        match self {
            Created::New(r) | Created::Existing(r) => r,
        }
    }
}

/// Events to append to one run, atomically, at an expected position.
#[derive(Clone, Debug)]
pub struct Append {
    pub run: RunId,
    /// The seq the first event must get: the run's current length. Anything else is a
    /// conflict, returned as a value.
    pub expected: Seq,
    pub at: DateTime<Utc>,
    pub events: Vec<EventKind>,
    /// When set, the append succeeds only while this lease is the run's current one
    /// (fencing: a worker that lost its lease cannot write).
    pub lease: Option<LeaseToken>,
}

/// An append that landed (durably).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The run's next seq after this append.
    pub next: Seq,
    pub head: ChainHash,
}

/// An append at the wrong seq: someone else appended first. Expected, so a value, not
/// an error (like sled's `CompareAndSwapError`): it says what is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendConflict {
    pub run: RunId,
    pub expected: Seq,
    /// The run's actual next seq.
    pub found: Seq,
}

impl fmt::Display for AppendConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "run {} expected append at seq {}, but its journal already ends before seq {}",
            self.run, self.expected, self.found
        )
    }
}

/// Status of a run, as indexed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    /// Has work to do or is being driven.
    Running,
    /// Waits for a person (an open gate) or a timer.
    Waiting,
    Completed,
    Failed,
    Cancelled,
    /// Parked for an operator: workflow code no longer matches the journal, the journal
    /// is corrupt, or the workflow version is not registered. Never retried in a loop.
    Stuck,
}

impl RunStatus {
    pub const ALL: [RunStatus; 6] = [
        RunStatus::Running,
        RunStatus::Waiting,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Cancelled,
        RunStatus::Stuck,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Waiting => "waiting",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Stuck => "stuck",
        }
    }

    /// Stable one-byte code for index keys.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The status with this [`code`](Self::code), if any.
    pub fn from_code(code: u8) -> Option<RunStatus> {
        RunStatus::ALL.into_iter().find(|s| s.code() == code)
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        RunStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown status {s:?} (expected running, waiting, completed, failed, cancelled or stuck)"
                )
            })
    }
}

/// The indexed summary of one run, derived from its events by [`RunSummary::apply`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub id: RunId,
    pub workflow: String,
    pub version: u32,
    pub status: RunStatus,
    /// Seq the next append must use (= number of events).
    pub next_seq: Seq,
    /// Chain hash of the last event.
    pub head: ChainHash,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open_gates: Vec<GateId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open_timers: Vec<Position>,
    /// When the run next needs a worker (None: waits for a person, or has ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Why the run is stuck, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stuck: Option<String>,
    /// Deadlines of open gates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deadlines: Vec<(GateId, DateTime<Utc>)>,
    /// Bytes of the run's stored records.
    #[serde(default)]
    pub bytes: u64,
}

/// What an event did to a run's indexes, for the store to mirror into its trees.
#[derive(Clone, Debug, PartialEq)]
pub enum IndexChange {
    GateOpened(Box<PendingGate>),
    GateClosed(GateId),
    /// The run needs a worker at this time.
    Wake(DateTime<Utc>),
    /// The run has ended: drop it from every queue.
    Ended,
    /// A gate's deadline is now `at`, replacing `old`.
    DeadlineSet {
        gate: GateId,
        at: DateTime<Utc>,
        old: Option<DateTime<Utc>>,
    },
    /// A gate's deadline (`at`) no longer applies.
    DeadlineCleared {
        gate: GateId,
        at: DateTime<Utc>,
    },
    /// A gate was decided (before it is closed): feeds the per-rule decision history.
    Decided {
        gate: GateId,
        kind: DecisionKind,
        by: Principal,
        at: DateTime<Utc>,
    },
    /// An action ran on a rule's trust, without asking: also in the rule's history.
    TrustedAllow {
        rule: String,
        position: Position,
        at: DateTime<Utc>,
    },
    /// An open gate changed: a vote, a revised request, or a new approver group.
    GateChanged(GateId, GateChange),
    /// Something to tell the outside world (webhooks). Stores with an outbox queue it
    /// in the same atomic write as the event, once per endpoint; others ignore it.
    Notify(Box<Notification>),
}

/// What a notification is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NotificationKind {
    #[serde(rename = "gate.opened")]
    GateOpened,
    #[serde(rename = "gate.decided")]
    GateDecided,
    #[serde(rename = "gate.escalated")]
    GateEscalated,
    /// Decided by the system because its deadline passed (the gate's default outcome).
    #[serde(rename = "gate.timed_out")]
    GateTimedOut,
}

impl NotificationKind {
    pub const ALL: [NotificationKind; 4] = [
        NotificationKind::GateOpened,
        NotificationKind::GateDecided,
        NotificationKind::GateEscalated,
        NotificationKind::GateTimedOut,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationKind::GateOpened => "gate.opened",
            NotificationKind::GateDecided => "gate.decided",
            NotificationKind::GateEscalated => "gate.escalated",
            NotificationKind::GateTimedOut => "gate.timed_out",
        }
    }
}

impl fmt::Display for NotificationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A notification about a gate, derived from one journal event (webhooks deliver it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// `run:seq` of the event: a notification delivered twice carries the same id.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: NotificationKind,
    pub run: RunId,
    pub gate: GateId,
    pub seq: Seq,
    pub at: DateTime<Utc>,
    pub workflow: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Why the gate asks (opened).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<Principal>,
    /// The approver group now asked (escalated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
}

/// A queued notification for one endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Outgoing {
    /// Its place in the endpoint's queue (ack it with this).
    pub key: u64,
    pub notification: Notification,
}

/// How an open gate's inbox entry changes.
#[derive(Clone, Debug, PartialEq)]
pub enum GateChange {
    Vote {
        by: Principal,
        vote: Decision,
    },
    Escalated {
        level: u32,
        roles: Vec<String>,
        deadline: Option<DateTime<Utc>>,
    },
}

impl PendingGate {
    /// Applies a change to this entry.
    pub fn change(&mut self, change: &GateChange) {
        match change {
            GateChange::Vote { by, vote } => match vote {
                Decision::Edit { args } => {
                    self.args = args.clone();
                    self.request_hash = request_hash(&self.action, args);
                    self.approvals = vec![by.clone()];
                }
                Decision::Approve if !self.approvals.contains(by) => self.approvals.push(by.clone()),
                _ => {}
            },
            GateChange::Escalated {
                level,
                roles,
                deadline,
            } => {
                self.level = *level;
                self.roles = roles.clone();
                self.deadline = *deadline;
            }
        }
    }
}

impl RunSummary {
    /// The summary of a run whose first event is `run-started`.
    pub fn start(run: &NewRun) -> RunSummary {
        RunSummary {
            id: run.id,
            workflow: run.workflow.clone(),
            version: run.version,
            status: RunStatus::Running,
            next_seq: Seq::ZERO,
            head: ChainHash::GENESIS,
            open_gates: Vec::new(),
            open_timers: Vec::new(),
            wake_at: None,
            created_at: run.at,
            updated_at: run.at,
            idempotency_key: run.idempotency_key.clone(),
            stuck: None,
            deadlines: Vec::new(),
            bytes: 0,
        }
    }

    fn set_deadline(&mut self, gate: GateId, at: DateTime<Utc>, changes: &mut Vec<IndexChange>) {
        let old = self.deadlines.iter().find(|(g, _)| *g == gate).map(|(_, t)| *t);
        self.deadlines.retain(|(g, _)| *g != gate);
        self.deadlines.push((gate, at));
        changes.push(IndexChange::DeadlineSet { gate, at, old });
    }

    fn notification(&self, kind: NotificationKind, gate: GateId, event: &Event) -> Notification {
        Notification {
            id: format!("{}:{}", self.id, event.seq),
            kind,
            run: self.id,
            gate,
            seq: event.seq,
            at: event.at,
            workflow: self.workflow.clone(),
            action: None,
            reason: None,
            decision: None,
            by: None,
            level: None,
            deadline: None,
        }
    }

    fn clear_deadline(&mut self, gate: GateId, changes: &mut Vec<IndexChange>) {
        if let Some((_, at)) = self.deadlines.iter().find(|(g, _)| *g == gate) {
            changes.push(IndexChange::DeadlineCleared { gate, at: *at });
        }
        self.deadlines.retain(|(g, _)| *g != gate);
    }

    /// Applies one event (already given its seq) and reports the index changes it
    /// implies. The single definition of how events move indexes, shared by every store.
    pub fn apply(&mut self, event: &Event, head: ChainHash) -> Vec<IndexChange> {
        let mut changes = Vec::new();
        self.next_seq = event.seq.next();
        self.head = head;
        self.updated_at = event.at;
        match &event.event {
            EventKind::RunStarted { .. } => changes.push(IndexChange::Wake(event.at)),
            EventKind::ApprovalRequested {
                gate,
                kind,
                action,
                args,
                context,
                reason,
                allowed,
                deadline,
                rule,
                spec,
            } => {
                if !self.open_gates.contains(gate) {
                    self.open_gates.push(*gate);
                }
                let spec = spec.clone().unwrap_or_default();
                changes.push(IndexChange::GateOpened(Box::new(PendingGate {
                    run: self.id,
                    gate: *gate,
                    workflow: self.workflow.clone(),
                    kind: *kind,
                    action: action.clone(),
                    args: args.clone(),
                    context: context.clone(),
                    reason: reason.clone(),
                    allowed: allowed.clone(),
                    deadline: *deadline,
                    requested_at: event.at,
                    rule: rule.clone(),
                    level: 0,
                    roles: spec.roles_at(0).to_vec(),
                    quorum: spec.quorum,
                    approvals: Vec::new(),
                    request_hash: request_hash(action, args),
                })));
                let mut n = self.notification(NotificationKind::GateOpened, *gate, event);
                n.action = Some(action.clone());
                n.reason = Some(reason.clone());
                n.deadline = *deadline;
                changes.push(IndexChange::Notify(Box::new(n)));
                if let Some(at) = deadline {
                    self.set_deadline(*gate, *at, &mut changes);
                }
            }
            EventKind::DecisionRecorded {
                gate, decision, by, ..
            } => {
                let kind = if *by == Principal::system() {
                    NotificationKind::GateTimedOut
                } else {
                    NotificationKind::GateDecided
                };
                let mut n = self.notification(kind, *gate, event);
                n.decision = Some(decision.kind());
                n.by = Some(by.clone());
                changes.push(IndexChange::Notify(Box::new(n)));
                changes.push(IndexChange::Decided {
                    gate: *gate,
                    kind: decision.kind(),
                    by: by.clone(),
                    at: event.at,
                });
                self.open_gates.retain(|g| g != gate);
                self.clear_deadline(*gate, &mut changes);
                changes.push(IndexChange::GateClosed(*gate));
                changes.push(IndexChange::Wake(event.at));
            }
            EventKind::VoteRecorded { gate, vote, by, .. } => {
                if self.open_gates.contains(gate) {
                    changes.push(IndexChange::GateChanged(
                        *gate,
                        GateChange::Vote {
                            by: by.clone(),
                            vote: vote.clone(),
                        },
                    ));
                }
            }
            EventKind::GateEscalated {
                gate,
                level,
                roles,
                deadline,
            } => {
                if self.open_gates.contains(gate) {
                    match deadline {
                        Some(at) => self.set_deadline(*gate, *at, &mut changes),
                        None => self.clear_deadline(*gate, &mut changes),
                    }
                    changes.push(IndexChange::GateChanged(
                        *gate,
                        GateChange::Escalated {
                            level: *level,
                            roles: roles.clone(),
                            deadline: *deadline,
                        },
                    ));
                    let mut n = self.notification(NotificationKind::GateEscalated, *gate, event);
                    n.level = Some(*level);
                    n.deadline = *deadline;
                    changes.push(IndexChange::Notify(Box::new(n)));
                }
            }
            EventKind::TimerStarted { position, .. } => {
                if !self.open_timers.contains(position) {
                    self.open_timers.push(*position);
                }
            }
            EventKind::TimerFired { position } => self.open_timers.retain(|p| p != position),
            EventKind::RunCompleted { .. } | EventKind::RunFailed { .. } | EventKind::RunCancelled { .. } => {
                for gate in self.open_gates.drain(..) {
                    changes.push(IndexChange::GateClosed(gate));
                }
                for (gate, at) in self.deadlines.drain(..) {
                    changes.push(IndexChange::DeadlineCleared { gate, at });
                }
                self.open_timers.clear();
                self.wake_at = None;
                changes.push(IndexChange::Ended);
            }
            EventKind::PolicyEvaluated {
                rule: Some(rule),
                trusted: true,
                position,
                ..
            } => changes.push(IndexChange::TrustedAllow {
                rule: rule.clone(),
                position: *position,
                at: event.at,
            }),
            EventKind::StepStarted { .. }
            | EventKind::StepCompleted { .. }
            | EventKind::StepFailed { .. }
            | EventKind::ValueRecorded { .. }
            | EventKind::PolicyEvaluated { .. }
            | EventKind::GateResumed { .. }
            | EventKind::DecisionTakenIn { .. } => {}
        }
        self.status = match &event.event {
            EventKind::RunCompleted { .. } => RunStatus::Completed,
            EventKind::RunFailed { .. } => RunStatus::Failed,
            EventKind::RunCancelled { .. } => RunStatus::Cancelled,
            _ if self.stuck.is_some() => RunStatus::Stuck,
            _ if !self.open_gates.is_empty() || !self.open_timers.is_empty() => RunStatus::Waiting,
            _ => RunStatus::Running,
        };
        changes
    }
}

/// A gate awaiting a decision, as the inbox shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingGate {
    pub run: RunId,
    pub gate: GateId,
    pub workflow: String,
    pub kind: GateKind,
    pub action: String,
    pub args: Value,
    pub context: Value,
    pub reason: String,
    pub allowed: Vec<DecisionKind>,
    /// The current deadline (of the current approver group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    pub requested_at: DateTime<Utc>,
    /// The policy rule that asked for the gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The current approver group (0 = first).
    #[serde(default)]
    pub level: u32,
    /// Roles that may decide now (empty: any reviewer).
    #[serde(default)]
    pub roles: Vec<String>,
    /// Approvals needed.
    #[serde(default = "one")]
    pub quorum: u32,
    /// Approvals so far (of the current version of the request).
    #[serde(default)]
    pub approvals: Vec<Principal>,
    /// The hash a decision names to be bound to this request.
    #[serde(default)]
    pub request_hash: String,
}

fn one() -> u32 {
    1
}

/// A decision at a gate a policy rule asked for, in that rule's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuleDecision {
    /// `auto`: allowed on trust, nobody asked (`kind` is then `approve` and `by` system).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto: bool,
    pub kind: DecisionKind,
    pub by: Principal,
    pub at: DateTime<Utc>,
    pub run: RunId,
    pub gate: GateId,
}

/// A gate whose deadline is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DueDeadline {
    pub run: RunId,
    pub gate: GateId,
    pub at: DateTime<Utc>,
}

/// A worker's claim on a run. While it holds, no other worker drives the run, and
/// appends carrying its token are the only positional appends accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub run: RunId,
    pub owner: WorkerId,
    pub token: LeaseToken,
    pub expires_at: DateTime<Utc>,
    /// Set when something made the run ready while it was leased (a decision arrived
    /// mid-activation): on release it goes straight back to the ready queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewake_at: Option<DateTime<Utc>>,
}

/// A decision as recorded, for conflict reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedDecision {
    pub gate: GateId,
    pub decision: Decision,
    pub by: Principal,
    pub comment: Option<String>,
    pub idempotency_key: Option<String>,
    pub seq: Seq,
    pub at: DateTime<Utc>,
}

/// Where journals live. See the module docs for the invariant every implementation keeps.
///
/// Durability: `create_run` and `append` return only once their events are on disk
/// (each store documents exactly which failures that survives). Everything else
/// (leases, wake-ups, stuck marks) may be lost in a crash and is rebuilt on open.
pub trait Store: Send + Sync + 'static {
    /// Creates a run with its `run-started` event, durably, unless the idempotency key
    /// names an existing run.
    fn create_run(&self, run: NewRun) -> impl Future<Output = Result<Created>> + Send;

    /// Appends events at `expected`, durably, updating indexes in the same atomic write.
    /// `Ok(Err(conflict))` when the run's next seq is not `expected`.
    fn append(
        &self,
        append: Append,
    ) -> impl Future<Output = Result<std::result::Result<Appended, AppendConflict>>> + Send;

    /// The run's events from `from` on, each verified (checksum, hash chain, envelope),
    /// and the chain checked up to the summary's head. Corruption is an error naming the
    /// first bad seq; nothing past it is returned.
    fn read(&self, run: RunId, from: Seq) -> impl Future<Output = Result<Vec<Event>>> + Send;

    fn summary(&self, run: RunId) -> impl Future<Output = Result<Option<RunSummary>>> + Send;

    /// Runs in id (= creation time) order after `after`, optionally of one status.
    fn list_runs(
        &self,
        status: Option<RunStatus>,
        after: Option<RunId>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RunSummary>>> + Send;

    /// Open gates in (run, gate) order after `after`, read from an index of open gates
    /// only (never a scan of all runs).
    fn pending(
        &self,
        after: Option<(RunId, GateId)>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<PendingGate>>> + Send;

    /// Leases up to `max` runs that are due by `now` (or whose lease expired).
    fn claim(
        &self,
        owner: WorkerId,
        now: DateTime<Utc>,
        ttl: Duration,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Lease>>> + Send;

    /// Ends a lease. `wake` schedules the run's next activation (a timer); a wake-up that
    /// arrived during the lease is kept too. A lease that is no longer current is ignored.
    fn release(&self, lease: &Lease, wake: Option<DateTime<Utc>>) -> impl Future<Output = Result<()>> + Send;

    /// Extends a lease that is still current. `Ok(None)` when it is not (another worker
    /// took the run over after it expired): the holder must stop driving the run.
    fn renew(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<Lease>>> + Send;

    /// Parks the run as stuck with a reason, and releases the lease.
    fn mark_stuck(&self, lease: &Lease, reason: String) -> impl Future<Output = Result<()>> + Send;

    /// Whether a worker currently holds a lease on the run.
    fn is_leased(&self, run: RunId) -> impl Future<Output = Result<bool>> + Send;

    /// The earliest time any run needs a worker.
    fn next_wake(&self) -> impl Future<Output = Result<Option<DateTime<Utc>>>> + Send;

    /// Gate deadlines due by `now`, earliest first.
    fn due_deadlines(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DueDeadline>>> + Send;

    /// The latest decisions at gates opened by policy rule `rule`, newest first. An index
    /// derived from `decision-recorded` events, for rules whose trust grows.
    fn rule_history(
        &self,
        rule: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RuleDecision>>> + Send;

    /// The earliest gate deadline.
    fn next_deadline(&self) -> impl Future<Output = Result<Option<DateTime<Utc>>>> + Send;

    /// A counter bumped after every change that could make a run ready or change its
    /// state; workers and waiters watch it instead of polling.
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Largest encoded event the store accepts.
    fn max_event_bytes(&self) -> usize;

    /// How many runs have this status (for metrics; may scan an index).
    fn runs_with_status(&self, status: RunStatus) -> impl Future<Output = Result<usize>> + Send;

    /// How many gates are open (for metrics; may scan an index).
    fn open_gates(&self) -> impl Future<Output = Result<usize>> + Send;

    /// The oldest notifications queued for `endpoint`, in the order their events were
    /// written (at most `limit`). Stores without an outbox queue none.
    fn outbox(&self, endpoint: &str, limit: usize) -> impl Future<Output = Result<Vec<Outgoing>>> + Send {
        let _ = (endpoint, limit);
        async { Ok(Vec::new()) }
    }

    /// Removes a delivered notification from `endpoint`'s queue. Not made durable on
    /// its own: after a crash a delivered notification may be delivered again (its id
    /// lets the receiver tell), never lost.
    fn outbox_done(&self, endpoint: &str, key: u64) -> impl Future<Output = Result<()>> + Send {
        let _ = (endpoint, key);
        async { Ok(()) }
    }
}
