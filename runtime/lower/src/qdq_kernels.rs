//! QDQ patterns to edgepack's integer kernels: custom nodes in the `ai.edgepack` domain that the CPU backend runs
//! on NHWC uint8 tensors (`kernels::qconv`, `kernels::qelem`), with the arithmetic of `kernels::reference`.
//!
//! - `DQ(x) → Conv(DQ(w), DQ(b)) → [Relu|Clip] → Q` (group 1 or depthwise) → `EpQConv(x)`;
//! - `DQ(x) → Gemm(DQ(w), DQ(b)) [→ [Relu|Clip] → Q]` → `EpQGemm(x)` (rank 2, uint8 or float output);
//! - `DQ(a) + DQ(b) → Q` on two kernel outputs → `EpQAdd(a, b)` (QLinearAdd's arithmetic);
//! - `DQ(x) → MaxPool → Q`, `DQ(xᵢ) → Concat(axis 1) → Q` on kernel outputs → `EpQMaxPool`, `EpQConcat` with
//!   256-entry requantization tables (max and concat commute with the monotonic DQ/Q maps, so this is exact);
//! - `DQ(x) → element-wise float ops [→ Split | Resize] → Q` on a kernel output (a SiLU with its inner QDQ pair) →
//!   `EpQTable(x)`, a 256-entry table (`qdq_tables`); moved into the producing `EpQConv`'s output stage when that
//!   convolution's output has no other reader;
//! - dynamic quantization's `DynamicQuantizeLinear → MatMulInteger → Cast → Mul [→ Add]` → `EpDynGemm(x)` (f32 in
//!   and out, any rank: no layout).
//!
//! Then the layout pass: every kernel reads and writes `name__nhwc`; a kernel input produced elsewhere enters
//! through `EpQuantize` (the QuantizeLinear that produced it, writing NHWC) or a Transpose, and a kernel output read
//! by a standard node (or a graph output) leaves through a Transpose back to NCHW under its original name. Chains
//! of kernels therefore stay in uint8 NHWC with no float round trip and no transposes inside.
use std::collections::{BTreeMap, HashMap, HashSet};

use crate::qdq_lower::{Ctx, Weighted, WeightedInputs, match_weighted, match_weighted_inputs, scalar_f32, zero_point};
use edgepack_onnx::builder::{attr_float, attr_int, attr_ints, attr_tensor, tensor_raw};
use edgepack_onnx::{Graph, Model, NodeExt, NodeProto, node};

/// Domain of the kernel nodes.
pub const DOMAIN: &str = "ai.edgepack";
/// Suffix of the NHWC twin of a value.
pub const NHWC: &str = "__nhwc";
/// Op types of the kernel nodes.
pub const OPS: [&str; 10] = [
    "EpQConv",
    "EpQGemm",
    "EpQAdd",
    "EpQMaxPool",
    "EpQConcat",
    "EpQTable",
    "EpQuantize",
    "EpQuantizeLinear",
    "EpLayout",
    "EpDynGemm",
];

pub(super) fn ep_node(
    op: &str,
    name: &str,
    inputs: &[&str],
    output: &str,
    attrs: Vec<edgepack_onnx::AttributeProto>,
) -> NodeProto {
    let mut n = node(op, name, inputs, &[output], attrs);
    n.domain = Some(DOMAIN.into());
    n
}

/// Per-tensor uint8 parameters (scale, zero point) of a DQ or Q node.
pub(crate) fn u8_params(g: &Graph, n: &NodeProto) -> Option<(f32, u8)> {
    let s = scalar_f32(g, n.input.get(1)?)?;
    let (z, ty) = zero_point(g, n)?;
    (ty == 2 && s.is_finite() && s > 0.0).then_some((s, z as u8))
}

fn table_of(from: (f32, u8), to: (f32, u8)) -> Vec<u8> {
    use edgepack_kernels::{qelem, reference::QParams};
    qelem::requant_table(QParams { scale: from.0, zero: from.1 }, QParams { scale: to.0, zero: to.1 }).to_vec()
}

/// Whether a kernel op takes part in the NHWC layout (the Gemm kernels read and write rank-2 tensors, whose
/// layout is the same either way; the softmax reads its input as the graph lays it out).
pub(super) fn in_layout(op: &str) -> bool {
    !matches!(op, "EpQGemm" | "EpGemm" | "EpDynGemm" | "EpSoftmax" | "EpQuantizeLinear")
}

