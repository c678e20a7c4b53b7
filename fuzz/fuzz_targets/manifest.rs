//! Manifest JSON inside a well-formed container: the fuzzed manifest is wrapped in a header and its members'
//! hashes are made to match the bytes they point at, so that the layout and reference checks, member decoding
//! (stored and zstd, with fuzzed sizes) and the pre/post-processing descriptions are reached, not just the hash.
#![no_main]
use edgepack_runtime::bundle::{self, Bundle, Manifest, OpenOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: edgepack_fuzz::contain_dependency_panics(),
    |data: &[u8]| {
        // The input: manifest JSON, then (after a NUL, when present) the member payload.
        let (json, payload) = match data.iter().position(|&b| b == 0) {
            Some(i) => (&data[..i], &data[i + 1..]),
            None => (data, &[][..]),
        };
        let Ok(mut m) = serde_json::from_slice::<Manifest>(json) else {
            let _ = serde_json::from_slice::<serde_json::Value>(json);
            return;
        };
        // Members point into the payload, placed right after the manifest at the container's alignment.
        let fix = |m: &mut Manifest, start: u64| {
            for mem in &mut m.members {
                let (o, s) = (mem.offset.wrapping_sub(start) as usize, mem.size as usize);
                if let Some(d) = o.checked_add(s).and_then(|e| payload.get(o..e)) {
                    mem.sha256 = bundle::sha256_hex(d);
                }
            }
        };
        let mut manifest = serde_json::to_vec(&m).unwrap();
        let start = (bundle::HEADER_LEN + manifest.len()) as u64;
        let start = start.div_ceil(bundle::ALIGN) * bundle::ALIGN;
        fix(&mut m, start);
        manifest = serde_json::to_vec(&m).unwrap();
        let pad = (start as usize).saturating_sub(bundle::HEADER_LEN + manifest.len());
        let total = (bundle::HEADER_LEN + manifest.len() + pad + payload.len()) as u64;
        let mut b = Vec::with_capacity(total as usize);
        b.extend_from_slice(bundle::MAGIC);
        b.extend_from_slice(&bundle::CONTAINER_VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(manifest.len() as u64).to_le_bytes());
        b.extend_from_slice(&total.to_le_bytes());
        b.extend_from_slice(&manifest);
        b.resize(b.len() + pad, 0);
        b.extend_from_slice(payload);
        let Ok(b) = Bundle::from_bytes(b, &OpenOptions::default()) else { return };
        for mem in b.manifest().members.clone() {
            let _ = b.member(&mem.path);
        }
        let _ = b.labels();
        let opts = edgepack_runtime::SessionOptions { device: edgepack_runtime::Device::Cpu, threads: 1, ..Default::default() };
        let _ = edgepack_runtime::Session::from_bundle(b, &opts);
    }
);
