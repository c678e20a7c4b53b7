//! aarch64 integer convolution kernels: NEON with `sdot` (dotprod) or, on cores without it (Cortex-A53 class),
//! widening multiplies with pairwise accumulation. Same results as the portable code in `qconv`, bit for bit
//! (tested for every ISA the CPU has, under qemu on a core with and one without dotprod).
//!
//! Both GEMM kernels read the packed weights of the x86 kernels (`[k/4][width][4]`: four consecutive depths of
//! one channel per 32-bit lane, which is also `sdot`'s by-element layout) and multiply signed bytes: the
//! activations enter as `x ^ 0x80 = x − 128` and the bias they start from holds `128·Σ_k w[k]`
//! (`QConv::bias128`). `sdot` and `smull` are signed × signed; the mixed-sign `usdot` needs i8mm.
//!
//! The `sdot` instructions are written with `asm!` (their intrinsics are unstable in the Rust this builds with),
//! inside functions compiled with the `dotprod` feature.
#![allow(clippy::needless_range_loop)] // register tiles are indexed [row][vector] on purpose
use std::arch::aarch64::*;

use super::{Block, Dw, DwPlan, Out, QConvSpec, row_tile};
use crate::{Isa, unroll};

/// `acc.4s += w.16b · a.4b[lane]`: each 32-bit lane of `acc` adds the dot product of its four bytes of `w` with
/// bytes `4·lane..4·lane+4` of `a`.
macro_rules! sdot_lane {
    ($acc:expr, $w:expr, $a:expr, $lane:literal) => {
        std::arch::asm!(
            concat!("sdot {acc:v}.4s, {w:v}.16b, {a:v}.4b[", $lane, "]"),
            acc = inout(vreg) $acc, w = in(vreg) $w, a = in(vreg) $a,
            options(pure, nomem, nostack)
        )
    };
}

/// `acc.4s += w.16b · x.16b` lane by lane (four bytes per 32-bit lane).
macro_rules! sdot_vec {
    ($acc:expr, $w:expr, $x:expr) => {
        std::arch::asm!(
            "sdot {acc:v}.4s, {w:v}.16b, {x:v}.16b",
            acc = inout(vreg) $acc, w = in(vreg) $w, x = in(vreg) $x,
            options(pure, nomem, nostack)
        )
    };
}

/// `acc.4s += a.16b (2×8 unsigned) · b.16b (2×8 signed)ᵀ`: the 2×2 block of row pairs × column pairs over 8 depths,
/// lanes `[r0·c0, r0·c1, r1·c0, r1·c1]`.
macro_rules! usmmla {
    ($acc:expr, $a:expr, $b:expr) => {
        std::arch::asm!(
            "usmmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) $acc, a = in(vreg) $a, b = in(vreg) $b,
            options(pure, nomem, nostack)
        )
    };
}

/// Whether the GEMM kernels of `isa` multiply `x − 128` (and start from `QConv::bias128`): the `sdot` and `smull`
/// ones; `usmmla` takes the unsigned bytes as they are.
pub(crate) fn signed_x(isa: Isa) -> bool {
    matches!(isa, Isa::Neon | Isa::NeonDot)
}

/// # Safety
/// See `qconv::gemm_block`; `isa` must be supported by the CPU; `bias` is `QConv::bias128`.
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
        if isa == Isa::NeonI8mm {
            tiles_mmla(rows, outs, kp, b, bias, m, out)
        } else if isa == Isa::NeonDot {
            tiles_dot(rows, outs, kp, b, bias, m, out)
        } else {
            tiles_neon(rows, outs, kp, b, bias, m, out)
        }
    }
}

