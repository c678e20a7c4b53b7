//! Sessions: load a model (an `.onnx` file or bytes, or a verified bundle), describe its inputs and outputs,
//! and run it with named tensors on a backend chosen from [`SessionOptions::device`].
use std::path::Path;

use crate::backend::{Backend, BackendKind, Device};
use crate::bundle::{Bundle, Manifest, OpenOptions, PublicKey, TensorSpec};
use crate::no_panic;
use crate::onnx::{self, Dim, Model, shape_string};
use crate::process::{self, ClassScore, Detection, Postprocess, Preprocess};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};

/// How to load a session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub device: Device,
    /// Worker threads for the CPU backend; 0 = one per available core.
    pub threads: usize,
    /// Bundle variant to load ("fp32", "int8"...); default: the bundle's first.
    pub variant: Option<String>,
    /// Trusted key: bundles must be signed by it.
    pub key: Option<PublicKey>,
    pub max_bundle_size: u64,
    /// Free a leading input dim fixed at 1 so the session takes batches ([`crate::onnx::Graph::free_batch_dim`]);
    /// for servers that batch requests. The rewrite is structural: check batched results against single runs.
    pub free_batch: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            device: Device::Auto,
            threads: 0,
            variant: None,
            key: None,
            max_bundle_size: crate::bundle::DEFAULT_MAX_BUNDLE_SIZE,
            free_batch: false,
        }
    }
}

/// Name, element type and shape (with symbolic dims) of an input or output.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct IoInfo {
    pub name: String,
    /// `None` when the file declares a type the API does not carry (e.g. strings).
    pub dtype: Option<DType>,
    pub shape: Vec<Dim>,
}

impl IoInfo {
    pub fn shape_string(&self) -> String {
        shape_string(&self.shape)
    }

    /// The shape with symbolic dims replaced by `batch` for the first dim and 1 elsewhere.
    pub fn concrete_shape(&self, batch: usize) -> Vec<usize> {
        self.shape
            .iter()
            .enumerate()
            .map(|(i, d)| match d {
                Dim::Fixed(n) => *n,
                Dim::Symbolic(_) => {
                    if i == 0 {
                        batch
                    } else {
                        1
                    }
                }
            })
            .collect()
    }

    /// A synthetic input for this declaration ([`Tensor::synthetic`]) with symbolic dims as in
    /// [`IoInfo::concrete_shape`]; `None` for an element type the API does not carry.
    pub fn synthetic(&self, batch: usize, seed: u64) -> Option<Tensor> {
        Tensor::synthetic(self.dtype?, self.concrete_shape(batch), seed).ok()
    }

    /// A named pre-processing preset ([`process::ImagePreprocess::preset`]) sized for this image input, laid out
    /// NHWC when the 1 or 3 channels are last and not second, with the input's element type.
    pub fn image_preset(&self, name: &str) -> Result<process::ImagePreprocess> {
        self.image_preset_sized(name, None)
    }

    /// Like [`IoInfo::image_preset`]; an input whose height and width are symbolic is fed images of `size`
    /// (height, width), else of YOLO's usual 640×640 for the `yolo` preset.
    pub fn image_preset_sized(&self, name: &str, size: Option<(u32, u32)>) -> Result<process::ImagePreprocess> {
        let fixed = |d: &Dim| if let Dim::Fixed(n) = d { Some(*n as u32) } else { None };
        let s = &self.shape;
        let channels_first = s.len() == 4 && matches!(s[1], Dim::Fixed(1 | 3));
        let channels_last = s.len() == 4 && matches!(s[3], Dim::Fixed(1 | 3)) && !channels_first;
        let hw = match s.len() {
            4 if channels_first => fixed(&s[2]).zip(fixed(&s[3])),
            4 => fixed(&s[1]).zip(fixed(&s[2])),
            _ => None,
        };
        let symbolic = |a: &Dim, b: &Dim| !matches!(a, Dim::Fixed(_)) && !matches!(b, Dim::Fixed(_));
        let free = s.len() == 4
            && if channels_first { symbolic(&s[2], &s[3]) } else { channels_last && symbolic(&s[1], &s[2]) };
        let hw = hw.or(if free { size.or((name == "yolo").then_some((640, 640))) } else { None });
        let (h, w) = hw.ok_or_else(|| {
            Error::Processing(format!("input `{}` {} is not an image", self.name, self.shape_string()))
        })?;
        let mut p = process::ImagePreprocess::preset(name, h, w)?;
        if channels_last {
            p.layout = process::Layout::Nhwc;
        }
        p.dtype = self.dtype.unwrap_or(DType::F32);
        Ok(p)
    }

