//! edgepack runtime: one ONNX graph type ([`onnx::Model`]), sessions over pluggable backends (CPU via tract or edgepack's kernel interpreter, GPU via wgpu/burn),
//! pre/post-processing as data, and the `.edgepack` bundle reader.
//!
//! This crate is the facade of a ladder of crates under `runtime/` (ARCHITECTURE.md): it owns the session and
//! the choice of backend, and re-exports the lower crates under the paths callers use.
//!
//! ```no_run
//! use edgepack_runtime::{Session, SessionOptions};
//! let s = Session::open("model.edgepack", &SessionOptions::default())?;
//! let top5 = s.classify_images(&[&std::fs::read("cat.jpg").unwrap()], Some(5))?;
//! # Ok::<(), edgepack_runtime::Error>(())
//! ```
pub use edgepack_backend as backend;
pub use edgepack_bundle as bundle;
pub use edgepack_bundle::compress;
pub use edgepack_core::{alloc, fsutil, npy, tensor};
#[cfg(feature = "gpu")]
pub use edgepack_gpu as gpu;
pub use edgepack_interp as interp;
pub use edgepack_lower as lower;
pub use edgepack_process as process;
#[cfg(feature = "tract")]
pub use edgepack_tract as cpu;

/// The CPU kernels ([`edgepack_kernels`]) and the kernel nodes that run them ([`edgepack_lower::nodes`]).
pub mod kernels {
    pub use edgepack_kernels::*;
    pub use edgepack_lower::nodes;
}

/// The ONNX graph type ([`edgepack_onnx`]) and the CPU lowering passes ([`edgepack_lower`]) under one path.
pub mod onnx {
    pub use edgepack_lower::{CpuLowering, F32Kernels, LowerFor, LowerForCpu, QdqInteger, QdqKernels};
    pub use edgepack_lower::{f32_kernels, qdq_kernels, qdq_lower};
    pub use edgepack_onnx::*;
}

pub mod kserve;
mod select;
pub mod session;
pub mod stream;

pub use backend::{Backend, BackendKind, Device};
pub use bundle::{Bundle, Manifest, OpenOptions, PublicKey};
pub use edgepack_core::{Error, Result, is_dependency_source, no_panic, panic_culprit, panic_origin, utc_rfc3339};
pub use session::{BackendInfo, IoInfo, Session, SessionOptions};
pub use tensor::{DType, Tensor, TensorData};

/// Version of this crate, recorded in bundles as `created_by`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The optional parts compiled into this build: the CPU engine ("tract", else "interp", the kernel interpreter)
/// and "gpu" when the wgpu backend is in.
pub fn features() -> Vec<&'static str> {
    let mut f = vec![if cfg!(feature = "tract") { "tract" } else { "interp" }];
    if cfg!(feature = "gpu") {
        f.push("gpu");
    }
    f
}
