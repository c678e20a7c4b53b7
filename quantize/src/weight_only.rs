//! Weight-only quantization: fewer bits per weight for a smaller download, activations left in float.
//!
//! - 4-bit: Conv / Gemm / MatMul weights as signed int4 in blocks of consecutive weights along a row of the weight
//!   (the reduction axis of a Conv or a transposed Gemm, the output axis of a MatMul `[K, N]`): the block is the
//!   largest divisor of the row between `group/2` and `group` (40 input channels: blocks of 20), one float16 scale per
//!   block, the clipping of each block chosen to minimise its squared error. Stored packed two per byte
//!   as `com.microsoft.DequantizeLinear(int4 [blocks, group], f16 scale [blocks], axis 0) → Cast(float) →
//!   Reshape(weight dims)`:
//!   onnxruntime reads it at any opset, and edgepack's loader unpacks it once to f32 (`FoldLowBitWeights`), so the
//!   model then runs at fp32 speed on every backend.
//! - Grouped (depthwise) convolutions, rows with no such divisor, the layers of `QdqConfig::wider` (those the
//!   accuracy gate finds too sensitive for 4 bits) and `bits = 8`: int8 per output channel behind a standard `DequantizeLinear`.
//!
//! With a [`crate::rounding::Refiner`] in the configuration the integers come from GPTQ and the float biases
//! absorb the mean error (bias correction).
use std::collections::HashMap;

use edgepack_runtime::onnx::builder::{attr_int, tensor_f32, tensor_raw};
use edgepack_runtime::onnx::passes::tensor_f32_values;
use edgepack_runtime::onnx::{Model, NodeExt, NodeProto, TensorProto, node};

use crate::qdq::{QdqConfig, QdqError, QdqSummary, quantize_weights, sanitize};

/// ONNX element type of signed 4-bit integers.
pub const INT4: i32 = 22;

/// Bits and block size of weight-only quantization.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct WeightOnly {
    /// 4 or 8 for int4 blocks; 2 to 6 for the coded grid (its target bits per weight, fractions allowed: 3.5 sizes
    /// a bundle between 3 and 4).
    pub bits: f64,
    /// Weights per scale (4-bit blocks).
    pub group: usize,
    /// The coded grid ([`coded_steps`]): int8 storage on a per-channel step coarse enough that the codes carry
    /// about `bits` bits of entropy each, which the bundle's zstd then stores in about that many bits.
    #[serde(default)]
    pub coded: bool,
}

/// The coded grid's range of bits per weight: below 2 a uniform grid leaves most weights at zero (pruning, not
/// quantization); above 6 plain int8 is as small once entropy-coded.
pub const CODED_BITS: (f64, f64) = (2.0, 6.0);

/// Bits the coded grid adds to a layer the accuracy gate finds too sensitive (`QdqConfig::wider`).
pub const WIDER_CODED_BITS: f64 = 2.0;

impl WeightOnly {
    /// Whether a layer too sensitive for these weights falls back to wider weights (rather than fp32): every grid
    /// below 8 bits.
    pub fn narrow(&self) -> bool {
        self.bits < 8.0
    }

    /// Whether these widths exist: 4 or 8 bits on int4 blocks, [`CODED_BITS`] on the coded grid.
    pub fn check(&self) -> Result<(), String> {
        let (lo, hi) = CODED_BITS;
        if self.coded && !(lo..=hi).contains(&self.bits) {
            return Err(format!("the coded weight grid takes {lo} to {hi} bits per weight, not {}", self.bits));
        }
        if !self.coded && self.bits != 4.0 && self.bits != 8.0 {
            return Err(format!("weight-only quantization in int4 blocks has 4 or 8 bits, not {}", self.bits));
        }
        Ok(())
    }

    /// What a sensitive layer falls back to, for messages.
    pub fn fallback(&self) -> String {
        if self.coded { format!("at {WIDER_CODED_BITS} more bits") } else { "at 8 bits".into() }
    }
}

