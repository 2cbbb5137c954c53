//! The model bundle: one `.safetensors` file holding the nnU-Net network, the TIS head and, as
//! metadata, the plans, dataset.json, configuration, mirror axes and `tis_config` (contract,
//! "The model bundle"). Loading checks every tensor's presence, dtype and shape against what
//! the plans and the config imply, and names the first mismatch.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::config::TisConfig;
use super::plans::{ConfigurationPlan, DatasetInfo, configuration_plan, dataset_info};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The `format` tag of contract version 1.
pub const BUNDLE_FORMAT: &str = "tis-bundle/1";

/// A parsed safetensors file: its metadata and views of its tensors in the borrowed bytes.
pub struct TensorFile<'a> {
    origin: String,
    tensors: SafeTensors<'a>,
    metadata: BTreeMap<String, String>,
}

impl<'a> TensorFile<'a> {
    pub fn parse(bytes: &'a [u8], origin: &str) -> Result<Self> {
        let err = |message: String| Error::Bundle {
            origin: origin.to_string(),
            message,
        };
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| err(format!("not a readable safetensors file ({e})")))?;
        let metadata = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let tensors = SafeTensors::deserialize(bytes)
            .map_err(|e| err(format!("not a readable safetensors file ({e})")))?;
        Ok(TensorFile {
            origin: origin.to_string(),
            tensors,
            metadata,
        })
    }

    fn err(&self, message: String) -> Error {
        Error::Bundle {
            origin: self.origin.clone(),
            message,
        }
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// A metadata entry that must be there.
    pub fn required_metadata(&self, key: &str) -> Result<&str> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| self.err(format!("metadata `{key}` is missing")))
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tensors
            .names()
            .into_iter()
            .map(str::to_string)
            .collect();
        names.sort();
        names
    }

    /// The tensor `name`, or an error naming it.
    fn view(&self, name: &str) -> Result<TensorView<'a>> {
        self.tensors
            .tensor(name)
            .map_err(|_| self.err(format!("tensor `{name}` is missing")))
    }

    /// The tensor `name`, which must have `dtype`.
    fn view_with_dtype(&self, name: &str, dtype: Dtype) -> Result<TensorView<'a>> {
        let view = self.view(name)?;
        if view.dtype() != dtype {
            return Err(self.err(format!(
                "tensor `{name}` has dtype {:?}, expected {dtype:?}",
                view.dtype()
            )));
        }
        Ok(view)
    }

    pub fn dtype_and_shape(&self, name: &str) -> Result<(Dtype, Vec<usize>)> {
        let view = self.view(name)?;
        Ok((view.dtype(), view.shape().to_vec()))
    }

    /// A floating-point tensor (F32 or F16) as f32.
    pub fn f32(&self, name: &str) -> Result<Tensor> {
        let view = self.view(name)?;
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(self.err(format!(
                    "tensor `{name}` has dtype {other:?}, expected F32 or F16"
                )));
            }
        };
        Tensor::new(view.shape().to_vec(), data)
    }

    /// A floating-point tensor (F64 or F32) as f64, flattened, with its shape.
    pub fn f64(&self, name: &str) -> Result<(Vec<usize>, Vec<f64>)> {
        let view = self.view(name)?;
        let values = match view.dtype() {
            Dtype::F64 => view
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            _ => self.f32(name)?.data().iter().map(|&v| v as f64).collect(),
        };
        Ok((view.shape().to_vec(), values))
    }

    /// A U8 tensor, flattened, with its shape.
    pub fn u8(&self, name: &str) -> Result<(Vec<usize>, Vec<u8>)> {
        let view = self.view_with_dtype(name, Dtype::U8)?;
        Ok((view.shape().to_vec(), view.data().to_vec()))
    }

    /// An I64 tensor, flattened, with its shape.
    pub fn i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let view = self.view_with_dtype(name, Dtype::I64)?;
        let values = view
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        Ok((view.shape().to_vec(), values))
    }
}

/// A loaded, validated bundle: its metadata parsed and its tensors converted to f32.
pub struct Bundle {
    pub origin: String,
    pub metadata: BTreeMap<String, String>,
    pub plans: Value,
    pub configuration: ConfigurationPlan,
    pub dataset: DatasetInfo,
    /// None for a network-only bundle (automatic segmentation, no refinement).
    pub tis_config: Option<TisConfig>,
    /// Spatial axes nnU-Net mirrors at test time (0 = z, 1 = y, 2 = x).
    pub mirror_axes: Vec<usize>,
    /// How many tensors were stored in each dtype ("F32", "F16").
    pub stored_dtypes: BTreeMap<String, usize>,
    tensors: BTreeMap<String, Tensor>,
}

