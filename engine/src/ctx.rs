//! `Ctx`: the workflow author's handle, and the replayer behind it.
//!
//! Every durable call (`step`, `gate`, `ask`, `now`, `uuid`, `random`, `sleep`) takes
//! the next *position*. If the journal has a record at that position the call is
//! answered from it (replay) after checking that the code asks for the same thing;
//! past the journal's end the call runs live and appends.
//!
//! **Architecture Invariant:** engine-level failures (nondeterminism, a lost lease, a
//! storage error, cancellation) never surface in author code. The call that meets one
//! records it and never resolves; the driver notices and drops the whole workflow
//! future. Authors only ever see [`Failure`]s of their own steps, so they cannot catch
//! and ignore a nondeterminism error and carry on wrongly.

use crate::clock::Clock;
use crate::error::{Failure, Nondeterminism};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::FutureExt;
use holdpoint_journal::{
    self as journal, request_hash, AppendConflict, Appended, Decision, DecisionKind, Event, EventKind,
    GateId, GateKind, GateSpec, Position, Principal, RunId, Seq, ValueSource, Verdict,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::btree_map::{BTreeMap, Entry};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

/// Where a `Ctx` appends: the store under a lease, or nowhere (replay checks).
pub(crate) trait Sink: Send + Sync {
    fn append(
        &self,
        expected: Seq,
        events: Vec<EventKind>,
    ) -> BoxFuture<'_, journal::Result<Result<Appended, AppendConflict>>>;
    fn read_from(&self, from: Seq) -> BoxFuture<'_, journal::Result<Vec<Event>>>;
    /// The latest decisions of a policy rule (for trust that grows).
    fn rule_history(
        &self,
        rule: &str,
        limit: usize,
    ) -> BoxFuture<'_, journal::Result<Vec<journal::RuleDecision>>>;
}

/// Why an activation stopped early.
#[derive(Debug)]
pub(crate) enum Abort {
    Nondeterminism(Nondeterminism),
    /// Another worker appended to the run: this activation no longer owns it.
    LeaseLost,
    /// The run was cancelled (or otherwise ended) while being driven.
    Ended,
    Store(journal::Error),
    /// The journal itself does not make sense (events of two kinds at one position).
    Inconsistent(String),
}

/// Marker: this call met an abort and must never resolve.
pub(crate) struct Parked;

/// What a gate or question received.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DecisionInfo {
    pub decision: Decision,
    pub by: Principal,
    pub comment: Option<String>,
}

#[derive(Clone, Debug)]
pub(crate) enum StepOutcome {
    Completed(Value),
    Failed(String),
}

/// What the journal holds at one position.
#[derive(Clone, Debug)]
pub(crate) enum Recorded {
    Step {
        seq: Seq,
        name: String,
        attempts: u32,
        failures: u32,
        outcome: Option<StepOutcome>,
        /// With an outcome: the positions taken when it was handed out (see [`History`]).
        ready: u32,
        /// An at-most-once step whose outcome is unknown: the attempt the question put to
        /// a person was about, and the answer once there is one.
        unknown: Option<(u32, Option<DecisionInfo>)>,
    },
    Gate {
        seq: Seq,
        kind: GateKind,
        action: String,
        args: Value,
        decision: Option<DecisionInfo>,
        /// With a decision: the positions taken when it was handed out, or `None` for a
        /// decision the run took in while it was driven and the code has not gone on
        /// from yet: handed out after every recorded position, and the point journaled
        /// as `gate-resumed`.
        ready: Option<u32>,
    },
    Value {
        seq: Seq,
        source: ValueSource,
        value: Value,
        ready: u32,
    },
    Timer {
        seq: Seq,
        fire_at: DateTime<Utc>,
        /// Once fired: the positions taken when it fired.
        fired: Option<u32>,
    },
    Policy {
        seq: Seq,
        action: String,
        verdict: Verdict,
        rule: Option<String>,
        reason: String,
        spec: Option<GateSpec>,
        ready: u32,
    },
}

impl Recorded {
    fn seq(&self) -> Seq {
        match self {
            Recorded::Step { seq, .. }
            | Recorded::Gate { seq, .. }
            | Recorded::Value { seq, .. }
            | Recorded::Timer { seq, .. }
            | Recorded::Policy { seq, .. } => *seq,
        }
    }

    fn describe(&self) -> String {
        match self {
            Recorded::Step { name, .. } => format!("step {name:?}"),
            Recorded::Gate {
                kind: GateKind::Approval,
                action,
                ..
            } => format!("gate {action:?}"),
            Recorded::Gate {
                kind: GateKind::Question,
                ..
            } => "ask".to_string(),
            Recorded::Value { source, .. } => format!("{source}()"),
            Recorded::Timer { .. } => "sleep".to_string(),
            Recorded::Policy { action, .. } => format!("act {action:?}"),
        }
    }

    fn matches(&self, call: &Call<'_>) -> bool {
        match (self, call) {
            (Recorded::Step { name, .. }, Call::Step(n)) => name == n,
            (Recorded::Gate { kind, action, .. }, Call::Gate(k, a)) => kind == k && action == a,
            (Recorded::Value { source, .. }, Call::Value(s)) => source == s,
            (Recorded::Timer { .. }, Call::Timer) => true,
            (Recorded::Policy { action, .. }, Call::Act(a)) => action == a,
            _ => false,
        }
    }
}

