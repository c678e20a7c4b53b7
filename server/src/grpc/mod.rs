//! KServe v2 over gRPC (`--grpc-addr`): `inference.GRPCInferenceService` from `server/proto/inference.proto` on
//! tonic, with Triton's model configuration and repository extensions. Every RPC goes through the same code as its
//! HTTP twin (routing by the A/B key in the request metadata, input checks before queueing, batching, shadowing,
//! deadlines from `grpc-timeout` or the `timeout` parameter, metrics with `endpoint="grpc_infer"`), and errors map to
//! gRPC codes: INVALID_ARGUMENT for bad tensors, NOT_FOUND, UNAVAILABLE (with the reason a version failed to
//! load), RESOURCE_EXHAUSTED for a full queue, DEADLINE_EXCEEDED.
#[allow(clippy::all, clippy::pedantic)]
mod proto;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use edgepack_runtime::kserve::{Scalar, tensor_from_scalars};
use edgepack_runtime::{DType, Tensor};
use proto::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use proto::*;
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::kserve::Wanted;
use crate::{AppState, TensorMeta};

/// Serves gRPC on `listener` until `stop` resolves, then finishes the calls in flight.
pub(crate) async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let limit = state.opts.max_body_bytes;
    let svc = GrpcInferenceServiceServer::new(Grpc { s: state })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    // Tensors are large messages: no Nagle delay on the replies, and HTTP/2 windows that let a request of a few
    // MiB arrive without a round trip per 64 KiB (the defaults held a 600 KiB request for ~45 ms on loopback).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, stop)
        .await
}

struct Grpc {
    s: Arc<AppState>,
}

/// The gRPC status of an API error.
fn status(e: &ApiError) -> Status {
    let code = match e.status {
        StatusCode::BAD_REQUEST => tonic::Code::InvalidArgument,
        StatusCode::NOT_FOUND => tonic::Code::NotFound,
        StatusCode::PAYLOAD_TOO_LARGE => tonic::Code::ResourceExhausted,
        StatusCode::SERVICE_UNAVAILABLE if e.exhausted => tonic::Code::ResourceExhausted,
        StatusCode::SERVICE_UNAVAILABLE => tonic::Code::Unavailable,
        StatusCode::GATEWAY_TIMEOUT => tonic::Code::DeadlineExceeded,
        StatusCode::INTERNAL_SERVER_ERROR => tonic::Code::Internal,
        _ => tonic::Code::Unknown,
    };
    Status::new(code, e.message.clone())
}

