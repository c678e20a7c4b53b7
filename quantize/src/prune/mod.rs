//! `edgepack prune`: pruning that makes models smaller ([`magnitude`]: exact zeros that a zstd bundle member
//! stores almost for free) or faster ([`channels`]: whole channels removed from the dense graph), repaired
//! without training (bias correction from [`stats`]), with a per-layer sensitivity scan and an automatic plan
//! under an accuracy budget ([`plan`]), and a report ([`report`]).
//!
//! The job prepares the graph as `quantize` does (opset 13, named nodes, constants as initializers, BatchNorm
//! folded), so a pruned model can go straight on to `edgepack quantize`.
pub mod channels;
pub mod magnitude;
pub mod plan;
pub mod report;
pub mod stats;

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use edgepack_runtime::onnx::passes::tensor_f32_values;
use edgepack_runtime::onnx::{Model, NodeExt};
use edgepack_runtime::process::ImagePreprocess;
use edgepack_runtime::{Session, SessionOptions};

use crate::calib::CalibError;
use crate::fidelity;
use crate::mixed::Budget;
use crate::pipeline::Samples;
use crate::report::Preparation;
use channels::Groups;
use stats::ChannelStats;

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("{0}")]
    Invalid(String),
}

impl From<PruneError> for CalibError {
    fn from(e: PruneError) -> CalibError {
        match e {
            PruneError::Invalid(s) => CalibError::Invalid(s),
        }
    }
}

/// How structured pruning ranks the channels of a group (lowest goes first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Criterion {
    /// Mean |w| of each source filter.
    L1,
    /// RMS of each source filter.
    L2,
    /// |γ/√(σ²+ε)| of the BatchNormalization after each source Conv (before folding).
    BnScale,
    /// E|x_c| · ‖W[:, c]‖ at every consumer: the channel's contribution to what reads it (needs samples).
    Contribution,
    /// ‖W[:, c]‖² · Var(x_c | the other channels) at every consumer: what the consumer's output keeps losing
    /// after the least-squares rebuild from the other channels (needs samples; redundant channels go first).
    Reconstruction,
}

impl std::str::FromStr for Criterion {
    type Err = String;
    fn from_str(s: &str) -> Result<Criterion, String> {
        match s {
            "l1" => Ok(Criterion::L1),
            "l2" => Ok(Criterion::L2),
            "bn-scale" => Ok(Criterion::BnScale),
            "contribution" => Ok(Criterion::Contribution),
            "reconstruction" => Ok(Criterion::Reconstruction),
            o => Err(format!("unknown criterion `{o}` (reconstruction, contribution, l1, l2, bn-scale)")),
        }
    }
}

/// Where the per-layer amounts of unstructured pruning come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// One threshold over every layer on layer-adaptive magnitude scores (LAMP).
    Global,
    /// The same fraction of each layer.
    Layer,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Method {
    Unstructured { scope: Scope },
    Structured { criterion: Criterion, multiple: usize },
}

impl Method {
    pub fn structured(&self) -> bool {
        matches!(self, Method::Structured { .. })
    }
}

/// What to prune: a uniform amount, or a plan found under a budget.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "kebab-case")]
pub enum Target {
    /// Sparsity (unstructured) or channel ratio of every prunable group (structured), 0..1.
    Amount(f64),
    /// The largest reduction (MACs when structured, weights when unstructured) that keeps the budget.
    Budget(Budget),
}

/// A graph ready for pruning and quantization, and what preparing it did.
pub struct Prepared {
    pub model: Model,
    pub preparation: Preparation,
    /// |γ/√(σ²+ε)| of each BatchNormalization, by the Conv it followed (read before folding).
    pub bn_scales: HashMap<String, Vec<f32>>,
}

pub fn prepare(model: &Model) -> Result<Prepared, CalibError> {
    let mut m = model.clone();
    let opset_upgrade = m.upgrade_opset(13)?;
    let named_nodes = m.graph.name_unnamed_nodes();
    let constants = m.graph.constants_to_initializers();
    m.graph.topo_sort()?;
    let bn_scales = bn_scales(&m);
    let folded_batchnorm = m.graph.fold_batchnorm();
    if m.ir_version() < 4 {
        m.set_ir_version(7);
    }
    Ok(Prepared {
        model: m,
        preparation: Preparation { opset_upgrade, folded_batchnorm, named_nodes, constants },
        bn_scales,
    })
}

