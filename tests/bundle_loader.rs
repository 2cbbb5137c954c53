//! Bundle loading: a valid bundle in f32 and f16 loads; every malformed bundle is refused with a
//! message naming what is wrong (metadata key, tensor, expected and found shape or dtype).

mod common;

use common::{EditableFile, read_fixture};
use safetensors::Dtype;
use tis::model::Bundle;
use tis::{CpuBackend, Model};

fn iso() -> EditableFile {
    EditableFile::parse(&read_fixture("iso/bundle.safetensors"))
}

/// The error message of loading `file`, which must fail.
fn load_error(file: &EditableFile) -> String {
    match Bundle::from_bytes(&file.serialize(), "edited.safetensors") {
        Ok(_) => panic!("an invalid bundle loaded"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "error `{message}` does not mention `{part}`"
        );
    }
}

#[test]
fn valid_bundle_loads_with_its_metadata() {
    let bundle = Bundle::from_bytes(&read_fixture("iso/bundle.safetensors"), "iso").unwrap();
    assert_eq!(bundle.dataset.class_names, ["background", "organ"]);
    assert_eq!(bundle.configuration.patch_size, [16, 16, 16]);
    assert_eq!(bundle.mirror_axes, [0, 1, 2]);
    assert_eq!(bundle.tis_config.as_ref().unwrap().d_model, 16);
    assert_eq!(
        bundle.stored_dtypes.get("F32").copied(),
        Some(bundle.stored_dtypes.values().sum())
    );
    let (network, head) = bundle.parameter_counts();
    assert!(network > 0 && head > 0);
}

#[test]
fn old_plans_without_architecture_load() {
    let bundle = Bundle::from_bytes(&read_fixture("aniso/bundle.safetensors"), "aniso").unwrap();
    let net = &bundle.configuration.network;
    assert!(
        bundle.plans["configurations"]["3d_fullres"]
            .get("architecture")
            .is_none()
    );
    assert_eq!(net.features, [6, 12, 20, 20]);
    assert_eq!(net.kernel_sizes[0], [1, 3, 3]);
    assert_eq!(net.strides[1], [1, 2, 2]);
    assert_eq!(net.convs_per_stage, [1, 2, 2, 2]);
    assert_eq!(net.convs_per_decoder_stage, [1, 1, 2]);
}

#[test]
fn f16_bundle_loads_and_stays_close_to_f32() {
    let mut file = iso();
    for (_, dtype, _, bytes) in &mut file.tensors {
        *bytes = bytes
            .chunks_exact(4)
            .flat_map(|b| {
                half::f16::from_f32(f32::from_le_bytes(b.try_into().unwrap())).to_le_bytes()
            })
            .collect();
        *dtype = Dtype::F16;
    }
    let bundle = Bundle::from_bytes(&file.serialize(), "f16").unwrap();
    assert_eq!(bundle.stored_dtypes.keys().collect::<Vec<_>>(), ["F16"]);
    let half_model = Model::from_bundle(bundle, CpuBackend).unwrap();
    let full_model = Model::from_bundle(
        Bundle::from_bytes(&read_fixture("iso/bundle.safetensors"), "f32").unwrap(),
        CpuBackend,
    )
    .unwrap();
    let golden_bytes = read_fixture("iso/golden.safetensors");
    let golden = tis::model::bundle::TensorFile::parse(&golden_bytes, "golden").unwrap();
    let input = golden.f32("tile.input").unwrap();
    let a = half_model
        .network
        .forward(&half_model.backend, &input)
        .unwrap()
        .logits;
    let b = full_model
        .network
        .forward(&full_model.backend, &input)
        .unwrap()
        .logits;
    let err = a.relative_l2_error(&b).unwrap();
    assert!(
        err > 0.0 && err < 1e-2,
        "f16 weights moved the logits by {err:e}"
    );
}

#[test]
fn missing_metadata_is_named() {
    for key in [
        "format",
        "plans",
        "configuration",
        "dataset_json",
        "mirror_axes",
    ] {
        let mut file = iso();
        file.metadata.remove(key);
        assert_mentions(
            &load_error(&file),
            &["edited.safetensors", &format!("`{key}`"), "missing"],
        );
    }
}

#[test]
fn wrong_format_tag_is_refused() {
    let mut file = iso();
    file.metadata.insert("format".into(), "tis-bundle/2".into());
    assert_mentions(
        &load_error(&file),
        &["`tis-bundle/2`", "expected `tis-bundle/1`"],
    );
}

