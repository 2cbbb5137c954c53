//! Launches of kernels/linear.cu: dense layers with fused epilogues, and the MLP and
//! feed-forward sub-layers built from them.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{CudaBackend, CudaTensor, Element, driver, norm};
use crate::backend::{FeedForward, Linear, Mlp, shapes};
use crate::error::Result;

const MODULE: &str = "linear";
/// Output tile of both GEMM kernels (TILE in the kernel).
const TILE: usize = 64;

/// What the GEMM does when it stores a value (the kernels' `Epilogue`).
#[derive(Clone, Copy)]
pub(super) enum Epilogue {
    Plain = 0,
    Gelu = 1,
    /// `y += x·Wᵀ + b`
    Residual = 2,
}

/// `y (=|+=) x·Wᵀ + b` for `x` of `rows × width` into `y` of `rows × out`.
pub(super) fn gemm<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    linear: &Linear<CudaTensor<E>>,
    y: &mut CudaTensor<E>,
    epilogue: Epilogue,
) -> Result<()> {
    let (rows, width) = shapes::tokens(x, "linear")?;
    let out = shapes::linear(linear, width)?;
    let f = b.function(MODULE, E::LINEAR_KERNEL)?;
    let (m, n, k, e) = (rows as i64, out as i64, width as i64, epilogue as i32);
    let mut launch = b.stream.launch_builder(&f);
    launch
        .arg(&x.data)
        .arg(&linear.weight.data)
        .arg(&linear.bias.data)
        .arg(&mut y.data);
    launch.arg(&m).arg(&n).arg(&k).arg(&e);
    let threads = if E::LINEAR_KERNEL.starts_with("linear_mma") {
        128
    } else {
        256
    };
    let grid = LaunchConfig {
        grid_dim: (out.div_ceil(TILE) as u32, rows.div_ceil(TILE) as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `linear_simt_*` / `linear_mma_f16` (x, w, b, y, m, n, k, epilogue); y holds
    // rows × out values.
    unsafe { launch.launch(grid) }.map_err(driver)?;
    Ok(())
}

fn linear_into_new<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    linear: &Linear<CudaTensor<E>>,
    epilogue: Epilogue,
) -> Result<CudaTensor<E>> {
    let (rows, width) = shapes::tokens(x, "linear")?;
    let mut y = b.output(vec![rows, shapes::linear(linear, width)?])?;
    gemm(b, x, linear, &mut y, epilogue)?;
    Ok(y)
}

pub fn linear<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    linear: &Linear<CudaTensor<E>>,
) -> Result<CudaTensor<E>> {
    linear_into_new(b, x, linear, Epilogue::Plain)
}

pub fn mlp<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    mlp: &Mlp<CudaTensor<E>>,
) -> Result<CudaTensor<E>> {
    let hidden = linear_into_new(b, x, &mlp.up, Epilogue::Gelu)?;
    linear_into_new(b, &hidden, &mlp.down, Epilogue::Plain)
}

pub fn feed_forward<E: Element>(
    b: &CudaBackend<E>,
    x: &mut CudaTensor<E>,
    ffn: &FeedForward<CudaTensor<E>>,
) -> Result<()> {
    shapes::feed_forward(x, ffn)?;
    let normed = norm::layer_norm(b, x, &ffn.norm)?;
    let hidden = linear_into_new(b, &normed, &ffn.mlp.up, Epilogue::Gelu)?;
    gemm(b, &hidden, &ffn.mlp.down, x, Epilogue::Residual)
}
