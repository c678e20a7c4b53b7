//! Accuracy gating: per-layer sensitivity and automatic mixed precision.
//!
//! 1. Sensitivity: for each quantizable node, quantize that node alone (every other one stays fp32) and measure
//!    the SQNR of the model output against fp32 on held-out samples. Low SQNR = sensitive.
//! 2. Search: keep the k most sensitive nodes in fp32, for the smallest k that meets the budget on the held-out
//!    samples: k = 0, then 1, 2, 4... until met, then bisection between the last miss and the first hit. The
//!    number of float nodes is capped; when even the cap misses, the best candidate seen is kept and reported.
use std::collections::{HashMap, HashSet};

use edgepack_runtime::onnx::{Model, NodeExt, NodeProto, TensorProto};
use edgepack_runtime::{Session, SessionOptions};

use crate::calib::CalibError;
use crate::fidelity::{HeldOut, Metrics};
use crate::qdq::{self, QdqConfig, QdqSummary, Range};

/// What "accurate enough" means, checked on the held-out samples.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "kebab-case")]
pub enum Budget {
    /// fp32 top-1 minus INT8 top-1 at most this many points (needs labels).
    Top1Drop(f64),
    /// INT8 top-1 equal to fp32's on at least this % of samples (classification outputs).
    Agreement(f64),
    /// Output SQNR against fp32 at least this many dB, every output (any model).
    Sqnr(f64),
    /// Every output either has an SQNR of at least `db` or a cosine similarity of at least `cosine` with fp32.
    Fidelity { db: f64, cosine: f64 },
    /// Detectors (a YOLO head): at least this % of fp32's detections found again (same class, IoU ≥ 0.5).
    Detections(f64),
    /// The default gate, decided by the model's output once the held-out samples are known ([`Budget::resolve`]):
    /// classifiers keep [`DEFAULT_AGREEMENT`] % top-1 agreement, detectors [`DEFAULT_DETECTIONS`] % of the fp32
    /// detections, other models [`DEFAULT_FIDELITY`].
    Default,
}

/// The default gate's figures, tuned on the shared models (QUANTIZATION.md, "Safe by default").
pub const DEFAULT_AGREEMENT: f64 = 97.0;
pub const DEFAULT_DETECTIONS: f64 = 97.0;
pub const DEFAULT_FIDELITY: Budget = Budget::Fidelity { db: 30.0, cosine: 0.999 };

impl std::str::FromStr for Budget {
    type Err = String;
    fn from_str(s: &str) -> Result<Budget, String> {
        match s.trim() {
            "default" => return Ok(Budget::Default),
            "fidelity" => return Ok(DEFAULT_FIDELITY),
            _ => {}
        }
        let (k, v) = s.split_once('=').ok_or_else(|| format!("budget `{s}`: expected KIND=VALUE"))?;
        if k.trim() == "fidelity" {
            let (db, cos) = v.split_once(',').unwrap_or((v, "0.999"));
            let num = |x: &str| x.trim().parse::<f64>().ok().filter(|v| v.is_finite());
            return match (num(db), num(cos)) {
                (Some(db), Some(cosine)) if (-1.0..=1.0).contains(&cosine) => Ok(Budget::Fidelity { db, cosine }),
                _ => Err(format!("budget `{s}`: expected fidelity=DB or fidelity=DB,COSINE (cosine in [-1, 1])")),
            };
        }
        let v: f64 = v.trim().parse().map_err(|_| format!("budget `{s}`: `{v}` is not a number"))?;
        if !v.is_finite() {
            return Err(format!("budget `{s}`: not a finite number"));
        }
        match k.trim() {
            "top1-drop" if v >= 0.0 => Ok(Budget::Top1Drop(v)),
            "agreement" if (0.0..=100.0).contains(&v) => Ok(Budget::Agreement(v)),
            "sqnr" => Ok(Budget::Sqnr(v)),
            "detections" if (0.0..=100.0).contains(&v) => Ok(Budget::Detections(v)),
            "top1-drop" | "agreement" | "detections" => Err(format!("budget `{s}`: value out of range")),
            other => Err(format!(
                "unknown budget `{other}` (default, none, top1-drop=PT, agreement=PCT, sqnr=DB, fidelity=DB,COSINE, \
                 detections=PCT)"
            )),
        }
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::Top1Drop(v) => write!(f, "top-1 drop ≤ {v} pt"),
            Budget::Agreement(v) => write!(f, "top-1 agreement ≥ {v} %"),
            Budget::Sqnr(v) => write!(f, "output SQNR ≥ {v} dB"),
            Budget::Fidelity { db, cosine } => write!(f, "every output SQNR ≥ {db} dB or cosine ≥ {cosine}"),
            Budget::Detections(v) => write!(f, "fp32 detections found ≥ {v} %"),
            Budget::Default => write!(f, "the default gate"),
        }
    }
}

