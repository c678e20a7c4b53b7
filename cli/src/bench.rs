//! `edgepack bench`: load time, first-run time, latency statistics, throughput and peak RSS of one model (the
//! figures of `trtexec`), per-run timings (`--csv`), a stability check, a per-op profile and a Chrome trace; or,
//! with `--url`, a load client for a running `edgepack serve` at a concurrency sweep (as Triton's
//! `perf_analyzer` does).
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use edgepack_runtime::onnx::Dim;
use edgepack_runtime::{DType, Tensor};
use serde_json::json;

use crate::LoadArgs;
use crate::commands::{Usage, backend_json, check_writable, open_session, parse_shape};

mod load;

#[derive(Args)]
pub struct BenchArgs {
    /// Model (.onnx) or bundle (.edgepack); with --url, the model's name on the server
    model: String,
    /// Timed runs (with --duration: at least this many)
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Time the model for this many seconds instead of a number of runs (with --url: per concurrency level)
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Untimed runs after the first one
    #[arg(long, default_value_t = 5)]
    warmup: u32,
    /// Batch size used for symbolic first dimensions
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Concrete shape for an input: NAME=1,3,224,224 (needed for symbolic dims other than the batch)
    #[arg(long = "shape", value_name = "NAME=DIMS")]
    shapes: Vec<String>,
    /// Also time every operation and print the time per op type
    #[arg(long)]
    profile: bool,
    /// Write a Chrome trace (chrome://tracing, Perfetto) of profiled runs, one event per node, named by node
    #[arg(long, value_name = "FILE.json")]
    trace: Option<PathBuf>,
    /// Write every timed run's latency as CSV (run,latency_ms)
    #[arg(long, value_name = "FILE.csv")]
    csv: Option<PathBuf>,
    /// The windows of the stability check (three consecutive windows of the timed runs) may differ by this % at
    /// most (their medians); beyond it the result is flagged unstable
    #[arg(long, default_value_t = 10.0)]
    stability_pct: f64,
    /// Benchmark a running `edgepack serve` at this base URL (http://HOST:PORT) instead of a local model
    #[arg(long)]
    url: Option<String>,
    /// With --url: concurrent clients, one level after the other
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    concurrency: Vec<usize>,
    /// With --url: send tensors as KServe binary data (the extension tritonclient uses) instead of JSON
    #[arg(long)]
    binary: bool,
    /// Record the resident set size (and open file descriptors) after every N timed runs, for soak tests: a run
    /// that leaks shows a growing series; the report gives its growth after the first sample
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    rss_every: Option<u32>,
    /// Print a JSON document instead of text
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    load: LoadArgs,
}

/// A `kB` field of this process's `/proc/self/status` (Linux: `VmHWM`, `VmRSS`) in bytes, if known.
fn status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident set size of this process in bytes (Linux: VmHWM), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM")
}

/// Resident set size of this process in bytes now (Linux: VmRSS), if known.
pub fn rss_bytes() -> Option<u64> {
    status_bytes("VmRSS")
}

/// Open file descriptors of this process (Linux), if known.
pub fn open_fds() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

/// A soak series: (runs so far, RSS MiB, open fds) samples, and how far the later samples rose above the first
/// (per cent; the first sample is taken after N runs, past the warm-up).
fn soak_json(samples: &[(usize, f64, Option<usize>)]) -> serde_json::Value {
    let first = samples.first().map_or(0.0, |s| s.1);
    let growth = |v: f64| if first > 0.0 { 100.0 * (v - first) / first } else { 0.0 };
    let max_later = samples.iter().skip(1).map(|s| s.1).fold(first, f64::max);
    let fds: Vec<usize> = samples.iter().filter_map(|s| s.2).collect();
    json!({
        "samples": samples.iter().map(|s| json!({"run": s.0, "rss_mb": s.1, "open_fds": s.2})).collect::<Vec<_>>(),
        "rss_growth_pct": growth(max_later),
        "fds_first": fds.first(),
        "fds_max": fds.iter().max(),
    })
}

