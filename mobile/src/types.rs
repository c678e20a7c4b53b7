//! The records, enums and errors the bindings see, and their conversions to and from the runtime's types.
use std::time::Duration;

use edgepack_runtime::tensor::{DType as RtDType, Tensor};
use edgepack_runtime::{Error as RtError, onnx::Dim};

/// Which device backend to open a bundle on.
#[derive(uniffi::Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The GPU when it runs every op and was measured faster at first load, else the CPU.
    Auto,
    Cpu,
    Gpu,
}

impl From<Backend> for edgepack_runtime::backend::Device {
    fn from(b: Backend) -> Self {
        match b {
            Backend::Auto => Self::Auto,
            Backend::Cpu => Self::Cpu,
            Backend::Gpu => Self::Gpu,
        }
    }
}

/// Element type of a tensor. Tensor bytes are little-endian, row-major.
#[derive(uniffi::Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Bool,
}

macro_rules! dtype_map {
    ($($v:ident),*) => {
        impl From<DType> for RtDType {
            fn from(d: DType) -> Self { match d { $(DType::$v => RtDType::$v),* } }
        }
        impl From<RtDType> for DType {
            fn from(d: RtDType) -> Self { match d { $(RtDType::$v => DType::$v),* } }
        }
    };
}
dtype_map!(F32, F16, F64, I64, I32, I16, I8, U64, U32, U16, U8, Bool);

/// A named tensor: raw little-endian bytes, a shape and an element type (no boxed number lists).
#[derive(uniffi::Record, Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

impl NamedTensor {
    pub(crate) fn to_runtime(&self) -> Result<(String, Tensor), EdgepackError> {
        let shape: Vec<usize> = self
            .shape
            .iter()
            .map(|&d| {
                usize::try_from(d).map_err(|_| EdgepackError::InvalidInput { detail: format!("dim {d} too large") })
            })
            .collect::<Result<_, _>>()?;
        let t = Tensor::from_le_bytes(self.dtype.into(), shape, &self.data)?;
        Ok((self.name.clone(), t))
    }

    pub(crate) fn from_runtime(name: String, t: &Tensor) -> NamedTensor {
        NamedTensor {
            name,
            dtype: t.dtype().into(),
            shape: t.shape().iter().map(|&d| d as u64).collect(),
            data: t.to_le_bytes(),
        }
    }
}

/// A model input or output: `shape` holds -1 for a dimension fixed at run time (`dims` gives its symbol).
#[derive(uniffi::Record, Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// `None` for an element type the API does not carry (e.g. strings).
    pub dtype: Option<DType>,
    pub shape: Vec<i64>,
    pub dims: Vec<String>,
}

impl From<&edgepack_runtime::session::IoInfo> for TensorInfo {
    fn from(io: &edgepack_runtime::session::IoInfo) -> Self {
        TensorInfo {
            name: io.name.clone(),
            dtype: io.dtype.map(Into::into),
            shape: io.shape.iter().map(|d| if let Dim::Fixed(n) = d { *n as i64 } else { -1 }).collect(),
            dims: io
                .shape
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => n.to_string(),
                    Dim::Symbolic(s) => s.clone(),
                })
                .collect(),
        }
    }
}

/// What an engine holds and where it can run.
#[derive(uniffi::Record, Debug, Clone)]
pub struct ModelInfo {
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    /// "classification", "detection" or `None` (the bundle's task).
    pub task: Option<String>,
    /// The bundle variant loaded ("fp32", "int8"...).
    pub variant: Option<String>,
    pub labels: Vec<String>,
    /// Key id of the bundle's signer, and whether it was checked against a trusted key.
    pub signer: Option<String>,
    pub trusted: bool,
    /// The device backend that runs the model, `None` when the device cannot (see `device_error`).
    pub device_backend: Option<String>,
    /// Why that backend was chosen.
    pub device_reason: Option<String>,
    /// Why the device cannot run the model (it then runs in the cloud when the policy allows).
    pub device_error: Option<String>,
    /// `endpoint` and model of the cloud fallback, when configured.
    pub cloud: Option<String>,
}