/// i8mm: register tiles of 2 row pairs × 8 channel pairs (16 accumulators of 2×2). Per 16 depths: one load per
/// row, two `zip` per row pair (8 depths of each row side by side), 16 weight vectors, 32 `usmmla` (1024 MACs).
#[target_feature(enable = "neon,i8mm")]
unsafe fn tiles_mmla(rows: &[*const u8], outs: &[*mut u8], kp: usize, b: &Block, bias: &[i32], m: &[f32], out: Out) {
    let mut r0 = 0;
    while r0 < rows.len() {
        let nr = (rows.len() - r0).min(4);
        let outs = &outs[r0..r0 + nr];
        let mut j0 = 0;
        while j0 < b.valid {
            unsafe {
                if nr <= 2 {
                    tile_mmla::<1, 2>(&row_tile::<2, u8>(rows, r0).0, outs, kp, b, j0, bias, m, out)
                } else {
                    tile_mmla::<2, 4>(&row_tile::<4, u8>(rows, r0).0, outs, kp, b, j0, bias, m, out)
                }
            }
            j0 += 16;
        }
        r0 += nr;
    }
}

/// `P` row pairs (`R = 2P` rows) × channels `j0..j0 + 16` of a block packed for `usmmla`.
#[inline]
#[target_feature(enable = "neon,i8mm")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_mmla<const P: usize, const R: usize>(
    rows: &[*const u8; R],
    outs: &[*mut u8],
    kp: usize,
    b: &Block,
    j0: usize,
    bias: &[i32],
    m: &[f32],
    out: Out,
) {
    unsafe {
        let c = b.c0 + j0;
        // acc[p][i]: rows 2p, 2p+1 × channels c + 2i, +1, starting from the bias ([b(2i), b(2i+1)] twice).
        let bi: [int32x4_t; 8] = std::array::from_fn(|i| {
            let two = vld1_s32(bias.as_ptr().add(c + 2 * i));
            vcombine_s32(two, two)
        });
        let mut acc = [bi; P];
        // Depth group g (8 depths): `width·8` bytes; channel pair i of this tile at `(j0/2 + i)·16`.
        let wbase = b.packed.as_ptr().add(j0 * 8);
        let gstride = b.width * 8;
        macro_rules! group {
            ($a:expr, $g:expr) => {{
                let wp = wbase.add($g * gstride);
                let w: [int8x16_t; 8] = std::array::from_fn(|i| vld1q_s8(wp.add(16 * i)));
                unroll!(P, p => {
                    unroll!(8, i => { usmmla!(acc[p][i], $a[p], w[i]); });
                });
            }};
        }
        // Rows 2p and 2p+1 side by side: depths k..k+8 (`lo`) and k+8..k+16 (`hi`).
        let pairs = |x: &[uint8x16_t; R]| -> ([uint8x16_t; P], [uint8x16_t; P]) {
            let lo = std::array::from_fn(|p| {
                vreinterpretq_u8_u64(vzip1q_u64(vreinterpretq_u64_u8(x[2 * p]), vreinterpretq_u64_u8(x[2 * p + 1])))
            });
            let hi = std::array::from_fn(|p| {
                vreinterpretq_u8_u64(vzip2q_u64(vreinterpretq_u64_u8(x[2 * p]), vreinterpretq_u64_u8(x[2 * p + 1])))
            });
            (lo, hi)
        };
        let mut k = 0;
        while k + 16 <= kp {
            let (lo, hi) = pairs(&std::array::from_fn(|r| vld1q_u8(rows[r].add(k))));
            group!(lo, k / 8);
            group!(hi, k / 8 + 1);
            k += 16;
        }
        if k < kp {
            // The last 4, 8 or 12 depths (zeros past them meet zero weights).
            let (lo, hi) = pairs(&std::array::from_fn(|r| load_short(rows[r].add(k), kp - k)));
            group!(lo, k / 8);
            if kp - k > 8 {
                group!(hi, k / 8 + 1);
            }
        }
        let n = (b.valid - j0).min(16);
        unroll!(P, p => {
            // Row 2p is the low half of each 2×2 block pair, row 2p+1 the high half.
            let half = |second: bool| -> [int32x4_t; 4] {
                std::array::from_fn(|q| {
                    let (x, y) = (vreinterpretq_s64_s32(acc[p][2 * q]), vreinterpretq_s64_s32(acc[p][2 * q + 1]));
                    vreinterpretq_s32_s64(if second { vzip2q_s64(x, y) } else { vzip1q_s64(x, y) })
                })
            };
            if let Some(&o) = outs.get(2 * p) {
                store(&half(false), o, c, n, m, out);
            }
            if let Some(&o) = outs.get(2 * p + 1) {
                store(&half(true), o, c, n, m, out);
            }
        });
    }
}

