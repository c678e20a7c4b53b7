//! tract ops running edgepack's kernels: the `ai.edgepack` nodes written by `onnx::qdq_kernels` (integer: NHWC
//! uint8 in and out, except `EpQuantize`: NCHW f32 in) and `onnx::f32_kernels` (float: NHWC f32 in and out). Parsed from their ONNX attributes once, with the
//! weights packed at load.
use std::sync::Arc;

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use crate::kernels::fconv::{FConv, FConvSpec};
use crate::kernels::qconv::{QConv, QConvSpec};
use crate::kernels::qelem::{self, Pool2d};
use crate::kernels::reference::QParams;
use crate::kernels::{Isa, for_each_part};

/// Adds the kernel ops to a tract ONNX op register.
pub fn register(reg: &mut OnnxOpRegister) {
    reg.insert("EpQConv", |_, node| op(Kernel::Conv(qconv(node)?)));
    reg.insert("EpQGemm", |_, node| {
        let float_out: i64 = node.get_attr("float_out")?;
        op(Kernel::Gemm { conv: qconv(node)?, float_out: float_out != 0 })
    });
    reg.insert("EpQAdd", parse_add);
    reg.insert("EpQMaxPool", parse_maxpool);
    reg.insert("EpQConcat", parse_concat);
    reg.insert("EpQuantize", parse_quantize);
    reg.insert("EpConv", parse_fconv);
    reg.insert("EpConvConcat", parse_fconv_concat);
    reg.insert("EpGemm", |_, node| op(Kernel::FGemm(fconv(node, "")?)));
    reg.insert("EpAdd", |_, _| op(Kernel::FAdd));
    reg.insert("EpMaxPool", |_, node| op(Kernel::FMaxPool(pool2d(node)?)));
    reg.insert("EpConcat", |_, node| op(Kernel::FConcat(node.input.len())));
    reg.insert("EpGlobalAveragePool", |_, _| op(Kernel::FGlobalAvg));
    reg.insert("EpLayout", |_, node| {
        let to: String = node.get_attr("to")?;
        ensure!(to == "nhwc" || to == "nchw", "{}: EpLayout to {to:?}: expected \"nhwc\" or \"nchw\"", node.name);
        op(Kernel::Layout { to_nhwc: to == "nhwc" })
    });
}

#[derive(Debug)]
enum Kernel {
    Conv(QConv),
    /// `[N, K]` uint8 → `[N, c_out]` uint8 or f32 (a 1×1 convolution over `N` pixels).
    Gemm {
        conv: QConv,
        float_out: bool,
    },
    Add {
        qa: QParams,
        qb: QParams,
        qc: QParams,
        isa: Isa,
    },
    MaxPool {
        g: Pool2d,
        table: [u8; 256],
    },
    Concat {
        tables: Vec<[u8; 256]>,
    },
    Quantize {
        q: QParams,
        isa: Isa,
    },
    FConv(FConv),
    /// Convolutions writing their channels of one concatenated output (no separate Concat copy).
    FConvConcat(Vec<FConv>),
    /// `[N, K]` f32 → `[N, c_out]` f32 (a 1×1 convolution over `N` pixels).
    FGemm(FConv),
    FAdd,
    FMaxPool(Pool2d),
    FConcat(usize),
    FGlobalAvg,
    /// NCHW → NHWC or back, uint8 or f32 (the chain boundaries of the layout pass).
    Layout {
        to_nhwc: bool,
    },
}

#[derive(Debug, Clone)]
struct EpOp(Arc<Kernel>);

impl PartialEq for EpOp {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for EpOp {}

fn raw<'a>(node: &'a NodeProto, name: &str, dt: i32, len: usize) -> TractResult<&'a [u8]> {
    let t: &tract_onnx::pb::TensorProto = node.get_attr(name)?;
    let bytes = t.raw_data.as_slice();
    ensure!(
        t.data_type == dt && bytes.len() == len,
        "{}: attribute {name} is not a raw tensor of {len} bytes",
        node.name
    );
    Ok(bytes)
}

fn usizes<const N: usize>(node: &NodeProto, name: &str) -> TractResult<[usize; N]> {
    let v: Vec<i64> = node.get_attr_vec(name)?;
    ensure!(
        v.len() == N && v.iter().all(|&x| x >= 0),
        "{}: attribute {name} must hold {N} non-negative ints",
        node.name
    );
    Ok(std::array::from_fn(|i| v[i] as usize))
}

