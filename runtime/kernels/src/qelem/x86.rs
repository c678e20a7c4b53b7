//! x86-64 element-wise kernels (AVX-512): QLinearAdd, QuantizeLinear, table lookups, and the float exponential and
//! short-row softmax. Same results as the portable code
//! in `qelem`, bit for bit (tested for every ISA the CPU has).
use std::arch::x86_64::*;

use super::{EXP_LO, EXP_POLY, LN2_HI, LN2_LO};
use crate::qconv::x86::round_to_u8_16;
use crate::unroll;

/// QLinearAdd on 16 lanes at a time (see `qelem::qadd`); returns how many leading elements it wrote.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn qadd_512(a: &[u8], b: &[u8], r_a: f32, r_b: f32, k: f32, out: &mut [u8]) -> usize {
    let n = a.len().min(b.len()).min(out.len()) / 16 * 16;
    let (ra, rb, kv) = (_mm512_set1_ps(r_a), _mm512_set1_ps(r_b), _mm512_set1_ps(k));
    let mut i = 0;
    unsafe {
        while i < n {
            let av = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(a.as_ptr().add(i) as *const _)));
            let bv = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(b.as_ptr().add(i) as *const _)));
            let t = _mm512_fmadd_ps(bv, rb, kv);
            let q = round_to_u8_16(_mm512_fmadd_ps(av, ra, t), _mm512_setzero_si512());
            _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut _, q);
            i += 16;
        }
    }
    n
}

/// QuantizeLinear (`round_half_even(x / s) + z`, saturated) on 16 lanes at a time; returns how many leading
/// elements it wrote. `vdivps` rounds the quotient once, as the scalar division does.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn quantize_512(x: &[f32], s: f32, z: u8, out: &mut [u8]) -> usize {
    let n = x.len().min(out.len()) / 16 * 16;
    let (sv, zv) = (_mm512_set1_ps(s), _mm512_set1_epi32(z as i32));
    let mut i = 0;
    unsafe {
        while i < n {
            // NaN → 0, like the scalar cast.
            let q = round_to_u8_16(_mm512_div_ps(_mm512_loadu_ps(x.as_ptr().add(i)), sv), zv);
            _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut _, q);
            i += 16;
        }
    }
    n
}

/// One pixel of a float max pooling (see `qelem::MaxPixel`): every channel, in blocks of 64 (four vectors, the
/// last ones masked). `max_ps(v, a)` returns `a` when either is NaN, so a NaN never enters the max.
///
/// # Safety
/// See `qelem::MaxPixel`; the CPU must have AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn maxpool_px_f32(x: *const f32, cells: &[usize], c: usize, dst: *mut f32) -> usize {
    let mut c0 = 0;
    unsafe {
        while c0 < c {
            let m: [u16; 4] = std::array::from_fn(|j| {
                let left = (c - c0).saturating_sub(16 * j).min(16);
                ((1u32 << left) - 1) as u16
            });
            let mut acc = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
            for &at in cells {
                let p = x.add(at + c0);
                unroll!(4, j => {
                    acc[j] = _mm512_max_ps(_mm512_maskz_loadu_ps(m[j], p.wrapping_add(16 * j)), acc[j]);
                });
            }
            unroll!(4, j => { _mm512_mask_storeu_ps(dst.add(c0 + 16 * j), m[j], acc[j]); });
            c0 += 64;
        }
    }
    c
}

/// One pixel of a uint8 max pooling (see `qelem::MaxPixel`): every channel, in blocks of 256 (four vectors, the
/// last ones masked).
///
/// # Safety
/// See `qelem::MaxPixel`; the CPU must have AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn maxpool_px_u8(x: *const u8, cells: &[usize], c: usize, dst: *mut u8) -> usize {
    let mut c0 = 0;
    unsafe {
        while c0 < c {
            let m: [u64; 4] = std::array::from_fn(|j| {
                let left = (c - c0).saturating_sub(64 * j).min(64);
                if left == 64 { u64::MAX } else { (1u64 << left) - 1 }
            });
            let mut acc = [_mm512_setzero_si512(); 4];
            for &at in cells {
                let p = x.add(at + c0);
                unroll!(4, j => {
                    acc[j] = _mm512_max_epu8(_mm512_maskz_loadu_epi8(m[j], p.wrapping_add(64 * j) as *const i8), acc[j]);
                });
            }
            unroll!(4, j => { _mm512_mask_storeu_epi8(dst.add(c0 + 64 * j) as *mut i8, m[j], acc[j]); });
            c0 += 256;
        }
    }
    c
}

/// `dst[i] = table[src[i]]`, 64 bytes at a time: two two-table byte permutes (`vpermi2b`, 128 entries each) and a
/// blend on the index's top bit; the tail through masked loads and stores. Returns `len`.
///
/// # Safety
/// The CPU must have AVX-512 F/BW and VBMI; `src` and `dst` address `len` bytes each (the same or disjoint).
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
pub(crate) unsafe fn lut_vbmi(src: *const u8, dst: *mut u8, len: usize, table: &[u8; 256]) -> usize {
    unsafe {
        let t: [__m512i; 4] = std::array::from_fn(|q| _mm512_loadu_si512(table.as_ptr().add(64 * q) as *const _));
        let map = |idx: __m512i| {
            let lo = _mm512_permutex2var_epi8(t[0], idx, t[1]);
            let hi = _mm512_permutex2var_epi8(t[2], idx, t[3]);
            _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), lo, hi)
        };
        let mut i = 0;
        while i + 64 <= len {
            let idx = _mm512_loadu_si512(src.add(i) as *const _);
            _mm512_storeu_si512(dst.add(i) as *mut _, map(idx));
            i += 64;
        }
        if i < len {
            let k: __mmask64 = (1u64 << (len - i)) - 1;
            let idx = _mm512_maskz_loadu_epi8(k, src.add(i) as *const _);
            _mm512_mask_storeu_epi8(dst.add(i) as *mut _, k, map(idx));
        }
    }
    len
}

/// `exp(x)` for `x ≤ 0` on 16 lanes, as `qelem::exp_nonpositive` computes it (the same reduction and degree-7
/// polynomial; the multiply-adds fused, `2^k` by `vscalefps`). NaN stays NaN.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp_nonpositive_512(x: __m512) -> __m512 {
    // vmaxps returns its second operand when one is NaN: NaN stays NaN.
    let x = _mm512_max_ps(_mm512_set1_ps(EXP_LO), x);
    let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, k)
}

/// Softmax of rows of `n ≤ 16` values (see `qelem::softmax_rows`), one row per vector: the row's maximum, `exp(x −
/// max)`, the sum in f64, `e · (1 / Σe)`.
///
/// # Safety
/// The CPU must have AVX-512 F; `1 ≤ n ≤ 16`, `x` and `y` whole rows of the same length.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn softmax_short_rows_512(x: &[f32], n: usize, y: &mut [f32]) {
    let m = (u32::MAX >> (32 - n)) as u16;
    for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        unsafe {
            let v = _mm512_maskz_loadu_ps(m, xr.as_ptr());
            let max = _mm512_set1_ps(_mm512_mask_reduce_max_ps(m, v));
            let e = _mm512_maskz_mov_ps(m, exp_nonpositive_512(_mm512_sub_ps(v, max)));
            let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(e));
            let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e))));
            let r = (1.0 / _mm512_reduce_add_pd(_mm512_add_pd(lo, hi))) as f32;
            _mm512_mask_storeu_ps(yr.as_mut_ptr(), m, _mm512_mul_ps(e, _mm512_set1_ps(r)));
        }
    }
}
