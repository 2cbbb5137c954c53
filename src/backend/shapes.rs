//! Shape checks of every backend op, shared by all backends: an op validates its operands here
//! first, so a wrong shape is the same clear error on every backend and never reaches a kernel.

use super::{
    BackendTensor, ClickUpdate, Conv3d, ConvTranspose3d, FeedForward, InstanceNorm,
    LabelAssignment, LayerNorm, Linear, Mlp,
};
use crate::error::{Error, Result};
use crate::geometry::{Label, Region};

fn shape_err(message: String) -> Error {
    Error::Shape(message)
}

pub fn numel(t: &impl BackendTensor) -> usize {
    t.shape().iter().product()
}

/// `(channels, [z, y, x])` of a channels-first volume.
pub fn volume(x: &impl BackendTensor, what: &str) -> Result<(usize, [usize; 3])> {
    match *x.shape() {
        [c, z, y, xx] => Ok((c, [z, y, xx])),
        ref other => Err(shape_err(format!(
            "{what} expects a C × Z × Y × X volume, got shape {other:?}"
        ))),
    }
}

/// `(rows, width)` of a token matrix.
pub fn tokens(x: &impl BackendTensor, what: &str) -> Result<(usize, usize)> {
    match *x.shape() {
        [rows, width] => Ok((rows, width)),
        ref other => Err(shape_err(format!(
            "{what} expects a token matrix (N × width), got shape {other:?}"
        ))),
    }
}

pub fn same(a: &impl BackendTensor, b: &impl BackendTensor, what: &str) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(shape_err(format!(
            "{what}: shapes {:?} and {:?} differ",
            a.shape(),
            b.shape()
        )));
    }
    Ok(())
}

/// A checked convolution: input channels and extent, output channels and extent, kernel.
#[derive(Clone, Copy)]
pub struct ConvShape {
    pub cin: usize,
    pub dims: [usize; 3],
    pub cout: usize,
    pub out_dims: [usize; 3],
    pub kernel: [usize; 3],
}

pub fn conv3d<T: BackendTensor>(x: &T, conv: &Conv3d<T>) -> Result<ConvShape> {
    conv3d_of(volume(x, "conv3d")?, conv)
}

/// The convolution of the channel concatenation `[a; b]`.
pub fn conv3d_on_concat<T: BackendTensor>(a: &T, b: &T, conv: &Conv3d<T>) -> Result<ConvShape> {
    let [channels, z, y, x] = concat(a, b)?;
    conv3d_of((channels, [z, y, x]), conv)
}

fn conv3d_of<T: BackendTensor>(
    (cin, dims): (usize, [usize; 3]),
    conv: &Conv3d<T>,
) -> Result<ConvShape> {
    let (cout, kernel) = match *conv.weight.shape() {
        [o, i, kz, ky, kx] if i == cin && conv.bias.as_ref().is_none_or(|b| b.shape() == [o]) => {
            (o, [kz, ky, kx])
        }
        ref w => {
            return Err(shape_err(format!(
                "conv3d weight {w:?} does not take {cin} input channels"
            )));
        }
    };
    let mut out_dims = [0; 3];
    for a in 0..3 {
        out_dims[a] = (dims[a] + 2 * conv.padding[a])
            .checked_sub(kernel[a])
            .filter(|_| conv.stride[a] > 0)
            .map(|span| span / conv.stride[a] + 1)
            .ok_or_else(|| {
                shape_err(format!(
                    "conv3d kernel {kernel:?} with padding {:?} does not fit input {dims:?}",
                    conv.padding
                ))
            })?;
    }
    Ok(ConvShape {
        cin,
        dims,
        cout,
        out_dims,
        kernel,
    })
}

pub fn conv_transpose3d<T: BackendTensor>(x: &T, conv: &ConvTranspose3d<T>) -> Result<ConvShape> {
    let (cin, dims) = volume(x, "conv_transpose3d")?;
    match *conv.weight.shape() {
        [i, o, kz, ky, kx]
            if i == cin
                && [kz, ky, kx] == conv.stride
                && conv.bias.as_ref().is_none_or(|b| b.shape() == [o]) =>
        {
            Ok(ConvShape {
                cin,
                dims,
                cout: o,
                out_dims: [0, 1, 2].map(|a| dims[a] * conv.stride[a]),
                kernel: conv.stride,
            })
        }
        ref w => Err(shape_err(format!(
            "conv_transpose3d weight {w:?} does not take {cin} input channels with kernel = stride {:?}",
            conv.stride
        ))),
    }
}

/// `(channels, voxels)` of a volume an instance norm fits.
pub fn instance_norm<T: BackendTensor>(x: &T, norm: &InstanceNorm<T>) -> Result<(usize, usize)> {
    let (channels, dims) = volume(x, "instance norm")?;
    if norm.weight.shape() != [channels] || norm.bias.shape() != [channels] {
        return Err(shape_err(format!(
            "instance norm of {:?} channels applied to a volume of shape {:?}",
            norm.weight.shape(),
            x.shape()
        )));
    }
    Ok((channels, dims.iter().product()))
}

