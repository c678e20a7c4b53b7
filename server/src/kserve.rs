//! The KServe v2 / Open Inference Protocol wire format: JSON tensors (flat or nested `data`), the binary tensor
//! extension (`Inference-Header-Content-Length`, `binary_data_size`, `binary_data`), and their conversion to and
//! from runtime tensors. Every malformed request is an [`ApiError`] with a 4xx status, never a panic.

pub use edgepack_runtime::kserve::Flat;
use edgepack_runtime::kserve::{tensor_data_json as data_json, tensor_from_scalars};
use edgepack_runtime::{DType, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::error::ApiError;

/// The header that carries the JSON part's length when binary tensor data follows it.
pub const HEADER_LEN: &str = "inference-header-content-length";

/// The JSON part's length from [`HEADER_LEN`] (None: the body is all JSON).
pub fn json_len(headers: &axum::http::HeaderMap) -> Result<Option<usize>, ApiError> {
    match headers.get(HEADER_LEN) {
        None => Ok(None),
        Some(h) => h
            .to_str()
            .ok()
            .and_then(|x| x.parse::<usize>().ok())
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("invalid {HEADER_LEN} header"))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferRequest {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
    pub inputs: Vec<InputTensor>,
    #[serde(default)]
    pub outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
    #[serde(default)]
    pub data: Option<Flat>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestedOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
}

fn param_bool(p: &Option<Map<String, Value>>, key: &str) -> bool {
    p.as_ref().and_then(|m| m.get(key)).and_then(Value::as_bool).unwrap_or(false)
}

fn param_u64(p: &Option<Map<String, Value>>, key: &str) -> Option<u64> {
    p.as_ref().and_then(|m| m.get(key)).and_then(Value::as_u64)
}

/// An output a request asks for: its name, whether it comes back as binary data, and `classification` (KServe's
/// output parameter: the top `k` classes as `"score:index[:label]"` strings instead of the tensor; 0: the tensor).
#[derive(Debug, Clone)]
pub struct Wanted {
    pub name: String,
    pub binary: bool,
    pub classification: usize,
}

/// A parsed request: named input tensors, the outputs asked for (all when empty) and how to return them.
#[derive(Debug)]
pub struct Request {
    pub id: Option<String>,
    pub inputs: Vec<(String, Tensor)>,
    pub outputs: Vec<Wanted>,
    pub binary_default: bool,
    /// Triton's `timeout` parameter, in microseconds.
    pub timeout_us: Option<u64>,
}

/// Parses a request body: JSON, or JSON followed by binary tensor data when `json_len` (the
/// `Inference-Header-Content-Length` header) is given.
pub fn parse_request(body: &[u8], json_len: Option<usize>) -> Result<Request, ApiError> {
    let (head, mut binary) = match json_len {
        Some(n) if n <= body.len() => body.split_at(n),
        Some(n) => {
            return Err(ApiError::bad_request(format!("{HEADER_LEN} is {n} but the body has {} bytes", body.len())));
        }
        None => (body, &[][..]),
    };
    let req: InferRequest =
        serde_json::from_slice(head).map_err(|e| ApiError::bad_request(format!("invalid inference request: {e}")))?;
    if req.inputs.is_empty() {
        return Err(ApiError::bad_request("the request has no inputs"));
    }
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for t in req.inputs {
        let dt = DType::from_kserve_name(&t.datatype).ok_or_else(|| {
            ApiError::bad_request(format!("input `{}`: unsupported datatype `{}`", t.name, t.datatype))
        })?;
        if t.shape.iter().any(|&d| d < 0) {
            return Err(ApiError::bad_request(format!("input `{}`: negative dimension in {:?}", t.name, t.shape)));
        }
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| ApiError::bad_request(format!("input `{}`: shape {:?} overflows", t.name, t.shape)))?;
        let tensor = match (param_u64(&t.parameters, "binary_data_size"), t.data) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(format!("input `{}`: both data and binary_data_size", t.name)));
            }
            (Some(size), None) => {
                let size = size as usize;
                if size > binary.len() {
                    return Err(ApiError::bad_request(format!(
                        "input `{}`: binary_data_size {size} but only {} binary bytes remain",
                        t.name,
                        binary.len()
                    )));
                }
                if Some(size) != n.checked_mul(dt.size()) {
                    return Err(ApiError::bad_request(format!(
                        "input `{}`: {size} bytes of binary data for shape {:?} of {}",
                        t.name, t.shape, t.datatype
                    )));
                }
                let (bytes, rest) = binary.split_at(size);
                binary = rest;
                Tensor::from_le_bytes(dt, shape, bytes)
                    .map_err(|e| ApiError::bad_request(format!("input `{}`: {e}", t.name)))?
            }
            (None, Some(Flat(v))) => {
                if v.len() != n {
                    return Err(ApiError::bad_request(format!(
                        "input `{}`: {} values for shape {:?} ({n} expected)",
                        t.name,
                        v.len(),
                        t.shape
                    )));
                }
                tensor_from_scalars(dt, shape, &v)
                    .map_err(|e| ApiError::bad_request(format!("input `{}`: {e}", t.name)))?
            }
            (None, None) => return Err(ApiError::bad_request(format!("input `{}` has no data", t.name))),
        };
        inputs.push((t.name, tensor));
    }
    if !binary.is_empty() {
        return Err(ApiError::bad_request(format!("{} bytes of binary data no input claims", binary.len())));
    }
    let binary_default = param_bool(&req.parameters, "binary_data_output");
    let outputs = req
        .outputs
        .unwrap_or_default()
        .into_iter()
        .map(|o| {
            let binary = o
                .parameters
                .as_ref()
                .and_then(|m| m.get("binary_data"))
                .and_then(Value::as_bool)
                .unwrap_or(binary_default);
            let classification = match o.parameters.as_ref().and_then(|m| m.get("classification")) {
                None => 0,
                Some(v) => v.as_u64().filter(|&k| (1..=1_000_000).contains(&k)).ok_or_else(|| {
                    ApiError::bad_request(format!("output `{}`: classification must be a positive integer", o.name))
                })? as usize,
            };
            Ok(Wanted { name: o.name, binary, classification })
        })
        .collect::<Result<_, ApiError>>()?;
    let timeout_us = param_u64(&req.parameters, "timeout");
    Ok(Request { id: req.id, inputs, outputs, binary_default, timeout_us })
}

