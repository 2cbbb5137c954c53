//! A small seeded random generator (SplitMix64), for random weights of a given model size
//! (benchmarks, tests: weights N(0, 1/fan_in), norm scales 1 + 0.1·N(0, 1), other vectors
//! 0.1·N(0, 1)) and for the simulated user's jitter.

use std::collections::BTreeMap;

use crate::tensor::Tensor;

/// SplitMix64 with Box–Muller normals: small, seedable, dependency-free.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A standard normal sample.
    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }

    /// A tensor of N(0, 1) samples times `scale`.
    pub fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let data = (0..shape.iter().product())
            .map(|_| self.normal() * scale)
            .collect();
        Tensor::new(shape.to_vec(), data).expect("sized by shape")
    }
}

/// Random tensors for every (name, shape) given.
pub fn random_tensors(expected: &[(String, Vec<usize>)], seed: u64) -> BTreeMap<String, Tensor> {
    let mut normal = Rng::new(seed);
    expected
        .iter()
        .map(|(name, shape)| {
            let tensor = if shape.len() >= 2 {
                let fan_in: usize = shape[1..].iter().product();
                normal.tensor(shape, 1.0 / (fan_in as f32).sqrt())
            } else {
                let mut t = normal.tensor(shape, 0.1);
                if name.ends_with("norm.weight")
                    || name.contains("norm_") && name.ends_with(".weight")
                {
                    t.data_mut().iter_mut().for_each(|v| *v += 1.0);
                }
                t
            };
            (name.clone(), tensor)
        })
        .collect()
}
