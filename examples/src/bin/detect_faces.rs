//! Offline face detector: packs the shipped UltraFace RFB-320 (MIT) with its pre/post-processing, detects faces
//! in a photo and writes a PNG with the boxes drawn.
//!
//!     cargo run --release -p edgepack-examples --bin detect_faces -- assets/photos/skimage_astronaut.png faces.png
use anyhow::{Context, Result};
use edgepack_packager::BundleBuilder;
use edgepack_runtime::bundle::{BackendKind, Precision, Task};
use edgepack_runtime::process::{ImagePreprocess, Postprocess, Preprocess};
use edgepack_runtime::{Session, SessionOptions};
use image::{Rgb, RgbImage};

const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets");

fn draw_box(img: &mut RgbImage, x1: f32, y1: f32, x2: f32, y2: f32, thickness: i64) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let clamp = |v: f32, hi: i64| (v.round() as i64).clamp(0, hi - 1);
    let (x1, x2, y1, y2) = (clamp(x1, w), clamp(x2, w), clamp(y1, h), clamp(y2, h));
    let color = Rgb([0, 255, 0]);
    for t in 0..thickness {
        for x in x1..=x2 {
            for y in [y1 + t, y2 - t] {
                if (0..h).contains(&y) {
                    img.put_pixel(x as u32, y as u32, color);
                }
            }
        }
        for y in y1..=y2 {
            for x in [x1 + t, x2 - t] {
                if (0..w).contains(&x) {
                    img.put_pixel(x as u32, y as u32, color);
                }
            }
        }
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let input = args.first().cloned().unwrap_or_else(|| format!("{ASSETS}/photos/skimage_astronaut.png"));
    let output = args.get(1).cloned().unwrap_or_else(|| "faces.png".into());

    let model = std::fs::read(format!("{ASSETS}/models/ultraface_rfb_320.onnx"))?;
    let bundle = std::env::temp_dir().join("edgepack-example-ultraface.edgepack");
    BundleBuilder::new("ultraface_rfb_320", "1.0.0", Task::Detection)
        .metadata("license", "MIT")
        .preprocess(Preprocess::Image(ImagePreprocess::preset("ultraface", 240, 320)?))
        .postprocess(Postprocess::SsdDetection {
            scores_output: "scores".into(),
            boxes_output: "boxes".into(),
            classes: vec![1],
            score_threshold: 0.7,
            iou_threshold: 0.3,
            max_detections: 1000,
        })
        .variant("fp32", model, Precision::Fp32, &[BackendKind::Cpu])?
        .labels(&["background".into(), "face".into()])?
        .write(&bundle, None)?;

    let session = Session::open(&bundle, &SessionOptions::default())?;
    let bytes = std::fs::read(&input).with_context(|| format!("reading {input}"))?;
    let faces = session.detect_image(&bytes)?;
    let mut img = edgepack_runtime::process::decode_image(&bytes)?.to_rgb8();
    let thickness = (img.width().max(img.height()) / 300).max(2) as i64;
    for f in &faces {
        draw_box(&mut img, f.x1, f.y1, f.x2, f.y2, thickness);
        println!("face {:.3} at [{:.0}, {:.0}, {:.0}, {:.0}]", f.score, f.x1, f.y1, f.x2, f.y2);
    }
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    edgepack_runtime::fsutil::write_atomic(std::path::Path::new(&output), &png)?;
    println!("{} face(s) in {input}; boxes drawn in {output}", faces.len());
    Ok(())
}
