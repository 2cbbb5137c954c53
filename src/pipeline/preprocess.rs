//! nnU-Net's preprocessing of an image onto the model's grid, and the way back
//! (nnunet-inference.md §3.2, §3.4): transpose, crop to the box of the (hole-filled) non-zero
//! mask, per-channel normalisation from the plans, resampling to the target spacing; and for
//! labels, the crop and transpose reverted. Voxel positions map between the image and the grid
//! by nearest neighbour (`floor((i + 0.5)·to/from)`, nnU-Net's order-0 rule).

use std::collections::VecDeque;

use rayon::prelude::*;
use serde_json::Value;

use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::error::{Error, Result, bytes_in_words};
use crate::geometry::{Label, Region};
use crate::model::ModelInfo;
use crate::pipeline::resample::{Resampling, new_shape};
use crate::tensor::Tensor;

/// An image on the model's grid, and what is needed to map positions and labels back.
pub struct Preprocessed {
    /// C × grid, normalised.
    pub volume: Tensor,
    /// Where the cropped region lies in the transposed image (the non-zero box).
    pub crop: Region,
    /// The image's shape after transposition, before cropping.
    pub transposed_shape: [usize; 3],
    pub transpose_forward: [usize; 3],
    /// The image's spacing in transposed axis order (mm).
    pub spacing: [f64; 3],
    /// The model's spacing (mm), that of the grid.
    pub target_spacing: [f64; 3],
}

fn permute<T: Copy>(shape: [T; 3], order: [usize; 3]) -> [T; 3] {
    order.map(|a| shape[a])
}

/// Reorders the spatial axes of `channels` C-order volumes of `dims`: output axis i is input
/// axis order[i]. Returns the data and the new dims.
fn transpose_axes<T: Copy>(
    data: &[T],
    channels: usize,
    dims: [usize; 3],
    order: [usize; 3],
) -> (Vec<T>, [usize; 3]) {
    let out_dims = permute(dims, order);
    if order == [0, 1, 2] {
        return (data.to_vec(), out_dims);
    }
    let strides = permute([dims[1] * dims[2], dims[2], 1], order);
    let voxels: usize = dims.iter().product();
    let mut out = Vec::with_capacity(data.len());
    for src in data.chunks_exact(voxels).take(channels) {
        for i in 0..out_dims[0] {
            for j in 0..out_dims[1] {
                let base = i * strides[0] + j * strides[1];
                out.extend((0..out_dims[2]).map(|k| src[base + k * strides[2]]));
            }
        }
    }
    (out, out_dims)
}

/// A C × Z × Y × X volume with its spatial axes reordered by `order`.
fn transpose(volume: &Tensor, order: [usize; 3]) -> Result<Tensor> {
    let s = volume.shape();
    let (data, dims) = transpose_axes(volume.data(), s[0], [s[1], s[2], s[3]], order);
    Tensor::new(vec![s[0], dims[0], dims[1], dims[2]], data)
}

/// Index along an axis of `to` samples nearest to sample `i` of `from` (pixel centres aligned).
pub fn nearest_index(i: usize, from: usize, to: usize) -> usize {
    (((i as f64 + 0.5) * to as f64 / from as f64).floor() as usize).min(to - 1)
}

/// `scipy.ndimage.binary_fill_holes` with its default (6-connected) structure: every false voxel
/// not connected to the border through false voxels becomes true.
pub fn fill_holes(mask: &[bool], dims: [usize; 3]) -> Vec<bool> {
    let [nz, ny, nx] = dims;
    let mut outside = vec![false; mask.len()];
    let mut queue = VecDeque::new();
    let index = |z: usize, y: usize, x: usize| (z * ny + y) * nx + x;
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let border =
                    z == 0 || y == 0 || x == 0 || z + 1 == nz || y + 1 == ny || x + 1 == nx;
                let v = index(z, y, x);
                if border && !mask[v] && !outside[v] {
                    outside[v] = true;
                    queue.push_back((z, y, x));
                }
            }
        }
    }
    while let Some((z, y, x)) = queue.pop_front() {
        let neighbours = [
            (z > 0).then(|| (z - 1, y, x)),
            (z + 1 < nz).then_some((z + 1, y, x)),
            (y > 0).then(|| (z, y - 1, x)),
            (y + 1 < ny).then_some((z, y + 1, x)),
            (x > 0).then(|| (z, y, x - 1)),
            (x + 1 < nx).then_some((z, y, x + 1)),
        ];
        for (z, y, x) in neighbours.into_iter().flatten() {
            let v = index(z, y, x);
            if !mask[v] && !outside[v] {
                outside[v] = true;
                queue.push_back((z, y, x));
            }
        }
    }
    outside.into_iter().map(|o| !o).collect()
}

