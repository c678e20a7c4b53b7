//! The QDQ pass: rewrites an fp32 [`Model`] into the standard QuantizeLinear/DequantizeLinear form that
//! onnxruntime (and edgepack's integer lowering) recognise:
//! - weights of Conv / Gemm / MatMul: int8, symmetric, per output channel (zero point 0), `DequantizeLinear(axis)`;
//! - biases: int32 with scale `s_x · s_w[c]`;
//! - activations read by quantizable ops (Conv, Gemm, MatMul, Add, Concat, pools...): uint8, asymmetric,
//!   per tensor, `QuantizeLinear → DequantizeLinear` placed once per value, ranges from calibration.
//!
//! Activation functions (Relu, Clip) stay in the graph; their effect reaches the ranges because the QDQ pair sits
//! after them, where the next quantized op reads.
use std::collections::{BTreeMap, HashMap, HashSet};

use edgepack_runtime::onnx::builder::{attr_int, tensor_f32, tensor_raw};
use edgepack_runtime::onnx::passes::tensor_f32_values;
use edgepack_runtime::onnx::{Model, NodeExt, NodeProto, TensorProto, node};

/// Observed range of one activation.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Range {
    pub min: f32,
    pub max: f32,
}

/// What to quantize.
#[derive(Debug, Clone, Default)]
pub struct QdqConfig {
    /// Node names or op types to keep in float.
    pub exclude: Vec<String>,
    /// When not empty, only nodes of these op types are quantized (the others stay float).
    pub op_types: Vec<String>,
    /// Per-tensor weights instead of per-channel (for comparison only).
    pub per_tensor_weights: bool,
    /// Dynamic quantization ([`crate::dynamic`]): no calibrated activations; MatMul/Gemm quantize their input per
    /// call, recurrent ops get int8 weights.
    pub dynamic: bool,
    /// int8 activations instead of uint8 (onnxruntime's S8S8 QDQ, preferred by some ARM runtimes).
    pub signed_activations: bool,
    /// Activation ranges symmetric around 0 (zero point 128 for uint8, 0 for int8).
    pub symmetric_activations: bool,
    /// Weight rounding fitted to calibration inputs (GPTQ, bias correction); `None`: round to nearest.
    pub refiner: Option<std::sync::Arc<crate::rounding::Refiner>>,
    /// Weight-only quantization ([`crate::weight_only`]): low-bit weights, activations stay float.
    pub weight_only: Option<crate::weight_only::WeightOnly>,
    /// Nodes a narrow weight-only pass keeps wider (int4 blocks: int8; the coded grid: 2 more bits), where the
    /// mixed-precision search puts the sensitive layers in that mode: their size stays small.
    pub wider: Vec<String>,
    /// The coded weight grid's bits per weight of each node, where they differ from `weight_only.bits`
    /// ([`crate::weight_only::allocate_bits`]).
    pub coded_bits: std::collections::BTreeMap<String, f64>,
}

/// An activation's quantization: scale, zero point and ONNX element type (2 = uint8, 3 = int8), widened to hold 0.
/// Symmetric: `[−m, m]` with `m = max |r|` (zero point 128 or 0), as onnxruntime's `ActivationSymmetric`.
pub fn activation_qparams(r: Range, signed: bool, symmetric: bool) -> (f32, i32, i32) {
    let ty = if signed { 3 } else { 2 };
    if !symmetric {
        let (scale, zp) = activation_params(r);
        return (scale, if signed { zp as i32 - 128 } else { zp as i32 }, ty);
    }
    let m = r.min.abs().max(r.max.abs());
    if !(m.is_finite() && m > f32::EPSILON) {
        return (1.0, if signed { 0 } else { 128 }, ty);
    }
    (2.0 * m / 255.0, if signed { 0 } else { 128 }, ty)
}

#[derive(Debug, thiserror::Error)]
pub enum QdqError {
    #[error("opset {0} is too old for per-channel QDQ (needs the default-domain opset ≥ 13)")]
    Opset(i64),
    #[error("{0}")]
    Invalid(String),
}

