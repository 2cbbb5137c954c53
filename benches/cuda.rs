//! GPU benchmark of one refinement click of the TIS-B head (ROI 96×128×128, 10 clicks, K = 3,
//! random weights), f16 storage. Without a GPU it says so and measures nothing.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use half::f16;
use tis::backend::cuda::CudaBackend;
use tis::bench::HeadBench;
use tis::model::TisConfig;

fn click_latency(c: &mut Criterion) {
    let backend = match CudaBackend::<f16>::new(0) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("skipping the CUDA benchmark: {e}");
            return;
        }
    };
    let bench = HeadBench::new(&backend, TisConfig::tis_b(), [96, 128, 128], 10, 1).unwrap();
    let mut group = c.benchmark_group(format!("click TIS-B on {}", backend.device()));
    group.sample_size(50);
    group.bench_function("roi 96x128x128, 10 clicks, f16", |b| {
        b.iter(|| black_box(bench.click().unwrap()))
    });
    group.finish();
}

criterion_group!(benches, click_latency);
criterion_main!(benches);
