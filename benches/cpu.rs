//! CPU benchmarks with random weights: one refinement click of the TIS-B head (10 clicks, ROI
//! 16×32×32 and 32×64×64), one nnU-Net tile forward of a small plan (features 16…128, patch
//! 48×96×96), and the host-side phases of a whole-volume segmentation around the sliding window
//! (preprocessing and export of a 96×512×512 CT at the default model's spacing, as issue 7's
//! benchmark volume). Threads: rayon's default (RAYON_NUM_THREADS to set).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tis::CpuBackend;
use tis::Model;
use tis::bench::{CLASSES, HeadBench};
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
/// and export (logits to f16, resampling back, argmax, crop undone) of a 96×512×512 volume.
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
    group.finish();
}

criterion_group!(benches, click_latency, tile_forward, volume_phases);
criterion_main!(benches);
