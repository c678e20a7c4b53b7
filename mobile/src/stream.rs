//! `Stream`: a stateful model (Silero VAD, a wake-word detector) run over a stream of samples with its state
//! carried from one chunk to the next, as the bundle's stream description says (`edgepack pack --stream-json`).
use std::sync::{Arc, Mutex};

use crate::types::*;

/// One chunk's result.
#[derive(uniffi::Record, Debug, Clone)]
pub struct StreamStep {
    /// The stream's output value for this chunk (its first element: e.g. a speech probability).
    pub value: Option<f32>,
    /// The model's outputs for this chunk, without the state it carries.
    pub outputs: Vec<NamedTensor>,
}

/// A model run over a stream of samples on the device; one per audio source (each keeps its own state).
#[derive(uniffi::Object)]
pub struct Stream {
    inner: Mutex<edgepack_runtime::stream::Stream>,
    state_outputs: Vec<String>,
}

impl Stream {
    pub(crate) fn open(session: Arc<edgepack_runtime::Session>) -> Result<Stream, EdgepackError> {
        let inner = edgepack_runtime::stream::Stream::new(session, None)?;
        let state_outputs = inner.spec().state.iter().map(|l| l.output.clone()).collect();
        Ok(Stream { inner: Mutex::new(inner), state_outputs })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, edgepack_runtime::stream::Stream> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[uniffi::export]
impl Stream {
    /// New samples per model call (e.g. 512 at 16 kHz for Silero VAD: 32 ms).
    pub fn chunk_len(&self) -> u32 {
        self.lock().spec().chunk as u32
    }

    /// The sample rate the model expects, when the bundle says.
    pub fn sample_rate(&self) -> Option<u32> {
        self.lock().spec().sample_rate
    }

    /// Feeds samples (any count): runs every complete chunk, keeps the rest for the next push; one step per chunk.
    pub fn push(&self, samples: Vec<f32>) -> Result<Vec<StreamStep>, EdgepackError> {
        let mut s = self.lock();
        let steps = s.push(&samples)?;
        Ok(steps
            .iter()
            .map(|outs| StreamStep {
                value: s.value(outs),
                outputs: outs
                    .iter()
                    .filter(|(n, _)| !self.state_outputs.contains(n))
                    .map(|(n, t)| NamedTensor::from_runtime(n.clone(), t))
                    .collect(),
            })
            .collect())
    }

    /// Starts over: zero state, no context, nothing pending.
    pub fn reset(&self) -> Result<(), EdgepackError> {
        Ok(self.lock().reset()?)
    }
}
