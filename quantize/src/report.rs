//! The fidelity report of one `edgepack quantize` run: what was quantized, what stayed fp32 and why, how close the
//! INT8 model is to fp32 (held-out samples, per layer), its size and CPU latency. Rendered as JSON (the data), a
//! terminal table and a self-contained HTML page with SVG charts.
use std::collections::BTreeMap;
use std::fmt::Write as _;

use edgepack_runtime::onnx::upgrade::UpgradeReport;

use crate::fidelity::Metrics;
use crate::mixed::{Budget, Probe};

#[derive(Debug, Clone, serde::Serialize)]
pub struct SampleInfo {
    pub source: String,
    pub samples: usize,
    pub labelled: bool,
    /// Which samples of `source` (e.g. "first 200", "201-400").
    pub which: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Preparation {
    pub opset_upgrade: UpgradeReport,
    pub folded_batchnorm: Vec<String>,
    pub named_nodes: usize,
    /// `Constant` nodes turned into initializers.
    pub constants: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BudgetOutcome {
    pub budget: Budget,
    pub text: String,
    pub met: bool,
    /// The budget's metric reached by the written model on the samples that chose its fp32 layers.
    pub reached: f64,
    /// The same figure on the report's samples (disjoint from those), when there are some.
    pub judged: Option<f64>,
    pub max_float_nodes: usize,
    pub float_nodes: Vec<String>,
    pub probes: Vec<Probe>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Size {
    pub fp32_bytes: usize,
    pub int8_bytes: usize,
    pub ratio: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Latency {
    pub fp32_ms: f64,
    pub int8_ms: f64,
    /// int8 / fp32.
    pub ratio: f64,
    pub runs: usize,
    pub threads: usize,
    pub backend: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Layer {
    pub node: String,
    pub op: String,
    /// "int8" or "fp32".
    pub precision: String,
    /// Why the node is fp32, when it is.
    pub reason: Option<String>,
    /// SQNR of the node's output in the written model against fp32 (accumulated error), dB.
    pub sqnr_db: Option<f64>,
    /// SQNR when this node alone is quantized, dB (when sensitivity was measured): of the model's output
    /// (`exact`) or of the node's own output (`local`; see [`Report::sensitivity_method`]).
    pub sensitivity_db: Option<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundingChoice {
    pub used: crate::rounding::Methods,
    /// (rounding, value of the gate's measure, or the output SQNR without a gate) for each rounding tried.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub compared: Vec<(String, f64)>,
}

/// Activation equalization, when it was tried ([`crate::equalize`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct EqualizationChoice {
    /// Whether the written model is the equalized one.
    pub used: bool,
    /// Channel groups scaled, and their channels in all.
    pub groups: usize,
    pub channels: usize,
    pub alpha: f32,
    /// ("as given" / "equalized", value of the gate's measure (or the output SQNR) on the choosing samples).
    pub compared: Vec<(String, f64)>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub model: String,
    pub output: String,
    pub method: String,
    pub calibration: SampleInfo,
    /// The samples every figure of the report is measured on.
    pub held_out: SampleInfo,
    /// The held-out samples that chose the fp32 layers under the gate (disjoint from `held_out`), when split.
    pub selection: Option<SampleInfo>,
    /// Recurrent state carried from one sample to the next ("state ← stateN"), when the model has some.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recurrent_state: Vec<String>,
    /// How the layer sensitivities were measured, when they were.
    pub sensitivity_method: Option<crate::mixed::SensitivityMethod>,
    /// How the weights were rounded, and what each rounding reached on the choosing samples when compared.
    pub rounding: RoundingChoice,
    /// Activation equalization, when tried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub equalization: Option<EqualizationChoice>,
    /// Weight-only quantization (bits, block size), when used: activations stay float.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_only: Option<crate::weight_only::WeightOnly>,
    /// The coded grid's bits per weight by layer, when the rate allocation was tried (`weight_only::allocate_bits`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_allocation: Option<RateAllocation>,
    pub preparation: Preparation,
    pub fp32: Metrics,
    pub int8: Metrics,
    pub budget: Option<BudgetOutcome>,
    pub size: Size,
    pub latency: Option<Latency>,
    pub layers: Vec<Layer>,
    /// Whether the layers' `sqnr_db` were measured (a backend that fuses layers may not expose their outputs).
    pub layer_sqnr_measured: bool,
    /// Other nodes that stay fp32, with the reason (control flow, unsupported ops).
    pub float_ops: BTreeMap<String, String>,
    pub warnings: Vec<String>,
    pub seconds: f64,
    /// Who made the report and how (set by the caller that knows its command line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
}

/// The coded grid's rate allocation: tried when every layer's bits are the same; kept when closer to fp32 on the
/// choosing samples (`compared`: their output SQNR in dB, uniform then allocated).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RateAllocation {
    pub used: bool,
    pub compared: [f64; 2],
    /// Bits per weight of each coded layer (the allocation tried).
    pub bits: std::collections::BTreeMap<String, f64>,
}

/// The footer of a report: the tool's version, the command that ran and when (UTC).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Provenance {
    pub edgepack: String,
    pub command: String,
    pub utc: String,
}

impl Provenance {
    pub fn line(&self) -> String {
        format!("edgepack {} · {} · {}", self.edgepack, self.command, self.utc)
    }
}

pub(crate) fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "-".into())
}

/// `95 % CI lo–hi` of an interval, or nothing.
pub(crate) fn ci(v: Option<[f64; 2]>) -> String {
    v.map(|[lo, hi]| format!("95 % CI {lo:.1}–{hi:.1}")).unwrap_or_default()
}

/// What one held-out sample weighs in the percentages, and how wide their uncertainty is.
pub(crate) fn sample_note(n: usize) -> String {
    format!(
        "({n} held-out samples: one sample is {:.2} pt; the intervals say which differences the samples can show)",
        100.0 / n.max(1) as f64
    )
}

pub(crate) fn db(v: Option<f64>) -> String {
    match v {
        Some(x) => format!("{x:.1}"),
        None => "exact".into(),
    }
}

impl Report {
    /// A layer's accumulated SQNR as the table shows it: "-" when it was not measured, "exact" when identical.
    fn layer_db(&self, l: &Layer) -> String {
        if self.layer_sqnr_measured { db(l.sqnr_db) } else { "-".into() }
    }

