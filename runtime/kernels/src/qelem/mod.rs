//! Element-wise and data-movement INT8 kernels on NHWC uint8 tensors, and their float twins (max pooling, channel
//! concatenation, global average pooling, row softmax).
#[cfg(target_arch = "aarch64")]
pub(crate) mod aarch64;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;
use super::Isa;
use super::reference::QParams;

/// onnxruntime's QLinearAdd (see [`super::reference::qadd`]), `out[i] = add(a[i], b[i])`.
pub fn qadd(isa: Isa, a: &[u8], qa: QParams, b: &[u8], qb: QParams, qc: QParams, out: &mut [u8]) {
    let (r_a, r_b) = (qa.scale / qc.scale, qb.scale / qc.scale);
    let k = qc.zero as f32 - (r_a * qa.zero as f32 + r_b * qb.zero as f32);
    #[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(unused_mut))]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa.supported() == Isa::Avx512Vnni {
        // SAFETY: AVX-512 F/BW/VL are part of the detected ISA.
        done = unsafe { x86::qadd_512(a, b, r_a, r_b, k, out) };
    }
    #[cfg(target_arch = "aarch64")]
    if isa.supported().is_arm() {
        // SAFETY: NEON is part of every aarch64 level.
        done = unsafe { aarch64::qadd(a, b, r_a, r_b, k, out) };
    }
    let _ = isa;
    for ((o, &av), &bv) in out.iter_mut().zip(a).zip(b).skip(done) {
        let t = (bv as f32).mul_add(r_b, k);
        *o = (av as f32).mul_add(r_a, t).clamp(-1024.0, 1024.0).round_ties_even().clamp(0.0, 255.0) as u8;
    }
}

/// `QuantizeLinear(DequantizeLinear(v))` for every byte: what a float op between the two computes when it
/// commutes with monotonic maps (max, concat, reshape). The division is exact (f32 `x / s`, as onnxruntime).
pub fn requant_table(from: QParams, to: QParams) -> [u8; 256] {
    std::array::from_fn(|v| {
        let f = (v as i32 - from.zero as i32) as f32 * from.scale;
        quantize(f, to)
    })
}

/// A quantized element-wise function on uint8 values, `y[i] = table[x[i]]`: any chain of element-wise float ops
/// between a DequantizeLinear and a QuantizeLinear (SiLU's `x·σ(x)` with its inner QDQ pair, a LeakyRelu, a
/// requantization) tabulated over the 256 inputs.
pub fn lut(isa: Isa, x: &[u8], table: &[u8; 256], y: &mut [u8]) {
    let len = x.len().min(y.len());
    // SAFETY: both slices hold `len` bytes.
    unsafe { lut_raw(isa, x.as_ptr(), y.as_mut_ptr(), len, table) }
}

/// [`lut`] in place.
pub fn lut_in_place(isa: Isa, y: &mut [u8], table: &[u8; 256]) {
    let (p, len) = (y.as_mut_ptr(), y.len());
    // SAFETY: `y` holds `len` bytes; each byte is read before it is written.
    unsafe { lut_raw(isa, p, p, len, table) }
}

/// `dst[i] = table[src[i]]` for `i < len`; `src` may be `dst`.
///
/// # Safety
/// `src` and `dst` address `len` bytes each, either the same bytes or disjoint ones.
pub(crate) unsafe fn lut_raw(isa: Isa, src: *const u8, dst: *mut u8, len: usize, table: &[u8; 256]) {
    #[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(unused_mut))]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa.supported() == Isa::Avx512Vnni && std::is_x86_feature_detected!("avx512vbmi") {
        // SAFETY: AVX-512 F/BW and VBMI were detected; the caller's ranges.
        done = unsafe { x86::lut_vbmi(src, dst, len, table) };
    }
    #[cfg(target_arch = "aarch64")]
    if isa.supported().is_arm() {
        // SAFETY: NEON is part of every aarch64 level; the caller's ranges.
        done = unsafe { aarch64::lut(src, dst, len, table) };
    }
    let _ = isa;
    for i in done..len {
        // SAFETY: `i < len`; the byte at `i` is read before it is written.
        unsafe { *dst.add(i) = table[*src.add(i) as usize] };
    }
}