/// Ops with a weight input that get integer weights.
const WEIGHTED: &[&str] = &["Conv", "Gemm", "MatMul"];
/// Ops whose float activation inputs get a QDQ pair (so the integer path continues through them): every op type
/// the pass quantizes.
pub const ACTIVATION_CONSUMERS: &[&str] =
    &["Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool"];

/// Element-wise activations that read a value's dequantized form when the value is quantized for another reader.
pub const UNARY_ACTIVATIONS: &[&str] = &["Sigmoid", "HardSigmoid", "Tanh", "HardSwish", "Softplus", "Elu", "Selu"];

/// What the pass did, node by node.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct QdqSummary {
    /// Nodes whose weights are int8.
    pub quantized_weights: Vec<String>,
    /// Activations given a QDQ pair.
    pub quantized_activations: Vec<String>,
    /// Nodes left in float, with the reason.
    pub skipped: BTreeMap<String, String>,
    /// Quantizable nodes kept in float by the configuration (`--exclude` or mixed precision).
    pub excluded: Vec<String>,
    /// `Max(x, -f32::MAX)` guards placed in front of fp32 Conv/Gemm nodes (see `quantize`).
    pub fp32_guards: usize,
    /// Nodes whose weights are 4-bit (weight-only; the others of `quantized_weights` are int8).
    pub int4_weights: Vec<String>,
    /// Nodes whose weights are on the coded grid (weight-only; int8 storage of a coarser step).
    pub coded_weights: Vec<String>,
}

/// Compute-heavy ops this pass leaves in float, with the reason the report gives.
fn float_reason(op: &str) -> Option<&'static str> {
    Some(match op {
        "If" | "Loop" | "Scan" => "control flow: the node and its subgraphs stay fp32",
        "LSTM" | "GRU" | "RNN" => "recurrent op: no QDQ form here, stays fp32",
        "ConvTranspose" => "ConvTranspose is not quantized yet, stays fp32",
        "Einsum" | "Attention" | "LayerNormalization" | "InstanceNormalization" => "not quantized, stays fp32",
        "BatchNormalization" => "BatchNormalization not after a Conv (not folded), stays fp32",
        _ => return None,
    })
}

/// Compute-heavy nodes the pass leaves in float, with the reason.
pub fn float_nodes(model: &Model) -> BTreeMap<String, String> {
    model.graph.nodes.iter().filter_map(|n| Some((n.name().to_string(), float_reason(n.op())?.to_string()))).collect()
}

/// The decode tail of a detection head that joins values of very different ranges in one output: for each graph
/// output made by a Concat whose inputs' calibrated magnitudes differ by `MIXED_RANGE_RATIO` or more (YOLO's box
/// coordinates in pixels, hundreds, beside class scores in 0..1), the nodes computing it after the last weighted
/// layers (Conv, Gemm, MatMul: those stay quantized). One 8-bit scale for such a tensor leaves the scores a handful
/// of levels; quantized one op before (the DFL decode's Sub/Add/Div, the stride Mul) the boxes lose pixels. Kept in
/// float they cost nothing the integer kernels would save. Returns (output, ratio, node names).
pub fn mixed_range_tails(model: &Model, ranges: &HashMap<String, Range>) -> Vec<(String, f32, Vec<String>)> {
    let g = &model.graph;
    let producers = g.producers();
    let weighted = |n: &NodeProto| matches!(n.op(), "Conv" | "ConvTranspose" | "Gemm" | "MatMul");
    let mut out = Vec::new();
    for o in g.outputs.iter().filter_map(|o| o.name.as_deref()) {
        let Some(&ni) = producers.get(o) else { continue };
        let concat = &g.nodes[ni];
        if concat.op() != "Concat" {
            continue;
        }
        let mags: Vec<f32> = concat
            .input
            .iter()
            .filter_map(|i| ranges.get(i))
            .map(|r| r.min.abs().max(r.max.abs()))
            .filter(|m| m.is_finite())
            .collect();
        let (lo, hi) = mags.iter().fold((f32::INFINITY, 0f32), |(lo, hi), &m| (lo.min(m), hi.max(m)));
        if mags.len() < 2 || lo <= 0.0 || hi / lo < MIXED_RANGE_RATIO {
            continue;
        }
        let mut names = Vec::new();
        let mut seen = HashSet::new();
        let mut stack = vec![ni];
        while let Some(k) = stack.pop() {
            if !seen.insert(k) {
                continue;
            }
            let n = &g.nodes[k];
            names.push(n.name().to_string());
            for i in &n.input {
                if let Some(&p) = producers.get(i.as_str())
                    && !weighted(&g.nodes[p])
                {
                    stack.push(p);
                }
            }
        }
        names.sort();
        out.push((o.to_string(), hi / lo, names));
    }
    out
}