/// What code asks for at a position.
pub(crate) enum Call<'a> {
    Step(&'a str),
    Gate(GateKind, &'a str),
    Value(ValueSource),
    Timer,
    Act(&'a str),
}

impl Call<'_> {
    fn describe(&self) -> String {
        match self {
            Call::Step(n) => format!("step {n:?}"),
            Call::Gate(GateKind::Approval, a) => format!("gate {a:?}"),
            Call::Gate(GateKind::Question, _) => "ask".to_string(),
            Call::Value(s) => format!("{s}()"),
            Call::Timer => "sleep".to_string(),
            Call::Act(a) => format!("act {a:?}"),
        }
    }
}

/// A run's journal, indexed by position for replay.
///
/// **Order of hand-outs.** Positions are taken in the order the code makes its calls, and
/// with concurrent branches (`futures::join!`) that order depends on when each branch got
/// the result it waited for. Replay could hand every recorded result out at once, but then
/// a branch goes on earlier than it did live and takes a position another branch took:
/// `join!(async { gate.await; step("fetch") }, step("fetch"))` would replay the first
/// branch's fetch at the second's position, read its output, and run the second's body
/// again. So each recorded result carries `ready`, the number of positions the journal
/// had opened before the event that handed it out (a step's completion, a decision, a
/// timer's firing, `gate-resumed`), and replay hands it out only once that many
/// positions are taken again. The events a run writes are in the order it produced them,
/// and the code goes on from a result without waiting for anything else, so this is the
/// point where live code went on. A decision that lands while no one drives the run is
/// handed out after everything before it; one that comes in while an activation runs is
/// handed out at once and the point journaled (`gate-resumed`). Something produced live
/// at a recorded position (a timer that fires now, a step interrupted by a crash and run
/// again) waits until every recorded position is taken, since its event lands after them.
#[derive(Clone, Debug, Default)]
pub(crate) struct History {
    pub by_position: BTreeMap<Position, Recorded>,
    pub next_seq: Seq,
    /// The terminal event, if the run has ended.
    pub ended: Option<EventKind>,
    /// Positions the journal has opened so far: one past the highest position of its
    /// events (after the whole journal: every position a replay must take again).
    pub opened: u32,
}

impl History {
    /// Indexes a journal by position, taking the events: each output, argument and
    /// decision moves into the history rather than being copied.
    pub fn build(events: Vec<Event>) -> Result<History, String> {
        let mut h = History::default();
        for e in events {
            h.next_seq = e.seq.next();
            h.add(e)?;
        }
        Ok(h)
    }

    /// The args, decision and `ready` of the gate at `position`, taken out of the
    /// history, once it is decided.
    fn take_decided(&mut self, position: Position) -> Option<(Value, DecisionInfo, Option<u32>)> {
        match self.by_position.entry(position) {
            Entry::Occupied(o)
                if matches!(
                    o.get(),
                    Recorded::Gate {
                        decision: Some(_),
                        ..
                    }
                ) =>
            {
                match o.remove() {
                    Recorded::Gate {
                        args,
                        decision: Some(info),
                        ready,
                        ..
                    } => Some((args, info, ready)),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// Records what the journal holds at a position that must not be taken yet.
    fn take(&mut self, position: Position, recorded: Recorded, tag: &str) -> Result<(), String> {
        if self.by_position.contains_key(&position) {
            return Err(inconsistent(recorded.seq(), tag, position));
        }
        self.by_position.insert(position, recorded);
        Ok(())
    }

    /// Takes in an event read while an activation drives the run (a decision, vote or
    /// escalation another writer appended). Returns the gate a decision answered: the
    /// run journals that it took it in (`decision-taken-in`), and the decision is handed
    /// out at once, not at its `ready`.
    fn absorb(&mut self, e: Event) -> Result<Option<GateId>, String> {
        let undecided = match &e.event {
            EventKind::DecisionRecorded { gate, .. } => match self.by_position.get(&gate.position()) {
                Some(Recorded::Gate { decision: None, .. }) => Some(*gate),
                _ => None,
            },
            _ => None,
        };
        self.add(e)?;
        if let Some(Recorded::Gate { ready, .. }) =
            undecided.and_then(|g| self.by_position.get_mut(&g.position()))
        {
            *ready = None;
        }
        Ok(undecided)
    }

    fn add(&mut self, e: Event) -> Result<(), String> {
        let (seq, tag) = (e.seq, e.event.tag());
        let inconsistent = |p: Position| inconsistent(seq, tag, p);
        if let Some(p) = e.event.position() {
            self.opened = self.opened.max(p.0.saturating_add(1));
        }
        let opened = self.opened;
        match e.event {
            EventKind::StepStarted {
                position,
                name,
                attempt,
                ..
            } => match self.by_position.entry(position) {
                Entry::Vacant(v) => {
                    v.insert(Recorded::Step {
                        seq,
                        name,
                        attempts: attempt,
                        failures: 0,
                        outcome: None,
                        ready: opened,
                        unknown: None,
                    });
                }
                Entry::Occupied(mut o) => match o.get_mut() {
                    Recorded::Step {
                        attempts, name: n, ..
                    } if *n == name => *attempts = (*attempts).max(attempt),
                    _ => return Err(inconsistent(position)),
                },
            },
            EventKind::StepCompleted { position, output } => match self.by_position.get_mut(&position) {
                Some(Recorded::Step { outcome, ready, .. }) => {
                    *outcome = Some(StepOutcome::Completed(output));
                    *ready = opened;
                }
                _ => return Err(inconsistent(position)),
            },
            EventKind::StepFailed {
                position,
                error,
                will_retry,
                ..
            } => match self.by_position.get_mut(&position) {
                Some(Recorded::Step {
                    failures,
                    outcome,
                    ready,
                    ..
                }) => {
                    *failures += 1;
                    if !will_retry {
                        *outcome = Some(StepOutcome::Failed(error));
                        *ready = opened;
                    }
                }
                _ => return Err(inconsistent(position)),
            },
            EventKind::ApprovalRequested {
                gate,
                kind,
                action,
                args,
                ..
            } => {
                if let Some(Recorded::Step { unknown, .. }) = self.by_position.get_mut(&gate.position()) {
                    if action == OUTCOME_UNKNOWN && unknown.is_none() {
                        let asked = args["attempt"].as_u64().unwrap_or(0) as u32;
                        *unknown = Some((asked, None));
                        return Ok(());
                    }
                }
                self.take(
                    gate.position(),
                    Recorded::Gate {
                        seq,
                        kind,
                        action,
                        args,
                        decision: None,
                        ready: None,
                    },
                    tag,
                )?;
            }
            EventKind::DecisionRecorded {
                gate,
                decision,
                by,
                comment,
                ..
            } => match self.by_position.get_mut(&gate.position()) {
                // The first decision wins; the store's callers never record a second.
                // The answer to an at-most-once step's question is acted on live (the
                // step's outcome is journaled then), so it needs no `ready`.
                Some(Recorded::Step {
                    unknown: Some((_, answer)),
                    ..
                }) => {
                    if answer.is_none() {
                        *answer = Some(DecisionInfo {
                            decision,
                            by,
                            comment,
                        });
                    }
                }
                Some(Recorded::Gate {
                    decision: answer,
                    ready,
                    ..
                }) => {
                    if answer.is_none() {
                        *answer = Some(DecisionInfo {
                            decision,
                            by,
                            comment,
                        });
                        *ready = Some(opened);
                    }
                }
                _ => return Err(format!("seq {seq} decides gate {gate}, which was never opened")),
            },
            EventKind::GateResumed { gate } => match self.by_position.get_mut(&gate.position()) {
                Some(Recorded::Gate {
                    decision: Some(_),
                    ready,
                    ..
                }) => *ready = Some(opened),
                _ => return Err(format!("seq {seq} resumes gate {gate}, which has no decision")),
            },
            EventKind::DecisionTakenIn { gate } => match self.by_position.get_mut(&gate.position()) {
                Some(Recorded::Gate {
                    decision: Some(_),
                    ready,
                    ..
                }) => *ready = None,
                _ => {
                    return Err(format!(
                        "seq {seq} takes in a decision for gate {gate}, which has none"
                    ))
                }
            },
            EventKind::ValueRecorded {
                position,
                source,
                value,
            } => {
                self.take(
                    position,
                    Recorded::Value {
                        seq,
                        source,
                        value,
                        ready: opened,
                    },
                    tag,
                )?;
            }
            EventKind::TimerStarted { position, fire_at } => {
                self.take(
                    position,
                    Recorded::Timer {
                        seq,
                        fire_at,
                        fired: None,
                    },
                    tag,
                )?;
            }
            EventKind::TimerFired { position } => match self.by_position.get_mut(&position) {
                Some(Recorded::Timer { fired, .. }) => *fired = Some(opened),
                _ => return Err(inconsistent(position)),
            },
            EventKind::PolicyEvaluated {
                position,
                action,
                verdict,
                rule,
                reason,
                spec,
                ..
            } => {
                self.take(
                    position,
                    Recorded::Policy {
                        seq,
                        action,
                        verdict,
                        rule,
                        reason,
                        spec,
                        ready: opened,
                    },
                    tag,
                )?;
            }
            end @ (EventKind::RunCompleted { .. }
            | EventKind::RunFailed { .. }
            | EventKind::RunCancelled { .. }) => self.ended = Some(end),
            // Votes and escalations change who may decide, not what the code sees: a gate
            // resolves only with `decision-recorded`.
            EventKind::RunStarted { .. }
            | EventKind::VoteRecorded { .. }
            | EventKind::GateEscalated { .. } => {}
        }
        Ok(())
    }
}

fn inconsistent(seq: Seq, tag: &str, position: Position) -> String {
    format!("seq {seq} ({tag}) is at position {position}, which the journal already uses for something else")
}

struct State {
    history: History,
    next_position: u32,
    /// The store's next seq for this run (events appended so far).
    journal_len: Seq,
    /// Events produced but not yet appended.
    buffer: Vec<EventKind>,
    /// Steps whose body is running (or about to).
    in_flight: u32,
    /// Calls waiting for a person or a timer.
    blocked: u32,
    /// Of `blocked`, the gates waiting for their decision, which a decision read from
    /// the journal during the activation wakes ([`Ctx::flush`]). The other blocked
    /// calls (timers, the question after an interrupted at-most-once step) are
    /// answered by the next activation's replay.
    resumable: u32,
    /// Earliest timer among the blocked calls.
    wake_at: Option<DateTime<Utc>>,
    /// The `ready` of each call waiting to hand out its recorded result until that many
    /// positions are taken ([`Ctx::in_order`]).
    waiting: Vec<u32>,
    abort: Option<Abort>,
}

impl State {
    /// Some call waits for a position no branch is going to take: every branch waits
    /// (for its turn, a person or a timer) and no step runs. A replay of the code that
    /// wrote the journal never gets here, as each recorded position was taken by a
    /// call that nothing recorded later held back.
    fn stalled(&self) -> bool {
        self.in_flight == 0
            && !self.waiting.is_empty()
            && self.waiting.iter().all(|&ready| ready > self.next_position)
    }
}

/// What a `Ctx` borrows from its engine.
pub(crate) struct Services {
    pub clock: Arc<dyn Clock>,
    pub max_event_bytes: usize,
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    pub policy: Arc<crate::policy::Policy>,
    pub observer: Option<StepObserver>,
}

/// Called with every step attempt just before its body runs (after its start is
/// durable). For test kits that check what ran, and how often.
pub type StepObserver = Arc<dyn Fn(&StepInfo) + Send + Sync>;

pub(crate) struct Inner {
    run: RunId,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    observer: Option<StepObserver>,
    policy: Arc<crate::policy::Policy>,
    clock: Arc<dyn Clock>,
    sink: Box<dyn Sink>,
    max_event_bytes: usize,
    state: Mutex<State>,
    /// Serializes appends so events reach the journal in the order they were produced.
    append_lock: tokio::sync::Mutex<()>,
    /// Wakes the driver when the run blocks, aborts, or a step finishes.
    pub(crate) signal: Notify,
    /// Wakes the gates waiting for a decision, to look in the history again.
    resumed: Notify,
    /// Wakes the calls waiting for their turn ([`Ctx::in_order`]) when a position is taken.
    taken: Notify,
}

/// The author's handle on a run. Cheap to clone; clones share the run.
#[derive(Clone)]
pub struct Ctx {
    pub(crate) inner: Arc<Inner>,
}

tokio::task_local! {
    static STEP: StepInfo;
}

/// Facts about the step attempt that is running, available inside a step's body via
/// [`StepInfo::current`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepInfo {
    pub run: RunId,
    pub position: Position,
    pub attempt: u32,
    /// `"{run}/{position}"`: the same for every attempt of this step, so an external
    /// system given it can deduplicate retries.
    pub idempotency_key: String,
    /// The step was declared [`Step::idempotent`]: a crash during its body can run this
    /// same attempt again.
    pub idempotent: bool,
}

impl StepInfo {
    /// The running step's info, or `None` outside a step body.
    pub fn current() -> Option<StepInfo> {
        STEP.try_with(|s| s.clone()).ok()
    }
}

/// How a step is retried after a retryable failure.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. A crash mid-attempt counts as one.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// Run once; never retry.
    pub fn never() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    pub fn attempts(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            ..RetryPolicy::default()
        }
    }

    pub fn with_backoff(mut self, initial: Duration) -> RetryPolicy {
        self.initial_backoff = initial;
        self
    }

    /// Wait after failed attempt `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = self
            .multiplier
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(30) as i32);
        self.initial_backoff.mul_f64(factor).min(self.max_backoff)
    }
}

