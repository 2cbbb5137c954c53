//! Launches of kernels/attention.cu: attention among the clicks, the click cross-attention over
//! every voxel (fold, partial softmax per block, merge, value projection), the rest of the click
//! side of a layer in one block, and label assignment.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::linear::{Epilogue, gelu_mlp_shared_bytes, gemm};
use super::{CudaBackend, CudaTensor, Element, FUSED_ROWS, Kernel, driver, norm};
use crate::backend::{
    ClickUpdate, LabelAssignment, LayerNorm, Linear, click_update_in_parts, shapes,
};
use crate::error::{Error, Result};

const MODULE: &str = "attention";
/// Voxels per tile and threads per block of `cross_partial` (ROWS, CROSS_THREADS).
const ROWS: usize = 32;
const CROSS_THREADS: u32 = 256;
/// Voxels per tile of `cross_partial_mma_f16_*` (CROSS_MMA_TOKENS).
const CROSS_MMA_TOKENS: usize = 64;
/// Warps per block of `cross_merge` (MERGE_WARPS).
const MERGE_WARPS: u32 = 8;
/// Dynamic shared memory `cross_partial` may use; columns are split over blockIdx.y to fit.
const CROSS_SHARED_BYTES: usize = 96 * 1024;
/// Bounds on the head width that `assign_mix` is instantiated for (it takes any width up to
/// the bound; the smallest bound that fits keeps the fewest registers).
const ASSIGN_HEAD_WIDTHS: [usize; 4] = [8, 16, 32, 64];

pub fn attention<E: Element>(
    b: &CudaBackend<E>,
    q: &CudaTensor<E>,
    k: &CudaTensor<E>,
    v: &CudaTensor<E>,
    heads: usize,
) -> Result<CudaTensor<E>> {
    let (queries, keys, width) = shapes::attention(q, k, v, heads)?;
    let mut out = b.output(vec![queries, width])?;
    if queries == 0 {
        return Ok(out);
    }
    let f = b.kernel(MODULE, "attention_small")?;
    let (nk, w, h) = (keys as i64, width as i64, heads as i64);
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&q.data)
        .arg(&k.data)
        .arg(&v.data)
        .arg(&mut out.data)
        .arg(&nk)
        .arg(&w)
        .arg(&h);
    // One float per key, rounded up to 16 bytes: the compiler reads the scores' tail four at a
    // time (LDS.128), past the last key where their count is not a multiple of 4.
    let shared = keys.next_multiple_of(4) * 4;
    b.allow_shared_memory(&f, shared)?;
    let grid = LaunchConfig {
        grid_dim: (queries as u32, heads as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    // SAFETY: matches `attention_small_*`; at least one float of shared memory per key.
    unsafe { launch.launch(grid) }.map_err(driver)?;
    Ok(out)
}

pub fn click_cross_attention<E: Element>(
    b: &CudaBackend<E>,
    x: &CudaTensor<E>,
    q: &CudaTensor<E>,
    norm: &LayerNorm<CudaTensor<E>>,
    key: &Linear<CudaTensor<E>>,
    value: &Linear<CudaTensor<E>>,
    heads: usize,
) -> Result<CudaTensor<E>> {
    let (n, clicks, width) = shapes::click_cross_attention(x, q, norm, key, value, heads)?;
    let columns = clicks * heads;
    let mut out = b.output(vec![clicks, width])?;
    if clicks == 0 {
        return Ok(out);
    }
    let (nc, w, h, cols) = (clicks as i64, width as i64, heads as i64, columns as i64);

    // Fold the key projection into the queries.
    let mut folded = b.scratch::<f32>(columns * width)?;
    let mut offset = b.scratch::<f32>(columns)?;
    let f = b.kernel(MODULE, "cross_fold")?;
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&q.data)
        .arg(&key.weight.data)
        .arg(&key.bias.data)
        .arg(&mut folded)
        .arg(&mut offset);
    launch.arg(&nc).arg(&w).arg(&h);
    // SAFETY: matches `cross_fold_*`; folded holds columns × width values, offset columns.
    unsafe { launch.launch(b.elementwise(columns * (width + 1))) }.map_err(driver)?;

    // Partial softmax per block of voxels.
    let inputs = CrossInputs {
        x,
        norm,
        folded: &folded,
        offset: &offset,
        n,
        columns,
        width,
    };
    let partials = if CudaBackend::<E>::fused_head_width(width) {
        cross_partial_mma(b, &inputs)?
    } else {
        cross_partial(b, &inputs)?
    };

    // Merge the blocks, then apply the value projection.
    let mut mean = b.scratch::<f32>(columns * width)?;
    let f = b.function(MODULE, "cross_merge")?;
    let nb = partials.blocks as i64;
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&partials.max)
        .arg(&partials.sum)
        .arg(&partials.weighted)
        .arg(&mut mean)
        .arg(&nb)
        .arg(&cols)
        .arg(&w);
    let grid = LaunchConfig {
        grid_dim: (columns as u32, width.div_ceil(32) as u32, 1),
        block_dim: (32 * MERGE_WARPS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `cross_merge`: a block per column and 32 of the width, MERGE_WARPS warps.
    unsafe { launch.launch(grid) }.map_err(driver)?;

    let f = b.kernel(MODULE, "cross_project")?;
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&mean)
        .arg(&value.weight.data)
        .arg(&value.bias.data)
        .arg(&mut out.data)
        .arg(&nc)
        .arg(&w)
        .arg(&h);
    // SAFETY: matches `cross_project_*`; out holds clicks × width values.
    unsafe { launch.launch(b.elementwise(clicks * width)) }.map_err(driver)?;
    Ok(out)
}

