//! `edgepack serve`: the cloud fallback. The same engine and bundles as the device, behind the KServe v2 / Open
//! Inference Protocol over HTTP (JSON tensors and the binary tensor extension), with a raw-image classify
//! endpoint, dynamic batching per model version, bounded queues with back-pressure, per-request deadlines,
//! version routing (pinned, canary, A/B with a sticky key, shadow), a polled model repository, Prometheus
//! metrics and a graceful shutdown that finishes every accepted request.
//!
//! Threads: HTTP on a tokio runtime (one thread per core by default: parsing a JSON image tensor takes
//! milliseconds); each model version has its worker threads that own the engine calls (the runtime's kernels use
//! every core per call), fed by a bounded queue.
pub mod batch;
mod engine;
mod error;
mod grpc;
mod jobs;
mod kserve;
mod metrics;
mod redis;
pub mod repo;

/// The wire decoders, for the fuzz targets of `fuzz/`: the same functions the HTTP and gRPC handlers call, with the
/// error as its message. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    /// An HTTP inference body (`json_len`: the `Inference-Header-Content-Length` header) into its tensors.
    pub fn kserve_request(body: &[u8], json_len: Option<usize>) -> Result<usize, String> {
        crate::kserve::parse_request(body, json_len).map(|r| r.inputs.len()).map_err(|e| e.message)
    }

    /// A serialized gRPC `ModelInferRequest` into its tensors and requested outputs.
    pub fn grpc_infer_request(bytes: &[u8]) -> Result<usize, String> {
        crate::grpc::decode_infer_request(bytes).map_err(|e| e.message)
    }
}
mod rollout;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgepack_runtime::{DType, SessionOptions, Tensor};
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub use engine::BatchConfig;
use engine::{Job, Outputs, Version};
pub use error::ApiError;
use metrics::Metrics;
use repo::{ModelConfig, version_order};

/// Everything `edgepack serve` is told.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub repo: PathBuf,
    pub addr: SocketAddr,
    /// Repository poll interval (None: load once).
    pub poll: Option<Duration>,
    /// Device, threads, trusted key for every model.
    pub session: SessionOptions,
    pub max_body_bytes: usize,
    /// Deadline of a request that does not set one (Triton's `timeout` parameter, in microseconds, or the
    /// `x-request-timeout-ms` header).
    pub request_timeout: Duration,
    /// JSON logs (one object per line) instead of text.
    pub log_json: bool,
    /// Threads of the HTTP runtime, which parse and encode request bodies (0: one per core). Engine calls run on
    /// the model versions' own worker threads, not here.
    pub http_threads: usize,
    /// Where KServe v2 gRPC listens (None: no gRPC).
    pub grpc_addr: Option<SocketAddr>,
    /// The access log: one JSON line per request of either protocol (`-`: stdout; None: none).
    pub access_log: Option<PathBuf>,
    /// Asynchronous jobs: where they are stored (None: off), their size limit and time to live.
    pub jobs: Option<JobOptions>,
    /// Where the `/v2/docs` page loads Swagger UI from (`swagger-ui.css`, `swagger-ui-bundle.js` of swagger-ui-dist).
    pub swagger_ui: String,
}

/// swagger-ui-dist 5 on jsDelivr, as FastAPI's `/docs` loads it by default.
pub const SWAGGER_UI_CDN: &str = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5";

pub use jobs::JobOptions;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("model repository {0}: {1}")]
    Repo(PathBuf, std::io::Error),
    #[error("binding {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

struct Model {
    config: ModelConfig,
    versions: BTreeMap<String, Arc<Version>>,
    files: BTreeMap<String, FileSig>,
}

impl Model {
    fn latest(&self) -> Option<&Arc<Version>> {
        self.versions.iter().max_by(|a, b| version_order(a.0, b.0)).map(|(_, v)| v)
    }
}

/// A bundle file's identity for change detection: path, size, modification time.
type FileSig = (PathBuf, (u64, Option<std::time::SystemTime>));

/// A model version that failed to load: the file that failed (not reloaded until it changes) and why.
#[derive(Clone)]
struct Failure {
    file: FileSig,
    reason: String,
}

struct AppState {
    opts: ServeOptions,
    models: RwLock<BTreeMap<String, Arc<Model>>>,
    /// Model versions of the repository that failed to load, by (model, version): listed as unavailable with the
    /// reason, they keep the server not ready.
    failed: RwLock<BTreeMap<(String, String), Failure>>,
    /// Models unloaded through the repository API: not loaded by polls until loaded again.
    unloaded: RwLock<BTreeSet<String>>,
    /// One repository sync at a time (polls and load/unload calls).
    sync_lock: Mutex<()>,
    ready: AtomicBool,
    metrics: Arc<Metrics>,
    rng: AtomicU64,
    access: Option<AccessLog>,
    rollouts: rollout::Rollouts,
    jobs: Option<jobs::Jobs>,
}

/// `--access-log`: one JSON object per request, both protocols, written and flushed line by line (a crash loses
/// no finished line).
struct AccessLog {
    out: Mutex<Box<dyn std::io::Write + Send>>,
}

impl AccessLog {
    fn open(path: &std::path::Path) -> std::io::Result<AccessLog> {
        let out: Box<dyn std::io::Write + Send> = if path.as_os_str() == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?)
        };
        Ok(AccessLog { out: Mutex::new(out) })
    }

    /// Writes `entry` with the time it is written (`ts`, UTC, milliseconds).
    fn write(&self, mut entry: Value) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        entry["ts"] = json!(edgepack_runtime::utc_rfc3339(now.as_secs(), Some(now.subsec_millis())));
        let mut line = entry.to_string();
        line.push('\n');
        if let Ok(mut out) = self.out.lock() {
            // A full disk or a closed stdout must not fail the request it describes.
            let _ = out.write_all(line.as_bytes()).and_then(|_| out.flush());
        }
    }
}

impl AppState {
    fn model(&self, name: &str) -> Result<Arc<Model>, ApiError> {
        self.models.read().ok().and_then(|m| m.get(name).cloned()).ok_or_else(|| match self.failures(name, None) {
            Some(why) => ApiError::unavailable(format!("model `{name}` is unavailable: {why}"), 5),
            None => ApiError::not_found(format!("unknown model `{name}`")),
        })
    }

