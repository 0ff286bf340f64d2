//! The write-ahead log (`journal::wal`): what comes back after a reopen, torn tails cut
//! and nothing else, damage refused with a typed error, segments and checkpoints.

use holdpoint_journal::wal::{
    Appended, Lsn, Recovered, Wal, WalOptions, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use holdpoint_journal::Error;
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn payload(i: usize) -> Vec<u8> {
    // Sizes from empty to a few KiB, contents that differ per record.
    let len = (i * 37) % 3000;
    (0..len).map(|j| (i * 31 + j) as u8).collect()
}

/// Every record an open replayed, with its LSN.
type Replayed = Vec<(Lsn, Vec<u8>)>;

/// Opens `dir` from `from`, returning the log, what it found and every record replayed.
fn open(dir: &Path, options: WalOptions, from: Lsn) -> Result<(Wal, Recovered, Replayed), Error> {
    let mut seen = Vec::new();
    let (wal, recovered) = Wal::open(dir, options, from, |lsn, p| {
        seen.push((lsn, p.to_vec()));
        Ok(())
    })?;
    Ok((wal, recovered, seen))
}

// With the `failpoints` feature the options have one more field.
#[allow(clippy::needless_update)]
fn small_segments() -> WalOptions {
    WalOptions {
        segment_bytes: 4096,
        ..WalOptions::default()
    }
}

/// A few KiB written ahead instead of the default, for tests that make many logs.
#[allow(clippy::needless_update)]
fn little_ahead() -> WalOptions {
    WalOptions {
        preallocate_bytes: 4096,
        ..WalOptions::default()
    }
}

/// Appends `payloads` and waits for the last; returns where each went.
async fn append_all(wal: &Wal, payloads: &[Vec<u8>]) -> Vec<Appended> {
    let out: Vec<Appended> = payloads.iter().map(|p| wal.append(p).unwrap()).collect();
    if let Some(last) = out.last() {
        wal.wait(last.end).await.unwrap();
    }
    out
}

/// Appends `payloads` one write at a time (each waited for), so that small segments
/// fill and the log moves on to new ones.
async fn append_each(wal: &Wal, payloads: &[Vec<u8>]) -> Vec<Appended> {
    let mut out = Vec::new();
    for p in payloads {
        let a = wal.append(p).unwrap();
        wal.wait(a.end).await.unwrap();
        out.push(a);
    }
    out
}

/// The first LSN a segment file's name gives.
fn first_lsn(segment: &Path) -> u64 {
    let name = segment.file_name().unwrap().to_str().unwrap();
    name.trim_end_matches(".wal").parse().unwrap()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    files.sort();
    files
}

fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    segment_files(dir)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

#[tokio::test]
async fn records_come_back_in_order_with_their_lsns_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let first: Vec<Vec<u8>> = (0..100).map(payload).collect();
    let (wal, recovered, seen) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
    assert_eq!(recovered, Recovered::default());
    assert!(seen.is_empty());
    let appended = append_all(&wal, &first).await;
    assert_eq!(appended[0].lsn, Lsn(0));
    for pair in appended.windows(2) {
        assert_eq!(pair[0].end, pair[1].lsn, "records follow each other");
    }
    for (a, p) in appended.iter().zip(&first) {
        assert_eq!(a.end.0 - a.lsn.0, RECORD_HEADER_LEN + p.len() as u64);
    }
    let end = wal.end();
    assert_eq!(wal.durable(), end);
    drop(wal);

    let (wal, recovered, seen) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
    assert_eq!(
        recovered,
        Recovered {
            records: 100,
            end,
            torn_bytes: 0
        }
    );
    let expected: Vec<(Lsn, Vec<u8>)> = appended.iter().map(|a| a.lsn).zip(first.clone()).collect();
    assert_eq!(seen, expected);

    // The log goes on where it ended, and a third open sees both.
    let more: Vec<Vec<u8>> = (100..150).map(payload).collect();
    let appended_more = append_all(&wal, &more).await;
    assert_eq!(appended_more[0].lsn, end);
    drop(wal);
    let (_wal, recovered, seen) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
    assert_eq!(recovered.records, 150);
    assert_eq!(seen.len(), 150);
    assert_eq!(seen[100], (end, more[0].clone()));
    assert_eq!(seen[149].1, more[49]);
}