/// nnU-Net's `create_nonzero_mask`: non-zero in any channel, holes filled.
fn nonzero_mask(volume: &Tensor) -> Vec<bool> {
    let s = volume.shape();
    let dims = [s[1], s[2], s[3]];
    let voxels: usize = dims.iter().product();
    let mut mask = vec![false; voxels];
    for channel in volume.data().chunks_exact(voxels) {
        mask.iter_mut()
            .zip(channel)
            .for_each(|(m, &v)| *m |= v != 0.0);
    }
    fill_holes(&mask, dims)
}

/// The box of the true voxels (the whole grid when there are none), as `get_bbox_from_mask`.
fn mask_box(mask: &[bool], dims: [usize; 3]) -> Region {
    let mut lo = [usize::MAX; 3];
    let mut hi = [0; 3];
    // Row by row (z, y): a row's first and last true voxels bound x; any true voxel puts its z
    // and y in the box.
    for (row, values) in mask.chunks_exact(dims[2]).enumerate() {
        let (Some(first), Some(last)) = (
            values.iter().position(|&m| m),
            values.iter().rposition(|&m| m),
        ) else {
            continue;
        };
        let p = [row / dims[1], row % dims[1]];
        for a in 0..2 {
            lo[a] = lo[a].min(p[a]);
            hi[a] = hi[a].max(p[a]);
        }
        lo[2] = lo[2].min(first);
        hi[2] = hi[2].max(last);
    }
    if lo[0] == usize::MAX {
        return Region::full(dims);
    }
    Region {
        start: lo,
        size: [0, 1, 2].map(|a| hi[a] + 1 - lo[a]),
    }
}

/// The values of `mask` inside `region` of a grid of `dims`.
fn crop_mask(mask: &[bool], dims: [usize; 3], region: &Region) -> Vec<bool> {
    let mut out = Vec::with_capacity(region.voxels());
    for z in region.start[0]..region.stop()[0] {
        for y in region.start[1]..region.stop()[1] {
            let row = (z * dims[1] + y) * dims[2];
            out.extend_from_slice(&mask[row + region.start[2]..row + region.stop()[2]]);
        }
    }
    out
}

/// Foreground intensity statistic `key` of channel `c` from the plans.
fn intensity(plans: &Value, channel: usize, key: &str) -> Result<f32> {
    plans
        .get("foreground_intensity_properties_per_channel")
        .or_else(|| plans.get("foreground_intensity_properties_by_modality"))
        .and_then(|p| p.get(channel.to_string()))
        .and_then(|p| p.get(key))
        .and_then(Value::as_f64)
        .map(|v| v as f32)
        .ok_or_else(|| {
            Error::Plans(format!(
                "plans lack foreground intensity `{key}` of channel {channel}"
            ))
        })
}

/// Mean and population standard deviation of the selected values, in f64.
fn moments<'a>(values: impl Iterator<Item = &'a f32> + Clone) -> (f32, f32) {
    let (n, sum) = values
        .clone()
        .fold((0usize, 0f64), |(n, s), &v| (n + 1, s + v as f64));
    let mean = sum / n.max(1) as f64;
    let var = values.map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n.max(1) as f64;
    (mean as f32, var.sqrt() as f32)
}

