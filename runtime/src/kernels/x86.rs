//! x86-64 kernels: AVX-512 VNNI (`vpdpbusd`) and AVX2 (exact 16-bit products). Same results as the portable
//! code in `qconv`/`qelem`, bit for bit (tested for every ISA the CPU has).
#![allow(clippy::needless_range_loop)] // register tiles are indexed [row][vector] on purpose
use std::arch::x86_64::*;

use super::Isa;
use super::qconv::{Block, Dw, QConvSpec};

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
    z_y: u8,
) {
    unsafe {
        if isa >= Isa::Avx512Vnni {
            match b.width / 16 {
                4 => tiles_vnni::<6, 4>(rows, outs, kp, b, bias, m, z_y),
                3 => tiles_vnni::<8, 3>(rows, outs, kp, b, bias, m, z_y),
                2 => tiles_vnni::<12, 2>(rows, outs, kp, b, bias, m, z_y),
                _ => tiles_vnni::<16, 1>(rows, outs, kp, b, bias, m, z_y),
            }
        } else {
            tiles_avx2(rows, outs, kp, b, bias, m, z_y)
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
    z_y: u8,
) {
    let mut r0 = 0;
    while r0 < rows.len() {
        let (rp, nr) = row_tile::<MR>(rows, r0);
        unsafe { tile_vnni::<MR, NV>(&rp, &outs[r0..r0 + nr], kp, b, bias, m, z_y) };
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
    z_y: u8,
) {
    unsafe {
        let mut acc = [[_mm512_setzero_si512(); NV]; MR];
        for j in 0..NV {
            let bv = _mm512_loadu_si512(bias.as_ptr().add(b.c0 + 16 * j) as *const _);
            for a in acc.iter_mut() {
                a[j] = bv;
            }
        }
        let mut wp = b.packed.as_ptr();
        let mut k = 0;
        while k < kp {
            let mut wv = [_mm512_setzero_si512(); NV];
            for (j, w) in wv.iter_mut().enumerate() {
                *w = _mm512_loadu_si512(wp.add(64 * j) as *const _);
            }
            for r in 0..MR {
                let a = _mm512_set1_epi32((rows[r].add(k) as *const i32).read_unaligned());
                for j in 0..NV {
                    acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], a, wv[j]);
                }
            }
            wp = wp.add(64 * NV);
            k += 4;
        }
        let zv = _mm512_set1_epi32(z_y as i32);
        for j in 0..NV {
            let mv = _mm512_loadu_ps(m.as_ptr().add(b.c0 + 16 * j));
            let left = b.valid.saturating_sub(16 * j).min(16);
            let mask: u16 = if left == 16 { u16::MAX } else { (1u16 << left) - 1 };
            for (r, &o) in outs.iter().enumerate() {
                let q = requant16(acc[r][j], mv, zv);
                _mm_mask_storeu_epi8(o.add(b.c0 + 16 * j) as *mut _, mask, q);
            }
        }
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
fn round_to_u8_16(f: __m512, z: __m512i) -> __m128i {
    let f = _mm512_min_ps(_mm512_max_ps(f, _mm512_set1_ps(-1024.0)), _mm512_set1_ps(1024.0));
    let i = _mm512_add_epi32(_mm512_cvtps_epi32(f), z);
    let i = _mm512_min_epi32(_mm512_max_epi32(i, _mm512_setzero_si512()), _mm512_set1_epi32(255));
    _mm512_cvtepi32_epi8(i)
}

/// Row pointers `rows[r0..r0 + nr]` of one register tile, the missing rows repeating the first (computed, never
/// stored), and `nr`.
#[inline]
fn row_tile<const MR: usize>(rows: &[*const u8], r0: usize) -> ([*const u8; MR], usize) {
    let nr = (rows.len() - r0).min(MR);
    let mut rp = [rows[r0]; MR];
    rp[..nr].copy_from_slice(&rows[r0..r0 + nr]);
    (rp, nr)
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
unsafe fn tiles_avx2(rows: &[*const u8], outs: &[*mut u8], kp: usize, b: &Block, bias: &[i32], m: &[f32], z_y: u8) {
    const MR: usize = 4;
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let w128 = _mm256_set1_epi16(128);
        let lo7 = _mm256_set1_epi8(0x7f);
        let zv = _mm256_set1_epi32(z_y as i32);
        let mut r0 = 0;
        while r0 < rows.len() {
            let (rp, nr) = row_tile::<MR>(rows, r0);
            // 8 output channels per ymm: each 32-bit lane holds 4 consecutive k of one channel.
            for j8 in 0..b.width / 8 {
                let mut acc = [_mm256_setzero_si256(); MR];
                let bv = _mm256_loadu_si256(bias.as_ptr().add(b.c0 + 8 * j8) as *const _);
                for a in acc.iter_mut() {
                    *a = bv;
                }
                let mut k = 0;
                while k < kp {
                    let w = _mm256_loadu_si256(b.packed.as_ptr().add(k * b.width + 32 * j8) as *const _);
                    for r in 0..MR {
                        let a = _mm256_set1_epi32((rp[r].add(k) as *const i32).read_unaligned());
                        let a_lo = _mm256_and_si256(a, lo7);
                        let a_hi = _mm256_and_si256(_mm256_srli_epi16(a, 7), _mm256_set1_epi8(1));
                        let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(a_lo, w), ones);
                        let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(a_hi, w), w128);
                        acc[r] = _mm256_add_epi32(acc[r], _mm256_add_epi32(p_lo, p_hi));
                    }
                    k += 4;
                }
                let c = b.c0 + 8 * j8;
                if c >= b.c0 + b.valid {
                    break;
                }
                let mv = _mm256_loadu_ps(m.as_ptr().add(c));
                let n = (b.c0 + b.valid - c).min(8);
                for (r, &o) in outs[r0..r0 + nr].iter().enumerate() {
                    let q = requant8(acc[r], mv, zv);
                    std::ptr::copy_nonoverlapping(q.as_ptr(), o.add(c), n);
                }
            }
            r0 += nr;
        }
    }
}

/// One output row of a depthwise convolution.
///
/// # Safety
/// `isa` must be supported by the CPU; `d` describes a valid padded input (see `QConv::run_depthwise`).
pub(crate) unsafe fn depthwise_row(isa: Isa, s: &QConvSpec, d: &Dw, bias: &[i32], m: &[f32], yrow: &mut [u8]) {
    unsafe {
        if isa >= Isa::Avx512Vnni {
            depthwise_row_512(s, d, bias, m, yrow)
        } else {
            depthwise_row_avx2(s, d, bias, m, yrow)
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn depthwise_row_512(s: &QConvSpec, d: &Dw, bias: &[i32], m: &[f32], yrow: &mut [u8]) {
    let mut c0 = 0;
    while c0 < d.c {
        let left = d.c - c0;
        unsafe {
            // Full blocks of 64 channels, then one block of 1-4 vectors for the rest (masked at its end).
            match left.min(64).div_ceil(16) {
                4 => dw_block_512::<4>(s, d, bias, m, yrow, c0),
                3 => dw_block_512::<3>(s, d, bias, m, yrow, c0),
                2 => dw_block_512::<2>(s, d, bias, m, yrow, c0),
                _ => dw_block_512::<1>(s, d, bias, m, yrow, c0),
            }
            c0 += 64;
        }
    }
}

/// Channels `c0..c0+16·NV` (the last vector masked to `d.c`) of one output row, two output pixels at a time
/// (each weight load serves both). Each tap: widen 16 bytes to 32-bit lanes, `pmaddwd` with the weight in the
/// low 16 bits (the high halves are 0), add.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn dw_block_512<const NV: usize>(s: &QConvSpec, d: &Dw, bias: &[i32], m: &[f32], yrow: &mut [u8], c0: usize) {
    let [kh, kw] = s.kernel;
    let zv = _mm512_set1_epi32(s.z_y as i32);
    let masks: [u16; NV] = std::array::from_fn(|j| {
        let left = d.c.saturating_sub(c0 + 16 * j).min(16);
        if left == 16 { u16::MAX } else { (1u16 << left) - 1 }
    });
    let step = s.stride[1] * d.c;
    unsafe {
        let bv: [__m512i; NV] = std::array::from_fn(|j| _mm512_loadu_si512(bias.as_ptr().add(c0 + 16 * j) as *const _));
        let mv: [__m512; NV] = std::array::from_fn(|j| _mm512_loadu_ps(m.as_ptr().add(c0 + 16 * j)));
        let xb = d.xp.as_ptr().add(d.img);
        let load =
            |p: *const u8, j: usize| _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(masks[j], p.add(16 * j) as *const _));
        let mut ox = 0;
        while ox < d.ow {
            let pair = ox + 1 < d.ow;
            let mut acc0 = bv;
            let mut acc1 = bv;
            for ky in 0..kh {
                let iy = d.oy * s.stride[0] + ky * s.dilation[0];
                for kx in 0..kw {
                    let ix = ox * s.stride[1] + kx * s.dilation[1];
                    let src = xb.add((iy * d.wp + ix) * d.c + c0);
                    let wrow = d.w16.as_ptr().add((ky * kw + kx) * d.cpad + c0);
                    for j in 0..NV {
                        let wv = _mm512_loadu_si512(wrow.add(16 * j) as *const _);
                        acc0[j] = _mm512_add_epi32(acc0[j], _mm512_madd_epi16(load(src, j), wv));
                        if pair {
                            acc1[j] = _mm512_add_epi32(acc1[j], _mm512_madd_epi16(load(src.add(step), j), wv));
                        }
                    }
                }
            }
            let dst = yrow.as_mut_ptr().add(ox * d.c + c0);
            for j in 0..NV {
                _mm_mask_storeu_epi8(dst.add(16 * j) as *mut _, masks[j], requant16(acc0[j], mv[j], zv));
                if pair {
                    _mm_mask_storeu_epi8(dst.add(d.c + 16 * j) as *mut _, masks[j], requant16(acc1[j], mv[j], zv));
                }
            }
            ox += 2;
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_row_avx2(s: &QConvSpec, d: &Dw, bias: &[i32], m: &[f32], yrow: &mut [u8]) {
    let [kh, kw] = s.kernel;
    let zv = _mm256_set1_epi32(s.z_y as i32);
    let full = d.c / 8 * 8;
    unsafe {
        let xb = d.xp.as_ptr().add(d.img);
        for ox in 0..d.ow {
            let mut c0 = 0;
            while c0 < full {
                let mut acc = _mm256_loadu_si256(bias.as_ptr().add(c0) as *const _);
                for ky in 0..kh {
                    let iy = d.oy * s.stride[0] + ky * s.dilation[0];
                    for kx in 0..kw {
                        let ix = ox * s.stride[1] + kx * s.dilation[1];
                        let src = xb.add((iy * d.wp + ix) * d.c + c0);
                        let xv = _mm256_cvtepu8_epi32(_mm_loadl_epi64(src as *const _));
                        let wv = _mm256_loadu_si256(d.w16.as_ptr().add((ky * kw + kx) * d.cpad + c0) as *const _);
                        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(xv, wv));
                    }
                }
                let q = requant8(acc, _mm256_loadu_ps(m.as_ptr().add(c0)), zv);
                std::ptr::copy_nonoverlapping(q.as_ptr(), yrow.as_mut_ptr().add(ox * d.c + c0), 8);
                c0 += 8;
            }
            for ch in full..d.c {
                let mut a = bias[ch];
                for ky in 0..kh {
                    for kx in 0..kw {
                        let iy = d.oy * s.stride[0] + ky * s.dilation[0];
                        let ix = ox * s.stride[1] + kx * s.dilation[1];
                        a += d.xp[d.img + (iy * d.wp + ix) * d.c + ch] as i32 * d.wt[(ky * kw + kx) * d.cpad + ch];
                    }
                }
                yrow[ox * d.c + ch] = super::requant(a, m[ch], s.z_y as i32);
            }
        }
    }
}

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
