//! Example agents, written only against the engine's public API, as a user would.

pub mod ledger;
pub mod refund;

pub use ledger::{Ledger, LedgerEntry};
