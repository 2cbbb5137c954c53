//! `tis bench`: per-click latency of the refinement head on the contract's TIS-B configuration
//! with random weights, as a whole and per stage, on the CPU or the GPU; with `--tile`, one
//! nnU-Net tile forward of a bundle's network instead (python/bench_tile.py runs PyTorch on the
//! same bundle beside it), per step. On the GPU, a few more clicks or forwards say where the
//! device time goes kernel by kernel (an event before and after each launch).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use half::f16;
use serde_json::json;
use tis::backend::cuda::CudaBackend;
use tis::backend::{Backend, KernelTime};
use tis::bench::{CLASSES, FEATURE_CHANNELS, HeadBench, peak_rss_mb};
use tis::model::TisConfig;
use tis::model::tis_head::Stage;
use tis::random::Rng;
use tis::{CpuBackend, Error};

use crate::{Device, load_model_on};

#[derive(Clone, Copy, ValueEnum)]
pub enum Precision {
    F16,
    F32,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    device: Device,
    /// Storage type on the GPU (the CPU computes in f32).
    #[arg(long, value_enum, default_value = "f16")]
    precision: Precision,
    /// ROI extent z y x [default: 96 128 128 on cuda, 32 64 64 on cpu].
    #[arg(long, num_args = 3, value_names = ["Z", "Y", "X"])]
    roi: Option<Vec<usize>>,
    /// Clicks per refinement.
    #[arg(long, default_value_t = 10)]
    clicks: usize,
    /// Timed clicks (the median is over these).
    #[arg(long, default_value_t = 50)]
    iters: usize,
    /// Untimed clicks first.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Time one nnU-Net tile forward instead of a click: the network of --model on a random
    /// patch of its plan's patch size (--iters and --warmup count forwards).
    #[arg(long)]
    tile: bool,
    /// The bundle whose network --tile times [default: the embedded default model].
    #[arg(long, short = 'm', requires = "tile")]
    model: Option<PathBuf>,
}

/// Most clicks or forwards run again for the profiles (per step, per kernel).
const PROFILED_RUNS: usize = 5;
/// Kernels the per-kernel profile prints (the JSON has them all).
const KERNEL_ROWS: usize = 12;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The device time per kernel of one run of `work`, from `runs` runs with every launch timed
/// (None where the backend has no kernels), printed (the longest first) and as JSON; and what
/// the timed runs' median (`median_ms`, without the events) spent outside the kernels: the gaps
/// between launches, copies and host work, which a CUDA graph could shorten at most.
fn kernel_profile<B: Backend>(
    backend: &B,
    runs: usize,
    what: &str,
    median_ms: f64,
    work: &mut dyn FnMut() -> tis::Result<()>,
) -> tis::Result<serde_json::Value> {
    let Some(times) = backend.kernel_times(&mut || (0..runs).try_for_each(|_| work()))? else {
        return Ok(serde_json::Value::Null);
    };
    let per_run = |t: &KernelTime| (t.launches as f64 / runs as f64, t.ms / runs as f64);
    let total: f64 = times.iter().map(|t| per_run(t).1).sum();
    println!(
        "per kernel   device time per {what} (events around each launch), means of {runs} (sum {total:.2} ms)"
    );
    for t in times.iter().take(KERNEL_ROWS) {
        let (launches, ms) = per_run(t);
        println!(
            "  {:<36} {launches:>6.1} launches {ms:>9.3} ms {:>5.1} %",
            t.name,
            100.0 * ms / total
        );
    }
    if let Some(rest) = times.get(KERNEL_ROWS..).filter(|rest| !rest.is_empty()) {
        let ms: f64 = rest.iter().map(|t| per_run(t).1).sum();
        println!("  ({} more kernels: {ms:.3} ms)", rest.len());
    }
    println!(
        "  outside the kernels: {:.3} ms of the median {median_ms:.3} ms ({:.1} %: gaps between launches, copies, host work)",
        median_ms - total,
        100.0 * (median_ms - total) / median_ms
    );
    Ok(json!({
        "device_ms": total,
        "outside_kernels_ms": median_ms - total,
        "by_kernel": times
            .iter()
            .map(|t| {
                let (launches, ms) = per_run(t);
                json!({"kernel": t.name, "launches": launches, "ms": ms})
            })
            .collect::<Vec<_>>(),
    }))
}

