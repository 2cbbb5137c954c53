//! The C ABI of `libtis` (include/tis.h is generated from this file by cbindgen).
//!
//! Opaque handles: a `TisModel` (shareable across threads) and a `TisSession` (one thread at a
//! time). Every entry point is guarded: panics are caught, null pointers and handles that are
//! not live (freed, foreign, or of the other kind) are rejected with an error code, and the
//! reason is kept in a thread-local message (`tis_last_error`). Sessions keep their model alive,
//! so a model may be freed while its sessions are still in use.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use half::f16;

use crate::backend::cuda::CudaBackend;
use crate::error::Error;
use crate::geometry::{Click, Region};
use crate::io::nifti::read_image;
use crate::pipeline::image_session::ImageSession;
use crate::pipeline::session::SessionOptions;
use crate::{CpuBackend, Model, Tensor};

/// What a call returned. Anything but `TIS_OK` leaves a message in `tis_last_error()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TisStatus {
    TisOk = 0,
    /// A required pointer argument was NULL.
    TisErrorNullArgument = 1,
    /// An argument was out of range (dims, dtype, buffer size, class, coordinate).
    TisErrorInvalidArgument = 2,
    /// A handle that is not live: already freed, never created by libtis, or of the wrong kind.
    TisErrorInvalidHandle = 3,
    /// A file could not be read or written.
    TisErrorIo = 4,
    /// The model bundle is malformed or cannot be used this way.
    TisErrorModel = 5,
    /// The requested device is not available (no GPU, no driver, out of memory).
    TisErrorDevice = 6,
    /// The request does not fit the session's state (nothing to undo, no refinement head).
    TisErrorSession = 7,
    /// An internal error; please report it.
    TisErrorInternal = 8,
}

/// Where a model runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TisDevice {
    TisDeviceCpu = 0,
    /// The first CUDA GPU, f16 storage.
    TisDeviceCuda = 1,
}

/// Element type of a caller's volume buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TisDtype {
    TisDtypeU8 = 0,
    TisDtypeI16 = 1,
    TisDtypeU16 = 2,
    TisDtypeI32 = 3,
    TisDtypeF32 = 4,
    TisDtypeF64 = 5,
}

/// A box of voxels in (z, y, x) array order: `start` inclusive, `size` voxels per axis. All sizes
/// are 0 when the box is empty (nothing changed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TisBox {
    pub start: [i64; 3],
    pub size: [i64; 3],
}

enum AnyModel {
    Cpu(Box<Model<CpuBackend>>),
    Cuda(Box<Model<CudaBackend<f16>>>),
}

/// A loaded model. Opaque.
pub struct TisModel {
    model: Arc<AnyModel>,
    class_names: Vec<CString>,
}

enum AnySession {
    Cpu(ImageSession<'static, CpuBackend>),
    Cuda(ImageSession<'static, CudaBackend<f16>>),
}

/// An interactive session on one image. Opaque.
pub struct TisSession {
    // Declared before `_model`, so it is dropped first: it borrows the model `_model` keeps
    // alive.
    session: AnySession,
    changed: Option<Region>,
    latency_ms: f64,
    _model: Arc<AnyModel>,
}

/// Calls `$body` on the session whatever its backend.
macro_rules! on_session {
    ($session:expr, $s:ident => $body:expr) => {
        match $session {
            AnySession::Cpu($s) => $body,
            AnySession::Cuda($s) => $body,
        }
    };
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Model,
    Session,
}

/// Addresses of the live handles, to reject freed or foreign pointers.
fn live() -> &'static Mutex<HashMap<usize, Kind>> {
    static LIVE: OnceLock<Mutex<HashMap<usize, Kind>>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(HashMap::new()))
}

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

struct Failure(TisStatus, String);

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Io { .. } => TisStatus::TisErrorIo,
            Error::Bundle { .. } | Error::Plans(_) => TisStatus::TisErrorModel,
            Error::Shape(_) | Error::Click(_) | Error::Image { .. } => {
                TisStatus::TisErrorInvalidArgument
            }
            Error::Backend { .. } => TisStatus::TisErrorDevice,
            Error::Session(_) => TisStatus::TisErrorSession,
        };
        Failure(status, e.to_string())
    }
}

