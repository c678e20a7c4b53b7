//! Fidelity of a quantized model against its fp32 original, measured with edgepack's own runtime on held-out
//! samples: output SQNR, top-1 agreement, top-1/top-5 accuracy when labels are known, per-layer SQNR, latency.
//!
//! The held-out inputs and the fp32 outputs are computed once and kept ([`HeldOut`]), so every candidate of the
//! mixed-precision search costs one pass of the candidate only. Memory is bounded by [`HeldOut::build`]'s cap.
use std::time::Instant;

use edgepack_runtime::process::{Detection, ImagePreprocess, InputMap};
use edgepack_runtime::{Session, Tensor};

use crate::calib::CalibError;
use crate::data::Dataset;

/// Signal-to-quantization-noise ratio in dB from accumulated Σref² and Σ(ref−q)²; `None` when exact, floored at
/// −200 dB (a zero signal with noise).
pub fn sqnr_db(signal: f64, noise: f64) -> Option<f64> {
    if noise <= 0.0 {
        return None;
    }
    Some((10.0 * (signal / noise).log10()).max(-200.0))
}

/// Cosine similarity from Σa², Σb², Σab (1 when both are zero or they are equal, 0 when one alone is zero).
fn cosine(aa: f64, bb: f64, ab: f64, diff: f64) -> f64 {
    if diff <= 0.0 {
        return 1.0;
    }
    if aa <= 0.0 || bb <= 0.0 {
        return 0.0;
    }
    (ab / (aa.sqrt() * bb.sqrt())).clamp(-1.0, 1.0)
}

/// A class distribution from a classifier output: the values themselves when they already are one (non-negative,
/// summing to 1), else their softmax.
fn class_distribution(v: &[f32]) -> Vec<f64> {
    let sum: f64 = v.iter().map(|&x| x as f64).sum();
    if v.iter().all(|&x| x >= 0.0) && (sum - 1.0).abs() < 1e-3 {
        return v.iter().map(|&x| x as f64 / sum).collect();
    }
    let m = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = v.iter().map(|&x| (x as f64 - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// KL(p‖q) of two classifier outputs' distributions, in nats (probabilities floored at 1e-12).
fn class_kl(reference: &[f32], got: &[f32]) -> f64 {
    let (p, q) = (class_distribution(reference), class_distribution(got));
    p.iter().zip(&q).filter(|(a, _)| **a > 0.0).map(|(a, b)| a * (a / b.max(1e-12)).ln()).sum()
}

/// Adds Σref² and Σ(ref−q)² of `reference` against `got` to `acc` (the two sums [`sqnr_db`] takes).
pub fn add_error(acc: &mut (f64, f64), reference: &[f32], got: &[f32]) {
    for (&x, &y) in reference.iter().zip(got) {
        acc.0 += (x as f64).powi(2);
        acc.1 += (x as f64 - y as f64).powi(2);
    }
}

/// Quality of one model on the held-out samples.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Metrics {
    pub samples: usize,
    /// Output SQNR against fp32 over all outputs and samples, dB (`null` = identical).
    pub output_sqnr_db: Option<f64>,
    /// % of samples whose arg-max equals fp32's (classification-shaped first output only).
    pub top1_agreement: Option<f64>,
    /// % top-1 / top-5 correct (labelled samples only).
    pub top1: Option<f64>,
    pub top5: Option<f64>,
    /// 95 % confidence intervals of the percentages above (Wilson score interval over `samples`).
    pub ci95: Intervals,
    /// Classifiers: the mean KL divergence of the class distribution from fp32's (nats; logits go through a
    /// softmax, probabilities are taken as they are). A smooth stand-in for agreement that a few samples resolve.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_kl: Option<f64>,
    /// Each output on its own (empty for the fp32 reference itself).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<OutputFidelity>,
    /// Detectors (a YOLO head): how many of fp32's detections the model finds again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detections: Option<DetectionMatch>,
}

/// A detector's detections against fp32's over the samples: each fp32 detection (highest score first) matched
/// to at most one detection of the same class with IoU ≥ [`DETECTION_IOU`].
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct DetectionMatch {
    pub fp32: usize,
    pub matched: usize,
    /// Detections with no fp32 counterpart.
    pub extra: usize,
}

impl DetectionMatch {
    /// % of the fp32 detections found again (100 when fp32 found none).
    pub fn pct(&self) -> f64 {
        if self.fp32 == 0 { 100.0 } else { 100.0 * self.matched as f64 / self.fp32 as f64 }
    }
}

/// IoU at which a detection counts as the same as fp32's.
pub const DETECTION_IOU: f32 = 0.5;

/// How the held-out samples score a detector: its head output and the YOLO decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Detector {
    /// The head output's name (default: the first output).
    pub output: Option<String>,
    pub spec: edgepack_runtime::process::YoloSpec,
}

/// Greedy one-to-one matching of `reference` (in its score order) to same-class detections of `got`.
pub fn match_detections(reference: &[Detection], got: &[Detection]) -> DetectionMatch {
    let mut used = vec![false; got.len()];
    let mut matched = 0;
    for r in reference {
        let best = got
            .iter()
            .enumerate()
            .filter(|(j, g)| !used[*j] && g.class_index == r.class_index)
            .map(|(j, g)| (edgepack_runtime::process::iou(r, g), j))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((iou, j)) = best
            && iou >= DETECTION_IOU
        {
            used[j] = true;
            matched += 1;
        }
    }
    DetectionMatch { fp32: reference.len(), matched, extra: got.len() - matched }
}

/// One model output against fp32, over all the samples.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct OutputFidelity {
    pub name: String,
    /// dB, `null` = identical.
    pub sqnr_db: Option<f64>,
    /// Cosine similarity of the output with fp32's, all samples' values as one vector.
    pub cosine: f64,
}

