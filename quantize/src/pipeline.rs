//! The whole `edgepack quantize` job as one library call: prepare the graph (opset 13, names, BatchNorm folded),
//! calibrate, QDQ, gate accuracy (sensitivity + mixed precision under a budget), measure fidelity and latency,
//! and return the INT8 model with its [`Report`]. The CLI only parses arguments and writes files.
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::time::Instant;

use edgepack_runtime::onnx::{Model, NodeExt};
use edgepack_runtime::process::ImagePreprocess;
use edgepack_runtime::{Session, SessionOptions};

use crate::calib::{self, CalibError, Method};
use crate::data::Dataset;
use crate::equalize;
use crate::fidelity::{self, HeldOut};
use crate::mixed::{self, Budget, Probe, SensitivityMethod};
use crate::qdq::{self, QdqConfig};
use crate::report::{
    BudgetOutcome, EqualizationChoice, Latency, Layer, Preparation, Report, RoundingChoice, SampleInfo, Size,
};
use crate::rounding::{Methods, Refiner};

/// Estimated seconds up to which the automatic choice measures sensitivities exactly (one pass per layer).
pub const EXACT_SENSITIVITY_SECS: f64 = 120.0;
/// Tensor bytes the one-pass sensitivity keeps alive at once.
const LOCAL_SENSITIVITY_BYTES: usize = 512 << 20;

/// How the report names a gate: the budget given, or the default gate and what it became for this model.
fn gate_text(asked: Option<Budget>, resolved: Budget) -> String {
    match asked {
        Some(Budget::Default) => format!("default ({resolved})"),
        _ => resolved.to_string(),
    }
}

/// Samples from a dataset.
#[derive(Clone)]
pub struct Samples<'a> {
    pub data: &'a Dataset,
    pub range: Range<usize>,
    /// Where they come from, for the report.
    pub source: String,
}

#[derive(Clone)]
pub struct Job<'a> {
    /// The fp32 model as given (any opset).
    pub model: &'a Model,
    pub model_name: String,
    pub output_name: String,
    /// Size of the fp32 file, for the report.
    pub fp32_bytes: usize,
    pub calib: Samples<'a>,
    /// Held-out samples for the budget and the report; `None`: the calibration samples (with a warning).
    pub held_out: Option<Samples<'a>>,
    pub pre: Option<&'a ImagePreprocess>,
    /// A detection head (YOLO): the held-out samples also score detections, and the default gate is theirs.
    pub detector: Option<crate::fidelity::Detector>,
    pub method: Method,
    pub method_name: String,
    pub cfg: QdqConfig,
    /// The accuracy gate: a budget, [`Budget::Default`] (the default gate) or `None` (all INT8, whatever it costs).
    pub budget: Option<Budget>,
    /// How layer sensitivities are measured; `None`: exactly when that takes at most
    /// [`EXACT_SENSITIVITY_SECS`] (estimated), else in one pass.
    pub sensitivity_method: Option<SensitivityMethod>,
    /// At most this fraction of the quantizable nodes may stay fp32 under the budget.
    pub max_float_fraction: f64,
    /// Held-out samples used per node by the sensitivity analysis.
    pub sensitivity_samples: usize,
    /// Held-out samples used for per-layer SQNR.
    pub layer_samples: usize,
    /// Timed runs per model for latency (0 = skip).
    pub latency_runs: usize,
    /// Measure sensitivity even when no budget needs it (for the report).
    pub always_sensitivity: bool,
    /// Keep in fp32 the layers the CPU runtime has no integer kernel for (they would be slower in INT8).
    pub speed_gate: bool,
    /// When static INT8 misses the gate, try dynamic quantization and keep the better (see [`run`]).
    pub try_dynamic: bool,
    /// `--method auto`: a min-max result that misses its gate is compared with MSE ranges (a static pass again),
    /// and the one closer to the gate on the choosing samples is kept.
    pub try_mse: bool,
    /// How weights are rounded (see [`crate::rounding`]).
    pub rounding: Rounding,
    /// Whether activations are equalized before calibration (see [`crate::equalize`]).
    pub equalize: Equalize,
    pub session: SessionOptions,
    /// Memory cap for cached held-out inputs and fp32 outputs.
    pub held_out_max_bytes: usize,
}

/// How a job rounds weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// Round to nearest.
    Nearest,
    /// Fitted to the calibration inputs with these methods.
    Fitted(Methods),
    /// Nearest, bias correction and GPTQ + bias correction, the one closest to the fp32 model on the choosing
    /// samples kept.
    Auto,
}

/// Whether a job equalizes activations ([`crate::equalize`]) before its static INT8 pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Equalize {
    Off,
    /// Always (where the model has channel groups to scale).
    On,
    /// Tried after the rounding is chosen and kept when the all-INT8 model comes closer to fp32 on the choosing
    /// samples (the gate's measure, ties by the output SQNR); not tried without held-out samples.
    Auto,
}

/// The equalized graph with what the pass built on it: its fp32 session, ranges, configuration (with its refitted
/// rounding) and all-INT8 model, summary and metrics on the choosing samples.
struct Equalized {
    groups: usize,
    channels: usize,
    model: Model,
    fp32: Session,
    ranges: HashMap<String, qdq::Range>,
    cfg: QdqConfig,
    int8: (Model, qdq::QdqSummary, fidelity::Metrics),
}

