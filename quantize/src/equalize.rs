//! Activation equalization (cross-layer scaling, as in SmoothQuant and data-driven CLE): moves per-channel range
//! differences of an activation out of the activation and into the weights of the layers that read it, before
//! calibration, so that one per-tensor INT8 scale serves every channel better.
//!
//! A *group* ([`Groups::analyze_scalable`]) is a set of channels that starts at Conv filters and reaches other
//! Convs (or a Gemm) only through ops that commute with a positive per-channel scale (ReLU, pools, Concat,
//! residual sums). Dividing channel `c` by `s_c` where it starts and multiplying the consumers' input weights by
//! `s_c` leaves the model's function unchanged. With `r_c` the channel's largest |value| on calibration samples and
//! `w_c` the largest weight reading it (each consumer row normalised by its own maximum, as per-channel weight
//! quantization sees it): `s_c = r_c^α / w_c^(1−α)`, scaled so the largest is 1. Narrow channels are widened
//! towards the tensor's range, at the cost of their weights' share of each consumer row (α sets the balance).
//!
//! The pipeline (`--equalize auto`) tries it once the rounding is chosen and keeps it only when the all-INT8 model
//! comes closer to fp32 on the choosing samples (see [`crate::pipeline`]). Producer filters are quantized per
//! channel, so their side costs nothing.
use std::collections::{BTreeMap, BTreeSet};

use edgepack_runtime::onnx::{Model, NodeExt};
use edgepack_runtime::process::ImagePreprocess;
use edgepack_runtime::{Session, Tensor};

use crate::calib::CalibError;
use crate::data::Dataset;
use crate::prune::channels::{Groups, Use};

/// The balance between the activation's channel ranges and the consumers' weights (SmoothQuant's α).
pub const ALPHA: f32 = 0.5;
/// No channel is widened more than this (a nearly dead channel would otherwise be blown up).
const MAX_WIDENING: f32 = 4096.0;

/// An equalized model and what was scaled.
#[derive(Debug, Clone)]
pub struct Equalized {
    pub model: Model,
    /// Channel groups scaled, and their channels in all.
    pub groups: usize,
    pub channels: usize,
}

/// The groups of `model` worth scaling: not blocked, two channels or more, read by a Conv or Gemm.
fn scalable(groups: &Groups) -> Vec<usize> {
    groups
        .prunable()
        .filter(|(_, g)| g.uses.iter().any(|u| matches!(u, Use::ConvInput { .. } | Use::GemmInput { .. })))
        .map(|(i, _)| i)
        .collect()
}

/// The equalized form of `model` (`fp32` runs it) from the per-channel ranges on samples `range` of `data`;
/// `None` when no group can be scaled.
pub fn equalize(
    model: &Model,
    fp32: &Session,
    data: &Dataset,
    range: std::ops::Range<usize>,
    pre: Option<&ImagePreprocess>,
    alpha: f32,
    mut progress: impl FnMut(usize, usize),
) -> Result<Option<Equalized>, CalibError> {
    let groups = Groups::analyze_scalable(model);
    let chosen = scalable(&groups);
    if chosen.is_empty() {
        return Ok(None);
    }
    // Where the group's values are read by a quantized layer: the inputs of its consumers.
    let nodes = &model.graph.nodes;
    let read_at = |u: &Use| match *u {
        Use::ConvInput { node, offset } | Use::GemmInput { node, offset } | Use::Depthwise { node, offset } => {
            Some((nodes[node].input[0].clone(), offset))
        }
        Use::Source { .. } => None,
    };
    let values: Vec<String> = chosen
        .iter()
        .flat_map(|&gi| groups.groups[gi].uses.iter().filter_map(read_at).map(|(v, _)| v))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let peaks = channel_peaks(fp32, data, range, pre, &values, &mut progress)?;
    let mut scales = BTreeMap::new();
    let mut channels = 0;
    for &gi in &chosen {
        let g = &groups.groups[gi];
        let mut r = vec![0f32; g.channels];
        for (v, offset) in g.uses.iter().filter_map(read_at) {
            let Some(p) = peaks.get(&v) else { continue };
            for (c, rc) in r.iter_mut().enumerate() {
                *rc = rc.max(p.get(offset + c).copied().unwrap_or(0.0));
            }
        }
        let mut w = vec![0f32; g.channels];
        for u in &g.uses {
            if let Use::ConvInput { node, offset } | Use::GemmInput { node, offset } = *u {
                consumer_weight_peaks(model, node, offset, &mut w)?;
            }
        }
        let Some(s) = scales_of(&r, &w, alpha) else { continue };
        channels += g.channels;
        scales.insert(gi, s);
    }
    if scales.is_empty() {
        return Ok(None);
    }
    let n = scales.len();
    let model = groups.rescale(model, &scales).map_err(|e| CalibError::Invalid(format!("equalization: {e}")))?;
    Ok(Some(Equalized { model, groups: n, channels }))
}