/// Magnitude ratio between the inputs of an output Concat above which its decode tail stays float.
pub const MIXED_RANGE_RATIO: f32 = 32.0;

/// The nodes the pass would quantize (name, op type), in graph order: the units of sensitivity analysis and of
/// mixed precision (keeping a node in fp32 = excluding it by name).
pub fn quantizable_nodes(model: &Model, cfg: &QdqConfig) -> Vec<(String, String)> {
    if cfg.dynamic {
        return crate::dynamic::quantizable_nodes(model, cfg);
    }
    if cfg.weight_only.is_some() {
        return crate::weight_only::quantizable_nodes(model, cfg);
    }
    let acts: HashSet<String> = activations_to_calibrate(model, cfg).into_iter().collect();
    model
        .graph
        .nodes
        .iter()
        .filter(|n| ACTIVATION_CONSUMERS.contains(&n.op()) && !excluded(cfg, n))
        .filter(|n| n.real_inputs().iter().any(|i| acts.contains(*i)))
        .map(|n| (n.name().to_string(), n.op().to_string()))
        .collect()
}

/// The nodes `cfg` does not exclude for which `takes(node, initializers by name)` holds (name, op type), in graph
/// order: the units of the dynamic and weight-only passes.
pub(crate) fn nodes_taken(
    model: &Model,
    cfg: &QdqConfig,
    takes: impl Fn(&NodeProto, &HashMap<&str, &TensorProto>) -> bool,
) -> Vec<(String, String)> {
    let inits: HashMap<&str, &TensorProto> = model.graph.initializers_by_name();
    model
        .graph
        .nodes
        .iter()
        .filter(|n| !excluded(cfg, n) && takes(n, &inits))
        .map(|n| (n.name().to_string(), n.op().to_string()))
        .collect()
}

/// Whether `cfg` keeps `n` in float (by name, op type, or not among its op types).
pub fn is_excluded(cfg: &QdqConfig, n: &NodeProto) -> bool {
    excluded(cfg, n)
}

fn excluded(cfg: &QdqConfig, n: &NodeProto) -> bool {
    cfg.exclude.iter().any(|e| e == n.name() || e == n.op())
        || (!cfg.op_types.is_empty() && !cfg.op_types.iter().any(|t| t == n.op()))
}

/// The float activations whose ranges the pass needs (inputs of quantizable ops that are not initializers).
pub fn activations_to_calibrate(model: &Model, cfg: &QdqConfig) -> Vec<String> {
    if cfg.dynamic || cfg.weight_only.is_some() {
        return vec![];
    }
    let inits: HashSet<&str> = model.graph.initializers.iter().filter_map(|t| t.name.as_deref()).collect();
    // Element types from the ops' typing rules: shape arithmetic (Shape → Gather → Concat...) is not an activation.
    let types = model.graph.infer_elem_types();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for n in &model.graph.nodes {
        if !ACTIVATION_CONSUMERS.contains(&n.op()) || excluded(cfg, n) {
            continue;
        }
        let acts: Vec<&str> = match n.op() {
            // Only the data input of weighted ops (weights and bias are constants).
            "Conv" | "Gemm" => n.real_inputs().into_iter().take(1).collect(),
            _ => n.real_inputs(),
        };
        for a in acts {
            // Unknown types are assumed float (inference covers what the graph's ops tell).
            if !inits.contains(a) && types.get(a).is_none_or(|&t| t == 1) && seen.insert(a.to_string()) {
                out.push(a.to_string());
            }
        }
    }
    out
}

