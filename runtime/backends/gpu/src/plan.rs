//! The GPU session: values, the plan per input shapes, host folding, execution.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use burn_backend::ops::{FloatTensorOps, QTensorOps};
use burn_backend::quantization::{QuantScheme, QuantStore, QuantValue, ScaleDtype};
use burn_backend::{FloatDType, TensorData as BData, TensorMetadata};

use super::Precision;
use super::device::{GpuDevice, device};
use super::fused;
use super::ops;
use edgepack_backend::{Backend, BackendKind, HostLoader, Timeline};
use edgepack_core::tensor::{DType, Tensor, TensorData};
use edgepack_core::{Error, Result};
use edgepack_lower::QdqInteger;
use edgepack_onnx::{Model, NodeExt, NodeProto, tensor_from_proto, tensor_to_proto};

pub(crate) type B = burn_wgpu::Wgpu;
pub(crate) type T = burn_wgpu::CubeTensor;

pub(crate) fn gpu_err(e: impl std::fmt::Display) -> Error {
    Error::Backend { backend: "gpu", message: e.to_string() }
}

/// A value known on the host (initializer, folded constant, shape); uploaded once, on first device use.
pub(crate) struct HostVal {
    pub t: Tensor,
    up: OnceLock<T>,
}

/// An int8 weight kept quantized on the device: `q` holds the values (flat, padded to a multiple of 4, Q8S with
/// scale 1 packed in u32 words), dequantized each run and multiplied by `scale` (shaped to broadcast along the
/// quantization axis).
pub(crate) struct QWeight {
    q: T,
    len: usize,
    shape: Vec<usize>,
    scale: T,
    /// The DequantizeLinear inputs, for folding on the host when a host node consumes the weight.
    pub node: NodeProto,
    pub host_inputs: Vec<Option<Tensor>>,
}

impl QWeight {
    /// The weight's integers (zero point removed) and scales, from the DequantizeLinear's host inputs.
    pub fn host_info(&self) -> Option<fused::QInfo> {
        let x = self.host_inputs.first()?.as_ref()?;
        let scale = self.host_inputs.get(1)?.as_ref()?.to_f32_vec();
        let zp: Vec<f32> = match self.host_inputs.get(2) {
            Some(Some(z)) => z.to_f32_vec(),
            _ => vec![0.0],
        };
        let rank = x.shape().len() as i64;
        let axis = self.node.attr_i("axis").unwrap_or(1);
        let axis = if axis < 0 { axis + rank } else { axis };
        let axis = usize::try_from(axis).ok().filter(|&a| a < x.shape().len())?;
        let inner: usize = x.shape()[axis + 1..].iter().product::<usize>().max(1);
        let dim = x.shape()[axis];
        let ints = x
            .to_f32_vec()
            .into_iter()
            .enumerate()
            .map(|(i, v)| v - if zp.len() == 1 { zp[0] } else { zp[(i / inner) % dim] })
            .collect();
        Some(fused::QInfo { ints, scale, axis })
    }
}

/// A device value: the burn float tensor (compute precision) and the ONNX element type and shape it stands for
/// (integers and booleans are carried as exact floats; a rank-0 value is a `[1]` tensor).
#[derive(Clone)]
pub(crate) struct Dv {
    pub t: T,
    pub dt: DType,
    pub shape: Vec<usize>,
}

// Device values are the common case (every op's output): kept inline rather than boxed per op.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub(crate) enum Val {
    Host(Arc<HostVal>),
    Dev(Dv),
    Q(Arc<QWeight>),
}

impl Val {
    pub fn host(t: Tensor) -> Val {
        Val::Host(Arc::new(HostVal { t, up: OnceLock::new() }))
    }
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Val::Host(h) => h.t.shape().to_vec(),
            Val::Dev(d) => d.shape.clone(),
            Val::Q(q) => q.shape.clone(),
        }
    }
    pub fn dtype(&self) -> DType {
        match self {
            Val::Host(h) => h.t.dtype(),
            Val::Dev(d) => d.dt,
            Val::Q(_) => DType::F32,
        }
    }
    pub fn as_host(&self) -> Option<&Tensor> {
        match self {
            Val::Host(h) => Some(&h.t),
            _ => None,
        }
    }
}

/// Device context handed to the ops.
pub(crate) struct Ctx<'a> {
    pub device: &'a <B as burn_backend::BackendTypes>::Device,
    pub prec: Precision,
    pub opset: i64,
}

