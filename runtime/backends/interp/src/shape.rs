//! Shape and data-movement ops: Size, Expand, Tile, ConstantOfShape, Range, Split, Pad, DepthToSpace,
//! SpaceToDepth, GatherElements, GatherND, ScatterND, ScatterElements, CastLike, NonZero, OneHot, Trilu. Data moves
//! as bytes, so every element type works.
use super::math::{f64s, i64v};
use super::*;

fn bytes_tensor(dt: DType, shape: Vec<usize>, bytes: &[u8]) -> Res<Tensor> {
    Tensor::from_le_bytes(dt, shape, bytes).map_err(|e| e.to_string())
}

/// A shape given as an int64 tensor (non-negative sizes).
fn dims(t: &Tensor) -> Res<Vec<usize>> {
    i64s(t)?.into_iter().map(|d| usize::try_from(d).map_err(|_| format!("negative size {d}"))).collect()
}

fn norm_index(i: i64, len: usize) -> Res<usize> {
    let j = if i < 0 { i + len as i64 } else { i };
    (0..len as i64).contains(&j).then_some(j as usize).ok_or_else(|| format!("index {i} out of range {len}"))
}

pub(crate) fn op_size(a: &Args) -> Res<Vec<Tensor>> {
    Ok(vec![tensor(vec![], TensorData::I64(vec![a.x()?.len() as i64]))?])
}

pub(crate) fn op_expand(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let want = dims(input(a.ins, 1)?)?;
    let out = broadcast(x.shape(), &want)?;
    Ok(vec![strided(x, out.clone(), 0, &broadcast_strides(x.shape(), &out))?])
}

pub(crate) fn op_tile(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let reps = dims(input(a.ins, 1)?)?;
    if reps.len() != x.shape().len() {
        return Err(format!("{} repeats for rank {}", reps.len(), x.shape().len()));
    }
    let out: Vec<usize> = x.shape().iter().zip(&reps).map(|(d, r)| d.saturating_mul(*r)).collect();
    let es = x.dtype().size();
    let src = x.to_le_bytes();
    let total = super::checked_len(&out)?;
    let strides = dense_strides(x.shape());
    let mut idx = vec![0; out.len()];
    let mut dst = Vec::with_capacity(total * es);
    for k in 0..total {
        unravel(k, &out, &mut idx);
        let o: isize = idx.iter().zip(x.shape()).zip(&strides).map(|((i, d), s)| (i % d) as isize * s).sum();
        let o = o as usize * es;
        dst.extend_from_slice(&src[o..o + es]);
    }
    Ok(vec![bytes_tensor(x.dtype(), out, &dst)?])
}

pub(crate) fn op_constant_of_shape(a: &Args) -> Res<Vec<Tensor>> {
    let shape = dims(a.x()?)?;
    let value = match a.n.attr("value").and_then(|v| v.t.as_ref()) {
        Some(t) => tensor_from_proto(t).map_err(|e| e.to_string())?,
        None => Tensor::from_f32(vec![1], vec![0.0]).map_err(|e| e.to_string())?,
    };
    if value.len() != 1 {
        return Err(format!("ConstantOfShape value of {} elements (one expected)", value.len()));
    }
    let n = super::checked_len(&shape)?;
    let one = value.to_le_bytes();
    Ok(vec![bytes_tensor(value.dtype(), shape, &one.repeat(n))?])
}

pub(crate) fn op_range(a: &Args) -> Res<Vec<Tensor>> {
    let (s, l, d) = (a.x()?, input(a.ins, 1)?, input(a.ins, 2)?);
    let dt = s.dtype();
    let (start, limit, delta) = (first(&f64s(s), "start")?, first(&f64s(l), "limit")?, first(&f64s(d), "delta")?);
    if delta == 0.0 {
        return Err("Range with delta 0".into());
    }
    let n = ((limit - start) / delta).ceil().max(0.0);
    if n > super::MAX_ELEMENTS as f64 {
        return Err(format!("Range from {start} to {limit} by {delta}: {n} elements"));
    }
    let n = n as usize;
    if super::math::is_float(dt) {
        let v = (0..n).map(|i| start + i as f64 * delta).collect();
        return Ok(vec![tensor(vec![n], TensorData::F64(v))?.cast(dt)]);
    }
    let (st, de) = (first(&i64v(s), "start")?, first(&i64v(d), "delta")?);
    let v = (0..n as i64).map(|i| st.wrapping_add(i.wrapping_mul(de))).collect();
    Ok(vec![tensor(vec![n], TensorData::I64(v))?.cast(dt)])
}

