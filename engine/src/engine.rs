//! `Engine`: starting runs, recording decisions, queries, and the workers that drive
//! runs by replaying their journals.
//!
//! **Write path of an activation.** A worker claims a ready run (a lease), reads and
//! verifies its whole journal, and calls the workflow with a fresh [`Ctx`] over it.
//! Recorded calls are answered from the journal; live ones buffer events, which are
//! appended (durably, under the lease) before any step body runs and when the
//! activation ends. The activation ends when the workflow returns, or when every live
//! branch waits on a person or a timer: then the workflow future is dropped and the
//! lease released. A paused run holds no task, no memory and no lease.

use crate::clock::{Clock, SystemClock};
use crate::ctx::{Abort, Ctx, History, Services, Sink};
use crate::error::{Error, Failure, Nondeterminism, Result};
use crate::fold::{fold, RunState};
use crate::policy::Policy;
use crate::registry::Registry;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::FutureExt;
use holdpoint_journal::{
    self as journal, Append, AppendConflict, Appended, Decision, Event, EventKind, GateId, Lease, NewRun,
    PendingGate, Principal, RecordedDecision, RunId, RunStatus, RunSummary, Seq, Store, TimeoutOutcome,
    WorkerId,
};
use serde::Serialize;
use serde_json::Value;
use std::borrow::Cow;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// Tuning of an engine's workers.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Activations driven at once by [`Engine::spawn_workers`].
    pub concurrency: usize,
    /// How long a lease lasts without renewal. Activations renew at half-life.
    pub lease_ttl: Duration,
    /// Delay before a run whose activation met a storage error is tried again.
    pub retry_after: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            concurrency: 256,
            lease_ttl: Duration::from_secs(30),
            retry_after: Duration::from_secs(1),
        }
    }
}

/// A decision to record at a gate.
#[derive(Clone, Debug, PartialEq)]
pub struct DecisionRequest {
    pub gate: GateId,
    pub decision: Decision,
    /// Who decides: the authenticated principal, never a name taken from a request body.
    pub by: Principal,
    pub comment: Option<String>,
    /// A retry with the same key (and the same decision) is a no-op success.
    pub idempotency_key: Option<String>,
    /// The decider's roles. `None`: a trusted caller in this process (no role checks).
    /// `Some`: checked against the roles the gate names, or, for a gate that names none,
    /// the decider needs `reviewer` (or `admin`); principals with the `agent` role never
    /// decide.
    pub roles: Option<Vec<String>>,
    /// The hash of the request the decider saw (`GateState::request_hash`); a decision
    /// for a request that has since changed is refused.
    pub request_hash: Option<String>,
}

