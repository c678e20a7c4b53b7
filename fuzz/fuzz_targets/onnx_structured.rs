//! ONNX models mutated field by field (attributes, op types, node inputs, initializer and input shapes, opsets):
//! byte mutations of a protobuf rarely survive decoding, these reach the checks, the passes and the kernels.
#![no_main]
use libfuzzer_sys::{fuzz_mutator, fuzz_target};

fuzz_target!(
    init: edgepack_fuzz::contain_dependency_panics(),
    |data: &[u8]| edgepack_fuzz::fuzz_model_bytes(data)
);

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    let mut rng = edgepack_fuzz::Rng::new(seed);
    // One time in eight (and for bytes that are no model) libFuzzer's own byte mutations.
    if rng.below(8) != 0
        && let Some(m) = edgepack_fuzz::mutate_model(&data[..size], &mut rng)
        && m.len() <= max_size
    {
        data[..m.len()].copy_from_slice(&m);
        return m.len();
    }
    libfuzzer_sys::fuzzer_mutate(data, size, max_size)
});
