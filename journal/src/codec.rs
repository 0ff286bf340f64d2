//! The stored form of an event: a small binary header around the event's JSON.
//!
//! ```text
//! byte 0       record format (1)
//! bytes 1..5   CRC-32 (IEEE) of bytes 5.. (big-endian)
//! bytes 5..37  chain hash of the previous event of the same run (zeros at seq 0)
//! bytes 37..   the event as JSON
//! ```
//!
//! The chain hash of a record is `SHA-256(prev_hash ++ json)`. The CRC catches torn
//! writes and flipped bits cheaply, before any JSON is parsed; the chain catches what a
//! CRC cannot: an event edited and re-checksummed, removed, inserted or reordered. The
//! run's summary keeps the hash of its last event (the head), so a truncated tail or a
//! rolled-back journal is detected too.

use crate::error::{Error, Result};
use crate::event::{Event, FORMAT_VERSION};
use crate::ids::{RunId, Seq};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// The record layout this build writes.
pub const RECORD_FORMAT: u8 = 1;
/// Bytes before the JSON body.
pub const HEADER_LEN: usize = 1 + 4 + 32;

/// A link of a run's hash chain.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct ChainHash(pub [u8; 32]);

impl ChainHash {
    /// The `prev_hash` of a run's first event.
    pub const GENESIS: ChainHash = ChainHash([0; 32]);

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHash({})", self.to_hex())
    }
}

impl fmt::Display for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

fn chain(prev: &ChainHash, body: &[u8]) -> ChainHash {
    let mut h = Sha256::new();
    h.update(prev.0);
    h.update(body);
    ChainHash(h.finalize().into())
}

/// Encodes `event` as a record following `prev`. Returns the record and its chain hash.
/// `limit` caps the JSON body; a larger event is refused, not truncated.
pub fn encode(event: &Event, prev: &ChainHash, limit: usize) -> Result<(Vec<u8>, ChainHash)> {
    let mut record = Vec::with_capacity(HEADER_LEN + 256);
    record.push(RECORD_FORMAT);
    record.extend_from_slice(&[0; 4]);
    record.extend_from_slice(&prev.0);
    serde_json::to_writer(&mut record, event)?;
    let size = record.len() - HEADER_LEN;
    if size > limit {
        return Err(Error::EventTooLarge {
            run: event.run,
            size,
            limit,
        });
    }
    let crc = crc32fast::hash(&record[5..]);
    record[1..5].copy_from_slice(&crc.to_be_bytes());
    let hash = chain(prev, &record[HEADER_LEN..]);
    Ok((record, hash))
}

/// A record whose checksum is good but whose body is not yet decoded.
pub struct Checked<'a> {
    pub prev: ChainHash,
    pub body: &'a [u8],
}

impl Checked<'_> {
    pub fn hash(&self) -> ChainHash {
        chain(&self.prev, self.body)
    }
}

/// Checks a record's framing and checksum. `run` and `seq` name where it was read from,
/// for the error.
pub fn check(run: RunId, seq: Seq, record: &[u8]) -> Result<Checked<'_>> {
    let corrupt = |reason: String| Error::Corrupt { run, seq, reason };
    if record.len() < HEADER_LEN + 2 {
        return Err(corrupt(format!(
            "record is {} bytes, shorter than any event",
            record.len()
        )));
    }
    if record[0] != RECORD_FORMAT {
        return Err(corrupt(format!("unknown record format byte {}", record[0])));
    }
    let stored = u32::from_be_bytes([record[1], record[2], record[3], record[4]]);
    let actual = crc32fast::hash(&record[5..]);
    if stored != actual {
        return Err(corrupt(format!(
            "checksum mismatch (stored {stored:08x}, computed {actual:08x})"
        )));
    }
    let mut prev = [0; 32];
    prev.copy_from_slice(&record[5..HEADER_LEN]);
    Ok(Checked {
        prev: ChainHash(prev),
        body: &record[HEADER_LEN..],
    })
}

/// Fully verifies one record read at (`run`, `seq`): checksum, link to `prev` (the chain
/// hash of the event before it), decoding, format version, and that the envelope names
/// the place it was read from. Returns the event and its own chain hash.
pub fn decode(run: RunId, seq: Seq, record: &[u8], prev: &ChainHash) -> Result<(Event, ChainHash)> {
    let checked = check(run, seq, record)?;
    if checked.prev != *prev {
        return Err(Error::Corrupt {
            run,
            seq,
            reason: "hash chain broken: the previous event is not the one this event was appended after"
                .into(),
        });
    }
    let event = decode_body(run, seq, checked.body)?;
    Ok((event, checked.hash()))
}

