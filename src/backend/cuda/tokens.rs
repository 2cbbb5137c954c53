//! Launches of kernels/tokens.cu: the head's input tokens (gather, input projection, positional
//! encoding) in one pass.

use cudarc::driver::PushKernelArg;

use super::{CudaBackend, CudaTensor, Dims3, Element, Layout, driver, layout};
use crate::backend::{Linear, input_tokens_in_parts, shapes};
use crate::error::Result;
use crate::geometry::Region;

const MODULE: &str = "tokens";
/// The widest features the one-pass kernel gathers (its shared rows grow with them).
const MAX_FEATURES: usize = 128;

/// `Backend::input_tokens`: one launch of `input_tokens_f16_{width}` where the storage is f16,
/// the width is one of the fused kernels' and the features at most 128 channels, else the
/// trait's three ops.
pub fn input_tokens<E: Element>(
    b: &CudaBackend<E>,
    features: &CudaTensor<E>,
    roi: &Region,
    projection: &Linear<CudaTensor<E>>,
    pos_grid: &CudaTensor<E>,
) -> Result<CudaTensor<E>> {
    let (channels, dims, width, grid_dims) =
        shapes::input_tokens(features, roi, projection, pos_grid)?;
    if !CudaBackend::<E>::fused_head_width(width) || channels > MAX_FEATURES {
        return input_tokens_in_parts(b, features, roi, projection, pos_grid);
    }
    let mut slots = (None, None);
    let features = layout::volume_as(b, features, &mut slots.0, Layout::Standard)?;
    let grid = layout::volume_as(b, pos_grid, &mut slots.1, Layout::ChannelsLast)?;
    let tokens = roi.voxels();
    let mut x = b.output(vec![tokens, width])?;
    if tokens == 0 {
        return Ok(x);
    }
    let k_padded = channels.next_multiple_of(16);
    let name = format!("input_tokens_f16_{width}");
    let f = b.function(MODULE, &name)?;
    // The gathered rows and W_in, each k_padded + 8 halves a row (kernels/tokens.cu).
    let launch_grid = b.fused_launch(&name, &f, tokens, |rows| {
        2 * (rows + width) * (k_padded + 8)
    })?;
    let (c, k) = (channels as i32, k_padded as i32);
    let [d, start, size, g] = [dims, roi.start, roi.size, grid_dims].map(Dims3::from);
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&features.data)
        .arg(&projection.weight.data)
        .arg(&projection.bias.data)
        .arg(&grid.data)
        .arg(&mut x.data);
    launch
        .arg(&c)
        .arg(&k)
        .arg(&d)
        .arg(&start)
        .arg(&size)
        .arg(&g);
    // SAFETY: matches `input_tokens_f16_*`'s arguments in order; the storage is f16
    // (fused_head_width); shapes::input_tokens checked the region inside the features, W_in
    // width × channels and the grid width channels (channels-last, as the kernel reads it); x
    // holds the region's tokens × width values, and the shared memory is what the kernel lays
    // out for its rows.
    unsafe { launch.launch(launch_grid) }.map_err(driver)?;
    Ok(x)
}
