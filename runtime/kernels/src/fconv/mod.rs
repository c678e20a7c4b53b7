//! fp32 2-D convolution on NHWC activations, bias and activation clamp (Relu, Clip/Relu6) fused into the output
//! stage, then an activation ([`Act`]: SiLU, sigmoid, HardSwish, HardSigmoid) and a scalar affine on each tile while in cache, and for
//! group-1 convolutions a residual
//! Add ([`FConv::run_add`]). The float twin of [`super::qconv`],
//! with the same plans:
//! - **GEMM** (`group == 1`): 1×1, stride-1, unpadded convolutions read activation rows directly; others are
//!   implicit GEMMs over a zero-padded copy of the input (row pointer + a per-depth offset table, no im2col). Weights packed once in blocks of up to 64 output channels, `[k][width]`.
//!   Register tiles of `MR` pixels × `NV` vectors (AVX-512: 16 lanes, AVX2: 8, NEON: 4), one FMA per weight vector
//!   and pixel.
//! - **Depthwise**: direct, vectorised over channels, blocks of output pixels per weight load, reading the input
//!   rows in place (no padded copy): taps in the zero padding are skipped, pixels whose window lies inside the
//!   row take the fast path.
//! - **Chains** ([`FChain`]): a 1×1 expansion, a depthwise convolution and a 1×1 projection run row by row, the
//!   tensors between them kept in cache.
//!
//! The sums run in a different order than a reference loop (FMA, per-tile accumulation), so results differ from
//! it by float rounding only; tests compare with a tolerance.
#[cfg(target_arch = "aarch64")]
mod aarch64;
mod chain;
#[cfg(target_arch = "x86_64")]
mod x86;
use super::qconv::{DIRECT_ROWS, Dw, GemmTiles, RowSource, Window};
use super::{ConvGeometry, Isa};
pub use chain::FChain;

/// A float convolution as the lowering pass writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct FConvSpec {
    pub geom: ConvGeometry,
    /// OIHW `[c_out, c_in / group, kh, kw]` (emptied once packed: `spec()` of a built convolution has none).
    pub weights: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    /// Output clamp `[lo, hi]` (−∞, +∞ for none; Relu is `[0, +∞]`).
    pub clamp: [f32; 2],
    /// An activation after the clamp (and after a residual), applied to each output tile while it is in cache.
    pub act: Act,
    /// `[scale, shift]`: `y·scale + shift` after the activation, a multiply then an add (a learnable affine block
    /// after the activation, as PP-LCNetV3 writes `Mul` and `Add` of scalars); `None`: none.
    pub affine: Option<[f32; 2]>,
}

/// The activations of the output stage beyond a clamp.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Act {
    #[default]
    None,
    /// SiLU (swish), `x·σ(x)`: YOLOv5/v8's activation, written in ONNX as `Mul(x, Sigmoid(x))`.
    Silu,
    /// HardSwish, `x·clamp(x + 3, 0, 6) / 6` in that order (MobileNetV3's and PP-LCNet's activation, as exporters
    /// write it out: `Add`, `Clip`, `Mul`, `Div`).
    HardSwish,
    /// The logistic sigmoid `σ(x)` (a segmentation head's last activation).
    Sigmoid,
    /// HardSigmoid, `clamp(α·x + β, 0, 1)` (a squeeze-and-excitation block's gate in MobileNetV3 and PP-LCNet).
    HardSigmoid { alpha: f32, beta: f32 },
}

impl Act {
    /// Applies the activation, then `affine` (`[scale, shift]`), to `v` in place, with the widest vectors `isa`
    /// has.
    pub fn apply_isa(self, isa: Isa, affine: Option<[f32; 2]>, v: &mut [f32]) {
        if self == Act::None && affine.is_none() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        match isa {
            // SAFETY: the ISA was detected (x86 levels imply their features).
            Isa::Avx512Vnni => return unsafe { x86::apply_512(Post { act: self, affine }, v) },
            Isa::Avx2 => return unsafe { act_avx2(self, affine, v) },
            _ => {}
        }
        #[cfg(target_arch = "aarch64")]
        if isa.is_arm() {
            // SAFETY: NEON is part of every aarch64 level.
            return unsafe { aarch64::apply_neon(Post { act: self, affine }, v) };
        }
        let _ = isa;
        self.apply_affine(affine, v)
    }