/// uint8 asymmetric scale and zero point covering `r` (widened to include 0, as zero must be exact).
pub fn activation_params(r: Range) -> (f32, u8) {
    let (lo, hi) = (r.min.min(0.0), r.max.max(0.0));
    if !(hi - lo).is_finite() || hi - lo <= f32::EPSILON {
        return (1.0, 0);
    }
    let scale = (hi - lo) / 255.0;
    let zp = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zp)
}

/// Largest |int32 bias| the pass writes: far inside int32 so accumulator + bias cannot overflow, and exact in f32
/// (integer runtimes and edgepack's lowering add it to an exact accumulator).
pub const BIAS_LIMIT: f32 = (1 << 23) as f32;

/// Per-channel symmetric int8 quantization of `w` along `axis` of `dims`: (int8 values, scales). `min_scale`
/// (per channel) raises a scale where a tiny weight range would make the bias overflow (see [`BIAS_LIMIT`]).
pub fn quantize_weights(
    w: &[f32],
    dims: &[i64],
    axis: usize,
    per_tensor: bool,
    min_scale: Option<&[f32]>,
) -> (Vec<i8>, Vec<f32>) {
    let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    let channels = if per_tensor { 1 } else { dims[axis] };
    let inner: usize = dims[axis + 1..].iter().product();
    let channel_of = |i: usize| if per_tensor { 0 } else { (i / inner) % dims[axis] };
    let mut max = vec![0f32; channels];
    for (i, &v) in w.iter().enumerate() {
        let c = channel_of(i);
        max[c] = max[c].max(v.abs());
    }
    let floor = |c: usize| match min_scale {
        Some(m) if per_tensor => m.iter().cloned().fold(0.0, f32::max),
        Some(m) => m.get(c).copied().unwrap_or(0.0),
        None => 0.0,
    };
    let scales: Vec<f32> = max
        .iter()
        .enumerate()
        .map(|(c, &m)| {
            let s = (m / 127.0).max(floor(c));
            if s > 0.0 && s.is_finite() { s } else { 1.0 }
        })
        .collect();
    let q =
        w.iter().enumerate().map(|(i, &v)| (v / scales[channel_of(i)]).round().clamp(-127.0, 127.0) as i8).collect();
    (q, scales)
}