/// Register tiles of up to 4 rows × 16 channels: per 16 depths, one load (and sign flip) per row and 16 weight
/// vectors, 16 `sdot` per row.
#[target_feature(enable = "neon,dotprod")]
unsafe fn tiles_dot(rows: &[*const u8], outs: &[*mut u8], kp: usize, b: &Block, bias: &[i32], m: &[f32], out: Out) {
    let mut r0 = 0;
    while r0 < rows.len() {
        let nr = (rows.len() - r0).min(4);
        let outs = &outs[r0..r0 + nr];
        let mut j0 = 0;
        while j0 < b.valid {
            unsafe {
                match nr {
                    1 => tile_dot::<1>(&row_tile::<1, u8>(rows, r0).0, outs, kp, b, j0, bias, m, out),
                    2 => tile_dot::<2>(&row_tile::<2, u8>(rows, r0).0, outs, kp, b, j0, bias, m, out),
                    _ => tile_dot::<4>(&row_tile::<4, u8>(rows, r0).0, outs, kp, b, j0, bias, m, out),
                }
            }
            j0 += 16;
        }
        r0 += nr;
    }
}

#[inline]
#[target_feature(enable = "neon,dotprod")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_dot<const MR: usize>(
    rows: &[*const u8; MR],
    outs: &[*mut u8],
    kp: usize,
    b: &Block,
    j0: usize,
    bias: &[i32],
    m: &[f32],
    out: Out,
) {
    unsafe {
        let flip = vdupq_n_u8(0x80);
        let bv: [int32x4_t; 4] = std::array::from_fn(|j| vld1q_s32(bias.as_ptr().add(b.c0 + j0 + 4 * j)));
        let mut acc = [bv; MR];
        // Depth group `g` (4 depths) of channels j0..j0+16: 64 bytes at `g·width·4 + j0·4`.
        let wbase = b.packed.as_ptr().add(j0 * 4);
        let gstride = b.width * 4;
        // One group of four depths: lane `$l` of every row's vector.
        macro_rules! group {
            ($a:expr, $g:expr, $l:literal) => {{
                let wp = wbase.add($g * gstride);
                let w: [int8x16_t; 4] = std::array::from_fn(|j| vld1q_s8(wp.add(16 * j)));
                unroll!(MR, r => {
                    unroll!(4, j => { sdot_lane!(acc[r][j], w[j], $a[r], $l); });
                });
            }};
        }
        let mut k = 0;
        while k + 16 <= kp {
            let a: [int8x16_t; MR] =
                std::array::from_fn(|r| vreinterpretq_s8_u8(veorq_u8(vld1q_u8(rows[r].add(k)), flip)));
            let g = k / 4;
            group!(a, g, 0);
            group!(a, g + 1, 1);
            group!(a, g + 2, 2);
            group!(a, g + 3, 3);
            k += 16;
        }
        if k < kp {
            // The last 4, 8 or 12 depths, loaded without reading past the row.
            let a: [int8x16_t; MR] =
                std::array::from_fn(|r| vreinterpretq_s8_u8(veorq_u8(load_short(rows[r].add(k), kp - k), flip)));
            let g = k / 4;
            group!(a, g, 0);
            if kp - k > 4 {
                group!(a, g + 1, 1);
            }
            if kp - k > 8 {
                group!(a, g + 2, 2);
            }
        }
        let n = (b.valid - j0).min(16);
        for (r, &o) in outs.iter().enumerate() {
            store(&acc[r], o, b.c0 + j0, n, m, out);
        }
    }
}

