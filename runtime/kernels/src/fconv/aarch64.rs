//! aarch64 fp32 kernels of `fconv`: NEON (4 lanes, fused multiply-add), on every ARMv8-A core.
#![allow(clippy::needless_range_loop)] // register tiles are indexed [row][vector] on purpose
use std::arch::aarch64::*;

use super::{Act, FBlock, KPart, Post};
use crate::qconv::{Dw, row_tile};
use crate::qelem::aarch64::exp_nonpositive_neon;
use crate::unroll;
// Clamps are written `min(hi, max(lo, v))`: NEON's fmin/fmax return NaN when an operand is NaN, so a NaN result
// stays NaN (as in the ONNX ops).

/// Register tiles of 6 rows × 16 channels (24 accumulators, 4 weight vectors, one broadcast value): per depth, 4
/// weight loads and 6 value loads feed 24 `fmla` by element.
///
/// # Safety
/// See `fconv::gemm_block`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "neon")]
pub(crate) unsafe fn gemm_block(
    rows: &[*const f32],
    outs: &[*mut f32],
    part: KPart,
    b: &FBlock,
    bias: &[f32],
    clamp: [f32; 2],
    koff: &[usize],
    post: Post,
) {
    const MR: usize = 6;
    let mut r0 = 0;
    while r0 < rows.len() {
        let (rp, nr) = row_tile::<MR, f32>(rows, r0);
        let outs = &outs[r0..r0 + nr];
        let mut j0 = 0;
        while j0 < b.valid {
            unsafe {
                match (nr, koff.is_empty()) {
                    (1, true) => tile::<1, false>(&[rp[0]], outs, part, b, j0, bias, clamp, koff, post),
                    (1, false) => tile::<1, true>(&[rp[0]], outs, part, b, j0, bias, clamp, koff, post),
                    (2 | 3, true) => {
                        tile::<3, false>(&[rp[0], rp[1], rp[2]], outs, part, b, j0, bias, clamp, koff, post)
                    }
                    (2 | 3, false) => {
                        tile::<3, true>(&[rp[0], rp[1], rp[2]], outs, part, b, j0, bias, clamp, koff, post)
                    }
                    (_, true) => tile::<MR, false>(&rp, outs, part, b, j0, bias, clamp, koff, post),
                    (_, false) => tile::<MR, true>(&rp, outs, part, b, j0, bias, clamp, koff, post),
                }
            }
            j0 += 16;
        }
        r0 += nr;
    }
}

/// Channels `b.c0 + j0..+16` of `MR` rows (rows past `outs.len()` repeat one and are not stored). `OFF`: depth
/// `kk` of a row is at `koff[kk]` (an implicit GEMM), else at `kk`.
#[inline]
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const MR: usize, const OFF: bool>(
    rows: &[*const f32; MR],
    outs: &[*mut f32],
    part: KPart,
    b: &FBlock,
    j0: usize,
    bias: &[f32],
    clamp: [f32; 2],
    koff: &[usize],
    post: Post,
) {
    let c = b.c0 + j0;
    let n = (b.valid - j0).min(16);
    unsafe {
        let bv: [float32x4_t; 4] = std::array::from_fn(|j| vld1q_f32(bias.as_ptr().add(c + 4 * j)));
        let mut acc = [bv; MR];
        if !part.first {
            for (r, &o) in outs.iter().enumerate() {
                if n == 16 {
                    acc[r] = std::array::from_fn(|j| vld1q_f32(o.add(c + 4 * j)));
                } else {
                    let mut t = [0f32; 16];
                    std::ptr::copy_nonoverlapping(o.add(c), t.as_mut_ptr(), n);
                    acc[r] = std::array::from_fn(|j| vld1q_f32(t.as_ptr().add(4 * j)));
                }
            }
        }
        let mut wp = b.packed.as_ptr().add(part.k0 * b.width + j0);
        for kk in 0..part.kc {
            let w: [float32x4_t; 4] = std::array::from_fn(|j| vld1q_f32(wp.add(4 * j)));
            let o = if OFF { *koff.get_unchecked(kk) } else { kk };
            unroll!(MR, r => {
                let a = *rows[r].add(o);
                unroll!(4, j => { acc[r][j] = vfmaq_n_f32(acc[r][j], w[j], a); });
            });
            wp = wp.add(b.width);
        }
        let (lo, hi) = (vdupq_n_f32(clamp[0]), vdupq_n_f32(clamp[1]));
        for (r, &o) in outs.iter().enumerate() {
            let mut t = [0f32; 16];
            unroll!(4, j => {
                let v = if part.last {
                    let v = vminq_f32(hi, vmaxq_f32(lo, acc[r][j]));
                    if post.is_none() { v } else { act_neon(post, v) }
                } else {
                    acc[r][j]
                };
                vst1q_f32(t.as_mut_ptr().add(4 * j), v);
            });
            if n == 16 {
                unroll!(4, j => { vst1q_f32(o.add(c + 4 * j), vld1q_f32(t.as_ptr().add(4 * j))); });
            } else {
                std::ptr::copy_nonoverlapping(t.as_ptr(), o.add(c), n);
            }
        }
    }
}

