//! aarch64 element-wise kernels (NEON): QLinearAdd, QuantizeLinear, table lookups, and the float exponential and
//! short-row softmax. Same results as the portable code
//! in `qelem`, bit for bit (tested for every ISA the CPU has).
use std::arch::aarch64::*;

use super::{EXP_LO, EXP_POLY, LN2_HI, LN2_LO};

/// QLinearAdd on 16 lanes at a time (see `qelem::qadd`); returns how many leading elements it wrote. The two
/// fused multiply-adds are the scalar `mul_add`s; `fcvtns` rounds half to even.
///
/// # Safety
/// NEON (every aarch64 core).
#[target_feature(enable = "neon")]
pub(crate) unsafe fn qadd(a: &[u8], b: &[u8], r_a: f32, r_b: f32, k: f32, out: &mut [u8]) -> usize {
    let n = a.len().min(b.len()).min(out.len()) / 16 * 16;
    let (ra, rb, kv) = (vdupq_n_f32(r_a), vdupq_n_f32(r_b), vdupq_n_f32(k));
    let (lo, hi) = (vdupq_n_f32(-1024.0), vdupq_n_f32(1024.0));
    // u8 ×16 → four f32 ×4.
    let widen = |v: uint8x16_t| -> [float32x4_t; 4] {
        let (l, h) = (vmovl_u8(vget_low_u8(v)), vmovl_high_u8(v));
        [
            vcvtq_f32_u32(vmovl_u16(vget_low_u16(l))),
            vcvtq_f32_u32(vmovl_high_u16(l)),
            vcvtq_f32_u32(vmovl_u16(vget_low_u16(h))),
            vcvtq_f32_u32(vmovl_high_u16(h)),
        ]
    };
    let mut i = 0;
    unsafe {
        while i < n {
            let av = widen(vld1q_u8(a.as_ptr().add(i)));
            let bv = widen(vld1q_u8(b.as_ptr().add(i)));
            let q: [int32x4_t; 4] = std::array::from_fn(|j| {
                let t = vfmaq_f32(kv, bv[j], rb);
                vcvtnq_s32_f32(vminq_f32(vmaxq_f32(vfmaq_f32(t, av[j], ra), lo), hi))
            });
            let h =
                [vcombine_s16(vqmovn_s32(q[0]), vqmovn_s32(q[1])), vcombine_s16(vqmovn_s32(q[2]), vqmovn_s32(q[3]))];
            vst1q_u8(out.as_mut_ptr().add(i), vcombine_u8(vqmovun_s16(h[0]), vqmovun_s16(h[1])));
            i += 16;
        }
    }
    n
}

/// QuantizeLinear (`round_half_even(x / s) + z`, saturated) on 16 lanes at a time; returns how many leading
/// elements it wrote. In float as the scalar code (`frintn`, then `+ z`), so NaN → 0 (`fmaxnm`) and huge values
/// saturate alike.
///
/// # Safety
/// NEON (every aarch64 core).
#[target_feature(enable = "neon")]
pub(crate) unsafe fn quantize(x: &[f32], s: f32, z: u8, out: &mut [u8]) -> usize {
    let n = x.len().min(out.len()) / 16 * 16;
    let (sv, zv) = (vdupq_n_f32(s), vdupq_n_f32(z as f32));
    let (lo, hi) = (vdupq_n_f32(0.0), vdupq_n_f32(255.0));
    let mut i = 0;
    unsafe {
        while i < n {
            let q: [uint32x4_t; 4] = std::array::from_fn(|j| {
                let v = vaddq_f32(vrndnq_f32(vdivq_f32(vld1q_f32(x.as_ptr().add(i + 4 * j)), sv)), zv);
                vcvtq_u32_f32(vminnmq_f32(vmaxnmq_f32(v, lo), hi))
            });
            let h = [vcombine_u16(vmovn_u32(q[0]), vmovn_u32(q[1])), vcombine_u16(vmovn_u32(q[2]), vmovn_u32(q[3]))];
            vst1q_u8(out.as_mut_ptr().add(i), vcombine_u8(vmovn_u16(h[0]), vmovn_u16(h[1])));
            i += 16;
        }
    }
    n
}

/// One pixel of a float max pooling (see `qelem::MaxPixel`): channels in blocks of 16 (four vectors); returns
/// how many (the rest run scalar). `vmaxnmq` returns the number when one operand is NaN, so a NaN never enters
/// the max.
///
/// # Safety
/// See `qelem::MaxPixel` (NEON is part of every aarch64 level).
#[target_feature(enable = "neon")]
pub(crate) unsafe fn maxpool_px_f32(x: *const f32, cells: &[usize], c: usize, dst: *mut f32) -> usize {
    let full = c / 16 * 16;
    let mut c0 = 0;
    unsafe {
        while c0 < full {
            let mut acc = [vdupq_n_f32(f32::NEG_INFINITY); 4];
            for &at in cells {
                let p = x.add(at + c0);
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = vmaxnmq_f32(*a, vld1q_f32(p.add(4 * j)));
                }
            }
            for (j, a) in acc.iter().enumerate() {
                vst1q_f32(dst.add(c0 + 4 * j), *a);
            }
            c0 += 16;
        }
    }
    full
}

