//! NIfTI in and out, read the way nnU-Net's SimpleITKIO sees a file: the raw voxel buffer
//! (i fastest) as a C-order Z × Y × X array, spacing (pixdim[3], pixdim[2], pixdim[1]), the
//! intensity scaling applied unless scl_slope is 0 or not finite (ITK's rule). Label maps are
//! written with the input's header (dims, pixdim, qform/sform) to a temporary file in the same
//! folder and renamed, so a failure never leaves a partial file.

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use libdeflater::Decompressor;
use ndarray::{Array3, ShapeBuilder};
use nifti::writer::WriterOptions;
use nifti::{InMemNiftiVolume, IntoNdArray, NiftiHeader, NiftiObject, ReaderOptions};
use rayon::prelude::*;

use super::replace_atomically;
use crate::error::{Error, Result};
use crate::geometry::Label;
use crate::tensor::Tensor;

/// A 3D image: its voxels as one channel, C order (z, y, x), and the header it came with.
pub struct Image {
    pub path: PathBuf,
    pub header: NiftiHeader,
    /// 1 × Z × Y × X, scaled intensities.
    pub voxels: Tensor,
    /// Voxel size in mm per array axis (z, y, x).
    pub spacing: [f64; 3],
}

impl Image {
    pub fn shape(&self) -> [usize; 3] {
        let s = self.voxels.shape();
        [s[1], s[2], s[3]]
    }
}

fn image_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn unreadable(path: &Path, e: nifti::NiftiError) -> Error {
    image_err(path, format!("cannot read as NIfTI ({e})"))
}

/// The most voxels an image may have (8 GiB as f32); larger headers are refused before anything
/// is allocated.
pub const MAX_IMAGE_VOXELS: usize = 1 << 31;

/// The (x, y, z) extent of a 3D image header, refused unless it is a 3D image (or 4D with one
/// time point) of positive size within `MAX_IMAGE_VOXELS`, of a scalar voxel type whose bitpix
/// agrees, and (uncompressed) with every voxel's bytes in the file. All of it is checked before
/// the voxels are read, so a lying header never drives an allocation.
fn checked_extent(path: &Path, header: &NiftiHeader) -> Result<[usize; 3]> {
    let dims = header.dim;
    let rank = dims[0] as usize;
    if !(rank == 3 || (rank == 4 && dims[4] == 1)) {
        let shown = &dims[1..=rank.clamp(1, 7)];
        return Err(image_err(
            path,
            format!("expected a 3D image, found {rank} dimensions {shown:?}"),
        ));
    }
    let extent = [dims[1], dims[2], dims[3]].map(usize::from);
    let voxels = extent.iter().product::<usize>();
    if voxels == 0 || voxels > MAX_IMAGE_VOXELS {
        return Err(image_err(
            path,
            format!(
                "dims {extent:?} ({voxels} voxels) are not a usable image (1 to {MAX_IMAGE_VOXELS} voxels)"
            ),
        ));
    }
    let datatype = header.data_type().map_err(|e| unreadable(path, e))?;
    // Only one real intensity per voxel can be segmented; colour and complex voxels are refused
    // (the nifti crate would panic decoding them as f32).
    use nifti::NiftiType::*;
    if !matches!(
        datatype,
        Uint8 | Int8 | Uint16 | Int16 | Uint32 | Int32 | Uint64 | Int64 | Float32 | Float64
    ) {
        let name = format!("{datatype:?}").to_uppercase();
        return Err(image_err(
            path,
            format!(
                "datatype {name} (code {}) has no single real intensity per voxel; tis reads integer and float32/float64 images",
                header.datatype
            ),
        ));
    }
    let bytes_per_voxel = datatype.size_of();
    if header.bitpix as usize != 8 * bytes_per_voxel {
        return Err(image_err(
            path,
            format!(
                "bitpix {} does not match datatype {datatype:?} ({} bits)",
                header.bitpix,
                8 * bytes_per_voxel
            ),
        ));
    }
    let single_file = &header.magic == nifti::header::MAGIC_CODE_NIP1;
    let compressed = path.extension().is_some_and(|e| e == "gz");
    if single_file && !compressed {
        let needed = header.vox_offset.max(0.0) as u64 + (voxels * bytes_per_voxel) as u64;
        let found = std::fs::metadata(path)
            .map_err(|e| image_err(path, e.to_string()))?
            .len();
        if found < needed {
            return Err(image_err(
                path,
                format!(
                    "cannot read as NIfTI: truncated, the header promises {needed} bytes ({extent:?} voxels of {datatype:?} from vox_offset {}), the file has {found}",
                    header.vox_offset
                ),
            ));
        }
    }
    Ok(extent)
}

