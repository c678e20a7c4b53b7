//! Rollout statistics per model version and the automatic canary.
//!
//! Every answered inference (HTTP or gRPC) is counted for the version that ran it: requests, server errors (5xx)
//! and the latest latencies; shadow comparisons count agreement. `GET /v2/models/{m}/rollout` compares the arms
//! the routing configures (default vs canary, A vs B, shadow agreement) with a two-proportion z-test on error
//! rates and agreement, a Mann-Whitney rank test on latencies, and the requests each arm still needs for the
//! observed difference to be significant (α = 0.05, power 0.8).
//!
//! A canary with `auto` in `config.json` is driven from here: each time its window (the requests since the last
//! decision) holds `min_requests`, or already holds more errors than the budget allows, it is promoted by
//! `step_percent` (to 100 %: promoted) or rolled back to 0 % when its error rate or p99 is over the limits. The
//! decision is logged (one line, JSON with `--log-json`) and counted in `edgepack_rollout_decisions_total`; the share
//! routed now is `edgepack_canary_percent`. Editing the canary's configuration starts it over.
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde_json::{Value, json};

use crate::repo::{Canary, Routing};

/// Latencies kept per arm (the most recent) for percentiles and the rank test.
const SAMPLES: usize = 4096;

#[derive(Debug, Default, Clone)]
pub struct Arm {
    pub requests: u64,
    pub errors: u64,
    latencies_ms: VecDeque<f64>,
    pub agree: u64,
    pub disagree: u64,
}

impl Arm {
    fn add(&mut self, ok: bool, ms: f64) {
        self.requests += 1;
        self.errors += u64::from(!ok);
        if self.latencies_ms.len() == SAMPLES {
            self.latencies_ms.pop_front();
        }
        self.latencies_ms.push_back(ms);
    }

    fn error_rate(&self) -> f64 {
        if self.requests == 0 { 0.0 } else { self.errors as f64 / self.requests as f64 }
    }

    fn quantile(&self, q: f64) -> Option<f64> {
        let mut v: Vec<f64> = self.latencies_ms.iter().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[((v.len() - 1) as f64 * q).round() as usize])
    }

    fn json(&self, version: &str, role: &str) -> Value {
        let mut j = json!({
            "version": version,
            "role": role,
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate(),
            "p50_ms": self.quantile(0.5),
            "p99_ms": self.quantile(0.99),
        });
        if self.agree + self.disagree > 0 {
            j["shadow"] = json!({ "agree": self.agree, "disagree": self.disagree,
                "agreement": self.agree as f64 / (self.agree + self.disagree) as f64 });
        }
        j
    }
}

/// One decision of the automatic canary.
#[derive(Debug, Clone)]
pub struct Decision {
    pub model: String,
    pub version: String,
    /// `promote` or `rollback`.
    pub action: &'static str,
    pub from_percent: f64,
    pub to_percent: f64,
    pub requests: u64,
    pub error_rate: f64,
    pub p99_ms: Option<f64>,
    pub reason: String,
}

#[derive(Debug, Clone)]
struct CanaryState {
    /// The configuration it runs (an edit starts over).
    config: Canary,
    percent: f64,
    /// `running`, `promoted` or `rolled_back`.
    state: &'static str,
    window: Arm,
    decisions: Vec<Value>,
}

#[derive(Debug, Default)]
struct ModelRollout {
    arms: BTreeMap<String, Arm>,
    canary: Option<CanaryState>,
}

/// Every model's rollout statistics and automatic canaries.
#[derive(Debug, Default)]
pub struct Rollouts {
    inner: Mutex<BTreeMap<String, ModelRollout>>,
}

impl Rollouts {
    fn with<R>(&self, model: &str, f: impl FnOnce(&mut ModelRollout) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(g.entry(model.to_string()).or_default())
    }

