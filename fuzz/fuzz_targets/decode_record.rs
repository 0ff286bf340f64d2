//! Any bytes, read as a stored journal record (and as an event), or as a stored value
//! that may be a packed commit, must give a typed error or an event — never a panic.
#![no_main]

use holdpoint_journal::codec::{self, ChainHash};
use holdpoint_journal::{Event, RunId, Seq};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let run = RunId::from_bytes([7; 16]);
    let _ = codec::decode(run, Seq(3), data, &ChainHash::GENESIS);
    if let Ok(checked) = codec::check(run, Seq(3), data) {
        let _ = checked.hash();
    }
    let _ = serde_json::from_slice::<Event>(data);
    if let Ok(records) = codec::unpack(run, Seq(3), data) {
        for (seq, range) in records {
            let _ = codec::decode(run, seq, &data[range], &ChainHash::GENESIS);
        }
    }
});