/// Calibration samples the rounding statistics are gathered on (at most).
const ROUNDING_SAMPLES: usize = 64;

/// What the job is doing, for progress bars.
pub enum Event {
    /// A new stage with its number of steps.
    Stage(&'static str, usize),
    Step(usize),
    /// A line worth showing (a search candidate, a warning).
    Note(String),
}

fn which(r: &Range<usize>) -> String {
    if r.start == 0 { format!("first {}", r.len()) } else { format!("samples {}-{}", r.start + 1, r.end) }
}

impl Samples<'_> {
    /// What a report says about the first `n` of these samples.
    pub fn info(&self, n: usize, labelled: bool) -> SampleInfo {
        let r = self.range.start..self.range.start + n;
        SampleInfo { source: self.source.clone(), samples: n, labelled, which: which(&r) }
    }
}

/// The samples a job measures on and their fp32 results: `held_out`, or (with a warning) the `calib` samples when
/// none are given; a warning too when the memory cap cut them. `what`: what is measured, `calib_name`: what the
/// calibration samples are called, for the warning.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build_held_out<'a>(
    fp32: &Session,
    calib: &'a Samples<'a>,
    held_out: Option<&'a Samples<'a>>,
    pre: Option<&ImagePreprocess>,
    max_bytes: usize,
    (what, calib_name): (&str, &str),
    warnings: &mut Vec<String>,
    on: &mut dyn FnMut(Event),
) -> Result<(HeldOut, &'a Samples<'a>), CalibError> {
    let src = held_out.filter(|h| !h.range.is_empty()).unwrap_or_else(|| {
        warnings.push(format!("no held-out samples: {what} is measured on the {calib_name} samples (optimistic)"));
        calib
    });
    on(Event::Stage("fp32 reference", src.range.len()));
    let held = HeldOut::build(fp32, src.data, src.range.clone(), pre, max_bytes, |d, _| on(Event::Step(d)))?;
    if held.len() < src.range.len() {
        warnings.push(format!(
            "held-out set cut to {} samples to stay within {} MiB of cached tensors",
            held.len(),
            max_bytes >> 20
        ));
    }
    Ok((held, src))
}

/// Names in `exclude` that are neither a node name nor an op type of the graph the job quantizes (the model
/// upgraded to opset 13, its unnamed nodes named as [`run`] names them), and the graph's op types (for the
/// message).
pub fn unknown_excludes(model: &Model, exclude: &[String]) -> (Vec<String>, Vec<String>) {
    let mut m = model.clone();
    if m.upgrade_opset(13).is_err() {
        return (vec![], vec![]); // `run` reports the upgrade failure itself
    }
    m.graph.name_unnamed_nodes();
    let ops: std::collections::BTreeSet<String> = m.graph.nodes.iter().map(|n| n.op().to_string()).collect();
    let unknown = exclude
        .iter()
        .filter(|x| !m.graph.nodes.iter().any(|n| n.name() == x.as_str()) && !ops.contains(x.as_str()))
        .cloned()
        .collect();
    (unknown, ops.into_iter().collect())
}

/// Runs the job. Errors are bad input (data, budget that cannot be checked) or a model the CPU backend cannot run.
/// With `try_dynamic`, a static result that misses its gate is compared with dynamic quantization (where the
/// model has MatMul/Gemm or recurrent weights), and the one closer to the gate on the choosing samples is kept.
pub fn run(job: &Job, on: &mut dyn FnMut(Event)) -> Result<(Model, Report), CalibError> {
    let t0 = Instant::now();
    let (q, mut report) = run_or_fall_back(job, on)?;
    // The whole job: every pass `--method auto` and `--mode auto` ran, not only the one written.
    report.seconds = t0.elapsed().as_secs_f64();
    Ok((q, report))
}

fn run_or_fall_back(job: &Job, on: &mut dyn FnMut(Event)) -> Result<(Model, Report), CalibError> {
    let first = run_static(job, on)?;
    if !(job.try_dynamic && !job.cfg.dynamic && job.cfg.weight_only.is_none()) {
        return Ok(first);
    }
    let mut cfg = job.cfg.clone();
    cfg.dynamic = true;
    let dynamic_job = Job { cfg, method_name: "dynamic (each call's own range)".into(), ..job.clone() };
    let names = Alternative { first: "static INT8", second: "dynamic quantization", flag: "--mode auto" };
    keep_closer(first, names, on, |on| match run_once(&dynamic_job, on) {
        Ok(r) => Ok(Second::Ran(Box::new(r))),
        // Nothing for the dynamic pass (a CNN): the static result stands, nothing to say.
        Err(CalibError::Unsupported(_)) => Ok(Second::Skipped(None)),
        Err(e) => Err(e),
    })
}