    /// Why versions of `name` (or its `version`) failed to load, when they did.
    fn failures(&self, name: &str, version: Option<&str>) -> Option<String> {
        let f = self.failed.read().ok()?;
        let why: Vec<String> = f
            .iter()
            .filter(|((m, v), _)| m == name && version.is_none_or(|x| x == v))
            .map(|((_, v), e)| format!("version {v} failed to load: {}", e.reason))
            .collect();
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// The error for a version `name` does not serve: unavailable with the reason when it failed to load.
    fn no_version(&self, name: &str, v: &str) -> ApiError {
        match self.failures(name, Some(v)) {
            Some(why) => ApiError::unavailable(format!("model `{name}` {why}"), 5),
            None => ApiError::not_found(format!("model `{name}` has no version `{v}`")),
        }
    }

    /// A uniform number in [0, 100) (xorshift over a shared state).
    fn percent(&self) -> f64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        (x % 10_000) as f64 / 100.0
    }

    /// The version that answers, and the shadow version to mirror to.
    fn route(
        &self,
        m: &Model,
        name: &str,
        pinned: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<(Arc<Version>, Option<Arc<Version>>), ApiError> {
        let get = |v: &str| m.versions.get(v).cloned();
        if let Some(v) = pinned {
            return get(v).map(|v| (v, None)).ok_or_else(|| self.no_version(name, v));
        }
        let r = &m.config.routing;
        let default = r.default.as_deref().and_then(get).or_else(|| m.latest().cloned());
        let ab = r.ab.as_ref().and_then(|ab| {
            let key = headers.get(ab.header.as_str())?.to_str().ok()?;
            get(if repo::sticky_hash(key) < ab.percent_b { &ab.b } else { &ab.a })
        });
        let canary = r
            .canary
            .as_ref()
            .filter(|c| self.percent() < self.rollouts.canary_percent(name, c))
            .and_then(|c| get(&c.version));
        let chosen = ab
            .or(canary)
            .or(default)
            .ok_or_else(|| ApiError::unavailable(format!("model `{name}` has no loaded version"), 1))?;
        let shadow = r
            .shadow
            .as_ref()
            .filter(|s| s.version != chosen.version && self.percent() < s.percent)
            .and_then(|s| get(&s.version));
        Ok((chosen, shadow))
    }
}

/// A tensor as metadata and configuration answers describe it (`-1`: any size).
pub(crate) struct TensorMeta {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

/// A model's metadata, for either protocol.
pub(crate) struct ModelInfo {
    pub versions: Vec<String>,
    pub backend: String,
    pub inputs: Vec<TensorMeta>,
    pub outputs: Vec<TensorMeta>,
}

/// A model's batching configuration (Triton's `config`), for either protocol.
pub(crate) struct ConfigInfo {
    pub max_batch_size: usize,
    pub max_queue_delay_us: u64,
    pub queue_capacity: usize,
    pub routing: Value,
    pub backend: String,
    pub inputs: Vec<TensorMeta>,
    pub outputs: Vec<TensorMeta>,
}

/// One model version of the repository index (Triton's repository extension).
pub(crate) struct IndexEntry {
    pub name: String,
    pub version: String,
    /// `READY`, `UNAVAILABLE` (it failed to load: `reason`) or `UNLOADED` (through the repository API).
    pub state: &'static str,
    pub reason: String,
}

fn tensor_meta(io: &[edgepack_runtime::IoInfo], batch: bool) -> Vec<TensorMeta> {
    io.iter()
        .map(|i| TensorMeta {
            name: i.name.clone(),
            datatype: i.dtype.map(DType::kserve_name).unwrap_or("BYTES"),
            shape: i
                .shape
                .iter()
                .enumerate()
                .map(|(k, d)| match d {
                    edgepack_runtime::onnx::Dim::Fixed(n) if !(k == 0 && batch) => *n as i64,
                    _ => -1,
                })
                .collect(),
        })
        .collect()
}

impl AppState {
    /// Whether the server is ready, and the versions that keep it from being: they failed to load and nothing
    /// serves in their place (a bad update of a loaded version keeps the old one serving: the server stays ready).
    fn readiness(&self) -> (bool, Vec<(String, String, String)>) {
        let serving = |m: &str, v: &str| {
            self.models.read().ok().is_some_and(|ms| ms.get(m).is_some_and(|x| x.versions.contains_key(v)))
        };
        let failed: Vec<(String, String, String)> = self
            .failed
            .read()
            .map(|f| {
                f.iter()
                    .filter(|((m, v), _)| !serving(m, v))
                    .map(|((m, v), e)| (m.clone(), v.clone(), e.reason.clone()))
                    .collect()
            })
            .unwrap_or_default();
        (self.ready.load(Ordering::SeqCst) && failed.is_empty(), failed)
    }

    fn model_info(&self, name: &str, version: Option<&str>) -> Result<ModelInfo, ApiError> {
        let m = self.model(name)?;
        let v = match version {
            Some(v) => m.versions.get(v).cloned().ok_or_else(|| self.no_version(name, v))?,
            None => self.route(&m, name, None, &HeaderMap::new())?.0,
        };
        let mut versions: Vec<String> = m.versions.keys().cloned().collect();
        versions.sort_by(|a, b| version_order(a, b));
        Ok(ModelInfo {
            versions,
            backend: v.session.backend_description(),
            inputs: tensor_meta(v.session.inputs(), v.batchable),
            outputs: tensor_meta(v.session.outputs(), v.batchable),
        })
    }

    /// Ok when the model (or that version of it) serves; the error says why not.
    fn model_ready(&self, name: &str, version: Option<&str>) -> Result<(), ApiError> {
        let m = self.model(name)?;
        match version {
            Some(v) if !m.versions.contains_key(v) => Err(self.no_version(name, v)),
            _ => Ok(()),
        }
    }