pub(crate) fn op_split(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let rank = x.shape().len();
    let ax = axis(a.n.attr_i("axis").unwrap_or(0), rank)?;
    let dim = x.shape()[ax];
    let parts = a.n.output.len();
    let sizes: Vec<usize> = match a.ins.get(1).copied().flatten() {
        Some(t) => dims(t)?,
        None => match a.n.attr_ints("split") {
            Some(s) => s.iter().map(|&d| d.max(0) as usize).collect(),
            None => {
                let n = match a.n.attr_i("num_outputs") {
                    Some(n) if usize::try_from(n).is_ok_and(|n| n == parts && n > 0) => parts,
                    Some(n) => return Err(format!("Split: num_outputs {n} for {parts} outputs")),
                    None => parts.max(1),
                };
                let chunk = dim.div_ceil(n);
                (0..n).map(|i| chunk.min(dim.saturating_sub(i * chunk))).collect()
            }
        },
    };
    if sizes.iter().try_fold(0usize, |t, &s| t.checked_add(s)) != Some(dim) || sizes.len() != parts {
        return Err(format!("split {sizes:?} of a dim of {dim} into {parts} outputs"));
    }
    let dense = dense_strides(x.shape());
    let mut at = 0;
    sizes
        .iter()
        .map(|&s| {
            let mut out = x.shape().to_vec();
            out[ax] = s;
            let t = strided(x, out, at as isize * dense[ax], &dense);
            at += s;
            t
        })
        .collect()
}

pub(crate) fn op_pad(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let rank = x.shape().len();
    let pads: Vec<i64> =
        if a.opset < 11 { a.n.attr_ints("pads").unwrap_or_default().to_vec() } else { i64s(input(a.ins, 1)?)? };
    let axes: Vec<usize> = match a.ins.get(3).copied().flatten() {
        Some(t) => i64s(t)?.iter().map(|&v| axis(v, rank)).collect::<Res<_>>()?,
        None => (0..rank).collect(),
    };
    if pads.len() != 2 * axes.len() {
        return Err(format!("{} pads for {} axes", pads.len(), axes.len()));
    }
    let mut before = vec![0i64; rank];
    let mut after = vec![0i64; rank];
    for (k, &ax) in axes.iter().enumerate() {
        before[ax] = pads[k];
        after[ax] = pads[k + axes.len()];
    }
    let mode = a.n.attr_s("mode").unwrap_or("constant");
    let fill: Vec<u8> = match a.ins.get(2).copied().flatten() {
        Some(v) if a.opset >= 11 => v.cast(x.dtype()).to_le_bytes(),
        _ => Tensor::from_f32(vec![], vec![a.n.attr_f("value").unwrap_or(0.0)])
            .map_err(|e| e.to_string())?
            .cast(x.dtype())
            .to_le_bytes(),
    };
    let shape = x.shape();
    let out: Vec<usize> = (0..rank)
        .map(|d| {
            (shape[d] as i64)
                .checked_add(before[d])
                .and_then(|v| v.checked_add(after[d]))
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| format!("pads {pads:?} of {shape:?}"))
        })
        .collect::<Res<_>>()?;
    let es = x.dtype().size();
    if fill.len() < es {
        return Err("Pad: an empty constant_value".into());
    }
    let src = x.to_le_bytes();
    let strides = dense_strides(shape);
    let total = checked_len(&out)?;
    let mut idx = vec![0; rank];
    let mut dst = Vec::with_capacity(total * es);
    for k in 0..total {
        unravel(k, &out, &mut idx);
        let mut off = 0isize;
        let mut inside = true;
        for d in 0..rank {
            let n = shape[d] as i64;
            let mut i = (idx[d] as i64).saturating_sub(before[d]);
            if n == 0 {
                inside = false;
                break;
            }
            if !(0..n).contains(&i) {
                match mode {
                    "reflect" if n > 1 => {
                        let p = 2 * (n - 1);
                        i = i.rem_euclid(p);
                        if i >= n {
                            i = p - i;
                        }
                    }
                    "edge" | "reflect" => i = i.clamp(0, n - 1),
                    "wrap" => i = i.rem_euclid(n),
                    _ => inside = false,
                }
            }
            if !inside {
                break;
            }
            off += i as isize * strides[d];
        }
        if inside {
            let o = off as usize * es;
            dst.extend_from_slice(&src[o..o + es]);
        } else {
            dst.extend_from_slice(&fill[..es]);
        }
    }
    Ok(vec![bytes_tensor(x.dtype(), out, &dst)?])
}