/// Where a result was computed.
#[derive(uniffi::Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Device,
    Cloud,
}

/// Where a result ran, on what and why.
#[derive(uniffi::Record, Debug, Clone)]
pub struct Provenance {
    pub place: Place,
    /// The device backend's description, or `cloud <endpoint> model <m> version <v>`.
    pub backend: String,
    /// Why it ran there (the policy and what triggered it).
    pub reason: String,
    /// Wall time of the whole call.
    pub latency_ms: f64,
    /// The device failure that sent the call to the cloud, if any.
    pub device_error: Option<String>,
    /// The cloud failure that left the answer to the device, if any.
    pub cloud_error: Option<String>,
}

/// Output tensors of `run`, and where they were computed.
#[derive(uniffi::Record, Debug, Clone)]
pub struct RunResult {
    pub outputs: Vec<NamedTensor>,
    pub provenance: Provenance,
}

/// One class with its score (after the bundle's softmax, when it has one).
#[derive(uniffi::Record, Debug, Clone, PartialEq)]
pub struct ClassScore {
    pub index: u32,
    pub label: Option<String>,
    pub score: f32,
}

impl From<edgepack_runtime::process::ClassScore> for ClassScore {
    /// Labels in display form (an ImageNet synset line loses its wnid; other labels are kept as they are).
    fn from(c: edgepack_runtime::process::ClassScore) -> Self {
        ClassScore {
            index: c.class_index as u32,
            label: c.label.as_deref().map(|l| edgepack_runtime::process::display_label(l).to_string()),
            score: c.score,
        }
    }
}

#[derive(uniffi::Record, Debug, Clone)]
pub struct ClassifyResult {
    /// Best first.
    pub classes: Vec<ClassScore>,
    pub provenance: Provenance,
}

/// One detected object, in pixels of the original image.
#[derive(uniffi::Record, Debug, Clone, PartialEq)]
pub struct Detection {
    pub index: u32,
    pub label: Option<String>,
    pub score: f32,
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
    /// Instance mask over the box (YOLO segment models).
    pub mask: Option<Mask>,
    /// Keypoints (YOLO pose models; empty otherwise).
    pub keypoints: Vec<Keypoint>,
}

/// A binary mask in image pixels over the box at (`x`, `y`) of `width`×`height`: `rle` counts runs of pixels in
/// row-major order, alternately off and on, starting with off.
#[derive(uniffi::Record, Debug, Clone, PartialEq)]
pub struct Mask {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub rle: Vec<u32>,
}

/// One keypoint in image pixels, with its visibility score when the model gives one.
#[derive(uniffi::Record, Debug, Clone, PartialEq)]
pub struct Keypoint {
    pub x: f32,
    pub y: f32,
    pub score: Option<f32>,
}

impl From<edgepack_runtime::process::Detection> for Detection {
    fn from(d: edgepack_runtime::process::Detection) -> Self {
        Detection {
            index: d.class_index as u32,
            label: d.label,
            score: d.score,
            x1: d.x1,
            y1: d.y1,
            x2: d.x2,
            y2: d.y2,
            mask: d.mask.map(|m| Mask { x: m.x, y: m.y, width: m.width, height: m.height, rle: m.rle }),
            keypoints: d
                .keypoints
                .unwrap_or_default()
                .into_iter()
                .map(|k| Keypoint { x: k.x, y: k.y, score: k.score })
                .collect(),
        }
    }
}

#[derive(uniffi::Record, Debug, Clone)]
pub struct DetectResult {
    pub detections: Vec<Detection>,
    pub provenance: Provenance,
}

