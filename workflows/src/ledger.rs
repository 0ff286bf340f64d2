//! A payments ledger kept in a JSON-lines file: the refund agent's "bank".
//!
//! Payments are keyed by the step's idempotency key, so a retried or re-run step pays
//! once. Each payment is synced to disk before it is acknowledged, like a real
//! payment API's response.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub idempotency_key: String,
    pub to: String,
    pub amount_cents: u64,
    pub memo: String,
}

pub struct Ledger {
    path: PathBuf,
    lock: Mutex<()>,
}

impl Ledger {
    pub fn new(path: impl AsRef<Path>) -> Ledger {
        Ledger {
            path: path.as_ref().to_path_buf(),
            lock: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every payment made, in order.
    pub fn entries(&self) -> std::io::Result<Vec<LedgerEntry>> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for line in BufReader::new(file).lines() {
            let line = line?;
            // A torn last line (a crash mid-write) is not a payment.
            if let Ok(entry) = serde_json::from_str(&line) {
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// Pays once per idempotency key; a repeat returns the first payment. Safe across
    /// threads and across processes sharing the file (workers on one machine).
    pub fn pay(&self, entry: LedgerEntry) -> std::io::Result<LedgerEntry> {
        use fs2::FileExt;
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path.with_extension("lock"))?;
        // Released when `lock` is dropped (closed).
        lock.lock_exclusive()?;
        if let Some(done) = self
            .entries()?
            .into_iter()
            .find(|e| e.idempotency_key == entry.idempotency_key)
        {
            return Ok(done);
        }
        let mut file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        let mut line = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        file.write_all(&line)?;
        file.sync_data()?;
        Ok(entry)
    }
}
