"""Writes the Rust engine's golden test files, deterministically.

Usage (from the repository root): python python/make_fixtures.py

    tests/fixtures/iso/{bundle,golden}.safetensors     3-stage isotropic net, new-style plans
    tests/fixtures/aniso/{bundle,golden}.safetensors   4-stage anisotropic net, old v2 plans

All weights are random (seeded); all arithmetic is float32 on the CPU (python/tis_reference.py).
Every bundle is read back, rebuilt with strict loading and made to reproduce an output before the
script ends. python/README.md documents the layout of the files.
"""

import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tis_reference import (  # noqa: E402
    BUNDLE_FORMAT,
    TisHead,
    build_network,
    bundle_tensors,
    forward_tile,
    load_bundle,
    plain_conv_unet_architecture,
    refine,
    relative_l2_error,
    sliding_window,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SCRIPT = "python/make_fixtures.py"
CONFIGURATION = "3d_fullres"
MAX_TOTAL_BYTES = 5 * 1000 * 1000
SELF_CHECK_MAX_ERROR = 1e-6

# ----------------------------------------------------------------------------------------------
# nnU-Net plans and dataset.json
# ----------------------------------------------------------------------------------------------

def resampling_entry(is_seg, order):
    return {"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": None}


def plain_conv_architecture(features, kernel_sizes, strides, n_conv, n_conv_decoder):
    """The `architecture` entry of current (v2.3+) plans for a PlainConvUNet."""
    return {"architecture": plain_conv_unet_architecture(features, kernel_sizes, strides, n_conv, n_conv_decoder)}


def old_plans_architecture(base_features, max_features, kernel_sizes, strides, n_conv, n_conv_decoder):
    """The network fields of pre-v2.3 plans (no `architecture` key)."""
    return {
        "UNet_class_name": "PlainConvUNet",
        "UNet_base_num_features": base_features,
        "unet_max_num_features": max_features,
        "n_conv_per_stage_encoder": n_conv,
        "n_conv_per_stage_decoder": n_conv_decoder,
        "num_pool_per_axis": [sum(1 for s in strides if s[axis] == 2) for axis in range(3)],
        "pool_op_kernel_sizes": strides,
        "conv_kernel_sizes": kernel_sizes,
    }


def make_plans(dataset_name, patch_size, spacing, median_shape, channels, network_fields):
    """A realistic nnU-Net v2 plans dict with one `3d_fullres` configuration.

    channels: per input channel (normalization scheme, foreground intensity properties).
    """
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": patch_size,
        "median_image_size_in_voxels": median_shape,
        "spacing": spacing,
        "normalization_schemes": [scheme for scheme, _ in channels],
        "use_mask_for_norm": [False] * len(channels),
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resampling_entry(is_seg=False, order=3),
        "resampling_fn_seg_kwargs": resampling_entry(is_seg=True, order=1),
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": resampling_entry(is_seg=False, order=1),
        "batch_dice": True,
        **network_fields,
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": median_shape,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: configuration},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(channel): properties for channel, (_, properties) in enumerate(channels)
        },
    }


def make_dataset_json(channel_names, label_names, num_training):
    return {
        "channel_names": {str(i): name for i, name in enumerate(channel_names)},
        "labels": {name: value for value, name in enumerate(label_names)},
        "numTraining": num_training,
        "file_ending": ".nii.gz",
    }


def intensity_properties(mean, std, median, minimum, maximum, percentile_00_5, percentile_99_5):
    return {
        "max": maximum,
        "mean": mean,
        "median": median,
        "min": minimum,
        "percentile_00_5": percentile_00_5,
        "percentile_99_5": percentile_99_5,
        "std": std,
    }


def tis_config(d_model, n_heads, ffn_dim, n_layers, pe_grid, roi_margin, roi_min, roi_max):
    return {
        "d_model": d_model,
        "n_heads": n_heads,
        "ffn_dim": ffn_dim,
        "n_layers": n_layers,
        "pe_grid": pe_grid,
        "roi_margin": roi_margin,
        "roi_min": roi_min,
        "roi_max": roi_max,
    }


