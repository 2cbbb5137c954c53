//! Launches of kernels/norm.cu: InstanceNorm + LeakyReLU (partials, finalize, apply) and
//! LayerNorm over rows.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{CudaBackend, CudaTensor, Element, Layout, driver, layout};
use crate::backend::{InstanceNorm, LayerNorm, Linear, shapes};
use crate::error::{Error, Result};

const MODULE: &str = "norm";
/// Threads per block of `instance_norm_partials` and `instance_norm_finalize` (NORM_THREADS in
/// the kernel).
const NORM_THREADS: u32 = 256;

pub fn instance_norm_leaky_relu<E: Element>(
    b: &CudaBackend<E>,
    x: &mut CudaTensor<E>,
    norm: &InstanceNorm<CudaTensor<E>>,
) -> Result<()> {
    layout::make_channels_first(b, x)?;
    let (channels, voxels) = shapes::instance_norm(x, norm)?;
    // Enough blocks to fill the GPU about four times over, each with at least 1024 voxels.
    let splits = (4 * b.multiprocessors)
        .div_ceil(channels)
        .clamp(1, voxels.div_ceil(1024).max(1));
    let mut partials = b.scratch::<f64>(channels * splits * 2)?;
    let (v, s) = (voxels as i64, splits as i32);
    let f = b.kernel(MODULE, "instance_norm_partials")?;
    let mut launch = b.launch_builder(&f);
    launch.arg(&x.data).arg(&mut partials).arg(&v).arg(&s);
    let grid = LaunchConfig {
        grid_dim: (splits as u32, channels as u32, 1),
        block_dim: (NORM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `instance_norm_partials_*`; partials holds channels × splits × 2 values.
    unsafe { launch.launch(grid) }.map_err(driver)?;
    normalize_from_partials(b, x, norm, &partials, splits)
}

/// InstanceNorm + LeakyReLU of `x` (channels-first or channels-last) in place from its
/// per-channel partial sums: `partials` holds
/// (Σx, Σx²) of `splits` disjoint parts of each channel, [channel][split], as
/// `instance_norm_partials` or the tensor-core convolution's epilogue leave them.
pub fn normalize_from_partials<E: Element>(
    b: &CudaBackend<E>,
    x: &mut CudaTensor<E>,
    norm: &InstanceNorm<CudaTensor<E>>,
    partials: &CudaSlice<f64>,
    splits: usize,
) -> Result<()> {
    let (channels, voxels) = shapes::instance_norm(x, norm)?;
    if partials.len() < channels * splits * 2 {
        return Err(Error::Shape(format!(
            "instance norm partials: {} values for {channels} channels × {splits} splits",
            partials.len()
        )));
    }
    let mut scale_shift = b.scratch::<f32>(channels * 2)?;
    let (c, v, s, eps, slope) = (
        channels as i64,
        voxels as i64,
        splits as i32,
        norm.eps,
        norm.negative_slope,
    );
    let f = b.kernel(MODULE, "instance_norm_finalize")?;
    let mut launch = b.launch_builder(&f);
    launch
        .arg(partials)
        .arg(&norm.weight.data)
        .arg(&norm.bias.data)
        .arg(&mut scale_shift);
    launch.arg(&v).arg(&s).arg(&eps);
    let grid = LaunchConfig {
        grid_dim: (channels as u32, 1, 1),
        block_dim: (NORM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `instance_norm_finalize_*`; one block per channel, partials checked above.
    unsafe { launch.launch(grid) }.map_err(driver)?;

    // f16 channels-last values in eights of channels take 16 bytes a thread; the rest a value.
    let by_eight =
        E::TENSOR_CORES && x.layout == Layout::ChannelsLast && channels.is_multiple_of(8);
    let (f, threads) = if by_eight {
        let f = b.function(MODULE, "instance_norm_apply_channels_last_f16")?;
        (f, channels / 8 * voxels)
    } else {
        (b.kernel(MODULE, "instance_norm_apply")?, channels * voxels)
    };
    let channels_last = i32::from(x.layout == Layout::ChannelsLast);
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&mut x.data)
        .arg(&scale_shift)
        .arg(&c)
        .arg(&v)
        .arg(&slope);
    if !by_eight {
        launch.arg(&channels_last);
    }
    // SAFETY: matches `instance_norm_apply_*` (x, scale_shift, channels, voxels, slope,
    // channels_last) and `instance_norm_apply_channels_last_f16` (the same without the last,
    // taken only for channels-last f16 values, channels a multiple of 8, x a fresh 16-byte
    // aligned allocation); scale_shift holds two values per channel.
    unsafe { launch.launch(b.elementwise(threads)) }.map_err(driver)?;
    Ok(())
}

/// Widest rows and most outputs `layer_norm_project_*` takes (PROJECT_MAX_WIDTH in the kernel);
/// past them LN(x) is written and projected by the GEMM.
const PROJECT_MAX_WIDTH: usize = 128;
const PROJECT_MAX_OUTPUTS: usize = 16;

/// `y = LN(x)·Wᵀ + b` into a new tensor: one kernel where the projection is narrow.
pub fn layer_norm_linear<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    norm: &LayerNorm<CudaTensor<E>>,
    linear: &Linear<CudaTensor<E>>,
) -> Result<CudaTensor<E>> {
    let (rows, width) = shapes::tokens(x, "layer_norm_linear")?;
    shapes::layer_norm(norm, width)?;
    let outputs = shapes::linear(linear, width)?;
    if width > PROJECT_MAX_WIDTH || outputs > PROJECT_MAX_OUTPUTS {
        return super::linear::linear(b, &layer_norm(b, x, norm)?, linear);
    }
    let mut y = b.output(vec![rows, outputs])?;
    let f = b.kernel(MODULE, "layer_norm_project")?;
    let (r, w, o) = (rows as i64, width as i64, outputs as i64);
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&x.data)
        .arg(&norm.weight.data)
        .arg(&norm.bias.data)
        .arg(&linear.weight.data)
        .arg(&linear.bias.data);
    launch.arg(&mut y.data).arg(&r).arg(&w).arg(&o);
    // SAFETY: matches `layer_norm_project_*`: a warp per row of at most PROJECT_MAX_WIDTH values,
    // y holds rows × outputs values, the weight outputs × width.
    unsafe { launch.launch(b.elementwise(rows * 32)) }.map_err(driver)?;
    Ok(y)
}

/// `y = LN(x)` into a new tensor.
pub fn layer_norm<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    norm: &LayerNorm<CudaTensor<E>>,
) -> Result<CudaTensor<E>> {
    let (rows, width) = shapes::tokens(x, "layer_norm")?;
    shapes::layer_norm(norm, width)?;
    let mut y = b.output(x.shape.clone())?;
    let f = b.kernel(MODULE, "layer_norm")?;
    let (r, w) = (rows as i64, width as i64);
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&x.data)
        .arg(&mut y.data)
        .arg(&norm.weight.data)
        .arg(&norm.bias.data)
        .arg(&r)
        .arg(&w);
    // One warp per row: 8 rows per block of 256 threads.
    // SAFETY: matches `layer_norm_*`.
    unsafe { launch.launch(b.elementwise(rows * 32)) }.map_err(driver)?;
    Ok(y)
}