impl Ctx<'_> {
    pub fn float_dtype(&self) -> FloatDType {
        match self.prec {
            Precision::F32 => FloatDType::F32,
            Precision::F16 => FloatDType::F16,
        }
    }

    /// Uploads host values as compute-precision floats.
    pub fn upload(&self, t: &Tensor) -> T {
        let shape = if t.shape().is_empty() { vec![1] } else { t.shape().to_vec() };
        let up = B::float_from_data(BData::new(t.to_f32_vec(), shape), self.device);
        match self.prec {
            Precision::F32 => up,
            Precision::F16 => B::float_cast(up, FloatDType::F16),
        }
    }

    /// The value as a device tensor (host values uploaded once, int8 weights dequantized).
    pub fn dev(&self, v: &Val) -> Dv {
        match v {
            Val::Dev(d) => d.clone(),
            Val::Host(h) => {
                let t = h.up.get_or_init(|| self.upload(&h.t)).clone();
                Dv { t, dt: h.t.dtype(), shape: h.t.shape().to_vec() }
            }
            Val::Q(q) => {
                let deq = B::dequantize(q.q.clone(), self.float_dtype());
                let deq = B::float_slice(deq, &[burn_backend::Slice::new(0, Some(q.len as isize), 1)]);
                let w = B::float_mul(B::float_reshape(deq, q.shape.clone().into()), q.scale.clone());
                Dv { t: w, dt: DType::F32, shape: q.shape.clone() }
            }
        }
    }

    pub fn read(&self, d: Dv) -> Result<Tensor> {
        let data = burn_backend::read_sync(B::float_into_data(d.t)).map_err(gpu_err)?;
        let v: Vec<f32> = data.convert::<f32>().try_into_vec::<f32>().map_err(|e| gpu_err(format!("{e:?}")))?;
        let t = Tensor::from_f32(d.shape.clone(), v)?;
        Ok(if d.dt == DType::F32 { t } else { round_to(t, d.dt) })
    }
}

/// A float tensor carrying integers/booleans converted to its ONNX type (rounding, not truncating, the
/// float error away).
fn round_to(t: Tensor, dt: DType) -> Tensor {
    match dt {
        DType::F32 | DType::F16 | DType::F64 => t.cast(dt),
        _ => {
            let shape = t.shape().to_vec();
            let v: Vec<f32> = t.to_f32_vec().into_iter().map(f32::round).collect();
            Tensor::from_f32(shape, v).map(|t| t.cast(dt)).unwrap_or_else(|_| unreachable!("same shape"))
        }
    }
}

struct Plan {
    /// Values known before any step runs (initializers, folded constants, shapes).
    consts: Vec<(usize, Val)>,
    /// Device steps: node indices in execution order.
    steps: Vec<usize>,
    /// Slots whose last reader is step `i` (freed after it).
    frees: Vec<Vec<usize>>,
    /// The steps compiled to fused kernels with a memory plan (see `fused`), when they all could be.
    fused: Option<fused::Program>,
    /// The ONNX type of each output.
    out_dtypes: Vec<DType>,
}

pub struct GpuBackend {
    nodes: Vec<NodeProto>,
    node_ins: Vec<Vec<Option<usize>>>,
    node_outs: Vec<Vec<Option<usize>>>,
    slots: HashMap<String, usize>,
    init: Vec<(usize, Val)>,
    inputs: Vec<(usize, DType)>,
    /// Per graph input: a parameter of some node (scales, sizes, pads, axes...) or a value one is computed from;
    /// kept on the host when small.
    params: Vec<bool>,
    outputs: Vec<usize>,
    /// Opset imports and IR version for the one-node models folded on the host.
    fold_template: Model,
    /// Loads those one-node models on the host's CPU backend (given by the caller: no backend calls the session).
    host: HostLoader,
    opset: i64,
    prec: Precision,
    gpu: &'static GpuDevice,
    plans: Mutex<HashMap<PlanKey, Arc<Plan>>>,
    /// The model has QDQ weights (kept int8 on the device).
    int8_weights: bool,
    /// When QDQ patterns were rewritten to integer arithmetic (`lower_qdq_integer_with`): the model as written,
    /// for requests of intermediate values the rewrite removed (a Conv's float output...).
    unlowered: Option<Model>,
    fallback: OnceLock<std::result::Result<Box<GpuBackend>, String>>,
    weight_bytes: Mutex<(usize, usize)>,
    /// What the last run did on the device (fused plans only).
    counters: Mutex<Option<edgepack_backend::RunCounters>>,
    /// The tiles of the last fused program compiled.
    tuning: Mutex<Vec<fused::Tuned>>,
}

const MAX_PLANS: usize = 8;

type PlanKey = (Vec<Vec<usize>>, Vec<Option<Vec<u8>>>);

/// Graph inputs fed to a parameter position ([`ops::param_input`]) stay on the host when this small: the plan is
/// specialised on their values. Larger ones go to the device, where an op that needs them known fails.
const HOST_INPUT_MAX: usize = 64;

/// f32 unless `EDGEPACK_GPU_PRECISION=f16` asks for f16 on an adapter with shader-f16 (fused programs then store
/// activations as f16; see the crate documentation for INT8 models).
fn precision_for(f16: bool) -> Precision {
    match std::env::var("EDGEPACK_GPU_PRECISION").as_deref() {
        Ok("f16") if f16 => Precision::F16,
        _ => Precision::F32,
    }
}

