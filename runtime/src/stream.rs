//! Running a stateful model over a stream of samples (`StreamSpec` of the bundle): each call takes the next chunk
//! after the kept context, feeds the state outputs of the previous call back as state inputs (zeros at the start)
//! and the constant inputs, and returns the outputs. What the mobile SDK's stream API and `edgepack run` over a
//! WAV file use.
use std::sync::Arc;

use crate::process::StreamSpec;
use crate::session::Session;
use crate::{DType, Error, Result, Tensor};

/// One stream over one session; not shared between threads (each stream has its own state).
pub struct Stream {
    session: Arc<Session>,
    spec: StreamSpec,
    /// The state inputs' current values, in `spec.state` order.
    state: Vec<Tensor>,
    /// The last `context` samples.
    context: Vec<f32>,
    /// Samples pushed but not yet run (less than a chunk).
    pending: Vec<f32>,
    constants: Vec<(String, Tensor)>,
    input_dtype: DType,
}

impl Stream {
    /// A stream over `session` with its bundle's stream description (or `spec` when given).
    pub fn new(session: Arc<Session>, spec: Option<StreamSpec>) -> Result<Stream> {
        let spec = match spec.or_else(|| session.bundle().and_then(|b| b.manifest.stream.clone())) {
            Some(s) => s,
            None => {
                return Err(Error::Processing(
                    "this model has no stream description (pack it with --stream-json)".into(),
                ));
            }
        };
        spec.validate()?;
        let find = |n: &str| {
            session
                .inputs()
                .iter()
                .find(|i| i.name == n)
                .ok_or_else(|| Error::UnknownInput { name: n.to_string(), expected: String::new() })
        };
        let input_dtype = find(&spec.input)?.dtype.unwrap_or(DType::F32);
        let mut constants = Vec::new();
        for (name, v) in &spec.constants {
            let info = find(name)?;
            let shape = info.concrete_shape(1);
            let n: usize = shape.iter().product();
            // Through f64, so that an integer constant (a sample rate) takes no f32 rounding.
            let t = Tensor::new(shape, crate::TensorData::F64(vec![*v; n]))?.cast(info.dtype.unwrap_or(DType::F32));
            constants.push((name.clone(), t));
        }
        let mut s = Stream { session, spec, state: vec![], context: vec![], pending: vec![], constants, input_dtype };
        s.reset()?;
        Ok(s)
    }

    /// Back to the start: zero state and context, nothing pending.
    pub fn reset(&mut self) -> Result<()> {
        self.state = self
            .spec
            .state
            .iter()
            .map(|l| {
                let info = self
                    .session
                    .inputs()
                    .iter()
                    .find(|i| i.name == l.input)
                    .ok_or_else(|| Error::UnknownInput { name: l.input.clone(), expected: String::new() })?;
                let shape = info.concrete_shape(1);
                let n: usize = shape.iter().product();
                Ok(Tensor::from_f32(shape, vec![0.0; n])?.cast(info.dtype.unwrap_or(DType::F32)))
            })
            .collect::<Result<_>>()?;
        self.context = vec![0.0; self.spec.context];
        self.pending.clear();
        Ok(())
    }

    pub fn spec(&self) -> &StreamSpec {
        &self.spec
    }

    /// Runs one chunk of exactly `spec.chunk` samples; returns the model's outputs.
    pub fn step(&mut self, chunk: &[f32]) -> Result<Vec<(String, Tensor)>> {
        if chunk.len() != self.spec.chunk {
            return Err(Error::InvalidTensor(format!(
                "a chunk of {} samples, {} expected",
                chunk.len(),
                self.spec.chunk
            )));
        }
        let mut x = Vec::with_capacity(self.context.len() + chunk.len());
        x.extend_from_slice(&self.context);
        x.extend_from_slice(chunk);
        let mut feeds =
            vec![(self.spec.input.clone(), Tensor::from_f32(vec![1, x.len()], x.clone())?.cast(self.input_dtype))];
        feeds.extend(self.spec.state.iter().zip(&self.state).map(|(l, t)| (l.input.clone(), t.clone())));
        feeds.extend(self.constants.iter().cloned());
        let outs = self.session.run(feeds)?;
        for (l, slot) in self.spec.state.iter().zip(self.state.iter_mut()) {
            let t = outs
                .iter()
                .find(|(n, _)| *n == l.output)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| Error::Processing(format!("state output `{}` missing", l.output)))?;
            if t.shape() != slot.shape() {
                return Err(Error::Processing(format!(
                    "state output `{}` {:?} does not fit input `{}` {:?}",
                    l.output,
                    t.shape(),
                    l.input,
                    slot.shape()
                )));
            }
            *slot = t;
        }
        let keep = self.spec.context;
        self.context = x[x.len() - keep..].to_vec();
        Ok(outs)
    }

    /// Feeds any number of samples: runs every complete chunk (keeping the rest for the next push) and returns
    /// each chunk's outputs.
    pub fn push(&mut self, samples: &[f32]) -> Result<Vec<Vec<(String, Tensor)>>> {
        self.pending.extend_from_slice(samples);
        let n = self.spec.chunk;
        let full = self.pending.len() / n;
        let mut out = Vec::with_capacity(full);
        for k in 0..full {
            let chunk: Vec<f32> = self.pending[k * n..(k + 1) * n].to_vec();
            out.push(self.step(&chunk)?);
        }
        self.pending.drain(..full * n);
        Ok(out)
    }

    /// The value a caller reads per chunk: the first element of `spec.output` (default: the first output).
    pub fn value(&self, outs: &[(String, Tensor)]) -> Option<f32> {
        let t = match &self.spec.output {
            Some(o) => outs.iter().find(|(n, _)| n == o).map(|(_, t)| t),
            None => outs.first().map(|(_, t)| t),
        }?;
        t.to_f32_vec().first().copied()
    }
}

/// Runs of chunks whose value is above `threshold`, as (first chunk, end chunk) index pairs (end exclusive): voice
/// activity segments for a VAD.
pub fn segments(values: &[f32], threshold: f32) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = None;
    for (k, &v) in values.iter().chain(std::iter::once(&f32::NEG_INFINITY)).enumerate() {
        match (v > threshold, start) {
            (true, None) => start = Some(k),
            (false, Some(s)) => {
                out.push((s, k));
                start = None;
            }
            _ => {}
        }
    }
    out
}
