//! The kernel interpreter: a CPU backend without tract. It runs the graph [`Model::lower_for_cpu`] produces —
//! edgepack's kernel nodes ([`edgepack_lower::nodes`]) for the heavy work, and the ONNX ops of its op table
//! ([`OPS`]: element-wise math, shapes and data movement, reductions, MatMul/Gemm, N-D convolution and pooling,
//! normalisations, Resize, recurrent layers, quantization, and `If`/`Loop` through prepared sub-interpreters) —
//! node by node in topological order, freeing each value after its last reader. A model with any other op is
//! refused at load with `Error::UnsupportedOp`, naming the op.
//!
//! Modules by family: `math` (element-wise), `shape` (data movement), `reduce`, `nn`, `resize`, `rnn`, `control`.
//! Plain ops compute floats in f64 and round once to their type (so results match onnxruntime's to float
//! rounding); the kernels carry the speed.
//!
//! It is the CPU backend of builds without the `tract` feature (the mobile library's small build, as TFLite's
//! selective builds keep only the kernels a model needs) and can be chosen in full builds with
//! `EDGEPACK_CPU=interp`. Kernel nodes run the very same code as on tract, so results agree with it.
use std::collections::HashMap;

mod control;
mod math;
mod nn;
mod reduce;
mod resize;
mod rnn;
mod shape;

use edgepack_backend::{Backend, BackendKind, Timeline};
use edgepack_core::tensor::{DType, Tensor, TensorData};
use edgepack_core::{Error, Result};
use edgepack_kernels::qelem::{self, Pool2d};
use edgepack_kernels::{ConvGeometry, Isa, fconv};
use edgepack_lower::LowerForCpu;
use edgepack_lower::nodes::{Data, DataMut, Kernel};
use edgepack_onnx::{Model, NodeExt, NodeProto, tensor_from_proto};

fn err(e: impl std::fmt::Display) -> Error {
    Error::Backend { backend: "cpu", message: e.to_string() }
}

enum Op {
    Kernel(Box<Kernel>),
    /// An NCHW float convolution with constant weights, run as NHWC kernel between two transposes.
    Conv(fconv::FConv),
    /// An NCW float convolution (1-D) with constant weights, run as the 2-D kernel over a height of 1.
    Conv1d(fconv::FConv),
    /// An NCHW MaxPool, run as the NHWC kernel between two transposes.
    MaxPool(Pool2d),
    /// A plain op, by its entry in the op table.
    Plain(PlainFn),
    /// `If`: the two branches, prepared at load.
    If(Box<control::Sub>, Box<control::Sub>),
    /// `Loop`: the body, prepared at load.
    Loop(Box<control::Sub>),
}

struct Step {
    node: NodeProto,
    op: Op,
    /// Value slots of the inputs (`None`: an omitted optional input).
    inputs: Vec<Option<usize>>,
    outputs: Vec<usize>,
    /// Slots whose last reader is this step (freed after it).
    frees: Vec<usize>,
}

pub struct InterpBackend {
    steps: Vec<Step>,
    /// Initializers by slot.
    constants: Vec<Option<Tensor>>,
    slots: usize,
    names: HashMap<String, usize>,
    inputs: Vec<usize>,
    outputs: Vec<usize>,
    opset: i64,
    threads: usize,
}

impl InterpBackend {
    /// Lowers a checked model to kernel nodes and prepares every node; refuses ops outside the interpreter's set.
    pub fn load(model: &Model, threads: usize) -> Result<InterpBackend> {
        let lowering = model.lower_for_cpu(true);
        let mut m = lowering.model;
        m.graph.topo_sort()?;
        let opset = m.opset("").unwrap_or(13);
        let g = &m.graph;
        for n in &g.nodes {
            let kernel = n.domain_name() == edgepack_lower::qdq_kernels::DOMAIN
                && edgepack_lower::nodes::ops().any(|o| o == n.op());
            let plain = n.domain_name().is_empty() && plain_op(n.op()).is_some();
            let subgraphs = n.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty());
            if !(kernel || plain) || (subgraphs && !control::is_control(n.op())) {
                return Err(Error::UnsupportedOp {
                    op: n.op().to_string(),
                    domain: n.domain_name().to_string(),
                    node: n.name().to_string(),
                    backend: "cpu",
                });
            }
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        let slot = |names: &mut HashMap<String, usize>, v: &str| -> usize {
            let n = names.len();
            *names.entry(v.to_string()).or_insert(n)
        };
        // Initializers, and the values of plain nodes that read only constants (folded once here: dequantized
        // weights and biases, constant shapes).
        let mut consts: HashMap<String, Tensor> = HashMap::new();
        for t in &g.initializers {
            consts.insert(t.name.clone().unwrap_or_default(), tensor_from_proto(t)?);
        }
        let mut live = Vec::new();
        for n in &g.nodes {
            let foldable = n.domain_name().is_empty()
                && !matches!(n.op(), "Conv" | "MaxPool" | "Dropout")
                && !control::is_control(n.op())
                && n.input.iter().all(|i| i.is_empty() || consts.contains_key(i));
            if foldable {
                let ins: Vec<Option<&Tensor>> = n.input.iter().map(|i| consts.get(i)).collect();
                let outs = plain(n, &ins, opset).map_err(|e| err(format!("{} `{}`: {e}", n.op(), n.name())))?;
                for (name, t) in n.output.iter().zip(outs) {
                    if !name.is_empty() {
                        consts.insert(name.clone(), t);
                    }
                }
            } else {
                live.push(n);
            }
        }
        let inputs: Vec<usize> =
            g.runtime_inputs().iter().map(|i| slot(&mut names, i.name.as_deref().unwrap_or(""))).collect();
        let mut steps = Vec::new();
        for n in live {
            let mut ins: Vec<Option<usize>> =
                n.input.iter().map(|i| (!i.is_empty()).then(|| slot(&mut names, i))).collect();
            let outs = n.output.iter().map(|o| slot(&mut names, o)).collect();
            let op = if control::is_control(n.op()) {
                // The values the subgraphs read from this scope are extra inputs of the step, after the node's own.
                let (op, free) = control::prepare(&m, n, threads, ins.len())?;
                ins.extend(free.iter().map(|v| Some(slot(&mut names, v))));
                op
            } else {
                prepare(n, &consts)?
            };
            // A kernel's attributes (its weights) live on packed in `op`: the step keeps only names and wiring.
            let node = match op {
                Op::Kernel(_) => NodeProto { attribute: Vec::new(), ..n.clone() },
                _ => n.clone(),
            };
            steps.push(Step { node, op, inputs: ins, outputs: outs, frees: Vec::new() });
        }
        let outputs: Vec<usize> = g.outputs.iter().map(|o| slot(&mut names, o.name.as_deref().unwrap_or(""))).collect();
        let mut by_slot = vec![None; names.len()];
        for (v, t) in consts {
            if let Some(&s) = names.get(&v) {
                by_slot[s] = Some(t);
            }
        }
        let mut b = InterpBackend {
            steps,
            constants: by_slot,
            slots: names.len(),
            names,
            inputs,
            outputs,
            opset,
            threads: threads.max(1),
        };
        b.set_frees();
        Ok(b)
    }

    /// Marks each value's last reader (graph outputs and constants are never freed).
    fn set_frees(&mut self) {
        let mut last: Vec<Option<usize>> = vec![None; self.slots];
        for (i, s) in self.steps.iter().enumerate() {
            for v in s.inputs.iter().flatten().chain(&s.outputs) {
                last[*v] = Some(i);
            }
        }
        for s in &mut self.steps {
            s.frees.clear();
        }
        for (v, l) in last.into_iter().enumerate() {
            if let Some(l) = l
                && !self.outputs.contains(&v)
                && self.constants[v].is_none()
            {
                self.steps[l].frees.push(v);
            }
        }
    }

    fn execute(&self, inputs: Vec<Tensor>, wanted: &[usize], mut timing: Option<&mut Timeline>) -> Result<Vec<Tensor>> {
        let mut vals: Vec<Option<Tensor>> = vec![None; self.slots];
        for (&s, t) in self.inputs.iter().zip(inputs) {
            vals[s] = Some(t);
        }
        let mut kept: HashMap<usize, Tensor> = HashMap::new();
        edgepack_kernels::with_threads(self.threads, || -> Result<()> {
            for s in &self.steps {
                let t0 = std::time::Instant::now();
                let ins: Vec<Option<&Tensor>> =
                    s.inputs.iter().map(|i| i.and_then(|i| vals[i].as_ref().or(self.constants[i].as_ref()))).collect();
                let outs = run_step(s, &ins, self.opset)
                    .map_err(|e| err(format!("{} `{}`: {e}", s.node.op(), s.node.name())))?;
                for (&o, t) in s.outputs.iter().zip(outs) {
                    vals[o] = Some(t);
                }
                for &f in &s.frees {
                    if let Some(t) = vals[f].take()
                        && wanted.contains(&f)
                    {
                        kept.insert(f, t);
                    }
                }
                if let Some(tm) = timing.as_deref_mut() {
                    tm.record(s.node.name(), s.node.op(), t0);
                }
            }
            Ok(())
        })?;
        wanted
            .iter()
            .map(|&w| {
                kept.remove(&w)
                    .or_else(|| vals[w].clone())
                    .or_else(|| self.constants[w].clone())
                    .ok_or_else(|| err("a requested value was not computed"))
            })
            .collect()
    }
}

