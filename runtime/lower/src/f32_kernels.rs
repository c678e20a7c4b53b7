//! Float graphs to edgepack's fp32 kernels (`kernels::fconv`): custom `ai.edgepack` nodes on NHWC f32 tensors.
//!
//! - `Conv(x, W, b) → [Mul|Add by constants, BatchNormalization] → [Relu|Clip|SiLU|Sigmoid|HardSwish|HardSigmoid]
//!   → [Mul → Add by scalars]` (constant
//!   weights, group 1 or depthwise) → `EpConv(x)`: BatchNormalization after a Conv and constant `Mul`/`Add` (one
//!   value or one per channel) are folded into the weights and bias; the clamp, or SiLU (`Mul(v, Sigmoid(v))`,
//!   YOLO's activation) or HardSwish (written out `Add`/`Clip`/`Mul`/`Div`, the op, or `Mul(v, HardSigmoid(v))`;
//!   MobileNetV3's, PP-LCNet's) as attribute `act`, and a scalar `Mul`/`Add` after it as attribute `affine`
//!   (PP-LCNetV3's learnable affine blocks) are the output stage's;
//! - `Add(a, b)` [→ Relu|Clip], `MaxPool(x)`, `Concat(axis 1)`, `GlobalAveragePool(x)` whose inputs are kernel
//!   outputs → `EpAdd` (the activation as its clamp), `EpMaxPool`, `EpConcat`, `EpGlobalAveragePool` (its
//!   `[n, 1, 1, c]` NHWC output is already NCHW in memory, so the chain's exit transpose is free);
//! - `Mul(x, gate)` of kernel outputs, `gate` one pixel per channel (a GlobalAveragePool's output through 1×1
//!   convolutions and activations: a squeeze-and-excitation block, its HardSigmoid the last convolution's `act`) →
//!   `EpScale(x, gate)`;
//! - `ConvTranspose(x, W, b)` whose stride is its kernel (no padding) → `EpConvTranspose(x)`: one 1×1 convolution
//!   per kernel row writing its output rows in place, with `EpConv`'s output stage (BatchNormalization after the
//!   bias Add folded, Relu, sigmoid);
//! - a nearest-neighbour `Resize` of a kernel output by whole factors (constant scales `[1, 1, sh, sw]`, in the modes
//!   where that is pixel `(oy / sh, ox / sw)`: an FPN's top-down path) → `EpUpsample`;
//! - a Concat of group-1 convolutions read by nothing else → `EpConvConcat` (each writes its channels in place);
//! - an `EpAdd` of a group-1 convolution without a clamp or activation, read by nothing else, and another value →
//!   `EpConv(x, residual)`: the residual added in the convolution's output stage (a projection and its skip
//!   connection), the Add's clamp the convolution's (applied after the sum);
//! - a depthwise `EpConv` with the 1×1 convolution before it (an expansion) and/or after it (a projection, its
//!   residual fused), each read by nothing else → `EpConvChain`: run row by row, the wide tensors between them
//!   never leave the cache (an inverted-residual block: MobileNetV2's, EfficientNet's);
//! - `Gemm(x, W, b)` with constant weights → `EpGemm(x)` (rank 2, no layout of its own);
//! - a float `Softmax` over contiguous rows (opset < 13: any axis, the dimensions from it flattened; 13 on: the last
//!   axis) → `EpSoftmax(x)` (any rank, no layout of its own): one pass over all rows, where tract calls its
//!   reduction kernels once per row (a face detector's 4420 two-class rows took 1.8 ms of a 5 ms run).
//!
//! Then the layout pass of `qdq_kernels`: kernel chains stay NHWC, Transposes only where a chain starts or ends.
use std::collections::{HashMap, HashSet};

use crate::qdq_kernels::{Rewrite, conv_geometry, ep_node as ep, maxpool_attrs, pointwise_geometry};
use edgepack_onnx::builder::{attr_floats, attr_int, attr_ints, attr_string, attr_tensor, tensor_f32};
use edgepack_onnx::passes::tensor_f32_values;
use edgepack_onnx::{Graph, Model, NodeExt, NodeProto};

use crate::qdq_kernels::{ApplyRewrites, Made, SPLIT, declare_kernels, match_rewrites};

/// Op types of the float kernel nodes.
pub const OPS: [&str; 13] = [
    "EpConv",
    "EpConvConcat",
    "EpConvChain",
    "EpGemm",
    "EpAdd",
    "EpScale",
    "EpUpsample",
    "EpConvTranspose",
    "EpMaxPool",
    "EpConcat",
    "EpChannels",
    "EpGlobalAveragePool",
    "EpSoftmax",
];

struct Ctx<'a> {
    g: &'a Graph,
    readers: HashMap<&'a str, usize>,
    /// Graph outputs and values read inside subgraphs.
    pinned: HashSet<String>,
    float: HashMap<String, i32>,
    /// The default domain's opset (`None`: unknown, a graph lowered on its own).
    opset: Option<i64>,
    /// Values of one pixel per channel: a GlobalAveragePool's output and what 1×1 unpadded convolutions,
    /// activations and per-channel constants make of it (a squeeze-and-excitation block's gate).
    pooled: HashSet<String>,
}

impl Ctx<'_> {
    fn only_reader(&self, v: &str) -> Option<usize> {
        if self.readers.get(v).copied() != Some(1) || self.pinned.contains(v) {
            return None;
        }
        self.g.nodes.iter().position(|n| n.input.iter().any(|i| i == v))
    }

    fn scalar(&self, name: &str) -> Option<f32> {
        let v = tensor_f32_values(self.g.initializer(name)?)?;
        (v.len() == 1).then(|| v[0])
    }
}