/// The `n` (4, 8 or 12) bytes at `p` in the low lanes of a vector (the others zero).
#[inline(always)]
unsafe fn load_short(p: *const u8, n: usize) -> uint8x16_t {
    unsafe {
        let word = |p: *const u8| vcreate_u8((p as *const u32).read_unaligned() as u64);
        let lo = if n >= 8 { vld1_u8(p) } else { word(p) };
        let hi = if n > 8 { word(p.add(8)) } else { vdup_n_u8(0) };
        vcombine_u8(lo, hi)
    }
}

/// Without dotprod: tiles of up to 4 rows × 8 channels. Per group of four depths and row, the row's four
/// (flipped) bytes repeated across a vector times the 16 weight bytes of 4 channels give 16 exact 16-bit products
/// (`smull`, `smull2`), pairwise-accumulated into 32 bits (`sadalp`); the pairs are summed at the end (`addp`).
#[target_feature(enable = "neon")]
unsafe fn tiles_neon(rows: &[*const u8], outs: &[*mut u8], kp: usize, b: &Block, bias: &[i32], m: &[f32], out: Out) {
    let mut r0 = 0;
    while r0 < rows.len() {
        let nr = (rows.len() - r0).min(4);
        let outs = &outs[r0..r0 + nr];
        let mut j0 = 0;
        while j0 < b.valid {
            unsafe {
                match nr {
                    1 => tile_neon::<1>(&row_tile::<1, u8>(rows, r0).0, outs, kp, b, j0, bias, m, out),
                    2 => tile_neon::<2>(&row_tile::<2, u8>(rows, r0).0, outs, kp, b, j0, bias, m, out),
                    _ => tile_neon::<4>(&row_tile::<4, u8>(rows, r0).0, outs, kp, b, j0, bias, m, out),
                }
            }
            j0 += 8;
        }
        r0 += nr;
    }
}

#[inline]
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_neon<const MR: usize>(
    rows: &[*const u8; MR],
    outs: &[*mut u8],
    kp: usize,
    b: &Block,
    j0: usize,
    bias: &[i32],
    m: &[f32],
    out: Out,
) {
    unsafe {
        let flip = vdupq_n_u8(0x80);
        // acc[r][2v + h]: channels j0 + 4v + 2h, +1, each as two partial sums.
        let mut acc = [[vdupq_n_s32(0); 4]; MR];
        let mut wp = b.packed.as_ptr().add(j0 * 4);
        let gstride = b.width * 4;
        let mut k = 0;
        if b.no_i8_min {
            // Two groups of four depths per step: the second group's products are added to the first's in 16 bits
            // (`smlal`) before one pairwise widening (`sadalp`): 6 instructions per 32 MACs instead of 8.
            while k + 8 <= kp {
                let w0 = [vld1q_s8(wp), vld1q_s8(wp.add(16))];
                let w1 = [vld1q_s8(wp.add(gstride)), vld1q_s8(wp.add(gstride + 16))];
                unroll!(MR, r => {
                    let x = veor_u8(vld1_u8(rows[r].add(k)), vget_low_u8(flip));
                    let a0 = vreinterpretq_s8_u32(vdupq_lane_u32::<0>(vreinterpret_u32_u8(x)));
                    let a1 = vreinterpretq_s8_u32(vdupq_lane_u32::<1>(vreinterpret_u32_u8(x)));
                    unroll!(2, v => {
                        let lo = vmlal_s8(vmull_s8(vget_low_s8(w0[v]), vget_low_s8(a0)), vget_low_s8(w1[v]), vget_low_s8(a1));
                        let hi = vmlal_high_s8(vmull_high_s8(w0[v], a0), w1[v], a1);
                        acc[r][2 * v] = vpadalq_s16(acc[r][2 * v], lo);
                        acc[r][2 * v + 1] = vpadalq_s16(acc[r][2 * v + 1], hi);
                    });
                });
                wp = wp.add(2 * gstride);
                k += 8;
            }
        }
        while k < kp {
            let w = [vld1q_s8(wp), vld1q_s8(wp.add(16))];
            unroll!(MR, r => {
                let x = vdupq_n_u32((rows[r].add(k) as *const u32).read_unaligned());
                let a = vreinterpretq_s8_u8(veorq_u8(vreinterpretq_u8_u32(x), flip));
                unroll!(2, v => {
                    acc[r][2 * v] = vpadalq_s16(acc[r][2 * v], vmull_s8(vget_low_s8(w[v]), vget_low_s8(a)));
                    acc[r][2 * v + 1] = vpadalq_s16(acc[r][2 * v + 1], vmull_high_s8(w[v], a));
                });
            });
            wp = wp.add(gstride);
            k += 4;
        }
        let c = b.c0 + j0;
        let bv = [vld1q_s32(bias.as_ptr().add(c)), vld1q_s32(bias.as_ptr().add(c + 4))];
        let n = (b.valid - j0).min(8);
        for (r, &o) in outs.iter().enumerate() {
            let sums = [
                vaddq_s32(bv[0], vpaddq_s32(acc[r][0], acc[r][1])),
                vaddq_s32(bv[1], vpaddq_s32(acc[r][2], acc[r][3])),
            ];
            store(&sums, o, c, n, m, out);
        }
    }
}

