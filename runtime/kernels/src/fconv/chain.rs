//! [`FChain`]: a 1×1 expansion, a depthwise convolution and a 1×1 projection (an inverted-residual block:
//! MobileNetV2's, EfficientNet's; or a depthwise-separable pair: MobileNetV1's, UltraFace's) run row by row, so
//! that the wide tensors between them never leave the cache.
//!
//! Run one convolution after the other, the expansion writes its whole output (EfficientNet-Lite0's second block:
//! 112×112×96 floats, 4.6 MiB) and the depthwise convolution reads it back from memory rather than from a 1 MiB
//! L2. Here each part of the output rows keeps a ring of the expanded rows its depthwise windows read (computed
//! when a window first needs them, several rows per GEMM call, written into their ring slots), and hands each
//! group of depthwise output rows, still in L1/L2, to the projection (with the block's residual added in its
//! output stage). The arithmetic is the convolutions' own, in the same order: the results are theirs.
//!
//! Parts split the output rows; rows that two parts' windows share are expanded by both. Where that repeated work
//! would exceed a tenth of the expansion (small images on many threads), the expansion runs first over the whole
//! input, split as usual, and only the depthwise convolution and the projection run fused. Below [`FUSE_BYTES`]
//! of wide tensor the convolutions run one after the other.
//!
//! `cargo run --release --example fconv_chains` times both ways on EfficientNet-Lite0's and UltraFace's blocks.
use super::{FConv, Out, Plan};

/// Convolutions run as one: an optional 1×1 expansion (`pre`), a depthwise convolution, an optional 1×1
/// projection (`post`), each reading the one before.
#[derive(Debug)]
pub struct FChain {
    pre: Option<FConv>,
    dw: FConv,
    post: Option<FConv>,
    /// See [`FChain::fuses`].
    fuse_bytes: usize,
}