fn conv(c: &Ctx, idx: usize) -> Option<Rewrite> {
    let g = c.g;
    let n = &g.nodes[idx];
    if c.float.get(n.input.first()?) != Some(&1) {
        return None;
    }
    let wt = g.initializer(n.input.get(1)?)?;
    if wt.dims.len() != 4 || wt.data_type != Some(1) {
        return None;
    }
    let mut w = tensor_f32_values(wt)?;
    let d: Vec<usize> = wt.dims.iter().map(|&v| v as usize).collect();
    let group = n.attr_i("group").unwrap_or(1).max(1) as usize;
    let (c_out, c_in) = (d[0], d[1].checked_mul(group)?);
    if c_out == 0 {
        return None;
    }
    let elements = d.iter().try_fold(1usize, |n, &x| n.checked_mul(x))?;
    if !(group == 1 || (group == c_in && c_out == c_in && d[1] == 1)) || w.len() != elements {
        return None;
    }
    let [strides, dilations, pads] = conv_geometry(n, d[2], d[3])?;
    let mut bias = match n.input.get(2).filter(|b| !b.is_empty()) {
        None => None,
        Some(b) => Some(tensor_f32_values(g.initializer(b)?).filter(|v| v.len() == c_out)?),
    };
    let st = output_stage(c, n.output.first()?, c_out);
    if let Some((scale, shift)) = &st.fold {
        let row = w.len() / c_out;
        for (ch, ws) in w.chunks_mut(row).enumerate() {
            ws.iter_mut().for_each(|v| *v *= scale[ch]);
        }
        let b = bias.get_or_insert_with(|| vec![0.0; c_out]);
        b.iter_mut().enumerate().for_each(|(ch, v)| *v = *v * scale[ch] + shift[ch]);
    }
    let raw: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut attrs = vec![
        attr_int("c_in", c_in as i64),
        attr_int("c_out", c_out as i64),
        attr_int("group", group as i64),
        attr_ints("kernel_shape", &[d[2] as i64, d[3] as i64]),
        attr_ints("strides", &strides),
        attr_ints("dilations", &dilations),
        attr_ints("pads", &pads),
        attr_tensor("weights", edgepack_onnx::builder::tensor_raw("weights", &wt.dims, 1, raw)),
    ];
    if let Some(b) = &bias {
        attrs.push(attr_tensor("bias", tensor_f32("bias", &[c_out as i64], b)));
    }
    attrs.extend(st.attrs());
    let mut remove = vec![idx];
    remove.extend(&st.remove);
    Some(Rewrite { remove, node: ep("EpConv", &format!("{}_kernel", n.name()), &[&n.input[0]], &st.out, attrs) })
}

/// What a convolution's output stage takes of the nodes after its output `v` (each the only reader of the one
/// before): constant `Mul`/`Add` (one value or one per channel) and inference `BatchNormalization`, folded into
/// the weights and bias (as onnxruntime's Conv-Mul, Conv-Add and Conv-BN fusions do: PP-LCNetV3's affine blocks, a
/// head's bias and BatchNorm); then a clamp (Relu, Clip), or SiLU, sigmoid, HardSwish or HardSigmoid as the
/// activation; then a scalar `Mul` → `Add` (either alone) as the affine after it.
struct Stage {
    remove: Vec<usize>,
    /// The last node's output: the kernel's.
    out: String,
    /// `[scale, shift]` per output channel to fold into the weights (`w·scale`) and bias (`b·scale + shift`).
    fold: Option<(Vec<f32>, Vec<f32>)>,
    clamp: [f32; 2],
    act: Option<&'static str>,
    act_params: [f32; 2],
    affine: Option<[f32; 2]>,
}

impl Stage {
    /// The kernel node's `clamp`, `act`, `act_params` and `affine` attributes.
    fn attrs(&self) -> Vec<edgepack_onnx::AttributeProto> {
        let mut attrs = vec![attr_floats("clamp", &self.clamp)];
        if let Some(a) = self.act {
            attrs.push(attr_string("act", a));
        }
        if self.act == Some("hardsigmoid") {
            attrs.push(attr_floats("act_params", &self.act_params));
        }
        if let Some(a) = self.affine {
            attrs.push(attr_floats("affine", &a));
        }
        attrs
    }
}

fn output_stage(c: &Ctx, v: &str, c_out: usize) -> Stage {
    let mut st = Stage {
        remove: Vec::new(),
        out: v.to_string(),
        fold: None,
        clamp: [f32::NEG_INFINITY, f32::INFINITY],
        act: None,
        act_params: [0.0; 2],
        affine: None,
    };
    let (mut scale, mut shift) = (vec![1f32; c_out], vec![0f32; c_out]);
    loop {
        if let Some((i, mul, k, o)) = channel_const_of(c, &st.out, c_out, true) {
            let per = |ch: usize| if k.len() == 1 { k[0] } else { k[ch] };
            for ch in 0..c_out {
                if mul {
                    scale[ch] *= per(ch);
                    shift[ch] *= per(ch);
                } else {
                    shift[ch] += per(ch);
                }
            }
            st.remove.push(i);
            st.out = o;
        } else if let Some((i, k, mean, beta, o)) = batchnorm_of(c, &st.out, c_out) {
            for ch in 0..c_out {
                scale[ch] *= k[ch];
                shift[ch] = (shift[ch] - mean[ch]) * k[ch] + beta[ch];
            }
            st.remove.push(i);
            st.out = o;
        } else {
            break;
        }
    }
    if !st.remove.is_empty() {
        st.fold = Some((scale, shift));
    }
    if let Some((i, cl, o)) = activation_of(c, &st.out) {
        st.clamp = cl;
        st.remove.push(i);
        st.out = o;
    } else if let Some((nodes, o)) = silu_of(c, &st.out) {
        st.act = Some("silu");
        st.remove.extend(nodes);
        st.out = o;
    } else if let Some((nodes, o)) = hardswish_of(c, &st.out) {
        st.act = Some("hardswish");
        st.remove.extend(nodes);
        st.out = o;
    } else if let Some((i, ab, o)) = hardsigmoid_of(c, &st.out) {
        st.act = Some("hardsigmoid");
        st.act_params = ab;
        st.remove.push(i);
        st.out = o;
    } else if let Some(i) = c.only_reader(&st.out).filter(|&i| {
        let n = &c.g.nodes[i];
        n.op() == "Sigmoid" && n.domain_name().is_empty() && n.input.len() == 1 && n.output.len() == 1
    }) {
        st.act = Some("sigmoid");
        st.remove.push(i);
        st.out = c.g.nodes[i].output[0].clone();
    }
    // After a clamp or an activation: a scalar `Mul` then `Add` (either alone) as the output stage's affine.
    if st.clamp != [f32::NEG_INFINITY, f32::INFINITY] || st.act.is_some() {
        let mut post = [1.0f32, 0.0];
        for want_mul in [true, false] {
            match channel_const_of(c, &st.out, 1, false) {
                Some((i, mul, k, o)) if mul == want_mul => {
                    post[usize::from(!mul)] = k[0];
                    st.remove.push(i);
                    st.out = o;
                    st.affine = Some(post);
                }
                _ => {}
            }
        }
    }
    st
}

/// The inference `BatchNormalization` (constant parameters of `c_out` values, one output) that alone reads `v`:
/// (its index, `γ/√(σ²+ε)`, the mean, `β`, its output).
#[allow(clippy::type_complexity)]
fn batchnorm_of(c: &Ctx, v: &str, c_out: usize) -> Option<(usize, Vec<f32>, Vec<f32>, Vec<f32>, String)> {
    let i = c.only_reader(v)?;
    let n = &c.g.nodes[i];
    let one_output = n.output.len() == 1 || n.output[1..].iter().all(|o| o.is_empty());
    if n.op() != "BatchNormalization" || !n.domain_name().is_empty() || n.input.len() != 5 || !one_output {
        return None;
    }
    if n.attr_i("training_mode").unwrap_or(0) != 0 || n.input[0] != v {
        return None;
    }
    let (k, mean, beta) = c.g.batchnorm_scale(n, c_out)?;
    let finite = k.iter().chain(&mean).chain(&beta).all(|x| x.is_finite());
    finite.then(|| Some((i, k, mean, beta, n.output[0].clone())))?
}

