//! x86-64 integer convolution kernels: AVX-512 VNNI (`vpdpbusd`) and AVX2 (exact 16-bit products). Same results
//! as the portable code in `qconv`, bit for bit (tested for every ISA the CPU has).
#![allow(clippy::needless_range_loop)] // register tiles are indexed [row][vector] on purpose
use std::arch::x86_64::*;

use super::{Block, Dw, DwPlan, Out, QConvSpec, row_tile};
use crate::{Isa, unroll};

/// # Safety
/// See `qconv::gemm_block`; `isa` must be supported by the CPU.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_block(
    isa: Isa,
    rows: &[*const u8],
    outs: &[*mut u8],
    kp: usize,
    b: &Block,
    bias: &[i32],
    m: &[f32],
    out: Out,
) {
    unsafe {
        if isa >= Isa::Avx512Vnni {
            match b.width / 16 {
                4 => tiles_vnni::<6, 4>(rows, outs, kp, b, bias, m, out),
                3 => tiles_vnni::<6, 3>(rows, outs, kp, b, bias, m, out),
                2 => tiles_vnni::<8, 2>(rows, outs, kp, b, bias, m, out),
                _ => tiles_vnni::<8, 1>(rows, outs, kp, b, bias, m, out),
            }
        } else {
            tiles_avx2(rows, outs, kp, b, bias, m, out)
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tiles_vnni<const MR: usize, const NV: usize>(
    rows: &[*const u8],
    outs: &[*mut u8],
    kp: usize,
    b: &Block,
    bias: &[i32],
    m: &[f32],
    out: Out,
) {
    let mut r0 = 0;
    while r0 < rows.len() {
        let (rp, nr) = row_tile::<MR, u8>(rows, r0);
        if nr < MR / 2 {
            // A short last tile (a GEMV at batch 1, the 49th pixel of a 7×7 image): one row at a time rather
            // than MR rows of which most repeat.
            for r in r0..r0 + nr {
                unsafe { tile_vnni::<1, NV>(&[rows[r]], &outs[r..r + 1], kp, b, bias, m, out) };
            }
        } else {
            unsafe { tile_vnni::<MR, NV>(&rp, &outs[r0..r0 + nr], kp, b, bias, m, out) };
        }
        r0 += nr;
    }
}

#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_vnni<const MR: usize, const NV: usize>(
    rows: &[*const u8; MR],
    outs: &[*mut u8],
    kp: usize,
    b: &Block,
    bias: &[i32],
    m: &[f32],
    out: Out,
) {
    unsafe {
        let bv: [__m512i; NV] =
            std::array::from_fn(|j| _mm512_loadu_si512(bias.as_ptr().add(b.c0 + 16 * j) as *const _));
        let mut acc = [bv; MR];
        let mut wp = b.packed.as_ptr();
        let mut k = 0;
        while k < kp {
            let mut wv = [_mm512_setzero_si512(); NV];
            unroll!(NV, j => { wv[j] = _mm512_loadu_si512(wp.add(64 * j) as *const _); });
            unroll!(MR, r => {
                let a = _mm512_set1_epi32((rows[r].add(k) as *const i32).read_unaligned());
                unroll!(NV, j => { acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], a, wv[j]); });
            });
            wp = wp.add(64 * NV);
            k += 4;
        }
        unroll!(NV, j => {
            let mv = _mm512_loadu_ps(m.as_ptr().add(b.c0 + 16 * j));
            let left = b.valid.saturating_sub(16 * j).min(16);
            let mask: u16 = if left == 16 { u16::MAX } else { (1u16 << left) - 1 };
            unroll!(MR, r => {
                if let Some(&o) = outs.get(r) {
                match out {
                    Out::U8(z_y) => {
                        let q = requant16(acc[r][j], mv, _mm512_set1_epi32(z_y as i32));
                        _mm_mask_storeu_epi8(o.add(b.c0 + 16 * j) as *mut _, mask, q);
                    }
                    Out::F32 => {
                        let f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][j]), mv);
                        _mm512_mask_storeu_ps((o as *mut f32).add(b.c0 + 16 * j), mask, f);
                    }
                }
                }
            });
        });
    }
}

/// `clamp(round_half_even(f32(acc)·m) + z, 0, 255)` on 16 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn requant16(acc: __m512i, m: __m512, z: __m512i) -> __m128i {
    round_to_u8_16(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), m), z)
}

