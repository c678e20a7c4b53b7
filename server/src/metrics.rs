//! Prometheus metrics in the text exposition format (checked by `promtool check metrics` in the tests).
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Counter,
    Gauge,
    Histogram(&'static [f64]),
}

const LATENCY: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const BATCH: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// Every metric the server exports: (name, help, kind).
const DESCS: &[(&str, &str, Kind)] = &[
    ("edgepack_requests_total", "Inference requests by model, version, endpoint and HTTP status.", Kind::Counter),
    (
        "edgepack_request_duration_seconds",
        "Time from request arrival to response, by model and version.",
        Kind::Histogram(LATENCY),
    ),
    (
        "edgepack_queue_duration_seconds",
        "Time a request waited in its model's queue before its batch ran.",
        Kind::Histogram(LATENCY),
    ),
    (
        "edgepack_inference_duration_seconds",
        "Engine time per executed batch, by model, version and backend.",
        Kind::Histogram(LATENCY),
    ),
    ("edgepack_batch_size", "Samples per executed batch (dynamic batching).", Kind::Histogram(BATCH)),
    ("edgepack_queue_depth", "Requests waiting in the model version's queue.", Kind::Gauge),
    (
        "edgepack_rejected_total",
        "Requests refused before running: queue full (back-pressure), deadline passed, shutting down.",
        Kind::Counter,
    ),
    (
        "edgepack_shadow_requests_total",
        "Requests mirrored to a shadow version, by result (agree, disagree, error, dropped).",
        Kind::Counter,
    ),
    (
        "edgepack_rollout_decisions_total",
        "Decisions of the automatic canary, by model, canary version and decision (promote, rollback).",
        Kind::Counter,
    ),
    ("edgepack_canary_percent", "Share of requests the automatic canary routes to its version now.", Kind::Gauge),
    (
        "edgepack_jobs_total",
        "Asynchronous jobs by model and status reached (queued, succeeded, failed, cancelled).",
        Kind::Counter,
    ),
    ("edgepack_jobs_queued", "Asynchronous jobs waiting to run, by model (scale workers on it).", Kind::Gauge),
    ("edgepack_jobs_oldest_age_seconds", "Age of the oldest queued asynchronous job, by model.", Kind::Gauge),
    ("edgepack_model_ready", "1 when the model version is loaded and warmed up.", Kind::Gauge),
    ("edgepack_model_info", "Constant 1, labelled with the backend running the model version.", Kind::Gauge),
];

type Labels = Vec<(&'static str, String)>;

#[derive(Default, Clone)]
struct Hist {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Default)]
pub struct Metrics {
    values: Mutex<BTreeMap<(&'static str, Labels), f64>>,
    hists: Mutex<BTreeMap<(&'static str, Labels), Hist>>,
}

fn labels(l: &[(&'static str, &str)]) -> Labels {
    l.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

impl Metrics {
    pub fn inc(&self, name: &'static str, l: &[(&'static str, &str)]) {
        self.add(name, l, 1.0);
    }

    pub fn add(&self, name: &'static str, l: &[(&'static str, &str)], v: f64) {
        if let Ok(mut m) = self.values.lock() {
            *m.entry((name, labels(l))).or_default() += v;
        }
    }

    pub fn set(&self, name: &'static str, l: &[(&'static str, &str)], v: f64) {
        if let Ok(mut m) = self.values.lock() {
            m.insert((name, labels(l)), v);
        }
    }

    /// Drops the gauges of a model version (unloaded): ready, info, queue depth.
    pub fn remove(&self, l: &[(&'static str, &str)]) {
        let l = labels(l);
        let gauge = |n: &str| matches!(n, "edgepack_model_ready" | "edgepack_model_info" | "edgepack_queue_depth");
        if let Ok(mut m) = self.values.lock() {
            m.retain(|(n, k), _| !(gauge(n) && l.iter().all(|p| k.contains(p))));
        }
    }

    pub fn observe(&self, name: &'static str, l: &[(&'static str, &str)], v: f64) {
        let Some(Kind::Histogram(b)) = DESCS.iter().find(|d| d.0 == name).map(|d| d.2) else { return };
        if let Ok(mut m) = self.hists.lock() {
            let h =
                m.entry((name, labels(l))).or_insert_with(|| Hist { counts: vec![0; b.len()], ..Default::default() });
            for (i, le) in b.iter().enumerate() {
                if v <= *le {
                    h.counts[i] += 1;
                }
            }
            h.sum += v;
            h.count += 1;
        }
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let values = self.values.lock().map(|m| m.clone()).unwrap_or_default();
        let hists = self.hists.lock().map(|m| m.clone()).unwrap_or_default();
        let mut out = String::new();
        for (name, help, kind) in DESCS {
            let t = match kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram(_) => "histogram",
            };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {t}");
            match kind {
                Kind::Histogram(b) => {
                    for ((n, l), h) in hists.iter().filter(|((n, _), _)| n == name) {
                        for (le, c) in b.iter().zip(&h.counts) {
                            let _ = writeln!(out, "{n}_bucket{} {c}", fmt_labels(l, Some(&fmt_f(*le))));
                        }
                        let _ = writeln!(out, "{n}_bucket{} {}", fmt_labels(l, Some("+Inf")), h.count);
                        let _ = writeln!(out, "{n}_sum{} {}", fmt_labels(l, None), fmt_f(h.sum));
                        let _ = writeln!(out, "{n}_count{} {}", fmt_labels(l, None), h.count);
                    }
                }
                _ => {
                    for ((n, l), v) in values.iter().filter(|((n, _), _)| n == name) {
                        let _ = writeln!(out, "{n}{} {}", fmt_labels(l, None), fmt_f(*v));
                    }
                }
            }
        }
        out
    }
}

fn fmt_f(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 { format!("{}", v as i64) } else { format!("{v}") }
}

fn fmt_labels(l: &Labels, le: Option<&str>) -> String {
    let mut parts: Vec<String> = l
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() { String::new() } else { format!("{{{}}}", parts.join(",")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let m = Metrics::default();
        m.inc("edgepack_requests_total", &[("model", "a\"b"), ("status", "200")]);
        m.observe("edgepack_batch_size", &[("model", "m")], 3.0);
        let t = m.render();
        assert!(t.contains("edgepack_requests_total{model=\"a\\\"b\",status=\"200\"} 1\n"), "{t}");
        assert!(t.contains("edgepack_batch_size_bucket{model=\"m\",le=\"2\"} 0\n"), "{t}");
        assert!(t.contains("edgepack_batch_size_bucket{model=\"m\",le=\"4\"} 1\n"), "{t}");
        assert!(t.contains("edgepack_batch_size_bucket{model=\"m\",le=\"+Inf\"} 1\n"), "{t}");
        assert!(t.contains("edgepack_batch_size_sum{model=\"m\"} 3\n"), "{t}");
    }
}