fn fail(status: TisStatus, message: impl Into<String>) -> Failure {
    Failure(status, message.into())
}

/// Runs an entry point's body: catches panics, records the error message, returns the status.
fn guard(body: impl FnOnce() -> Result<(), Failure>) -> TisStatus {
    let outcome = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(fail(
            TisStatus::TisErrorInternal,
            format!("internal error: {what}"),
        ))
    });
    match outcome {
        Ok(()) => TisStatus::TisOk,
        Err(Failure(status, message)) => {
            let message = CString::new(message.replace('\0', " ")).expect("no interior NUL");
            LAST_ERROR.with(|e| *e.borrow_mut() = Some(message));
            status
        }
    }
}

fn not_null<T>(p: *const T, what: &str) -> Result<(), Failure> {
    if p.is_null() {
        return Err(fail(
            TisStatus::TisErrorNullArgument,
            format!("{what} is NULL"),
        ));
    }
    Ok(())
}

/// Checks that `p` is a live handle of `kind`.
fn check_handle<T>(p: *const T, kind: Kind, what: &str) -> Result<(), Failure> {
    not_null(p, what)?;
    let live = live().lock().unwrap_or_else(|e| e.into_inner());
    match live.get(&(p as usize)) {
        Some(k) if *k == kind => Ok(()),
        _ => Err(fail(
            TisStatus::TisErrorInvalidHandle,
            format!("{what} is not a live handle (freed, foreign, or of another kind)"),
        )),
    }
}

fn register<T>(handle: Box<T>, kind: Kind) -> *mut T {
    let p = Box::into_raw(handle);
    live()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(p as usize, kind);
    p
}

/// Removes `p` from the live handles; fails when it is not one of `kind`.
fn unregister<T>(p: *mut T, kind: Kind, what: &str) -> Result<Box<T>, Failure> {
    check_handle(p, kind, what)?;
    live()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&(p as usize));
    // SAFETY: `p` came from Box::into_raw in `register` and was live until just now.
    Ok(unsafe { Box::from_raw(p) })
}

fn c_path<'a>(path: *const c_char) -> Result<&'a Path, Failure> {
    not_null(path, "path")?;
    // SAFETY: the caller passes a NUL-terminated string (the header says so).
    let s = unsafe { CStr::from_ptr(path) }
        .to_str()
        .map_err(|_| fail(TisStatus::TisErrorInvalidArgument, "path is not UTF-8"))?;
    Ok(Path::new(s))
}

fn to_box(region: Option<Region>) -> TisBox {
    region.map_or(TisBox::default(), |r| TisBox {
        start: r.start.map(|v| v as i64),
        size: r.size.map(|v| v as i64),
    })
}

/// The library's version, a static NUL-terminated string.
#[unsafe(no_mangle)]
pub extern "C" fn tis_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The message of the last failed call on this thread, or NULL if none failed. Valid until the
/// next failing call on this thread.
#[unsafe(no_mangle)]
pub extern "C" fn tis_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ref().map_or(std::ptr::null(), |m| m.as_ptr()))
}

fn load(path: Option<&Path>, device: TisDevice) -> Result<AnyModel, Failure> {
    Ok(match (device, path) {
        (TisDevice::TisDeviceCpu, Some(p)) => AnyModel::Cpu(Box::new(Model::load(p, CpuBackend)?)),
        (TisDevice::TisDeviceCpu, None) => {
            AnyModel::Cpu(Box::new(Model::default_model(CpuBackend)?))
        }
        (TisDevice::TisDeviceCuda, Some(p)) => {
            AnyModel::Cuda(Box::new(Model::load(p, CudaBackend::new(0)?)?))
        }
        (TisDevice::TisDeviceCuda, None) => {
            AnyModel::Cuda(Box::new(Model::default_model(CudaBackend::new(0)?)?))
        }
    })
}

