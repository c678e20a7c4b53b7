//! x86-64 fp32 kernels of `fconv`: AVX-512F (16 lanes) and AVX2+FMA (8 lanes).
#![allow(clippy::needless_range_loop)] // register tiles are indexed [row][vector] on purpose
use std::arch::x86_64::*;

use crate::{Isa, unroll};
// Clamps are written `min(hi, max(lo, v))`: the vector min/max return their second operand when one is NaN, so
// a NaN result stays NaN (as in the ONNX ops).
use super::{Act, FBlock, KPart, Post};
use crate::qconv::Dw;
use crate::qconv::row_tile;
use crate::qelem::x86::exp_nonpositive_512;

/// # Safety
/// See `fconv::gemm_block`; `isa` must be supported by the CPU.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_block(
    isa: Isa,
    rows: &[*const f32],
    outs: &[*mut f32],
    k: KPart,
    b: &FBlock,
    bias: &[f32],
    clamp: [f32; 2],
    koff: &[usize],
    post: Post,
) {
    unsafe {
        if isa >= Isa::Avx512Vnni {
            if koff.is_empty() {
                tiles_512_by_width::<false>(rows, outs, k, b, bias, clamp, koff, post)
            } else {
                tiles_512_by_width::<true>(rows, outs, k, b, bias, clamp, koff, post)
            }
        } else {
            tiles_avx2(rows, outs, k, b, bias, clamp, koff);
            if k.last && !post.is_none() {
                for &o in outs {
                    post.act.apply_isa(isa, post.affine, std::slice::from_raw_parts_mut(o.add(b.c0), b.valid));
                }
            }
        }
    }
}

/// `1 / d`, correctly rounded (as the scalar sigmoid divides): the 14-bit estimate and a Newton step measured no
/// faster in the convolutions' output stages on Zen 4, and the division keeps the scalar code's results.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn recip_512(d: __m512) -> __m512 {
    _mm512_div_ps(_mm512_set1_ps(1.0), d)
}

/// `e = e^−|v|`, `1 / (1 + e)` and the lanes where `v < 0`: σ(v) is the reciprocal where `v ≥ 0`, `e` times it
/// below.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sigmoid_parts_512(v: __m512) -> (__m512, __m512, __mmask16) {
    // −|v|: the sign bit set.
    let neg = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MIN)));
    let e = unsafe { exp_nonpositive_512(neg) };
    let inv = unsafe { recip_512(_mm512_add_ps(_mm512_set1_ps(1.0), e)) };
    (e, inv, _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_setzero_ps()))
}

/// [`Act`] then the affine on 16 lanes, in registers (a convolution's output stage) or over a slice
/// ([`apply_512`]): SiLU and the sigmoid from `e = e^−|x|` and `1 / (1 + e)` (as `fconv::sigmoid`); HardSwish, HardSigmoid and the affine in the graph's order and
/// roundings. NaN stays NaN.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn act_512(post: Post, v: __m512) -> __m512 {
    let sigmoid_parts = |v| unsafe { sigmoid_parts_512(v) };
    let v = match post.act {
        Act::None => v,
        Act::Silu => {
            let (e, inv, below) = sigmoid_parts(v);
            _mm512_mul_ps(_mm512_mask_mul_ps(v, below, v, e), inv)
        }
        Act::Sigmoid => {
            let (e, inv, below) = sigmoid_parts(v);
            _mm512_mask_mul_ps(inv, below, inv, e)
        }
        Act::HardSwish => {
            let c = _mm512_min_ps(
                _mm512_set1_ps(6.0),
                _mm512_max_ps(_mm512_setzero_ps(), _mm512_add_ps(v, _mm512_set1_ps(3.0))),
            );
            _mm512_div_ps(_mm512_mul_ps(v, c), _mm512_set1_ps(6.0))
        }
        Act::HardSigmoid { alpha, beta } => {
            let a = _mm512_add_ps(_mm512_mul_ps(v, _mm512_set1_ps(alpha)), _mm512_set1_ps(beta));
            _mm512_min_ps(_mm512_set1_ps(1.0), _mm512_max_ps(_mm512_setzero_ps(), a))
        }
    };
    match post.affine {
        None => v,
        Some([scale, shift]) => _mm512_add_ps(_mm512_mul_ps(v, _mm512_set1_ps(scale)), _mm512_set1_ps(shift)),
    }
}

