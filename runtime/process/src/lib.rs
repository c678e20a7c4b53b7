//! Pre- and post-processing described as data (stored in the bundle manifest), never as code: decode, resize,
//! channel order, layout, normalisation; softmax/top-k with labels; SSD-style boxes + NMS.
//!
//! The image path reproduces the reference pipeline of `shared/tools/eval_imagenet_ort.py` (PIL): decode,
//! convert to RGB (grayscale replicated, alpha dropped), resize with PIL's own convolution resampler (same
//! coefficients, same 22-bit fixed point, same rounding: see [`resize`]), centre crop, then
//! `(pixel * scale - mean) / std`.

mod stream;
mod yolo;
pub use stream::{StateLink, StreamSpec, read_wav};
pub use yolo::{Keypoint, Mask, YoloSpec, YoloTask, decode as decode_yolo};

use image::DynamicImage;

use edgepack_core::tensor::{DType, Tensor, TensorData};
use edgepack_core::{Error, Result};

/// Channel order fed to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ColorOrder {
    Rgb,
    Bgr,
    /// One channel, ITU-R 601-2 luma (as PIL's `convert("L")`).
    Gray,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Nchw,
    Nhwc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Nearest,
    #[default]
    Bilinear,
    Bicubic,
}

/// How the decoded image is brought to the model's input size.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Resize {
    /// The image must already have the model's size.
    None,
    /// Resize to exactly `width`×`height`, ignoring the aspect ratio.
    Stretch { width: u32, height: u32 },
    /// Resize so the shorter side is `shorter_side` (aspect kept, never below the crop), then centre-crop.
    ShorterSideCrop { shorter_side: u32, crop_width: u32, crop_height: u32 },
    /// Resize to fit inside `width`×`height` keeping the aspect ratio (scale `r = min(width/w, height/h)`, size
    /// `round(w·r)`×`round(h·r)`), then pad to the full size with `pad` (Ultralytics' letterbox: 114), the image
    /// centred (`round(pad/2 − 0.1)` before it, as Ultralytics rounds) or at the top left.
    Letterbox {
        width: u32,
        height: u32,
        #[serde(default = "default_pad")]
        pad: u8,
        #[serde(default)]
        anchor: LetterboxAnchor,
    },
}

fn default_pad() -> u8 {
    114
}

/// Where a letterboxed image sits in its padded frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LetterboxAnchor {
    #[default]
    Center,
    TopLeft,
}

/// Where a letterboxed image of `w`×`h` lands in a `width`×`height` frame: (scale, resized width, resized height,
/// left, top).
pub fn letterbox_geometry(
    w: u32,
    h: u32,
    width: u32,
    height: u32,
    anchor: LetterboxAnchor,
) -> (f64, u32, u32, u32, u32) {
    let r = (width as f64 / w.max(1) as f64).min(height as f64 / h.max(1) as f64);
    let nw = ((w as f64 * r).round_ties_even() as u32).clamp(1, width);
    let nh = ((h as f64 * r).round_ties_even() as u32).clamp(1, height);
    match anchor {
        LetterboxAnchor::TopLeft => (r, nw, nh, 0, 0),
        LetterboxAnchor::Center => {
            let half = |free: u32| ((free as f64 / 2.0 - 0.1).round_ties_even().max(0.0)) as u32;
            (r, nw, nh, half(width - nw), half(height - nh))
        }
    }
}

/// How model-input pixels relate to the original image's: `model = image · k + o` per axis (the resize and the
/// crop or padding of the pre-processing), and back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputMap {
    pub kx: f32,
    pub ky: f32,
    pub ox: f32,
    pub oy: f32,
}

impl InputMap {
    /// The identity: the model sees the image's own pixels.
    pub const IDENTITY: InputMap = InputMap { kx: 1.0, ky: 1.0, ox: 0.0, oy: 0.0 };

    /// A model-input point in image pixels.
    pub fn to_image(&self, x: f32, y: f32) -> (f32, f32) {
        ((x - self.ox) / self.kx, (y - self.oy) / self.ky)
    }

    /// An image point in model-input pixels.
    pub fn to_model(&self, x: f32, y: f32) -> (f32, f32) {
        (x * self.kx + self.ox, y * self.ky + self.oy)
    }
}

/// Image pre-processing for one model input.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct ImagePreprocess {
    /// Model input fed by this step (default: the first input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    pub resize: Resize,
    #[serde(default)]
    pub interpolation: Interpolation,
    pub color: ColorOrder,
    pub layout: Layout,
    /// Multiplies 0..255 pixel values first (1/255 for 0..1 models, 1 for raw pixels).
    pub scale: f32,
    /// Per output channel (in `color` order), subtracted after `scale`.
    pub mean: Vec<f32>,
    /// Per output channel, divides after the mean.
    pub std: Vec<f32>,
    /// Element type of the model input (f32, or u8 for raw-pixel models).
    #[serde(default = "default_dtype")]
    pub dtype: DType,
}

fn default_dtype() -> DType {
    DType::F32
}

/// Pre-processing stored in a bundle.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Preprocess {
    Image(ImagePreprocess),
}

/// Whether classification scores go through a softmax.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Softmax {
    /// Softmax unless the output already sums to 1 with no negative value.
    #[default]
    Auto,
    Always,
    Never,
}