#[derive(Debug, Serialize)]
struct OutputJson {
    name: String,
    datatype: &'static str,
    shape: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Value>,
}

/// A response body and, when any output is binary, the JSON part's length for `Inference-Header-Content-Length`.
pub struct Response {
    pub body: Vec<u8>,
    pub json_len: Option<usize>,
}

/// An output as the protocols return it: a tensor, or the strings of a `classification` request (a BYTES tensor).
#[derive(Debug, Clone, PartialEq)]
pub enum OutValue {
    Tensor(Tensor),
    Strings { shape: Vec<usize>, values: Vec<String> },
}

impl OutValue {
    pub fn datatype(&self) -> &'static str {
        match self {
            OutValue::Tensor(t) => t.dtype().kserve_name(),
            OutValue::Strings { .. } => "BYTES",
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            OutValue::Tensor(t) => t.shape(),
            OutValue::Strings { shape, .. } => shape,
        }
    }

    /// The binary form: little-endian elements, or BYTES as each string's u32 length then its bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            OutValue::Tensor(t) => t.to_le_bytes(),
            OutValue::Strings { values, .. } => {
                let mut b = Vec::with_capacity(values.iter().map(|v| v.len() + 4).sum());
                for v in values {
                    b.extend_from_slice(&(v.len() as u32).to_le_bytes());
                    b.extend_from_slice(v.as_bytes());
                }
                b
            }
        }
    }

    fn data_json(&self) -> Value {
        match self {
            OutValue::Tensor(t) => data_json(t),
            OutValue::Strings { values, .. } => json!(values),
        }
    }
}