pub fn read_image(path: &Path) -> Result<Image> {
    // The header alone first: checked before anything is allocated for the voxels.
    let mut header = NiftiHeader::from_file(path).map_err(|e| unreadable(path, e))?;
    let [nx, ny, nz] = checked_extent(path, &header)?;
    if !header.scl_slope.is_finite() || header.scl_slope == 0.0 {
        header.scl_slope = 0.0; // no scaling, as ITK reads it
    }
    let data = if &header.magic == nifti::header::MAGIC_CODE_NIP1 {
        // A single file (.nii, .nii.gz): the voxels start at vox_offset, whatever lies between
        // it and the header (extensions, padding).
        let offset = header.vox_offset;
        if !(offset >= 352.0 && offset.fract() == 0.0) {
            return Err(image_err(
                path,
                format!(
                    "vox_offset {offset} is not where voxels can start (a whole number of bytes, at least the header's 352)"
                ),
            ));
        }
        let start = offset as usize;
        let end = start + nx * ny * nz * (header.bitpix as usize / 8); // bitpix checked above
        let bytes = single_file_bytes(path, end)?;
        let voxels = bytes.get(start..end).ok_or_else(|| {
            image_err(
                path,
                format!(
                    "cannot read as NIfTI: truncated, the header promises {end} bytes (voxels from vox_offset {start}), the file holds {} bytes",
                    bytes.len()
                ),
            )
        })?;
        voxels_as_f32(path, &header, voxels, [nx, ny, nz])?
    } else {
        // A header and image pair (.hdr and .img): the nifti crate finds the image file.
        let object = ReaderOptions::new()
            .read_file(path)
            .map_err(|e| unreadable(path, e))?;
        voxels_as_f32(
            path,
            &header,
            &object.into_volume().into_raw_data(),
            [nx, ny, nz],
        )?
    };
    let spacing = [header.pixdim[3], header.pixdim[2], header.pixdim[1]].map(|s| s.abs() as f64);
    Ok(Image {
        path: path.to_path_buf(),
        header,
        voxels: Tensor::new(vec![1, nz, ny, nx], data)?,
        spacing,
    })
}

/// A single-file image's bytes, inflated where it is gzip-compressed (.gz), of which the header
/// says the first `promised` hold it. Where the gzip trailer's size (ISIZE, modulo 2³²) agrees
/// and the file could hold that much (deflate expands at most 1032-fold), libdeflate inflates
/// it in one call into a buffer of that size: 110 ms where flate2's stream (zlib-rs, through
/// the nifti crate) took 155 for a 96 × 512 × 512 int16 CT on the 2-core machine of
/// docs/performance.md. Anything else (several gzip members, data past the voxels, a corrupt or
/// lying file) goes through flate2's stream, up to `promised` bytes, which says what is wrong.
fn single_file_bytes(path: &Path, promised: usize) -> Result<Vec<u8>> {
    /// Deflate's largest expansion: a 258-byte match in about two bits.
    const MAX_INFLATION: usize = 1032;
    let file = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if path.extension().is_none_or(|e| e != "gz") {
        return Ok(file);
    }
    let trailer = file.len().checked_sub(4).map(|at| &file[at..]);
    if trailer == Some(&(promised as u32).to_le_bytes()[..])
        && promised <= file.len().saturating_mul(MAX_INFLATION)
    {
        let mut bytes = vec![0; promised];
        if Decompressor::new()
            .gzip_decompress(&file, &mut bytes)
            .is_ok_and(|n| n == promised)
        {
            return Ok(bytes);
        }
    }
    let mut bytes = Vec::new();
    MultiGzDecoder::new(file.as_slice())
        .take(promised as u64)
        .read_to_end(&mut bytes)
        .map_err(|e| image_err(path, format!("cannot read as NIfTI: cannot inflate ({e})")))?;
    Ok(bytes)
}