impl GpuBackend {
    /// Loads a checked model for the GPU; an op the backend does not implement is
    /// [`Error::UnsupportedOp`] naming it, no adapter is [`Error::Backend`].
    pub fn load(model: &Model, host: HostLoader) -> Result<GpuBackend> {
        let f16 = device().is_ok_and(|d| d.info.shader_f16);
        Self::load_with_precision(model, precision_for(f16), host)
    }

    /// Like [`GpuBackend::load`] with the compute precision chosen by the caller.
    pub fn load_with_precision(model: &Model, prec: Precision, host: HostLoader) -> Result<GpuBackend> {
        if let Some((op, domain, node)) = super::unsupported_op(model) {
            return Err(Error::UnsupportedOp { op, domain, node, backend: "gpu" });
        }
        let gpu = device().map_err(|e| Error::Backend { backend: "gpu", message: e })?;
        if prec == Precision::F16 && !gpu.info.shader_f16 {
            return Err(gpu_err(format!("{} has no shader-f16", gpu.info.short())));
        }
        Self::load_with(model, gpu, prec, true, host)
    }

    /// QDQ patterns are rewritten to the integer arithmetic the CPU backend and onnxruntime's fused
    /// kernels compute (`round(f32(Σ (x−z_x)·w + b) · m) + z_y`, QLinearAdd's scaled sums): integer-valued
    /// floats are exact in f32, so each requantization rounds as theirs does instead of flipping a few values
    /// per layer that then spread through the network. Weights stay int8 (`DequantizeLinear(w, 1)`). At f16 too:
    /// the rewritten graph's step-by-step path runs in f32 ([`GpuBackend::ctx`]) and its fused programs store only
    /// the quantized activations as f16.
    fn load_with(
        model: &Model,
        gpu: &'static GpuDevice,
        prec: Precision,
        lower: bool,
        host: HostLoader,
    ) -> Result<GpuBackend> {
        let mut m = model.clone();
        edgepack_onnx::run_passes(&mut m, edgepack_onnx::pass::DEVICE_PREPARE)?;
        m.graph.topo_sort()?;
        let mut unlowered = None;
        if lower && super::has_int8_weights(&m) {
            let written = m.clone();
            if m.graph.lower_qdq_integer_with(edgepack_lower::LowerFor::F32Device) > 0 {
                unlowered = Some(written);
            }
        }
        let mut slots: HashMap<String, usize> = HashMap::new();
        let mut slot = |name: &str| -> Option<usize> {
            if name.is_empty() {
                return None;
            }
            let n = slots.len();
            Some(*slots.entry(name.to_string()).or_insert(n))
        };
        let mut init = Vec::new();
        for t in &m.graph.initializers {
            let s = slot(t.name.as_deref().unwrap_or("")).ok_or_else(|| gpu_err("unnamed initializer"))?;
            init.push((s, Val::host(tensor_from_proto(t)?)));
        }
        let inputs: Vec<(usize, DType)> = m
            .graph
            .runtime_inputs()
            .into_iter()
            .map(|v| {
                let name = v.name.clone().unwrap_or_default();
                let dt = edgepack_onnx::value_info_to_type(v).and_then(|t| t.dtype()).unwrap_or(DType::F32);
                (slot(&name).unwrap_or(usize::MAX), dt)
            })
            .collect();
        let node_ins: Vec<Vec<Option<usize>>> =
            m.graph.nodes.iter().map(|n| n.input.iter().map(|i| slot(i)).collect()).collect();
        let node_outs: Vec<Vec<Option<usize>>> =
            m.graph.nodes.iter().map(|n| n.output.iter().map(|o| slot(o)).collect()).collect();
        // Values read as parameters, and (backwards, nodes being in topological order) every value they are
        // computed from, up to Shape/Size whose outputs are known on the host anyway: a graph input among them
        // (a sequence length added to before a Slice, say) is kept on the host.
        let mut wanted: HashSet<usize> = HashSet::new();
        for (n, ins) in m.graph.nodes.iter().zip(&node_ins) {
            for (i, x) in ins.iter().enumerate() {
                if let Some(x) = x
                    && ops::param_input(n.op(), i)
                {
                    wanted.insert(*x);
                }
            }
        }
        for (ni, n) in m.graph.nodes.iter().enumerate().rev() {
            let needed = node_outs[ni].iter().flatten().any(|s| wanted.contains(s));
            if needed && !matches!(n.op(), "Shape" | "Size") {
                wanted.extend(node_ins[ni].iter().flatten());
            }
        }
        let params = inputs.iter().map(|(s, _)| wanted.contains(s)).collect();
        let outputs = m
            .graph
            .outputs
            .iter()
            .map(|o| slot(o.name.as_deref().unwrap_or("")).ok_or_else(|| gpu_err("unnamed output")))
            .collect::<Result<_>>()?;
        let opset = m.opset("").unwrap_or(1);
        let int8_weights = super::has_int8_weights(&m);
        let mut fold_template = m.clone();
        fold_template.graph.nodes.clear();
        fold_template.graph.initializers.clear();
        fold_template.graph.inputs.clear();
        fold_template.graph.outputs.clear();
        fold_template.graph.value_info.clear();
        Ok(GpuBackend {
            nodes: m.graph.nodes,
            node_ins,
            node_outs,
            slots,
            init,
            inputs,
            params,
            outputs,
            fold_template,
            host,
            opset,
            prec,
            gpu,
            plans: Mutex::new(HashMap::new()),
            int8_weights,
            unlowered,
            fallback: OnceLock::new(),
            weight_bytes: Mutex::new((0, 0)),
            counters: Mutex::new(None),
            tuning: Mutex::new(Vec::new()),
        })
    }

