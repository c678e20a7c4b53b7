//! Dynamic quantization, in onnxruntime's `quantize_dynamic` form: no calibration, activations quantized per call.
//! - MatMul / Gemm with a constant weight: `DynamicQuantizeLinear(x)` (uint8, scale and zero point of this call's
//!   range) → `MatMulInteger(x_q, W_q, x_zp, 0)` with int8 weights, symmetric per output column → `Cast` to float →
//!   `Mul` by `x_scale · w_scale[n]` (→ `Add` of the Gemm's bias). One `DynamicQuantizeLinear` per activation.
//! - LSTM / GRU / RNN: int8 weights (`W`, `R`; per gate row) stored behind a `DequantizeLinear`: the recurrence runs
//!   in float on 4× smaller weights (onnxruntime's own dynamic LSTM is a contrib op no other runtime reads).
//!
//! For transformers and recurrent models, where static activation ranges are poor (token embeddings, attention,
//! a state that drifts): each call's range is exact.
use std::collections::HashMap;

use edgepack_runtime::onnx::builder::{attr_int, tensor_f32, tensor_raw};
use edgepack_runtime::onnx::passes::tensor_f32_values;
use edgepack_runtime::onnx::{Model, NodeExt, NodeProto, TensorProto, node};

use crate::qdq::{QdqConfig, QdqError, QdqSummary, quantize_weights, sanitize};

/// The nodes the dynamic pass would quantize (name, op type), in graph order.
pub fn quantizable_nodes(model: &Model, cfg: &QdqConfig) -> Vec<(String, String)> {
    crate::qdq::nodes_taken(model, cfg, |n, inits| plan(n, inits).is_some())
}

/// What the pass does to one node, if anything.
enum Plan {
    /// MatMul/Gemm: the weight [K, N] after any transpose, the bias.
    Linear { w: Vec<f32>, k: usize, n: usize, bias: Option<Vec<f32>> },
    /// LSTM/GRU/RNN: the weight inputs (1 = W, 2 = R) to store as int8.
    Recurrent,
}

fn plan(n: &NodeProto, inits: &HashMap<&str, &TensorProto>) -> Option<Plan> {
    let weight = |i: usize| n.input.get(i).and_then(|w| inits.get(w.as_str())).copied();
    match n.op() {
        "MatMul" => {
            let w = weight(1)?;
            if w.dims.len() != 2 || inits.contains_key(n.input[0].as_str()) {
                return None;
            }
            let (k, nn) = (w.dims[0] as usize, w.dims[1] as usize);
            Some(Plan::Linear { w: tensor_f32_values(w)?, k, n: nn, bias: None })
        }
        "Gemm" => {
            let alpha = n.attr_f("alpha").unwrap_or(1.0);
            let beta = n.attr_f("beta").unwrap_or(1.0);
            if alpha != 1.0 || beta != 1.0 || n.attr_i("transA").unwrap_or(0) != 0 {
                return None;
            }
            let w = weight(1)?;
            if w.dims.len() != 2 {
                return None;
            }
            let v = tensor_f32_values(w)?;
            let (r, c) = (w.dims[0] as usize, w.dims[1] as usize);
            let (v, k, nn) = if n.attr_i("transB").unwrap_or(0) == 1 {
                let mut t = vec![0f32; v.len()];
                for i in 0..r {
                    for j in 0..c {
                        t[j * r + i] = v[i * c + j];
                    }
                }
                (t, c, r)
            } else {
                (v, r, c)
            };
            let bias = match n.input.get(2).filter(|b| !b.is_empty()) {
                None => None,
                Some(_) => Some(tensor_f32_values(weight(2)?).filter(|b| b.len() == nn)?),
            };
            Some(Plan::Linear { w: v, k, n: nn, bias })
        }
        "LSTM" | "GRU" | "RNN" => (weight(1).and_then(tensor_f32_values).is_some()
            && weight(2).and_then(tensor_f32_values).is_some())
        .then_some(Plan::Recurrent),
        _ => None,
    }
}

