//! A test kit for workflow authors: prove your own workflow replays deterministically.
//!
//! ```
//! use holdpoint::testing::*;
//! use holdpoint::workflows::{refund::{self, RefundRequest}, Ledger};
//! use proptest::prelude::*;
//!
//! let ledger = std::sync::Arc::new(Ledger::new(std::env::temp_dir().join("kit-doc-ledger.jsonl")));
//! let input = (1u64..500_000, "[A-Z]-[0-9]{1,4}").prop_map(|(amount_cents, order_id)| RefundRequest {
//!     order_id, amount_cents, reason: "damaged".into(),
//! });
//! check_replay(refund::register(holdpoint::Registry::new(), ledger), "refund", input);
//! ```
//!
//! [`check_replay`] runs the workflow under generated decisions, with a crash and a
//! worker switch at generated points, and checks what every Holdpoint workflow must
//! satisfy: the journal equals the uncrashed run's, re-running the code over it appends
//! nothing, no completed step runs again, no gated action runs before its approval.
//! [`TestEnv`] is the engine on a temporary store with a clock the test moves and a
//! scripted [`Reviewer`]; [`replay_journal`] checks a saved journal against the code.

use crate::journal::{
    self, Append, AppendConflict, Appended, Created, Decision, DecisionKind, DueDeadline, Event, EventKind,
    GateId, GateKind, Lease, NewRun, PendingGate, Position, RuleDecision, RunId, RunStatus, RunSummary, Seq,
    SledStore, Store, ValueSource, WorkerId,
};
use crate::{fold, replay, DecisionRequest, Engine, ManualClock, Policy, Registry, Replay, StepInfo};
use chrono::{DateTime, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A sled store that can "crash": once `budget` events have been written, every call
/// fails as if the process had died (batches are atomic in sled, so a crash lands
/// between batches). Without a budget it is the plain store.
#[derive(Clone)]
pub struct FaultyStore {
    inner: SledStore,
    written: Arc<AtomicU64>,
    budget: Option<u64>,
    crashed: Arc<AtomicBool>,
}

impl FaultyStore {
    pub fn new(inner: SledStore, budget: Option<u64>) -> FaultyStore {
        FaultyStore {
            inner,
            written: Arc::new(AtomicU64::new(0)),
            budget,
            crashed: Arc::new(AtomicBool::new(false)),
        }
    }
    /// Events left before the crash point (`None`: no crash planned).
    pub fn remaining(&self) -> Option<u64> {
        self.budget
            .map(|b| b.saturating_sub(self.written.load(Ordering::SeqCst)))
    }
    /// Whether the crash point was reached.
    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }
    /// The store underneath.
    pub fn into_inner(self) -> SledStore {
        self.inner
    }
    fn alive(&self) -> journal::Result<()> {
        if self.crashed() {
            Err(journal::Error::Injected("crashed".into()))
        } else {
            Ok(())
        }
    }
    fn spend(&self, n: u64) -> journal::Result<()> {
        self.alive()?;
        if let Some(budget) = self.budget {
            if self.written.load(Ordering::SeqCst) + n > budget {
                self.crashed.store(true, Ordering::SeqCst);
                return Err(journal::Error::Injected("crash point".into()));
            }
        }
        self.written.fetch_add(n, Ordering::SeqCst);
        Ok(())
    }
}

