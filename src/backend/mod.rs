//! The ops the two graphs need (the nnU-Net network and the TIS head), behind one trait.
//!
//! The model code in `crate::model` is written once over [`Backend`]; a backend only knows ops.
//! Volumes are logically channels first (C × Z × Y × X, one sample); token matrices are
//! N × width, one row per voxel in C order. A backend may store them as it likes, as long as
//! [`Backend::download`] returns that logical layout. The CPU backend is the oracle every other
//! backend is tested against.

pub mod cpu;
pub mod cuda;
pub mod shapes;

use crate::error::Result;
use crate::geometry::{Label, Region};
use crate::tensor::Tensor;

/// The GPU time of one kernel over some work (`Backend::kernel_times`).
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// The kernel's name (`feed_forward_mma_f16_128`).
    pub name: String,
    /// How many times the work launched it.
    pub launches: usize,
    /// Its launches' GPU time in all, in milliseconds.
    pub ms: f64,
}

/// What every backend tensor can tell without a device round trip.
pub trait BackendTensor: Send + Sync {
    fn shape(&self) -> &[usize];
}

/// `y = x·Wᵀ + b`, W stored `[out, in]` as PyTorch does.
pub struct Linear<T> {
    pub weight: T,
    pub bias: T,
}

/// LayerNorm over the last axis, eps 1e-5, biased variance.
pub struct LayerNorm<T> {
    pub weight: T,
    pub bias: T,
}

/// `Linear → GELU (erf) → Linear`.
pub struct Mlp<T> {
    pub up: Linear<T>,
    pub down: Linear<T>,
}

/// A pre-norm feed-forward sub-layer: `x ← x + Mlp(LN(x))`.
pub struct FeedForward<T> {
    pub norm: LayerNorm<T>,
    pub mlp: Mlp<T>,
}

/// The q, k and v projections of a `torch.nn.MultiheadAttention` (its `in_proj` split by rows)
/// and its output projection.
pub struct MultiheadAttention<T> {
    pub q: Linear<T>,
    pub k: Linear<T>,
    pub v: Linear<T>,
    pub out: Linear<T>,
}

/// The click side of a TIS head layer after its cross-attention over the voxels (contract,
/// "click encoding"), and the click keys of the label assignment that follows.
pub struct ClickUpdate<'a, T> {
    /// The cross-attention's output projection.
    pub cross_out: &'a Linear<T>,
    pub self_norm: &'a LayerNorm<T>,
    pub self_attention: &'a MultiheadAttention<T>,
    pub ffn: &'a FeedForward<T>,
    /// The label assignment's key norm and projection.
    pub key_norm: &'a LayerNorm<T>,
    pub key: &'a Linear<T>,
    pub heads: usize,
}

/// A 3D convolution of PyTorch layout `[out, in, kz, ky, kx]` with optional bias.
pub struct Conv3d<T> {
    pub weight: T,
    pub bias: Option<T>,
    pub stride: [usize; 3],
    pub padding: [usize; 3],
}

/// A transposed 3D convolution whose kernel equals its stride (nnU-Net's upsampling), PyTorch
/// layout `[in, out, kz, ky, kx]`.
pub struct ConvTranspose3d<T> {
    pub weight: T,
    pub bias: Option<T>,
    pub stride: [usize; 3],
}

/// InstanceNorm (affine) followed by LeakyReLU.
pub struct InstanceNorm<T> {
    pub weight: T,
    pub bias: T,
    pub eps: f32,
    pub negative_slope: f32,
}

/// The per-voxel half of a label-assignment sub-layer of the TIS head (contract, "label
/// assignment"): queries from the voxels, keys from the clicks, values from the clicks' label
/// embeddings, mixed by α with the automatic segmentation's embedding.
pub struct LabelAssignment<'a, T> {
    pub norm_q: &'a LayerNorm<T>,
    pub q: &'a Linear<T>,
    pub out: &'a Linear<T>,
    /// `sigmoid(assign_alpha)`.
    pub alpha: f32,
    pub heads: usize,
}

