//! ONNX operators on burn's cubecl backend (run-time shapes). Each op takes the node and its input values and
//! returns its outputs; attributes and host-known inputs (shapes, axes, pads) are read here.
use burn_backend::ops::{ConvOptions, ConvTransposeOptions, PadMode};
use burn_backend::ops::{FloatTensorOps, ModuleOps};
use burn_backend::{BoolDType, IntDType, Scalar, Shape, Slice, TensorMetadata};

use super::plan::{B, Ctx, Dv, T, Val, gpu_err};
use edgepack_core::tensor::{DType, Tensor, TensorData};
use edgepack_core::{Error, Result};
use edgepack_onnx::{NodeExt, NodeProto};

type Ins<'a> = &'a [Option<Val>];

/// An op's implementation on the device: the node, its inputs (`None`: omitted) → its outputs.
type OpFn = fn(&Ctx, &NodeProto, Ins) -> Result<Vec<Val>>;

/// The op table: every op the GPU backend runs, with its implementation. It is the dispatch ([`exec`]) and the
/// list of supported ops ([`SUPPORTED_OPS`]) alike, so the two cannot drift apart.
const OPS: &[(&str, OpFn)] = &[
    ("Abs", unary),
    ("Add", bin_op),
    ("And", bin_op),
    ("ArgMax", |c, n, i| arg(c, n, i, true)),
    ("ArgMin", |c, n, i| arg(c, n, i, false)),
    ("AveragePool", |c, n, i| pool(c, n, i, false)),
    ("BatchNormalization", batchnorm),
    ("Cast", cast),
    ("CastLike", cast),
    ("Ceil", unary),
    ("Clip", clip),
    ("Concat", concat),
    ("Constant", |_, n, _| Err(fail(n, "constants are folded on the host"))),
    ("ConstantOfShape", |_, n, _| Err(fail(n, "constants are folded on the host"))),
    ("Conv", conv),
    ("ConvTranspose", conv_transpose),
    ("Cos", unary),
    ("DequantizeLinear", dequantize),
    ("Div", bin_op),
    ("Dropout", unary),
    ("Elu", unary),
    ("Equal", bin_op),
    ("Erf", unary),
    ("Exp", unary),
    ("Expand", expand),
    ("Flatten", flatten),
    ("Floor", unary),
    ("Gather", gather),
    ("Gemm", gemm),
    ("GlobalAveragePool", |c, n, i| global_pool(c, n, i, false)),
    ("GlobalMaxPool", |c, n, i| global_pool(c, n, i, true)),
    ("Greater", bin_op),
    ("GreaterOrEqual", bin_op),
    ("HardSigmoid", unary),
    ("HardSwish", unary),
    ("Identity", unary),
    ("LeakyRelu", unary),
    ("Less", bin_op),
    ("LessOrEqual", bin_op),
    ("Log", unary),
    ("LogSoftmax", |c, n, i| softmax(c, n, i, true)),
    ("MatMul", matmul),
    ("Max", variadic),
    ("MaxPool", |c, n, i| pool(c, n, i, true)),
    ("Mean", variadic),
    ("Min", variadic),
    ("Mul", bin_op),
    ("Neg", unary),
    ("Not", unary),
    ("Or", bin_op),
    ("Pad", pad),
    ("Pow", bin_op),
    ("PRelu", bin_op),
    ("QuantizeLinear", quantize),
    ("Reciprocal", unary),
    ("ReduceMax", reduce),
    ("ReduceMean", reduce),
    ("ReduceMin", reduce),
    ("ReduceSum", reduce),
    ("Relu", unary),
    ("Reshape", reshape_op),
    ("Resize", resize),
    ("Shape", |_, n, i| host_result(n, i).ok_or_else(|| fail(n, "no input"))),
    ("Sigmoid", unary),
    ("Sin", unary),
    ("Size", |_, n, i| host_result(n, i).ok_or_else(|| fail(n, "no input"))),
    ("Slice", slice),
    ("Softmax", |c, n, i| softmax(c, n, i, false)),
    ("Softplus", unary),
    ("Split", split),
    ("Sqrt", unary),
    ("Squeeze", squeeze),
    ("Sub", bin_op),
    ("Sum", variadic),
    ("Tanh", unary),
    ("Tile", tile),
    ("Transpose", transpose),
    ("Unsqueeze", unsqueeze),
    ("Where", where_op),
];

/// The ops the GPU backend implements (default ONNX domain), derived from its op table. A model with any other op
/// is [`Error::UnsupportedOp`] on `--device gpu` and runs on the CPU under `auto`.
pub static SUPPORTED_OPS: std::sync::LazyLock<Vec<&'static str>> =
    std::sync::LazyLock::new(|| OPS.iter().map(|(op, _)| *op).collect());

/// Input `i` of `op` is a parameter the op reads on the host (a shape, axes, pads, scales...): a graph input fed
/// there is kept on the host and the plan is specialised on its value.
pub(crate) fn param_input(op: &str, i: usize) -> bool {
    match op {
        "Reshape" | "Expand" | "Tile" | "Squeeze" | "Unsqueeze" | "Split" | "ReduceMean" | "ReduceSum"
        | "ReduceMax" | "ReduceMin" => i == 1,
        "Slice" => (1..=4).contains(&i),
        "Pad" | "Resize" => (1..=3).contains(&i),
        "ConstantOfShape" => i == 0,
        _ => false,
    }
}

fn fail(node: &NodeProto, why: impl std::fmt::Display) -> Error {
    gpu_err(format!("{} `{}`: {why}", node.op(), node.name()))
}

fn input<'a>(node: &NodeProto, ins: Ins<'a>, i: usize) -> Result<&'a Val> {
    ins.get(i).and_then(|v| v.as_ref()).ok_or_else(|| fail(node, format!("input {i} is missing")))
}

fn opt<'a>(ins: Ins<'a>, i: usize) -> Option<&'a Val> {
    ins.get(i).and_then(|v| v.as_ref())
}

/// Integer values of a host-known input (axes, shapes, pads...).
fn host_ints(node: &NodeProto, v: &Val, what: &str) -> Result<Vec<i64>> {
    let t =
        v.as_host().ok_or_else(|| fail(node, format!("{what} must be known at load (not computed on the device)")))?;
    Ok(match t.data() {
        TensorData::I64(v) => v.clone(),
        TensorData::I32(v) => v.iter().map(|&x| x as i64).collect(),
        _ => t.to_f32_vec().into_iter().map(|x| x as i64).collect(),
    })
}

fn host_floats(node: &NodeProto, v: &Val, what: &str) -> Result<Vec<f32>> {
    let t = v.as_host().ok_or_else(|| fail(node, format!("{what} must be known at load")))?;
    Ok(t.to_f32_vec())
}

fn dims(t: &T) -> Vec<usize> {
    t.shape().to_vec()
}

fn reshape(t: T, shape: &[usize]) -> T {
    let s: Vec<usize> = if shape.is_empty() { vec![1] } else { shape.to_vec() };
    if dims(&t) == s { t } else { B::float_reshape(t, Shape::from(s)) }
}

fn dv(t: T, dt: DType) -> Val {
    let shape = dims(&t);
    Val::Dev(Dv { t, dt, shape })
}

fn dv_shaped(t: T, dt: DType, shape: Vec<usize>) -> Val {
    let t = reshape(t, &shape);
    Val::Dev(Dv { t, dt, shape })
}

fn axis(node: &NodeProto, a: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let v = if a < 0 { a + r } else { a };
    if (0..r.max(1)).contains(&v) {
        Ok(v as usize)
    } else {
        Err(fail(node, format!("axis {a} out of range for rank {rank}")))
    }
}

/// The operands at one rank (leading 1s; burn's element-wise kernels broadcast dims of 1), and the
/// broadcast shape.
fn broadcast(ctx: &Ctx, vals: &[&Val]) -> (Vec<T>, Vec<usize>) {
    let devs: Vec<Dv> = vals.iter().map(|v| ctx.dev(v)).collect();
    let r = devs.iter().map(|d| d.shape.len()).max().unwrap_or(0);
    let mut out = vec![1; r];
    let mut ts = Vec::with_capacity(devs.len());
    for d in devs {
        let mut s = vec![1; r - d.shape.len()];
        s.extend_from_slice(&d.shape);
        for (o, &x) in out.iter_mut().zip(&s) {
            if *o == 1 {
                *o = x;
            }
        }
        ts.push(reshape(d.t, &s));
    }
    (ts, out)
}

fn binary(ctx: &Ctx, a: &Val, b: &Val) -> (T, T, Vec<usize>) {
    let (mut ts, shape) = broadcast(ctx, &[a, b]);
    let y = ts.pop().unwrap_or_else(|| unreachable!());
    let x = ts.pop().unwrap_or_else(|| unreachable!());
    (x, y, shape)
}

/// The device's boolean storage (wgpu has no native bool buffers).
fn bool_dt(ctx: &Ctx) -> BoolDType {
    burn_backend::get_or_init_device_settings::<B>(ctx.device).bool_dtype
}

fn b2f(ctx: &Ctx, b: burn_wgpu::CubeTensor) -> T {
    <B as burn_backend::ops::BoolTensorOps<B>>::bool_into_float(b, ctx.float_dtype())
}

fn f2b(ctx: &Ctx, t: T) -> burn_wgpu::CubeTensor {
    B::float_not_equal_elem(t, Scalar::from(0f32), bool_dt(ctx))
}

fn full_like(ctx: &Ctx, shape: &[usize], v: f32) -> T {
    B::float_full(Shape::from(shape.to_vec()), Scalar::from(v), ctx.device, ctx.float_dtype())
}

/// A 1-D NCL tensor (or OIK weight) as 2-D with a height of 1, for burn's 2-D kernels.
fn lift_1d(t: T, s: &[usize]) -> T {
    reshape(t, &[s[0], s[1], 1, s[2]])
}

