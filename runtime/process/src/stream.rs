//! Streaming models as data: which input takes each chunk of samples, how much of the previous chunk it keeps,
//! which outputs come back as the next call's state inputs, and which inputs stay constant. Read by
//! `edgepack_runtime::stream::Stream` (and the mobile SDK's stream API); written by `edgepack pack --stream-json`.
use std::collections::BTreeMap;

use crate::{Error, Result};

/// An output fed back as an input on the next call (zeros at the start).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct StateLink {
    pub input: String,
    pub output: String,
}

/// How to run a model over a stream of samples (e.g. Silero VAD: 512 new samples at 16 kHz after the last 64 of
/// the previous chunk, state `stateN` → `state`, `sr` = 16000).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct StreamSpec {
    /// The input that takes the samples, as `[1, context + chunk]`.
    pub input: String,
    /// New samples per call.
    pub chunk: usize,
    /// Samples of the previous call kept in front of the new ones (zeros before the first call).
    #[serde(default)]
    pub context: usize,
    /// State carried from one call to the next.
    #[serde(default)]
    pub state: Vec<StateLink>,
    /// Inputs with the same value on every call (scalars, in the input's element type).
    #[serde(default)]
    pub constants: BTreeMap<String, f64>,
    /// The output a caller reads per chunk (e.g. a speech probability); default: the first output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Sample rate of the samples (audio files are checked against it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_rate: Option<u32>,
}

impl StreamSpec {
    pub fn validate(&self) -> Result<()> {
        if self.chunk == 0 || self.chunk > 1 << 24 || self.context > 1 << 24 {
            return Err(Error::Processing(format!(
                "stream chunk {} / context {} out of range",
                self.chunk, self.context
            )));
        }
        Ok(())
    }
}

/// Decodes a RIFF WAV file (PCM 8/16/24/32-bit integer or 32/64-bit float, any channel count, mixed down to mono)
/// into samples in [-1, 1] and its sample rate.
pub fn read_wav(bytes: &[u8]) -> Result<(Vec<f32>, u32)> {
    let bad = |m: &str| Error::Processing(format!("WAV: {m}"));
    if bytes.len() < 12 || &bytes[..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err(bad("not a RIFF/WAVE file"));
    }
    let (mut fmt, mut data) = (None, None);
    let mut at = 12;
    while at + 8 <= bytes.len() {
        let id = &bytes[at..at + 4];
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap_or_default()) as usize;
        let body = &bytes[at + 8..(at + 8).saturating_add(len).min(bytes.len())];
        match id {
            b"fmt " => fmt = Some(body),
            b"data" => data = Some(body),
            _ => {}
        }
        at = at.saturating_add(8 + len + (len & 1));
    }
    let fmt = fmt.filter(|f| f.len() >= 16).ok_or_else(|| bad("no fmt chunk"))?;
    let data = data.ok_or_else(|| bad("no data chunk"))?;
    let u16_at = |i: usize| u16::from_le_bytes([fmt[i], fmt[i + 1]]);
    let (mut format, channels, bits) = (u16_at(0), u16_at(2) as usize, u16_at(14) as usize);
    let rate = u32::from_le_bytes(fmt[4..8].try_into().unwrap_or_default());
    if format == 0xFFFE && fmt.len() >= 26 {
        format = u16_at(24); // WAVE_FORMAT_EXTENSIBLE: the sub-format's first two bytes
    }
    if channels == 0 || bits == 0 || bits % 8 != 0 {
        return Err(bad(&format!("{channels} channels of {bits} bits")));
    }
    let width = bits / 8;
    let sample = |b: &[u8]| -> Option<f32> {
        Some(match (format, bits) {
            (1, 8) => (b[0] as f32 - 128.0) / 128.0,
            (1, 16) => i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0,
            (1, 24) => (i32::from_le_bytes([0, b[0], b[1], b[2]]) >> 8) as f32 / 8_388_608.0,
            (1, 32) => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32 / 2_147_483_648.0,
            (3, 32) => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            (3, 64) => f64::from_le_bytes(b[..8].try_into().ok()?) as f32,
            _ => return None,
        })
    };
    let frame = width * channels;
    let mut out = Vec::with_capacity(data.len() / frame.max(1));
    for f in data.chunks_exact(frame) {
        let mut s = 0.0;
        for c in f.chunks_exact(width) {
            s += sample(c).ok_or_else(|| bad(&format!("format {format} with {bits} bits is not supported")))?;
        }
        out.push(s / channels as f32);
    }
    Ok((out, rate))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(rate: u32, channels: u16, samples: &[i16]) -> Vec<u8> {
        let data: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut v = b"RIFF".to_vec();
        v.extend(((36 + data.len()) as u32).to_le_bytes());
        v.extend(b"WAVEfmt ");
        v.extend(16u32.to_le_bytes());
        v.extend(1u16.to_le_bytes());
        v.extend(channels.to_le_bytes());
        v.extend(rate.to_le_bytes());
        v.extend((rate * 2 * channels as u32).to_le_bytes());
        v.extend((2 * channels).to_le_bytes());
        v.extend(16u16.to_le_bytes());
        v.extend(b"data");
        v.extend((data.len() as u32).to_le_bytes());
        v.extend(data);
        v
    }

    #[test]
    fn pcm16_is_read_and_mixed_to_mono() {
        let (s, rate) = read_wav(&wav(16000, 1, &[0, 16384, -32768])).unwrap();
        assert_eq!((rate, s), (16000, vec![0.0, 0.5, -1.0]));
        let (s, _) = read_wav(&wav(8000, 2, &[16384, 0, -16384, -16384])).unwrap();
        assert_eq!(s, vec![0.25, -0.5]);
        assert!(read_wav(b"RIFF....WAVEjunk").is_err());
        assert!(read_wav(&wav(16000, 1, &[1, 2])[..30]).is_err());
    }
}
