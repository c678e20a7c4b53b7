//! KServe v2 requests with the binary tensor extension: the first two bytes give the JSON part's length
//! (`Inference-Header-Content-Length`), the rest is the body.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = u16::from_le_bytes([data[0], data[1]]) as usize;
    let _ = edgepack_server::fuzzing::kserve_request(&data[2..], Some(n));
});
