//! The cloud fallback: a KServe v2 client for `edgepack serve` over a pluggable HTTP transport, and a circuit
//! breaker so that a dead endpoint is not retried on every call.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgepack_runtime::kserve::{Flat, tensor_from_scalars};
use edgepack_runtime::process;
use edgepack_runtime::tensor::DType as RtDType;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::types::{ClassScore, DType, Detection, EdgepackError, NamedTensor, TransportError};

/// When a call goes to the cloud.
#[derive(uniffi::Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackPolicy {
    /// Device only; the cloud is never asked.
    Never,
    /// The cloud answers when the device cannot load the model (an operator it lacks, or no usable backend).
    OnUnsupported,
    /// The cloud answers when the device fails to load or to run (input mistakes excepted).
    OnError,
    /// The device runs first; when it has not answered within `device_timeout_ms` the cloud is asked, and the
    /// first answer wins. Device failures also go to the cloud.
    OnTimeout,
    /// classify: the cloud answers when the device's best score is below `min_confidence` (the device result is
    /// kept if the cloud fails). Device failures also go to the cloud.
    OnLowConfidence,
    /// Cloud first; the device answers when the cloud fails or the breaker is open.
    Always,
}

/// The cloud endpoint and the rules for using it.
#[derive(uniffi::Record, Debug, Clone)]
pub struct CloudConfig {
    /// Base address of `edgepack serve`, e.g. `http://10.0.2.2:8080` (the built-in transport speaks plain HTTP;
    /// give the engine a platform transport for HTTPS).
    pub endpoint: String,
    /// Model name in the server's repository.
    pub model: String,
    /// Pinned version; `None` lets the server route (default version, canary, A/B).
    #[uniffi(default = None)]
    pub version: Option<String>,
    pub policy: FallbackPolicy,
    /// Budget of a call once the cloud is involved: the cloud request gets what remains of it, and the call
    /// never waits past it (it returns the device result, or `Timeout`).
    #[uniffi(default = 2000)]
    pub deadline_ms: u32,
    /// `OnTimeout`: how long the device may run before the cloud is asked.
    #[uniffi(default = 200)]
    pub device_timeout_ms: u32,
    /// `OnLowConfidence`: the device's best class score below this goes to the cloud.
    #[uniffi(default = 0.5)]
    pub min_confidence: f32,
    /// Consecutive cloud failures (transport errors, timeouts, 5xx, 429) that open the breaker.
    #[uniffi(default = 3)]
    pub breaker_failures: u32,
    /// How long the breaker stays open before it lets one trial request through (half-open).
    #[uniffi(default = 30000)]
    pub breaker_cooldown_ms: u32,
    /// Extra headers sent with every request (e.g. `authorization`).
    #[uniffi(default = [])]
    pub headers: Vec<HttpHeader>,
}

#[derive(uniffi::Record, Debug, Clone, PartialEq)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

#[derive(uniffi::Record, Debug, Clone)]
pub struct HttpRequest {
    /// Always "POST" today.
    pub method: String,
    pub url: String,
    pub headers: Vec<HttpHeader>,
    pub body: Vec<u8>,
    /// The transport must give up after this long (raise `TransportError.Timeout`).
    pub timeout_ms: u32,
}

#[derive(uniffi::Record, Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<HttpHeader>,
    pub body: Vec<u8>,
}

/// How requests reach the cloud. Apps implement it with their platform stack (URLSession, OkHttp: TLS, proxies,
/// certificate pinning, cellular rules); [`default_transport`] is a plain-HTTP client in Rust.
#[uniffi::export(with_foreign)]
pub trait HttpTransport: Send + Sync {
    fn send(&self, request: HttpRequest) -> Result<HttpResponse, TransportError>;
}

/// The built-in transport (ureq, HTTP/1.1, no TLS).
struct RustTransport {
    agent: ureq::Agent,
}

/// Largest response the built-in transport reads.
const MAX_RESPONSE: u64 = 256 << 20;

