//! Holdpoint: a durable workflow engine for agent runs that must stop and ask a person
//! before a risky action.
//!
//! This crate re-exports the public API of its parts: [`journal`] (events, stores),
//! the engine (`Ctx`, `Registry`, `Engine`), and [`workflows`] (example agents).
//!
//! ```
//! use holdpoint::prelude::*;
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Payment { to: String, amount_cents: u64 }
//!
//! async fn pay(ctx: Ctx, payment: Payment) -> Result<String, Failure> {
//!     // Safe work runs on its own, journaled once.
//!     let memo = ctx.step("draft_memo", || async { Ok(format!("refund")) }).await?;
//!     // Risky work waits for a person; only the approved (or edited) args come back.
//!     match ctx.gate("send_money", payment, &memo).await? {
//!         Gated::Approved { args, .. } | Gated::Edited { args, .. } => {
//!             ctx.step("send_money", || async move { Ok(format!("paid {}", args.amount_cents)) }).await
//!         }
//!         Gated::Rejected { reason, .. } => Ok(format!("not paid: {reason}")),
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let engine = Engine::new(SledStore::open(dir.path())?, Registry::new().workflow("pay", 1, pay))?;
//! let run = engine.start("pay", &Payment { to: "ana".into(), amount_cents: 500 }, None).await?;
//! engine.drain().await?;                       // runs until the gate
//! let gate = engine.pending(None, 10).await?[0].gate;
//! engine.decide(run, DecisionRequest::approve(gate, Principal::new("bob"))).await?;
//! engine.drain().await?;                       // resumes from the journal
//! assert_eq!(engine.get(run).await?.state.output, Some(serde_json::json!("paid 500")));
//! # Ok(()) }
//! ```

pub use holdpoint_engine::*;
pub use holdpoint_pg as pg;
pub use holdpoint_workflows as workflows;

pub mod bench;
pub mod cli;
pub mod sanitize;
pub mod server;
#[cfg(feature = "testing")]
pub mod testing;
pub mod web;
pub mod webhooks;

/// What a workflow author needs, in one import.
pub mod prelude {
    pub use holdpoint_engine::journal::{
        Decision, DecisionKind, GateId, Principal, RunId, RunStatus, SledStore, Store,
    };
    pub use holdpoint_engine::{
        Answer, Ctx, Decided, DecisionRequest, Engine, Failure, Gated, Registry, RetryPolicy, StepInfo,
    };
}

// The README's examples are compiled and run as doc tests (they use the test kit).
#[doc = include_str!("../README.md")]
#[cfg(all(doctest, feature = "testing"))]
pub struct ReadmeDoctests;
