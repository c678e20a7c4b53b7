//! CPU backend on tract: the model is parsed once; an optimised plan is built per concrete set of input
//! shapes (at load for static models, on first use otherwise) and cached.
mod ops;
mod optim;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::InferenceFact as Fact;

use edgepack_backend::{Backend, BackendKind, Timeline};
use edgepack_core::tensor::{DType as EDType, Tensor as ETensor, TensorData};
use edgepack_core::{Error, Result};
use edgepack_lower::{LowerForCpu, QdqInteger};
use edgepack_onnx::{Model, NodeExt, NodeProto};

type Plan = Arc<TypedRunnableModel>;

/// A plan is built for concrete input shapes and a set of outputs (empty: the model's own).
type PlanKey = (Vec<Vec<usize>>, Vec<String>);

/// Optimised plans by key, oldest first in `order`.
#[derive(Default)]
struct PlanCache {
    map: HashMap<PlanKey, Plan>,
    order: Vec<PlanKey>,
    /// The optimiser's rewrites and their cap in the plan that came closest to it.
    rewrites: Option<[usize; 2]>,
}

/// Plans kept per model; a new shape beyond this evicts the oldest.
const MAX_PLANS: usize = 8;
pub const TRACT_VERSION: &str = "0.23.9";

/// A graph to run instead of the kernel graph when it lacks a requested value.
struct Fallback {
    bytes: Vec<u8>,
    kept: std::collections::HashSet<String>,
}

fn values_of(m: &Model) -> std::collections::HashSet<String> {
    m.graph
        .nodes
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(m.graph.inputs.iter().filter_map(|i| i.name.clone()))
        .collect()
}

pub struct CpuBackend {
    model: InferenceModel,
    /// The values the kernel graph computes under their own names; runs asking for other intermediate values
    /// (calibration, per-layer error) use a fallback, built and parsed on first use: the float-op integer
    /// lowering for QDQ models (same arithmetic, NCHW names kept), then the graph as written.
    kept: std::collections::HashSet<String>,
    /// The model as given, when the kernel graph differs from it; the fallbacks are built from it on first use.
    original: Option<Model>,
    integer_only: bool,
    fallbacks: std::sync::OnceLock<Vec<Fallback>>,
    input_dtypes: Vec<DatumType>,
    threads: usize,
    options: RunOptions,
    plans: Mutex<PlanCache>,
}

fn backend_err(e: impl std::fmt::Display) -> Error {
    Error::Backend { backend: "cpu", message: e.to_string() }
}

/// tract's error chain on one line ("Translating ... : caused by ...").
fn tract_err(e: TractError) -> Error {
    backend_err(format!("{e:#}").replace('\n', " "))
}

fn to_datum(dt: EDType) -> DatumType {
    match dt {
        EDType::F32 => f32::datum_type(),
        EDType::F16 => f16::datum_type(),
        EDType::F64 => f64::datum_type(),
        EDType::I64 => i64::datum_type(),
        EDType::I32 => i32::datum_type(),
        EDType::I16 => i16::datum_type(),
        EDType::U64 => u64::datum_type(),
        EDType::U32 => u32::datum_type(),
        EDType::U16 => u16::datum_type(),
        EDType::I8 => i8::datum_type(),
        EDType::U8 => u8::datum_type(),
        EDType::Bool => bool::datum_type(),
    }
}

/// First node (searching subgraphs too) whose op tract does not implement.
fn find_unsupported(nodes: &[NodeProto], known: &HashMap<String, impl Sized>) -> Option<(String, String, String)> {
    for n in nodes {
        if !known.contains_key(n.op()) {
            return Some((n.op().to_string(), n.domain_name().to_string(), n.name().to_string()));
        }
        for a in &n.attribute {
            for g in a.g.iter().chain(&a.graphs) {
                if let Some(u) = find_unsupported(&g.node, known) {
                    return Some(u);
                }
            }
        }
    }
    None
}