/// The channels `c0..c0 + cw` of an NHWC uint8 tensor `[n, h, w, c]`, upsampled by whole factors `[sh, sw]`
/// (nearest neighbour) and mapped through `table`: `y[b, oy, ox, j] = table[x[b, oy / sh, ox / sw, c0 + j]]`.
/// A quantized element-wise function followed by a channel Split or a nearest Resize (they commute).
#[allow(clippy::too_many_arguments)]
pub fn lut_window(
    isa: Isa,
    x: &[u8],
    [n, h, w, c]: [usize; 4],
    (c0, cw): (usize, usize),
    [sh, sw]: [usize; 2],
    table: &[u8; 256],
    y: &mut [u8],
) {
    let (oh, ow) = (h * sh, w * sw);
    assert!(c0 + cw <= c && x.len() >= n * h * w * c && y.len() >= n * oh * ow * cw);
    if cw == 0 || w == 0 {
        return;
    }
    if (c0, cw, sh, sw) == (0, c, 1, 1) {
        let len = n * h * w * c;
        let parts = super::threads().min(len / 65536).max(1);
        let per = len.div_ceil(parts);
        let (src, dst) = (x.as_ptr() as usize, y.as_mut_ptr() as usize);
        super::for_each_part(parts, |p| {
            let r = (p * per).min(len)..((p + 1) * per).min(len);
            // SAFETY: the ranges are disjoint and inside both tensors.
            unsafe { lut_raw(isa, (src as *const u8).add(r.start), (dst as *mut u8).add(r.start), r.len(), table) };
        });
        return;
    }
    // One input row per item: its pixels' window mapped once, then copied to the `sw` columns and `sh` rows.
    let rows = n * h;
    let parts = super::threads().min(y.len() / 32_768).max(1).min(rows.max(1));
    let per = rows.div_ceil(parts.max(1));
    let dst = y.as_mut_ptr() as usize;
    super::for_each_part(parts, |p| {
        let mut mapped = vec![0u8; w * cw];
        for r in (p * per).min(rows)..((p + 1) * per).min(rows) {
            let src = &x[r * w * c..(r + 1) * w * c];
            for (px, m) in mapped.chunks_exact_mut(cw).enumerate() {
                lut(isa, &src[px * c + c0..px * c + c0 + cw], table, m);
            }
            let row = ow * cw;
            for dy in 0..sh {
                // SAFETY: output row `r·sh + dy` is written by this part only.
                let out = unsafe { std::slice::from_raw_parts_mut((dst as *mut u8).add((r * sh + dy) * row), row) };
                if dy > 0 {
                    // SAFETY: the first copy of this input row, just written by this part.
                    let first = unsafe { std::slice::from_raw_parts((dst as *const u8).add(r * sh * row), row) };
                    out.copy_from_slice(first);
                    continue;
                }
                if sw == 1 {
                    out.copy_from_slice(&mapped);
                } else {
                    for (px, m) in mapped.chunks_exact(cw).enumerate() {
                        for dx in 0..sw {
                            out[(px * sw + dx) * cw..][..cw].copy_from_slice(m);
                        }
                    }
                }
            }
        }
    });
}

/// `round_half_even(x / s) + z`, saturated to uint8 (ONNX QuantizeLinear).
#[inline]
pub fn quantize(x: f32, q: QParams) -> u8 {
    ((x / q.scale).round_ties_even() + q.zero as f32).clamp(0.0, 255.0) as u8
}

/// QuantizeLinear of a contiguous slice.
pub fn quantize_slice(isa: Isa, x: &[f32], q: QParams, out: &mut [u8]) {
    #[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(unused_mut))]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa.supported() == Isa::Avx512Vnni {
        // SAFETY: AVX-512 F/BW/VL are part of the detected ISA.
        done = unsafe { x86::quantize_512(x, q.scale, q.zero, out) };
    }
    #[cfg(target_arch = "aarch64")]
    if isa.supported().is_arm() {
        // SAFETY: NEON is part of every aarch64 level.
        done = unsafe { aarch64::quantize(x, q.scale, q.zero, out) };
    }
    let _ = isa;
    for (o, &v) in out.iter_mut().zip(x).skip(done) {
        *o = quantize(v, q);
    }
}

