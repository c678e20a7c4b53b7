//! The KServe v2 / Open Inference Protocol JSON tensor codec, shared by the server (`edgepack serve` reads
//! requests and writes responses) and the mobile SDK's cloud client (writes requests, reads responses): `data`
//! arrays (flat or nested) parsed straight into exact scalars, checked conversion to runtime tensors, and back.
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde_json::{Value, json};

use crate::{DType, Tensor, TensorData};

/// One JSON scalar of a `data` array, kept exact (integers are not forced through f64).
#[derive(Debug, Clone, Copy)]
pub enum Scalar {
    F(f64),
    I(i64),
    U(u64),
    B(bool),
}

/// The `data` of a JSON tensor: nested arrays flattened in row-major order while parsing (no `Value` tree).
#[derive(Debug, Default)]
pub struct Flat(pub Vec<Scalar>);

impl<'de> Deserialize<'de> for Flat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Flat, D::Error> {
        struct V<'a>(&'a mut Vec<Scalar>);
        impl<'de> Visitor<'de> for V<'_> {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number, a boolean or an array of them")
            }
            fn visit_f64<E>(self, v: f64) -> Result<(), E> {
                self.0.push(Scalar::F(v));
                Ok(())
            }
            fn visit_i64<E>(self, v: i64) -> Result<(), E> {
                self.0.push(Scalar::I(v));
                Ok(())
            }
            fn visit_u64<E>(self, v: u64) -> Result<(), E> {
                self.0.push(Scalar::U(v));
                Ok(())
            }
            fn visit_bool<E>(self, v: bool) -> Result<(), E> {
                self.0.push(Scalar::B(v));
                Ok(())
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
                Err(E::custom("string data (BYTES tensors) is not supported"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
                if let Some(n) = seq.size_hint() {
                    self.0.reserve(n);
                }
                while seq.next_element_seed(Seed(&mut *self.0))?.is_some() {}
                Ok(())
            }
        }
        struct Seed<'a>(&'a mut Vec<Scalar>);
        impl<'de> de::DeserializeSeed<'de> for Seed<'_> {
            type Value = ();
            fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                d.deserialize_any(V(self.0))
            }
        }
        let mut out = Vec::new();
        d.deserialize_any(V(&mut out))?;
        Ok(Flat(out))
    }
}

/// A tensor of `dt` from the scalars of a JSON `data` array: integers must be exact and in range, booleans
/// booleans (or 0/1). The error says what was wrong ("a non-integer in INT64 data").
pub fn tensor_from_scalars(dt: DType, shape: Vec<usize>, v: &[Scalar]) -> Result<Tensor, String> {
    let bad = |what: &str| format!("{what} in {} data", dt.kserve_name());
    let f = |s: &Scalar| -> Result<f64, String> {
        Ok(match *s {
            Scalar::F(x) => x,
            Scalar::I(x) => x as f64,
            Scalar::U(x) => x as f64,
            Scalar::B(_) => return Err(bad("a boolean")),
        })
    };
    let int = |s: &Scalar, lo: i128, hi: i128| -> Result<i128, String> {
        let x = match *s {
            Scalar::I(x) => x as i128,
            Scalar::U(x) => x as i128,
            Scalar::F(x) if x.fract() == 0.0 && x.abs() < 1e38 => x as i128,
            Scalar::F(_) => return Err(bad("a non-integer")),
            Scalar::B(b) => b as i128,
        };
        if x < lo || x > hi {
            return Err(bad(&format!("{x} out of range")));
        }
        Ok(x)
    };
    macro_rules! ints {
        ($t:ty, $var:ident) => {
            TensorData::$var(
                v.iter()
                    .map(|s| int(s, <$t>::MIN as i128, <$t>::MAX as i128).map(|x| x as $t))
                    .collect::<Result<_, _>>()?,
            )
        };
    }
    let data = match dt {
        DType::F32 => TensorData::F32(v.iter().map(|s| f(s).map(|x| x as f32)).collect::<Result<_, _>>()?),
        DType::F64 => TensorData::F64(v.iter().map(f).collect::<Result<_, _>>()?),
        DType::F16 => TensorData::F16(v.iter().map(|s| f(s).map(half::f16::from_f64)).collect::<Result<_, _>>()?),
        DType::I64 => ints!(i64, I64),
        DType::I32 => ints!(i32, I32),
        DType::I16 => ints!(i16, I16),
        DType::I8 => ints!(i8, I8),
        DType::U64 => ints!(u64, U64),
        DType::U32 => ints!(u32, U32),
        DType::U16 => ints!(u16, U16),
        DType::U8 => ints!(u8, U8),
        DType::Bool => TensorData::Bool(
            v.iter()
                .map(|s| match *s {
                    Scalar::B(b) => Ok(b),
                    Scalar::I(x @ (0 | 1)) => Ok(x == 1),
                    Scalar::U(x @ (0 | 1)) => Ok(x == 1),
                    _ => Err(bad("a non-boolean")),
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    Tensor::new(shape, data).map_err(|e| e.to_string())
}

/// JSON `data` of a tensor (flat, row-major).
pub fn tensor_data_json(t: &Tensor) -> Value {
    match t.data() {
        TensorData::F32(v) => json!(v),
        TensorData::F16(v) => json!(v.iter().map(|x| x.to_f32()).collect::<Vec<_>>()),
        TensorData::F64(v) => json!(v),
        TensorData::I64(v) => json!(v),
        TensorData::I32(v) => json!(v),
        TensorData::I16(v) => json!(v),
        TensorData::I8(v) => json!(v),
        TensorData::U64(v) => json!(v),
        TensorData::U32(v) => json!(v),
        TensorData::U16(v) => json!(v),
        TensorData::U8(v) => json!(v),
        TensorData::Bool(v) => json!(v),
    }
}