fn new_model(path: Option<&Path>, device: i32, out: *mut *mut TisModel) -> Result<(), Failure> {
    not_null(out, "out")?;
    let device = match device {
        0 => TisDevice::TisDeviceCpu,
        1 => TisDevice::TisDeviceCuda,
        other => {
            return Err(fail(
                TisStatus::TisErrorInvalidArgument,
                format!("unknown device {other}"),
            ));
        }
    };
    let model = load(path, device)?;
    let info = match &model {
        AnyModel::Cpu(m) => &m.info,
        AnyModel::Cuda(m) => &m.info,
    };
    let class_names = info
        .dataset
        .class_names
        .iter()
        .map(|n| CString::new(n.replace('\0', " ")).expect("no interior NUL"))
        .collect();
    let handle = register(
        Box::new(TisModel {
            model: Arc::new(model),
            class_names,
        }),
        Kind::Model,
    );
    // SAFETY: `out` is non-null and points to writable storage for a pointer (header contract).
    unsafe { *out = handle };
    Ok(())
}

/// Loads the bundle at `path` (NUL-terminated) on `device` (a `TisDevice`) into `*out`.
///
/// # Safety
/// Pointer arguments must be NULL or valid as this comment describes (handles from libtis).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tis_model_load(
    path: *const c_char,
    device: i32,
    out: *mut *mut TisModel,
) -> TisStatus {
    guard(|| new_model(Some(c_path(path)?), device, out))
}

/// Loads the model embedded in the library on `device` into `*out`.
///
/// # Safety
/// Pointer arguments must be NULL or valid as this comment describes (handles from libtis).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tis_model_load_default(device: i32, out: *mut *mut TisModel) -> TisStatus {
    guard(|| new_model(None, device, out))
}

/// Frees a model. Sessions created from it stay usable. Freeing NULL is a no-op; freeing twice
/// or a foreign pointer returns TIS_ERROR_INVALID_HANDLE.
///
/// # Safety
/// Pointer arguments must be NULL or valid as this comment describes (handles from libtis).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tis_model_free(model: *mut TisModel) -> TisStatus {
    guard(|| {
        if model.is_null() {
            return Ok(());
        }
        drop(unregister(model, Kind::Model, "model")?);
        Ok(())
    })
}

/// The number of classes K (background included) into `*out`.
///
/// # Safety
/// Pointer arguments must be NULL or valid as this comment describes (handles from libtis).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tis_model_class_count(model: *const TisModel, out: *mut i32) -> TisStatus {
    guard(|| {
        check_handle(model, Kind::Model, "model")?;
        not_null(out, "out")?;
        // SAFETY: `model` is live; `out` is non-null.
        unsafe { *out = (*model).class_names.len() as i32 };
        Ok(())
    })
}

/// The name of class `index` into `*out` (NUL-terminated, owned by the model).
///
/// # Safety
/// Pointer arguments must be NULL or valid as this comment describes (handles from libtis).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tis_model_class_name(
    model: *const TisModel,
    index: i32,
    out: *mut *const c_char,
) -> TisStatus {
    guard(|| {
        check_handle(model, Kind::Model, "model")?;
        not_null(out, "out")?;
        // SAFETY: `model` is live.
        let names = unsafe { &(*model).class_names };
        let name = usize::try_from(index)
            .ok()
            .and_then(|i| names.get(i))
            .ok_or_else(|| {
                fail(
                    TisStatus::TisErrorInvalidArgument,
                    format!("class {index} is not in 0..{}", names.len()),
                )
            })?;
        // SAFETY: `out` is non-null.
        unsafe { *out = name.as_ptr() };
        Ok(())
    })
}

/// Reads `dims[0]·dims[1]·dims[2]` values of `dtype` from `voxels` as a 1 × Z × Y × X volume.
fn read_buffer(
    voxels: *const std::ffi::c_void,
    dtype: i32,
    dims: [usize; 3],
) -> Result<Tensor, Failure> {
    let n = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            fail(
                TisStatus::TisErrorInvalidArgument,
                format!("dims {dims:?} are not a 3D volume"),
            )
        })?;
    macro_rules! values {
        ($t:ty) => {{
            // SAFETY: the caller provides `n` values of this type at `voxels` (header contract);
            // read unaligned-safe element by element.
            let p = voxels as *const $t;
            (0..n)
                .map(|i| unsafe { p.add(i).read_unaligned() } as f32)
                .collect::<Vec<f32>>()
        }};
    }
    let data = match dtype {
        0 => values!(u8),
        1 => values!(i16),
        2 => values!(u16),
        3 => values!(i32),
        4 => values!(f32),
        5 => values!(f64),
        other => {
            return Err(fail(
                TisStatus::TisErrorInvalidArgument,
                format!("unknown dtype {other}"),
            ));
        }
    };
    Ok(Tensor::new(vec![1, dims[0], dims[1], dims[2]], data)?)
}

