//! Corrupt storage: sampled single-bit flips over a 10,000-event store, a truncated
//! tail, an unknown event version, a duplicated and a missing seq. Every one gives a
//! typed error naming the run and seq; none is accepted, none panics, other runs go on.
//!
//! Flips: `HOLDPOINT_BITFLIPS` (default 10,000 at the record level, and 1 in 100 of them
//! end to end through a reopened store).

use holdpoint::journal::codec::{self, ChainHash};
use holdpoint::journal::{Error, Event, RunId, Seq, SledStore, Store};
use sha2::{Digest, Sha256};
use std::path::Path;

mod common;

use common::Layout;

const EVENTS: u64 = 10_000;

/// Deterministic sample of (record, bit) from a seed, printed for reproduction.
fn sample(seed: u64, i: u64, n: u64) -> u64 {
    let d = Sha256::new()
        .chain_update(seed.to_be_bytes())
        .chain_update(i.to_be_bytes())
        .finalize();
    u64::from_be_bytes(d[..8].try_into().unwrap()) % n
}

fn raw_records(dir: &Path, run: RunId) -> Vec<Vec<u8>> {
    let db = holdpoint::journal::sled_raw_config(dir).open().unwrap();
    let events = db.open_tree("events").unwrap();
    let out = events
        .scan_prefix(run.as_bytes())
        .map(|kv| kv.unwrap().1.to_vec())
        .collect();
    drop(events);
    common::release_sled(db, dir);
    out
}

/// The raw values of `run` in the `events` tree: the seq each is stored under, and its
/// bytes (one record, or a packed commit).
fn raw_values(dir: &Path, run: RunId) -> Vec<(u64, Vec<u8>)> {
    let db = holdpoint::journal::sled_raw_config(dir).open().unwrap();
    let events = db.open_tree("events").unwrap();
    let out = events
        .scan_prefix(run.as_bytes())
        .map(|kv| {
            let (k, v) = kv.unwrap();
            (u64::from_be_bytes(k[16..24].try_into().unwrap()), v.to_vec())
        })
        .collect();
    drop(events);
    common::release_sled(db, dir);
    out
}

fn edit(dir: &Path, f: impl FnOnce(&sled::Tree)) {
    let db = holdpoint::journal::sled_raw_config(dir).open().unwrap();
    let events = db.open_tree("events").unwrap();
    f(&events);
    drop(events);
    common::release_sled(db, dir);
}

/// How many bit flips (`HOLDPOINT_BITFLIPS`, default 10,000) and from which seed
/// (`HOLDPOINT_SEED`).
fn flips_and_seed() -> (u64, u64) {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    (
        var("HOLDPOINT_BITFLIPS").unwrap_or(10_000),
        var("HOLDPOINT_SEED").unwrap_or(0x5eed),
    )
}

async fn read_error(dir: &Path, run: RunId, other: RunId) -> Error {
    let store = SledStore::open(dir).unwrap();
    let err = store.read(run, Seq::ZERO).await.err();
    assert_eq!(
        store.read(other, Seq::ZERO).await.unwrap().len(),
        1,
        "the other run still reads"
    );
    store.close().unwrap();
    err.expect("corruption must be reported")
}

/// The error a read of `run` gives in a copy of `pristine` (at `tmp/name`) whose events
/// tree `f` edited.
async fn error_after(
    tmp: &Path,
    pristine: &Path,
    name: &str,
    (run, other): (RunId, RunId),
    f: impl FnOnce(&sled::Tree),
) -> Error {
    let dir = tmp.join(name);
    common::copy_dir(pristine, &dir);
    edit(&dir, f);
    read_error(&dir, run, other).await
}