/// `ConvTranspose(x, W, b)` whose stride is its kernel (constant weights `[c_in, c_out, kh, kw]`, group 1, no
/// padding, dilation or output padding: a segmentation head's ×2 upsampling) → `EpConvTranspose(x)`: each input
/// pixel's `kh·kw` output pixels do not overlap, so kernel row `dy` is a 1×1 convolution to `kw·c_out` channels
/// writing output rows `y·kh + dy` in place (attributes of an `EpConv` per kernel row, suffixed `_dy`), with the
/// same output stage as `EpConv`.
fn conv_transpose(c: &Ctx, idx: usize) -> Option<Rewrite> {
    let g = c.g;
    let n = &g.nodes[idx];
    if c.float.get(n.input.first()?) != Some(&1) || n.output.len() != 1 {
        return None;
    }
    let wt = g.initializer(n.input.get(1)?)?;
    if wt.dims.len() != 4 || wt.data_type != Some(1) || n.attr_i("group").unwrap_or(1) != 1 {
        return None;
    }
    let w = tensor_f32_values(wt)?;
    let [c_in, c_out, kh, kw] = [0, 1, 2, 3].map(|i| wt.dims[i] as usize);
    let k = [kh as i64, kw as i64];
    let zeros = |name: &str| n.attr_ints(name).is_none_or(|v| v.iter().all(|&x| x == 0));
    let geometry = n.attr_ints("strides") == Some(&k[..])
        && n.attr_ints("kernel_shape").is_none_or(|v| v == k)
        && n.attr_ints("dilations").is_none_or(|v| v.iter().all(|&x| x == 1))
        && zeros("pads")
        && zeros("output_padding")
        && n.attr("output_shape").is_none()
        && n.attr_s("auto_pad").is_none_or(|a| a == "NOTSET");
    let count = [c_in, c_out, kh, kw].iter().try_fold(1usize, |a, &b| a.checked_mul(b));
    if !geometry || count != Some(w.len()) || c_in == 0 || c_out == 0 || kh == 0 || kw == 0 {
        return None;
    }
    let mut bias = match n.input.get(2).filter(|b| !b.is_empty()) {
        None => vec![0f32; c_out],
        Some(b) => tensor_f32_values(g.initializer(b)?).filter(|v| v.len() == c_out)?,
    };
    let st = output_stage(c, &n.output[0], c_out);
    let (scale, shift) = st.fold.clone().unwrap_or((vec![1.0; c_out], vec![0.0; c_out]));
    bias.iter_mut().enumerate().for_each(|(ch, b)| *b = *b * scale[ch] + shift[ch]);
    let wide = kw * c_out;
    let mut attrs = vec![attr_ints("kernel_shape", &k), attr_int("c_out", c_out as i64)];
    for dy in 0..kh {
        // OIHW [(dx, co), ci, 1, 1] of kernel row dy.
        let sub: Vec<f32> = (0..wide * c_in)
            .map(|i| {
                let (o, ci) = (i / c_in, i % c_in);
                let (dx, co) = (o / c_out, o % c_out);
                w[((ci * c_out + co) * kh + dy) * kw + dx] * scale[co]
            })
            .collect();
        let sub_bias: Vec<f32> = (0..wide).map(|o| bias[o % c_out]).collect();
        let raw: Vec<u8> = sub.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut a = pointwise_geometry(c_in, wide);
        a.extend([
            attr_tensor(
                "weights",
                edgepack_onnx::builder::tensor_raw("weights", &[wide as i64, c_in as i64, 1, 1], 1, raw),
            ),
            attr_tensor("bias", tensor_f32("bias", &[wide as i64], &sub_bias)),
        ]);
        a.extend(st.attrs());
        for mut at in a {
            at.name = Some(format!("{}_{dy}", at.name.as_deref().unwrap_or_default()));
            attrs.push(at);
        }
    }
    let mut remove = vec![idx];
    remove.extend(&st.remove);
    let name = format!("{}_kernel", n.name());
    Some(Rewrite { remove, node: ep("EpConvTranspose", &name, &[&n.input[0]], &st.out, attrs) })
}

/// The `Relu` or `Clip` (constant bounds) that alone reads `v`: (its node index, its `[lo, hi]`, its output).
fn activation_of(c: &Ctx, v: &str) -> Option<(usize, [f32; 2], String)> {
    let i = c.only_reader(v)?;
    let a = &c.g.nodes[i];
    if !a.domain_name().is_empty() {
        return None;
    }
    let bound = |k: usize, default: f32| match a.input.get(k).filter(|s| !s.is_empty()) {
        None => Some(default),
        Some(s) => c.scalar(s),
    };
    let cl = match a.op() {
        "Relu" => [0.0, f32::INFINITY],
        "Clip" => bound(1, f32::NEG_INFINITY).zip(bound(2, f32::INFINITY)).map(|(lo, hi)| [lo, hi])?,
        _ => return None,
    };
    (!cl[0].is_nan() && !cl[1].is_nan() && cl[0] <= cl[1]).then(|| Some((i, cl, a.output.first()?.clone())))?
}

/// The `Mul` or `Add` (default domain) that alone reads `v`, a 4-D value of `c_out` channels, and multiplies or adds a
/// finite constant of one value or (when `per_channel`) one per channel (`[c_out, 1, 1]`, leading 1s allowed): (its
/// node index, whether it is a `Mul`, the values, its output).
fn channel_const_of(c: &Ctx, v: &str, c_out: usize, per_channel: bool) -> Option<(usize, bool, Vec<f32>, String)> {
    let i = c.only_reader(v)?;
    let n = &c.g.nodes[i];
    if !n.domain_name().is_empty() || !matches!(n.op(), "Mul" | "Add") || n.input.len() != 2 {
        return None;
    }
    let other = n.input.iter().find(|x| *x != v)?;
    let t = c.g.initializer(other)?;
    let k = tensor_f32_values(t).filter(|k| k.iter().all(|x| x.is_finite()))?;
    let dims: Vec<i64> = t.dims.iter().copied().skip_while(|&d| d == 1).collect();
    if t.dims.len() > 4 || !(k.len() == 1 || (per_channel && dims == [c_out as i64, 1, 1])) {
        return None;
    }
    Some((i, n.op() == "Mul", k, n.output.first()?.clone()))
}

