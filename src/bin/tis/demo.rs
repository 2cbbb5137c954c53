//! `tis demo`: the interactive loop end to end. The embedded default model reads a held-out
//! sample of its synthetic CT phantoms (data/synthetic), segments it, and the paper's robot user
//! clicks where the segmentation is most wrong against the reference labels; Dice and latency
//! are printed per click, the automatic and refined segmentations written as NIfTI and an axial
//! slice as a PNG overlay. Any CT with reference labels can stand in (`--image`, `--reference`,
//! `--reference-map`).

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use tis::geometry::Label;
use tis::io::nifti::{read_image, write_labels};
use tis::io::png::write_overlay;
use tis::pipeline::image_session::ImageSession;
use tis::pipeline::robot::{Robot, dice};
use tis::{Error, SessionOptions};

use crate::segment::ensure_grid;

/// The abdominal soft-tissue window (HU) of the overlays.
const CT_WINDOW: (f32, f32) = (-160.0, 240.0);
const SAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/data/synthetic/imagesTs/synth_000_0000.nii.gz"
);
const SAMPLE_LABELS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/data/synthetic/labelsTs/synth_000.nii.gz"
);

#[derive(Args)]
pub struct DemoArgs {
    /// Model bundle; the embedded default when left out.
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// CT volume (NIfTI).
    #[arg(long, default_value = SAMPLE)]
    image: PathBuf,
    /// Reference label map on the same grid, for the simulated user and Dice.
    #[arg(long, default_value = SAMPLE_LABELS)]
    reference: PathBuf,
    /// Reference label → model class; unlisted labels are background. The synthetic sample's
    /// labels are the default model's classes; for data/abdomen-ct (TotalSegmentator labels)
    /// "5:1,1:2" maps liver and spleen.
    #[arg(long, default_value = "1:1,2:2,3:3")]
    reference_map: String,
    /// Number of simulated clicks.
    #[arg(long, default_value_t = 10)]
    clicks: usize,
    /// Folder for the outputs.
    #[arg(short, long, default_value = "out/demo")]
    output: PathBuf,
    /// Turn test-time mirroring off.
    #[arg(long)]
    no_mirror: bool,
    /// Seed of the simulated user's jitter.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn parse_map(text: &str, classes: usize) -> tis::Result<Vec<(u32, Label)>> {
    text.split(',')
        .map(|pair| {
            let parsed = pair.split_once(':').and_then(|(a, b)| {
                Some((
                    a.trim().parse::<u32>().ok()?,
                    b.trim().parse::<Label>().ok()?,
                ))
            });
            match parsed {
                Some((from, to)) if (to as usize) < classes => Ok((from, to)),
                _ => Err(Error::Session(format!(
                    "--reference-map entry `{pair}` is not `label:class` with class < {classes}"
                ))),
            }
        })
        .collect()
}

pub fn run(args: &DemoArgs) -> tis::Result<()> {
    let model = crate::load_model(args.model.as_ref())?;
    let info = &model.info;
    let names = &info.dataset.class_names;
    println!(
        "model      {} — {}",
        info.origin,
        info.metadata.get("source").map_or("", String::as_str)
    );

    let image = read_image(&args.image)?;
    let reference_image = read_image(&args.reference)?;
    ensure_grid(
        &args.reference,
        "grid",
        reference_image.shape(),
        "the image's",
        image.shape(),
    )?;
    let map = parse_map(&args.reference_map, names.len())?;
    let reference: Vec<Label> = reference_image
        .voxels
        .data()
        .iter()
        .map(|&v| {
            map.iter()
                .find(|(from, _)| *from as f32 == v)
                .map_or(0, |(_, to)| *to)
        })
        .collect();

    let (bar, mut progress) = crate::tile_progress("encoder");
    let started = Instant::now();
    let options = SessionOptions {
        mirror: !args.no_mirror,
        ..Default::default()
    };
    let mut session = ImageSession::new(
        &model,
        &image.voxels,
        image.spacing,
        &options,
        &mut progress,
    )?;
    bar.finish_and_clear();
    println!(
        "image      {} — {:?} voxels at {:?} mm; model grid {:?}",
        args.image.display(),
        image.shape(),
        image.spacing,
        session.preprocessed().grid()
    );
    println!(
        "encoder    {:.2} s over the whole grid",
        started.elapsed().as_secs_f64()
    );

    let dice_row = |labels: &[Label]| -> String {
        (1..names.len())
            .map(|c| match dice(labels, &reference, c as Label) {
                Some(d) => format!("{} {:.3}", names[c], d),
                None => format!("{} -", names[c]),
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("auto       Dice  {}", dice_row(session.auto_labels()));
    std::fs::create_dir_all(&args.output).map_err(|e| tis::Error::io(&args.output, e))?;
    let auto_path = args.output.join("auto.nii.gz");
    write_labels(
        &auto_path,
        session.auto_labels(),
        image.shape(),
        &image.header,
    )?;

    let mut labels = session.auto_labels().to_vec();
    let mut robot = Robot::new(args.seed, Robot::PAPER_JITTER);
    let mut first_click = None;
    for i in 1..=args.clicks {
        let Some(click) = robot.next_click(&labels, &reference, image.shape()) else {
            println!("click {i:<3}  segmentation matches the reference: done");
            break;
        };
        first_click.get_or_insert(click);
        let started = Instant::now();
        let refinement = session.refine(&[click])?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        labels = session.labels();
        println!(
            "click {i:<3}  {:<10} at (z {}, y {}, x {})  roi {:?}  {ms:7.1} ms  Dice  {}",
            names[click.class],
            click.z,
            click.y,
            click.x,
            refinement.roi.size,
            dice_row(&labels)
        );
    }
    let refined_path = args.output.join("refined.nii.gz");
    write_labels(&refined_path, &labels, image.shape(), &image.header)?;
    // Axial slices through the first click (or the middle): automatic | refined | reference.
    let z = first_click.map_or(image.shape()[0] / 2, |c| c.z);
    let overlay_path = args.output.join("overlay.png");
    write_overlay(
        &overlay_path,
        &image.voxels,
        &[session.auto_labels(), &labels, &reference],
        z,
        CT_WINDOW,
    )?;
    println!(
        "overlay    {} (slice z {z}: automatic | refined | reference)",
        overlay_path.display()
    );
    println!(
        "wrote      {} and {}",
        auto_path.display(),
        refined_path.display()
    );
    Ok(())
}
