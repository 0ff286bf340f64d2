//! Example agents, written only against the engine's public API, as a user would.
//!
//! Each agent's tools are real code with observable effects, kept under one tools
//! directory: a payments ledger (`ledger.jsonl`), an outbox (`outbox/`), a table of
//! rows (`records.json`).

pub mod cleanup;
pub mod email;
pub mod ledger;
pub mod refund;

pub use ledger::{Ledger, LedgerEntry};

use holdpoint_engine::Registry;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The example agents' tools, under one directory.
#[derive(Clone)]
pub struct Tools {
    pub dir: PathBuf,
    pub ledger: Arc<Ledger>,
    pub outbox: Arc<email::Outbox>,
    pub table: Arc<cleanup::Table>,
}

impl Tools {
    pub fn new(dir: impl AsRef<Path>) -> Tools {
        let dir = dir.as_ref().to_path_buf();
        Tools {
            ledger: Arc::new(Ledger::new(dir.join("ledger.jsonl"))),
            outbox: Arc::new(email::Outbox::new(dir.join("outbox"))),
            table: Arc::new(cleanup::Table::new(dir.join("records.json"))),
            dir,
        }
    }

    /// Registers the refund, customer email and data cleanup agents.
    pub fn register(&self, registry: Registry) -> Registry {
        let registry = refund::register(registry, self.ledger.clone());
        let registry = email::register(registry, self.outbox.clone());
        cleanup::register(registry, self.table.clone())
    }
}