/// The coded grid's step of each output channel of a weight (`channel_of(i)` maps an element to one of
/// `channels`): `a × RMS(channel)`, with `a` bisected so the integers `round(w / step)` have an empirical entropy
/// of `bits` per weight, and never finer than int8's step (`max|w| / 127`), so no weight is clipped.
///
/// Entropy-constrained scalar quantization: a uniform grid followed by an entropy coder is about 1.5 dB from the
/// rate-distortion bound, where a fixed 16-level grid (int4) spends 4 bits on every weight whatever its
/// probability. On EfficientNet-Lite0's 1×1 convolutions the same weight SQNR costs 3.8 bits per weight after
/// zstd against int4 blocks' 4.5 (`scripts/weight_grids.py`).
pub fn coded_steps(w: &[f32], channels: usize, channel_of: &dyn Fn(usize) -> usize, bits: f64) -> Vec<f32> {
    let mut energy = vec![0f64; channels];
    let mut count = vec![0usize; channels];
    let mut peak = vec![0f64; channels];
    for (i, &v) in w.iter().enumerate() {
        let c = channel_of(i);
        energy[c] += f64::from(v) * f64::from(v);
        count[c] += 1;
        peak[c] = peak[c].max(f64::from(v.abs()));
    }
    let rms: Vec<f64> =
        energy.iter().zip(&count).map(|(e, &n)| if n > 0 { (e / n as f64).sqrt() } else { 0.0 }).collect();
    let steps = |a: f64| -> Vec<f32> {
        rms.iter()
            .zip(&peak)
            .map(|(r, p)| if *r > 0.0 && r.is_finite() && p.is_finite() { (a * r).max(p / 127.0) as f32 } else { 1.0 })
            .collect()
    };
    let entropy = |st: &[f32]| -> f64 {
        let mut hist = [0usize; 255];
        for (i, &v) in w.iter().enumerate() {
            hist[((v / st[channel_of(i)]).round().clamp(-127.0, 127.0) as i32 + 127) as usize] += 1;
        }
        let n = w.len() as f64;
        hist.iter().filter(|&&h| h > 0).map(|&h| -(h as f64 / n) * (h as f64 / n).log2()).sum()
    };
    // The entropy falls as the step grows: bisect log2(a) in [-10, 4].
    let (mut lo, mut hi) = (-10.0f64, 4.0f64);
    for _ in 0..30 {
        let mid = 0.5 * (lo + hi);
        if entropy(&steps(mid.exp2())) > bits {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    // bfloat16 values (8 significant bits, stored as f32): the bundle's zstd keeps about 2 of their 4 bytes, and the
    // step is a free choice anyway. Rounded up, so never finer than int8's.
    steps(hi.exp2()).into_iter().map(ceil_bf16).collect()
}

/// The smallest bfloat16 value (as f32) at least `x`, for a positive finite `x` up to bfloat16's largest; other
/// values (zero, negatives, non-finite, above that) as they are.
fn ceil_bf16(x: f32) -> f32 {
    if !(x.is_finite() && x > 0.0) || x.to_bits() & 0xFFFF == 0 {
        return x;
    }
    let up = f32::from_bits((x.to_bits() | 0xFFFF) + 1);
    if up.is_finite() { up } else { x }
}

/// `x` to 11 significant bits (float16's precision, float32's range), to nearest: a coded model's corrected biases,
/// which the bundle's zstd then stores in about 2.5 of their 4 bytes. The relative change (≤ 2⁻¹¹) is far below the
/// weights' own error on the coded grid.
fn short_mantissa(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    let r = f32::from_bits((x.to_bits() + 0x1000) & !0x1FFF);
    if r.is_finite() { r } else { x }
}

/// Bits per weight of each coded layer for the same total size, by sensitivity: `layers` are (node, weights, the
/// model's output noise power, relative to the output's, with that layer alone at `bits`). Reverse water-filling
/// at high rate: each bit quarters a layer's noise, so the total noise `Σ Nₗ·4^(bits−bₗ)` under `Σ nₗ·bₗ` fixed
/// is least at `bₗ = bits + ½·log2(Nₗ/nₗ) − μ`, μ bisected to keep the total; each layer within
/// [`bits` − 1, `bits` + 2] (and 2..7), so no layer is starved outside the range where the model holds.
pub fn allocate_bits(layers: &[(String, usize, f64)], bits: f64) -> std::collections::BTreeMap<String, f64> {
    let (lo, hi) = ((bits - 1.0).max(2.0), (bits + 2.0).min(7.0));
    let total: f64 = layers.iter().map(|(_, n, _)| *n as f64).sum();
    if layers.is_empty() || total <= 0.0 {
        return Default::default();
    }
    // A layer whose noise did not register (or is not finite) gets the floor.
    let raw: Vec<f64> = layers
        .iter()
        .map(|(_, n, noise)| {
            if *noise > 0.0 && noise.is_finite() && *n > 0 {
                0.5 * (noise / *n as f64).log2()
            } else {
                f64::NEG_INFINITY
            }
        })
        .collect();
    let at = |mu: f64| -> Vec<f64> { raw.iter().map(|r| (bits + r - mu).clamp(lo, hi)).collect() };
    let spent = |b: &[f64]| -> f64 { b.iter().zip(layers).map(|(b, (_, n, _))| b * *n as f64).sum::<f64>() / total };
    // The average falls as μ grows: bisect μ over a range wide enough for any finite noise.
    let finite: Vec<f64> = raw.iter().copied().filter(|r| r.is_finite()).collect();
    let (mut a, mut b) = (
        finite.iter().copied().fold(f64::INFINITY, f64::min) - 10.0,
        finite.iter().copied().fold(f64::NEG_INFINITY, f64::max) + 10.0,
    );
    if !a.is_finite() {
        return Default::default();
    }
    for _ in 0..60 {
        let mid = 0.5 * (a + b);
        if spent(&at(mid)) > bits {
            a = mid;
        } else {
            b = mid;
        }
    }
    layers.iter().zip(at(b)).map(|((name, _, _), b)| (name.clone(), b)).collect()
}

/// Axis of the output channels in a node's weight.
fn channel_axis(n: &NodeProto, rank: usize) -> usize {
    match n.op() {
        "Conv" => 0,
        "Gemm" if n.attr_i("transB").unwrap_or(0) == 1 => 0,
        _ => rank - 1,
    }
}

fn weight<'a>(n: &NodeProto, inits: &HashMap<&str, &'a TensorProto>) -> Option<&'a TensorProto> {
    if !matches!(n.op(), "Conv" | "Gemm" | "MatMul") {
        return None;
    }
    let w = *inits.get(n.input.get(1)?.as_str())?;
    let x = n.input.first()?;
    (!inits.contains_key(x.as_str()) && w.data_type == Some(1) && w.dims.len() >= 2 && !w.dims.contains(&0))
        .then_some(w)
}

