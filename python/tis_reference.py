"""PyTorch f32 reference of the `tis` inference engine.

This module is the executable reading of shared/design/tis-model.md (the TIS refinement head,
the ROI rule, the model bundle) and of shared/design/nnunet-inference.md §2 and §3.3 (the nnU-Net
PlainConvUNet and its sliding-window prediction, with the decoder features aggregated like the
logits). The Rust engine's golden test files are made with it (python/make_fixtures.py), and
python/check_contract.py proves the head against the contract's independent fixture.

Everything runs in float32 on the CPU. It has no dependency on nnunetv2.
"""

import itertools
import json
import math
import pydoc
from copy import deepcopy

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.building_blocks.helper import (
    convert_dim_to_conv_op,
    get_matching_instancenorm,
)
from safetensors import safe_open
from torch import nn

BUNDLE_FORMAT = "tis-bundle/1"
HEAD_PREFIX = "tis."


# ----------------------------------------------------------------------------------------------
# The TIS refinement head
# ----------------------------------------------------------------------------------------------


def _layer_norm(d_model):
    return nn.LayerNorm(d_model, eps=1e-5)


def _feed_forward(d_model, ffn_dim):
    return nn.Sequential(nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, d_model))


def _attention(mha, queries, keys_values):
    """Multi-head attention of [Nq, d] queries over [Nk, d] keys/values (one batch element)."""
    out, _ = mha(queries[None], keys_values[None], keys_values[None], need_weights=False)
    return out[0]


class TisLayer(nn.Module):
    """One head layer: click encoding (cross, self, FFN), then label assignment (+ FFN)."""

    def __init__(self, d_model, n_heads, ffn_dim):
        super().__init__()
        self.n_heads = n_heads
        self.click_cross_norm_q = _layer_norm(d_model)
        self.click_cross_norm_kv = _layer_norm(d_model)
        self.click_cross = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.click_self_norm = _layer_norm(d_model)
        self.click_self = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.click_ffn_norm = _layer_norm(d_model)
        self.click_ffn = _feed_forward(d_model, ffn_dim)
        self.assign_norm_q = _layer_norm(d_model)
        self.assign_norm_k = _layer_norm(d_model)
        self.assign_q = nn.Linear(d_model, d_model)
        self.assign_k = nn.Linear(d_model, d_model)
        self.assign_out = nn.Linear(d_model, d_model)
        self.assign_alpha = nn.Parameter(torch.zeros(1))
        self.assign_ffn_norm = _layer_norm(d_model)
        self.assign_ffn = _feed_forward(d_model, ffn_dim)

    def _split_heads(self, tokens):
        """[n, d] -> [h, n, d_h]"""
        return tokens.reshape(tokens.shape[0], self.n_heads, -1).transpose(0, 1)

    def assign_labels(self, voxels, clicks, click_labels, auto_labels):
        """(1 − α)·U + α·Va: every voxel copies the labels of the clicks it resembles."""
        queries = self._split_heads(self.assign_q(self.assign_norm_q(voxels)))  # [h, N, d_h]
        keys = self._split_heads(self.assign_k(self.assign_norm_k(clicks)))  # [h, N_c, d_h]
        values = self._split_heads(click_labels)  # [h, N_c, d_h]
        scale = 1.0 / math.sqrt(queries.shape[-1])
        weights = torch.softmax(queries @ keys.transpose(1, 2) * scale, dim=-1)  # [h, N, N_c]
        copied = (weights @ values).transpose(0, 1).reshape(voxels.shape)  # [N, d]
        alpha = torch.sigmoid(self.assign_alpha)
        return (1 - alpha) * copied + alpha * auto_labels

    def forward(self, voxels, clicks, click_labels, auto_labels):
        clicks = clicks + _attention(
            self.click_cross, self.click_cross_norm_q(clicks), self.click_cross_norm_kv(voxels)
        )
        normed_clicks = self.click_self_norm(clicks)
        clicks = clicks + _attention(self.click_self, normed_clicks, normed_clicks)
        clicks = clicks + self.click_ffn(self.click_ffn_norm(clicks))

        voxels = voxels + self.assign_out(self.assign_labels(voxels, clicks, click_labels, auto_labels))
        voxels = voxels + self.assign_ffn(self.assign_ffn_norm(voxels))
        return voxels, clicks


