//! The NIfTI reader on arbitrary files, plain and gzip-named (the reader decides by name).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir();
    for name in ["fuzz.nii", "fuzz.nii.gz"] {
        let path = dir.join(format!("tis-{}-{name}", std::process::id()));
        if std::fs::write(&path, data).is_ok() {
            let _ = tis::io::nifti::read_image(&path);
            let _ = std::fs::remove_file(&path);
        }
    }
});