/// What both partial-softmax kernels read: the voxels' tokens (n × width), the key-side
/// LayerNorm, and the queries with the key projection folded in (columns × width, and an offset
/// per column).
struct CrossInputs<'a, E: Element> {
    x: &'a CudaTensor<E>,
    norm: &'a LayerNorm<CudaTensor<E>>,
    folded: &'a CudaSlice<f32>,
    offset: &'a CudaSlice<f32>,
    n: usize,
    columns: usize,
    width: usize,
}

/// Per block of voxels and column: the running max, the sum of e^(s − max) and Σ e^(s − max)·LN(x)
/// (width values), for `cross_merge`.
struct CrossPartials {
    blocks: usize,
    max: CudaSlice<f32>,
    sum: CudaSlice<f32>,
    weighted: CudaSlice<f32>,
}

impl CrossPartials {
    /// The voxels split into blocks of whole tiles, as many over the column groups as the GPU
    /// runs at once (`per_multiprocessor` blocks on each multiprocessor: one wave), with their
    /// partial buffers. Run B's grid assumed four blocks a multiprocessor where the registers
    /// allowed three, and ran in two waves, the second a third full.
    fn split<E: Element>(
        b: &CudaBackend<E>,
        inputs: &CrossInputs<'_, E>,
        tile: usize,
        groups: usize,
        per_multiprocessor: usize,
    ) -> Result<(Self, usize)> {
        let (n, columns, width) = (inputs.n, inputs.columns, inputs.width);
        let blocks = n
            .div_ceil(tile)
            .clamp(1, (per_multiprocessor * b.multiprocessors / groups).max(1));
        let tokens_per_block = (n.div_ceil(blocks).div_ceil(tile) * tile).max(tile);
        let blocks = n.div_ceil(tokens_per_block);
        let partials = CrossPartials {
            blocks,
            max: b.scratch::<f32>(blocks * columns)?,
            sum: b.scratch::<f32>(blocks * columns)?,
            weighted: b.scratch::<f32>(blocks * columns * width)?,
        };
        Ok((partials, tokens_per_block))
    }

    /// Launches a partial-softmax kernel on these buffers.
    fn launch<E: Element>(
        mut self,
        b: &CudaBackend<E>,
        f: &Kernel,
        inputs: &CrossInputs<'_, E>,
        scalars: &[i64],
        grid: LaunchConfig,
    ) -> Result<Self> {
        let mut launch = b.launch_builder(f);
        launch
            .arg(&inputs.x.data)
            .arg(&inputs.norm.weight.data)
            .arg(&inputs.norm.bias.data)
            .arg(inputs.folded)
            .arg(inputs.offset);
        launch
            .arg(&mut self.max)
            .arg(&mut self.sum)
            .arg(&mut self.weighted);
        for scalar in scalars {
            launch.arg(scalar);
        }
        // SAFETY: the callers pass the scalars of their kernel (`cross_partial_*`,
        // `cross_partial_mma_f16_*`) and a grid of `blocks` blocks of voxels; the partial buffers
        // hold blocks × columns (× width) values, and the dynamic shared memory is what the kernel
        // lays out for its columns.
        unsafe { launch.launch(grid) }.map_err(driver)?;
        Ok(self)
    }
}

