//! KServe v2 JSON inference requests (the HTTP body without binary data) into tensors.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edgepack_server::fuzzing::kserve_request(data, None);
});