/// Back from [`lift_1d`]: drops the height of 1.
fn drop_1d(t: T) -> T {
    let d = dims(&t);
    reshape(t, &[d[0], d[1], d[3]])
}

/// Padding per spatial dim from `pads` / `auto_pad`.
pub(crate) fn conv_pads(
    node: &NodeProto,
    input: &[usize],
    kernel: &[usize],
    stride: &[usize],
    dil: &[usize],
) -> Result<Vec<(usize, usize)>> {
    let n = input.len();
    match node.attr_s("auto_pad").unwrap_or("NOTSET") {
        "NOTSET" => match node.attr_ints("pads") {
            Some(p) if p.len() == 2 * n => {
                if p.iter().any(|&v| v < 0) {
                    return Err(fail(node, "negative pads"));
                }
                Ok((0..n).map(|i| (p[i] as usize, p[i + n] as usize)).collect())
            }
            Some(p) if !p.is_empty() => Err(fail(node, format!("pads {p:?} for {n} spatial dims"))),
            _ => Ok(vec![(0, 0); n]),
        },
        "VALID" => Ok(vec![(0, 0); n]),
        mode @ ("SAME_UPPER" | "SAME_LOWER") => Ok((0..n)
            .map(|i| {
                let out = input[i].div_ceil(stride[i]);
                let need = (out.saturating_sub(1)) * stride[i] + (kernel[i] - 1) * dil[i] + 1;
                let total = need.saturating_sub(input[i]);
                if mode == "SAME_UPPER" { (total / 2, total - total / 2) } else { (total - total / 2, total / 2) }
            })
            .collect()),
        other => Err(fail(node, format!("auto_pad {other}"))),
    }
}

pub(crate) fn ints_or(node: &NodeProto, name: &str, n: usize, default: usize) -> Result<Vec<usize>> {
    match node.attr_ints(name) {
        Some(v) if v.len() == n && v.iter().all(|&x| x > 0) => Ok(v.iter().map(|&x| x as usize).collect()),
        Some(v) if !v.is_empty() => Err(fail(node, format!("{name} {v:?}"))),
        _ => Ok(vec![default; n]),
    }
}

fn conv(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let w = ctx.dev(input(node, ins, 1)?);
    let bias = opt(ins, 2).map(|b| ctx.dev(b).t);
    let nd = x.shape.len().saturating_sub(2);
    if !(1..=3).contains(&nd) || w.shape.len() != nd + 2 {
        return Err(fail(node, format!("input rank {} / weight rank {}", x.shape.len(), w.shape.len())));
    }
    let kernel: Vec<usize> = w.shape[2..].to_vec();
    let stride = ints_or(node, "strides", nd, 1)?;
    let dil = ints_or(node, "dilations", nd, 1)?;
    let group = node.attr_i("group").unwrap_or(1).max(1) as usize;
    let pads = conv_pads(node, &x.shape[2..], &kernel, &stride, &dil)?;
    if x.shape[1] != w.shape[1] * group || !w.shape[0].is_multiple_of(group) {
        return Err(fail(node, format!("channels: input {:?}, weight {:?}, group {group}", x.shape, w.shape)));
    }
    let out = match nd {
        1 => drop_1d(B::conv2d(
            lift_1d(x.t, &x.shape),
            lift_1d(w.t, &w.shape),
            bias,
            ConvOptions::new_with_padding([1, stride[0]], [(0, 0), pads[0]], [1, dil[0]], group),
        )),
        2 => B::conv2d(
            x.t,
            w.t,
            bias,
            ConvOptions::new_with_padding([stride[0], stride[1]], [pads[0], pads[1]], [dil[0], dil[1]], group),
        ),
        _ => B::conv3d(
            x.t,
            w.t,
            bias,
            ConvOptions::new_with_padding(
                [stride[0], stride[1], stride[2]],
                [pads[0], pads[1], pads[2]],
                [dil[0], dil[1], dil[2]],
                group,
            ),
        ),
    };
    Ok(vec![dv(out, x.dt)])
}

fn conv_transpose(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let w = ctx.dev(input(node, ins, 1)?);
    let bias = opt(ins, 2).map(|b| ctx.dev(b));
    let nd = x.shape.len().saturating_sub(2);
    if !(1..=3).contains(&nd) || w.shape.len() != nd + 2 {
        return Err(fail(node, format!("input rank {} / weight rank {}", x.shape.len(), w.shape.len())));
    }
    let kernel = &w.shape[2..];
    let stride = ints_or(node, "strides", nd, 1)?;
    let dil = ints_or(node, "dilations", nd, 1)?;
    let group = node.attr_i("group").unwrap_or(1).max(1) as usize;
    let mut out_pad: Vec<usize> = match node.attr_ints("output_padding") {
        Some(v) if v.len() == nd => v.iter().map(|&x| x.max(0) as usize).collect(),
        _ => vec![0; nd],
    };
    let full = |op: &[usize]| -> Vec<usize> {
        (0..nd).map(|i| (x.shape[2 + i] - 1) * stride[i] + (kernel[i] - 1) * dil[i] + 1 + op[i]).collect()
    };
    let auto = node.attr_s("auto_pad").unwrap_or("NOTSET");
    let split = |total: usize| {
        if auto == "SAME_LOWER" { (total - total / 2, total / 2) } else { (total / 2, total - total / 2) }
    };
    let pads: Vec<(usize, usize)> = if let Some(os) = node.attr_ints("output_shape").filter(|v| !v.is_empty()) {
        let os: Vec<usize> = os[os.len().saturating_sub(nd)..].iter().map(|&v| v.max(0) as usize).collect();
        // A requested shape beyond the full output is reached with output padding.
        let f = full(&out_pad);
        for i in 0..nd {
            out_pad[i] += os[i].saturating_sub(f[i]);
        }
        let f = full(&out_pad);
        (0..nd).map(|i| split(f[i] - os[i].min(f[i]))).collect()
    } else if auto == "SAME_UPPER" || auto == "SAME_LOWER" {
        let f = full(&out_pad);
        (0..nd).map(|i| split(f[i].saturating_sub(x.shape[2 + i] * stride[i]))).collect()
    } else {
        match node.attr_ints("pads") {
            Some(p) if p.len() == 2 * nd => {
                (0..nd).map(|i| (p[i].max(0) as usize, p[i + nd].max(0) as usize)).collect()
            }
            _ => vec![(0, 0); nd],
        }
    };
    if (0..nd).any(|i| out_pad[i] >= stride[i].max(dil[i])) {
        return Err(fail(
            node,
            format!("output padding {out_pad:?} not below strides {stride:?} or dilations {dil:?}"),
        ));
    }
    let o = match nd {
        1 => drop_1d(B::conv_transpose2d(
            lift_1d(x.t, &x.shape),
            lift_1d(w.t, &w.shape),
            None,
            ConvTransposeOptions::new([1, stride[0]], [0, 0], [0, out_pad[0]], [1, dil[0]], group),
        )),
        2 => B::conv_transpose2d(
            x.t,
            w.t,
            None,
            ConvTransposeOptions::new(
                [stride[0], stride[1]],
                [0, 0],
                [out_pad[0], out_pad[1]],
                [dil[0], dil[1]],
                group,
            ),
        ),
        _ => B::conv_transpose3d(
            x.t,
            w.t,
            None,
            ConvTransposeOptions::new(
                [stride[0], stride[1], stride[2]],
                [0, 0, 0],
                [out_pad[0], out_pad[1], out_pad[2]],
                [dil[0], dil[1], dil[2]],
                group,
            ),
        ),
    };
    let d = dims(&o);
    let mut sl = vec![Slice::full(), Slice::full()];
    for i in 0..nd {
        let (b, e) = pads[i];
        if b + e >= d[2 + i] {
            return Err(fail(node, format!("pads {pads:?} leave no output")));
        }
        sl.push(Slice::new(b as isize, Some((d[2 + i] - e) as isize), 1));
    }
    let o = B::float_slice(o, &sl);
    let o = match bias {
        Some(b) => {
            let c = b.shape.iter().product::<usize>();
            let mut s = vec![1; nd + 2];
            s[1] = c;
            B::float_add(o, reshape(b.t, &s))
        }
        None => o,
    };
    Ok(vec![dv(o, x.dt)])
}

/// Pooling geometry of one spatial dim.
#[derive(Clone, Copy)]
struct PoolDim {
    len: usize,
    k: usize,
    s: usize,
    d: usize,
    pads: (usize, usize),
    out: usize,
}

impl PoolDim {
    fn new(len: usize, k: usize, s: usize, d: usize, pads: (usize, usize), ceil: bool) -> Option<PoolDim> {
        let span = (k - 1) * d + 1;
        let room = (len + pads.0 + pads.1).checked_sub(span)?;
        let mut out = if ceil { room.div_ceil(s) } else { room / s } + 1;
        // A window must start inside the input or its leading pad (as onnxruntime and PyTorch).
        if ceil && (out - 1) * s >= len + pads.0 {
            out -= 1;
        }
        Some(PoolDim { len, k, s, d, pads, out })
    }

    /// Input position of tap `t` of output `o` (negative: in the leading pad).
    fn pos(&self, o: usize, t: usize) -> i64 {
        (o * self.s + t * self.d) as i64 - self.pads.0 as i64
    }
}