/// QuantizeLinear of an NCHW f32 tensor into NHWC uint8 (the entry of an integer chain).
pub fn quantize_nchw_to_nhwc(isa: Isa, x: &[f32], [n, c, h, w]: [usize; 4], q: QParams, out: &mut [u8]) {
    // Chunks of pixels: each channel plane's chunk is quantized (vectorised) into a small buffer, then the
    // chunk's pixels are interleaved into NHWC; chunks split across the pool.
    const CHUNK: usize = 2048;
    let hw = h * w;
    let chunks = hw.div_ceil(CHUNK);
    let items = n * chunks;
    let parts = (super::threads() * 2).min(items).min((x.len() / 32_768).max(1));
    let per = items.div_ceil(parts.max(1));
    let out_addr = out.as_mut_ptr() as usize;
    super::for_each_part(parts, |part| {
        let mut planes = vec![0u8; c * CHUNK];
        for item in part * per..((part + 1) * per).min(items) {
            let (b, p0) = (item / chunks, (item % chunks) * CHUNK);
            let len = (hw - p0).min(CHUNK);
            for ch in 0..c {
                quantize_slice(isa, &x[(b * c + ch) * hw + p0..][..len], q, &mut planes[ch * CHUNK..ch * CHUNK + len]);
            }
            // SAFETY: pixels p0..p0+len of image b are written by this part only.
            let dst = unsafe { std::slice::from_raw_parts_mut((out_addr as *mut u8).add((b * hw + p0) * c), len * c) };
            if c == 3 {
                let (r, rest) = planes.split_at(CHUNK);
                let (g, bl) = rest.split_at(CHUNK);
                for (i, px) in dst.as_chunks_mut::<3>().0.iter_mut().enumerate() {
                    *px = [r[i], g[i], bl[i]];
                }
            } else {
                for (i, px) in dst.chunks_exact_mut(c).enumerate() {
                    for (ch, v) in px.iter_mut().enumerate() {
                        *v = planes[ch * CHUNK + i];
                    }
                }
            }
        }
    });
}

/// `y[b][j][i] = x[b][i][j]` for `rows` ≤ 4 planes of `cols` values, in chunks of columns split across the pool.
fn interleave_planes<T: Copy + Send + Sync>(x: &[T], n: usize, rows: usize, cols: usize, y: &mut [T]) {
    const CHUNK: usize = 4096;
    let chunks = cols.div_ceil(CHUNK);
    let items = n * chunks;
    // At least one part: an empty input (n or cols 0) gives an empty loop, not a division by zero.
    let parts = (super::threads() * 2).min(items).min((n * rows * cols / 65_536).max(1)).max(1);
    let per = items.div_ceil(parts);
    let y_addr = y.as_mut_ptr() as usize;
    super::for_each_part(parts, |part| {
        for item in part * per..((part + 1) * per).min(items) {
            let (b, j0) = (item / chunks, (item % chunks) * CHUNK);
            let len = (cols - j0).min(CHUNK);
            let plane = |i: usize| &x[(b * rows + i) * cols + j0..][..len];
            // SAFETY: columns j0..j0+len of image b are written by this part only.
            let dst =
                unsafe { std::slice::from_raw_parts_mut((y_addr as *mut T).add((b * cols + j0) * rows), len * rows) };
            match rows {
                1 => dst.copy_from_slice(plane(0)),
                2 => {
                    for ((d, &a), &b) in dst.as_chunks_mut::<2>().0.iter_mut().zip(plane(0)).zip(plane(1)) {
                        *d = [a, b];
                    }
                }
                3 => {
                    for (((d, &a), &b), &c) in
                        dst.as_chunks_mut::<3>().0.iter_mut().zip(plane(0)).zip(plane(1)).zip(plane(2))
                    {
                        *d = [a, b, c];
                    }
                }
                _ => {
                    let (p0, p1, p2, p3) = (plane(0), plane(1), plane(2), plane(3));
                    for ((((d, &a), &b), &c), &e) in
                        dst.as_chunks_mut::<4>().0.iter_mut().zip(p0).zip(p1).zip(p2).zip(p3)
                    {
                        *d = [a, b, c, e];
                    }
                }
            }
        }
    });
}

/// Max pooling geometry (NHWC).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pool2d {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// top, left, bottom, right
    pub pads: [usize; 4],
    pub ceil_mode: bool,
}

impl Pool2d {
    pub fn output_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        // ONNX: floor or ceil of (len + pads − k) / s, plus one; in ceil mode the last window must start inside
        // the input or the leading pad.
        let one = |len: usize, k: usize, s: usize, p0: usize, p1: usize| {
            let span = (len + p0 + p1).checked_sub(k)?;
            let mut o = if self.ceil_mode { span.div_ceil(s) + 1 } else { span / s + 1 };
            if self.ceil_mode && o > 1 && (o - 1) * s >= len + p0 {
                o -= 1;
            }
            Some(o)
        };
        if self.stride.contains(&0) || self.kernel.contains(&0) {
            return None;
        }
        let oh = one(h, self.kernel[0], self.stride[0], self.pads[0], self.pads[2])?;
        let ow = one(w, self.kernel[1], self.stride[1], self.pads[1], self.pads[3])?;
        Some((oh, ow))
    }
}

