//! Launches of kernels/conv.cu: the 3D convolution and the kernel = stride transposed
//! convolution, each one thread per output over channels-first volumes with f32 storage, and
//! with f16 over channels-last volumes and packed weights (layout.rs converts what arrives
//! otherwise): tensor-core GEMMs, and a direct kernel for the convolutions whose channels do not
//! come in eights (the network's first layer).

use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};

use super::{CudaBackend, CudaTensor, Dims3, Element, Layout, driver, layout, norm};
use crate::backend::{Conv3d, ConvTranspose3d, InstanceNorm, conv_then_norm, shapes};
use crate::error::{Error, Result};

const MODULE: &str = "conv";
/// Channels per 16-byte load of the implicit GEMM (VECTOR): it needs every channel count to be
/// a multiple of it.
const VECTOR: usize = 8;
/// The most taps a kernel of the implicit GEMM may have (IGEMM_MAX_TAPS: a bit each in a row's
/// mask of the taps inside the input); larger kernels, which no nnU-Net plan has, run on the
/// direct kernel.
const IGEMM_MAX_TAPS: usize = 32;

/// An f16 kernel's block: the output voxels × columns it computes, and its threads.
#[derive(Clone, Copy)]
struct BlockTile {
    rows: usize,
    columns: usize,
    threads: u32,
}

impl BlockTile {
    /// The grid over an output of `m` voxels × `n` columns: voxel blocks on x, whose limit is
    /// 2³¹ − 1 blocks (y's is 65535).
    fn grid(self, m: usize, n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                m.div_ceil(self.rows) as u32,
                n.div_ceil(self.columns) as u32,
                1,
            ),
            block_dim: (self.threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// The tensor-core GEMMs' usual block (4 warps of 32 × 32 outputs).
const GEMM_64X64: BlockTile = BlockTile {
    rows: 64,
    columns: 64,
    threads: 128,
};

/// The f16 3D convolution's kernel for `shape` with the input's first `first_channels` channels
/// in one volume, and its block (IgemmTile in kernels/conv.cu says why each): the direct kernel
/// (one thread per voxel, 32 output channels) unless every channel count is a multiple of 8
/// (after `pad_channels`, only a concatenation's parts can have other counts) and the kernel
/// has at most IGEMM_MAX_TAPS taps, else the implicit GEMM on 128 × 32 tiles where cout ≤ 32,
/// on 128 × 64 tiles where they still make two blocks per multiprocessor, else on 64 × 64 tiles.
fn f16_conv3d_kernel(
    shape: &shapes::ConvShape,
    first_channels: usize,
    multiprocessors: usize,
) -> (&'static str, BlockTile) {
    let tile = |rows, columns, threads| BlockTile {
        rows,
        columns,
        threads,
    };
    let voxels: usize = shape.out_dims.iter().product();
    if !(shape.cin.is_multiple_of(VECTOR)
        && first_channels.is_multiple_of(VECTOR)
        && fits_igemm(shape))
    {
        ("conv3d_direct_f16", tile(64, 32, 64))
    } else if shape.cout <= 32 {
        ("conv3d_igemm_f16_128x32", tile(128, 32, 128))
    } else if voxels.div_ceil(128) * shape.cout.div_ceil(64) >= 2 * multiprocessors {
        ("conv3d_igemm_f16_128x64", tile(128, 64, 128))
    } else {
        ("conv3d_igemm_f16_64x64", GEMM_64X64)
    }
}

/// Dynamic shared memory of an implicit-GEMM block (IgemmTile in kernels/conv.cu): a ring of 3
/// stages of A (rows) and B (columns) slabs of one K step, or the epilogue's f32 staging rows
/// (columns + 8 floats), whichever is larger. With wgmma (sm_90a) a step is 64 of K in unpadded
/// core matrices, with mma.sync 32 in rows padded by 8 halves.
fn igemm_shared_bytes(tile: BlockTile, wgmma: bool) -> usize {
    let slab_halves = if wgmma { 64 } else { 32 + 8 };
    let ring = 3 * (tile.rows + tile.columns) * slab_halves * 2;
    ring.max(tile.rows * (tile.columns + 8) * 4)
}

/// A null device pointer, for a kernel's optional arguments.
const NULL: u64 = 0;

fn push_bias<'a, E: Element>(launch: &mut LaunchArgs<'a>, bias: &'a Option<CudaTensor<E>>) {
    match bias {
        Some(b) => launch.arg(&b.data),
        None => launch.arg(&NULL),
    };
}

/// The f16 convolutions' last arguments: the second volume of a channel concatenation
/// read in place (the input itself when there is none) with the first's channel count, where
/// the epilogue leaves InstanceNorm's partial sums of the output, and where a split-K launch
/// leaves its splits' sums (none: a null pointer).
struct F16ConvInputs<'a, E: Element> {
    second: &'a CudaTensor<E>,
    first_channels: i64,
    norm_partials: Option<&'a mut CudaSlice<f64>>,
    split_sums: Option<&'a mut CudaSlice<f32>>,
}

