//! `edgepack bench`: load time, first-run time, latency percentiles, throughput and peak RSS of one model.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use edgepack_runtime::onnx::Dim;
use edgepack_runtime::{DType, Tensor};
use serde_json::json;

use crate::LoadArgs;
use crate::commands::{BadInput, open_session};

#[derive(Args)]
pub struct BenchArgs {
    /// Model (.onnx) or bundle (.edgepack)
    model: PathBuf,
    /// Timed runs
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// Untimed runs after the first one
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Batch size used for symbolic first dimensions
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Concrete shape for an input: NAME=1,3,224,224 (needed for symbolic dims other than the batch)
    #[arg(long = "shape", value_name = "NAME=DIMS")]
    shapes: Vec<String>,
    /// Also time every operation and print the time per op type
    #[arg(long)]
    profile: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    load: LoadArgs,
}

/// Peak resident set size of this process in bytes (Linux: VmHWM), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.runs == 0 {
        bail!(BadInput("--runs must be at least 1".into()));
    }
    let t0 = Instant::now();
    let s = open_session(&a.model, &a.load)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut feeds = Vec::new();
    for (k, i) in s.inputs().iter().enumerate() {
        let given = a.shapes.iter().find_map(|kv| kv.split_once('=').filter(|(n, _)| *n == i.name).map(|(_, d)| d));
        let shape: Vec<usize> = match given {
            Some(d) => d
                .split(',')
                .map(|x| x.trim().parse().map_err(|_| BadInput(format!("bad --shape `{d}`"))))
                .collect::<Result<_, _>>()?,
            None => {
                if i.shape.iter().skip(1).any(|d| matches!(d, Dim::Symbolic(_))) {
                    bail!(BadInput(format!(
                        "input `{}` {} has symbolic dims: pass --shape {}=...",
                        i.name,
                        i.shape_string(),
                        i.name
                    )));
                }
                i.concrete_shape(a.batch)
            }
        };
        feeds.push((i.name.clone(), Tensor::synthetic(i.dtype.unwrap_or(DType::F32), shape, k as u64 + 1)?));
    }
    let batch = feeds.first().and_then(|f| f.1.shape().first().copied()).unwrap_or(1).max(1);
    let t1 = Instant::now();
    s.run(feeds.clone())?;
    let first_ms = t1.elapsed().as_secs_f64() * 1e3;
    for _ in 0..a.warmup {
        s.run(feeds.clone())?;
    }
    let mut times = Vec::with_capacity(a.runs);
    let all = Instant::now();
    for _ in 0..a.runs {
        let f = feeds.clone();
        let t = Instant::now();
        s.run(f)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let wall = all.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let profile = if a.profile { Some(s.profile(feeds.clone(), a.runs.min(20))?) } else { None };
    let res = json!({
        "model": a.model,
        "variant": s.bundle().map(|b| b.variant.clone()),
        "backend": s.backend_description(),
        "threads": a.load.threads,
        "batch": batch,
        "runs": a.runs,
        "load_ms": load_ms,
        "first_run_ms": first_ms,
        "p50_ms": percentile(&times, 0.5),
        "p90_ms": percentile(&times, 0.9),
        "p99_ms": percentile(&times, 0.99),
        "mean_ms": times.iter().sum::<f64>() / times.len() as f64,
        "throughput_per_s": (batch * a.runs) as f64 / wall,
        "peak_rss_mb": peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64),
        "profile": profile,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&res)?);
    } else {
        println!("{} — {}", a.model.display(), s.backend_description());
        println!("  load        {load_ms:>9.1} ms");
        println!("  first run   {first_ms:>9.2} ms");
        println!(
            "  latency     p50 {:.2} ms   p90 {:.2} ms   p99 {:.2} ms   ({} runs, batch {batch})",
            res["p50_ms"].as_f64().unwrap_or(0.0),
            res["p90_ms"].as_f64().unwrap_or(0.0),
            res["p99_ms"].as_f64().unwrap_or(0.0),
            a.runs
        );
        println!("  throughput  {:.1} samples/s", res["throughput_per_s"].as_f64().unwrap_or(0.0));
        if let Some(mb) = res["peak_rss_mb"].as_f64() {
            println!("  peak RSS    {mb:.0} MiB");
        }
        if let Some(p) = &profile {
            let total: f64 = p.iter().map(|o| o.ms_per_run).sum();
            println!("  profile (time per op type, mean of {} runs, {total:.2} ms in ops)", a.runs.min(20));
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
    }
    Ok(())
}
