//! `Engine`: a bundle on the device's backend, with the cloud fallback applied under its policy.
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use edgepack_runtime::bundle::PublicKey;
use edgepack_runtime::session::{Session, SessionOptions};

use crate::cloud::{Answer, BreakerState, Cloud, CloudConfig, FallbackPolicy, HttpTransport};
use crate::types::*;

/// How to open an engine.
#[derive(uniffi::Record, Debug, Clone)]
pub struct EngineOptions {
    pub backend: Backend,
    /// CPU worker threads; 0 = one per core.
    #[uniffi(default = 0)]
    pub threads: u32,
    /// Bundle variant ("fp32", "int8"...); `None`: the bundle's first.
    #[uniffi(default = None)]
    pub variant: Option<String>,
    /// Trusted public key (`edgepack-ed25519-public:...`, as `edgepack keygen` writes it): the bundle must be
    /// signed by it.
    #[uniffi(default = None)]
    pub verification_key: Option<String>,
    #[uniffi(default = None)]
    pub cloud: Option<CloudConfig>,
}

/// A model ready to run on the device, in the cloud, or both, as the policy says.
#[derive(uniffi::Object)]
pub struct Engine {
    /// `None` when the device cannot run the model (`device_error` says why).
    session: Option<Arc<Session>>,
    device_error: Option<EdgepackError>,
    cloud: Option<Arc<Cloud>>,
    info: ModelInfo,
}

fn session_options(o: &EngineOptions) -> Result<SessionOptions, EdgepackError> {
    let key = match &o.verification_key {
        Some(k) => {
            Some(PublicKey::parse(k.trim()).map_err(|e| EdgepackError::InvalidBundle { detail: e.to_string() })?)
        }
        None => None,
    };
    Ok(SessionOptions {
        device: o.backend.into(),
        threads: o.threads as usize,
        variant: o.variant.clone(),
        key,
        ..SessionOptions::default()
    })
}

/// Errors that mean "this device cannot run this model" rather than "this bundle is bad".
fn device_cannot_run(e: &EdgepackError) -> bool {
    matches!(e, EdgepackError::UnsupportedOp { .. } | EdgepackError::Internal { .. })
}

impl Engine {
    fn build(
        load: impl FnOnce(&SessionOptions) -> edgepack_runtime::Result<Session>,
        options: EngineOptions,
        transport: Option<Arc<dyn HttpTransport>>,
    ) -> Result<Engine, EdgepackError> {
        let opts = session_options(&options)?;
        let cloud = options.cloud.clone().map(|c| Cloud::new(c, transport).map(Arc::new)).transpose()?;
        let (session, device_error) = match load(&opts) {
            Ok(s) => (Some(s), None),
            Err(e) => {
                let e = EdgepackError::from(e);
                // A bad, tampered or untrusted bundle is never papered over by the cloud; an operator the device
                // lacks is what the fallback is for, when the policy allows it.
                let fallback = cloud.as_ref().is_some_and(|c| c.config.policy != FallbackPolicy::Never);
                if !(device_cannot_run(&e) && fallback) {
                    return Err(e);
                }
                (None, Some(e))
            }
        };
        Ok(Engine::assemble(session.map(Arc::new), device_error, cloud))
    }

    /// The engine and its `ModelInfo` snapshot, from what the device and the cloud offer.
    fn assemble(
        session: Option<Arc<Session>>,
        device_error: Option<EdgepackError>,
        cloud: Option<Arc<Cloud>>,
    ) -> Engine {
        let s = session.as_deref();
        let bundle = s.and_then(Session::bundle);
        let info = ModelInfo {
            inputs: s.map(|s| s.inputs().iter().map(Into::into).collect()).unwrap_or_default(),
            outputs: s.map(|s| s.outputs().iter().map(Into::into).collect()).unwrap_or_default(),
            task: bundle.map(|b| {
                serde_json::to_value(b.manifest.task)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            }),
            variant: bundle.map(|b| b.variant.clone()),
            labels: s.and_then(Session::labels).map(<[String]>::to_vec).unwrap_or_default(),
            signer: bundle.and_then(|b| b.signer.clone()),
            trusted: bundle.is_some_and(|b| b.trusted),
            device_backend: s.map(Session::backend_description),
            device_reason: s.map(|s| s.backend_selection().to_string()),
            device_error: device_error.as_ref().map(ToString::to_string),
            cloud: cloud.as_ref().map(|c| format!("{} model {}", c.config.endpoint, c.config.model)),
        };
        Engine { session, device_error, cloud, info }
    }

