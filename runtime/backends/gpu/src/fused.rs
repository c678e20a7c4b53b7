//! Fused programs: a plan's device steps compiled to edgepack's own WGSL kernels on the wgpu device burn uses.
//!
//! At plan time (shapes known) the steps are grouped into kernels: a convolution (pointwise, depthwise or
//! general; NCHW, weights pre-packed for `vec4` loads, bias fused), a Gemm/MatMul with a constant matrix, a
//! pooling, a softmax or an element-wise operation, each with an **epilogue**: the element-wise readers that
//! follow it (Relu, Clip, Sigmoid, SiLU as Sigmoid + Mul, HardSwish…, Add/Mul/Sub/Div of another value or a
//! constant, broadcast: the residual Add of a block) applied to each output before it is stored. A Concat whose
//! inputs come from convolutions is never copied: each convolution stores into its channel range of the
//! Concat's buffer. Reshape/Flatten/Squeeze/Unsqueeze/Identity/Dropout are views of their input's buffer.
//!
//! The **memory plan** assigns every activation a buffer by liveness (a buffer is reused once its last reader
//! ran; graph outputs live to the end) and creates all buffers, bind groups and pipelines when the plan is
//! built. A run writes the inputs into a persistent mapped upload buffer, records every dispatch and the copies
//! of the outputs into a persistent readback buffer in **one command buffer**, submits once and waits once:
//! no device memory is allocated in a steady-state run ([`Program::run`] measures it).
//!
//! **Tiles.** Convolutions are generated in several tiles (pointwise: [`POINTWISE_TILES`], pixels × output
//! channels per invocation; general: output channels per invocation, [`general_tile`]); each output is the same
//! sum in the same order, so every tile computes the same bits.
//! On hardware adapters each tile is timed at load ([`time_variants`]), the fastest kept unless it is within 3 % of
//! the default, and the choice is cached per adapter and kernel (`gpu-tiles.json` in the cache directory): a later
//! load compiles the chosen tile only. [`TUNE_BUDGET`] bounds a load's timing.
//!
//! At f16 precision ([`Graph::half`]) activation buffers of floats (and of 8-bit integers and booleans, exact in
//! f16; only those in a graph rewritten to integer arithmetic) hold f16: kernels read them through `ldN(k)` functions that widen to f32 and store through `st(i, v)`,
//! which narrows (saturating at ±65504); accumulation, epilogues and constants stay f32. Inputs are narrowed on the
//! host as they are written into the upload buffer, outputs widened as they are read back.
//!
//! A plan whose steps include anything else (an op or a shape the kernels here do not cover, a non-float value)
//! is not compiled: the step-by-step burn interpreter runs it, as before.
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};

use burn_wgpu::wgpu;
use edgepack_backend::{RunCounters, Timeline};
use edgepack_core::tensor::{DType, Tensor};
use edgepack_onnx::{NodeExt, NodeProto};

use super::device::GpuDevice;
use super::ops::{conv_pads, ints_or};
use edgepack_kernels::reference::{resize_coord, resize_nearest};

thread_local! {
    /// Bytes of the buffers this module created on this thread (load and run alike): a run's allocation is the
    /// difference over the run (per thread, so that plans compiled by other sessions at the same time do not count).
    static ALLOC_BYTES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn allocated() -> u64 {
    ALLOC_BYTES.with(|c| c.get())
}

/// Invocations per workgroup of every kernel.
const WG: u64 = 64;

/// A step's input as the plan walk found it.
pub(crate) enum In {
    /// A device value (its slot).
    Dev(usize),
    /// A value known on the host (initializer, folded constant).
    Host(Tensor),
}

/// One device step of the plan.
pub(crate) struct Step<'a> {
    pub node: &'a NodeProto,
    pub ins: Vec<Option<In>>,
    pub outs: Vec<Option<usize>>,
}

/// A graph output: a device value or a constant folded on the host.
pub(crate) enum Out {
    Dev(usize),
    Host(Tensor),
}

/// An int8 weight: its values minus the zero point, and its scale (one, or one per index of `axis`).
pub(crate) struct QInfo {
    pub ints: Vec<f32>,
    pub scale: Vec<f32>,
    pub axis: usize,
}

/// What a plan hands to [`compile`].
pub(crate) struct Graph<'a> {
    pub steps: Vec<Step<'a>>,
    /// The shape of every device value.
    pub shapes: HashMap<usize, Vec<usize>>,
    /// Its ONNX element type (integers and booleans ride as exact f32, as on the step-by-step path).
    pub dtypes: HashMap<usize, DType>,
    /// Weights given as DequantizeLinear of int8 initializers: (step, input) → the integers (zero point removed)
    /// and the scales along `axis`.
    pub qweights: HashMap<(usize, usize), QInfo>,
    /// Per graph input: its device slot, or `None` when the plan keeps it on the host.
    pub inputs: Vec<Option<usize>>,
    pub outputs: Vec<Out>,
    pub opset: i64,
    /// Which activations are stored as f16 (arithmetic stays f32).
    pub half: Half,
}

/// Which activation buffers hold f16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Half {
    /// None.
    Off,
    /// Values f16 holds exactly: 8-bit integers and booleans (a graph's quantized activations), nothing else.
    Exact,
    /// Those and every float value.
    Floats,
}

// ---------------------------------------------------------------------------------------------------------------
// Kernel descriptions (logical: value slots, WGSL text)

/// A kernel binding after binding 0 (the output).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Bind {
    /// An activation buffer (the root slot of the value).
    Act(usize),
    /// A constant buffer (index into the program's constants).
    Const(usize),
}

/// How an activation buffer stores its values. Arithmetic is f32 either way: f16 values are widened when loaded
/// and narrowed (saturated to ±65504) when stored.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Elem {
    F32,
    F16,
}

impl Elem {
    fn bytes(self) -> u64 {
        match self {
            Elem::F32 => 4,
            Elem::F16 => 2,
        }
    }

    fn wgsl(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::F16 => "f16",
        }
    }
}

/// The bindings of one kernel and their WGSL declarations.
struct Binds {
    list: Vec<(Bind, String)>,
    decl: String,
}

impl Binds {
    fn new() -> Binds {
        Binds { list: Vec::new(), decl: String::new() }
    }

    /// The binding of `b` read as `array<ty>` ("f32", "vec4<f32>", "u32": int8 weights packed four per word;
    /// "f16", "vec4<f16>": activations stored as f16).
    fn get(&mut self, b: Bind, ty: &str) -> String {
        if let Some(i) = self.list.iter().position(|(x, t)| *x == b && t == ty) {
            return format!("b{}", i + 1);
        }
        self.list.push((b, ty.to_string()));
        let i = self.list.len();
        let _ = writeln!(self.decl, "@group(0) @binding({i}) var<storage, read> b{i}: array<{ty}>;");
        format!("b{i}")
    }

    /// An activation buffer stored as `elem`, read through a function of the element index that returns f32
    /// (`vec4<f32>` when `vec4`): the name of that function.
    fn act(&mut self, root: usize, elem: Elem, vec4: bool) -> String {
        let (ty, ret) = match vec4 {
            true => (format!("vec4<{}>", elem.wgsl()), V4),
            false => (elem.wgsl().to_string(), F1),
        };
        let fresh = !self.list.iter().any(|(x, t)| *x == Bind::Act(root) && *t == ty);
        let b = self.get(Bind::Act(root), &ty);
        let name = format!("ld{}", &b[1..]);
        if fresh {
            let _ = writeln!(self.decl, "fn {name}(k: u32) -> {ret} {{ return {ret}({b}[k]); }}");
        }
        name
    }

    fn uses_f16(&self) -> bool {
        self.list.iter().any(|(_, t)| t.contains("f16"))
    }
}

const V4: &str = "vec4<f32>";
const F1: &str = "f32";

/// WGSL helpers every kernel may call: int8 weights packed four per u32 word (x in the low byte), unpacked by
/// sign-extending shifts.
const HELPERS: &str = "fn i8x4(w: u32) -> vec4<f32> {\n  return vec4<f32>(vec4<i32>(bitcast<i32>(w << 24u), \
bitcast<i32>(w << 16u), bitcast<i32>(w << 8u), bitcast<i32>(w)) >> vec4<u32>(24u));\n}\n\
fn i8at(w: u32, k: u32) -> f32 {\n  return f32(bitcast<i32>(w << (24u - 8u * k)) >> 24u);\n}\n";

/// A WGSL f32 literal, exact (infinities included).
fn lit(v: f32) -> String {
    format!("bitcast<f32>({:#010x}u)", v.to_bits())
}

/// An element-wise operand: a device value, a constant tensor, or a scalar.
#[derive(Clone)]
enum Operand {
    Dev(usize),
    Const(Arc<Tensor>),
    Scalar(f32),
}

#[derive(Clone)]
enum EpiOp {
    /// A WGSL statement on `a`.
    Unary(String),
    /// `a = a op x` (or `x op a` when `swapped`).
    Bin { op: &'static str, x: Operand, swapped: bool },
    /// `a = table[a]` (a Gather from a constant 1-D table: QLinearAdd's lookup on an f32 device).
    Lookup(Arc<Tensor>),
}

/// One way to compute a kernel: its WGSL and grid, and the tile it uses (`PVxOV`; empty for kernels without
/// variants).
struct Variant {
    tile: String,
    wgsl: String,
    grid: Grid,
}

/// One kernel, before buffers exist.
struct KDesc {
    /// Its variants, all computing the same values (bit for bit): the first is the default.
    variants: Vec<Variant>,
    /// The ONNX nodes it covers, by name.
    label: String,
    /// Their op types, e.g. `Conv+Clip+Add`.
    op: String,
    out: usize,
    binds: Vec<Bind>,
}

/// How a kernel's invocations are laid out.
#[derive(Clone, Copy)]
enum Grid {
    /// `n` invocations, the index `t` spread over x and y (each at most 65535 workgroups).
    Flat(u64),
    /// `x` invocations along x (index `t`) × `y` × `z` workgroups (`wid.y`, `wid.z`: uniform in a workgroup).
    Tiled(u64, u32, u32),
}

/// The pointwise convolution's tiles, (pixel vec4s, channel vec4s) per invocation, the default first: at most 32
/// vec4 accumulators, and channel blocks that divide 16 (the weights' padding).
const POINTWISE_TILES: [(usize, usize); 6] = [(2, 2), (1, 1), (2, 1), (1, 2), (4, 2), (2, 4)];

/// How a convolution's tile is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TileMode {
    /// This one (`EDGEPACK_GPU_PW=PVxOV`, or the default when tuning is off).
    Fixed((usize, usize)),
    /// Every tile, timed at load ([`time_variants`]).
    Tune,
}

/// `EDGEPACK_GPU_PW=PVxOV` (one of [`POINTWISE_TILES`]) fixes the pointwise tile; otherwise the tiles are tuned
/// when `tune` ([`tuning_on`]).
fn pointwise_tile(tune: bool) -> TileMode {
    let fixed = std::env::var("EDGEPACK_GPU_PW")
        .ok()
        .and_then(|v| v.split_once('x').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?))))
        .filter(|t| POINTWISE_TILES.contains(t));
    match fixed {
        Some(t) => TileMode::Fixed(t),
        None if tune => TileMode::Tune,
        None => TileMode::Fixed(POINTWISE_TILES[0]),
    }
}

/// A load through a dequantization (zero point, scale), when there is one.
fn transform(e: String, f: Option<(f32, f32)>) -> String {
    match f {
        None => e,
        Some((z, 1.0)) => format!("({e} - {})", lit(z)),
        Some((z, s)) => format!("(({e} - {}) * {})", lit(z), lit(s)),
    }
}

/// Channel vec4s per invocation of the general convolution (tile `1xOV`): `EDGEPACK_GPU_CONV=OV` fixes it;
/// otherwise 2 (1 for groups of at most 4 channels), or each of 2, 1 and 4 timed when `tune`.
fn general_tile(tune: bool) -> TileMode {
    match std::env::var("EDGEPACK_GPU_CONV").ok().and_then(|v| v.parse().ok()).filter(|v| (1..=4).contains(v)) {
        Some(ov) => TileMode::Fixed((1, ov)),
        None if tune => TileMode::Tune,
        None => TileMode::Fixed((1, 2)),
    }
}

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

