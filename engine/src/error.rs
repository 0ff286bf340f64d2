//! `engine::Error` (what the engine's API reports), [`Failure`] (what authors' code
//! reports) and [`Nondeterminism`] (code that no longer matches its journal).

use holdpoint_journal::{self as journal, DecisionKind, GateId, Position, RecordedDecision, RunId, Seq};
use std::fmt;

/// Errors of the engine's API (start, decide, cancel, queries). Conflicts and refusals
/// are distinct variants so a server can map each to its status code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The journal layer failed (storage, corruption, limits).
    #[error(transparent)]
    Journal(#[from] journal::Error),

    #[error("no workflow {name:?}{} is registered", version.map(|v| format!(" version {v}")).unwrap_or_default())]
    UnknownWorkflow { name: String, version: Option<u32> },

    /// The start input does not fit the workflow's input type. Nothing was recorded.
    #[error("input for workflow {workflow:?} does not fit its input type: {reason}")]
    InvalidInput { workflow: String, reason: String },

    #[error("unknown run {0}")]
    UnknownRun(RunId),

    #[error("run {run} has no gate {gate}")]
    UnknownGate { run: RunId, gate: GateId },

    /// The run has ended (completed, failed or cancelled): its gates are closed.
    #[error("run {0} has ended")]
    RunEnded(RunId),

    /// The gate was already decided differently. The first decision stands.
    #[error("gate {gate} of run {run} was already decided: {} by {}", recorded.decision, recorded.by)]
    DecisionConflict {
        run: RunId,
        gate: GateId,
        recorded: Box<RecordedDecision>,
    },

    /// The gate does not accept this kind of decision. Nothing was recorded.
    #[error(
        "gate {gate} of run {run} does not accept {kind}; it accepts {}",
        list(allowed)
    )]
    DecisionNotAllowed {
        run: RunId,
        gate: GateId,
        kind: DecisionKind,
        allowed: Vec<DecisionKind>,
    },

    /// Edited arguments that do not fit the action's argument type. Nothing was recorded.
    #[error("edited arguments for {action:?} (gate {gate} of run {run}) do not fit: {reason}")]
    InvalidEdit {
        run: RunId,
        gate: GateId,
        action: String,
        reason: String,
    },

    /// The decider may not decide this gate: not in the gate's roles, the run's own
    /// initiator, or an agent. Nothing was recorded.
    #[error("{by} may not decide gate {gate} of run {run}: {reason}")]
    NotAllowed {
        run: RunId,
        gate: GateId,
        by: holdpoint_journal::Principal,
        reason: String,
    },

    /// The decision names a request that is no longer the gate's (an edit vote revised
    /// it): the decider saw something else. Nothing was recorded.
    #[error(
        "gate {gate} of run {run} changed since it was shown (request {seen}, now {current}); look again"
    )]
    StaleRequest {
        run: RunId,
        gate: GateId,
        seen: String,
        current: String,
    },

    /// A decision that is malformed in itself (an empty reject reason, ...).
    #[error("invalid decision: {0}")]
    InvalidDecision(String),

    /// The registry has a mistake (a workflow registered twice, ...).
    #[error("invalid registry: {0}")]
    Registry(String),

    #[error("could not encode value: {0}")]
    Encode(#[from] serde_json::Error),
}

fn list(kinds: &[DecisionKind]) -> String {
    kinds.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ")
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What an author's step or workflow reports when it fails: a message, and whether
/// trying again could help. Errors are retryable by default; say [`Failure::terminal`]
/// when they are not (a declined card will not become valid by retrying).
///
/// Any `std::error::Error` converts into a retryable `Failure` with `?`.
#[derive(Clone, PartialEq, Eq)]
pub struct Failure {
    message: String,
    retryable: bool,
}

impl Failure {
    pub fn retryable(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            retryable: true,
        }
    }
    pub fn terminal(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            retryable: false,
        }
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::retryable(e.to_string())
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Failure({}: {:?})",
            if self.retryable { "retryable" } else { "terminal" },
            self.message
        )
    }
}

/// Workflow code that no longer matches its journal: at `position` the journal records
/// `expected` but the code now does `found`. Error code HP-ND01. Usual causes: the code
/// changed while runs were paused (register a new version instead), or it branches on
/// something not journaled (wall-clock time, `HashMap` order, unrecorded randomness or
/// I/O outside a step).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("HP-ND01 nondeterminism in run {run} at position {position} (seq {seq}):\n  - journal: {expected}\n  + code:    {found}")]
pub struct Nondeterminism {
    pub run: RunId,
    pub seq: Seq,
    pub position: Position,
    pub expected: String,
    pub found: String,
}