/// What a launch of kernels/conv.cu computes: its kernel, the input, the weights, the extents
/// after `cout`, for the f16 kernels their grid of blocks (None for the one-thread-per-output
/// f32 kernels), and the f16 convolutions' last arguments.
struct ConvLaunch<'a, E: Element> {
    name: &'a str,
    x: &'a CudaTensor<E>,
    weight: &'a CudaTensor<E>,
    bias: &'a Option<CudaTensor<E>>,
    extra: &'a [Dims3],
    blocks: Option<LaunchConfig>,
    f16_inputs: Option<F16ConvInputs<'a, E>>,
}

/// Runs `conv` (`conv3d_*`, `conv3d_igemm_f16_*`, `conv3d_direct_f16`, `conv_transpose3d_*` or
/// `conv_transpose3d_mma_f16`) into a new output of the checked shape.
fn launch_conv<E: Element>(
    b: &CudaBackend<E>,
    conv: ConvLaunch<'_, E>,
    shape: &shapes::ConvShape,
) -> Result<CudaTensor<E>> {
    let o = shape.out_dims;
    let mut y = b.output(vec![shape.cout, o[0], o[1], o[2]])?;
    // The f16 kernels read and write channels-last volumes and packed weights, the f32 ones
    // channels-first volumes and PyTorch's weights.
    let (mut x_slot, mut second_slot, mut w_slot) = (None, None, None);
    let (x, weight) = if conv.blocks.is_some() {
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
    if let Some(blocks) = conv.blocks.filter(|g| g.shared_mem_bytes > 0) {
        b.allow_shared_memory(&f, blocks.shared_mem_bytes as usize)?;
    }
    let (cin, cout) = (shape.cin as i64, shape.cout as i64);
    let input = Dims3::from(shape.dims);
    let mut launch = b.launch_builder(&f);
    launch.arg(&x.data).arg(&weight.data);
    push_bias(&mut launch, conv.bias);
    launch.arg(&mut y.data).arg(&cin).arg(&input).arg(&cout);
    for d in conv.extra {
        launch.arg(d);
    }
    let mut f16_inputs = conv.f16_inputs;
    let wgmma = i32::from(b.wgmma);
    if let Some(inputs) = &mut f16_inputs {
        let second = layout::volume_as(b, inputs.second, &mut second_slot, Layout::ChannelsLast)?;
        launch.arg(&second.data).arg(&inputs.first_channels);
        match &mut inputs.norm_partials {
            Some(partials) => launch.arg(&mut **partials),
            None => launch.arg(&NULL),
        };
        match &mut inputs.split_sums {
            Some(sums) => launch.arg(&mut **sums),
            None => launch.arg(&NULL),
        };
        launch.arg(&wgmma);
    }
    let grid = match conv.blocks {
        Some(blocks) => blocks,
        None => b.elementwise(shape.cout * o.iter().product::<usize>()),
    };
    // SAFETY: argument order matches `conv3d_*` (x, w, b, y, cin, in, cout, out, kernel, stride,
    // pad), `conv3d_igemm_f16_*` and `conv3d_direct_f16` (the same, then second, first_channels,
    // stats, split_sums, wgmma; the implicit GEMM only with channel counts in eights, its shared
    // memory that of the path `wgmma` picks) and
    // `conv_transpose3d_*` / `conv_transpose3d_mma_f16` (x, w, b, y, cin, in, cout, stride);
    // shapes checked, a concatenation's inputs share their spatial extent, the inputs and weights
    // are stored as the kernel reads them (converted above), the partials hold two values per
    // output channel and block of voxels of the grid (conv3d_of sizes them from the same tile),
    // and a split-K grid's sums gridDim.z × voxels × cout values.
    unsafe { launch.launch(grid) }.map_err(driver)?;
    Ok(y)
}

/// conv3d of `x`, or of the channel concatenation [x; second] read in place (the f16 kernels
/// only: the f32 one gets the concatenation). Given `norm` (the f16 kernels only: the conv
/// block), the epilogue leaves InstanceNorm's partial sums of the output, one pair per channel
/// and block of voxels of `f16_conv3d_kernel`'s tile, and InstanceNorm + LeakyReLU are applied
/// from them.
fn conv3d_of<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    second: Option<&CudaTensor<E>>,
    conv: &Conv3d<CudaTensor<E>>,
    shape: &shapes::ConvShape,
    norm: Option<&InstanceNorm<CudaTensor<E>>>,
) -> Result<CudaTensor<E>> {
    // A first layer of 1 to 7 channels (f16, one input): the implicit GEMM on its input and
    // weights padded with zero channels to the next eight, which multiply nothing.
    let padded;
    let (x, weight, shape) = if E::TENSOR_CORES
        && second.is_none()
        && !shape.cin.is_multiple_of(VECTOR)
        && fits_igemm(shape)
    {
        padded = pad_channels(b, x, &conv.weight, shape)?;
        (&padded.0, &padded.1, &padded.2)
    } else {
        (x, &conv.weight, shape)
    };
    let extra = [shape.out_dims, shape.kernel, conv.stride, conv.padding].map(Dims3::from);
    let voxels: usize = shape.out_dims.iter().product();
    let first_channels = x.shape[0];
    let (name, tile) = if E::TENSOR_CORES {
        check_index_widths(shape)?;
        let (name, tile) = f16_conv3d_kernel(shape, first_channels, b.multiprocessors);
        (name.to_string(), Some(tile))
    } else {
        (format!("conv3d_{}", E::SUFFIX), None)
    };
    let voxel_blocks = tile.map(|tile| voxels.div_ceil(tile.rows));
    let mut partials = match (norm, voxel_blocks) {
        (Some(_), Some(blocks)) => Some(b.scratch::<f64>(shape.cout * blocks * 2)?),
        _ => None,
    };
    let mut grid = tile.map(|tile| {
        let mut grid = tile.grid(voxels, shape.cout);
        if name.starts_with("conv3d_igemm") {
            grid.shared_mem_bytes = igemm_shared_bytes(tile, b.wgmma) as u32;
        }
        grid
    });
    let splits = match grid {
        Some(g) if name == "conv3d_igemm_f16_64x64" => k_splits(
            g.grid_dim,
            shape.cin * shape.kernel.iter().product::<usize>(),
            b.multiprocessors,
        ),
        _ => 1,
    };
    let mut split_sums = if splits > 1 {
        // SAFETY: every split writes its sums for every output value before the sum kernel
        // reads them (empty splits write zeros).
        Some(unsafe { b.stream.alloc::<f32>(splits * voxels * shape.cout) }.map_err(driver)?)
    } else {
        None
    };
    if let Some(g) = &mut grid {
        g.grid_dim.2 = splits as u32;
    }
    let launch = ConvLaunch {
        name: &name,
        x,
        weight,
        bias: &conv.bias,
        extra: &extra,
        blocks: grid,
        f16_inputs: E::TENSOR_CORES.then(|| F16ConvInputs {
            second: second.unwrap_or(x),
            first_channels: first_channels as i64,
            norm_partials: if splits > 1 { None } else { partials.as_mut() },
            split_sums: split_sums.as_mut(),
        }),
    };
    let mut y = launch_conv(b, launch, shape)?;
    if let (Some(sums), Some(g)) = (&split_sums, grid) {
        sum_splits(b, sums, splits, conv, &mut y, partials.as_mut(), g)?;
    }
    if let (Some(norm), Some(partials), Some(blocks)) = (norm, &partials, voxel_blocks) {
        norm::normalize_from_partials(b, &mut y, norm, partials, blocks)?;
    }
    Ok(y)
}

