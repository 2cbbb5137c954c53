//! Files in and out: images and label maps.

pub mod clicks;
pub mod nifti;
