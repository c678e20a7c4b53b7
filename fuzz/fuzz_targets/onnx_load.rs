//! ONNX bytes: decode, check, load on the interpreter and on tract, run on small synthetic inputs.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: edgepack_fuzz::contain_dependency_panics(),
    |data: &[u8]| edgepack_fuzz::fuzz_model_bytes(data)
);
