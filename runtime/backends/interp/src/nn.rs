//! Neural-network ops beyond the kernel nodes: MatMul/Gemm with broadcasting, normalisations, N-D convolution,
//! transposed convolution and pooling (direct loops for what the NHWC kernels do not take), Resize, Einsum, LRN.
use super::math::{f64s, is_float};
use super::*;

fn out_float(shape: Vec<usize>, v: Vec<f64>, like: DType) -> Res<Tensor> {
    Ok(tensor(shape, TensorData::F64(v))?.cast(if is_float(like) { like } else { DType::F32 }))
}

/// Batched matrix product with numpy broadcasting of the batch dims (1-D operands promoted and squeezed).
pub(crate) fn matmul(x: &Tensor, y: &Tensor) -> Res<Tensor> {
    if x.shape().is_empty() || y.shape().is_empty() {
        return Err(format!("MatMul of a scalar ({:?} and {:?})", x.shape(), y.shape()));
    }
    let (mut xs, mut ys) = (x.shape().to_vec(), y.shape().to_vec());
    let (x1, y1) = (xs.len() == 1, ys.len() == 1);
    if x1 {
        xs.insert(0, 1);
    }
    if y1 {
        ys.push(1);
    }
    let (m, k) = (xs[xs.len() - 2], xs[xs.len() - 1]);
    let (k2, n) = (ys[ys.len() - 2], ys[ys.len() - 1]);
    if k != k2 {
        return Err(format!("MatMul of {:?} and {:?}", x.shape(), y.shape()));
    }
    let batch = broadcast(&xs[..xs.len() - 2], &ys[..ys.len() - 2])?;
    let (sx, sy) = (broadcast_strides(&xs[..xs.len() - 2], &batch), broadcast_strides(&ys[..ys.len() - 2], &batch));
    let (mut bx, mut by) = (vec![], vec![]);
    for_each_offset(&batch, 0, &sx, |o| bx.push(o as usize));
    for_each_offset(&batch, 0, &sy, |o| by.push(o as usize));
    let mut shape = batch;
    if !x1 {
        shape.push(m);
    }
    if !y1 {
        shape.push(n);
    }
    let total = out_len(&shape, &[x, y])?;
    if let (TensorData::F32(a), TensorData::F32(b)) = (x.data(), y.data()) {
        // f32 × f32: accumulate in f32 (as onnxruntime's MLAS does), row by row so the inner loop vectorises.
        let mut out = vec![0f32; total];
        for (t, (&i, &j)) in bx.iter().zip(&by).enumerate() {
            let (pa, pb) = (&a[i * m * k..(i + 1) * m * k], &b[j * k * n..(j + 1) * k * n]);
            let po = &mut out[t * m * n..(t + 1) * m * n];
            for r in 0..m {
                let orow = &mut po[r * n..(r + 1) * n];
                for kk in 0..k {
                    let av = pa[r * k + kk];
                    for (o, &bv) in orow.iter_mut().zip(&pb[kk * n..(kk + 1) * n]) {
                        *o += av * bv;
                    }
                }
            }
        }
        return tensor(shape, TensorData::F32(out));
    }
    let float = is_float(x.dtype());
    let (a, b) = (f64s(x), f64s(y));
    let mut out = vec![0.0; total];
    for (t, (&i, &j)) in bx.iter().zip(&by).enumerate() {
        let (pa, pb) = (&a[i * m * k..(i + 1) * m * k], &b[j * k * n..(j + 1) * k * n]);
        let po = &mut out[t * m * n..(t + 1) * m * n];
        for r in 0..m {
            for kk in 0..k {
                let av = pa[r * k + kk];
                if av == 0.0 {
                    continue;
                }
                let row = &pb[kk * n..(kk + 1) * n];
                for (o, &bv) in po[r * n..(r + 1) * n].iter_mut().zip(row) {
                    *o += av * bv;
                }
            }
        }
    }
    let t = tensor(shape, TensorData::F64(out))?;
    Ok(if float { t.cast(x.dtype()) } else { t.cast(DType::I64).cast(x.dtype()) })
}

pub(crate) fn op_matmul(a: &Args) -> Res<Vec<Tensor>> {
    Ok(vec![matmul(a.x()?, input(a.ins, 1)?)?])
}

/// MatMulInteger: (A − a_zero) · (B − b_zero) in int32.
/// `t − zero` in f64 (exact for integer operands): one zero point, or (`axis`) one per index along that axis.
fn minus_zero(t: &Tensor, zero: Option<&Tensor>, axis: Option<usize>) -> Res<Tensor> {
    let z = zero.map(super::math::i64v).unwrap_or_else(|| vec![0]);
    let shape = t.shape();
    let (len, inner) = match axis.filter(|_| z.len() > 1) {
        Some(ax) if ax < shape.len() => (shape[ax], shape[ax + 1..].iter().product::<usize>().max(1)),
        _ => (1, 1),
    };
    if z.len() != 1 && z.len() != len {
        return Err(format!("{} zero points for {shape:?}", z.len()));
    }
    let v =
        super::math::i64v(t).iter().enumerate().map(|(i, &e)| e.wrapping_sub(z[(i / inner) % len]) as f64).collect();
    tensor(shape.to_vec(), TensorData::F64(v))
}