fn unary_stmt(node: &NodeProto, opset: i64, ins: &[Option<In>]) -> Option<String> {
    let f = |name: &str, d: f32| node.attr_f(name).unwrap_or(d);
    Some(match node.op() {
        "Relu" => "a = max(a, 0.0);".into(),
        "Sigmoid" => "a = 1.0 / (1.0 + exp(-a));".into(),
        "Tanh" => "a = tanh(clamp(a, -20.0, 20.0));".into(),
        "Exp" => "a = exp(a);".into(),
        "Log" => "a = log(a);".into(),
        "Sqrt" => "a = sqrt(a);".into(),
        "Reciprocal" => "a = 1.0 / a;".into(),
        "Neg" => "a = -a;".into(),
        "Abs" => "a = abs(a);".into(),
        "Floor" => "a = floor(a);".into(),
        "Ceil" => "a = ceil(a);".into(),
        "Round" => "a = round(a);".into(),
        "Identity" | "Dropout" => String::new(),
        "LeakyRelu" => format!("a = select(a * {}, a, a >= 0.0);", lit(f("alpha", 0.01))),
        "HardSigmoid" => {
            format!("a = clamp({} * a + {}, 0.0, 1.0);", lit(f("alpha", 0.2)), lit(f("beta", 0.5)))
        }
        "HardSwish" => format!("a = a * clamp({} * a + 0.5, 0.0, 1.0);", lit(1.0 / 6.0)),
        "Elu" => format!("a = select({} * (exp(a) - 1.0), a, a >= 0.0);", lit(f("alpha", 1.0))),
        "Softplus" => "a = select(log(1.0 + exp(a)), a, a > 20.0);".into(),
        "QuantizeLinear" | "DequantizeLinear" => {
            let param = |i: usize| match ins.get(i) {
                None | Some(None) => Some(0.0),
                Some(Some(In::Host(t))) if t.len() == 1 => Some(t.to_f32_vec()[0]),
                _ => None,
            };
            let (scale, zero) = (param(1)?, param(2)?);
            if node.op() == "DequantizeLinear" {
                return Some(format!("a = (a - {}) * {};", lit(zero), lit(scale)));
            }
            let out_dt = match ins.get(2) {
                Some(Some(In::Host(z))) => Some(z.dtype()),
                _ => node.attr_i("output_dtype").and_then(|c| DType::from_onnx_code(c as i32)),
            };
            let (lo, hi) = match out_dt {
                Some(DType::I8) => (-128.0, 127.0),
                Some(DType::U8) | None => (0.0, 255.0),
                Some(DType::I16) => (-32768.0, 32767.0),
                Some(DType::U16) => (0.0, 65535.0),
                Some(_) => return None,
            };
            // Division, not a multiplication by the reciprocal; ties to even (WGSL `round`), as the step path.
            let q = if scale == 1.0 { "round(a)".to_string() } else { format!("round(a / {})", lit(scale)) };
            format!("a = clamp({q} + {}, {}, {});", lit(zero), lit(lo), lit(hi))
        }
        "Clip" => {
            let (lo, hi) = if opset < 11 {
                (f("min", f32::MIN), f("max", f32::MAX))
            } else {
                let bound = |i: usize, d: f32| match ins.get(i) {
                    None | Some(None) => Some(d),
                    Some(Some(In::Host(t))) if t.len() == 1 => Some(t.to_f32_vec()[0]),
                    _ => None,
                };
                (bound(1, f32::NEG_INFINITY)?, bound(2, f32::INFINITY)?)
            };
            format!("a = min(max(a, {}), {});", lit(lo), lit(hi))
        }
        _ => return None,
    })
}

fn binary_op(op: &str) -> Option<&'static str> {
    Some(match op {
        "Add" => "+",
        "Sub" => "-",
        "Mul" => "*",
        "Div" => "/",
        "Max" => "max",
        "Min" => "min",
        _ => return None,
    })
}

fn alias_op(op: &str) -> bool {
    matches!(op, "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" | "Identity" | "Dropout")
}

struct Builder<'g, 'a> {
    g: &'g Graph<'a>,
    readers: HashMap<usize, Vec<usize>>,
    outputs: HashSet<usize>,
    /// Materialized values → the root slot whose buffer holds them.
    root: HashMap<usize, usize>,
    done: Vec<bool>,
    /// Concat inputs a convolution may store in place: slot → (the Concat's output, channel offset, channels).
    place: HashMap<usize, (usize, usize, usize)>,
    placed: HashSet<usize>,
    consts: Vec<Vec<f32>>,
    kernels: Vec<KDesc>,
    /// Casts that do not change a value (integers and booleans to anything, floats to floats): output → input.
    same: HashMap<usize, usize>,
    /// Constants stored packed as int8 (indices into `consts`).
    packed: HashSet<usize>,
    /// DequantizeLinear outputs read only as the data input of Conv/Gemm/MatMul: computed in their loads,
    /// never stored. Output → (input, zero point, scale).
    virt: HashMap<usize, (usize, f32, f32)>,
    /// Kernels with variants get all of them, to be timed at load (see [`tuning_on`]).
    tune: bool,
}

type R<T> = std::result::Result<T, String>;