/// `cross_partial_*` on the CUDA cores, tiles of ROWS voxels, columns grouped to fit shared
/// memory.
fn cross_partial<E: Element>(
    b: &CudaBackend<E>,
    inputs: &CrossInputs<'_, E>,
) -> Result<CrossPartials> {
    let (n, columns, width) = (inputs.n, inputs.columns, inputs.width);
    let floats = CROSS_SHARED_BYTES / 4;
    let per_column = ROWS + 3 + width;
    let group = floats.saturating_sub(ROWS * (width + 1)) / per_column;
    if group == 0 {
        return Err(Error::Shape(format!(
            "width {width} is too wide for the cross-attention kernel"
        )));
    }
    let group = group.min(columns);
    let groups = columns.div_ceil(group);
    let shared = 4 * (ROWS * (width + 1) + group * per_column);
    let f = b.kernel(MODULE, "cross_partial")?;
    b.allow_shared_memory(&f, shared)?;
    let per_multiprocessor = f.blocks_per_multiprocessor(CROSS_THREADS, shared)?;
    let (partials, tokens_per_block) =
        CrossPartials::split(b, inputs, ROWS, groups, per_multiprocessor)?;
    let grid = LaunchConfig {
        grid_dim: (partials.blocks as u32, groups as u32, 1),
        block_dim: (CROSS_THREADS, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    let scalars = [n, width, columns, group, tokens_per_block].map(|v| v as i64);
    partials.launch(b, &f, inputs, &scalars, grid)
}

/// `cross_partial_mma_f16_{width}` on the tensor cores: a warp per 16 columns, up to 8 warps a
/// block (fewer where the device's shared memory asks it), the columns split evenly over
/// blockIdx.y. Its dynamic shared memory is `CrossShared` in kernels/attention.cu.
fn cross_partial_mma<E: Element>(
    b: &CudaBackend<E>,
    inputs: &CrossInputs<'_, E>,
) -> Result<CrossPartials> {
    let (n, columns, width) = (inputs.n, inputs.columns, inputs.width);
    let ld = width + 8;
    // CrossShared: LN(x) of a tile, the next tile's x, the folded queries of 16 columns a warp,
    // all in padded rows.
    let shared = |warps: usize| 2 * (2 * CROSS_MMA_TOKENS + 16 * warps) * ld;
    let column_blocks = columns.div_ceil(16);
    let (groups, warps) = [8, 4, 2, 1]
        .into_iter()
        .map(|most| {
            let groups = column_blocks.div_ceil(most);
            (groups, column_blocks.div_ceil(groups))
        })
        .find(|&(_, warps)| shared(warps) <= b.shared_memory_optin)
        .ok_or_else(|| Error::Backend {
            backend: "cuda",
            message: format!(
                "cross_partial_mma_f16_{width} needs {} bytes of shared memory; this GPU allows {}",
                shared(1),
                b.shared_memory_optin
            ),
        })?;
    let f = b.function(MODULE, &format!("cross_partial_mma_f16_{width}"))?;
    b.allow_shared_memory(&f, shared(warps))?;
    let per_multiprocessor = f.blocks_per_multiprocessor(32 * warps as u32, shared(warps))?;
    let (partials, tokens_per_block) =
        CrossPartials::split(b, inputs, CROSS_MMA_TOKENS, groups, per_multiprocessor)?;
    let grid = LaunchConfig {
        grid_dim: (partials.blocks as u32, groups as u32, 1),
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: shared(warps) as u32,
    };
    let scalars = [n, columns, tokens_per_block].map(|v| v as i64);
    partials.launch(b, &f, inputs, &scalars, grid)
}

/// Whether the fused kernels' label copy (`copy_click_labels_mma`) takes these heads: tokens of a
/// fused width (`CudaBackend::fused_head_width`), heads of at most 64 values (ASSIGN_MAX_DH) and of
/// an even number of them (a lane stores its values of a row in pairs).
fn fused_heads<E: Element>(width: usize, heads: usize) -> bool {
    let dh = width / heads;
    CudaBackend::<E>::fused_head_width(width)
        && dh <= ASSIGN_HEAD_WIDTHS[ASSIGN_HEAD_WIDTHS.len() - 1]
        && dh.is_multiple_of(2)
}

/// The click side of a layer after its cross-attention (`Backend::click_update`): one block of
/// `click_update_f16_{width}` where the fused kernels' widths, heads of at most 64 and up to 128
/// clicks allow it (a warp per 16 clicks, the fewest of FUSED_ROWS that holds them all and whose
/// shared memory the device allows), else op by op.
pub fn click_update<E: Element>(
    b: &CudaBackend<E>,
    clicks: &mut CudaTensor<E>,
    attended: &CudaTensor<E>,
    update: &ClickUpdate<'_, CudaTensor<E>>,
) -> Result<CudaTensor<E>> {
    let (n, width, hidden) = shapes::click_update(clicks, attended, update)?;
    // ClickShared in kernels/attention.cu (the operand, K, V and one weight matrix), or the
    // FFN's own layout where that is larger.
    let shared = |rows: usize| {
        (2 * (3 * rows + width) * (width + 8)).max(gelu_mlp_shared_bytes(width, width, rows))
    };
    let rows = FUSED_ROWS
        .into_iter()
        .rev()
        .find(|&rows| n <= rows && shared(rows) <= b.shared_memory_optin);
    let Some(rows) = rows.filter(|_| n > 0 && fused_heads::<E>(width, update.heads)) else {
        return click_update_in_parts(b, clicks, attended, update);
    };
    let mut keys = b.output(vec![n, width])?;
    let f = b.function(MODULE, &format!("click_update_f16_{width}"))?;
    b.allow_shared_memory(&f, shared(rows))?;
    let (nc, h, heads) = (n as i64, hidden as i64, update.heads as i32);
    let (own, ffn) = (update.self_attention, update.ffn);
    let mut launch = b.launch_builder(&f);
    launch.arg(&mut clicks.data).arg(&attended.data);
    // Every weight with its bias (a LayerNorm's scale with its shift), in the kernel's order.
    let pairs = [
        (&update.cross_out.weight, &update.cross_out.bias),
        (&update.self_norm.weight, &update.self_norm.bias),
        (&own.q.weight, &own.q.bias),
        (&own.k.weight, &own.k.bias),
        (&own.v.weight, &own.v.bias),
        (&own.out.weight, &own.out.bias),
        (&ffn.norm.weight, &ffn.norm.bias),
        (&ffn.mlp.up.weight, &ffn.mlp.up.bias),
        (&ffn.mlp.down.weight, &ffn.mlp.down.bias),
        (&update.key_norm.weight, &update.key_norm.bias),
        (&update.key.weight, &update.key.bias),
    ];
    for (weight, bias) in pairs {
        launch.arg(&weight.data).arg(&bias.data);
    }
    launch.arg(&mut keys.data).arg(&nc).arg(&h).arg(&heads);
    let grid = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (2 * rows as u32, 1, 1),
        shared_mem_bytes: shared(rows) as u32,
    };
    // SAFETY: matches `click_update_f16_*`'s arguments in order; the storage is f16
    // (fused_head_width), every shape was checked by shapes::click_update, the block's rows
    // hold every click, the heads are at most 64 wide (ASSIGN_MAX_DH), and the shared memory is
    // what the kernel lays out for `rows` rows.
    unsafe { launch.launch(grid) }.map_err(driver)?;
    Ok(keys)
}

pub fn label_assignment<E: Element>(
    b: &CudaBackend<E>,
    x: &mut CudaTensor<E>,
    click_keys: &CudaTensor<E>,
    click_values: &CudaTensor<E>,
    auto_embedding: &CudaTensor<E>,
    params: &LabelAssignment<'_, CudaTensor<E>>,
) -> Result<()> {
    let (n, clicks, width) =
        shapes::label_assignment(x, click_keys, click_values, auto_embedding, params)?;
    let dh = width / params.heads;
    let Some(&max_dh) = ASSIGN_HEAD_WIDTHS.iter().find(|&&bound| dh <= bound) else {
        return Err(Error::Shape(format!(
            "head width {dh} is wider than the CUDA label assignment takes ({})",
            ASSIGN_HEAD_WIDTHS[ASSIGN_HEAD_WIDTHS.len() - 1]
        )));
    };
    if n == 0 {
        return Ok(());
    }
    if fused_heads::<E>(width, params.heads) {
        let inputs = [click_keys, click_values, auto_embedding];
        return fused_label_assignment(b, x, inputs, params, [n, clicks, width]);
    }
    let normed = norm::layer_norm(b, x, params.norm_q)?;
    let mut queries = b.output(vec![n, width])?;
    gemm(b, &normed, params.q, &mut queries, Epilogue::Plain)?;
    let mut mixed = normed; // reuse: LN(x) is no longer needed
    let f = b.function(MODULE, &format!("assign_mix_{}_{max_dh}", E::SUFFIX))?;
    let (tokens, nc, h, alpha) = (n as i64, clicks as i64, params.heads as i64, params.alpha);
    let dh = dh as i32;
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&queries.data)
        .arg(&click_keys.data)
        .arg(&click_values.data)
        .arg(&auto_embedding.data);
    launch
        .arg(&mut mixed.data)
        .arg(&tokens)
        .arg(&nc)
        .arg(&h)
        .arg(&dh)
        .arg(&alpha);
    // SAFETY: matches `assign_mix_*_{max_dh}`; every buffer holds n × width (clicks × width) values.
    unsafe { launch.launch(b.elementwise(n * params.heads)) }.map_err(driver)?;
    gemm(b, &mixed, params.out, x, Epilogue::Residual)
}