/// A step to run; `.await` it (or join it with others). Built by [`Ctx::step`].
#[must_use = "a step does nothing until awaited"]
pub struct Step<'a, T, F> {
    ctx: &'a Ctx,
    name: String,
    f: Option<F>,
    retry: RetryPolicy,
    rerun: Rerun,
    running: Option<BoxFuture<'a, Result<T, Failure>>>,
}

/// What may become of a step whose body a crash interrupted, which decides when its
/// `step-started` must be durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rerun {
    /// Run again as the next attempt, counted against the retry budget: the start is
    /// durable before the body runs (the default).
    Counted,
    /// Run again, maybe as the same attempt: the start is journaled with the result.
    Free,
    /// Never run again without a person's word: the start is durable before the body.
    Never,
}

// Sound: `f` is moved out before anything is polled and never pinned in place; the
// running future is pinned in its own box.
impl<T, F> Unpin for Step<'_, T, F> {}

impl<T, F> Step<'_, T, F> {
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The step's effect must never happen twice, and the external system cannot
    /// deduplicate it. If the process stops while it runs, it is not run again on
    /// recovery: the run waits for a person to say whether it happened (a question
    /// with action `outcome-unknown`). Replaces [`Step::idempotent`] if both are given.
    pub fn at_most_once(mut self) -> Self {
        self.rerun = Rerun::Never;
        self
    }

    /// Running the body again is harmless: it only reads or computes, or the system it
    /// calls deduplicates by [`StepInfo::idempotency_key`]. Its `step-started` is then
    /// journaled together with its result instead of durably before the body, which
    /// saves the body a wait for the disk (one group commit per step). The price: after
    /// a crash during the body, before anything else made the start durable, the body
    /// runs again as the same attempt, not counted against the retry budget (so a body
    /// that kills the process every time is not stopped by it). Replaces
    /// [`Step::at_most_once`] if both are given.
    pub fn idempotent(mut self) -> Self {
        self.rerun = Rerun::Free;
        self
    }
}

impl<'a, T, F, Fut> Future for Step<'a, T, F>
where
    F: FnMut() -> Fut + Send + 'a,
    Fut: Future<Output = Result<T, Failure>> + Send + 'a,
    T: Serialize + DeserializeOwned + Send + 'a,
{
    type Output = Result<T, Failure>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.get_mut();
        if this.running.is_none() {
            let Some(f) = this.f.take() else {
                return std::task::Poll::Ready(Err(Failure::terminal("step polled after it finished")));
            };
            let name = std::mem::take(&mut this.name);
            this.running = Some(Box::pin(this.ctx.clone().run_step(
                name,
                f,
                std::mem::take(&mut this.retry),
                None,
                this.rerun,
            )));
        }
        match this.running.as_mut() {
            Some(running) => running.as_mut().poll(cx),
            None => std::task::Poll::Pending,
        }
    }
}

/// The outcome of an approval gate. The approved (or edited) arguments are the only
/// handle to the action's input that the gate gives back, so running the action on a
/// rejection takes deliberate code.
#[derive(Clone, Debug, PartialEq)]
#[must_use = "a gate's outcome says whether the action may run"]
pub enum Gated<A> {
    Approved {
        args: A,
        by: Principal,
        comment: Option<String>,
    },
    Edited {
        args: A,
        by: Principal,
        comment: Option<String>,
    },
    Rejected {
        reason: String,
        by: Principal,
    },
}