fn byte(node: &NodeProto, name: &str) -> TractResult<u8> {
    let v: i64 = node.get_attr(name)?;
    u8::try_from(v).map_err(|_| format_err!("{}: {name} = {v} is not a uint8 zero point", node.name))
}

fn op(k: Kernel) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(EpExpansion(EpOp(Arc::new(k)))), vec![]))
}

/// The geometry attributes every convolution kernel node carries (names suffixed with `sfx`).
struct Geometry {
    c_in: usize,
    c_out: usize,
    group: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    pads: [usize; 4],
}

impl Geometry {
    fn parse(node: &NodeProto, sfx: &str) -> TractResult<Geometry> {
        let a = |name: &str| format!("{name}{sfx}");
        Ok(Geometry {
            c_in: node.get_attr(&a("c_in"))?,
            c_out: node.get_attr(&a("c_out"))?,
            group: node.get_attr(&a("group"))?,
            kernel: usizes(node, &a("kernel_shape"))?,
            stride: usizes(node, &a("strides"))?,
            dilation: usizes(node, &a("dilations"))?,
            pads: usizes(node, &a("pads"))?,
        })
    }

    /// Weights per output channel.
    fn per_out(&self) -> usize {
        (self.c_in / self.group.max(1)) * self.kernel[0] * self.kernel[1]
    }
}

fn has_attr(node: &NodeProto, name: &str) -> bool {
    node.attribute.iter().any(|a| a.name == name)
}