impl Budget {
    /// The concrete gate: [`Budget::Default`] becomes top-1 agreement on classifiers, [`DEFAULT_FIDELITY`] on
    /// other models; any other budget is itself.
    pub fn resolve(self, held: &HeldOut) -> Budget {
        match self {
            Budget::Default if held.has_detector() => Budget::Detections(DEFAULT_DETECTIONS),
            Budget::Default if held.is_classification() => Budget::Agreement(DEFAULT_AGREEMENT),
            Budget::Default => DEFAULT_FIDELITY,
            b => b,
        }
    }

    /// Why the budget cannot be checked on these samples, if it cannot.
    pub fn unusable(&self, held: &HeldOut) -> Option<String> {
        match self {
            Budget::Top1Drop(_) if !held.is_classification() => {
                Some("top1-drop needs a classification output ([N, classes], other dims 1)".into())
            }
            Budget::Top1Drop(_) if !held.labelled() => {
                Some("top1-drop needs labelled held-out samples (labels.csv, class folders or IDX labels)".into())
            }
            Budget::Agreement(_) if !held.is_classification() => {
                Some("agreement needs a classification output ([N, classes], other dims 1); use sqnr=DB".into())
            }
            Budget::Detections(_) if !held.has_detector() => Some(
                "detections needs a detection head: a bundle packed with YOLO post-processing, or an Ultralytics \
                 export"
                    .into(),
            ),
            _ if held.is_empty() => Some("no held-out samples".into()),
            _ => None,
        }
    }

    /// The budget's metric for `q` (drop in points, agreement in %, SQNR in dB; identical = +∞ dB).
    pub fn value(&self, fp32: &Metrics, q: &Metrics) -> f64 {
        match self {
            Budget::Top1Drop(_) => fp32.top1.unwrap_or(0.0) - q.top1.unwrap_or(0.0),
            Budget::Agreement(_) => q.top1_agreement.unwrap_or(0.0),
            Budget::Sqnr(_) => q.worst_output_sqnr_db().unwrap_or(f64::INFINITY),
            // The worst output's SQNR, or the SQNR its cosine stands for when that is higher: the cosine
            // threshold sits at `db`, and every tenfold less 1 − cosine is 10 dB more.
            Budget::Fidelity { db, cosine } => q
                .outputs
                .iter()
                .map(|o| {
                    let by_cos = if o.cosine >= 1.0 {
                        f64::INFINITY
                    } else {
                        db + 10.0 * ((1.0 - cosine) / (1.0 - o.cosine)).log10()
                    };
                    o.sqnr_db.unwrap_or(f64::INFINITY).max(by_cos)
                })
                .fold(f64::INFINITY, f64::min),
            Budget::Detections(_) => q.detections.map_or(0.0, |d| d.pct()),
            Budget::Default => f64::NAN,
        }
    }

    pub fn met(&self, value: f64) -> bool {
        match *self {
            Budget::Top1Drop(b) => value <= b + 1e-9,
            Budget::Agreement(b) | Budget::Detections(b) => value >= b - 1e-9,
            Budget::Sqnr(b) | Budget::Fidelity { db: b, .. } => value >= b,
            Budget::Default => false,
        }
    }

