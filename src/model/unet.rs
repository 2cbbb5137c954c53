//! nnU-Net's PlainConvUNet (dynamic_network_architectures), one tile at a time, over a backend.
//!
//! Encoder stage s: convs (the first strided by strides[s]) each Conv3d → InstanceNorm →
//! LeakyReLU; its output is skip s. Decoder stage t (lowest resolution first): transposed conv of
//! the stage below, concatenated with the skip (upsampled first), convs. The seg layer (1×1×1)
//! maps the last decoder stage's output, the penultimate features, to the class logits.

use super::plans::{NetworkPlan, NetworkStep};
use crate::backend::{Backend, BackendTensor, Conv3d, ConvTranspose3d, InstanceNorm};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Conv3d → InstanceNorm → LeakyReLU (`ConvDropoutNormReLU` without dropout).
struct ConvBlock<T> {
    conv: Conv3d<T>,
    norm: InstanceNorm<T>,
}

/// What one tile gives: the class logits and the penultimate features, both at patch size.
pub struct TileOutput<T> {
    pub logits: T,
    pub features: T,
}

pub struct UNet<B: Backend> {
    plan: NetworkPlan,
    /// Per stage, its conv blocks (never empty).
    encoder: Vec<Vec<ConvBlock<B::Tensor>>>,
    upsampling: Vec<ConvTranspose3d<B::Tensor>>,
    decoder: Vec<Vec<ConvBlock<B::Tensor>>>,
    seg_layer: Conv3d<B::Tensor>,
}

/// Fetches host tensor `name` and moves it onto the backend.
fn upload<B: Backend>(
    backend: &B,
    fetch: &mut dyn FnMut(&str) -> Result<Tensor>,
    name: &str,
) -> Result<B::Tensor> {
    backend.upload(&fetch(name)?)
}

fn conv_block<B: Backend>(
    backend: &B,
    fetch: &mut dyn FnMut(&str) -> Result<Tensor>,
    plan: &NetworkPlan,
    prefix: &str,
    kernel: [usize; 3],
    stride: [usize; 3],
) -> Result<ConvBlock<B::Tensor>> {
    let bias = match plan.conv_bias {
        true => Some(upload(
            backend,
            &mut *fetch,
            &format!("{prefix}.conv.bias"),
        )?),
        false => None,
    };
    Ok(ConvBlock {
        conv: Conv3d {
            weight: backend.upload_conv_weight(&fetch(&format!("{prefix}.conv.weight"))?)?,
            bias,
            stride,
            padding: kernel.map(|k| (k - 1) / 2),
        },
        norm: InstanceNorm {
            weight: upload(backend, &mut *fetch, &format!("{prefix}.norm.weight"))?,
            bias: upload(backend, &mut *fetch, &format!("{prefix}.norm.bias"))?,
            eps: plan.norm_eps,
            negative_slope: plan.negative_slope,
        },
    })
}

