//! YOLO post-processing as data: the raw head output of an Ultralytics export (v5, v8, v11: detect, segment, pose)
//! decoded to boxes in image pixels, with NMS, instance masks and keypoints.
//!
//! Layout of the head output, per anchor: `cx, cy, w, h` (model-input pixels), `[objectness]` (v5), one score per
//! class, then the task's extra columns (segment: mask coefficients; pose: `x, y[, score]` per keypoint). The anchor
//! axis is last (`[B, A, N]`, v8/v11) or the attributes are (`[B, N, A]`, v5 and transposed exports); the one
//! whose length is the attribute count is taken as the attribute axis (channels first when both are).
use edgepack_core::tensor::Tensor;
use edgepack_core::{Error, Result};

use super::{Detection, InputMap, nms_order};

/// What the head predicts beyond boxes and class scores.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum YoloTask {
    /// Boxes and classes.
    #[default]
    Detect,
    /// Instance masks: `mask_coefficients` columns per anchor, times the prototypes `[B, M, mh, mw]` of
    /// `protos_output` (default: the second output), through a sigmoid, cropped to the box.
    Segment {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        protos_output: Option<String>,
        #[serde(default = "default_mask_coefficients")]
        mask_coefficients: usize,
    },
    /// Keypoints: `keypoints` × `keypoint_dims` columns per anchor (`x, y` and, with 3 dims, a visibility score,
    /// sigmoid already applied as Ultralytics exports it).
    Pose {
        keypoints: usize,
        #[serde(default = "default_keypoint_dims")]
        keypoint_dims: usize,
    },
}

fn default_mask_coefficients() -> usize {
    32
}
fn default_keypoint_dims() -> usize {
    3
}

impl YoloTask {
    /// Columns per anchor after the class scores.
    pub fn extra(&self) -> usize {
        match self {
            YoloTask::Detect => 0,
            YoloTask::Segment { mask_coefficients, .. } => *mask_coefficients,
            YoloTask::Pose { keypoints, keypoint_dims } => keypoints * keypoint_dims,
        }
    }
}

/// A binary instance mask in image pixels over its detection's box: `rle` counts runs of the box's pixels in
/// row-major order, alternately off and on, starting with off (a leading 0 when the first pixel is on).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Mask {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub rle: Vec<u32>,
}

impl Mask {
    /// The mask as `height` rows of `width` booleans.
    pub fn decode(&self) -> Vec<bool> {
        let mut out = Vec::with_capacity((self.width * self.height) as usize);
        for (i, &n) in self.rle.iter().enumerate() {
            out.extend(std::iter::repeat_n(i % 2 == 1, n as usize));
        }
        out
    }

    /// Pixels that are on.
    pub fn area(&self) -> u64 {
        self.rle.iter().skip(1).step_by(2).map(|&n| n as u64).sum()
    }
}

/// One keypoint in image pixels.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Keypoint {
    pub x: f32,
    pub y: f32,
    /// Visibility score (0..1) when the model predicts one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
}

/// The decoding parameters (the fields of [`super::Postprocess::Yolo`]).
#[derive(Debug, Clone, PartialEq)]
pub struct YoloSpec {
    pub classes: usize,
    pub objectness: bool,
    pub task: YoloTask,
    pub score_threshold: f32,
    pub iou_threshold: f32,
    pub class_agnostic: bool,
    pub max_detections: usize,
}

impl YoloSpec {
    /// Values per anchor.
    pub fn attributes(&self) -> usize {
        4 + usize::from(self.objectness) + self.classes + self.task.extra()
    }

    /// Anchors of a head output of this shape (batch first), and whether attributes come first.
    pub fn layout(&self, shape: &[usize]) -> Result<(usize, bool)> {
        let a = self.attributes();
        match shape {
            [_, d1, d2] if *d1 == a => Ok((*d2, true)),
            [_, d1, d2] if *d2 == a => Ok((*d1, false)),
            _ => Err(Error::Processing(format!(
                "a YOLO head of {} classes{}{} has {a} values per anchor: its output must be [B, {a}, N] or \
                 [B, N, {a}], got {shape:?}",
                self.classes,
                if self.objectness { " with objectness" } else { "" },
                match &self.task {
                    YoloTask::Detect => String::new(),
                    t => format!(" and {} task columns", t.extra()),
                }
            ))),
        }
    }
}

