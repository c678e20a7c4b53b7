//! Asynchronous inference jobs: submit now, fetch the result later (SageMaker's async inference, the queue-plus-
//! workers pattern), durable on disk.
//!
//! `POST /v2/models/{m}[/versions/{v}]/jobs` takes a KServe v2 request body (JSON, or JSON and binary tensors with
//! `Inference-Header-Content-Length`), streams it to the job store (at most `--max-job-mib`, never whole in memory
//! before it is on disk), fsyncs it and its record, and only then answers `202 {"id", "status": "queued"}` with a
//! `Location`: an accepted job is never lost. Workers run queued jobs through the same routing, batching queue and
//! checks as `infer`; `GET /v2/jobs/{id}` gives `queued|running|succeeded|failed` and, once succeeded, the KServe
//! response as `result` (JSON tensors); `DELETE /v2/jobs/{id}` removes the job: one that has not finished is
//! cancelled (a running one finishes but its result is dropped), a finished one deleted; a GET afterwards is a 404.
//! Finished jobs are deleted `--job-ttl-s` after they finish. A `x-edgepack-webhook: http://…` header on the submission has the final record POSTed there when
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
use crate::redis::{Redis, Reply};
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
    /// `redis://HOST:PORT`: the queue, records, requests and results in that Redis server, shared by every server
    /// given the same URL (the jobs dir then only spools request bodies). None: on disk, this server only.
    pub queue: Option<String>,
}

/// Redis keys of the shared store.
const QUEUE: &str = "edgepack:jobs:queue";
const RUNNING: &str = "edgepack:jobs:running";
const LEASES: &str = "edgepack:jobs:leases";

fn key(id: &str, part: &str) -> String {
    format!("edgepack:job:{id}:{part}")
}

fn queued_key(model: &str) -> String {
    format!("edgepack:jobs:queued:{model}")
}