/// A lone commit, appended and waited for before the next, never waits for a group to
/// gather: each is written and synced at once.
#[tokio::test]
async fn a_lone_commit_never_waits_for_a_group_window() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _, _) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
    let payloads: Vec<Vec<u8>> = (0..50).map(payload).collect();
    append_each(&wal, &payloads).await;
    assert_eq!(wal.syncs(), 50);
    assert_eq!(wal.windows(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_share_syncs_and_each_keeps_its_order() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _, _) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
    let wal = std::sync::Arc::new(wal);
    let mut tasks = Vec::new();
    for t in 0..32u8 {
        let wal = wal.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40u8 {
                let a = wal.append(&[t, i]).unwrap();
                wal.wait(a.end).await.unwrap();
                // Acknowledged means durable: the log says so too.
                assert!(wal.durable() >= a.end);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let syncs = wal.syncs();
    assert!(syncs >= 1);
    // 32 appenders at once make groups of several records, after which the writer
    // lets the next group gather.
    assert!(wal.windows() >= 1, "{syncs} syncs, no group window");
    drop(wal);
    let (_wal, recovered, seen) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
    assert_eq!(recovered.records, 32 * 40);
    for t in 0..32u8 {
        let mine: Vec<u8> = seen
            .iter()
            .filter(|(_, p)| p[0] == t)
            .map(|(_, p)| p[1])
            .collect();
        assert_eq!(
            mine,
            (0..40).collect::<Vec<u8>>(),
            "appender {t}'s records in its order"
        );
    }
    println!("1,280 acknowledged appends took {syncs} syncs");
}

#[tokio::test]
async fn appends_made_together_are_synced_together() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _, _) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
    let payloads: Vec<Vec<u8>> = (0..2000).map(|i| payload(i % 50)).collect();
    let appended = append_all(&wal, &payloads).await;
    // Waiting for the last one covers every one before it.
    assert!(appended.iter().all(|a| a.end <= wal.durable()));
    // The writer takes whatever is pending at once: 2,000 appends made back to back
    // cannot each have had a sync of their own.
    assert!(wal.syncs() < 2000, "{} syncs for 2,000 appends", wal.syncs());
}

/// Writes `n` records to a fresh log, one write each, and closes it; returns their
/// places and payloads.
fn written(
    dir: &Path,
    options: WalOptions,
    n: usize,
    size: impl Fn(usize) -> usize,
) -> Vec<(Appended, Vec<u8>)> {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let (wal, _, _) = open(dir, options, Lsn(0)).unwrap();
    let payloads: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; size(i)]).collect();
    let appended = rt.block_on(append_each(&wal, &payloads));
    drop(wal);
    appended.into_iter().zip(payloads).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("HOLDPOINT_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
    ))]

    /// A crash cuts the last write anywhere: the open keeps exactly the records wholly
    /// before the cut, cuts the rest off, and the log goes on from there.
    #[test]
    fn a_cut_anywhere_in_the_last_segment_keeps_the_records_before_it(
        sizes in proptest::collection::vec(0usize..600, 1..30),
        cut_at in 0.0f64..1.0,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let records = written(dir.path(), little_ahead(), sizes.len(), |i| sizes[i]);
        let file = segment_files(dir.path()).pop().unwrap();
        let len = std::fs::metadata(&file).unwrap().len();
        let cut = SEGMENT_HEADER_LEN + ((len - SEGMENT_HEADER_LEN) as f64 * cut_at) as u64;
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(cut).unwrap();

        let whole: Vec<&(Appended, Vec<u8>)> = records
            .iter()
            .filter(|(a, _)| SEGMENT_HEADER_LEN + a.end.0 <= cut)
            .collect();
        let end = whole.last().map_or(Lsn(0), |(a, _)| a.end);
        let (wal, recovered, seen) = open(dir.path(), little_ahead(), Lsn(0)).unwrap();
        prop_assert_eq!(recovered.records, whole.len() as u64);
        prop_assert_eq!(recovered.end, end);
        prop_assert_eq!(recovered.torn_bytes, cut - (SEGMENT_HEADER_LEN + end.0));
        let expected: Vec<(Lsn, Vec<u8>)> = whole.iter().map(|(a, p)| (a.lsn, p.clone())).collect();
        prop_assert_eq!(&seen, &expected);
        prop_assert_eq!(std::fs::metadata(&file).unwrap().len(), SEGMENT_HEADER_LEN + end.0);

        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let next = rt.block_on(append_all(&wal, &[b"after the cut".to_vec()]));
        prop_assert_eq!(next[0].lsn, end);
        drop(wal);
        let (_wal, recovered, seen) = open(dir.path(), little_ahead(), Lsn(0)).unwrap();
        prop_assert_eq!(recovered.torn_bytes, 0);
        prop_assert_eq!(seen.len(), whole.len() + 1);
        prop_assert_eq!(&seen.last().unwrap().1, &b"after the cut".to_vec());
    }
}

