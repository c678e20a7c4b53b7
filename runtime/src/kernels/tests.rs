//! Property tests: the QDQ lowering run by the CPU backend equals the scalar reference over random shapes,
//! groups, strides, dilations, pads, zero points and scales.
use super::reference::{self, Conv2d};
use crate::onnx::builder::*;
use crate::onnx::{Dim, Model, NodeExt, node};
use crate::{DType, Session, SessionOptions, Tensor};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn run_u8(m: &Model, input: Tensor) -> Vec<u8> {
    let s = Session::from_model(m, &SessionOptions { threads: 1, ..Default::default() }).unwrap();
    let out = s.run_one(input).unwrap();
    match out[0].1.data() {
        crate::tensor::TensorData::U8(v) => v.clone(),
        _ => panic!("expected u8 output, got {:?}", out[0].1.dtype()),
    }
}

#[test]
fn lowered_qconv_equals_the_scalar_reference_on_random_geometry() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let mut checked = 0;
    for case in 0..40 {
        let c_in = r.range(1, 6) as usize;
        let depthwise = r.range(0, 2) == 0;
        let group = if depthwise { c_in } else { 1 };
        let c_out = if depthwise { c_in * r.range(1, 2) as usize } else { r.range(1, 6) as usize };
        let kernel = [r.range(1, 3) as usize, r.range(1, 3) as usize];
        let g = Conv2d {
            group,
            kernel,
            stride: [r.range(1, 2) as usize, r.range(1, 2) as usize],
            dilation: [r.range(1, 2) as usize, r.range(1, 2) as usize],
            pads: [r.range(0, 2) as usize, r.range(0, 2) as usize, r.range(0, 2) as usize, r.range(0, 2) as usize],
        };
        let (h, w) = (r.range(3, 9) as usize, r.range(3, 9) as usize);
        let Some((oh, ow)) = g.output_hw(h, w) else { continue };
        let x: Vec<u8> = (0..c_in * h * w).map(|_| r.range(0, 255) as u8).collect();
        let wq: Vec<i8> =
            (0..c_out * (c_in / group) * kernel[0] * kernel[1]).map(|_| r.range(-127, 127) as i8).collect();
        let bias: Vec<i32> = (0..c_out).map(|_| r.range(-5_000, 5_000) as i32).collect();
        let (z_x, z_y) = (r.range(0, 255) as u8, r.range(64, 192) as u8);
        let s_x = 0.001 + r.unit() * 0.05;
        let s_w: Vec<f32> = (0..c_out).map(|_| 0.0005 + r.unit() * 0.01).collect();
        let taps = ((c_in / group) * kernel[0] * kernel[1]) as f32;
        // Accumulators spread over about ±5400·√taps: map that onto ±40 output steps.
        let s_y = s_x * s_w.iter().sum::<f32>() / c_out as f32 * 5400.0 * taps.sqrt() / 40.0 * (0.5 + r.unit());
        let m = reference::multiplier(s_x, &s_w, s_y);
        let want = reference::qconv2d(&x, [1, c_in, h, w], z_x, &wq, c_out, Some(&bias), &m, z_y, g);
        let model = model(
            vec![
                node("DequantizeLinear", "dqx", &["xq", "sx", "zx"], &["xd"], vec![]),
                node("DequantizeLinear", "dqw", &["wq", "sw", "zw"], &["wd"], vec![attr_int("axis", 0)]),
                node("DequantizeLinear", "dqb", &["bq", "sb"], &["bd"], vec![attr_int("axis", 0)]),
                node(
                    "Conv",
                    "conv",
                    &["xd", "wd", "bd"],
                    &["c"],
                    vec![
                        attr_int("group", group as i64),
                        attr_ints("kernel_shape", &[kernel[0] as i64, kernel[1] as i64]),
                        attr_ints("strides", &[g.stride[0] as i64, g.stride[1] as i64]),
                        attr_ints("dilations", &[g.dilation[0] as i64, g.dilation[1] as i64]),
                        attr_ints("pads", &g.pads.map(|p| p as i64)),
                    ],
                ),
                node("QuantizeLinear", "qy", &["c", "sy", "zy"], &["yq"], vec![]),
            ],
            vec![value_info("xq", 2, &[Dim::Fixed(1), Dim::Fixed(c_in), Dim::Fixed(h), Dim::Fixed(w)])],
            vec![value_info("yq", 2, &[Dim::Fixed(1), Dim::Fixed(c_out), Dim::Fixed(oh), Dim::Fixed(ow)])],
            vec![
                tensor_f32("sx", &[], &[s_x]),
                tensor_raw("zx", &[], 2, vec![z_x]),
                tensor_raw(
                    "wq",
                    &[c_out as i64, (c_in / group) as i64, kernel[0] as i64, kernel[1] as i64],
                    3,
                    wq.iter().map(|&v| v as u8).collect(),
                ),
                tensor_f32("sw", &[c_out as i64], &s_w),
                tensor_raw("zw", &[c_out as i64], 3, vec![0; c_out]),
                tensor_raw("bq", &[c_out as i64], 6, bias.iter().flat_map(|v| v.to_le_bytes()).collect()),
                tensor_f32("sb", &[c_out as i64], &s_w.iter().map(|s| s_x * s).collect::<Vec<_>>()),
                tensor_f32("sy", &[], &[s_y]),
                tensor_raw("zy", &[], 2, vec![z_y]),
            ],
        );
        let mut lowered = model.clone();
        assert!(lowered.graph.lower_qdq_integer() >= 1, "case {case}: the pattern was not lowered");
        let input = Tensor::from_le_bytes(DType::U8, vec![1, c_in, h, w], &x).unwrap();
        let got = run_u8(&model, input);
        let spread = want.iter().filter(|&&v| v != 0 && v != 255).count();
        assert!(spread * 5 >= want.len(), "case {case}: test outputs mostly saturated ({spread}/{})", want.len());
        assert_eq!(got, want, "case {case}: {g:?} c_in {c_in} c_out {c_out} {h}x{w}");
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} geometries were valid");
}

