"""Trains the default `tis` bundle on the CPU, on synthetic CT phantoms it generates itself.

Usage (from the repository root):

    python python/train.py --out models/default.safetensors [--seed 0] \
        [--encoder-steps 1400] [--head-steps 4000] [--tis target/release/tis]

One run, deterministic given its arguments (one torch thread):

1. data      synthetic abdominal CT phantoms in HU on a 3.0 x 1.0 x 1.0 mm grid (air, body wall,
             fat, bowel, spine, aorta, kidneys, a "liver" with vessels, a "spleen", and 1-3
             small heterogeneous liver "tumours"); the held-out test set is written as NIfTI to
             data/synthetic/.
2. encoder   a small nnU-Net v2 PlainConvUNet (plans written here, CTNormalization with the
             training set's foreground statistics) trained with Dice + CE on random patches.
3. head      the TIS refinement head of shared/design/tis-model.md trained with the encoder
             frozen, on the encoder's sliding-window features and probabilities of separate
             volumes, with clicks simulated like the paper's robot user on the errors of the
             current segmentation (several rounds, the head in the loop); it starts as the
             automatic segmentation, its label assignment as "copy the nearest click".
4. export    the bundle (tis-bundle/1), read back strictly and checked against the reference.
5. eval      `tis eval` (the engine, built beforehand) on data/synthetic, 10 clicks of the
             robot user.

Training runs fixed step counts, so the result depends only on the arguments, never on how fast
the machine happens to be. python/README.md records the exact command and its wall time.
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import (  # noqa: E402
    ModelSpec,
    intensity_properties,
    make_dataset_json,
    make_plans,
    plain_conv_architecture,
    tis_config as make_tis_config,
    write_bundle,
)
from tis_reference import (  # noqa: E402
    TisHead,
    build_network,
    load_bundle,
    refine,
    relative_l2_error,
    roi_rule,
    sliding_window,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "python/train.py"
CONFIGURATION = "3d_fullres"

# ----------------------------------------------------------------------------------------------
# Synthetic CT phantoms
# ----------------------------------------------------------------------------------------------

SPACING = (3.0, 1.0, 1.0)  # mm, (z, y, x)
SHAPE = (32, 96, 96)  # training and test volumes
CLASSES = ["background", "liver", "spleen", "tumour"]
LIVER, SPLEEN, TUMOUR = 1, 2, 3
AIR_HU = -1000.0


def smooth_noise(rng, shape, coarse):
    """Smooth random field: N(0,1) on a coarse grid, trilinear (corners aligned) to shape, f64."""
    coarse = tuple(max(2, int(c)) for c in coarse)
    field = torch.from_numpy(rng.standard_normal(coarse))[None, None]
    return F.interpolate(field, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0].numpy()


class Grid:
    """mm coordinates (z, y, x) of a volume's voxel centres, origin at the volume's centre."""

    def __init__(self, shape, spacing=SPACING):
        self.shape = shape
        axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
        self.z, self.y, self.x = np.meshgrid(*axes, indexing="ij")

    def warp(self, rng, amplitude_mm, coarse=(3, 5, 5)):
        """Coordinates moved by a smooth random displacement (a different one per call)."""
        return tuple(
            c + amplitude_mm * smooth_noise(rng, self.shape, coarse) for c in (self.z, self.y, self.x)
        )

    def ellipsoid(self, rng, centre, radii, amplitude_mm, coarse=(3, 5, 5)):
        """Normalised radius of a smoothly deformed ellipsoid: < 1 inside."""
        z, y, x = self.warp(rng, amplitude_mm, coarse) if amplitude_mm > 0 else (self.z, self.y, self.x)
        return np.sqrt(sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), centre, radii)))


def tube(grid, start, end, radius):
    """Mask of a straight tube (capsule) from start to end (mm)."""
    p = np.stack([grid.z, grid.y, grid.x], axis=-1)
    a, b = np.asarray(start, dtype=float), np.asarray(end, dtype=float)
    t = np.clip(((p - a) @ (b - a)) / max(np.dot(b - a, b - a), 1e-9), 0, 1)
    closest = a + t[..., None] * (b - a)
    return np.linalg.norm(p - closest, axis=-1) < radius


def random_point_in(rng, mask, grid):
    """mm coordinates of a random voxel of mask."""
    index = np.flatnonzero(mask)
    pick = index[rng.integers(len(index))]
    return np.array([grid.z.flat[pick], grid.y.flat[pick], grid.x.flat[pick]])


def make_case(seed, shape=SHAPE):
    """One phantom: (HU image int16, labels uint8), both (z, y, x)."""
    rng = np.random.default_rng(seed)
    g = Grid(shape)
    half = [(n - 1) / 2 * s for n, s in zip(shape, SPACING)]  # mm from centre to the edge
    hu = np.full(shape, AIR_HU)
    labels = np.zeros(shape, dtype=np.uint8)

    # Body: an elliptic cylinder filling most of the field of view; fat, muscle wall, fat.
    body_ay = half[1] * rng.uniform(0.80, 0.92)
    body_ax = half[2] * rng.uniform(0.88, 0.96)
    zw, yw, xw = g.warp(rng, 1.5)
    body_r = np.sqrt((yw / body_ay) ** 2 + (xw / body_ax) ** 2)
    body = body_r < 1
    fat_hu = rng.uniform(-110, -80)
    hu[body] = fat_hu + 12 * smooth_noise(rng, shape, (4, 12, 12))[body]
    wall_inner = rng.uniform(0.82, 0.86)
    wall = body & (body_r > wall_inner) & (body_r < rng.uniform(0.90, 0.93))
    hu[wall] = rng.uniform(40, 60) + 5 * smooth_noise(rng, shape, (4, 10, 10))[wall]
    inner = body & (body_r < wall_inner - 0.04)  # a thin fat layer inside the wall

    # Bowel: soft-tissue loops with a little gas, in the anterior abdomen.
    bowel_field = smooth_noise(rng, shape, (4, 9, 9))
    bowel = inner & (bowel_field > 0.6) & (g.y < body_ay * 0.2)
    hu[bowel] = rng.uniform(15, 40) + 8 * smooth_noise(rng, shape, (6, 16, 16))[bowel]
    gas = bowel & (smooth_noise(rng, shape, (5, 14, 14)) > 1.6)
    hu[gas] = -850 + 50 * rng.standard_normal(int(gas.sum()))

    # Spine (posterior, centred), aorta, kidneys: unlabelled context.
    spine_y = body_ay * rng.uniform(0.45, 0.55)
    spine_r = np.sqrt((g.y - spine_y) ** 2 + (g.x / 1.2) ** 2)
    spine = spine_r < rng.uniform(7, 9)
    hu[spine] = rng.uniform(200, 300) + 40 * smooth_noise(rng, shape, (6, 10, 10))[spine]
    cortex = spine & (spine_r > spine_r[spine].max() - 1.5)
    hu[cortex] = rng.uniform(600, 800)
    aorta_c = (spine_y - rng.uniform(13, 16), rng.uniform(2, 6))
    aorta = np.sqrt((g.y - aorta_c[0]) ** 2 + (g.x - aorta_c[1]) ** 2) < rng.uniform(4, 5.5)
    hu[aorta] = rng.uniform(150, 190)
    for side in (-1, 1):
        centre = (rng.uniform(-8, 8), spine_y - rng.uniform(0, 4), side * rng.uniform(19, 24))
        radii = (rng.uniform(14, 20), rng.uniform(8, 10), rng.uniform(5.5, 7))
        kr = g.ellipsoid(rng, centre, radii, 1.5)
        kidney = kr < 1
        hu[kidney] = rng.uniform(150, 180)
        medulla = kr < 0.55
        hu[medulla] = rng.uniform(70, 100)

    # Liver: two merged, deformed ellipsoids on the image's left, with bright vessels.
    liver_c = np.array([rng.uniform(-6, 6), rng.uniform(-12, -4), -body_ax * rng.uniform(0.32, 0.42)])
    liver_r = np.array([rng.uniform(30, 42), rng.uniform(20, 27), rng.uniform(17, 23)])
    liver = g.ellipsoid(rng, liver_c, liver_r, 4.0) < 1
    lobe_c = liver_c + np.array([rng.uniform(-8, 8), rng.uniform(-4, 6), rng.uniform(14, 22)])
    lobe_r = liver_r * np.array([rng.uniform(0.5, 0.8), rng.uniform(0.45, 0.65), rng.uniform(0.45, 0.65)])
    liver |= g.ellipsoid(rng, lobe_c, lobe_r, 3.0) < 1
    liver &= inner & ~spine & ~aorta
    liver_hu = rng.uniform(50, 70)
    hu[liver] = liver_hu + 4 * smooth_noise(rng, shape, (5, 12, 12))[liver]
    labels[liver] = LIVER
    vessels = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(3, 6)):
        a = random_point_in(rng, liver, g)
        b = random_point_in(rng, liver, g)
        vessels |= tube(g, a, b, rng.uniform(1.0, 2.5))
    vessels &= ndimage.binary_erosion(liver, iterations=1)
    hu[vessels] = rng.uniform(130, 170)

    # Spleen: a smaller deformed ellipsoid posterior right (image), brighter than the liver.
    spleen_c = (rng.uniform(-8, 8), rng.uniform(2, 12), body_ax * rng.uniform(0.45, 0.55))
    spleen_r = (rng.uniform(18, 28), rng.uniform(10, 15), rng.uniform(7, 10))
    spleen = (g.ellipsoid(rng, spleen_c, spleen_r, 2.5) < 1) & inner & ~spine
    spleen &= ~ndimage.binary_dilation(liver, iterations=2)
    hu[spleen] = liver_hu + rng.uniform(25, 50) + 4 * smooth_noise(rng, shape, (5, 10, 10))[spleen]
    labels[spleen] = SPLEEN

    # Tumours: 1-3 heterogeneous lesions clustered in the liver, mostly hypodense, with soft
    # edges, some with a necrotic core or a rim that is nearly as bright as the liver.
    n_tumours = rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2])
    core = ndimage.binary_erosion(liver, iterations=3)
    if not core.any():
        core = liver
    first = random_point_in(rng, core, g)
    tumour_any = np.zeros(shape, dtype=bool)
    for t in range(n_tumours):
        # The first lesion 1-2.4 cm across, satellites 0.5-1.4 cm.
        low, high = (5.0, 12.0) if t == 0 else (2.5, 7.0)
        radius = math.exp(rng.uniform(math.log(low), math.log(high)))
        if t == 0:
            centre = first
        else:
            near = core & (np.sqrt((g.y - first[1]) ** 2 + (g.x - first[2]) ** 2 + (g.z - first[0]) ** 2) < 25)
            centre = random_point_in(rng, near if near.any() else core, g)
        radii = radius * rng.uniform(0.8, 1.25, size=3)
        radii[0] = max(radii[0], 2.0)
        tr = g.ellipsoid(rng, centre, radii, 0.25 * radius, coarse=(3, 4, 4))
        lesion = (tr < 1) & ndimage.binary_dilation(liver, iterations=1)
        if not lesion.any():
            continue
        contrast = rng.uniform(-12, -6) if rng.random() < 0.3 else rng.uniform(-40, -12)
        inside = np.clip((1.0 - tr) / 0.25, 0, 1)  # soft edge: 0 at the border, 1 inside
        value = contrast + rng.uniform(5, 12) * smooth_noise(rng, shape, (8, 24, 24))
        if rng.random() < 0.4:  # necrotic core
            value = value + rng.uniform(-30, -15) * (tr < 0.5)
        if rng.random() < 0.3:  # rim nearly as bright as the liver
            value = np.where(tr > 0.65, value * rng.uniform(0.0, 0.3), value)
        soft = (tr < 1.15) & (liver | lesion)
        hu[soft] = hu[soft] + (value * inside)[soft]
        tumour_any |= lesion
    labels[tumour_any] = TUMOUR

    # Scanner: a little blur, correlated noise.
    hu = ndimage.gaussian_filter(hu, sigma=(0.4, 0.7, 0.7))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=(0.3, 0.6, 0.6))
    hu = hu + rng.uniform(6, 14) * noise / noise.std()
    hu = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    hu[hu == 0] = 1  # no exact zero anywhere: nnU-Net's non-zero crop keeps the whole volume
    return hu, labels


def case_seed(seed, split, index):
    """Seed of case `index` of a split: the splits never share a case."""
    offsets = {"encoder": 10_000, "head": 20_000, "test": 30_000, "validation": 40_000}
    return seed * 1_000_000 + offsets[split] + index


def generate(seed, split, count):
    cases = [make_case(case_seed(seed, split, i)) for i in range(count)]
    return np.stack([c[0] for c in cases]), np.stack([c[1] for c in cases])


def write_nifti_cases(directory, images, labels, prefix):
    """nnU-Net layout: imagesTs/CASE_0000.nii.gz (int16 HU), labelsTs/CASE.nii.gz (uint8)."""
    import SimpleITK as sitk

    names = []
    for sub in ("imagesTs", "labelsTs"):
        target = directory / sub
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        name = f"{prefix}_{index:03d}"
        for array, path in (
            (image.astype(np.int16), directory / "imagesTs" / f"{name}_0000.nii.gz"),
            (label.astype(np.uint8), directory / "labelsTs" / f"{name}.nii.gz"),
        ):
            itk = sitk.GetImageFromArray(array)
            itk.SetSpacing(tuple(float(s) for s in reversed(SPACING)))  # SimpleITK: x, y, z
            sitk.WriteImage(itk, str(path), useCompression=True)
        names.append(name)
    return names


def directory_bytes(directory):
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------
# nnU-Net plans, normalisation
# ----------------------------------------------------------------------------------------------

N_ENCODER_CASES = 48
N_HEAD_CASES = 48
N_TEST_CASES = 36
N_VALIDATION_CASES = 48
HEAD_ERROR_WEIGHT = 0.0
HEAD_DICE_WEIGHT = 1.0
HEAD_LR = 1e-3
NEAREST_CLICK_SHARPNESS = 10.0

PATCH = [32, 64, 64]
FEATURES = [16, 16, 32, 64]
MIRROR_AXES = []
TIS_CONFIG = make_tis_config(
    d_model=48, n_heads=4, ffn_dim=96, n_layers=2, pe_grid=[4, 8, 8],
    roi_margin=[2, 8, 8], roi_min=[8, 32, 32], roi_max=[24, 64, 64],
)


def foreground_properties(images, labels):
    """nnU-Net's foreground_intensity_properties_per_channel, over every foreground voxel."""
    values = np.concatenate([image[label > 0] for image, label in zip(images, labels)]).astype(np.float64)
    p005, median, p995 = np.percentile(values, [0.5, 50.0, 99.5])
    return intensity_properties(
        mean=float(values.mean()), std=float(values.std()), median=float(median),
        minimum=float(values.min()), maximum=float(values.max()),
        percentile_00_5=float(p005), percentile_99_5=float(p995),
    )