#[tokio::test]
async fn sampled_bit_flips_are_all_caught_at_their_seq() {
    let tmp = tempfile::tempdir().unwrap();
    let pristine = tmp.path().join("pristine");
    let (run, other) = common::store_with_long_run(&pristine, EVENTS, Layout::RecordPerKey).await;
    let records = raw_records(&pristine, run);
    assert_eq!(records.len() as u64, EVENTS);
    // Chain hashes of the intact journal, to check each record in place.
    let mut hashes = Vec::new();
    let mut prev = ChainHash::GENESIS;
    for (i, r) in records.iter().enumerate() {
        prev = codec::decode(run, Seq(i as u64), r, &prev).unwrap().1;
        hashes.push(prev);
    }
    let (flips, seed) = flips_and_seed();
    println!("bit flips: {flips}, seed {seed} (HOLDPOINT_SEED reproduces)");
    let (mut caught, mut accepted) = (0u64, 0u64);
    for i in 0..flips {
        let seq = sample(seed, 2 * i, EVENTS);
        let record = &records[seq as usize];
        let bit = sample(seed, 2 * i + 1, record.len() as u64 * 8);
        let mut bad = record.clone();
        bad[(bit / 8) as usize] ^= 1 << (bit % 8);
        let prev = if seq == 0 {
            ChainHash::GENESIS
        } else {
            hashes[seq as usize - 1]
        };
        match codec::decode(run, Seq(seq), &bad, &prev) {
            Err(Error::Corrupt { run: r, seq: s, .. }) if r == run && s == Seq(seq) => caught += 1,
            Err(e) => panic!("flip {i} (seq {seq}, bit {bit}): wrong error {e}"),
            Ok(_) => accepted += 1,
        }
    }
    println!("bit flips: {caught} caught at their seq, {accepted} accepted");
    assert_eq!((caught, accepted), (flips, 0));

    // End to end through the store, for a sample of them: each on a fresh copy.
    let end_to_end = (flips / 100).max(1);
    for i in 0..end_to_end {
        let seq = sample(seed ^ 0xe2e, 2 * i, EVENTS);
        let bit = sample(seed ^ 0xe2e, 2 * i + 1, records[seq as usize].len() as u64 * 8);
        let dir = tmp.path().join(format!("flip-{i}"));
        common::copy_dir(&pristine, &dir);
        edit(&dir, |events| {
            let mut v = events.get(common::event_key(run, seq)).unwrap().unwrap().to_vec();
            v[(bit / 8) as usize] ^= 1 << (bit % 8);
            events.insert(common::event_key(run, seq), v).unwrap();
        });
        match read_error(&dir, run, other).await {
            Error::Corrupt { seq: s, .. } => assert_eq!(s, Seq(seq), "flip at seq {seq} bit {bit}"),
            e => panic!("flip at seq {seq} bit {bit}: {e}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    println!("end to end: {end_to_end} flips, each reported at its seq; the other run kept reading");
}

#[tokio::test]
async fn truncation_unknown_versions_duplicates_and_gaps_are_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let pristine = tmp.path().join("pristine");
    let (run, other) = common::store_with_long_run(&pristine, EVENTS, Layout::RecordPerKey).await;
    let records = raw_records(&pristine, run);

    let runs = (run, other);

    // The last 10 events lost (a torn tail without the summary knowing).
    let err = error_after(tmp.path(), &pristine, "truncated", runs, |events| {
        for seq in EVENTS - 10..EVENTS {
            events.remove(common::event_key(run, seq)).unwrap();
        }
    })
    .await;
    assert!(matches!(err, Error::Corrupt { seq, .. } if seq == Seq(EVENTS - 10)));

    // An event from a newer format, properly checksummed and chained.
    let mut prev = ChainHash::GENESIS;
    for (i, r) in records.iter().enumerate().take(500) {
        prev = codec::decode(run, Seq(i as u64), r, &prev).unwrap().1;
    }
    let (mut newer, _) = codec::decode(run, Seq(500), &records[500], &prev).unwrap();
    newer.v = 99;
    let (bytes, _) = codec::encode(&newer, &prev, 65536).unwrap();
    let err = error_after(tmp.path(), &pristine, "version", runs, |events| {
        events.insert(common::event_key(run, 500), bytes).unwrap();
    })
    .await;
    match err {
        Error::UnknownFormat { seq, version, .. } => assert_eq!((seq, version), (Seq(500), 99)),
        e => panic!("{e}"),
    }

    // A duplicated seq: event 300 stored again where 301 was.
    let err = error_after(tmp.path(), &pristine, "duplicated", runs, |events| {
        events
            .insert(common::event_key(run, 301), records[300].clone())
            .unwrap();
    })
    .await;
    assert!(matches!(err, Error::Corrupt { seq, .. } if seq == Seq(301)));

    // A missing seq.
    let err = error_after(tmp.path(), &pristine, "missing", runs, |events| {
        events.remove(common::event_key(run, 9000)).unwrap();
    })
    .await;
    assert!(matches!(err, Error::Corrupt { seq, .. } if seq == Seq(9000)));

    // An event that is not JSON at all (bytes replaced, checksum fixed).
    let mut garbage = records[42][..37].to_vec();
    garbage.extend_from_slice(b"\xff\xfe not json");
    let crc = crc32fast::hash(&garbage[5..]);
    garbage[1..5].copy_from_slice(&crc.to_be_bytes());
    let err = error_after(tmp.path(), &pristine, "garbage", runs, |events| {
        events.insert(common::event_key(run, 42), garbage).unwrap();
    })
    .await;
    assert!(matches!(err, Error::Corrupt { seq, .. } if seq == Seq(42)));
}

#[test]
fn decoding_arbitrary_bytes_never_panics() {
    use proptest::prelude::*;
    proptest!(ProptestConfig::with_cases(2000), |(bytes in proptest::collection::vec(any::<u8>(), 0..2048))| {
        let _ = codec::decode(RunId::new(), Seq(7), &bytes, &ChainHash::GENESIS);
        let _ = serde_json::from_slice::<Event>(&bytes);
    });
}

/// Short journals are read with point reads, long ones with a range scan (the sled
/// store's `read_to`); both must report a gap, a lost tail, a duplicate and a garbled
/// record the same way, at the same seq.
#[tokio::test]
async fn short_and_long_journals_report_the_same_corruption() {
    for events in [8u64, 40] {
        let tmp = tempfile::tempdir().unwrap();
        let pristine = tmp.path().join("pristine");
        let (run, other) = common::store_with_long_run(&pristine, events, Layout::RecordPerKey).await;
        let runs = (run, other);
        let records = raw_records(&pristine, run);
        let reason = |e: Error| match e {
            Error::Corrupt { seq, reason, .. } => (seq, reason),
            e => panic!("{events} events: {e}"),
        };

        let err = error_after(tmp.path(), &pristine, "gap", runs, |t| {
            t.remove(common::event_key(run, 3)).unwrap();
        })
        .await;
        let (seq, why) = reason(err);
        assert_eq!(seq, Seq(3), "{events} events");
        assert!(
            why.contains("the next stored event is seq 4"),
            "{events} events: {why}"
        );

        let err = error_after(tmp.path(), &pristine, "tail", runs, |t| {
            for seq in events - 2..events {
                t.remove(common::event_key(run, seq)).unwrap();
            }
        })
        .await;
        let (seq, why) = reason(err);
        assert_eq!(seq, Seq(events - 2), "{events} events");
        assert!(
            why.contains("events are missing at the end"),
            "{events} events: {why}"
        );

        let err = error_after(tmp.path(), &pristine, "duplicate", runs, |t| {
            t.insert(common::event_key(run, 5), records[4].clone()).unwrap();
        })
        .await;
        assert_eq!(reason(err).0, Seq(5), "{events} events");

        let mut flipped = records[6].clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x01;
        let err = error_after(tmp.path(), &pristine, "flipped", runs, |t| {
            t.insert(common::event_key(run, 6), flipped).unwrap();
        })
        .await;
        assert_eq!(reason(err).0, Seq(6), "{events} events");
    }
}

/// Packed commits (a commit's records in one value, as the store writes them): a bit
/// flipped anywhere in one (its framing too), a value cut short and a value removed are
/// each a typed error at a seq of that commit, whether the journal is short enough for
/// point reads or read by a scan; the other run goes on.
#[tokio::test]
async fn damaged_packed_commits_are_typed_errors_at_their_commit() {
    let (flips, seed) = flips_and_seed();
    // End to end only (each on a fresh copy), as many as the record-level test's.
    let per_journal = (flips / 300).max(1);
    println!("packed: {per_journal} flips per journal, seed {seed} (HOLDPOINT_SEED reproduces)");
    for events in [8u64, 40, 2_000] {
        let tmp = tempfile::tempdir().unwrap();
        let pristine = tmp.path().join("pristine");
        let (run, other) = common::store_with_long_run(&pristine, events, Layout::Packed).await;
        let runs = (run, other);
        let values = raw_values(&pristine, run);
        // `run-started` alone, then commits of up to 500 events, one value each.
        let firsts: Vec<u64> = values.iter().map(|(seq, _)| *seq).collect();
        let expected: Vec<u64> = std::iter::once(0).chain((1..events).step_by(500)).collect();
        assert_eq!(firsts, expected, "{events} events");
        assert!(values[1..]
            .iter()
            .all(|(_, v)| v[0] == codec::RECORD_FORMAT_PACKED));
        let end = |i: usize| firsts.get(i + 1).copied().unwrap_or(events);
        let in_commit = |e: Error, i: usize, what: &str| match e {
            Error::Corrupt { run: r, seq, .. } if r == run => {
                assert!(
                    (firsts[i]..end(i)).contains(&seq.0),
                    "{events} events, {what}: seq {seq} outside the commit at {}..{}",
                    firsts[i],
                    end(i)
                );
                seq.0
            }
            e => panic!("{events} events, {what}: {e}"),
        };
        let salt = seed ^ events;
        for n in 0..per_journal {
            let i = 1 + sample(salt, 2 * n, values.len() as u64 - 1) as usize;
            let bit = sample(salt, 2 * n + 1, values[i].1.len() as u64 * 8);
            let err = error_after(tmp.path(), &pristine, &format!("flip-{n}"), runs, |t| {
                let mut v = values[i].1.clone();
                v[(bit / 8) as usize] ^= 1 << (bit % 8);
                t.insert(common::event_key(run, firsts[i]), v).unwrap();
            })
            .await;
            in_commit(err, i, &format!("bit {bit} of the commit at {}", firsts[i]));
        }
        for (n, cut) in [1usize, 5, 100, values[1].1.len() - 1].into_iter().enumerate() {
            let err = error_after(tmp.path(), &pristine, &format!("cut-{n}"), runs, |t| {
                let v = values[1].1[..cut.min(values[1].1.len() - 1)].to_vec();
                t.insert(common::event_key(run, firsts[1]), v).unwrap();
            })
            .await;
            in_commit(err, 1, &format!("cut to {cut} bytes"));
        }
        let err = error_after(tmp.path(), &pristine, "removed", runs, |t| {
            t.remove(common::event_key(run, firsts[1])).unwrap();
        })
        .await;
        assert_eq!(
            in_commit(err, 1, "removed"),
            1,
            "{events} events: the commit's first seq"
        );
    }
}
