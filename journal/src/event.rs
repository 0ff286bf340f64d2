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

/// The newest event format this build writes and reads. Each event is written with the
/// lowest version that can express it ([`EventKind::format`]), so journals that use no
/// v2 feature stay v1, byte for byte.
///
/// - v1: the original events.
/// - v2: `policy-evaluated`, `vote-recorded`, `gate-escalated`; gates with a
///   [`GateSpec`] or a policy rule; decisions bound to a request hash; steps that record
///   the hash of the args they executed. A v1 reader must refuse these rather than
///   ignore a quorum or a binding it does not know.
/// - v3: `decision-taken-in`, `gate-resumed`. A v2 reader would replay such a journal
///   with the decision handed out too early, so it must refuse it.
pub const FORMAT_VERSION: u16 = 3;

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

/// Declares [`EventKind`] once and derives from the same lines what its `Deserialize`
/// needs: each variant's fields as a struct of their own (`kind_fields`, with the same
/// serde attributes) and the tag as a fieldless enum (`Tag`). serde's derive for an
/// internally tagged enum buffers every event into an untyped tree before reading it
/// again as its variant; the tag comes first in every event this crate writes, so
/// [`EventKind`]'s deserializer reads the tag and then the fields straight into their
/// variant, and only a map that does not start with its tag is buffered. Variants are
/// struct-like (`Name { field: Type, ... }`), which is all the macro accepts.
macro_rules! event_kinds {
    (
        $(#[$enum_meta:meta])*
        pub enum EventKind {
            $(
                $(#[$variant_meta:meta])*
                $variant:ident {
                    $( $(#[$field_meta:meta])* $field:ident : $ty:ty ),* $(,)?
                }
            ),* $(,)?
        }
    ) => {
        $(#[$enum_meta])*
        pub enum EventKind {
            $(
                $(#[$variant_meta])*
                $variant { $( $(#[$field_meta])* $field: $ty ),* },
            )*
        }

        /// Each variant's fields without the tag, read by [`EventKind`]'s deserializer.
        mod kind_fields {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[derive(Deserialize)]
                pub(super) struct $variant {
                    $( $(#[$field_meta])* pub(super) $field: $ty, )*
                    /// A second `type` key, refused as serde's tagged enums refuse it.
                    #[serde(rename = "type", default)]
                    #[allow(dead_code)]
                    pub(super) duplicate_tag: Option<super::DuplicateTag>,
                }
            )*
        }

        /// How many variants [`EventKind`] has (the decoder's tests cover each).
        #[cfg(test)]
        const VARIANTS: usize = [$(stringify!($variant)),*].len();

        /// The tags, spelled as [`EventKind`] serializes them.
        #[derive(Deserialize)]
        #[serde(rename_all = "kebab-case")]
        enum Tag {
            $($variant),*
        }

        impl EventKind {
            /// The event tagged `tag` from the rest of its map.
            fn from_fields<'de, D: serde::Deserializer<'de>>(tag: Tag, fields: D) -> Result<EventKind, D::Error> {
                match tag {
                    $(
                        Tag::$variant => {
                            let f = kind_fields::$variant::deserialize(fields)?;
                            Ok(EventKind::$variant { $( $field: f.$field ),* })
                        }
                    )*
                }
            }
        }
    };
}

event_kinds! {
/// What happened. Serialized with a `type` tag in kebab-case, written first.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum EventKind {
    /// Always at seq 0.
    RunStarted {
        workflow: String,
        version: u32,
        input: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
        /// Who started the run (v2); never allowed to approve its gates.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        started_by: Option<Principal>,
    },
    /// A step's body is about to run (live). Durable before the body runs, so a crash
    /// mid-step is seen on recovery and the next attempt gets `attempt + 1`.
    StepStarted {
        position: Position,
        name: String,
        attempt: u32,
        /// For an action's step: the hash of the args it executes with, to compare with
        /// the approved request (v2).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        args_hash: Option<String>,
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
        /// The policy rule that asked for this gate (v2).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rule: Option<String>,
        /// Who may decide, how many must approve, what happens at the deadline (v2).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spec: Option<GateSpec>,
    },
    DecisionRecorded {
        gate: GateId,
        decision: Decision,
        by: Principal,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        comment: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
        /// The hash of the request the decider saw (v2).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_hash: Option<String>,
    },
    /// One approver's vote at a gate that needs several (v2). An `edit` vote revises the
    /// request: earlier approvals were for other args and no longer count.
    VoteRecorded {
        gate: GateId,
        vote: Decision,
        by: Principal,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        comment: Option<String>,
        request_hash: String,
    },
    /// A gate's deadline passed and it moved to the next approver group (v2).
    GateEscalated {
        gate: GateId,
        level: u32,
        roles: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline: Option<DateTime<Utc>>,
    },
    /// The code waiting at a gate went on with its decision here (v3). Written when the
    /// decision reached the run while it was being driven (a step beside the gate still
    /// running), so that replay hands the decision out at this point of the journal, after
    /// the positions other branches took in the meantime, and not at the decision's own
    /// seq. A decision that lands while no one drives the run needs none.
    GateResumed {
        gate: GateId,
    },
    /// The run read this gate's decision while it was being driven (v3), appended with the
    /// run's next events. Until the `gate-resumed` that follows it, the code has not gone
    /// on from the decision: a replay of a journal cut between the two (a crash) hands the
    /// decision out after every recorded position, not at the decision's own seq, since
    /// the events after the decision were written before the code took it.
    DecisionTakenIn {
        gate: GateId,
    },
    /// What the policy said about an action, journaled so replay never asks a policy
    /// that may have changed since (v2).
    PolicyEvaluated {
        position: Position,
        action: String,
        verdict: Verdict,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rule: Option<String>,
        reason: String,
        /// The gate the rule asks for (with `require-approval`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spec: Option<GateSpec>,
        /// Allowed because the rule's trust has grown (no person was asked).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        trusted: bool,
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
            EventKind::VoteRecorded { .. } => "vote-recorded",
            EventKind::GateEscalated { .. } => "gate-escalated",
            EventKind::PolicyEvaluated { .. } => "policy-evaluated",
            EventKind::GateResumed { .. } => "gate-resumed",
            EventKind::DecisionTakenIn { .. } => "decision-taken-in",
        }
    }

    /// The lowest format version that can express this event.
    pub fn format(&self) -> u16 {
        match self {
            EventKind::GateResumed { .. } | EventKind::DecisionTakenIn { .. } => 3,
            EventKind::VoteRecorded { .. }
            | EventKind::GateEscalated { .. }
            | EventKind::PolicyEvaluated { .. } => 2,
            EventKind::ApprovalRequested { rule, spec, .. } if rule.is_some() || spec.is_some() => 2,
            EventKind::DecisionRecorded {
                request_hash: Some(_),
                ..
            } => 2,
            EventKind::StepStarted {
                args_hash: Some(_), ..
            } => 2,
            EventKind::RunStarted {
                started_by: Some(_), ..
            } => 2,
            _ => 1,
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
            | EventKind::TimerFired { position }
            | EventKind::PolicyEvaluated { position, .. } => Some(*position),
            EventKind::ApprovalRequested { gate, .. }
            | EventKind::GateResumed { gate }
            | EventKind::DecisionTakenIn { gate } => Some(gate.position()),
            _ => None,
        }
    }

    /// Events that come from outside the workflow's code (a person or an operator),
    /// and so may land between a worker's reads and appends without meaning the
    /// worker lost its run.
    pub fn is_external(&self) -> bool {
        matches!(
            self,
            EventKind::DecisionRecorded { .. }
                | EventKind::RunCancelled { .. }
                | EventKind::VoteRecorded { .. }
                | EventKind::GateEscalated { .. }
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

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(KindVisitor)
    }
}

struct KindVisitor;

impl<'de> serde::de::Visitor<'de> for KindVisitor {
    type Value = EventKind;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event: a map with a `type` tag")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<EventKind, A::Error> {
        use serde::de::Error;
        match map.next_key_seed(FirstKey)? {
            None => Err(A::Error::missing_field("type")),
            Some(None) => {
                let tag = map.next_value_seed(TagSeed)?;
                EventKind::from_fields(tag, serde::de::value::MapAccessDeserializer::new(map))
            }
            // Not written by this crate (a map with its keys sorted, say): buffered, the
            // tag taken out, the rest read as the tag's fields.
            Some(Some(first)) => {
                let mut rest = serde_json::Map::new();
                rest.insert(first, map.next_value()?);
                while let Some((key, value)) = map.next_entry::<String, Value>()? {
                    if rest.insert(key.clone(), value).is_some() {
                        return Err(A::Error::custom(format_args!("duplicate field `{key}`")));
                    }
                }
                let tag = rest
                    .remove("type")
                    .ok_or_else(|| A::Error::missing_field("type"))?;
                let tag = serde::de::DeserializeSeed::deserialize(TagSeed, tag).map_err(A::Error::custom)?;
                EventKind::from_fields(tag, Value::Object(rest)).map_err(A::Error::custom)
            }
        }
    }
}

/// Reads a map's first key: `None` for the tag, the key otherwise.
struct FirstKey;

impl<'de> serde::de::DeserializeSeed<'de> for FirstKey {
    type Value = Option<String>;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for FirstKey {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok((key != "type").then(|| key.to_owned()))
    }
}

/// Reads the tag's value, which must be a string naming a variant.
struct TagSeed;

impl<'de> serde::de::DeserializeSeed<'de> for TagSeed {
    type Value = Tag;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Tag, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for TagSeed {
    type Value = Tag;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event's type tag")
    }

    fn visit_str<E: serde::de::Error>(self, tag: &str) -> Result<Tag, E> {
        use serde::de::IntoDeserializer;
        Tag::deserialize(tag.into_deserializer())
    }
}

/// A second `type` key in an event: always an error.
struct DuplicateTag;

impl<'de> Deserialize<'de> for DuplicateTag {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::duplicate_field("type"))
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

/// What a policy said about an action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Runs as an ordinary step.
    Allow,
    /// Blocked; the agent gets the reason; nothing runs.
    Deny,
    /// Waits at a gate for a person.
    RequireApproval,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::RequireApproval => "require-approval",
        })
    }
}

/// Who may decide a gate, how many approvals it needs, and what its deadlines do.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GateSpec {
    /// Approver groups in order. The gate starts at the first; when a group's timeout
    /// passes without a decision it moves to the next. Empty: any reviewer, no deadline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub levels: Vec<ApproverLevel>,
    /// Approvals needed from distinct principals (four-eyes is 2). Any reject ends the gate.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub quorum: u32,
    /// What is recorded when the last group's deadline passes (default-safe: reject).
    #[serde(default, skip_serializing_if = "TimeoutOutcome::is_default")]
    pub on_timeout: TimeoutOutcome,
    /// The decisions the gate takes (empty: approve, edit and reject). For example
    /// approve and reject only, where an edit would be unsafe.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed: Vec<DecisionKind>,
}

fn one() -> u32 {
    1
}
fn is_one(n: &u32) -> bool {
    *n == 1
}

impl GateSpec {
    /// Roles allowed to decide at `level` (empty: any reviewer).
    pub fn roles_at(&self, level: u32) -> &[String] {
        self.levels
            .get(level as usize)
            .map(|l| l.roles.as_slice())
            .unwrap_or(&[])
    }
}

/// One approver group of a gate.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ApproverLevel {
    /// Roles whose holders may decide while the gate is at this level.
    #[serde(default)]
    pub roles: Vec<String>,
    /// How long this group has, in seconds, from when the gate reaches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// What a gate's final deadline records.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimeoutOutcome {
    /// Reject with "timed out": the action does not run.
    #[default]
    Reject,
    /// Approve as proposed (for actions where silence means consent; use with care).
    Approve,
}

impl TimeoutOutcome {
    fn is_default(&self) -> bool {
        *self == TimeoutOutcome::Reject
    }
}

/// The hash that binds a decision to the request a reviewer saw: SHA-256 over the action
/// and its args (canonical JSON: object keys sorted), hex, first 16 bytes.
pub fn request_hash(action: &str, args: &Value) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(action.as_bytes());
    h.update([0]);
    h.update(args.to_string().as_bytes());
    crate::codec::hex(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every variant, each optional field both set and left out.
    fn samples() -> Vec<EventKind> {
        let at = DateTime::<Utc>::from_timestamp(1_800_000_000, 5).unwrap();
        let spec = GateSpec {
            levels: vec![ApproverLevel {
                roles: vec!["finance".into()],
                timeout_secs: Some(60),
            }],
            quorum: 2,
            on_timeout: TimeoutOutcome::Approve,
            allowed: vec![DecisionKind::Approve, DecisionKind::Reject],
        };
        let who = Principal::new("ana");
        let mut out = Vec::new();
        for full in [false, true] {
            let some = |v: &str| full.then(|| v.to_string());
            out.extend([
                EventKind::RunStarted {
                    workflow: "refund".into(),
                    version: 3,
                    input: json!({"order": 7, "note": "type"}),
                    idempotency_key: some("k1"),
                    started_by: full.then(|| who.clone()),
                },
                EventKind::StepStarted {
                    position: Position(1),
                    name: "plan".into(),
                    attempt: 2,
                    args_hash: some("ab12"),
                },
                EventKind::StepCompleted {
                    position: Position(1),
                    output: json!({"type": "not the tag", "n": [1, 2]}),
                },
                EventKind::StepFailed {
                    position: Position(2),
                    error: "boom".into(),
                    retryable: full,
                    attempt: 1,
                    will_retry: !full,
                },
                EventKind::ApprovalRequested {
                    gate: GateId(3),
                    kind: if full {
                        GateKind::Question
                    } else {
                        GateKind::Approval
                    },
                    action: "send_money".into(),
                    args: json!({"amount_cents": 25_000}),
                    context: json!("why"),
                    reason: "explicit gate".into(),
                    allowed: vec![DecisionKind::Approve, DecisionKind::Edit],
                    deadline: full.then_some(at),
                    rule: some("big-refunds"),
                    spec: full.then(|| spec.clone()),
                },
                EventKind::DecisionRecorded {
                    gate: GateId(3),
                    decision: if full {
                        Decision::Edit {
                            args: json!({"amount_cents": 100}),
                        }
                    } else {
                        Decision::Approve
                    },
                    by: who.clone(),
                    comment: some("ok"),
                    idempotency_key: some("d1"),
                    request_hash: some("cd34"),
                },
                EventKind::VoteRecorded {
                    gate: GateId(3),
                    vote: Decision::Reject { reason: "no".into() },
                    by: who.clone(),
                    comment: some("c"),
                    request_hash: "ef56".into(),
                },
                EventKind::GateEscalated {
                    gate: GateId(3),
                    level: 1,
                    roles: vec!["cfo".into()],
                    deadline: full.then_some(at),
                },
                EventKind::PolicyEvaluated {
                    position: Position(4),
                    action: "delete".into(),
                    verdict: if full {
                        Verdict::RequireApproval
                    } else {
                        Verdict::Deny
                    },
                    rule: some("r"),
                    reason: "policy".into(),
                    spec: full.then(|| spec.clone()),
                    trusted: full,
                },
                EventKind::ValueRecorded {
                    position: Position(5),
                    source: ValueSource::Random,
                    value: json!(0.25),
                },
                EventKind::TimerStarted {
                    position: Position(6),
                    fire_at: at,
                },
                EventKind::TimerFired {
                    position: Position(6),
                },
                EventKind::GateResumed { gate: GateId(3) },
                EventKind::DecisionTakenIn { gate: GateId(3) },
                EventKind::RunCompleted { output: json!(null) },
                EventKind::RunFailed { error: "x".into() },
                EventKind::RunCancelled {
                    by: who.clone(),
                    reason: some("stop"),
                },
            ]);
        }
        out
    }

    #[test]
    fn every_event_reads_back_with_its_tag_first_or_anywhere() {
        let samples = samples();
        let tags: std::collections::BTreeSet<_> = samples.iter().map(EventKind::tag).collect();
        assert_eq!(tags.len(), VARIANTS, "the samples cover every variant");
        for event in &samples {
            let text = serde_json::to_string(event).unwrap();
            assert!(
                text.starts_with(&format!("{{\"type\":\"{}\"", event.tag())),
                "{text}"
            );
            // As written: the tag first, read straight into the variant.
            let read: EventKind = serde_json::from_str(&text).unwrap();
            assert_eq!(&read, event, "{text}");
            // Keys sorted (a `Value` map), the tag among them: the buffered way, from a
            // tree and from text.
            let tree = serde_json::to_value(event).unwrap();
            let sorted = tree.to_string();
            assert!(
                !sorted.starts_with("{\"type\""),
                "every variant has a key before `type`: {sorted}"
            );
            assert_eq!(
                &serde_json::from_value::<EventKind>(tree).unwrap(),
                event,
                "{sorted}"
            );
            assert_eq!(
                &serde_json::from_str::<EventKind>(&sorted).unwrap(),
                event,
                "{sorted}"
            );
            // Inside an `Event`, as format-1 records and exports hold it.
            let whole = Event {
                run: RunId::new(),
                seq: Seq(4),
                at: DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap(),
                v: event.format(),
                event: event.clone(),
            };
            let back: Event = serde_json::from_str(&serde_json::to_string(&whole).unwrap()).unwrap();
            assert_eq!(back, whole);
        }
    }

    #[test]
    fn malformed_events_are_refused_as_serde_refuses_a_tagged_enum() {
        let refused = |text: &str, says: &str| {
            let err = serde_json::from_str::<EventKind>(text)
                .expect_err(text)
                .to_string();
            assert!(err.contains(says), "{text}: {err}");
        };
        refused(r#"{"position":1}"#, "missing field `type`");
        refused(r#"{}"#, "missing field `type`");
        refused(r#"{"type":"timer-fired"}"#, "missing field `position`");
        refused(
            r#"{"position":1,"type":"timer-fired","extra":1,"position":2}"#,
            "duplicate field `position`",
        );
        refused(
            r#"{"type":"timer-fired","position":1,"position":2}"#,
            "duplicate field `position`",
        );
        refused(
            r#"{"type":"timer-fired","position":1,"type":"run-failed"}"#,
            "duplicate field `type`",
        );
        refused(
            r#"{"position":1,"type":"timer-fired","type":"run-failed"}"#,
            "duplicate field `type`",
        );
        refused(
            r#"{"type":"no-such-event","position":1}"#,
            "unknown variant `no-such-event`",
        );
        refused(
            r#"{"position":1,"type":"no-such-event"}"#,
            "unknown variant `no-such-event`",
        );
        refused(
            r#"{"type":"TimerFired","position":1}"#,
            "unknown variant `TimerFired`",
        );
        refused(r#"{"type":3,"position":1}"#, "invalid type");
        refused(r#"{"type":{"timer-fired":null},"position":1}"#, "invalid type");
        refused(r#"{"position":1,"type":{"timer-fired":null}}"#, "invalid type");
        refused(r#"{"type":"timer-fired","position":"one"}"#, "invalid type");
        refused(r#""timer-fired""#, "invalid type");
        refused(r#"["timer-fired",1]"#, "invalid type");
        // Fields it does not know are skipped, as before.
        let read: EventKind =
            serde_json::from_str(r#"{"type":"timer-fired","position":1,"later":[1]}"#).unwrap();
        assert_eq!(
            read,
            EventKind::TimerFired {
                position: Position(1)
            }
        );
        let read: EventKind =
            serde_json::from_str(r#"{"later":[1],"position":1,"type":"timer-fired"}"#).unwrap();
        assert_eq!(
            read,
            EventKind::TimerFired {
                position: Position(1)
            }
        );
    }
}
