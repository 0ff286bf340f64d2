//! The stored form of an event: a small binary header around the event's JSON.
//!
//! Record format 2 (written since the envelope went binary):
//!
//! ```text
//! byte 0       record format (2)
//! bytes 1..5   CRC-32 (IEEE) of place ++ bytes 5.. (big-endian)
//! bytes 5..37  chain hash of the previous event of the same run (zeros at seq 0)
//! bytes 37..45 `at`: whole seconds since the Unix epoch (i64, big-endian)
//! bytes 45..49 `at`: nanoseconds within the second (u32, big-endian)
//! bytes 49..51 event format version `v` (u16, big-endian)
//! bytes 51..   what happened (the [`EventKind`]) as JSON
//! ```
//!
//! `place` is the record's key ([`record_key`]): the run id's 16 bytes and the seq as a
//! big-endian u64. The run and seq are not stored in the record (the key holds them),
//! but they are checked, so a record copied under another key fails its checksum. The chain hash of
//! a record is `SHA-256(prev_hash ++ place ++ bytes 37..)`.
//!
//! Record format 3 is format 2 for the last record of a commit, which the sled store
//! writes as its commit point (a crash leaves a commit whole only if its last record is
//! there: [`ends_commit`]). Its CRC covers the format byte too, so a flipped flag is
//! found like any other damaged byte; its chain hash is format 2's, so marking a record
//! changes no head. Builds before it refuse format 3 as an unknown format byte, so a
//! directory written to since cannot be opened by them.
//!
//! A commit of several records is stored by the sled store as one value (since
//! 2026-12-07): [`RECORD_FORMAT_PACKED`], then each record, in format 2 or 3 exactly as
//! it would be stored alone, after its length ([`pack`], [`unpack`]). The value is kept
//! under the key of the commit's first record, and each record's place (for its
//! checksum and chain hash) is still its own seq, so packing changes no hash. Builds
//! before it refuse the value as an unknown format byte.
//!
//! Record format 1 (still read, never written): bytes 0..37 as above without `place` in
//! the CRC, then the whole [`Event`] as JSON; its chain hash is `SHA-256(prev_hash ++
//! json)`. The chain continues across the two formats, so journals begun before the
//! change keep their heads and grow in format 2.
//!
//! The CRC catches torn writes and flipped bits cheaply, before any JSON is parsed; the
//! chain catches what a CRC cannot: an event edited and re-checksummed, removed, inserted
//! or reordered. The run's summary keeps the hash of its last event (the head), so a
//! truncated tail or a rolled-back journal is detected too.

use crate::error::{Error, Result};
use crate::event::{Event, EventKind, FORMAT_VERSION};
use crate::ids::{RunId, Seq};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// The record layout this build writes.
pub const RECORD_FORMAT: u8 = 2;
/// The first record layout, read but no longer written.
pub const RECORD_FORMAT_1: u8 = 1;
/// [`RECORD_FORMAT`] for the last record of a commit ([`end_commit`]).
pub const RECORD_FORMAT_COMMIT_END: u8 = 3;
/// Bytes before the body: format, CRC and the previous chain hash.
pub const HEADER_LEN: usize = 1 + 4 + 32;
/// Bytes of a format-2 body before the event's JSON: `at` and `v`.
const ENVELOPE_LEN: usize = 8 + 4 + 2;

/// A link of a run's hash chain. Serialized as 64 lowercase hex digits; an array of 32
/// numbers (how summaries stored it before) is still read.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ChainHash(pub [u8; 32]);

impl Serialize for ChainHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let hex = self.hex_digits();
        // Only ASCII digits were written.
        s.serialize_str(std::str::from_utf8(&hex).unwrap_or_default())
    }
}