impl<'g, 'a> Builder<'g, 'a> {
    fn shape(&self, slot: usize) -> R<&'g [usize]> {
        self.g.shapes.get(&slot).map(|s| s.as_slice()).ok_or_else(|| format!("no shape for value {slot}"))
    }

    /// How the buffer of root `slot` stores its values.
    fn elem(&self, slot: usize) -> Elem {
        let f16 = match (self.g.half, self.g.dtypes.get(&slot)) {
            (Half::Off, _) | (_, None) => false,
            (_, Some(DType::U8 | DType::I8 | DType::Bool)) => true,
            (Half::Floats, Some(d)) => matches!(d, DType::F32 | DType::F16 | DType::F64),
            (Half::Exact, Some(_)) => false,
        };
        if f16 { Elem::F16 } else { Elem::F32 }
    }

    /// A read of the activation buffer of root `root` (see [`Binds::act`]).
    fn act(&self, binds: &mut Binds, root: usize, vec4: bool) -> String {
        binds.act(root, self.elem(root), vec4)
    }

    fn konst(&mut self, v: Vec<f32>) -> Bind {
        self.consts.push(if v.is_empty() { vec![0.0] } else { v });
        Bind::Const(self.consts.len() - 1)
    }

    fn dev_in(&self, s: usize, i: usize) -> R<usize> {
        match self.g.steps[s].ins.get(i) {
            Some(Some(In::Dev(slot))) if self.resolve(*slot).is_some() => Ok(self.resolve(*slot).unwrap_or(*slot)),
            _ => Err(format!("{} `{}`: input {i} is not a computed device value", self.op(s), self.name(s))),
        }
    }

    fn host_in(&self, s: usize, i: usize) -> Option<&'g Tensor> {
        match self.g.steps[s].ins.get(i) {
            Some(Some(In::Host(t))) => Some(t),
            _ => None,
        }
    }

    fn op(&self, s: usize) -> &'a str {
        self.g.steps[s].node.op()
    }

    fn name(&self, s: usize) -> &'a str {
        self.g.steps[s].node.name()
    }

    fn out0(&self, s: usize) -> R<usize> {
        self.g.steps[s].outs.first().copied().flatten().ok_or_else(|| format!("{} without output", self.op(s)))
    }

    /// A device value through the casts that do not change it, when it is materialized.
    fn resolve(&self, mut slot: usize) -> Option<usize> {
        loop {
            if self.root.contains_key(&slot) {
                return Some(slot);
            }
            slot = *self.same.get(&slot)?;
        }
    }

    fn operand(&self, s: usize, i: usize) -> Option<Operand> {
        match self.g.steps[s].ins.get(i)? {
            Some(In::Dev(slot)) => self.resolve(*slot).map(Operand::Dev),
            Some(In::Host(t)) if t.len() == 1 => Some(Operand::Scalar(t.to_f32_vec()[0])),
            Some(In::Host(t)) => Some(Operand::Const(Arc::new(t.clone()))),
            _ => None,
        }
    }

    fn operand_shape(&self, x: &Operand) -> R<Vec<usize>> {
        Ok(match x {
            Operand::Dev(s) => self.shape(*s)?.to_vec(),
            Operand::Const(t) => t.shape().to_vec(),
            Operand::Scalar(_) => vec![],
        })
    }

    /// A product's weights as values with per-output-channel scales: the integers of an int8 weight quantized
    /// along `axis` (the output channels, `oc` of them) with their scales, else the values and no scale. `packed`
    /// when every value is an integer in [-128, 127]: stored four per u32 word and unpacked in the loads.
    fn weights(&self, s: usize, axis: usize, oc: usize, w: &Tensor) -> (Vec<f32>, Option<Vec<f32>>, bool) {
        let int8 = |v: &[f32]| v.iter().all(|x| x.fract() == 0.0 && (-128.0..=127.0).contains(x));
        if let Some(q) = self.g.qweights.get(&(s, 1))
            && q.ints.len() == w.len()
            && (q.scale.len() == 1 || q.axis == axis && q.scale.len() == oc)
        {
            let scale = if q.scale.len() == 1 { vec![q.scale[0]; oc] } else { q.scale.clone() };
            let packed = int8(&q.ints);
            return (q.ints.clone(), Some(scale), packed);
        }
        let v = w.to_f32_vec();
        let packed = int8(&v);
        (v, None, packed)
    }

    /// Constants: int8 values four per u32 word (as f32 bit patterns) when `packed`, else the floats.
    fn konst_w(&mut self, v: Vec<f32>, packed: bool) -> Bind {
        if !packed {
            return self.konst(v);
        }
        let words = v
            .chunks(4)
            .map(|c| {
                let mut w = 0u32;
                for (k, x) in c.iter().enumerate() {
                    w |= ((*x as i32 as i8) as u8 as u32) << (8 * k);
                }
                f32::from_bits(w)
            })
            .collect();
        let b = self.konst(words);
        if let Bind::Const(i) = b {
            self.packed.insert(i);
        }
        b
    }

    /// The data input of a Conv/Gemm/MatMul: a materialized value, or the input of a DequantizeLinear computed
    /// in the loads (zero point, scale).
    fn data_input(&self, s: usize) -> R<(usize, Option<(f32, f32)>)> {
        if let Some(Some(In::Dev(x))) = self.g.steps[s].ins.first()
            && let Some(&(src, z, sc)) = self.virt.get(x)
        {
            let src = self.resolve(src).ok_or("a dequantized input not computed")?;
            return Ok((src, Some((z, sc))));
        }
        Ok((self.dev_in(s, 0)?, None))
    }

    /// The step's output is an integer (carried as an exact float).
    fn int_out(&self, s: usize) -> bool {
        self.out0(s)
            .ok()
            .and_then(|o| self.g.dtypes.get(&o))
            .is_some_and(|d| !matches!(d, DType::F32 | DType::F16 | DType::F64))
    }

    /// A Cast of `slot` as a statement: nothing when the value is unchanged, truncation for float → integer.
    fn cast_stmt(&self, s: usize, slot: usize) -> Option<String> {
        let to = DType::from_onnx_code(self.g.steps[s].node.attr_i("to")? as i32)?;
        let from = *self.g.dtypes.get(&slot)?;
        let float = |d: DType| matches!(d, DType::F32 | DType::F16 | DType::F64);
        match (float(from), float(to), to) {
            (false, _, _) | (true, true, _) => Some(String::new()),
            (true, false, DType::Bool) => Some("a = select(0.0, 1.0, a != 0.0);".into()),
            (true, false, _) => Some("a = trunc(a);".into()),
        }
    }

    /// A Gather of a constant 1-D table by device indices (axis 0).
    fn lookup_table(&self, s: usize) -> Option<Arc<Tensor>> {
        if self.op(s) != "Gather" || self.g.steps[s].node.attr_i("axis").unwrap_or(0) != 0 {
            return None;
        }
        let t = self.host_in(s, 0)?;
        (t.shape().len() == 1 && !t.is_empty()).then(|| Arc::new(t.clone()))
    }

    /// Greedily absorbs the element-wise readers of `slot` into an epilogue: (ops, final value, covered steps).
    fn extend(&mut self, mut slot: usize) -> R<(Vec<EpiOp>, usize, Vec<usize>)> {
        let mut epi = Vec::new();
        let mut covered = Vec::new();
        loop {
            if self.outputs.contains(&slot) {
                break;
            }
            let rs = self.readers.get(&slot).cloned().unwrap_or_default();
            let shape = self.shape(slot)?.to_vec();
            // SiLU: x · sigmoid(x), x read by both.
            if rs.len() == 2 {
                let (sg, mul) = if self.op(rs[0]) == "Sigmoid" { (rs[0], rs[1]) } else { (rs[1], rs[0]) };
                if self.op(sg) == "Sigmoid" && self.op(mul) == "Mul" && !self.done[sg] && !self.done[mul] {
                    let s_out = self.out0(sg)?;
                    let mins: Vec<Option<usize>> = self.g.steps[mul]
                        .ins
                        .iter()
                        .map(|i| match i {
                            Some(In::Dev(x)) => Some(*x),
                            _ => None,
                        })
                        .collect();
                    let pair = mins == [Some(slot), Some(s_out)] || mins == [Some(s_out), Some(slot)];
                    let single = self.readers.get(&s_out).is_some_and(|r| r == &[mul]);
                    if pair && single && !self.outputs.contains(&s_out) && self.shape(self.out0(mul)?)? == shape {
                        epi.push(EpiOp::Unary("a = a / (1.0 + exp(-a));".into()));
                        self.done[sg] = true;
                        self.done[mul] = true;
                        covered.extend([sg, mul]);
                        slot = self.out0(mul)?;
                        continue;
                    }
                }
                break;
            }
            let [r] = rs[..] else { break };
            if self.done[r] || self.shape(self.out0(r)?)? != shape || self.virt.contains_key(&self.out0(r)?) {
                break;
            }
            let ins = &self.g.steps[r].ins;
            let reads_slot = |i: usize| matches!(ins.get(i), Some(Some(In::Dev(x))) if *x == slot);
            if self.op(r) == "Cast" {
                if !reads_slot(0) {
                    break;
                }
                match self.cast_stmt(r, slot) {
                    Some(stmt) => epi.push(EpiOp::Unary(stmt)),
                    None => break,
                }
            } else if let Some(t) = self.lookup_table(r) {
                if !reads_slot(1) {
                    break;
                }
                epi.push(EpiOp::Lookup(t));
            } else if let Some(stmt) = unary_stmt(self.g.steps[r].node, self.g.opset, ins) {
                if !reads_slot(0) {
                    break;
                }
                epi.push(EpiOp::Unary(stmt));
            } else if let Some(op) = binary_op(self.op(r)) {
                if ins.len() != 2 {
                    break;
                }
                let (mine, other) = if reads_slot(0) { (0, 1) } else { (1, 0) };
                if !reads_slot(mine) || reads_slot(other) {
                    break;
                }
                let Some(x) = self.operand(r, other) else { break };
                epi.push(EpiOp::Bin { op, x, swapped: mine == 1 });
                if op == "/" && self.int_out(r) {
                    epi.push(EpiOp::Unary("a = trunc(a);".into()));
                }
            } else {
                break;
            }
            self.done[r] = true;
            covered.push(r);
            slot = self.out0(r)?;
        }
        Ok((epi, slot, covered))
    }

    /// The index of `x` (broadcast to `out`) for flat output index `i`, as a WGSL expression.
    fn index_expr(xs: &[usize], out: &[usize], i: &str) -> String {
        if xs == out || numel(xs) == numel(out) && xs.iter().filter(|&&d| d != 1).eq(out.iter().filter(|&&d| d != 1)) {
            return i.to_string();
        }
        if numel(xs) == 1 {
            return "0u".into();
        }
        let r = out.len();
        let mut xs_full = vec![1usize; r - xs.len().min(r)];
        xs_full.extend_from_slice(xs);
        let mut terms = Vec::new();
        let (mut ostride, mut xstride) = (1usize, 1usize);
        for d in (0..r).rev() {
            if xs_full[d] != 1 {
                terms.push(format!("(({i} / {ostride}u) % {}u) * {xstride}u", out[d]));
            }
            ostride *= out[d];
            xstride *= xs_full[d];
        }
        format!("({})", terms.join(" + "))
    }

    fn operand_expr(&mut self, binds: &mut Binds, x: &Operand, out: &[usize], i: &str) -> R<String> {
        Ok(match x {
            Operand::Scalar(v) => lit(*v),
            Operand::Dev(s) => {
                let xs = self.shape(*s)?.to_vec();
                let root = self.root[s];
                format!("{}({})", self.act(binds, root, false), Self::index_expr(&xs, out, i))
            }
            Operand::Const(t) => {
                let b = self.konst(t.to_f32_vec());
                format!("{}[{}]", binds.get(b, F1), Self::index_expr(t.shape(), out, i))
            }
        })
    }

    fn epi_code(&mut self, binds: &mut Binds, epi: &[EpiOp], out: &[usize]) -> R<String> {
        let mut code = String::new();
        for e in epi {
            match e {
                EpiOp::Unary(s) => {
                    let _ = writeln!(code, "  {s}");
                }
                EpiOp::Lookup(t) => {
                    let b = self.konst(t.to_f32_vec());
                    let n = binds.get(b, F1);
                    let len = t.len();
                    let _ = writeln!(
                        code,
                        "  {{\n    let k = i32(round(a));\n    a = {n}[u32(clamp(select(k, k + {len}, k < 0), 0, {}))];\n  }}",
                        len - 1
                    );
                }
                EpiOp::Bin { op, x, swapped } => {
                    let xs = self.operand_shape(x)?;
                    if xs.len() > out.len() || numel(&xs) > numel(out) {
                        return Err("epilogue operand larger than its output".into());
                    }
                    let v = self.operand_expr(binds, x, out, "idx")?;
                    let (l, r) = if *swapped { (v.as_str(), "a") } else { ("a", v.as_str()) };
                    let _ = if op.len() == 1 {
                        writeln!(code, "  a = {l} {op} {r};")
                    } else {
                        writeln!(code, "  a = {op}({l}, {r});")
                    };
                }
            }
        }
        Ok(code)
    }

    /// Finishes a kernel writing `out_root`: declarations, the epilogue function, the body. Bodies read `t`
    /// (the invocation's index along x, clamped to the last valid one so that every invocation loads in bounds)
    /// and guard their stores with `ok`.
    /// `epi` (applied to outputs of shape `os`) is generated here, after the body's bindings; `steps` are the
    /// step the kernel is for and the ones its epilogue covers.
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        binds: Binds,
        epi: &[EpiOp],
        os: &[usize],
        body: String,
        grid: Grid,
        out_root: usize,
        steps: &[usize],
    ) -> R<()> {
        self.emit_alts(binds, epi, os, vec![(String::new(), body, grid)], out_root, steps)
    }

    /// [`Builder::emit`] for a kernel with variants (tile, body, grid) that compute the same values: the first is
    /// the default, the others are timed against it at load ([`time_variants`]).
    fn emit_alts(
        &mut self,
        mut binds: Binds,
        epi: &[EpiOp],
        os: &[usize],
        alts: Vec<(String, String, Grid)>,
        out_root: usize,
        steps: &[usize],
    ) -> R<()> {
        let epi = self.epi_code(&mut binds, epi, os)?;
        let out = self.elem(out_root);
        let store = match out {
            Elem::F32 => "v".to_string(),
            Elem::F16 => format!("f16(clamp(v, {}, {}))", lit(-65504.0), lit(65504.0)),
        };
        let enable = if out == Elem::F16 || binds.uses_f16() { "enable f16;\n" } else { "" };
        let mut variants = Vec::with_capacity(alts.len());
        for (tile, body, grid) in alts {
            let (along_x, total) = match grid {
                Grid::Flat(n) => (n, n),
                Grid::Tiled(x, y, z) => (x, x * y as u64 * z as u64),
            };
            if total == 0 {
                return Err("a kernel with nothing to compute".into());
            }
            if total >= u32::MAX as u64 / 2 {
                return Err("a tensor beyond 2^31 elements".into());
            }
            let first = match grid {
                Grid::Flat(_) => "(wid.y * nwg.x + wid.x)",
                Grid::Tiled(..) => "wid.x",
            };
            let wgsl = format!(
                "{enable}@group(0) @binding(0) var<storage, read_write> y: array<{}>;\n{}\n{HELPERS}\n\
                 fn st(i: u32, v: f32) {{\n  y[i] = {store};\n}}\n\nfn epi(v: f32, idx: u32) -> f32 {{\n  var a = v;\n{epi}  return a;\n}}\n\n@compute @workgroup_size({WG})\n\
                 fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, \
                 @builtin(local_invocation_index) li: u32) {{\n  let t0 = {first} * {WG}u + li;\n  let ok = t0 < {along_x}u;\n  \
                 let t = min(t0, {}u);\n{body}}}\n",
                out.wgsl(),
                binds.decl,
                along_x - 1
            );
            variants.push(Variant { tile, wgsl, grid });
        }
        // Nodes by name (unnamed ones as op#step).
        let label = steps
            .iter()
            .map(|&s| if self.name(s).is_empty() { format!("{}#{s}", self.op(s)) } else { self.name(s).to_string() })
            .collect::<Vec<_>>()
            .join(" + ");
        let op = steps.iter().map(|&s| self.op(s)).collect::<Vec<_>>().join("+");
        let kbinds = binds.list.iter().map(|b| b.0).collect();
        self.kernels.push(KDesc { variants, label, op, out: out_root, binds: kbinds });
        Ok(())
    }

    /// Where a kernel producing `slot` stores: (root, channel offset, channels of the root).
    fn placement(&mut self, slot: usize, channels: usize) -> (usize, usize, usize) {
        if let Some(&(c, off, tot)) = self.place.get(&slot) {
            self.placed.insert(slot);
            self.root.entry(c).or_insert(c);
            (c, off, tot)
        } else {
            self.root.insert(slot, slot);
            (slot, 0, channels)
        }
    }

    fn conv(&mut self, s: usize) -> R<()> {
        let node = self.g.steps[s].node;
        let (x, xf) = self.data_input(s)?;
        let tx = move |e: String| transform(e, xf);
        let xs = self.shape(x)?.to_vec();
        let w = self.host_in(s, 1).ok_or("Conv weights computed on the device")?;
        let ws = w.shape().to_vec();
        if xs.len() != 4 || ws.len() != 4 {
            return Err(format!("Conv of rank {}", xs.len()));
        }
        let bias = match self.g.steps[s].ins.get(2) {
            None | Some(None) => None,
            Some(Some(In::Host(t))) => Some(t.to_f32_vec()),
            _ => return Err("Conv bias computed on the device".into()),
        };
        let (n, ic, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
        let (oc, icg, kh, kw) = (ws[0], ws[1], ws[2], ws[3]);
        let group = node.attr_i("group").unwrap_or(1).max(1) as usize;
        let stride = ints_or(node, "strides", 2, 1).map_err(|e| e.to_string())?;
        let dil = ints_or(node, "dilations", 2, 1).map_err(|e| e.to_string())?;
        let pads = conv_pads(node, &xs[2..], &[kh, kw], &stride, &dil).map_err(|e| e.to_string())?;
        let out = self.out0(s)?;
        let os = self.shape(out)?.to_vec();
        if ic != icg * group || oc % group != 0 || os.len() != 4 || os[1] != oc {
            return Err("Conv shapes".into());
        }
        let (oh, ow) = (os[2], os[3]);
        let ocg = oc / group;
        let (wv, wscale, packed) = self.weights(s, 0, oc, w);
        let wty = if packed { "u32" } else { V4 };
        let wload = |e: String| if packed { format!("i8x4({e})") } else { e };
        let bias = bias.unwrap_or_else(|| vec![0.0; oc]);
        let (epi, fin, covered) = self.extend(out)?;
        let (root, coff, ctot) = self.placement(fin, oc);
        let mut binds = Binds::new();
        let xb = self.root[&x];
        let p = oh * ow;
        // Stores go to the root (a Concat's buffer at a channel offset); the epilogue indexes the conv's own output.
        let store = |ocx: &str, pix: &str| {
            format!(
                "if (ok) {{ st((n * {ctot}u + {ocx} + {coff}u) * {p}u + {pix}, epi(v, (n * {oc}u + {ocx}) * {p}u + {pix})); }}"
            )
        };
        // (tile, body, grid) per variant; the first is the default.
        let mut alts: Vec<(String, String, Grid)> = Vec::new();
        // A scaled product (int8 weights): the accumulator times the output channel's scale, then the bias.
        let scaled = |acc: &str, sc: &str| if wscale.is_some() { format!("{acc} * {sc}") } else { acc.to_string() };
        let pointwise = kh == 1 && kw == 1 && stride == [1, 1] && dil == [1, 1] && group == 1;
        let pointwise = pointwise && pads.iter().all(|&(a, b)| a == 0 && b == 0);
        // Work is laid out so that what a workgroup shares is uniform across it (output channels, batch index:
        // weight loads are broadcasts) and what varies along its invocations is the pixel (input loads of
        // neighbouring addresses): the shape GPUs coalesce, and that lavapipe turns into scalar loads.
        if pointwise {
            // 4·PV pixels × 4·OV output channels per invocation (vec4 loads of both); weights as [oc/4][ic] vec4,
            // channels padded to a multiple of 16 so that every tile of [`POINTWISE_TILES`] reads the same buffers.
            let ocp = oc.div_ceil(16) * 16;
            let mut wp = vec![0.0f32; ocp * ic];
            for o in 0..oc {
                for i in 0..ic {
                    wp[((o / 4) * ic + i) * 4 + o % 4] = wv[o * ic + i];
                }
            }
            let mut bp = bias.clone();
            bp.resize(ocp, 0.0);
            let (wb, bb) = (self.konst_w(wp, packed), self.konst(bp));
            let (wn, bn) = (binds.get(wb, wty), binds.get(bb, V4));
            let sn = wscale.clone().map(|mut sc| {
                sc.resize(ocp, 0.0);
                let b = self.konst(sc);
                binds.get(b, V4)
            });
            let aligned = p % 4 == 0;
            let last = n * ic * p - 1;
            let xn = self.act(&mut binds, xb, aligned);
            let tiles: Vec<(usize, usize)> = match pointwise_tile(self.tune) {
                TileMode::Fixed(t) => vec![t],
                // The default first: it is what runs when tuning is off or over its budget.
                TileMode::Tune => POINTWISE_TILES.to_vec(),
            };
            for (pv, ov) in tiles {
                let ob = oc.div_ceil(4 * ov);
                let pb = p.div_ceil(4 * pv);
                let load = |k: usize| {
                    tx(if aligned {
                        format!("{xn}((xi + {}) / 4u)", 4 * k)
                    } else {
                        let e = |d: usize| format!("{xn}(min(xi + {}u, {last}u))", 4 * k + d);
                        format!("vec4<f32>({}, {}, {}, {})", e(0), e(1), e(2), e(3))
                    })
                };
                let mut b = format!(
                    "  let p0 = (t % {pb}u) * {}u;\n  let r = t / {pb}u;\n  let ob = r % {ob}u;\n  let n = r / {ob}u;\n  \
                     var xi = n * {}u + p0;\n",
                    4 * pv,
                    ic * p
                );
                for v in 0..pv {
                    for o in 0..4 * ov {
                        let _ = writeln!(b, "  var a{v}_{o} = vec4<f32>(0.0);");
                    }
                }
                for k in 0..ov {
                    let _ = writeln!(b, "  var wi{k} = (ob * {ov}u + {k}u) * {ic}u;");
                }
                let _ = writeln!(b, "  for (var i = 0u; i < {ic}u; i = i + 1u) {{");
                for v in 0..pv {
                    let _ = writeln!(b, "    let x{v} = {};", load(v));
                }
                for k in 0..ov {
                    let _ = writeln!(b, "    let w{k} = {};\n    wi{k} = wi{k} + 1u;", wload(format!("{wn}[wi{k}]")));
                }
                for v in 0..pv {
                    for o in 0..4 * ov {
                        let c = ["x", "y", "z", "w"][o % 4];
                        let _ = writeln!(b, "    a{v}_{o} = fma(x{v}, vec4<f32>(w{}.{c}), a{v}_{o});", o / 4);
                    }
                }
                let _ = writeln!(b, "    xi = xi + {p}u;\n  }}");
                for o in 0..4 * ov {
                    let _ = writeln!(
                        b,
                        "  {{\n    let o = ob * {}u + {o}u;\n    let bo = {bn}[o / 4u][{}];\n    let so = {};\n    if (o < {oc}u) {{",
                        4 * ov,
                        o % 4,
                        sn.as_ref().map_or("1.0".to_string(), |sn| format!("{sn}[o / 4u][{}]", o % 4))
                    );
                    for v in 0..pv {
                        for q in 0..4 {
                            let pix = format!("p0 + {}u", 4 * v + q);
                            let guard = if aligned && p % (4 * pv) == 0 {
                                String::new()
                            } else {
                                format!("if ({pix} < {p}u) ")
                            };
                            let _ = writeln!(
                                b,
                                "      {guard}{{\n        let v = {} + bo;\n        {}\n      }}",
                                scaled(&format!("a{v}_{o}[{q}]"), "so"),
                                store("o", &pix)
                            );
                        }
                    }
                    b.push_str("    }\n  }\n");
                }
                alts.push((format!("{pv}x{ov}"), b, Grid::Flat((pb * ob * n) as u64)));
            }
        } else if group == ic && group == oc && icg == 1 {
            // Depthwise: 4 output columns of one channel per invocation.
            let (bb, wb) = (self.konst(bias.clone()), self.konst_w(wv, packed));
            let (bn, wn) = (binds.get(bb, F1), binds.get(wb, if packed { "u32" } else { F1 }));
            let sn = wscale.clone().map(|sc| {
                let b = self.konst(sc);
                binds.get(b, F1)
            });
            let xn = self.act(&mut binds, xb, false);
            let sz = sn.as_ref().map_or("1.0".to_string(), |sn| format!("{sn}[c]"));
            let owb = ow.div_ceil(4);
            let widx =
                "(c * {kh}u + kh) * {kw}u + kw".replace("{kh}", &kh.to_string()).replace("{kw}", &kw.to_string());
            let wexpr =
                if packed { format!("i8at({wn}[({widx}) / 4u], ({widx}) % 4u)") } else { format!("{wn}[{widx}]") };
            let mut b = format!(
                "  let owb = t % {owb}u;\n  var r = t / {owb}u;\n  let oh = r % {oh}u;\n  r = r / {oh}u;\n  let c = r % {oc}u;\n  \
                 let n = r / {oc}u;\n  let ow0 = owb * 4u;\n  \
                 let bz = {bn}[c];\n  let sz = {sz};\n  var a0 = 0.0;\n  var a1 = 0.0;\n  var a2 = 0.0;\n  var a3 = 0.0;\n  let xc = (n * {ic}u + c) * {}u;\n  \
                 let ih0 = i32(oh * {}u) - {};\n  let iw0 = i32(ow0 * {}u) - {};\n  \
                 for (var kh = 0u; kh < {kh}u; kh = kh + 1u) {{\n    let ih = ih0 + i32(kh * {}u);\n    \
                 if (ih < 0 || ih >= {h}) {{ continue; }}\n    let xr = xc + u32(ih) * {wd}u;\n    \
                 for (var kw = 0u; kw < {kw}u; kw = kw + 1u) {{\n      let wv = {wexpr};\n",
                h * wd,
                stride[0],
                pads[0].0,
                stride[1],
                pads[1].0,
                dil[0]
            );
            for q in 0..4 {
                let _ = writeln!(
                    b,
                    "      let iq{q} = iw0 + i32({}u + kw * {}u);\n      \
                     a{q} = fma(select(0.0, {}, iq{q} >= 0 && iq{q} < {wd}), wv, a{q});",
                    q * stride[1],
                    dil[1],
                    tx(format!("{xn}(xr + u32(clamp(iq{q}, 0, {})))", wd - 1))
                );
            }
            b.push_str("    }\n  }\n");
            for q in 0..4 {
                let _ = writeln!(
                    b,
                    "  if (ow0 + {q}u < {ow}u) {{\n    let v = {} + bz;\n    {}\n  }}",
                    scaled(&format!("a{q}"), "sz"),
                    store("c", &format!("oh * {ow}u + ow0 + {q}u"))
                );
            }
            alts.push((String::new(), b, Grid::Flat((oh * owb * oc * n) as u64)));
        } else {
            // General: 4·OV output channels of a group × 4 output columns per invocation (tile `1xOV`); weights
            // as [g][ocg/4][icg][kh][kw] vec4 (blocks of 4 channels, padded per group to a multiple of the widest
            // tile's, so that every tile reads the same buffers).
            let tiles: Vec<usize> = match general_tile(self.tune) {
                TileMode::Fixed((_, ov)) => vec![if ocg > 4 { ov } else { 1 }],
                // The default first; no tile wider than the group's channels.
                TileMode::Tune => [2, 1, 4].into_iter().filter(|&ov| ov == 1 || 4 * ov < 2 * ocg).collect(),
            };
            let widest = tiles.iter().copied().max().unwrap_or(1);
            let obg = ocg.div_ceil(4 * widest) * widest;
            let kk = icg * kh * kw;
            let mut wp = vec![0.0f32; group * obg * kk * 4];
            for g in 0..group {
                for o in 0..ocg {
                    for i in 0..icg {
                        for y in 0..kh {
                            for x in 0..kw {
                                let src = (((g * ocg + o) * icg + i) * kh + y) * kw + x;
                                let dst = ((((g * obg + o / 4) * icg + i) * kh + y) * kw + x) * 4 + o % 4;
                                wp[dst] = wv[src];
                            }
                        }
                    }
                }
            }
            let per_group = |v: &[f32]| {
                let mut p = vec![0.0f32; group * obg * 4];
                for g in 0..group {
                    p[g * obg * 4..g * obg * 4 + ocg].copy_from_slice(&v[g * ocg..(g + 1) * ocg]);
                }
                p
            };
            let bp = per_group(&bias);
            let sp = wscale.as_deref().map(per_group);
            let (wb, bb) = (self.konst_w(wp, packed), self.konst(bp));
            let (wn, bn) = (binds.get(wb, wty), binds.get(bb, V4));
            let sn = sp.map(|sp| {
                let b = self.konst(sp);
                binds.get(b, V4)
            });
            let xn = self.act(&mut binds, xb, false);
            let owb = ow.div_ceil(4);
            for ov in tiles {
                let blocks = ocg.div_ceil(4 * ov);
                let gobg = group * blocks;
                let mut b = format!(
                    "  let owb = t % {owb}u;\n  var r = t / {owb}u;\n  let oh = r % {oh}u;\n  r = r / {oh}u;\n  \
                 let gb = r % {gobg}u;\n  let ob = gb % {blocks}u;\n  let g = gb / {blocks}u;\n  let n = r / {gobg}u;\n  \
                 let ow0 = owb * 4u;\n  let ih0 = i32(oh * {}u) - {};\n  let iw0 = i32(ow0 * {}u) - {};\n  \
                 let wb = (g * {obg}u + ob * {ov}u) * {kk}u;\n  var wi = 0u;\n",
                    stride[0], pads[0].0, stride[1], pads[1].0,
                );
                for q in 0..4 {
                    for k in 0..ov {
                        let _ = writeln!(b, "  var a{q}_{k} = vec4<f32>(0.0);");
                    }
                }
                let _ = writeln!(
                    b,
                    "  for (var i = 0u; i < {icg}u; i = i + 1u) {{\n    let xc = (n * {ic}u + g * {icg}u + i) * {}u;\n    \
                 for (var kh = 0u; kh < {kh}u; kh = kh + 1u) {{\n      let ih = ih0 + i32(kh * {}u);\n      \
                 let inside = ih >= 0 && ih < {h};\n      let xr = xc + u32(clamp(ih, 0, {})) * {wd}u;\n      \
                 for (var kw = 0u; kw < {kw}u; kw = kw + 1u) {{",
                    h * wd,
                    dil[0],
                    h - 1
                );
                for k in 0..ov {
                    let _ = writeln!(b, "        let w{k} = {};", wload(format!("{wn}[wb + {}u + wi]", k * kk)));
                }
                b.push_str("        wi = wi + 1u;\n");
                for q in 0..4 {
                    let _ = writeln!(
                        b,
                        "        let iq{q} = iw0 + i32({}u + kw * {}u);\n        \
                     let x{q} = vec4<f32>(select(0.0, {}, inside && iq{q} >= 0 && iq{q} < {wd}));",
                        q * stride[1],
                        dil[1],
                        tx(format!("{xn}(xr + u32(clamp(iq{q}, 0, {})))", wd - 1))
                    );
                    for k in 0..ov {
                        let _ = writeln!(b, "        a{q}_{k} = fma(x{q}, w{k}, a{q}_{k});");
                    }
                }
                b.push_str("      }\n    }\n  }\n");
                for k in 0..ov {
                    let sv = sn
                        .as_ref()
                        .map_or("vec4<f32>(1.0)".to_string(), |sn| format!("{sn}[g * {obg}u + ob * {ov}u + {k}u]"));
                    let _ = writeln!(b, "  {{\n  let bv = {bn}[g * {obg}u + ob * {ov}u + {k}u];\n  let sv = {sv};");
                    for j in 0..4 {
                        let c = ["x", "y", "z", "w"][j];
                        let _ = writeln!(
                            b,
                            "  let o{j} = (ob * {ov}u + {k}u) * 4u + {j}u;\n  if (o{j} < {ocg}u) {{\n    let c{j} = g * {ocg}u + o{j};"
                        );
                        for q in 0..4 {
                            let _ = writeln!(
                                b,
                                "    if (ow0 + {q}u < {ow}u) {{\n      let v = {} + bv.{c};\n      {}\n    }}",
                                scaled(&format!("a{q}_{k}.{c}"), &format!("sv.{c}")),
                                store(&format!("c{j}"), &format!("oh * {ow}u + ow0 + {q}u"))
                            );
                        }
                        b.push_str("  }\n");
                    }
                    b.push_str("  }\n");
                }
                alts.push((format!("1x{ov}"), b, Grid::Flat((oh * owb * gobg * n) as u64)));
            }
        }
        self.emit_alts(binds, &epi, &os, alts, root, &[&[s], &covered[..]].concat())
    }

    /// Gemm / MatMul with a constant right-hand side: `y[m, n] = Σ a[m, k] · w[k, n]` (+ bias in the epilogue).
    fn gemm(&mut self, s: usize) -> R<()> {
        let node = self.g.steps[s].node;
        let (a, af) = self.data_input(s)?;
        let as_ = self.shape(a)?.to_vec();
        let w = self.host_in(s, 1).ok_or("a matrix product of two device values")?;
        let ws = w.shape().to_vec();
        let gemm = self.op(s) == "Gemm";
        if ws.len() != 2 || as_.is_empty() || (gemm && (as_.len() != 2 || node.attr_i("transA").unwrap_or(0) != 0)) {
            return Err("matrix product shapes".into());
        }
        let trans_b = gemm && node.attr_i("transB").unwrap_or(0) != 0;
        let (kk, nn) = if trans_b { (ws[1], ws[0]) } else { (ws[0], ws[1]) };
        if as_[as_.len() - 1] != kk {
            return Err("matrix product inner dims".into());
        }
        let m = numel(&as_) / kk;
        let alpha = if gemm { node.attr_f("alpha").unwrap_or(1.0) } else { 1.0 };
        let beta = if gemm { node.attr_f("beta").unwrap_or(1.0) } else { 1.0 };
        let (wv, mut wscale, packed) = self.weights(s, if trans_b { 0 } else { 1 }, nn, w);
        let alpha_w = if packed {
            if alpha != 1.0 {
                wscale = Some(wscale.unwrap_or_else(|| vec![1.0; nn]).into_iter().map(|v| v * alpha).collect());
            }
            1.0
        } else {
            alpha
        };
        let nb = nn.div_ceil(4);
        let mut wp = vec![0.0f32; kk * nb * 4];
        for k in 0..kk {
            for j in 0..nn {
                wp[k * nb * 4 + j] = alpha_w * if trans_b { wv[j * kk + k] } else { wv[k * nn + j] };
            }
        }
        let out = self.out0(s)?;
        let os = self.shape(out)?.to_vec();
        let mut head = Vec::new();
        if gemm && let Some(c) = self.host_in(s, 2) {
            let cv: Vec<f32> = c.to_f32_vec().into_iter().map(|v| v * beta).collect();
            let ct = Tensor::from_f32(c.shape().to_vec(), cv).map_err(|e| e.to_string())?;
            head.push(EpiOp::Bin { op: "+", x: Operand::Const(Arc::new(ct)), swapped: false });
        } else if gemm && matches!(self.g.steps[s].ins.get(2), Some(Some(_))) {
            return Err("Gemm bias computed on the device".into());
        }
        let (mut epi, fin, covered) = self.extend(out)?;
        head.append(&mut epi);
        self.root.insert(fin, fin);
        let mut binds = Binds::new();
        let wb = self.konst_w(wp, packed);
        let wn = binds.get(wb, if packed { "u32" } else { V4 });
        let wl = if packed { format!("i8x4({wn}[wi])") } else { format!("{wn}[wi]") };
        let an = self.act(&mut binds, self.root[&a], false);
        let ax = transform(format!("{an}(ai)"), af);
        let scale = match wscale {
            Some(mut sc) => {
                sc.resize(nb * 4, 0.0);
                let b = self.konst(sc);
                format!("  acc = acc * {}[nb];\n", binds.get(b, V4))
            }
            None => String::new(),
        };
        let mut body = format!(
            "  let nb = t;\n  let m = wid.y;\n  var acc = vec4<f32>(0.0);\n  var ai = m * {kk}u;\n  \
             var wi = nb;\n  for (var k = 0u; k < {kk}u; k = k + 1u) {{\n    acc = fma(vec4<f32>({ax}), {wl}, acc);\n    \
             ai = ai + 1u;\n    wi = wi + {nb}u;\n  }}\n{scale}"
        );
        for j in 0..4 {
            let _ = writeln!(
                body,
                "  if (ok && nb * 4u + {j}u < {nn}u) {{ let i = m * {nn}u + nb * 4u + {j}u; st(i, epi(acc[{j}], i)); }}"
            );
        }
        self.emit(binds, &head, &os, body, Grid::Tiled(nb as u64, m as u32, 1), fin, &[&[s], &covered[..]].concat())
    }

    fn pool(&mut self, s: usize) -> R<()> {
        let node = self.g.steps[s].node;
        let op = self.op(s);
        let x = self.dev_in(s, 0)?;
        let xs = self.shape(x)?.to_vec();
        let out = self.out0(s)?;
        let os = self.shape(out)?.to_vec();
        if xs.len() != 4 || os.len() != 4 || self.g.steps[s].outs.iter().skip(1).any(|o| o.is_some()) {
            return Err(format!("{op} of rank {}", xs.len()));
        }
        let (h, w) = (xs[2], xs[3]);
        let global = matches!(op, "GlobalAveragePool" | "GlobalMaxPool" | "ReduceMean" | "ReduceMax");
        let max = matches!(op, "MaxPool" | "GlobalMaxPool" | "ReduceMax");
        if matches!(op, "ReduceMean" | "ReduceMax") {
            let axes: Vec<i64> = match (node.attr_ints("axes"), self.host_in(s, 1)) {
                (Some(a), _) => a.to_vec(),
                (None, Some(t)) => t.to_f32_vec().into_iter().map(|v| v as i64).collect(),
                _ => vec![],
            };
            let axes: HashSet<i64> = axes.iter().map(|&a| if a < 0 { a + 4 } else { a }).collect();
            if axes != HashSet::from([2, 3]) || node.attr_i("keepdims").unwrap_or(1) != 1 {
                return Err(format!("{op} over axes {axes:?}"));
            }
        }
        let (epi, fin, covered) = self.extend(out)?;
        self.root.insert(fin, fin);
        let mut binds = Binds::new();
        let xn = self.act(&mut binds, self.root[&x], false);
        let init = if max { lit(f32::NEG_INFINITY) } else { "0.0".into() };
        let body = if global {
            let fin = if max { "m".to_string() } else { format!("m / {}", lit((h * w) as f32)) };
            format!(
                "  let xc = t * {hw}u;\n  var m = {init};\n  for (var i = 0u; i < {hw}u; i = i + 1u) {{\n    \
                 let v = {xn}(xc + i);\n    {acc}\n  }}\n  if (ok) {{ st(t, epi({fin}, t)); }}\n",
                hw = h * w,
                acc = if max { "m = max(m, v);" } else { "m = m + v;" }
            )
        } else {
            let kernel = node.attr_ints("kernel_shape").ok_or("pool without kernel_shape")?;
            let k: Vec<usize> = kernel.iter().map(|&v| v.max(1) as usize).collect();
            if k.len() != 2 {
                return Err("pool kernel rank".into());
            }
            let stride = ints_or(node, "strides", 2, 1).map_err(|e| e.to_string())?;
            let dil = ints_or(node, "dilations", 2, 1).map_err(|e| e.to_string())?;
            let pads = conv_pads(node, &xs[2..], &k, &stride, &dil).map_err(|e| e.to_string())?;
            let ceil = node.attr_i("ceil_mode").unwrap_or(0) == 1;
            let include = node.attr_i("count_include_pad").unwrap_or(0) == 1;
            if !max && (ceil || dil != [1, 1]) {
                return Err("AveragePool with ceil_mode or dilations".into());
            }
            let (oh, ow) = (os[2], os[3]);
            let fin = match (max, include) {
                (true, _) => "m".to_string(),
                (false, true) => format!("m / {}", lit((k[0] * k[1]) as f32)),
                (false, false) => "m / f32(cnt)".to_string(),
            };
            format!(
                "  let ow = t % {ow}u;\n  var r = t / {ow}u;\n  let oh = r % {oh}u;\n  let nc = r / {oh}u;\n  \
                 let xc = nc * {}u;\n  var m = {init};\n  var cnt = 0u;\n  \
                 for (var kh = 0u; kh < {}u; kh = kh + 1u) {{\n    let ih = i32(oh * {}u + kh * {}u) - {};\n    \
                 if (ih < 0 || ih >= {h}) {{ continue; }}\n    for (var kw = 0u; kw < {}u; kw = kw + 1u) {{\n      \
                 let iw = i32(ow * {}u + kw * {}u) - {};\n      if (iw < 0 || iw >= {w}) {{ continue; }}\n      \
                 let v = {xn}(xc + u32(ih) * {w}u + u32(iw));\n      {}\n      cnt = cnt + 1u;\n    }}\n  }}\n  \
                 if (ok) {{ st(t, epi({fin}, t)); }}\n",
                h * w,
                k[0],
                stride[0],
                dil[0],
                pads[0].0,
                k[1],
                stride[1],
                dil[1],
                pads[1].0,
                if max { "m = max(m, v);" } else { "m = m + v;" }
            )
        };
        self.emit(binds, &epi, &os, body, Grid::Flat(numel(&os) as u64), fin, &[&[s], &covered[..]].concat())
    }

    fn softmax(&mut self, s: usize) -> R<()> {
        let node = self.g.steps[s].node;
        let x = self.dev_in(s, 0)?;
        let xs = self.shape(x)?.to_vec();
        let r = xs.len() as i64;
        let default = if self.g.opset >= 13 { -1 } else { 1 };
        let axis = node.attr_i("axis").unwrap_or(default);
        let axis = if axis < 0 { axis + r } else { axis };
        if !(0..r).contains(&axis) {
            return Err("Softmax axis".into());
        }
        let axis = axis as usize;
        // Opset 13 normalizes along one axis (elements `inner` apart); earlier opsets over the flattened tail.
        let (cols, inner) =
            if self.g.opset >= 13 { (xs[axis], numel(&xs[axis + 1..])) } else { (numel(&xs[axis..]), 1) };
        let rows = numel(&xs) / cols.max(1);
        let out = self.out0(s)?;
        let os = self.shape(out)?.to_vec();
        let (epi, fin, covered) = self.extend(out)?;
        self.root.insert(fin, fin);
        let mut binds = Binds::new();
        let xn = self.act(&mut binds, self.root[&x], false);
        let value = if self.op(s) == "LogSoftmax" { "v - mx - log(sm)" } else { "exp(v - mx) / sm" };
        let body = format!(
            "  let base = (t / {inner}u) * {}u + t % {inner}u;\n  var mx = {};\n  \
             for (var i = 0u; i < {cols}u; i = i + 1u) {{ mx = max(mx, {xn}(base + i * {inner}u)); }}\n  \
             var sm = 0.0;\n  for (var i = 0u; i < {cols}u; i = i + 1u) {{ sm = sm + exp({xn}(base + i * {inner}u) - mx); }}\n  \
             if (ok) {{\n    for (var i = 0u; i < {cols}u; i = i + 1u) {{\n      let k = base + i * {inner}u;\n      \
             let v = {xn}(k);\n      st(k, epi({value}, k));\n    }}\n  }}\n",
            cols * inner,
            lit(f32::NEG_INFINITY)
        );
        self.emit(binds, &epi, &os, body, Grid::Flat(rows as u64), fin, &[&[s], &covered[..]].concat())
    }

    /// A data movement: output element `t` (of `os`) reads input element `Σ_d map_d(c_d) · xstride[src_d]`,
    /// where `c_d` is the output coordinate; `map_d` is `c_d` itself (`None`) or a table of input coordinates.
    fn movement(
        &mut self,
        steps: &[usize],
        x: usize,
        out: usize,
        src_dim: &[usize],
        maps: Vec<Option<Vec<u32>>>,
    ) -> R<()> {
        let xs = self.shape(x)?.to_vec();
        let os = self.shape(out)?.to_vec();
        if src_dim.len() != os.len() || maps.len() != os.len() {
            return Err("movement ranks".into());
        }
        let mut xstride = vec![1usize; xs.len()];
        for d in (0..xs.len().saturating_sub(1)).rev() {
            xstride[d] = xstride[d + 1] * xs[d + 1];
        }
        let (epi, fin, covered) = self.extend(out)?;
        self.root.insert(fin, fin);
        let mut binds = Binds::new();
        let xn = self.act(&mut binds, self.root[&x], false);
        let mut table = Vec::new();
        let mut body = String::from("  var r = t;\n  var src = 0u;\n");
        for d in (0..os.len()).rev() {
            let _ = writeln!(body, "  let c{d} = r % {}u;\n  r = r / {}u;", os[d], os[d]);
            match &maps[d] {
                None => {
                    let _ = writeln!(body, "  src = src + c{d} * {}u;", xstride[src_dim[d]]);
                }
                Some(m) => {
                    if m.len() != os[d] || m.iter().any(|&i| i as usize >= xs[src_dim[d]]) {
                        return Err("movement table".into());
                    }
                    let _ =
                        writeln!(body, "  src = src + u32(tb[{}u + c{d}]) * {}u;", table.len(), xstride[src_dim[d]]);
                    table.extend(m.iter().map(|&v| v as f32));
                }
            }
        }
        if !table.is_empty() {
            let b = self.konst(table);
            let tn = binds.get(b, F1);
            body = body.replace("tb[", &format!("{tn}["));
        }
        let _ = writeln!(body, "  if (ok) {{ st(t, epi({xn}(src), t)); }}");
        self.emit(binds, &epi, &os, body, Grid::Flat(numel(&os) as u64), fin, &[steps, &covered[..]].concat())
    }

    fn transpose(&mut self, s: usize) -> R<()> {
        let x = self.dev_in(s, 0)?;
        let r = self.shape(x)?.len();
        let perm: Vec<usize> = match self.g.steps[s].node.attr_ints("perm") {
            Some(p) => p.iter().map(|&v| v as usize).collect(),
            None => (0..r).rev().collect(),
        };
        let mut seen = perm.clone();
        seen.sort_unstable();
        if seen != (0..r).collect::<Vec<_>>() {
            return Err("Transpose perm".into());
        }
        let out = self.out0(s)?;
        self.movement(&[s], x, out, &perm, vec![None; r])
    }

    /// Slice (constant starts/ends/axes/steps) and Split (each output a slice along its axis).
    fn slices(&mut self, s: usize) -> R<()> {
        let node = self.g.steps[s].node;
        let x = self.dev_in(s, 0)?;
        let xs = self.shape(x)?.to_vec();
        let r = xs.len() as i64;
        let norm = |a: i64| if a < 0 { a + r } else { a };
        let ints = |i: usize| -> Option<Vec<i64>> {
            self.host_in(s, i).map(|t| t.to_f32_vec().iter().map(|&v| v as i64).collect())
        };
        let mut jobs: Vec<(usize, Vec<Option<Vec<u32>>>)> = Vec::new();
        if self.op(s) == "Split" {
            let axis = norm(node.attr_i("axis").unwrap_or(0));
            if !(0..r).contains(&axis) {
                return Err("Split axis".into());
            }
            let axis = axis as usize;
            let mut off = 0usize;
            for o in self.g.steps[s].outs.clone() {
                let Some(o) = o else { continue };
                let os = self.shape(o)?.to_vec();
                let mut maps: Vec<Option<Vec<u32>>> = (0..xs.len()).map(|_| None).collect();
                maps[axis] = Some((off as u32..(off + os[axis]) as u32).collect());
                off += os[axis];
                if self.readers.contains_key(&o) || self.outputs.contains(&o) {
                    jobs.push((o, maps));
                }
            }
        } else {
            // The ends are in the output shape already. Before opset 10 starts/axes are attributes.
            let attr = |n: &str| node.attr_ints(n).map(|v| v.to_vec());
            let (starts, axes, steps) = if self.g.opset < 10 {
                let starts = attr("starts").ok_or("Slice starts")?;
                let axes = attr("axes").unwrap_or_else(|| (0..starts.len() as i64).collect());
                let n = starts.len();
                (starts, axes, vec![1; n])
            } else {
                let starts = ints(1).ok_or("Slice starts")?;
                let axes = ints(3).unwrap_or_else(|| (0..starts.len() as i64).collect());
                let steps = ints(4).unwrap_or_else(|| vec![1; starts.len()]);
                (starts, axes, steps)
            };
            let out = self.out0(s)?;
            let os = self.shape(out)?.to_vec();
            let mut maps: Vec<Option<Vec<u32>>> = (0..xs.len()).map(|_| None).collect();
            for (k, &a) in axes.iter().enumerate() {
                let a = norm(a);
                if !(0..r).contains(&a) || steps.get(k).is_none_or(|&st| st == 0) {
                    return Err("Slice axes".into());
                }
                let (a, dim, step) = (a as usize, xs[a as usize] as i64, steps[k]);
                let st = starts[k].clamp(-(1i64 << 40), 1i64 << 40);
                let st = if st < 0 { st + dim } else { st };
                let st = if step > 0 { st.clamp(0, dim) } else { st.clamp(0, dim - 1) };
                maps[a] = Some((0..os[a] as i64).map(|c| (st + c * step).clamp(0, dim - 1) as u32).collect());
            }
            jobs.push((out, maps));
        }
        if jobs.is_empty() {
            return Ok(());
        }
        let dims: Vec<usize> = (0..xs.len()).collect();
        for (o, maps) in jobs {
            self.movement(&[s], x, o, &dims, maps)?;
        }
        Ok(())
    }

    /// Resize in `nearest` mode: each output coordinate's input coordinate from ONNX's coordinate transformation
    /// and nearest mode (`kernels::reference`, as the interpreter), as per-dimension tables.
    fn resize(&mut self, s: usize) -> R<()> {
        let node = self.g.steps[s].node;
        let x = self.dev_in(s, 0)?;
        let xs = self.shape(x)?.to_vec();
        let out = self.out0(s)?;
        let os = self.shape(out)?.to_vec();
        let mode = node.attr_s("mode").unwrap_or("nearest");
        let ctm = node.attr_s("coordinate_transformation_mode").unwrap_or(if self.g.opset < 11 {
            "asymmetric"
        } else {
            "half_pixel"
        });
        let nearest =
            node.attr_s("nearest_mode").unwrap_or(if self.g.opset < 11 { "floor" } else { "round_prefer_floor" });
        if mode != "nearest"
            || node.attr_i("antialias").unwrap_or(0) != 0
            || node.attr_ints("axes").is_some()
            || xs.len() != os.len()
        {
            return Err(format!("Resize mode {mode}"));
        }
        let scales_in = if self.g.opset < 11 { 1 } else { 2 };
        let scales: Option<Vec<f32>> =
            self.host_in(s, scales_in).map(|t| t.to_f32_vec()).filter(|v| v.len() == xs.len());
        let mut maps = Vec::new();
        for d in 0..xs.len() {
            let (inp, outp) = (xs[d], os[d]);
            let scale = scales.as_ref().map_or(outp as f64 / inp as f64, |v| v[d] as f64);
            let mut m = Vec::with_capacity(outp);
            for c in 0..outp {
                // The interpreter's arithmetic (ONNX's reference, in f64).
                let xo = resize_coord(ctm, c, inp, outp, scale, (0.0, 1.0)).ok_or("Resize outside its crop")?;
                m.push(resize_nearest(nearest, xo).clamp(0.0, inp as f64 - 1.0) as u32);
            }
            maps.push(if inp == outp && m.iter().enumerate().all(|(i, &v)| v as usize == i) { None } else { Some(m) });
        }
        let dims: Vec<usize> = (0..xs.len()).collect();
        self.movement(&[s], x, out, &dims, maps)
    }

    /// A standalone element-wise step (its producer had other readers): the first operand loaded, the op and
    /// its own readers as the epilogue.
    fn elementwise(&mut self, s: usize) -> R<()> {
        let node = self.g.steps[s].node;
        let out = self.out0(s)?;
        let os = self.shape(out)?.to_vec();
        let mut head = Vec::new();
        let table = self.lookup_table(s);
        let first = self.operand(s, if table.is_some() { 1 } else { 0 }).ok_or("element-wise input not computed")?;
        if let Some(t) = table {
            head.push(EpiOp::Lookup(t));
        } else if self.op(s) == "Cast" {
            let Operand::Dev(x) = first else { return Err("a Cast of a constant".into()) };
            head.push(EpiOp::Unary(self.cast_stmt(s, x).ok_or("Cast types")?));
        } else if let Some(stmt) = unary_stmt(node, self.g.opset, &self.g.steps[s].ins) {
            head.push(EpiOp::Unary(stmt));
        } else if let Some(op) = binary_op(self.op(s)) {
            let n = self.g.steps[s].ins.len();
            if n < 2 || (n > 2 && !matches!(self.op(s), "Max" | "Min")) {
                return Err(format!("{} with {n} inputs", self.op(s)));
            }
            for i in 1..n {
                let x = self.operand(s, i).ok_or("element-wise input not computed")?;
                head.push(EpiOp::Bin { op, x, swapped: false });
            }
            if op == "/" && self.int_out(s) {
                // Integer division truncates.
                head.push(EpiOp::Unary("a = trunc(a);".into()));
            }
        } else {
            return Err(format!("op {}", self.op(s)));
        }
        let (mut epi, fin, covered) = self.extend(out)?;
        head.append(&mut epi);
        self.root.insert(fin, fin);
        let mut binds = Binds::new();
        let load = self.operand_expr(&mut binds, &first, &os, "t")?;
        let body = format!("  if (ok) {{ st(t, epi({load}, t)); }}\n");
        self.emit(binds, &head, &os, body, Grid::Flat(numel(&os) as u64), fin, &[&[s], &covered[..]].concat())
    }

    fn concat(&mut self, s: usize) -> R<()> {
        let node = self.g.steps[s].node;
        let out = self.out0(s)?;
        let os = self.shape(out)?.to_vec();
        let r = os.len() as i64;
        let axis = node.attr_i("axis").unwrap_or(0);
        let axis = if axis < 0 { axis + r } else { axis };
        if !(0..r).contains(&axis) {
            return Err("Concat axis".into());
        }
        let axis = axis as usize;
        let outer = numel(&os[..axis]);
        let total = numel(&os[axis..]);
        self.root.entry(out).or_insert(out);
        let root = self.root[&out];
        let mut off = 0usize;
        for i in 0..self.g.steps[s].ins.len() {
            let slot = match &self.g.steps[s].ins[i] {
                Some(In::Dev(x)) => Some(*x),
                _ => None,
            };
            let xs = match &self.g.steps[s].ins[i] {
                Some(In::Dev(x)) => self.shape(*x)?.to_vec(),
                Some(In::Host(t)) => t.shape().to_vec(),
                None => continue,
            };
            let inner = numel(&xs[axis.min(xs.len())..]);
            if slot.is_some_and(|x| self.placed.contains(&x)) {
                off += inner;
                continue;
            }
            if inner > 0 {
                let x = self.operand(s, i).ok_or("Concat input not computed")?;
                let mut binds = Binds::new();
                let at = |e: &str, src: String| match &x {
                    Operand::Dev(_) => format!("{src}({e})"),
                    _ => format!("{src}[{e}]"),
                };
                let src = match &x {
                    Operand::Dev(x) => self.act(&mut binds, self.root[x], false),
                    Operand::Const(t) => {
                        let b = self.konst(t.to_f32_vec());
                        binds.get(b, F1)
                    }
                    Operand::Scalar(v) => {
                        let b = self.konst(vec![*v]);
                        binds.get(b, F1)
                    }
                };
                let body = format!(
                    "  let j = t % {inner}u;\n  let o = t / {inner}u;\n  if (ok) {{ st(o * {total}u + {off}u + j, {}); }}\n",
                    at(&format!("o * {inner}u + j"), src)
                );
                self.emit(binds, &[], &os, body, Grid::Flat((outer * inner) as u64), root, &[s])?;
            }
            off += inner;
        }
        Ok(())
    }

    fn build(mut self) -> R<Self> {
        let g = self.g;
        for (si, st) in g.steps.iter().enumerate() {
            for i in st.ins.iter().flatten() {
                if let In::Dev(x) = i {
                    let r = self.readers.entry(*x).or_default();
                    if !r.contains(&si) {
                        r.push(si);
                    }
                }
            }
        }
        for o in &g.outputs {
            if let Out::Dev(x) = o {
                self.outputs.insert(*x);
            }
        }
        for x in g.inputs.iter().flatten() {
            self.root.insert(*x, *x);
        }
        // Concats (channels of NCHW values) their convolutions may store into in place.
        for (si, st) in g.steps.iter().enumerate() {
            if st.node.op() != "Concat" {
                continue;
            }
            let Some(Some(out)) = st.outs.first() else { continue };
            let Some(os) = g.shapes.get(out) else { continue };
            let axis = st.node.attr_i("axis").unwrap_or(0);
            if os.len() != 4 || (axis != 1 && axis != -3) || self.outputs.contains(out) {
                continue;
            }
            let mut off = 0;
            let mut seen = HashSet::new();
            for i in &st.ins {
                let (slot, c) = match i {
                    Some(In::Dev(x)) => (Some(*x), g.shapes.get(x).map_or(0, |s| s.get(1).copied().unwrap_or(0))),
                    Some(In::Host(t)) => (None, t.shape().get(1).copied().unwrap_or(0)),
                    None => (None, 0),
                };
                if let Some(x) = slot {
                    let only = self.readers.get(&x).is_some_and(|r| r == &[si]);
                    if only && !self.outputs.contains(&x) && !g.inputs.contains(&Some(x)) && seen.insert(x) {
                        self.place.insert(x, (*out, off, os[1]));
                    }
                }
                off += c;
            }
        }
        // Casts that keep the value, and dequantizations folded into the loads of the products reading them.
        for (si, st) in g.steps.iter().enumerate() {
            let (Some(Some(In::Dev(x))), Some(Some(out))) = (st.ins.first(), st.outs.first()) else { continue };
            if st.node.op() == "Cast" && self.cast_stmt(si, *x).is_some_and(|c| c.is_empty()) {
                self.same.insert(*out, *x);
            }
            if st.node.op() == "DequantizeLinear" && !self.outputs.contains(out) {
                let param = |i: usize| match st.ins.get(i) {
                    None | Some(None) => Some(0.0),
                    Some(Some(In::Host(t))) if t.len() == 1 => Some(t.to_f32_vec()[0]),
                    _ => None,
                };
                let readers = self.readers.get(out).cloned().unwrap_or_default();
                let products = !readers.is_empty()
                    && readers.iter().all(|&r| {
                        let rs = &g.steps[r];
                        matches!(rs.node.op(), "Conv" | "Gemm" | "MatMul")
                            && matches!(rs.ins.first(), Some(Some(In::Dev(v))) if v == out)
                            && !rs.ins.iter().skip(1).any(|i| matches!(i, Some(In::Dev(v)) if v == out))
                    });
                if let (true, Some(z), Some(sc)) = (products, param(2), param(1)) {
                    self.virt.insert(*out, (*x, z, sc));
                }
            }
        }
        self.done = vec![false; g.steps.len()];
        for s in 0..g.steps.len() {
            if self.done[s] {
                continue;
            }
            if let Some(Some(out)) = self.g.steps[s].outs.first()
                && self.virt.contains_key(out)
            {
                self.done[s] = true;
                continue;
            }
            self.done[s] = true;
            let st = &g.steps[s];
            let op = st.node.op();
            if st.node.domain_name() != "" && st.node.domain_name() != "ai.onnx" {
                return Err(format!("op {}", op));
            }
            match op {
                _ if alias_op(op) => {
                    let x = self.dev_in(s, 0)?;
                    let out = self.out0(s)?;
                    if numel(self.shape(x)?) != numel(self.shape(out)?) || self.place.contains_key(&out) {
                        return Err(format!("{op} that is not a view"));
                    }
                    if st.outs.iter().skip(1).any(|o| o.is_some_and(|o| self.readers.contains_key(&o))) {
                        return Err("Dropout mask read".into());
                    }
                    let r = self.root[&x];
                    self.root.insert(out, r);
                }
                "Conv" => self.conv(s)?,
                "Gemm" | "MatMul" => self.gemm(s)?,
                "MaxPool" | "AveragePool" | "GlobalAveragePool" | "GlobalMaxPool" | "ReduceMean" | "ReduceMax" => {
                    self.pool(s)?
                }
                "Softmax" | "LogSoftmax" => self.softmax(s)?,
                "Transpose" => self.transpose(s)?,
                "Slice" | "Split" => self.slices(s)?,
                "Resize" => self.resize(s)?,
                "Concat" => self.concat(s)?,
                "Cast" if self.dev_in(s, 0).is_ok() && self.same.contains_key(&self.out0(s)?) => {
                    let x = self.dev_in(s, 0)?;
                    let r = self.root[&x];
                    self.root.insert(self.out0(s)?, r);
                }
                _ => self.elementwise(s)?,
            }
        }
        Ok(self)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Device objects

/// Wall time a program may spend timing kernel variants at load (compilations included); kernels past it keep
/// their default variant, uncached, and are timed at a later load.
const TUNE_BUDGET: std::time::Duration = std::time::Duration::from_secs(20);

/// Wall time of one timed sample (a run of dispatches of one variant, submitted and waited for).
const TUNE_SAMPLE_S: f64 = 2e-3;

/// How a kernel's tile was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TuneSource {
    /// Timed at this load.
    Measured,
    /// Read from the cache of an earlier load's timings.
    Cached,
    /// The load's tuning budget was spent: the default.
    OverBudget,
}

/// A kernel's tile, how it was chosen, and each variant's time (µs per dispatch) when they were measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Tuned {
    pub label: String,
    pub tile: String,
    pub source: TuneSource,
    pub us: Vec<(String, f64)>,
}