fn run<B: Backend>(
    backend: &B,
    device: &str,
    precision: &str,
    args: &BenchArgs,
    roi: [usize; 3],
) -> tis::Result<()> {
    let bench = HeadBench::new(backend, TisConfig::tis_b(), roi, args.clicks, 1)?;
    for _ in 0..args.warmup {
        bench.click()?;
    }
    let mut totals = Vec::with_capacity(args.iters);
    let mut stages: BTreeMap<Stage, Vec<f64>> = BTreeMap::new();
    for _ in 0..args.iters {
        let (total, per_stage) = bench.timed_click()?;
        totals.push(ms(total));
        for (stage, d) in per_stage {
            stages.entry(stage).or_default().push(ms(d));
        }
    }
    totals.sort_by(f64::total_cmp);
    stages.values_mut().for_each(|v| v.sort_by(f64::total_cmp));
    let median = percentile(&totals, 0.5);
    let gflop = 2.0 * bench.macs() as f64 / 1e9;
    println!(
        "TIS-B head on {device} ({precision}), ROI {}×{}×{} = {} tokens, {} clicks, C_f {FEATURE_CHANNELS}, K {CLASSES}",
        roi[0],
        roi[1],
        roi[2],
        bench.roi.voxels(),
        args.clicks
    );
    println!(
        "per click    median {median:.2} ms  p10 {:.2}  p90 {:.2}  ({} clicks; {gflop:.1} GFLOP → {:.0} GFLOP/s)",
        percentile(&totals, 0.1),
        percentile(&totals, 0.9),
        args.iters,
        gflop / median * 1e3
    );
    for (stage, times) in &stages {
        println!(
            "  {:<17} median {:.2} ms",
            stage.name(),
            percentile(times, 0.5)
        );
    }
    let kernels = kernel_profile(
        backend,
        args.iters.min(PROFILED_RUNS),
        "click",
        median,
        &mut || bench.click().map(drop),
    )?;
    write_report(
        args,
        device,
        precision,
        json!({
            "roi": roi,
            "clicks": args.clicks,
            "median_ms": median,
            "p10_ms": percentile(&totals, 0.1),
            "p90_ms": percentile(&totals, 0.9),
            "gflop_per_click": gflop,
            "stages_median_ms": stages.iter().map(|(s, t)| (s.name(), percentile(t, 0.5))).collect::<BTreeMap<_, _>>(),
            "kernels": kernels,
        }),
    )
}

/// Writes `fields` and what every report carries (engine, device, precision, iterations,
/// threads, peak RSS) as JSON to `--json`, if given.
fn write_report(
    args: &BenchArgs,
    device: &str,
    precision: &str,
    mut fields: serde_json::Value,
) -> tis::Result<()> {
    let Some(path) = &args.json else {
        return Ok(());
    };
    let common = json!({
        "engine": "tis",
        "device": device,
        "precision": precision,
        "iters": args.iters,
        "threads": rayon::current_num_threads(),
        "peak_rss_mb": peak_rss_mb(),
    });
    if let (Some(fields), serde_json::Value::Object(common)) = (fields.as_object_mut(), common) {
        fields.extend(common);
    }
    std::fs::write(
        path,
        serde_json::to_string_pretty(&fields).expect("JSON values"),
    )
    .map_err(|e| Error::io(path, e))
}

