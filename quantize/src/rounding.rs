//! Weight rounding fitted to calibration data: label-free post-training quantization beyond round-to-nearest.
//!
//! Round-to-nearest treats every weight alone, yet a layer's output error is `(W − Ŵ)·x`: what counts is the error
//! on the inputs the layer really sees. From the fp32 inputs of every weighted layer on calibration samples this
//! module gathers `H = E[x xᵀ]` (the second moment of the input patches: im2col rows for a Conv, input rows for a
//! Gemm/MatMul) and `μ = E[x]`, then:
//! - **GPTQ** (Frantar et al. 2022: the Optimal Brain Quantizer's column-by-column form, AdaRound's objective
//!   `E‖(W − Ŵ)x‖²` solved greedily): quantize one input column at a time and spread its rounding error onto the
//!   columns not quantized yet along `H⁻¹`'s Cholesky factor, per output channel;
//! - **bias correction** (Nagel et al. 2019, the empirical form): add `(W − Ŵ)·μ` to each channel's bias so the
//!   layer's mean output is what the fp32 layer gives.
//!
//! Scales stay those of the plain pass (per channel, or per block of weights for 4-bit), so the file's format does
//! not change; only which integer each weight becomes. Zeros of a pruned weight stay zero (their error still flows
//! to the other columns, as in SparseGPT). Cross-layer equalization is not done: it evens out per-tensor weight
//! ranges, which per-channel (and per-block) scales already fit one channel at a time.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use edgepack_runtime::Session;
use edgepack_runtime::onnx::passes::tensor_f32_values;
use edgepack_runtime::onnx::{Model, NodeExt, NodeProto, TensorProto};
use edgepack_runtime::process::ImagePreprocess;

use crate::calib::CalibError;
use crate::data::Dataset;

/// GPTQ's damping: this fraction of the mean diagonal of `H` is added to its diagonal.
const DAMP: f64 = 0.01;
/// Input rows (patches) a layer needs per reduction column before GPTQ is trusted over round-to-nearest: fewer
/// rows leave `H` rank-deficient and the rounding fits the calibration samples, not the layer.
const ROWS_PER_COLUMN: f64 = 2.0;
/// Multiply-adds spent per layer and sample on `H` (positions are subsampled beyond it).
const MACS_PER_SAMPLE: usize = 1 << 24;

/// How a weighted layer reads its input.
#[derive(Debug, Clone)]
enum Geometry {
    /// NCHW (or NCL) Conv: groups, kernel, strides, dilations, begin/end pads, `auto_pad`.
    Conv {
        groups: usize,
        kernel: [usize; 2],
        strides: [usize; 2],
        dilations: [usize; 2],
        pads: [usize; 4],
        auto_pad: String,
        one_d: bool,
    },
    /// Gemm / MatMul: rows of the input's last axis.
    Linear,
}

/// A weighted layer as output channels (rows) × reduction columns, in groups that share an input slice.
#[derive(Debug, Clone)]
struct Layer {
    geom: Geometry,
    input: String,
    rows: usize,
    /// Reduction length of one group (Cin/groups · kernel area, or K).
    d: usize,
    groups: usize,
    /// Weight element (r, j) at `r·d + j` (Conv, Gemm with transB) or `j·rows + r` (MatMul, Gemm).
    row_major: bool,
}

impl Layer {
    fn index(&self, r: usize, j: usize) -> usize {
        if self.row_major { r * self.d + j } else { j * self.rows + r }
    }
}

/// Running sums of the input patches of one group.
#[derive(Debug, Clone)]
struct Moments {
    /// Upper triangle of Σ x xᵀ (d × d, row-major).
    h: Vec<f64>,
    sum: Vec<f64>,
    n: f64,
}

impl Moments {
    fn new(d: usize) -> Self {
        Moments { h: vec![0.0; d * d], sum: vec![0.0; d], n: 0.0 }
    }

