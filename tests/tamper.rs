//! Tamper evidence on a 10,000-event journal: any modified (and re-checksummed),
//! deleted, inserted or reordered event is found, naming the first bad seq; a
//! truncation made consistent (summary rewritten too) is found against saved heads.

use holdpoint::journal::{stored_summary, RunId, Seq, SledStore, Store};
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::Layout;

const EVENTS: u64 = 10_000;

/// Edits the raw trees with plain sled, then lets go of the directory.
fn tamper(dir: &Path, f: impl FnOnce(&sled::Tree, &sled::Tree)) {
    let db = holdpoint::journal::sled_raw_config(dir).open().unwrap();
    let events = db.open_tree("events").unwrap();
    let runs = db.open_tree("runs").unwrap();
    f(&events, &runs);
    drop(events);
    drop(runs);
    common::release_sled(db, dir);
}

/// The first bad seq that reading the run reports (None: reads clean).
async fn first_bad(dir: &Path, run: RunId, other: RunId) -> Option<u64> {
    let store = SledStore::open(dir).unwrap();
    let result = store.read(run, Seq::ZERO).await;
    // The other run is untouched and still reads.
    assert_eq!(store.read(other, Seq::ZERO).await.unwrap().len(), 1);
    store.close().unwrap();
    match result {
        Ok(events) => {
            assert_eq!(events.len() as u64, EVENTS);
            None
        }
        Err(holdpoint::journal::Error::Corrupt { seq, .. }) => Some(seq.0),
        Err(e) => panic!("expected corruption, got {e}"),
    }
}

/// Replaces `from` with `to` in the JSON of `record` (format 2: header 37 bytes,
/// envelope 14, then the event kind's JSON), stored at (`run`, `seq`), and fixes its
/// checksum, which covers that place too, as a careful tamperer would.
fn rewrite(record: &mut Vec<u8>, run: RunId, seq: u64, from: &str, to: &str) {
    let body = String::from_utf8(record[51..].to_vec())
        .unwrap()
        .replace(from, to);
    record.truncate(51);
    record.extend_from_slice(body.as_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&common::event_key(run, seq));
    crc.update(&record[5..]);
    record[1..5].copy_from_slice(&crc.finalize().to_be_bytes());
}

fn fresh(base: &Path, name: &str) -> PathBuf {
    let dir = base.join(name);
    common::copy_dir(&base.join("pristine"), &dir);
    dir
}

#[tokio::test]
async fn modified_deleted_inserted_and_reordered_events_are_found() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, other) =
        common::store_with_long_run(&tmp.path().join("pristine"), EVENTS, Layout::RecordPerKey).await;
    assert_eq!(first_bad(&tmp.path().join("pristine"), run, other).await, None);

    // Modified and re-checksummed, in the middle: the next event's link breaks.
    let dir = fresh(tmp.path(), "modified");
    tamper(&dir, |events, _| {
        let mut v = events
            .get(common::event_key(run, 4321))
            .unwrap()
            .unwrap()
            .to_vec();
        rewrite(&mut v, run, 4321, "\"n\":4321", "\"n\":9999");
        events.insert(common::event_key(run, 4321), v).unwrap();
    });
    assert_eq!(first_bad(&dir, run, other).await, Some(4322));

    // Modified and re-checksummed, the last one: the summary's head no longer matches.
    let dir = fresh(tmp.path(), "modified-last");
    let last = EVENTS - 1;
    tamper(&dir, |events, _| {
        let mut v = events
            .get(common::event_key(run, last))
            .unwrap()
            .unwrap()
            .to_vec();
        rewrite(&mut v, run, last, &format!("\"n\":{last}"), "\"n\":0");
        events.insert(common::event_key(run, last), v).unwrap();
    });
    assert_eq!(first_bad(&dir, run, other).await, Some(last));

    // Deleted.
    let dir = fresh(tmp.path(), "deleted");
    tamper(&dir, |events, _| {
        events.remove(common::event_key(run, 777)).unwrap().unwrap();
    });
    assert_eq!(first_bad(&dir, run, other).await, Some(777));

    // Inserted: a forged event at 5000, the rest shifted up by one.
    let dir = fresh(tmp.path(), "inserted");
    tamper(&dir, |events, _| {
        for seq in (5000..EVENTS).rev() {
            let v = events.get(common::event_key(run, seq)).unwrap().unwrap();
            events.insert(common::event_key(run, seq + 1), v).unwrap();
        }
        let forged = events.get(common::event_key(run, 4999)).unwrap().unwrap();
        events.insert(common::event_key(run, 5000), forged).unwrap();
    });
    assert_eq!(first_bad(&dir, run, other).await, Some(5000));

    // Reordered: two events swapped.
    let dir = fresh(tmp.path(), "reordered");
    tamper(&dir, |events, _| {
        let a = events.get(common::event_key(run, 100)).unwrap().unwrap();
        let b = events.get(common::event_key(run, 101)).unwrap().unwrap();
        events.insert(common::event_key(run, 100), b).unwrap();
        events.insert(common::event_key(run, 101), a).unwrap();
    });
    assert_eq!(first_bad(&dir, run, other).await, Some(100));
}

