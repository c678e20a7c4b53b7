//! The `ai.edgepack` kernel nodes written by `onnx::qdq_kernels` (integer: NHWC uint8 in and out, except
//! `EpQuantize`: NCHW f32 in) and `onnx::f32_kernels` (float: NHWC f32 in and out), independent of any executor:
//! parsed from their ONNX attributes once (weights packed at load), output shapes, evaluation on slices. The tract
//! backend wraps them as tract ops (`cpu_ops`), the kernel interpreter (`interp`) calls them directly.
use edgepack_core::tensor::DType;
use edgepack_kernels::fconv::{Act, FChain, FConv, FConvSpec};
use edgepack_kernels::qconv::{QConv, QConvSpec};
use edgepack_kernels::qelem::{self, Pool2d};
use edgepack_kernels::reference::QParams;
use edgepack_kernels::{ConvGeometry, Isa, for_each_part};
use edgepack_onnx::{AttributeProto, NodeExt, NodeProto};

/// The node types of this module: the integer kernels' and the float kernels'.
pub fn ops() -> impl Iterator<Item = &'static str> {
    crate::qdq_kernels::OPS.into_iter().chain(crate::f32_kernels::OPS)
}

type Res<T> = std::result::Result<T, String>;

#[derive(Debug)]
pub enum Kernel {
    /// NHWC uint8 → uint8, or f32 `f32(acc)·s_x·s_w` with `float_out` (group 1).
    Conv {
        conv: QConv,
        float_out: bool,
    },
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
        isa: Isa,
    },
    Concat {
        tables: Vec<[u8; 256]>,
        isa: Isa,
    },
    /// `y = table[x]` on the channels `c0..c0 + cw` of the input (all of them without a window), upsampled by
    /// whole factors `[sh, sw]` (nearest): a quantized element-wise function, then a channel Split or a Resize.
    Table {
        table: Box<[u8; 256]>,
        window: Option<(usize, usize)>,
        scales: [usize; 2],
        isa: Isa,
    },
    Quantize {
        q: QParams,
        isa: Isa,
    },
    /// QuantizeLinear on any rank, no layout change (`EpQuantizeLinear`): f32 → uint8.
    QuantizeFlat {
        q: QParams,
        isa: Isa,
    },
    FConv(FConv),
    /// A group-1 convolution with a residual Add fused into its output stage (`EpConv(x, residual)`):
    /// `clamp(conv(x) + residual)`, the residual of the output's shape.
    FConvAdd(FConv),
    /// Convolutions writing their channels of one concatenated output (no separate Concat copy).
    FConvConcat(Vec<FConv>),
    /// `[1×1,] depthwise [, 1×1]` run row by row (`EpConvChain(x[, residual])`): an inverted-residual block whose
    /// wide middle tensors stay in cache; the residual is added in the last 1×1 convolution's output stage.
    FConvChain {
        chain: Box<FChain>,
        residual: bool,
    },
    /// `[N, K]` f32 → `[N, c_out]` f32 (a 1×1 convolution over `N` pixels).
    FGemm(FConv),
    /// `clamp(a + b)` (`[−∞, +∞]`: a plain sum); the clamp is the Relu or Clip after a residual Add.
    FAdd([f32; 2]),
    /// `x · s`, `s` one value per image and channel (`[n, 1, 1, c]`): a squeeze-and-excitation gate.
    FScale,
    FMaxPool(Pool2d, Isa),
    FConcat(usize),
    /// The channels `c0..c0 + cw` (`EpChannels`): one output of a channel Split.
    FChannels(usize, usize),
    FGlobalAvg,
    /// A transposed convolution whose stride is its kernel: one 1×1 convolution per kernel row to `kw·c_out`
    /// channels, each writing its output rows in place.
    /// `post`: the activation and affine, applied to the whole output after the rows (narrow rows).
    FConvTranspose {
        rows: Vec<FConv>,
        kw: usize,
        post: Option<(Act, Option<[f32; 2]>)>,
        isa: Isa,
    },
    /// Nearest-neighbour upsampling by whole factors `[sh, sw]`.
    FUpsample([usize; 2]),
    /// Softmax over the dimensions from `axis` on, flattened (rank any; a negative axis counts from the end):
    /// contiguous rows, outside the NHWC chains.
    FSoftmax {
        axis: i64,
    },
    /// NCHW → NHWC or back, uint8 or f32 (the chain boundaries of the layout pass).
    Layout {
        to_nhwc: bool,
    },
    /// Dynamic quantization's MatMul: `[.., K]` f32 → `[.., N]` f32. Each call quantizes its input to uint8 over
    /// its own range (DynamicQuantizeLinear's arithmetic), multiplies by the int8 weights on the integer GEMM and
    /// scales by `s_x·w_scale[n]` (+ bias), as DynamicQuantizeLinear → MatMulInteger → Cast → Mul (→ Add).
    DynGemm {
        /// `[N, K]` int8 weights as a 1×1 convolution (its multiplier unused: each call brings its own).
        conv: QConv,
        w_scale: Vec<f32>,
        bias: Option<Vec<f32>>,
        isa: Isa,
    },
}