/// The top `k` classes of every row of `t` (the last axis holds the classes) as KServe's classification strings
/// `"score:index"`, or `"score:index:label"` when `labels` (shifted by `label_offset`) name the index.
pub fn classification(
    t: &Tensor,
    k: usize,
    labels: Option<&[String]>,
    label_offset: usize,
) -> Result<OutValue, ApiError> {
    let classes = t.shape().last().copied().unwrap_or(0);
    if t.shape().is_empty() || classes == 0 {
        return Err(ApiError::bad_request(format!(
            "classification needs an output with classes, not shape {:?}",
            t.shape()
        )));
    }
    let k = k.min(classes);
    let v = t.to_f32_vec();
    let mut values = Vec::with_capacity(v.len() / classes * k);
    for row in v.chunks(classes) {
        let mut idx: Vec<usize> = (0..classes).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &i in &idx[..k] {
            let label = i.checked_sub(label_offset).and_then(|j| labels.and_then(|l| l.get(j)));
            values.push(match label {
                Some(l) => format!("{:.6}:{i}:{l}", row[i]),
                None => format!("{:.6}:{i}", row[i]),
            });
        }
    }
    let mut shape = t.shape().to_vec();
    *shape.last_mut().unwrap_or(&mut 0) = k;
    Ok(OutValue::Strings { shape, values })
}

