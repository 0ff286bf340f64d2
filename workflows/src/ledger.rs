//! A payments ledger: the refund agent's "bank".
//!
//! Payments are keyed by the step's idempotency key, so a retried or re-run step pays
//! once, across threads and across processes (workers on one machine share the files)
//! and without any lock a stopped process could hold: each payment is one file in
//! `<path>.keys/`, created atomically (written aside, then hard-linked into place, which
//! fails if the key was paid already). The first to link it has paid; it then appends a
//! line to `<path>` (JSON lines), the human-readable log. Each payment is synced to disk
//! before it is acknowledged, like a real payment API's response.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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

    fn keys(&self) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".keys");
        self.path.with_file_name(name)
    }

    /// Every payment made, in the order they were made (the payment files are the
    /// record; the log may lag a payment whose process died right after it).
    pub fn entries(&self) -> std::io::Result<Vec<LedgerEntry>> {
        let dir = match std::fs::read_dir(self.keys()) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for item in dir {
            let item = item?;
            let path = item.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let entry: LedgerEntry =
                serde_json::from_slice(&std::fs::read(&path)?).map_err(std::io::Error::other)?;
            out.push((item.metadata()?.modified()?, path, entry));
        }
        out.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        Ok(out.into_iter().map(|(_, _, e)| e).collect())
    }

    /// Pays once per idempotency key; a repeat returns the first payment.
    pub fn pay(&self, entry: LedgerEntry) -> std::io::Result<LedgerEntry> {
        static TMP: AtomicU64 = AtomicU64::new(0);
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let keys = self.keys();
        std::fs::create_dir_all(&keys)?;
        let name: String = entry
            .idempotency_key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let target = keys.join(format!("{name}.json"));
        let existing = |target: &Path| -> std::io::Result<LedgerEntry> {
            serde_json::from_slice(&std::fs::read(target)?).map_err(std::io::Error::other)
        };
        if target.exists() {
            return existing(&target);
        }
        let body = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
        let tmp = keys.join(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            TMP.fetch_add(1, Ordering::Relaxed)
        ));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_data()?;
        }
        let linked = std::fs::hard_link(&tmp, &target);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return existing(&target),
            Err(e) => return Err(e),
        }
        File::open(&keys)?.sync_all()?;
        // The log: one write of one line, appended.
        let mut log = OpenOptions::new().create(true).append(true).open(&self.path)?;
        let mut line = body;
        line.push(b'\n');
        log.write_all(&line)?;
        log.sync_data()?;
        Ok(entry)
    }
}
