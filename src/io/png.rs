//! PNG outputs: the Dice-against-clicks plot of an evaluation (plotters, with the DejaVu Sans
//! font embedded so that no system font is needed) and slice overlays of label maps on an image.

use std::path::Path;
use std::sync::OnceLock;

use image::{Rgb, RgbImage};
use plotters::prelude::*;

use super::replace_atomically;
use crate::error::{Error, Result};
use crate::evaluation::Summary;
use crate::geometry::Label;
use crate::tensor::Tensor;

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Distinct colours for classes 1, 2, … (class 0, background, is left uncoloured).
const PALETTE: [[u8; 3]; 8] = [
    [230, 25, 75],
    [60, 180, 75],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
];

fn class_colour(class: usize) -> [u8; 3] {
    PALETTE[(class - 1) % PALETTE.len()]
}

fn png_err(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        message: format!("cannot write PNG ({message})"),
    }
}

fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| register_font_bytes().is_ok());
    ok.then_some(())
        .ok_or_else(|| Error::Session("the embedded font cannot be loaded".into()))
}

fn register_font_bytes() -> std::result::Result<(), ()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).map_err(|_| ())
}

/// Mean Dice (± std as error bars) against clicks, one line per foreground class:
/// `summary[clicks][class]`.
pub fn plot_dice(
    path: &Path,
    summary: &Summary,
    class_names: &[String],
    title: &str,
) -> Result<()> {
    register_font()?;
    replace_atomically(path, |temporary| {
        let root = BitMapBackend::new(temporary, (900, 600)).into_drawing_area();
        let draw = || -> std::result::Result<(), Box<dyn std::error::Error + '_>> {
            root.fill(&WHITE)?;
            let steps = summary.len().saturating_sub(1).max(1) as f64;
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 24))
                .margin(20)
                .x_label_area_size(45)
                .y_label_area_size(60)
                .build_cartesian_2d(-0.2f64..steps + 0.2, 0f64..1f64)?;
            chart
                .configure_mesh()
                .x_desc("clicks")
                .y_desc("Dice")
                .x_labels(summary.len().max(2))
                .x_label_formatter(&|x| format!("{x:.0}"))
                .label_style(("sans-serif", 16))
                .draw()?;
            for (k, name) in class_names.iter().enumerate().skip(1) {
                let [r, g, b] = class_colour(k);
                let colour = RGBColor(r, g, b);
                let points: Vec<(f64, f64, f64)> = summary
                    .iter()
                    .enumerate()
                    .filter_map(|(s, row)| row[k].map(|d| (s as f64, d.mean, d.std)))
                    .collect();
                if points.is_empty() {
                    continue;
                }
                chart
                    .draw_series(LineSeries::new(
                        points.iter().map(|&(x, m, _)| (x, m)),
                        colour.stroke_width(3),
                    ))?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3))
                    });
                chart.draw_series(points.iter().map(|&(x, m, sd)| {
                    ErrorBar::new_vertical(
                        x,
                        (m - sd).max(0.0),
                        m,
                        (m + sd).min(1.0),
                        colour.filled(),
                        8,
                    )
                }))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 16))
                .draw()?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| png_err(path, e))
    })
}

/// Overlays of slices with fewer rows than this are enlarged by a whole factor.
const OVERLAY_MIN_HEIGHT: usize = 256;

/// Axial slice `z` of a 1 × Z × Y × X image, grey levels over [`low`, `high`], with each label
/// map drawn over it (40 % colour), the panels side by side.
pub fn write_overlay(
    path: &Path,
    image: &Tensor,
    panels: &[&[Label]],
    z: usize,
    (low, high): (f32, f32),
) -> Result<()> {
    let s = image.shape();
    let (ny, nx) = (s[2], s[3]);
    if z >= s[1] || panels.iter().any(|p| p.len() != s[1] * ny * nx) {
        return Err(png_err(
            path,
            format!("slice {z} or label maps do not fit the image {s:?}"),
        ));
    }
    let mut canvas = RgbImage::new((nx * panels.len()) as u32, ny as u32);
    for (p, labels) in panels.iter().enumerate() {
        for y in 0..ny {
            for x in 0..nx {
                let v = (z * ny + y) * nx + x;
                let grey = ((image.data()[v] - low) / (high - low)).clamp(0.0, 1.0) * 255.0;
                let mut rgb = [grey; 3];
                if labels[v] > 0 {
                    let c = class_colour(labels[v] as usize);
                    (0..3).for_each(|i| rgb[i] = 0.6 * rgb[i] + 0.4 * c[i] as f32);
                }
                // Rows go top to bottom with increasing y.
                canvas.put_pixel((p * nx + x) as u32, y as u32, Rgb(rgb.map(|c| c as u8)));
            }
        }
    }
    // Small slices are enlarged (whole pixels, no smoothing) to at least OVERLAY_MIN_HEIGHT rows.
    let zoom = OVERLAY_MIN_HEIGHT.div_ceil(ny).max(1) as u32;
    let canvas = image::imageops::resize(
        &canvas,
        canvas.width() * zoom,
        canvas.height() * zoom,
        image::imageops::FilterType::Nearest,
    );
    replace_atomically(path, |temporary| {
        canvas
            .save_with_format(temporary, image::ImageFormat::Png)
            .map_err(|e| png_err(path, e))
    })
}