/// Post-processing stored in a bundle.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Postprocess {
    /// Scores per class → top-k (with labels).
    Classification {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<String>,
        #[serde(default)]
        softmax: Softmax,
        top_k: usize,
        /// Classes to skip at the front of the scores (1 for models with a background class 0).
        #[serde(default)]
        label_offset: usize,
    },
    /// SSD-style detector with decoded boxes: scores [1,N,C] and boxes [1,N,4] (x1,y1,x2,y2 in 0..1).
    SsdDetection {
        scores_output: String,
        boxes_output: String,
        /// Classes reported (e.g. [1] for a face detector whose class 0 is background).
        classes: Vec<usize>,
        score_threshold: f32,
        iou_threshold: f32,
        #[serde(default = "default_max_detections")]
        max_detections: usize,
    },
    /// Ultralytics YOLO head (v5/v8/v11; detect, segment or pose): `[B, 4+classes(+extra), N]` or transposed,
    /// boxes `cx, cy, w, h` in model-input pixels, mapped back through the pre-processing (letterbox) to the image.
    Yolo {
        /// The head output (default: the first output).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<String>,
        classes: usize,
        /// A v5-style objectness column after the box (scores = objectness × class score).
        #[serde(default)]
        objectness: bool,
        #[serde(default)]
        task: YoloTask,
        #[serde(default = "default_yolo_score")]
        score_threshold: f32,
        #[serde(default = "default_yolo_iou")]
        iou_threshold: f32,
        /// NMS across classes (one box per place whatever its class) instead of per class.
        #[serde(default)]
        class_agnostic: bool,
        #[serde(default = "default_yolo_max")]
        max_detections: usize,
    },
}

fn default_yolo_score() -> f32 {
    0.25
}
fn default_yolo_iou() -> f32 {
    0.45
}
fn default_yolo_max() -> usize {
    300
}

impl Postprocess {
    /// What it does, for messages: "classification", "SSD detection".
    pub fn kind(&self) -> &'static str {
        match self {
            Postprocess::Classification { .. } => "classification",
            Postprocess::SsdDetection { .. } => "SSD detection",
            Postprocess::Yolo { task: YoloTask::Detect, .. } => "YOLO detection",
            Postprocess::Yolo { task: YoloTask::Segment { .. }, .. } => "YOLO segmentation",
            Postprocess::Yolo { task: YoloTask::Pose { .. }, .. } => "YOLO pose",
        }
    }
}

impl Postprocess {
    /// Whether it produces detections (boxes), as SSD and YOLO heads do.
    pub fn is_detection(&self) -> bool {
        matches!(self, Postprocess::SsdDetection { .. } | Postprocess::Yolo { .. })
    }

    /// The YOLO decoding parameters, for a YOLO head.
    pub fn yolo_spec(&self) -> Option<YoloSpec> {
        match self {
            Postprocess::Yolo {
                classes,
                objectness,
                task,
                score_threshold,
                iou_threshold,
                class_agnostic,
                max_detections,
                ..
            } => Some(YoloSpec {
                classes: *classes,
                objectness: *objectness,
                task: task.clone(),
                score_threshold: *score_threshold,
                iou_threshold: *iou_threshold,
                class_agnostic: *class_agnostic,
                max_detections: *max_detections,
            }),
            _ => None,
        }
    }
}

fn default_max_detections() -> usize {
    1000
}

/// Named pre-processing recipes matching `shared/models/MODELS.md`.
pub const PRESETS: &[&str] = &["tf", "caffe_bgr", "imagenet", "raw255", "mnist", "ultraface", "yolo"];