/// The load-time work of one node: kernels parsed and packed, NCHW Conv/MaxPool turned into kernels when their
/// weights are constant and their padding does not depend on the input size (otherwise built per run).
fn prepare(n: &NodeProto, consts: &HashMap<String, Tensor>) -> Result<Op> {
    let bad = |m: String| err(format!("{} `{}`: {m}", n.op(), n.name()));
    if n.domain_name() == edgepack_lower::qdq_kernels::DOMAIN {
        return Kernel::parse(n).map(|k| Op::Kernel(Box::new(k))).map_err(err);
    }
    // Every node reaching here passed the load check: a plain op has an entry in the table.
    let plain = Op::Plain(plain_op(n.op()).ok_or_else(|| bad("not an interpreter op".into()))?);
    Ok(match n.op() {
        "Conv" => {
            let w = n.input.get(1).and_then(|w| consts.get(w));
            let b = n.input.get(2).filter(|b| !b.is_empty());
            let bias = b.and_then(|b| consts.get(b));
            match w {
                Some(w) if (b.is_none() || bias.is_some()) && w.shape().len() == 4 && w.dtype() == DType::F32 => {
                    conv_of(n, w, bias, None).map_err(bad)?.map_or(plain, Op::Conv)
                }
                Some(w) if (b.is_none() || bias.is_some()) && w.shape().len() == 3 && w.dtype() == DType::F32 => {
                    conv1d_of(n, w, bias, None).ok().flatten().map_or(plain, Op::Conv1d)
                }
                _ => plain,
            }
        }
        "MaxPool" => match pool_of(n, None) {
            Ok(Some(p)) => Op::MaxPool(p),
            _ => plain,
        },
        _ => plain,
    })
}

fn two(v: &[i64]) -> Res<[usize; 2]> {
    match *v {
        [a, b] if a > 0 && b > 0 && a <= LIMIT && b <= LIMIT => Ok([a as usize, b as usize]),
        _ => Err(format!("2-D attributes expected, got {v:?}")),
    }
}

/// The largest size, stride, dilation or padding a window attribute may give ([`MAX_ELEMENTS`]): products of two
/// such values and an input dim stay far from overflowing.
const LIMIT: i64 = MAX_ELEMENTS as i64;

/// An attribute list of sizes (kernel, strides, dilations, pads): each in `0..=MAX_ELEMENTS`, `None` when absent.
fn size_list(n: &NodeProto, name: &str) -> Res<Option<Vec<usize>>> {
    n.attr_ints(name)
        .map(|v| {
            v.iter()
                .map(|&x| (0..=LIMIT).contains(&x).then_some(x as usize).ok_or_else(|| format!("{name} {v:?}")))
                .collect()
        })
        .transpose()
}

/// The most padding the NHWC convolution kernel takes (it pads whole input rows): a model with more (a mangled
/// one) runs through the direct loops, whose memory is the output's.
const KERNEL_PADS: usize = 1 << 10;

/// The `group` attribute: at least 1 (an absent or smaller one is 1), at most [`MAX_ELEMENTS`].
fn group_of(n: &NodeProto) -> Res<usize> {
    match n.attr_i("group").unwrap_or(1) {
        g if g > LIMIT => Err(format!("group {g}")),
        g => Ok(g.max(1) as usize),
    }
}

/// The `group` attribute and the channels `per_group · group` (a Conv's input channels, a ConvTranspose's output
/// channels), checked.
pub(crate) fn group_channels(n: &NodeProto, per_group: usize) -> Res<(usize, usize)> {
    let group = group_of(n)?;
    let c_in = per_group.checked_mul(group).ok_or_else(|| format!("group {group} of {per_group} channels"))?;
    Ok((group, c_in))
}

/// Padding (top, left, bottom, right) of a 2-D window op; `None` when it depends on the input size `hw`
/// (auto_pad SAME with a stride) and that is not given.
fn pads_of(
    n: &NodeProto,
    k: [usize; 2],
    stride: [usize; 2],
    dil: [usize; 2],
    hw: Option<[usize; 2]>,
) -> Res<Option<[usize; 4]>> {
    match n.attr_s("auto_pad").unwrap_or("NOTSET") {
        "NOTSET" => match n.attr_ints("pads").unwrap_or(&[0, 0, 0, 0]) {
            &[t, l, b, r] if [t, l, b, r].iter().all(|p| (0..=LIMIT).contains(p)) => {
                Ok(Some([t as usize, l as usize, b as usize, r as usize]))
            }
            p => Err(format!("pads {p:?}")),
        },
        "VALID" => Ok(Some([0; 4])),
        mode @ ("SAME_UPPER" | "SAME_LOWER") => {
            // ONNX: output ceil(in / stride); total padding (out − 1)·stride + (k − 1)·dilation + 1 − in.
            let hw = match hw {
                Some(hw) => hw,
                None if stride == [1, 1] => [1, 1],
                None => return Ok(None),
            };
            let total = |i: usize| {
                let out = hw[i].div_ceil(stride[i]);
                (out.saturating_sub(1) * stride[i] + k[i].saturating_sub(1) * dil[i] + 1).saturating_sub(hw[i])
            };
            let tot = [total(0), total(1)];
            let small = [tot[0] / 2, tot[1] / 2];
            let big = [tot[0] - small[0], tot[1] - small[1]];
            Ok(Some(if mode == "SAME_UPPER" {
                [small[0], small[1], big[0], big[1]]
            } else {
                [big[0], big[1], small[0], small[1]]
            }))
        }
        mode => Err(format!("auto_pad {mode}")),
    }
}

/// An NCHW float Conv as the NHWC kernel; `None` when the padding needs the input size or exceeds [`KERNEL_PADS`].
fn conv_of(n: &NodeProto, w: &Tensor, bias: Option<&Tensor>, hw: Option<[usize; 2]>) -> Res<Option<fconv::FConv>> {
    let d = w.shape().to_vec();
    let Some(wv) = w.as_f32().filter(|_| d.len() == 4) else {
        return Err("f32 OIHW weights expected (2-D convolutions only)".into());
    };
    nn::check_kernel_shape(n, &d[2..])?;
    let kernel = [d[2], d[3]];
    let stride = two(n.attr_ints("strides").unwrap_or(&[1, 1]))?;
    let dilation = two(n.attr_ints("dilations").unwrap_or(&[1, 1]))?;
    let Some(pads) = pads_of(n, kernel, stride, dilation, hw)? else { return Ok(None) };
    if pads.iter().any(|&p| p > KERNEL_PADS) {
        return Ok(None);
    }
    let (group, c_in) = group_channels(n, d[1])?;
    let spec = fconv::FConvSpec {
        geom: ConvGeometry { c_in, c_out: d[0], group, kernel, stride, dilation, pads },
        weights: wv.to_vec(),
        bias: bias.map(Tensor::to_f32_vec),
        clamp: [f32::NEG_INFINITY, f32::INFINITY],
        act: Default::default(),
        affine: None,
    };
    fconv::FConv::new(spec, Isa::detect()).map(Some)
}

/// An NCW float Conv (1-D) as the NHWC kernel over a height of 1; `None` when the padding needs the input length
/// or exceeds [`KERNEL_PADS`].
fn conv1d_of(n: &NodeProto, w: &Tensor, bias: Option<&Tensor>, len: Option<usize>) -> Res<Option<fconv::FConv>> {
    let d = w.shape().to_vec();
    let Some(wv) = w.as_f32().filter(|_| d.len() == 3) else {
        return Err("f32 OIW weights expected".into());
    };
    nn::check_kernel_shape(n, &d[2..])?;
    let one = |name: &str| -> Res<usize> {
        match n.attr_ints(name) {
            None => Ok(1),
            Some(&[v]) if v > 0 && v <= LIMIT => Ok(v as usize),
            Some(v) => Err(format!("{name} {v:?}")),
        }
    };
    let (k, stride, dil) = (d[2], one("strides")?, one("dilations")?);
    let (pb, pe) = match n.attr_s("auto_pad").unwrap_or("NOTSET") {
        "NOTSET" => match n.attr_ints("pads").unwrap_or(&[0, 0]) {
            &[b, e] if (0..=LIMIT).contains(&b) && (0..=LIMIT).contains(&e) => (b as usize, e as usize),
            p => return Err(format!("pads {p:?}")),
        },
        "VALID" => (0, 0),
        mode @ ("SAME_UPPER" | "SAME_LOWER") => {
            let l = match len {
                Some(l) => l,
                None if stride == 1 => 1,
                None => return Ok(None),
            };
            let out = l.div_ceil(stride);
            let total = (out.saturating_sub(1) * stride + k.saturating_sub(1) * dil + 1).saturating_sub(l);
            let small = total / 2;
            if mode == "SAME_UPPER" { (small, total - small) } else { (total - small, small) }
        }
        mode => return Err(format!("auto_pad {mode}")),
    };
    if pb.max(pe) > KERNEL_PADS {
        return Ok(None);
    }
    let (group, c_in) = group_channels(n, d[1])?;
    let spec = fconv::FConvSpec {
        geom: ConvGeometry {
            c_in,
            c_out: d[0],
            group,
            kernel: [1, k],
            stride: [1, stride],
            dilation: [1, dil],
            pads: [0, pb, 0, pe],
        },
        weights: wv.to_vec(),
        bias: bias.map(Tensor::to_f32_vec),
        clamp: [f32::NEG_INFINITY, f32::INFINITY],
        act: Default::default(),
        affine: None,
    };
    fconv::FConv::new(spec, Isa::detect()).map(Some)
}