/// Whether the implicit GEMM takes the kernel of `shape` (its channels aside).
fn fits_igemm(shape: &shapes::ConvShape) -> bool {
    shape.kernel.iter().product::<usize>() <= IGEMM_MAX_TAPS
}

/// `x` (channels-last) and the packed `weight` with their cin channels padded by zeros to the
/// next multiple of 8, and the convolution's shape with that many input channels.
fn pad_channels<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    weight: &CudaTensor<E>,
    shape: &shapes::ConvShape,
) -> Result<(CudaTensor<E>, CudaTensor<E>, shapes::ConvShape)> {
    let (cin, padded) = (shape.cin, shape.cin.next_multiple_of(VECTOR));
    let (mut x_slot, mut w_slot) = (None, None);
    let x = layout::volume_as(b, x, &mut x_slot, Layout::ChannelsLast)?;
    let weight = layout::packed_weights(b, weight, &mut w_slot)?;
    let voxels: usize = shape.dims.iter().product();
    let taps: usize = shape.kernel.iter().product();
    let [z, y, w] = shape.dims;
    let [kz, ky, kx] = shape.kernel;
    let x = layout::pad_inner_axis(
        b,
        x,
        [voxels, cin, padded],
        vec![padded, z, y, w],
        Layout::ChannelsLast,
    )?;
    let weight = layout::pad_inner_axis(
        b,
        weight,
        [shape.cout * taps, cin, padded],
        vec![shape.cout, padded, kz, ky, kx],
        Layout::PackedWeights,
    )?;
    Ok((
        x,
        weight,
        shapes::ConvShape {
            cin: padded,
            ..*shape
        },
    ))
}

