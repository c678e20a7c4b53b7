//! QDQ lowering to integer arithmetic, expressed with float ops that carry exact integers.
//!
//! A QDQ graph says `Q((Σ DQ(x)·DQ(w) + DQ(b)) → Relu/Clip, s_y)`: float products, float rounding, then one
//! division by `s_y`. Integer runtimes (onnxruntime's fused QLinearConv, edgepack's coming kernels) compute
//! `round(float(Σ (x−z_x)·w + b) · m) + z_y` with `m = s_x·s_w / s_y` per channel: exact integer accumulation and
//! one float multiply. The two round differently on a few values per layer and the flips grow through a deep
//! network. This pass rewrites the patterns below into the integer form:
//!
//! - `DQ(x) → Conv|Gemm(DQ(w), [DQ(b)]) → [Relu|Clip] → Q(s_y, z_y)` becomes
//!   `DQ(x, 1, z_x) → Conv|Gemm(w as integer floats, b as integer floats) → Mul(m) → Q(1, z_y)`;
//!   the Relu/Clip is dropped only when the Q range already lies inside it (saturation does the clamping);
//! - `DQ(a) + DQ(b) → Q(s_y, z_y)` becomes onnxruntime's QLinearAdd: its fused multiply-adds on the raw values
//!   in f64 ([`LowerFor::Host`]), or a lookup in the 256×256 table of its results ([`LowerFor::F32Device`]).
//!
//! Integer values stay exact in f32 while accumulators stay below 2^24 (checked for weights and biases; typical
//! int8 accumulations are far below). `Q(·, 1, z)` multiplies by exactly 1, so the rounding is the integer one.
//! Value names of the Q outputs are kept; the removed intermediates (the Conv output...) no longer exist.
use std::collections::HashMap;

use edgepack_onnx::builder::{tensor_f32, tensor_raw};
use edgepack_onnx::passes::tensor_f32_values;
use edgepack_onnx::{Graph, NodeExt, NodeProto, TensorProto, node};

/// Integer values of an int8/uint8/int32 initializer, as f32.
pub(crate) fn int_values(t: &TensorProto) -> Option<Vec<f32>> {
    let raw = t.raw_data.as_ref();
    let n: i64 = t.dims.iter().product();
    let v: Vec<f32> = match (t.data_type?, raw) {
        (3, Some(r)) => r.iter().map(|&b| b as i8 as f32).collect(),
        (2, Some(r)) => r.iter().map(|&b| b as f32).collect(),
        (6, Some(r)) => r.as_chunks::<4>().0.iter().map(|c| i32::from_le_bytes(*c) as f32).collect(),
        (3 | 2 | 6, None) => t.int32_data.iter().map(|&x| x as f32).collect(),
        _ => return None,
    };
    (v.len() as i64 == n && v.iter().all(|x| x.abs() < (1 << 24) as f32)).then_some(v)
}

pub(super) fn scalar_f32(g: &Graph, name: &str) -> Option<f32> {
    let v = tensor_f32_values(g.initializer(name)?)?;
    (v.len() == 1).then(|| v[0])
}

/// Zero point of a DQ/Q node as (value, onnx type), default uint8 0.
pub(super) fn zero_point(g: &Graph, n: &NodeProto) -> Option<(f32, i32)> {
    match n.input.get(2).filter(|z| !z.is_empty()) {
        None => Some((0.0, 2)),
        Some(z) => {
            let t = g.initializer(z)?;
            let v = int_values(t)?;
            (v.len() == 1).then(|| (v[0], t.data_type.unwrap_or(2)))
        }
    }
}

pub(super) struct Ctx<'a> {
    pub g: &'a Graph,
    producers: HashMap<&'a str, usize>,
    readers: HashMap<&'a str, usize>,
}

impl<'a> Ctx<'a> {
    pub(super) fn new(g: &'a Graph) -> Self {
        let mut readers: HashMap<&str, usize> = HashMap::new();
        for n in &g.nodes {
            for i in &n.input {
                *readers.entry(i.as_str()).or_default() += 1;
            }
        }
        for o in &g.outputs {
            if let Some(name) = o.name.as_deref() {
                *readers.entry(name).or_default() += 2; // graph outputs must survive
            }
        }
        Ctx { g, producers: g.producers(), readers }
    }