def make_plans_and_dataset(properties, n_training):
    plans = make_plans(
        "Dataset990_TisSyntheticLiver",
        patch_size=PATCH,
        spacing=list(SPACING),
        median_shape=list(SHAPE),
        channels=[("CTNormalization", properties)],
        network_fields=plain_conv_architecture(
            features=FEATURES,
            kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
            strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
            n_conv=[2, 2, 2, 2],
            n_conv_decoder=[2, 2, 2],
        ),
    )
    dataset_json = make_dataset_json(["CT"], CLASSES, num_training=n_training)
    return plans, dataset_json


def ct_normalize(images, properties):
    """CTNormalization in float32, as the engine (and nnU-Net) does it."""
    lo, hi = np.float32(properties["percentile_00_5"]), np.float32(properties["percentile_99_5"])
    mean, std = np.float32(properties["mean"]), np.float32(max(properties["std"], 1e-8))
    return ((np.clip(images.astype(np.float32), lo, hi) - mean) / std).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def soft_dice_loss(logits, target, num_classes, smooth=1e-5):
    """nnU-Net's batch soft Dice without background: −mean over classes 1..K−1.

    logits [B, K, ...], target [B, ...] int64.
    """
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, num_classes).movedim(-1, 1)[:, 1:].to(probs.dtype)
    dims = [0] + list(range(2, probs.ndim))
    intersect = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    return -((2 * intersect + smooth) / (denominator + smooth).clamp_min(1e-8)).mean()