    /// The canary's state for `c`, started over when its configuration changed.
    fn canary<'a>(m: &'a mut ModelRollout, c: &Canary) -> &'a mut CanaryState {
        if m.canary.as_ref().is_none_or(|s| &s.config != c) {
            m.canary = Some(CanaryState {
                config: c.clone(),
                percent: c.percent,
                state: "running",
                window: Arm::default(),
                decisions: Vec::new(),
            });
        }
        m.canary.as_mut().expect("set above")
    }

    /// The share of requests the canary gets now: the configured one, or the automatic canary's.
    pub fn canary_percent(&self, model: &str, c: &Canary) -> f64 {
        if c.auto.is_none() {
            return c.percent;
        }
        self.with(model, |m| Self::canary(m, c).percent)
    }

    /// Counts an answered request of `version`; with an automatic canary on that version, returns the decision its
    /// window calls for, if any.
    pub fn record(&self, model: &str, version: &str, ok: bool, ms: f64, routing: &Routing) -> Option<Decision> {
        self.with(model, |m| {
            m.arms.entry(version.to_string()).or_default().add(ok, ms);
            let c = routing.canary.as_ref().filter(|c| c.version == version)?;
            let auto = c.auto.clone()?;
            let s = Self::canary(m, c);
            if s.state != "running" {
                return None;
            }
            s.window.add(ok, ms);
            let w = &s.window;
            let (rate, p99) = (w.error_rate(), w.quantile(0.99));
            let budget = (auto.max_error_rate * auto.min_requests as f64).floor() as u64;
            let hopeless = w.errors > budget;
            if w.requests < auto.min_requests && !hopeless {
                return None;
            }
            let slow = auto.max_p99_ms.zip(p99).filter(|(max, p)| p > max);
            let (action, to, reason) = if rate > auto.max_error_rate || hopeless {
                ("rollback", 0.0, format!("error rate {:.4} over {}", rate, auto.max_error_rate))
            } else if let Some((max, p)) = slow {
                ("rollback", 0.0, format!("p99 {p:.1} ms over {max} ms"))
            } else {
                let to = (s.percent + auto.step_percent).min(100.0);
                ("promote", to, format!("{} requests within the limits", w.requests))
            };
            let d = Decision {
                model: model.to_string(),
                version: version.to_string(),
                action,
                from_percent: s.percent,
                to_percent: to,
                requests: w.requests,
                error_rate: rate,
                p99_ms: p99,
                reason,
            };
            s.percent = to;
            s.state = match (action, to >= 100.0) {
                ("rollback", _) => "rolled_back",
                (_, true) => "promoted",
                _ => "running",
            };
            s.window = Arm::default();
            s.decisions.push(json!({
                "action": d.action, "from_percent": d.from_percent, "to_percent": d.to_percent,
                "requests": d.requests, "error_rate": d.error_rate, "p99_ms": d.p99_ms, "reason": d.reason,
            }));
            Some(d)
        })
    }

    /// Counts a shadow comparison of `version` against the answer returned.
    pub fn shadow(&self, model: &str, version: &str, agree: bool) {
        self.with(model, |m| {
            let a = m.arms.entry(version.to_string()).or_default();
            if agree {
                a.agree += 1;
            } else {
                a.disagree += 1;
            }
        })
    }

    /// `GET /v2/models/{m}/rollout`: the arms, their comparisons and the canary's state. `baseline` is the version
    /// requests go to by default.
    pub fn report(&self, model: &str, routing: &Routing, baseline: &str) -> Value {
        self.with(model, |m| {
            let arm = |v: &str| m.arms.get(v).cloned().unwrap_or_default();
            let mut roles: Vec<(String, &str)> = vec![(baseline.to_string(), "default")];
            if let Some(c) = &routing.canary {
                roles.push((c.version.clone(), "canary"));
            }
            if let Some(ab) = &routing.ab {
                roles.push((ab.a.clone(), "a"));
                roles.push((ab.b.clone(), "b"));
            }
            if let Some(s) = &routing.shadow {
                roles.push((s.version.clone(), "shadow"));
            }
            let arms: Vec<Value> = roles.iter().map(|(v, r)| arm(v).json(v, r)).collect();
            let mut comparisons = Vec::new();
            if let Some(c) = &routing.canary {
                comparisons.push(compare(baseline, &arm(baseline), &c.version, &arm(&c.version)));
            }
            if let Some(ab) = &routing.ab {
                comparisons.push(compare(&ab.a, &arm(&ab.a), &ab.b, &arm(&ab.b)));
            }
            let mut out = json!({ "model": model, "arms": arms, "comparisons": comparisons });
            if let Some(s) = &routing.shadow {
                let a = arm(&s.version);
                let n = a.agree + a.disagree;
                out["shadow"] = json!({
                    "version": s.version, "compared": n, "agree": a.agree,
                    "agreement": (n > 0).then(|| a.agree as f64 / n as f64),
                    // Agreement against perfect agreement: the z-test of the observed share against 1 is degenerate,
                    // so the interval says how well it is known (Wilson, 95 %).
                    "agreement_ci95": (n > 0).then(|| wilson(a.agree, n)),
                });
            }
            if let Some(c) = routing.canary.as_ref().filter(|c| c.auto.is_some()) {
                let s = Self::canary(m, c);
                out["canary"] = json!({
                    "version": c.version, "percent": s.percent, "state": s.state,
                    "window_requests": s.window.requests, "window_errors": s.window.errors,
                    "decisions": s.decisions,
                });
            }
            out
        })
    }
}