/// A 1-D convolution through the 2-D kernel: [N, C, W] as [N, C, 1, W] and back.
fn run_conv1d(conv: &fconv::FConv, x: &Tensor) -> Res<Tensor> {
    let &[b, c, w] = x.shape() else { return Err(format!("expected an NCW input, got shape {:?}", x.shape())) };
    let y = run_conv(conv, &x.clone().reshape(vec![b, c, 1, w]).map_err(|e| e.to_string())?)?;
    let s = y.shape().to_vec();
    y.reshape(vec![s[0], s[1], s[3]]).map_err(|e| e.to_string())
}

/// An NCHW MaxPool as the NHWC kernel; `None` when the padding needs the input size.
fn pool_of(n: &NodeProto, hw: Option<[usize; 2]>) -> Res<Option<Pool2d>> {
    if n.output.len() > 1 && !n.output[1].is_empty() {
        return Err("the Indices output is not supported".into());
    }
    let kernel = two(n.attr_ints("kernel_shape").unwrap_or_default())?;
    let stride = two(n.attr_ints("strides").unwrap_or(&[1, 1]))?;
    let dilation = two(n.attr_ints("dilations").unwrap_or(&[1, 1]))?;
    if dilation != [1, 1] {
        return Err("dilated pooling is not supported".into());
    }
    let ceil_mode = n.attr_i("ceil_mode").unwrap_or(0) != 0;
    Ok(pads_of(n, kernel, stride, dilation, hw)?.map(|pads| Pool2d { kernel, stride, pads, ceil_mode }))
}

fn run_conv(conv: &fconv::FConv, x: &Tensor) -> Res<Tensor> {
    let [b, c, h, w] = image_dims(x)?;
    if c != conv.spec().geom.c_in {
        return Err(format!("input has {c} channels, expected {}", conv.spec().geom.c_in));
    }
    let (oh, ow) = conv.output_hw(h, w).ok_or_else(|| format!("input {h}x{w} too small"))?;
    let co = conv.spec().geom.c_out;
    let mut y = vec![0.0; checked_len(&[b, co, oh, ow])?];
    conv.run(&layout(f32s(x)?, [b, c, h, w], true), b, h, w, &mut y)?;
    tensor(vec![b, co, oh, ow], TensorData::F32(layout(&y, [b, oh, ow, co], false)))
}

fn run_pool(g: &Pool2d, x: &Tensor) -> Res<Tensor> {
    let [b, c, h, w] = image_dims(x)?;
    let (oh, ow) = g.output_hw(h, w).ok_or_else(|| format!("input {h}x{w} too small"))?;
    checked_len(&[b, c, oh, ow])?;
    let empty = "a pooling window holds no input cell";
    let data = match x.data() {
        TensorData::F32(v) => {
            let mut y = vec![0.0; b * oh * ow * c];
            qelem::maxpool_f32(Isa::detect(), &layout(v, [b, c, h, w], true), [b, h, w, c], *g, &mut y).ok_or(empty)?;
            TensorData::F32(layout(&y, [b, oh, ow, c], false))
        }
        TensorData::U8(v) => {
            let mut nhwc = vec![0u8; v.len()];
            qelem::transpose(v, b, c, h * w, &mut nhwc);
            let mut y = vec![0u8; b * oh * ow * c];
            let identity: [u8; 256] = std::array::from_fn(|i| i as u8);
            qelem::maxpool(Isa::detect(), &nhwc, [b, h, w, c], *g, &identity, &mut y).ok_or(empty)?;
            let mut out = vec![0u8; y.len()];
            qelem::transpose(&y, b, oh * ow, c, &mut out);
            TensorData::U8(out)
        }
        _ => return Err(format!("MaxPool of {} is not supported", x.dtype())),
    };
    tensor(vec![b, c, oh, ow], data)
}

type Res<T> = std::result::Result<T, String>;

fn input<'a>(ins: &[Option<&'a Tensor>], i: usize) -> Res<&'a Tensor> {
    ins.get(i).copied().flatten().ok_or_else(|| format!("input {i} is missing"))
}

fn tensor(shape: Vec<usize>, data: TensorData) -> Res<Tensor> {
    Tensor::new(shape, data).map_err(|e| e.to_string())
}

/// The most elements one tensor the interpreter makes may hold (2 GiB of f64, its working type): a shape taken
/// from a model's values (ConstantOfShape, Range, Tile, Expand...) is checked against it before anything is
/// allocated, so a mangled model is a typed error, not an allocation failure.
pub(crate) const MAX_ELEMENTS: usize = 1 << 28;

/// The element count of `shape`, refused when it overflows or exceeds [`MAX_ELEMENTS`].
pub(crate) fn checked_len(shape: &[usize]) -> Res<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| format!("a tensor of shape {shape:?} is over the interpreter's {MAX_ELEMENTS} elements"))
}

/// The element count of an op's output `shape`: refused when it overflows, or exceeds both [`MAX_ELEMENTS`] and
/// the largest input (an output no bigger than an input the model already holds is no blow-up).
pub(crate) fn out_len(shape: &[usize], ins: &[&Tensor]) -> Res<usize> {
    let n = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    match n {
        Some(n) if n <= MAX_ELEMENTS || ins.iter().any(|t| n <= t.len()) => Ok(n),
        _ => checked_len(shape),
    }
}

/// Checks an op's inputs: an empty tensor's other dims must not multiply past [`MAX_ELEMENTS`] (a non-empty
/// one holds its product already), so loops over outer and inner dims stay bounded and their products exact.
fn check_inputs(ins: &[Option<&Tensor>]) -> Res<()> {
    for t in ins.iter().flatten().filter(|t| t.is_empty()) {
        let nonzero: Vec<usize> = t.shape().iter().copied().filter(|&d| d != 0).collect();
        checked_len(&nonzero).map_err(|_| format!("an empty tensor of shape {:?}", t.shape()))?;
    }
    Ok(())
}

/// The first element of a tensor that holds one (a scalar operand: Range's bounds, OneHot's depth, a trip count).
fn first<T: Copy>(v: &[T], what: &str) -> Res<T> {
    v.first().copied().ok_or_else(|| format!("{what} is empty"))
}

/// Integer values of a small tensor (shapes, axes, indices).
fn i64s(t: &Tensor) -> Res<Vec<i64>> {
    match t.data() {
        TensorData::I64(v) => Ok(v.clone()),
        TensorData::I32(v) => Ok(v.iter().map(|&x| x as i64).collect()),
        _ => Err(format!("expected an integer tensor, got {}", t.dtype())),
    }
}

/// An axis attribute in `[-rank, rank)` as an index of a dim that exists (a scalar has none).
fn axis(a: i64, rank: usize) -> Res<usize> {
    let r = rank as i64;
    if a < -r || a >= r {
        return Err(format!("axis {a} out of range for rank {rank}"));
    }
    Ok(if a < 0 { (a + r) as usize } else { a as usize })
}

fn f32s(t: &Tensor) -> Res<&[f32]> {
    t.as_f32().ok_or_else(|| format!("expected f32, got {}", t.dtype()))
}

/// NCHW ↔ NHWC of an f32 image batch.
fn layout(x: &[f32], [n, a, b, c]: [usize; 4], to_nhwc: bool) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    let (rows, cols) = if to_nhwc { (a, b * c) } else { (a * b, c) };
    qelem::transpose(x, n, rows, cols, &mut y);
    y
}

fn image_dims(x: &Tensor) -> Res<[usize; 4]> {
    match *x.shape() {
        [n, c, h, w] => Ok([n, c, h, w]),
        ref s => Err(format!("expected an NCHW input, got shape {s:?}")),
    }
}

