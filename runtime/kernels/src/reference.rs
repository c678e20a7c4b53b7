//! Scalar reference INT8 kernels: the exact arithmetic of edgepack's QDQ lowering (and of onnxruntime's fused
//! kernels), written as plainly as possible. Every fast kernel is tested against these, element for element.
//!
//! Conventions: activations uint8 NCHW with a per-tensor zero point; weights int8 (symmetric, zero point 0) OIHW;
//! bias int32; accumulation in i64 (exact); requantization `round_half_even(f32(acc) · m[c]) + z_y` saturated to
//! uint8, with `m[c] = (s_x · s_w[c]) / s_y` computed in f32 by the caller (see [`multiplier`]).

/// The per-output-channel requantization multiplier, in f32 as onnxruntime computes it.
pub fn multiplier(s_x: f32, s_w: &[f32], s_y: f32) -> Vec<f32> {
    s_w.iter().map(|&w| (s_x * w) / s_y).collect()
}

/// `round_half_even(f32(acc) · m) + z`, saturated to u8. The product is rounded once, as an f32 multiply does.
pub fn requantize(acc: i64, m: f32, z: u8) -> u8 {
    // f32(acc) first (rounds beyond 2^24, as a float conversion does), then one rounding of the exact product.
    let v = (((acc as f32) as f64 * m as f64) as f32).round_ties_even();
    (v + z as f32).clamp(0.0, 255.0) as u8
}

/// 2-D convolution geometry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Conv2d {
    pub group: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    /// top, left, bottom, right
    pub pads: [usize; 4],
}

impl Conv2d {
    pub fn output_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let eff = |k: usize, d: usize| (k - 1) * d + 1;
        let (ph, pw) = (h + self.pads[0] + self.pads[2], w + self.pads[1] + self.pads[3]);
        let (kh, kw) = (eff(self.kernel[0], self.dilation[0]), eff(self.kernel[1], self.dilation[1]));
        (ph >= kh && pw >= kw && self.stride[0] > 0 && self.stride[1] > 0)
            .then(|| ((ph - kh) / self.stride[0] + 1, (pw - kw) / self.stride[1] + 1))
    }
}

/// Quantized convolution, `x: [n, c_in, h, w]` u8, `w: [c_out, c_in / group, kh, kw]` i8, `bias: [c_out]` i32,
/// `m: [c_out]`. Padding reads the zero point (a real 0). Returns `[n, c_out, oh, ow]` u8.
#[allow(clippy::too_many_arguments)]
pub fn qconv2d(
    x: &[u8],
    x_shape: [usize; 4],
    z_x: u8,
    w: &[i8],
    c_out: usize,
    bias: Option<&[i32]>,
    m: &[f32],
    z_y: u8,
    g: Conv2d,
) -> Vec<u8> {
    let [n, c_in, h, wd] = x_shape;
    let (oh, ow) = g.output_hw(h, wd).expect("valid geometry");
    let (cin_g, cout_g) = (c_in / g.group, c_out / g.group);
    let [kh, kw] = g.kernel;
    let mut y = vec![0u8; n * c_out * oh * ow];
    for b in 0..n {
        for o in 0..c_out {
            let grp = o / cout_g;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc: i64 = bias.map_or(0, |bv| bv[o] as i64);
                    for ci in 0..cin_g {
                        let c = grp * cin_g + ci;
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pads[0] as isize;
                                let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.pads[1] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue; // padding: x = z_x contributes 0
                                }
                                let xv = x[((b * c_in + c) * h + iy as usize) * wd + ix as usize] as i64 - z_x as i64;
                                let wv = w[((o * cin_g + ci) * kh + ky) * kw + kx] as i64;
                                acc += xv * wv;
                            }
                        }
                    }
                    y[((b * c_out + o) * oh + oy) * ow + ox] = requantize(acc, m[o], z_y);
                }
            }
        }
    }
    y
}

