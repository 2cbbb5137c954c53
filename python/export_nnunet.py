"""Exports a trained nnU-Net model to a `tis` model bundle (shared/design/tis-model.md).

Usage (from the repository root):

    python python/export_nnunet.py RESULTS_FOLDER --fold 0 [--checkpoint NAME] \\
        [--tis-head HEAD.safetensors] -o BUNDLE.safetensors
    python python/export_nnunet.py --self-test

RESULTS_FOLDER is an nnU-Net v2 trained-model folder
(`nnUNet_results/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>/` with plans.json,
dataset.json and fold_<k>/checkpoint_final.pth), or an nnU-Net v1 one
(`.../nnUNetTrainerV2__nnUNetPlansv2.1/` with fold_<k>/model_final_checkpoint.model and its
`.model.pkl`). The checkpoint is unpickled with torch.load(weights_only=False): it can run code,
so export trusted files only. python/README.md documents what is accepted and refused; a refusal
exits with code 2 and a message naming what is wrong.

`--self-test` checks the exporter without an nnU-Net installation's trained models: the v1 name
mapping on a fake v1 folder (the export must reproduce the v2 network), and every refusal.
"""

import argparse
import inspect
import json
import os
import pickle
import re
import sys
import tempfile
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import save_safetensors  # noqa: E402
from tis_reference import (  # noqa: E402
    BUNDLE_FORMAT,
    HEAD_PREFIX,
    TisHead,
    _with_aliases,
    build_network,
    bundle_tensors,
    is_network_alias,
    plain_conv_unet_architecture,
    relative_l2_error,
)

EXPORTER = "python/export_nnunet.py"
EXIT_REFUSED = 2
SELF_CHECK_MAX_ERROR = 1e-6
V2_CHECKPOINT = "checkpoint_final.pth"
V1_CHECKPOINT = "model_final_checkpoint.model"
V1_TRAINERS = ("nnUNetTrainerV2",)
V1_MAX_FEATURES_3D = 320  # Generic_UNet.MAX_NUM_FILTERS_3D
V1_NORMALIZATION = {"CT": "CTNormalization", "nonCT": "ZScoreNormalization", "noNorm": "NoNormalization"}


class Refused(Exception):
    """The model cannot be exported; the message says why."""


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def plain(value):
    """numpy scalars/arrays and tuples (as found in v1 pickles) → JSON-compatible Python values."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def load_json(path):
    with open(path) as f:
        return json.load(f)


def nnunetv2_version():
    from importlib.metadata import version

    return version("nnunetv2")


def folder_label(folder):
    """The last two components of a results folder: deterministic, unlike an absolute path."""
    return "/".join(Path(folder).resolve().parts[-2:])


def fold_dir(folder, fold):
    return Path(folder) / f"fold_{fold}"


def first_differences(expected, found, limit=3):
    """Missing keys, unexpected keys and shape mismatches between two {name: shape} maps."""
    problems = [f"missing `{k}` {list(v)}" for k, v in expected.items() if k not in found]
    problems += [f"unexpected `{k}` {list(v)}" for k, v in found.items() if k not in expected]
    problems += [
        f"`{k}` has shape {list(found[k])}, expected {list(v)}"
        for k, v in expected.items()
        if k in found and tuple(found[k]) != tuple(v)
    ]
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


# ----------------------------------------------------------------------------------------------
# Checks shared by v1 and v2
# ----------------------------------------------------------------------------------------------


def check_trainer(trainer_name):
    """The rule for v2 trainers: the class must ship with nnunetv2 (found the way nnU-Net finds it,
    under nnunetv2/training/nnUNetTrainer, external trainer paths ignored) and must not override
    build_network_architecture, so that its network is the default one built from the plans."""
    import nnunetv2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    trainer = recursive_find_python_class(
        os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"),
        trainer_name,
        "nnunetv2.training.nnUNetTrainer",
    )
    if trainer is None or not issubclass(trainer, nnUNetTrainer):
        raise Refused(
            f"unknown trainer class {trainer_name!r}: it is not a trainer shipped with nnunetv2 "
            f"{nnunetv2_version()}, so its network cannot be verified"
        )
    if trainer.build_network_architecture is not nnUNetTrainer.build_network_architecture:
        owner = next(
            c for c in trainer.__mro__ if "build_network_architecture" in vars(c)
        )
        raise Refused(
            f"trainer {trainer_name!r} builds its own network ({owner.__module__}.{owner.__name__} "
            "overrides build_network_architecture); only trainers with nnU-Net's default network "
            "are supported"
        )
    return trainer


def class_name(value):
    """'torch.nn.modules.conv.Conv3d' or a class → 'Conv3d'."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.rsplit(".", 1)[-1]
    return value.__name__