thread_local! {
    /// A part's ring of expanded rows and its depthwise output row, kept between runs.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The tensors between the convolutions of a chain run one after the other, kept between runs.
    static STAGED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A 1×1, stride-1, unpadded convolution (its GEMM reads activation rows in place).
fn pointwise(c: &FConv) -> bool {
    matches!(c.plan, Plan::Gemm { direct: true, .. })
}

impl FChain {
    /// The chain of `convs`: `[pre,] depthwise [, post]`, at least two, each taking the channels the one before
    /// gives.
    pub fn new(convs: Vec<FConv>) -> Result<FChain, String> {
        let Some(at) = convs.iter().position(|c| matches!(c.plan, Plan::Depthwise { .. })) else {
            return Err("a convolution chain needs a depthwise convolution".into());
        };
        if convs.len() < 2 || at > 1 || convs.len() - at > 2 {
            return Err("a convolution chain is [1×1,] depthwise [, 1×1], two or three convolutions".into());
        }
        for (a, b) in convs.iter().zip(&convs[1..]) {
            if a.spec.geom.c_out != b.spec.geom.c_in {
                return Err(format!(
                    "a chain's convolution gives {} channels to one taking {}",
                    a.spec.geom.c_out, b.spec.geom.c_in
                ));
            }
        }
        let mut it = convs.into_iter();
        let pre = if at == 1 { it.next() } else { None };
        let dw = it.next().ok_or("no depthwise convolution")?;
        let post = it.next();
        if pre.iter().chain(&post).any(|c| !pointwise(c)) {
            return Err("a chain's convolutions around the depthwise one must be 1×1, stride 1, unpadded".into());
        }
        Ok(FChain { pre, dw, post, fuse_bytes: FUSE_BYTES })
    }

    /// The chain fusing from a wide tensor of `bytes` on (default [`FUSE_BYTES`]; 0: always), for measurements.
    pub fn fuse_from(mut self, bytes: usize) -> FChain {
        self.fuse_bytes = bytes;
        self
    }

    /// The convolutions, in order.
    pub fn convs(&self) -> impl Iterator<Item = &FConv> {
        self.pre.iter().chain([&self.dw]).chain(&self.post)
    }

    pub fn c_in(&self) -> usize {
        self.pre.as_ref().unwrap_or(&self.dw).spec.geom.c_in
    }

    pub fn c_out(&self) -> usize {
        self.post.as_ref().unwrap_or(&self.dw).spec.geom.c_out
    }

    /// Whether the chain ends in a 1×1 projection (the only convolution that can add a residual).
    pub fn has_post(&self) -> bool {
        self.post.is_some()
    }

    pub fn output_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        self.dw.output_hw(h, w)
    }

    /// Whether [`FChain::run`] walks the rows of an `[n, h, w, c_in]` input fused (else the convolutions run one
    /// after the other): when the tensor the fusion keeps in cache, the expansion's output (else the depthwise
    /// convolution's), is at least [`FUSE_BYTES`] (or the size [`FChain::fuse_from`] set).
    pub fn fuses(&self, [n, h, w]: [usize; 3]) -> bool {
        let cm = self.dw.spec.geom.c_in;
        let wide = match (&self.pre, self.output_hw(h, w)) {
            (_, None) => 0,
            (Some(_), _) => n * h * w * cm,
            (None, Some((oh, ow))) => n * oh * ow * cm,
        };
        wide.saturating_mul(4) >= self.fuse_bytes
    }

    /// `x: [n, h, w, c_in]` → `y: [n, oh, ow, c_out]` NHWC, as the convolutions one after the other would give;
    /// `residual` (of the output's shape; a projection only) is added in the projection's output stage, as
    /// [`FConv::run_add`] does.
    pub fn run(&self, x: &[f32], [n, h, w]: [usize; 3], residual: Option<&[f32]>, y: &mut [f32]) -> Result<(), String> {
        let (c_in, cm, c_out) = (self.c_in(), self.dw.spec.geom.c_in, self.c_out());
        let (oh, ow) = self.output_hw(h, w).ok_or_else(|| format!("input {h}x{w} is smaller than the kernel"))?;
        if x.len() != n * h * w * c_in || y.len() != n * oh * ow * c_out {
            return Err(format!("buffer sizes do not match [{n}, {h}, {w}, {c_in}]"));
        }
        if let Some(r) = residual {
            if self.post.is_none() {
                return Err("a residual is added by a chain ending in a 1×1 convolution only".into());
            }
            if r.len() != y.len() {
                return Err(format!("residual of {} values for an output of {}", r.len(), y.len()));
            }
        }
        let rows = n * oh;
        if rows == 0 || ow == 0 {
            return Ok(());
        }
        if !self.fuses([n, h, w]) {
            return self.run_staged(x, [n, h, w], residual, y);
        }
        let g = &self.dw.spec.geom;
        let (span, stride) = ((g.kernel[0] - 1) * g.dilation[0] + 1, g.stride[0]);
        let threads = crate::threads();
        let parts = threads.min(rows);
        // Rows two neighbouring parts both expand: those one window holds beyond the stride.
        let shared = span.saturating_sub(stride);
        let staged = match &self.pre {
            Some(pre) if parts > 1 && (parts - 1) * shared * 10 > n * h => {
                let mut mid = take_staged(n * h * w * cm);
                if let Err(e) = pre.run(x, n, h, w, &mut mid[..n * h * w * cm]) {
                    keep_staged(mid);
                    return Err(e);
                }
                Some(mid)
            }
            _ => None,
        };
        let (x, pre) = match &staged {
            Some(mid) => (&mid[..n * h * w * cm], None),
            None => (x, self.pre.as_ref()),
        };
        // Without an expansion to repeat, more parts than threads balance uneven threads.
        let parts = if pre.is_some() { parts } else { (threads * 4).min(rows) };
        // Output rows per group: the projection's GEMM and the expansion's take several rows per call.
        let group = (GROUP_FLOATS / (ow * cm)).clamp(1, 8);
        // The ring holds every expanded row one group's windows read.
        let slots = (group - 1) * stride + span;
        // Channels of `x` as read here: the staged expansion's output has the depthwise convolution's.
        let xc = if pre.is_some() { c_in } else { cm };
        let row_in = w * cm;
        let (y_addr, err) = (y.as_mut_ptr() as usize, std::sync::Mutex::new(None));
        crate::for_each_part(parts, |part| {
            SCRATCH.with(|cell| {
                // A re-entrant call (a chain inside a kernel inside a chain) takes a buffer of its own.
                let (mut held, mut own) = (cell.try_borrow_mut(), Vec::new());
                let buf = held.as_deref_mut().unwrap_or(&mut own);
                let ring_len = if pre.is_some() { slots * row_in } else { 0 };
                let mid_len = if self.post.is_some() { group * ow * cm } else { 0 };
                if buf.len() < ring_len + mid_len {
                    buf.resize(ring_len + mid_len, 0.0);
                }
                let (ring, mid) = buf[..ring_len + mid_len].split_at_mut(ring_len);
                let res = crate::with_threads(1, || {
                    self.rows_fused(
                        x,
                        [h, w, xc],
                        (oh, ow),
                        rows * part / parts..rows * (part + 1) / parts,
                        pre,
                        (ring, slots, group),
                        mid,
                        residual,
                        y_addr,
                    )
                });
                if let Err(e) = res {
                    *err.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
            })
        });
        if let Some(mid) = staged {
            keep_staged(mid);
        }
        match err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Output rows `part` (of `n·oh`) of [`FChain::run`], in groups of `group` rows of one image: the expanded
    /// rows the group's windows read that the ring lacks (one GEMM call, written into their ring slots), the
    /// depthwise rows (into `mid` when a projection follows), the projection of the group's pixels.
    #[allow(clippy::too_many_arguments)]
    fn rows_fused(
        &self,
        x: &[f32],
        [h, w, xc]: [usize; 3],
        (oh, ow): (usize, usize),
        part: std::ops::Range<usize>,
        pre: Option<&FConv>,
        (ring, slots, group): (&mut [f32], usize, usize),
        mid: &mut [f32],
        residual: Option<&[f32]>,
        y_addr: usize,
    ) -> Result<(), String> {
        let g = &self.dw.spec.geom;
        let (cm, c_out) = (g.c_in, self.c_out());
        let [pt, pl, _, _] = g.pads;
        let span = (g.kernel[0] - 1) * g.dilation[0] + 1;
        let mut row_ptrs = vec![std::ptr::null::<f32>(); g.kernel[0]];
        // Expanded rows `lo..hi` of image `b` are in the ring (the last `slots` of them), row `iy` in slot
        // `iy % slots`.
        let mut have: Option<(usize, usize)> = None;
        let ring_addr = ring.as_mut_ptr() as usize;
        let mut r = part.start;
        while r < part.end {
            let (b, oy0) = (r / oh, r % oh);
            let count = group.min(part.end - r).min(oh - oy0);
            if let Some(pre) = pre {
                let Plan::Gemm { k, blocks, .. } = &pre.plan else { unreachable!("checked in new") };
                let lo = (oy0 * g.stride[0]).saturating_sub(pt).min(h);
                let hi = ((oy0 + count - 1) * g.stride[0] + span).saturating_sub(pt).min(h);
                let from = match have {
                    Some((hb, hh)) if hb == b && hh > lo => hh,
                    _ => lo,
                };
                if from < hi {
                    let src = &x[(b * h + from) * w * xc..(b * h + hi) * w * xc];
                    let out = Out {
                        y: ring_addr,
                        ld: cm,
                        offset: 0,
                        residual: 0,
                        row: w,
                        pitch: w * cm,
                        slots,
                        first: from % slots,
                    };
                    pre.run_gemm(src, [1, hi - from, w], (hi - from, w), (*k, true, blocks), out);
                }
                have = Some((b, hi.max(from)));
            }
            for i in 0..count {
                let oy = oy0 + i;
                for (ky, rp) in row_ptrs.iter_mut().enumerate() {
                    let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - pt as isize;
                    *rp = if iy < 0 || iy >= h as isize {
                        std::ptr::null()
                    } else {
                        let iy = iy as usize;
                        let row = match pre {
                            None => x[(b * h + iy) * w * xc..].as_ptr(),
                            Some(_) => (ring_addr as *const f32).wrapping_add((iy % slots) * w * cm),
                        };
                        // Never dereferenced outside the row: the kernel skips padded columns.
                        row.wrapping_sub(pl * cm)
                    };
                }
                let dst = match self.post {
                    Some(_) => &mut mid[i * ow * cm..(i + 1) * ow * cm],
                    // SAFETY: output row `r + i` (ow·c_out floats) is written by this part only.
                    None => unsafe {
                        std::slice::from_raw_parts_mut((y_addr as *mut f32).add((r + i) * ow * c_out), ow * c_out)
                    },
                };
                self.dw.depthwise_out_row(&row_ptrs, w, dst);
            }
            if let Some(post) = &self.post {
                let px = count * ow;
                // SAFETY: output rows `r..r + count` are written by this part only.
                let yrows =
                    unsafe { std::slice::from_raw_parts_mut((y_addr as *mut f32).add(r * ow * c_out), px * c_out) };
                let src = &mid[..px * cm];
                match residual {
                    None => post.run(src, 1, 1, px, yrows)?,
                    Some(res) => post.run_add(src, [1, 1, px], &res[r * ow * c_out..][..px * c_out], yrows)?,
                }
            }
            r += count;
        }
        Ok(())
    }

    /// The convolutions one after the other, each over its whole input (tensors that stay in cache anyway), the
    /// ones between them in a buffer kept between runs.
    fn run_staged(
        &self,
        x: &[f32],
        [n, h, w]: [usize; 3],
        residual: Option<&[f32]>,
        y: &mut [f32],
    ) -> Result<(), String> {
        let convs: Vec<&FConv> = self.convs().collect();
        let mut sizes = Vec::new();
        let mut hw = (h, w);
        for conv in &convs[..convs.len() - 1] {
            hw = conv.output_hw(hw.0, hw.1).ok_or("a chain's input is smaller than a kernel")?;
            sizes.push((hw, n * hw.0 * hw.1 * conv.spec.geom.c_out));
        }
        let total: usize = sizes.iter().map(|s| s.1).sum();
        let mut buf = take_staged(total);
        let (mut cur, mut rest, mut hw) = (x, &mut buf[..], (h, w));
        let mut result = Ok(());
        for (i, conv) in convs.iter().enumerate() {
            if i + 1 == convs.len() {
                result = match residual {
                    Some(r) => conv.run_add(cur, [n, hw.0, hw.1], r, y),
                    None => conv.run(cur, n, hw.0, hw.1, y),
                };
                break;
            }
            let (out, more) = std::mem::take(&mut rest).split_at_mut(sizes[i].1);
            if let Err(e) = conv.run(cur, n, hw.0, hw.1, out) {
                result = Err(e);
                break;
            }
            (cur, rest, hw) = (out, more, sizes[i].0);
        }
        keep_staged(buf);
        result
    }
}

/// The calling thread's kept buffer for tensors between convolutions, at least `len` floats (those beyond
/// what it held before zeroed once); give it back with [`keep_staged`].
fn take_staged(len: usize) -> Vec<f32> {
    // Taken out of the cell (a re-entrant call finds it empty and grows a buffer of its own).
    let mut v = STAGED.with(|c| c.try_borrow_mut().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default());
    if v.len() < len {
        v.resize(len, 0.0);
    }
    v
}

/// Keeps `v` for the calling thread's next chain run (the larger of it and what is kept).
fn keep_staged(v: Vec<f32>) {
    STAGED.with(|c| {
        if let Ok(mut kept) = c.try_borrow_mut()
            && kept.len() < v.len()
        {
            *kept = v;
        }
    });
}

/// Below this size (in bytes) of the wide tensor, a chain runs its convolutions one after the other: a tensor
/// that fits the L2 cache comes back from it anyway, and the fused walk has costs of its own (GEMM calls over a few
/// rows, each reloading the weights). `fconv_chains` on an AMD EPYC (Zen 4, 1 MiB L2), chain / one after the other
/// at one thread: with the caches as the other blocks left them 0.60–0.71 from 28×28×240 (750 KiB) up,
/// 0.80–0.81 at 14×14×480 (376 KiB), 1.00 at 7×7×1152 (225 KiB); with warm caches 0.93–0.99 from 750 KiB up,
/// 1.02–1.06 below.
pub const FUSE_BYTES: usize = 256 << 10;

/// Depthwise output floats per group of rows (128 KiB, at most 8 rows): the group stays in L2 for the
/// projection, whose GEMM call over the group's pixels loads its weights once per group.
const GROUP_FLOATS: usize = 32 * 1024;