/// Applies the QDQ pass. `ranges` must cover [`activations_to_calibrate`]; a node whose input has no range stays
/// float (reported in the summary).
pub fn quantize(
    model: &Model,
    ranges: &HashMap<String, Range>,
    cfg: &QdqConfig,
) -> Result<(Model, QdqSummary), QdqError> {
    let opset = model.opset("").unwrap_or(0);
    if opset < 13 {
        return Err(QdqError::Opset(opset));
    }
    if cfg.dynamic {
        return crate::dynamic::quantize(model, cfg);
    }
    if let Some(wo) = cfg.weight_only {
        return crate::weight_only::quantize(model, cfg, wo);
    }
    let mut m = model.clone();
    let mut summary = QdqSummary::default();
    // 1. One QDQ pair per calibrated activation, rewiring its quantizable readers.
    let wanted = activations_to_calibrate(model, cfg);
    let mut dq_of: HashMap<String, (String, f32)> = HashMap::new();
    for a in &wanted {
        let Some(&r) = ranges.get(a) else {
            summary.skipped.insert(a.clone(), "no calibration range".into());
            continue;
        };
        let (scale, zp, ty) = activation_qparams(r, cfg.signed_activations, cfg.symmetric_activations);
        let base = sanitize(a);
        let (s_name, z_name) =
            (m.graph.unique_name(&format!("{base}_scale")), m.graph.unique_name(&format!("{base}_zero_point")));
        m.graph.initializers.push(tensor_f32(&s_name, &[], &[scale]));
        m.graph.initializers.push(tensor_raw(&z_name, &[], ty, vec![zp as u8]));
        let q = m.graph.unique_name(&format!("{base}_quantized"));
        let dq = m.graph.unique_name(&format!("{base}_dequantized"));
        m.graph.nodes.push(node("QuantizeLinear", &format!("{q}_node"), &[a, &s_name, &z_name], &[&q], vec![]));
        m.graph.nodes.push(node("DequantizeLinear", &format!("{dq}_node"), &[&q, &s_name, &z_name], &[&dq], vec![]));
        dq_of.insert(a.clone(), (dq, scale));
        summary.quantized_activations.push(a.clone());
    }
    let inits: HashMap<String, TensorProto> =
        m.graph.initializers.iter().filter_map(|t| Some((t.name.clone()?, t.clone()))).collect();
    let n_nodes = m.graph.nodes.len();
    let mut new_inits = Vec::new();
    let mut new_nodes = Vec::new();
    let mut guards: HashMap<String, String> = HashMap::new();
    for i in 0..n_nodes {
        let n = m.graph.nodes[i].clone();
        if let Some(why) = float_reason(n.op()) {
            summary.skipped.insert(n.name().to_string(), why.into());
        }
        if !ACTIVATION_CONSUMERS.contains(&n.op()) || excluded(cfg, &n) {
            if ACTIVATION_CONSUMERS.contains(&n.op()) {
                summary.excluded.push(n.name().to_string());
            }
            // fp32 guard: onnxruntime quantizes the weights of a float Conv/Gemm whose input comes from a
            // DequantizeLinear (its optimizer moves DQs past pools and reshapes) and whose output leads to a
            // QuantizeLinear (WeightBiasQuantization: per-tensor int8). A `Max(x, -f32::MAX)` in front keeps the
            // node in fp32 there too, as the file says; the result is unchanged. (`Mul(x, 1)` would not do: the
            // optimizer removes it as a no-op.)
            if matches!(n.op(), "Conv" | "Gemm" | "ConvTranspose")
                && excluded(cfg, &n)
                && let Some(x) = n.input.first().filter(|x| !inits.contains_key(*x) && !x.is_empty())
            {
                // One guard per value, shared by every fp32 reader.
                let guarded = match guards.get(x) {
                    Some(g) => g.clone(),
                    None => {
                        let base = sanitize(x);
                        let floor = m.graph.unique_name(&format!("{base}_fp32_guard_floor"));
                        let g = m.graph.unique_name(&format!("{base}_fp32_guard"));
                        new_inits.push(tensor_f32(&floor, &[], &[-f32::MAX]));
                        new_nodes.push((i, node("Max", &format!("{g}_node"), &[x, &floor], &[&g], vec![])));
                        guards.insert(x.clone(), g.clone());
                        summary.fp32_guards += 1;
                        g
                    }
                };
                m.graph.nodes[i].input[0] = guarded;
            }
            // A unary activation beside a quantized reader of the same value (SiLU's Sigmoid next to its Mul,
            // hard-swish's HardSigmoid) reads the dequantized value too, as onnxruntime's QDQ form has every
            // reader of a quantized tensor do: the producer's output is then requantized only, which is what the
            // CPU backend's integer kernels take (a float reader kept a YOLOv8's every Conv off them).
            if UNARY_ACTIVATIONS.contains(&n.op())
                && !excluded(cfg, &n)
                && let Some((dq, _)) = n.input.first().and_then(|x| dq_of.get(x))
            {
                m.graph.nodes[i].input[0] = dq.clone();
            }
            continue;
        }
        let data_inputs = if matches!(n.op(), "Conv" | "Gemm") { 1 } else { n.input.len() };
        let mut rewired = n.clone();
        for k in 0..data_inputs.min(n.input.len()) {
            if let Some((dq, _)) = dq_of.get(&n.input[k]) {
                rewired.input[k] = dq.clone();
            }
        }
        // 2. Weights and bias.
        if WEIGHTED.contains(&n.op()) {
            let x_scale = n.input.first().and_then(|x| dq_of.get(x)).map(|d| d.1);
            let w = n.input.get(1).and_then(|w| inits.get(w));
            match (x_scale, w) {
                (Some(x_scale), Some(w)) if tensor_f32_values(w).is_some() && !w.dims.is_empty() => {
                    let axis = match n.op() {
                        "Conv" => 0,
                        "Gemm" if n.attr_i("transB").unwrap_or(0) == 1 => 0,
                        _ => w.dims.len() - 1,
                    };
                    let data = tensor_f32_values(w).unwrap();
                    // A channel whose weights are (nearly) zero but whose bias is not would need an int32 bias far
                    // beyond range: its weight scale is raised so |b / (s_x·s_w)| ≤ BIAS_LIMIT.
                    let min_scale: Option<Vec<f32>> = n
                        .input
                        .get(2)
                        .and_then(|b| inits.get(b))
                        .and_then(tensor_f32_values)
                        .map(|bv| bv.iter().map(|b| b.abs() / (x_scale * BIAS_LIMIT)).collect());
                    let (mut q, scales) =
                        quantize_weights(&data, &w.dims, axis, cfg.per_tensor_weights, min_scale.as_deref());
                    // Rounding fitted to the calibration inputs, at the same scales.
                    let inner: usize = w.dims[axis + 1..].iter().product::<i64>() as usize;
                    let channels = w.dims[axis] as usize;
                    let scale_of = |i: usize| scales[if scales.len() == 1 { 0 } else { (i / inner) % channels }];
                    let refined = cfg.refiner.as_ref().and_then(|r| r.refine(n.name(), &data, &scale_of, -127, 127));
                    if let Some(r) = &refined {
                        q.clone_from(&r.q);
                    }
                    let wname = sanitize(w.name.as_deref().unwrap_or("w"));
                    let (qn, sn, zn, dqn) = (
                        m.graph.unique_name(&format!("{wname}_quantized")),
                        m.graph.unique_name(&format!("{wname}_scale")),
                        m.graph.unique_name(&format!("{wname}_zero_point")),
                        m.graph.unique_name(&format!("{wname}_dequantized")),
                    );
                    let c = scales.len() as i64;
                    let sdims: Vec<i64> = if cfg.per_tensor_weights { vec![] } else { vec![c] };
                    new_inits.push(tensor_raw(&qn, &w.dims, 3, q.iter().map(|&v| v as u8).collect()));
                    new_inits.push(tensor_f32(&sn, &sdims, &scales));
                    new_inits.push(tensor_raw(&zn, &sdims, 3, vec![0u8; scales.len()]));
                    let attrs = if cfg.per_tensor_weights { vec![] } else { vec![attr_int("axis", axis as i64)] };
                    new_nodes
                        .push((i, node("DequantizeLinear", &format!("{dqn}_node"), &[&qn, &sn, &zn], &[&dqn], attrs)));
                    rewired.input[1] = dqn;
                    // Bias (corrected for the weights' mean error when refined; a Conv or Gemm without one gets
                    // one then): int32 at scale s_x * s_w[c].
                    let delta = refined.as_ref().map(|r| r.bias_delta.clone()).filter(|d| d.iter().any(|v| *v != 0.0));
                    let given = n.input.get(2).filter(|b| !b.is_empty()).map(|b| {
                        inits
                            .get(b)
                            .filter(|b| b.dims.len() == 1)
                            .and_then(|b| Some((sanitize(b.name.as_deref().unwrap_or("bias")), tensor_f32_values(b)?)))
                    });
                    let beta = n.attr_f("beta").unwrap_or(1.0);
                    let bias: Option<(String, Vec<f32>)> = match (given, delta) {
                        (Some(Some((name, mut bv))), Some(d)) if bv.len() == d.len() => {
                            let per = if n.op() == "Gemm" { beta } else { 1.0 };
                            bv.iter_mut().zip(&d).for_each(|(b, d)| *b += d / per);
                            Some((name, bv))
                        }
                        (Some(b), _) => b,
                        (None, Some(d)) if n.op() == "Conv" || (n.op() == "Gemm" && beta != 0.0) => {
                            Some((format!("{}_bias", sanitize(n.name())), d.iter().map(|v| v / beta).collect()))
                        }
                        (None, _) => None,
                    };
                    if let Some((bname, bv)) = bias
                        && (bv.len() == scales.len() || scales.len() == 1)
                    {
                        let bs: Vec<f32> =
                            (0..bv.len()).map(|k| x_scale * scales[if scales.len() == 1 { 0 } else { k }]).collect();
                        let bq: Vec<i32> = bv
                            .iter()
                            .zip(&bs)
                            .map(|(&v, &s)| (v / s).round().clamp(i32::MIN as f32, i32::MAX as f32) as i32)
                            .collect();
                        let (bqn, bsn, bdq) = (
                            m.graph.unique_name(&format!("{bname}_quantized")),
                            m.graph.unique_name(&format!("{bname}_scale")),
                            m.graph.unique_name(&format!("{bname}_dequantized")),
                        );
                        let bdims = [bv.len() as i64];
                        new_inits.push(tensor_raw(&bqn, &bdims, 6, bq.iter().flat_map(|v| v.to_le_bytes()).collect()));
                        new_inits.push(tensor_f32(&bsn, &bdims, &bs));
                        // No zero point: it is optional and 0 for int32 bias (saves 4 bytes per channel).
                        new_nodes.push((
                            i,
                            node(
                                "DequantizeLinear",
                                &format!("{bdq}_node"),
                                &[&bqn, &bsn],
                                &[&bdq],
                                vec![attr_int("axis", 0)],
                            ),
                        ));
                        if rewired.input.len() < 3 {
                            rewired.input.resize(3, String::new());
                        }
                        rewired.input[2] = bdq;
                    }
                    summary.quantized_weights.push(n.name().to_string());
                }
                (None, _) => {
                    summary.skipped.insert(n.name().to_string(), "input activation not quantized".into());
                }
                // MatMul of two activations (attention): both inputs already have their QDQ pair.
                _ if n.op() == "MatMul" && n.input.get(1).is_some_and(|b| dq_of.contains_key(b)) => {}
                _ => {
                    summary.skipped.insert(n.name().to_string(), "weights are not an f32 initializer".into());
                }
            }
        }
        m.graph.nodes[i] = rewired;
    }
    m.graph.initializers.extend(new_inits);
    for (_, n) in new_nodes {
        m.graph.nodes.push(n);
    }
    m.graph.topo_sort().map_err(|e| QdqError::Invalid(e.to_string()))?;
    m.graph.remove_unused_initializers();
    m.check().map_err(|e| QdqError::Invalid(e.to_string()))?;
    Ok((m, summary))
}