#[test]
fn garbage_after_the_last_record_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let records = written(dir.path(), WalOptions::default(), 10, |i| 10 + i);
    let file = segment_files(dir.path()).pop().unwrap();
    let clean = std::fs::read(&file).unwrap();
    // A whole earlier record copied to the end checks out by its checksum, but names
    // an LSN that is not its place: not a record of this log.
    let (second, _) = &records[1];
    let copy = clean
        [(SEGMENT_HEADER_LEN + second.lsn.0) as usize..(SEGMENT_HEADER_LEN + second.end.0) as usize]
        .to_vec();
    // Zeros then anything else: bytes a torn write left past a hole.
    let after_zeros = [vec![0u8; 40], vec![0xff; 3]].concat();
    for tail in [vec![0xff; 7], (0..=255u8).collect(), copy, after_zeros] {
        std::fs::write(&file, [clean.clone(), tail.clone()].concat()).unwrap();
        let (_wal, recovered, seen) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
        assert_eq!(recovered.records, 10);
        assert_eq!(recovered.torn_bytes, tail.len() as u64);
        assert_eq!(seen.len(), 10);
        assert_eq!(
            std::fs::read(&file).unwrap(),
            clean,
            "the tail is cut off, the records kept"
        );
    }
}

/// Zeros after the last record are the space written ahead of the records
/// (`WalOptions::preallocate_bytes`): kept, read as the log's end, and written over.
#[test]
fn zeros_after_the_last_record_are_the_logs_end_and_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let records = written(dir.path(), WalOptions::default(), 10, |i| 10 + i);
    let file = segment_files(dir.path()).pop().unwrap();
    let clean = std::fs::read(&file).unwrap();
    let end = records[9].0.end;
    assert_eq!(
        clean.len() as u64,
        SEGMENT_HEADER_LEN + end.0,
        "a closed log holds its records only"
    );
    // Down to fewer zeros than a record header.
    for zeros in [1usize << 20, 100, 5] {
        std::fs::write(&file, [clean.clone(), vec![0u8; zeros]].concat()).unwrap();
        let (wal, recovered, seen) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
        assert_eq!(
            (recovered.records, recovered.end, recovered.torn_bytes),
            (10, end, 0)
        );
        assert_eq!(seen.len(), 10);
        assert_eq!(
            std::fs::metadata(&file).unwrap().len(),
            clean.len() as u64 + zeros as u64
        );
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let next = rt.block_on(append_all(&wal, &[b"over the zeros".to_vec()]));
        assert_eq!(next[0].lsn, end);
        drop(wal);
        let (wal, recovered, seen) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
        assert_eq!((recovered.records, recovered.torn_bytes), (11, 0));
        assert_eq!(seen[10].1, b"over the zeros");
        drop(wal);
        std::fs::write(&file, &clean).unwrap();
    }
}