impl ImagePreprocess {
    /// A named preset for a model whose image input is `height`×`width`.
    pub fn preset(name: &str, height: u32, width: u32) -> Result<ImagePreprocess> {
        let crop = |mean: [f32; 3], std: [f32; 3], scale: f32, color: ColorOrder| ImagePreprocess {
            input: None,
            resize: Resize::ShorterSideCrop {
                // The usual 256/224 ratio (256 for a 224 crop).
                shorter_side: ((height.min(width) as f64) * 256.0 / 224.0).round() as u32,
                crop_width: width,
                crop_height: height,
            },
            interpolation: Interpolation::Bilinear,
            color,
            layout: Layout::Nchw,
            scale,
            mean: mean.to_vec(),
            std: std.to_vec(),
            dtype: DType::F32,
        };
        Ok(match name {
            "tf" => crop([127.0; 3], [128.0; 3], 1.0, ColorOrder::Rgb),
            "caffe_bgr" => crop([104.0, 117.0, 123.0], [1.0; 3], 1.0, ColorOrder::Bgr),
            "imagenet" => crop([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 1.0 / 255.0, ColorOrder::Rgb),
            "raw255" => crop([0.0; 3], [1.0; 3], 1.0, ColorOrder::Rgb),
            "mnist" => ImagePreprocess {
                input: None,
                resize: Resize::Stretch { width, height },
                interpolation: Interpolation::Bilinear,
                color: ColorOrder::Gray,
                layout: Layout::Nchw,
                scale: 1.0,
                mean: vec![0.0],
                std: vec![1.0],
                dtype: DType::F32,
            },
            // Ultralytics YOLO: letterbox (pad 114, centred), RGB, 0..1.
            "yolo" => ImagePreprocess {
                input: None,
                resize: Resize::Letterbox { width, height, pad: default_pad(), anchor: LetterboxAnchor::Center },
                interpolation: Interpolation::Bilinear,
                color: ColorOrder::Rgb,
                layout: Layout::Nchw,
                scale: 1.0 / 255.0,
                mean: vec![0.0; 3],
                std: vec![1.0; 3],
                dtype: DType::F32,
            },
            "ultraface" => ImagePreprocess {
                input: None,
                resize: Resize::Stretch { width, height },
                interpolation: Interpolation::Bilinear,
                color: ColorOrder::Rgb,
                layout: Layout::Nchw,
                scale: 1.0,
                mean: vec![127.0; 3],
                std: vec![128.0; 3],
                dtype: DType::F32,
            },
            other => {
                return Err(Error::Processing(format!("unknown preset `{other}` (known: {})", PRESETS.join(", "))));
            }
        })
    }

    pub fn channels(&self) -> usize {
        if self.color == ColorOrder::Gray { 1 } else { 3 }
    }

    /// Checks the numbers are usable (channel counts, non-zero std, sane sizes).
    pub fn validate(&self) -> Result<()> {
        let c = self.channels();
        if self.mean.len() != c || self.std.len() != c {
            return Err(Error::Processing(format!("mean/std need {c} values for {:?}", self.color)));
        }
        if self.std.iter().any(|&s| s == 0.0 || !s.is_finite()) || self.mean.iter().any(|m| !m.is_finite()) {
            return Err(Error::Processing("std must be finite and non-zero".into()));
        }
        let dims_ok = |a: u32, b: u32| (1..=16384).contains(&a) && (1..=16384).contains(&b);
        match self.resize {
            Resize::None => {}
            Resize::Stretch { width, height } if dims_ok(width, height) => {}
            Resize::ShorterSideCrop { shorter_side, crop_width, crop_height }
                if dims_ok(crop_width, crop_height) && (1..=16384).contains(&shorter_side) => {}
            Resize::Letterbox { width, height, .. } if dims_ok(width, height) => {}
            _ => return Err(Error::Processing(format!("invalid resize {:?}", self.resize))),
        }
        Ok(())
    }

    /// Decodes an encoded image (JPEG/PNG) and runs the pipeline; result has batch 1.
    pub fn apply_encoded(&self, bytes: &[u8]) -> Result<Tensor> {
        self.apply(&decode_image(bytes)?)
    }

    /// Runs the pipeline on a decoded image; result has batch 1.
    pub fn apply(&self, img: &DynamicImage) -> Result<Tensor> {
        self.validate()?;
        let c = self.channels();
        let (w, h, pixels) = if c == 1 {
            (img.width(), img.height(), to_gray(img))
        } else {
            (img.width(), img.height(), img.to_rgb8().into_raw())
        };
        let (w, h, pixels) = self.resize_pixels(w, h, pixels, c)?;
        let n = (w * h) as usize;
        let mut out = vec![0f32; n * c];
        for (p, px) in pixels.chunks_exact(c).enumerate() {
            for oc in 0..c {
                let src = if self.color == ColorOrder::Bgr { 2 - oc } else { oc };
                let v = (px[src] as f32 * self.scale - self.mean[oc]) / self.std[oc];
                let at = match self.layout {
                    Layout::Nchw => oc * n + p,
                    Layout::Nhwc => p * c + oc,
                };
                out[at] = v;
            }
        }
        let shape = match self.layout {
            Layout::Nchw => vec![1, c, h as usize, w as usize],
            Layout::Nhwc => vec![1, h as usize, w as usize, c],
        };
        let t = Tensor::from_f32(shape, out)?;
        Ok(if self.dtype == DType::F32 { t } else { t.cast(self.dtype) })
    }

    fn resize_pixels(&self, w: u32, h: u32, pixels: Vec<u8>, c: usize) -> Result<(u32, u32, Vec<u8>)> {
        match self.resize {
            Resize::None => Ok((w, h, pixels)),
            Resize::Stretch { width, height } => {
                Ok((width, height, resize(w, h, pixels, c, width, height, self.interpolation)?))
            }
            Resize::ShorterSideCrop { shorter_side, crop_width, crop_height } => {
                let r = shorter_side as f64 / w.min(h) as f64;
                // Python's round() is round-half-to-even; match it for identical sizes.
                let nw = ((w as f64 * r).round_ties_even() as u32).max(crop_width);
                let nh = ((h as f64 * r).round_ties_even() as u32).max(crop_height);
                let (left, top) = ((nw - crop_width) / 2, (nh - crop_height) / 2);
                let window = Window { left, top, width: crop_width, height: crop_height };
                Ok((crop_width, crop_height, resize_window(w, h, pixels, c, (nw, nh), window, self.interpolation)?))
            }
            Resize::Letterbox { width, height, pad, anchor } => {
                let (_, nw, nh, left, top) = letterbox_geometry(w, h, width, height, anchor);
                let resized = resize(w, h, pixels, c, nw, nh, self.interpolation)?;
                let mut out = vec![pad; (width * height) as usize * c];
                let row = nw as usize * c;
                for y in 0..nh as usize {
                    let at = ((y + top as usize) * width as usize + left as usize) * c;
                    out[at..at + row].copy_from_slice(&resized[y * row..(y + 1) * row]);
                }
                Ok((width, height, out))
            }
        }
    }

    /// The model input's (width, height) the pipeline produces from an image of `image_size`.
    pub fn input_size(&self, image_size: (u32, u32)) -> (u32, u32) {
        match self.resize {
            Resize::None => image_size,
            Resize::Stretch { width, height } | Resize::Letterbox { width, height, .. } => (width, height),
            Resize::ShorterSideCrop { crop_width, crop_height, .. } => (crop_width, crop_height),
        }
    }

    /// How this pipeline maps an image of `image_size` (width, height) into model-input pixels.
    pub fn input_map(&self, image_size: (u32, u32)) -> InputMap {
        let (w, h) = (image_size.0.max(1), image_size.1.max(1));
        match self.resize {
            Resize::None => InputMap::IDENTITY,
            Resize::Stretch { width, height } => {
                InputMap { kx: width as f32 / w as f32, ky: height as f32 / h as f32, ox: 0.0, oy: 0.0 }
            }
            Resize::ShorterSideCrop { shorter_side, crop_width, crop_height } => {
                let r = shorter_side as f64 / w.min(h) as f64;
                let nw = ((w as f64 * r).round_ties_even() as u32).max(crop_width);
                let nh = ((h as f64 * r).round_ties_even() as u32).max(crop_height);
                InputMap {
                    kx: nw as f32 / w as f32,
                    ky: nh as f32 / h as f32,
                    ox: -(((nw - crop_width) / 2) as f32),
                    oy: -(((nh - crop_height) / 2) as f32),
                }
            }
            Resize::Letterbox { width, height, anchor, .. } => {
                // Ultralytics maps boxes back with the scale r itself (not the rounded size's ratio).
                let (r, _, _, left, top) = letterbox_geometry(w, h, width, height, anchor);
                InputMap { kx: r as f32, ky: r as f32, ox: left as f32, oy: top as f32 }
            }
        }
    }
}

/// Decodes JPEG or PNG bytes.
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage> {
    let fmt = image::guess_format(bytes).map_err(|e| Error::Image(format!("unknown image format: {e}")))?;
    if !matches!(fmt, image::ImageFormat::Jpeg | image::ImageFormat::Png) {
        return Err(Error::Image(format!("{fmt:?} images are not supported (JPEG and PNG are)")));
    }
    if fmt == image::ImageFormat::Jpeg
        && let Some(img) = decode_jpeg_libjpeg_style(bytes)?
    {
        return Ok(img);
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), fmt);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(16384);
    limits.max_image_height = Some(16384);
    limits.max_alloc = Some(1 << 30);
    reader.limits(limits);
    reader.decode().map_err(|e| Error::Image(e.to_string()))
}

