//! One model against reference outputs computed elsewhere (onnxruntime on x86, for the aarch64 checks under qemu:
//! `scripts/aarch64.sh models`), on the CPU backend with one thread:
//! `model_check CASE_DIR [RUNS]`.
//!
//! `CASE_DIR/case.txt` has one tab-separated entry per line (paths relative to `CASE_DIR`):
//! `model PATH`, `input NAME FILE.npy` (one per input), `expect NAME FILE.npy` (one per output compared),
//! `cosine MIN` (default 0.9999) and `rel MAX` (largest |difference| allowed, times max(1, max |reference|);
//! default 1e-3). Prints one line per output and exits 1 when one is off. The model runs `RUNS` times (default 1;
//! the instruction-count recipe takes the difference of two counts). `EDGEPACK_CPU=interp` picks the kernel
//! interpreter, `EDGEPACK_KERNELS=off` plain tract, `EDGEPACK_ISA` caps the kernels' instruction set;
//! `MODEL_CHECK_PROFILE=1` prints the time per op.
use std::path::Path;

use edgepack_runtime::{Device, Session, SessionOptions, Tensor, npy};

fn main() {
    if let Err(e) = check() {
        eprintln!("model_check: {e}");
        std::process::exit(2);
    }
}

fn check() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(args.get(1).ok_or("usage: model_check CASE_DIR [RUNS]")?);
    let runs: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let text = std::fs::read_to_string(dir.join("case.txt"))?;
    let (mut model, mut inputs, mut expect, mut min_cos, mut rel) = (None, Vec::new(), Vec::new(), 0.9999, 1e-3);
    let load = |f: &str| -> Result<Tensor, Box<dyn std::error::Error>> { Ok(npy::read(&std::fs::read(dir.join(f))?)?) };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        match f.as_slice() {
            ["model", p] => model = Some(dir.join(p)),
            ["input", name, file] => inputs.push((name.to_string(), load(file)?)),
            ["expect", name, file] => expect.push((name.to_string(), load(file)?)),
            ["cosine", v] => min_cos = v.parse()?,
            ["rel", v] => rel = v.parse()?,
            _ => return Err(format!("case.txt: cannot read {line:?}").into()),
        }
    }
    let model = model.ok_or("case.txt names no model")?;
    let opts = SessionOptions { device: Device::Cpu, threads: 1, ..Default::default() };
    let session = Session::open(&model, &opts)?;
    let mut outputs = Vec::new();
    for _ in 0..runs.max(1) {
        outputs = session.run(inputs.clone())?;
    }
    println!("{}: {}", model.display(), session.backend_description());
    if std::env::var_os("MODEL_CHECK_PROFILE").is_some() {
        // Time per op (under an emulator, a rough picture of where the instructions go).
        for op in session.profile(inputs.clone(), 3)? {
            println!("  profile {:>9.3} ms  {:>4}×  {}", op.ms_per_run, op.count, op.op);
        }
    }
    let mut ok = true;
    for (name, want) in &expect {
        let got = outputs.iter().find(|(n, _)| n == name).map(|(_, t)| t).ok_or(format!("no output {name}"))?;
        let (a, b) = (want.to_f32_vec(), got.to_f32_vec());
        let shape_ok = want.shape() == got.shape();
        let (mut dot, mut na, mut nb, mut max_diff, mut max_ref) = (0f64, 0f64, 0f64, 0f64, 0f64);
        for (&x, &y) in a.iter().zip(&b) {
            let (x, y) = (x as f64, y as f64);
            (dot, na, nb) = (dot + x * y, na + x * x, nb + y * y);
            max_diff = max_diff.max((x - y).abs());
            max_ref = max_ref.max(x.abs());
        }
        let cos = if na > 0.0 && nb > 0.0 {
            dot / (na.sqrt() * nb.sqrt())
        } else if max_diff == 0.0 {
            1.0
        } else {
            0.0
        };
        let good = shape_ok && a.len() == b.len() && cos >= min_cos && max_diff <= rel * max_ref.max(1.0);
        ok &= good;
        println!(
            "  {name} {:?}: max |diff| {max_diff:.3e} (max |ref| {max_ref:.3e}), cosine {cos:.6} {}",
            got.shape(),
            if good { "ok" } else { "MISMATCH" }
        );
    }
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
