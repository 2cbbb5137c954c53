"""`tis segment` against nnU-Net's own nnUNetPredictor, on the CPU or a GPU: the same image, the
same model, the same thread count, in one run; wall time per phase, and how far the
segmentations agree.

The model is a bundle; the script turns it into the nnU-Net v2 results folder nnUNetPredictor
reads (plans.json, dataset.json, fold_0/checkpoint_final.pth) in a temporary directory. With
--make-bundle it first writes a random-weight bundle of a given small plan (the performance
issue's "features 16…128, patch 48×96×96" by default, or one of PLANS with --plan), since timing
does not need trained weights. The bench model allows no mirror axes, so neither engine mirrors.

    python python/bench_predictor.py IMAGE.nii.gz --make-bundle /tmp/bench.safetensors \\
        --tis target/release/tis --threads 2 --json out/bench_predictor.json

With --device cuda both engines run on the GPU: nnUNetPredictor with
perform_everything_on_device=True (its default on a GPU; f16 autocast, cudnn.benchmark) first,
--repeats times on one predictor, then `tis segment --device cuda` (f16 storage) under
--tis-timeout. --synthetic Z Y X writes the image itself: a CT-like volume of that grid at the
plan's spacing, so the grid after resampling is Z×Y×X (issue 7: 96 512 512 with the Pancreas
plan). Where nnunetv2 cannot be imported or run (the GPU machine has it only if its wheels are
carried, see scripts/build-gpu-bin.sh), the script says why and still times tis. nnunetv2's
imports of SimpleITK, blosc2 and imagecodecs, unused on this path, get stand-ins where those are
missing, and nnU-Net then reads and writes images with its NibabelIO.

    python3 python/bench_predictor.py --device cuda --synthetic 96 512 512 --plan pancreas \\
        --make-bundle /tmp/pancreas.safetensors --tis gpu-bin/tis --json "$OUT/predictor.json"
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    from bench_support import device_name, stand_ins  # noqa: E402
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
except ModuleNotFoundError as error:  # the GPU machine has no dynamic_network_architectures
    sys.exit(f"{Path(sys.argv[0]).name} needs the Python package {error.name!r}: on the GPU machine, install the wheels "
             "that scripts/build-gpu-bin.sh gathers in gpu-bin/wheels (scripts/gpu-check.sh does)")

# Plans the benchmarks name (python/bench_tile.py times one tile of each).
PLANS = {
    "small": dict(features=[16, 32, 64, 128], patch=[48, 96, 96], spacing=[3.0, 2.0, 2.0]),
    "pancreas": dict(
        features=[32, 64, 128, 256, 320, 320], patch=[40, 224, 224], spacing=[2.5, 0.80273, 0.80273],
        kernel_sizes=[[1, 3, 3]] + [[3, 3, 3]] * 5,
        strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
    ),
    # A generic isotropic 3d_fullres plan (issue 7): 3³ kernels, stride 1 then 2 at every stage.
    "generic128": dict(features=[32, 64, 128, 256, 320, 320], patch=[128, 128, 128], spacing=[1.0, 1.0, 1.0]),
}

# nnunetv2 imports these when its modules load (image readers it does not use here, the training
# data format, postprocessing); the GPU machine has none of them. Stood in for while nnU-Net runs.
NNUNET_UNUSED_PACKAGES = ("SimpleITK", "blosc2", "imagecodecs", "cc3d")
# An engine's status in --json while it runs: what a run stopped from outside leaves behind.
UNFINISHED = "started, did not finish (stopped by the caller's timeout?)"


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


def results_folder(bundle_path, root, reader=None):
    """nnU-Net's trained-model folder for a bundle, under root; returns its path. reader names
    the nnU-Net image reader/writer class, if not the plans' own."""
    net, _, metadata = load_bundle(bundle_path)
    folder = Path(root) / "Dataset990_TisBench" / f"nnUNetTrainer__nnUNetPlans__{metadata['configuration']}"
    (folder / "fold_0").mkdir(parents=True)
    plans, dataset_json = json.loads(metadata["plans"]), json.loads(metadata["dataset_json"])
    if reader:
        plans["image_reader_writer"] = reader
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