/// Puts a job whose lease ran out (its server died while running it) back on the queue, once: only the caller
/// whose ZREM removed the lease moves it.
const REQUEUE: &str = "if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then \
    redis.call('LREM', KEYS[2], 1, ARGV[1]); redis.call('RPUSH', KEYS[3], ARGV[1]); return 1 end return 0";

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
    /// A raw-image job: `classify` or `detect` (None: a KServe v2 request).
    #[serde(default)]
    pub verb: Option<String>,
    #[serde(default)]
    pub top_k: Option<usize>,
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
    redis: Option<Redis>,
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
        let redis = opts.queue.as_deref().map(Redis::connect).transpose()?;
        Ok(Jobs {
            redis,
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
        let bytes = match &self.redis {
            Some(r) => r.cmd(&[b"GET", key(id, "meta").as_bytes()]).ok()?.bytes()?,
            None => std::fs::read(self.path(id).join("meta.json")).ok()?,
        };
        serde_json::from_slice(&bytes).ok()
    }

    fn save(&self, m: &Meta) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(m).map_err(std::io::Error::other)?;
        if let Some(r) = &self.redis {
            r.cmd(&[b"SET", key(&m.id, "meta").as_bytes(), &bytes])?;
            if m.finished() {
                // Redis deletes a finished job's keys after its time to live.
                let ttl = self.opts.ttl.as_millis().max(1).to_string();
                for part in ["meta", "request", "result"] {
                    r.cmd(&[b"PEXPIRE", key(&m.id, part).as_bytes(), ttl.as_bytes()])?;
                }
            }
            return Ok(());
        }
        let _one = self.write.lock().unwrap_or_else(|e| e.into_inner());
        edgepack_runtime::fsutil::write_atomic(&self.path(&m.id).join("meta.json"), &bytes)
    }

    /// A stored request moves to Redis (the local spool file is removed); on disk it stays where it is.
    fn commit_request(&self, id: &str) -> std::io::Result<()> {
        let Some(r) = &self.redis else { return Ok(()) };
        let spool = self.path(id);
        let bytes = std::fs::read(spool.join("request.bin"))?;
        r.cmd(&[b"SET", key(id, "request").as_bytes(), &bytes])?;
        let _ = std::fs::remove_dir_all(spool);
        Ok(())
    }

    fn request(&self, id: &str) -> std::io::Result<Vec<u8>> {
        match &self.redis {
            Some(r) => r
                .cmd(&[b"GET", key(id, "request").as_bytes()])?
                .bytes()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "request gone from the store")),
            None => std::fs::read(self.path(id).join("request.bin")),
        }
    }

    fn put_result(&self, id: &str, body: &[u8]) -> std::io::Result<()> {
        match &self.redis {
            Some(r) => r.cmd(&[b"SET", key(id, "result").as_bytes(), body]).map(drop),
            None => {
                let _one = self.write.lock().unwrap_or_else(|e| e.into_inner());
                edgepack_runtime::fsutil::write_atomic(&self.path(id).join("result.json"), body)
            }
        }
    }

    fn result(&self, id: &str) -> Option<Vec<u8>> {
        match &self.redis {
            Some(r) => r.cmd(&[b"GET", key(id, "result").as_bytes()]).ok()?.bytes(),
            None => std::fs::read(self.path(id).join("result.json")).ok(),
        }
    }

    fn remove(&self, id: &str) -> std::io::Result<()> {
        match &self.redis {
            Some(r) => r
                .cmd(&[b"DEL", key(id, "meta").as_bytes(), key(id, "request").as_bytes(), key(id, "result").as_bytes()])
                .map(drop),
            None => {
                // Under the writers' lock: a worker saving the record of a job being deleted would otherwise put its
                // temporary file in the folder between remove_dir_all's listing and its rmdir (ENOTEMPTY). Writes
                // that come after it fail on the missing folder, and the worker drops them (the job is cancelled).
                let _one = self.write.lock().unwrap_or_else(|e| e.into_inner());
                match std::fs::remove_dir_all(self.path(id)) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    r => r,
                }
            }
        }
    }

    /// The next queued job, waiting up to a second with Redis (blocking: call it off the async threads), where
    /// the job moves to the running list under a lease that outlives any deadline.
    fn dequeue(&self, lease: Duration) -> Option<String> {
        let Some(r) = &self.redis else { return self.queue.lock().ok()?.pop_front() };
        let moved = r.cmd(&[b"BLMOVE", QUEUE.as_bytes(), RUNNING.as_bytes(), b"RIGHT", b"LEFT", b"1"]).ok()?;
        let id = String::from_utf8(moved.bytes()?).ok()?;
        let until = (now_ms() + lease.as_millis() as u64).to_string();
        let _ = r.cmd(&[b"ZADD", LEASES.as_bytes(), until.as_bytes(), id.as_bytes()]);
        if let Some(m) = self.read(&id) {
            let _ = r.cmd(&[b"ZREM", queued_key(&m.model).as_bytes(), id.as_bytes()]);
        }
        Some(id)
    }

    /// A job that ran (or was skipped) leaves the running list.
    fn done(&self, id: &str) {
        if let Some(r) = &self.redis {
            let _ = r.cmd(&[b"LREM", RUNNING.as_bytes(), b"1", id.as_bytes()]);
            let _ = r.cmd(&[b"ZREM", LEASES.as_bytes(), id.as_bytes()]);
        }
    }

    fn request_cancel(&self, id: &str) {
        match &self.redis {
            Some(r) => drop(r.cmd(&[b"SET", key(id, "cancel").as_bytes(), b"1", b"EX", b"86400"])),
            None => drop(self.cancel.lock().map(|mut c| c.insert(id.to_string()))),
        }
    }

    fn take_cancel(&self, id: &str) -> bool {
        match &self.redis {
            Some(r) => r.cmd(&[b"DEL", key(id, "cancel").as_bytes()]).is_ok_and(|n| n.int() == 1),
            None => self.cancel.lock().map(|mut c| c.remove(id)).unwrap_or(false),
        }
    }

    /// A queued job that will not run (cancelled) leaves the depth figures.
    fn unqueue(&self, m: &Meta) {
        match &self.redis {
            Some(r) => drop(r.cmd(&[b"ZREM", queued_key(&m.model).as_bytes(), m.id.as_bytes()])),
            None => drop(self.waiting.lock().map(|mut w| w.remove(&m.id))),
        }
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
        if let Some(r) = &self.redis {
            let score = m.created_unix_ms.to_string();
            let _ = r.cmd(&[b"ZADD", queued_key(&m.model).as_bytes(), score.as_bytes(), m.id.as_bytes()]);
            let _ = r.cmd(&[b"LPUSH", QUEUE.as_bytes(), m.id.as_bytes()]);
            return;
        }
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
        if self.redis.is_some() {
            return Vec::new(); // the shared queue is recovered by the lease sweep
        }
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
        if let Some(r) = &self.redis {
            // Jobs whose server died while running them (their lease ran out) go back on the queue.
            let now = now_ms().to_string();
            let expired =
                r.cmd(&[b"ZRANGEBYSCORE", LEASES.as_bytes(), b"-inf", now.as_bytes(), b"LIMIT", b"0", b"100"]);
            for id in expired.map(Reply::array).unwrap_or_default().into_iter().filter_map(Reply::bytes) {
                let keys = [LEASES.as_bytes(), RUNNING.as_bytes(), QUEUE.as_bytes()];
                let moved = r.cmd(&[b"EVAL", REQUEUE.as_bytes(), b"3", keys[0], keys[1], keys[2], &id]);
                if moved.is_ok_and(|n| n.int() == 1) {
                    tracing::warn!(job = %String::from_utf8_lossy(&id), "job lease expired: queued again");
                }
            }
            return;
        }
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

    /// Queued jobs per model: how many, and when the oldest was created (ms).
    fn queued(&self, models: &[String]) -> BTreeMap<String, (usize, u64)> {
        let mut per: BTreeMap<String, (usize, u64)> = BTreeMap::new();
        if let Some(r) = &self.redis {
            for m in models {
                let n = r.cmd(&[b"ZCARD", queued_key(m).as_bytes()]).map(|n| n.int()).unwrap_or(0);
                let first = r.cmd(&[b"ZRANGE", queued_key(m).as_bytes(), b"0", b"0", b"WITHSCORES"]);
                let oldest = first.map(Reply::array).ok().and_then(|a| a.get(1).map(Reply::int)).unwrap_or(0);
                if n > 0 {
                    per.insert(m.clone(), (n as usize, oldest as u64));
                }
            }
            return per;
        }
        for (model, created) in self.waiting.lock().map(|w| w.clone()).unwrap_or_default().into_values() {
            let e = per.entry(model).or_insert((0, u64::MAX));
            e.0 += 1;
            e.1 = e.1.min(created);
        }
        per
    }

    fn set_gauges(&self, s: &AppState) {
        let models: Vec<String> = s.models.read().map(|m| m.keys().cloned().collect()).unwrap_or_default();
        let per = self.queued(&models);
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
                let Some(j) = s.jobs.as_ref() else { return };
                let next = if j.redis.is_some() {
                    let s2 = s.clone();
                    let lease = s.opts.request_timeout.max(Duration::from_secs(1)) * 10 + Duration::from_secs(30);
                    tokio::task::spawn_blocking(move || s2.jobs.as_ref().and_then(|j| j.dequeue(lease)))
                        .await
                        .ok()
                        .flatten()
                } else {
                    j.dequeue(Duration::ZERO)
                };
                match next {
                    Some(id) => {
                        run(&s, &id).await;
                        j.done(&id);
                    }
                    None if j.redis.is_none() => {
                        let _ = tokio::time::timeout(Duration::from_secs(1), j.wake.notified()).await;
                    }
                    None => {}
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
    match submit_inner(&s, model, version, None, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/models/{m}:classify/jobs` (or `:detect`): a raw image, run as `:classify` would run it.
pub async fn submit_image(
    s: Arc<AppState>,
    model: String,
    version: Option<String>,
    verb: crate::ImageVerb,
    top_k: Option<usize>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match submit_inner(&s, model, version, Some((verb, top_k)), headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn submit_inner(
    s: &Arc<AppState>,
    model: String,
    version: Option<String>,
    image: Option<(crate::ImageVerb, Option<usize>)>,
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
    let json_len = kserve::json_len(&headers)?;
    let limit = jobs.opts.max_bytes;
    let too_big = || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("job request over {limit} bytes"));
    if crate::declared_over(&headers, limit) {
        return Err(too_big());
    }
    let id = jobs.new_id();
    let dir = jobs.path(&id);
    let io = |e: std::io::Error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("job store: {e}"));
    tokio::fs::create_dir_all(&dir).await.map_err(io)?;
    let stored = stream_to(&dir.join("request.bin"), body, limit).await;
    let stored = match stored {
        Ok(0) if image.is_some() => Err(ApiError::bad_request("the request has no image")),
        Ok(n) => Ok(n),
        Err(Stream::TooBig) => Err(too_big()),
        Err(Stream::Body(m)) => Err(ApiError::bad_request(format!("reading the body: {m}"))),
        Err(Stream::Io(e)) => Err(io(e)),
    };
    if let Err(e) = stored {
        let _ = tokio::fs::remove_dir_all(&dir).await;
        return Err(e);
    }
    // A request `infer` would refuse is refused now, not accepted to fail later.
    let (v, _) = s.route(&m, &model, version.as_deref(), &HeaderMap::new())?;
    let path = dir.join("request.bin");
    let checked = tokio::task::spawn_blocking(move || -> Result<(), ApiError> {
        if image.is_some() {
            // An image is decoded when the job runs; the model must have the pre-processing for it.
            return crate::check_image_model(&v, &v.model);
        }
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
        verb: image.map(|i| i.0.name().to_string()),
        top_k: image.and_then(|i| i.1),
        webhook,
        webhook_attempts: 0,
        webhook_delivered: false,
    };
    // Durable before the 202: the record is fsynced and renamed into place (the request already is), or both are
    // in Redis.
    jobs.commit_request(&id).map_err(io)?;
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
async fn stream_to(path: &Path, body: Body, limit: usize) -> Result<usize, Stream> {
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
    tokio::fs::rename(&tmp, path).await.map_err(Stream::Io)?;
    Ok(n)
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
        && let Some(r) = jobs.result(&m.id).and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    {
        v["result"] = r;
    }
    if let Some(w) = &m.webhook {
        v["webhook"] = json!({ "url": w, "attempts": m.webhook_attempts, "delivered": m.webhook_delivered });
    }
    v
}

/// `DELETE /v2/jobs/{id}`: the job is gone afterwards (404): a finished one is deleted, a queued one is cancelled,
/// a running one finishes but its result is dropped and its record removed. The answer says which.
pub fn delete(s: &AppState, id: &str) -> Result<Value, ApiError> {
    let jobs = s.jobs.as_ref().ok_or_else(|| ApiError::not_found("asynchronous jobs are off"))?;
    let m = jobs.read(id).ok_or_else(|| ApiError::not_found(format!("no job `{id}`")))?;
    let status = if m.finished() {
        "deleted"
    } else {
        // A worker that already read the record sees the flag when it is done and drops what it made.
        jobs.request_cancel(id);
        jobs.unqueue(&m);
        s.metrics.inc("edgepack_jobs_total", &[("model", &m.model), ("status", "cancelled")]);
        jobs.set_gauges(s);
        "cancelled"
    };
    jobs.remove(id).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("job store: {e}")))?;
    Ok(json!({ "id": id, "status": status }))
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
    if jobs.take_cancel(id) {
        // Deleted while it ran: nothing of it is kept.
        let _ = jobs.remove(id);
        return;
    }
    match outcome {
        Ok((version, body)) => {
            m.ran_on = Some(version);
            match jobs.put_result(id, &body) {
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
    let model = s.model(&m.model)?;
    let (v, shadow) = s.route(&model, &m.model, m.version.as_deref(), &HeaderMap::new())?;
    let (s2, id) = (s.clone(), m.id.clone());
    let bytes = tokio::task::spawn_blocking(move || {
        let jobs = s2.jobs.as_ref().ok_or_else(|| ApiError::unavailable("jobs are off", 1))?;
        jobs.request(&id).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("job store: {e}")))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    if let Some(verb) = m.verb.as_deref().and_then(crate::ImageVerb::parse) {
        // A raw-image job: the bytes are the image.
        let deadline = crate::deadline(s, &HeaderMap::new(), None);
        let body = crate::run_image(&v, &m.model, verb, m.top_k, bytes, deadline).await?;
        return Ok((v.version.clone(), body.to_string().into_bytes()));
    }
    let json_len = m.json_len;
    let req = tokio::task::spawn_blocking(move || kserve::parse_request(&bytes, json_len))
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