impl DecisionRequest {
    pub fn new(gate: GateId, decision: Decision, by: Principal) -> Self {
        DecisionRequest {
            gate,
            decision,
            by,
            comment: None,
            idempotency_key: None,
            roles: None,
            request_hash: None,
        }
    }
    pub fn roles(mut self, roles: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.roles = Some(roles.into_iter().map(Into::into).collect());
        self
    }
    pub fn request_hash(mut self, hash: impl Into<String>) -> Self {
        self.request_hash = Some(hash.into());
        self
    }
    pub fn approve(gate: GateId, by: Principal) -> Self {
        Self::new(gate, Decision::Approve, by)
    }
    pub fn edit(gate: GateId, args: Value, by: Principal) -> Self {
        Self::new(gate, Decision::Edit { args }, by)
    }
    pub fn reject(gate: GateId, reason: impl Into<String>, by: Principal) -> Self {
        Self::new(
            gate,
            Decision::Reject {
                reason: reason.into(),
            },
            by,
        )
    }
    pub fn respond(gate: GateId, input: Value, by: Principal) -> Self {
        Self::new(gate, Decision::Respond { input }, by)
    }
    pub fn comment(mut self, comment: impl Into<String>) -> Self {
        self.comment = Some(comment.into());
        self
    }
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// What a decision did, durably.
#[derive(Clone, Debug, PartialEq)]
pub enum Decided {
    /// The gate's decision, recorded now.
    Recorded(RecordedDecision),
    /// The same decision with the same idempotency key was recorded before.
    AlreadyRecorded(RecordedDecision),
    /// A vote at a quorum gate, counted (once per principal); the gate is still open.
    Voted { approvals: Vec<Principal>, needed: u32 },
}

impl Decided {
    /// The gate's decision, when there is one.
    pub fn decision(&self) -> Option<&RecordedDecision> {
        match self {
            Decided::Recorded(d) | Decided::AlreadyRecorded(d) => Some(d),
            Decided::Voted { .. } => None,
        }
    }
}

/// Role name of agents' own principals: they can never approve.
pub const AGENT_ROLE: &str = "agent";
/// Role name that may decide any gate.
pub const ADMIN_ROLE: &str = "admin";
/// Role name that may decide gates that name no roles.
pub const REVIEWER_ROLE: &str = "reviewer";

/// Whether a principal holding `held` may decide a gate that names `gate_roles` (empty:
/// any reviewer). Agents never decide; admins always may. `Err` says why not. The
/// engine checks this on every decision; the inbox uses it to show what is actionable.
pub fn roles_may_decide(gate_roles: &[String], held: &[String]) -> std::result::Result<(), String> {
    let holds = |role: &str| held.iter().any(|r| r == role);
    if holds(AGENT_ROLE) {
        return Err("an agent never decides its own gates".into());
    }
    if holds(ADMIN_ROLE) {
        return Ok(());
    }
    if gate_roles.is_empty() {
        if holds(REVIEWER_ROLE) {
            return Ok(());
        }
        return Err(format!("the gate needs one of the roles {REVIEWER_ROLE}"));
    }
    if gate_roles.iter().any(|r| holds(r)) {
        return Ok(());
    }
    Err(format!(
        "the gate needs one of the roles {}",
        gate_roles.join(", ")
    ))
}

/// A run as queries see it: the index summary and the state folded from its journal.
#[derive(Clone, Debug, PartialEq)]
pub struct RunView {
    pub summary: RunSummary,
    pub state: RunState,
}

/// What re-running workflow code over a journal found.
#[derive(Clone, Debug, PartialEq)]
pub enum Replay {
    /// The code matches the journal. `would_append` lists what it would do next past the
    /// journal's end (empty for an ended or paused run).
    Consistent { would_append: Vec<EventKind> },
    /// The code no longer matches.
    Nondeterministic(Nondeterminism),
    /// The journal or the code could not be replayed at all (unknown workflow, a panic,
    /// a journal that contradicts itself).
    Broken(String),
}

/// The engine: one store, one registry, a clock.
pub struct Engine<S: Store> {
    inner: Arc<Inner<S>>,
    released: Released,
}

impl<S: Store> Clone for Engine<S> {
    fn clone(&self) -> Self {
        Engine {
            inner: self.inner.clone(),
            released: Released(self.released.0.clone()),
        }
    }
}

/// Each engine handle's token: dropping a handle wakes whoever waits in
/// [`Engine::into_store_when_released`] to look again. `notify_one` keeps a permit when
/// nobody waits yet, so a drop between that look and the wait is not missed.
struct Released(Arc<tokio::sync::Notify>);

impl Drop for Released {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

struct Inner<S> {
    store: S,
    registry: Registry,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    worker: WorkerId,
    metrics: Arc<crate::metrics::Metrics>,
    policy: Arc<Policy>,
    observer: Option<crate::ctx::StepObserver>,
    run_ids: Option<RunIds>,
}

/// Makes run ids (deterministic ones, for simulations).
pub type RunIds = Arc<dyn Fn() -> RunId + Send + Sync>;

/// Builds an [`Engine`].
pub struct EngineBuilder<S> {
    store: S,
    registry: Registry,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    policy: Policy,
    observer: Option<crate::ctx::StepObserver>,
    run_ids: Option<RunIds>,
}

impl<S: Store> EngineBuilder<S> {
    /// Where new run ids come from (default: fresh UUID v7s). A deterministic source makes
    /// a seeded simulation reproducible.
    pub fn run_ids(mut self, ids: RunIds) -> Self {
        self.run_ids = Some(ids);
        self
    }
    /// Calls `observe` with every step attempt just before its body runs.
    pub fn observe_steps(mut self, observe: impl Fn(&crate::ctx::StepInfo) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(observe));
        self
    }
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }
    pub fn config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }
    /// The guardrails `ctx.act` consults (default: every action waits for a person).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }
    pub fn build(self) -> Result<Engine<S>> {
        self.registry.validate()?;
        Ok(Engine {
            inner: Arc::new(Inner {
                store: self.store,
                registry: self.registry,
                clock: self.clock,
                config: self.config,
                worker: WorkerId::new(),
                metrics: Arc::default(),
                policy: Arc::new(self.policy),
                observer: self.observer,
                run_ids: self.run_ids,
            }),
            released: Released(Arc::default()),
        })
    }
}

fn journal_err(e: journal::Error) -> Error {
    match e {
        journal::Error::UnknownRun(r) => Error::UnknownRun(r),
        journal::Error::RunEnded(r) => Error::RunEnded(r),
        other => Error::Journal(other),
    }
}

impl<S: Store> Engine<S> {
    pub fn new(store: S, registry: Registry) -> Result<Engine<S>> {
        Self::builder(store, registry).build()
    }

    pub fn builder(store: S, registry: Registry) -> EngineBuilder<S> {
        EngineBuilder {
            store,
            registry,
            clock: Arc::new(SystemClock),
            config: EngineConfig::default(),
            policy: Policy::default(),
            observer: None,
            run_ids: None,
        }
    }

    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// Gives the store back (to close it), if no clone of this engine and no worker is
    /// alive; otherwise returns the engine.
    pub fn into_store(self) -> std::result::Result<S, Engine<S>> {
        let Engine { inner, released } = self;
        match Arc::try_unwrap(inner) {
            Ok(inner) => Ok(inner.store),
            Err(inner) => Err(Engine { inner, released }),
        }
    }