    fn add(&mut self, p: &[f32]) {
        let d = p.len();
        self.n += 1.0;
        for i in 0..d {
            let pi = p[i] as f64;
            if pi == 0.0 {
                continue; // after a ReLU most patches are sparse
            }
            self.sum[i] += pi;
            let row = &mut self.h[i * d + i..i * d + d];
            for (h, &pj) in row.iter_mut().zip(&p[i..]) {
                *h += pi * pj as f64;
            }
        }
    }
}

/// Quantized weights fitted to the calibration inputs: the integers in the weight's own layout, and what to add
/// to each output channel's bias.
#[derive(Debug, Clone)]
pub struct Refined {
    pub q: Vec<i8>,
    pub bias_delta: Vec<f32>,
    /// Whether GPTQ ran (false: round-to-nearest, too few input rows or `H` not positive definite).
    pub gptq: bool,
}

/// Which refinements to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Methods {
    pub gptq: bool,
    pub bias_correction: bool,
    /// Statistics layer after layer on the partly quantized model ([`Refiner::collect_sequential`]), not all at
    /// once on the fp32 model.
    pub sequential: bool,
}

impl Methods {
    pub const NEAREST: Methods = Methods { gptq: false, bias_correction: false, sequential: false };
    pub const BIAS_CORRECTION: Methods = Methods { gptq: false, bias_correction: true, sequential: false };
    pub const GPTQ_BIAS_CORRECTION: Methods = Methods { gptq: true, bias_correction: true, sequential: false };
    pub const SEQUENTIAL: Methods = Methods { gptq: true, bias_correction: true, sequential: true };
}

impl std::fmt::Display for Methods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match (self.gptq, self.bias_correction) {
            (true, true) => "gptq+bias-correction",
            (true, false) => "gptq",
            (false, true) => "bias-correction",
            (false, false) => "nearest",
        })?;
        if self.sequential { f.write_str(" (layer by layer)") } else { Ok(()) }
    }
}

/// A refinement's cache key: the node, the grid's `qmax`, and the bits of its first and last elements' scales.
type RefineKey = (String, i32, [u32; 2]);

/// The input statistics of a model's weighted layers and the rounding they lead to (cached per node, so the
/// mixed-precision search, which rebuilds the model many times, fits each layer once).
pub struct Refiner {
    layers: Arc<RwLock<Stats>>,
    pub methods: Methods,
    cache: Mutex<HashMap<RefineKey, Arc<Refined>>>,
}

impl std::fmt::Debug for Refiner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Refiner({} layers, {})", self.len(), self.methods)
    }
}

fn ints(n: &NodeProto, name: &str) -> Vec<usize> {
    n.attr(name).map(|a| a.ints.iter().map(|&v| v.max(0) as usize).collect()).unwrap_or_default()
}

/// The layer a node is, when its weight is an f32 initializer this module can fit.
fn layer_of(n: &NodeProto, inits: &HashMap<&str, &TensorProto>) -> Option<Layer> {
    let w = inits.get(n.input.get(1)?.as_str())?;
    let input = n.input.first().filter(|x| !x.is_empty() && !inits.contains_key(x.as_str()))?.clone();
    let dims: Vec<usize> = w.dims.iter().map(|&d| d.max(0) as usize).collect();
    if w.data_type != Some(1) || dims.contains(&0) {
        return None;
    }
    match n.op() {
        "Conv" if dims.len() == 4 || dims.len() == 3 => {
            let one_d = dims.len() == 3;
            let groups = n.attr_i("group").unwrap_or(1).max(1) as usize;
            let (kh, kw) = if one_d { (1, dims[2]) } else { (dims[2], dims[3]) };
            let two = |v: Vec<usize>, dflt: usize| -> [usize; 2] {
                match (one_d, v.as_slice()) {
                    (true, [a]) => [1, *a],
                    (false, [a, b]) => [*a, *b],
                    _ => [dflt, dflt],
                }
            };
            let p = ints(n, "pads");
            let pads = match (one_d, p.as_slice()) {
                (true, [a, b]) => [0, *a, 0, *b],
                (false, [a, b, c, d]) => [*a, *b, *c, *d],
                _ => [0; 4],
            };
            if !dims[0].is_multiple_of(groups) {
                return None;
            }
            Some(Layer {
                geom: Geometry::Conv {
                    groups,
                    kernel: [kh, kw],
                    strides: two(ints(n, "strides"), 1),
                    dilations: two(ints(n, "dilations"), 1),
                    pads,
                    auto_pad: n.attr_s("auto_pad").unwrap_or("NOTSET").to_string(),
                    one_d,
                },
                input,
                rows: dims[0],
                d: dims[1] * kh * kw,
                groups,
                row_major: true,
            })
        }
        "Gemm" if dims.len() == 2 && n.attr_i("transA").unwrap_or(0) == 0 => {
            let t = n.attr_i("transB").unwrap_or(0) == 1;
            let (rows, d) = if t { (dims[0], dims[1]) } else { (dims[1], dims[0]) };
            Some(Layer { geom: Geometry::Linear, input, rows, d, groups: 1, row_major: t })
        }
        "MatMul" if dims.len() == 2 => {
            Some(Layer { geom: Geometry::Linear, input, rows: dims[1], d: dims[0], groups: 1, row_major: false })
        }
        _ => None,
    }
}