/// A kernel node and the nodes it replaces (indices into the graph being lowered).
pub(super) struct Rewrite {
    pub remove: Vec<usize>,
    pub node: NodeProto,
}

/// The geometry attributes of a kernel node that is a 1×1, stride-1, unpadded convolution from `c_in` to `c_out`
/// channels (a Gemm's rows, a transposed convolution's kernel row).
pub(super) fn pointwise_geometry(c_in: usize, c_out: usize) -> Vec<edgepack_onnx::AttributeProto> {
    vec![
        attr_int("c_in", c_in as i64),
        attr_int("c_out", c_out as i64),
        attr_int("group", 1),
        attr_ints("kernel_shape", &[1, 1]),
        attr_ints("strides", &[1, 1]),
        attr_ints("dilations", &[1, 1]),
        attr_ints("pads", &[0, 0, 0, 0]),
    ]
}

/// `[strides, dilations, pads]` of a Conv with a `kh×kw` kernel, when its attributes are explicit (no auto_pad)
/// and consistent.
pub(super) fn conv_geometry(n: &NodeProto, kh: usize, kw: usize) -> Option<[Vec<i64>; 3]> {
    if n.attr_s("auto_pad").is_some_and(|p| p != "NOTSET") {
        return None;
    }
    let two = |name: &str, default: i64| -> Option<Vec<i64>> {
        let v = n.attr_ints(name).map(|v| v.to_vec()).unwrap_or_else(|| vec![default; 2]);
        (v.len() == 2 && v.iter().all(|&x| (default..=MAX_GEOMETRY).contains(&x))).then_some(v)
    };
    let (strides, dilations) = (two("strides", 1)?, two("dilations", 1)?);
    let pads = n.attr_ints("pads").map(|v| v.to_vec()).unwrap_or_else(|| vec![0; 4]);
    if pads.len() != 4 || pads.iter().any(|&p| !(0..=MAX_GEOMETRY).contains(&p)) {
        return None;
    }
    if n.attr_ints("kernel_shape").is_some_and(|k| k != [kh as i64, kw as i64]) {
        return None;
    }
    Some([strides, dilations, pads])
}

/// The largest stride, dilation or pad a Conv lowered to a kernel may have: the kernels' window arithmetic then
/// cannot overflow (a mangled model's Conv keeps its ONNX form, which the backends check).
const MAX_GEOMETRY: i64 = 1 << 20;

/// The attributes of a 2-D MaxPool the kernels run (explicit pads smaller than the window, so every window holds
/// an input cell; no dilation, no indices output).
pub(super) fn maxpool_attrs(n: &NodeProto) -> Option<Vec<edgepack_onnx::AttributeProto>> {
    if n.output.len() != 1
        || n.attr_s("auto_pad").is_some_and(|p| p != "NOTSET")
        || n.attr_ints("dilations").is_some_and(|d| d.iter().any(|&v| v != 1))
        || n.attr_i("storage_order").unwrap_or(0) != 0
    {
        return None;
    }
    let k = n.attr_ints("kernel_shape")?.to_vec();
    let strides = n.attr_ints("strides").map(|v| v.to_vec()).unwrap_or_else(|| vec![1, 1]);
    let pads = n.attr_ints("pads").map(|v| v.to_vec()).unwrap_or_else(|| vec![0; 4]);
    if k.len() != 2
        || strides.len() != 2
        || pads.len() != 4
        || k.iter().chain(&strides).any(|v| !(1..=MAX_GEOMETRY).contains(v))
    {
        return None;
    }
    if pads.iter().any(|&p| p < 0) || pads[0].max(pads[2]) >= k[0] || pads[1].max(pads[3]) >= k[1] {
        return None;
    }
    Some(vec![
        attr_ints("kernel_shape", &k),
        attr_ints("strides", &strides),
        attr_ints("pads", &pads),
        attr_int("ceil_mode", n.attr_i("ceil_mode").unwrap_or(0)),
    ])
}

/// Where a weighted kernel writes: requantized uint8 (zero point `z_y`, multipliers `(s_x·s_w)/s_y`, the nodes up
/// to the Q removed) or `f32(acc)·s_x·s_w` (`float_out`: the output stays float).
struct KernelOut<'a> {
    z_y: i64,
    multiplier: Vec<f32>,
    remove: Vec<usize>,
    value: &'a str,
    float_out: bool,
}

