//! The commands: each parses nothing itself (clap did) and delegates to the libraries.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use edgepack_packager::{BundleBuilder, SecretKey};
use edgepack_runtime::bundle::{BackendKind, OpenOptions, Precision, PublicKey, Task};
use edgepack_runtime::process::{self, ImagePreprocess, Postprocess, Preprocess, Softmax};
use edgepack_runtime::{Bundle, DType, Session, SessionOptions, Tensor, npy};
use serde_json::json;

use crate::LoadArgs;
use edgepack_quantize::data::Dataset;
use edgepack_quantize::pipeline::{Event, Samples};

pub use crate::output::progress;

/// An error in the user's data (not in the tool): exit code 4.
#[derive(Debug)]
pub struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// A bad flag, value or combination of them (exit code 2, as clap's own usage errors).
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// `--preset` values: the named recipes of `process::PRESETS`, checked by clap (a usage error lists them).
pub fn preset_parser() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(edgepack_runtime::process::PRESETS)
}

/// A tensor shape: comma-separated sizes, e.g. `1,3,224,224`.
pub fn parse_shape(s: &str) -> std::result::Result<Vec<usize>, String> {
    s.split(',')
        .map(|d| d.trim().parse::<usize>().map_err(|_| format!("`{s}` is not a shape like 1,3,224,224")))
        .collect()
}

/// An element type name (f32, u8, ...).
pub fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    DType::parse(s)
        .ok_or_else(|| format!("unknown dtype `{s}` (f32, f16, f64, i64, i32, i16, i8, u64, u32, u16, u8, bool)"))
}

/// The backend of a session as `--json` reports it.
pub fn backend_json(s: &Session) -> serde_json::Value {
    serde_json::to_value(s.backend_info()).unwrap_or_default()
}

/// Fails before a long job when an output could not be written (its folder missing or read-only).
pub fn check_writable(paths: &[&Path]) -> Result<()> {
    for p in paths {
        edgepack_runtime::fsutil::check_writable(p)
            .map_err(|e| BadInput(format!("cannot write {}: {e}", p.display())))?;
    }
    Ok(())
}

pub fn load_key(path: Option<&Path>) -> Result<Option<PublicKey>> {
    path.map(|p| PublicKey::load(p).with_context(|| format!("reading key {}", p.display()))).transpose()
}

pub fn session_options(a: &LoadArgs) -> Result<SessionOptions> {
    Ok(SessionOptions {
        device: a.device,
        threads: a.threads,
        variant: a.variant.clone(),
        key: load_key(a.key.as_deref())?,
        free_batch: a.free_batch,
        ..Default::default()
    })
}

pub fn open_session(path: &Path, a: &LoadArgs) -> Result<Session> {
    Session::open(path, &session_options(a)?).with_context(|| format!("loading {}", path.display()))
}

/// The image pre-processing to use: the bundle's, or a named preset sized from the model's first input.
pub fn image_preprocess(s: &Session, preset: Option<&str>) -> Result<Option<ImagePreprocess>> {
    Ok(s.image_preprocessing(preset)?)
}

fn read_labels(path: &Path) -> Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading labels {}", path.display()))?
        .lines()
        .map(|l| l.trim_end().to_string())
        .collect())
}

/// One line on a bundle's signature for people: who signed, and whether that key was required.
fn signature_summary(signer: Option<&str>, trusted: bool) -> String {
    match (signer, trusted) {
        (Some(k), true) => format!("signature valid, trusted key {k}"),
        (Some(k), false) => format!("signature valid, key {k} (pass --key to require a trusted key)"),
        (None, _) => "unsigned".into(),
    }
}

pub fn inspect(path: &Path, json_out: bool, key: Option<&Path>) -> Result<()> {
    let key = load_key(key)?;
    let s = Session::open(path, &SessionOptions { key: key.clone(), threads: 1, ..Default::default() })
        .with_context(|| format!("loading {}", path.display()))?;
    let io = |v: &[edgepack_runtime::IoInfo]| {
        v.iter().map(|i| json!({"name": i.name, "dtype": i.dtype, "shape": i.shape})).collect::<Vec<_>>()
    };
    let bundle = s.bundle();
    let j = json!({
        "path": path,
        "kind": if bundle.is_some() { "bundle" } else { "onnx" },
        "inputs": io(s.inputs()),
        "outputs": io(s.outputs()),
        "model": s.model_summary(),
        "backend": backend_json(&s),
        "bundle": bundle.map(|b| json!({
            "manifest": b.manifest,
            "loaded_variant": b.variant,
            "signed_by": b.signer,
            "trusted": b.trusted,
        })),
    });
    if json_out {
        return crate::output::json(j);
    }
    let m = s.model_summary();
    println!("{}", path.display());
    if let Some(b) = bundle {
        let man = &b.manifest;
        println!("  bundle      {} {} ({}), {}", man.name, man.version, man.task, man.created_by);
        for v in &man.variants {
            let mark = if v.id == b.variant { "*" } else { " " };
            println!(
                "  variant {mark}   {:<10} {:<5} {:>10} bytes  sha256 {}…  backends {}",
                v.id,
                v.precision,
                v.size,
                &v.sha256[..16],
                v.preferred_backends.iter().map(|b| b.as_str()).collect::<Vec<_>>().join(", ")
            );
        }
        println!("  signature   {}", signature_summary(b.signer.as_deref(), b.trusted));
        if let Some(p) = &man.preprocess {
            println!("  preprocess  {}", serde_json::to_string(p)?);
        }
        if let Some(p) = &man.postprocess {
            println!("  postprocess {}", serde_json::to_string(p)?);
        }
        if let Some(l) = s.labels() {
            println!("  labels      {} classes", l.len());
        }
        for r in &man.reports {
            println!("  report      {r}");
        }
    }
    println!("  onnx        ir {} opset {} producer `{}`", m.ir_version, m.opset.unwrap_or(0), m.producer);
    println!("  graph       {} nodes, {} initializers, {} parameters", m.nodes, m.initializers, m.parameters);
    let ops: Vec<String> = m.op_histogram.iter().map(|(o, n)| format!("{o}×{n}")).collect();
    println!("  ops         {}", ops.join(" "));
    for (kind, list) in [("input ", s.inputs()), ("output", s.outputs())] {
        for v in list {
            let dt = v.dtype.map(|d| d.to_string()).unwrap_or("?".into());
            println!("  {kind}      {} {dt} {}", v.name, v.shape_string());
        }
    }
    println!("  backend     {}", s.backend_description());
    Ok(())
}

/// A tensor shape given on the command line (`1,3,224,224`).
#[derive(Clone, Debug)]
pub struct Shape(pub Vec<usize>);

pub fn shape_arg(s: &str) -> std::result::Result<Shape, String> {
    parse_shape(s).map(Shape)
}

#[derive(Args)]
pub struct RunArgs {
    /// Model (.onnx) or bundle (.edgepack)
    model: PathBuf,
    /// Input files: images (JPEG/PNG; several make one result each), .npy arrays, or raw little-endian data
    /// (with --shape and --dtype)
    inputs: Vec<PathBuf>,
    /// Named input: NAME=FILE (for models with several inputs)
    #[arg(long = "input", value_name = "NAME=FILE")]
    named: Vec<String>,
    /// Pre-processing preset for images fed to a bare .onnx model
    #[arg(long, value_parser = preset_parser())]
    preset: Option<String>,
    /// Shape of raw inputs, e.g. 1,3,224,224
    #[arg(long, value_parser = shape_arg)]
    shape: Option<Shape>,
    /// Element type of raw inputs (f32, f16, f64, i64, i32, i16, i8, u64, u32, u16, u8, bool)
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
    /// Labels file (one per line) for a bare .onnx classifier
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Classes printed per input for a classifier (default: the bundle's, else 5)
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    top_k: Option<u32>,
    /// Print output tensors instead of the bundle's post-processing
    #[arg(long)]
    raw: bool,
    /// Return this graph value (an intermediate activation) instead of the model outputs; repeatable
    #[arg(long = "value", value_name = "NAME")]
    values: Vec<String>,
    /// Write each output tensor as <DIR>/<name>.npy
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Also write each (pre-processed) input tensor as <DIR>/input_<name>.npy
    #[arg(long)]
    save_inputs: Option<PathBuf>,
    /// Streams (a bundle with a stream description fed WAV files): the value above which a chunk counts, for the
    /// segments (a VAD's speech probability)
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Print a JSON document: one entry of `results` per input, with its path
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    load: LoadArgs,
}

fn is_wav(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("wav"))
}