impl Metrics {
    /// The lowest SQNR of any output (`None`: every output identical).
    pub fn worst_output_sqnr_db(&self) -> Option<f64> {
        if self.outputs.is_empty() {
            return self.output_sqnr_db;
        }
        self.outputs.iter().filter_map(|o| o.sqnr_db).min_by(f64::total_cmp)
    }
}

/// 95 % confidence intervals, in %, of a [`Metrics`]' percentages: what the held-out sample size can tell apart.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Intervals {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<[f64; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1: Option<[f64; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top5: Option<[f64; 2]>,
}

/// The Wilson score interval (95 %) of a proportion of `pct` % observed over `n` samples, in %.
pub fn wilson95(pct: f64, n: usize) -> [f64; 2] {
    if n == 0 {
        return [0.0, 100.0];
    }
    let (p, n, z) = (pct / 100.0, n as f64, 1.959_964);
    let d = 1.0 + z * z / n;
    let center = (p + z * z / (2.0 * n)) / d;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / d;
    // At p = 0 or 1 the interval's end is the observation itself (exactly, not 1 − ε).
    let lo = if p <= 0.0 { 0.0 } else { (center - half).max(0.0) };
    let hi = if p >= 1.0 { 1.0 } else { (center + half).min(1.0) };
    [100.0 * lo, 100.0 * hi]
}

/// Limits beyond which a compressed model has collapsed rather than degraded: more than this many points of top-1
/// lost (labelled samples), top-1 agreement with fp32 below this %, or (models without classes) output SQNR below
/// this many dB.
pub const COLLAPSE_TOP1_DROP_PT: f64 = 5.0;
pub const COLLAPSE_AGREEMENT_PCT: f64 = 90.0;
pub const COLLAPSE_SQNR_DB: f64 = 10.0;

/// A warning when `got` has collapsed against `fp32` on the same held-out samples (see the limits above), naming
/// every figure that crossed its limit; `None` when it holds.
pub fn collapse(fp32: &Metrics, got: &Metrics) -> Option<String> {
    let mut why = Vec::new();
    if let (Some(a), Some(b)) = (fp32.top1, got.top1)
        && a - b > COLLAPSE_TOP1_DROP_PT
    {
        why.push(format!("top-1 {a:.1} % -> {b:.1} % (-{:.1} pt)", a - b));
    }
    if let Some(ag) = got.top1_agreement
        && ag < COLLAPSE_AGREEMENT_PCT
    {
        why.push(format!("top-1 agreement with fp32 {ag:.1} %"));
    }
    // SQNR speaks for models without classes; a classifier's logits may lose SQNR while its answers hold.
    if let Some(db) = got.output_sqnr_db
        && (db < COLLAPSE_SQNR_DB && got.top1_agreement.is_none() || !why.is_empty())
    {
        why.push(format!("output SQNR {db:.1} dB"));
    }
    (!why.is_empty()).then(|| {
        format!(
            "accuracy collapsed on {} held-out samples: {} (limits: {COLLAPSE_TOP1_DROP_PT} pt top-1 drop, \
             {COLLAPSE_AGREEMENT_PCT} % agreement, {COLLAPSE_SQNR_DB} dB); use a smaller amount or a --budget",
            got.samples,
            why.join(", ")
        )
    })
}

