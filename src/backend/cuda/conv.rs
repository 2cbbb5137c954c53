//! Launches of kernels/conv.cu: the 3D convolution and the kernel = stride transposed
//! convolution, each one thread per output with f32 storage and a tensor-core GEMM with f16.

use cudarc::driver::{LaunchArgs, LaunchConfig, PushKernelArg};

use super::{CudaBackend, CudaTensor, Dims3, Element, driver};
use crate::backend::{Conv3d, ConvTranspose3d, shapes};
use crate::error::Result;

const MODULE: &str = "conv";
/// Output block of the implicit GEMM (TILE in the kernel): voxels × output channels.
const TILE: usize = 64;

/// A null device pointer, for kernels whose bias is optional.
const NO_BIAS: u64 = 0;

fn push_bias<'a, E: Element>(launch: &mut LaunchArgs<'a>, bias: &'a Option<CudaTensor<E>>) {
    match bias {
        Some(b) => launch.arg(&b.data),
        None => launch.arg(&NO_BIAS),
    };
}

/// Runs the kernel `name` (`conv3d_*`, `conv3d_igemm_f16`, `conv_transpose3d_*` or
/// `conv_transpose3d_mma_f16`; `extra` the extents after `cout`) into a new output of the
/// checked shape: one thread per output value, or for a tensor-core kernel one block per
/// 64 × 64 tile of its `gemm` (M × N).
#[allow(clippy::too_many_arguments)]
fn launch_conv<E: Element>(
    b: &CudaBackend<E>,
    name: &str,
    gemm: Option<[usize; 2]>,
    x: &CudaTensor<E>,
    weight: &CudaTensor<E>,
    bias: &Option<CudaTensor<E>>,
    extra: &[Dims3],
    conv: &shapes::ConvShape,
) -> Result<CudaTensor<E>> {
    let o = conv.out_dims;
    let mut y = b.output(vec![conv.cout, o[0], o[1], o[2]])?;
    let f = b.function(MODULE, name)?;
    let (cin, cout) = (conv.cin as i64, conv.cout as i64);
    let input = Dims3::from(conv.dims);
    let mut launch = b.stream.launch_builder(&f);
    launch.arg(&x.data).arg(&weight.data);
    push_bias(&mut launch, bias);
    launch.arg(&mut y.data).arg(&cin).arg(&input).arg(&cout);
    for d in extra {
        launch.arg(d);
    }
    let grid = match gemm {
        // M (voxel) blocks on x, whose limit is 2³¹ − 1 blocks (y's is 65535).
        Some([m, n]) => LaunchConfig {
            grid_dim: (m.div_ceil(TILE) as u32, n.div_ceil(TILE) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        },
        None => b.elementwise(conv.cout * o.iter().product::<usize>()),
    };
    // SAFETY: argument order matches `conv3d_*` and `conv3d_igemm_f16` (x, w, b, y, cin, in,
    // cout, out, kernel, stride, pad) and `conv_transpose3d_*` / `conv_transpose3d_mma_f16` (x,
    // w, b, y, cin, in, cout, stride); shapes checked.
    unsafe { launch.launch(grid) }.map_err(driver)?;
    Ok(y)
}

pub fn conv3d<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    conv: &Conv3d<CudaTensor<E>>,
) -> Result<CudaTensor<E>> {
    let shape = shapes::conv3d(x, conv)?;
    let extra = [shape.out_dims, shape.kernel, conv.stride, conv.padding].map(Dims3::from);
    let voxels = shape.out_dims.iter().product();
    launch_conv(
        b,
        E::CONV_KERNEL,
        E::TENSOR_CORES.then_some([voxels, shape.cout]),
        x,
        &conv.weight,
        &conv.bias,
        &extra,
        &shape,
    )
}

pub fn conv_transpose3d<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    conv: &ConvTranspose3d<CudaTensor<E>>,
) -> Result<CudaTensor<E>> {
    let shape = shapes::conv_transpose3d(x, conv)?;
    let extra = [Dims3::from(conv.stride)];
    let (name, gemm) = if E::TENSOR_CORES {
        let (voxels, taps) = (
            shape.dims.iter().product(),
            conv.stride.iter().product::<usize>(),
        );
        (
            "conv_transpose3d_mma_f16".to_string(),
            Some([voxels, shape.cout * taps]),
        )
    } else {
        (format!("conv_transpose3d_{}", E::SUFFIX), None)
    };
    launch_conv(b, &name, gemm, x, &conv.weight, &conv.bias, &extra, &shape)
}
