//! Property tests: every fast kernel equals the scalar reference (or a direct float loop) for every ISA the CPU
//! has and split across threads, over random shapes, strides, dilations, pads, zero points and scales.
use super::reference::Rng;
use super::reference::{self, Conv2d};

use super::qconv::{QConv, QConvSpec};
use super::qelem;
use super::{ConvGeometry, Isa};

fn nchw_to_nhwc(x: &[u8], [n, c, h, w]: [usize; 4]) -> Vec<u8> {
    let mut y = vec![0u8; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                y[(b * h * w + p) * c + ch] = x[(b * c + ch) * h * w + p];
            }
        }
    }
    y
}

/// A random quantized convolution of the given kind: (spec, geometry, input NCHW shape).
fn random_conv(r: &mut Rng, kind: usize, big: bool) -> Option<(QConvSpec, Conv2d, [usize; 4])> {
    let pick = |r: &mut Rng, v: &[usize]| v[r.range(0, v.len() as i64 - 1) as usize];
    let (c_in, c_out, group, kernel, stride, dilation, pads);
    match kind {
        // pointwise: direct GEMM when c_in % 4 == 0
        0 => {
            c_in = pick(r, &[4, 8, 16, 24, 32, 3, 5, 40]);
            c_out = pick(r, &[1, 7, 16, 24, 40, 64, 65, 96, 130]);
            (group, kernel, stride, dilation, pads) = (1, [1, 1], [1, 1], [1, 1], [0; 4]);
        }
        // general GEMM through im2col
        1 => {
            c_in = r.range(1, 20) as usize;
            c_out = pick(r, &[1, 5, 16, 32, 48, 64, 70]);
            group = 1;
            kernel = [r.range(1, 4) as usize, r.range(1, 4) as usize];
            stride = [r.range(1, 2) as usize, r.range(1, 2) as usize];
            dilation = [r.range(1, 2) as usize, r.range(1, 2) as usize];
            pads = [r.range(0, 2) as usize, r.range(0, 2) as usize, r.range(0, 2) as usize, r.range(0, 2) as usize];
        }
        // depthwise
        _ => {
            c_in = pick(r, &[1, 3, 8, 16, 17, 32, 40, 64, 72, 96, 130, 144, 240]);
            c_out = c_in;
            group = c_in;
            let k = pick(r, &[3, 5, 7]);
            kernel = [k, pick(r, &[k, 1])];
            stride = [r.range(1, 2) as usize, r.range(1, 2) as usize];
            dilation = [r.range(1, 2) as usize, r.range(1, 2) as usize];
            pads = [r.range(0, 2) as usize, r.range(0, 2) as usize, r.range(0, 2) as usize, r.range(0, 2) as usize];
        }
    }
    let g = Conv2d { group, kernel, stride, dilation, pads };
    let (h, w) = if big {
        (r.range(20, 30) as usize, r.range(20, 30) as usize)
    } else {
        (r.range(1, 11) as usize, r.range(1, 11) as usize)
    };
    g.output_hw(h, w)?;
    let n = if big { 1 } else { r.range(1, 2) as usize };
    let mut weights: Vec<i8> =
        (0..c_out * (c_in / group) * kernel[0] * kernel[1]).map(|_| r.range(-127, 127) as i8).collect();
    if r.range(0, 3) == 0 {
        // −128 (not made by symmetric quantizers, allowed by ONNX): the kernels that pair products in 16 bits
        // must notice it.
        let i = r.range(0, weights.len() as i64 - 1) as usize;
        weights[i] = i8::MIN;
    }
    let bias = (r.range(0, 3) > 0).then(|| (0..c_out).map(|_| r.range(-20_000, 20_000) as i32).collect());
    let (z_x, z_y) = (r.range(0, 255) as u8, r.range(0, 255) as u8);
    let taps = ((c_in / group) * kernel[0] * kernel[1]) as f32;
    let multiplier = (0..c_out).map(|_| (0.5 + r.unit()) * 40.0 / (5400.0 * taps.sqrt())).collect();
    let geom = ConvGeometry { c_in, c_out, group, kernel, stride, dilation, pads };
    let spec = QConvSpec { geom, z_x, z_y, weights, bias, multiplier };
    Some((spec, g, [n, c_in, h, w]))
}

fn check_qconv(spec: &QConvSpec, g: Conv2d, shape: [usize; 4], x: &[u8], isa: Isa, what: &str) {
    let [n, _, h, w] = shape;
    let (oh, ow) = g.output_hw(h, w).unwrap();
    let want = reference::qconv2d(
        x,
        shape,
        spec.z_x,
        &spec.weights,
        spec.geom.c_out,
        spec.bias.as_deref(),
        &spec.multiplier,
        spec.z_y,
        g,
    );
    let want = nchw_to_nhwc(&want, [n, spec.geom.c_out, oh, ow]);
    let conv = QConv::new(spec.clone(), isa).unwrap();
    let mut got = vec![0u8; want.len()];
    let xt = nchw_to_nhwc(x, shape);
    conv.run(&xt, n, h, w, &mut got).unwrap();
    assert_eq!(got, want, "{what}: {conv:?} {g:?} input {shape:?}");
    // With an output table (a fused activation): every output byte mapped, none twice.
    let mut r = Rng(0x7ab1e + spec.z_x as u64 * 256 + spec.z_y as u64);
    let table: [u8; 256] = std::array::from_fn(|_| r.range(0, 255) as u8);
    let conv = QConv::new(spec.clone(), isa).unwrap().with_table(table);
    conv.run(&xt, n, h, w, &mut got).unwrap();
    let mapped: Vec<u8> = want.iter().map(|&v| table[v as usize]).collect();
    assert_eq!(got, mapped, "{what} with an output table: {conv:?} {g:?} input {shape:?}");
}

#[test]
fn qconv_kernels_equal_the_scalar_reference_for_every_isa() {
    let isas = Isa::available();
    eprintln!("kernel ISAs tested: {:?}", isas);
    for &isa in &isas {
        let mut r = Rng(0x5eed_0000 + isa as u64);
        let mut checked = [0usize; 3];
        for case in 0..240 {
            let kind = case % 3;
            let Some((spec, g, shape)) = random_conv(&mut r, kind, false) else { continue };
            let x: Vec<u8> = (0..shape.iter().product()).map(|_| r.range(0, 255) as u8).collect();
            check_qconv(&spec, g, shape, &x, isa, &format!("{isa:?} case {case}"));
            checked[kind] += 1;
        }
        assert!(checked.iter().all(|&c| c >= 30), "{isa:?}: too few valid cases {checked:?}");
    }
}

