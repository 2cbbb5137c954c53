//! An interactive session: the encoder runs once over the whole grid; each refinement runs only
//! the TIS head on the ROI of the clicks so far, against the automatic segmentation.
//!
//! The label map shown is the automatic segmentation with the latest refinement's ROI pasted in
//! (each refinement uses every click so far and never feeds back a previous refined mask).
//! History is kept as steps (the clicks each added, the ROI and its labels), so undo and reset
//! repaint only the regions that change.

use crate::backend::{Backend, BackendTensor};
use crate::error::{Error, Result, bytes_in_words};
use crate::geometry::{Click, Label, Region};
use crate::model::Model;
use crate::model::tis_head::TisHead;
use crate::pipeline::roi::roi_for_clicks;
use crate::pipeline::sliding_window::{DEFAULT_STEP, Encoded, Outputs, predict_sliding_window};
use crate::tensor::Tensor;

/// How a session runs the encoder.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Tile step as a fraction of the patch (nnU-Net: 0.5).
    pub step: f64,
    /// Test-time mirroring over the bundle's mirror axes (nnU-Net: on).
    pub mirror: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            step: DEFAULT_STEP,
            mirror: true,
        }
    }
}

/// An estimate of the bytes the backend holds while encoding a grid and keeping its session:
/// the padded input, the logit, feature and weight sums (f32 on every backend) and their
/// quotients, the probabilities and features the session keeps, and one tile's activations
/// (every stage's output at the widest point of the U, counted twice for the skip and the next
/// stage, plus a mirrored copy). Without features (`Outputs::Logits`), their share is left out.
pub fn encoding_memory<B: Backend>(model: &Model<B>, grid: [usize; 3], outputs: Outputs) -> u64 {
    let net = &model.info.configuration.network;
    let patch = model.info.configuration.patch_size;
    let padded: u64 = (0..3).map(|a| grid[a].max(patch[a]) as u64).product();
    let c_f = match outputs {
        Outputs::Logits => 0,
        Outputs::LogitsAndFeatures => net.feature_channels() as u64,
    };
    let (k, c_in) = (net.classes as u64, net.in_channels as u64);
    let stored =
        padded * (c_in + k + c_f) + grid.iter().map(|&g| g as u64).product::<u64>() * (k + c_f);
    let sums = padded * (k + c_f + 1);
    let mut tile = 0u64;
    let mut voxels: u64 = patch.iter().map(|&p| p as u64).product();
    for (s, &features) in net.features.iter().enumerate() {
        voxels /= net.strides[s].iter().map(|&v| v as u64).product::<u64>();
        tile += 4 * features as u64 * voxels;
    }
    model.backend.bytes_per_value() * (stored + 2 * tile) + 4 * sums
}