/// Applies the dynamic pass to every node [`quantizable_nodes`] lists (those `cfg` does not exclude).
pub fn quantize(model: &Model, cfg: &QdqConfig) -> Result<(Model, QdqSummary), QdqError> {
    let mut m = model.clone();
    let mut summary = QdqSummary::default();
    let init_refs = model.graph.initializers_by_name();
    let mut new_inits: Vec<TensorProto> = Vec::new();
    let mut new_nodes: Vec<NodeProto> = Vec::new();
    // One DynamicQuantizeLinear per activation: (x_q, x_scale, x_zero_point).
    let mut dql: HashMap<String, (String, String, String)> = HashMap::new();
    let mut replaced: Vec<usize> = Vec::new();
    for (idx, n) in model.graph.nodes.iter().enumerate() {
        if matches!(n.op(), "Conv" | "ConvTranspose") {
            summary.skipped.insert(
                n.name().to_string(),
                "dynamic quantization covers MatMul/Gemm and recurrent weights; stays fp32".into(),
            );
        }
        let Some(p) = plan(n, &init_refs) else { continue };
        if crate::qdq::is_excluded(cfg, n) {
            summary.excluded.push(n.name().to_string());
            continue;
        }
        let base = sanitize(n.name());
        match p {
            Plan::Linear { w, k, n: cols, bias } => {
                let x = n.input[0].clone();
                let (xq, xs, xz) = match dql.get(&x) {
                    Some(t) => t.clone(),
                    None => {
                        let b = sanitize(&x);
                        let t = (
                            m.graph.unique_name(&format!("{b}_dyn_quantized")),
                            m.graph.unique_name(&format!("{b}_dyn_scale")),
                            m.graph.unique_name(&format!("{b}_dyn_zero_point")),
                        );
                        new_nodes.push(node(
                            "DynamicQuantizeLinear",
                            &format!("{}_node", t.0),
                            &[&x],
                            &[&t.0, &t.1, &t.2],
                            vec![],
                        ));
                        dql.insert(x.clone(), t.clone());
                        t
                    }
                };
                // Per output column n of W[k, n]: symmetric int8 (axis 1 of [K, N]).
                let (q, scales) = quantize_weights(&w, &[k as i64, cols as i64], 1, cfg.per_tensor_weights, None);
                let scales: Vec<f32> = if scales.len() == 1 { vec![scales[0]; cols] } else { scales };
                let (wq, wz, ws) = (
                    m.graph.unique_name(&format!("{base}_W_quantized")),
                    m.graph.unique_name(&format!("{base}_W_zero_point")),
                    m.graph.unique_name(&format!("{base}_W_scale")),
                );
                new_inits.push(tensor_raw(&wq, &[k as i64, cols as i64], 3, q.iter().map(|&v| v as u8).collect()));
                new_inits.push(tensor_raw(&wz, &[], 3, vec![0]));
                new_inits.push(tensor_f32(&ws, &[cols as i64], &scales));
                let v = |s: &str| m.graph.unique_name(&format!("{base}_{s}"));
                let (acc, accf, sc, out) = (v("int32"), v("float"), v("scale"), v("scaled"));
                new_nodes.push(node("MatMulInteger", &format!("{acc}_node"), &[&xq, &wq, &xz, &wz], &[&acc], vec![]));
                new_nodes.push(node("Cast", &format!("{accf}_node"), &[&acc], &[&accf], vec![attr_int("to", 1)]));
                new_nodes.push(node("Mul", &format!("{sc}_node"), &[&xs, &ws], &[&sc], vec![]));
                let y = &n.output[0];
                match bias {
                    Some(b) => {
                        let bn = m.graph.unique_name(&format!("{base}_bias"));
                        new_inits.push(tensor_f32(&bn, &[cols as i64], &b));
                        new_nodes.push(node("Mul", &format!("{out}_node"), &[&accf, &sc], &[&out], vec![]));
                        new_nodes.push(node("Add", n.name(), &[&out, &bn], &[y], vec![]));
                    }
                    None => new_nodes.push(node("Mul", n.name(), &[&accf, &sc], &[y], vec![])),
                }
                replaced.push(idx);
                summary.quantized_weights.push(n.name().to_string());
            }
            Plan::Recurrent => {
                let mut rn = n.clone();
                for i in [1usize, 2] {
                    let t = init_refs[n.input[i].as_str()];
                    let vals = tensor_f32_values(t).unwrap_or_default();
                    if t.dims.len() != 3 {
                        continue;
                    }
                    // [directions, gates·hidden, in]: one scale per gate row (axis 1).
                    let (q, scales) = quantize_weights(&vals, &t.dims, 1, cfg.per_tensor_weights, None);
                    let wn = sanitize(t.name.as_deref().unwrap_or("w"));
                    let (qn, sn, zn, dq) = (
                        m.graph.unique_name(&format!("{wn}_quantized")),
                        m.graph.unique_name(&format!("{wn}_scale")),
                        m.graph.unique_name(&format!("{wn}_zero_point")),
                        m.graph.unique_name(&format!("{wn}_dequantized")),
                    );
                    let sdims: Vec<i64> = if cfg.per_tensor_weights { vec![] } else { vec![scales.len() as i64] };
                    new_inits.push(tensor_raw(&qn, &t.dims, 3, q.iter().map(|&v| v as u8).collect()));
                    new_inits.push(tensor_f32(&sn, &sdims, &scales));
                    new_inits.push(tensor_raw(&zn, &sdims, 3, vec![0u8; scales.len()]));
                    let attrs = if cfg.per_tensor_weights { vec![] } else { vec![attr_int("axis", 1)] };
                    new_nodes.push(node("DequantizeLinear", &format!("{dq}_node"), &[&qn, &sn, &zn], &[&dq], attrs));
                    rn.input[i] = dq;
                }
                m.graph.nodes[idx] = rn;
                summary.quantized_weights.push(n.name().to_string());
            }
        }
    }
    for idx in replaced.into_iter().rev() {
        m.graph.nodes.remove(idx);
    }
    m.graph.initializers.extend(new_inits);
    m.graph.nodes.extend(new_nodes);
    m.graph.topo_sort().map_err(|e| QdqError::Invalid(e.to_string()))?;
    m.graph.remove_unused_initializers();
    m.check().map_err(|e| QdqError::Invalid(e.to_string()))?;
    Ok((m, summary))
}
