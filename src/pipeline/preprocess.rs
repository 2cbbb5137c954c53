//! nnU-Net's preprocessing of an image onto the model's grid, and the way back for labels
//! (nnunet-inference.md §3.2, §3.4): transpose, crop to the non-zero box, per-channel
//! normalisation from the plans, and the check that no resampling is needed.
//!
//! Not yet here (they arrive with the nnU-Net pipeline work): resampling to the target spacing
//! and ZScore normalisation restricted to a mask. Both are refused with a clear error rather
//! than approximated.

use serde_json::Value;

use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::error::{Error, Result};
use crate::geometry::{Label, Region};
use crate::model::ModelInfo;
use crate::tensor::Tensor;

/// An image on the model's grid, and what is needed to map labels back.
pub struct Preprocessed {
    /// C × grid, normalised.
    pub volume: Tensor,
    /// Where the grid lies in the transposed image (the non-zero crop).
    pub crop: Region,
    /// The image's shape after transposition, before cropping.
    pub transposed_shape: [usize; 3],
    pub transpose_forward: [usize; 3],
}

fn permute(shape: [usize; 3], order: [usize; 3]) -> [usize; 3] {
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

impl Preprocessed {
    /// Another volume on the image's grid (a label map, say) through the same transpose and crop,
    /// without normalisation.
    pub fn map_to_grid(&self, volume: &Tensor) -> Result<Tensor> {
        let transposed = transpose(volume, self.transpose_forward)?;
        if transposed.shape()[1..] != self.transposed_shape {
            return Err(Error::Shape(format!(
                "volume {:?} is not on the image's grid",
                volume.shape()
            )));
        }
        CpuBackend.crop(&transposed, &self.crop)
    }
}

/// The box of voxels that are non-zero in any channel (the whole grid when none is).
fn nonzero_box(volume: &Tensor) -> Region {
    let s = volume.shape();
    let dims = [s[1], s[2], s[3]];
    let voxels: usize = dims.iter().product();
    let mut lo = [usize::MAX; 3];
    let mut hi = [0; 3];
    for channel in volume.data().chunks_exact(voxels) {
        for (v, &value) in channel.iter().enumerate() {
            if value != 0.0 {
                let p = [
                    v / (dims[1] * dims[2]),
                    (v / dims[2]) % dims[1],
                    v % dims[2],
                ];
                for a in 0..3 {
                    lo[a] = lo[a].min(p[a]);
                    hi[a] = hi[a].max(p[a]);
                }
            }
        }
    }
    if lo[0] == usize::MAX {
        return Region::full(dims);
    }
    Region {
        start: lo,
        size: [0, 1, 2].map(|a| hi[a] + 1 - lo[a]),
    }
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

fn normalize_channel(
    values: &mut [f32],
    scheme: &str,
    use_mask: bool,
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
                .iter_mut()
                .for_each(|v| *v = (v.clamp(lo, hi) - mean) / std);
        }
        "ZScoreNormalization" if use_mask => {
            return Err(Error::Plans(format!(
                "channel {channel}: ZScore normalisation within the non-zero mask is not supported yet"
            )));
        }
        "ZScoreNormalization" => {
            let n = values.len() as f64;
            let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
            let std = (values
                .iter()
                .map(|&v| (v as f64 - mean).powi(2))
                .sum::<f64>()
                / n)
                .sqrt();
            let (mean, std) = (mean as f32, (std as f32).max(1e-8));
            values.iter_mut().for_each(|v| *v = (*v - mean) / std);
        }
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
    if image.data().iter().any(|v| !v.is_finite()) {
        return Err(Error::Shape(
            "the image holds NaN or infinite voxels".into(),
        ));
    }
    let order = config.transpose_forward;
    let transposed = transpose(image, order)?;
    let spacing = permute([0, 1, 2], order).map(|a| spacing[a]);
    let transposed_shape = [1, 2, 3].map(|a| transposed.shape()[a]);
    let crop = nonzero_box(&transposed);
    let target = config.spacing;
    let resampled: [usize; 3] = [0, 1, 2]
        .map(|a| (spacing[a] / target[a] * crop.size[a] as f64).round_ties_even() as usize);
    if resampled != crop.size {
        return Err(Error::Shape(format!(
            "the image (spacing {spacing:?} mm) would need resampling to the model's spacing \
             {target:?} mm ({:?} → {resampled:?} voxels), which is not supported yet",
            crop.size
        )));
    }
    let mut volume = CpuBackend.crop(&transposed, &crop)?;
    let schemes = config
        .raw
        .get("normalization_schemes")
        .and_then(Value::as_array);
    let masks = config
        .raw
        .get("use_mask_for_norm")
        .and_then(Value::as_array);
    let voxels = crop.voxels();
    for (c, values) in volume.data_mut().chunks_exact_mut(voxels).enumerate() {
        let scheme = schemes
            .and_then(|s| s.get(c))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Error::Plans(format!(
                    "plans name no normalisation scheme for channel {c}"
                ))
            })?;
        let use_mask = masks
            .and_then(|m| m.get(c))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        normalize_channel(values, scheme, use_mask, &info.plans, c)?;
    }
    Ok(Preprocessed {
        volume,
        crop,
        transposed_shape,
        transpose_forward: order,
    })
}

/// Labels of the grid back onto the image: crop reverted (0 outside), axes transposed back.
/// Returns the labels in the image's C order (z, y, x).
pub fn labels_to_image(labels: &[Label], pre: &Preprocessed) -> Vec<Label> {
    let full = pre.transposed_shape;
    let mut canvas = vec![0 as Label; full.iter().product()];
    let crop = &pre.crop;
    let mut i = 0;
    for z in crop.start[0]..crop.stop()[0] {
        for y in crop.start[1]..crop.stop()[1] {
            let row = (z * full[1] + y) * full[2] + crop.start[2];
            canvas[row..row + crop.size[2]].copy_from_slice(&labels[i..i + crop.size[2]]);
            i += crop.size[2];
        }
    }
    let mut backward = [0; 3];
    for (i, &a) in pre.transpose_forward.iter().enumerate() {
        backward[a] = i;
    }
    transpose_axes(&canvas, 1, full, backward).0
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
        assert_eq!(
            nonzero_box(&volume),
            Region {
                start: [1, 2, 1],
                size: [3, 3, 3]
            }
        );
        assert_eq!(
            nonzero_box(&Tensor::zeros(&[1, 2, 2, 2])),
            Region::full([2, 2, 2])
        );
    }
}