/// Max pooling on raw uint8 values, then `table` (the requantization to the output's parameters; monotonic, so
/// it commutes with the max). Window cells outside the input are skipped.
pub fn maxpool(isa: Isa, x: &[u8], dims: [usize; 4], g: Pool2d, table: &[u8; 256], out: &mut [u8]) -> Option<()> {
    maxpool_with(isa, x, dims, g, |a| table[a as usize], out)
}

/// Float max pooling on NHWC (window cells outside the input are skipped, as in onnxruntime; a NaN never wins).
pub fn maxpool_f32(isa: Isa, x: &[f32], dims: [usize; 4], g: Pool2d, out: &mut [f32]) -> Option<()> {
    maxpool_with(isa, x, dims, g, |a| a, out)
}

/// A per-ISA kernel for one output pixel of a max pooling: the max over the window's `cells` (offsets of the
/// window pixels' first channels in `x`) of the leading channels it handles (of `c`), written to `dst`; returns
/// how many channels that was. The maxima stay in registers while the cells stream past.
///
/// # Safety
/// The CPU has the kernel's ISA; `x + cell` addresses `c` readable values for every cell, `dst` `c` writable.
pub(crate) type MaxPixel<T> = unsafe fn(x: *const T, cells: &[usize], c: usize, dst: *mut T) -> usize;

/// A value max pooling runs on: the max's identity and the pixel kernel of an instruction set.
trait PoolValue: Copy + Send + Sync + PartialOrd {
    const LOWEST: Self;
    fn pixel_kernel(isa: Isa) -> Option<MaxPixel<Self>>;
}

impl PoolValue for f32 {
    const LOWEST: f32 = f32::NEG_INFINITY;
    fn pixel_kernel(isa: Isa) -> Option<MaxPixel<f32>> {
        #[cfg(target_arch = "x86_64")]
        if isa.supported() == Isa::Avx512Vnni {
            return Some(x86::maxpool_px_f32);
        }
        #[cfg(target_arch = "aarch64")]
        if isa.supported().is_arm() {
            return Some(aarch64::maxpool_px_f32);
        }
        let _ = isa;
        None
    }
}

impl PoolValue for u8 {
    const LOWEST: u8 = 0;
    fn pixel_kernel(isa: Isa) -> Option<MaxPixel<u8>> {
        #[cfg(target_arch = "x86_64")]
        if isa.supported() == Isa::Avx512Vnni {
            return Some(x86::maxpool_px_u8);
        }
        #[cfg(target_arch = "aarch64")]
        if isa.supported().is_arm() {
            return Some(aarch64::maxpool_px_u8);
        }
        let _ = isa;
        None
    }
}