/// The same tampering inside packed commits (a commit's records in one value, as the
/// store writes them; the journal's 500-event commits): each record keeps its own
/// checksum over its place, and the chain runs through the value.
#[tokio::test]
async fn tampering_inside_packed_commits_is_found() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, other) =
        common::store_with_long_run(&tmp.path().join("pristine"), EVENTS, Layout::Packed).await;
    assert_eq!(first_bad(&tmp.path().join("pristine"), run, other).await, None);
    // Rewrites the commit holding `seq` with `f` applied to its records (and the index
    // of `seq` among them).
    let repack = |name: &str, seq: u64, f: &dyn Fn(&mut Vec<Vec<u8>>, usize)| {
        let dir = fresh(tmp.path(), name);
        tamper(&dir, |events, _| {
            let (key, mut records, i) = common::held_record(events, run, seq).unwrap();
            assert!(records.len() > 1, "seq {seq} is in a packed commit");
            f(&mut records, i);
            events
                .insert(key, holdpoint::journal::codec::pack(records))
                .unwrap();
        });
        dir
    };

    // Modified and re-checksummed: the next event's link breaks.
    let dir = repack("modified", 4321, &|records, i| {
        rewrite(&mut records[i], run, 4321, "\"n\":4321", "\"n\":9999");
    });
    assert_eq!(first_bad(&dir, run, other).await, Some(4322));

    // Deleted: the records after it move down a place, which their checksums cover.
    let dir = repack("deleted", 777, &|records, i| {
        records.remove(i);
    });
    assert_eq!(first_bad(&dir, run, other).await, Some(777));

    // Inserted: a copy of 4999 at 5000.
    let dir = repack("inserted", 5000, &|records, i| {
        let forged = records[i - 1].clone();
        records.insert(i, forged);
    });
    assert_eq!(first_bad(&dir, run, other).await, Some(5000));

    // Reordered: two events swapped.
    let dir = repack("reordered", 100, &|records, i| records.swap(i, i + 1));
    assert_eq!(first_bad(&dir, run, other).await, Some(100));
}

#[tokio::test]
async fn a_consistent_truncation_is_found_against_saved_heads() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (run, _) = common::store_with_long_run(&data.join("journal"), EVENTS, Layout::RecordPerKey).await;
    let bin = env!("CARGO_BIN_EXE_holdpoint");
    let out = Command::new(bin)
        .args(["verify", "--head", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let heads: String = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.split_whitespace().count() == 3 && !l.starts_with("verified"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(heads.lines().count(), 2, "{heads}");
    let saved = tmp.path().join("heads.txt");
    std::fs::write(&saved, heads).unwrap();

    // An attacker drops the last 100 events and rewrites the run's summary to match.
    let store = SledStore::open(data.join("journal")).unwrap();
    let new_head = store.chain_hash_at(run, Seq(EVENTS - 101)).unwrap();
    store.close().unwrap();
    tamper(&data.join("journal"), |events, runs| {
        for seq in EVENTS - 100..EVENTS {
            events.remove(common::event_key(run, seq)).unwrap();
        }
        let stored = runs.get(run.as_bytes()).unwrap().unwrap();
        let mut summary = stored_summary::decode(run, &stored).unwrap();
        summary.next_seq = Seq(EVENTS - 100);
        summary.head = new_head;
        runs.insert(
            run.as_bytes(),
            stored_summary::encode(&summary, false, summary.next_seq).unwrap(),
        )
        .unwrap();
    });
    // On its own the journal now looks whole...
    let out = Command::new(bin)
        .args(["verify", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // ...but not against the heads saved before.
    let out = Command::new(bin)
        .args(["verify", "--data"])
        .arg(&data)
        .arg("--heads")
        .arg(&saved)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("BAD {run}")) && text.contains("truncated or rolled back"),
        "{text}"
    );
}
