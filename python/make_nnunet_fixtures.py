"""Builds a small but real nnU-Net v2 model with nnunetv2 itself and records what nnU-Net's own
predictor outputs, so that the Rust pipeline can be checked against nnUNetPredictor.

Usage (from the repository root): python python/make_nnunet_fixtures.py [--keep DIR]

In a temporary folder (kept in DIR with --keep) it
  1. writes nnUNet_raw/Dataset905_TisParity: 9 synthetic CT-like training cases (int16 HU,
     labels background/organ/lesion), written with SimpleITK,
  2. runs nnU-Net's fingerprint extraction and its ExperimentPlanner (a subclass that only sets
     UNet_base_num_features = 8 and UNet_max_features_3d = 32, to keep the files small),
  3. preprocesses the training cases with nnU-Net's DefaultPreprocessor and trains the
     3d_fullres PlainConvUNet briefly (nnU-Net's initialisation, loss and optimiser, a plain loop),
  4. saves nnUNet_results/Dataset905_TisParity/nnUNetTrainer__nnUNetPlans__3d_fullres/ in
     nnU-Net's layout (plans.json, dataset.json, fold_0/checkpoint_final.pth),
and writes into tests/fixtures/nnunet/:
  bundle.safetensors, bundle_with_head.safetensors  (python/export_nnunet.py)
  case{i}_0000.nii.gz, case{i}.seg.nii.gz, case{i}.golden.safetensors  (nnUNetPredictor)
  resampling.golden.safetensors  (resample_data_or_seg_to_shape, binary_fill_holes)
python/README.md documents the layout. Everything is seeded; reruns write identical files.
"""

import argparse
import contextlib
import io
import itertools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# nnU-Net reads these when it needs them; they must exist before its multiprocessing starts.
os.environ.setdefault("nnUNet_def_n_proc", "2")
os.environ.setdefault("nnUNet_n_proc_DA", "2")

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_nnunet  # noqa: E402
from make_fixtures import redraw_head, report_sizes, save_safetensors  # noqa: E402
from tis_reference import (  # noqa: E402
    HEAD_PREFIX,
    TisHead,
    _with_aliases,
    build_network,
    gaussian_importance,
    predict_tile,
    relative_l2_error,
    sliding_window,
    tile_starts as reference_tile_starts,
)

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "nnunet"
SCRIPT = "python/make_nnunet_fixtures.py"
MAX_TOTAL_BYTES = 2_500_000
DATASET_ID = 905
DATASET = f"Dataset{DATASET_ID}_TisParity"
TRAINER_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"
CONFIGURATION = "3d_fullres"
LABELS = {"background": 0, "organ": 1, "lesion": 2}
DATA_SEED = 905
TORCH_SEED = 9050
HEAD_SEED = 9051
RESAMPLING_SEED = 9052
TRAIN_ITERATIONS = 1000
TIS_CONFIG = {
    "d_model": 16, "n_heads": 2, "ffn_dim": 32, "n_layers": 1, "pe_grid": [2, 4, 4],
    "roi_margin": [1, 4, 4], "roi_min": [4, 16, 16], "roi_max": [12, 32, 32],
}


# ----------------------------------------------------------------------------------------------
# Synthetic CT
# ----------------------------------------------------------------------------------------------


def synth_case(rng, shape, spacing, dtype=np.int16):
    """(image in HU [z, y, x], labels uint8) of a small CT-like volume.

    Geometry is in mm (voxel centres, volume centred at 0), so that structures have the same size
    whatever the spacing: a body ellipse in air, an ellipsoidal organ (label 1, ~100 HU) and a
    spherical lesion inside it (label 2, ~170 HU), partial-volume blur and noise.
    """
    from scipy.ndimage import gaussian_filter

    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    extent = [n * s for n, s in zip(shape, spacing)]
    body = (y / (0.46 * extent[1])) ** 2 + (x / (0.47 * extent[2])) ** 2 < 1
    centre = rng.uniform(-2.0, 2.0, size=3) * np.array([0.5, 1, 1])
    radii = np.array([rng.uniform(5.0, 7.0), rng.uniform(7.0, 9.5), rng.uniform(7.0, 9.5)])
    organ = sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), centre, radii)) < 1
    lesion_centre = centre + rng.uniform(-0.3, 0.3, size=3) * radii
    lesion_radius = rng.uniform(3.8, 4.8)
    lesion = sum((c - m) ** 2 for c, m in zip((z, y, x), lesion_centre)) < lesion_radius**2
    lesion &= organ
    labels = np.zeros(shape, np.uint8)
    labels[organ] = 1
    labels[lesion] = 2

    hu = np.full(shape, -1000.0)
    hu[body] = 25.0 + 20.0 * np.sin(y[body] / 3.0) * np.cos(x[body] / 4.0)
    hu[organ] = 100.0
    hu[lesion] = 170.0
    sigma = [0.35 * min(spacing) / s for s in spacing]
    hu = gaussian_filter(hu, sigma=[max(s, 0.3) for s in sigma], mode="nearest")
    hu += rng.normal(0.0, 12.0, size=shape)
    image = np.round(hu).astype(dtype) if dtype == np.int16 else hu.astype(dtype)
    return image, labels