fn new_session(
    model: *const TisModel,
    volume: &Tensor,
    spacing: [f64; 3],
    out: *mut *mut TisSession,
) -> Result<(), Failure> {
    not_null(out, "out")?;
    // SAFETY: `model` was checked to be live by the caller of this function.
    let shared = unsafe { (*model).model.clone() };
    // SAFETY: the session borrows the model inside `shared`, which the TisSession keeps alive
    // and drops after the session (field order); the Arc's contents never move.
    let borrowed: &'static AnyModel = unsafe { &*Arc::as_ptr(&shared) };
    let options = SessionOptions::default();
    let session = match borrowed {
        AnyModel::Cpu(m) => AnySession::Cpu(ImageSession::new(
            m,
            volume,
            spacing,
            &options,
            &mut |_, _| {},
        )?),
        AnyModel::Cuda(m) => AnySession::Cuda(ImageSession::new(
            m,
            volume,
            spacing,
            &options,
            &mut |_, _| {},
        )?),
    };
    let handle = register(
        Box::new(TisSession {
            session,
            changed: None,
            latency_ms: 0.0,
            _model: shared,
        }),
        Kind::Session,
    );
    // SAFETY: `out` is non-null.
    unsafe { *out = handle };
    Ok(())
}

/// Creates a session on a caller's volume: `dims` = {Z, Y, X} (x fastest in memory, C order),
/// `spacing` = voxel size in mm per axis in the same order, `voxels` = Z·Y·X values of `dtype`
/// (a `TisDtype`). The volume is copied; the encoder runs before this returns.
///
/// # Safety
/// Pointer arguments must be NULL or valid as this comment describes (handles from libtis).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tis_session_create(
    model: *const TisModel,
    voxels: *const std::ffi::c_void,
    dtype: i32,
    dims: *const i64,
    spacing: *const f64,
    out: *mut *mut TisSession,
) -> TisStatus {
    guard(|| {
        check_handle(model, Kind::Model, "model")?;
        not_null(voxels, "voxels")?;
        not_null(dims, "dims")?;
        not_null(spacing, "spacing")?;
        // SAFETY: `dims` and `spacing` point to three values each (header contract).
        let (d, s) = unsafe {
            (
                std::slice::from_raw_parts(dims, 3),
                std::slice::from_raw_parts(spacing, 3),
            )
        };
        if d.iter().any(|&v| v <= 0) {
            return Err(fail(
                TisStatus::TisErrorInvalidArgument,
                format!("dims {d:?} must be positive"),
            ));
        }
        let dims = [d[0] as usize, d[1] as usize, d[2] as usize];
        let volume = read_buffer(voxels, dtype, dims)?;
        new_session(model, &volume, [s[0], s[1], s[2]], out)
    })
}

/// Creates a session on a NIfTI image (`path`, NUL-terminated), read as nnU-Net reads it.
///
/// # Safety
/// Pointer arguments must be NULL or valid as this comment describes (handles from libtis).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tis_session_create_from_nifti(
    model: *const TisModel,
    path: *const c_char,
    out: *mut *mut TisSession,
) -> TisStatus {
    guard(|| {
        check_handle(model, Kind::Model, "model")?;
        let image = read_image(c_path(path)?)?;
        new_session(model, &image.voxels, image.spacing, out)
    })
}

/// Frees a session. Freeing NULL is a no-op; freeing twice or a foreign pointer returns
/// TIS_ERROR_INVALID_HANDLE.
///
/// # Safety
/// Pointer arguments must be NULL or valid as this comment describes (handles from libtis).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tis_session_free(session: *mut TisSession) -> TisStatus {
    guard(|| {
        if session.is_null() {
            return Ok(());
        }
        drop(unregister(session, Kind::Session, "session")?);
        Ok(())
    })
}

/// Runs `op` on a live session, timing it.
fn with_session(
    session: *mut TisSession,
    op: impl FnOnce(&mut TisSession) -> Result<(), Failure>,
) -> TisStatus {
    guard(|| {
        check_handle(session, Kind::Session, "session")?;
        // SAFETY: live session handle; the header requires one thread per session at a time.
        let s = unsafe { &mut *session };
        let started = Instant::now();
        let result = op(s);
        s.latency_ms = started.elapsed().as_secs_f64() * 1e3;
        result
    })
}