/// The f16 convolutions index an input's and an output's voxels in 32 bits (kernels/conv.cu's
/// `Window`) and the implicit GEMM its weights' values in unsigned 32 bits: a volume of 2³¹
/// voxels or more (8 GB of f32 a channel), or a weight of 2³² values or more, is refused by name.
fn check_index_widths(shape: &shapes::ConvShape) -> Result<()> {
    let largest = shape
        .dims
        .iter()
        .product::<usize>()
        .max(shape.out_dims.iter().product());
    if largest > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "conv3d of input {:?} to output {:?}: the f16 kernels take volumes of at most {} voxels",
            shape.dims,
            shape.out_dims,
            i32::MAX
        )));
    }
    let [kz, ky, kx] = shape.kernel;
    let weights = [shape.cout, shape.cin, kz, ky, kx];
    if weights.iter().product::<usize>() > u32::MAX as usize {
        return Err(Error::Shape(format!(
            "conv3d weight {weights:?}: the f16 kernels take weights of at most {} values",
            u32::MAX
        )));
    }
    Ok(())
}

/// How many parts the 64 × 64 implicit GEMM splits its K loop into: where its blocks would
/// leave most multiprocessors idle (a plan's deepest stages: 20 to 80 blocks on an H100's 132),
/// enough parts for about two blocks per multiprocessor, each with at least 8 steps of 32 of K
/// (4 of the wgmma path's steps of 64), at most 16.
fn k_splits(grid: (u32, u32, u32), k: usize, multiprocessors: usize) -> usize {
    let blocks = grid.0 as usize * grid.1 as usize;
    if blocks >= multiprocessors {
        return 1;
    }
    (2 * multiprocessors)
        .div_ceil(blocks)
        .min(k.div_ceil(32) / 8)
        .clamp(1, 16)
}