    fn policy(&self) -> FallbackPolicy {
        self.cloud.as_ref().map_or(FallbackPolicy::Never, |c| c.config.policy)
    }

    fn session(&self) -> Result<&Arc<Session>, EdgepackError> {
        self.session.as_ref().ok_or_else(|| {
            self.device_error.clone().unwrap_or(EdgepackError::Unavailable { detail: "no device session".into() })
        })
    }

    /// Runs one call under the policy. `device` computes on the device, `cloud` asks the server within a budget,
    /// `unsure` says whether a device result is not confident enough (on-low-confidence).
    fn call<T: Send + 'static>(
        &self,
        device: impl FnOnce(Arc<Session>) -> Result<T, EdgepackError> + Send + 'static,
        cloud: impl Fn(&Cloud, Duration) -> Result<Answer<T>, EdgepackError> + Send + Sync + 'static,
        unsure: impl Fn(&T) -> Option<String>,
    ) -> Result<(T, Provenance), EdgepackError> {
        let start = Instant::now();
        let policy = self.policy();
        let prov =
            |place, backend: String, reason: String, device_error: Option<String>, cloud_error: Option<String>| {
                Provenance {
                    place,
                    backend,
                    reason,
                    latency_ms: start.elapsed().as_secs_f64() * 1e3,
                    device_error,
                    cloud_error,
                }
            };
        let on_device = |s: &Arc<Session>, reason: String, cloud_error: Option<String>, v: T| {
            (v, prov(Place::Device, s.backend_description(), reason, None, cloud_error))
        };
        let Some(c) = &self.cloud else {
            let s = self.session()?;
            let v = device(s.clone())?;
            return Ok(on_device(s, "on device (no cloud configured)".into(), None, v));
        };
        let deadline = Duration::from_millis(c.config.deadline_ms as u64);
        let left = || deadline.saturating_sub(start.elapsed());
        let to_cloud = |reason: String, device_error: Option<String>| -> Result<(T, Provenance), EdgepackError> {
            let a = cloud(c, left())?;
            let backend = c.describe(&a.version);
            Ok((a.value, prov(Place::Cloud, backend, reason, device_error, None)))
        };
        let name = policy_name(policy);
        // No device session: the cloud or nothing.
        let Some(s) = &self.session else {
            let err =
                self.device_error.clone().unwrap_or(EdgepackError::Unavailable { detail: "no device session".into() });
            return to_cloud(format!("the device cannot run this model (policy {name})"), Some(err.to_string()));
        };
        match policy {
            FallbackPolicy::Never => {
                let v = device(s.clone())?;
                Ok(on_device(s, "on device (policy never)".into(), None, v))
            }
            FallbackPolicy::OnUnsupported => {
                let v = device(s.clone())?;
                Ok(on_device(s, format!("on device (policy {name}: the device runs this model)"), None, v))
            }
            FallbackPolicy::Always => match to_cloud(format!("cloud first (policy {name})"), None) {
                Ok(r) => Ok(r),
                Err(e) if e.is_input_error() => Err(e),
                Err(e) => {
                    let v = device(s.clone())?;
                    Ok(on_device(
                        s,
                        format!("the cloud failed (policy {name}); answered on device"),
                        Some(e.to_string()),
                        v,
                    ))
                }
            },
            FallbackPolicy::OnError | FallbackPolicy::OnLowConfidence => match device(s.clone()) {
                Err(e) if e.is_input_error() => Err(e),
                Err(e) => to_cloud(format!("the device failed (policy {name})"), Some(e.to_string())),
                Ok(v) => match (policy, unsure(&v)) {
                    (FallbackPolicy::OnLowConfidence, Some(why)) => {
                        match to_cloud(format!("{why} (policy {name})"), None) {
                            Ok(r) => Ok(r),
                            Err(e) => Ok(on_device(
                                s,
                                format!("{why} but the cloud failed; device result kept"),
                                Some(e.to_string()),
                                v,
                            )),
                        }
                    }
                    _ => Ok(on_device(s, format!("on device (policy {name})"), None, v)),
                },
            },
            FallbackPolicy::OnTimeout => {
                // A hedged call: the device starts; past `device_timeout_ms` the cloud starts too, and the first
                // good answer wins (the other finishes in the background and is dropped).
                let budget = Duration::from_millis(c.config.device_timeout_ms as u64);
                let (tx, rx) = mpsc::channel();
                let dtx = tx.clone();
                let ds = s.clone();
                std::thread::spawn(move || {
                    let _ = dtx.send(Hedge::Device(guarded(|| device(ds))));
                });
                let first = match rx.recv_timeout(budget) {
                    Ok(Hedge::Device(Err(e))) if e.is_input_error() => return Err(e),
                    Ok(Hedge::Device(Ok(v))) => {
                        return Ok(on_device(
                            s,
                            format!("on device within {} ms (policy {name})", budget.as_millis()),
                            None,
                            v,
                        ));
                    }
                    Ok(Hedge::Device(Err(e))) => {
                        return to_cloud(format!("the device failed (policy {name})"), Some(e.to_string()));
                    }
                    _ => format!("the device took over {} ms (policy {name})", budget.as_millis()),
                };
                let (cc, remaining) = (c.clone(), left());
                let cloud = Arc::new(cloud);
                std::thread::spawn(move || {
                    let _ = tx.send(Hedge::Cloud(guarded(|| cloud(&cc, remaining))));
                });
                let mut cloud_err = None;
                loop {
                    match rx.recv_timeout(left()) {
                        Ok(Hedge::Device(Ok(v))) => {
                            let why = match &cloud_err {
                                None => format!("{first}; the device answered first"),
                                Some(_) => format!("{first}; the cloud failed, device result kept"),
                            };
                            return Ok(on_device(s, why, cloud_err, v));
                        }
                        Ok(Hedge::Cloud(Ok(a))) => {
                            return Ok((a.value, prov(Place::Cloud, c.describe(&a.version), first, None, None)));
                        }
                        Ok(Hedge::Device(Err(e))) if cloud_err.is_some() || e.is_input_error() => return Err(e),
                        Ok(Hedge::Device(Err(_))) => {} // the cloud may still answer
                        Ok(Hedge::Cloud(Err(e))) => cloud_err = Some(e.to_string()),
                        Err(_) => {
                            let what = cloud_err.map_or("no answer from either".to_string(), |e| {
                                format!("device still running; cloud: {e}")
                            });
                            return Err(EdgepackError::timeout(deadline, what));
                        }
                    }
                }
            }
        }
    }
}

