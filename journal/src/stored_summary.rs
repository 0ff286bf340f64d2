//! How the sled store keeps a [`RunSummary`]: a fixed binary header for the fields every
//! summary has, and JSON only for the ones most summaries leave empty.
//!
//! Summary format 2 (written since commits stopped writing per-commit intents; all
//! integers little-endian):
//!
//! ```text
//! byte 0        summary format (2)
//! byte 1        status ([`RunStatus::code`])
//! bytes 2..6    workflow version (u32)
//! bytes 6..14   next seq (u64)
//! bytes 14..46  chain hash of the last event (the head)
//! bytes 46..58  created at: seconds since the Unix epoch (i64), nanoseconds (u32)
//! bytes 58..70  updated at: the same
//! bytes 70..78  bytes of the run's stored records (u64)
//! bytes 78..86  the seq the commit that wrote this summary began at (u64): its events
//!               are `[commit start, next seq)`, so recovery can write that commit's
//!               index changes again (see `sled_store`'s module docs)
//! bytes 86..90  length of the workflow's name (u32), then the name (UTF-8)
//! then          the other fields as a JSON object, only when one of them is set:
//!               open gates and timers, wake-up, idempotency key, stuck reason, deadlines
//! ```
//!
//! Format 1 (still read, no longer written) is the same without bytes 78..86. The run id
//! is the entry's key and is not repeated. A summary of a standard run takes about 103
//! bytes this way, against about 315 as JSON (the id and the chain head as text, two
//! RFC 3339 timestamps, and every field's name). Summaries stored as JSON (their first
//! byte is `{`) are still read; they are rewritten in this format by the run's next
//! commit.

use crate::codec::ChainHash;
use crate::error::{Error, Result};
use crate::ids::{GateId, Position, RunId, Seq};
use crate::store::{RunStatus, RunSummary};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The summary layout this build writes.
pub const SUMMARY_FORMAT: u8 = 2;
/// The layout before the commit start was kept: still read.
const SUMMARY_FORMAT_1: u8 = 1;
const FIXED_LEN: usize = 90;

/// A stored summary as read: the summary, and where the commit that wrote it began.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub summary: RunSummary,
    /// `None` for the earlier layouts, which did not keep it.
    pub commit_from: Option<Seq>,
}

/// The fields kept as JSON, borrowed for writing.
#[derive(Serialize)]
struct RestRef<'a> {
    #[serde(skip_serializing_if = "<[GateId]>::is_empty")]
    open_gates: &'a [GateId],
    #[serde(skip_serializing_if = "<[Position]>::is_empty")]
    open_timers: &'a [Position],
    #[serde(skip_serializing_if = "Option::is_none")]
    wake_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stuck: Option<&'a str>,
    #[serde(skip_serializing_if = "<[(GateId, DateTime<Utc>)]>::is_empty")]
    deadlines: &'a [(GateId, DateTime<Utc>)],
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Rest {
    open_gates: Vec<GateId>,
    open_timers: Vec<Position>,
    wake_at: Option<DateTime<Utc>>,
    idempotency_key: Option<String>,
    stuck: Option<String>,
    deadlines: Vec<(GateId, DateTime<Utc>)>,
}

/// The stored form of `summary`, written by a commit whose events began at
/// `commit_from` (the summary's `next_seq` for a write with no events). `with_wake:
/// false` leaves the wake-up out (the sled store keeps it in its ready queue instead).
pub fn encode(summary: &RunSummary, with_wake: bool, commit_from: Seq) -> Result<Vec<u8>> {
    let name = summary.workflow.as_bytes();
    let name_len = u32::try_from(name.len())
        .map_err(|_| Error::Storage(format!("workflow name of run {} is too long", summary.id)))?;
    let mut out = Vec::with_capacity(FIXED_LEN + name.len() + 24);
    out.push(SUMMARY_FORMAT);
    out.push(summary.status.code());
    out.extend_from_slice(&summary.version.to_le_bytes());
    out.extend_from_slice(&summary.next_seq.0.to_le_bytes());
    out.extend_from_slice(&summary.head.0);
    for t in [summary.created_at, summary.updated_at] {
        out.extend_from_slice(&t.timestamp().to_le_bytes());
        out.extend_from_slice(&t.timestamp_subsec_nanos().to_le_bytes());
    }
    out.extend_from_slice(&summary.bytes.to_le_bytes());
    out.extend_from_slice(&commit_from.0.to_le_bytes());
    out.extend_from_slice(&name_len.to_le_bytes());
    out.extend_from_slice(name);
    let rest = RestRef {
        open_gates: &summary.open_gates,
        open_timers: &summary.open_timers,
        wake_at: if with_wake { summary.wake_at } else { None },
        idempotency_key: summary.idempotency_key.as_deref(),
        stuck: summary.stuck.as_deref(),
        deadlines: &summary.deadlines,
    };
    let empty = rest.open_gates.is_empty()
        && rest.open_timers.is_empty()
        && rest.wake_at.is_none()
        && rest.idempotency_key.is_none()
        && rest.stuck.is_none()
        && rest.deadlines.is_empty();
    if !empty {
        serde_json::to_writer(&mut out, &rest)?;
    }
    Ok(out)
}