impl<A> Gated<A> {
    /// The arguments to run the action with, or the rejection's reason.
    pub fn into_args(self) -> Result<A, String> {
        match self {
            Gated::Approved { args, .. } | Gated::Edited { args, .. } => Ok(args),
            Gated::Rejected { reason, .. } => Err(reason),
        }
    }
}

/// The outcome of [`Ctx::ask`].
#[derive(Clone, Debug, PartialEq)]
pub enum Answer<T> {
    Responded { value: T, by: Principal },
    Declined { reason: String, by: Principal },
}

/// An action to run under the policy; finish with [`Act::run`].
#[must_use = "an action does nothing until run"]
pub struct Act<'a, A> {
    ctx: &'a Ctx,
    action: String,
    args: A,
    context: Value,
    confidence: Option<f64>,
    retry: RetryPolicy,
}

/// How an [`Act`] ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Acted<A, T> {
    /// The action ran with `args` (as allowed, approved or edited).
    Done {
        output: T,
        args: A,
        /// Who approved or edited, when a person was asked.
        approved_by: Option<Principal>,
    },
    /// The policy blocked it; nothing ran.
    Denied { reason: String, rule: Option<String> },
    /// A person rejected it; nothing ran.
    Rejected { reason: String, by: Principal },
}

impl<'a, A> Act<'a, A>
where
    A: Serialize + DeserializeOwned + Send + 'a,
{
    /// What a reviewer needs to decide, if a person is asked.
    pub fn context(mut self, context: impl Serialize) -> Self {
        self.context = serde_json::to_value(context).unwrap_or(Value::Null);
        self
    }

    /// The agent's confidence in this action (0..1), for rules that ask when it is low.
    pub fn confidence(mut self, confidence: f64) -> Self {
        self.confidence = Some(confidence);
        self
    }

    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Runs the policy, maybe a gate, and then `f` with the args to execute.
    pub async fn run<T, F, Fut>(self, mut f: F) -> Result<Acted<A, T>, Failure>
    where
        F: FnMut(A) -> Fut + Send,
        Fut: Future<Output = Result<T, Failure>> + Send,
        T: Serialize + DeserializeOwned + Send,
    {
        let ctx = self.ctx;
        let action = self.action;
        let proposed = encode(&self.args, "action arguments")?;
        drop(self.args);
        let (position, recorded) = match ctx.begin(Call::Act(&action)) {
            Ok(x) => x,
            Err(Parked) => return ctx.park().await,
        };
        let (verdict, rule, reason, spec) = match recorded {
            Some(Recorded::Policy {
                verdict,
                rule,
                reason,
                spec,
                ready,
                ..
            }) => {
                if ctx.in_order(ready).await.is_err() {
                    return ctx.park().await;
                }
                (verdict, rule, reason, spec)
            }
            _ => {
                let mut e = ctx.inner.policy.evaluate(&action, &proposed, self.confidence);
                if let (Some(n), Some(rule)) = (e.trust_after, e.rule.clone()) {
                    // Trust is read live and its verdict journaled like any other. Up to n
                    // runs allowed on trust, then n decisions: 2n entries at most.
                    match ctx.inner.sink.rule_history(&rule, 2 * n as usize).await {
                        Ok(history) => e = e.with_trust(&history),
                        Err(err) => tracing::warn!(%rule, error = %err, "rule history unavailable; asking"),
                    }
                }
                let spec = (e.verdict == Verdict::RequireApproval).then_some(e.gate);
                ctx.push(EventKind::PolicyEvaluated {
                    position,
                    action: action.clone(),
                    verdict: e.verdict,
                    rule: e.rule.clone(),
                    reason: e.reason.clone(),
                    spec: spec.clone(),
                    trusted: e.trusted,
                });
                (e.verdict, e.rule, e.reason, spec)
            }
        };
        let (args, approved_by) = match verdict {
            Verdict::Deny => return Ok(Acted::Denied { reason, rule }),
            Verdict::Allow => (proposed, None),
            Verdict::RequireApproval => {
                let allowed = match spec.as_ref().map(|s| s.allowed.clone()) {
                    Some(a) if !a.is_empty() => a,
                    _ => APPROVAL_DECISIONS.to_vec(),
                };
                let (recorded_args, info) = ctx
                    .open_gate(
                        GateKind::Approval,
                        &action,
                        proposed,
                        self.context,
                        reason,
                        allowed,
                        rule,
                        spec,
                    )
                    .await?;
                match info.decision {
                    Decision::Approve => (recorded_args, Some(info.by)),
                    Decision::Edit { args } => (args, Some(info.by)),
                    Decision::Reject { reason } => return Ok(Acted::Rejected { reason, by: info.by }),
                    Decision::Respond { .. } => {
                        return Err(Failure::terminal(format!(
                            "action {action:?} received a respond decision"
                        )))
                    }
                }
            }
        };
        let hash = request_hash(&action, &args);
        let typed = || {
            serde_json::from_value::<A>(args.clone())
                .map_err(|e| Failure::terminal(format!("arguments for {action:?} do not fit its type: {e}")))
        };
        let output = ctx
            .clone()
            .run_step(
                action.clone(),
                || {
                    let a = typed();
                    let fut = a.map(&mut f);
                    async move { fut?.await }
                },
                self.retry,
                Some(hash),
                Rerun::Counted,
            )
            .await?;
        Ok(Acted::Done {
            output,
            args: typed()?,
            approved_by,
        })
    }
}

/// The action of the question an at-most-once step asks after a crash.
pub const OUTCOME_UNKNOWN: &str = "outcome-unknown";

/// Decisions an approval gate accepts.
pub const APPROVAL_DECISIONS: [DecisionKind; 3] =
    [DecisionKind::Approve, DecisionKind::Edit, DecisionKind::Reject];
/// Decisions a question accepts.
pub const QUESTION_DECISIONS: [DecisionKind; 2] = [DecisionKind::Respond, DecisionKind::Reject];

impl Ctx {
    pub(crate) fn new(run: RunId, history: History, sink: Box<dyn Sink>, services: Services) -> Ctx {
        let journal_len = history.next_seq;
        let Services {
            clock,
            max_event_bytes,
            metrics,
            policy,
            observer,
        } = services;
        Ctx {
            inner: Arc::new(Inner {
                run,
                metrics,
                observer,
                policy,
                clock,
                sink,
                max_event_bytes,
                state: Mutex::new(State {
                    history,
                    next_position: 0,
                    journal_len,
                    buffer: Vec::new(),
                    in_flight: 0,
                    blocked: 0,
                    resumable: 0,
                    wake_at: None,
                    waiting: Vec::new(),
                    abort: None,
                }),
                append_lock: tokio::sync::Mutex::new(()),
                signal: Notify::new(),
                resumed: Notify::new(),
                taken: Notify::new(),
            }),
        }
    }

    /// The run this context drives.
    pub fn run_id(&self) -> RunId {
        self.inner.run
    }

