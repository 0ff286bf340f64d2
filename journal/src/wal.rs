//! A write-ahead log of our own, for a store that makes its commits durable here and
//! writes sled later (issue 6; ARCHITECTURE.md, "The write-ahead log").
//!
//! **Layout.** A directory of segment files, `<first lsn, 20 digits>.wal`. A segment
//! starts with a 16-byte header (the magic `HPWAL\0\0\x01`, then its first LSN, big
//! endian) and holds records back to back:
//!
//! ```text
//! crc32 (4) | length (4) | lsn (8) | payload (length bytes)
//! ```
//!
//! all big endian; the checksum covers the length, the LSN and the payload. An LSN is a
//! record's position in the log as a whole: the first record of a segment is at the
//! segment's first LSN, and each record's LSN is the previous one's plus its header and
//! payload. A record names its own LSN, so bytes left over from anything else (a
//! segment file reused, a stray copy) never pass for the record that belongs there.
//!
//! **Group commit.** [`Wal::append`] frames a record into a shared buffer and returns
//! its LSN and end at once; one writer thread takes the whole buffer, writes it to the
//! current segment with one `pwrite`, `fdatasync`s, and wakes every waiter the write
//! covered ([`Wal::wait`]). Under load (after a group of [`GROUP_WINDOW_FROM`] records
//! or more) the writer first lets the next group gather for
//! [`WalOptions::group_window`], so more commits share each sync; a lone commit is
//! written at once. A record is never split across segments: a new segment
//! starts when a write would take the current one past [`WalOptions::segment_bytes`]
//! (a single larger write makes a larger segment), and the directory is synced after a
//! segment file is created, so the file itself survives a crash.
//!
//! **Zeros written ahead.** The writer keeps the segment file
//! [`WalOptions::preallocate_bytes`] longer than its records, in zeros written with the
//! records they precede: a write into them changes no file size, so its `fdatasync`
//! writes the data alone, not the inode as well. An all-zero record header is never a
//! record (its checksum would have to be zero), so readers take it as the end. A
//! segment the log moves on from, and the last one when the log is dropped, are cut
//! back to their records.
//!
//! **A failed write or sync poisons the log.** After an `fdatasync` error the kernel
//! may have dropped the dirty pages it could not write, and a retry would report
//! success for data that is gone; so every waiter of that write, and every append
//! after it, gets the error, and only reopening (which reads what is really on disk)
//! goes on.
//!
//! **Recovery.** [`Wal::open`] reads the records from a given LSN (the caller's
//! checkpoint: everything before it is durable elsewhere) to the end, handing each to
//! the caller. Only the last segment may end in a record that does not check out: that
//! is a write a crash cut short, never acknowledged (every acknowledged record was
//! synced, and a write only follows a completed sync), so it and everything after it
//! are cut off and the log goes on from there. Zeros there are the space written ahead
//! and are kept, unless anything but zeros follows them: a torn write can leave a hole
//! with whole records after it, which name their own LSNs, and a later record as long
//! as the lost one would end where the first of them begins; so they are cut off too. Anywhere else a bad record, a segment
//! whose header or first LSN is wrong, a gap between segments, or a checkpoint the log
//! does not hold (before its first segment, past its end, or with no segments at all)
//! is [`Error::WalCorrupt`]: nothing is cut and the open fails.
//!
//! **Truncation.** [`Wal::remove_before`] deletes the segments that hold only records
//! before an LSN, once the caller has made them durable elsewhere.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use tokio::sync::oneshot;

/// The first bytes of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"HPWAL\0\0\x01";
/// Magic and first LSN.
pub const SEGMENT_HEADER_LEN: u64 = 16;
/// Checksum, length and LSN.
pub const RECORD_HEADER_LEN: u64 = 16;
/// The size of a group (in records) after which the writer waits
/// [`WalOptions::group_window`] for the next one to gather.
pub const GROUP_WINDOW_FROM: u64 = 4;
/// The largest payload a record may have.
pub const MAX_PAYLOAD: usize = 64 << 20;