/// A result of one side of a hedged call.
enum Hedge<T> {
    Device(Result<T, EdgepackError>),
    Cloud(Result<Answer<T>, EdgepackError>),
}

/// `f()`, with a panic turned into an internal error (it runs on a thread of its own).
fn guarded<R>(f: impl FnOnce() -> Result<R, EdgepackError>) -> Result<R, EdgepackError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(EdgepackError::Internal { detail: "panicked".into() }))
}

fn policy_name(p: FallbackPolicy) -> &'static str {
    match p {
        FallbackPolicy::Never => "never",
        FallbackPolicy::OnUnsupported => "on-unsupported",
        FallbackPolicy::OnError => "on-error",
        FallbackPolicy::OnTimeout => "on-timeout",
        FallbackPolicy::OnLowConfidence => "on-low-confidence",
        FallbackPolicy::Always => "always",
    }
}

/// The first image's classes (classify takes one image).
fn classes(v: Vec<Vec<edgepack_runtime::process::ClassScore>>) -> Vec<ClassScore> {
    v.into_iter().next().unwrap_or_default().into_iter().map(Into::into).collect()
}

#[uniffi::export]
impl Engine {
    /// Opens a bundle (or a bare `.onnx`) from a file. `transport`: the app's HTTP stack for the cloud fallback
    /// (`None`: the built-in plain-HTTP client).
    #[uniffi::constructor(default(transport = None))]
    pub fn open(
        path: String,
        options: EngineOptions,
        transport: Option<Arc<dyn HttpTransport>>,
    ) -> Result<Arc<Engine>, EdgepackError> {
        let p = path.clone();
        Engine::build(move |o| Session::open(&p, o), options, transport).map(Arc::new)
    }

    /// Opens a bundle (or a bare `.onnx`) from memory (e.g. an app asset).
    #[uniffi::constructor(default(transport = None))]
    pub fn from_bytes(
        bytes: Vec<u8>,
        options: EngineOptions,
        transport: Option<Arc<dyn HttpTransport>>,
    ) -> Result<Arc<Engine>, EdgepackError> {
        Engine::build(move |o| Session::from_bytes(&bytes, o), options, transport).map(Arc::new)
    }

