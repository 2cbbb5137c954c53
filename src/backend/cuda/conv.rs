//! Launches of kernels/conv.cu: the 3D convolution and the kernel = stride transposed
//! convolution, each one thread per output over channels-first volumes with f32 storage, and a
//! tensor-core GEMM over channels-last volumes and packed weights with f16 (layout.rs converts
//! what arrives otherwise).

use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};

use super::{CudaBackend, CudaTensor, Dims3, Element, Layout, driver, layout, norm};
use crate::backend::{Conv3d, ConvTranspose3d, InstanceNorm, conv_then_norm, shapes};
use crate::error::Result;

const MODULE: &str = "conv";
/// Output block of the implicit GEMM (TILE in the kernel): voxels × output channels.
const TILE: usize = 64;

/// A null device pointer, for a kernel's optional arguments.
const NULL: u64 = 0;

fn push_bias<'a, E: Element>(launch: &mut LaunchArgs<'a>, bias: &'a Option<CudaTensor<E>>) {
    match bias {
        Some(b) => launch.arg(&b.data),
        None => launch.arg(&NULL),
    };
}

/// The implicit-GEMM convolution's last arguments: the second volume of a channel concatenation
/// read in place (the input itself when there is none) with the first's channel count, and where
/// the epilogue leaves InstanceNorm's partial sums of the output (none: a null pointer).
struct IgemmInputs<'a, E: Element> {
    second: &'a CudaTensor<E>,
    first_channels: i64,
    norm_partials: Option<&'a mut CudaSlice<f64>>,
}

/// What a launch of kernels/conv.cu computes: its kernel, the input, the weights, the extents
/// after `cout`, and for the tensor-core kernels the GEMM's M × N (one block per 64 × 64 tile;
/// None for the one-thread-per-output kernels) and the implicit GEMM's last arguments.
struct ConvLaunch<'a, E: Element> {
    name: &'a str,
    x: &'a CudaTensor<E>,
    weight: &'a CudaTensor<E>,
    bias: &'a Option<CudaTensor<E>>,
    extra: &'a [Dims3],
    gemm: Option<[usize; 2]>,
    igemm: Option<IgemmInputs<'a, E>>,
}

/// Runs `conv` (`conv3d_*`, `conv3d_igemm_f16`, `conv_transpose3d_*` or
/// `conv_transpose3d_mma_f16`) into a new output of the checked shape.
fn launch_conv<E: Element>(
    b: &CudaBackend<E>,
    conv: ConvLaunch<'_, E>,
    shape: &shapes::ConvShape,
) -> Result<CudaTensor<E>> {
    let o = shape.out_dims;
    let mut y = b.output(vec![shape.cout, o[0], o[1], o[2]])?;
    // The tensor-core kernels read and write channels-last volumes and packed weights, the
    // others channels-first volumes and PyTorch's weights.
    let (mut x_slot, mut second_slot, mut w_slot) = (None, None, None);
    let (x, weight) = if conv.gemm.is_some() {
        y.layout = Layout::ChannelsLast;
        (
            layout::volume_as(b, conv.x, &mut x_slot, Layout::ChannelsLast)?,
            layout::packed_weights(b, conv.weight, &mut w_slot)?,
        )
    } else {
        (
            layout::volume_as(b, conv.x, &mut x_slot, Layout::Standard)?,
            conv.weight,
        )
    };
    let f = b.function(MODULE, conv.name)?;
    let (cin, cout) = (shape.cin as i64, shape.cout as i64);
    let input = Dims3::from(shape.dims);
    let mut launch = b.stream.launch_builder(&f);
    launch.arg(&x.data).arg(&weight.data);
    push_bias(&mut launch, conv.bias);
    launch.arg(&mut y.data).arg(&cin).arg(&input).arg(&cout);
    for d in conv.extra {
        launch.arg(d);
    }
    let mut igemm = conv.igemm;
    if let Some(igemm) = &mut igemm {
        let second = layout::volume_as(b, igemm.second, &mut second_slot, Layout::ChannelsLast)?;
        launch.arg(&second.data).arg(&igemm.first_channels);
        match &mut igemm.norm_partials {
            Some(partials) => launch.arg(&mut **partials),
            None => launch.arg(&NULL),
        };
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
    // pad), `conv3d_igemm_f16` (the same, then second, first_channels, stats) and
    // `conv_transpose3d_*` / `conv_transpose3d_mma_f16` (x, w, b, y, cin, in, cout, stride);
    // shapes checked, a concatenation's inputs share their spatial extent, the inputs and weights
    // are stored as the kernel reads them (converted above), and the partials hold
    // cout × (M / 64 blocks) × 2 values (conv_norm_leaky_relu).
    unsafe { launch.launch(grid) }.map_err(driver)?;
    Ok(y)
}

/// conv3d of `x`, or of the channel concatenation [x; second] read in place (the tensor-core
/// kernel only: the others get the concatenation), leaving InstanceNorm's partial sums of the
/// output in `norm_partials` if given (the tensor-core kernel only).
fn conv3d_of<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    second: Option<&CudaTensor<E>>,
    conv: &Conv3d<CudaTensor<E>>,
    shape: &shapes::ConvShape,
    norm_partials: Option<&mut CudaSlice<f64>>,
) -> Result<CudaTensor<E>> {
    let extra = [shape.out_dims, shape.kernel, conv.stride, conv.padding].map(Dims3::from);
    let voxels = shape.out_dims.iter().product();
    let launch = ConvLaunch {
        name: E::CONV_KERNEL,
        x,
        weight: &conv.weight,
        bias: &conv.bias,
        extra: &extra,
        gemm: E::TENSOR_CORES.then_some([voxels, shape.cout]),
        igemm: E::TENSOR_CORES.then(|| IgemmInputs {
            second: second.unwrap_or(x),
            first_channels: x.shape[0] as i64,
            norm_partials,
        }),
    };
    launch_conv(b, launch, shape)
}

