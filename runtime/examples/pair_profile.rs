//! Two models side by side on the CPU backend, one thread, in one process: the median of per-pair latency ratios
//! (B / A, pairs alternate their order) with a 95 % confidence interval, then per-node times from profiles taken
//! the same way, largest differences first. A tool for finding where a rewritten model (pruned, quantized) gains
//! or loses, not a target:
//! `cargo run --release --example pair_profile -- A.onnx B.onnx [PAIRS] [INPUT.npy]`.
//! Without an input file the input is a fixed pseudo-random tensor in [-1, 1] (batch 1). `EDGEPACK_CPU=interp`
//! profiles the kernel interpreter instead of tract.
use std::collections::HashMap;
use std::time::Instant;

use edgepack_runtime::{Device, Session, SessionOptions, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(pa), Some(pb)) = (args.get(1), args.get(2)) else {
        return Err("usage: pair_profile A.onnx B.onnx [PAIRS] [INPUT.npy]".into());
    };
    let pairs: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100);
    let opts = SessionOptions { device: Device::Cpu, threads: 1, ..Default::default() };
    let (a, b) = (Session::open(pa, &opts)?, Session::open(pb, &opts)?);
    let info = &a.inputs()[0];
    let x = match args.get(4) {
        Some(p) => edgepack_runtime::npy::read(&std::fs::read(p)?)?,
        None => {
            let shape = info.concrete_shape(1);
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            let v = (0..shape.iter().product::<usize>())
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                })
                .collect();
            Tensor::from_f32(shape, v)?
        }
    };
    let feed = vec![(info.name.clone(), x)];
    let time = |s: &Session| -> Result<f64, edgepack_runtime::Error> {
        let t = Instant::now();
        s.run(feed.clone())?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    for _ in 0..3 {
        time(&a)?;
        time(&b)?;
    }
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for i in 0..pairs {
        let (x, y) = if i % 2 == 0 {
            let x = time(&a)?;
            (x, time(&b)?)
        } else {
            let y = time(&b)?;
            (time(&a)?, y)
        };
        ta.push(x);
        tb.push(y);
    }
    let ratios: Vec<f64> = ta.iter().zip(&tb).map(|(x, y)| y / x).collect();
    let (r, (lo, hi)) = median_ci95(ratios);
    println!("{}", a.backend_description());
    println!(
        "A {:.3} ms, B {:.3} ms: B/A ×{r:.3} (95 % CI ×{lo:.3}–×{hi:.3}, {pairs} pairs)",
        median_ci95(ta).0,
        median_ci95(tb).0
    );

    // Per-node profiles, one run at a time, alternating; the median per node.
    let mut nodes: HashMap<String, (Vec<f64>, Vec<f64>)> = HashMap::new();
    let rounds = pairs.clamp(5, 60);
    for i in 0..rounds {
        for (k, s) in if i % 2 == 0 { [(0, &a), (1, &b)] } else { [(1, &b), (0, &a)] } {
            for op in s.profile(feed.clone(), 1)? {
                let e = nodes.entry(op.op).or_default();
                if k == 0 { e.0.push(op.ms_per_run) } else { e.1.push(op.ms_per_run) }
            }
        }
    }
    let med = |v: &Vec<f64>| if v.is_empty() { 0.0 } else { median_ci95(v.clone()).0 };
    let mut rows: Vec<(String, f64, f64)> = nodes.into_iter().map(|(k, (x, y))| (k, med(&x), med(&y))).collect();
    rows.sort_by(|p, q| (q.2 - q.1).total_cmp(&(p.2 - p.1)));
    let (sa, sb): (f64, f64) = (rows.iter().map(|r| r.1).sum(), rows.iter().map(|r| r.2).sum());
    println!("per node (median of {rounds} alternating profiles), B − A, largest first:");
    println!("{:<64} {:>8} {:>8} {:>8}", "node", "A ms", "B ms", "B − A");
    for (k, x, y) in &rows {
        println!("{k:<64} {x:>8.3} {y:>8.3} {:>+8.3}", y - x);
    }
    println!("{:<64} {sa:>8.3} {sb:>8.3} {:>+8.3}", "sum", sb - sa);
    Ok(())
}

/// The median and a distribution-free 95 % confidence interval (order statistics n/2 ∓ 1.96·√n/2).
fn median_ci95(mut v: Vec<f64>) -> (f64, (f64, f64)) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let half = 1.96 * (n as f64).sqrt() / 2.0;
    let lo = ((n as f64 / 2.0 - half).floor().max(0.0) as usize).min(n - 1);
    let hi = ((n as f64 / 2.0 + half).ceil() as usize).min(n - 1);
    (v[n / 2], (v[lo], v[hi]))
}