impl CpuBackend {
    /// Parses a checked model. `input_dtypes` are the declared input types (for concrete input facts).
    pub fn load(model: &Model, input_dtypes: &[EDType], threads: usize) -> Result<CpuBackend> {
        // Kernel nodes run inside tract's plans: outside a granted run they split work over tract's pool.
        edgepack_kernels::set_ambient_threads(tract_pool_threads);
        let mut onnx = tract_onnx::onnx();
        // Against tract's own ops: kernel nodes are edgepack's lowering, never a model's own.
        if let Some((op, domain, node)) = find_unsupported(&model.graph.nodes, &onnx.op_register.0) {
            return Err(Error::UnsupportedOp { op, domain, node, backend: "cpu" });
        }
        crate::ops::register(&mut onnx.op_register);
        // `EDGEPACK_KERNELS=off` keeps everything on the float-op form.
        let kernels = std::env::var("EDGEPACK_KERNELS").map_or(true, |v| v != "off");
        let lowering = model.lower_for_cpu(kernels);
        // Fallbacks (built on first use, `fallbacks()`): the float-op integer lowering when kernels were made,
        // then the graph as written.
        let original = lowering.changed().then(|| model.clone());
        let (lowered, n_kernels) = (lowering.model, lowering.integer_kernels);
        if original.is_some()
            && let Ok(path) = std::env::var("EDGEPACK_DUMP_LOWERED")
        {
            // Debugging aid: the graph tract is about to run.
            let _ = std::fs::write(path, lowered.to_bytes());
        }
        let kept = values_of(&lowered);
        let bytes = lowered.to_bytes();
        let inference = onnx.model_for_read(&mut &bytes[..]).map_err(tract_err)?;
        let threads = threads.max(1);
        let executor = if threads == 1 {
            tract_linalg::multithread::Executor::SingleThread
        } else {
            tract_linalg::multithread::Executor::multithread_with_name(threads, "edgepack-cpu")
        };
        let options = RunOptions { executor: Some(executor), ..Default::default() };
        Ok(CpuBackend {
            model: inference,
            kept,
            original,
            integer_only: n_kernels > 0,
            fallbacks: std::sync::OnceLock::new(),
            input_dtypes: input_dtypes.iter().map(|&d| to_datum(d)).collect(),
            threads,
            options,
            plans: Mutex::new(PlanCache::default()),
        })
    }

    /// The rewrites tract's optimiser applied, and the most it was allowed, in the plan built so far that came
    /// closest to that cap (`None` before the first plan).
    pub fn optimiser_rewrites(&self) -> Option<[usize; 2]> {
        self.plans.lock().ok()?.rewrites
    }

    /// The graphs to run when a request asks for values the kernel graph does not compute under their names.
    fn fallbacks(&self) -> &[Fallback] {
        self.fallbacks.get_or_init(|| {
            let Some(model) = &self.original else { return Vec::new() };
            let mut out = Vec::new();
            if self.integer_only {
                let mut int_only = model.clone();
                int_only.graph.lower_qdq_integer();
                out.push(Fallback { kept: values_of(&int_only), bytes: int_only.to_bytes() });
            }
            out.push(Fallback { kept: values_of(model), bytes: model.to_bytes() });
            out
        })
    }