fn maxpool_with<T: PoolValue>(
    isa: Isa,
    x: &[T],
    [n, h, w, c]: [usize; 4],
    g: Pool2d,
    finish: impl Fn(T) -> T + Sync,
    out: &mut [T],
) -> Option<()> {
    let simd = T::pixel_kernel(isa);
    let (oh, ow) = g.output_hw(h, w)?;
    // Every window must hold an input cell (the lowering checks pads < kernel, so this holds there).
    let covered = |o: usize, len: usize, k: usize, s: usize, p: usize| (0..o).all(|i| i * s + k > p && i * s < len + p);
    if !covered(oh, h, g.kernel[0], g.stride[0], g.pads[0]) || !covered(ow, w, g.kernel[1], g.stride[1], g.pads[1]) {
        return None;
    }
    if x.len() < n * h * w * c || out.len() < n * oh * ow * c {
        return None;
    }
    let rows = n * oh;
    let work = rows * ow * c * g.kernel[0] * g.kernel[1];
    // At least one part: an empty batch (rows 0) gives an empty loop, not a division by zero.
    let parts = (super::threads() * 2).min(rows).min((work / 100_000).max(1)).max(1);
    let per = rows.div_ceil(parts);
    let out_addr = out.as_mut_ptr() as usize;
    // The cells of one window that lie inside the input, along one axis.
    let inside = |o: usize, k: usize, s: usize, p: usize, len: usize| {
        let first = (o * s) as isize - p as isize;
        (first.max(0) as usize)..((first + k as isize).min(len as isize) as usize)
    };
    // Windows that no column edge clips (their whole width inside the row) read one set of offsets from their
    // first cell, built once per output row; clipped ones build their own.
    super::for_each_part(parts, |part| {
        let (mut cells, mut inner) = (Vec::with_capacity(g.kernel[0] * g.kernel[1]), Vec::new());
        for r in part * per..((part + 1) * per).min(rows) {
            let (b, oy) = (r / oh, r % oh);
            let iy = inside(oy, g.kernel[0], g.stride[0], g.pads[0], h);
            inner.clear();
            for y in 0..iy.len() {
                inner.extend((0..g.kernel[1]).map(|x| (y * w + x) * c));
            }
            for ox in 0..ow {
                let ix = inside(ox, g.kernel[1], g.stride[1], g.pads[1], w);
                let base = ((b * h + iy.start) * w + ix.start) * c;
                let cells = if ix.len() == g.kernel[1] {
                    &inner
                } else {
                    cells.clear();
                    for y in 0..iy.len() {
                        cells.extend((0..ix.len()).map(|x| (y * w + x) * c));
                    }
                    &cells
                };
                // SAFETY: output pixel (r, ox) is written by this part only.
                let px = unsafe { std::slice::from_raw_parts_mut((out_addr as *mut T).add((r * ow + ox) * c), c) };
                // SAFETY: the cells lie inside `x` (checked against its length above) and hold `c` values each.
                let done = simd.map_or(0, |k| unsafe { k(x.as_ptr().add(base), cells, c, px.as_mut_ptr()) });
                for (ch, d) in px.iter_mut().enumerate().skip(done) {
                    let mut a = T::LOWEST;
                    for &at in cells.iter() {
                        let v = x[base + at + ch];
                        // `v > a`: the first NaN never enters the max.
                        if v > a {
                            a = v;
                        }
                    }
                    *d = a;
                }
                for d in px.iter_mut() {
                    *d = finish(*d);
                }
            }
        }
    });
    Some(())
}

/// Float concatenation along the channel axis (last in NHWC): `inputs` are (values, channels).
pub fn concat_channels_f32(inputs: &[(&[f32], usize)], pixels: usize, out: &mut [f32]) {
    let c_out: usize = inputs.iter().map(|i| i.1).sum();
    let parts = (super::threads() * 2).min((pixels * c_out / 32_768).max(1));
    let per = pixels.div_ceil(parts);
    let out_addr = out.as_mut_ptr() as usize;
    super::for_each_part(parts, |part| {
        // Pixel by pixel: each output pixel written whole (its cache lines once), the inputs read in order.
        for p in part * per..((part + 1) * per).min(pixels) {
            // SAFETY: pixel `p` of the output is written by this part only.
            let dst = unsafe { std::slice::from_raw_parts_mut((out_addr as *mut f32).add(p * c_out), c_out) };
            let mut off = 0;
            for &(x, c) in inputs {
                dst[off..off + c].copy_from_slice(&x[p * c..(p + 1) * c]);
                off += c;
            }
        }
    });
}

/// The channels `c0..c0 + cw` of `pixels` NHWC pixels of `c` channels (a channel Split's output), split across the
/// pool by ranges of pixels.
pub fn channel_window<T: Copy + Send + Sync>(x: &[T], pixels: usize, c: usize, (c0, cw): (usize, usize), y: &mut [T]) {
    assert!(c0 + cw <= c && x.len() >= pixels * c && y.len() >= pixels * cw);
    let parts = (super::threads() * 2).min((pixels * cw / 32_768).max(1));
    let per = pixels.div_ceil(parts);
    let out_addr = y.as_mut_ptr() as usize;
    super::for_each_part(parts, |part| {
        for p in part * per..((part + 1) * per).min(pixels) {
            // SAFETY: pixel `p` of the output is written by this part only.
            let dst = unsafe { std::slice::from_raw_parts_mut((out_addr as *mut T).add(p * cw), cw) };
            dst.copy_from_slice(&x[p * c + c0..p * c + c0 + cw]);
        }
    });
}