pub fn conv3d<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    conv: &Conv3d<CudaTensor<E>>,
) -> Result<CudaTensor<E>> {
    conv3d_of(b, x, None, conv, &shapes::conv3d(x, conv)?, None)
}

pub fn conv3d_on_concat<E: Element>(
    b: &CudaBackend<E>,
    first: &CudaTensor<E>,
    second: &CudaTensor<E>,
    conv: &Conv3d<CudaTensor<E>>,
) -> Result<CudaTensor<E>> {
    let shape = shapes::conv3d_on_concat(first, second, conv)?;
    if E::TENSOR_CORES {
        conv3d_of(b, first, Some(second), conv, &shape, None)
    } else {
        let joined = super::volume::concat_channels(b, first, second)?;
        conv3d_of(b, &joined, None, conv, &shape, None)
    }
}

/// One conv block of the network: InstanceNorm + LeakyReLU of conv3d(x), or of [x; second].
/// On tensor cores the convolution's epilogue gathers the normalisation's statistics, so the
/// output is read once more (to normalise it) instead of twice.
pub fn conv_norm_leaky_relu<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    second: Option<&CudaTensor<E>>,
    conv: &Conv3d<CudaTensor<E>>,
    norm: &InstanceNorm<CudaTensor<E>>,
) -> Result<CudaTensor<E>> {
    if !E::TENSOR_CORES {
        // The direct kernel has no epilogue to gather the statistics in.
        return conv_then_norm(b, x, second, conv, norm);
    }
    let shape = match second {
        Some(second) => shapes::conv3d_on_concat(x, second, conv)?,
        None => shapes::conv3d(x, conv)?,
    };
    let blocks = shape.out_dims.iter().product::<usize>().div_ceil(TILE);
    let mut partials = b.scratch::<f64>(shape.cout * blocks * 2)?;
    let mut y = conv3d_of(b, x, second, conv, &shape, Some(&mut partials))?;
    norm::normalize_from_partials(b, &mut y, norm, &partials, blocks)?;
    Ok(y)
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
        weight: &conv.weight,
        bias: &conv.bias,
        extra: &extra,
        gemm,
        igemm: None,
    };
    launch_conv(b, launch, &shape)
}