/// A position in the log: where a record starts, or where the log ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Clone, Debug)]
pub struct WalOptions {
    /// A new segment starts once a write would take the current one past this size.
    pub segment_bytes: u64,
    /// Zeros written ahead of the records (default 1 MiB; 0: none): a write into them
    /// changes no file size, so its `fdatasync` writes the data and not the inode too
    /// (one device write per group commit instead of two).
    pub preallocate_bytes: u64,
    /// Under load, how long the writer lets a group gather before writing it (default
    /// 100 µs; zero: never): only after a group of [`GROUP_WINDOW_FROM`] records or
    /// more, so a lone commit (a sequential decision) never waits for it.
    pub group_window: std::time::Duration,
    /// Tests (feature `failpoints`): the log's `n`-th sync (counting from 1) fails as an
    /// `fdatasync` error would, after its write.
    #[cfg(feature = "failpoints")]
    pub fail_sync: Option<u64>,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_bytes: 64 << 20,
            preallocate_bytes: 1 << 20,
            group_window: std::time::Duration::from_micros(100),
            #[cfg(feature = "failpoints")]
            fail_sync: None,
        }
    }
}

/// What [`Wal::open`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Records handed to the caller.
    pub records: u64,
    /// Where the log goes on: after the last intact record.
    pub end: Lsn,
    /// Bytes cut off the last segment: a write a crash cut short.
    pub torn_bytes: u64,
}

/// An appended record: where it starts, and where the next one will.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub lsn: Lsn,
    pub end: Lsn,
}

/// The log, open for appending. Dropping it writes and syncs what was appended, then
/// stops the writer thread.
pub struct Wal {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    dir: PathBuf,
    options: WalOptions,
    state: Mutex<State>,
    wake: Condvar,
    syncs: AtomicU64,
    /// Times the writer let a group gather ([`WalOptions::group_window`]).
    windows: AtomicU64,
}

struct State {
    /// Framed records not yet taken by the writer, starting at `pending_from`.
    pending: Vec<u8>,
    pending_from: Lsn,
    /// Records in `pending`.
    pending_records: u64,
    /// Everything before this is synced.
    durable: Lsn,
    waiters: Vec<(Lsn, oneshot::Sender<std::result::Result<(), String>>)>,
    /// Segments by first LSN; the last is the one being written.
    segments: BTreeMap<u64, PathBuf>,
    /// Set by a failed write or sync: nothing more is acknowledged.
    failed: Option<String>,
    shutdown: bool,
}

impl State {
    fn end(&self) -> Lsn {
        Lsn(self.pending_from.0 + self.pending.len() as u64)
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// A group commit's window ([`WalOptions::group_window`], the sled store's
/// `SledOptions::group_window`): after a group of [`GROUP_WINDOW_FROM`] or more, lets go
/// of `guard`, sleeps for `window` and counts it in `windows`, then locks `mutex` again,
/// so that the commits arriving meanwhile share the next sync instead of taking another
/// (fewer syncs per commit, each waited for a little longer). After a smaller group, or
/// with no window, hands `guard` back at once. Both the log's writer and the sled
/// store's group commit call it.
pub(crate) fn gather<'a, T>(
    mutex: &'a Mutex<T>,
    guard: MutexGuard<'a, T>,
    last_group: u64,
    window: std::time::Duration,
    windows: &AtomicU64,
) -> MutexGuard<'a, T> {
    if last_group < GROUP_WINDOW_FROM || window.is_zero() {
        return guard;
    }
    drop(guard);
    windows.fetch_add(1, Ordering::Relaxed);
    std::thread::sleep(window);
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn segment_name(first: Lsn) -> String {
    format!("{:020}.wal", first.0)
}

fn corrupt(segment: &Path, offset: u64, reason: impl Into<String>) -> Error {
    Error::WalCorrupt {
        segment: segment.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

fn record_crc(len: u32, lsn: Lsn, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_be_bytes());
    h.update(&lsn.0.to_be_bytes());
    h.update(payload);
    h.finalize()
}

/// Appends `payload` framed as the record at `lsn` to `out`.
fn frame(out: &mut Vec<u8>, lsn: Lsn, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&record_crc(len, lsn, payload).to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&lsn.0.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Whether the file at `path` holds any byte other than zero from `offset` on.
fn stale_after(path: &Path, offset: u64) -> Result<bool> {
    let mut reader = BufReader::with_capacity(256 << 10, File::open(path)?);
    std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(offset))?;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = reader.read(&mut chunk)?;
        if n == 0 {
            return Ok(false);
        }
        if chunk[..n].iter().any(|&b| b != 0) {
            return Ok(true);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Creates the segment that starts at `first` (its header synced, and the directory).
fn create_segment(dir: &Path, first: Lsn) -> Result<(File, PathBuf)> {
    let path = dir.join(segment_name(first));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    header[..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..].copy_from_slice(&first.0.to_be_bytes());
    file.write_all_at(&header, 0)?;
    file.sync_data()?;
    sync_dir(dir)?;
    Ok((file, path))
}

/// The segment files in `dir`, by first LSN. Files not named as segments are left alone.
fn list_segments(dir: &Path) -> Result<BTreeMap<u64, PathBuf>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let first = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".wal"))
            .filter(|n| n.len() == 20)
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first {
            out.insert(first, path);
        }
    }
    Ok(out)
}

