//! Asynchronous inference jobs: submit now, fetch the result later (SageMaker's async inference, the queue-plus-
//! workers pattern), durable on disk.
//!
//! `POST /v2/models/{m}[/versions/{v}]/jobs` takes a KServe v2 request body (JSON, or JSON and binary tensors with
//! `Inference-Header-Content-Length`), streams it to the job store (at most `--max-job-mib`, never whole in memory
//! before it is on disk), fsyncs it and its record, and only then answers `202 {"id", "status": "queued"}` with a
//! `Location`: an accepted job is never lost. Workers run queued jobs through the same routing, batching queue and
//! checks as `infer`; `GET /v2/jobs/{id}` gives `queued|running|succeeded|failed|cancelled` and, once succeeded, the
//! KServe response as `result` (JSON tensors); `DELETE /v2/jobs/{id}` cancels a job that has not finished (a running
//! one finishes but its result is dropped) or deletes a finished one. Finished jobs are deleted `--job-ttl-s` after
//! they finish. A `x-edgepack-webhook: http://…` header on the submission has the final record POSTed there when
//! the job finishes, retried with backoff (1, 2, 4, 8 s) until it answers 2xx; its delivery is recorded, so a
//! restart neither loses nor repeats it.
//!
//! Store: `<jobs dir>/<id>/request.bin` and `meta.json`, replaced atomically (`fsutil::write_atomic`), and
//! `result.json`. A server killed at any point finds its jobs at the next start: queued and running ones run (again:
//! at-least-once execution, one result per id, since a rerun replaces the result of the same id), undelivered
//! webhooks are sent.
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::error::ApiError;
use crate::{AppState, kserve};

/// The header naming a job's webhook.
pub const WEBHOOK_HEADER: &str = "x-edgepack-webhook";

/// How jobs are stored and kept.
#[derive(Debug, Clone)]
pub struct JobOptions {
    pub dir: PathBuf,
    pub max_bytes: usize,
    /// Finished jobs are deleted this long after they finish.
    pub ttl: Duration,
    /// Jobs run at once (each through its model version's batching queue); 0: accepted and stored, not run.
    pub workers: usize,
}

/// A job's record (`meta.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub id: String,
    pub model: String,
    /// The version asked for (None: routed like `infer`).
    pub version: Option<String>,
    pub status: String,
    pub created: String,
    pub created_unix_ms: u64,
    #[serde(default)]
    pub started: Option<String>,
    #[serde(default)]
    pub finished: Option<String>,
    #[serde(default)]
    pub finished_unix_ms: Option<u64>,
    /// The version that ran it.
    #[serde(default)]
    pub ran_on: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    /// The HTTP status `infer` would have answered.
    #[serde(default)]
    pub http_status: Option<u16>,
    #[serde(default)]
    pub json_len: Option<usize>,
    #[serde(default)]
    pub webhook: Option<String>,
    #[serde(default)]
    pub webhook_attempts: u32,
    #[serde(default)]
    pub webhook_delivered: bool,
}

impl Meta {
    fn finished(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "cancelled")
    }
}

