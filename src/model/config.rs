//! The TIS head's configuration (`tis_config` in a bundle) and the tensors it implies.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Hyper-parameters of the refinement head and its ROI rule (contract, "Configuration").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TisConfig {
    pub d_model: usize,
    pub n_heads: usize,
    pub ffn_dim: usize,
    pub n_layers: usize,
    pub pe_grid: [usize; 3],
    pub roi_margin: [usize; 3],
    pub roi_min: [usize; 3],
    pub roi_max: [usize; 3],
}

impl TisConfig {
    /// The benchmark configuration "TIS-B" of the contract.
    pub fn tis_b() -> Self {
        TisConfig {
            d_model: 128,
            n_heads: 8,
            ffn_dim: 512,
            n_layers: 6,
            pe_grid: [8, 8, 8],
            roi_margin: [8, 16, 16],
            roi_min: [32, 64, 64],
            roi_max: [96, 128, 128],
        }
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let config: TisConfig =
            serde_json::from_str(text).map_err(|e| Error::Plans(format!("tis_config: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Plans(format!("tis_config: {m}")));
        if self.d_model == 0 || self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return bad(format!(
                "d_model {} must be a positive multiple of n_heads {}",
                self.d_model, self.n_heads
            ));
        }
        if self.ffn_dim == 0 || self.pe_grid.contains(&0) {
            return bad("ffn_dim and pe_grid must be positive".into());
        }
        if (0..3).any(|a| self.roi_min[a] == 0 || self.roi_min[a] > self.roi_max[a]) {
            return bad(format!(
                "roi_min {:?} must be positive and not above roi_max {:?}",
                self.roi_min, self.roi_max
            ));
        }
        Ok(())
    }

    /// Multiply-accumulates of one refinement over `tokens` voxels with `clicks` clicks (the
    /// dense per-voxel work; the click-side work is negligible), counted as docs/performance.md
    /// does: per layer the cross-attention with folded key/value projections, the label
    /// assignment (Q projection, scores and copy, output projection) and the FFN; once, the input
    /// projection, label_mlp of the probabilities (Va, the same in every layer) and the output
    /// projection.
    pub fn macs_per_click(
        &self,
        feature_channels: usize,
        classes: usize,
        tokens: usize,
        clicks: usize,
    ) -> u64 {
        let (d, f, h) = (
            self.d_model as u64,
            self.ffn_dim as u64,
            self.n_heads as u64,
        );
        let (c, k, n) = (clicks as u64, classes as u64, tokens as u64);
        let cross = 2 * c * h * d;
        let assignment = d * d + 2 * c * d + d * d;
        let ffn = 2 * d * f;
        let per_layer = cross + assignment + ffn;
        let label_mlp = k * d + d * d;
        n * (self.n_layers as u64 * per_layer + feature_channels as u64 * d + label_mlp + d * k)
    }

    pub fn head_width(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Every `tis.` tensor with its shape, for features of `feature_channels` and `classes`.
    pub fn expected_tensors(
        &self,
        feature_channels: usize,
        classes: usize,
    ) -> Vec<(String, Vec<usize>)> {
        let (d, f) = (self.d_model, self.ffn_dim);
        let g = self.pe_grid;
        let mut out: Vec<(String, Vec<usize>)> = vec![
            ("tis.input_proj.weight".into(), vec![d, feature_channels]),
            ("tis.input_proj.bias".into(), vec![d]),
            ("tis.pos_grid".into(), vec![d, g[0], g[1], g[2]]),
            ("tis.label_mlp.0.weight".into(), vec![d, classes]),
            ("tis.label_mlp.0.bias".into(), vec![d]),
            ("tis.label_mlp.2.weight".into(), vec![d, d]),
            ("tis.label_mlp.2.bias".into(), vec![d]),
            ("tis.out_norm.weight".into(), vec![d]),
            ("tis.out_norm.bias".into(), vec![d]),
            ("tis.out_proj.weight".into(), vec![classes, d]),
            ("tis.out_proj.bias".into(), vec![classes]),
        ];
        for l in 0..self.n_layers {
            let p = |name: &str| format!("tis.layers.{l}.{name}");
            for norm in [
                "click_cross_norm_q",
                "click_cross_norm_kv",
                "click_self_norm",
                "click_ffn_norm",
                "assign_norm_q",
                "assign_norm_k",
                "assign_ffn_norm",
            ] {
                out.push((p(&format!("{norm}.weight")), vec![d]));
                out.push((p(&format!("{norm}.bias")), vec![d]));
            }
            for attn in ["click_cross", "click_self"] {
                out.push((p(&format!("{attn}.in_proj_weight")), vec![3 * d, d]));
                out.push((p(&format!("{attn}.in_proj_bias")), vec![3 * d]));
                out.push((p(&format!("{attn}.out_proj.weight")), vec![d, d]));
                out.push((p(&format!("{attn}.out_proj.bias")), vec![d]));
            }
            for linear in ["assign_q", "assign_k", "assign_out"] {
                out.push((p(&format!("{linear}.weight")), vec![d, d]));
                out.push((p(&format!("{linear}.bias")), vec![d]));
            }
            out.push((p("assign_alpha"), vec![1]));
            for ffn in ["click_ffn", "assign_ffn"] {
                out.push((p(&format!("{ffn}.0.weight")), vec![f, d]));
                out.push((p(&format!("{ffn}.0.bias")), vec![f]));
                out.push((p(&format!("{ffn}.2.weight")), vec![d, f]));
                out.push((p(&format!("{ffn}.2.bias")), vec![d]));
            }
        }
        out
    }
}