#[test]
fn lowered_qadd_equals_the_scalar_reference() {
    let mut r = Rng(0x1234_5678_9abc_def1);
    for case in 0..20 {
        let n = r.range(1, 300) as usize;
        let a: Vec<u8> = (0..n).map(|_| r.range(0, 255) as u8).collect();
        let b: Vec<u8> = (0..n).map(|_| r.range(0, 255) as u8).collect();
        let (s_a, s_b) = (0.001 + r.unit() * 0.1, 0.001 + r.unit() * 0.1);
        let s_c = (s_a + s_b) * (0.6 + r.unit());
        let (z_a, z_b, z_c) = (r.range(0, 255) as u8, r.range(0, 255) as u8, r.range(0, 255) as u8);
        let q = |scale, zero| reference::QParams { scale, zero };
        let want = reference::qadd(&a, q(s_a, z_a), &b, q(s_b, z_b), q(s_c, z_c));
        let model = model(
            vec![
                node("DequantizeLinear", "dqa", &["a", "sa", "za"], &["ad"], vec![]),
                node("DequantizeLinear", "dqb", &["b", "sb", "zb"], &["bd"], vec![]),
                node("Add", "add", &["ad", "bd"], &["s"], vec![]),
                node("QuantizeLinear", "q", &["s", "sc", "zc"], &["y"], vec![]),
            ],
            vec![value_info("a", 2, &[Dim::Fixed(n)]), value_info("b", 2, &[Dim::Fixed(n)])],
            vec![value_info("y", 2, &[Dim::Fixed(n)])],
            vec![
                tensor_f32("sa", &[], &[s_a]),
                tensor_raw("za", &[], 2, vec![z_a]),
                tensor_f32("sb", &[], &[s_b]),
                tensor_raw("zb", &[], 2, vec![z_b]),
                tensor_f32("sc", &[], &[s_c]),
                tensor_raw("zc", &[], 2, vec![z_c]),
            ],
        );
        let s = Session::from_model(&model, &SessionOptions { threads: 1, ..Default::default() }).unwrap();
        let out = s
            .run(vec![
                ("a".into(), Tensor::from_le_bytes(DType::U8, vec![n], &a).unwrap()),
                ("b".into(), Tensor::from_le_bytes(DType::U8, vec![n], &b).unwrap()),
            ])
            .unwrap();
        let got = out[0].1.to_le_bytes();
        assert_eq!(got, want, "case {case}");
    }
}