/// Tiles are tuned on hardware adapters; `EDGEPACK_GPU_AUTOTUNE=1` tunes on a software one too (lavapipe: seconds
/// per model), `=0` turns tuning off (the default tile).
fn tuning_on(info: &super::AdapterInfo) -> bool {
    match std::env::var("EDGEPACK_GPU_AUTOTUNE").as_deref() {
        Ok("1" | "on") => true,
        Ok("0" | "off") => false,
        _ => info.device_type != "Cpu",
    }
}

type Prepared = (Arc<wgpu::ComputePipeline>, wgpu::BindGroup, (u32, u32, u32));

/// Seconds for `reps` dispatches of one variant in one submission, waited for.
fn time_dispatches(gpu: &GpuDevice, p: &Prepared, reps: u32) -> R<f64> {
    let start = std::time::Instant::now();
    let mut enc = gpu.wgpu.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("edgepack tune") });
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
        for _ in 0..reps {
            pass.set_pipeline(&p.0);
            pass.set_bind_group(0, &p.1, &[]);
            pass.dispatch_workgroups(p.2.0, p.2.1, p.2.2);
        }
    }
    gpu.queue.submit([enc.finish()]);
    gpu.wgpu.poll(wgpu::PollType::Wait { submission_index: None, timeout: None }).map_err(|e| e.to_string())?;
    Ok(start.elapsed().as_secs_f64())
}

