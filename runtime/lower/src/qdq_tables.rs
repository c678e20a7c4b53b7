//! Quantized element-wise functions as 256-entry tables: `DQ(v) → element-wise float ops → Q` on a kernel output
//! `v` depends on the byte `v` alone, so its value for every byte is computed once at load and the function runs
//! as a table lookup on the uint8 NHWC tensor (`EpQTable`), or inside the producing convolution's output stage.
//!
//! The region may hold QDQ pairs of its own (a quantizer's SiLU is `DQ(v) → Sigmoid → Q → DQ → Mul(DQ(v), ·) →
//! Q`) and scalar constants; it ends in a QuantizeLinear to uint8, optionally after a channel `Split` or a nearest
//! `Resize` by whole factors (both commute with element-wise maps: the table then reads a channel window, or
//! upsamples). Each op is computed in f32 as ONNX defines it (QuantizeLinear: `x / s` rounded half to even;
//! Sigmoid, Tanh, Exp: correctly rounded from f64), so the table holds what the graph as written computes.
use std::collections::{HashMap, HashSet};

use crate::qdq_kernels::{Made, Rewrite, ep_node, u8_params};
use crate::qdq_lower::{Ctx, int_values, scalar_f32};
use edgepack_onnx::builder::{attr_ints, attr_tensor, tensor_raw};
use edgepack_onnx::{Graph, NodeExt, NodeProto};

/// Element-wise ops a table region may hold.
const ELEMENTWISE: [&str; 20] = [
    "DequantizeLinear",
    "QuantizeLinear",
    "Identity",
    "Sigmoid",
    "Tanh",
    "Relu",
    "LeakyRelu",
    "Elu",
    "HardSigmoid",
    "HardSwish",
    "Clip",
    "Exp",
    "Neg",
    "Abs",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Max",
    "Min",
];

/// Most nodes in one region (a SiLU has 5, a HardSwish with its QDQ pairs a few more).
const MAX_NODES: usize = 32;

fn is_elementwise(n: &NodeProto) -> bool {
    n.domain_name().is_empty() && n.output.len() == 1 && ELEMENTWISE.contains(&n.op())
}

/// The tables made so far without window or upsampling: their output → (source, table). A region reading one
/// reads its source through it, so a SiLU's inner `Q(σ)`, tabulated first, folds into the SiLU's table.
pub(crate) type Tables = HashMap<String, (String, [u8; 256])>;

/// Records `r` in `tables` when it is a plain table.
pub(crate) fn record(r: &Rewrite, tables: &mut Tables) {
    let n = &r.node;
    if n.op() == "EpQTable"
        && n.attr("channels").is_none()
        && n.attr("scales").is_none()
        && let Some(t) = table_attr(n)
    {
        tables.insert(n.output[0].clone(), (n.input[0].clone(), t));
    }
}

/// The values of a region for the 256 bytes of its source.
struct Eval<'a> {
    g: &'a Graph,
    producers: &'a HashMap<&'a str, usize>,
    made: &'a Made,
    tables: &'a Tables,
    /// The region's source (a kernel output), once found.
    source: Option<&'a str>,
    values: HashMap<&'a str, Vec<f32>>,
    nodes: usize,
}

impl<'a> Eval<'a> {
    /// The 256 values of `v`; `None` when `v` is not an element-wise function of one kernel output.
    fn value(&mut self, v: &'a str) -> Option<Vec<f32>> {
        if let Some(x) = self.values.get(v) {
            return Some(x.clone());
        }
        if self.made.contains_key(v) {
            // A uint8 kernel output read by a float op other than DequantizeLinear (see `node`).
            return None;
        }
        if self.g.initializer(v).is_some() {
            return scalar_const(self.g, v).map(|c| vec![c; 256]);
        }
        let n = &self.g.nodes[*self.producers.get(v)?];
        self.nodes += 1;
        if self.nodes > MAX_NODES || !is_elementwise(n) || n.input.is_empty() {
            return None;
        }
        let out = self.node(n)?;
        self.values.insert(v, out.clone());
        Some(out)
    }