impl Store for FaultyStore {
    async fn create_run(&self, run: NewRun) -> journal::Result<Created> {
        self.spend(1)?;
        self.inner.create_run(run).await
    }
    async fn append(&self, a: Append) -> journal::Result<Result<Appended, AppendConflict>> {
        self.spend(a.events.len() as u64)?;
        self.inner.append(a).await
    }
    async fn read(&self, run: RunId, from: Seq) -> journal::Result<Vec<Event>> {
        self.alive()?;
        self.inner.read(run, from).await
    }
    async fn summary(&self, run: RunId) -> journal::Result<Option<RunSummary>> {
        self.alive()?;
        self.inner.summary(run).await
    }
    async fn list_runs(
        &self,
        s: Option<RunStatus>,
        a: Option<RunId>,
        l: usize,
    ) -> journal::Result<Vec<RunSummary>> {
        self.alive()?;
        self.inner.list_runs(s, a, l).await
    }
    async fn pending(&self, a: Option<(RunId, GateId)>, l: usize) -> journal::Result<Vec<PendingGate>> {
        self.alive()?;
        self.inner.pending(a, l).await
    }
    async fn claim(
        &self,
        o: WorkerId,
        n: DateTime<Utc>,
        t: Duration,
        m: usize,
    ) -> journal::Result<Vec<Lease>> {
        self.alive()?;
        self.inner.claim(o, n, t, m).await
    }
    async fn release(&self, l: &Lease, w: Option<DateTime<Utc>>) -> journal::Result<()> {
        self.alive()?;
        self.inner.release(l, w).await
    }
    async fn renew(&self, l: &Lease, n: DateTime<Utc>, t: Duration) -> journal::Result<Option<Lease>> {
        self.alive()?;
        self.inner.renew(l, n, t).await
    }
    async fn mark_stuck(&self, l: &Lease, r: String) -> journal::Result<()> {
        self.alive()?;
        self.inner.mark_stuck(l, r).await
    }
    async fn is_leased(&self, r: RunId) -> journal::Result<bool> {
        self.inner.is_leased(r).await
    }
    async fn next_wake(&self) -> journal::Result<Option<DateTime<Utc>>> {
        self.inner.next_wake().await
    }
    async fn due_deadlines(&self, n: DateTime<Utc>, l: usize) -> journal::Result<Vec<DueDeadline>> {
        self.alive()?;
        self.inner.due_deadlines(n, l).await
    }
    async fn next_deadline(&self) -> journal::Result<Option<DateTime<Utc>>> {
        self.inner.next_deadline().await
    }
    async fn rule_history(&self, r: &str, l: usize) -> journal::Result<Vec<RuleDecision>> {
        self.alive()?;
        self.inner.rule_history(r, l).await
    }
    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes()
    }
    fn max_event_bytes(&self) -> usize {
        self.inner.max_event_bytes()
    }
    async fn runs_with_status(&self, status: journal::RunStatus) -> journal::Result<usize> {
        self.inner.runs_with_status(status).await
    }
    async fn open_gates(&self) -> journal::Result<usize> {
        self.inner.open_gates().await
    }
    async fn outbox(&self, endpoint: &str, limit: usize) -> journal::Result<Vec<journal::Outgoing>> {
        self.inner.outbox(endpoint, limit).await
    }
    async fn outbox_done(&self, endpoint: &str, key: u64) -> journal::Result<()> {
        self.inner.outbox_done(endpoint, key).await
    }
}

type Rule = Box<dyn Fn(&PendingGate) -> Option<Decision> + Send + Sync>;

/// A scripted reviewer: rules tried in order; the first that returns a decision wins;
/// otherwise approve (questions: respond with `null`).
#[derive(Default)]
pub struct Reviewer {
    rules: Vec<Rule>,
}

impl Reviewer {
    /// Approves every gate (and answers questions with `null`).
    pub fn approve_all() -> Reviewer {
        Reviewer::default()
    }
    /// Rejects gates whose pending entry matches.
    pub fn reject_if(
        mut self,
        reason: &str,
        pred: impl Fn(&PendingGate) -> bool + Send + Sync + 'static,
    ) -> Self {
        let reason = reason.to_string();
        self.rules.push(Box::new(move |g| {
            pred(g).then(|| Decision::Reject {
                reason: reason.clone(),
            })
        }));
        self
    }
    /// Edits the args of gates for `action` with `f`.
    pub fn edit(mut self, action: &str, f: impl Fn(&Value) -> Value + Send + Sync + 'static) -> Self {
        let action = action.to_string();
        self.rules.push(Box::new(move |g| {
            (g.kind == GateKind::Approval && g.action == action).then(|| Decision::Edit { args: f(&g.args) })
        }));
        self
    }
    /// Answers questions with `f(question gate)`.
    pub fn respond(mut self, f: impl Fn(&PendingGate) -> Value + Send + Sync + 'static) -> Self {
        self.rules.push(Box::new(move |g| {
            (g.kind == GateKind::Question).then(|| Decision::Respond { input: f(g) })
        }));
        self
    }
    /// Any rule, as a closure.
    pub fn rule(mut self, f: impl Fn(&PendingGate) -> Option<Decision> + Send + Sync + 'static) -> Self {
        self.rules.push(Box::new(f));
        self
    }
    /// The decision for a gate.
    pub fn decide(&self, gate: &PendingGate) -> Decision {
        for rule in &self.rules {
            if let Some(d) = rule(gate) {
                return d;
            }
        }
        match gate.kind {
            GateKind::Approval => Decision::Approve,
            GateKind::Question => Decision::Respond { input: Value::Null },
        }
    }
}

