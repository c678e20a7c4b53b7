//! int8 activations onto the uint8 kernels: a `QuantizeLinear → DequantizeLinear` pair of an activation with an
//! int8 zero point `z` is the same real-valued map as the pair with the uint8 zero point `z + 128` (every integer
//! shifts by 128, the clamp range with it: `clamp(round(x/s) + z, −128, 127) + 128 = clamp(round(x/s) + z + 128,
//! 0, 255)`), so rewriting the pair changes no value and lets onnxruntime's S8S8 files (`edgepack quantize
//! --activation-type s8`) run on the uint8 integer kernels. Weights (int8 initializers behind their own
//! `DequantizeLinear`) are untouched.
use std::collections::HashMap;

use edgepack_onnx::builder::tensor_raw;
use edgepack_onnx::{Graph, NodeExt, TensorProto};

/// The scalar int8 value of a zero-point initializer.
fn int8_scalar(t: &TensorProto) -> Option<i8> {
    if t.data_type != Some(3) || t.dims.iter().product::<i64>() != 1 {
        return None;
    }
    match &t.raw_data {
        Some(raw) if raw.len() == 1 => Some(raw[0] as i8),
        Some(_) => None,
        None => t.int32_data.first().map(|&v| v as i8),
    }
}

/// Rewrites every activation QDQ pair with a per-tensor int8 zero point whose quantized value only feeds
/// `DequantizeLinear` nodes with the same scale and zero point into its uint8 twin. Returns how many
/// `QuantizeLinear` nodes changed.
pub fn signed_activations_to_unsigned(g: &mut Graph) -> usize {
    let mut twins: HashMap<String, String> = HashMap::new();
    let mut changed = 0;
    for qi in 0..g.nodes.len() {
        let q = &g.nodes[qi];
        if q.op() != "QuantizeLinear" || !q.domain_name().is_empty() || q.input.len() < 3 {
            continue;
        }
        let (x, scale, zp) = (&q.input[0], &q.input[1], &q.input[2]);
        if g.initializer(x).is_some() || g.initializer(scale).is_none() {
            continue;
        }
        let Some(z) = g.initializer(zp).and_then(int8_scalar) else { continue };
        let Some(out) = q.output.first().filter(|o| !o.is_empty()).cloned() else { continue };
        if g.outputs.iter().any(|o| o.name.as_deref() == Some(out.as_str())) {
            continue;
        }
        let readers = g.consumers(&out);
        let pairs = !readers.is_empty()
            && readers.iter().all(|&r| {
                let d = &g.nodes[r];
                d.op() == "DequantizeLinear"
                    && d.domain_name().is_empty()
                    && d.input.first() == Some(&out)
                    && d.input.get(1) == Some(scale)
                    && d.input.get(2) == Some(zp)
            });
        if !pairs {
            continue;
        }
        let zp = zp.clone();
        let twin = match twins.get(&zp) {
            Some(t) => t.clone(),
            None => {
                let name = g.unique_name(&format!("{zp}_uint8"));
                g.initializers.push(tensor_raw(&name, &[], 2, vec![(z as i16 + 128) as u8]));
                twins.insert(zp, name.clone());
                name
            }
        };
        g.nodes[qi].input[2] = twin.clone();
        for r in readers {
            g.nodes[r].input[2] = twin.clone();
        }
        changed += 1;
    }
    if changed > 0 {
        g.remove_unused_initializers();
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgepack_onnx::builder::{attr_int, model, tensor_f32, value_info};
    use edgepack_onnx::{Dim, node};

    #[test]
    fn int8_activation_pairs_become_uint8_and_weights_stay() {
        let mut m = model(
            vec![
                node("QuantizeLinear", "q", &["x", "s", "z"], &["xq"], vec![]),
                node("DequantizeLinear", "dq", &["xq", "s", "z"], &["xd"], vec![]),
                node("DequantizeLinear", "wdq", &["w", "ws", "wz"], &["wd"], vec![attr_int("axis", 0)]),
                node("MatMul", "mm", &["xd", "wd"], &["y"], vec![]),
                // A pair whose quantized value is also a graph output stays as it is.
                node("QuantizeLinear", "q2", &["y", "s", "z"], &["yq"], vec![]),
            ],
            vec![value_info("x", 1, &[Dim::Fixed(1), Dim::Fixed(2)])],
            vec![value_info("yq", 3, &[Dim::Fixed(1), Dim::Fixed(2)])],
            vec![
                tensor_f32("s", &[], &[0.1]),
                tensor_raw("z", &[], 3, vec![(-5i8) as u8]),
                tensor_raw("w", &[2, 2], 3, vec![1, 2, 3, 4]),
                tensor_f32("ws", &[2], &[0.5, 0.5]),
                tensor_raw("wz", &[2], 3, vec![0, 0]),
            ],
        );
        assert_eq!(signed_activations_to_unsigned(&mut m.graph), 1);
        let zq = m.graph.nodes[0].input[2].clone();
        assert_eq!(m.graph.nodes[1].input[2], zq);
        let t = m.graph.initializer(&zq).unwrap();
        assert_eq!((t.data_type, t.raw_data.clone()), (Some(2), Some(vec![123])));
        assert_eq!(m.graph.nodes[2].input[2], "wz", "weights keep their int8 zero point");
        assert_eq!(m.graph.nodes[4].input[2], "z", "a quantized graph output keeps its type");
        m.check().unwrap();
    }
}