    /// [`Act::apply`], then `y·scale + shift` (two roundings, as the graph's `Mul` and `Add`) when `affine` is
    /// given.
    #[inline(always)]
    fn apply_affine(self, affine: Option<[f32; 2]>, v: &mut [f32]) {
        self.apply(v);
        if let Some([scale, shift]) = affine {
            for x in v {
                *x = *x * scale + shift;
            }
        }
    }

    /// Applies the activation to `v` in place (plain arithmetic the compiler vectorizes at the build's baseline).
    #[inline(always)]
    pub fn apply(self, v: &mut [f32]) {
        match self {
            Act::None => {}
            Act::Silu => {
                for x in v {
                    *x *= sigmoid(*x);
                }
            }
            Act::Sigmoid => {
                for x in v {
                    *x = sigmoid(*x);
                }
            }
            Act::HardSwish => {
                for x in v {
                    *x = *x * clampf(*x + 3.0, [0.0, 6.0]) / 6.0;
                }
            }
            Act::HardSigmoid { alpha, beta } => {
                for x in v {
                    *x = clampf(*x * alpha + beta, [0.0, 1.0]);
                }
            }
        }
    }
}

/// What a GEMM's last pass applies after the clamp, on each tile in registers where the kernel can: an activation,
/// then an affine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Post {
    pub act: Act,
    pub affine: Option<[f32; 2]>,
}

impl Post {
    pub const NONE: Post = Post { act: Act::None, affine: None };

    #[inline(always)]
    pub fn is_none(self) -> bool {
        self == Post::NONE
    }
}

/// [`Act::apply`] compiled for AVX2 (8 lanes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn act_avx2(act: Act, affine: Option<[f32; 2]>, v: &mut [f32]) {
    act.apply_affine(affine, v)
}

/// `σ(x) = 1 / (1 + e^−x)` from `e = e^−|x|` (never overflows): `1 / (1 + e)` for `x ≥ 0`, `e / (1 + e)` below.
/// Within a few ulp; NaN stays NaN.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    let e = super::qelem::exp_nonpositive(-x.abs());
    let d = 1.0 / (1.0 + e);
    if x >= 0.0 { d } else { e * d }
}

pub(crate) struct FBlock {
    pub c0: usize,
    /// Channels computed (a multiple of 16), ≥ `valid`.
    pub width: usize,
    pub valid: usize,
    /// `[k][width]`.
    pub packed: Vec<f32>,
}

impl super::qconv::Width for FBlock {
    fn width(&self) -> usize {
        self.width
    }
}

enum Plan {
    Gemm {
        k: usize,
        direct: bool,
        blocks: Vec<FBlock>,
    },
    /// `w[t][c]`, `cpad` = channels rounded up to 16; `taps` as `DwPlan::taps` (not padded).
    Depthwise {
        w: Vec<f32>,
        cpad: usize,
        taps: Vec<(usize, usize)>,
    },
}

pub struct FConv {
    spec: FConvSpec,
    isa: Isa,
    plan: Plan,
    /// Bias padded to a multiple of 64.
    bias: Vec<f32>,
}

impl std::fmt::Debug for FConv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.plan {
            Plan::Gemm { direct: true, .. } => "gemm",
            Plan::Gemm { direct: false, .. } => "implicit-gemm",
            Plan::Depthwise { .. } => "depthwise",
        };
        let s = &self.spec;
        write!(
            f,
            "FConv({kind}, {}→{}, k{:?}, s{:?}, {})",
            s.geom.c_in,
            s.geom.c_out,
            s.geom.kernel,
            s.geom.stride,
            self.isa.name()
        )
    }
}

