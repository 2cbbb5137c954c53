//! Files in and out: images and label maps, click files, plots. Every output is written to a
//! temporary file beside its destination and renamed into place, so a failure never leaves a
//! partial file and never clobbers what was there.

pub mod clicks;
pub mod nifti;
pub mod png;
pub mod protocol;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Runs `write` on a temporary path beside `path`, then renames it to `path`; on failure the
/// temporary file is removed and `path` is untouched.
pub fn replace_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Image {
            path: path.to_path_buf(),
            message: "not a file name".into(),
        })?;
    // The temporary name keeps the extension, which some writers read (.nii.gz, .png).
    let temporary: PathBuf = path.with_file_name(format!(".partial-{}-{name}", std::process::id()));
    write(&temporary)
        .and_then(|()| std::fs::rename(&temporary, path).map_err(|e| Error::io(path, e)))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&temporary);
        })
}

/// Writes `bytes` to `path` through a temporary file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_atomically(path, |temporary| {
        std::fs::write(temporary, bytes).map_err(|e| Error::io(temporary, e))
    })
}