# ----------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------


def sample_patch_starts(rng, label, oversample):
    """Patch start (z, y, x): random, or centred on a random voxel of a random foreground class."""
    shape = label.shape
    if oversample:
        present = [c for c in range(1, len(CLASSES)) if (label == c).any()]
        cls = present[rng.integers(len(present))]
        index = np.flatnonzero(label == cls)
        centre = np.unravel_index(index[rng.integers(len(index))], shape)
        return [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, PATCH, shape)]
    return [int(rng.integers(0, s - p + 1)) for p, s in zip(PATCH, shape)]


def train_encoder(net, volumes, labels, steps, rng, log, batch_size=2, base_lr=3e-3):
    """Dice + CE on random patches (a third centred on foreground), AdamW, poly learning rate."""
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=base_lr, weight_decay=3e-5)
    running = []
    started = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = base_lr * (1 - step / steps) ** 0.9
        xs, ys = [], []
        for b in range(batch_size):
            index = int(rng.integers(len(volumes)))
            start = sample_patch_starts(rng, labels[index], oversample=b == batch_size - 1 and rng.random() < 0.66)
            box = tuple(slice(s, s + p) for s, p in zip(start, PATCH))
            xs.append(volumes[index][box])
            ys.append(labels[index][box])
        x = torch.from_numpy(np.stack(xs))[:, None]
        y = torch.from_numpy(np.stack(ys).astype(np.int64))
        logits = net(x)
        loss = F.cross_entropy(logits, y) + soft_dice_loss(logits, y, len(CLASSES))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        optimizer.step()
        running.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"  encoder step {step + 1}/{steps}  loss {np.mean(running[-50:]):.4f}  "
                f"{time.time() - started:.0f} s")
    net.eval()
    return net


