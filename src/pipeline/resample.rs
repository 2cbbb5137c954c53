//! nnU-Net's resampling (`resample_data_or_seg_to_shape`, nnunet-inference.md §3.2 step 5 and
//! §3.4): skimage `resize(order, mode='edge', anti_aliasing=False)` = scipy `zoom(grid_mode=True,
//! mode='nearest')` followed by clipping to the input's range, or, for anisotropic spacing,
//! resizing each slice in plane and taking nearest slices along the low-resolution axis.
//!
//! Arithmetic is f64, as there. Order 3 is a cubic B-spline: each line is padded by 12 edge
//! values, prefiltered (pole √3 − 2, gain, mirror-boundary initialisation) and evaluated at
//! `(o + 0.5)·in/out − 0.5`; order 1 is linear interpolation with edge clamping; order 0 takes
//! `floor(c + 0.5)`, clamped. Being separable, the volume is resampled one axis at a time.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::tensor::{Tensor, round_to_f16};

/// nnU-Net's threshold for treating spacing as anisotropic.
const ANISOTROPY_THRESHOLD: f64 = 3.0;
/// scipy's edge padding before the spline prefilter.
const SPLINE_PADDING: usize = 12;
/// The cubic B-spline's prefilter pole, √3 − 2.
const CUBIC_POLE: f64 = -0.267_949_192_431_122_7;

/// A resampling as a configuration of the plans names it (`resampling_fn_data`,
/// `resampling_fn_probabilities` and their `_kwargs`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Resampling {
    /// Interpolation order in plane (or in 3D): 1 or 3.
    pub order: usize,
    /// Order along a separately resampled axis: 0, 1 or 3.
    pub order_z: usize,
    /// None: decide from the spacings; Some(true/false): always / never resample one axis apart.
    pub force_separate_z: Option<bool>,
}

impl Resampling {
    /// Reads `{key}` and `{key}_kwargs` of a resolved configuration. Only nnU-Net's default
    /// `resample_data_or_seg_to_shape` is supported; others are refused by name.
    pub fn from_plans(
        config: &serde_json::Map<String, serde_json::Value>,
        key: &str,
    ) -> Result<Self> {
        let name = config
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or("resample_data_or_seg_to_shape");
        if name != "resample_data_or_seg_to_shape" {
            return Err(Error::Plans(format!(
                "`{key}` = `{name}` is not supported (only resample_data_or_seg_to_shape)"
            )));
        }
        let kwargs = config
            .get(&format!("{key}_kwargs"))
            .and_then(|v| v.as_object());
        let get = |k: &str| kwargs.and_then(|m| m.get(k));
        if get("is_seg").and_then(|v| v.as_bool()) == Some(true) {
            return Err(Error::Plans(format!(
                "`{key}_kwargs` resample a segmentation, not an image"
            )));
        }
        let order = get("order").and_then(|v| v.as_u64()).unwrap_or(3) as usize;
        let order_z = get("order_z").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
        if !matches!(order, 1 | 3) || !matches!(order_z, 0 | 1 | 3) {
            return Err(Error::Plans(format!(
                "`{key}_kwargs`: order {order} / order_z {order_z} not supported (order 1 or 3, order_z 0, 1 or 3)"
            )));
        }
        Ok(Resampling {
            order,
            order_z,
            force_separate_z: get("force_separate_z").and_then(|v| v.as_bool()),
        })
    }

    /// nnU-Net's `resample_data_or_seg_to_shape` of a C × Z × Y × X f32 image of `spacing` to
    /// `shape` at `new_spacing`; unchanged when the shape already matches.
    pub fn apply(
        &self,
        volume: &Tensor,
        shape: [usize; 3],
        spacing: [f64; 3],
        new_spacing: [f64; 3],
    ) -> Result<Tensor> {
        self.resample_stored(volume, shape, spacing, new_spacing, |v| v as f32)
    }

    /// The same for an f16 array (nnU-Net's logits on export): the f64 results are rounded to f16
    /// directly, as numpy stores them.
    pub fn apply_f16(
        &self,
        volume: &Tensor,
        shape: [usize; 3],
        spacing: [f64; 3],
        new_spacing: [f64; 3],
    ) -> Result<Tensor> {
        self.resample_stored(volume, shape, spacing, new_spacing, round_to_f16)
    }

    fn resample_stored(
        &self,
        volume: &Tensor,
        shape: [usize; 3],
        spacing: [f64; 3],
        new_spacing: [f64; 3],
        store: fn(f64) -> f32,
    ) -> Result<Tensor> {
        let axis = match self.force_separate_z {
            None => separate_axis(spacing, new_spacing),
            Some(true) => lowres_axis(spacing),
            Some(false) => None,
        };
        resample(volume, shape, axis, self.order, self.order_z, store)
    }
}