/// Pooling as a loop over the kernel's taps, each a strided slice of the padded input: any rank, dilations, and
/// the flat argmax indices of MaxPool. Burn's 2-D kernels serve the common cases.
fn pool_taps(
    ctx: &Ctx,
    node: &NodeProto,
    x: Dv,
    dims: &[PoolDim],
    max: bool,
    include: bool,
    indices: bool,
) -> Result<Vec<Val>> {
    let nd = dims.len();
    let (n, c) = (x.shape[0], x.shape[1]);
    let mut padding = vec![(0, 0), (0, 0)];
    for p in dims {
        let need = (p.out - 1) * p.s + (p.k - 1) * p.d + 1;
        padding.push((p.pads.0, need.saturating_sub(p.len + p.pads.0)));
    }
    let fill = if max { f32::NEG_INFINITY } else { 0.0 };
    let xp = B::float_pad(x.t, &padding, PadMode::Constant(fill));
    let mut out_shape = vec![n, c];
    out_shape.extend(dims.iter().map(|p| p.out));
    let spatial: Vec<usize> = dims.iter().map(|p| p.out).collect();
    let mut pos_shape = vec![1, 1];
    pos_shape.extend(&spatial);
    let taps: usize = dims.iter().map(|p| p.k).product();
    let col_major = node.attr_i("storage_order").unwrap_or(0) == 1;
    if indices && ctx.prec == super::Precision::F16 && x.shape.iter().product::<usize>() > 2048 {
        return Err(fail(node, "argmax indices beyond 2048 are not exact in f16 compute"));
    }
    let (mut acc, mut idx): (Option<T>, Option<T>) = (None, None);
    for tap in 0..taps {
        // The tap's offset per dim (row-major over the kernel).
        let mut rem = tap;
        let mut t = vec![0; nd];
        for i in (0..nd).rev() {
            t[i] = rem % dims[i].k;
            rem /= dims[i].k;
        }
        let mut sl = vec![Slice::full(), Slice::full()];
        for (i, p) in dims.iter().enumerate() {
            let start = t[i] * p.d;
            sl.push(Slice::new(start as isize, Some((start + (p.out - 1) * p.s + 1) as isize), p.s as isize));
        }
        let v = B::float_slice(xp.clone(), &sl);
        acc = Some(match acc {
            None => {
                if indices {
                    idx = Some(bcast_to(tap_index(ctx, dims, &t, &pos_shape, col_major)?, &out_shape));
                }
                v
            }
            Some(a) if max => {
                let better = B::float_greater(v.clone(), a.clone(), bool_dt(ctx));
                if let Some(i) = idx.take() {
                    idx = Some(B::float_mask_where(
                        i,
                        better.clone(),
                        bcast_to(tap_index(ctx, dims, &t, &pos_shape, col_major)?, &out_shape),
                    ));
                }
                B::float_mask_where(a, better, v)
            }
            Some(a) => B::float_add(a, v),
        });
    }
    let acc = acc.ok_or_else(|| fail(node, "empty kernel"))?;
    let y = if max {
        acc
    } else {
        // Divisor per output position: the taps inside the input (or inside input + pads), per dim, multiplied.
        let mut count = vec![1f32; spatial.iter().product()];
        for (j, cnt) in count.iter_mut().enumerate() {
            let mut rem = j;
            for i in (0..nd).rev() {
                let p = &dims[i];
                let o = rem % p.out;
                rem /= p.out;
                let hi = if include { (p.len + p.pads.1) as i64 } else { p.len as i64 };
                let lo = if include { -(p.pads.0 as i64) } else { 0 };
                *cnt *= (0..p.k).filter(|&t| (lo..hi).contains(&p.pos(o, t))).count() as f32;
            }
        }
        B::float_div(acc, ctx.upload(&Tensor::from_f32(pos_shape.clone(), count)?))
    };
    let mut outs = vec![dv_shaped(y, x.dt, out_shape.clone())];
    if let Some(i) = idx {
        // Flat index into the input: (n * C + c) * spatial size + spatial offset.
        let size: usize = dims.iter().map(|p| p.len).product();
        let base: Vec<f32> = (0..n * c).map(|b| (b * size) as f32).collect();
        let base = ctx.upload(&Tensor::from_f32(vec![n, c].into_iter().chain(vec![1; nd]).collect(), base)?);
        outs.push(dv_shaped(B::float_add(i, base), DType::I64, out_shape));
    }
    Ok(outs)
}

/// The spatial flat index of tap `t` at each output position (row-major over the input's spatial dims, or
/// column-major with `storage_order` 1).
fn tap_index(ctx: &Ctx, dims: &[PoolDim], t: &[usize], shape: &[usize], col_major: bool) -> Result<T> {
    let nd = dims.len();
    let outs: usize = dims.iter().map(|p| p.out).product();
    let mut strides = vec![1i64; nd];
    for i in 1..nd {
        if col_major {
            strides[i] = strides[i - 1] * dims[i - 1].len as i64;
        } else {
            strides[nd - 1 - i] = strides[nd - i] * dims[nd - i].len as i64;
        }
    }
    let mut v = vec![0f32; outs];
    for (j, e) in v.iter_mut().enumerate() {
        let (mut rem, mut flat) = (j, 0i64);
        for i in (0..nd).rev() {
            let p = &dims[i];
            let o = rem % p.out;
            rem /= p.out;
            flat += p.pos(o, t[i]).clamp(0, p.len as i64 - 1) * strides[i];
        }
        *e = flat as f32;
    }
    Ok(ctx.upload(&Tensor::from_f32(shape.to_vec(), v)?))
}

fn pool(ctx: &Ctx, node: &NodeProto, ins: Ins, max: bool) -> Result<Vec<Val>> {
    let indices = node.output.get(1).is_some_and(|o| !o.is_empty());
    let x = ctx.dev(input(node, ins, 0)?);
    let nd = x.shape.len().saturating_sub(2);
    let k = node.attr_ints("kernel_shape").ok_or_else(|| fail(node, "no kernel_shape"))?;
    if nd == 0 || k.len() != nd {
        return Err(fail(node, format!("kernel_shape {k:?} for input {:?}", x.shape)));
    }
    let kernel: Vec<usize> = k.iter().map(|&v| v.max(1) as usize).collect();
    let stride = ints_or(node, "strides", nd, 1)?;
    let dil = ints_or(node, "dilations", nd, 1)?;
    let ceil = node.attr_i("ceil_mode").unwrap_or(0) == 1;
    let include = node.attr_i("count_include_pad").unwrap_or(0) == 1;
    let pads = conv_pads(node, &x.shape[2..], &kernel, &stride, &dil)?;
    if nd > 2 || indices || (!max && dil.iter().any(|&d| d != 1)) {
        let dims = (0..nd)
            .map(|i| PoolDim::new(x.shape[2 + i], kernel[i], stride[i], dil[i], pads[i], ceil))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| fail(node, format!("kernel {kernel:?} larger than the padded input {:?}", x.shape)))?;
        return pool_taps(ctx, node, x, &dims, max, include, indices);
    }
    // Everything as 2-D.
    let (xt, kernel, stride, dil, pads) = if nd == 1 {
        let s = &x.shape;
        (lift_1d(x.t, s), vec![1, kernel[0]], vec![1, stride[0]], vec![1, dil[0]], vec![(0, 0), pads[0]])
    } else {
        (x.t, kernel, stride, dil, pads)
    };
    let symmetric = pads.iter().all(|p| p.0 == p.1);
    let out = if symmetric {
        let p = [pads[0].0, pads[1].0];
        if max {
            B::max_pool2d(xt, [kernel[0], kernel[1]], [stride[0], stride[1]], p, [dil[0], dil[1]], ceil)
        } else {
            B::avg_pool2d(xt, [kernel[0], kernel[1]], [stride[0], stride[1]], p, include, ceil)
        }
    } else {
        if ceil {
            return Err(fail(node, "asymmetric pads with ceil_mode"));
        }
        let padding = [(0, 0), (0, 0), pads[0], pads[1]];
        if max {
            let xp = B::float_pad(xt, &padding, PadMode::Constant(f32::NEG_INFINITY));
            B::max_pool2d(xp, [kernel[0], kernel[1]], [stride[0], stride[1]], [0, 0], [dil[0], dil[1]], false)
        } else {
            let shape = dims(&xt);
            let xp = B::float_pad(xt, &padding, PadMode::Constant(0.0));
            let sum = B::avg_pool2d(xp, [kernel[0], kernel[1]], [stride[0], stride[1]], [0, 0], true, false);
            if include {
                sum
            } else {
                let ones = B::float_pad(full_like(ctx, &shape, 1.0), &padding, PadMode::Constant(0.0));
                let cnt = B::avg_pool2d(ones, [kernel[0], kernel[1]], [stride[0], stride[1]], [0, 0], true, false);
                B::float_div(sum, cnt)
            }
        }
    };
    let out = if nd == 1 { drop_1d(out) } else { out };
    Ok(vec![dv(out, x.dt)])
}

fn global_pool(ctx: &Ctx, node: &NodeProto, ins: Ins, max: bool) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let mut t = x.t;
    for d in 2..x.shape.len() {
        t = if max { B::float_max_dim(t, d) } else { B::float_mean_dim(t, d) };
    }
    Ok(vec![dv(t, x.dt)])
}

fn gemm(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let a = ctx.dev(input(node, ins, 0)?);
    let b = ctx.dev(input(node, ins, 1)?);
    if a.shape.len() != 2 || b.shape.len() != 2 {
        return Err(fail(node, "Gemm needs 2-D operands"));
    }
    let at = if node.attr_i("transA").unwrap_or(0) == 1 { B::float_transpose(a.t) } else { a.t };
    let bt = if node.attr_i("transB").unwrap_or(0) == 1 { B::float_transpose(b.t) } else { b.t };
    let mut y = B::float_matmul(at, bt);
    let alpha = node.attr_f("alpha").unwrap_or(1.0);
    if alpha != 1.0 {
        y = B::float_mul_scalar(y, Scalar::from(alpha));
    }
    if let Some(c) = opt(ins, 2) {
        let beta = node.attr_f("beta").unwrap_or(1.0);
        let y_shape = dims(&y);
        let (yt, ct, _) = binary(ctx, &dv(y, a.dt), c);
        let ct = if beta != 1.0 { B::float_mul_scalar(ct, Scalar::from(beta)) } else { ct };
        y = reshape(B::float_add(yt, ct), &y_shape);
    }
    Ok(vec![dv(y, a.dt)])
}

