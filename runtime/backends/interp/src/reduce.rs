//! Reductions along axes: Reduce*, ArgMax/ArgMin, CumSum, TopK, LogSoftmax, Hardmax.
use super::math::{f64s, is_float};
use super::*;

/// (outer, len, inner) of `shape` around axis `ax` (an error for a scalar, which has no axis to work along).
fn around(shape: &[usize], ax: usize) -> Res<(usize, usize, usize)> {
    if ax >= shape.len() {
        return Err(format!("axis {ax} of a rank-{} input", shape.len()));
    }
    Ok((shape[..ax].iter().product(), shape[ax], shape[ax + 1..].iter().product()))
}

/// The reduced axes of a Reduce* node: from input 1 (opset 18; ReduceSum 13) or the `axes` attribute; `None` means
/// "no reduction" (an empty list with `noop_with_empty_axes`).
fn reduce_axes(a: &Args, rank: usize) -> Res<Option<Vec<usize>>> {
    let from_input = a.opset >= 18 || (a.n.op() == "ReduceSum" && a.opset >= 13);
    let axes = if from_input {
        a.ins.get(1).copied().flatten().map(i64s).transpose()?.unwrap_or_default()
    } else {
        a.n.attr_ints("axes").unwrap_or_default().to_vec()
    };
    if axes.is_empty() {
        return Ok(if a.n.attr_i("noop_with_empty_axes").unwrap_or(0) != 0 { None } else { Some((0..rank).collect()) });
    }
    let mut v: Vec<usize> = axes.iter().map(|&x| axis(x, rank)).collect::<Res<_>>()?;
    v.sort_unstable();
    v.dedup();
    Ok(Some(v))
}

pub(crate) fn op_reduce(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let shape = x.shape().to_vec();
    let rank = shape.len();
    let Some(axes) = reduce_axes(a, rank)? else { return Ok(vec![x.clone()]) };
    let keep = a.n.attr_i("keepdims").unwrap_or(1) != 0;
    let kept: Vec<usize> = (0..rank).map(|d| if axes.contains(&d) { 1 } else { shape[d] }).collect();
    let n_out: usize = kept.iter().product();
    let op = a.n.op();
    // The op is decided once, not per element: the per-element match on the name made a reduce over a large input
    // (a fuzzed NLLLoss expansion) take tens of seconds.
    #[derive(Clone, Copy)]
    enum Fold {
        Max,
        Min,
        Prod,
        Abs,
        Square,
        Exp,
        Sum,
    }
    let (init, fold) = match op {
        "ReduceMax" => (f64::NEG_INFINITY, Fold::Max),
        "ReduceMin" => (f64::INFINITY, Fold::Min),
        "ReduceProd" => (1.0, Fold::Prod),
        "ReduceL1" => (0.0, Fold::Abs),
        "ReduceL2" | "ReduceSumSquare" => (0.0, Fold::Square),
        "ReduceLogSumExp" => (0.0, Fold::Exp),
        _ => (0.0, Fold::Sum),
    };
    let v = f64s(x);
    let mut acc = vec![init; n_out];
    // Each input axis's step in the output: zero along a reduced axis. The input is walked in order with an odometer,
    // so the output offset moves by one stride per element instead of being recomputed from the full index.
    let out_strides = dense_strides(&kept);
    let step: Vec<usize> = (0..rank).map(|d| if axes.contains(&d) { 0 } else { out_strides[d] as usize }).collect();
    let mut idx = vec![0usize; rank];
    let mut o = 0usize;
    let count = v.len().checked_div(n_out).unwrap_or(0);
    for &e in v.iter() {
        let s = &mut acc[o];
        *s = match fold {
            Fold::Max => s.max(e),
            Fold::Min => s.min(e),
            Fold::Prod => *s * e,
            Fold::Abs => *s + e.abs(),
            Fold::Square => *s + e * e,
            Fold::Exp => *s + e.exp(),
            Fold::Sum => *s + e,
        };
        for d in (0..rank).rev() {
            idx[d] += 1;
            o += step[d];
            if idx[d] < shape[d] {
                break;
            }
            o -= step[d] * shape[d];
            idx[d] = 0;
        }
    }
    match op {
        "ReduceMean" => acc.iter_mut().for_each(|s| *s /= count as f64),
        "ReduceL2" => acc.iter_mut().for_each(|s| *s = s.sqrt()),
        "ReduceLogSum" | "ReduceLogSumExp" => acc.iter_mut().for_each(|s| *s = s.ln()),
        _ => {}
    }
    let out: Vec<usize> = if keep { kept } else { (0..rank).filter(|d| !axes.contains(d)).map(|d| shape[d]).collect() };
    let y = tensor(out, TensorData::F64(acc))?;
    Ok(vec![if is_float(x.dtype()) { y.cast(x.dtype()) } else { y.cast(DType::I64).cast(x.dtype()) }])
}