    /// The manifest form of this description.
    pub fn spec(&self) -> TensorSpec {
        TensorSpec { name: self.name.clone(), dtype: self.dtype, shape: self.shape.clone() }
    }
}

/// Which backend runs a session, as structured fields.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendInfo {
    /// "cpu" or "gpu".
    pub kind: BackendKind,
    /// What executes the model: "tract 0.23.9", "edgepack kernel interpreter", "wgpu <adapter> / Vulkan".
    pub engine: String,
    /// CPU threads (resolved, never 0); absent on the GPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// The one-line form, e.g. "cpu (tract 0.23.9, 2 threads)".
    pub description: String,
    /// Why this backend: "requested", or `--device auto`'s reason.
    pub selection: String,
}

/// Images decoded and pre-processed into one batched input.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    /// Model input the tensor feeds.
    pub input: String,
    pub tensor: Tensor,
    /// (width, height) of each original image, for mapping boxes back.
    pub sizes: Vec<(u32, u32)>,
}

/// Where a bundle-backed session came from.
#[derive(Debug, Clone)]
pub struct BundleInfo {
    pub manifest: Manifest,
    pub variant: String,
    pub labels: Option<Vec<String>>,
    /// Key id of the signer, when signed.
    pub signer: Option<String>,
    pub trusted: bool,
}

/// A loaded model ready to run.
pub struct Session {
    backend: Box<dyn Backend>,
    /// Why this backend runs the session ("requested", or `Device::Auto`'s reason).
    selection: String,
    /// Every value name of the graph (inputs, initializers, node outputs), for checking requested values.
    values: std::collections::HashSet<String>,
    inputs: Vec<IoInfo>,
    outputs: Vec<IoInfo>,
    model_summary: ModelSummary,
    bundle: Option<BundleInfo>,
}

/// Facts about the ONNX file behind a session.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelSummary {
    pub ir_version: i64,
    pub opset: Option<i64>,
    pub producer: String,
    pub nodes: usize,
    pub initializers: usize,
    pub parameters: u64,
    /// (op type, count), most frequent first.
    pub op_histogram: Vec<(String, usize)>,
}

impl ModelSummary {
    pub fn of(model: &Model) -> ModelSummary {
        let mut hist: std::collections::BTreeMap<String, usize> = Default::default();
        for n in &model.graph.nodes {
            *hist.entry(onnx::NodeExt::op(n).to_string()).or_default() += 1;
        }
        let mut op_histogram: Vec<(String, usize)> = hist.into_iter().collect();
        op_histogram.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        ModelSummary {
            ir_version: model.ir_version(),
            opset: model.opset(""),
            producer: model.producer(),
            nodes: model.graph.nodes.len(),
            initializers: model.graph.initializers.len(),
            parameters: model.graph.initializers.iter().map(|t| t.dims.iter().product::<i64>().max(0) as u64).sum(),
            op_histogram,
        }
    }
}