/// The nodes the pass would quantize (name, op type), in graph order.
pub fn quantizable_nodes(model: &Model, cfg: &QdqConfig) -> Vec<(String, String)> {
    crate::qdq::nodes_taken(model, cfg, |n, inits| weight(n, inits).is_some())
}

/// Signed 4-bit blocks of `g` consecutive weights: (integers, one scale per block). Each block's clipping is the
/// one of 1, 0.95 … 0.6 × its largest |w| with the least squared error.
pub fn quantize_blocks(w: &[f32], g: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; w.len()];
    let mut scales = Vec::with_capacity(w.len() / g);
    for (b, block) in w.chunks(g).enumerate() {
        let m = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        if !(m > 0.0 && m.is_finite()) {
            scales.push(1.0);
            continue;
        }
        let err = |s: f32| block.iter().map(|&v| (v - (v / s).round().clamp(-8.0, 7.0) * s).powi(2)).sum::<f32>();
        // Scales are stored as float16: choose among values float16 holds exactly.
        let f16 = |s: f32| half::f16::from_f32(s).to_f32();
        let s = (0..9)
            .map(|k| f16(m * (1.0 - 0.05 * k as f32) / 7.0))
            .filter(|s| *s > 0.0 && s.is_finite())
            .min_by(|a, b| err(*a).total_cmp(&err(*b)))
            .unwrap_or(1.0);
        for (o, &v) in q[b * g..].iter_mut().zip(block) {
            *o = (v / s).round().clamp(-8.0, 7.0) as i8;
        }
        scales.push(s);
    }
    (q, scales)
}

/// Packs signed 4-bit integers two per byte, the first in the low nibble (ONNX's int4 layout).
pub fn pack_int4(q: &[i8]) -> Vec<u8> {
    q.chunks(2).map(|p| (p[0] as u8 & 0xF) | ((*p.get(1).unwrap_or(&0) as u8 & 0xF) << 4)).collect()
}