/// While the log is open its segment runs ahead of its records in zeros, so a group
/// commit's sync changes no file size; a segment it moves on from and a closed log's
/// last end at their last record.
#[tokio::test]
// With the `failpoints` feature the options have one more field.
#[allow(clippy::needless_update)]
async fn segments_are_written_ahead_in_zeros_and_trimmed_when_left() {
    let dir = tempfile::tempdir().unwrap();
    let options = WalOptions {
        segment_bytes: 64 << 10,
        preallocate_bytes: 32 << 10,
        ..WalOptions::default()
    };
    let (wal, _, _) = open(dir.path(), options.clone(), Lsn(0)).unwrap();
    let first = append_all(&wal, &[payload(1)]).await;
    let file = segment_files(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&file).unwrap().len();
    assert_eq!(
        len,
        SEGMENT_HEADER_LEN + first[0].end.0 + (32 << 10),
        "written ahead"
    );
    // Within the zeros, the file does not grow.
    let more = append_all(&wal, &[payload(2), payload(3)]).await;
    assert!(SEGMENT_HEADER_LEN + more[1].end.0 < len);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), len);
    // Past the segment's size the log moves on; the segment it left is trimmed.
    let many: Vec<Vec<u8>> = (4..80).map(payload).collect();
    let appended = append_each(&wal, &many).await;
    let files = segment_files(dir.path());
    assert!(files.len() >= 2, "{} segments", files.len());
    assert_eq!(
        std::fs::metadata(&files[0]).unwrap().len(),
        SEGMENT_HEADER_LEN + first_lsn(&files[1])
    );
    drop(wal);
    let last = files.last().unwrap();
    let last_first = first_lsn(last);
    let end = appended.last().unwrap().end.0;
    assert_eq!(
        std::fs::metadata(last).unwrap().len(),
        SEGMENT_HEADER_LEN + end - last_first
    );
    let (_wal, recovered, _) = open(dir.path(), options, Lsn(0)).unwrap();
    assert_eq!((recovered.records, recovered.torn_bytes), (79, 0));
}

/// A torn write can leave a hole of zeros with intact records after it. Those records
/// were never acknowledged, and they name their own LSNs: were they kept, a later record
/// of the same length as the lost one would end where the first of them begins, and
/// the next open would read it as the record after. The open clears them.
#[test]
fn records_after_a_hole_are_cleared_so_none_can_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let records = written(dir.path(), WalOptions::default(), 3, |_| 50);
    let file = segment_files(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let (second, _) = &records[1];
    let hole = (SEGMENT_HEADER_LEN + second.lsn.0) as usize..(SEGMENT_HEADER_LEN + second.end.0) as usize;
    bytes[hole].fill(0);
    std::fs::write(&file, &bytes).unwrap();
    let (wal, recovered, seen) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
    assert_eq!(recovered.records, 1);
    assert_eq!(recovered.end, second.lsn);
    assert_eq!(
        recovered.torn_bytes,
        bytes.len() as u64 - SEGMENT_HEADER_LEN - second.lsn.0
    );
    assert_eq!(seen.len(), 1);
    // A record as long as the lost one, so it ends where the stale third began.
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let next = rt.block_on(append_all(&wal, &[vec![7u8; 50]]));
    assert_eq!(next[0].end, records[2].0.lsn);
    drop(wal);
    let (_wal, recovered, seen) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
    assert_eq!(recovered.records, 2, "the stale third record does not come back");
    assert_eq!(seen[1].1, vec![7u8; 50]);
}

#[test]
fn damage_before_the_last_segment_is_a_typed_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    written(dir.path(), small_segments(), 100, |_| 150);
    let files = segment_files(dir.path());
    assert!(files.len() >= 4, "{} segments", files.len());
    let before = snapshot(dir.path());

    // A flipped byte in a record of the second segment.
    let mut bytes = before[1].1.clone();
    bytes[SEGMENT_HEADER_LEN as usize + 40] ^= 0x10;
    std::fs::write(&files[1], &bytes).unwrap();
    match open(dir.path(), small_segments(), Lsn(0)) {
        Err(Error::WalCorrupt {
            segment,
            offset,
            reason,
        }) => {
            assert_eq!(segment, files[1]);
            assert_eq!(
                offset, SEGMENT_HEADER_LEN,
                "the first record of the segment is bad"
            );
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected WalCorrupt, got {:?}", other.map(|(_, r, _)| r)),
    }
    let mut damaged = before.clone();
    damaged[1].1 = bytes;
    assert_eq!(snapshot(dir.path()), damaged, "nothing was cut or rewritten");

    // The second segment cut short: not a torn tail, since a segment follows it.
    std::fs::write(&files[1], &before[1].1[..before[1].1.len() - 5]).unwrap();
    let err = open(dir.path(), small_segments(), Lsn(0))
        .err()
        .expect("a short middle segment is damage");
    assert!(
        matches!(err, Error::WalCorrupt { ref segment, .. } if *segment == files[1]),
        "{err}"
    );

    // A segment missing between two others.
    std::fs::write(&files[1], &before[1].1).unwrap();
    std::fs::remove_file(&files[2]).unwrap();
    let err = open(dir.path(), small_segments(), Lsn(0))
        .err()
        .expect("a missing segment is damage");
    match err {
        Error::WalCorrupt { segment, reason, .. } => {
            assert_eq!(segment, files[3]);
            assert!(reason.contains("missing"), "{reason}");
        }
        other => panic!("expected WalCorrupt, got {other}"),
    }
    std::fs::write(&files[2], &before[2].1).unwrap();

    // A segment whose header names another first LSN, and one that is not a segment.
    let mut renamed = before[2].1.clone();
    renamed[15] ^= 1;
    std::fs::write(&files[2], &renamed).unwrap();
    assert!(matches!(
        open(dir.path(), small_segments(), Lsn(0)),
        Err(Error::WalCorrupt { ref segment, offset: 8, .. }) if *segment == files[2]
    ));
    std::fs::write(&files[2], b"not a log segment at all").unwrap();
    assert!(matches!(
        open(dir.path(), small_segments(), Lsn(0)),
        Err(Error::WalCorrupt { ref segment, offset: 0, .. }) if *segment == files[2]
    ));
    std::fs::write(&files[2], &before[2].1).unwrap();
    let (_wal, recovered, _) = open(dir.path(), small_segments(), Lsn(0)).unwrap();
    assert_eq!(recovered.records, 100, "repaired, everything reads again");
}