/// Latency statistics of a set of timings (milliseconds).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub min_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    pub stddev_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

impl Stats {
    pub fn of(times: &[f64]) -> Option<Stats> {
        if times.is_empty() {
            return None;
        }
        let mut s = times.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len() as f64;
        let mean = s.iter().sum::<f64>() / n;
        let var = s.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0).max(1.0);
        Some(Stats {
            min_ms: s[0],
            max_ms: s[s.len() - 1],
            mean_ms: mean,
            stddev_ms: var.sqrt(),
            p50_ms: percentile(&s, 0.5),
            p90_ms: percentile(&s, 0.9),
            p95_ms: percentile(&s, 0.95),
            p99_ms: percentile(&s, 0.99),
        })
    }
}

/// perf_analyzer's stability rule: the timed runs in three consecutive windows, whose medians must lie within
/// `pct` % of each other. Returns (stable, the window medians); too few runs for three windows count as stable.
pub fn stability(times: &[f64], pct: f64) -> (bool, Vec<f64>) {
    if times.len() < 6 {
        return (true, vec![]);
    }
    let w = times.len() / 3;
    let medians: Vec<f64> = (0..3)
        .map(|k| {
            let mut x = times[k * w..(k + 1) * w].to_vec();
            x.sort_by(f64::total_cmp);
            percentile(&x, 0.5)
        })
        .collect();
    let (lo, hi) = medians.iter().fold((f64::MAX, 0f64), |(a, b), &m| (a.min(m), b.max(m)));
    (hi <= lo * (1.0 + pct / 100.0), medians)
}

/// A Chrome trace (the JSON array format of chrome://tracing and Perfetto): one complete event per executed node.
fn chrome_trace(t: &edgepack_runtime::backend::Timeline, model: &str, backend: &str) -> serde_json::Value {
    let events: Vec<_> = t
        .events
        .iter()
        .map(|e| {
            json!({"name": e.node, "cat": e.op, "ph": "X", "ts": e.start_us, "dur": e.dur_us, "pid": 1, "tid": 1,
                   "args": {"op": e.op, "run": e.run}})
        })
        .collect();
    json!({"traceEvents": events, "displayTimeUnit": "ms",
           "otherData": {"model": model, "backend": backend, "runs": t.runs, "edgepack_version": edgepack_runtime::VERSION}})
}

fn write_csv(path: &std::path::Path, times: &[f64]) -> Result<()> {
    let mut csv = String::from("run,latency_ms\n");
    for (i, t) in times.iter().enumerate() {
        csv.push_str(&format!("{i},{t:.6}\n"));
    }
    edgepack_runtime::fsutil::write_atomic(path, csv.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// The input shape to feed: `--shape NAME=DIMS`, else the declared one with `batch` for a symbolic first dim.
pub fn input_shape(name: &str, shape: &[Dim], display: &str, shapes: &[String], batch: usize) -> Result<Vec<usize>> {
    let given = shapes.iter().find_map(|kv| kv.split_once('=').filter(|(n, _)| *n == name).map(|(_, d)| d));
    if let Some(d) = given {
        return parse_shape(d).map_err(|e| Usage(format!("--shape {name}={d}: {e}")).into());
    }
    if shape.iter().skip(1).any(|d| matches!(d, Dim::Symbolic(_))) {
        bail!(Usage(format!("input `{name}` {display} has symbolic dims: pass --shape {name}=...")));
    }
    Ok(shape
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Dim::Fixed(n) => *n,
            Dim::Symbolic(_) if i == 0 => batch,
            Dim::Symbolic(_) => 1,
        })
        .collect())
}