/// A GEMM whose input zero point and scale come with each call (dynamic quantization) equals the same GEMM built
/// with that zero point and multiplier, on every ISA: the per-call bias folding is the build-time one.
#[test]
fn qconv_dynamic_input_equals_a_gemm_built_for_it() {
    for isa in Isa::available() {
        let mut r = Rng(0xd7_0000 + isa as u64);
        for case in 0..40 {
            let (k, n, rows) = (r.range(1, 70) as usize, r.range(1, 140) as usize, r.range(1, 300) as usize);
            let geom = ConvGeometry {
                c_in: k,
                c_out: n,
                group: 1,
                kernel: [1, 1],
                stride: [1, 1],
                dilation: [1, 1],
                pads: [0; 4],
            };
            let weights: Vec<i8> = (0..n * k).map(|_| r.range(-128, 127) as i8).collect();
            let bias: Vec<i32> = (0..n).map(|_| r.range(-9_000, 9_000) as i32).collect();
            let m: Vec<f32> = (0..n).map(|_| 1e-4 + r.unit() * 1e-3).collect();
            let z_x = r.range(0, 255) as u8;
            let spec = |z_x: u8| QConvSpec {
                geom,
                z_x,
                z_y: 0,
                weights: weights.clone(),
                bias: Some(bias.clone()),
                multiplier: m.clone(),
            };
            let x: Vec<u8> = (0..rows * k).map(|_| r.range(0, 255) as u8).collect();
            let (mut want, mut got) = (vec![0f32; rows * n], vec![0f32; rows * n]);
            QConv::new(spec(z_x), isa).unwrap().run_f32(&x, rows, 1, 1, &mut want).unwrap();
            let dynamic = QConv::new(spec(0), isa).unwrap();
            dynamic.run_f32_dynamic(&x, rows, z_x, &m, &mut got).unwrap();
            assert_eq!(got, want, "{isa:?} case {case}: k {k}, n {n}, rows {rows}, z_x {z_x}");
        }
    }
}

#[test]
fn qconv_kernels_split_across_threads_equal_the_reference() {
    for &isa in &Isa::available() {
        let mut r = Rng(0xfeed_0000 + isa as u64);
        for case in 0..9 {
            let Some((spec, g, shape)) = random_conv(&mut r, case % 3, true) else { continue };
            let x: Vec<u8> = (0..shape.iter().product()).map(|_| r.range(0, 255) as u8).collect();
            super::with_threads(2, || {
                assert_eq!(super::threads(), 2);
                check_qconv(&spec, g, shape, &x, isa, &format!("{isa:?} threaded case {case}"))
            });
        }
    }
}

/// The extreme products: weights −128 against inputs 0 (`x − 128 = −128`, what the aarch64 kernels multiply), where
/// two products no longer fit 16 bits together; every ISA must still equal the reference.
#[test]
fn qconv_extreme_products_equal_the_reference() {
    for &isa in &Isa::available() {
        for (c_in, k) in [(16, 1), (24, 1), (5, 3)] {
            let c_out = 24;
            let geom = ConvGeometry {
                c_in,
                c_out,
                group: 1,
                kernel: [k, k],
                stride: [1, 1],
                dilation: [1, 1],
                pads: [k / 2; 4],
            };
            let n = c_out * c_in * k * k;
            let weights = (0..n).map(|i| if i % 7 == 3 { 127 } else { i8::MIN }).collect();
            let spec = QConvSpec { geom, z_x: 0, z_y: 128, weights, bias: None, multiplier: vec![1e-5; c_out] };
            let g = Conv2d { group: 1, kernel: [k, k], stride: [1, 1], dilation: [1, 1], pads: [k / 2; 4] };
            let x: Vec<u8> = (0..4 * 4 * c_in).map(|i| if i % 5 == 0 { 255 } else { 0 }).collect();
            check_qconv(&spec, g, [1, c_in, 4, 4], &x, isa, &format!("{isa:?} extreme c_in {c_in} k {k}"));
        }
    }
}

#[test]
fn qconv_rejects_bad_specs_and_buffers() {
    let geom =
        ConvGeometry { c_in: 4, c_out: 4, group: 2, kernel: [1, 1], stride: [1, 1], dilation: [1, 1], pads: [0; 4] };
    let spec = QConvSpec { geom, z_x: 0, z_y: 0, weights: vec![1; 8], bias: None, multiplier: vec![1.0; 4] };
    assert!(QConv::new(spec.clone(), Isa::Portable).unwrap_err().contains("grouped"));
    let bad = QConvSpec { geom: ConvGeometry { group: 1, ..geom }, weights: vec![1; 3], ..spec.clone() };
    assert!(QConv::new(bad, Isa::Portable).is_err());
    let ok =
        QConv::new(QConvSpec { geom: ConvGeometry { group: 1, ..geom }, weights: vec![1; 16], ..spec }, Isa::Portable)
            .unwrap();
    let mut y = vec![0u8; 4];
    assert!(ok.run(&[0u8; 3], 1, 1, 1, &mut y).is_err());
}

#[test]
fn qadd_kernels_equal_the_scalar_reference_for_every_isa() {
    let q = |scale, zero| reference::QParams { scale, zero };
    for &isa in &Isa::available() {
        let mut r = Rng(0xadd0_0000 + isa as u64);
        for case in 0..40 {
            let n = r.range(1, 200) as usize;
            let a: Vec<u8> = (0..n).map(|_| r.range(0, 255) as u8).collect();
            let b: Vec<u8> = (0..n).map(|_| r.range(0, 255) as u8).collect();
            let (qa, qb) =
                (q(0.001 + r.unit() * 0.1, r.range(0, 255) as u8), q(0.001 + r.unit() * 0.1, r.range(0, 255) as u8));
            let qc = q((qa.scale + qb.scale) * (0.3 + r.unit()), r.range(0, 255) as u8);
            let want = reference::qadd(&a, qa, &b, qb, qc);
            let mut got = vec![0u8; n];
            qelem::qadd(isa, &a, qa, &b, qb, qc, &mut got);
            assert_eq!(got, want, "{isa:?} case {case}");
        }
    }
}

/// Table lookups (`lut`, in place, and `lut_window`: a channel window, nearest upsampling) equal the direct
/// definition for every ISA, on 1 and 2 threads, at lengths around the vector widths.
#[test]
fn table_lookups_equal_their_definition_for_every_isa() {
    let mut r = Rng(0x1a7);
    for &isa in &Isa::available() {
        for case in 0..60 {
            let table: [u8; 256] = std::array::from_fn(|_| r.range(0, 255) as u8);
            let len = if case < 20 { case * 7 } else { r.range(0, 300) as usize };
            let x: Vec<u8> = (0..len).map(|_| r.range(0, 255) as u8).collect();
            let want: Vec<u8> = x.iter().map(|&v| table[v as usize]).collect();
            let mut got = vec![0u8; len];
            qelem::lut(isa, &x, &table, &mut got);
            assert_eq!(got, want, "{isa:?} lut case {case}");
            let mut inplace = x.clone();
            qelem::lut_in_place(isa, &mut inplace, &table);
            assert_eq!(inplace, want, "{isa:?} in-place lut case {case}");
            let (n, h, w, c) =
                (r.range(1, 2) as usize, r.range(1, 9) as usize, r.range(1, 9) as usize, r.range(1, 80) as usize);
            let (c0, cw) = match case % 3 {
                0 => (0, c),
                _ => {
                    let c0 = r.range(0, c as i64 - 1) as usize;
                    (c0, r.range(0, (c - c0) as i64) as usize)
                }
            };
            let s = if case % 2 == 0 { [1, 1] } else { [r.range(1, 3) as usize, r.range(1, 3) as usize] };
            // Big enough now and then to split across threads.
            let (h, w) = if case % 7 == 0 { (h * 20, w * 30) } else { (h, w) };
            let x: Vec<u8> = (0..n * h * w * c).map(|_| r.range(0, 255) as u8).collect();
            let (oh, ow) = (h * s[0], w * s[1]);
            let mut want = vec![0u8; n * oh * ow * cw];
            for b in 0..n {
                for oy in 0..oh {
                    for ox in 0..ow {
                        for j in 0..cw {
                            let v = x[((b * h + oy / s[0]) * w + ox / s[1]) * c + c0 + j];
                            want[((b * oh + oy) * ow + ox) * cw + j] = table[v as usize];
                        }
                    }
                }
            }
            for threads in [1, 2] {
                let mut got = vec![0u8; want.len()];
                super::with_threads(threads, || {
                    qelem::lut_window(isa, &x, [n, h, w, c], (c0, cw), s, &table, &mut got)
                });
                assert_eq!(got, want, "{isa:?} window case {case}: {:?} ({c0}, {cw}) {s:?}", [n, h, w, c]);
            }
        }
    }
}

