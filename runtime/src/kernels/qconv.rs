//! Quantized 2-D convolution on NHWC uint8 activations, int8 weights, int32 accumulation, requantization fused
//! into the output stage. Same arithmetic as [`super::reference::qconv2d`] (tested element for element).
//!
//! The zero point of `x` is folded into the bias once (`b'[o] = b[o] − z_x·Σ w[o]`), padding reads `z_x`, so the
//! inner loops multiply raw bytes:
//! - **GEMM** (`group == 1`): `y[p, o] = Σ_k x̂[p, k]·w[k, o]` with `k = (ky·kw + kx)·c_in + c`. A 1×1, stride-1,
//!   unpadded convolution reads the activation rows directly (no im2col); others gather rows of 48 output
//!   pixels into a small buffer. Weights are packed once in blocks of up to 64 output channels, 4 consecutive
//!   `k` per 32-bit lane (the VNNI `dpbusd` layout).
//! - **Depthwise** (`group == c_in == c_out`): direct, vectorised over channels, on a zero-point-padded copy.
use super::{Isa, for_each_part, requant};

/// A convolution as the QDQ pass writes it (the graph-level description).
#[derive(Debug, Clone, PartialEq)]
pub struct QConvSpec {
    pub c_in: usize,
    pub c_out: usize,
    pub group: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    /// top, left, bottom, right
    pub pads: [usize; 4],
    pub z_x: u8,
    pub z_y: u8,
    /// OIHW `[c_out, c_in / group, kh, kw]`.
    pub weights: Vec<i8>,
    pub bias: Option<Vec<i32>>,
    /// Per output channel `(s_x·s_w[o]) / s_y`.
    pub multiplier: Vec<f32>,
}

/// Rows (output pixels) gathered per im2col tile.
pub(crate) const TILE_ROWS: usize = 48;

pub(crate) struct Block {
    pub c0: usize,
    /// Channels computed (a multiple of 16), ≥ `valid`.
    pub width: usize,
    /// Channels stored.
    pub valid: usize,
    /// `[kp/4][width][4]` int8.
    pub packed: Vec<i8>,
}

enum Plan {
    Gemm {
        kp: usize,
        direct: bool,
        blocks: Vec<Block>,
    },
    /// `w[t][c]` as i32, and the same values as 16-bit lanes (`(w as u16) as i32`) for `pmaddwd`.
    Depthwise {
        w: Vec<i32>,
        w16: Vec<i32>,
        cpad: usize,
    },
}

pub struct QConv {
    spec: QConvSpec,
    isa: Isa,
    plan: Plan,
    /// Bias with the input zero point folded in, padded to a multiple of 64.
    bias: Vec<i32>,
    multiplier: Vec<f32>,
}

