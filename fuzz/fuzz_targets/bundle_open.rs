//! `.edgepack` bytes: open (header, signature, manifest, layout, every member's hash), read every member (zstd
//! decoding included), the labels, and load the default variant on the CPU.
#![no_main]
use edgepack_runtime::bundle::{Bundle, OpenOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: edgepack_fuzz::contain_dependency_panics(),
    |data: &[u8]| {
        let Ok(b) = Bundle::from_bytes(data.to_vec(), &OpenOptions::default()) else { return };
        for m in b.manifest().members.clone() {
            let _ = b.member(&m.path);
        }
        let _ = b.labels();
        let opts = edgepack_runtime::SessionOptions { device: edgepack_runtime::Device::Cpu, threads: 1, ..Default::default() };
        let _ = edgepack_runtime::Session::from_bundle(b, &opts);
    }
);