/// Two arms compared: error rates (two-proportion z-test), latencies (Mann-Whitney U, normal approximation), and
/// the requests per arm at which the observed error-rate difference would be significant (α 0.05, power 0.8).
fn compare(va: &str, a: &Arm, vb: &str, b: &Arm) -> Value {
    let (n1, n2) = (a.requests as f64, b.requests as f64);
    let (p1, p2) = (a.error_rate(), b.error_rate());
    let err = if n1 > 0.0 && n2 > 0.0 {
        let p = (a.errors + b.errors) as f64 / (n1 + n2);
        let se = (p * (1.0 - p) * (1.0 / n1 + 1.0 / n2)).sqrt();
        let z = if se > 0.0 { (p2 - p1) / se } else { 0.0 };
        let pv = two_sided(z);
        let diff = (p2 - p1).abs();
        // Per-arm size for a two-sided test of the observed difference (pooled variance under the null).
        let needed = (diff > 0.0).then(|| {
            let pooled = (p1 + p2) / 2.0;
            let (za, zb) = (
                1.959_964 * (2.0 * pooled * (1.0 - pooled)).sqrt(),
                0.841_621 * (p1 * (1.0 - p1) + p2 * (1.0 - p2)).sqrt(),
            );
            ((za + zb).powi(2) / (diff * diff)).ceil()
        });
        json!({ "z": z, "p_value": pv, "significant": pv < 0.05,
            "requests_needed_per_arm": needed,
            "still_needed": needed.map(|n| json!({ va: (n - n1).max(0.0), vb: (n - n2).max(0.0) })) })
    } else {
        json!(null)
    };
    let lat = mann_whitney(&a.latencies_ms, &b.latencies_ms)
        .map(|(u, z)| json!({ "u": u, "z": z, "p_value": two_sided(z), "significant": two_sided(z) < 0.05 }));
    json!({ "a": va, "b": vb, "error_rate": err, "latency": lat })
}

/// Mann-Whitney U of `x` against `y` (ties ranked by their average, tie-corrected variance) and its z.
fn mann_whitney(x: &VecDeque<f64>, y: &VecDeque<f64>) -> Option<(f64, f64)> {
    let (n1, n2) = (x.len(), y.len());
    if n1 == 0 || n2 == 0 {
        return None;
    }
    let mut all: Vec<(f64, bool)> = x.iter().map(|&v| (v, true)).chain(y.iter().map(|&v| (v, false))).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut r1, mut ties, mut i) = (0.0, 0.0, 0);
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        let t = (j - i + 1) as f64;
        ties += t * t * t - t;
        r1 += rank * all[i..=j].iter().filter(|e| e.1).count() as f64;
        i = j + 1;
    }
    let (n1f, n2f) = (n1 as f64, n2 as f64);
    let n = n1f + n2f;
    let u = r1 - n1f * (n1f + 1.0) / 2.0;
    let var = n1f * n2f / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)).max(1.0));
    let z = if var > 0.0 { (u - n1f * n2f / 2.0) / var.sqrt() } else { 0.0 };
    Some((u, z))
}

