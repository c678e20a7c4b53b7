//! x86-64 element-wise integer kernels (AVX-512): QLinearAdd and QuantizeLinear. Same results as the portable code
//! in `qelem`, bit for bit (tested for every ISA the CPU has).
use std::arch::x86_64::*;

use crate::qconv::x86::round_to_u8_16;

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