/// How a run ended under [`TestEnv::run_to_end`].
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    pub run: RunId,
    pub status: RunStatus,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub stuck: Option<String>,
    pub events: Vec<Event>,
}

/// A real engine on a temporary sled store, with a clock the test moves.
pub struct TestEnv {
    dir: tempfile::TempDir,
    clock: ManualClock,
    registry: Registry,
    policy: Policy,
    engine: Option<Engine<FaultyStore>>,
    executions: Arc<Mutex<Vec<StepInfo>>>,
    run_ids: Option<crate::RunIds>,
    /// Whether the store shares fsyncs through its group-commit thread (not in
    /// [`TestEnv::seeded`]).
    group_commit: bool,
}

impl TestEnv {
    pub fn new(registry: Registry) -> TestEnv {
        Self::with_policy(registry, Policy::default())
    }

    pub fn with_policy(registry: Registry, policy: Policy) -> TestEnv {
        let start = DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z")
            .map(|t| t.to_utc())
            .unwrap_or_else(|_| Utc::now());
        let mut env = TestEnv {
            dir: tempfile::tempdir().expect("a temporary directory"),
            clock: ManualClock::new(start),
            registry,
            policy,
            engine: None,
            executions: Arc::default(),
            run_ids: None,
            group_commit: true,
        };
        env.open(None);
        env
    }