/// Two-sided p-value of a standard normal z.
fn two_sided(z: f64) -> f64 {
    erfc(z.abs() / std::f64::consts::SQRT_2).min(1.0)
}

/// The complementary error function (Numerical Recipes' Chebyshev fit, relative error under 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// The Wilson score interval of `k` successes in `n` (95 %).
fn wilson(k: u64, n: u64) -> [f64; 2] {
    let (k, n, z) = (k as f64, n as f64, 1.959_964);
    let p = k / n;
    let d = 1.0 + z * z / n;
    let c = (p + z * z / (2.0 * n)) / d;
    let h = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / d;
    [(c - h).max(0.0), (c + h).min(1.0)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::CanaryAuto;

    #[test]
    fn statistics_match_their_textbook_values() {
        // erfc(1) = 0.157299207; p of |z| = 1.96 is 0.05.
        assert!((erfc(1.0) - 0.157_299_207).abs() < 1e-6);
        assert!((two_sided(1.959_964) - 0.05).abs() < 1e-6);
        // Mann-Whitney: x all below y → U = 0.
        let x: VecDeque<f64> = (0..20).map(f64::from).collect();
        let y: VecDeque<f64> = (20..40).map(f64::from).collect();
        let (u, z) = mann_whitney(&x, &y).unwrap();
        assert_eq!(u, 0.0);
        assert!(z < -5.0, "{z}");
        // Identical samples: no difference.
        assert!(mann_whitney(&x, &x).unwrap().1.abs() < 1e-9);
        let w = wilson(95, 100);
        assert!((w[0] - 0.8882).abs() < 1e-3 && (w[1] - 0.9785).abs() < 1e-3, "{w:?}");
    }

    #[test]
    fn an_automatic_canary_steps_up_and_rolls_back() {
        let auto = CanaryAuto { max_error_rate: 0.1, max_p99_ms: None, min_requests: 10, step_percent: 30.0 };
        let canary = Canary { version: "2".into(), percent: 10.0, auto: Some(auto) };
        let routing = Routing { canary: Some(canary.clone()), ..Default::default() };
        let r = Rollouts::default();
        assert_eq!(r.canary_percent("m", &canary), 10.0);
        let mut decisions = Vec::new();
        for i in 0..40 {
            decisions.extend(r.record("m", "2", true, 1.0 + i as f64, &routing));
            r.record("m", "1", true, 1.0, &routing);
        }
        let steps: Vec<f64> = decisions.iter().map(|d| d.to_percent).collect();
        assert_eq!(steps, [40.0, 70.0, 100.0]);
        assert_eq!(r.report("m", &routing, "1")["canary"]["state"], "promoted");
        // A new configuration starts over; errors beyond the budget roll back before the window is full.
        let canary = Canary { percent: 20.0, ..canary };
        let routing = Routing { canary: Some(canary.clone()), ..Default::default() };
        assert_eq!(r.canary_percent("m", &canary), 20.0);
        let d: Vec<Decision> = (0..3).filter_map(|_| r.record("m", "2", false, 1.0, &routing)).collect();
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].action, d[0].to_percent), ("rollback", 0.0));
        assert_eq!(r.canary_percent("m", &canary), 0.0);
        let rep = r.report("m", &routing, "1");
        assert_eq!(rep["canary"]["state"], "rolled_back");
        assert_eq!(rep["arms"][1]["requests"], 43);
        assert_eq!(rep["arms"][1]["errors"], 3);
    }
}