/// MatMulInteger: (A − a_zero) · (B − b_zero) in int32 (zero points per row of A, per column of B).
pub(crate) fn op_matmul_integer(a: &Args) -> Res<Vec<Tensor>> {
    let (x, y) = (a.x()?, input(a.ins, 1)?);
    let x = minus_zero(x, a.ins.get(2).copied().flatten(), Some(x.shape().len().saturating_sub(2)))?;
    let y = minus_zero(y, a.ins.get(3).copied().flatten(), Some(y.shape().len().saturating_sub(1)))?;
    Ok(vec![matmul(&x, &y)?.cast(DType::I32)])
}

pub(crate) fn op_gemm(a: &Args) -> Res<Vec<Tensor>> {
    let (x, w) = (a.x()?, input(a.ins, 1)?);
    let t = |v: &Tensor, on: bool| -> Res<Tensor> {
        let s = v.shape();
        if s.len() != 2 {
            return Err(format!("Gemm of a rank-{} operand", s.len()));
        }
        if !on {
            return Ok(v.clone());
        }
        strided(v, vec![s[1], s[0]], 0, &[1, s[1] as isize])
    };
    let xa = t(x, a.n.attr_i("transA").unwrap_or(0) != 0)?;
    let wb = t(w, a.n.attr_i("transB").unwrap_or(0) != 0)?;
    let (alpha, beta) = (a.n.attr_f("alpha").unwrap_or(1.0) as f64, a.n.attr_f("beta").unwrap_or(1.0) as f64);
    let y = matmul(&xa, &wb)?;
    let mut v = f64s(&y);
    v.iter_mut().for_each(|e| *e *= alpha);
    if let Some(c) = a.ins.get(2).copied().flatten() {
        let (out, idx) = super::math::broadcast_many(&[y.shape(), c.shape()])?;
        if out != y.shape() {
            return Err(format!("C {:?} does not broadcast to {:?}", c.shape(), y.shape()));
        }
        let cv = f64s(c);
        for (k, &j) in idx[1].iter().enumerate() {
            v[k] += beta * cv[j];
        }
    }
    let r = tensor(y.shape().to_vec(), TensorData::F64(v))?;
    Ok(vec![if is_float(x.dtype()) { r.cast(x.dtype()) } else { r.cast(DType::I64).cast(x.dtype()) }])
}

/// Per-channel statistics normalisation: y = scale·(x − mean)/sqrt(var + ε) + bias along channel axis 1.
fn channel_affine(x: &Tensor, f: impl Fn(usize, f64) -> f64) -> Res<Tensor> {
    let s = x.shape();
    if s.len() < 2 {
        return Err(format!("expected N, C, ... got {s:?}"));
    }
    let (c, inner) = (s[1], s[2..].iter().product::<usize>());
    let v: Vec<f64> = f64s(x).iter().enumerate().map(|(i, &e)| f((i / inner.max(1)) % c, e)).collect();
    out_float(s.to_vec(), v, x.dtype())
}

/// The per-channel parameters of a normalisation (inputs `from..to`): each must hold exactly C values, C being axis
/// 1 of `x` (which must exist).
fn channel_params(a: &Args, x: &Tensor, from: usize, to: usize) -> Res<Vec<Vec<f64>>> {
    let s = x.shape();
    if s.len() < 2 {
        return Err(format!("{}: expected an input of N, C, ... got {s:?}", a.n.op()));
    }
    (from..to)
        .map(|i| {
            let t = input(a.ins, i)?;
            if t.len() != s[1] {
                return Err(format!("{}: input {i} holds {} values for {} channels", a.n.op(), t.len(), s[1]));
            }
            Ok(f64s(t))
        })
        .collect()
}

pub(crate) fn op_batch_norm(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let p = channel_params(a, x, 1, 5)?;
    let eps = a.n.attr_f("epsilon").unwrap_or(1e-5) as f64;
    if a.n.attr_i("training_mode").unwrap_or(0) == 0 {
        let y = channel_affine(x, |c, e| (e - p[2][c]) / (p[3][c] + eps).sqrt() * p[0][c] + p[1][c])?;
        return Ok(vec![y]);
    }
    // Training mode: batch statistics normalise, and the running statistics move by `momentum`.
    let s = x.shape();
    let (c, inner) = (s[1], s[2..].iter().product::<usize>().max(1));
    let v = f64s(x);
    let n = (v.len() / c.max(1)) as f64;
    let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
    for (i, &e) in v.iter().enumerate() {
        mean[(i / inner) % c] += e / n;
    }
    for (i, &e) in v.iter().enumerate() {
        let ch = (i / inner) % c;
        var[ch] += (e - mean[ch]) * (e - mean[ch]) / n;
    }
    let y = channel_affine(x, |ch, e| (e - mean[ch]) / (var[ch] + eps).sqrt() * p[0][ch] + p[1][ch])?;
    let m = a.n.attr_f("momentum").unwrap_or(0.9) as f64;
    let run =
        |old: &[f64], cur: &[f64]| -> Vec<f64> { old.iter().zip(cur).map(|(o, c)| o * m + c * (1.0 - m)).collect() };
    let dt = input(a.ins, 3)?.dtype();
    Ok(vec![
        y,
        tensor(vec![c], TensorData::F64(run(&p[2], &mean)))?.cast(dt),
        tensor(vec![c], TensorData::F64(run(&p[3], &var)))?.cast(dt),
    ])
}