/// Decodes baseline/progressive RGB or grayscale JPEGs with `jpeg-decoder`, whose fancy upsampling and colour
/// conversion follow libjpeg (what PIL uses) far more closely than the `image` crate's default decoder (mean
/// pixel difference to PIL 0.10 vs 0.24 on the ImageNet sample). Returns `None` for other colour formats
/// (CMYK...), which the generic decoder handles.
fn decode_jpeg_libjpeg_style(bytes: &[u8]) -> Result<Option<DynamicImage>> {
    let mut d = jpeg_decoder::Decoder::new(bytes);
    d.read_info().map_err(|e| Error::Image(format!("jpeg: {e}")))?;
    let info = d.info().ok_or_else(|| Error::Image("jpeg: no header".into()))?;
    if info.width == 0 || info.height == 0 || info.width > 16384 || info.height > 16384 {
        return Err(Error::Image(format!("jpeg: unsupported size {}x{}", info.width, info.height)));
    }
    if !matches!(info.pixel_format, jpeg_decoder::PixelFormat::RGB24 | jpeg_decoder::PixelFormat::L8) {
        return Ok(None);
    }
    let px = d.decode().map_err(|e| Error::Image(format!("jpeg: {e}")))?;
    let (w, h) = (info.width as u32, info.height as u32);
    let img = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => image::RgbImage::from_raw(w, h, px).map(DynamicImage::ImageRgb8),
        _ => image::GrayImage::from_raw(w, h, px).map(DynamicImage::ImageLuma8),
    };
    img.map(Some).ok_or_else(|| Error::Image("jpeg: pixel data does not match the header".into()))
}

/// ITU-R 601-2 luma with PIL's fixed-point rounding.
fn to_gray(img: &DynamicImage) -> Vec<u8> {
    match img {
        DynamicImage::ImageLuma8(g) => g.as_raw().clone(),
        _ => img
            .to_rgb8()
            .pixels()
            .map(|p| ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8)
            .collect(),
    }
}

/// Fixed-point precision of PIL's 8-bit resampler (`PRECISION_BITS` in Pillow's Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn filter_weight(interp: Interpolation, x: f64) -> f64 {
    let x = x.abs();
    match interp {
        Interpolation::Bilinear => (1.0 - x).max(0.0),
        // Pillow's bicubic, a = -0.5.
        Interpolation::Bicubic => {
            let a = -0.5;
            if x < 1.0 {
                ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                (((x - 5.0) * x + 8.0) * x - 4.0) * a
            } else {
                0.0
            }
        }
        Interpolation::Nearest => unreachable!("nearest does not convolve"),
    }
}