fn run_step(s: &Step, ins: &[Option<&Tensor>], opset: i64) -> Res<Vec<Tensor>> {
    let n = &s.node;
    check_inputs(ins)?;
    match &s.op {
        Op::Kernel(k) => {
            let ts: Vec<&Tensor> = (0..ins.len()).map(|i| input(ins, i)).collect::<Res<_>>()?;
            let first_type = ts.first().ok_or("a kernel node without inputs")?.dtype();
            let shapes: Vec<Vec<usize>> = ts.iter().map(|t| t.shape().to_vec()).collect();
            let out = k.out_shape(&shapes)?;
            let mut data = Vec::with_capacity(ts.len());
            for t in &ts {
                let want = k.input_type().unwrap_or(first_type);
                if t.dtype() != want {
                    return Err(format!("expected {want} inputs, got {}", t.dtype()));
                }
                data.push(match t.data() {
                    TensorData::U8(v) => Data::U8(v),
                    TensorData::F32(v) => Data::F32(v),
                    _ => return Err(format!("unexpected input type {}", t.dtype())),
                });
            }
            let ins: Vec<(Data, &[usize])> = data.into_iter().zip(shapes.iter().map(Vec::as_slice)).collect();
            let len = checked_len(&out)?;
            let y = match k.output_type().unwrap_or(first_type) {
                DType::U8 => {
                    let mut y = vec![0u8; len];
                    k.eval(&ins, &out, DataMut::U8(&mut y))?;
                    TensorData::U8(y)
                }
                _ => {
                    let mut y = vec![0f32; len];
                    k.eval(&ins, &out, DataMut::F32(&mut y))?;
                    TensorData::F32(y)
                }
            };
            Ok(vec![tensor(out, y)?])
        }
        Op::If(then, other) => control::run_if(n, then, other, ins),
        Op::Loop(body) => control::run_loop(n, body, ins),
        Op::Conv(conv) => Ok(vec![run_conv(conv, input(ins, 0)?)?]),
        Op::Conv1d(conv) => Ok(vec![run_conv1d(conv, input(ins, 0)?)?]),
        Op::MaxPool(g) => Ok(vec![run_pool(g, input(ins, 0)?)?]),
        Op::Plain(f) => {
            let mut y = f(&Args { n, ins, opset })?;
            // Dropout at inference: the mask output (when wired) is all true.
            if n.op() == "Dropout" && s.outputs.len() > 1 {
                let mask = tensor(y[0].shape().to_vec(), TensorData::Bool(vec![true; y[0].len()]))?;
                y.push(mask);
            }
            if y.len() < s.outputs.len() {
                return Err(format!("{} outputs wired, {} computed", s.outputs.len(), y.len()));
            }
            y.truncate(s.outputs.len());
            Ok(y)
        }
    }
}

fn float_map(x: &Tensor, f: impl Fn(f64) -> f64) -> Res<Tensor> {
    if !matches!(x.dtype(), DType::F32 | DType::F64 | DType::F16) {
        return Err(format!("expected a float tensor, got {}", x.dtype()));
    }
    let v = x.cast(DType::F64);
    let TensorData::F64(v) = v.into_data() else { unreachable!("cast to f64") };
    Ok(tensor(x.shape().to_vec(), TensorData::F64(v.into_iter().map(f).collect()))?.cast(x.dtype()))
}

/// Numpy broadcasting of two shapes.
fn broadcast(a: &[usize], b: &[usize]) -> Res<Vec<usize>> {
    let r = a.len().max(b.len());
    let out = (0..r)
        .map(|i| {
            let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
            let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
            match (da, db) {
                _ if da == db => Ok(da),
                (1, d) | (d, 1) => Ok(d),
                _ => Err(format!("shapes {a:?} and {b:?} do not broadcast")),
            }
        })
        .collect::<Res<Vec<usize>>>()?;
    // The shape of an operand needs no check (a tensor holds it, or, for Expand, the copy checks it).
    if out != a && out != b {
        checked_len(&out)?;
    }
    Ok(out)
}

/// Row-major element strides of `shape`.
fn dense_strides(shape: &[usize]) -> Vec<isize> {
    (0..shape.len()).map(|d| shape[d + 1..].iter().product::<usize>() as isize).collect()
}

/// Element offsets of `shape` read through `out`'s broadcast (strides 0 along broadcast axes).
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<isize> {
    let mut strides = vec![0isize; out.len()];
    let mut acc = 1isize;
    for i in (0..shape.len()).rev() {
        let o = out.len() - shape.len() + i;
        strides[o] = if shape[i] == 1 { 0 } else { acc };
        acc *= shape[i] as isize;
    }
    strides
}

/// `f(offset)` for every element of `out` in row-major order, the offset following `strides` from `base`.
fn for_each_offset(out: &[usize], base: isize, strides: &[isize], mut f: impl FnMut(isize)) {
    let total: usize = out.iter().product();
    if total == 0 {
        return;
    }
    let mut idx = vec![0usize; out.len()];
    let mut off = base;
    for _ in 0..total {
        f(off);
        for d in (0..out.len()).rev() {
            idx[d] += 1;
            off += strides[d];
            if idx[d] < out[d] {
                break;
            }
            off -= strides[d] * out[d] as isize;
            idx[d] = 0;
        }
    }
}

/// Row-major multi-index of flat position `k` in `shape`.
fn unravel(mut k: usize, shape: &[usize], idx: &mut [usize]) {
    for d in (0..shape.len()).rev() {
        idx[d] = k % shape[d].max(1);
        k /= shape[d].max(1);
    }
}

/// A strided view of `x` copied out: `out` shape, element offsets from `base` along `strides` (any dtype).
fn strided(x: &Tensor, out: Vec<usize>, base: isize, strides: &[isize]) -> Res<Tensor> {
    let es = x.dtype().size();
    let src = x.to_le_bytes();
    let mut dst = Vec::with_capacity(checked_len(&out)? * es);
    for_each_offset(&out, base, strides, |o| {
        let o = o as usize * es;
        dst.extend_from_slice(&src[o..o + es]);
    });
    Tensor::from_le_bytes(x.dtype(), out, &dst).map_err(|e| e.to_string())
}

fn binary(op: &str, a: &Tensor, b: &Tensor) -> Res<Tensor> {
    if a.dtype() != b.dtype() {
        return Err(format!("input types differ: {} and {}", a.dtype(), b.dtype()));
    }
    let out = broadcast(a.shape(), b.shape())?;
    let (sa, sb) = (broadcast_strides(a.shape(), &out), broadcast_strides(b.shape(), &out));
    let mut ia = Vec::with_capacity(out.iter().product());
    for_each_offset(&out, 0, &sa, |o| ia.push(o as usize));
    let mut ib = Vec::with_capacity(ia.len());
    for_each_offset(&out, 0, &sb, |o| ib.push(o as usize));
    let dt = a.dtype();
    if matches!(dt, DType::F32 | DType::F64 | DType::F16) {
        // f32 results through f64 are exact for + − × ÷ (one rounding at the end, as f32 arithmetic).
        let (TensorData::F64(x), TensorData::F64(y)) = (a.cast(DType::F64).into_data(), b.cast(DType::F64).into_data())
        else {
            unreachable!("cast to f64")
        };
        let f: fn(f64, f64) -> f64 = match op {
            "Add" => |p, q| p + q,
            "Sub" => |p, q| p - q,
            "Mul" => |p, q| p * q,
            "Div" => |p, q| p / q,
            "Max" => f64::max,
            _ => f64::min,
        };
        let v = ia.iter().zip(&ib).map(|(&i, &j)| f(x[i], y[j])).collect();
        return Ok(tensor(out, TensorData::F64(v))?.cast(dt));
    }
    let (x, y) = (i64s(&a.cast(DType::I64))?, i64s(&b.cast(DType::I64))?);
    let mut v = Vec::with_capacity(ia.len());
    for (&i, &j) in ia.iter().zip(&ib) {
        v.push(match op {
            "Add" => x[i].wrapping_add(y[j]),
            "Sub" => x[i].wrapping_sub(y[j]),
            "Mul" => x[i].wrapping_mul(y[j]),
            "Div" => x[i].checked_div(y[j]).ok_or("integer division by zero or overflow")?,
            "Max" => x[i].max(y[j]),
            _ => x[i].min(y[j]),
        });
    }
    Ok(tensor(out, TensorData::I64(v))?.cast(dt))
}