#[test]
fn maxpool_concat_and_quantize_equal_their_float_definitions() {
    let mut r = Rng(0x9001);
    let q = |scale, zero| reference::QParams { scale, zero };
    let dq = |v: u8, p: reference::QParams| (v as i32 - p.zero as i32) as f32 * p.scale;
    // ONNX QuantizeLinear in f64 (x / s rounded once to f32, as the graph lowering computes it).
    let qf = |x: f32, p: reference::QParams| {
        (((x as f64 / p.scale as f64) as f32).round_ties_even() + p.zero as f32).clamp(0.0, 255.0) as u8
    };
    for case in 0..60 {
        let (n, h, w, c) =
            (r.range(1, 2) as usize, r.range(1, 9) as usize, r.range(1, 9) as usize, r.range(1, 20) as usize);
        let (h, w) = if case % 5 == 0 { (h + 20, w + 7) } else { (h, w) };
        // Some channel counts past the 64-channel blocks the kernel keeps in registers.
        let c = if case % 3 == 0 { c + 60 + 64 * (case % 2) } else { c };
        let g = qelem::Pool2d {
            kernel: [r.range(1, 5) as usize, r.range(1, 5) as usize],
            stride: [r.range(1, 2) as usize, r.range(1, 2) as usize],
            pads: [r.range(0, 2) as usize, r.range(0, 2) as usize, r.range(0, 2) as usize, r.range(0, 2) as usize],
            ceil_mode: r.range(0, 1) == 1,
        };
        let (qi, qo) =
            (q(0.01 + r.unit() * 0.1, r.range(0, 255) as u8), q(0.01 + r.unit() * 0.1, r.range(0, 255) as u8));
        let x: Vec<u8> = (0..n * h * w * c).map(|_| r.range(0, 255) as u8).collect();
        let Some((oh, ow)) = g.output_hw(h, w) else { continue };
        if g.kernel[0] <= g.pads[0].max(g.pads[2]) || g.kernel[1] <= g.pads[1].max(g.pads[3]) {
            continue;
        }
        let table = qelem::requant_table(qi, qo);
        // Each ISA's pixel kernel (and the portable loop) on the same case; the checks below use the best one.
        let xf: Vec<f32> = x.iter().map(|&v| dq(v, qi)).collect();
        let (mut got, mut got_f) = (Vec::new(), Vec::new());
        for &isa in &Isa::available() {
            let (mut q, mut f) = (vec![0u8; n * oh * ow * c], vec![f32::NAN; n * oh * ow * c]);
            qelem::maxpool(isa, &x, [n, h, w, c], g, &table, &mut q).unwrap();
            qelem::maxpool_f32(isa, &xf, [n, h, w, c], g, &mut f).unwrap();
            if !got.is_empty() {
                assert_eq!(q, got, "maxpool {isa:?} case {case}");
                assert_eq!(f, got_f, "float maxpool {isa:?} case {case}");
            }
            (got, got_f) = (q, f);
        }
        for b in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for ch in 0..c {
                        let mut m = f32::NEG_INFINITY;
                        for ky in 0..g.kernel[0] {
                            for kx in 0..g.kernel[1] {
                                let (iy, ix) = (
                                    (oy * g.stride[0] + ky) as isize - g.pads[0] as isize,
                                    (ox * g.stride[1] + kx) as isize - g.pads[1] as isize,
                                );
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    m = m.max(dq(x[((b * h + iy as usize) * w + ix as usize) * c + ch], qi));
                                }
                            }
                        }
                        assert_eq!(got[((b * oh + oy) * ow + ox) * c + ch], qf(m, qo), "maxpool case {case}");
                        assert_eq!(got_f[((b * oh + oy) * ow + ox) * c + ch], m, "float maxpool case {case}");
                    }
                }
            }
        }
        // concat of two tensors with their own parameters
        let c2 = r.range(1, 9) as usize;
        let q2 = q(0.01 + r.unit() * 0.1, r.range(0, 255) as u8);
        let x2: Vec<u8> = (0..n * h * w * c2).map(|_| r.range(0, 255) as u8).collect();
        let (t1, t2) = (qelem::requant_table(qi, qo), qelem::requant_table(q2, qo));
        let mut cat = vec![0u8; n * h * w * (c + c2)];
        qelem::concat_channels(Isa::detect(), &[(&x, c, &t1), (&x2, c2, &t2)], n * h * w, &mut cat);
        for p in 0..n * h * w {
            for ch in 0..c + c2 {
                let want = if ch < c { qf(dq(x[p * c + ch], qi), qo) } else { qf(dq(x2[p * c2 + ch - c], q2), qo) };
                assert_eq!(cat[p * (c + c2) + ch], want, "concat case {case}");
            }
        }
        // quantize NCHW f32 → NHWC u8
        let mut f: Vec<f32> = (0..n * c * h * w).map(|_| (r.unit() - 0.3) * 4.0).collect();
        f[0] = f32::NAN;
        if f.len() > 2 {
            (f[1], f[2]) = (f32::INFINITY, -1e30);
        }
        let want: Vec<u8> = f.iter().map(|&v| qf(v, qo)).collect();
        for &isa in &Isa::available() {
            let mut qx = vec![0u8; f.len()];
            qelem::quantize_nchw_to_nhwc(isa, &f, [n, c, h, w], qo, &mut qx);
            assert_eq!(qx, nchw_to_nhwc(&want, [n, c, h, w]), "quantize {isa:?} case {case}");
        }
    }
}

