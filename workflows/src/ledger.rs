//! A payments ledger: the refund agent's "bank".
//!
//! Payments are keyed by the step's idempotency key, so a retried or re-run step pays
//! once, across threads and across processes (workers on one machine share the files)
//! and without any lock a stopped process could hold: each payment is one file in
//! `<path>.keys/`, created atomically (written aside, then hard-linked into place, which
//! fails if the key was paid already). The first to link it has paid; it then appends a
//! line to `<path>` (JSON lines), the human-readable log. Each payment is synced to disk
//! before it is acknowledged, like a real payment API's response.
//!
//! A process that dies between the link and the log line leaves a payment the log does not
//! show yet. Its step was started and not completed, so the engine runs it again with the
//! same key, and the repeat, finding the payment, writes the missing line: every append
//! reads the log first and writes the line only if no line has the key. Once every started
//! step has finished, the log and the payment files agree. There is no lock (a stopped
//! worker must not stall the others), so two processes paying the same key at the same
//! instant, a worker that lost its lease while paused and one that took its run over,
//! could both write the line: the log is for reading, the payment files are the record.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
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
    /// record; the log lacks a payment whose process died right after it until its step
    /// runs again).
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
        // Paid before, by this key: that payment, its log line written if it is not yet.
        let paid_before = |target: &Path| -> std::io::Result<LedgerEntry> {
            let paid: LedgerEntry =
                serde_json::from_slice(&std::fs::read(target)?).map_err(std::io::Error::other)?;
            self.log_once(&paid)?;
            Ok(paid)
        };
        if target.exists() {
            return paid_before(&target);
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
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return paid_before(&target),
            Err(e) => return Err(e),
        }
        File::open(&keys)?.sync_all()?;
        self.log_once(&entry)?;
        Ok(entry)
    }

    /// Appends `entry`'s line to the log (one write, synced) unless a line with its key
    /// is there already.
    fn log_once(&self, entry: &LedgerEntry) -> std::io::Result<()> {
        let mut log = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)?;
        let mut text = Vec::new();
        log.read_to_end(&mut text)?;
        let logged = text.split(|&b| b == b'\n').any(|line| {
            serde_json::from_slice::<LedgerEntry>(line)
                .is_ok_and(|e| e.idempotency_key == entry.idempotency_key)
        });
        if !logged {
            let mut line = Vec::with_capacity(128);
            // A line a dying process left unfinished has no newline: end it, so this
            // one stands on its own line.
            if text.last().is_some_and(|&b| b != b'\n') {
                line.push(b'\n');
            }
            serde_json::to_writer(&mut line, entry).map_err(std::io::Error::other)?;
            line.push(b'\n');
            log.write_all(&line)?;
            log.sync_data()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str) -> LedgerEntry {
        LedgerEntry {
            idempotency_key: key.into(),
            to: "K-1".into(),
            amount_cents: 30_000,
            memo: "refund".into(),
        }
    }

    fn log_lines(ledger: &Ledger) -> Vec<String> {
        std::fs::read_to_string(ledger.path())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_payment_whose_log_line_was_lost_gets_it_when_the_step_runs_again() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(dir.path().join("ledger.jsonl"));
        ledger.pay(entry("run-a/3")).unwrap();
        ledger.pay(entry("run-b/3")).unwrap();
        // The process died after linking run-b's payment, before its log line.
        std::fs::write(
            ledger.path(),
            serde_json::to_string(&entry("run-a/3")).unwrap() + "\n",
        )
        .unwrap();
        assert_eq!(log_lines(&ledger).len(), 1);
        assert_eq!(ledger.entries().unwrap().len(), 2);

        // The step runs again with the same key: no second payment, the line is back.
        let again = entry("run-b/3");
        assert_eq!(
            ledger
                .pay(LedgerEntry {
                    amount_cents: 1,
                    ..again
                })
                .unwrap(),
            entry("run-b/3")
        );
        let lines = log_lines(&ledger);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[1].contains("run-b/3"), "{lines:?}");
        assert_eq!(ledger.entries().unwrap().len(), 2);

        // Repeats of a logged payment add nothing.
        ledger.pay(entry("run-a/3")).unwrap();
        ledger.pay(entry("run-b/3")).unwrap();
        assert_eq!(log_lines(&ledger).len(), 2);
    }

    #[test]
    fn a_lock_on_the_log_held_by_a_stopped_process_does_not_stall_payments() {
        use fs2::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(dir.path().join("ledger.jsonl"));
        ledger.pay(entry("run-a/3")).unwrap();
        // Another process's lock on the log (flock: per open file), never released
        // while the payment below runs, as by a worker stopped while it held one.
        let held = File::open(ledger.path()).unwrap();
        held.lock_exclusive().unwrap();
        let (done, paid) = std::sync::mpsc::channel();
        let payer = std::thread::spawn(move || {
            let _ = done.send(ledger.pay(entry("run-b/3")).map(|_| log_lines(&ledger)));
        });
        let lines = paid
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the payment finished while another process held a lock on the log")
            .unwrap();
        assert_eq!(lines.len(), 2, "{lines:?}");
        payer.join().unwrap();
        drop(held);
    }

    #[test]
    fn a_line_left_unfinished_is_ended_before_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(dir.path().join("ledger.jsonl"));
        std::fs::write(ledger.path(), "{\"idempotency_key\":\"run-a/3\",\"to").unwrap();
        ledger.pay(entry("run-c/1")).unwrap();
        let lines = log_lines(&ledger);
        assert_eq!(lines.len(), 2, "{lines:?}");
        let last: LedgerEntry = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(last, entry("run-c/1"));
    }
}