# ----------------------------------------------------------------------------------------------
# The three models
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    seed: int
    plans: dict
    dataset_json: dict
    tis_config: dict
    mirror_axes: list
    source: str

    @property
    def patch_size(self):
        return self.plans["configurations"][CONFIGURATION]["patch_size"]

    @property
    def input_channels(self):
        return len(self.dataset_json["channel_names"])


@dataclass
class GoldenSpec:
    """A test configuration: its model, the sliding-window grids and the head cases on window0."""

    name: str
    model: ModelSpec
    window_shapes: list  # [window0 (larger than the patch), window1 (smaller on some axis)]
    head_cases: list  # per case: clicks (z, y, x, class) in window0 coordinates, newest last


def test_source(seed, name):
    return f"{SCRIPT}, torch.manual_seed({seed}), fixture {name!r}: random weights for tests"


ISO_SEED = 1001
ISO = GoldenSpec(
    name="iso",
    model=ModelSpec(
        seed=ISO_SEED,
        plans=make_plans(
            "Dataset901_TisIso",
            patch_size=[16, 16, 16],
            spacing=[1.5, 1.5, 1.5],
            median_shape=[96, 128, 128],
            channels=[
                ("CTNormalization", intensity_properties(99.4, 57.3, 103.0, -958.0, 1581.0, -35.0, 253.0))
            ],
            network_fields=plain_conv_architecture(
                features=[4, 8, 16],
                kernel_sizes=[[3, 3, 3]] * 3,
                strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                n_conv=[2, 2, 2],
                n_conv_decoder=[2, 2],
            ),
        ),
        dataset_json=make_dataset_json(["CT"], ["background", "organ"], num_training=30),
        tis_config=tis_config(
            d_model=16, n_heads=2, ffn_dim=32, n_layers=2, pe_grid=[3, 3, 4],
            roi_margin=[2, 3, 3], roi_min=[6, 8, 8], roi_max=[12, 16, 16],
        ),
        mirror_axes=[0, 1, 2],
        source=test_source(ISO_SEED, "iso"),
    ),
    window_shapes=[[21, 37, 27], [11, 20, 9]],
    head_cases=[
        [[10, 18, 13, 1]],  # one positive click in the interior
        [[9, 15, 12, 1], [11, 20, 14, 0], [10, 17, 10, 1], [12, 19, 16, 0]],  # both classes
        [[0, 5, 26, 1], [3, 9, 22, 0]],  # z = 0 and x = X - 1, plus one interior click
        [[2, 3, 2, 1], [18, 30, 24, 0], [16, 22, 20, 1], [15, 25, 21, 1]],  # wider than roi_max
        [[7, 12, 9, 1], [7, 12, 9, 1], [8, 14, 11, 0], [7, 12, 9, 1]],  # duplicates
    ],
)

ANISO_SEED = 1002
ANISO = GoldenSpec(
    name="aniso",
    model=ModelSpec(
        seed=ANISO_SEED,
        plans=make_plans(
            "Dataset902_TisAniso",
            patch_size=[8, 32, 32],
            spacing=[3.0, 0.8, 0.8],
            median_shape=[80, 512, 512],
            channels=[
                ("CTNormalization", intensity_properties(80.4, 72.7, 86.0, -996.0, 3071.0, -92.0, 217.0)),
                ("ZScoreNormalization", intensity_properties(412.6, 187.2, 398.0, 0.0, 2153.0, 61.0, 1034.0)),
            ],
            network_fields=old_plans_architecture(
                base_features=6,
                max_features=20,
                kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]],
                n_conv=[1, 2, 2, 2],
                n_conv_decoder=[1, 1, 2],
            ),
        ),
        dataset_json=make_dataset_json(["CT", "MR"], ["background", "organ", "tumour"], num_training=42),
        tis_config=tis_config(
            d_model=24, n_heads=3, ffn_dim=40, n_layers=2, pe_grid=[2, 4, 4],
            roi_margin=[1, 4, 4], roi_min=[12, 12, 12], roi_max=[12, 24, 24],
        ),
        mirror_axes=[1, 2],
        source=test_source(ANISO_SEED, "aniso"),
    ),
    window_shapes=[[10, 47, 41], [6, 40, 20]],  # z = 10 < roi_min z = 12 on purpose
    head_cases=[
        [[5, 23, 20, 2]],  # one positive (tumour) click in the interior
        [[4, 20, 18, 1], [5, 26, 22, 2], [6, 22, 25, 0], [3, 24, 20, 1]],  # all three classes
        [[0, 30, 40, 2], [5, 28, 35, 1]],  # z = 0 and x = X - 1, plus one interior click
        [[2, 2, 3, 1], [7, 44, 38, 2], [4, 20, 30, 0], [5, 35, 15, 1], [6, 40, 10, 2]],  # spread
        [[5, 20, 20, 1], [5, 20, 20, 1], [5, 21, 19, 2], [5, 21, 19, 2], [5, 20, 20, 1]],  # duplicates
    ],
)