    fn plan(&self, shapes: &[Vec<usize>], outputs: &[String]) -> Result<Plan> {
        let key: PlanKey = (shapes.to_vec(), outputs.to_vec());
        if let Some(p) = self.plans.lock().map_err(|_| backend_err("plan cache poisoned"))?.map.get(&key) {
            return Ok(p.clone());
        }
        let parse = |f: &Fallback| crate::ops::onnx().model_for_read(&mut &f.bytes[..]).map_err(tract_err);
        let (plan, rewrites) = if outputs.iter().all(|o| self.kept.contains(o)) {
            match self.build(self.model.clone(), shapes, outputs) {
                Ok(built) => built,
                // A kernel refusing a shape the graph accepts (an input smaller than a pooling window, an Add that
                // broadcasts a 1-pixel upsampling at a degenerate input size): the fallbacks in order, the graph as
                // written last; its error when none plans.
                Err(e) => {
                    let mut last = Err(e);
                    for f in self.fallbacks() {
                        last = parse(f).and_then(|m| self.build(m, shapes, outputs));
                        if last.is_ok() {
                            break;
                        }
                    }
                    last?
                }
            }
        } else {
            // The first fallback computing every requested value (the graph as written computes them all).
            let fallbacks = self.fallbacks();
            let m = match fallbacks.iter().find(|f| outputs.iter().all(|o| f.kept.contains(o))).or(fallbacks.last()) {
                Some(f) => parse(f)?,
                None => self.model.clone(),
            };
            self.build(m, shapes, outputs)?
        };
        let mut cache = self.plans.lock().map_err(|_| backend_err("plan cache poisoned"))?;
        if cache.rewrites.is_none_or(|[u, c]| rewrites[0] * c > u * rewrites[1]) {
            cache.rewrites = Some(rewrites);
        }
        if cache.map.len() >= MAX_PLANS {
            let oldest = cache.order.remove(0);
            cache.map.remove(&oldest);
        }
        cache.map.insert(key.clone(), plan.clone());
        cache.order.push(key);
        Ok(plan)
    }

    /// `m` planned at `shapes` for `outputs` (all its outputs when empty), and the optimiser's rewrites.
    fn build(&self, mut m: InferenceModel, shapes: &[Vec<usize>], outputs: &[String]) -> Result<(Plan, [usize; 2])> {
        for (i, (shape, dt)) in shapes.iter().zip(&self.input_dtypes).enumerate() {
            m = m.with_input_fact(i, Fact::dt_shape(*dt, shape.clone())).map_err(tract_err)?;
        }
        if !outputs.is_empty() {
            m = m.with_outputs_by_name(outputs).map_err(tract_err)?;
        }
        let (typed, rewrites) = optim::optimized(m).map_err(tract_err)?;
        Ok((typed.into_runnable_with_options(&self.options).map_err(tract_err)?, rewrites))
    }

    fn execute(&self, inputs: Vec<ETensor>, outputs: &[String]) -> Result<Vec<ETensor>> {
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
        let plan = self.plan(&shapes, outputs)?;
        let values: TVec<TValue> =
            inputs.into_iter().map(|t| to_tract(t).map(|t| t.into_tvalue())).collect::<Result<_>>()?;
        let outs = plan.run(values).map_err(tract_err)?;
        outs.iter().map(|o| from_tract(o)).collect()
    }
}

fn to_tract(t: ETensor) -> Result<Tensor> {
    let shape = t.shape().to_vec();
    let r = match t.into_data() {
        TensorData::F32(v) => Tensor::from_shape(&shape, &v),
        TensorData::F16(v) => Tensor::from_shape(&shape, &v),
        TensorData::F64(v) => Tensor::from_shape(&shape, &v),
        TensorData::I64(v) => Tensor::from_shape(&shape, &v),
        TensorData::I32(v) => Tensor::from_shape(&shape, &v),
        TensorData::I16(v) => Tensor::from_shape(&shape, &v),
        TensorData::U64(v) => Tensor::from_shape(&shape, &v),
        TensorData::U32(v) => Tensor::from_shape(&shape, &v),
        TensorData::U16(v) => Tensor::from_shape(&shape, &v),
        TensorData::I8(v) => Tensor::from_shape(&shape, &v),
        TensorData::U8(v) => Tensor::from_shape(&shape, &v),
        TensorData::Bool(v) => Tensor::from_shape(&shape, &v),
    };
    r.map_err(tract_err)
}