/// The static (or weight-only, or dynamic) pass; with `try_mse`, a min-max result that misses its gate is compared
/// with MSE ranges and the one closer to the gate on the choosing samples is kept.
fn run_static(job: &Job, on: &mut dyn FnMut(Event)) -> Result<(Model, Report), CalibError> {
    let first = run_once(job, on)?;
    if !(job.try_mse && job.method == Method::MinMax && !job.cfg.dynamic && job.cfg.weight_only.is_none()) {
        return Ok(first);
    }
    // The MSE pass follows the min-max pass's equalization choice instead of trying it again (a pass of its own on
    // models like PP-OCRv4 det).
    let equalize = match first.1.equalization.as_ref() {
        Some(e) if job.equalize == Equalize::Auto => {
            if e.used {
                Equalize::On
            } else {
                Equalize::Off
            }
        }
        _ => job.equalize,
    };
    let mse_job = Job { method: Method::Mse, method_name: "mse".into(), equalize, ..job.clone() };
    let names = Alternative { first: "min-max ranges", second: "MSE ranges", flag: "--method auto" };
    keep_closer(first, names, on, |on| match run_once(&mse_job, on) {
        Ok(r) => Ok(Second::Ran(Box::new(r))),
        // The min-max file is a valid result: a failed second try does not take it away.
        Err(e) => Ok(Second::Skipped(Some(format!("the MSE pass failed: {e}")))),
    })
}

/// The names a second try is reported by.
struct Alternative {
    first: &'static str,
    second: &'static str,
    /// The option that asked for the second try.
    flag: &'static str,
}

/// What a second try gave.
enum Second {
    Ran(Box<(Model, Report)>),
    /// Nothing to compare; the reason, when the report should say it.
    Skipped(Option<String>),
}

/// `first` came from one pass. When it missed its gate, `second` runs, and the result that came closer to the gate
/// on the choosing samples is kept; the kept report says which and by how much.
fn keep_closer(
    first: (Model, Report),
    names: Alternative,
    on: &mut dyn FnMut(Event),
    second: impl FnOnce(&mut dyn FnMut(Event)) -> Result<Second, CalibError>,
) -> Result<(Model, Report), CalibError> {
    let Some((gate, reached)) = first.1.budget.as_ref().filter(|b| !b.met).map(|b| (b.budget, b.reached)) else {
        return Ok(first);
    };
    let Alternative { first: a, second: b, flag } = names;
    on(Event::Note(format!("{a} missed the gate ({reached:.3}): trying {b}")));
    let (q, mut report) = first;
    let (sq, mut sr) = match second(on)? {
        Second::Ran(r) => *r,
        Second::Skipped(why) => {
            report.warnings.extend(why.map(|w| format!("{a} kept ({flag}): {w}")));
            return Ok((q, report));
        }
    };
    let s_reached = sr.budget.as_ref().map_or(f64::NAN, |b| b.reached);
    if gate.better(s_reached, reached) {
        sr.warnings
            .push(format!("{b} chosen ({flag}): {a} reached {reached:.3} on the choosing samples, {b} {s_reached:.3}"));
        Ok((sq, sr))
    } else {
        report
            .warnings
            .push(format!("{a} kept ({flag}): {b} reached {s_reached:.3} on the choosing samples, not better"));
        Ok((q, report))
    }
}