/// [`Backend::conv_norm_leaky_relu`] as its parts: the convolution (of `[x; second]` if given),
/// then InstanceNorm + LeakyReLU in place. The default of every backend, and the CUDA backend's
/// where its convolution has no epilogue to gather the statistics in.
pub fn conv_then_norm<B: Backend + ?Sized>(
    backend: &B,
    x: &B::Tensor,
    second: Option<&B::Tensor>,
    conv: &Conv3d<B::Tensor>,
    norm: &InstanceNorm<B::Tensor>,
) -> Result<B::Tensor> {
    let mut y = match second {
        Some(second) => backend.conv3d_on_concat(x, second, conv)?,
        None => backend.conv3d(x, conv)?,
    };
    backend.instance_norm_leaky_relu(&mut y, norm)?;
    Ok(y)
}

/// [`Backend::input_tokens`] as its three ops: the default of every backend, and the CUDA
/// backend's where its one-pass kernel does not apply.
pub fn input_tokens_in_parts<B: Backend + ?Sized>(
    backend: &B,
    features: &B::Tensor,
    roi: &Region,
    projection: &Linear<B::Tensor>,
    pos_grid: &B::Tensor,
) -> Result<B::Tensor> {
    shapes::input_tokens(features, roi, projection, pos_grid)?;
    let mut x = backend.linear(&backend.region_tokens(features, roi)?, projection)?;
    backend.add_positional_encoding(&mut x, pos_grid, roi.size)?;
    Ok(x)
}

/// [`Backend::click_update`] as its parts, an op each: the default of every backend, and the
/// CUDA backend's where its one-block kernel does not apply.
pub fn click_update_in_parts<B: Backend + ?Sized>(
    backend: &B,
    clicks: &mut B::Tensor,
    attended: &B::Tensor,
    update: &ClickUpdate<'_, B::Tensor>,
) -> Result<B::Tensor> {
    shapes::click_update(clicks, attended, update)?;
    backend.add_assign(clicks, &backend.linear(attended, update.cross_out)?)?;
    let own = update.self_attention;
    let normed = backend.layer_norm(clicks, update.self_norm)?;
    let attended = backend.attention(
        &backend.linear(&normed, &own.q)?,
        &backend.linear(&normed, &own.k)?,
        &backend.linear(&normed, &own.v)?,
        update.heads,
    )?;
    backend.add_assign(clicks, &backend.linear(&attended, &own.out)?)?;
    backend.feed_forward(clicks, update.ffn)?;
    backend.linear(&backend.layer_norm(clicks, update.key_norm)?, update.key)
}

pub trait Backend: Send + Sync {
    type Tensor: BackendTensor;
    /// A sliding-window sum (C × Z × Y × X), f32 whatever the storage type. nnU-Net keeps these
    /// sums in f16, where the Gaussian's corner weights are subnormal and quantise the sums at
    /// the grid's borders (nnunet-inference.md §3.3); an f16 backend here does not.
    type Accumulator: BackendTensor;

    /// A short name for messages ("cpu", "cuda").
    fn name(&self) -> &'static str;

