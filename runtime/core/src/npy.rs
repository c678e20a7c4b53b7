//! Minimal `.npy` (NumPy array file) reader and writer, for the CLI and the reference comparisons.
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

fn descr(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "<f4",
        DType::F16 => "<f2",
        DType::F64 => "<f8",
        DType::I64 => "<i8",
        DType::I32 => "<i4",
        DType::I16 => "<i2",
        DType::U64 => "<u8",
        DType::U32 => "<u4",
        DType::U16 => "<u2",
        DType::I8 => "|i1",
        DType::U8 => "|u1",
        DType::Bool => "|b1",
    }
}

fn parse_descr(s: &str) -> Option<DType> {
    Some(match s {
        "<f4" => DType::F32,
        "<f2" => DType::F16,
        "<f8" => DType::F64,
        "<i8" => DType::I64,
        "<i4" => DType::I32,
        "<i2" => DType::I16,
        "<u8" => DType::U64,
        "<u4" => DType::U32,
        "<u2" => DType::U16,
        "|i1" | "<i1" => DType::I8,
        "|u1" | "<u1" => DType::U8,
        "|b1" | "<b1" => DType::Bool,
        _ => return None,
    })
}

/// Value of `'key': value` in the header dict (strings unquoted, tuples kept with their parentheses).
fn field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else if let Some(r) = rest.strip_prefix('\'') {
        return r.find('\'').map(|e| &r[..e]);
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    Some(rest[..end].trim())
}

/// Parses `.npy` bytes (little-endian, C order).
pub fn read(bytes: &[u8]) -> Result<Tensor> {
    let bad = |m: &str| Error::Npy(m.to_string());
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad("not a .npy file"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
        v => return Err(Error::Npy(format!("unsupported .npy version {v}"))),
    };
    let header = bytes.get(start..start + hlen).ok_or_else(|| bad("truncated header"))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not text"))?;
    let d = field(header, "descr").ok_or_else(|| bad("no descr"))?;
    let dtype = parse_descr(d).ok_or_else(|| Error::Npy(format!("unsupported dtype `{d}`")))?;
    if field(header, "fortran_order") != Some("False") {
        return Err(bad("only C-order arrays are supported"));
    }
    let shape_s = field(header, "shape").ok_or_else(|| bad("no shape"))?;
    let shape = shape_s
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>().map_err(|_| Error::Npy(format!("bad shape `{shape_s}`"))))
        .collect::<Result<Vec<_>>>()?;
    Tensor::from_le_bytes(dtype, shape, &bytes[start + hlen..])
}

/// Serialises a tensor as `.npy` (version 1.0).
pub fn write(t: &Tensor) -> Vec<u8> {
    let shape = match t.shape() {
        [d] => format!("({d},)"),
        s => format!("({})", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}", descr(t.dtype()));
    let total = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + t.len() * t.dtype().size());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend(t.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for t in [
            Tensor::from_f32(vec![2, 3], (0..6).map(|x| x as f32).collect()).unwrap(),
            Tensor::from_f32(vec![5], vec![1.0; 5]).unwrap().cast(DType::I64),
            Tensor::from_f32(vec![], vec![7.0]).unwrap().cast(DType::U8),
        ] {
            let b = write(&t);
            assert_eq!((b.len() - t.len() * t.dtype().size()) % 64, 0);
            assert_eq!(read(&b).unwrap(), t);
        }
        assert!(read(b"garbage").is_err());
        let mut b = write(&Tensor::from_f32(vec![4], vec![0.0; 4]).unwrap());
        b.truncate(b.len() - 1);
        assert!(read(&b).is_err());
    }
}