fn matmul(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let a = ctx.dev(input(node, ins, 0)?);
    let b = ctx.dev(input(node, ins, 1)?);
    let (mut sa, mut sb) = (a.shape.clone(), b.shape.clone());
    if sa.is_empty() || sb.is_empty() {
        return Err(fail(node, "MatMul of a scalar"));
    }
    let (va, vb) = (sa.len() == 1, sb.len() == 1);
    if va {
        sa.insert(0, 1);
    }
    if vb {
        sb.push(1);
    }
    let r = sa.len().max(sb.len());
    while sa.len() < r {
        sa.insert(0, 1);
    }
    while sb.len() < r {
        sb.insert(0, 1);
    }
    let batch: Vec<usize> = (0..r - 2).map(|i| sa[i].max(sb[i])).collect();
    let mut ea = batch.clone();
    ea.extend_from_slice(&sa[r - 2..]);
    let mut eb = batch.clone();
    eb.extend_from_slice(&sb[r - 2..]);
    let at = reshape(a.t, &sa);
    let bt = reshape(b.t, &sb);
    let at = if sa != ea { B::float_expand(at, Shape::from(ea)) } else { at };
    let bt = if sb != eb { B::float_expand(bt, Shape::from(eb)) } else { bt };
    let y = B::float_matmul(at, bt);
    let mut out = batch;
    if !va {
        out.push(sa[r - 2]);
    }
    if !vb {
        out.push(sb[r - 1]);
    }
    Ok(vec![dv_shaped(y, a.dt, out)])
}

fn softmax_dim(t: T, d: usize, log: bool) -> T {
    let m = B::float_max_dim(t.clone(), d);
    let z = B::float_sub(t, m);
    let e = B::float_exp(z.clone());
    let s = B::float_sum_dim(e.clone(), d);
    if log { B::float_sub(z, B::float_log(s)) } else { B::float_div(e, s) }
}

fn softmax(ctx: &Ctx, node: &NodeProto, ins: Ins, log: bool) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let r = x.shape.len().max(1);
    if ctx.opset >= 13 {
        let a = axis(node, node.attr_i("axis").unwrap_or(-1), r)?;
        Ok(vec![dv_shaped(softmax_dim(x.t, a, log), x.dt, x.shape)])
    } else {
        // Before opset 13: the input is coerced to 2-D at `axis`.
        let a = axis(node, node.attr_i("axis").unwrap_or(1), r)?;
        let rows: usize = x.shape[..a].iter().product();
        let cols: usize = x.shape[a..].iter().product();
        let t = reshape(x.t, &[rows, cols]);
        Ok(vec![dv_shaped(softmax_dim(t, 1, log), x.dt, x.shape)])
    }
}

fn reduce(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let r = x.shape.len();
    let from_input = opt(ins, 1);
    let axes: Vec<i64> = match (node.attr_ints("axes"), from_input) {
        (_, Some(a)) => host_ints(node, a, "axes")?,
        (Some(a), None) => a.to_vec(),
        (None, None) => Vec::new(),
    };
    let keep = node.attr_i("keepdims").unwrap_or(1) == 1;
    if axes.is_empty() && node.attr_i("noop_with_empty_axes").unwrap_or(0) == 1 {
        return Ok(vec![Val::Dev(x)]);
    }
    let mut ax: Vec<usize> = if axes.is_empty() {
        (0..r).collect()
    } else {
        axes.iter().map(|&a| axis(node, a, r)).collect::<Result<_>>()?
    };
    ax.sort_unstable();
    ax.dedup();
    let shape: Vec<usize> =
        (0..r).filter_map(|i| if ax.contains(&i) { keep.then_some(1) } else { Some(x.shape[i]) }).collect();
    if ax.iter().any(|&a| x.shape[a] == 0) || shape.contains(&0) {
        // An empty reduction gives the identity of the reduction (or an empty tensor).
        let v = match node.op() {
            "ReduceMax" => f32::NEG_INFINITY,
            "ReduceMin" => f32::INFINITY,
            "ReduceMean" => f32::NAN,
            _ => 0.0,
        };
        let n = shape.iter().product();
        return Ok(vec![Val::host(Tensor::from_f32(shape, vec![v; n])?.cast(x.dt))]);
    }
    let mut t = x.t;
    for &a in &ax {
        t = match node.op() {
            "ReduceMean" => B::float_mean_dim(t, a),
            "ReduceSum" => B::float_sum_dim(t, a),
            "ReduceMax" => B::float_max_dim(t, a),
            "ReduceMin" => B::float_min_dim(t, a),
            _ => unreachable!("reduce op"),
        };
    }
    Ok(vec![dv_shaped(t, x.dt, shape)])
}

fn arg(ctx: &Ctx, node: &NodeProto, ins: Ins, max: bool) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let a = axis(node, node.attr_i("axis").unwrap_or(0), x.shape.len())?;
    // The last index of the extreme value: the first one along the flipped axis, mapped back.
    let last = node.attr_i("select_last_index").unwrap_or(0) == 1;
    let t = if last { B::float_flip(x.t, &[a]) } else { x.t };
    let idx = if max { B::float_argmax(t, a, IntDType::I32) } else { B::float_argmin(t, a, IntDType::I32) };
    let mut f = <B as burn_backend::ops::IntTensorOps<B>>::int_into_float(idx, ctx.float_dtype());
    if last {
        f = B::float_add_scalar(B::float_neg(f), Scalar::from((x.shape[a] - 1) as f32));
    }
    let mut shape = x.shape.clone();
    if node.attr_i("keepdims").unwrap_or(1) == 1 {
        shape[a] = 1;
    } else {
        shape.remove(a);
    }
    Ok(vec![dv_shaped(f, DType::I64, shape)])
}

fn reshape_op(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let spec: Vec<i64> = match opt(ins, 1) {
        Some(s) => host_ints(node, s, "the target shape")?,
        None => node.attr_ints("shape").map(<[i64]>::to_vec).ok_or_else(|| fail(node, "no shape"))?,
    };
    let allow_zero = node.attr_i("allowzero").unwrap_or(0) == 1;
    let total: usize = x.shape.iter().product();
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        match d {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            0 if !allow_zero => out.push(*x.shape.get(i).ok_or_else(|| fail(node, "0 beyond the input rank"))?),
            d if d >= 0 => out.push(d as usize),
            _ => return Err(fail(node, format!("bad target shape {spec:?}"))),
        }
    }
    if let Some(i) = infer {
        let known: usize = out.iter().product();
        if known == 0 || !total.is_multiple_of(known) {
            return Err(fail(node, format!("cannot reshape {:?} to {spec:?}", x.shape)));
        }
        out[i] = total / known;
    }
    if out.iter().product::<usize>() != total {
        return Err(fail(node, format!("cannot reshape {:?} to {out:?}", x.shape)));
    }
    Ok(vec![dv_shaped(x.t, x.dt, out)])
}

fn axes_of(node: &NodeProto, ins: Ins) -> Result<Option<Vec<i64>>> {
    Ok(match opt(ins, 1) {
        Some(a) => Some(host_ints(node, a, "axes")?),
        None => node.attr_ints("axes").map(<[i64]>::to_vec),
    })
}

fn squeeze(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let r = x.shape.len();
    let shape: Vec<usize> = match axes_of(node, ins)? {
        Some(a) => {
            let ax: Vec<usize> = a.iter().map(|&a| axis(node, a, r)).collect::<Result<_>>()?;
            if ax.iter().any(|&a| x.shape[a] != 1) {
                return Err(fail(node, format!("squeezing a dim that is not 1 in {:?}", x.shape)));
            }
            (0..r).filter(|i| !ax.contains(i)).map(|i| x.shape[i]).collect()
        }
        None => x.shape.iter().copied().filter(|&d| d != 1).collect(),
    };
    Ok(vec![dv_shaped(x.t, x.dt, shape)])
}

fn unsqueeze(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let a = axes_of(node, ins)?.ok_or_else(|| fail(node, "no axes"))?;
    let r = x.shape.len() + a.len();
    let mut ax: Vec<usize> = a.iter().map(|&v| axis(node, v, r)).collect::<Result<_>>()?;
    ax.sort_unstable();
    let mut shape = x.shape.clone();
    for &i in &ax {
        shape.insert(i, 1);
    }
    Ok(vec![dv_shaped(x.t, x.dt, shape)])
}

fn flatten(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let r = x.shape.len();
    let a = node.attr_i("axis").unwrap_or(1);
    let a = if a < 0 { a + r as i64 } else { a };
    if !(0..=r as i64).contains(&a) {
        return Err(fail(node, format!("axis {a}")));
    }
    let a = a as usize;
    let shape = vec![x.shape[..a].iter().product(), x.shape[a..].iter().product()];
    Ok(vec![dv_shaped(x.t, x.dt, shape)])
}

fn transpose(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let r = x.shape.len();
    let perm: Vec<usize> = match node.attr_ints("perm") {
        Some(p) => p.iter().map(|&v| axis(node, v, r)).collect::<Result<_>>()?,
        None => (0..r).rev().collect(),
    };
    if r <= 1 {
        return Ok(vec![Val::Dev(x)]);
    }
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    Ok(vec![dv_shaped(B::float_permute(x.t, &perm), x.dt, shape)])
}