    /// A test env whose run ids come from `seed` (valid UUID v7s, in creation order), so
    /// the same scenario gives the same journals, ids included: a reproducible simulation.
    /// Its store syncs each append in the caller (`SledOptions::group_commit` off), so
    /// that when an append returns does not depend on another thread: on a
    /// current-thread runtime, concurrent branches of a workflow then interleave the
    /// same way every time.
    pub fn seeded(registry: Registry, policy: Policy, seed: u64) -> TestEnv {
        let counter = Arc::new(AtomicU64::new(0));
        let ids: crate::RunIds = Arc::new(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let mut random = [0u8; 10];
            random[..8].copy_from_slice(&seed.to_be_bytes());
            random[8..].copy_from_slice(&(n as u16).to_be_bytes());
            RunId::from_uuid(
                uuid::Builder::from_unix_timestamp_millis(1_900_000_000_000 + n, &random).into_uuid(),
            )
        });
        let mut env = Self::with_policy(registry, policy);
        env.run_ids = Some(ids);
        env.group_commit = false;
        env.restart(None);
        env
    }

    fn open(&mut self, budget: Option<u64>) {
        let options = crate::journal::SledOptions {
            group_commit: self.group_commit,
            ..crate::journal::SledOptions::default()
        };
        let store = SledStore::open_with(self.dir.path(), options).expect("the test store opens");
        let executions = self.executions.clone();
        let mut builder = Engine::builder(FaultyStore::new(store, budget), self.registry.clone())
            .clock(self.clock.clone())
            .policy(self.policy.clone())
            .observe_steps(move |info| {
                executions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(info.clone())
            });
        if let Some(ids) = &self.run_ids {
            builder = builder.run_ids(ids.clone());
        }
        self.engine = Some(builder.build().expect("the registry is valid"));
    }

    /// The engine (a fresh one after each [`TestEnv::restart`]).
    pub fn engine(&self) -> &Engine<FaultyStore> {
        self.engine.as_ref().expect("the engine is open")
    }

    pub fn clock(&self) -> &ManualClock {
        &self.clock
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every step attempt that ran, in order (across restarts).
    pub fn executions(&self) -> Vec<StepInfo> {
        self.executions.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Moves time forward: timers and gate deadlines that fall due fire at the next drive.
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// Stops this engine and opens a new one (a new worker) on the same store.
    /// `crash_after`: the new store crashes once that many more events are written.
    pub fn restart(&mut self, crash_after: Option<u64>) {
        if let Some(engine) = self.engine.take() {
            if let Ok(store) = engine.into_store() {
                let _ = store.into_inner().close();
            }
        }
        self.open(crash_after);
    }

    pub async fn start<I: Serialize>(&self, workflow: &str, input: &I) -> Result<RunId, crate::Error> {
        self.engine().start(workflow, input, None).await
    }

    /// Drives the run to its end: runs what is due, has `reviewer` decide open gates,
    /// and moves the clock to the next timer or deadline when nothing else can happen.
    pub async fn run_to_end(&mut self, run: RunId, reviewer: &Reviewer) -> Result<Finished, String> {
        for _ in 0..10_000 {
            if let Some(finished) = self.step_run(run, reviewer).await? {
                return Ok(finished);
            }
        }
        Err("the run did not finish in 10,000 rounds".into())
    }

    /// One round of [`TestEnv::run_to_end`]: `Some` once the run has ended (or is stuck).
    pub async fn step_run(&mut self, run: RunId, reviewer: &Reviewer) -> Result<Option<Finished>, String> {
        let engine = self.engine();
        engine.drain().await.map_err(|e| e.to_string())?;
        let s = engine
            .store()
            .summary(run)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("unknown run")?;
        if s.status.is_terminal() || s.status == RunStatus::Stuck {
            let events = engine.events(run).await.map_err(|e| e.to_string())?;
            let state = fold(&events);
            return Ok(Some(Finished {
                run,
                status: s.status,
                output: state.output,
                error: state.error,
                stuck: s.stuck,
                events,
            }));
        }
        let gates = engine.pending(None, 1000).await.map_err(|e| e.to_string())?;
        if let Some(gate) = gates.iter().find(|g| g.run == run) {
            let reviewer_principal = journal::Principal::new("reviewer");
            let mut req = DecisionRequest::new(gate.gate, reviewer.decide(gate), reviewer_principal.clone())
                .idempotency_key(format!("kit-{}-{}", run, gate.gate));
            if let Err(e) = engine.decide(run, req.clone()).await {
                // An edit that does not fit the action's type is refused: approve instead.
                if !matches!(e, crate::Error::InvalidEdit { .. }) {
                    return Err(e.to_string());
                }
                req.decision = Decision::Approve;
                req.idempotency_key = None;
                engine.decide(run, req).await.map_err(|e| e.to_string())?;
            }
            return Ok(None);
        }
        // Waiting for time: jump to the earliest timer or deadline.
        let next = [
            engine.store().next_wake().await,
            engine.store().next_deadline().await,
        ]
        .into_iter()
        .filter_map(|t| t.ok().flatten())
        .min();
        match next {
            Some(at) => {
                self.clock.set(at);
                Ok(None)
            }
            None => Err(format!("run {run} waits for nothing that will ever come: {s:?}")),
        }
    }
}

/// A reviewer's generated decision at one gate.
#[derive(Clone, Debug, PartialEq)]
pub enum ScriptedDecision {
    Approve,
    /// Edit the args: numbers scaled by `percent` / 100 (integers stay integers).
    Edit {
        percent: u32,
    },
    Reject {
        reason: String,
    },
    /// Answer a question with this value.
    Respond(Value),
}

/// Generated decisions, with generated payloads.
pub fn decision() -> impl Strategy<Value = ScriptedDecision> {
    prop_oneof![
        4 => Just(ScriptedDecision::Approve),
        2 => (1u32..200).prop_map(|percent| ScriptedDecision::Edit { percent }),
        2 => "[a-z ]{1,20}".prop_map(|reason| ScriptedDecision::Reject { reason: format!("no: {reason}") }),
        1 => prop_oneof![Just(json!(null)), any::<i64>().prop_map(|n| json!(n)), "[a-z]{0,8}".prop_map(|s| json!(s))]
            .prop_map(ScriptedDecision::Respond),
    ]
}

/// Where a crash lands: after this fraction of the run's events.
pub fn crash_point() -> impl Strategy<Value = f64> {
    0.0f64..1.0
}

/// Where the work moves to another worker (a graceful handover): after this fraction.
pub fn worker_switch() -> impl Strategy<Value = f64> {
    0.0f64..1.0
}

fn scale(v: &Value, percent: u32) -> Value {
    match v {
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => json!(u.saturating_mul(percent as u64) / 100),
            (_, Some(i), _) => json!(i.saturating_mul(percent as i64) / 100),
            (_, _, Some(f)) => json!(f * percent as f64 / 100.0),
            _ => v.clone(),
        },
        Value::Array(a) => Value::Array(a.iter().map(|x| scale(x, percent)).collect()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, x)| (k.clone(), scale(x, percent))).collect()),
        other => other.clone(),
    }
}