fn bn_scales(m: &Model) -> HashMap<String, Vec<f32>> {
    let g = &m.graph;
    let prods = g.producers();
    let mut out = HashMap::new();
    for bn in g.nodes.iter().filter(|n| n.op() == "BatchNormalization" && n.input.len() == 5) {
        let Some(&p) = prods.get(bn.input[0].as_str()) else { continue };
        if g.nodes[p].op() != "Conv" {
            continue;
        }
        let get = |i: usize| g.initializer(&bn.input[i]).and_then(tensor_f32_values);
        let (Some(gamma), Some(var)) = (get(1), get(4)) else { continue };
        let eps = bn.attr_f("epsilon").unwrap_or(1e-5);
        out.insert(
            g.nodes[p].name().to_string(),
            gamma.iter().zip(&var).map(|(g, v)| (g / (v + eps).sqrt()).abs()).collect(),
        );
    }
    out
}

/// Output positions (H·W…) of every Conv, from the input shapes in `stats`; MACs of a Conv are this times its
/// weight count, of a Gemm its weight count (batch 1).
pub fn conv_positions(model: &Model, stats: &ChannelStats) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for n in model.graph.nodes.iter().filter(|n| n.op() == "Conv") {
        let Some(shape) = stats.get(&n.input[0]).map(|c| c.shape.clone()) else { continue };
        let Some(w) = n.input.get(1).and_then(|w| model.graph.initializer(w)) else { continue };
        let k: Vec<usize> = w.dims.iter().skip(2).map(|&d| d as usize).collect();
        if shape.len() != k.len() + 2 {
            continue;
        }
        let r = k.len();
        let attr = |name: &str, def: usize, len: usize| -> Vec<usize> {
            n.attr_ints(name).map(|v| v.iter().map(|&x| x.max(0) as usize).collect()).unwrap_or(vec![def; len])
        };
        let (strides, dil, pads) = (attr("strides", 1, r), attr("dilations", 1, r), attr("pads", 0, 2 * r));
        let auto = n.attr_s("auto_pad").unwrap_or("NOTSET");
        let mut pos = 1usize;
        for a in 0..r {
            let i = shape[2 + a];
            let s = strides.get(a).copied().unwrap_or(1).max(1);
            let eff = dil.get(a).copied().unwrap_or(1) * (k[a].saturating_sub(1)) + 1;
            let o = match auto {
                "SAME_UPPER" | "SAME_LOWER" => i.div_ceil(s),
                "VALID" => (i.saturating_sub(eff)) / s + 1,
                _ => {
                    let padded = i + pads.get(a).copied().unwrap_or(0) + pads.get(a + r).copied().unwrap_or(0);
                    padded.saturating_sub(eff) / s + 1
                }
            };
            pos *= o;
        }
        out.insert(n.name().to_string(), pos);
    }
    out
}

/// (MACs, weights, nonzero weights) of each Conv/Gemm/MatMul layer, by node name.
pub fn layer_costs(model: &Model, positions: &HashMap<String, usize>) -> BTreeMap<String, (u64, u64, u64)> {
    let mut out = BTreeMap::new();
    for l in magnitude::layers(model) {
        let Ok((_, w)) = channels::weights(model, l.index) else { continue };
        let nz = w.iter().filter(|x| **x != 0.0).count() as u64;
        let pos = positions.get(&l.node).copied().unwrap_or(1) as u64;
        out.insert(l.node, (pos * w.len() as u64, w.len() as u64, nz));
    }
    out
}

pub fn total_macs(model: &Model, positions: &HashMap<String, usize>) -> u64 {
    layer_costs(model, positions).values().map(|c| c.0).sum()
}

/// The CPU kernels' f32 output-channel tile: a block's width is padded to this many lanes.
pub const KERNEL_TILE: usize = 16;

