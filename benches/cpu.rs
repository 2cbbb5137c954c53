//! CPU benchmarks with random weights: one refinement click of the TIS-B head (10 clicks, ROI
//! 16×32×32 and 32×64×64), one nnU-Net tile forward of a small plan (features 16…128, patch
//! 48×96×96), and the host-side phases of a whole-volume segmentation around the sliding window
//! (reading the image, preprocessing, export and writing the segmentation of a 96×512×512 CT at
//! the default model's spacing, as issue 7's benchmark volume). Threads: rayon's default
//! (RAYON_NUM_THREADS to set).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use std::io::Write;

use flate2::write::GzEncoder;
use ndarray::{Array3, ShapeBuilder};
use nifti::NiftiHeader;
use nifti::writer::WriterOptions;
use tis::CpuBackend;
use tis::Model;
use tis::bench::{CLASSES, HeadBench};
use tis::io::nifti::{read_image, write_labels};
use tis::model::TisConfig;
use tis::model::plans::NetworkPlan;
use tis::model::unet::UNet;
use tis::pipeline::predictor::export_segmentation;
use tis::pipeline::preprocess::preprocess;
use tis::random::{Rng, random_tensors};

/// The `tis` binary's allocator (src/bin/tis/main.rs says why), so that timings match it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn click_latency(c: &mut Criterion) {
    let mut group = c.benchmark_group("click TIS-B, 10 clicks");
    group.sample_size(10);
    for roi in [[16, 32, 32], [32, 64, 64]] {
        let bench = HeadBench::new(&CpuBackend, TisConfig::tis_b(), roi, 10, 1).unwrap();
        group.bench_function(format!("roi {}x{}x{}", roi[0], roi[1], roi[2]), |b| {
            b.iter(|| black_box(bench.click().unwrap()))
        });
    }
    group.finish();
}

fn tile_forward(c: &mut Criterion) {
    let backend = CpuBackend;
    let plan = NetworkPlan {
        in_channels: 1,
        classes: CLASSES,
        features: vec![16, 32, 64, 128],
        kernel_sizes: vec![[3, 3, 3]; 4],
        strides: vec![[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
        convs_per_stage: vec![2; 4],
        convs_per_decoder_stage: vec![2; 3],
        conv_bias: true,
        norm_eps: 1e-5,
        negative_slope: 0.01,
    };
    let mut weights = random_tensors(&plan.expected_tensors(), 3);
    let network = UNet::from_tensors(&backend, &plan, &mut |n| {
        Ok(weights.remove(n).expect("every expected tensor"))
    })
    .unwrap();
    let tile = Rng::new(4).tensor(&[1, 48, 96, 96], 1.0);
    let mut group = c.benchmark_group("nnU-Net tile");
    group.sample_size(10);
    group.bench_function("features 16-128 patch 48x96x96", |b| {
        b.iter(|| black_box(network.forward(&backend, &tile).unwrap()))
    });
    group.finish();
}

/// Preprocessing (crop, transposition, normalisation; no resampling at the model's own spacing)
/// and export (logits to f16, resampling back, argmax, crop undone) of a 96×512×512 volume, and
/// reading and writing such a volume as .nii.gz.
fn volume_phases(c: &mut Criterion) {
    let model = Model::default_model(CpuBackend).unwrap();
    let spacing = [3.0, 1.0, 1.0];
    let image = Rng::new(5).tensor(&[1, 96, 512, 512], 300.0);
    let pre = preprocess(&image, spacing, &model.info).unwrap();
    let grid = &pre.volume.shape()[1..];
    let logits = Rng::new(6).tensor(&[model.info.classes(), grid[0], grid[1], grid[2]], 3.0);
    let mut group = c.benchmark_group("volume 96x512x512");
    group.sample_size(10);
    group.bench_function("preprocess", |b| {
        b.iter(|| black_box(preprocess(&image, spacing, &model.info).unwrap()))
    });
    group.bench_function("export", |b| {
        b.iter(|| black_box(export_segmentation(&CpuBackend, &logits, &pre, &model.info).unwrap()))
    });
    let [nz, ny, nx] = [96, 512, 512];
    let dir = std::env::temp_dir().join(format!("tis-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Reading the image: python/bench_predictor.py's synthetic CT.
    let ct = dir.join("ct.nii.gz");
    std::fs::write(&ct, synthetic_ct_nii_gz(&dir, [nz, ny, nx])).unwrap();
    group.bench_function("read image (.nii.gz)", |b| {
        b.iter(|| black_box(read_image(&ct).unwrap()))
    });
    // Writing the segmentation (.nii.gz): the export's labels of random logits (noise, the
    // hardest to deflate) and three nested ellipsoids (an organ-like label map).
    let noisy = export_segmentation(&CpuBackend, &logits, &pre, &model.info).unwrap();
    let organs: Vec<u16> = (0..nz * ny * nx)
        .map(|v| {
            let (z, y, x) = (v / (ny * nx), v / nx % ny, v % nx);
            let r = ((z as f64 - 48.0) / 40.0).powi(2)
                + ((y as f64 - 256.0) / 200.0).powi(2)
                + ((x as f64 - 256.0) / 150.0).powi(2);
            [3, 2, 1, 0][(r * 3.0).min(3.0) as usize]
        })
        .collect();
    let header = NiftiHeader::default();
    for (name, labels) in [("noise", &noisy), ("ellipsoids", &organs)] {
        let path = dir.join(format!("{name}.nii.gz"));
        group.bench_function(format!("write labels ({name})"), |b| {
            b.iter(|| write_labels(&path, labels, [nz, ny, nx], &header).unwrap())
        });
    }
    std::fs::remove_dir_all(&dir).unwrap();
    group.finish();
}

/// python/bench_predictor.py's synthetic CT as a .nii.gz: air around an elliptic body of soft
/// tissue with a brighter organ and a vertebra-like column, noise of σ 20 HU, int16, deflated by
/// zlib-rs at level 2 (27 MB, about what nibabel's zlib level 1 writes; zlib-rs's level 1, the
/// nifti crate's, deflates less: 38 MB).
fn synthetic_ct_nii_gz(dir: &std::path::Path, [nz, ny, nx]: [usize; 3]) -> Vec<u8> {
    let mut rng = Rng::new(7);
    let at = |i: usize, n: usize| -1.0 + 2.0 * i as f32 / (n - 1) as f32;
    let inside = |y: f32, x: f32, cy: f32, cx: f32, ry: f32, rx: f32| {
        ((y - cy) / ry).powi(2) + ((x - cx) / rx).powi(2) <= 1.0
    };
    let mut voxels = Vec::with_capacity(nz * ny * nx);
    for _ in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                let (y, x) = (at(j, ny), at(i, nx));
                let hu = if inside(y, x, 0.45, 0.0, 0.12, 0.1) {
                    700.0
                } else if inside(y, x, -0.1, 0.35, 0.25, 0.3) {
                    110.0
                } else if inside(y, x, 0.0, 0.0, 0.7, 0.9) {
                    40.0
                } else {
                    -1000.0
                };
                voxels.push((hu + 20.0 * rng.normal()).round() as i16);
            }
        }
    }
    let plain = dir.join("ct.nii");
    WriterOptions::new(&plain)
        .write_nifti(&Array3::from_shape_vec((nx, ny, nz).f(), voxels).unwrap())
        .unwrap();
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::new(2));
    gz.write_all(&std::fs::read(&plain).unwrap()).unwrap();
    gz.finish().unwrap()
}

criterion_group!(benches, click_latency, tile_forward, volume_phases);
criterion_main!(benches);
