//! `.npz` files (numpy's `savez` / `savez_compressed`): a ZIP archive of `.npy` members, one per array, named
//! `NAME.npy`. Read through the central directory; members stored or deflated; the ZIP64 size and offset fields
//! numpy writes (`force_zip64`) are honoured. Never panics on malformed bytes.
use std::io::Read;

use edgepack_runtime::{Tensor, npy};

/// Largest uncompressed member accepted (a calibration sample, not a dataset).
const MAX_MEMBER: u64 = 1 << 31;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The arrays of an `.npz` archive, by name (the member name without `.npy`), in archive order.
pub fn read(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, String> {
    let bad = |m: &str| format!("not a valid .npz file: {m}");
    // End of central directory: the last "PK\x05\x06" within the final 64 KiB + 22 bytes.
    let from = bytes.len().saturating_sub(22 + 65_535);
    let eocd = (from..bytes.len().saturating_sub(21))
        .rev()
        .find(|&i| bytes[i..].starts_with(b"PK\x05\x06"))
        .ok_or_else(|| bad("no ZIP end-of-central-directory record"))?;
    let mut entries = u16_at(bytes, eocd + 10).ok_or_else(|| bad("truncated"))? as u64;
    let mut cd = u32_at(bytes, eocd + 16).ok_or_else(|| bad("truncated"))? as u64;
    // ZIP64: the locator just before the record points at the ZIP64 end of central directory.
    if (entries == 0xFFFF || cd == 0xFFFF_FFFF) && eocd >= 20 && bytes[eocd - 20..].starts_with(b"PK\x06\x07") {
        let z = u64_at(bytes, eocd - 12).ok_or_else(|| bad("truncated"))? as usize;
        if !bytes.get(z..).is_some_and(|b| b.starts_with(b"PK\x06\x06")) {
            return Err(bad("bad ZIP64 end-of-central-directory record"));
        }
        entries = u64_at(bytes, z + 32).ok_or_else(|| bad("truncated"))?;
        cd = u64_at(bytes, z + 48).ok_or_else(|| bad("truncated"))?;
    }
    let mut at = usize::try_from(cd).map_err(|_| bad("central directory offset"))?;
    let mut out = Vec::new();
    for _ in 0..entries {
        if !bytes.get(at..).is_some_and(|b| b.starts_with(b"PK\x01\x02")) {
            return Err(bad("bad central directory entry"));
        }
        let field = |o: usize| u16_at(bytes, at + o).ok_or_else(|| bad("truncated")).map(usize::from);
        let method = field(10)?;
        let mut csize = u32_at(bytes, at + 20).ok_or_else(|| bad("truncated"))? as u64;
        let mut usize_ = u32_at(bytes, at + 24).ok_or_else(|| bad("truncated"))? as u64;
        let (nlen, xlen, clen) = (field(28)?, field(30)?, field(32)?);
        let mut local = u32_at(bytes, at + 42).ok_or_else(|| bad("truncated"))? as u64;
        let name = bytes.get(at + 46..at + 46 + nlen).ok_or_else(|| bad("truncated name"))?;
        let name = String::from_utf8_lossy(name).to_string();
        // ZIP64 extra field (id 1): the 0xFFFFFFFF fields, in the order uncompressed, compressed, offset.
        let extra = bytes.get(at + 46 + nlen..at + 46 + nlen + xlen).ok_or_else(|| bad("truncated extra field"))?;
        let mut e = 0;
        while e + 4 <= extra.len() {
            let (id, len) = (u16_at(extra, e).unwrap_or(0), u16_at(extra, e + 2).unwrap_or(0) as usize);
            if id == 1 {
                let mut p = e + 4;
                let mut take = |v: &mut u64| {
                    if *v == 0xFFFF_FFFF {
                        *v = u64_at(extra, p).unwrap_or(u64::MAX);
                        p += 8;
                    }
                };
                take(&mut usize_);
                take(&mut csize);
                take(&mut local);
            }
            e += 4 + len;
        }
        at += 46 + nlen + xlen + clen;
        if name.ends_with('/') {
            continue;
        }
        if usize_ > MAX_MEMBER || csize > bytes.len() as u64 {
            return Err(bad(&format!("member {name} is too large")));
        }
        let l = usize::try_from(local).map_err(|_| bad("member offset"))?;
        if !bytes.get(l..).is_some_and(|b| b.starts_with(b"PK\x03\x04")) {
            return Err(bad(&format!("member {name}: bad local header")));
        }
        let start = l + 30 + u16_at(bytes, l + 26).unwrap_or(0) as usize + u16_at(bytes, l + 28).unwrap_or(0) as usize;
        let data = bytes.get(start..start + csize as usize).ok_or_else(|| bad(&format!("member {name} is cut")))?;
        let raw = match method {
            0 => data.to_vec(),
            8 => {
                let mut v = Vec::with_capacity(usize_.min(1 << 26) as usize);
                flate2::read::DeflateDecoder::new(data)
                    .take(MAX_MEMBER + 1)
                    .read_to_end(&mut v)
                    .map_err(|e| bad(&format!("member {name}: {e}")))?;
                v
            }
            m => return Err(bad(&format!("member {name}: compression method {m} (stored or deflate only)"))),
        };
        if raw.len() as u64 != usize_ {
            return Err(bad(&format!("member {name}: {} bytes, the directory says {usize_}", raw.len())));
        }
        let t = npy::read(&raw).map_err(|e| format!("{name}: {e}"))?;
        out.push((name.strip_suffix(".npy").unwrap_or(&name).to_string(), t));
    }
    if out.is_empty() {
        return Err(bad("no arrays"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored (uncompressed) ZIP of `members`, as a plain writer lays it out (no ZIP64).
    fn stored_zip(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let (mut out, mut cd) = (Vec::new(), Vec::new());
        for (name, data) in members {
            let off = out.len() as u32;
            let crc = 0u32; // not checked by the reader
            out.extend(b"PK\x03\x04");
            out.extend([20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend(crc.to_le_bytes());
            out.extend((data.len() as u32).to_le_bytes());
            out.extend((data.len() as u32).to_le_bytes());
            out.extend((name.len() as u16).to_le_bytes());
            out.extend(0u16.to_le_bytes());
            out.extend(name.as_bytes());
            out.extend(data);
            cd.extend(b"PK\x01\x02");
            cd.extend([20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            cd.extend(crc.to_le_bytes());
            cd.extend((data.len() as u32).to_le_bytes());
            cd.extend((data.len() as u32).to_le_bytes());
            cd.extend((name.len() as u16).to_le_bytes());
            cd.extend([0u8; 12]);
            cd.extend(off.to_le_bytes());
            cd.extend(name.as_bytes());
        }
        let (cd_off, cd_len) = (out.len() as u32, cd.len() as u32);
        out.extend(cd);
        out.extend(b"PK\x05\x06");
        out.extend([0u8; 4]);
        out.extend((members.len() as u16).to_le_bytes());
        out.extend((members.len() as u16).to_le_bytes());
        out.extend(cd_len.to_le_bytes());
        out.extend(cd_off.to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out
    }

    #[test]
    fn reads_stored_members_and_refuses_damage() {
        let a = Tensor::from_f32(vec![1, 2], vec![1.5, -2.0]).unwrap();
        let ids = Tensor::new(vec![1, 3], edgepack_runtime::TensorData::I64(vec![7, 8, 9])).unwrap();
        let z = stored_zip(&[("x.npy", npy::write(&a)), ("input_ids.npy", npy::write(&ids))]);
        let got = read(&z).unwrap();
        assert_eq!(got, vec![("x".to_string(), a), ("input_ids".to_string(), ids)]);
        // Every truncation and a flipped byte anywhere: an error or (in payload bytes) other values, never a panic.
        for cut in 0..z.len() {
            let _ = read(&z[..cut]);
        }
        for i in 0..z.len() {
            let mut d = z.clone();
            d[i] ^= 0xFF;
            let _ = read(&d);
        }
        assert!(read(b"not a zip").unwrap_err().contains("not a valid .npz"));
    }
}