#[test]
fn metadata_that_is_not_json_is_refused() {
    let mut file = iso();
    file.metadata.insert("plans".into(), "{not json".into());
    assert_mentions(&load_error(&file), &["`plans`", "not valid JSON"]);
    let mut file = iso();
    file.metadata
        .insert("tis_config".into(), r#"{"d_model": 16}"#.into());
    assert_mentions(&load_error(&file), &["tis_config"]);
}

#[test]
fn bad_mirror_axes_are_refused() {
    let mut file = iso();
    file.metadata.insert("mirror_axes".into(), "[0, 3]".into());
    assert_mentions(&load_error(&file), &["mirror_axes", "[0, 3]"]);
}

#[test]
fn missing_tensor_is_named_with_its_shape() {
    let mut file = iso();
    file.tensors
        .retain(|t| t.0 != "decoder.stages.1.convs.0.conv.weight");
    assert_mentions(
        &load_error(&file),
        &[
            "`decoder.stages.1.convs.0.conv.weight`",
            "missing",
            "[4, 8, 3, 3, 3]",
        ],
    );
}

#[test]
fn wrong_shape_names_tensor_expected_and_found() {
    let mut file = iso();
    let t = file.tensor_mut("tis.input_proj.weight");
    t.2 = vec![4, 16];
    assert_mentions(
        &load_error(&file),
        &["`tis.input_proj.weight`", "[4, 16]", "expected [16, 4]"],
    );
}

#[test]
fn wrong_dtype_is_named() {
    let mut file = iso();
    let t = file.tensor_mut("tis.out_proj.bias");
    t.1 = Dtype::I32;
    assert_mentions(
        &load_error(&file),
        &["`tis.out_proj.bias`", "I32", "F32 or F16"],
    );
}

#[test]
fn unknown_extra_tensor_is_refused() {
    let mut file = iso();
    file.tensors.push((
        "decoder.encoder.stages.0.0.convs.0.conv.weight".into(),
        Dtype::F32,
        vec![1],
        vec![0; 4],
    ));
    assert_mentions(
        &load_error(&file),
        &[
            "unexpected tensor",
            "`decoder.encoder.stages.0.0.convs.0.conv.weight`",
        ],
    );
}

#[test]
fn head_tensors_without_tis_config_are_refused() {
    let mut file = iso();
    file.metadata.remove("tis_config");
    assert_mentions(
        &load_error(&file),
        &["unexpected tensor `tis.", "`tis_config` is missing"],
    );
}

#[test]
fn network_only_bundle_loads_without_head() {
    let mut file = iso();
    file.metadata.remove("tis_config");
    file.tensors.retain(|t| !t.0.starts_with("tis."));
    let model = Model::from_bundle(
        Bundle::from_bytes(&file.serialize(), "net").unwrap(),
        CpuBackend,
    )
    .unwrap();
    assert!(model.head.is_none());
}

#[test]
fn truncated_and_garbage_files_are_refused() {
    let bytes = read_fixture("iso/bundle.safetensors");
    for len in [0, 7, 100, bytes.len() / 2, bytes.len() - 1] {
        let err = Bundle::from_bytes(&bytes[..len], "cut.safetensors")
            .err()
            .expect("a truncated bundle loaded");
        assert_mentions(
            &err.to_string(),
            &["cut.safetensors", "not a readable safetensors file"],
        );
    }
    let err = Bundle::from_bytes(b"this is not a model at all, not even close", "junk")
        .err()
        .unwrap();
    assert_mentions(
        &err.to_string(),
        &["junk", "not a readable safetensors file"],
    );
}

#[test]
fn missing_file_is_named() {
    let err = Bundle::open(std::path::Path::new("/nonexistent/model.safetensors"))
        .err()
        .unwrap();
    assert_mentions(&err.to_string(), &["/nonexistent/model.safetensors"]);
}

#[test]
fn unsupported_architectures_are_refused_by_name() {
    let mut file = iso();
    let mut plans: serde_json::Value = serde_json::from_str(&file.metadata["plans"]).unwrap();
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] =
        "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet".into();
    file.metadata.insert("plans".into(), plans.to_string());
    assert_mentions(
        &load_error(&file),
        &["ResidualEncoderUNet", "not supported"],
    );
}

#[test]
fn patch_not_divisible_by_strides_is_refused() {
    let mut file = iso();
    let mut plans: serde_json::Value = serde_json::from_str(&file.metadata["plans"]).unwrap();
    plans["configurations"]["3d_fullres"]["patch_size"] = serde_json::json!([16, 18, 16]);
    file.metadata.insert("plans".into(), plans.to_string());
    assert_mentions(
        &load_error(&file),
        &["patch size [16, 18, 16]", "total stride [4, 4, 4]"],
    );
}
