//! The process-wide wgpu device: found once, shared by every GPU session (burn's runtime keeps one client,
//! its compiled pipelines and its memory pools per device).
use std::sync::OnceLock;

use burn_wgpu::{RuntimeOptions, WgpuDevice, graphics, wgpu};

/// What the adapter is and can do.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterInfo {
    /// e.g. "llvmpipe (LLVM 15.0.6, 256 bits)", "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Graphics API: "Vulkan", "Metal", "Dx12", "Gl".
    pub api: String,
    /// "DiscreteGpu", "IntegratedGpu", "Cpu" (a software rasterizer such as lavapipe), ...
    pub device_type: String,
    pub driver: String,
    /// The adapter has `shader-f16` (f16 arithmetic in shaders).
    pub shader_f16: bool,
}

impl AdapterInfo {
    /// Short form for reports: "llvmpipe (LLVM 15.0.6, 256 bits) / Vulkan".
    pub fn short(&self) -> String {
        format!("{} / {}", self.name, self.api)
    }
}

pub(crate) struct GpuDevice {
    pub device: <super::plan::B as burn_backend::BackendTypes>::Device,
    pub info: AdapterInfo,
    /// The same wgpu device and queue burn's runtime uses, for the fused programs' own pipelines and buffers.
    pub wgpu: wgpu::Device,
    pub queue: wgpu::Queue,
}

static DEVICE: OnceLock<std::result::Result<GpuDevice, String>> = OnceLock::new();

/// The device, initialised on first use. `Err` says why there is none (no adapter, driver failure,
/// `EDGEPACK_GPU=off`); it is the signal to run on the CPU.
pub(crate) fn device() -> std::result::Result<&'static GpuDevice, String> {
    DEVICE.get_or_init(init).as_ref().map_err(Clone::clone)
}

/// Whether this process has started the GPU device (a GPU session was loaded); [`adapter`] alone does not.
pub fn device_started() -> bool {
    matches!(DEVICE.get(), Some(Ok(_)))
}

/// The adapter a GPU session would use, or why there is none.
///
/// Asked of wgpu alone, without starting the device: once burn's runtime has a device, its server thread wakes
/// every 150 µs for the rest of the process (cubecl parks it with a timeout), and a CPU session that only asked
/// (`Device::Auto` choosing the CPU, `edgepack devices`) would carry that thread, which takes turns on a core the
/// CPU kernels run on (a 2-thread CPU run on 2 cores was preempted about 18 times per run by it) and keeps a phone
/// awake. The probe picks the adapter the device would: the same API, wgpu's high-performance choice, or the one
/// `CUBECL_WGPU_DEFAULT_DEVICE` names.
pub fn adapter() -> std::result::Result<AdapterInfo, String> {
    if let Some(started) = DEVICE.get() {
        // Once a session tried to start it, the device's own answer (a driver can fail after the adapter is found).
        return started.as_ref().map(|d| d.info.clone()).map_err(Clone::clone);
    }
    static PROBED: OnceLock<std::result::Result<AdapterInfo, String>> = OnceLock::new();
    PROBED.get_or_init(|| std::panic::catch_unwind(probe).unwrap_or_else(|p| Err(driver_panic(p)))).clone()
}

fn disabled() -> std::result::Result<(), String> {
    if std::env::var("EDGEPACK_GPU").is_ok_and(|v| v == "off" || v == "0") {
        return Err("disabled by EDGEPACK_GPU=off".into());
    }
    Ok(())
}

fn driver_panic(p: Box<dyn std::any::Any + Send>) -> String {
    let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
    format!("the wgpu driver failed while starting: {}", msg.unwrap_or_default())
}

/// The native APIs in the order [`setup_on_native_api`] tries them.
fn native_apis() -> Vec<(wgpu::Backend, &'static str)> {
    if cfg!(any(target_os = "macos", target_os = "ios")) {
        vec![(wgpu::Backend::Metal, "Metal")]
    } else if cfg!(windows) {
        vec![(wgpu::Backend::Vulkan, "Vulkan"), (wgpu::Backend::Dx12, "Dx12")]
    } else {
        vec![(wgpu::Backend::Vulkan, "Vulkan")]
    }
}