/// HardSwish after `v`: written out as `Div(Mul(v, Clip(Add(v, 3), 0, 6)), 6)` (each node the only reader of the one
/// before, `v` read by the Add and the Mul alone), the `HardSwish` op, or `Mul(v, HardSigmoid(v))` with α = 1/6,
/// β = ½: (the node indices, the last one's output).
fn hardswish_of(c: &Ctx, v: &str) -> Option<(Vec<usize>, String)> {
    let g = c.g;
    let plain = |i: usize, op: &str| g.nodes[i].op() == op && g.nodes[i].domain_name().is_empty();
    let out = |i: usize| g.nodes[i].output.first().cloned();
    if let Some(i) = c.only_reader(v).filter(|&i| plain(i, "HardSwish")) {
        return Some((vec![i], out(i)?));
    }
    if c.readers.get(v) != Some(&2) || c.pinned.contains(v) {
        return None;
    }
    let reads = |i: usize, a: &str, b: &str| {
        let n = &g.nodes[i].input;
        n.len() == 2 && ((n[0] == a && n[1] == b) || (n[0] == b && n[1] == a))
    };
    let is_const = |name: &str, want: f32| c.scalar(name) == Some(want);
    let readers_of_v = (0..g.nodes.len()).filter(|&i| g.nodes[i].input.iter().any(|x| x == v));
    for first in readers_of_v {
        let n = &g.nodes[first];
        if plain(first, "Add") && n.input.len() == 2 && n.input.iter().any(|x| x != v && is_const(x, 3.0)) {
            let (clip, cl, clip_out) = activation_of(c, &out(first)?)?;
            let mul = c.only_reader(&clip_out).filter(|&m| plain(m, "Mul") && reads(m, v, &clip_out))?;
            let div = c.only_reader(&out(mul)?)?;
            let d = &g.nodes[div];
            let by_six = plain(div, "Div") && d.input.len() == 2 && is_const(&d.input[1], 6.0);
            return (cl == [0.0, 6.0] && by_six).then(|| Some((vec![first, clip, mul, div], out(div)?)))?;
        }
        if plain(first, "HardSigmoid") && n.input.len() == 1 {
            let (alpha, beta) = (n.attr_f("alpha").unwrap_or(0.2), n.attr_f("beta").unwrap_or(0.5));
            let hs = out(first)?;
            let mul = c.only_reader(&hs).filter(|&m| plain(m, "Mul") && reads(m, v, &hs))?;
            return (alpha == 1.0 / 6.0 && beta == 0.5).then(|| Some((vec![first, mul], out(mul)?)))?;
        }
    }
    None
}

/// The `HardSigmoid` (finite α, β) that alone reads `v`: (its index, `[α, β]`, its output).
fn hardsigmoid_of(c: &Ctx, v: &str) -> Option<(usize, [f32; 2], String)> {
    let i = c.only_reader(v)?;
    let n = &c.g.nodes[i];
    if n.op() != "HardSigmoid" || !n.domain_name().is_empty() || n.input.len() != 1 {
        return None;
    }
    let ab = [n.attr_f("alpha").unwrap_or(0.2), n.attr_f("beta").unwrap_or(0.5)];
    ab.iter().all(|x| x.is_finite()).then(|| Some((i, ab, n.output.first()?.clone())))?
}

/// The values of one pixel per channel (`Ctx::pooled`), in one pass over the sorted graph.
fn pooled_values(g: &Graph) -> HashSet<String> {
    let mut pooled: HashSet<String> = HashSet::new();
    // A constant that broadcasts over channels only (its last two dimensions 1, or a single value).
    let per_channel = |name: &str| {
        g.initializer(name).is_some_and(|t| {
            let d = &t.dims;
            d.len() <= 4 && (d.iter().product::<i64>() == 1 || (d.len() >= 3 && d[d.len() - 2..] == [1, 1]))
        })
    };
    for n in &g.nodes {
        let Some(out) = n.output.first() else { continue };
        if !n.domain_name().is_empty() || n.output.len() != 1 {
            continue;
        }
        let first = n.input.first().is_some_and(|i| pooled.contains(i));
        let one = match n.op() {
            "GlobalAveragePool" => true,
            "Conv" => {
                let unpadded = n.attr_ints("pads").is_none_or(|p| p.iter().all(|&v| v == 0))
                    && n.attr_s("auto_pad").is_none_or(|a| a == "NOTSET" || a == "VALID");
                let w = n.input.get(1).and_then(|w| g.initializer(w));
                first && unpadded && w.is_some_and(|w| w.dims.len() == 4 && w.dims[2..] == [1, 1])
            }
            "Relu" | "Clip" | "Sigmoid" | "HardSigmoid" | "HardSwish" => first,
            "Mul" | "Add" | "Sub" | "Div" if n.input.len() == 2 => {
                n.input.iter().all(|i| pooled.contains(i) || per_channel(i))
            }
            _ => false,
        };
        if one {
            pooled.insert(out.clone());
        }
    }
    pooled
}

/// SiLU written out, `Mul(v, Sigmoid(v))` (either operand order), when those two nodes are `v`'s only readers and
/// the Sigmoid's output is read by the Mul alone: (the two node indices, the Mul's output).
fn silu_of(c: &Ctx, v: &str) -> Option<(Vec<usize>, String)> {
    if c.readers.get(v) != Some(&2) || c.pinned.contains(v) {
        return None;
    }
    let g = c.g;
    let plain = |i: usize, op: &str| g.nodes[i].op() == op && g.nodes[i].domain_name().is_empty();
    let sig = (0..g.nodes.len()).find(|&i| plain(i, "Sigmoid") && g.nodes[i].input.first().is_some_and(|x| x == v))?;
    let s = g.nodes[sig].output.first()?;
    let mul = c.only_reader(s)?;
    let m = &g.nodes[mul];
    let operands = m.input.len() == 2 && m.input.iter().any(|i| i == v) && m.input.iter().any(|i| i == s);
    (plain(mul, "Mul") && operands).then_some(())?;
    Some((vec![sig, mul], m.output.first()?.clone()))
}

/// Output channels of a kernel node.
fn channels(n: &NodeProto, made: &Made) -> usize {
    match n.op() {
        "EpConv" | "EpConvTranspose" => n.attr_i("c_out").unwrap_or(0) as usize,
        "EpConcat" => n.input.iter().map(|i| made.get(i).copied().unwrap_or(0)).sum(),
        "EpChannels" => n.attr_ints("channels").and_then(|c| c.get(1)).map_or(0, |&c| c as usize),
        _ => n.input.first().and_then(|i| made.get(i)).copied().unwrap_or(0),
    }
}

