//! `tis eval`: the paper's robot-user evaluation (§4.1) over a set of images with reference
//! labels: Dice per class after 0..N clicks, as a table, a CSV and a PNG plot.

use std::path::{Path, PathBuf};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tis::backend::Backend;
use tis::evaluation::{CaseCurve, evaluate_case, summarize, write_csv};
use tis::geometry::Label;
use tis::io::nifti::read_image;
use tis::io::png::plot_dice;
use tis::pipeline::robot::Robot;
use tis::{Error, SessionOptions};

use crate::Device;
use crate::segment::{ensure_grid, read_channels};

#[derive(Args)]
pub struct EvalArgs {
    /// An image file, or a folder of nnU-Net-style images (CASE_0000.nii.gz, CASE_0001…).
    images: PathBuf,
    /// The reference label map, or a folder of them (CASE.nii.gz).
    labels: PathBuf,
    /// Model bundle with a TIS head; the embedded default when left out.
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// Clicks per case.
    #[arg(long, default_value_t = 10)]
    clicks: usize,
    /// Seed of the simulated user's jitter.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest disturbance of a click, voxels (the paper: 10).
    #[arg(long, default_value_t = Robot::PAPER_JITTER)]
    jitter: usize,
    /// Write every case's Dice per click here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Plot mean Dice against clicks here (PNG).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print the summary as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Turn test-time mirroring off.
    #[arg(long)]
    no_mirror: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    device: Device,
}

/// (case, image channel files, label file) pairs.
fn cases(images: &Path, labels: &Path) -> tis::Result<Vec<(String, Vec<PathBuf>, PathBuf)>> {
    if !images.is_dir() {
        let name = images
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("case");
        let case = name
            .trim_end_matches(".gz")
            .trim_end_matches(".nii")
            .trim_end_matches("_0000")
            .to_string();
        return Ok(vec![(
            case,
            vec![images.to_path_buf()],
            labels.to_path_buf(),
        )]);
    }
    let entries = std::fs::read_dir(images).map_err(|e| Error::io(images, e))?;
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(images, e))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let Some((case, ending)) = name.split_once("_0000.") else {
            continue;
        };
        let channels: Vec<PathBuf> = (0..)
            .map(|c| images.join(format!("{case}_{c:04}.{ending}")))
            .take_while(|p| p.exists())
            .collect();
        let label = labels.join(format!("{case}.{ending}"));
        if !label.exists() {
            return Err(Error::Image {
                path: label,
                message: format!("no reference labels for case {case}"),
            });
        }
        out.push((case.to_string(), channels, label));
    }
    out.sort();
    if out.is_empty() {
        return Err(Error::Image {
            path: images.to_path_buf(),
            message: "no CASE_0000 images in this folder".into(),
        });
    }
    Ok(out)
}

fn run<B: Backend + Clone>(backend: B, args: &EvalArgs) -> tis::Result<()> {
    let model = crate::load_model_on(args.model.as_ref(), backend)?;
    if model.head.is_none() {
        return Err(Error::Session(format!(
            "model {} has no TIS head: it cannot refine",
            model.info.origin
        )));
    }
    let names = model.info.dataset.class_names.clone();
    let cases = cases(&args.images, &args.labels)?;
    let bar = ProgressBar::new(cases.len() as u64).with_style(
        ProgressStyle::with_template("evaluating {bar:30} {pos}/{len} cases {elapsed}")
            .expect("valid template"),
    );
    let options = SessionOptions {
        mirror: !args.no_mirror,
        ..Default::default()
    };
    let mut curves: Vec<CaseCurve> = Vec::new();
    for (i, (case, channels, label_path)) in cases.iter().enumerate() {
        let (volume, image) = read_channels(channels)?;
        let reference = read_image(label_path)?;
        ensure_grid(
            label_path,
            "label grid",
            reference.shape(),
            "the image's",
            image.shape(),
        )?;
        let reference: Vec<Label> = reference
            .voxels
            .data()
            .iter()
            .map(|&v| v.round().max(0.0) as Label)
            .collect();
        let mut robot = Robot::new(args.seed.wrapping_add(i as u64), args.jitter);
        curves.push(evaluate_case(
            &model,
            case,
            &volume,
            image.spacing,
            &reference,
            args.clicks,
            &mut robot,
            &options,
        )?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let summary = summarize(&curves);
    if let Some(path) = &args.csv {
        write_csv(path, &curves, &names)?;
    }
    if let Some(path) = &args.plot {
        let title = format!("Dice against clicks, {} case(s)", curves.len());
        plot_dice(path, &summary, &names, &title)?;
    }
    let latencies: Vec<f64> = curves
        .iter()
        .flat_map(|c| c.latency_ms.iter().copied())
        .collect();
    let median_latency = {
        let mut l = latencies.clone();
        l.sort_by(f64::total_cmp);
        l.get(l.len() / 2).copied()
    };
    if args.json {
        let rows: Vec<_> = summary
            .iter()
            .enumerate()
            .map(|(clicks, row)| {
                let per_class: serde_json::Map<String, serde_json::Value> = row
                    .iter()
                    .enumerate()
                    .skip(1)
                    .map(|(k, v)| {
                        (
                            names[k].clone(),
                            v.map_or(
                                serde_json::Value::Null,
                                |d| json!({"mean": d.mean, "std": d.std, "cases": d.cases}),
                            ),
                        )
                    })
                    .collect();
                json!({"clicks": clicks, "dice": per_class})
            })
            .collect();
        println!(
            "{}",
            json!({
                "cases": curves.len(),
                "summary": rows,
                "median_click_ms": median_latency,
                "backend": model.backend.name(),
            })
        );
        return Ok(());
    }
    print!("{:>6}", "clicks");
    names.iter().skip(1).for_each(|n| print!("  {n:>17}"));
    println!();
    for (clicks, row) in summary.iter().enumerate() {
        print!("{clicks:>6}");
        for cell in row.iter().skip(1) {
            match cell {
                Some(d) => print!("  {:>9.3} ± {:<5.3}", d.mean, d.std),
                None => print!("  {:>17}", "-"),
            }
        }
        println!();
    }
    match median_latency {
        Some(ms) => println!("{} case(s); median click {ms:.1} ms", curves.len()),
        None => println!("{} case(s); no click was needed", curves.len()),
    }
    Ok(())
}

pub fn run_command(args: &EvalArgs) -> tis::Result<()> {
    crate::on_device!(args.device, run, args)
}
