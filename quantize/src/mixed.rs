//! Accuracy gating: per-layer sensitivity and automatic mixed precision.
//!
//! 1. Sensitivity: for each quantizable node, quantize that node alone (every other one stays fp32) and measure
//!    the SQNR of the model output against fp32 on held-out samples. Low SQNR = sensitive.
//! 2. Search: keep the k most sensitive nodes in fp32, for the smallest k that meets the budget on the held-out
//!    samples: k = 0, then 1, 2, 4... until met, then bisection between the last miss and the first hit. The
//!    number of float nodes is capped; when even the cap misses, the best candidate seen is kept and reported.
use std::collections::HashMap;

use edgepack_runtime::onnx::Model;
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
    /// Output SQNR against fp32 at least this many dB (any model).
    Sqnr(f64),
}

impl std::str::FromStr for Budget {
    type Err = String;
    fn from_str(s: &str) -> Result<Budget, String> {
        let (k, v) = s.split_once('=').ok_or_else(|| format!("budget `{s}`: expected KIND=VALUE"))?;
        let v: f64 = v.trim().parse().map_err(|_| format!("budget `{s}`: `{v}` is not a number"))?;
        if !v.is_finite() {
            return Err(format!("budget `{s}`: not a finite number"));
        }
        match k.trim() {
            "top1-drop" if v >= 0.0 => Ok(Budget::Top1Drop(v)),
            "agreement" if (0.0..=100.0).contains(&v) => Ok(Budget::Agreement(v)),
            "sqnr" => Ok(Budget::Sqnr(v)),
            "top1-drop" | "agreement" => Err(format!("budget `{s}`: value out of range")),
            other => Err(format!("unknown budget `{other}` (top1-drop=PT, agreement=PCT, sqnr=DB)")),
        }
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::Top1Drop(v) => write!(f, "top-1 drop ≤ {v} pt"),
            Budget::Agreement(v) => write!(f, "top-1 agreement ≥ {v} %"),
            Budget::Sqnr(v) => write!(f, "output SQNR ≥ {v} dB"),
        }
    }
}

impl Budget {
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
            _ if held.is_empty() => Some("no held-out samples".into()),
            _ => None,
        }
    }

    /// The budget's metric for `q` (drop in points, agreement in %, SQNR in dB; identical = +∞ dB).
    pub fn value(&self, fp32: &Metrics, q: &Metrics) -> f64 {
        match self {
            Budget::Top1Drop(_) => fp32.top1.unwrap_or(0.0) - q.top1.unwrap_or(0.0),
            Budget::Agreement(_) => q.top1_agreement.unwrap_or(0.0),
            Budget::Sqnr(_) => q.output_sqnr_db.unwrap_or(f64::INFINITY),
        }
    }

    pub fn met(&self, value: f64) -> bool {
        match *self {
            Budget::Top1Drop(b) => value <= b + 1e-9,
            Budget::Agreement(b) => value >= b - 1e-9,
            Budget::Sqnr(b) => value >= b,
        }
    }

    fn better(&self, a: f64, b: f64) -> bool {
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
}

fn quantize_excluding(
    model: &Model,
    ranges: &HashMap<String, Range>,
    cfg: &QdqConfig,
    extra: &[String],
) -> Result<(Model, QdqSummary), CalibError> {
    let mut c = cfg.clone();
    c.exclude.extend(extra.iter().cloned());
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
        let others: Vec<String> = units.iter().filter(|(n, _)| n != name).map(|(n, _)| n.clone()).collect();
        let (m, _) = quantize_excluding(model, ranges, cfg, &others)?;
        let s = Session::from_model(&m, opts)?;
        let metrics = held.evaluate(&s, Some(samples), |_, _| {})?;
        out.push(Sensitivity { node: name.clone(), op: op.clone(), output_sqnr_db: metrics.output_sqnr_db });
        progress(i + 1, units.len());
    }
    out.sort_by(|a, b| a.output_sqnr_db.unwrap_or(f64::INFINITY).total_cmp(&b.output_sqnr_db.unwrap_or(f64::INFINITY)));
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

    #[test]
    fn budgets_parse_and_compare() {
        assert_eq!("top1-drop=0.5".parse::<Budget>().unwrap(), Budget::Top1Drop(0.5));
        assert_eq!("agreement=99".parse::<Budget>().unwrap(), Budget::Agreement(99.0));
        assert_eq!("sqnr=30".parse::<Budget>().unwrap(), Budget::Sqnr(30.0));
        for bad in ["top1-drop", "agreement=101", "sqnr=x", "speed=2", "top1-drop=-1", "sqnr=inf"] {
            assert!(bad.parse::<Budget>().is_err(), "{bad}");
        }
        let fp32 = Metrics { top1: Some(80.0), ..Default::default() };
        let q =
            Metrics { top1: Some(79.6), top1_agreement: Some(98.0), output_sqnr_db: Some(25.0), ..Default::default() };
        let b = Budget::Top1Drop(0.5);
        assert!(b.met(b.value(&fp32, &q)));
        assert!(!Budget::Agreement(99.0).met(Budget::Agreement(99.0).value(&fp32, &q)));
        assert!(!Budget::Sqnr(30.0).met(25.0));
        assert!(Budget::Sqnr(30.0).met(Budget::Sqnr(30.0).value(&fp32, &Metrics::default())));
    }
}
