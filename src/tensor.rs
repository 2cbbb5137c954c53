//! A dense host tensor of f32 in C order: the currency between files, the model and the CPU
//! backend. Volumes are channels first (C × Z × Y × X); token matrices are rows × columns.

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// Wraps `data`; its length must be the product of `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(Error::Shape(format!(
                "shape {shape:?} holds {expected} values, got {}",
                data.len()
            )));
        }
        Ok(Tensor { shape, data })
    }

    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The same values under another shape of the same size.
    pub fn reshape(self, shape: Vec<usize>) -> Result<Self> {
        Tensor::new(shape, self.data)
    }

    /// The transpose of a matrix (rows × cols → cols × rows), e.g. tokens N × K to K × N.
    pub fn transpose_2d(&self) -> Result<Self> {
        let [rows, cols] = *self.shape.as_slice() else {
            return Err(Error::Shape(format!(
                "cannot transpose shape {:?} as a matrix",
                self.shape
            )));
        };
        let mut data = vec![0f32; self.data.len()];
        for r in 0..rows {
            for c in 0..cols {
                data[c * rows + r] = self.data[r * cols + c];
            }
        }
        Tensor::new(vec![cols, rows], data)
    }

    /// Rows `start..stop` of the leading axis, as a new tensor.
    pub fn slice_rows(&self, start: usize, stop: usize) -> Result<Self> {
        let rows = self.shape.first().copied().unwrap_or(0);
        if start > stop || stop > rows {
            return Err(Error::Shape(format!(
                "rows {start}..{stop} out of range for shape {:?}",
                self.shape
            )));
        }
        let row_len: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = stop - start;
        Tensor::new(shape, self.data[start * row_len..stop * row_len].to_vec())
    }

    /// Relative L2 error ‖self − reference‖ / ‖reference‖, accumulated in f64. NaN anywhere
    /// gives NaN, which fails every `<=` comparison.
    pub fn relative_l2_error(&self, reference: &Tensor) -> Result<f64> {
        if self.shape != reference.shape {
            return Err(Error::Shape(format!(
                "cannot compare shape {:?} with reference shape {:?}",
                self.shape, reference.shape
            )));
        }
        let (mut diff, mut norm) = (0f64, 0f64);
        for (&a, &b) in self.data.iter().zip(&reference.data) {
            let d = a as f64 - b as f64;
            diff += d * d;
            norm += b as f64 * b as f64;
        }
        Ok((diff / norm).sqrt())
    }
}

/// `v` rounded to the nearest f16 (ties to even), as numpy's `astype(float16)` does from f64,
/// returned as f32. (`half`'s f64 conversion drops low mantissa bits before rounding, so it can
/// miss the nearest value by one ulp; this picks among its neighbours exactly.)
pub fn round_to_f16(v: f64) -> f32 {
    use half::f16;
    let guess = f16::from_f64(v);
    if !guess.is_finite() || !v.is_finite() {
        return guess.to_f32();
    }
    let bits = guess.to_bits();
    [bits.wrapping_sub(1), bits, bits.wrapping_add(1)]
        .into_iter()
        .map(f16::from_bits)
        .filter(|c| c.is_finite() && (c.to_f64() >= 0.0) == (v >= 0.0) || c.to_f64() == 0.0)
        .min_by(|a, b| {
            let (da, db) = ((a.to_f64() - v).abs(), (b.to_f64() - v).abs());
            da.total_cmp(&db)
                .then((a.to_bits() & 1).cmp(&(b.to_bits() & 1)))
        })
        .unwrap_or(guess)
        .to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_rounding_is_exact_with_ties_to_even() {
        // 1 + 2^-11 is a tie between 1 and 1 + 2^-10: even wins (1). Just above it rounds up,
        // by a margin only the low mantissa bits of the f64 hold.
        assert_eq!(round_to_f16(1.0 + 2f64.powi(-11)), 1.0);
        assert_eq!(
            round_to_f16(1.0 + 2f64.powi(-11) + 2f64.powi(-40)),
            1.0 + 2f32.powi(-10)
        );
        assert_eq!(
            round_to_f16(-(1.0 + 2f64.powi(-11) + 2f64.powi(-40))),
            -(1.0 + 2f32.powi(-10))
        );
        assert_eq!(round_to_f16(0.0), 0.0);
        assert_eq!(round_to_f16(1e-9), 0.0);
        assert_eq!(round_to_f16(65504.0), 65504.0);
        assert_eq!(round_to_f16(0.1), half::f16::from_f32(0.1).to_f32());
    }
}
