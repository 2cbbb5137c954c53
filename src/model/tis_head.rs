//! The TIS refinement head (contract, "Forward pass of the refinement head"), over a backend.
//!
//! Tokens are the voxels of the ROI: projected features plus a trilinear positional encoding.
//! Each layer first enriches the click embeddings (cross-attention over the voxels,
//! self-attention among the clicks, FFN), then lets every voxel compare itself with the clicks
//! and copy their label embeddings, mixed by α with its automatic segmentation's embedding.

use std::collections::BTreeMap;

use crate::backend::{
    Backend, ClickUpdate, FeedForward, LabelAssignment, LayerNorm, Linear, Mlp, MultiheadAttention,
};
use crate::error::{Error, Result};
use crate::geometry::{Click, Region};
use crate::model::config::TisConfig;
use crate::tensor::Tensor;

/// The parts of a forward pass, in the order they run (the layer stages once per layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Input projection, positional encoding, click and label embeddings.
    Tokens,
    /// Cross-attention over the voxels, self-attention and FFN of the clicks, and their keys for
    /// the label assignment.
    ClickEncoding,
    /// Every voxel's comparison with the clicks and copy of their labels.
    LabelAssignment,
    /// The voxels' feed-forward sub-layer.
    FeedForward,
    /// Output norm and projection to class logits.
    Output,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Tokens,
        Stage::ClickEncoding,
        Stage::LabelAssignment,
        Stage::FeedForward,
        Stage::Output,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Tokens => "tokens",
            Stage::ClickEncoding => "click encoding",
            Stage::LabelAssignment => "label assignment",
            Stage::FeedForward => "feed-forward",
            Stage::Output => "output",
        }
    }
}

struct HeadLayer<T> {
    cross_norm_q: LayerNorm<T>,
    cross_norm_kv: LayerNorm<T>,
    cross: MultiheadAttention<T>,
    self_norm: LayerNorm<T>,
    self_attention: MultiheadAttention<T>,
    click_ffn: FeedForward<T>,
    assign_norm_q: LayerNorm<T>,
    assign_norm_k: LayerNorm<T>,
    assign_q: Linear<T>,
    assign_k: Linear<T>,
    assign_out: Linear<T>,
    /// sigmoid(assign_alpha)
    alpha: f32,
    assign_ffn: FeedForward<T>,
}

pub struct TisHead<B: Backend> {
    config: TisConfig,
    classes: usize,
    input_proj: Linear<B::Tensor>,
    pos_grid: B::Tensor,
    label_mlp: Mlp<B::Tensor>,
    layers: Vec<HeadLayer<B::Tensor>>,
    out_norm: LayerNorm<B::Tensor>,
    out_proj: Linear<B::Tensor>,
}

/// Fetches named host tensors, checks their shapes against the config, uploads them.
struct Loader<'a, B: Backend> {
    backend: &'a B,
    shapes: BTreeMap<String, Vec<usize>>,
    fetch: &'a mut dyn FnMut(&str) -> Result<Tensor>,
}