/// Builds the response for `outputs` (already filtered to the requested ones, in order; the flag: binary).
pub fn response(model: &str, version: &str, id: Option<&str>, outputs: &[(String, OutValue, bool)]) -> Response {
    let mut binary = Vec::new();
    let outs: Vec<OutputJson> = outputs
        .iter()
        .map(|(name, t, bin)| {
            let (parameters, data) = if *bin {
                let bytes = t.to_bytes();
                let p = json!({ "binary_data_size": bytes.len() });
                binary.extend_from_slice(&bytes);
                (Some(p), None)
            } else {
                (None, Some(t.data_json()))
            };
            OutputJson { name: name.clone(), datatype: t.datatype(), shape: t.shape().to_vec(), parameters, data }
        })
        .collect();
    let mut head = json!({ "model_name": model, "model_version": version, "outputs": outs });
    if let Some(id) = id {
        head["id"] = json!(id);
    }
    let mut body = serde_json::to_vec(&head).unwrap_or_default();
    if outputs.iter().any(|o| o.2) {
        let n = body.len();
        body.extend_from_slice(&binary);
        Response { body, json_len: Some(n) }
    } else {
        Response { body, json_len: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgepack_runtime::TensorData;

    #[test]
    fn nested_and_flat_json_tensors_parse_alike() {
        let flat = br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2.5,3,4]}]}"#;
        let nested = br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2.5],[3,4]]}]}"#;
        let a = parse_request(flat, None).unwrap();
        let b = parse_request(nested, None).unwrap();
        assert_eq!(a.inputs[0].1, b.inputs[0].1);
        assert_eq!(a.inputs[0].1.to_f32_vec(), vec![1.0, 2.5, 3.0, 4.0]);
    }

    #[test]
    fn integers_stay_exact_and_ranges_are_checked() {
        let r = parse_request(
            br#"{"inputs":[{"name":"x","shape":[2],"datatype":"INT64","data":[9007199254740993,-1]}]}"#,
            None,
        )
        .unwrap();
        assert_eq!(r.inputs[0].1.data(), &TensorData::I64(vec![9007199254740993, -1]));
        let e = parse_request(br#"{"inputs":[{"name":"x","shape":[1],"datatype":"UINT8","data":[256]}]}"#, None);
        assert_eq!(e.unwrap_err().status.as_u16(), 400);
    }

    #[test]
    fn binary_extension_round_trip() {
        let head = br#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","parameters":{"binary_data_size":12}}],"parameters":{"binary_data_output":true}}"#;
        let mut body = head.to_vec();
        for v in [1.0f32, -2.0, 0.5] {
            body.extend(v.to_le_bytes());
        }
        let r = parse_request(&body, Some(head.len())).unwrap();
        assert_eq!(r.inputs[0].1.to_f32_vec(), vec![1.0, -2.0, 0.5]);
        assert!(r.binary_default);
        // Wrong sizes are client errors.
        assert!(parse_request(&body[..body.len() - 1], Some(head.len())).is_err());
        assert!(parse_request(&body, Some(body.len() + 1)).is_err());
        let t = r.inputs[0].1.clone();
        let resp = response("m", "1", Some("a"), &[("y".into(), OutValue::Tensor(t), true)]);
        let n = resp.json_len.unwrap();
        let v: Value = serde_json::from_slice(&resp.body[..n]).unwrap();
        assert_eq!(v["outputs"][0]["parameters"]["binary_data_size"], 12);
        assert_eq!(resp.body.len(), n + 12);
    }

    #[test]
    fn classification_strings_rank_each_row() {
        let t = Tensor::new(vec![2, 3], TensorData::F32(vec![0.1, 0.7, 0.2, 3.0, -1.0, 2.0])).unwrap();
        let labels = ["bg".to_string(), "cat".into(), "dog".into()];
        let OutValue::Strings { shape, values } = classification(&t, 2, Some(&labels[1..]), 1).unwrap() else {
            panic!("strings expected")
        };
        assert_eq!(shape, vec![2, 2]);
        assert_eq!(values, ["0.700000:1:cat", "0.200000:2:dog", "3.000000:0", "2.000000:2:dog"]);
        let bytes = OutValue::Strings { shape: vec![1], values: vec!["ab".into()] }.to_bytes();
        assert_eq!(bytes, [2, 0, 0, 0, b'a', b'b']);
        let r = parse_request(
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}],"outputs":[{"name":"y","parameters":{"classification":3}}]}"#,
            None,
        )
        .unwrap();
        assert_eq!(r.outputs[0].classification, 3);
        let bad = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}],"outputs":[{"name":"y","parameters":{"classification":-1}}]}"#;
        assert_eq!(parse_request(bad, None).unwrap_err().status.as_u16(), 400);
    }

    #[test]
    fn malformed_requests_are_client_errors() {
        for body in [
            &b"{"[..],
            br#"{"inputs":[]}"#,
            br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1]}]}"#,
            br#"{"inputs":[{"name":"x","shape":[-1],"datatype":"FP32","data":[1]}]}"#,
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":["a"]}]}"#,
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#,
            br#"{"inputs":[{"name":"x","shape":[4294967296,4294967296,4294967296],"datatype":"FP32","data":[1]}]}"#,
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}],"bogus":1}"#,
        ] {
            let e = parse_request(body, None).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{}", String::from_utf8_lossy(body));
        }
    }
}

#[cfg(test)]
mod speed {
    /// `cargo test --release -p edgepack-server -- --ignored --nocapture json_parse_speed`: JSON parse cost of an
    /// ImageNet-sized request (informative; the load benchmark is `benches/peers/serve_load.py`).
    #[test]
    #[ignore]
    fn json_parse_speed() {
        let data: Vec<f32> = (0..3 * 224 * 224).map(|i| ((i * 7919) % 1000) as f32 / 997.0 - 0.5).collect();
        let body = serde_json::to_vec(&serde_json::json!({"inputs": [{"name": "x", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": data}]})).unwrap();
        let t = std::time::Instant::now();
        let n = 20;
        for _ in 0..n {
            super::parse_request(&body, None).unwrap();
        }
        eprintln!(
            "{} KiB JSON request: {:.2} ms per parse",
            body.len() / 1024,
            t.elapsed().as_secs_f64() * 1000.0 / n as f64
        );
    }
}
