//! zstd for bundle members: the packager compresses (with libzstd, `edgepack_packager::zstd_compress`),
//! [`crate::Bundle::member`] decompresses with pure-Rust `ruzstd` at load with a declared size as the hard limit (a decompression bomb stops there).
use std::io::Read;

/// One zstd frame of `bytes` with ruzstd's encoder (its only level, "fastest"; weaker literal coding than
/// libzstd's): for tests and a fallback; bundles are written by `edgepack_packager::zstd_compress`.
pub fn zstd_compress(bytes: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(bytes, ruzstd::encoding::CompressionLevel::Fastest)
}

/// Decompresses a zstd stream that must hold exactly `size` bytes. Never reads past `size + 1` bytes of output,
/// never panics (a decoder panic is reported as an error).
pub fn zstd_decompress(data: &[u8], size: u64) -> Result<Vec<u8>, String> {
    let run = || -> Result<Vec<u8>, String> {
        let dec = ruzstd::decoding::StreamingDecoder::new(data).map_err(|e| format!("not a zstd stream: {e}"))?;
        let cap = usize::try_from(size).map_err(|_| format!("declared size {size} does not fit in memory"))?;
        let mut out = Vec::with_capacity(cap.min(1 << 30));
        dec.take(size.saturating_add(1)).read_to_end(&mut out).map_err(|e| format!("corrupt zstd data: {e}"))?;
        if out.len() as u64 != size {
            return Err(format!(
                "zstd data decodes to {}{} bytes, the manifest says {size}",
                out.len(),
                if out.len() as u64 > size { "+" } else { "" }
            ));
        }
        Ok(out)
    };
    std::panic::catch_unwind(run).unwrap_or_else(|_| Err("the zstd decoder failed on corrupt data".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let mut data = vec![0u8; 100_000];
        for (i, b) in data.iter_mut().enumerate().step_by(7) {
            *b = (i % 251) as u8;
        }
        let z = zstd_compress(&data);
        assert!(z.len() < data.len() / 3, "{}", z.len());
        assert_eq!(zstd_decompress(&z, data.len() as u64).unwrap(), data);
        assert!(zstd_decompress(&z, data.len() as u64 - 1).unwrap_err().contains("manifest says"));
        assert!(zstd_decompress(&z, data.len() as u64 + 1).is_err());
        assert!(zstd_decompress(&z[..z.len() / 2], data.len() as u64).is_err());
        assert!(zstd_decompress(b"not zstd at all", 10).is_err());
        let mut flipped = z.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x5a;
        assert!(zstd_decompress(&flipped, data.len() as u64).map(|d| d != data).unwrap_or(true));
    }
}
