//! The bundle loader on arbitrary bytes: header, metadata JSON, tensor table. It must return an
//! error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tis::model::Bundle::from_bytes(data, "fuzz");
});