fn decode_body(run: RunId, seq: Seq, body: &[u8]) -> Result<Event> {
    // Read the version first so a newer format is reported as such rather than as a
    // decoding failure.
    #[derive(Deserialize)]
    struct Version {
        v: u16,
    }
    let event: Event = match serde_json::from_slice(body) {
        Ok(e) => e,
        Err(e) => {
            if let Ok(Version { v }) = serde_json::from_slice::<Version>(body) {
                if v > FORMAT_VERSION {
                    return Err(Error::UnknownFormat {
                        run,
                        seq,
                        version: v,
                        supported: FORMAT_VERSION,
                    });
                }
            }
            return Err(Error::Corrupt {
                run,
                seq,
                reason: format!("event does not decode: {e}"),
            });
        }
    };
    if event.v > FORMAT_VERSION || event.v == 0 {
        return Err(Error::UnknownFormat {
            run,
            seq,
            version: event.v,
            supported: FORMAT_VERSION,
        });
    }
    if event.run != run || event.seq != seq {
        return Err(Error::Corrupt {
            run,
            seq,
            reason: format!(
                "event says it is run {} seq {}, but was stored at run {run} seq {seq}",
                event.run, event.seq
            ),
        });
    }
    Ok(event)
}

/// An append's events, encoded once (outside any transaction: stores may retry theirs).
pub struct Encoded {
    /// The stored records, in order.
    pub records: Vec<Vec<u8>>,
    /// Each event as numbered, with its chain hash.
    pub events: Vec<(Event, ChainHash)>,
}

/// Numbers `kinds` from `first` (all at `at`), chains them from `head`, and encodes them.
pub fn encode_append(
    run: RunId,
    first: Seq,
    at: chrono::DateTime<chrono::Utc>,
    kinds: Vec<crate::event::EventKind>,
    head: &ChainHash,
    limit: usize,
) -> Result<Encoded> {
    let mut out = Encoded {
        records: Vec::with_capacity(kinds.len()),
        events: Vec::with_capacity(kinds.len()),
    };
    let mut head = *head;
    for (i, kind) in kinds.into_iter().enumerate() {
        let event = Event {
            run,
            seq: first.plus(i as u64),
            at,
            v: kind.format(),
            event: kind,
        };
        let (record, hash) = encode(&event, &head, limit)?;
        out.records.push(record);
        out.events.push((event, hash));
        head = hash;
    }
    Ok(out)
}

/// What every store does before its write: the run must exist and be at the append's
/// expected seq (else a conflict value naming what is there); then its events are
/// numbered, chained from the run's head and encoded, once, outside the write (which
/// stores may retry). Returns the summary it checked against, for the write to compare.
pub fn prepare_append(
    current: Option<crate::store::RunSummary>,
    append: crate::store::Append,
    limit: usize,
) -> Result<std::result::Result<(crate::store::RunSummary, Encoded), crate::store::AppendConflict>> {
    let run = append.run;
    let Some(current) = current else {
        return Err(Error::UnknownRun(run));
    };
    if current.next_seq != append.expected {
        return Ok(Err(crate::store::AppendConflict {
            run,
            expected: append.expected,
            found: current.next_seq,
        }));
    }
    let encoded = encode_append(
        run,
        append.expected,
        append.at,
        append.events,
        &current.head,
        limit,
    )?;
    Ok(Ok((current, encoded)))
}

/// A journal holding events past the seq its run's summary knows (found by the strict,
/// offline check).
pub fn past_summary(run: RunId, next_seq: Seq) -> Error {
    Error::Corrupt {
        run,
        seq: next_seq,
        reason: format!("journal has events past seq {next_seq} that the run's summary does not know"),
    }
}

