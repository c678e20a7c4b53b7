//! The report of one `edgepack prune` run: what was pruned and how much (per layer and group), accuracy against
//! fp32 on held-out samples, MACs, weights, file and zstd sizes, CPU latency, the sensitivity scan, the plan's
//! probes and the accuracy curve. Rendered as JSON (the data), a terminal table and a self-contained HTML page
//! with SVG plots.
use std::collections::HashMap;
use std::fmt::Write as _;

use edgepack_runtime::compress::zstd_compress;
use edgepack_runtime::onnx::Model;

use super::plan::{KnobScan, PlanOutcome};
use super::{Job, Method, Prepared, Pruner, Settings, Target, layer_costs, magnitude};
use crate::fidelity::{HeldOut, Metrics};
use crate::pipeline::Samples;
use crate::report::{Preparation, SampleInfo, bar_chart, db, esc, opt};

#[derive(Debug, Clone, serde::Serialize)]
pub struct CurvePoint {
    /// Uniform amount: overall sparsity (unstructured) or channel ratio of every group (structured).
    pub amount: f64,
    /// Exact zeros over the prunable weights.
    pub sparsity: f64,
    /// MACs left / fp32 MACs.
    pub macs_ratio: f64,
    /// The ONNX file compressed with zstd (what a compressed bundle member stores).
    pub zstd_bytes: usize,
    pub metrics: Metrics,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PruneLatency {
    pub fp32_ms: f64,
    pub pruned_ms: f64,
    /// pruned / fp32: the median over replicas (sessions built afresh) of each one's median per-pair ratio.
    pub ratio: f64,
    /// Its confidence interval (replica medians of symmetric ranks, `fidelity::order_statistic_ci`) at level
    /// `ci_level`: an upper end below 1 is a measured reduction.
    pub ratio_ci: (f64, f64),
    pub ci_level: f64,
    pub replica_ratios: Vec<f64>,
    /// Timed pairs, all replicas.
    pub runs: usize,
    pub threads: usize,
    pub backend: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PruneSize {
    pub fp32_bytes: usize,
    pub pruned_bytes: usize,
    pub fp32_zstd_bytes: usize,
    pub pruned_zstd_bytes: usize,
    /// pruned zstd / fp32 file: what the download shrinks to.
    pub zstd_ratio: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Compute {
    pub fp32_macs: u64,
    pub pruned_macs: u64,
    pub macs_ratio: f64,
    pub fp32_weights: u64,
    pub pruned_weights: u64,
    pub pruned_nonzero: u64,
    /// Exact zeros over the prunable weights of the pruned model.
    pub sparsity: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PrunedLayer {
    pub node: String,
    pub op: String,
    pub weights: u64,
    pub weights_after: u64,
    pub nonzero_after: u64,
    pub macs: u64,
    pub macs_after: u64,
    /// Amount set on this layer (unstructured) or on the group it belongs to (structured).
    pub amount: Option<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GroupRow {
    pub name: String,
    pub channels: usize,
    pub kept: usize,
    pub sources: Vec<String>,
    pub blocked: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PruneReport {
    pub model: String,
    pub output: String,
    pub method: Method,
    pub target: Target,
    pub repair: bool,
    pub statistics: SampleInfo,
    pub held_out: SampleInfo,
    pub preparation: Preparation,
    pub fp32: Metrics,
    pub pruned: Metrics,
    pub plan: Option<PlanOutcome>,
    pub size: PruneSize,
    pub compute: Compute,
    pub latency: Option<PruneLatency>,
    pub layers: Vec<PrunedLayer>,
    pub groups: Vec<GroupRow>,
    pub sensitivity: Vec<KnobScan>,
    pub curve: Vec<CurvePoint>,
    pub warnings: Vec<String>,
    pub seconds: f64,
}

pub(crate) struct Parts<'a> {
    pub job: &'a Job<'a>,
    pub prep: &'a Prepared,
    pub pruner: &'a Pruner<'a>,
    pub pruned: &'a Model,
    pub positions: &'a HashMap<String, usize>,
    pub settings: &'a Settings,
    pub held: &'a HeldOut,
    pub held_source: &'a Samples<'a>,
    pub metrics: Metrics,
    pub scan: Vec<KnobScan>,
    pub outcome: Option<PlanOutcome>,
    pub curve: Vec<CurvePoint>,
    pub latency: Option<PruneLatency>,
    pub warnings: Vec<String>,
    pub seconds: f64,
}

impl PruneReport {
    pub(crate) fn assemble(p: Parts) -> PruneReport {
        let fp32_model = &p.prep.model;
        let before = layer_costs(fp32_model, p.positions);
        let after = layer_costs(p.pruned, p.positions);
        // Group of each source/depthwise/consumer node, for the per-layer amount (structured).
        let mut node_group: HashMap<String, String> = HashMap::new();
        let mut groups = Vec::new();
        if let Method::Structured { multiple, .. } = p.job.method {
            for g in &p.pruner.groups.groups {
                let kept = p
                    .settings
                    .get(&g.name)
                    .map(|&r| super::channels::kept_channels(g.channels, r, multiple))
                    .unwrap_or(g.channels);
                for s in &g.sources {
                    node_group.insert(s.clone(), g.name.clone());
                }
                groups.push(GroupRow {
                    name: g.name.clone(),
                    channels: g.channels,
                    kept: if g.prunable() { kept } else { g.channels },
                    sources: g.sources.clone(),
                    blocked: g.blocked.clone(),
                });
            }
        }
        let layers: Vec<PrunedLayer> = magnitude::layers(fp32_model)
            .into_iter()
            .map(|l| {
                let b = before.get(&l.node).copied().unwrap_or_default();
                let a = after.get(&l.node).copied().unwrap_or_default();
                let amount = match p.job.method {
                    Method::Structured { .. } => node_group.get(&l.node).and_then(|g| p.settings.get(g)).copied(),
                    Method::Unstructured { .. } => p.settings.get(&l.node).copied(),
                };
                PrunedLayer {
                    node: l.node,
                    op: l.op,
                    weights: b.1,
                    weights_after: a.1,
                    nonzero_after: a.2,
                    macs: b.0,
                    macs_after: a.0,
                    amount,
                }
            })
            .collect();
        let sum = |f: &dyn Fn(&PrunedLayer) -> u64| layers.iter().map(f).sum::<u64>();
        let (fm, pm) = (sum(&|l| l.macs), sum(&|l| l.macs_after));
        let (fw, pw, pnz) = (sum(&|l| l.weights), sum(&|l| l.weights_after), sum(&|l| l.nonzero_after));
        let fp32_bytes = fp32_model.to_bytes();
        let pruned_bytes = p.pruned.to_bytes();
        let pruned_zstd = zstd_compress(&pruned_bytes).len();
        PruneReport {
            model: p.job.model_name.clone(),
            output: p.job.output_name.clone(),
            method: p.job.method,
            target: p.job.target,
            repair: p.job.repair,
            statistics: p.job.calib.info(p.job.calib.range.len(), false),
            held_out: p.held_source.info(p.held.len(), p.held.labelled()),
            preparation: p.prep.preparation.clone(),
            fp32: p.held.fp32.clone(),
            pruned: p.metrics,
            plan: p.outcome,
            size: PruneSize {
                fp32_bytes: fp32_bytes.len(),
                pruned_bytes: pruned_bytes.len(),
                fp32_zstd_bytes: zstd_compress(&fp32_bytes).len(),
                pruned_zstd_bytes: pruned_zstd,
                zstd_ratio: pruned_zstd as f64 / fp32_bytes.len().max(1) as f64,
            },
            compute: Compute {
                fp32_macs: fm,
                pruned_macs: pm,
                macs_ratio: pm as f64 / fm.max(1) as f64,
                fp32_weights: fw,
                pruned_weights: pw,
                pruned_nonzero: pnz,
                sparsity: 1.0 - pnz as f64 / pw.max(1) as f64,
            },
            latency: p.latency,
            layers,
            groups,
            sensitivity: p.scan,
            curve: p.curve,
            warnings: p.warnings,
            seconds: p.seconds,
        }
    }

    fn method_text(&self) -> String {
        match self.method {
            Method::Unstructured { scope } => format!("unstructured magnitude ({scope:?} scope)").to_lowercase(),
            Method::Structured { criterion, multiple } => {
                format!("structured channels ({criterion:?} criterion, kept counts rounded to {multiple})")
                    .to_lowercase()
            }
        }
    }

    fn target_text(&self) -> String {
        match &self.target {
            Target::Amount(a) => format!("uniform amount {a}"),
            Target::Budget(b) => format!("plan under budget {b}"),
        }
    }

    /// Summary lines, then the layers that changed.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let (f, q) = (&self.fp32, &self.pruned);
        let _ = writeln!(s, "{} → {}", self.model, self.output);
        let _ = writeln!(s, "  method      {}; {}; repair {}", self.method_text(), self.target_text(), self.repair);
        let _ = writeln!(s, "  held-out    {} samples ({})", q.samples, self.held_out.which);
        if f.top1.is_some() {
            let _ = writeln!(s, "  top-1 %     fp32 {}  pruned {}", opt(f.top1, 2), opt(q.top1, 2));
        }
        if q.top1_agreement.is_some() {
            let _ = writeln!(s, "  agreement % {}", opt(q.top1_agreement, 2));
        }
        let _ = writeln!(s, "  output SQNR {} dB", db(q.output_sqnr_db));
        let c = &self.compute;
        let _ = writeln!(
            s,
            "  MACs        {:.1} M → {:.1} M ({:.1} %)",
            c.fp32_macs as f64 / 1e6,
            c.pruned_macs as f64 / 1e6,
            100.0 * c.macs_ratio
        );
        let _ = writeln!(
            s,
            "  weights     {} → {} ({} nonzero, sparsity {:.1} %)",
            c.fp32_weights,
            c.pruned_weights,
            c.pruned_nonzero,
            100.0 * c.sparsity
        );
        let z = &self.size;
        let _ = writeln!(
            s,
            "  size        {} → {} bytes; zstd {} → {} bytes ({:.1} % of the fp32 file)",
            z.fp32_bytes,
            z.pruned_bytes,
            z.fp32_zstd_bytes,
            z.pruned_zstd_bytes,
            100.0 * z.zstd_ratio
        );
        if let Some(l) = &self.latency {
            let _ = writeln!(
                s,
                "  latency     fp32 {:.2} ms, pruned {:.2} ms: ×{:.3} ({:.1} % CI ×{:.3}–×{:.3}; median ratio of {} interleaved \
                 pairs in {} replicas, {})",
                l.fp32_ms,
                l.pruned_ms,
                l.ratio,
                100.0 * l.ci_level,
                l.ratio_ci.0,
                l.ratio_ci.1,
                l.runs,
                l.replica_ratios.len(),
                l.backend
            );
        }
        if let Some(p) = &self.plan {
            let _ = writeln!(
                s,
                "  plan        {}: {} (reached {:.3}) with {} of {} steps",
                p.text,
                if p.met { "met" } else { "NOT met" },
                p.reached,
                p.chosen,
                p.candidates.saturating_sub(1)
            );
        }
        for w in &self.warnings {
            let _ = writeln!(s, "  warning     {w}");
        }
        let _ = writeln!(s, "  {:<48} {:>8} {:>12} {:>12} {:>9}", "layer", "amount", "weights", "MACs", "sparsity");
        for l in self.layers.iter().filter(|l| l.macs_after != l.macs || l.nonzero_after != l.weights) {
            let _ = writeln!(
                s,
                "  {:<48} {:>8} {:>5}→{:<6} {:>5}→{:<6} {:>8.1}%",
                l.node.chars().take(48).collect::<String>(),
                opt(l.amount, 3),
                short(l.weights),
                short(l.weights_after),
                short(l.macs),
                short(l.macs_after),
                100.0 * (1.0 - l.nonzero_after as f64 / l.weights_after.max(1) as f64)
            );
        }
        s
    }

    /// A self-contained HTML page (no scripts, no external resources) with SVG plots.
    pub fn html(&self) -> String {
        let mut h = String::new();
        let _ = write!(
            h,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>edgepack prune: {}</title><style>\
             body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}\
             td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}\
             .warn{{color:#b91c1c}}svg text{{font-size:11px}}</style></head><body>",
            esc(&self.model)
        );
        let _ = write!(
            h,
            "<h1>Pruning report</h1><p><b>{}</b> → <b>{}</b>: {}; {}; bias correction {}. Statistics: {} samples of {} ({}); held-out: {} samples ({}).</p>",
            esc(&self.model),
            esc(&self.output),
            esc(&self.method_text()),
            esc(&self.target_text()),
            if self.repair { "on" } else { "off" },
            self.statistics.samples,
            esc(&self.statistics.source),
            esc(&self.statistics.which),
            self.pruned.samples,
            esc(&self.held_out.which)
        );
        for w in &self.warnings {
            let _ = write!(h, "<p class=\"warn\">warning: {}</p>", esc(w));
        }
        let (f, q, c, z) = (&self.fp32, &self.pruned, &self.compute, &self.size);
        let _ = write!(h, "<h2>Summary</h2><table><tr><th></th><th>fp32</th><th>pruned</th></tr>");
        if f.top1.is_some() {
            let _ = write!(h, "<tr><td>top-1 %</td><td>{}</td><td>{}</td></tr>", opt(f.top1, 2), opt(q.top1, 2));
            let _ = write!(h, "<tr><td>top-5 %</td><td>{}</td><td>{}</td></tr>", opt(f.top5, 2), opt(q.top5, 2));
        }
        if q.top1_agreement.is_some() {
            let _ = write!(h, "<tr><td>top-1 agreement %</td><td>100</td><td>{}</td></tr>", opt(q.top1_agreement, 2));
        }
        let _ = write!(h, "<tr><td>output SQNR dB</td><td>exact</td><td>{}</td></tr>", db(q.output_sqnr_db));
        let _ = write!(
            h,
            "<tr><td>MACs (Conv/Gemm)</td><td>{}</td><td>{} ({:.1} %)</td></tr>",
            c.fp32_macs,
            c.pruned_macs,
            100.0 * c.macs_ratio
        );
        let _ = write!(
            h,
            "<tr><td>weights / nonzero</td><td>{}</td><td>{} / {} (sparsity {:.1} %)</td></tr>",
            c.fp32_weights,
            c.pruned_weights,
            c.pruned_nonzero,
            100.0 * c.sparsity
        );
        let _ = write!(h, "<tr><td>ONNX bytes</td><td>{}</td><td>{}</td></tr>", z.fp32_bytes, z.pruned_bytes);
        let _ = write!(
            h,
            "<tr><td>zstd bytes</td><td>{}</td><td>{} ({:.1} % of the fp32 file)</td></tr>",
            z.fp32_zstd_bytes,
            z.pruned_zstd_bytes,
            100.0 * z.zstd_ratio
        );
        if let Some(l) = &self.latency {
            let _ = write!(
                h,
                "<tr><td>CPU latency ms (medians; the ratio is the median over {} replicas of {} interleaved pairs' \
                 ratios, with its {:.1} % CI; {})</td><td>{:.2}</td><td>{:.2} (×{:.3}, CI ×{:.3}–×{:.3})</td></tr>",
                l.replica_ratios.len(),
                l.runs,
                100.0 * l.ci_level,
                esc(&l.backend),
                l.fp32_ms,
                l.pruned_ms,
                l.ratio,
                l.ratio_ci.0,
                l.ratio_ci.1
            );
        }
        h.push_str("</table>");
        if !self.curve.is_empty() {
            let metric = if f.top1.is_some() { "top-1 %" } else { "top-1 agreement %" };
            let _ = write!(h, "<h2>Accuracy against the uniform amount</h2>");
            let pts: Vec<(f64, f64)> = self
                .curve
                .iter()
                .filter_map(|p| Some((p.amount, p.metrics.top1.or(p.metrics.top1_agreement)?)))
                .collect();
            h.push_str(&line_chart(&pts, "amount pruned", metric, f.top1));
            let _ = write!(
                h,
                "<table><tr><th>amount</th><th>sparsity %</th><th>MACs %</th><th>zstd bytes</th><th>top-1 %</th><th>agreement %</th><th>SQNR dB</th></tr>"
            );
            for p in &self.curve {
                let _ = write!(
                    h,
                    "<tr><td>{:.3}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    p.amount,
                    100.0 * p.sparsity,
                    100.0 * p.macs_ratio,
                    p.zstd_bytes,
                    opt(p.metrics.top1, 2),
                    opt(p.metrics.top1_agreement, 2),
                    db(p.metrics.output_sqnr_db)
                );
            }
            h.push_str("</table>");
        }
        if let Some(p) = &self.plan {
            let _ = write!(
                h,
                "<h2>Plan: {}</h2><p>{}: reached {:.3} with {} of {} steps. Probes (cost left against the budget's metric):</p>",
                esc(&p.text),
                if p.met { "met" } else { "<span class=\"warn\">not met</span>" },
                p.reached,
                p.chosen,
                p.candidates.saturating_sub(1)
            );
            let pts: Vec<(f64, f64)> = p.probes.iter().map(|x| (1.0 - x.remaining, x.value)).collect();
            h.push_str(&line_chart(&pts, "fraction of the cost removed", "budget metric", None));
        }
        if !self.sensitivity.is_empty() {
            let _ = write!(h, "<h2>Sensitivity (output SQNR with one knob pruned, at its largest level)</h2>");
            h.push_str(&bar_chart(
                self.sensitivity
                    .iter()
                    .map(|k| (k.knob.as_str(), k.points.last().and_then(|p| p.output_sqnr_db), false))
                    .collect(),
                "dB",
            ));
        }
        if !self.groups.is_empty() {
            let _ = write!(
                h,
                "<h2>Channel groups</h2><table><tr><th>group</th><th>channels</th><th>kept</th><th>sources</th><th>blocked</th></tr>"
            );
            for g in &self.groups {
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&g.name),
                    g.channels,
                    g.kept,
                    g.sources.len(),
                    esc(g.blocked.as_deref().unwrap_or(""))
                );
            }
            h.push_str("</table>");
        }
        let _ = write!(
            h,
            "<h2>Layers</h2><table><tr><th>node</th><th>op</th><th>amount</th><th>weights</th><th>after</th><th>nonzero</th><th>MACs</th><th>after</th></tr>"
        );
        for l in &self.layers {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&l.node),
                esc(&l.op),
                opt(l.amount, 3),
                l.weights,
                l.weights_after,
                l.nonzero_after,
                l.macs,
                l.macs_after
            );
        }
        let _ = write!(
            h,
            "</table><p>Generated by edgepack prune in {:.1} s. The JSON report holds the same data.</p></body></html>",
            self.seconds
        );
        h
    }
}