    /// Layers with integer weights (int8 or int4).
    pub fn int8_layers(&self) -> usize {
        self.layers.iter().filter(|l| l.precision != "fp32").count()
    }

    /// Summary lines for a terminal, then one row per layer (`all_layers`) or the fp32 and worst ten.
    pub fn table(&self, all_layers: bool) -> String {
        let mut s = String::new();
        let (f, q) = (&self.fp32, &self.int8);
        let _ = writeln!(
            s,
            "fidelity on {} held-out samples ({}, {})",
            q.samples, self.held_out.source, self.held_out.which
        );
        let _ = writeln!(s, "  {:<22} {:>10} {:>10}", "", "fp32", "int8");
        if f.top1.is_some() {
            let _ =
                writeln!(s, "  {:<22} {:>10} {:>10}   {}", "top-1 %", opt(f.top1, 2), opt(q.top1, 2), ci(q.ci95.top1));
            let _ =
                writeln!(s, "  {:<22} {:>10} {:>10}   {}", "top-5 %", opt(f.top5, 2), opt(q.top5, 2), ci(q.ci95.top5));
        }
        if q.top1_agreement.is_some() {
            let (label, a) = ("top-1 agreement %", opt(q.top1_agreement, 2));
            let _ = writeln!(s, "  {label:<22} {:>10} {a:>10}   {}", "100", ci(q.ci95.top1_agreement));
        }
        if let Some(d) = q.detections {
            let _ = writeln!(
                s,
                "  {:<22} {:>10} {:>10}   ({} of {}, {} extra)",
                "detections found %",
                "100",
                format!("{:.1}", d.pct()),
                d.matched,
                d.fp32,
                d.extra
            );
        }
        if f.top1.is_some() || q.top1_agreement.is_some() {
            let _ = writeln!(s, "  {}", sample_note(q.samples));
        }
        let _ = writeln!(s, "  {:<22} {:>10} {:>10}", "output SQNR dB", "exact", db(q.output_sqnr_db));
        let _ = writeln!(
            s,
            "  {:<22} {:>10} {:>10}   ({:.1} %)",
            "size bytes",
            self.size.fp32_bytes,
            self.size.int8_bytes,
            100.0 * self.size.ratio
        );
        if let Some(l) = &self.latency {
            let _ = writeln!(
                s,
                "  {:<22} {:>10.2} {:>10.2}   (x{:.2}, median of {}, {})",
                "CPU latency ms", l.fp32_ms, l.int8_ms, l.ratio, l.runs, l.backend
            );
        }
        if let Some(b) = &self.budget {
            let _ = writeln!(
                s,
                "budget {}: {} (reached {:.3}{}) with {} node(s) kept in fp32 (cap {}), {} candidates tried",
                b.text,
                if b.met { "met" } else { "NOT met, best candidate written" },
                b.reached,
                self.selection.as_ref().map(|x| format!(" on the {} choosing samples", x.samples)).unwrap_or_default(),
                b.float_nodes.len(),
                b.max_float_nodes,
                b.probes.len()
            );
            if let (Some(j), Some(x)) = (b.judged, &self.selection) {
                let _ = writeln!(
                    s,
                    "  on the report's {} samples ({}; the choosing ones: {}): {:.3}",
                    q.samples, self.held_out.which, x.which, j
                );
            }
        }
        if let Some(m) = self.sensitivity_method {
            let _ = writeln!(s, "sensitivity: {}", m.describe());
        }
        if let Some(w) = self.weight_only {
            let _ = writeln!(
                s,
                "weight-only: {}-bit weights{}, activations float",
                w.bits,
                if w.coded {
                    " on the coded grid (int8 storage, a per-channel step giving that entropy; sized by the bundle's zstd)"
                        .to_string()
                } else if w.bits == 4.0 {
                    format!(" in blocks of {} (int8 per channel where a channel is shorter)", w.group)
                } else {
                    String::new()
                }
            );
        }
        let compared: Vec<String> = self.rounding.compared.iter().map(|(k, v)| format!("{k} {v:.3}")).collect();
        let _ = writeln!(
            s,
            "weight rounding: {}{}",
            self.rounding.used,
            if compared.is_empty() {
                String::new()
            } else {
                format!(" (on the choosing samples: {})", compared.join(", "))
            }
        );
        if let Some(e) = &self.equalization {
            let compared: Vec<String> = e.compared.iter().map(|(k, v)| format!("{k} {v:.3}")).collect();
            let _ = writeln!(
                s,
                "activation equalization: {} ({} channel groups, {} channels, alpha {}; on the choosing samples: {})",
                if e.used { "used" } else { "tried, not kept" },
                e.groups,
                e.channels,
                e.alpha,
                compared.join(", ")
            );
        }
        if !self.recurrent_state.is_empty() {
            let _ = writeln!(
                s,
                "state carried over the samples in order: {} (zeros first; every step judged from fp32's state)",
                self.recurrent_state.join(", ")
            );
        }
        let int4 = self.layers.iter().filter(|l| l.precision == "int4").count();
        let coded = self.layers.iter().filter(|l| l.precision == "coded").count();
        let _ = writeln!(
            s,
            "layers: {}{}{} int8, {} fp32",
            if int4 > 0 { format!("{int4} int4, ") } else { String::new() },
            if coded > 0 { format!("{coded} coded, ") } else { String::new() },
            self.int8_layers() - int4 - coded,
            self.layers.len() - self.int8_layers()
        );
        let mut rows: Vec<&Layer> = self.layers.iter().collect();
        if !all_layers {
            let mut worst: Vec<&Layer> = self.layers.iter().filter(|l| l.precision != "fp32").collect();
            worst.sort_by(|a, b| a.sqnr_db.unwrap_or(f64::INFINITY).total_cmp(&b.sqnr_db.unwrap_or(f64::INFINITY)));
            worst.truncate(10);
            rows = self
                .layers
                .iter()
                .filter(|l| l.precision == "fp32" || worst.iter().any(|w| w.node == l.node))
                .collect();
            let _ = writeln!(s, "  (fp32 layers and the 10 int8 layers with the lowest SQNR; the report has all)");
        }
        let w = rows.iter().map(|l| l.node.chars().count()).max().unwrap_or(4).clamp(4, 48);
        let _ = writeln!(
            s,
            "  {:<w$} {:<18} {:>9} {:>12} {:>14}  reason",
            "node",
            "op",
            "precision",
            "SQNR dB",
            match self.sensitivity_method {
                Some(crate::mixed::SensitivityMethod::Local) => "alone: own dB",
                _ => "alone: out dB",
            }
        );
        for l in rows {
            let name: String = l.node.chars().take(w).collect();
            let _ = writeln!(
                s,
                "  {:<w$} {:<18} {:>9} {:>12} {:>14}  {}",
                name,
                l.op,
                l.precision,
                self.layer_db(l),
                if l.sensitivity_db.is_some() || l.precision != "fp32" { opt(l.sensitivity_db, 1) } else { "-".into() },
                l.reason.as_deref().unwrap_or("")
            );
        }
        for (n, why) in &self.float_ops {
            let _ = writeln!(s, "  fp32: {n}: {why}");
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }

    /// A self-contained HTML page (no scripts, no external resources) with SVG charts.
    pub fn html(&self) -> String {
        let mut h = String::new();
        let _ = write!(
            h,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>edgepack quantize: {}</title><style>\
             body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}\
             td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}\
             .fp32{{color:#b45309}}.warn{{color:#b91c1c}}svg text{{font-size:11px}}</style></head><body>",
            esc(&self.model)
        );
        let _ = write!(
            h,
            "<h1>INT8 fidelity report</h1><p><b>{}</b> → <b>{}</b>; calibration: {} samples of {} ({}), method {}; held-out: {} samples ({}).</p>",
            esc(&self.model),
            esc(&self.output),
            self.calibration.samples,
            esc(&self.calibration.source),
            esc(&self.calibration.which),
            esc(&self.method),
            self.int8.samples,
            esc(&self.held_out.which)
        );
        for w in &self.warnings {
            let _ = write!(h, "<p class=\"warn\">warning: {}</p>", esc(w));
        }
        let (f, q) = (&self.fp32, &self.int8);
        let _ = write!(h, "<h2>Summary</h2><table><tr><th></th><th>fp32</th><th>int8</th></tr>");
        if f.top1.is_some() {
            let _ = write!(
                h,
                "<tr><td>top-1 %</td><td>{}</td><td>{} <small>{}</small></td></tr>",
                opt(f.top1, 2),
                opt(q.top1, 2),
                ci(q.ci95.top1)
            );
            let _ = write!(
                h,
                "<tr><td>top-5 %</td><td>{}</td><td>{} <small>{}</small></td></tr>",
                opt(f.top5, 2),
                opt(q.top5, 2),
                ci(q.ci95.top5)
            );
        }
        if q.top1_agreement.is_some() {
            let _ = write!(
                h,
                "<tr><td>top-1 agreement with fp32 %</td><td>100</td><td>{} <small>{}</small></td></tr>",
                opt(q.top1_agreement, 2),
                ci(q.ci95.top1_agreement)
            );
        }
        if let Some(d) = q.detections {
            let _ = write!(
                h,
                "<tr><td>fp32 detections found %</td><td>100</td><td>{:.1} <small>({} of {}, {} extra)</small></td></tr>",
                d.pct(),
                d.matched,
                d.fp32,
                d.extra
            );
        }
        let _ = write!(h, "<tr><td>output SQNR dB</td><td>exact</td><td>{}</td></tr>", db(q.output_sqnr_db));
        let _ = write!(
            h,
            "<tr><td>size bytes</td><td>{}</td><td>{} ({:.1} %)</td></tr>",
            self.size.fp32_bytes,
            self.size.int8_bytes,
            100.0 * self.size.ratio
        );
        if let Some(l) = &self.latency {
            let _ = write!(
                h,
                "<tr><td>CPU latency ms (median of {}, {})</td><td>{:.2}</td><td>{:.2} (×{:.2})</td></tr>",
                l.runs,
                esc(&l.backend),
                l.fp32_ms,
                l.int8_ms,
                l.ratio
            );
        }
        let _ = write!(
            h,
            "<tr><td>layers integer / fp32</td><td></td><td>{} / {}</td></tr></table>",
            self.int8_layers(),
            self.layers.len() - self.int8_layers()
        );
        if let Some(b) = &self.budget {
            let _ = write!(
                h,
                "<h2>Budget: {}</h2><p>{} — reached {:.3}{} with {} node(s) kept in fp32 (cap {}).{}</p>",
                esc(&b.text),
                if b.met { "met" } else { "<span class=\"warn\">not met: best candidate written</span>" },
                b.reached,
                self.selection
                    .as_ref()
                    .map(|x| format!(" on the {} samples that chose ({})", x.samples, esc(&x.which)))
                    .unwrap_or_default(),
                b.float_nodes.len(),
                b.max_float_nodes,
                b.judged
                    .map(|j| format!(" On the report's own samples ({}): {j:.3}.", esc(&self.held_out.which)))
                    .unwrap_or_default()
            );
            h.push_str(&probe_chart(b));
        }
        if self.layer_sqnr_measured {
            let _ = write!(h, "<h2>Per-layer SQNR (written model vs fp32, accumulated)</h2>");
            h.push_str(&bar_chart(
                self.layers.iter().map(|l| (l.node.as_str(), l.sqnr_db, l.precision == "fp32")).collect(),
                "dB",
            ));
        }
        if self.layers.iter().any(|l| l.sensitivity_db.is_some()) {
            let _ = write!(
                h,
                "<h2>Sensitivity ({})</h2>",
                esc(self.sensitivity_method.unwrap_or(crate::mixed::SensitivityMethod::Exact).describe())
            );
            h.push_str(&bar_chart(
                self.layers.iter().map(|l| (l.node.as_str(), l.sensitivity_db, l.precision == "fp32")).collect(),
                "dB",
            ));
        }
        let _ = write!(
            h,
            "<h2>Layers</h2><table><tr><th>node</th><th>op</th><th>precision</th><th>SQNR dB</th><th>alone: output dB</th><th>reason</th></tr>"
        );
        for l in &self.layers {
            let _ = write!(
                h,
                "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                if l.precision == "fp32" { " class=\"fp32\"" } else { "" },
                esc(&l.node),
                esc(&l.op),
                l.precision,
                self.layer_db(l),
                opt(l.sensitivity_db, 1),
                esc(l.reason.as_deref().unwrap_or(""))
            );
        }
        h.push_str("</table>");
        if !self.float_ops.is_empty() {
            h.push_str("<h2>Other nodes left in fp32</h2><ul>");
            for (n, why) in &self.float_ops {
                let _ = write!(h, "<li>{}: {}</li>", esc(n), esc(why));
            }
            h.push_str("</ul>");
        }
        let _ = write!(
            h,
            "<p>Generated by edgepack quantize in {:.1} s. The JSON report holds the same data.</p>",
            self.seconds
        );
        if let Some(p) = &self.provenance {
            let _ = write!(h, "<p><small>{}</small></p>", esc(&p.line()));
        }
        h.push_str("</body></html>");
        h
    }
}

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Horizontal bars, one per row; fp32 rows in orange, `None` drawn as "exact".
pub(crate) fn bar_chart(rows: Vec<(&str, Option<f64>, bool)>, unit: &str) -> String {
    let finite: Vec<f64> = rows.iter().filter_map(|r| r.1).filter(|v| v.is_finite()).collect();
    let max = finite.iter().cloned().fold(1.0f64, f64::max);
    let min = finite.iter().cloned().fold(0.0f64, f64::min);
    let (label_w, bar_w, row_h) = (260.0, 600.0, 14.0);
    let height = rows.len() as f64 * row_h + 30.0;
    let x0 = label_w + bar_w * (-min) / (max - min);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" role=\"img\">",
        label_w + bar_w + 80.0
    );
    for (i, (name, v, fp32)) in rows.iter().enumerate() {
        let y = 10.0 + i as f64 * row_h;
        let short: String = name.chars().take(40).collect();
        let _ =
            write!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>", label_w - 4.0, y + 10.0, esc(&short));
        let color = if *fp32 { "#f59e0b" } else { "#2563eb" };
        match v {
            Some(v) => {
                let x = label_w + bar_w * (v - min) / (max - min);
                let (a, b) = if x >= x0 { (x0, x) } else { (x, x0) };
                let _ = write!(
                    s,
                    "<rect x=\"{a:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{}\" fill=\"{color}\"><title>{}: {v:.2} {unit}</title></rect><text x=\"{:.1}\" y=\"{}\">{v:.1}</text>",
                    y + 1.0,
                    (b - a).max(0.5),
                    row_h - 3.0,
                    esc(name),
                    b + 3.0,
                    y + 10.0
                );
            }
            None => {
                let _ = write!(s, "<text x=\"{:.1}\" y=\"{}\" fill=\"{color}\">exact</text>", x0 + 3.0, y + 10.0);
            }
        }
    }
    let _ = write!(s, "<line x1=\"{x0:.1}\" x2=\"{x0:.1}\" y1=\"5\" y2=\"{}\" stroke=\"#444\"/></svg>", height - 15.0);
    s
}

