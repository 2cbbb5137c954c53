//! Launches of kernels/volume.cu: crops, flips, the sliding window's accumulation, softmax and
//! argmax over channels, region tokens, the positional encoding, row gathers. Volumes are read
//! channels-first (the f16 network's channels-last outputs are converted on the way in).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{CudaBackend, CudaTensor, Dims3, Element, Layout, driver, layout};
use crate::backend::shapes;
use crate::error::{Error, Result};
use crate::geometry::{Label, Region};

const MODULE: &str = "volume";

/// Runs a kernel of signature (volume, out, channels, dims, start, size) over the voxels of
/// `region` (`crop_*`, `region_tokens_*`) into `out`, on the grid `grid(channels)`.
fn launch_over_region<E: Element>(
    b: &CudaBackend<E>,
    kernel: &str,
    volume: &CudaTensor<E>,
    region: &Region,
    mut out: CudaTensor<E>,
    grid: impl Fn(usize) -> LaunchConfig,
) -> Result<CudaTensor<E>> {
    let mut slot = None;
    let volume = layout::volume_as(b, volume, &mut slot, Layout::Standard)?;
    let (channels, dims) = shapes::crop(volume, region)?;
    let f = b.kernel(MODULE, kernel)?;
    let c = channels as i64;
    let [d, start, size] = [dims, region.start, region.size].map(Dims3::from);
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&volume.data)
        .arg(&mut out.data)
        .arg(&c)
        .arg(&d)
        .arg(&start)
        .arg(&size);
    // SAFETY: argument types and order match `crop_*` and `region_tokens_*` in
    // kernels/volume.cu; the region lies inside the volume (checked) and `out` holds
    // channels × region voxels values.
    unsafe { launch.launch(grid(channels)) }.map_err(driver)?;
    Ok(out)
}

pub fn crop<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    region: &Region,
) -> Result<CudaTensor<E>> {
    let (channels, _) = shapes::crop(x, region)?;
    let s = region.size;
    let out = b.output(vec![channels, s[0], s[1], s[2]])?;
    launch_over_region(b, "crop", x, region, out, |channels| {
        b.elementwise(channels * region.voxels())
    })
}

pub fn flip<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    axes: &[usize],
) -> Result<CudaTensor<E>> {
    let mut slot = None;
    let x = layout::volume_as(b, x, &mut slot, Layout::Standard)?;
    let (channels, dims) = shapes::volume(x, "flip")?;
    let flipped = shapes::flip_axes(axes)?.map(i32::from);
    let mut y = b.output(x.shape.clone())?;
    let f = b.kernel(MODULE, "flip")?;
    let (c, d) = (channels as i64, Dims3::from(dims));
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&x.data)
        .arg(&mut y.data)
        .arg(&c)
        .arg(&d)
        .arg(&flipped[0])
        .arg(&flipped[1])
        .arg(&flipped[2]);
    // SAFETY: matches `flip_*`; y has x's shape.
    unsafe { launch.launch(b.elementwise(shapes::numel(x))) }.map_err(driver)?;
    Ok(y)
}

pub fn concat_channels<E: Element>(
    b: &CudaBackend<E>,
    a: &CudaTensor<E>,
    c: &CudaTensor<E>,
) -> Result<CudaTensor<E>> {
    let (mut slot_a, mut slot_c) = (None, None);
    let a = layout::volume_as(b, a, &mut slot_a, Layout::Standard)?;
    let c = layout::volume_as(b, c, &mut slot_c, Layout::Standard)?;
    let shape = shapes::concat(a, c)?;
    let (na, nc) = (shapes::numel(a), shapes::numel(c));
    let mut y = b.output(shape.to_vec())?;
    b.stream
        .memcpy_dtod(&a.data.slice(..na), &mut y.data.slice_mut(..na))
        .map_err(driver)?;
    b.stream
        .memcpy_dtod(&c.data.slice(..nc), &mut y.data.slice_mut(na..na + nc))
        .map_err(driver)?;
    Ok(y)
}