/// Per-tensor or per-axis quantization parameters broadcast to `x`: (scale, zero point) per element.
fn qparams_at(x: &Tensor, scale: &Tensor, zero: Option<&Tensor>, axis_attr: i64, block: usize) -> Res<Vec<(f32, i32)>> {
    let s = f32s(scale)?;
    let z: Vec<i32> = match zero {
        Some(z) => z.to_f32_vec().into_iter().map(|v| v as i32).collect(),
        None => vec![0; s.len()],
    };
    if z.len() != s.len() {
        return Err("scale and zero point lengths differ".into());
    }
    if s.len() == 1 {
        return Ok(vec![(s[0], z[0]); x.len()]);
    }
    let ax = axis(axis_attr, x.shape().len())?;
    if block > 0 {
        // Blocked (opset 21): the scale has x's shape with axis `ax` divided into blocks of `block`.
        let xs = x.shape();
        let ss = scale.shape();
        let fits = |d: usize| if d == ax { ss[d] == xs[d].div_ceil(block) } else { ss[d] == xs[d] };
        if ss.len() != xs.len() || !(0..xs.len()).all(fits) {
            return Err(format!("scale {ss:?} for blocks of {block} along axis {ax} of {xs:?}"));
        }
        let sstr = dense_strides(ss);
        let mut idx = vec![0usize; xs.len()];
        return Ok((0..x.len())
            .map(|k| {
                let mut r = k;
                for d in (0..xs.len()).rev() {
                    idx[d] = r % xs[d];
                    r /= xs[d];
                }
                let o: isize = (0..xs.len())
                    .map(|d| if d == ax { (idx[d] / block) as isize * sstr[d] } else { idx[d] as isize * sstr[d] })
                    .sum();
                (s[o as usize], z[o as usize])
            })
            .collect());
    }
    if x.shape()[ax] != s.len() {
        return Err(format!("{} scales for axis {ax} of shape {:?}", s.len(), x.shape()));
    }
    let inner: usize = x.shape()[ax + 1..].iter().product();
    Ok((0..x.len()).map(|i| (i / inner) % s.len()).map(|c| (s[c], z[c])).collect())
}

fn block_size(n: &NodeProto) -> usize {
    n.attr_i("block_size").unwrap_or(0).max(0) as usize
}

/// What a plain op's implementation receives: the node, its inputs (`None`: omitted) and the model's opset.
#[derive(Clone, Copy)]
struct Args<'a> {
    n: &'a NodeProto,
    ins: &'a [Option<&'a Tensor>],
    opset: i64,
}

impl Args<'_> {
    fn x(&self) -> Res<&Tensor> {
        input(self.ins, 0)
    }

    /// Axes (or starts/ends) from input `input_idx` when wired, else from attribute `attr`.
    fn axes_of(&self, attr: &str, input_idx: usize) -> Res<Vec<i64>> {
        match self.ins.get(input_idx).copied().flatten() {
            Some(t) => i64s(t),
            None => Ok(self.n.attr_ints(attr).unwrap_or_default().to_vec()),
        }
    }
}

type PlainFn = fn(&Args) -> Res<Vec<Tensor>>;

mod selection {
    include!(concat!(env!("OUT_DIR"), "/selected_ops.rs"));

    const fn same(a: &str, b: &str) -> bool {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }

    /// Whether `op` is compiled in (always, outside a selective build). Evaluated at compile time in the table,
    /// so an unselected op's code is never referenced and the linker drops it.
    pub const fn selected(op: &str) -> bool {
        match SELECTED {
            None => true,
            Some(list) => {
                let mut i = 0;
                while i < list.len() {
                    if same(list[i], op) {
                        return true;
                    }
                    i += 1;
                }
                false
            }
        }
    }
}

/// The ONNX ops the interpreter needs to run `model` (after the CPU lowering, subgraphs included), sorted; and the
/// kernel nodes the lowering made (always compiled in). What `edgepack ops` lists for a selective build.
pub fn required_ops(model: &Model) -> (Vec<String>, Vec<String>) {
    fn walk(
        nodes: &[NodeProto],
        ops: &mut std::collections::BTreeSet<String>,
        kernels: &mut std::collections::BTreeSet<String>,
    ) {
        for n in nodes {
            if n.domain_name() == edgepack_lower::qdq_kernels::DOMAIN {
                kernels.insert(n.op().to_string());
            } else {
                ops.insert(n.op().to_string());
            }
            for a in &n.attribute {
                for g in a.g.iter().chain(&a.graphs) {
                    walk(&g.node, ops, kernels);
                }
            }
        }
    }
    let lowered = model.lower_for_cpu(true).model;
    let (mut ops, mut kernels) = Default::default();
    walk(&lowered.graph.nodes, &mut ops, &mut kernels);
    (ops.into_iter().collect(), kernels.into_iter().collect())
}

/// Whether this build is selective (`EDGEPACK_INTERP_OPS`), and its op list.
pub fn selective_build() -> Option<&'static [&'static str]> {
    selection::SELECTED
}

/// The entry of an op left out of a selective build (never called: the load check refuses the op first).
fn op_unselected(a: &Args) -> Res<Vec<Tensor>> {
    Err(format!("{} is not in this selective build", a.n.op()))
}

/// A table entry: the implementation, or, in a selective build without the op, a stub (decided at compile time).
macro_rules! pick {
    ($name:literal, $f:expr) => {{
        const F: PlainFn = if selection::selected($name) { $f } else { op_unselected };
        ($name, F)
    }};
}

/// A single-output implementation as a table entry.
macro_rules! one {
    ($f:path) => {
        |a: &Args| $f(a).map(|t| vec![t])
    };
}

/// The plain ONNX ops the interpreter runs (beyond the kernel nodes): the op table is the dispatch, and
/// [`OPS`] is derived from it.
const PLAIN: &[(&str, PlainFn)] = &[
    pick!("Constant", one!(op_constant)),
    pick!("Identity", one!(op_identity)),
    pick!("Dropout", one!(op_identity)),
    pick!("Relu", one!(op_relu)),
    pick!("Exp", one!(op_exp)),
    pick!("Sigmoid", one!(op_sigmoid)),
    pick!("Tanh", one!(op_tanh)),
    pick!("Sqrt", one!(op_sqrt)),
    pick!("Neg", math::op_signed),
    pick!("Abs", math::op_signed),
    pick!("Sign", math::op_signed),
    pick!("Floor", one!(op_floor)),
    pick!("Ceil", one!(op_ceil)),
    pick!("Round", one!(op_round)),
    pick!("Clip", one!(op_clip)),
    pick!("Log", math::op_log),
    pick!("Reciprocal", math::op_reciprocal),
    pick!("Sin", math::op_sin),
    pick!("Cos", math::op_cos),
    pick!("Tan", math::op_tan),
    pick!("Asin", math::op_asin),
    pick!("Acos", math::op_acos),
    pick!("Atan", math::op_atan),
    pick!("Sinh", math::op_sinh),
    pick!("Cosh", math::op_cosh),
    pick!("Asinh", math::op_asinh),
    pick!("Acosh", math::op_acosh),
    pick!("Atanh", math::op_atanh),
    pick!("Erf", math::op_erf),
    pick!("Softplus", math::op_softplus),
    pick!("Softsign", math::op_softsign),
    pick!("Elu", math::op_elu),
    pick!("Celu", math::op_celu),
    pick!("Selu", math::op_selu),
    pick!("LeakyRelu", math::op_leaky_relu),
    pick!("ThresholdedRelu", math::op_thresholded_relu),
    pick!("HardSigmoid", math::op_hard_sigmoid),
    pick!("HardSwish", math::op_hard_swish),
    pick!("Gelu", math::op_gelu),
    pick!("Mish", math::op_mish),
    pick!("IsNaN", math::op_isnan),
    pick!("IsInf", math::op_isinf),
    pick!("Not", math::op_not),
    pick!("And", math::op_logic),
    pick!("Or", math::op_logic),
    pick!("Xor", math::op_logic),
    pick!("Equal", math::op_compare),
    pick!("Less", math::op_compare),
    pick!("LessOrEqual", math::op_compare),
    pick!("Greater", math::op_compare),
    pick!("GreaterOrEqual", math::op_compare),
    pick!("Where", math::op_where),
    pick!("PRelu", math::op_prelu),
    pick!("Pow", math::op_pow),
    pick!("Mod", math::op_mod),
    pick!("Add", one!(op_arithmetic)),
    pick!("Sub", one!(op_arithmetic)),
    pick!("Mul", one!(op_arithmetic)),
    pick!("Div", one!(op_arithmetic)),
    pick!("Max", one!(op_variadic)),
    pick!("Min", one!(op_variadic)),
    pick!("Sum", math::op_sum_mean),
    pick!("Mean", math::op_sum_mean),
    pick!("Cast", one!(op_cast)),
    pick!("CastLike", shape::op_cast_like),
    pick!("Shape", one!(op_shape)),
    pick!("Size", shape::op_size),
    pick!("Gather", one!(op_gather)),
    pick!("GatherElements", shape::op_gather_elements),
    pick!("GatherND", shape::op_gather_nd),
    pick!("ScatterElements", shape::op_scatter_elements),
    pick!("ScatterND", shape::op_scatter_nd),
    pick!("Unsqueeze", one!(op_unsqueeze)),
    pick!("Squeeze", one!(op_squeeze)),
    pick!("Reshape", one!(op_reshape)),
    pick!("Flatten", one!(op_flatten)),
    pick!("Concat", one!(op_concat)),
    pick!("Split", shape::op_split),
    pick!("Transpose", one!(op_transpose)),
    pick!("Slice", one!(op_slice)),
    pick!("Expand", shape::op_expand),
    pick!("Tile", shape::op_tile),
    pick!("ConstantOfShape", shape::op_constant_of_shape),
    pick!("Range", shape::op_range),
    pick!("Pad", shape::op_pad),
    pick!("DepthToSpace", shape::op_depth_space),
    pick!("SpaceToDepth", shape::op_depth_space),
    pick!("NonZero", shape::op_nonzero),
    pick!("OneHot", shape::op_one_hot),
    pick!("Trilu", shape::op_trilu),
    pick!("ReduceSum", reduce::op_reduce),
    pick!("ReduceMean", reduce::op_reduce),
    pick!("ReduceMax", reduce::op_reduce),
    pick!("ReduceMin", reduce::op_reduce),
    pick!("ReduceProd", reduce::op_reduce),
    ("ReduceL1", reduce::op_reduce),
    ("ReduceL2", reduce::op_reduce),
    pick!("ReduceLogSum", reduce::op_reduce),
    pick!("ReduceLogSumExp", reduce::op_reduce),
    pick!("ReduceSumSquare", reduce::op_reduce),
    pick!("ArgMax", reduce::op_arg),
    pick!("ArgMin", reduce::op_arg),
    pick!("CumSum", reduce::op_cumsum),
    pick!("TopK", reduce::op_topk),
    pick!("Softmax", one!(op_softmax)),
    pick!("LogSoftmax", reduce::op_softmax_like),
    pick!("Hardmax", reduce::op_softmax_like),
    pick!("MatMul", nn::op_matmul),
    pick!("MatMulInteger", nn::op_matmul_integer),
    pick!("Gemm", nn::op_gemm),
    pick!("Einsum", nn::op_einsum),
    pick!("Conv", op_conv),
    pick!("ConvTranspose", nn::op_conv_transpose),
    pick!("ConvInteger", nn::op_conv_integer),
    pick!("NonMaxSuppression", nn::op_nms),
    pick!("MaxPool", op_max_pool),
    pick!("AveragePool", nn::pool_direct),
    pick!("LpPool", nn::pool_direct),
    pick!("GlobalAveragePool", one!(op_global_average_pool)),
    pick!("GlobalMaxPool", nn::op_global_max_pool),
    pick!("BatchNormalization", nn::op_batch_norm),
    pick!("InstanceNormalization", nn::op_instance_norm),
    pick!("LayerNormalization", nn::op_layer_norm),
    pick!("GroupNormalization", nn::op_group_norm),
    pick!("LpNormalization", nn::op_lp_norm),
    pick!("LRN", nn::op_lrn),
    pick!("Resize", resize::op_resize),
    pick!("Upsample", resize::op_resize),
    pick!("LSTM", rnn::op_rnn),
    pick!("GRU", rnn::op_rnn),
    pick!("RNN", rnn::op_rnn),
    pick!("QuantizeLinear", one!(op_quantize_linear)),
    pick!("DequantizeLinear", one!(op_dequantize_linear)),
    pick!("DynamicQuantizeLinear", op_dynamic_quantize_linear),
    pick!("If", control::op_control),
    pick!("Loop", control::op_control),
];