/// `round_half_even(spacing / new_spacing · shape)` per axis (`compute_new_shape`).
pub fn new_shape(shape: [usize; 3], spacing: [f64; 3], new_spacing: [f64; 3]) -> [usize; 3] {
    [0, 1, 2].map(|a| (spacing[a] / new_spacing[a] * shape[a] as f64).round_ties_even() as usize)
}

/// The axis to resample separately (nearest along it), as `determine_do_sep_z_and_axis` with
/// `force_separate_z = None`: the axis of largest current spacing when the current spacing is
/// anisotropic, else that of the new spacing; none when two or three axes tie.
pub fn separate_axis(spacing: [f64; 3], new_spacing: [f64; 3]) -> Option<usize> {
    let anisotropic = |s: [f64; 3]| {
        let (max, min) = (
            s.iter().copied().fold(f64::MIN, f64::max),
            s.iter().copied().fold(f64::MAX, f64::min),
        );
        max / min > ANISOTROPY_THRESHOLD
    };
    if anisotropic(spacing) {
        lowres_axis(spacing)
    } else if anisotropic(new_spacing) {
        lowres_axis(new_spacing)
    } else {
        None
    }
}

/// The single axis of largest spacing (`get_lowres_axis`); none when two or three tie.
fn lowres_axis(spacing: [f64; 3]) -> Option<usize> {
    let max = spacing.iter().copied().fold(f64::MIN, f64::max);
    let axes: Vec<usize> = (0..3).filter(|&a| max / spacing[a] == 1.0).collect();
    (axes.len() == 1).then(|| axes[0])
}

/// Where output sample `o` of `out` lies in an input of `len` (pixel centres aligned).
fn source(o: usize, len: usize, out: usize) -> f64 {
    (o as f64 + 0.5) * (len as f64 / out as f64) - 0.5
}

/// A cubic B-spline's coefficients of `line`, padded by SPLINE_PADDING edge values per side.
fn cubic_coefficients(line: &[f64], c: &mut Vec<f64>) {
    let (first, last) = (line[0], line[line.len() - 1]);
    c.clear();
    c.extend(std::iter::repeat_n(first, SPLINE_PADDING));
    c.extend_from_slice(line);
    c.extend(std::iter::repeat_n(last, SPLINE_PADDING));
    let (n, z) = (c.len(), CUBIC_POLE);
    let gain = (1.0 - z) * (1.0 - 1.0 / z);
    c.iter_mut().for_each(|v| *v *= gain);
    // Causal initialisation for a mirror boundary.
    let z_n_1 = z.powi(n as i32 - 1);
    let mut z_i = z;
    c[0] += z_n_1 * c[n - 1];
    for i in 1..n - 1 {
        c[0] += z_i * (c[i] + z_n_1 * c[n - 1 - i]);
        z_i *= z;
    }
    c[0] /= 1.0 - z_n_1 * z_n_1;
    for i in 1..n {
        c[i] += z * c[i - 1];
    }
    c[n - 1] = (z * c[n - 2] + c[n - 1]) * z / (z * z - 1.0);
    for i in (0..n - 1).rev() {
        c[i] = z * (c[i + 1] - c[i]);
    }
}

/// For each output sample: the first input index and the weights (order + 1 of them).
fn taps(len: usize, out: usize, order: usize) -> Vec<(isize, [f64; 4])> {
    (0..out)
        .map(|o| {
            let x = source(o, len, out);
            match order {
                0 => ((x + 0.5).floor() as isize, [1.0, 0.0, 0.0, 0.0]),
                1 => {
                    let f = x.floor();
                    (f as isize, [1.0 - (x - f), x - f, 0.0, 0.0])
                }
                _ => {
                    // Cubic B-spline weights of scipy's get_spline_interpolation_weights.
                    let x = x + SPLINE_PADDING as f64;
                    let f = x.floor();
                    let (y, z) = (x - f, 1.0 - (x - f));
                    let w1 = (y * y * (y - 2.0) * 3.0 + 4.0) / 6.0;
                    let w2 = (z * z * (z - 2.0) * 3.0 + 4.0) / 6.0;
                    let w0 = z * z * z / 6.0;
                    (f as isize - 1, [w0, w1, w2, 1.0 - w0 - w1 - w2])
                }
            }
        })
        .collect()
}

/// Resamples one axis of `channels` volumes of `dims` (f64, C order) to `out` samples.
fn resample_axis(
    data: &[f64],
    channels: usize,
    dims: [usize; 3],
    axis: usize,
    out: usize,
    order: usize,
) -> Vec<f64> {
    let len = dims[axis];
    let outer = channels * dims[..axis].iter().product::<usize>();
    let inner: usize = dims[axis + 1..].iter().product();
    let taps = taps(len, out, order);
    let mut result = vec![0f64; outer * out * inner];
    result
        .par_chunks_mut(out * inner)
        .zip(data.par_chunks(len * inner))
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(line, coefficients), (dest, src)| {
                for j in 0..inner {
                    line.clear();
                    line.extend((0..len).map(|i| src[i * inner + j]));
                    let values: &[f64] = if order == 3 {
                        cubic_coefficients(line, coefficients);
                        coefficients
                    } else {
                        line
                    };
                    let last = values.len() as isize - 1;
                    for (o, (start, weights)) in taps.iter().enumerate() {
                        dest[o * inner + j] = weights[..=order]
                            .iter()
                            .enumerate()
                            .map(|(k, w)| w * values[(start + k as isize).clamp(0, last) as usize])
                            .sum();
                    }
                }
            },
        );
    result
}