def encode_volumes(net, volumes):
    """Sliding-window logits → probabilities, features, automatic labels (as the engine)."""
    out = []
    for volume in volumes:
        logits, features = sliding_window(net, torch.from_numpy(volume)[None], PATCH, MIRROR_AXES)
        out.append((features.contiguous(), torch.softmax(logits, dim=0).contiguous(),
                    logits.argmax(0).numpy().astype(np.uint8)))
    return out


def dice(a, b, cls):
    x, y = a == cls, b == cls
    total = x.sum() + y.sum()
    return None if total == 0 else 2.0 * (x & y).sum() / total


def mean_dice_table(predictions, references):
    rows = {}
    for cls in range(1, len(CLASSES)):
        values = [d for d in (dice(p, r, cls) for p, r in zip(predictions, references)) if d is not None]
        rows[CLASSES[cls]] = float(np.mean(values)) if values else float("nan")
    return rows


# ----------------------------------------------------------------------------------------------
# Simulated clicks: the paper's robot user (§4.1), in training as in evaluation
# ----------------------------------------------------------------------------------------------


def most_interior(member):
    """The voxel of a region farthest (6-neighbour steps) from outside it and the grid's border."""
    depth = ndimage.distance_transform_cdt(np.pad(member, 1), metric="taxicab")[1:-1, 1:-1, 1:-1]
    return np.unravel_index(int(np.argmax(depth)), member.shape)