    /// Whether metric value `a` is closer to meeting the budget than `b`.
    pub fn better(&self, a: f64, b: f64) -> bool {
        match self {
            Budget::Top1Drop(_) => a < b,
            _ => a > b,
        }
    }
}

/// Output SQNR when one node alone is quantized.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sensitivity {
    pub node: String,
    pub op: String,
    /// dB; `null` = the output did not change.
    pub output_sqnr_db: Option<f64>,
    /// Classifiers: mean KL divergence of the class distribution from fp32's, nats (exact method only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_kl: Option<f64>,
}

fn quantize_excluding(
    model: &Model,
    ranges: &HashMap<String, Range>,
    cfg: &QdqConfig,
    extra: &[String],
) -> Result<(Model, QdqSummary), CalibError> {
    let mut c = cfg.clone();
    // In narrow weight-only quantization the fallback of a sensitive layer is wider weights, not fp32.
    if c.weight_only.is_some_and(|w| w.narrow()) {
        c.wider.extend(extra.iter().cloned());
    } else {
        c.exclude.extend(extra.iter().cloned());
    }
    qdq::quantize(model, ranges, &c).map_err(|e| CalibError::Invalid(e.to_string()))
}

/// Sensitivity of every quantizable node (most sensitive first), each measured on the first `samples` held-out
/// samples. `progress(done, total)` after each node.
pub fn sensitivity(
    model: &Model,
    ranges: &HashMap<String, Range>,
    cfg: &QdqConfig,
    opts: &SessionOptions,
    held: &HeldOut,
    samples: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Sensitivity>, CalibError> {
    let units = qdq::quantizable_nodes(model, cfg);
    let mut out = Vec::with_capacity(units.len());
    for (i, (name, op)) in units.iter().enumerate() {
        // The layer alone: the others stay float in every mode (a weight-only search's fallback width would
        // add the others' noise to every measure, and the coded grid's rate allocation reads these as each
        // layer's own noise).
        let mut alone = cfg.clone();
        alone.exclude.extend(units.iter().filter(|(n, _)| n != name).map(|(n, _)| n.clone()));
        let (m, _) = qdq::quantize(model, ranges, &alone).map_err(|e| CalibError::Invalid(e.to_string()))?;
        let s = Session::from_model(&m, opts)?;
        let metrics = held.evaluate(&s, Some(samples), |_, _| {})?;
        out.push(Sensitivity {
            node: name.clone(),
            op: op.clone(),
            output_sqnr_db: metrics.output_sqnr_db,
            class_kl: metrics.class_kl,
        });
        progress(i + 1, units.len());
    }
    // Classifiers: what moves the class distribution most first (agreement follows it; the logits' SQNR counts
    // changes no answer depends on). Other models: the lowest output SQNR first.
    if out.iter().all(|s| s.class_kl.is_some()) {
        out.sort_by(|a, b| b.class_kl.unwrap_or(0.0).total_cmp(&a.class_kl.unwrap_or(0.0)));
    } else {
        sort_by_sqnr(&mut out);
    }
    Ok(out)
}

/// Most sensitive first: the lowest SQNR (an unchanged output, `None`, last).
fn sort_by_sqnr(v: &mut [Sensitivity]) {
    v.sort_by(|a, b| a.output_sqnr_db.unwrap_or(f64::INFINITY).total_cmp(&b.output_sqnr_db.unwrap_or(f64::INFINITY)));
}

/// How the per-layer sensitivities were measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SensitivityMethod {
    /// The model's output SQNR with the layer alone quantized: one pass of the model per layer.
    Exact,
    /// The layer's own output SQNR with its inputs and weights quantized and everything before it in fp32: every
    /// layer in one pass ([`local_sensitivity`]).
    Local,
}

