//! The model: a bundle loaded onto a backend, as the nnU-Net network and the TIS head.

pub mod bundle;
pub mod config;
pub mod plans;
pub mod tis_head;
pub mod unet;

use std::collections::BTreeMap;
use std::path::Path;

use crate::backend::Backend;
use crate::error::Result;
pub use bundle::Bundle;
pub use config::TisConfig;
use plans::{ConfigurationPlan, DatasetInfo};
use tis_head::TisHead;
use unet::UNet;

/// The embedded default bundle (see models/README.md for what it is).
pub const DEFAULT_BUNDLE: &[u8] = include_bytes!("../../models/default.safetensors");

/// What a bundle says about itself, kept after its tensors moved onto the backend.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// Path of the bundle, or "embedded default".
    pub origin: String,
    pub configuration: ConfigurationPlan,
    pub dataset: DatasetInfo,
    pub plans: serde_json::Value,
    pub tis_config: Option<TisConfig>,
    pub mirror_axes: Vec<usize>,
    pub stored_dtypes: BTreeMap<String, usize>,
    pub network_parameters: usize,
    pub head_parameters: usize,
    /// Every metadata entry of the bundle.
    pub metadata: BTreeMap<String, String>,
}

impl ModelInfo {
    pub fn classes(&self) -> usize {
        self.dataset.class_names.len()
    }
}

/// A loaded model on backend `B`.
pub struct Model<B: Backend> {
    pub backend: B,
    pub info: ModelInfo,
    pub network: UNet<B>,
    /// None for a network-only bundle.
    pub head: Option<TisHead<B>>,
}

impl<B: Backend> Model<B> {
    pub fn load(path: &Path, backend: B) -> Result<Self> {
        Self::from_bundle(Bundle::open(path)?, backend)
    }

    /// The embedded default model.
    pub fn default_model(backend: B) -> Result<Self> {
        Self::from_bundle(
            Bundle::from_bytes(DEFAULT_BUNDLE, "embedded default")?,
            backend,
        )
    }

    pub fn from_bundle(mut bundle: Bundle, backend: B) -> Result<Self> {
        let (network_parameters, head_parameters) = bundle.parameter_counts();
        let info = ModelInfo {
            origin: bundle.origin.clone(),
            configuration: bundle.configuration.clone(),
            dataset: bundle.dataset.clone(),
            plans: bundle.plans.clone(),
            tis_config: bundle.tis_config.clone(),
            mirror_axes: bundle.mirror_axes.clone(),
            stored_dtypes: bundle.stored_dtypes.clone(),
            network_parameters,
            head_parameters,
            metadata: bundle.metadata.clone(),
        };
        let network = UNet::from_tensors(&backend, &info.configuration.network, &mut |name| {
            bundle.take(name)
        })?;
        let head = match &info.tis_config {
            Some(config) => Some(TisHead::from_tensors(
                &backend,
                config,
                info.configuration.network.feature_channels(),
                info.classes(),
                &mut |name| bundle.take(name),
            )?),
            None => None,
        };
        Ok(Model {
            backend,
            info,
            network,
            head,
        })
    }
}