fn qconv(node: &NodeProto) -> TractResult<QConv> {
    let g = Geometry::parse(node, "")?;
    let weights = raw(node, "weights", 3, g.c_out * g.per_out())?.iter().map(|&b| b as i8).collect();
    let multiplier = floats(raw(node, "multiplier", 1, g.c_out * 4)?);
    let bias = if has_attr(node, "bias") {
        let b = raw(node, "bias", 6, g.c_out * 4)?;
        Some(b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    } else {
        None
    };
    let spec = QConvSpec {
        c_in: g.c_in,
        c_out: g.c_out,
        group: g.group,
        kernel: g.kernel,
        stride: g.stride,
        dilation: g.dilation,
        pads: g.pads,
        z_x: byte(node, "z_x")?,
        z_y: byte(node, "z_y")?,
        weights,
        bias,
        multiplier,
    };
    QConv::new(spec, Isa::detect()).map_err(|e| format_err!("{}: {e}", node.name))
}

fn qparams(node: &NodeProto, s: &str, z: &str) -> TractResult<QParams> {
    let scale: f32 = node.get_attr(s)?;
    ensure!(scale.is_finite() && scale > 0.0, "{}: scale {s} = {scale} must be positive", node.name);
    Ok(QParams { scale, zero: byte(node, z)? })
}

fn parse_add(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    op(Kernel::Add {
        qa: qparams(node, "s_a", "z_a")?,
        qb: qparams(node, "s_b", "z_b")?,
        qc: qparams(node, "s_c", "z_c")?,
        isa: Isa::detect(),
    })
}

fn pool2d(node: &NodeProto) -> TractResult<Pool2d> {
    let ceil: i64 = node.get_attr("ceil_mode")?;
    let g = Pool2d {
        kernel: usizes(node, "kernel_shape")?,
        stride: usizes(node, "strides")?,
        pads: usizes(node, "pads")?,
        ceil_mode: ceil != 0,
    };
    ensure!(g.kernel.iter().chain(&g.stride).all(|&v| v > 0), "{}: empty pooling window or stride", node.name);
    Ok(g)
}

fn parse_maxpool(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let g = pool2d(node)?;
    let table = raw(node, "table", 2, 256)?.try_into()?;
    op(Kernel::MaxPool { g, table })
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn parse_fconv(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    op(Kernel::FConv(fconv(node, "")?))
}

/// `EpConvConcat`: convolution `i` reads input `i`, its attributes carry the suffix `_i`.
fn parse_fconv_concat(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let convs: Vec<FConv> = (0..node.input.len()).map(|i| fconv(node, &format!("_{i}"))).collect::<TractResult<_>>()?;
    ensure!(!convs.is_empty(), "{}: no convolution", node.name);
    op(Kernel::FConvConcat(convs))
}

fn fconv(node: &NodeProto, sfx: &str) -> TractResult<FConv> {
    let a = |name: &str| format!("{name}{sfx}");
    let g = Geometry::parse(node, sfx)?;
    let bias = if has_attr(node, &a("bias")) { Some(floats(raw(node, &a("bias"), 1, g.c_out * 4)?)) } else { None };
    let clamp: Vec<f32> = node.get_attr_vec(&a("clamp"))?;
    ensure!(clamp.len() == 2, "{}: clamp must hold 2 floats", node.name);
    let spec = FConvSpec {
        c_in: g.c_in,
        c_out: g.c_out,
        group: g.group,
        kernel: g.kernel,
        stride: g.stride,
        dilation: g.dilation,
        pads: g.pads,
        weights: floats(raw(node, &a("weights"), 1, g.c_out * g.per_out() * 4)?),
        bias,
        clamp: [clamp[0], clamp[1]],
    };
    FConv::new(spec, Isa::detect()).map_err(|e| format_err!("{}: {e}", node.name))
}

fn parse_concat(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let n = node.input.len();
    let tables = raw(node, "tables", 2, n * 256)?.chunks_exact(256).map(|c| c.try_into().unwrap()).collect();
    op(Kernel::Concat { tables })
}

fn parse_quantize(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    op(Kernel::Quantize { q: qparams(node, "scale", "zero")?, isa: Isa::detect() })
}

impl EpOp {
    fn op_name(&self) -> &'static str {
        match &*self.0 {
            Kernel::Conv(_) => "EpQConv",
            Kernel::Gemm { .. } => "EpQGemm",
            Kernel::Add { .. } => "EpQAdd",
            Kernel::MaxPool { .. } => "EpQMaxPool",
            Kernel::Concat { .. } => "EpQConcat",
            Kernel::Quantize { .. } => "EpQuantize",
            Kernel::FConv(_) => "EpConv",
            Kernel::FConvConcat(_) => "EpConvConcat",
            Kernel::FGemm(_) => "EpGemm",
            Kernel::FAdd => "EpAdd",
            Kernel::FMaxPool(_) => "EpMaxPool",
            Kernel::FConcat(_) => "EpConcat",
            Kernel::FGlobalAvg => "EpGlobalAveragePool",
            Kernel::Layout { .. } => "EpLayout",
        }
    }

    fn is_float(&self) -> bool {
        matches!(
            &*self.0,
            Kernel::FConv(_)
                | Kernel::FConvConcat(_)
                | Kernel::FGemm(_)
                | Kernel::FAdd
                | Kernel::FMaxPool(_)
                | Kernel::FConcat(_)
                | Kernel::FGlobalAvg
        )
    }

    fn input_type(&self) -> DatumType {
        if self.is_float() || matches!(&*self.0, Kernel::Quantize { .. }) {
            f32::datum_type()
        } else {
            u8::datum_type()
        }
    }

    fn output_type(&self) -> DatumType {
        if self.is_float() || matches!(&*self.0, Kernel::Gemm { float_out: true, .. }) {
            f32::datum_type()
        } else {
            u8::datum_type()
        }
    }

    /// Rank of every input and of the output.
    fn rank(&self) -> usize {
        if matches!(&*self.0, Kernel::Gemm { .. } | Kernel::FGemm(_)) { 2 } else { 4 }
    }

    fn arity(&self) -> Option<usize> {
        match &*self.0 {
            Kernel::Add { .. } | Kernel::FAdd => Some(2),
            Kernel::Concat { tables } => Some(tables.len()),
            Kernel::FConcat(n) => Some(*n),
            Kernel::FConvConcat(convs) => Some(convs.len()),
            _ => Some(1),
        }
    }

    /// Output shape from the input shapes (NHWC; `EpQuantize` reads NCHW).
    fn out_shape(&self, ins: &[TVec<TDim>]) -> TractResult<TVec<TDim>> {
        let name = self.op_name();
        ensure!(Some(ins.len()) == self.arity(), "{name}: expected {:?} inputs, got {}", self.arity(), ins.len());
        let rank = self.rank();
        for s in ins {
            ensure!(s.len() == rank, "{name}: expected rank-{rank} inputs, got {s:?}");
        }
        let x = &ins[0];
        let hw = |s: &TVec<TDim>| -> TractResult<(usize, usize)> { Ok((s[1].to_usize()?, s[2].to_usize()?)) };
        // [N, K] → [N, c_out].
        let rows = |k: usize, c_out: usize| -> TractResult<TVec<TDim>> {
            ensure!(x[1].to_usize()? == k, "{name}: input has {} columns, expected {k}", x[1]);
            Ok(tvec![x[0].clone(), c_out.into()])
        };
        // [N, H, W, c_in] → [N, OH, OW, c_out].
        type OutHw<'a> = &'a dyn Fn(usize, usize) -> Option<(usize, usize)>;
        let image = |c_in: usize, c_out: usize, out_hw: OutHw| -> TractResult<TVec<TDim>> {
            let (h, w) = hw(x)?;
            ensure!(x[3].to_usize()? == c_in, "{name}: input has {} channels, expected {c_in}", x[3]);
            let (oh, ow) = out_hw(h, w).ok_or_else(|| format_err!("{name}: input {h}x{w} too small"))?;
            Ok(tvec![x[0].clone(), oh.into(), ow.into(), c_out.into()])
        };
        Ok(match &*self.0 {
            Kernel::FGemm(conv) => rows(conv.spec().c_in, conv.spec().c_out)?,
            Kernel::Gemm { conv, .. } => rows(conv.spec().c_in, conv.spec().c_out)?,
            Kernel::Conv(conv) => image(conv.spec().c_in, conv.spec().c_out, &|h, w| conv.output_hw(h, w))?,
            Kernel::FConv(conv) => image(conv.spec().c_in, conv.spec().c_out, &|h, w| conv.output_hw(h, w))?,
            Kernel::FConvConcat(convs) => {
                let mut out: Option<(usize, usize)> = None;
                for (conv, s) in convs.iter().zip(ins) {
                    ensure!(s[3].to_usize()? == conv.spec().c_in, "{name}: input {s:?} has the wrong channel count");
                    let (h, w) = hw(s)?;
                    let o = conv.output_hw(h, w).ok_or_else(|| format_err!("{name}: input {h}x{w} too small"))?;
                    ensure!(out.is_none_or(|p| p == o) && s[0] == x[0], "{name}: outputs of different sizes");
                    out = Some(o);
                }
                let (oh, ow) = out.unwrap_or((0, 0));
                let c: usize = convs.iter().map(|c| c.spec().c_out).sum();
                tvec![x[0].clone(), oh.into(), ow.into(), c.into()]
            }
            Kernel::Add { .. } | Kernel::FAdd => {
                ensure!(ins[0] == ins[1], "{name}: inputs {:?} and {:?} differ (no broadcasting)", ins[0], ins[1]);
                x.clone()
            }
            Kernel::MaxPool { g, .. } | Kernel::FMaxPool(g) => {
                let (h, w) = hw(x)?;
                let (oh, ow) = g.output_hw(h, w).ok_or_else(|| format_err!("{name}: input {h}x{w} too small"))?;
                tvec![x[0].clone(), oh.into(), ow.into(), x[3].clone()]
            }
            Kernel::Concat { .. } | Kernel::FConcat(_) => {
                for s in &ins[1..] {
                    ensure!(s[..3] == x[..3], "{name}: inputs {:?} and {s:?} differ outside the channel axis", x);
                }
                let c: TDim = ins.iter().map(|s| s[3].clone()).sum();
                tvec![x[0].clone(), x[1].clone(), x[2].clone(), c]
            }
            Kernel::Quantize { .. } | Kernel::Layout { to_nhwc: true } => {
                tvec![x[0].clone(), x[2].clone(), x[3].clone(), x[1].clone()]
            }
            Kernel::FGlobalAvg => tvec![x[0].clone(), 1.into(), 1.into(), x[3].clone()],
            Kernel::Layout { to_nhwc: false } => tvec![x[0].clone(), x[3].clone(), x[1].clone(), x[2].clone()],
        })
    }
}

fn slice<T: Datum>(t: &TValue) -> TractResult<&[T]> {
    t.try_as_plain_ram()?.as_slice::<T>()
}

impl Op for EpOp {
    fn name(&self) -> StaticName {
        self.op_name().into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}", self.0)])
    }

    op_as_typed_op!();
}

