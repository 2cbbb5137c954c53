//! Data movement and per-voxel ops on the CPU: crops, flips, the sliding window's weighted
//! accumulation, softmax and argmax over channels, tokens of a region, the trilinear positional
//! encoding, row gathers. Work is split over channels or over blocks of voxels.

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::backend::shapes;
use crate::error::Result;
use crate::geometry::{Label, Region};
use crate::tensor::Tensor;

/// Voxels per task for per-voxel work.
pub(super) const VOXEL_BLOCK: usize = 4096;

/// Calls `f(z, y, row)` for each (z, y) line of `region` in a grid of `dims`, `row` the range of
/// flat indices of that line.
fn for_each_line(dims: [usize; 3], region: &Region, mut f: impl FnMut(std::ops::Range<usize>)) {
    for z in region.start[0]..region.stop()[0] {
        for y in region.start[1]..region.stop()[1] {
            let first = (z * dims[1] + y) * dims[2] + region.start[2];
            f(first..first + region.size[2]);
        }
    }
}

pub fn crop(x: &Tensor, region: &Region) -> Result<Tensor> {
    let (channels, dims) = shapes::crop(x, region)?;
    let voxels: usize = dims.iter().product();
    let mut out = Vec::with_capacity(channels * region.voxels());
    for channel in x.data().chunks_exact(voxels) {
        for_each_line(dims, region, |line| out.extend_from_slice(&channel[line]));
    }
    Tensor::new(
        vec![channels, region.size[0], region.size[1], region.size[2]],
        out,
    )
}

pub fn flip(x: &Tensor, axes: &[usize]) -> Result<Tensor> {
    let (_, dims) = shapes::volume(x, "flip")?;
    let flipped = shapes::flip_axes(axes)?;
    let voxels: usize = dims.iter().product();
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(voxels)
        .zip(x.data().par_chunks(voxels))
        .for_each(|(dest, src)| {
            for z in 0..dims[0] {
                let zs = if flipped[0] { dims[0] - 1 - z } else { z };
                for y in 0..dims[1] {
                    let ys = if flipped[1] { dims[1] - 1 - y } else { y };
                    let d = &mut dest[(z * dims[1] + y) * dims[2]..][..dims[2]];
                    let s = &src[(zs * dims[1] + ys) * dims[2]..][..dims[2]];
                    d.copy_from_slice(s);
                    if flipped[2] {
                        d.reverse();
                    }
                }
            }
        });
    Tensor::new(x.shape().to_vec(), out)
}

pub fn concat_channels(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let shape = shapes::concat(a, b)?;
    let mut data = Vec::with_capacity(a.len() + b.len());
    data.extend_from_slice(a.data());
    data.extend_from_slice(b.data());
    Tensor::new(shape.to_vec(), data)
}

pub fn add_assign(acc: &mut Tensor, x: &Tensor) -> Result<()> {
    shapes::same(acc, x, "add")?;
    acc.data_mut()
        .par_chunks_mut(VOXEL_BLOCK)
        .zip(x.data().par_chunks(VOXEL_BLOCK))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
    Ok(())
}

pub fn scale(x: &mut Tensor, factor: f32) {
    x.data_mut()
        .par_chunks_mut(VOXEL_BLOCK)
        .for_each(|block| block.iter_mut().for_each(|v| *v *= factor));
}

pub fn accumulate_weighted(
    acc: &mut Tensor,
    tile: &Tensor,
    weights: &Tensor,
    region: &Region,
) -> Result<()> {
    let (_, dims) = shapes::accumulate(acc, tile, weights, region)?;
    let voxels: usize = dims.iter().product();
    let w = weights.data();
    acc.data_mut()
        .par_chunks_mut(voxels)
        .zip(tile.data().par_chunks(region.voxels()))
        .for_each(|(channel, src)| {
            let mut offset = 0;
            for_each_line(dims, region, |line| {
                let n = line.len();
                let (s, wl) = (&src[offset..offset + n], &w[offset..offset + n]);
                channel[line]
                    .iter_mut()
                    .zip(s.iter().zip(wl))
                    .for_each(|(a, (v, g))| *a += v * g);
                offset += n;
            });
        });
    Ok(())
}