/// `Gemm(x, W, b)` with constant weights (transA 0, alpha = beta = 1) → `EpGemm(x)`: a 1×1 convolution over the
/// rows of `[N, K]` (the classifier head; rank 2, outside the NHWC chains).
fn gemm(c: &Ctx, idx: usize) -> Option<Rewrite> {
    let g = c.g;
    let n = &g.nodes[idx];
    if n.attr_i("transA").unwrap_or(0) != 0
        || n.attr_f("alpha").unwrap_or(1.0) != 1.0
        || n.attr_f("beta").unwrap_or(1.0) != 1.0
        || c.float.get(n.input.first()?) != Some(&1)
    {
        return None;
    }
    let wt = g.initializer(n.input.get(1)?)?;
    if wt.dims.len() != 2 || wt.data_type != Some(1) {
        return None;
    }
    let w = tensor_f32_values(wt)?;
    let tb = n.attr_i("transB").unwrap_or(0) == 1;
    let (d0, d1) = (wt.dims[0] as usize, wt.dims[1] as usize);
    let (k, c_out) = if tb { (d1, d0) } else { (d0, d1) };
    if w.len() != k * c_out {
        return None;
    }
    let bias = match n.input.get(2).filter(|b| !b.is_empty()) {
        None => None,
        Some(b) => Some(tensor_f32_values(g.initializer(b)?).filter(|v| v.len() == c_out)?),
    };
    // OIHW [c_out, k, 1, 1].
    let raw: Vec<u8> = (0..c_out * k)
        .flat_map(|i| {
            let (o, kk) = (i / k, i % k);
            (if tb { w[o * k + kk] } else { w[kk * c_out + o] }).to_le_bytes()
        })
        .collect();
    let mut attrs = pointwise_geometry(k, c_out);
    attrs.extend([
        attr_floats("clamp", &[f32::NEG_INFINITY, f32::INFINITY]),
        attr_tensor("weights", edgepack_onnx::builder::tensor_raw("weights", &[c_out as i64, k as i64, 1, 1], 1, raw)),
    ]);
    if let Some(b) = &bias {
        attrs.push(attr_tensor("bias", tensor_f32("bias", &[c_out as i64], b)));
    }
    let out = n.output.first()?;
    Some(Rewrite { remove: vec![idx], node: ep("EpGemm", &format!("{}_kernel", n.name()), &[&n.input[0]], out, attrs) })
}

/// A float `Softmax` whose rows are contiguous → `EpSoftmax(x)` with the axis its opset means: before opset 13 the
/// dimensions from `axis` on are flattened into the row (any axis); from 13 on only the last axis is a row (a
/// positive axis needs the rank, which a graph does not always carry: only `-1` is taken). Without the opset only
/// an explicit `axis = -1` is taken (the same rows under both definitions).
fn softmax(c: &Ctx, idx: usize) -> Option<Rewrite> {
    let n = &c.g.nodes[idx];
    if c.float.get(n.input.first()?) != Some(&1) || n.input.len() != 1 || n.output.len() != 1 {
        return None;
    }
    let axis = match (n.attr_i("axis"), c.opset) {
        (Some(-1), _) => -1,
        (Some(a), Some(v)) if v < 13 => a,
        (None, Some(v)) => {
            if v < 13 {
                1
            } else {
                -1
            }
        }
        _ => return None,
    };
    let node =
        ep("EpSoftmax", &format!("{}_kernel", n.name()), &[&n.input[0]], &n.output[0], vec![attr_int("axis", axis)]);
    Some(Rewrite { remove: vec![idx], node })
}

fn simple(c: &Ctx, idx: usize, made: &Made) -> Option<Rewrite> {
    let n = &c.g.nodes[idx];
    // Resize's other inputs are constants (roi, scales).
    let data = if n.op() == "Resize" { &n.input[..1.min(n.input.len())] } else { &n.input[..] };
    if !n.domain_name().is_empty() || n.output.len() != 1 || !data.iter().all(|i| made.contains_key(i)) {
        return None;
    }
    // A residual Add, or a gate's Mul, of equal channel counts (no broadcasting across channels).
    if matches!(n.op(), "Add" | "Mul") && n.input.iter().map(|i| made[i]).collect::<HashSet<_>>().len() != 1 {
        return None;
    }
    let name = format!("{}_kernel", n.name());
    let ins: Vec<&str> = n.input.iter().map(|s| s.as_str()).collect();
    if ins.is_empty() {
        return None;
    }
    // A Relu or Clip that alone reads the sum: applied to it (a residual block's activation).
    let act = if n.op() == "Add" { activation_of(c, &n.output[0]) } else { None };
    let same = |a: &str, b: &str| c.pooled.contains(a) == c.pooled.contains(b);
    if let Some((a, cl, out)) = act.filter(|_| ins.len() == 2 && same(ins[0], ins[1])) {
        let node = ep("EpAdd", &name, &ins, &out, vec![attr_floats("clamp", &cl)]);
        return Some(Rewrite { remove: vec![idx, a], node });
    }
    let node = match n.op() {
        // Not a broadcast of a gate over an image (EpAdd adds equal shapes).
        "Add" if ins.len() == 2 && same(ins[0], ins[1]) => ep("EpAdd", &name, &ins, &n.output[0], vec![]),
        // A gate of one pixel per channel times an image of those channels: the gate second.
        "Mul" if ins.len() == 2 => {
            let gate = |i: &str| c.pooled.contains(i);
            let ins = match (gate(ins[0]), gate(ins[1])) {
                (false, true) => [ins[0], ins[1]],
                (true, false) => [ins[1], ins[0]],
                _ => return None,
            };
            ep("EpScale", &name, &ins, &n.output[0], vec![])
        }
        "GlobalAveragePool" if ins.len() == 1 => ep("EpGlobalAveragePool", &name, &ins, &n.output[0], vec![]),
        "Concat" if n.attr_i("axis") == Some(1) && !ins.is_empty() => ep("EpConcat", &name, &ins, &n.output[0], vec![]),
        "MaxPool" if ins.len() == 1 => ep("EpMaxPool", &name, &ins, &n.output[0], maxpool_attrs(n)?),
        "Resize" => {
            ep("EpUpsample", &name, &ins[..1], &n.output[0], vec![attr_ints("scales", &upsample_scales(c.g, n)?)])
        }
        _ => return None,
    };
    Some(Rewrite { remove: vec![idx], node })
}

/// A channel `Split` of a kernel output with explicit sizes → one `EpChannels` per output (written as one
/// `EpSplit` rewrite, expanded when applied): a C2f block's halves stay in the NHWC chain.
fn split(c: &Ctx, idx: usize, made: &Made) -> Option<Rewrite> {
    let n = &c.g.nodes[idx];
    let sizes = crate::qdq_tables::split_sizes(c.g, n)?;
    let x = n.input.first()?;
    let total = *made.get(x)?;
    if sizes.iter().sum::<usize>() != total || n.output.iter().any(|o| o.is_empty()) {
        return None;
    }
    let split: Vec<i64> = sizes.iter().map(|&s| s as i64).collect();
    let outs: Vec<&str> = n.output.iter().map(|o| o.as_str()).collect();
    let mut node =
        edgepack_onnx::node(SPLIT, &format!("{}_kernel", n.name()), &[x], &outs, vec![attr_ints("split", &split)]);
    node.domain = Some(crate::qdq_kernels::DOMAIN.into());
    Some(Rewrite { remove: vec![idx], node })
}