impl<'a> KernelOut<'a> {
    fn requantized(m: Weighted<'a>) -> Self {
        KernelOut { z_y: m.z_y.0 as i64, multiplier: m.m, remove: m.remove, value: &m.q.output[0], float_out: false }
    }

    fn float(wi: &WeightedInputs<'a>, idx: usize, c_out: usize) -> Option<Self> {
        let multiplier = (0..c_out).map(|o| wi.s_x * wi.s_w[if wi.s_w.len() == 1 { 0 } else { o }]).collect();
        Some(KernelOut { z_y: 0, multiplier, remove: vec![idx], value: wi.n.output.first()?, float_out: true })
    }
}

/// The integer attributes of a weighted kernel node: zero points, output kind, int8 `weights` (OIHW `w_dims`;
/// `None` when one is outside int8), per-channel multiplier and int32 bias.
fn weighted_attrs(
    wi: &WeightedInputs,
    out: &KernelOut,
    w_dims: &[i64],
    weights: &[f32],
) -> Option<Vec<edgepack_onnx::AttributeProto>> {
    if weights.iter().any(|&v| !(-128.0..=127.0).contains(&v)) {
        return None;
    }
    let c_out = out.multiplier.len() as i64;
    let mut attrs = vec![
        attr_int("z_x", wi.z_x.0 as i64),
        attr_int("z_y", out.z_y),
        attr_int("float_out", out.float_out as i64),
        attr_tensor("weights", tensor_raw("weights", w_dims, 3, weights.iter().map(|&v| (v as i8) as u8).collect())),
        attr_tensor("multiplier", edgepack_onnx::builder::tensor_f32("multiplier", &[c_out], &out.multiplier)),
    ];
    if let Some(b) = &wi.bias {
        let raw = b.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect();
        attrs.push(attr_tensor("bias", tensor_raw("bias", &[c_out], 6, raw)));
    }
    Some(attrs)
}

/// `DQ(x) → Conv(DQ(w), DQ(b))` → `EpQConv(x)`: requantized when `[Relu|Clip] → Q` follows (group 1 or
/// depthwise); group 1 with `float_out` when the output stays float (a detector's last convolutions:
/// onnxruntime's integer convolution with a float output, NHWC f32, read by the float ops after it through the
/// layout pass's transpose).
fn conv(c: &Ctx, idx: usize) -> Option<Rewrite> {
    let g = c.g;
    let n = &g.nodes[idx];
    let wi = match_weighted_inputs(c, idx)?;
    if wi.is_gemm || wi.w_t.dims.len() != 4 || wi.z_x.1 != 2 {
        return None;
    }
    u8_params(g, wi.dqx)?;
    let d: Vec<usize> = wi.w_t.dims.iter().map(|&v| v as usize).collect();
    let group = n.attr_i("group").unwrap_or(1).max(1) as usize;
    let (c_out, c_in) = (d[0], d[1].checked_mul(group)?);
    if !(group == 1 || (group == c_in && c_out == c_in && d[1] == 1)) {
        return None;
    }
    let [strides, dilations, pads] = conv_geometry(n, d[2], d[3])?;
    let out = match match_weighted(c, idx) {
        Some(m) if m.z_y.1 == 2 => KernelOut::requantized(m),
        Some(_) => return None,
        None => {
            // A requantized output (a Q, or a Relu/Clip before one, that the pattern did not take: an int8 output
            // zero point, per-channel output parameters) keeps onnxruntime's integer arithmetic (`qdq_lower`).
            let v = n.output.first()?;
            if group != 1
                || g.nodes.iter().any(|m| m.input.contains(v) && matches!(m.op(), "QuantizeLinear" | "Relu" | "Clip"))
            {
                return None;
            }
            KernelOut::float(&wi, idx, c_out)?
        }
    };
    let mut attrs = vec![
        attr_int("c_in", c_in as i64),
        attr_int("c_out", c_out as i64),
        attr_int("group", group as i64),
        attr_ints("kernel_shape", &[d[2] as i64, d[3] as i64]),
        attr_ints("strides", &strides),
        attr_ints("dilations", &dilations),
        attr_ints("pads", &pads),
    ];
    attrs.extend(weighted_attrs(&wi, &out, &wi.w_t.dims, &wi.w)?);
    let name = format!("{}_kernel", n.name());
    Some(Rewrite { remove: out.remove, node: ep_node("EpQConv", &name, &[&wi.dqx.input[0]], out.value, attrs) })
}