impl SensitivityMethod {
    pub fn describe(self) -> &'static str {
        match self {
            SensitivityMethod::Exact => {
                "model output SQNR with the layer alone quantized (one pass per layer; classifiers are ranked by the \
                 KL divergence of their class distribution)"
            }
            SensitivityMethod::Local => {
                "the layer's own output SQNR with only its inputs and weights quantized (all layers in one pass)"
            }
        }
    }
}

/// A probe graph for [`local_sensitivity`]: the fp32 `model` plus, for every unit of `full` (the QDQ model with
/// every unit quantized), a copy of that node reading quantize-dequantized fp32 values and its int8 weights. Returns
/// the graph and, per unit, (its fp32 output, its copy's output).
pub fn local_probe_graph(
    model: &Model,
    full: &Model,
    units: &[(String, String)],
) -> Result<(Model, Vec<(String, String)>), CalibError> {
    let mut g = model.clone();
    let mut taken: HashSet<String> = HashSet::new();
    for n in &g.graph.nodes {
        taken.insert(n.name().to_string());
        taken.extend(n.output.iter().cloned());
    }
    taken.extend(g.graph.inputs.iter().filter_map(|v| v.name.clone()));
    taken.extend(g.graph.initializers.iter().filter_map(|t| t.name.clone()));
    let mut fresh = |base: String| -> String {
        let name = if taken.contains(&base) {
            (1..).map(|i| format!("{base}_{i}")).find(|c| !taken.contains(c)).unwrap()
        } else {
            base
        };
        taken.insert(name.clone());
        name
    };
    let producer: HashMap<&str, &NodeProto> =
        full.graph.nodes.iter().flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n))).collect();
    let full_inits: HashMap<&str, &TensorProto> = full.graph.initializers_by_name();
    let have: HashSet<String> = g.graph.initializers.iter().filter_map(|t| t.name.clone()).collect();
    let mut copied: HashSet<String> = HashSet::new();
    let mut copy_init = |g: &mut Model, name: &str| {
        if !have.contains(name)
            && copied.insert(name.to_string())
            && let Some(t) = full_inits.get(name)
        {
            g.graph.initializers.push((*t).clone());
        }
    };
    // One local QDQ pair per fp32 activation, shared by the copies that read it.
    let mut local_dq: HashMap<String, String> = HashMap::new();
    let mut probes = Vec::new();
    for (unit, _) in units {
        let Some(nq) = full.graph.nodes.iter().find(|n| n.name() == unit) else { continue };
        let Some(out) = nq.output.first().filter(|o| !o.is_empty()) else { continue };
        let mut copy = nq.clone();
        for k in 0..copy.input.len() {
            let x = copy.input[k].clone();
            let Some(dq) = producer.get(x.as_str()).filter(|p| p.op() == "DequantizeLinear") else { continue };
            let src = dq.input.first().cloned().unwrap_or_default();
            if full_inits.contains_key(src.as_str()) {
                // Weights or bias: the same int8 initializers, dequantized by a copy of their node.
                for i in dq.real_inputs() {
                    copy_init(&mut g, i);
                }
                let name = fresh(format!("{x}__alone"));
                let mut d = (*dq).clone();
                d.name = Some(fresh(format!("{}__alone", dq.name())));
                d.output = vec![name.clone()];
                g.graph.nodes.push(d);
                copy.input[k] = name;
            } else if let Some(q) = producer.get(src.as_str()).filter(|p| p.op() == "QuantizeLinear") {
                // An activation: quantize-dequantize the fp32 value with the calibrated scale and zero point.
                let a = q.input[0].clone();
                let name = match local_dq.get(&a) {
                    Some(n) => n.clone(),
                    None => {
                        for i in q.real_inputs().into_iter().skip(1) {
                            copy_init(&mut g, i);
                        }
                        let (qn, dn) = (fresh(format!("{a}__alone_q")), fresh(format!("{a}__alone_dq")));
                        let mut qc = (*q).clone();
                        qc.name = Some(fresh(format!("{qn}_node")));
                        qc.output = vec![qn.clone()];
                        let mut dc = (*dq).clone();
                        dc.name = Some(fresh(format!("{dn}_node")));
                        dc.input[0] = qn;
                        dc.output = vec![dn.clone()];
                        g.graph.nodes.push(qc);
                        g.graph.nodes.push(dc);
                        local_dq.insert(a, dn.clone());
                        dn
                    }
                };
                copy.input[k] = name;
            }
        }
        copy.name = Some(fresh(format!("{unit}__alone")));
        let outs: Vec<String> =
            copy.output.iter().map(|o| if o.is_empty() { o.clone() } else { fresh(format!("{o}__alone")) }).collect();
        probes.push((out.clone(), outs[0].clone()));
        copy.output = outs;
        g.graph.nodes.push(copy);
    }
    g.graph.topo_sort().map_err(|e| CalibError::Invalid(format!("sensitivity probe graph: {e}")))?;
    Ok((g, probes))
}