/// Timing of the conv kernels on EfficientNet-Lite0-like layers (`cargo test --release -- --ignored kernel_timing
/// --nocapture`); informative, not a test of speed.
#[test]
#[ignore]
fn kernel_timing() {
    let layers: &[(&str, usize, usize, usize, usize, usize, usize)] = &[
        // name, hw, c_in, c_out, k, stride, group(0 = depthwise)
        ("stem 3x3 s2", 224, 3, 32, 3, 2, 1),
        ("pw 112 32->16", 112, 32, 16, 1, 1, 1),
        ("pw 112 16->96", 112, 16, 96, 1, 1, 1),
        ("dw3 112 96 s2", 112, 96, 96, 3, 2, 0),
        ("pw 56 96->24", 56, 96, 24, 1, 1, 1),
        ("pw 56 24->144", 56, 24, 144, 1, 1, 1),
        ("dw3 56 144", 56, 144, 144, 3, 1, 0),
        ("dw5 28 240", 28, 240, 240, 5, 1, 0),
        ("dw3 56 144 unpadded", 56, 144, 144, 3, 1, 0),
        ("pw 14 80->480", 14, 80, 480, 1, 1, 1),
        ("pw 7 1152->320", 7, 1152, 320, 1, 1, 1),
        ("pw 7 320->1280", 7, 320, 1280, 1, 1, 1),
    ];
    let mut r = Rng(7);
    for &(name, hw, c_in, c_out, k, s, g) in layers {
        let group = if g == 0 { c_in } else { 1 };
        let pad = if name.ends_with("unpadded") { 0 } else { k / 2 };
        let spec = QConvSpec {
            geom: ConvGeometry { c_in, c_out, group, kernel: [k, k], stride: [s, s], dilation: [1, 1], pads: [pad; 4] },
            z_x: 3,
            z_y: 5,
            weights: (0..c_out * (c_in / group) * k * k).map(|_| r.range(-127, 127) as i8).collect(),
            bias: Some(vec![7; c_out]),
            multiplier: vec![0.001; c_out],
        };
        let x: Vec<u8> = (0..hw * hw * c_in).map(|_| r.range(0, 255) as u8).collect();
        let mut line = format!("{name:>18}:");
        for isa in Isa::available() {
            let conv = QConv::new(spec.clone(), isa).unwrap();
            let (oh, ow) = conv.output_hw(hw, hw).unwrap();
            let mut y = vec![0u8; oh * ow * c_out];
            let mut times = Vec::new();
            for _ in 0..15 {
                let t = std::time::Instant::now();
                conv.run(&x, 1, hw, hw, &mut y).unwrap();
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            let macs = (oh * ow * c_out * (c_in / group) * k * k) as f64;
            line += &format!("  {} {:.3} ms ({:.1} MAC/ns)", isa.name(), times[7], macs / times[7] / 1e6);
        }
        eprintln!("{line}");
    }
}

// ---- fp32 convolution (fconv) against a float64 direct loop, for every ISA, 1 and 2 threads ----

use super::fconv::{Act, FConv, FConvSpec};

/// Direct NHWC convolution in f64: (values, Σ|x·w| per output for the tolerance).
/// The output stage's activation in f64.
fn act_f64(act: Act, v: f64) -> f64 {
    match act {
        Act::None => v,
        Act::Silu => v / (1.0 + (-v).exp()),
        Act::Sigmoid => 1.0 / (1.0 + (-v).exp()),
        Act::HardSwish => v * (v + 3.0).clamp(0.0, 6.0) / 6.0,
        Act::HardSigmoid { alpha, beta } => (v * alpha as f64 + beta as f64).clamp(0.0, 1.0),
    }
}

/// The output stage after the clamp in f64: the activation, then the affine.
fn post_f64(s: &FConvSpec, v: f64) -> f64 {
    let a = act_f64(s.act, v);
    s.affine.map_or(a, |[m, t]| a * m as f64 + t as f64)
}

fn fconv_reference(s: &FConvSpec, x: &[f32], [n, h, w]: [usize; 3]) -> (Vec<f64>, Vec<f64>) {
    let g = Conv2d {
        group: s.geom.group,
        kernel: s.geom.kernel,
        stride: s.geom.stride,
        dilation: s.geom.dilation,
        pads: s.geom.pads,
    };
    let (oh, ow) = g.output_hw(h, w).unwrap();
    let cin_g = s.geom.c_in / s.geom.group;
    let cout_g = s.geom.c_out / s.geom.group;
    let [kh, kw] = s.geom.kernel;
    let (mut y, mut mag) = (vec![0f64; n * oh * ow * s.geom.c_out], vec![0f64; n * oh * ow * s.geom.c_out]);
    for b in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                for o in 0..s.geom.c_out {
                    let (mut acc, mut m) = (s.bias.as_ref().map_or(0.0, |v| v[o] as f64), 0.0);
                    for ci in 0..cin_g {
                        let c = (o / cout_g) * cin_g + ci;
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * s.geom.stride[0] + ky * s.geom.dilation[0]) as isize
                                    - s.geom.pads[0] as isize;
                                let ix = (ox * s.geom.stride[1] + kx * s.geom.dilation[1]) as isize
                                    - s.geom.pads[1] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xv = x[((b * h + iy as usize) * w + ix as usize) * s.geom.c_in + c] as f64;
                                let wv = s.weights[((o * cin_g + ci) * kh + ky) * kw + kx] as f64;
                                acc += xv * wv;
                                m += (xv * wv).abs();
                            }
                        }
                    }
                    let i = ((b * oh + oy) * ow + ox) * s.geom.c_out + o;
                    y[i] = post_f64(s, acc.clamp(s.clamp[0] as f64, s.clamp[1] as f64));
                    mag[i] = m;
                }
            }
        }
    }
    (y, mag)
}

fn check_fconv(r: &mut Rng, kind: usize, big: bool, isa: Isa, what: &str) -> bool {
    let Some((q, _, [n, _, h, w])) = random_conv(r, kind, big) else { return false };
    let clamp = [[f32::NEG_INFINITY, f32::INFINITY], [0.0, f32::INFINITY], [0.0, 6.0]][r.range(0, 2) as usize];
    let spec = FConvSpec {
        geom: q.geom,
        weights: q.weights.iter().map(|&v| v as f32 / 64.0).collect(),
        bias: (r.range(0, 1) == 1).then(|| (0..q.geom.c_out).map(|_| r.unit() * 4.0 - 2.0).collect()),
        clamp,
        act: [Act::None, Act::Silu, Act::Sigmoid, Act::HardSwish, Act::HardSigmoid { alpha: 0.2, beta: 0.5 }]
            [r.range(0, 4) as usize],
        affine: (r.range(0, 1) == 1).then(|| [r.unit() * 2.0 - 1.0, r.unit() - 0.5]),
    };
    let x: Vec<f32> = (0..n * h * w * spec.geom.c_in).map(|_| r.unit() * 2.0 - 1.0).collect();
    let (want, mag) = fconv_reference(&spec, &x, [n, h, w]);
    // The fused residual (group 1): clamp(conv + residual), the sum before the clamp from the same reference.
    let none = [f32::NEG_INFINITY, f32::INFINITY];
    let (sum, _) =
        fconv_reference(&FConvSpec { clamp: none, act: Act::None, affine: None, ..spec.clone() }, &x, [n, h, w]);
    let post = spec.clone();
    let residual: Vec<f32> = (0..want.len()).map(|_| r.unit() * 4.0 - 2.0).collect();
    let conv = FConv::new(spec, isa).unwrap();
    let mut got = vec![f32::NAN; want.len()];
    conv.run(&x, n, h, w, &mut got).unwrap();
    for (i, ((&g, &e), &m)) in got.iter().zip(&want).zip(&mag).enumerate() {
        assert!((g as f64 - e).abs() <= 1e-5 * (1.0 + m), "{what}: {conv:?} element {i}: {g} vs {e}");
    }
    if conv.spec().geom.group == 1 {
        got.fill(f32::NAN);
        conv.run_add(&x, [n, h, w], &residual, &mut got).unwrap();
        for (i, (((&g, &e), &m), &a)) in got.iter().zip(&sum).zip(&mag).zip(&residual).enumerate() {
            let e = post_f64(&post, (e + a as f64).clamp(clamp[0] as f64, clamp[1] as f64));
            assert!((g as f64 - e).abs() <= 1e-5 * (2.0 + m), "{what}: {conv:?} + residual, element {i}: {g} vs {e}");
        }
    } else {
        assert!(conv.run_add(&x, [n, h, w], &residual, &mut got).is_err(), "{what}: a depthwise residual");
    }
    true
}

