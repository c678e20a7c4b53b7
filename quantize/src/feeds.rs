//! How samples become a model's feeds: its inputs by name (a sample per step), and a recurrent state carried
//! over the sequence of samples. A stateful model (Silero VAD: `state` in, `stateN` out; an RNN's `h`/`h_out`) is
//! calibrated and judged the way it runs: each step's state input is the previous step's state output (zeros at
//! the first step), unless the sample gives that input itself, which restarts the sequence there.
use std::collections::HashMap;

use edgepack_runtime::onnx::Dim;
use edgepack_runtime::process::ImagePreprocess;
use edgepack_runtime::{DType, Session, Tensor, TensorData};

use crate::data::{DataError, Sample};

/// A state input and the output that feeds it at the next step.
#[derive(Debug, Clone)]
pub struct StatePair {
    pub input: String,
    pub output: String,
    zeros: Tensor,
}

/// The feeds of successive samples for one model.
pub struct Feeds {
    inputs: Vec<String>,
    pub state: Vec<StatePair>,
    carry: HashMap<String, Tensor>,
}

/// Whether `output` reads as the next value of `input` (`state` → `stateN`, `h` → `h_out`, `c_in` → `c_out`).
fn is_next(input: &str, output: &str) -> bool {
    let by_suffix =
        output.strip_prefix(input).is_some_and(|rest| ["N", "n", "_n", "out", "_out", "_next", "_new"].contains(&rest));
    let in_out = input.strip_suffix("_in").is_some_and(|stem| output.strip_suffix("_out") == Some(stem));
    by_suffix || in_out
}

impl Feeds {
    /// The feeds of `session`'s model, its state pairs found by name: a float input and a float output of the same
    /// rank named as its next value. The first step's zeros take the input's declared shape, a symbolic dim (the
    /// batch) as 1.
    pub fn of(session: &Session) -> Feeds {
        let state = session
            .inputs()
            .iter()
            .filter(|i| i.dtype == Some(DType::F32))
            .filter_map(|i| {
                let o = session.outputs().iter().find(|o| {
                    o.dtype == Some(DType::F32) && is_next(&i.name, &o.name) && o.shape.len() == i.shape.len()
                })?;
                let shape: Vec<usize> = i.shape.iter().map(|d| if let Dim::Fixed(n) = d { *n } else { 1 }).collect();
                let n = shape.iter().product();
                let zeros = Tensor::new(shape, TensorData::F32(vec![0.0; n])).ok()?;
                Some(StatePair { input: i.name.clone(), output: o.name.clone(), zeros })
            })
            .collect();
        Feeds { inputs: session.inputs().iter().map(|i| i.name.clone()).collect(), state, carry: HashMap::new() }
    }

    /// The outputs to fetch beside any others at each step, so the next step gets its state.
    pub fn state_outputs(&self) -> Vec<String> {
        self.state.iter().map(|p| p.output.clone()).collect()
    }

    /// Starts a new sequence: the next step gets zero states.
    pub fn reset(&mut self) {
        self.carry.clear();
    }

    /// The feeds of `sample` as the next step.
    pub fn next(&mut self, sample: &Sample, pre: Option<&ImagePreprocess>) -> Result<Vec<(String, Tensor)>, DataError> {
        let optional: Vec<String> = self.state.iter().map(|p| p.input.clone()).collect();
        let mut feeds = sample.to_inputs(pre, &self.inputs, &optional)?;
        for p in &self.state {
            if !feeds.iter().any(|(n, _)| n == &p.input) {
                let t = self.carry.get(&p.input).cloned().unwrap_or_else(|| p.zeros.clone());
                feeds.push((p.input.clone(), t));
            }
        }
        Ok(feeds)
    }

    /// Takes the state outputs of a step (among `outs`, by name) for the next one.
    pub fn carry(&mut self, outs: &[(String, Tensor)]) {
        for p in &self.state {
            if let Some((_, t)) = outs.iter().find(|(n, _)| n == &p.output) {
                self.carry.insert(p.input.clone(), t.clone());
            }
        }
    }

    /// "state ← stateN" per pair, for reports.
    pub fn describe(&self) -> Vec<String> {
        self.state.iter().map(|p| format!("{} ← {}", p.input, p.output)).collect()
    }
}

/// Runs `session` over samples `range` of `data` in order, the recurrent state carried from one to the next, and
/// hands `visit` the values named in `values` of each sample; `progress(done, total)` after each.
pub fn visit_samples(
    session: &Session,
    data: &crate::data::Dataset,
    range: std::ops::Range<usize>,
    pre: Option<&ImagePreprocess>,
    values: &[String],
    mut visit: impl FnMut(&[(String, Tensor)]),
    mut progress: impl FnMut(usize, usize),
) -> Result<(), crate::calib::CalibError> {
    let mut feeds = Feeds::of(session);
    let state = feeds.state_outputs();
    let names: Vec<&str> = values.iter().chain(&state).map(String::as_str).collect();
    let total = range.len();
    for (done, k) in range.enumerate() {
        let x = feeds.next(&data.get(k)?, pre)?;
        let outs = session.run_values(x, &names)?;
        feeds.carry(&outs[values.len()..]);
        visit(&outs[..values.len()]);
        progress(done + 1, total);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_pair_up() {
        for (i, o) in [("state", "stateN"), ("h", "h_out"), ("c_in", "c_out"), ("hidden", "hidden_next")] {
            assert!(is_next(i, o), "{i} {o}");
        }
        for (i, o) in [("state", "output"), ("input", "output"), ("h", "hx"), ("state", "state")] {
            assert!(!is_next(i, o), "{i} {o}");
        }
    }
}