    fn config_info(&self, name: &str) -> Result<ConfigInfo, ApiError> {
        let m = self.model(name)?;
        let latest = m.latest().ok_or_else(|| ApiError::unavailable("no loaded version", 1))?;
        Ok(ConfigInfo {
            max_batch_size: if latest.batchable { m.config.max_batch_size } else { 0 },
            max_queue_delay_us: (m.config.max_queue_delay_ms * 1000.0) as u64,
            queue_capacity: m.config.queue_capacity,
            routing: serde_json::to_value(&m.config.routing).unwrap_or(Value::Null),
            backend: latest.session.backend_description(),
            inputs: tensor_meta(latest.session.inputs(), latest.batchable),
            outputs: tensor_meta(latest.session.outputs(), latest.batchable),
        })
    }

    /// Every model version of the repository with its state (`ready_only`: the ready ones).
    fn index(&self, ready_only: bool) -> Vec<IndexEntry> {
        let mut out = Vec::new();
        let found = repo::scan(&self.opts.repo).map(|(f, _)| f).unwrap_or_default();
        let models = self.models.read().map(|m| m.clone()).unwrap_or_default();
        let failed = self.failed.read().map(|f| f.clone()).unwrap_or_default();
        let unloaded = self.unloaded.read().map(|u| u.clone()).unwrap_or_default();
        for (name, dir) in &found {
            let mut versions: Vec<&String> = dir.versions.keys().collect();
            versions.sort_by(|a, b| version_order(a, b));
            for v in versions {
                let (state, reason) = if models.get(name).is_some_and(|m| m.versions.contains_key(v)) {
                    ("READY", String::new())
                } else if unloaded.contains(name) {
                    ("UNLOADED", "unloaded through the repository API".to_string())
                } else if let Some(f) = failed.get(&(name.clone(), v.clone())) {
                    ("UNAVAILABLE", f.reason.clone())
                } else {
                    ("UNAVAILABLE", "not loaded yet".to_string())
                };
                if !ready_only || state == "READY" {
                    out.push(IndexEntry { name: name.clone(), version: v.clone(), state, reason });
                }
            }
        }
        out
    }

    /// Loads a repository model now (again, if it failed or was unloaded); the error says why it cannot serve.
    async fn load_model(self: &Arc<Self>, name: &str) -> Result<(), ApiError> {
        let in_repo = repo::scan(&self.opts.repo).is_ok_and(|(f, _)| f.contains_key(name));
        if !in_repo {
            return Err(ApiError::not_found(format!("the repository has no model `{name}`")));
        }
        if let Ok(mut u) = self.unloaded.write() {
            u.remove(name);
        }
        // A file that failed is read again on request, changed or not.
        if let Ok(mut f) = self.failed.write() {
            f.retain(|(m, _), _| m != name);
        }
        let s = self.clone();
        let _ = tokio::task::spawn_blocking(move || sync_repo(&s)).await;
        match self.models.read().ok().and_then(|m| m.get(name).cloned()) {
            Some(_) => Ok(()),
            None => Err(self.model(name).err().unwrap_or_else(|| ApiError::unavailable("not loaded", 1))),
        }
    }

    /// Stops serving a model until it is loaded again (its versions finish the requests they hold).
    async fn unload_model(self: &Arc<Self>, name: &str) -> Result<(), ApiError> {
        let known = self.models.read().is_ok_and(|m| m.contains_key(name))
            || repo::scan(&self.opts.repo).is_ok_and(|(f, _)| f.contains_key(name));
        if !known {
            return Err(ApiError::not_found(format!("the repository has no model `{name}`")));
        }
        if let Ok(mut u) = self.unloaded.write() {
            u.insert(name.to_string());
        }
        let s = self.clone();
        let _ = tokio::task::spawn_blocking(move || sync_repo(&s)).await;
        Ok(())
    }
}

/// A parsed request checked against the version that will run it: inputs (names, types, shapes; ordered as the
/// model declares) and the outputs asked for.
fn check_request(
    v: &Version,
    inputs: Vec<(String, Tensor)>,
    wanted: &[kserve::Wanted],
) -> Result<Vec<(String, Tensor)>, ApiError> {
    let inputs = v.check_inputs(inputs)?;
    let declared: Vec<&str> = v.session.outputs().iter().map(|o| o.name.as_str()).collect();
    for o in wanted {
        if !declared.contains(&o.name.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown output `{}`; the model's outputs are {}",
                o.name,
                declared.join(", ")
            )));
        }
    }
    Ok(inputs)
}

/// The routed inference both protocols run once they have parsed their request: inputs checked against `v`,
/// queued (batched with others), mirrored to the shadow version, and the `wanted` outputs (all when empty) in
/// that order, as tensors or classification strings.
async fn run_infer(
    s: &Arc<AppState>,
    v: &Arc<Version>,
    shadow: Option<Arc<Version>>,
    inputs: Vec<(String, Tensor)>,
    wanted: &[kserve::Wanted],
    deadline: Instant,
) -> Result<Vec<(String, kserve::OutValue, bool)>, ApiError> {
    let inputs = check_request(v, inputs, wanted)?;
    let mirror = shadow.map(|sv| (sv, inputs.clone()));
    let outs = execute(v, inputs, deadline).await?;
    if let Some((sv, inputs)) = mirror {
        spawn_shadow(s.clone(), v.clone(), sv, inputs, outs.clone(), deadline);
    }
    if wanted.is_empty() {
        return Ok(outs.into_iter().map(|(n, t)| (n, kserve::OutValue::Tensor(t), false)).collect());
    }
    let offset = match v.session.postprocess() {
        Some(edgepack_runtime::process::Postprocess::Classification { label_offset, .. }) => *label_offset,
        _ => 0,
    };
    let mut selected = Vec::with_capacity(wanted.len());
    for w in wanted {
        let Some((_, t)) = outs.iter().find(|o| o.0 == w.name) else { continue };
        let value = match w.classification {
            0 => kserve::OutValue::Tensor(t.clone()),
            k => kserve::classification(t, k, v.session.labels(), offset)?,
        };
        selected.push((w.name.clone(), value, w.binary));
    }
    Ok(selected)
}

type St = State<Arc<AppState>>;