/// MACs as the CPU kernels do them: each Conv/Gemm's output channels padded to [`KERNEL_TILE`] (removing 3 of 40
/// channels saves nothing in the producer, 8 of 40 saves a tile). What a structured plan weighs its steps by.
pub fn kernel_macs(model: &Model, positions: &HashMap<String, usize>) -> u64 {
    let mut total = 0u64;
    for l in magnitude::layers(model) {
        let Ok((dims, w)) = channels::weights(model, l.index) else { continue };
        let out = channels::output_channels(&model.graph.nodes[l.index], &dims).max(1);
        let padded = out.div_ceil(KERNEL_TILE) * KERNEL_TILE;
        let pos = positions.get(&l.node).copied().unwrap_or(1) as u64;
        total += pos * (w.len() / out * padded) as u64;
    }
    total
}

/// Everything a pruning pass needs besides the amounts: the prepared graph, its groups, statistics.
pub struct Pruner<'a> {
    pub model: &'a Model,
    pub method: Method,
    pub groups: Groups,
    pub stats: Option<&'a ChannelStats>,
    /// Bias correction from the statistics.
    pub repair: bool,
    /// Channel importance per group (structured), computed once.
    importance: BTreeMap<usize, Vec<f64>>,
}

/// Amounts by knob: group name (structured) or layer node name (unstructured) → fraction removed.
pub type Settings = BTreeMap<String, f64>;

impl<'a> Pruner<'a> {
    pub fn new(
        model: &'a Model,
        method: Method,
        stats: Option<&'a ChannelStats>,
        bn_scales: &'a HashMap<String, Vec<f32>>,
        repair: bool,
    ) -> Result<Pruner<'a>, PruneError> {
        let groups = Groups::analyze(model);
        let mut importance = BTreeMap::new();
        if let Method::Structured { criterion, .. } = method {
            for (gi, _) in groups.prunable() {
                importance.insert(gi, groups.importance(model, gi, criterion, stats, bn_scales)?);
            }
        }
        Ok(Pruner { model, method, groups, stats, repair, importance })
    }

    /// The knobs a plan can turn: prunable groups or weight layers.
    pub fn knobs(&self) -> Vec<String> {
        match self.method {
            Method::Structured { .. } => self.groups.prunable().map(|(_, g)| g.name.clone()).collect(),
            Method::Unstructured { .. } => magnitude::layers(self.model).into_iter().map(|l| l.node).collect(),
        }
    }

    /// Every knob at `amount` (unstructured global scope: one threshold giving that overall sparsity).
    pub fn uniform(&self, amount: f64) -> Result<Settings, PruneError> {
        match self.method {
            Method::Unstructured { scope: Scope::Global } => magnitude::global_targets(self.model, amount),
            _ => Ok(self.knobs().into_iter().map(|k| (k, amount)).collect()),
        }
    }

    pub fn build(&self, settings: &Settings) -> Result<Model, PruneError> {
        let stats = if self.repair { self.stats } else { None };
        match self.method {
            Method::Unstructured { .. } => magnitude::prune(self.model, settings, stats),
            Method::Structured { multiple, .. } => {
                let mut remove = BTreeMap::new();
                for (name, &r) in settings {
                    let gi =
                        self.groups.by_name(name).ok_or_else(|| PruneError::Invalid(format!("no group `{name}`")))?;
                    let Some(score) = self.importance.get(&gi) else { continue };
                    let keep = channels::kept_channels(score.len(), r, multiple);
                    remove.insert(gi, channels::lowest(score, keep));
                }
                self.groups.prune(self.model, &remove, stats)
            }
        }
    }
}