impl HttpTransport for RustTransport {
    fn send(&self, request: HttpRequest) -> Result<HttpResponse, TransportError> {
        if request.method != "POST" {
            return Err(TransportError::Failed { detail: format!("unsupported method {}", request.method) });
        }
        let mut req = self
            .agent
            .post(&request.url)
            .config()
            .timeout_global(Some(Duration::from_millis(request.timeout_ms.max(1) as u64)))
            .build();
        for h in &request.headers {
            req = req.header(&h.name, &h.value);
        }
        let mut resp = req.send(&request.body[..]).map_err(|e| match e {
            ureq::Error::Timeout(t) => TransportError::Timeout { detail: format!("timed out ({t})") },
            e => TransportError::Failed { detail: e.to_string() },
        })?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .filter_map(|(k, v)| Some(HttpHeader { name: k.as_str().to_string(), value: v.to_str().ok()?.to_string() }))
            .collect();
        let body = resp.body_mut().with_config().limit(MAX_RESPONSE).read_to_vec().map_err(|e| match e {
            ureq::Error::Timeout(t) => TransportError::Timeout { detail: format!("timed out reading the body ({t})") },
            e => TransportError::Failed { detail: e.to_string() },
        })?;
        Ok(HttpResponse { status, headers, body })
    }
}

/// The built-in plain-HTTP transport, for apps that want to wrap it (logging, headers) rather than replace it.
#[uniffi::export]
pub fn default_transport() -> Arc<dyn HttpTransport> {
    let agent = ureq::Agent::config_builder().http_status_as_error(false).user_agent("edgepack-mobile").build().into();
    Arc::new(RustTransport { agent })
}

/// State of the cloud circuit breaker.
#[derive(uniffi::Enum, Debug, Clone, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests go through; `failures` consecutive failures so far.
    Closed { failures: u32 },
    /// Requests are not sent until `retry_in_ms` has passed.
    Open { retry_in_ms: u64 },
    /// The cooldown is over: the next request is a trial; its success closes the breaker, its failure reopens it.
    HalfOpen,
}

enum State {
    Closed(u32),
    Open(Instant),
    /// `true` while the trial request is in flight (others are refused meanwhile).
    HalfOpen(bool),
}