    pub fn precision(&self) -> Precision {
        self.prec
    }

    pub fn adapter(&self) -> &super::AdapterInfo {
        &self.gpu.info
    }

    /// How the kernels with variants (pointwise convolutions' tiles) of the last fused program got theirs: timed
    /// at load, read from the cache of an earlier load's timings, or the default.
    pub fn tuning(&self) -> Vec<fused::Tuned> {
        self.tuning.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// (bytes of weights resident on the device as floats, bytes resident as int8), after the first plan.
    pub fn weight_bytes(&self) -> (usize, usize) {
        self.weight_bytes.lock().map(|g| *g).unwrap_or_default()
    }

    /// The step-by-step path's context. A graph rewritten to integer arithmetic runs it in f32 whatever the
    /// precision (integer-valued floats are exact only there); at f16 only its fused programs store in f16.
    fn ctx(&self) -> Ctx<'_> {
        let prec = if self.unlowered.is_some() { Precision::F32 } else { self.prec };
        Ctx { device: &self.gpu.device, prec, opset: self.opset }
    }

    /// Folds one node whose inputs are all known on the host, on the CPU backend.
    fn fold(&self, node: &NodeProto, ins: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
        let mut m = self.fold_template.clone();
        let mut n = node.clone();
        for (i, t) in ins.iter().enumerate() {
            if let Some(t) = t {
                let name = format!("in{i}");
                m.graph.initializers.push(tensor_to_proto(&name, t));
                n.input[i] = name;
            }
        }
        let outs: Vec<String> = n.output.iter().filter(|o| !o.is_empty()).cloned().collect();
        m.graph.outputs = outs
            .iter()
            .map(|o| edgepack_onnx::ValueInfoProto { name: Some(o.clone()), ..Default::default() })
            .collect();
        m.graph.nodes.push(n);
        let cpu = (self.host)(&m)
            .map_err(|e| gpu_err(format!("folding {} `{}` on the host: {e}", node.op(), node.name())))?;
        cpu.run(Vec::new())
    }

    fn host_inputs(&self, node: &NodeProto, ins: &[Option<Val>]) -> Result<Vec<Option<Tensor>>> {
        ins.iter()
            .map(|v| match v {
                None => Ok(None),
                Some(Val::Host(h)) => Ok(Some(h.t.clone())),
                Some(Val::Q(q)) => Ok(self.fold(&q.node, &q.host_inputs)?.into_iter().next()),
                Some(Val::Dev(_)) => Err(gpu_err(format!("{} `{}`: device input on the host", node.op(), node.name()))),
            })
            .collect()
    }

