//! `edgepack prune`: arguments and output files; the job is `edgepack_quantize::prune::run`.
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use edgepack_quantize::prune::{self, Criterion, Method, Scope, Target};
use edgepack_runtime::Device;
use serde_json::json;

use crate::LoadArgs;
use crate::commands::{
    SampleSets, Usage, check_job_outputs, image_preprocess, open_with_graph, preset_parser, session_options,
    with_progress, write_model_and_report,
};

#[derive(Args)]
pub struct PruneArgs {
    /// fp32 model (.onnx) or bundle (its first variant and pre-processing are used)
    model: PathBuf,
    /// Samples for the statistics (bias correction, the contribution criterion): a folder of images/.npy, a
    /// labelled folder (labels.csv + images/, class folders) or an IDX file with --idx-labels
    #[arg(long)]
    calib: PathBuf,
    /// IDX label file (MNIST format) when --calib is an IDX image file
    #[arg(long)]
    idx_labels: Option<PathBuf>,
    /// Statistics samples: the first N of --calib
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    calib_limit: u32,
    /// Held-out samples for accuracy, the plan and the curve: the next N after the statistics samples (or the
    /// first N of --eval)
    #[arg(long, default_value_t = 200)]
    holdout: usize,
    /// Take the held-out samples from this folder instead (same layouts as --calib)
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Take the statistics and held-out samples in a fixed shuffled order (for datasets sorted by class)
    #[arg(long)]
    shuffle: bool,
    /// The order --shuffle uses: the same seed gives the same samples on every machine
    #[arg(long, default_value_t = crate::commands::DEFAULT_SEED)]
    seed: u64,
    /// Pre-processing preset for a bare .onnx model fed with images
    #[arg(long, value_parser = preset_parser())]
    preset: Option<String>,
    /// structured (remove channels: faster) or unstructured (zero weights: smaller compressed)
    #[arg(long, default_value = "structured", value_parser = ["structured", "unstructured"])]
    method: String,
    /// Uniform amount: sparsity (unstructured) or fraction of each group's channels (structured), 0..1
    #[arg(long)]
    amount: Option<f64>,
    /// Plan the largest reduction (MACs when structured, weights when unstructured) within this budget on the
    /// held-out samples: top1-drop=PT, agreement=PCT or sqnr=DB
    #[arg(long)]
    budget: Option<String>,
    /// Unstructured: global (one magnitude threshold) or layer (the same fraction of each layer)
    #[arg(long, default_value = "global", value_parser = ["global", "layer"])]
    scope: String,
    /// Structured channel ranking: reconstruction (‖W‖²·Var(x | other channels) at the consumers: redundant
    /// channels first; uses the samples), contribution (E|x|·‖W‖), l1, l2, bn-scale (needs BatchNormalization
    /// after the convs)
    #[arg(long, default_value = "reconstruction")]
    criterion: String,
    /// Structured: kept channel counts are rounded up to a multiple of this (at most the group's count). 16 is the
    /// CPU kernels' f32 tile: a count between two multiples costs as much as the larger one
    #[arg(long, default_value_t = 16)]
    round_to: usize,
    /// Amounts tried per layer/group by the sensitivity scan (with --budget)
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,0.75")]
    levels: Vec<f64>,
    /// Held-out samples per scan point
    #[arg(long, default_value_t = 16)]
    sensitivity_samples: usize,
    /// Uniform amounts to evaluate for the report's accuracy curve, e.g. 0.1,0.2,0.3
    #[arg(long, value_delimiter = ',')]
    curve: Vec<f64>,
    /// No bias correction
    #[arg(long)]
    no_repair: bool,
    /// Timed pairs (interleaved fp32/pruned, spread over --latency-replicas rounds of freshly built sessions) for
    /// the CPU latency (0 = skip)
    #[arg(long, default_value_t = 64)]
    latency_runs: usize,
    /// Rounds of freshly built sessions for the latency: the confidence interval comes from their medians
    #[arg(long, default_value_t = prune::LATENCY_REPLICAS)]
    latency_replicas: usize,
    /// Output ONNX file
    #[arg(short, long)]
    out: PathBuf,
    /// Report (JSON; an .html page is written beside it). Default: OUT.prune.json
    #[arg(long)]
    report: Option<PathBuf>,
    /// Exit with code 1 when the pruned model collapsed (see the warning) or missed its --budget; the files are
    /// written either way, for inspection
    #[arg(long)]
    strict: bool,
    /// Print a JSON document instead of text
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    load: LoadArgs,
}