/// A `Resize` (opset 11 on: `X, roi, scales[, sizes]`) that upsamples height and width by whole factors with
/// nearest neighbours, `scales = [1, 1, sh, sw]` constant, no `sizes` and no `axes`: `[sh, sw]`. Taken in the modes
/// where that is pixel `(oy / sh, ox / sw)`: asymmetric with `floor`, and (pytorch_)half_pixel with either
/// round-to-nearest (whole factors never land on a tie).
pub(crate) fn upsample_scales(g: &Graph, n: &NodeProto) -> Option<[i64; 2]> {
    if n.input.len() < 3 || n.attr_s("mode") != Some("nearest") || n.attr("axes").is_some() {
        return None;
    }
    if n.input.get(3).is_some_and(|s| !s.is_empty()) {
        return None;
    }
    let ctm = n.attr_s("coordinate_transformation_mode").unwrap_or("half_pixel");
    let nearest = n.attr_s("nearest_mode").unwrap_or("round_prefer_floor");
    let whole = match ctm {
        "asymmetric" => nearest == "floor",
        "half_pixel" | "pytorch_half_pixel" => matches!(nearest, "round_prefer_floor" | "round_prefer_ceil"),
        _ => false,
    };
    let s = tensor_f32_values(g.initializer(&n.input[2])?)?;
    let int = |v: f32| ((1.0..=crate::nodes::LIMIT_SCALE as f32).contains(&v) && v.fract() == 0.0).then_some(v as i64);
    match s.as_slice() {
        &[1.0, 1.0, sh, sw] if whole => Some([int(sh)?, int(sw)?]),
        _ => None,
    }
}

/// `EpConcat` of group-1 `EpConv` outputs read by nothing else → one `EpConvConcat`: each convolution writes
/// its channels of the concatenated output (SqueezeNet's fire modules), saving the Concat's copy.
fn fuse_conv_concats(c: &Ctx, rewrites: Vec<Rewrite>) -> Vec<Rewrite> {
    let by_output: HashMap<&str, usize> =
        rewrites.iter().enumerate().map(|(i, r)| (r.node.output[0].as_str(), i)).collect();
    let mut fused: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, r) in rewrites.iter().enumerate() {
        if r.node.op() != "EpConcat" {
            continue;
        }
        let convs: Option<Vec<usize>> = r
            .node
            .input
            .iter()
            .map(|v| {
                let k = *by_output.get(v.as_str())?;
                let n = &rewrites[k].node;
                (n.op() == "EpConv"
                    && n.attr_i("group") == Some(1)
                    && c.readers.get(v.as_str()) == Some(&1)
                    && !c.pinned.contains(v))
                .then_some(k)
            })
            .collect();
        if let Some(convs) = convs.filter(|v| v.iter().collect::<HashSet<_>>().len() == v.len()) {
            fused.push((i, convs));
        }
    }
    let mut gone: HashSet<usize> = HashSet::new();
    let mut merged: HashMap<usize, Rewrite> = HashMap::new();
    for (i, convs) in fused {
        let cat = &rewrites[i];
        let mut remove = cat.remove.clone();
        let mut attrs = Vec::new();
        let mut inputs = Vec::new();
        for (j, &k) in convs.iter().enumerate() {
            let conv = &rewrites[k];
            remove.extend(conv.remove.iter().copied());
            inputs.push(conv.node.input[0].as_str());
            attrs.extend(suffixed_attrs(&conv.node, j));
            gone.insert(k);
        }
        let node = ep("EpConvConcat", cat.node.name(), &inputs, &cat.node.output[0], attrs);
        merged.insert(i, Rewrite { remove, node });
    }
    merge_rewrites(rewrites, &gone, merged)
}

/// `EpAdd(a, b)` where `a` is the output of a group-1 `EpConv` without a clamp or activation, read by nothing else (a
/// projection and its skip connection) → `EpConv(x, b)`: the convolution adds `b` in its output stage, and the
/// Add's pass over memory (a part split of its own on every thread) goes.
fn fuse_residual_adds(c: &Ctx, rewrites: Vec<Rewrite>) -> Vec<Rewrite> {
    let by_output: HashMap<&str, usize> =
        rewrites.iter().enumerate().map(|(i, r)| (r.node.output[0].as_str(), i)).collect();
    let none = [f32::NEG_INFINITY, f32::INFINITY];
    let mut fused: Vec<(usize, usize, String)> = Vec::new();
    let mut used: HashSet<usize> = HashSet::new();
    for (i, r) in rewrites.iter().enumerate() {
        if r.node.op() != "EpAdd" || r.node.input.len() != 2 || r.node.input[0] == r.node.input[1] {
            continue;
        }
        let conv_of = |v: &str| {
            let k = *by_output.get(v)?;
            let n = &rewrites[k].node;
            let bare = n.op() == "EpConv"
                && n.input.len() == 1
                && n.attr_i("group") == Some(1)
                && n.attribute.iter().find(|a| a.name.as_deref() == Some("clamp")).is_some_and(|a| a.floats == none)
                && n.attr_s("act").is_none()
                && n.attr("affine").is_none()
                && c.readers.get(v) == Some(&1)
                && !c.pinned.contains(v);
            (bare && !used.contains(&k)).then_some(k)
        };
        let pick = [0, 1].into_iter().find_map(|j| Some((conv_of(&r.node.input[j])?, r.node.input[1 - j].clone())));
        if let Some((k, residual)) = pick {
            used.insert(k);
            fused.push((i, k, residual));
        }
    }
    let mut gone: HashSet<usize> = HashSet::new();
    let mut merged: HashMap<usize, Rewrite> = HashMap::new();
    for (i, k, residual) in fused {
        let (add, conv) = (&rewrites[i], &rewrites[k]);
        let mut remove = conv.remove.clone();
        remove.extend(add.remove.iter().copied());
        let mut node = conv.node.clone();
        node.input.push(residual);
        node.output = add.node.output.clone();
        // The Add's clamp (a Relu or Clip after it) is applied after the sum, as the convolution's clamp.
        if let Some(cl) = add.node.attribute.iter().find(|a| a.name.as_deref() == Some("clamp")) {
            node.attribute.retain(|at| at.name.as_deref() != Some("clamp"));
            node.attribute.push(cl.clone());
        }
        gone.insert(k);
        merged.insert(i, Rewrite { remove, node });
    }
    merge_rewrites(rewrites, &gone, merged)
}