fn concat(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let parts: Vec<Dv> = ins.iter().flatten().map(|v| ctx.dev(v)).collect();
    let first = parts.first().ok_or_else(|| fail(node, "no inputs"))?;
    let r = first.shape.len();
    let a = axis(node, node.attr_i("axis").ok_or_else(|| fail(node, "no axis"))?, r)?;
    let dt = first.dt;
    let mut shape = first.shape.clone();
    shape[a] = parts.iter().map(|p| p.shape.get(a).copied().unwrap_or(0)).sum();
    let live: Vec<T> = parts.into_iter().filter(|p| p.shape.iter().product::<usize>() > 0).map(|p| p.t).collect();
    if live.is_empty() {
        return Err(fail(node, "every input is empty"));
    }
    let t =
        if live.len() == 1 { live.into_iter().next().unwrap_or_else(|| unreachable!()) } else { B::float_cat(live, a) };
    Ok(vec![dv_shaped(t, dt, shape)])
}

fn slice(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let r = x.shape.len();
    let (starts, ends, axes, steps) = if ctx.opset >= 10 {
        let get = |i: usize, what: &str| opt(ins, i).map(|v| host_ints(node, v, what)).transpose();
        (
            get(1, "starts")?.ok_or_else(|| fail(node, "no starts"))?,
            get(2, "ends")?.ok_or_else(|| fail(node, "no ends"))?,
            get(3, "axes")?,
            get(4, "steps")?,
        )
    } else {
        let a = |n: &str| node.attr_ints(n).map(<[i64]>::to_vec);
        (a("starts").unwrap_or_default(), a("ends").unwrap_or_default(), a("axes"), None)
    };
    let axes: Vec<i64> = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(fail(node, "starts/ends/axes/steps lengths differ"));
    }
    let mut t = x.t;
    let mut slices = vec![Slice::full(); r];
    let mut shape = x.shape.clone();
    for i in 0..starts.len() {
        let a = axis(node, axes[i], r)?;
        let d = x.shape[a] as i64;
        let step = steps[i];
        if step == 0 {
            return Err(fail(node, "step 0"));
        }
        let norm = |v: i64| if v < 0 { v + d } else { v };
        if step > 0 {
            let s = norm(starts[i]).clamp(0, d);
            let e = norm(ends[i]).clamp(0, d);
            let n = if e > s { (e - s + step - 1) / step } else { 0 };
            shape[a] = n as usize;
            slices[a] = Slice::new(s as isize, Some((s + (n - 1).max(0) * step + 1).min(d) as isize), step as isize);
        } else {
            // Flip the axis and slice forwards: index j of the flipped axis is d-1-j.
            let s = norm(starts[i]).clamp(-1, d - 1);
            let e = norm(ends[i]).clamp(-1, d - 1);
            let n = if s > e { (s - e + (-step) - 1) / (-step) } else { 0 };
            shape[a] = n as usize;
            t = B::float_flip(t, &[a]);
            let fs = d - 1 - s;
            slices[a] =
                Slice::new(fs as isize, Some((fs + (n - 1).max(0) * (-step) + 1).min(d) as isize), -step as isize);
        }
    }
    if shape.contains(&0) {
        return Ok(vec![Val::host(Tensor::from_f32(shape, Vec::new())?.cast(x.dt))]);
    }
    Ok(vec![dv_shaped(B::float_slice(t, &slices), x.dt, shape)])
}

fn int_tensor(ctx: &Ctx, v: &[i64]) -> burn_wgpu::CubeTensor {
    let data = burn_backend::TensorData::new(v.iter().map(|&x| x as i32).collect::<Vec<i32>>(), [v.len()]);
    <B as burn_backend::ops::IntTensorOps<B>>::int_from_data(data, ctx.device)
}

fn gather(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let r = x.shape.len();
    let a = axis(node, node.attr_i("axis").unwrap_or(0), r)?;
    let iv = input(node, ins, 1)?;
    let ishape = iv.shape();
    let d = x.shape[a] as i64;
    let idx = match iv {
        Val::Host(h) => {
            let v = host_ints(node, iv, "indices")?;
            if let Some(bad) = v.iter().find(|&&i| i < -d || i >= d) {
                return Err(fail(node, format!("index {bad} out of range for {}", h.t.shape().len().max(d as usize))));
            }
            int_tensor(ctx, &v.iter().map(|&i| if i < 0 { i + d } else { i }).collect::<Vec<_>>())
        }
        _ => {
            let it = ctx.dev(iv);
            let n = it.shape.iter().product::<usize>().max(1);
            let flat = reshape(it.t, &[n]);
            let neg = b2f(ctx, B::float_lower_elem(flat.clone(), Scalar::from(0f32), bool_dt(ctx)));
            let fixed = B::float_add(flat, B::float_mul_scalar(neg, Scalar::from(d as f32)));
            B::float_into_int(fixed, IntDType::I32)
        }
    };
    let t = B::float_select(x.t, a, idx);
    let mut shape: Vec<usize> = x.shape[..a].to_vec();
    shape.extend_from_slice(&ishape);
    shape.extend_from_slice(&x.shape[a + 1..]);
    Ok(vec![dv_shaped(t, x.dt, shape)])
}

fn expand(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let target = host_ints(node, input(node, ins, 1)?, "the shape")?;
    let r = x.shape.len().max(target.len());
    let mut sx = vec![1; r - x.shape.len()];
    sx.extend_from_slice(&x.shape);
    let mut st = vec![1i64; r - target.len()];
    st.extend_from_slice(&target);
    let mut out = Vec::with_capacity(r);
    for i in 0..r {
        let (a, b) = (sx[i], st[i].max(0) as usize);
        out.push(match (a, b) {
            (a, b) if a == b => a,
            (1, b) => b,
            (a, 1) => a,
            _ => return Err(fail(node, format!("cannot expand {:?} to {target:?}", x.shape))),
        });
    }
    let t = reshape(x.t, &sx);
    let t = if sx != out { B::float_expand(t, Shape::from(out.clone())) } else { t };
    Ok(vec![dv_shaped(t, x.dt, out)])
}

fn tile(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let reps = host_ints(node, input(node, ins, 1)?, "repeats")?;
    if reps.len() != x.shape.len() || reps.iter().any(|&r| r < 1) {
        return Err(fail(node, format!("repeats {reps:?}")));
    }
    let mut t = x.t;
    let mut shape = x.shape.clone();
    for (d, &n) in reps.iter().enumerate() {
        if n > 1 {
            t = B::float_repeat_dim(t, d, n as usize);
            shape[d] *= n as usize;
        }
    }
    Ok(vec![dv_shaped(t, x.dt, shape)])
}

fn pad(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let r = x.shape.len();
    let (pads, value) = if ctx.opset >= 11 {
        let p = host_ints(node, input(node, ins, 1)?, "pads")?;
        let v = match opt(ins, 2) {
            Some(v) => host_floats(node, v, "constant_value")?.first().copied().unwrap_or(0.0),
            None => 0.0,
        };
        (p, v)
    } else {
        (node.attr_ints("pads").unwrap_or_default().to_vec(), node.attr_f("value").unwrap_or(0.0))
    };
    let axes: Vec<usize> = match opt(ins, 3) {
        Some(a) => host_ints(node, a, "axes")?.iter().map(|&a| axis(node, a, r)).collect::<Result<_>>()?,
        None => (0..r).collect(),
    };
    if pads.len() != 2 * axes.len() {
        return Err(fail(node, format!("pads {pads:?}")));
    }
    let mut padding = vec![(0i64, 0i64); r];
    for (i, &a) in axes.iter().enumerate() {
        padding[a] = (pads[i], pads[i + axes.len()]);
    }
    let mode = node.attr_s("mode").unwrap_or("constant");
    let mut t = x.t;
    let mut shape = x.shape.clone();
    // Negative pads crop first.
    if padding.iter().any(|p| p.0 < 0 || p.1 < 0) {
        let mut sl = vec![Slice::full(); r];
        for (d, &(b, e)) in padding.iter().enumerate() {
            let (cb, ce) = ((-b).max(0) as usize, (-e).max(0) as usize);
            if cb + ce > shape[d] {
                return Err(fail(node, format!("pads {pads:?} crop more than dim {d} holds")));
            }
            sl[d] = Slice::new(cb as isize, Some((shape[d] - ce) as isize), 1);
            shape[d] -= cb + ce;
        }
        t = B::float_slice(t, &sl);
    }
    let padding: Vec<(usize, usize)> = padding.iter().map(|&(b, e)| (b.max(0) as usize, e.max(0) as usize)).collect();
    if mode == "wrap" {
        // Each padded axis gathers its source index modulo the length.
        for (d, &(b, e)) in padding.iter().enumerate() {
            if b + e > 0 {
                let n = shape[d] as i64;
                let idx: Vec<i64> = (0..n + (b + e) as i64).map(|i| (i - b as i64).rem_euclid(n)).collect();
                t = B::float_select(t, d, int_tensor(ctx, &idx));
                shape[d] += b + e;
            }
        }
        return Ok(vec![dv_shaped(t, x.dt, shape)]);
    }
    let mode = match mode {
        "constant" => PadMode::Constant(value),
        "reflect" => PadMode::Reflect,
        "edge" => PadMode::Edge,
        m => return Err(fail(node, format!("mode {m}"))),
    };
    if padding.iter().all(|&p| p == (0, 0)) {
        return Ok(vec![dv_shaped(t, x.dt, shape)]);
    }
    let shape: Vec<usize> = (0..r).map(|i| shape[i] + padding[i].0 + padding[i].1).collect();
    Ok(vec![dv_shaped(B::float_pad(t, &padding, mode), x.dt, shape)])
}

/// The Resize attributes that shape the per-axis interpolation tables.
struct ResizeMode<'a> {
    mode: &'a str,
    ctm: &'a str,
    nearest: &'a str,
    cubic_a: f64,
    exclude_outside: bool,
    antialias: bool,
    extrapolation: f64,
}

/// Resize along one axis as a table: for each output index, source indices (clamped to the input, as the
/// reference's edge padding) with their weights, and a constant added (tf_crop_and_resize's extrapolation value
/// where the source falls outside the input). Follows the ONNX reference (`onnx.reference.ops.op_resize`).
struct Interp {
    taps: Vec<Vec<(i64, f64)>>,
    add: Vec<f64>,
}