/// The plain ONNX ops the interpreter runs (beyond the kernel nodes), in table order.
pub static OPS: std::sync::LazyLock<Vec<&'static str>> =
    std::sync::LazyLock::new(|| PLAIN.iter().map(|(op, _)| *op).filter(|op| selection::selected(op)).collect());

/// The implementation of a plain op, `None` when the interpreter does not run it.
fn plain_op(op: &str) -> Option<PlainFn> {
    PLAIN.iter().find(|(name, _)| *name == op && selection::selected(name)).map(|(_, f)| *f)
}

fn plain(n: &NodeProto, ins: &[Option<&Tensor>], opset: i64) -> Res<Vec<Tensor>> {
    let f = plain_op(n.op()).ok_or_else(|| format!("{} is not an interpreter op", n.op()))?;
    check_inputs(ins)?;
    f(&Args { n, ins, opset })
}

fn op_constant(a: &Args) -> Res<Tensor> {
    constant(a.n)
}

fn op_identity(a: &Args) -> Res<Tensor> {
    let x = a.x()?;
    Ok(x.clone())
}

fn op_relu(a: &Args) -> Res<Tensor> {
    let x = a.x()?;
    float_map(x, |v| if v > 0.0 { v } else { 0.0 })
}

fn op_exp(a: &Args) -> Res<Tensor> {
    let x = a.x()?;
    float_map(x, f64::exp)
}

fn op_sigmoid(a: &Args) -> Res<Tensor> {
    let x = a.x()?;
    float_map(x, |v| 1.0 / (1.0 + (-v).exp()))
}

fn op_tanh(a: &Args) -> Res<Tensor> {
    let x = a.x()?;
    float_map(x, f64::tanh)
}

fn op_sqrt(a: &Args) -> Res<Tensor> {
    let x = a.x()?;
    float_map(x, f64::sqrt)
}

fn op_floor(a: &Args) -> Res<Tensor> {
    let x = a.x()?;
    float_map(x, f64::floor)
}

fn op_ceil(a: &Args) -> Res<Tensor> {
    let x = a.x()?;
    float_map(x, f64::ceil)
}

fn op_round(a: &Args) -> Res<Tensor> {
    let x = a.x()?;
    float_map(x, f64::round_ties_even)
}

fn op_clip(a: &Args) -> Res<Tensor> {
    let n = a.n;
    let ins = a.ins;
    let opset = a.opset;
    let x = a.x()?;
    let bound = |i: usize, attr: &str| -> Option<Tensor> {
        match ins.get(i).copied().flatten() {
            Some(t) => Some(t.clone()),
            None if opset < 11 => n.attr_f(attr).map(|v| Tensor::from_f32(vec![], vec![v]).ok())?,
            None => None,
        }
    };
    let mut y = x.clone();
    if let Some(lo) = bound(1, "min") {
        y = binary("Max", &y, &lo.cast(x.dtype()))?;
    }
    if let Some(hi) = bound(2, "max") {
        y = binary("Min", &y, &hi.cast(x.dtype()))?;
    }
    Ok(y)
}

/// Conv: the NHWC kernel for 2-D f32 convolutions, direct loops for the rest (1-D, 3-D, other types).
fn op_conv(a: &Args) -> Res<Vec<Tensor>> {
    let n = a.n;
    let ins = a.ins;
    let (x, w, b) = (a.x()?, input(ins, 1)?, ins.get(2).copied().flatten());
    if let (Ok([_, _, h, wd]), DType::F32, DType::F32) = (image_dims(x), x.dtype(), w.dtype())
        && w.shape().len() == 4
        && let Ok(Some(conv)) = conv_of(n, w, b.filter(|b| b.dtype() == DType::F32), Some([h, wd]))
    {
        return Ok(vec![run_conv(&conv, x)?]);
    }
    if let (&[_, _, len], DType::F32, DType::F32) = (x.shape(), x.dtype(), w.dtype())
        && w.shape().len() == 3
        && let Ok(Some(conv)) = conv1d_of(n, w, b.filter(|b| b.dtype() == DType::F32), Some(len))
    {
        return Ok(vec![run_conv1d(&conv, x)?]);
    }
    Ok(vec![nn::conv_direct(n, x, w, b)?])
}

/// MaxPool: the NHWC kernel for 2-D f32/u8 pooling, direct loops for the rest (1-D, 3-D, dilations, Indices).
fn op_max_pool(a: &Args) -> Res<Vec<Tensor>> {
    let n = a.n;
    let x = a.x()?;
    if let Ok([_, _, h, w]) = image_dims(x)
        && matches!(x.dtype(), DType::F32 | DType::U8)
        && let Ok(Some(p)) = pool_of(n, Some([h, w]))
    {
        return Ok(vec![run_pool(&p, x)?]);
    }
    nn::pool_direct(a)
}

/// DynamicQuantizeLinear: uint8 with the scale and zero point of the tensor's range (including 0).
fn op_dynamic_quantize_linear(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let v = x.to_f32_vec();
    let (lo, hi) = v.iter().fold((0f32, 0f32), |(l, h), &e| (l.min(e), h.max(e)));
    let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
    let zp = (-lo / scale).round_ties_even().clamp(0.0, 255.0);
    let y = v.iter().map(|&e| ((e / scale).round_ties_even() + zp).clamp(0.0, 255.0) as u8).collect();
    Ok(vec![
        tensor(x.shape().to_vec(), TensorData::U8(y))?,
        tensor(vec![], TensorData::F32(vec![scale]))?,
        tensor(vec![], TensorData::U8(vec![zp as u8]))?,
    ])
}

fn op_arithmetic(a: &Args) -> Res<Tensor> {
    let op = a.n.op();
    let ins = a.ins;
    let x = a.x()?;
    binary(op, x, input(ins, 1)?)
}

fn op_variadic(a: &Args) -> Res<Tensor> {
    let op = a.n.op();
    let ins = a.ins;
    let x = a.x()?;
    // Variadic, broadcasting.
    let mut y = x.clone();
    for i in 1..ins.len() {
        y = binary(op, &y, input(ins, i)?)?;
    }
    Ok(y)
}

fn op_cast(a: &Args) -> Res<Tensor> {
    let n = a.n;
    let x = a.x()?;
    let to = n.attr_i("to").unwrap_or(0) as i32;
    Ok(x.cast(DType::from_onnx_code(to).ok_or_else(|| format!("unsupported target type (ONNX element type {to})"))?))
}

