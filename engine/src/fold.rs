//! `fold`: a run's state from its events alone, without running workflow code.
//!
//! Pure and total: any list of events gives a state (events that do not make sense are
//! skipped, never a panic). Queries use it; so do decisions, which must see the durable
//! journal rather than anyone's memory of it.

use chrono::{DateTime, Utc};
use holdpoint_journal::{
    request_hash, Decision, DecisionKind, Event, EventKind, GateId, GateKind, GateSpec, Position, Principal,
    RecordedDecision, RunId, RunStatus, Seq, Verdict,
};
use serde::Serialize;
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

/// A run's state as its journal tells it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunState {
    pub run: Option<RunId>,
    pub workflow: Option<String>,
    pub version: Option<u32>,
    pub input: Value,
    /// Derived from events: never `Stuck` (that mark lives in the store's index).
    pub status: RunStatus,
    /// Number of events folded.
    pub next_seq: Seq,
    /// One past the highest position any event names.
    pub next_position: Position,
    pub steps: BTreeMap<Position, StepState>,
    pub gates: BTreeMap<GateId, GateState>,
    pub open_timers: BTreeSet<Position>,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub cancelled_by: Option<Principal>,
    /// Who started the run.
    pub started_by: Option<Principal>,
    /// Policy verdicts, by position.
    pub verdicts: BTreeMap<Position, VerdictState>,
}

/// What the policy said about an action.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VerdictState {
    pub action: String,
    pub verdict: Verdict,
    pub rule: Option<String>,
    pub reason: String,
}

/// One approver's vote at a quorum gate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Vote {
    pub by: Principal,
    pub vote: Decision,
    pub comment: Option<String>,
    pub request_hash: String,
    pub seq: Seq,
    pub at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepState {
    pub name: String,
    pub attempts: u32,
    /// Hash of the args an action's step executed with (see `request_hash`).
    pub args_hash: Option<String>,
    pub output: Option<Value>,
    /// The last failure's message.
    pub error: Option<String>,
    /// Completed, or failed with no retry to come.
    pub done: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GateState {
    pub gate: GateId,
    pub kind: GateKind,
    pub action: String,
    pub args: Value,
    pub context: Value,
    pub reason: String,
    pub allowed: Vec<DecisionKind>,
    /// The current deadline (of the current approver group).
    pub deadline: Option<DateTime<Utc>>,
    pub requested_at: DateTime<Utc>,
    pub requested_seq: Seq,
    pub decision: Option<RecordedDecision>,
    pub rule: Option<String>,
    pub spec: GateSpec,
    /// The current approver group.
    pub level: u32,
    /// The args now proposed: the original ones, or the last edit vote's.
    pub current_args: Value,
    /// Votes on the current version of the request (an edit vote starts a new version).
    pub votes: Vec<Vote>,
    /// The hash a decision must name to be bound to the request as it stands.
    pub request_hash: String,
}

impl GateState {
    /// Roles that may decide now (empty: any reviewer).
    pub fn roles(&self) -> &[String] {
        self.spec.roles_at(self.level)
    }

    /// Distinct principals who approved the current version.
    pub fn approvers(&self) -> Vec<&Principal> {
        let mut out: Vec<&Principal> = Vec::new();
        for v in &self.votes {
            if matches!(v.vote, Decision::Approve | Decision::Edit { .. }) && !out.contains(&&v.by) {
                out.push(&v.by);
            }
        }
        out
    }
}

impl RunState {
    /// Gates still waiting for a decision (none once the run has ended).
    pub fn open_gates(&self) -> impl Iterator<Item = &GateState> {
        let ended = self.status.is_terminal();
        self.gates
            .values()
            .filter(move |g| g.decision.is_none() && !ended)
    }
}

impl Default for RunState {
    fn default() -> Self {
        RunState {
            run: None,
            workflow: None,
            version: None,
            input: Value::Null,
            status: RunStatus::Running,
            next_seq: Seq::ZERO,
            next_position: Position(0),
            steps: BTreeMap::new(),
            gates: BTreeMap::new(),
            open_timers: BTreeSet::new(),
            output: None,
            error: None,
            cancelled_by: None,
            started_by: None,
            verdicts: BTreeMap::new(),
        }
    }
}

/// Folds events (in seq order) into a [`RunState`]. Takes them as a slice (what the
/// state keeps is copied) or as a `Vec` (moved: outputs, arguments and decisions go
/// into the state without a copy).
pub fn fold<'a>(events: impl Into<Cow<'a, [Event]>>) -> RunState {
    let mut st = RunState::default();
    match events.into() {
        Cow::Borrowed(events) => {
            for e in events {
                apply(&mut st, e.clone());
            }
        }
        Cow::Owned(events) => {
            for e in events {
                apply(&mut st, e);
            }
        }
    }
    st
}