/// `e = e^−|v|`, `1 / (1 + e)` and the lanes where `v < 0` (see the x86 `sigmoid_parts_512`).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn sigmoid_parts_neon(v: float32x4_t) -> (float32x4_t, float32x4_t, uint32x4_t) {
    let e = unsafe { exp_nonpositive_neon(vnegq_f32(vabsq_f32(v))) };
    let d = vaddq_f32(vdupq_n_f32(1.0), e);
    let mut inv = vrecpeq_f32(d);
    inv = vmulq_f32(inv, vrecpsq_f32(d, inv));
    inv = vmulq_f32(inv, vrecpsq_f32(d, inv));
    (e, inv, vcltzq_f32(v))
}

/// [`Act`] then the affine on 4 lanes (see the x86 `act_512`): the sigmoid's `1 / (1 + e)` by the reciprocal
/// estimate and two Newton steps; HardSwish, HardSigmoid and the affine in the graph's order and roundings.
#[inline]
#[target_feature(enable = "neon")]
pub(crate) unsafe fn act_neon(post: Post, v: float32x4_t) -> float32x4_t {
    let sigmoid_parts = |v| unsafe { sigmoid_parts_neon(v) };
    let v = match post.act {
        Act::None => v,
        Act::Silu => {
            let (e, inv, below) = sigmoid_parts(v);
            vmulq_f32(vbslq_f32(below, vmulq_f32(v, e), v), inv)
        }
        Act::Sigmoid => {
            let (e, inv, below) = sigmoid_parts(v);
            vbslq_f32(below, vmulq_f32(inv, e), inv)
        }
        Act::HardSwish => {
            let c = vminq_f32(vdupq_n_f32(6.0), vmaxq_f32(vdupq_n_f32(0.0), vaddq_f32(v, vdupq_n_f32(3.0))));
            vdivq_f32(vmulq_f32(v, c), vdupq_n_f32(6.0))
        }
        Act::HardSigmoid { alpha, beta } => {
            let a = vaddq_f32(vmulq_f32(v, vdupq_n_f32(alpha)), vdupq_n_f32(beta));
            vminq_f32(vdupq_n_f32(1.0), vmaxq_f32(vdupq_n_f32(0.0), a))
        }
    };
    match post.affine {
        None => v,
        Some([scale, shift]) => vaddq_f32(vmulq_f32(v, vdupq_n_f32(scale)), vdupq_n_f32(shift)),
    }
}

/// [`act_neon`] over a slice (the last partial vector through a copy).
#[target_feature(enable = "neon")]
pub(crate) unsafe fn apply_neon(post: Post, v: &mut [f32]) {
    let (chunks, rest) = v.as_chunks_mut::<4>();
    for c in chunks {
        unsafe { vst1q_f32(c.as_mut_ptr(), act_neon(post, vld1q_f32(c.as_ptr()))) };
    }
    if !rest.is_empty() {
        let mut t = [0f32; 4];
        t[..rest.len()].copy_from_slice(rest);
        unsafe { vst1q_f32(t.as_mut_ptr(), act_neon(post, vld1q_f32(t.as_ptr()))) };
        rest.copy_from_slice(&t[..rest.len()]);
    }
}

