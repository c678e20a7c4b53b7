//! One loaded model version: a session, a bounded queue and a worker thread that batches queued requests.
//!
//! Requests are checked against the model's inputs before they are queued, so one bad request never fails a
//! batch. The worker takes the first waiting request, then keeps collecting until `max_batch_size` samples or
//! `max_queue_delay` has passed (requests already queued are taken at once), drops requests whose client left or
//! whose deadline passed, concatenates compatible requests along the leading dim and runs them in power-of-two
//! chunks (the runtime keeps one plan per input shape), then splits the outputs back. A full queue refuses new
//! requests (503 + Retry-After). Closing the queue lets the worker finish everything accepted, then exit.
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use edgepack_runtime::process::stack;
use edgepack_runtime::{Session, SessionOptions, Tensor};
use tokio::sync::oneshot;

use crate::error::ApiError;
use crate::metrics::Metrics;

pub type Outputs = Vec<(String, Tensor)>;

/// Batching and queueing of one model (from its `config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchConfig {
    pub max_batch_size: usize,
    pub max_queue_delay: Duration,
    pub queue_capacity: usize,
    /// Worker threads taking batches from the queue, sharing one session (Triton's instance count).
    pub instances: usize,
}

pub struct Job {
    pub inputs: Vec<(String, Tensor)>,
    pub deadline: Instant,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<Outputs, ApiError>>,
}

impl Job {
    fn samples(&self) -> usize {
        self.inputs.first().and_then(|t| t.1.shape().first().copied()).unwrap_or(1)
    }
}

pub struct Version {
    pub model: String,
    pub version: String,
    pub session: Arc<Session>,
    /// The session takes batches (checked at load against single runs); otherwise requests run one by one.
    pub batchable: bool,
    pub config: BatchConfig,
    tx: Mutex<Option<SyncSender<Job>>>,
    depth: Arc<AtomicUsize>,
    /// Arrival times (ns since `born`) of the last request and the gap before it: when requests arrive further
    /// apart than `max_queue_delay`, a batch would wait for company that does not come, so it runs at once.
    born: Instant,
    last_arrival_ns: AtomicU64,
    gap_ns: AtomicU64,
    workers: Mutex<Vec<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
}

fn labels<'a>(model: &'a str, version: &'a str) -> [(&'static str, &'a str); 2] {
    [("model", model), ("version", version)]
}

fn probe(s: &Session, batch: usize, salt: usize) -> Option<Vec<(String, Tensor)>> {
    s.inputs().iter().map(|i| i.synthetic(batch, salt as u64).map(|t| (i.name.clone(), t))).collect()
}

fn close(a: &Tensor, b: &Tensor) -> bool {
    a.shape() == b.shape()
        && a.to_f32_vec().iter().zip(b.to_f32_vec()).all(|(x, y)| (x - y).abs() <= 1e-3 * (1.0 + y.abs()))
}

/// Named tensors cut as [`split_rows`] does: for each entry of `counts`, its piece of every tensor, by name.
fn split_named(outs: &Outputs, counts: &[usize]) -> Result<Vec<Outputs>, String> {
    let mut pieces: Vec<std::vec::IntoIter<Tensor>> =
        outs.iter().map(|(_, t)| split_rows(t, counts).map(Vec::into_iter)).collect::<Result<_, _>>()?;
    Ok(counts
        .iter()
        .map(|_| outs.iter().zip(&mut pieces).filter_map(|((name, _), p)| Some((name.clone(), p.next()?))).collect())
        .collect())
}

