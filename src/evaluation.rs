//! The paper's evaluation (§4.1): a simulated user clicks an image's segmentation towards the
//! reference, one click at a time, and Dice per class is recorded after 0, 1, …, N clicks.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::geometry::Label;
use crate::model::Model;
use crate::pipeline::image_session::ImageSession;
use crate::pipeline::robot::{Robot, dice};
use crate::pipeline::session::SessionOptions;
use crate::tensor::Tensor;

/// One case's Dice curve.
#[derive(Clone, Debug)]
pub struct CaseCurve {
    pub case: String,
    /// `dice[clicks][class]`, None where the class is in neither segmentation nor reference.
    pub dice: Vec<Vec<Option<f64>>>,
    /// Refinement latency of each click, ms.
    pub latency_ms: Vec<f64>,
}

/// Runs the simulated user for `clicks` clicks on one image (C × Z × Y × X, file order) against
/// its reference labels (same grid).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_case<B: Backend>(
    model: &Model<B>,
    case: &str,
    image: &Tensor,
    spacing: [f64; 3],
    reference: &[Label],
    clicks: usize,
    robot: &mut Robot,
    options: &SessionOptions,
) -> Result<CaseCurve> {
    let shape = [image.shape()[1], image.shape()[2], image.shape()[3]];
    let classes = model.info.classes();
    if reference.len() != shape.iter().product::<usize>() {
        return Err(Error::Shape(format!(
            "{case}: reference labels do not cover the image's {shape:?} grid"
        )));
    }
    if let Some(&bad) = reference.iter().find(|&&l| l as usize >= classes) {
        return Err(Error::Shape(format!(
            "{case}: reference holds label {bad}, the model has classes 0..{}",
            classes - 1
        )));
    }
    let mut session = ImageSession::new(model, image, spacing, options, &mut |_, _| {})?;
    let row = |labels: &[Label]| {
        (0..classes)
            .map(|c| dice(labels, reference, c as Label))
            .collect::<Vec<_>>()
    };
    let mut labels = session.auto_labels().to_vec();
    let mut curve = CaseCurve {
        case: case.to_string(),
        dice: vec![row(&labels)],
        latency_ms: Vec::new(),
    };
    for _ in 0..clicks {
        let Some(click) = robot.next_click(&labels, reference, shape) else {
            // Perfect already: the remaining clicks change nothing.
            curve.dice.push(row(&labels));
            continue;
        };
        let started = Instant::now();
        // A click outside the region the model sees (the non-zero crop) cannot be refined;
        // the user's turn passes.
        if session.click_to_grid(&click).is_ok() {
            session.refine(&[click])?;
            labels = session.labels();
        }
        curve.latency_ms.push(started.elapsed().as_secs_f64() * 1e3);
        curve.dice.push(row(&labels));
    }
    Ok(curve)
}

/// Dice of one class at one click count over the cases that have it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DiceStats {
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    pub cases: usize,
}

/// `summary[clicks][class]`, None where no case has the class.
pub type Summary = Vec<Vec<Option<DiceStats>>>;

/// Mean, standard deviation (population) and count of the defined values.
pub fn mean_std(values: impl Iterator<Item = Option<f64>>) -> Option<DiceStats> {
    let v: Vec<f64> = values.flatten().collect();
    if v.is_empty() {
        return None;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
    Some(DiceStats {
        mean,
        std: var.sqrt(),
        cases: v.len(),
    })
}

/// `summary[clicks][class]` = mean ± std over the cases.
pub fn summarize(curves: &[CaseCurve]) -> Summary {
    let steps = curves.iter().map(|c| c.dice.len()).min().unwrap_or(0);
    let classes = curves.first().map_or(0, |c| c.dice[0].len());
    (0..steps)
        .map(|s| {
            (0..classes)
                .map(|k| mean_std(curves.iter().map(|c| c.dice[s][k])))
                .collect()
        })
        .collect()
}

/// One row per (case, class, clicks): `case,class,clicks,dice`.
pub fn write_csv(path: &Path, curves: &[CaseCurve], class_names: &[String]) -> Result<()> {
    let mut text = String::from("case,class,clicks,dice\n");
    for curve in curves {
        for (clicks, row) in curve.dice.iter().enumerate() {
            for (k, d) in row.iter().enumerate().skip(1) {
                let value = d.map_or(String::new(), |d| format!("{d:.6}"));
                writeln!(text, "{},{},{clicks},{value}", curve.case, class_names[k])
                    .expect("write to string");
            }
        }
    }
    crate::io::write_atomically(path, text.as_bytes())
}