/// Held-out samples with their fp32 results.
pub struct HeldOut {
    pub ids: Vec<String>,
    /// Each sample's feeds (one tensor per model input).
    inputs: Vec<Vec<(String, Tensor)>>,
    labels: Vec<Option<usize>>,
    /// fp32 outputs, all outputs flattened and concatenated per sample.
    reference: Vec<Vec<f32>>,
    /// The outputs' names and, per sample, each output's shape (its length in `reference` is their product).
    output_names: Vec<String>,
    output_lens: Vec<Vec<usize>>,
    output_shapes: Vec<Vec<Vec<usize>>>,
    /// Detectors: the decoding, and fp32's detections per sample.
    detector: Option<(usize, Detector)>,
    fp32_detections: Vec<Vec<Detection>>,
    /// Median seconds of one fp32 run (what a pass over the samples costs, for planning).
    pub fp32_run_secs: f64,
    /// Number of classes when the first output is classification-shaped (see [`class_count`]), else `None`.
    classes: Option<usize>,
    pub fp32: Metrics,
}

/// A classification-shaped output: one dim of at least 2 classes, every other dim 1 (`[N, C]`, `[N, C, 1, 1]`).
fn class_count(shape: &[usize]) -> Option<usize> {
    let mut big = shape.iter().filter(|&&d| d != 1);
    match (big.next(), big.next()) {
        (Some(&c), None) if c >= 2 => Some(c),
        _ => None,
    }
}

fn flatten(outs: &[(String, Tensor)]) -> Vec<f32> {
    outs.iter().flat_map(|(_, t)| t.to_f32_vec()).collect()
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0
}

fn rank_of(v: &[f32], k: usize) -> usize {
    v.iter().filter(|&&x| x > v[k]).count()
}