fn from_tract(t: &Tensor) -> Result<ETensor> {
    let shape = t.shape().to_vec();
    macro_rules! take {
        ($ty:ty, $variant:ident) => {
            TensorData::$variant(
                t.try_as_plain_ram().and_then(|v| v.as_slice::<$ty>().map(|s| s.to_vec())).map_err(tract_err)?,
            )
        };
    }
    let dt = t.datum_type();
    let data = if dt == f32::datum_type() {
        take!(f32, F32)
    } else if dt == f16::datum_type() {
        take!(f16, F16)
    } else if dt == f64::datum_type() {
        take!(f64, F64)
    } else if dt == i64::datum_type() {
        take!(i64, I64)
    } else if dt == i32::datum_type() {
        take!(i32, I32)
    } else if dt == i16::datum_type() {
        take!(i16, I16)
    } else if dt == u64::datum_type() {
        take!(u64, U64)
    } else if dt == u32::datum_type() {
        take!(u32, U32)
    } else if dt == u16::datum_type() {
        take!(u16, U16)
    } else if dt == i8::datum_type() {
        take!(i8, I8)
    } else if dt == u8::datum_type() {
        take!(u8, U8)
    } else if dt == bool::datum_type() {
        take!(bool, Bool)
    } else if dt == TDim::datum_type() {
        // A shape computed by tract (a one-node Shape folded on the host, say) is concrete here: i64, as ONNX has it.
        let c = t.cast_to::<i64>().map_err(tract_err)?;
        TensorData::I64(c.try_as_plain_ram().and_then(|v| v.as_slice::<i64>().map(|s| s.to_vec())).map_err(tract_err)?)
    } else if dt.is_float() || dt.is_integer() {
        // Other numeric types (quantized...) are widened to f32.
        {
            let c = t.cast_to::<f32>().map_err(tract_err)?;
            TensorData::F32(
                c.try_as_plain_ram().and_then(|v| v.as_slice::<f32>().map(|s| s.to_vec())).map_err(tract_err)?,
            )
        }
    } else {
        return Err(backend_err(format!("output of type {dt:?} is not supported")));
    };
    ETensor::new(shape, data)
}

impl Backend for CpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }

    fn describe(&self) -> String {
        format!("cpu (tract {TRACT_VERSION}, {} thread{})", self.threads, if self.threads == 1 { "" } else { "s" })
    }

    fn engine(&self) -> String {
        format!("tract {TRACT_VERSION}")
    }

    fn threads(&self) -> Option<usize> {
        Some(self.threads)
    }

    fn extra_values(&self) -> Vec<String> {
        let nhwc = edgepack_lower::qdq_kernels::NHWC;
        self.kept.iter().filter(|v| v.ends_with(nhwc)).cloned().collect()
    }

    fn prepare(&self, shapes: &[Vec<usize>]) -> Result<()> {
        self.plan(shapes, &[]).map(|_| ())
    }

    fn trace(&self, inputs: Vec<ETensor>, runs: usize) -> Result<Timeline> {
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
        let plan = self.plan(&shapes, &[])?;
        let values: TVec<TValue> =
            inputs.into_iter().map(|t| to_tract(t).map(|t| t.into_tvalue())).collect::<Result<_>>()?;
        let mut timeline = Timeline::new();
        let executor = self.options.executor.clone().unwrap_or_default();
        for _ in 0..runs.max(1) {
            let mut state = plan.spawn().map_err(tract_err)?;
            tract_linalg::multithread::multithread_tract_scope(executor.clone(), || {
                state.run_plan_with_eval(values.clone(), |ctx, op_state, node, ins| {
                    let t = std::time::Instant::now();
                    let r = tract_onnx::tract_core::plan::eval(ctx, op_state, node, ins);
                    timeline.record(&node.name, node.op().name().as_ref(), t);
                    r
                })
            })
            .map_err(tract_err)?;
            timeline.end_run();
        }
        Ok(timeline)
    }

    fn run(&self, inputs: Vec<ETensor>) -> Result<Vec<ETensor>> {
        self.execute(inputs, &[])
    }

    fn run_values(&self, inputs: Vec<ETensor>, values: &[String]) -> Result<Vec<ETensor>> {
        self.execute(inputs, values)
    }
}

/// Threads of the tract executor current on this thread (1 when tract runs single-threaded).
fn tract_pool_threads() -> usize {
    match tract_linalg::multithread::current_tract_executor() {
        tract_linalg::multithread::Executor::MultiThread(pool) => pool.current_num_threads(),
        _ => 1,
    }
}