/// The model's logits and, for `Outputs::LogitsAndFeatures`, penultimate features over a whole
/// preprocessed volume (C × grid): nnU-Net's sliding window, with mirroring over the bundle's
/// axes when the options ask for it. Refused, with the numbers, when the backend reports less
/// free memory than it would need.
pub fn encode<B: Backend>(
    model: &Model<B>,
    volume: &Tensor,
    options: &SessionOptions,
    outputs: Outputs,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Encoded<B::Tensor>> {
    if let [_, z, y, x] = *volume.shape() {
        let needed = encoding_memory(model, [z, y, x], outputs);
        if let Some(available) = model.backend.available_memory().filter(|&a| a < needed) {
            return Err(Error::Backend {
                backend: model.backend.name(),
                message: format!(
                    "a {z} × {y} × {x} grid needs about {} to encode, {} are free",
                    bytes_in_words(needed),
                    bytes_in_words(available)
                ),
            });
        }
    }
    let mirror_axes: &[usize] = if options.mirror {
        &model.info.mirror_axes
    } else {
        &[]
    };
    predict_sliding_window(
        &model.backend,
        &model.network,
        model.info.configuration.patch_size,
        volume,
        mirror_axes,
        options.step,
        outputs,
        progress,
    )
}

/// The head's answer for a set of clicks.
pub struct HeadOutput<T> {
    pub roi: Region,
    /// Clicks inside the ROI, which the head saw.
    pub clicks_used: usize,
    /// Refined logits of the ROI, N × K, tokens in C order.
    pub logits: T,
}

/// Runs the refinement head for `clicks` (newest last) on whole-grid features (C_f × grid) and
/// automatic probabilities (K × grid): checks the clicks, applies the ROI rule, keeps the clicks
/// inside the ROI and runs the head.
pub fn refine_region<B: Backend>(
    backend: &B,
    head: &TisHead<B>,
    features: &B::Tensor,
    probs: &B::Tensor,
    clicks: &[Click],
) -> Result<HeadOutput<B::Tensor>> {
    let grid = match *probs.shape() {
        [_, z, y, x] => [z, y, x],
        ref other => {
            return Err(Error::Shape(format!(
                "probabilities of shape {other:?} are not a volume"
            )));
        }
    };
    for click in clicks {
        click.check(grid, head.classes())?;
    }
    if clicks.is_empty() {
        return Err(Error::Click("refinement needs at least one click".into()));
    }
    let roi = roi_for_clicks(clicks, grid, head.config());
    let inside: Vec<Click> = clicks
        .iter()
        .copied()
        .filter(|c| roi.contains(c.position()))
        .collect();
    let logits = head.forward(backend, features, probs, &roi, &inside)?;
    Ok(HeadOutput {
        roi,
        clicks_used: inside.len(),
        logits,
    })
}

/// One refinement in the history.
struct Step {
    clicks_added: usize,
    roi: Region,
    roi_labels: Vec<Label>,
}

/// What a refinement did.
#[derive(Debug)]
pub struct Refinement<'s> {
    /// The whole label map after the refinement (Z × Y × X, C order).
    pub labels: &'s [Label],
    /// The smallest box holding every voxel whose label changed, if any did.
    pub changed: Option<Region>,
    pub roi: Region,
    pub clicks_used: usize,
    /// Clicks so far that fell outside the ROI and were left out of this pass.
    pub clicks_outside_roi: usize,
}

pub struct Session<'m, B: Backend> {
    model: &'m Model<B>,
    grid: [usize; 3],
    features: B::Tensor,
    probs: B::Tensor,
    auto_labels: Vec<Label>,
    labels: Vec<Label>,
    clicks: Vec<Click>,
    steps: Vec<Step>,
}

impl<'m, B: Backend> Session<'m, B> {
    /// Runs the encoder over a preprocessed volume (C × Z × Y × X, on the model's grid).
    pub fn new(
        model: &'m Model<B>,
        volume: &Tensor,
        options: &SessionOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let encoded = encode(model, volume, options, Outputs::LogitsAndFeatures, progress)?;
        Self::from_encoded(model, encoded)
    }

    /// A session over what the encoder gave for a volume (`encode` with the features).
    pub fn from_encoded(model: &'m Model<B>, encoded: Encoded<B::Tensor>) -> Result<Self> {
        let features = encoded.features.ok_or_else(|| {
            Error::Session("a session needs the encoder's features, and none were kept".into())
        })?;
        let backend = &model.backend;
        let grid = match *encoded.logits.shape() {
            [_, z, y, x] => [z, y, x],
            ref other => {
                return Err(Error::Shape(format!(
                    "logits of shape {other:?} are not a volume"
                )));
            }
        };
        let auto_labels = backend.argmax_channels(&encoded.logits)?;
        let probs = backend.softmax_channels(&encoded.logits)?;
        Ok(Session {
            model,
            grid,
            features,
            probs,
            labels: auto_labels.clone(),
            auto_labels,
            clicks: Vec::new(),
            steps: Vec::new(),
        })
    }

    /// K, the number of classes.
    pub fn classes(&self) -> usize {
        self.model.info.classes()
    }

    /// The model's class names, by label value.
    pub fn class_names(&self) -> &[String] {
        &self.model.info.dataset.class_names
    }

    /// The ROI of the refinement shown now, if any.
    pub fn current_roi(&self) -> Option<Region> {
        self.steps.last().map(|s| s.roi)
    }

    pub fn grid(&self) -> [usize; 3] {
        self.grid
    }

    /// The label map shown now (Z × Y × X, C order).
    pub fn labels(&self) -> &[Label] {
        &self.labels
    }