fn op_shape(a: &Args) -> Res<Tensor> {
    let n = a.n;
    let x = a.x()?;
    let shape = x.shape().to_vec();
    let rank = x.shape().len();
    let r = rank as i64;
    let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let (a, b) = (clampi(n.attr_i("start").unwrap_or(0)), clampi(n.attr_i("end").unwrap_or(r)));
    let dims: Vec<i64> = shape[a..b.max(a)].iter().map(|&d| d as i64).collect();
    tensor(vec![dims.len()], TensorData::I64(dims))
}

fn op_gather(a: &Args) -> Res<Tensor> {
    let n = a.n;
    let ins = a.ins;
    let x = a.x()?;
    let shape = x.shape().to_vec();
    let rank = x.shape().len();
    let idx = input(ins, 1)?;
    let ax = axis(n.attr_i("axis").unwrap_or(0), rank)?;
    let len = shape[ax] as i64;
    let outer: usize = shape[..ax].iter().product();
    let inner: usize = shape[ax + 1..].iter().product();
    let es = x.dtype().size();
    let src = x.to_le_bytes();
    let ids = i64s(idx)?
        .into_iter()
        .map(|i| {
            let j = if i < 0 { i + len } else { i };
            (0..len).contains(&j).then_some(j as usize).ok_or(format!("index {i} out of range {len}"))
        })
        .collect::<Res<Vec<usize>>>()?;
    let out: Vec<usize> = shape[..ax].iter().chain(idx.shape()).chain(&shape[ax + 1..]).copied().collect();
    let mut dst = Vec::with_capacity(out_len(&out, &[x, idx])? * es);
    for o in 0..outer {
        for &j in &ids {
            let at = ((o * shape[ax] + j) * inner) * es;
            dst.extend_from_slice(&src[at..at + inner * es]);
        }
    }
    Tensor::from_le_bytes(x.dtype(), out, &dst).map_err(|e| e.to_string())
}

fn op_unsqueeze(a: &Args) -> Res<Tensor> {
    let x = a.x()?;
    let shape = x.shape().to_vec();
    let rank = x.shape().len();
    let axes = a.axes_of("axes", 1)?;
    let r = rank + axes.len();
    let mut axes: Vec<usize> = axes.iter().map(|&a| axis(a, r)).collect::<Res<_>>()?;
    axes.sort_unstable();
    let mut out = shape.clone();
    for a in axes {
        if a > out.len() {
            return Err(format!("axis {a} out of range"));
        }
        out.insert(a, 1);
    }
    x.clone().reshape(out).map_err(|e| e.to_string())
}

fn op_squeeze(a: &Args) -> Res<Tensor> {
    let x = a.x()?;
    let shape = x.shape().to_vec();
    let rank = x.shape().len();
    let axes: Vec<usize> = a.axes_of("axes", 1)?.iter().map(|&a| axis(a, rank)).collect::<Res<_>>()?;
    let out: Vec<usize> = shape
        .iter()
        .enumerate()
        .filter(|(i, d)| if axes.is_empty() { **d != 1 } else { !axes.contains(i) })
        .map(|(_, &d)| d)
        .collect();
    x.clone().reshape(out).map_err(|e| e.to_string())
}

fn op_reshape(a: &Args) -> Res<Tensor> {
    let n = a.n;
    let ins = a.ins;
    let x = a.x()?;
    let shape = x.shape().to_vec();
    let spec = i64s(input(ins, 1)?)?;
    let allow_zero = n.attr_i("allowzero").unwrap_or(0) != 0;
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        out.push(match d {
            0 if !allow_zero => *shape.get(i).ok_or("0 copies a dimension the input lacks")?,
            -1 if infer.is_none() => {
                infer = Some(i);
                1
            }
            d if d >= 0 => d as usize,
            d => return Err(format!("bad dimension {d} in shape {spec:?}")),
        });
    }
    if let Some(i) = infer {
        let known = out.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).unwrap_or(0);
        if known == 0 || x.len() % known != 0 {
            return Err(format!("cannot reshape {shape:?} into {spec:?}"));
        }
        out[i] = x.len() / known;
    }
    x.clone().reshape(out).map_err(|e| e.to_string())
}

fn op_flatten(a: &Args) -> Res<Tensor> {
    let n = a.n;
    let x = a.x()?;
    let shape = x.shape().to_vec();
    let rank = x.shape().len();
    let a = n.attr_i("axis").unwrap_or(1);
    let a = if a == rank as i64 { rank } else { axis(a, rank)? };
    let out = vec![shape[..a].iter().product(), shape[a..].iter().product()];
    x.clone().reshape(out).map_err(|e| e.to_string())
}

fn op_concat(a: &Args) -> Res<Tensor> {
    let n = a.n;
    let ins = a.ins;
    let x = a.x()?;
    let shape = x.shape().to_vec();
    let rank = x.shape().len();
    let ts: Vec<&Tensor> = (0..ins.len()).map(|i| input(ins, i)).collect::<Res<_>>()?;
    let ax = axis(n.attr_i("axis").unwrap_or(0), rank)?;
    let mut out = shape.clone();
    out[ax] = 0;
    for t in &ts {
        if t.dtype() != x.dtype() || t.shape().len() != rank || (0..rank).any(|d| d != ax && t.shape()[d] != shape[d]) {
            return Err(format!("inputs {:?} and {:?} do not concatenate on axis {ax}", shape, t.shape()));
        }
        out[ax] += t.shape()[ax];
    }
    let outer: usize = shape[..ax].iter().product();
    let es = x.dtype().size();
    let bytes: Vec<Vec<u8>> = ts.iter().map(|t| t.to_le_bytes()).collect();
    let chunks: Vec<usize> = ts.iter().map(|t| t.shape()[ax..].iter().product::<usize>() * es).collect();
    let mut dst = Vec::with_capacity(out.iter().product::<usize>() * es);
    for o in 0..outer {
        for (b, &c) in bytes.iter().zip(&chunks) {
            dst.extend_from_slice(&b[o * c..(o + 1) * c]);
        }
    }
    Tensor::from_le_bytes(x.dtype(), out, &dst).map_err(|e| e.to_string())
}

fn op_transpose(a: &Args) -> Res<Tensor> {
    let n = a.n;
    let x = a.x()?;
    let shape = x.shape().to_vec();
    let rank = x.shape().len();
    let perm: Vec<usize> = match n.attr_ints("perm") {
        Some(p) => p.iter().map(|&a| axis(a, rank)).collect::<Res<_>>()?,
        None => (0..rank).rev().collect(),
    };
    let mut seen = perm.clone();
    seen.sort_unstable();
    if seen != (0..rank).collect::<Vec<_>>() {
        return Err(format!("perm {perm:?} is not a permutation of rank {rank}"));
    }
    let dense = dense_strides(&shape);
    strided(x, perm.iter().map(|&p| shape[p]).collect(), 0, &perm.iter().map(|&p| dense[p]).collect::<Vec<_>>())
}

fn op_slice(a: &Args) -> Res<Tensor> {
    let ins = a.ins;
    let opset = a.opset;
    let x = a.x()?;
    let shape = x.shape().to_vec();
    let rank = x.shape().len();
    let (starts, ends, axes, steps) = if opset < 10 {
        (a.axes_of("starts", 99)?, a.axes_of("ends", 99)?, a.axes_of("axes", 99)?, vec![])
    } else {
        let opt = |i: usize| ins.get(i).copied().flatten().map(i64s).transpose();
        (i64s(input(ins, 1)?)?, i64s(input(ins, 2)?)?, opt(3)?.unwrap_or_default(), opt(4)?.unwrap_or_default())
    };
    let axes: Vec<usize> = if axes.is_empty() {
        if starts.len() > rank {
            return Err(format!("{} starts for rank {rank}", starts.len()));
        }
        (0..starts.len()).collect()
    } else {
        axes.iter().map(|&a| axis(a, rank)).collect::<Res<_>>()?
    };
    if starts.len() != axes.len() || ends.len() != axes.len() || !(steps.is_empty() || steps.len() == axes.len()) {
        return Err("starts, ends, axes and steps differ in length".into());
    }
    if axes.iter().enumerate().any(|(k, a)| axes[..k].contains(a)) {
        return Err(format!("axes {axes:?} repeat"));
    }
    let dense = dense_strides(&shape);
    let mut out = shape.clone();
    let mut strides = dense.clone();
    let mut base = 0isize;
    for (k, &a) in axes.iter().enumerate() {
        let dim = shape[a] as i64;
        let step = steps.get(k).copied().unwrap_or(1);
        if step == 0 {
            return Err("slice step 0".into());
        }
        let norm = |v: i64| if v < 0 { v + dim } else { v };
        let (s, e) = if step > 0 {
            (norm(starts[k]).clamp(0, dim), norm(ends[k]).clamp(0, dim))
        } else {
            (norm(starts[k]).clamp(-1, dim - 1), norm(ends[k]).clamp(-1, dim - 1))
        };
        let span = if step > 0 { (e - s).max(0) } else { (s - e).max(0) };
        let len = (span as u64).div_ceil(step.unsigned_abs()) as usize;
        out[a] = len;
        base += s.max(0) as isize * dense[a];
        // A step past the dim takes one element (no stride to overflow).
        strides[a] = if len > 1 { dense[a] * step as isize } else { 0 };
    }
    strided(x, out, base, &strides)
}