/// One output row of a float depthwise convolution (see `FConv::depthwise_row`). Kernels 3 or 5 wide with
/// dilation 1 (stride 1 or 2) slide along the row (`dw_slide_row`); others take 8 channels (two vectors) × up to
/// 8 output pixels per pass over the taps, so each weight load serves every pixel of the block, and pixels whose
/// window leaves the readable columns (and taps on null rows, the top/bottom padding) skip the taps outside.
/// Channels past the last multiple of 4 run scalar.
///
/// # Safety
/// `d.rows[ky]` address full input rows (see `Dw`).
#[target_feature(enable = "neon")]
pub(crate) unsafe fn depthwise_row(
    d: &Dw<f32>,
    wt: &[f32],
    cpad: usize,
    bias: &[f32],
    clamp: [f32; 2],
    yrow: &mut [f32],
) {
    let inner = d.inner();
    let full = d.c / 4 * 4;
    unsafe {
        let slide = match d.slide_shape() {
            Some((3, 1)) => Some(dw_slide_row::<3, 1> as SlideRow),
            Some((3, 2)) => Some(dw_slide_row::<3, 2> as SlideRow),
            Some((5, 1)) => Some(dw_slide_row::<5, 1> as SlideRow),
            Some((5, 2)) => Some(dw_slide_row::<5, 2> as SlideRow),
            // Other widths (7 would spill: 14 weight vectors + 16 accumulators) and dilations: tap by tap.
            _ => None,
        };
        if let Some(row) = slide {
            row(d, wt, cpad, bias, clamp, full, yrow);
            super::depthwise_scalar(d, wt, cpad, bias, clamp, full..d.c, yrow);
            return;
        }
        let mut c0 = 0;
        while c0 < full {
            let nv = if full - c0 >= 8 { 2 } else { 1 };
            let mut ox = 0;
            while ox < d.ow {
                let edge = ox < inner.start || ox >= inner.end;
                let r = if edge {
                    1
                } else {
                    match inner.end - ox {
                        8.. => 8,
                        4.. => 4,
                        _ => 1,
                    }
                };
                match (nv, r, edge) {
                    (2, 8, _) => dw_block::<2, 8, false>(d, wt, cpad, bias, clamp, c0, ox, yrow),
                    (2, 4, _) => dw_block::<2, 4, false>(d, wt, cpad, bias, clamp, c0, ox, yrow),
                    (2, _, false) => dw_block::<2, 1, false>(d, wt, cpad, bias, clamp, c0, ox, yrow),
                    (2, _, true) => dw_block::<2, 1, true>(d, wt, cpad, bias, clamp, c0, ox, yrow),
                    (_, 8, _) => dw_block::<1, 8, false>(d, wt, cpad, bias, clamp, c0, ox, yrow),
                    (_, 4, _) => dw_block::<1, 4, false>(d, wt, cpad, bias, clamp, c0, ox, yrow),
                    (_, _, false) => dw_block::<1, 1, false>(d, wt, cpad, bias, clamp, c0, ox, yrow),
                    (_, _, true) => dw_block::<1, 1, true>(d, wt, cpad, bias, clamp, c0, ox, yrow),
                }
                ox += r;
            }
            c0 += 4 * nv;
        }
        super::depthwise_scalar(d, wt, cpad, bias, clamp, full..d.c, yrow);
    }
}