/// The whole sub-layer in one launch, on tensor cores: `assign_wgmma_f16_{width}` where the GPU
/// runs the sm_90a cubins and the width is a multiple of 64 (blocks of 128 tokens), else
/// `assign_fused_f16_{width}` (widths that are multiples of 16 up to 128, mma.sync), after
/// `pack_click_fragments_f16`. Their dynamic shared memory is `AssignShared` in
/// kernels/attention.cu: the f16 operand (Va, then the mix), one staged D × D weight matrix (both
/// rows padded by 8 halves for mma.sync, wgmma's core matrices otherwise) and the f16 rows of
/// LN_q(x), then Q (padded). The wgmma kernel gets the larger of the two layouts, which its
/// mma.sync build for other targets would take.
fn fused_label_assignment<E: Element>(
    b: &CudaBackend<E>,
    x: &mut CudaTensor<E>,
    [keys, values, auto_embedding]: [&CudaTensor<E>; 3],
    params: &LabelAssignment<'_, CudaTensor<E>>,
    [n, clicks, width]: [usize; 3],
) -> Result<()> {
    let ld = width + 8;
    let padded = |rows: usize| 2 * (2 * rows + width) * ld;
    let (f, grid) = b.fused_head_kernel(
        MODULE,
        ["assign_fused", "assign_wgmma"],
        width,
        n,
        padded(128).max(2 * (128 * width + width * width + 128 * ld)),
        padded,
    )?;
    let fragments = click_fragments(b, keys, values, params.heads)?;
    let (tokens, nc) = (n as i64, clicks as i64);
    let (heads, alpha) = (params.heads as i32, params.alpha);
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&mut x.data)
        .arg(&params.norm_q.weight.data)
        .arg(&params.norm_q.bias.data)
        .arg(&params.q.weight.data)
        .arg(&params.q.bias.data);
    launch.arg(&fragments).arg(&auto_embedding.data);
    launch
        .arg(&params.out.weight.data)
        .arg(&params.out.bias.data);
    launch.arg(&tokens).arg(&nc).arg(&heads).arg(&alpha);
    // SAFETY: matches `assign_{fused,wgmma}_f16_*`'s arguments in order; the storage is f16
    // (TENSOR_CORES); every tensor's shape was checked by shapes::label_assignment (Va is n ×
    // width), the heads are fused_heads, `fragments` holds the clicks' (click_fragments), and the
    // shared memory holds the kernel's AssignShared for the block's rows.
    unsafe { launch.launch(grid) }.map_err(driver)?;
    Ok(())
}