pub fn concat<T: BackendTensor>(a: &T, b: &T) -> Result<[usize; 4]> {
    let (ca, da) = volume(a, "concat")?;
    let (cb, db) = volume(b, "concat")?;
    if da != db {
        return Err(shape_err(format!(
            "cannot concatenate volumes {:?} and {:?}",
            a.shape(),
            b.shape()
        )));
    }
    Ok([ca + cb, da[0], da[1], da[2]])
}

/// `(channels, dims)` of a volume a region lies in.
pub fn crop(x: &impl BackendTensor, region: &Region) -> Result<(usize, [usize; 3])> {
    let (channels, dims) = volume(x, "crop")?;
    region.check_inside(dims)?;
    Ok((channels, dims))
}

pub fn flip_axes(axes: &[usize]) -> Result<[bool; 3]> {
    if let Some(a) = axes.iter().find(|&&a| a > 2) {
        return Err(shape_err(format!("cannot flip spatial axis {a}")));
    }
    Ok([0, 1, 2].map(|a| axes.contains(&a)))
}

/// `(channels, dims)` of the accumulator a weighted tile is added to.
pub fn accumulate<A: BackendTensor, T: BackendTensor>(
    acc: &A,
    tile: &T,
    weights: &T,
    region: &Region,
) -> Result<(usize, [usize; 3])> {
    let (channels, dims) = crop(acc, region)?;
    let (tile_channels, tile_dims) = volume(tile, "accumulate")?;
    let s = region.size;
    if tile_channels != channels || tile_dims != s || weights.shape() != [1, s[0], s[1], s[2]] {
        return Err(shape_err(format!(
            "cannot accumulate tile {:?} with weights {:?} into {:?} at {region:?}",
            tile.shape(),
            weights.shape(),
            acc.shape()
        )));
    }
    Ok((channels, dims))
}

/// `(channels, voxels)` of a volume divided by per-voxel weights.
pub fn weight_sum(
    x: &impl BackendTensor,
    weight_sum: &impl BackendTensor,
) -> Result<(usize, usize)> {
    let (channels, dims) = volume(x, "divide_by_weights")?;
    if weight_sum.shape() != [1, dims[0], dims[1], dims[2]] {
        return Err(shape_err(format!(
            "weights {:?} do not cover volume {:?}",
            weight_sum.shape(),
            x.shape()
        )));
    }
    Ok((channels, dims.iter().product()))
}

/// Classes an argmax can name as a `Label`.
pub fn label_classes(classes: usize) -> Result<()> {
    if classes == 0 || classes > Label::MAX as usize + 1 {
        return Err(shape_err(format!(
            "cannot take the argmax over {classes} classes"
        )));
    }
    Ok(())
}

/// `(width, grid dims)` of a positional grid encoding tokens of a region of `shape`.
pub fn positional<T: BackendTensor>(
    x: &T,
    grid: &T,
    shape: [usize; 3],
) -> Result<(usize, [usize; 3])> {
    let (width, gdims) = volume(grid, "positional grid")?;
    let (rows, xw) = tokens(x, "add_positional_encoding")?;
    if xw != width || rows != shape.iter().product::<usize>() || gdims.contains(&0) {
        return Err(shape_err(format!(
            "positional grid {:?} cannot encode tokens {:?} of a {shape:?} region",
            grid.shape(),
            x.shape()
        )));
    }
    Ok((width, gdims))
}

/// `(channels, volume dims, width, grid dims)` of the head's input tokens
/// (`Backend::input_tokens`): the features' channels projected to `width`, the positional grid
/// `width` channels wide.
pub fn input_tokens<T: BackendTensor>(
    features: &T,
    region: &Region,
    projection: &Linear<T>,
    grid: &T,
) -> Result<(usize, [usize; 3], usize, [usize; 3])> {
    let (channels, dims) = crop(features, region)?;
    let width = linear(projection, channels)?;
    let (grid_width, grid_dims) = volume(grid, "positional grid")?;
    if grid_width != width || grid_dims.contains(&0) {
        return Err(shape_err(format!(
            "positional grid {:?} cannot encode tokens of width {width}",
            grid.shape()
        )));
    }
    Ok((channels, dims, width, grid_dims))
}

pub fn gather_rows(x: &impl BackendTensor, rows: &[usize]) -> Result<(usize, usize)> {
    let (n, width) = tokens(x, "gather_rows")?;
    if let Some(r) = rows.iter().find(|&&r| r >= n) {
        return Err(shape_err(format!("row {r} out of range for {n} rows")));
    }
    Ok((n, width))
}

/// Output width of a Linear applied to rows of `input_width`.
pub fn linear<T: BackendTensor>(linear: &Linear<T>, input_width: usize) -> Result<usize> {
    match *linear.weight.shape() {
        [out, inp] if inp == input_width && linear.bias.shape() == [out] => Ok(out),
        ref w => Err(shape_err(format!(
            "linear weight {w:?} (bias {:?}) applied to rows of width {input_width}",
            linear.bias.shape()
        ))),
    }
}

