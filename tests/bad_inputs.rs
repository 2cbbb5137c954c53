//! Bad images are refused with a clear error, never a panic and never a huge allocation.

mod common;

use std::io::Write;
use std::path::PathBuf;

use flate2::Compression;
use flate2::write::GzEncoder;

use tis::io::nifti::read_image;
use tis::pipeline::preprocess::preprocess;
use tis::pipeline::sliding_window::Outputs;
use tis::{CpuBackend, Model};

/// A minimal uncompressed NIfTI-1 file: 348-byte header, 4 bytes of extension flag, f32 voxels.
fn nifti_bytes(dims: &[i16], voxels: &[f32]) -> Vec<u8> {
    let mut h = vec![0u8; 352];
    h[0..4].copy_from_slice(&348i32.to_le_bytes());
    let mut dim = [1i16; 8];
    dim[0] = dims.len() as i16;
    dim[1..=dims.len()].copy_from_slice(dims);
    for (i, d) in dim.iter().enumerate() {
        h[40 + 2 * i..42 + 2 * i].copy_from_slice(&d.to_le_bytes());
    }
    h[70..72].copy_from_slice(&16i16.to_le_bytes()); // FLOAT32
    h[72..74].copy_from_slice(&32i16.to_le_bytes());
    for i in 0..8 {
        h[76 + 4 * i..80 + 4 * i].copy_from_slice(&1f32.to_le_bytes());
    }
    h[108..112].copy_from_slice(&352f32.to_le_bytes());
    h[112..116].copy_from_slice(&1f32.to_le_bytes());
    h[344..348].copy_from_slice(b"n+1\0");
    h.extend(voxels.iter().flat_map(|v| v.to_le_bytes()));
    h
}

fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("tis-bad-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

fn refused(name: &str, bytes: &[u8], reason: &str) {
    let path = write(name, bytes);
    let err = read_image(&path)
        .err()
        .unwrap_or_else(|| panic!("{name} was read"));
    let message = err.to_string();
    assert!(
        message.contains(reason) && message.contains(path.to_str().unwrap()),
        "{name}: {message}"
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_valid_image_reads() {
    let path = write(
        "ok.nii",
        &nifti_bytes(&[4, 3, 2], &(0..24).map(|v| v as f32).collect::<Vec<_>>()),
    );
    let image = read_image(&path).unwrap();
    assert_eq!(image.shape(), [2, 3, 4]);
    assert_eq!(image.voxels.data()[5], 5.0);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn malformed_images_are_refused() {
    let good = nifti_bytes(&[4, 3, 2], &[0.5; 24]);
    refused("truncated.nii", &good[..good.len() - 10], "cannot read");
    refused("header-only.nii", &good[..200], "cannot read");
    refused("garbage.nii", b"this is not an image at all", "cannot read");
    refused(
        "zero.nii",
        &nifti_bytes(&[4, 0, 2], &[]),
        "not a usable image",
    );
    refused(
        "four-d.nii",
        &nifti_bytes(&[4, 3, 2, 2], &[0.5; 48]),
        "expected a 3D image, found 4 dimensions",
    );
    refused(
        "two-d.nii",
        &nifti_bytes(&[4, 3], &[0.5; 12]),
        "expected a 3D image, found 2 dimensions",
    );
}

#[test]
fn a_header_that_lies_about_its_voxels_is_refused_before_reading_them() {
    let mut unknown_type = nifti_bytes(&[4, 3, 2], &[0.5; 24]);
    unknown_type[70..72].copy_from_slice(&(-12391i16).to_le_bytes());
    refused("unknown-type.nii", &unknown_type, "cannot read as NIfTI");
    // bitpix 15348 with a float32 datatype: found by fuzzing, the reader allocated by bitpix.
    let mut bitpix = nifti_bytes(&[4, 3843, 30000], &[]);
    bitpix[72..74].copy_from_slice(&15348i16.to_le_bytes());
    refused("bitpix.nii", &bitpix, "bitpix 15348 does not match");
    // A billion voxels promised, none present: refused from the file size, nothing allocated.
    refused(
        "promises.nii",
        &nifti_bytes(&[4, 3843, 30000], &[]),
        "the header promises 1844640352 bytes",
    );
}

#[test]
fn colour_and_complex_voxels_are_refused() {
    // RGB24 (128), RGBA32 (2304), COMPLEX64 (32), COMPLEX128 (1792): the byte count matches the
    // header, but there is no single intensity per voxel to segment.
    for (code, bytes_per_voxel, name) in [
        (128i16, 3, "RGB24"),
        (2304, 4, "RGBA32"),
        (32, 8, "COMPLEX64"),
        (1792, 16, "COMPLEX128"),
    ] {
        let mut bytes = nifti_bytes(&[4, 3, 2], &[]);
        bytes[70..72].copy_from_slice(&code.to_le_bytes());
        bytes[72..74].copy_from_slice(&(8 * bytes_per_voxel as i16).to_le_bytes());
        bytes.extend(vec![7u8; 24 * bytes_per_voxel]);
        refused(&format!("{name}.nii"), &bytes, &format!("datatype {name}"));
    }
}

#[test]
fn absurd_sizes_are_refused_before_allocating() {
    // 30000³ f32 would be 108 TB: refused from the header alone.
    refused(
        "huge.nii",
        &nifti_bytes(&[30000, 30000, 30000], &[]),
        "not a usable image",
    );
}

#[test]
fn nan_voxels_are_refused_by_preprocessing() {
    let mut voxels = vec![40.0f32; 16 * 16 * 16];
    voxels[100] = f32::NAN;
    let path = write("nan.nii", &nifti_bytes(&[16, 16, 16], &voxels));
    let image = read_image(&path).unwrap();
    let model = Model::default_model(CpuBackend).unwrap();
    let err = preprocess(&image.voxels, image.spacing, &model.info)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("NaN"), "{err}");
    std::fs::remove_file(path).unwrap();
}

#[test]
fn voxels_are_read_from_vox_offset() {
    let voxels: Vec<f32> = (0..24).map(|v| v as f32).collect();
    refused_after_offset(400f32, &voxels);
    // Padding between the header and the voxels, as vox_offset declares (not an extension).
    let mut padded = nifti_bytes(&[4, 3, 2], &voxels);
    padded.splice(352..352, [0u8; 48]);
    padded[108..112].copy_from_slice(&400f32.to_le_bytes());
    let path = write("padded.nii", &padded);
    assert_eq!(read_image(&path).unwrap().voxels.data(), &voxels[..]);
    std::fs::remove_file(path).unwrap();
    // A vox_offset past the data, or inside the header.
    let mut bytes = nifti_bytes(&[4, 3, 2], &voxels);
    bytes[108..112].copy_from_slice(&4000f32.to_le_bytes());
    refused("offset.nii", &bytes, "vox_offset 4000");
    for inside in [0f32, 100.0, 352.5] {
        bytes[108..112].copy_from_slice(&inside.to_le_bytes());
        refused(
            "inside.nii",
            &bytes,
            &format!("vox_offset {inside} is not where"),
        );
    }
}

/// A .nii.gz whose header promises the voxels from `offset` where they start at 352: the file
/// is 48 bytes short of what the header promises.
fn refused_after_offset(offset: f32, voxels: &[f32]) {
    let mut bytes = nifti_bytes(&[4, 3, 2], voxels);
    bytes[108..112].copy_from_slice(&offset.to_le_bytes());
    refused("offset.nii.gz", &gzip(&[&bytes]), "truncated");
}

/// `parts` deflated as one gzip member each, one after the other.
fn gzip(parts: &[&[u8]]) -> Vec<u8> {
    parts
        .iter()
        .flat_map(|part| {
            let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
            encoder.write_all(part).unwrap();
            encoder.finish().unwrap()
        })
        .collect()
}

#[test]
fn compressed_images_read_as_the_uncompressed_ones() {
    let voxels: Vec<f32> = (0..24 * 40).map(|v| (v % 7) as f32 - 2.5).collect();
    let bytes = nifti_bytes(&[16, 6, 10], &voxels);
    let read = |name: &str, file: &[u8]| {
        let path = write(name, file);
        let image = read_image(&path).unwrap();
        std::fs::remove_file(path).unwrap();
        assert_eq!(image.shape(), [10, 6, 16], "{name}");
        image.voxels.data().to_vec()
    };
    // One gzip member (libdeflate, in one call), and three (flate2's stream).
    assert_eq!(read("one.nii.gz", &gzip(&[&bytes])), voxels);
    let (a, rest) = bytes.split_at(1000);
    let (b, c) = rest.split_at(1500);
    assert_eq!(read("three.nii.gz", &gzip(&[a, b, c])), voxels);
    // Data past the voxels is left alone.
    let mut longer = bytes.clone();
    longer.extend([9u8; 64]);
    assert_eq!(read("longer.nii.gz", &gzip(&[&longer])), voxels);
    // Cut short, or corrupt inside the deflate stream: refused.
    let whole = gzip(&[&bytes]);
    refused("cut.nii.gz", &whole[..whole.len() / 2], "cannot read");
    let mut corrupt = whole.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle..middle + 8].copy_from_slice(&[0xff; 8]);
    refused("corrupt.nii.gz", &corrupt, "cannot read");
}

#[test]
fn a_tensor_whose_bytes_do_not_match_its_shape_is_refused() {
    // safetensors header: shape [4] of F32 needs 16 bytes, the offsets give 8.
    let header = br#"{"__metadata__":{"format":"tis-bundle/1"},"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0; 8]);
    let err = tis::model::Bundle::from_bytes(&bytes, "short.safetensors")
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("short.safetensors") && err.contains("not a readable safetensors file"),
        "{err}"
    );
}

#[test]
fn memory_beyond_the_machine_is_refused_with_the_numbers() {
    // 3000 mm voxels for a model at 3 mm: the grid would be 1000³ times larger.
    let path = write("fine.nii", &nifti_bytes(&[8, 8, 8], &[40.0; 512]));
    let mut image = read_image(&path).unwrap();
    image.spacing = [3000.0, 3000.0, 3000.0];
    let model = Model::default_model(CpuBackend).unwrap();
    let err = preprocess(&image.voxels, image.spacing, &model.info)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("GiB") && err.contains("free"), "{err}");
    // The encoder's estimate grows with the grid; a grid far beyond any machine is refused.
    let memory = |grid, outputs| tis::pipeline::session::encoding_memory(&model, grid, outputs);
    let small = memory([64, 64, 64], Outputs::LogitsAndFeatures);
    let huge = memory([4000, 4000, 4000], Outputs::LogitsAndFeatures);
    assert!(huge > 1000 * small && huge > 1 << 40);
    // An automatic segmentation keeps no features, and needs less.
    assert!(memory([64, 64, 64], Outputs::Logits) < small);
    std::fs::remove_file(path).unwrap();
}