/// Microseconds per dispatch of each variant: the best of three samples each, taken in turn, with as many
/// dispatches per sample as fill [`TUNE_SAMPLE_S`] (at most 64), after one dispatch of each.
fn time_variants(gpu: &GpuDevice, variants: &[Prepared]) -> R<Vec<f64>> {
    for p in variants {
        time_dispatches(gpu, p, 1)?;
    }
    let one = time_dispatches(gpu, &variants[0], 1)?;
    let reps = (TUNE_SAMPLE_S / one.max(1e-7)).ceil().clamp(1.0, 64.0) as u32;
    let mut best = vec![f64::INFINITY; variants.len()];
    for _ in 0..3 {
        for (b, p) in best.iter_mut().zip(variants) {
            *b = b.min(time_dispatches(gpu, p, reps)? / reps as f64);
        }
    }
    Ok(best.into_iter().map(|s| s * 1e6).collect())
}

/// The fastest variant, unless it is within 3 % of the default (the first): timing noise does not move a kernel
/// off its default.
fn choose(us: &[f64]) -> usize {
    let best = (0..us.len()).min_by(|&a, &b| us[a].total_cmp(&us[b])).unwrap_or(0);
    if us[best] < 0.97 * us[0] { best } else { 0 }
}

/// A cached tile choice.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct TileEntry {
    tile: String,
    us: std::collections::BTreeMap<String, f64>,
    adapter: String,
}