/// Per output pixel: first input index and fixed-point weights (Pillow's `precompute_coeffs` followed by
/// `normalize_coeffs_8bpc`).
fn coefficients(in_size: u32, out_size: u32, interp: Interpolation) -> Vec<(usize, Vec<i32>)> {
    let support_of = if interp == Interpolation::Bicubic { 2.0 } else { 1.0 };
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support_of * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut w: Vec<f64> = (xmin..xmax).map(|x| filter_weight(interp, (x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            let one = (1u64 << PRECISION_BITS) as f64;
            let k = w.iter().map(|&v| if v < 0.0 { (-0.5 + v * one) as i32 } else { (0.5 + v * one) as i32 }).collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resizes interleaved 8-bit pixels exactly as Pillow's `Image.resize` does (two separable passes, horizontal
/// first, in 22-bit fixed point with its rounding), so a bundle's preprocessing reproduces PIL-based references
/// bit for bit. Nearest neighbour samples the source pixel under each output pixel centre.
fn resize(w: u32, h: u32, pixels: Vec<u8>, c: usize, nw: u32, nh: u32, interp: Interpolation) -> Result<Vec<u8>> {
    resize_window(w, h, pixels, c, (nw, nh), Window { left: 0, top: 0, width: nw, height: nh }, interp)
}

/// A rectangle of the resized image.
#[derive(Debug, Clone, Copy)]
struct Window {
    left: u32,
    top: u32,
    width: u32,
    height: u32,
}

/// [`resize`] to `size`, but only the pixels of `window` computed: each output pixel depends on its own row's and
/// column's filter taps alone, so the window equals the crop of the full resize bit for bit, at the cost of the
/// window rather than of the whole resized image (a 16384 × 17 image resized to a shorter side of 256 would be
/// 60 M pixels before its 224 × 224 crop).
fn resize_window(
    w: u32,
    h: u32,
    pixels: Vec<u8>,
    c: usize,
    size: (u32, u32),
    window: Window,
    interp: Interpolation,
) -> Result<Vec<u8>> {
    let (nw, nh) = size;
    if w == 0 || h == 0 || nw == 0 || nh == 0 || window.width == 0 || window.height == 0 {
        return Err(Error::Image("empty image".into()));
    }
    if window.left + window.width > nw || window.top + window.height > nh {
        return Err(Error::Processing(format!("{window:?} is outside the {nw}x{nh} image")));
    }
    let (w, h, nw, nh) = (w as usize, h as usize, nw as usize, nh as usize);
    let xs = window.left as usize..(window.left + window.width) as usize;
    let ys = window.top as usize..(window.top + window.height) as usize;
    let ww = xs.len();
    if (w, h) == (nw, nh) && (ww, ys.len()) == (w, h) {
        return Ok(pixels);
    }
    if interp == Interpolation::Nearest {
        let mut out = Vec::with_capacity(ww * ys.len() * c);
        for y in ys {
            let sy = (((y as f64 + 0.5) * h as f64 / nh as f64) as usize).min(h - 1);
            for x in xs.clone() {
                let sx = (((x as f64 + 0.5) * w as f64 / nw as f64) as usize).min(w - 1);
                out.extend_from_slice(&pixels[(sy * w + sx) * c..(sy * w + sx + 1) * c]);
            }
        }
        return Ok(out);
    }
    let half = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass (only when the width changes), over every source row, for the window's columns.
    let tmp = if nw != w {
        let coeffs = coefficients(w as u32, nw as u32, interp);
        let mut tmp = vec![0u8; ww * h * c];
        for y in 0..h {
            let row = &pixels[y * w * c..(y + 1) * w * c];
            for (x, (xmin, k)) in coeffs[xs.clone()].iter().enumerate() {
                for ch in 0..c {
                    let mut ss = half;
                    for (i, &kv) in k.iter().enumerate() {
                        ss += row[(xmin + i) * c + ch] as i64 * kv as i64;
                    }
                    tmp[(y * ww + x) * c + ch] = clip8(ss);
                }
            }
        }
        tmp
    } else if ww == w {
        pixels
    } else {
        pixels.chunks_exact(w * c).flat_map(|row| &row[xs.start * c..xs.end * c]).copied().collect()
    };
    let row = ww * c;
    if nh == h {
        return Ok(tmp[ys.start * row..ys.end * row].to_vec());
    }
    // Vertical pass, for the window's rows.
    let coeffs = coefficients(h as u32, nh as u32, interp);
    let mut out = vec![0u8; row * ys.len()];
    for (y, (ymin, k)) in coeffs[ys].iter().enumerate() {
        for x in 0..row {
            let mut ss = half;
            for (i, &kv) in k.iter().enumerate() {
                ss += tmp[(ymin + i) * row + x] as i64 * kv as i64;
            }
            out[y * row + x] = clip8(ss);
        }
    }
    Ok(out)
}

/// Concatenates batch-1 tensors of one dtype along axis 0.
pub fn stack(items: &[Tensor]) -> Result<Tensor> {
    let first = items.first().ok_or_else(|| Error::Processing("nothing to stack".into()))?;
    let inner = &first.shape()[1..];
    let mut shape = vec![0usize];
    shape.extend_from_slice(inner);
    let mut bytes = Vec::new();
    for t in items {
        if &t.shape()[1..] != inner || t.dtype() != first.dtype() {
            return Err(Error::Processing("cannot stack tensors of different shapes or dtypes".into()));
        }
        shape[0] += t.shape()[0];
        bytes.extend(t.to_le_bytes());
    }
    Tensor::from_le_bytes(first.dtype(), shape, &bytes)
}

/// `t` cut along its leading dim into consecutive pieces of `counts` rows, which must add up to that dim.
pub fn split_rows(t: &Tensor, counts: &[usize]) -> Result<Vec<Tensor>> {
    let total = *t.shape().first().ok_or_else(|| Error::Processing("a scalar cannot be split into a batch".into()))?;
    let want: usize = counts.iter().sum();
    if want != total {
        return Err(Error::Processing(format!("{total} rows, {want} expected")));
    }
    let row = t.len() / total.max(1) * t.dtype().size();
    let bytes = t.to_le_bytes();
    let mut start = 0;
    counts
        .iter()
        .map(|&n| {
            let mut shape = t.shape().to_vec();
            shape[0] = n;
            let piece = Tensor::from_le_bytes(t.dtype(), shape, &bytes[start * row..(start + n) * row]);
            start += n;
            piece
        })
        .collect()
}

/// One class of a classification result.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassScore {
    pub class_index: usize,
    pub label: Option<String>,
    pub score: f32,
}

/// One detected object, in pixels of the original image.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Detection {
    pub class_index: usize,
    pub label: Option<String>,
    pub score: f32,
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
    /// Instance mask (YOLO segment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<Mask>,
    /// Keypoints (YOLO pose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keypoints: Option<Vec<Keypoint>>,
}

/// The display part of a label line: ImageNet synset lines `n01440764 tench, Tinca tinca` lose the wnid.
pub fn display_label(line: &str) -> &str {
    let b = line.as_bytes();
    if b.len() > 10 && b[0] == b'n' && b[1..9].iter().all(u8::is_ascii_digit) && b[9] == b' ' {
        &line[10..]
    } else {
        line
    }
}

/// Softmax in f64 for stability; `auto` leaves already-normalised outputs alone.
pub fn softmax(scores: &[f32], mode: Softmax) -> Vec<f32> {
    let already =
        scores.iter().all(|&s| s >= 0.0) && (scores.iter().map(|&s| s as f64).sum::<f64>() - 1.0).abs() < 1e-3;
    if mode == Softmax::Never || (mode == Softmax::Auto && already) {
        return scores.to_vec();
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = scores.iter().map(|&s| (s as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

/// Indices of the `k` largest values, largest first (ties keep the lower index first).
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Classification of each batch row of `scores` (shape [B, C, ...1]).
pub fn classify(
    scores: &Tensor,
    softmax_mode: Softmax,
    k: usize,
    label_offset: usize,
    labels: Option<&[String]>,
) -> Result<Vec<Vec<ClassScore>>> {
    let batch = scores.shape().first().copied().unwrap_or(1).max(1);
    let all = scores.to_f32_vec();
    if !all.len().is_multiple_of(batch) || all.len() / batch <= label_offset {
        return Err(Error::Processing(format!("scores of shape {:?} cannot be classified", scores.shape())));
    }
    let per = all.len() / batch;
    Ok(all
        .chunks_exact(per)
        .map(|row| {
            let row = &row[label_offset..];
            let probs = softmax(row, softmax_mode);
            // Ranked by the raw scores: softmax keeps their order, but large logits (MNIST's reach ±8000) underflow
            // to probabilities of exactly 0, whose ties would rank classes 2..k by index.
            top_k(row, k)
                .into_iter()
                .map(|i| ClassScore {
                    class_index: i,
                    label: labels.and_then(|l| l.get(i)).map(|s| display_label(s).to_string()),
                    score: probs[i],
                })
                .collect()
        })
        .collect())
}

/// Intersection over union of two boxes.
pub fn iou(a: &Detection, b: &Detection) -> f32 {
    let iw = (a.x2.min(b.x2) - a.x1.max(b.x1)).max(0.0);
    let ih = (a.y2.min(b.y2) - a.y1.max(b.y1)).max(0.0);
    let inter = iw * ih;
    let area = |d: &Detection| (d.x2 - d.x1) * (d.y2 - d.y1);
    inter / (area(a) + area(b) - inter + 1e-9)
}

/// Hard non-maximum suppression (per class), highest score first.
pub fn nms(dets: Vec<Detection>, iou_threshold: f32, max: usize) -> Vec<Detection> {
    let keep = nms_order(&dets, iou_threshold, max, false);
    let mut dets: Vec<Option<Detection>> = dets.into_iter().map(Some).collect();
    keep.into_iter().filter_map(|i| dets[i].take()).collect()
}

/// Greedy non-maximum suppression: the indices of the kept detections, highest score first (ties keep the lower
/// index first). A detection is dropped when it overlaps a kept one by more than `iou_threshold` (of the same
/// class, or of any class when `class_agnostic`).
pub fn nms_order(dets: &[Detection], iou_threshold: f32, max: usize, class_agnostic: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..dets.len()).collect();
    order.sort_by(|&a, &b| dets[b].score.total_cmp(&dets[a].score).then(a.cmp(&b)));
    let mut keep: Vec<usize> = Vec::new();
    for i in order {
        if keep.len() >= max {
            break;
        }
        let d = &dets[i];
        if keep
            .iter()
            .all(|&k| (!class_agnostic && dets[k].class_index != d.class_index) || iou(&dets[k], d) <= iou_threshold)
        {
            keep.push(i);
        }
    }
    keep
}

/// SSD-style decoding for batch row 0: threshold, scale boxes to the image size, NMS.
#[allow(clippy::too_many_arguments)]
pub fn detect_ssd(
    scores: &Tensor,
    boxes: &Tensor,
    classes: &[usize],
    score_threshold: f32,
    iou_threshold: f32,
    max: usize,
    image_size: (u32, u32),
    labels: Option<&[String]>,
) -> Result<Vec<Detection>> {
    let (ss, bs) = (scores.shape(), boxes.shape());
    if ss.len() != 3 || bs.len() != 3 || bs[2] != 4 || ss[1] != bs[1] {
        return Err(Error::Processing(format!("SSD outputs must be [1,N,C] and [1,N,4], got {ss:?} and {bs:?}")));
    }
    let (n, c) = (ss[1], ss[2]);
    if let Some(&bad) = classes.iter().find(|&&k| k >= c) {
        return Err(Error::Processing(format!("class {bad} out of range for {c} score columns")));
    }
    let (s, b) = (scores.to_f32_vec(), boxes.to_f32_vec());
    let (w, h) = (image_size.0 as f32, image_size.1 as f32);
    let mut dets = Vec::new();
    for i in 0..n {
        for &k in classes {
            let score = s[i * c + k];
            if score > score_threshold {
                let bb = &b[i * 4..i * 4 + 4];
                dets.push(Detection {
                    class_index: k,
                    label: labels.and_then(|l| l.get(k)).cloned(),
                    score,
                    x1: bb[0] * w,
                    y1: bb[1] * h,
                    x2: bb[2] * w,
                    y2: bb[3] * h,
                    mask: None,
                    keypoints: None,
                });
            }
        }
    }
    Ok(nms(dets, iou_threshold, max))
}

/// The f32 values of a tensor, as a slice if already f32.
pub fn f32_data(t: &Tensor) -> std::borrow::Cow<'_, [f32]> {
    match t.data() {
        TensorData::F32(v) => std::borrow::Cow::Borrowed(v),
        _ => std::borrow::Cow::Owned(t.to_f32_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, RgbImage, RgbaImage};

    #[test]
    fn shorter_side_crop_gives_the_crop_size_and_python_rounding() {
        let p = ImagePreprocess::preset("tf", 224, 224).unwrap();
        assert_eq!(p.resize, Resize::ShorterSideCrop { shorter_side: 256, crop_width: 224, crop_height: 224 });
        for (w, h) in [(300u32, 200u32), (56, 80), (1000, 224), (224, 224)] {
            let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(w, h, image::Rgb([10, 20, 30])));
            let t = p.apply(&img).unwrap();
            assert_eq!(t.shape(), &[1, 3, 224, 224]);
            // Constant image: every value is (v - 127) / 128 of its channel.
            let v = t.as_f32().unwrap();
            assert!((v[0] - (10.0 - 127.0) / 128.0).abs() < 1e-6);
            assert!((v[224 * 224] - (20.0 - 127.0) / 128.0).abs() < 1e-6);
        }
    }

    #[test]
    fn a_resized_window_is_the_crop_of_the_full_resize_bit_for_bit() {
        // Pseudo-random pixels: a smooth image would hide a tap taken from the wrong row or column.
        let (w, h, c) = (37usize, 23usize, 3usize);
        let mut x = 12345u32;
        let pixels: Vec<u8> = (0..w * h * c)
            .map(|_| {
                x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                (x >> 24) as u8
            })
            .collect();
        for interp in [Interpolation::Bilinear, Interpolation::Bicubic, Interpolation::Nearest] {
            // Up, down, one side unchanged, both unchanged.
            for (nw, nh) in [(61u32, 50u32), (19, 11), (37, 40), (50, 23), (37, 23)] {
                let full = resize(w as u32, h as u32, pixels.clone(), c, nw, nh, interp).unwrap();
                for window in [
                    Window { left: 0, top: 0, width: nw, height: nh },
                    Window { left: 3, top: 2, width: nw - 5, height: nh - 4 },
                    Window { left: nw - 1, top: nh - 1, width: 1, height: 1 },
                ] {
                    let got = resize_window(w as u32, h as u32, pixels.clone(), c, (nw, nh), window, interp).unwrap();
                    let row = nw as usize * c;
                    let want: Vec<u8> = (window.top..window.top + window.height)
                        .flat_map(|y| {
                            let at = y as usize * row + window.left as usize * c;
                            full[at..at + window.width as usize * c].to_vec()
                        })
                        .collect();
                    assert_eq!(got, want, "{interp:?} to {nw}x{nh}, {window:?}");
                }
            }
        }
        let outside = Window { left: 2, top: 0, width: 60, height: 1 };
        assert!(resize_window(w as u32, h as u32, pixels, c, (61, 50), outside, Interpolation::Bilinear).is_err());
    }

    #[test]
    fn top_k_of_large_logits_follows_the_logits() {
        // Softmax of these underflows to [1, 0, 0, 0]: the ranking must still follow the logits.
        let t = Tensor::from_f32(vec![1, 4], vec![8000.0, -5.0, 100.0, 0.0]).unwrap();
        let r = classify(&t, Softmax::Auto, 4, 0, None).unwrap();
        let idx: Vec<usize> = r[0].iter().map(|c| c.class_index).collect();
        assert_eq!(idx, [0, 2, 3, 1]);
        assert_eq!(r[0][0].score, 1.0);
    }

    #[test]
    fn bgr_nhwc_gray_and_alpha() {
        let img = DynamicImage::ImageRgba8(RgbaImage::from_pixel(4, 4, image::Rgba([1, 2, 3, 0])));
        let mut p = ImagePreprocess::preset("caffe_bgr", 4, 4).unwrap();
        p.resize = Resize::None;
        p.layout = Layout::Nhwc;
        p.mean = vec![0.0; 3];
        let t = p.apply(&img).unwrap();
        assert_eq!(t.shape(), &[1, 4, 4, 3]);
        assert_eq!(&t.as_f32().unwrap()[..3], &[3.0, 2.0, 1.0]); // alpha dropped, channels reversed
        let g = DynamicImage::ImageLuma8(GrayImage::from_pixel(28, 28, image::Luma([200])));
        let m = ImagePreprocess::preset("mnist", 28, 28).unwrap();
        let t = m.apply(&g).unwrap();
        assert_eq!(t.shape(), &[1, 1, 28, 28]);
        assert!(t.as_f32().unwrap().iter().all(|&x| x == 200.0));
        // Grayscale into an RGB model is replicated on every channel.
        let t = ImagePreprocess::preset("raw255", 28, 28).unwrap().apply(&g).unwrap();
        assert_eq!(t.shape(), &[1, 3, 28, 28]);
        assert!(t.as_f32().unwrap().iter().all(|&x| x == 200.0));
    }

    #[test]
    fn bad_images_are_errors() {
        assert!(decode_image(b"not an image").is_err());
        assert!(decode_image(&[0x89, b'P', b'N', b'G', 13, 10, 26, 10, 0, 0]).is_err());
        let p = ImagePreprocess::preset("tf", 224, 224).unwrap();
        assert!(p.apply_encoded(&[0xff, 0xd8, 0xff, 0xe0, 0, 0]).is_err());
        let mut bad = p.clone();
        bad.std = vec![0.0; 3];
        assert!(bad.validate().is_err());
    }

    #[test]
    fn letterbox_pads_like_ultralytics_and_maps_back() {
        // 500×300 into 320×320: r = 0.64, 320×192, 64 rows of padding above (round(64 − 0.1)).
        assert_eq!(letterbox_geometry(500, 300, 320, 320, LetterboxAnchor::Center), (0.64, 320, 192, 0, 64));
        // An odd free space: round(d/2 − 0.1) puts the smaller half first.
        let (_, nw, _, left, _) = letterbox_geometry(301, 640, 640, 640, LetterboxAnchor::Center);
        assert_eq!((nw, left), (301, 169));
        assert_eq!(letterbox_geometry(500, 300, 320, 320, LetterboxAnchor::TopLeft).4, 0);
        let mut p = ImagePreprocess::preset("yolo", 320, 320).unwrap();
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(500, 300, image::Rgb([255, 0, 51])));
        let t = p.apply(&img).unwrap();
        assert_eq!(t.shape(), &[1, 3, 320, 320]);
        let v = t.as_f32().unwrap();
        let at = |c: usize, y: usize, x: usize| v[c * 320 * 320 + y * 320 + x];
        assert_eq!((at(0, 63, 10) * 255.0).round(), 114.0); // padding
        assert_eq!((at(0, 64, 10), at(1, 64, 10), (at(2, 64, 10) * 255.0).round()), (1.0, 0.0, 51.0));
        assert_eq!((at(0, 256, 10) * 255.0).round(), 114.0);
        // Model pixels back to the image: (x − left) / r.
        let m = p.input_map((500, 300));
        assert_eq!(m.to_image(160.0, 64.0), (250.0, 0.0));
        assert_eq!(m.to_model(250.0, 150.0), (160.0, 160.0));
        p.resize = Resize::Stretch { width: 100, height: 50 };
        assert_eq!(p.input_map((200, 200)).to_image(50.0, 50.0), (100.0, 200.0));
    }

    fn yolo(classes: usize, objectness: bool) -> YoloSpec {
        YoloSpec {
            classes,
            objectness,
            task: YoloTask::Detect,
            score_threshold: 0.25,
            iou_threshold: 0.45,
            class_agnostic: false,
            max_detections: 300,
        }
    }

    #[test]
    fn yolo_heads_in_both_layouts_with_and_without_objectness() {
        // Three anchors: a confident class-1 box, an overlapping class-1 duplicate, a box under the threshold.
        let anchors =
            [[50.0, 50.0, 20.0, 20.0, 0.1, 0.9], [52.0, 50.0, 20.0, 20.0, 0.1, 0.8], [10.0, 10.0, 4.0, 4.0, 0.2, 0.1]];
        let attrs_first: Vec<f32> = (0..6).flat_map(|k| anchors.iter().map(move |a| a[k])).collect();
        let first = Tensor::from_f32(vec![1, 6, 3], attrs_first).unwrap();
        let last = Tensor::from_f32(vec![1, 3, 6], anchors.iter().flatten().copied().collect()).unwrap();
        let map = InputMap { kx: 0.5, ky: 0.5, ox: 0.0, oy: 10.0 };
        for t in [&first, &last] {
            let d = decode_yolo(&yolo(2, false), t, None, 0, &map, (200, 200), (100, 100), None).unwrap();
            assert_eq!(d.len(), 1, "{d:?}");
            assert_eq!((d[0].class_index, d[0].score), (1, 0.9));
            assert_eq!((d[0].x1, d[0].y1, d[0].x2, d[0].y2), (80.0, 60.0, 120.0, 100.0));
        }
        // v5: column 4 is the objectness; scores are objectness × class score.
        let v5 = Tensor::from_f32(vec![1, 1, 7], vec![50.0, 50.0, 20.0, 20.0, 0.5, 0.2, 0.8]).unwrap();
        let d = decode_yolo(&yolo(2, true), &v5, None, 0, &InputMap::IDENTITY, (100, 100), (100, 100), None).unwrap();
        assert_eq!((d[0].class_index, d[0].score), (1, 0.4));
        // A head of another width is refused with the expected layout.
        let e = decode_yolo(&yolo(3, false), &first, None, 0, &map, (200, 200), (100, 100), None).unwrap_err();
        assert!(e.to_string().contains("7 values per anchor"), "{e}");
        let e = decode_yolo(&yolo(2, false), &first, None, 1, &map, (200, 200), (100, 100), None).unwrap_err();
        assert!(e.to_string().contains("batch row 1"), "{e}");
    }

    #[test]
    fn mask_runs_decode_row_major() {
        let m = Mask { x: 0, y: 0, width: 3, height: 2, rle: vec![0, 2, 3, 1] };
        assert_eq!(m.decode(), [true, true, false, false, false, true]);
        assert_eq!(m.area(), 3);
    }

    #[test]
    fn softmax_topk_and_nms() {
        let p = softmax(&[1.0, 2.0, 3.0], Softmax::Auto);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(softmax(&[0.2, 0.8], Softmax::Auto), vec![0.2, 0.8]);
        assert_eq!(top_k(&[0.1, 0.7, 0.2], 2), vec![1, 2]);
        let d = |s: f32, x: f32| Detection {
            class_index: 1,
            label: None,
            score: s,
            x1: x,
            y1: 0.0,
            x2: x + 10.0,
            y2: 10.0,
            mask: None,
            keypoints: None,
        };
        let kept = nms(vec![d(0.9, 0.0), d(0.8, 1.0), d(0.7, 50.0)], 0.3, 10);
        assert_eq!(kept.len(), 2);
        assert_eq!(display_label("n01440764 tench, Tinca tinca"), "tench, Tinca tinca");
        assert_eq!(display_label("cat"), "cat");
    }
}