    fn node(&mut self, n: &'a NodeProto) -> Option<Vec<f32>> {
        let (g, producers) = (self.g, self.producers);
        let quantized = |v: &str| producers.get(v).is_some_and(|&p| g.nodes[p].op() == "QuantizeLinear");
        let x = if n.op() == "DequantizeLinear" {
            let v = n.input[0].as_str();
            if self.made.contains_key(v) {
                // The source: a uint8 kernel output, byte b (one source per region), or a table of it.
                let (src, t) = match self.tables.get(v) {
                    Some((src, t)) => (src.as_str(), Some(t)),
                    None => (v, None),
                };
                if self.source.is_some_and(|s| s != src) || u8_params(g, n).is_none() {
                    return None;
                }
                self.source = Some(src);
                (0..256).map(|b| t.map_or(b, |t| t[b] as usize) as f32).collect()
            } else if quantized(v) {
                self.value(v)?
            } else {
                return None;
            }
        } else {
            // Integers (a Q's output) are only read by a DequantizeLinear.
            if n.input.iter().any(|v| quantized(v)) {
                return None;
            }
            self.value(&n.input[0])?
        };
        let map = |f: &dyn Fn(f32) -> f32| Some(x.iter().map(|&v| f(v)).collect::<Vec<f32>>());
        let f64map = |f: fn(f64) -> f64| Some(x.iter().map(|&v| f(v as f64) as f32).collect::<Vec<f32>>());
        let attr_f = |name: &str, default: f32| n.attr(name).and_then(|a| a.f).unwrap_or(default);
        match n.op() {
            "DequantizeLinear" | "QuantizeLinear" => {
                if n.attr("output_dtype").is_some() || n.attr_i("block_size").is_some_and(|b| b != 0) {
                    return None;
                }
                let s = scalar_f32(g, n.input.get(1)?)?;
                if !(s.is_finite() && s > 0.0) {
                    return None;
                }
                let (z, ty) = match n.input.get(2).filter(|z| !z.is_empty()) {
                    None => (0.0, 2),
                    Some(z) => {
                        let t = g.initializer(z)?;
                        let v = int_values(t)?;
                        (v.len() == 1).then_some(())?;
                        (v[0], t.data_type?)
                    }
                };
                if n.op() == "DequantizeLinear" {
                    map(&|q| (q - z) * s)
                } else {
                    let (lo, hi) = match ty {
                        2 => (0.0, 255.0),
                        3 => (-128.0, 127.0),
                        _ => return None,
                    };
                    map(&|v| ((v / s).round_ties_even() + z).clamp(lo, hi))
                }
            }
            "Identity" => Some(x),
            "Sigmoid" => f64map(|v| 1.0 / (1.0 + (-v).exp())),
            "Tanh" => f64map(f64::tanh),
            "Exp" => f64map(f64::exp),
            "Relu" => map(&|v| if v < 0.0 { 0.0 } else { v }),
            "Neg" => map(&|v| -v),
            "Abs" => map(&f32::abs),
            "LeakyRelu" => {
                let a = attr_f("alpha", 0.01);
                map(&|v| if v < 0.0 { a * v } else { v })
            }
            "Elu" => {
                let a = attr_f("alpha", 1.0);
                Some(x.iter().map(|&v| if v < 0.0 { a * ((v as f64).exp_m1() as f32) } else { v }).collect())
            }
            "HardSigmoid" => {
                let (a, b) = (attr_f("alpha", 0.2), attr_f("beta", 0.5));
                map(&|v| (a * v + b).clamp(0.0, 1.0))
            }
            "HardSwish" => map(&|v| v * (v * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0)),
            "Clip" => {
                // Opset 11 on: optional min and max inputs; before: attributes.
                let bound = |i: usize, attr: &str, default: f32| -> Option<f32> {
                    match n.input.get(i).filter(|s| !s.is_empty()) {
                        Some(b) => scalar_f32(g, b),
                        None => Some(attr_f(attr, default)),
                    }
                };
                let (lo, hi) = (bound(1, "min", f32::NEG_INFINITY)?, bound(2, "max", f32::INFINITY)?);
                map(&|v| v.max(lo).min(hi))
            }
            "Add" | "Sub" | "Mul" | "Div" | "Max" | "Min" => {
                if n.input.len() != 2 {
                    return None;
                }
                let y = self.value(&n.input[1])?;
                let f: fn(f32, f32) -> f32 = match n.op() {
                    "Add" => |a, b| a + b,
                    "Sub" => |a, b| a - b,
                    "Mul" => |a, b| a * b,
                    "Div" => |a, b| a / b,
                    "Max" => f32::max,
                    _ => f32::min,
                };
                Some(x.iter().zip(&y).map(|(&a, &b)| f(a, b)).collect())
            }
            _ => None,
        }
    }
}

/// A float constant of one element that broadcasts to a rank-4 tensor without changing its shape.
fn scalar_const(g: &Graph, name: &str) -> Option<f32> {
    let t = g.initializer(name)?;
    (t.dims.len() <= 4 && t.dims.iter().all(|&d| d == 1)).then_some(())?;
    scalar_f32(g, name)
}

/// The output sizes of a channel `Split` (axis 1 of a rank-4 tensor) given explicitly (an input, or the `split`
/// attribute before opset 13), one per output.
pub(crate) fn split_sizes(g: &Graph, n: &NodeProto) -> Option<Vec<usize>> {
    if n.op() != "Split" || !n.domain_name().is_empty() || !matches!(n.attr_i("axis").unwrap_or(0), 1 | -3) {
        return None;
    }
    let sizes: Vec<i64> = match n.input.get(1).filter(|s| !s.is_empty()) {
        Some(s) => match edgepack_onnx::tensor_from_proto(g.initializer(s)?).ok()?.into_data() {
            edgepack_core::tensor::TensorData::I64(v) => v,
            _ => return None,
        },
        None => n.attr_ints("split")?.to_vec(),
    };
    (sizes.len() == n.output.len() && sizes.iter().all(|&s| (0..1 << 30).contains(&s))).then_some(())?;
    Some(sizes.into_iter().map(|s| s as usize).collect())
}

