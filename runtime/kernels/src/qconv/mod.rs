//! Quantized 2-D convolution on NHWC uint8 activations, int8 weights, int32 accumulation, requantization fused
//! into the output stage. Same arithmetic as [`super::reference::qconv2d`] (tested element for element).
//!
//! The zero point of `x` is folded into the bias once (`b'[o] = b[o] − z_x·Σ w[o]`), padding reads `z_x`, so the
//! inner loops multiply raw bytes:
//! - **GEMM** (`group == 1`): `y[p, o] = Σ_k x̂[p, k]·w[k, o]` with `k = (ky·kw + kx)·c_in + c`. A 1×1, stride-1,
//!   unpadded convolution reads the activation rows directly (no im2col); others gather rows of 48 output
//!   pixels into a small buffer. Weights are packed once in blocks of up to 64 output channels, 4 consecutive
//!   `k` per 32-bit lane (the VNNI `dpbusd` layout).
//! - **Depthwise** (`group == c_in == c_out`): direct, vectorised over channels. Each output row reads its `kh`
//!   input rows through pointers: rows inside the image in place (or, with left/right padding, copied once into a
//!   small ring of zero-point-padded rows), rows in the top/bottom padding from one row of `z_x`. With VNNI, four
//!   taps are interleaved per 32-bit lane (two byte/word unpacks) so one `vpdpbusd` does 64 channels × 4 taps.
#[cfg(target_arch = "aarch64")]
pub(crate) mod aarch64;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;
use super::{ConvGeometry, Isa, for_each_part, requant};

// The window geometry and im2col are shared with the float convolution (`fconv`).

/// A convolution as the QDQ pass writes it (the graph-level description).
#[derive(Debug, Clone, PartialEq)]
pub struct QConvSpec {
    pub geom: ConvGeometry,
    pub z_x: u8,
    pub z_y: u8,
    /// OIHW `[c_out, c_in / group, kh, kw]` (emptied once packed: `spec()` of a built convolution has none).
    pub weights: Vec<i8>,
    pub bias: Option<Vec<i32>>,
    /// Per output channel `(s_x·s_w[o]) / s_y`.
    pub multiplier: Vec<f32>,
}

/// What a GEMM convolution's output stage writes: requantized uint8 with this zero point, or `f32(acc)·m`
/// (a QDQ Gemm whose output stays float, as onnxruntime's QGemm with a float output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Out {
    U8(u8),
    F32,
}

/// Rows (output pixels) gathered per im2col tile.
pub(crate) const TILE_ROWS: usize = 48;
/// Rows per tile when they are read in place (1×1 convolutions): a whole small image, so each pass over a
/// block's weights serves every row while the weights sit in L1.
pub(crate) const DIRECT_ROWS: usize = 256;
/// Fewest output pixels in a part of a GEMM split across threads (a register tile's rows or so).
const MIN_PART_ROWS: usize = 8;
/// Rows per thread from which a small image's GEMM splits its rows only (see [`gemm_split`]).
const MIN_BAND_ROWS: usize = 48;

/// The per-channel output stage of a GEMM run: bias (zero point folded in; `bias128` for the kernels that
/// multiply `x − 128`) and multiplier, each padded to a multiple of 64 channels.
#[derive(Clone, Copy)]
struct Epilogue<'a> {
    bias: &'a [i32],
    bias128: &'a [i32],
    multiplier: &'a [f32],
}

/// A GEMM plan and the output stage of one run.
struct Gemm<'a> {
    kp: usize,
    direct: bool,
    blocks: &'a [Block],
    out: Out,
}

pub(crate) struct Block {
    pub c0: usize,
    /// Channels computed (a multiple of 16), ≥ `valid`.
    pub width: usize,
    /// Channels stored.
    pub valid: usize,
    /// `[kp/4][width][4]` int8; for the aarch64 `usmmla` kernels (`Isa::NeonI8mm`) `[kp8/8][width/2][2][8]`
    /// instead (`kp8` = `kp` rounded up to 8, zeros past `k`): channel pairs, 8 depths each.
    pub packed: Vec<i8>,
    /// No weight is −128: two products of `x − 128` and a weight then sum within i16 (|Σ| ≤ 2·128·127), which the
    /// aarch64 kernel without dotprod uses.
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    pub no_i8_min: bool,
}

enum Plan {
    Gemm { kp: usize, direct: bool, blocks: Vec<Block> },
    Depthwise(DwPlan),
}

/// Depthwise weights in the layouts of each kernel.
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
pub(crate) struct DwPlan {
    /// `w[t][c]` as i32 (portable), `cpad` = channels rounded up to 16.
    pub w: Vec<i32>,
    /// The same values as 16-bit lanes (`(w as u16) as i32`) for `pmaddwd` (AVX2).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub w16: Vec<i32>,
    /// The same values as i16 (NEON widening multiply-adds).
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    pub wh: Vec<i16>,
    /// Per channel (padded to 64) the bias plus `128·Σ_t w[t]`: what the `sdot` kernels start from, as they
    /// multiply `x − 128` (signed bytes) by the weights.
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    pub bias128: Vec<i32>,
    pub cpad: usize,
    /// Per tap, padded with tap 0 to a multiple of 4: (kernel row, byte offset `kx·dilation·c` in the row).
    pub taps: Vec<(usize, usize)>,
    /// VNNI layout, `[c/64][taps/4][4 vectors][64 bytes]`: vector `q`, byte `16·L + 4·j + tt` holds tap `4g + tt`
    /// of channel `64·cb + 16·L + 4·q + j` (what two rounds of unpacks make of four tap loads).
    pub w4: Vec<i8>,
    /// Bias (zero point folded) and multiplier in the lane order of `w4`'s accumulators, `[c/64][4][16]`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub bias4: Vec<i32>,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub m4: Vec<f32>,
}