/// A depthwise `EpConv` with the 1×1 group-1 `EpConv` whose output only it reads (an expansion) and the one that
/// only reads its output (a projection, with or without a fused residual), at least one of the two →
/// `EpConvChain(x[, residual])`: the convolutions run row by row (`kernels::fconv::FChain`), so the wide tensors
/// between them stay in cache. Attribute `convs` counts them; convolution `i`'s attributes carry the suffix `_i`.
fn fuse_conv_chains(c: &Ctx, rewrites: Vec<Rewrite>) -> Vec<Rewrite> {
    let by_output: HashMap<&str, usize> =
        rewrites.iter().enumerate().map(|(i, r)| (r.node.output[0].as_str(), i)).collect();
    let ints = |n: &NodeProto, a: &str| n.attr(a).map(|t| t.ints.clone()).unwrap_or_default();
    let pointwise = |n: &NodeProto| {
        n.op() == "EpConv"
            && n.attr_i("group") == Some(1)
            && ints(n, "kernel_shape") == [1, 1]
            && ints(n, "strides") == [1, 1]
            && ints(n, "pads").iter().all(|&p| p == 0)
    };
    // The rewrite making `v`, when nothing else reads `v`.
    let only_maker =
        |v: &str| (c.readers.get(v) == Some(&1) && !c.pinned.contains(v)).then(|| by_output.get(v).copied()).flatten();
    let mut used: HashSet<usize> = HashSet::new();
    // (the depthwise convolution's index, the chain's indices in order)
    let mut chains: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, r) in rewrites.iter().enumerate() {
        let n = &r.node;
        // As the kernels decide (`ConvGeometry::check`): one channel with group 1 is an ordinary convolution.
        let depthwise = n.op() == "EpConv"
            && n.input.len() == 1
            && n.attr_i("c_in")
                .is_some_and(|ci| ci > 1 && n.attr_i("group") == Some(ci) && n.attr_i("c_out") == Some(ci));
        if !depthwise || used.contains(&i) {
            continue;
        }
        let pre = only_maker(&n.input[0])
            .filter(|&k| !used.contains(&k) && pointwise(&rewrites[k].node) && rewrites[k].node.input.len() == 1);
        let out = n.output[0].as_str();
        let post = (c.readers.get(out) == Some(&1) && !c.pinned.contains(out))
            .then(|| {
                rewrites
                    .iter()
                    .position(|p| pointwise(&p.node) && p.node.input.first().map(String::as_str) == Some(out))
            })
            .flatten()
            .filter(|k| !used.contains(k));
        if pre.is_none() && post.is_none() {
            continue;
        }
        let chain: Vec<usize> = pre.into_iter().chain([i]).chain(post).collect();
        used.extend(&chain);
        chains.push((i, chain));
    }
    let mut gone: HashSet<usize> = HashSet::new();
    let mut merged: HashMap<usize, Rewrite> = HashMap::new();
    for (at, chain) in chains {
        let (first, last) = (&rewrites[chain[0]].node, &rewrites[chain[chain.len() - 1]].node);
        let mut inputs = vec![first.input[0].as_str()];
        inputs.extend(last.input.get(1).map(String::as_str));
        let mut attrs = vec![attr_int("convs", chain.len() as i64)];
        let mut remove = Vec::new();
        for (j, &k) in chain.iter().enumerate() {
            remove.extend(rewrites[k].remove.iter().copied());
            attrs.extend(suffixed_attrs(&rewrites[k].node, j));
        }
        // The chain takes the depthwise convolution's place in the rewrites (the others are dropped) and name.
        let name = rewrites[at].node.name().to_string();
        let node = ep("EpConvChain", &name, &inputs, &last.output[0], attrs);
        gone.extend(chain.iter().filter(|&&k| k != at));
        merged.insert(at, Rewrite { remove, node });
    }
    merge_rewrites(rewrites, &gone, merged)
}

/// The attributes of kernel node `n`, each name suffixed `_j`: convolution `j` of a node running several
/// (`EpConvConcat`, `EpConvChain`; `nodes` parses them back with that suffix).
fn suffixed_attrs(n: &NodeProto, j: usize) -> impl Iterator<Item = edgepack_onnx::AttributeProto> + '_ {
    n.attribute.iter().map(move |a| {
        let mut a = a.clone();
        a.name = Some(format!("{}_{j}", a.name.as_deref().unwrap_or_default()));
        a
    })
}

/// `rewrites` without those in `gone`, each one in `merged` (by index) replaced by its merged rewrite.
fn merge_rewrites(rewrites: Vec<Rewrite>, gone: &HashSet<usize>, mut merged: HashMap<usize, Rewrite>) -> Vec<Rewrite> {
    rewrites
        .into_iter()
        .enumerate()
        .filter(|(k, _)| !gone.contains(k))
        .map(|(k, r)| merged.remove(&k).unwrap_or(r))
        .collect()
}

/// The float-kernel lowering on the graph types (an extension trait: they live in `edgepack-onnx`).
pub trait F32Kernels {
    /// Rewrites the float patterns the fp32 kernels cover; returns how many were rewritten.
    fn lower_f32_kernels(&mut self) -> usize;
    /// Rewrites float `Softmax` nodes only (→ `EpSoftmax`, outside any layout chain): the float part of a QDQ
    /// graph (a detector's box decode kept in fp32), where the rest of this lowering does not apply.
    fn lower_f32_softmax(&mut self) -> usize;
}

impl F32Kernels for Model {
    /// [`Graph::lower_f32_kernels`] knowing the opset (the axis of a Softmax depends on it), declaring the kernel
    /// domain. Returns how many patterns became kernels.
    fn lower_f32_kernels(&mut self) -> usize {
        let opset = self.opset("");
        let n = lower(&mut self.graph, opset, false);
        declare_kernels(self, n)
    }

    fn lower_f32_softmax(&mut self) -> usize {
        let opset = self.opset("");
        let n = lower(&mut self.graph, opset, true);
        declare_kernels(self, n)
    }
}

impl F32Kernels for Graph {
    /// Rewrites the float patterns the fp32 kernels cover (module docs) and puts their chains in NHWC. Returns
    /// how many patterns were rewritten (0: the graph is untouched). Meant for graphs without QDQ nodes.
    fn lower_f32_kernels(&mut self) -> usize {
        lower(self, None, false)
    }

    fn lower_f32_softmax(&mut self) -> usize {
        lower(self, None, true)
    }
}