/// The cache key of a kernel on an adapter: its default variant's WGSL (shapes, epilogue, storage) and the
/// adapter's name, API and driver.
fn tile_key(info: &super::AdapterInfo, wgsl: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{}|{}|{}|{wgsl}", info.name, info.api, info.driver));
    hex::encode(&digest[..12])
}

const TILES_FILE: &str = "gpu-tiles.json";

/// The tile cache of this process, read from `gpu-tiles.json` in the cache directory on first use.
fn tile_cache<T>(f: impl FnOnce(&mut std::collections::BTreeMap<String, TileEntry>) -> T) -> T {
    static CACHE: OnceLock<Mutex<std::collections::BTreeMap<String, TileEntry>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(edgepack_core::fsutil::read_cached_map(TILES_FILE)));
    f(&mut cache.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Writes the tile cache back (atomically, merged with what other processes wrote meanwhile). A cache that
/// cannot be written only costs a measurement at the next load.
fn save_tile_cache() {
    let ours = tile_cache(|c| c.clone());
    edgepack_core::fsutil::update_cached_map(TILES_FILE, |on_disk| on_disk.extend(ours));
}

struct Kernel {
    pipeline: Arc<wgpu::ComputePipeline>,
    group: wgpu::BindGroup,
    groups: (u32, u32, u32),
    label: String,
    op: String,
}

enum OutBuf {
    /// (buffer, element count, shape, byte offset in the readback buffer, how the buffer stores it)
    Dev(usize, usize, Vec<usize>, u64, Elem),
    Host(Tensor),
}

struct Io {
    /// The upload buffer is mapped (ready for the next run's inputs).
    upload_mapped: bool,
    last: RunCounters,
}

/// A compiled plan: kernels, buffers, bind groups; see the module documentation.
pub(crate) struct Program {
    kernels: Vec<Kernel>,
    buffers: Vec<wgpu::Buffer>,
    _consts: Vec<wgpu::Buffer>,
    /// Per graph input: (buffer, byte offset in the upload buffer, element count, how the buffer stores it),
    /// `None` for host-kept inputs.
    inputs: Vec<Option<(usize, u64, usize, Elem)>>,
    outputs: Vec<OutBuf>,
    upload: wgpu::Buffer,
    readback: wgpu::Buffer,
    io: Mutex<Io>,
    /// Bytes of constants resident on the device: (as f32, as packed int8).
    pub const_bytes: (usize, usize),
    /// How each kernel with variants got its tile.
    pub tuned: Vec<Tuned>,
    /// Bytes of the activation buffers of the memory plan.
    activation_bytes: u64,
}

fn create_buffer(dev: &wgpu::Device, label: &str, size: u64, usage: wgpu::BufferUsages, mapped: bool) -> wgpu::Buffer {
    let size = size.max(4).div_ceil(4) * 4;
    ALLOC_BYTES.with(|c| c.set(c.get() + size));
    dev.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size, usage, mapped_at_creation: mapped })
}