impl<'de> Deserialize<'de> for ChainHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ChainHash;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a chain hash: 64 hex digits, or an array of 32 bytes")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<ChainHash, E> {
                let digits = v.as_bytes();
                if digits.len() != 64 {
                    return Err(E::invalid_length(digits.len(), &self));
                }
                let nibble = |c: u8| match c {
                    b'0'..=b'9' => Ok(c - b'0'),
                    b'a'..=b'f' => Ok(c - b'a' + 10),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                };
                let mut out = [0u8; 32];
                for (i, pair) in digits.chunks_exact(2).enumerate() {
                    out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
                }
                Ok(ChainHash(out))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<ChainHash, A::Error> {
                let mut out = [0u8; 32];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    return Err(serde::de::Error::invalid_length(33, &self));
                }
                Ok(ChainHash(out))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl ChainHash {
    /// The `prev_hash` of a run's first event.
    pub const GENESIS: ChainHash = ChainHash([0; 32]);

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// The hash as 64 lowercase hex digits (ASCII), without allocating.
    fn hex_digits(&self) -> [u8; 64] {
        let mut hex = [0u8; 64];
        for (i, b) in self.0.iter().enumerate() {
            [hex[2 * i], hex[2 * i + 1]] = hex_pair(*b);
        }
        hex
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

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

fn hex_pair(b: u8) -> [u8; 2] {
    [HEX_DIGITS[usize::from(b >> 4)], HEX_DIGITS[usize::from(b & 15)]]
}

/// `bytes` as lowercase hex, two digits per byte (hashes, tokens, signatures).
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(2 * bytes.len());
    for &b in bytes {
        let [hi, lo] = hex_pair(b);
        out.push(char::from(hi));
        out.push(char::from(lo));
    }
    out
}

/// A record's key, which its checksum and chain hash cover: the run id's bytes, then the
/// seq big-endian (stores keep records under it, so they sort by run, then seq).
pub fn record_key(run: RunId, seq: Seq) -> [u8; 24] {
    let mut out = [0; 24];
    out[..16].copy_from_slice(run.as_bytes());
    out[16..].copy_from_slice(&seq.0.to_be_bytes());
    out
}

fn chain(prev: &ChainHash, place: Option<&[u8; 24]>, body: &[u8]) -> ChainHash {
    let mut h = Sha256::new();
    h.update(prev.0);
    if let Some(place) = place {
        h.update(place);
    }
    h.update(body);
    ChainHash(h.finalize().into())
}

/// The CRC of a record: over its place (formats 2 and 3), its format byte (format 3
/// only: formats 1 and 2 were written without it), and its bytes from 5 on.
fn crc(place: Option<&[u8; 24]>, format: u8, rest: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    if let Some(place) = place {
        h.update(place);
    }
    if format == RECORD_FORMAT_COMMIT_END {
        h.update(&[format]);
    }
    h.update(rest);
    h.finalize()
}

/// Marks a record [`encode`] made for (`run`, `seq`) as the last of its commit (format
/// 3), checksummed again; its chain hash does not change.
pub fn end_commit(run: RunId, seq: Seq, record: &mut [u8]) {
    if record.first() != Some(&RECORD_FORMAT) || record.len() < HEADER_LEN {
        return;
    }
    record[0] = RECORD_FORMAT_COMMIT_END;
    let crc = crc(
        Some(&record_key(run, seq)),
        RECORD_FORMAT_COMMIT_END,
        &record[5..],
    );
    record[1..5].copy_from_slice(&crc.to_be_bytes());
}

/// A store value holding whole commits of several records in all (the sled store's
/// layout since 2026-12-07: one commit's; with its write-ahead log, since 2026-12-07
/// too, those of an activation, each commit's last record in format 3): this byte,
/// then each record (formats 2 and 3, as stored alone)
/// preceded by its length (u32, big-endian). It is kept under the key of its first
/// record; the records' seqs follow on from there, and each record's checksum and chain
/// hash cover its own place as if it were stored alone. A value that begins with any
/// other byte is one record.
pub const RECORD_FORMAT_PACKED: u8 = 4;

/// The value that stores `records`, a commit's records in order, as one: the record
/// itself when there is one, otherwise [`RECORD_FORMAT_PACKED`] framing.
pub fn pack(mut records: Vec<Vec<u8>>) -> Vec<u8> {
    if records.len() == 1 {
        return records.pop().unwrap_or_default();
    }
    pack_all(&records)
}

/// [`pack`] for records held elsewhere: the value that stores them, copied once. The
/// records of several commits may share a value (the last of each ends its commit).
pub fn pack_all<R: AsRef<[u8]>>(records: &[R]) -> Vec<u8> {
    if let [one] = records {
        return one.as_ref().to_vec();
    }
    let len = 1 + records.iter().map(|r| 4 + r.as_ref().len()).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.push(RECORD_FORMAT_PACKED);
    for record in records.iter().map(AsRef::as_ref) {
        // Records are capped far below 4 GiB (`max_event_bytes`).
        out.extend_from_slice(&u32::try_from(record.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(record);
    }
    out
}

/// Where the records of the value stored under (`run`, `first`) lie in it: one record
/// at `first`, or the records a [`pack`]ed value frames, at `first`, `first + 1`, ...
/// Only the framing is checked here (each record's own checks come when it is read); a
/// framing that does not add up is corruption at `first`, the commit's seq, since no
/// record of it can be placed with confidence.
pub fn unpack(run: RunId, first: Seq, value: &[u8]) -> Result<Vec<(Seq, std::ops::Range<usize>)>> {
    if value.first() != Some(&RECORD_FORMAT_PACKED) {
        return Ok(vec![(first, 0..value.len())]);
    }
    let corrupt = |reason: String| Error::Corrupt {
        run,
        seq: first,
        reason: format!("the packed commit stored at seq {first} is malformed: {reason}"),
    };
    let mut out = Vec::with_capacity(4);
    let mut at = 1;
    while at < value.len() {
        let n = out.len();
        let len = value
            .get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes)
            .ok_or_else(|| corrupt(format!("the length of its record {n} is cut")))?
            as usize;
        let body = at + 4;
        if len == 0 || value.len() - body < len {
            return Err(corrupt(format!(
                "its record {n} of {len} bytes does not fit in the {} left",
                value.len() - body
            )));
        }
        out.push((Seq(first.0 + n as u64), body..body + len));
        at = body + len;
    }
    if out.len() < 2 {
        return Err(corrupt(format!("it holds {} records", out.len())));
    }
    Ok(out)
}

/// Whether a record, checked, is the last of its commit.
pub fn ends_commit(checked: &Checked<'_>) -> bool {
    checked.format == RECORD_FORMAT_COMMIT_END
}

/// Encodes `event` as a record following `prev` (record format 2). Returns the record
/// and its chain hash. `limit` caps the stored body (the envelope and the JSON of what
/// happened); a larger event is refused, not truncated.
pub fn encode(event: &Event, prev: &ChainHash, limit: usize) -> Result<(Vec<u8>, ChainHash)> {
    let mut record = Vec::with_capacity(HEADER_LEN + ENVELOPE_LEN + 192);
    record.push(RECORD_FORMAT);
    record.extend_from_slice(&[0; 4]);
    record.extend_from_slice(&prev.0);
    record.extend_from_slice(&event.at.timestamp().to_be_bytes());
    record.extend_from_slice(&event.at.timestamp_subsec_nanos().to_be_bytes());
    record.extend_from_slice(&event.v.to_be_bytes());
    serde_json::to_writer(&mut record, &event.event)?;
    let size = record.len() - HEADER_LEN;
    if size > limit {
        return Err(Error::EventTooLarge {
            run: event.run,
            size,
            limit,
        });
    }
    let place = record_key(event.run, event.seq);
    let crc = crc(Some(&place), RECORD_FORMAT, &record[5..]);
    record[1..5].copy_from_slice(&crc.to_be_bytes());
    let hash = chain(prev, Some(&place), &record[HEADER_LEN..]);
    Ok((record, hash))
}

/// A record whose checksum is good but whose body is not yet decoded.
pub struct Checked<'a> {
    pub format: u8,
    pub prev: ChainHash,
    pub body: &'a [u8],
    place: Option<[u8; 24]>,
}

impl Checked<'_> {
    pub fn hash(&self) -> ChainHash {
        chain(&self.prev, self.place.as_ref(), self.body)
    }
}

