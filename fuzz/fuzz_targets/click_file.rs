//! The click-file parser on arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let names = ["background", "organ", "tumour"].map(String::from);
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = tis::io::clicks::parse_clicks(&value, &names);
    }
});
