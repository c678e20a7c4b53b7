//! GPU backend: the shared ONNX graph interpreted on wgpu (Vulkan, Metal, DX12) through burn's cubecl backend.
//!
//! Load: graph passes (Constant → initializer, BatchNorm folded into Conv), then a **plan** per concrete input
//! shapes: the graph is walked once; a node whose inputs are all known on the host (initializers, shapes of
//! device values, results of such nodes) is folded on the host by the CPU backend, the rest become device
//! steps. That first walk executes every device step, so it also compiles every shader (warm-up at load).
//! Runs replay the steps only; each device value is dropped after its last use and burn's memory pool reuses
//! the buffers between runs. When every step of a plan is something edgepack's own kernels cover, the plan is
//! compiled once more into a fused program (`fused`): a few dozen dispatches with fused epilogues, buffers
//! assigned by liveness, one submission per run; the step-by-step path above stays for the rest (and for
//! requests of intermediate values, profiling aside).
//!
//! INT8 QDQ models: a DequantizeLinear of an int8 initializer stays int8 on the device (burn's Q8S, four values
//! per u32: a quarter of the f32 upload and resident bytes) and is dequantized on the GPU each run, its
//! per-channel scale applied there. At f32 (the default) the QDQ patterns are first rewritten to the integer
//! arithmetic of the CPU backend and onnxruntime (`qdq_lower`, for an f32 device): integer-valued floats are
//! exact, the requantization is one f32 multiply, QLinearAdd a table lookup, so the quantized activations equal
//! the CPU's.
//!
//! `EDGEPACK_GPU_PRECISION=f16` (adapters with `shader-f16`, opt-in): fused programs store every float activation
//! (and 8-bit or boolean value, which f16 holds exactly) as f16 and compute in f32: half the activation bytes read
//! and written, one rounding per stored value. Plans that are not fused compute in f16 on burn. INT8 models keep
//! the integer lowering: only their quantized activations are stored as f16 (exactly), and plans that are not fused
//! run in f32, so their results are the f32 ones, bit for bit.
mod device;
mod fused;
mod ops;
mod plan;

pub use device::{AdapterInfo, adapter, device_started};
pub use fused::{TuneSource, Tuned};
pub use ops::SUPPORTED_OPS;
pub use plan::GpuBackend;

use edgepack_onnx::{Model, NodeExt};

/// Compute precision on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        })
    }
}

/// First node the GPU backend cannot run: (op, domain, node). It runs the ops of its table (default domain), and
/// any other default-domain op whose inputs are all known on the host once the input shapes are (computed from
/// initializers, constants and `Shape`/`Size` of anything, never from a graph input's values): the plan folds
/// those on the host's CPU backend, like the anchors a dynamic-axes YOLO export makes with `Range` from its
/// feature maps' shapes.
pub fn unsupported_op(model: &Model) -> Option<(String, String, String)> {
    let g = &model.graph;
    let mut known: std::collections::HashSet<&str> = g.initializers.iter().filter_map(|t| t.name.as_deref()).collect();
    known.insert("");
    g.nodes.iter().find_map(|n| {
        let domain = n.domain_name();
        let default = domain.is_empty() || domain == "ai.onnx";
        let host = default
            && !matches!(n.op(), "RandomNormal" | "RandomUniform" | "If" | "Loop" | "Scan")
            && (matches!(n.op(), "Shape" | "Size") || n.input.iter().all(|i| known.contains(i.as_str())));
        if host {
            known.extend(n.output.iter().map(String::as_str));
        }
        let ok = default && (host || SUPPORTED_OPS.contains(&n.op()));
        (!ok).then(|| (n.op().to_string(), domain.to_string(), n.name().to_string()))
    })
}

/// True when the graph holds QDQ weights (an int8/uint8 initializer feeding a DequantizeLinear).
pub fn has_int8_weights(model: &Model) -> bool {
    model.graph.nodes.iter().any(|n| {
        n.op() == "DequantizeLinear"
            && n.input
                .first()
                .and_then(|x| model.graph.initializer(x))
                .is_some_and(|t| matches!(t.data_type, Some(2 | 3)))
    })
}