impl<B: Backend> Loader<'_, B> {
    fn host(&mut self, name: &str) -> Result<Tensor> {
        let tensor = (self.fetch)(name)?;
        let expected = &self.shapes[name];
        if tensor.shape() != expected.as_slice() {
            return Err(Error::Shape(format!(
                "tensor `{name}` has shape {:?}, expected {expected:?}",
                tensor.shape()
            )));
        }
        Ok(tensor)
    }

    fn tensor(&mut self, name: &str) -> Result<B::Tensor> {
        let host = self.host(name)?;
        self.backend.upload(&host)
    }

    fn linear(&mut self, prefix: &str) -> Result<Linear<B::Tensor>> {
        Ok(Linear {
            weight: self.tensor(&format!("{prefix}.weight"))?,
            bias: self.tensor(&format!("{prefix}.bias"))?,
        })
    }

    fn norm(&mut self, prefix: &str) -> Result<LayerNorm<B::Tensor>> {
        Ok(LayerNorm {
            weight: self.tensor(&format!("{prefix}.weight"))?,
            bias: self.tensor(&format!("{prefix}.bias"))?,
        })
    }

    /// `Sequential(Linear, GELU, Linear)` stored as `.0` and `.2`.
    fn mlp(&mut self, prefix: &str) -> Result<Mlp<B::Tensor>> {
        Ok(Mlp {
            up: self.linear(&format!("{prefix}.0"))?,
            down: self.linear(&format!("{prefix}.2"))?,
        })
    }

    fn attention(&mut self, prefix: &str, d: usize) -> Result<MultiheadAttention<B::Tensor>> {
        let weight = self.host(&format!("{prefix}.in_proj_weight"))?;
        let bias = self.host(&format!("{prefix}.in_proj_bias"))?;
        let part = |i: usize| -> Result<Linear<B::Tensor>> {
            Ok(Linear {
                weight: self
                    .backend
                    .upload(&weight.slice_rows(i * d, (i + 1) * d)?)?,
                bias: self.backend.upload(&bias.slice_rows(i * d, (i + 1) * d)?)?,
            })
        };
        Ok(MultiheadAttention {
            q: part(0)?,
            k: part(1)?,
            v: part(2)?,
            out: self.linear(&format!("{prefix}.out_proj"))?,
        })
    }

    fn layer(&mut self, l: usize, d: usize) -> Result<HeadLayer<B::Tensor>> {
        let p = |name: &str| format!("tis.layers.{l}.{name}");
        let alpha = self.host(&p("assign_alpha"))?.data()[0];
        Ok(HeadLayer {
            cross_norm_q: self.norm(&p("click_cross_norm_q"))?,
            cross_norm_kv: self.norm(&p("click_cross_norm_kv"))?,
            cross: self.attention(&p("click_cross"), d)?,
            self_norm: self.norm(&p("click_self_norm"))?,
            self_attention: self.attention(&p("click_self"), d)?,
            click_ffn: FeedForward {
                norm: self.norm(&p("click_ffn_norm"))?,
                mlp: self.mlp(&p("click_ffn"))?,
            },
            assign_norm_q: self.norm(&p("assign_norm_q"))?,
            assign_norm_k: self.norm(&p("assign_norm_k"))?,
            assign_q: self.linear(&p("assign_q"))?,
            assign_k: self.linear(&p("assign_k"))?,
            assign_out: self.linear(&p("assign_out"))?,
            alpha: 1.0 / (1.0 + (-alpha).exp()),
            assign_ffn: FeedForward {
                norm: self.norm(&p("assign_ffn_norm"))?,
                mlp: self.mlp(&p("assign_ffn"))?,
            },
        })
    }
}

impl<B: Backend> TisHead<B> {
    /// Builds the head from tensors named as in the contract (`tis.` prefix), fetched one by one.
    pub fn from_tensors(
        backend: &B,
        config: &TisConfig,
        feature_channels: usize,
        classes: usize,
        fetch: &mut dyn FnMut(&str) -> Result<Tensor>,
    ) -> Result<Self> {
        config.validate()?;
        let mut loader = Loader {
            backend,
            shapes: config
                .expected_tensors(feature_channels, classes)
                .into_iter()
                .collect(),
            fetch,
        };
        let d = config.d_model;
        Ok(TisHead {
            config: config.clone(),
            classes,
            input_proj: loader.linear("tis.input_proj")?,
            pos_grid: loader.tensor("tis.pos_grid")?,
            label_mlp: loader.mlp("tis.label_mlp")?,
            layers: (0..config.n_layers)
                .map(|l| loader.layer(l, d))
                .collect::<Result<_>>()?,
            out_norm: loader.norm("tis.out_norm")?,
            out_proj: loader.linear("tis.out_proj")?,
        })
    }

    pub fn config(&self) -> &TisConfig {
        &self.config
    }