    /// A DequantizeLinear of an int8 (or zero-point-centred uint8) initializer: kept int8 on the device.
    fn quant_weight(&self, node: &NodeProto, ins: &[Option<Val>]) -> Option<QWeight> {
        if node.op() != "DequantizeLinear" {
            return None;
        }
        let x = ins.first()?.as_ref()?.as_host()?;
        let scale = ins.get(1)?.as_ref()?.as_host()?;
        let zp = ins.get(2).and_then(|z| z.as_ref()).map(|z| z.as_host().cloned());
        let zp: Vec<i32> = match zp {
            None => vec![0],
            Some(Some(z)) if matches!(z.dtype(), DType::I8 | DType::U8) => {
                z.to_f32_vec().into_iter().map(|v| v as i32).collect()
            }
            _ => return None,
        };
        if x.shape().is_empty() || x.len() < 16 {
            return None;
        }
        let axis = node.attr_i("axis").unwrap_or(1);
        let rank = x.shape().len() as i64;
        let axis = if axis < 0 { axis + rank } else { axis };
        if !(0..rank).contains(&axis) {
            return None;
        }
        let axis = axis as usize;
        let per = scale.len();
        if per != 1 && (scale.shape().len() != 1 || per != x.shape()[axis]) || zp.len() != 1 && zp.len() != per {
            return None;
        }
        // Values minus their zero point, as int8 (the channel index of element i is (i / inner) % dim).
        let inner: usize = x.shape()[axis + 1..].iter().product::<usize>().max(1);
        let dim = x.shape()[axis];
        let raw: Vec<i32> = match x.data() {
            TensorData::I8(v) => v.iter().map(|&b| b as i32).collect(),
            TensorData::U8(v) => v.iter().map(|&b| b as i32).collect(),
            _ => return None,
        };
        let mut q: Vec<i8> = Vec::with_capacity(raw.len().div_ceil(4) * 4);
        for (i, &v) in raw.iter().enumerate() {
            let z = if zp.len() == 1 { zp[0] } else { zp[(i / inner) % dim] };
            q.push(i8::try_from(v - z).ok()?);
        }
        let len = q.len();
        q.resize(len.div_ceil(4) * 4, 0);
        let scheme = QuantScheme::default()
            .with_value(QuantValue::Q8S)
            .with_store(QuantStore::PackedU32(0))
            .per_tensor(ScaleDtype::F32);
        let n = q.len();
        let data = BData::quantized(q, [n], scheme, &[1.0], None);
        let ctx = self.ctx();
        let qt = B::q_from_data(data, ctx.device);
        let mut sshape = vec![1usize; x.shape().len()];
        if per != 1 {
            sshape[axis] = per;
        }
        let st = Tensor::from_f32(sshape, scale.to_f32_vec()).ok()?;
        let host_inputs = ins.iter().map(|v| v.as_ref().and_then(|v| v.as_host().cloned())).collect();
        if let Ok(mut g) = self.weight_bytes.lock() {
            g.1 += n;
        }
        Some(QWeight { q: qt, len, shape: x.shape().to_vec(), scale: ctx.upload(&st), node: node.clone(), host_inputs })
    }

    fn host_kept(&self, i: usize, t: &Tensor) -> bool {
        self.params.get(i).copied().unwrap_or(false) && t.len() <= HOST_INPUT_MAX
    }

    fn zeros(&self, shape: &[usize], dt: DType) -> Dv {
        let ctx = self.ctx();
        let n: usize = shape.iter().product();
        let t = ctx.upload(&Tensor::from_f32(shape.to_vec(), vec![0.0; n]).unwrap_or_else(|_| unreachable!()));
        Dv { t, dt, shape: shape.to_vec() }
    }

    fn build_plan(&self, shapes: &[Vec<usize>], host_inputs: &[Option<Tensor>]) -> Result<Plan> {
        let ctx = self.ctx();
        let mut env: Vec<Option<Val>> = vec![None; self.slots.len()];
        for (s, v) in &self.init {
            env[*s] = Some(v.clone());
        }
        for (((s, dt), shape), host) in self.inputs.iter().zip(shapes).zip(host_inputs) {
            env[*s] = Some(match host {
                Some(t) => Val::host(t.clone()),
                None => Val::Dev(self.zeros(shape, *dt)),
            });
        }
        let mut consts = Vec::new();
        let mut steps = Vec::new();
        for (ni, node) in self.nodes.iter().enumerate() {
            let ins: Vec<Option<Val>> = self.node_ins[ni]
                .iter()
                .map(|s| match s {
                    None => Ok(None),
                    Some(s) => env[*s]
                        .clone()
                        .map(Some)
                        .ok_or_else(|| gpu_err(format!("{} `{}`: an input is not computed", node.op(), node.name()))),
                })
                .collect::<Result<_>>()?;
            let on_host = ins.iter().all(|v| !matches!(v, Some(Val::Dev(_))));
            let (outs, device_step) = if let Some(q) = self.quant_weight(node, &ins) {
                (vec![Val::Q(Arc::new(q))], false)
            } else if on_host && !matches!(node.op(), "RandomNormal" | "RandomUniform") {
                let host = self.host_inputs(node, &ins)?;
                (self.fold(node, &host)?.into_iter().map(Val::host).collect(), false)
            } else if let Some(outs) = ops::host_result(node, &ins) {
                (outs, false)
            } else {
                (ops::exec(&ctx, node, &ins)?, true)
            };
            if device_step {
                steps.push(ni);
            }
            for (slot, v) in self.node_outs[ni].iter().zip(outs) {
                if let Some(s) = slot {
                    if !device_step {
                        consts.push((*s, v.clone()));
                    }
                    env[*s] = Some(v);
                }
            }
        }
        // Wait for the warm-up run, so that load time includes the shader compilations.
        for &s in &self.outputs {
            if let Some(Val::Dev(d)) = &env[s] {
                ctx.read(d.clone())?;
            }
        }
        let mut bytes = 0usize;
        for (_, v) in self.init.iter().chain(&consts) {
            if let Val::Host(h) = v
                && h.up.get().is_some()
            {
                bytes += h.t.len() * if self.ctx().prec == Precision::F16 { 2 } else { 4 };
            }
        }
        if let Ok(mut g) = self.weight_bytes.lock() {
            g.0 = bytes;
        }
        // Last reader of each slot among the steps; outputs are never freed.
        let mut last: HashMap<usize, usize> = HashMap::new();
        for (i, &ni) in steps.iter().enumerate() {
            for s in self.node_ins[ni].iter().flatten() {
                last.insert(*s, i);
            }
        }
        let mut frees = vec![Vec::new(); steps.len()];
        for (s, i) in last {
            if !self.outputs.contains(&s) {
                frees[i].push(s);
            }
        }
        let fused = match self.compile_fused(&steps, &env, host_inputs) {
            Ok(p) => {
                // What a run uses: the program's constants (int8 weights packed four per word).
                if let Ok(mut g) = self.weight_bytes.lock() {
                    *g = p.const_bytes;
                }
                if let Ok(mut g) = self.tuning.lock() {
                    *g = p.tuned.clone();
                }
                Some(p)
            }
            Err(why) => {
                if std::env::var_os("EDGEPACK_GPU_DUMP").is_some() {
                    eprintln!("// not fused: {why}");
                }
                None
            }
        };
        let out_dtypes = self.outputs.iter().map(|&s| env[s].as_ref().map_or(DType::F32, Val::dtype)).collect();
        Ok(Plan { consts, steps, frees, fused, out_dtypes })
    }