    pub(super) fn producer(&self, value: &str, op: &str) -> Option<&'a NodeProto> {
        let n = &self.g.nodes[*self.producers.get(value)?];
        (n.op() == op).then_some(n)
    }

    /// The producing node of every value.
    pub(super) fn producers(&self) -> &HashMap<&'a str, usize> {
        &self.producers
    }

    /// The index of the node producing `value`.
    pub(super) fn producers_of(&self, value: &str) -> Option<&usize> {
        self.producers.get(value)
    }

    /// The only reader of `value`, if it has exactly one and `value` is not a graph output.
    pub(super) fn only_reader(&self, value: &str) -> Option<usize> {
        if self.readers.get(value).copied() != Some(1) {
            return None;
        }
        self.g.nodes.iter().position(|n| n.input.iter().any(|i| i == value))
    }
}

/// One rewrite: nodes to remove (indices), nodes and initializers to add.
struct Rewrite {
    remove: Vec<usize>,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
}

fn unit_dq(dq: &NodeProto, one: &str, tag: &str) -> Option<NodeProto> {
    let mut inputs = vec![dq.input[0].as_str(), one];
    if let Some(z) = dq.input.get(2).filter(|z| !z.is_empty()) {
        inputs.push(z);
    }
    let out = format!("{}_int_{tag}", dq.input[0]);
    Some(node("DequantizeLinear", &format!("{}_int_{tag}_node", dq.input[0]), &inputs, &[&out], vec![]))
}

/// A matched `DQ(x) → Conv|Gemm(DQ(w), [DQ(b)]) → [Relu|Clip] → Q` pattern.
pub(super) struct Weighted<'a> {
    pub n: &'a NodeProto,
    pub dqx: &'a NodeProto,
    pub q: &'a NodeProto,
    pub is_gemm: bool,
    pub w_t: &'a TensorProto,
    pub w: Vec<f32>,
    pub channels: usize,
    pub bias: Option<Vec<f32>>,
    /// onnxruntime's per-channel output scale: `(s_x · s_w[c]) / s_y` in f32.
    pub m: Vec<f32>,
    /// (value, onnx type) of the output zero point.
    pub z_y: (f32, i32),
    /// Nodes the rewrite replaces: the Conv/Gemm, the activation, the Q.
    pub remove: Vec<usize>,
}

/// The quantized inputs of a Conv/Gemm: `DQ(x)`, `DQ(w)` (symmetric), `DQ(b)` at `s_x·s_w`.
pub(super) struct WeightedInputs<'a> {
    pub n: &'a NodeProto,
    pub dqx: &'a NodeProto,
    pub is_gemm: bool,
    pub w_t: &'a TensorProto,
    pub w: Vec<f32>,
    pub channels: usize,
    pub bias: Option<Vec<f32>>,
    pub s_x: f32,
    pub s_w: Vec<f32>,
    pub z_x: (f32, i32),
}