/// `DQ(x) → Gemm(DQ(W), DQ(b))` (transA 0, alpha = beta = 1) → `EpQGemm(x)`: a 1×1 convolution on `[N, K]` (the
/// bytes of NHWC `[N, 1, 1, K]`, so no layout change), requantized when `[Relu|Clip] → Q` follows, else with a
/// float output `f32(acc)·s_x·s_w` (onnxruntime's QGemm with a float output: the classifier head).
fn gemm(c: &Ctx, idx: usize) -> Option<Rewrite> {
    let g = c.g;
    let n = &g.nodes[idx];
    let wi = match_weighted_inputs(c, idx)?;
    if !wi.is_gemm || wi.z_x.1 != 2 || wi.w_t.dims.len() != 2 {
        return None;
    }
    u8_params(g, wi.dqx)?;
    let tb = n.attr_i("transB").unwrap_or(0) == 1;
    let (d0, d1) = (wi.w_t.dims[0] as usize, wi.w_t.dims[1] as usize);
    let (k, c_out) = if tb { (d1, d0) } else { (d0, d1) };
    // OIHW [c_out, k, 1, 1].
    let weights: Vec<f32> = (0..c_out * k)
        .map(|i| {
            let (o, kk) = (i / k, i % k);
            if tb { wi.w[o * k + kk] } else { wi.w[kk * c_out + o] }
        })
        .collect();
    let out = match match_weighted(c, idx).filter(|m| m.z_y.1 == 2 && u8_params(g, m.q).is_some()) {
        Some(m) => KernelOut::requantized(m),
        None => KernelOut::float(&wi, idx, c_out)?,
    };
    let mut attrs = pointwise_geometry(k, c_out);
    attrs.extend(weighted_attrs(&wi, &out, &[c_out as i64, k as i64, 1, 1], &weights)?);
    let name = format!("{}_kernel", n.name());
    Some(Rewrite { remove: out.remove, node: ep_node("EpQGemm", &name, &[&wi.dqx.input[0]], out.value, attrs) })
}

/// Dynamic quantization's MatMul, `DynamicQuantizeLinear(x) → MatMulInteger(x_q, W, x_zp, 0) → Cast(float) →
/// Mul(·, Mul(x_scale, w_scale)) [→ Add(·, b)]` with constant int8 `W [K, N]`, constant `w_scale` (scalar or `[N]`)
/// and bias `[N]` → `EpDynGemm(x)`. The DynamicQuantizeLinear stays for other readers (removed when dead).
fn dyn_gemm(c: &Ctx, idx: usize) -> Option<Rewrite> {
    use edgepack_onnx::passes::tensor_f32_values;
    let mi = &c.g.nodes[idx];
    let d = c.producer(mi.input.first()?, "DynamicQuantizeLinear")?;
    if d.output.first() != mi.input.first() || d.output.get(2) != mi.input.get(2) {
        return None;
    }
    let w = c.g.initializer(mi.input.get(1)?)?;
    if w.data_type != Some(3) || w.dims.len() != 2 {
        return None;
    }
    let (k, n) = (w.dims[0] as usize, w.dims[1] as usize);
    let wv = crate::qdq_lower::int_values(w)?;
    if let Some(z) = mi.input.get(3).filter(|z| !z.is_empty()) {
        crate::qdq_lower::int_values(c.g.initializer(z)?)?.iter().all(|&v| v == 0.0).then_some(())?;
    }
    let cast_i = c.only_reader(mi.output.first()?)?;
    let cast = &c.g.nodes[cast_i];
    (cast.op() == "Cast" && cast.attr_i("to") == Some(1)).then_some(())?;
    let mul_i = c.only_reader(cast.output.first()?)?;
    let mul = &c.g.nodes[mul_i];
    (mul.op() == "Mul" && mul.input.len() == 2).then_some(())?;
    let other = if mul.input[0] == cast.output[0] { &mul.input[1] } else { &mul.input[0] };
    let sc_i = *c.producers_of(other)?;
    let sc = &c.g.nodes[sc_i];
    (sc.op() == "Mul" && c.only_reader(other) == Some(mul_i)).then_some(())?;
    let xs = d.output.get(1)?;
    let ws = if &sc.input[0] == xs {
        &sc.input[1]
    } else if &sc.input[1] == xs {
        &sc.input[0]
    } else {
        return None;
    };
    let ws = tensor_f32_values(c.g.initializer(ws)?)?;
    let w_scale: Vec<f32> = match ws.len() {
        1 => vec![ws[0]; n],
        l if l == n => ws,
        _ => return None,
    };
    let mut remove = vec![idx, cast_i, mul_i, sc_i];
    let mut out = mul.output.first()?.clone();
    let mut bias = None;
    if let Some(add_i) = c.only_reader(&out) {
        let add = &c.g.nodes[add_i];
        let b = add.input.iter().find(|i| **i != out).and_then(|b| c.g.initializer(b)).and_then(tensor_f32_values);
        if add.op() == "Add" && add.input.len() == 2 && b.as_ref().is_some_and(|b| b.len() == n) {
            bias = b;
            remove.push(add_i);
            out = add.output.first()?.clone();
        }
    }
    // OIHW [N, K, 1, 1]: row n holds column n of W.
    let mut weights = vec![0u8; n * k];
    for kk in 0..k {
        for j in 0..n {
            weights[j * k + kk] = wv[kk * n + j] as i8 as u8;
        }
    }
    let f32_raw = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut attrs = vec![
        attr_int("c_in", k as i64),
        attr_int("c_out", n as i64),
        attr_tensor("weights", tensor_raw("weights", &[n as i64, k as i64], 3, weights)),
        attr_tensor("w_scale", tensor_raw("w_scale", &[n as i64], 1, f32_raw(&w_scale))),
    ];
    if let Some(b) = &bias {
        attrs.push(attr_tensor("bias", tensor_raw("bias", &[n as i64], 1, f32_raw(b))));
    }
    let name = format!("{}_kernel", mi.name());
    Some(Rewrite { remove, node: ep_node("EpDynGemm", &name, &[&d.input[0]], &out, attrs) })
}