fn version_arg(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

fn tensor_metadata(t: &[TensorMeta]) -> Vec<model_metadata_response::TensorMetadata> {
    t.iter()
        .map(|t| model_metadata_response::TensorMetadata {
            name: t.name.clone(),
            datatype: t.datatype.to_string(),
            shape: t.shape.clone(),
        })
        .collect()
}

fn data_type(kserve: &str) -> i32 {
    (match kserve {
        "BOOL" => DataType::TypeBool,
        "UINT8" => DataType::TypeUint8,
        "UINT16" => DataType::TypeUint16,
        "UINT32" => DataType::TypeUint32,
        "UINT64" => DataType::TypeUint64,
        "INT8" => DataType::TypeInt8,
        "INT16" => DataType::TypeInt16,
        "INT32" => DataType::TypeInt32,
        "INT64" => DataType::TypeInt64,
        "FP16" => DataType::TypeFp16,
        "FP32" => DataType::TypeFp32,
        "FP64" => DataType::TypeFp64,
        "BYTES" => DataType::TypeString,
        _ => DataType::TypeInvalid,
    }) as i32
}

/// `grpc-timeout` (`<digits><H|M|S|m|u|n>`), as gRPC clients send their deadline.
fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn param_u64(p: &InferParameter) -> Option<u64> {
    match p.parameter_choice {
        Some(infer_parameter::ParameterChoice::Int64Param(v)) => u64::try_from(v).ok(),
        Some(infer_parameter::ParameterChoice::Uint64Param(v)) => Some(v),
        _ => None,
    }
}

/// The request's input tensors: raw little-endian contents (one per input, in order) or typed contents.
fn inputs(req: &mut ModelInferRequest) -> Result<Vec<(String, Tensor)>, ApiError> {
    if req.inputs.is_empty() {
        return Err(ApiError::bad_request("the request has no inputs"));
    }
    let raw = std::mem::take(&mut req.raw_input_contents);
    if !raw.is_empty() && raw.len() != req.inputs.len() {
        return Err(ApiError::bad_request(format!(
            "{} raw_input_contents for {} inputs (one each, in order)",
            raw.len(),
            req.inputs.len()
        )));
    }
    let mut out = Vec::with_capacity(req.inputs.len());
    for (i, t) in req.inputs.iter_mut().enumerate() {
        let bad = |m: String| ApiError::bad_request(format!("input `{}`: {m}", t.name));
        let dt = DType::from_kserve_name(&t.datatype)
            .ok_or_else(|| bad(format!("unsupported datatype `{}`", t.datatype)))?;
        if t.shape.iter().any(|&d| d < 0) {
            return Err(bad(format!("negative dimension in {:?}", t.shape)));
        }
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| bad("shape overflows".into()))?;
        let tensor = match (raw.get(i), t.contents.take()) {
            (Some(_), Some(_)) => return Err(bad("both contents and raw_input_contents".into())),
            (Some(bytes), None) => {
                if Some(bytes.len()) != n.checked_mul(dt.size()) {
                    return Err(bad(format!("{} raw bytes for shape {:?} of {}", bytes.len(), t.shape, t.datatype)));
                }
                Tensor::from_le_bytes(dt, shape, bytes).map_err(|e| bad(e.to_string()))?
            }
            (None, Some(c)) => {
                let v: Vec<Scalar> = match dt {
                    DType::F32 => c.fp32_contents.iter().map(|&x| Scalar::F(x as f64)).collect(),
                    DType::F64 => c.fp64_contents.iter().map(|&x| Scalar::F(x)).collect(),
                    DType::I8 | DType::I16 | DType::I32 => {
                        c.int_contents.iter().map(|&x| Scalar::I(x as i64)).collect()
                    }
                    DType::I64 => c.int64_contents.iter().map(|&x| Scalar::I(x)).collect(),
                    DType::U8 | DType::U16 | DType::U32 => {
                        c.uint_contents.iter().map(|&x| Scalar::U(x as u64)).collect()
                    }
                    DType::U64 => c.uint64_contents.iter().map(|&x| Scalar::U(x)).collect(),
                    DType::Bool => c.bool_contents.iter().map(|&x| Scalar::B(x)).collect(),
                    DType::F16 => return Err(bad("FP16 data travels as raw_input_contents only".into())),
                };
                if v.len() != n {
                    return Err(bad(format!("{} values for shape {:?} ({n} expected)", v.len(), t.shape)));
                }
                tensor_from_scalars(dt, shape, &v).map_err(bad)?
            }
            (None, None) => return Err(bad("no data".into())),
        };
        out.push((t.name.clone(), tensor));
    }
    Ok(out)
}

/// A serialized `ModelInferRequest` through the same decoding as the RPC (the fuzz targets' entry, see
/// [`crate::fuzzing`]): how many input tensors and requested outputs it holds.
pub(crate) fn decode_infer_request(bytes: &[u8]) -> Result<usize, ApiError> {
    use prost::Message;
    let mut req = ModelInferRequest::decode(bytes).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(inputs(&mut req)?.len() + wanted(&req)?.len())
}

fn wanted(req: &ModelInferRequest) -> Result<Vec<Wanted>, ApiError> {
    req.outputs
        .iter()
        .map(|o| {
            let classification = match o.parameters.get("classification") {
                None => 0,
                Some(p) => param_u64(p).filter(|&k| (1..=1_000_000).contains(&k)).ok_or_else(|| {
                    ApiError::bad_request(format!("output `{}`: classification must be a positive integer", o.name))
                })? as usize,
            };
            Ok(Wanted { name: o.name.clone(), binary: true, classification })
        })
        .collect()
}

