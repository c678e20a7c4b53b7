//! Accuracy of a classifier on a labelled dataset (`edgepack eval`): samples streamed through the session's (or
//! a preset's) pre-processing in batches, ranked by the session's post-processing, top-1/top-5 counted with the
//! same [`TopK`] tally the quantizer's fidelity report uses.
use std::ops::Range;
use std::time::Instant;

use edgepack_runtime::Session;
use edgepack_runtime::process::{self, ImagePreprocess};

use crate::calib::CalibError;
use crate::data::Dataset;

/// Top-1 / top-5 counts over labelled samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopK {
    pub samples: usize,
    pub top1: usize,
    pub top5: usize,
}

impl TopK {
    /// Counts one sample whose true class ranked `rank` (0: the best score; `None`: not ranked).
    pub fn add(&mut self, rank: Option<usize>) {
        self.samples += 1;
        self.top1 += usize::from(rank == Some(0));
        self.top5 += usize::from(rank.is_some_and(|r| r < 5));
    }

    /// % top-1 and top-5 correct.
    pub fn percent(&self) -> (f64, f64) {
        let pct = |x: usize| 100.0 * x as f64 / self.samples.max(1) as f64;
        (pct(self.top1), pct(self.top5))
    }
}

/// One sample's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub id: String,
    /// `None` for an unlabelled sample.
    pub label: Option<usize>,
    /// The five best classes, best first.
    pub top5: Vec<usize>,
}

/// What [`evaluate`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub tally: TopK,
    /// Median milliseconds of one inference call divided by the samples in it.
    pub median_ms_per_sample: f64,
    pub predictions: Vec<Prediction>,
}

/// Runs `s` on samples `range` of `data`, `batch` samples per call (images through `pre`, `.npy` samples as
/// they are); `progress` hears how many samples are done.
pub fn evaluate(
    s: &Session,
    data: &Dataset,
    pre: Option<&ImagePreprocess>,
    range: Range<usize>,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Evaluation, CalibError> {
    if range.is_empty() {
        return Err(CalibError::Invalid(format!("no samples to evaluate in {range:?}")));
    }
    let name = pre.and_then(|p| p.input.clone()).or_else(|| s.inputs().first().map(|i| i.name.clone()));
    let name = name.ok_or_else(|| CalibError::Invalid("the model has no input".into()))?;
    let mut tally = TopK::default();
    let mut per_sample_ms = Vec::new();
    let mut predictions = Vec::with_capacity(range.len());
    let mut i = range.start;
    while i < range.end {
        let j = (i + batch.max(1)).min(range.end);
        let mut xs = Vec::with_capacity(j - i);
        let mut meta = Vec::with_capacity(j - i);
        for k in i..j {
            let sample = data.get(k)?;
            xs.push(sample.to_input(pre)?);
            meta.push((sample.id, sample.label));
        }
        let t0 = Instant::now();
        let outs = s.run(vec![(name.clone(), process::stack(&xs)?)])?;
        per_sample_ms.push(t0.elapsed().as_secs_f64() * 1e3 / (j - i) as f64);
        for ((id, label), ranked) in meta.into_iter().zip(s.classify_outputs(&outs, Some(5))?) {
            let top5: Vec<usize> = ranked.iter().map(|c| c.class_index).collect();
            tally.add(label.and_then(|l| top5.iter().position(|&c| c == l)));
            predictions.push(Prediction { id, label, top5 });
        }
        progress(j - range.start);
        i = j;
    }
    per_sample_ms.sort_by(f64::total_cmp);
    Ok(Evaluation { tally, median_ms_per_sample: per_sample_ms[per_sample_ms.len() / 2], predictions })
}
