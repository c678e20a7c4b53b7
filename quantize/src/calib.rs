//! Calibration: run the fp32 model on real samples and observe the activations the QDQ pass needs.
//! Streaming: one sample in memory at a time, observers keep fixed-size state.
use std::collections::HashMap;

use edgepack_runtime::Session;
use edgepack_runtime::process::ImagePreprocess;

use crate::data::{DataError, Dataset};
use crate::qdq::Range;

/// How a range is chosen from the observed values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// Exact minimum and maximum.
    MinMax,
    /// The given percentile of |x| on each side (e.g. 99.99), from a histogram (second pass).
    Percentile(f64),
    /// The clipping range minimising the expected quantization error (clipping + rounding) over the histogram.
    Mse,
    /// The clipping range minimising the KL divergence between the clipped histogram and its quantized form
    /// (TensorRT's entropy calibration) for non-negative activations; signed activations get the MSE range.
    Entropy,
}

impl Method {
    pub fn needs_histogram(self) -> bool {
        !matches!(self, Method::MinMax)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CalibError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Runtime(#[from] edgepack_runtime::Error),
    #[error("{0}")]
    Invalid(String),
    /// The model cannot be calibrated here (e.g. the CPU backend cannot run it).
    #[error("{0}")]
    Unsupported(String),
}

const BINS: usize = 2048;

/// Per-activation state: min/max, then (for percentiles) a histogram over [min, max].
struct Observer {
    min: f32,
    max: f32,
    hist: Vec<u64>,
}

impl Observer {
    fn new() -> Self {
        Observer { min: f32::INFINITY, max: f32::NEG_INFINITY, hist: Vec::new() }
    }

    fn observe_range(&mut self, v: &[f32]) {
        for &x in v.iter().filter(|x| x.is_finite()) {
            self.min = self.min.min(x);
            self.max = self.max.max(x);
        }
    }

    fn bin(&self, x: f32) -> usize {
        let w = (self.max - self.min).max(f32::MIN_POSITIVE);
        (((x - self.min) / w) * (BINS as f32 - 1.0)).round().clamp(0.0, BINS as f32 - 1.0) as usize
    }

    fn observe_hist(&mut self, v: &[f32]) {
        if self.hist.is_empty() {
            self.hist = vec![0; BINS];
        }
        for &x in v.iter().filter(|x| x.is_finite()) {
            let b = self.bin(x);
            self.hist[b] += 1;
        }
    }

    /// Value at the centre of histogram bin `i`.
    fn center(&self, i: usize) -> f32 {
        self.min + (self.max - self.min) * i as f32 / (BINS as f32 - 1.0)
    }

    /// Expected squared error of uint8 quantization over [lo, hi], weighted by the histogram.
    fn quant_mse(&self, lo: f32, hi: f32) -> f64 {
        let (scale, zp) = crate::qdq::activation_params(Range { min: lo, max: hi });
        self.hist
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, &c)| {
                let x = self.center(i);
                let q = ((x / scale).round() + zp as f32).clamp(0.0, 255.0);
                let e = (x - (q - zp as f32) * scale) as f64;
                e * e * c as f64
            })
            .sum()
    }

    /// KL(P‖Q) of the range [lo, hi]: P is the histogram with the mass outside moved to the edge bins, Q spreads
    /// each quantization level's mass evenly over the level's non-empty bins.
    fn kl(&self, lo: f32, hi: f32) -> f64 {
        let (scale, zp) = crate::qdq::activation_params(Range { min: lo, max: hi });
        let (a, b) = (self.bin(lo.max(self.min)), self.bin(hi.min(self.max)));
        let mut p: Vec<f64> = self.hist[a..=b].iter().map(|&c| c as f64).collect();
        p[0] += self.hist[..a].iter().sum::<u64>() as f64;
        *p.last_mut().unwrap() += self.hist[b + 1..].iter().sum::<u64>() as f64;
        let level = |i: usize| ((self.center(a + i) / scale).round() + zp as f32).clamp(0.0, 255.0) as usize;
        let (mut mass, mut count) = (vec![0f64; 256], vec![0u32; 256]);
        for (i, &v) in p.iter().enumerate() {
            if v > 0.0 {
                mass[level(i)] += v;
                count[level(i)] += 1;
            }
        }
        let total: f64 = p.iter().sum();
        if total <= 0.0 {
            return 0.0;
        }
        p.iter()
            .enumerate()
            .filter(|(_, v)| **v > 0.0)
            .map(|(i, &v)| {
                let q = mass[level(i)] / count[level(i)] as f64;
                (v / total) * ((v / total) / (q / total)).ln()
            })
            .sum()
    }

    /// The candidate (both ends shrunk towards 0 by the same factor, 100 % down to 20 %) minimising `cost`.
    fn best_shrink(&self, cost: impl Fn(f32, f32) -> f64) -> Range {
        let mut best = (f64::INFINITY, Range { min: self.min, max: self.max });
        for k in 0..=80 {
            let a = 1.0 - k as f32 * 0.01;
            // The quantizer's range always includes 0 (see `activation_params`): shrink towards it.
            let (lo, hi) = (self.min.min(0.0) * a, self.max.max(0.0) * a);
            let e = cost(lo, hi);
            if e < best.0 {
                best = (e, Range { min: lo, max: hi });
            }
        }
        best.1
    }

    fn mse_range(&self) -> Range {
        self.best_shrink(|lo, hi| self.quant_mse(lo, hi))
    }