/// [`act_512`] over a slice, the last partial vector masked.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn apply_512(post: Post, v: &mut [f32]) {
    let (chunks, rest) = v.as_chunks_mut::<16>();
    for c in chunks {
        unsafe { _mm512_storeu_ps(c.as_mut_ptr(), act_512(post, _mm512_loadu_ps(c.as_ptr()))) };
    }
    if !rest.is_empty() {
        let m = ((1u32 << rest.len()) - 1) as u16;
        unsafe {
            let x = _mm512_maskz_loadu_ps(m, rest.as_ptr());
            _mm512_mask_storeu_ps(rest.as_mut_ptr(), m, act_512(post, x));
        }
    }
}

/// The register tile for the block's width: `MR` rows × `NV` vectors.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tiles_512_by_width<const OFF: bool>(
    rows: &[*const f32],
    outs: &[*mut f32],
    k: KPart,
    b: &FBlock,
    bias: &[f32],
    clamp: [f32; 2],
    koff: &[usize],
    post: Post,
) {
    unsafe {
        match b.width / 16 {
            4 => tiles_512::<6, 4, OFF>(rows, outs, k, b, bias, clamp, koff, post),
            3 => tiles_512::<8, 3, OFF>(rows, outs, k, b, bias, clamp, koff, post),
            // With offsets, twelve rows would spill: the offset loads get hoisted into twelve more registers.
            2 if OFF => tiles_512::<8, 2, OFF>(rows, outs, k, b, bias, clamp, koff, post),
            2 => tiles_512::<12, 2, OFF>(rows, outs, k, b, bias, clamp, koff, post),
            // One vector of channels: with offsets, eight rows keep their pointers in registers (sixteen reload
            // them for every broadcast); 1.1–1.2× on YOLOv8n's 16-channel 3×3 convolutions.
            _ if OFF => tiles_512::<8, 1, OFF>(rows, outs, k, b, bias, clamp, koff, post),
            _ => tiles_512::<16, 1, OFF>(rows, outs, k, b, bias, clamp, koff, post),
        }
    }
}