impl<B: Backend> UNet<B> {
    /// Builds the network of `plan` from tensors named as in nnU-Net's state dict, fetched one
    /// by one (shapes already checked, as `Bundle` does) and moved onto the backend.
    pub fn from_tensors(
        backend: &B,
        plan: &NetworkPlan,
        fetch: &mut dyn FnMut(&str) -> Result<Tensor>,
    ) -> Result<Self> {
        let plan = plan.clone();
        let stages = plan.stages();
        let mut encoder = Vec::with_capacity(stages);
        for s in 0..stages {
            let convs = (0..plan.convs_per_stage[s])
                .map(|j| {
                    let stride = if j == 0 { plan.strides[s] } else { [1; 3] };
                    let prefix = format!("encoder.stages.{s}.0.convs.{j}");
                    conv_block(
                        backend,
                        &mut *fetch,
                        &plan,
                        &prefix,
                        plan.kernel_sizes[s],
                        stride,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            encoder.push(convs);
        }
        let mut upsampling = Vec::with_capacity(stages - 1);
        let mut decoder = Vec::with_capacity(stages - 1);
        for t in 0..stages - 1 {
            let bias = match plan.conv_bias {
                true => Some(upload(
                    backend,
                    &mut *fetch,
                    &format!("decoder.transpconvs.{t}.bias"),
                )?),
                false => None,
            };
            upsampling.push(ConvTranspose3d {
                weight: backend
                    .upload_conv_weight(&fetch(&format!("decoder.transpconvs.{t}.weight"))?)?,
                bias,
                stride: plan.strides[stages - 1 - t],
            });
            let kernel = plan.kernel_sizes[stages - 2 - t];
            let convs = (0..plan.convs_per_decoder_stage[t])
                .map(|j| {
                    conv_block(
                        backend,
                        &mut *fetch,
                        &plan,
                        &format!("decoder.stages.{t}.convs.{j}"),
                        kernel,
                        [1; 3],
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            decoder.push(convs);
        }
        let last = stages - 2;
        let seg_layer = Conv3d {
            weight: backend
                .upload_conv_weight(&fetch(&format!("decoder.seg_layers.{last}.weight"))?)?,
            bias: Some(upload(
                backend,
                &mut *fetch,
                &format!("decoder.seg_layers.{last}.bias"),
            )?),
            stride: [1; 3],
            padding: [0; 3],
        };
        Ok(UNet {
            plan,
            encoder,
            upsampling,
            decoder,
            seg_layer,
        })
    }

    pub fn plan(&self) -> &NetworkPlan {
        &self.plan
    }

    /// The conv blocks of a stage over `input`, or over `[input; skip]` (a decoder stage).
    fn stage(
        backend: &B,
        input: &B::Tensor,
        skip: Option<&B::Tensor>,
        blocks: &[ConvBlock<B::Tensor>],
    ) -> Result<B::Tensor> {
        let mut x: Option<B::Tensor> = None;
        for block in blocks {
            let (first, second) = match &x {
                Some(x) => (x, None),
                None => (input, skip),
            };
            x = Some(backend.conv_norm_leaky_relu(first, second, &block.conv, &block.norm)?);
        }
        Ok(x.expect("every stage has at least one conv"))
    }

    /// One forward pass over a tile (`in_channels × Z × Y × X`), no mirroring.
    pub fn forward(&self, backend: &B, tile: &B::Tensor) -> Result<TileOutput<B::Tensor>> {
        self.forward_observed(backend, tile, &mut |_| Ok(()))
    }

    /// `forward`, calling `step_done` with each [`NetworkStep`] as its work has been issued, in
    /// the order of [`NetworkPlan::step_macs`] (for per-step timings; it may synchronise the
    /// backend).
    pub fn forward_observed(
        &self,
        backend: &B,
        tile: &B::Tensor,
        step_done: &mut dyn FnMut(NetworkStep) -> Result<()>,
    ) -> Result<TileOutput<B::Tensor>> {
        if tile.shape().len() != 4 || tile.shape()[0] != self.plan.in_channels {
            return Err(Error::Shape(format!(
                "the network takes {} input channel(s) as C × Z × Y × X, got a tile of shape {:?}",
                self.plan.in_channels,
                tile.shape()
            )));
        }
        let mut skips = Vec::with_capacity(self.encoder.len() - 1);
        let mut x = Self::stage(backend, tile, None, &self.encoder[0])?;
        step_done(NetworkStep::Encoder(0))?;
        for (s, blocks) in self.encoder.iter().enumerate().skip(1) {
            let below = Self::stage(backend, &x, None, blocks)?;
            step_done(NetworkStep::Encoder(s))?;
            skips.push(std::mem::replace(&mut x, below));
        }
        for (j, (up, blocks)) in self.upsampling.iter().zip(&self.decoder).enumerate() {
            let skip = skips.pop().expect("one skip per decoder stage");
            let upsampled = backend.conv_transpose3d(&x, up)?;
            step_done(NetworkStep::Upsample(j))?;
            x = Self::stage(backend, &upsampled, Some(&skip), blocks)?;
            step_done(NetworkStep::Decoder(j))?;
        }
        let logits = backend.conv3d(&x, &self.seg_layer)?;
        step_done(NetworkStep::SegLayer)?;
        Ok(TileOutput {
            logits,
            features: x,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::random::Rng;
    use crate::{CpuBackend, Model};

    #[test]
    fn observed_forward_reports_the_planned_steps_in_order() {
        let model = Model::default_model(CpuBackend).unwrap();
        let configuration = &model.info.configuration;
        let (plan, patch) = (&configuration.network, configuration.patch_size);
        let tile = Rng::new(3).tensor(&[plan.in_channels, patch[0], patch[1], patch[2]], 1.0);
        let mut seen = Vec::new();
        let observed = model
            .network
            .forward_observed(&model.backend, &tile, &mut |step| {
                seen.push(step);
                Ok(())
            })
            .unwrap();
        let planned: Vec<_> = plan.step_macs(patch).into_iter().map(|(s, _)| s).collect();
        assert_eq!(seen, planned);
        let plain = model.network.forward(&model.backend, &tile).unwrap();
        assert_eq!(observed.logits.data(), plain.logits.data());
    }
}