/// `clamp(round_half_even(f) + z, 0, 255)` on 16 lanes (NaN → 0: max/min return their second operand for NaN).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn round_to_u8_16(f: __m512, z: __m512i) -> __m128i {
    let f = _mm512_min_ps(_mm512_max_ps(f, _mm512_set1_ps(-1024.0)), _mm512_set1_ps(1024.0));
    let i = _mm512_add_epi32(_mm512_cvtps_epi32(f), z);
    let i = _mm512_min_epi32(_mm512_max_epi32(i, _mm512_setzero_si512()), _mm512_set1_epi32(255));
    _mm512_cvtepi32_epi8(i)
}

/// 8 lanes of [`requant16`].
#[inline]
#[target_feature(enable = "avx2,fma")]
fn requant8(acc: __m256i, m: __m256, z: __m256i) -> [u8; 8] {
    let f = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), m);
    let f = _mm256_min_ps(_mm256_max_ps(f, _mm256_set1_ps(-1024.0)), _mm256_set1_ps(1024.0));
    let i = _mm256_add_epi32(_mm256_cvtps_epi32(f), z);
    let i = _mm256_min_epi32(_mm256_max_epi32(i, _mm256_setzero_si256()), _mm256_set1_epi32(255));
    let mut out = [0i32; 8];
    unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut _, i) };
    out.map(|v| v as u8)
}

/// AVX2 without VNNI: `u8·i8` pairs through `pmaddubsw` would saturate at 16 bits, so the activation bytes are
/// split (`a = a_lo + 128·a_hi`, `a_lo < 128`): both halves' pair sums fit, then widen exactly with `pmaddwd`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn tiles_avx2(rows: &[*const u8], outs: &[*mut u8], kp: usize, b: &Block, bias: &[i32], m: &[f32], out: Out) {
    const MR: usize = 4;
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let w128 = _mm256_set1_epi16(128);
        let lo7 = _mm256_set1_epi8(0x7f);
        let mut r0 = 0;
        while r0 < rows.len() {
            let (rp, nr) = row_tile::<MR, u8>(rows, r0);
            // 8 output channels per ymm: each 32-bit lane holds 4 consecutive k of one channel.
            for j8 in 0..b.width / 8 {
                let bv = _mm256_loadu_si256(bias.as_ptr().add(b.c0 + 8 * j8) as *const _);
                let mut acc = [bv; MR];
                let mut k = 0;
                while k < kp {
                    let w = _mm256_loadu_si256(b.packed.as_ptr().add(k * b.width + 32 * j8) as *const _);
                    unroll!(MR, r => {
                        let a = _mm256_set1_epi32((rp[r].add(k) as *const i32).read_unaligned());
                        let a_lo = _mm256_and_si256(a, lo7);
                        let a_hi = _mm256_and_si256(_mm256_srli_epi16(a, 7), _mm256_set1_epi8(1));
                        let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(a_lo, w), ones);
                        let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(a_hi, w), w128);
                        acc[r] = _mm256_add_epi32(acc[r], _mm256_add_epi32(p_lo, p_hi));
                    });
                    k += 4;
                }
                let c = b.c0 + 8 * j8;
                if c >= b.c0 + b.valid {
                    break;
                }
                let mv = _mm256_loadu_ps(m.as_ptr().add(c));
                let n = (b.c0 + b.valid - c).min(8);
                unroll!(MR, r => {
                    if r < nr {
                    let o = outs[r0 + r];
                    match out {
                        Out::U8(z_y) => {
                            let q = requant8(acc[r], mv, _mm256_set1_epi32(z_y as i32));
                            std::ptr::copy_nonoverlapping(q.as_ptr(), o.add(c), n);
                        }
                        Out::F32 => {
                            let mut f = [0f32; 8];
                            _mm256_storeu_ps(f.as_mut_ptr(), _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r]), mv));
                            std::ptr::copy_nonoverlapping(f.as_ptr(), (o as *mut f32).add(c), n);
                        }
                    }
                    }
                });
            }
            r0 += nr;
        }
    }
}

/// One output row of a depthwise convolution.
///
/// # Safety
/// `isa` must be supported by the CPU; `d` describes valid padded input rows (see `QConv::run_depthwise`).
pub(crate) unsafe fn depthwise_row(
    isa: Isa,
    s: &QConvSpec,
    d: &Dw,
    p: &DwPlan,
    bias: &[i32],
    m: &[f32],
    yrow: &mut [u8],
) {
    unsafe {
        if isa >= Isa::Avx512Vnni {
            depthwise_row_vnni(s.z_y, d, p, yrow)
        } else {
            depthwise_row_avx2(s, d, p, bias, m, yrow)
        }
    }
}