pub(super) fn match_weighted_inputs<'a>(c: &Ctx<'a>, idx: usize) -> Option<WeightedInputs<'a>> {
    let g = c.g;
    let n = &g.nodes[idx];
    let is_gemm = n.op() == "Gemm";
    if is_gemm
        && (n.attr_i("transA").unwrap_or(0) != 0
            || n.attr_f("alpha").unwrap_or(1.0) != 1.0
            || n.attr_f("beta").unwrap_or(1.0) != 1.0)
    {
        return None;
    }
    let dqx = c.producer(n.input.first()?, "DequantizeLinear")?;
    let dqw = c.producer(n.input.get(1)?, "DequantizeLinear")?;
    let s_x = scalar_f32(g, dqx.input.get(1)?)?;
    let z_x = zero_point(g, dqx)?;
    let w_t = g.initializer(&dqw.input[0])?;
    let w = int_values(w_t)?;
    let s_w = tensor_f32_values(g.initializer(dqw.input.get(1)?)?)?;
    if zero_point(g, dqw).is_none_or(|z| z.0 != 0.0) && dqw.input.get(2).is_some() {
        // Per-channel weight zero points must all be 0 (symmetric weights).
        let z = int_values(g.initializer(&dqw.input[2])?)?;
        if z.iter().any(|&v| v != 0.0) {
            return None;
        }
    }
    let channels = if is_gemm {
        let tb = n.attr_i("transB").unwrap_or(0) == 1;
        *w_t.dims.get(if tb { 0 } else { 1 })? as usize
    } else {
        *w_t.dims.first()? as usize
    };
    let w_axis = dqw.attr_i("axis").unwrap_or(1);
    let per_channel_ok = s_w.len() == 1
        || (s_w.len() == channels
            && if is_gemm { (w_axis == 0) == (n.attr_i("transB").unwrap_or(0) == 1) } else { w_axis == 0 });
    if !per_channel_ok {
        return None;
    }
    let bias = match n.input.get(2).filter(|b| !b.is_empty()) {
        None => None,
        Some(b) => {
            let dqb = c.producer(b, "DequantizeLinear")?;
            let bv = int_values(g.initializer(&dqb.input[0])?)?;
            if bv.len() != channels {
                return None;
            }
            // The bias must be at scale s_x·s_w (what the QDQ pass writes).
            let s_b = tensor_f32_values(g.initializer(dqb.input.get(1)?)?)?;
            let ok = s_b.iter().enumerate().all(|(k, &sb)| {
                let want = s_x * s_w[if s_w.len() == 1 { 0 } else { k }];
                (sb - want).abs() <= want.abs() * 1e-6
            });
            if !ok || zero_point(g, dqb).is_none_or(|z| z.0 != 0.0) {
                return None;
            }
            Some(bv)
        }
    };
    Some(WeightedInputs { n, dqx, is_gemm, w_t, w, channels, bias, s_x, s_w, z_x })
}

pub(super) fn match_weighted<'a>(c: &Ctx<'a>, idx: usize) -> Option<Weighted<'a>> {
    let g = c.g;
    let WeightedInputs { n, dqx, is_gemm, w_t, w, channels, bias, s_x, s_w, .. } = match_weighted_inputs(c, idx)?;
    // Output chain: [Relu|Clip] → Q, each read once.
    let mut remove = vec![idx];
    let mut cur = n.output.first()?.clone();
    let mut clamp: Option<(f32, f32)> = None;
    let mut next = c.only_reader(&cur)?;
    if matches!(g.nodes[next].op(), "Relu" | "Clip") {
        let a = &g.nodes[next];
        clamp = Some(match a.op() {
            "Relu" => (0.0, f32::INFINITY),
            _ => {
                let lo =
                    a.input.get(1).filter(|s| !s.is_empty()).map(|s| scalar_f32(g, s)).unwrap_or(Some(f32::MIN))?;
                let hi =
                    a.input.get(2).filter(|s| !s.is_empty()).map(|s| scalar_f32(g, s)).unwrap_or(Some(f32::MAX))?;
                (lo, hi)
            }
        });
        remove.push(next);
        cur = a.output.first()?.clone();
        next = c.only_reader(&cur)?;
    }
    let q = &g.nodes[next];
    if q.op() != "QuantizeLinear" || q.input[0] != cur {
        return None;
    }
    let s_y = scalar_f32(g, q.input.get(1)?)?;
    let (z_y, z_ty) = zero_point(g, q)?;
    if let Some((lo, hi)) = clamp {
        // Dropping the activation is exact only if the Q range lies inside it.
        let (qmin, qmax) = if z_ty == 3 { (-128.0, 127.0) } else { (0.0, 255.0) };
        if (qmin - z_y) * s_y < lo - 1e-6 * lo.abs() || (qmax - z_y) * s_y > hi + 1e-6 * hi.abs() {
            return None;
        }
    }
    remove.push(next);
    let m: Vec<f32> = (0..channels).map(|k| (s_x * s_w[if s_w.len() == 1 { 0 } else { k }]) / s_y).collect();
    Some(Weighted { n, dqx, q, is_gemm, w_t, w, channels, bias, m, z_y: (z_y, z_ty), remove })
}