/// Global average pooling of `n` NHWC images of `hw` pixels and `c` channels into `[n, c]` (`out`), split across
/// the pool by ranges of output channels (whole cache lines): each part sums its channels of every pixel, the ones
/// a convolution split by channel blocks wrote on the same thread. Per channel the pixels are summed in order, then
/// divided by `hw`.
pub fn global_avg_f32(x: &[f32], n: usize, hw: usize, c: usize, out: &mut [f32]) {
    let total = n * c;
    assert!(x.len() >= total * hw && out.len() >= total, "global_avg_f32: buffers too small");
    let parts = super::threads().min((total * hw / 16_384).max(1)).min(total.div_ceil(16)).max(1);
    let per = total.div_ceil(parts).next_multiple_of(16);
    let out_addr = out.as_mut_ptr() as usize;
    super::for_each_part(parts, |part| {
        let (start, end) = ((part * per).min(total), ((part + 1) * per).min(total));
        let mut i = start;
        while i < end {
            // The part's channels of image b: c0..c1.
            let (b, c0) = (i / c, i % c);
            let c1 = (c0 + end - i).min(c);
            // SAFETY: outputs start..end are written by this part only.
            let o = unsafe { std::slice::from_raw_parts_mut((out_addr as *mut f32).add(i), c1 - c0) };
            o.fill(0.0);
            for p in 0..hw {
                let px = &x[(b * hw + p) * c + c0..][..c1 - c0];
                for (a, &v) in o.iter_mut().zip(px) {
                    *a += v;
                }
            }
            for a in o.iter_mut() {
                *a /= hw as f32;
            }
            i += c1 - c0;
        }
    });
}

/// `y[b, p, c] = x[b, p, c] · s[b, c]`: NHWC `x` of `n` images of `hw` pixels and `c` channels scaled per image and
/// channel (a squeeze-and-excitation block's gate), split across the pool by ranges of pixels.
pub fn scale_channels_f32(x: &[f32], s: &[f32], n: usize, hw: usize, c: usize, y: &mut [f32]) {
    let pixels = n * hw;
    assert!(
        x.len() >= pixels * c && y.len() >= pixels * c && s.len() >= n * c,
        "scale_channels_f32: buffers too small"
    );
    for_each_row_f32(y, pixels, c, |p, o| {
        let g = &s[(p / hw) * c..][..c];
        for ((o, &v), &k) in o.iter_mut().zip(&x[p * c..][..c]).zip(g) {
            *o = v * k;
        }
    });
}

/// Nearest-neighbour upsampling of NHWC `x` (`[n, h, w, c]`) by whole factors `[sh, sw]` into `y`
/// (`[n, h·sh, w·sw, c]`): output pixel `(oy, ox)` is input pixel `(oy / sh, ox / sw)` (what ONNX's Resize computes
/// for whole scales in its asymmetric/floor and half-pixel modes). Split across the pool by output rows.
pub fn upsample_nearest_f32(x: &[f32], [n, h, w, c]: [usize; 4], [sh, sw]: [usize; 2], y: &mut [f32]) {
    let (oh, ow) = (h * sh, w * sw);
    assert!(x.len() >= n * h * w * c && y.len() >= n * oh * ow * c, "upsample_nearest_f32: buffers too small");
    if c == 0 {
        return;
    }
    for_each_row_f32(y, n * oh, ow * c, |r, out| {
        let (b, oy) = (r / oh, r % oh);
        let src = &x[(b * h + oy / sh) * w * c..][..w * c];
        for (px, out) in src.chunks_exact(c).zip(out.chunks_exact_mut(sw * c)) {
            for o in out.chunks_exact_mut(c) {
                o.copy_from_slice(px);
            }
        }
    });
}

/// `f(r, row)` for each of the first `rows` rows of `row` floats of `y`, split across the pool by ranges of rows
/// (about 16K floats per part at least).
fn for_each_row_f32(y: &mut [f32], rows: usize, row: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if rows == 0 || row == 0 {
        return;
    }
    assert!(y.len() >= rows * row, "for_each_row_f32: output too small");
    let parts = super::threads().min((rows * row / 16_384).max(1));
    let per = rows.div_ceil(parts);
    let y_addr = y.as_mut_ptr() as usize;
    super::for_each_part(parts, |part| {
        let (r0, r1) = ((part * per).min(rows), ((part + 1) * per).min(rows));
        // SAFETY: rows r0..r1 of the output are written by this part only.
        let o = unsafe { std::slice::from_raw_parts_mut((y_addr as *mut f32).add(r0 * row), (r1 - r0) * row) };
        for (r, out) in (r0..r1).zip(o.chunks_exact_mut(row)) {
            f(r, out);
        }
    });
}