/// One channel normalised in place with nnU-Net's scheme `scheme`; `mask` is the cropped,
/// hole-filled non-zero mask, used by ZScore normalisation when the plans ask for it.
fn normalize_channel(
    values: &mut [f32],
    scheme: &str,
    mask: Option<&[bool]>,
    plans: &Value,
    channel: usize,
) -> Result<()> {
    match scheme {
        "CTNormalization" => {
            let (lo, hi) = (
                intensity(plans, channel, "percentile_00_5")?,
                intensity(plans, channel, "percentile_99_5")?,
            );
            let (mean, std) = (
                intensity(plans, channel, "mean")?,
                intensity(plans, channel, "std")?,
            );
            let std = std.max(1e-8);
            values
                .par_iter_mut()
                .for_each(|v| *v = (v.clamp(lo, hi) - mean) / std);
        }
        "ZScoreNormalization" => match mask {
            Some(mask) => {
                let (mean, std) =
                    moments(values.iter().zip(mask).filter(|(_, m)| **m).map(|(v, _)| v));
                let std = std.max(1e-8);
                values
                    .iter_mut()
                    .zip(mask)
                    .filter(|(_, m)| **m)
                    .for_each(|(v, _)| *v = (*v - mean) / std);
            }
            None => {
                let (mean, std) = moments(values.iter());
                let std = std.max(1e-8);
                values.iter_mut().for_each(|v| *v = (*v - mean) / std);
            }
        },
        "NoNormalization" => {}
        "RescaleTo01Normalization" => {
            let min = values.iter().copied().fold(f32::INFINITY, f32::min);
            let max = values
                .iter()
                .map(|v| v - min)
                .fold(f32::NEG_INFINITY, f32::max)
                .max(1e-8);
            values.iter_mut().for_each(|v| *v = (*v - min) / max);
        }
        "RGBTo01Normalization" => values.iter_mut().for_each(|v| *v /= 255.0),
        other => {
            return Err(Error::Plans(format!(
                "channel {channel}: unknown normalisation scheme `{other}`"
            )));
        }
    }
    Ok(())
}

/// Refuses, with the numbers, a resampling whose f64 working buffers (input and output of each
/// axis pass, all channels) would not fit in the memory the machine has free.
fn check_resampling_memory(from: [usize; 3], to: [usize; 3], channels: usize) -> Result<()> {
    let voxels = |s: [usize; 3]| s.iter().map(|&v| v as u64).product::<u64>();
    let needed = 8
        * 2
        * channels as u64
        * voxels(from)
            .max(voxels(to))
            .max(voxels([to[0], from[1], from[2]]));
    match CpuBackend.available_memory() {
        Some(free) if free < needed => Err(Error::Shape(format!(
            "resampling {from:?} to the model's grid {to:?} needs about {}, {} are free",
            bytes_in_words(needed),
            bytes_in_words(free)
        ))),
        _ => Ok(()),
    }
}

/// Brings an image (C × Z × Y × X in file order, `spacing` in mm per axis) onto the model's grid.
pub fn preprocess(image: &Tensor, spacing: [f64; 3], info: &ModelInfo) -> Result<Preprocessed> {
    let config = &info.configuration;
    let channels = image.shape()[0];
    if channels != info.dataset.channel_names.len() {
        return Err(Error::Shape(format!(
            "the model takes {} channel(s) ({}), the image has {channels}",
            info.dataset.channel_names.len(),
            info.dataset.channel_names.join(", ")
        )));
    }
    if image.data().par_iter().any(|v| !v.is_finite()) {
        return Err(Error::Shape(
            "the image holds NaN or infinite voxels".into(),
        ));
    }
    if spacing.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(Error::Shape(format!(
            "the image's spacing {spacing:?} is not positive"
        )));
    }
    let order = config.transpose_forward;
    let transposed = transpose(image, order)?;
    let spacing = permute(spacing, order);
    let transposed_shape = [1, 2, 3].map(|a| transposed.shape()[a]);
    let mask = nonzero_mask(&transposed);
    let crop = mask_box(&mask, transposed_shape);
    let mask = crop_mask(&mask, transposed_shape, &crop);
    let mut volume = CpuBackend.crop(&transposed, &crop)?;

    let schemes = config
        .raw
        .get("normalization_schemes")
        .and_then(Value::as_array);
    let use_mask = config
        .raw
        .get("use_mask_for_norm")
        .and_then(Value::as_array);
    for (c, values) in volume
        .data_mut()
        .chunks_exact_mut(crop.voxels())
        .enumerate()
    {
        let scheme = schemes
            .and_then(|s| s.get(c))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Error::Plans(format!(
                    "plans name no normalisation scheme for channel {c}"
                ))
            })?;
        let masked = use_mask
            .and_then(|m| m.get(c))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        normalize_channel(
            values,
            scheme,
            masked.then_some(mask.as_slice()),
            &info.plans,
            c,
        )?;
    }
    let target_spacing = config.spacing;
    let shape = new_shape(crop.size, spacing, target_spacing);
    check_resampling_memory(crop.size, shape, channels)?;
    let resampling = Resampling::from_plans(&config.raw, "resampling_fn_data")?;
    let volume = resampling.apply(&volume, shape, spacing, target_spacing)?;
    Ok(Preprocessed {
        volume,
        crop,
        transposed_shape,
        transpose_forward: order,
        spacing,
        target_spacing,
    })
}