/// Sensitivity of every unit in one pass per sample ([`SensitivityMethod::Local`]): each layer's own output SQNR
/// when it alone is quantized, read from [`local_probe_graph`] on the first `samples` held-out samples. The values
/// are fetched in chunks that keep at most `max_bytes` of tensors alive. Most sensitive first.
#[allow(clippy::too_many_arguments)]
pub fn local_sensitivity(
    model: &Model,
    full: &Model,
    units: &[(String, String)],
    opts: &SessionOptions,
    held: &HeldOut,
    samples: usize,
    max_bytes: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Sensitivity>, CalibError> {
    let (g, probes) = local_probe_graph(model, full, units)?;
    let s = Session::from_model(&g, opts)?;
    let n = samples.min(held.len()).max(1).min(held.len());
    let mut acc = vec![(0f64, 0f64); probes.len()];
    let mut chunk = 8usize.min(probes.len()).max(1);
    let total = n * probes.len();
    let mut done = 0;
    for k in 0..n {
        let mut at = 0;
        while at < probes.len() {
            let end = (at + chunk).min(probes.len());
            let names: Vec<&str> = probes[at..end].iter().flat_map(|(a, b)| [a.as_str(), b.as_str()]).collect();
            let vals = s.run_values(held.input(k), &names)?;
            let mut bytes = 0usize;
            for (i, pair) in vals.chunks(2).enumerate() {
                let (a, b) = (pair[0].1.to_f32_vec(), pair[1].1.to_f32_vec());
                bytes += 4 * (a.len() + b.len());
                crate::fidelity::add_error(&mut acc[at + i], &a, &b);
            }
            done += end - at;
            progress(done, total);
            // Size the next chunk from what this one weighed.
            let per = bytes / (end - at).max(1);
            chunk = (max_bytes / per.max(1)).clamp(1, 4096);
            at = end;
        }
    }
    let by_node: HashMap<&str, &str> = units.iter().map(|(n, o)| (n.as_str(), o.as_str())).collect();
    let mut out: Vec<Sensitivity> = units
        .iter()
        .filter_map(|(name, _)| {
            let out = full.graph.nodes.iter().find(|n| n.name() == name)?.output.first()?;
            let i = probes.iter().position(|(a, _)| a == out)?;
            Some(Sensitivity {
                node: name.clone(),
                op: by_node[name.as_str()].to_string(),
                output_sqnr_db: crate::fidelity::sqnr_db(acc[i].0, acc[i].1),
                class_kl: None,
            })
        })
        .collect();
    sort_by_sqnr(&mut out);
    Ok(out)
}

/// One candidate of the search.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Probe {
    /// How many of the most sensitive nodes were kept in fp32.
    pub float_nodes: usize,
    pub metrics: Metrics,
    /// The budget's metric (see [`Budget::value`]).
    pub value: f64,
    pub met: bool,
}

pub struct SearchResult {
    pub model: Model,
    pub summary: QdqSummary,
    /// The nodes kept in fp32 by the search (most sensitive first).
    pub float_nodes: Vec<String>,
    pub probes: Vec<Probe>,
    pub met: bool,
    /// The chosen candidate's metrics.
    pub metrics: Metrics,
}