/// Softmax of each row of `n` values of `x` into `y` (the same size): `e = exp(x − max)`, then `e · (1 / Σe)`
/// (onnxruntime's order of operations; the sum kept in f64, as a recognizer's 6625-class rows summed in f32 lose
/// digits). Rows split across the pool for large inputs. Every pass is plain arithmetic the compiler vectorizes
/// ([`exp_nonpositive`], no libm call: glibc's `expf` takes a slow path for each result that underflows, which
/// a long row's far-from-max entries all do). Short rows are the other point: a detector's two-class scores are
/// thousands of 2-value rows, where a kernel call per row costs more than the arithmetic, and YOLOv8's box
/// distributions 33,600 rows of 16: rows of up to 16 values take one vector each on AVX-512 and four on NEON (the
/// reductions in registers, the same arithmetic).
pub fn softmax_rows(x: &[f32], n: usize, y: &mut [f32]) {
    softmax_rows_isa(Isa::detect(), x, n, y)
}

/// [`softmax_rows`] with the instructions of `isa` (at most what the CPU has).
pub fn softmax_rows_isa(isa: Isa, x: &[f32], n: usize, y: &mut [f32]) {
    let isa = isa.supported();
    assert_eq!(x.len(), y.len(), "softmax_rows: x and y differ in size");
    if n == 0 || x.is_empty() {
        return;
    }
    let rows = x.len() / n;
    let parts = super::threads().min((x.len() / 32_768).max(1)).min(rows).max(1);
    let y_addr = y.as_mut_ptr() as usize;
    super::for_each_part(parts, |part| {
        let (r0, r1) = (rows * part / parts, rows * (part + 1) / parts);
        // SAFETY: rows r0..r1 are written by this part only.
        let ys = unsafe { std::slice::from_raw_parts_mut((y_addr as *mut f32).add(r0 * n), (r1 - r0) * n) };
        let xs = &x[r0 * n..r1 * n];
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx512Vnni && n <= 16 {
            // SAFETY: AVX-512 F was detected; 1 ≤ n ≤ 16.
            return unsafe { x86::softmax_short_rows_512(xs, n, ys) };
        }
        #[cfg(target_arch = "x86_64")]
        if isa.is_x86() {
            // SAFETY: AVX2 and FMA are present (both x86 levels of `Isa` imply them).
            return unsafe { softmax_rows_avx2(xs, n, ys) };
        }
        #[cfg(target_arch = "aarch64")]
        if isa.is_arm() && n <= 16 {
            // SAFETY: NEON is part of every aarch64 level; 1 ≤ n ≤ 16.
            return unsafe { aarch64::softmax_short_rows(xs, n, ys) };
        }
        softmax_rows_in(xs, n, ys);
    });
}

/// [`softmax_rows_in`] compiled for AVX2 (8-wide vectors instead of the baseline's 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(x: &[f32], n: usize, y: &mut [f32]) {
    softmax_rows_in(x, n, y)
}

#[inline(always)]
fn softmax_rows_in(x: &[f32], n: usize, y: &mut [f32]) {
    for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        let max = max_f32(xr);
        for (o, &v) in yr.iter_mut().zip(xr) {
            *o = exp_nonpositive(v - max);
        }
        let r = (1.0 / sum_f64(yr)) as f32;
        for o in yr.iter_mut() {
            *o *= r;
        }
    }
}

/// The largest value (NaNs skipped; −∞ for none), in 16 running maxima the compiler keeps in vector registers.
#[inline(always)]
fn max_f32(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    let (chunks, tail) = x.as_chunks::<16>();
    for c in chunks {
        for (a, &v) in m.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    tail.iter().chain(&m).fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a })
}

/// The sum in f64, over 8 running sums (independent additions the compiler vectorizes).
#[inline(always)]
fn sum_f64(x: &[f32]) -> f64 {
    let mut s = [0f64; 8];
    let (chunks, tail) = x.as_chunks::<8>();
    for c in chunks {
        for (a, &v) in s.iter_mut().zip(c) {
            *a += v as f64;
        }
    }
    tail.iter().map(|&v| v as f64).sum::<f64>() + s.iter().sum::<f64>()
}