def check_configuration(plans_manager, configuration_name, dataset_json):
    """Refuses configurations and datasets the engine cannot run. Returns the ConfigurationManager."""
    if configuration_name not in plans_manager.available_configurations:
        raise Refused(
            f"configuration {configuration_name!r} is not in the plans "
            f"(they have {plans_manager.available_configurations})"
        )
    try:
        config = plans_manager.get_configuration(configuration_name)
    except (KeyError, RuntimeError, TypeError) as e:
        raise Refused(f"cannot read configuration {configuration_name!r} of the plans: {e}") from e
    if len(config.patch_size) != 3:
        raise Refused(
            f"configuration {configuration_name!r} is a 2D configuration (patch size "
            f"{config.patch_size}); only 3D configurations are supported"
        )
    if config.previous_stage_name is not None:
        raise Refused(
            f"configuration {configuration_name!r} is a cascade stage (it needs the segmentation of "
            f"{config.previous_stage_name!r} as input); cascades are not supported"
        )
    if config.preprocessor_name != "DefaultPreprocessor":
        raise Refused(
            f"configuration {configuration_name!r} uses the preprocessor "
            f"{config.preprocessor_name!r}; only DefaultPreprocessor is supported"
        )
    network_class = config.network_arch_class_name
    if class_name(network_class) == "ResidualEncoderUNet":
        raise Refused("ResidualEncoderUNet is not supported yet (only PlainConvUNet)")
    if class_name(network_class) != "PlainConvUNet":
        raise Refused(f"network class {network_class!r} is not supported (only PlainConvUNet)")
    kwargs = config.network_arch_init_kwargs
    for key, expected in (("conv_op", "Conv3d"), ("norm_op", "InstanceNorm3d"), ("nonlin", "LeakyReLU")):
        if class_name(kwargs.get(key)) != expected:
            raise Refused(f"arch_kwargs `{key}` is {kwargs.get(key)!r}; only {expected} is supported")
    if kwargs.get("dropout_op") is not None:
        raise Refused(f"arch_kwargs `dropout_op` is {kwargs['dropout_op']!r}; dropout is not supported")
    if kwargs.get("nonlin_first"):
        raise Refused("arch_kwargs `nonlin_first: true` is not supported")
    if (kwargs.get("norm_op_kwargs") or {}).get("affine") is False:
        raise Refused("InstanceNorm without affine parameters is not supported")

    label_manager = plans_manager.get_label_manager(dataset_json)
    if label_manager.has_regions:
        raise Refused("the dataset is region-based (dataset.json labels hold region tuples); not supported")
    if label_manager.has_ignore_label:
        raise Refused(
            f"the dataset has an ignore label ({label_manager.ignore_label}); not supported"
        )
    return config


def build_reference_network(trainer, plans_manager, config, dataset_json):
    """The network exactly as nnUNetPredictor builds it for inference (deep_supervision=False)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    inputs = determine_num_input_channels(plans_manager, config, dataset_json)
    outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    if "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters:
        network = trainer.build_network_architecture(
            plans_manager, config, inputs, outputs, enable_deep_supervision=False
        )
    else:  # the signature of older nnunetv2 trainers
        network = trainer.build_network_architecture(
            config.network_arch_class_name,
            config.network_arch_init_kwargs,
            config.network_arch_init_kwargs_req_import,
            inputs,
            outputs,
            enable_deep_supervision=False,
        )
    return network.eval()


def load_weights(network, weights, what):
    """Strict load after a key/shape comparison that names the first mismatches."""
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != found:
        raise Refused(
            f"{what} does not match the network nnunetv2 builds from the plans: "
            + first_differences(expected, found)
        )
    network.load_state_dict(weights, strict=True)


def load_head(path, feature_channels, num_classes):
    """(head, tis_config) from a safetensors file with `tis.` tensors and `tis_config` metadata."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        names = [k for k in f.keys() if k.startswith(HEAD_PREFIX)]
        tensors = {k[len(HEAD_PREFIX):]: f.get_tensor(k).float() for k in names}
    if "tis_config" not in metadata:
        raise Refused(f"head file {path}: metadata `tis_config` is missing")
    if not tensors:
        raise Refused(f"head file {path}: it holds no `{HEAD_PREFIX}` tensors")
    tis_config = json.loads(metadata["tis_config"])
    try:
        head = TisHead.from_config(tis_config, feature_channels, num_classes)
    except (KeyError, TypeError, ValueError) as e:
        raise Refused(f"head file {path}: bad tis_config {tis_config} ({e})") from e
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        raise Refused(
            f"head file {path} does not fit this network (C_f = {feature_channels}, "
            f"K = {num_classes}) and its tis_config: "
            + first_differences(
                {HEAD_PREFIX + k: v for k, v in expected.items()},
                {HEAD_PREFIX + k: v for k, v in found.items()},
            )
        )
    head.load_state_dict(tensors, strict=True)
    return head.eval(), tis_config


# ----------------------------------------------------------------------------------------------
# nnU-Net v2
# ----------------------------------------------------------------------------------------------