/// How reading a segment's records ended.
enum Ended {
    /// At the end of the file, after an intact record (or none).
    Clean,
    /// At zeros written ahead ([`WalOptions::preallocate_bytes`]), at this offset.
    Zeros { offset: u64 },
    /// At a record that does not check out, at this offset of the file.
    Bad { offset: u64, reason: String },
}

/// Reads the records of the segment at `path` (first LSN `first`) from `from` on,
/// handing each to `replay`. Returns the LSN after the last intact record, how many
/// were read, and how reading ended.
fn read_segment(
    path: &Path,
    first: Lsn,
    from: Lsn,
    replay: &mut dyn FnMut(Lsn, &[u8]) -> Result<()>,
) -> Result<(Lsn, u64, Ended)> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    if file_len < SEGMENT_HEADER_LEN {
        return Ok((
            first,
            0,
            Ended::Bad {
                offset: 0,
                reason: format!("the segment is {file_len} bytes, shorter than its header"),
            },
        ));
    }
    file.read_exact_at(&mut header, 0)?;
    if header[..8] != SEGMENT_MAGIC {
        return Err(corrupt(path, 0, "not a Holdpoint log segment (wrong magic)"));
    }
    let named = u64::from_be_bytes(header[8..].try_into().unwrap_or_default());
    if named != first.0 {
        return Err(corrupt(
            path,
            8,
            format!("the header names first LSN {named}, the file name {first}"),
        ));
    }
    let start = SEGMENT_HEADER_LEN + (from.0 - first.0);
    if start > file_len {
        // Records the caller's checkpoint covers were synced here once: they are gone.
        return Err(corrupt(
            path,
            file_len,
            format!(
                "the segment ends at LSN {}, before the checkpoint at {from}",
                first.0 + file_len - SEGMENT_HEADER_LEN
            ),
        ));
    }
    let mut reader = BufReader::with_capacity(256 << 10, file);
    std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(start))?;
    let mut at = from;
    let mut count = 0;
    let mut payload = Vec::new();
    loop {
        let offset = SEGMENT_HEADER_LEN + (at.0 - first.0);
        if offset == file_len {
            return Ok((at, count, Ended::Clean));
        }
        let bad = |reason: String| Ok((at, count, Ended::Bad { offset, reason }));
        let mut head = [0u8; RECORD_HEADER_LEN as usize];
        let short = file_len - offset < RECORD_HEADER_LEN;
        let head_len = if short {
            (file_len - offset) as usize
        } else {
            head.len()
        };
        reader.read_exact(&mut head[..head_len])?;
        if head.iter().all(|&b| b == 0) {
            // Zeros written ahead of the records: no record has an all-zero header (its
            // checksum would be that of a zero length and LSN 0, which is not 0).
            return Ok((at, count, Ended::Zeros { offset }));
        }
        if short {
            return bad(format!(
                "{} bytes at the end, too few for a record header",
                file_len - offset
            ));
        }
        let crc = u32::from_be_bytes(head[0..4].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(head[4..8].try_into().unwrap_or_default());
        let lsn = Lsn(u64::from_be_bytes(head[8..16].try_into().unwrap_or_default()));
        if lsn != at {
            return bad(format!("the record here names LSN {lsn}, not {at}"));
        }
        if len as usize > MAX_PAYLOAD {
            return bad(format!("a length of {len} bytes, over the limit"));
        }
        if u64::from(len) > file_len - offset - RECORD_HEADER_LEN {
            return bad(format!("a length of {len} bytes runs past the end of the file"));
        }
        payload.resize(len as usize, 0);
        reader.read_exact(&mut payload)?;
        if record_crc(len, lsn, &payload) != crc {
            return bad("checksum mismatch".into());
        }
        replay(at, &payload)?;
        count += 1;
        at = Lsn(at.0 + RECORD_HEADER_LEN + u64::from(len));
    }
}