/// Channels `0..full` of one output row of a `KW`-wide kernel with stride `S` and dilation 1, walked by
/// `fconv::slide_blocks` (4-lane vectors).
#[target_feature(enable = "neon")]
unsafe fn dw_slide_row<const KW: usize, const S: usize>(
    d: &Dw<f32>,
    wt: &[f32],
    cpad: usize,
    bias: &[f32],
    clamp: [f32; 2],
    full: usize,
    yrow: &mut [f32],
) {
    super::slide_blocks(d, 4, full, |b| {
        macro_rules! block {
            ($nv:literal, $r:literal, $edge:literal) => {
                // SAFETY: as `depthwise_row` (NEON is part of every aarch64 level).
                unsafe { dw_slide::<$nv, $r, KW, S, $edge>(d, wt, cpad, bias, clamp, b.c0, b.ox, b.n, yrow) }
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

/// A sliding row kernel of one kernel width and stride.
type SlideRow = unsafe fn(&Dw<f32>, &[f32], usize, &[f32], [f32; 2], usize, &mut [f32]);

/// `R` output pixels from `ox` × `NV` vectors of channels from `c0`, sliding along each kernel row: the
/// `(R−1)·S + KW` input pixels the block's windows cover are loaded once each and multiplied into every
/// accumulator whose window holds them, that kernel row's `KW` weight vectors kept in registers (per kernel row
/// `((R−1)·S + 2·KW)·NV` loads for `R·KW·NV` multiply-adds). With `EDGE`, input pixels outside the readable
/// columns count as zeros and only the first `n` pixels are stored.
#[inline]
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_slide<const NV: usize, const R: usize, const KW: usize, const S: usize, const EDGE: bool>(
    d: &Dw<f32>,
    wt: &[f32],
    cpad: usize,
    bias: &[f32],
    clamp: [f32; 2],
    c0: usize,
    ox: usize,
    n: usize,
    yrow: &mut [f32],
) {
    let kh = d.taps.len() / KW;
    let c = d.c;
    unsafe {
        let bv: [float32x4_t; NV] = std::array::from_fn(|j| vld1q_f32(bias.as_ptr().add(c0 + 4 * j)));
        let mut acc = [bv; R];
        let base = ox * d.step;
        let zero = vdupq_n_f32(0.0);
        for ky in 0..kh {
            let row = *d.rows.get_unchecked(ky);
            if row.is_null() {
                continue;
            }
            let wrow = wt.as_ptr().add(ky * KW * cpad + c0);
            let w: [[float32x4_t; NV]; KW] =
                std::array::from_fn(|kx| std::array::from_fn(|j| vld1q_f32(wrow.add(kx * cpad + 4 * j))));
            let mut src = row.wrapping_add(base + c0);
            unroll!((R - 1) * S + KW, p => {
                let live = !EDGE || d.readable(base + p * c);
                let x: [float32x4_t; NV] =
                    std::array::from_fn(|j| if live { vld1q_f32(src.wrapping_add(4 * j)) } else { zero });
                unroll!(R, r => {
                    if p >= S * r && p - S * r < KW {
                        let kx = p - S * r;
                        unroll!(NV, j => {
                            acc[r][j] = vfmaq_f32(acc[r][j], x[j], w[kx][j]);
                        });
                    }
                });
                src = src.wrapping_add(c);
            });
        }
        let (lo, hi) = (vdupq_n_f32(clamp[0]), vdupq_n_f32(clamp[1]));
        let dst = yrow.as_mut_ptr().add(ox * c + c0);
        unroll!(R, r => {
            if !EDGE || r < n {
                unroll!(NV, j => {
                    vst1q_f32(dst.add(r * c + 4 * j), vminq_f32(hi, vmaxq_f32(lo, acc[r][j])));
                });
            }
        });
    }
}

/// `R` output pixels from `ox` × `NV` vectors of channels from `c0`. With `EDGE` (one pixel), taps outside the
/// readable columns are skipped.
#[inline]
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_block<const NV: usize, const R: usize, const EDGE: bool>(
    d: &Dw<f32>,
    wt: &[f32],
    cpad: usize,
    bias: &[f32],
    clamp: [f32; 2],
    c0: usize,
    ox: usize,
    yrow: &mut [f32],
) {
    let step = d.step;
    unsafe {
        let bv: [float32x4_t; NV] = std::array::from_fn(|j| vld1q_f32(bias.as_ptr().add(c0 + 4 * j)));
        let mut acc = [bv; R];
        let base = ox * step;
        for (t, &(ky, off)) in d.taps.iter().enumerate() {
            let row = *d.rows.get_unchecked(ky);
            if row.is_null() || (EDGE && !d.readable(base + off)) {
                continue;
            }
            let src = row.wrapping_add(base + off + c0);
            let wrow = wt.as_ptr().add(t * cpad + c0);
            unroll!(NV, j => {
                let w = vld1q_f32(wrow.add(4 * j));
                unroll!(R, r => {
                    let x = vld1q_f32(src.add(r * step + 4 * j));
                    acc[r][j] = vfmaq_f32(acc[r][j], x, w);
                });
            });
        }
        let (lo, hi) = (vdupq_n_f32(clamp[0]), vdupq_n_f32(clamp[1]));
        let dst = yrow.as_mut_ptr().add(ox * d.c + c0);
        unroll!(R, r => {
            unroll!(NV, j => {
                vst1q_f32(dst.add(r * d.c + 4 * j), vminq_f32(hi, vmaxq_f32(lo, acc[r][j])));
            });
        });
    }
}
