//! Golden journals: journals written by earlier versions, kept byte for byte, that the
//! current code must still read and replay. Never regenerate one; when the format
//! changes, add a new file for the new version next to the old ones.
//!
//! `refund-v1.jsonl` (event format v1, as `holdpoint export` writes it):
//! run-started (refund G-7, 300.00), lookup_order step, gate send_money (300.00),
//! reject by alice ("please check the order total first"), second gate (150.00),
//! edit by bob to 90.00, send_money step, run-completed.
//! `refund-v1.records`: the same run's stored records (record format 1), hex, one per
//! line: checksum, hash chain and JSON body as sled held them.
//! `refund-v1.format2.records`: the same run in record format 2 (binary envelope).

use holdpoint::journal::codec::{self, ChainHash};
use holdpoint::journal::{Decision, Event, EventKind, Seq};
use holdpoint::prelude::*;
use holdpoint::workflows::{refund, Ledger};
use holdpoint::{fold, replay, Replay};
use std::sync::Arc;

fn golden_events() -> Vec<Event> {
    include_str!("golden/refund-v1.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("golden event still decodes"))
        .collect()
}

fn registry() -> Registry {
    refund::register(Registry::new(), Arc::new(Ledger::new("/nonexistent/ledger")))
}

#[tokio::test]
async fn refund_v1_replays_against_current_code() {
    let events = golden_events();
    assert_eq!(events.len(), 10);
    // Replay never runs a step (the ledger path does not exist) and appends nothing.
    assert_eq!(
        replay(&registry(), &events).await,
        Replay::Consistent { would_append: vec![] }
    );
    let state = fold(&events);
    assert_eq!(state.status, RunStatus::Completed);
    let decisions: Vec<_> = state.gates.values().filter_map(|g| g.decision.clone()).collect();
    assert_eq!(decisions.len(), 2);
    assert!(matches!(&decisions[0].decision, Decision::Reject { reason } if reason.contains("order total")));
    assert_eq!(decisions[0].by.as_str(), "alice");
    assert!(matches!(&decisions[1].decision, Decision::Edit { args } if args["amount_cents"] == 9000));
    assert_eq!(state.output.unwrap()["payment"]["amount_cents"], 9000);
}

fn golden_records(hex: &str) -> Vec<Vec<u8>> {
    hex.lines()
        .map(|l| {
            (0..l.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
                .collect()
        })
        .collect()
}

/// Verifies `records` as one journal and checks they decode to `events`.
fn verify_as_journal(records: &[Vec<u8>], events: &[Event]) -> ChainHash {
    let run = events[0].run;
    let mut prev = ChainHash::GENESIS;
    for (i, record) in records.iter().enumerate() {
        let (event, hash) = codec::decode(run, Seq(i as u64), record, &prev).expect("golden record verifies");
        assert_eq!(event, events[i], "record {i} decodes to another event");
        prev = hash;
    }
    prev
}

#[test]
fn refund_v1_records_of_format_1_still_verify_and_match_the_events() {
    let events = golden_events();
    let records = golden_records(include_str!("golden/refund-v1.records"));
    assert_eq!(records.len(), events.len());
    assert!(records.iter().all(|r| r[0] == codec::RECORD_FORMAT_1));
    verify_as_journal(&records, &events);
    assert!(matches!(
        events.last().unwrap().event,
        EventKind::RunCompleted { .. }
    ));
}

#[test]
fn refund_v1_records_of_format_2_verify_and_encode_the_same_today() {
    let events = golden_events();
    let records = golden_records(include_str!("golden/refund-v1.format2.records"));
    assert_eq!(records.len(), events.len());
    assert!(records.iter().all(|r| r[0] == codec::RECORD_FORMAT));
    let head = verify_as_journal(&records, &events);
    // Re-encoding today gives the same bytes: the stored format has not drifted.
    let mut prev = ChainHash::GENESIS;
    for (i, event) in events.iter().enumerate() {
        let (bytes, hash) = codec::encode(event, &prev, 65536).unwrap();
        assert_eq!(bytes, records[i], "record {i} encodes differently today");
        prev = hash;
    }
    assert_eq!(prev, head);
}

/// A journal begun in format 1 grows in format 2 after an upgrade: the chain runs on
/// across the change, and a format-2 record's checksum binds it to its place.
#[test]
fn a_journal_continues_from_format_1_into_format_2() {
    let events = golden_events();
    let old = golden_records(include_str!("golden/refund-v1.records"));
    let run = events[0].run;
    let mut mixed = old[..5].to_vec();
    let mut prev = ChainHash::GENESIS;
    for (i, record) in mixed.iter().enumerate() {
        prev = codec::decode(run, Seq(i as u64), record, &prev).unwrap().1;
    }
    for event in &events[5..] {
        let (bytes, hash) = codec::encode(event, &prev, 65536).unwrap();
        mixed.push(bytes);
        prev = hash;
    }
    let decoded = codec::verify_records(
        run,
        Seq::ZERO,
        None::<Vec<u8>>,
        mixed
            .iter()
            .enumerate()
            .map(|(i, r)| Ok((Seq(i as u64), r.clone()))),
        Seq(events.len() as u64),
        &prev,
    )
    .expect("the mixed journal verifies");
    assert_eq!(decoded, events);
    // From the middle, the link is checked from the format-1 record before it.
    let tail = codec::verify_records(
        run,
        Seq(5),
        Some(mixed[4].clone()),
        mixed[5..]
            .iter()
            .enumerate()
            .map(|(i, r)| Ok((Seq(5 + i as u64), r.clone()))),
        Seq(events.len() as u64),
        &prev,
    )
    .unwrap();
    assert_eq!(tail, events[5..]);
    // The same format-2 record under another seq fails its checksum.
    let err = codec::decode(
        run,
        Seq(6),
        &mixed[5],
        &codec::check(run, Seq(5), &mixed[5]).unwrap().hash(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
}