/// DynamicQuantizeLinear's parameters for `x`: the range widened to hold 0, `scale = (max − min) / 255`,
/// `zero = round(−min / scale)` saturated (ONNX's definition, as onnxruntime computes it). `None` when every value
/// is 0 (a zero scale).
pub fn dynamic_qparams(x: &[f32]) -> Option<QParams> {
    // 16 running minima and maxima (the compare-and-select form compiles to vector min/max; NaNs are skipped).
    let (mut lo16, mut hi16) = ([0f32; 16], [0f32; 16]);
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            lo16[i] = if c[i] < lo16[i] { c[i] } else { lo16[i] };
            hi16[i] = if c[i] > hi16[i] { c[i] } else { hi16[i] };
        }
    }
    let (mut lo, mut hi) = (0f32, 0f32);
    for &v in lo16.iter().chain(tail) {
        lo = if v < lo { v } else { lo };
    }
    for &v in hi16.iter().chain(tail) {
        hi = if v > hi { v } else { hi };
    }
    let scale = (hi - lo) / 255.0;
    if !(scale.is_finite() && scale > 0.0) {
        return None;
    }
    let zero = (-lo / scale).round_ties_even().clamp(0.0, 255.0) as u8;
    Some(QParams { scale, zero })
}

fn dyn_gemm(node: &NodeProto) -> Res<Kernel> {
    let count = |name: &str| -> Res<usize> {
        let v = int(node, name)?;
        usize::try_from(v).map_err(|_| format!("{}: {name} = {v} is negative", node.name()))
    };
    let (k, n) = (count("c_in")?, count("c_out")?);
    let geom =
        ConvGeometry { c_in: k, c_out: n, group: 1, kernel: [1, 1], stride: [1, 1], dilation: [1, 1], pads: [0; 4] };
    let weights = raw(node, "weights", 3, n * k)?.iter().map(|&b| b as i8).collect();
    let w_scale = floats(raw(node, "w_scale", 1, n * 4)?);
    let bias = if node.attr("bias").is_some() { Some(floats(raw(node, "bias", 1, n * 4)?)) } else { None };
    let spec = QConvSpec { geom, z_x: 0, z_y: 0, weights, bias: None, multiplier: w_scale.clone() };
    let conv = QConv::new(spec, Isa::detect()).map_err(|e| format!("{}: {e}", node.name()))?;
    Ok(Kernel::DynGemm { conv, w_scale, bias, isa: Isa::detect() })
}

/// A dimension of a shape as an executor knows it: concrete (`usize`) or possibly symbolic (tract's `TDim`).
pub trait KernelDim: Clone + PartialEq + std::fmt::Debug {
    fn value(&self) -> Option<usize>;
    fn known(n: usize) -> Self;
}

impl KernelDim for usize {
    fn value(&self) -> Option<usize> {
        Some(*self)
    }
    fn known(n: usize) -> Self {
        n
    }
}

