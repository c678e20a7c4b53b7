//! Element-wise ops: unary math and activations, broadcasting binary arithmetic, comparisons, logic, `Where`.
//! Floats compute in f64 and round once to the output type; integers in i64.
use super::*;

pub(crate) fn is_float(dt: DType) -> bool {
    matches!(dt, DType::F32 | DType::F64 | DType::F16)
}

pub(crate) fn f64s(t: &Tensor) -> Vec<f64> {
    match t.cast(DType::F64).into_data() {
        TensorData::F64(v) => v,
        _ => unreachable!("cast to f64"),
    }
}

pub(crate) fn i64v(t: &Tensor) -> Vec<i64> {
    match t.cast(DType::I64).into_data() {
        TensorData::I64(v) => v,
        _ => unreachable!("cast to i64"),
    }
}

pub(crate) fn bools(t: &Tensor) -> Res<&[bool]> {
    match t.data() {
        TensorData::Bool(v) => Ok(v),
        _ => Err(format!("expected a bool tensor, got {}", t.dtype())),
    }
}

/// The broadcast of several shapes, and each input's element offset for every output element.
pub(crate) fn broadcast_many(shapes: &[&[usize]]) -> Res<(Vec<usize>, Vec<Vec<usize>>)> {
    let mut out: Vec<usize> = vec![];
    for s in shapes {
        out = broadcast(&out, s)?;
    }
    let idx = shapes
        .iter()
        .map(|s| {
            let strides = broadcast_strides(s, &out);
            let mut v = Vec::with_capacity(out.iter().product());
            for_each_offset(&out, 0, &strides, |o| v.push(o as usize));
            v
        })
        .collect();
    Ok((out, idx))
}

fn unary(a: &Args, f: impl Fn(f64) -> f64) -> Res<Vec<Tensor>> {
    Ok(vec![float_map(a.x()?, f)?])
}

fn attr(a: &Args, name: &str, default: f32) -> f64 {
    a.n.attr_f(name).unwrap_or(default) as f64
}