/// Runs the server until SIGTERM/SIGINT, then finishes every accepted request and returns.
pub fn serve(opts: ServeOptions) -> Result<(), ServeError> {
    init_logs(opts.log_json);
    let threads = match opts.http_threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()).max(2),
        n => n,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .thread_name("edgepack-http")
        .build()?;
    rt.block_on(run(opts))
}

fn init_logs(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("EDGEPACK_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { b.json().try_init() } else { b.with_ansi(false).try_init() };
}

async fn run(opts: ServeOptions) -> Result<(), ServeError> {
    std::fs::read_dir(&opts.repo).map_err(|e| ServeError::Repo(opts.repo.clone(), e))?;
    let listener = tokio::net::TcpListener::bind(opts.addr).await.map_err(|e| ServeError::Bind(opts.addr, e))?;
    let addr = listener.local_addr()?;
    let grpc_listener = match opts.grpc_addr {
        Some(a) => Some(tokio::net::TcpListener::bind(a).await.map_err(|e| ServeError::Bind(a, e))?),
        None => None,
    };
    let grpc_addr = grpc_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let access =
        match &opts.access_log {
            Some(p) => Some(AccessLog::open(p).map_err(|e| {
                ServeError::Io(std::io::Error::new(e.kind(), format!("access log {}: {e}", p.display())))
            })?),
            None => None,
        };
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
    let job_store = match &opts.jobs {
        Some(j) => Some(jobs::Jobs::open(j.clone()).map_err(|e| {
            ServeError::Io(std::io::Error::new(e.kind(), format!("job store {}: {e}", j.dir.display())))
        })?),
        None => None,
    };
    let state = Arc::new(AppState {
        opts: opts.clone(),
        models: RwLock::new(BTreeMap::new()),
        failed: RwLock::new(BTreeMap::new()),
        unloaded: RwLock::new(BTreeSet::new()),
        sync_lock: Mutex::new(()),
        ready: AtomicBool::new(false),
        metrics: Arc::new(Metrics::default()),
        rng: AtomicU64::new(seed | 1),
        access,
        rollouts: rollout::Rollouts::default(),
        jobs: job_store,
    });
    // Live at once (the port answers); ready after the first load has warmed every model.
    let grpc_note = grpc_addr.map(|a| format!(" and grpc://{a}")).unwrap_or_default();
    eprintln!("edgepack serve: listening on http://{addr}{grpc_note} (repository {})", opts.repo.display());
    tracing::info!(%addr, grpc = ?grpc_addr, repo = %opts.repo.display(), "listening");
    let loader = state.clone();
    tokio::spawn(async move {
        let s = loader.clone();
        let _ = tokio::task::spawn_blocking(move || sync_repo(&s)).await;
        loader.ready.store(true, Ordering::SeqCst);
        tracing::info!(models = loader.models.read().map(|m| m.len()).unwrap_or(0), "ready");
        if let Some(every) = loader.opts.poll {
            loop {
                tokio::time::sleep(every).await;
                let s = loader.clone();
                let _ = tokio::task::spawn_blocking(move || sync_repo(&s)).await;
            }
        }
    });
    jobs::start(&state);
    let app = router(state.clone());
    // One signal stops both protocols: each stops accepting and finishes the requests it has.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopping = state.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        stopping.ready.store(false, Ordering::SeqCst);
        tracing::info!("shutting down: not accepting new connections, finishing accepted requests");
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let grpc = grpc_listener.map(|l| tokio::spawn(grpc::serve(state.clone(), l, stopped(stop_rx.clone()))));
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(stopped(stop_rx))
        .await?;
    if let Some(g) = grpc {
        match g.await {
            Ok(Err(e)) => tracing::error!(error = %e, "gRPC server"),
            Err(e) => tracing::error!(error = %e, "gRPC server task"),
            Ok(Ok(())) => {}
        }
    }
    // Every HTTP request has its answer; stop the workers.
    let models = state.models.read().map(|m| m.clone()).unwrap_or_default();
    for m in models.values() {
        for v in m.versions.values() {
            v.close();
        }
    }
    for m in models.values() {
        for v in m.versions.values() {
            v.join();
        }
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Loads what changed in the repository, then swaps it in; versions no longer there stop taking requests and
/// finish the ones they have.
fn sync_repo(state: &AppState) {
    let _one = state.sync_lock.lock().unwrap_or_else(|e| e.into_inner());
    let (mut found, problems) = match repo::scan(&state.opts.repo) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %e, "scanning the model repository");
            return;
        }
    };
    for p in problems {
        tracing::warn!(problem = %p, "model repository");
    }
    // Models unloaded through the repository API stay unloaded (and their versions retire) until loaded again.
    let unloaded = state.unloaded.read().map(|u| u.clone()).unwrap_or_default();
    found.retain(|name, _| !unloaded.contains(name));
    let current = state.models.read().map(|m| m.clone()).unwrap_or_default();
    let mut failed = state.failed.read().map(|f| f.clone()).unwrap_or_default();
    // Versions gone from the repository are no longer failures.
    failed.retain(|(m, v), _| found.get(m).is_some_and(|d| d.versions.contains_key(v)));
    let mut next = BTreeMap::new();
    let mut changed = false;
    for (name, dir) in found {
        let old = current.get(&name);
        let mut versions = BTreeMap::new();
        let mut files = BTreeMap::new();
        for (v, file) in &dir.versions {
            let same_batch = old.is_some_and(|o| {
                o.config.batch() == dir.config.batch()
                    && o.config.variant == dir.config.variant
                    && o.config.threads == dir.config.threads
            });
            let reuse = old.filter(|o| same_batch && o.files.get(v) == Some(file)).and_then(|o| o.versions.get(v));
            if let Some(r) = reuse {
                versions.insert(v.clone(), r.clone());
                files.insert(v.clone(), file.clone());
                continue;
            }
            // The same file failed before: not read again (nor logged again) until it changes.
            let key = (name.clone(), v.clone());
            if failed.get(&key).is_some_and(|f| &f.file == file) {
                if let Some(prev) = old.and_then(|o| o.versions.get(v)) {
                    versions.insert(v.clone(), prev.clone());
                    if let Some(f) = old.and_then(|o| o.files.get(v)) {
                        files.insert(v.clone(), f.clone());
                    }
                }
                continue;
            }
            changed = true;
            let t0 = Instant::now();
            let mut opts = SessionOptions { variant: dir.config.variant.clone(), ..state.opts.session.clone() };
            if let Some(t) = dir.config.threads {
                opts.threads = t;
            }
            match engine::load(&file.0, &opts, &name, v, dir.config.batch(), state.metrics.clone()) {
                Ok(loaded) => {
                    tracing::info!(model = %name, version = %v, backend = %loaded.session.backend_description(),
                        batching = loaded.batchable, load_ms = t0.elapsed().as_millis() as u64, "loaded and warmed up");
                    versions.insert(v.clone(), loaded);
                    files.insert(v.clone(), file.clone());
                    failed.remove(&key);
                }
                Err(e) => {
                    // Logged once per change of the file; the version is listed as unavailable with the reason.
                    tracing::error!(model = %name, version = %v, error = %e, "loading failed");
                    failed.insert(key, Failure { file: file.clone(), reason: e.to_string() });
                    if old.and_then(|o| o.versions.get(v)).is_none() {
                        state.metrics.set("edgepack_model_ready", &[("model", &name), ("version", v)], 0.0);
                    }
                    // Keep serving what was there.
                    if let Some(prev) = old.and_then(|o| o.versions.get(v)) {
                        versions.insert(v.clone(), prev.clone());
                        if let Some(f) = old.and_then(|o| o.files.get(v)) {
                            files.insert(v.clone(), f.clone());
                        }
                    }
                }
            }
        }
        if old.is_none_or(|o| o.config != dir.config) {
            changed = true;
        }
        if !versions.is_empty() {
            next.insert(name, Arc::new(Model { config: dir.config, versions, files }));
        }
    }
    let retired: Vec<Arc<Version>> = current
        .iter()
        .flat_map(|(name, m)| {
            let kept = next.get(name);
            m.versions
                .iter()
                .filter(move |(v, old)| !kept.and_then(|k| k.versions.get(*v)).is_some_and(|n| Arc::ptr_eq(n, old)))
                .map(|(_, old)| old.clone())
        })
        .collect();
    if let Ok(mut f) = state.failed.write() {
        *f = failed;
    }
    if !changed && retired.is_empty() {
        return;
    }
    if let Ok(mut m) = state.models.write() {
        *m = next;
    }
    for r in retired {
        tracing::info!(model = %r.model, version = %r.version, "unloaded (finishing its queued requests)");
        r.close();
    }
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/config", get(model_config))
        .route("/v2/models/{model}/rollout", get(model_rollout))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata_v))
        .route("/v2/models/{model}/versions/{version}/ready", get(model_ready_v))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer_v))
        .route("/v1/models/{spec}", post(classify))
        .route("/v1/models/{spec}/jobs", post(image_job))
        .route("/metrics", get(metrics))
        .route("/v2/openapi.json", get(openapi))
        .route("/v2/docs", get(docs))
        .route("/v2/models/{model}/jobs", post(job_submit))
        .route("/v2/models/{model}/versions/{version}/jobs", post(job_submit_v))
        .route("/v2/jobs/{id}", get(job_get).delete(job_delete))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/{action}", post(repository_load))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), access_log))
        .with_state(state)
}