impl HeldOut {
    /// Reads samples `range` of `data`, runs the fp32 session on them and keeps inputs and outputs. Stops early
    /// (keeping what it has) when inputs and outputs would exceed `max_bytes`.
    pub fn build(
        fp32: &Session,
        data: &Dataset,
        range: std::ops::Range<usize>,
        pre: Option<&ImagePreprocess>,
        max_bytes: usize,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<HeldOut, CalibError> {
        let mut feeds = crate::feeds::Feeds::of(fp32);
        let mut h = HeldOut {
            ids: vec![],
            inputs: vec![],
            labels: vec![],
            reference: vec![],
            output_names: vec![],
            output_lens: vec![],
            output_shapes: vec![],
            detector: None,
            fp32_detections: vec![],
            fp32_run_secs: 0.0,
            classes: None,
            fp32: Metrics::default(),
        };
        let total = range.len();
        let mut bytes = 0usize;
        let mut run_secs = Vec::new();
        for (done, k) in range.enumerate() {
            let s = data.get(k)?;
            let x = feeds.next(&s, pre)?;
            let t0 = Instant::now();
            let outs = fp32.run(x.clone())?;
            feeds.carry(&outs);
            run_secs.push(t0.elapsed().as_secs_f64());
            if done == 0 {
                h.classes = outs.first().and_then(|(_, t)| class_count(t.shape()));
                h.output_names = outs.iter().map(|(n, _)| n.clone()).collect();
            }
            let r = flatten(&outs);
            bytes += x.iter().map(|(_, t)| t.len() * t.dtype().size()).sum::<usize>() + r.len() * 4;
            if bytes > max_bytes && done > 0 {
                break;
            }
            h.ids.push(s.id);
            h.inputs.push(x);
            h.labels.push(s.label);
            h.reference.push(r);
            h.output_lens.push(outs.iter().map(|(_, t)| t.len()).collect());
            h.output_shapes.push(outs.iter().map(|(_, t)| t.shape().to_vec()).collect());
            progress(done + 1, total);
        }
        h.rescore_fp32();
        h.fp32_run_secs = median_ci95(run_secs).0;
        Ok(h)
    }

    fn rescore_fp32(&mut self) {
        self.fp32 = self.score(&self.reference);
        self.fp32.output_sqnr_db = None;
        self.fp32.class_kl = None;
        self.fp32.outputs.clear();
    }

    /// Splits off the samples from `at` on: `self` keeps the first `at` (the ones that choose), the other set the
    /// rest (the ones that judge), each with its own fp32 figures.
    pub fn split_off(&mut self, at: usize) -> HeldOut {
        let at = at.min(self.len());
        let mut rest = HeldOut {
            ids: self.ids.split_off(at),
            inputs: self.inputs.split_off(at),
            labels: self.labels.split_off(at),
            reference: self.reference.split_off(at),
            output_names: self.output_names.clone(),
            output_lens: self.output_lens.split_off(at),
            output_shapes: self.output_shapes.split_off(at),
            detector: self.detector.clone(),
            fp32_detections: self.fp32_detections.split_off(at.min(self.fp32_detections.len())),
            fp32_run_secs: self.fp32_run_secs,
            classes: self.classes,
            fp32: Metrics::default(),
        };
        self.rescore_fp32();
        rest.rescore_fp32();
        rest
    }

    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    pub fn labelled(&self) -> bool {
        !self.labels.is_empty() && self.labels.iter().all(Option::is_some)
    }

    pub fn is_classification(&self) -> bool {
        self.classes.is_some()
    }

    /// Scores detections too from now on: fp32's are decoded once here. An error when the head output is missing
    /// or does not fit the decoding.
    pub fn set_detector(&mut self, d: Detector) -> Result<(), CalibError> {
        let j = match &d.output {
            Some(n) => self.output_names.iter().position(|o| o == n),
            None => (!self.output_names.is_empty()).then_some(0),
        }
        .ok_or_else(|| CalibError::Invalid(format!("no detection head output {:?}", d.output)))?;
        let mut dets = Vec::with_capacity(self.len());
        for k in 0..self.len() {
            dets.push(self.decode(k, j, &d, &self.reference[k])?);
        }
        self.detector = Some((j, d));
        self.fp32_detections = dets;
        self.rescore_fp32();
        Ok(())
    }

    pub fn has_detector(&self) -> bool {
        self.detector.is_some()
    }

    /// Detections of output `j` of sample `k` from its flattened outputs `flat`, in model-input pixels (matching
    /// is the same there as in image pixels: the letterbox maps boxes by one scale and offset).
    fn decode(&self, k: usize, j: usize, d: &Detector, flat: &[f32]) -> Result<Vec<Detection>, CalibError> {
        let start: usize = self.output_lens[k][..j].iter().sum();
        let len = self.output_lens[k][j];
        let shape = self.output_shapes[k][j].clone();
        let head = Tensor::from_f32(shape, flat.get(start..start + len).unwrap_or_default().to_vec())
            .map_err(|e| CalibError::Invalid(format!("detection head: {e}")))?;
        let size = self.inputs[k]
            .first()
            .map(|(_, t)| t.shape())
            .filter(|s| s.len() == 4)
            .map_or((1, 1), |s| if s[1] <= 4 { (s[3] as u32, s[2] as u32) } else { (s[2] as u32, s[1] as u32) });
        let all = (u32::MAX / 4, u32::MAX / 4);
        edgepack_runtime::process::decode_yolo(&d.spec, &head, None, 0, &InputMap::IDENTITY, all, size, None)
            .map_err(|e| CalibError::Invalid(format!("detection head: {e}")))
    }

    pub fn input(&self, k: usize) -> Vec<(String, Tensor)> {
        self.inputs[k].clone()
    }

    /// Runs `s` on the first `limit` held-out samples (all when `None`) and scores it against fp32.
    pub fn evaluate(
        &self,
        s: &Session,
        limit: Option<usize>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Metrics, CalibError> {
        let n = limit.unwrap_or(self.len()).min(self.len());
        let mut outs = Vec::with_capacity(n);
        for k in 0..n {
            outs.push(flatten(&s.run(self.input(k))?));
            progress(k + 1, n);
        }
        Ok(self.score(&outs))
    }

    fn score(&self, outs: &[Vec<f32>]) -> Metrics {
        let n = outs.len();
        // Per output: Σref², Σ(ref−q)², Σq², Σref·q.
        let mut per = vec![[0f64; 4]; self.output_names.len()];
        let mut agree = 0usize;
        let mut kl = 0f64;
        let mut tally = crate::eval::TopK::default();
        for (k, o) in outs.iter().enumerate() {
            let r = &self.reference[k];
            let mut start = 0;
            for (j, &len) in self.output_lens[k].iter().enumerate() {
                let end = (start + len).min(r.len());
                let acc = &mut per[j];
                for (i, &a) in r[start..end].iter().enumerate() {
                    let (a, b) = (a as f64, o.get(start + i).copied().unwrap_or(0.0) as f64);
                    acc[0] += a * a;
                    acc[1] += (a - b) * (a - b);
                    acc[2] += b * b;
                    acc[3] += a * b;
                }
                start = end;
            }
            if let Some(c) = self.classes {
                let (rc, oc) = (&r[..c.min(r.len())], &o[..c.min(o.len())]);
                agree += (argmax(rc) == argmax(oc)) as usize;
                kl += class_kl(rc, oc);
                if let Some(l) = self.labels[k].filter(|&l| l < oc.len()) {
                    tally.add(Some(rank_of(oc, l)));
                }
            }
        }
        // Over all outputs: the per-output sums pooled.
        let (sig, noise) = per.iter().fold((0f64, 0f64), |(s, e), a| (s + a[0], e + a[1]));
        let pct = |x: usize| 100.0 * x as f64 / n.max(1) as f64;
        let labelled = self.classes.is_some() && self.labelled();
        let (top1_agreement, top1, top5) =
            (self.classes.map(|_| pct(agree)), labelled.then(|| pct(tally.top1)), labelled.then(|| pct(tally.top5)));
        let ci = |v: Option<f64>| v.map(|p| wilson95(p, n));
        let detections = self.detector.as_ref().map(|(j, d)| {
            let mut m = DetectionMatch::default();
            for (k, o) in outs.iter().enumerate() {
                // A head that no longer decodes has found nothing.
                let got = self.decode(k, *j, d, o).unwrap_or_default();
                let r = match_detections(&self.fp32_detections[k], &got);
                (m.fp32, m.matched, m.extra) = (m.fp32 + r.fp32, m.matched + r.matched, m.extra + r.extra);
            }
            m
        });
        Metrics {
            detections,
            samples: n,
            output_sqnr_db: sqnr_db(sig, noise),
            top1_agreement,
            top1,
            top5,
            ci95: Intervals { top1_agreement: ci(top1_agreement), top1: ci(top1), top5: ci(top5) },
            class_kl: self.classes.map(|_| kl / n.max(1) as f64),
            outputs: self
                .output_names
                .iter()
                .zip(&per)
                .map(|(name, &[rr, e, qq, rq])| OutputFidelity {
                    name: name.clone(),
                    sqnr_db: sqnr_db(rr, e),
                    cosine: cosine(rr, qq, rq, e),
                })
                .collect(),
        }
    }

    /// SQNR of each of `values` in `q` against `fp32`, over the first `samples` held-out samples.
    /// `None` where a value is identical (or absent from either model).
    pub fn value_sqnr(
        &self,
        fp32: &Session,
        q: &Session,
        values: &[String],
        samples: usize,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Vec<Option<f64>>, CalibError> {
        let names: Vec<&str> = values.iter().map(String::as_str).collect();
        let mut acc = vec![(0f64, 0f64); values.len()];
        let n = samples.min(self.len());
        for k in 0..n {
            let a = fp32.run_values(self.input(k), &names)?;
            let b = q.run_values(self.input(k), &names)?;
            for (i, ((_, ta), (_, tb))) in a.iter().zip(&b).enumerate() {
                add_error(&mut acc[i], &ta.to_f32_vec(), &tb.to_f32_vec());
            }
            progress(k + 1, n);
        }
        Ok(acc.into_iter().map(|(s, e)| sqnr_db(s, e)).collect())
    }
}

/// Milliseconds of one run of `s` on `input`.
fn run_ms(s: &Session, input: &[(String, Tensor)]) -> Result<f64, CalibError> {
    let t0 = Instant::now();
    s.run(input.to_vec())?;
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

/// Median latency in ms of `runs` runs of `s` on `input` (after one warm-up run).
pub fn median_latency_ms(s: &Session, input: Vec<(String, Tensor)>, runs: usize) -> Result<f64, CalibError> {
    s.run(input.clone())?;
    let t: Vec<f64> = (0..runs.max(1)).map(|_| run_ms(s, &input)).collect::<Result<_, _>>()?;
    Ok(median_ci95(t).0)
}

/// Latency of two models measured as pairs: each pair runs both back to back on the same input (the order
/// alternating between pairs), so drift of the machine's speed cancels within a pair.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PairedLatency {
    /// Median milliseconds of each model over every timed run.
    pub a_ms: f64,
    pub b_ms: f64,
    /// b/a: the median of the replicas' medians of their per-pair ratios.
    pub ratio: f64,
    /// A distribution-free confidence interval for the median ratio at level `ci_level`: the replica medians of
    /// ranks k and n + 1 − k, k the largest rank whose interval still covers at least 95 % (the lowest and highest
    /// replica for up to 8 replicas, coverage 1 − 2^(1 − replicas)).
    pub ratio_ci: (f64, f64),
    pub ci_level: f64,
    /// Each replica's median ratio.
    pub replica_ratios: Vec<f64>,
    /// Timed pairs in all.
    pub pairs: usize,
}

/// Times two models in `replicas` rounds of interleaved pairs (`runs` pairs in all). Each round builds both
/// sessions afresh, in alternating order, so where each lands in memory (cache-set conflicts, heap state) varies
/// between rounds: a difference of a few per cent between two sessions of the *same* model is common within one
/// process, and a single round would report it as a measured change. The rounds' median ratios then give the
/// interval from their order statistics ([`order_statistic_ci`]: 6 replicas, the smallest and largest at
/// 96.9 %; 32 replicas, the 10th and 23rd at 98.0 %). Pairs cycle over `inputs`; both runs of a pair read the
/// same one.
pub fn replicated_latency_ms(
    make_a: impl Fn() -> Result<Session, CalibError>,
    make_b: impl Fn() -> Result<Session, CalibError>,
    inputs: &[Vec<(String, Tensor)>],
    replicas: usize,
    runs: usize,
    mut progress: impl FnMut(usize),
) -> Result<PairedLatency, CalibError> {
    if inputs.is_empty() {
        return Err(CalibError::Invalid("latency: no input samples".into()));
    }
    let replicas = replicas.max(1);
    let per = runs.div_ceil(replicas).max(1);
    let (mut ta, mut tb, mut medians) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..replicas {
        let (a, b) = if r % 2 == 0 {
            let a = make_a()?;
            (a, make_b()?)
        } else {
            let b = make_b()?;
            (make_a()?, b)
        };
        for x in inputs {
            a.run(x.clone())?;
            b.run(x.clone())?;
        }
        let mut ratios = Vec::with_capacity(per);
        for i in 0..per {
            let x = &inputs[i % inputs.len()];
            let (x_ms, y_ms) = if i % 2 == 0 {
                let x_ms = run_ms(&a, x)?;
                (x_ms, run_ms(&b, x)?)
            } else {
                let y_ms = run_ms(&b, x)?;
                (run_ms(&a, x)?, y_ms)
            };
            ta.push(x_ms);
            tb.push(y_ms);
            ratios.push(y_ms / x_ms);
            progress(r * per + i + 1);
        }
        medians.push(median_ci95(ratios).0);
    }
    let mut sorted = medians.clone();
    sorted.sort_by(f64::total_cmp);
    let (k, ci_level) = order_statistic_ci(sorted.len(), 0.95);
    Ok(PairedLatency {
        a_ms: median_ci95(ta).0,
        b_ms: median_ci95(tb).0,
        ratio: median_of(&sorted),
        ratio_ci: (sorted[k], sorted[sorted.len() - 1 - k]),
        ci_level,
        replica_ratios: medians,
        pairs: per * replicas,
    })
}

/// The distribution-free confidence interval for the median of `n` independent values: the sorted values of
/// (0-based) ranks `k` and `n − 1 − k`, for the largest `k` whose coverage 1 − 2·P(Binomial(n, ½) ≤ k) is still at
/// least `level` (`k` = 0, the extremes, when no inner pair reaches it). Returns `k` and the exact coverage.
pub fn order_statistic_ci(n: usize, level: f64) -> (usize, f64) {
    let coverage = |k: usize| {
        // P(Binomial(n, 1/2) <= k), in floating point (n is a replica count: small).
        let (mut c, mut tail) = (1.0f64, 0.0f64);
        for i in 0..=k {
            if i > 0 {
                c *= (n - i + 1) as f64 / i as f64;
            }
            tail += c;
        }
        1.0 - 2.0 * tail * 0.5f64.powi(n as i32)
    };
    let mut k = 0;
    while n > 2 * (k + 1) && coverage(k + 1) >= level {
        k += 1;
    }
    (k, coverage(k).max(0.0))
}

/// The median of sorted values (the mean of the middle two for an even count).
fn median_of(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]) }
}

