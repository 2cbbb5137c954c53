//! How a CUDA tensor's values lie in memory. The f16 network runs on channels-last volumes and
//! packed weights (kernels/conv.cu); every other op reads channels-first volumes. A tensor's
//! shape is always the logical one (C × Z × Y × X, PyTorch's weight shapes), its `Layout` says
//! how it is stored, and each op asks for the layout it reads: `volume_as` and `packed_weights`
//! lend the tensor as it is when it already fits, or a converted copy (`swap_inner_axes` in
//! kernels/volume.cu).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{CudaBackend, CudaTensor, Element, driver};
use crate::error::{Error, Result};

const MODULE: &str = "volume";

/// Side of the tiles `swap_inner_axes` and `region_tokens` move through shared memory
/// (TRANSPOSE_TILE in kernels/volume.cu).
pub(super) const TRANSPOSE_TILE: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Row-major in the order of the shape: volumes are channels-first.
    Standard,
    /// A volume C × Z × Y × X stored Z × Y × X × C.
    ChannelsLast,
    /// Convolution weights [a, b, k…] stored [a][tap][b] (a convolution's [cout, cin, k…], a
    /// transposed convolution's [cin, cout, s…]).
    PackedWeights,
}

/// y[a][t][b] = x[a][b][t] into a new tensor of the same shape and layout `layout`.
fn swap_inner_axes<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    [outer, middle, inner]: [usize; 3],
    layout: Layout,
) -> Result<CudaTensor<E>> {
    let tiles = middle.div_ceil(TRANSPOSE_TILE) * inner.div_ceil(TRANSPOSE_TILE);
    if tiles > i32::MAX as usize || outer > 65535 {
        return Err(Error::Shape(format!(
            "a transpose of {outer} × {middle} × {inner} values is too large for one launch"
        )));
    }
    let mut y = b.output(x.shape.clone())?;
    y.layout = layout;
    let f = b.kernel(MODULE, "swap_inner_axes")?;
    let (m, i) = (middle as i64, inner as i64);
    let mut launch = b.launch_builder(&f);
    launch.arg(&x.data).arg(&mut y.data).arg(&m).arg(&i);
    let grid = LaunchConfig {
        grid_dim: (tiles as u32, outer as u32, 1),
        block_dim: (TRANSPOSE_TILE as u32, 8, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `swap_inner_axes_*`; x and y hold outer × middle × inner values, and the
    // grid covers them in 32 × 32 tiles, one row of blocks per `a`.
    unsafe { launch.launch(grid) }.map_err(driver)?;
    Ok(y)
}

/// Channels and voxels of a volume, for the conversions.
fn volume_extent<E>(x: &CudaTensor<E>, layout: Layout) -> Result<(usize, usize)> {
    match (x.shape.split_first(), x.layout) {
        (Some((&channels, dims)), Layout::Standard | Layout::ChannelsLast) if dims.len() == 3 => {
            Ok((channels, dims.iter().product()))
        }
        _ => Err(Error::Shape(format!(
            "a {layout:?} volume is C × Z × Y × X, got shape {:?} stored {:?}",
            x.shape, x.layout
        ))),
    }
}

/// `x` as a volume stored as `want`: Standard (channels-first, as every op outside the f16
/// network reads volumes) or ChannelsLast (as the f16 network's convolutions do). `x` itself
/// when it is stored so already, or has one channel (both layouts are then the same bytes), else
/// a converted copy in `slot`.
pub fn volume_as<'a, E: Element>(
    b: &CudaBackend<E>,
    x: &'a CudaTensor<E>,
    slot: &'a mut Option<CudaTensor<E>>,
    want: Layout,
) -> Result<&'a CudaTensor<E>> {
    if x.layout == want {
        return Ok(x);
    }
    let (channels, voxels) = volume_extent(x, want)?;
    if channels == 1 {
        return Ok(x);
    }
    let extents = match want {
        Layout::ChannelsLast => [1, channels, voxels],
        _ => [1, voxels, channels],
    };
    Ok(slot.insert(swap_inner_axes(b, x, extents, want)?))
}

/// Makes `x` channels-first in place (for ops that update a volume in place).
pub fn make_channels_first<E: Element>(b: &CudaBackend<E>, x: &mut CudaTensor<E>) -> Result<()> {
    let mut slot = None;
    volume_as(b, x, &mut slot, Layout::Standard)?;
    if let Some(converted) = slot {
        *x = converted;
    }
    Ok(())
}

/// Convolution weights [a, b, k…] as [a][tap][b], for the f16 tensor-core convolutions: packed
/// at load (`Backend::upload_conv_weight`), or here from weights uploaded as they are.
pub fn packed_weights<'a, E: Element>(
    b: &CudaBackend<E>,
    w: &'a CudaTensor<E>,
    slot: &'a mut Option<CudaTensor<E>>,
) -> Result<&'a CudaTensor<E>> {
    match (w.layout, w.shape.as_slice()) {
        (Layout::PackedWeights, _) => Ok(w),
        (Layout::Standard, [outer, middle, taps @ ..]) if !taps.is_empty() => {
            let extents = [*outer, *middle, taps.iter().product()];
            Ok(slot.insert(swap_inner_axes(b, w, extents, Layout::PackedWeights)?))
        }
        _ => Err(Error::Shape(format!(
            "convolution weights are [a, b, k…], got shape {:?} stored {:?}",
            w.shape, w.layout
        ))),
    }
}

/// A copy of `x` whose rows of `inner` values (a channels-last volume's voxels, packed weights'
/// [a][tap] rows) are widened to `padded` by zeros, as `shape` (its logical shape with the
/// channels padded) stored as `layout` (`pad_inner_axis_f16` in kernels/volume.cu): the f16
/// convolutions take their channels in eights.
pub fn pad_inner_axis<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    [rows, inner, padded]: [usize; 3],
    shape: Vec<usize>,
    layout: Layout,
) -> Result<CudaTensor<E>> {
    if !E::TENSOR_CORES {
        return Err(Error::Shape(
            "channel padding is for the f16 convolutions' layouts".into(),
        ));
    }
    let mut y = b.output(shape)?;
    y.layout = layout;
    let f = b.function(MODULE, "pad_inner_axis_f16")?;
    let (r, i, p) = (rows as i64, inner as i64, padded as i64);
    let mut launch = b.launch_builder(&f);
    launch.arg(&x.data).arg(&mut y.data).arg(&r).arg(&i).arg(&p);
    // SAFETY: matches `pad_inner_axis_f16`; x holds rows × inner values and y, shaped by the
    // caller, rows × padded; the kernel exists for f16, which the caller (the f16 convolutions)
    // stores.
    unsafe { launch.launch(b.elementwise(rows)) }.map_err(driver)?;
    Ok(y)
}

/// `w` packed for the f16 convolutions, if this storage type runs them.
pub fn pack_weights<E: Element>(b: &CudaBackend<E>, w: CudaTensor<E>) -> Result<CudaTensor<E>> {
    if !E::TENSOR_CORES {
        return Ok(w);
    }
    let mut slot = None;
    packed_weights(b, &w, &mut slot)?;
    Ok(slot.unwrap_or(w))
}