/// Begin/end padding of one spatial axis for `auto_pad`.
fn auto_pads(mode: &str, size: usize, k: usize, s: usize, dil: usize, explicit: [usize; 2]) -> [usize; 2] {
    match mode {
        "SAME_UPPER" | "SAME_LOWER" => {
            let out = size.div_ceil(s);
            let ek = (k - 1) * dil + 1;
            let total = ((out - 1) * s + ek).saturating_sub(size);
            let small = total / 2;
            if mode == "SAME_UPPER" { [small, total - small] } else { [total - small, small] }
        }
        "VALID" => [0, 0],
        _ => explicit,
    }
}

impl Layer {
    /// Adds this sample's input patches (subsampled to the work cap) to `m`. `x`: the input tensor, `shape` its
    /// dims. `salt` varies which positions a subsample takes from sample to sample.
    fn accumulate(&self, m: &mut [Moments], x: &[f32], shape: &[usize], salt: usize) {
        let cap = (MACS_PER_SAMPLE / (self.d * self.d).max(1)).clamp(16, 4096);
        let mut patch = vec![0f32; self.d];
        match &self.geom {
            Geometry::Linear => {
                let k = self.d;
                if shape.last() != Some(&k) || !x.len().is_multiple_of(k) {
                    return;
                }
                let rows = x.len() / k;
                let step = rows.div_ceil(cap).max(1);
                let mut r = salt % step;
                while r < rows {
                    m[0].add(&x[r * k..(r + 1) * k]);
                    r += step;
                }
            }
            Geometry::Conv { groups, kernel, strides, dilations, pads, auto_pad, one_d } => {
                let (n, c, h, w) = match (one_d, shape) {
                    (true, [n, c, l]) => (*n, *c, 1, *l),
                    (false, [n, c, h, w]) => (*n, *c, *h, *w),
                    _ => return,
                };
                let cg = c / groups;
                if cg * kernel[0] * kernel[1] != self.d || !c.is_multiple_of(*groups) {
                    return;
                }
                let [kh, kw] = *kernel;
                let ph = auto_pads(auto_pad, h, kh, strides[0], dilations[0], [pads[0], pads[2]]);
                let pw = auto_pads(auto_pad, w, kw, strides[1], dilations[1], [pads[1], pads[3]]);
                let span = |size: usize, p: [usize; 2], k: usize, s: usize, dil: usize| {
                    ((size + p[0] + p[1]).saturating_sub((k - 1) * dil + 1)) / s + 1
                };
                let oh = span(h, ph, kh, strides[0], dilations[0]);
                let ow = span(w, pw, kw, strides[1], dilations[1]);
                let positions = n * oh * ow;
                let step = positions.div_ceil(cap).max(1);
                for (gi, mg) in m.iter_mut().enumerate() {
                    let mut pos = (salt + gi) % step;
                    while pos < positions {
                        let (b, oy, ox) = (pos / (oh * ow), (pos / ow) % oh, pos % ow);
                        for ci in 0..cg {
                            let plane = &x[(b * c + gi * cg + ci) * h * w..][..h * w];
                            for ky in 0..kh {
                                let iy = (oy * strides[0] + ky * dilations[0]) as isize - ph[0] as isize;
                                for kx in 0..kw {
                                    let ix = (ox * strides[1] + kx * dilations[1]) as isize - pw[0] as isize;
                                    let inside = iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w;
                                    patch[(ci * kh + ky) * kw + kx] =
                                        if inside { plane[iy as usize * w + ix as usize] } else { 0.0 };
                                }
                            }
                        }
                        mg.add(&patch);
                        pos += step;
                    }
                }
            }
        }
    }
}