pub fn add_assign<E: Element>(
    b: &CudaBackend<E>,
    acc: &mut CudaTensor<E>,
    x: &CudaTensor<E>,
) -> Result<()> {
    layout::make_channels_first(b, acc)?;
    let mut slot = None;
    let x = layout::volume_as(b, x, &mut slot, Layout::Standard)?;
    shapes::same(acc, x, "add")?;
    let n = shapes::numel(x) as i64;
    let f = b.kernel(MODULE, "add_assign")?;
    let mut launch = b.launch_builder(&f);
    launch.arg(&mut acc.data).arg(&x.data).arg(&n);
    // SAFETY: matches `add_assign_*`; both hold n values.
    unsafe { launch.launch(b.elementwise(n as usize)) }.map_err(driver)?;
    Ok(())
}

pub fn scale<E: Element>(b: &CudaBackend<E>, x: &mut CudaTensor<E>, factor: f32) -> Result<()> {
    let n = shapes::numel(x) as i64;
    let f = b.kernel(MODULE, "scale")?;
    let mut launch = b.launch_builder(&f);
    launch.arg(&mut x.data).arg(&n).arg(&factor);
    // SAFETY: matches `scale_*`.
    unsafe { launch.launch(b.elementwise(n as usize)) }.map_err(driver)?;
    Ok(())
}

pub fn accumulate_weighted<E: Element>(
    b: &CudaBackend<E>,
    acc: &mut CudaTensor<f32>,
    tile: &CudaTensor<E>,
    weights: &CudaTensor<E>,
    region: &Region,
) -> Result<()> {
    let mut slot = None;
    let tile = layout::volume_as(b, tile, &mut slot, Layout::Standard)?;
    let (channels, dims) = shapes::accumulate(acc, tile, weights, region)?;
    let f = b.kernel(MODULE, "accumulate_weighted")?;
    let (c, d, start, size) = (
        channels as i64,
        Dims3::from(dims),
        Dims3::from(region.start),
        Dims3::from(region.size),
    );
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&mut acc.data)
        .arg(&tile.data)
        .arg(&weights.data)
        .arg(&c)
        .arg(&d)
        .arg(&start)
        .arg(&size);
    // SAFETY: matches `accumulate_weighted_*`; the region lies inside acc (checked).
    unsafe { launch.launch(b.elementwise(channels * region.voxels())) }.map_err(driver)?;
    Ok(())
}

pub fn divide_by_weights<E: Element>(
    b: &CudaBackend<E>,
    acc: CudaTensor<f32>,
    weight_sum: &CudaTensor<f32>,
) -> Result<CudaTensor<E>> {
    let (channels, voxels) = shapes::weight_sum(&acc, weight_sum)?;
    let mut y = b.output(acc.shape.clone())?;
    let f = b.kernel(MODULE, "divide_by_weights")?;
    let (c, v) = (channels as i64, voxels as i64);
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&acc.data)
        .arg(&weight_sum.data)
        .arg(&mut y.data)
        .arg(&c)
        .arg(&v);
    // SAFETY: matches `divide_by_weights_*`; acc and y hold channels × voxels values, weight_sum
    // voxels.
    unsafe { launch.launch(b.elementwise(channels * voxels)) }.map_err(driver)?;
    Ok(y)
}

pub fn softmax_channels<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
) -> Result<CudaTensor<E>> {
    let mut slot = None;
    let x = layout::volume_as(b, x, &mut slot, Layout::Standard)?;
    let (channels, dims) = shapes::volume(x, "softmax_channels")?;
    let voxels: usize = dims.iter().product();
    let mut y = b.output(x.shape.clone())?;
    let f = b.kernel(MODULE, "softmax_channels")?;
    let (c, v) = (channels as i64, voxels as i64);
    let mut launch = b.launch_builder(&f);
    launch.arg(&x.data).arg(&mut y.data).arg(&c).arg(&v);
    // SAFETY: matches `softmax_channels_*`.
    unsafe { launch.launch(b.elementwise(voxels)) }.map_err(driver)?;
    Ok(y)
}