/// Closed → (N consecutive failures) → Open → (cooldown) → HalfOpen → trial succeeds → Closed / fails → Open.
pub(crate) struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<(State, String)>,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker { threshold: threshold.max(1), cooldown, state: Mutex::new((State::Closed(0), String::new())) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (State, String)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// May a request go now? Moves Open → HalfOpen once the cooldown is over and reserves the trial.
    pub(crate) fn admit(&self) -> Result<(), EdgepackError> {
        let mut g = self.lock();
        let now = Instant::now();
        let refuse = |until: Instant, msg: &str| EdgepackError::CircuitOpen {
            retry_in_ms: until.saturating_duration_since(now).as_millis() as u64,
            detail: msg.to_string(),
        };
        match g.0 {
            State::Closed(_) => Ok(()),
            State::Open(until) if now < until => Err(refuse(until, &g.1)),
            State::Open(_) | State::HalfOpen(false) => {
                g.0 = State::HalfOpen(true);
                Ok(())
            }
            State::HalfOpen(true) => Err(refuse(now, &g.1)),
        }
    }

    pub(crate) fn record(&self, outcome: &Result<(), EdgepackError>) {
        let mut g = self.lock();
        match outcome {
            Ok(()) => g.0 = State::Closed(0),
            // The request's own fault says nothing about the endpoint's health.
            Err(e) if e.is_input_error() => {
                if let State::HalfOpen(true) = g.0 {
                    g.0 = State::Closed(0);
                }
            }
            Err(e) => {
                g.1 = e.to_string();
                g.0 = match g.0 {
                    State::Closed(n) if n + 1 < self.threshold => State::Closed(n + 1),
                    _ => State::Open(Instant::now() + self.cooldown),
                };
            }
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        let g = self.lock();
        match g.0 {
            State::Closed(n) => BreakerState::Closed { failures: n },
            State::Open(until) => {
                let now = Instant::now();
                if now < until {
                    BreakerState::Open { retry_in_ms: until.saturating_duration_since(now).as_millis() as u64 }
                } else {
                    BreakerState::HalfOpen
                }
            }
            State::HalfOpen(_) => BreakerState::HalfOpen,
        }
    }
}

/// A KServe v2 client for one model of `edgepack serve`.
pub(crate) struct Cloud {
    pub(crate) config: CloudConfig,
    transport: Arc<dyn HttpTransport>,
    pub(crate) breaker: Breaker,
}

/// A cloud answer with the version that produced it.
pub(crate) struct Answer<T> {
    pub(crate) value: T,
    pub(crate) version: String,
}

impl Cloud {
    pub(crate) fn new(config: CloudConfig, transport: Option<Arc<dyn HttpTransport>>) -> Result<Cloud, EdgepackError> {
        let endpoint = config.endpoint.trim_end_matches('/');
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) || endpoint.len() < 8 {
            return Err(EdgepackError::InvalidInput {
                detail: format!("cloud endpoint must be an http:// or https:// address, got `{}`", config.endpoint),
            });
        }
        if config.model.is_empty() || config.model.contains(['/', '?', '#', ' ']) {
            return Err(EdgepackError::InvalidInput { detail: format!("invalid cloud model name `{}`", config.model) });
        }
        let breaker = Breaker::new(config.breaker_failures, Duration::from_millis(config.breaker_cooldown_ms as u64));
        Ok(Cloud { config, transport: transport.unwrap_or_else(default_transport), breaker })
    }

    pub(crate) fn describe(&self, version: &str) -> String {
        let v = if version.is_empty() { "?" } else { version };
        format!("cloud {} model {} version {v}", self.config.endpoint.trim_end_matches('/'), self.config.model)
    }

    fn base(&self) -> &str {
        self.config.endpoint.trim_end_matches('/')
    }

    /// Sends one request through the breaker, within `budget`.
    fn post(
        &self,
        url: String,
        body: Vec<u8>,
        extra: Vec<HttpHeader>,
        budget: Duration,
    ) -> Result<HttpResponse, EdgepackError> {
        self.breaker.admit()?;
        let r = self.post_inner(url, body, extra, budget);
        self.breaker.record(&r.as_ref().map(|_| ()).map_err(Clone::clone));
        r
    }

    fn post_inner(
        &self,
        url: String,
        body: Vec<u8>,
        extra: Vec<HttpHeader>,
        budget: Duration,
    ) -> Result<HttpResponse, EdgepackError> {
        let ms = budget.as_millis().clamp(1, u32::MAX as u128) as u32;
        let mut headers = self.config.headers.clone();
        headers.extend(extra);
        // The server drops a request it cannot start within the deadline (504) instead of doing useless work.
        headers.push(HttpHeader { name: "x-request-timeout-ms".into(), value: ms.to_string() });
        let req = HttpRequest { method: "POST".into(), url, headers, body, timeout_ms: ms };
        let resp = self.transport.send(req).map_err(|e| match e {
            // Reported against the call's deadline (the request had what remained of it).
            TransportError::Timeout { detail } => EdgepackError::timeout(
                Duration::from_millis(self.config.deadline_ms as u64),
                format!("cloud: {detail}"),
            ),
            TransportError::Failed { detail } => EdgepackError::Transport { detail },
        })?;
        if !(200..300).contains(&resp.status) {
            let detail = serde_json::from_slice::<Value>(&resp.body)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&resp.body[..resp.body.len().min(512)]).into_owned());
            return Err(EdgepackError::Cloud { status: resp.status, detail });
        }
        Ok(resp)
    }

    /// KServe v2 infer with the binary tensor extension both ways.
    pub(crate) fn infer(
        &self,
        inputs: &[NamedTensor],
        budget: Duration,
    ) -> Result<Answer<Vec<NamedTensor>>, EdgepackError> {
        let mut head_inputs = Vec::with_capacity(inputs.len());
        for t in inputs {
            head_inputs.push(json!({
                "name": t.name,
                "shape": t.shape,
                "datatype": RtDType::from(t.dtype).kserve_name(),
                "parameters": { "binary_data_size": t.data.len() },
            }));
        }
        let head = serde_json::to_vec(&json!({ "inputs": head_inputs, "parameters": { "binary_data_output": true } }))
            .map_err(|e| EdgepackError::Internal { detail: e.to_string() })?;
        let mut body = Vec::with_capacity(head.len() + inputs.iter().map(|t| t.data.len()).sum::<usize>());
        body.extend_from_slice(&head);
        for t in inputs {
            body.extend_from_slice(&t.data);
        }
        let url = match &self.config.version {
            Some(v) => format!("{}/v2/models/{}/versions/{v}/infer", self.base(), self.config.model),
            None => format!("{}/v2/models/{}/infer", self.base(), self.config.model),
        };
        let extra = vec![
            HttpHeader { name: "content-type".into(), value: "application/octet-stream".into() },
            HttpHeader { name: "inference-header-content-length".into(), value: head.len().to_string() },
        ];
        let resp = self.post(url, body, extra, budget)?;
        let bad = |m: String| EdgepackError::Transport { detail: format!("unreadable KServe response: {m}") };
        let json_len = header(&resp.headers, "inference-header-content-length")
            .map(|v| v.trim().parse::<usize>().map_err(|_| bad(format!("bad header length `{v}`"))))
            .transpose()?
            .unwrap_or(resp.body.len());
        if json_len > resp.body.len() {
            return Err(bad("header length beyond the body".into()));
        }
        let head: Value = serde_json::from_slice(&resp.body[..json_len]).map_err(|e| bad(e.to_string()))?;
        let mut rest = &resp.body[json_len..];
        let mut outputs = Vec::new();
        for o in head.get("outputs").and_then(Value::as_array).ok_or_else(|| bad("no outputs".into()))? {
            let name = o.get("name").and_then(Value::as_str).ok_or_else(|| bad("output without a name".into()))?;
            let dt = o.get("datatype").and_then(Value::as_str).unwrap_or("");
            let dtype = RtDType::from_kserve_name(dt)
                .map(DType::from)
                .ok_or_else(|| bad(format!("output `{name}`: datatype `{dt}`")))?;
            let shape: Vec<u64> = o
                .get("shape")
                .and_then(Value::as_array)
                .ok_or_else(|| bad(format!("output `{name}` without a shape")))?
                .iter()
                .map(|d| d.as_u64().ok_or_else(|| bad(format!("output `{name}`: bad dim {d}"))))
                .collect::<Result<_, _>>()?;
            let count: u64 =
                shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).ok_or_else(|| bad("shape overflow".into()))?;
            let nbytes = count.saturating_mul(RtDType::from(dtype).size() as u64);
            let data = match o.get("parameters").and_then(|p| p.get("binary_data_size")).and_then(Value::as_u64) {
                Some(n) => {
                    if n != nbytes || n as usize > rest.len() {
                        return Err(bad(format!("output `{name}`: {n} binary bytes for shape {shape:?}")));
                    }
                    let (d, r) = rest.split_at(n as usize);
                    rest = r;
                    d.to_vec()
                }
                None => {
                    json_data_bytes(o.get("data"), dtype, count).map_err(|m| bad(format!("output `{name}`: {m}")))?
                }
            };
            outputs.push(NamedTensor { name: name.to_string(), dtype, shape, data });
        }
        Ok(Answer { value: outputs, version: version_of(&head) })
    }

    /// `POST /v1/models/{m}:classify` with the raw image: the server runs the bundle's pre/post-processing.
    pub(crate) fn classify(
        &self,
        image: &[u8],
        top_k: u32,
        budget: Duration,
    ) -> Result<Answer<Vec<ClassScore>>, EdgepackError> {
        let r: ImageAnswer<process::ClassScore> =
            self.image_verb("classify", "predictions", Some(top_k.clamp(1, 1000)), image, budget)?;
        Ok(Answer { value: r.items.into_iter().map(Into::into).collect(), version: r.model_version })
    }

    /// `POST /v1/models/{m}:detect` with the raw image.
    pub(crate) fn detect(&self, image: &[u8], budget: Duration) -> Result<Answer<Vec<Detection>>, EdgepackError> {
        let r: ImageAnswer<process::Detection> = self.image_verb("detect", "detections", None, image, budget)?;
        Ok(Answer { value: r.items.into_iter().map(Into::into).collect(), version: r.model_version })
    }

    /// One raw-image verb of the server; `field` is the response's list (the runtime's own serialised records).
    fn image_verb<T: serde::de::DeserializeOwned>(
        &self,
        verb: &str,
        field: &str,
        top_k: Option<u32>,
        image: &[u8],
        budget: Duration,
    ) -> Result<ImageAnswer<T>, EdgepackError> {
        let mut query: Vec<String> = top_k.map(|k| format!("top_k={k}")).into_iter().collect();
        query.extend(self.config.version.as_ref().map(|v| format!("version={v}")));
        let url = format!("{}/v1/models/{}:{verb}?{}", self.base(), self.config.model, query.join("&"));
        let resp = self.post(url, image.to_vec(), vec![octet()], budget)?;
        let bad = |m: String| EdgepackError::Transport { detail: format!("unreadable {verb} response: {m}") };
        let mut v: Value = serde_json::from_slice(&resp.body).map_err(|e| bad(e.to_string()))?;
        let items =
            serde_json::from_value(v.get_mut(field).map(Value::take).ok_or_else(|| bad(format!("no `{field}`")))?)
                .map_err(|e| bad(e.to_string()))?;
        Ok(ImageAnswer { items, model_version: version_of(&v) })
    }
}