impl ResizeMode<'_> {
    fn coeffs(&self, ratio: f64, scale: f64) -> Vec<f64> {
        let a = self.cubic_a;
        let cubic = |x: f64| {
            let x = x.abs();
            if x <= 1.0 {
                (a + 2.0) * x * x * x - (a + 3.0) * x * x + 1.0
            } else if x < 2.0 {
                a * x * x * x - 5.0 * a * x * x + 8.0 * a * x - 4.0 * a
            } else {
                0.0
            }
        };
        let normalized = |c: Vec<f64>| {
            let s: f64 = c.iter().sum();
            c.into_iter().map(|v| v / s).collect()
        };
        match self.mode {
            "nearest" if ratio == 1.0 => vec![0.0, 1.0],
            "nearest" => {
                let right = match self.nearest {
                    "round_prefer_ceil" => ratio >= 0.5,
                    "floor" => false,
                    "ceil" => true,
                    _ => ratio > 0.5,
                };
                if right { vec![0.0, 1.0] } else { vec![1.0, 0.0] }
            }
            "cubic" if self.antialias => {
                let s = scale.min(1.0);
                let start = (-2.0 / s).floor() as i64 + 1;
                normalized((start..2 - start).map(|i| cubic(s * (i as f64 - ratio))).collect())
            }
            "cubic" => (0..4).map(|k| cubic(ratio + 1.0 - k as f64)).collect(),
            _ if self.antialias => {
                let s = scale.min(1.0);
                let start = (-1.0 / s).floor() as i64 + 1;
                let n = 2 - 2 * start;
                normalized((start..start + n).map(|i| (1.0 - ((i as f64 - ratio) * s).abs()).clamp(0.0, 1.0)).collect())
            }
            _ => vec![1.0 - ratio, ratio],
        }
    }

    fn axis(&self, len_in: usize, len_out: usize, scale: f64, roi: (f64, f64)) -> Interp {
        let (lin, out_w) = (len_in as f64, scale * len_in as f64);
        let mut taps = Vec::with_capacity(len_out);
        let mut add = vec![0.0; len_out];
        for (x, extra) in add.iter_mut().enumerate() {
            let xf = x as f64;
            let x_ori = match self.ctm {
                "align_corners" if out_w == 1.0 => 0.0,
                "align_corners" => xf * (lin - 1.0) / (out_w - 1.0),
                "asymmetric" => xf / scale,
                "tf_crop_and_resize" => {
                    let v = if out_w == 1.0 {
                        (roi.1 - roi.0) * (lin - 1.0) / 2.0
                    } else {
                        xf * (roi.1 - roi.0) * (lin - 1.0) / (out_w - 1.0)
                    };
                    v + roi.0 * (lin - 1.0)
                }
                "pytorch_half_pixel" if out_w == 1.0 => -0.5,
                "half_pixel_symmetric" => {
                    let adjustment = len_out as f64 / out_w;
                    lin / 2.0 * (1.0 - adjustment) + (xf + 0.5) / scale - 0.5
                }
                _ => (xf + 0.5) / scale - 0.5,
            };
            if self.ctm == "tf_crop_and_resize" && (x_ori < 0.0 || x_ori > lin - 1.0) {
                taps.push(Vec::new());
                *extra = self.extrapolation;
                continue;
            }
            // The pixel left of x_ori (strictly: an integer x_ori is the right neighbour, ratio 1).
            let fl = x_ori.floor();
            let (ratio, left) = if x_ori == fl { (1.0, fl as i64 - 1) } else { (x_ori - fl, fl as i64) };
            let mut c = self.coeffs(ratio, scale);
            let first = left + 1 - c.len() as i64 / 2;
            if self.exclude_outside {
                for (k, v) in c.iter_mut().enumerate() {
                    if !(0..len_in as i64).contains(&(first + k as i64)) {
                        *v = 0.0;
                    }
                }
                let s: f64 = c.iter().sum();
                if s != 0.0 {
                    c.iter_mut().for_each(|v| *v /= s);
                }
            }
            let mut row: Vec<(i64, f64)> = Vec::new();
            for (k, w) in c.into_iter().enumerate() {
                let i = (first + k as i64).clamp(0, len_in as i64 - 1);
                match row.iter_mut().find(|(j, _)| *j == i) {
                    Some(e) => e.1 += w,
                    None => row.push((i, w)),
                }
            }
            row.retain(|&(_, w)| w != 0.0);
            taps.push(row);
        }
        Interp { taps, add }
    }
}

impl Interp {
    /// Every output index copies one input element: a gather.
    fn gather(&self) -> Option<Vec<i64>> {
        let one = |r: &Vec<(i64, f64)>| (r.len() == 1 && r[0].1 == 1.0).then_some(r[0].0);
        if self.add.iter().any(|&a| a != 0.0) {
            return None;
        }
        self.taps.iter().map(one).collect()
    }

    /// Applies the table along `axis` of `t` (shape `shape`, updated).
    fn apply(&self, ctx: &Ctx, t: T, axis: usize, shape: &mut [usize]) -> T {
        let len_out = self.taps.len();
        if let Some(idx) = self.gather() {
            if idx.len() == shape[axis] && idx.iter().enumerate().all(|(i, &j)| i as i64 == j) {
                return t;
            }
            shape[axis] = len_out;
            return B::float_select(t, axis, int_tensor(ctx, &idx));
        }
        let mut along = vec![1; shape.len()];
        along[axis] = len_out;
        let column = |v: Vec<f32>| ctx.upload(&Tensor::from_f32(along.clone(), v).unwrap_or_else(|_| unreachable!()));
        let n = self.taps.iter().map(Vec::len).max().unwrap_or(0);
        let mut acc: Option<T> = None;
        for k in 0..n {
            let idx: Vec<i64> = self.taps.iter().map(|r| r.get(k).map_or(0, |e| e.0)).collect();
            let w: Vec<f32> = self.taps.iter().map(|r| r.get(k).map_or(0.0, |e| e.1 as f32)).collect();
            let term = B::float_mul(B::float_select(t.clone(), axis, int_tensor(ctx, &idx)), column(w));
            acc = Some(match acc {
                Some(a) => B::float_add(a, term),
                None => term,
            });
        }
        shape[axis] = len_out;
        let acc = acc.unwrap_or_else(|| full_like(ctx, shape, 0.0));
        if self.add.iter().any(|&a| a != 0.0) {
            B::float_add(acc, column(self.add.iter().map(|&a| a as f32).collect()))
        } else {
            acc
        }
    }
}

fn resize(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let r = x.shape.len();
    let nonempty = |v: Option<Vec<f32>>| v.filter(|v| !v.is_empty());
    let (roi, scales, sizes) = if ctx.opset >= 11 {
        let roi = nonempty(opt(ins, 1).map(|v| host_floats(node, v, "roi")).transpose()?);
        let s = nonempty(opt(ins, 2).map(|v| host_floats(node, v, "scales")).transpose()?);
        let z = opt(ins, 3).map(|v| host_ints(node, v, "sizes")).transpose()?.filter(|v| !v.is_empty());
        (roi, s, z)
    } else {
        (None, Some(host_floats(node, input(node, ins, 1)?, "scales")?), None)
    };
    let axes: Vec<usize> = match node.attr_ints("axes") {
        Some(a) if !a.is_empty() => a.iter().map(|&a| axis(node, a, r)).collect::<Result<_>>()?,
        _ => (0..r).collect(),
    };
    let na = axes.len();
    let in_len = |i: usize| x.shape[axes[i]];
    let (scale, out): (Vec<f64>, Vec<usize>) = match (&sizes, &scales) {
        (Some(z), _) if z.len() == na => {
            if z.iter().any(|&v| v <= 0) {
                return Err(fail(node, format!("sizes {z:?}")));
            }
            let ratios: Vec<f64> = (0..na).map(|i| z[i] as f64 / in_len(i) as f64).collect();
            match node.attr_s("keep_aspect_ratio_policy").unwrap_or("stretch") {
                "stretch" => (ratios, z.iter().map(|&v| v as usize).collect()),
                policy => {
                    let pick = if policy == "not_larger" { f64::min } else { f64::max };
                    let s = ratios.iter().copied().reduce(pick).unwrap_or(1.0);
                    ((0..na).map(|_| s).collect(), (0..na).map(|i| (s * in_len(i) as f64 + 0.5) as usize).collect())
                }
            }
        }
        (_, Some(s)) if s.len() == na => {
            if s.iter().any(|&v| v.is_nan() || v <= 0.0) {
                return Err(fail(node, format!("scales {s:?}")));
            }
            (
                s.iter().map(|&v| v as f64).collect(),
                (0..na).map(|i| (in_len(i) as f64 * s[i] as f64) as usize).collect(),
            )
        }
        _ => return Err(fail(node, format!("needs {na} scales or sizes"))),
    };
    if out.contains(&0) {
        return Err(fail(node, format!("an empty output {out:?}")));
    }
    let roi = match roi {
        Some(v) if v.len() == 2 * na => (0..na).map(|i| (v[i] as f64, v[na + i] as f64)).collect(),
        Some(v) => return Err(fail(node, format!("roi of {} values for {na} axes", v.len()))),
        None => vec![(0.0, 1.0); na],
    };
    let mode = node.attr_s("mode").unwrap_or("nearest");
    if !matches!(mode, "nearest" | "linear" | "cubic") {
        return Err(fail(node, format!("mode {mode}")));
    }
    let old = ctx.opset < 11;
    let rm = ResizeMode {
        mode,
        ctm: node.attr_s("coordinate_transformation_mode").unwrap_or(if old { "asymmetric" } else { "half_pixel" }),
        nearest: node.attr_s("nearest_mode").unwrap_or(if old { "floor" } else { "round_prefer_floor" }),
        cubic_a: node.attr_f("cubic_coeff_a").unwrap_or(-0.75) as f64,
        exclude_outside: node.attr_i("exclude_outside").unwrap_or(0) != 0,
        antialias: mode != "nearest" && node.attr_i("antialias").unwrap_or(0) != 0,
        extrapolation: node.attr_f("extrapolation_value").unwrap_or(0.0) as f64,
    };
    if !matches!(
        rm.ctm,
        "half_pixel"
            | "half_pixel_symmetric"
            | "pytorch_half_pixel"
            | "align_corners"
            | "asymmetric"
            | "tf_crop_and_resize"
    ) {
        return Err(fail(node, format!("coordinate_transformation_mode {}", rm.ctm)));
    }
    // Separable: one table per axis, innermost axis first (the reference's order).
    let mut t = x.t;
    let mut shape = x.shape.clone();
    for i in (0..na).rev() {
        t = rm.axis(in_len(i), out[i], scale[i], roi[i]).apply(ctx, t, axes[i], &mut shape);
    }
    Ok(vec![dv_shaped(t, x.dt, shape)])
}