pub struct QConv {
    spec: QConvSpec,
    isa: Isa,
    plan: Plan,
    /// Bias with the input zero point folded in, padded to a multiple of 64.
    bias: Vec<i32>,
    /// `bias + 128·Σ_k w[k]`, for the kernels that multiply `x − 128` (see [`DwPlan::bias128`]).
    bias128: Vec<i32>,
    multiplier: Vec<f32>,
    /// Per output channel: the bias before the zero point is folded in, and `Σ_k w[k]` (for
    /// [`QConv::run_f32_dynamic`], whose input zero point changes with every call).
    bias_raw: Vec<i64>,
    wsum: Vec<i64>,
    /// A quantized element-wise function applied to the uint8 output in the output stage (while each tile is in
    /// cache): a SiLU or other activation the QDQ graph computes between this convolution's Q and the next Q.
    table: Option<Box<[u8; 256]>>,
}

impl std::fmt::Debug for QConv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.plan {
            Plan::Gemm { direct: true, .. } => "gemm",
            Plan::Gemm { direct: false, .. } => "im2col-gemm",
            Plan::Depthwise(_) => "depthwise",
        };
        write!(
            f,
            "QConv({kind}, {}→{}, k{:?}, s{:?}, {})",
            self.spec.geom.c_in,
            self.spec.geom.c_out,
            self.spec.geom.kernel,
            self.spec.geom.stride,
            self.isa.name()
        )
    }
}

fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

impl QConv {
    /// Prepares (checks, packs) a convolution. Grouped convolutions other than depthwise with one filter per
    /// channel are not handled (the caller keeps them on the float path).
    pub fn new(spec: QConvSpec, isa: Isa) -> Result<QConv, String> {
        let isa = isa.supported();
        let [kh, kw] = spec.geom.kernel;
        let s = &spec;
        let depthwise = s.geom.check()?;
        let cin_g = s.geom.c_in / s.geom.group;
        let taps = kh * kw;
        if s.weights.len() != s.geom.c_out * cin_g * taps
            || s.multiplier.len() != s.geom.c_out
            || s.bias.as_ref().is_some_and(|b| b.len() != s.geom.c_out)
        {
            return Err("weights, bias or multiplier do not match the convolution".into());
        }
        let mut bias = vec![0i32; round_up(s.geom.c_out, 64)];
        let mut bias128 = vec![0i32; round_up(s.geom.c_out, 64)];
        let mut multiplier = vec![0f32; round_up(s.geom.c_out, 64)];
        let (mut bias_raw, mut wsums) = (Vec::with_capacity(s.geom.c_out), Vec::with_capacity(s.geom.c_out));
        for o in 0..s.geom.c_out {
            let wsum: i64 = s.weights[o * cin_g * taps..(o + 1) * cin_g * taps].iter().map(|&v| v as i64).sum();
            bias_raw.push(s.bias.as_ref().map_or(0, |b| b[o] as i64));
            wsums.push(wsum);
            let b = s.bias.as_ref().map_or(0, |b| b[o] as i64) - s.z_x as i64 * wsum;
            let range = |v: i64| i32::try_from(v).map_err(|_| "bias out of the int32 range".to_string());
            bias[o] = range(b)?;
            bias128[o] = range(b + 128 * wsum)?;
            multiplier[o] = s.multiplier[o];
        }
        let plan = if depthwise {
            Plan::Depthwise(DwPlan::new(s, &bias, &bias128, &multiplier))
        } else {
            let k = taps * s.geom.c_in;
            let kp = round_up(k, 4);
            let direct =
                kh == 1 && kw == 1 && s.geom.stride == [1, 1] && s.geom.pads == [0; 4] && s.geom.c_in.is_multiple_of(4);
            let mut blocks = Vec::new();
            let mut c0 = 0;
            while c0 < s.geom.c_out {
                let valid = (s.geom.c_out - c0).min(64);
                let width = round_up(valid, 16);
                let mmla = isa == Isa::NeonI8mm;
                let mut packed = vec![0i8; if mmla { round_up(kp, 8) } else { kp } * width];
                for j in 0..valid {
                    let o = c0 + j;
                    for c in 0..s.geom.c_in {
                        for t in 0..taps {
                            let kk = t * s.geom.c_in + c;
                            let at = if mmla {
                                (kk / 8) * width * 8 + (j / 2) * 16 + (j % 2) * 8 + kk % 8
                            } else {
                                (kk / 4) * width * 4 + j * 4 + kk % 4
                            };
                            packed[at] = s.weights[(o * s.geom.c_in + c) * taps + t];
                        }
                    }
                }
                let no_i8_min = !packed.contains(&i8::MIN);
                blocks.push(Block { c0, width, valid, packed, no_i8_min });
                c0 += valid;
            }
            Plan::Gemm { kp, direct, blocks }
        };
        // The packed plan holds the weights now: drop the unpacked copy (a model's worth of memory).
        let mut spec = spec;
        spec.weights = Vec::new();
        Ok(QConv { spec, isa, plan, bias, bias128, multiplier, bias_raw, wsum: wsums, table: None })
    }

    /// The convolution followed by `y = table[y]` on its uint8 output ([`crate::qelem::lut`]), in its output stage.
    pub fn with_table(mut self, table: [u8; 256]) -> QConv {
        self.table = Some(Box::new(table));
        self
    }

    /// The output table of [`QConv::with_table`].
    pub fn table(&self) -> Option<&[u8; 256]> {
        self.table.as_deref()
    }

    pub fn spec(&self) -> &QConvSpec {
        &self.spec
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn output_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        self.window().output_hw(h, w)
    }