fn lower_weighted(c: &Ctx, idx: usize, uid: usize, target: LowerFor) -> Option<Rewrite> {
    let Weighted { n, dqx, q, is_gemm, w_t, w, channels, bias, m, remove, .. } = match_weighted(c, idx)?;
    let p = format!("{}_lowered{uid}", n.name());
    let one = format!("{p}_one");
    let mut inits = vec![tensor_f32(&one, &[], &[1.0])];
    let dx = unit_dq(dqx, &one, &format!("{uid}x"))?;
    let w_name = format!("{p}_w_int");
    let mut w_dq = None;
    match target {
        LowerFor::Host => inits.push(tensor_f32(&w_name, &w_t.dims, &w)),
        LowerFor::F32Device => {
            // `DQ(w, 1)`: the same integer values, the initializer left int8 (symmetric: no zero point).
            let w_src = w_t.name.as_deref()?;
            w_dq = Some(node("DequantizeLinear", &format!("{p}_w_dq"), &[w_src, &one], &[&w_name], vec![]));
        }
    }
    let mut inputs = vec![dx.output[0].clone(), w_name];
    if let Some(bv) = &bias {
        let b_name = format!("{p}_b_int");
        inits.push(tensor_f32(&b_name, &[channels as i64], bv));
        inputs.push(b_name);
    }
    let mut op = n.clone();
    op.name = Some(format!("{p}_acc_node"));
    op.input = inputs;
    op.output = vec![format!("{p}_acc")];
    let m_name = format!("{p}_multiplier");
    let m_dims: Vec<i64> = if is_gemm { vec![channels as i64] } else { vec![1, channels as i64, 1, 1] };
    // Conv outputs [N, C, spatial...]: broadcast over every spatial dim of the weight.
    let m_dims = if is_gemm {
        m_dims
    } else {
        let mut d = vec![1, channels as i64];
        d.extend(std::iter::repeat_n(1, w_t.dims.len().saturating_sub(2)));
        d
    };
    // acc · m in f64 is exact (24 + 24 significant bits), so casting it back rounds once, as an f32 multiply
    // does; the f64 detour also keeps tract from folding the multiplier into the weights.
    inits.push(tensor_raw(&m_name, &m_dims, 11, m.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect()));
    let scaled = format!("{p}_scaled");
    let acc64 = node(
        "Cast",
        &format!("{p}_acc_f64"),
        &[&format!("{p}_acc")],
        &[&format!("{p}_acc64")],
        vec![edgepack_onnx::builder::attr_int("to", 11)],
    );
    let mul =
        node("Mul", &format!("{p}_requant"), &[&format!("{p}_acc64"), &m_name], &[&format!("{p}_scaled64")], vec![]);
    let back = node(
        "Cast",
        &format!("{p}_to_f32"),
        &[&format!("{p}_scaled64")],
        &[&scaled],
        vec![edgepack_onnx::builder::attr_int("to", 1)],
    );
    let mut q_inputs = vec![scaled.as_str(), one.as_str()];
    if let Some(z) = q.input.get(2).filter(|z| !z.is_empty()) {
        q_inputs.push(z);
    }
    let newq = node("QuantizeLinear", &format!("{p}_q"), &q_inputs, &[&q.output[0]], vec![]);
    let nodes = w_dq.into_iter().chain([dx, op, acc64, mul, back, newq]).collect();
    Some(Rewrite { remove, nodes, inits })
}

pub(super) fn f64_scalar(name: &str, v: f64) -> TensorProto {
    tensor_raw(name, &[], 11, v.to_le_bytes().to_vec())
}

fn cast(name: &str, input: &str, output: &str, to: i64) -> NodeProto {
    node("Cast", name, &[input], &[output], vec![edgepack_onnx::builder::attr_int("to", to)])
}