impl FConv {
    pub fn new(spec: FConvSpec, isa: Isa) -> Result<FConv, String> {
        let isa = isa.supported();
        let [kh, kw] = spec.geom.kernel;
        let s = &spec;
        let depthwise = s.geom.check()?;
        let taps = kh * kw;
        let cin_g = s.geom.c_in / s.geom.group;
        if s.weights.len() != s.geom.c_out * cin_g * taps || s.bias.as_ref().is_some_and(|b| b.len() != s.geom.c_out) {
            return Err("weights or bias do not match the convolution".into());
        }
        if s.clamp[0].is_nan() || s.clamp[1].is_nan() || s.clamp[0] > s.clamp[1] {
            return Err(format!("bad clamp {:?}", s.clamp));
        }
        if s.affine.is_some_and(|a| a.iter().any(|v| !v.is_finite())) {
            return Err(format!("bad affine {:?}", s.affine));
        }
        if let Act::HardSigmoid { alpha, beta } = s.act
            && !(alpha.is_finite() && beta.is_finite())
        {
            return Err(format!("bad HardSigmoid α {alpha}, β {beta}"));
        }
        let mut bias = vec![0f32; s.geom.c_out.div_ceil(64) * 64];
        if let Some(b) = &s.bias {
            bias[..s.geom.c_out].copy_from_slice(b);
        }
        let plan = if depthwise {
            let cpad = s.geom.c_in.div_ceil(16) * 16;
            let mut w = vec![0f32; taps * cpad];
            for c in 0..s.geom.c_in {
                for t in 0..taps {
                    w[t * cpad + c] = s.weights[c * taps + t];
                }
            }
            let taps = (0..taps).map(|t| (t / kw, (t % kw) * s.geom.dilation[1] * s.geom.c_in)).collect();
            Plan::Depthwise { w, cpad, taps }
        } else {
            let k = taps * s.geom.c_in;
            let direct = kh == 1 && kw == 1 && s.geom.stride == [1, 1] && s.geom.pads == [0; 4];
            let mut blocks = Vec::new();
            let mut c0 = 0;
            while c0 < s.geom.c_out {
                let valid = (s.geom.c_out - c0).min(64);
                let width = valid.div_ceil(16) * 16;
                let mut packed = vec![0f32; k * width];
                for j in 0..valid {
                    for c in 0..s.geom.c_in {
                        for t in 0..taps {
                            packed[(t * s.geom.c_in + c) * width + j] =
                                s.weights[((c0 + j) * s.geom.c_in + c) * taps + t];
                        }
                    }
                }
                blocks.push(FBlock { c0, width, valid, packed });
                c0 += valid;
            }
            Plan::Gemm { k, direct, blocks }
        };
        // The packed plan holds the weights now: drop the unpacked copy (a model's worth of memory).
        let mut spec = spec;
        spec.weights = Vec::new();
        Ok(FConv { spec, isa, plan, bias })
    }

    pub fn spec(&self) -> &FConvSpec {
        &self.spec
    }

