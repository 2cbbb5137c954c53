//! The Rust pipeline against nnU-Net's own predictor (python/make_nnunet_fixtures.py: a real
//! nnunetv2 results folder, nnUNetPredictor on CPU): resampling and hole filling against
//! nnunetv2/scipy, preprocessing, sliding-window logits and the exported segmentation of every
//! case (anisotropic with separate-z resampling, smaller than the patch, a non-zero crop,
//! near-isotropic resampling).

mod common;

use common::{fixture, read_fixture};
use tis::backend::Backend;
use tis::io::nifti::read_image;
use tis::model::Bundle;
use tis::model::bundle::TensorFile;
use tis::pipeline::predictor::{ensemble_logits, predict};
use tis::pipeline::preprocess::{fill_holes, preprocess};
use tis::pipeline::resample::Resampling;
use tis::pipeline::session::{SessionOptions, encode};
use tis::pipeline::sliding_window::Outputs;
use tis::{CpuBackend, Model, Region, Tensor};

/// Preprocessing is exact arithmetic on the same f64 path as nnU-Net.
const PREPROCESSING_TOLERANCE: f64 = 1e-6;
/// nnU-Net accumulates the sliding window in f16, the engine in f32.
const LOGITS_TOLERANCE: f64 = 5e-3;
/// Voxel agreement of the exported segmentation with nnU-Net's.
const SEGMENTATION_AGREEMENT: f64 = 0.999;

fn triple_usize(file: &TensorFile<'_>, name: &str) -> [usize; 3] {
    let (_, v) = file.i64(name).unwrap();
    [v[0] as usize, v[1] as usize, v[2] as usize]
}

fn triple_f64(file: &TensorFile<'_>, name: &str) -> [f64; 3] {
    let (_, v) = file.f64(name).unwrap();
    [v[0], v[1], v[2]]
}

fn scalar(file: &TensorFile<'_>, name: &str) -> i64 {
    file.i64(name).unwrap().1[0]
}

#[test]
fn resampling_matches_nnunet() {
    let bytes = read_fixture("nnunet/resampling.golden.safetensors");
    let golden = TensorFile::parse(&bytes, "resampling").unwrap();
    let mut cases = 0;
    while golden.dtype_and_shape(&format!("r{cases}.input")).is_ok() {
        let r = |n: &str| format!("r{cases}.{n}");
        let resampling = Resampling {
            order: scalar(&golden, &r("order")) as usize,
            order_z: scalar(&golden, &r("order_z")) as usize,
            force_separate_z: None,
        };
        let half = scalar(&golden, &r("fp16")) == 1;
        let apply = if half {
            Resampling::apply_f16
        } else {
            Resampling::apply
        };
        let out = apply(
            &resampling,
            &golden.f32(&r("input")).unwrap(),
            triple_usize(&golden, &r("new_shape")),
            triple_f64(&golden, &r("current_spacing")),
            triple_f64(&golden, &r("new_spacing")),
        )
        .unwrap();
        let want = golden.f32(&r("output")).unwrap();
        let err = out.relative_l2_error(&want).unwrap();
        println!("r{cases} {resampling:?}: relative L2 error {err:e}");
        if half {
            // Stored as f16, values that fall (almost) exactly between two f16 numbers may round
            // either way, depending on the order scipy sums its interpolation terms in: allow
            // one f16 step on at most 0.1 % of the values.
            let off: Vec<(f32, f32)> = out
                .data()
                .iter()
                .zip(want.data())
                .filter(|(a, b)| a != b)
                .map(|(a, b)| (*a, *b))
                .collect();
            println!(
                "r{cases}: {} of {} f16 values one step apart: {off:?}",
                off.len(),
                want.len()
            );
            assert!(
                off.len() * 1000 <= want.len(),
                "r{cases}: {} values differ",
                off.len()
            );
            assert!(
                off.iter()
                    .all(|(a, b)| (a - b).abs() <= b.abs().max(1e-4) * 2f32.powi(-10) * 1.01)
            );
        } else {
            assert!(err <= PREPROCESSING_TOLERANCE, "r{cases}: {err:e}");
        }
        cases += 1;
    }
    assert!(cases >= 8);
}

#[test]
fn fill_holes_matches_scipy() {
    let bytes = read_fixture("nnunet/resampling.golden.safetensors");
    let golden = TensorFile::parse(&bytes, "resampling").unwrap();
    let (shape, input) = golden.u8("fill.input").unwrap();
    let (_, output) = golden.u8("fill.output").unwrap();
    let mask: Vec<bool> = input.iter().map(|&v| v != 0).collect();
    let filled = fill_holes(&mask, [shape[0], shape[1], shape[2]]);
    let want: Vec<bool> = output.iter().map(|&v| v != 0).collect();
    assert_ne!(mask, want, "the fixture has holes to fill");
    assert_eq!(filled, want);
}

fn model(name: &str) -> Model<CpuBackend> {
    Model::from_bundle(
        Bundle::from_bytes(&read_fixture(&format!("nnunet/{name}")), name).unwrap(),
        CpuBackend,
    )
    .unwrap()
}

