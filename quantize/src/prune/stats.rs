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
}

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
        let input = match s.inputs() {
            [one] => one.name.clone(),
            more => {
                return Err(CalibError::Invalid(format!("statistics feed one input; the model has {}", more.len())));
            }
        };
        let names: Vec<&str> = values.iter().map(String::as_str).collect();
        let mut acc: Vec<(Vec<f64>, Vec<f64>, u64, Vec<usize>)> = vec![(vec![], vec![], 0, vec![]); values.len()];
        let total = range.len();
        for (done, k) in range.enumerate() {
            let x = data.get(k)?.to_input(pre)?;
            let outs = s.run_values(vec![(input.clone(), x)], &names)?;
            for (a, (_, t)) in acc.iter_mut().zip(&outs) {
                accumulate(a, t);
            }
            progress(done + 1, total);
        }
        Ok(ChannelStats(
            values
                .iter()
                .zip(acc)
                .map(|(n, (sum, sum_abs, count, shape))| {
                    let c = count.max(1) as f64;
                    let ch = Channel {
                        mean: sum.iter().map(|v| (v / c) as f32).collect(),
                        mean_abs: sum_abs.iter().map(|v| (v / c) as f32).collect(),
                        shape,
                    };
                    (n.clone(), ch)
                })
                .collect(),
        ))
    }
}

fn accumulate(a: &mut (Vec<f64>, Vec<f64>, u64, Vec<usize>), t: &Tensor) {
    let shape = t.shape();
    if shape.len() < 2 {
        return;
    }
    let (n, c) = (shape[0], shape[1]);
    let inner: usize = shape[2..].iter().product();
    if a.0.is_empty() {
        a.0 = vec![0.0; c];
        a.1 = vec![0.0; c];
        a.3 = shape.to_vec();
    }
    if a.0.len() != c {
        return;
    }
    let v = t.to_f32_vec();
    for b in 0..n {
        for ch in 0..c {
            let row = &v[(b * c + ch) * inner..(b * c + ch + 1) * inner];
            a.0[ch] += row.iter().map(|&x| x as f64).sum::<f64>();
            a.1[ch] += row.iter().map(|&x| x.abs() as f64).sum::<f64>();
        }
    }
    a.2 += (n * inner) as u64;
}