/// Runs an argmax kernel, `(x, labels, classes, items)`, and brings the labels to the host.
fn labels<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    kernel: &str,
    items: usize,
    classes: usize,
) -> Result<Vec<Label>> {
    shapes::label_classes(classes)?;
    let mut out = b.scratch::<u16>(items)?;
    let f = b.kernel(MODULE, kernel)?;
    let (n, c) = (items as i64, classes as i64);
    let mut launch = b.launch_builder(&f);
    launch.arg(&x.data).arg(&mut out).arg(&c).arg(&n);
    // SAFETY: matches `argmax_channels_*` / `argmax_rows_*`; out holds one label per item.
    unsafe { launch.launch(b.elementwise(items)) }.map_err(driver)?;
    let mut labels = b.download_labels(&out)?;
    labels.truncate(items);
    Ok(labels)
}

pub fn argmax_channels<E: Element>(b: &CudaBackend<E>, x: &CudaTensor<E>) -> Result<Vec<Label>> {
    let mut slot = None;
    let x = layout::volume_as(b, x, &mut slot, Layout::Standard)?;
    let (channels, dims) = shapes::volume(x, "argmax_channels")?;
    labels(b, x, "argmax_channels", dims.iter().product(), channels)
}

pub fn argmax_rows<E: Element>(b: &CudaBackend<E>, x: &CudaTensor<E>) -> Result<Vec<Label>> {
    let (rows, classes) = shapes::tokens(x, "argmax_rows")?;
    labels(b, x, "argmax_rows", rows, classes)
}

pub fn region_tokens<E: Element>(
    b: &CudaBackend<E>,
    volume: &CudaTensor<E>,
    region: &Region,
) -> Result<CudaTensor<E>> {
    let (channels, _) = shapes::crop(volume, region)?;
    let out = b.output(vec![region.voxels(), channels])?;
    // Tiles of 32 tokens along x × 32 channels (TRANSPOSE_TILE), blocks of 32 × 8 threads.
    let [z, y, x] = region.size;
    let tiles = z * y * x.div_ceil(layout::TRANSPOSE_TILE);
    let channel_tiles = channels.div_ceil(layout::TRANSPOSE_TILE);
    if tiles > i32::MAX as usize || channel_tiles > 65535 {
        return Err(Error::Shape(format!(
            "the tokens of {channels} channels over {region:?} are too many for one launch"
        )));
    }
    launch_over_region(b, "region_tokens", volume, region, out, |_| LaunchConfig {
        grid_dim: (tiles as u32, channel_tiles as u32, 1),
        block_dim: (layout::TRANSPOSE_TILE as u32, 8, 1),
        shared_mem_bytes: 0,
    })
}

pub fn add_positional_encoding<E: Element>(
    b: &CudaBackend<E>,
    x: &mut CudaTensor<E>,
    grid: &CudaTensor<E>,
    shape: [usize; 3],
) -> Result<()> {
    let (width, gdims) = shapes::positional(x, grid, shape)?;
    let tokens: usize = shape.iter().product();
    // The kernel reads the grid channels-last (a small transpose: d × 512 values for TIS-B).
    let mut slot = None;
    let grid = layout::volume_as(b, grid, &mut slot, Layout::ChannelsLast)?;
    let f = b.kernel(MODULE, "add_positional_encoding")?;
    let (w, g, s) = (width as i64, Dims3::from(gdims), Dims3::from(shape));
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&mut x.data)
        .arg(&grid.data)
        .arg(&w)
        .arg(&g)
        .arg(&s);
    // SAFETY: matches `add_positional_encoding_*` (a warp per token).
    unsafe { launch.launch(b.elementwise(32 * tokens)) }.map_err(driver)?;
    Ok(())
}

pub fn gather_rows<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    rows: &[usize],
) -> Result<CudaTensor<E>> {
    let (_, width) = shapes::gather_rows(x, rows)?;
    let mut y = b.output(vec![rows.len(), width])?;
    if rows.is_empty() {
        return Ok(y);
    }
    let indices: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    let indices = b.stream.clone_htod(&indices).map_err(driver)?;
    let f = b.kernel(MODULE, "gather_rows")?;
    let (n, w) = (rows.len() as i64, width as i64);
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&x.data)
        .arg(&indices)
        .arg(&mut y.data)
        .arg(&n)
        .arg(&w);
    // SAFETY: matches `gather_rows_*`; every index is below the row count (checked).
    unsafe { launch.launch(b.elementwise(rows.len() * width)) }.map_err(driver)?;
    Ok(y)
}