/// A reviewer that answers the n-th gate with `decisions[n % len]`.
fn scripted(decisions: Vec<ScriptedDecision>) -> Reviewer {
    let counter = Arc::new(Mutex::new(BTreeMap::<(RunId, GateId), usize>::new()));
    Reviewer::default().rule(move |g| {
        let mut seen = counter.lock().unwrap_or_else(|p| p.into_inner());
        let n = seen.len();
        let i = *seen.entry((g.run, g.gate)).or_insert(n);
        let d = decisions
            .get(i % decisions.len().max(1))
            .cloned()
            .unwrap_or(ScriptedDecision::Approve);
        Some(match (g.kind, d) {
            (GateKind::Question, ScriptedDecision::Respond(v)) => Decision::Respond { input: v },
            (GateKind::Question, ScriptedDecision::Reject { reason }) => Decision::Reject { reason },
            (GateKind::Question, _) => Decision::Respond { input: Value::Null },
            (_, ScriptedDecision::Approve) | (_, ScriptedDecision::Respond(_)) => Decision::Approve,
            (_, ScriptedDecision::Edit { percent }) => {
                if g.allowed.contains(&DecisionKind::Edit) {
                    Decision::Edit {
                        args: scale(&g.args, percent),
                    }
                } else {
                    Decision::Approve
                }
            }
            (_, ScriptedDecision::Reject { reason }) => Decision::Reject { reason },
        })
    })
}

/// The journal with what legitimately differs between two executions of the same
/// run taken out: timestamps, run ids, uuid and random values, and step attempts (a
/// crash may add an interrupted attempt). Each step's name stays (from its first
/// `step-started`), so a different step at a position is a difference.
pub fn logical_journal(events: &[Event]) -> Vec<Value> {
    let mut steps_seen = BTreeSet::new();
    events
        .iter()
        .filter_map(|e| match &e.event {
            EventKind::StepStarted { position, name, .. } => steps_seen
                .insert(*position)
                .then(|| json!({"type": "step", "position": position, "name": name})),
            EventKind::StepFailed { will_retry: true, .. } => None,
            EventKind::ValueRecorded {
                position,
                source: source @ (ValueSource::Uuid | ValueSource::Random),
                ..
            } => Some(json!({"type": "value-recorded", "position": position, "source": source})),
            EventKind::DecisionRecorded { .. } => {
                let mut v = serde_json::to_value(&e.event).unwrap_or(Value::Null);
                // Keys differ by run id; the decision is what matters.
                if let Some(m) = v.as_object_mut() {
                    m.remove("idempotency_key");
                }
                Some(v)
            }
            other => serde_json::to_value(other).ok(),
        })
        .collect()
}

/// Where two logical journals first differ, as "position N" when the entry names one.
fn first_difference(expected: &[Value], found: &[Value]) -> String {
    let i = (0..expected.len().max(found.len()))
        .find(|&i| expected.get(i) != found.get(i))
        .unwrap_or(0);
    let entry = expected.get(i).or(found.get(i));
    match entry.and_then(|v| v.get("position").or(v.get("gate"))) {
        Some(p) => format!("entry {i}, at position {p}"),
        None => format!("entry {i}"),
    }
}

/// A readable line diff of two logical journals ("-" expected, "+" found).
pub fn journal_diff(expected: &[Value], found: &[Value]) -> String {
    let mut out = String::new();
    for i in 0..expected.len().max(found.len()) {
        match (expected.get(i), found.get(i)) {
            (Some(a), Some(b)) if a == b => out.push_str(&format!("  {i:>3} {a}\n")),
            (a, b) => {
                if let Some(a) = a {
                    out.push_str(&format!("- {i:>3} {a}\n"));
                }
                if let Some(b) = b {
                    out.push_str(&format!("+ {i:>3} {b}\n"));
                }
            }
        }
    }
    out
}