/// `OFF`: depth `kk` of a row is at `koff[kk]` (an implicit GEMM), else at `kk`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tiles_512<const MR: usize, const NV: usize, const OFF: bool>(
    rows: &[*const f32],
    outs: &[*mut f32],
    k: KPart,
    b: &FBlock,
    bias: &[f32],
    clamp: [f32; 2],
    koff: &[usize],
    post: Post,
) {
    let mut r0 = 0;
    while r0 < rows.len() {
        let (rp, nr) = row_tile::<MR, f32>(rows, r0);
        if nr < MR / 2 {
            // A short last tile (a GEMV at batch 1, the 49th pixel of a 7×7 image): one row at a time rather than
            // MR rows of which most repeat.
            for r in r0..r0 + nr {
                unsafe { tile_512::<1, NV, OFF>(&[rows[r]], &outs[r..r + 1], k, b, bias, clamp, koff, post) };
            }
        } else {
            unsafe { tile_512::<MR, NV, OFF>(&rp, &outs[r0..r0 + nr], k, b, bias, clamp, koff, post) };
        }
        r0 += nr;
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_512<const MR: usize, const NV: usize, const OFF: bool>(
    rows: &[*const f32; MR],
    outs: &[*mut f32],
    part: KPart,
    b: &FBlock,
    bias: &[f32],
    clamp: [f32; 2],
    koff: &[usize],
    post: Post,
) {
    unsafe {
        let masks: [u16; NV] = std::array::from_fn(|j| {
            let left = b.valid.saturating_sub(16 * j).min(16);
            if left == 16 { u16::MAX } else { (1u16 << left) - 1 }
        });
        let bv: [__m512; NV] = std::array::from_fn(|j| _mm512_loadu_ps(bias.as_ptr().add(b.c0 + 16 * j)));
        let mut acc = [bv; MR];
        if !part.first {
            unroll!(MR, r => {
                if let Some(&o) = outs.get(r) {
                    unroll!(NV, j => { acc[r][j] = _mm512_maskz_loadu_ps(masks[j], o.add(b.c0 + 16 * j)); });
                }
            });
        }
        let mut wp = b.packed.as_ptr().add(part.k0 * b.width);
        for kk in 0..part.kc {
            let mut wv = [_mm512_setzero_ps(); NV];
            unroll!(NV, j => { wv[j] = _mm512_loadu_ps(wp.add(16 * j)); });
            let o = if OFF { *koff.get_unchecked(kk) } else { kk };
            unroll!(MR, r => {
                let a = _mm512_set1_ps(*rows[r].add(o));
                unroll!(NV, j => { acc[r][j] = _mm512_fmadd_ps(a, wv[j], acc[r][j]); });
            });
            wp = wp.add(b.width);
        }
        let (lo, hi) = (_mm512_set1_ps(clamp[0]), _mm512_set1_ps(clamp[1]));
        unroll!(NV, j => {
            unroll!(MR, r => {
                if let Some(&o) = outs.get(r) {
                    let v = if part.last {
                        let v = _mm512_min_ps(hi, _mm512_max_ps(lo, acc[r][j]));
                        if post.is_none() { v } else { act_512(post, v) }
                    } else {
                        acc[r][j]
                    };
                    _mm512_mask_storeu_ps(o.add(b.c0 + 16 * j), masks[j], v);
                }
            });
        });
    }
}

/// 16 channels (two vectors) of 6 rows at a time.
#[target_feature(enable = "avx2,fma")]
unsafe fn tiles_avx2(
    rows: &[*const f32],
    outs: &[*mut f32],
    part: KPart,
    b: &FBlock,
    bias: &[f32],
    clamp: [f32; 2],
    koff: &[usize],
) {
    const MR: usize = 6;
    unsafe {
        let (lo, hi) = (_mm256_set1_ps(clamp[0]), _mm256_set1_ps(clamp[1]));
        let mut r0 = 0;
        while r0 < rows.len() {
            let (rp, nr) = row_tile::<MR, f32>(rows, r0);
            for j0 in (0..b.width).step_by(16) {
                let valid = b.valid.saturating_sub(j0).min(16);
                if valid == 0 {
                    break;
                }
                let bv =
                    [_mm256_loadu_ps(bias.as_ptr().add(b.c0 + j0)), _mm256_loadu_ps(bias.as_ptr().add(b.c0 + j0 + 8))];
                let mut acc = [bv; MR];
                if !part.first {
                    unroll!(MR, r => {
                        if r < nr {
                            let mut tmp = [0f32; 16];
                            std::ptr::copy_nonoverlapping(outs[r0 + r].add(b.c0 + j0), tmp.as_mut_ptr(), valid);
                            acc[r] = [_mm256_loadu_ps(tmp.as_ptr()), _mm256_loadu_ps(tmp.as_ptr().add(8))];
                        }
                    });
                }
                let mut wp = b.packed.as_ptr().add(part.k0 * b.width + j0);
                for kk in 0..part.kc {
                    let w = [_mm256_loadu_ps(wp), _mm256_loadu_ps(wp.add(8))];
                    let o = koff.get(kk).copied().unwrap_or(kk);
                    unroll!(MR, r => {
                        let a = _mm256_set1_ps(*rp[r].add(o));
                        acc[r][0] = _mm256_fmadd_ps(a, w[0], acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(a, w[1], acc[r][1]);
                    });
                    wp = wp.add(b.width);
                }
                unroll!(MR, r => {
                    if r < nr {
                        let fin = |v| if part.last { _mm256_min_ps(hi, _mm256_max_ps(lo, v)) } else { v };
                        let mut tmp = [0f32; 16];
                        _mm256_storeu_ps(tmp.as_mut_ptr(), fin(acc[r][0]));
                        _mm256_storeu_ps(tmp.as_mut_ptr().add(8), fin(acc[r][1]));
                        std::ptr::copy_nonoverlapping(tmp.as_ptr(), outs[r0 + r].add(b.c0 + j0), valid);
                    }
                });
            }
            r0 += nr;
        }
    }
}

/// One output row of a float depthwise convolution (see `FConv::depthwise_row`).
///
/// # Safety
/// `isa` must be supported by the CPU; `d.rows[ky]` address full padded input rows.
pub(crate) unsafe fn depthwise_row(
    isa: Isa,
    d: &Dw<f32>,
    wt: &[f32],
    cpad: usize,
    bias: &[f32],
    clamp: [f32; 2],
    yrow: &mut [f32],
) {
    unsafe {
        if isa >= Isa::Avx512Vnni {
            macro_rules! slide {
                ($kw:literal, $s:literal) => {{
                    dw_512_slide_row::<$kw, $s>(d, wt, cpad, bias, clamp, yrow);
                    return;
                }};
            }
            match d.slide_shape() {
                Some((3, 1)) => slide!(3, 1),
                Some((3, 2)) => slide!(3, 2),
                Some((5, 1)) => slide!(5, 1),
                Some((5, 2)) => slide!(5, 2),
                Some((7, 1)) => slide!(7, 1),
                Some((7, 2)) => slide!(7, 2),
                // Other widths and dilations: tap by tap.
                _ => {}
            }
            let inner = d.inner();
            let mut c0 = 0;
            while c0 < d.c {
                // Two vectors (32 channels) per pass; a last odd vector alone.
                if d.c - c0 > 16 {
                    dw_512_row::<2>(d, &inner, wt, cpad, bias, clamp, c0, yrow);
                    c0 += 32;
                } else {
                    dw_512_row::<1>(d, &inner, wt, cpad, bias, clamp, c0, yrow);
                    c0 += 16;
                }
            }
        } else {
            dw_avx2(d, wt, cpad, bias, clamp, yrow)
        }
    }
}

/// One output row of a `KW`-wide kernel with stride `S` and dilation 1, walked by `fconv::slide_blocks` (16-lane
/// vectors, the last one masked).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn dw_512_slide_row<const KW: usize, const S: usize>(
    d: &Dw<f32>,
    wt: &[f32],
    cpad: usize,
    bias: &[f32],
    clamp: [f32; 2],
    yrow: &mut [f32],
) {
    let mask = |c0: usize| {
        let left = d.c.saturating_sub(c0).min(16);
        if left == 16 { u16::MAX } else { (1u16 << left) - 1 }
    };
    super::slide_blocks(d, 16, d.c, |b| {
        macro_rules! block {
            ($nv:literal, $r:literal, $edge:literal) => {
                // SAFETY: as `depthwise_row`: AVX-512 was detected, the rows address full padded input rows.
                unsafe {
                    dw_512_slide::<$nv, $r, KW, S, $edge>(
                        d,
                        wt,
                        cpad,
                        bias,
                        clamp,
                        b.c0,
                        &std::array::from_fn(|j| mask(b.c0 + 16 * j)),
                        b.ox,
                        b.n,
                        yrow,
                    )
                }
            };
        }
        match (b.two, b.wide, b.edge) {
            (true, true, false) => block!(2, 8, false),
            (true, true, true) => block!(2, 8, true),
            (true, false, false) => block!(2, 4, false),
            (true, false, true) => block!(2, 4, true),
            (false, true, false) => block!(1, 8, false),
            (false, true, true) => block!(1, 8, true),
            (false, false, false) => block!(1, 4, false),
            (false, false, true) => block!(1, 4, true),
        }
    });
}

/// `R` output pixels from `ox` × `NV` channel vectors from `c0`, sliding along each kernel row: the `(R−1)·S + KW`
/// input pixels the block's windows cover are loaded once each and multiplied into every accumulator whose
/// window holds them, with that kernel row's `KW` weight vectors kept in registers. Per kernel row that is
/// `((R−1)·S + 2·KW)·NV` loads for `R·KW·NV` multiply-adds (the tap-by-tap block loads once per multiply-add).
/// With `EDGE`, input pixels outside the readable columns load nothing (an empty mask gives zeros); only the
/// first `n` pixels are stored.
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_512_slide<const NV: usize, const R: usize, const KW: usize, const S: usize, const EDGE: bool>(
    d: &Dw<f32>,
    wt: &[f32],
    cpad: usize,
    bias: &[f32],
    clamp: [f32; 2],
    c0: usize,
    masks: &[u16; NV],
    ox: usize,
    n: usize,
    yrow: &mut [f32],
) {
    let kh = d.taps.len() / KW;
    let c = d.c;
    unsafe {
        let bv: [__m512; NV] = std::array::from_fn(|j| _mm512_loadu_ps(bias.as_ptr().add(c0 + 16 * j)));
        let mut acc = [bv; R];
        let base = ox * d.step;
        for ky in 0..kh {
            let row = *d.rows.get_unchecked(ky);
            if row.is_null() {
                continue;
            }
            let wrow = wt.as_ptr().add(ky * KW * cpad + c0);
            let w: [[__m512; NV]; KW] =
                std::array::from_fn(|kx| std::array::from_fn(|j| _mm512_loadu_ps(wrow.add(kx * cpad + 16 * j))));
            let mut src = row.wrapping_add(base + c0);
            unroll!((R - 1) * S + KW, p => {
                let live = !EDGE || d.readable(base + p * c);
                let x: [__m512; NV] = std::array::from_fn(|j| {
                    _mm512_maskz_loadu_ps(if live { masks[j] } else { 0 }, src.wrapping_add(16 * j))
                });
                unroll!(R, r => {
                    if p >= S * r && p - S * r < KW {
                        let kx = p - S * r;
                        unroll!(NV, j => {
                            acc[r][j] = _mm512_fmadd_ps(x[j], w[kx][j], acc[r][j]);
                        });
                    }
                });
                src = src.wrapping_add(c);
            });
        }
        let (lo, hi) = (_mm512_set1_ps(clamp[0]), _mm512_set1_ps(clamp[1]));
        let dst = yrow.as_mut_ptr().add(ox * c + c0);
        unroll!(R, r => {
            if !EDGE || r < n {
                unroll!(NV, j => {
                    let v = _mm512_min_ps(hi, _mm512_max_ps(lo, acc[r][j]));
                    _mm512_mask_storeu_ps(dst.add(r * c + 16 * j), masks[j], v);
                });
            }
        });
    }
}

/// Channels `c0..c0+16·NV` (the last vector masked) of one output row, in blocks of 8 output pixels (then 4, 2,
/// 1); blocks outside `inner` (the pixels whose window lies inside the row) check each tap of each pixel.
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_512_row<const NV: usize>(
    d: &Dw<f32>,
    inner: &std::ops::Range<usize>,
    wt: &[f32],
    cpad: usize,
    bias: &[f32],
    clamp: [f32; 2],
    c0: usize,
    yrow: &mut [f32],
) {
    let masks: [u16; NV] = std::array::from_fn(|j| {
        let left = d.c.saturating_sub(c0 + 16 * j).min(16);
        if left == 16 { u16::MAX } else { (1u16 << left) - 1 }
    });
    let mut ox = 0;
    unsafe {
        while ox < d.ow {
            let r = match d.ow - ox {
                8.. => 8,
                4.. => 4,
                2.. => 2,
                _ => 1,
            };
            let edge = ox < inner.start || ox + r > inner.end;
            match (r, edge) {
                (8, false) => dw_512_block::<NV, 8, false>(d, wt, cpad, bias, clamp, c0, &masks, ox, yrow),
                (8, true) => dw_512_block::<NV, 8, true>(d, wt, cpad, bias, clamp, c0, &masks, ox, yrow),
                (4, false) => dw_512_block::<NV, 4, false>(d, wt, cpad, bias, clamp, c0, &masks, ox, yrow),
                (4, true) => dw_512_block::<NV, 4, true>(d, wt, cpad, bias, clamp, c0, &masks, ox, yrow),
                (2, false) => dw_512_block::<NV, 2, false>(d, wt, cpad, bias, clamp, c0, &masks, ox, yrow),
                (2, true) => dw_512_block::<NV, 2, true>(d, wt, cpad, bias, clamp, c0, &masks, ox, yrow),
                (_, false) => dw_512_block::<NV, 1, false>(d, wt, cpad, bias, clamp, c0, &masks, ox, yrow),
                (_, true) => dw_512_block::<NV, 1, true>(d, wt, cpad, bias, clamp, c0, &masks, ox, yrow),
            }
            ox += r;
        }
    }
}

/// `R` output pixels from `ox` × `NV` channel vectors from `c0`: each weight vector loaded once per tap for the
/// `R` pixels (R + 1 loads per R multiply-adds), accumulators in registers. Taps on null rows (top/bottom
/// padding) are skipped; with `EDGE`, a pixel's tap outside the readable columns loads nothing (empty mask: the
/// masked load reads no memory and gives zeros).
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_512_block<const NV: usize, const R: usize, const EDGE: bool>(
    d: &Dw<f32>,
    wt: &[f32],
    cpad: usize,
    bias: &[f32],
    clamp: [f32; 2],
    c0: usize,
    masks: &[u16; NV],
    ox: usize,
    yrow: &mut [f32],
) {
    let step = d.step;
    unsafe {
        let bv: [__m512; NV] = std::array::from_fn(|j| _mm512_loadu_ps(bias.as_ptr().add(c0 + 16 * j)));
        let mut acc = [bv; R];
        let base = ox * step;
        for (t, &(ky, off)) in d.taps.iter().enumerate() {
            let row = *d.rows.get_unchecked(ky);
            if row.is_null() {
                continue;
            }
            let src = row.wrapping_add(base + off + c0);
            let wrow = wt.as_ptr().add(t * cpad + c0);
            let live: [bool; R] = std::array::from_fn(|r| !EDGE || d.readable(base + off + r * step));
            unroll!(NV, j => {
                let w = _mm512_loadu_ps(wrow.add(16 * j));
                unroll!(R, r => {
                    let m = if live[r] { masks[j] } else { 0 };
                    let x = _mm512_maskz_loadu_ps(m, src.wrapping_add(r * step + 16 * j));
                    acc[r][j] = _mm512_fmadd_ps(x, w, acc[r][j]);
                });
            });
        }
        let (lo, hi) = (_mm512_set1_ps(clamp[0]), _mm512_set1_ps(clamp[1]));
        let dst = yrow.as_mut_ptr().add(ox * d.c + c0);
        unroll!(R, r => {
            unroll!(NV, j => {
                let v = _mm512_min_ps(hi, _mm512_max_ps(lo, acc[r][j]));
                _mm512_mask_storeu_ps(dst.add(r * d.c + 16 * j), masks[j], v);
            });
        });
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dw_avx2(d: &Dw<f32>, wt: &[f32], cpad: usize, bias: &[f32], clamp: [f32; 2], yrow: &mut [f32]) {
    let c = d.c;
    let full = c / 8 * 8;
    unsafe {
        let (lo, hi) = (_mm256_set1_ps(clamp[0]), _mm256_set1_ps(clamp[1]));
        for ox in 0..d.ow {
            let o = ox * d.step;
            // Taps outside the image (zero padding) contribute nothing.
            let live = |&(ky, off): &(usize, usize)| !d.rows[ky].is_null() && d.readable(o + off);
            let mut c0 = 0;
            while c0 < full {
                let mut acc = _mm256_loadu_ps(bias.as_ptr().add(c0));
                for (t, tap) in d.taps.iter().enumerate() {
                    if live(tap) {
                        let xv = _mm256_loadu_ps(d.rows[tap.0].wrapping_add(o + tap.1 + c0));
                        acc = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wt.as_ptr().add(t * cpad + c0)), acc);
                    }
                }
                _mm256_storeu_ps(yrow.as_mut_ptr().add(ox * c + c0), _mm256_min_ps(hi, _mm256_max_ps(lo, acc)));
                c0 += 8;
            }
        }
        super::depthwise_scalar(d, wt, cpad, bias, clamp, full..c, yrow);
    }
}
