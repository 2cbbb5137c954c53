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
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&x.data)
        .arg(&linear.weight.data)
        .arg(&linear.bias.data)
        .arg(&mut y.data);
    launch.arg(&m).arg(&n).arg(&k).arg(&e);
    let threads = if E::TENSOR_CORES { 128 } else { 256 };
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

/// `GELU(x·W_upᵀ + b_up)·W_downᵀ + b_down`: in one launch of `label_mlp_mma_f16_{out}` where x
/// has at most LABEL_MLP_CLASSES columns and the output a fused width (the head's label MLP on
/// the probabilities, Va, and on the clicks' classes), the hidden layer never written; else two
/// GEMMs, the hidden layer through global memory.
pub fn mlp<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    mlp: &Mlp<CudaTensor<E>>,
) -> Result<CudaTensor<E>> {
    let (rows, classes) = shapes::tokens(x, "mlp")?;
    let (hidden, width) = shapes::mlp(mlp, classes)?;
    if rows > 0 && classes <= LABEL_MLP_CLASSES && CudaBackend::<E>::fused_head_width(width) {
        return fused_label_mlp(b, x, mlp, [rows, classes, hidden, width]);
    }
    let hidden = linear_into_new(b, x, &mlp.up, Epilogue::Gelu)?;
    linear_into_new(b, &hidden, &mlp.down, Epilogue::Plain)
}

/// The columns `label_mlp_mma_f16_*` takes (LABEL_MLP_CLASSES in the kernel: one K step).
const LABEL_MLP_CLASSES: usize = 16;

fn fused_label_mlp<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    mlp: &Mlp<CudaTensor<E>>,
    [rows, classes, hidden, width]: [usize; 4],
) -> Result<CudaTensor<E>> {
    let name = format!("label_mlp_mma_f16_{width}");
    let f = b.function(MODULE, &name)?;
    let grid = b.fused_launch(&name, &f, rows, |block_rows| {
        gelu_mlp_shared_bytes(LABEL_MLP_CLASSES, width, block_rows)
    })?;
    let mut out = b.output(vec![rows, width])?;
    let (n, k, h) = (rows as i64, classes as i64, hidden as i64);
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&x.data)
        .arg(&mlp.up.weight.data)
        .arg(&mlp.up.bias.data)
        .arg(&mlp.down.weight.data)
        .arg(&mlp.down.bias.data)
        .arg(&mut out.data);
    launch.arg(&n).arg(&k).arg(&h);
    // SAFETY: matches `label_mlp_mma_f16_*` (p, w_up, b_up, w_down, b_down, out, n, classes,
    // hidden); the storage is f16 (fused_head_width), x holds rows × classes values (at most
    // LABEL_MLP_CLASSES a row), the weights were checked by shapes::mlp, `out` holds rows × width
    // values, and the shared memory is the kernel's FfnShared<LABEL_MLP_CLASSES, width>.
    unsafe { launch.launch(grid) }.map_err(driver)?;
    Ok(out)
}

/// Hidden units per chunk of `feed_forward_mma_f16_*` (FFN_CHUNK in the kernel).
const FFN_CHUNK: usize = 32;

/// Bytes of dynamic shared memory of the kernels on kernels/feed_forward.cuh's `GeluMlpChunks`
/// (`FfnShared<k, width>`): the rows multiplied (`k` values), two chunks of W1 and two of W2
/// (halves, rows padded by 8), for blocks of `rows` tokens. The FFN's k is its width (71 KB at
/// width 128 and 128 rows: two blocks a multiprocessor).
pub(super) fn gelu_mlp_shared_bytes(k: usize, width: usize, rows: usize) -> usize {
    let (ld, lh) = (k + 8, FFN_CHUNK + 8);
    2 * (rows * ld + 2 * FFN_CHUNK * ld + 2 * width * lh)
}

pub fn feed_forward<E: Element>(
    b: &CudaBackend<E>,
    x: &mut CudaTensor<E>,
    ffn: &FeedForward<CudaTensor<E>>,
) -> Result<()> {
    let (rows, width, hidden) = shapes::feed_forward(x, ffn)?;
    if rows == 0 {
        return Ok(());
    }
    if CudaBackend::<E>::fused_head_width(width) {
        return fused_feed_forward(b, x, ffn, [rows, width, hidden]);
    }
    let normed = norm::layer_norm(b, x, &ffn.norm)?;
    let hidden = linear_into_new(b, &normed, &ffn.mlp.up, Epilogue::Gelu)?;
    gemm(b, &hidden, &ffn.mlp.down, x, Epilogue::Residual)
}

/// Hidden units per chunk of the wgmma path (FFN_WGMMA_CHUNK), whose blocks are 128 tokens.
const FFN_WGMMA_CHUNK: usize = 64;

/// Bytes of dynamic shared memory `feed_forward_wgmma_f16_{width}` lays out (`FfnWgmmaShared`
/// in kernels/feed_forward.cuh): LN(x) of 128 rows, two chunks of W1 and two of W2, all unpadded
/// (96 KB at width 128).
fn wgmma_feed_forward_shared_bytes(width: usize) -> usize {
    2 * (128 * width + 4 * FFN_WGMMA_CHUNK * width)
}

/// The whole sub-layer in one launch, on tensor cores: `feed_forward_wgmma_f16_{width}` where
/// the GPU runs the sm_90a cubins and the width is a multiple of 64 (blocks of 128 tokens), else
/// `feed_forward_mma_f16_{width}` (widths that are multiples of 16 up to 128).
fn fused_feed_forward<E: Element>(
    b: &CudaBackend<E>,
    x: &mut CudaTensor<E>,
    ffn: &FeedForward<CudaTensor<E>>,
    [rows, width, hidden]: [usize; 3],
) -> Result<()> {
    let (f, grid) = b.fused_head_kernel(
        MODULE,
        ["feed_forward_mma", "feed_forward_wgmma"],
        width,
        rows,
        wgmma_feed_forward_shared_bytes(width),
        |block_rows| gelu_mlp_shared_bytes(width, width, block_rows),
    )?;
    let (n, h) = (rows as i64, hidden as i64);
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&mut x.data)
        .arg(&ffn.norm.weight.data)
        .arg(&ffn.norm.bias.data);
    launch
        .arg(&ffn.mlp.up.weight.data)
        .arg(&ffn.mlp.up.bias.data)
        .arg(&ffn.mlp.down.weight.data)
        .arg(&ffn.mlp.down.bias.data)
        .arg(&n)
        .arg(&h);
    // SAFETY: matches `feed_forward_{mma,wgmma}_f16_*` (x, gamma, beta, w1, b1, w2, b2, n,
    // hidden); the storage is f16 (TENSOR_CORES), x holds rows × width values and the weights
    // were checked against width and hidden; the shared memory is the kernel's (FfnWgmmaShared,
    // blocks of 128 tokens; FfnShared<width, width> for the rows chosen).
    unsafe { launch.launch(grid) }.map_err(driver)?;
    Ok(())
}