/// Applies the weight-only pass to every node [`quantizable_nodes`] lists.
pub fn quantize(model: &Model, cfg: &QdqConfig, wo: WeightOnly) -> Result<(Model, QdqSummary), QdqError> {
    wo.check().map_err(QdqError::Invalid)?;
    let group = wo.group.max(2);
    let mut m = model.clone();
    let mut summary = QdqSummary::default();
    let refs = model.graph.initializers_by_name();
    let mut new_inits: Vec<TensorProto> = Vec::new();
    let mut new_nodes: Vec<NodeProto> = Vec::new();
    let mut int4_used = false;
    for (idx, n) in model.graph.nodes.iter().enumerate() {
        let Some(w) = weight(n, &refs) else { continue };
        if crate::qdq::is_excluded(cfg, n) {
            summary.excluded.push(n.name().to_string());
            continue;
        }
        let Some(data) = tensor_f32_values(w) else { continue };
        let wname = sanitize(w.name.as_deref().unwrap_or("w"));
        let inner = data.len() / w.dims[0] as usize;
        let mut rn = n.clone();
        let name = |m: &Model, s: &str| m.graph.unique_name(&format!("{wname}_{s}"));
        let delta: Option<Vec<f32>>;
        // Blocks never straddle two rows of the weight's first axis (output channels of a Conv, inputs of a MatMul):
        // the block is the largest divisor of the row within [group/2, group]. Grouped (depthwise) convolutions
        // keep int8: few weights, and each of their channels is alone.
        let grouped = n.op() == "Conv" && n.attr_i("group").unwrap_or(1) > 1;
        let block = (group.div_ceil(2)..=group).rev().find(|g| inner.is_multiple_of(*g));
        let wider = cfg.wider.iter().any(|x| x == n.name());
        if let (true, false, false, Some(group), false) = (wo.bits == 4.0, grouped, wider, block, wo.coded) {
            let (mut q, scales) = quantize_blocks(&data, group);
            let refined = cfg.refiner.as_ref().and_then(|r| r.refine(n.name(), &data, &|i| scales[i / group], -8, 7));
            if let Some(r) = &refined {
                q.clone_from(&r.q);
            }
            delta = refined.map(|r| r.bias_delta.clone());
            let blocks = (data.len() / group) as i64;
            let (qn, sn, dqn, shn, out) = (
                name(&m, "int4"),
                name(&m, "int4_scale"),
                name(&m, "int4_blocks"),
                name(&m, "shape"),
                name(&m, "dequantized"),
            );
            let f32n = name(&m, "int4_blocks_f32");
            new_inits.push(tensor_raw(&qn, &[blocks, group as i64], INT4, pack_int4(&q)));
            let s16: Vec<u8> = scales.iter().flat_map(|s| half::f16::from_f32(*s).to_le_bytes()).collect();
            new_inits.push(tensor_raw(&sn, &[blocks], 10, s16));
            new_inits.push(tensor_raw(
                &shn,
                &[w.dims.len() as i64],
                7,
                w.dims.iter().flat_map(|d| d.to_le_bytes()).collect(),
            ));
            let mut dq =
                node("DequantizeLinear", &format!("{dqn}_node"), &[&qn, &sn], &[&dqn], vec![attr_int("axis", 0)]);
            dq.domain = Some("com.microsoft".into());
            new_nodes.push(dq);
            new_nodes.push(node("Cast", &format!("{f32n}_node"), &[&dqn], &[&f32n], vec![attr_int("to", 1)]));
            new_nodes.push(node("Reshape", &format!("{out}_node"), &[&f32n, &shn], &[&out], vec![]));
            rn.input[1] = out;
            int4_used = true;
            summary.int4_weights.push(n.name().to_string());
        } else {
            let axis = channel_axis(n, w.dims.len());
            let inner_a: usize = w.dims[axis + 1..].iter().product::<i64>() as usize;
            let ch = w.dims[axis] as usize;
            let (mut q, scales) = if wo.coded && !grouped {
                // A layer the gate finds too sensitive gets WIDER_CODED_BITS more on the same grid: plain int8 costs
                // up to 7.2 bits per weight once entropy-coded (EfficientNet-Lite0's classifier), 2 more bits quarter
                // the layer's noise twice for far less.
                let bits = cfg.coded_bits.get(n.name()).copied().unwrap_or(wo.bits)
                    + if wider { WIDER_CODED_BITS } else { 0.0 };
                let steps = coded_steps(&data, ch, &|i| (i / inner_a) % ch, bits);
                let q = data
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| (v / steps[(i / inner_a) % ch]).round().clamp(-127.0, 127.0) as i8);
                summary.coded_weights.push(n.name().to_string());
                (q.collect(), steps)
            } else {
                quantize_weights(&data, &w.dims, axis, false, None)
            };
            let refined = cfg
                .refiner
                .as_ref()
                .and_then(|r| r.refine(n.name(), &data, &|i| scales[(i / inner_a) % ch], -127, 127));
            if let Some(r) = &refined {
                q.clone_from(&r.q);
            }
            delta = refined.map(|r| r.bias_delta.clone());
            let (qn, sn, zn, out) =
                (name(&m, "quantized"), name(&m, "scale"), name(&m, "zero_point"), name(&m, "dequantized"));
            new_inits.push(tensor_raw(&qn, &w.dims, 3, q.iter().map(|&v| v as u8).collect()));
            new_inits.push(tensor_f32(&sn, &[ch as i64], &scales));
            new_inits.push(tensor_raw(&zn, &[ch as i64], 3, vec![0u8; ch]));
            new_nodes.push(node(
                "DequantizeLinear",
                &format!("{out}_node"),
                &[&qn, &sn, &zn],
                &[&out],
                vec![attr_int("axis", axis as i64)],
            ));
            rn.input[1] = out;
        }
        // Bias correction: the float bias absorbs the weights' mean error.
        if let Some(d) = delta.filter(|d| d.iter().any(|v| *v != 0.0)) {
            let beta = if n.op() == "Gemm" { n.attr_f("beta").unwrap_or(1.0) } else { 1.0 };
            let given = n.input.get(2).filter(|b| !b.is_empty()).and_then(|b| refs.get(b.as_str()));
            let base = given.and_then(|b| tensor_f32_values(b)).filter(|b| b.len() == d.len());
            let fits = n.op() != "MatMul" && beta != 0.0 && (given.is_none() || base.is_some());
            if fits {
                let mut bv: Vec<f32> = match base {
                    Some(b) => b.iter().zip(&d).map(|(b, d)| b + d / beta).collect(),
                    None => d.iter().map(|d| d / beta).collect(),
                };
                if wo.coded {
                    bv.iter_mut().for_each(|b| *b = short_mantissa(*b));
                }
                let bn = m.graph.unique_name(&format!("{}_bias_corrected", sanitize(n.name())));
                new_inits.push(tensor_f32(&bn, &[bv.len() as i64], &bv));
                rn.input.resize(rn.input.len().max(3), String::new());
                rn.input[2] = bn;
            }
        }
        m.graph.nodes[idx] = rn;
        summary.quantized_weights.push(n.name().to_string());
    }
    if int4_used && m.opset("com.microsoft").is_none() {
        m.set_opset("com.microsoft", 1);
    }
    m.graph.initializers.extend(new_inits);
    m.graph.nodes.extend(new_nodes);
    m.graph.topo_sort().map_err(|e| QdqError::Invalid(e.to_string()))?;
    m.graph.remove_unused_initializers();
    m.check().map_err(|e| QdqError::Invalid(e.to_string()))?;
    Ok((m, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_and_pack_low_nibble_first() {
        let w: Vec<f32> = (0..64).map(|i| ((i * 37) % 29) as f32 / 10.0 - 1.4).collect();
        let (q, s) = quantize_blocks(&w, 32);
        assert_eq!(s.len(), 2);
        for (i, (&qv, &wv)) in q.iter().zip(&w).enumerate() {
            assert!((-8..=7).contains(&qv));
            // Clipping may move the largest values by more than half a step, never the rest by more than one.
            assert!((qv as f32 * s[i / 32] - wv).abs() <= s[i / 32] * 1.5 + 0.2, "{i}");
        }
        assert_eq!(pack_int4(&[1, -1, 7, -8, 3]), vec![0xF1, 0x87, 0x03]);
    }

    /// The coded grid's steps give the asked entropy on every width, scale with each channel's RMS, and beat int4
    /// blocks' weight SQNR at 4 bits on Laplacian weights (the comparison `scripts/weight_grids.py` makes on real
    /// layers).
    #[test]
    fn coded_steps_meet_the_entropy_and_beat_int4_blocks() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut uniform = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        // 8 channels of 1152 Laplacian weights, channel c scaled by 2^c.
        let (ch, inner) = (8, 1152);
        let w: Vec<f32> = (0..ch * inner)
            .map(|i| {
                let (u, sign) = (uniform(), if uniform() < 0.5 { -1.0 } else { 1.0 });
                (sign * -(1.0 - u).ln() * 0.01 * 2f64.powi((i / inner) as i32)) as f32
            })
            .collect();
        let entropy = |steps: &[f32]| -> f64 {
            let mut hist = std::collections::HashMap::new();
            for (i, &v) in w.iter().enumerate() {
                *hist.entry((v / steps[i / inner]).round().clamp(-127.0, 127.0) as i32).or_insert(0usize) += 1;
            }
            hist.values().map(|&h| -(h as f64 / w.len() as f64) * (h as f64 / w.len() as f64).log2()).sum()
        };
        let sqnr = |dq: &dyn Fn(usize) -> f32| -> f64 {
            let (s, n) = w
                .iter()
                .enumerate()
                .fold((0f64, 0f64), |(s, n), (i, &v)| (s + f64::from(v).powi(2), n + f64::from(v - dq(i)).powi(2)));
            10.0 * (s / n).log10()
        };
        // Fractional rates too: the bundle's size is set between whole bits.
        for bits in [2.0, 3.0, 3.55, 4.0, 5.0, 6.0] {
            let steps = coded_steps(&w, ch, &|i| i / inner, bits);
            assert!((entropy(&steps) - bits).abs() < 0.05, "{bits}: {}", entropy(&steps));
            for c in 1..ch {
                assert!((steps[c] / steps[c - 1] - 2.0).abs() < 0.2, "{steps:?}");
            }
        }
        let steps = coded_steps(&w, ch, &|i| i / inner, 4.0);
        let coded = sqnr(&|i| (w[i] / steps[i / inner]).round().clamp(-127.0, 127.0) * steps[i / inner]);
        let (q, s) = quantize_blocks(&w, 32);
        let blocks = sqnr(&|i| f32::from(q[i]) * s[i / 32]);
        eprintln!(
            "weight SQNR at 4 bits: coded {coded:.1} dB, int4 blocks of 32 {blocks:.1} dB (4.5 bits with scales)"
        );
        assert!(coded > blocks + 2.0, "coded {coded:.1} dB, blocks {blocks:.1} dB");
    }

    /// Coded steps are bfloat16 values rounded up; biases keep 11 significant bits, to nearest.
    #[test]
    fn steps_and_biases_are_short_floats() {
        for x in [1e-6f32, 0.013, 0.5, 1.0, 3.7, 1e30] {
            let s = ceil_bf16(x);
            assert!(s >= x && s.to_bits() & 0xFFFF == 0 && (s - x) / x < 1.0 / 128.0, "{x} -> {s}");
            let b = short_mantissa(-x);
            assert!(b.to_bits() & 0x1FFF == 0 && ((b + x) / x).abs() <= 1.0 / 2048.0, "{x} -> {b}");
        }
        assert_eq!(ceil_bf16(0.5), 0.5);
        assert_eq!(ceil_bf16(f32::MAX), f32::MAX);
        assert!(short_mantissa(f32::NAN).is_nan() && short_mantissa(0.0) == 0.0);
        let w: Vec<f32> = (0..512).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.001).collect();
        assert!(coded_steps(&w, 4, &|i| i / 128, 4.0).iter().all(|s| s.to_bits() & 0xFFFF == 0));
    }

    /// The allocation keeps the average, gives the noisier layer (per weight) more bits, quarters-for-a-bit
    /// balances them (equal marginal noise where no bound binds), and respects the bounds.
    #[test]
    fn bits_go_where_the_noise_is_for_the_same_total() {
        let layers = vec![("a".to_string(), 1000, 1e-2), ("b".to_string(), 1000, 1e-3), ("c".to_string(), 2000, 0.0)];
        let b = allocate_bits(&layers, 4.0);
        let avg = (b["a"] * 1000.0 + b["b"] * 1000.0 + b["c"] * 2000.0) / 4000.0;
        assert!((avg - 4.0).abs() < 1e-6, "{b:?}");
        assert_eq!(b["c"], 3.0, "a layer with no measurable noise gets the floor: {b:?}");
        // a and b share 10 bits per pair of weights; a's noise is 10x b's: a gets ½·log2(10) ≈ 1.66 bits more.
        assert!((b["a"] - b["b"] - 0.5 * 10f64.log2()).abs() < 1e-6, "{b:?}");
        let b = allocate_bits(&[("x".to_string(), 10, 1.0), ("y".to_string(), 10_000_000, 1e-9)], 4.0);
        assert_eq!(b["x"], 6.0, "{b:?}");
        assert!(b["y"] >= 3.0 && b["y"] <= 4.0, "{b:?}");
    }
}
