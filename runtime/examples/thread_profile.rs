//! Where a model's time goes as threads are added: per-node profiles of one model at 1 and N threads, two sessions
//! in one process, profiles alternating between them (medians), nodes in graph order with their speed-up. A tool
//! for the kernel pool and the thread splits (a node that gains nothing on two threads shows here), not a target:
//! `cargo run --release --example thread_profile -- MODEL.onnx [ROUNDS] [THREADS]` (defaults 100 rounds, 2
//! threads). The input is a fixed pseudo-random tensor (batch 1).
use std::collections::HashMap;

use edgepack_runtime::{Device, Session, SessionOptions, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(model) = args.get(1) else {
        return Err("usage: thread_profile MODEL.onnx [ROUNDS] [THREADS]".into());
    };
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100);
    let threads: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2);
    let open = |threads| Session::open(model, &SessionOptions { device: Device::Cpu, threads, ..Default::default() });
    let sessions = [open(1)?, open(threads)?];
    let info = &sessions[0].inputs()[0];
    let shape = info.concrete_shape(1);
    let n: usize = shape.iter().product();
    let x = Tensor::from_f32(shape, (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect())?;
    let feed = vec![(info.name.clone(), x)];
    // Node → per-session times (µs); `order`: nodes as first seen (the plan's order).
    let mut nodes: HashMap<String, [Vec<f64>; 2]> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    // Whole untraced runs, alternating the same way: what the sum of nodes leaves out (waking the pool, the steps'
    // own bookkeeping, input and output copies) shows as the gap between this and the sum.
    let mut whole: [Vec<f64>; 2] = Default::default();
    for i in 0..rounds {
        for k in [i % 2, 1 - i % 2] {
            let f = feed.clone();
            let t = std::time::Instant::now();
            sessions[k].run(f)?;
            whole[k].push(t.elapsed().as_secs_f64() * 1e6);
            for op in sessions[k].trace(feed.clone(), 1)?.events {
                let name = format!("{} {}", op.op, op.node);
                if !nodes.contains_key(&name) {
                    order.push(name.clone());
                }
                nodes.entry(name).or_default()[k].push(op.dur_us);
            }
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    println!("{}; medians of {rounds} alternating profiles, µs", sessions[1].backend_description());
    println!("{:<64} {:>9} {:>9} {:>8}", "node", "1 thread", format!("{threads} thr."), "speed-up");
    let (mut a, mut b) = (0.0, 0.0);
    for name in &order {
        let [x, y] = &nodes[name];
        let (x, y) = (median(x), median(y));
        (a, b) = (a + x, b + y);
        // The name's last 64 characters (not bytes: node names may be any UTF-8).
        let tail = name.char_indices().rev().nth(63).map_or(0, |(i, _)| i);
        println!("{:<64} {x:>9.1} {y:>9.1} {:>8.2}", &name[tail..], x / y);
    }
    println!("{:<64} {a:>9.1} {b:>9.1} {:>8.2}", "sum of nodes", a / b);
    let (x, y) = (median(&whole[0]), median(&whole[1]));
    println!("{:<64} {x:>9.1} {y:>9.1} {:>8.2}", "whole run, untraced", x / y);
    Ok(())
}