def robot_click(labels, reference, rng, jitter=10):
    """The paper's robot as training sampler: centre of the largest 6-connected error region,
    moved by the first jitter draw inside the ball (kept only if it stays in the region). The
    engine's robot (src/pipeline/robot.rs) redraws up to ten times until it lands in the region;
    this sampler keeps the rule the default model was trained with."""
    regions, count = ndimage.label(labels != reference)
    if count == 0:
        return None
    sizes = np.bincount(regions.ravel())[1:]
    member = regions == (int(np.argmax(sizes)) + 1)
    coords = np.argwhere(member)
    n = len(coords)
    centre = tuple(int(min((2 * s + n) // (2 * n), g - 1)) for s, g in zip(coords.sum(0), member.shape))
    if member[centre]:
        chosen = centre
        for _ in range(10):
            offset = rng.integers(-jitter, jitter + 1, size=3)
            if (offset**2).sum() > jitter**2:
                continue
            p = tuple(int(c + o) for c, o in zip(centre, offset))
            if all(0 <= c < g for c, g in zip(p, member.shape)):
                if member[p]:
                    chosen = p
                break
    else:
        chosen = most_interior(member)
    return (*chosen, int(reference[chosen]))


# ----------------------------------------------------------------------------------------------
# TIS head
# ----------------------------------------------------------------------------------------------


def start_channels(c_f):
    """Token channels that init_head_as_automatic fills beyond [F, −F]: the constant +1 (−1
    beside it), and the first of the four ROI-coordinate channels z, y, x, r²."""
    return 2 * c_f, 2 * c_f + 2


def zero_linears(*linears):
    for linear in linears:
        linear.weight.zero_()
        linear.bias.zero_()


def init_head_as_automatic(head, net):
    """Starts the head as the automatic segmentation: refined argmax = auto argmax, any clicks.

    The network's last layer is linear in the features, logits = W·F + b. The head's first
    2·C_f + 2 channels start as [F, −F, 1, −1] (zero mean across channels, so the output
    LayerNorm only rescales them), out_proj reads W/2, −W/2, b/2, −b/2 from them (rows summing to
    zero, so any common shift cancels), and every residual branch that writes into the voxel
    tokens (assign_out, assign_ffn's last Linear) starts at zero. The refined logits are then
    the automatic logits divided by a per-voxel positive scale, and training learns only what
    the clicks change. pos_grid starts with the ROI's coordinates (z, y, x in [−1, 1] and the
    squared distance from the ROI's centre, where a single click sits) in four channels the
    output ignores, so attention can weigh clicks by distance from the first step. Everything
    stays trainable; this is an initialisation, the architecture is the contract's.
    """
    seg = net.decoder.seg_layers[-1]
    weight = seg.weight.detach().reshape(seg.out_channels, seg.in_channels)
    bias = seg.bias.detach()
    c_f, d_model = seg.in_channels, head.pos_grid.shape[0]
    constant, coordinates = start_channels(c_f)
    assert coordinates + 4 <= d_model, "d_model too small for the automatic-segmentation start"
    eye = torch.eye(c_f)
    _, gz, gy, gx = head.pos_grid.shape
    z, y, x = torch.meshgrid(*(torch.linspace(-1.0, 1.0, n) for n in (gz, gy, gx)), indexing="ij")
    r2 = z**2 + y**2 + x**2
    with torch.no_grad():
        proj = head.input_proj
        proj.weight[:coordinates].zero_()
        proj.weight[:c_f] = eye
        proj.weight[c_f:constant] = -eye
        proj.bias[:coordinates] = 0.0
        proj.bias[constant], proj.bias[constant + 1] = 1.0, -1.0
        head.pos_grid[: coordinates + 4] = 0.0
        for channel, values in enumerate((z, y, x, r2 - r2.mean())):
            head.pos_grid[coordinates + channel] = values
        out = head.out_proj
        zero_linears(out)
        out.weight[:, :c_f] = weight / 2
        out.weight[:, c_f:constant] = -weight / 2
        out.weight[:, constant] = bias / 2
        out.weight[:, constant + 1] = -bias / 2
        for layer in head.layers:
            zero_linears(layer.assign_out, layer.assign_ffn[2])


def init_assignment_as_nearest_click(head, features, sharpness=NEAREST_CLICK_SHARPNESS):
    """Starts the first attention head of every label assignment as "copy the nearest click".

    Called after init_head_as_automatic, whose pos_grid channels 2·C_f+2 … 2·C_f+5 hold the ROI's
    coordinates p = (z, y, x) in [−1, 1] and r² = |p|² − const, and channel 2·C_f the constant 1.
    Without a prior on distance the assignment learns to copy the label of the click whose
    features a voxel resembles, and the voxels of a tumour the encoder missed resemble the liver:
    a liver click after a tumour click turned them back to liver even beside the tumour click
    (the dip at the second click in docs/interactive.md). Here head 0 of assign_q / assign_k
    starts with queries s·(p, 1) and keys s·(p_c, −r²_c / 2), so its logits are
    −s²·|p − p_c|² / (2·√d_h) plus terms the softmax over clicks cancels: each voxel attends to
    its nearest click. LayerNorm divides a token by its spread across channels, so s is
    `sharpness` times the median spread of input_proj(F) over every 97th voxel of `features`
    (one training case, C_f × Z × Y × X; a sample is enough for a median). The click branch's
    output projections start at zero, so a click token is still its voxel's token, coordinates
    included, when the assignment reads it.
    The coordinate channels stop reading the features. All of it stays trainable.
    """
    c_f, d_model = features.shape[0], head.pos_grid.shape[0]
    constant, coordinates = start_channels(c_f)
    d_head = d_model // head.layers[0].n_heads
    with torch.no_grad():
        head.input_proj.weight[coordinates : coordinates + 4] = 0.0
        head.input_proj.bias[coordinates : coordinates + 4] = 0.0
        tokens = head.input_proj(features.reshape(c_f, -1).T[::97])
        scale = sharpness * float(tokens.std(dim=1, unbiased=False).median())
        for layer in head.layers:
            zero_linears(layer.click_cross.out_proj, layer.click_self.out_proj, layer.click_ffn[2])
            query, key = layer.assign_q, layer.assign_k
            for linear in (query, key):
                linear.weight[:d_head] = 0.0
                linear.bias[:d_head] = 0.0
                for axis in range(3):
                    linear.weight[axis, coordinates + axis] = scale
            query.weight[3, constant] = scale
            key.weight[3, coordinates + 3] = -scale / 2


def train_head(head, encoded, references, steps, rng, log, base_lr=HEAD_LR, max_clicks=10):
    """The head on episodes of simulated clicks, the head in the loop, encoder frozen.

    An episode starts from a volume's automatic segmentation; each click is chosen from the
    errors of the labels shown so far (automatic outside the ROI, the head's inside, as the
    engine shows them), the head refines with all clicks so far (ROI rule of the contract), and
    one optimiser step is taken on CE + Dice of the refined ROI against the reference.
    """
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=base_lr, weight_decay=1e-4)
    warmup = max(1, steps // 50)
    history = {"loss": [], "gain": [], "tumour_gain": []}
    started = time.time()
    step = 0
    while step < steps:
        index = int(rng.integers(len(encoded)))
        features, probs, auto = encoded[index]
        reference = references[index]
        labels = auto.copy()
        clicks = []
        episode_clicks = int(rng.integers(1, max_clicks + 1)) if rng.random() < 0.3 else max_clicks
        for _ in range(episode_clicks):
            if step >= steps:
                break
            click = robot_click(labels, reference, rng)
            if click is None:
                break
            clicks.append(click)
            click_tensor = torch.tensor(clicks, dtype=torch.int64)
            roi, inside = roi_rule(click_tensor, auto.shape, TIS_CONFIG)
            box = tuple(slice(a, b) for a, b in roi)
            local = click_tensor[inside].clone()
            local[:, :3] -= torch.tensor([a for a, _ in roi])
            target = torch.from_numpy(reference[box].astype(np.int64))

            lr = base_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = head(features[(slice(None),) + box], probs[(slice(None),) + box], local)
            # CE weighted towards the voxels the automatic segmentation gets wrong, + Dice.
            weight = 1.0 + HEAD_ERROR_WEIGHT * torch.from_numpy(auto[box] != reference[box]).float()
            ce = (F.cross_entropy(logits[None], target[None], reduction="none")[0] * weight).sum() / weight.sum()
            loss = ce + HEAD_DICE_WEIGHT * soft_dice_loss(logits[None], target[None], len(CLASSES))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimizer.step()
            step += 1

            refined = logits.detach().argmax(0).numpy().astype(np.uint8)
            labels = auto.copy()
            labels[box] = refined
            history["loss"].append(loss.item())
            history["gain"].append(float((refined == reference[box]).mean() - (auto[box] == reference[box]).mean()))
            if step % 100 == 0 or step == steps:
                d_auto, d_now = dice(auto, reference, TUMOUR), dice(labels, reference, TUMOUR)
                log(f"  head step {step}/{steps}  loss {np.mean(history['loss'][-100:]):.4f}  "
                    f"ROI accuracy gain over auto {100 * np.mean(history['gain'][-100:]):+.2f} %  "
                    f"lr {lr:.1e}  {time.time() - started:.0f} s")
        if clicks:
            d_auto, d_now = dice(auto, reference, TUMOUR), dice(labels, reference, TUMOUR)
            if d_auto is not None and d_now is not None:
                history["tumour_gain"].append(d_now - d_auto)
                if len(history["tumour_gain"]) % 25 == 0:
                    log(f"  episodes {len(history['tumour_gain'])}: tumour Dice gain after the "
                        f"episode, mean of last 25: {np.mean(history['tumour_gain'][-25:]):+.3f}")
    head.eval()
    return head


# ----------------------------------------------------------------------------------------------
# Export, checks, evaluation
# ----------------------------------------------------------------------------------------------


def check_bundle(path, net, head, volume, encoded_case, log):
    """Strict reload; the reloaded network and head reproduce this script's outputs exactly."""
    loaded_net, loaded_head, metadata = load_bundle(path)
    logits, features = sliding_window(loaded_net, torch.from_numpy(volume)[None], PATCH, MIRROR_AXES)
    features_ref, probs_ref, _ = encoded_case
    clicks = torch.tensor([[16, 40, 30, TUMOUR], [15, 44, 36, LIVER], [17, 38, 28, 0]], dtype=torch.int64)
    _, _, refined = refine(loaded_head, features, torch.softmax(logits, 0), clicks, json.loads(metadata["tis_config"]))
    _, _, expected = refine(head, features_ref, probs_ref, clicks, TIS_CONFIG)
    errors = {
        "features": relative_l2_error(features, features_ref),
        "probabilities": relative_l2_error(torch.softmax(logits, 0), probs_ref),
        "refined logits": relative_l2_error(refined, expected),
    }
    for what, error in errors.items():
        if not error <= 1e-6:
            raise AssertionError(f"{path}: {what} not reproduced by the reloaded bundle ({error})")
    log("  reloaded strictly: " + ", ".join(f"{k} rel. L2 {v:.1e}" for k, v in errors.items()))


def format_eval(summary):
    """tis-eval's JSON summary as a Markdown table: mean ± std Dice per class after n clicks."""
    classes = [c for c in CLASSES[1:] if c in summary["summary"][0]["dice"]]
    lines = ["| clicks | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for row in summary["summary"]:
        cells = [f"{row['dice'][c]['mean']:.3f} ± {row['dice'][c]['std']:.3f}" for c in classes]
        lines.append(f"| {row['clicks']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hardest_class_gain(summary):
    """(class, automatic Dice, Dice after the last click) of the class with the lowest auto Dice."""
    rows = summary["summary"]
    auto = {c: v["mean"] for c, v in rows[0]["dice"].items()}
    hardest = min(auto, key=auto.get)
    return hardest, auto[hardest], rows[-1]["dice"][hardest]["mean"]


def run_tis_eval(tis, images, labels, bundle, clicks=10):
    command = [str(tis), "eval", str(images), str(labels), "-m", str(bundle), "--clicks", str(clicks), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout), " ".join(command)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="bundle to write (.safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder-steps", type=int, default=1400)
    parser.add_argument("--head-steps", type=int, default=4000)
    parser.add_argument("--tis", type=Path, default=REPO / "target" / "release" / "tis",
                        help="the engine's binary, for the final evaluation")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "synthetic")
    parser.add_argument("--validation", type=Path,
                        help="development: write the validation phantoms here and evaluate on them "
                             "instead of the held-out test set (rank variants on these)")
    parser.add_argument("--cache", type=Path, help="development: reuse/keep the trained encoder here")
    parser.add_argument("--skip-eval", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    t_start = time.time()
    phases = {}

    def log(message):
        print(f"[{time.time() - t_start:7.1f} s] {message}", flush=True)

    def phase(name, since):
        phases[name] = time.time() - since
        log(f"{name}: {phases[name]:.1f} s")
        return time.time()

    encoder_steps, head_steps = args.encoder_steps, args.head_steps
    log(f"seed {args.seed}: {encoder_steps} encoder steps, {head_steps} head steps, "
        f"{args.threads} torch thread(s)")

    # 1. Data
    t = time.time()
    enc_images, enc_labels = generate(args.seed, "encoder", N_ENCODER_CASES)
    head_images, head_labels = generate(args.seed, "head", N_HEAD_CASES)
    test_images, test_labels = generate(args.seed, "test", N_TEST_CASES)
    write_nifti_cases(args.data, test_images, test_labels, "synth")
    if args.validation:
        write_nifti_cases(args.validation, *generate(args.seed, "validation", N_VALIDATION_CASES), "val")
    properties = foreground_properties(enc_images, enc_labels)
    plans, dataset_json = make_plans_and_dataset(properties, N_ENCODER_CASES)
    log(f"data: {N_ENCODER_CASES} encoder + {N_HEAD_CASES} head training cases {SHAPE}, "
        f"{N_TEST_CASES} test cases -> {args.data} ({directory_bytes(args.data)} bytes)")
    log("foreground intensities: " + json.dumps(properties))
    enc_volumes = ct_normalize(enc_images, properties)
    head_volumes = ct_normalize(head_images, properties)
    test_volumes = ct_normalize(test_images, properties)
    t = phase("data", t)

    # 2. Encoder
    torch.manual_seed(args.seed)
    net = build_network(plans, CONFIGURATION, dataset_json)
    cache = args.cache / f"encoder-seed{args.seed}-steps{encoder_steps}.pt" if args.cache else None
    if cache is not None and cache.exists():
        net.load_state_dict(torch.load(cache))
        log(f"encoder loaded from {cache}")
    else:
        train_encoder(net, enc_volumes, enc_labels, encoder_steps, np.random.default_rng([args.seed, 1]), log)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(net.state_dict(), cache)
    net.eval()
    t = phase("encoder training", t)

    encoded = encode_volumes(net, head_volumes)
    test_encoded = encode_volumes(net, test_volumes)
    log("automatic Dice, head training cases: " + json.dumps(
        mean_dice_table([e[2] for e in encoded], head_labels), default=lambda v: round(v, 4)))
    log("automatic Dice, test cases (python): " + json.dumps(
        mean_dice_table([e[2] for e in test_encoded], test_labels), default=lambda v: round(v, 4)))
    t = phase("encoder features", t)

    # 3. Head
    torch.manual_seed(args.seed + 1)
    head = TisHead.from_config(TIS_CONFIG, feature_channels=FEATURES[0], num_classes=len(CLASSES))
    init_head_as_automatic(head, net)
    init_assignment_as_nearest_click(head, encoded[0][0])
    train_head(head, encoded, head_labels, head_steps, np.random.default_rng([args.seed, 2]), log)
    t = phase("head training", t)

    # 4. Export
    source = (
        f"trained by {SCRIPT} --seed {args.seed} --encoder-steps {encoder_steps} --head-steps "
        f"{head_steps} (CPU, {args.threads} torch thread(s)) on synthetic CT "
        f"phantoms it generates ({N_ENCODER_CASES} + {N_HEAD_CASES} cases {SHAPE} at "
        f"{SPACING} mm: body, fat, bowel, spine, aorta, kidneys, liver with vessels, spleen, 1-3 "
        f"heterogeneous liver tumours). A synthetic-data demo model, NOT for clinical use."
    )
    spec = ModelSpec(seed=args.seed, plans=plans, dataset_json=dataset_json, tis_config=TIS_CONFIG,
                     mirror_axes=MIRROR_AXES, source=source)
    write_bundle(args.out, net, head, spec)
    log(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    check_bundle(args.out, net, head, test_volumes[0], test_encoded[0], log)
    t = phase("export", t)

    # 5. Evaluation by the engine
    if not args.skip_eval:
        # Development runs (--validation) never look at the held-out test set.
        split, directory = ("validation", args.validation) if args.validation else ("test", args.data)
        summary, command = run_tis_eval(args.tis, directory / "imagesTs", directory / "labelsTs", args.out)
        log(command)
        print(format_eval(summary), flush=True)
        hardest, before, after = hardest_class_gain(summary)
        log(f"{split}: hardest class {hardest}: {before:.3f} automatic -> {after:.3f} after "
            f"{summary['summary'][-1]['clicks']} clicks ({100 * (after - before):+.1f} points); "
            f"median click {summary['median_click_ms']:.0f} ms")
        t = phase("evaluation", t)
    log("phases: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in phases.items())
        + f"; total {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
