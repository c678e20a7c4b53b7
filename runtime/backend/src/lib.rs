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

/// An executor of one loaded model.
pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// Human-readable description, e.g. "cpu (tract 0.23.9, 2 threads)".
    fn describe(&self) -> String;
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
    /// Runs the model `runs` times, timing each executed operation; returns totals per op type.
    fn profile(&self, inputs: Vec<Tensor>, runs: usize) -> Result<Vec<OpTime>> {
        let _ = (inputs, runs);
        Err(edgepack_core::Error::Backend {
            backend: "profile",
            message: format!("{} cannot profile", self.describe()),
        })
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