/// Writes the first `n` of the `4·NV` accumulated channels from `c` of one output row `o`: requantized bytes
/// (`Out::U8`) or `f32(acc)·m` (`Out::F32`). `m` holds at least `c + 4·NV` multipliers.
#[inline(always)]
unsafe fn store<const NV: usize>(acc: &[int32x4_t; NV], o: *mut u8, c: usize, n: usize, m: &[f32], out: Out) {
    unsafe {
        match out {
            Out::U8(z) => {
                let q = requant(acc, m.as_ptr().add(c), z);
                if n == 16 {
                    vst1q_u8(o.add(c), q);
                } else if n == 8 {
                    vst1_u8(o.add(c), vget_low_u8(q));
                } else {
                    let mut t = [0u8; 16];
                    vst1q_u8(t.as_mut_ptr(), q);
                    for i in 0..n {
                        *o.add(c + i) = t[i];
                    }
                }
            }
            Out::F32 => {
                let o = (o as *mut f32).add(c);
                for j in 0..NV {
                    let f = vmulq_f32(vcvtq_f32_s32(acc[j]), vld1q_f32(m.as_ptr().add(c + 4 * j)));
                    if n >= 4 * j + 4 {
                        vst1q_f32(o.add(4 * j), f);
                    } else {
                        let mut t = [0f32; 4];
                        vst1q_f32(t.as_mut_ptr(), f);
                        for i in 4 * j..n {
                            *o.add(i) = t[i - 4 * j];
                        }
                    }
                }
            }
        }
    }
}

/// `clamp(round_half_even(clamp(f32(acc)·m, ±1024)) + z, 0, 255)` for `4·NV` lanes (NV = 2 or 4; with 2 the high
/// half of the result is zero): the scalar `requant`, with `fcvtns` rounding half to even (NaN → 0) and saturating
/// narrows i32 → i16 → +z → u8. The ±1024 clamp needs no instruction: a value beyond it saturates to 0 or 255
/// either way (|v| > 1024 and z ≤ 255 put `v + z` outside 0..=255 on the same side, in i16 or saturated).
#[inline(always)]
pub(crate) unsafe fn requant<const NV: usize>(acc: &[int32x4_t; NV], m: *const f32, z: u8) -> uint8x16_t {
    unsafe {
        let zv = vdupq_n_s16(z as i16);
        let i: [int32x4_t; NV] =
            std::array::from_fn(|j| vcvtnq_s32_f32(vmulq_f32(vcvtq_f32_s32(acc[j]), vld1q_f32(m.add(4 * j)))));
        let half = |p: usize| vqmovun_s16(vqaddq_s16(vcombine_s16(vqmovn_s32(i[2 * p]), vqmovn_s32(i[2 * p + 1])), zv));
        vcombine_u8(half(0), if NV == 4 { half(1) } else { vdup_n_u8(0) })
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
        let full = if isa >= Isa::NeonDot { dw_dot(s.z_y, d, p, m, yrow) } else { dw_neon(s, d, p, bias, m, yrow) };
        // Channels past the last full vector: scalar.
        p.row_scalar(s.z_y, s.geom.kernel[0] * s.geom.kernel[1], d, bias, m, full..d.c, yrow);
    }
}