fn op_softmax(a: &Args) -> Res<Tensor> {
    let n = a.n;
    let opset = a.opset;
    let x = a.x()?;
    let shape = x.shape().to_vec();
    let rank = x.shape().len();
    let v = f32s(x)?;
    let default = if opset < 13 { 1 } else { -1 };
    let ax = axis(n.attr_i("axis").unwrap_or(default), rank)?;
    // Before opset 13 the input is coerced to 2-D at the axis.
    let (len, inner) =
        if opset < 13 { (shape[ax..].iter().product(), 1) } else { (shape[ax], shape[ax + 1..].iter().product()) };
    let mut y = vec![0.0f32; v.len()];
    for o in 0..v.len() / (len * inner).max(1) {
        for i in 0..inner {
            let at = |k: usize| o * len * inner + k * inner + i;
            let m = (0..len).map(|k| v[at(k)]).fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for k in 0..len {
                y[at(k)] = (v[at(k)] - m).exp();
                sum += y[at(k)];
            }
            for k in 0..len {
                y[at(k)] /= sum;
            }
        }
    }
    tensor(shape, TensorData::F32(y))
}

fn op_quantize_linear(a: &Args) -> Res<Tensor> {
    let n = a.n;
    let ins = a.ins;
    let x = a.x()?;
    let shape = x.shape().to_vec();
    let zero = ins.get(2).copied().flatten();
    let q = qparams_at(x, input(ins, 1)?, zero, n.attr_i("axis").unwrap_or(1), block_size(n))?;
    let v = x.to_f32_vec();
    // Without a zero point, opset 21's `output_dtype` names the type (default uint8).
    let out_dt =
        zero.map(Tensor::dtype).or_else(|| n.attr_i("output_dtype").and_then(|c| DType::from_onnx_code(c as i32)));
    let (lo, hi, dt) = match out_dt {
        Some(DType::I8) => (-128, 127, DType::I8),
        None | Some(DType::U8) => (0, 255, DType::U8),
        Some(DType::I16) => (-32768, 32767, DType::I16),
        Some(DType::U16) => (0, 65535, DType::U16),
        Some(d) => return Err(format!("zero point of type {d}")),
    };
    let y: Vec<i64> = v
        .iter()
        .zip(&q)
        .map(|(&x, &(s, z))| ((x / s).round_ties_even() as i64).saturating_add(z as i64).clamp(lo, hi))
        .collect();
    Ok(tensor(shape, TensorData::I64(y))?.cast(dt))
}

fn op_dequantize_linear(a: &Args) -> Res<Tensor> {
    let n = a.n;
    let ins = a.ins;
    let x = a.x()?;
    let shape = x.shape().to_vec();
    let (scale, zero) = (input(ins, 1)?, ins.get(2).copied().flatten());
    // The common case, a per-tensor 8-bit activation: one multiply per element through a 256-entry table.
    if let (Some(&s), 1, TensorData::U8(_) | TensorData::I8(_)) = (f32s(scale)?.first(), scale.len(), x.data()) {
        let z = zero.map_or(Ok(0.0), |z| first(&z.to_f32_vec(), "the zero point"))?;
        let y = match x.data() {
            TensorData::U8(v) => {
                let lut: Vec<f32> = (0..256).map(|q| (q as f32 - z) * s).collect();
                v.iter().map(|&q| lut[q as usize]).collect()
            }
            TensorData::I8(v) => {
                let lut: Vec<f32> = (0..256i32).map(|k| ((k - 128) as f32 - z) * s).collect();
                v.iter().map(|&q| lut[(q as i32 + 128) as usize]).collect()
            }
            _ => unreachable!("matched above"),
        };
        return tensor(shape, TensorData::F32(y));
    }
    let q = qparams_at(x, scale, zero, n.attr_i("axis").unwrap_or(1), block_size(n))?;
    let v = i64s(&x.cast(DType::I64))?;
    let y = v.iter().zip(&q).map(|(&v, &(s, z))| v.wrapping_sub(z as i64) as f32 * s).collect();
    tensor(shape, TensorData::F32(y))
}

fn op_global_average_pool(a: &Args) -> Res<Tensor> {
    let x = a.x()?;
    let shape = x.shape().to_vec();
    let rank = x.shape().len();
    let v = f32s(x)?;
    if rank < 3 {
        return Err(format!("expected N, C and spatial axes, got {shape:?}"));
    }
    let hw: usize = shape[2..].iter().product();
    let y = v.chunks(hw.max(1)).map(|c| c.iter().sum::<f32>() / hw as f32).collect();
    let out: Vec<usize> = shape[..2].iter().copied().chain(std::iter::repeat_n(1, rank - 2)).collect();
    tensor(out, TensorData::F32(y))
}

/// A `Constant` node's value (`value`, or one of the `value_*` scalar/list attributes).
fn constant(n: &NodeProto) -> Res<Tensor> {
    if let Some(t) = n.attr("value").and_then(|a| a.t.as_ref()) {
        return tensor_from_proto(t).map_err(|e| e.to_string());
    }
    let a = |name: &str| n.attr(name);
    if let Some(v) = a("value_float").and_then(|a| a.f) {
        return tensor(vec![], TensorData::F32(vec![v]));
    }
    if let Some(v) = a("value_floats") {
        return tensor(vec![v.floats.len()], TensorData::F32(v.floats.clone()));
    }
    if let Some(v) = a("value_int") {
        return tensor(vec![], TensorData::I64(vec![v.i.unwrap_or(0)]));
    }
    if let Some(v) = a("value_ints") {
        return tensor(vec![v.ints.len()], TensorData::I64(v.ints.clone()));
    }
    Err("a Constant without a supported value attribute".into())
}

impl Backend for InterpBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }

    fn describe(&self) -> String {
        let t = self.threads;
        format!("cpu (edgepack kernel interpreter, {t} thread{})", if t == 1 { "" } else { "s" })
    }

    fn engine(&self) -> String {
        "edgepack kernel interpreter".into()
    }

    fn threads(&self) -> Option<usize> {
        Some(self.threads)
    }

    fn prepare(&self, _shapes: &[Vec<usize>]) -> Result<()> {
        // Weights are packed at load; nothing depends on the input shapes.
        Ok(())
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        self.execute(inputs, &self.outputs, None)
    }

    fn run_values(&self, inputs: Vec<Tensor>, values: &[String]) -> Result<Vec<Tensor>> {
        let slots: Vec<usize> = values
            .iter()
            .map(|v| {
                self.names.get(v).copied().ok_or_else(|| {
                    err(format!("value `{v}` is not computed by the kernel graph (ask the tract backend)"))
                })
            })
            .collect::<Result<_>>()?;
        self.execute(inputs, &slots, None)
    }

    fn trace(&self, inputs: Vec<Tensor>, runs: usize) -> Result<Timeline> {
        let mut timeline = Timeline::new();
        for _ in 0..runs.max(1) {
            self.execute(inputs.clone(), &self.outputs, Some(&mut timeline))?;
            timeline.end_run();
        }
        Ok(timeline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_op_table_names_each_op_once_and_is_the_supported_list() {
        let mut names: Vec<&str> = PLAIN.iter().map(|(op, _)| *op).collect();
        assert_eq!(names, *OPS);
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PLAIN.len(), "an op listed twice");
        assert!(OPS.iter().all(|op| plain_op(op).is_some()));
        assert!(plain_op("Det").is_none());
    }

    /// A selective build (`EDGEPACK_INTERP_OPS`) has exactly its ops: the others are refused at load by name.
    /// Run by `tests/python/test_interp.py::test_a_selective_build_runs_its_models_only` with a list from
    /// `edgepack ops`; in a full build, every op of the table is in.
    #[test]
    fn a_selective_build_has_exactly_its_ops() {
        match selective_build() {
            None => assert_eq!(OPS.len(), PLAIN.len()),
            Some(list) => {
                assert!(OPS.iter().all(|op| list.contains(op)), "{:?}", *OPS);
                for (name, _) in PLAIN {
                    assert_eq!(plain_op(name).is_some(), list.contains(name), "{name}");
                }
            }
        }
        // A model loads iff the ops it needs are in.
        let m = edgepack_onnx::builder::tiny_classifier();
        let (need, _) = required_ops(&m);
        let loaded = InterpBackend::load(&m, 1);
        assert_eq!(loaded.is_ok(), need.iter().all(|o| OPS.contains(&o.as_str())), "{need:?}");
        if let Err(e) = loaded {
            assert!(matches!(e, Error::UnsupportedOp { .. }), "{e}");
        }
    }
}