    /// Waits until every op issued so far has finished (for timing; ops are otherwise ordered).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Runs `work` with each kernel launch timed on the device (an event before and after it),
    /// and returns the time per kernel, the longest first: where the work's device time goes
    /// (`tis bench`). None where the backend launches no kernels (the CPU), having run `work`.
    fn kernel_times(
        &self,
        work: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<Vec<KernelTime>>> {
        work()?;
        Ok(None)
    }

    /// Bytes this backend can still allocate, when it can tell.
    fn available_memory(&self) -> Option<u64>;

    /// Bytes one stored value takes.
    fn bytes_per_value(&self) -> u64;

    fn upload(&self, host: &Tensor) -> Result<Self::Tensor>;
    /// A convolution's or transposed convolution's weights (PyTorch's [a, b, k…]) for the
    /// network, as this backend's kernels read them best; the ops take plain uploads too. The
    /// default uploads them as they are.
    fn upload_conv_weight(&self, host: &Tensor) -> Result<Self::Tensor> {
        self.upload(host)
    }
    fn download(&self, tensor: &Self::Tensor) -> Result<Tensor>;
    fn zeros(&self, shape: &[usize]) -> Result<Self::Tensor>;

    // ---- nnU-Net network: volumes C × Z × Y × X -------------------------------------------

    fn conv3d(&self, x: &Self::Tensor, conv: &Conv3d<Self::Tensor>) -> Result<Self::Tensor>;
    fn conv_transpose3d(
        &self,
        x: &Self::Tensor,
        conv: &ConvTranspose3d<Self::Tensor>,
    ) -> Result<Self::Tensor>;
    /// In place: per channel, normalise over the volume, scale, shift, LeakyReLU.
    fn instance_norm_leaky_relu(
        &self,
        x: &mut Self::Tensor,
        norm: &InstanceNorm<Self::Tensor>,
    ) -> Result<()>;
    /// `[a; b]` along the channel axis.
    fn concat_channels(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// `conv3d` of `[a; b]`: the decoder's first convolution after a skip connection. A backend
    /// may read both inputs in place instead of concatenating them first.
    fn conv3d_on_concat(
        &self,
        a: &Self::Tensor,
        b: &Self::Tensor,
        conv: &Conv3d<Self::Tensor>,
    ) -> Result<Self::Tensor> {
        self.conv3d(&self.concat_channels(a, b)?, conv)
    }
    /// One conv block of the network: `conv3d` of `x` (or of `[x; second]`, the decoder's first
    /// block after a skip connection), then `instance_norm_leaky_relu`. A backend may gather the
    /// normalisation's statistics while the convolution writes its output.
    fn conv_norm_leaky_relu(
        &self,
        x: &Self::Tensor,
        second: Option<&Self::Tensor>,
        conv: &Conv3d<Self::Tensor>,
        norm: &InstanceNorm<Self::Tensor>,
    ) -> Result<Self::Tensor> {
        conv_then_norm(self, x, second, conv, norm)
    }

    // ---- sliding window over volumes ------------------------------------------------------

    /// The voxels of `region`, all channels.
    fn crop(&self, x: &Self::Tensor, region: &Region) -> Result<Self::Tensor>;
    /// Reverses the given spatial axes (0 = z, 1 = y, 2 = x).
    fn flip(&self, x: &Self::Tensor, axes: &[usize]) -> Result<Self::Tensor>;
    /// `acc += x`.
    fn add_assign(&self, acc: &mut Self::Tensor, x: &Self::Tensor) -> Result<()>;
    /// `x *= factor`.
    fn scale(&self, x: &mut Self::Tensor, factor: f32) -> Result<()>;
    /// A zeroed sliding-window sum of `shape` (C × Z × Y × X).
    fn accumulator(&self, shape: &[usize]) -> Result<Self::Accumulator>;
    /// `acc[:, region] += tile · weights` with `weights` one channel of the tile's size and
    /// `region` the tile's place in `acc`.
    fn accumulate_weighted(
        &self,
        acc: &mut Self::Accumulator,
        tile: &Self::Tensor,
        weights: &Self::Tensor,
        region: &Region,
    ) -> Result<()>;
    /// The weighted mean `acc[c, v] / weight_sum[0, v]` for every channel, as a stored tensor.
    fn divide_by_weights(
        &self,
        acc: Self::Accumulator,
        weight_sum: &Self::Accumulator,
    ) -> Result<Self::Tensor>;
    /// Softmax over the channel axis of a volume.
    fn softmax_channels(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// Index of the largest channel per voxel, ties to the lower index.
    fn argmax_channels(&self, x: &Self::Tensor) -> Result<Vec<Label>>;
    /// `argmax_channels` of x's values rounded to f16: nnU-Net's export takes the argmax of f16
    /// logits, so values that round to the same f16 tie, and the lower channel wins.
    fn argmax_channels_f16(&self, x: &Self::Tensor) -> Result<Vec<Label>>;

    // ---- TIS head: tokens N × width ------------------------------------------------------

    /// The voxels of `region` of a channels-first volume as tokens (N × C, C order).
    fn region_tokens(&self, volume: &Self::Tensor, region: &Region) -> Result<Self::Tensor>;
    /// `x + PE`, PE = trilinear resize (align_corners) of `grid` (d × gz × gy × gx) to `shape`,
    /// laid out as tokens of that shape.
    fn add_positional_encoding(
        &self,
        x: &mut Self::Tensor,
        grid: &Self::Tensor,
        shape: [usize; 3],
    ) -> Result<()>;
    /// The head's input tokens: `linear(region_tokens(features, roi), projection)` plus the
    /// positional encoding of the ROI's shape (`add_positional_encoding`). A backend may do it
    /// in one pass, never writing the region's raw tokens.
    fn input_tokens(
        &self,
        features: &Self::Tensor,
        roi: &Region,
        projection: &Linear<Self::Tensor>,
        pos_grid: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        input_tokens_in_parts(self, features, roi, projection, pos_grid)
    }
    /// The given rows, in the given order.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor>;
    fn linear(&self, x: &Self::Tensor, linear: &Linear<Self::Tensor>) -> Result<Self::Tensor>;
    fn layer_norm(&self, x: &Self::Tensor, norm: &LayerNorm<Self::Tensor>) -> Result<Self::Tensor>;
    /// `linear(layer_norm(x))`, the head's output projection. A backend may fuse the two where
    /// the projection is narrow, never writing LN(x).
    fn layer_norm_linear(
        &self,
        x: &Self::Tensor,
        norm: &LayerNorm<Self::Tensor>,
        linear: &Linear<Self::Tensor>,
    ) -> Result<Self::Tensor> {
        self.linear(&self.layer_norm(x, norm)?, linear)
    }
    /// `Mlp(x)` without residual.
    fn mlp(&self, x: &Self::Tensor, mlp: &Mlp<Self::Tensor>) -> Result<Self::Tensor>;
    /// In place: `x ← x + Mlp(LN(x))`.
    fn feed_forward(&self, x: &mut Self::Tensor, ffn: &FeedForward<Self::Tensor>) -> Result<()>;
    /// Multi-head scaled dot-product attention of already projected q, k, v (few rows), heads
    /// concatenated, before the output projection.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        heads: usize,
    ) -> Result<Self::Tensor>;
    /// Attention of the click queries `q` (already projected) over every voxel of `x`, with keys
    /// `LN(x)·Wkᵀ + bk` and values `LN(x)·Wvᵀ + bv`; heads concatenated, before the output
    /// projection. A backend need not form the N × d keys or values.
    fn click_cross_attention(
        &self,
        x: &Self::Tensor,
        q: &Self::Tensor,
        norm: &LayerNorm<Self::Tensor>,
        key: &Linear<Self::Tensor>,
        value: &Linear<Self::Tensor>,
        heads: usize,
    ) -> Result<Self::Tensor>;
    /// The click side of a head layer after its cross-attention, in place on the click
    /// embeddings (N_c × d): `c ← c + attended·W_outᵀ + b_out`, then the self-attention
    /// sub-layer `c ← c + MHA(LN(c))` and the FFN sub-layer; returns the label assignment's
    /// click keys `LN_k(c)·W_kᵀ + b_k` (N_c × d). A backend may run it all as one kernel: it is
    /// a dozen small ops a layer, each too small to fill a GPU.
    fn click_update(
        &self,
        clicks: &mut Self::Tensor,
        attended: &Self::Tensor,
        update: &ClickUpdate<'_, Self::Tensor>,
    ) -> Result<Self::Tensor> {
        click_update_in_parts(self, clicks, attended, update)
    }
    /// In place: `x ← x + ((1 − α)·U + α·Va)·W_outᵀ + b_out`, where per head
    /// `U = softmax_over_clicks(Q·Kcᵀ/√d_h)·Vc` and `Q = LN_q(x)·W_qᵀ + b_q`.
    /// `click_keys` and `click_values` are N_c × d; `auto_embedding`, Va = label_mlp(P) of the
    /// voxels' automatic probabilities, is N × d (the same in every layer: the head computes it
    /// once a click).
    fn label_assignment(
        &self,
        x: &mut Self::Tensor,
        click_keys: &Self::Tensor,
        click_values: &Self::Tensor,
        auto_embedding: &Self::Tensor,
        params: &LabelAssignment<'_, Self::Tensor>,
    ) -> Result<()>;
    /// Index of the largest column per row, ties to the lower index.
    fn argmax_rows(&self, x: &Self::Tensor) -> Result<Vec<Label>>;
}