fn split(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let r = x.shape.len();
    let a = axis(node, node.attr_i("axis").unwrap_or(0), r)?;
    let d = x.shape[a];
    let n_out = node.output.len();
    let sizes: Vec<usize> = match (opt(ins, 1), node.attr_ints("split")) {
        (Some(s), _) => host_ints(node, s, "split")?.iter().map(|&v| v.max(0) as usize).collect(),
        (None, Some(s)) if !s.is_empty() => s.iter().map(|&v| v.max(0) as usize).collect(),
        _ => {
            let parts = node.attr_i("num_outputs").map(|v| v as usize).unwrap_or(n_out).max(1);
            let each = d.div_ceil(parts);
            (0..parts).map(|i| each.min(d.saturating_sub(i * each))).collect()
        }
    };
    if sizes.iter().sum::<usize>() != d || sizes.len() != n_out {
        return Err(fail(node, format!("split {sizes:?} of {d}")));
    }
    let mut outs = Vec::new();
    let mut at = 0;
    for s in sizes {
        let mut sl = vec![Slice::full(); r];
        sl[a] = Slice::new(at as isize, Some((at + s) as isize), 1);
        let mut shape = x.shape.clone();
        shape[a] = s;
        outs.push(dv_shaped(B::float_slice(x.t.clone(), &sl), x.dt, shape));
        at += s;
    }
    Ok(outs)
}

fn cast(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let to = if node.op() == "CastLike" {
        input(node, ins, 1)?.dtype()
    } else {
        node.attr_i("to")
            .and_then(|c| DType::from_onnx_code(c as i32))
            .ok_or_else(|| fail(node, "unsupported target type"))?
    };
    let is_float = |d: DType| matches!(d, DType::F32 | DType::F16 | DType::F64);
    let t = match to {
        DType::Bool => b2f(ctx, f2b(ctx, x.t)),
        d if !is_float(d) && is_float(x.dt) => B::float_trunc(x.t),
        _ => x.t,
    };
    Ok(vec![dv_shaped(t, to, x.shape)])
}

fn clip(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let (lo, hi) = if ctx.opset >= 11 {
        // Bounds computed on the device: max/min against a broadcast scalar tensor.
        if opt(ins, 1).is_some_and(|v| v.as_host().is_none()) || opt(ins, 2).is_some_and(|v| v.as_host().is_none()) {
            let mut t = x.t;
            for (i, lower) in [(1, true), (2, false)] {
                if let Some(b) = opt(ins, i) {
                    let (xt, bt, shape) = binary(ctx, &dv(t, x.dt), b);
                    let bt = bcast_to(bt, &shape);
                    let m = if lower {
                        B::float_lower(xt.clone(), bt.clone(), bool_dt(ctx))
                    } else {
                        B::float_greater(xt.clone(), bt.clone(), bool_dt(ctx))
                    };
                    t = B::float_mask_where(xt, m, bt);
                }
            }
            return Ok(vec![dv_shaped(t, x.dt, x.shape)]);
        }
        let get = |i| opt(ins, i).map(|v| host_floats(node, v, "a bound").map(|v| v.first().copied())).transpose();
        (get(1)?.flatten(), get(2)?.flatten())
    } else {
        (node.attr_f("min"), node.attr_f("max"))
    };
    let mut t = x.t;
    if let Some(lo) = lo {
        t = B::float_clamp_min(t, Scalar::from(lo));
    }
    if let Some(hi) = hi {
        t = B::float_clamp_max(t, Scalar::from(hi));
    }
    Ok(vec![dv_shaped(t, x.dt, x.shape)])
}

fn where_op(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let (c, a, b) = (input(node, ins, 0)?, input(node, ins, 1)?, input(node, ins, 2)?);
    let dt = a.dtype();
    let (ts, shape) = broadcast(ctx, &[c, a, b]);
    let [ct, at, bt]: [T; 3] = ts.try_into().unwrap_or_else(|_| unreachable!());
    let mask = f2b(ctx, bcast_to(ct, &shape));
    Ok(vec![dv_shaped(B::float_mask_where(bcast_to(bt, &shape), mask, bcast_to(at, &shape)), dt, shape)])
}

/// A scale or zero point shaped to broadcast against `x`: a scalar, one value per index of `axis`, or (with
/// `block_size`) one per block of `block_size` indices along `axis`, repeated over its block.
fn qparam(ctx: &Ctx, node: &NodeProto, v: &Val, x: &[usize]) -> Result<T> {
    let d = ctx.dev(v);
    let rank = x.len();
    let n = d.shape.iter().product::<usize>();
    if n == 1 {
        return Ok(reshape(d.t, &vec![1; rank.max(1)]));
    }
    let a = axis(node, node.attr_i("axis").unwrap_or(1), rank)?;
    let block = node.attr_i("block_size").unwrap_or(0);
    if block > 0 {
        let b = block as usize;
        let fits = d.shape.len() == rank
            && (0..rank).all(|i| if i == a { d.shape[i] == x[i].div_ceil(b) } else { d.shape[i] == x[i] });
        if !fits {
            return Err(fail(node, format!("blocked parameter of shape {:?} for input {x:?}", d.shape)));
        }
        let idx: Vec<i64> = (0..x[a]).map(|i| (i / b) as i64).collect();
        return Ok(B::float_select(d.t, a, int_tensor(ctx, &idx)));
    }
    if n != x[a] {
        return Err(fail(node, format!("{n} parameters for axis {a} of {x:?}")));
    }
    let mut s = vec![1; rank];
    s[a] = n;
    Ok(reshape(d.t, &s))
}

fn dequantize(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let s = qparam(ctx, node, input(node, ins, 1)?, &x.shape)?;
    let mut t = x.t;
    if let Some(z) = opt(ins, 2) {
        t = B::float_sub(t, qparam(ctx, node, z, &x.shape)?);
    }
    Ok(vec![dv_shaped(B::float_mul(t, s), DType::F32, x.shape)])
}

fn quantize(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let s = qparam(ctx, node, input(node, ins, 1)?, &x.shape)?;
    // The zero point's type, else the `output_dtype` attribute (opset 21), else uint8.
    let out_dt = opt(ins, 2)
        .map(Val::dtype)
        .or_else(|| node.attr_i("output_dtype").and_then(|c| DType::from_onnx_code(c as i32)));
    let (dt, lo, hi) = match out_dt {
        Some(DType::I8) => (DType::I8, -128.0, 127.0),
        Some(DType::U8) | None => (DType::U8, 0.0, 255.0),
        Some(DType::I16) => (DType::I16, -32768.0, 32767.0),
        Some(DType::U16) => (DType::U16, 0.0, 65535.0),
        Some(other) => return Err(fail(node, format!("{other} zero point"))),
    };
    // Division, not multiplication by the reciprocal; ties to even (WGSL `round`).
    let mut t = B::float_round(B::float_div(x.t, s));
    if let Some(z) = opt(ins, 2) {
        t = B::float_add(t, qparam(ctx, node, z, &x.shape)?);
    }
    let t = B::float_clamp(t, Scalar::from(lo), Scalar::from(hi));
    Ok(vec![dv_shaped(t, dt, x.shape)])
}

fn batchnorm(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let eps = node.attr_f("epsilon").unwrap_or(1e-5);
    let c = *x.shape.get(1).ok_or_else(|| fail(node, "input of rank < 2"))?;
    let params = (1..5).map(|i| input(node, ins, i)).collect::<Result<Vec<_>>>()?;
    if params.iter().any(|p| p.shape().iter().product::<usize>() != c) {
        return Err(fail(node, "parameter sizes"));
    }
    let mut s = vec![1; x.shape.len()];
    s[1] = c;
    let training = node.attr_i("training_mode").unwrap_or(0) != 0;
    if !training && params.iter().all(|p| p.as_host().is_some()) {
        // Known at load: one scale and one shift per channel.
        let get = |i: usize| host_floats(node, params[i], "a parameter");
        let (g, b, m, v) = (get(0)?, get(1)?, get(2)?, get(3)?);
        let a: Vec<f32> = (0..c).map(|i| g[i] / (v[i] + eps).sqrt()).collect();
        let sh: Vec<f32> = (0..c).map(|i| b[i] - m[i] * a[i]).collect();
        let at = ctx.upload(&Tensor::from_f32(s.clone(), a)?);
        let bt = ctx.upload(&Tensor::from_f32(s, sh)?);
        return Ok(vec![dv_shaped(B::float_add(B::float_mul(x.t, at), bt), x.dt, x.shape)]);
    }
    let p = |i: usize| reshape(ctx.dev(params[i]).t, &s);
    let (g, b, m, v) = (p(0), p(1), p(2), p(3));
    // Training mode normalises with the batch statistics (population variance) and also returns the updated
    // running statistics.
    let (mean, var) = if training {
        let per_channel = |t: T| (0..x.shape.len()).filter(|&d| d != 1).fold(t, B::float_mean_dim);
        let mean = per_channel(x.t.clone());
        let dev = B::float_sub(x.t.clone(), mean.clone());
        (mean, per_channel(B::float_mul(dev.clone(), dev)))
    } else {
        (m.clone(), v.clone())
    };
    let a = B::float_div(g, B::float_sqrt(B::float_add_scalar(var.clone(), Scalar::from(eps))));
    let y = B::float_add(B::float_mul(B::float_sub(x.t, mean.clone()), a), b);
    let mut outs = vec![dv_shaped(y, x.dt, x.shape)];
    if training {
        let mom = node.attr_f("momentum").unwrap_or(0.9);
        let run = |old: T, new: T| {
            B::float_add(B::float_mul_scalar(old, Scalar::from(mom)), B::float_mul_scalar(new, Scalar::from(1.0 - mom)))
        };
        outs.push(dv_shaped(run(m, mean), x.dt, vec![c]));
        outs.push(dv_shaped(run(v, var), x.dt, vec![c]));
    }
    Ok(outs)
}

