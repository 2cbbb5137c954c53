"""`tis segment` against nnU-Net's own nnUNetPredictor on the CPU: the same image, the same model,
the same thread count, in one run; wall time per phase, and how far the segmentations agree.

The model is a bundle; the script turns it into the nnU-Net v2 results folder nnUNetPredictor
reads (plans.json, dataset.json, fold_0/checkpoint_final.pth) in a temporary directory. With
--make-bundle it first writes a random-weight bundle of a given small plan (the performance
issue's "features 16…128, patch 48×96×96" by default), since timing does not need trained
weights.

    python python/bench_predictor.py IMAGE.nii.gz --make-bundle /tmp/bench.safetensors \\
        --tis target/release/tis --threads 2 --json out/bench_predictor.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import (  # noqa: E402
    ModelSpec,
    intensity_properties,
    make_dataset_json,
    make_model,
    make_plans,
    plain_conv_architecture,
    tis_config,
    write_bundle,
)
from tis_reference import load_bundle  # noqa: E402


def bench_spec(features, patch, spacing, seed, kernel_sizes=None, strides=None):
    """A random-weight model of a plan for CT (CTNormalization, abdomen statistics); by default
    3³ kernels, stride 1 then 2 at every stage."""
    stages = len(features)
    strides = strides or [[1, 1, 1]] + [[2, 2, 2]] * (stages - 1)
    kernel_sizes = kernel_sizes or [[3, 3, 3]] * stages
    plans = make_plans(
        "Dataset990_TisBench",
        patch_size=patch,
        spacing=spacing,
        median_shape=[112, 101, 122],
        channels=[("CTNormalization", intensity_properties(60.0, 120.0, 62.0, -1000.0, 1800.0, -200.0, 300.0))],
        network_fields=plain_conv_architecture(
            features=features,
            kernel_sizes=kernel_sizes,
            strides=strides,
            n_conv=[2] * stages,
            n_conv_decoder=[2] * (stages - 1),
        ),
    )
    return ModelSpec(
        seed=seed,
        plans=plans,
        dataset_json=make_dataset_json(["CT"], ["background", "liver", "spleen", "kidney"], 1),
        tis_config=tis_config(32, 4, 64, 2, [4, 4, 4], [4, 8, 8], [16, 32, 32], [48, 64, 64]),
        mirror_axes=[],
        source=f"python/bench_predictor.py, seed {seed}: RANDOM weights, for timing only",
    )


def results_folder(bundle_path, root):
    """nnU-Net's trained-model folder for a bundle, under root; returns its path."""
    net, _, metadata = load_bundle(bundle_path)
    folder = Path(root) / "Dataset990_TisBench" / f"nnUNetTrainer__nnUNetPlans__{metadata['configuration']}"
    (folder / "fold_0").mkdir(parents=True)
    plans, dataset_json = json.loads(metadata["plans"]), json.loads(metadata["dataset_json"])
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    mirror_axes = json.loads(metadata["mirror_axes"])
    torch.save(
        {
            "network_weights": net.state_dict(),
            "init_args": {"plans": plans, "configuration": metadata["configuration"], "fold": 0,
                          "dataset_json": dataset_json, "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": tuple(mirror_axes) if mirror_axes else None,
        },
        folder / "fold_0" / "checkpoint_final.pth",
    )
    return folder


def run_nnunet(folder, image, output, threads):
    """nnUNetPredictor on the CPU, phase by phase as predict_from_files_sequential runs them."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(threads)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    times = {}
    start = time.perf_counter()
    data, _, properties = preprocessor.run_case([str(image)], None, predictor.plans_manager,
                                                predictor.configuration_manager, predictor.dataset_json)
    times["preprocessing"] = time.perf_counter() - start
    start = time.perf_counter()
    logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
    times["sliding window"] = time.perf_counter() - start
    start = time.perf_counter()
    export_prediction_from_logits(logits, properties, predictor.configuration_manager, predictor.plans_manager,
                                  predictor.dataset_json, str(output).removesuffix(".nii.gz"), False)
    times["export"] = time.perf_counter() - start
    times["total"] = sum(times.values())
    return times, list(data.shape[1:])


def run_tis(tis, bundle, image, output, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    start = time.perf_counter()
    done = subprocess.run([tis, "segment", str(image), "-m", str(bundle), "-o", str(output), "--json"],
                          check=True, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    times = json.loads(done.stdout)["seconds"]
    # The process's own wall time also counts reading the model, the image and writing the file.
    times["process"] = wall
    return times


def peak_rss_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path)
    parser.add_argument("--bundle", type=Path, help="an existing bundle")
    parser.add_argument("--make-bundle", type=Path, help="write a random-weight bundle of the bench plan here")
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--patch", type=int, nargs=3, default=[48, 96, 96])
    parser.add_argument("--spacing", type=float, nargs=3, default=[3.0, 2.0, 2.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tis", default="target/release/tis")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    if args.make_bundle:
        spec = bench_spec(args.features, args.patch, args.spacing, args.seed)
        net, head = make_model(spec)
        write_bundle(args.make_bundle, net, head, spec)
        bundle = args.make_bundle
    elif args.bundle:
        bundle = args.bundle
    else:
        parser.error("give --bundle or --make-bundle")

    with tempfile.TemporaryDirectory() as tmp:
        folder = results_folder(bundle, tmp)
        tis_out, nnunet_out = Path(tmp) / "tis.nii.gz", Path(tmp) / "nnunet.nii.gz"
        tis_times = run_tis(args.tis, bundle, args.image, tis_out, args.threads)
        nnunet_times, grid = run_nnunet(folder, args.image, nnunet_out, args.threads)
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tis_out)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(nnunet_out)))
        agreement = float(np.mean(a == b))

    image = sitk.ReadImage(str(args.image))
    report = {
        "image": str(args.image), "image_shape": list(reversed(image.GetSize())),
        "image_spacing": list(reversed(image.GetSpacing())), "grid": grid, "bundle": str(bundle),
        "threads": args.threads, "torch": torch.__version__, "tis_seconds": tis_times,
        "nnunet_seconds": nnunet_times, "agreement": agreement, "python_peak_rss_mb": peak_rss_mb(),
    }
    print(f"{args.image}: {report['image_shape']} at {report['image_spacing']} mm → grid {grid}, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(f"{'':<16}{'tis':>10}{'nnU-Net':>10}")
    for phase in ["preprocessing", "sliding window", "export", "total"]:
        ours = tis_times.get(phase)
        print(f"{phase:<16}{'' if ours is None else f'{ours:.2f} s':>10}{nnunet_times[phase]:>8.2f} s")
    print(f"{'tis process':<16}{tis_times['process']:>8.2f} s   (the command's wall time: model, image, output file included)")
    print(f"ratio nnU-Net / tis: {nnunet_times['total'] / tis_times['total']:.2f}; voxel agreement {agreement:.5f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