/// One pixel of a uint8 max pooling (see `qelem::MaxPixel`): channels in blocks of 64 (four vectors); returns how
/// many (the rest run scalar).
///
/// # Safety
/// See `qelem::MaxPixel` (NEON is part of every aarch64 level).
#[target_feature(enable = "neon")]
pub(crate) unsafe fn maxpool_px_u8(x: *const u8, cells: &[usize], c: usize, dst: *mut u8) -> usize {
    let full = c / 64 * 64;
    let mut c0 = 0;
    unsafe {
        while c0 < full {
            let mut acc = [vdupq_n_u8(0); 4];
            for &at in cells {
                let p = x.add(at + c0);
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = vmaxq_u8(*a, vld1q_u8(p.add(16 * j)));
                }
            }
            for (j, a) in acc.iter().enumerate() {
                vst1q_u8(dst.add(c0 + 16 * j), *a);
            }
            c0 += 64;
        }
    }
    full
}

/// `dst[i] = table[src[i]]`, 16 bytes at a time: one 64-entry table lookup (`tbl`, out-of-range indices give 0)
/// and three lookups that keep the lanes their quarter of the table does not hold (`tbx`). Returns how many
/// leading bytes it wrote.
///
/// # Safety
/// NEON (every aarch64 core); `src` and `dst` address `len` bytes each (the same or disjoint).
#[target_feature(enable = "neon")]
pub(crate) unsafe fn lut(src: *const u8, dst: *mut u8, len: usize, table: &[u8; 256]) -> usize {
    let n = len / 16 * 16;
    unsafe {
        let t: [uint8x16x4_t; 4] = std::array::from_fn(|q| vld1q_u8_x4(table.as_ptr().add(64 * q)));
        let (s64, s128, s192) = (vdupq_n_u8(64), vdupq_n_u8(128), vdupq_n_u8(192));
        let mut i = 0;
        while i < n {
            let idx = vld1q_u8(src.add(i));
            let mut r = vqtbl4q_u8(t[0], idx);
            r = vqtbx4q_u8(r, t[1], vsubq_u8(idx, s64));
            r = vqtbx4q_u8(r, t[2], vsubq_u8(idx, s128));
            r = vqtbx4q_u8(r, t[3], vsubq_u8(idx, s192));
            vst1q_u8(dst.add(i), r);
            i += 16;
        }
    }
    n
}

/// `exp(x)` for `x ≤ 0` on 4 lanes, as `qelem::exp_nonpositive` computes it (the same reduction and degree-7
/// polynomial, the multiply-adds fused; `2^k` built in the exponent bits). NaN stays NaN.
#[inline]
#[target_feature(enable = "neon")]
pub(crate) unsafe fn exp_nonpositive_neon(x: float32x4_t) -> float32x4_t {
    // fmax gives NaN when an operand is NaN.
    let x = vmaxq_f32(vdupq_n_f32(EXP_LO), x);
    let k = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(std::f32::consts::LOG2_E)));
    let r = vfmsq_f32(x, k, vdupq_n_f32(LN2_HI));
    let r = vfmsq_f32(r, k, vdupq_n_f32(LN2_LO));
    let mut p = vdupq_n_f32(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = vfmaq_f32(vdupq_n_f32(c), p, r);
    }
    // k in [−126, 0] (NaN converts to 0: p is NaN already).
    let two_k = vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(k), vdupq_n_s32(127))));
    vmulq_f32(p, two_k)
}

/// Softmax of rows of `n ≤ 16` values (see `qelem::softmax_rows`), one row in four vectors (lanes past `n` are
/// −∞ going in and 0 after the exponential): the row's maximum, `exp(x − max)`, the sum in f64, `e · (1 / Σe)`.
///
/// # Safety
/// NEON (every aarch64 core); `1 ≤ n ≤ 16`, `x` and `y` whole rows of the same length.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn softmax_short_rows(x: &[f32], n: usize, y: &mut [f32]) {
    let nv = n.div_ceil(4);
    // The lanes inside the row.
    let keep: [uint32x4_t; 4] = std::array::from_fn(|j| {
        let lanes = [0usize, 1, 2, 3].map(|l| if 4 * j + l < n { u32::MAX } else { 0 });
        unsafe { vld1q_u32(lanes.as_ptr()) }
    });
    for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        let mut t = [f32::NEG_INFINITY; 16];
        t[..n].copy_from_slice(xr);
        unsafe {
            let v: [float32x4_t; 4] = std::array::from_fn(|j| vld1q_f32(t.as_ptr().add(4 * j)));
            let mx = v[1..nv].iter().fold(v[0], |m, &vj| vmaxnmq_f32(m, vj));
            let max = vdupq_n_f32(vmaxnmvq_f32(mx));
            let mut sum = vdupq_n_f64(0.0);
            let mut e = [vdupq_n_f32(0.0); 4];
            for ((ej, &vj), &kj) in e.iter_mut().zip(&v).zip(&keep).take(nv) {
                // Lanes past the row: exp(−∞ − max) is the floor e^−87.3, zeroed so that the sum leaves it out.
                *ej = vreinterpretq_f32_u32(vandq_u32(
                    kj,
                    vreinterpretq_u32_f32(exp_nonpositive_neon(vsubq_f32(vj, max))),
                ));
                sum = vaddq_f64(sum, vaddq_f64(vcvt_f64_f32(vget_low_f32(*ej)), vcvt_high_f64_f32(*ej)));
            }
            let r = vdupq_n_f32((1.0 / vaddvq_f64(sum)) as f32);
            for (j, &ej) in e.iter().enumerate().take(nv) {
                vst1q_f32(t.as_mut_ptr().add(4 * j), vmulq_f32(ej, r));
            }
        }
        yr.copy_from_slice(&t[..n]);
    }
}