pub fn prune(a: PruneArgs) -> Result<()> {
    let method = match a.method.as_str() {
        "unstructured" => Method::Unstructured { scope: if a.scope == "layer" { Scope::Layer } else { Scope::Global } },
        _ => Method::Structured {
            criterion: a.criterion.parse::<Criterion>().map_err(|e| Usage(format!("--criterion: {e}")))?,
            multiple: a.round_to.max(1),
        },
    };
    let target = match (a.amount, &a.budget) {
        (Some(x), None) if (0.0..1.0).contains(&x) => Target::Amount(x),
        (Some(x), None) => bail!(Usage(format!("--amount {x} must be within [0, 1)"))),
        (None, Some(b)) => Target::Budget(b.parse().map_err(|e| Usage(format!("--budget: {e}")))?),
        _ => bail!(Usage("give exactly one of --amount or --budget".into())),
    };
    if a.levels.iter().chain(&a.curve).any(|x| !(0.0..1.0).contains(x)) {
        bail!(Usage("--levels and --curve amounts must be within [0, 1)".into()));
    }
    check_job_outputs(&a.out, a.report.as_deref(), ".prune.json")?;
    let mut opts = session_options(&a.load)?;
    // Every candidate is a new model: an automatic device choice would measure the GPU for each one.
    if opts.device == Device::Auto {
        opts.device = Device::Cpu;
    }
    let (s, model, _) = open_with_graph(&a.model, &opts)?;
    let pre = image_preprocess(&s, a.preset.as_deref())?;
    let sets = SampleSets::open(
        &a.calib,
        a.idx_labels.as_deref(),
        a.calib_limit as usize,
        a.eval.as_deref(),
        a.holdout,
        a.shuffle.then_some(a.seed),
        &s.inputs().iter().map(|i| i.name.clone()).collect::<Vec<_>>(),
    )?;
    let job = prune::Job {
        model: &model,
        model_name: a.model.display().to_string(),
        output_name: a.out.display().to_string(),
        method,
        target,
        calib: sets.calib(),
        held_out: Some(sets.held_out()),
        pre: pre.as_ref(),
        repair: !a.no_repair,
        levels: a.levels.clone(),
        sensitivity_samples: a.sensitivity_samples,
        curve: a.curve.clone(),
        latency_runs: a.latency_runs,
        latency_replicas: a.latency_replicas,
        session: opts,
        held_out_max_bytes: 1 << 30,
    };
    let (pruned, report) = with_progress(|on| prune::run(&job, on))?;
    let (report_path, html_path) = write_model_and_report(
        &a.out,
        &pruned.to_bytes(),
        a.report.as_deref(),
        ".prune.json",
        &serde_json::to_string_pretty(&report)?,
        &report.html(),
    )?;
    if a.json {
        crate::output::json(
            json!({"out": a.out, "report_json": report_path, "report_html": html_path, "report": report}),
        )?;
    } else {
        print!("{}", report.table());
        println!(
            "wrote {}, {} and {} in {:.1} s",
            a.out.display(),
            report_path.display(),
            html_path.display(),
            report.seconds
        );
    }
    // The report's warnings (a collapse, a budget missed), loudly on stderr whatever the output format.
    for w in &report.warnings {
        crate::output::warn(w);
    }
    if let Some(p) = &report.plan
        && !p.met
    {
        crate::output::warn(format!("budget {} not met; see the report", p.text));
    }
    if a.strict && (!report.warnings.is_empty() || report.plan.as_ref().is_some_and(|p| !p.met)) {
        bail!("--strict: the pruned model did not hold (see the warnings above); it was written for inspection");
    }
    Ok(())
}