impl EvalOp for EpOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let name = self.op_name();
        let shapes: Vec<TVec<TDim>> = inputs.iter().map(|t| t.shape().iter().map(|&d| d.into()).collect()).collect();
        let out: Vec<usize> = self.out_shape(&shapes)?.iter().map(|d| Ok(d.to_usize()?)).collect::<TractResult<_>>()?;
        let x = inputs[0].shape().to_vec();
        let dt = if let Kernel::Layout { .. } = &*self.0 { inputs[0].datum_type() } else { self.output_type() };
        // SAFETY: every kernel below writes every output element.
        let mut y = unsafe { Tensor::uninitialized_dt(dt, &out)? };
        let mut view = y.try_as_plain_ram_mut()?;
        let err = |e: String| format_err!("{name}: {e}");
        match &*self.0 {
            Kernel::Conv(conv) => conv.run(slice(&inputs[0])?, x[0], x[1], x[2], view.as_slice_mut()?).map_err(err)?,
            Kernel::Gemm { conv, float_out: false } => {
                conv.run(slice(&inputs[0])?, x[0], 1, 1, view.as_slice_mut()?).map_err(err)?
            }
            Kernel::Gemm { conv, float_out: true } => {
                conv.run_f32(slice(&inputs[0])?, x[0], 1, 1, view.as_slice_mut()?).map_err(err)?
            }
            Kernel::Add { qa, qb, qc, isa } => {
                let (a, b) = (slice::<u8>(&inputs[0])?, slice::<u8>(&inputs[1])?);
                let parts = crate::kernels::threads().min(a.len() / 65536).max(1);
                for_each_range(view.as_slice_mut::<u8>()?, parts, |r, o| {
                    qelem::qadd(*isa, &a[r.clone()], *qa, &b[r], *qb, *qc, o)
                });
            }
            Kernel::MaxPool { g, table } => {
                qelem::maxpool(slice(&inputs[0])?, [x[0], x[1], x[2], x[3]], *g, table, view.as_slice_mut()?)
                    .ok_or_else(|| format_err!("{name}: a pooling window holds no input cell"))?;
            }
            Kernel::Concat { tables } => {
                let ins: Vec<(&[u8], usize, &[u8; 256])> = inputs
                    .iter()
                    .zip(tables)
                    .map(|(t, tb)| Ok((slice::<u8>(t)?, t.shape()[3], tb)))
                    .collect::<TractResult<_>>()?;
                qelem::concat_channels(&ins, x[0] * x[1] * x[2], view.as_slice_mut()?);
            }
            Kernel::Quantize { q, isa } => {
                let xs = inputs[0].cast_to::<f32>()?;
                let xs = xs.try_as_plain_ram()?;
                qelem::quantize_nchw_to_nhwc(
                    *isa,
                    xs.as_slice::<f32>()?,
                    [x[0], x[1], x[2], x[3]],
                    *q,
                    view.as_slice_mut()?,
                );
            }
            Kernel::FConv(conv) => conv.run(slice(&inputs[0])?, x[0], x[1], x[2], view.as_slice_mut()?).map_err(err)?,
            Kernel::FGemm(conv) => conv.run(slice(&inputs[0])?, x[0], 1, 1, view.as_slice_mut()?).map_err(err)?,
            Kernel::FConvConcat(convs) => {
                let ys = view.as_slice_mut::<f32>()?;
                let mut offset = 0;
                for (conv, t) in convs.iter().zip(&inputs) {
                    let s = t.shape();
                    conv.run_into(slice(t)?, [s[0], s[1], s[2]], ys, out[3], offset).map_err(err)?;
                    offset += conv.spec().c_out;
                }
            }
            Kernel::FAdd => {
                let (a, b) = (slice::<f32>(&inputs[0])?, slice::<f32>(&inputs[1])?);
                let parts = (crate::kernels::threads() * 2).min(a.len() / 32_768).max(1);
                for_each_range(view.as_slice_mut::<f32>()?, parts, |r, o| {
                    for ((o, &p), &q) in o.iter_mut().zip(&a[r.clone()]).zip(&b[r]) {
                        *o = p + q;
                    }
                });
            }
            Kernel::FMaxPool(g) => {
                qelem::maxpool_f32(slice(&inputs[0])?, [x[0], x[1], x[2], x[3]], *g, view.as_slice_mut()?)
                    .ok_or_else(|| format_err!("{name}: a pooling window holds no input cell"))?;
            }
            Kernel::FConcat(_) => {
                let ins: Vec<(&[f32], usize)> =
                    inputs.iter().map(|t| Ok((slice::<f32>(t)?, t.shape()[3]))).collect::<TractResult<_>>()?;
                qelem::concat_channels_f32(&ins, x[0] * x[1] * x[2], view.as_slice_mut()?);
            }
            Kernel::FGlobalAvg => {
                let xs = slice::<f32>(&inputs[0])?;
                let (hw, c) = (x[1] * x[2], x[3]);
                ensure!(hw > 0, "{name}: empty image");
                for (b, o) in view.as_slice_mut::<f32>()?.chunks_exact_mut(c).enumerate() {
                    o.fill(0.0);
                    for p in xs[b * hw * c..(b + 1) * hw * c].chunks_exact(c) {
                        for (a, &v) in o.iter_mut().zip(p) {
                            *a += v;
                        }
                    }
                    for a in o.iter_mut() {
                        *a /= hw as f32;
                    }
                }
            }
            Kernel::Layout { to_nhwc } => {
                // Per image: [c, h·w] → [h·w, c] into NHWC, [h·w, c] → [c, h·w] back.
                let (rows, cols) = if *to_nhwc { (x[1], x[2] * x[3]) } else { (x[1] * x[2], x[3]) };
                let t = &inputs[0];
                if dt == u8::datum_type() {
                    qelem::transpose(slice::<u8>(t)?, x[0], rows, cols, view.as_slice_mut()?);
                } else {
                    qelem::transpose(slice::<f32>(t)?, x[0], rows, cols, view.as_slice_mut()?);
                }
            }
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

/// `f(range, out[range])` for `parts` consecutive ranges of an element-wise output, split across the kernel pool.
fn for_each_range<T: Send + Sync>(out: &mut [T], parts: usize, f: impl Fn(std::ops::Range<usize>, &mut [T]) + Sync) {
    let len = out.len();
    let per = len.div_ceil(parts.max(1));
    let addr = out.as_mut_ptr() as usize;
    for_each_part(parts, |p| {
        let r = (p * per).min(len)..((p + 1) * per).min(len);
        // SAFETY: the ranges are disjoint, so each part owns its slice of the output.
        let o = unsafe { std::slice::from_raw_parts_mut((addr as *mut T).add(r.start), r.len()) };
        f(r, o);
    });
}

impl TypedOp for EpOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        if let Kernel::Layout { .. } = &*self.0 {
            let dt = inputs.first().map(|f| f.datum_type).ok_or_else(|| format_err!("EpLayout: no input"))?;
            ensure!(dt == u8::datum_type() || dt == f32::datum_type(), "EpLayout: expected u8 or f32, got {dt:?}");
            let shapes: Vec<TVec<TDim>> = inputs.iter().map(|f| f.shape.to_tvec()).collect();
            return Ok(tvec!(dt.fact(self.out_shape(&shapes)?)));
        }
        let want = self.input_type();
        for i in inputs {
            ensure!(i.datum_type == want, "{}: expected {want:?} inputs, got {:?}", self.op_name(), i.datum_type);
        }
        let shapes: Vec<TVec<TDim>> = inputs.iter().map(|f| f.shape.to_tvec()).collect();
        Ok(tvec!(self.output_type().fact(self.out_shape(&shapes)?)))
    }

    as_op!();
}

#[derive(Debug, Clone)]
struct EpExpansion(EpOp);

impl Expansion for EpExpansion {
    fn name(&self) -> StaticName {
        self.0.op_name().into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, 1)?;
        if let Some(n) = self.0.arity() {
            check_input_arity(inputs, n)?;
        }
        if let Kernel::Layout { .. } = &*self.0.0 {
            s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        } else {
            s.equals(&outputs[0].datum_type, self.0.output_type())?;
        }
        let rank = self.0.rank() as i64;
        s.equals(&outputs[0].rank, rank)?;
        for i in inputs {
            s.equals(&i.rank, rank)?;
        }
        s.given_all(inputs.iter().map(|i| &i.shape), move |s, shapes| {
            let shapes: Vec<TVec<TDim>> = shapes.into_iter().map(|s| s.into_iter().collect()).collect();
            if let Ok(out) = self.0.out_shape(&shapes) {
                s.equals(&outputs[0].shape, ShapeFactoid::from(out))?;
            }
            Ok(())
        })
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.0.clone(), inputs)
    }
}