pub struct Job<'a> {
    /// The fp32 model as given (any opset).
    pub model: &'a Model,
    pub model_name: String,
    pub output_name: String,
    pub method: Method,
    pub target: Target,
    /// Samples for statistics (bias correction, the contribution criterion, shapes).
    pub calib: Samples<'a>,
    pub held_out: Option<Samples<'a>>,
    pub pre: Option<&'a ImagePreprocess>,
    pub repair: bool,
    /// Amounts tried per knob by the sensitivity scan.
    pub levels: Vec<f64>,
    pub sensitivity_samples: usize,
    /// Uniform amounts evaluated on the held-out samples for the report's accuracy curve.
    pub curve: Vec<f64>,
    pub latency_runs: usize,
    /// Rounds of freshly built sessions the latency pairs are spread over ([`LATENCY_REPLICAS`] by default).
    pub latency_replicas: usize,
    pub session: SessionOptions,
    pub held_out_max_bytes: usize,
}

pub use crate::pipeline::Event;

/// Rounds of the latency measurement by default, each with freshly built sessions
/// ([`fidelity::replicated_latency_ms`]): with 32, the interval is the 10th to 23rd replica median (98.0 %), which
/// a few unlucky session layouts cannot move, where 6 replicas give the extremes. (On EfficientNet-Lite0's 1 pt
/// plan, session layouts alone spread replica medians over about ±2 %; 16 replicas left an interval that crossed
/// 1 in one run of two.)
pub const LATENCY_REPLICAS: usize = 32;