/// Loads a model file for serving: a batch-free session when `max_batch_size > 1` and batched runs equal single
/// runs on two probe samples, else the model as written. Warms every batch size a batch can be split into.
pub fn load(
    path: &std::path::Path,
    opts: &SessionOptions,
    model: &str,
    version: &str,
    config: BatchConfig,
    metrics: Arc<Metrics>,
) -> Result<Arc<Version>, String> {
    let open =
        |free| Session::open(path, &SessionOptions { free_batch: free, ..opts.clone() }).map_err(|e| e.to_string());
    let mut session = None;
    if config.max_batch_size > 1 {
        let s = open(true)?;
        if s.accepts_batch() && batch_equals_singles(&s) {
            session = Some(s);
        } else {
            tracing::warn!(
                model,
                version,
                "batched runs differ from single runs (or the model takes no batch): batching off"
            );
        }
    }
    let batchable = session.is_some();
    let session = match session {
        Some(s) => s,
        None => open(false)?,
    };
    // Warm-up: every power-of-two chunk size up to the largest batch.
    let mut b = 1;
    while b <= if batchable { config.max_batch_size } else { 1 } {
        if let Some(x) = probe(&session, b, 0) {
            session.run(x).map_err(|e| format!("warm-up at batch {b}: {e}"))?;
        }
        b *= 2;
    }
    let v = Arc::new(Version {
        model: model.into(),
        version: version.into(),
        session: Arc::new(session),
        batchable,
        config,
        tx: Mutex::new(None),
        depth: Arc::new(AtomicUsize::new(0)),
        born: Instant::now(),
        last_arrival_ns: AtomicU64::new(0),
        gap_ns: AtomicU64::new(u64::MAX),
        workers: Mutex::new(Vec::new()),
        metrics,
    });
    let (tx, rx) = sync_channel(v.config.queue_capacity.max(1));
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..v.config.instances.max(1) {
        let (w, rx) = (v.clone(), rx.clone());
        let handle = std::thread::Builder::new()
            .name(format!("edgepack-{model}-{version}-{i}"))
            .spawn(move || w.work(&rx))
            .map_err(|e| e.to_string())?;
        v.workers.lock().map_err(|e| e.to_string())?.push(handle);
    }
    *v.tx.lock().map_err(|e| e.to_string())? = Some(tx);
    let l = labels(model, version);
    v.metrics.set("edgepack_model_ready", &l, 1.0);
    v.metrics.set("edgepack_queue_depth", &l, 0.0);
    let backend = v.session.backend_description();
    v.metrics.set("edgepack_model_info", &[l[0], l[1], ("backend", &backend)], 1.0);
    Ok(v)
}

fn batch_equals_singles(s: &Session) -> bool {
    let (Some(a), Some(b), Some(ab)) = (probe(s, 1, 1), probe(s, 1, 2), probe(s, 2, 0)) else { return false };
    // The batch of two is the two singles stacked.
    let Ok(ab) = ab
        .iter()
        .zip(a.iter().zip(&b))
        .map(|((n, _), ((_, x), (_, y)))| stack(&[x.clone(), y.clone()]).map(|t| (n.clone(), t)))
        .collect::<Result<Vec<_>, _>>()
    else {
        return false;
    };
    let (Ok(ra), Ok(rb), Ok(rab)) = (s.run(a), s.run(b), s.run(ab)) else { return false };
    rab.iter().zip(ra.iter().zip(&rb)).all(|((_, t), ((_, x), (_, y)))| {
        matches!(split_rows(t, &[1, 1]).as_deref(), Ok([p, q]) if close(p, x) && close(q, y))
    })
}

