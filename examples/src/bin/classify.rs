//! Desktop offline classifier: packs (once) the shipped EfficientNet-Lite0 into a bundle next to the binary's
//! working directory, then classifies every image given on the command line. No network, no `../shared`.
//!
//!     cargo run --release -p edgepack-examples --bin classify -- assets/photos/*.png
use std::path::Path;

use anyhow::{Context, Result};
use edgepack_packager::BundleBuilder;
use edgepack_runtime::bundle::{BackendKind, Precision, Task};
use edgepack_runtime::process::{ImagePreprocess, Postprocess, Preprocess, Softmax};
use edgepack_runtime::{Session, SessionOptions};

const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets");

fn ensure_bundle(path: &Path) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let model = std::fs::read(format!("{ASSETS}/models/efficientnet_lite0_fp32.onnx"))?;
    let labels: Vec<String> =
        std::fs::read_to_string(format!("{ASSETS}/models/imagenet_synsets.txt"))?.lines().map(str::to_string).collect();
    BundleBuilder::new("efficientnet_lite0", "1.0.0", Task::Classification)
        .preprocess(Preprocess::Image(ImagePreprocess::preset("tf", 224, 224)?))
        .postprocess(Postprocess::Classification { output: None, softmax: Softmax::Auto, top_k: 3, label_offset: 0 })
        .variant("fp32", model, Precision::Fp32, &[BackendKind::Cpu])?
        .labels(&labels)?
        .write(path, None)?;
    println!("packed {}", path.display());
    Ok(())
}

fn main() -> Result<()> {
    let mut images: Vec<String> = std::env::args().skip(1).collect();
    if images.is_empty() {
        images = ["skimage_chelsea.png", "skimage_coffee.png"].iter().map(|f| format!("{ASSETS}/photos/{f}")).collect();
    }
    let bundle = std::env::temp_dir().join("edgepack-example-efficientnet_lite0.edgepack");
    ensure_bundle(&bundle)?;
    let session = Session::open(&bundle, &SessionOptions::default())?;
    for path in &images {
        let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        let top = session.classify_images(&[&bytes], None)?;
        let best: Vec<String> = top[0]
            .iter()
            .map(|c| format!("{} ({:.1} %)", c.label.as_deref().unwrap_or("?"), c.score * 100.0))
            .collect();
        println!("{path}: {}", best.join("; "));
    }
    Ok(())
}