/// `s_c = r_c^α / w_c^(1−α)`, the largest 1, none below 1/[`MAX_WIDENING`]; channels never seen (or read by
/// zero weights) keep 1. `None` when nothing would move.
pub fn scales_of(r: &[f32], w: &[f32], alpha: f32) -> Option<Vec<f32>> {
    let raw: Vec<Option<f32>> = r
        .iter()
        .zip(w)
        .map(|(&r, &w)| (r > 0.0 && w > 0.0 && r.is_finite()).then(|| r.powf(alpha) / w.powf(1.0 - alpha)))
        .collect();
    let top = raw.iter().flatten().copied().fold(0f32, f32::max);
    if !(top > 0.0 && top.is_finite()) {
        return None;
    }
    let s: Vec<f32> = raw.iter().map(|x| x.map_or(1.0, |x| (x / top).max(1.0 / MAX_WIDENING))).collect();
    s.iter().any(|&x| x < 0.999).then_some(s)
}

/// Per input channel `offset + c` of consumer `node` (a group-1 Conv or a Gemm): the largest |weight| reading it,
/// each output row divided by its own largest |weight| (per-channel quantization's view), folded into `peaks`.
fn consumer_weight_peaks(model: &Model, node: usize, offset: usize, peaks: &mut [f32]) -> Result<(), CalibError> {
    let n = &model.graph.nodes[node];
    let (wd, wv) = crate::prune::channels::weights(model, node).map_err(|e| CalibError::Invalid(e.to_string()))?;
    let is_gemm = n.op() == "Gemm";
    let trans_b = n.attr_i("transB").unwrap_or(0) != 0;
    // (output row, input column) of element i.
    let taps: usize = if is_gemm { 1 } else { wd[2..].iter().product() };
    let at = |i: usize| -> (usize, usize) {
        if !is_gemm {
            (i / (wd[1] * taps), (i / taps) % wd[1])
        } else if trans_b {
            (i / wd[1], i % wd[1])
        } else {
            (i % wd[1], i / wd[1])
        }
    };
    let rows = if !is_gemm || trans_b { wd[0] } else { wd[1] };
    let mut row_max = vec![0f32; rows];
    for (i, x) in wv.iter().enumerate() {
        let (o, _) = at(i);
        row_max[o] = row_max[o].max(x.abs());
    }
    for (i, x) in wv.iter().enumerate() {
        let (o, j) = at(i);
        if j >= offset && j < offset + peaks.len() && row_max[o] > 0.0 {
            let p = &mut peaks[j - offset];
            *p = p.max(x.abs() / row_max[o]);
        }
    }
    Ok(())
}

/// The largest |value| of each channel (axis 1) of `values` over the samples.
fn channel_peaks(
    s: &Session,
    data: &Dataset,
    range: std::ops::Range<usize>,
    pre: Option<&ImagePreprocess>,
    values: &[String],
    progress: &mut impl FnMut(usize, usize),
) -> Result<std::collections::HashMap<String, Vec<f32>>, CalibError> {
    let mut peaks: Vec<Vec<f32>> = vec![vec![]; values.len()];
    crate::feeds::visit_samples(
        s,
        data,
        range,
        pre,
        values,
        |outs| {
            for (p, (_, t)) in peaks.iter_mut().zip(outs) {
                fold_peaks(p, t);
            }
        },
        progress,
    )?;
    Ok(values.iter().cloned().zip(peaks).collect())
}

fn fold_peaks(p: &mut Vec<f32>, t: &Tensor) {
    let shape = t.shape();
    if shape.len() < 2 {
        return;
    }
    let (n, c) = (shape[0], shape[1]);
    let inner: usize = shape[2..].iter().product();
    if p.is_empty() {
        *p = vec![0.0; c];
    }
    if p.len() != c {
        return;
    }
    let v = t.to_f32_vec();
    for b in 0..n {
        for (ch, pc) in p.iter_mut().enumerate() {
            let row = &v[(b * c + ch) * inner..(b * c + ch + 1) * inner];
            *pc = row.iter().filter(|x| x.is_finite()).fold(*pc, |m, x| m.max(x.abs()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_balance_ranges_against_weights() {
        // Channel 0 spans 100, channel 1 spans 1, equal weights: α = 0.5 gives √100 : √1.
        let s = scales_of(&[100.0, 1.0], &[1.0, 1.0], 0.5).unwrap();
        assert!((s[0] - 1.0).abs() < 1e-6 && (s[1] - 0.1).abs() < 1e-6, "{s:?}");
        // A dead channel keeps 1; an already balanced tensor needs nothing.
        assert_eq!(scales_of(&[4.0, 0.0, 1.0], &[1.0, 1.0, 1.0], 0.5).unwrap(), vec![1.0, 1.0, 0.5]);
        assert!(scales_of(&[2.0, 2.0], &[0.5, 0.5], 0.5).is_none());
        // Never below 1/MAX_WIDENING.
        let s = scales_of(&[1e12, 1.0], &[1.0, 1.0], 1.0).unwrap();
        assert_eq!(s[1], 1.0 / MAX_WIDENING);
    }
}