pub(crate) fn op_instance_norm(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let p = channel_params(a, x, 1, 3)?;
    let (scale, bias) = (&p[0], &p[1]);
    let eps = a.n.attr_f("epsilon").unwrap_or(1e-5) as f64;
    let s = x.shape();
    let (c, inner) = (s[1], s[2..].iter().product::<usize>().max(1));
    let mut v = f64s(x);
    for (g, chunk) in v.chunks_mut(inner).enumerate() {
        let ch = g % c;
        normalize(chunk, eps, |_| (scale[ch], bias[ch]));
    }
    Ok(vec![out_float(s.to_vec(), v, x.dtype())?])
}

/// Normalises `v` to zero mean and unit variance (population), then `affine(i)` = (scale, bias) per element.
/// Returns (mean, 1/std).
fn normalize(v: &mut [f64], eps: f64, affine: impl Fn(usize) -> (f64, f64)) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|e| (e - mean) * (e - mean)).sum::<f64>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (i, e) in v.iter_mut().enumerate() {
        let (s, b) = affine(i);
        *e = (*e - mean) * inv * s + b;
    }
    (mean, inv)
}

pub(crate) fn op_layer_norm(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let s = x.shape().to_vec();
    let ax = axis(a.n.attr_i("axis").unwrap_or(-1), s.len())?;
    let eps = a.n.attr_f("epsilon").unwrap_or(1e-5) as f64;
    let inner: usize = s[ax..].iter().product::<usize>().max(1);
    let bshape = &s[ax..];
    let expand = |t: Option<&Tensor>, default: f64| -> Res<Vec<f64>> {
        match t {
            None => Ok(vec![default; inner]),
            Some(t) => {
                if broadcast(t.shape(), bshape)? != bshape {
                    return Err(format!("LayerNormalization scale/bias of shape {:?} for {bshape:?}", t.shape()));
                }
                let st = broadcast_strides(t.shape(), bshape);
                let v = f64s(t);
                let mut out = Vec::with_capacity(inner);
                for_each_offset(bshape, 0, &st, |o| out.push(v[o as usize]));
                Ok(out)
            }
        }
    };
    let scale = expand(Some(input(a.ins, 1)?), 1.0)?;
    let bias = expand(a.ins.get(2).copied().flatten(), 0.0)?;
    let mut v = f64s(x);
    let (mut means, mut invs) = (vec![], vec![]);
    for chunk in v.chunks_mut(inner) {
        let (m, i) = normalize(chunk, eps, |k| (scale[k], bias[k]));
        means.push(m);
        invs.push(i);
    }
    let stat_shape: Vec<usize> = s.iter().enumerate().map(|(d, &n)| if d < ax { n } else { 1 }).collect();
    // The mean and inverse std outputs are f32 (`stash_type` 1, the only type ONNX defines for them).
    Ok(vec![
        out_float(s.clone(), v, x.dtype())?,
        tensor(stat_shape.clone(), TensorData::F64(means))?.cast(DType::F32),
        tensor(stat_shape, TensorData::F64(invs))?.cast(DType::F32),
    ])
}

pub(crate) fn op_group_norm(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let s = x.shape().to_vec();
    let groups = a.n.attr_i("num_groups").unwrap_or(1).max(1) as usize;
    let eps = a.n.attr_f("epsilon").unwrap_or(1e-5) as f64;
    if s.len() < 2 {
        return Err(format!("GroupNormalization of a rank-{} input", s.len()));
    }
    let (c, inner) = (s[1], s[2..].iter().product::<usize>().max(1));
    if c % groups != 0 {
        return Err(format!("{c} channels in {groups} groups"));
    }
    let (scale, bias) = (f64s(input(a.ins, 1)?), f64s(input(a.ins, 2)?));
    // Opset 18 gives scale/bias per group, 21 per channel.
    let per_channel = scale.len() == c;
    if scale.len() != bias.len() || !(per_channel || scale.len() == groups) {
        return Err(format!(
            "GroupNormalization scale/bias of {} and {} values for {c} channels in {groups} groups",
            scale.len(),
            bias.len()
        ));
    }
    let cpg = c / groups;
    let mut v = f64s(x);
    for (g, chunk) in v.chunks_mut((cpg * inner).max(1)).enumerate() {
        let grp = g % groups;
        normalize(chunk, eps, |i| {
            let ch = if per_channel { grp * cpg + i / inner } else { grp };
            (scale[ch], bias[ch])
        });
    }
    Ok(vec![out_float(s, v, x.dtype())?])
}

pub(crate) fn op_lp_norm(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let s = x.shape().to_vec();
    let ax = axis(a.n.attr_i("axis").unwrap_or(-1), s.len())?;
    let p = a.n.attr_i("p").unwrap_or(2);
    let (outer, len, inner) = (s[..ax].iter().product::<usize>(), s[ax], s[ax + 1..].iter().product::<usize>());
    let mut v = f64s(x);
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| (o * len + k) * inner + i;
            let norm: f64 = if p == 1 {
                (0..len).map(|k| v[at(k)].abs()).sum()
            } else {
                (0..len).map(|k| v[at(k)] * v[at(k)]).sum::<f64>().sqrt()
            };
            for k in 0..len {
                v[at(k)] /= norm;
            }
        }
    }
    Ok(vec![out_float(s, v, x.dtype())?])
}

/// The spatial geometry of a window op (conv, pooling): per spatial axis the kernel, strides, dilations, the
/// padding before and after, and the output size.
pub(crate) struct Window {
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dil: Vec<usize>,
    pub begin: Vec<usize>,
    pub out: Vec<usize>,
}