/// `DQ(a) + DQ(b) → Q` as onnxruntime's QLinearAdd computes it on x86 (MLAS, AVX2):
/// `r_a = s_a/s_c`, `r_b = s_b/s_c`, `k = z_c − (r_a·z_a + r_b·z_b)` in f32, then per element
/// `round_half_even(fma(a, r_a, fma(b, r_b, k)))` saturated, on the raw quantized values. Each fused multiply-add
/// is done in f64 (exact for these magnitudes) and rounded once to f32.
fn lower_add(c: &Ctx, idx: usize, uid: usize, target: LowerFor) -> Option<Rewrite> {
    let g = c.g;
    let n = &g.nodes[idx];
    let (a, b) = (c.producer(n.input.first()?, "DequantizeLinear")?, c.producer(n.input.get(1)?, "DequantizeLinear")?);
    let (s_a, s_b) = (scalar_f32(g, a.input.get(1)?)?, scalar_f32(g, b.input.get(1)?)?);
    let ((z_a, ta), (z_b, tb)) = (zero_point(g, a)?, zero_point(g, b)?);
    let qi = c.only_reader(n.output.first()?)?;
    let q = &g.nodes[qi];
    if q.op() != "QuantizeLinear" {
        return None;
    }
    let s_c = scalar_f32(g, q.input.get(1)?)?;
    let (z_c, tc) = zero_point(g, q)?;
    if ta != 2 || tb != 2 || tc != 2 {
        return None; // uint8 only (what the QDQ pass writes)
    }
    let (r_a, r_b) = (s_a / s_c, s_b / s_c);
    let k = z_c - (r_a * z_a + r_b * z_b);
    let p = format!("{}_lowered{uid}", n.name());
    let v = |s: &str| format!("{p}_{s}");
    if target == LowerFor::F32Device {
        // Without f64 the fused multiply-adds round twice; the 65536 results are a table instead, indexed by
        // `a·256 + b` (exact in f32), computed here with the reference arithmetic.
        let qp = |s, z: f32| edgepack_kernels::reference::QParams { scale: s, zero: z as u8 };
        let av: Vec<u8> = (0..=255u8).flat_map(|a| std::iter::repeat_n(a, 256)).collect();
        let bv: Vec<u8> = (0..256 * 256).map(|k| (k % 256) as u8).collect();
        let table = edgepack_kernels::reference::qadd(&av, qp(s_a, z_a), &bv, qp(s_b, z_b), qp(s_c, z_c));
        let inits = vec![
            tensor_raw(&v("table"), &[256 * 256], 2, table),
            tensor_raw(&v("256"), &[], 7, 256i64.to_le_bytes().to_vec()),
        ];
        let nodes = vec![
            cast(&v("a_i64_node"), &a.input[0], &v("a_i64"), 7),
            cast(&v("b_i64_node"), &b.input[0], &v("b_i64"), 7),
            node("Mul", &v("row_node"), &[&v("a_i64"), &v("256")], &[&v("row")], vec![]),
            node("Add", &v("index_node"), &[&v("row"), &v("b_i64")], &[&v("index")], vec![]),
            node("Gather", &v("lookup"), &[&v("table"), &v("index")], &[&q.output[0]], vec![]),
        ];
        return Some(Rewrite { remove: vec![idx, qi], nodes, inits });
    }
    let inits = vec![
        f64_scalar(&v("ra"), r_a as f64),
        f64_scalar(&v("rb"), r_b as f64),
        f64_scalar(&v("k"), k as f64),
        tensor_f32(&v("one"), &[], &[1.0]),
        tensor_raw(&v("zero"), &[], 2, vec![0]),
    ];
    let nodes = vec![
        cast(&v("b64_node"), &b.input[0], &v("b64"), 11),
        node("Mul", &v("bm_node"), &[&v("b64"), &v("rb")], &[&v("bm")], vec![]),
        node("Add", &v("bk_node"), &[&v("bm"), &v("k")], &[&v("bk64")], vec![]),
        cast(&v("bk32_node"), &v("bk64"), &v("bk32"), 1),
        cast(&v("bk_back_node"), &v("bk32"), &v("bk"), 11),
        cast(&v("a64_node"), &a.input[0], &v("a64"), 11),
        node("Mul", &v("am_node"), &[&v("a64"), &v("ra")], &[&v("am")], vec![]),
        node("Add", &v("sum_node"), &[&v("am"), &v("bk")], &[&v("sum64")], vec![]),
        cast(&v("sum_node32"), &v("sum64"), &v("sum"), 1),
        node("QuantizeLinear", &v("q"), &[&v("sum"), &v("one"), &v("zero")], &[&q.output[0]], vec![]),
    ];
    Some(Rewrite { remove: vec![idx, qi], nodes, inits })
}

