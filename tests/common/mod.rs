//! Helpers shared by the integration tests: fixture files, golden tensors, bundle rewriting.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::Dtype;
use tis::model::bundle::TensorFile;
use tis::{Click, Tensor};

/// Parity bound of the contract for f32 against the PyTorch reference.
pub const PARITY_TOLERANCE: f64 = 1e-5;

/// The repository's root: CARGO_MANIFEST_DIR at run time (cargo sets it; scripts/gpu-check.sh
/// sets it where the test binary runs in another checkout), else where the tests were built.
pub fn root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The `tis` binary: TIS_BIN at run time (scripts/gpu-check.sh points it at gpu-bin/tis), else
/// the one cargo built with the tests.
pub fn tis_binary() -> PathBuf {
    std::env::var_os("TIS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tis")))
}

pub fn fixture(path: &str) -> PathBuf {
    root().join("tests/fixtures").join(path)
}

pub fn read_fixture(path: &str) -> Vec<u8> {
    let p = fixture(path);
    std::fs::read(&p).unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", p.display()))
}

/// Asserts the relative L2 error of `got` against `want` is within the parity bound.
pub fn assert_parity(what: &str, got: &Tensor, want: &Tensor) -> f64 {
    let err = got.relative_l2_error(want).expect("comparable shapes");
    assert!(
        err <= PARITY_TOLERANCE,
        "{what}: relative L2 error {err:e} > {PARITY_TOLERANCE:e}"
    );
    err
}

/// Clicks stored as an n × 4 int64 tensor (z, y, x, class).
pub fn clicks(file: &TensorFile<'_>, name: &str) -> Vec<Click> {
    let (shape, values) = file.i64(name).unwrap();
    assert_eq!(shape[1], 4, "{name} must be n × 4");
    values
        .chunks_exact(4)
        .map(|c| Click::new(c[0] as usize, c[1] as usize, c[2] as usize, c[3] as usize))
        .collect()
}

/// A ROI stored as a 3 × 2 int64 tensor of (start, stop) per axis.
pub fn roi(file: &TensorFile<'_>, name: &str) -> tis::Region {
    let (_, v) = file.i64(name).unwrap();
    tis::Region {
        start: [v[0] as usize, v[2] as usize, v[4] as usize],
        size: [
            (v[1] - v[0]) as usize,
            (v[3] - v[2]) as usize,
            (v[5] - v[4]) as usize,
        ],
    }
}

/// Refined logits N × K of a region as the K × rz × ry × rx volume the fixtures store.
pub fn tokens_to_volume(logits: &Tensor, roi: &tis::Region) -> Tensor {
    let k = logits.shape()[1];
    logits
        .transpose_2d()
        .unwrap()
        .reshape(vec![k, roi.size[0], roi.size[1], roi.size[2]])
        .unwrap()
}

/// A safetensors file held as editable parts: metadata and tensors (dtype, shape, bytes).
pub struct EditableFile {
    pub metadata: HashMap<String, String>,
    pub tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
}

impl EditableFile {
    pub fn parse(bytes: &[u8]) -> Self {
        let file = TensorFile::parse(bytes, "test").unwrap();
        let tensors = safetensors::SafeTensors::deserialize(bytes).unwrap();
        EditableFile {
            metadata: file.metadata().clone().into_iter().collect(),
            tensors: file
                .names()
                .into_iter()
                .map(|n| {
                    let v = tensors.tensor(&n).unwrap();
                    (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())
                })
                .collect(),
        }
    }

    pub fn serialize(&self) -> Vec<u8> {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = self
            .tensors
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, Some(self.metadata.clone())).unwrap()
    }

    pub fn tensor_mut(&mut self, name: &str) -> &mut (String, Dtype, Vec<usize>, Vec<u8>) {
        self.tensors
            .iter_mut()
            .find(|t| t.0 == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    /// Adds `delta` to the first value of an f32 tensor.
    pub fn perturb_first_value(&mut self, name: &str, delta: f32) {
        let bytes = &mut self.tensor_mut(name).3;
        let v = f32::from_le_bytes(bytes[..4].try_into().unwrap()) + delta;
        bytes[..4].copy_from_slice(&v.to_le_bytes());
    }
}