/// The adapter wgpu hands burn's default device, found on a throwaway instance (dropped before returning).
fn probe() -> std::result::Result<AdapterInfo, String> {
    disabled()?;
    let wanted = match std::env::var("CUBECL_WGPU_DEFAULT_DEVICE") {
        Ok(v) => {
            Some(parse_device_override(&v).ok_or_else(|| format!("CUBECL_WGPU_DEFAULT_DEVICE={v} is not a device"))?)
        }
        Err(_) => None,
    };
    let mut why = String::new();
    for (api, name) in native_apis() {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: api.into(),
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let adapter = match &wanted {
            Some((kind, n)) => block_on(instance.enumerate_adapters(api.into()))
                .into_iter()
                .filter(|a| a.get_info().device_type == *kind)
                .nth(*n)
                .ok_or_else(|| format!("no adapter {kind:?}({n})")),
            None => block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                compatible_surface: None,
                ..Default::default()
            }))
            .map_err(|e| e.to_string()),
        };
        match adapter {
            Ok(a) => return Ok(adapter_info(&a.get_info(), a.features())),
            Err(e) => why = format!("no usable GPU adapter ({name}): {e}"),
        }
    }
    Err(why)
}

/// `CUBECL_WGPU_DEFAULT_DEVICE`'s syntax: `Cpu`, or `DiscreteGpu(n)`, `IntegratedGpu(n)`, `VirtualGpu(n)`,
/// `Other(n)` (the n-th adapter of that type).
fn parse_device_override(v: &str) -> Option<(wgpu::DeviceType, usize)> {
    if v == "Cpu" {
        return Some((wgpu::DeviceType::Cpu, 0));
    }
    let (kind, n) = v.strip_suffix(')')?.split_once('(')?;
    let kind = match kind {
        "DiscreteGpu" => wgpu::DeviceType::DiscreteGpu,
        "IntegratedGpu" => wgpu::DeviceType::IntegratedGpu,
        "VirtualGpu" => wgpu::DeviceType::VirtualGpu,
        "Other" => wgpu::DeviceType::Other,
        _ => return None,
    };
    Some((kind, n.parse().ok()?))
}

/// Drives a native wgpu future (they complete when first polled; none waits on an event loop).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

fn adapter_info(raw: &wgpu::AdapterInfo, features: wgpu::Features) -> AdapterInfo {
    AdapterInfo {
        name: raw.name.clone(),
        api: format!("{:?}", raw.backend),
        device_type: format!("{:?}", raw.device_type),
        driver: format!("{} {}", raw.driver, raw.driver_info).trim().to_string(),
        shader_f16: features.contains(wgpu::Features::SHADER_F16),
    }
}

fn init() -> std::result::Result<GpuDevice, String> {
    disabled()?;
    let found = std::panic::catch_unwind(|| {
        let selector = WgpuDevice::default();
        setup_on_native_api(&selector).map(|setup| (selector, setup))
    })
    .map_err(driver_panic)??;
    let (selector, setup) = found;
    let info = adapter_info(&setup.adapter.get_info(), setup.device.features());
    Ok(GpuDevice { device: selector.into(), info, wgpu: setup.device.clone(), queue: setup.queue.clone() })
}

/// Brings the device up on the platform's native compute API: Metal on Apple platforms, Vulkan elsewhere (then
/// DX12 on Windows). Never OpenGL, which the backend does not target: wgpu's automatic choice probes it after a
/// software-only Vulkan adapter (lavapipe), and its EGL probe prints `XDG_RUNTIME_DIR is invalid` once per display
/// it tries on a headless machine, on every run with `--device auto`.
fn setup_on_native_api(selector: &WgpuDevice) -> std::result::Result<burn_wgpu::WgpuSetup, String> {
    let opts = RuntimeOptions::default;
    let failed = |api: &str, e: burn_wgpu::WgpuInitError| format!("no usable GPU adapter ({api}): {e}");
    #[cfg(any(target_os = "macos", target_os = "ios"))]
    return burn_wgpu::try_init_setup::<graphics::Metal>(selector, opts()).map_err(|e| failed("Metal", e));
    #[cfg(not(any(target_os = "macos", target_os = "ios")))]
    {
        let vulkan = burn_wgpu::try_init_setup::<graphics::Vulkan>(selector, opts());
        #[cfg(windows)]
        let vulkan = vulkan.or_else(|_| burn_wgpu::try_init_setup::<graphics::Dx12>(selector, opts()));
        vulkan.map_err(|e| failed("Vulkan", e))
    }
}