def nnunet_reader():
    """The image reader/writer nnU-Net uses here: the plans' SimpleITKIO where SimpleITK is
    installed, else NibabelIO (same arrays and spacing, read with nibabel)."""
    try:
        return None if importlib.util.find_spec("SimpleITK") else "NibabelIO"
    except ImportError:
        return "NibabelIO"


def run_nnunet(folder, image, output, threads, device, repeats=1):
    """nnUNetPredictor on device, phase by phase as predict_from_files_sequential runs them,
    `repeats` times on one predictor (the first also autotunes cuDNN). Returns the times of each
    run, the preprocessed grid and the GPU's peak memory (MB, cuda only)."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(threads)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    runs = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        times = {}
        start = time.perf_counter()
        data, _, properties = preprocessor.run_case([str(image)], None, predictor.plans_manager,
                                                    predictor.configuration_manager, predictor.dataset_json)
        times["preprocessing"] = time.perf_counter() - start
        start = time.perf_counter()
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        synchronize()
        times["sliding window"] = time.perf_counter() - start
        start = time.perf_counter()
        export_prediction_from_logits(logits, properties, predictor.configuration_manager, predictor.plans_manager,
                                      predictor.dataset_json, str(output).removesuffix(".nii.gz"), False)
        times["export"] = time.perf_counter() - start
        times["total"] = sum(times.values())
        runs.append(times)
        del logits
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return runs, list(data.shape[1:]), peak


def run_tis(tis, bundle, image, output, threads, device="cpu", timeout=None):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    command = [tis, "segment", str(image), "-m", str(bundle), "-o", str(output), "--json"]
    if device != "cpu":
        command += ["--device", device]
    start = time.perf_counter()
    done = subprocess.run(command, check=True, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    report = json.loads(done.stdout)
    times = report["seconds"]
    # Its phases count what nnU-Net's do (preprocessing reads the image, export writes the
    # segmentation); the process's own wall time also counts loading the model and starting the
    # device (the image is read meanwhile).
    times["process"] = wall
    return times, report["grid"]


def tis_failure(error):
    """One line saying why `tis segment` gave no times."""
    if isinstance(error, subprocess.TimeoutExpired):
        return f"timed out after {error.timeout:.0f} s (--tis-timeout)"
    if isinstance(error, subprocess.CalledProcessError):
        lines = (error.stderr or "").strip().splitlines()
        return f"exit {error.returncode}: {lines[-1] if lines else 'no message'}"
    return f"{type(error).__name__}: {error}"


def peak_rss_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------
# NIfTI through nibabel (nnU-Net's own dependency, carried to the GPU machine as a wheel)
# ----------------------------------------------------------------------------------------------


def write_nifti(path, volume, spacing):
    """A NIfTI image of volume [Z, Y, X] with voxel spacing [z, y, x] mm and a diagonal affine
    (qform and sform, code 1: scanner)."""
    import nibabel

    affine = np.diag([float(v) for v in reversed(spacing)] + [1.0])
    image = nibabel.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    nibabel.save(image, str(path))


def nifti_geometry(path):
    """(shape [Z, Y, X], spacing [z, y, x]) from a NIfTI file's header."""
    import nibabel

    image = nibabel.load(str(path))
    return list(image.shape[:3])[::-1], [float(v) for v in image.header.get_zooms()[:3]][::-1]