/// The split-K convolution's epilogue (`conv3d_split_sum_f16`) over the unsplit grid's tiles:
/// the splits' sums added up, the bias, the f16 store into y, and InstanceNorm's partials where
/// asked for.
fn sum_splits<E: Element>(
    b: &CudaBackend<E>,
    sums: &CudaSlice<f32>,
    splits: usize,
    conv: &Conv3d<CudaTensor<E>>,
    y: &mut CudaTensor<E>,
    partials: Option<&mut CudaSlice<f64>>,
    grid: LaunchConfig,
) -> Result<()> {
    let f = b.function(MODULE, "conv3d_split_sum_f16")?;
    let (m, n) = (
        y.shape[1..].iter().product::<usize>() as i64,
        y.shape[0] as i64,
    );
    let splits = splits as i64;
    let mut launch = b.launch_builder(&f);
    launch.arg(sums).arg(&splits);
    push_bias(&mut launch, &conv.bias);
    launch.arg(&mut y.data).arg(&m).arg(&n);
    match partials {
        Some(partials) => launch.arg(partials),
        None => launch.arg(&NULL),
    };
    let grid = LaunchConfig {
        grid_dim: (grid.grid_dim.0, grid.grid_dim.1, 1),
        ..grid
    };
    // SAFETY: matches `conv3d_split_sum_f16`: sums holds splits × m × n values, y m × n
    // (channels-last), the partials two per channel and voxel block of the same 64 × 64 grid.
    unsafe { launch.launch(grid) }.map_err(driver)?;
    Ok(())
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
/// With f16 the convolution's epilogue gathers the normalisation's statistics, so the
/// output is read once more (to normalise it) instead of twice.
pub fn conv_norm_leaky_relu<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    second: Option<&CudaTensor<E>>,
    conv: &Conv3d<CudaTensor<E>>,
    norm: &InstanceNorm<CudaTensor<E>>,
) -> Result<CudaTensor<E>> {
    if !E::TENSOR_CORES {
        // The f32 kernel, one thread per output value, has no epilogue to gather them in.
        return conv_then_norm(b, x, second, conv, norm);
    }
    let shape = match second {
        Some(second) => shapes::conv3d_on_concat(x, second, conv)?,
        None => shapes::conv3d(x, conv)?,
    };
    conv3d_of(b, x, second, conv, &shape, Some(norm))
}

pub fn conv_transpose3d<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    conv: &ConvTranspose3d<CudaTensor<E>>,
) -> Result<CudaTensor<E>> {
    let shape = shapes::conv_transpose3d(x, conv)?;
    let extra = [Dims3::from(conv.stride)];
    let (name, blocks) = if E::TENSOR_CORES {
        let (voxels, taps) = (
            shape.dims.iter().product(),
            conv.stride.iter().product::<usize>(),
        );
        let grid = GEMM_64X64.grid(voxels, shape.cout * taps);
        ("conv_transpose3d_mma_f16".to_string(), Some(grid))
    } else {
        (format!("conv_transpose3d_{}", E::SUFFIX), None)
    };
    let launch = ConvLaunch {
        name: &name,
        x,
        weight: &conv.weight,
        bias: &conv.bias,
        extra: &extra,
        blocks,
        f16_inputs: None,
    };
    launch_conv(b, launch, &shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(dims: [usize; 3], out_dims: [usize; 3]) -> shapes::ConvShape {
        shapes::ConvShape {
            cin: 8,
            dims,
            cout: 8,
            out_dims,
            kernel: [3, 3, 3],
        }
    }

    #[test]
    fn volumes_past_32_bit_voxel_indices_are_refused_by_name() {
        assert!(check_index_widths(&shape([1024, 1024, 2047], [1024, 1024, 2047])).is_ok());
        let huge = [1024, 1024, 2048];
        for s in [shape(huge, [512, 512, 1024]), shape([8, 8, 8], huge)] {
            let message = check_index_widths(&s).unwrap_err().to_string();
            assert!(message.contains("[1024, 1024, 2048]"), "{message}");
            assert!(message.contains("2147483647 voxels"), "{message}");
        }
    }

    #[test]
    fn weights_past_32_bit_offsets_are_refused_by_name() {
        let fits = shapes::ConvShape {
            cin: 4096,
            cout: 38832,
            ..shape([8, 8, 8], [8, 8, 8])
        };
        assert!(check_index_widths(&fits).is_ok()); // 38832 · 4096 · 27 < 2³²
        let too_many = shapes::ConvShape {
            cout: 38840,
            ..fits
        };
        let message = check_index_widths(&too_many).unwrap_err().to_string();
        assert!(
            message.contains("[38840, 4096, 3, 3, 3]") && message.contains("4294967295 values"),
            "{message}"
        );
    }
}