fn run_once(job: &Job, on: &mut dyn FnMut(Event)) -> Result<(Model, Report), CalibError> {
    let t0 = Instant::now();
    let mut warnings = Vec::new();
    // 1. One modern, named, BN-folded graph: what gets calibrated is exactly what gets quantized.
    let mut model = job.model.clone();
    let upgrade = model.upgrade_opset(13)?;
    let named_nodes = model.graph.name_unnamed_nodes();
    let constants = model.graph.constants_to_initializers();
    let folded_batchnorm = model.graph.fold_batchnorm();
    let mut fp32 = Session::from_model(&model, &job.session).map_err(|e| {
        let nodes = qdq::float_nodes(&model);
        let detail = if nodes.is_empty() {
            String::new()
        } else {
            format!(" (nodes the quantizer would leave in fp32: {})", fmt_map(&nodes))
        };
        CalibError::Unsupported(format!(
            "the fp32 model does not run on the CPU backend, so it cannot be calibrated: {e}{detail}"
        ))
    })?;

    // 2. Calibration.
    let per_node = || {
        let nodes = qdq::float_nodes(&model);
        if nodes.is_empty() { String::new() } else { format!("; per node: {}", fmt_map(&nodes)) }
    };
    let values = qdq::activations_to_calibrate(&model, &job.cfg);
    if job.cfg.weight_only.is_some() && qdq::quantizable_nodes(&model, &job.cfg).is_empty() {
        return Err(CalibError::Unsupported(format!(
            "nothing to quantize: no Conv/Gemm/MatMul with a constant f32 weight{}",
            per_node()
        )));
    }
    if job.cfg.dynamic && qdq::quantizable_nodes(&model, &job.cfg).is_empty() {
        return Err(CalibError::Unsupported(format!(
            "nothing to quantize dynamically: no MatMul/Gemm with a constant weight, no LSTM/GRU/RNN{}",
            per_node()
        )));
    }
    if values.is_empty() && !job.cfg.dynamic && job.cfg.weight_only.is_none() {
        return Err(CalibError::Unsupported(format!(
            "nothing to quantize: no Conv/Gemm/MatMul/Add/Concat/pool of the main graph reads a float activation{}",
            per_node()
        )));
    }
    let passes = if job.method.needs_histogram() { 2 } else { 1 };
    // Dynamic quantization measures each call's range itself, weight-only leaves activations float: nothing to
    // calibrate.
    let mut ranges = if job.cfg.dynamic || job.cfg.weight_only.is_some() {
        HashMap::new()
    } else {
        on(Event::Stage("calibrate", job.calib.range.len() * passes));
        calib::calibrate(&fp32, job.calib.data, job.calib.range.clone(), job.pre, &values, job.method, |d, _| {
            on(Event::Step(d))
        })?
    };

    // 3. Held-out samples and their fp32 results. With a gate, the first half of them choose the fp32 layers and
    //    the other half judge the written model, so the report's figures are not the ones the choice was fitted to.
    let (mut select, held_src) = build_held_out(
        &fp32,
        &job.calib,
        job.held_out.as_ref(),
        job.pre,
        job.held_out_max_bytes,
        ("fidelity", "calibration"),
        &mut warnings,
        on,
    )?;
    if let Some(d) = &job.detector {
        select.set_detector(d.clone())?;
    }
    let gate = job.budget.map(|b| b.resolve(&select));
    if let Some(b) = &gate
        && let Some(why) = b.unusable(&select)
    {
        return Err(CalibError::Invalid(format!("budget {b}: {why}")));
    }
    let start = held_src.range.start;
    let judge = match gate {
        Some(_) if select.len() >= 2 => Some(select.split_off(select.len().div_ceil(2))),
        Some(_) => {
            warnings.push(
                "one held-out sample: the gate chooses the fp32 layers on the sample the report measures (optimistic)"
                    .into(),
            );
            None
        }
        None => None,
    };
    let info = |from: usize, n: usize, labelled: bool| SampleInfo {
        source: held_src.source.clone(),
        samples: n,
        labelled,
        which: which(&(start + from..start + from + n)),
    };
    let selection_info = judge.as_ref().map(|_| info(0, select.len(), select.labelled()));

    // 4. Full INT8, then (if the gate misses) sensitivity and the mixed-precision search on the selection samples.
    let mut cfg = job.cfg.clone();
    if !cfg.dynamic && cfg.weight_only.is_none() {
        for (output, ratio, names) in qdq::mixed_range_tails(&model, &ranges) {
            warnings.push(format!(
                "output `{output}` joins values whose ranges differ {ratio:.0}× (a detection head's boxes and \
                 scores): its decode after the last weighted layers stays fp32 ({} nodes)",
                names.len()
            ));
            cfg.exclude.extend(names);
        }
    }
    let (mut full, mut full_summary) =
        qdq::quantize(&model, &ranges, &cfg).map_err(|e| CalibError::Invalid(e.to_string()))?;
    // The runtime's view: quantized layers without an integer kernel run slower than in fp32.
    // (Weight-only layers run in float by design.)
    let slow = if cfg.weight_only.is_some() {
        vec![]
    } else {
        edgepack_runtime::onnx::qdq_kernels::layers_without_int8_kernel(&full)
    };
    let gated: HashMap<String, String> = if job.speed_gate { slow.iter().cloned().collect() } else { HashMap::new() };
    if !slow.is_empty() {
        let names: Vec<&str> = slow.iter().map(|(n, _)| n.as_str()).collect();
        warnings.push(if job.speed_gate {
            format!("speed gate: {} layer(s) kept fp32, no integer kernel on the CPU runtime: {}", slow.len(), names.join(", "))
        } else {
            format!(
                "{} INT8 layer(s) have no integer kernel on the CPU runtime and run slower than in fp32 (--speed-gate keeps them fp32): {}",
                slow.len(),
                names.join(", ")
            )
        });
    }
    if !gated.is_empty() {
        cfg.exclude.extend(gated.keys().cloned());
        (full, full_summary) = qdq::quantize(&model, &ranges, &cfg).map_err(|e| CalibError::Invalid(e.to_string()))?;
    }
    let units = qdq::quantizable_nodes(&model, &cfg);
    on(Event::Stage("evaluate int8", select.len()));
    let mut full_metrics =
        select.evaluate(&Session::from_model(&full, &job.session)?, None, |d, _| on(Event::Step(d)))?;
    // Weight rounding fitted to the calibration inputs: kept when asked, or (auto) when it brings the model closer
    // to fp32 on the choosing samples than round-to-nearest does.
    let mut rounding = RoundingChoice { used: Methods::NEAREST, compared: vec![] };
    let n_stats = job.calib.range.len().min(ROUNDING_SAMPLES);
    let stats_range = job.calib.range.start..job.calib.range.start + n_stats;
    let weighted = units.iter().filter(|(_, op)| matches!(op.as_str(), "Conv" | "Gemm" | "MatMul")).count();
    let candidates: Vec<Methods> = match job.rounding {
        // (The dynamic pass rounds its weights to nearest: no calibrated inputs to fit.)
        _ if cfg.dynamic => vec![],
        Rounding::Nearest => vec![],
        Rounding::Fitted(m) => vec![m],
        // Layer by layer is not among them: on EfficientNet-Lite0 it did no better than the one-shot fit (top-1
        // agreement with fp32 on 800 images: INT8 98.4 against 99.4 %, 4-bit 90.5 against 90.1 %) at 1.2–3× its
        // time (QUANTIZATION.md).
        Rounding::Auto => vec![Methods::BIAS_CORRECTION, Methods::GPTQ_BIAS_CORRECTION],
    };
    // Judged by the gate's own measure (or the output SQNR without a gate), ties by the output SQNR; on equal
    // terms the simpler rounding (or the model as given) stays.
    let score = |m: &fidelity::Metrics| match gate {
        Some(b) => (b.value(&select.fp32, m), m.output_sqnr_db.unwrap_or(f64::INFINITY)),
        None => (m.output_sqnr_db.unwrap_or(f64::INFINITY), 0.0),
    };
    let better = |a: (f64, f64), b: (f64, f64)| match gate {
        Some(g) if a.0 != b.0 => g.better(a.0, b.0),
        _ if a.0 != b.0 => a.0 > b.0,
        _ => a.1 > b.1,
    };
    let names: Vec<String> = units.iter().map(|(n, _)| n.clone()).collect();
    if !candidates.is_empty() {
        let mut stats: Option<Refiner> = None;
        let mut best = score(&full_metrics);
        rounding.compared.push(("nearest".into(), best.0));
        let forced = matches!(job.rounding, Rounding::Fitted(_));
        for methods in candidates {
            let refiner = if methods.sequential {
                on(Event::Stage("rounding layer by layer", weighted));
                Refiner::collect_sequential(
                    &model,
                    &ranges,
                    &cfg,
                    &units,
                    &job.session,
                    job.calib.data,
                    stats_range.clone(),
                    job.pre,
                    methods,
                    |d, _| on(Event::Step(d)),
                )?
            } else {
                if stats.is_none() {
                    on(Event::Stage("rounding statistics", n_stats));
                    stats = Some(Refiner::collect(
                        &model,
                        &fp32,
                        &names,
                        job.calib.data,
                        stats_range.clone(),
                        job.pre,
                        methods,
                        |d, _| on(Event::Step(d)),
                    )?);
                }
                match &stats {
                    Some(s) => s.with_methods(methods),
                    None => continue,
                }
            };
            let mut fcfg = cfg.clone();
            fcfg.refiner = Some(std::sync::Arc::new(refiner));
            on(Event::Stage("fit weights", 0));
            let (fm, fs) = qdq::quantize(&model, &ranges, &fcfg).map_err(|e| CalibError::Invalid(e.to_string()))?;
            on(Event::Stage("evaluate fitted weights", select.len()));
            let f_metrics =
                select.evaluate(&Session::from_model(&fm, &job.session)?, None, |d, _| on(Event::Step(d)))?;
            let s = score(&f_metrics);
            rounding.compared.push((methods.to_string(), s.0));
            on(Event::Note(format!("  weights {methods}: {:.3} (best so far {:.3})", s.0, best.0)));
            if forced || better(s, best) {
                best = s;
                rounding.used = methods;
                cfg = fcfg;
                (full, full_summary, full_metrics) = (fm, fs, f_metrics);
            }
        }
    }
    // 4a. The coded grid's bits by layer, for the same total size: each coded layer's effect on the output alone
    //     is measured at the uniform width, and the bits go where the noise is (`weight_only::allocate_bits`). Kept
    //     when the output SQNR on the choosing samples, the quantity it minimises the noise of, is higher: a top-1
    //     agreement on 50 samples moves by 2 % for one image (the pruned EfficientNet-Lite0: 98 → 96 % there while
    //     its SQNR went 14.0 → 18.9 dB, and top-1 on 1000 images 83.9 → 86.5).
    let mut rate_allocation = None;
    if let Some(wo) = cfg.weight_only.filter(|w| w.coded && !full_summary.coded_weights.is_empty()) {
        let n = job.sensitivity_samples.max(1).min(select.len());
        on(Event::Stage("rate allocation: sensitivity", units.len()));
        let sens = mixed::sensitivity(&model, &ranges, &cfg, &job.session, &select, n, |d, _| on(Event::Step(d)))?;
        let layers: Vec<(String, usize, f64)> = sens
            .iter()
            .filter(|s| full_summary.coded_weights.contains(&s.node))
            .map(|s| {
                let size = crate::rounding::weight_values(&model, &s.node).map_or(0, |w| w.len());
                (s.node.clone(), size, s.output_sqnr_db.map_or(0.0, |db| 10f64.powf(-db / 10.0)))
            })
            .collect();
        let bits = crate::weight_only::allocate_bits(&layers, wo.bits);
        let mut acfg = cfg.clone();
        acfg.coded_bits = bits.clone();
        on(Event::Stage("rate allocation: evaluate", select.len()));
        let (am, asum) = qdq::quantize(&model, &ranges, &acfg).map_err(|e| CalibError::Invalid(e.to_string()))?;
        let a_metrics = select.evaluate(&Session::from_model(&am, &job.session)?, None, |d, _| on(Event::Step(d)))?;
        let sqnr = |m: &fidelity::Metrics| m.output_sqnr_db.unwrap_or(f64::INFINITY);
        let (before, after) = ((sqnr(&full_metrics), 0.0), (sqnr(&a_metrics), 0.0));
        let used = after.0 > before.0;
        on(Event::Note(format!(
            "  bits by layer ({:.1}–{:.1}): output SQNR {:.2} dB against {:.2} dB uniform{}",
            bits.values().copied().fold(f64::INFINITY, f64::min),
            bits.values().copied().fold(f64::NEG_INFINITY, f64::max),
            after.0,
            before.0,
            if used { ", kept" } else { "" }
        )));
        rate_allocation = Some(crate::report::RateAllocation { used, compared: [before.0, after.0], bits });
        if used {
            cfg = acfg;
            (full, full_summary, full_metrics) = (am, asum, a_metrics);
        }
    }
    // 4b. Activation equalization, then calibration, rounding and the all-INT8 model again on the equalized graph.
    //     `auto` compares it with the model as given like a rounding: by the gate's measure on the choosing samples,
    //     ties by the output SQNR. An attempt that fails leaves the model as given (`auto`: with a warning).
    let mut equalization = None;
    // Judged on the calibration samples themselves (no held-out samples), the equalized graph, fitted to their
    // channel peaks, looks better than it is (SqueezeNet on 16 images: +2.8 dB there, +0.3 dB on 800 others):
    // `auto` does not try it then.
    let own_samples = job.held_out.as_ref().is_none_or(|h| h.range.is_empty());
    if own_samples && job.equalize == Equalize::Auto && !cfg.dynamic && cfg.weight_only.is_none() {
        warnings.push("activation equalization not tried (--equalize auto): no held-out samples to judge it on".into());
    }
    if !cfg.dynamic
        && cfg.weight_only.is_none()
        && (job.equalize == Equalize::On || (job.equalize == Equalize::Auto && !own_samples))
    {
        let attempt = |on: &mut dyn FnMut(Event)| -> Result<Option<Box<Equalized>>, CalibError> {
            on(Event::Stage("equalize", n_stats));
            let Some(eq) = equalize::equalize(
                &model,
                &fp32,
                job.calib.data,
                stats_range.clone(),
                job.pre,
                equalize::ALPHA,
                |d, _| on(Event::Step(d)),
            )?
            else {
                return Ok(None);
            };
            let efp32 = Session::from_model(&eq.model, &job.session)?;
            on(Event::Stage("calibrate equalized", job.calib.range.len() * passes));
            let eranges = calib::calibrate(
                &efp32,
                job.calib.data,
                job.calib.range.clone(),
                job.pre,
                &values,
                job.method,
                |d, _| on(Event::Step(d)),
            )?;
            let mut ecfg = cfg.clone();
            ecfg.refiner = None;
            if rounding.used != Methods::NEAREST {
                let refiner = if rounding.used.sequential {
                    on(Event::Stage("rounding layer by layer (equalized)", weighted));
                    Refiner::collect_sequential(
                        &eq.model,
                        &eranges,
                        &ecfg,
                        &units,
                        &job.session,
                        job.calib.data,
                        stats_range.clone(),
                        job.pre,
                        rounding.used,
                        |d, _| on(Event::Step(d)),
                    )?
                } else {
                    on(Event::Stage("rounding statistics (equalized)", n_stats));
                    Refiner::collect(
                        &eq.model,
                        &efp32,
                        &names,
                        job.calib.data,
                        stats_range.clone(),
                        job.pre,
                        rounding.used,
                        |d, _| on(Event::Step(d)),
                    )?
                };
                ecfg.refiner = Some(std::sync::Arc::new(refiner));
            }
            let (em, es) = qdq::quantize(&eq.model, &eranges, &ecfg).map_err(|e| CalibError::Invalid(e.to_string()))?;
            on(Event::Stage("evaluate equalized", select.len()));
            let metrics = select.evaluate(&Session::from_model(&em, &job.session)?, None, |d, _| on(Event::Step(d)))?;
            Ok(Some(Box::new(Equalized {
                groups: eq.groups,
                channels: eq.channels,
                model: eq.model,
                fp32: efp32,
                ranges: eranges,
                cfg: ecfg,
                int8: (em, es, metrics),
            })))
        };
        match attempt(on) {
            Ok(None) => {}
            Ok(Some(eq)) => {
                let (before, after) = (score(&full_metrics), score(&eq.int8.2));
                let used = job.equalize == Equalize::On || better(after, before);
                on(Event::Note(format!(
                    "  equalized activations ({} groups, {} channels): {:.3} against {:.3} without{}",
                    eq.groups,
                    eq.channels,
                    after.0,
                    before.0,
                    if used { ", kept" } else { ", not kept" }
                )));
                equalization = Some(EqualizationChoice {
                    used,
                    groups: eq.groups,
                    channels: eq.channels,
                    alpha: equalize::ALPHA,
                    compared: vec![("as given".into(), before.0), ("equalized".into(), after.0)],
                });
                if used {
                    let eq = *eq;
                    (model, fp32, ranges, cfg) = (eq.model, eq.fp32, eq.ranges, eq.cfg);
                    (full, full_summary, full_metrics) = eq.int8;
                }
            }
            Err(e) if job.equalize == Equalize::Auto => {
                warnings.push(format!("activation equalization skipped (--equalize auto): {e}"))
            }
            Err(e) => return Err(e),
        }
    }
    let job_cfg = cfg;
    let mut sens: Vec<mixed::Sensitivity> = Vec::new();
    let need_search = gate.is_some_and(|b| !b.met(b.value(&select.fp32, &full_metrics)));
    let n_sens = job.sensitivity_samples.max(1).min(select.len());
    // Measuring every layer alone costs a pass of the model per layer and sample; past a couple of minutes the
    // one-pass local measure takes over.
    let exact_secs = units.len() as f64 * n_sens as f64 * select.fp32_run_secs * 1.5;
    // The one-pass probe reads QDQ pairs: dynamic models are measured exactly.
    let no_qdq_pairs = job_cfg.dynamic || job_cfg.weight_only.is_some();
    let sens_method = job.sensitivity_method.filter(|_| !no_qdq_pairs).unwrap_or(
        if exact_secs <= EXACT_SENSITIVITY_SECS || no_qdq_pairs {
            SensitivityMethod::Exact
        } else {
            SensitivityMethod::Local
        },
    );
    if need_search || job.always_sensitivity {
        on(Event::Stage("sensitivity", units.len()));
        sens = match sens_method {
            SensitivityMethod::Exact => {
                mixed::sensitivity(&model, &ranges, &job_cfg, &job.session, &select, n_sens, |d, _| on(Event::Step(d)))?
            }
            SensitivityMethod::Local => {
                on(Event::Stage("sensitivity (one pass)", units.len() * n_sens));
                mixed::local_sensitivity(
                    &model,
                    &full,
                    &units,
                    &job.session,
                    &select,
                    n_sens,
                    LOCAL_SENSITIVITY_BYTES,
                    |d, _| on(Event::Step(d)),
                )?
            }
        };
    }
    let max_float = ((units.len() as f64) * job.max_float_fraction.clamp(0.0, 1.0)).floor() as usize;
    let (q, summary, select_metrics, mut budget) = match gate {
        Some(b) if need_search => {
            let order: Vec<String> = sens.iter().map(|s| s.node.clone()).collect();
            on(Event::Stage("mixed precision", 0));
            let first = Probe {
                float_nodes: 0,
                value: b.value(&select.fp32, &full_metrics),
                met: false,
                metrics: full_metrics,
            };
            let r =
                mixed::search(&model, &ranges, &job_cfg, &job.session, &select, b, &order, max_float, first, |p| {
                    on(Event::Note(format!(
                        "  {} node(s) {}: {:.3} ({})",
                        p.float_nodes,
                        job_cfg.weight_only.filter(|w| w.narrow()).map_or("in fp32".into(), |w| w.fallback()),
                        p.value,
                        if p.met { "meets the budget" } else { "misses" }
                    )))
                })?;
            if !r.met {
                warnings.push(format!(
                    "budget {b} not met with up to {max_float} node(s) in fp32 (--max-float-fraction {}): best reached {:.3} with {} in fp32; that model was written",
                    job.max_float_fraction,
                    b.value(&select.fp32, &r.metrics),
                    r.float_nodes.len()
                ));
            }
            let outcome = BudgetOutcome {
                budget: b,
                text: gate_text(job.budget, b),
                met: r.met,
                reached: b.value(&select.fp32, &r.metrics),
                judged: None,
                max_float_nodes: max_float,
                float_nodes: r.float_nodes.clone(),
                probes: r.probes,
            };
            (r.model, r.summary, r.metrics, Some(outcome))
        }
        _ => {
            let outcome = gate.map(|b| BudgetOutcome {
                budget: b,
                text: gate_text(job.budget, b),
                met: true,
                reached: b.value(&select.fp32, &full_metrics),
                judged: None,
                max_float_nodes: max_float,
                float_nodes: vec![],
                probes: vec![Probe {
                    float_nodes: 0,
                    value: b.value(&select.fp32, &full_metrics),
                    met: true,
                    metrics: full_metrics.clone(),
                }],
            });
            (full, full_summary, full_metrics, outcome)
        }
    };
    let qs = Session::from_model(&q, &job.session)?;
    // The report's figures: on the judging samples when there are some.
    let held = judge.as_ref().unwrap_or(&select);
    let metrics = match &judge {
        Some(j) => {
            on(Event::Stage("evaluate on the report samples", j.len()));
            let m = j.evaluate(&qs, None, |d, _| on(Event::Step(d)))?;
            if let Some(b) = budget.as_mut() {
                b.judged = Some(b.budget.value(&j.fp32, &m));
            }
            m
        }
        None => select_metrics,
    };

    // 5. Per-layer SQNR of the written model, latency, sizes.
    let layer_nodes: Vec<(String, String, String)> = model
        .graph
        .nodes
        .iter()
        .filter(|n| units.iter().any(|(u, _)| u == n.name()) || summary.excluded.iter().any(|e| e == n.name()))
        .filter_map(|n| Some((n.name().to_string(), n.op().to_string(), n.output.first()?.clone())))
        .collect();
    let outs: Vec<String> = layer_nodes.iter().map(|l| l.2.clone()).collect();
    on(Event::Stage("per-layer SQNR", job.layer_samples.min(held.len())));
    // A backend that fuses layers may not expose every node's output (edgepack's kernel interpreter): the model
    // stands, only the per-layer figures are missing.
    let (layer_sqnr, layer_sqnr_measured) =
        match held.value_sqnr(&fp32, &qs, &outs, job.layer_samples, |d, _| on(Event::Step(d))) {
            Ok(v) => (v, true),
            Err(e) => {
                warnings.push(format!("no per-layer SQNR: {e}"));
                (vec![None; outs.len()], false)
            }
        };
    let latency = if job.latency_runs > 0 {
        on(Event::Stage("latency", 2));
        let x = held.input(0);
        let a = fidelity::median_latency_ms(&fp32, x.clone(), job.latency_runs)?;
        on(Event::Step(1));
        let b = fidelity::median_latency_ms(&qs, x, job.latency_runs)?;
        on(Event::Step(2));
        Some(Latency {
            fp32_ms: a,
            int8_ms: b,
            ratio: b / a,
            runs: job.latency_runs,
            threads: qs.backend_info().threads.unwrap_or(job.session.threads),
            backend: qs.backend_description(),
        })
    } else {
        None
    };
    if let Some(l) = latency.as_ref().filter(|l| l.ratio > 1.1) {
        warnings.push(format!(
            "the INT8 model runs slower than fp32 on this CPU runtime ({:.2} ms against {:.2}, ×{:.2}): layers without \
             an integer kernel run as float with quantize/dequantize around them",
            l.int8_ms, l.fp32_ms, l.ratio
        ));
    }
    let search_float: Vec<String> = budget.as_ref().map(|b| b.float_nodes.clone()).unwrap_or_default();
    let sens_of: HashMap<&str, Option<f64>> = sens.iter().map(|s| (s.node.as_str(), s.output_sqnr_db)).collect();
    let layers = layer_nodes
        .iter()
        .zip(&layer_sqnr)
        .map(|((name, op, _), sq)| {
            let fp = summary.excluded.iter().any(|e| e == name);
            let reason = if search_float.contains(name) {
                let rank = sens.iter().position(|s| &s.node == name).map(|r| r + 1).unwrap_or(0);
                let kept = job.cfg.weight_only.filter(|w| w.narrow()).map_or("fp32".into(), |w| w.fallback());
                Some(format!("kept {kept} by the budget search (sensitivity rank {rank} of {})", sens.len()))
            } else if let Some(why) = gated.get(name) {
                Some(format!("speed gate: no integer kernel ({why})"))
            } else if fp && !job.cfg.op_types.is_empty() && !job.cfg.op_types.iter().any(|t| t == op) {
                Some("not among --op-types".into())
            } else if fp {
                Some("excluded (--exclude)".into())
            } else {
                summary.skipped.get(name).cloned()
            };
            let int8 = !fp && !summary.skipped.contains_key(name);
            Layer {
                node: name.clone(),
                op: op.clone(),
                precision: if summary.int4_weights.contains(name) {
                    "int4"
                } else if summary.coded_weights.contains(name) {
                    "coded"
                } else if int8 {
                    "int8"
                } else {
                    "fp32"
                }
                .into(),
                reason,
                sqnr_db: *sq,
                sensitivity_db: sens_of.get(name.as_str()).copied().flatten(),
            }
        })
        .collect();
    let float_ops: BTreeMap<String, String> = summary
        .skipped
        .iter()
        .filter(|(k, _)| !layer_nodes.iter().any(|l| &l.0 == *k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let int8_bytes = q.to_bytes().len();
    let report = Report {
        model: job.model_name.clone(),
        output: job.output_name.clone(),
        method: job.method_name.clone(),
        calibration: job.calib.info(job.calib.range.len(), false),
        held_out: info(if judge.is_some() { select.len() } else { 0 }, held.len(), held.labelled()),
        selection: selection_info,
        sensitivity_method: (!sens.is_empty()).then_some(sens_method),
        rounding,
        equalization,
        weight_only: job.cfg.weight_only,
        rate_allocation,
        recurrent_state: crate::feeds::Feeds::of(&fp32).describe(),
        preparation: Preparation { opset_upgrade: upgrade, folded_batchnorm, named_nodes, constants },
        fp32: held.fp32.clone(),
        int8: metrics,
        budget,
        size: Size { fp32_bytes: job.fp32_bytes, int8_bytes, ratio: int8_bytes as f64 / job.fp32_bytes.max(1) as f64 },
        latency,
        layers,
        layer_sqnr_measured,
        float_ops,
        warnings,
        seconds: t0.elapsed().as_secs_f64(),
        provenance: None,
    };
    Ok((q, report))
}

fn fmt_map(m: &BTreeMap<String, String>) -> String {
    m.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join("; ")
}