/// Adds a click at voxel (z, y, x) of the image naming class `class` (0 = background, a
/// negative click) and refines.
///
/// # Safety
/// Pointer arguments must be NULL or valid as this comment describes (handles from libtis).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tis_session_click(
    session: *mut TisSession,
    z: i64,
    y: i64,
    x: i64,
    class: i32,
) -> TisStatus {
    with_session(session, |s| {
        if z < 0 || y < 0 || x < 0 || class < 0 {
            return Err(fail(
                TisStatus::TisErrorInvalidArgument,
                format!("click (z {z}, y {y}, x {x}, class {class}) has a negative value"),
            ));
        }
        let click = Click::new(z as usize, y as usize, x as usize, class as usize);
        s.changed = on_session!(&mut s.session, session => session.refine(&[click])?.changed);
        Ok(())
    })
}

/// Takes back the last click.
///
/// # Safety
/// Pointer arguments must be NULL or valid as this comment describes (handles from libtis).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tis_session_undo(session: *mut TisSession) -> TisStatus {
    with_session(session, |s| {
        s.changed = on_session!(&mut s.session, session => session.undo()?);
        Ok(())
    })
}

/// Drops every click: back to the automatic segmentation.
///
/// # Safety
/// Pointer arguments must be NULL or valid as this comment describes (handles from libtis).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tis_session_reset(session: *mut TisSession) -> TisStatus {
    with_session(session, |s| {
        s.changed = on_session!(&mut s.session, session => session.reset());
        Ok(())
    })
}

/// The image's dims {Z, Y, X} into `out` (three values).
///
/// # Safety
/// Pointer arguments must be NULL or valid as this comment describes (handles from libtis).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tis_session_dims(session: *const TisSession, out: *mut i64) -> TisStatus {
    guard(|| {
        check_handle(session, Kind::Session, "session")?;
        not_null(out, "out")?;
        // SAFETY: live session; `out` holds three values (header contract).
        let shape = on_session!(unsafe { &(*session).session }, s => s.image_shape());
        (0..3).for_each(|a| unsafe { *out.add(a) = shape[a] as i64 });
        Ok(())
    })
}

/// Copies the current label map (Z·Y·X values, C order) into `out`, which holds `len` values.
///
/// # Safety
/// Pointer arguments must be NULL or valid as this comment describes (handles from libtis).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tis_session_labels(
    session: *const TisSession,
    out: *mut u16,
    len: usize,
) -> TisStatus {
    guard(|| {
        check_handle(session, Kind::Session, "session")?;
        not_null(out, "out")?;
        // SAFETY: live session.
        let labels = on_session!(unsafe { &(*session).session }, s => s.labels());
        if len != labels.len() {
            return Err(fail(
                TisStatus::TisErrorInvalidArgument,
                format!(
                    "the label buffer holds {len} values, the image has {}",
                    labels.len()
                ),
            ));
        }
        // SAFETY: `out` holds `len` values (checked equal to the label count).
        unsafe { std::ptr::copy_nonoverlapping(labels.as_ptr(), out, len) };
        Ok(())
    })
}

/// The box of voxels the last click, undo or reset may have changed (empty when none).
///
/// # Safety
/// Pointer arguments must be NULL or valid as this comment describes (handles from libtis).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tis_session_changed_box(
    session: *const TisSession,
    out: *mut TisBox,
) -> TisStatus {
    guard(|| {
        check_handle(session, Kind::Session, "session")?;
        not_null(out, "out")?;
        // SAFETY: live session; `out` non-null.
        unsafe { *out = to_box((*session).changed) };
        Ok(())
    })
}

/// How long the last click, undo or reset took, in milliseconds.
///
/// # Safety
/// Pointer arguments must be NULL or valid as this comment describes (handles from libtis).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tis_session_last_latency_ms(
    session: *const TisSession,
    out: *mut f64,
) -> TisStatus {
    guard(|| {
        check_handle(session, Kind::Session, "session")?;
        not_null(out, "out")?;
        // SAFETY: live session; `out` non-null.
        unsafe { *out = (*session).latency_ms };
        Ok(())
    })
}