/// One execution of a case: the run's journal, the step executions, and (when it
/// crashed) the journal as it stood at the crash.
struct Execution {
    finished: Finished,
    executions: Vec<StepInfo>,
    at_crash: Option<Vec<Event>>,
    crash_phase_start: usize,
}

async fn execute<I: Serialize>(
    registry: &Registry,
    workflow: &str,
    input: &I,
    decisions: &[ScriptedDecision],
    crash_after: Option<u64>,
    switch_after: Option<u64>,
) -> Result<Execution, String> {
    let reviewer = scripted(decisions.to_vec());
    let mut env = TestEnv::new(registry.clone());
    if crash_after.is_some() {
        env.restart(crash_after);
    }
    let run = env.start(workflow, input).await.map_err(|e| e.to_string())?;
    let mut at_crash = None;
    let mut crash_phase_start = 0;
    let mut switched = switch_after.is_none();
    for _ in 0..10_000 {
        let round = env.step_run(run, &reviewer).await;
        if env.engine().store().crashed() {
            // The process died: a new worker opens the store.
            env.restart(None);
            at_crash = Some(env.engine().events(run).await.map_err(|e| e.to_string())?);
            crash_phase_start = env.executions().len();
            continue;
        }
        match round {
            Ok(Some(finished)) => {
                return Ok(Execution {
                    finished,
                    executions: env.executions(),
                    at_crash,
                    crash_phase_start,
                })
            }
            Ok(None) => {}
            Err(e) => return Err(e),
        }
        if !switched {
            let len = env
                .engine()
                .store()
                .summary(run)
                .await
                .map_err(|e| e.to_string())?
                .map_or(0, |s| s.next_seq.0);
            if switch_after.is_some_and(|s| len >= s) {
                // A graceful handover to another worker, keeping any crash still to come.
                switched = true;
                let remaining = env.engine().store().remaining();
                env.restart(remaining);
            }
        }
    }
    Err("the run did not finish".into())
}