    /// `x: [n, h, w, c_in]` → `y: [n, oh, ow, c_out]`, both NHWC uint8.
    pub fn run(&self, x: &[u8], n: usize, h: usize, w: usize, y: &mut [u8]) -> Result<(), String> {
        let (oh, ow) = self.window().check(x.len(), [n, h, w], y.len(), self.spec.geom.c_out)?;
        let s = &self.spec;
        match &self.plan {
            Plan::Gemm { kp, direct, blocks } => {
                let g = Gemm { kp: *kp, direct: *direct, blocks, out: Out::U8(s.z_y) };
                self.run_gemm(x, [n, h, w], (oh, ow), &g, self.epilogue(), y.as_mut_ptr() as usize)
            }
            Plan::Depthwise(p) => self.run_depthwise(x, [n, h, w], (oh, ow), p, y),
        }
        Ok(())
    }

    /// As [`QConv::run`] with a float output `f32(acc)·multiplier` (no requantization; the multiplier is then
    /// `s_x·s_w`). Group-1 convolutions only (the lowering uses it for Gemm as a 1×1 convolution).
    pub fn run_f32(&self, x: &[u8], n: usize, h: usize, w: usize, y: &mut [f32]) -> Result<(), String> {
        let (oh, ow) = self.window().check(x.len(), [n, h, w], y.len(), self.spec.geom.c_out)?;
        match &self.plan {
            Plan::Gemm { kp, direct, blocks } => {
                let g = Gemm { kp: *kp, direct: *direct, blocks, out: Out::F32 };
                self.run_gemm(x, [n, h, w], (oh, ow), &g, self.epilogue(), y.as_mut_ptr() as usize);
                Ok(())
            }
            Plan::Depthwise(_) => Err("a float output is only available for group-1 convolutions".into()),
        }
    }

    /// As [`QConv::run_f32`] for a 1×1 convolution over `rows` pixels (a GEMM `[rows, c_in] · Wᵀ`) whose input
    /// was quantized for this call only: zero point `z_x` (instead of the spec's) and per-channel output scale
    /// `multiplier` (`s_x·s_w[o]`). `y[r][o] = f32(Σ_k (x[r][k] − z_x)·w[o][k] + bias[o]) · multiplier[o]`.
    pub fn run_f32_dynamic(
        &self,
        x: &[u8],
        rows: usize,
        z_x: u8,
        multiplier: &[f32],
        y: &mut [f32],
    ) -> Result<(), String> {
        let s = &self.spec;
        if s.geom.kernel != [1, 1] || s.geom.stride != [1, 1] || s.geom.pads != [0; 4] || s.geom.group != 1 {
            return Err("a dynamic input is only available for 1×1 group-1 convolutions".into());
        }
        if multiplier.len() != s.geom.c_out {
            return Err(format!("{} multipliers for {} channels", multiplier.len(), s.geom.c_out));
        }
        let (oh, ow) = self.window().check(x.len(), [rows, 1, 1], y.len(), s.geom.c_out)?;
        let Plan::Gemm { kp, direct, blocks } = &self.plan else {
            return Err("a dynamic input is only available for GEMM convolutions".into());
        };
        let padded = self.bias.len();
        let (mut bias, mut bias128, mut m) = (vec![0i32; padded], vec![0i32; padded], vec![0f32; padded]);
        for o in 0..s.geom.c_out {
            let b = self.bias_raw[o] - z_x as i64 * self.wsum[o];
            let range = |v: i64| i32::try_from(v).map_err(|_| "bias out of the int32 range".to_string());
            bias[o] = range(b)?;
            bias128[o] = range(b + 128 * self.wsum[o])?;
            m[o] = multiplier[o];
        }
        let g = Gemm { kp: *kp, direct: *direct, blocks, out: Out::F32 };
        let e = Epilogue { bias: &bias, bias128: &bias128, multiplier: &m };
        self.run_gemm(x, [rows, 1, 1], (oh, ow), &g, e, y.as_mut_ptr() as usize);
        Ok(())
    }