fn apply(st: &mut RunState, e: Event) {
    let (seq, at) = (e.seq, e.at);
    st.next_seq = seq.next();
    if st.run.is_none() {
        st.run = Some(e.run);
    }
    if let Some(p) = e.event.position() {
        st.next_position = st.next_position.max(Position(p.0.saturating_add(1)));
    }
    if st.status.is_terminal() {
        return;
    }
    match e.event {
        EventKind::RunStarted {
            workflow,
            version,
            input,
            started_by,
            ..
        } => {
            st.workflow = Some(workflow);
            st.version = Some(version);
            st.input = input;
            st.started_by = started_by;
        }
        EventKind::StepStarted {
            position,
            name,
            attempt,
            args_hash,
        } => {
            let s = st.steps.entry(position).or_insert_with(|| StepState {
                name,
                attempts: 0,
                args_hash: None,
                output: None,
                error: None,
                done: false,
            });
            s.attempts = s.attempts.max(attempt);
            if args_hash.is_some() {
                s.args_hash = args_hash;
            }
        }
        EventKind::StepCompleted { position, output } => {
            if let Some(s) = st.steps.get_mut(&position) {
                s.output = Some(output);
                s.done = true;
            }
        }
        EventKind::StepFailed {
            position,
            error,
            will_retry,
            ..
        } => {
            if let Some(s) = st.steps.get_mut(&position) {
                s.error = Some(error);
                s.done = !will_retry;
            }
        }
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
            st.gates.entry(gate).or_insert_with(|| GateState {
                gate,
                kind,
                request_hash: request_hash(&action, &args),
                action,
                current_args: args.clone(),
                args,
                context,
                reason,
                allowed,
                deadline,
                requested_at: at,
                requested_seq: seq,
                decision: None,
                rule,
                spec: spec.unwrap_or_default(),
                level: 0,
                votes: Vec::new(),
            });
        }
        EventKind::VoteRecorded {
            gate,
            vote,
            by,
            comment,
            request_hash: seen,
        } => {
            if let Some(g) = st.gates.get_mut(&gate) {
                if let Decision::Edit { args } = &vote {
                    g.current_args = args.clone();
                    g.request_hash = request_hash(&g.action, args);
                    g.votes.clear();
                }
                g.votes.push(Vote {
                    by,
                    vote,
                    comment,
                    request_hash: seen,
                    seq,
                    at,
                });
            }
        }
        EventKind::GateEscalated {
            gate,
            level,
            deadline,
            ..
        } => {
            if let Some(g) = st.gates.get_mut(&gate) {
                g.level = level;
                g.deadline = deadline;
            }
        }
        EventKind::PolicyEvaluated {
            position,
            action,
            verdict,
            rule,
            reason,
            ..
        } => {
            st.verdicts.insert(
                position,
                VerdictState {
                    action,
                    verdict,
                    rule,
                    reason,
                },
            );
        }
        EventKind::DecisionRecorded {
            gate,
            decision,
            by,
            comment,
            idempotency_key,
            ..
        } => {
            if let Some(g) = st.gates.get_mut(&gate) {
                if g.decision.is_none() {
                    g.decision = Some(RecordedDecision {
                        gate,
                        decision,
                        by,
                        comment,
                        idempotency_key,
                        seq,
                        at,
                    });
                }
            }
        }
        EventKind::ValueRecorded { .. }
        | EventKind::GateResumed { .. }
        | EventKind::DecisionTakenIn { .. } => {}
        EventKind::TimerStarted { position, .. } => {
            st.open_timers.insert(position);
        }
        EventKind::TimerFired { position } => {
            st.open_timers.remove(&position);
        }
        EventKind::RunCompleted { output } => {
            st.output = Some(output);
            st.status = RunStatus::Completed;
            st.open_timers.clear();
            return;
        }
        EventKind::RunFailed { error } => {
            st.error = Some(error);
            st.status = RunStatus::Failed;
            st.open_timers.clear();
            return;
        }
        EventKind::RunCancelled { by, .. } => {
            st.cancelled_by = Some(by);
            st.status = RunStatus::Cancelled;
            st.open_timers.clear();
            return;
        }
    }
    st.status = if st.gates.values().any(|g| g.decision.is_none()) || !st.open_timers.is_empty() {
        RunStatus::Waiting
    } else {
        RunStatus::Running
    };
}
