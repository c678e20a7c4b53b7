//! edgepack offline model tools, as passes over `edgepack_runtime::onnx::Graph`:
//! - [`data`]: datasets and calibration samples (shared by `edgepack eval`), read lazily; [`npz`]: `.npz` samples; [`feeds`]: samples as a model's feeds, recurrent state carried over a sequence;
//! - [`calib`]: streaming calibration (min-max, percentile, entropy, MSE observers);
//! - [`qdq`]: the QDQ INT8 pass; [`dynamic`]: onnxruntime's dynamic form (MatMulInteger, int8 LSTM weights); [`mixed`]: per-layer sensitivity and mixed precision under a budget;
//! - [`equalize`]: activation equalization (per-channel ranges moved into the weights that read them);
//! - [`rounding`]: GPTQ and bias correction fitted to calibration inputs; [`weight_only`]: 4-bit blocked weights, float activations;
//! - [`fidelity`] + [`report`]: how close the INT8 model is to fp32, as JSON, a table and HTML;
//! - [`pipeline`]: the whole `edgepack quantize` job as one call;
//! - [`prune`]: unstructured and structured pruning, repair, sensitivity, plan and report (`edgepack prune`).
pub mod calib;
pub mod data;
pub mod dynamic;
pub mod equalize;
pub mod eval;
pub mod feeds;
pub mod fidelity;
pub mod mixed;
pub mod npz;
pub mod pipeline;
pub mod prune;
pub mod qdq;
pub mod report;
pub mod rounding;
pub mod weight_only;