    fn epilogue(&self) -> Epilogue<'_> {
        Epilogue { bias: &self.bias, bias128: &self.bias128, multiplier: &self.multiplier }
    }

    /// `y_addr`: the output, `n·oh·ow·c_out` elements of `g.out`'s type.
    fn run_gemm(
        &self,
        x: &[u8],
        [n, h, w]: [usize; 3],
        (oh, ow): (usize, usize),
        g: &Gemm,
        e: Epilogue,
        y_addr: usize,
    ) {
        let elem = if g.out == Out::F32 { 4 } else { 1 };
        let s = &self.spec;
        let rows = if g.direct { RowSource::Direct } else { RowSource::Im2col { pad: s.z_x } };
        let tiles = GemmTiles { k: g.kp, rows, macs: n * oh * ow * g.kp * s.geom.c_out };
        self.window().for_each_gemm_tile(x, [n, h, w], (oh, ow), &tiles, g.blocks, |rows, r0, blocks| {
            let mut out_ptrs = [std::ptr::null_mut::<u8>(); DIRECT_ROWS];
            for (i, p) in out_ptrs.iter_mut().enumerate().take(rows.len()) {
                // Each (row tile, channel block) is written by exactly one part.
                *p = (y_addr + (r0 + i) * s.geom.c_out * elem) as *mut u8;
            }
            let bias = if signed_x(self.isa) { e.bias128 } else { e.bias };
            for b in blocks {
                // SAFETY: row pointers address `kp` readable bytes; output rows hold `c_out` elements each and
                // (tile, block) pairs are disjoint across parts.
                unsafe { gemm_block(self.isa, rows, &out_ptrs[..rows.len()], g.kp, b, bias, e.multiplier, g.out) };
            }
            if let (Some(t), Out::U8(_), Some(first), Some(last)) = (&self.table, g.out, blocks.first(), blocks.last())
            {
                // The tile's blocks, just written, through the output table.
                let (c0, c1) = (first.c0, last.c0 + last.valid);
                for &p in &out_ptrs[..rows.len()] {
                    // SAFETY: this part's (tile, blocks) bytes, as above.
                    unsafe { crate::qelem::lut_raw(self.isa, p.add(c0), p.add(c0), c1 - c0, t) };
                }
            }
        });
    }

    fn window(&self) -> Window {
        self.spec.geom.window()
    }

    fn run_depthwise(&self, x: &[u8], [n, h, w]: [usize; 3], (oh, ow): (usize, usize), p: &DwPlan, y: &mut [u8]) {
        let s = &self.spec;
        let c = s.geom.c_in;
        let y_addr = y.as_mut_ptr() as usize;
        self.window().for_each_row(x, [n, h, w], (oh, ow), Some(s.z_x), |rows, r| {
            // SAFETY: output row `r` (ow·c bytes) is written by one part only.
            let yrow = unsafe { std::slice::from_raw_parts_mut((y_addr + r * ow * c) as *mut u8, ow * c) };
            let dw = Dw { rows, taps: &p.taps, step: s.geom.stride[1] * c, c, ow, cols: 0..usize::MAX };
            self.depthwise_row(&dw, p, yrow);
            if let Some(t) = &self.table {
                crate::qelem::lut_in_place(self.isa, yrow, t);
            }
        });
    }

    fn depthwise_row(&self, d: &Dw, p: &DwPlan, yrow: &mut [u8]) {
        #[cfg(target_arch = "aarch64")]
        if self.isa.is_arm() {
            // SAFETY: the ISA was detected at construction (or capped below what the CPU has); every row pointer
            // addresses a full (padded) input row.
            unsafe { aarch64::depthwise_row(self.isa, &self.spec, d, p, &self.bias, &self.multiplier, yrow) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if self.isa.is_x86() {
            // SAFETY: the ISA was detected at construction (or capped below what the CPU has); every row pointer
            // addresses a full (padded) input row.
            unsafe { x86::depthwise_row(self.isa, &self.spec, d, p, &self.bias, &self.multiplier, yrow) };
            return;
        }
        let s = &self.spec;
        let taps = s.geom.kernel[0] * s.geom.kernel[1];
        let z = s.z_y as i32;
        let mut acc = vec![0i32; d.c];
        for ox in 0..d.ow {
            acc.copy_from_slice(&self.bias[..d.c]);
            for (t, &(ky, off)) in d.taps[..taps].iter().enumerate() {
                // SAFETY: `rows[ky]` holds a full padded row; `ox·step + off + c` stays inside it.
                let src = unsafe { std::slice::from_raw_parts(d.rows[ky].add(ox * d.step + off), d.c) };
                let wv = &p.w[t * p.cpad..][..d.c];
                for ((a, &xv), &wv) in acc.iter_mut().zip(src).zip(wv) {
                    *a += xv as i32 * wv;
                }
            }
            for (ch, &a) in acc.iter().enumerate() {
                yrow[ox * d.c + ch] = requant(a, self.multiplier[ch], z);
            }
        }
    }
}

impl DwPlan {
    /// Channels `chans` of one depthwise output row in scalar code (the SIMD kernels' channels past their last
    /// vector), over the first `taps` taps.
    ///
    /// # Safety
    /// `d` describes valid padded input rows (see `QConv::run_depthwise`).
    #[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn row_scalar(
        &self,
        z_y: u8,
        taps: usize,
        d: &Dw,
        bias: &[i32],
        m: &[f32],
        chans: std::ops::Range<usize>,
        yrow: &mut [u8],
    ) {
        for ox in 0..d.ow {
            for ch in chans.clone() {
                let mut a = bias[ch];
                for (t, &(ky, off)) in self.taps[..taps].iter().enumerate() {
                    // SAFETY: `rows[ky]` holds a full padded row; `ox·step + off + ch` stays inside it.
                    a += unsafe { *d.rows[ky].add(ox * d.step + off + ch) } as i32 * self.w[t * self.cpad + ch];
                }
                yrow[ox * d.c + ch] = requant(a, m[ch], z_y as i32);
            }
        }
    }

    fn new(s: &QConvSpec, bias: &[i32], bias128: &[i32], multiplier: &[f32]) -> DwPlan {
        let [kh, kw] = s.geom.kernel;
        let (c, taps) = (s.geom.c_in, kh * kw);
        let cpad = round_up(c, 16);
        let mut w = vec![0i32; taps * cpad];
        let mut w16 = vec![0i32; taps * cpad];
        let mut wh = vec![0i16; taps * cpad];
        for ch in 0..c {
            for t in 0..taps {
                let v = s.weights[ch * taps + t];
                w[t * cpad + ch] = v as i32;
                w16[t * cpad + ch] = (v as i16 as u16) as i32;
                wh[t * cpad + ch] = v as i16;
            }
        }
        let mut tap_list: Vec<(usize, usize)> =
            (0..taps).map(|t| (t / kw, (t % kw) * s.geom.dilation[1] * c)).collect();
        tap_list.resize(round_up(taps, 4), tap_list[0]);
        let groups = tap_list.len() / 4;
        let blocks = c.div_ceil(64);
        let mut w4 = vec![0i8; blocks * groups * 256];
        let mut bias4 = vec![0i32; blocks * 64];
        let mut m4 = vec![0f32; blocks * 64];
        for cb in 0..blocks {
            for q in 0..4 {
                for l in 0..4 {
                    for j in 0..4 {
                        let ch = 64 * cb + 16 * l + 4 * q + j;
                        if ch >= c {
                            continue;
                        }
                        bias4[(cb * 4 + q) * 16 + 4 * l + j] = bias[ch];
                        m4[(cb * 4 + q) * 16 + 4 * l + j] = multiplier[ch];
                        for g in 0..groups {
                            for tt in 0..4 {
                                if 4 * g + tt < taps {
                                    w4[((cb * groups + g) * 4 + q) * 64 + 16 * l + 4 * j + tt] =
                                        s.weights[ch * taps + 4 * g + tt];
                                }
                            }
                        }
                    }
                }
            }
        }
        DwPlan { w, w16, wh, bias128: bias128.to_vec(), cpad, taps: tap_list, w4, bias4, m4 }
    }
}

