//! Per-channel statistics of activations on calibration samples: what bias correction and the
//! `contribution` criterion read, and the shapes the FLOPs count needs.
use std::collections::HashMap;

use edgepack_runtime::process::ImagePreprocess;
use edgepack_runtime::{Session, Tensor};

use crate::calib::CalibError;
use crate::data::Dataset;

/// Mean and mean absolute value of each channel (axis 1) of a value, and its shape on the first sample.
#[derive(Debug, Clone, Default)]
pub struct Channel {
    pub mean: Vec<f32>,
    pub mean_abs: Vec<f32>,
    pub shape: Vec<usize>,
    /// E[x·xᵀ] over sampled positions, C×C row-major (empty when not collected): what the least-squares
    /// reconstruction of removed channels reads.
    pub second: Vec<f64>,
    /// Positions that fed `second`.
    pub second_samples: u64,
}

/// Positions per sample (spread evenly) that feed the second moments.
const SECOND_MOMENT_POSITIONS: usize = 128;
/// Channel counts above this get no second moments (C² memory).
const SECOND_MOMENT_MAX_CHANNELS: usize = 2048;

/// Statistics by value name.
#[derive(Debug, Clone, Default)]
pub struct ChannelStats(pub HashMap<String, Channel>);

impl ChannelStats {
    pub fn get(&self, name: &str) -> Option<&Channel> {
        self.0.get(name)
    }

    /// Runs `s` on samples `range` of `data` and averages each of `values` per channel (axis 1; rank ≥ 2).
    pub fn collect(
        s: &Session,
        data: &Dataset,
        range: std::ops::Range<usize>,
        pre: Option<&ImagePreprocess>,
        values: &[String],
        mut progress: impl FnMut(usize, usize),
    ) -> Result<ChannelStats, CalibError> {
        let mut acc: Vec<Acc> = vec![Acc::default(); values.len()];
        crate::feeds::visit_samples(
            s,
            data,
            range,
            pre,
            values,
            |outs| {
                for (a, (_, t)) in acc.iter_mut().zip(outs) {
                    accumulate(a, t);
                }
            },
            &mut progress,
        )?;
        Ok(ChannelStats(
            values
                .iter()
                .zip(acc)
                .map(|(n, a)| {
                    let c = a.count.max(1) as f64;
                    let s = a.second_count.max(1) as f64;
                    let ch = Channel {
                        mean: a.sum.iter().map(|v| (v / c) as f32).collect(),
                        mean_abs: a.sum_abs.iter().map(|v| (v / c) as f32).collect(),
                        shape: a.shape,
                        second: a.second.iter().map(|v| v / s).collect(),
                        second_samples: a.second_count,
                    };
                    (n.clone(), ch)
                })
                .collect(),
        ))
    }
}

#[derive(Clone, Default)]
struct Acc {
    sum: Vec<f64>,
    sum_abs: Vec<f64>,
    count: u64,
    shape: Vec<usize>,
    second: Vec<f64>,
    second_count: u64,
}

fn accumulate(a: &mut Acc, t: &Tensor) {
    let shape = t.shape();
    if shape.len() < 2 {
        return;
    }
    let (n, c) = (shape[0], shape[1]);
    let inner: usize = shape[2..].iter().product();
    if a.sum.is_empty() {
        a.sum = vec![0.0; c];
        a.sum_abs = vec![0.0; c];
        a.shape = shape.to_vec();
        if c <= SECOND_MOMENT_MAX_CHANNELS {
            a.second = vec![0.0; c * c];
        }
    }
    if a.sum.len() != c {
        return;
    }
    let v = t.to_f32_vec();
    for b in 0..n {
        for ch in 0..c {
            let row = &v[(b * c + ch) * inner..(b * c + ch + 1) * inner];
            a.sum[ch] += row.iter().map(|&x| x as f64).sum::<f64>();
            a.sum_abs[ch] += row.iter().map(|&x| x.abs() as f64).sum::<f64>();
        }
        if !a.second.is_empty() {
            let step = inner.div_ceil(SECOND_MOMENT_POSITIONS).max(1);
            let mut x = vec![0f64; c];
            for p in (0..inner).step_by(step) {
                for (ch, xv) in x.iter_mut().enumerate() {
                    *xv = v[(b * c + ch) * inner + p] as f64;
                }
                for i in 0..c {
                    let xi = x[i];
                    if xi == 0.0 {
                        continue;
                    }
                    let row = &mut a.second[i * c..(i + 1) * c];
                    for (r, xj) in row.iter_mut().zip(&x) {
                        *r += xi * xj;
                    }
                }
                a.second_count += 1;
            }
        }
    }
    a.count += (n * inner) as u64;
}
