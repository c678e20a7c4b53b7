//! Unstructured magnitude pruning: the smallest-|w| weights of each Conv/Gemm/MatMul become exact zeros. The
//! graph keeps its shapes (dense kernels run it as before); the zeros are what a compressed bundle member
//! (zstd) stores almost for free. With channel statistics each layer's bias absorbs the mean contribution of
//! the weights it lost (bias correction).
use std::collections::BTreeMap;

use edgepack_runtime::onnx::{Model, NodeExt};

use super::PruneError;
use super::channels::{set_weights, weights};
use super::stats::ChannelStats;

/// A layer with prunable weights.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WeightLayer {
    pub node: String,
    pub op: String,
    #[serde(skip)]
    pub index: usize,
    pub params: usize,
}

/// Conv, Gemm and MatMul nodes whose weights (input 1) are float32 initializers.
pub fn layers(model: &Model) -> Vec<WeightLayer> {
    let g = &model.graph;
    g.nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| matches!(n.op(), "Conv" | "Gemm" | "MatMul") && n.domain_name().is_empty())
        .filter_map(|(i, n)| {
            let t = g.initializer(n.input.get(1)?)?;
            (t.data_type == Some(1) && t.dims.len() >= 2).then(|| WeightLayer {
                node: n.name().to_string(),
                op: n.op().to_string(),
                index: i,
                params: t.dims.iter().product::<i64>() as usize,
            })
        })
        .collect()
}

/// Per-layer sparsities that one global magnitude threshold gives `sparsity` of all prunable weights.
pub fn global_targets(model: &Model, sparsity: f64) -> Result<BTreeMap<String, f64>, PruneError> {
    let ls = layers(model);
    let mut all: Vec<f32> = Vec::new();
    for l in &ls {
        all.extend(weights(model, l.index)?.1.iter().map(|x| x.abs()));
    }
    if all.is_empty() {
        return Ok(BTreeMap::new());
    }
    let k = ((all.len() as f64) * sparsity.clamp(0.0, 1.0)).round() as usize;
    if k == 0 {
        return Ok(ls.iter().map(|l| (l.node.clone(), 0.0)).collect());
    }
    let k = k.min(all.len());
    let (_, t, _) = all.select_nth_unstable_by(k - 1, f32::total_cmp);
    let threshold = *t;
    let mut out = BTreeMap::new();
    for l in &ls {
        let w = weights(model, l.index)?.1;
        let below = w.iter().filter(|x| x.abs() <= threshold).count();
        out.insert(l.node.clone(), below as f64 / w.len().max(1) as f64);
    }
    Ok(out)
}

/// The model with `sparsity[node]` of each named layer's weights (the smallest |w|) set to zero.
pub fn prune(
    model: &Model,
    sparsity: &BTreeMap<String, f64>,
    stats: Option<&ChannelStats>,
) -> Result<Model, PruneError> {
    let mut m = model.clone();
    for l in layers(model) {
        let Some(&s) = sparsity.get(&l.node) else { continue };
        let (dims, mut w) = weights(&m, l.index)?;
        let k = ((w.len() as f64) * s.clamp(0.0, 1.0)).round() as usize;
        if k == 0 {
            continue;
        }
        let mut order: Vec<usize> = (0..w.len()).collect();
        order.select_nth_unstable_by(k - 1, |&a, &b| w[a].abs().total_cmp(&w[b].abs()).then(a.cmp(&b)));
        let removed: Vec<usize> = order[..k].to_vec();
        let n = m.graph.nodes[l.index].clone();
        if let Some(st) = stats.and_then(|st| st.get(&n.input[0]))
            && n.op() != "MatMul"
        {
            correct_bias(&mut m, l.index, &dims, &w, &removed, &st.mean)?;
        }
        for i in removed {
            w[i] = 0.0;
        }
        set_weights(&mut m, l.index, dims, w)?;
    }
    Ok(m)
}

/// bias[o] += Σ over removed weights w[o, j, taps] · E[x_channel(o, j)].
fn correct_bias(
    m: &mut Model,
    node: usize,
    dims: &[usize],
    w: &[f32],
    removed: &[usize],
    mean: &[f32],
) -> Result<(), PruneError> {
    let n = m.graph.nodes[node].clone();
    let is_gemm = n.op() == "Gemm";
    let trans_b = n.attr_i("transB").unwrap_or(0) != 0;
    let c_out = if is_gemm && !trans_b { dims[1] } else { dims[0] };
    let mut delta = vec![0f64; c_out];
    if is_gemm {
        let alpha = n.attr_f("alpha").unwrap_or(1.0) as f64;
        for &i in removed {
            let (r, c) = (i / dims[1], i % dims[1]);
            let (o, j) = if trans_b { (r, c) } else { (c, r) };
            delta[o] += alpha * w[i] as f64 * mean.get(j).copied().unwrap_or(0.0) as f64;
        }
    } else {
        let groups = n.attr_i("group").unwrap_or(1).max(1) as usize;
        let c_in_g = dims[1];
        let taps: usize = dims[2..].iter().product();
        let out_per_group = (c_out / groups).max(1);
        for &i in removed {
            let o = i / (c_in_g * taps);
            let j = (i / taps) % c_in_g;
            let c = (o / out_per_group) * c_in_g + j;
            delta[o] += w[i] as f64 * mean.get(c).copied().unwrap_or(0.0) as f64;
        }
    }
    let bias = super::channels::bias_of(m, &n, c_out)?;
    let nb: Vec<f32> = bias.iter().zip(&delta).map(|(b, d)| (*b as f64 + d) as f32).collect();
    super::channels::set_bias(m, node, nb)
}

/// Fraction of exact zeros over the prunable layers' weights.
pub fn sparsity(model: &Model) -> f64 {
    let (mut zeros, mut total) = (0usize, 0usize);
    for l in layers(model) {
        if let Ok((_, w)) = weights(model, l.index) {
            zeros += w.iter().filter(|x| **x == 0.0).count();
            total += w.len();
        }
    }
    zeros as f64 / total.max(1) as f64
}