/// Quantized `x [n, k] · wᵀ` with `w: [c_out, k]` (Gemm with transB = 1): the 1×1 convolution of `[n, k, 1, 1]`.
#[allow(clippy::too_many_arguments)]
pub fn qgemm(
    x: &[u8],
    n: usize,
    k: usize,
    z_x: u8,
    w: &[i8],
    c_out: usize,
    bias: Option<&[i32]>,
    m: &[f32],
    z_y: u8,
) -> Vec<u8> {
    let g = Conv2d { group: 1, kernel: [1, 1], stride: [1, 1], dilation: [1, 1], pads: [0; 4] };
    qconv2d(x, [n, k, 1, 1], z_x, w, c_out, bias, m, z_y, g)
}

/// Per-tensor quantization parameters of a uint8 tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QParams {
    pub scale: f32,
    pub zero: u8,
}

/// onnxruntime's QLinearAdd on x86 (MLAS AVX2): `k = z_c − (r_a·z_a + r_b·z_b)`, then
/// `round_half_even(fma(a, r_a, fma(b, r_b, k)))` saturated, with `r = s/s_c` in f32.
pub fn qadd(a: &[u8], qa: QParams, b: &[u8], qb: QParams, qc: QParams) -> Vec<u8> {
    let (r_a, r_b) = (qa.scale / qc.scale, qb.scale / qc.scale);
    let k = qc.zero as f32 - (r_a * qa.zero as f32 + r_b * qb.zero as f32);
    a.iter()
        .zip(b)
        .map(|(&av, &bv)| {
            let t = (bv as f32).mul_add(r_b, k);
            (av as f32).mul_add(r_a, t).round_ties_even().clamp(0.0, 255.0) as u8
        })
        .collect()
}

/// xorshift64*: the deterministic generator of the property tests (the kernels' and the lowering's), no dependency.
#[doc(hidden)]
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// ONNX Resize along one axis: the input coordinate of output coordinate `xo` under `coord` (the
/// `coordinate_transformation_mode`; anything unknown is `asymmetric`), computed in f64 as ONNX's reference does,
/// with the unrounded output length (input × scale). `None` outside `tf_crop_and_resize`'s crop (`roi`: its start
/// and end along this axis).
pub fn resize_coord(coord: &str, xo: usize, len_in: usize, len_out: usize, scale: f64, roi: (f64, f64)) -> Option<f64> {
    let (i_in, o, xr) = (len_in as f64, len_in as f64 * scale, xo as f64);
    Some(match coord {
        "half_pixel" => (xr + 0.5) / scale - 0.5,
        "half_pixel_symmetric" => {
            let adj = len_out as f64 / o;
            let center = i_in / 2.0;
            center * (1.0 - adj) + (xr + 0.5) / scale - 0.5
        }
        "pytorch_half_pixel" => {
            if len_out > 1 {
                (xr + 0.5) / scale - 0.5
            } else {
                0.0
            }
        }
        "align_corners" => {
            if len_out == 1 {
                0.0
            } else {
                xr * (i_in - 1.0) / (o - 1.0)
            }
        }
        "tf_half_pixel_for_nn" => (xr + 0.5) / scale,
        "tf_crop_and_resize" => {
            let x = if len_out > 1 {
                roi.0 * (i_in - 1.0) + xr * (roi.1 - roi.0) * (i_in - 1.0) / (o - 1.0)
            } else {
                0.5 * (roi.0 + roi.1) * (i_in - 1.0)
            };
            if x < 0.0 || x > i_in - 1.0 {
                return None;
            }
            x
        }
        _ => xr / scale,
    })
}

/// ONNX Resize `nearest`: the input index of coordinate `x` under `mode` (the `nearest_mode`; anything unknown is
/// `round_prefer_floor`), before clamping into the input.
pub fn resize_nearest(mode: &str, x: f64) -> f64 {
    let f = x.floor();
    let half = x - f == 0.5;
    match mode {
        "round_prefer_ceil" => {
            if half {
                x.ceil()
            } else {
                x.round()
            }
        }
        "floor" => f,
        "ceil" => x.ceil(),
        _ => {
            if half {
                f
            } else {
                x.round()
            }
        }
    }
}
