//! Sensitivity scan and the automatic plan.
//!
//! 1. Scan: each knob (a channel group, or a layer's weights) is pruned alone at each level, and the model output's
//!    SQNR against fp32 is measured on a few held-out samples; what the knob saves (MACs or nonzero weights) is
//!    measured on the built model.
//! 2. Order: a greedy walk turns knobs up one level at a time, always the step with the most saving per unit of
//!    added output noise (noise powers 10^(−SQNR/10) of independent perturbations roughly add).
//! 3. Search: the longest prefix of that order that still meets the budget on all held-out samples (bisection,
//!    assuming more pruning is never more accurate; every probe is reported).
use std::collections::BTreeMap;

use edgepack_runtime::onnx::Model;
use edgepack_runtime::{Session, SessionOptions};

use super::{Pruner, Settings};
use crate::calib::CalibError;
use crate::fidelity::{HeldOut, Metrics};
use crate::mixed::Budget;

#[derive(Debug, Clone, serde::Serialize)]
pub struct LevelPoint {
    pub amount: f64,
    /// Output SQNR with only this knob pruned at this amount (`null`: unchanged).
    pub output_sqnr_db: Option<f64>,
    /// Fraction of the model's cost (MACs, or nonzero weights) this alone removes.
    pub saving: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct KnobScan {
    pub knob: String,
    pub points: Vec<LevelPoint>,
}

/// Scans every knob at every level on the first `samples` held-out samples.
#[allow(clippy::too_many_arguments)]
pub fn scan(
    pruner: &Pruner,
    knobs: &[String],
    levels: &[f64],
    held: &HeldOut,
    samples: usize,
    opts: &SessionOptions,
    cost: &dyn Fn(&Model) -> f64,
    mut progress: impl FnMut(usize),
) -> Result<Vec<KnobScan>, CalibError> {
    let base = cost(pruner.model).max(1.0);
    let mut out = Vec::with_capacity(knobs.len());
    let mut done = 0;
    for k in knobs {
        let mut points = Vec::with_capacity(levels.len());
        for &a in levels {
            let m = pruner.build(&BTreeMap::from([(k.clone(), a)]))?;
            let s = Session::from_model(&m, opts)?;
            let metrics = held.evaluate(&s, Some(samples.max(1)), |_, _| {})?;
            points.push(LevelPoint {
                amount: a,
                output_sqnr_db: metrics.output_sqnr_db,
                saving: 1.0 - cost(&m) / base,
            });
            done += 1;
            progress(done);
        }
        out.push(KnobScan { knob: k.clone(), points });
    }
    Ok(out)
}

fn noise(sqnr: Option<f64>) -> f64 {
    sqnr.map(|db| 10f64.powf(-db / 10.0)).unwrap_or(0.0)
}

/// Cumulative candidates from the scan: candidate i is the settings after the i best steps (candidate 0: none).
pub fn order_steps(scan: &[KnobScan]) -> Vec<Settings> {
    // Noise and saving per knob and level, made monotone along the levels.
    let table: Vec<Vec<(f64, f64, f64)>> = scan
        .iter()
        .map(|k| {
            let (mut n_max, mut s_max) = (0f64, 0f64);
            k.points
                .iter()
                .map(|p| {
                    n_max = n_max.max(noise(p.output_sqnr_db));
                    s_max = s_max.max(p.saving);
                    (p.amount, n_max, s_max)
                })
                .collect()
        })
        .collect();
    let mut at: Vec<usize> = vec![0; scan.len()]; // levels taken per knob
    let mut cur = Settings::new();
    let mut out = vec![cur.clone()];
    loop {
        let mut best: Option<(f64, usize)> = None;
        for (k, levels) in table.iter().enumerate() {
            let Some(&(_, n, s)) = levels.get(at[k]) else { continue };
            let (n0, s0) = if at[k] == 0 { (0.0, 0.0) } else { (levels[at[k] - 1].1, levels[at[k] - 1].2) };
            let eff = (s - s0).max(0.0) / (n - n0).max(1e-12);
            if best.is_none_or(|(b, _)| eff > b) {
                best = Some((eff, k));
            }
        }
        let Some((_, k)) = best else { break };
        cur.insert(scan[k].knob.clone(), table[k][at[k]].0);
        at[k] += 1;
        out.push(cur.clone());
    }
    out
}

/// Candidates for one global magnitude threshold: overall sparsity from 0 up through a fine grid to the largest
/// level asked.
pub fn global_steps(pruner: &Pruner, levels: &[f64]) -> Result<Vec<Settings>, CalibError> {
    let top = levels.iter().cloned().fold(0.0f64, f64::max).max(0.5);
    let mut out = vec![Settings::new()];
    let mut a = 0.025;
    while a <= top + 1e-9 {
        out.push(pruner.uniform(a)?);
        a += 0.025;
    }
    Ok(out)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PlanProbe {
    /// Candidate index (steps taken).
    pub steps: usize,
    pub value: f64,
    pub met: bool,
    /// Cost left (MACs or nonzero weights) as a fraction of fp32.
    pub remaining: f64,
    pub metrics: Metrics,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PlanOutcome {
    pub budget: Budget,
    pub text: String,
    pub met: bool,
    pub reached: f64,
    pub candidates: usize,
    pub chosen: usize,
    pub probes: Vec<PlanProbe>,
    pub settings: Settings,
}

/// The longest candidate prefix meeting `budget` on every held-out sample.
pub fn search(
    pruner: &Pruner,
    candidates: &[Settings],
    held: &HeldOut,
    budget: Budget,
    opts: &SessionOptions,
    cost: &dyn Fn(&Model) -> f64,
    mut on_probe: impl FnMut(&PlanProbe),
) -> Result<PlanOutcome, CalibError> {
    let base = cost(pruner.model).max(1.0);
    let unchanged = Metrics { output_sqnr_db: None, ..held.fp32.clone() };
    let v0 = budget.value(&held.fp32, &unchanged);
    let mut probes =
        vec![PlanProbe { steps: 0, value: v0, met: budget.met(v0), remaining: 1.0, metrics: unchanged.clone() }];
    let mut eval = |i: usize, probes: &mut Vec<PlanProbe>| -> Result<bool, CalibError> {
        if let Some(p) = probes.iter().find(|p| p.steps == i) {
            return Ok(p.met);
        }
        let m = pruner.build(&candidates[i])?;
        let s = Session::from_model(&m, opts)?;
        let metrics = held.evaluate(&s, None, |_, _| {})?;
        let value = budget.value(&held.fp32, &metrics);
        let p = PlanProbe { steps: i, value, met: budget.met(value), remaining: cost(&m) / base, metrics };
        on_probe(&p);
        probes.push(p);
        Ok(budget.met(value))
    };
    let last = candidates.len().saturating_sub(1);
    let chosen = if last == 0 || eval(last, &mut probes)? {
        last
    } else {
        let (mut lo, mut hi) = (0usize, last);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if eval(mid, &mut probes)? { lo = mid } else { hi = mid }
        }
        lo
    };
    probes.sort_by_key(|p| p.steps);
    let p = probes.iter().find(|p| p.steps == chosen).cloned().unwrap_or_else(|| probes[0].clone());
    Ok(PlanOutcome {
        budget,
        text: budget.to_string(),
        met: p.met,
        reached: p.value,
        candidates: candidates.len(),
        chosen,
        probes,
        settings: candidates.get(chosen).cloned().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_order_prefers_cheap_savings_and_keeps_levels_in_order() {
        let k = |name: &str, pts: &[(f64, Option<f64>, f64)]| KnobScan {
            knob: name.into(),
            points: pts.iter().map(|&(a, d, s)| LevelPoint { amount: a, output_sqnr_db: d, saving: s }).collect(),
        };
        // `a` saves much at little noise; `b` is sensitive.
        let scan = vec![
            k("a", &[(0.25, Some(40.0), 0.10), (0.5, Some(30.0), 0.20)]),
            k("b", &[(0.25, Some(10.0), 0.10), (0.5, Some(5.0), 0.20)]),
        ];
        let c = order_steps(&scan);
        assert_eq!(c.len(), 5);
        assert!(c[0].is_empty());
        assert_eq!(c[1], Settings::from([("a".into(), 0.25)]));
        assert_eq!(c[2], Settings::from([("a".into(), 0.5)]));
        assert_eq!(c[3], Settings::from([("a".into(), 0.5), ("b".into(), 0.25)]));
        assert_eq!(c[4], Settings::from([("a".into(), 0.5), ("b".into(), 0.5)]));
    }
}