impl Preprocessed {
    /// The grid's extent.
    pub fn grid(&self) -> [usize; 3] {
        let s = self.volume.shape();
        [s[1], s[2], s[3]]
    }

    /// A voxel of the image (file order z, y, x) on the grid: None when it lies outside the
    /// cropped region (the model never saw it) or outside the image.
    pub fn image_to_grid(&self, position: [usize; 3]) -> Option<[usize; 3]> {
        let t = permute(position, self.transpose_forward);
        let grid = self.grid();
        if !Region::full(self.transposed_shape).contains(t) || !self.crop.contains(t) {
            return None;
        }
        Some(
            [0, 1, 2].map(|a| nearest_index(t[a] - self.crop.start[a], self.crop.size[a], grid[a])),
        )
    }

    /// A label map of the image (1 × Z × Y × X, file order) on the grid: transposed, cropped and
    /// sampled by nearest neighbour.
    pub fn labels_to_grid(&self, labels: &Tensor) -> Result<Vec<Label>> {
        let transposed = transpose(labels, self.transpose_forward)?;
        if transposed.shape()[1..] != self.transposed_shape {
            return Err(Error::Shape(format!(
                "label map {:?} is not on the image's grid",
                labels.shape()
            )));
        }
        let cropped = CpuBackend.crop(&transposed, &self.crop)?;
        let grid = self.grid();
        let axis = |a: usize| -> Vec<usize> {
            (0..grid[a])
                .map(|g| nearest_index(g, grid[a], self.crop.size[a]))
                .collect()
        };
        let (iz, iy, ix) = (axis(0), axis(1), axis(2));
        let c = self.crop.size;
        let mut out = Vec::with_capacity(grid.iter().product());
        for &z in &iz {
            for &y in &iy {
                out.extend(
                    ix.iter()
                        .map(|&x| cropped.data()[(z * c[1] + y) * c[2] + x] as Label),
                );
            }
        }
        Ok(out)
    }

    /// Labels of the cropped region (transposed order) back onto the whole image: crop reverted
    /// (0 outside), axes transposed back; C order of the image file's array.
    pub fn cropped_labels_to_image(&self, labels: &[Label]) -> Vec<Label> {
        let full = self.transposed_shape;
        let mut canvas = vec![0 as Label; full.iter().product()];
        let crop = &self.crop;
        let mut i = 0;
        for z in crop.start[0]..crop.stop()[0] {
            for y in crop.start[1]..crop.stop()[1] {
                let row = (z * full[1] + y) * full[2] + crop.start[2];
                canvas[row..row + crop.size[2]].copy_from_slice(&labels[i..i + crop.size[2]]);
                i += crop.size[2];
            }
        }
        let mut backward = [0; 3];
        for (i, &a) in self.transpose_forward.iter().enumerate() {
            backward[a] = i;
        }
        transpose_axes(&canvas, 1, full, backward).0
    }

    /// The image voxels (file order) whose nearest grid voxel lies in `region` of the grid.
    pub fn grid_region_to_image(&self, region: &Region) -> Region {
        let grid = self.grid();
        let mut start = [0; 3];
        let mut size = [0; 3];
        for a in 0..3 {
            let (c, g) = (self.crop.size[a], grid[a]);
            let inside: Vec<usize> = (0..c)
                .filter(|&i| (region.start[a]..region.stop()[a]).contains(&nearest_index(i, c, g)))
                .collect();
            start[a] = self.crop.start[a] + inside.first().copied().unwrap_or(0);
            size[a] = inside.len();
        }
        // Back from transposed to file axis order.
        let mut file_start = [0; 3];
        let mut file_size = [0; 3];
        for (i, &a) in self.transpose_forward.iter().enumerate() {
            file_start[a] = start[i];
            file_size[a] = size[i];
        }
        Region {
            start: file_start,
            size: file_size,
        }
    }