fn cases() -> Vec<String> {
    (0..)
        .map(|i| format!("case{i}"))
        .take_while(|c| fixture(&format!("nnunet/{c}_0000.nii.gz")).exists())
        .collect()
}

#[test]
fn preprocessing_matches_nnunet() {
    let model = model("bundle.safetensors");
    for case in cases() {
        let bytes = read_fixture(&format!("nnunet/{case}.golden.safetensors"));
        let golden = TensorFile::parse(&bytes, &case).unwrap();
        let image = read_image(&fixture(&format!("nnunet/{case}_0000.nii.gz"))).unwrap();
        let pre = preprocess(&image.voxels, image.spacing, &model.info).unwrap();
        let (_, bbox) = golden.i64("bbox").unwrap();
        let want = Region {
            start: [bbox[0], bbox[2], bbox[4]].map(|v| v as usize),
            size: [bbox[1] - bbox[0], bbox[3] - bbox[2], bbox[5] - bbox[4]].map(|v| v as usize),
        };
        assert_eq!(pre.crop, want, "{case}: crop");
        assert_eq!(
            pre.transposed_shape,
            triple_usize(&golden, "shape_before_cropping"),
            "{case}"
        );
        let err = pre
            .volume
            .relative_l2_error(&golden.f32("preprocessed").unwrap())
            .unwrap();
        println!(
            "{case}: grid {:?}, preprocessed relative L2 error {err:e}",
            pre.grid()
        );
        assert!(
            err <= PREPROCESSING_TOLERANCE,
            "{case}: preprocessed {err:e}"
        );
    }
}

#[test]
fn sliding_window_logits_match_nnunet() {
    let model = model("bundle.safetensors");
    for case in cases() {
        let bytes = read_fixture(&format!("nnunet/{case}.golden.safetensors"));
        let golden = TensorFile::parse(&bytes, &case).unwrap();
        let encoded = encode(
            &model,
            &golden.f32("preprocessed").unwrap(),
            &SessionOptions::default(),
            Outputs::Logits,
            &mut |_, _| {},
        )
        .unwrap();
        let logits = model.backend.download(&encoded.logits).unwrap();
        let want = golden.f32("logits").unwrap();
        let err = logits.relative_l2_error(&want).unwrap();
        let max = logits
            .data()
            .iter()
            .zip(want.data())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("{case}: logits relative L2 error {err:e}, max abs {max:e}");
        assert!(err <= LOGITS_TOLERANCE, "{case}: logits {err:e}");
    }
}

fn agreement(a: &[u16], b: &Tensor) -> f64 {
    a.iter()
        .zip(b.data())
        .filter(|(x, y)| **x as f32 == **y)
        .count() as f64
        / a.len() as f64
}

#[test]
fn segmentation_matches_nnunet_predictor() {
    let model = model("bundle.safetensors");
    for case in cases() {
        let image = read_image(&fixture(&format!("nnunet/{case}_0000.nii.gz"))).unwrap();
        let reference = read_image(&fixture(&format!("nnunet/{case}.seg.nii.gz"))).unwrap();
        let prediction = predict(
            &[&model],
            &image.voxels,
            image.spacing,
            &SessionOptions::default(),
            &mut |_, _| {},
        )
        .unwrap();
        let agree = agreement(&prediction.labels, &reference.voxels);
        let labels: std::collections::BTreeSet<_> = prediction.labels.iter().collect();
        println!(
            "{case}: {:?} voxels, labels {labels:?}, agreement with nnU-Net {agree}",
            image.shape()
        );
        assert!(agree >= SEGMENTATION_AGREEMENT, "{case}: agreement {agree}");
    }
}

#[test]
fn an_ensemble_of_identical_folds_gives_the_same_segmentation() {
    let (a, b) = (model("bundle.safetensors"), model("bundle.safetensors"));
    let image = read_image(&fixture("nnunet/case2_0000.nii.gz")).unwrap();
    let options = SessionOptions::default();
    let single = predict(
        &[&a],
        &image.voxels,
        image.spacing,
        &options,
        &mut |_, _| {},
    )
    .unwrap();
    let ensemble = predict(
        &[&a, &b],
        &image.voxels,
        image.spacing,
        &options,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(single.labels, ensemble.labels);
    // Two identical folds average to the one fold's logits.
    let pre = preprocess(&image.voxels, image.spacing, &a.info).unwrap();
    let one = ensemble_logits(&[&a], &pre.volume, &options, &mut |_, _| {}).unwrap();
    let two = ensemble_logits(&[&a, &b], &pre.volume, &options, &mut |_, _| {}).unwrap();
    assert!(one.relative_l2_error(&two).unwrap() < 1e-6);
    // Folds of different trainings are refused.
    let other = model("bundle_with_head.safetensors");
    let iso = Model::from_bundle(
        Bundle::from_bytes(&read_fixture("iso/bundle.safetensors"), "iso").unwrap(),
        CpuBackend,
    )
    .unwrap();
    assert!(
        predict(
            &[&a, &other],
            &image.voxels,
            image.spacing,
            &options,
            &mut |_, _| {}
        )
        .is_ok()
    );
    let err = predict(
        &[&a, &iso],
        &image.voxels,
        image.spacing,
        &options,
        &mut |_, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("not folds of one training"), "{err}");
}