pub struct Jobs {
    pub opts: JobOptions,
    queue: Mutex<VecDeque<String>>,
    /// Queued jobs: id → (model, created ms), for the depth and age metrics.
    waiting: Mutex<BTreeMap<String, (String, u64)>>,
    wake: tokio::sync::Notify,
    /// Running jobs a DELETE asked to cancel.
    cancel: Mutex<HashSet<String>>,
    /// One writer of job records at a time (the atomic write's temp file is per path and process).
    write: Mutex<()>,
    seq: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn stamp(ms: u64) -> String {
    edgepack_runtime::utc_rfc3339(ms / 1000, Some((ms % 1000) as u32))
}

fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Jobs {
    pub fn open(opts: JobOptions) -> std::io::Result<Jobs> {
        std::fs::create_dir_all(&opts.dir)?;
        edgepack_runtime::fsutil::check_writable(&opts.dir.join("meta.json"))?;
        Ok(Jobs {
            opts,
            queue: Mutex::new(VecDeque::new()),
            waiting: Mutex::new(BTreeMap::new()),
            wake: tokio::sync::Notify::new(),
            cancel: Mutex::new(HashSet::new()),
            write: Mutex::new(()),
            seq: AtomicU64::new(0),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.opts.dir.join(id)
    }

    fn read(&self, id: &str) -> Option<Meta> {
        if !valid_id(id) {
            return None;
        }
        serde_json::from_slice(&std::fs::read(self.path(id).join("meta.json")).ok()?).ok()
    }

    fn save(&self, m: &Meta) -> std::io::Result<()> {
        let _one = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = serde_json::to_vec_pretty(m).map_err(std::io::Error::other)?;
        edgepack_runtime::fsutil::write_atomic(&self.path(&m.id).join("meta.json"), &bytes)
    }

    fn new_id(&self) -> String {
        // Time, a per-process counter and the process id, mixed (splitmix64): unique, not guessable in order.
        let mix = |mut z: u64| {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{:016x}", mix(t ^ u64::from(std::process::id()) << 32), mix(n ^ t.rotate_left(17)))
    }

    fn enqueue(&self, m: &Meta) {
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(m.id.clone(), (m.model.clone(), m.created_unix_ms));
        }
        if let Ok(mut q) = self.queue.lock() {
            q.push_back(m.id.clone());
        }
        self.wake.notify_one();
    }

    /// Every job on disk at start: unfinished ones queued again (oldest first), undelivered webhooks returned.
    fn recover(&self) -> Vec<Meta> {
        let mut all: Vec<Meta> = std::fs::read_dir(&self.opts.dir)
            .map(|d| d.flatten().filter_map(|e| self.read(&e.file_name().to_string_lossy())).collect())
            .unwrap_or_default();
        all.sort_by_key(|m| m.created_unix_ms);
        let mut hooks = Vec::new();
        for mut m in all {
            if !m.finished() {
                if m.status == "running" {
                    m.status = "queued".into();
                    let _ = self.save(&m);
                }
                self.enqueue(&m);
            } else if m.webhook.is_some() && !m.webhook_delivered {
                hooks.push(m);
            }
        }
        hooks
    }

    /// Deletes finished jobs past their time to live.
    fn sweep(&self) {
        let ttl = self.opts.ttl.as_millis() as u64;
        let now = now_ms();
        for e in std::fs::read_dir(&self.opts.dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(m) = self.read(&name)
                && m.finished()
                && m.finished_unix_ms.is_some_and(|f| f + ttl < now)
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    fn set_gauges(&self, s: &AppState) {
        let waiting = self.waiting.lock().map(|w| w.clone()).unwrap_or_default();
        let mut per: BTreeMap<String, (usize, u64)> = BTreeMap::new();
        for (model, created) in waiting.values() {
            let e = per.entry(model.clone()).or_insert((0, u64::MAX));
            e.0 += 1;
            e.1 = e.1.min(*created);
        }
        let models: Vec<String> = s.models.read().map(|m| m.keys().cloned().collect()).unwrap_or_default();
        let now = now_ms();
        for m in models.iter().chain(per.keys()) {
            let (n, oldest) = per.get(m).copied().unwrap_or((0, now));
            s.metrics.set("edgepack_jobs_queued", &[("model", m)], n as f64);
            s.metrics.set("edgepack_jobs_oldest_age_seconds", &[("model", m)], now.saturating_sub(oldest) as f64 / 1e3);
        }
    }
}

/// Starts the job workers, the webhook retries of jobs finished before a restart, and the time-to-live sweep.
pub fn start(s: &Arc<AppState>) {
    let Some(jobs) = s.jobs.as_ref() else { return };
    for m in jobs.recover() {
        tokio::spawn(deliver(s.clone(), m));
    }
    jobs.set_gauges(s);
    for _ in 0..jobs.opts.workers {
        let s = s.clone();
        tokio::spawn(async move {
            loop {
                let next = s.jobs.as_ref().and_then(|j| j.queue.lock().ok()?.pop_front());
                match next {
                    Some(id) => run(&s, &id).await,
                    None => match s.jobs.as_ref() {
                        Some(j) => {
                            let _ = tokio::time::timeout(Duration::from_secs(1), j.wake.notified()).await;
                        }
                        None => return,
                    },
                }
            }
        });
    }
    let sweeper = s.clone();
    tokio::spawn(async move {
        loop {
            if let Some(j) = sweeper.jobs.as_ref() {
                j.sweep();
                j.set_gauges(&sweeper);
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
}

/// `POST /v2/models/{m}[/versions/{v}]/jobs`.
pub async fn submit(
    s: Arc<AppState>,
    model: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match submit_inner(&s, model, version, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn submit_inner(
    s: &Arc<AppState>,
    model: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let jobs = s.jobs.as_ref().ok_or_else(|| ApiError::not_found("asynchronous jobs are off (--jobs-dir none)"))?;
    // Refused at once when the model (or version) is unknown: a job that can never run is not accepted.
    let m = s.model(&model)?;
    if let Some(v) = &version
        && !m.versions.contains_key(v)
    {
        return Err(s.no_version(&model, v));
    }
    let webhook = match headers.get(WEBHOOK_HEADER) {
        None => None,
        Some(h) => {
            let url = h.to_str().ok().filter(|u| u.starts_with("http://") || u.starts_with("https://"));
            Some(
                url.ok_or_else(|| ApiError::bad_request(format!("{WEBHOOK_HEADER} must be an http(s) URL")))?
                    .to_string(),
            )
        }
    };
    let json_len = match headers.get(kserve::HEADER_LEN) {
        None => None,
        Some(h) => Some(
            h.to_str()
                .ok()
                .and_then(|x| x.parse::<usize>().ok())
                .ok_or_else(|| ApiError::bad_request(format!("invalid {} header", kserve::HEADER_LEN)))?,
        ),
    };
    let limit = jobs.opts.max_bytes;
    let too_big = || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("job request over {limit} bytes"));
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n > limit)
    {
        return Err(too_big());
    }
    let id = jobs.new_id();
    let dir = jobs.path(&id);
    let io = |e: std::io::Error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("job store: {e}"));
    tokio::fs::create_dir_all(&dir).await.map_err(io)?;
    let stored = stream_to(&dir.join("request.bin"), body, limit).await;
    if let Err(e) = stored {
        let _ = tokio::fs::remove_dir_all(&dir).await;
        return Err(match e {
            Stream::TooBig => too_big(),
            Stream::Body(m) => ApiError::bad_request(format!("reading the body: {m}")),
            Stream::Io(e) => io(e),
        });
    }
    // A request `infer` would refuse is refused now, not accepted to fail later.
    let (v, _) = s.route(&m, &model, version.as_deref(), &HeaderMap::new())?;
    let path = dir.join("request.bin");
    let checked = tokio::task::spawn_blocking(move || -> Result<(), ApiError> {
        let bytes =
            std::fs::read(&path).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let req = kserve::parse_request(&bytes, json_len)?;
        crate::check_request(&v, req.inputs, &req.outputs).map(drop)
    })
    .await
    .unwrap_or_else(|e| Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())));
    if let Err(e) = checked {
        let _ = tokio::fs::remove_dir_all(&dir).await;
        return Err(e);
    }
    let now = now_ms();
    let meta = Meta {
        id: id.clone(),
        model,
        version,
        status: "queued".into(),
        created: stamp(now),
        created_unix_ms: now,
        started: None,
        finished: None,
        finished_unix_ms: None,
        ran_on: None,
        error: None,
        http_status: None,
        json_len,
        webhook,
        webhook_attempts: 0,
        webhook_delivered: false,
    };
    // Durable before the 202: the record is fsynced and renamed into place (the request already is).
    jobs.save(&meta).map_err(io)?;
    s.metrics.inc("edgepack_jobs_total", &[("model", &meta.model), ("status", "queued")]);
    jobs.enqueue(&meta);
    jobs.set_gauges(s);
    let location = format!("/v2/jobs/{id}");
    let mut r = (StatusCode::ACCEPTED, axum::Json(json!({ "id": id, "status": "queued" }))).into_response();
    if let Ok(v) = location.parse() {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

enum Stream {
    TooBig,
    Body(String),
    Io(std::io::Error),
}

/// Writes the body to `path` as it arrives (fsynced, renamed into place), refusing more than `limit` bytes.
async fn stream_to(path: &Path, body: Body, limit: usize) -> Result<(), Stream> {
    use futures_util::StreamExt;
    let tmp = path.with_extension("part");
    let mut f = tokio::fs::File::create(&tmp).await.map_err(Stream::Io)?;
    let mut data = body.into_data_stream();
    let mut n = 0usize;
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(|e| Stream::Body(e.to_string()))?;
        n += chunk.len();
        if n > limit {
            return Err(Stream::TooBig);
        }
        f.write_all(&chunk).await.map_err(Stream::Io)?;
    }
    f.sync_all().await.map_err(Stream::Io)?;
    drop(f);
    tokio::fs::rename(&tmp, path).await.map_err(Stream::Io)
}

/// `GET /v2/jobs/{id}`: the record, and the KServe response as `result` once succeeded.
pub fn get(s: &AppState, id: &str) -> Result<Value, ApiError> {
    let jobs = s.jobs.as_ref().ok_or_else(|| ApiError::not_found("asynchronous jobs are off"))?;
    let m = jobs.read(id).ok_or_else(|| ApiError::not_found(format!("no job `{id}`")))?;
    Ok(record(jobs, &m))
}

fn record(jobs: &Jobs, m: &Meta) -> Value {
    let mut v = json!({
        "id": m.id, "model": m.model, "status": m.status, "created": m.created,
        "started": m.started, "finished": m.finished,
    });
    if let Some(x) = &m.version {
        v["version"] = json!(x);
    }
    if let Some(x) = &m.ran_on {
        v["model_version"] = json!(x);
    }
    if let Some(e) = &m.error {
        v["error"] = json!({ "status": m.http_status, "message": e });
    }
    if m.status == "succeeded"
        && let Some(r) = std::fs::read(jobs.path(&m.id).join("result.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    {
        v["result"] = r;
    }
    if let Some(w) = &m.webhook {
        v["webhook"] = json!({ "url": w, "attempts": m.webhook_attempts, "delivered": m.webhook_delivered });
    }
    v
}

/// `DELETE /v2/jobs/{id}`: cancels an unfinished job, deletes a finished one.
pub fn delete(s: &AppState, id: &str) -> Result<Value, ApiError> {
    let jobs = s.jobs.as_ref().ok_or_else(|| ApiError::not_found("asynchronous jobs are off"))?;
    let mut m = jobs.read(id).ok_or_else(|| ApiError::not_found(format!("no job `{id}`")))?;
    if m.finished() {
        std::fs::remove_dir_all(jobs.path(id))
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("job store: {e}")))?;
        return Ok(json!({ "id": id, "status": "deleted" }));
    }
    if m.status == "running" {
        if let Ok(mut c) = jobs.cancel.lock() {
            c.insert(id.to_string());
        }
        return Ok(json!({ "id": id, "status": "cancelling" }));
    }
    finish(s, jobs, &mut m, "cancelled", None);
    if let Ok(mut w) = jobs.waiting.lock() {
        w.remove(id);
    }
    Ok(record(jobs, &m))
}

fn finish(s: &AppState, jobs: &Jobs, m: &mut Meta, status: &str, err: Option<ApiError>) {
    let now = now_ms();
    m.status = status.into();
    m.finished = Some(stamp(now));
    m.finished_unix_ms = Some(now);
    if let Some(e) = err {
        m.http_status = Some(e.status.as_u16());
        m.error = Some(e.message);
    }
    if let Err(e) = jobs.save(m) {
        tracing::error!(job = %m.id, error = %e, "job store: saving the record");
    }
    s.metrics.inc("edgepack_jobs_total", &[("model", &m.model), ("status", status)]);
}

/// Runs one queued job.
async fn run(s: &Arc<AppState>, id: &str) {
    let Some(jobs) = s.jobs.as_ref() else { return };
    if let Ok(mut w) = jobs.waiting.lock() {
        w.remove(id);
    }
    jobs.set_gauges(s);
    let Some(mut m) = jobs.read(id) else { return };
    if m.finished() {
        return;
    }
    // Models load after a restart: wait for them before routing (a job is not failed by the server's own start).
    while !s.ready.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    m.status = "running".into();
    m.started = Some(stamp(now_ms()));
    let _ = jobs.save(&m);
    let t0 = Instant::now();
    let outcome = execute(s, &m).await;
    let cancelled = jobs.cancel.lock().map(|mut c| c.remove(id)).unwrap_or(false);
    match outcome {
        _ if cancelled => finish(s, jobs, &mut m, "cancelled", None),
        Ok((version, body)) => {
            m.ran_on = Some(version);
            match edgepack_runtime::fsutil::write_atomic(&jobs.path(id).join("result.json"), &body) {
                Ok(()) => finish(s, jobs, &mut m, "succeeded", None),
                Err(e) => finish(
                    s,
                    jobs,
                    &mut m,
                    "failed",
                    Some(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("job store: {e}"))),
                ),
            }
        }
        Err(e) => finish(s, jobs, &mut m, "failed", Some(e)),
    }
    tracing::debug!(job = id, status = %m.status, ms = t0.elapsed().as_millis() as u64, "job finished");
    if m.webhook.is_some() {
        tokio::spawn(deliver(s.clone(), m));
    }
}

/// The job's request through routing, the model's queue and the outputs asked for: (version, response JSON).
async fn execute(s: &Arc<AppState>, m: &Meta) -> Result<(String, Vec<u8>), ApiError> {
    let jobs = s.jobs.as_ref().ok_or_else(|| ApiError::unavailable("jobs are off", 1))?;
    let model = s.model(&m.model)?;
    let (v, shadow) = s.route(&model, &m.model, m.version.as_deref(), &HeaderMap::new())?;
    let path = jobs.path(&m.id).join("request.bin");
    let json_len = m.json_len;
    let req = tokio::task::spawn_blocking(move || -> Result<kserve::Request, ApiError> {
        let bytes = std::fs::read(&path)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("job store: {e}")))?;
        kserve::parse_request(&bytes, json_len)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let deadline = crate::deadline(s, &HeaderMap::new(), req.timeout_us);
    let mut outs = crate::run_infer(s, &v, shadow, req.inputs, &req.outputs, deadline).await?;
    // Results are JSON documents: binary tensors are written as JSON data.
    for o in &mut outs {
        o.2 = false;
    }
    let r = kserve::response(&m.model, &v.version, Some(&m.id), &outs);
    Ok((v.version.clone(), r.body))
}

/// POSTs the finished job's record to its webhook until it answers 2xx (up to 5 tries, 1-8 s apart), recording
/// each attempt and the delivery.
async fn deliver(s: Arc<AppState>, mut m: Meta) {
    let (Some(jobs), Some(url)) = (s.jobs.as_ref(), m.webhook.clone()) else { return };
    let mut body = record(jobs, &m);
    if let Some(o) = body.as_object_mut() {
        o.remove("webhook");
    }
    let body = body.to_string();
    for attempt in 0..5u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
        }
        let (u, b) = (url.clone(), body.clone());
        let ok = tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent =
                ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).build().into();
            agent.post(&u).header("content-type", "application/json").send(b.as_bytes()).is_ok()
        })
        .await
        .unwrap_or(false);
        m.webhook_attempts += 1;
        m.webhook_delivered = ok;
        let _ = jobs.save(&m);
        if ok {
            return;
        }
        tracing::warn!(job = %m.id, url = %url, attempt = attempt + 1, "webhook not delivered");
    }
}