/// Blocks of 64 channels (zmm), the last block 32 or fewer wide on ymm, two output pixels at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn depthwise_row_vnni(z_y: u8, d: &Dw, p: &DwPlan, yrow: &mut [u8]) {
    unsafe {
        for cb in 0..d.c.div_ceil(64) {
            if d.c - 64 * cb > 32 { dw_vnni_512(z_y, d, p, cb, yrow) } else { dw_vnni_256(z_y, d, p, cb, yrow) }
        }
    }
}

// One channel block of a depthwise row, two output pixels at a time (each weight load serves both). Per group of
// four taps: four loads, `unpack{lo,hi}_epi8` then `unpack{lo,hi}_epi16` put the four taps of a channel in one
// 32-bit lane, four `vpdpbusd` accumulate. Accumulator `q`, 128-bit lane `L`, dword `j` holds channel
// `16·L + 4·q + j` (`DwPlan::w4`, `bias4`, `m4` follow that order); the output stage requantizes, and the
// saturating packs (i32→i16 of q = 0,1 and 2,3, then i16→u8) restore channel order in every 128-bit lane.
// Exact: requantized values lie in [-1024 + z, 1024 + z] before the final unsigned saturation to 0..255.
macro_rules! dw_vnni_block {
    ($name:ident, $bytes:expr, $mask:ty, $vi:ty, $vf:ty, { $($alias:ident = $f:ident),* $(,)? }) => {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn $name(z_y: u8, d: &Dw, p: &DwPlan, cb: usize, yrow: &mut [u8]) {
            $(use std::arch::x86_64::$f as $alias;)*
            let groups = p.taps.len() / 4;
            let c0 = 64 * cb;
            let left = (d.c - c0).min($bytes);
            let mask: $mask = if left == $bytes { <$mask>::MAX } else { (1 << left) - 1 };
            let (lo, hi, z) = (set1_ps(-1024.0), set1_ps(1024.0), set1_epi16(z_y as i16));
            unsafe {
                let bv: [$vi; 4] = std::array::from_fn(|q| loadu_si(p.bias4.as_ptr().add(c0 + 16 * q) as *const _));
                let mv: [$vf; 4] = std::array::from_fn(|q| loadu_ps(p.m4.as_ptr().add(c0 + 16 * q)));
                let wb = p.w4.as_ptr().add(cb * groups * 256);
                let dp4 = |acc: &mut [$vi; 4], x: [$vi; 4], w: &[$vi; 4]| {
                    let a = unpacklo_epi8(x[0], x[1]);
                    let b = unpackhi_epi8(x[0], x[1]);
                    let c = unpacklo_epi8(x[2], x[3]);
                    let d = unpackhi_epi8(x[2], x[3]);
                    acc[0] = dpbusd(acc[0], unpacklo_epi16(a, c), w[0]);
                    acc[1] = dpbusd(acc[1], unpackhi_epi16(a, c), w[1]);
                    acc[2] = dpbusd(acc[2], unpacklo_epi16(b, d), w[2]);
                    acc[3] = dpbusd(acc[3], unpackhi_epi16(b, d), w[3]);
                };
                let store = |acc: [$vi; 4], dst: *mut u8| {
                    let i: [$vi; 4] = std::array::from_fn(|q| cvtps_epi32(min_ps(max_ps(mul_ps(cvtepi32_ps(acc[q]), mv[q]), lo), hi)));
                    let v = packus_epi16(adds_epi16(packs_epi32(i[0], i[1]), z), adds_epi16(packs_epi32(i[2], i[3]), z));
                    mask_storeu_epi8(dst as *mut _, mask, v);
                };
                let mut ox = 0;
                while ox < d.ow {
                    let pair = ox + 1 < d.ow;
                    let (o0, o1) = (ox * d.step + c0, (ox + 1) * d.step + c0);
                    let mut a0 = bv;
                    let mut a1 = bv;
                    for g in 0..groups {
                        let wv: [$vi; 4] = std::array::from_fn(|q| loadu_si(wb.add((g * 4 + q) * 64) as *const _));
                        let t = &p.taps[4 * g..4 * g + 4];
                        let base: [*const u8; 4] = std::array::from_fn(|i| d.rows[t[i].0].add(t[i].1));
                        let load = |o: usize| -> [$vi; 4] {
                            std::array::from_fn(|i| maskz_loadu_epi8(mask, base[i].add(o) as *const _))
                        };
                        dp4(&mut a0, load(o0), &wv);
                        if pair {
                            dp4(&mut a1, load(o1), &wv);
                        }
                    }
                    store(a0, yrow.as_mut_ptr().add(ox * d.c + c0));
                    if pair {
                        store(a1, yrow.as_mut_ptr().add((ox + 1) * d.c + c0));
                    }
                    ox += 2;
                }
            }
        }
    };
}