/// Writes the access log line of an HTTP request (when `--access-log` is on).
async fn access_log(State(s): St, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if s.access.is_none() {
        return next.run(req).await;
    }
    let t0 = Instant::now();
    let header = |h: &HeaderMap, k: header::HeaderName| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let remote = req.extensions().get::<axum::extract::ConnectInfo<SocketAddr>>().map(|c| c.0.to_string());
    let (req_bytes, agent) = (header(req.headers(), header::CONTENT_LENGTH), header(req.headers(), header::USER_AGENT));
    let resp = next.run(req).await;
    if let Some(log) = &s.access {
        log.write(json!({
            "proto": "http",
            "remote": remote,
            "method": method,
            "path": path,
            "status": resp.status().as_u16(),
            "ms": (t0.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            "request_bytes": req_bytes.and_then(|v| v.parse::<u64>().ok()),
            "response_bytes": header(resp.headers(), header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok()),
            "user_agent": agent,
        }));
    }
    resp
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint (see /v2/openapi.json)")
}

async fn server_metadata() -> Response {
    axum::Json(json!({
        "name": "edgepack",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "classify", "detect"],
    }))
    .into_response()
}

async fn live() -> Response {
    axum::Json(json!({ "live": true })).into_response()
}

async fn ready(State(s): St) -> Response {
    let (r, failed) = s.readiness();
    let status = if r { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut body = json!({ "ready": r });
    if !failed.is_empty() {
        body["unavailable"] =
            failed.iter().map(|(m, v, reason)| json!({"model": m, "version": v, "reason": reason})).collect();
    }
    (status, axum::Json(body)).into_response()
}

fn meta_json(t: &[TensorMeta]) -> Vec<Value> {
    t.iter().map(|t| json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape })).collect()
}

fn metadata(s: &AppState, name: &str, version: Option<&str>) -> Result<Response, ApiError> {
    let i = s.model_info(name, version)?;
    Ok(axum::Json(json!({
        "name": name,
        "versions": i.versions,
        "platform": "edgepack",
        "backend": i.backend,
        "inputs": meta_json(&i.inputs),
        "outputs": meta_json(&i.outputs),
    }))
    .into_response())
}

async fn model_metadata(State(s): St, Path(m): Path<String>) -> Result<Response, ApiError> {
    metadata(&s, &m, None)
}

async fn model_metadata_v(State(s): St, Path((m, v)): Path<(String, String)>) -> Result<Response, ApiError> {
    metadata(&s, &m, Some(&v))
}

fn model_ready_inner(s: &AppState, name: &str, version: Option<&str>) -> Result<Response, ApiError> {
    s.model_ready(name, version)?;
    Ok(axum::Json(json!({ "name": name, "ready": true })).into_response())
}