/// Which backend [`Graph::lower_qdq_integer_with`] writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LowerFor {
    /// tract: f64 arithmetic for the single roundings; integer weights as f32 initializers (packed once at load).
    Host,
    /// A device computing in f32 only (the GPU backend). The requantization `f32(acc)·m` is one f32 multiply
    /// there (its f64 detour runs in f32, still one rounding); QLinearAdd's fused multiply-adds would round twice,
    /// so an Add becomes a lookup in its 256×256 result table; weights stay int8 (`DequantizeLinear(w, 1)`) and
    /// other constant DequantizeLinear nodes are left as written.
    F32Device,
}

/// The QDQ → integer-arithmetic lowering on the graph (an extension trait: `Graph` lives in `edgepack-onnx`).
pub trait QdqInteger {
    fn lower_qdq_integer(&mut self) -> usize;
    fn lower_qdq_integer_with(&mut self, target: LowerFor) -> usize;
}

trait Helpers {
    fn exact_quantize_linear(&mut self) -> usize;
    fn fold_constant_dequantize(&mut self) -> usize;
}

impl QdqInteger for Graph {
    /// Applies the integer-arithmetic lowering (see the module docs). Returns how many patterns were rewritten.
    fn lower_qdq_integer(&mut self) -> usize {
        self.lower_qdq_integer_with(LowerFor::Host)
    }

    /// [`Graph::lower_qdq_integer`] for `target`.
    fn lower_qdq_integer_with(&mut self, target: LowerFor) -> usize {
        let rewrites: Vec<Rewrite> = {
            let c = Ctx::new(self);
            let mut taken = std::collections::HashSet::new();
            let mut out = Vec::new();
            for (i, n) in self.nodes.iter().enumerate() {
                let r = match n.op() {
                    "Conv" | "Gemm" => lower_weighted(&c, i, out.len(), target),
                    "Add" => lower_add(&c, i, out.len(), target),
                    _ => None,
                };
                if let Some(r) = r
                    && r.remove.iter().all(|k| !taken.contains(k))
                {
                    taken.extend(r.remove.iter().copied());
                    out.push(r);
                }
            }
            out
        };
        let count = rewrites.len();
        if count == 0 && !self.nodes.iter().any(|n| n.op() == "QuantizeLinear") {
            return 0; // not a QDQ graph: left untouched
        }
        let mut g = self.clone();
        let mut remove: Vec<usize> = rewrites.iter().flat_map(|r| r.remove.iter().copied()).collect();
        remove.sort_unstable();
        for k in remove.into_iter().rev() {
            g.nodes.remove(k);
        }
        for r in rewrites {
            g.initializers.extend(r.inits);
            g.nodes.extend(r.nodes);
        }
        if g.topo_sort().is_err() {
            return 0; // never expected: the graph is left as it was
        }
        // The QuantizeLinear nodes no pattern took (after float layers): exact division.
        let exact_q = g.exact_quantize_linear();
        if target == LowerFor::Host {
            g.fold_constant_dequantize();
        }
        if count + exact_q == 0 {
            return 0;
        }
        g.remove_dead_nodes();
        g.remove_unused_initializers();
        *self = g;
        count + exact_q
    }
}