/// One tile forward of the model's network, timed `args.iters` times after `args.warmup`.
fn run_tile<B: Backend>(
    backend: B,
    device: &str,
    precision: &str,
    args: &BenchArgs,
) -> tis::Result<()> {
    let model = load_model_on(args.model.as_ref(), backend)?;
    let (patch, plan) = (
        model.info.configuration.patch_size,
        &model.info.configuration.network,
    );
    let tile = Rng::new(1).tensor(&[plan.in_channels, patch[0], patch[1], patch[2]], 1.0);
    let tile = model.backend.upload(&tile)?;
    let forward = || -> tis::Result<Duration> {
        let start = std::time::Instant::now();
        model.network.forward(&model.backend, &tile)?;
        model.backend.synchronize()?;
        Ok(start.elapsed())
    };
    for _ in 0..args.warmup {
        forward()?;
    }
    let mut seconds = (0..args.iters)
        .map(|_| forward().map(|d| d.as_secs_f64()))
        .collect::<tis::Result<Vec<_>>>()?;
    seconds.sort_by(f64::total_cmp);
    let median = percentile(&seconds, 0.5);
    let gflop = 2.0 * plan.macs(patch) as f64 / 1e9;

    // The profile: as many forwards again (at most PROFILED_RUNS), the backend synchronised
    // after each step, which the timed forwards above are not.
    let profiled = args.iters.min(PROFILED_RUNS);
    let steps = plan.step_macs(patch);
    let mut step_seconds = vec![Vec::new(); steps.len()];
    for _ in 0..profiled {
        model.backend.synchronize()?;
        let (mut done, mut last) = (0, std::time::Instant::now());
        model
            .network
            .forward_observed(&model.backend, &tile, &mut |_| {
                model.backend.synchronize()?;
                step_seconds[done].push(last.elapsed().as_secs_f64());
                (done, last) = (done + 1, std::time::Instant::now());
                Ok(())
            })?;
    }
    // (step, median ms, GFLOP)
    let step_medians: Vec<(String, f64, f64)> = steps
        .iter()
        .zip(&mut step_seconds)
        .map(|((step, macs), times)| {
            times.sort_by(f64::total_cmp);
            let gflop = 2.0 * *macs as f64 / 1e9;
            (step.to_string(), percentile(times, 0.5) * 1e3, gflop)
        })
        .collect();
    let peak = peak_rss_mb();
    println!(
        "nnU-Net tile forward on {device} ({precision}), {}, features {:?}, patch {}×{}×{}",
        model.info.origin, plan.features, patch[0], patch[1], patch[2]
    );
    println!(
        "per tile     median {median:.3} s  p10 {:.3}  p90 {:.3}  ({} forwards; {gflop:.1} GFLOP → {:.0} GFLOP/s; peak RSS {})",
        percentile(&seconds, 0.1),
        percentile(&seconds, 0.9),
        args.iters,
        gflop / median,
        peak.map_or("unknown".into(), |mb| format!("{mb:.0} MB")),
    );
    let steps_total: f64 = step_medians.iter().map(|(_, ms, _)| ms).sum();
    println!(
        "per step     medians of {profiled} forwards synchronised after each step (sum {steps_total:.1} ms)"
    );
    for (step, ms, gflop) in &step_medians {
        println!(
            "  {step:<12} {ms:>9.2} ms {:>5.1} %  {gflop:>7.1} GFLOP  {:>7.0} GFLOP/s",
            100.0 * ms / steps_total,
            gflop / ms * 1e3,
        );
    }
    let kernels = kernel_profile(&model.backend, profiled, "tile", median * 1e3, &mut || {
        model.network.forward(&model.backend, &tile).map(drop)
    })?;
    write_report(
        args,
        device,
        precision,
        json!({
            "model": model.info.origin,
            "patch": patch,
            "features": plan.features,
            "median_s": median,
            "p10_s": percentile(&seconds, 0.1),
            "p90_s": percentile(&seconds, 0.9),
            "gflop_per_tile": gflop,
            "steps": step_medians.iter().map(|(step, ms, gflop)| json!({"step": step, "median_ms": ms, "gflop": gflop})).collect::<Vec<_>>(),
            "kernels": kernels,
        }),
    )
}

pub fn run_command(args: &BenchArgs) -> tis::Result<()> {
    let roi = match (&args.roi, args.device) {
        (Some(r), _) => [r[0], r[1], r[2]],
        (None, Device::Cuda) => [96, 128, 128],
        (None, Device::Cpu) => [32, 64, 64],
    };
    if roi.contains(&0) {
        return Err(Error::Shape(format!("--roi {roi:?} must be positive")));
    }
    match (args.device, args.precision) {
        (Device::Cpu, _) => {
            let threads = format!("cpu, {} threads", rayon::current_num_threads());
            bench_on(CpuBackend, &threads, "f32", args, roi)
        }
        (Device::Cuda, Precision::F16) => {
            let backend = CudaBackend::<f16>::new(0)?;
            let device = backend.device().to_string();
            bench_on(backend, &device, "f16", args, roi)
        }
        (Device::Cuda, Precision::F32) => {
            let backend = CudaBackend::<f32>::new(0)?;
            let device = backend.device().to_string();
            bench_on(backend, &device, "f32", args, roi)
        }
    }
}

/// The benchmark `args` ask for (a click, or a tile with --tile) on `backend`.
fn bench_on<B: Backend>(
    backend: B,
    device: &str,
    precision: &str,
    args: &BenchArgs,
    roi: [usize; 3],
) -> tis::Result<()> {
    if args.iters == 0 {
        return Err(Error::Session("--iters must be at least 1".into()));
    }
    if args.tile {
        run_tile(backend, device, precision, args)
    } else {
        run(&backend, device, precision, args, roi)
    }
}