#[test]
fn lowered_qgemm_equals_the_scalar_reference() {
    let mut r = Rng(0x0bad_cafe_dead_beef);
    for case in 0..20 {
        let (n, k, c_out) = (r.range(1, 4) as usize, r.range(1, 64) as usize, r.range(1, 16) as usize);
        let x: Vec<u8> = (0..n * k).map(|_| r.range(0, 255) as u8).collect();
        let wq: Vec<i8> = (0..c_out * k).map(|_| r.range(-127, 127) as i8).collect();
        let bias: Vec<i32> = (0..c_out).map(|_| r.range(-5_000, 5_000) as i32).collect();
        let (z_x, z_y) = (r.range(0, 255) as u8, r.range(64, 192) as u8);
        let s_x = 0.001 + r.unit() * 0.05;
        let s_w: Vec<f32> = (0..c_out).map(|_| 0.0005 + r.unit() * 0.01).collect();
        let s_y = s_x * s_w.iter().sum::<f32>() / c_out as f32 * 5400.0 * (k as f32).sqrt() / 40.0;
        let m = reference::multiplier(s_x, &s_w, s_y);
        let want = reference::qgemm(&x, n, k, z_x, &wq, c_out, Some(&bias), &m, z_y);
        let model = model(
            vec![
                node("DequantizeLinear", "dqx", &["xq", "sx", "zx"], &["xd"], vec![]),
                node("DequantizeLinear", "dqw", &["wq", "sw", "zw"], &["wd"], vec![attr_int("axis", 0)]),
                node("DequantizeLinear", "dqb", &["bq", "sb"], &["bd"], vec![attr_int("axis", 0)]),
                node("Gemm", "fc", &["xd", "wd", "bd"], &["g"], vec![attr_int("transB", 1)]),
                node("QuantizeLinear", "qy", &["g", "sy", "zy"], &["yq"], vec![]),
            ],
            vec![value_info("xq", 2, &[Dim::Fixed(n), Dim::Fixed(k)])],
            vec![value_info("yq", 2, &[Dim::Fixed(n), Dim::Fixed(c_out)])],
            vec![
                tensor_f32("sx", &[], &[s_x]),
                tensor_raw("zx", &[], 2, vec![z_x]),
                tensor_raw("wq", &[c_out as i64, k as i64], 3, wq.iter().map(|&v| v as u8).collect()),
                tensor_f32("sw", &[c_out as i64], &s_w),
                tensor_raw("zw", &[c_out as i64], 3, vec![0; c_out]),
                tensor_raw("bq", &[c_out as i64], 6, bias.iter().flat_map(|v| v.to_le_bytes()).collect()),
                tensor_f32("sb", &[c_out as i64], &s_w.iter().map(|s| s_x * s).collect::<Vec<_>>()),
                tensor_f32("sy", &[], &[s_y]),
                tensor_raw("zy", &[], 2, vec![z_y]),
            ],
        );
        let mut lowered = model.clone();
        assert!(lowered.graph.lower_qdq_integer() >= 1, "case {case}: the pattern was not lowered");
        let mut kernels = model.clone();
        kernels.lower_qdq_kernels();
        assert!(kernels.graph.nodes.iter().any(|n| n.op() == "EpQGemm"), "case {case}: no EpQGemm");
        let got = run_u8(&model, Tensor::from_le_bytes(DType::U8, vec![n, k], &x).unwrap());
        assert_eq!(got, want, "case {case}: n {n} k {k} c_out {c_out}");

        // The same Gemm with its float output kept (a classifier head): f32(acc)·s_x·s_w.
        let mut float_head = model.clone();
        float_head.graph.nodes.pop();
        float_head.graph.outputs = vec![value_info("g", 1, &[Dim::Fixed(n), Dim::Fixed(c_out)])];
        let s = Session::from_model(&float_head, &SessionOptions { threads: 1, ..Default::default() }).unwrap();
        let got = s.run_one(Tensor::from_le_bytes(DType::U8, vec![n, k], &x).unwrap()).unwrap()[0].1.to_f32_vec();
        for r in 0..n {
            for o in 0..c_out {
                let acc: i64 = bias[o] as i64
                    + (0..k).map(|i| (x[r * k + i] as i64 - z_x as i64) * wq[o * k + i] as i64).sum::<i64>();
                let want = acc as f64 * s_x as f64 * s_w[o] as f64;
                let g = got[r * c_out + o] as f64;
                assert!(
                    (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "case {case} float head [{r}, {o}]: {g} vs {want}"
                );
            }
        }
    }
}

// ---- fast kernels (qconv, qelem) against the scalar reference, for every ISA this CPU has ----

use super::Isa;
use super::qconv::{QConv, QConvSpec};
use super::qelem;

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
            let k = pick(r, &[3, 5]);
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
    let weights: Vec<i8> =
        (0..c_out * (c_in / group) * kernel[0] * kernel[1]).map(|_| r.range(-127, 127) as i8).collect();
    let bias = (r.range(0, 3) > 0).then(|| (0..c_out).map(|_| r.range(-20_000, 20_000) as i32).collect());
    let (z_x, z_y) = (r.range(0, 255) as u8, r.range(0, 255) as u8);
    let taps = ((c_in / group) * kernel[0] * kernel[1]) as f32;
    let multiplier = (0..c_out).map(|_| (0.5 + r.unit()) * 40.0 / (5400.0 * taps.sqrt())).collect();
    let spec = QConvSpec { c_in, c_out, group, kernel, stride, dilation, pads, z_x, z_y, weights, bias, multiplier };
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
        spec.c_out,
        spec.bias.as_deref(),
        &spec.multiplier,
        spec.z_y,
        g,
    );
    let want = nchw_to_nhwc(&want, [n, spec.c_out, oh, ow]);
    let conv = QConv::new(spec.clone(), isa).unwrap();
    let mut got = vec![0u8; want.len()];
    conv.run(&nchw_to_nhwc(x, shape), n, h, w, &mut got).unwrap();
    assert_eq!(got, want, "{what}: {conv:?} {g:?} input {shape:?}");
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