/// Finds the fewest nodes of `order` (most sensitive first) to keep in fp32 so that `budget` holds on `held`,
/// keeping at most `max_float` of them. `first` is the already measured all-INT8 candidate (k = 0); `on_probe`
/// sees each new candidate as it is measured.
#[allow(clippy::too_many_arguments)]
pub fn search(
    model: &Model,
    ranges: &HashMap<String, Range>,
    cfg: &QdqConfig,
    opts: &SessionOptions,
    held: &HeldOut,
    budget: Budget,
    order: &[String],
    max_float: usize,
    first: Probe,
    mut on_probe: impl FnMut(&Probe),
) -> Result<SearchResult, CalibError> {
    let max_float = max_float.min(order.len());
    let mut probes: Vec<Probe> = vec![Probe { float_nodes: 0, met: budget.met(first.value), ..first }];
    let mut eval = |k: usize, probes: &mut Vec<Probe>| -> Result<bool, CalibError> {
        if let Some(p) = probes.iter().find(|p| p.float_nodes == k) {
            return Ok(p.met);
        }
        let (m, _) = quantize_excluding(model, ranges, cfg, &order[..k])?;
        let s = Session::from_model(&m, opts)?;
        let metrics = held.evaluate(&s, None, |_, _| {})?;
        let value = budget.value(&held.fp32, &metrics);
        let p = Probe { float_nodes: k, metrics, value, met: budget.met(value) };
        on_probe(&p);
        probes.push(p);
        Ok(budget.met(value))
    };
    // Doubling, then bisection on (last miss, first hit].
    let mut chosen = None;
    let (mut miss, mut k) = (None::<usize>, 0usize);
    loop {
        if eval(k, &mut probes)? {
            chosen = Some(k);
            break;
        }
        miss = Some(k);
        if k >= max_float {
            break;
        }
        k = if k == 0 { 1 } else { (k * 2).min(max_float) };
    }
    if let (Some(mut hit), Some(mut lo)) = (chosen, miss) {
        while hit - lo > 1 {
            let mid = lo + (hit - lo) / 2;
            if eval(mid, &mut probes)? { hit = mid } else { lo = mid }
        }
        chosen = Some(hit);
    }
    let met = chosen.is_some();
    let k = chosen.unwrap_or_else(|| {
        // Not met within the cap: the best candidate seen (fewest float nodes among equals).
        probes.iter().fold(&probes[0], |b, p| if budget.better(p.value, b.value) { p } else { b }).float_nodes
    });
    let metrics = probes.iter().find(|p| p.float_nodes == k).map(|p| p.metrics.clone()).unwrap_or_default();
    let (model, summary) = quantize_excluding(model, ranges, cfg, &order[..k])?;
    probes.sort_by_key(|p| p.float_nodes);
    Ok(SearchResult { model, summary, float_nodes: order[..k].to_vec(), probes, met, metrics })
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgepack_runtime::Tensor;
    use edgepack_runtime::onnx::builder::{attr_int, model, tensor_f32, value_info};
    use edgepack_runtime::onnx::{Dim, node};

    /// `x[2,4] -> Gemm -> Relu -> Gemm -> Add(·, x') -> y`: three units, the second Gemm reading the first's output.
    fn two_layers() -> Model {
        let w1: Vec<f32> = (0..16).map(|i| ((i * 7) % 11) as f32 / 5.0 - 1.0).collect();
        let w2: Vec<f32> = (0..16).map(|i| ((i * 5) % 13) as f32 / 6.0 - 1.0).collect();
        model(
            vec![
                node("Gemm", "fc1", &["x", "W1", "b1"], &["h"], vec![attr_int("transB", 1)]),
                node("Relu", "relu", &["h"], &["r"], vec![]),
                node("Gemm", "fc2", &["r", "W2", "b2"], &["z"], vec![attr_int("transB", 1)]),
                node("Add", "add", &["z", "x"], &["y"], vec![]),
            ],
            vec![value_info("x", 1, &[Dim::Fixed(2), Dim::Fixed(4)])],
            vec![value_info("y", 1, &[Dim::Fixed(2), Dim::Fixed(4)])],
            vec![
                tensor_f32("W1", &[4, 4], &w1),
                tensor_f32("b1", &[4], &[0.1, -0.2, 0.3, 0.0]),
                tensor_f32("W2", &[4, 4], &w2),
                tensor_f32("b2", &[4], &[0.0, 0.2, -0.1, 0.05]),
            ],
        )
    }

    #[test]
    fn each_local_copy_is_its_unit_quantized_alone() {
        let m = two_layers();
        let r = |min, max| Range { min, max };
        let ranges: HashMap<String, Range> =
            [("x", r(-1.0, 1.0)), ("r", r(0.0, 3.0)), ("z", r(-4.0, 4.0))].map(|(k, v)| (k.to_string(), v)).into();
        let cfg = QdqConfig::default();
        let units = qdq::quantizable_nodes(&m, &cfg);
        assert_eq!(units.iter().map(|u| u.0.as_str()).collect::<Vec<_>>(), ["fc1", "fc2", "add"]);
        let (full, _) = qdq::quantize(&m, &ranges, &cfg).unwrap();
        let (g, probes) = local_probe_graph(&m, &full, &units).unwrap();
        assert_eq!(probes.len(), 3);
        let opts = SessionOptions { threads: 1, ..Default::default() };
        let x = Tensor::from_f32(vec![2, 4], vec![0.5, -0.25, 0.75, 1.0, -1.0, 0.1, 0.2, 0.3]).unwrap();
        let probe = Session::from_model(&g, &opts).unwrap();
        let fp32 = Session::from_model(&m, &opts).unwrap();
        for ((unit, _), (out, local)) in units.iter().zip(&probes) {
            let others: Vec<String> = units.iter().filter(|u| &u.0 != unit).map(|u| u.0.clone()).collect();
            let (alone, _) = quantize_excluding(&m, &ranges, &cfg, &others).unwrap();
            let alone = Session::from_model(&alone, &opts).unwrap();
            let want = alone.run_values(vec![("x".into(), x.clone())], &[out.as_str()]).unwrap();
            let got = probe.run_values(vec![("x".into(), x.clone())], &[local.as_str(), out.as_str()]).unwrap();
            let reference = fp32.run_values(vec![("x".into(), x.clone())], &[out.as_str()]).unwrap();
            let (w, l) = (want[0].1.to_f32_vec(), got[0].1.to_f32_vec());
            for (a, b) in w.iter().zip(&l) {
                assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{unit}: {w:?} vs {l:?}");
            }
            // The probe graph's own values stay fp32 (up to the kernels' rounding), and the quantized copy does
            // differ from them.
            let (f, r) = (got[1].1.to_f32_vec(), reference[0].1.to_f32_vec());
            assert!(f.iter().zip(&r).all(|(a, b)| (a - b).abs() <= 1e-5), "{unit}: {f:?} vs {r:?}");
            assert!(l.iter().zip(&r).any(|(a, b)| (a - b).abs() > 1e-3), "{unit}: {l:?} vs {r:?}");
        }
    }

    #[test]
    fn budgets_parse_and_compare() {
        assert_eq!("top1-drop=0.5".parse::<Budget>().unwrap(), Budget::Top1Drop(0.5));
        assert_eq!("agreement=99".parse::<Budget>().unwrap(), Budget::Agreement(99.0));
        assert_eq!("sqnr=30".parse::<Budget>().unwrap(), Budget::Sqnr(30.0));
        for bad in ["top1-drop", "agreement=101", "sqnr=x", "speed=2", "top1-drop=-1", "sqnr=inf"] {
            assert!(bad.parse::<Budget>().is_err(), "{bad}");
        }
        assert_eq!("default".parse::<Budget>().unwrap(), Budget::Default);
        assert_eq!("fidelity".parse::<Budget>().unwrap(), DEFAULT_FIDELITY);
        assert_eq!("fidelity=25,0.99".parse::<Budget>().unwrap(), Budget::Fidelity { db: 25.0, cosine: 0.99 });
        assert_eq!("fidelity=20".parse::<Budget>().unwrap(), Budget::Fidelity { db: 20.0, cosine: 0.999 });
        for bad in ["fidelity=x", "fidelity=30,2", "fidelity=30,"] {
            assert!(bad.parse::<Budget>().is_err(), "{bad}");
        }
        // Per output: the worst one counts, and a cosine at the threshold stands for the SQNR threshold.
        let out =
            |db: f64, cosine: f64| crate::fidelity::OutputFidelity { name: "o".into(), sqnr_db: Some(db), cosine };
        let q = Metrics { outputs: vec![out(40.0, 0.99999), out(22.0, 0.999)], ..Default::default() };
        let (f, fp32) = (DEFAULT_FIDELITY, Metrics::default());
        assert!((f.value(&fp32, &q) - 30.0).abs() < 1e-9 && f.met(f.value(&fp32, &q)));
        assert_eq!(Budget::Sqnr(30.0).value(&fp32, &q), 22.0);
        let q = Metrics { outputs: vec![out(40.0, 0.99999), out(22.0, 0.99)], ..Default::default() };
        assert!((f.value(&fp32, &q) - 22.0).abs() < 1e-9 && !f.met(f.value(&fp32, &q)));
        let fp32 = Metrics { top1: Some(80.0), ..Default::default() };
        let q =
            Metrics { top1: Some(79.6), top1_agreement: Some(98.0), output_sqnr_db: Some(25.0), ..Default::default() };
        let b = Budget::Top1Drop(0.5);
        assert!(b.met(b.value(&fp32, &q)));
        assert!(!Budget::Agreement(99.0).met(Budget::Agreement(99.0).value(&fp32, &q)));
        assert!(!Budget::Sqnr(30.0).met(25.0));
        assert!(Budget::Sqnr(30.0).met(Budget::Sqnr(30.0).value(&fp32, &Metrics::default())));
    }

    #[test]
    fn the_detection_gate_counts_fp32_detections_found_again() {
        use crate::fidelity::{DetectionMatch, match_detections};
        use edgepack_runtime::process::Detection;
        assert_eq!("detections=95".parse::<Budget>().unwrap(), Budget::Detections(95.0));
        assert!("detections=120".parse::<Budget>().is_err());
        let d = |class_index: usize, x: f32| Detection {
            class_index,
            label: None,
            score: 0.9,
            x1: x,
            y1: 0.0,
            x2: x + 10.0,
            y2: 10.0,
            mask: None,
            keypoints: None,
        };
        // fp32: three boxes. Found again: the first (shifted 1 px, IoU 0.82), not the second (other class), not
        // the third (shifted 6 px, IoU 0.25); one box of the model's has no fp32 counterpart.
        let fp32 = [d(0, 0.0), d(1, 50.0), d(2, 100.0)];
        let got = [d(0, 1.0), d(0, 50.0), d(2, 106.0)];
        let m = match_detections(&fp32, &got);
        assert_eq!(m, DetectionMatch { fp32: 3, matched: 1, extra: 2 });
        // One detection matches at most one fp32 detection.
        assert_eq!(match_detections(&[d(0, 0.0), d(0, 0.5)], &[d(0, 0.0)]).matched, 1);
        let q = Metrics { detections: Some(DetectionMatch { fp32: 40, matched: 39, extra: 0 }), ..Default::default() };
        let b = Budget::Detections(97.0);
        assert_eq!(b.value(&Metrics::default(), &q), 97.5);
        assert!(b.met(97.5) && !b.met(96.9) && b.better(98.0, 97.0));
        assert_eq!(Budget::Detections(95.0).value(&Metrics::default(), &Metrics::default()), 0.0);
    }
}