/// The quantized value behind `DQ(value)` when it is a kernel output, with its parameters.
fn kernel_dq<'a>(c: &Ctx<'a>, value: &str, nhwc: &Made) -> Option<(&'a str, (f32, u8))> {
    let dq = c.producer(value, "DequantizeLinear")?;
    let x = dq.input.first()?;
    nhwc.contains_key(x).then_some(())?;
    Some((x.as_str(), u8_params(c.g, dq)?))
}

/// The Q reading `value` (its only reader, through Identity nodes), the nodes up to it, and its parameters.
fn only_q<'a>(c: &Ctx<'a>, value: &str) -> Option<(Vec<usize>, &'a NodeProto, (f32, u8))> {
    let mut path = Vec::new();
    let mut cur = value;
    loop {
        let i = c.only_reader(cur)?;
        let n = &c.g.nodes[i];
        path.push(i);
        match n.op() {
            "Identity" if n.domain_name().is_empty() && n.input.len() == 1 => cur = n.output.first()?,
            "QuantizeLinear" if n.input[0] == cur => return Some((path, n, u8_params(c.g, n)?)),
            _ => return None,
        }
    }
}

fn add(c: &Ctx, idx: usize, nhwc: &Made) -> Option<Rewrite> {
    let n = &c.g.nodes[idx];
    let (a, pa) = kernel_dq(c, n.input.first()?, nhwc)?;
    let (b, pb) = kernel_dq(c, n.input.get(1)?, nhwc)?;
    let (path, q, pc) = only_q(c, n.output.first()?)?;
    let attrs = vec![
        attr_float("s_a", pa.0),
        attr_int("z_a", pa.1 as i64),
        attr_float("s_b", pb.0),
        attr_int("z_b", pb.1 as i64),
        attr_float("s_c", pc.0),
        attr_int("z_c", pc.1 as i64),
    ];
    Some(Rewrite {
        remove: [vec![idx], path].concat(),
        node: ep_node("EpQAdd", &format!("{}_kernel", n.name()), &[a, b], &q.output[0], attrs),
    })
}

fn maxpool(c: &Ctx, idx: usize, nhwc: &Made) -> Option<Rewrite> {
    let n = &c.g.nodes[idx];
    let mut attrs = maxpool_attrs(n)?;
    let (x, px) = kernel_dq(c, n.input.first()?, nhwc)?;
    let (path, q, py) = only_q(c, n.output.first()?)?;
    attrs.push(attr_tensor("table", tensor_raw("table", &[256], 2, table_of(px, py))));
    Some(Rewrite {
        remove: [vec![idx], path].concat(),
        node: ep_node("EpQMaxPool", &format!("{}_kernel", n.name()), &[x], &q.output[0], attrs),
    })
}