    pub fn output_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        self.geom().output_hw(h, w)
    }

    /// `x: [n, h, w, c_in]` → `y: [n, oh, ow, c_out]`, both NHWC f32.
    pub fn run(&self, x: &[f32], n: usize, h: usize, w: usize, y: &mut [f32]) -> Result<(), String> {
        self.run_into(x, [n, h, w], y, self.spec.geom.c_out, 0)
    }

    /// `y = clamp(conv(x) + residual)`, `residual` of the output's shape: a residual Add fused into the output
    /// stage (added to each tile while it is in cache, not in a pass of its own). Group-1 convolutions only.
    pub fn run_add(&self, x: &[f32], [n, h, w]: [usize; 3], residual: &[f32], y: &mut [f32]) -> Result<(), String> {
        let (oh, ow) = self.geom().check(x.len(), [n, h, w], y.len(), self.spec.geom.c_out)?;
        let Plan::Gemm { k, direct, blocks } = &self.plan else {
            return Err("a residual is added by group-1 convolutions only".into());
        };
        if residual.len() != y.len() {
            return Err(format!("residual of {} values for an output of {}", residual.len(), y.len()));
        }
        let out = Out::contiguous(y.as_mut_ptr() as usize, self.spec.geom.c_out, 0, residual.as_ptr() as usize);
        self.run_gemm(x, [n, h, w], (oh, ow), (*k, *direct, blocks), out);
        Ok(())
    }

    /// As [`FConv::run`], writing channels `offset..offset + c_out` of an output whose pixels are `ld` floats
    /// apart (a channel concatenation written in place). Group-1 convolutions only, unless `ld == c_out`.
    pub fn run_into(
        &self,
        x: &[f32],
        [n, h, w]: [usize; 3],
        y: &mut [f32],
        ld: usize,
        offset: usize,
    ) -> Result<(), String> {
        let (oh, ow) = self.geom().check(x.len(), [n, h, w], y.len(), ld)?;
        let s = &self.spec;
        if offset + s.geom.c_out > ld {
            return Err(format!("channels {offset}..{} do not fit {ld} per pixel", offset + s.geom.c_out));
        }
        match &self.plan {
            Plan::Gemm { k, direct, blocks } => {
                let out = Out::contiguous(y.as_mut_ptr() as usize, ld, offset, 0);
                self.run_gemm(x, [n, h, w], (oh, ow), (*k, *direct, blocks), out)
            }
            Plan::Depthwise { .. } => {
                if ld != s.geom.c_out {
                    return Err("a depthwise convolution writes a whole output".into());
                }
                let y_addr = y.as_mut_ptr() as usize;
                self.geom().for_each_row(x, [n, h, w], (oh, ow), None, |row_ptrs, r| {
                    // SAFETY: output row `r` (ow·c floats) is written by one part only.
                    let yrow = unsafe {
                        std::slice::from_raw_parts_mut((y_addr as *mut f32).add(r * ow * s.geom.c_in), ow * s.geom.c_in)
                    };
                    self.depthwise_out_row(row_ptrs, w, yrow);
                });
            }
        }
        Ok(())
    }

    /// As [`FConv::run`] for a 1×1 convolution (stride 1, unpadded), input pixel `(b, y, x)` (row `r = b·h + y`)
    /// writing its `c_out` values at `r·pitch + x·ld + offset` of `y`: a transposed convolution whose stride is its
    /// kernel writes each kernel row's outputs this way (`ld = kw·c_out` apart within a row, rows `pitch` apart).
    pub fn run_pitched(
        &self,
        x: &[f32],
        [n, h, w]: [usize; 3],
        y: &mut [f32],
        [ld, pitch, offset]: [usize; 3],
    ) -> Result<(), String> {
        let s = &self.spec;
        let Plan::Gemm { k, direct: true, blocks } = &self.plan else {
            return Err("a pitched output needs a 1×1, stride-1, unpadded convolution".into());
        };
        let (rows, c_out) = (n * h, s.geom.c_out);
        if x.len() != rows * w * s.geom.c_in {
            return Err(format!("buffer sizes do not match [{n}, {h}, {w}, {}]", s.geom.c_in));
        }
        if rows == 0 || w == 0 {
            return Ok(());
        }
        let last = (rows - 1).checked_mul(pitch).and_then(|v| v.checked_add((w - 1) * ld + offset + c_out));
        if ld < c_out || pitch < w * ld || last.is_none_or(|l| l > y.len()) {
            return Err(format!("output of {} floats: ld {ld}, pitch {pitch}, offset {offset} do not fit", y.len()));
        }
        let out = Out { y: y.as_mut_ptr() as usize, ld, offset, residual: 0, row: w, pitch, slots: 0, first: 0 };
        self.run_gemm(x, [n, h, w], (h, w), (*k, true, blocks), out);
        Ok(())
    }

    fn run_gemm(
        &self,
        x: &[f32],
        [n, h, w]: [usize; 3],
        (oh, ow): (usize, usize),
        (k, direct, blocks): (usize, bool, &[FBlock]),
        out: Out,
    ) {
        let s = &self.spec;
        let macs = n * oh * ow * k * s.geom.c_out;
        if direct {
            let tiles = GemmTiles { k, rows: RowSource::Direct, macs };
            return self.gemm_tiles(x, [n, h, w], (oh, ow), &tiles, blocks, &[], out);
        }
        // An implicit GEMM over the zero-padded input: depth `(ky·kw + kx)·c + ci` of an output pixel is
        // `koff` floats after its window's first element.
        let run = |xp: &[f32], [hp, wp]: [usize; 2]| {
            let [_, kw] = s.geom.kernel;
            let koff: Vec<usize> = (0..k)
                .map(|kk| {
                    let (t, ci) = (kk / s.geom.c_in, kk % s.geom.c_in);
                    ((t / kw) * s.geom.dilation[0] * wp + (t % kw) * s.geom.dilation[1]) * s.geom.c_in + ci
                })
                .collect();
            let tiles = GemmTiles { k, rows: RowSource::Padded, macs };
            self.gemm_tiles(xp, [n, hp, wp], (oh, ow), &tiles, blocks, &koff, out);
        };
        if s.geom.pads == [0; 4] {
            return run(x, [h, w]);
        }
        PADDED.with(|cell| {
            // A re-entrant call (a kernel inside a kernel) pads into a buffer of its own.
            let (mut shared, mut own) = (cell.try_borrow_mut(), Vec::new());
            let buf = shared.as_deref_mut().unwrap_or(&mut own);
            let hw = self.geom().pad_input(x, [n, h, w], 0.0, buf);
            run(buf, hw)
        })
    }

    /// The GEMM over `tiles`' rows; `koff` empty: rows are `k` contiguous floats, else depth `kk` of a row is at
    /// `row + koff[kk]`.
    #[allow(clippy::too_many_arguments)]
    fn gemm_tiles(
        &self,
        x: &[f32],
        nhw: [usize; 3],
        ohw: (usize, usize),
        tiles: &GemmTiles<f32>,
        blocks: &[FBlock],
        koff: &[usize],
        out: Out,
    ) {
        let (y_addr, residual) = (out.y, out.residual);
        let (s, k) = (&self.spec, tiles.k);
        // With a residual the kernels store the sums unclamped; the residual, the clamp and the activation follow.
        // Without, the kernels' last pass applies the clamp and the activation to each tile.
        let (clamp, post) = if residual == 0 {
            (s.clamp, Post { act: s.act, affine: s.affine })
        } else {
            ([f32::NEG_INFINITY, f32::INFINITY], Post::NONE)
        };
        self.geom().for_each_gemm_tile(x, nhw, ohw, tiles, blocks, |rows, r0, blocks| {
            let mut out_ptrs = [std::ptr::null_mut::<f32>(); DIRECT_ROWS];
            for (i, p) in out_ptrs.iter_mut().enumerate().take(rows.len()) {
                // Each (row tile, channel block) is written by exactly one part.
                *p = (y_addr as *mut f32).wrapping_add(out.at(r0 + i));
            }
            let nr = rows.len();
            for b in blocks {
                // The depth in passes of equal length: each pass's weights (at most `KC_FLOATS`) stay in L1 while
                // the tile's rows use them; the output holds the partial sums between passes.
                let passes = (k * b.width).div_ceil(KC_FLOATS).max(1);
                let step = k.div_ceil(passes);
                let mut k0 = 0;
                while k0 < k {
                    let kc = (k - k0).min(step);
                    let part = KPart { k0, kc, first: k0 == 0, last: k0 + kc == k };
                    // SAFETY: row pointers address `k` readable floats (at the `koff` offsets when given); output
                    // rows hold `ld` floats.
                    unsafe {
                        if koff.is_empty() {
                            let rows_k: [*const f32; DIRECT_ROWS] =
                                std::array::from_fn(|i| rows.get(i).map_or(std::ptr::null(), |p| p.wrapping_add(k0)));
                            let outs = &out_ptrs[..nr];
                            gemm_block(self.isa, &rows_k[..nr], outs, part, b, &self.bias, clamp, &[], post);
                        } else {
                            let koff = &koff[k0..k0 + kc];
                            gemm_block(self.isa, rows, &out_ptrs[..nr], part, b, &self.bias, clamp, koff, post);
                        }
                    }
                    k0 += kc;
                }
                if residual != 0 {
                    for (i, &o) in out_ptrs[..nr].iter().enumerate() {
                        // SAFETY: the residual has the output's layout; this part alone writes these channels of
                        // these rows (the ones its passes just stored).
                        let (o, r) = unsafe {
                            (
                                std::slice::from_raw_parts_mut(o.add(b.c0), b.valid),
                                std::slice::from_raw_parts(
                                    (residual as *const f32).add(out.at(r0 + i) + b.c0),
                                    b.valid,
                                ),
                            )
                        };
                        for (v, &a) in o.iter_mut().zip(r) {
                            *v = clampf(*v + a, s.clamp);
                        }
                        s.act.apply_isa(self.isa, s.affine, o);
                    }
                }
            }
        });
    }

    fn geom(&self) -> Window {
        self.spec.geom.window()
    }

    /// One output row (`yrow`: `ow·c` floats) of a depthwise plan, its activation and affine applied. `rows[ky]`
    /// is the input row (of an input `w` pixels wide) kernel row `ky` reads, as if padded left and right: only the
    /// columns inside the image are read, and rows in the top/bottom padding are null (`Window::for_each_row`
    /// without a pad value).
    fn depthwise_out_row(&self, rows: &[*const f32], w: usize, yrow: &mut [f32]) {
        let Plan::Depthwise { w: wt, cpad, taps } = &self.plan else { unreachable!("a depthwise plan") };
        let (g, pl) = (&self.spec.geom, self.spec.geom.pads[1]);
        let ow = yrow.len() / g.c_in;
        let d = Dw { rows, taps, step: g.stride[1] * g.c_in, c: g.c_in, ow, cols: pl * g.c_in..(pl + w) * g.c_in };
        self.depthwise_row(&d, wt, *cpad, yrow);
        self.spec.act.apply_isa(self.isa, self.spec.affine, yrow);
    }

    fn depthwise_row(&self, d: &Dw<f32>, wt: &[f32], cpad: usize, yrow: &mut [f32]) {
        let s = &self.spec;
        #[cfg(target_arch = "x86_64")]
        if self.isa.is_x86() {
            // SAFETY: the ISA was detected at construction; every row pointer addresses a full padded row.
            unsafe { x86::depthwise_row(self.isa, d, wt, cpad, &self.bias, s.clamp, yrow) };
            return;
        }
        #[cfg(target_arch = "aarch64")]
        if self.isa.is_arm() {
            // SAFETY: as above (NEON is part of every aarch64 level).
            unsafe { aarch64::depthwise_row(d, wt, cpad, &self.bias, s.clamp, yrow) };
            return;
        }
        let c = d.c;
        let mut acc = vec![0f32; c];
        for ox in 0..d.ow {
            acc.copy_from_slice(&self.bias[..c]);
            for (t, &(ky, off)) in d.taps.iter().enumerate() {
                let col = ox * d.step + off;
                if d.rows[ky].is_null() || !d.readable(col) {
                    continue; // zero padding
                }
                // SAFETY: readable columns of a non-null row lie inside the input row.
                let src = unsafe { std::slice::from_raw_parts(d.rows[ky].wrapping_add(col), c) };
                for ((a, &xv), &wv) in acc.iter_mut().zip(src).zip(&wt[t * cpad..][..c]) {
                    *a += xv * wv;
                }
            }
            for (o, &a) in yrow[ox * c..(ox + 1) * c].iter_mut().zip(&acc) {
                *o = clampf(a, s.clamp);
            }
        }
    }
}

