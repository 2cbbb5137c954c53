//! Files in and out: images and label maps.

pub mod nifti;