/// skimage `resize(order, mode='edge', anti_aliasing=False)` of each of `blocks` consecutive
/// volumes of `dims` (over the axes in `axes`), each clipped to its own input range.
fn resize_blocks(
    data: &mut Vec<f64>,
    blocks: usize,
    dims: &mut [usize; 3],
    axes: &[usize],
    shape: [usize; 3],
    order: usize,
) {
    let block_len: usize = dims.iter().product();
    let ranges: Vec<(f64, f64)> = data
        .chunks(block_len.max(1))
        .map(|b| {
            b.iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)))
        })
        .collect();
    for &a in axes {
        *data = resample_axis(data, blocks, *dims, a, shape[a], order);
        dims[a] = shape[a];
    }
    let out_len: usize = dims.iter().product();
    data.par_chunks_mut(out_len.max(1))
        .zip(ranges)
        .for_each(|(b, (lo, hi))| b.iter_mut().for_each(|v| *v = v.clamp(lo, hi)));
}

/// Moves `axis` of C × dims to the front of the spatial axes (slices of it become contiguous
/// blocks), or back when `back` is set.
fn axis_to_front(
    data: &[f64],
    channels: usize,
    dims: [usize; 3],
    axis: usize,
    back: bool,
) -> Vec<f64> {
    if axis == 0 {
        return data.to_vec();
    }
    // Front order: [axis, the other two in order].
    let others: Vec<usize> = (0..3).filter(|&a| a != axis).collect();
    let order = [axis, others[0], others[1]];
    let strides = [dims[1] * dims[2], dims[2], 1];
    let voxels: usize = dims.iter().product();
    let mut out = vec![0f64; data.len()];
    let front = order.map(|a| dims[a]);
    for c in 0..channels {
        for i in 0..front[0] {
            for j in 0..front[1] {
                for k in 0..front[2] {
                    let f = ((c * front[0] + i) * front[1] + j) * front[2] + k;
                    let o = c * voxels
                        + i * strides[order[0]]
                        + j * strides[order[1]]
                        + k * strides[order[2]];
                    if back {
                        out[o] = data[f];
                    } else {
                        out[f] = data[o];
                    }
                }
            }
        }
    }
    out
}

/// `resample_data_or_seg` for images: a C × Z × Y × X volume to `shape`, with interpolation
/// `order` (1 or 3) in 3D, or, with a `separate` axis, in plane per slice and `order_z` along it.
/// Returns the volume unchanged when the shape already matches.
fn resample(
    volume: &Tensor,
    shape: [usize; 3],
    separate: Option<usize>,
    order: usize,
    order_z: usize,
    store: fn(f64) -> f32,
) -> Result<Tensor> {
    let s = volume.shape();
    let (channels, dims) = match *s {
        [c, z, y, x] => (c, [z, y, x]),
        _ => {
            return Err(Error::Shape(format!(
                "cannot resample shape {s:?} as a C × Z × Y × X volume"
            )));
        }
    };
    if !matches!(order, 1 | 3) || shape.contains(&0) || dims.contains(&0) {
        return Err(Error::Shape(format!(
            "cannot resample {dims:?} to {shape:?} with order {order}"
        )));
    }
    if dims == shape {
        return Ok(volume.clone());
    }
    let mut data: Vec<f64> = volume.data().iter().map(|&v| v as f64).collect();
    let mut current = dims;
    match separate {
        None => resize_blocks(&mut data, channels, &mut current, &[0, 1, 2], shape, order),
        Some(axis) => {
            // In-plane resize of every slice along `axis`, each clipped to its own range.
            let mut front = axis_to_front(&data, channels, dims, axis, false);
            let others: Vec<usize> = (0..3).filter(|&a| a != axis).collect();
            let mut slice_dims = [1, dims[others[0]], dims[others[1]]];
            let slice_shape = [1, shape[others[0]], shape[others[1]]];
            resize_blocks(
                &mut front,
                channels * dims[axis],
                &mut slice_dims,
                &[1, 2],
                slice_shape,
                order,
            );
            let mut in_plane = dims;
            in_plane[others[0]] = shape[others[0]];
            in_plane[others[1]] = shape[others[1]];
            data = axis_to_front(&front, channels, in_plane, axis, true);
            current = in_plane;
            if dims[axis] != shape[axis] {
                data = resample_axis(&data, channels, current, axis, shape[axis], order_z);
                current[axis] = shape[axis];
            }
        }
    }
    Tensor::new(
        vec![channels, current[0], current[1], current[2]],
        data.into_iter().map(store).collect(),
    )
}