    /// Gives the store back once every other handle of this engine (its clones, its
    /// workers, a server's connections) has been dropped. Shutdown paths use it after
    /// stopping whatever held handles: a task that finishes may still be dropping its
    /// handle when the code that awaited it moves on. Waits forever if a handle is
    /// never dropped; bound it with a timeout where that matters.
    pub async fn into_store_when_released(self) -> S {
        let released = self.released.0.clone();
        let mut engine = self;
        loop {
            match engine.into_store() {
                Ok(store) => return store,
                Err(again) => engine = again,
            }
            released.notified().await;
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Review workload per action class, from every journal (see [`crate::stats`]).
    pub async fn stats(&self) -> Result<Vec<crate::stats::ActionStats>> {
        let mut journals = Vec::new();
        let mut after = None;
        loop {
            let page = self.list(None, after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for run in &page {
                match self.events(run.id).await {
                    Ok(events) => journals.push(events),
                    // A corrupt journal is reported by `verify`; stats go on without it.
                    Err(e) => tracing::warn!(run = %run.id, error = %e, "skipping a journal in stats"),
                }
            }
        }
        Ok(crate::stats::review_stats(
            journals.iter().map(|j| j.as_slice()),
            &self.inner.policy,
        ))
    }

    /// The policy `ctx.act` consults.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// What this engine measured about itself.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.inner.metrics
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.inner.clock.now()
    }

    /// Starts a run of the newest registered version of `workflow`. Returns once
    /// `run-started` is durable. A retry with the same `idempotency_key` (and the same
    /// workflow and input) returns the first run instead of starting another.
    pub async fn start<I: Serialize + ?Sized>(
        &self,
        workflow: &str,
        input: &I,
        idempotency_key: Option<&str>,
    ) -> Result<RunId> {
        self.start_as(None, workflow, input, idempotency_key).await
    }

    /// [`Engine::start`], recording who started the run: the initiator can never
    /// approve the run's own actions.
    pub async fn start_as<I: Serialize + ?Sized>(
        &self,
        by: Option<Principal>,
        workflow: &str,
        input: &I,
        idempotency_key: Option<&str>,
    ) -> Result<RunId> {
        let registry = &self.inner.registry;
        let version = registry
            .latest_version(workflow)
            .ok_or_else(|| Error::UnknownWorkflow {
                name: workflow.to_string(),
                version: None,
            })?;
        let registered = registry
            .get(workflow, version)
            .ok_or_else(|| Error::UnknownWorkflow {
                name: workflow.to_string(),
                version: Some(version),
            })?;
        let input = serde_json::to_value(input)?;
        (registered.check_input)(&input).map_err(|reason| Error::InvalidInput {
            workflow: workflow.to_string(),
            reason,
        })?;
        let created = self
            .inner
            .store
            .create_run(NewRun {
                id: self.inner.run_ids.as_ref().map_or_else(RunId::new, |ids| ids()),
                started_by: by,
                workflow: workflow.to_string(),
                version,
                input,
                idempotency_key: idempotency_key.map(str::to_string),
                at: self.inner.clock.now(),
            })
            .await
            .map_err(journal_err)?;
        Ok(created.run())
    }

    /// Records a decision at a gate, durably, after checking it against the journal:
    /// the gate must exist and be open, accept this kind of decision, and an edit must
    /// fit the action's argument type. The first decision wins; a later different one
    /// is a [`Error::DecisionConflict`] naming it.
    pub async fn decide(&self, run: RunId, req: DecisionRequest) -> Result<Decided> {
        if let Decision::Reject { reason } = &req.decision {
            if reason.trim().is_empty() {
                return Err(Error::InvalidDecision(
                    "a rejection needs a reason: the agent is told why".into(),
                ));
            }
        }
        loop {
            let events = self.inner.store.read(run, Seq::ZERO).await.map_err(journal_err)?;
            let state = fold(events);
            let gate = state
                .gates
                .get(&req.gate)
                .ok_or(Error::UnknownGate { run, gate: req.gate })?;
            if let Some(recorded) = &gate.decision {
                let same_retry = req.idempotency_key.is_some()
                    && recorded.idempotency_key == req.idempotency_key
                    && recorded.decision == req.decision
                    && recorded.by == req.by;
                return if same_retry {
                    Ok(Decided::AlreadyRecorded(recorded.clone()))
                } else {
                    Err(Error::DecisionConflict {
                        run,
                        gate: req.gate,
                        recorded: Box::new(recorded.clone()),
                    })
                };
            }
            if state.status.is_terminal() {
                return Err(Error::RunEnded(run));
            }
            let kind = req.decision.kind();
            if !gate.allowed.contains(&kind) {
                return Err(Error::DecisionNotAllowed {
                    run,
                    gate: req.gate,
                    kind,
                    allowed: gate.allowed.clone(),
                });
            }
            let refuse = |reason: String| Error::NotAllowed {
                run,
                gate: req.gate,
                by: req.by.clone(),
                reason,
            };
            if let Some(held) = &req.roles {
                if let Err(why) = roles_may_decide(gate.roles(), held) {
                    return Err(refuse(why));
                }
            }
            let approves = matches!(req.decision, Decision::Approve | Decision::Edit { .. });
            let quorum = gate.spec.quorum.max(1);
            // Four-eyes: where a gate needs several approvers, the one who started the
            // run is never one of them.
            if approves && quorum > 1 && state.started_by.as_ref() == Some(&req.by) {
                return Err(refuse(
                    "the run's initiator cannot approve at a gate that needs several approvers".into(),
                ));
            }
            let current = gate.request_hash.clone();
            if let Some(seen) = &req.request_hash {
                if *seen != current {
                    return Err(Error::StaleRequest {
                        run,
                        gate: req.gate,
                        seen: seen.clone(),
                        current,
                    });
                }
            }
            if let Decision::Edit { args } = &req.decision {
                self.inner
                    .registry
                    .check_edit(&gate.action, &gate.args, args)
                    .map_err(|reason| Error::InvalidEdit {
                        run,
                        gate: req.gate,
                        action: gate.action.clone(),
                        reason,
                    })?;
            }
            let at = self.inner.clock.now();
            let mut events = Vec::new();
            let mut approvals: Vec<Principal> = gate.approvers().into_iter().cloned().collect();
            let mut final_decision = req.decision.clone();
            let mut comment = req.comment.clone();
            if approves && quorum > 1 {
                if matches!(req.decision, Decision::Approve) && approvals.contains(&req.by) {
                    // One person approving twice counts once.
                    return Ok(Decided::Voted {
                        approvals,
                        needed: quorum,
                    });
                }
                events.push(EventKind::VoteRecorded {
                    gate: req.gate,
                    vote: req.decision.clone(),
                    by: req.by.clone(),
                    comment: req.comment.clone(),
                    request_hash: current.clone(),
                });
                let mut args = gate.current_args.clone();
                match &req.decision {
                    Decision::Edit { args: edited } => {
                        args = edited.clone();
                        approvals = vec![req.by.clone()];
                    }
                    _ => approvals.push(req.by.clone()),
                }
                if (approvals.len() as u32) < quorum {
                    self.append_external(run, state.next_seq, at, events).await?;
                    return Ok(Decided::Voted {
                        approvals,
                        needed: quorum,
                    });
                }
                final_decision = if args == gate.args {
                    Decision::Approve
                } else {
                    Decision::Edit { args }
                };
                let names: Vec<&str> = approvals.iter().map(|p| p.as_str()).collect();
                comment = Some(format!(
                    "quorum {} of {quorum}: {}",
                    approvals.len(),
                    names.join(", ")
                ));
            }
            let decided_seq = state.next_seq.plus(events.len() as u64);
            events.push(EventKind::DecisionRecorded {
                gate: req.gate,
                decision: final_decision.clone(),
                by: req.by.clone(),
                comment: comment.clone(),
                idempotency_key: req.idempotency_key.clone(),
                request_hash: Some(current),
            });
            if !self.append_external(run, state.next_seq, at, events).await? {
                // The run moved on (a worker appended): look again.
                continue;
            }
            if let Ok(waited) = (at - gate.requested_at).to_std() {
                self.inner.metrics.decision_latency.observe(waited);
            }
            return Ok(Decided::Recorded(RecordedDecision {
                gate: req.gate,
                decision: final_decision,
                by: req.by,
                comment,
                idempotency_key: req.idempotency_key,
                seq: decided_seq,
                at,
            }));
        }
    }

    /// Appends events that come from outside the workflow (no lease). `false` on a seq
    /// conflict: the caller looks again.
    async fn append_external(
        &self,
        run: RunId,
        expected: Seq,
        at: DateTime<Utc>,
        events: Vec<EventKind>,
    ) -> Result<bool> {
        let appended = self
            .inner
            .store
            .append(Append {
                run,
                expected,
                at,
                events,
                lease: None,
            })
            .await
            .map_err(journal_err)?;
        Ok(appended.is_ok())
    }

    /// Applies every gate deadline that is due: the gate moves to its next approver
    /// group, or its default-safe outcome is recorded as a decision by the system.
    /// Returns how many deadlines were applied.
    pub async fn expire_due(&self) -> Result<usize> {
        let now = self.inner.clock.now();
        let due = self
            .inner
            .store
            .due_deadlines(now, 256)
            .await
            .map_err(journal_err)?;
        let mut applied = 0;
        for d in due {
            match self.expire(d.run, d.gate).await {
                Ok(true) => applied += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(run = %d.run, gate = %d.gate, error = %e, "applying a deadline failed")
                }
            }
        }
        Ok(applied)
    }

    async fn expire(&self, run: RunId, gate_id: GateId) -> Result<bool> {
        loop {
            let now = self.inner.clock.now();
            let events = self.inner.store.read(run, Seq::ZERO).await.map_err(journal_err)?;
            let state = fold(events);
            let Some(gate) = state.gates.get(&gate_id) else {
                return Ok(false);
            };
            let due = gate.deadline.is_some_and(|d| d <= now);
            if gate.decision.is_some() || state.status.is_terminal() || !due {
                return Ok(false);
            }
            let next = gate.level + 1;
            let event = match gate.spec.levels.get(next as usize) {
                Some(level) => EventKind::GateEscalated {
                    gate: gate_id,
                    level: next,
                    roles: level.roles.clone(),
                    deadline: level.timeout_secs.map(|secs| {
                        now.checked_add_signed(chrono::Duration::seconds(secs.min(i64::MAX as u64) as i64))
                            .unwrap_or(now)
                    }),
                },
                None => EventKind::DecisionRecorded {
                    gate: gate_id,
                    decision: match gate.spec.on_timeout {
                        TimeoutOutcome::Reject => Decision::Reject {
                            reason: format!(
                                "timed out: no decision by {}",
                                gate.deadline.map(|d| d.to_rfc3339()).unwrap_or_default()
                            ),
                        },
                        TimeoutOutcome::Approve => Decision::Approve,
                    },
                    by: Principal::system(),
                    comment: Some("deadline passed".into()),
                    idempotency_key: None,
                    request_hash: Some(gate.request_hash.clone()),
                },
            };
            if self
                .append_external(run, state.next_seq, now, vec![event])
                .await?
            {
                return Ok(true);
            }
        }
    }

    /// Cancels a run, durably. A step running at that moment finishes, but nothing
    /// more of the run is recorded or run.
    pub async fn cancel(&self, run: RunId, by: Principal, reason: Option<String>) -> Result<()> {
        loop {
            let summary = self
                .inner
                .store
                .summary(run)
                .await
                .map_err(journal_err)?
                .ok_or(Error::UnknownRun(run))?;
            if summary.status.is_terminal() {
                return Err(Error::RunEnded(run));
            }
            let appended = self
                .inner
                .store
                .append(Append {
                    run,
                    expected: summary.next_seq,
                    at: self.inner.clock.now(),
                    events: vec![EventKind::RunCancelled {
                        by: by.clone(),
                        reason: reason.clone(),
                    }],
                    lease: None,
                })
                .await
                .map_err(journal_err)?;
            if appended.is_ok() {
                return Ok(());
            }
        }
    }

    pub async fn get(&self, run: RunId) -> Result<RunView> {
        let summary = self
            .inner
            .store
            .summary(run)
            .await
            .map_err(journal_err)?
            .ok_or(Error::UnknownRun(run))?;
        let events = self.events(run).await?;
        Ok(RunView {
            summary,
            state: fold(events),
        })
    }

    /// The run's verified journal.
    pub async fn events(&self, run: RunId) -> Result<Vec<Event>> {
        self.inner.store.read(run, Seq::ZERO).await.map_err(journal_err)
    }

    pub async fn list(
        &self,
        status: Option<RunStatus>,
        after: Option<RunId>,
        limit: usize,
    ) -> Result<Vec<RunSummary>> {
        self.inner
            .store
            .list_runs(status, after, limit)
            .await
            .map_err(journal_err)
    }

    pub async fn pending(&self, after: Option<(RunId, GateId)>, limit: usize) -> Result<Vec<PendingGate>> {
        self.inner.store.pending(after, limit).await.map_err(journal_err)
    }

    /// Waits (by notification, not polling) until the run is quiet: ended, stuck, or
    /// paused at a gate or a future timer with no worker on it and no deadline due.
    pub async fn settled(&self, run: RunId) -> Result<RunSummary> {
        let store = &self.inner.store;
        let mut changes = store.changes();
        loop {
            changes.borrow_and_update();
            let first = store
                .summary(run)
                .await
                .map_err(journal_err)?
                .ok_or(Error::UnknownRun(run))?;
            let leased = store.is_leased(run).await.map_err(journal_err)?;
            let again = store
                .summary(run)
                .await
                .map_err(journal_err)?
                .ok_or(Error::UnknownRun(run))?;
            let now = self.inner.clock.now();
            // A due timer or a due gate deadline is work about to happen, not quiet.
            let quiet = again.status.is_terminal()
                || again.status == RunStatus::Stuck
                || (!leased
                    && again.wake_at.is_none_or(|w| w > now)
                    && again.deadlines.iter().all(|(_, at)| *at > now));
            if quiet && first == again {
                return Ok(again);
            }
            if changes.changed().await.is_err() {
                return Ok(again);
            }
        }
    }

    /// Drives every run that is due now, one activation at a time, until none is due.
    /// Deterministic; for tests and one-shot tools. Returns the number of activations.
    pub async fn drain(&self) -> Result<usize> {
        let mut n = 0;
        loop {
            let expired = self.expire_due().await?;
            let leases = self
                .inner
                .store
                .claim(
                    self.inner.worker,
                    self.inner.clock.now(),
                    self.inner.config.lease_ttl,
                    64,
                )
                .await
                .map_err(journal_err)?;
            if leases.is_empty() && expired == 0 {
                return Ok(n);
            }
            for lease in leases {
                self.activate(lease).await;
                n += 1;
            }
        }
    }

    /// Starts workers on the current tokio runtime: they claim ready runs (woken by
    /// store notifications and due timers, never by polling) and drive up to
    /// `config.concurrency` at once.
    pub fn spawn_workers(&self) -> Workers {
        let (stop, mut stop_rx) = watch::channel(Stop::Run);
        let engine = self.clone();
        let handle = tokio::spawn(async move {
            let inner = &engine.inner;
            let slots = Arc::new(Semaphore::new(inner.config.concurrency.max(1)));
            let mut tasks = JoinSet::new();
            let mut changes = inner.store.changes();
            loop {
                if *stop_rx.borrow_and_update() != Stop::Run {
                    break;
                }
                changes.borrow_and_update();
                // A due deadline that could not be applied must not make the timer fire at
                // once forever: then only a change (or another due time) wakes the loop.
                let deadlines_blocked = match engine.expire_due().await {
                    Ok(0) => {
                        let due = inner
                            .store
                            .due_deadlines(inner.clock.now(), 1)
                            .await
                            .map(|d| d.len());
                        due.map_or(true, |n| n > 0)
                    }
                    Ok(_) => false,
                    Err(e) => {
                        tracing::error!(error = %e, "applying deadlines failed");
                        true
                    }
                };
                while tasks.try_join_next().is_some() {}
                let free = slots.available_permits();
                let mut claimed = 0;
                if free > 0 {
                    match inner
                        .store
                        .claim(inner.worker, inner.clock.now(), inner.config.lease_ttl, free)
                        .await
                    {
                        Ok(leases) => {
                            for lease in leases {
                                let Ok(permit) = slots.clone().try_acquire_owned() else {
                                    let _ = inner.store.release(&lease, Some(inner.clock.now())).await;
                                    continue;
                                };
                                claimed += 1;
                                let engine = engine.clone();
                                tasks.spawn(async move {
                                    engine.activate(lease).await;
                                    drop(permit);
                                });
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "claiming ready runs failed"),
                    }
                }
                if claimed > 0 {
                    continue;
                }
                let next_run = if free > 0 {
                    inner.store.next_wake().await.ok().flatten()
                } else {
                    None
                };
                let next_deadline = if deadlines_blocked {
                    None
                } else {
                    inner.store.next_deadline().await.ok().flatten()
                };
                let next = match (next_run, next_deadline) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                // Due already, yet nothing was claimed: another process holds it (its
                // lease ran out but its row is still locked, say). Look again in a
                // while, or on a change, rather than spin.
                let now = inner.clock.now();
                let retry = chrono::Duration::from_std(inner.config.retry_after)
                    .unwrap_or(chrono::Duration::seconds(1));
                let next = next.map(|at| if at <= now { now + retry } else { at });
                let timer: BoxFuture<'static, ()> = match next {
                    Some(at) => inner.clock.sleep_until(at),
                    None => Box::pin(std::future::pending()),
                };
                tokio::select! {
                    r = changes.changed() => if r.is_err() { break },
                    _ = timer => {}
                    _ = stop_rx.changed() => {}
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                }
            }
            if *stop_rx.borrow() == Stop::Kill {
                tasks.abort_all();
            }
            while tasks.join_next().await.is_some() {}
        });
        Workers {
            stop,
            handle: Some(handle),
        }
    }

    /// One activation: read, replay, run live until the run ends or pauses, release.
    async fn activate(&self, lease: Lease) {
        let run = lease.run;
        let store = &self.inner.store;
        let events = match store.read(run, Seq::ZERO).await {
            Ok(events) => events,
            Err(e @ (journal::Error::Corrupt { .. } | journal::Error::UnknownFormat { .. })) => {
                tracing::error!(%run, error = %e, "journal is corrupt; run quarantined");
                self.stuck(&lease, format!("quarantined: {e}")).await;
                return;
            }
            Err(e) => {
                tracing::warn!(%run, error = %e, "reading journal failed; will retry");
                self.release(&lease, Some(self.retry_at())).await;
                return;
            }
        };
        // Nothing follows a terminal event (the store refuses it), so it is the last.
        if events.last().is_some_and(|e| e.event.is_terminal()) {
            self.release(&lease, None).await;
            return;
        }
        let prepared = match prepare(&self.inner.registry, events) {
            Ok(p) => p,
            Err(reason) => {
                self.stuck(&lease, reason).await;
                return;
            }
        };
        let sink = LeasedSink {
            engine: self.inner.clone(),
            run,
            token: lease.token,
        };
        let ctx = Ctx::new(
            run,
            prepared.history,
            Box::new(sink),
            Services {
                clock: self.inner.clock.clone(),
                max_event_bytes: store.max_event_bytes(),
                metrics: Some(self.inner.metrics.clone()),
                policy: self.inner.policy.clone(),
                observer: self.inner.observer.clone(),
            },
        );
        self.inner
            .metrics
            .activations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let workflow = (prepared.run)(ctx.clone(), prepared.input);
        let outcome = tokio::select! {
            outcome = drive(&ctx, workflow) => outcome,
            never = self.keep_lease(&ctx, lease.clone()) => never,
        };
        match conclude(&ctx, outcome).await {
            Conclusion::Suspended(wake) => self.release(&lease, wake).await,
            Conclusion::Ended | Conclusion::Abort(Abort::Ended) | Conclusion::Abort(Abort::LeaseLost) => {
                self.release(&lease, None).await
            }
            Conclusion::Abort(Abort::Nondeterminism(nd)) => {
                tracing::error!(%run, "{nd}");
                self.stuck(&lease, nd.to_string()).await;
            }
            Conclusion::Abort(Abort::Inconsistent(msg)) => {
                self.stuck(&lease, format!("journal inconsistent: {msg}")).await
            }
            Conclusion::Abort(Abort::Store(
                e @ (journal::Error::Corrupt { .. } | journal::Error::EventTooLarge { .. }),
            )) => self.stuck(&lease, e.to_string()).await,
            Conclusion::Abort(Abort::Store(journal::Error::RunLimit { detail, .. })) => {
                // Retrying cannot help: end the run, with the reason.
                self.fail_run(&lease, format!("the run reached its limit: {detail}"))
                    .await;
            }
            Conclusion::Abort(Abort::Store(e)) => {
                tracing::warn!(%run, error = %e, "append failed; run will be retried");
                self.release(&lease, Some(self.retry_at())).await;
            }
            Conclusion::Panicked(msg) => {
                self.stuck(&lease, format!("workflow code panicked outside a step: {msg}"))
                    .await
            }
        }
    }

    /// Renews the lease at half-life for as long as the activation runs. Never returns;
    /// if the lease is lost it stops the activation through the ctx.
    async fn keep_lease(&self, ctx: &Ctx, mut lease: Lease) -> Outcome {
        let ttl = self.inner.config.lease_ttl;
        let half = chrono::Duration::from_std(ttl / 2).unwrap_or(chrono::Duration::seconds(15));
        loop {
            self.inner.clock.sleep_until(lease.expires_at - half).await;
            match self.inner.store.renew(&lease, self.inner.clock.now(), ttl).await {
                Ok(Some(renewed)) => lease = renewed,
                Ok(None) => {
                    ctx.fail(Abort::LeaseLost);
                    return std::future::pending().await;
                }
                Err(e) => tracing::warn!(run = %lease.run, error = %e, "renewing lease failed"),
            }
        }
    }

    fn retry_at(&self) -> DateTime<Utc> {
        self.inner.clock.now() + chrono::Duration::from_std(self.inner.config.retry_after).unwrap_or_default()
    }

    async fn release(&self, lease: &Lease, wake: Option<DateTime<Utc>>) {
        if let Err(e) = self.inner.store.release(lease, wake).await {
            tracing::error!(run = %lease.run, error = %e, "releasing lease failed");
        }
    }

    /// Ends the run as failed (under its lease), then releases it.
    async fn fail_run(&self, lease: &Lease, error: String) {
        let store = &self.inner.store;
        let failed = async {
            let summary = store
                .summary(lease.run)
                .await?
                .ok_or(journal::Error::UnknownRun(lease.run))?;
            store
                .append(Append {
                    run: lease.run,
                    expected: summary.next_seq,
                    at: self.inner.clock.now(),
                    events: vec![EventKind::RunFailed { error }],
                    lease: Some(lease.token),
                })
                .await
        };
        match failed.await {
            Ok(Ok(_)) => {}
            Ok(Err(conflict)) => {
                tracing::warn!(run = %lease.run, %conflict, "could not fail the run; it will be retried")
            }
            Err(e) => tracing::error!(run = %lease.run, error = %e, "could not fail the run"),
        }
        self.release(lease, None).await;
    }

    async fn stuck(&self, lease: &Lease, reason: String) {
        if let Err(e) = self.inner.store.mark_stuck(lease, reason).await {
            tracing::error!(run = %lease.run, error = %e, "marking run stuck failed");
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Run,
    Drain,
    Kill,
}

/// Running workers. Dropping this without [`Workers::shutdown`] asks them to stop.
pub struct Workers {
    stop: watch::Sender<Stop>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Workers {
    /// Graceful: stop claiming, let running activations reach their end or pause.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(Stop::Drain);
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }

    /// Abrupt, like a crash: every activation is dropped wherever it is. Leases are left
    /// behind (recovered when the store is reopened, or taken over after expiry).
    pub async fn kill(mut self) {
        let _ = self.stop.send(Stop::Kill);
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let _ = self.stop.send_if_modified(|s| {
            if *s == Stop::Run {
                *s = Stop::Drain;
                true
            } else {
                false
            }
        });
    }
}

struct Prepared {
    run: crate::registry::RunFn,
    input: Value,
    history: History,
}

/// Finds the workflow for a journal and indexes the journal for replay.
fn prepare(registry: &Registry, mut events: Vec<Event>) -> std::result::Result<Prepared, String> {
    let Some(EventKind::RunStarted {
        workflow,
        version,
        input,
        ..
    }) = events.first_mut().map(|e| &mut e.event)
    else {
        return Err("journal does not begin with run-started".into());
    };
    // The history has no use for the input: the workflow takes it.
    let input = std::mem::take(input);
    let (workflow, version) = (std::mem::take(workflow), *version);
    let history = History::build(events).map_err(|e| format!("journal inconsistent: {e}"))?;
    let registered = registry.get(&workflow, version).ok_or_else(|| {
        format!("workflow {workflow:?} version {version} is not registered in this process; register it to resume this run")
    })?;
    Ok(Prepared {
        run: registered.run.clone(),
        input,
        history,
    })
}

/// How a workflow future came to stop.
enum Outcome {
    Returned(std::result::Result<Value, Failure>),
    Suspended(Option<DateTime<Utc>>),
    Aborted(Abort),
    Panicked(String),
}

/// Polls the workflow until it returns, pauses everywhere, or aborts.
async fn drive(ctx: &Ctx, workflow: BoxFuture<'static, std::result::Result<Value, Failure>>) -> Outcome {
    let mut workflow = AssertUnwindSafe(workflow).catch_unwind();
    loop {
        tokio::select! {
            biased;
            r = &mut workflow => return match r {
                Ok(result) => Outcome::Returned(result),
                Err(panic) => Outcome::Panicked(crate::ctx::panic_message(&panic)),
            },
            _ = ctx.inner.signal.notified() => {
                if let Some(abort) = ctx.take_abort() {
                    return Outcome::Aborted(abort);
                }
                if let Some(nd) = ctx.stalled() {
                    return Outcome::Aborted(Abort::Nondeterminism(nd));
                }
                if ctx.suspension().is_some() {
                    // Before pausing, append what is buffered: a decision that landed
                    // meanwhile is taken in there and wakes its gate, and the run goes
                    // on in this activation. The workflow is polled meanwhile: a gate
                    // opened beside a step may be appending its request, holding the
                    // append lock until it is polled again.
                    let mut returned = None;
                    let flushed = {
                        let flush = ctx.flush();
                        tokio::pin!(flush);
                        loop {
                            tokio::select! {
                                biased;
                                r = &mut flush => break r,
                                r = &mut workflow, if returned.is_none() => returned = Some(r),
                            }
                        }
                    };
                    match returned {
                        Some(Ok(result)) => return Outcome::Returned(result),
                        Some(Err(panic)) => return Outcome::Panicked(crate::ctx::panic_message(&panic)),
                        None => {}
                    }
                    if flushed.is_err() {
                        return Outcome::Aborted(ctx.take_abort().unwrap_or(Abort::LeaseLost));
                    }
                    if let Some(wake) = ctx.suspension() {
                        return Outcome::Suspended(wake);
                    }
                }
            }
        }
    }
}

enum Conclusion {
    Suspended(Option<DateTime<Utc>>),
    Ended,
    Abort(Abort),
    Panicked(String),
}

/// Records how the activation ended (if the journal does not say so already) and makes
/// everything durable.
async fn conclude(ctx: &Ctx, outcome: Outcome) -> Conclusion {
    let conclusion = match outcome {
        Outcome::Aborted(a) => return Conclusion::Abort(a),
        Outcome::Panicked(msg) => return Conclusion::Panicked(msg),
        Outcome::Suspended(wake) => Conclusion::Suspended(wake),
        Outcome::Returned(result) => {
            if let Some(nd) = ctx.unreached() {
                return Conclusion::Abort(Abort::Nondeterminism(nd));
            }
            let last = match result.and_then(|v| ctx.value_fits(&v).map(|_| v)) {
                Ok(output) => EventKind::RunCompleted { output },
                Err(f) => EventKind::RunFailed {
                    error: f.message().to_string(),
                },
            };
            match ctx.ended() {
                None => ctx.push_final(last),
                Some(recorded) if recorded == last => {}
                Some(EventKind::RunCancelled { .. }) => {}
                Some(recorded) => {
                    return Conclusion::Abort(Abort::Nondeterminism(Nondeterminism {
                        run: ctx.run_id(),
                        seq: Seq::ZERO,
                        position: ctx.next_position(),
                        expected: describe_end(&recorded),
                        found: describe_end(&last),
                    }))
                }
            }
            Conclusion::Ended
        }
    };
    if ctx.flush().await.is_err() {
        return match ctx.take_abort() {
            Some(a) => Conclusion::Abort(a),
            None => Conclusion::Abort(Abort::LeaseLost),
        };
    }
    conclusion
}

fn describe_end(e: &EventKind) -> String {
    match e {
        EventKind::RunCompleted { output } => format!("run completed with {}", crate::ctx::preview(output)),
        EventKind::RunFailed { error } => format!("run failed: {error}"),
        other => other.tag().to_string(),
    }
}

/// Appends under a lease.
struct LeasedSink<S> {
    engine: Arc<Inner<S>>,
    run: RunId,
    token: journal::LeaseToken,
}

impl<S: Store> Sink for LeasedSink<S> {
    fn append(
        &self,
        expected: Seq,
        events: Vec<EventKind>,
    ) -> BoxFuture<'_, journal::Result<std::result::Result<Appended, AppendConflict>>> {
        Box::pin(self.engine.store.append(Append {
            run: self.run,
            expected,
            at: self.engine.clock.now(),
            events,
            lease: Some(self.token),
        }))
    }

    fn read_from(&self, from: Seq) -> BoxFuture<'_, journal::Result<Vec<Event>>> {
        Box::pin(self.engine.store.read(self.run, from))
    }

    fn rule_history(
        &self,
        rule: &str,
        limit: usize,
    ) -> BoxFuture<'_, journal::Result<Vec<journal::RuleDecision>>> {
        let rule = rule.to_string();
        Box::pin(async move { self.engine.store.rule_history(&rule, limit).await })
    }
}

