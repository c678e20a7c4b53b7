//! The one small trait every execution backend implements. A `Session` (edgepack-runtime) holds a `Box<dyn Backend>` and
//! never knows which device it drives.
use edgepack_core::Result;
use edgepack_core::Tensor;

pub use edgepack_core::BackendKind;

/// Builds the host's CPU backend for a model. A device backend folds the nodes whose inputs are known on the host
/// with it (shape arithmetic, constant subgraphs); the caller chooses which CPU backend, so no backend calls the
/// session or knows which CPU backends the build has.
pub type HostLoader = std::sync::Arc<dyn Fn(&edgepack_onnx::Model) -> Result<Box<dyn Backend>> + Send + Sync>;

/// Where a session should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The best available backend that supports the model (today: the CPU).
    #[default]
    Auto,
    Cpu,
    Gpu,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "gpu" => Ok(Device::Gpu),
            _ => Err(format!("unknown device `{s}` (auto, cpu, gpu)")),
        }
    }
}

/// What one run did on a device (a GPU backend's fused plans; see `Backend::run_counters`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RunCounters {
    /// Compute dispatches recorded.
    pub dispatches: usize,
    /// Command buffers submitted.
    pub submissions: usize,
    /// Device memory (buffers) created during the run.
    pub alloc_bytes: u64,
    /// Device memory the run's activation buffers take (the plan's, reused by every run).
    pub activation_bytes: u64,
}

/// An executor of one loaded model.
pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// Human-readable description, e.g. "cpu (tract 0.23.9, 2 threads)".
    fn describe(&self) -> String;
    /// What executes the model, for structured reports: "tract 0.23.9", "edgepack kernel interpreter",
    /// "wgpu llvmpipe (LLVM 15.0.6, 256 bits) / Vulkan".
    fn engine(&self) -> String {
        self.describe()
    }
    /// What the last run did on the device, where the backend counts it (`None`: not counted).
    fn run_counters(&self) -> Option<RunCounters> {
        None
    }
    /// CPU threads the backend runs on (resolved: never 0); `None` where threads are not its unit (a GPU).
    fn threads(&self) -> Option<usize> {
        None
    }
    /// Runs the model. `inputs` are in model input order and already validated against the declared
    /// names, dtypes and fixed dimensions. Returns outputs in model output order.
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>>;
    /// Runs the model and returns the named values instead of the model outputs: any value of the graph
    /// (intermediate activations for calibration and per-layer error), in the order asked. Names are checked
    /// by the session beforehand.
    fn run_values(&self, inputs: Vec<Tensor>, values: &[String]) -> Result<Vec<Tensor>> {
        let _ = (inputs, values);
        Err(edgepack_core::Error::Backend {
            backend: "values",
            message: format!("{} cannot expose intermediate values", self.describe()),
        })
    }
    /// Values this backend computes beyond the model's own (e.g. the NHWC `NAME__nhwc` twins of the CPU
    /// backend's integer kernels), which `run_values` may also ask for.
    fn extra_values(&self) -> Vec<String> {
        Vec::new()
    }
    /// Prepares execution for these concrete input shapes ahead of time (plans, shaders).
    fn prepare(&self, shapes: &[Vec<usize>]) -> Result<()>;
    /// Runs the model `runs` times, timing each executed operation in order (a [`Timeline`]).
    fn trace(&self, inputs: Vec<Tensor>, runs: usize) -> Result<Timeline> {
        let _ = (inputs, runs);
        Err(edgepack_core::Error::Backend {
            backend: "profile",
            message: format!("{} cannot profile", self.describe()),
        })
    }
}

/// One executed operation of a profiled run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OpEvent {
    /// Which run (0-based).
    pub run: usize,
    /// The node: the ONNX node's name (the interpreter and the GPU backend), or tract's node, named after the
    /// ONNX node it comes from.
    pub node: String,
    /// The operation: the ONNX op type, or tract's optimised op (`OptMatMul`, `DepthWise`...).
    pub op: String,
    /// Microseconds from the start of the trace.
    pub start_us: f64,
    pub dur_us: f64,
}

/// The operations of profiled runs, in execution order.
#[derive(Debug, Clone)]
pub struct Timeline {
    origin: std::time::Instant,
    run: usize,
    pub runs: usize,
    pub events: Vec<OpEvent>,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline::new()
    }
}

impl Timeline {
    pub fn new() -> Timeline {
        Timeline { origin: std::time::Instant::now(), run: 0, runs: 0, events: Vec::new() }
    }

    /// Records an operation that started at `start` and ends now.
    pub fn record(&mut self, node: &str, op: &str, start: std::time::Instant) {
        let us = |t: std::time::Instant| t.saturating_duration_since(self.origin).as_secs_f64() * 1e6;
        let (s, e) = (us(start), us(std::time::Instant::now()));
        self.events.push(OpEvent { run: self.run, node: node.into(), op: op.into(), start_us: s, dur_us: e - s });
    }

    /// Ends a run: later events belong to the next one.
    pub fn end_run(&mut self) {
        self.run += 1;
        self.runs = self.run;
    }

    /// Time per op type (or per node with `by_node`: "op node"), mean per run, slowest first.
    pub fn op_times(&self, by_node: bool) -> Vec<OpTime> {
        let mut totals: std::collections::HashMap<String, (usize, std::time::Duration)> = Default::default();
        for e in &self.events {
            let key = if by_node { format!("{} {}", e.op, e.node) } else { e.op.clone() };
            let t = totals.entry(key).or_default();
            t.0 += 1;
            t.1 += std::time::Duration::from_secs_f64(e.dur_us.max(0.0) / 1e6);
        }
        OpTime::from_totals(totals, self.runs.max(1))
    }
}

/// Time spent in one kind of operation, summed over a profile's runs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OpTime {
    /// The backend's name for the operation (for tract: the optimised op, e.g. `OptMatMul`, `DepthWise`).
    pub op: String,
    /// Executions per run.
    pub count: usize,
    /// Mean milliseconds per run.
    pub ms_per_run: f64,
}

impl OpTime {
    /// Per-op totals of `runs` runs ((executions, time) by op name), slowest first.
    pub fn from_totals(
        totals: std::collections::HashMap<String, (usize, std::time::Duration)>,
        runs: usize,
    ) -> Vec<OpTime> {
        let runs = runs.max(1);
        let mut out: Vec<OpTime> = totals
            .into_iter()
            .map(|(op, (n, d))| OpTime { op, count: n / runs, ms_per_run: d.as_secs_f64() * 1e3 / runs as f64 })
            .collect();
        out.sort_by(|a, b| b.ms_per_run.total_cmp(&a.ms_per_run));
        out
    }
}