/// Checks a record's framing and checksum. `run` and `seq` name where it was read from:
/// a format-2 record's checksum covers them, and errors name them.
pub fn check(run: RunId, seq: Seq, record: &[u8]) -> Result<Checked<'_>> {
    let corrupt = |reason: String| Error::Corrupt { run, seq, reason };
    let (place, shortest) = match record.first() {
        Some(&RECORD_FORMAT | &RECORD_FORMAT_COMMIT_END) => {
            (Some(record_key(run, seq)), HEADER_LEN + ENVELOPE_LEN + 2)
        }
        Some(&RECORD_FORMAT_1) => (None, HEADER_LEN + 2),
        Some(other) => return Err(corrupt(format!("unknown record format byte {other}"))),
        None => return Err(corrupt("record is empty".into())),
    };
    if record.len() < shortest {
        return Err(corrupt(format!(
            "record is {} bytes, shorter than any event",
            record.len()
        )));
    }
    let stored = u32::from_be_bytes([record[1], record[2], record[3], record[4]]);
    let actual = crc(place.as_ref(), record[0], &record[5..]);
    if stored != actual {
        return Err(corrupt(format!(
            "checksum mismatch (stored {stored:08x}, computed {actual:08x}): the record is damaged or is not stored where it was written"
        )));
    }
    let mut prev = [0; 32];
    prev.copy_from_slice(&record[5..HEADER_LEN]);
    Ok(Checked {
        format: record[0],
        prev: ChainHash(prev),
        body: &record[HEADER_LEN..],
        place,
    })
}