async fn model_ready(State(s): St, Path(m): Path<String>) -> Result<Response, ApiError> {
    model_ready_inner(&s, &m, None)
}

async fn model_ready_v(State(s): St, Path((m, v)): Path<(String, String)>) -> Result<Response, ApiError> {
    model_ready_inner(&s, &m, Some(&v))
}

async fn model_config(State(s): St, Path(name): Path<String>) -> Result<Response, ApiError> {
    let c = s.config_info(&name)?;
    Ok(axum::Json(json!({
        "name": name,
        "max_batch_size": c.max_batch_size,
        "dynamic_batching": { "max_queue_delay_microseconds": c.max_queue_delay_us },
        "queue_capacity": c.queue_capacity,
        "routing": c.routing,
        "input": meta_json(&c.inputs),
        "output": meta_json(&c.outputs),
    }))
    .into_response())
}

async fn job_submit(State(s): St, Path(m): Path<String>, headers: HeaderMap, body: Body) -> Response {
    jobs::submit(s, m, None, headers, body).await
}

async fn job_submit_v(State(s): St, Path((m, v)): Path<(String, String)>, headers: HeaderMap, body: Body) -> Response {
    jobs::submit(s, m, Some(v), headers, body).await
}

async fn job_get(State(s): St, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(axum::Json(jobs::get(&s, &id)?).into_response())
}

async fn job_delete(State(s): St, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(axum::Json(jobs::delete(&s, &id)?).into_response())
}

async fn model_rollout(State(s): St, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(axum::Json(s.rollout(&name)?).into_response())
}

/// `POST /v2/repository/index` (Triton's repository extension): every model version with its state; body
/// `{"ready": true}` lists only the ready ones.
async fn repository_index(State(s): St, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(&s, &headers, body).await?;
    let ready_only = if bytes.iter().all(u8::is_ascii_whitespace) {
        false
    } else {
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?;
        match v.as_object().map(|o| o.get("ready")) {
            None => return Err(ApiError::bad_request("the body must be a JSON object")),
            Some(None) => false,
            Some(Some(Value::Bool(b))) => *b,
            Some(Some(_)) => return Err(ApiError::bad_request("`ready` must be a boolean")),
        }
    };
    let rows: Vec<Value> = s
        .index(ready_only)
        .into_iter()
        .map(|e| {
            let mut r = json!({ "name": e.name, "version": e.version, "state": e.state });
            if !e.reason.is_empty() {
                r["reason"] = json!(e.reason);
            }
            r
        })
        .collect();
    Ok(axum::Json(rows).into_response())
}

/// `POST /v2/repository/models/{m}/load` and `/unload`.
async fn repository_load(State(s): St, Path((name, action)): Path<(String, String)>) -> Result<Response, ApiError> {
    match action.as_str() {
        "load" => s.load_model(&name).await?,
        "unload" => s.unload_model(&name).await?,
        _ => return Err(ApiError::not_found("no such endpoint (POST .../load or .../unload)")),
    }
    tracing::info!(model = %name, action, "repository request");
    Ok(StatusCode::OK.into_response())
}

async fn metrics(State(s): St) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("openapi.json")).into_response()
}

/// `GET /v2/docs`: Swagger UI over `/v2/openapi.json` (its assets from `--swagger-ui`).
async fn docs(State(s): St) -> Response {
    let base = s.opts.swagger_ui.trim_end_matches('/');
    let esc = |v: &str| v.replace('&', "&amp;").replace('"', "&quot;").replace('<', "&lt;");
    let page = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>edgepack serve: API</title>\n\
         <link rel=\"stylesheet\" href=\"{b}/swagger-ui.css\"></head>\n<body><div id=\"swagger-ui\"></div>\n\
         <script src=\"{b}/swagger-ui-bundle.js\"></script>\n\
         <script>window.ui = SwaggerUIBundle({{url: \"openapi.json\", dom_id: \"#swagger-ui\"}});</script>\n\
         </body></html>\n",
        b = esc(base)
    );
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
}

/// Whether the request's Content-Length says it is over `limit` bytes (refused before reading it).
fn declared_over(headers: &HeaderMap, limit: usize) -> bool {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok()).is_some_and(|n| n > limit)
}

/// The request body, at most `max_body_bytes` (413 beyond).
async fn read_body(s: &AppState, headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, ApiError> {
    let limit = s.opts.max_body_bytes;
    let too_big = || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body over {limit} bytes"));
    if declared_over(headers, limit) {
        return Err(too_big());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.to_string().contains("length limit"))
            || e.to_string().contains("length limit")
        {
            too_big()
        } else {
            ApiError::bad_request(format!("reading the body: {e}"))
        }
    })
}

fn deadline(s: &AppState, headers: &HeaderMap, timeout_us: Option<u64>) -> Instant {
    let header_ms = headers.get("x-request-timeout-ms").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let d = timeout_us
        .map(Duration::from_micros)
        .or(header_ms.map(Duration::from_millis))
        .unwrap_or(s.opts.request_timeout)
        .min(s.opts.request_timeout.max(Duration::from_secs(1)) * 10);
    Instant::now() + d
}

/// Queues `inputs` on `v` and waits for the result until `deadline` (504 after it).
async fn execute(v: &Version, inputs: Vec<(String, Tensor)>, deadline: Instant) -> Result<Outputs, ApiError> {
    let (tx, rx) = oneshot::channel();
    v.submit(Job { inputs, deadline, enqueued: Instant::now(), reply: tx })?;
    match tokio::time::timeout_at(deadline.into(), rx).await {
        Err(_) => Err(ApiError::new(StatusCode::GATEWAY_TIMEOUT, "deadline exceeded")),
        Ok(Err(_)) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the worker dropped the request")),
        Ok(Ok(r)) => r,
    }
}