pub(crate) fn op_arg(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let shape = x.shape().to_vec();
    let ax = axis(a.n.attr_i("axis").unwrap_or(0), shape.len())?;
    let keep = a.n.attr_i("keepdims").unwrap_or(1) != 0;
    let last = a.n.attr_i("select_last_index").unwrap_or(0) != 0;
    let max = a.n.op() == "ArgMax";
    let v = f64s(x);
    let (outer, len, inner) = around(&shape, ax)?;
    let mut y = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let mut best = 0;
            for k in 1..len {
                let (c, b) = (v[(o * len + k) * inner + i], v[(o * len + best) * inner + i]);
                let better = if max { c > b || (last && c == b) } else { c < b || (last && c == b) };
                if better {
                    best = k;
                }
            }
            y.push(best as i64);
        }
    }
    let mut out = shape.clone();
    if keep {
        out[ax] = 1;
    } else {
        out.remove(ax);
    }
    Ok(vec![tensor(out, TensorData::I64(y))?])
}

pub(crate) fn op_cumsum(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let shape = x.shape().to_vec();
    let ax = axis(i64s(input(a.ins, 1)?)?.first().copied().ok_or("no axis")?, shape.len())?;
    let (excl, rev) = (a.n.attr_i("exclusive").unwrap_or(0) != 0, a.n.attr_i("reverse").unwrap_or(0) != 0);
    let v = f64s(x);
    let (outer, len, inner) = around(&shape, ax)?;
    let mut y = vec![0.0; v.len()];
    for o in 0..outer {
        for i in 0..inner {
            let mut s = 0.0;
            for step in 0..len {
                let k = if rev { len - 1 - step } else { step };
                let at = (o * len + k) * inner + i;
                if excl {
                    y[at] = s;
                    s += v[at];
                } else {
                    s += v[at];
                    y[at] = s;
                }
            }
        }
    }
    let t = tensor(shape, TensorData::F64(y))?;
    Ok(vec![if is_float(x.dtype()) { t.cast(x.dtype()) } else { t.cast(DType::I64).cast(x.dtype()) }])
}

pub(crate) fn op_topk(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let shape = x.shape().to_vec();
    let ax = axis(a.n.attr_i("axis").unwrap_or(-1), shape.len())?;
    let k = if a.opset < 10 { a.n.attr_i("k").unwrap_or(0) } else { *i64s(input(a.ins, 1)?)?.first().ok_or("no k")? };
    let largest = a.n.attr_i("largest").unwrap_or(1) != 0;
    let (outer, len, inner) = around(&shape, ax)?;
    let k = usize::try_from(k).ok().filter(|&k| k <= len).ok_or_else(|| format!("k {k} for a dim of {len}"))?;
    let v = f64s(x);
    let mut ids = vec![0i64; outer * k * inner];
    let mut vv = vec![0.0; outer * k * inner];
    for o in 0..outer {
        for i in 0..inner {
            let mut order: Vec<usize> = (0..len).collect();
            let at = |j: usize| v[(o * len + j) * inner + i];
            order.sort_by(|&p, &q| {
                let c = at(p).total_cmp(&at(q));
                (if largest { c.reverse() } else { c }).then(p.cmp(&q))
            });
            for (r, &j) in order[..k].iter().enumerate() {
                let dst = (o * k + r) * inner + i;
                ids[dst] = j as i64;
                vv[dst] = at(j);
            }
        }
    }
    let mut out = shape.clone();
    out[ax] = k;
    let values = tensor(out.clone(), TensorData::F64(vv))?;
    let values = if is_float(x.dtype()) { values.cast(x.dtype()) } else { values.cast(DType::I64).cast(x.dtype()) };
    Ok(vec![values, tensor(out, TensorData::I64(ids))?])
}

/// LogSoftmax and Hardmax (Softmax has its own f32 implementation).
pub(crate) fn op_softmax_like(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let shape = x.shape().to_vec();
    let rank = shape.len();
    let default = if a.opset < 13 { 1 } else { -1 };
    let ax = axis(a.n.attr_i("axis").unwrap_or(default), rank)?;
    let (outer, len, inner) = if a.opset < 13 {
        (shape[..ax].iter().product(), shape[ax..].iter().product(), 1)
    } else {
        around(&shape, ax)?
    };
    let v = f64s(x);
    let mut y = vec![0.0; v.len()];
    let hard = a.n.op() == "Hardmax";
    // An empty axis has nothing to normalise (and no cell for Hardmax's 1).
    let outer = if len == 0 { 0 } else { outer };
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| (o * len + k) * inner + i;
            let (mut m, mut arg) = (f64::NEG_INFINITY, 0);
            for k in 0..len {
                if v[at(k)] > m {
                    (m, arg) = (v[at(k)], k);
                }
            }
            if hard {
                y[at(arg)] = 1.0;
                continue;
            }
            let lse = (0..len).map(|k| (v[at(k)] - m).exp()).sum::<f64>().ln();
            for k in 0..len {
                y[at(k)] = v[at(k)] - m - lse;
            }
        }
    }
    Ok(vec![tensor(shape, TensorData::F64(y))?.cast(x.dtype())])
}
