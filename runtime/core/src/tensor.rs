//! Owned, typed tensors: the values that cross the public API (named inputs and outputs).
use half::f16;

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Bool,
}

impl DType {
    /// Every element type.
    pub const ALL: [DType; 12] = [
        DType::F32,
        DType::F16,
        DType::F64,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U64,
        DType::U32,
        DType::U16,
        DType::U8,
        DType::Bool,
    ];

    /// The KServe v2 / Open Inference Protocol datatype name (spoken by `edgepack serve` and its clients).
    pub fn kserve_name(self) -> &'static str {
        match self {
            DType::F32 => "FP32",
            DType::F16 => "FP16",
            DType::F64 => "FP64",
            DType::I64 => "INT64",
            DType::I32 => "INT32",
            DType::I16 => "INT16",
            DType::I8 => "INT8",
            DType::U64 => "UINT64",
            DType::U32 => "UINT32",
            DType::U16 => "UINT16",
            DType::U8 => "UINT8",
            DType::Bool => "BOOL",
        }
    }

    /// The element type of a KServe v2 datatype name (`BYTES` has none: strings are not tensors here).
    pub fn from_kserve_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.kserve_name() == name)
    }

    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::I16 | DType::U16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I16 => "i16",
            DType::I8 => "i8",
            DType::U64 => "u64",
            DType::U32 => "u32",
            DType::U16 => "u16",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" | "float" | "float32" => DType::F32,
            "f16" | "float16" | "half" => DType::F16,
            "f64" | "double" | "float64" => DType::F64,
            "i64" | "int64" => DType::I64,
            "i32" | "int32" => DType::I32,
            "i16" | "int16" => DType::I16,
            "i8" | "int8" => DType::I8,
            "u64" | "uint64" => DType::U64,
            "u32" | "uint32" => DType::U32,
            "u16" | "uint16" => DType::U16,
            "u8" | "uint8" => DType::U8,
            "bool" => DType::Bool,
            _ => return None,
        })
    }

    /// ONNX `TensorProto.DataType` code.
    pub fn onnx_code(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::U8 => 2,
            DType::I8 => 3,
            DType::U16 => 4,
            DType::I16 => 5,
            DType::I32 => 6,
            DType::I64 => 7,
            DType::U32 => 12,
            DType::U64 => 13,
            DType::Bool => 9,
            DType::F16 => 10,
            DType::F64 => 11,
        }
    }

    pub fn from_onnx_code(code: i32) -> Option<DType> {
        Some(match code {
            1 => DType::F32,
            2 => DType::U8,
            3 => DType::I8,
            4 => DType::U16,
            5 => DType::I16,
            6 => DType::I32,
            7 => DType::I64,
            12 => DType::U32,
            13 => DType::U64,
            9 => DType::Bool,
            10 => DType::F16,
            11 => DType::F64,
            _ => return None,
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The element storage of a [`Tensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    I16(Vec<i16>),
    I8(Vec<i8>),
    U64(Vec<u64>),
    U32(Vec<u32>),
    U16(Vec<u16>),
    U8(Vec<u8>),
    Bool(Vec<bool>),
}

macro_rules! each_data {
    ($data:expr, $v:ident => $e:expr) => {
        match $data {
            TensorData::F32($v) => $e,
            TensorData::F16($v) => $e,
            TensorData::F64($v) => $e,
            TensorData::I64($v) => $e,
            TensorData::I32($v) => $e,
            TensorData::I16($v) => $e,
            TensorData::I8($v) => $e,
            TensorData::U64($v) => $e,
            TensorData::U32($v) => $e,
            TensorData::U16($v) => $e,
            TensorData::U8($v) => $e,
            TensorData::Bool($v) => $e,
        }
    };
}

/// A dense, row-major tensor with a concrete shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: TensorData,
}

fn checked_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl Tensor {
    /// Builds a tensor, checking that `shape` matches the number of elements.
    pub fn new(shape: Vec<usize>, data: TensorData) -> crate::Result<Tensor> {
        let n = each_data!(&data, v => v.len());
        match checked_count(&shape) {
            Some(c) if c == n => Ok(Tensor { shape, data }),
            _ => Err(crate::Error::InvalidTensor(format!("shape {shape:?} does not hold {n} elements"))),
        }
    }

    /// A deterministic synthetic tensor for benchmarks, warm-ups and device probes: floats pseudo-random in
    /// [0, 1) from `seed` (xorshift), integers zero (valid indices and sizes), bools false. The one generator
    /// for every caller (backend selection, `edgepack bench`, the server's batching probe).
    pub fn synthetic(dtype: DType, shape: Vec<usize>, seed: u64) -> crate::Result<Tensor> {
        let n =
            checked_count(&shape).ok_or_else(|| crate::Error::InvalidTensor(format!("shape {shape:?} overflows")))?;
        if !matches!(dtype, DType::F32 | DType::F16 | DType::F64) {
            return Tensor::from_le_bytes(dtype, shape, &vec![0u8; n * dtype.size()]);
        }
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect();
        Ok(Tensor::from_f32(shape, v)?.cast(dtype))
    }

    pub fn from_f32(shape: Vec<usize>, v: Vec<f32>) -> crate::Result<Tensor> {
        Tensor::new(shape, TensorData::F32(v))
    }

    /// Builds a tensor from little-endian bytes (the layout used by the bindings and by .npy files).
    pub fn from_le_bytes(dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> crate::Result<Tensor> {
        let count =
            checked_count(&shape).ok_or_else(|| crate::Error::InvalidTensor(format!("shape {shape:?} overflows")))?;
        let expected = count.checked_mul(dtype.size());
        if expected != Some(bytes.len()) {
            return Err(crate::Error::InvalidTensor(format!(
                "{dtype} tensor of shape {shape:?} needs {} bytes, got {}",
                expected.map(|e| e.to_string()).unwrap_or_else(|| "too many".into()),
                bytes.len()
            )));
        }
        macro_rules! conv {
            ($t:ty, $n:expr) => {
                bytes.chunks_exact($n).map(|c| <$t>::from_le_bytes(c.try_into().unwrap())).collect()
            };
        }
        let data = match dtype {
            DType::F32 => TensorData::F32(conv!(f32, 4)),
            DType::F16 => TensorData::F16(bytes.as_chunks::<2>().0.iter().map(|c| f16::from_le_bytes(*c)).collect()),
            DType::F64 => TensorData::F64(conv!(f64, 8)),
            DType::I64 => TensorData::I64(conv!(i64, 8)),
            DType::I32 => TensorData::I32(conv!(i32, 4)),
            DType::I16 => TensorData::I16(conv!(i16, 2)),
            DType::U64 => TensorData::U64(conv!(u64, 8)),
            DType::U32 => TensorData::U32(conv!(u32, 4)),
            DType::U16 => TensorData::U16(conv!(u16, 2)),
            DType::I8 => TensorData::I8(bytes.iter().map(|&b| b as i8).collect()),
            DType::U8 => TensorData::U8(bytes.to_vec()),
            DType::Bool => {
                if let Some(b) = bytes.iter().find(|&&b| b > 1) {
                    return Err(crate::Error::InvalidTensor(format!("bool tensor holds byte {b}")));
                }
                TensorData::Bool(bytes.iter().map(|&b| b != 0).collect())
            }
        };
        Ok(Tensor { shape, data })
    }

    /// Little-endian bytes of the elements.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match &self.data {
            TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::U64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::U32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::U16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I8(v) => v.iter().map(|&x| x as u8).collect(),
            TensorData::U8(v) => v.clone(),
            TensorData::Bool(v) => v.iter().map(|&x| x as u8).collect(),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &TensorData {
        &self.data
    }

    pub fn into_data(self) -> TensorData {
        self.data
    }

    pub fn dtype(&self) -> DType {
        match &self.data {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::F64(_) => DType::F64,
            TensorData::I64(_) => DType::I64,
            TensorData::I32(_) => DType::I32,
            TensorData::I16(_) => DType::I16,
            TensorData::I8(_) => DType::I8,
            TensorData::U64(_) => DType::U64,
            TensorData::U32(_) => DType::U32,
            TensorData::U16(_) => DType::U16,
            TensorData::U8(_) => DType::U8,
            TensorData::Bool(_) => DType::Bool,
        }
    }

    pub fn len(&self) -> usize {
        each_data!(&self.data, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements widened to f32 (booleans as 0/1), whatever the dtype.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            TensorData::F32(v) => v.clone(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::I64(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::I32(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::I16(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::U64(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::U32(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::U16(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::I8(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::U8(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::Bool(v) => v.iter().map(|&x| x as u8 as f32).collect(),
        }
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Same data, new shape (element count must match).
    pub fn reshape(self, shape: Vec<usize>) -> crate::Result<Tensor> {
        Tensor::new(shape, self.data)
    }

    /// Casts to another element type (float→int truncates toward zero, as numpy's `astype`).
    pub fn cast(&self, to: DType) -> Tensor {
        if to == self.dtype() {
            return self.clone();
        }
        let f: Vec<f64> = match &self.data {
            TensorData::F64(v) => v.clone(),
            TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::I32(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::U64(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::U32(v) => v.iter().map(|&x| x as f64).collect(),
            _ => self.to_f32_vec().into_iter().map(f64::from).collect(),
        };
        let data = match to {
            DType::F32 => TensorData::F32(f.iter().map(|&x| x as f32).collect()),
            DType::F16 => TensorData::F16(f.iter().map(|&x| f16::from_f64(x)).collect()),
            DType::F64 => TensorData::F64(f),
            DType::I64 => TensorData::I64(f.iter().map(|&x| x as i64).collect()),
            DType::I32 => TensorData::I32(f.iter().map(|&x| x as i32).collect()),
            DType::I16 => TensorData::I16(f.iter().map(|&x| x as i16).collect()),
            DType::U64 => TensorData::U64(f.iter().map(|&x| x as u64).collect()),
            DType::U32 => TensorData::U32(f.iter().map(|&x| x as u32).collect()),
            DType::U16 => TensorData::U16(f.iter().map(|&x| x as u16).collect()),
            DType::I8 => TensorData::I8(f.iter().map(|&x| x as i8).collect()),
            DType::U8 => TensorData::U8(f.iter().map(|&x| x as u8).collect()),
            DType::Bool => TensorData::Bool(f.iter().map(|&x| x != 0.0).collect()),
        };
        Tensor { shape: self.shape.clone(), data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_every_dtype() {
        let t = Tensor::from_f32(vec![2, 2], vec![1.0, -2.5, 3.0, 0.0]).unwrap();
        for dt in DType::ALL {
            let c = t.cast(dt);
            let back = Tensor::from_le_bytes(dt, vec![2, 2], &c.to_le_bytes()).unwrap();
            assert_eq!(back, c, "{dt}");
            assert_eq!(back.dtype(), dt);
        }
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        assert!(Tensor::from_f32(vec![3], vec![1.0]).is_err());
        assert!(Tensor::from_le_bytes(DType::F32, vec![2], &[0u8; 7]).is_err());
        assert!(Tensor::from_le_bytes(DType::F32, vec![usize::MAX, 2], &[]).is_err());
        assert!(Tensor::from_le_bytes(DType::Bool, vec![1], &[7]).is_err());
    }
}