# ----------------------------------------------------------------------------------------------
# Random weights and bundles
# ----------------------------------------------------------------------------------------------


def redraw_norm(norm):
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn_like(norm.weight))
        norm.bias.copy_(0.1 * torch.randn_like(norm.bias))


def redraw_network(net):
    """Keeps PyTorch's default conv init; re-draws every InstanceNorm affine parameter."""
    for module in net.modules():
        if isinstance(module, nn.InstanceNorm3d):
            redraw_norm(module)


def redraw_head(head):
    """Re-draws every head parameter so that none is a trivial 0 or 1."""
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn_like(module.weight) / module.in_features**0.5)
                module.bias.copy_(0.1 * torch.randn_like(module.bias))
            elif isinstance(module, nn.MultiheadAttention):
                module.in_proj_weight.copy_(torch.randn_like(module.in_proj_weight) / module.embed_dim**0.5)
                module.in_proj_bias.copy_(0.1 * torch.randn_like(module.in_proj_bias))
            elif isinstance(module, nn.LayerNorm):
                redraw_norm(module)
        head.pos_grid.copy_(0.5 * torch.randn_like(head.pos_grid))
        for layer in head.layers:
            layer.assign_alpha.copy_(torch.randn_like(layer.assign_alpha))


def make_model(spec):
    """Seeds torch with spec.seed and returns the random (net, head)."""
    torch.manual_seed(spec.seed)
    net = build_network(spec.plans, CONFIGURATION, spec.dataset_json)
    redraw_network(net)
    head = TisHead.from_config(
        spec.tis_config,
        feature_channels=net.decoder.seg_layers[-1].in_channels,
        num_classes=net.decoder.seg_layers[-1].out_channels,
    )
    redraw_head(head)
    return net, head.eval()


def save_safetensors(path, tensors, metadata):
    """Writes a .safetensors file whose bytes depend only on its content.

    safetensors stores the metadata map in hash order, which changes from run to run; the header
    is rewritten with the metadata sorted by key (same length, same tensor offsets).
    """
    data = save(tensors, metadata=metadata)
    header_length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    sorted_header = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(sorted_header) <= header_length, "the rewritten safetensors header grew"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[:8] + sorted_header.ljust(header_length, b" ") + data[8 + header_length :])


def write_bundle(path, net, head, spec):
    metadata = {
        "format": BUNDLE_FORMAT,
        "tis_config": json.dumps(spec.tis_config),
        "plans": json.dumps(spec.plans),
        "configuration": CONFIGURATION,
        "dataset_json": json.dumps(spec.dataset_json),
        "mirror_axes": json.dumps(spec.mirror_axes),
        "source": spec.source,
    }
    save_safetensors(path, bundle_tensors(net, head), metadata)


# ----------------------------------------------------------------------------------------------
# Golden outputs
# ----------------------------------------------------------------------------------------------