    /// K, the number of classes (background included).
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Refined logits (N × K, tokens of `roi` in C order) from the whole-grid features
    /// (C_f × grid) and automatic probabilities (K × grid), for clicks that all lie in `roi`.
    pub fn forward(
        &self,
        backend: &B,
        features: &B::Tensor,
        probs: &B::Tensor,
        roi: &Region,
        clicks: &[Click],
    ) -> Result<B::Tensor> {
        self.forward_observed(backend, features, probs, roi, clicks, &mut |_| Ok(()))
    }

    /// `forward`, calling `stage_done` with each [`Stage`] as its work has been issued (for
    /// per-stage timings; it may synchronise the backend).
    pub fn forward_observed(
        &self,
        backend: &B,
        features: &B::Tensor,
        probs: &B::Tensor,
        roi: &Region,
        clicks: &[Click],
        stage_done: &mut dyn FnMut(Stage) -> Result<()>,
    ) -> Result<B::Tensor> {
        if clicks.is_empty() {
            return Err(Error::Click(
                "the refinement head needs at least one click".into(),
            ));
        }
        let [_, ry, rx] = roi.size;
        let mut rows = Vec::with_capacity(clicks.len());
        let mut onehot = vec![0f32; clicks.len() * self.classes];
        for (i, click) in clicks.iter().enumerate() {
            if !roi.contains(click.position()) || click.class >= self.classes {
                return Err(Error::Click(format!(
                    "{click:?} is not a click of class < {} inside {roi:?}",
                    self.classes
                )));
            }
            let [z, y, x] = [0, 1, 2].map(|a| click.position()[a] - roi.start[a]);
            rows.push((z * ry + y) * rx + x);
            onehot[i * self.classes + click.class] = 1.0;
        }
        let heads = self.config.n_heads;

        let mut x = backend.input_tokens(features, roi, &self.input_proj, &self.pos_grid)?;
        let mut clicks_e = backend.gather_rows(&x, &rows)?;
        let onehot = backend.upload(&Tensor::new(vec![clicks.len(), self.classes], onehot)?)?;
        let click_values = backend.mlp(&onehot, &self.label_mlp)?;
        // Va = label_mlp(P[R]ᵀ), the automatic segmentation's label embedding: the same in
        // every layer (contract), so computed once here.
        let auto_embedding = backend.mlp(&backend.region_tokens(probs, roi)?, &self.label_mlp)?;
        stage_done(Stage::Tokens)?;

        for layer in &self.layers {
            // Click encoding: cross-attention over the voxels, self-attention, FFN, the keys.
            let cross = &layer.cross;
            let q = backend.linear(
                &backend.layer_norm(&clicks_e, &layer.cross_norm_q)?,
                &cross.q,
            )?;
            let attended = backend.click_cross_attention(
                &x,
                &q,
                &layer.cross_norm_kv,
                &cross.k,
                &cross.v,
                heads,
            )?;
            let click_keys = backend.click_update(
                &mut clicks_e,
                &attended,
                &ClickUpdate {
                    cross_out: &cross.out,
                    self_norm: &layer.self_norm,
                    self_attention: &layer.self_attention,
                    ffn: &layer.click_ffn,
                    key_norm: &layer.assign_norm_k,
                    key: &layer.assign_k,
                    heads,
                },
            )?;
            stage_done(Stage::ClickEncoding)?;

            // Label assignment: every voxel copies the labels of the clicks it resembles.
            backend.label_assignment(
                &mut x,
                &click_keys,
                &click_values,
                &auto_embedding,
                &LabelAssignment {
                    norm_q: &layer.assign_norm_q,
                    q: &layer.assign_q,
                    out: &layer.assign_out,
                    alpha: layer.alpha,
                    heads,
                },
            )?;
            stage_done(Stage::LabelAssignment)?;
            backend.feed_forward(&mut x, &layer.assign_ffn)?;
            stage_done(Stage::FeedForward)?;
        }
        let logits = backend.layer_norm_linear(&x, &self.out_norm, &self.out_proj)?;
        stage_done(Stage::Output)?;
        Ok(logits)
    }
}