#[test]
fn fconv_kernels_equal_a_direct_loop_for_every_isa_and_thread_split() {
    for &isa in &Isa::available() {
        let mut r = Rng(0xf1_0000 + isa as u64);
        let mut checked = [0usize; 3];
        for case in 0..180 {
            checked[case % 3] += check_fconv(&mut r, case % 3, false, isa, &format!("{isa:?} case {case}")) as usize;
        }
        assert!(checked.iter().all(|&c| c >= 20), "{isa:?}: too few valid cases {checked:?}");
        for case in 0..9 {
            super::with_threads(2, || {
                check_fconv(&mut r, case % 3, true, isa, &format!("{isa:?} threaded case {case}"))
            });
        }
    }
}

/// The output-stage activations (and the affine after them) over slices of every tail length, on every ISA,
/// against f64, on [−1000, 1000]: within a relative 1e-6 (a few ulp; of the terms of a sum) plus 2e-35, where the exponential's floor at
/// e^−87.3 takes over; NaN stays NaN. The same vector code runs in the convolutions' output stages, which
/// `fconv_kernels_equal_a_direct_loop_for_every_isa_and_thread_split` covers.
#[test]
fn fconv_activations_equal_f64_on_every_isa() {
    let mut r = Rng(0xac7_0001);
    let mut xs: Vec<f32> =
        vec![0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 3.0, -3.0, 87.0, -87.0, 88.0, -88.0, 100.0, -100.0];
    xs.extend([1e3f32, -1e3, f32::MIN_POSITIVE, -f32::MIN_POSITIVE, f32::NAN, 0.5, -2.5, 6.0, -6.0]);
    xs.extend((0..3000).map(|i| (r.unit() * 2.0 - 1.0) * if i % 3 == 0 { 100.0 } else { 12.0 }));
    let acts = [Act::None, Act::Silu, Act::Sigmoid, Act::HardSwish, Act::HardSigmoid { alpha: 0.2, beta: 0.5 }];
    for &isa in &Isa::available() {
        for act in acts {
            for affine in [None, Some([0.75f32, -0.25f32])] {
                for len in (0..=17).chain([xs.len()]) {
                    let mut got = xs[..len].to_vec();
                    act.apply_isa(isa, affine, &mut got);
                    for (&x, &g) in xs.iter().zip(&got) {
                        let a = act_f64(act, x as f64);
                        let e = affine.map_or(a, |[m, t]| a * m as f64 + t as f64);
                        // The terms of a sum set the scale of its rounding (the sum may cancel).
                        let a_scale = match act {
                            Act::HardSigmoid { alpha, beta } => (x as f64 * alpha as f64).abs() + beta.abs() as f64,
                            _ => a.abs(),
                        };
                        let scale = affine.map_or(a_scale, |[m, t]| a_scale * (m as f64).abs() + (t as f64).abs());
                        if x.is_nan() {
                            assert!(g.is_nan(), "{isa:?} {act:?} {affine:?}: NaN gave {g}");
                            continue;
                        }
                        assert!(
                            (g as f64 - e).abs() <= 1e-6 * scale + 2e-35,
                            "{isa:?} {act:?} {affine:?} at {x}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }
}

/// Float channel concatenations (pixel by pixel, split across the pool) and channel windows equal the copies
/// written out, on 1 and 3 threads, with inputs of 1 to 40 channels.
#[test]
fn float_channel_concats_and_windows_equal_their_definition() {
    let mut r = Rng(0xca7_0001);
    for (pixels, cs) in [(7usize, vec![1usize, 3]), (9000, vec![16, 16, 16]), (5000, vec![40, 8, 1, 33])] {
        let xs: Vec<Vec<f32>> = cs.iter().map(|&c| (0..pixels * c).map(|_| r.unit()).collect()).collect();
        let c_out: usize = cs.iter().sum();
        let mut want = Vec::with_capacity(pixels * c_out);
        for p in 0..pixels {
            for (x, &c) in xs.iter().zip(&cs) {
                want.extend_from_slice(&x[p * c..(p + 1) * c]);
            }
        }
        for threads in [1, 3] {
            let ins: Vec<(&[f32], usize)> = xs.iter().map(|x| x.as_slice()).zip(cs.iter().copied()).collect();
            let mut got = vec![f32::NAN; pixels * c_out];
            super::with_threads(threads, || qelem::concat_channels_f32(&ins, pixels, &mut got));
            assert_eq!(got, want, "{pixels} pixels of {cs:?}, {threads} threads");
            let (c0, cw) = (cs[0], c_out - cs[0]);
            let mut win = vec![f32::NAN; pixels * cw];
            super::with_threads(threads, || qelem::channel_window(&want, pixels, c_out, (c0, cw), &mut win));
            let expect: Vec<f32> = want.chunks(c_out).flat_map(|px| px[c0..].iter().copied()).collect();
            assert_eq!(win, expect, "window of {pixels} pixels of {cs:?}, {threads} threads");
        }
    }
}

/// The zero-padded copy of an implicit GEMM's input (split across the pool from 64 Ki elements) equals the input
/// placed inside its padding, on 1 to 3 threads, one-sided and symmetric pads, into a buffer that held a larger and
/// a smaller copy before.
#[test]
fn padded_input_copies_equal_the_input_inside_its_padding() {
    let mut r = Rng(0xbad_0001);
    let mut buf: Vec<f32> = vec![7.0; 10];
    for &(n, h, w, c, pads) in
        &[(1, 5, 7, 3, [1, 1, 1, 1]), (2, 70, 90, 16, [1, 2, 1, 0]), (1, 161, 161, 8, [0, 0, 1, 1])]
    {
        let geom = ConvGeometry { c_in: c, c_out: c, group: 1, kernel: [3, 3], stride: [1, 1], dilation: [1, 1], pads };
        let x: Vec<f32> = (0..n * h * w * c).map(|_| r.unit() + 1.0).collect();
        for threads in 1..=3 {
            let [hp, wp] = super::with_threads(threads, || geom.window().pad_input(&x, [n, h, w], 0.0, &mut buf));
            let [pt, pl, pb, pr] = pads;
            assert_eq!([hp, wp], [h + pt + pb, w + pl + pr]);
            assert_eq!(buf.len(), n * hp * wp * c);
            for b in 0..n {
                for y in 0..hp {
                    for xx in 0..wp {
                        for ch in 0..c {
                            let inside = (pt..pt + h).contains(&y) && (pl..pl + w).contains(&xx);
                            let want = if inside { x[((b * h + y - pt) * w + xx - pl) * c + ch] } else { 0.0 };
                            assert_eq!(
                                buf[((b * hp + y) * wp + xx) * c + ch],
                                want,
                                "{threads} threads, [{b},{y},{xx},{ch}]"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A 1×1 fp32 convolution from `c_in` to `c_out` channels with weights and bias in [−0.5, 0.5) and `clamp`.
fn random_pointwise(r: &mut Rng, c_in: usize, c_out: usize, clamp: [f32; 2]) -> FConvSpec {
    FConvSpec {
        geom: ConvGeometry { c_in, c_out, group: 1, kernel: [1, 1], stride: [1, 1], dilation: [1, 1], pads: [0; 4] },
        weights: (0..c_in * c_out).map(|_| r.unit() - 0.5).collect(),
        bias: Some((0..c_out).map(|_| r.unit() - 0.5).collect()),
        clamp,
        act: Act::None,
        affine: None,
    }
}

/// `FConv::run_pitched` (a transposed convolution's sub-pixel rows) writes exactly what `run` writes, each input
/// row's outputs moved to `r·pitch + x·ld + offset`, and leaves every other float alone; bad pitches are refused.
#[test]
fn fconv_pitched_output_equals_the_contiguous_one_moved() {
    let mut r = Rng(0x9e7c_0001);
    for &isa in &Isa::available() {
        for &(n, h, w, c_in, c_out, threads) in &[(1, 3, 5, 4, 6, 1), (2, 7, 9, 16, 40, 2), (1, 24, 31, 24, 48, 2)] {
            let spec = random_pointwise(&mut r, c_in, c_out, [0.0, f32::INFINITY]);
            let conv = FConv::new(spec, isa).unwrap();
            let x: Vec<f32> = (0..n * h * w * c_in).map(|_| r.unit() * 2.0 - 1.0).collect();
            let mut want = vec![0f32; n * h * w * c_out];
            conv.run(&x, n, h, w, &mut want).unwrap();
            let (ld, offset) = (2 * c_out + 3, c_out + 1);
            let pitch = 2 * w * ld + 5;
            let mut got = vec![f32::NAN; n * h * pitch];
            super::with_threads(threads, || conv.run_pitched(&x, [n, h, w], &mut got, [ld, pitch, offset])).unwrap();
            let mut written = vec![false; got.len()];
            for rr in 0..n * h {
                for xx in 0..w {
                    for o in 0..c_out {
                        let at = rr * pitch + xx * ld + offset + o;
                        assert_eq!(got[at], want[(rr * w + xx) * c_out + o], "{isa:?} row {rr} pixel {xx} channel {o}");
                        written[at] = true;
                    }
                }
            }
            assert!(got.iter().zip(&written).all(|(v, &w)| w || v.is_nan()), "{isa:?}: a float outside the outputs");
            let short = n * h * pitch - pitch + (w - 1) * ld + offset + c_out - 1;
            assert!(conv.run_pitched(&x, [n, h, w], &mut got[..short], [ld, pitch, offset]).is_err());
            assert!(conv.run_pitched(&x, [n, h, w], &mut got, [c_out - 1, pitch, offset]).is_err());
            assert!(conv.run_pitched(&x, [n, h, w], &mut got, [ld, w * ld - 1, offset]).is_err());
        }
    }
}

/// Float depthwise rows of every width from 1 to 19 (full pixel blocks, tails of 1–7, rows shorter than the
/// kernel), kernels 3/5/7 × strides 1/2 × symmetric and one-sided pads, channel counts with and without a last
/// partial vector, against the direct loop.
#[test]
fn fconv_depthwise_rows_of_every_width() {
    let mut r = Rng(0xd3_0000);
    for &isa in &Isa::available() {
        for k in [3, 5, 7] {
            for stride in [1, 2] {
                for (w, c) in (1..20).zip([16, 17, 40, 48, 3].into_iter().cycle()) {
                    let pads = if w % 2 == 0 { [k / 2; 4] } else { [0, 0, k / 2, k / 2] };
                    let geom = ConvGeometry {
                        c_in: c,
                        c_out: c,
                        group: c,
                        kernel: [k, k],
                        stride: [stride; 2],
                        dilation: [1, 1],
                        pads,
                    };
                    let h = k.max(3);
                    let spec = FConvSpec {
                        geom,
                        weights: (0..c * k * k).map(|_| r.unit() - 0.5).collect(),
                        bias: Some((0..c).map(|_| r.unit() - 0.5).collect()),
                        clamp: [f32::NEG_INFINITY, f32::INFINITY],
                        act: Act::None,
                        affine: None,
                    };
                    let conv = FConv::new(spec.clone(), isa).unwrap();
                    let Some((oh, ow)) = conv.output_hw(h, w) else { continue };
                    let x: Vec<f32> = (0..h * w * c).map(|_| r.unit() * 2.0 - 1.0).collect();
                    let (want, mag) = fconv_reference(&spec, &x, [1, h, w]);
                    let mut got = vec![f32::NAN; oh * ow * c];
                    conv.run(&x, 1, h, w, &mut got).unwrap();
                    for (i, ((&g, &e), &m)) in got.iter().zip(&want).zip(&mag).enumerate() {
                        let what = format!("{isa:?} k{k} s{stride} w{w} c{c} element {i}");
                        assert!((g as f64 - e).abs() <= 1e-5 * (1.0 + m), "{what}: {g} vs {e}");
                    }
                }
            }
        }
    }
}

/// The test command says which instruction set the CPU it runs on must offer (`EDGEPACK_EXPECT_ISA`, e.g. `i8mm`
/// under `qemu -cpu max`): the ISA tests above then provably ran that path, not only the portable one.
/// Global average pooling split by channel ranges equals the serial sum in pixel order, bit for bit, for channel
/// counts that are and are not multiples of the 16-float ranges, one image or several (a range across images).
#[test]
fn global_avg_pool_split_by_channels_equals_the_serial_sum() {
    let mut r = Rng(0x6a9);
    for &(n, hw, c) in &[(1, 49, 1280), (1, 169, 1000), (3, 100, 200), (2, 1, 7), (1, 4, 3)] {
        let x: Vec<f32> = (0..n * hw * c).map(|_| r.unit() * 4.0 - 2.0).collect();
        let mut want = vec![0f32; n * c];
        for b in 0..n {
            for p in 0..hw {
                for ch in 0..c {
                    want[b * c + ch] += x[(b * hw + p) * c + ch];
                }
            }
            for v in &mut want[b * c..(b + 1) * c] {
                *v /= hw as f32;
            }
        }
        for threads in [1, 2, 3] {
            let mut y = vec![f32::NAN; n * c];
            super::with_threads(threads, || qelem::global_avg_f32(&x, n, hw, c, &mut y));
            assert_eq!(y, want, "n {n} hw {hw} c {c} threads {threads}");
        }
    }
}

/// Softmax rows of every length from 1 to 20 (one vector per row up to 16 on AVX-512 and NEON) and long ones, on
/// every ISA and split across two threads, against f64: within 4e-7 relative (2 ulp of the exponential, the f32
/// product) and the rounding of `x − max` in f32, plus 1e-38 (the exponential's floor); rows with a NaN are all
/// NaN.
#[test]
fn softmax_rows_equal_f64_on_every_isa() {
    let mut r = Rng(0x50f7_0001);
    for &isa in &Isa::available() {
        for n in (1..=20).chain([33, 100]) {
            let rows = 37;
            let mut x: Vec<f32> = (0..rows * n).map(|_| (r.unit() * 2.0 - 1.0) * 30.0).collect();
            x[n] = f32::NAN; // row 1 (of rows ≥ 2), its first value
            let mut y = vec![0f32; x.len()];
            super::with_threads(2, || qelem::softmax_rows_isa(isa, &x, n, &mut y));
            for (i, (xr, yr)) in x.chunks(n).zip(y.chunks(n)).enumerate() {
                if xr.iter().any(|v| v.is_nan()) {
                    assert!(yr.iter().all(|v| v.is_nan()), "{isa:?} n {n} row {i}: NaN row gave {yr:?}");
                    continue;
                }
                let max = xr.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
                let sum: f64 = xr.iter().map(|&v| (v as f64 - max).exp()).sum();
                for (&v, &g) in xr.iter().zip(yr) {
                    let e = (v as f64 - max).exp() / sum;
                    // The f32 difference x − max is rounded (half an ulp of it) before the exponential.
                    let tol = (4e-7 + 1.2e-7 * (v as f64 - max).abs()) * e + 1e-38;
                    assert!((g as f64 - e).abs() <= tol, "{isa:?} n {n} row {i}: {g} vs {e}");
                }
            }
        }
    }
}

/// The softmax's exponential against f64 `exp` over every 1/1024 step of [−90, 0] (and the ends): within 2 ulp
/// wherever the result is a normal float, never above `e^x`'s normal-range floor below it, NaN for NaN.
#[test]
fn softmax_exp_is_within_two_ulp() {
    let mut worst = 0f64;
    for i in 0..=90 * 1024 {
        let x = -(i as f32) / 1024.0;
        let got = qelem::exp_nonpositive(x) as f64;
        let want = (x as f64).exp();
        if want < f32::MIN_POSITIVE as f64 {
            assert!(got <= 1.2e-38, "exp({x}) = {got}, expected about {want}");
            continue;
        }
        let ulp = (want as f32).abs().to_bits();
        let ulp = (f32::from_bits(ulp + 1) - f32::from_bits(ulp)) as f64;
        worst = worst.max((got - want).abs() / ulp);
    }
    assert!(worst <= 2.0, "worst error {worst} ulp");
    assert_eq!(qelem::exp_nonpositive(0.0), 1.0);
    assert!(qelem::exp_nonpositive(f32::NAN).is_nan());
    assert!(qelem::exp_nonpositive(f32::NEG_INFINITY) <= 1.2e-38);
}

#[test]
fn the_expected_instruction_set_is_detected() {
    let Ok(name) = std::env::var("EDGEPACK_EXPECT_ISA") else { return };
    let want = Isa::parse(&name).unwrap_or_else(|| panic!("EDGEPACK_EXPECT_ISA={name} names no instruction set"));
    let best = *Isa::available().last().unwrap();
    assert_eq!(best, want, "best instruction set detected");
}

/// Small images whose GEMM splits its channel blocks and rows below a tile across threads (`gemm_split`; 14×14
/// on two threads: bands of rows): 1×1 convolutions on 7×7 and 14×14 pixels with 1–20 channel blocks, a
/// classifier GEMV, on 2 and 3 threads, equal the direct loop (fp32) and the scalar reference (INT8).
#[test]
fn small_image_gemms_split_across_threads_equal_the_reference() {
    let mut r = Rng(0x5b1_7000);
    let isa = *Isa::available().last().unwrap();
    for &(hw, c_in, c_out) in &[(7, 64, 192), (14, 48, 112), (7, 32, 320), (7, 40, 1280), (1, 1280, 1000), (3, 16, 40)]
    {
        let spec = random_pointwise(&mut r, c_in, c_out, [0.0, 6.0]);
        let geom = spec.geom;
        let x: Vec<f32> = (0..hw * hw * c_in).map(|_| r.unit() * 2.0 - 1.0).collect();
        let (want, mag) = fconv_reference(&spec, &x, [1, hw, hw]);
        let conv = FConv::new(spec, isa).unwrap();
        let q = QConvSpec {
            geom,
            z_x: 128,
            z_y: 3,
            weights: (0..c_in * c_out).map(|_| (r.range(0, 254) as i32 - 127) as i8).collect(),
            bias: Some((0..c_out).map(|_| r.range(0, 2000) as i32 - 1000).collect()),
            multiplier: (0..c_out).map(|_| 0.0005 + r.unit() * 0.002).collect(),
        };
        let xq: Vec<u8> = (0..hw * hw * c_in).map(|_| r.range(0, 255) as u8).collect();
        for threads in [2, 3] {
            super::with_threads(threads, || {
                let mut got = vec![f32::NAN; want.len()];
                conv.run(&x, 1, hw, hw, &mut got).unwrap();
                for (i, ((&g, &e), &m)) in got.iter().zip(&want).zip(&mag).enumerate() {
                    let what = format!("{hw}x{hw} {c_in}->{c_out} on {threads} threads, element {i}");
                    assert!((g as f64 - e).abs() <= 1e-5 * (1.0 + m), "{what}: {g} vs {e}");
                }
                let g = Conv2d { group: 1, kernel: [1, 1], stride: [1, 1], dilation: [1, 1], pads: [0; 4] };
                check_qconv(&q, g, [1, c_in, hw, hw], &xq, isa, &format!("int8 {hw}x{hw} {c_in}->{c_out} {threads}t"));
            });
        }
    }
}

#[test]
fn gemm_split_balances_threads_with_the_fewest_row_parts() {
    use super::qconv::gemm_split;
    // 7×7 (one tile) × three 64-wide blocks on 2 threads: two row halves of each block.
    assert_eq!(gemm_split(49, 1, &[64; 3], 2, 8, true), (2, 3));
    // 112 channels = a 64- and a 48-wide block on 1 thread of 3: a column split alone would give one thread 57 %.
    assert_eq!(gemm_split(98, 1, &[64, 48], 3, 12, true), (3, 2));
    // 14×14 on two threads: bands of rows, two per thread, every channel (what the depthwise layer after reads).
    assert_eq!(gemm_split(196, 1, &[64, 48], 2, 8, true), (4, 1));
    assert_eq!(gemm_split(196, 1, &[64; 20], 2, 8, true), (4, 1));
    // 13×13 (fewer than two bands per thread) and the rows of a [N, K] GEMM keep the search.
    assert_eq!(gemm_split(169, 1, &[64; 2], 2, 8, true), (1, 2));
    assert_eq!(gemm_split(196, 1, &[64; 20], 2, 8, false), (1, 10));
    // Twenty blocks: ten pairs on two threads, rows whole (no weight read twice).
    assert_eq!(gemm_split(49, 1, &[64; 20], 2, 8, true), (1, 10));
    // Enough row tiles: rows only, as many parts as wanted.
    assert_eq!(gemm_split(12544, 49, &[64; 2], 2, 8, true), (8, 1));
    // One thread: one part.
    assert_eq!(gemm_split(49, 1, &[64; 3], 1, 4, true), (1, 1));
    // Any shape: parts within bounds and the heaviest thread near an even share where the rows allow it.
    for rows in [1, 7, 49, 144, 169, 196, 300] {
        for nb in 1..24 {
            for threads in 2..6 {
                let widths: Vec<usize> = (0..nb).map(|i| if i + 1 == nb { 16 * (1 + i % 4) } else { 64 }).collect();
                let (rp, cp) = gemm_split(rows, rows.div_ceil(256), &widths, threads, threads * 4, true);
                assert!(rp >= 1 && cp >= 1 && cp <= nb && rp <= rows.max(1), "{rows} rows {nb} blocks: {rp}x{cp}");
                if cp == 1 && rp > 1 && rows >= 2 * threads * 48 && rows <= 256 {
                    // Bands of rows: as many per thread.
                    assert_eq!(rp % threads, 0, "{rows} rows on {threads} threads: {rp} bands");
                }
            }
        }
    }
}

/// A convolution chain (`[1×1,] depthwise [, 1×1]`, a residual added to the last) equals its convolutions run one
/// after the other, for every ISA, 1–4 threads, windows 3×3 and 5×5 at strides 1 and 2, with and without the
/// expansion, the projection and the residual, at sizes where the fused row walk runs (in one part per thread,
/// and with the expansion staged where parts would repeat too much of it: 5×5 at stride 1 on 4 threads) and below
/// them (one after the other).
#[test]
fn fchain_equals_its_convolutions_one_after_the_other() {
    use super::fconv::{Act, FChain, FConv, FConvSpec};
    let mut r = Rng(0xc4a1_0000);
    let spec = |r: &mut Rng, c_in: usize, c_out: usize, k: usize, s: usize, dw: bool, act: Act| {
        let group = if dw { c_in } else { 1 };
        let geom = ConvGeometry {
            c_in,
            c_out,
            group,
            kernel: [k, k],
            stride: [s, s],
            dilation: [1, 1],
            pads: [k / 2, k / 2, k / 2, k / 2 - usize::from(s == 2 && k == 3)],
        };
        FConvSpec {
            geom,
            weights: (0..c_out * c_in / group * k * k).map(|_| r.unit() - 0.5).collect(),
            bias: Some((0..c_out).map(|_| r.unit() - 0.5).collect()),
            clamp: if dw { [0.0, 6.0] } else { [f32::NEG_INFINITY, f32::INFINITY] },
            act,
            affine: None,
        }
    };
    for &isa in &Isa::available() {
        for (pre, post, residual) in
            [(true, true, true), (true, true, false), (true, false, false), (false, true, true), (false, true, false)]
        {
            for (k, s) in [(3, 1), (3, 2), (5, 1), (5, 2)] {
                // Wide enough that the fused walk runs (a 69×65×60 expansion, a 35×33×60 depthwise output), and
                // small.
                for (n, h, w) in [(1, 69, 65), (2, 9, 7)] {
                    let (c_in, cm) = (if pre { 12 } else { 60 }, 60);
                    let c_out = if residual && s == 1 { c_in } else { 20 };
                    if residual && (s != 1 || c_out != c_in) {
                        continue;
                    }
                    let mut specs = Vec::new();
                    if pre {
                        specs.push(spec(&mut r, c_in, cm, 1, 1, false, Act::HardSwish));
                    }
                    specs.push(spec(&mut r, cm, cm, k, s, true, Act::None));
                    if post {
                        specs.push(spec(&mut r, cm, c_out, 1, 1, false, Act::None));
                    }
                    let convs: Vec<FConv> = specs.iter().map(|s| FConv::new(s.clone(), isa).unwrap()).collect();
                    let chain =
                        FChain::new(specs.iter().map(|s| FConv::new(s.clone(), isa).unwrap()).collect()).unwrap();
                    assert_eq!(chain.fuses([n, h, w]), h > 9, "pre {pre} post {post} k{k} s{s} {n}x{h}x{w}");
                    let x: Vec<f32> = (0..n * h * w * chain.c_in()).map(|_| r.unit() * 2.0 - 1.0).collect();
                    let (oh, ow) = chain.output_hw(h, w).unwrap();
                    let res: Vec<f32> = (0..n * oh * ow * chain.c_out()).map(|_| r.unit() - 0.5).collect();
                    // The convolutions one after the other.
                    let (mut cur, mut hw) = (x.clone(), (h, w));
                    for (i, conv) in convs.iter().enumerate() {
                        let (a, b) = conv.output_hw(hw.0, hw.1).unwrap();
                        let mut out = vec![0f32; n * a * b * conv.spec().geom.c_out];
                        if residual && i + 1 == convs.len() {
                            conv.run_add(&cur, [n, hw.0, hw.1], &res, &mut out).unwrap();
                        } else {
                            conv.run(&cur, n, hw.0, hw.1, &mut out).unwrap();
                        }
                        (cur, hw) = (out, (a, b));
                    }
                    for threads in 1..=4 {
                        let mut got = vec![f32::NAN; cur.len()];
                        let r_in = residual.then_some(&res[..]);
                        super::with_threads(threads, || chain.run(&x, [n, h, w], r_in, &mut got)).unwrap();
                        let what =
                            format!("{isa:?} pre {pre} post {post} res {residual} k{k} s{s} {n}x{h}x{w} t{threads}");
                        for (i, (&g, &e)) in got.iter().zip(&cur).enumerate() {
                            assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "{what}: element {i}: {g} vs {e}");
                        }
                    }
                }
            }
        }
    }
    // Not chains: no depthwise convolution, a 3×3 convolution around it, mismatched channels.
    let mut r = Rng(1);
    let pw = |r: &mut Rng, a, b| FConv::new(spec(r, a, b, 1, 1, false, Act::None), Isa::Portable).unwrap();
    let dw = |r: &mut Rng, c| FConv::new(spec(r, c, c, 3, 1, true, Act::None), Isa::Portable).unwrap();
    assert!(FChain::new(vec![pw(&mut r, 4, 8), pw(&mut r, 8, 8)]).is_err());
    assert!(FChain::new(vec![dw(&mut r, 8)]).is_err());
    assert!(
        FChain::new(vec![
            FConv::new(spec(&mut r, 4, 8, 3, 1, false, Act::None), Isa::Portable).unwrap(),
            dw(&mut r, 8)
        ])
        .is_err()
    );
    assert!(FChain::new(vec![pw(&mut r, 4, 6), dw(&mut r, 8)]).is_err());
    assert!(FChain::new(vec![pw(&mut r, 4, 8), dw(&mut r, 8), pw(&mut r, 8, 4), pw(&mut r, 4, 4)]).is_err());
    // A residual needs a projection; buffers must match.
    let chain = FChain::new(vec![pw(&mut r, 4, 8), dw(&mut r, 8)]).unwrap();
    let x = vec![0.5f32; 5 * 5 * 4];
    let mut y = vec![0f32; 5 * 5 * 8];
    assert!(chain.run(&x, [1, 5, 5], Some(&y.clone()), &mut y).is_err());
    assert!(chain.run(&x[1..], [1, 5, 5], None, &mut y).is_err());
    assert!(chain.run(&x, [1, 5, 5], None, &mut y).is_ok());
}