/// DepthToSpace (DCR or CRD) and SpaceToDepth on NCHW.
pub(crate) fn op_depth_space(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let [n, c, h, w] = image_dims(x)?;
    let b = a.n.attr_i("blocksize").unwrap_or(0).max(0) as usize;
    if b == 0 {
        return Err("blocksize must be positive".into());
    }
    let s = |v: &[usize]| dense_strides(v);
    let bb = b.checked_mul(b).filter(|&bb| bb <= MAX_ELEMENTS).ok_or_else(|| format!("blocksize {b}"))?;
    if a.n.op() == "DepthToSpace" {
        if c % bb != 0 {
            return Err(format!("{c} channels do not divide into blocks of {b}x{b}"));
        }
        let co = c / bb;
        // View the input as 6-D and permute, as the ONNX reference does.
        let (view, perm): (Vec<usize>, [usize; 6]) = if a.n.attr_s("mode") == Some("CRD") {
            (vec![n, co, b, b, h, w], [0, 1, 4, 2, 5, 3])
        } else {
            (vec![n, b, b, co, h, w], [0, 3, 4, 1, 5, 2])
        };
        let st = s(&view);
        let y = strided(x, perm.iter().map(|&p| view[p]).collect(), 0, &perm.map(|p| st[p]))?;
        return Ok(vec![y.reshape(vec![n, co, h * b, w * b]).map_err(|e| e.to_string())?]);
    }
    if h % b != 0 || w % b != 0 {
        return Err(format!("{h}x{w} does not divide into blocks of {b}"));
    }
    let view = vec![n, c, h / b, b, w / b, b];
    let st = s(&view);
    let perm = [0, 3, 5, 1, 2, 4];
    let y = strided(x, perm.iter().map(|&p| view[p]).collect(), 0, &perm.map(|p| st[p]))?;
    let co = c.checked_mul(bb).ok_or_else(|| format!("{c} channels in blocks of {b}x{b}"))?;
    Ok(vec![y.reshape(vec![n, co, h / b, w / b]).map_err(|e| e.to_string())?])
}

/// GatherElements/ScatterElements indices: the data's rank, and no longer than the data along the other axes.
fn check_element_indices(op: &str, data: &[usize], ind: &[usize], ax: usize) -> Res<()> {
    if ind.len() != data.len() || ind.iter().zip(data).enumerate().any(|(d, (&i, &x))| d != ax && i > x) {
        return Err(format!("{op}: indices {ind:?} do not fit data {data:?} along axis {ax}"));
    }
    Ok(())
}

pub(crate) fn op_gather_elements(a: &Args) -> Res<Vec<Tensor>> {
    let (x, ind) = (a.x()?, input(a.ins, 1)?);
    let rank = x.shape().len();
    let ax = axis(a.n.attr_i("axis").unwrap_or(0), rank)?;
    check_element_indices("GatherElements", x.shape(), ind.shape(), ax)?;
    let ids = i64s(ind)?;
    let es = x.dtype().size();
    let src = x.to_le_bytes();
    let strides = dense_strides(x.shape());
    let mut idx = vec![0; rank];
    let mut dst = Vec::with_capacity(ids.len() * es);
    for (k, &i) in ids.iter().enumerate() {
        unravel(k, ind.shape(), &mut idx);
        idx[ax] = norm_index(i, x.shape()[ax])?;
        let o = idx.iter().zip(&strides).map(|(i, s)| *i as isize * s).sum::<isize>() as usize * es;
        dst.extend_from_slice(&src[o..o + es]);
    }
    Ok(vec![bytes_tensor(x.dtype(), ind.shape().to_vec(), &dst)?])
}