fn concat(c: &Ctx, idx: usize, nhwc: &Made) -> Option<Rewrite> {
    let n = &c.g.nodes[idx];
    if n.attr_i("axis") != Some(1) || n.input.is_empty() {
        return None;
    }
    let ins: Vec<(&str, (f32, u8))> = n.input.iter().map(|i| kernel_dq(c, i, nhwc)).collect::<Option<_>>()?;
    let (path, q, py) = only_q(c, n.output.first()?)?;
    let tables: Vec<u8> = ins.iter().flat_map(|(_, p)| table_of(*p, py)).collect();
    let names: Vec<&str> = ins.iter().map(|(v, _)| *v).collect();
    let attrs = vec![attr_tensor("tables", tensor_raw("tables", &[ins.len() as i64, 256], 2, tables))];
    Some(Rewrite {
        remove: [vec![idx], path].concat(),
        node: ep_node("EpQConcat", &format!("{}_kernel", n.name()), &names, &q.output[0], attrs),
    })
}

/// Quantized layers (Conv/Gemm/MatMul reading a DequantizeLinear weight) of a QDQ model that the CPU backend's
/// integer kernels do not cover: they run as float ops carrying exact integers, slower than their fp32 form.
/// Each with the reason.
pub fn layers_without_int8_kernel(model: &Model) -> Vec<(String, String)> {
    let mut lowered = model.clone();
    crate::signed::signed_activations_to_unsigned(&mut lowered.graph);
    lowered.lower_qdq_kernels();
    let made: HashSet<&str> =
        lowered.graph.nodes.iter().filter(|n| n.domain_name() == DOMAIN).map(|n| n.name()).collect();
    let producers = model.graph.producers();
    model
        .graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op(), "Conv" | "Gemm" | "MatMul") && n.domain_name().is_empty())
        .filter(|n| {
            n.input
                .get(1)
                .and_then(|w| producers.get(w.as_str()))
                .is_some_and(|&p| model.graph.nodes[p].op() == "DequantizeLinear")
        })
        .filter(|n| !made.contains(format!("{}_kernel", n.name()).as_str()))
        .map(|n| {
            let why = match n.op() {
                "Conv" if n.attr_i("group").unwrap_or(1) > 1 => "grouped convolution other than depthwise",
                "Conv" => "pattern not covered (auto_pad, a depthwise convolution with a float output, or an activation outside the Q range)",
                "Gemm" => "pattern not covered (transA, alpha/beta ≠ 1, or weights not int8)",
                _ => "no integer kernel for MatMul yet",
            };
            (n.name().to_string(), why.to_string())
        })
        .collect()
}

/// The integer-kernel lowering on the graph types (an extension trait: they live in `edgepack-onnx`).
pub trait QdqKernels {
    /// Rewrites the QDQ patterns the integer kernels cover; returns how many were rewritten.
    fn lower_qdq_kernels(&mut self) -> usize;
}

impl QdqKernels for Model {
    /// [`Graph::lower_qdq_kernels`], declaring the kernel domain. Returns how many patterns became kernels.
    fn lower_qdq_kernels(&mut self) -> usize {
        let n = self.graph.lower_qdq_kernels();
        declare_kernels(self, n)
    }
}

/// Declares the kernel domain when `n` patterns became kernels; returns `n`.
pub(crate) fn declare_kernels(m: &mut Model, n: usize) -> usize {
    if n > 0 {
        m.set_opset(DOMAIN, 1);
    }
    n
}