/// Decodes batch row `row` of a YOLO head `output` (and the segment prototypes `protos`, same batch) into
/// detections in image pixels. `map` takes model-input pixels to the image's, `image_size` (width, height) clips
/// the boxes, `input_size` (width, height) is the model input the boxes are measured in (for the prototypes' grid).
#[allow(clippy::too_many_arguments)]
pub fn decode(
    spec: &YoloSpec,
    output: &Tensor,
    protos: Option<&Tensor>,
    row: usize,
    map: &InputMap,
    image_size: (u32, u32),
    input_size: (u32, u32),
    labels: Option<&[String]>,
) -> Result<Vec<Detection>> {
    let (n, attrs_first) = spec.layout(output.shape())?;
    let a = spec.attributes();
    let batch = output.shape()[0];
    if row >= batch {
        return Err(Error::Processing(format!("batch row {row} of a head output of {batch}")));
    }
    if !(0.0..=1.0).contains(&spec.iou_threshold) || !spec.score_threshold.is_finite() {
        return Err(Error::Processing("YOLO thresholds out of range".into()));
    }
    let all = super::f32_data(output);
    let data = &all[row * a * n..(row + 1) * a * n];
    let at = |i: usize, k: usize| if attrs_first { data[k * n + i] } else { data[i * a + k] };
    let cls0 = 4 + usize::from(spec.objectness);
    let extra0 = cls0 + spec.classes;
    // Candidates: the best class of each anchor over the threshold (Ultralytics' single-label NMS).
    let mut cands: Vec<(Detection, usize)> = Vec::new();
    for i in 0..n {
        let obj = if spec.objectness { at(i, 4) } else { 1.0 };
        let (mut best, mut score) = (0usize, f32::NEG_INFINITY);
        for c in 0..spec.classes {
            let s = at(i, cls0 + c) * obj;
            if s > score {
                (best, score) = (c, s);
            }
        }
        if spec.classes == 0 {
            score = obj;
        }
        if score.is_nan() || score <= spec.score_threshold {
            continue;
        }
        let (cx, cy, w, h) = (at(i, 0), at(i, 1), at(i, 2), at(i, 3));
        cands.push((
            Detection {
                class_index: best,
                label: labels.and_then(|l| l.get(best)).cloned(),
                score,
                x1: cx - w / 2.0,
                y1: cy - h / 2.0,
                x2: cx + w / 2.0,
                y2: cy + h / 2.0,
                mask: None,
                keypoints: None,
            },
            i,
        ));
    }
    // Ultralytics keeps at most 30 000 candidates by score before NMS.
    cands.sort_by(|x, y| y.0.score.total_cmp(&x.0.score));
    cands.truncate(30_000);
    let dets: Vec<Detection> = cands.iter().map(|(d, _)| d.clone()).collect();
    let kept = nms_order(&dets, spec.iou_threshold, spec.max_detections, spec.class_agnostic);
    let (iw, ih) = (image_size.0 as f32, image_size.1 as f32);
    let protos = match (&spec.task, protos) {
        (YoloTask::Segment { mask_coefficients, .. }, Some(p)) => Some(Protos::new(p, row, *mask_coefficients)?),
        (YoloTask::Segment { .. }, None) => {
            return Err(Error::Processing("a YOLO segment head needs its prototypes output".into()));
        }
        _ => None,
    };
    let mut out = Vec::with_capacity(kept.len());
    for idx in kept {
        let (d, anchor) = &cands[idx];
        let (x1, y1) = map.to_image(d.x1, d.y1);
        let (x2, y2) = map.to_image(d.x2, d.y2);
        let mut det = Detection {
            x1: x1.clamp(0.0, iw),
            y1: y1.clamp(0.0, ih),
            x2: x2.clamp(0.0, iw),
            y2: y2.clamp(0.0, ih),
            ..d.clone()
        };
        match &spec.task {
            YoloTask::Detect => {}
            YoloTask::Segment { .. } => {
                let coeffs: Vec<f32> = (0..spec.task.extra()).map(|m| at(*anchor, extra0 + m)).collect();
                if let Some(p) = &protos {
                    det.mask = Some(p.mask(&coeffs, &det, map, input_size));
                }
            }
            YoloTask::Pose { keypoints, keypoint_dims } => {
                let kd = *keypoint_dims;
                det.keypoints = Some(
                    (0..*keypoints)
                        .map(|j| {
                            let base = extra0 + j * kd;
                            let (x, y) = map.to_image(at(*anchor, base), at(*anchor, base + 1));
                            Keypoint { x, y, score: (kd >= 3).then(|| at(*anchor, base + 2)) }
                        })
                        .collect(),
                );
            }
        }
        out.push(det);
    }
    Ok(out)
}

