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

/// What a launch of kernels/conv.cu computes: its kernel, the input (and for the implicit GEMM
/// the second input of a channel concatenation, with the first's channel count), the weights,
/// and the extents after `cout`.
struct ConvLaunch<'a, E: Element> {
    name: &'a str,
    x: &'a CudaTensor<E>,
    concat: Option<(&'a CudaTensor<E>, i64)>,
    weight: &'a CudaTensor<E>,
    bias: &'a Option<CudaTensor<E>>,
    extra: &'a [Dims3],
    /// M × N of a tensor-core kernel's GEMM (one block per 64 × 64 tile); None for the
    /// one-thread-per-output kernels.
    gemm: Option<[usize; 2]>,
}

/// Runs `conv` (`conv3d_*`, `conv3d_igemm_f16`, `conv_transpose3d_*` or
/// `conv_transpose3d_mma_f16`) into a new output of the checked shape.
fn launch_conv<E: Element>(
    b: &CudaBackend<E>,
    conv: &ConvLaunch<'_, E>,
    shape: &shapes::ConvShape,
) -> Result<CudaTensor<E>> {
    let o = shape.out_dims;
    let mut y = b.output(vec![shape.cout, o[0], o[1], o[2]])?;
    let f = b.function(MODULE, conv.name)?;
    let (cin, cout) = (shape.cin as i64, shape.cout as i64);
    let input = Dims3::from(shape.dims);
    let mut launch = b.stream.launch_builder(&f);
    launch.arg(&conv.x.data).arg(&conv.weight.data);
    push_bias(&mut launch, conv.bias);
    launch.arg(&mut y.data).arg(&cin).arg(&input).arg(&cout);
    for d in conv.extra {
        launch.arg(d);
    }
    if let Some((second, first_channels)) = &conv.concat {
        launch.arg(&second.data).arg(first_channels);
    }
    let grid = match conv.gemm {
        // M (voxel) blocks on x, whose limit is 2³¹ − 1 blocks (y's is 65535).
        Some([m, n]) => LaunchConfig {
            grid_dim: (m.div_ceil(TILE) as u32, n.div_ceil(TILE) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        },
        None => b.elementwise(shape.cout * o.iter().product::<usize>()),
    };
    // SAFETY: argument order matches `conv3d_*` (x, w, b, y, cin, in, cout, out, kernel, stride,
    // pad), `conv3d_igemm_f16` (the same, then second, first_channels) and
    // `conv_transpose3d_*` / `conv_transpose3d_mma_f16` (x, w, b, y, cin, in, cout, stride);
    // shapes checked, and a concatenation's inputs share their spatial extent.
    unsafe { launch.launch(grid) }.map_err(driver)?;
    Ok(y)
}

/// conv3d of `x`, or of the channel concatenation [x; second] read in place (the tensor-core
/// kernel only: the others get the concatenation).
fn conv3d_of<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    second: Option<&CudaTensor<E>>,
    conv: &Conv3d<CudaTensor<E>>,
    shape: &shapes::ConvShape,
) -> Result<CudaTensor<E>> {
    let extra = [shape.out_dims, shape.kernel, conv.stride, conv.padding].map(Dims3::from);
    let voxels = shape.out_dims.iter().product();
    let first_channels = x.shape[0] as i64;
    let launch = ConvLaunch {
        name: E::CONV_KERNEL,
        x,
        concat: E::TENSOR_CORES.then(|| (second.unwrap_or(x), first_channels)),
        weight: &conv.weight,
        bias: &conv.bias,
        extra: &extra,
        gemm: E::TENSOR_CORES.then_some([voxels, shape.cout]),
    };
    launch_conv(b, &launch, shape)
}

pub fn conv3d<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    conv: &Conv3d<CudaTensor<E>>,
) -> Result<CudaTensor<E>> {
    conv3d_of(b, x, None, conv, &shapes::conv3d(x, conv)?)
}

pub fn conv3d_on_concat<E: Element>(
    b: &CudaBackend<E>,
    first: &CudaTensor<E>,
    second: &CudaTensor<E>,
    conv: &Conv3d<CudaTensor<E>>,
) -> Result<CudaTensor<E>> {
    let shape = shapes::conv3d_on_concat(first, second, conv)?;
    if E::TENSOR_CORES {
        conv3d_of(b, first, Some(second), conv, &shape)
    } else {
        let joined = super::volume::concat_channels(b, first, second)?;
        conv3d_of(b, &joined, None, conv, &shape)
    }
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
    let launch = ConvLaunch {
        name: &name,
        x,
        concat: None,
        weight: &conv.weight,
        bias: &conv.bias,
        extra: &extra,
        gemm,
    };
    launch_conv(b, &launch, &shape)
}