impl QdqKernels for Graph {
    /// Rewrites the QDQ patterns the integer kernels cover (module docs) and puts their chains in NHWC.
    /// Returns how many patterns were rewritten (0: the graph is untouched).
    fn lower_qdq_kernels(&mut self) -> usize {
        let mut g = self.clone();
        if g.topo_sort().is_err() {
            return 0;
        }
        let c = Ctx::new(&g);
        let mut tables = crate::qdq_tables::Tables::new();
        let rewrites = match_rewrites(
            &g,
            |i, n, nhwc| match n.op() {
                "QuantizeLinear" if n.domain_name().is_empty() => {
                    let r = crate::qdq_tables::table(&c, i, nhwc, &tables)?;
                    crate::qdq_tables::record(&r, &mut tables);
                    Some(r)
                }
                "Conv" if n.domain_name().is_empty() => conv(&c, i),
                "Gemm" if n.domain_name().is_empty() => gemm(&c, i),
                "Add" => add(&c, i, nhwc),
                "MaxPool" => maxpool(&c, i, nhwc),
                "Concat" => concat(&c, i, nhwc),
                "MatMulInteger" if n.domain_name().is_empty() => dyn_gemm(&c, i),
                _ => None,
            },
            |_, _| 0,
        );
        let count = rewrites.len();
        if let Some(mut lowered) = g.apply_kernel_rewrites(rewrites) {
            crate::qdq_tables::fuse_output_tables(&mut lowered);
            *self = lowered;
        }
        count + self.quantize_kernels()
    }
}

/// The QuantizeLinear nodes of float values no integer pattern reads (after a Reshape, a Transpose, a float Concat:
/// a detector's head) → `EpQuantizeLinear`, the vectorised `round_half_even(x / s) + z` on any rank, instead of the
/// exact-division float ops (f64 casts) the integer lowering would write. The Q after a Conv, Gemm, MatMul, Add,
/// Relu or Clip stays: the integer lowering reads it as a requantization.
trait QuantizeKernels {
    fn quantize_kernels(&mut self) -> usize;
}

impl QuantizeKernels for Graph {
    fn quantize_kernels(&mut self) -> usize {
        let producers: HashMap<String, String> =
            self.nodes.iter().flat_map(|n| n.output.iter().map(move |o| (o.clone(), n.op().to_string()))).collect();
        let mut count = 0;
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            if n.op() != "QuantizeLinear" || !n.domain_name().is_empty() || n.input.is_empty() || n.output.len() != 1 {
                continue;
            }
            let Some((s, z)) = u8_params(self, n) else { continue };
            let requant = producers
                .get(&n.input[0])
                .is_some_and(|p| matches!(p.as_str(), "Conv" | "Gemm" | "MatMul" | "Add" | "Relu" | "Clip"));
            if requant {
                continue;
            }
            let attrs = vec![attr_float("scale", s), attr_int("zero", z as i64)];
            let name = format!("{}_kernel", n.name());
            self.nodes[i] = ep_node("EpQuantizeLinear", &name, &[&n.input[0]], &n.output[0], attrs);
            count += 1;
        }
        if count > 0 {
            self.remove_unused_initializers();
        }
        count
    }
}

/// Kernel outputs the rewrites so far produce in the NHWC layout, with their channel count where a lowering
/// needs it (the float Concat's offsets; 0 otherwise).
pub(crate) type Made = HashMap<String, usize>;

/// The matching loop of both kernel lowerings: nodes in topological order, each offered to `matcher` with the
/// kernel outputs made so far; a rewrite overlapping an earlier one's nodes is dropped; `channels` gives a new
/// layout node's channel count.
pub(crate) fn match_rewrites(
    g: &Graph,
    mut matcher: impl FnMut(usize, &NodeProto, &Made) -> Option<Rewrite>,
    channels: impl Fn(&NodeProto, &Made) -> usize,
) -> Vec<Rewrite> {
    let mut made = Made::new();
    let mut taken: HashSet<usize> = HashSet::new();
    let mut out = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if taken.contains(&i) {
            continue;
        }
        if let Some(r) = matcher(i, n, &made)
            && r.remove.iter().all(|k| !taken.contains(k))
        {
            taken.extend(r.remove.iter().copied());
            if r.node.op() == SPLIT {
                for (o, c) in r.node.output.iter().zip(r.node.attr_ints("split").unwrap_or_default()) {
                    made.insert(o.clone(), *c as usize);
                }
            } else if in_layout(r.node.op()) {
                made.insert(r.node.output[0].clone(), channels(&r.node, &made));
            }
            out.push(r);
        }
    }
    out
}

/// A channel Split of a kernel output as a rewrite writes it: one node with the Split's outputs and their sizes
/// (`split`), which [`ApplyRewrites::apply_kernel_rewrites`] expands into one `EpChannels` node per output.
pub(crate) const SPLIT: &str = "EpSplit";