def write_image(path, array, spacing_zyx, origin=(0.0, 0.0, 0.0), direction=None):
    """NIfTI via SimpleITK; spacing given in array order (z, y, x), ITK order is reversed."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    image.SetOrigin([float(o) for o in origin])
    if direction is not None:
        image.SetDirection([float(d) for d in direction])
    sitk.WriteImage(image, str(path), True)


# Training cases: (shape, spacing) in (z, y, x). The median spacing is exactly (2.7, 1.0, 1.0) in
# float32 (NIfTI pixdim), the target spacing nnU-Net plans; sizes ~8×28×28 mm-consistent.
TRAINING = [
    ((8, 28, 28), (2.7, 1.0, 1.0)),
    ((9, 30, 29), (2.5, 0.95, 0.95)),
    ((7, 27, 27), (3.0, 1.05, 1.05)),
    ((8, 28, 30), (2.7, 1.0, 0.95)),
    ((8, 26, 27), (2.8, 1.05, 1.0)),
    ((9, 29, 28), (2.6, 0.95, 1.0)),
    ((7, 28, 26), (2.9, 1.0, 1.05)),
    ((12, 40, 40), (2.7, 1.0, 1.0)),
    ((11, 38, 42), (2.6, 1.05, 0.95)),
]


def write_raw_dataset(raw):
    rng = np.random.RandomState(DATA_SEED)
    folder = raw / DATASET
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for i, (shape, spacing) in enumerate(TRAINING):
        image, labels = synth_case(rng, shape, spacing)
        origin = (-0.5 * shape[2] * spacing[2], -0.5 * shape[1] * spacing[1], 10.0 * i)
        write_image(folder / "imagesTr" / f"tis_{i:03d}_0000.nii.gz", image, spacing, origin)
        write_image(folder / "labelsTr" / f"tis_{i:03d}.nii.gz", labels, spacing, origin)
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": LABELS,
        "numTraining": len(TRAINING),
        "file_ending": ".nii.gz",
        "name": "TisParity",
        "description": f"synthetic CT-like volumes written by {SCRIPT}",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=4))
    return dataset_json


# ----------------------------------------------------------------------------------------------
# nnU-Net: fingerprint, plans, training, results folder
# ----------------------------------------------------------------------------------------------


def plan(preprocessed):
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )

    class TisParityPlanner(ExperimentPlanner):
        """nnU-Net's default planner with a narrower network (8 base features, at most 32)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.UNet_base_num_features = 8
            self.UNet_max_features_3d = 32

    fingerprint = DatasetFingerprintExtractor(DATASET_ID, num_processes=2, verbose=False)
    fingerprint.show_progress_bar = False
    fingerprint.run(overwrite_existing=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the planner prints every configuration
        planner = TisParityPlanner(DATASET_ID)
        plans = planner.plan_experiment()
    with open(preprocessed / DATASET / "nnUNetPlans.json") as f:
        return json.load(f), plans


def load_training_data(raw, plans_manager, config, dataset_json):
    """Every training case through nnU-Net's DefaultPreprocessor: [(data [1,Z,Y,X], seg)]."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    preprocessor = DefaultPreprocessor(verbose=False)
    cases = []
    for i in range(len(TRAINING)):
        data, seg, _ = preprocessor.run_case(
            [str(raw / DATASET / "imagesTr" / f"tis_{i:03d}_0000.nii.gz")],
            str(raw / DATASET / "labelsTr" / f"tis_{i:03d}.nii.gz"),
            plans_manager,
            config,
            dataset_json,
        )
        cases.append((data.astype(np.float32), np.maximum(seg, 0).astype(np.int64)))
    return cases


def random_batch(rng, cases, patch, batch_size):
    """Random patches (a third centred on foreground, as nnU-Net oversamples), random flips."""
    data, target = [], []
    for b in range(batch_size):
        image, seg = cases[rng.randint(len(cases))]
        shape = np.array(image.shape[1:])
        pad = np.maximum(np.array(patch) - shape, 0)
        lo = pad // 2
        image = np.pad(image, [(0, 0)] + [(a, p - a) for a, p in zip(lo, pad)])
        seg = np.pad(seg, [(0, 0)] + [(a, p - a) for a, p in zip(lo, pad)])
        shape = np.array(image.shape[1:])
        if b % 3 == 2 and (seg > 0).any():
            voxels = np.argwhere(seg[0] > 0)
            centre = voxels[rng.randint(len(voxels))]
            start = np.clip(centre - np.array(patch) // 2, 0, shape - patch)
        else:
            start = np.array([rng.randint(0, s - p + 1) for s, p in zip(shape, patch)])
        window = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(start, patch))
        image, seg = image[window], seg[window]
        if rng.rand() < 0.25:  # a smaller image, zero-padded to the patch as the predictor pads
            keep = [rng.randint(max(2, p // 3), p + 1) for p in patch]
            low = [rng.randint(0, p - k + 1) for p, k in zip(patch, keep)]
            box = (slice(None),) + tuple(slice(a, a + k) for a, k in zip(low, keep))
            padded_image, padded_seg = np.zeros_like(image), np.zeros_like(seg)
            padded_image[box], padded_seg[box] = image[box], seg[box]
            image, seg = padded_image, padded_seg
        for axis in range(3):
            if rng.rand() < 0.5:
                image, seg = np.flip(image, axis + 1), np.flip(seg, axis + 1)
        data.append(image.copy())
        target.append(seg.copy())
    return torch.from_numpy(np.stack(data)), torch.from_numpy(np.stack(target))


def train(plans_manager, config, dataset_json, cases):
    """nnU-Net's 3d_fullres network, initialisation (InitWeights_He), loss (Dice + CE with deep
    supervision) and optimiser (SGD, Nesterov, momentum 0.99, poly lr), in a short plain loop."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.manual_seed(TORCH_SEED)
    rng = np.random.RandomState(TORCH_SEED)
    network = get_network_from_plans(
        config.network_arch_class_name,
        config.network_arch_init_kwargs,
        config.network_arch_init_kwargs_req_import,
        len(dataset_json["channel_names"]),
        len(dataset_json["labels"]),
        allow_init=True,
        deep_supervision=True,
    )
    strides = config.network_arch_init_kwargs["strides"]
    scales = list(1 / np.cumprod(np.vstack(strides), axis=0))[:-1]
    weights = np.array([1 / (2**i) for i in range(len(scales))])
    weights[-1] = 0
    weights = weights / weights.sum()
    loss_fn = DeepSupervisionWrapper(
        DC_and_CE_loss(
            {"batch_dice": config.batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False},
            {}, weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss,
        ),
        weights,
    )
    optimizer = torch.optim.SGD(network.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    scheduler = PolyLRScheduler(optimizer, 1e-2, TRAIN_ITERATIONS)
    network.train()
    losses = []
    for iteration in range(TRAIN_ITERATIONS):
        scheduler.step(iteration)
        data, target = random_batch(rng, cases, config.patch_size, config.batch_size)
        targets = [
            F.interpolate(target.float(), scale_factor=tuple(float(f) for f in s), mode="nearest").long()
            for s in scales
        ]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(network(data), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        optimizer.step()
        losses.append(float(loss.detach()))
    print(
        f"trained {TRAIN_ITERATIONS} iterations (batch {config.batch_size}, patch {config.patch_size}): "
        f"loss {np.mean(losses[:20]):.3f} (first 20) → {np.mean(losses[-20:]):.3f} (last 20)"
    )
    return network.eval()


def write_results_folder(results, plans, dataset_json, preprocessed, network):
    folder = results / DATASET / TRAINER_FOLDER
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=4))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=4))
    shutil.copy(preprocessed / DATASET / "dataset_fingerprint.json", folder / "dataset_fingerprint.json")
    checkpoint = {
        "network_weights": network.state_dict(),
        "init_args": {
            "plans": plans,
            "configuration": CONFIGURATION,
            "fold": 0,
            "dataset_json": dataset_json,
            "device": torch.device("cpu"),
        },
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
        "current_epoch": 1,
    }
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def write_head(path, feature_channels, num_classes):
    """A small random TIS head in the format tis_reference reads (`tis.` tensors, tis_config)."""
    torch.manual_seed(HEAD_SEED)
    head = TisHead.from_config(TIS_CONFIG, feature_channels, num_classes)
    redraw_head(head)
    save_safetensors(
        path,
        {HEAD_PREFIX + k: v.detach().contiguous() for k, v in head.state_dict().items()},
        {"tis_config": json.dumps(TIS_CONFIG), "source": f"{SCRIPT}, torch.manual_seed({HEAD_SEED}): random head"},
    )


