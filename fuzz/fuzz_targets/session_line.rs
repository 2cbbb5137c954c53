//! The session protocol's line parser on arbitrary lines.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let names = ["background", "organ", "tumour"].map(String::from);
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = tis::io::protocol::request_id(line);
        let _ = tis::io::protocol::parse_request(line, &names);
    }
});
