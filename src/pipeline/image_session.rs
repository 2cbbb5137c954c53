//! An interactive session on an image in its own geometry: clicks come in the image's voxel
//! indices (file order z, y, x) and label maps go out in the image's geometry.
//!
//! The automatic segmentation is nnU-Net's export (logits resampled back, argmax). A refinement
//! replaces it only where the head ran: the image voxels whose nearest grid voxel lies in the
//! ROI take the refined grid label; everywhere else nnU-Net's segmentation stands. Zero clicks
//! give exactly nnU-Net's output.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::geometry::{Click, Label, Region};
use crate::model::Model;
use crate::pipeline::predictor::export_segmentation;
use crate::pipeline::preprocess::{Preprocessed, nearest_index, preprocess};
use crate::pipeline::session::{Session, SessionOptions, encode};
use crate::pipeline::sliding_window::Outputs;
use crate::tensor::Tensor;

pub struct ImageSession<'m, B: Backend> {
    pre: Preprocessed,
    image_shape: [usize; 3],
    auto_labels: Vec<Label>,
    session: Session<'m, B>,
}

/// What a refinement did, in the image's geometry.
#[derive(Clone, Debug)]
pub struct ImageRefinement {
    /// Image voxels whose labels may have changed (the footprint of the changed grid box).
    pub changed: Option<Region>,
    /// The footprint of the ROI the head ran on.
    pub roi: Region,
    pub clicks_used: usize,
    pub clicks_outside_roi: usize,
}

impl<'m, B: Backend> ImageSession<'m, B> {
    /// Preprocesses the image (C × Z × Y × X in file order, `spacing` in mm per axis) and runs
    /// the encoder once.
    pub fn new(
        model: &'m Model<B>,
        image: &Tensor,
        spacing: [f64; 3],
        options: &SessionOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let pre = preprocess(image, spacing, &model.info)?;
        let encoded = encode(
            model,
            &pre.volume,
            options,
            Outputs::LogitsAndFeatures,
            progress,
        )?;
        let auto_labels = export_segmentation(&model.backend, &encoded.logits, &pre, &model.info)?;
        let s = image.shape();
        Ok(ImageSession {
            image_shape: [s[1], s[2], s[3]],
            auto_labels,
            session: Session::from_encoded(model, encoded)?,
            pre,
        })
    }

    pub fn preprocessed(&self) -> &Preprocessed {
        &self.pre
    }

    /// The session on the model's grid.
    pub fn grid_session(&self) -> &Session<'m, B> {
        &self.session
    }

    /// The model's class names, by label value.
    pub fn class_names(&self) -> &[String] {
        self.session.class_names()
    }

    /// The image's extent (z, y, x in file order).
    pub fn image_shape(&self) -> [usize; 3] {
        self.image_shape
    }

    /// nnU-Net's automatic segmentation of the image.
    pub fn auto_labels(&self) -> &[Label] {
        &self.auto_labels
    }

    /// A click in image coordinates on the grid; errors name the click.
    pub fn click_to_grid(&self, click: &Click) -> Result<Click> {
        click.check(self.image_shape, self.session.classes())?;
        let [z, y, x] = self.pre.image_to_grid(click.position()).ok_or_else(|| {
            Error::Click(format!(
                "click (z {}, y {}, x {}) lies outside the region the model sees (the image's \
                 non-zero box {:?} in transposed order)",
                click.z, click.y, click.x, self.pre.crop
            ))
        })?;
        Ok(Click::new(z, y, x, click.class))
    }

    /// Adds clicks (image coordinates; one undo step) and refines.
    pub fn refine(&mut self, clicks: &[Click]) -> Result<ImageRefinement> {
        let on_grid = clicks
            .iter()
            .map(|c| self.click_to_grid(c))
            .collect::<Result<Vec<_>>>()?;
        let r = self.session.refine(&on_grid)?;
        Ok(ImageRefinement {
            changed: r.changed.map(|c| self.pre.grid_region_to_image(&c)),
            roi: self.pre.grid_region_to_image(&r.roi),
            clicks_used: r.clicks_used,
            clicks_outside_roi: r.clicks_outside_roi,
        })
    }

    /// Takes back the last refinement; returns the image voxels that may have changed.
    pub fn undo(&mut self) -> Result<Option<Region>> {
        Ok(self
            .session
            .undo()?
            .map(|c| self.pre.grid_region_to_image(&c)))
    }

    /// Back to the automatic segmentation; returns the image voxels that may have changed.
    pub fn reset(&mut self) -> Option<Region> {
        self.session
            .reset()
            .map(|c| self.pre.grid_region_to_image(&c))
    }

    /// The label map shown now, in the image's geometry (file C order).
    pub fn labels(&self) -> Vec<Label> {
        let mut labels = self.auto_labels.clone();
        let Some(roi) = self.session.current_roi() else {
            return labels;
        };
        let footprint = self.pre.grid_region_to_image(&roi);
        let grid = self.pre.grid();
        let grid_labels = self.session.labels();
        let [_, ny, nx] = self.image_shape;
        for z in footprint.start[0]..footprint.stop()[0] {
            for y in footprint.start[1]..footprint.stop()[1] {
                for x in footprint.start[2]..footprint.stop()[2] {
                    let g = self.grid_voxel([z, y, x], grid);
                    labels[(z * ny + y) * nx + x] =
                        grid_labels[(g[0] * grid[1] + g[1]) * grid[2] + g[2]];
                }
            }
        }
        labels
    }

    /// The grid voxel nearest to an image voxel inside the crop.
    fn grid_voxel(&self, position: [usize; 3], grid: [usize; 3]) -> [usize; 3] {
        let t = self.pre.transpose_forward.map(|a| position[a]);
        [0, 1, 2].map(|a| {
            nearest_index(
                t[a] - self.pre.crop.start[a],
                self.pre.crop.size[a],
                grid[a],
            )
        })
    }
}