/// The clicks' keys and values (clicks × width each) as the B fragments of the fused label
/// copy's products, laid out as its PackedClicks reads them: per 16 clicks and head, ⌈dh/16⌉
/// fragments of keys then as many of values, 32 lanes' 16 bytes each (`pack_click_fragments_f16`,
/// a warp a fragment; 8 KB for TIS-B's 10 clicks).
fn click_fragments<E: Element>(
    b: &CudaBackend<E>,
    keys: &CudaTensor<E>,
    values: &CudaTensor<E>,
    heads: usize,
) -> Result<CudaSlice<u32>> {
    let (clicks, width) = (keys.shape[0], keys.shape[1]);
    let lanes = clicks.div_ceil(16) * heads * 2 * (width / heads).div_ceil(16) * 32;
    let mut fragments = b.uninitialised::<u32>(4 * lanes)?;
    let f = b.function(MODULE, "pack_click_fragments_f16")?;
    let (nc, nw, nh) = (clicks as i32, width as i32, heads as i32);
    let mut launch = b.launch_builder(&f);
    launch
        .arg(&keys.data)
        .arg(&values.data)
        .arg(&mut fragments)
        .arg(&nc)
        .arg(&nw)
        .arg(&nh);
    // SAFETY: matches `pack_click_fragments_f16`; keys and values hold clicks × width f16 values
    // (shapes::label_assignment), `fragments` the `lanes` uint4 it writes, a warp's 32 a
    // fragment, with a thread for each.
    unsafe { launch.launch(b.elementwise(lanes)) }.map_err(driver)?;
    Ok(fragments)
}