pub(crate) fn op_scatter_elements(a: &Args) -> Res<Vec<Tensor>> {
    let (x, ind, upd) = (a.x()?, input(a.ins, 1)?, input(a.ins, 2)?);
    let rank = x.shape().len();
    let ax = axis(a.n.attr_i("axis").unwrap_or(0), rank)?;
    check_element_indices("ScatterElements", x.shape(), ind.shape(), ax)?;
    if upd.shape() != ind.shape() {
        return Err(format!("ScatterElements: updates {:?} and indices {:?} differ", upd.shape(), ind.shape()));
    }
    let ids = i64s(ind)?;
    let reduction = a.n.attr_s("reduction").unwrap_or("none");
    let strides = dense_strides(x.shape());
    let mut out = f64s(x);
    let u = f64s(&upd.cast(x.dtype()));
    let mut idx = vec![0; rank];
    for (k, &i) in ids.iter().enumerate() {
        unravel(k, ind.shape(), &mut idx);
        idx[ax] = norm_index(i, x.shape()[ax])?;
        let o = idx.iter().zip(&strides).map(|(i, s)| *i as isize * s).sum::<isize>() as usize;
        out[o] = reduce_into(reduction, out[o], u[k]);
    }
    Ok(vec![tensor(x.shape().to_vec(), TensorData::F64(out))?.cast(x.dtype())])
}

fn reduce_into(reduction: &str, old: f64, new: f64) -> f64 {
    match reduction {
        "add" => old + new,
        "mul" => old * new,
        "max" => old.max(new),
        "min" => old.min(new),
        _ => new,
    }
}

pub(crate) fn op_gather_nd(a: &Args) -> Res<Vec<Tensor>> {
    let (x, ind) = (a.x()?, input(a.ins, 1)?);
    let bd = a.n.attr_i("batch_dims").unwrap_or(0).max(0) as usize;
    let ids = i64s(ind)?;
    let is = ind.shape();
    let m = *is.last().ok_or("indices of rank 0")?;
    let xs = x.shape();
    if bd >= is.len() || bd + m > xs.len() || xs[..bd] != is[..bd] {
        return Err(format!("GatherND: indices {is:?} into data {xs:?} with {bd} batch dims"));
    }
    let batch: usize = xs[..bd].iter().product();
    let tuples: usize = is[bd..is.len() - 1].iter().product();
    let slice: usize = xs[bd + m..].iter().product();
    let per_batch: usize = xs[bd..].iter().product();
    let es = x.dtype().size();
    let src = x.to_le_bytes();
    let strides = dense_strides(&xs[bd..]);
    let out: Vec<usize> = is[..is.len() - 1].iter().chain(&xs[bd + m..]).copied().collect();
    let mut dst = Vec::with_capacity(out_len(&out, &[x, ind])? * es);
    for b in 0..batch {
        for t in 0..tuples {
            let tup = &ids[(b * tuples + t) * m..(b * tuples + t + 1) * m];
            let mut off = b * per_batch;
            for (d, &i) in tup.iter().enumerate() {
                off += norm_index(i, xs[bd + d])? * strides[d] as usize;
            }
            dst.extend_from_slice(&src[off * es..(off + slice) * es]);
        }
    }
    Ok(vec![bytes_tensor(x.dtype(), out, &dst)?])
}

