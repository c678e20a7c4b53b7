//! x86-64 fp32 kernels of `fconv`: AVX-512F (16 lanes) and AVX2+FMA (8 lanes).
#![allow(clippy::needless_range_loop)] // register tiles are indexed [row][vector] on purpose
use std::arch::x86_64::*;

use super::Isa;
use super::unroll;
// Clamps are written `min(hi, max(lo, v))`: the vector min/max return their second operand when one is NaN, so
// a NaN result stays NaN (as in the ONNX ops).
use super::fconv::{FBlock, KPart};
use super::qconv::Dw;
use super::x86::row_tile;

/// # Safety
/// See `fconv::gemm_block`; `isa` must be supported by the CPU.
pub(crate) unsafe fn gemm_block(
    isa: Isa,
    rows: &[*const f32],
    outs: &[*mut f32],
    k: KPart,
    b: &FBlock,
    bias: &[f32],
    clamp: [f32; 2],
) {
    unsafe {
        if isa >= Isa::Avx512Vnni {
            match b.width / 16 {
                4 => tiles_512::<6, 4>(rows, outs, k, b, bias, clamp),
                3 => tiles_512::<8, 3>(rows, outs, k, b, bias, clamp),
                2 => tiles_512::<12, 2>(rows, outs, k, b, bias, clamp),
                _ => tiles_512::<16, 1>(rows, outs, k, b, bias, clamp),
            }
        } else {
            tiles_avx2(rows, outs, k, b, bias, clamp)
        }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn tiles_512<const MR: usize, const NV: usize>(
    rows: &[*const f32],
    outs: &[*mut f32],
    k: KPart,
    b: &FBlock,
    bias: &[f32],
    clamp: [f32; 2],
) {
    let mut r0 = 0;
    while r0 < rows.len() {
        let (rp, nr) = row_tile::<MR, f32>(rows, r0);
        unsafe { tile_512::<MR, NV>(&rp, &outs[r0..r0 + nr], k, b, bias, clamp) };
        r0 += nr;
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile_512<const MR: usize, const NV: usize>(
    rows: &[*const f32; MR],
    outs: &[*mut f32],
    part: KPart,
    b: &FBlock,
    bias: &[f32],
    clamp: [f32; 2],
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
            unroll!(MR, r => {
                let a = _mm512_set1_ps(*rows[r].add(kk));
                unroll!(NV, j => { acc[r][j] = _mm512_fmadd_ps(a, wv[j], acc[r][j]); });
            });
            wp = wp.add(b.width);
        }
        let (lo, hi) = (_mm512_set1_ps(clamp[0]), _mm512_set1_ps(clamp[1]));
        unroll!(NV, j => {
            unroll!(MR, r => {
                if let Some(&o) = outs.get(r) {
                    let v = if part.last { _mm512_min_ps(hi, _mm512_max_ps(lo, acc[r][j])) } else { acc[r][j] };
                    _mm512_mask_storeu_ps(o.add(b.c0 + 16 * j), masks[j], v);
                }
            });
        });
    }
}

/// 16 channels (two vectors) of 6 rows at a time.
#[target_feature(enable = "avx2,fma")]
unsafe fn tiles_avx2(rows: &[*const f32], outs: &[*mut f32], part: KPart, b: &FBlock, bias: &[f32], clamp: [f32; 2]) {
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
                    unroll!(MR, r => {
                        let a = _mm256_set1_ps(*rp[r].add(kk));
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
            let mut c0 = 0;
            while c0 < d.c {
                match (d.c - c0).min(64).div_ceil(16) {
                    4 => dw_512::<4>(d, wt, cpad, bias, clamp, c0, yrow),
                    3 => dw_512::<3>(d, wt, cpad, bias, clamp, c0, yrow),
                    2 => dw_512::<2>(d, wt, cpad, bias, clamp, c0, yrow),
                    _ => dw_512::<1>(d, wt, cpad, bias, clamp, c0, yrow),
                }
                c0 += 64;
            }
        } else {
            dw_avx2(d, wt, cpad, bias, clamp, yrow)
        }
    }
}

/// Channels `c0..c0+16·NV` (the last vector masked), two output pixels per weight load.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn dw_512<const NV: usize>(
    d: &Dw<f32>,
    wt: &[f32],
    cpad: usize,
    bias: &[f32],
    clamp: [f32; 2],
    c0: usize,
    yrow: &mut [f32],
) {
    let (c, step, ow) = (d.c, d.step, d.ow);
    let masks: [u16; NV] = std::array::from_fn(|j| {
        let left = c.saturating_sub(c0 + 16 * j).min(16);
        if left == 16 { u16::MAX } else { (1u16 << left) - 1 }
    });
    unsafe {
        let (lo, hi) = (_mm512_set1_ps(clamp[0]), _mm512_set1_ps(clamp[1]));
        let bv: [__m512; NV] = std::array::from_fn(|j| _mm512_loadu_ps(bias.as_ptr().add(c0 + 16 * j)));
        let mut ox = 0;
        while ox < ow {
            let pair = ox + 1 < ow;
            let (o0, o1) = (ox * step + c0, (ox + 1) * step + c0);
            let mut a0 = bv;
            let mut a1 = bv;
            for (t, &(ky, off)) in d.taps.iter().enumerate() {
                let src = d.rows[ky].add(off);
                let wrow = wt.as_ptr().add(t * cpad + c0);
                for j in 0..NV {
                    let w = _mm512_loadu_ps(wrow.add(16 * j));
                    a0[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(masks[j], src.add(o0 + 16 * j)), w, a0[j]);
                    if pair {
                        a1[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(masks[j], src.add(o1 + 16 * j)), w, a1[j]);
                    }
                }
            }
            let dst = yrow.as_mut_ptr().add(ox * c + c0);
            for j in 0..NV {
                _mm512_mask_storeu_ps(dst.add(16 * j), masks[j], _mm512_min_ps(hi, _mm512_max_ps(lo, a0[j])));
                if pair {
                    _mm512_mask_storeu_ps(dst.add(c + 16 * j), masks[j], _mm512_min_ps(hi, _mm512_max_ps(lo, a1[j])));
                }
            }
            ox += 2;
        }
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
            let mut c0 = 0;
            while c0 < full {
                let mut acc = _mm256_loadu_ps(bias.as_ptr().add(c0));
                for (t, &(ky, off)) in d.taps.iter().enumerate() {
                    let xv = _mm256_loadu_ps(d.rows[ky].add(o + off + c0));
                    acc = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wt.as_ptr().add(t * cpad + c0)), acc);
                }
                _mm256_storeu_ps(yrow.as_mut_ptr().add(ox * c + c0), _mm256_min_ps(hi, _mm256_max_ps(lo, acc)));
                c0 += 8;
            }
            for ch in full..c {
                let mut a = bias[ch];
                for (t, &(ky, off)) in d.taps.iter().enumerate() {
                    a += *d.rows[ky].add(o + off + ch) * wt[t * cpad + ch];
                }
                yrow[ox * c + ch] = super::fconv::clampf(a, clamp);
            }
        }
    }
}
