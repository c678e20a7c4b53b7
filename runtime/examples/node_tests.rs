//! Runs the ONNX node test suite (`onnx/backend/test/data/node/*` from the `onnx` pip package) on a backend and
//! reports pass/fail per op, for every op the backend claims.
//!
//! ```text
//! cargo run --release --example node_tests -- NODE_DIR [--device gpu|cpu] [--md FILE] [--filter S]
//! EDGEPACK_CPU=interp cargo run ... -- NODE_DIR --device cpu     (the kernel interpreter's ops)
//! ```
//!
//! A case is counted for the op its base case tests: the op producing the first graph output, where
//! `test_x_expanded*` (the function-body variants) count for the op of `test_x`. Every such case of a claimed op
//! is run; a case the backend refuses (an unsupported data type or attribute) counts as a failure. Outputs are
//! compared as the ONNX backend runner does: |got - expected| <= 1e-7 + 1e-3·|expected|, NaN equal to NaN;
//! integers and booleans exactly. Cases whose tensors have an element type the runtime's API does not carry at
//! all (strings, bfloat16, float8, int4, uint16/32/64, int16, complex) are failures, counted in a column of their
//! own, and the pass rate is given both over all cases and over the cases the API can express.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use edgepack_runtime::onnx::{Model, NodeExt, TensorProto, tensor_from_proto};
use edgepack_runtime::{Device, Session, SessionOptions, Tensor, TensorData};
use prost::Message;

/// Per op: passed, failed cases with reasons, failures that are element types outside the runtime.
type OpRow = (usize, Vec<(String, String)>, usize);

struct Args {
    dir: PathBuf,
    device: Device,
    md: Option<PathBuf>,
    filter: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut a = Args { dir: PathBuf::new(), device: Device::Gpu, md: None, filter: None };
    while let Some(x) = it.next() {
        match x.as_str() {
            "--device" => a.device = it.next().ok_or("--device needs a value")?.parse()?,
            "--md" => a.md = Some(it.next().ok_or("--md needs a file")?.into()),
            "--filter" => a.filter = it.next(),
            _ if a.dir.as_os_str().is_empty() => a.dir = x.into(),
            _ => return Err(format!("unexpected argument `{x}`")),
        }
    }
    if a.dir.as_os_str().is_empty() {
        return Err("usage: node_tests NODE_DIR [--device gpu|cpu] [--md FILE] [--filter S]".into());
    }
    Ok(a)
}

fn read_tensor(path: &Path) -> Result<Tensor, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let proto = TensorProto::decode(&bytes[..]).map_err(|e| format!("{}: not a TensorProto ({e})", path.display()))?;
    tensor_from_proto(&proto).map_err(|e| e.to_string())
}

/// The op a case tests (see the module comment).
fn primary_op(model: &Model) -> Option<String> {
    let out = model.graph.outputs.first()?.name.clone()?;
    model.graph.nodes.iter().find(|n| n.output.contains(&out)).map(|n| n.op().to_string())
}

fn close(got: &Tensor, want: &Tensor) -> Result<(), String> {
    if got.shape() != want.shape() {
        return Err(format!("shape {:?}, expected {:?}", got.shape(), want.shape()));
    }
    let exact = !matches!(want.data(), TensorData::F32(_) | TensorData::F16(_) | TensorData::F64(_));
    let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let ok =
            if exact { a == b } else { (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-7 + 1e-3 * b.abs() };
        if !ok {
            return Err(format!("element {i}: {a}, expected {b}"));
        }
    }
    Ok(())
}