/// Decodes and verifies a run's records `[from, next_seq)`, as every store reads them:
/// each record's checksum and envelope, the chain from the record before `from`
/// (`before`, required when `from > 0`), no gaps, nothing missing at the end, and the
/// last hash equal to the run's recorded `head`. The first problem is the error.
pub fn verify_records<R: AsRef<[u8]>>(
    run: RunId,
    from: Seq,
    before: Option<R>,
    records: impl IntoIterator<Item = Result<(Seq, R)>>,
    next_seq: Seq,
    head: &ChainHash,
) -> Result<Vec<Event>> {
    let mut prev = if from == Seq::ZERO {
        ChainHash::GENESIS
    } else {
        let at = Seq(from.0 - 1);
        let Some(record) = before else {
            return Err(Error::Corrupt {
                run,
                seq: at,
                reason: "event is missing".into(),
            });
        };
        check(run, at, record.as_ref())?.hash()
    };
    let mut out = Vec::new();
    let mut expected = from;
    for item in records {
        let (seq, record) = item?;
        if seq != expected {
            return Err(Error::Corrupt {
                run,
                seq: expected,
                reason: format!("event is missing (the next stored event is seq {seq})"),
            });
        }
        let (event, hash) = decode(run, seq, record.as_ref(), &prev)?;
        out.push(event);
        prev = hash;
        expected = expected.next();
    }
    if expected < next_seq {
        return Err(Error::Corrupt {
            run,
            seq: expected,
            reason: format!(
                "journal ends before seq {expected} but the run has {next_seq} events: events are missing at the end"
            ),
        });
    }
    if expected > from && prev != *head {
        return Err(Error::Corrupt {
            run,
            seq: Seq(expected.0 - 1),
            reason: "last event's chain hash differs from the recorded head: the journal was rewritten"
                .into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use crate::ids::Position;
    use chrono::Utc;

    fn event(run: RunId, seq: u64) -> Event {
        Event {
            run,
            seq: Seq(seq),
            at: Utc::now(),
            v: FORMAT_VERSION,
            event: EventKind::StepCompleted {
                position: Position(seq as u32),
                output: serde_json::json!({"ok": seq}),
            },
        }
    }

    #[test]
    fn round_trip_and_chain() {
        let run = RunId::new();
        let (r0, h0) = encode(&event(run, 0), &ChainHash::GENESIS, 65536).unwrap();
        let (r1, h1) = encode(&event(run, 1), &h0, 65536).unwrap();
        let (e0, d0) = decode(run, Seq(0), &r0, &ChainHash::GENESIS).unwrap();
        assert_eq!(e0, event_with_at(&e0, event(run, 0)));
        assert_eq!(d0, h0);
        let (_, d1) = decode(run, Seq(1), &r1, &h0).unwrap();
        assert_eq!(d1, h1);
        // Linking record 1 after anything but record 0 is detected.
        let err = decode(run, Seq(1), &r1, &ChainHash::GENESIS).unwrap_err();
        assert!(matches!(err, Error::Corrupt { seq: Seq(1), .. }), "{err}");
    }

    fn event_with_at(actual: &Event, mut expected: Event) -> Event {
        expected.at = actual.at;
        expected
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let run = RunId::new();
        let (record, _) = encode(&event(run, 0), &ChainHash::GENESIS, 65536).unwrap();
        for i in 0..record.len() * 8 {
            let mut bad = record.clone();
            bad[i / 8] ^= 1 << (i % 8);
            let err = decode(run, Seq(0), &bad, &ChainHash::GENESIS).unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "bit {i}: {err}");
        }
    }

    #[test]
    fn misplaced_record_is_detected() {
        let run = RunId::new();
        let (record, _) = encode(&event(run, 0), &ChainHash::GENESIS, 65536).unwrap();
        let err = decode(RunId::new(), Seq(0), &record, &ChainHash::GENESIS).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    }

    #[test]
    fn oversized_event_is_refused() {
        let run = RunId::new();
        let mut e = event(run, 0);
        e.event = EventKind::StepCompleted {
            position: Position(0),
            output: serde_json::Value::String("x".repeat(70_000)),
        };
        let err = encode(&e, &ChainHash::GENESIS, 65536).unwrap_err();
        assert!(matches!(err, Error::EventTooLarge { limit: 65536, .. }), "{err}");
    }

    #[test]
    fn newer_format_is_reported_as_such() {
        let run = RunId::new();
        let mut e = event(run, 0);
        e.v = FORMAT_VERSION + 1;
        let (record, _) = encode(&e, &ChainHash::GENESIS, 65536).unwrap();
        let err = decode(run, Seq(0), &record, &ChainHash::GENESIS).unwrap_err();
        assert!(
            matches!(err, Error::UnknownFormat { version, .. } if version == FORMAT_VERSION + 1),
            "{err}"
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode(RunId::new(), Seq(3), &bytes, &ChainHash::GENESIS);
        }
    }
}