    /// The plan's steps as one fused program (activations stored as f16 at f16 precision, arithmetic f32;
    /// `EDGEPACK_GPU_FUSED=0` turns it off), or why not.
    fn compile_fused(
        &self,
        steps: &[usize],
        env: &[Option<Val>],
        host_inputs: &[Option<Tensor>],
    ) -> std::result::Result<fused::Program, String> {
        if std::env::var("EDGEPACK_GPU_FUSED").is_ok_and(|v| v == "0" || v == "off") {
            return Err("turned off by EDGEPACK_GPU_FUSED=0".into());
        }
        let mut shapes = HashMap::new();
        let mut dtypes = HashMap::new();
        let mut dev_slot = |s: usize| -> std::result::Result<(), String> {
            match &env[s] {
                Some(Val::Dev(d)) => {
                    shapes.insert(s, d.shape.clone());
                    dtypes.insert(s, d.dt);
                    Ok(())
                }
                _ => Err("a value neither on the host nor on the device".into()),
            }
        };
        let host = |v: &Val| -> std::result::Result<Tensor, String> {
            match v {
                Val::Host(h) => Ok(h.t.clone()),
                Val::Q(q) => match q.host_info() {
                    // Dequantized here (integers × scales), not folded through a one-node model per weight.
                    Some(info) => {
                        let shape = q.shape.clone();
                        let inner: usize = shape[info.axis + 1..].iter().product::<usize>().max(1);
                        let dim = shape[info.axis];
                        let v = info
                            .ints
                            .iter()
                            .enumerate()
                            .map(|(i, x)| {
                                x * if info.scale.len() == 1 { info.scale[0] } else { info.scale[(i / inner) % dim] }
                            })
                            .collect();
                        Tensor::from_f32(shape, v).map_err(|e| e.to_string())
                    }
                    None => self
                        .fold(&q.node, &q.host_inputs)
                        .map_err(|e| e.to_string())?
                        .into_iter()
                        .next()
                        .ok_or_else(|| "an empty fold".to_string()),
                },
                Val::Dev(_) => Err("device value".into()),
            }
        };
        // Values something reads (a Dropout's unread mask may be of any type).
        let used: HashSet<usize> = steps
            .iter()
            .flat_map(|&ni| self.node_ins[ni].iter().flatten().copied())
            .chain(self.outputs.iter().copied())
            .collect();
        let mut fsteps = Vec::with_capacity(steps.len());
        let mut qweights = HashMap::new();
        for (si, &ni) in steps.iter().enumerate() {
            for (i, s) in self.node_ins[ni].iter().enumerate() {
                if let Some(Some(Val::Q(q))) = s.map(|s| &env[s])
                    && let Some(info) = q.host_info()
                {
                    qweights.insert((si, i), info);
                }
            }
            let mut ins = Vec::new();
            for s in &self.node_ins[ni] {
                ins.push(match s.and_then(|s| env[s].as_ref().map(|v| (s, v))) {
                    None => None,
                    Some((s, Val::Dev(_))) => {
                        dev_slot(s)?;
                        Some(fused::In::Dev(s))
                    }
                    Some((_, v)) => Some(fused::In::Host(host(v)?)),
                });
            }
            for s in self.node_outs[ni].iter().flatten() {
                if matches!(env[*s], Some(Val::Dev(_))) && used.contains(s) {
                    dev_slot(*s)?;
                }
            }
            fsteps.push(fused::Step { node: &self.nodes[ni], ins, outs: self.node_outs[ni].clone() });
        }
        let mut inputs = Vec::new();
        for ((s, _), h) in self.inputs.iter().zip(host_inputs) {
            inputs.push(if h.is_some() {
                None
            } else {
                dev_slot(*s)?;
                Some(*s)
            });
        }
        let mut outputs = Vec::new();
        for &s in &self.outputs {
            outputs.push(match &env[s] {
                Some(Val::Dev(_)) => {
                    dev_slot(s)?;
                    fused::Out::Dev(s)
                }
                Some(v) => fused::Out::Host(host(v)?),
                None => return Err("an output never computed".into()),
            });
        }
        // At f16, f16 buffers: for every float value, or, in a graph rewritten to integer arithmetic, only for
        // the values f16 holds exactly (its quantized activations), so that its results stay the f32 ones.
        let half = match (self.prec, self.unlowered.is_some()) {
            (Precision::F32, _) => fused::Half::Off,
            (Precision::F16, true) => fused::Half::Exact,
            (Precision::F16, false) => fused::Half::Floats,
        };
        let graph = fused::Graph { steps: fsteps, shapes, dtypes, qweights, inputs, outputs, opset: self.opset, half };
        // A defect in the compiler must not cost the model its GPU: it falls back to the step-by-step path.
        let program = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fused::compile(&graph, self.gpu)))
            .map_err(|_| "the fused compiler panicked".to_string())??;
        // Warm-up: the first run of the program (pipelines are compiled already; this faults the buffers in).
        let zeros: Vec<Option<Tensor>> = self
            .inputs
            .iter()
            .zip(host_inputs)
            .map(|((s, _), h)| match (h, &env[*s]) {
                (None, Some(Val::Dev(d))) => {
                    Tensor::from_f32(d.shape.clone(), vec![0.0; d.shape.iter().product()]).ok()
                }
                _ => None,
            })
            .collect();
        let refs: Vec<Option<&Tensor>> = zeros.iter().map(|t| t.as_ref()).collect();
        program.run(self.gpu, &refs, None)?;
        Ok(program)
    }

    /// Runs a fused plan when the plan for these inputs has one: `None` otherwise.
    fn run_fused(&self, inputs: &[Tensor], timing: Option<&mut Timeline>) -> Result<Option<Vec<Tensor>>> {
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
        let host: Vec<Option<Tensor>> =
            inputs.iter().enumerate().map(|(i, t)| self.host_kept(i, t).then(|| t.clone())).collect();
        let plan = self.plan(&shapes, &host)?;
        let Some(p) = &plan.fused else {
            if let Ok(mut g) = self.counters.lock() {
                *g = None;
            }
            return Ok(None);
        };
        let refs: Vec<Option<&Tensor>> = inputs.iter().zip(&host).map(|(t, h)| h.is_none().then_some(t)).collect();
        let outs = p.run(self.gpu, &refs, timing).map_err(gpu_err)?;
        // Integer and boolean outputs ride as exact floats: back to their ONNX types.
        let outs = outs
            .into_iter()
            .zip(&plan.out_dtypes)
            .map(|(t, &dt)| if t.dtype() == dt { t } else { round_to(t, dt) })
            .collect();
        if let Ok(mut g) = self.counters.lock() {
            *g = Some(p.last_counters());
        }
        Ok(Some(outs))
    }

    /// What the last run did on the device, when its plan is fused.
    pub fn last_counters(&self) -> Option<edgepack_backend::RunCounters> {
        self.counters.lock().ok().and_then(|g| *g)
    }

    /// The plan for these input shapes and host-kept input values (parameters fed at run time: shapes, axes,
    /// scales, pads; the plan is specialised on them).
    fn plan(&self, shapes: &[Vec<usize>], host_inputs: &[Option<Tensor>]) -> Result<Arc<Plan>> {
        let key: PlanKey = (shapes.to_vec(), host_inputs.iter().map(|t| t.as_ref().map(|t| t.to_le_bytes())).collect());
        if let Some(p) = self.plans.lock().map_err(|_| gpu_err("plan cache poisoned"))?.get(&key) {
            return Ok(p.clone());
        }
        let p = Arc::new(self.build_plan(shapes, host_inputs)?);
        let mut plans = self.plans.lock().map_err(|_| gpu_err("plan cache poisoned"))?;
        if plans.len() >= MAX_PLANS {
            plans.clear();
        }
        plans.insert(key, p.clone());
        Ok(p)
    }

    /// Runs the plan; `keep` lists slots that must survive (requested values).
    fn execute(
        &self,
        inputs: Vec<Tensor>,
        keep: &[usize],
        mut timing: Option<&mut Timeline>,
    ) -> Result<Vec<Option<Val>>> {
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
        let host: Vec<Option<Tensor>> =
            inputs.iter().enumerate().map(|(i, t)| self.host_kept(i, t).then(|| t.clone())).collect();
        let plan = self.plan(&shapes, &host)?;
        let ctx = self.ctx();
        let mut env: Vec<Option<Val>> = vec![None; self.slots.len()];
        for (s, v) in self.init.iter().chain(&plan.consts) {
            env[*s] = Some(v.clone());
        }
        for (i, ((s, dt), t)) in self.inputs.iter().zip(inputs).enumerate() {
            env[*s] = Some(if self.host_kept(i, &t) {
                Val::host(t)
            } else {
                Val::Dev(Dv { t: ctx.upload(&t), dt: *dt, shape: t.shape().to_vec() })
            });
        }
        for (i, &ni) in plan.steps.iter().enumerate() {
            let node = &self.nodes[ni];
            let ins: Vec<Option<Val>> = self.node_ins[ni].iter().map(|s| s.and_then(|s| env[s].clone())).collect();
            let start = std::time::Instant::now();
            let outs = ops::exec(&ctx, node, &ins)?;
            if let Some(t) = timing.as_deref_mut() {
                // Profiling waits for each op so that its time is its own.
                for o in &outs {
                    if let Val::Dev(d) = o {
                        burn_backend::read_sync(B::float_into_data(B::float_slice(
                            B::float_reshape(d.t.clone(), [d.t.shape().num_elements()].into()),
                            &[burn_backend::Slice::new(0, Some(1), 1)],
                        )))
                        .map_err(gpu_err)?;
                    }
                }
                t.record(node.name(), node.op(), start);
            }
            for (slot, v) in self.node_outs[ni].iter().zip(outs) {
                if let Some(s) = slot {
                    env[*s] = Some(v);
                }
            }
            for s in &plan.frees[i] {
                if !keep.contains(s) {
                    env[*s] = None;
                }
            }
        }
        Ok(env)
    }

    /// A value read back to the host.
    fn read(&self, v: Option<&Val>) -> Result<Tensor> {
        match v {
            Some(Val::Host(h)) => Ok(h.t.clone()),
            Some(Val::Dev(d)) => self.ctx().read(d.clone()),
            Some(Val::Q(q)) => Ok(self.fold(&q.node, &q.host_inputs)?.remove(0)),
            None => Err(gpu_err("a requested value was folded away (BatchNorm folded into its Conv)")),
        }
    }
}