pub(crate) fn window(n: &NodeProto, input: &[usize], kernel: &[usize], ceil: bool) -> Res<Window> {
    let r = input.len();
    let ints = |name: &str, d: usize| -> Res<Vec<usize>> { Ok(size_list(n, name)?.unwrap_or_else(|| vec![d; r])) };
    let (strides, dil) = (ints("strides", 1)?, ints("dilations", 1)?);
    if strides.len() != r || dil.len() != r || strides.contains(&0) || dil.contains(&0) {
        return Err("strides/dilations do not match the spatial rank".into());
    }
    if kernel.len() != r || kernel.iter().any(|&k| k == 0 || k > MAX_ELEMENTS) {
        return Err(format!("kernel {kernel:?} for a spatial rank of {r}"));
    }
    let span = |i: usize| (kernel[i] - 1) * dil[i] + 1;
    let (mut begin, mut end) = (vec![0; r], vec![0; r]);
    match n.attr_s("auto_pad").unwrap_or("NOTSET") {
        "NOTSET" => {
            let p = ints("pads", 0)?;
            let p = if p.len() == 2 * r { p } else { vec![0; 2 * r] };
            begin.copy_from_slice(&p[..r]);
            end.copy_from_slice(&p[r..]);
        }
        "VALID" => {}
        mode => {
            for i in 0..r {
                let out = input[i].div_ceil(strides[i]);
                let total = (out.saturating_sub(1) * strides[i] + span(i)).saturating_sub(input[i]);
                let small = total / 2;
                (begin[i], end[i]) = if mode == "SAME_LOWER" { (total - small, small) } else { (small, total - small) };
            }
        }
    }
    let mut out = vec![0; r];
    for i in 0..r {
        let full = input[i] + begin[i] + end[i];
        if full < span(i) {
            return Err(format!("input {input:?} smaller than the window"));
        }
        let room = full - span(i);
        let mut o = if ceil { room.div_ceil(strides[i]) } else { room / strides[i] } + 1;
        if ceil && (o - 1) * strides[i] >= input[i] + begin[i] {
            o -= 1;
        }
        out[i] = o;
    }
    Ok(Window { kernel: kernel.to_vec(), strides, dil, begin, out })
}

/// Calls `f(out_pos, in_pos)` for each output position (row-major) and each kernel offset whose input
/// position lies inside the input (`in_pos` None for a padded cell), with the flat kernel index.
fn for_window(w: &Window, input: &[usize], mut f: impl FnMut(usize, usize, Option<usize>)) {
    let r = input.len();
    let total_out: usize = w.out.iter().product();
    let total_k: usize = w.kernel.iter().product();
    let in_strides = dense_strides(input);
    let (mut o, mut k) = (vec![0usize; r], vec![0usize; r]);
    for oi in 0..total_out {
        unravel(oi, &w.out, &mut o);
        for ki in 0..total_k {
            unravel(ki, &w.kernel, &mut k);
            let mut off = 0isize;
            let mut inside = true;
            for d in 0..r {
                let p = (o[d] * w.strides[d] + k[d] * w.dil[d]) as isize - w.begin[d] as isize;
                if p < 0 || p >= input[d] as isize {
                    inside = false;
                    break;
                }
                off += p * in_strides[d];
            }
            f(oi, ki, inside.then_some(off as usize));
        }
    }
}

/// A Conv's or ConvTranspose's `kernel_shape`, when given, must be its weights' spatial dims, as the spec says and
/// onnxruntime checks; the kernels read the weights' own. (A ConvTranspose chain whose `kernel_shape` said 5×5×5 over
/// 32×32×2 weights ran 30 s in the fuzzer before this check refused it.)
pub(crate) fn check_kernel_shape(n: &NodeProto, spatial: &[usize]) -> Res<()> {
    match n.attr_ints("kernel_shape") {
        Some(k) if k.len() != spatial.len() || k.iter().zip(spatial).any(|(&a, &b)| a < 0 || a as usize != b) => {
            Err(format!("kernel_shape {k:?} is not the weights' spatial shape {spatial:?}"))
        }
        _ => Ok(()),
    }
}