fn check_invariants(clean: &Execution, faulty: &Execution) -> Result<(), String> {
    let (a, b) = (
        logical_journal(&clean.finished.events),
        logical_journal(&faulty.finished.events),
    );
    if a != b {
        return Err(format!(
            "the journal after a crash differs from the uncrashed run's, first at {}:\n{}",
            first_difference(&a, &b),
            journal_diff(&a, &b)
        ));
    }
    // No (position, attempt) ran twice (an idempotent step's may: its start is journaled
    // with its result), and nothing completed before the crash ran after.
    let mut seen = BTreeSet::new();
    for e in &faulty.executions {
        if !seen.insert((e.position, e.attempt)) && !e.idempotent {
            return Err(format!(
                "step at position {} attempt {} ran twice",
                e.position, e.attempt
            ));
        }
    }
    if let Some(at_crash) = &faulty.at_crash {
        let completed: BTreeSet<Position> = at_crash
            .iter()
            .filter_map(|e| match e.event {
                EventKind::StepCompleted { position, .. } => Some(position),
                _ => None,
            })
            .collect();
        for e in &faulty.executions[faulty.crash_phase_start..] {
            if completed.contains(&e.position) {
                return Err(format!(
                    "step at position {} ran again after the crash although it had completed",
                    e.position
                ));
            }
        }
    }
    // A gated action's step ran only after an approve/edit, with those args.
    for exec in [clean, faulty] {
        let state = fold(&exec.finished.events);
        for e in &exec.finished.events {
            if let EventKind::StepStarted {
                position,
                args_hash: Some(hash),
                name,
                ..
            } = &e.event
            {
                if let Some(gate) = position
                    .0
                    .checked_sub(1)
                    .and_then(|p| state.gates.get(&GateId(p)))
                {
                    let allowed_args = match gate.decision.as_ref().map(|d| &d.decision) {
                        Some(Decision::Approve) => gate.args.clone(),
                        Some(Decision::Edit { args }) => args.clone(),
                        other => {
                            return Err(format!(
                                "action {name:?} ran at position {position} after {other:?}"
                            ))
                        }
                    };
                    if *hash != journal::request_hash(name, &allowed_args) {
                        return Err(format!(
                            "action {name:?} ran with args other than the approved ones"
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

async fn check_case<I: Serialize>(
    registry: &Registry,
    workflow: &str,
    input: &I,
    decisions: &[ScriptedDecision],
    crash: f64,
    switch: f64,
) -> Result<(), String> {
    let clean = execute(registry, workflow, input, decisions, None, None).await?;
    if clean.finished.status == RunStatus::Stuck {
        return Err(format!(
            "the run is stuck without any crash: {}",
            clean.finished.stuck.clone().unwrap_or_default()
        ));
    }
    // I3: the code over the finished journal appends nothing.
    match replay(registry, &clean.finished.events).await {
        Replay::Consistent { would_append } if would_append.is_empty() => {}
        Replay::Consistent { would_append } => {
            return Err(format!(
                "re-running the code over its finished journal would append: {:?}",
                would_append.iter().map(|e| e.tag()).collect::<Vec<_>>()
            ))
        }
        Replay::Nondeterministic(nd) => return Err(nd.to_string()),
        Replay::Broken(why) => return Err(why),
    }
    let len = clean.finished.events.len().max(2) as u64;
    let crash_after = 1 + ((len - 1) as f64 * crash) as u64;
    let switch_after = 1 + ((len - 1) as f64 * switch) as u64;
    let faulty = execute(
        registry,
        workflow,
        input,
        decisions,
        Some(crash_after),
        Some(switch_after),
    )
    .await?;
    if faulty.finished.status == RunStatus::Stuck {
        return Err(format!(
            "after a crash at event {crash_after} the run is stuck: {}",
            faulty.finished.stuck.clone().unwrap_or_default()
        ));
    }
    check_invariants(&clean, &faulty)
}

fn cases() -> u32 {
    std::env::var("HOLDPOINT_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}

/// Property test of a workflow: for generated inputs, decisions, crash points and
/// worker switches, the run's journal is the same as without the crash, replay
/// appends nothing, no completed step runs again and no gated action runs before its
/// approve/edit. Panics with the shrunk case and a journal diff on failure.
///
/// Cases: `HOLDPOINT_PROPTEST_CASES` (default 32).
pub fn check_replay<I, S>(registry: Registry, workflow: &str, input: S)
where
    S: Strategy<Value = I>,
    I: Serialize + Debug + Clone,
{
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        input,
        proptest::collection::vec(decision(), 1..6),
        crash_point(),
        worker_switch(),
    );
    let result = runner.run(&strategy, |(input, decisions, crash, switch)| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        rt.block_on(check_case(&registry, workflow, &input, &decisions, crash, switch))
            .map_err(TestCaseError::fail)
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, (input, decisions, crash, switch))) => panic!(
            "check_replay({workflow:?}) failed:\n{reason}\nshrunk case:\n  input: {input:?}\n  decisions: {decisions:?}\n  crash after {:.0}% of the events, worker switch after {:.0}%",
            crash * 100.0,
            switch * 100.0
        ),
        Err(TestError::Abort(why)) => panic!("check_replay({workflow:?}) aborted: {why}"),
    }
}

/// What [`replay_journal`] found wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayFailure(pub String);

impl std::fmt::Display for ReplayFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ReplayFailure {}

/// Replays a saved journal (JSON lines, as `holdpoint export` writes them) against the
/// current code. `Ok` when the code matches; otherwise the nondeterminism, with the
/// position, what the journal records and what the code does now.
pub async fn replay_journal(registry: &Registry, path: impl AsRef<Path>) -> Result<(), ReplayFailure> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ReplayFailure(format!("reading {}: {e}", path.display())))?;
    let mut events = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let event: Event = serde_json::from_str(line)
            .map_err(|e| ReplayFailure(format!("{} line {}: not an event: {e}", path.display(), i + 1)))?;
        events.push(event);
    }
    match replay(registry, events).await {
        Replay::Consistent { .. } => Ok(()),
        Replay::Nondeterministic(nd) => Err(ReplayFailure(nd.to_string())),
        Replay::Broken(why) => Err(ReplayFailure(format!(
            "{} cannot be replayed: {why}",
            path.display()
        ))),
    }
}