impl Backend for GpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Gpu
    }

    fn describe(&self) -> String {
        let weights = match (self.int8_weights, self.unlowered.is_some()) {
            (true, true) => ", int8 weights, integer requantization",
            (true, false) => ", int8 weights",
            _ => "",
        };
        format!("gpu (wgpu {}, {} compute{weights})", self.gpu.info.short(), self.prec)
    }

    fn engine(&self) -> String {
        format!("wgpu {}", self.gpu.info.short())
    }

    fn run_counters(&self) -> Option<edgepack_backend::RunCounters> {
        self.last_counters()
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if let Some(outs) = self.run_fused(&inputs, None)? {
            return Ok(outs);
        }
        let env = self.execute(inputs, &[], None)?;
        self.outputs.iter().map(|&s| self.read(env[s].as_ref())).collect()
    }

    fn run_values(&self, inputs: Vec<Tensor>, values: &[String]) -> Result<Vec<Tensor>> {
        if let Some(m) = &self.unlowered
            && values.iter().any(|v| !self.slots.contains_key(v))
        {
            // A value the integer lowering removed: the graph as written, loaded once on first request.
            let fb = self.fallback.get_or_init(|| {
                Self::load_with(m, self.gpu, self.prec, false, self.host.clone())
                    .map(Box::new)
                    .map_err(|e| e.to_string())
            });
            return match fb {
                Ok(b) => b.run_values(inputs, values),
                Err(e) => Err(gpu_err(format!("loading the unlowered graph: {e}"))),
            };
        }
        let slots: Vec<usize> = values
            .iter()
            .map(|v| self.slots.get(v).copied().ok_or_else(|| Error::UnknownValue { name: v.clone() }))
            .collect::<Result<_>>()?;
        let env = self.execute(inputs, &slots, None)?;
        slots.iter().map(|&s| self.read(env[s].as_ref())).collect()
    }

    fn prepare(&self, shapes: &[Vec<usize>]) -> Result<()> {
        // Host-kept inputs are planned when their values are known (first run).
        if self.params.iter().zip(shapes).any(|(&p, s)| p && s.iter().product::<usize>() <= HOST_INPUT_MAX) {
            return Ok(());
        }
        self.plan(shapes, &vec![None; shapes.len()]).map(|_| ())
    }

    fn trace(&self, inputs: Vec<Tensor>, runs: usize) -> Result<Timeline> {
        let mut timeline = Timeline::new();
        for _ in 0..runs.max(1) {
            if self.run_fused(&inputs, Some(&mut timeline))?.is_some() {
                timeline.end_run();
                continue;
            }
            let env = self.execute(inputs.clone(), &[], Some(&mut timeline))?;
            for &s in &self.outputs {
                self.read(env[s].as_ref())?;
            }
            timeline.end_run();
        }
        Ok(timeline)
    }
}