pub(crate) fn op_scatter_nd(a: &Args) -> Res<Vec<Tensor>> {
    let (x, ind, upd) = (a.x()?, input(a.ins, 1)?, input(a.ins, 2)?);
    let ids = i64s(ind)?;
    let is = ind.shape();
    let m = *is.last().ok_or("indices of rank 0")?;
    let xs = x.shape();
    if m > xs.len() {
        return Err(format!("ScatterND: index tuples of {m} into data of rank {}", xs.len()));
    }
    // updates: indices.shape[:-1] + data.shape[m:].
    let want: Vec<usize> = is[..is.len() - 1].iter().chain(&xs[m..]).copied().collect();
    if upd.shape() != want.as_slice() {
        return Err(format!("ScatterND: updates {:?}, expected {want:?}", upd.shape()));
    }
    let slice: usize = xs[m..].iter().product();
    let strides = dense_strides(xs);
    let reduction = a.n.attr_s("reduction").unwrap_or("none");
    let mut out = f64s(x);
    let u = f64s(&upd.cast(x.dtype()));
    for (t, tup) in ids.chunks(m.max(1)).enumerate() {
        let mut off = 0;
        for (d, &i) in tup.iter().enumerate() {
            off += norm_index(i, xs[d])? * strides[d] as usize;
        }
        for k in 0..slice {
            out[off + k] = reduce_into(reduction, out[off + k], u[t * slice + k]);
        }
    }
    Ok(vec![tensor(xs.to_vec(), TensorData::F64(out))?.cast(x.dtype())])
}

pub(crate) fn op_cast_like(a: &Args) -> Res<Vec<Tensor>> {
    Ok(vec![a.x()?.cast(input(a.ins, 1)?.dtype())])
}

pub(crate) fn op_nonzero(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let v = f64s(x);
    let rank = x.shape().len();
    let hits: Vec<usize> = (0..v.len()).filter(|&k| v[k] != 0.0).collect();
    let mut out = vec![0i64; rank * hits.len()];
    let mut idx = vec![0; rank];
    for (j, &k) in hits.iter().enumerate() {
        unravel(k, x.shape(), &mut idx);
        for d in 0..rank {
            out[d * hits.len() + j] = idx[d] as i64;
        }
    }
    Ok(vec![tensor(vec![rank, hits.len()], TensorData::I64(out))?])
}

pub(crate) fn op_one_hot(a: &Args) -> Res<Vec<Tensor>> {
    let (ind, depth, values) = (a.x()?, input(a.ins, 1)?, input(a.ins, 2)?);
    let d = first(&f64s(depth), "depth")? as i64;
    let vals = f64s(values);
    if vals.len() != 2 {
        return Err(format!("OneHot values of {} elements (two expected)", vals.len()));
    }
    if d <= 0 {
        return Err(format!("depth {d}"));
    }
    let rank = ind.shape().len() + 1;
    let ax = axis(a.n.attr_i("axis").unwrap_or(-1), rank)?;
    let ids = f64s(ind);
    let mut out = ind.shape().to_vec();
    out.insert(ax, usize::try_from(d).map_err(|_| format!("depth {d}"))?);
    let outer: usize = ind.shape()[..ax].iter().product();
    let inner: usize = ind.shape()[ax..].iter().product();
    let mut y = vec![vals[0]; checked_len(&out)?];
    for o in 0..outer {
        for i in 0..inner {
            let mut k = ids[o * inner + i] as i64;
            if k < 0 {
                k += d;
            }
            if (0..d).contains(&k) {
                y[(o * d as usize + k as usize) * inner + i] = vals[1];
            }
        }
    }
    Ok(vec![tensor(out, TensorData::F64(y))?.cast(values.dtype())])
}

pub(crate) fn op_trilu(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let s = x.shape();
    if s.len() < 2 {
        return Err("Trilu needs rank 2 or more".into());
    }
    let k = match a.ins.get(1).copied().flatten() {
        Some(t) => first(&i64s(t)?, "k")?,
        None => 0,
    };
    let upper = a.n.attr_i("upper").unwrap_or(1) != 0;
    let (r, c) = (s[s.len() - 2], s[s.len() - 1]);
    let es = x.dtype().size();
    let mut bytes = x.to_le_bytes();
    for (e, chunk) in bytes.chunks_mut(es).enumerate() {
        let (i, j) = (((e / c) % r) as i64, (e % c) as i64);
        let keep = if upper { j - i >= k } else { j - i <= k };
        if !keep {
            chunk.fill(0);
        }
    }
    Ok(vec![bytes_tensor(x.dtype(), s.to_vec(), &bytes)?])
}