/// A kernel input or output: the two element types the kernels read and write.
pub enum Data<'a> {
    U8(&'a [u8]),
    F32(&'a [f32]),
}

pub enum DataMut<'a> {
    U8(&'a mut [u8]),
    F32(&'a mut [f32]),
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Res<&'a AttributeProto> {
    node.attr(name).ok_or_else(|| format!("{}: attribute {name} is missing", node.name()))
}

fn int(node: &NodeProto, name: &str) -> Res<i64> {
    let a = attr(node, name)?;
    // An INT attribute whose value is absent is 0 (proto3 writers, tract's among them, omit default values).
    a.i.or((a.r#type == Some(2)).then_some(0)).ok_or_else(|| format!("{}: attribute {name} is not an int", node.name()))
}

fn raw<'a>(node: &'a NodeProto, name: &str, dt: i32, len: usize) -> Res<&'a [u8]> {
    let t = attr(node, name)?.t.as_ref();
    match t {
        Some(t) if t.data_type == Some(dt) && t.raw_data.as_ref().is_some_and(|b| b.len() == len) => {
            Ok(t.raw_data.as_deref().unwrap_or_default())
        }
        _ => Err(format!("{}: attribute {name} is not a raw tensor of {len} bytes", node.name())),
    }
}

fn usizes<const N: usize>(node: &NodeProto, name: &str) -> Res<[usize; N]> {
    let v = node.attr_ints(name).unwrap_or_default();
    if v.len() != N || v.iter().any(|&x| x < 0) {
        return Err(format!("{}: attribute {name} must hold {N} non-negative ints", node.name()));
    }
    Ok(std::array::from_fn(|i| v[i] as usize))
}

fn byte(node: &NodeProto, name: &str) -> Res<u8> {
    let v = int(node, name)?;
    u8::try_from(v).map_err(|_| format!("{}: {name} = {v} is not a uint8 zero point", node.name()))
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes.as_chunks::<4>().0.iter().map(|c| f32::from_le_bytes(*c)).collect()
}

/// The geometry attributes every convolution kernel node carries (names suffixed with `sfx`).
fn geometry(node: &NodeProto, sfx: &str) -> Res<ConvGeometry> {
    let a = |name: &str| format!("{name}{sfx}");
    let count = |name: &str| -> Res<usize> {
        let v = int(node, &a(name))?;
        usize::try_from(v).map_err(|_| format!("{}: {name} = {v} is negative", node.name()))
    };
    Ok(ConvGeometry {
        c_in: count("c_in")?,
        c_out: count("c_out")?,
        group: count("group")?,
        kernel: usizes(node, &a("kernel_shape"))?,
        stride: usizes(node, &a("strides"))?,
        dilation: usizes(node, &a("dilations"))?,
        pads: usizes(node, &a("pads"))?,
    })
}

/// Weights per output channel.
fn per_out(g: &ConvGeometry) -> usize {
    (g.c_in / g.group.max(1)) * g.kernel[0] * g.kernel[1]
}

fn qconv(node: &NodeProto) -> Res<QConv> {
    let g = geometry(node, "")?;
    let weights = raw(node, "weights", 3, g.c_out * per_out(&g))?.iter().map(|&b| b as i8).collect();
    let multiplier = floats(raw(node, "multiplier", 1, g.c_out * 4)?);
    let bias = if node.attr("bias").is_some() {
        let b = raw(node, "bias", 6, g.c_out * 4)?;
        Some(b.as_chunks::<4>().0.iter().map(|c| i32::from_le_bytes(*c)).collect())
    } else {
        None
    };
    let spec = QConvSpec { geom: g, z_x: byte(node, "z_x")?, z_y: byte(node, "z_y")?, weights, bias, multiplier };
    let conv = QConv::new(spec, Isa::detect()).map_err(|e| format!("{}: {e}", node.name()))?;
    Ok(match node.attr("table") {
        Some(_) => conv.with_table(table(node, "table")?),
        None => conv,
    })
}

/// A 256-entry uint8 table attribute.
fn table(node: &NodeProto, name: &str) -> Res<[u8; 256]> {
    raw(node, name, 2, 256)?.try_into().map_err(|_| format!("{}: {name} must hold 256 bytes", node.name()))
}

fn qparams(node: &NodeProto, s: &str, z: &str) -> Res<QParams> {
    let scale = attr(node, s)?.f.ok_or_else(|| format!("{}: attribute {s} is not a float", node.name()))?;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(format!("{}: scale {s} = {scale} must be positive", node.name()));
    }
    Ok(QParams { scale, zero: byte(node, z)? })
}

fn pool2d(node: &NodeProto) -> Res<Pool2d> {
    let g = Pool2d {
        kernel: usizes(node, "kernel_shape")?,
        stride: usizes(node, "strides")?,
        pads: usizes(node, "pads")?,
        ceil_mode: int(node, "ceil_mode")? != 0,
    };
    if g.kernel.iter().chain(&g.stride).any(|&v| v == 0) {
        return Err(format!("{}: empty pooling window or stride", node.name()));
    }
    Ok(g)
}

/// The largest whole upsampling factor `EpUpsample` takes.
pub(crate) const LIMIT_SCALE: i64 = 1024;

/// A `[lo, hi]` clamp attribute (`None` when absent): two floats, `lo ≤ hi` (neither NaN).
fn clamp_attr(node: &NodeProto, name: &str) -> Res<Option<[f32; 2]>> {
    match node.attr(name).map(|a| a.floats.as_slice()) {
        None => Ok(None),
        Some(&[lo, hi]) if lo <= hi => Ok(Some([lo, hi])),
        Some(c) => Err(format!("{}: bad {name} {c:?} (two floats, lo ≤ hi)", node.name())),
    }
}

fn fconv(node: &NodeProto, sfx: &str) -> Res<FConv> {
    FConv::new(fconv_spec(node, sfx)?, Isa::detect()).map_err(|e| format!("{}: {e}", node.name()))
}

/// The convolution a kernel node's attributes (suffixed `sfx`) describe.
fn fconv_spec(node: &NodeProto, sfx: &str) -> Res<FConvSpec> {
    let a = |name: &str| format!("{name}{sfx}");
    let g = geometry(node, sfx)?;
    let bias =
        if node.attr(&a("bias")).is_some() { Some(floats(raw(node, &a("bias"), 1, g.c_out * 4)?)) } else { None };
    let clamp = clamp_attr(node, &a("clamp"))?.ok_or_else(|| format!("{}: no {}", node.name(), a("clamp")))?;
    let act = match node.attr_s(&a("act")) {
        None => Act::None,
        Some("silu") => Act::Silu,
        Some("sigmoid") => Act::Sigmoid,
        Some("hardswish") => Act::HardSwish,
        Some("hardsigmoid") => match attr(node, &a("act_params"))?.floats.as_slice() {
            &[alpha, beta] => Act::HardSigmoid { alpha, beta },
            _ => return Err(format!("{}: act_params must hold HardSigmoid's α and β", node.name())),
        },
        Some(other) => return Err(format!("{}: unknown activation {other:?}", node.name())),
    };
    let affine = match node.attr(&a("affine")).map(|t| t.floats.as_slice()) {
        None => None,
        Some(&[scale, shift]) => Some([scale, shift]),
        Some(_) => return Err(format!("{}: affine must hold 2 floats", node.name())),
    };
    Ok(FConvSpec {
        geom: g,
        weights: floats(raw(node, &a("weights"), 1, g.c_out * per_out(&g) * 4)?),
        bias,
        clamp,
        act,
        affine,
    })
}

impl Kernel {
    /// Parses a kernel node (`op` one of [`ops`]).
    pub fn parse(node: &NodeProto) -> Res<Kernel> {
        Ok(match node.op() {
            "EpQConv" => {
                let (conv, float_out) =
                    (qconv(node)?, node.attr("float_out").is_some() && int(node, "float_out")? != 0);
                if float_out && (conv.spec().geom.group != 1 || conv.table().is_some()) {
                    return Err(format!("{}: a float output needs a group-1 convolution without a table", node.name()));
                }
                Kernel::Conv { conv, float_out }
            }
            "EpQGemm" => Kernel::Gemm { conv: qconv(node)?, float_out: int(node, "float_out")? != 0 },
            "EpQAdd" => Kernel::Add {
                qa: qparams(node, "s_a", "z_a")?,
                qb: qparams(node, "s_b", "z_b")?,
                qc: qparams(node, "s_c", "z_c")?,
                isa: Isa::detect(),
            },
            "EpQMaxPool" => Kernel::MaxPool { g: pool2d(node)?, table: table(node, "table")?, isa: Isa::detect() },
            "EpQTable" => {
                let window = match node.attr("channels") {
                    Some(_) => {
                        let [c0, cw] = usizes(node, "channels")?;
                        Some((c0, cw))
                    }
                    None => None,
                };
                let scales = match node.attr("scales") {
                    Some(_) => usizes(node, "scales")?,
                    None => [1, 1],
                };
                if scales.iter().any(|&s| !(1..=LIMIT_SCALE as usize).contains(&s)) {
                    return Err(format!(
                        "{}: EpQTable scales {scales:?}: whole factors in 1..={LIMIT_SCALE}",
                        node.name()
                    ));
                }
                Kernel::Table { table: Box::new(table(node, "table")?), window, scales, isa: Isa::detect() }
            }
            "EpQConcat" => {
                let n = node.input.len();
                let tables = raw(node, "tables", 2, n * 256)?
                    .chunks_exact(256)
                    .map(|c| c.try_into().unwrap_or([0; 256]))
                    .collect();
                Kernel::Concat { tables, isa: Isa::detect() }
            }
            "EpQuantize" => Kernel::Quantize { q: qparams(node, "scale", "zero")?, isa: Isa::detect() },
            "EpQuantizeLinear" => Kernel::QuantizeFlat { q: qparams(node, "scale", "zero")?, isa: Isa::detect() },
            "EpDynGemm" => dyn_gemm(node)?,
            "EpConv" if node.input.len() == 2 => {
                let conv = fconv(node, "")?;
                if conv.spec().geom.group != 1 {
                    return Err(format!("{}: a residual is added by group-1 convolutions only", node.name()));
                }
                Kernel::FConvAdd(conv)
            }
            "EpConv" => Kernel::FConv(fconv(node, "")?),
            // Convolution `i` reads input `i`, its attributes carry the suffix `_i`.
            "EpConvConcat" => {
                let convs: Vec<FConv> =
                    (0..node.input.len()).map(|i| fconv(node, &format!("_{i}"))).collect::<Res<_>>()?;
                if convs.is_empty() {
                    return Err(format!("{}: no convolution", node.name()));
                }
                Kernel::FConvConcat(convs)
            }
            // Convolution `i` of `convs`, in order, carries the suffix `_i`; a second input is the residual.
            "EpConvChain" => {
                let n = usize::try_from(int(node, "convs")?).unwrap_or(0);
                if n > 3 {
                    return Err(format!("{}: {n} convolutions in a chain (at most 3)", node.name()));
                }
                let convs: Vec<FConv> = (0..n).map(|i| fconv(node, &format!("_{i}"))).collect::<Res<_>>()?;
                let chain = FChain::new(convs).map_err(|e| format!("{}: {e}", node.name()))?;
                let residual = node.input.len() == 2;
                if residual && !chain.has_post() {
                    return Err(format!("{}: a residual needs a chain ending in a 1×1 convolution", node.name()));
                }
                Kernel::FConvChain { chain: Box::new(chain), residual }
            }
            "EpGemm" => Kernel::FGemm(fconv(node, "")?),
            "EpAdd" => Kernel::FAdd(clamp_attr(node, "clamp")?.unwrap_or([f32::NEG_INFINITY, f32::INFINITY])),
            "EpScale" => Kernel::FScale,
            "EpMaxPool" => Kernel::FMaxPool(pool2d(node)?, Isa::detect()),
            "EpConcat" => Kernel::FConcat(node.input.len()),
            "EpChannels" => {
                let [c0, cw] = usizes(node, "channels")?;
                Kernel::FChannels(c0, cw)
            }
            "EpGlobalAveragePool" => Kernel::FGlobalAvg,
            "EpConvTranspose" => {
                let [kh, kw] = usizes(node, "kernel_shape")?;
                let c_out = usize::try_from(int(node, "c_out")?).unwrap_or(0);
                // Rows narrower than a vector (a one-channel head) apply the activation and affine in one pass over
                // the output afterwards, not on a few values of each tile.
                let mut post = None;
                let rows: Vec<FConv> = (0..kh)
                    .map(|i| {
                        let mut spec = fconv_spec(node, &format!("_{i}"))?;
                        if kw * c_out < 16 && (spec.act != Act::None || spec.affine.is_some()) {
                            post = Some((spec.act, spec.affine));
                            (spec.act, spec.affine) = (Act::None, None);
                        }
                        FConv::new(spec, Isa::detect()).map_err(|e| format!("{}: {e}", node.name()))
                    })
                    .collect::<Res<_>>()?;
                let fits = |c: &FConv| {
                    let g = &c.spec().geom;
                    g.group == 1
                        && g.kernel == [1, 1]
                        && g.stride == [1, 1]
                        && g.pads == [0; 4]
                        && g.c_in == rows[0].spec().geom.c_in
                        && Some(g.c_out) == kw.checked_mul(c_out)
                };
                if rows.is_empty() || c_out == 0 || !rows.iter().all(fits) {
                    return Err(format!("{}: EpConvTranspose rows do not make a {kh}x{kw} kernel", node.name()));
                }
                Kernel::FConvTranspose { rows, kw, post, isa: Isa::detect() }
            }
            "EpUpsample" => match node.attr_ints("scales") {
                Some(&[sh, sw]) if (1..=LIMIT_SCALE).contains(&sh) && (1..=LIMIT_SCALE).contains(&sw) => {
                    Kernel::FUpsample([sh as usize, sw as usize])
                }
                s => {
                    return Err(format!(
                        "{}: EpUpsample scales {s:?}: two whole factors in 1..={LIMIT_SCALE}",
                        node.name()
                    ));
                }
            },
            "EpSoftmax" => Kernel::FSoftmax {
                axis: node.attr_i("axis").ok_or_else(|| format!("{}: EpSoftmax without an axis", node.name()))?,
            },
            "EpLayout" => match node.attr_s("to") {
                Some("nhwc") => Kernel::Layout { to_nhwc: true },
                Some("nchw") => Kernel::Layout { to_nhwc: false },
                to => return Err(format!("{}: EpLayout to {to:?}: expected \"nhwc\" or \"nchw\"", node.name())),
            },
            op => return Err(format!("{}: {op} is not an edgepack kernel", node.name())),
        })
    }

    pub fn op_name(&self) -> &'static str {
        match self {
            Kernel::Conv { .. } => "EpQConv",
            Kernel::Gemm { .. } => "EpQGemm",
            Kernel::Add { .. } => "EpQAdd",
            Kernel::MaxPool { .. } => "EpQMaxPool",
            Kernel::Concat { .. } => "EpQConcat",
            Kernel::Table { .. } => "EpQTable",
            Kernel::Quantize { .. } => "EpQuantize",
            Kernel::QuantizeFlat { .. } => "EpQuantizeLinear",
            Kernel::FConv(_) | Kernel::FConvAdd(_) => "EpConv",
            Kernel::FConvConcat(_) => "EpConvConcat",
            Kernel::FConvChain { .. } => "EpConvChain",
            Kernel::FGemm(_) => "EpGemm",
            Kernel::FAdd(_) => "EpAdd",
            Kernel::FScale => "EpScale",
            Kernel::FMaxPool(..) => "EpMaxPool",
            Kernel::FConcat(_) => "EpConcat",
            Kernel::FChannels(..) => "EpChannels",
            Kernel::FGlobalAvg => "EpGlobalAveragePool",
            Kernel::FUpsample(_) => "EpUpsample",
            Kernel::FConvTranspose { .. } => "EpConvTranspose",
            Kernel::FSoftmax { .. } => "EpSoftmax",
            Kernel::Layout { .. } => "EpLayout",
            Kernel::DynGemm { .. } => "EpDynGemm",
        }
    }

    fn is_float(&self) -> bool {
        matches!(
            self,
            Kernel::FConv(_)
                | Kernel::FConvAdd(_)
                | Kernel::FConvConcat(_)
                | Kernel::FConvChain { .. }
                | Kernel::FGemm(_)
                | Kernel::FAdd(_)
                | Kernel::FScale
                | Kernel::FMaxPool(..)
                | Kernel::FConcat(_)
                | Kernel::FChannels(..)
                | Kernel::FGlobalAvg
                | Kernel::FUpsample(_)
                | Kernel::FConvTranspose { .. }
                | Kernel::FSoftmax { .. }
                | Kernel::DynGemm { .. }
        )
    }

    /// The element type of every input; `None` for `EpLayout` (u8 or f32, the output's type).
    pub fn input_type(&self) -> Option<DType> {
        match self {
            Kernel::Layout { .. } => None,
            k if k.is_float() || matches!(k, Kernel::Quantize { .. } | Kernel::QuantizeFlat { .. }) => Some(DType::F32),
            _ => Some(DType::U8),
        }
    }

    /// The output's element type; `None` for `EpLayout` (its input's).
    pub fn output_type(&self) -> Option<DType> {
        match self {
            Kernel::Layout { .. } => None,
            k if k.is_float()
                || matches!(k, Kernel::Gemm { float_out: true, .. } | Kernel::Conv { float_out: true, .. }) =>
            {
                Some(DType::F32)
            }
            _ => Some(DType::U8),
        }
    }

    /// Rank of every input and of the output; `None`: any rank, the output's the input's (`EpDynGemm` from 2,
    /// `EpSoftmax` from 1).
    pub fn rank(&self) -> Option<usize> {
        match self {
            Kernel::DynGemm { .. } | Kernel::FSoftmax { .. } | Kernel::QuantizeFlat { .. } => None,
            Kernel::Gemm { .. } | Kernel::FGemm(_) => Some(2),
            _ => Some(4),
        }
    }

    pub fn arity(&self) -> usize {
        match self {
            Kernel::Add { .. } | Kernel::FAdd(_) | Kernel::FConvAdd(_) | Kernel::FScale => 2,
            Kernel::Concat { tables, .. } => tables.len(),
            Kernel::FConcat(n) => *n,
            Kernel::FConvConcat(convs) => convs.len(),
            Kernel::FConvChain { residual, .. } => 1 + *residual as usize,
            _ => 1,
        }
    }

    /// Output shape from the input shapes (NHWC; `EpQuantize` reads NCHW). The batch dimension may be symbolic.
    pub fn out_shape<D: KernelDim>(&self, ins: &[Vec<D>]) -> Res<Vec<D>> {
        let name = self.op_name();
        if ins.len() != self.arity() {
            return Err(format!("{name}: expected {} inputs, got {}", self.arity(), ins.len()));
        }
        let x = &ins[0];
        let val = |d: &D| d.value().ok_or_else(|| format!("{name}: dimension {d:?} must be concrete"));
        if let Kernel::DynGemm { conv, .. } = self {
            let (k, n) = (conv.spec().geom.c_in, conv.spec().geom.c_out);
            match x.split_last() {
                Some((last, lead)) if !lead.is_empty() && val(last)? == k => {
                    return Ok(lead.iter().cloned().chain([D::known(n)]).collect());
                }
                _ => return Err(format!("{name}: input {x:?} does not end in {k} columns")),
            }
        }
        if let Kernel::QuantizeFlat { .. } = self {
            return Ok(x.clone());
        }
        if let Kernel::FSoftmax { axis } = self {
            softmax_axis(*axis, x.len()).ok_or_else(|| format!("{name}: axis {axis} outside rank {}", x.len()))?;
            return Ok(x.clone());
        }
        let rank = self.rank().unwrap_or(2);
        for s in ins {
            if s.len() != rank {
                return Err(format!("{name}: expected rank-{rank} inputs, got {s:?}"));
            }
        }
        let hw = |s: &Vec<D>| -> Res<(usize, usize)> { Ok((val(&s[1])?, val(&s[2])?)) };
        // [N, K] → [N, c_out].
        let rows = |k: usize, c_out: usize| -> Res<Vec<D>> {
            if val(&x[1])? != k {
                return Err(format!("{name}: input has {:?} columns, expected {k}", x[1]));
            }
            Ok(vec![x[0].clone(), D::known(c_out)])
        };
        // An image of `h`×`w` scaled by whole factors (at most 2^30 per side).
        let upsampled = |h: usize, w: usize, [sh, sw]: [usize; 2]| -> Res<(usize, usize)> {
            let big = || format!("{name}: {h}x{w} upsampled by {sh}x{sw} is too large");
            let side = |a: usize, b: usize| a.checked_mul(b).filter(|&v| v <= 1 << 30).ok_or_else(big);
            Ok((side(h, sh)?, side(w, sw)?))
        };
        // [N, H, W, c_in] → [N, OH, OW, c_out].
        type OutHw<'a> = &'a dyn Fn(usize, usize) -> Option<(usize, usize)>;
        let image = |c_in: usize, c_out: usize, out_hw: OutHw| -> Res<Vec<D>> {
            let (h, w) = hw(x)?;
            if val(&x[3])? != c_in {
                return Err(format!("{name}: input has {:?} channels, expected {c_in}", x[3]));
            }
            let (oh, ow) = out_hw(h, w).ok_or_else(|| format!("{name}: input {h}x{w} too small"))?;
            Ok(vec![x[0].clone(), D::known(oh), D::known(ow), D::known(c_out)])
        };
        Ok(match self {
            Kernel::FGemm(conv) => rows(conv.spec().geom.c_in, conv.spec().geom.c_out)?,
            Kernel::Gemm { conv, .. } => rows(conv.spec().geom.c_in, conv.spec().geom.c_out)?,
            Kernel::Conv { conv, .. } => {
                image(conv.spec().geom.c_in, conv.spec().geom.c_out, &|h, w| conv.output_hw(h, w))?
            }
            Kernel::FConv(conv) => image(conv.spec().geom.c_in, conv.spec().geom.c_out, &|h, w| conv.output_hw(h, w))?,
            Kernel::FConvAdd(conv) => {
                let out = image(conv.spec().geom.c_in, conv.spec().geom.c_out, &|h, w| conv.output_hw(h, w))?;
                if ins[1] != out {
                    return Err(format!("{name}: residual {:?} differs from the output {out:?}", ins[1]));
                }
                out
            }
            Kernel::FConvChain { chain, residual } => {
                let out = image(chain.c_in(), chain.c_out(), &|h, w| chain.output_hw(h, w))?;
                if *residual && ins[1] != out {
                    return Err(format!("{name}: residual {:?} differs from the output {out:?}", ins[1]));
                }
                out
            }
            Kernel::FConvConcat(convs) => {
                let mut out: Option<(usize, usize)> = None;
                for (conv, s) in convs.iter().zip(ins) {
                    if val(&s[3])? != conv.spec().geom.c_in {
                        return Err(format!("{name}: input {s:?} has the wrong channel count"));
                    }
                    let (h, w) = hw(s)?;
                    let o = conv.output_hw(h, w).ok_or_else(|| format!("{name}: input {h}x{w} too small"))?;
                    if out.is_some_and(|p| p != o) || s[0] != x[0] {
                        return Err(format!("{name}: outputs of different sizes"));
                    }
                    out = Some(o);
                }
                let (oh, ow) = out.unwrap_or((0, 0));
                let c: usize = convs.iter().map(|c| c.spec().geom.c_out).sum();
                vec![x[0].clone(), D::known(oh), D::known(ow), D::known(c)]
            }
            Kernel::Add { .. } | Kernel::FAdd(_) => {
                if ins[0] != ins[1] {
                    return Err(format!("{name}: inputs {:?} and {:?} differ (no broadcasting)", ins[0], ins[1]));
                }
                x.clone()
            }
            Kernel::FScale => {
                if ins[1] != [x[0].clone(), D::known(1), D::known(1), x[3].clone()] {
                    return Err(format!("{name}: gate {:?} is not one value per image and channel of {x:?}", ins[1]));
                }
                x.clone()
            }
            Kernel::MaxPool { g, .. } | Kernel::FMaxPool(g, _) => {
                let (h, w) = hw(x)?;
                let (oh, ow) = g.output_hw(h, w).ok_or_else(|| format!("{name}: input {h}x{w} too small"))?;
                vec![x[0].clone(), D::known(oh), D::known(ow), x[3].clone()]
            }
            Kernel::Concat { .. } | Kernel::FConcat(_) => {
                for s in &ins[1..] {
                    if s[..3] != x[..3] {
                        return Err(format!("{name}: inputs {x:?} and {s:?} differ outside the channel axis"));
                    }
                }
                let c: usize = ins.iter().map(|s| val(&s[3])).sum::<Res<usize>>()?;
                vec![x[0].clone(), x[1].clone(), x[2].clone(), D::known(c)]
            }
            Kernel::Quantize { .. } | Kernel::Layout { to_nhwc: true } => {
                vec![x[0].clone(), x[2].clone(), x[3].clone(), x[1].clone()]
            }
            Kernel::FGlobalAvg => vec![x[0].clone(), D::known(1), D::known(1), x[3].clone()],
            Kernel::FChannels(c0, cw) => {
                let c = val(&x[3])?;
                if c0.checked_add(*cw).is_none_or(|end| end > c) {
                    return Err(format!("{name}: channels {c0}..{c0}+{cw} outside {c}"));
                }
                vec![x[0].clone(), x[1].clone(), x[2].clone(), D::known(*cw)]
            }
            Kernel::Table { window, scales, .. } => {
                let (h, w) = hw(x)?;
                let c = val(&x[3])?;
                let cw = match window {
                    Some((c0, cw)) if c0.checked_add(*cw).is_some_and(|end| end <= c) => *cw,
                    Some(win) => return Err(format!("{name}: channel window {win:?} outside {c} channels")),
                    None => c,
                };
                let (oh, ow) = upsampled(h, w, *scales)?;
                vec![x[0].clone(), D::known(oh), D::known(ow), D::known(cw)]
            }
            Kernel::FConvTranspose { rows, kw, .. } => {
                let g = &rows[0].spec().geom;
                let (kh, c_out) = (rows.len(), g.c_out / kw);
                let (h, w) = hw(x)?;
                if val(&x[3])? != g.c_in {
                    return Err(format!("{name}: input has {:?} channels, expected {}", x[3], g.c_in));
                }
                let (oh, ow) = upsampled(h, w, [kh, *kw])?;
                vec![x[0].clone(), D::known(oh), D::known(ow), D::known(c_out)]
            }
            Kernel::FUpsample([sh, sw]) => {
                let (h, w) = hw(x)?;
                let (oh, ow) = upsampled(h, w, [*sh, *sw])?;
                vec![x[0].clone(), D::known(oh), D::known(ow), x[3].clone()]
            }
            Kernel::Layout { to_nhwc: false } => vec![x[0].clone(), x[3].clone(), x[1].clone(), x[2].clone()],
            Kernel::DynGemm { .. } | Kernel::FSoftmax { .. } | Kernel::QuantizeFlat { .. } => {
                unreachable!("answered above")
            }
        })
    }

    /// Runs the kernel: `inputs` with their shapes (checked by [`Kernel::out_shape`]), `y` of the output shape
    /// `out`, every element of which is written.
    pub fn eval(&self, inputs: &[(Data, &[usize])], out: &[usize], y: DataMut) -> Res<()> {
        let name = self.op_name();
        let x = inputs.first().ok_or_else(|| format!("{name}: no input"))?.1;
        let err = |e: String| format!("{name}: {e}");
        let wrong = || format!("{name}: unexpected element types");
        let f32s = |i: usize| match inputs.get(i) {
            Some((Data::F32(v), _)) => Ok(*v),
            _ => Err(wrong()),
        };
        let u8s = |i: usize| match inputs.get(i) {
            Some((Data::U8(v), _)) => Ok(*v),
            _ => Err(wrong()),
        };
        match (self, y) {
            (Kernel::Conv { conv, float_out: false }, DataMut::U8(y)) => {
                conv.run(u8s(0)?, x[0], x[1], x[2], y).map_err(err)?
            }
            (Kernel::Conv { conv, float_out: true }, DataMut::F32(y)) => {
                conv.run_f32(u8s(0)?, x[0], x[1], x[2], y).map_err(err)?
            }
            (Kernel::Gemm { conv, float_out: false }, DataMut::U8(y)) => {
                conv.run(u8s(0)?, x[0], 1, 1, y).map_err(err)?
            }
            (Kernel::Gemm { conv, float_out: true }, DataMut::F32(y)) => {
                conv.run_f32(u8s(0)?, x[0], 1, 1, y).map_err(err)?
            }
            (Kernel::Add { qa, qb, qc, isa }, DataMut::U8(y)) => {
                let (a, b) = (u8s(0)?, u8s(1)?);
                let parts = edgepack_kernels::threads().min(a.len() / 65536).max(1);
                for_each_range(y, parts, |r, o| qelem::qadd(*isa, &a[r.clone()], *qa, &b[r], *qb, *qc, o));
            }
            (Kernel::MaxPool { g, table, isa }, DataMut::U8(y)) => {
                qelem::maxpool(*isa, u8s(0)?, [x[0], x[1], x[2], x[3]], *g, table, y)
                    .ok_or_else(|| format!("{name}: a pooling window holds no input cell"))?;
            }
            (Kernel::Concat { tables, isa }, DataMut::U8(y)) => {
                let ins: Vec<(&[u8], usize, &[u8; 256])> = (0..inputs.len())
                    .zip(tables)
                    .map(|(i, tb)| Ok((u8s(i)?, inputs[i].1[3], tb)))
                    .collect::<Res<_>>()?;
                qelem::concat_channels(*isa, &ins, x[0] * x[1] * x[2], y);
            }
            (Kernel::Table { table, window, scales, isa }, DataMut::U8(y)) => {
                let win = window.unwrap_or((0, x[3]));
                qelem::lut_window(*isa, u8s(0)?, [x[0], x[1], x[2], x[3]], win, *scales, table, y);
            }
            (Kernel::QuantizeFlat { q, isa }, DataMut::U8(y)) => {
                let xs = f32s(0)?;
                let parts = edgepack_kernels::threads().min(xs.len() / 65536).max(1);
                for_each_range(y, parts, |r, o| qelem::quantize_slice(*isa, &xs[r], *q, o));
            }
            (Kernel::Quantize { q, isa }, DataMut::U8(y)) => {
                qelem::quantize_nchw_to_nhwc(*isa, f32s(0)?, [x[0], x[1], x[2], x[3]], *q, y);
            }
            (Kernel::FConv(conv), DataMut::F32(y)) => conv.run(f32s(0)?, x[0], x[1], x[2], y).map_err(err)?,
            (Kernel::FConvAdd(conv), DataMut::F32(y)) => {
                conv.run_add(f32s(0)?, [x[0], x[1], x[2]], f32s(1)?, y).map_err(err)?
            }
            (Kernel::FGemm(conv), DataMut::F32(y)) => conv.run(f32s(0)?, x[0], 1, 1, y).map_err(err)?,
            (Kernel::FConvChain { chain, residual }, DataMut::F32(y)) => {
                let res = if *residual { Some(f32s(1)?) } else { None };
                chain.run(f32s(0)?, [x[0], x[1], x[2]], res, y).map_err(err)?
            }
            (Kernel::FConvConcat(convs), DataMut::F32(y)) => {
                let mut offset = 0;
                for (i, conv) in convs.iter().enumerate() {
                    let s = inputs[i].1;
                    conv.run_into(f32s(i)?, [s[0], s[1], s[2]], y, out[3], offset).map_err(err)?;
                    offset += conv.spec().geom.c_out;
                }
            }
            (Kernel::FAdd(clamp), DataMut::F32(y)) => {
                let (a, b) = (f32s(0)?, f32s(1)?);
                let parts = (edgepack_kernels::threads() * 2).min(a.len() / 32_768).max(1);
                for_each_range(y, parts, |r, o| {
                    for ((o, &p), &q) in o.iter_mut().zip(&a[r.clone()]).zip(&b[r]) {
                        // `[−∞, +∞]` leaves the sum as it is (NaN too).
                        *o = edgepack_kernels::fconv::clampf(p + q, *clamp);
                    }
                });
            }
            (Kernel::FScale, DataMut::F32(y)) => {
                qelem::scale_channels_f32(f32s(0)?, f32s(1)?, x[0], x[1] * x[2], x[3], y)
            }
            (Kernel::FMaxPool(g, isa), DataMut::F32(y)) => {
                qelem::maxpool_f32(*isa, f32s(0)?, [x[0], x[1], x[2], x[3]], *g, y)
                    .ok_or_else(|| format!("{name}: a pooling window holds no input cell"))?;
            }
            (Kernel::FConcat(_), DataMut::F32(y)) => {
                let ins: Vec<(&[f32], usize)> =
                    (0..inputs.len()).map(|i| Ok((f32s(i)?, inputs[i].1[3]))).collect::<Res<_>>()?;
                qelem::concat_channels_f32(&ins, x[0] * x[1] * x[2], y);
            }
            (Kernel::FChannels(c0, cw), DataMut::F32(y)) => {
                qelem::channel_window(f32s(0)?, x[0] * x[1] * x[2], x[3], (*c0, *cw), y)
            }
            (Kernel::FGlobalAvg, DataMut::F32(y)) => {
                let (hw, c) = (x[1] * x[2], x[3]);
                if hw == 0 {
                    return Err(format!("{name}: empty image"));
                }
                qelem::global_avg_f32(f32s(0)?, x[0], hw, c, y);
            }
            (Kernel::FConvTranspose { rows, post, isa, .. }, DataMut::F32(y)) => {
                let (kh, wide) = (rows.len(), rows[0].spec().geom.c_out);
                // Output row `y·kh + dy` of image b is input row `r = b·h + y` times kernel row dy.
                let row = x[2] * wide;
                for (dy, conv) in rows.iter().enumerate() {
                    conv.run_pitched(f32s(0)?, [x[0], x[1], x[2]], y, [wide, kh * row, dy * row]).map_err(err)?;
                }
                if let Some((act, affine)) = post {
                    let parts = edgepack_kernels::threads().min(y.len() / 32_768).max(1);
                    for_each_range(y, parts, |_, o| act.apply_isa(*isa, *affine, o));
                }
            }
            (Kernel::FUpsample(s), DataMut::F32(y)) => {
                qelem::upsample_nearest_f32(f32s(0)?, [x[0], x[1], x[2], x[3]], *s, y)
            }
            (Kernel::FSoftmax { axis }, DataMut::F32(y)) => {
                let a = softmax_axis(*axis, x.len()).ok_or_else(|| format!("{name}: axis {axis} outside the rank"))?;
                qelem::softmax_rows(f32s(0)?, x[a..].iter().product(), y);
            }
            (Kernel::DynGemm { conv, w_scale, bias, isa }, DataMut::F32(y)) => {
                let xs = f32s(0)?;
                let (k, n) = (conv.spec().geom.c_in, conv.spec().geom.c_out);
                let rows = xs.len() / k.max(1);
                match dynamic_qparams(xs) {
                    // Every input 0: every product is 0.
                    None => y.fill(0.0),
                    Some(q) => {
                        let mut xq = vec![0u8; xs.len()];
                        let parts = edgepack_kernels::threads().min(xs.len() / 16384).max(1);
                        for_each_range(&mut xq, parts, |r, o| qelem::quantize_slice(*isa, &xs[r], q, o));
                        let m: Vec<f32> = w_scale.iter().map(|&s| q.scale * s).collect();
                        conv.run_f32_dynamic(&xq, rows, q.zero, &m, y).map_err(err)?;
                    }
                }
                if let Some(b) = bias {
                    for row in y.chunks_exact_mut(n) {
                        for (v, &bb) in row.iter_mut().zip(b) {
                            *v += bb;
                        }
                    }
                }
            }
            (Kernel::Layout { to_nhwc }, y) => {
                // Per image: [c, h·w] → [h·w, c] into NHWC, [h·w, c] → [c, h·w] back.
                let (rows, cols) = if *to_nhwc { (x[1], x[2] * x[3]) } else { (x[1] * x[2], x[3]) };
                match (&inputs[0].0, y) {
                    (Data::U8(v), DataMut::U8(y)) => qelem::transpose(v, x[0], rows, cols, y),
                    (Data::F32(v), DataMut::F32(y)) => qelem::transpose(v, x[0], rows, cols, y),
                    _ => return Err(wrong()),
                }
            }
            _ => return Err(wrong()),
        }
        Ok(())
    }
}

/// Softmax's first flattened dimension: `axis` in `-rank..rank` (negative from the end).
fn softmax_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
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
