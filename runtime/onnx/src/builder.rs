//! Helpers to build small ONNX graphs in code: initializers from data, typed value infos, whole models.
//! Used by passes that insert tensors and by tests that need a model without files.
use super::proto::{self, tensor_shape_proto::Dimension, tensor_shape_proto::dimension::Value as DimValue, type_proto};
use super::{
    AttributeProto, Dim, GraphProto, Model, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TypeProto,
    ValueInfoProto,
};

/// An f32 initializer stored as raw little-endian bytes.
pub fn tensor_f32(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(1),
        raw_data: Some(data.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// An initializer of any element type from its little-endian bytes (`data_type`: ONNX type code).
pub fn tensor_raw(name: &str, dims: &[i64], data_type: i32, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(data_type),
        raw_data: Some(raw),
        ..Default::default()
    }
}

/// An i64 initializer (shapes, axes).
pub fn tensor_i64(name: &str, dims: &[i64], data: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(7),
        raw_data: Some(data.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// A tensor value info with element type code and dims.
pub fn value_info(name: &str, elem_type: i32, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => DimValue::DimValue(*n as i64),
                Dim::Symbolic(s) => DimValue::DimParam(s.clone()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem_type),
                shape: Some(proto::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(7), ints: v.to_vec(), ..Default::default() }
}

pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(2), i: Some(v), ..Default::default() }
}

pub fn attr_tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(4), t: Some(t), ..Default::default() }
}

pub fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(1), f: Some(v), ..Default::default() }
}

pub fn attr_string(name: &str, v: &str) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(3), s: Some(v.as_bytes().to_vec()), ..Default::default() }
}

pub fn attr_floats(name: &str, v: &[f32]) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(6), floats: v.to_vec(), ..Default::default() }
}

/// Assembles a model (default opset 13, IR 7).
pub fn model(
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    initializers: Vec<TensorProto>,
) -> Model {
    let proto = ModelProto {
        ir_version: Some(7),
        producer_name: Some("edgepack".into()),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(13) }],
        graph: Some(GraphProto {
            name: Some("g".into()),
            node: nodes,
            input: inputs,
            output: outputs,
            initializer: initializers,
            ..Default::default()
        }),
        ..Default::default()
    };
    Model::from_proto(proto).expect("graph present")
}

/// A tiny classifier for tests: `x[N,4] -> Gemm(W[3,4]^T, b) -> Relu -> y[N,3]`, batch symbolic.
pub fn tiny_classifier() -> Model {
    let w: Vec<f32> = (0..12).map(|i| (i as f32 - 6.0) / 4.0).collect();
    model(
        vec![
            super::node("Gemm", "fc", &["x", "W", "b"], &["h"], vec![attr_int("transB", 1)]),
            super::node("Relu", "relu", &["h"], &["y"], vec![]),
        ],
        vec![value_info("x", 1, &[Dim::Symbolic("N".into()), Dim::Fixed(4)])],
        vec![value_info("y", 1, &[Dim::Symbolic("N".into()), Dim::Fixed(3)])],
        vec![tensor_f32("W", &[3, 4], &w), tensor_f32("b", &[3], &[0.1, -0.2, 0.3])],
    )
}
