//! The telemetry log's record decoder (what the broker reads back from its segment files at
//! start and in its copy into the registry): any bytes give a record no longer than the input
//! or nothing; a record that reads as a message encodes back to exactly the bytes it was read
//! from (so no two encodings, and nothing a device sent inside a field, can read as another
//! record). Never a panic.
#![no_main]
use fleet_broker::fuzzing::{decode_log_record, encode_log_record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while let Some((record, used)) = decode_log_record(&data[at..]) {
        assert!(used >= 8 && used <= data.len() - at);
        if let Some(row) = &record.row {
            let mut again = Vec::new();
            encode_log_record(&mut again, record.seq, row);
            assert_eq!(again, &data[at..at + used]);
        }
        at += used;
    }
});