    fn range(&self, method: Method) -> Range {
        if !self.min.is_finite() {
            return Range { min: 0.0, max: 0.0 };
        }
        match method {
            Method::MinMax => Range { min: self.min, max: self.max },
            Method::Percentile(p) => {
                let total: u64 = self.hist.iter().sum();
                if total == 0 {
                    return Range { min: self.min, max: self.max };
                }
                let cut = ((1.0 - p / 100.0) * total as f64).floor() as u64;
                let at = |i: usize| self.min + (self.max - self.min) * i as f32 / (BINS as f32 - 1.0);
                let (mut acc, mut lo) = (0u64, 0usize);
                while lo + 1 < BINS && acc + self.hist[lo] <= cut {
                    acc += self.hist[lo];
                    lo += 1;
                }
                let (mut acc, mut hi) = (0u64, BINS - 1);
                while hi > lo && acc + self.hist[hi] <= cut {
                    acc += self.hist[hi];
                    hi -= 1;
                }
                Range { min: at(lo).min(0.0).max(self.min), max: at(hi).max(0.0).min(self.max) }
            }
            Method::Mse => self.mse_range(),
            Method::Entropy if self.hist.iter().all(|&c| c == 0) => Range { min: self.min, max: self.max },
            // KL calibration is meant for one-sided (post-ReLU) distributions; signed ones get the MSE range,
            // which weighs the error of both tails by its size.
            Method::Entropy if self.min < 0.0 => self.mse_range(),
            // KL ignores how far mass moves: a saturated spike (HardSigmoid at 1) can be clipped at no cost.
            // Candidates may clip at most 0.1 % of the values (sparse tails, as the method intends).
            Method::Entropy => {
                let total: u64 = self.hist.iter().sum();
                self.best_shrink(|lo, hi| {
                    let (a, b) = (self.bin(lo.max(self.min)), self.bin(hi.min(self.max)));
                    let clipped: u64 = self.hist[..a].iter().chain(&self.hist[b + 1..]).sum();
                    if clipped as f64 > 1e-3 * total as f64 { f64::INFINITY } else { self.kl(lo, hi) }
                })
            }
        }
    }
}

/// Observes `values` on `samples` (indices into `data`) and returns a range per value.
/// `progress` is called after each sample with (done, total).
pub fn calibrate(
    session: &Session,
    data: &Dataset,
    samples: std::ops::Range<usize>,
    pre: Option<&ImagePreprocess>,
    values: &[String],
    method: Method,
    mut progress: impl FnMut(usize, usize),
) -> Result<HashMap<String, Range>, CalibError> {
    if samples.is_empty() {
        return Err(CalibError::Invalid("no calibration samples".into()));
    }
    let mut obs: Vec<Observer> = values.iter().map(|_| Observer::new()).collect();
    let passes = if method.needs_histogram() { 2 } else { 1 };
    let total = samples.len() * passes;
    for pass in 0..passes {
        // Each pass starts from the initial recurrent state, as the first did.
        crate::feeds::visit_samples(
            session,
            data,
            samples.clone(),
            pre,
            values,
            |outs| {
                for (o, (_, t)) in obs.iter_mut().zip(outs) {
                    let v = t.to_f32_vec();
                    if pass == 0 { o.observe_range(&v) } else { o.observe_hist(&v) }
                }
            },
            |done, _| progress(pass * samples.len() + done, total),
        )?;
    }
    Ok(values.iter().cloned().zip(obs.iter().map(|o| o.range(method))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_clips_outliers_minmax_does_not() {
        let mut o = Observer::new();
        let mut v: Vec<f32> = (0..10000).map(|i| (i % 100) as f32 / 100.0).collect();
        v.push(50.0);
        o.observe_range(&v);
        o.observe_hist(&v);
        assert_eq!(o.range(Method::MinMax), Range { min: 0.0, max: 50.0 });
        let r = o.range(Method::Percentile(99.9));
        assert!(r.max < 1.1 && r.max > 0.9, "{r:?}");
        assert_eq!(r.min, 0.0);
    }

    #[test]
    fn entropy_clips_a_sparse_tail_and_keeps_a_dense_range() {
        // Dense uniform values: clipping loses information, the full range wins.
        let mut o = Observer::new();
        let v: Vec<f32> = (0..20000).map(|i| (i % 1000) as f32 / 1000.0).collect();
        o.observe_range(&v);
        o.observe_hist(&v);
        let r = o.range(Method::Entropy);
        assert!(r.max > 0.95 && r.min == 0.0, "{r:?}");
        // A few far outliers: the range is clipped well below them.
        let mut w = v.clone();
        w.extend([20.0, 19.0, 18.5]);
        let mut o = Observer::new();
        o.observe_range(&w);
        o.observe_hist(&w);
        let r = o.range(Method::Entropy);
        assert!(r.max < 10.0, "{r:?}");
    }

    #[test]
    fn mse_never_does_worse_than_minmax_and_clips_a_heavy_tail() {
        let mut o = Observer::new();
        // Exponential-like values: a long, populated tail where clipping pays off.
        let v: Vec<f32> = (1..20000).map(|i| -((i as f32 / 20000.0).ln()) * 0.5).collect();
        o.observe_range(&v);
        o.observe_hist(&v);
        let m = o.range(Method::Mse);
        assert!(m.min >= o.min.min(0.0) && m.max <= o.max.max(0.0));
        assert!(o.quant_mse(m.min, m.max) <= o.quant_mse(o.min, o.max));
        assert!(m.max < o.max, "{m:?} vs max {}", o.max);
    }
}