/// Every error the SDK returns. Input mistakes (`InvalidInput`, `Image`, a 400/413/422 from the server) are never
/// retried elsewhere; other cloud statuses (404, 401, 5xx, 429...) are the endpoint's failures.
#[derive(uniffi::Error, thiserror::Error, Debug, Clone, PartialEq)]
pub enum EdgepackError {
    #[error("{detail}")]
    Io { detail: String },
    #[error("{detail}")]
    InvalidModel { detail: String },
    #[error("unsupported operator `{op}` at node `{node}` on the {backend} backend")]
    UnsupportedOp { op: String, node: String, backend: String },
    #[error("{detail}")]
    InvalidBundle { detail: String },
    #[error("{detail}")]
    InvalidInput { detail: String },
    #[error("{detail}")]
    Image { detail: String },
    #[error("{detail}")]
    Processing { detail: String },
    /// The device cannot answer and no cloud fallback is allowed or configured.
    #[error("{detail}")]
    Unavailable { detail: String },
    /// The cloud answered with an error status (4xx: the request; 5xx: the service).
    #[error("cloud: HTTP {status}: {detail}")]
    Cloud { status: u16, detail: String },
    /// The cloud could not be reached or its answer could not be read.
    #[error("cloud transport: {detail}")]
    Transport { detail: String },
    /// The call's deadline passed before any answer.
    #[error("deadline of {deadline_ms} ms passed: {detail}")]
    Timeout { deadline_ms: u64, detail: String },
    /// The circuit breaker is open after repeated cloud failures; the cloud is not asked until it half-opens.
    #[error("cloud circuit breaker open (retry in {retry_in_ms} ms); last failure: {detail}")]
    CircuitOpen { retry_in_ms: u64, detail: String },
    #[error("internal error: {detail}")]
    Internal { detail: String },
}

impl EdgepackError {
    /// A mistake in the caller's input: the same request fails anywhere, so it is never sent to the cloud.
    pub(crate) fn is_input_error(&self) -> bool {
        matches!(self, EdgepackError::InvalidInput { .. } | EdgepackError::Image { .. })
            || matches!(self, EdgepackError::Cloud { status: 400 | 413 | 422, .. })
    }

    pub(crate) fn timeout(deadline: Duration, detail: impl Into<String>) -> Self {
        EdgepackError::Timeout { deadline_ms: deadline.as_millis() as u64, detail: detail.into() }
    }
}

impl From<RtError> for EdgepackError {
    fn from(e: RtError) -> Self {
        let detail = e.to_string();
        match e {
            RtError::Io { .. } => EdgepackError::Io { detail },
            RtError::MalformedModel(_) => EdgepackError::InvalidModel { detail },
            RtError::UnsupportedOp { op, domain, node, backend } => EdgepackError::UnsupportedOp {
                op: if domain.is_empty() || domain == "ai.onnx" { op } else { format!("{domain}::{op}") },
                node,
                backend: backend.to_string(),
            },
            RtError::Bundle(_) => EdgepackError::InvalidBundle { detail },
            RtError::UnknownInput { .. }
            | RtError::UnknownValue { .. }
            | RtError::MissingInput { .. }
            | RtError::InputDType { .. }
            | RtError::InputShape { .. }
            | RtError::InvalidTensor(_)
            | RtError::Npy(_) => EdgepackError::InvalidInput { detail },
            RtError::Image(_) => EdgepackError::Image { detail },
            RtError::Processing(_) => EdgepackError::Processing { detail },
            RtError::Backend { .. } | RtError::Internal(_) => EdgepackError::Internal { detail },
        }
    }
}

/// The error a foreign [`crate::HttpTransport`] raises.
#[derive(uniffi::Error, thiserror::Error, Debug, Clone, PartialEq)]
pub enum TransportError {
    /// The request could not be sent or its answer not received (DNS, refused, reset, TLS...).
    #[error("{detail}")]
    Failed { detail: String },
    /// The transport's own time limit passed.
    #[error("{detail}")]
    Timeout { detail: String },
}

impl From<uniffi::UnexpectedUniFFICallbackError> for TransportError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        TransportError::Failed { detail: format!("transport callback raised: {}", e.reason) }
    }
}
