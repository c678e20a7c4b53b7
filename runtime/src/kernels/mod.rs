//! INT8 kernels. Today: the scalar reference ([`reference`]) that defines the arithmetic and that the QDQ lowering
//! (`onnx::qdq_lower`) is tested against; fast kernels selected by CPU features come next and are tested against
//! the same reference.
pub mod reference;

#[cfg(test)]
mod tests;