/// Where a GEMM stores: the output (pixels `ld` floats apart, this convolution's channels from `offset`; unless
/// `row` is 0, every `row` pixels start a new output row `pitch` floats after the last one's start) and a residual
/// of the same layout to add (0: none), as addresses so the parts can share them.
#[derive(Clone, Copy)]
struct Out {
    y: usize,
    ld: usize,
    offset: usize,
    residual: usize,
    row: usize,
    pitch: usize,
    /// With rows (`row > 0`): a ring of this many rows (0: none), output row `r` in slot `(first + r) % slots`
    /// (a convolution chain's ring of expanded rows).
    slots: usize,
    first: usize,
}

impl Out {
    fn contiguous(y: usize, ld: usize, offset: usize, residual: usize) -> Out {
        Out { y, ld, offset, residual, row: 0, pitch: 0, slots: 0, first: 0 }
    }

    /// Where output pixel `p` starts, in floats from the output's start.
    #[inline]
    fn at(&self, p: usize) -> usize {
        let base = match p.checked_div(self.row) {
            None => p * self.ld,
            Some(r) => {
                let slot = if self.slots == 0 { r } else { (self.first + r) % self.slots };
                slot * self.pitch + (p - r * self.row) * self.ld
            }
        };
        base + self.offset
    }
}