#[tokio::test]
async fn segments_before_a_checkpoint_go_and_an_open_from_it_reads_only_what_follows() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _, _) = open(dir.path(), small_segments(), Lsn(0)).unwrap();
    let payloads: Vec<Vec<u8>> = (0..200).map(|i| vec![i as u8; 100]).collect();
    let appended = append_each(&wal, &payloads).await;
    let segments = wal.segments();
    assert!(segments.len() > 4, "{} segments", segments.len());
    for pair in segments.windows(2) {
        assert!(pair[0].0 < pair[1].0);
    }
    // Every segment file starts at a record.
    for (first, _) in &segments {
        assert!(appended.iter().any(|a| a.lsn == *first) || *first == Lsn(0));
    }

    let checkpoint = appended[150].lsn;
    let removed = wal.remove_before(checkpoint).unwrap();
    let left = wal.segments();
    assert_eq!(removed + left.len(), segments.len());
    assert!(removed > 0);
    assert!(
        left[0].0 <= checkpoint,
        "the segment holding the checkpoint stays"
    );
    assert!(left.get(1).is_none_or(|s| s.0 > checkpoint));
    assert_eq!(segment_files(dir.path()).len(), left.len());
    // Removing again, or before an earlier LSN, removes nothing.
    assert_eq!(wal.remove_before(checkpoint).unwrap(), 0);
    assert_eq!(wal.remove_before(Lsn(0)).unwrap(), 0);
    drop(wal);

    let (_wal, recovered, seen) = open(dir.path(), small_segments(), checkpoint).unwrap();
    assert_eq!(recovered.records, 50);
    let expected: Vec<(Lsn, Vec<u8>)> = appended[150..]
        .iter()
        .map(|a| a.lsn)
        .zip(payloads[150..].to_vec())
        .collect();
    assert_eq!(seen, expected);
    drop(_wal);

    // An open from before what the log still holds is refused: those records are gone.
    match open(dir.path(), small_segments(), Lsn(0)) {
        Err(Error::WalCorrupt { reason, .. }) => assert!(reason.contains("missing"), "{reason}"),
        other => panic!("expected WalCorrupt, got {:?}", other.map(|(_, r, _)| r)),
    }
    // So is one from past the log's end: the log lost records the checkpoint covers.
    let past = Lsn(appended[199].end.0 + 1000);
    assert!(matches!(
        open(dir.path(), small_segments(), past),
        Err(Error::WalCorrupt { .. })
    ));
    assert_eq!(
        open(dir.path(), small_segments(), checkpoint).unwrap().1.records,
        50
    );
    // And one from a checkpoint with no log at all: the log was lost.
    let empty = tempfile::tempdir().unwrap();
    match open(empty.path(), small_segments(), checkpoint) {
        Err(Error::WalCorrupt { reason, .. }) => assert!(reason.contains("missing"), "{reason}"),
        other => panic!("expected WalCorrupt, got {:?}", other.map(|(_, r, _)| r)),
    }
    assert!(segment_files(empty.path()).is_empty(), "nothing was created");
}