/// Refuses every append and remembers what it was offered: replay checks never write
/// and never run a step body.
struct ReplaySink {
    offered: Arc<Mutex<Vec<EventKind>>>,
}

impl Sink for ReplaySink {
    fn append(
        &self,
        _expected: Seq,
        events: Vec<EventKind>,
    ) -> BoxFuture<'_, journal::Result<std::result::Result<Appended, AppendConflict>>> {
        self.offered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(events);
        Box::pin(async {
            Err(journal::Error::Storage(
                "replay check: appends are refused".into(),
            ))
        })
    }

    fn read_from(&self, _from: Seq) -> BoxFuture<'_, journal::Result<Vec<Event>>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn rule_history(
        &self,
        _rule: &str,
        _limit: usize,
    ) -> BoxFuture<'_, journal::Result<Vec<journal::RuleDecision>>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// Re-runs the registered workflow code over a journal without a store: every recorded
/// call is answered from it, nothing is appended and no step body runs. The check to
/// run before deploying changed workflow code.
///
/// Takes the journal as a slice (copied) or as a `Vec` (moved: nothing is copied).
pub async fn replay<'a>(registry: &Registry, events: impl Into<Cow<'a, [Event]>>) -> Replay {
    let events = events.into().into_owned();
    let run = events.first().map(|e| e.run).unwrap_or_default();
    // Ended runs replay too: the code must reach the same end.
    let prepared = match prepare(registry, events) {
        Ok(p) => p,
        Err(reason) => return Replay::Broken(reason),
    };
    if let Some(EventKind::RunCancelled { .. }) = prepared.history.ended {
        return Replay::Consistent { would_append: vec![] };
    }
    let offered = Arc::new(Mutex::new(Vec::new()));
    let ctx = Ctx::new(
        run,
        prepared.history,
        Box::new(ReplaySink {
            offered: offered.clone(),
        }),
        Services {
            clock: Arc::new(SystemClock),
            max_event_bytes: usize::MAX,
            metrics: None,
            policy: Arc::new(Policy::default()),
            observer: None,
        },
    );
    let outcome = drive(&ctx, (prepared.run)(ctx.clone(), prepared.input)).await;
    let conclusion = conclude(&ctx, outcome).await;
    let would_append = std::mem::take(&mut *offered.lock().unwrap_or_else(|p| p.into_inner()));
    match conclusion {
        Conclusion::Abort(Abort::Nondeterminism(nd)) => Replay::Nondeterministic(nd),
        Conclusion::Abort(Abort::Inconsistent(msg)) => Replay::Broken(msg),
        Conclusion::Panicked(msg) => Replay::Broken(format!("workflow code panicked: {msg}")),
        _ => Replay::Consistent { would_append },
    }
}