    /// The automatic segmentation (what zero clicks give).
    pub fn auto_labels(&self) -> &[Label] {
        &self.auto_labels
    }

    /// Every click so far, oldest first.
    pub fn clicks(&self) -> &[Click] {
        &self.clicks
    }

    /// The aggregated penultimate features (C_f × grid) on the backend.
    pub fn features(&self) -> &B::Tensor {
        &self.features
    }

    /// The automatic class probabilities (K × grid) on the backend.
    pub fn probabilities(&self) -> &B::Tensor {
        &self.probs
    }

    /// Adds `clicks` (one undo step) and refines with every click so far. Clicks are checked
    /// before anything changes; on error the session is as it was.
    pub fn refine(&mut self, clicks: &[Click]) -> Result<Refinement<'_>> {
        if clicks.is_empty() {
            return Err(Error::Click("refine was given no clicks".into()));
        }
        let mut all = self.clicks.clone();
        all.extend_from_slice(clicks);
        let model = self.model;
        let head = model.head.as_ref().ok_or_else(|| {
            Error::Session(format!(
                "model {} has no TIS head (network-only bundle): it cannot refine",
                model.info.origin
            ))
        })?;
        let out = refine_region(&model.backend, head, &self.features, &self.probs, &all)?;
        let step = Step {
            clicks_added: clicks.len(),
            roi: out.roi,
            roi_labels: self.model.backend.argmax_rows(&out.logits)?,
        };
        let previous = self.steps.last().map(|s| s.roi);
        let changed = self.repaint(previous, Some(&step));
        self.clicks = all;
        self.steps.push(step);
        Ok(Refinement {
            labels: &self.labels,
            changed,
            roi: out.roi,
            clicks_used: out.clicks_used,
            clicks_outside_roi: self.clicks.len() - out.clicks_used,
        })
    }

    /// Takes back the last refinement; returns the box that changed.
    pub fn undo(&mut self) -> Result<Option<Region>> {
        let undone = self
            .steps
            .pop()
            .ok_or_else(|| Error::Session("nothing to undo".into()))?;
        self.clicks
            .truncate(self.clicks.len() - undone.clicks_added);
        let steps = std::mem::take(&mut self.steps);
        let changed = self.repaint(Some(undone.roi), steps.last());
        self.steps = steps;
        Ok(changed)
    }

    /// Drops every click: back to the automatic segmentation. Returns the box that changed.
    pub fn reset(&mut self) -> Option<Region> {
        let last = self.steps.last().map(|s| s.roi);
        self.steps.clear();
        self.clicks.clear();
        self.repaint(last, None)
    }

    /// Replaces the shown refinement (whose ROI was `shown`) by `next` (None: the automatic
    /// segmentation) and returns the box of the voxels that changed.
    fn repaint(&mut self, shown: Option<Region>, next: Option<&Step>) -> Option<Region> {
        let area = match (shown, next.map(|s| s.roi)) {
            (Some(a), Some(b)) => a.union(&b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return None,
        };
        let [_, gy, gx] = self.grid;
        let mut lo = [usize::MAX; 3];
        let mut hi = [0usize; 3];
        for z in area.start[0]..area.stop()[0] {
            for y in area.start[1]..area.stop()[1] {
                for x in area.start[2]..area.stop()[2] {
                    let v = (z * gy + y) * gx + x;
                    let label = match next {
                        Some(step) if step.roi.contains([z, y, x]) => {
                            let [rz, ry, rx] = [
                                z - step.roi.start[0],
                                y - step.roi.start[1],
                                x - step.roi.start[2],
                            ];
                            step.roi_labels[(rz * step.roi.size[1] + ry) * step.roi.size[2] + rx]
                        }
                        _ => self.auto_labels[v],
                    };
                    if self.labels[v] != label {
                        self.labels[v] = label;
                        for (a, p) in [z, y, x].into_iter().enumerate() {
                            lo[a] = lo[a].min(p);
                            hi[a] = hi[a].max(p);
                        }
                    }
                }
            }
        }
        (lo[0] != usize::MAX).then(|| Region {
            start: lo,
            size: [0, 1, 2].map(|a| hi[a] + 1 - lo[a]),
        })
    }
}