impl Version {
    /// Checks a request's inputs against the model (names, dtypes, ranks, fixed dims; the leading dim may vary
    /// when the version batches) and orders them as the model declares.
    pub fn check_inputs(&self, inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>, ApiError> {
        self.session.check_inputs(inputs, self.batchable).map_err(|e| ApiError::bad_request(e.to_string()))
    }

    /// Queues a job; a full queue is back-pressure (503 with Retry-After), a closed one means shutting down.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        let tx = self.tx.lock().ok().and_then(|g| g.clone());
        let Some(tx) = tx else {
            return Err(ApiError::unavailable(format!("{} version {} is unloading", self.model, self.version), 1));
        };
        self.depth.fetch_add(1, Ordering::SeqCst);
        let now = self.born.elapsed().as_nanos() as u64;
        let last = self.last_arrival_ns.swap(now, Ordering::Relaxed);
        self.gap_ns.store(now.saturating_sub(last), Ordering::Relaxed);
        match tx.try_send(job) {
            Ok(()) => {
                let d = self.depth.load(Ordering::SeqCst);
                self.metrics.set("edgepack_queue_depth", &labels(&self.model, &self.version), d as f64);
                Ok(())
            }
            Err(e) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                let l = labels(&self.model, &self.version);
                let reason = if matches!(e, TrySendError::Full(_)) { "queue_full" } else { "unloading" };
                self.metrics.inc("edgepack_rejected_total", &[l[0], l[1], ("reason", reason)]);
                let msg = if reason == "queue_full" {
                    format!(
                        "{} version {}: {} requests queued, try again",
                        self.model, self.version, self.config.queue_capacity
                    )
                } else {
                    format!("{} version {} is unloading", self.model, self.version)
                };
                Err(if reason == "queue_full" { ApiError::busy(msg) } else { ApiError::unavailable(msg, 1) })
            }
        }
    }

    /// Stops accepting; the worker finishes every queued request, then exits.
    pub fn close(&self) {
        if let Ok(mut g) = self.tx.lock() {
            g.take();
        }
        self.metrics.remove(&labels(&self.model, &self.version));
    }

    /// Waits for the workers after [`Version::close`].
    pub fn join(&self) {
        let hs = self.workers.lock().map(|mut g| std::mem::take(&mut *g)).unwrap_or_default();
        for h in hs {
            let _ = h.join();
        }
    }

    /// One instance: takes a batch from the shared queue (holding it only while collecting), runs it.
    fn work(self: Arc<Self>, rx: &Mutex<Receiver<Job>>) {
        let l = labels(&self.model, &self.version);
        let l = [l[0], l[1]];
        let mut carry: Option<Job> = None;
        loop {
            let jobs = {
                let Ok(rx) = rx.lock() else { return };
                let first = match carry.take() {
                    Some(j) => j,
                    None => match rx.recv() {
                        Ok(j) => j,
                        Err(_) => return, // closed and drained
                    },
                };
                let mut jobs = vec![first];
                if self.batchable {
                    // Sparse traffic: take what is queued, do not wait.
                    let sparse = self.gap_ns.load(Ordering::Relaxed) > self.config.max_queue_delay.as_nanos() as u64;
                    let until = if sparse { Instant::now() } else { Instant::now() + self.config.max_queue_delay };
                    let mut n = jobs[0].samples();
                    while n < self.config.max_batch_size {
                        let left = until.saturating_duration_since(Instant::now());
                        let next = if left.is_zero() {
                            rx.try_recv().map_err(|_| ())
                        } else {
                            rx.recv_timeout(left).map_err(|_: RecvTimeoutError| ())
                        };
                        match next {
                            Ok(j) if n + j.samples() <= self.config.max_batch_size => {
                                n += j.samples();
                                jobs.push(j);
                            }
                            Ok(j) => {
                                // Too big for this batch: it starts the next one.
                                carry = Some(j);
                                break;
                            }
                            Err(()) => break,
                        }
                    }
                }
                jobs
            };
            self.depth.fetch_sub(jobs.len(), Ordering::SeqCst);
            self.metrics.set("edgepack_queue_depth", &l, self.depth.load(Ordering::SeqCst) as f64);
            self.run(jobs, &l);
        }
    }

    fn run(&self, jobs: Vec<Job>, l: &[(&'static str, &str); 2]) {
        let now = Instant::now();
        let mut live = Vec::with_capacity(jobs.len());
        for j in jobs {
            if j.reply.is_closed() {
                self.metrics.inc("edgepack_rejected_total", &[l[0], l[1], ("reason", "client_gone")]);
            } else if j.deadline <= now {
                self.metrics.inc("edgepack_rejected_total", &[l[0], l[1], ("reason", "deadline")]);
                let _ = j.reply.send(Err(ApiError::new(
                    axum::http::StatusCode::GATEWAY_TIMEOUT,
                    "the request's deadline passed while it was queued",
                )));
            } else {
                self.metrics.observe("edgepack_queue_duration_seconds", l, (now - j.enqueued).as_secs_f64());
                live.push(j);
            }
        }
        // Groups of identical trailing shapes run together.
        while !live.is_empty() {
            let key = |j: &Job| -> Vec<Vec<usize>> { j.inputs.iter().map(|t| t.1.shape()[1..].to_vec()).collect() };
            let k0 = key(&live[0]);
            let (group, rest): (Vec<Job>, Vec<Job>) = live.into_iter().partition(|j| key(j) == k0);
            live = rest;
            self.run_group(group, l);
        }
    }

    fn run_group(&self, group: Vec<Job>, l: &[(&'static str, &str); 2]) {
        let counts: Vec<usize> = group.iter().map(Job::samples).collect();
        let total: usize = counts.iter().sum();
        let t0 = Instant::now();
        let result = if group.len() == 1 {
            self.session.run(group[0].inputs.clone()).map_err(|e| ApiError::from_runtime(&e))
        } else {
            self.run_stacked(&group, total)
        };
        let backend = match self.session.backend_kind() {
            edgepack_runtime::BackendKind::Cpu => "cpu",
            edgepack_runtime::BackendKind::Gpu => "gpu",
        };
        self.metrics.observe(
            "edgepack_inference_duration_seconds",
            &[l[0], l[1], ("backend", backend)],
            t0.elapsed().as_secs_f64(),
        );
        self.metrics.observe("edgepack_batch_size", l, total as f64);
        match result {
            Err(e) => {
                for j in group {
                    let _ = j.reply.send(Err(e.clone()));
                }
            }
            Ok(outs) if group.len() == 1 => {
                if let Some(j) = group.into_iter().next() {
                    let _ = j.reply.send(Ok(outs));
                }
            }
            Ok(outs) => match split_named(&outs, &counts) {
                Ok(mine) => {
                    for (j, m) in group.into_iter().zip(mine) {
                        let _ = j.reply.send(Ok(m));
                    }
                }
                Err(e) => {
                    let e = ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e);
                    for j in group {
                        let _ = j.reply.send(Err(e.clone()));
                    }
                }
            },
        }
    }

    /// The group's inputs stacked along the leading dim, run in power-of-two chunks, outputs stacked back.
    fn run_stacked(&self, group: &[Job], total: usize) -> Result<Outputs, ApiError> {
        let internal = |e: edgepack_runtime::Error| ApiError::from_runtime(&e);
        let names: Vec<String> = group[0].inputs.iter().map(|t| t.0.clone()).collect();
        let stacked: Vec<Tensor> = (0..names.len())
            .map(|i| stack(&group.iter().map(|j| j.inputs[i].1.clone()).collect::<Vec<_>>()))
            .collect::<Result<_, _>>()
            .map_err(internal)?;
        let stacked: Outputs = names.into_iter().zip(stacked).collect();
        // Power-of-two chunks, largest first (13 = 8 + 4 + 1).
        let mut chunks = Vec::new();
        let mut left = total;
        while left > 0 {
            let n = 1usize << (usize::BITS - 1 - left.leading_zeros());
            chunks.push(n);
            left -= n;
        }
        if chunks.len() == 1 {
            return self.session.run(stacked).map_err(internal);
        }
        let inputs = split_named(&stacked, &chunks)
            .map_err(|e| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e))?;
        let parts: Vec<Outputs> =
            inputs.into_iter().map(|chunk| self.session.run(chunk).map_err(internal)).collect::<Result<_, _>>()?;
        let first = &parts[0];
        (0..first.len())
            .map(|k| {
                let ts: Vec<Tensor> = parts.iter().map(|p| p[k].1.clone()).collect();
                stack(&ts).map(|t| (first[k].0.clone(), t)).map_err(internal)
            })
            .collect()
    }
}

/// [`edgepack_runtime::process::split_rows`] with the error as text.
fn split_rows(t: &Tensor, counts: &[usize]) -> Result<Vec<Tensor>, String> {
    edgepack_runtime::process::split_rows(t, counts).map_err(|e| e.to_string())
}