def read_v2(folder, fold, checkpoint_name):
    """(network with the checkpoint's weights, plans, configuration, dataset_json, mirror_axes,
    source) for an nnU-Net v2 results folder, or Refused."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    path = fold_dir(folder, fold) / checkpoint_name
    if not path.is_file():
        raise Refused(f"no checkpoint {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("network_weights", "init_args", "trainer_name"):
        if key not in checkpoint:
            raise Refused(f"{path} is not an nnU-Net v2 checkpoint (no `{key}`)")
    init_args = checkpoint["init_args"]
    configuration = init_args.get("configuration")
    if configuration is None:
        raise Refused(f"{path}: init_args has no `configuration`")

    # nnUNetPredictor reads plans.json and dataset.json from the folder (the configuration name and
    # the trainer from the checkpoint); the checkpoint's own copies are the fallback.
    sources = {}
    documents = {}
    for key, filename in (("plans", "plans.json"), ("dataset_json", "dataset.json")):
        in_folder = Path(folder) / filename
        if in_folder.is_file():
            documents[key] = load_json(in_folder)
            sources[key] = filename
            if key in init_args and plain(init_args[key]) != documents[key]:
                print(
                    f"note: {filename} differs from the checkpoint's init_args['{key}']; using "
                    f"{filename}, as nnUNetPredictor does",
                    file=sys.stderr,
                )
        elif key in init_args:
            documents[key] = plain(init_args[key])
            sources[key] = f"init_args['{key}']"
        else:
            raise Refused(f"neither {in_folder} nor the checkpoint's init_args['{key}'] exist")
    plans, dataset_json = documents["plans"], documents["dataset_json"]

    trainer_name = checkpoint["trainer_name"]
    trainer = check_trainer(trainer_name)
    plans_manager = PlansManager(deepcopy(plans))
    config = check_configuration(plans_manager, configuration, dataset_json)
    network = build_reference_network(trainer, plans_manager, config, dataset_json)
    load_weights(network, checkpoint["network_weights"], f"the state dict of {path}")

    mirror_axes = checkpoint.get("inference_allowed_mirroring_axes")
    mirror_axes = [] if mirror_axes is None else [int(a) for a in mirror_axes]
    source = {
        "exporter": EXPORTER,
        "results_folder": folder_label(folder),
        "fold": fold,
        "checkpoint": checkpoint_name,
        "trainer_name": trainer_name,
        "nnunet_version": 2,
        "nnunetv2_version": nnunetv2_version(),
        "plans_from": sources["plans"],
        "dataset_json_from": sources["dataset_json"],
    }
    return network, plans, configuration, dataset_json, mirror_axes, source


# ----------------------------------------------------------------------------------------------
# nnU-Net v1 (nnUNetTrainerV2, Generic_UNet)
# ----------------------------------------------------------------------------------------------


def v1_features(base, n_stages):
    """Generic_UNet: f_0 = base, f_{i+1} = min(int(round(2·f_i)), 320)."""
    features = [int(base)]
    for _ in range(n_stages - 1):
        features.append(min(int(np.round(features[-1] * 2)), V1_MAX_FEATURES_3D))
    return features


def v1_stage(info):
    """The plans stage the trainer was built for: init argument 5 (`stage`), else the only one."""
    plans = info["plans"]
    stage = None
    init = info.get("init")
    if isinstance(init, (list, tuple)) and len(init) > 5:
        stage = init[5]
    if stage is None:
        stages = list(plans["plans_per_stage"].keys())
        if len(stages) != 1:
            raise Refused(f"v1 plans have stages {stages} and the pickle does not say which one")
        stage = stages[0]
    if stage not in plans["plans_per_stage"]:
        raise Refused(f"v1 plans have no stage {stage!r}")
    return stage


def v1_dataset_json(plans, folder):
    """A v2 dataset.json: the folder's dataset.json (v1 or v2 layout) if any, else one made from
    the plans (label names label_<i>)."""
    modalities = plans.get("modalities") or plans.get("dataset_properties", {}).get("modalities")
    if modalities is None:
        modalities = {i: f"channel_{i}" for i in range(int(plans["num_modalities"]))}
    classes = [int(c) for c in plans.get("all_classes", range(1, int(plans["num_classes"]) + 1))]
    dataset_json = {
        "channel_names": {str(k): str(v) for k, v in sorted(plain(modalities).items(), key=lambda i: int(i[0]))},
        "labels": {"background": 0, **{f"label_{c}": c for c in classes}},
        "numTraining": 0,
        "file_ending": ".nii.gz",
    }
    candidate = Path(folder) / "dataset.json"
    if candidate.is_file():
        found = load_json(candidate)
        if "labels" in found and all(str(k).isdigit() for k in found["labels"]):  # v1 layout
            found = {
                "channel_names": found.get("modality", dataset_json["channel_names"]),
                "labels": {name: int(value) for value, name in found["labels"].items()},
                "numTraining": found.get("numTraining", 0),
                "file_ending": ".nii.gz",
            }
        dataset_json = found
    return dataset_json


def v1_intensity_properties(properties):
    """v1 `intensityproperties[c]` (mean, sd, mn, mx, median, percentiles) → v2 names."""
    return {
        "max": properties.get("mx"),
        "mean": properties["mean"],
        "median": properties.get("median"),
        "min": properties.get("mn"),
        "percentile_00_5": properties["percentile_00_5"],
        "percentile_99_5": properties["percentile_99_5"],
        "std": properties["sd"],
    }


def v1_to_v2_plans(info):
    """The v2 plans (3d_fullres, with an `architecture` entry) of a v1 nnUNetTrainerV2 model, and
    the number of convs per stage."""
    plans = plain(info["plans"])
    stage = str(v1_stage(info))
    stage_plans = plans["plans_per_stage"][stage]
    patch_size = stage_plans["patch_size"]
    if len(patch_size) != 3:
        raise Refused(f"v1 stage {stage} has patch size {patch_size}; only 3D models are supported")
    pools = stage_plans["pool_op_kernel_sizes"]
    kernels = stage_plans["conv_kernel_sizes"]
    n_pool = len(pools)
    if len(kernels) != n_pool + 1:
        raise Refused(f"v1 plans: {len(kernels)} conv kernel sizes for {n_pool} poolings")
    # Generic_UNet's localization stage u (lowest resolution first) convolves with
    # conv_kernel_sizes[-(u+1)] = K[n_pool - u], the kernel of the stage *below* its skip;
    # PlainConvUNet's decoder stage u uses K[n_pool - 1 - u], the skip's own kernel.
    for u in range(n_pool):
        if list(kernels[n_pool - u]) != list(kernels[n_pool - 1 - u]):
            raise Refused(
                "this v1 Generic_UNet cannot be expressed as a PlainConvUNet: its decoder stage "
                f"{u} convolves with kernel {kernels[n_pool - u]} (conv_kernel_sizes[{n_pool - u}]) "
                f"where PlainConvUNet uses the skip's kernel {kernels[n_pool - 1 - u]}; only v1 "
                "models with equal kernel sizes in every stage map exactly"
            )
    n_conv = int(plans.get("conv_per_stage", 2))
    if n_conv < 2:
        raise Refused(f"v1 conv_per_stage {n_conv}: only 2 or more convs per stage map exactly")
    schemes = plans["normalization_schemes"]
    channels = sorted(schemes, key=int)
    normalization = []
    for c in channels:
        if schemes[c] not in V1_NORMALIZATION:
            raise Refused(
                f"v1 normalization scheme {schemes[c]!r} of channel {c} has no nnU-Net v2 "
                f"equivalent (supported: {sorted(V1_NORMALIZATION)})"
            )
        normalization.append(V1_NORMALIZATION[schemes[c]])
    use_mask = plans.get("use_mask_for_norm", {})
    intensities = plans["dataset_properties"]["intensityproperties"]
    n_stages = n_pool + 1
    spacing = [float(s) for s in stage_plans["current_spacing"]]
    resampling = {"order_z": 0, "force_separate_z": None}
    configuration = {
        "data_identifier": f"nnUNetv1_stage{stage}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": int(stage_plans.get("batch_size", 2)),
        "patch_size": [int(p) for p in patch_size],
        "median_image_size_in_voxels": [
            float(s) for s in stage_plans.get("median_patient_size_in_voxels", patch_size)
        ],
        "spacing": spacing,
        "normalization_schemes": normalization,
        "use_mask_for_norm": [bool(use_mask.get(c, False)) for c in channels],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, **resampling},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, **resampling},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, **resampling},
        "architecture": plain_conv_unet_architecture(
            features=v1_features(plans["base_num_features"], n_stages),
            kernel_sizes=[[int(k) for k in ks] for ks in kernels],
            strides=[[1, 1, 1]] + [[int(p) for p in ps] for ps in pools],
            n_conv=[n_conv] * n_stages,
            n_conv_decoder=[n_conv] * n_pool,
        ),
        "batch_dice": bool(plans.get("batch_dice", True)),
    }
    transpose_forward = [int(t) for t in plans.get("transpose_forward", [0, 1, 2])]
    transpose_backward = [int(t) for t in plans.get("transpose_backward", [0, 1, 2])]
    v2_plans = {
        "dataset_name": "nnUNetv1_" + str(info.get("name", "model")),
        "plans_name": "nnUNetPlansv1",
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": [int(p) for p in patch_size],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": transpose_forward,
        "transpose_backward": transpose_backward,
        "configurations": {"3d_fullres": configuration},
        "experiment_planner_used": "nnUNetv1 (converted by python/export_nnunet.py)",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): v1_intensity_properties(intensities[c]) for c in channels
        },
    }
    return v2_plans, n_conv, stage


def v1_to_v2_name(name, n_pool, n_conv):
    """A v1 Generic_UNet state-dict name → the PlainConvUNet name (None: not a network tensor)."""
    last = n_conv - 1
    part = r"(conv|instnorm)\.(weight|bias)"

    def layer(kind):
        return "conv" if kind == "conv" else "norm"

    if m := re.fullmatch(rf"conv_blocks_context\.(\d+)\.blocks\.(\d+)\.{part}", name):
        d, j, kind, p = int(m[1]), int(m[2]), m[3], m[4]
        if d < n_pool:
            return f"encoder.stages.{d}.0.convs.{j}.{layer(kind)}.{p}"
    if m := re.fullmatch(rf"conv_blocks_context\.(\d+)\.([01])\.blocks\.(\d+)\.{part}", name):
        d, half, j, kind, p = int(m[1]), int(m[2]), int(m[3]), m[4], m[5]
        if d == n_pool:
            return f"encoder.stages.{d}.0.convs.{last if half else j}.{layer(kind)}.{p}"
    if m := re.fullmatch(rf"conv_blocks_localization\.(\d+)\.([01])\.blocks\.(\d+)\.{part}", name):
        u, half, j, kind, p = int(m[1]), int(m[2]), int(m[3]), m[4], m[5]
        return f"decoder.stages.{u}.convs.{last if half else j}.{layer(kind)}.{p}"
    if m := re.fullmatch(r"tu\.(\d+)\.weight", name):
        return f"decoder.transpconvs.{m[1]}.weight"
    if m := re.fullmatch(r"seg_outputs\.(\d+)\.weight", name):
        return f"decoder.seg_layers.{m[1]}.weight"
    return None


ZERO_BIAS_PATTERN = re.compile(r"decoder\.(transpconvs|seg_layers)\.\d+\.bias")


def v1_weights(state_dict, network, n_pool, n_conv, what):
    """The v1 state dict under PlainConvUNet names, with zero biases for the transposed convs and
    the seg layers (Generic_UNet has none: bias=False), aliases filled in from the canonical names."""
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    mapped = {}
    for name, value in state_dict.items():
        new = v1_to_v2_name(name, n_pool, n_conv)
        if new is None:
            raise Refused(f"{what}: unexpected v1 tensor `{name}` (not part of a Generic_UNet)")
        mapped[new] = value.float()
    state = network.state_dict(keep_vars=True)
    for key, value in state.items():
        if ZERO_BIAS_PATTERN.fullmatch(key) and key not in mapped:
            mapped[key] = torch.zeros(value.shape)
    canonical = {id(v): k for k, v in state.items() if not is_network_alias(k)}
    for key, value in state.items():
        if is_network_alias(key) and canonical.get(id(value)) in mapped:
            mapped[key] = mapped[canonical[id(value)]]
    return mapped


def find_v1_pickle(checkpoint_path):
    pkl = Path(str(checkpoint_path) + ".pkl")
    if not pkl.is_file():
        raise Refused(f"no {pkl} next to the v1 checkpoint")
    with open(pkl, "rb") as f:
        return pickle.load(f)  # trusted file, like the checkpoint


def read_v1(folder, fold, checkpoint_name):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    path = fold_dir(folder, fold) / checkpoint_name
    if not path.is_file():
        raise Refused(f"no checkpoint {path}")
    info = find_v1_pickle(path)
    trainer_name = info.get("name")
    if trainer_name not in V1_TRAINERS:
        raise Refused(
            f"v1 trainer {trainer_name!r} is not supported (only {', '.join(V1_TRAINERS)}, whose "
            "network is Generic_UNet)"
        )
    plans, n_conv, stage = v1_to_v2_plans(info)
    dataset_json = v1_dataset_json(plain(info["plans"]), folder)
    plans_manager = PlansManager(deepcopy(plans))
    config = check_configuration(plans_manager, "3d_fullres", dataset_json)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    network = build_reference_network(nnUNetTrainer, plans_manager, config, dataset_json)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "state_dict" not in checkpoint:
        raise Refused(f"{path} is not an nnU-Net v1 checkpoint (no `state_dict`)")
    n_pool = len(plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["strides"]) - 1
    weights = v1_weights(checkpoint["state_dict"], network, n_pool, n_conv, str(path))
    load_weights(network, weights, f"the state dict of {path} (mapped to PlainConvUNet names)")
    source = {
        "exporter": EXPORTER,
        "results_folder": folder_label(folder),
        "fold": fold,
        "checkpoint": checkpoint_name,
        "trainer_name": trainer_name,
        "nnunet_version": 1,
        "v1_stage": stage,
        "nnunetv2_version": nnunetv2_version(),
        "zero_biases_added": "decoder.transpconvs.*.bias and decoder.seg_layers.*.bias (Generic_UNet "
        "has no bias there; zeros give the identical function)",
        "v1_inference_differs": "nnU-Net v1 averages softmax probabilities over mirrors, tiles and "
        "folds and resamples before normalizing; tis follows nnU-Net v2 (averages logits)",
    }
    return network, plans, "3d_fullres", dataset_json, [0, 1, 2], source


# ----------------------------------------------------------------------------------------------
# The export
# ----------------------------------------------------------------------------------------------


def detect_version(folder, fold, checkpoint):
    """(1 or 2, checkpoint file name)."""
    directory = fold_dir(folder, fold)
    if checkpoint is not None:
        if checkpoint.endswith(".model") or (directory / (checkpoint + ".pkl")).is_file():
            return 1, checkpoint
        return 2, checkpoint
    if (directory / V2_CHECKPOINT).is_file():
        return 2, V2_CHECKPOINT
    if (directory / V1_CHECKPOINT).is_file():
        return 1, V1_CHECKPOINT
    if not directory.is_dir():
        raise Refused(f"no folder {directory} (is {folder} an nnU-Net results folder, and fold {fold} trained?)")
    raise Refused(f"{directory} holds neither {V2_CHECKPOINT} (nnU-Net v2) nor {V1_CHECKPOINT} (v1)")


def self_check(network, bundle_path, configuration, seed=0):
    """Rebuilds the network from the written bundle the way the reference (and the Rust loader)
    reads it, and compares one random tile with the nnunetv2-built network."""
    with safe_open(bundle_path, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(HEAD_PREFIX)}
    rebuilt = build_network(
        json.loads(metadata["plans"]), metadata["configuration"], json.loads(metadata["dataset_json"])
    )
    rebuilt.load_state_dict(_with_aliases(rebuilt, tensors, bundle_path), strict=True)
    patch = network_patch_size(json.loads(metadata["plans"]), configuration)
    generator = torch.Generator().manual_seed(seed)
    tile = torch.randn(1, rebuilt.encoder.stages[0][0].convs[0].conv.in_channels, *patch, generator=generator)
    with torch.no_grad():
        error = relative_l2_error(rebuilt(tile), network(tile))
    if not error <= SELF_CHECK_MAX_ERROR:
        raise AssertionError(f"{bundle_path}: the bundle does not reproduce the network (relative L2 {error})")
    return error


def network_patch_size(plans, configuration):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(deepcopy(plans)).get_configuration(configuration).patch_size


def export(folder, fold, output, checkpoint=None, tis_head=None, quiet=False):
    """Writes the bundle; returns its metadata. Raises Refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Refused(f"{folder} is not a folder")
    fold = fold if fold == "all" else int(fold)
    version, checkpoint = detect_version(folder, fold, checkpoint)
    reader = read_v1 if version == 1 else read_v2
    network, plans, configuration, dataset_json, mirror_axes, source = reader(folder, fold, checkpoint)

    head, tis_config = nn.Module(), None  # an empty module: a network-only bundle
    if tis_head is not None:
        head, tis_config = load_head(
            tis_head,
            feature_channels=network.decoder.seg_layers[-1].in_channels,
            num_classes=network.decoder.seg_layers[-1].out_channels,
        )
        source["tis_head"] = Path(tis_head).name

    tensors = {k: v.float().contiguous() for k, v in bundle_tensors(network, head).items()}
    metadata = {
        "format": BUNDLE_FORMAT,
        "plans": json.dumps(plans),
        "configuration": configuration,
        "dataset_json": json.dumps(dataset_json),
        "mirror_axes": json.dumps(mirror_axes),
        "source": json.dumps(source, sort_keys=True),
    }
    if tis_config is not None:
        metadata["tis_config"] = json.dumps(tis_config)
    output = Path(output)
    save_safetensors(output, tensors, metadata)
    error = self_check(network, output, configuration)
    if not quiet:
        n_network = sum(v.numel() for k, v in tensors.items() if not k.startswith(HEAD_PREFIX))
        n_head = sum(v.numel() for k, v in tensors.items() if k.startswith(HEAD_PREFIX))
        print(
            f"wrote {output}: nnU-Net v{version} {source['trainer_name']} {configuration} fold {fold}, "
            f"{n_network} network parameters, {n_head} head parameters, mirror_axes {mirror_axes}; "
            f"reloaded tile relative L2 {error:.1e}"
        )
    return metadata


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Export a trained nnU-Net (v2, or v1 nnUNetTrainerV2) model to a tis bundle. "
        "The checkpoint is loaded with torch.load(weights_only=False), which can execute code: "
        "export trusted files only.",
    )
    parser.add_argument("results_folder", nargs="?", help="nnU-Net trained-model folder")
    parser.add_argument("--fold", default="0", help="fold to export (a number or 'all'; default 0)")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help=f"checkpoint file in fold_<k>/ (default {V2_CHECKPOINT}, or {V1_CHECKPOINT} for v1)",
    )
    parser.add_argument("--tis-head", default=None, help="safetensors file with `tis.` head tensors and tis_config")
    parser.add_argument("-o", "--output", help="bundle to write (.safetensors)")
    parser.add_argument("--self-test", action="store_true", help="check the exporter (v1 mapping, refusals)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.self_test:
        return run_self_test()
    if args.results_folder is None or args.output is None:
        parser.error("RESULTS_FOLDER and -o are required")
    try:
        export(args.results_folder, args.fold, args.output, args.checkpoint, args.tis_head)
    except Refused as e:
        print(f"export_nnunet.py: refused: {e}", file=sys.stderr)
        return EXIT_REFUSED
    return 0


# ----------------------------------------------------------------------------------------------
# Self-test
# ----------------------------------------------------------------------------------------------


def _test_plans(kernel_sizes, strides, features, labels=("background", "organ", "lesion")):
    """A small v2 plans dict (3d_fullres) and dataset.json."""
    n_stages = len(features)
    plans = {
        "dataset_name": "Dataset990_ExportTest",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.0, 1.0, 1.0],
        "original_median_shape_after_transp": [40, 80, 80],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [16, 32, 32],
                "median_image_size_in_voxels": [40, 80, 80],
                "spacing": [2.0, 1.0, 1.0],
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None,
                },
                "architecture": plain_conv_unet_architecture(
                    features, kernel_sizes, strides, [2] * n_stages, [2] * (n_stages - 1)
                ),
                "batch_dice": True,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 400.0, "mean": 100.0, "median": 100.0, "min": -50.0,
                  "percentile_00_5": 40.0, "percentile_99_5": 200.0, "std": 30.0}
        },
    }
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {name: i for i, name in enumerate(labels)},
        "numTraining": 5,
        "file_ending": ".nii.gz",
    }
    return plans, dataset_json