/// Blocks of 16 channels, two output pixels per weight load (four spill registers). Per group of four taps and pixel: four
/// (flipped) loads, two rounds of zips put the four taps of a channel in one 32-bit lane (`DwPlan::w4`'s layout,
/// one 16-channel quarter of it), four `sdot`. The taps' row pointers are resolved once per row. Returns the
/// channels done (a multiple of 16).
#[target_feature(enable = "neon,dotprod")]
unsafe fn dw_dot(z_y: u8, d: &Dw, p: &DwPlan, m: &[f32], yrow: &mut [u8]) -> usize {
    let groups = p.taps.len() / 4;
    let full = d.c / 16 * 16;
    // Tap t of output pixel ox, channel c, is at base[t] + ox·step + c.
    let base = d.tap_starts(&p.taps);
    unsafe {
        for c0 in (0..full).step_by(16) {
            let (cb, quarter) = (c0 / 64, (c0 % 64) / 16);
            let wb = p.w4.as_ptr().add(cb * groups * 256 + 16 * quarter);
            let mut ox = 0;
            while ox + 2 <= d.ow {
                dw_dot_pixels::<2>(z_y, d, p, &base, m, wb, c0, ox, yrow);
                ox += 2;
            }
            while ox < d.ow {
                dw_dot_pixels::<1>(z_y, d, p, &base, m, wb, c0, ox, yrow);
                ox += 1;
            }
        }
    }
    full
}

/// Channels `c0..c0 + 16` of output pixels `ox..ox + R` (see `dw_dot`).
#[inline]
#[target_feature(enable = "neon,dotprod")]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_dot_pixels<const R: usize>(
    z_y: u8,
    d: &Dw,
    p: &DwPlan,
    base: &[*const u8],
    m: &[f32],
    wb: *const i8,
    c0: usize,
    ox: usize,
    yrow: &mut [u8],
) {
    unsafe {
        let flip = vdupq_n_u8(0x80);
        let bv: [int32x4_t; 4] = std::array::from_fn(|q| vld1q_s32(p.bias128.as_ptr().add(c0 + 4 * q)));
        let mut acc = [bv; R];
        let o = ox * d.step + c0;
        for (g, b4) in base.as_chunks::<4>().0.iter().enumerate() {
            let w: [int8x16_t; 4] = std::array::from_fn(|q| vld1q_s8(wb.add((g * 4 + q) * 64)));
            unroll!(R, r => {
                let at = o + r * d.step;
                let x: [uint8x16_t; 4] = std::array::from_fn(|i| veorq_u8(vld1q_u8(b4[i].add(at)), flip));
                let a = vreinterpretq_s16_u8(vzip1q_u8(x[0], x[1]));
                let b = vreinterpretq_s16_u8(vzip2q_u8(x[0], x[1]));
                let c = vreinterpretq_s16_u8(vzip1q_u8(x[2], x[3]));
                let e = vreinterpretq_s16_u8(vzip2q_u8(x[2], x[3]));
                let v = [vzip1q_s16(a, c), vzip2q_s16(a, c), vzip1q_s16(b, e), vzip2q_s16(b, e)];
                unroll!(4, q => { sdot_vec!(acc[r][q], w[q], vreinterpretq_s8_s16(v[q])); });
            });
        }
        unroll!(R, r => {
            vst1q_u8(yrow.as_mut_ptr().add((ox + r) * d.c + c0), requant(&acc[r], m.as_ptr().add(c0), z_y));
        });
    }
}