/// Inputs (initializer-backed inputs excluded) and outputs of a model, as the file declares them.
pub fn model_io(model: &Model) -> (Vec<IoInfo>, Vec<IoInfo>) {
    let conv = |v: &onnx::ValueInfoProto| {
        let t = onnx::value_info_to_type(v);
        IoInfo {
            name: v.name.clone().unwrap_or_default(),
            dtype: t.as_ref().and_then(|t| t.dtype()),
            shape: t.and_then(|t| t.shape).unwrap_or_default(),
        }
    };
    let inputs = model.graph.runtime_inputs().into_iter().map(conv).collect();
    let outputs = model.graph.outputs.iter().map(conv).collect();
    (inputs, outputs)
}

/// True when the bytes start like a bundle.
pub fn is_bundle(bytes: &[u8]) -> bool {
    bytes.starts_with(crate::bundle::MAGIC)
}

/// The GPU backend, or why it cannot run this model (no adapter, an op it lacks, a build without `gpu`).
fn load_gpu(model: &Model) -> Result<Box<dyn Backend>> {
    #[cfg(feature = "gpu")]
    {
        Ok(Box::new(no_panic("loading on the gpu backend", || crate::gpu::GpuBackend::load(model, host_loader()))?))
    }
    #[cfg(not(feature = "gpu"))]
    {
        let _ = model;
        Err(Error::Backend { backend: "gpu", message: "this build has no GPU backend (feature `gpu`)".into() })
    }
}

/// The CPU backend a device backend folds host-known nodes with (one thread: such nodes are small).
pub fn host_loader() -> crate::backend::HostLoader {
    std::sync::Arc::new(|m: &Model| load_cpu_backend(m, &[], 1))
}

/// The CPU backend of this build: tract (feature `tract`, every op it implements) unless `EDGEPACK_CPU=interp`
/// asks for edgepack's kernel interpreter, which builds without tract always use (kernel nodes and a small op set).
pub(crate) fn load_cpu_backend(model: &Model, dtypes: &[DType], threads: usize) -> Result<Box<dyn Backend>> {
    #[cfg(feature = "tract")]
    if std::env::var("EDGEPACK_CPU").map_or(true, |v| v != "interp") {
        // tract first; a model it cannot analyse (Silero VAD's `If` branches of different ranks, say) runs on the
        // kernel interpreter when that one takes it, and the tract error stands when neither does.
        return match crate::cpu::CpuBackend::load(model, dtypes, threads) {
            // tract analyses control flow when it plans, at the first run: for a model with `If`/`Loop`, plan now
            // at the declared shapes (symbolic dims 1), and let the interpreter take the model tract cannot plan.
            Ok(b) if has_control_flow(model) => {
                let (inputs, _) = model_io(model);
                let shapes: Vec<Vec<usize>> = inputs.iter().map(|i| i.concrete_shape(1)).collect();
                match b.prepare(&shapes) {
                    Err(tract_err) => crate::interp::InterpBackend::load(model, threads)
                        .map(|i| Box::new(i) as Box<dyn Backend>)
                        .map_err(|_| tract_err),
                    Ok(()) => Ok(Box::new(b)),
                }
            }
            Ok(b) => Ok(Box::new(b)),
            Err(tract_err @ (Error::Backend { .. } | Error::UnsupportedOp { .. })) => {
                match crate::interp::InterpBackend::load(model, threads) {
                    Ok(b) => Ok(Box::new(b)),
                    Err(_) => Err(tract_err),
                }
            }
            Err(e) => Err(e),
        };
    }
    let _ = dtypes;
    Ok(Box::new(crate::interp::InterpBackend::load(model, threads)?))
}