/// N-D convolution by direct loops (what the NHWC kernel does not take: 3-D, non-constant or non-f32 weights,
/// asymmetric shapes).
pub(crate) fn conv_direct(n: &NodeProto, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Res<Tensor> {
    let (xs, ws) = (x.shape(), w.shape());
    if xs.len() < 3 || ws.len() != xs.len() {
        return Err(format!("Conv of {xs:?} with weights {ws:?}"));
    }
    check_kernel_shape(n, &ws[2..])?;
    let group = group_of(n)?;
    let (batch, c, m) = (xs[0], xs[1], ws[0]);
    let cpg = ws[1];
    if cpg.checked_mul(group) != Some(c) || m % group != 0 {
        return Err(format!("{c} input channels, weights {ws:?}, group {group}"));
    }
    if let Some(b) = b.filter(|b| b.len() != m) {
        return Err(format!("a bias of {} values for {m} output channels", b.len()));
    }
    let sp = &xs[2..];
    let win = window(n, sp, &ws[2..], false)?;
    let (xv, wv) = (f64s(x), f64s(w));
    let bv = b.map(f64s);
    let (isz, osz, ksz) =
        (sp.iter().product::<usize>(), win.out.iter().product::<usize>(), ws[2..].iter().product::<usize>());
    let mpg = m / group;
    let shape: Vec<usize> = [batch, m].iter().chain(&win.out).copied().collect();
    let mut y = vec![0.0; checked_len(&shape)?];
    for nb in 0..batch {
        for oc in 0..m {
            let g = oc / mpg;
            let yo = &mut y[(nb * m + oc) * osz..(nb * m + oc + 1) * osz];
            for ci in 0..cpg {
                let xo = &xv[(nb * c + g * cpg + ci) * isz..][..isz];
                let wo = &wv[(oc * cpg + ci) * ksz..][..ksz];
                for_window(&win, sp, |o, k, at| {
                    if let Some(at) = at {
                        yo[o] += xo[at] * wo[k];
                    }
                });
            }
            if let Some(bv) = &bv {
                yo.iter_mut().for_each(|e| *e += bv[oc]);
            }
        }
    }
    out_float(shape, y, x.dtype())
}

pub(crate) fn op_conv_transpose(a: &Args) -> Res<Vec<Tensor>> {
    let (x, w) = (a.x()?, input(a.ins, 1)?);
    let n = a.n;
    let (xs, ws) = (x.shape().to_vec(), w.shape().to_vec());
    let r = xs.len().checked_sub(2).filter(|&r| r >= 1 && ws.len() == r + 2).ok_or("ConvTranspose shapes")?;
    let (batch, c, mpg) = (xs[0], xs[1], ws[1]);
    let (group, m) = group_channels(n, mpg)?;
    let cpg = c / group;
    let ints = |name: &str, d: usize| -> Res<Vec<usize>> { Ok(size_list(n, name)?.unwrap_or_else(|| vec![d; r])) };
    let (strides, dil, opad) = (ints("strides", 1)?, ints("dilations", 1)?, ints("output_padding", 0)?);
    let kernel = ws[2..].to_vec();
    check_kernel_shape(n, &kernel)?;
    let sp = &xs[2..];
    // The spec's constraints, before any index arithmetic.
    let bias_len = a.ins.get(2).copied().flatten().map(|b| b.shape().to_vec());
    if c % group != 0
        || ws[0] != c
        || [&strides, &dil, &opad].iter().any(|v| v.len() != r)
        || strides.iter().chain(&dil).chain(&kernel).chain(sp).any(|&v| v == 0 || v > MAX_ELEMENTS)
        || n.attr_ints("output_shape").is_some_and(|o| o.len() < r)
        || bias_len.as_ref().is_some_and(|b| b != &[m])
    {
        return Err(format!(
            "ConvTranspose of input {xs:?}, weights {ws:?}, group {group}, bias {bias_len:?}, strides {strides:?}, \
             dilations {dil:?}, output_padding {opad:?}"
        ));
    }
    let span = |i: usize| (kernel[i] - 1) * dil[i] + 1;
    let full: Vec<usize> = (0..r).map(|i| (sp[i] - 1) * strides[i] + span(i) + opad[i]).collect();
    let (mut begin, mut out) = (vec![0usize; r], vec![0usize; r]);
    let pads = ints("pads", 0)?;
    let given = size_list(n, "output_shape")?;
    let auto = n.attr_s("auto_pad").unwrap_or("NOTSET");
    for i in 0..r {
        if let Some(os) = &given {
            let o = os[os.len() - r + i];
            let total = full[i].saturating_sub(o);
            begin[i] = if auto == "SAME_UPPER" { total / 2 } else { total - total / 2 };
            out[i] = o;
        } else if auto == "SAME_UPPER" || auto == "SAME_LOWER" {
            let o = sp[i] * strides[i];
            let total = full[i].saturating_sub(o);
            begin[i] = if auto == "SAME_UPPER" { total / 2 } else { total - total / 2 };
            out[i] = o;
        } else {
            let (b, e) = if pads.len() == 2 * r { (pads[i], pads[i + r]) } else { (0, 0) };
            begin[i] = b;
            out[i] = full[i].checked_sub(b + e).ok_or("pads larger than the output")?;
        }
    }
    let (xv, wv) = (f64s(x), f64s(w));
    let (isz, osz, ksz) =
        (sp.iter().product::<usize>(), out.iter().product::<usize>(), kernel.iter().product::<usize>());
    let shape: Vec<usize> = [batch, m].iter().chain(&out).copied().collect();
    let ostr = dense_strides(&out);
    let mut y = vec![0.0; checked_len(&shape)?];
    let (mut ip, mut kp) = (vec![0usize; r], vec![0usize; r]);
    for nb in 0..batch {
        for ic in 0..c {
            let g = ic / cpg;
            let xo = &xv[(nb * c + ic) * isz..][..isz];
            for (ii, &xval) in xo.iter().enumerate() {
                unravel(ii, sp, &mut ip);
                for ki in 0..ksz {
                    unravel(ki, &kernel, &mut kp);
                    let mut off = 0isize;
                    let mut inside = true;
                    for d in 0..r {
                        let p = (ip[d] * strides[d] + kp[d] * dil[d]) as isize - begin[d] as isize;
                        if p < 0 || p >= out[d] as isize {
                            inside = false;
                            break;
                        }
                        off += p * ostr[d];
                    }
                    if !inside {
                        continue;
                    }
                    for mo in 0..mpg {
                        let oc = g * mpg + mo;
                        y[(nb * m + oc) * osz + off as usize] += xval * wv[(ic * mpg + mo) * ksz + ki];
                    }
                }
            }
        }
    }
    if let Some(b) = a.ins.get(2).copied().flatten() {
        let bv = f64s(b);
        for (k, e) in y.iter_mut().enumerate() {
            *e += bv[(k / osz) % m];
        }
    }
    Ok(vec![out_float(shape, y, x.dtype())?])
}

/// MaxPool (with Indices), AveragePool and LpPool by direct loops over any spatial rank.
pub(crate) fn pool_direct(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let n = a.n;
    let xs = x.shape().to_vec();
    if xs.len() < 3 {
        return Err(format!("pooling of {xs:?}"));
    }
    let sp = xs[2..].to_vec();
    // Sizes under 1 count as 1; one past the limit stands for any larger size (`window` refuses it).
    let kernel: Vec<usize> =
        n.attr_ints("kernel_shape").unwrap_or_default().iter().map(|&k| k.clamp(1, LIMIT + 1) as usize).collect();
    if kernel.len() != sp.len() {
        return Err("kernel_shape does not match the spatial rank".into());
    }
    let win = window(n, &sp, &kernel, n.attr_i("ceil_mode").unwrap_or(0) != 0)?;
    let op = n.op();
    let include_pad = n.attr_i("count_include_pad").unwrap_or(0) != 0;
    let p = n.attr_i("p").unwrap_or(2) as f64;
    let (isz, osz) = (sp.iter().product::<usize>(), win.out.iter().product::<usize>());
    let planes = xs[0] * xs[1];
    let shape: Vec<usize> = xs[..2].iter().chain(&win.out).copied().collect();
    checked_len(&shape)?;
    let v = f64s(x);
    let mut y = vec![0.0; planes * osz];
    let mut ind = vec![0i64; planes * osz];
    let storage_order = n.attr_i("storage_order").unwrap_or(0) != 0;
    // count_include_pad divides by the window's cells inside the padded input (not beyond it, in ceil mode).
    let padded_cells = if include_pad { recount_with_pads(n, &sp, &win) } else { vec![] };
    for pl in 0..planes {
        let xo = &v[pl * isz..(pl + 1) * isz];
        let yo = &mut y[pl * osz..(pl + 1) * osz];
        let io = &mut ind[pl * osz..(pl + 1) * osz];
        let mut acc = vec![if op == "MaxPool" { f64::NEG_INFINITY } else { 0.0 }; osz];
        let mut count = vec![0usize; osz];
        let mut arg = vec![0usize; osz];
        for_window(&win, &sp, |o, _, at| {
            if let Some(at) = at {
                match op {
                    "MaxPool" => {
                        if xo[at] > acc[o] {
                            acc[o] = xo[at];
                            arg[o] = at;
                        }
                    }
                    "LpPool" => acc[o] += xo[at].abs().powf(p),
                    _ => acc[o] += xo[at],
                }
                count[o] += 1;
            }
        });
        for o in 0..osz {
            yo[o] = match op {
                "MaxPool" => acc[o],
                "LpPool" => acc[o].powf(1.0 / p),
                _ if include_pad => acc[o] / padded_cells[o].max(1) as f64,
                _ => acc[o] / count[o].max(1) as f64,
            };
            let flat = (pl * isz + arg[o]) as i64;
            io[o] = if storage_order && sp.len() == 2 && sp[1] > 0 {
                let (h, w) = (arg[o] / sp[1], arg[o] % sp[1]);
                (pl * isz + w * sp[0] + h) as i64
            } else {
                flat
            };
        }
    }
    let mut outs = vec![out_float(shape.clone(), y, x.dtype())?];
    if n.output.len() > 1 {
        outs.push(tensor(shape, TensorData::I64(ind))?);
    }
    Ok(outs)
}

/// Per output position: the window cells inside the padded input (what count_include_pad divides by).
fn recount_with_pads(n: &NodeProto, sp: &[usize], w: &Window) -> Vec<usize> {
    let r = sp.len();
    // `window` has checked the pads (in range, or of another length and then unused).
    let pads: Vec<usize> = size_list(n, "pads").ok().flatten().unwrap_or_else(|| vec![0; 2 * r]);
    let end: Vec<usize> = if pads.len() == 2 * r { pads[r..].to_vec() } else { vec![0; r] };
    let osz: usize = w.out.iter().product();
    let mut o = vec![0usize; r];
    (0..osz)
        .map(|oi| {
            unravel(oi, &w.out, &mut o);
            (0..r)
                .map(|d| {
                    let start = o[d] * w.strides[d];
                    let stop = (start + (w.kernel[d] - 1) * w.dil[d] + 1).min(sp[d] + w.begin[d] + end[d]);
                    (stop - start).div_ceil(w.dil[d])
                })
                .product()
        })
        .collect()
}

pub(crate) fn op_global_max_pool(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let s = x.shape().to_vec();
    if s.len() < 2 {
        return Err(format!("GlobalMaxPool of {s:?} (N, C, ... expected)"));
    }
    let inner: usize = s[2..].iter().product::<usize>().max(1);
    let y = f64s(x).chunks(inner).map(|c| c.iter().copied().fold(f64::NEG_INFINITY, f64::max)).collect();
    let out: Vec<usize> = s[..2].iter().copied().chain(std::iter::repeat_n(1, s.len() - 2)).collect();
    Ok(vec![out_float(out, y, x.dtype())?])
}

pub(crate) fn op_lrn(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let s = x.shape().to_vec();
    let size = a.n.attr_i("size").unwrap_or(1).max(1) as usize;
    let (alpha, beta, bias) = (
        a.n.attr_f("alpha").unwrap_or(1e-4) as f64,
        a.n.attr_f("beta").unwrap_or(0.75) as f64,
        a.n.attr_f("bias").unwrap_or(1.0) as f64,
    );
    if s.len() < 2 {
        return Err(format!("LRN of {s:?} (N, C, ... expected)"));
    }
    let (c, inner) = (s[1], s[2..].iter().product::<usize>());
    let v = f64s(x);
    let mut y = vec![0.0; v.len()];
    let (lo, hi) = ((size - 1) / 2, size.div_ceil(2) - 1);
    for nb in 0..s[0] {
        for ch in 0..c {
            for i in 0..inner {
                let from = ch.saturating_sub(lo);
                let to = (ch + hi).min(c - 1);
                let sq: f64 = (from..=to).map(|k| v[(nb * c + k) * inner + i].powi(2)).sum();
                let at = (nb * c + ch) * inner + i;
                y[at] = v[at] / (bias + alpha / size as f64 * sq).powf(beta);
            }
        }
    }
    Ok(vec![out_float(s, y, x.dtype())?])
}

/// Einsum by direct summation over every label (what the ONNX reference computes), with `...` broadcast dims.
pub(crate) fn op_einsum(a: &Args) -> Res<Vec<Tensor>> {
    let eq = a.n.attr_s("equation").ok_or("Einsum without an equation")?.replace(' ', "");
    let ts: Vec<&Tensor> = (0..a.ins.len()).map(|i| input(a.ins, i)).collect::<Res<_>>()?;
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l.to_string(), Some(r.to_string())),
        None => (eq.clone(), None),
    };
    let terms: Vec<&str> = lhs.split(',').collect();
    if terms.len() != ts.len() {
        return Err(format!("equation `{eq}` for {} inputs", ts.len()));
    }
    // Every term: letters, and at most one `...` (which stands for the dims its letters leave).
    let well_formed = |term: &str| {
        let rest = term.replacen("...", "", 1);
        rest.chars().all(|c| c.is_ascii_alphabetic())
    };
    if let Some(bad) = terms.iter().copied().chain(rhs.as_deref()).find(|t| !well_formed(t)) {
        return Err(format!("Einsum equation `{eq}`: term `{bad}` is not letters with at most one `...`"));
    }
    for (t, term) in ts.iter().zip(&terms) {
        let (letters, rank) = (term.replacen("...", "", 1).len(), t.shape().len());
        if letters > rank || (letters < rank && !term.contains("...")) {
            return Err(format!("Einsum equation `{eq}`: term `{term}` for an input of rank {rank}"));
        }
    }
    // Expand `...` into labels of their own (right-aligned broadcast dims), outside the letters.
    let ell_rank = ts
        .iter()
        .zip(&terms)
        .filter(|(_, term)| term.contains("..."))
        .map(|(t, term)| t.shape().len() - term.replacen("...", "", 1).len())
        .max()
        .unwrap_or(0);
    let ell: Vec<char> = (0..ell_rank as u32).filter_map(|i| char::from_u32(0x100 + i)).collect();
    let expand = |term: &str, rank: usize| -> Vec<char> {
        match term.find("...") {
            Some(p) => {
                let n = rank + 3 - term.len();
                term[..p].chars().chain(ell[ell_rank - n..].iter().copied()).chain(term[p + 3..].chars()).collect()
            }
            None => term.chars().collect(),
        }
    };
    let labels: Vec<Vec<char>> = ts.iter().zip(&terms).map(|(t, term)| expand(term, t.shape().len())).collect();
    let mut sizes: std::collections::BTreeMap<char, usize> = Default::default();
    for (t, l) in ts.iter().zip(&labels) {
        if l.len() != t.shape().len() {
            return Err(format!("term `{}` for rank {}", l.iter().collect::<String>(), t.shape().len()));
        }
        for (&c, &d) in l.iter().zip(t.shape()) {
            let e = sizes.entry(c).or_insert(d);
            if *e == 1 {
                *e = d;
            } else if d != 1 && *e != d {
                return Err(format!("label {c}: sizes {e} and {d}"));
            }
        }
    }
    let out: Vec<char> = match rhs {
        Some(r) => match r.find("...") {
            Some(p) => r[..p].chars().chain(ell.iter().copied()).chain(r[p + 3..].chars()).collect(),
            None => r.chars().collect(),
        },
        None => {
            let mut once: Vec<char> = sizes
                .keys()
                .copied()
                .filter(|c| c.is_ascii_alphabetic() && labels.iter().flatten().filter(|x| *x == c).count() == 1)
                .collect();
            once.sort_unstable();
            ell.iter().copied().chain(once).collect()
        }
    };
    if let Some(c) = out.iter().find(|c| !sizes.contains_key(c)) {
        return Err(format!("Einsum equation `{eq}`: output label {c} is in no input"));
    }
    if out.iter().enumerate().any(|(i, c)| out[..i].contains(c)) {
        return Err(format!("Einsum equation `{eq}`: an output label repeats"));
    }
    let all: Vec<char> = out.iter().copied().chain(sizes.keys().copied().filter(|c| !out.contains(c))).collect();
    let dims: Vec<usize> = all.iter().map(|c| sizes[c]).collect();
    // Direct summation visits every combination of labels: refuse what would not end.
    if dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).is_none_or(|n| n > 1 << 32) {
        return Err(format!("Einsum equation `{eq}`: {dims:?} is too many terms to sum"));
    }
    let vals: Vec<Vec<f64>> = ts.iter().map(|t| f64s(t)).collect();
    let strides: Vec<Vec<usize>> = ts
        .iter()
        .zip(&labels)
        .map(|(t, l)| {
            let st = dense_strides(t.shape());
            all.iter()
                .map(|c| {
                    l.iter()
                        .enumerate()
                        .filter(|(_, x)| *x == c)
                        .map(|(i, _)| if t.shape()[i] == 1 { 0 } else { st[i] as usize })
                        .sum()
                })
                .collect()
        })
        .collect();
    let osz: usize = dims[..out.len()].iter().product();
    let inner: usize = dims[out.len()..].iter().product();
    checked_len(&dims[..out.len()])?;
    let mut y = vec![0.0; osz];
    let mut idx = vec![0usize; all.len()];
    for (o, yo) in y.iter_mut().enumerate() {
        for s in 0..inner {
            unravel(o * inner + s, &dims, &mut idx);
            let mut p = 1.0;
            for (v, st) in vals.iter().zip(&strides) {
                p *= v[idx.iter().zip(st).map(|(i, s)| i * s).sum::<usize>()];
            }
            *yo += p;
        }
    }
    let dt = ts[0].dtype();
    let t = tensor(dims[..out.len()].to_vec(), TensorData::F64(y))?;
    Ok(vec![if is_float(dt) { t.cast(dt) } else { t.cast(DType::I64).cast(dt) }])
}