/// `edgepack run BUNDLE audio.wav...`: the bundle's stream over each file, chunk by chunk with the state carried;
/// per file the value of each chunk and the segments above `--threshold`.
fn run_streams(a: &RunArgs, s: Session) -> Result<()> {
    if s.bundle().and_then(|b| b.manifest.stream.as_ref()).is_none() {
        bail!(Usage(format!(
            "{} has no stream description, so it cannot take audio files: pack it with --stream-json",
            a.model.display()
        )));
    }
    let s = std::sync::Arc::new(s);
    let mut results = Vec::new();
    for path in &a.inputs {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (samples, rate) =
            edgepack_runtime::process::read_wav(&bytes).map_err(|e| BadInput(format!("{}: {e}", path.display())))?;
        let mut st = edgepack_runtime::stream::Stream::new(s.clone(), None)?;
        if let Some(want) = st.spec().sample_rate
            && want != rate
        {
            bail!(BadInput(format!(
                "{}: {rate} Hz audio; the model takes {want} Hz (resample it first)",
                path.display()
            )));
        }
        let t0 = Instant::now();
        let steps = st.push(&samples)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let values: Vec<f32> = steps.iter().map(|o| st.value(o).unwrap_or(f32::NAN)).collect();
        let chunk_s = st.spec().chunk as f64 / rate as f64;
        let segs: Vec<[f64; 2]> = edgepack_runtime::stream::segments(&values, a.threshold)
            .into_iter()
            .map(|(b, e)| [b as f64 * chunk_s, e as f64 * chunk_s])
            .collect();
        let above = values.iter().filter(|&&v| v > a.threshold).count();
        results.push(json!({"input": path.display().to_string(), "sample_rate": rate, "chunks": values.len(),
            "chunk_ms": 1e3 * chunk_s, "latency_ms": ms, "fraction_above": above as f64 / values.len().max(1) as f64,
            "threshold": a.threshold, "segments": segs, "values": values}));
    }
    if a.json {
        return crate::output::json(json!({"backend": backend_json(&s), "results": results}));
    }
    for r in &results {
        let segs = r["segments"].as_array().cloned().unwrap_or_default();
        println!(
            "{}: {} chunks of {:.0} ms, {:.1} % above {} ({}, {:.1} ms), {} segments",
            r["input"].as_str().unwrap_or(""),
            r["chunks"],
            r["chunk_ms"].as_f64().unwrap_or(0.0),
            100.0 * r["fraction_above"].as_f64().unwrap_or(0.0),
            a.threshold,
            s.backend_description(),
            r["latency_ms"].as_f64().unwrap_or(0.0),
            segs.len()
        );
        for sg in segs {
            println!("  {:.2} - {:.2} s", sg[0].as_f64().unwrap_or(0.0), sg[1].as_f64().unwrap_or(0.0));
        }
    }
    Ok(())
}

fn is_image(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref(),
        Some("jpg" | "jpeg" | "png")
    )
}

fn read_tensor(path: &Path, shape: Option<&Shape>, dtype: DType) -> Result<Tensor> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "npy") {
        return npy::read(&bytes).with_context(|| format!("{}", path.display()));
    }
    let shape = shape.ok_or_else(|| {
        Usage(format!("{}: a raw input needs --shape (and --dtype); .npy files carry their own", path.display()))
    })?;
    Ok(Tensor::from_le_bytes(dtype, shape.0.clone(), &bytes)?)
}