pub fn layer_norm<T: BackendTensor>(norm: &LayerNorm<T>, width: usize) -> Result<()> {
    if norm.weight.shape() != [width] || norm.bias.shape() != [width] {
        return Err(shape_err(format!(
            "layer norm of width {:?} applied to rows of width {width}",
            norm.weight.shape()
        )));
    }
    Ok(())
}

/// `(hidden, out)` widths of an MLP applied to rows of `width`.
pub fn mlp<T: BackendTensor>(mlp: &Mlp<T>, width: usize) -> Result<(usize, usize)> {
    let hidden = linear(&mlp.up, width)?;
    Ok((hidden, linear(&mlp.down, hidden)?))
}

/// `(rows, width, hidden)` of a feed-forward sub-layer applied in place.
pub fn feed_forward<T: BackendTensor>(
    x: &T,
    ffn: &FeedForward<T>,
) -> Result<(usize, usize, usize)> {
    let (rows, width) = tokens(x, "feed_forward")?;
    layer_norm(&ffn.norm, width)?;
    let (hidden, out) = mlp(&ffn.mlp, width)?;
    if out != width {
        return Err(shape_err(format!(
            "feed-forward does not map width {width} back to itself"
        )));
    }
    Ok((rows, width, hidden))
}

/// Width of one head.
pub fn head_width(width: usize, heads: usize) -> Result<usize> {
    if heads == 0 || !width.is_multiple_of(heads) {
        return Err(shape_err(format!(
            "width {width} cannot be split into {heads} heads"
        )));
    }
    Ok(width / heads)
}

/// `(queries, keys, width)` of a small attention.
pub fn attention<T: BackendTensor>(
    q: &T,
    k: &T,
    v: &T,
    heads: usize,
) -> Result<(usize, usize, usize)> {
    let (nq, width) = tokens(q, "attention")?;
    let (nk, kw) = tokens(k, "attention")?;
    if kw != width || v.shape() != k.shape() || nk == 0 {
        return Err(shape_err(format!(
            "attention of queries {:?} over keys {:?} and values {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        )));
    }
    head_width(width, heads)?;
    Ok((nq, nk, width))
}

/// `(tokens, clicks, width)` of a click cross-attention.
pub fn click_cross_attention<T: BackendTensor>(
    x: &T,
    q: &T,
    norm: &LayerNorm<T>,
    key: &Linear<T>,
    value: &Linear<T>,
    heads: usize,
) -> Result<(usize, usize, usize)> {
    let (n, width) = tokens(x, "click_cross_attention")?;
    let (clicks, qw) = tokens(q, "click_cross_attention")?;
    layer_norm(norm, width)?;
    if qw != width || n == 0 || linear(key, width)? != width || linear(value, width)? != width {
        return Err(shape_err(format!(
            "click cross-attention of queries {:?} over tokens {:?}",
            q.shape(),
            x.shape()
        )));
    }
    head_width(width, heads)?;
    Ok((n, clicks, width))
}

/// `(clicks, width, hidden)` of the click side of a head layer (`Backend::click_update`).
pub fn click_update<T: BackendTensor>(
    clicks: &T,
    attended: &T,
    update: &ClickUpdate<'_, T>,
) -> Result<(usize, usize, usize)> {
    same(clicks, attended, "click_update")?;
    let (n, width, hidden) = feed_forward(clicks, update.ffn)?;
    layer_norm(update.self_norm, width)?;
    layer_norm(update.key_norm, width)?;
    let own = update.self_attention;
    for projection in [
        update.cross_out,
        &own.q,
        &own.k,
        &own.v,
        &own.out,
        update.key,
    ] {
        if linear(projection, width)? != width {
            return Err(shape_err(format!(
                "click projection {:?} does not map width {width} to itself",
                projection.weight.shape()
            )));
        }
    }
    head_width(width, update.heads)?;
    Ok((n, width, hidden))
}

/// `(tokens, clicks, width)` of a label assignment.
pub fn label_assignment<T: BackendTensor>(
    x: &T,
    click_keys: &T,
    click_values: &T,
    auto_embedding: &T,
    params: &LabelAssignment<'_, T>,
) -> Result<(usize, usize, usize)> {
    let (n, width) = tokens(x, "label_assignment")?;
    let (clicks, kw) = tokens(click_keys, "label_assignment")?;
    layer_norm(params.norm_q, width)?;
    if kw != width
        || click_values.shape() != click_keys.shape()
        || auto_embedding.shape() != x.shape()
        || clicks == 0
        || linear(params.q, width)? != width
        || linear(params.out, width)? != width
    {
        return Err(shape_err(format!(
            "label assignment of tokens {:?} with click keys {:?}, values {:?}, automatic \
             embedding {:?}",
            x.shape(),
            click_keys.shape(),
            click_values.shape(),
            auto_embedding.shape()
        )));
    }
    head_width(width, params.heads)?;
    Ok((n, clicks, width))
}
