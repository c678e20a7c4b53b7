//! INT8 kernels on NHWC uint8 activations.
//!
//! - [`reference`]: the scalar reference that defines the arithmetic (onnxruntime's); the QDQ lowering
//!   (`onnx::qdq_lower`) and every fast kernel are tested against it, element for element.
//! - [`qconv`]: convolutions (pointwise as a plain GEMM, general through a tiled im2col, direct depthwise) with
//!   the requantization fused into the output stage.
//! - [`qelem`]: residual Add (QLinearAdd's arithmetic), MaxPool and channel Concat with requantization tables,
//!   QuantizeLinear into NHWC.
//!
//! The instruction set is chosen at run time ([`Isa::detect`]), per architecture: on x86-64 AVX-512 VNNI or AVX2
//! (exact 16-bit products), on aarch64 NEON with `usmmla` (i8mm), `sdot` (dotprod) or widening multiplies (plain
//! ARMv8), else portable Rust. `EDGEPACK_ISA=portable|avx2|avx512vnni|neon|dotprod|i8mm` forces a lower one
//! (testing, comparisons). The SIMD code lives in one child module per architecture of each kernel family
//! (`x86`, `aarch64`), as tract-linalg's; the portable loops in the family's module are the frame they plug into.
pub mod fconv;
pub mod pool;
pub mod qconv;
pub mod qelem;
pub mod reference;

#[cfg(test)]
mod tests;

/// `unroll!(N, i => body)`: `body` once per `i` in `0..N` (N ≤ 16, a constant or const generic), each copy with
/// `i` a literal. Register tiles indexed by loop counters stay in memory when LLVM's SROA runs before the loops
/// are unrolled (every multiply-add then also stores its accumulator); literal indices keep them in registers.
#[allow(unused_macros)]
macro_rules! unroll {
    ($n:expr, $i:ident => $body:block) => {{
        unroll!(@ $n, $i, $body, 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23);
    }};
    (@ $n:expr, $i:ident, $body:block, $($k:literal)*) => {
        $(
            if $k < $n {
                let $i: usize = $k;
                $body
            }
        )*
    };
}
#[allow(unused_imports)]
pub(crate) use unroll;

/// The geometry of a 2-D convolution as the lowering writes it (NHWC activations, OIHW weights): one type for the
/// integer ([`qconv::QConvSpec`]) and float ([`fconv::FConvSpec`]) kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub c_in: usize,
    pub c_out: usize,
    pub group: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    /// top, left, bottom, right
    pub pads: [usize; 4],
}

impl ConvGeometry {
    /// Checks that the kernels run this convolution: nothing degenerate, and group 1 or depthwise with one
    /// filter per channel (other groupings stay on the float path). Returns whether it is depthwise.
    pub fn check(&self) -> Result<bool, String> {
        let ConvGeometry { c_in, c_out, group, kernel, stride, dilation, .. } = *self;
        if c_in == 0 || c_out == 0 || kernel.contains(&0) || stride.contains(&0) || dilation.contains(&0) {
            return Err(format!("degenerate convolution {c_in}→{c_out}, k{kernel:?}, s{stride:?}, d{dilation:?}"));
        }
        let depthwise = group > 1 && group == c_in && c_out == c_in;
        if group != 1 && !depthwise {
            return Err(format!("grouped convolution (group {group}, {c_in}→{c_out}) is not supported"));
        }
        Ok(depthwise)
    }

    /// The sliding window over the input this geometry reads.
    pub(crate) fn window(&self) -> qconv::Window {
        qconv::Window {
            c: self.c_in,
            kernel: self.kernel,
            stride: self.stride,
            dilation: self.dilation,
            pads: self.pads,
        }
    }
}

/// Instruction set a kernel runs on. Each architecture has its own ladder ([`Isa::ladder`]), lowest first; a
/// kernel given an instruction set of another architecture (or one the CPU lacks) runs the best one below it
/// that this CPU has ([`Isa::supported`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    Portable,
    /// x86-64: AVX2 + FMA.
    Avx2,
    /// x86-64: AVX-512 F/BW/VL + VNNI.
    Avx512Vnni,
    /// aarch64: Advanced SIMD (every ARMv8-A core, Cortex-A53 class).
    Neon,
    /// aarch64: NEON + the dot product instructions (`sdot`, ARMv8.2 dotprod: Cortex-A55/A76 and later).
    NeonDot,
    /// aarch64: NEON + dotprod + the int8 matrix multiply (`usmmla`, ARMv8.6 i8mm: Cortex-A510/A710/X2 and later).
    NeonI8mm,
}