/// Reads a stored summary of run `run`, in this format or an earlier one.
pub fn decode(run: RunId, bytes: &[u8]) -> Result<RunSummary> {
    decode_stored(run, bytes).map(|s| s.summary)
}

/// Reads a stored summary of run `run` with the start of the commit that wrote it.
pub fn decode_stored(run: RunId, bytes: &[u8]) -> Result<Stored> {
    let corrupt = |reason: String| Error::Corrupt {
        run,
        seq: Seq::ZERO,
        reason: format!("run summary does not decode: {reason}"),
    };
    match bytes.first() {
        Some(b'{') => {
            let summary = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
            return Ok(Stored {
                summary,
                commit_from: None,
            });
        }
        Some(&SUMMARY_FORMAT | &SUMMARY_FORMAT_1) => {}
        Some(other) => return Err(corrupt(format!("unknown summary format byte {other}"))),
        None => return Err(corrupt("empty".into())),
    }
    let mut r = Reader { bytes, at: 1 };
    let status = r.take::<1>().map(|[c]| c).and_then(RunStatus::from_code);
    let status = status.ok_or_else(|| corrupt("bad status".into()))?;
    let fixed = (|| {
        let version = u32::from_le_bytes(r.take()?);
        let next_seq = Seq(u64::from_le_bytes(r.take()?));
        let head = ChainHash(r.take()?);
        let created_at = r.time()?;
        let updated_at = r.time()?;
        let stored_bytes = u64::from_le_bytes(r.take()?);
        let commit_from = match bytes[0] {
            SUMMARY_FORMAT_1 => None,
            _ => Some(Seq(u64::from_le_bytes(r.take()?))),
        };
        let name_len = usize::try_from(u32::from_le_bytes(r.take()?)).ok()?;
        let name = r.slice(name_len)?;
        Some((
            version,
            next_seq,
            head,
            created_at,
            updated_at,
            stored_bytes,
            commit_from,
            name,
        ))
    })();
    let Some((version, next_seq, head, created_at, updated_at, stored_bytes, commit_from, name)) = fixed
    else {
        return Err(corrupt("truncated".into()));
    };
    let workflow = std::str::from_utf8(name)
        .map_err(|_| corrupt("workflow name is not UTF-8".into()))?
        .to_owned();
    let rest = match &bytes[r.at..] {
        [] => Rest::default(),
        json => serde_json::from_slice(json).map_err(|e| corrupt(e.to_string()))?,
    };
    let summary = RunSummary {
        id: run,
        workflow,
        version,
        status,
        next_seq,
        head,
        open_gates: rest.open_gates,
        open_timers: rest.open_timers,
        wake_at: rest.wake_at,
        created_at,
        updated_at,
        idempotency_key: rest.idempotency_key,
        stuck: rest.stuck,
        deadlines: rest.deadlines,
        bytes: stored_bytes,
    };
    Ok(Stored { summary, commit_from })
}