# ----------------------------------------------------------------------------------------------
# Test cases and nnUNetPredictor
# ----------------------------------------------------------------------------------------------


def oblique(degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return [c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0]


# (what it exercises, shape (z, y, x), spacing (z, y, x), dtype, origin, direction)
CASES = [
    (
        "anisotropic 4.0×0.8×0.85 mm (max/min 5 > 3): separate-z resampling on axis 0, z changes; "
        "spacing differs from the target in every axis; direction diag(-1, -1, 1)",
        (7, 44, 42), (4.0, 0.8, 0.85), np.int16, (81.2, 64.5, -410.0), [-1, 0, 0, 0, -1, 0, 0, 0, 1],
    ),
    (
        "smaller than the patch after resampling in every axis (grid 3×22×27, patch padded); "
        "1.25 mm × 18 = 22.5 → 22 (round half to even); float32 voxels",
        (4, 18, 30), (2.2, 1.25, 0.9), np.float32, (-15.0, -11.25, 20.0), None,
    ),
    (
        "exact zeros around the body (z: 3 slices below; y: 4 rows at the end; x: 3 and 5 columns) "
        "and an enclosed zero hole: crop to the non-zero box; spacing = the target spacing, so "
        "resampling is skipped (identity) both ways",
        (12, 36, 36), (2.7, 1.0, 1.0), np.int16, (-18.0, -18.0, 0.0), None,
    ),
    (
        "near-isotropic 1.35×1.2×1.1 mm (plain 3D order-3 resampling, no separate z); z 17 → 8.5 → 8 "
        "(half to even); 10° oblique direction",
        (17, 26, 30), (1.35, 1.2, 1.1), np.int16, (-16.5, -15.6, -11.475), oblique(10.0),
    ),
]


def write_cases(out):
    rng = np.random.RandomState(DATA_SEED + 1)
    truths = []
    for i, (_, shape, spacing, dtype, origin, direction) in enumerate(CASES):
        image, labels = synth_case(rng, shape, spacing, dtype=dtype)
        if i == 2:  # zeros around the body and an enclosed zero hole
            image[:3] = 0
            image[:, -4:] = 0
            image[:, :, :3] = 0
            image[:, :, -5:] = 0
            image[6:8, 8:11, 20:23] = 0
        write_image(out / f"case{i}_0000.nii.gz", image, spacing, origin, direction)
        truths.append(labels)
    return truths


def tile_starts(predictor, grid_shape):
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    patch = predictor.configuration_manager.patch_size
    padded = [max(g, p) for g, p in zip(grid_shape, patch)]
    return compute_steps_for_sliding_window(padded, patch, predictor.tile_step_size)


def run_predictor(results_folder, out, work):
    """nnUNetPredictor on every case, step by step as predict_from_files_sequential does it, keeping
    the intermediates; then predict_from_files_sequential itself, which must write the same files."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

    predictor = nnUNetPredictor(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=True, perform_everything_on_device=False,
        device=torch.device("cpu"), verbose=False, verbose_preprocessing=False, allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(results_folder), use_folds=(0,),
                                                   checkpoint_name="checkpoint_final.pth")
    pm, cm, dj = predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
    preprocessor = cm.preprocessor_class(verbose=False)
    own = work / "predicted_stepwise"
    own.mkdir()
    records = []
    for i in range(len(CASES)):
        image_file = str(out / f"case{i}_0000.nii.gz")
        data, _, properties = preprocessor.run_case([image_file], None, pm, cm, dj)
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        # The default export (nnUNetv2_predict without --save_probabilities): argmax of the logits.
        export_prediction_from_logits(logits, properties, cm, pm, dj, str(own / f"case{i}"), False)
        # With --save_probabilities: softmax in float32, argmax of the probabilities.
        export_prediction_from_logits(logits, properties, cm, pm, dj, str(own / f"case{i}_p"), True)
        probabilities = np.load(own / f"case{i}_p.npz")["probabilities"]
        original_spacing = [properties["spacing"][a] for a in pm.transpose_forward]
        separate_z, axis = determine_do_sep_z_and_axis(None, original_spacing, cm.spacing)
        export_separate_z, export_axis = determine_do_sep_z_and_axis(None, cm.spacing, original_spacing)
        records.append({
            "data": data,
            "logits": logits,
            "probabilities": probabilities,
            "properties": properties,
            "separate_z": (bool(separate_z), None if axis is None else int(axis)),
            "export_separate_z": (bool(export_separate_z), None if export_axis is None else int(export_axis)),
            "tile_starts": tile_starts(predictor, data.shape[1:]),
        })

    sequential = work / "predicted_sequential"
    sequential.mkdir()
    predictor.predict_from_files_sequential(
        [[str(out / f"case{i}_0000.nii.gz")] for i in range(len(CASES))], str(sequential),
        save_probabilities=True, overwrite=True,
    )
    for i, record in enumerate(records):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(own / f"case{i}.nii.gz")))
        seg_p = sitk.GetArrayFromImage(sitk.ReadImage(str(own / f"case{i}_p.nii.gz")))
        seg_seq = sitk.GetArrayFromImage(sitk.ReadImage(str(sequential / f"case{i}.nii.gz")))
        probs_seq = np.load(sequential / f"case{i}.npz")["probabilities"]
        if not (np.array_equal(seg_p, seg_seq) and np.array_equal(probs_seq, record["probabilities"])):
            raise AssertionError(f"case{i}: the step-by-step run differs from predict_from_files_sequential")
        record["seg"] = seg
        record["seg_from_probabilities_differs"] = int((seg != seg_p).sum())
        shutil.copy(own / f"case{i}.nii.gz", out / f"case{i}.seg.nii.gz")
    return predictor, records


def golden(record, i, plans_config):
    properties = record["properties"]
    bbox = np.array(properties["bbox_used_for_cropping"], dtype=np.int64)
    tensors = {
        "preprocessed": torch.from_numpy(np.ascontiguousarray(record["data"], dtype=np.float32)),
        "bbox": torch.from_numpy(bbox),
        "shape_before_cropping": torch.tensor(list(properties["shape_before_cropping"]), dtype=torch.int64),
        "shape_after_cropping": torch.tensor(
            list(properties["shape_after_cropping_and_before_resampling"]), dtype=torch.int64
        ),
        "logits": record["logits"].float().contiguous(),
        "probabilities": torch.from_numpy(np.ascontiguousarray(record["probabilities"], dtype=np.float32)),
        "spacing": torch.tensor([float(s) for s in properties["spacing"]], dtype=torch.float64),
        "target_spacing": torch.tensor([float(s) for s in plans_config["spacing"]], dtype=torch.float64),
    }
    starts = record["tile_starts"]
    metadata = {
        "source": (
            f"{SCRIPT}: nnunetv2 {export_nnunet.nnunetv2_version()} nnUNetPredictor(tile_step_size=0.5, "
            "use_gaussian=True, use_mirroring=True, perform_everything_on_device=False, device=cpu), "
            f"fold 0 of {DATASET}/{TRAINER_FOLDER} (= bundle.safetensors); input case{i}_0000.nii.gz"
        ),
        "case": CASES[i][0],
        "spacing": json.dumps([float(s) for s in properties["spacing"]]),
        "target_spacing": json.dumps([float(s) for s in plans_config["spacing"]]),
        "bbox": json.dumps(bbox.tolist()),
        "separate_z": json.dumps({"preprocessing": record["separate_z"][0], "axis": record["separate_z"][1],
                                  "export": record["export_separate_z"][0],
                                  "export_axis": record["export_separate_z"][1]}),
        "tile_starts": json.dumps(starts),
        "n_tiles": str(int(np.prod([len(s) for s in starts]))),
    }
    return tensors, metadata


# ----------------------------------------------------------------------------------------------
# Resampling and hole-filling golden
# ----------------------------------------------------------------------------------------------

# (input shape [C, z, y, x], new shape, current spacing, new spacing, order, float16 storage)
RESAMPLINGS = [
    ((1, 7, 9, 11), (11, 13, 16), (1.5, 1.3, 1.1), (1.0, 0.9, 0.8), 3, False),   # 3D cubic, up
    ((1, 13, 15, 17), (9, 8, 11), (1.0, 0.9, 0.8), (1.45, 1.7, 1.25), 3, False),  # 3D cubic, down
    ((1, 6, 15, 13), (10, 12, 12), (4.0, 0.8, 0.8), (2.5, 1.0, 0.9), 3, False),   # separate z (current), z changes
    ((1, 5, 12, 11), (5, 17, 14), (5.0, 1.0, 1.0), (5.0, 0.7, 0.8), 3, False),    # separate z, z unchanged
    ((2, 9, 10, 11), (12, 7, 15), (1.2, 1.1, 1.0), (0.9, 1.6, 0.75), 1, False),   # 3D linear, 2 channels
    ((1, 12, 10, 9), (4, 11, 10), (1.2, 1.0, 1.1), (3.6, 0.9, 1.0), 1, False),    # separate z from the *new* spacing
    ((3, 10, 9, 9), (7, 11, 11), (2.7, 1.0, 1.0), (4.0, 0.8, 0.85), 1, True),     # the export path: fp16 in, fp16 out
    ((1, 9, 10, 5), (11, 8, 8), (1.0, 1.0, 4.0), (1.0, 1.0, 2.5), 3, False),      # separate z along axis 2
    ((1, 6, 7, 12), (12, 14, 12), (4.0, 4.0, 1.0), (2.0, 2.0, 1.0), 3, False),    # two axes tie for max: no separate z
    ((1, 8, 9, 10), (11, 7, 10), (3.0, 1.0, 1.0), (2.2, 1.3, 1.0), 3, False),     # ratio exactly 3: no separate z
]


def resampling_golden():
    from scipy.ndimage import binary_fill_holes

    from nnunetv2.preprocessing.resampling.default_resampling import (
        determine_do_sep_z_and_axis,
        resample_data_or_seg_to_shape,
    )

    rng = np.random.RandomState(RESAMPLING_SEED)
    tensors = {}
    descriptions = []
    for i, (shape, new_shape, current, new, order, fp16) in enumerate(RESAMPLINGS):
        volume = rng.normal(0.0, 1.0, size=shape) + np.linspace(-2, 2, shape[-1])
        volume = volume.astype(np.float16 if fp16 else np.float32)
        output = resample_data_or_seg_to_shape(volume, new_shape, current, new, is_seg=False, order=order,
                                               order_z=0, force_separate_z=None)
        assert output.dtype == volume.dtype and output.shape == (shape[0], *new_shape)
        separate, axis = determine_do_sep_z_and_axis(None, current, new)
        tensors[f"r{i}.input"] = torch.from_numpy(volume.astype(np.float32))
        tensors[f"r{i}.output"] = torch.from_numpy(np.ascontiguousarray(output, dtype=np.float32))
        tensors[f"r{i}.new_shape"] = torch.tensor(new_shape, dtype=torch.int64)
        tensors[f"r{i}.current_spacing"] = torch.tensor(current, dtype=torch.float64)
        tensors[f"r{i}.new_spacing"] = torch.tensor(new, dtype=torch.float64)
        tensors[f"r{i}.order"] = torch.tensor(order, dtype=torch.int64)
        tensors[f"r{i}.order_z"] = torch.tensor(0, dtype=torch.int64)
        tensors[f"r{i}.is_seg"] = torch.tensor(0, dtype=torch.int64)
        tensors[f"r{i}.fp16"] = torch.tensor(int(fp16), dtype=torch.int64)
        tensors[f"r{i}.separate_z"] = torch.tensor(int(bool(separate)), dtype=torch.int64)
        tensors[f"r{i}.axis"] = torch.tensor(-1 if axis is None else int(axis), dtype=torch.int64)
        descriptions.append(
            f"r{i}: {list(shape)} -> {list(new_shape)}, order {order}, separate_z {bool(separate)}"
            + (f" (axis {axis})" if axis is not None else "") + (", float16" if fp16 else "")
        )

    mask = np.zeros((9, 12, 14), bool)
    mask[1:8, 1:11, 1:13] = True
    mask[3:6, 4:7, 4:8] = False          # an enclosed cavity: filled
    mask[4, 8, 10] = False               # a one-voxel hole: filled
    mask[2:5, 0:5, 9:12] = False         # a cavity open to the array border (y = 0): stays
    mask[6, 5:9, 3] = False
    mask[0, 2:4, 2:4] = True             # a ledge on the z = 0 border
    tensors["fill.input"] = torch.from_numpy(mask.astype(np.uint8))
    tensors["fill.output"] = torch.from_numpy(binary_fill_holes(mask).astype(np.uint8))
    descriptions.append("fill: scipy.ndimage.binary_fill_holes (default structure) of a 9x12x14 mask")
    metadata = {
        "source": (
            f"{SCRIPT}: nnunetv2 {export_nnunet.nnunetv2_version()} resample_data_or_seg_to_shape "
            "(is_seg False, order_z 0, force_separate_z None), numpy RandomState("
            f"{RESAMPLING_SEED}); scipy binary_fill_holes"
        ),
        "cases": json.dumps(descriptions),
    }
    return tensors, metadata


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def fp16_accumulated_sliding_window(net, volume, patch, mirror_axes, step=0.5):
    """The reference sliding window with nnU-Net's CPU accumulation: f32 tile logits (mean over
    the mirrored passes) times the float16 Gaussian, added into float16 buffers (each sum rounded
    to float16), divided in float16. Returns float16 logits [K, Z, Y, X]."""
    grid = list(volume.shape[1:])
    padded = [max(g, p) for g, p in zip(grid, patch)]
    below = [(q - g) // 2 for q, g in zip(padded, grid)]
    inside = (slice(None),) + tuple(slice(b, b + g) for b, g in zip(below, grid))
    x = volume.new_zeros((volume.shape[0], *padded))
    x[inside] = volume
    gaussian = gaussian_importance(patch).half()
    logits = torch.zeros((net.decoder.seg_layers[-1].out_channels, *padded), dtype=torch.half)
    weights = torch.zeros(padded, dtype=torch.half)
    starts = [reference_tile_starts(q, p, step) for q, p in zip(padded, patch)]
    for start in itertools.product(*starts):
        window = tuple(slice(a, a + p) for a, p in zip(start, patch))
        tile_logits, _ = predict_tile(net, x[(slice(None),) + window], mirror_axes)
        logits[(slice(None),) + window] += tile_logits * gaussian
        weights[window] += gaussian
    return torch.div(logits, weights)[inside]


def check_bundle(path):
    """The written bundle, rebuilt by the reference loader, reproduces the trained network."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(HEAD_PREFIX)}
    rebuilt = build_network(json.loads(metadata["plans"]), CONFIGURATION, json.loads(metadata["dataset_json"]))
    rebuilt.load_state_dict(_with_aliases(rebuilt, tensors, path), strict=True)
    return rebuilt


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", help="keep the nnU-Net folders (raw, preprocessed, results) here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tis_nnunet_"))
    if args.keep and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / name).mkdir()
        os.environ[name] = str(work / name)
    raw, preprocessed, results = (work / n for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    try:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        dataset_json = write_raw_dataset(raw)
        plans, _ = plan(preprocessed)
        plans_manager = PlansManager(plans)
        config = plans_manager.get_configuration(CONFIGURATION)
        cases = load_training_data(raw, plans_manager, config, dataset_json)
        network = train(plans_manager, config, dataset_json, cases)
        results_folder = write_results_folder(results, plans, dataset_json, preprocessed, network)

        if OUT.exists():
            shutil.rmtree(OUT)
        OUT.mkdir(parents=True)
        export_nnunet.export(results_folder, 0, OUT / "bundle.safetensors")
        head_file = work / "head.safetensors"
        arch = config.network_arch_init_kwargs
        write_head(head_file, arch["features_per_stage"][0], len(LABELS))
        export_nnunet.export(results_folder, 0, OUT / "bundle_with_head.safetensors", tis_head=head_file)
        reference_net = check_bundle(OUT / "bundle.safetensors")

        truths = write_cases(OUT)
        with contextlib.redirect_stdout(io.StringIO()):  # the predictor's progress messages
            _, records = run_predictor(results_folder, OUT, work)
        plans_config = plans["configurations"][CONFIGURATION]
        summaries = []
        for i, record in enumerate(records):
            tensors, metadata = golden(record, i, plans_config)
            save_safetensors(OUT / f"case{i}.golden.safetensors", tensors, metadata)
            fp32_logits, _ = sliding_window(reference_net, torch.from_numpy(record["data"]),
                                            plans_config["patch_size"], [0, 1, 2])
            agreement = float((fp32_logits.argmax(0) == record["logits"].float().argmax(0)).float().mean())
            emulated = fp16_accumulated_sliding_window(reference_net, torch.from_numpy(record["data"]),
                                                       plans_config["patch_size"], [0, 1, 2])
            differing = int((emulated != record["logits"]).sum())
            summaries.append((i, record, relative_l2_error(record["logits"].float(), fp32_logits), agreement,
                              differing, truths[i]))
        tensors, metadata = resampling_golden()
        save_safetensors(OUT / "resampling.golden.safetensors", tensors, metadata)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    report(plans, summaries)


def dice(seg, truth, label):
    a, b = seg == label, truth == label
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def report(plans, summaries):
    config = plans["configurations"][CONFIGURATION]
    arch = config["architecture"]["arch_kwargs"]
    print(f"\nplans.json 3d_fullres ({plans['experiment_planner_used']}):")
    print(f"  patch_size {config['patch_size']}, spacing {config['spacing']}, batch_size {config['batch_size']}")
    print(f"  features {arch['features_per_stage']}, strides {arch['strides']}")
    print(f"  kernel_sizes {arch['kernel_sizes']}")
    print(f"  normalization {config['normalization_schemes']}, use_mask_for_norm {config['use_mask_for_norm']}")
    print(f"  transpose_forward {plans['transpose_forward']}, intensity properties "
          f"{plans['foreground_intensity_properties_per_channel']['0']}")
    for i, record, error, agreement, differing, truth in summaries:
        p = record["properties"]
        seg = record["seg"]
        counts = {name: int((seg == value).sum()) for name, value in LABELS.items()}
        sep, axis = record["separate_z"]
        esep, eaxis = record["export_separate_z"]
        n_tiles = int(np.prod([len(s) for s in record["tile_starts"]]))
        print(f"case{i}: {CASES[i][0]}")
        print(f"  image {list(p['shape_before_cropping'])} spacing {[round(float(s), 6) for s in p['spacing']]}"
              f" -> bbox {np.array(p['bbox_used_for_cropping']).tolist()}, after cropping "
              f"{list(p['shape_after_cropping_and_before_resampling'])} -> preprocessed {list(record['data'].shape)}")
        print(f"  separate z: preprocessing {sep}" + (f" (axis {axis})" if sep else "")
              + f", export {esep}" + (f" (axis {eaxis})" if esep else "")
              + f"; tiles {n_tiles} (starts {record['tile_starts']})")
        print(f"  segmentation label counts {counts}; Dice organ {dice(seg, truth, 1):.3f} lesion "
              f"{dice(seg, truth, 2):.3f} vs the synthetic truth")
        print(f"  nnU-Net fp16-accumulated logits vs tis_reference f32 sliding window: relative L2 "
              f"{error:.2e}, argmax agreement {agreement:.5f}; with float16 accumulation emulated: "
              f"{differing} of {record['logits'].numel()} logits differ")
        print(f"  the segmentation from --save_probabilities (argmax of the probabilities) differs from "
              f"the default export's in {record['seg_from_probabilities_differs']} voxels")
    report_sizes(sorted(OUT.iterdir()), MAX_TOTAL_BYTES, "the files of tests/fixtures/nnunet")


if __name__ == "__main__":
    main()
