//! `Device::Auto`: the GPU when an adapter exists, it runs every op of the model and it was measured faster
//! than the CPU at first load; otherwise the CPU. The measurement is cached per (model, adapter, CPU threads)
//! in `$EDGEPACK_CACHE_DIR` (default `$XDG_CACHE_HOME/edgepack` or `~/.cache/edgepack`), so later loads
//! decide without measuring. A software adapter (lavapipe) is not measured: the CPU backend is used.
// Without the GPU backend there is nothing to choose between: the cache and timing helpers go unused.
#![cfg_attr(not(feature = "gpu"), allow(dead_code))]
use std::collections::BTreeMap;

use crate::Result;
use crate::backend::Backend;
use crate::onnx::{Dim, Model};
use crate::session::IoInfo;
use crate::tensor::Tensor;

/// One cached decision.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Choice {
    pub device: String,
    pub cpu_ms: f64,
    pub gpu_ms: f64,
    pub adapter: String,
}

const CACHE_FILE: &str = "device-choice.json";

fn read_cache() -> BTreeMap<String, Choice> {
    crate::fsutil::read_cached_map(CACHE_FILE)
}

fn write_cache(key: &str, choice: &Choice) {
    crate::fsutil::update_cached_map(CACHE_FILE, |all: &mut BTreeMap<String, Choice>| {
        all.insert(key.to_string(), choice.clone());
    });
}

/// A synthetic input of a fully static declaration (`None` when a dimension is free).
fn sample(info: &IoInfo) -> Option<Tensor> {
    info.shape.iter().all(|d| matches!(d, Dim::Fixed(_))).then(|| info.synthetic(1, 0)).flatten()
}

/// Median milliseconds of `runs` runs (after the load-time warm-up).
fn time(b: &dyn Backend, inputs: &[Tensor], runs: usize) -> Result<f64> {
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = std::time::Instant::now();
        b.run(inputs.to_vec())?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// Picks the backend for `Device::Auto`; returns it with the reason.
pub(crate) fn auto(
    model: &Model,
    inputs: &[IoInfo],
    load_cpu: impl Fn() -> Result<Box<dyn Backend>>,
    load_gpu: impl Fn(&Model) -> Result<Box<dyn Backend>>,
) -> Result<(Box<dyn Backend>, String)> {
    #[cfg(not(feature = "gpu"))]
    {
        let _ = (model, inputs, load_gpu);
        return Ok((load_cpu()?, "cpu: this build has no GPU backend".into()));
    }
    #[cfg(feature = "gpu")]
    {
        if let Some((op, _, node)) = crate::gpu::unsupported_op(model) {
            return Ok((load_cpu()?, format!("cpu: op {op} (node `{node}`) has no GPU implementation")));
        }
        let adapter = match crate::gpu::adapter() {
            Ok(a) => a,
            Err(why) => return Ok((load_cpu()?, format!("cpu: {why}"))),
        };
        // A software adapter (Mesa lavapipe/llvmpipe, WARP) runs shaders on the CPU: never faster than the CPU
        // backend, and measuring costs seconds of shader compilation. EDGEPACK_AUTO_MEASURE_SOFTWARE_GPU=1 measures
        // anyway (tests use it to exercise the measurement on lavapipe).
        if adapter.device_type == "Cpu"
            && std::env::var("EDGEPACK_AUTO_MEASURE_SOFTWARE_GPU").map_or(true, |v| v != "1")
        {
            return Ok((load_cpu()?, format!("cpu: the GPU adapter is a software rasterizer ({})", adapter.short())));
        }
        let Some(zero) = inputs.iter().map(sample).collect::<Option<Vec<Tensor>>>() else {
            return Ok((load_cpu()?, "cpu: inputs with free dimensions are not measured; pass --device gpu".into()));
        };
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let key = {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(model.to_bytes());
            format!("{}|{}|{}|cpu{threads}", hex::encode(&digest[..12]), adapter.name, adapter.api)
        };
        if let Some(c) = read_cache().get(&key) {
            let why = format!("{}: cached measurement (cpu {:.2} ms, gpu {:.2} ms)", c.device, c.cpu_ms, c.gpu_ms);
            return Ok((if c.device == "gpu" { load_gpu(model)? } else { load_cpu()? }, why));
        }
        let cpu = load_cpu()?;
        let gpu = match load_gpu(model) {
            Ok(g) => g,
            Err(e) => return Ok((cpu, format!("cpu: the GPU backend failed to load ({e})"))),
        };
        let measure = |b: &dyn Backend| -> Result<f64> {
            b.run(zero.clone())?;
            time(b, &zero, 5)
        };
        let cpu_ms = measure(cpu.as_ref())?;
        let gpu_ms = match measure(gpu.as_ref()) {
            Ok(ms) => ms,
            Err(e) => return Ok((cpu, format!("cpu: the GPU backend failed to run ({e})"))),
        };
        let device = if gpu_ms < cpu_ms { "gpu" } else { "cpu" };
        write_cache(&key, &Choice { device: device.into(), cpu_ms, gpu_ms, adapter: adapter.short() });
        let why = format!("{device}: measured at load (cpu {cpu_ms:.2} ms, gpu {gpu_ms:.2} ms on {})", adapter.short());
        Ok((if device == "gpu" { gpu } else { cpu }, why))
    }
}
