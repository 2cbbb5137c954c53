//! `tis segment`: nnU-Net's automatic segmentation of an image, by one model or an ensemble of
//! folds, written in the image's geometry.

use std::path::{Path, PathBuf};
use std::thread::ScopedJoinHandle;
use std::time::Instant;

use clap::Args;
use serde_json::json;
use tis::backend::Backend;
use tis::io::nifti::{Image, read_image, write_labels};
use tis::pipeline::predictor::predict;
use tis::{Error, Model, SessionOptions, Tensor};

use crate::Device;

#[derive(Args)]
pub struct SegmentArgs {
    /// The image, one NIfTI file per input channel (nnU-Net's _0000, _0001, … in that order).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Model bundle(s); several are an ensemble (folds of one training, logits averaged). The
    /// embedded default when left out.
    #[arg(short, long)]
    model: Vec<PathBuf>,
    /// Where to write the segmentation (.nii or .nii.gz).
    #[arg(short, long)]
    output: PathBuf,
    /// Turn test-time mirroring off.
    #[arg(long)]
    no_mirror: bool,
    /// Tile step as a fraction of the patch.
    #[arg(long, default_value_t = 0.5)]
    step: f64,
    #[arg(long, value_enum, default_value = "cpu")]
    device: Device,
    /// Print a JSON report (shapes, wall time per phase) instead of the summary line.
    #[arg(long)]
    json: bool,
}

/// Refuses a volume read from `path` unless its `grid` is `expected`; `what` names its grid and
/// `against` the one it must match, in the message.
pub fn ensure_grid(
    path: &Path,
    what: &str,
    grid: [usize; 3],
    against: &str,
    expected: [usize; 3],
) -> tis::Result<()> {
    if grid == expected {
        return Ok(());
    }
    Err(Error::Image {
        path: path.to_path_buf(),
        message: format!("{what} {grid:?} differs from {against} {expected:?}"),
    })
}

/// The channels of an image, stacked (C × Z × Y × X), checked to share one grid.
pub fn read_channels(paths: &[PathBuf]) -> tis::Result<(Tensor, Image)> {
    let first = read_image(&paths[0])?;
    let mut data = first.voxels.data().to_vec();
    for path in &paths[1..] {
        let channel = read_image(path)?;
        ensure_grid(
            path,
            "grid",
            channel.shape(),
            "the first channel's",
            first.shape(),
        )?;
        data.extend_from_slice(channel.voxels.data());
    }
    let s = first.shape();
    Ok((
        Tensor::new(vec![paths.len(), s[0], s[1], s[2]], data)?,
        first,
    ))
}

/// The image's channels and the seconds it took to read them.
type Reading = tis::Result<((Tensor, Image), f64)>;

fn run<B: Backend + Clone>(
    backend: B,
    (args, reading): (&SegmentArgs, ScopedJoinHandle<Reading>),
) -> tis::Result<()> {
    let models = if args.model.is_empty() {
        vec![Model::default_model(backend)?]
    } else {
        args.model
            .iter()
            .map(|p| Model::load(p, backend.clone()))
            .collect::<tis::Result<Vec<_>>>()?
    };
    let ((volume, image), reading) = reading
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
    let (bar, mut progress) = crate::tile_progress("segmenting");
    let options = SessionOptions {
        step: args.step,
        mirror: !args.no_mirror,
    };
    let refs: Vec<&Model<B>> = models.iter().collect();
    let prediction = predict(&refs, &volume, image.spacing, &options, &mut progress)?;
    bar.finish_and_clear();
    let started = Instant::now();
    write_labels(
        &args.output,
        &prediction.labels,
        image.shape(),
        &image.header,
    )?;
    let writing = started.elapsed().as_secs_f64();
    // The phases as nnU-Net's predictor has them (python/bench_predictor.py times those): its
    // preprocessing reads the image and its export writes the segmentation.
    let seconds = prediction.seconds;
    let preprocessing = reading + seconds.preprocessing;
    let export = seconds.export + writing;
    let total = preprocessing + seconds.sliding_window + export;
    if args.json {
        let report = json!({
            "image": args.images[0],
            "image_shape": image.shape(),
            "grid": prediction.pre.grid(),
            "models": models.len(),
            "output": args.output,
            "seconds": {
                "preprocessing": preprocessing,
                "sliding window": seconds.sliding_window,
                "export": export,
                "total": total,
                "reading the image": reading,
                "writing the segmentation": writing,
            },
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("JSON values")
        );
    } else {
        println!(
            "segmented {} ({:?} voxels, grid {:?}, {} model(s)) in {total:.2} s (reading and preprocessing {preprocessing:.2} s, sliding window {:.2} s, export and writing {export:.2} s) → {}",
            args.images[0].display(),
            image.shape(),
            prediction.pre.grid(),
            models.len(),
            seconds.sliding_window,
            args.output.display()
        );
    }
    Ok(())
}

pub fn run_command(args: &SegmentArgs) -> tis::Result<()> {
    // The image is read while the device starts and the models load.
    std::thread::scope(|scope| {
        let reading = scope.spawn(|| {
            let started = Instant::now();
            read_channels(&args.images).map(|read| (read, started.elapsed().as_secs_f64()))
        });
        crate::on_device!(args.device, run, (args, reading))
    })
}
