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

/// The adapter a GPU session would use, or why there is none.
pub fn adapter() -> std::result::Result<AdapterInfo, String> {
    device().map(|d| d.info.clone())
}

fn init() -> std::result::Result<GpuDevice, String> {
    if std::env::var("EDGEPACK_GPU").is_ok_and(|v| v == "off" || v == "0") {
        return Err("disabled by EDGEPACK_GPU=off".into());
    }
    let found = std::panic::catch_unwind(|| {
        let selector = WgpuDevice::default();
        setup_on_native_api(&selector).map(|setup| (selector, setup))
    })
    .map_err(|p| {
        let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
        format!("the wgpu driver failed while starting: {}", msg.unwrap_or_default())
    })??;
    let (selector, setup) = found;
    let raw = setup.adapter.get_info();
    let info = AdapterInfo {
        name: raw.name.clone(),
        api: format!("{:?}", raw.backend),
        device_type: format!("{:?}", raw.device_type),
        driver: format!("{} {}", raw.driver, raw.driver_info).trim().to_string(),
        shader_f16: setup.device.features().contains(wgpu::Features::SHADER_F16),
    };
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