/// The lowering of [`F32Kernels`] with the default domain's opset, when known; `softmax_only`: Softmax nodes only.
fn lower(graph: &mut Graph, opset: Option<i64>, softmax_only: bool) -> usize {
    let mut g = graph.clone();
    g.name_unnamed_nodes();
    // A graph lowered already (a QDQ graph's kernel chains) keeps its nodes and layout: Softmax nodes are replaced
    // in place (same values in and out, outside any layout chain).
    if !softmax_only {
        g.constants_to_initializers();
        g.fold_constant_reshapes();
        g.fold_batchnorm();
        g.bypass_inference_identities();
    }
    if g.topo_sort().is_err() {
        return 0;
    }
    let rewrites = {
        let mut readers = HashMap::new();
        let mut pinned: HashSet<String> = g.outputs.iter().filter_map(|o| o.name.clone()).collect();
        for n in &g.nodes {
            for i in n.input.iter().filter(|i| !i.is_empty()) {
                *readers.entry(i.as_str()).or_insert(0) += 1;
            }
            edgepack_onnx::collect_subgraph_refs(n, &mut pinned);
        }
        let c = Ctx { g: &g, readers, pinned, float: g.infer_elem_types(), opset, pooled: pooled_values(&g) };
        let out = match_rewrites(
            &g,
            |i, n, made| match n.op() {
                "Softmax" if n.domain_name().is_empty() => softmax(&c, i),
                _ if softmax_only => None,
                "Conv" if n.domain_name().is_empty() => conv(&c, i),
                "Gemm" if n.domain_name().is_empty() => gemm(&c, i),
                "ConvTranspose" if n.domain_name().is_empty() => conv_transpose(&c, i),
                "Add" | "Mul" | "Concat" | "MaxPool" | "GlobalAveragePool" | "Resize" => simple(&c, i, made),
                "Split" => split(&c, i, made),
                _ => None,
            },
            channels,
        );
        if softmax_only { out } else { fuse_conv_chains(&c, fuse_residual_adds(&c, fuse_conv_concats(&c, out))) }
    };
    let count = rewrites.len();
    if softmax_only {
        if count > 0 {
            for r in rewrites {
                g.nodes[r.remove[0]] = r.node;
            }
            *graph = g;
        }
        return count;
    }
    g.apply_kernel_rewrites(rewrites).map(|g| *graph = g).map_or(0, |_| count)
}

trait Bypass {
    fn bypass_inference_identities(&mut self) -> usize;
    fn fold_constant_reshapes(&mut self) -> usize;
}

impl Bypass for Graph {
    /// Replaces a `Reshape` of an f32 initializer by a constant shape (int64 initializer; `0` copies the input's
    /// dimension unless `allowzero`, one `-1` is inferred) with an initializer of the new dims: exporters write a
    /// per-channel bias as `Reshape(b, [1, c, 1, 1])`, which the constant folding of `Conv → Add` then takes.
    fn fold_constant_reshapes(&mut self) -> usize {
        let outputs: HashSet<String> = self.outputs.iter().filter_map(|o| o.name.clone()).collect();
        let fold = |n: &NodeProto| -> Option<edgepack_onnx::TensorProto> {
            if n.op() != "Reshape" || !n.domain_name().is_empty() || n.input.len() != 2 || n.output.len() != 1 {
                return None;
            }
            let out = n.output[0].clone();
            if outputs.contains(&out) || self.initializer(&out).is_some() {
                return None;
            }
            let data = self.initializer(&n.input[0]).filter(|t| t.data_type == Some(1))?;
            let shape = edgepack_onnx::tensor_from_proto(self.initializer(&n.input[1])?).ok()?;
            let edgepack_core::tensor::TensorData::I64(want) = shape.data() else { return None };
            let len: i64 = data.dims.iter().product();
            let allowzero = n.attr_i("allowzero").unwrap_or(0) != 0;
            let mut dims: Vec<i64> = want
                .iter()
                .enumerate()
                .map(|(i, &d)| if d == 0 && !allowzero { data.dims.get(i).copied().unwrap_or(-2) } else { d })
                .collect();
            let known: i64 = dims.iter().filter(|&&d| d != -1).product();
            match dims.iter().filter(|&&d| d == -1).count() {
                0 if known == len => {}
                1 if known > 0 && len % known == 0 => {
                    dims.iter_mut().filter(|d| **d == -1).for_each(|d| *d = len / known)
                }
                _ => return None,
            }
            if dims.iter().any(|&d| d < 0) {
                return None;
            }
            let mut t = data.clone();
            t.name = Some(out);
            t.dims = dims;
            Some(t)
        };
        let made: Vec<(usize, edgepack_onnx::TensorProto)> =
            self.nodes.iter().enumerate().filter_map(|(i, n)| Some((i, fold(n)?))).collect();
        let gone: HashSet<usize> = made.iter().map(|(i, _)| *i).collect();
        let mut i = 0;
        self.nodes.retain(|_| {
            i += 1;
            !gone.contains(&(i - 1))
        });
        let made: Vec<_> = made.into_iter().map(|(_, t)| t).collect();
        let count = made.len();
        self.initializers.extend(made);
        count
    }

    /// Removes `Identity` and inference `Dropout` nodes (only their first output read, not a graph output): their
    /// readers read the input instead. Kernel chains then run through them (SqueezeNet's Dropout before conv10).
    fn bypass_inference_identities(&mut self) -> usize {
        let outputs: HashSet<String> = self.outputs.iter().filter_map(|o| o.name.clone()).collect();
        let mut pinned = outputs.clone();
        for n in &self.nodes {
            edgepack_onnx::collect_subgraph_refs(n, &mut pinned);
        }
        let read: HashSet<String> = self.nodes.iter().flat_map(|n| n.input.iter().cloned()).collect();
        let mut renames: HashMap<String, String> = HashMap::new();
        self.nodes.retain(|n| {
            let bypass = matches!(n.op(), "Identity" | "Dropout")
                && n.domain_name().is_empty()
                && !n.input.is_empty()
                && n.output.first().is_some_and(|o| !pinned.contains(o))
                && n.output.iter().skip(1).all(|o| o.is_empty() || (!read.contains(o) && !pinned.contains(o)))
                && (n.op() == "Identity" || n.input.len() == 1 || n.attr_i("training_mode").unwrap_or(0) == 0);
            // Dropout's training_mode input (opset 12+) must be absent or a constant false; only the 1-input form
            // (or the attribute-free one) is taken here.
            let bypass = bypass && (n.op() == "Identity" || n.input.len() == 1);
            // An Identity writing the name it reads (`y → y`, over a graph input `y`) goes without a rename: its
            // readers read `y` already, and a rename of `y` to itself never resolves.
            if bypass && n.output[0] != n.input[0] {
                renames.insert(n.output[0].clone(), n.input[0].clone());
            }
            !bypass
        });
        // Follows a chain of bypassed nodes to its source; a cycle of them (no source) stops where it closes.
        let resolve = |v: &str| {
            let mut cur = v.to_string();
            let mut seen = HashSet::new();
            while let Some(next) = renames.get(&cur) {
                if !seen.insert(cur.clone()) {
                    break;
                }
                cur = next.clone();
            }
            cur
        };
        for n in &mut self.nodes {
            for i in n.input.iter_mut() {
                if renames.contains_key(i.as_str()) {
                    *i = resolve(i);
                }
            }
        }
        renames.len()
    }
}