/// Runs the job: returns the pruned model and its report.
pub fn run(job: &Job, on: &mut dyn FnMut(Event)) -> Result<(Model, report::PruneReport), CalibError> {
    let t0 = Instant::now();
    let mut warnings = Vec::new();
    let prep = prepare(job.model)?;
    let model = &prep.model;
    let fp32 = Session::from_model(model, &job.session)
        .map_err(|e| CalibError::Unsupported(format!("the fp32 model does not run on the CPU backend: {e}")))?;

    // Statistics: inputs of every Conv/Gemm (means for repair, |x| for the contribution criterion, shapes).
    let mut values: Vec<String> = Vec::new();
    for n in model.graph.nodes.iter().filter(|n| matches!(n.op(), "Conv" | "Gemm")) {
        if !values.contains(&n.input[0]) && model.graph.initializer(&n.input[0]).is_none() {
            values.push(n.input[0].clone());
        }
    }
    on(Event::Stage("statistics", job.calib.range.len()));
    let st = ChannelStats::collect(&fp32, job.calib.data, job.calib.range.clone(), job.pre, &values, |d, _| {
        on(Event::Step(d))
    })?;
    let positions = conv_positions(model, &st);
    let pruner = Pruner::new(model, job.method, Some(&st), &prep.bn_scales, job.repair)?;
    if pruner.knobs().is_empty() {
        return Err(CalibError::Unsupported(match job.method {
            Method::Structured { .. } => {
                let why: Vec<String> = pruner
                    .groups
                    .groups
                    .iter()
                    .map(|g| format!("{}: {}", g.name, g.blocked.as_deref().unwrap_or("fewer than 2 channels")))
                    .collect();
                format!("no channel group can be pruned ({})", why.join("; "))
            }
            Method::Unstructured { .. } => "no Conv/Gemm/MatMul with float32 constant weights".into(),
        }));
    }

    let (held, held_src) = crate::pipeline::build_held_out(
        &fp32,
        &job.calib,
        job.held_out.as_ref(),
        job.pre,
        job.held_out_max_bytes,
        ("accuracy", "statistics"),
        &mut warnings,
        on,
    )?;
    if let Target::Budget(b) = &job.target
        && let Some(why) = b.unusable(&held)
    {
        return Err(CalibError::Invalid(format!("budget {b}: {why}")));
    }
    let saving = |m: &Model| -> f64 {
        if job.method.structured() {
            kernel_macs(m, &positions) as f64
        } else {
            layer_costs(m, &positions).values().map(|c| c.2 as f64).sum()
        }
    };

    // Sensitivity scan (always for a budget; else only when asked by levels).
    let knobs = pruner.knobs();
    let mut scan: Vec<plan::KnobScan> = Vec::new();
    let want_scan =
        matches!(job.target, Target::Budget(_)) && !matches!(job.method, Method::Unstructured { scope: Scope::Global });
    if want_scan || !job.levels.is_empty() && matches!(job.target, Target::Budget(_)) {
        on(Event::Stage("sensitivity", knobs.len() * job.levels.len()));
        scan = plan::scan(&pruner, &knobs, &job.levels, &held, job.sensitivity_samples, &job.session, &saving, |d| {
            on(Event::Step(d))
        })?;
    }

    // The pruned model.
    let (settings, outcome) = match job.target {
        Target::Amount(a) => (pruner.uniform(a)?, None),
        Target::Budget(b) => {
            on(Event::Stage("plan", 0));
            let steps = if matches!(job.method, Method::Unstructured { scope: Scope::Global }) {
                plan::global_steps(&pruner, &job.levels)?
            } else {
                plan::order_steps(&scan)
            };
            let r = plan::search(&pruner, &steps, &held, b, &job.session, &saving, |p| {
                on(Event::Note(format!(
                    "  {} step(s): {:.3} ({}), {:.1} % of the fp32 {}",
                    p.steps,
                    p.value,
                    if p.met { "meets the budget" } else { "misses" },
                    100.0 * p.remaining,
                    if job.method.structured() { "MACs" } else { "nonzero weights" }
                )))
            })?;
            if !r.met {
                warnings.push(format!("budget {b} not met even with nothing pruned; the fp32 model was written"));
            }
            (r.settings.clone(), Some(r))
        }
    };
    let pruned = pruner.build(&settings)?;
    let ps = Session::from_model(&pruned, &job.session)?;
    on(Event::Stage("evaluate", held.len()));
    let metrics = held.evaluate(&ps, None, |d, _| on(Event::Step(d)))?;
    if let Some(w) = fidelity::collapse(&held.fp32, &metrics) {
        warnings.push(w);
    }

    // Accuracy curve over uniform amounts.
    on(Event::Stage("curve", job.curve.len()));
    let mut curve = Vec::new();
    let fp32_macs = total_macs(model, &positions).max(1) as f64;
    for (i, &a) in job.curve.iter().enumerate() {
        let m = pruner.build(&pruner.uniform(a)?)?;
        let s = Session::from_model(&m, &job.session)?;
        let mt = held.evaluate(&s, None, |_, _| {})?;
        curve.push(report::CurvePoint {
            amount: a,
            sparsity: magnitude::sparsity(&m),
            macs_ratio: total_macs(&m, &positions) as f64 / fp32_macs,
            zstd_bytes: edgepack_runtime::compress::zstd_compress(&m.to_bytes()).len(),
            metrics: mt,
        });
        on(Event::Step(i + 1));
    }

    // Latency: interleaved pairs (both models see the same machine state) in replicas that rebuild both sessions,
    // over a few held-out inputs.
    let latency = if job.latency_runs > 0 {
        let replicas = job.latency_replicas.clamp(1, job.latency_runs);
        on(Event::Stage("latency", job.latency_runs.div_ceil(replicas) * replicas));
        let inputs: Vec<_> = (0..held.len().min(8)).map(|k| held.input(k)).collect();
        let l = fidelity::replicated_latency_ms(
            || Ok(Session::from_model(model, &job.session)?),
            || Ok(Session::from_model(&pruned, &job.session)?),
            &inputs,
            replicas,
            job.latency_runs,
            |d| on(Event::Step(d)),
        )?;
        Some(report::PruneLatency {
            fp32_ms: l.a_ms,
            pruned_ms: l.b_ms,
            ratio: l.ratio,
            ratio_ci: l.ratio_ci,
            ci_level: l.ci_level,
            replica_ratios: l.replica_ratios,
            runs: l.pairs,
            threads: ps.backend_info().threads.unwrap_or(job.session.threads),
            backend: ps.backend_description(),
        })
    } else {
        None
    };

    let rep = report::PruneReport::assemble(report::Parts {
        job,
        prep: &prep,
        pruner: &pruner,
        pruned: &pruned,
        positions: &positions,
        settings: &settings,
        held: &held,
        held_source: held_src,
        metrics,
        scan,
        outcome,
        curve,
        latency,
        warnings,
        seconds: t0.elapsed().as_secs_f64(),
    });
    Ok((pruned, rep))
}

#[cfg(test)]
mod tests;
