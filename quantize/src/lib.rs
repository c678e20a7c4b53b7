//! edgepack offline model tools. Today: datasets and calibration samples ([`data`]), shared by `edgepack eval`
//! and (next) calibration for INT8 quantization and pruning, which will be passes over
//! `edgepack_runtime::onnx::Graph`.
pub mod calib;
pub mod data;
pub mod qdq;