pub fn divide_by_weights(x: &mut Tensor, weight_sum: &Tensor) -> Result<()> {
    let (_, voxels) = shapes::weight_sum(x, weight_sum)?;
    x.data_mut().par_chunks_mut(voxels).for_each(|channel| {
        channel
            .iter_mut()
            .zip(weight_sum.data())
            .for_each(|(v, w)| *v /= w);
    });
    Ok(())
}

pub fn softmax_channels(x: &Tensor) -> Result<Tensor> {
    let (channels, dims) = shapes::volume(x, "softmax_channels")?;
    let voxels: usize = dims.iter().product();
    let src = x.data();
    // Per voxel: the maximum and the sum of exponentials over the channels.
    let mut max = vec![f32::NEG_INFINITY; voxels];
    let mut sum = vec![0f32; voxels];
    max.par_chunks_mut(VOXEL_BLOCK)
        .zip(sum.par_chunks_mut(VOXEL_BLOCK))
        .enumerate()
        .for_each(|(block, (m, s))| {
            let v0 = block * VOXEL_BLOCK;
            for c in 0..channels {
                let row = &src[c * voxels + v0..][..m.len()];
                m.iter_mut().zip(row).for_each(|(m, &v)| *m = m.max(v));
            }
            for c in 0..channels {
                let row = &src[c * voxels + v0..][..m.len()];
                s.iter_mut()
                    .zip(row.iter().zip(m.iter()))
                    .for_each(|(s, (&v, &m))| *s += (v - m).exp());
            }
        });
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(voxels)
        .zip(src.par_chunks(voxels))
        .for_each(|(dest, row)| {
            for (i, d) in dest.iter_mut().enumerate() {
                *d = (row[i] - max[i]).exp() / sum[i];
            }
        });
    Tensor::new(x.shape().to_vec(), out)
}

pub fn argmax_channels(x: &Tensor) -> Result<Vec<Label>> {
    argmax_channels_with(x, |src, dst| dst.copy_from_slice(src))
}

/// Per voxel, the channel with the greatest value once `values(block, out)` has mapped each
/// block of a channel's values (at most VOXEL_BLOCK), the first channel on ties.
pub fn argmax_channels_with(
    x: &Tensor,
    values: impl Fn(&[f32], &mut [f32]) + Sync,
) -> Result<Vec<Label>> {
    let (channels, dims) = shapes::volume(x, "argmax_channels")?;
    shapes::label_classes(channels)?;
    let voxels: usize = dims.iter().product();
    let src = x.data();
    let mut labels = vec![0 as Label; voxels];
    labels
        .par_chunks_mut(VOXEL_BLOCK)
        .enumerate()
        .for_each_init(
            || (vec![0f32; VOXEL_BLOCK], vec![0f32; VOXEL_BLOCK]),
            |(best, row), (block, dest)| {
                let (v0, n) = (block * VOXEL_BLOCK, dest.len());
                values(&src[v0..v0 + n], &mut best[..n]);
                for c in 1..channels {
                    values(&src[c * voxels + v0..][..n], &mut row[..n]);
                    for ((l, b), &v) in dest.iter_mut().zip(best.iter_mut()).zip(&row[..n]) {
                        if v > *b {
                            *b = v;
                            *l = c as Label;
                        }
                    }
                }
            },
        );
    Ok(labels)
}