type Stats = HashMap<String, Arc<(Layer, Vec<Moments>)>>;

/// The input moments of `nodes` (those this module can fit) of `model` on `samples` of `data`, run by `session`.
#[allow(clippy::too_many_arguments)]
fn gather(
    model: &Model,
    session: &Session,
    nodes: &[String],
    data: &Dataset,
    samples: std::ops::Range<usize>,
    pre: Option<&ImagePreprocess>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Stats, CalibError> {
    let inits: HashMap<&str, &TensorProto> = model.graph.initializers_by_name();
    let mut layers: HashMap<String, (Layer, Vec<Moments>)> = model
        .graph
        .nodes
        .iter()
        .filter(|n| nodes.iter().any(|x| x == n.name()))
        .filter_map(|n| {
            let l = layer_of(n, &inits)?;
            let m = (0..l.groups).map(|_| Moments::new(l.d)).collect();
            Some((n.name().to_string(), (l, m)))
        })
        .collect();
    let mut inputs: Vec<String> = layers.values().map(|(l, _)| l.input.clone()).collect();
    inputs.sort();
    inputs.dedup();
    let mut done = 0;
    crate::feeds::visit_samples(
        session,
        data,
        samples,
        pre,
        &inputs,
        |outs| {
            let values: HashMap<&str, (Vec<f32>, Vec<usize>)> =
                outs.iter().map(|(name, t)| (name.as_str(), (t.to_f32_vec(), t.shape().to_vec()))).collect();
            for (layer, moments) in layers.values_mut() {
                if let Some((v, shape)) = values.get(layer.input.as_str()) {
                    layer.accumulate(moments, v, shape, done);
                }
            }
            done += 1;
        },
        progress,
    )?;
    Ok(layers.into_iter().filter(|(_, (_, m))| m.iter().all(|g| g.n > 0.0)).map(|(k, v)| (k, Arc::new(v))).collect())
}

impl Refiner {
    /// Gathers the input moments of `nodes` (those this module can fit) on `samples` of `data`, running the fp32
    /// `session` of `model`. `progress(done, total)` after each sample.
    #[allow(clippy::too_many_arguments)]
    pub fn collect(
        model: &Model,
        session: &Session,
        nodes: &[String],
        data: &Dataset,
        samples: std::ops::Range<usize>,
        pre: Option<&ImagePreprocess>,
        methods: Methods,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Refiner, CalibError> {
        let layers = gather(model, session, nodes, data, samples, pre, &mut progress)?;
        Ok(Refiner { layers: Arc::new(RwLock::new(layers)), methods, cache: Mutex::new(HashMap::new()) })
    }

    /// GPTQ as its authors run it, layer after layer: each weighted layer of `units` (graph order) is fitted to the
    /// inputs it gets when every layer before it is already quantized (and fitted), the later ones fp32, so it
    /// also absorbs what the earlier layers' rounding changed in its input. One model build and one pass over
    /// the samples per layer. `cfg`: the pass's configuration (without a refiner). `progress(done, layers)`.
    #[allow(clippy::too_many_arguments)]
    pub fn collect_sequential(
        model: &Model,
        ranges: &HashMap<String, crate::qdq::Range>,
        cfg: &crate::qdq::QdqConfig,
        units: &[(String, String)],
        opts: &edgepack_runtime::SessionOptions,
        data: &Dataset,
        samples: std::ops::Range<usize>,
        pre: Option<&ImagePreprocess>,
        methods: Methods,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Refiner, CalibError> {
        let refiner = Arc::new(Refiner {
            layers: Arc::new(RwLock::new(HashMap::new())),
            methods,
            cache: Mutex::new(HashMap::new()),
        });
        let inits: HashMap<&str, &TensorProto> = model.graph.initializers_by_name();
        let weighted: Vec<usize> = (0..units.len())
            .filter(|&i| model.graph.nodes.iter().any(|n| n.name() == units[i].0 && layer_of(n, &inits).is_some()))
            .collect();
        for (done, &i) in weighted.iter().enumerate() {
            let mut c = cfg.clone();
            c.refiner = Some(refiner.clone());
            c.exclude.extend(units[i..].iter().map(|(n, _)| n.clone()));
            let (m, _) = crate::qdq::quantize(model, ranges, &c).map_err(|e| CalibError::Invalid(e.to_string()))?;
            let session = Session::from_model(&m, opts)?;
            let stats =
                gather(&m, &session, std::slice::from_ref(&units[i].0), data, samples.clone(), pre, &mut |_, _| {})?;
            if let Ok(mut l) = refiner.layers.write() {
                l.extend(stats);
            }
            progress(done + 1, weighted.len());
        }
        let layers = refiner.layers.clone();
        let cache = refiner.cache.lock().map(|c| c.clone()).unwrap_or_default();
        Ok(Refiner { layers, methods, cache: Mutex::new(cache) })
    }

    /// The same statistics with other methods (and a fresh cache).
    pub fn with_methods(&self, methods: Methods) -> Refiner {
        Refiner { layers: self.layers.clone(), methods, cache: Mutex::new(HashMap::new()) }
    }

    /// Layers with statistics.
    pub fn len(&self) -> usize {
        self.layers.read().map(|l| l.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Quantizes `node`'s weight `w` (its initializer's layout) to integers in `[qmin, qmax]` at the scale
    /// `scale_of(element index)` with the configured methods; `None` when the node has no statistics. Cached per
    /// node and grid (`qmax` and the first and last elements' scales: int8 and the coarser coded grid share `qmax`).
    pub fn refine(
        &self,
        node: &str,
        w: &[f32],
        scale_of: &dyn Fn(usize) -> f32,
        qmin: i32,
        qmax: i32,
    ) -> Option<Arc<Refined>> {
        let ends = [scale_of(0).to_bits(), scale_of(w.len().saturating_sub(1)).to_bits()];
        let key = (node.to_string(), qmax, ends);
        if let Some(r) = self.cache.lock().ok()?.get(&key) {
            return Some(r.clone());
        }
        let stats = self.layers.read().ok()?.get(node)?.clone();
        let (layer, moments) = &*stats;
        if w.len() != layer.rows * layer.d {
            return None;
        }
        let r = Arc::new(fit(layer, moments, w, scale_of, qmin, qmax, self.methods));
        self.cache.lock().ok()?.insert(key, r.clone());
        Some(r)
    }
}

/// Round-to-nearest of one weight, zeros kept.
fn nearest(v: f64, s: f64, qmin: i32, qmax: i32) -> i32 {
    (v / s).round().clamp(qmin as f64, qmax as f64) as i32
}

fn fit(
    layer: &Layer,
    moments: &[Moments],
    w: &[f32],
    scale_of: &dyn Fn(usize) -> f32,
    qmin: i32,
    qmax: i32,
    methods: Methods,
) -> Refined {
    let d = layer.d;
    let rows_g = layer.rows / layer.groups;
    let mut q = vec![0i8; w.len()];
    let mut bias_delta = vec![0f32; layer.rows];
    let mut used_gptq = false;
    for (gi, m) in moments.iter().enumerate() {
        // Columns in order of decreasing input energy (GPTQ's "act order"): the columns that matter most are
        // rounded first, while the most columns remain to absorb their error.
        let mut perm: Vec<usize> = (0..d).collect();
        perm.sort_by(|&a, &b| m.h[b * d + b].total_cmp(&m.h[a * d + a]));
        let factor = (methods.gptq && m.n >= ROWS_PER_COLUMN * d as f64).then(|| inverse_factor(m, d, &perm)).flatten();
        used_gptq |= factor.is_some();
        let mean: Vec<f64> = perm.iter().map(|&c| m.sum[c] / m.n.max(1.0)).collect();
        let mut row = vec![0f64; d];
        for r in gi * rows_g..(gi + 1) * rows_g {
            for (v, &c) in row.iter_mut().zip(&perm) {
                *v = w[layer.index(r, c)] as f64;
            }
            let mut delta = 0f64;
            for j in 0..d {
                let idx = layer.index(r, perm[j]);
                let s = (scale_of(idx) as f64).max(f64::MIN_POSITIVE);
                let qi = if w[idx] == 0.0 { 0 } else { nearest(row[j], s, qmin, qmax) };
                q[idx] = qi as i8;
                delta += (w[idx] as f64 - qi as f64 * s) * mean[j];
                if let Some(u) = &factor {
                    // Spread this column's error over the columns still to quantize.
                    let urow = &u[j * d..(j + 1) * d];
                    let err = (row[j] - qi as f64 * s) / urow[j];
                    for (v, &uk) in row[j + 1..].iter_mut().zip(&urow[j + 1..]) {
                        *v -= err * uk;
                    }
                }
            }
            if methods.bias_correction {
                bias_delta[r] = delta as f32;
            }
        }
    }
    Refined { q, bias_delta, gptq: used_gptq }
}

/// The upper Cholesky factor `U` of `H⁻¹` (`H⁻¹ = UᵀU`, row-major d × d) of the damped second moment with its
/// columns in the order `perm`; `None` when `H` is not positive definite even after more damping.
fn inverse_factor(m: &Moments, d: usize, perm: &[usize]) -> Option<Vec<f64>> {
    let mut h = vec![0f64; d * d];
    for i in 0..d {
        for j in i..d {
            let (a, b) = (perm[i].min(perm[j]), perm[i].max(perm[j]));
            let v = m.h[a * d + b] / m.n;
            h[i * d + j] = v;
            h[j * d + i] = v;
        }
    }
    // Inputs never seen non-zero: their weights cannot matter here; an identity row keeps H invertible and sends
    // no error through them.
    for i in 0..d {
        if h[i * d + i] <= 0.0 {
            for j in 0..d {
                h[i * d + j] = 0.0;
                h[j * d + i] = 0.0;
            }
            h[i * d + i] = 1.0;
        }
    }
    let mean_diag = (0..d).map(|i| h[i * d + i]).sum::<f64>() / d as f64;
    for damp in [DAMP, DAMP * 10.0, DAMP * 100.0] {
        let mut hd = h.clone();
        for i in 0..d {
            hd[i * d + i] += damp * mean_diag;
        }
        let Some(l) = cholesky(&hd, d) else { continue };
        let linv = lower_inverse(&l, d);
        // H⁻¹ = L⁻ᵀ L⁻¹
        let mut hinv = vec![0f64; d * d];
        for k in 0..d {
            let lk = &linv[k * d..(k + 1) * d];
            for i in 0..=k {
                let a = lk[i];
                if a == 0.0 {
                    continue;
                }
                for (h, &b) in hinv[i * d..i * d + k + 1].iter_mut().zip(&lk[..=k]) {
                    *h += a * b;
                }
            }
        }
        for i in 0..d {
            for j in 0..i {
                hinv[i * d + j] = hinv[j * d + i];
            }
        }
        let Some(l2) = cholesky(&hinv, d) else { continue };
        // U = L2ᵀ
        let mut u = vec![0f64; d * d];
        for i in 0..d {
            for j in 0..=i {
                u[j * d + i] = l2[i * d + j];
            }
        }
        return Some(u);
    }
    None
}

/// Lower Cholesky factor of a symmetric positive definite matrix (row-major), `None` if not positive definite.
fn cholesky(a: &[f64], d: usize) -> Option<Vec<f64>> {
    let mut l = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let s: f64 = l[i * d..i * d + j].iter().zip(&l[j * d..j * d + j]).map(|(x, y)| x * y).sum();
            let v = a[i * d + j] - s;
            if i == j {
                if v <= 0.0 || !v.is_finite() {
                    return None;
                }
                l[i * d + i] = v.sqrt();
            } else {
                l[i * d + j] = v / l[j * d + j];
            }
        }
    }
    Some(l)
}

/// Inverse of a lower-triangular matrix (row-major).
fn lower_inverse(l: &[f64], d: usize) -> Vec<f64> {
    let mut inv = vec![0f64; d * d];
    for i in 0..d {
        inv[i * d + i] = 1.0 / l[i * d + i];
        for j in 0..i {
            let s: f64 = (j..i).map(|k| l[i * d + k] * inv[k * d + j]).sum();
            inv[i * d + j] = -s / l[i * d + i];
        }
    }
    inv
}

/// The f32 values of a node's weight initializer (for tests and callers that hold the model).
pub fn weight_values(model: &Model, node: &str) -> Option<Vec<f32>> {
    let n = model.graph.nodes.iter().find(|n| n.name() == node)?;
    let w = model.graph.initializers.iter().find(|t| t.name.as_deref() == n.input.get(1).map(String::as_str))?;
    tensor_f32_values(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moments_of(rows: &[Vec<f32>]) -> Moments {
        let mut m = Moments::new(rows[0].len());
        for r in rows {
            m.add(r);
        }
        m
    }

    /// A tiny deterministic generator (xorshift) for test data.
    fn noise(seed: &mut u64) -> f32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        (*seed % 20001) as f32 / 10000.0 - 1.0
    }

    #[test]
    fn inverse_factor_is_the_cholesky_factor_of_the_inverse() {
        let mut seed = 7;
        let rows: Vec<Vec<f32>> = (0..64).map(|_| (0..6).map(|_| noise(&mut seed)).collect()).collect();
        let m = moments_of(&rows);
        let d = 6;
        let u = inverse_factor(&m, d, &(0..d).collect::<Vec<_>>()).unwrap();
        // (UᵀU) · H_damped = I
        let mut h = vec![0f64; d * d];
        for i in 0..d {
            for j in i..d {
                h[i * d + j] = m.h[i * d + j] / m.n;
                h[j * d + i] = h[i * d + j];
            }
        }
        let md = (0..d).map(|i| h[i * d + i]).sum::<f64>() / d as f64;
        for i in 0..d {
            h[i * d + i] += DAMP * md;
        }
        // H⁻¹ = UᵀU; (UᵀU)·H = I.
        let hinv: Vec<f64> = (0..d * d).map(|ij| (0..d).map(|k| u[k * d + ij / d] * u[k * d + ij % d]).sum()).collect();
        for i in 0..d {
            for j in 0..d {
                let prod: f64 = (0..d).map(|k| hinv[i * d + k] * h[k * d + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((prod - want).abs() < 1e-8, "({i},{j}) {prod}");
            }
        }
        // U is upper triangular.
        assert!((0..d).all(|i| (0..i).all(|j| u[i * d + j] == 0.0)));
    }

    /// GPTQ lowers the output error on correlated inputs against round-to-nearest at the same scales, and bias
    /// correction removes the mean error.
    #[test]
    fn gptq_and_bias_correction_beat_nearest_on_the_layer_output() {
        let (d, rows) = (16usize, 8usize);
        let mut seed = 11;
        // Correlated, non-zero-mean inputs (as after a ReLU).
        let inputs: Vec<Vec<f32>> = (0..400)
            .map(|_| {
                let base = noise(&mut seed);
                (0..d).map(|j| (0.5 + base + 0.3 * noise(&mut seed) + 0.05 * j as f32).max(0.0)).collect()
            })
            .collect();
        let w: Vec<f32> = (0..rows * d).map(|_| noise(&mut seed) * 0.5).collect();
        let layer = Layer { geom: Geometry::Linear, input: "x".into(), rows, d, groups: 1, row_major: true };
        let m = vec![moments_of(&inputs)];
        // Coarse 4-bit grid, one scale per row.
        let scales: Vec<f32> =
            (0..rows).map(|r| w[r * d..(r + 1) * d].iter().fold(0f32, |a, v| a.max(v.abs())) / 7.0).collect();
        let scale_of = |i: usize| scales[i / d];
        let err = |r: &Refined| -> (f64, f64) {
            let (mut sq, mut mean) = (0f64, 0f64);
            for x in &inputs {
                for o in 0..rows {
                    let e: f64 = (0..d)
                        .map(|j| (w[o * d + j] - r.q[o * d + j] as f32 * scales[o]) as f64 * x[j] as f64)
                        .sum::<f64>()
                        - r.bias_delta[o] as f64;
                    sq += e * e;
                    mean += e;
                }
            }
            (sq, (mean / (inputs.len() * rows) as f64).abs())
        };
        let run = |gptq, bias_correction| {
            fit(&layer, &m, &w, &scale_of, -8, 7, Methods { gptq, bias_correction, sequential: false })
        };
        let (rtn, g, bc) = (run(false, false), run(true, false), run(false, true));
        assert!(!rtn.gptq && g.gptq);
        assert!(err(&g).0 < 0.7 * err(&rtn).0, "gptq {:?} nearest {:?}", err(&g), err(&rtn));
        assert!(err(&bc).1 < 1e-3 && err(&bc).1 < err(&rtn).1, "{:?} {:?}", err(&bc), err(&rtn));
        // Every integer on the grid.
        assert!(g.q.iter().all(|&v| (-8..=7).contains(&v)));
    }

    #[test]
    fn pruned_zeros_stay_zero() {
        let (d, rows) = (8usize, 2usize);
        let mut seed = 3;
        let inputs: Vec<Vec<f32>> = (0..100).map(|_| (0..d).map(|_| noise(&mut seed)).collect()).collect();
        let mut w: Vec<f32> = (0..rows * d).map(|_| noise(&mut seed)).collect();
        for i in (0..w.len()).step_by(3) {
            w[i] = 0.0;
        }
        let layer = Layer { geom: Geometry::Linear, input: "x".into(), rows, d, groups: 1, row_major: false };
        let r = fit(&layer, &[moments_of(&inputs)], &w, &|_| 0.1, -127, 127, Methods::GPTQ_BIAS_CORRECTION);
        assert!(r.gptq);
        for (i, &v) in w.iter().enumerate() {
            if v == 0.0 {
                assert_eq!(r.q[i], 0);
            }
        }
    }

    #[test]
    fn conv_patches_match_the_convolution() {
        // A 3×3 conv, stride 2, pads 1, on a 1×2×5×5 input: Σ over patches of w·p equals Σ of the conv output.
        let n = edgepack_runtime::onnx::node(
            "Conv",
            "c",
            &["x", "w"],
            &["y"],
            vec![
                edgepack_runtime::onnx::builder::attr_ints("strides", &[2, 2]),
                edgepack_runtime::onnx::builder::attr_ints("pads", &[1, 1, 1, 1]),
            ],
        );
        let w = edgepack_runtime::onnx::builder::tensor_f32("w", &[1, 2, 3, 3], &[1.0; 18]);
        let inits = HashMap::from([("w", &w)]);
        let l = layer_of(&n, &inits).unwrap();
        assert_eq!((l.rows, l.d, l.groups), (1, 18, 1));
        let x: Vec<f32> = (0..50).map(|i| i as f32).collect();
        let mut m = vec![Moments::new(18)];
        l.accumulate(&mut m, &x, &[1, 2, 5, 5], 0);
        assert_eq!(m[0].n, 9.0); // 3×3 output positions
        // Σ_patches Σ_j p_j = Σ of the all-ones conv's outputs, computed directly.
        let mut want = 0f64;
        for oy in 0..3 {
            for ox in 0..3 {
                for c in 0..2 {
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let (iy, ix) = (oy as isize * 2 + ky - 1, ox as isize * 2 + kx - 1);
                            if (0..5).contains(&iy) && (0..5).contains(&ix) {
                                want += x[c * 25 + iy as usize * 5 + ix as usize] as f64;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(m[0].sum.iter().sum::<f64>(), want);
    }
}