def golden_tensors(spec, net, head):
    """tile.*, window{0,1}.* and case{i}.* (see python/README.md). Draws from torch's RNG."""
    model = spec.model
    golden = {"tile.input": torch.randn(model.input_channels, *model.patch_size)}
    golden["tile.logits"], golden["tile.features"] = forward_tile(net, golden["tile.input"])

    for index, shape in enumerate(spec.window_shapes):
        volume = torch.randn(model.input_channels, *shape)
        logits, features = sliding_window(net, volume, model.patch_size, model.mirror_axes)
        golden[f"window{index}.input"] = volume
        golden[f"window{index}.logits"] = logits
        golden[f"window{index}.features"] = features

    features = golden["window0.features"]
    probs = torch.softmax(golden["window0.logits"], dim=0)
    for index, click_list in enumerate(spec.head_cases):
        clicks = torch.tensor(click_list, dtype=torch.int64)
        roi, clicks_used, logits = refine(head, features, probs, clicks, model.tis_config)
        golden[f"case{index}.clicks"] = clicks
        golden[f"case{index}.roi"] = torch.tensor(roi, dtype=torch.int64)
        golden[f"case{index}.clicks_used"] = torch.tensor(clicks_used, dtype=torch.int64)
        golden[f"case{index}.logits"] = logits
    return {name: tensor.contiguous() for name, tensor in golden.items()}


# ----------------------------------------------------------------------------------------------
# Self-check of the written files
# ----------------------------------------------------------------------------------------------


def check_bundle(bundle_path, tile_input, tile_logits, head_case):
    """Rebuilds net and head from the written bundle and reproduces a tile and a head case.

    head_case = (features, probs, clicks, expected refined logits).
    """
    net, head, metadata = load_bundle(bundle_path)
    logits, _ = forward_tile(net, tile_input)
    features, probs, clicks, expected = head_case
    _, _, refined = refine(head, features, probs, clicks, json.loads(metadata["tis_config"]))
    errors = {
        "tile logits": relative_l2_error(logits, tile_logits),
        "head logits": relative_l2_error(refined, expected),
    }
    for what, error in errors.items():
        if not error <= SELF_CHECK_MAX_ERROR:
            raise AssertionError(f"{bundle_path}: {what} not reproduced (relative L2 {error})")
    summary = ", ".join(f"{what} error {error:.1e}" for what, error in errors.items())
    print(f"  {bundle_path.relative_to(REPO)} reloaded: {summary}")


def read_safetensors(path):
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def check_golden(spec):
    """The written bundle reproduces the written golden's tile and its head case 0."""
    directory = FIXTURES / spec.name
    golden = read_safetensors(directory / "golden.safetensors")
    head_case = (
        golden["window0.features"],
        torch.softmax(golden["window0.logits"], dim=0),
        golden["case0.clicks"],
        golden["case0.logits"],
    )
    check_bundle(directory / "bundle.safetensors", golden["tile.input"], golden["tile.logits"], head_case)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def write_golden_fixture(spec):
    net, head = make_model(spec.model)
    golden = golden_tensors(spec, net, head)
    directory = FIXTURES / spec.name
    write_bundle(directory / "bundle.safetensors", net, head, spec.model)
    save_safetensors(directory / "golden.safetensors", golden, {"source": spec.model.source})
    print(f"{spec.name}:")
    for index, clicks in enumerate(spec.head_cases):
        roi = golden[f"case{index}.roi"].tolist()
        clicks_used = int(golden[f"case{index}.clicks_used"])
        print(f"  case{index}: {len(clicks)} clicks, roi {roi}, clicks_used {clicks_used}")
    check_golden(spec)


def report_sizes(paths, limit, what):
    """Prints each file's size and the total; exits when the total exceeds `limit` bytes."""
    total = sum(path.stat().st_size for path in paths)
    for path in paths:
        print(f"{path.stat().st_size:>9}  {path.relative_to(REPO)}")
    print(f"{total:>9}  total")
    if total > limit:
        raise SystemExit(f"{what} take {total} bytes, more than {limit}")


def main():
    torch.set_num_threads(2)
    for spec in (ISO, ANISO):
        write_golden_fixture(spec)

    # The engine's golden files and the contract's copy; tests/fixtures/nnunet has its own budget
    # in make_nnunet_fixtures.py.
    written = sorted(
        path for name in (ISO.name, ANISO.name, "contract") for path in (FIXTURES / name).glob("*.safetensors")
    )
    report_sizes(written, MAX_TOTAL_BYTES, "the written files")


if __name__ == "__main__":
    main()