/// Records the request's metrics around `f`.
async fn instrumented<F>(s: &AppState, model: &str, endpoint: &'static str, f: F) -> Response
where
    F: std::future::Future<Output = Result<(Response, String), (ApiError, String)>>,
{
    let t0 = Instant::now();
    let (resp, version) = match f.await {
        Ok(x) => x,
        Err((e, v)) => {
            if e.status.is_server_error() {
                tracing::warn!(model, version = %v, status = e.status.as_u16(), error = %e.message, "request failed");
            }
            (e.into_response(), v)
        }
    };
    s.record(model, &version, endpoint, resp.status().as_u16(), t0.elapsed());
    resp
}

impl AppState {
    /// Counts a request and its duration (both protocols).
    fn record(&self, model: &str, version: &str, endpoint: &str, status: u16, took: Duration) {
        // Names a client made up never become label values (unbounded series): they count as `_unknown`.
        let served = self.models.read().ok().and_then(|m| m.get(model).cloned());
        let known = served.as_ref().is_some_and(|m| version.is_empty() || m.versions.contains_key(version));
        let (model, version) = if known { (model, version) } else { ("_unknown", "") };
        let l = [("model", model), ("version", version)];
        let code = status.to_string();
        self.metrics.inc("edgepack_requests_total", &[l[0], l[1], ("endpoint", endpoint), ("status", &code)]);
        self.metrics.observe("edgepack_request_duration_seconds", &l, took.as_secs_f64());
        // Rollout statistics: answered inferences of a known version; server errors count against it.
        if let (Some(m), false) = (served.filter(|_| known), version.is_empty())
            && matches!(endpoint, "infer" | "grpc_infer" | "classify" | "detect")
            && let Some(d) =
                self.rollouts.record(model, version, status < 500, took.as_secs_f64() * 1e3, &m.config.routing)
        {
            tracing::info!(model = %d.model, version = %d.version, action = d.action, from_percent = d.from_percent,
                to_percent = d.to_percent, requests = d.requests, error_rate = d.error_rate,
                p99_ms = d.p99_ms.unwrap_or(0.0),
                reason = %d.reason, "canary decision");
            let l = [("model", d.model.as_str()), ("version", d.version.as_str())];
            self.metrics.inc("edgepack_rollout_decisions_total", &[l[0], l[1], ("decision", d.action)]);
            self.metrics.set("edgepack_canary_percent", &l, d.to_percent);
        }
    }

    /// `GET /v2/models/{m}/rollout`.
    fn rollout(&self, name: &str) -> Result<Value, ApiError> {
        let m = self.model(name)?;
        let baseline =
            m.config.routing.default.clone().or_else(|| m.latest().map(|v| v.version.clone())).unwrap_or_default();
        Ok(self.rollouts.report(name, &m.config.routing, &baseline))
    }
}

async fn infer(State(s): St, Path(m): Path<String>, headers: HeaderMap, body: Body) -> Response {
    let f = infer_inner(s.clone(), m.clone(), None, headers, body);
    instrumented(&s, &m, "infer", f).await
}

async fn infer_v(State(s): St, Path((m, v)): Path<(String, String)>, headers: HeaderMap, body: Body) -> Response {
    let f = infer_inner(s.clone(), m.clone(), Some(v), headers, body);
    instrumented(&s, &m, "infer", f).await
}

async fn infer_inner(
    s: Arc<AppState>,
    name: String,
    pinned: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(Response, String), (ApiError, String)> {
    let unknown = || pinned.clone().unwrap_or_default();
    let model = s.model(&name).map_err(|e| (e, unknown()))?;
    let (v, shadow) = s.route(&model, &name, pinned.as_deref(), &headers).map_err(|e| (e, unknown()))?;
    let ver = v.version.clone();
    let fail = |e: ApiError| (e, ver.clone());
    let bytes = read_body(&s, &headers, body).await.map_err(fail)?;
    let json_len = kserve::json_len(&headers).map_err(fail)?;
    let req = kserve::parse_request(&bytes, json_len).map_err(fail)?;
    drop(bytes);
    let deadline = deadline(&s, &headers, req.timeout_us);
    let mut selected = run_infer(&s, &v, shadow, req.inputs, &req.outputs, deadline).await.map_err(fail)?;
    if req.outputs.is_empty() {
        for o in &mut selected {
            o.2 = req.binary_default;
        }
    }
    let r = kserve::response(&name, &v.version, req.id.as_deref(), &selected);
    let mut resp = Response::new(Body::from(r.body));
    let h = resp.headers_mut();
    match r.json_len {
        Some(n) => {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            h.insert(kserve::HEADER_LEN, HeaderValue::from(n));
        }
        None => {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
    }
    Ok((resp, v.version.clone()))
}

/// Mirrors a request to the shadow version; compares its first output with the answer returned (same top-1 per
/// row for classifier-like outputs, relative L2 error under 1 % otherwise), logs and counts. Never blocks or
/// fails the request: a full shadow queue drops the mirror.
fn spawn_shadow(
    s: Arc<AppState>,
    primary: Arc<Version>,
    shadow: Arc<Version>,
    inputs: Vec<(String, Tensor)>,
    answer: Outputs,
    deadline: Instant,
) {
    tokio::spawn(async move {
        let l = [("model", primary.model.as_str()), ("version", shadow.version.as_str())];
        let inputs = match shadow.check_inputs(inputs) {
            Ok(i) => i,
            Err(e) => {
                s.metrics.inc("edgepack_shadow_requests_total", &[l[0], l[1], ("result", "error")]);
                tracing::warn!(model = %primary.model, shadow = %shadow.version, error = %e.message, "shadow: inputs do not fit");
                return;
            }
        };
        let result = match execute(&shadow, inputs, deadline + Duration::from_secs(5)).await {
            Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => "dropped",
            Err(_) => "error",
            Ok(outs) => match (answer.first(), outs.first()) {
                (Some(a), Some(b)) if agree(&a.1, &b.1) => "agree",
                _ => "disagree",
            },
        };
        s.metrics.inc("edgepack_shadow_requests_total", &[l[0], l[1], ("result", result)]);
        if matches!(result, "agree" | "disagree") {
            s.rollouts.shadow(&primary.model, &shadow.version, result == "agree");
        }
        if result != "agree" {
            tracing::info!(model = %primary.model, version = %primary.version, shadow = %shadow.version, result, "shadow comparison");
        }
    });
}

fn agree(a: &Tensor, b: &Tensor) -> bool {
    if a.shape() != b.shape() || a.is_empty() {
        return a.shape() == b.shape();
    }
    let (x, y) = (a.to_f32_vec(), b.to_f32_vec());
    let last = *a.shape().last().unwrap_or(&1);
    if a.shape().len() == 2 && last > 1 {
        let argmax = |r: &[f32]| r.iter().enumerate().max_by(|p, q| p.1.total_cmp(q.1)).map(|p| p.0);
        return x.chunks(last).zip(y.chunks(last)).all(|(p, q)| argmax(p) == argmax(q));
    }
    let err: f64 = x.iter().zip(&y).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
    let norm: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum();
    err <= 1e-4 * norm.max(1e-12)
}

/// The first image's classes with labels in display form, as `edgepack run` prints them (classify, batch).
fn display_top(classes: Vec<Vec<edgepack_runtime::process::ClassScore>>) -> Vec<edgepack_runtime::process::ClassScore> {
    let mut top = classes.into_iter().next().unwrap_or_default();
    for c in &mut top {
        c.label = c.label.as_deref().map(|l| edgepack_runtime::process::display_label(l).to_string());
    }
    top
}

/// What `POST /v1/models/{m}:<verb>` does with a raw image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum ImageVerb {
    Classify,
    Detect,
}

impl ImageVerb {
    fn name(self) -> &'static str {
        match self {
            ImageVerb::Classify => "classify",
            ImageVerb::Detect => "detect",
        }
    }

    fn parse(s: &str) -> Option<ImageVerb> {
        match s {
            "classify" => Some(ImageVerb::Classify),
            "detect" => Some(ImageVerb::Detect),
            _ => None,
        }
    }
}

/// `{model}:{verb}` and the image endpoints' query (`top_k`, `version`), checked.
fn image_call(spec: &str, query: Option<&str>) -> Result<(String, ImageVerb, Option<usize>, Option<String>), ApiError> {
    let mut top_k = None;
    let mut version = None;
    for (k, v) in query.unwrap_or("").split('&').filter(|p| !p.is_empty()).filter_map(|p| p.split_once('=')) {
        match k {
            "top_k" => match v.parse::<usize>() {
                Ok(n) if (1..=1000).contains(&n) => top_k = Some(n),
                _ => return Err(ApiError::bad_request(format!("top_k must be an integer in 1..=1000, got `{v}`"))),
            },
            "version" if !v.is_empty() => version = Some(v.to_string()),
            _ => {}
        }
    }
    match spec.rsplit_once(':').and_then(|(n, v)| Some((n, ImageVerb::parse(v)?))) {
        Some((n, verb)) => Ok((n.to_string(), verb, top_k, version)),
        None => {
            Err(ApiError::not_found(format!("unknown verb in `{spec}` (POST /v1/models/<model>:classify or :detect)")))
        }
    }
}

/// `POST /v1/models/{m}:classify/jobs` and `:detect/jobs`: the raw image as an asynchronous job.
async fn image_job(
    State(s): St,
    Path(spec): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match image_call(&spec, query.as_deref()) {
        Ok((name, verb, top_k, version)) => jobs::submit_image(s, name, version, verb, top_k, headers, body).await,
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/models/{m}:classify` and `:detect`: a raw JPEG/PNG body through the bundle's pre- and
/// post-processing; labels and scores, or boxes in pixels of the image. `?top_k=N` (classify), `?version=V`.
async fn classify(
    State(s): St,
    Path(spec): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Parsed here so a bad value is a KServe error body like every other.
    let (name, verb, top_k, version) = match image_call(&spec, query.as_deref()) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let what = verb.name();
    let f = image_inner(s.clone(), name.clone(), verb, top_k, version, headers, body);
    instrumented(&s, &name, what, f).await
}

async fn image_inner(
    s: Arc<AppState>,
    name: String,
    verb: ImageVerb,
    top_k: Option<usize>,
    version: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(Response, String), (ApiError, String)> {
    let model = s.model(&name).map_err(|e| (e, String::new()))?;
    let (v, _) = s.route(&model, &name, version.as_deref(), &headers).map_err(|e| (e, String::new()))?;
    let ver = v.version.clone();
    let fail = |e: ApiError| (e, ver.clone());
    check_image_model(&v, &name).map_err(fail)?;
    let bytes = read_body(&s, &headers, body).await.map_err(fail)?;
    let body = run_image(&v, &name, verb, top_k, bytes.to_vec(), deadline(&s, &headers, None)).await.map_err(fail)?;
    Ok((axum::Json(body).into_response(), v.version.clone()))
}

/// A raw image can only go to a model packed with its pre-processing.
fn check_image_model(v: &Version, name: &str) -> Result<(), ApiError> {
    match v.session.preprocess() {
        Some(_) => Ok(()),
        None => {
            Err(ApiError::bad_request(format!("model `{name}` has no image pre-processing (pack it with --preset)")))
        }
    }
}

/// A raw JPEG/PNG through `v`'s pre-processing, its batching queue and post-processing: top classes or boxes.
async fn run_image(
    v: &Arc<Version>,
    name: &str,
    verb: ImageVerb,
    top_k: Option<usize>,
    bytes: Vec<u8>,
    deadline: Instant,
) -> Result<Value, ApiError> {
    let vv = v.clone();
    let batch = tokio::task::spawn_blocking(move || vv.session.image_input(&[&bytes]))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::from_runtime(&e))?;
    let size = batch.sizes[0];
    let inputs = v.check_inputs(vec![(batch.input, batch.tensor)])?;
    let outs = execute(v, inputs, deadline).await?;
    Ok(match verb {
        ImageVerb::Classify => {
            let classes = v.session.classify_outputs(&outs, top_k).map_err(|e| ApiError::from_runtime(&e))?;
            json!({ "model_name": name, "model_version": v.version, "predictions": display_top(classes) })
        }
        ImageVerb::Detect => {
            let dets = v.session.detections_from_outputs(&outs, size).map_err(|e| ApiError::from_runtime(&e))?;
            json!({ "model_name": name, "model_version": v.version, "detections": dets })
        }
    })
}
