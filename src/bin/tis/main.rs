//! The `tis` command line.

/// Calls the generic `$run(backend, $args)` with the backend `$device` names.
macro_rules! on_device {
    ($device:expr, $run:ident, $args:expr) => {
        match $device {
            $crate::Device::Cpu => $run(tis::CpuBackend, $args),
            $crate::Device::Cuda => {
                $run(tis::backend::cuda::CudaBackend::<half::f16>::new(0)?, $args)
            }
        }
    };
}
pub(crate) use on_device;

mod bench;
mod demo;
mod eval;
mod info;
mod interactive;
mod segment;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tis::{CpuBackend, Model};

/// mimalloc reuses freed memory where glibc's malloc would not: a tile forward allocates and
/// frees hundreds of MB of activations, which glibc hands back to the kernel and faults back in,
/// zeroed, each time (measured: a 56 MB channel concatenation takes 37 ms with glibc, 5 ms with
/// mimalloc). mimalloc too returns its largest blocks after a delay; buffer reuse in the engine
/// would go further.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tis",
    version,
    about = "Interactive 3D medical image segmentation: nnU-Net + TIS refinement"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a model bundle: classes, configuration, parameters, dtypes, origin.
    Info(info::InfoArgs),
    /// Segment an image automatically (nnU-Net's predictor), one model or an ensemble.
    Segment(segment::SegmentArgs),
    /// Refine an image's segmentation with clicks from a JSON file.
    Refine(interactive::RefineArgs),
    /// Serve a viewer: a JSON-lines session on stdin/stdout (docs/session-protocol.md).
    Session(interactive::SessionArgs),
    /// Evaluate refinement with the paper's simulated user: Dice per class after 0..N clicks.
    Eval(eval::EvalArgs),
    /// Run the whole interactive loop on a sample CT with the embedded default model.
    Demo(demo::DemoArgs),
    /// Measure per-click latency of the TIS-B head (random weights) on the CPU or the GPU.
    Bench(bench::BenchArgs),
}

/// Where a command runs.
#[derive(Clone, Copy, ValueEnum)]
pub enum Device {
    Cpu,
    /// The first CUDA GPU, f16 storage.
    Cuda,
}

/// A progress bar of sliding-window tiles, and the callback that drives it.
pub fn tile_progress(label: &str) -> (indicatif::ProgressBar, impl FnMut(usize, usize)) {
    let template = format!("{label:<10} {{bar:30}} {{pos}}/{{len}} tiles {{elapsed}}");
    let bar = indicatif::ProgressBar::new(0)
        .with_style(indicatif::ProgressStyle::with_template(&template).expect("valid template"));
    let driven = bar.clone();
    (bar, move |done, total| {
        driven.set_length(total as u64);
        driven.set_position(done as u64);
    })
}

/// The model at `path`, or the embedded default, on the CPU.
pub fn load_model(path: Option<&PathBuf>) -> tis::Result<Model<CpuBackend>> {
    load_model_on(path, CpuBackend)
}

/// The model at `path`, or the embedded default, on `backend`.
pub fn load_model_on<B: tis::backend::Backend>(
    path: Option<&PathBuf>,
    backend: B,
) -> tis::Result<Model<B>> {
    match path {
        Some(p) => Model::load(p, backend),
        None => Model::default_model(backend),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info(args) => info::run(&args),
        Command::Segment(args) => segment::run_command(&args),
        Command::Refine(args) => interactive::refine(&args),
        Command::Session(args) => interactive::session(&args),
        Command::Eval(args) => eval::run_command(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Bench(args) => bench::run_command(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