/// One output row of a depthwise convolution: what the kernels read.
pub(crate) struct Dw<'a, T = u8> {
    /// Per kernel row, the input row it reads (padded left and right): `(w + pl + pr)·c` elements.
    pub rows: &'a [*const T],
    /// See [`DwPlan::taps`]; tap `t` of output pixel `ox` starts at `rows[ky] + ox·step + off`.
    pub taps: &'a [(usize, usize)],
    /// `stride_w · c`.
    pub step: usize,
    pub c: usize,
    pub ow: usize,
    /// Readable columns of the padded rows (the float kernels read rows in place and skip the taps outside,
    /// and the rows that are null); the integer kernels read fully padded rows (`0..usize::MAX`).
    pub cols: std::ops::Range<usize>,
}

impl<T> Dw<'_, T> {
    /// Where each of `taps` starts for output pixel 0 (tap `t` of pixel `ox`, channel `c` is at
    /// `starts[t] + ox·step + c`): the row pointers resolved once per output row.
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    pub fn tap_starts(&self, taps: &[(usize, usize)]) -> Vec<*const T> {
        taps.iter().map(|&(ky, off)| self.rows[ky].wrapping_add(off)).collect()
    }

    /// `(kw, stride)` when the taps along a kernel row are one pixel apart (dilation 1 in width): the shape the
    /// sliding float depthwise kernels take.
    #[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
    pub fn slide_shape(&self) -> Option<(usize, usize)> {
        let kh = self.taps.last().map_or(1, |&(ky, _)| ky + 1);
        let kw = self.taps.len() / kh;
        let stride = self.step / self.c;
        let dil1 = kw == 1 || self.taps[1].1 == self.c;
        (dil1 && stride * self.c == self.step).then_some((kw, stride))
    }

    /// Output pixels whose every tap lies in the readable columns: `lo..hi` (empty when none).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub fn inner(&self) -> std::ops::Range<usize> {
        let lo = self.cols.start.div_ceil(self.step).min(self.ow);
        // Last tap of pixel `ox` ends at `ox·step + span` (exclusive).
        let span = self.taps.iter().map(|&(_, off)| off).max().unwrap_or(0) + self.c;
        let hi = match self.cols.end.checked_sub(span) {
            Some(last) => (last / self.step + 1).min(self.ow),
            None => 0,
        };
        lo..hi.max(lo)
    }

    /// Whether tap column `col` (padded coordinates) is readable.
    #[inline(always)]
    pub fn readable(&self, col: usize) -> bool {
        self.cols.contains(&col)
    }
}

/// Row pointers `rows[r0..r0 + nr]` of one register tile, the missing rows repeating the first (computed, never
/// stored), and `nr`.
#[inline]
pub(crate) fn row_tile<const MR: usize, T>(rows: &[*const T], r0: usize) -> ([*const T; MR], usize) {
    let nr = (rows.len() - r0).min(MR);
    let mut rp = [rows[r0]; MR];
    rp[..nr].copy_from_slice(&rows[r0..r0 + nr]);
    (rp, nr)
}

/// Whether `isa`'s GEMM kernels multiply `x − 128` as signed bytes (and so start from `bias128`).
fn signed_x(isa: Isa) -> bool {
    #[cfg(target_arch = "aarch64")]
    return aarch64::signed_x(isa);
    #[allow(unreachable_code)]
    {
        let _ = isa;
        false
    }
}