fn run_case(dir: &Path, model: &Model, device: Device) -> Result<(), String> {
    let opts = SessionOptions { device, threads: 1, ..Default::default() };
    let session = Session::from_model(model, &opts).map_err(|e| e.to_string())?;
    let data = dir.join("test_data_set_0");
    let mut inputs = Vec::new();
    for (i, info) in session.inputs().iter().enumerate() {
        inputs.push((info.name.clone(), read_tensor(&data.join(format!("input_{i}.pb")))?));
    }
    let outs = session.run(inputs).map_err(|e| e.to_string())?;
    for (i, (name, got)) in outs.iter().enumerate() {
        let want = read_tensor(&data.join(format!("output_{i}.pb")))?;
        close(got, &want).map_err(|e| format!("output `{name}`: {e}"))?;
    }
    Ok(())
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let claimed: Vec<&str> = match args.device {
        #[cfg(feature = "gpu")]
        Device::Gpu => edgepack_runtime::gpu::SUPPORTED_OPS.to_vec(),
        // The kernel interpreter (`EDGEPACK_CPU=interp`, or a build without tract) claims its plain ops.
        Device::Cpu if std::env::var("EDGEPACK_CPU").is_ok_and(|v| v == "interp") || cfg!(not(feature = "tract")) => {
            edgepack_runtime::interp::OPS.to_vec()
        }
        _ => Vec::new(),
    };
    let mut names: Vec<String> = match std::fs::read_dir(&args.dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(e) => {
            eprintln!("{}: {e}", args.dir.display());
            std::process::exit(2);
        }
    };
    names.sort();
    let mut models = BTreeMap::new();
    let mut primary = BTreeMap::new();
    for n in &names {
        let m = std::fs::read(args.dir.join(n).join("model.onnx"))
            .map_err(|e| e.to_string())
            .and_then(|b| Model::from_bytes(&b).map_err(|e| e.to_string()));
        if let Ok(m) = &m
            && let Some(op) = primary_op(m)
        {
            primary.insert(n.clone(), op);
        }
        models.insert(n.clone(), m);
    }
    // op -> (passed, failed cases with reasons, cases with element types outside the runtime)
    let mut table: BTreeMap<String, OpRow> = BTreeMap::new();
    for n in &names {
        let base = n.find("_expanded").map_or(n.as_str(), |i| &n[..i]);
        let Some(op) = primary.get(base).or_else(|| primary.get(n)) else { continue };
        if !(claimed.is_empty() || claimed.contains(&op.as_str())) {
            continue;
        }
        if args.filter.as_ref().is_some_and(|f| !n.contains(f.as_str())) {
            continue;
        }
        let started = std::time::Instant::now();
        let result = match &models[n] {
            Ok(m) => run_case(&args.dir.join(n), m, args.device),
            Err(e) => Err(format!("model: {e}")),
        };
        let entry = table.entry(op.clone()).or_default();
        match result {
            Ok(()) => {
                entry.0 += 1;
                eprintln!("ok    {n} ({:.1}s)", started.elapsed().as_secs_f64());
            }
            Err(e) => {
                let e: String = e.chars().take(160).collect();
                eprintln!("FAIL  {n}: {e}");
                if e.contains("has a type the runtime does not support")
                    || e.contains("is not supported")
                        && (e.contains("element type") || e.contains("unsupported target type"))
                    || e.contains("unsupported target type")
                {
                    entry.2 += 1;
                }
                entry.1.push((n.clone(), e));
            }
        }
    }
    let passed: usize = table.values().map(|v| v.0).sum();
    let failed: usize = table.values().map(|v| v.1.len()).sum();
    let untyped: usize = table.values().map(|v| v.2).sum();
    let total = passed + failed;
    let pct = if total == 0 { 0.0 } else { 100.0 * passed as f64 / total as f64 };
    let expressible = total - untyped;
    let pct_expr = if expressible == 0 { 0.0 } else { 100.0 * passed as f64 / expressible as f64 };
    let mut md = String::new();
    md.push_str(
        "| op | cases | passed | failed | of which: element type not claimed | failing cases (reason) |\n\
         |---|---:|---:|---:|---:|---|\n",
    );
    for (op, (p, f, u)) in &table {
        let why: Vec<String> = f.iter().map(|(n, e)| format!("`{n}` ({})", e.replace('|', "/"))).collect();
        md.push_str(&format!("| {op} | {} | {p} | {} | {u} | {} |\n", p + f.len(), f.len(), why.join("; ")));
    }
    md.push_str(&format!(
        "| **all** | **{total}** | **{passed}** | **{failed}** | **{untyped}** | **claimed (op, element type) cases: \
         {passed} of {expressible} pass ({pct_expr:.1} %); all cases, unclaimed types included: {pct:.1} %** |\n"
    ));
    println!("{md}");
    println!(
        "{passed} passed, {failed} failed ({pct:.1} % of all); {untyped} failures are unclaimed element types; {pct_expr:.1} % of the claimed cases pass"
    );
    if let Some(path) = &args.md {
        let adapter = {
            #[cfg(feature = "gpu")]
            {
                edgepack_runtime::gpu::adapter().map(|a| a.short()).unwrap_or_else(|e| e)
            }
            #[cfg(not(feature = "gpu"))]
            {
                String::from("none")
            }
        };
        let interp = args.device == Device::Cpu && !claimed.is_empty();
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let (title, command, list, machine) = if interp {
            (
                "the kernel interpreter (the CPU backend without tract)".to_string(),
                format!(
                    "EDGEPACK_CPU=interp cargo run --release --example node_tests -- NODE_DIR --device cpu --md {file}"
                ),
                "`interp::OPS` (the interpreter's op table)",
                String::from("The interpreter runs on the CPU; floats compute in f64 and round once to their type."),
            )
        } else {
            (
                format!("the {:?} backend", args.device),
                format!(
                    "cargo run --release --example node_tests -- NODE_DIR --device {} --md {file}",
                    format!("{:?}", args.device).to_lowercase()
                ),
                "`SUPPORTED_OPS`",
                format!("Adapter: {adapter}. Integer values ride as f32 on the device (exact to 2^24)."),
            )
        };
        let doc = format!(
            "# ONNX node tests on {title}\n\n\
             Written by `{command}`, NODE_DIR being `onnx/backend/test/data/node` of the `onnx` pip package \
             (requirements-test.txt pins 1.20.1, the last wheels that ship it). {machine}\n\n\
             A case counts for the op its base case tests (the op producing the first output; `_expanded` variants \
             count for the op of their base case); every case of every op the backend claims is run. Tolerance as \
             the ONNX runner: 1e-7 + 1e-3·|expected|.\n\n\
             What is claimed: the ops of {list} over the element types of the runtime's `Tensor` (f32, f16, \
             f64, i64, i32, i16, i8, u64, u32, u16, u8, bool), as an execution provider registers kernels per op and \
             type. Cases with other element types (the float8 family, float4e2m1, int4/uint4/int2/uint2, bfloat16, \
             string) are run and listed too: the backends reject such a model at load with a typed error naming the \
             type, and they count in the all-cases figure.\n\n\
             **Headline: {pct_expr:.1} % of the claimed cases pass ({passed} of {expressible}); {pct:.1} % of all \
             {total} cases.**\n\n{md}",
        );
        if let Err(e) = std::fs::write(path, &doc) {
            eprintln!("{}: {e}", path.display());
            std::process::exit(2);
        }
    }
}