/// `exp(x)` for `x ≤ 0` in f32 arithmetic alone: `x = k·ln2 + r` (`|r| ≤ ln2/2`, ln2 in two parts, Cody and
/// Waite's), `e^r` by its Taylor polynomial to degree 7 (truncation below 1e-8, under half an ulp), `2^k` built in
/// the exponent bits. Within 2 ulp of the exact value (1.1 measured); below `−87.33` (where `e^x` leaves the normal range) it returns `e^−87.33`
/// ≈ 1.2e-38, which no softmax sum can tell from 0. NaN stays NaN.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer
    let x = if x < EXP_LO { EXP_LO } else { x };
    // t's low mantissa bits hold k in two's complement (no float → int conversion, which vectorizes poorly).
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let k = t - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let p = EXP_POLY[1..].iter().fold(EXP_POLY[0], |p, &c| c + r * p);
    p * f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23)
}

/// The floor of [`exp_nonpositive`]'s argument, `ln(2^−126)` (the vector versions share these constants).
pub(crate) const EXP_LO: f32 = -87.336_54;
/// ln 2 in two parts: 355/512 (exactly 0.693359375, so `k·LN2_HI` is exact for |k| ≤ 126) and the rest.
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// `e^r`'s Taylor coefficients, highest degree first (Horner's order).
pub(crate) const EXP_POLY: [f32; 8] = [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

/// Concatenation along the channel axis (last in NHWC), each input through its requantization table.
pub fn concat_channels(isa: Isa, inputs: &[(&[u8], usize, &[u8; 256])], pixels: usize, out: &mut [u8]) {
    let c_out: usize = inputs.iter().map(|i| i.1).sum();
    // Inputs already at the output's parameters (identity table) are plain copies.
    let identity: Vec<bool> = inputs.iter().map(|i| i.2.iter().enumerate().all(|(k, &v)| v as usize == k)).collect();
    let parts = (super::threads() * 2).min((pixels * c_out / 65_536).max(1));
    let per = pixels.div_ceil(parts);
    let out_addr = out.as_mut_ptr() as usize;
    super::for_each_part(parts, |part| {
        let mut off = 0;
        for (&(x, c, table), &copy) in inputs.iter().zip(&identity) {
            for p in part * per..((part + 1) * per).min(pixels) {
                let src = &x[p * c..(p + 1) * c];
                // SAFETY: pixel `p` of the output is written by this part only.
                let dst = unsafe { std::slice::from_raw_parts_mut((out_addr as *mut u8).add(p * c_out + off), c) };
                if copy {
                    dst.copy_from_slice(src);
                } else {
                    lut(isa, src, table, dst);
                }
            }
            off += c;
        }
    });
}

/// `y = xᵀ` for each of `n` row-major `[rows, cols]` matrices (NCHW ↔ NHWC is this with `[c, h·w]` or
/// `[h·w, c]`), in tiles of 16 rows × 256 columns (reads and writes stay in cache), split across the pool for
/// large tensors.
pub fn transpose<T: Copy + Send + Sync>(x: &[T], n: usize, rows: usize, cols: usize, y: &mut [T]) {
    const BR: usize = 16;
    const BC: usize = 256;
    assert!(x.len() >= n * rows * cols && y.len() >= n * rows * cols, "transpose: buffers too small");
    if (1..=4).contains(&rows) && n * cols >= 4096 {
        // An image's few channels into pixels (NCHW → NHWC of a network's input): one streaming pass.
        return interleave_planes(x, n, rows, cols, y);
    }
    let (rb, cb) = (rows.div_ceil(BR), cols.div_ceil(BC));
    let items = n * rb * cb;
    let parts = (super::threads() * 2).min(items).min((n * rows * cols / 32_768).max(1));
    let per = items.div_ceil(parts.max(1));
    let (x_addr, y_addr) = (x.as_ptr() as usize, y.as_mut_ptr() as usize);
    super::for_each_part(parts, |part| {
        for item in part * per..((part + 1) * per).min(items) {
            let (b, t) = (item / (rb * cb), item % (rb * cb));
            let (i0, j0) = ((t / cb) * BR, (t % cb) * BC);
            let (i1, j1) = ((i0 + BR).min(rows), (j0 + BC).min(cols));
            let xm = (x_addr as *const T).wrapping_add(b * rows * cols);
            let ym = (y_addr as *mut T).wrapping_add(b * rows * cols);
            for j in j0..j1 {
                for i in i0..i1 {
                    // SAFETY: i < rows, j < cols (checked above against the buffer sizes); each (i, j) tile is
                    // written by one part only.
                    unsafe { *ym.add(j * rows + i) = *xm.add(i * cols + j) };
                }
            }
        }
    });
}