/// A value name made safe to derive initializer and node names from.
pub(crate) fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '.' { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_per_channel_round_trip_within_half_a_step() {
        let w: Vec<f32> = (0..24).map(|i| ((i * 7919) % 23) as f32 / 7.0 - 1.5).collect();
        let (q, s) = quantize_weights(&w, &[4, 2, 3], 0, false, None);
        assert_eq!(s.len(), 4);
        for (i, (&qv, &wv)) in q.iter().zip(&w).enumerate() {
            let back = qv as f32 * s[i / 6];
            assert!((back - wv).abs() <= s[i / 6] / 2.0 + 1e-6);
        }
        assert!(q.iter().any(|&v| v == 127 || v == -127));
        // A near-zero channel with a bias: the scale floor keeps the int32 bias in range.
        let w = [1e-12f32, -1e-12, 0.5, -0.25];
        let (q, s) = quantize_weights(&w, &[2, 2], 0, false, Some(&[0.01, 0.0]));
        assert_eq!((s[0], &q[..2]), (0.01, &[0i8, 0][..]));
        assert!((s[1] - 0.5 / 127.0).abs() < 1e-9);
    }

    #[test]
    fn signed_and_symmetric_activations() {
        let r = Range { min: -1.0, max: 3.0 };
        // int8 asymmetric: the uint8 grid shifted by 128 (the same real values).
        assert_eq!(activation_qparams(r, true, false), (4.0 / 255.0, 64 - 128, 3));
        // Symmetric: [-3, 3], zero point 128 (uint8) or 0 (int8); 0 stays exact.
        assert_eq!(activation_qparams(r, false, true), (6.0 / 255.0, 128, 2));
        assert_eq!(activation_qparams(r, true, true), (6.0 / 255.0, 0, 3));
        assert_eq!(activation_qparams(Range { min: 0.0, max: 0.0 }, true, true), (1.0, 0, 3));
    }

    #[test]
    fn activation_params_keep_zero_exact() {
        let (s, z) = activation_params(Range { min: -1.0, max: 3.0 });
        assert!((s - 4.0 / 255.0).abs() < 1e-7);
        assert_eq!(z, 64);
        assert_eq!(activation_params(Range { min: 0.5, max: 6.0 }).1, 0); // widened to include 0
        assert_eq!(activation_params(Range { min: 0.0, max: 0.0 }), (1.0, 0));
    }

    #[test]
    fn tiny_classifier_gets_qdq_and_stays_valid() {
        let mut m = edgepack_runtime::onnx::builder::tiny_classifier();
        // The builder makes opset 13 models.
        m.graph.topo_sort().unwrap();
        let cfg = QdqConfig::default();
        assert_eq!(activations_to_calibrate(&m, &cfg), vec!["x".to_string()]);
        let ranges = HashMap::from([("x".to_string(), Range { min: -1.0, max: 1.0 })]);
        let (q, s) = quantize(&m, &ranges, &cfg).unwrap();
        assert_eq!(s.quantized_weights, vec!["fc".to_string()]);
        let ops: Vec<&str> = q.graph.nodes.iter().map(|n| n.op()).collect();
        assert_eq!(ops.iter().filter(|o| **o == "DequantizeLinear").count(), 3); // x, W, b
        assert_eq!(ops.iter().filter(|o| **o == "QuantizeLinear").count(), 1);
        // Runs on the CPU backend and stays close to the float model.
        let opts = edgepack_runtime::SessionOptions { threads: 1, ..Default::default() };
        let f = edgepack_runtime::Session::from_model(&m, &opts).unwrap();
        let i8m = edgepack_runtime::Session::from_model(&q, &opts).unwrap();
        let x =
            edgepack_runtime::Tensor::from_f32(vec![2, 4], vec![0.5, -0.25, 0.75, 1.0, -1.0, 0.1, 0.2, 0.3]).unwrap();
        let a = f.run_one(x.clone()).unwrap()[0].1.to_f32_vec();
        let b = i8m.run_one(x).unwrap()[0].1.to_f32_vec();
        for (u, v) in a.iter().zip(&b) {
            assert!((u - v).abs() < 0.05, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn old_opsets_are_refused_clearly() {
        let p =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models/mnist_cntk_opset8_simplified.onnx");
        let m = Model::load(p).unwrap();
        assert!(matches!(quantize(&m, &HashMap::new(), &QdqConfig::default()), Err(QdqError::Opset(8))));
    }
}