/// The median of `v` and a 95 % confidence interval for it from order statistics: ranks n/2 ∓ 1.96·√n/2 (the normal
/// approximation of the binomial, conservative by one rank each side).
pub fn median_ci95(mut v: Vec<f64>) -> (f64, (f64, f64)) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return (f64::NAN, (f64::NAN, f64::NAN));
    }
    let half = 1.96 * (n as f64).sqrt() / 2.0;
    let lo = ((n as f64 / 2.0 - half).floor().max(0.0) as usize).min(n - 1);
    let hi = ((n as f64 / 2.0 + half).ceil() as usize).min(n - 1);
    (v[n / 2], (v[lo], v[hi]))
}

#[cfg(test)]
mod collapse_tests {
    use super::*;

    #[test]
    fn a_collapse_names_each_figure_past_its_limit() {
        let m = |top1, ag, db| Metrics {
            samples: 100,
            output_sqnr_db: Some(db),
            top1_agreement: Some(ag),
            top1: Some(top1),
            top5: None,
            ..Default::default()
        };
        assert!(collapse(&m(91.0, 100.0, 99.0), &m(90.0, 97.0, 25.0)).is_none());
        let w = collapse(&m(91.0, 100.0, 99.0), &m(72.0, 75.0, 3.2)).unwrap();
        assert!(w.contains("-19.0 pt") && w.contains("75.0 %") && w.contains("3.2 dB"), "{w}");
        // A classifier whose answers hold is not flagged for its logits' SQNR; a model without classes is.
        assert!(collapse(&m(91.0, 100.0, 99.0), &m(90.5, 98.0, 8.0)).is_none());
        let plain = |db| Metrics { samples: 8, output_sqnr_db: Some(db), ..Default::default() };
        assert!(collapse(&plain(99.0), &plain(8.0)).unwrap().contains("8.0 dB"));
    }

