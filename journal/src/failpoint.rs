//! Crash points for tests (feature `failpoints`): `HOLDPOINT_FAILPOINT=NAME:N` aborts the
//! process the N-th time execution passes the point `NAME`. Without the feature every
//! point compiles to nothing.
//!
//! Points: `append-before-flush` (an append's transaction committed, not yet flushed),
//! `group-commit-before-fsync` (sled flushed, our fsync not yet done),
//! `step-after-effect` (a step's body returned; its `step-completed` not yet recorded),
//! `commit-between-events` (a sled commit of several events: its first written and
//! handed to the disk, the rest not yet: recovery must undo it),
//! `commit-before-last-event` (a sled commit's notifications queued and its events but
//! the last written and handed to the disk, the last one not yet: recovery must undo
//! it),
//! `commit-before-indexes` (a sled commit's events written and handed to the disk, its
//! summary only in memory, its index changes not yet: recovery must finish it),
//! `create-before-record` (a creation's mark and notifications written and handed to the
//! disk, its `run-started` not yet: recovery must undo it), `create-before-indexes` (a
//! creation's `run-started` written and handed to the disk, its summary only in memory,
//! its idempotency key and index changes not yet: recovery must finish it).
//! With the write-ahead log ([`crate::SledOptions::wal`]): `wal-before-apply` (a
//! commit synced in the log, nothing of it in sled: the open must write it from the
//! log), `wal-apply-before-indexes` (its records written to sled and flushed, its
//! summary and index changes not: the open must finish it), `checkpoint-before-flush`
//! and `checkpoint-before-remove` (a checkpoint before sled's flush, and after it but
//! before the log's old segments go).

#[cfg(feature = "failpoints")]
mod imp {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    static PLAN: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);

    pub fn hit(name: &str) {
        hit_after(name, || {})
    }

    pub fn hit_after(name: &str, before_abort: impl FnOnce()) {
        let plan = PLAN.get_or_init(|| {
            let spec = std::env::var("HOLDPOINT_FAILPOINT").ok()?;
            let (n, count) = spec.split_once(':')?;
            Some((n.to_string(), count.parse().ok()?))
        });
        if let Some((n, count)) = plan {
            if n == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 >= *count {
                before_abort();
                eprintln!("failpoint {name}: aborting");
                std::process::abort();
            }
        }
    }
}

/// Passes a crash point (see the module docs).
#[inline]
pub fn hit(_name: &str) {
    #[cfg(feature = "failpoints")]
    imp::hit(_name);
}

/// Passes a crash point that runs `before_abort` (say, a flush, so the crash finds the
/// writes so far on disk) when it fires.
#[inline]
pub fn hit_after(_name: &str, _before_abort: impl FnOnce()) {
    #[cfg(feature = "failpoints")]
    imp::hit_after(_name, _before_abort);
}