#[test]
fn a_segment_created_but_never_written_is_started_again() {
    let dir = tempfile::tempdir().unwrap();
    let records = written(dir.path(), WalOptions::default(), 3, |_| 20);
    let end = records[2].0.end;
    // A crash between creating the next segment and syncing its header.
    let name = dir.path().join(format!("{:020}.wal", end.0));
    std::fs::write(&name, b"HPW").unwrap();
    let (wal, recovered, seen) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
    assert_eq!(recovered.records, 3);
    assert_eq!(recovered.end, end);
    assert_eq!(recovered.torn_bytes, 3);
    assert_eq!(seen.len(), 3);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let next = rt.block_on(append_all(&wal, &[b"next".to_vec()]));
    assert_eq!(next[0].lsn, end);
    drop(wal);
    let (_wal, recovered, _) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
    assert_eq!(recovered.records, 4);
}

#[tokio::test]
async fn what_cannot_be_appended_is_refused_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _, _) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
    let big = vec![0u8; holdpoint_journal::wal::MAX_PAYLOAD + 1];
    assert!(matches!(wal.append(&big), Err(Error::Storage(_))));
    assert_eq!(wal.end(), Lsn(0), "nothing was framed");
    // Waiting for a place the log has not reached is an error, not a hang.
    assert!(matches!(wal.wait(Lsn(1)).await, Err(Error::Storage(_))));
    let a = wal.append(b"fine").unwrap();
    wal.wait(a.end).await.unwrap();
    assert_eq!(a.lsn, Lsn(0));
}

#[test]
fn files_that_are_not_segments_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    written(dir.path(), WalOptions::default(), 5, |_| 8);
    std::fs::write(dir.path().join("notes.txt"), b"operator's notes").unwrap();
    std::fs::write(dir.path().join("123.wal"), b"wrong name length").unwrap();
    let (_wal, recovered, _) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
    assert_eq!(recovered.records, 5);
    assert_eq!(
        std::fs::read(dir.path().join("notes.txt")).unwrap(),
        b"operator's notes"
    );
}

/// After a failed sync nothing more is acknowledged: the kernel may have dropped the
/// pages it could not write, so a later sync's success would say nothing about them.
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_failed_sync_fails_its_waiters_and_every_append_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let options = WalOptions {
        fail_sync: Some(3),
        ..WalOptions::default()
    };
    let (wal, _, _) = open(dir.path(), options, Lsn(0)).unwrap();
    let first = append_each(&wal, &[b"one".to_vec(), b"two".to_vec()]).await;
    assert_eq!(wal.syncs(), 2);
    let third = wal.append(b"three").unwrap();
    match wal.wait(third.end).await {
        Err(Error::Storage(e)) => assert!(e.contains("injected"), "{e}"),
        other => panic!("the failed sync's waiter must get its error, got {other:?}"),
    }
    assert!(wal.durable() < third.end, "not counted as durable");
    match wal.append(b"four") {
        Err(Error::Storage(e)) => assert!(e.contains("failed earlier"), "{e}"),
        other => panic!("appends after a failed sync must be refused, got {other:?}"),
    }
    assert!(matches!(wal.wait(third.end).await, Err(Error::Storage(_))));
    drop(wal);
    // A reopen reads what is on disk: the acknowledged records, and the unacknowledged
    // one too if its bytes made it (here they did: only the sync was made to fail).
    let (wal, recovered, seen) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
    assert_eq!(
        &seen[..2],
        &[(first[0].lsn, b"one".to_vec()), (first[1].lsn, b"two".to_vec())]
    );
    assert!(recovered.records >= 2);
    let next = append_each(&wal, &[b"after the reopen".to_vec()]).await;
    assert_eq!(next[0].lsn, recovered.end);
}

/// Dropping the log writes and syncs what was appended but not yet waited for.
#[test]
fn dropping_the_log_writes_what_was_appended() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _, _) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
    let appended: Vec<Appended> = (0..500).map(|i| wal.append(&payload(i)).unwrap()).collect();
    drop(wal);
    let (_wal, recovered, seen) = open(dir.path(), WalOptions::default(), Lsn(0)).unwrap();
    assert_eq!(recovered.records, 500);
    assert_eq!(recovered.end, appended[499].end);
    assert_eq!(seen[499], (appended[499].lsn, payload(499)));
}