class TisHead(nn.Module):
    """The refinement head of tis-model.md; `state_dict()` keys are the contract's minus `tis.`."""

    def __init__(self, feature_channels, num_classes, d_model, n_heads, ffn_dim, n_layers, pe_grid):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.num_classes = num_classes
        self.input_proj = nn.Linear(feature_channels, d_model)
        self.pos_grid = nn.Parameter(0.02 * torch.randn(d_model, *pe_grid))
        self.label_mlp = nn.Sequential(
            nn.Linear(num_classes, d_model), nn.GELU(), nn.Linear(d_model, d_model)
        )
        self.layers = nn.ModuleList(TisLayer(d_model, n_heads, ffn_dim) for _ in range(n_layers))
        self.out_norm = _layer_norm(d_model)
        self.out_proj = nn.Linear(d_model, num_classes)

    @classmethod
    def from_config(cls, tis_config, feature_channels, num_classes):
        return cls(
            feature_channels,
            num_classes,
            d_model=tis_config["d_model"],
            n_heads=tis_config["n_heads"],
            ffn_dim=tis_config["ffn_dim"],
            n_layers=tis_config["n_layers"],
            pe_grid=tis_config["pe_grid"],
        )

    def forward(self, features_roi, probs_roi, clicks_in_roi):
        """Refined logits [K, rz, ry, rx] of the ROI.

        features_roi [C_f, rz, ry, rx] and probs_roi [K, rz, ry, rx] are the crops F[R] and P[R];
        clicks_in_roi [n ≥ 1, 4] int64 holds (z, y, x, class) relative to the ROI, newest last.
        """
        roi_shape = tuple(features_roi.shape[1:])
        d_model = self.pos_grid.shape[0]
        tokens = features_roi.reshape(features_roi.shape[0], -1).T  # [N, C_f], C order
        position = F.interpolate(
            self.pos_grid[None], size=roi_shape, mode="trilinear", align_corners=True
        )[0]
        voxels = self.input_proj(tokens) + position.reshape(d_model, -1).T  # X [N, d]

        z, y, x, label = clicks_in_roi.unbind(dim=1)
        click_voxel = (z * roi_shape[1] + y) * roi_shape[2] + x
        clicks = voxels[click_voxel]  # E [N_c, d]
        click_labels = self.label_mlp(F.one_hot(label, self.num_classes).to(voxels.dtype))  # Vc
        auto_labels = self.label_mlp(probs_roi.reshape(self.num_classes, -1).T)  # Va [N, d]

        for layer in self.layers:
            voxels, clicks = layer(voxels, clicks, click_labels, auto_labels)

        logits = self.out_proj(self.out_norm(voxels))  # [N, K]
        return logits.T.reshape(self.num_classes, *roi_shape)


# ----------------------------------------------------------------------------------------------
# The ROI rule and one refinement
# ----------------------------------------------------------------------------------------------


def _clamp(value, low, high):
    return max(low, min(value, high))