/// Bytes a copy of `n` values stored as `elem` moves (buffer copies go by multiples of 4 bytes).
fn copy_size(n: usize, elem: Elem) -> u64 {
    (n as u64 * elem.bytes()).div_ceil(4) * 4
}

fn pipelines() -> &'static Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>> {
    static P: OnceLock<Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>> = OnceLock::new();
    P.get_or_init(Default::default)
}

/// Polls a future wgpu resolves synchronously on native backends (error scopes).
fn ready<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Compiles the plan's steps; `Err` says why they stay on the step-by-step path.
pub(crate) fn compile(graph: &Graph, gpu: &GpuDevice) -> R<Program> {
    let b = Builder {
        g: graph,
        readers: HashMap::new(),
        outputs: HashSet::new(),
        root: HashMap::new(),
        done: Vec::new(),
        place: HashMap::new(),
        placed: HashSet::new(),
        consts: Vec::new(),
        kernels: Vec::new(),
        same: HashMap::new(),
        virt: HashMap::new(),
        packed: HashSet::new(),
        tune: tuning_on(&gpu.info),
    }
    .build()?;
    let dump = std::env::var_os("EDGEPACK_GPU_DUMP").is_some();
    if dump {
        for k in &b.kernels {
            let v = &k.variants[0];
            let threads = match v.grid {
                Grid::Flat(n) => n,
                Grid::Tiled(x, y, z) => x * y as u64 * z as u64,
            };
            eprintln!("// {} ({}): {threads} invocations, {} variants\n{}", k.label, k.op, k.variants.len(), v.wgsl);
        }
    }
    let dev = &gpu.wgpu;
    let limits = dev.limits();
    let max_bind = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
    if b.kernels.iter().any(|k| k.binds.len() + 1 > limits.max_storage_buffers_per_shader_stage as usize) {
        return Err("a kernel with more buffers than the adapter binds".into());
    }
    // Memory plan: roots in first-touch order, released after their last touch; best-fit reuse.
    let bytes = |root: usize| -> R<u64> {
        let n = graph.shapes.get(&root).map(|s| numel(s) as u64).ok_or_else(|| format!("no shape for value {root}"))?;
        Ok(n * b.elem(root).bytes())
    };
    let out_roots: HashSet<usize> = graph
        .outputs
        .iter()
        .filter_map(|o| match o {
            Out::Dev(x) => b.root.get(x).copied(),
            Out::Host(_) => None,
        })
        .collect();
    let mut last: HashMap<usize, usize> = HashMap::new();
    for (ki, k) in b.kernels.iter().enumerate() {
        last.insert(k.out, ki);
        for bd in &k.binds {
            if let Bind::Act(r) = bd {
                last.insert(*r, ki);
            }
        }
    }
    let mut sizes: Vec<u64> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut assign: HashMap<usize, usize> = HashMap::new();
    let take = |need: u64, sizes: &mut Vec<u64>, free: &mut Vec<usize>| -> usize {
        let best = free.iter().enumerate().filter(|&(_, &b)| sizes[b] >= need).min_by_key(|&(_, &b)| sizes[b]);
        if let Some((i, _)) = best {
            return free.swap_remove(i);
        }
        // None fits: grow the largest free buffer rather than adding one.
        if let Some((i, _)) = free.iter().enumerate().max_by_key(|&(_, &b)| sizes[b]) {
            let b = free.swap_remove(i);
            sizes[b] = need;
            return b;
        }
        sizes.push(need);
        sizes.len() - 1
    };
    for x in graph.inputs.iter().flatten() {
        let r = b.root[x];
        if let std::collections::hash_map::Entry::Vacant(e) = assign.entry(r) {
            e.insert(take(bytes(r)?, &mut sizes, &mut free));
        }
    }
    for (ki, k) in b.kernels.iter().enumerate() {
        if let std::collections::hash_map::Entry::Vacant(e) = assign.entry(k.out) {
            e.insert(take(bytes(k.out)?, &mut sizes, &mut free));
        }
        let mut touched: Vec<usize> = vec![k.out];
        touched.extend(k.binds.iter().filter_map(|bd| if let Bind::Act(r) = bd { Some(*r) } else { None }));
        touched.sort_unstable();
        touched.dedup();
        for r in touched {
            if last.get(&r) == Some(&ki) && !out_roots.contains(&r) {
                let buf = *assign.get(&r).ok_or("a value read before it is written")?;
                free.push(buf);
            }
        }
    }
    if sizes.iter().any(|&s| s > max_bind) {
        return Err(format!("an activation over the adapter's {max_bind}-byte binding limit"));
    }
    let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
    let act_usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let buffers: Vec<wgpu::Buffer> =
        sizes.iter().map(|&s| create_buffer(dev, "edgepack activation", s, act_usage, false)).collect();
    let consts: Vec<wgpu::Buffer> = b
        .consts
        .iter()
        .map(|c| {
            let buf = create_buffer(dev, "edgepack weights", c.len() as u64 * 4, wgpu::BufferUsages::STORAGE, true);
            if let Ok(mut view) = buf.slice(..).get_mapped_range_mut() {
                let mut bytes: Vec<u8> = c.iter().flat_map(|v| v.to_le_bytes()).collect();
                bytes.resize(view.len(), 0);
                view.copy_from_slice(&bytes);
            }
            buf.unmap();
            buf
        })
        .collect();
    let max = limits.max_compute_workgroups_per_dimension as u64;
    // A variant's pipeline (shared by identical WGSL across programs), bind group and workgroup counts.
    let prepare = |k: &KDesc, v: &Variant| -> R<Prepared> {
        let pipeline = {
            let mut cache = pipelines().lock().map_err(|_| "pipeline cache poisoned")?;
            match cache.get(&v.wgsl) {
                Some(p) => p.clone(),
                None => {
                    let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(&k.op),
                        source: wgpu::ShaderSource::Wgsl(v.wgsl.as_str().into()),
                    });
                    let p = Arc::new(dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                        label: Some(&k.op),
                        layout: None,
                        module: &module,
                        entry_point: Some("main"),
                        compilation_options: Default::default(),
                        cache: None,
                    }));
                    cache.insert(v.wgsl.clone(), p.clone());
                    p
                }
            }
        };
        let layout = pipeline.get_bind_group_layout(0);
        let mut entries =
            vec![wgpu::BindGroupEntry { binding: 0, resource: buffers[assign[&k.out]].as_entire_binding() }];
        for (i, bd) in k.binds.iter().enumerate() {
            let buf = match bd {
                Bind::Act(r) => &buffers[*assign.get(r).ok_or("an unassigned value")?],
                Bind::Const(c) => &consts[*c],
            };
            entries.push(wgpu::BindGroupEntry { binding: i as u32 + 1, resource: buf.as_entire_binding() });
        }
        let group =
            dev.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &layout, entries: &entries });
        let groups = match v.grid {
            Grid::Flat(n) => {
                let wgs = n.div_ceil(WG);
                let x = wgs.min(max);
                (x, wgs.div_ceil(x), 1)
            }
            Grid::Tiled(x, y, z) => (x.div_ceil(WG), y as u64, z as u64),
        };
        if groups.0 > max || groups.1 > max || groups.2 > max {
            return Err("a kernel beyond the dispatch limits".into());
        }
        Ok((pipeline, group, (groups.0 as u32, groups.1 as u32, groups.2 as u32)))
    };
    let mut kernels = Vec::new();
    let mut tuned = Vec::new();
    let deadline = std::time::Instant::now() + TUNE_BUDGET;
    for k in &b.kernels {
        let mut pick = 0;
        // The picked variant when timing prepared it already.
        let mut timed = None;
        if k.variants.len() > 1 {
            let tiles: Vec<&str> = k.variants.iter().map(|v| v.tile.as_str()).collect();
            let key = tile_key(&gpu.info, &k.variants[0].wgsl);
            let cached = tile_cache(|c| c.get(&key).cloned());
            let (source, us) = match cached {
                Some(e) if tiles.contains(&e.tile.as_str()) => {
                    pick = tiles.iter().position(|t| *t == e.tile).unwrap_or(0);
                    // In the variants' order (the default first), as when measured.
                    let us = tiles.iter().filter_map(|t| Some((t.to_string(), *e.us.get(*t)?))).collect();
                    (TuneSource::Cached, us)
                }
                _ if std::time::Instant::now() < deadline => {
                    let mut ready = k.variants.iter().map(|v| prepare(k, v)).collect::<R<Vec<_>>>()?;
                    let us = time_variants(gpu, &ready)?;
                    pick = choose(&us);
                    timed = Some(ready.swap_remove(pick));
                    let us: Vec<(String, f64)> = tiles.iter().map(|t| t.to_string()).zip(us).collect();
                    let entry = TileEntry {
                        tile: tiles[pick].to_string(),
                        us: us.iter().cloned().collect(),
                        adapter: gpu.info.short(),
                    };
                    tile_cache(|c| c.insert(key, entry));
                    (TuneSource::Measured, us)
                }
                _ => (TuneSource::OverBudget, Vec::new()),
            };
            // Only the chosen variant's pipeline stays cached.
            if let Ok(mut cache) = pipelines().lock() {
                for (i, v) in k.variants.iter().enumerate() {
                    if i != pick {
                        cache.remove(&v.wgsl);
                    }
                }
            }
            tuned.push(Tuned { label: k.label.clone(), tile: tiles[pick].to_string(), source, us });
        }
        let (pipeline, group, groups) = match timed {
            Some(p) => p,
            None => prepare(k, &k.variants[pick])?,
        };
        kernels.push(Kernel { pipeline, group, groups, label: k.label.clone(), op: k.op.clone() });
    }
    if tuned.iter().any(|t| t.source == TuneSource::Measured) {
        save_tile_cache();
    }
    if dump {
        for t in &tuned {
            eprintln!("// tile {} ({:?}) for {}: {:?}", t.tile, t.source, t.label, t.us);
        }
    }
    if let Some(Some(e)) = ready(scope.pop()) {
        // A kernel the adapter refused (its WGSL or limits): drop the cached pipelines of this program.
        if let Ok(mut cache) = pipelines().lock() {
            for k in &b.kernels {
                for v in &k.variants {
                    cache.remove(&v.wgsl);
                }
            }
        }
        return Err(format!("the adapter refused a fused kernel: {e}"));
    }
    let mut const_bytes = (0, 0);
    for (i, c) in b.consts.iter().enumerate() {
        if b.packed.contains(&i) {
            const_bytes.1 += c.len() * 4;
        } else {
            const_bytes.0 += c.len() * 4;
        }
    }
    let mut up = 0u64;
    let inputs = graph
        .inputs
        .iter()
        .map(|x| {
            x.map(|x| {
                let r = b.root[&x];
                let spec = (assign[&r], up, graph.shapes.get(&x).map_or(0, |s| numel(s)), b.elem(r));
                up += copy_size(spec.2, spec.3);
                spec
            })
        })
        .collect();
    let mut down = 0u64;
    let outputs = graph
        .outputs
        .iter()
        .map(|o| match o {
            Out::Host(t) => Ok(OutBuf::Host(t.clone())),
            Out::Dev(x) => {
                let r = *b.root.get(x).ok_or("an output never computed")?;
                let shape = graph.shapes[x].clone();
                let n = numel(&shape);
                let elem = b.elem(r);
                let ob = OutBuf::Dev(assign[&r], n, shape, down, elem);
                down += copy_size(n, elem);
                Ok(ob)
            }
        })
        .collect::<R<Vec<_>>>()?;
    let upload =
        create_buffer(dev, "edgepack upload", up, wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC, true);
    let readback = create_buffer(
        dev,
        "edgepack readback",
        down,
        wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        false,
    );
    let activation_bytes = buffers.iter().map(|b| b.size()).sum();
    Ok(Program {
        kernels,
        buffers,
        _consts: consts,
        inputs,
        outputs,
        upload,
        readback,
        io: Mutex::new(Io { upload_mapped: true, last: RunCounters::default() }),
        const_bytes,
        tuned,
        activation_bytes,
    })
}