#[test]
fn qconv_rejects_bad_specs_and_buffers() {
    let spec = QConvSpec {
        c_in: 4,
        c_out: 4,
        group: 2,
        kernel: [1, 1],
        stride: [1, 1],
        dilation: [1, 1],
        pads: [0; 4],
        z_x: 0,
        z_y: 0,
        weights: vec![1; 8],
        bias: None,
        multiplier: vec![1.0; 4],
    };
    assert!(QConv::new(spec.clone(), Isa::Portable).unwrap_err().contains("grouped"));
    let bad = QConvSpec { group: 1, weights: vec![1; 3], ..spec.clone() };
    assert!(QConv::new(bad, Isa::Portable).is_err());
    let ok = QConv::new(QConvSpec { group: 1, weights: vec![1; 16], ..spec }, Isa::Portable).unwrap();
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

#[test]
fn maxpool_concat_and_quantize_equal_their_float_definitions() {
    let mut r = Rng(0x9001);
    let q = |scale, zero| reference::QParams { scale, zero };
    let dq = |v: u8, p: reference::QParams| (v as i32 - p.zero as i32) as f32 * p.scale;
    // ONNX QuantizeLinear in f64 (x / s rounded once to f32, as the graph lowering computes it).
    let qf = |x: f32, p: reference::QParams| {
        (((x as f64 / p.scale as f64) as f32).round_ties_even() + p.zero as f32).clamp(0.0, 255.0) as u8
    };
    for case in 0..30 {
        let (n, h, w, c) =
            (r.range(1, 2) as usize, r.range(1, 9) as usize, r.range(1, 9) as usize, r.range(1, 20) as usize);
        let (h, w) = if case % 5 == 0 { (h + 20, w + 7) } else { (h, w) };
        let g = qelem::Pool2d {
            kernel: [r.range(1, 3) as usize, r.range(1, 3) as usize],
            stride: [r.range(1, 2) as usize, r.range(1, 2) as usize],
            pads: [r.range(0, 1) as usize, r.range(0, 1) as usize, r.range(0, 1) as usize, r.range(0, 1) as usize],
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
        let mut got = vec![0u8; n * oh * ow * c];
        qelem::maxpool(&x, [n, h, w, c], g, &table, &mut got).unwrap();
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
        qelem::concat_channels(&[(&x, c, &t1), (&x2, c2, &t2)], n * h * w, &mut cat);
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
            c_in,
            c_out,
            group,
            kernel: [k, k],
            stride: [s, s],
            dilation: [1, 1],
            pads: [pad; 4],
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

use super::fconv::{FConv, FConvSpec};

/// Direct NHWC convolution in f64: (values, Σ|x·w| per output for the tolerance).
fn fconv_reference(s: &FConvSpec, x: &[f32], [n, h, w]: [usize; 3]) -> (Vec<f64>, Vec<f64>) {
    let g = Conv2d { group: s.group, kernel: s.kernel, stride: s.stride, dilation: s.dilation, pads: s.pads };
    let (oh, ow) = g.output_hw(h, w).unwrap();
    let cin_g = s.c_in / s.group;
    let cout_g = s.c_out / s.group;
    let [kh, kw] = s.kernel;
    let (mut y, mut mag) = (vec![0f64; n * oh * ow * s.c_out], vec![0f64; n * oh * ow * s.c_out]);
    for b in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                for o in 0..s.c_out {
                    let (mut acc, mut m) = (s.bias.as_ref().map_or(0.0, |v| v[o] as f64), 0.0);
                    for ci in 0..cin_g {
                        let c = (o / cout_g) * cin_g + ci;
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * s.stride[0] + ky * s.dilation[0]) as isize - s.pads[0] as isize;
                                let ix = (ox * s.stride[1] + kx * s.dilation[1]) as isize - s.pads[1] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xv = x[((b * h + iy as usize) * w + ix as usize) * s.c_in + c] as f64;
                                let wv = s.weights[((o * cin_g + ci) * kh + ky) * kw + kx] as f64;
                                acc += xv * wv;
                                m += (xv * wv).abs();
                            }
                        }
                    }
                    let i = ((b * oh + oy) * ow + ox) * s.c_out + o;
                    y[i] = acc.clamp(s.clamp[0] as f64, s.clamp[1] as f64);
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
        c_in: q.c_in,
        c_out: q.c_out,
        group: q.group,
        kernel: q.kernel,
        stride: q.stride,
        dilation: q.dilation,
        pads: q.pads,
        weights: q.weights.iter().map(|&v| v as f32 / 64.0).collect(),
        bias: (r.range(0, 1) == 1).then(|| (0..q.c_out).map(|_| r.unit() * 4.0 - 2.0).collect()),
        clamp,
    };
    let x: Vec<f32> = (0..n * h * w * spec.c_in).map(|_| r.unit() * 2.0 - 1.0).collect();
    let (want, mag) = fconv_reference(&spec, &x, [n, h, w]);
    let conv = FConv::new(spec, isa).unwrap();
    let mut got = vec![f32::NAN; want.len()];
    conv.run(&x, n, h, w, &mut got).unwrap();
    for (i, ((&g, &e), &m)) in got.iter().zip(&want).zip(&mag).enumerate() {
        assert!((g as f64 - e).abs() <= 1e-5 * (1.0 + m), "{what}: {conv:?} element {i}: {g} vs {e}");
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

/// A float CNN with every pattern of `onnx::f32_kernels` (Conv+Clip, depthwise Conv+Relu, residual Add, MaxPool,
/// Dropout, a fire module's fused convolutions + Concat, Concat, GlobalAveragePool, Gemm) runs on the kernels and matches the graph as written (tract's ops, reached
/// through the fallback by asking for a value the kernels fuse away).
#[test]
fn lowered_f32_graph_equals_the_graph_as_written() {
    let mut r = Rng(0x00f3_2f32);
    let mut w = |name: &str, dims: &[i64]| {
        let n: i64 = dims.iter().product();
        tensor_f32(name, dims, &(0..n).map(|_| r.unit() - 0.5).collect::<Vec<_>>())
    };
    let inits = vec![
        w("w1", &[8, 3, 3, 3]),
        w("b1", &[8]),
        w("wd", &[8, 1, 3, 3]),
        w("w2", &[8, 8, 1, 1]),
        w("w3", &[6, 8, 3, 3]),
        w("wg", &[5, 22]),
        w("bg", &[5]),
        tensor_f32("lo", &[], &[0.0]),
        tensor_f32("hi", &[], &[6.0]),
    ];
    let nodes = vec![
        node("Conv", "c1", &["x", "w1", "b1"], &["a1"], vec![attr_ints("pads", &[1, 1, 1, 1])]),
        node("Clip", "clip1", &["a1", "lo", "hi"], &["a2"], vec![]),
        node("Conv", "dw", &["a2", "wd"], &["d1"], vec![attr_int("group", 8), attr_ints("pads", &[1, 0, 1, 2])]),
        node("Relu", "relu", &["d1"], &["d2"], vec![]),
        node("Conv", "pw", &["d2", "w2"], &["p1"], vec![attr_ints("strides", &[1, 1])]),
        node("Add", "res", &["p1", "a2"], &["s"], vec![]),
        node("MaxPool", "mp", &["s"], &["m"], vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("strides", &[2, 2])]),
        node("Dropout", "drop", &["m"], &["m2"], vec![]),
        // A fire module: two convolutions of one input, concatenated (fused: each writes its channels).
        node("Conv", "c3", &["m2", "w3"], &["e"], vec![attr_ints("pads", &[1, 1, 1, 1])]),
        node("Conv", "f1", &["m2", "w2"], &["f"], vec![]),
        node("Relu", "f1relu", &["f"], &["fr"], vec![]),
        node("Concat", "fire", &["fr", "e"], &["fire"], vec![attr_int("axis", 1)]),
        node("Concat", "cat", &["fire", "m2"], &["cat"], vec![attr_int("axis", 1)]),
        node("GlobalAveragePool", "gap", &["cat"], &["y"], vec![]),
        node("Flatten", "flat", &["y"], &["flat"], vec![]),
        node("Gemm", "fc", &["flat", "wg", "bg"], &["logits"], vec![attr_int("transB", 1)]),
    ];
    let m = model(
        nodes,
        vec![value_info("x", 1, &[Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(13), Dim::Fixed(11)])],
        vec![
            value_info("y", 1, &[Dim::Fixed(2), Dim::Fixed(22), Dim::Fixed(1), Dim::Fixed(1)]),
            value_info("logits", 1, &[Dim::Fixed(2), Dim::Fixed(5)]),
        ],
        inits,
    );
    let mut lowered = m.clone();
    assert_eq!(lowered.lower_f32_kernels(), 9, "every pattern becomes a kernel (fire module: one)");
    let ops: Vec<&str> = lowered.graph.nodes.iter().map(|n| n.op()).collect();
    assert!(!ops.contains(&"Conv") && !ops.contains(&"Dropout"), "{ops:?}");
    assert_eq!(ops.iter().filter(|o| **o == "EpConvConcat").count(), 1, "{ops:?}");
    let x: Vec<f32> = (0..2 * 3 * 13 * 11).map(|_| r.unit() * 2.0 - 1.0).collect();
    for threads in [1, 2] {
        let s = Session::from_model(&m, &SessionOptions { threads, ..Default::default() }).unwrap();
        let input = || vec![("x".to_string(), Tensor::from_f32(vec![2, 3, 13, 11], x.clone()).unwrap())];
        let fast = s.run(input()).unwrap();
        // "a1" (the Conv output before its fused Clip) exists only in the graph as written.
        let slow = s.run_values(input(), &["y", "logits", "a1"]).unwrap();
        for (i, len) in [(0, 44), (1, 10)] {
            let (f, w) = (fast[i].1.to_f32_vec(), slow[i].1.to_f32_vec());
            assert_eq!(f.len(), len);
            for (a, b) in f.iter().zip(&w) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "threads {threads}, output {i}: {f:?} vs {w:?}");
            }
        }
    }
}
