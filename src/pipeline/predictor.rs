//! nnU-Net's predictor from an image to its segmentation (nnunet-inference.md §3): preprocess,
//! the sliding window of every model of an ensemble (logits averaged), and the export: logits
//! resampled back to the cropped shape (the plans' `resampling_fn_probabilities`), argmax, crop
//! and transpose reverted.
//!
//! nnU-Net keeps logits in f16 on the way out (its sliding-window buffers and the resampled
//! array are f16); the export rounds to f16 before and after resampling the same way, so that
//! near-ties break as nnU-Net's do. The engine's own sums stay f32.

use std::time::Instant;

use rayon::prelude::*;

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, BackendTensor};
use crate::error::{Error, Result};
use crate::geometry::Label;
use crate::model::{Model, ModelInfo};
use crate::pipeline::preprocess::{Preprocessed, preprocess};
use crate::pipeline::resample::Resampling;
use crate::pipeline::session::{SessionOptions, encode};
use crate::pipeline::sliding_window::Outputs;
use crate::tensor::Tensor;

/// An image's automatic segmentation and what led to it.
pub struct Prediction {
    pub pre: Preprocessed,
    /// The segmentation in the image's geometry (file C order, z y x).
    pub labels: Vec<Label>,
    /// Wall time of each phase, in seconds.
    pub seconds: PhaseSeconds,
}

/// Where a prediction's time went: the phases nnU-Net's predictor has too.
#[derive(Clone, Copy, Debug, Default)]
pub struct PhaseSeconds {
    pub preprocessing: f64,
    /// Every model's sliding window (encoder tiles, aggregation) and the ensemble average.
    pub sliding_window: f64,
    pub export: f64,
}

/// Every model of an ensemble must share plans, configuration and classes (folds of one
/// training); the first one's preprocessing serves all.
fn check_ensemble<B: Backend>(models: &[&Model<B>]) -> Result<()> {
    let first = &models
        .first()
        .ok_or_else(|| Error::Session("no model given".into()))?
        .info;
    for other in &models[1..] {
        let o = &other.info;
        if o.plans != first.plans
            || o.configuration.name != first.configuration.name
            || o.dataset != first.dataset
        {
            return Err(Error::Session(format!(
                "models {} and {} are not folds of one training (plans, configuration or classes differ)",
                first.origin, o.origin
            )));
        }
    }
    Ok(())
}

/// nnU-Net's `convert_predicted_logits_to_segmentation_with_correct_shape`, of logits (K × grid)
/// held by `backend`.
pub fn export_segmentation<B: Backend>(
    backend: &B,
    logits: &B::Tensor,
    pre: &Preprocessed,
    info: &ModelInfo,
) -> Result<Vec<Label>> {
    // The argmax rounds to f16 as it compares. On a grid of the cropped image's shape,
    // resampling back is the identity: the argmax is taken where the logits lie (from a GPU,
    // only the labels come down).
    let labels = if logits.shape()[1..] == pre.crop.size {
        backend.argmax_channels_f16(logits)?
    } else {
        let resampling =
            Resampling::from_plans(&info.configuration.raw, "resampling_fn_probabilities")?;
        let back = resampling.apply(
            &CpuBackend.round_to_f16(&backend.download(logits)?),
            pre.crop.size,
            pre.target_spacing,
            pre.spacing,
        )?;
        CpuBackend.argmax_channels_f16(&back)?
    };
    Ok(pre.cropped_labels_to_image(&labels))
}

/// The logits (K × grid) of a preprocessed volume averaged over an ensemble's models, on the
/// host in f32.
pub fn ensemble_logits<B: Backend>(
    models: &[&Model<B>],
    volume: &Tensor,
    options: &SessionOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    let mut sum: Option<Tensor> = None;
    for model in models {
        let encoded = encode(model, volume, options, Outputs::Logits, progress)?;
        let logits = model.backend.download(&encoded.logits)?;
        match &mut sum {
            None => sum = Some(logits),
            Some(acc) => acc
                .data_mut()
                .par_iter_mut()
                .zip(logits.data())
                .for_each(|(a, b)| *a += b),
        }
    }
    let mut sum = sum.ok_or_else(|| Error::Session("no model given".into()))?;
    let n = models.len() as f32;
    sum.data_mut().par_iter_mut().for_each(|v| *v /= n);
    Ok(sum)
}

/// The automatic segmentation of an image (C × Z × Y × X in file order, spacing per axis in
/// mm) by one model or an ensemble of folds.
pub fn predict<B: Backend>(
    models: &[&Model<B>],
    image: &Tensor,
    spacing: [f64; 3],
    options: &SessionOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Prediction> {
    check_ensemble(models)?;
    let info = &models[0].info;
    let mut seconds = PhaseSeconds::default();
    let mut clock = Instant::now();
    let mut lap = || {
        let elapsed = clock.elapsed().as_secs_f64();
        clock = Instant::now();
        elapsed
    };
    let pre = preprocess(image, spacing, info)?;
    seconds.preprocessing = lap();
    let labels = if let [model] = models {
        let encoded = encode(model, &pre.volume, options, Outputs::Logits, progress)?;
        model.backend.synchronize()?;
        seconds.sliding_window = lap();
        export_segmentation(&model.backend, &encoded.logits, &pre, info)?
    } else {
        let logits = ensemble_logits(models, &pre.volume, options, progress)?;
        seconds.sliding_window = lap();
        export_segmentation(&CpuBackend, &logits, &pre, info)?
    };
    seconds.export = lap();
    Ok(Prediction {
        pre,
        labels,
        seconds,
    })
}