/// dst = src rounded to f16 and back, by `half`'s vectorised slice conversions (F16C where the
/// CPU has it), VOXEL_BLOCK values at a time.
pub fn round_to_f16(src: &[f32], dst: &mut [f32]) {
    let mut halves = [half::f16::ZERO; VOXEL_BLOCK];
    for (s, d) in src.chunks(VOXEL_BLOCK).zip(dst.chunks_mut(VOXEL_BLOCK)) {
        let h = &mut halves[..s.len()];
        h.convert_from_f32_slice(s);
        h.convert_to_f32_slice(d);
    }
}

pub fn argmax_rows(x: &Tensor) -> Result<Vec<Label>> {
    let (_, classes) = shapes::tokens(x, "argmax_rows")?;
    shapes::label_classes(classes)?;
    Ok(x.data()
        .par_chunks(classes)
        .map(|row| {
            let mut best = 0;
            for (c, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = c;
                }
            }
            best as Label
        })
        .collect())
}

pub fn region_tokens(volume: &Tensor, region: &Region) -> Result<Tensor> {
    let (channels, dims) = shapes::crop(volume, region)?;
    let voxels: usize = dims.iter().product();
    let [_, ry, rx] = region.size;
    let src = volume.data();
    let mut out = vec![0f32; region.voxels() * channels];
    out.par_chunks_mut(channels)
        .enumerate()
        .for_each(|(n, token)| {
            let (z, y, x) = (n / (ry * rx), (n / rx) % ry, n % rx);
            let v = ((region.start[0] + z) * dims[1] + region.start[1] + y) * dims[2]
                + region.start[2]
                + x;
            for (c, t) in token.iter_mut().enumerate() {
                *t = src[c * voxels + v];
            }
        });
    Tensor::new(vec![region.voxels(), channels], out)
}

/// Source index and weight of the upper neighbour for a resize with align_corners = True, as
/// PyTorch computes them (scale in f32, index clamped to the input).
fn align_corners_taps(input: usize, output: usize) -> Vec<(usize, usize, f32)> {
    let scale = if output > 1 {
        (input - 1) as f32 / (output - 1) as f32
    } else {
        0.0
    };
    (0..output)
        .map(|o| {
            let real = scale * o as f32;
            let i0 = (real as usize).min(input - 1);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            let lambda = (real - i0 as f32).clamp(0.0, 1.0);
            (i0, i1, lambda)
        })
        .collect()
}

pub fn add_positional_encoding(x: &mut Tensor, grid: &Tensor, shape: [usize; 3]) -> Result<()> {
    let (width, gdims) = shapes::positional(x, grid, shape)?;
    let taps = [0, 1, 2].map(|a| align_corners_taps(gdims[a], shape[a]));
    let g = grid.data();
    let plane = gdims[1] * gdims[2];
    let cell = gdims.iter().product::<usize>();
    x.data_mut()
        .par_chunks_mut(width)
        .enumerate()
        .for_each(|(n, token)| {
            let (tz, ty, tx) = (
                taps[0][n / (shape[1] * shape[2])],
                taps[1][(n / shape[2]) % shape[1]],
                taps[2][n % shape[2]],
            );
            let at = |z: usize, y: usize, x: usize| z * plane + y * gdims[2] + x;
            for (c, t) in token.iter_mut().enumerate() {
                let gc = &g[c * cell..(c + 1) * cell];
                let lerp_x = |z, y| (1.0 - tx.2) * gc[at(z, y, tx.0)] + tx.2 * gc[at(z, y, tx.1)];
                let lerp_y = |z| (1.0 - ty.2) * lerp_x(z, ty.0) + ty.2 * lerp_x(z, ty.1);
                *t += (1.0 - tz.2) * lerp_y(tz.0) + tz.2 * lerp_y(tz.1);
            }
        });
    Ok(())
}

pub fn gather_rows(x: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let (_, width) = shapes::gather_rows(x, rows)?;
    let mut out = Vec::with_capacity(rows.len() * width);
    for &r in rows {
        out.extend_from_slice(&x.data()[r * width..(r + 1) * width]);
    }
    Tensor::new(vec![rows.len(), width], out)
}