    #[test]
    fn wilson_intervals_match_the_textbook() {
        // 81 of 100: 72.2-87.5 % (Wilson, z = 1.96); all of 200: 98.1-100 %; none of 10: 0-27.8 %.
        let r = |v: [f64; 2]| [(v[0] * 10.0).round() / 10.0, (v[1] * 10.0).round() / 10.0];
        assert_eq!(r(wilson95(81.0, 100)), [72.2, 87.5]);
        assert_eq!(r(wilson95(100.0, 200)), [98.1, 100.0]);
        assert_eq!(r(wilson95(0.0, 10)), [0.0, 27.8]);
        assert_eq!(wilson95(100.0, 200)[1], 100.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_its_confidence_interval() {
        let (m, (lo, hi)) = median_ci95((1..=100).map(f64::from).collect());
        assert_eq!(m, 51.0);
        // Ranks 50 ∓ 9.8 → 40 and 60 (0-based): the values 41 and 61.
        assert_eq!((lo, hi), (41.0, 61.0));
        let (m, (lo, hi)) = median_ci95(vec![2.0]);
        assert_eq!((m, lo, hi), (2.0, 2.0, 2.0));
    }

    #[test]
    fn sqnr_and_class_shapes() {
        assert_eq!(sqnr_db(1.0, 0.0), None);
        assert!((sqnr_db(100.0, 1.0).unwrap() - 20.0).abs() < 1e-12);
        assert_eq!(class_count(&[1, 1000]), Some(1000));
        assert_eq!(class_count(&[1, 1, 1, 10]), Some(10));
        assert_eq!(class_count(&[1, 1000, 1, 1]), Some(1000));
        assert_eq!(class_count(&[1, 4420, 2]), None);
        assert_eq!(class_count(&[1, 1]), None);
        assert_eq!(rank_of(&[0.1, 0.5, 0.3], 2), 1);
        assert_eq!(argmax(&[0.1, 0.5, 0.3]), 1);
    }
}