fn expand_split(n: NodeProto) -> Vec<NodeProto> {
    if n.op() != SPLIT {
        return vec![n];
    }
    let sizes = n.attr_ints("split").unwrap_or_default().to_vec();
    let mut c0 = 0;
    n.output
        .iter()
        .zip(sizes)
        .map(|(o, cw)| {
            let attrs = vec![attr_ints("channels", &[c0, cw])];
            c0 += cw;
            ep_node("EpChannels", &format!("{}_{o}", n.name()), &[&n.input[0]], o, attrs)
        })
        .collect()
}

/// Applying rewrites and the NHWC layout pass, shared by both kernel lowerings.
pub(crate) trait ApplyRewrites {
    fn apply_kernel_rewrites(self, rewrites: Vec<Rewrite>) -> Option<Graph>;
    fn nhwc_layout(&mut self);
}

impl ApplyRewrites for Graph {
    /// Replaces the rewritten nodes by their kernel nodes, runs the layout pass and cleans up. `None` (the graph
    /// left as it was) when nothing was rewritten or the result would not sort.
    fn apply_kernel_rewrites(mut self, rewrites: Vec<Rewrite>) -> Option<Graph> {
        if rewrites.is_empty() {
            return None;
        }
        let mut remove: Vec<usize> = rewrites.iter().flat_map(|r| r.remove.iter().copied()).collect();
        remove.sort_unstable();
        remove.dedup();
        for k in remove.into_iter().rev() {
            self.nodes.remove(k);
        }
        self.nodes.extend(rewrites.into_iter().flat_map(|r| expand_split(r.node)));
        self.nhwc_layout();
        self.topo_sort().ok()?;
        self.remove_dead_nodes();
        self.remove_unused_initializers();
        Some(self)
    }

    /// Renames kernel values to their NHWC twins and inserts the conversions at the chain boundaries.
    fn nhwc_layout(&mut self) {
        let is_ep = |n: &NodeProto| n.domain_name() == DOMAIN && in_layout(n.op());
        let ep_out: HashSet<String> =
            self.nodes.iter().filter(|n| is_ep(n)).flat_map(|n| n.output.iter().cloned()).collect();
        let producers: HashMap<String, usize> =
            self.nodes.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i))).collect();
        let mut into: BTreeMap<String, NodeProto> = BTreeMap::new();
        for k in 0..self.nodes.len() {
            if !is_ep(&self.nodes[k]) {
                continue;
            }
            for j in 0..self.nodes[k].input.len() {
                let u = self.nodes[k].input[j].clone();
                let twin = format!("{u}{NHWC}");
                if !ep_out.contains(&u) && !into.contains_key(&u) {
                    let q = producers.get(&u).map(|&p| &self.nodes[p]).filter(|p| p.op() == "QuantizeLinear");
                    let entry = match q.and_then(|q| Some((q, u8_params(self, q)?))) {
                        Some((q, (s, z))) => ep_node(
                            "EpQuantize",
                            &format!("{u}_to_nhwc"),
                            &[&q.input[0]],
                            &twin,
                            vec![attr_float("scale", s), attr_int("zero", z as i64)],
                        ),
                        None => ep_node(
                            "EpLayout",
                            &format!("{u}_to_nhwc"),
                            &[&u],
                            &twin,
                            vec![edgepack_onnx::builder::attr_string("to", "nhwc")],
                        ),
                    };
                    into.insert(u.clone(), entry);
                }
                self.nodes[k].input[j] = twin;
            }
            for o in self.nodes[k].output.iter_mut() {
                o.push_str(NHWC);
            }
        }
        let mut back: Vec<NodeProto> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut read: Vec<String> = self.outputs.iter().filter_map(|o| o.name.clone()).collect();
        for n in self.nodes.iter().filter(|n| !is_ep(n)) {
            read.extend(n.input.iter().cloned());
            let mut sub = HashSet::new();
            edgepack_onnx::collect_subgraph_refs(n, &mut sub);
            read.extend(sub);
        }
        for v in read {
            if ep_out.contains(&v) && seen.insert(v.clone()) {
                back.push(ep_node(
                    "EpLayout",
                    &format!("{v}_to_nchw"),
                    &[&format!("{v}{NHWC}")],
                    &v,
                    vec![edgepack_onnx::builder::attr_string("to", "nchw")],
                ));
            }
        }
        self.nodes.extend(into.into_values());
        self.nodes.extend(back);
    }
}