/// erf(x): the Maclaurin series for |x| < 0.5, else 1 − erfc(|x|) with Numerical Recipes' Chebyshev fit of erfc
/// (relative error under 1.2e-7).
pub(crate) fn erf(x: f64) -> f64 {
    if x.abs() < 0.5 {
        // Maclaurin series: fast convergence near 0.
        let (x2, mut term, mut sum) = (x * x, x, x);
        for n in 1..30 {
            term *= -x2 / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        return sum * 2.0 / std::f64::consts::PI.sqrt();
    }
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223
        + t * (1.00002368
            + t * (0.37409196
                + t * (0.09678418
                    + t * (-0.18628806
                        + t * (0.27886807
                            + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 { 1.0 - erfc } else { erfc - 1.0 }
}

pub(crate) fn op_log(a: &Args) -> Res<Vec<Tensor>> {
    unary(a, f64::ln)
}
pub(crate) fn op_reciprocal(a: &Args) -> Res<Vec<Tensor>> {
    unary(a, |v| 1.0 / v)
}
pub(crate) fn op_sin(a: &Args) -> Res<Vec<Tensor>> {
    unary(a, f64::sin)
}
pub(crate) fn op_cos(a: &Args) -> Res<Vec<Tensor>> {
    unary(a, f64::cos)
}
pub(crate) fn op_tan(a: &Args) -> Res<Vec<Tensor>> {
    unary(a, f64::tan)
}
pub(crate) fn op_asin(a: &Args) -> Res<Vec<Tensor>> {
    unary(a, f64::asin)
}
pub(crate) fn op_acos(a: &Args) -> Res<Vec<Tensor>> {
    unary(a, f64::acos)
}
pub(crate) fn op_atan(a: &Args) -> Res<Vec<Tensor>> {
    unary(a, f64::atan)
}
pub(crate) fn op_sinh(a: &Args) -> Res<Vec<Tensor>> {
    unary(a, f64::sinh)
}
pub(crate) fn op_cosh(a: &Args) -> Res<Vec<Tensor>> {
    unary(a, f64::cosh)
}
pub(crate) fn op_asinh(a: &Args) -> Res<Vec<Tensor>> {
    unary(a, f64::asinh)
}
pub(crate) fn op_acosh(a: &Args) -> Res<Vec<Tensor>> {
    unary(a, f64::acosh)
}
pub(crate) fn op_atanh(a: &Args) -> Res<Vec<Tensor>> {
    unary(a, f64::atanh)
}
pub(crate) fn op_erf(a: &Args) -> Res<Vec<Tensor>> {
    unary(a, erf)
}
pub(crate) fn op_softplus(a: &Args) -> Res<Vec<Tensor>> {
    unary(a, |v| if v > 30.0 { v } else { v.exp().ln_1p() })
}
pub(crate) fn op_softsign(a: &Args) -> Res<Vec<Tensor>> {
    unary(a, |v| v / (1.0 + v.abs()))
}
pub(crate) fn op_elu(a: &Args) -> Res<Vec<Tensor>> {
    let al = attr(a, "alpha", 1.0);
    unary(a, move |v| if v < 0.0 { al * (v.exp() - 1.0) } else { v })
}
pub(crate) fn op_celu(a: &Args) -> Res<Vec<Tensor>> {
    let al = attr(a, "alpha", 1.0);
    unary(a, move |v| v.max(0.0) + (al * ((v / al).exp() - 1.0)).min(0.0))
}
pub(crate) fn op_selu(a: &Args) -> Res<Vec<Tensor>> {
    let al = attr(a, "alpha", 1.673_263_2);
    let g = attr(a, "gamma", 1.050_701);
    unary(a, move |v| if v <= 0.0 { g * (al * v.exp() - al) } else { g * v })
}
pub(crate) fn op_leaky_relu(a: &Args) -> Res<Vec<Tensor>> {
    let al = attr(a, "alpha", 0.01);
    unary(a, move |v| if v < 0.0 { al * v } else { v })
}
pub(crate) fn op_thresholded_relu(a: &Args) -> Res<Vec<Tensor>> {
    let al = attr(a, "alpha", 1.0);
    unary(a, move |v| if v > al { v } else { 0.0 })
}
pub(crate) fn op_hard_sigmoid(a: &Args) -> Res<Vec<Tensor>> {
    let (al, be) = (attr(a, "alpha", 0.2), attr(a, "beta", 0.5));
    unary(a, move |v| (al * v + be).clamp(0.0, 1.0))
}
pub(crate) fn op_hard_swish(a: &Args) -> Res<Vec<Tensor>> {
    unary(a, |v| v * (v / 6.0 + 0.5).clamp(0.0, 1.0))
}
pub(crate) fn op_gelu(a: &Args) -> Res<Vec<Tensor>> {
    if a.n.attr_s("approximate") == Some("tanh") {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        unary(a, move |v| 0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh()))
    } else {
        unary(a, |v| 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2)))
    }
}
pub(crate) fn op_mish(a: &Args) -> Res<Vec<Tensor>> {
    unary(a, |v| v * (if v > 30.0 { v } else { v.exp().ln_1p() }).tanh())
}

/// Abs, Neg and Sign on any numeric type.
pub(crate) fn op_signed(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let op = a.n.op();
    if is_float(x.dtype()) {
        let f: fn(f64) -> f64 = match op {
            "Abs" => f64::abs,
            "Neg" => |v| -v,
            _ => |v: f64| if v == 0.0 || v.is_nan() { v } else { v.signum() },
        };
        return Ok(vec![float_map(x, f)?]);
    }
    let v: Vec<i64> = i64v(x)
        .into_iter()
        .map(|v| match op {
            "Abs" => v.wrapping_abs(),
            "Neg" => v.wrapping_neg(),
            _ => v.signum(),
        })
        .collect();
    Ok(vec![tensor(x.shape().to_vec(), TensorData::I64(v))?.cast(x.dtype())])
}

pub(crate) fn op_isnan(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    Ok(vec![tensor(x.shape().to_vec(), TensorData::Bool(f64s(x).iter().map(|v| v.is_nan()).collect()))?])
}

pub(crate) fn op_isinf(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let (neg, pos) = (a.n.attr_i("detect_negative").unwrap_or(1) != 0, a.n.attr_i("detect_positive").unwrap_or(1) != 0);
    let v = f64s(x).iter().map(|v| v.is_infinite() && ((*v > 0.0 && pos) || (*v < 0.0 && neg))).collect();
    Ok(vec![tensor(x.shape().to_vec(), TensorData::Bool(v))?])
}

pub(crate) fn op_not(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    Ok(vec![tensor(x.shape().to_vec(), TensorData::Bool(bools(x)?.iter().map(|b| !b).collect()))?])
}

/// And, Or, Xor on bools (broadcasting).
pub(crate) fn op_logic(a: &Args) -> Res<Vec<Tensor>> {
    let (x, y) = (a.x()?, input(a.ins, 1)?);
    let (p, q) = (bools(x)?, bools(y)?);
    let (out, idx) = broadcast_many(&[x.shape(), y.shape()])?;
    let f: fn(bool, bool) -> bool = match a.n.op() {
        "And" => |p, q| p && q,
        "Or" => |p, q| p || q,
        _ => |p, q| p ^ q,
    };
    let v = idx[0].iter().zip(&idx[1]).map(|(&i, &j)| f(p[i], q[j])).collect();
    Ok(vec![tensor(out, TensorData::Bool(v))?])
}

/// `op` over broadcast index pairs of `p` and `q`.
fn compare<T: PartialOrd>(op: &str, p: &[T], q: &[T], ia: &[usize], ib: &[usize]) -> Vec<bool> {
    let f: fn(&T, &T) -> bool = match op {
        "Equal" => |p, q| p == q,
        "Less" => |p, q| p < q,
        "LessOrEqual" => |p, q| p <= q,
        "Greater" => |p, q| p > q,
        _ => |p, q| p >= q,
    };
    ia.iter().zip(ib).map(|(&i, &j)| f(&p[i], &q[j])).collect()
}

/// Equal, Less, LessOrEqual, Greater, GreaterOrEqual (broadcasting) → bool.
pub(crate) fn op_compare(a: &Args) -> Res<Vec<Tensor>> {
    let (x, y) = (a.x()?, input(a.ins, 1)?);
    let (out, idx) = broadcast_many(&[x.shape(), y.shape()])?;
    let op = a.n.op();
    let v: Vec<bool> = if x.dtype() == DType::Bool && y.dtype() == DType::Bool {
        compare(op, bools(x)?, bools(y)?, &idx[0], &idx[1])
    } else if is_float(x.dtype()) || is_float(y.dtype()) {
        compare(op, &f64s(x), &f64s(y), &idx[0], &idx[1])
    } else {
        compare(op, &i64v(x), &i64v(y), &idx[0], &idx[1])
    };
    Ok(vec![tensor(out, TensorData::Bool(v))?])
}

pub(crate) fn op_where(a: &Args) -> Res<Vec<Tensor>> {
    let (c, x, y) = (a.x()?, input(a.ins, 1)?, input(a.ins, 2)?);
    if x.dtype() != y.dtype() {
        return Err(format!("Where of {} and {}", x.dtype(), y.dtype()));
    }
    let cond = bools(c)?;
    let (out, idx) = broadcast_many(&[c.shape(), x.shape(), y.shape()])?;
    let es = x.dtype().size();
    let (xb, yb) = (x.to_le_bytes(), y.to_le_bytes());
    let mut dst = Vec::with_capacity(idx[0].len() * es);
    for k in 0..idx[0].len() {
        let (src, i) = if cond[idx[0][k]] { (&xb, idx[1][k]) } else { (&yb, idx[2][k]) };
        dst.extend_from_slice(&src[i * es..(i + 1) * es]);
    }
    Ok(vec![Tensor::from_le_bytes(x.dtype(), out, &dst).map_err(|e| e.to_string())?])
}

pub(crate) fn op_prelu(a: &Args) -> Res<Vec<Tensor>> {
    let (x, s) = (a.x()?, input(a.ins, 1)?);
    let (out, idx) = broadcast_many(&[x.shape(), s.shape()])?;
    if is_float(x.dtype()) {
        let (p, q) = (f64s(x), f64s(s));
        let v = idx[0].iter().zip(&idx[1]).map(|(&i, &j)| if p[i] < 0.0 { p[i] * q[j] } else { p[i] }).collect();
        return Ok(vec![tensor(out, TensorData::F64(v))?.cast(x.dtype())]);
    }
    let (p, q) = (i64v(x), i64v(s));
    let v = idx[0].iter().zip(&idx[1]).map(|(&i, &j)| if p[i] < 0 { p[i].wrapping_mul(q[j]) } else { p[i] }).collect();
    Ok(vec![tensor(out, TensorData::I64(v))?.cast(x.dtype())])
}

pub(crate) fn op_pow(a: &Args) -> Res<Vec<Tensor>> {
    let (x, y) = (a.x()?, input(a.ins, 1)?);
    let (out, idx) = broadcast_many(&[x.shape(), y.shape()])?;
    if is_float(x.dtype()) {
        let (p, q) = (f64s(x), f64s(y));
        let v = idx[0].iter().zip(&idx[1]).map(|(&i, &j)| p[i].powf(q[j])).collect();
        return Ok(vec![tensor(out, TensorData::F64(v))?.cast(x.dtype())]);
    }
    let (p, q) = (i64v(x), f64s(y));
    let v = idx[0].iter().zip(&idx[1]).map(|(&i, &j)| (p[i] as f64).powf(q[j]) as i64).collect();
    Ok(vec![tensor(out, TensorData::I64(v))?.cast(x.dtype())])
}

pub(crate) fn op_mod(a: &Args) -> Res<Vec<Tensor>> {
    let (x, y) = (a.x()?, input(a.ins, 1)?);
    let (out, idx) = broadcast_many(&[x.shape(), y.shape()])?;
    let fmod = a.n.attr_i("fmod").unwrap_or(0) != 0;
    if is_float(x.dtype()) {
        let (p, q) = (f64s(x), f64s(y));
        let v = idx[0]
            .iter()
            .zip(&idx[1])
            .map(|(&i, &j)| {
                let r = p[i] % q[j];
                if fmod || r == 0.0 || (r < 0.0) == (q[j] < 0.0) { r } else { r + q[j] }
            })
            .collect();
        return Ok(vec![tensor(out, TensorData::F64(v))?.cast(x.dtype())]);
    }
    let (p, q) = (i64v(x), i64v(y));
    let mut v = Vec::with_capacity(idx[0].len());
    for (&i, &j) in idx[0].iter().zip(&idx[1]) {
        let r = p[i].checked_rem(q[j]).ok_or("integer modulo by zero or overflow")?;
        v.push(if fmod || r == 0 || (r < 0) == (q[j] < 0) { r } else { r + q[j] });
    }
    Ok(vec![tensor(out, TensorData::I64(v))?.cast(x.dtype())])
}

/// Sum and Mean of any number of broadcasting inputs.
pub(crate) fn op_sum_mean(a: &Args) -> Res<Vec<Tensor>> {
    let ts: Vec<&Tensor> = (0..a.ins.len()).map(|i| input(a.ins, i)).collect::<Res<_>>()?;
    let mut y = ts.first().copied().ok_or_else(|| format!("{} of no inputs", a.n.op()))?.clone();
    for t in &ts[1..] {
        y = binary("Add", &y, t)?;
    }
    if a.n.op() == "Mean" {
        let n = Tensor::from_f32(vec![], vec![ts.len() as f32]).map_err(|e| e.to_string())?.cast(y.dtype());
        y = binary("Div", &y, &n)?;
    }
    Ok(vec![y])
}