def _random_network(plans, dataset_json, seed):
    torch.manual_seed(seed)
    net = build_network(plans, "3d_fullres", dataset_json)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.InstanceNorm3d):
                module.weight.copy_(1 + 0.2 * torch.randn_like(module.weight))
                module.bias.copy_(0.1 * torch.randn_like(module.bias))
            elif isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)) and module.bias is not None:
                module.bias.copy_(0.1 * torch.randn_like(module.bias))
    return net


def _write_v2_folder(folder, plans, dataset_json, network, trainer_name="nnUNetTrainer",
                     mirror_axes=(0, 1, 2), configuration="3d_fullres"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    (folder / "fold_0").mkdir(exist_ok=True)
    torch.save(
        {
            "network_weights": network.state_dict(),
            "init_args": {"plans": plans, "configuration": configuration, "fold": 0,
                          "dataset_json": dataset_json, "device": torch.device("cpu")},
            "trainer_name": trainer_name,
            "inference_allowed_mirroring_axes": mirror_axes,
        },
        folder / "fold_0" / V2_CHECKPOINT,
    )


def v2_to_v1_name(name, n_pool, n_conv):
    """The inverse of v1_to_v2_name (for the self-test)."""
    last = n_conv - 1
    kind = {"conv": "conv", "norm": "instnorm"}
    if m := re.fullmatch(r"encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm)\.(weight|bias)", name):
        d, j, k, p = int(m[1]), int(m[2]), kind[m[3]], m[4]
        if d < n_pool:
            return f"conv_blocks_context.{d}.blocks.{j}.{k}.{p}"
        return (f"conv_blocks_context.{d}.1.blocks.0.{k}.{p}" if j == last
                else f"conv_blocks_context.{d}.0.blocks.{j}.{k}.{p}")
    if m := re.fullmatch(r"decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(weight|bias)", name):
        u, j, k, p = int(m[1]), int(m[2]), kind[m[3]], m[4]
        return (f"conv_blocks_localization.{u}.1.blocks.0.{k}.{p}" if j == last
                else f"conv_blocks_localization.{u}.0.blocks.{j}.{k}.{p}")
    if m := re.fullmatch(r"decoder\.transpconvs\.(\d+)\.weight", name):
        return f"tu.{m[1]}.weight"
    if m := re.fullmatch(r"decoder\.seg_layers\.(\d+)\.weight", name):
        return f"seg_outputs.{m[1]}.weight"
    return None  # the biases Generic_UNet does not have


def _write_v1_folder(folder, network, kernel_sizes, strides, base_features, num_classes):
    """A fake nnU-Net v1 fold: model_final_checkpoint.model (+ .pkl) with Generic_UNet names."""
    n_pool = len(strides) - 1
    state = {}
    for name, value in network.state_dict().items():
        if is_network_alias(name):
            continue
        v1 = v2_to_v1_name(name, n_pool, 2)
        if v1 is not None:
            state["module." + v1] = value.clone()  # as saved from nn.DataParallel
    plans = {
        "num_stages": 2,
        "num_modalities": 1,
        "modalities": {0: "CT"},
        "normalization_schemes": {0: "CT"},
        "use_mask_for_norm": {0: False},
        "num_classes": num_classes - 1,
        "all_classes": list(range(1, num_classes)),
        "base_num_features": base_features,
        "conv_per_stage": 2,
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "dataset_properties": {
            "intensityproperties": {
                0: {"median": 100.0, "mean": 100.0, "sd": 30.0, "mn": -50.0, "mx": 400.0,
                    "percentile_99_5": 200.0, "percentile_00_5": 40.0, "local_props": {}}
            },
            "modalities": {0: "CT"},
        },
        "plans_per_stage": {
            0: {"batch_size": 2, "num_pool_per_axis": [2, 3, 3], "patch_size": np.array([16, 32, 32]),
                "median_patient_size_in_voxels": np.array([20, 40, 40]),
                "current_spacing": np.array([4.0, 2.0, 2.0]), "original_spacing": np.array([2.0, 1.0, 1.0]),
                "do_dummy_2D_data_aug": False, "pool_op_kernel_sizes": [[2, 2, 2]] * 2,
                "conv_kernel_sizes": [[3, 3, 3]] * 3},
            1: {"batch_size": 2, "num_pool_per_axis": [2, 3, 3], "patch_size": np.array([16, 32, 32]),
                "median_patient_size_in_voxels": np.array([40, 80, 80]),
                "current_spacing": np.array([2.0, 1.0, 1.0]), "original_spacing": np.array([2.0, 1.0, 1.0]),
                "do_dummy_2D_data_aug": False,
                "pool_op_kernel_sizes": [list(map(int, s)) for s in strides[1:]],
                "conv_kernel_sizes": [list(map(int, k)) for k in kernel_sizes]},
        },
    }
    fold = folder / "fold_0"
    fold.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"epoch": 1000, "state_dict": state, "optimizer_state_dict": None, "lr_scheduler_state_dict": None,
         "plot_stuff": ([np.float64(0.5)], [], [], []), "best_stuff": (1, np.float64(0.1), 0.9),
         "amp_grad_scaler": {}},
        fold / V1_CHECKPOINT,
    )
    info = {"init": ("plans.pkl", 0, str(folder), "preprocessed", True, 1, True, True, True),
            "name": "nnUNetTrainerV2",
            "class": "<class 'nnunet.training.network_training.nnUNetTrainerV2.nnUNetTrainerV2'>",
            "plans": plans}
    with open(fold / (V1_CHECKPOINT + ".pkl"), "wb") as f:
        pickle.dump(info, f)
    return info


