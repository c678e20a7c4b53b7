//! edgepack runtime: one ONNX graph type ([`onnx::Model`]), sessions over pluggable backends (CPU via tract or edgepack's kernel interpreter, GPU via wgpu/burn),
//! pre/post-processing as data, and the `.edgepack` bundle reader.
//!
//! ```no_run
//! use edgepack_runtime::{Session, SessionOptions};
//! let s = Session::open("model.edgepack", &SessionOptions::default())?;
//! let top5 = s.classify_images(&[&std::fs::read("cat.jpg").unwrap()], Some(5))?;
//! # Ok::<(), edgepack_runtime::Error>(())
//! ```
pub mod backend;
pub mod bundle;
pub mod compress;
#[cfg(feature = "tract")]
pub mod cpu;
#[cfg(feature = "tract")]
mod cpu_ops;
mod error;
pub mod fsutil;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod interp;
pub mod kernels;
pub mod npy;
pub mod onnx;
pub mod process;
mod select;
pub mod session;
pub mod tensor;

pub use backend::{Backend, BackendKind, Device};
pub use bundle::{Bundle, Manifest, OpenOptions, PublicKey};
pub use error::{Error, Result};
pub use session::{IoInfo, Session, SessionOptions};
pub use tensor::{DType, Tensor, TensorData};

/// Version of this crate, recorded in bundles as `created_by`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
