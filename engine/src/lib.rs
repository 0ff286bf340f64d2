//! `holdpoint-engine`: runs workflows durably over their journals.
//!
//! Authors write plain async functions that take a [`Ctx`]; the [`Registry`] names
//! them; the [`Engine`] starts runs, records decisions, and drives runs with workers
//! that replay each journal. No HTTP, no CLI here.

pub mod clock;
pub mod ctx;
pub mod engine;
pub mod error;
pub mod fold;
pub mod metrics;
pub mod policy;
pub mod registry;
pub mod stats;

pub use clock::{Clock, ManualClock, SystemClock};
pub use ctx::{
    Act, Acted, Answer, Ctx, Gated, RetryPolicy, Step, StepInfo, StepObserver, APPROVAL_DECISIONS,
    OUTCOME_UNKNOWN, QUESTION_DECISIONS,
};
pub use engine::{
    replay, Decided, DecisionRequest, Engine, EngineBuilder, EngineConfig, Replay, RunIds, RunView, Workers,
};
pub use error::{Error, Failure, Nondeterminism, Result};
pub use fold::{fold, GateState, RunState, StepState, VerdictState, Vote};
pub use metrics::{Histogram, Metrics};
pub use policy::{Condition, Evaluation, Op, Policy, Rule};
pub use registry::Registry;
pub use stats::{review_stats, ActionStats};

/// The journal types authors and operators meet through the engine.
pub use holdpoint_journal as journal;