/// Writes each named tensor as `<dir>/<prefix><name>.npy` (atomically).
fn save_npy_dir(dir: &Path, prefix: &str, tensors: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, t) in tensors {
        let path = dir.join(format!("{prefix}{}.npy", safe_name(name)));
        edgepack_runtime::fsutil::write_atomic(&path, &npy::write(t))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A tensor name usable as a file name (other characters become `_`).
fn safe_name(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' { c } else { '_' }).collect()
}

fn tensor_json(name: &str, t: &Tensor) -> serde_json::Value {
    json!({"name": name, "dtype": t.dtype(), "shape": t.shape(), "data": t.to_f32_vec()})
}

pub fn run(a: RunArgs) -> Result<()> {
    let s = open_session(&a.model, &a.load)?;
    crate::output::note(format!("backend {} ({})", s.backend_description(), s.backend_selection()));
    let pre = image_preprocess(&s, a.preset.as_deref())?;
    let labels = match &a.labels {
        Some(p) => Some(read_labels(p)?),
        None => s.labels().map(|l| l.to_vec()),
    };
    if !a.inputs.is_empty() && a.inputs.iter().all(|p| is_wav(p)) {
        return run_streams(&a, s);
    }
    let images: Vec<&PathBuf> = a.inputs.iter().filter(|p| is_image(p)).collect();
    let mut feeds: Vec<(String, Tensor)> = Vec::new();
    let mut sizes = Vec::new();
    if !images.is_empty() {
        if images.len() != a.inputs.len() {
            bail!(Usage("a mix of images and tensor files; give tensors with --input NAME=FILE".into()));
        }
        let p = pre.clone().ok_or_else(|| Usage("images need pre-processing: pass --preset or run a bundle".into()))?;
        let bytes = images
            .iter()
            .map(|img| std::fs::read(img).with_context(|| format!("reading {}", img.display())))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        let batch = s.image_batch(&refs, &p)?;
        sizes = batch.sizes;
        feeds.push((batch.input, batch.tensor));
    } else {
        match (a.inputs.as_slice(), s.inputs()) {
            ([], _) => {}
            ([one], [only]) => feeds.push((only.name.clone(), read_tensor(one, a.shape.as_ref(), a.dtype)?)),
            ([_], _) => bail!(Usage(format!(
                "the model has {} inputs: name each with --input NAME=FILE ({})",
                s.inputs().len(),
                s.inputs().iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ")
            ))),
            _ => bail!(Usage(
                "several tensor files: name each with --input NAME=FILE (several images make a batch; several \
                 tensors do not)"
                    .into()
            )),
        }
    }
    for n in &a.named {
        let (name, file) = n.split_once('=').ok_or_else(|| Usage(format!("--input expects NAME=FILE, got `{n}`")))?;
        let file = Path::new(file);
        let t = if is_image(file) {
            let p = pre.clone().ok_or_else(|| Usage("images need pre-processing: pass --preset".into()))?;
            p.apply_encoded(&std::fs::read(file).with_context(|| format!("reading {}", file.display()))?)?
        } else {
            read_tensor(file, a.shape.as_ref(), a.dtype)?
        };
        feeds.push((name.to_string(), t));
    }
    if feeds.is_empty() {
        bail!(Usage("no input given: pass image, .npy or raw files, or --input NAME=FILE".into()));
    }
    if let Some(dir) = &a.save_inputs {
        save_npy_dir(dir, "input_", &feeds)?;
    }
    let t0 = Instant::now();
    let outs = if !a.values.is_empty() {
        let names: Vec<&str> = a.values.iter().map(String::as_str).collect();
        s.run_values(feeds, &names)?
    } else if sizes.len() > 1 && feeds.len() == 1 {
        // Several images: one batch, or one call per image on a model with a fixed batch of 1.
        let (name, batch) = feeds.remove(0);
        s.run_batch(&name, batch)?
    } else {
        s.run(feeds)?
    };
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if let Some(dir) = &a.output_dir {
        save_npy_dir(dir, "", &outs)?;
    }
    let backend = s.backend_description();
    let raw = a.raw || !a.values.is_empty();
    let detector = s.postprocess().is_some_and(Postprocess::is_detection);
    let top_k = a.top_k.map(|k| k as usize);
    let classifier = !raw
        && !detector
        && (!images.is_empty()
            || top_k.is_some()
            || matches!(s.postprocess(), Some(Postprocess::Classification { .. })));
    let name_of = |i: usize| images.get(i).map(|p| p.display().to_string());
    let head = json!({"backend": backend_json(&s), "latency_ms": ms});
    let with = |mut v: serde_json::Value, extra: serde_json::Value| {
        if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        v
    };
    if !raw && detector && !sizes.is_empty() {
        // One list of detections per image, each scaled to its own image.
        let per_image = s.detections_per_image(&outs, &sizes)?;
        if a.json {
            let results: Vec<_> = per_image
                .iter()
                .enumerate()
                .map(|(i, d)| json!({"input": name_of(i), "image_size": [sizes[i].0, sizes[i].1], "detections": d}))
                .collect();
            return crate::output::json(with(head, json!({"results": results})));
        }
        for (i, dets) in per_image.iter().enumerate() {
            let name = name_of(i).unwrap_or_default();
            println!("{name}: {} detections ({backend}, {ms:.1} ms for {} image(s))", dets.len(), sizes.len());
            for d in dets {
                let extra = match (&d.mask, &d.keypoints) {
                    (Some(m), _) => format!("  (mask: {} px)", m.area()),
                    (_, Some(k)) => format!("  ({} keypoints)", k.len()),
                    _ => String::new(),
                };
                println!(
                    "  {:.3}  [{:.0}, {:.0}, {:.0}, {:.0}] {}{extra}",
                    d.score,
                    d.x1,
                    d.y1,
                    d.x2,
                    d.y2,
                    d.label.as_deref().unwrap_or("")
                );
            }
        }
    } else if classifier {
        let mut rows = s.classify_outputs(&outs, top_k)?;
        if let Some(l) = &labels {
            for r in rows.iter_mut().flatten() {
                r.label = l.get(r.class_index).map(|x| process::display_label(x).to_string());
            }
        }
        if a.json {
            let results: Vec<_> =
                rows.iter().enumerate().map(|(i, r)| json!({"input": name_of(i), "top_k": r})).collect();
            return crate::output::json(with(head, json!({"results": results})));
        }
        for (i, r) in rows.iter().enumerate() {
            let name = name_of(i).unwrap_or_else(|| format!("row {i}"));
            println!("{name}  ({backend}, {ms:.1} ms for the batch)");
            for c in r {
                println!("  {:>7.4}  {:>4}  {}", c.score, c.class_index, c.label.as_deref().unwrap_or(""));
            }
        }
    } else if a.json {
        let v: Vec<_> = outs.iter().map(|(n, t)| tensor_json(n, t)).collect();
        let inputs: Vec<String> = a.inputs.iter().map(|p| p.display().to_string()).collect();
        return crate::output::json_line(with(head, json!({"inputs": inputs, "outputs": v})));
    } else {
        println!("{backend}, {ms:.1} ms");
        for (n, t) in &outs {
            let v = t.to_f32_vec();
            let head: Vec<String> = v.iter().take(8).map(|x| format!("{x:.5}")).collect();
            println!(
                "  {n} {} {}  [{}{}]",
                t.dtype(),
                fmt_shape(t.shape()),
                head.join(", "),
                if v.len() > 8 { ", …" } else { "" }
            );
        }
    }
    Ok(())
}

fn fmt_shape(s: &[usize]) -> String {
    format!("[{}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

#[derive(Args)]
pub struct EvalArgs {
    /// Model (.onnx) or bundle (.edgepack)
    model: PathBuf,
    /// Folder with labels.csv + images/, a folder of class folders, or an IDX image file (with --idx-labels)
    data: PathBuf,
    /// IDX label file (MNIST format; .gz accepted) when DATA is an IDX image file
    #[arg(long)]
    idx_labels: Option<PathBuf>,
    /// Pre-processing preset for a bare .onnx model
    #[arg(long, value_parser = preset_parser())]
    preset: Option<String>,
    /// Evaluate at most N samples
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// Skip the first N samples (e.g. to hold out calibration images)
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Images per inference call (the model must take a batch: a symbolic leading dim, or --free-batch)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Write per-sample top-5 predictions as CSV
    #[arg(long)]
    predictions: Option<PathBuf>,
    /// Print a JSON document instead of text
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    load: LoadArgs,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let s = open_session(&a.model, &a.load)?;
    let batch = a.batch as usize;
    if batch > 1 && !s.accepts_batch() {
        let shape = s.inputs().first().map(|i| i.shape_string()).unwrap_or_default();
        bail!(Usage(format!(
            "--batch {batch}: the model's input {shape} has a batch dim fixed at 1; add --free-batch to free it (as \
             serve does), or use --batch 1"
        )));
    }
    if let Some(p) = &a.predictions {
        check_writable(&[p])?;
    }
    // Images need pre-processing (--preset or the bundle's); .npy samples are fed as they are.
    let pre = image_preprocess(&s, a.preset.as_deref())?;
    let data = Dataset::labelled(&a.data, a.idx_labels.as_deref(), s.labels())?;
    let total = data.len();
    let end = a.limit.map(|l| (a.skip + l as usize).min(total)).unwrap_or(total);
    if a.skip >= end {
        bail!(BadInput(format!("no samples to evaluate ({total} in the dataset, skip {})", a.skip)));
    }
    let bar = progress(end - a.skip, "eval");
    let e = edgepack_quantize::eval::evaluate(&s, &data, pre.as_ref(), a.skip..end, batch, |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    if let Some(p) = &a.predictions {
        let mut csv = String::from("file,label,top1,top2,top3,top4,top5\n");
        for r in &e.predictions {
            let cells: Vec<String> = r.top5.iter().map(|x| x.to_string()).collect();
            csv.push_str(&format!("{},{},{}\n", r.id, r.label.unwrap_or(usize::MAX), cells.join(",")));
        }
        edgepack_runtime::fsutil::write_atomic(p, csv.as_bytes())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let (n, median) = (e.tally.samples, e.median_ms_per_sample);
    let (top1, top5) = e.tally.percent();
    let fraction = |k: usize| k as f64 / n as f64;
    let res = json!({
        "model": a.model, "data": a.data, "samples": n, "skip": a.skip,
        "top1": fraction(e.tally.top1), "top5": fraction(e.tally.top5),
        "latency_ms_median_per_sample": median, "backend": backend_json(&s),
        "variant": s.bundle().map(|b| b.variant.clone()),
    });
    if a.json {
        crate::output::json(res)?;
    } else {
        println!(
            "{} samples: top-1 {:.2} %, top-5 {:.2} %  (median {:.2} ms/sample, {})",
            n,
            top1,
            top5,
            median,
            s.backend_description()
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct PackArgs {
    /// The ONNX model (first variant; usually fp32)
    model: PathBuf,
    /// Id and precision of the first variant: ID[:PRECISION] (e.g. pruned-int8:int8)
    #[arg(long, default_value = "fp32:fp32")]
    main: String,
    /// The bundle to write (atomically)
    #[arg(short, long)]
    out: PathBuf,
    /// Bundle name (default: the model file's stem)
    #[arg(long)]
    name: Option<String>,
    /// Version of the bundle (the model's release, recorded in the manifest), e.g. 2.1.0
    #[arg(long, default_value = "1.0.0")]
    bundle_version: String,
    /// One-line description stored in the manifest
    #[arg(long)]
    description: Option<String>,
    /// What the model does: its default post-processing (checked against the model's outputs)
    #[arg(long, default_value = "classification", value_parser = ["classification", "detection", "custom"])]
    task: String,
    /// Image pre-processing preset, sized from the model's input (checked against its channels and layout)
    #[arg(long, value_parser = preset_parser())]
    preset: Option<String>,
    /// Image pre-processing as JSON (see schema/manifest.v1.schema.json), instead of --preset
    #[arg(long)]
    preprocess_json: Option<String>,
    /// Post-processing as JSON, instead of the task's default
    #[arg(long)]
    postprocess_json: Option<String>,
    /// How to run the model over a stream of samples, carrying state between calls, as JSON (schema
    /// `StreamSpec`), e.g. Silero VAD: {"input": "input", "chunk": 512, "context": 64, "state": [{"input": "state",
    /// "output": "stateN"}], "constants": {"sr": 16000}, "output": "output", "sample_rate": 16000}
    #[arg(long)]
    stream_json: Option<String>,
    /// Labels: one per line (class index = line number; as many as the model has classes)
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Classification: classes reported per input
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    top_k: u32,
    /// Detection: score threshold (default: 0.25 for a YOLO head, 0.7 for an SSD one)
    #[arg(long)]
    score_threshold: Option<f32>,
    /// Detection: NMS IoU threshold (default: 0.45 for a YOLO head, 0.3 for an SSD one)
    #[arg(long)]
    iou_threshold: Option<f32>,
    /// Detection: NMS across classes (one box per place, whatever its class) instead of per class
    #[arg(long)]
    class_agnostic: bool,
    /// Extra variant: ID=PATH[:PRECISION] (precision fp32, fp16, int8, int4, mixed; default int8)
    #[arg(long = "variant", value_name = "ID=PATH[:PRECISION]")]
    variants: Vec<String>,
    /// Attach a report file (stored under reports/)
    #[arg(long)]
    report: Vec<PathBuf>,
    /// Metadata KEY=VALUE (license, source, ...)
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    meta: Vec<String>,
    /// Sign the manifest with this secret key (.key from `edgepack keygen`)
    #[arg(long)]
    sign: Option<PathBuf>,
    /// Member storage: none, or zstd (each member stored compressed when that makes it smaller; pruned weights
    /// shrink the most; the runtime decompresses at load)
    #[arg(long, default_value = "none", value_parser = ["none", "zstd"])]
    compress: String,
    /// Print a JSON document instead of text
    #[arg(long)]
    json: bool,
}

fn parse_precision(s: &str) -> Result<Precision> {
    Ok(match s {
        "fp32" => Precision::Fp32,
        "fp16" => Precision::Fp16,
        "int8" => Precision::Int8,
        "int4" => Precision::Int4,
        "mixed" => Precision::Mixed,
        _ => bail!(Usage(format!("unknown precision `{s}` (fp32, fp16, int8, int4, mixed)"))),
    })
}

pub fn pack(a: PackArgs) -> Result<()> {
    let t0 = Instant::now();
    check_writable(&[&a.out])?;
    let bytes = std::fs::read(&a.model).with_context(|| format!("reading {}", a.model.display()))?;
    if edgepack_runtime::session::is_bundle(&bytes) {
        bail!(Usage(format!(
            "{} is an .edgepack bundle, not an ONNX model: pack takes the .onnx file (see the bundle with \
             `edgepack inspect`)",
            a.model.display()
        )));
    }
    let model = edgepack_runtime::onnx::Model::from_bytes(&bytes).with_context(|| format!("{}", a.model.display()))?;
    let yolo = edgepack_packager::yolo_export(&model);
    let task = match a.task.as_str() {
        "detection" => Task::Detection,
        "custom" => Task::Custom,
        _ => Task::Classification,
    };
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| a.model.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or("model".into()));
    let mut b = BundleBuilder::new(&name, &a.bundle_version, task).compression(match a.compress.as_str() {
        "zstd" => edgepack_packager::Compression::Zstd,
        _ => edgepack_packager::Compression::None,
    });
    if let Some(d) = &a.description {
        b = b.description(d);
    }
    for kv in &a.meta {
        let (k, v) = kv.split_once('=').ok_or_else(|| Usage(format!("--meta expects KEY=VALUE, got `{kv}`")))?;
        b = b.metadata(k, v);
    }
    let (main_id, main_prec) = match a.main.split_once(':') {
        Some((id, p)) => (id, parse_precision(p)?),
        None => (a.main.as_str(), Precision::Fp32),
    };
    b = b.variant(main_id, bytes, main_prec, &[BackendKind::Cpu, BackendKind::Gpu])?;
    for v in &a.variants {
        let (id, rest) =
            v.split_once('=').ok_or_else(|| Usage(format!("--variant expects ID=PATH[:PRECISION], got `{v}`")))?;
        let (path, prec) = match rest.rsplit_once(':') {
            Some((p, pr)) if ["fp32", "fp16", "int8", "int4", "mixed"].contains(&pr) => (p, parse_precision(pr)?),
            _ => (rest, Precision::Int8),
        };
        let vb = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        b = b.variant(id, vb, prec, &[BackendKind::Cpu])?;
    }
    // Pre-processing: explicit JSON, or a preset sized from the model's first input.
    let pre = if let Some(j) = &a.preprocess_json {
        Some(Preprocess::Image(serde_json::from_str(j).map_err(|e| Usage(format!("--preprocess-json: {e}")))?))
    } else if let Some(p) = a.preset.as_deref().or(yolo.as_ref().filter(|_| task == Task::Detection).map(|_| "yolo")) {
        let (inputs, _) = edgepack_runtime::session::model_io(&model);
        let input = inputs.first().context("the model has no input")?;
        // An input of symbolic size is fed at the export size an Ultralytics model records (`imgsz`).
        let size = yolo.as_ref().and_then(|y| y.imgsz);
        let pre = input.image_preset_sized(p, size).map_err(|e| Usage(format!("--preset {p}: {e}")))?;
        if a.preset.is_none() {
            let (w, h) = pre.input_size((1, 1));
            crate::output::note(format!(
                "an Ultralytics YOLO export: pre-processing `yolo` (letterbox to {w}×{h}, pad 114, RGB /255), its \
                 class names as labels"
            ));
        }
        Some(Preprocess::Image(pre))
    } else {
        None
    };
    if let Some(Preprocess::Image(p)) = &pre {
        p.validate().map_err(|e| Usage(format!("--preprocess-json: {e}")))?;
    }
    if let Some(p) = pre {
        b = b.preprocess(p);
    }
    let outputs: Vec<String> = model.graph.outputs.iter().filter_map(|o| o.name.clone()).collect();
    let post = if let Some(j) = &a.postprocess_json {
        Some(serde_json::from_str(j).map_err(|e| Usage(format!("--postprocess-json: {e}")))?)
    } else {
        match task {
            Task::Classification => Some(Postprocess::Classification {
                output: None,
                softmax: Softmax::Auto,
                top_k: a.top_k as usize,
                label_offset: 0,
            }),
            Task::Detection => match (&yolo, edgepack_packager::ssd_outputs(outputs.iter().map(String::as_str))) {
                (Some(y), _) => Some(Postprocess::Yolo {
                    output: None,
                    classes: y.names.len(),
                    objectness: false,
                    task: y.task.clone(),
                    score_threshold: a.score_threshold.unwrap_or(0.25),
                    iou_threshold: a.iou_threshold.unwrap_or(0.45),
                    class_agnostic: a.class_agnostic,
                    max_detections: 300,
                }),
                (None, Some((scores, boxes))) => Some(Postprocess::SsdDetection {
                    scores_output: scores.to_string(),
                    boxes_output: boxes.to_string(),
                    classes: vec![1],
                    score_threshold: a.score_threshold.unwrap_or(0.7),
                    iou_threshold: a.iou_threshold.unwrap_or(0.3),
                    max_detections: 1000,
                }),
                (None, None) => bail!(Usage(format!(
                    "--task detection needs an Ultralytics YOLO export (its metadata `task` and `names`) or outputs \
                     named like `scores` and `boxes` (the model's: {}); describe them with --postprocess-json (e.g. \
                     {{\"kind\":\"yolo\",\"classes\":80}}), or pack with --task custom",
                    outputs.join(", ")
                ))),
            },
            Task::Custom => None,
        }
    };
    if let Some(p) = post {
        b = b.postprocess(p);
    }
    if let Some(j) = &a.stream_json {
        b = b.stream(serde_json::from_str(j).map_err(|e| Usage(format!("--stream-json: {e}")))?);
    }
    if let Some(l) = &a.labels {
        b = b.labels(&read_labels(l)?)?;
    } else if let Some(y) = yolo.as_ref().filter(|y| task == Task::Detection && !y.names.is_empty()) {
        // The class names an Ultralytics export carries in its metadata.
        b = b.labels(&y.names)?;
    }
    for r in &a.report {
        let fname = r.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or("report".into());
        let media = if fname.ends_with(".json") {
            "application/json"
        } else if fname.ends_with(".html") {
            "text/html"
        } else {
            "text/plain"
        };
        b = b.report(&fname, media, std::fs::read(r).with_context(|| format!("reading {}", r.display()))?)?;
    }
    let key = a.sign.as_deref().map(SecretKey::load).transpose()?;
    let manifest = b.write(&a.out, key.as_ref())?;
    let size = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    if a.json {
        crate::output::json(
            json!({"bundle": a.out, "size": size, "signed_by": key.map(|k| k.public().key_id()), "manifest": manifest}),
        )?;
    } else {
        println!(
            "packed {} ({} bytes, {} variant(s), {}) in {:.0} ms",
            a.out.display(),
            size,
            manifest.variants.len(),
            key.map(|k| format!("signed by {}", k.public().key_id())).unwrap_or("unsigned".into()),
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(())
}

pub fn verify(path: &Path, key: Option<&Path>, json_out: bool) -> Result<()> {
    let key = load_key(key)?;
    let t0 = Instant::now();
    let b = Bundle::open(path, &OpenOptions { key: key.clone(), ..Default::default() })
        .with_context(|| format!("verifying {}", path.display()))?;
    // Every variant must also be a well-formed model.
    for v in &b.manifest().variants {
        edgepack_runtime::onnx::Model::from_bytes(&b.member(&v.member)?)
            .with_context(|| format!("variant `{}`", v.id))?;
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let signer = b.signer().map(|k| k.key_id());
    if json_out {
        crate::output::json(json!({"bundle": path, "verified": true, "members": b.manifest().members.len(),
            "signed_by": signer, "trusted": b.is_trusted(), "ms": ms}))?;
    } else {
        let sig = signature_summary(signer.as_deref(), b.is_trusted());
        println!("OK {}: {} members verified, {sig} ({ms:.0} ms)", path.display(), b.manifest().members.len());
    }
    Ok(())
}

pub fn keygen(out: &Path) -> Result<()> {
    let (k, p, pk) = edgepack_packager::generate_key_files(out)?;
    println!("secret key {} (keep it private)\npublic key {} (id {})", k.display(), p.display(), pk.key_id());
    Ok(())
}

pub fn rewrite(
    input: &Path,
    output: &Path,
    topo_sort: bool,
    remove_unused: bool,
    opset: Option<i64>,
    free_batch: bool,
) -> Result<()> {
    let bytes = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let mut model =
        edgepack_runtime::onnx::Model::from_bytes(&bytes).with_context(|| format!("{}", input.display()))?;
    if let Some(v) = opset {
        use edgepack_runtime::onnx::upgrade::MAX_UPGRADE_OPSET;
        let from = model.opset("").unwrap_or(0);
        if v < from {
            bail!(Usage(format!(
                "{} is at opset {from}; --opset {v} would downgrade it, which rewrite does not do",
                input.display()
            )));
        }
        if v > MAX_UPGRADE_OPSET {
            bail!(Usage(format!(
                "--opset {v}: upgrades are implemented up to opset {MAX_UPGRADE_OPSET} (the model is at {from})"
            )));
        }
        if v == from {
            crate::output::warn(format!("{} is at opset {from} already; --opset {v} changes nothing", input.display()));
        }
        let r = model.upgrade_opset(v)?;
        for (node, what) in &r.converted {
            println!("  opset {} → {}: {node}: {what}", r.from, r.to);
        }
    }
    if topo_sort {
        model.graph.topo_sort()?;
    }
    if free_batch && model.graph.free_batch_dim() == 0 {
        anyhow::bail!(BadInput(format!("{}: no input has a leading dim fixed at 1 to free", input.display())));
    }
    let removed = if remove_unused { model.graph.remove_unused_initializers() } else { 0 };
    let out = model.to_bytes();
    edgepack_runtime::fsutil::write_atomic(output, &out).with_context(|| format!("writing {}", output.display()))?;
    println!(
        "wrote {} ({} bytes; {}{} initializers removed)",
        output.display(),
        out.len(),
        if out == bytes { "byte-identical to the input; " } else { "" },
        removed
    );
    Ok(())
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// fp32 model (.onnx) or bundle (its first variant and pre-processing are used)
    model: PathBuf,
    /// Calibration samples: a folder of images and/or .npy tensors (searched recursively), a labelled folder
    /// (labels.csv + images/, class folders) or an IDX image file with --idx-labels
    #[arg(long)]
    calib: PathBuf,
    /// Labels of an IDX calibration file (MNIST); makes the held-out samples labelled
    #[arg(long)]
    idx_labels: Option<PathBuf>,
    /// Use at most this many calibration samples (the first ones, in sorted order, or shuffled with --shuffle)
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    calib_limit: u32,
    /// Held-out samples for the budget and the fidelity report: the next N samples after the calibration ones
    /// (or the first N of --eval)
    #[arg(long, default_value_t = 200)]
    holdout: usize,
    /// Take the calibration and held-out samples in a fixed shuffled order (for folders sorted by class)
    #[arg(long)]
    shuffle: bool,
    /// The order --shuffle uses: the same seed gives the same samples on every machine
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
    /// Take the held-out samples from this folder instead (same layouts as --calib)
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Pre-processing preset for a bare .onnx model fed with images
    #[arg(long, value_parser = preset_parser())]
    preset: Option<String>,
    /// Range estimation: minmax, percentile (with --percentile), entropy, mse, or auto (min-max, and when that misses
    /// the gate, MSE ranges too: the one closer to the gate on the choosing samples is kept)
    #[arg(long, default_value = "auto", value_parser = ["auto", "minmax", "percentile", "entropy", "mse"])]
    method: String,
    /// With --method percentile: the percentile of |activation| kept in range (e.g. 99.99)
    #[arg(long, default_value_t = 99.99)]
    percentile: f64,
    /// Accuracy gate on the held-out samples: top1-drop=PT, agreement=PCT, sqnr=DB (every output),
    /// fidelity=DB,COSINE (every output: SQNR ≥ DB or cosine ≥ COSINE), detections=PCT (a YOLO detector: that % of
    /// the fp32 detections found again, same class, IoU ≥ 0.5) or none (all INT8 whatever it costs). When the
    /// all-INT8 model misses it, the most sensitive layers are kept in fp32 (the fewest that meet it), chosen on the
    /// first half of the held-out samples and reported on the other half. Default: top-1 agreement ≥ 97 % on
    /// classifiers, detections=97 on YOLO detectors (a bundle with YOLO post-processing or an Ultralytics export),
    /// fidelity=30,0.999 on other models
    #[arg(long, value_name = "GATE")]
    budget: Option<String>,
    /// At most this fraction of the quantizable layers may be kept in fp32 to meet the budget
    #[arg(long, default_value_t = 0.25)]
    max_float_fraction: f64,
    /// Held-out samples per layer for the sensitivity analysis
    #[arg(long, default_value_t = 16)]
    sensitivity_samples: usize,
    /// Measure per-layer sensitivity even when no budget needs it
    #[arg(long)]
    sensitivity: bool,
    /// How layer sensitivity is measured: exact (the model's output with each layer alone quantized, a pass per
    /// layer), local (each layer's own output error, every layer in one pass) or auto (exact when that is quick)
    #[arg(long, default_value = "auto", value_parser = ["auto", "exact", "local"])]
    sensitivity_method: String,
    /// Keep in fp32 the layers the CPU runtime has no integer kernel for (their INT8 form would be slower)
    #[arg(long)]
    speed_gate: bool,
    /// Held-out samples for the per-layer SQNR
    #[arg(long, default_value_t = 8)]
    layer_samples: usize,
    /// Timed runs per model for the CPU latency in the report (0 = skip)
    #[arg(long, default_value_t = 10)]
    latency_runs: usize,
    /// Keep these nodes (by name) or op types in float; repeatable
    #[arg(long)]
    exclude: Vec<String>,
    /// Quantize only nodes of these op types (e.g. --op-types Conv,Gemm); the others stay float
    #[arg(long, value_delimiter = ',')]
    op_types: Vec<String>,
    /// One scale per weight tensor instead of one per output channel
    #[arg(long)]
    per_tensor: bool,
    /// Activation type of the QDQ pairs: u8 or s8 (onnxruntime's S8S8; edgepack's runtime maps it onto the same
    /// uint8 integer kernels, same values and speed)
    #[arg(long, default_value = "u8", value_parser = ["u8", "s8"])]
    activation_type: String,
    /// Activation ranges symmetric around 0 (zero point 128 for u8, 0 for s8)
    #[arg(long)]
    symmetric_activations: bool,
    /// static: calibrated activation ranges (QDQ); dynamic: onnxruntime's quantize_dynamic form, MatMul/Gemm
    /// quantize their input on every call (DynamicQuantizeLinear + MatMulInteger, int8 weights) and LSTM/GRU/RNN get
    /// int8 weights, nothing calibrated (the --calib samples only supply held-out samples); auto: static, and when
    /// that misses the gate, dynamic too, keeping the closer of the two
    #[arg(long, default_value = "auto", value_parser = ["auto", "static", "dynamic"])]
    mode: String,
    /// How weights become integers: nearest (round to nearest), gptq (each layer's rounding fitted to its
    /// calibration inputs, error spread along the inverse input covariance), bias-correction (the mean output error
    /// folded into the bias), gptq+bias-correction, sequential (gptq+bias-correction fitted layer by layer on the
    /// inputs of the partly quantized model; slower, no better on EfficientNet-Lite0), or auto (nearest,
    /// bias-correction and gptq+bias-correction: the one closest to fp32 on the choosing samples kept)
    #[arg(long, default_value = "auto", value_parser = ["auto", "nearest", "gptq", "bias-correction", "gptq+bias-correction", "sequential"])]
    rounding: String,
    /// Activation equalization before calibration: each channel's range moved into the weights of the layers that
    /// read it (through ReLU, pools, Concat and residual sums; the model's function unchanged), so one INT8 scale
    /// serves every channel. auto: tried when there are held-out samples, and kept when the INT8 model comes closer
    /// to fp32 on the choosing samples (the gate's measure, ties by output SQNR); on: always; off: never
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    equalize: String,
    /// Weight-only quantization with this many bits (4 or 8; 2 to 6 on the coded grid, fractions too: 3.6):
    /// smaller weights, activations stay float (runs at fp32 speed; for download size). 4-bit weights come in
    /// blocks of --block-size with one scale each
    #[arg(long, value_name = "BITS")]
    weight_only: Option<f64>,
    /// The grid of --weight-only weights. blocks: int4 in blocks of --block-size, one float16 scale per block
    /// (4 bits per weight in the ONNX file and in the bundle). coded: int8 storage on a per-channel step chosen so
    /// the codes carry BITS bits of entropy; the ONNX file is int8-sized, a zstd bundle (`pack --compress zstd`)
    /// stores about BITS bits per weight, with ~4 dB more weight SQNR than int4 blocks at the same bundle size.
    /// Both are plain ONNX (DequantizeLinear) that onnxruntime runs
    #[arg(long, default_value = "blocks", value_parser = ["blocks", "coded"])]
    weight_grid: String,
    /// With --weight-only 4: weights per scale (N); each row of a weight (one output channel of a Conv) is cut into
    /// equal blocks of the largest length in [N/2, N] that divides it; rows with no such length and depthwise
    /// convolutions get int8
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(2..=4096))]
    block_size: u32,
    /// Output INT8 ONNX file
    #[arg(short, long)]
    out: PathBuf,
    /// Fidelity report (JSON; an .html page is written beside it). Default: OUT.report.json
    #[arg(long)]
    report: Option<PathBuf>,
    /// Print every layer in the terminal table (default: fp32 layers and the 10 lowest-SQNR int8 layers)
    #[arg(long)]
    all_layers: bool,
    /// Exit with code 1 when the result misses its --budget
    #[arg(long)]
    strict: bool,
    /// Print a JSON document instead of text
    #[arg(long)]
    json: bool,
    /// Read flags from a TOML file first (`method = "mse"`, `exclude = ["Softmax"]`, `shuffle = true`; any flag
    /// of this command by its long name); flags on the command line override it
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    #[command(flatten)]
    load: LoadArgs,
}

/// The seed `--shuffle` uses unless told otherwise.
pub const DEFAULT_SEED: u64 = 0x5eed;

/// The files a job writes: the model, its JSON report (default: OUT + `suffix`) and the HTML page beside it.
pub fn job_outputs(out: &Path, report: Option<&Path>, suffix: &str) -> (PathBuf, PathBuf) {
    let report_path = report.map(Path::to_path_buf).unwrap_or_else(|| {
        let mut p = out.to_path_buf().into_os_string();
        p.push(suffix);
        PathBuf::from(p)
    });
    let html = report_path.with_extension("html");
    (report_path, html)
}

/// Fails before a long job when any of its outputs could not be written.
pub fn check_job_outputs(out: &Path, report: Option<&Path>, suffix: &str) -> Result<()> {
    let (json, html) = job_outputs(out, report, suffix);
    check_writable(&[out, &json, &html])
}

/// One read and one verification of a model or bundle: the session (its pre-processing) and the ONNX graph of the
/// chosen variant come from the same bytes. Also returns the size of that ONNX file.
pub fn open_with_graph(path: &Path, opts: &SessionOptions) -> Result<(Session, edgepack_runtime::onnx::Model, usize)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (s, onnx) = if edgepack_runtime::session::is_bundle(&bytes) {
        let bundle = Bundle::from_bytes(bytes, &OpenOptions { key: opts.key.clone(), ..Default::default() })?;
        let onnx = bundle.model_bytes(opts.variant.as_deref())?.1.to_vec();
        (Session::from_bundle(bundle, opts)?, onnx)
    } else {
        (Session::from_onnx_bytes(&bytes, opts)?, bytes)
    };
    let model = edgepack_runtime::onnx::Model::from_bytes(&onnx)?;
    Ok((s, model, onnx.len()))
}

/// The datasets of an offline job: the first `limit` samples of `calib` calibrate, the next `holdout` (or the first
/// `holdout` of `eval`) are held out. `shuffle`: both in the fixed shuffled order of that seed.
pub struct SampleSets {
    data: Dataset,
    eval: Option<Dataset>,
    calib_src: String,
    eval_src: String,
    n: usize,
    holdout: usize,
}

impl SampleSets {
    pub fn open(
        calib: &Path,
        idx_labels: Option<&Path>,
        limit: usize,
        eval: Option<&Path>,
        holdout: usize,
        shuffle: Option<u64>,
        inputs: &[String],
    ) -> Result<SampleSets> {
        let order = |d: Dataset| match shuffle {
            Some(seed) => d.shuffled(seed),
            None => d,
        };
        let data = order(Dataset::open_for_inputs(calib, idx_labels, inputs)?);
        let n = data.len().min(limit.max(1));
        let eval_data = eval.map(|p| Dataset::open_for_inputs(p, None, inputs).map(order)).transpose()?;
        let order_note = shuffle.map(|seed| format!(" (shuffled, seed {seed})")).unwrap_or_default();
        Ok(SampleSets {
            data,
            eval: eval_data,
            calib_src: format!("{}{order_note}", calib.display()),
            eval_src: eval.map(|p| format!("{}{order_note}", p.display())).unwrap_or_default(),
            n,
            holdout,
        })
    }

    pub fn calib(&self) -> Samples<'_> {
        Samples { data: &self.data, range: 0..self.n, source: self.calib_src.clone() }
    }

    pub fn held_out(&self) -> Samples<'_> {
        match &self.eval {
            Some(d) => Samples { data: d, range: 0..d.len().min(self.holdout), source: self.eval_src.clone() },
            None => Samples {
                data: &self.data,
                range: self.n..self.data.len().min(self.n + self.holdout),
                source: self.calib_src.clone(),
            },
        }
    }
}

/// Runs a library job that reports [`Event`]s: one progress bar per stage, notes printed above it.
pub fn with_progress<T>(job: impl FnOnce(&mut dyn FnMut(Event)) -> T) -> T {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() && !crate::output::quiet() {
        return with_progress_lines(job);
    }
    let mut bar: Option<indicatif::ProgressBar> = None;
    let out = job(&mut |e| match e {
        Event::Stage(name, total) => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            bar = Some(progress(total, name));
        }
        Event::Step(d) => {
            if let Some(b) = &bar {
                b.set_position(d as u64);
            }
        }
        Event::Note(line) => match &bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        },
    });
    if let Some(b) = bar.take() {
        b.finish_and_clear();
    }
    out
}

/// [`with_progress`] when stderr is not a terminal (a CI log, a pipe): plain lines instead of bars, one when a
/// stage starts, one every 10 s while it runs and one when it ends, so a long job is never silent.
fn with_progress_lines<T>(job: impl FnOnce(&mut dyn FnMut(Event)) -> T) -> T {
    use std::time::{Duration, Instant};
    struct Stage {
        name: &'static str,
        total: usize,
        at: usize,
        start: Instant,
        said: Instant,
    }
    let end = |s: &Stage| eprintln!("{}: done, {} steps in {:.1} s", s.name, s.total, s.start.elapsed().as_secs_f64());
    let mut stage: Option<Stage> = None;
    let out = job(&mut |e| match e {
        Event::Stage(name, total) => {
            if let Some(s) = stage.take() {
                end(&s);
            }
            eprintln!("{name}: {total} steps");
            let now = Instant::now();
            stage = Some(Stage { name, total, at: 0, start: now, said: now });
        }
        Event::Step(d) => {
            if let Some(s) = &mut stage {
                s.at = d;
                if s.said.elapsed() >= Duration::from_secs(10) {
                    eprintln!("{}: {}/{} ({:.0} s)", s.name, s.at, s.total, s.start.elapsed().as_secs_f64());
                    s.said = Instant::now();
                }
            }
        }
        Event::Note(line) => eprintln!("{line}"),
    });
    if let Some(s) = stage.take() {
        end(&s);
    }
    out
}

/// Writes a job's model, its JSON report and the HTML page as one atomic group: all three appear, or none (an
/// error or Ctrl-C while writing leaves nothing behind). Returns (JSON path, HTML path).
pub fn write_model_and_report(
    out: &Path,
    model: &[u8],
    report: Option<&Path>,
    suffix: &str,
    json_text: &str,
    html: &str,
) -> Result<(PathBuf, PathBuf)> {
    let (report_path, html_path) = job_outputs(out, report, suffix);
    edgepack_runtime::fsutil::write_atomic_all(&[
        (out, model),
        (report_path.as_path(), json_text.as_bytes()),
        (html_path.as_path(), html.as_bytes()),
    ])
    .with_context(|| format!("writing {}, {} and {}", out.display(), report_path.display(), html_path.display()))?;
    Ok((report_path, html_path))
}

/// Names given to `--exclude` must be a node name or an op type of the model.
fn check_excludes(model: &edgepack_runtime::onnx::Model, exclude: &[String]) -> Result<()> {
    let (unknown, ops) = edgepack_quantize::pipeline::unknown_excludes(model, exclude);
    if let Some(x) = unknown.first() {
        bail!(Usage(format!(
            "--exclude {x}: no node or op type of that name in the model (its op types: {}; node names are in the \
             report of a run without --exclude)",
            ops.join(", ")
        )));
    }
    Ok(())
}

/// `--op-types` must name op types the pass quantizes and the model has.
fn check_op_types(model: &edgepack_runtime::onnx::Model, op_types: &[String]) -> Result<()> {
    use edgepack_quantize::qdq::ACTIVATION_CONSUMERS as QUANTIZABLE;
    use edgepack_runtime::onnx::NodeExt;
    for t in op_types {
        if !QUANTIZABLE.contains(&t.as_str()) {
            bail!(Usage(format!("--op-types {t}: not an op type quantize handles ({})", QUANTIZABLE.join(", "))));
        }
        if !model.graph.nodes.iter().any(|n| n.op() == t.as_str()) {
            let have: std::collections::BTreeSet<&str> =
                model.graph.nodes.iter().map(|n| n.op()).filter(|o| QUANTIZABLE.contains(o)).collect();
            let have = have.into_iter().collect::<Vec<_>>().join(", ");
            bail!(Usage(format!("--op-types {t}: the model has no {t} node (its quantizable op types: {have})")));
        }
    }
    Ok(())
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    use edgepack_quantize::rounding::Methods;
    use edgepack_quantize::{calib, pipeline, qdq};
    let method = match a.method.as_str() {
        "percentile" if !(a.percentile > 0.0 && a.percentile <= 100.0) => {
            bail!(Usage(format!("--percentile {} must be within (0, 100]", a.percentile)))
        }
        "percentile" => calib::Method::Percentile(a.percentile),
        "mse" => calib::Method::Mse,
        "entropy" => calib::Method::Entropy,
        _ => calib::Method::MinMax,
    };
    let budget = match a.budget.as_deref().map(str::trim) {
        Some("none") => None,
        Some(b) => Some(b.parse::<edgepack_quantize::mixed::Budget>().map_err(|e| Usage(format!("--budget: {e}")))?),
        None => Some(edgepack_quantize::mixed::Budget::Default),
    };
    let sensitivity_method = match a.sensitivity_method.as_str() {
        "exact" => Some(edgepack_quantize::mixed::SensitivityMethod::Exact),
        "local" => Some(edgepack_quantize::mixed::SensitivityMethod::Local),
        _ => None,
    };
    if !(0.0..=1.0).contains(&a.max_float_fraction) {
        bail!(Usage("--max-float-fraction must be within 0..1".into()));
    }
    let weight_only = a.weight_only.map(|b| edgepack_quantize::weight_only::WeightOnly {
        bits: b,
        group: a.block_size as usize,
        coded: a.weight_grid == "coded",
    });
    match weight_only.map(|w| (w, w.check())) {
        Some((w, Err(e))) => {
            let (lo, hi) = edgepack_quantize::weight_only::CODED_BITS;
            let hint = if w.coded {
                "; 8 is plain int8, without --weight-grid coded".to_string()
            } else {
                format!("; {lo} to {hi} with --weight-grid coded")
            };
            bail!(Usage(format!("--weight-only: {e}{hint}")))
        }
        None if a.weight_grid == "coded" => bail!(Usage("--weight-grid applies to --weight-only".into())),
        _ => {}
    }
    if a.weight_only.is_some() && a.mode == "dynamic" {
        bail!(Usage("--weight-only keeps activations float; it does not combine with --mode dynamic".into()));
    }
    check_job_outputs(&a.out, a.report.as_deref(), ".report.json")?;
    let opts = session_options(&a.load)?;
    let (s, model, fp32_bytes) = open_with_graph(&a.model, &opts)?;
    check_excludes(&model, &a.exclude)?;
    check_op_types(&model, &a.op_types)?;
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
    // A detector is judged by its detections: the bundle's YOLO post-processing, or an Ultralytics export's own.
    let detector = match s.postprocess() {
        Some(p @ Postprocess::Yolo { output, .. }) => {
            p.yolo_spec().map(|spec| edgepack_quantize::fidelity::Detector { output: output.clone(), spec })
        }
        Some(_) => None,
        None => edgepack_packager::yolo_export(&model).map(|y| edgepack_quantize::fidelity::Detector {
            output: None,
            spec: edgepack_runtime::process::YoloSpec {
                classes: y.names.len(),
                objectness: false,
                task: y.task,
                score_threshold: 0.25,
                iou_threshold: 0.45,
                class_agnostic: false,
                max_detections: 300,
            },
        }),
    };
    let job = pipeline::Job {
        model: &model,
        model_name: a.model.display().to_string(),
        output_name: a.out.display().to_string(),
        fp32_bytes,
        calib: sets.calib(),
        held_out: Some(sets.held_out()),
        pre: pre.as_ref(),
        detector,
        method,
        method_name: if let Some(b) = &a.weight_only {
            if a.weight_grid == "coded" {
                format!("weight-only, coded grid of {b} bits (activations float)")
            } else {
                format!("weight-only int{b} (activations float)")
            }
        } else if a.mode == "dynamic" {
            "dynamic (each call's own range)".into()
        } else if a.method == "percentile" {
            format!("percentile {}", a.percentile)
        } else if a.method == "auto" {
            "minmax".into()
        } else {
            a.method.clone()
        },
        cfg: qdq::QdqConfig {
            exclude: a.exclude.clone(),
            op_types: a.op_types.clone(),
            per_tensor_weights: a.per_tensor,
            dynamic: a.mode == "dynamic",
            signed_activations: a.activation_type == "s8",
            symmetric_activations: a.symmetric_activations,
            refiner: None,
            wider: vec![],
            coded_bits: Default::default(),
            weight_only,
        },
        rounding: match a.rounding.as_str() {
            "nearest" => pipeline::Rounding::Nearest,
            "bias-correction" => pipeline::Rounding::Fitted(Methods::BIAS_CORRECTION),
            "gptq" => pipeline::Rounding::Fitted(Methods { bias_correction: false, ..Methods::GPTQ_BIAS_CORRECTION }),
            "gptq+bias-correction" => pipeline::Rounding::Fitted(Methods::GPTQ_BIAS_CORRECTION),
            "sequential" => pipeline::Rounding::Fitted(Methods::SEQUENTIAL),
            _ => pipeline::Rounding::Auto,
        },
        equalize: match a.equalize.as_str() {
            "on" => pipeline::Equalize::On,
            "off" => pipeline::Equalize::Off,
            _ => pipeline::Equalize::Auto,
        },
        budget,
        sensitivity_method,
        max_float_fraction: a.max_float_fraction,
        sensitivity_samples: a.sensitivity_samples,
        layer_samples: a.layer_samples,
        latency_runs: a.latency_runs,
        always_sensitivity: a.sensitivity,
        speed_gate: a.speed_gate,
        try_dynamic: a.mode == "auto" && a.weight_only.is_none(),
        try_mse: a.method == "auto" && a.weight_only.is_none() && a.mode != "dynamic",
        session: opts.clone(),
        held_out_max_bytes: 1 << 30,
    };
    let (q, mut report) = with_progress(|on| pipeline::run(&job, on))?;
    report.provenance = Some(crate::output::provenance());
    let (report_path, html_path) = write_model_and_report(
        &a.out,
        &q.to_bytes(),
        a.report.as_deref(),
        ".report.json",
        &serde_json::to_string_pretty(&report)?,
        &report.html(),
    )?;
    if a.json {
        crate::output::json(
            json!({"out": a.out, "report_json": report_path, "report_html": html_path, "report": report}),
        )?;
    } else {
        print!("{}", report.table(a.all_layers));
        println!(
            "wrote {} ({:.1} % of fp32), {} and {} in {:.1} s",
            a.out.display(),
            100.0 * report.size.ratio,
            report_path.display(),
            html_path.display(),
            report.seconds
        );
    }
    if let Some(b) = &report.budget
        && !b.met
    {
        let msg = format!("budget {} not met (best reached {:.3}); see the report", b.text, b.reached);
        if a.strict {
            bail!(msg);
        }
        crate::output::warn(msg);
    }
    Ok(())
}

/// `edgepack devices`: what `--device auto` can choose from.
pub fn devices(json: bool) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let gpu = edgepack_runtime::gpu::adapter();
    if json {
        let gpu = match &gpu {
            Ok(a) => serde_json::to_value(a)?,
            Err(why) => serde_json::json!({ "unavailable": why }),
        };
        let v = serde_json::json!({ "cpu": { "threads": threads, "engine": format!("tract {}", edgepack_runtime::cpu::TRACT_VERSION) }, "gpu": gpu });
        return crate::output::json(v);
    }
    println!("cpu   tract {} ({threads} threads)", edgepack_runtime::cpu::TRACT_VERSION);
    match gpu {
        Ok(a) => println!(
            "gpu   {} ({}, {}; {})",
            a.short(),
            a.device_type,
            if a.shader_f16 { "shader-f16" } else { "no shader-f16" },
            a.driver
        ),
        Err(why) => println!("gpu   none: {why}"),
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Model repository: <REPO>/<model>/<version>/<file>.edgepack|.onnx, and <REPO>/<model>/config.json
    #[arg(long)]
    pub repo: PathBuf,
    /// Address to listen on (port 0: any free port, printed at start)
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub addr: std::net::SocketAddr,
    /// Also serve KServe v2 gRPC (inference.GRPCInferenceService, as tritonclient.grpc speaks it) on this address
    /// (port 0: any free port, printed at start); off when not given
    #[arg(long)]
    pub grpc_addr: Option<std::net::SocketAddr>,
    /// Seconds between repository scans for new, changed or removed versions (0 = load once)
    #[arg(long, default_value_t = 5.0)]
    pub poll: f64,
    /// Largest request body, in MiB (413 beyond)
    #[arg(long, default_value_t = 64)]
    pub max_body_mib: usize,
    /// Deadline of a request that sets none, in milliseconds (504 after it)
    #[arg(long, default_value_t = 30_000)]
    pub timeout_ms: u64,
    /// Logs as JSON lines
    #[arg(long)]
    pub log_json: bool,
    /// Access log: one JSON line per HTTP request and gRPC call (time, remote, path, status, ms, bytes), appended
    /// to this file (`-`: stdout)
    #[arg(long, value_name = "FILE")]
    pub access_log: Option<PathBuf>,
    /// Base URL of swagger-ui-dist (swagger-ui.css, swagger-ui-bundle.js) for the /v2/docs page; host the two files
    /// yourself for browsers without internet access
    #[arg(long, value_name = "URL", default_value = edgepack_server::SWAGGER_UI_CDN)]
    pub swagger_ui: String,
    /// Where asynchronous jobs (POST /v2/models/M/jobs) are stored, durably (default: REPO/.jobs; `none`: jobs off)
    #[arg(long, value_name = "DIR")]
    pub jobs_dir: Option<PathBuf>,
    /// Largest asynchronous job request, in MiB (413 beyond; streamed to disk, not held in memory)
    #[arg(long, default_value_t = 256)]
    pub max_job_mib: usize,
    /// Seconds a finished job and its result are kept
    #[arg(long, default_value_t = 86_400)]
    pub job_ttl_s: u64,
    /// A shared job queue in Redis (redis://HOST:PORT): jobs, requests and results there, run by every server given
    /// the same URL, each job by one of them (default: on disk, this server only)
    #[arg(long, value_name = "URL")]
    pub queue: Option<String>,
    /// Asynchronous jobs run at once (each through its model version's batching queue); 0: this server accepts and
    /// stores jobs but runs none (they run at its next start with workers)
    #[arg(long, default_value_t = 4)]
    pub job_workers: usize,
    /// Threads parsing and answering HTTP requests (0 = one per core); inference runs on each model's workers
    #[arg(long, default_value_t = 0)]
    pub http_threads: usize,
    #[command(flatten)]
    pub load: crate::LoadArgs,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let mut session = session_options(&a.load)?;
    session.variant = None; // per model, from its config.json
    if a.load.variant.is_some() {
        anyhow::bail!(Usage("--variant is set per model in <REPO>/<model>/config.json (\"variant\")".into()));
    }
    let opts = edgepack_server::ServeOptions {
        repo: a.repo.clone(),
        addr: a.addr,
        poll: (a.poll > 0.0).then(|| std::time::Duration::from_secs_f64(a.poll)),
        session,
        max_body_bytes: a.max_body_mib.saturating_mul(1 << 20),
        request_timeout: std::time::Duration::from_millis(a.timeout_ms.max(1)),
        log_json: a.log_json,
        http_threads: a.http_threads,
        grpc_addr: a.grpc_addr,
        jobs: match a.jobs_dir {
            Some(d) if d.as_os_str() == "none" => None,
            d => Some(edgepack_server::JobOptions {
                dir: d.unwrap_or_else(|| a.repo.join(".jobs")),
                max_bytes: a.max_job_mib.saturating_mul(1 << 20),
                ttl: std::time::Duration::from_secs(a.job_ttl_s),
                workers: a.job_workers,
                queue: a.queue.clone(),
            }),
        },
        access_log: a.access_log,
        swagger_ui: a.swagger_ui,
    };
    edgepack_server::serve(opts)?;
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct BatchArgs {
    /// Model (.onnx) or bundle (.edgepack); images need a bundle with pre-processing
    pub model: PathBuf,
    /// A folder of images (JPEG/PNG, recursively) or a .jsonl file of KServe v2 requests
    pub input: PathBuf,
    /// Output JSON lines (written as <OUT>.part, renamed when complete; rerun to resume)
    #[arg(short, long)]
    pub out: PathBuf,
    /// Classes per image for classifiers (default: the bundle's)
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub top_k: Option<u32>,
    /// Items between fsyncs of the .part file (what an interruption can lose)
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub sync_every: u32,
    /// Process only shard I of N (0-based: a Kubernetes Indexed Job's JOB_COMPLETION_INDEX): the I-th of N
    /// contiguous slices of the inputs in their fixed order; also writes <OUT>.shard.json for `batch-merge`
    #[arg(long, value_name = "I/N")]
    pub shard: Option<edgepack_server::batch::Shard>,
    /// Print the summary as a JSON document
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub load: crate::LoadArgs,
}

#[derive(Args)]
pub struct BatchMergeArgs {
    /// The outputs of every shard of one `batch --shard I/N` run (any order)
    #[arg(required = true)]
    pub parts: Vec<PathBuf>,
    /// The merged JSON lines, in input order (written atomically)
    #[arg(short, long)]
    pub out: PathBuf,
    /// Print the summary as a JSON document
    #[arg(long)]
    pub json: bool,
}

pub fn batch_merge(a: BatchMergeArgs) -> Result<()> {
    check_writable(&[&a.out])?;
    let r = edgepack_server::batch::merge_shards(&a.parts, &a.out).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => anyhow::Error::new(BadInput(e.to_string())),
        _ => anyhow::Error::new(e).context(format!("writing {}", a.out.display())),
    })?;
    if a.json {
        crate::output::json_line(json!({"out": a.out, "shards": r.shards, "items": r.items}))?;
    } else {
        eprintln!("{}: {} items from {} shards", a.out.display(), r.items, r.shards);
    }
    Ok(())
}

pub fn batch(a: BatchArgs) -> Result<()> {
    use edgepack_server::batch::{BatchInput, run_batch};
    let input = if a.input.is_dir() {
        BatchInput::Images(a.input.clone())
    } else if a.input.extension().is_some_and(|e| e == "jsonl") {
        BatchInput::Requests(a.input.clone())
    } else {
        anyhow::bail!(Usage(format!(
            "{}: expected a folder of images or a .jsonl file of requests",
            a.input.display()
        )));
    };
    let s = open_session(&a.model, &a.load)?;
    let mut bar: Option<indicatif::ProgressBar> = None;
    let report =
        run_batch(&s, &input, &a.out, a.top_k.map(|k| k as usize), a.sync_every as usize, a.shard, |done, total| {
            let b = bar.get_or_insert_with(|| progress(total, "batch"));
            b.set_position(done as u64);
        })
        .with_context(|| format!("writing {}", a.out.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let failed = report.failed + report.resumed_failed;
    let summary = json!({"out": a.out, "backend": backend_json(&s), "total": report.total,
        "resumed": report.resumed, "done": report.done, "failed": failed,
        "shard": a.shard.map(|s| format!("{}/{}", s.index, s.count))});
    // Every item has its line (failed ones with an `error`), but a run with failed items is not a success.
    let failure = (failed > 0).then(|| {
        format!("{failed} of {} items failed; their lines in {} carry the error", report.total, a.out.display())
    });
    if a.json {
        match &failure {
            Some(m) => crate::output::json_failure(crate::exit::BAD_INPUT, "bad_input", m, summary)?,
            None => crate::output::json_line(summary)?,
        }
    } else {
        eprintln!(
            "{}: {} items ({} from an earlier run, {} now, {failed} with errors)",
            a.out.display(),
            report.total,
            report.resumed,
            report.done,
        );
    }
    if let Some(m) = failure {
        bail!(BadInput(m));
    }
    Ok(())
}

/// `edgepack man`: one page for the program and one per command (`edgepack-run.1`, ...).
pub fn man_pages(cmd: clap::Command, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut pages = vec![(String::from("edgepack"), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|c| c.get_name() != "help") {
        let name = format!("edgepack-{}", sub.get_name());
        let page = sub.clone().name(&*Box::leak(name.clone().into_boxed_str()));
        pages.push((name, page));
    }
    for (name, page) in &pages {
        let mut bytes = Vec::new();
        clap_mangen::Man::new(page.clone()).render(&mut bytes)?;
        let path = out.join(format!("{name}.1"));
        edgepack_runtime::fsutil::write_atomic(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("wrote {} man pages into {}", pages.len(), out.display());
    Ok(())
}

#[derive(Args)]
pub struct OpsArgs {
    /// Models (.onnx) or bundles (.edgepack; every variant counts)
    #[arg(required = true)]
    models: Vec<PathBuf>,
    /// Write the list here (one op per line, what EDGEPACK_INTERP_OPS reads) instead of printing it
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Print a JSON document instead of text
    #[arg(long)]
    json: bool,
}

/// The ONNX models of a file: an .onnx, or every variant of a bundle (verified).
fn models_of(path: &Path) -> Result<Vec<(String, edgepack_runtime::onnx::Model)>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if !edgepack_runtime::session::is_bundle(&bytes) {
        let m = edgepack_runtime::onnx::Model::from_bytes(&bytes).with_context(|| format!("{}", path.display()))?;
        return Ok(vec![(path.display().to_string(), m)]);
    }
    let b = Bundle::from_bytes(bytes, &OpenOptions::default()).with_context(|| format!("{}", path.display()))?;
    b.manifest()
        .variants
        .iter()
        .map(|v| {
            let m = edgepack_runtime::onnx::Model::from_bytes(&b.member(&v.member)?)
                .with_context(|| format!("{} variant `{}`", path.display(), v.id))?;
            Ok((format!("{}#{}", path.display(), v.id), m))
        })
        .collect()
}

/// `edgepack ops`: the ops a selective interpreter build needs for a set of models.
pub fn ops(a: OpsArgs) -> Result<()> {
    if let Some(o) = &a.out {
        check_writable(&[o])?;
    }
    let mut all = std::collections::BTreeSet::new();
    let mut kernels = std::collections::BTreeSet::new();
    let mut sources = Vec::new();
    for p in &a.models {
        for (name, m) in models_of(p)? {
            let (ops, k) = edgepack_runtime::interp::required_ops(&m);
            all.extend(ops);
            kernels.extend(k);
            sources.push(name);
        }
    }
    let known: std::collections::BTreeSet<&str> = edgepack_runtime::interp::OPS.iter().copied().collect();
    let missing: Vec<&String> = all.iter().filter(|o| !known.contains(o.as_str())).collect();
    if !missing.is_empty() {
        crate::output::warn(format!(
            "not in the kernel interpreter (the tract build runs them): {}",
            missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    let ops: Vec<&String> = all.iter().collect();
    if let Some(out) = &a.out {
        let mut text = format!("# edgepack ops {} (edgepack {})\n", sources.join(" "), edgepack_runtime::VERSION);
        text.push_str("# for EDGEPACK_INTERP_OPS: a selective build of the kernel interpreter\n");
        for o in &ops {
            text.push_str(o);
            text.push('\n');
        }
        edgepack_runtime::fsutil::write_atomic(out, text.as_bytes())
            .with_context(|| format!("writing {}", out.display()))?;
    }
    if a.json {
        return crate::output::json(json!({"models": sources, "ops": ops, "kernel_nodes": kernels,
            "not_in_interpreter": missing, "out": a.out}));
    }
    if let Some(out) = &a.out {
        println!(
            "wrote {} ({} ops for {} model(s); kernel nodes are always in)",
            out.display(),
            ops.len(),
            sources.len()
        );
    } else {
        for o in &ops {
            println!("{o}");
        }
    }
    Ok(())
}