/// ConvInteger: (x − x_zero) ⊛ (w − w_zero) in int32 (zero points per tensor, or per output channel for w).
pub(crate) fn op_conv_integer(a: &Args) -> Res<Vec<Tensor>> {
    let xs = minus_zero(a.x()?, a.ins.get(2).copied().flatten(), None)?;
    let ws = minus_zero(input(a.ins, 1)?, a.ins.get(3).copied().flatten(), Some(0))?;
    let y = conv_direct(a.n, &xs, &ws, None)?;
    Ok(vec![y.cast(DType::I32)])
}

/// NonMaxSuppression: per batch and class, boxes above the score threshold, greedily kept when their IoU with
/// every kept box is at most the threshold; [selected, 3] rows of (batch, class, box).
pub(crate) fn op_nms(a: &Args) -> Res<Vec<Tensor>> {
    let (boxes, scores) = (a.x()?, input(a.ins, 1)?);
    let opt = |i: usize| a.ins.get(i).copied().flatten().filter(|t| !t.is_empty());
    let max_out = opt(2).map(|t| super::math::i64v(t)[0]).unwrap_or(0).max(0) as usize;
    let iou_t = opt(3).map(|t| f64s(t)[0]).unwrap_or(0.0);
    let score_t = opt(4).map(|t| f64s(t)[0]);
    let center = a.n.attr_i("center_point_box").unwrap_or(0) != 0;
    let (bs, ss) = (boxes.shape(), scores.shape());
    if bs.len() != 3 || ss.len() != 3 || bs[2] != 4 || bs[0] != ss[0] || bs[1] != ss[2] {
        return Err(format!("boxes {bs:?} and scores {ss:?}"));
    }
    let (nb, nc, n) = (ss[0], ss[1], ss[2]);
    let (bv, sv) = (f64s(boxes), f64s(scores));
    let corners = |b: usize, i: usize| -> [f64; 4] {
        let v = &bv[(b * n + i) * 4..][..4];
        if center {
            [v[1] - v[3] / 2.0, v[0] - v[2] / 2.0, v[1] + v[3] / 2.0, v[0] + v[2] / 2.0]
        } else {
            [v[0].min(v[2]), v[1].min(v[3]), v[0].max(v[2]), v[1].max(v[3])]
        }
    };
    let iou = |p: [f64; 4], q: [f64; 4]| {
        let inter = ((p[2].min(q[2]) - p[0].max(q[0])).max(0.0)) * ((p[3].min(q[3]) - p[1].max(q[1])).max(0.0));
        let area = |r: [f64; 4]| (r[2] - r[0]) * (r[3] - r[1]);
        let union = area(p) + area(q) - inter;
        if union <= 0.0 { 0.0 } else { inter / union }
    };
    let mut out = Vec::new();
    for b in 0..nb {
        for c in 0..nc {
            let s = &sv[(b * nc + c) * n..][..n];
            let mut order: Vec<usize> = (0..n).filter(|&i| score_t.is_none_or(|t| s[i] > t)).collect();
            order.sort_by(|&p, &q| s[q].total_cmp(&s[p]).then(p.cmp(&q)));
            let mut kept: Vec<usize> = Vec::new();
            for i in order {
                if kept.len() >= max_out {
                    break;
                }
                if kept.iter().all(|&k| iou(corners(b, k), corners(b, i)) <= iou_t) {
                    kept.push(i);
                }
            }
            out.extend(kept.into_iter().flat_map(|i| [b as i64, c as i64, i as i64]));
        }
    }
    Ok(vec![tensor(vec![out.len() / 3, 3], TensorData::I64(out))?])
}