impl Bundle {
    /// Memory-maps and loads the bundle at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and dropped before this function returns; a bundle
        // modified on disk while it loads is read as whatever bytes it holds, which the
        // safetensors parser and the checks below validate like any other input.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&map, &path.display().to_string())
    }

    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let file = TensorFile::parse(bytes, origin)?;
        let err = |message: String| Error::Bundle {
            origin: origin.to_string(),
            message,
        };
        let format = file.required_metadata("format")?;
        if format != BUNDLE_FORMAT {
            return Err(err(format!(
                "metadata `format` is `{format}`, expected `{BUNDLE_FORMAT}`"
            )));
        }
        let json = |key: &str| -> Result<Value> {
            serde_json::from_str(file.required_metadata(key)?)
                .map_err(|e| err(format!("metadata `{key}` is not valid JSON ({e})")))
        };
        let plans = json("plans")?;
        let dataset = dataset_info(&json("dataset_json")?).map_err(|e| err(e.to_string()))?;
        let configuration =
            configuration_plan(&plans, file.required_metadata("configuration")?, &dataset)
                .map_err(|e| err(e.to_string()))?;
        let mirror_axes: Vec<usize> =
            serde_json::from_value(json("mirror_axes")?).map_err(|e| {
                err(format!(
                    "metadata `mirror_axes` must be a list of axes ({e})"
                ))
            })?;
        let unique: BTreeSet<_> = mirror_axes.iter().collect();
        if mirror_axes.iter().any(|&a| a > 2) || unique.len() != mirror_axes.len() {
            return Err(err(format!(
                "metadata `mirror_axes` {mirror_axes:?} must name distinct axes 0..2"
            )));
        }
        let tis_config = match file.metadata().get("tis_config") {
            Some(text) => Some(TisConfig::from_json(text).map_err(|e| err(e.to_string()))?),
            None => None,
        };

        let network = &configuration.network;
        let mut expected = network.expected_tensors();
        if let Some(config) = &tis_config {
            expected.extend(config.expected_tensors(network.feature_channels(), network.classes));
        }
        let mut tensors = BTreeMap::new();
        let mut stored_dtypes = BTreeMap::new();
        for (name, shape) in &expected {
            let (dtype, found) = file.dtype_and_shape(name).map_err(|_| {
                err(format!(
                    "tensor `{name}` is missing (expected shape {shape:?})"
                ))
            })?;
            if !matches!(dtype, Dtype::F32 | Dtype::F16) {
                return Err(err(format!(
                    "tensor `{name}` has dtype {dtype:?}, expected F32 or F16"
                )));
            }
            if &found != shape {
                return Err(err(format!(
                    "tensor `{name}` has shape {found:?}, expected {shape:?}"
                )));
            }
            *stored_dtypes.entry(format!("{dtype:?}")).or_insert(0) += 1;
            tensors.insert(name.clone(), file.f32(name)?);
        }
        if let Some(extra) = file.names().into_iter().find(|n| !tensors.contains_key(n)) {
            let hint = if extra.starts_with("tis.") && tis_config.is_none() {
                " (a head tensor, but metadata `tis_config` is missing)"
            } else {
                ""
            };
            return Err(err(format!("unexpected tensor `{extra}`{hint}")));
        }
        Ok(Bundle {
            origin: origin.to_string(),
            metadata: file.metadata().clone(),
            plans,
            configuration,
            dataset,
            tis_config,
            mirror_axes,
            stored_dtypes,
            tensors,
        })
    }

    /// Total number of stored parameters.
    pub fn parameter_count(&self) -> usize {
        self.tensors.values().map(Tensor::len).sum()
    }

    /// Parameters of the network and of the head, separately.
    pub fn parameter_counts(&self) -> (usize, usize) {
        let head: usize = self
            .tensors
            .iter()
            .filter(|(n, _)| n.starts_with("tis."))
            .map(|(_, t)| t.len())
            .sum();
        (self.parameter_count() - head, head)
    }

    /// Moves a validated tensor out of the bundle.
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.tensors.remove(name).ok_or_else(|| Error::Bundle {
            origin: self.origin.clone(),
            message: format!("tensor `{name}` is missing"),
        })
    }
}