/// Reads fixed-size fields off the front of a byte string (also the sled store's log
/// records).
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, at: 0 }
    }

    pub(crate) fn slice(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    pub(crate) fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.slice(N)?.try_into().ok()
    }

    /// Whether every byte was read.
    pub(crate) fn is_done(&self) -> bool {
        self.at == self.bytes.len()
    }

    fn time(&mut self) -> Option<DateTime<Utc>> {
        let secs = i64::from_le_bytes(self.take()?);
        let nanos = u32::from_le_bytes(self.take()?);
        DateTime::from_timestamp(secs, nanos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn summary() -> RunSummary {
        let at = DateTime::from_timestamp(1_790_000_000, 123_456_789).unwrap_or_default();
        RunSummary {
            id: RunId::new(),
            workflow: "refund".into(),
            version: 3,
            status: RunStatus::Waiting,
            next_seq: Seq(7),
            head: ChainHash([7; 32]),
            open_gates: vec![GateId(4)],
            open_timers: vec![],
            wake_at: None,
            created_at: at,
            updated_at: at + chrono::Duration::milliseconds(5),
            idempotency_key: Some("order-1".into()),
            stuck: None,
            deadlines: vec![(GateId(4), at + chrono::Duration::hours(24))],
            bytes: 1234,
        }
    }

    #[test]
    fn a_plain_summary_has_no_json_and_round_trips() {
        let s = RunSummary {
            open_gates: vec![],
            idempotency_key: None,
            deadlines: vec![],
            status: RunStatus::Completed,
            ..summary()
        };
        let bytes = encode(&s, true, Seq(5)).unwrap();
        assert_eq!(bytes.len(), FIXED_LEN + "refund".len());
        assert_eq!(decode(s.id, &bytes).unwrap(), s);
        let json = serde_json::to_vec(&s).unwrap();
        assert!(
            bytes.len() * 2 < json.len(),
            "{} vs {} bytes",
            bytes.len(),
            json.len()
        );
    }

    #[test]
    fn the_wake_up_is_left_out_when_asked() {
        let wake = summary().created_at + chrono::Duration::seconds(30);
        let s = RunSummary {
            wake_at: Some(wake),
            ..summary()
        };
        assert_eq!(decode(s.id, &encode(&s, true, s.next_seq).unwrap()).unwrap(), s);
        let without = decode(s.id, &encode(&s, false, s.next_seq).unwrap()).unwrap();
        assert_eq!(without, RunSummary { wake_at: None, ..s });
    }

    #[test]
    fn summaries_stored_as_json_still_read() {
        let s = summary();
        let stored = decode_stored(s.id, &serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(
            stored,
            Stored {
                summary: s,
                commit_from: None
            }
        );
    }

    #[test]
    fn the_commit_start_round_trips_and_format_1_still_reads() {
        let s = summary();
        let bytes = encode(&s, false, Seq(5)).unwrap();
        let stored = decode_stored(s.id, &bytes).unwrap();
        assert_eq!(stored.commit_from, Some(Seq(5)));
        assert_eq!(stored.summary, s);
        // Format 1: the same bytes without the commit start.
        let mut v1 = bytes[..78].to_vec();
        v1[0] = 1;
        v1.extend_from_slice(&bytes[86..]);
        let stored = decode_stored(s.id, &v1).unwrap();
        assert_eq!(
            stored,
            Stored {
                summary: s,
                commit_from: None
            }
        );
    }

    #[test]
    fn damaged_summaries_are_typed_errors() {
        let s = summary();
        let bytes = encode(&s, true, Seq(6)).unwrap();
        for cut in 0..FIXED_LEN + "refund".len() {
            let err = decode(s.id, &bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, Error::Corrupt { run, .. } if run == s.id),
                "cut {cut}: {err}"
            );
        }
        let mut bad_status = bytes.clone();
        bad_status[1] = 200;
        assert!(matches!(decode(s.id, &bad_status), Err(Error::Corrupt { .. })));
        let mut bad_format = bytes.clone();
        bad_format[0] = 9;
        assert!(decode(s.id, &bad_format)
            .unwrap_err()
            .to_string()
            .contains("format byte 9"));
        let mut bad_json = bytes;
        bad_json.push(b'x');
        assert!(matches!(decode(s.id, &bad_json), Err(Error::Corrupt { .. })));
    }

    proptest! {
        #[test]
        fn any_summary_round_trips(
            status in 0u8..6,
            version: u32,
            next in 0u64..u64::MAX,
            head: [u8; 32],
            secs in -10_000_000_000i64..10_000_000_000,
            nanos in 0u32..1_000_000_000,
            workflow in "\\PC{0,40}",
            gates in proptest::collection::vec(0u32..1000, 0..4),
            key in proptest::option::of("\\PC{0,20}"),
            stuck in proptest::option::of("\\PC{0,20}"),
            bytes: u64,
            wake: bool,
            from: u64,
        ) {
            let at = DateTime::from_timestamp(secs, nanos).unwrap_or_default();
            let s = RunSummary {
                id: RunId::new(),
                workflow,
                version,
                status: RunStatus::from_code(status).unwrap_or(RunStatus::Running),
                next_seq: Seq(next),
                head: ChainHash(head),
                open_gates: gates.iter().map(|g| GateId(*g)).collect(),
                open_timers: gates.iter().map(|g| Position(*g)).collect(),
                wake_at: wake.then_some(at),
                created_at: at,
                updated_at: at,
                idempotency_key: key,
                stuck,
                deadlines: gates.iter().map(|g| (GateId(*g), at)).collect(),
                bytes,
            };
            let stored = decode_stored(s.id, &encode(&s, true, Seq(from)).unwrap()).unwrap();
            prop_assert_eq!(stored, Stored { summary: s, commit_from: Some(Seq(from)) });
        }
    }
}