/// Fully verifies one record read at (`run`, `seq`): checksum, link to `prev` (the chain
/// hash of the event before it), decoding, format version, and that the record belongs
/// at the place it was read from. Returns the event and its own chain hash.
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
    let event = if checked.format == RECORD_FORMAT_1 {
        decode_body_v1(run, seq, checked.body)?
    } else {
        decode_body(run, seq, checked.body)?
    };
    Ok((event, checked.hash()))
}

/// A format-2 body: the binary envelope, then what happened as JSON.
fn decode_body(run: RunId, seq: Seq, body: &[u8]) -> Result<Event> {
    let corrupt = |reason: String| Error::Corrupt { run, seq, reason };
    // `check` guarantees the envelope's bytes are there.
    let (envelope, json) = body.split_at(ENVELOPE_LEN);
    let mut secs = [0; 8];
    secs.copy_from_slice(&envelope[..8]);
    let mut nanos = [0; 4];
    nanos.copy_from_slice(&envelope[8..12]);
    let v = u16::from_be_bytes([envelope[12], envelope[13]]);
    if v > FORMAT_VERSION || v == 0 {
        return Err(Error::UnknownFormat {
            run,
            seq,
            version: v,
            supported: FORMAT_VERSION,
        });
    }
    let at = DateTime::<Utc>::from_timestamp(i64::from_be_bytes(secs), u32::from_be_bytes(nanos))
        .ok_or_else(|| corrupt("event time is out of range".into()))?;
    let event: EventKind =
        serde_json::from_slice(json).map_err(|e| corrupt(format!("event does not decode: {e}")))?;
    Ok(Event {
        run,
        seq,
        at,
        v,
        event,
    })
}