#[cfg(feature = "tract")]
fn has_control_flow(model: &Model) -> bool {
    use crate::onnx::NodeExt;
    model.graph.nodes.iter().any(|n| matches!(n.op(), "If" | "Loop" | "Scan"))
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

impl Session {
    /// Opens an `.onnx` file or an `.edgepack` bundle (detected by content, not extension).
    pub fn open(path: impl AsRef<Path>, opts: &SessionOptions) -> Result<Session> {
        let path = path.as_ref();
        let mut head = [0u8; 8];
        let n = {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            f.read(&mut head).map_err(|e| Error::io(path, e))?
        };
        if is_bundle(&head[..n]) {
            let bundle =
                Bundle::open(path, &OpenOptions { key: opts.key.clone(), max_bundle_size: opts.max_bundle_size })?;
            Session::from_bundle(bundle, opts)
        } else {
            if opts.key.is_some() {
                return Err(crate::bundle::BundleError::Signature(
                    "a bare .onnx file cannot be signature-checked; pack it into a signed bundle".into(),
                )
                .into());
            }
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            Session::from_onnx_bytes(&bytes, opts)
        }
    }

    /// Loads ONNX bytes (or bundle bytes, detected by their magic).
    pub fn from_bytes(bytes: &[u8], opts: &SessionOptions) -> Result<Session> {
        if is_bundle(bytes) {
            let bundle = Bundle::from_bytes(
                bytes.to_vec(),
                &OpenOptions { key: opts.key.clone(), max_bundle_size: opts.max_bundle_size },
            )?;
            Session::from_bundle(bundle, opts)
        } else {
            Session::from_onnx_bytes(bytes, opts)
        }
    }

    pub fn from_onnx_bytes(bytes: &[u8], opts: &SessionOptions) -> Result<Session> {
        let model = Model::from_bytes(bytes)?;
        Session::from_model(&model, opts)
    }

    /// Loads a checked model on the backend chosen by `opts.device`.
    pub fn from_model(model: &Model, opts: &SessionOptions) -> Result<Session> {
        let freed;
        let low_bit = model.graph.has_low_bit_weights();
        let traced = model.graph.has_traced_shapes();
        let model = if opts.free_batch || low_bit || traced {
            let mut m = model.clone();
            if opts.free_batch {
                m.graph.free_batch_dim();
            }
            // A model with symbolic inputs runs at the shapes it is given, not at those its exporter traced.
            m.graph.forget_traced_shapes();
            // 4-bit (and weight-only 8-bit) weights are unpacked to f32 once here: no backend carries a 4-bit type,
            // and the float kernels want plain f32 weights.
            m.graph.fold_low_bit_weights();
            freed = m;
            &freed
        } else {
            model
        };
        let (inputs, outputs) = model_io(model);
        for i in &inputs {
            if i.dtype.is_none() {
                return Err(Error::MalformedModel(format!(
                    "input `{}` has a type the runtime does not support",
                    i.name
                )));
            }
        }
        let threads = if opts.threads == 0 { default_threads() } else { opts.threads };
        let load_cpu = || -> Result<Box<dyn Backend>> {
            let dts: Vec<DType> = inputs.iter().map(|i| i.dtype.unwrap_or(DType::F32)).collect();
            no_panic("loading on the cpu backend", || load_cpu_backend(model, &dts, threads))
        };
        let (backend, selection) = match opts.device {
            Device::Cpu => (load_cpu()?, "requested".to_string()),
            Device::Gpu => (load_gpu(model)?, "requested".to_string()),
            Device::Auto => crate::select::auto(model, &inputs, load_cpu, load_gpu)?,
        };
        let mut values: std::collections::HashSet<String> =
            model.graph.inputs.iter().filter_map(|v| v.name.clone()).collect();
        values.extend(model.graph.nodes.iter().flat_map(|n| n.output.iter().filter(|o| !o.is_empty()).cloned()));
        values.extend(backend.extra_values());
        let session = Session {
            backend,
            selection,
            values,
            inputs,
            outputs,
            model_summary: ModelSummary::of(model),
            bundle: None,
        };
        // Static models get their plan now, so the first run costs no compilation.
        if session.inputs.iter().all(|i| i.shape.iter().all(|d| matches!(d, Dim::Fixed(_)))) {
            let shapes: Vec<Vec<usize>> = session.inputs.iter().map(|i| i.concrete_shape(1)).collect();
            no_panic("preparing the model", || session.backend.prepare(&shapes))?;
        }
        Ok(session)
    }

    /// Loads a variant of a verified bundle, with its pre/post-processing and labels.
    pub fn from_bundle(bundle: Bundle, opts: &SessionOptions) -> Result<Session> {
        let (variant, bytes) = bundle.model_bytes(opts.variant.as_deref())?;
        let variant_id = variant.id.clone();
        let model = Model::from_bytes(&bytes)?;
        drop(bytes);
        let mut s = Session::from_model(&model, opts)?;
        let manifest = bundle.manifest().clone();
        let declared: Vec<TensorSpec> = s.inputs.iter().map(IoInfo::spec).collect();
        if declared.iter().map(|d| &d.name).ne(manifest.inputs.iter().map(|d| &d.name)) {
            return Err(crate::bundle::BundleError::Manifest(format!(
                "variant `{variant_id}` inputs do not match the manifest's inputs"
            ))
            .into());
        }
        s.bundle = Some(BundleInfo {
            labels: bundle.labels()?,
            variant: variant_id,
            signer: bundle.signer().map(PublicKey::key_id),
            trusted: bundle.is_trusted(),
            manifest,
        });
        Ok(s)
    }

    pub fn inputs(&self) -> &[IoInfo] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[IoInfo] {
        &self.outputs
    }

    /// True when the first input has a free (symbolic) leading dimension, i.e. accepts batches > 1.
    pub fn accepts_batch(&self) -> bool {
        self.inputs.first().is_some_and(|i| matches!(i.shape.first(), Some(Dim::Symbolic(_))))
    }

    pub fn backend_kind(&self) -> BackendKind {
        self.backend.kind()
    }

    /// Which backend runs this session, e.g. "cpu (tract 0.23.9, 2 threads)".
    pub fn backend_description(&self) -> String {
        self.backend.describe()
    }

    /// What the last run did on the device, where the backend counts it (the GPU backend's fused plans:
    /// dispatches, submissions, device memory allocated during the run).
    pub fn run_counters(&self) -> Option<edgepack_backend::RunCounters> {
        self.backend.run_counters()
    }

    /// The backend as structured fields (what `--json` outputs report as `backend`).
    pub fn backend_info(&self) -> BackendInfo {
        BackendInfo {
            kind: self.backend.kind(),
            engine: self.backend.engine(),
            threads: self.backend.threads(),
            description: self.backend.describe(),
            selection: self.selection.clone(),
        }
    }

    /// Why the backend was chosen: "requested" for an explicit device, else `Device::Auto`'s reason
    /// (e.g. "gpu measured 2.1x faster", "no GPU adapter: ...", "op LSTM has no GPU kernel").
    pub fn backend_selection(&self) -> &str {
        &self.selection
    }

    pub fn model_summary(&self) -> &ModelSummary {
        &self.model_summary
    }

    pub fn bundle(&self) -> Option<&BundleInfo> {
        self.bundle.as_ref()
    }

    pub fn preprocess(&self) -> Option<&Preprocess> {
        self.bundle.as_ref().and_then(|b| b.manifest.preprocess.as_ref())
    }

    pub fn postprocess(&self) -> Option<&Postprocess> {
        self.bundle.as_ref().and_then(|b| b.manifest.postprocess.as_ref())
    }

    pub fn labels(&self) -> Option<&[String]> {
        self.bundle.as_ref().and_then(|b| b.labels.as_deref())
    }

    /// Checks named inputs against the model's declaration and returns them in model order: every input given
    /// once, no unknown name, declared element types, declared ranks (an empty declared shape means "rank
    /// unknown": the backend checks further) and fixed dimensions. With `free_leading_dim` (a server batching
    /// requests) the leading dimension may be any size of at least 1, the same for every input. The one input
    /// check of the runtime: sessions run it, and the server runs it before queueing a request.
    pub fn check_inputs(&self, inputs: Vec<(String, Tensor)>, free_leading_dim: bool) -> Result<Vec<(String, Tensor)>> {
        let mut slots: Vec<Option<Tensor>> = vec![None; self.inputs.len()];
        let mut lead = None;
        for (name, t) in inputs {
            let Some(i) = self.inputs.iter().position(|x| x.name == name) else {
                return Err(Error::UnknownInput {
                    name,
                    expected: self.inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", "),
                });
            };
            let info = &self.inputs[i];
            if let Some(dt) = info.dtype
                && dt != t.dtype()
            {
                return Err(Error::InputDType { name, expected: dt.to_string(), got: t.dtype().to_string() });
            }
            let rank_ok = info.shape.is_empty() || info.shape.len() == t.shape().len();
            let dims_ok = info.shape.iter().zip(t.shape()).enumerate().all(|(k, (d, &n))| match d {
                Dim::Fixed(f) => *f == n || (k == 0 && free_leading_dim),
                Dim::Symbolic(_) => true,
            });
            let lead_ok = !free_leading_dim || t.shape().first().is_some_and(|&n| n > 0 && *lead.get_or_insert(n) == n);
            if !(rank_ok && dims_ok && lead_ok) {
                return Err(Error::InputShape { name, expected: info.shape_string(), got: t.shape().to_vec() });
            }
            if slots[i].is_some() {
                return Err(Error::InvalidTensor(format!("input `{name}` given twice")));
            }
            slots[i] = Some(t);
        }
        slots
            .into_iter()
            .zip(&self.inputs)
            .map(|(t, info)| match t {
                Some(t) => Ok((info.name.clone(), t)),
                None => Err(Error::MissingInput { name: info.name.clone() }),
            })
            .collect()
    }

    fn order_inputs(&self, inputs: Vec<(String, Tensor)>) -> Result<Vec<Tensor>> {
        Ok(self.check_inputs(inputs, false)?.into_iter().map(|(_, t)| t).collect())
    }

    /// Runs the model on named inputs; returns named outputs in model order.
    pub fn run(&self, inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
        let ordered = self.order_inputs(inputs)?;
        let outs = no_panic("running the model", || self.backend.run(ordered))?;
        Ok(self.outputs.iter().map(|o| o.name.clone()).zip(outs).collect())
    }

    /// Runs a batch of one input: in one call when the model takes a batch, else one call per row (leading dim)
    /// with the outputs stacked row-wise.
    pub fn run_batch(&self, input: &str, batch: Tensor) -> Result<Vec<(String, Tensor)>> {
        let n = batch.shape().first().copied().unwrap_or(1);
        if n <= 1 || self.accepts_batch() {
            return self.run(vec![(input.to_string(), batch)]);
        }
        let mut rows = Vec::with_capacity(n);
        for x in process::split_rows(&batch, &vec![1; n])? {
            rows.push(self.run(vec![(input.to_string(), x)])?);
        }
        (0..rows[0].len())
            .map(|i| {
                let column: Vec<Tensor> = rows.iter().map(|o| o[i].1.clone()).collect();
                Ok((rows[0][i].0.clone(), process::stack(&column)?))
            })
            .collect()
    }

    /// Runs the model and returns the named values (intermediate activations or outputs), in the order asked.
    pub fn run_values(&self, inputs: Vec<(String, Tensor)>, values: &[&str]) -> Result<Vec<(String, Tensor)>> {
        if let Some(bad) = values.iter().find(|v| !self.values.contains(**v)) {
            return Err(Error::UnknownValue { name: bad.to_string() });
        }
        let ordered = self.order_inputs(inputs)?;
        let names: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let outs = no_panic("running the model", || self.backend.run_values(ordered, &names))?;
        Ok(names.into_iter().zip(outs).collect())
    }

    /// Per-op-type timings of `runs` executions on these inputs (see [`crate::backend::OpTime`]).
    pub fn profile(&self, inputs: Vec<(String, Tensor)>, runs: usize) -> Result<Vec<crate::backend::OpTime>> {
        let ordered = self.order_inputs(inputs)?;
        let by_node = std::env::var("EDGEPACK_PROFILE_BY").is_ok_and(|v| v == "node");
        Ok(no_panic("profiling the model", || self.backend.trace(ordered, runs))?.op_times(by_node))
    }

    /// Every operation of `runs` executions on these inputs, in order, with its node and times (for a trace
    /// viewer: `edgepack bench --trace`).
    pub fn trace(&self, inputs: Vec<(String, Tensor)>, runs: usize) -> Result<crate::backend::Timeline> {
        let ordered = self.order_inputs(inputs)?;
        no_panic("profiling the model", || self.backend.trace(ordered, runs))
    }

    /// Runs a single-input model.
    pub fn run_one(&self, input: Tensor) -> Result<Vec<(String, Tensor)>> {
        let name = match self.inputs.as_slice() {
            [only] => only.name.clone(),
            _ => return Err(Error::InvalidTensor(format!("the model has {} inputs; name them", self.inputs.len()))),
        };
        self.run(vec![(name, input)])
    }

    fn image_preprocess(&self) -> Result<&process::ImagePreprocess> {
        match self.preprocess() {
            Some(Preprocess::Image(p)) => Ok(p),
            None => Err(Error::Processing(
                "this model has no image pre-processing; pack it with one (e.g. --preset)".into(),
            )),
        }
    }

    /// The image pre-processing to use: a named preset sized for the first input ([`IoInfo::image_preset`]),
    /// else the bundle's; `None` when there is neither.
    pub fn image_preprocessing(&self, preset: Option<&str>) -> Result<Option<process::ImagePreprocess>> {
        match preset {
            Some(name) => {
                let input = self.inputs.first().ok_or_else(|| Error::Processing("the model has no input".into()))?;
                input.image_preset(name).map(Some)
            }
            None => Ok(self.preprocess().map(|Preprocess::Image(p)| p.clone())),
        }
    }

    /// Decodes and pre-processes images with the bundle's recipe into one batch.
    pub fn image_input(&self, images: &[&[u8]]) -> Result<ImageBatch> {
        self.image_batch(images, self.image_preprocess()?)
    }

    /// Decodes and pre-processes images with `p` into one batch.
    pub fn image_batch(&self, images: &[&[u8]], p: &process::ImagePreprocess) -> Result<ImageBatch> {
        let mut tensors = Vec::with_capacity(images.len());
        let mut sizes = Vec::with_capacity(images.len());
        for bytes in images {
            let img = process::decode_image(bytes)?;
            sizes.push((img.width(), img.height()));
            tensors.push(p.apply(&img)?);
        }
        let name = p.input.clone().or_else(|| self.inputs.first().map(|i| i.name.clone())).unwrap_or_default();
        Ok(ImageBatch { input: name, tensor: process::stack(&tensors)?, sizes })
    }

    fn output<'a>(&self, outs: &'a [(String, Tensor)], name: Option<&str>) -> Result<&'a Tensor> {
        match name {
            None => outs.first().map(|o| &o.1),
            Some(n) => outs.iter().find(|o| o.0 == n).map(|o| &o.1),
        }
        .ok_or_else(|| Error::Processing(format!("no output `{}`", name.unwrap_or("<first>"))))
    }

    /// Top-k classes of each raw output row, using the bundle's post-processing (or softmax + top-5).
    pub fn classify_outputs(&self, outs: &[(String, Tensor)], top_k: Option<usize>) -> Result<Vec<Vec<ClassScore>>> {
        let (output, softmax, k, offset) = match self.postprocess() {
            Some(Postprocess::Classification { output, softmax, top_k, label_offset }) => {
                (output.as_deref(), *softmax, *top_k, *label_offset)
            }
            Some(other) => {
                return Err(Error::Processing(format!(
                    "this model is not a classifier (its post-processing is {})",
                    other.kind()
                )));
            }
            None => (None, process::Softmax::Auto, 5, 0),
        };
        process::classify(self.output(outs, output)?, softmax, top_k.unwrap_or(k), offset, self.labels())
    }

    /// Classifies encoded images (JPEG/PNG) in one batch.
    pub fn classify_images(&self, images: &[&[u8]], top_k: Option<usize>) -> Result<Vec<Vec<ClassScore>>> {
        let batch = self.image_input(images)?;
        let outs = self.run(vec![(batch.input, batch.tensor)])?;
        self.classify_outputs(&outs, top_k)
    }

    /// Detections from raw outputs, scaled to `image_size` (width, height).
    pub fn detections_from_outputs(&self, outs: &[(String, Tensor)], image_size: (u32, u32)) -> Result<Vec<Detection>> {
        match self.postprocess() {
            Some(Postprocess::SsdDetection {
                scores_output,
                boxes_output,
                classes,
                score_threshold,
                iou_threshold,
                max_detections,
            }) => process::detect_ssd(
                self.output(outs, Some(scores_output))?,
                self.output(outs, Some(boxes_output))?,
                classes,
                *score_threshold,
                *iou_threshold,
                *max_detections,
                image_size,
                self.labels(),
            ),
            Some(p @ Postprocess::Yolo { output, task, .. }) => {
                let spec = p.yolo_spec().ok_or_else(|| Error::Internal("a YOLO head without its spec".into()))?;
                let head = self.output(outs, output.as_deref())?;
                let protos = match task {
                    process::YoloTask::Segment { protos_output: Some(n), .. } => Some(self.output(outs, Some(n))?),
                    process::YoloTask::Segment { protos_output: None, .. } => {
                        Some(outs.iter().map(|o| &o.1).find(|t| !std::ptr::eq(*t, head)).ok_or_else(|| {
                            Error::Processing("a YOLO segment head needs its prototypes output".into())
                        })?)
                    }
                    _ => None,
                };
                // Boxes come in model-input pixels: back through the pre-processing (the letterbox) to the image.
                let (map, input_size) = match self.preprocess() {
                    Some(Preprocess::Image(pre)) => (pre.input_map(image_size), pre.input_size(image_size)),
                    None => (process::InputMap::IDENTITY, image_size),
                };
                process::decode_yolo(&spec, head, protos, 0, &map, image_size, input_size, self.labels())
            }
            _ => Err(Error::Processing("this model has no detection post-processing".into())),
        }
    }

    /// Detections of a batch of images from the batch's raw outputs: the outputs are split by their leading
    /// (batch) dim, one row per image, and each row's boxes are scaled to its own image.
    pub fn detections_per_image(&self, outs: &[(String, Tensor)], sizes: &[(u32, u32)]) -> Result<Vec<Vec<Detection>>> {
        if let [one] = sizes {
            return Ok(vec![self.detections_from_outputs(outs, *one)?]);
        }
        let ones = vec![1; sizes.len()];
        let rows = outs
            .iter()
            .map(|(name, t)| {
                process::split_rows(t, &ones)
                    .map_err(|e| Error::Processing(format!("output `{name}` does not hold one row per image ({e})")))
            })
            .collect::<Result<Vec<_>>>()?;
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let row: Vec<(String, Tensor)> =
                    outs.iter().zip(&rows).map(|((name, _), r)| (name.clone(), r[i].clone())).collect();
                self.detections_from_outputs(&row, size)
            })
            .collect()
    }

    /// Detects objects in one encoded image.
    pub fn detect_image(&self, image: &[u8]) -> Result<Vec<Detection>> {
        let batch = self.image_input(&[image])?;
        let outs = self.run(vec![(batch.input, batch.tensor)])?;
        self.detections_from_outputs(&outs, batch.sizes[0])
    }
}