/// The search: metric against the number of fp32 nodes, with the budget line.
fn probe_chart(b: &BudgetOutcome) -> String {
    let (w, hgt, pad) = (600.0, 220.0, 40.0);
    let target = match b.budget {
        Budget::Top1Drop(v)
        | Budget::Agreement(v)
        | Budget::Sqnr(v)
        | Budget::Fidelity { db: v, .. }
        | Budget::Detections(v) => v,
        Budget::Default => f64::NAN,
    };
    let vals: Vec<f64> = b.probes.iter().map(|p| p.value).filter(|v| v.is_finite()).chain([target]).collect();
    let (lo, hi) = vals.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, c), &v| (a.min(v), c.max(v)));
    let (lo, hi) = if hi - lo < 1e-9 { (lo - 1.0, hi + 1.0) } else { (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)) };
    let kmax = b.probes.iter().map(|p| p.float_nodes).max().unwrap_or(1).max(1) as f64;
    let px = |k: usize| pad + (w - 2.0 * pad) * k as f64 / kmax;
    let py = |v: f64| hgt - pad - (hgt - 2.0 * pad) * (v.clamp(lo, hi) - lo) / (hi - lo);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{hgt}\" role=\"img\">");
    let _ = write!(
        s,
        "<line x1=\"{pad}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#b91c1c\" stroke-dasharray=\"4\"/><text x=\"{}\" y=\"{:.1}\">budget {target}</text>",
        w - pad,
        py(target),
        py(target),
        w - pad - 80.0,
        py(target) - 4.0
    );
    for p in &b.probes {
        let v = if p.value.is_finite() { p.value } else { hi };
        let _ = write!(
            s,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{}\"><title>{} fp32 node(s): {:.3}</title></circle><text x=\"{:.1}\" y=\"{}\">{}</text>",
            px(p.float_nodes),
            py(v),
            if p.met { "#16a34a" } else { "#b91c1c" },
            p.float_nodes,
            p.value,
            px(p.float_nodes) - 3.0,
            hgt - pad + 14.0,
            p.float_nodes
        );
    }
    let _ = write!(
        s,
        "<text x=\"{}\" y=\"{}\">nodes kept in fp32</text><text x=\"4\" y=\"14\">{:.2}</text><text x=\"4\" y=\"{}\">{:.2}</text></svg>",
        w / 2.0 - 50.0,
        hgt - 6.0,
        hi,
        hgt - pad,
        lo
    );
    s
}
