//! The per-click benchmark of the refinement head, shared by `tis bench` and the criterion
//! benches: a head of a given configuration with seeded random weights, random features and
//! probabilities on a grid the size of the ROI, and a fixed set of clicks spread over it
//! (negative clicks included). One click = the head's forward pass and the labels of the ROI
//! brought back, as a session does.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::error::Result;
use crate::geometry::{Click, Label, Region};
use crate::model::TisConfig;
use crate::model::tis_head::{Stage, TisHead};
use crate::random::{Rng, random_tensors};

/// The process's peak resident memory (VmHWM of /proc/self/status, Linux), in MB.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Feature channels (nnU-Net's F[0]) and classes of the benchmark.
pub const FEATURE_CHANNELS: usize = 32;
pub const CLASSES: usize = 3;

pub struct HeadBench<'b, B: Backend> {
    backend: &'b B,
    pub config: TisConfig,
    head: TisHead<B>,
    features: B::Tensor,
    probs: B::Tensor,
    pub roi: Region,
    pub clicks: Vec<Click>,
}

impl<'b, B: Backend> HeadBench<'b, B> {
    pub fn new(
        backend: &'b B,
        config: TisConfig,
        roi: [usize; 3],
        clicks: usize,
        seed: u64,
    ) -> Result<Self> {
        let mut weights = random_tensors(&config.expected_tensors(FEATURE_CHANNELS, CLASSES), seed);
        let head =
            TisHead::from_tensors(backend, &config, FEATURE_CHANNELS, CLASSES, &mut |name| {
                Ok(weights
                    .remove(name)
                    .expect("random weights for every expected tensor"))
            })?;
        let mut normal = Rng::new(seed.wrapping_add(1));
        let features =
            backend.upload(&normal.tensor(&[FEATURE_CHANNELS, roi[0], roi[1], roi[2]], 1.0))?;
        let logits = backend.upload(&normal.tensor(&[CLASSES, roi[0], roi[1], roi[2]], 2.0))?;
        let probs = backend.softmax_channels(&logits)?;
        let clicks = (0..clicks)
            .map(|i| {
                let at = |a: usize, step: usize| (i * step + roi[a] / 3) % roi[a];
                Click::new(at(0, 7), at(1, 29), at(2, 37), i % CLASSES)
            })
            .collect();
        Ok(HeadBench {
            backend,
            config,
            head,
            features,
            probs,
            roi: Region::full(roi),
            clicks,
        })
    }

    /// One click: the forward pass and the ROI's labels on the host.
    pub fn click(&self) -> Result<Vec<Label>> {
        let logits = self.head.forward(
            self.backend,
            &self.features,
            &self.probs,
            &self.roi,
            &self.clicks,
        )?;
        self.backend.argmax_rows(&logits)
    }

    /// One click timed as a whole and per stage (the backend synchronised at each stage's end,
    /// which adds a little time of its own).
    pub fn timed_click(&self) -> Result<(Duration, BTreeMap<Stage, Duration>)> {
        self.backend.synchronize()?;
        let start = Instant::now();
        let mut last = start;
        let mut stages = BTreeMap::new();
        let logits = self.head.forward_observed(
            self.backend,
            &self.features,
            &self.probs,
            &self.roi,
            &self.clicks,
            &mut |stage| {
                self.backend.synchronize()?;
                let now = Instant::now();
                *stages.entry(stage).or_insert(Duration::ZERO) += now - last;
                last = now;
                Ok(())
            },
        )?;
        self.backend.argmax_rows(&logits)?;
        let now = Instant::now();
        *stages.entry(Stage::Output).or_insert(Duration::ZERO) += now - last;
        Ok((now - start, stages))
    }

    /// Multiply-accumulates of one click.
    pub fn macs(&self) -> u64 {
        self.config.macs_per_click(
            FEATURE_CHANNELS,
            CLASSES,
            self.roi.voxels(),
            self.clicks.len(),
        )
    }
}
