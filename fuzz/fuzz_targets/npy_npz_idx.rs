//! Calibration and test data files: `.npy`, `.npz` (ZIP, stored or deflated, ZIP64) and MNIST IDX.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edgepack_runtime::npy::read(data);
    let _ = edgepack_quantize::npz::read(data);
    let _ = edgepack_quantize::data::parse_idx(data);
});