def _expect_refusal(what, expected_text, function):
    try:
        function()
    except Refused as e:
        if expected_text not in str(e):
            raise AssertionError(f"{what}: refused with {e!r}, expected a message with {expected_text!r}")
        print(f"  refused as expected ({what}): {e}")
        return
    raise AssertionError(f"{what}: exported, expected a refusal")


def run_self_test():
    """v1 mapping round trip and the refusals, in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        uniform_kernels = [[3, 3, 3]] * 3
        strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
        base = 6
        features = v1_features(base, 3)

        # v1 → v2: a PlainConvUNet with zero transposed-conv and seg biases, renamed to v1.
        plans, dataset_json = _test_plans(uniform_kernels, strides, features)
        network = _random_network(plans, dataset_json, seed=11)
        with torch.no_grad():
            for key, value in network.state_dict(keep_vars=True).items():
                if ZERO_BIAS_PATTERN.fullmatch(key):
                    value.zero_()
        network.eval()
        _write_v1_folder(tmp / "v1", network, uniform_kernels, strides, base, num_classes=3)
        export(tmp / "v1", 0, tmp / "v1.safetensors", quiet=True)
        with safe_open(tmp / "v1.safetensors", framework="pt") as f:
            metadata = f.metadata()
            stored = {k: f.get_tensor(k) for k in f.keys()}
        rebuilt = build_network(json.loads(metadata["plans"]), "3d_fullres", json.loads(metadata["dataset_json"]))
        rebuilt.load_state_dict(_with_aliases(rebuilt, stored, "v1.safetensors"), strict=True)
        rebuilt.eval()
        tile = torch.randn(1, 1, 16, 32, 32, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            error = relative_l2_error(rebuilt(tile), network(tile))
        source = json.loads(metadata["source"])
        assert source["nnunet_version"] == 1, source
        assert json.loads(metadata["mirror_axes"]) == [0, 1, 2]
        if not error <= SELF_CHECK_MAX_ERROR:
            raise AssertionError(f"v1 export does not reproduce the v2 network: relative L2 {error}")
        print(f"  v1 (Generic_UNet names, no transposed-conv/seg biases) → bundle: tile relative L2 {error:.1e}")

        # v1 with a [1,3,3] first kernel: Generic_UNet's decoder kernels differ from PlainConvUNet's.
        mixed = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
        plans_mixed, _ = _test_plans(mixed, strides, features)
        network_mixed = _random_network(plans_mixed, dataset_json, seed=12)
        _write_v1_folder(tmp / "v1mixed", network_mixed, mixed, strides, base, num_classes=3)
        _expect_refusal("v1 mixed kernel sizes", "cannot be expressed as a PlainConvUNet",
                        lambda: export(tmp / "v1mixed", 0, tmp / "x.safetensors", quiet=True))

        # v2 round trip and its refusals.
        v2_plans, _ = _test_plans([[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [4, 8, 16])
        v2_net = _random_network(v2_plans, dataset_json, seed=13)
        _write_v2_folder(tmp / "ok", v2_plans, dataset_json, v2_net)
        meta = export(tmp / "ok", 0, tmp / "ok.safetensors", quiet=True)
        assert json.loads(meta["mirror_axes"]) == [0, 1, 2] and json.loads(meta["source"])["nnunet_version"] == 2
        print("  v2 nnUNetTrainer: exported and reloaded")
        _write_v2_folder(tmp / "nomirror", v2_plans, dataset_json, v2_net,
                         trainer_name="nnUNetTrainerNoMirroring", mirror_axes=None)
        meta = export(tmp / "nomirror", 0, tmp / "nomirror.safetensors", quiet=True)
        assert json.loads(meta["mirror_axes"]) == []
        print("  v2 nnUNetTrainerNoMirroring: exported, mirror_axes []")

        _write_v2_folder(tmp / "bn", v2_plans, dataset_json, v2_net, trainer_name="nnUNetTrainerBN")
        _expect_refusal("nnUNetTrainerBN", "overrides build_network_architecture",
                        lambda: export(tmp / "bn", 0, tmp / "x.safetensors", quiet=True))
        _write_v2_folder(tmp / "custom", v2_plans, dataset_json, v2_net, trainer_name="MyTrainer")
        _expect_refusal("unknown trainer", "unknown trainer class 'MyTrainer'",
                        lambda: export(tmp / "custom", 0, tmp / "x.safetensors", quiet=True))

        resenc = deepcopy(v2_plans)
        arch = resenc["configurations"]["3d_fullres"]["architecture"]
        arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
        arch["arch_kwargs"]["n_blocks_per_stage"] = arch["arch_kwargs"].pop("n_conv_per_stage")
        _write_v2_folder(tmp / "resenc", resenc, dataset_json, v2_net)
        _expect_refusal("ResidualEncoderUNet", "ResidualEncoderUNet is not supported yet",
                        lambda: export(tmp / "resenc", 0, tmp / "x.safetensors", quiet=True))

        two_d = deepcopy(v2_plans)
        two_d["configurations"]["2d"] = deepcopy(two_d["configurations"]["3d_fullres"])
        two_d["configurations"]["2d"]["patch_size"] = [32, 32]
        _write_v2_folder(tmp / "2d", two_d, dataset_json, v2_net, configuration="2d")
        _expect_refusal("2d configuration", "2D configuration",
                        lambda: export(tmp / "2d", 0, tmp / "x.safetensors", quiet=True))

        regions = dict(dataset_json, labels={"background": 0, "whole": [1, 2], "core": 2},
                       regions_class_order=[1, 2])
        _write_v2_folder(tmp / "regions", v2_plans, regions, v2_net)
        _expect_refusal("region-based labels", "region-based",
                        lambda: export(tmp / "regions", 0, tmp / "x.safetensors", quiet=True))
        ignore = dict(dataset_json, labels={"background": 0, "organ": 1, "lesion": 2, "ignore": 3})
        _write_v2_folder(tmp / "ignore", v2_plans, ignore, v2_net)
        _expect_refusal("ignore label", "ignore label",
                        lambda: export(tmp / "ignore", 0, tmp / "x.safetensors", quiet=True))

        wrong = deepcopy(v2_plans)
        wrong["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [4, 8, 32]
        _write_v2_folder(tmp / "wrong", wrong, dataset_json, v2_net)
        _expect_refusal("state dict vs plans", "does not match the network nnunetv2 builds",
                        lambda: export(tmp / "wrong", 0, tmp / "x.safetensors", quiet=True))

        # A head that does not fit (K = 2 instead of 3).
        head = TisHead(4, 2, d_model=8, n_heads=2, ffn_dim=16, n_layers=1, pe_grid=[2, 2, 2])
        cfg = {"d_model": 8, "n_heads": 2, "ffn_dim": 16, "n_layers": 1, "pe_grid": [2, 2, 2],
               "roi_margin": [1, 2, 2], "roi_min": [4, 8, 8], "roi_max": [8, 16, 16]}
        save_safetensors(tmp / "head.safetensors",
                         {HEAD_PREFIX + k: v.contiguous() for k, v in head.state_dict().items()},
                         {"tis_config": json.dumps(cfg)})
        _expect_refusal("head for K = 2", "does not fit this network",
                        lambda: export(tmp / "ok", 0, tmp / "x.safetensors", tis_head=tmp / "head.safetensors",
                                       quiet=True))
    print("export_nnunet.py self-test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