/// `out[r][b.c0..b.c0+b.valid] = requant(bias + Σ_k rows[r][k]·w[k])` for every row.
///
/// # Safety
/// Each `rows[r]` addresses `kp` readable bytes, each `outs[r]` addresses `c_out ≥ b.c0 + b.valid` writable bytes.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_block(
    isa: Isa,
    rows: &[*const u8],
    outs: &[*mut u8],
    kp: usize,
    b: &Block,
    bias: &[i32],
    m: &[f32],
    out: Out,
) {
    #[cfg(target_arch = "x86_64")]
    if isa.is_x86() {
        unsafe { x86::gemm_block(isa, rows, outs, kp, b, bias, m, out) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if isa.is_arm() {
        unsafe { aarch64::gemm_block(isa, rows, outs, kp, b, bias, m, out) };
        return;
    }
    let _ = isa;
    let mut acc = vec![0i32; b.width];
    for (&row, &dst) in rows.iter().zip(outs) {
        acc.copy_from_slice(&bias[b.c0..b.c0 + b.width]);
        let xr = unsafe { std::slice::from_raw_parts(row, kp) };
        for (k4, xs) in xr.as_chunks::<4>().0.iter().enumerate() {
            let wblk = &b.packed[k4 * b.width * 4..(k4 + 1) * b.width * 4];
            for (a, wq) in acc.iter_mut().zip(wblk.as_chunks::<4>().0) {
                *a += xs[0] as i32 * wq[0] as i32
                    + xs[1] as i32 * wq[1] as i32
                    + xs[2] as i32 * wq[2] as i32
                    + xs[3] as i32 * wq[3] as i32;
            }
        }
        match out {
            Out::U8(z) => {
                let o = unsafe { std::slice::from_raw_parts_mut(dst.add(b.c0), b.valid) };
                for (j, v) in o.iter_mut().enumerate() {
                    *v = requant(acc[j], m[b.c0 + j], z as i32);
                }
            }
            Out::F32 => {
                let o = unsafe { std::slice::from_raw_parts_mut((dst as *mut f32).add(b.c0), b.valid) };
                for (j, v) in o.iter_mut().enumerate() {
                    *v = acc[j] as f32 * m[b.c0 + j];
                }
            }
        }
    }
}

/// Geometry of a convolution window over an NHWC tensor (the integer and the float kernels share it).
pub(crate) struct Window {
    pub c: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    /// top, left, bottom, right
    pub pads: [usize; 4],
}

/// How a GEMM convolution walks its rows: depth `k` (im2col row length), where the rows come from, and its MAC
/// count (for the thread split).
pub(crate) struct GemmTiles<T> {
    pub k: usize,
    pub rows: RowSource<T>,
    pub macs: usize,
}

/// Where the rows of a GEMM convolution are read.
pub(crate) enum RowSource<T> {
    /// 1×1, stride 1, unpadded: output pixel `r` reads input pixel `r` in place.
    Direct,
    /// Gathered into tiles by im2col, padded with `pad`.
    Im2col { pad: T },
    /// An implicit GEMM: the input has its padding written out (`[n, h, w]` are the padded sizes) and output
    /// pixel `r` points at its window's first element; the kernel reads depth `k` at `row + koff[k]`.
    Padded,
}

/// A packed channel block's width (channels computed), for the thread split.
pub(crate) trait Width {
    fn width(&self) -> usize;
}

impl Width for Block {
    fn width(&self) -> usize {
        self.width
    }
}

/// A bare width (the split's tests).
impl Width for usize {
    fn width(&self) -> usize {
        *self
    }
}

/// How a GEMM of `rows` output pixels in `tiles` row tiles and channel `blocks` splits across `threads`:
/// `(row parts, column parts)`, parts ordered row part first (the pool gives each thread a contiguous range).
/// - At least `wanted` row tiles: rows only, `wanted` parts (each part reads every block's weights once, as one
///   thread would).
/// - Fewer, but the pixels of an image (`image`; not the rows of a `[N, K]` GEMM, whose next layer reads whole
///   rows) in one tile, two bands of [`MIN_BAND_ROWS`] rows or more per thread (14×14 = 196 pixels on two
///   threads): rows only, two bands per thread. Each thread computes every channel of its band of the image, the
///   band the depthwise convolution after it reads; with the channel blocks split, that layer read half its input
///   from the other cores' caches. Each part reads every block's weights, which smaller images do not pay for.
///   (On two threads, both splits behind a temporary switch, runs alternating in one process: a row split at
///   14×14 made EfficientNet-Lite0's depthwise layers there 0.99–1.11× as fast and the model 1 % faster; at 7×7
///   too, its expansions ran 7–16 % slower and the model 6 %. SqueezeNet with one band per thread at 13×13 was
///   no faster.)
/// - Fewer still (a small image: 7×7 = 49 pixels is one tile): channel blocks split too, and rows below a tile
///   if that is what balances the threads: the fewest row parts (each re-reads its blocks' weights) whose
///   heaviest thread carries at most 5 % over an even share, else the best balance found. Three 64-channel blocks
///   of a 7×7 image on two threads become two row halves of each (one thread with two blocks and one with one
///   took 2/3 of the time of one thread, not 1/2); twenty blocks become ten pairs, not seven triples.
pub(crate) fn gemm_split<B: Width>(
    rows: usize,
    tiles: usize,
    blocks: &[B],
    threads: usize,
    wanted: usize,
    image: bool,
) -> (usize, usize) {
    if tiles >= wanted || threads <= 1 || rows == 0 {
        return (tiles.min(wanted).max(1), 1);
    }
    // An image in one tile with enough rows for each thread's weight reads to pay: two bands of rows per thread
    // (see above).
    if image && tiles == 1 && rows >= 2 * threads * MIN_BAND_ROWS && 2 * threads <= wanted {
        return (2 * threads, 1);
    }
    let widths: Vec<usize> = blocks.iter().map(Width::width).collect();
    let nb = widths.len().max(1);
    let total: usize = widths.iter().sum::<usize>().max(1);
    // The heaviest thread's share of the work over an even share, when each thread runs its own range of parts.
    let imbalance = |rp: usize, cp: usize, bper: usize| {
        let per = rows.div_ceil(rp);
        let load = |p: usize| {
            let (r, c) = (p / cp, p % cp);
            let nrows = rows.saturating_sub(r * per).min(per);
            nrows * widths[(c * bper).min(widths.len())..((c + 1) * bper).min(widths.len())].iter().sum::<usize>()
        };
        let parts = rp * cp;
        let users = threads.min(parts);
        let heaviest = (0..users).map(|t| super::pool::range(parts, users, t).map(load).sum::<usize>()).max();
        heaviest.unwrap_or(0) as f64 * threads as f64 / (rows * total) as f64
    };
    let first_bper = nb.div_ceil(wanted.div_ceil(tiles).min(nb).max(1));
    let max_rp = rows.div_ceil(MIN_PART_ROWS).clamp(1, 2 * threads);
    let mut best = (f64::INFINITY, 1, nb);
    for rp in 1..=max_rp {
        for bper in (1..=first_bper).rev() {
            let cp = nb.div_ceil(bper);
            if bper < first_bper && nb.div_ceil(bper + 1) == cp {
                continue; // the same column parts as a wider share
            }
            let imb = imbalance(rp, cp, bper);
            if imb < best.0 - 1e-9 {
                best = (imb, rp, cp);
            }
            if imb <= 1.05 {
                return (rp, cp);
            }
        }
    }
    (best.1, best.2)
}

impl Window {
    /// Calls `f(rows, r0, blocks)` for tiles of up to [`TILE_ROWS`] output pixels (im2col) or [`DIRECT_ROWS`]
    /// (rows read in place) and a share of the channel `blocks`, split across the kernel pool: enough work per
    /// part to pay a hand-off, a few parts per thread; images with fewer row tiles than parts (7×7 = 49 rows)
    /// split their channel blocks too. Every (tile, block) pair is visited once.
    pub fn for_each_gemm_tile<T: Copy + Send + Sync, B: Sync + Width>(
        &self,
        x: &[T],
        [_n, h, w]: [usize; 3],
        (oh, ow): (usize, usize),
        t: &GemmTiles<T>,
        blocks: &[B],
        f: impl Fn(&[*const T], usize, &[B]) + Sync,
    ) {
        let rows = _n * oh * ow;
        let tile = if let RowSource::Im2col { .. } = t.rows { TILE_ROWS } else { DIRECT_ROWS };
        let tiles = rows.div_ceil(tile);
        let threads = super::threads();
        let wanted = (threads * 4).min((t.macs / 100_000).max(1));
        let (row_parts, col_parts) = gemm_split(rows, tiles, blocks, threads, wanted, oh * ow > 1);
        let per = rows.div_ceil(row_parts);
        let bper = blocks.len().div_ceil(col_parts);
        for_each_part(row_parts * col_parts, |part| {
            let (rp, cp) = (part / col_parts, part % col_parts);
            let blocks = &blocks[(cp * bper).min(blocks.len())..((cp + 1) * bper).min(blocks.len())];
            let mut buf = match t.rows {
                RowSource::Im2col { pad } => vec![pad; TILE_ROWS * t.k],
                _ => Vec::new(),
            };
            let mut row_ptrs = [std::ptr::null::<T>(); DIRECT_ROWS];
            let end = ((rp + 1) * per).min(rows);
            for r0 in (rp * per..end).step_by(tile) {
                let nr = (end - r0).min(tile);
                match t.rows {
                    RowSource::Direct => {
                        for (i, p) in row_ptrs.iter_mut().enumerate().take(nr) {
                            *p = x[(r0 + i) * self.c..].as_ptr();
                        }
                    }
                    RowSource::Im2col { pad } => {
                        im2col(self, x, [h, w], (oh, ow), t.k, r0, nr, pad, &mut buf);
                        for (i, p) in row_ptrs.iter_mut().enumerate().take(nr) {
                            *p = buf[i * t.k..].as_ptr();
                        }
                    }
                    RowSource::Padded => {
                        // Pixel coordinates stepped, not divided, per row.
                        let (mut b, mut oy, mut ox) = (r0 / (oh * ow), r0 / ow % oh, r0 % ow);
                        for p in row_ptrs.iter_mut().take(nr) {
                            *p = x[((b * h + oy * self.stride[0]) * w + ox * self.stride[1]) * self.c..].as_ptr();
                            ox += 1;
                            if ox == ow {
                                ox = 0;
                                oy += 1;
                                if oy == oh {
                                    oy = 0;
                                    b += 1;
                                }
                            }
                        }
                    }
                }
                f(&row_ptrs[..nr], r0, blocks);
            }
        });
    }

    /// The input with its padding written out: `[n, h + pt + pb, w + pl + pr, c]` into `out` (resized), its rows
    /// split across the pool for large inputs (a pass over memory that one thread alone would keep the others
    /// waiting on).
    pub fn pad_input<T: Copy + Send + Sync>(
        &self,
        x: &[T],
        [n, h, w]: [usize; 3],
        pad: T,
        out: &mut Vec<T>,
    ) -> [usize; 2] {
        let [pt, pl, pb, pr] = self.pads;
        let (hp, wp, c) = (h + pt + pb, w + pl + pr, self.c);
        let (rows, row_len) = (n * hp, wp * c);
        let total = rows * row_len;
        assert_eq!(x.len(), n * h * w * c, "pad_input: the input is not [{n}, {h}, {w}, {c}]");
        out.clear();
        out.reserve(total);
        let base = out.spare_capacity_mut().as_mut_ptr() as usize;
        let parts = super::threads().min((total / 65_536).max(1)).min(rows.max(1));
        super::for_each_part(parts, |part| {
            for r in rows * part / parts..rows * (part + 1) / parts {
                let (b, y) = (r / hp, r % hp);
                // SAFETY: row `r` of the `total` reserved elements is written by this part only, every element of
                // it once, before `set_len` below makes them readable.
                unsafe {
                    let dst = (base as *mut T).add(r * row_len);
                    let fill = |from: usize, to: usize| (from..to).for_each(|i| dst.add(i).write(pad));
                    if y < pt || y >= pt + h {
                        fill(0, row_len);
                        continue;
                    }
                    fill(0, pl * c);
                    std::ptr::copy_nonoverlapping(x.as_ptr().add((b * h + y - pt) * w * c), dst.add(pl * c), w * c);
                    fill((pl + w) * c, row_len);
                }
            }
        });
        // SAFETY: every one of the `total` elements was written above.
        unsafe { out.set_len(total) };
        [hp, wp]
    }

    /// Output size of an `h×w` input, `None` when the kernel does not fit.
    pub fn output_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        super::reference::Conv2d {
            group: 1,
            kernel: self.kernel,
            stride: self.stride,
            dilation: self.dilation,
            pads: self.pads,
        }
        .output_hw(h, w)
    }

    /// Checks an input of `x_len` elements as `[n, h, w, c]` and an output of `y_len` elements with `ld` values per
    /// pixel; returns the output size.
    pub fn check(
        &self,
        x_len: usize,
        [n, h, w]: [usize; 3],
        y_len: usize,
        ld: usize,
    ) -> Result<(usize, usize), String> {
        let (oh, ow) = self.output_hw(h, w).ok_or_else(|| format!("input {h}x{w} is smaller than the kernel"))?;
        if x_len != n * h * w * self.c || y_len != n * oh * ow * ld {
            return Err(format!("buffer sizes do not match [{n}, {h}, {w}, {}]", self.c));
        }
        Ok((oh, ow))
    }

    /// Calls `f(rows, r)` for every output row `r` in `0..n·oh`, split across the kernel pool. `rows[ky]` is the
    /// input row kernel row `ky` reads, as if padded on the left and right: column `i` of the padded row (of
    /// `(w + pl + pr)·c` elements) is at `rows[ky] + i`.
    /// - `Some(pad)`: every padded row is readable, its padding holds `pad`. Rows inside the image are read in
    ///   place when there is no left/right padding, otherwise copied once into a ring of padded rows (distinct
    ///   rows one output row reads lie within `span` consecutive rows, so `span` slots indexed by row modulo
    ///   `span` hold them all); rows in the top/bottom padding read one row of `pad`.
    /// - `None` (kernels that skip the taps that fall in the padding): rows are read in place, only columns
    ///   `pl·c..(pl + w)·c` are readable, and rows in the top/bottom padding are null.
    pub fn for_each_row<T: Copy + Send + Sync>(
        &self,
        x: &[T],
        [n, h, w]: [usize; 3],
        (oh, ow): (usize, usize),
        pad: Option<T>,
        f: impl Fn(&[*const T], usize) + Sync,
    ) {
        let (c, kh) = (self.c, self.kernel[0]);
        let [pt, pl, _, pr] = self.pads;
        let row_len = (w + pl + pr) * c;
        let padded_lr = pl + pr > 0;
        let span = (kh - 1) * self.dilation[0] + 1;
        let rows = n * oh;
        let macs = rows * ow * c * kh * self.kernel[1];
        // Enough work per part to pay a hand-off; four parts per thread balance uneven threads (a thread left
        // waiting at the end of an operator idles for a part at most).
        // Part `p` takes rows `rows·p/parts..rows·(p + 1)/parts`: shares within one row of each other (with a
        // rounded-up share per part, 14 rows in 8 parts left one of two threads 8 rows and the other 6).
        let parts = (super::threads() * 4).min(rows).min((macs / 50_000).max(1)).max(1);
        for_each_part(parts, |part| {
            let zrow = pad.map_or_else(Vec::new, |pad| vec![pad; row_len]);
            let mut ring = match pad {
                Some(pad) if padded_lr => vec![pad; span * row_len],
                _ => Vec::new(),
            };
            let mut ring_row = vec![usize::MAX; span];
            let mut row_ptrs = vec![std::ptr::null::<T>(); kh];
            for r in rows * part / parts..rows * (part + 1) / parts {
                let (b, oy) = (r / oh, r % oh);
                for (ky, rp) in row_ptrs.iter_mut().enumerate() {
                    let iy = (oy * self.stride[0] + ky * self.dilation[0]) as isize - pt as isize;
                    *rp = if iy < 0 || iy >= h as isize {
                        if pad.is_some() { zrow.as_ptr() } else { std::ptr::null() }
                    } else {
                        let src = &x[(b * h + iy as usize) * w * c..][..w * c];
                        if pad.is_none() {
                            // Never dereferenced outside the row: the kernel skips padded columns.
                            src.as_ptr().wrapping_sub(pl * c)
                        } else if padded_lr {
                            let key = b * h + iy as usize;
                            let slot = key % span;
                            let dst = &mut ring[slot * row_len..(slot + 1) * row_len];
                            if ring_row[slot] != key {
                                // The pad columns keep the value they were created with.
                                dst[pl * c..(pl + w) * c].copy_from_slice(src);
                                ring_row[slot] = key;
                            }
                            dst.as_ptr()
                        } else {
                            src.as_ptr()
                        }
                    };
                }
                f(&row_ptrs, r);
            }
        });
    }
}

/// Gathers rows `r0..r0+nr` of the im2col matrix of `x` (NHWC, `k = (ky·kw + kx)·c + ci`, rows `kp ≥ kh·kw·c`
/// long), padding with `pad`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn im2col<T: Copy>(
    g: &Window,
    x: &[T],
    [h, w]: [usize; 2],
    (oh, ow): (usize, usize),
    kp: usize,
    r0: usize,
    nr: usize,
    pad: T,
    buf: &mut [T],
) {
    let [kh, kw] = g.kernel;
    let c = g.c;
    for i in 0..nr {
        let r = r0 + i;
        let (b, rem) = (r / (oh * ow), r % (oh * ow));
        let (oy, ox) = (rem / ow, rem % ow);
        let dst = &mut buf[i * kp..(i + 1) * kp];
        let ix0 = (ox * g.stride[1]) as isize - g.pads[1] as isize;
        let row_inside = ix0 >= 0 && ix0 as usize + (kw - 1) * g.dilation[1] < w && g.dilation[1] == 1;
        for ky in 0..kh {
            let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pads[0] as isize;
            if row_inside && iy >= 0 && (iy as usize) < h {
                // The window's row is contiguous in NHWC: one copy of kw·c elements.
                let src = ((b * h + iy as usize) * w + ix0 as usize) * c;
                copy_short(&mut dst[ky * kw * c..(ky + 1) * kw * c], &x[src..src + kw * c]);
                continue;
            }
            for kx in 0..kw {
                let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.pads[1] as isize;
                let d = &mut dst[(ky * kw + kx) * c..(ky * kw + kx + 1) * c];
                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                    d.fill(pad);
                } else {
                    let src = ((b * h + iy as usize) * w + ix as usize) * c;
                    copy_short(d, &x[src..src + c]);
                }
            }
        }
        dst[kh * kw * c..].fill(pad);
    }
}

/// `dst.copy_from_slice(src)` without a `memcpy` call for the short runs of thin inputs (an RGB stem copies
/// 3-9 values at a time): runs of 4 to 32 bytes as two overlapping word copies.
#[inline(always)]
fn copy_short<T: Copy>(dst: &mut [T], src: &[T]) {
    let n = std::mem::size_of_val(src);
    assert!(dst.len() == src.len());
    let (d, s) = (dst.as_mut_ptr() as *mut u8, src.as_ptr() as *const u8);
    // SAFETY: both ranges hold `n` bytes (checked above); `T: Copy` values are plain bytes to copy.
    unsafe {
        macro_rules! two {
            ($t:ty) => {{
                let w = std::mem::size_of::<$t>();
                let (a, b) = ((s as *const $t).read_unaligned(), (s.add(n - w) as *const $t).read_unaligned());
                (d as *mut $t).write_unaligned(a);
                (d.add(n - w) as *mut $t).write_unaligned(b);
            }};
        }
        match n {
            16..=32 => two!(u128),
            8..=15 => two!(u64),
            4..=7 => two!(u32),
            0..=3 => {
                for i in 0..n {
                    *d.add(i) = *s.add(i);
                }
            }
            _ => dst.copy_from_slice(src),
        }
    }
}