impl Grpc {
    /// Runs an RPC's body and writes its access log line (when `--access-log` is on).
    async fn logged<T>(
        &self,
        rpc: &str,
        remote: Option<std::net::SocketAddr>,
        body: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let t0 = Instant::now();
        let result = body.await;
        let err = result.as_ref().err();
        if let Some(log) = &self.s.access {
            log.write(serde_json::json!({
                "proto": "grpc",
                "remote": remote.map(|a| a.to_string()),
                "method": "POST",
                "path": format!("/inference.GRPCInferenceService/{rpc}"),
                "status": err.map_or(tonic::Code::Ok, Status::code) as i32,
                "grpc_status": format!("{:?}", err.map_or(tonic::Code::Ok, Status::code)),
                "ms": (t0.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            }));
        }
        result
    }

    async fn infer(
        &self,
        headers: axum::http::HeaderMap,
        mut req: ModelInferRequest,
        timeout: Option<Duration>,
    ) -> Result<(ModelInferResponse, String), (ApiError, String)> {
        let s = &self.s;
        let pinned = version_arg(&req.model_version).map(str::to_string);
        let unknown = || pinned.clone().unwrap_or_default();
        let model = s.model(&req.model_name).map_err(|e| (e, unknown()))?;
        let (v, shadow) = s.route(&model, &req.model_name, pinned.as_deref(), &headers).map_err(|e| (e, unknown()))?;
        let fail = |e: ApiError| (e, v.version.clone());
        let inputs = inputs(&mut req).map_err(fail)?;
        let wanted = wanted(&req).map_err(fail)?;
        let param = req.parameters.get("timeout").and_then(param_u64);
        let timeout_us = param.or(timeout.map(|d| d.as_micros().min(u64::MAX as u128) as u64));
        let deadline = crate::deadline(s, &headers, timeout_us);
        let outs = crate::run_infer(s, &v, shadow, inputs, &wanted, deadline).await.map_err(fail)?;
        let mut resp = ModelInferResponse {
            model_name: req.model_name.clone(),
            model_version: v.version.clone(),
            id: req.id.clone(),
            ..Default::default()
        };
        for (name, value, _) in outs {
            resp.outputs.push(model_infer_response::InferOutputTensor {
                name,
                datatype: value.datatype().to_string(),
                shape: value.shape().iter().map(|&d| d as i64).collect(),
                ..Default::default()
            });
            resp.raw_output_contents.push(value.to_bytes());
        }
        Ok((resp, v.version.clone()))
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Grpc {
    async fn server_live(&self, r: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        self.logged("ServerLive", r.remote_addr(), async move { Ok(Response::new(ServerLiveResponse { live: true })) })
            .await
    }

    async fn server_ready(&self, r: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        self.logged("ServerReady", r.remote_addr(), async move {
            Ok(Response::new(ServerReadyResponse { ready: self.s.readiness().0 }))
        })
        .await
    }

    async fn model_ready(&self, r: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        self.logged("ModelReady", r.remote_addr(), async move {
            let r = r.into_inner();
            // A boolean, as clients expect: unknown, failed and unloaded models are not ready.
            let ready = self.s.model_ready(&r.name, version_arg(&r.version)).is_ok();
            Ok(Response::new(ModelReadyResponse { ready }))
        })
        .await
    }

    async fn server_metadata(
        &self,
        r: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        self.logged("ServerMetadata", r.remote_addr(), async move {
            Ok(Response::new(ServerMetadataResponse {
                name: "edgepack".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                extensions: ["binary_tensor_data", "classification", "model_repository", "classify", "detect"]
                    .map(String::from)
                    .to_vec(),
            }))
        })
        .await
    }

    async fn model_metadata(
        &self,
        r: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        self.logged("ModelMetadata", r.remote_addr(), async move {
            let r = r.into_inner();
            let i = self.s.model_info(&r.name, version_arg(&r.version)).map_err(|e| status(&e))?;
            Ok(Response::new(ModelMetadataResponse {
                name: r.name,
                versions: i.versions,
                platform: "edgepack".into(),
                inputs: tensor_metadata(&i.inputs),
                outputs: tensor_metadata(&i.outputs),
            }))
        })
        .await
    }

    async fn model_infer(&self, r: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        self.logged("ModelInfer", r.remote_addr(), async move {
            let t0 = Instant::now();
            let timeout = grpc_timeout(r.metadata());
            let headers = r.metadata().clone().into_headers();
            let req = r.into_inner();
            let model = req.model_name.clone();
            let (result, version) = match self.infer(headers, req, timeout).await {
                Ok((resp, v)) => (Ok(resp), v),
                Err((e, v)) => {
                    if e.status.is_server_error() {
                        tracing::warn!(model, version = %v, status = e.status.as_u16(), error = %e.message, "gRPC request failed");
                    }
                    (Err(e), v)
                }
            };
            let code = result.as_ref().map_or_else(|e| e.status.as_u16(), |_| 200);
            self.s.record(&model, &version, "grpc_infer", code, t0.elapsed());
            result.map(Response::new).map_err(|e| status(&e))
        })
        .await
    }

    async fn model_config(&self, r: Request<ModelConfigRequest>) -> Result<Response<ModelConfigResponse>, Status> {
        self.logged("ModelConfig", r.remote_addr(), async move {
            let r = r.into_inner();
            let c = self.s.config_info(&r.name).map_err(|e| status(&e))?;
            // Triton's dims leave out the batch dim of a batching model.
            let dims = |t: &TensorMeta| t.shape.iter().skip(usize::from(c.max_batch_size > 0)).copied().collect();
            Ok(Response::new(ModelConfigResponse {
                config: Some(ModelConfig {
                    name: r.name,
                    platform: "edgepack".into(),
                    backend: c.backend.clone(),
                    max_batch_size: c.max_batch_size.min(i32::MAX as usize) as i32,
                    input: c
                        .inputs
                        .iter()
                        .map(|t| ModelInput { name: t.name.clone(), data_type: data_type(t.datatype), dims: dims(t) })
                        .collect(),
                    output: c
                        .outputs
                        .iter()
                        .map(|t| ModelOutput { name: t.name.clone(), data_type: data_type(t.datatype), dims: dims(t) })
                        .collect(),
                    dynamic_batching: (c.max_batch_size > 0)
                        .then_some(ModelDynamicBatching { max_queue_delay_microseconds: c.max_queue_delay_us }),
                }),
            }))
        })
        .await
    }

    async fn repository_index(
        &self,
        r: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        self.logged("RepositoryIndex", r.remote_addr(), async move {
            let models = self
                .s
                .index(r.into_inner().ready)
                .into_iter()
                .map(|e| repository_index_response::ModelIndex {
                    name: e.name,
                    version: e.version,
                    state: e.state.into(),
                    reason: e.reason,
                })
                .collect();
            Ok(Response::new(RepositoryIndexResponse { models }))
        })
        .await
    }

    async fn repository_model_load(
        &self,
        r: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        self.logged("RepositoryModelLoad", r.remote_addr(), async move {
            self.s.load_model(&r.into_inner().model_name).await.map_err(|e| status(&e))?;
            Ok(Response::new(RepositoryModelLoadResponse {}))
        })
        .await
    }

    async fn repository_model_unload(
        &self,
        r: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        self.logged("RepositoryModelUnload", r.remote_addr(), async move {
            self.s.unload_model(&r.into_inner().model_name).await.map_err(|e| status(&e))?;
            Ok(Response::new(RepositoryModelUnloadResponse {}))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgepack_runtime::TensorData;

    #[test]
    fn grpc_timeouts_and_typed_contents_parse() {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(grpc_timeout(&m), Some(Duration::from_millis(250)));
        m.insert("grpc-timeout", "bogus".parse().unwrap());
        assert_eq!(grpc_timeout(&m), None);
        let tensor = |datatype: &str, shape: Vec<i64>, contents| model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: datatype.into(),
            shape,
            contents: Some(contents),
            ..Default::default()
        };
        let mut req = ModelInferRequest {
            inputs: vec![tensor(
                "INT8",
                vec![2],
                InferTensorContents { int_contents: vec![-3, 5], ..Default::default() },
            )],
            ..Default::default()
        };
        let t = inputs(&mut req).unwrap();
        assert_eq!(t[0].1.data(), &TensorData::I8(vec![-3, 5]));
        // Out of range, a wrong count, both kinds of data: client errors.
        for (dt, shape, c, raw) in [
            ("INT8", vec![1], InferTensorContents { int_contents: vec![300], ..Default::default() }, vec![]),
            ("FP32", vec![3], InferTensorContents { fp32_contents: vec![1.0], ..Default::default() }, vec![]),
            (
                "FP32",
                vec![1],
                InferTensorContents { fp32_contents: vec![1.0], ..Default::default() },
                vec![vec![0u8; 4]],
            ),
            ("FP32", vec![-1], InferTensorContents::default(), vec![]),
        ] {
            let mut req =
                ModelInferRequest { inputs: vec![tensor(dt, shape, c)], raw_input_contents: raw, ..Default::default() };
            assert_eq!(inputs(&mut req).unwrap_err().status, StatusCode::BAD_REQUEST);
        }
        assert_eq!(status(&ApiError::busy("full")).code(), tonic::Code::ResourceExhausted);
        assert_eq!(status(&ApiError::unavailable("x", 1)).code(), tonic::Code::Unavailable);
    }
}