fn unary(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let x = ctx.dev(input(node, ins, 0)?);
    let s = |v: f32| Scalar::from(v);
    let t = x.t;
    let out = match node.op() {
        "Relu" => B::float_clamp_min(t, s(0.0)),
        "Sigmoid" => {
            let e = B::float_exp(B::float_neg(t));
            B::float_recip(B::float_add_scalar(e, s(1.0)))
        }
        "Tanh" => B::float_tanh(t),
        "Exp" => B::float_exp(t),
        "Log" => B::float_log(t),
        "Sqrt" => B::float_sqrt(t),
        "Reciprocal" => B::float_recip(t),
        "Neg" => B::float_neg(t),
        "Abs" => B::float_abs(t),
        "Floor" => B::float_floor(t),
        "Ceil" => B::float_ceil(t),
        "Erf" => B::float_erf(t),
        "Sin" => B::float_sin(t),
        "Cos" => B::float_cos(t),
        "Identity" | "Dropout" => t,
        "Not" => b2f(ctx, B::float_equal_elem(t, s(0.0), bool_dt(ctx))),
        "LeakyRelu" => {
            let a = node.attr_f("alpha").unwrap_or(0.01);
            let neg = B::float_mul_scalar(B::float_clamp_max(t.clone(), s(0.0)), s(a));
            B::float_add(B::float_clamp_min(t, s(0.0)), neg)
        }
        "Elu" => {
            let a = node.attr_f("alpha").unwrap_or(1.0);
            let neg = B::float_mul_scalar(
                B::float_sub_scalar(B::float_exp(B::float_clamp_max(t.clone(), s(0.0))), s(1.0)),
                s(a),
            );
            B::float_add(B::float_clamp_min(t, s(0.0)), neg)
        }
        "Softplus" => {
            // log(1 + e^x) = max(x, 0) + log(1 + e^-|x|)
            let m = B::float_clamp_min(t.clone(), s(0.0));
            let l = B::float_log1p(B::float_exp(B::float_neg(B::float_abs(t))));
            B::float_add(m, l)
        }
        "HardSigmoid" | "HardSwish" => {
            let (a, b) = if node.op() == "HardSwish" {
                (1.0 / 6.0, 0.5)
            } else {
                (node.attr_f("alpha").unwrap_or(0.2), node.attr_f("beta").unwrap_or(0.5))
            };
            let h = B::float_clamp(B::float_add_scalar(B::float_mul_scalar(t.clone(), s(a)), s(b)), s(0.0), s(1.0));
            if node.op() == "HardSwish" { B::float_mul(t, h) } else { h }
        }
        op => return Err(fail(node, format!("{op} is not a unary op"))),
    };
    let dt = if node.op() == "Not" { DType::Bool } else { x.dt };
    Ok(vec![dv_shaped(out, dt, x.shape)])
}

fn bin_op(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let a = input(node, ins, 0)?;
    let b = input(node, ins, 1)?;
    let dt = a.dtype();
    let int = !matches!(dt, DType::F32 | DType::F16 | DType::F64);
    let (x, y, shape) = binary(ctx, a, b);
    let cmp = |m: burn_wgpu::CubeTensor| b2f(ctx, m);
    let (out, odt) = match node.op() {
        "Add" => (B::float_add(x, y), dt),
        "Sub" => (B::float_sub(x, y), dt),
        "Mul" => (B::float_mul(x, y), dt),
        "Div" if int => (B::float_trunc(B::float_div(x, y)), dt),
        "Div" => (B::float_div(x, y), dt),
        "Pow" => (B::float_powf(x, y), dt),
        "Equal" => (cmp(B::float_equal(x, y, bool_dt(ctx))), DType::Bool),
        "Greater" => (cmp(B::float_greater(x, y, bool_dt(ctx))), DType::Bool),
        "Less" => (cmp(B::float_lower(x, y, bool_dt(ctx))), DType::Bool),
        "GreaterOrEqual" => (cmp(B::float_greater_equal(x, y, bool_dt(ctx))), DType::Bool),
        "LessOrEqual" => (cmp(B::float_lower_equal(x, y, bool_dt(ctx))), DType::Bool),
        "And" => (B::float_mul(x, y), DType::Bool),
        "Or" => (B::float_clamp_max(B::float_add(x, y), Scalar::from(1f32)), DType::Bool),
        "PRelu" => {
            let neg = B::float_mul(B::float_clamp_max(x.clone(), Scalar::from(0f32)), y);
            (B::float_add(B::float_clamp_min(x, Scalar::from(0f32)), neg), dt)
        }
        op => return Err(fail(node, format!("{op} is not a binary op"))),
    };
    let out_shape = if node.op() == "PRelu" { a.shape() } else { shape };
    Ok(vec![dv_shaped(out, odt, out_shape)])
}

fn variadic(ctx: &Ctx, node: &NodeProto, ins: Ins) -> Result<Vec<Val>> {
    let vals: Vec<&Val> = ins.iter().flatten().collect();
    let first = *vals.first().ok_or_else(|| fail(node, "no inputs"))?;
    let dt = first.dtype();
    let mut acc = first.clone();
    for v in &vals[1..] {
        let (x, y, shape) = binary(ctx, &acc, v);
        let t = match node.op() {
            "Sum" | "Mean" => B::float_add(x, y),
            "Max" => {
                let m = B::float_greater(y.clone(), x.clone(), bool_dt(ctx));
                let (x, y) = (bcast_to(x, &shape), bcast_to(y, &shape));
                B::float_mask_where(x, m, y)
            }
            "Min" => {
                let m = B::float_lower(y.clone(), x.clone(), bool_dt(ctx));
                let (x, y) = (bcast_to(x, &shape), bcast_to(y, &shape));
                B::float_mask_where(x, m, y)
            }
            op => return Err(fail(node, format!("{op} is not variadic"))),
        };
        acc = dv_shaped(t, dt, shape);
    }
    if node.op() == "Mean" && vals.len() > 1 {
        let d = ctx.dev(&acc);
        acc = dv_shaped(B::float_div_scalar(d.t, Scalar::from(vals.len() as f32)), dt, d.shape);
    } else if vals.len() == 1 {
        let d = ctx.dev(&acc);
        acc = Val::Dev(d);
    }
    Ok(vec![acc])
}

/// `t` expanded to `shape` (same rank; a scalar result stays the `[1]` tensor that carries it).
fn bcast_to(t: T, shape: &[usize]) -> T {
    if dims(&t) == shape || shape.is_empty() { t } else { B::float_expand(t, Shape::from(shape.to_vec())) }
}

/// Outputs known on the host although the input is on the device (shapes).
pub(crate) fn host_result(node: &NodeProto, ins: &[Option<Val>]) -> Option<Vec<Val>> {
    let x = ins.first()?.as_ref()?;
    let shape: Vec<i64> = x.shape().iter().map(|&d| d as i64).collect();
    match node.op() {
        "Shape" => {
            let r = shape.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let s = clamp(node.attr_i("start").unwrap_or(0));
            let e = clamp(node.attr_i("end").unwrap_or(r));
            let v: Vec<i64> = if e > s { shape[s..e].to_vec() } else { Vec::new() };
            Tensor::new(vec![v.len()], TensorData::I64(v)).ok().map(|t| vec![Val::host(t)])
        }
        "Size" => Tensor::new(vec![], TensorData::I64(vec![shape.iter().product()])).ok().map(|t| vec![Val::host(t)]),
        _ => None,
    }
}

/// Runs one node on the device.
pub(crate) fn exec(ctx: &Ctx, node: &NodeProto, ins: &[Option<Val>]) -> Result<Vec<Val>> {
    let f = OPS
        .iter()
        .find(|(op, _)| *op == node.op())
        .map(|(_, f)| *f)
        .ok_or_else(|| fail(node, "not a GPU backend op"))?;
    let outs = f(ctx, node, ins)?;
    // Dropout's optional mask output.
    if node.op() == "Dropout" && node.output.len() > 1 {
        let mut outs = outs;
        if let Some(Val::Dev(d)) = outs.first() {
            let mask = full_like(ctx, &dims(&d.t), 1.0);
            outs.push(dv_shaped(mask, DType::Bool, d.shape.clone()));
        }
        return Ok(outs);
    }
    Ok(outs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_op_table_names_each_op_once_and_is_the_supported_list() {
        let mut names: Vec<&str> = OPS.iter().map(|(op, _)| *op).collect();
        assert_eq!(names, *SUPPORTED_OPS);
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), OPS.len(), "an op listed twice");
        // Ops that are folded on the host or refused still have an entry, so the load check and exec agree.
        for op in ["Shape", "Constant", "Relu", "Conv", "QuantizeLinear"] {
            assert!(SUPPORTED_OPS.contains(&op), "{op}");
        }
    }
}