/// The list a raw-image verb answered, and the version that answered it.
struct ImageAnswer<T> {
    items: Vec<T>,
    model_version: String,
}

fn octet() -> HttpHeader {
    HttpHeader { name: "content-type".into(), value: "application/octet-stream".into() }
}

fn version_of(v: &Value) -> String {
    v.get("model_version").and_then(Value::as_str).unwrap_or("").to_string()
}

fn header<'a>(headers: &'a [HttpHeader], name: &str) -> Option<&'a str> {
    headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value.as_str())
}

/// A JSON `data` array (flat or nested) as little-endian bytes of `dtype`, through the runtime's KServe codec
/// (the one the server writes it with).
fn json_data_bytes(data: Option<&Value>, dtype: DType, count: u64) -> Result<Vec<u8>, String> {
    let Flat(flat) = Flat::deserialize(data.ok_or("no data")?).map_err(|e| e.to_string())?;
    if flat.len() as u64 != count {
        return Err(format!("{} values for {count} elements", flat.len()));
    }
    Ok(tensor_from_scalars(dtype.into(), vec![flat.len()], &flat)?.to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_threshold_and_half_opens_after_cooldown() {
        let b = Breaker::new(2, Duration::from_millis(50));
        let fail = Err(EdgepackError::Transport { detail: "refused".into() });
        assert!(b.admit().is_ok());
        b.record(&fail);
        assert_eq!(b.state(), BreakerState::Closed { failures: 1 });
        // A 4xx is the request's fault: it neither counts nor resets.
        b.record(&Err(EdgepackError::Cloud { status: 400, detail: "bad".into() }));
        assert_eq!(b.state(), BreakerState::Closed { failures: 1 });
        b.record(&fail);
        assert!(matches!(b.state(), BreakerState::Open { .. }));
        assert!(matches!(b.admit(), Err(EdgepackError::CircuitOpen { .. })));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.admit().is_ok(), "the trial request goes");
        assert!(b.admit().is_err(), "only one trial at a time");
        b.record(&fail);
        assert!(matches!(b.state(), BreakerState::Open { .. }), "a failed trial reopens");
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.admit().is_ok());
        b.record(&Ok(()));
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
    }

    #[test]
    fn json_outputs_become_bytes() {
        let v = json!([[1.5, 2.0], [3.0, -1.0]]);
        let b = json_data_bytes(Some(&v), DType::F32, 4).unwrap();
        assert_eq!(b.len(), 16);
        assert_eq!(f32::from_le_bytes(b[12..16].try_into().unwrap()), -1.0);
        assert!(json_data_bytes(Some(&v), DType::F32, 5).is_err());
    }
}
