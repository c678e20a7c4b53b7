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

/// Per-layer sparsities for an overall `sparsity` from one global threshold on layer-adaptive magnitude scores
/// (LAMP, Lee et al. 2021): a weight's score is w² over the sum of w² of the weights of its layer that are not
/// smaller, so scores are comparable across layers of very different scales and every layer keeps its largest
/// weight (a raw |w| threshold wipes out whole small-scale layers, e.g. depthwise convolutions).
pub fn global_targets(model: &Model, sparsity: f64) -> Result<BTreeMap<String, f64>, PruneError> {
    let ls = layers(model);
    let mut per_layer: Vec<Vec<f64>> = Vec::with_capacity(ls.len());
    for l in &ls {
        let mut sq: Vec<f64> = weights(model, l.index)?.1.iter().map(|x| (*x as f64).powi(2)).collect();
        sq.sort_by(f64::total_cmp);
        let mut tail = 0f64;
        let mut scores = vec![0f64; sq.len()];
        for i in (0..sq.len()).rev() {
            tail += sq[i];
            scores[i] = if tail > 0.0 { sq[i] / tail } else { 0.0 };
        }
        per_layer.push(scores);
    }
    let mut all: Vec<f64> = per_layer.iter().flatten().copied().collect();
    if all.is_empty() {
        return Ok(BTreeMap::new());
    }
    let k = (((all.len() as f64) * sparsity.clamp(0.0, 1.0)).round() as usize).min(all.len());
    if k == 0 {
        return Ok(ls.iter().map(|l| (l.node.clone(), 0.0)).collect());
    }
    let (_, t, _) = all.select_nth_unstable_by(k - 1, f64::total_cmp);
    let threshold = *t;
    Ok(ls
        .iter()
        .zip(&per_layer)
        .map(|(l, s)| {
            let below = s.iter().filter(|&&x| x <= threshold).count();
            (l.node.clone(), below as f64 / s.len().max(1) as f64)
        })
        .collect())
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
        let n = m.graph.nodes[l.index].clone();
        // A linear layer over channels (1×1 Conv, Gemm with transB) with second moments of its input: optimal
        // brain surgeon pruning, the kept weights updated to rebuild the layer's output on the samples.
        let over_channels = match n.op() {
            "Conv" => dims.len() == 4 && dims[2] == 1 && dims[3] == 1 && n.attr_i("group").unwrap_or(1) == 1,
            "Gemm" => n.attr_i("transB").unwrap_or(0) != 0 && dims.len() == 2,
            _ => false,
        };
        if over_channels
            && let Some(st) = stats.and_then(|st| st.get(&n.input[0]))
            && obs_prune(&mut w, dims[0], dims[1], st, k)
        {
            set_weights(&mut m, l.index, dims, w)?;
            continue;
        }
        let mut order: Vec<usize> = (0..w.len()).collect();
        order.select_nth_unstable_by(k - 1, |&a, &b| w[a].abs().total_cmp(&w[b].abs()).then(a.cmp(&b)));
        let removed: Vec<usize> = order[..k].to_vec();
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

/// Prunes `k` of the weights of `w` (rows = outputs, columns = input channels) by optimal brain surgeon with the
/// input's second moments H = E[x·xᵀ] (+1 % ridge), as SparseGPT does for one layer: each weight's saliency is
/// w²/[U]ⱼⱼ² with U the upper Cholesky factor of H⁻¹; the k least salient go, and walking the columns in order,
/// each removed weight's error is spread over the later columns of its row (U's row j; later weights to be
/// removed take their share too, and pass it on when their turn comes). Uncentred moments, so the
/// output mean is kept too (no separate bias correction). False (nothing done) without usable moments.
fn obs_prune(w: &mut [f32], rows: usize, cols: usize, st: &super::stats::Channel, k: usize) -> bool {
    let c = cols;
    if st.second.len() != c * c || (st.second_samples as usize) < c || w.len() != rows * c {
        return false;
    }
    let mut h: Vec<f64> = st.second.clone();
    let diag = (0..c).map(|j| h[j * c + j].max(0.0)).sum::<f64>() / c as f64;
    let dead: Vec<bool> = (0..c).map(|j| h[j * c + j] <= 0.0).collect();
    for j in 0..c {
        h[j * c + j] += 0.01 * diag.max(1e-12);
    }
    // H⁻¹, then its upper Cholesky factor U (H⁻¹ = UᵀU): U = Lᵀ for H⁻¹ = L·Lᵀ.
    let mut hinv: Vec<f64> = (0..c * c).map(|i| if i / c == i % c { 1.0 } else { 0.0 }).collect();
    if !super::channels::cholesky_solve(&mut h, c, &mut hinv) || !super::channels::cholesky(&mut hinv, c) {
        return false;
    }
    let u = |i: usize, j: usize| hinv[j * c + i]; // U[i][j] = L[j][i]
    let mut order: Vec<usize> = (0..w.len()).collect();
    let sal = |i: usize| {
        let j = i % c;
        if dead[j] { -1.0 } else { (w[i] as f64 / u(j, j)).powi(2) }
    };
    order.select_nth_unstable_by(k - 1, |&a, &b| sal(a).total_cmp(&sal(b)).then(a.cmp(&b)));
    let mut prune = vec![false; w.len()];
    for &i in &order[..k] {
        prune[i] = true;
    }
    for r in 0..rows {
        let row = &mut w[r * c..(r + 1) * c];
        let mask = &prune[r * c..(r + 1) * c];
        for j in 0..c {
            if !mask[j] {
                continue;
            }
            let e = row[j] as f64 / u(j, j);
            for (q, x) in row.iter_mut().enumerate().skip(j + 1) {
                *x = (*x as f64 - e * u(j, q)) as f32;
            }
            row[j] = 0.0;
        }
    }
    true
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
