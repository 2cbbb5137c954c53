//! `tis`: an inference engine for interactive 3D medical image segmentation — an nnU-Net
//! encoder plus the TIS refinement head ("Transforming the Interactive Segmentation for Medical
//! Imaging", MICCAI 2022), with a CPU backend (the oracle) and, later, CUDA kernels.
//!
//! Layout: [`model`] (bundle, nnU-Net network, TIS head, written once over a [`backend`]),
//! [`backend`] (the ops; `cpu`), [`pipeline`] (sliding window, ROI rule, session),
//! [`geometry`] and [`tensor`] (shared types).

pub mod backend;
pub mod bench;
pub mod error;
pub mod evaluation;
pub mod ffi;
pub mod geometry;
pub mod io;
pub mod model;
pub mod pipeline;
pub mod random;
pub mod tensor;

pub use backend::cpu::CpuBackend;
pub use error::{Error, Result};
pub use geometry::{Click, Label, Region};
pub use model::Model;
pub use pipeline::session::{Session, SessionOptions};
pub use tensor::Tensor;