impl Isa {
    /// The best instruction set this CPU supports, capped by `EDGEPACK_ISA` when set.
    pub fn detect() -> Isa {
        match std::env::var("EDGEPACK_ISA").ok().as_deref().and_then(Isa::parse) {
            Some(cap) => cap.supported(),
            None => Self::best(),
        }
    }

    /// This architecture's instruction sets, lowest first.
    pub fn ladder() -> &'static [Isa] {
        if cfg!(target_arch = "x86_64") {
            &[Isa::Portable, Isa::Avx2, Isa::Avx512Vnni]
        } else if cfg!(target_arch = "aarch64") {
            &[Isa::Portable, Isa::Neon, Isa::NeonDot, Isa::NeonI8mm]
        } else {
            &[Isa::Portable]
        }
    }

    /// Every instruction set this CPU can run (for tests and benchmarks).
    pub fn available() -> Vec<Isa> {
        let best = Self::best();
        Self::ladder().iter().copied().filter(|i| *i <= best).collect()
    }

    /// The best instruction set this CPU runs that is not above `self` on this architecture's ladder
    /// (`Portable` for another architecture's).
    pub fn supported(self) -> Isa {
        let best = Self::best();
        Self::ladder().iter().copied().filter(|i| *i <= best).rfind(|i| *i <= self).unwrap_or(Isa::Portable)
    }

    pub fn parse(s: &str) -> Option<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni, Isa::Neon, Isa::NeonDot, Isa::NeonI8mm]
            .into_iter()
            .find(|i| i.name() == s)
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Neon => "neon",
            Isa::NeonDot => "dotprod",
            Isa::NeonI8mm => "i8mm",
        }
    }

    /// Whether this is one of the x86-64 SIMD levels.
    #[allow(dead_code)]
    pub(crate) fn is_x86(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::Avx512Vnni)
    }

    /// Whether this is one of the aarch64 SIMD levels.
    #[allow(dead_code)]
    pub(crate) fn is_arm(self) -> bool {
        matches!(self, Isa::Neon | Isa::NeonDot | Isa::NeonI8mm)
    }

    #[cfg(target_arch = "x86_64")]
    fn best() -> Isa {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
        {
            Isa::Avx512Vnni
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Isa::Avx2
        } else {
            Isa::Portable
        }
    }

    #[cfg(target_arch = "aarch64")]
    fn best() -> Isa {
        use std::arch::is_aarch64_feature_detected as has;
        if !has!("neon") {
            Isa::Portable
        } else if has!("dotprod") && has!("i8mm") {
            Isa::NeonI8mm
        } else if has!("dotprod") {
            Isa::NeonDot
        } else {
            Isa::Neon
        }
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fn best() -> Isa {
        Isa::Portable
    }
}

/// Runs `f(i)` for `i in 0..parts` on the kernels' pool ([`pool`]) when the plan runs multithreaded, inline
/// otherwise. `parts` is the number of independent chunks the caller split its work into; parts are claimed
/// dynamically, so splitting into a few more parts than threads balances uneven or descheduled threads.
pub fn for_each_part(parts: usize, f: impl Fn(usize) + Sync) {
    let threads = threads();
    if parts <= 1 || threads <= 1 {
        (0..parts).for_each(f);
        return;
    }
    pool::run(parts, threads, &f);
}

thread_local! {
    /// Threads granted by [`with_threads`] on this thread (0: none).
    static THREADS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Runs `f` with `threads` threads available to the kernels it calls on this thread (the kernel interpreter's
/// runs; tract's plans grant theirs through tract's executor).
pub fn with_threads<R>(threads: usize, f: impl FnOnce() -> R) -> R {
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREADS.set(self.0);
        }
    }
    let _restore = Restore(THREADS.replace(threads.max(1)));
    f()
}

/// Threads available to a kernel right now (1 outside a multithreaded run).
pub fn threads() -> usize {
    let granted = THREADS.get();
    if granted > 0 {
        return granted;
    }
    AMBIENT_THREADS.get().map_or(1, |f| f())
}

/// Where [`threads`] asks when no run granted threads: an executor that runs kernels inside its own thread pool
/// (tract's) registers its pool's size here once. This crate knows nothing of that executor.
static AMBIENT_THREADS: std::sync::OnceLock<fn() -> usize> = std::sync::OnceLock::new();

/// Registers the executor's thread count for kernels run outside [`with_threads`] (first registration wins).
pub fn set_ambient_threads(f: fn() -> usize) {
    let _ = AMBIENT_THREADS.set(f);
}

/// Requantizes one accumulator exactly as [`reference::requantize`] (i32 input).
#[inline(always)]
pub(crate) fn requant(acc: i32, m: f32, z: i32) -> u8 {
    let v = ((acc as f32) * m).clamp(-1024.0, 1024.0).round_ties_even() as i32 + z;
    v.clamp(0, 255) as u8
}