/// z slices converted together by one task of `voxels_as_f32`.
const SLAB_SLICES: usize = 4;

/// The raw voxels (x fastest) as f32 in C order (z, y, x), scaled by the header's scl_slope and
/// scl_inter exactly as the nifti crate's `into_ndarray` scales them, since that is what converts
/// each slab of `SLAB_SLICES` slices; the slabs in parallel. `into_ndarray` alone converts one
/// value at a time on one thread: 75 ms of a 96 × 512 × 512 CT's read, next to the 190 ms of
/// inflating it.
fn voxels_as_f32(
    path: &Path,
    header: &NiftiHeader,
    raw: &[u8],
    [nx, ny, nz]: [usize; 3],
) -> Result<Vec<f32>> {
    let datatype = header.data_type().map_err(|e| unreadable(path, e))?;
    let slice_voxels = nx * ny;
    let slice_bytes = slice_voxels * datatype.size_of();
    if raw.len() != nz * slice_bytes {
        return Err(image_err(
            path,
            format!(
                "cannot decode the voxels: {} bytes where {nx} × {ny} × {nz} voxels of {datatype:?} take {}",
                raw.len(),
                nz * slice_bytes
            ),
        ));
    }
    let mut data = vec![0f32; nz * slice_voxels];
    data.par_chunks_mut(SLAB_SLICES * slice_voxels)
        .zip(raw.par_chunks(SLAB_SLICES * slice_bytes))
        .try_for_each(|(values, bytes)| {
            let mut dim = [1; 8];
            dim[..3].copy_from_slice(&[3, nx as u16, ny as u16]);
            dim[3] = (values.len() / slice_voxels) as u16;
            let slab = InMemNiftiVolume::from_raw_fields(
                dim,
                datatype,
                header.scl_slope,
                header.scl_inter,
                bytes.to_vec(),
                header.endianness,
            )
            .and_then(|v| v.into_ndarray::<f32>())
            .map_err(|e| image_err(path, format!("cannot decode the voxels ({e})")))?;
            // The array is F-ordered [x, y, z]: its buffer is already C order (z, y, x).
            values.copy_from_slice(&slab.into_raw_vec_and_offset().0);
            Ok(())
        })?;
    Ok(data)
}

/// Writes a label map (Z × Y × X, C order) with `reference`'s geometry, as uint8 when every label
/// fits, else uint16.
pub fn write_labels(
    path: &Path,
    labels: &[Label],
    shape: [usize; 3],
    reference: &NiftiHeader,
) -> Result<()> {
    let [nz, ny, nx] = shape;
    if labels.len() != nz * ny * nx {
        return Err(image_err(
            path,
            format!("{} labels do not fill a {shape:?} grid", labels.len()),
        ));
    }
    let mut header = reference.clone();
    header.dim = [3, nx as u16, ny as u16, nz as u16, 1, 1, 1, 1];
    replace_atomically(path, |temporary| {
        let writer = WriterOptions::new(temporary).reference_header(&header);
        let written = if labels.par_iter().all(|&l| l <= u8::MAX as Label) {
            let data: Vec<u8> = labels.par_iter().map(|&l| l as u8).collect();
            writer
                .write_nifti(&Array3::from_shape_vec((nx, ny, nz).f(), data).expect("sized above"))
        } else {
            writer.write_nifti(
                &Array3::from_shape_vec((nx, ny, nz).f(), labels.to_vec()).expect("sized above"),
            )
        };
        written.map_err(|e| image_err(path, format!("cannot write ({e})")))
    })
}