    /// An engine with no model on the device: every call goes to the cloud (e.g. before a bundle is downloaded).
    #[uniffi::constructor(default(transport = None))]
    pub fn cloud_only(
        cloud: CloudConfig,
        transport: Option<Arc<dyn HttpTransport>>,
    ) -> Result<Arc<Engine>, EdgepackError> {
        let c = Cloud::new(cloud, transport)?;
        let no_model = EdgepackError::Unavailable { detail: "no model on the device (cloud-only engine)".into() };
        Ok(Arc::new(Engine::assemble(None, Some(no_model), Some(Arc::new(c)))))
    }

    pub fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    /// The cloud circuit breaker's state (`None` without a cloud).
    pub fn breaker(&self) -> Option<BreakerState> {
        self.cloud.as_ref().map(|c| c.breaker.state())
    }

    /// Runs the model on named tensors; outputs in model order.
    pub fn run(&self, inputs: Vec<NamedTensor>) -> Result<RunResult, EdgepackError> {
        let rt: Vec<_> = inputs.iter().map(NamedTensor::to_runtime).collect::<Result<_, _>>()?;
        let (outputs, provenance) = self.call(
            move |s| {
                let outs = s.run(rt)?;
                Ok(outs.iter().map(|(n, t)| NamedTensor::from_runtime(n.clone(), t)).collect())
            },
            move |c, budget| c.infer(&inputs, budget),
            |_| None,
        )?;
        Ok(RunResult { outputs, provenance })
    }

    /// Classifies one encoded image (JPEG/PNG) with the bundle's pre- and post-processing; best `top_k` classes.
    pub fn classify(&self, image: Vec<u8>, top_k: u32) -> Result<ClassifyResult, EdgepackError> {
        let img = Arc::new(image);
        let k = top_k.clamp(1, 1000);
        let dev = img.clone();
        let min = self.cloud.as_ref().map_or(0.0, |c| c.config.min_confidence);
        let (classes, provenance) = self.call(
            move |s| Ok(classes(s.classify_images(&[dev.as_slice()], Some(k as usize))?)),
            move |c, budget| c.classify(&img, k, budget),
            |v: &Vec<ClassScore>| match v.first() {
                Some(best) if best.score >= min => None,
                Some(best) => Some(format!("device top-1 score {:.3} below {min}", best.score)),
                None => Some("no class from the device".into()),
            },
        )?;
        Ok(ClassifyResult { classes, provenance })
    }

    /// Detects objects in one encoded image (JPEG/PNG); boxes in pixels of the original image.
    pub fn detect(&self, image: Vec<u8>) -> Result<DetectResult, EdgepackError> {
        let img = Arc::new(image);
        let dev = img.clone();
        let (detections, provenance) = self.call(
            move |s| Ok(s.detect_image(&dev)?.into_iter().map(Into::into).collect()),
            move |c, budget| c.detect(&img, budget),
            |_| None,
        )?;
        Ok(DetectResult { detections, provenance })
    }

    /// A stream over this model on the device, with its state carried between chunks (the bundle's stream
    /// description, `edgepack pack --stream-json`). Each stream has its own state; open one per source.
    pub fn open_stream(&self) -> Result<Arc<crate::stream::Stream>, EdgepackError> {
        let s = self.session.clone().ok_or_else(|| {
            self.device_error.clone().unwrap_or(EdgepackError::Unavailable { detail: "no model on the device".into() })
        })?;
        crate::stream::Stream::open(s).map(Arc::new)
    }

    /// `run` off the caller's thread (a Swift `async`, Kotlin `suspend`, Python coroutine).
    pub async fn run_async(self: Arc<Self>, inputs: Vec<NamedTensor>) -> Result<RunResult, EdgepackError> {
        crate::asyncs::blocking(move || self.run(inputs)).await
    }

    pub async fn classify_async(self: Arc<Self>, image: Vec<u8>, top_k: u32) -> Result<ClassifyResult, EdgepackError> {
        crate::asyncs::blocking(move || self.classify(image, top_k)).await
    }

    pub async fn detect_async(self: Arc<Self>, image: Vec<u8>) -> Result<DetectResult, EdgepackError> {
        crate::asyncs::blocking(move || self.detect(image)).await
    }
}
