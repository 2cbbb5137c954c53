//! The CPU engine against the PyTorch reference (python/make_fixtures.py): the network per tile,
//! the sliding window with mirroring and padding, and the refinement head on several click sets,
//! all within relative L2 error 1e-5. A perturbed weight must break parity.

mod common;

use common::{EditableFile, assert_parity, clicks, read_fixture, roi, tokens_to_volume};
use tis::backend::Backend;
use tis::model::Bundle;
use tis::model::bundle::TensorFile;
use tis::pipeline::session::refine_region;
use tis::pipeline::sliding_window::{DEFAULT_STEP, Outputs, predict_sliding_window};
use tis::{CpuBackend, Model};

const CONFIGS: [&str; 2] = ["iso", "aniso"];

fn model_from(bytes: &[u8]) -> Model<CpuBackend> {
    Model::from_bundle(Bundle::from_bytes(bytes, "fixture").unwrap(), CpuBackend).unwrap()
}

/// Largest relative error of the tile logits and features against the golden file.
fn tile_errors(model: &Model<CpuBackend>, golden: &TensorFile<'_>) -> (f64, f64) {
    let out = model
        .network
        .forward(&model.backend, &golden.f32("tile.input").unwrap())
        .unwrap();
    (
        out.logits
            .relative_l2_error(&golden.f32("tile.logits").unwrap())
            .unwrap(),
        out.features
            .relative_l2_error(&golden.f32("tile.features").unwrap())
            .unwrap(),
    )
}

/// Relative error of the refined logits of head case `case` (ROI and click count must match).
fn head_case_error(model: &Model<CpuBackend>, golden: &TensorFile<'_>, case: usize) -> f64 {
    let backend = &model.backend;
    let features = golden.f32("window0.features").unwrap();
    let probs = backend
        .softmax_channels(&golden.f32("window0.logits").unwrap())
        .unwrap();
    let clicks = clicks(golden, &format!("case{case}.clicks"));
    let head = model.head.as_ref().expect("fixture bundles have a head");
    let out = refine_region(backend, head, &features, &probs, &clicks).unwrap();
    let want_roi = roi(golden, &format!("case{case}.roi"));
    assert_eq!(out.roi, want_roi, "case {case}: ROI");
    let (_, used) = golden.i64(&format!("case{case}.clicks_used")).unwrap();
    assert_eq!(out.clicks_used as i64, used[0], "case {case}: clicks used");
    tokens_to_volume(&out.logits, &out.roi)
        .relative_l2_error(&golden.f32(&format!("case{case}.logits")).unwrap())
        .unwrap()
}

fn head_cases(golden: &TensorFile<'_>) -> usize {
    (0..)
        .take_while(|i| golden.dtype_and_shape(&format!("case{i}.logits")).is_ok())
        .count()
}

#[test]
fn network_tile_matches_pytorch() {
    for config in CONFIGS {
        let model = model_from(&read_fixture(&format!("{config}/bundle.safetensors")));
        let bytes = read_fixture(&format!("{config}/golden.safetensors"));
        let golden = TensorFile::parse(&bytes, config).unwrap();
        let (logits, features) = tile_errors(&model, &golden);
        println!("{config}: tile logits {logits:e}, features {features:e}");
        assert!(
            logits <= common::PARITY_TOLERANCE,
            "{config} tile logits: {logits:e}"
        );
        assert!(
            features <= common::PARITY_TOLERANCE,
            "{config} tile features: {features:e}"
        );
    }
}

#[test]
fn sliding_window_matches_pytorch() {
    for config in CONFIGS {
        let model = model_from(&read_fixture(&format!("{config}/bundle.safetensors")));
        let bytes = read_fixture(&format!("{config}/golden.safetensors"));
        let golden = TensorFile::parse(&bytes, config).unwrap();
        for window in ["window0", "window1"] {
            let input = golden.f32(&format!("{window}.input")).unwrap();
            let patch = model.info.configuration.patch_size;
            let window_of = |outputs| {
                predict_sliding_window(
                    &model.backend,
                    &model.network,
                    patch,
                    &input,
                    &model.info.mirror_axes,
                    DEFAULT_STEP,
                    outputs,
                    &mut |_, _| {},
                )
                .unwrap()
            };
            let out = window_of(Outputs::LogitsAndFeatures);
            // Without the features, the same logits, and no features.
            let logits_only = window_of(Outputs::Logits);
            assert!(logits_only.features.is_none());
            assert_eq!(logits_only.logits.data(), out.logits.data());
            let what = format!(
                "{config} {window} (grid {:?}, patch {patch:?})",
                &input.shape()[1..]
            );
            let l = assert_parity(
                &format!("{what} logits"),
                &out.logits,
                &golden.f32(&format!("{window}.logits")).unwrap(),
            );
            let f = assert_parity(
                &format!("{what} features"),
                out.features.as_ref().expect("features were asked for"),
                &golden.f32(&format!("{window}.features")).unwrap(),
            );
            println!("{what}: logits {l:e}, features {f:e}");
        }
    }
}

#[test]
fn refinement_head_matches_pytorch() {
    for config in CONFIGS {
        let model = model_from(&read_fixture(&format!("{config}/bundle.safetensors")));
        let bytes = read_fixture(&format!("{config}/golden.safetensors"));
        let golden = TensorFile::parse(&bytes, config).unwrap();
        let cases = head_cases(&golden);
        assert!(
            cases >= 5,
            "{config}: expected at least 5 head cases, found {cases}"
        );
        for case in 0..cases {
            let err = head_case_error(&model, &golden, case);
            println!("{config} case {case}: refined logits {err:e}");
            assert!(
                err <= common::PARITY_TOLERANCE,
                "{config} case {case}: {err:e}"
            );
        }
    }
}

/// The parity checks are sharp: one stored weight moved by 1e-3 pushes them over the bound.
#[test]
fn perturbed_weight_breaks_parity() {
    let bytes = read_fixture("iso/bundle.safetensors");
    let golden_bytes = read_fixture("iso/golden.safetensors");
    let golden = TensorFile::parse(&golden_bytes, "iso").unwrap();
    for (tensor, network) in [
        ("encoder.stages.1.0.convs.0.conv.weight", true),
        ("decoder.seg_layers.1.bias", true),
        ("tis.layers.1.assign_out.weight", false),
        ("tis.pos_grid", false),
    ] {
        let mut file = EditableFile::parse(&bytes);
        file.perturb_first_value(tensor, 1e-3);
        let model = model_from(&file.serialize());
        let err = if network {
            let (logits, features) = tile_errors(&model, &golden);
            logits.max(features)
        } else {
            (0..head_cases(&golden))
                .map(|c| head_case_error(&model, &golden, c))
                .fold(0.0, f64::max)
        };
        println!("{tensor} + 1e-3: largest relative error {err:e}");
        assert!(
            err > common::PARITY_TOLERANCE,
            "perturbing {tensor} went unnoticed ({err:e})"
        );
    }
}
