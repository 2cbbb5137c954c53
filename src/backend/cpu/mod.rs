//! The CPU backend: f32 throughout, multi-threaded with rayon. Hand-written AVX2/AVX-512 kernels,
//! chosen at run time (isa.rs), carry the arithmetic: a direct kernel for stride-1 convolutions
//! (conv_direct.rs) and a packed-weight register-tile kernel for the head's dense layers and
//! attention (packed_linear.rs); exp and GELU run as vector code (vector_math.rs); the other
//! GEMMs (stride-2 and transposed convolutions) are on `matrixmultiply`, which is also the
//! portable path where the CPU lacks AVX2.
//! It is the oracle every other backend is tested against and the fallback on machines without
//! a GPU. One file per op family; this file only routes the trait to them.

mod attention;
mod conv;
#[cfg(target_arch = "x86_64")]
mod conv_direct;
mod gemm;
#[cfg(target_arch = "x86_64")]
mod isa;
mod linear;
mod norm;
mod packed_linear;
mod vector_math;
mod volume;

use rayon::prelude::*;

use crate::backend::{
    Backend, BackendTensor, Conv3d, ConvTranspose3d, FeedForward, InstanceNorm, LabelAssignment,
    LayerNorm, Linear, Mlp,
};
use crate::error::Result;
use crate::geometry::{Label, Region};
use crate::tensor::Tensor;

/// The CPU backend. Threads come from rayon's global pool (`RAYON_NUM_THREADS` sets the count).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    /// x's values rounded to f16 and back (vectorised, in parallel blocks).
    pub fn round_to_f16(&self, x: &Tensor) -> Tensor {
        let mut out = vec![0f32; x.data().len()];
        out.par_chunks_mut(volume::VOXEL_BLOCK)
            .zip(x.data().par_chunks(volume::VOXEL_BLOCK))
            .for_each(|(dst, src)| volume::round_to_f16(src, dst));
        Tensor::new(x.shape().to_vec(), out).expect("the same shape")
    }
}

impl BackendTensor for Tensor {
    fn shape(&self) -> &[usize] {
        Tensor::shape(self)
    }
}

impl Backend for CpuBackend {
    type Tensor = Tensor;
    type Accumulator = Tensor;

    fn name(&self) -> &'static str {
        "cpu"
    }

    /// `MemAvailable` of /proc/meminfo (Linux).
    fn available_memory(&self) -> Option<u64> {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    fn bytes_per_value(&self) -> u64 {
        4
    }

    fn upload(&self, host: &Tensor) -> Result<Tensor> {
        Ok(host.clone())
    }

    fn download(&self, tensor: &Tensor) -> Result<Tensor> {
        Ok(tensor.clone())
    }

    fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::zeros(shape))
    }

    fn conv3d(&self, x: &Tensor, conv: &Conv3d<Tensor>) -> Result<Tensor> {
        conv::conv3d(x, conv)
    }

    fn conv3d_on_concat(&self, a: &Tensor, b: &Tensor, conv: &Conv3d<Tensor>) -> Result<Tensor> {
        conv::conv3d_on_concat(a, b, conv)
    }

    fn conv_transpose3d(&self, x: &Tensor, conv: &ConvTranspose3d<Tensor>) -> Result<Tensor> {
        conv::conv_transpose3d(x, conv)
    }

    fn instance_norm_leaky_relu(&self, x: &mut Tensor, norm: &InstanceNorm<Tensor>) -> Result<()> {
        norm::instance_norm_leaky_relu(x, norm)
    }

    fn concat_channels(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        volume::concat_channels(a, b)
    }

    fn crop(&self, x: &Tensor, region: &Region) -> Result<Tensor> {
        volume::crop(x, region)
    }

    fn flip(&self, x: &Tensor, axes: &[usize]) -> Result<Tensor> {
        volume::flip(x, axes)
    }

    fn add_assign(&self, acc: &mut Tensor, x: &Tensor) -> Result<()> {
        volume::add_assign(acc, x)
    }

    fn scale(&self, x: &mut Tensor, factor: f32) -> Result<()> {
        volume::scale(x, factor);
        Ok(())
    }

    fn accumulator(&self, shape: &[usize]) -> Result<Tensor> {
        self.zeros(shape)
    }

    fn accumulate_weighted(
        &self,
        acc: &mut Tensor,
        tile: &Tensor,
        weights: &Tensor,
        region: &Region,
    ) -> Result<()> {
        volume::accumulate_weighted(acc, tile, weights, region)
    }

    fn divide_by_weights(&self, mut acc: Tensor, weight_sum: &Tensor) -> Result<Tensor> {
        volume::divide_by_weights(&mut acc, weight_sum)?;
        Ok(acc)
    }

    fn softmax_channels(&self, x: &Tensor) -> Result<Tensor> {
        volume::softmax_channels(x)
    }

    fn argmax_channels(&self, x: &Tensor) -> Result<Vec<Label>> {
        volume::argmax_channels(x)
    }

    /// Rounds a block at a time inside the argmax, without a rounded copy.
    fn argmax_channels_f16(&self, x: &Tensor) -> Result<Vec<Label>> {
        volume::argmax_channels_with(x, volume::round_to_f16)
    }

    fn region_tokens(&self, volume: &Tensor, region: &Region) -> Result<Tensor> {
        volume::region_tokens(volume, region)
    }

    fn add_positional_encoding(
        &self,
        x: &mut Tensor,
        grid: &Tensor,
        shape: [usize; 3],
    ) -> Result<()> {
        volume::add_positional_encoding(x, grid, shape)
    }

    fn gather_rows(&self, x: &Tensor, rows: &[usize]) -> Result<Tensor> {
        volume::gather_rows(x, rows)
    }

    fn linear(&self, x: &Tensor, linear: &Linear<Tensor>) -> Result<Tensor> {
        linear::linear(x, linear)
    }

    fn layer_norm(&self, x: &Tensor, norm: &LayerNorm<Tensor>) -> Result<Tensor> {
        norm::layer_norm(x, norm)
    }

    fn mlp(&self, x: &Tensor, mlp: &Mlp<Tensor>) -> Result<Tensor> {
        linear::mlp(x, mlp)
    }

    fn feed_forward(&self, x: &mut Tensor, ffn: &FeedForward<Tensor>) -> Result<()> {
        linear::feed_forward(x, ffn)
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
        attention::attention(q, k, v, heads)
    }

    fn click_cross_attention(
        &self,
        x: &Tensor,
        q: &Tensor,
        norm: &LayerNorm<Tensor>,
        key: &Linear<Tensor>,
        value: &Linear<Tensor>,
        heads: usize,
    ) -> Result<Tensor> {
        attention::click_cross_attention(x, q, norm, key, value, heads)
    }

    fn label_assignment(
        &self,
        x: &mut Tensor,
        click_keys: &Tensor,
        click_values: &Tensor,
        auto_embedding: &Tensor,
        params: &LabelAssignment<'_, Tensor>,
    ) -> Result<()> {
        attention::label_assignment(x, click_keys, click_values, auto_embedding, params)
    }

    fn argmax_rows(&self, x: &Tensor) -> Result<Vec<Label>> {
        volume::argmax_rows(x)
    }
}