    /// A journaled step: `f` runs until it succeeds, fails terminally, or its retries
    /// are spent; its output is journaled and every replay returns it without running
    /// `f` again. Inside `f`, [`StepInfo::current`] gives the idempotency key.
    pub fn step<T, F, Fut>(&self, name: &str, f: F) -> Step<'_, T, F>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        Step {
            ctx: self,
            name: name.to_string(),
            f: Some(f),
            retry: RetryPolicy::default(),
            rerun: Rerun::Counted,
            running: None,
        }
    }

    /// An approval gate before `action`: the run pauses (durably, holding nothing in
    /// memory) until a person approves, edits or rejects. `context` is what the reviewer
    /// needs to decide.
    pub async fn gate<A>(&self, action: &str, args: A, context: impl Serialize) -> Result<Gated<A>, Failure>
    where
        A: Serialize + DeserializeOwned + Send,
    {
        let args = encode(&args, "gate arguments")?;
        let context = encode(&context, "gate context")?;
        let (recorded_args, info) = self
            .open_gate(
                GateKind::Approval,
                action,
                args,
                context,
                "explicit gate in workflow code".to_string(),
                APPROVAL_DECISIONS.to_vec(),
                None,
                None,
            )
            .await?;
        let decode = |v: Value| {
            serde_json::from_value::<A>(v)
                .map_err(|e| Failure::terminal(format!("arguments for {action:?} do not fit its type: {e}")))
        };
        match info.decision {
            Decision::Approve => Ok(Gated::Approved {
                args: decode(recorded_args)?,
                by: info.by,
                comment: info.comment,
            }),
            Decision::Edit { args } => Ok(Gated::Edited {
                args: decode(args)?,
                by: info.by,
                comment: info.comment,
            }),
            Decision::Reject { reason } => Ok(Gated::Rejected { reason, by: info.by }),
            Decision::Respond { .. } => Err(Failure::terminal(format!(
                "gate {action:?} received a respond decision, which approval gates do not take"
            ))),
        }
    }

    /// Pauses for a person's answer to `question` (decided with `respond`, or declined
    /// with `reject`).
    pub async fn ask<T: DeserializeOwned>(&self, question: &str) -> Result<Answer<T>, Failure> {
        let (_, info) = self
            .open_gate(
                GateKind::Question,
                "ask",
                serde_json::json!({ "question": question }),
                Value::Null,
                "the agent asked a question".to_string(),
                QUESTION_DECISIONS.to_vec(),
                None,
                None,
            )
            .await?;
        match info.decision {
            Decision::Respond { input } => Ok(Answer::Responded {
                value: serde_json::from_value(input).map_err(|e| {
                    Failure::terminal(format!("the answer does not fit the expected type: {e}"))
                })?,
                by: info.by,
            }),
            Decision::Reject { reason } => Ok(Answer::Declined { reason, by: info.by }),
            other => Err(Failure::terminal(format!("a question received {other}"))),
        }
    }

    /// A risky action, guarded by the engine's [`Policy`](crate::policy::Policy): allowed
    /// actions run at once, denied ones never run (the agent gets the reason), and the
    /// rest wait at a gate for a person. The verdict is journaled. The closure gets the
    /// args to execute: the approved or edited ones, never the agent's proposal after a
    /// person changed it; their hash is journaled with the step.
    pub fn act<A>(&self, action: &str, args: A) -> Act<'_, A> {
        Act {
            ctx: self,
            action: action.to_string(),
            args,
            context: Value::Null,
            confidence: None,
            retry: RetryPolicy::default(),
        }
    }

    /// The current time, journaled: replay returns the same instant.
    pub async fn now(&self) -> DateTime<Utc> {
        let clock = self.inner.clock.clone();
        self.value(ValueSource::Now, move |_, _| serde_json::json!(clock.now()))
            .await
    }

    /// A fresh UUID (v7), journaled.
    pub async fn uuid(&self) -> uuid::Uuid {
        self.value(ValueSource::Uuid, |_, _| serde_json::json!(uuid::Uuid::now_v7()))
            .await
    }

    /// A random `u64`, journaled (derived from the run id and position, so even a lost
    /// record would be re-derived identically).
    pub async fn random(&self) -> u64 {
        self.value(ValueSource::Random, |run, position| {
            let mut h = Sha256::new();
            h.update(run.as_bytes());
            h.update(position.0.to_be_bytes());
            let d = h.finalize();
            let mut b = [0; 8];
            b.copy_from_slice(&d[..8]);
            serde_json::json!(u64::from_be_bytes(b))
        })
        .await
    }

    /// A durable timer: the run sleeps (holding nothing in memory) and resumes on any
    /// worker once `duration` has passed, across restarts.
    pub async fn sleep(&self, duration: Duration) {
        let (position, recorded) = match self.begin(Call::Timer) {
            Ok(x) => x,
            Err(Parked) => return self.park().await,
        };
        let fire_at = match recorded {
            Some(Recorded::Timer {
                fired: Some(ready), ..
            }) => {
                if self.in_order(ready).await.is_err() {
                    self.park::<()>().await;
                }
                return;
            }
            Some(Recorded::Timer { fire_at, .. }) => fire_at,
            _ => {
                let d = chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX);
                let now = self.inner.clock.now();
                let fire_at = now.checked_add_signed(d).unwrap_or(now);
                self.push(EventKind::TimerStarted { position, fire_at });
                fire_at
            }
        };
        if self.inner.clock.now() >= fire_at {
            // Fired now: its event lands after every recorded one.
            let end = self.journal_end();
            if self.in_order(end).await.is_err() {
                self.park::<()>().await;
            }
            self.push(EventKind::TimerFired { position });
            return;
        }
        self.block(Some(fire_at)).await
    }

    async fn value<T: DeserializeOwned>(
        &self,
        source: ValueSource,
        live: impl FnOnce(RunId, Position) -> Value,
    ) -> T {
        let (position, recorded) = match self.begin(Call::Value(source)) {
            Ok(x) => x,
            Err(Parked) => return self.park().await,
        };
        let value = match recorded {
            Some(Recorded::Value { value, ready, .. }) => {
                if self.in_order(ready).await.is_err() {
                    return self.park().await;
                }
                value
            }
            _ => {
                let value = live(self.inner.run, position);
                self.push(EventKind::ValueRecorded {
                    position,
                    source,
                    value: value.clone(),
                });
                value
            }
        };
        match serde_json::from_value(value.clone()) {
            Ok(v) => v,
            Err(e) => {
                self.fail(Abort::Inconsistent(format!(
                    "recorded {source}() value {value} at position {position} does not decode: {e}"
                )));
                self.park().await
            }
        }
    }

    async fn run_step<T, F, Fut>(
        self,
        name: String,
        mut f: F,
        retry: RetryPolicy,
        args_hash: Option<String>,
        rerun: Rerun,
    ) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
        T: Serialize + DeserializeOwned,
    {
        let (position, recorded) = match self.begin(Call::Step(&name)) {
            Ok(x) => x,
            Err(Parked) => return self.park().await,
        };
        // A recorded outcome is handed out at its turn; a step that goes on live from a
        // recorded start (run again after a crash, or asking about it) journals after
        // every recorded position, so it waits for them all.
        let ready = match &recorded {
            Some(Recorded::Step {
                outcome: Some(_),
                ready,
                ..
            }) => *ready,
            Some(_) => self.journal_end(),
            None => 0,
        };
        if self.in_order(ready).await.is_err() {
            return self.park().await;
        }
        let in_flight = InFlight::enter(&self);
        let mut attempt = 0;
        if let Some(Recorded::Step {
            seq,
            attempts,
            failures,
            outcome,
            unknown,
            ..
        }) = recorded
        {
            match outcome {
                Some(StepOutcome::Completed(output)) => {
                    // Read from the record in place: no copy of the output for a typed `T`.
                    return match T::deserialize(&output) {
                        Ok(v) => Ok(v),
                        Err(e) => {
                            self.nondeterminism(
                                position,
                                seq,
                                format!("step {name:?} with output {}", preview(&output)),
                                format!("step {name:?} whose output type no longer reads it ({e})"),
                            );
                            self.park().await
                        }
                    };
                }
                Some(StepOutcome::Failed(error)) => return Err(Failure::terminal(error)),
                None => {
                    attempt = attempts;
                    if attempts > failures && rerun == Rerun::Never {
                        // Its effect may have happened and must not happen twice: a
                        // person says what became of it.
                        match unknown {
                            None => {
                                let key = format!("{}/{}", self.inner.run, position);
                                self.push(EventKind::ApprovalRequested {
                                    gate: position.into(),
                                    kind: GateKind::Question,
                                    action: OUTCOME_UNKNOWN.into(),
                                    args: serde_json::json!({"step": name, "attempt": attempts, "idempotency_key": key}),
                                    context: serde_json::json!({
                                        "question": format!("The process stopped while step {name:?} (attempt {attempts}) was running, and it must not run twice. Did it happen?"),
                                        "answers": {"respond {\"ran\": true, \"output\": ...}": "it happened; go on with this output",
                                                    "respond {\"ran\": false}": "it did not; run it again",
                                                    "reject": "give up on this step"},
                                    }),
                                    reason: format!("outcome of at-most-once step {name:?} is unknown after a crash"),
                                    allowed: QUESTION_DECISIONS.to_vec(),
                                    deadline: None,
                                    rule: None,
                                    spec: None,
                                });
                                // Waiting for a person is not a running step.
                                drop(in_flight);
                                return self.block(None).await;
                            }
                            Some((_, None)) => {
                                drop(in_flight);
                                return self.block(None).await;
                            }
                            Some((asked, Some(_))) if asked < attempts => {
                                // Run again on a person's word, and interrupted again: one
                                // question per step, and it may not run twice. Give up.
                                return Err(self.give_up(
                                    position,
                                    attempts,
                                    format!("the outcome of attempt {attempts} is unknown too; an at-most-once step is not run again"),
                                ));
                            }
                            Some((_, Some(answer))) => match answer.decision {
                                Decision::Respond { input } if input["ran"] == Value::Bool(true) => {
                                    let output = input.get("output").cloned().unwrap_or(Value::Null);
                                    self.push(EventKind::StepCompleted {
                                        position,
                                        output: output.clone(),
                                    });
                                    return serde_json::from_value(output).map_err(|e| {
                                        Failure::terminal(format!(
                                            "the output given for step {name:?} does not fit: {e}"
                                        ))
                                    });
                                }
                                Decision::Respond { .. } => {
                                    self.push(EventKind::StepFailed {
                                        position,
                                        error: format!(
                                            "attempt {attempts} did not happen ({} said)",
                                            answer.by
                                        ),
                                        retryable: true,
                                        attempt: attempts,
                                        will_retry: true,
                                    });
                                }
                                other => {
                                    return Err(self.give_up(
                                        position,
                                        attempts,
                                        format!("outcome unknown; {} gave up on it: {other}", answer.by),
                                    ));
                                }
                            },
                        }
                    } else if attempts > failures {
                        // The last attempt started but never reported: the process
                        // stopped mid-step. Its effect may or may not have happened.
                        let will_retry = attempts < retry.max_attempts;
                        let error = format!(
                            "attempt {attempts} was interrupted (the process stopped before it finished)"
                        );
                        self.push(EventKind::StepFailed {
                            position,
                            error: error.clone(),
                            retryable: true,
                            attempt: attempts,
                            will_retry,
                        });
                        if !will_retry {
                            return Err(Failure::terminal(error));
                        }
                    }
                }
            }
        }
        loop {
            attempt += 1;
            self.push(EventKind::StepStarted {
                position,
                name: name.clone(),
                attempt,
                args_hash: args_hash.clone(),
            });
            // The body may have effects: its start must be durable first, so a crash
            // during it is seen (and counted) on recovery. An idempotent step's start
            // goes with its result (or whatever is made durable next).
            if rerun != Rerun::Free && self.flush().await.is_err() {
                return self.park().await;
            }
            let info = StepInfo {
                run: self.inner.run,
                position,
                attempt,
                idempotency_key: format!("{}/{}", self.inner.run, position),
                idempotent: rerun == Rerun::Free,
            };
            if let Some(observe) = &self.inner.observer {
                observe(&info);
            }
            let began = std::time::Instant::now();
            let result = AssertUnwindSafe(STEP.scope(info, f())).catch_unwind().await;
            if let Some(m) = &self.inner.metrics {
                m.step_duration.observe(began.elapsed());
            }
            holdpoint_journal::failpoint::hit("step-after-effect");
            let failure = match result {
                Ok(Ok(value)) => match self.encode_output(&value) {
                    Ok(output) => {
                        self.push(EventKind::StepCompleted {
                            position,
                            output: output.clone(),
                        });
                        // Return what replay will return: the value as read back from JSON.
                        return serde_json::from_value(output).map_err(|e| {
                            Failure::terminal(format!(
                                "step {name:?} output does not read back from JSON: {e}"
                            ))
                        });
                    }
                    Err(f) => f,
                },
                Ok(Err(failure)) => failure,
                Err(panic) => {
                    Failure::retryable(format!("step {name:?} panicked: {}", panic_message(&panic)))
                }
            };
            let will_retry = failure.is_retryable() && attempt < retry.max_attempts;
            self.push(EventKind::StepFailed {
                position,
                error: failure.message().to_string(),
                retryable: failure.is_retryable(),
                attempt,
                will_retry,
            });
            if !will_retry {
                return Err(failure);
            }
            if self.flush().await.is_err() {
                return self.park().await;
            }
            tokio::time::sleep(retry.backoff(attempt)).await;
        }
    }

    /// Records a step's final failure (no retry) and returns it for the workflow.
    fn give_up(&self, position: Position, attempt: u32, error: String) -> Failure {
        self.push(EventKind::StepFailed {
            position,
            error: error.clone(),
            retryable: false,
            attempt,
            will_retry: false,
        });
        Failure::terminal(error)
    }

    fn encode_output<T: Serialize>(&self, value: &T) -> Result<Value, Failure> {
        let output = serde_json::to_value(value)
            .map_err(|e| Failure::terminal(format!("step output could not be encoded: {e}")))?;
        self.check_size(&output, "step output")?;
        Ok(output)
    }

    /// Refuses values that would make an event over the store's limit, as a terminal
    /// failure the workflow sees, instead of an append error that would stop the run.
    fn check_size(&self, v: &Value, what: &str) -> Result<(), Failure> {
        let size = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
        // Room for the envelope and the other fields of the event.
        let limit = self.inner.max_event_bytes.saturating_sub(1024);
        if size > limit {
            return Err(Failure::terminal(format!(
                "{what} is {size} bytes; the journal takes at most {limit} per value"
            )));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn open_gate(
        &self,
        kind: GateKind,
        action: &str,
        args: Value,
        context: Value,
        reason: String,
        allowed: Vec<DecisionKind>,
        rule: Option<String>,
        spec: Option<GateSpec>,
    ) -> Result<(Value, DecisionInfo), Failure> {
        let (position, recorded) = match self.begin(Call::Gate(kind, action)) {
            Ok(x) => x,
            Err(Parked) => return self.park().await,
        };
        match recorded {
            Some(Recorded::Gate {
                seq,
                args: recorded_args,
                decision,
                ready,
                ..
            }) => {
                // A decision is bound to the exact arguments the reviewer saw.
                if recorded_args != args {
                    self.nondeterminism(
                        position,
                        seq,
                        format!("gate {action:?} with args {}", preview(&recorded_args)),
                        format!("gate {action:?} with args {}", preview(&args)),
                    );
                    return self.park().await;
                }
                match decision {
                    Some(info) => self.hand_out(position, recorded_args, info, ready).await,
                    None => self.decision_at(position).await,
                }
            }
            _ => {
                self.check_size(&args, "gate arguments")?;
                self.check_size(&context, "gate context")?;
                let deadline = spec
                    .as_ref()
                    .and_then(|s| s.levels.first())
                    .and_then(|l| l.timeout_secs)
                    .map(|secs| {
                        let now = self.inner.clock.now();
                        now.checked_add_signed(chrono::Duration::seconds(secs.min(i64::MAX as u64) as i64))
                            .unwrap_or(now)
                    });
                // The gate goes into the history as a replay would find it, so that a
                // decision read from the journal later in this activation (when a step
                // beside the gate appends) has a gate to answer.
                {
                    let mut s = self.state();
                    let seq = s.journal_len.plus(s.buffer.len() as u64);
                    s.history.by_position.insert(
                        position,
                        Recorded::Gate {
                            seq,
                            kind,
                            action: action.to_string(),
                            args: args.clone(),
                            decision: None,
                            ready: None,
                        },
                    );
                    s.buffer.push(EventKind::ApprovalRequested {
                        gate: position.into(),
                        kind,
                        action: action.to_string(),
                        args,
                        context,
                        reason,
                        allowed,
                        deadline,
                        rule,
                        spec,
                    });
                }
                self.decision_at(position).await
            }
        }
    }

    /// Waits for the decision on the gate at `position`: blocked (the activation may end
    /// here, and the workflow future be dropped) until a decision read from the journal
    /// reaches the history, then the gate's args and the decision, taken out of it.
    async fn decision_at(&self, position: Position) -> Result<(Value, DecisionInfo), Failure> {
        // Beside a running step the activation does not pause here, so the request is
        // appended now: it reaches the journal, and the reviewers' inbox, before that
        // step ends. (Otherwise the driver appends it as the activation pauses, with
        // whatever else is buffered.)
        let beside_a_step = {
            let s = self.state();
            s.in_flight > 0 && !s.buffer.is_empty()
        };
        if beside_a_step && self.flush().await.is_err() {
            return self.park().await;
        }
        loop {
            let resumed = self.inner.resumed.notified();
            tokio::pin!(resumed);
            // Registered before the look, so a resume after it is not missed.
            resumed.as_mut().enable();
            let decided = {
                let mut s = self.state();
                if s.abort.is_some() {
                    None
                } else {
                    let decided = s.history.take_decided(position);
                    if decided.is_none() {
                        s.blocked += 1;
                        s.resumable += 1;
                    }
                    Some(decided)
                }
            };
            match decided {
                None => return self.park().await,
                Some(Some((args, info, ready))) => return self.hand_out(position, args, info, ready).await,
                Some(None) => {}
            }
            self.inner.signal.notify_one();
            resumed.await;
        }
    }

    /// Hands a gate's decision to the code: at its turn, or (one that came in during
    /// this activation) now, journaling the point.
    async fn hand_out(
        &self,
        position: Position,
        args: Value,
        info: DecisionInfo,
        ready: Option<u32>,
    ) -> Result<(Value, DecisionInfo), Failure> {
        match ready {
            Some(ready) => {
                if self.in_order(ready).await.is_err() {
                    return self.park().await;
                }
            }
            // Taken in while the run was driven (now, or before a crash cut the journal
            // short of its `gate-resumed`): the events after the decision were written
            // before the code took it, so it goes on after every recorded position.
            None => {
                let end = self.journal_end();
                if self.in_order(end).await.is_err() {
                    return self.park().await;
                }
                self.push(EventKind::GateResumed {
                    gate: position.into(),
                });
            }
        }
        Ok((args, info))
    }

    /// Wakes the gates waiting for decisions, each to look again (and block again if
    /// its decision is not there).
    fn wake_gates(&self) {
        {
            let mut s = self.state();
            s.blocked -= s.resumable;
            s.resumable = 0;
        }
        self.inner.resumed.notify_waiters();
    }

    /// Waits until `ready` positions are taken, then lets the caller hand out its
    /// result (see [`History`]: a recorded result goes to the code only where the code
    /// got it live). Returns at once in sequential code and for live results.
    async fn in_order(&self, ready: u32) -> Result<(), Parked> {
        if self.state().next_position >= ready {
            return Ok(());
        }
        loop {
            let taken = self.inner.taken.notified();
            tokio::pin!(taken);
            // Registered before the look, so a position taken after it is not missed.
            taken.as_mut().enable();
            {
                let mut s = self.state();
                if s.abort.is_some() {
                    return Err(Parked);
                }
                if s.next_position >= ready {
                    return Ok(());
                }
                s.waiting.push(ready);
            }
            let turn = Turn(self, ready);
            // The driver looks whether any branch can still take those positions.
            self.inner.signal.notify_one();
            taken.await;
            drop(turn);
        }
    }

    /// The number of positions the journal holds: a result produced live at a recorded
    /// position (its event lands after all of them) is handed out once they are all
    /// taken again.
    fn journal_end(&self) -> u32 {
        self.state().history.opened
    }

    // ---- replay machinery -------------------------------------------------------

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the next position and checks it against the journal.
    fn begin(&self, call: Call<'_>) -> Result<(Position, Option<Recorded>), Parked> {
        let mut s = self.state();
        if s.abort.is_some() {
            return Err(Parked);
        }
        let position = Position(s.next_position);
        s.next_position += 1;
        if !s.waiting.is_empty() {
            self.inner.taken.notify_waiters();
        }
        match s.history.by_position.get(&position) {
            // A completed step is read once and nothing reads its position again (only
            // gates take events that arrive later, and `unreached` looks past the
            // current position), so its record, output and all, is handed over rather
            // than copied.
            Some(
                rec @ Recorded::Step {
                    outcome: Some(StepOutcome::Completed(_)),
                    ..
                },
            ) if rec.matches(&call) => Ok((position, s.history.by_position.remove(&position))),
            Some(rec) if rec.matches(&call) => Ok((position, Some(rec.clone()))),
            Some(rec) => {
                let nd = Nondeterminism {
                    run: self.inner.run,
                    seq: rec.seq(),
                    position,
                    expected: rec.describe(),
                    found: call.describe(),
                };
                drop(s);
                self.fail(Abort::Nondeterminism(nd));
                Err(Parked)
            }
            None => {
                if let Some((later, rec)) = s.history.by_position.range(position..).next() {
                    let nd = Nondeterminism {
                        run: self.inner.run,
                        seq: rec.seq(),
                        position,
                        expected: format!(
                            "nothing at this position (next record: {} at position {later})",
                            rec.describe()
                        ),
                        found: call.describe(),
                    };
                    drop(s);
                    self.fail(Abort::Nondeterminism(nd));
                    return Err(Parked);
                }
                Ok((position, None))
            }
        }
    }

    fn push(&self, event: EventKind) {
        self.state().buffer.push(event);
    }

    pub(crate) fn fail(&self, abort: Abort) {
        let mut s = self.state();
        if s.abort.is_none() {
            s.abort = Some(abort);
        }
        drop(s);
        self.inner.signal.notify_one();
    }

    fn nondeterminism(&self, position: Position, seq: Seq, expected: String, found: String) {
        self.fail(Abort::Nondeterminism(Nondeterminism {
            run: self.inner.run,
            seq,
            position,
            expected,
            found,
        }));
    }

    /// Never resolves: the driver drops the workflow.
    async fn park<T>(&self) -> T {
        self.inner.signal.notify_one();
        std::future::pending().await
    }

    /// Waits for something from outside this activation (a decision, a timer): never
    /// resolves within it; the next activation replays past it.
    async fn block<T>(&self, wake: Option<DateTime<Utc>>) -> T {
        {
            let mut s = self.state();
            s.blocked += 1;
            if let Some(w) = wake {
                s.wake_at = Some(s.wake_at.map_or(w, |c| c.min(w)));
            }
        }
        self.park().await
    }

    pub(crate) fn take_abort(&self) -> Option<Abort> {
        self.state().abort.take()
    }

    /// `Some(wake)` once every live branch waits on a person or a timer and no step is
    /// running: the activation can end. `wake` is the earliest timer, if any.
    pub(crate) fn suspension(&self) -> Option<Option<DateTime<Utc>>> {
        let s = self.state();
        (s.blocked > 0 && s.in_flight == 0 && s.waiting.is_empty()).then_some(s.wake_at)
    }

    /// Why the code can go no further, when a call waits for its turn and no branch is
    /// going to take the positions before it: the code is not the code that wrote the
    /// journal.
    pub(crate) fn stalled(&self) -> Option<Nondeterminism> {
        let s = self.state();
        if !s.stalled() {
            return None;
        }
        let next = Position(s.next_position);
        let (position, seq, expected) = match s.history.by_position.range(next..).next() {
            Some((p, rec)) => (*p, rec.seq(), rec.describe()),
            None => (next, Seq::ZERO, "a call at this position".to_string()),
        };
        Some(Nondeterminism {
            run: self.inner.run,
            seq,
            position,
            expected,
            found: "every branch waits and none makes the call the journal records here".to_string(),
        })
    }

    /// Positions the journal records that the code never reached.
    pub(crate) fn unreached(&self) -> Option<Nondeterminism> {
        let s = self.state();
        let (position, rec) = s.history.by_position.range(Position(s.next_position)..).next()?;
        Some(Nondeterminism {
            run: self.inner.run,
            seq: rec.seq(),
            position: *position,
            expected: rec.describe(),
            found: "the workflow returned without reaching it".to_string(),
        })
    }

    pub(crate) fn ended(&self) -> Option<EventKind> {
        self.state().history.ended.clone()
    }

    pub(crate) fn next_position(&self) -> Position {
        Position(self.state().next_position)
    }

    pub(crate) fn push_final(&self, event: EventKind) {
        self.push(event)
    }

    pub(crate) fn value_fits(&self, v: &Value) -> Result<(), Failure> {
        self.check_size(v, "workflow output")
    }

    /// Appends everything produced so far (durably). On a seq conflict, events that came
    /// from outside (decisions, votes, escalations, cancellation) are taken in and the
    /// append retried, and a decision wakes the gate waiting for it; any other writer
    /// means this activation lost the run.
    pub(crate) async fn flush(&self) -> Result<(), Parked> {
        let _order = self.inner.append_lock.lock().await;
        let (mut events, mut expected) = {
            let mut s = self.state();
            if s.abort.is_some() {
                return Err(Parked);
            }
            if s.buffer.is_empty() {
                return Ok(());
            }
            (std::mem::take(&mut s.buffer), s.journal_len)
        };
        loop {
            match self.inner.sink.append(expected, events.clone()).await {
                Ok(Ok(appended)) => {
                    self.state().journal_len = appended.next;
                    return Ok(());
                }
                Ok(Err(_conflict)) => {
                    let new = match self.inner.sink.read_from(expected).await {
                        Ok(new) => new,
                        Err(e) => {
                            self.fail(Abort::Store(e));
                            return Err(Parked);
                        }
                    };
                    if new.is_empty() {
                        self.fail(Abort::LeaseLost);
                        return Err(Parked);
                    }
                    let read = new.len() as u64;
                    let mut s = self.state();
                    for e in new {
                        let outcome = match e.event {
                            // What people add to a run while it is driven: a decision
                            // answers its gate; a vote or an escalation changes who may
                            // decide, nothing the code sees (the history takes them as
                            // no-ops). Only the workflow's own events, which no one
                            // else may append, mean the run was lost.
                            EventKind::DecisionRecorded { .. }
                            | EventKind::VoteRecorded { .. }
                            | EventKind::GateEscalated { .. } => match s.history.absorb(e) {
                                // Journaled with the events that follow the decision,
                                // which were written before the code took it.
                                Ok(Some(gate)) => {
                                    events.insert(0, EventKind::DecisionTakenIn { gate });
                                    Ok(())
                                }
                                Ok(None) => Ok(()),
                                Err(e) => Err(Abort::Inconsistent(e)),
                            },
                            EventKind::RunCancelled { .. } => Err(Abort::Ended),
                            _ => Err(Abort::LeaseLost),
                        };
                        if let Err(abort) = outcome {
                            drop(s);
                            self.fail(abort);
                            return Err(Parked);
                        }
                    }
                    expected = expected.plus(read);
                    s.journal_len = expected;
                    drop(s);
                    self.wake_gates();
                }
                Err(journal::Error::LeaseLost(_)) => {
                    self.fail(Abort::LeaseLost);
                    return Err(Parked);
                }
                Err(journal::Error::RunEnded(_)) => {
                    self.fail(Abort::Ended);
                    return Err(Parked);
                }
                Err(e) => {
                    self.fail(Abort::Store(e));
                    return Err(Parked);
                }
            }
        }
    }
}

/// A call waiting for its turn, counted in `State::waiting` until it looks again (or is
/// dropped with the workflow).
struct Turn<'a>(&'a Ctx, u32);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut s = self.0.state();
        if let Some(i) = s.waiting.iter().position(|&r| r == self.1) {
            s.waiting.swap_remove(i);
        }
        drop(s);
        // While it waited the activation could not pause; once its branch has gone on,
        // the driver looks again (the branch may end without any other call telling it).
        self.0.inner.signal.notify_one();
    }
}

/// Counts a step as running from before its start is appended until it returns (or is
/// dropped), so the driver never ends an activation under a running step.
struct InFlight<'a>(&'a Ctx);

impl<'a> InFlight<'a> {
    fn enter(ctx: &'a Ctx) -> InFlight<'a> {
        ctx.state().in_flight += 1;
        InFlight(ctx)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut s = self.0.state();
        s.in_flight = s.in_flight.saturating_sub(1);
        let wake = s.in_flight == 0 && (s.blocked > 0 || !s.waiting.is_empty());
        drop(s);
        if wake {
            self.0.inner.signal.notify_one();
        }
    }
}

fn encode<T: Serialize>(v: &T, what: &str) -> Result<Value, Failure> {
    serde_json::to_value(v).map_err(|e| Failure::terminal(format!("{what} could not be encoded: {e}")))
}

/// A value shortened for one line of a diff.
pub(crate) fn preview(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 120 {
        format!("{}…", s.chars().take(120).collect::<String>())
    } else {
        s
    }
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-text payload".to_string()
    }
}