def synthetic_ct(shape, seed=0):
    """A CT-like int16 volume [Z, Y, X]: air (−1000 HU) around an elliptic body of soft tissue
    (40 HU) with a brighter organ, a vertebra-like column (700 HU) and noise (σ 20 HU)."""
    z, y, x = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[-1:1:complex(0, y), -1:1:complex(0, x)]
    body = (yy / 0.7) ** 2 + (xx / 0.9) ** 2 <= 1
    organ = ((yy + 0.1) / 0.25) ** 2 + ((xx - 0.35) / 0.3) ** 2 <= 1
    spine = ((yy - 0.45) / 0.12) ** 2 + (xx / 0.1) ** 2 <= 1
    slice_ = np.full((y, x), -1000.0, dtype=np.float32)
    slice_[body] = 40.0
    slice_[organ] = 110.0
    slice_[spine] = 700.0
    volume = np.empty((z, y, x), dtype=np.int16)
    for k in range(z):
        volume[k] = np.rint(slice_ + rng.normal(0, 20, (y, x)).astype(np.float32))
    return volume


def read_labels(path):
    """A segmentation's labels [Z, Y, X]."""
    import nibabel

    return np.asarray(nibabel.load(str(path)).dataobj).transpose(2, 1, 0)


# ----------------------------------------------------------------------------------------------
# Command line and report
# ----------------------------------------------------------------------------------------------


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path, nargs="?", help="the image (or --synthetic)")
    parser.add_argument("--synthetic", type=int, nargs=3, metavar=("Z", "Y", "X"),
                        help="time a synthetic CT of this grid at the plan's spacing instead of an image")
    parser.add_argument("--bundle", type=Path, help="an existing bundle")
    parser.add_argument("--make-bundle", type=Path, help="write a random-weight bundle of the bench plan here")
    parser.add_argument("--plan", choices=sorted(PLANS), help="the bench plan (overrides --features, --patch, --spacing)")
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--patch", type=int, nargs=3, default=[48, 96, 96])
    parser.add_argument("--spacing", type=float, nargs=3, default=[3.0, 2.0, 2.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=1,
                        help="nnUNetPredictor runs on one predictor (the table shows the last)")
    parser.add_argument("--tis", default="target/release/tis")
    parser.add_argument("--tis-timeout", type=float, help="seconds before `tis segment` is stopped")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if (args.image is None) == (args.synthetic is None):
        parser.error("give an image or --synthetic Z Y X")
    if not (args.bundle or args.make_bundle):
        parser.error("give --bundle or --make-bundle")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_predictor.py --device cuda: no CUDA device (torch.cuda.is_available() is False)")
    return args


def write_json(args, report):
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


def print_report(report):
    tis, nnunet = report.get("tis_seconds"), report.get("nnunet_seconds")
    engines = report["engines"]
    print(f"{report['image']}: {report['image_shape']} at {report['image_spacing']} mm → grid {report['grid'] or 'unknown'}, "
          f"{report['threads']} threads, torch {report['torch']}, {report['device']}, "
          f"test-time mirroring {'on' if report['mirroring'] else 'off (the model allows none)'}")
    columns = [("tis", tis)] + [(f"nnU-Net {i + 1}" if len(report.get("nnunet_runs", [])) > 1 else "nnU-Net", run)
                                for i, run in enumerate(report.get("nnunet_runs", []))]
    print(f"{'':<16}" + "".join(f"{name:>12}" for name, _ in columns))
    for phase in ["preprocessing", "sliding window", "export", "total"]:
        cells = ("" if times is None or phase not in times else f"{times[phase]:.2f} s" for _, times in columns)
        print(f"{phase:<16}" + "".join(f"{cell:>12}" for cell in cells))
    if tis:
        print(f"{'tis process':<16}{tis['process']:>10.2f} s   (the command's wall time: model load and device start-up included)")
    else:
        print(f"tis segment: {engines['tis']}")
    if not nnunet:
        print(f"nnUNetPredictor unavailable on this machine: {engines['nnunet']}")
    if report.get("stood_in_for"):
        print(f"nnunetv2's unused imports stood in for: {', '.join(report['stood_in_for'])}")
    if tis and nnunet:
        last = " (last run)" if len(report["nnunet_runs"]) > 1 else ""
        print(f"ratio nnU-Net{last} / tis: {nnunet['total'] / tis['total']:.2f}; "
              f"voxel agreement {report['agreement']:.5f}")


def main():
    args = parse_args()
    device = torch.device(args.device)
    plan = PLANS[args.plan] if args.plan else dict(features=args.features, patch=args.patch, spacing=args.spacing)
    if args.make_bundle:
        spec = bench_spec(seed=args.seed, **plan)
        net, head = make_model(spec)
        write_bundle(args.make_bundle, net, head, spec)
        bundle = args.make_bundle
    else:
        bundle = args.bundle

    with safe_open(bundle, framework="pt") as f:
        metadata = f.metadata()
    with tempfile.TemporaryDirectory() as tmp:
        image = args.image
        if args.synthetic:
            image = Path(tmp) / "synthetic_0000.nii.gz"
            spacing = json.loads(metadata["plans"])["configurations"][metadata["configuration"]]["spacing"]
            write_nifti(image, synthetic_ct(args.synthetic, args.seed), spacing)
        shape, spacing = nifti_geometry(image)
        report = {
            "image": "synthetic CT" if args.synthetic else str(image), "image_shape": shape,
            "image_spacing": spacing, "grid": None, "bundle": str(bundle), "plan": args.plan or plan,
            "device": device_name(device), "device_type": device.type, "threads": args.threads,
            "torch": torch.__version__, "mirroring": bool(json.loads(metadata["mirror_axes"])), "engines": {"tis": "not run", "nnunet": "not run"},
        }
        tis_out, nnunet_out = Path(tmp) / "tis.nii.gz", Path(tmp) / "nnunet.nii.gz"

        def time_tis():
            report["engines"]["tis"] = UNFINISHED
            write_json(args, report)
            try:
                report["tis_seconds"], grid = run_tis(args.tis, bundle, image, tis_out, args.threads, args.device,
                                                      args.tis_timeout)
            except (subprocess.SubprocessError, OSError, ValueError, KeyError) as error:
                if device.type == "cpu":
                    raise
                report["engines"]["tis"] = tis_failure(error)
                print(f"tis segment: {report['engines']['tis']}", flush=True)
            else:
                report["engines"]["tis"] = "ok"
                report["grid"] = report["grid"] or grid
                print(f"tis segment: {report['tis_seconds']['total']:.2f} s", flush=True)
            write_json(args, report)

        def time_nnunet():
            # Without nnunetv2 (or where it fails on the GPU) tis is still timed.
            recoverable = ImportError if device.type == "cpu" else Exception
            report["engines"]["nnunet"] = UNFINISHED
            write_json(args, report)
            reader = nnunet_reader()  # before SimpleITK is stood in for
            with stand_ins(*NNUNET_UNUSED_PACKAGES) as stood_in:
                try:
                    folder = results_folder(bundle, tmp, reader)
                    runs, report["grid"], peak = run_nnunet(folder, image, nnunet_out, args.threads, device,
                                                            args.repeats)
                except recoverable as error:
                    report["engines"]["nnunet"] = f"{type(error).__name__}: {str(error).strip()[:500]}"
                    print(f"nnUNetPredictor unavailable on this machine: {report['engines']['nnunet']}", flush=True)
                else:
                    report.update(nnunet_runs=runs, nnunet_seconds=runs[-1], nnunet_peak_gpu_mb=peak)
                    report["engines"]["nnunet"] = "ok"
                    print("nnUNetPredictor: " + ", ".join(f"{run['total']:.2f} s" for run in runs), flush=True)
            report["stood_in_for"] = sorted(stood_in.used)
            write_json(args, report)

        # On the CPU tis first, as before; on the GPU nnU-Net first, so that a `tis segment`
        # stopped by its timeout (or the caller's) leaves nnU-Net's numbers behind.
        for run in (time_tis, time_nnunet) if device.type == "cpu" else (time_nnunet, time_tis):
            run()
        if "tis_seconds" in report and "nnunet_seconds" in report:
            report["agreement"] = float(np.mean(read_labels(tis_out) == read_labels(nnunet_out)))

    report["python_peak_rss_mb"] = peak_rss_mb()
    print_report(report)
    write_json(args, report)


if __name__ == "__main__":
    main()