pub fn bench(a: BenchArgs) -> Result<()> {
    for shape in &a.shapes {
        if shape.split_once('=').is_none() {
            bail!(Usage(format!("--shape expects NAME=DIMS, got `{shape}`")));
        }
    }
    if let Some(d) = a.duration
        && !(d > 0.0 && d.is_finite())
    {
        bail!(Usage(format!("--duration {d} must be a positive number of seconds")));
    }
    let outputs: Vec<&std::path::Path> = a.trace.iter().chain(&a.csv).map(PathBuf::as_path).collect();
    check_writable(&outputs)?;
    if let Some(url) = &a.url {
        return load::bench_url(url, &a);
    }
    let model = PathBuf::from(&a.model);
    let t0 = Instant::now();
    let s = open_session(&model, &a.load)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut feeds = Vec::new();
    for (k, i) in s.inputs().iter().enumerate() {
        let shape = input_shape(&i.name, &i.shape, &i.shape_string(), &a.shapes, a.batch as usize)?;
        feeds.push((i.name.clone(), Tensor::synthetic(i.dtype.unwrap_or(DType::F32), shape, k as u64 + 1)?));
    }
    let batch = feeds.first().and_then(|f| f.1.shape().first().copied()).unwrap_or(1).max(1);
    let t1 = Instant::now();
    s.run(feeds.clone())?;
    let first_ms = t1.elapsed().as_secs_f64() * 1e3;
    for _ in 0..a.warmup {
        s.run(feeds.clone())?;
    }
    let mut times = Vec::with_capacity(a.runs as usize);
    let until = a.duration.map(Duration::from_secs_f64);
    let all = Instant::now();
    // Device counters over the timed runs: the most any run allocated, the last run's dispatches.
    let mut counters = s.run_counters();
    let mut soak = Vec::new();
    while times.len() < a.runs as usize || until.is_some_and(|d| all.elapsed() < d) {
        let f = feeds.clone();
        let t = Instant::now();
        s.run(f)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if let Some(n) = a.rss_every
            && times.len() % n as usize == 0
        {
            let mb = rss_bytes().map_or(0.0, |b| b as f64 / (1 << 20) as f64);
            soak.push((times.len(), mb, open_fds()));
        }
        if let (Some(c), Some(now)) = (counters.as_mut(), s.run_counters()) {
            c.alloc_bytes = if times.len() == 1 { now.alloc_bytes } else { c.alloc_bytes.max(now.alloc_bytes) };
            c.dispatches = now.dispatches;
            c.submissions = now.submissions;
        }
    }
    let wall = all.elapsed().as_secs_f64();
    let stats = Stats::of(&times).context("no timed run")?;
    let (stable, windows) = stability(&times, a.stability_pct);
    let profiled_runs = (times.len()).min(20);
    let profile = if a.profile { Some(s.profile(feeds.clone(), profiled_runs)?) } else { None };
    if let Some(path) = &a.trace {
        let t = s.trace(feeds.clone(), profiled_runs.min(5))?;
        let doc = chrome_trace(&t, &a.model, &s.backend_description());
        edgepack_runtime::fsutil::write_atomic(path, serde_json::to_string(&doc)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.csv {
        write_csv(path, &times)?;
    }
    if !stable {
        crate::output::warn(format!(
            "unstable: the medians of three consecutive windows of runs ({}) differ by more than {} %; close other \
             programs, or time longer (--duration)",
            windows.iter().map(|m| format!("{m:.3} ms")).collect::<Vec<_>>().join(", "),
            a.stability_pct
        ));
    }
    let threads = s.backend_info().threads;
    let res = json!({
        "model": a.model,
        "variant": s.bundle().map(|b| b.variant.clone()),
        "backend": backend_json(&s),
        "threads": threads,
        "batch": batch,
        "runs": times.len(),
        "seconds": wall,
        "load_ms": load_ms,
        "first_run_ms": first_ms,
        "latency": stats,
        "p50_ms": stats.p50_ms,
        "p90_ms": stats.p90_ms,
        "p99_ms": stats.p99_ms,
        "mean_ms": stats.mean_ms,
        "throughput_per_s": (batch * times.len()) as f64 / wall,
        "stability": {"stable": stable, "window_p50_ms": windows, "limit_pct": a.stability_pct},
        "times_ms": times,
        "peak_rss_mb": peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64),
        "soak": a.rss_every.map(|_| soak_json(&soak)),
        "gpu_dispatches_per_run": counters.map(|c| c.dispatches),
        "gpu_submissions_per_run": counters.map(|c| c.submissions),
        "gpu_alloc_bytes_per_run": counters.map(|c| c.alloc_bytes),
        "gpu_activation_bytes": counters.map(|c| c.activation_bytes),
        "profile": profile,
        "trace": a.trace,
    });
    if a.json {
        return crate::output::json(res);
    }
    println!("{} — {}", a.model, s.backend_description());
    println!("  load        {load_ms:>9.1} ms");
    println!("  first run   {first_ms:>9.2} ms");
    println!(
        "  latency     p50 {:.3} ms   p90 {:.3} ms   p99 {:.3} ms   ({} runs in {wall:.1} s, batch {batch})",
        stats.p50_ms,
        stats.p90_ms,
        stats.p99_ms,
        times.len()
    );
    println!(
        "              min {:.3} ms   max {:.3} ms   mean {:.3} ms   stddev {:.3} ms   {}",
        stats.min_ms,
        stats.max_ms,
        stats.mean_ms,
        stats.stddev_ms,
        if stable { "stable" } else { "UNSTABLE" }
    );
    println!("  throughput  {:.1} samples/s", res["throughput_per_s"].as_f64().unwrap_or(0.0));
    if let Some(mb) = res["peak_rss_mb"].as_f64() {
        println!("  peak RSS    {mb:.0} MiB");
    }
    if a.rss_every.is_some() && !soak.is_empty() {
        let series: Vec<String> = soak.iter().map(|s| format!("{:.1}", s.1)).collect();
        let fds: Vec<String> = soak.iter().filter_map(|s| s.2).map(|f| f.to_string()).collect();
        println!(
            "  soak        RSS every {} runs (MiB): {}; growth {:.2} % after the first; open fds {}",
            a.rss_every.unwrap_or(1),
            series.join(" "),
            res["soak"]["rss_growth_pct"].as_f64().unwrap_or(0.0),
            fds.join(" ")
        );
    }
    if let Some(c) = counters {
        println!(
            "  device      {} dispatches, {} submissions, {} bytes allocated per run",
            c.dispatches, c.submissions, c.alloc_bytes
        );
    }
    if let Some(p) = &profile {
        let total: f64 = p.iter().map(|o| o.ms_per_run).sum();
        println!("  profile (time per op type, mean of {profiled_runs} runs, {total:.2} ms in ops)");
        for o in p {
            println!(
                "    {:<28} {:>4}×  {:>8.3} ms  {:>5.1} %",
                o.op,
                o.count,
                o.ms_per_run,
                100.0 * o.ms_per_run / total
            );
        }
    }
    if let Some(t) = &a.trace {
        println!("  trace       {} (open in chrome://tracing or ui.perfetto.dev)", t.display());
    }
    if let Some(c) = &a.csv {
        println!("  timings     {}", c.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_and_the_stability_rule() {
        let s = Stats::of(&[3.0, 1.0, 2.0, 4.0]).unwrap();
        assert_eq!((s.min_ms, s.max_ms, s.mean_ms), (1.0, 4.0, 2.5));
        assert!((s.stddev_ms - 1.2909944).abs() < 1e-6);
        let flat = vec![1.0; 30];
        assert!(stability(&flat, 10.0).0);
        let drift: Vec<f64> = (0..30).map(|i| if i < 20 { 1.0 } else { 1.5 }).collect();
        let (stable, w) = stability(&drift, 10.0);
        assert!(!stable && w.len() == 3, "{w:?}");
    }
}