def roi_rule(clicks, grid_shape, cfg):
    """The crop R of tis-model.md for clicks [n ≥ 1, 4] (z, y, x, class; newest last).

    Returns (roi, inside): roi = [[start, stop]] per axis (half-open), inside = BoolTensor [n]
    saying which clicks fall in R.
    """
    coordinates = [tuple(click[:3]) for click in clicks.tolist()]
    if not coordinates:
        raise ValueError("the ROI rule needs at least one click")
    for point in coordinates:
        if not all(0 <= c < extent for c, extent in zip(point, grid_shape)):
            raise ValueError(f"click {point} lies outside the grid {tuple(grid_shape)}")
    newest = coordinates[-1]

    roi = []
    for axis, extent in enumerate(grid_shape):
        lo = min(point[axis] for point in coordinates)
        hi = max(point[axis] for point in coordinates)
        span = (hi - lo + 1) + 2 * cfg["roi_margin"][axis]
        want = min(_clamp(span, cfg["roi_min"][axis], cfg["roi_max"][axis]), extent)
        centre = (lo + hi) // 2 if span <= cfg["roi_max"][axis] else newest[axis]
        start = _clamp(centre - want // 2, 0, extent - want)
        roi.append([start, start + want])

    inside = torch.tensor(
        [all(start <= c < stop for c, (start, stop) in zip(point, roi)) for point in coordinates],
        dtype=torch.bool,
    )
    return roi, inside


def refine(head, features, probs, clicks, cfg):
    """One refinement: ROI rule, crop, head. Returns (roi, clicks_used, logits [K, *R shape]).

    features [C_f, Z, Y, X], probs [K, Z, Y, X], clicks [n ≥ 1, 4] int64 in grid coordinates.
    """
    roi, inside = roi_rule(clicks, features.shape[1:], cfg)
    crop = (slice(None),) + tuple(slice(start, stop) for start, stop in roi)
    clicks_in_roi = clicks[inside].clone()
    clicks_in_roi[:, :3] -= torch.tensor([start for start, _ in roi], dtype=clicks.dtype)
    with torch.no_grad():
        logits = head(features[crop], probs[crop], clicks_in_roi)
    return roi, int(inside.sum()), logits


# ----------------------------------------------------------------------------------------------
# The nnU-Net network
# ----------------------------------------------------------------------------------------------


def resolve_configuration(plans, configuration, visited=()):
    """plans["configurations"][configuration] merged over its `inherits_from` parents."""
    if configuration in visited:
        raise ValueError(f"circular inherits_from in plans: {visited + (configuration,)}")
    config = deepcopy(plans["configurations"][configuration])
    parent = config.get("inherits_from")
    if parent is None:
        return config
    resolved = resolve_configuration(plans, parent, visited + (configuration,))
    resolved.update(config)
    return resolved


CONV_OP_3D = "torch.nn.modules.conv.Conv3d"
INSTANCE_NORM_3D = "torch.nn.modules.instancenorm.InstanceNorm3d"


def plain_conv_unet_architecture(features, kernel_sizes, strides, n_conv, n_conv_decoder,
                                 conv_op=CONV_OP_3D, norm_op=INSTANCE_NORM_3D):
    """The `architecture` entry of current (v2.3+) nnU-Net plans for a PlainConvUNet."""
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": len(features),
            "features_per_stage": features,
            "conv_op": conv_op,
            "kernel_sizes": kernel_sizes,
            "strides": strides,
            "n_conv_per_stage": n_conv,
            "n_conv_per_stage_decoder": n_conv_decoder,
            "conv_bias": True,
            "norm_op": norm_op,
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def architecture_from_old_plans(config):
    """The `architecture` entry that nnunetv2's ConfigurationManager derives from pre-v2.3 plans."""
    if config["UNet_class_name"] != "PlainConvUNet":
        raise ValueError(f"unsupported UNet_class_name {config['UNet_class_name']!r}")
    n_stages = len(config["n_conv_per_stage_encoder"])
    dimension = len(config["patch_size"])
    conv_op = convert_dim_to_conv_op(dimension)
    norm_op = get_matching_instancenorm(dimension=dimension)
    return plain_conv_unet_architecture(
        features=[
            min(config["UNet_base_num_features"] * 2**i, config["unet_max_num_features"])
            for i in range(n_stages)
        ],
        kernel_sizes=deepcopy(config["conv_kernel_sizes"]),
        strides=deepcopy(config["pool_op_kernel_sizes"]),
        n_conv=deepcopy(config["n_conv_per_stage_encoder"]),
        n_conv_decoder=deepcopy(config["n_conv_per_stage_decoder"]),
        conv_op=f"{conv_op.__module__}.{conv_op.__name__}",
        norm_op=f"{norm_op.__module__}.{norm_op.__name__}",
    )


def build_network(plans, configuration, dataset_json):
    """The PlainConvUNet that nnU-Net builds for inference (deep_supervision=False), in eval mode."""
    config = resolve_configuration(plans, configuration)
    architecture = config.get("architecture") or architecture_from_old_plans(config)
    if pydoc.locate(architecture["network_class_name"]) is not PlainConvUNet:
        raise ValueError(f"unsupported network class {architecture['network_class_name']!r}")
    arch_kwargs = dict(architecture["arch_kwargs"])
    for key in architecture["_kw_requires_import"]:
        if arch_kwargs[key] is not None:
            arch_kwargs[key] = pydoc.locate(arch_kwargs[key])
    arch_kwargs["deep_supervision"] = False
    network = PlainConvUNet(
        input_channels=len(dataset_json["channel_names"]),
        num_classes=len(dataset_json["labels"]),
        **arch_kwargs,
    )
    return network.eval()


def forward_tile(net, x):
    """One plain forward of a tile x [C_in, *patch] -> (logits [K, *patch], features [F0, *patch]).

    features = output of net.decoder.stages[-1], the input of the final 1x1x1 seg conv.
    """
    captured = {}
    hook = net.decoder.stages[-1].register_forward_hook(
        lambda module, inputs, output: captured.update(features=output)
    )
    try:
        with torch.no_grad():
            logits = net(x[None])[0]
    finally:
        hook.remove()
    return logits, captured["features"][0]


# ----------------------------------------------------------------------------------------------
# Sliding window (nnU-Net's, in f32, with the features aggregated like the logits)
# ----------------------------------------------------------------------------------------------


def tile_starts(length, patch, step):
    """Start offsets of the tiles along one axis (length ≥ patch)."""
    n_tiles = math.ceil((length - patch) / (patch * step)) + 1
    if n_tiles == 1:
        return [0]
    actual_step = (length - patch) / (n_tiles - 1)
    return [int(np.round(actual_step * i)) for i in range(n_tiles)]


def gaussian_importance(patch_size):
    """nnU-Net's tile weights: 10·Π_d exp(−(x_d − c_d)²/(2σ_d²)) in f64, rounded to f16, as f32."""
    gauss = np.asarray(10.0, dtype=np.float64)
    for axis, patch in enumerate(patch_size):
        centre, sigma = patch // 2, patch / 8
        offsets = np.arange(patch, dtype=np.float64) - centre
        shape = [1] * len(patch_size)
        shape[axis] = patch
        gauss = gauss * np.exp(-(offsets**2) / (2 * sigma**2)).reshape(shape)
    weights = gauss.astype(np.float16)
    weights[weights == 0] = weights[weights > 0].min()
    return torch.from_numpy(weights.astype(np.float32))


def mirror_combinations(mirror_axes):
    """(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2) for mirror_axes [0, 1, 2]."""
    return [
        axes
        for count in range(1, len(mirror_axes) + 1)
        for axes in itertools.combinations(mirror_axes, count)
    ]


def predict_tile(net, tile, mirror_axes):
    """Tile logits and features averaged over the plain pass and every mirrored pass."""
    logits, features = forward_tile(net, tile)
    combinations = mirror_combinations(mirror_axes)
    for axes in combinations:
        dims = [axis + 1 for axis in axes]  # skip the channel dimension
        mirrored_logits, mirrored_features = forward_tile(net, torch.flip(tile, dims))
        logits += torch.flip(mirrored_logits, dims)
        features += torch.flip(mirrored_features, dims)
    n_passes = len(combinations) + 1
    return logits / n_passes, features / n_passes


def sliding_window(net, volume, patch_size, mirror_axes, step=0.5):
    """Gaussian-weighted sliding window over volume [C, Z, Y, X].

    Returns (logits [K, Z, Y, X], features [F0, Z, Y, X]).
    """
    grid_shape = volume.shape[1:]
    padded_shape = [max(length, patch) for length, patch in zip(grid_shape, patch_size)]
    pad_below = [(padded - length) // 2 for padded, length in zip(padded_shape, grid_shape)]
    unpadded = tuple(slice(below, below + length) for below, length in zip(pad_below, grid_shape))
    padded = volume.new_zeros((volume.shape[0], *padded_shape))
    padded[(slice(None),) + unpadded] = volume

    gaussian = gaussian_importance(patch_size)
    num_classes = net.decoder.seg_layers[-1].out_channels
    feature_channels = net.decoder.seg_layers[-1].in_channels
    logits_sum = torch.zeros((num_classes, *padded_shape))
    features_sum = torch.zeros((feature_channels, *padded_shape))
    weight_sum = torch.zeros(padded_shape)

    starts_per_axis = [
        tile_starts(length, patch, step) for length, patch in zip(padded_shape, patch_size)
    ]
    for starts in itertools.product(*starts_per_axis):  # axis 0 slowest
        window = tuple(slice(start, start + patch) for start, patch in zip(starts, patch_size))
        tile_logits, tile_features = predict_tile(net, padded[(slice(None),) + window], mirror_axes)
        logits_sum[(slice(None),) + window] += tile_logits * gaussian
        features_sum[(slice(None),) + window] += tile_features * gaussian
        weight_sum[window] += gaussian

    logits = logits_sum / weight_sum
    features = features_sum / weight_sum
    return logits[(slice(None),) + unpadded], features[(slice(None),) + unpadded]


# ----------------------------------------------------------------------------------------------
# The model bundle
# ----------------------------------------------------------------------------------------------


def is_network_alias(key):
    """State-dict names that repeat a tensor stored under another name (dropped from bundles)."""
    return key.startswith("decoder.encoder.") or ".all_modules." in key


def bundle_tensors(net, head):
    """The bundle's tensors: the network without aliases, plus the head under `tis.`."""
    tensors = {
        key: value.detach().clone().contiguous()
        for key, value in net.state_dict().items()
        if not is_network_alias(key)
    }
    for key, value in head.state_dict().items():
        tensors[HEAD_PREFIX + key] = value.detach().clone().contiguous()
    return tensors


def _with_aliases(net, network_tensors, path):
    """The bundle's network tensors under every state-dict name of net, aliases included.

    An alias names the same parameter object as its canonical (stored) key.
    """
    state = net.state_dict(keep_vars=True)
    canonical_key = {id(value): key for key, value in state.items() if not is_network_alias(key)}
    extra = sorted(set(network_tensors) - set(canonical_key.values()))
    if extra:
        raise ValueError(f"{path}: unexpected network tensors {extra}")
    missing = sorted(set(canonical_key.values()) - set(network_tensors))
    if missing:
        raise ValueError(f"{path}: missing network tensors {missing}")
    return {key: network_tensors[canonical_key[id(value)]] for key, value in state.items()}


def load_bundle(path):
    """(net, head, metadata) from a bundle, loaded strictly: every tensor used, every parameter set."""
    with safe_open(path, framework="pt") as bundle:
        metadata = bundle.metadata()
        tensors = {key: bundle.get_tensor(key).float() for key in bundle.keys()}
    if metadata.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path}: format {metadata.get('format')!r}, expected {BUNDLE_FORMAT!r}")

    net = build_network(
        json.loads(metadata["plans"]), metadata["configuration"], json.loads(metadata["dataset_json"])
    )
    network_tensors = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}
    net.load_state_dict(_with_aliases(net, network_tensors, path), strict=True)

    head = TisHead.from_config(
        json.loads(metadata["tis_config"]),
        feature_channels=net.decoder.seg_layers[-1].in_channels,
        num_classes=net.decoder.seg_layers[-1].out_channels,
    )
    head_state = {
        k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)
    }
    head.load_state_dict(head_state, strict=True)
    return net, head.eval(), metadata


def relative_l2_error(out, ref):
    """‖out − ref‖ / ‖ref‖, the contract's measure of agreement."""
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))
