//! The base of the runtime's crate ladder: typed tensors and element types, dimensions, the one error type,
//! `.npy` reading and atomic writes. It depends on no other edgepack crate.
pub mod alloc;
mod clock;
mod dim;
pub mod error;
pub mod fsutil;
pub use clock::utc_rfc3339;
mod kind;
pub mod npy;
pub mod tensor;

pub use dim::{Dim, shape_string};
pub use error::{BundleError, Error, Result, is_dependency_source, no_panic, panic_culprit, panic_origin};
pub use kind::BackendKind;
pub use tensor::{DType, Tensor, TensorData};