impl std::fmt::Debug for QConv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.plan {
            Plan::Gemm { direct: true, .. } => "gemm",
            Plan::Gemm { direct: false, .. } => "im2col-gemm",
            Plan::Depthwise { .. } => "depthwise",
        };
        write!(
            f,
            "QConv({kind}, {}→{}, k{:?}, s{:?}, {})",
            self.spec.c_in,
            self.spec.c_out,
            self.spec.kernel,
            self.spec.stride,
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
        let [kh, kw] = spec.kernel;
        let s = &spec;
        if s.c_in == 0 || s.c_out == 0 || kh == 0 || kw == 0 || s.stride.contains(&0) || s.dilation.contains(&0) {
            return Err(format!("degenerate convolution {s:?}"));
        }
        let depthwise = s.group > 1 && s.group == s.c_in && s.c_out == s.c_in;
        if s.group != 1 && !depthwise {
            return Err(format!("grouped convolution (group {}, {}→{}) is not supported", s.group, s.c_in, s.c_out));
        }
        let cin_g = s.c_in / s.group;
        let taps = kh * kw;
        if s.weights.len() != s.c_out * cin_g * taps
            || s.multiplier.len() != s.c_out
            || s.bias.as_ref().is_some_and(|b| b.len() != s.c_out)
        {
            return Err("weights, bias or multiplier do not match the convolution".into());
        }
        let mut bias = vec![0i32; round_up(s.c_out, 64)];
        let mut multiplier = vec![0f32; round_up(s.c_out, 64)];
        for o in 0..s.c_out {
            let wsum: i64 = s.weights[o * cin_g * taps..(o + 1) * cin_g * taps].iter().map(|&v| v as i64).sum();
            let b = s.bias.as_ref().map_or(0, |b| b[o] as i64) - s.z_x as i64 * wsum;
            bias[o] = i32::try_from(b).map_err(|_| "bias out of the int32 range".to_string())?;
            multiplier[o] = s.multiplier[o];
        }
        let plan = if depthwise {
            let cpad = round_up(s.c_in, 16);
            let mut w = vec![0i32; taps * cpad];
            let mut w16 = vec![0i32; taps * cpad];
            for c in 0..s.c_in {
                for t in 0..taps {
                    let v = s.weights[c * taps + t];
                    w[t * cpad + c] = v as i32;
                    w16[t * cpad + c] = (v as i16 as u16) as i32;
                }
            }
            Plan::Depthwise { w, w16, cpad }
        } else {
            let k = taps * s.c_in;
            let kp = round_up(k, 4);
            let direct = kh == 1 && kw == 1 && s.stride == [1, 1] && s.pads == [0; 4] && s.c_in.is_multiple_of(4);
            let mut blocks = Vec::new();
            let mut c0 = 0;
            while c0 < s.c_out {
                let valid = (s.c_out - c0).min(64);
                let width = round_up(valid, 16);
                let mut packed = vec![0i8; kp * width];
                for j in 0..valid {
                    let o = c0 + j;
                    for c in 0..s.c_in {
                        for t in 0..taps {
                            let kk = t * s.c_in + c;
                            packed[(kk / 4) * width * 4 + j * 4 + kk % 4] = s.weights[(o * s.c_in + c) * taps + t];
                        }
                    }
                }
                blocks.push(Block { c0, width, valid, packed });
                c0 += valid;
            }
            Plan::Gemm { kp, direct, blocks }
        };
        Ok(QConv { spec, isa, plan, bias, multiplier })
    }

    pub fn spec(&self) -> &QConvSpec {
        &self.spec
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn output_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let s = &self.spec;
        super::reference::Conv2d {
            group: s.group,
            kernel: s.kernel,
            stride: s.stride,
            dilation: s.dilation,
            pads: s.pads,
        }
        .output_hw(h, w)
    }

    /// `x: [n, h, w, c_in]` → `y: [n, oh, ow, c_out]`, both NHWC uint8.
    pub fn run(&self, x: &[u8], n: usize, h: usize, w: usize, y: &mut [u8]) -> Result<(), String> {
        let (oh, ow) = self.output_hw(h, w).ok_or_else(|| format!("input {h}x{w} is smaller than the kernel"))?;
        let s = &self.spec;
        if x.len() != n * h * w * s.c_in || y.len() != n * oh * ow * s.c_out {
            return Err(format!("buffer sizes do not match [{n}, {h}, {w}, {}]", s.c_in));
        }
        match &self.plan {
            Plan::Gemm { kp, direct, blocks } => self.run_gemm(x, [n, h, w], (oh, ow), *kp, *direct, blocks, y),
            Plan::Depthwise { w: wt, w16, cpad } => self.run_depthwise(x, [n, h, w], (oh, ow), wt, w16, *cpad, y),
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn run_gemm(
        &self,
        x: &[u8],
        [n, h, w]: [usize; 3],
        (oh, ow): (usize, usize),
        kp: usize,
        direct: bool,
        blocks: &[Block],
        y: &mut [u8],
    ) {
        let s = &self.spec;
        let rows = n * oh * ow;
        let tiles = rows.div_ceil(TILE_ROWS);
        // Enough work per part to pay a thread hand-off (~10 µs).
        let macs = rows * kp * s.c_out;
        let parts = super::threads().min(tiles).min((macs / 200_000).max(1));
        let per = tiles.div_ceil(parts.max(1));
        let y_addr = y.as_mut_ptr() as usize;
        let c_out = s.c_out;
        for_each_part(parts, |part| {
            let mut buf = if direct { Vec::new() } else { vec![s.z_x; TILE_ROWS * kp] };
            let mut row_ptrs = [std::ptr::null::<u8>(); TILE_ROWS];
            let mut out_ptrs = [std::ptr::null_mut::<u8>(); TILE_ROWS];
            for t in part * per..((part + 1) * per).min(tiles) {
                let r0 = t * TILE_ROWS;
                let nr = (rows - r0).min(TILE_ROWS);
                if direct {
                    for i in 0..nr {
                        row_ptrs[i] = x[(r0 + i) * s.c_in..].as_ptr();
                    }
                } else {
                    self.im2col(x, [h, w], (oh, ow), kp, r0, nr, &mut buf);
                    for i in 0..nr {
                        row_ptrs[i] = buf[i * kp..].as_ptr();
                    }
                }
                for (i, p) in out_ptrs.iter_mut().enumerate().take(nr) {
                    // Disjoint rows per part: each output row is written by exactly one tile.
                    *p = (y_addr + (r0 + i) * c_out) as *mut u8;
                }
                for b in blocks {
                    // SAFETY: row pointers address `kp` readable bytes; output rows hold `c_out` bytes each and
                    // tiles are disjoint across parts.
                    unsafe {
                        gemm_block(
                            self.isa,
                            &row_ptrs[..nr],
                            &out_ptrs[..nr],
                            kp,
                            b,
                            &self.bias,
                            &self.multiplier,
                            s.z_y,
                        )
                    };
                }
            }
        });
    }

    /// Gathers rows `r0..r0+nr` of the im2col matrix (NHWC, `k = (ky·kw + kx)·c_in + c`), padding with `z_x`.
    #[allow(clippy::too_many_arguments)]
    fn im2col(
        &self,
        x: &[u8],
        [h, w]: [usize; 2],
        (oh, ow): (usize, usize),
        kp: usize,
        r0: usize,
        nr: usize,
        buf: &mut [u8],
    ) {
        let s = &self.spec;
        let [kh, kw] = s.kernel;
        let c = s.c_in;
        for i in 0..nr {
            let r = r0 + i;
            let (b, rem) = (r / (oh * ow), r % (oh * ow));
            let (oy, ox) = (rem / ow, rem % ow);
            let dst = &mut buf[i * kp..(i + 1) * kp];
            let ix0 = (ox * s.stride[1]) as isize - s.pads[1] as isize;
            let row_inside = ix0 >= 0 && ix0 as usize + (kw - 1) * s.dilation[1] < w && s.dilation[1] == 1;
            for ky in 0..kh {
                let iy = (oy * s.stride[0] + ky * s.dilation[0]) as isize - s.pads[0] as isize;
                if row_inside && iy >= 0 && (iy as usize) < h {
                    // The window's row is contiguous in NHWC: one copy of kw·c bytes.
                    let src = ((b * h + iy as usize) * w + ix0 as usize) * c;
                    dst[ky * kw * c..(ky + 1) * kw * c].copy_from_slice(&x[src..src + kw * c]);
                    continue;
                }
                for kx in 0..kw {
                    let ix = (ox * s.stride[1] + kx * s.dilation[1]) as isize - s.pads[1] as isize;
                    let d = &mut dst[(ky * kw + kx) * c..(ky * kw + kx + 1) * c];
                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                        d.fill(s.z_x);
                    } else {
                        let src = ((b * h + iy as usize) * w + ix as usize) * c;
                        d.copy_from_slice(&x[src..src + c]);
                    }
                }
            }
            dst[kh * kw * c..].fill(s.z_x);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_depthwise(
        &self,
        x: &[u8],
        [n, h, w]: [usize; 3],
        (oh, ow): (usize, usize),
        wt: &[i32],
        w16: &[i32],
        cpad: usize,
        y: &mut [u8],
    ) {
        let s = &self.spec;
        let c = s.c_in;
        let [pt, pl, pb, pr] = s.pads;
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        // Zero-point-padded copy: the inner loops need no bounds checks; the fold in `bias` covers pad taps.
        let padded: std::borrow::Cow<[u8]> = if s.pads == [0; 4] {
            std::borrow::Cow::Borrowed(x)
        } else {
            let mut p = vec![s.z_x; n * hp * wp * c];
            for b in 0..n {
                for iy in 0..h {
                    let src = ((b * h + iy) * w) * c;
                    let dst = ((b * hp + iy + pt) * wp + pl) * c;
                    p[dst..dst + w * c].copy_from_slice(&x[src..src + w * c]);
                }
            }
            std::borrow::Cow::Owned(p)
        };
        let xp: &[u8] = &padded;
        let rows = n * oh;
        let macs = n * oh * ow * c * s.kernel[0] * s.kernel[1];
        let parts = super::threads().min(rows).min((macs / 100_000).max(1));
        let per = rows.div_ceil(parts.max(1));
        let y_addr = y.as_mut_ptr() as usize;
        for_each_part(parts, |part| {
            for r in part * per..((part + 1) * per).min(rows) {
                let (b, oy) = (r / oh, r % oh);
                // SAFETY: output row `r` (ow·c bytes) is written by this part only; reads stay inside `xp`.
                let yrow = unsafe { std::slice::from_raw_parts_mut((y_addr + r * ow * c) as *mut u8, ow * c) };
                let dw = Dw { xp, wp, c, cpad, img: b * hp * wp * c, oy, ow, wt, w16 };
                self.depthwise_row(&dw, yrow);
            }
        });
    }

    fn depthwise_row(&self, d: &Dw, yrow: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if self.isa >= Isa::Avx2 {
            // SAFETY: the ISA was detected at construction (or capped below what the CPU has).
            unsafe { super::x86::depthwise_row(self.isa, &self.spec, d, &self.bias, &self.multiplier, yrow) };
            return;
        }
        let s = &self.spec;
        let [kh, kw] = s.kernel;
        let z = s.z_y as i32;
        let mut acc = vec![0i32; d.c];
        for ox in 0..d.ow {
            acc.copy_from_slice(&self.bias[..d.c]);
            for ky in 0..kh {
                for kx in 0..kw {
                    let t = ky * kw + kx;
                    let iy = d.oy * s.stride[0] + ky * s.dilation[0];
                    let ix = ox * s.stride[1] + kx * s.dilation[1];
                    let src = &d.xp[d.img + (iy * d.wp + ix) * d.c..][..d.c];
                    let wv = &d.wt[t * d.cpad..][..d.c];
                    for ((a, &xv), &wv) in acc.iter_mut().zip(src).zip(wv) {
                        *a += xv as i32 * wv;
                    }
                }
            }
            for (ch, &a) in acc.iter().enumerate() {
                yrow[ox * d.c + ch] = requant(a, self.multiplier[ch], z);
            }
        }
    }
}

/// One output row of a depthwise convolution: what the kernels read.
pub(crate) struct Dw<'a> {
    /// Padded input (all images), `[n, hp, wp, c]`.
    pub xp: &'a [u8],
    pub wp: usize,
    pub c: usize,
    pub cpad: usize,
    /// Offset of this image in `xp`.
    pub img: usize,
    pub oy: usize,
    pub ow: usize,
    pub wt: &'a [i32],
    pub w16: &'a [i32],
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
    z_y: u8,
) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        unsafe { super::x86::gemm_block(isa, rows, outs, kp, b, bias, m, z_y) };
        return;
    }
    let _ = isa;
    let z = z_y as i32;
    let mut acc = vec![0i32; b.width];
    for (&row, &out) in rows.iter().zip(outs) {
        acc.copy_from_slice(&bias[b.c0..b.c0 + b.width]);
        let xr = unsafe { std::slice::from_raw_parts(row, kp) };
        for (k4, xs) in xr.chunks_exact(4).enumerate() {
            let wblk = &b.packed[k4 * b.width * 4..(k4 + 1) * b.width * 4];
            for (a, wq) in acc.iter_mut().zip(wblk.chunks_exact(4)) {
                *a += xs[0] as i32 * wq[0] as i32
                    + xs[1] as i32 * wq[1] as i32
                    + xs[2] as i32 * wq[2] as i32
                    + xs[3] as i32 * wq[3] as i32;
            }
        }
        let o = unsafe { std::slice::from_raw_parts_mut(out.add(b.c0), b.valid) };
        for (j, v) in o.iter_mut().enumerate() {
            *v = requant(acc[j], m[b.c0 + j], z);
        }
    }
}
