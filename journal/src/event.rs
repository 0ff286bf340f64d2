//! The events of a run's journal.
//!
//! The JSON form is the format: `holdpoint export` writes it, golden journals under
//! `tests/golden/` keep it honest, and the tags (`run-started`, `step-completed`, ...)
//! never change meaning. A change to an existing event's meaning gets a new
//! [`FORMAT_VERSION`]; readers refuse versions they do not know rather than guess.

use crate::ids::{GateId, Position, Principal, RunId, Seq};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// The event format this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;

/// One entry of a run's journal: the envelope plus what happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub run: RunId,
    pub seq: Seq,
    /// Wall-clock time of the append. Informational only: replay never reads it
    /// (workflow code that needs time uses `ctx.now()`, journaled as `value-recorded`).
    pub at: DateTime<Utc>,
    /// Format version of this event.
    pub v: u16,
    pub event: EventKind,
}

/// What happened. Serialized with a `type` tag in kebab-case.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum EventKind {
    /// Always at seq 0.
    RunStarted {
        workflow: String,
        version: u32,
        input: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
    },
    /// A step's body is about to run (live). Durable before the body runs, so a crash
    /// mid-step is seen on recovery and the next attempt gets `attempt + 1`.
    StepStarted {
        position: Position,
        name: String,
        attempt: u32,
    },
    StepCompleted {
        position: Position,
        output: Value,
    },
    StepFailed {
        position: Position,
        error: String,
        retryable: bool,
        attempt: u32,
        /// Whether the engine will try again. `false` makes this the step's final
        /// outcome, so replay returns the error without consulting the retry policy.
        will_retry: bool,
    },
    /// A gate opened: the run waits for a person.
    ApprovalRequested {
        gate: GateId,
        kind: GateKind,
        action: String,
        args: Value,
        /// What a reviewer needs to decide (the agent's explanation, the order, ...).
        context: Value,
        /// Why this gate exists (explicit gate, a policy rule, low confidence, ...).
        reason: String,
        allowed: Vec<DecisionKind>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline: Option<DateTime<Utc>>,
    },
    DecisionRecorded {
        gate: GateId,
        decision: Decision,
        by: Principal,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        comment: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
    },
    /// A nondeterministic value (`ctx.now()`, `ctx.uuid()`, `ctx.random()`) as first seen.
    ValueRecorded {
        position: Position,
        source: ValueSource,
        value: Value,
    },
    /// A durable timer (`ctx.sleep`).
    TimerStarted {
        position: Position,
        fire_at: DateTime<Utc>,
    },
    TimerFired {
        position: Position,
    },
    RunCompleted {
        output: Value,
    },
    RunFailed {
        error: String,
    },
    RunCancelled {
        by: Principal,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl EventKind {
    /// The kebab-case tag, as serialized.
    pub fn tag(&self) -> &'static str {
        match self {
            EventKind::RunStarted { .. } => "run-started",
            EventKind::StepStarted { .. } => "step-started",
            EventKind::StepCompleted { .. } => "step-completed",
            EventKind::StepFailed { .. } => "step-failed",
            EventKind::ApprovalRequested { .. } => "approval-requested",
            EventKind::DecisionRecorded { .. } => "decision-recorded",
            EventKind::ValueRecorded { .. } => "value-recorded",
            EventKind::TimerStarted { .. } => "timer-started",
            EventKind::TimerFired { .. } => "timer-fired",
            EventKind::RunCompleted { .. } => "run-completed",
            EventKind::RunFailed { .. } => "run-failed",
            EventKind::RunCancelled { .. } => "run-cancelled",
        }
    }

    /// The workflow position this event belongs to, for events that workflow code
    /// produces at a position.
    pub fn position(&self) -> Option<Position> {
        match self {
            EventKind::StepStarted { position, .. }
            | EventKind::StepCompleted { position, .. }
            | EventKind::StepFailed { position, .. }
            | EventKind::ValueRecorded { position, .. }
            | EventKind::TimerStarted { position, .. }
            | EventKind::TimerFired { position } => Some(*position),
            EventKind::ApprovalRequested { gate, .. } => Some(gate.position()),
            _ => None,
        }
    }

    /// Events that come from outside the workflow's code (a person or an operator),
    /// and so may land between a worker's reads and appends without meaning the
    /// worker lost its run.
    pub fn is_external(&self) -> bool {
        matches!(
            self,
            EventKind::DecisionRecorded { .. } | EventKind::RunCancelled { .. }
        )
    }

    /// Events after which nothing more may be appended.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            EventKind::RunCompleted { .. } | EventKind::RunFailed { .. } | EventKind::RunCancelled { .. }
        )
    }
}

/// Whether a gate asks to approve an action or asks a question.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GateKind {
    Approval,
    Question,
}

/// A person's decision at a gate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Decision {
    /// Run the action with the arguments as proposed.
    Approve,
    /// Run the action with these arguments instead.
    Edit { args: Value },
    /// Do not run the action; the agent sees the reason.
    Reject { reason: String },
    /// The answer to a question (`ctx.ask`).
    Respond { input: Value },
}

impl Decision {
    pub fn kind(&self) -> DecisionKind {
        match self {
            Decision::Approve => DecisionKind::Approve,
            Decision::Edit { .. } => DecisionKind::Edit,
            Decision::Reject { .. } => DecisionKind::Reject,
            Decision::Respond { .. } => DecisionKind::Respond,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Approve => f.write_str("approve"),
            Decision::Edit { args } => write!(f, "edit {args}"),
            Decision::Reject { reason } => write!(f, "reject ({reason:?})"),
            Decision::Respond { input } => write!(f, "respond {input}"),
        }
    }
}

/// The kinds of decision, for a gate's list of allowed decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecisionKind {
    Approve,
    Edit,
    Reject,
    Respond,
}

impl fmt::Display for DecisionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DecisionKind::Approve => "approve",
            DecisionKind::Edit => "edit",
            DecisionKind::Reject => "reject",
            DecisionKind::Respond => "respond",
        })
    }
}

/// Where a `value-recorded` value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ValueSource {
    Now,
    Uuid,
    Random,
}

impl fmt::Display for ValueSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ValueSource::Now => "now",
            ValueSource::Uuid => "uuid",
            ValueSource::Random => "random",
        })
    }
}