impl Helpers for Graph {
    /// `QuantizeLinear(x, s, z)` with a per-tensor scale as ONNX and onnxruntime compute it, `round(x / s)`: tract
    /// multiplies by `1/s`, which rounds some values to the neighbouring integer. The division is done in f64
    /// (`x · (1/s)` there is within an f64 ulp of `x / s`) and rounded once to f32; the Q then has scale 1.
    fn exact_quantize_linear(&mut self) -> usize {
        let mut added = Vec::new();
        let mut inits = Vec::new();
        let mut count = 0;
        for (k, n) in self.nodes.iter_mut().enumerate() {
            if n.op() != "QuantizeLinear" || n.input.len() < 2 {
                continue;
            }
            let Some(s) = self.initializers.iter().find(|t| t.name.as_deref() == Some(&n.input[1])) else { continue };
            let Some(sv) = tensor_f32_values(s).filter(|v| v.len() == 1).map(|v| v[0]) else { continue };
            if !(sv.is_finite() && sv > 0.0) || sv.log2().fract() == 0.0 {
                continue; // a power of two: 1/s is exact already
            }
            let p = format!("{}_exactq{k}", n.name());
            inits.push(f64_scalar(&format!("{p}_s64"), sv as f64));
            inits.push(tensor_f32(&format!("{p}_one"), &[], &[1.0]));
            added.push(cast(&format!("{p}_x64_node"), &n.input[0], &format!("{p}_x64"), 11));
            added.push(node(
                "Div",
                &format!("{p}_div"),
                &[&format!("{p}_x64"), &format!("{p}_s64")],
                &[&format!("{p}_q64")],
                vec![],
            ));
            added.push(cast(&format!("{p}_q32_node"), &format!("{p}_q64"), &format!("{p}_q32"), 1));
            n.input[0] = format!("{p}_q32");
            n.input[1] = format!("{p}_one");
            count += 1;
        }
        if count > 0 {
            self.initializers.extend(inits);
            self.nodes.extend(added);
            if self.topo_sort().is_err() {
                return 0;
            }
        }
        count
    }

    /// `DequantizeLinear` of constant int8/uint8/int32 initializers (weights of layers left in float) becomes an
    /// f32 initializer with the same values, `(q − z)·s` in f32, so the float op sees a constant weight (tract
    /// packs constant weights once at load instead of on every run). Returns how many were folded.
    fn fold_constant_dequantize(&mut self) -> usize {
        let mut folded = Vec::new();
        for (k, n) in self.nodes.iter().enumerate() {
            if n.op() != "DequantizeLinear" || n.input.len() < 2 {
                continue;
            }
            let Some(t) = self.initializer(&n.input[0]) else { continue };
            let (Some(q), Some(s)) = (int_values(t), self.initializer(&n.input[1]).and_then(tensor_f32_values)) else {
                continue;
            };
            let z = match n.input.get(2).filter(|z| !z.is_empty()) {
                None => vec![0.0],
                Some(z) => match self.initializer(z).and_then(int_values) {
                    Some(z) => z,
                    None => continue,
                },
            };
            if z.len() != s.len() || s.is_empty() {
                continue;
            }
            // Per-axis parameters index the elements along `axis`.
            let rank = t.dims.len() as i64;
            let axis = n.attr_i("axis").unwrap_or(1);
            let axis = if axis < 0 { axis + rank } else { axis };
            let (inner, len) = if s.len() == 1 {
                (1usize, 1usize)
            } else if (0..rank).contains(&axis) && t.dims[axis as usize] as usize == s.len() {
                (t.dims[axis as usize + 1..].iter().product::<i64>() as usize, s.len())
            } else {
                continue;
            };
            let v: Vec<f32> = q
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    let c = (i / inner) % len;
                    (x - z[c]) * s[c]
                })
                .collect();
            folded.push((k, tensor_f32(&n.output[0], &t.dims, &v)));
        }
        let count = folded.len();
        for (k, t) in folded.into_iter().rev() {
            self.nodes.remove(k);
            self.initializers.push(t);
        }
        count
    }
}