fn short(v: u64) -> String {
    match v {
        v if v >= 10_000_000 => format!("{}M", v / 1_000_000),
        v if v >= 10_000 => format!("{}k", v / 1_000),
        v => v.to_string(),
    }
}

/// Points joined by a line, with an optional horizontal reference (the fp32 value).
fn line_chart(pts: &[(f64, f64)], xlabel: &str, ylabel: &str, reference: Option<f64>) -> String {
    let (w, hgt, pad) = (640.0, 260.0, 46.0);
    let ys: Vec<f64> = pts.iter().map(|p| p.1).chain(reference).filter(|v| v.is_finite()).collect();
    let (lo, hi) = ys.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let (lo, hi) = if !lo.is_finite() || hi - lo < 1e-9 { (lo.min(0.0) - 1.0, hi.max(0.0) + 1.0) } else { (lo, hi) };
    let xmax = pts.iter().map(|p| p.0).fold(0.0f64, f64::max).max(1e-9);
    let px = |x: f64| pad + (w - 2.0 * pad) * x / xmax;
    let py = |y: f64| hgt - pad - (hgt - 2.0 * pad) * (y.clamp(lo, hi) - lo) / (hi - lo);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{hgt}\" role=\"img\">");
    if let Some(r) = reference {
        let _ = write!(
            s,
            "<line x1=\"{pad}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#888\" stroke-dasharray=\"4\"/><text x=\"{}\" y=\"{:.1}\">fp32 {r:.2}</text>",
            w - pad,
            py(r),
            py(r),
            w - pad - 70.0,
            py(r) - 4.0
        );
    }
    let path: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
    let _ = write!(s, "<polyline fill=\"none\" stroke=\"#2563eb\" points=\"{}\"/>", path.join(" "));
    for &(x, y) in pts {
        let _ = write!(
            s,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#2563eb\"><title>{x:.3}: {y:.2}</title></circle>",
            px(x),
            py(y)
        );
    }
    let _ = write!(
        s,
        "<text x=\"{}\" y=\"{}\">{}</text><text x=\"4\" y=\"14\">{} {hi:.1}</text><text x=\"4\" y=\"{}\">{lo:.1}</text><text x=\"{pad}\" y=\"{}\">0</text><text x=\"{}\" y=\"{}\">{xmax:.2}</text></svg>",
        w / 2.0 - 60.0,
        hgt - 6.0,
        esc(xlabel),
        esc(ylabel),
        hgt - pad,
        hgt - pad + 14.0,
        w - pad - 10.0,
        hgt - pad + 14.0
    );
    s
}