/// Segment prototypes of one batch row: `[M, mh, mw]`.
struct Protos {
    v: Vec<f32>,
    m: usize,
    mh: usize,
    mw: usize,
}

impl Protos {
    fn new(t: &Tensor, row: usize, m: usize) -> Result<Protos> {
        let s = t.shape();
        if s.len() != 4 || s[1] != m || row >= s[0] || s[2] == 0 || s[3] == 0 {
            return Err(Error::Processing(format!(
                "YOLO prototypes must be [B, {m}, mh, mw] with a row {row}, got {s:?}"
            )));
        }
        let per = m * s[2] * s[3];
        let all = super::f32_data(t);
        Ok(Protos { v: all[row * per..(row + 1) * per].to_vec(), m, mh: s[2], mw: s[3] })
    }

    /// The mask of one detection in image pixels: the logit map Σ coeff·proto sampled bilinearly (edges clamped)
    /// at each pixel centre of the box, on where it is positive (sigmoid > 0.5).
    fn mask(&self, coeffs: &[f32], d: &Detection, map: &InputMap, input_size: (u32, u32)) -> Mask {
        let plane = self.mh * self.mw;
        let mut logit = vec![0f32; plane];
        for (c, &k) in coeffs.iter().enumerate().take(self.m) {
            for (o, &p) in logit.iter_mut().zip(&self.v[c * plane..(c + 1) * plane]) {
                *o += k * p;
            }
        }
        let (x0, y0) = (d.x1.floor().max(0.0) as u32, d.y1.floor().max(0.0) as u32);
        let (x1, y1) = (d.x2.ceil().max(0.0) as u32, d.y2.ceil().max(0.0) as u32);
        let (w, h) = (x1.saturating_sub(x0), y1.saturating_sub(y0));
        let (gx, gy) = (self.mw as f32 / input_size.0.max(1) as f32, self.mh as f32 / input_size.1.max(1) as f32);
        let sample = |u: f32, v: f32| -> f32 {
            let (pu, pv) =
                ((u * gx - 0.5).clamp(0.0, (self.mw - 1) as f32), (v * gy - 0.5).clamp(0.0, (self.mh - 1) as f32));
            let (u0, v0) = (pu.floor() as usize, pv.floor() as usize);
            let (u1, v1) = ((u0 + 1).min(self.mw - 1), (v0 + 1).min(self.mh - 1));
            let (fu, fv) = (pu - u0 as f32, pv - v0 as f32);
            let g = |x: usize, y: usize| logit[y * self.mw + x];
            (g(u0, v0) * (1.0 - fu) + g(u1, v0) * fu) * (1.0 - fv) + (g(u0, v1) * (1.0 - fu) + g(u1, v1) * fu) * fv
        };
        let mut rle = Vec::new();
        let (mut on, mut run) = (false, 0u32);
        for y in y0..y1 {
            for x in x0..x1 {
                let (cx, cy) = (x as f32 + 0.5, y as f32 + 0.5);
                let inside = cx >= d.x1 && cx <= d.x2 && cy >= d.y1 && cy <= d.y2;
                let (u, v) = map.to_model(cx, cy);
                let px = inside && sample(u, v) > 0.0;
                if px != on {
                    rle.push(run);
                    (on, run) = (px, 0);
                }
                run += 1;
            }
        }
        rle.push(run);
        Mask { x: x0, y: y0, width: w, height: h, rle }
    }
}