/// Without dotprod: blocks of 16 channels (then 8), two output pixels per weight load; per tap and pixel one load,
/// two widenings (`uxtl`) and four 16-bit multiply-adds into 32 bits (`smlal`). The taps' row pointers are resolved
/// once per row. Returns the channels done (a multiple of 8).
#[target_feature(enable = "neon")]
unsafe fn dw_neon(s: &QConvSpec, d: &Dw, p: &DwPlan, bias: &[i32], m: &[f32], yrow: &mut [u8]) -> usize {
    let taps = s.geom.kernel[0] * s.geom.kernel[1];
    let base = d.tap_starts(&p.taps[..taps]);
    let full16 = d.c / 16 * 16;
    let full = d.c / 8 * 8;
    unsafe {
        for c0 in (0..full16).step_by(16) {
            let mut ox = 0;
            while ox + 2 <= d.ow {
                dw_neon_pixels::<2, 4>(s.z_y, d, p, &base, bias, m, c0, ox, yrow);
                ox += 2;
            }
            if ox < d.ow {
                dw_neon_pixels::<1, 4>(s.z_y, d, p, &base, bias, m, c0, ox, yrow);
            }
        }
        if full > full16 {
            for ox in 0..d.ow {
                dw_neon_pixels::<1, 2>(s.z_y, d, p, &base, bias, m, full16, ox, yrow);
            }
        }
    }
    full
}

/// Channels `c0..c0 + 4·NV` (NV = 2 or 4) of output pixels `ox..ox + R` (see `dw_neon`).
#[inline]
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_neon_pixels<const R: usize, const NV: usize>(
    z_y: u8,
    d: &Dw,
    p: &DwPlan,
    base: &[*const u8],
    bias: &[i32],
    m: &[f32],
    c0: usize,
    ox: usize,
    yrow: &mut [u8],
) {
    unsafe {
        let bv: [int32x4_t; NV] = std::array::from_fn(|j| vld1q_s32(bias.as_ptr().add(c0 + 4 * j)));
        let mut acc = [bv; R];
        let o = ox * d.step + c0;
        for (t, &b) in base.iter().enumerate() {
            let wp = p.wh.as_ptr().add(t * p.cpad + c0);
            // 16 weights (`cpad` is a multiple of 16, so the second 8 exist even when NV = 2 does not use them).
            let w = [vld1q_s16(wp), vld1q_s16(wp.add(8))];
            unroll!(R, r => {
                let src = b.add(o + r * d.step);
                if NV == 4 {
                    let x = vld1q_u8(src);
                    let lo = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(x)));
                    let hi = vreinterpretq_s16_u16(vmovl_high_u8(x));
                    acc[r][0] = vmlal_s16(acc[r][0], vget_low_s16(lo), vget_low_s16(w[0]));
                    acc[r][1] = vmlal_high_s16(acc[r][1], lo, w[0]);
                    // NV − 2, NV − 1: channels 8..16 (written so for NV = 2 too, where this branch is never taken).
                    acc[r][NV - 2] = vmlal_s16(acc[r][NV - 2], vget_low_s16(hi), vget_low_s16(w[1]));
                    acc[r][NV - 1] = vmlal_high_s16(acc[r][NV - 1], hi, w[1]);
                } else {
                    let lo = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(src)));
                    acc[r][0] = vmlal_s16(acc[r][0], vget_low_s16(lo), vget_low_s16(w[0]));
                    acc[r][1] = vmlal_high_s16(acc[r][1], lo, w[0]);
                }
            });
        }
        unroll!(R, r => {
            let q = requant(&acc[r], m.as_ptr().add(c0), z_y);
            let dst = yrow.as_mut_ptr().add((ox + r) * d.c + c0);
            if NV == 4 {
                vst1q_u8(dst, q);
            } else {
                vst1_u8(dst, vget_low_u8(q));
            }
        });
    }
}