/// A format-1 body: the whole event as JSON, its envelope naming its place.
fn decode_body_v1(run: RunId, seq: Seq, body: &[u8]) -> Result<Event> {
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
/// last hash equal to the run's recorded `head`. The first problem is the error. Past
/// `next_seq` there is nothing to read or check: no events, not an error (such a read
/// once reported the record before `from` as missing, a corruption). From `next_seq`
/// itself the last record is still checked: its checksum, and its hash against `head`.
pub fn verify_records<R: AsRef<[u8]>>(
    run: RunId,
    from: Seq,
    before: Option<R>,
    records: impl IntoIterator<Item = Result<(Seq, R)>>,
    next_seq: Seq,
    head: &ChainHash,
) -> Result<Vec<Event>> {
    if from > next_seq {
        return Ok(Vec::new());
    }
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
    // `prev` is the last record's hash, read here or (from `next_seq`) the one before.
    if expected > Seq::ZERO && prev != *head {
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
    fn a_commit_end_keeps_the_chain_and_its_flag_is_checksummed() {
        let run = RunId::new();
        let e = event(run, 4);
        let (plain, hash) = encode(&e, &ChainHash::GENESIS, 65_536).unwrap();
        let mut last = plain.clone();
        end_commit(run, Seq(4), &mut last);
        assert_eq!(last[0], RECORD_FORMAT_COMMIT_END);
        let checked = check(run, Seq(4), &last).unwrap();
        assert!(ends_commit(&checked));
        assert!(!ends_commit(&check(run, Seq(4), &plain).unwrap()));
        let (decoded, head) = decode(run, Seq(4), &last, &ChainHash::GENESIS).unwrap();
        assert_eq!((decoded, head), (e, hash), "same event, same chain hash");
        // The flag cannot be flipped either way unnoticed, nor moved to another place.
        let mut cleared = last.clone();
        cleared[0] = RECORD_FORMAT;
        assert!(check(run, Seq(4), &cleared).is_err());
        let mut set = plain.clone();
        set[0] = RECORD_FORMAT_COMMIT_END;
        assert!(check(run, Seq(4), &set).is_err());
        assert!(check(run, Seq(5), &last).is_err());
    }

    #[test]
    fn hex_is_two_lowercase_digits_per_byte() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff, 0x5c]), "000fa0ff5c");
        let hash = ChainHash(std::array::from_fn(|i| (i * 37) as u8));
        assert_eq!(hash.to_hex(), hex(&hash.0));
        assert_eq!(hash.to_hex().as_bytes(), &hash.hex_digits()[..]);
    }

    #[test]
    fn chain_hashes_serialize_as_hex_and_the_array_form_still_reads() {
        let hash = ChainHash(std::array::from_fn(|i| (i * 8) as u8));
        let json = serde_json::to_string(&hash).unwrap();
        assert_eq!(json, format!("\"{}\"", hash.to_hex()));
        assert_eq!(serde_json::from_str::<ChainHash>(&json).unwrap(), hash);
        let array = serde_json::to_string(&hash.0).unwrap();
        assert_eq!(serde_json::from_str::<ChainHash>(&array).unwrap(), hash);
        for bad in ["\"00\"", "\"{}\"", "[1,2]", "[256]"] {
            let bad = bad.replace("{}", &"zz".repeat(32));
            assert!(serde_json::from_str::<ChainHash>(&bad).is_err(), "{bad}");
        }
        let too_long = serde_json::to_string(&vec![0u8; 33]).unwrap();
        assert!(serde_json::from_str::<ChainHash>(&too_long).is_err());
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

    /// A number in a step's output or an action's args is read back as the same f64 it
    /// was written as: replay hands out what the live run saw, and a request's hash
    /// (over its args as JSON) is the same after a read. serde_json's default float
    /// parser reads the numbers below one unit in the last place off.
    #[test]
    fn floats_read_back_exactly_as_written() {
        let run = RunId::new();
        let floats = [
            130.65331632653061,
            97.45365320034685,
            0.1 + 0.2,
            1e-300,
            f64::MAX,
            5e-324,
        ];
        for (i, x) in floats.into_iter().enumerate() {
            let mut e = event(run, 0);
            e.event = EventKind::StepCompleted {
                position: Position(0),
                output: serde_json::json!({ "amount": x, "list": [x, -x] }),
            };
            let (record, _) = encode(&e, &ChainHash::GENESIS, 65_536).unwrap();
            let (decoded, _) = decode(run, Seq(0), &record, &ChainHash::GENESIS).unwrap();
            assert_eq!(decoded, e, "float {i}: {x:?}");
            let EventKind::StepCompleted { output, .. } = &decoded.event else {
                unreachable!()
            };
            assert_eq!(
                output["amount"].as_f64().map(f64::to_bits),
                Some(x.to_bits()),
                "{x:?}"
            );
        }
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

    #[test]
    fn a_packed_commit_unpacks_to_its_records_and_seqs() {
        let run = RunId::new();
        let mut prev = ChainHash::GENESIS;
        let mut records = Vec::new();
        for seq in 7..10 {
            let (mut record, hash) = encode(&event(run, seq), &prev, 65536).unwrap();
            if seq == 9 {
                end_commit(run, Seq(seq), &mut record);
            }
            prev = hash;
            records.push(record);
        }
        let one = pack(vec![records[0].clone()]);
        assert_eq!(one, records[0], "a commit of one record is stored as the record");
        assert_eq!(unpack(run, Seq(7), &one).unwrap(), vec![(Seq(7), 0..one.len())]);

        let packed = pack(records.clone());
        assert_eq!(packed[0], RECORD_FORMAT_PACKED);
        let ranges = unpack(run, Seq(7), &packed).unwrap();
        let seqs: Vec<Seq> = ranges.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, [Seq(7), Seq(8), Seq(9)]);
        let mut prev = ChainHash::GENESIS;
        for ((seq, range), record) in ranges.into_iter().zip(&records) {
            assert_eq!(&packed[range.clone()], record.as_slice());
            let checked = check(run, seq, &packed[range.clone()]).unwrap();
            assert_eq!(ends_commit(&checked), seq == Seq(9));
            if seq > Seq(7) {
                assert_eq!(checked.prev, prev);
            }
            prev = decode(run, seq, &packed[range], &checked.prev).unwrap().1;
        }
    }

    #[test]
    fn a_packed_commit_that_does_not_add_up_is_corrupt_at_its_seq() {
        let run = RunId::new();
        let (a, _) = encode(&event(run, 4), &ChainHash::GENESIS, 65536).unwrap();
        let packed = pack(vec![a.clone(), a.clone()]);
        let malformed = |value: &[u8]| match unpack(run, Seq(4), value) {
            Err(Error::Corrupt { seq, reason, .. }) => {
                assert_eq!(seq, Seq(4));
                assert!(reason.contains("packed commit stored at seq 4"), "{reason}");
            }
            other => panic!("expected corruption, got {other:?}"),
        };
        // Cut inside the second record, inside its length, and after the first record.
        malformed(&packed[..packed.len() - 1]);
        malformed(&packed[..1 + 4 + a.len() + 2]);
        malformed(&packed[..1 + 4 + a.len()]);
        // A length past the end, a zero length, no records at all.
        let mut long = packed.clone();
        long[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
        malformed(&long);
        let mut zero = packed.clone();
        zero[1..5].copy_from_slice(&0u32.to_be_bytes());
        malformed(&zero);
        malformed(&[RECORD_FORMAT_PACKED]);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode(RunId::new(), Seq(3), &bytes, &ChainHash::GENESIS);
            if let Ok(ranges) = unpack(RunId::new(), Seq(3), &bytes) {
                for (_, range) in ranges {
                    proptest::prop_assert!(range.end <= bytes.len());
                }
            }
        }
    }
}