    /// Grid labels onto the image by nearest neighbour (no interpolation of logits).
    pub fn grid_labels_to_image(&self, labels: &[Label]) -> Vec<Label> {
        let grid = self.grid();
        let c = self.crop.size;
        let axis = |a: usize| -> Vec<usize> {
            (0..c[a]).map(|i| nearest_index(i, c[a], grid[a])).collect()
        };
        let (gz, gy, gx) = (axis(0), axis(1), axis(2));
        let mut cropped = Vec::with_capacity(self.crop.voxels());
        for &z in &gz {
            for &y in &gy {
                cropped.extend(gx.iter().map(|&x| labels[(z * grid[1] + y) * grid[2] + x]));
            }
        }
        self.cropped_labels_to_image(&cropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flat C-order index of (z, y, x) in a grid of `dims`.
    fn at(dims: [usize; 3], [z, y, x]: [usize; 3]) -> usize {
        (z * dims[1] + y) * dims[2] + x
    }

    #[test]
    fn transpose_round_trips_and_moves_axes() {
        let dims = [2, 3, 4];
        let data: Vec<u16> = (0..24).collect();
        let (t, tdims) = transpose_axes(&data, 1, dims, [2, 0, 1]);
        assert_eq!(tdims, [4, 2, 3]);
        // output (i, j, k) = input (z = j, y = k, x = i)
        assert_eq!(t[at(tdims, [1, 1, 2])], data[at(dims, [1, 2, 1])]);
        let (back, bdims) = transpose_axes(&t, 1, tdims, [1, 2, 0]);
        assert_eq!((back, bdims), (data, dims));
    }

    #[test]
    fn nonzero_box_spans_every_channel() {
        let mut volume = Tensor::zeros(&[2, 4, 5, 6]);
        volume.data_mut()[at([4, 5, 6], [1, 2, 3])] = 1.0; // channel 0 at (1, 2, 3)
        volume.data_mut()[120 + at([4, 5, 6], [3, 4, 1])] = -2.0; // channel 1 at (3, 4, 1)
        let boxed = |v: &Tensor| mask_box(&nonzero_mask(v), [4, 5, 6]);
        assert_eq!(
            boxed(&volume),
            Region {
                start: [1, 2, 1],
                size: [3, 3, 3]
            }
        );
        assert_eq!(
            boxed(&Tensor::zeros(&[1, 4, 5, 6])),
            Region::full([4, 5, 6])
        );
    }

    #[test]
    fn fill_holes_keeps_what_touches_the_border() {
        // A hollow 3×3×3 cube (hole in the middle) and a ring open to the border.
        let dims = [5, 5, 5];
        let mut mask = vec![false; 125];
        for z in 1..4 {
            for y in 1..4 {
                for x in 1..4 {
                    mask[at(dims, [z, y, x])] = (z, y, x) != (2, 2, 2);
                }
            }
        }
        let filled = fill_holes(&mask, dims);
        assert!(filled[at(dims, [2, 2, 2])], "the enclosed hole is filled");
        assert!(!filled[at(dims, [0, 0, 0])], "the outside stays empty");
        mask[at(dims, [2, 2, 1])] = false; // open a tunnel to the outside through x = 1 → 0
        mask[at(dims, [2, 2, 0])] = false;
        let filled = fill_holes(&mask, dims);
        assert!(
            !filled[at(dims, [2, 2, 2])],
            "a cavity open to the border is not a hole"
        );
    }

    #[test]
    fn nearest_index_matches_order_zero_resampling() {
        // floor((i + 0.5)·to/from), clamped: the voxel whose centre is nearest.
        assert_eq!(
            (0..6).map(|i| nearest_index(i, 6, 3)).collect::<Vec<_>>(),
            [0, 0, 1, 1, 2, 2]
        );
        assert_eq!(
            (0..3).map(|i| nearest_index(i, 3, 6)).collect::<Vec<_>>(),
            [1, 3, 5]
        );
    }
}