impl Program {
    pub fn last_counters(&self) -> RunCounters {
        self.io.lock().map(|g| g.last).unwrap_or_default()
    }

    /// Maps the upload and readback buffers after a submission and waits for both.
    fn wait_maps(&self, gpu: &GpuDevice, read: bool) -> std::result::Result<(), String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx2 = tx.clone();
        self.upload.slice(..).map_async(wgpu::MapMode::Write, move |r| {
            let _ = tx.send(r.map_err(|e| e.to_string()));
        });
        let mut expect = 1;
        if read {
            self.readback.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx2.send(r.map_err(|e| e.to_string()));
            });
            expect += 1;
        }
        gpu.wgpu.poll(wgpu::PollType::Wait { submission_index: None, timeout: None }).map_err(|e| e.to_string())?;
        for _ in 0..expect {
            rx.recv().map_err(|e| e.to_string())??;
        }
        Ok(())
    }

    /// One run: inputs (per graph input, `None` for host-kept ones) → outputs. With `timeline`, each kernel is
    /// submitted and waited for alone, and recorded under the nodes it covers.
    pub fn run(
        &self,
        gpu: &GpuDevice,
        inputs: &[Option<&Tensor>],
        timeline: Option<&mut Timeline>,
    ) -> std::result::Result<Vec<Tensor>, String> {
        let mut io = self.io.lock().map_err(|_| "fused program lock poisoned")?;
        let before = allocated();
        if !io.upload_mapped {
            self.wait_maps(gpu, false)?;
            io.upload_mapped = true;
        }
        {
            let mut view = self.upload.slice(..).get_mapped_range_mut().map_err(|e| e.to_string())?;
            for (spec, t) in self.inputs.iter().zip(inputs) {
                if let (Some((_, off, n, elem)), Some(t)) = (spec, t) {
                    let v = t.to_f32_vec();
                    if v.len() != *n {
                        return Err(format!("input of {} values, the plan expects {n}", v.len()));
                    }
                    let bytes: Vec<u8> = match elem {
                        Elem::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                        Elem::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
                    };
                    view.slice(*off as usize..*off as usize + bytes.len()).copy_from_slice(&bytes);
                }
            }
        }
        self.upload.unmap();
        io.upload_mapped = false;
        let dev = &gpu.wgpu;
        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("edgepack run") });
        for (b, off, n, elem) in self.inputs.iter().flatten() {
            if *n > 0 {
                enc.copy_buffer_to_buffer(&self.upload, *off, &self.buffers[*b], 0, copy_size(*n, *elem));
            }
        }
        let mut submissions = 0;
        let record = |enc: &mut wgpu::CommandEncoder, ks: &[Kernel]| {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            for k in ks {
                pass.set_pipeline(&k.pipeline);
                pass.set_bind_group(0, &k.group, &[]);
                pass.dispatch_workgroups(k.groups.0, k.groups.1, k.groups.2);
            }
        };
        if let Some(tl) = timeline {
            gpu.queue.submit([enc.finish()]);
            submissions += 1;
            for k in &self.kernels {
                let start = std::time::Instant::now();
                let mut e = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
                record(&mut e, std::slice::from_ref(k));
                gpu.queue.submit([e.finish()]);
                submissions += 1;
                dev.poll(wgpu::PollType::Wait { submission_index: None, timeout: None }).map_err(|e| e.to_string())?;
                tl.record(&k.label, &k.op, start);
            }
            enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        } else {
            record(&mut enc, &self.kernels);
        }
        for o in &self.outputs {
            if let OutBuf::Dev(b, n, _, off, elem) = o
                && *n > 0
            {
                enc.copy_buffer_to_buffer(&self.buffers[*b], 0, &self.readback, *off, copy_size(*n, *elem));
            }
        }
        gpu.queue.submit([enc.finish()]);
        submissions += 1;
        self.wait_maps(gpu, true)?;
        io.upload_mapped = true;
        let outs = {
            let view = self.readback.slice(..).get_mapped_range().map_err(|e| e.to_string())?;
            self.outputs
                .iter()
                .map(|o| match o {
                    OutBuf::Host(t) => Ok(t.clone()),
                    OutBuf::Dev(_, n, shape, off, elem) => {
                        let bytes = &view[*off as usize..*off as usize + n * elem.bytes() as usize];
                        let v = match elem {
                            Elem::F32 => bytes.as_chunks::<4>().0.iter().map(|c| f32::from_le_bytes(*c)).collect(),
                            Elem::F16 => {
                                bytes.as_chunks::<2>().0.iter().map(|c| half::f16::from_le_bytes(*c).to_f32()).collect()
                            }
                        };
                        Tensor::from_f32(shape.clone(), v).map_err(|e| e.to_string())
                    }
                })
                .collect::<R<Vec<_>>>()
        };
        self.readback.unmap();
        io.last = RunCounters {
            dispatches: self.kernels.len(),
            submissions,
            alloc_bytes: allocated() - before,
            activation_bytes: self.activation_bytes,
        };
        outs
    }
}