/// A channel `Split` with explicit sizes: the channel window `(c0, cw)` of output `out`.
fn split_window(g: &Graph, n: &NodeProto, out: &str) -> Option<(usize, usize)> {
    let sizes = split_sizes(g, n)?;
    let k = n.output.iter().position(|o| o == out)?;
    Some((sizes[..k].iter().sum(), sizes[k]))
}

/// `[element-wise region on DQ(v)] [→ Split | Resize] → Q` (uint8), `v` a kernel output → `EpQTable(v)`.
pub(crate) fn table(c: &Ctx, idx: usize, made: &Made, tables: &Tables) -> Option<Rewrite> {
    let (g, producers) = (c.g, c.producers());
    let q = &g.nodes[idx];
    if q.input.is_empty() || q.output.len() != 1 {
        return None;
    }
    u8_params(g, q)?;
    let mut attrs = Vec::new();
    let mut x = q.input[0].as_str();
    // A Split or Resize between the region and the Q.
    if let Some(p) = producers.get(x).map(|&p| &g.nodes[p]).filter(|p| p.domain_name().is_empty()) {
        match p.op() {
            "Split" => {
                let (c0, cw) = split_window(g, p, x)?;
                attrs.push(attr_ints("channels", &[c0 as i64, cw as i64]));
                x = p.input.first()?;
            }
            "Resize" => {
                let s = crate::f32_kernels::upsample_scales(g, p)?;
                attrs.push(attr_ints("scales", &s));
                x = p.input.first()?;
            }
            _ => {}
        }
    }
    let mut e = Eval { g, producers, made, tables, source: None, values: HashMap::new(), nodes: 0 };
    let vals = e.value(x)?;
    let source = e.source?;
    if vals.iter().any(|v| v.is_nan()) {
        return None;
    }
    let (s, z) = u8_params(g, q)?;
    let t: Vec<u8> = vals.iter().map(|&v| ((v / s).round_ties_even() + z as f32).clamp(0.0, 255.0) as u8).collect();
    attrs.push(attr_tensor("table", tensor_raw("table", &[256], 2, t)));
    let name = format!("{}_table", q.name());
    Some(Rewrite { remove: vec![idx], node: ep_node("EpQTable", &name, &[source], &q.output[0], attrs) })
}

/// An `EpQTable` without window or upsampling whose input is an `EpQConv` output read by nothing else: the table
/// moves into the convolution's output stage (composed with one it already has). Returns how many moved.
pub(crate) fn fuse_output_tables(g: &mut Graph) -> usize {
    let mut fused = 0;
    loop {
        let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in g.nodes.iter().enumerate() {
            for v in &n.input {
                readers.entry(v.as_str()).or_default().push(i);
            }
        }
        let producers: HashMap<String, usize> =
            g.nodes.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i))).collect();
        let outputs: HashSet<&str> = g.outputs.iter().filter_map(|o| o.name.as_deref()).collect();
        let pair = g.nodes.iter().enumerate().find_map(|(ti, t)| {
            if t.op() != "EpQTable" || t.attr("channels").is_some() || t.attr("scales").is_some() {
                return None;
            }
            let v = t.input.first()?;
            let ci = *producers.get(v)?;
            let conv = &g.nodes[ci];
            let only = readers.get(v.as_str()).is_some_and(|r| r == &[ti]);
            (conv.op() == "EpQConv" && only && !outputs.contains(v.as_str())).then_some((ti, ci))
        });
        let Some((ti, ci)) = pair else { return fused };
        let table = table_attr(&g.nodes[ti]).unwrap_or_else(|| std::array::from_fn(|b| b as u8));
        let composed: Vec<u8> = match table_attr(&g.nodes[ci]) {
            Some(first) => first.iter().map(|&b| table[b as usize]).collect(),
            None => table.to_vec(),
        };
        let out = g.nodes[ti].output[0].clone();
        let conv = &mut g.nodes[ci];
        conv.attribute.retain(|a| a.name.as_deref() != Some("table"));
        conv.attribute.push(attr_tensor("table", tensor_raw("table", &[256], 2, composed)));
        conv.output[0] = out;
        g.nodes.remove(ti);
        fused += 1;
    }
}

fn table_attr(n: &NodeProto) -> Option<[u8; 256]> {
    let t = n.attr("table")?.t.as_ref()?;
    t.raw_data.as_deref()?.try_into().ok()
}