dw_vnni_block!(dw_vnni_512, 64, u64, __m512i, __m512, {
    set1_ps = _mm512_set1_ps, set1_epi16 = _mm512_set1_epi16, loadu_si = _mm512_loadu_si512,
    loadu_ps = _mm512_loadu_ps, unpacklo_epi8 = _mm512_unpacklo_epi8, unpackhi_epi8 = _mm512_unpackhi_epi8,
    unpacklo_epi16 = _mm512_unpacklo_epi16, unpackhi_epi16 = _mm512_unpackhi_epi16, dpbusd = _mm512_dpbusd_epi32,
    cvtps_epi32 = _mm512_cvtps_epi32, min_ps = _mm512_min_ps, max_ps = _mm512_max_ps, mul_ps = _mm512_mul_ps,
    cvtepi32_ps = _mm512_cvtepi32_ps, packus_epi16 = _mm512_packus_epi16, adds_epi16 = _mm512_adds_epi16,
    packs_epi32 = _mm512_packs_epi32, mask_storeu_epi8 = _mm512_mask_storeu_epi8,
    maskz_loadu_epi8 = _mm512_maskz_loadu_epi8,
});

dw_vnni_block!(dw_vnni_256, 32, u32, __m256i, __m256, {
    set1_ps = _mm256_set1_ps, set1_epi16 = _mm256_set1_epi16, loadu_si = _mm256_loadu_si256,
    loadu_ps = _mm256_loadu_ps, unpacklo_epi8 = _mm256_unpacklo_epi8, unpackhi_epi8 = _mm256_unpackhi_epi8,
    unpacklo_epi16 = _mm256_unpacklo_epi16, unpackhi_epi16 = _mm256_unpackhi_epi16, dpbusd = _mm256_dpbusd_epi32,
    cvtps_epi32 = _mm256_cvtps_epi32, min_ps = _mm256_min_ps, max_ps = _mm256_max_ps, mul_ps = _mm256_mul_ps,
    cvtepi32_ps = _mm256_cvtepi32_ps, packus_epi16 = _mm256_packus_epi16, adds_epi16 = _mm256_adds_epi16,
    packs_epi32 = _mm256_packs_epi32, mask_storeu_epi8 = _mm256_mask_storeu_epi8,
    maskz_loadu_epi8 = _mm256_maskz_loadu_epi8,
});

#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_row_avx2(s: &QConvSpec, d: &Dw, p: &DwPlan, bias: &[i32], m: &[f32], yrow: &mut [u8]) {
    let taps = &p.taps[..s.geom.kernel[0] * s.geom.kernel[1]];
    let zv = _mm256_set1_epi32(s.z_y as i32);
    let full = d.c / 8 * 8;
    unsafe {
        for ox in 0..d.ow {
            let o = ox * d.step;
            let mut c0 = 0;
            while c0 < full {
                let mut acc = _mm256_loadu_si256(bias.as_ptr().add(c0) as *const _);
                for (t, &(ky, off)) in taps.iter().enumerate() {
                    let src = d.rows[ky].add(o + off + c0);
                    let xv = _mm256_cvtepu8_epi32(_mm_loadl_epi64(src as *const _));
                    let wv = _mm256_loadu_si256(p.w16.as_ptr().add(t * p.cpad + c0) as *const _);
                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(xv, wv));
                }
                let q = requant8(acc, _mm256_loadu_ps(m.as_ptr().add(c0)), zv);
                std::ptr::copy_nonoverlapping(q.as_ptr(), yrow.as_mut_ptr().add(ox * d.c + c0), 8);
                c0 += 8;
            }
        }
        p.row_scalar(s.z_y, taps.len(), d, bias, m, full..d.c, yrow);
    }
}