thread_local! {
    /// The zero-padded input of an implicit GEMM, kept between runs (a fresh large buffer each run would be
    /// mapped and faulted in again).
    static PADDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Weights of one pass of a GEMM, `[kc][width]` f32 (32 KiB): they stay in L1 across the rows of a tile.
const KC_FLOATS: usize = 8192;

/// One pass over depths `k0..k0 + kc` of a block: the first starts from the bias, later ones from the partial sums
/// in the output, the last applies the clamp.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KPart {
    pub k0: usize,
    pub kc: usize,
    pub first: bool,
    pub last: bool,
}

/// `out[r][b.c0..b.c0+b.valid] (+)= Σ_{k in part} A[r][k]·w[k]` for every row (bias first, clamp and `post`
/// last), where `A[r][k]` is `rows[r][k - k0]` (`koff` empty) or `rows[r][koff[k - k0]]`.
///
/// # Safety
/// Each `rows[r]` addresses `part.kc` readable floats (already offset to `part.k0`) or, with `koff`, the floats
/// at those offsets; each `outs[r]` addresses `c_out ≥ b.c0 + b.valid` floats.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_block(
    isa: Isa,
    rows: &[*const f32],
    outs: &[*mut f32],
    part: KPart,
    b: &FBlock,
    bias: &[f32],
    clamp: [f32; 2],
    koff: &[usize],
    post: Post,
) {
    #[cfg(target_arch = "x86_64")]
    if isa.is_x86() {
        unsafe { x86::gemm_block(isa, rows, outs, part, b, bias, clamp, koff, post) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if isa.is_arm() {
        unsafe { aarch64::gemm_block(rows, outs, part, b, bias, clamp, koff, post) };
        return;
    }
    let _ = isa;
    let mut acc = vec![0f32; b.width];
    for (&row, &out) in rows.iter().zip(outs) {
        let o = unsafe { std::slice::from_raw_parts_mut(out.add(b.c0), b.valid) };
        if part.first {
            acc.copy_from_slice(&bias[b.c0..b.c0 + b.width]);
        } else {
            acc[..b.valid].copy_from_slice(o);
        }
        for kk in 0..part.kc {
            let xv = unsafe { *row.add(koff.get(kk).copied().unwrap_or(kk)) };
            let k = part.k0 + kk;
            for (a, &wv) in acc.iter_mut().zip(&b.packed[k * b.width..(k + 1) * b.width]) {
                *a += xv * wv;
            }
        }
        for (v, &a) in o.iter_mut().zip(&acc) {
            *v = if part.last { clampf(a, clamp) } else { a };
        }
        if part.last {
            post.act.apply_affine(post.affine, o);
        }
    }
}

/// One block of a sliding depthwise kernel's walk over an output row (see [`slide_blocks`]).
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
#[derive(Clone, Copy)]
pub(crate) struct SlideBlock {
    /// First output pixel and how many of the block's pixels exist (the rest are neither read nor stored).
    pub ox: usize,
    pub n: usize,
    /// An 8-pixel block (else 4).
    pub wide: bool,
    /// The block reads outside the readable columns or past the row's end: each input is checked.
    pub edge: bool,
    /// First channel, and whether the slab is two vectors (else one).
    pub c0: usize,
    pub two: bool,
}

/// The walk of the sliding depthwise kernels over one output row: blocks of 8 output pixels (a last block of 5–7
/// pixels computed as 8, one of 1–4 as 4), each through channels `0..chans` in slabs of two `lanes`-wide vectors
/// (a last odd or partial vector alone), so the input is read in address order.
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
#[inline(always)]
pub(crate) fn slide_blocks(d: &Dw<f32>, lanes: usize, chans: usize, mut block: impl FnMut(SlideBlock)) {
    let inner = d.inner();
    let mut ox = 0;
    while ox < d.ow {
        let n = (d.ow - ox).min(8);
        let wide = n > 4;
        let edge = ox < inner.start || ox + if wide { 8 } else { 4 } > inner.end;
        let mut c0 = 0;
        while c0 < chans {
            let two = chans - c0 > lanes;
            block(SlideBlock { ox, n, wide, edge, c0, two });
            c0 += if two { 2 * lanes } else { lanes };
        }
        ox += n;
    }
}

/// Channels `chans` of one output row of a float depthwise convolution in scalar code (the SIMD kernels' channels
/// past their last vector); taps in the zero padding are skipped.
///
/// # Safety
/// `d.rows[ky]` address full input rows (see `Dw`).
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
pub(crate) unsafe fn depthwise_scalar(
    d: &Dw<f32>,
    wt: &[f32],
    cpad: usize,
    bias: &[f32],
    clamp: [f32; 2],
    chans: std::ops::Range<usize>,
    yrow: &mut [f32],
) {
    for ox in 0..d.ow {
        let o = ox * d.step;
        for ch in chans.clone() {
            let mut a = bias[ch];
            for (t, &(ky, off)) in d.taps.iter().enumerate() {
                if !d.rows[ky].is_null() && d.readable(o + off) {
                    // SAFETY: readable columns of a non-null row lie inside the input row.
                    a += unsafe { *d.rows[ky].wrapping_add(o + off + ch) } * wt[t * cpad + ch];
                }
            }
            yrow[ox * d.c + ch] = clampf(a, clamp);
        }
    }
}

/// `a` clamped to `[lo, hi]`, NaN kept (as the ONNX Clip/Relu).
#[inline(always)]
pub fn clampf(a: f32, [lo, hi]: [f32; 2]) -> f32 {
    if a < lo {
        lo
    } else if a > hi {
        hi
    } else {
        a
    }
}