impl Wal {
    /// Opens the log in `dir` (creating both if missing), reads every record from `from`
    /// (a checkpoint: an LSN this log returned, or 0) to the end, handing each to
    /// `replay` in order, and returns the log ready to append after the last intact one.
    /// A torn tail of the last segment is cut off (see the module's docs); any other
    /// damage is [`Error::WalCorrupt`], and so is a `from` the log no longer holds.
    pub fn open(
        dir: &Path,
        options: WalOptions,
        from: Lsn,
        mut replay: impl FnMut(Lsn, &[u8]) -> Result<()>,
    ) -> Result<(Wal, Recovered)> {
        std::fs::create_dir_all(dir)?;
        let mut segments = list_segments(dir)?;
        let mut recovered = Recovered {
            end: from,
            ..Recovered::default()
        };
        // The segment the writer goes on in, and its first LSN.
        let (file, first) = match segments.last_key_value().map(|(k, _)| *k) {
            None if from > Lsn(0) => {
                // A log that reached a checkpoint keeps the segment holding it: none at
                // all means the log was lost, and with it whatever followed.
                return Err(corrupt(
                    dir,
                    0,
                    format!("no log segments, but a checkpoint at LSN {from}: the log is missing"),
                ));
            }
            None => {
                let (file, path) = create_segment(dir, from)?;
                segments.insert(from.0, path);
                (file, from)
            }
            Some(last) => {
                // The segment holding `from`, and those after it, are read; the ones
                // before it hold only checkpointed records.
                let first_read = segments
                    .range(..=from.0)
                    .next_back()
                    .map(|(k, _)| *k)
                    .ok_or_else(|| {
                        let (first, path) = segments.first_key_value().map_or((0, dir.to_path_buf()), |(k, p)| (*k, p.clone()));
                        corrupt(
                            &path,
                            0,
                            format!("the log starts at LSN {first}, after the checkpoint at {from}: records are missing"),
                        )
                    })?;
                let mut at = from;
                let reading: Vec<(u64, PathBuf)> = segments
                    .range(first_read..)
                    .map(|(k, p)| (*k, p.clone()))
                    .collect();
                for (first, path) in &reading {
                    let first = Lsn(*first);
                    if first > at {
                        return Err(corrupt(
                            path,
                            0,
                            format!("the previous segment ends at LSN {at}: the records between are missing"),
                        ));
                    }
                    if first < at && first.0 != first_read {
                        return Err(corrupt(
                            path,
                            0,
                            format!("the segment starts at LSN {first}, inside the previous one (which ends at {at})"),
                        ));
                    }
                    let (end, count, ended) = read_segment(path, first, at, &mut replay)?;
                    recovered.records += count;
                    at = end;
                    let (offset, reason) = match ended {
                        Ended::Clean => continue,
                        // A segment the log moved on from ends at its last record; the
                        // next one must begin there (checked above, on the next turn).
                        Ended::Zeros { .. } if first.0 != last => continue,
                        // The zeros written ahead of the last segment's records are
                        // kept, unless a torn write left bytes anywhere after them: a
                        // later record could end exactly where a stale one begins, at
                        // the LSN it names, and that one would pass for the next.
                        Ended::Zeros { offset } => match stale_after(path, offset)? {
                            false => continue,
                            true => (offset, "bytes after the zeros written ahead".to_string()),
                        },
                        Ended::Bad { offset, reason } if first.0 != last => {
                            return Err(corrupt(path, offset, reason));
                        }
                        Ended::Bad { offset, reason } => (offset, reason),
                    };
                    let len = std::fs::metadata(path)?.len();
                    recovered.torn_bytes = len.saturating_sub(offset);
                    if offset < SEGMENT_HEADER_LEN {
                        // Created, but its header never reached the disk.
                        create_segment(dir, first)?;
                    } else {
                        let f = OpenOptions::new().write(true).open(path)?;
                        f.set_len(offset)?;
                        f.sync_all()?;
                    }
                    tracing::warn!(
                        segment = %path.display(),
                        offset,
                        bytes = recovered.torn_bytes,
                        %reason,
                        "cut off a write-ahead log tail a crash left unfinished"
                    );
                }
                recovered.end = at;
                let path = dir.join(segment_name(Lsn(last)));
                (OpenOptions::new().read(true).write(true).open(path)?, Lsn(last))
            }
        };
        let end = recovered.end;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            options,
            state: Mutex::new(State {
                pending: Vec::new(),
                pending_from: end,
                pending_records: 0,
                durable: end,
                waiters: Vec::new(),
                segments,
                failed: None,
                shutdown: false,
            }),
            wake: Condvar::new(),
            syncs: AtomicU64::new(0),
            windows: AtomicU64::new(0),
        });
        let allocated = file.metadata()?.len();
        let writer = Writer {
            shared: shared.clone(),
            file,
            first,
            allocated,
        };
        let thread = std::thread::Builder::new()
            .name("holdpoint-wal".into())
            .spawn(move || writer.run())?;
        Ok((
            Wal {
                shared,
                thread: Some(thread),
            },
            recovered,
        ))
    }

    /// Adds a record. It is durable once [`Wal::wait`] for its `end` returns; records
    /// are written in the order they were appended.
    pub fn append(&self, payload: &[u8]) -> Result<Appended> {
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::Storage(format!(
                "a log record of {} bytes is over the limit of {MAX_PAYLOAD}",
                payload.len()
            )));
        }
        let mut state = lock(&self.shared.state);
        if let Some(e) = &state.failed {
            return Err(Error::Storage(format!("the write-ahead log failed earlier: {e}")));
        }
        if state.shutdown {
            return Err(Error::Storage("the write-ahead log is closed".into()));
        }
        let lsn = state.end();
        let first = state.pending.is_empty();
        frame(&mut state.pending, lsn, payload);
        state.pending_records += 1;
        let end = state.end();
        drop(state);
        // The writer sleeps only when nothing is pending, and looks under the lock, so
        // only the append that made the buffer non-empty needs to wake it.
        if first {
            self.shared.wake.notify_one();
        }
        Ok(Appended { lsn, end })
    }

    /// Waits until everything before `upto` is durable.
    pub async fn wait(&self, upto: Lsn) -> Result<()> {
        let rx = {
            let mut state = lock(&self.shared.state);
            if state.durable >= upto {
                return Ok(());
            }
            if let Some(e) = &state.failed {
                return Err(Error::Storage(format!("the write-ahead log failed: {e}")));
            }
            if upto > state.end() {
                return Err(Error::Storage(format!(
                    "waiting for LSN {upto}, past the log's end at {}",
                    state.end()
                )));
            }
            let (tx, rx) = oneshot::channel();
            state.waiters.push((upto, tx));
            rx
        };
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Storage(format!("the write-ahead log failed: {e}"))),
            Err(_) => Err(Error::Storage("the write-ahead log's writer stopped".into())),
        }
    }

    /// Everything before this is durable.
    pub fn durable(&self) -> Lsn {
        lock(&self.shared.state).durable
    }

    /// Where the next record will go.
    pub fn end(&self) -> Lsn {
        lock(&self.shared.state).end()
    }

    /// `fdatasync` calls made so far (one per group of appends).
    pub fn syncs(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
    }

    /// Times the writer waited [`WalOptions::group_window`] for a group to gather.
    pub fn windows(&self) -> u64 {
        self.shared.windows.load(Ordering::Relaxed)
    }

    /// Deletes every segment that holds only records before `lsn` (never the one being
    /// written), once the caller holds them durably elsewhere. Returns how many went.
    pub fn remove_before(&self, lsn: Lsn) -> Result<usize> {
        let doomed: Vec<PathBuf> = {
            let mut state = lock(&self.shared.state);
            // A segment holds records up to the next one's first LSN.
            let firsts: Vec<u64> = state.segments.keys().copied().collect();
            let mut doomed = Vec::new();
            for pair in firsts.windows(2) {
                if pair[1] <= lsn.0 {
                    if let Some(path) = state.segments.remove(&pair[0]) {
                        doomed.push(path);
                    }
                }
            }
            doomed
        };
        for path in &doomed {
            std::fs::remove_file(path)?;
        }
        if !doomed.is_empty() {
            sync_dir(&self.shared.dir)?;
        }
        Ok(doomed.len())
    }

    /// The segment files, by first LSN.
    pub fn segments(&self) -> Vec<(Lsn, PathBuf)> {
        lock(&self.shared.state)
            .segments
            .iter()
            .map(|(k, p)| (Lsn(*k), p.clone()))
            .collect()
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        lock(&self.shared.state).shutdown = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The writer thread's own state: the segment it writes, and that segment's first LSN.
/// Each write goes where the last one ended, the `pending_from` it took.
struct Writer {
    shared: Arc<Shared>,
    file: File,
    first: Lsn,
    /// The segment file's length: its records, then zeros written ahead.
    allocated: u64,
}

impl Writer {
    fn run(mut self) {
        let mut buf = Vec::new();
        // Records in the last group written.
        let mut last_group = 0;
        let window = self.shared.options.group_window;
        loop {
            let from = {
                let mut state = lock(&self.shared.state);
                while state.pending.is_empty() && !state.shutdown {
                    state = self.shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                if !state.shutdown {
                    state = gather(
                        &self.shared.state,
                        state,
                        last_group,
                        window,
                        &self.shared.windows,
                    );
                }
                last_group = std::mem::take(&mut state.pending_records);
                if state.pending.is_empty() {
                    // Shut down with nothing left to write: the zeros written ahead go,
                    // so a closed log's files hold its records and nothing else.
                    let end = SEGMENT_HEADER_LEN + (state.pending_from.0 - self.first.0);
                    if state.failed.is_none() && self.allocated > end {
                        if let Err(e) = self.file.set_len(end).and_then(|()| self.file.sync_all()) {
                            tracing::warn!(error = %e, "could not trim the log's last segment");
                        }
                    }
                    let waiters = std::mem::take(&mut state.waiters);
                    drop(state);
                    for (_, w) in waiters {
                        let _ = w.send(Err("the write-ahead log closed".into()));
                    }
                    return;
                }
                buf.clear();
                std::mem::swap(&mut buf, &mut state.pending);
                let from = state.pending_from;
                state.pending_from = Lsn(from.0 + buf.len() as u64);
                from
            };
            let result = self.write(from, &buf);
            self.shared.syncs.fetch_add(1, Ordering::Relaxed);
            let mut state = lock(&self.shared.state);
            let ready = match &result {
                Ok(()) => {
                    state.durable = Lsn(from.0 + buf.len() as u64);
                    let durable = state.durable;
                    let (ready, waiting) = std::mem::take(&mut state.waiters)
                        .into_iter()
                        .partition(|(upto, _)| *upto <= durable);
                    state.waiters = waiting;
                    ready
                }
                Err(e) => {
                    tracing::error!(error = %e, "write-ahead log write failed; nothing more is acknowledged");
                    state.failed = Some(e.clone());
                    std::mem::take(&mut state.waiters)
                }
            };
            let failed = result.is_err();
            drop(state);
            for (_, w) in ready {
                let _ = w.send(result.clone());
            }
            if failed {
                return;
            }
        }
    }

    fn write(&mut self, from: Lsn, buf: &[u8]) -> std::result::Result<(), String> {
        let used = from.0 - self.first.0;
        if used > 0 && used + buf.len() as u64 > self.shared.options.segment_bytes {
            // The segment it leaves ends at its last record: its zeros go (a crash before
            // that reaches the disk leaves them, which an open reads as its end too).
            self.file
                .set_len(SEGMENT_HEADER_LEN + used)
                .map_err(|e| format!("trimming the full segment failed: {e}"))?;
            let (file, path) = create_segment(&self.shared.dir, from).map_err(|e| e.to_string())?;
            lock(&self.shared.state).segments.insert(from.0, path);
            self.file = file;
            self.first = from;
            self.allocated = SEGMENT_HEADER_LEN;
        }
        let offset = SEGMENT_HEADER_LEN + (from.0 - self.first.0);
        let needed = offset + buf.len() as u64;
        let ahead = self.shared.options.preallocate_bytes;
        if needed > self.allocated && ahead > 0 {
            // Zeros, not `fallocate`: writing into an unwritten extent converts it, a
            // metadata change each sync would write. Synced with the records below.
            let zeros = vec![0u8; (needed + ahead - self.allocated) as usize];
            self.file
                .write_all_at(&zeros, self.allocated)
                .map_err(|e| format!("writing zeros ahead failed: {e}"))?;
            self.allocated = needed + ahead;
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| format!("write failed: {e}"))?;
        self.allocated = self.allocated.max(needed);
        self.file
            .sync_data()
            .map_err(|e| format!("fdatasync failed: {e}"))?;
        #[cfg(feature = "failpoints")]
        if self.shared.options.fail_sync == Some(self.shared.syncs.load(Ordering::Relaxed) + 1) {
            return Err("fdatasync failed: injected (WalOptions::fail_sync)".into());
        }
        Ok(())
    }
}
