//! Property tests: the QDQ lowering run by the CPU backend equals the scalar reference over random shapes,
//! groups, strides, dilations, pads, zero points and scales; the float lowering equals the graph as written.
use edgepack_runtime::kernels::reference::Rng;
use edgepack_runtime::kernels::reference::{self, Conv2d};
use edgepack_runtime::onnx::builder::*;
use edgepack_runtime::onnx::{Dim, Model, NodeExt, TensorProto, node};
use edgepack_runtime::onnx::{F32Kernels, QdqInteger, QdqKernels};
use edgepack_runtime::{DType, Session, SessionOptions, Tensor};

/// The initializers of a QDQ weighted node's weights and bias: int8 `wq` of shape `dims` at per-output-channel
/// scales `sw` (zero points `zw`, all 0) and int32 `bq` at scales `s_x·s_w` (`sb`).
fn qdq_weights(dims: &[i64], wq: &[i8], s_w: &[f32], bias: &[i32], s_x: f32) -> Vec<TensorProto> {
    let c_out = s_w.len();
    vec![
        tensor_raw("wq", dims, 3, wq.iter().map(|&v| v as u8).collect()),
        tensor_f32("sw", &[c_out as i64], s_w),
        tensor_raw("zw", &[c_out as i64], 3, vec![0; c_out]),
        tensor_raw("bq", &[c_out as i64], 6, bias.iter().flat_map(|v| v.to_le_bytes()).collect()),
        tensor_f32("sb", &[c_out as i64], &s_w.iter().map(|s| s_x * s).collect::<Vec<_>>()),
    ]
}

fn run_u8(m: &Model, input: Tensor) -> Vec<u8> {
    let s = Session::from_model(m, &SessionOptions { threads: 1, ..Default::default() }).unwrap();
    u8_data(&s.run_one(input).unwrap()[0].1)
}

fn u8_data(t: &Tensor) -> Vec<u8> {
    match t.data() {
        edgepack_runtime::TensorData::U8(v) => v.clone(),
        _ => panic!("expected u8 output, got {:?}", t.dtype()),
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
            vec![tensor_f32("sx", &[], &[s_x]), tensor_raw("zx", &[], 2, vec![z_x])]
                .into_iter()
                .chain(qdq_weights(
                    &[c_out as i64, (c_in / group) as i64, kernel[0] as i64, kernel[1] as i64],
                    &wq,
                    &s_w,
                    &bias,
                    s_x,
                ))
                .chain([tensor_f32("sy", &[], &[s_y]), tensor_raw("zy", &[], 2, vec![z_y])])
                .collect(),
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
            vec![tensor_f32("sx", &[], &[s_x]), tensor_raw("zx", &[], 2, vec![z_x])]
                .into_iter()
                .chain(qdq_weights(&[c_out as i64, k as i64], &wq, &s_w, &bias, s_x))
                .chain([tensor_f32("sy", &[], &[s_y]), tensor_raw("zy", &[], 2, vec![z_y])])
                .collect(),
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

/// The kernel ops a session's plan runs for `input` (tract's names of edgepack's kernel nodes start with `Ep`): a
/// plan that fell back to the graph as written runs none, and comparing it with the graph as written would test
/// nothing.
fn kernel_ops(s: &Session, input: Vec<(String, Tensor)>) -> Vec<String> {
    s.profile(input, 1).unwrap().into_iter().map(|t| t.op).filter(|op| op.starts_with("Ep")).collect()
}

/// At 1 and 2 threads, `m` on `x` (its input "x", of `shape`): the plan runs each of `kernels`, and every model output
/// has its length in `lens` and equals the graph as written within `tol` relative. The graph as written is what
/// answers a request that also asks for `fused_away`, a value the kernels fuse away (a convolution's output before
/// its fused activation).
fn assert_kernels_equal_the_graph(
    m: &Model,
    shape: &[usize],
    x: &[f32],
    lens: &[usize],
    fused_away: &str,
    kernels: &[&str],
    tol: f32,
) {
    let names: Vec<String> = m.graph.outputs.iter().filter_map(|o| o.name.clone()).collect();
    let mut asked: Vec<&str> = names.iter().map(|v| v.as_str()).collect();
    asked.push(fused_away);
    for threads in [1, 2] {
        let s = Session::from_model(m, &SessionOptions { threads, ..Default::default() }).unwrap();
        let input = || vec![("x".to_string(), Tensor::from_f32(shape.to_vec(), x.to_vec()).unwrap())];
        let ran = kernel_ops(&s, input());
        for k in kernels {
            assert!(ran.iter().any(|o| o == k), "threads {threads}: {k} did not run: {ran:?}");
        }
        let fast = s.run(input()).unwrap();
        let slow = s.run_values(input(), &asked).unwrap();
        for (i, &len) in lens.iter().enumerate() {
            let (f, w) = (fast[i].1.to_f32_vec(), slow[i].1.to_f32_vec());
            assert_eq!((f.len(), w.len()), (len, len), "threads {threads}, output {i}");
            for (a, b) in f.iter().zip(&w) {
                assert!((a - b).abs() <= tol * (1.0 + b.abs()), "threads {threads}, output {i}: {a} vs {b}");
            }
        }
    }
}

// ---- fast kernels (qconv, qelem) against the scalar reference, for every ISA this CPU has ----

/// A float CNN with every pattern of `onnx::f32_kernels` (Conv+Clip, depthwise Conv+Relu, residual Add + Relu,
/// MaxPool, Dropout, Conv+SiLU and an Add after it, a fire module's fused convolutions + Concat, Concat,
/// GlobalAveragePool, Gemm) runs on the kernels and matches the graph as written (tract's ops, reached through the
/// fallback by asking for a value the kernels fuse away).
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
        node("Add", "res", &["p1", "a2"], &["s0"], vec![]),
        node("Relu", "resrelu", &["s0"], &["s"], vec![]),
        node("MaxPool", "mp", &["s"], &["m"], vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("strides", &[2, 2])]),
        node("Dropout", "drop", &["m"], &["m1"], vec![]),
        // A convolution with SiLU written out (YOLO's), and a residual Add after it: the Add cannot go into that
        // convolution's output stage (it comes after the activation).
        node("Conv", "sc", &["m1", "w2"], &["sv"], vec![]),
        node("Sigmoid", "sig", &["sv"], &["sg"], vec![]),
        node("Mul", "silu", &["sg", "sv"], &["sl"], vec![]),
        node("Add", "sres", &["sl", "m1"], &["m2"], vec![]),
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
    assert_eq!(lowered.lower_f32_kernels(), 9, "every pattern becomes a kernel (fire module: one; dw + pw + res: one)");
    let ops: Vec<&str> = lowered.graph.nodes.iter().map(|n| n.op()).collect();
    assert!(!ops.contains(&"Conv") && !ops.contains(&"Dropout"), "{ops:?}");
    assert_eq!(ops.iter().filter(|o| **o == "EpConvConcat").count(), 1, "{ops:?}");
    // The residual Add is the projection's output stage, the projection the depthwise convolution's chain:
    // `EpConvChain(a2, a2)`; the Add after the SiLU stays `EpAdd`.
    assert_eq!(ops.iter().filter(|o| **o == "EpAdd").count(), 1, "{ops:?}");
    assert!(!ops.contains(&"Sigmoid") && !ops.contains(&"Mul"), "{ops:?}");
    assert_eq!(lowered.graph.nodes.iter().filter(|n| n.attr_s("act") == Some("silu")).count(), 1, "{ops:?}");
    let chain = |n: &&edgepack_runtime::onnx::NodeProto| n.op() == "EpConvChain" && n.input.len() == 2;
    assert_eq!(lowered.graph.nodes.iter().filter(chain).count(), 1, "{ops:?}");
    // The Relu after the sum is the projection's clamp.
    assert!(!ops.contains(&"Relu"), "{ops:?}");
    let res = lowered.graph.nodes.iter().find(chain).unwrap();
    assert_eq!(res.attr_i("convs"), Some(2));
    assert_eq!(
        res.attribute.iter().find(|a| a.name.as_deref() == Some("clamp_1")).unwrap().floats,
        [0.0, f32::INFINITY]
    );
    let x: Vec<f32> = (0..2 * 3 * 13 * 11).map(|_| r.unit() * 2.0 - 1.0).collect();
    assert_kernels_equal_the_graph(&m, &[2, 3, 13, 11], &x, &[44, 10], "a1", &["EpConvConcat", "EpGemm"], 1e-4);
}

/// Inverted-residual blocks (MobileNetV2's, EfficientNet's: a 1×1 expansion, a depthwise convolution, a 1×1
/// projection, each read only by the next, the block's input added to the last) become one `EpConvChain`, run row
/// by row: with and without the residual, strides 1 and 2, 3×3 and 5×5 windows, an expansion wide enough that the
/// fused walk runs (not the convolutions one after the other), a batch of two; equal to the graph as written.
#[test]
fn lowered_inverted_residual_blocks_run_as_chains() {
    let mut r = Rng(0xc4a1);
    let mut w = |name: &str, dims: &[i64]| {
        let n = dims.iter().product::<i64>() as usize;
        let v: Vec<f32> = (0..n).map(|_| (r.unit() - 0.5) * 0.5).collect();
        tensor_f32(name, dims, &v)
    };
    let inits = vec![
        w("ws", &[8, 3, 3, 3]),
        w("we", &[48, 8, 1, 1]),
        w("be", &[48]),
        w("wd", &[48, 1, 3, 3]),
        w("bd", &[48]),
        w("wp", &[8, 48, 1, 1]),
        w("bp", &[8]),
        w("we2", &[40, 8, 1, 1]),
        w("wd2", &[40, 1, 5, 5]),
        w("wp2", &[16, 40, 1, 1]),
        tensor_f32("lo", &[], &[0.0]),
        tensor_f32("hi", &[], &[6.0]),
    ];
    let nodes = vec![
        // A stem: the residual is a kernel output.
        node("Conv", "st", &["x", "ws"], &["x0"], vec![attr_ints("pads", &[1, 1, 1, 1])]),
        // Block 1: stride 1, residual.
        node("Conv", "e1", &["x0", "we", "be"], &["a1"], vec![]),
        node("Clip", "e1c", &["a1", "lo", "hi"], &["a2"], vec![]),
        node("Conv", "d1", &["a2", "wd", "bd"], &["b1"], vec![attr_int("group", 48), attr_ints("pads", &[1, 1, 1, 1])]),
        node("Clip", "d1c", &["b1", "lo", "hi"], &["b2"], vec![]),
        node("Conv", "p1", &["b2", "wp", "bp"], &["c1"], vec![]),
        node("Add", "r1", &["c1", "x0"], &["s1"], vec![]),
        // Block 2: stride 2, 5×5, no residual, no biases.
        node("Conv", "e2", &["s1", "we2"], &["a3"], vec![]),
        node("Relu", "e2r", &["a3"], &["a4"], vec![]),
        node(
            "Conv",
            "d2",
            &["a4", "wd2"],
            &["b3"],
            vec![attr_int("group", 40), attr_ints("pads", &[2, 2, 2, 2]), attr_ints("strides", &[2, 2])],
        ),
        node("Relu", "d2r", &["b3"], &["b4"], vec![]),
        node("Conv", "p2", &["b4", "wp2"], &["y"], vec![]),
    ];
    let (h, wd) = (41, 39);
    let m = model(
        nodes,
        vec![value_info("x", 1, &[Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(h), Dim::Fixed(wd)])],
        vec![value_info("y", 1, &[Dim::Fixed(2), Dim::Fixed(16), Dim::Fixed(21), Dim::Fixed(20)])],
        inits,
    );
    let mut lowered = m.clone();
    assert_eq!(lowered.lower_f32_kernels(), 3, "the stem, one chain per block");
    let chains: Vec<_> = lowered.graph.nodes.iter().filter(|n| n.op() == "EpConvChain").collect();
    assert_eq!(
        chains.iter().map(|n| (n.attr_i("convs"), n.input.len())).collect::<Vec<_>>(),
        [(Some(3), 2), (Some(3), 1)]
    );
    let x: Vec<f32> = (0..2 * 3 * h * wd).map(|_| r.unit() * 2.0 - 1.0).collect();
    assert_kernels_equal_the_graph(&m, &[2, 3, h, wd], &x, &[2 * 16 * 21 * 20], "a1", &["EpConvChain"], 1e-4);
    // One channel (a block pruned to one): group 1 is an ordinary 3×3 convolution there, not a chain's depthwise.
    let one = model(
        vec![
            node("Conv", "e", &["x", "w1"], &["a"], vec![]),
            node("Conv", "d", &["a", "w3"], &["b"], vec![attr_int("group", 1), attr_ints("pads", &[1, 1, 1, 1])]),
            node("Conv", "p", &["b", "w1"], &["y"], vec![]),
        ],
        vec![value_info("x", 1, &[Dim::Fixed(1), Dim::Fixed(1), Dim::Fixed(9), Dim::Fixed(9)])],
        vec![value_info("y", 1, &[Dim::Fixed(1), Dim::Fixed(1), Dim::Fixed(9), Dim::Fixed(9)])],
        vec![tensor_f32("w1", &[1, 1, 1, 1], &[0.5]), tensor_f32("w3", &[1, 1, 3, 3], &[0.1; 9])],
    );
    let mut lowered = one.clone();
    assert_eq!(lowered.lower_f32_kernels(), 3);
    assert!(lowered.graph.nodes.iter().all(|n| n.op() != "EpConvChain"));
    let x: Vec<f32> = (0..81).map(|i| i as f32 / 81.0).collect();
    assert_kernels_equal_the_graph(&one, &[1, 1, 9, 9], &x, &[81], "a", &["EpConv"], 1e-5);
}

/// PP-LCNetV3's blocks (PP-OCR): constant `Mul`/`Add` after a convolution (a scalar and a per-channel one) folded
/// into its weights and bias, HardSwish in its three spellings (written out as `Add`/`Clip`/`Mul`/`Div`, the op,
/// `Mul(v, HardSigmoid(v))`) as the activation, a scalar `Mul`/`Add` after it as the output stage's affine, a
/// squeeze-and-excitation block (its bias a constant `Reshape`, folded; a HardSigmoid gate; `EpScale`); the
/// kernels match the graph as written. A `Mul` whose input has two readers is not folded.
#[test]
fn lowered_affine_and_hardswish_equal_the_graph_as_written() {
    let mut r = Rng(0x4a2d_5e11);
    let mut w = |name: &str, dims: &[i64]| {
        let n: i64 = dims.iter().product();
        tensor_f32(name, dims, &(0..n).map(|_| r.unit() - 0.5).collect::<Vec<_>>())
    };
    let inits = vec![
        w("w1", &[8, 3, 3, 3]),
        w("b1", &[8]),
        w("pc", &[8, 1, 1]),
        w("wd", &[8, 1, 3, 3]),
        w("w2", &[6, 8, 1, 1]),
        tensor_f32("s1", &[1], &[1.7]),
        tensor_f32("s2", &[1], &[0.4]),
        tensor_f32("t2", &[1], &[-0.3]),
        tensor_f32("s3", &[], &[2.2]),
        tensor_f32("three", &[], &[3.0]),
        tensor_f32("six", &[1], &[6.0]),
        tensor_f32("lo", &[], &[0.0]),
        tensor_f32("hi", &[], &[6.0]),
    ];
    let nodes = vec![
        node("Conv", "c1", &["x", "w1", "b1"], &["a1"], vec![attr_ints("pads", &[1, 1, 1, 1])]),
        node("Mul", "m1", &["s1", "a1"], &["a2"], vec![]),
        node("Add", "p1", &["a2", "pc"], &["a3"], vec![]),
        node("Add", "hs_add", &["a3", "three"], &["h1"], vec![]),
        node("Clip", "hs_clip", &["h1", "lo", "hi"], &["h2"], vec![]),
        node("Mul", "hs_mul", &["a3", "h2"], &["h3"], vec![]),
        node("Div", "hs_div", &["h3", "six"], &["h4"], vec![]),
        node("Mul", "m2", &["s2", "h4"], &["h5"], vec![]),
        node("Add", "p2", &["h5", "t2"], &["h6"], vec![]),
        node("Conv", "dw", &["h6", "wd"], &["d1"], vec![attr_int("group", 8), attr_ints("pads", &[1, 1, 1, 1])]),
        node("Mul", "m3", &["d1", "s3"], &["d2"], vec![]),
        node("HardSwish", "hs", &["d2"], &["d3"], vec![]),
        node("Conv", "c2", &["d3", "w2"], &["e1"], vec![]),
        node("HardSigmoid", "hsig", &["e1"], &["e2"], vec![attr_float("alpha", 1.0 / 6.0), attr_float("beta", 0.5)]),
        node("Mul", "hs3", &["e1", "e2"], &["e3"], vec![]),
        // A squeeze-and-excitation block: the gate (one pixel per channel) scales the image.
        node("GlobalAveragePool", "se_pool", &["e3"], &["g1"], vec![]),
        // Its bias as exporters write it: a per-channel Add of a constant Reshape.
        node("Conv", "se1", &["g1", "w_se1"], &["g2a"], vec![]),
        node("Reshape", "se_bias", &["b_se1", "se_shape"], &["b_r"], vec![]),
        node("Add", "se_add", &["g2a", "b_r"], &["g2"], vec![]),
        node("Relu", "se_relu", &["g2"], &["g3"], vec![]),
        node("Conv", "se2", &["g3", "w_se2"], &["g4"], vec![]),
        node("HardSigmoid", "se_gate", &["g4"], &["g5"], vec![attr_float("alpha", 0.2), attr_float("beta", 0.5)]),
        node("Mul", "se", &["g5", "e3"], &["e4"], vec![]),
        // Read twice: stays a Mul outside the kernels.
        node("Conv", "c3", &["e4", "w2_sq"], &["f1"], vec![]),
        node("Mul", "m4", &["f1", "s1"], &["y"], vec![]),
        node("Relu", "side", &["f1"], &["z"], vec![]),
    ];
    let mut inits = inits;
    inits.push(w("w2_sq", &[6, 6, 1, 1]));
    inits.push(w("w_se1", &[2, 6, 1, 1]));
    inits.push(w("b_se1", &[2]));
    inits.push(tensor_i64("se_shape", &[4], &[1, -1, 1, 1]));
    inits.push(w("w_se2", &[6, 2, 1, 1]));
    let m = model(
        nodes,
        vec![value_info("x", 1, &[Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(9), Dim::Fixed(10)])],
        vec![
            value_info("y", 1, &[Dim::Fixed(2), Dim::Fixed(6), Dim::Fixed(9), Dim::Fixed(10)]),
            value_info("z", 1, &[Dim::Fixed(2), Dim::Fixed(6), Dim::Fixed(9), Dim::Fixed(10)]),
        ],
        inits,
    );
    let mut m = m;
    m.set_opset("", 14); // HardSwish
    let mut lowered = m.clone();
    assert_eq!(lowered.lower_f32_kernels(), 7, "six convolutions (dw and c2 one chain), the pool and the gate's Mul");
    let ops: Vec<&str> = lowered.graph.nodes.iter().map(|n| n.op()).collect();
    for gone in ["Conv", "Add", "Clip", "Div", "HardSwish", "HardSigmoid", "GlobalAveragePool", "Reshape"] {
        assert!(!ops.contains(&gone), "{gone}: {ops:?}");
    }
    assert_eq!(ops.iter().filter(|o| **o == "Mul").count(), 1, "only the Mul of a value read twice: {ops:?}");
    let acts: Vec<Option<&str>> =
        lowered.graph.nodes.iter().filter(|n| n.op() == "EpConv").map(|n| n.attr_s("act")).collect();
    let hardswish = Some("hardswish");
    assert_eq!(acts, [hardswish, None, Some("hardsigmoid"), None], "{ops:?}");
    let chain = lowered.graph.nodes.iter().find(|n| n.op() == "EpConvChain").expect("dw and c2 as a chain");
    assert_eq!([chain.attr_s("act_0"), chain.attr_s("act_1")], [hardswish; 2]);
    assert_eq!(ops.iter().filter(|o| **o == "EpScale").count(), 1, "{ops:?}");
    let affine: Vec<&[f32]> =
        lowered.graph.nodes.iter().filter_map(|n| n.attr("affine")).map(|a| a.floats.as_slice()).collect();
    assert_eq!(affine, [&[0.4f32, -0.3][..]]);
    let x: Vec<f32> = (0..2 * 3 * 9 * 10).map(|_| r.unit() * 8.0 - 4.0).collect();
    let kernels = ["EpScale", "EpConv", "EpConvChain"];
    assert_kernels_equal_the_graph(&m, &[2, 3, 9, 10], &x, &[2 * 6 * 9 * 10; 2], "a1", &kernels, 1e-4);
}

/// Nearest-neighbour `Resize` by whole factors between kernels (an FPN's top-down path) becomes `EpUpsample` in the
/// modes where it picks pixel `(oy / sh, ox / sw)` (asymmetric/floor, half_pixel with the default rounding), and
/// equals tract's Resize; a fractional factor and the `round_prefer_floor` asymmetric mode stay Resize.
#[test]
fn lowered_upsample_equals_resize() {
    let mut r = Rng(0x5ca1_ab1e);
    let mut w = |name: &str, dims: &[i64]| {
        let n: i64 = dims.iter().product();
        tensor_f32(name, dims, &(0..n).map(|_| r.unit() - 0.5).collect::<Vec<_>>())
    };
    let inits = vec![
        w("w1", &[5, 3, 3, 3]),
        w("w2", &[4, 5, 1, 1]),
        tensor_f32("roi", &[0], &[]),
        tensor_f32("s23", &[4], &[1.0, 1.0, 2.0, 3.0]),
        tensor_f32("s44", &[4], &[1.0, 1.0, 4.0, 4.0]),
        tensor_f32("s15", &[4], &[1.0, 1.0, 1.5, 1.5]),
    ];
    let resize = |name: &str, x: &str, s: &str, y: &str, ctm: Option<&str>, nearest: Option<&str>| {
        let mut a = vec![attr_string("mode", "nearest")];
        a.extend(ctm.map(|v| attr_string("coordinate_transformation_mode", v)));
        a.extend(nearest.map(|v| attr_string("nearest_mode", v)));
        node("Resize", name, &[x, "roi", s], &[y], a)
    };
    let nodes = vec![
        node("Conv", "c1", &["x", "w1"], &["a0"], vec![attr_ints("pads", &[1, 1, 1, 1])]),
        node("Relu", "r1", &["a0"], &["a"], vec![]),
        resize("up1", "a", "s23", "b", Some("asymmetric"), Some("floor")),
        node("Conv", "c2", &["b", "w2"], &["c"], vec![]),
        resize("up2", "c", "s44", "d", None, None),
        node("Relu", "relu", &["d"], &["y"], vec![]),
        resize("up3", "a", "s15", "e", Some("asymmetric"), Some("floor")),
        resize("up4", "a", "s44", "f", Some("asymmetric"), Some("round_prefer_floor")),
        node("Concat", "cat", &["e", "e"], &["z"], vec![attr_int("axis", 1)]),
    ];
    let mut m = model(
        nodes,
        vec![value_info("x", 1, &[Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(5), Dim::Fixed(7)])],
        vec![
            value_info("y", 1, &[Dim::Fixed(2), Dim::Fixed(4), Dim::Fixed(40), Dim::Fixed(84)]),
            value_info("z", 1, &[Dim::Fixed(2), Dim::Fixed(10), Dim::Fixed(7), Dim::Fixed(10)]),
            value_info("f", 1, &[Dim::Fixed(2), Dim::Fixed(5), Dim::Fixed(20), Dim::Fixed(28)]),
        ],
        inits,
    );
    m.set_opset("", 13);
    let mut lowered = m.clone();
    lowered.lower_f32_kernels();
    let ops: Vec<&str> = lowered.graph.nodes.iter().map(|n| n.op()).collect();
    assert_eq!(ops.iter().filter(|o| **o == "EpUpsample").count(), 2, "{ops:?}");
    assert_eq!(ops.iter().filter(|o| **o == "Resize").count(), 2, "{ops:?}");
    let x: Vec<f32> = (0..2 * 3 * 5 * 7).map(|_| r.unit() * 2.0 - 1.0).collect();
    assert_kernels_equal_the_graph(
        &m,
        &[2, 3, 5, 7],
        &x,
        &[2 * 4 * 40 * 84, 2 * 10 * 7 * 10, 2 * 5 * 20 * 28],
        "a0",
        &["EpUpsample"],
        1e-5,
    );
}

/// A DB text detector's head: `ConvTranspose` whose stride is its kernel (2×2 and 2×3), its bias Add, a
/// BatchNormalization and a Relu, then a sigmoid, on the kernels (`EpConvTranspose`, the stage folded), equal to
/// the graph as written; an overlapping ConvTranspose (stride 1) stays tract's.
#[test]
fn lowered_conv_transpose_equals_the_graph_as_written() {
    let mut r = Rng(0xdb_2024);
    let mut w = |name: &str, dims: &[i64], lo: f32| {
        let n: i64 = dims.iter().product();
        tensor_f32(name, dims, &(0..n).map(|_| r.unit() - 0.5 + lo).collect::<Vec<_>>())
    };
    let inits = vec![
        w("w1", &[6, 3, 3, 3], 0.0),
        w("t1", &[6, 5, 2, 3], 0.0),
        w("tb1", &[5], 0.0),
        w("ab", &[1, 5, 1, 1], 0.0),
        w("gamma", &[5], 1.0),
        w("beta", &[5], 0.0),
        w("mean", &[5], 0.0),
        w("var", &[5], 1.0),
        w("t2", &[5, 1, 2, 2], 0.0),
        w("ab2", &[1, 1, 1, 1], 0.0),
        w("t3", &[6, 4, 3, 3], 0.0),
    ];
    let nodes = vec![
        node("Conv", "c1", &["x", "w1"], &["a0"], vec![attr_ints("pads", &[1, 1, 1, 1])]),
        node("Relu", "r1", &["a0"], &["a"], vec![]),
        node("ConvTranspose", "up1", &["a", "t1", "tb1"], &["b0"], vec![attr_ints("strides", &[2, 3])]),
        node("Add", "bias1", &["b0", "ab"], &["b1"], vec![]),
        node("BatchNormalization", "bn", &["b1", "gamma", "beta", "mean", "var"], &["b2"], vec![]),
        node("Relu", "r2", &["b2"], &["b3"], vec![]),
        node(
            "ConvTranspose",
            "up2",
            &["b3", "t2"],
            &["c0"],
            vec![attr_ints("strides", &[2, 2]), attr_ints("kernel_shape", &[2, 2])],
        ),
        node("Add", "bias2", &["c0", "ab2"], &["c1"], vec![]),
        node("Sigmoid", "sig", &["c1"], &["y"], vec![]),
        node("ConvTranspose", "same", &["a", "t3"], &["z"], vec![attr_ints("pads", &[1, 1, 1, 1])]),
    ];
    let mut m = model(
        nodes,
        vec![value_info("x", 1, &[Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(5), Dim::Fixed(7)])],
        vec![
            value_info("y", 1, &[Dim::Fixed(2), Dim::Fixed(1), Dim::Fixed(20), Dim::Fixed(42)]),
            value_info("z", 1, &[Dim::Fixed(2), Dim::Fixed(4), Dim::Fixed(5), Dim::Fixed(7)]),
        ],
        inits,
    );
    m.set_opset("", 13);
    let mut lowered = m.clone();
    lowered.lower_f32_kernels();
    let ops: Vec<&str> = lowered.graph.nodes.iter().map(|n| n.op()).collect();
    assert_eq!(ops.iter().filter(|o| **o == "EpConvTranspose").count(), 2, "{ops:?}");
    assert_eq!(ops.iter().filter(|o| **o == "ConvTranspose").count(), 1, "{ops:?}");
    for gone in ["Add", "BatchNormalization", "Relu", "Sigmoid"] {
        assert!(!ops.contains(&gone), "{gone}: {ops:?}");
    }
    let x: Vec<f32> = (0..2 * 3 * 5 * 7).map(|_| r.unit() * 2.0 - 1.0).collect();
    assert_kernels_equal_the_graph(
        &m,
        &[2, 3, 5, 7],
        &x,
        &[2 * 20 * 42, 2 * 4 * 5 * 7],
        "a0",
        &["EpConvTranspose"],
        1e-5,
    );
}

/// A kernel graph that does not plan at some input shape (here an image smaller than the kernel MaxPool's window)
/// runs as the graph as written at that shape, and on the kernels at the others.
#[test]
fn a_shape_the_kernels_refuse_runs_the_graph_as_written() {
    let inits = vec![tensor_f32("w", &[4, 3, 1, 1], &[0.5; 12])];
    let nodes = vec![
        node("Conv", "c", &["x", "w"], &["a"], vec![]),
        node("Relu", "r", &["a"], &["b"], vec![]),
        node("MaxPool", "mp", &["b"], &["y"], vec![attr_ints("kernel_shape", &[2, 2]), attr_ints("strides", &[2, 2])]),
    ];
    let dims = [Dim::Symbolic("n".into()), Dim::Fixed(3), Dim::Symbolic("h".into()), Dim::Symbolic("w".into())];
    let m = model(nodes, vec![value_info("x", 1, &dims)], vec![value_info("y", 1, &dims)], inits);
    let s = Session::from_model(&m, &SessionOptions { threads: 1, ..Default::default() }).unwrap();
    let input = |h: usize| vec![("x".to_string(), Tensor::from_f32(vec![1, 3, h, h], vec![1.0; 3 * h * h]).unwrap())];
    // tract's MaxPool gives a 1×1 image the window's partial max here.
    let y = s.run(input(1)).unwrap();
    assert_eq!(y[0].1.shape()[..2], [1, 4]);
    assert!(kernel_ops(&s, input(1)).is_empty());
    let y = s.run(input(4)).unwrap();
    assert_eq!((y[0].1.shape(), y[0].1.to_f32_vec()), (&[1, 4, 2, 2][..], vec![1.5; 16]));
    assert!(kernel_ops(&s, input(4)).iter().any(|o| o == "EpMaxPool"));
}

/// `Softmax` on the kernels (`EpSoftmax`) equals its definition for the opset the model imports: before opset 13
/// the dimensions from `axis` on are one row (any axis), from 13 on only the last axis is lowered (another axis
/// stays tract's Softmax); short rows (a detector's 2-class scores) and enough of them to split across threads.
#[test]
fn lowered_softmax_equals_its_definition() {
    let mut r = Rng(0x0050_f73a);
    // (opset, shape, axis attribute, lowered)
    let cases: [(i64, &[usize], Option<i64>, bool); 6] = [
        (9, &[1, 20_000, 2], Some(2), true),
        (11, &[2, 5, 3], Some(1), true),
        (11, &[4, 7], None, true),
        (13, &[3, 4, 9], None, true),
        (13, &[2, 6, 17], Some(-1), true),
        (13, &[2, 6, 5], Some(1), false),
    ];
    for (opset, shape, axis, lowered) in cases {
        let attrs = axis.map(|a| vec![attr_int("axis", a)]).unwrap_or_default();
        let dims: Vec<Dim> = shape.iter().map(|&d| Dim::Fixed(d)).collect();
        let mut m = model(
            vec![node("Softmax", "sm", &["x"], &["y"], attrs)],
            vec![value_info("x", 1, &dims)],
            vec![value_info("y", 1, &dims)],
            vec![],
        );
        m.set_opset("", opset);
        let mut k = m.clone();
        k.lower_f32_kernels();
        let ops: Vec<&str> = k.graph.nodes.iter().map(|n| n.op()).collect();
        assert_eq!(ops == ["EpSoftmax"], lowered, "opset {opset} {shape:?} axis {axis:?}: {ops:?}");
        // The definition: rows over the dimensions from `a` on (before 13), or over axis `a` alone (13 on).
        let rank = shape.len() as i64;
        let a = axis.unwrap_or(if opset < 13 { 1 } else { -1 });
        let a = (if a < 0 { a + rank } else { a }) as usize;
        let x: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| r.unit() * 20.0 - 10.0).collect();
        let (outer, len, inner) = if opset < 13 {
            (shape[..a].iter().product::<usize>(), shape[a..].iter().product::<usize>(), 1)
        } else {
            (shape[..a].iter().product(), shape[a], shape[a + 1..].iter().product::<usize>())
        };
        let mut want = vec![0f64; x.len()];
        for o in 0..outer {
            for i in 0..inner {
                let at = |j: usize| (o * len + j) * inner + i;
                let max = (0..len).map(|j| x[at(j)] as f64).fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = (0..len).map(|j| (x[at(j)] as f64 - max).exp()).sum();
                for j in 0..len {
                    want[at(j)] = (x[at(j)] as f64 - max).exp() / sum;
                }
            }
        }
        for threads in [1, 2] {
            let s = Session::from_model(&m, &SessionOptions { threads, ..Default::default() }).unwrap();
            let y = s.run_one(Tensor::from_f32(shape.to_vec(), x.clone()).unwrap()).unwrap()[0].1.to_f32_vec();
            for (i, (&g, &w)) in y.iter().zip(&want).enumerate() {
                assert!((g as f64 - w).abs() <= 1e-6 * (1.0 + w), "opset {opset} {shape:?} [{i}]: {g} vs {w}");
            }
        }
    }
}

/// A QDQ graph's float Softmax (a detector's decode kept in fp32 after its integer layers) runs on `EpSoftmax`
/// too, beside the integer lowering, and equals its definition on the dequantized values.
#[test]
fn a_qdq_graph_s_float_softmax_runs_on_the_kernel() {
    use edgepack_runtime::onnx::LowerForCpu;
    let mut r = Rng(0x050f_70dd);
    // A quantized 1×1 convolution (an NHWC integer-kernel chain), its output dequantized and a Softmax over the
    // last axis.
    let (c_in, c_out, h, w) = (4usize, 5usize, 6usize, 9usize);
    let g = Conv2d { group: 1, kernel: [1, 1], stride: [1, 1], dilation: [1, 1], pads: [0; 4] };
    let x: Vec<u8> = (0..c_in * h * w).map(|_| r.range(0, 255) as u8).collect();
    let wq: Vec<i8> = (0..c_out * c_in).map(|_| r.range(-127, 127) as i8).collect();
    let bias: Vec<i32> = (0..c_out).map(|_| r.range(-500, 500) as i32).collect();
    let (s_x, z_x, s_y, z_y) = (0.02f32, 100u8, 0.05f32, 128u8);
    let s_w: Vec<f32> = (0..c_out).map(|_| 0.002 + r.unit() * 0.004).collect();
    let m = reference::multiplier(s_x, &s_w, s_y);
    let yq = reference::qconv2d(&x, [1, c_in, h, w], z_x, &wq, c_out, Some(&bias), &m, z_y, g);
    let dims = |c: usize| [Dim::Fixed(1), Dim::Fixed(c), Dim::Fixed(h), Dim::Fixed(w)];
    let mut model = model(
        vec![
            node("DequantizeLinear", "dqx", &["xq", "sx", "zx"], &["xd"], vec![]),
            node("DequantizeLinear", "dqw", &["wq", "sw", "zw"], &["wd"], vec![attr_int("axis", 0)]),
            node("DequantizeLinear", "dqb", &["bq", "sb"], &["bd"], vec![attr_int("axis", 0)]),
            node("Conv", "conv", &["xd", "wd", "bd"], &["c"], vec![attr_ints("kernel_shape", &[1, 1])]),
            node("QuantizeLinear", "qy", &["c", "sy", "zy"], &["cq"], vec![]),
            node("DequantizeLinear", "dqy", &["cq", "sy", "zy"], &["cd"], vec![]),
            node("Softmax", "sm", &["cd"], &["y"], vec![attr_int("axis", -1)]),
        ],
        vec![value_info("xq", 2, &dims(c_in))],
        vec![value_info("y", 1, &dims(c_out))],
        vec![tensor_f32("sx", &[], &[s_x]), tensor_raw("zx", &[], 2, vec![z_x])]
            .into_iter()
            .chain(qdq_weights(&[c_out as i64, c_in as i64, 1, 1], &wq, &s_w, &bias, s_x))
            .chain([tensor_f32("sy", &[], &[s_y]), tensor_raw("zy", &[], 2, vec![z_y])])
            .collect(),
    );
    model.set_opset("", 13);
    let low = model.lower_for_cpu(true);
    let ops: Vec<&str> = low.model.graph.nodes.iter().map(|nd| nd.op()).collect();
    assert!(low.integer_kernels > 0 && ops.contains(&"EpQConv"), "{ops:?}");
    assert_eq!((low.float_kernels, ops.iter().filter(|o| **o == "EpSoftmax").count()), (1, 1), "{ops:?}");
    assert!(!ops.contains(&"Softmax"), "{ops:?}");
    let s = Session::from_model(&model, &SessionOptions { threads: 1, ..Default::default() }).unwrap();
    let input = || vec![("xq".to_string(), Tensor::from_le_bytes(DType::U8, vec![1, c_in, h, w], &x).unwrap())];
    // Both kernels ran: the kernel graph planned (no fallback to the graph as written).
    let ran = kernel_ops(&s, input());
    assert!(ran.iter().any(|o| o == "EpQConv") && ran.iter().any(|o| o == "EpSoftmax"), "{ran:?}");
    let got = s.run(input()).unwrap()[0].1.to_f32_vec();
    let cd: Vec<f64> = yq.iter().map(|&v| (v as f64 - z_y as f64) * s_y as f64).collect();
    for (row, (g, x)) in got.chunks(w).zip(cd.chunks(w)).enumerate() {
        let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = x.iter().map(|v| (v - max).exp()).sum();
        for (&g, &v) in g.iter().zip(x) {
            let want = (v - max).exp() / sum;
            assert!((g as f64 - want).abs() <= 1e-6 * (1.0 + want), "row {row}: {g} vs {want}");
        }
    }
}

/// Dynamic quantization's MatMul (`DynamicQuantizeLinear → MatMulInteger → Cast → Mul [→ Add]`) lowered to
/// `EpDynGemm` equals the scalar arithmetic of the ops as ONNX (and onnxruntime) define them, bit for bit: random
/// K (not only multiples of 4), N across the 64-channel blocks, rank-2 and rank-3 inputs, with and without bias,
/// and an all-zero input (a zero range).
#[test]
fn lowered_dynamic_matmul_equals_the_scalar_reference() {
    let mut r = Rng(0xd1a_11c);
    for case in 0..24 {
        let (k, n) = (r.range(1, 40) as usize, r.range(1, 90) as usize);
        let lead: Vec<usize> =
            if case % 2 == 0 { vec![r.range(1, 9) as usize] } else { vec![1, r.range(1, 9) as usize] };
        let rows: usize = lead.iter().product();
        let with_bias = case % 3 != 0;
        let wq: Vec<i8> = (0..k * n).map(|_| r.range(-127, 127) as i8).collect();
        let ws: Vec<f32> = (0..n).map(|_| 0.0005 + r.unit() * 0.01).collect();
        let b: Vec<f32> = (0..n).map(|_| r.unit() - 0.5).collect();
        let shift = r.unit() * 2.0 - 1.0;
        let x: Vec<f32> = if case == 5 {
            vec![0.0; rows * k]
        } else {
            (0..rows * k).map(|_| (r.unit() - 0.5) * 6.0 + shift).collect()
        };
        // ONNX DynamicQuantizeLinear: the range widened to hold 0, scale (max − min)/255 (1 for a zero range),
        // zero point round(−min/scale) saturated, q = saturate(round(x/scale) + zero); then the exact integer
        // product, cast, times (s_x · s_w[n]), plus the bias.
        let (lo, hi) = x.iter().fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
        let s_x = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
        let z = (-lo / s_x).round_ties_even().clamp(0.0, 255.0);
        let q: Vec<i32> = x.iter().map(|&v| ((v / s_x).round_ties_even() + z).clamp(0.0, 255.0) as i32).collect();
        let mut want = vec![0f32; rows * n];
        for i in 0..rows {
            for j in 0..n {
                let acc: i32 = (0..k).map(|kk| (q[i * k + kk] - z as i32) * wq[kk * n + j] as i32).sum();
                let y = acc as f32 * (s_x * ws[j]);
                want[i * n + j] = if with_bias { y + b[j] } else { y };
            }
        }
        let mut nodes = vec![
            node("DynamicQuantizeLinear", "dql", &["x"], &["xq", "xs", "xz"], vec![]),
            node("MatMulInteger", "mmi", &["xq", "w", "xz", "wz"], &["acc"], vec![]),
            node("Cast", "cast", &["acc"], &["accf"], vec![attr_int("to", 1)]),
            node("Mul", "scale", &["xs", "ws"], &["sc"], vec![]),
            node("Mul", "out", &["accf", "sc"], &[if with_bias { "y0" } else { "y" }], vec![]),
        ];
        if with_bias {
            nodes.push(node("Add", "bias", &["y0", "b"], &["y"], vec![]));
        }
        let dims: Vec<Dim> = lead.iter().map(|&d| Dim::Fixed(d)).chain([Dim::Fixed(k)]).collect();
        let out_dims: Vec<Dim> = lead.iter().map(|&d| Dim::Fixed(d)).chain([Dim::Fixed(n)]).collect();
        let m = model(
            nodes,
            vec![value_info("x", 1, &dims)],
            vec![value_info("y", 1, &out_dims)],
            vec![
                tensor_raw("w", &[k as i64, n as i64], 3, wq.iter().map(|&v| v as u8).collect()),
                tensor_raw("wz", &[], 3, vec![0]),
                tensor_f32("ws", &[n as i64], &ws),
                tensor_f32("b", &[n as i64], &b),
            ],
        );
        let mut lowered = m.clone();
        assert_eq!(lowered.lower_qdq_kernels(), 1, "case {case}");
        let ops: Vec<&str> = lowered.graph.nodes.iter().map(|n| n.op()).collect();
        assert_eq!(ops, ["EpDynGemm"], "case {case}");
        let shape: Vec<usize> = lead.iter().copied().chain([k]).collect();
        for threads in [1, 2] {
            let s = Session::from_model(&m, &SessionOptions { threads, ..Default::default() }).unwrap();
            let got = s.run_one(Tensor::from_f32(shape.clone(), x.clone()).unwrap()).unwrap()[0].1.to_f32_vec();
            assert_eq!(got, want, "case {case} (k {k}, n {n}, rows {rows}), threads {threads}");
        }
    }
}

/// `onnx_structured` found `Identity(y) → y` over a graph input `y`: the float lowering bypasses Identity nodes by
/// renaming their readers to the node's input, and a rename of `y` to itself never resolved (a 30 s timeout at
/// load). The node goes without a rename.
#[test]
fn an_identity_writing_its_own_input_is_bypassed_without_a_rename() {
    let m = model(
        vec![node("Identity", "same", &["y"], &["y"], vec![]), node("Relu", "relu", &["y"], &["z"], vec![])],
        vec![value_info("y", 1, &[Dim::Fixed(4)])],
        vec![value_info("z", 1, &[Dim::Fixed(4)])],
        vec![],
    );
    let mut lowered = m.clone();
    let t = std::time::Instant::now();
    assert_eq!(lowered.graph.lower_f32_kernels(), 0, "no kernel pattern: the graph is left as it is");
    assert!(t.elapsed().as_secs_f64() < 5.0);
    // A session ends in the model's result or a typed error (tract calls `y` written twice a loop).
    let x = Tensor::from_f32(vec![4], vec![-1.0, 2.0, -3.0, 4.0]).unwrap();
    match Session::from_model(&m, &SessionOptions { threads: 1, ..Default::default() }).and_then(|s| s.run_one(x)) {
        Ok(out) => assert_eq!(out[0].1.to_f32_vec(), vec![0.0, 2.0, 0.0, 4.0]),
        Err(e) => assert!(e.to_string().contains("Loop detected"), "{e}"),
    }
}

/// A quantizer's SiLU (`DQ(v) → Sigmoid → Q → DQ → Mul(DQ(v), ·)`) whose product is split into channel halves and
/// upsampled by a nearest Resize, each then quantized; one half through a 1×1 convolution and a HardSwish, added to
/// the other half. Every element-wise region becomes a 256-entry table (the Split halves and the Resize read the
/// convolution's output through windowed and upsampling tables; the HardSwish moves into its convolution's output
/// stage), no float op is left, and the outputs equal the ops as ONNX defines them, computed here on NCHW arrays,
/// bit for bit at 1 and 2 threads.
#[test]
fn quantized_element_wise_regions_run_as_tables() {
    use edgepack_runtime::kernels::reference::QParams;
    use edgepack_runtime::onnx::LowerForCpu;
    let mut r = Rng(0x007a_b1e5);
    let (c, k, h, w) = (6usize, 4usize, 7usize, 9usize);
    let x: Vec<u8> = (0..c * h * w).map(|_| r.range(0, 255) as u8).collect();
    let q = |scale: f32, zero: u8| QParams { scale, zero };
    let (qx, qv, qs, qa, qb, qu, qv2, qh, qsum) = (
        q(0.02, 110),
        q(0.05, 140),
        q(1.0 / 255.0, 0),
        q(0.03, 20),
        q(0.025, 25),
        q(0.035, 15),
        q(0.04, 120),
        q(0.03, 30),
        q(0.05, 40),
    );
    // Two convolutions: 3×3 (pad 1) from c to 2k channels, 1×1 from k to k.
    let conv = |r: &mut Rng, ci: usize, co: usize, taps: usize, qi: QParams, qo: QParams| {
        let wq: Vec<i8> = (0..co * ci * taps).map(|_| r.range(-127, 127) as i8).collect();
        let bias: Vec<i32> = (0..co).map(|_| r.range(-3_000, 3_000) as i32).collect();
        // Accumulators spread over about ±5400·√(ci·taps): onto about ±60 output steps.
        let s_w: Vec<f32> =
            (0..co).map(|_| qo.scale * 60.0 / (qi.scale * 5400.0 * ((ci * taps) as f32).sqrt())).collect();
        (wq, bias, s_w)
    };
    let (w1, b1, sw1) = conv(&mut r, c, 2 * k, 9, qx, qv);
    let (w2, b2, sw2) = conv(&mut r, k, k, 1, qb, qv2);
    let g3 = Conv2d { group: 1, kernel: [3, 3], stride: [1, 1], dilation: [1, 1], pads: [1; 4] };
    let g1 = Conv2d { group: 1, kernel: [1, 1], stride: [1, 1], dilation: [1, 1], pads: [0; 4] };

    // The ops as ONNX defines them, on NCHW arrays.
    let dq = |v: u8, p: QParams| (v as i32 - p.zero as i32) as f32 * p.scale;
    let qf = |v: f32, p: QParams| ((v / p.scale).round_ties_even() + p.zero as f32).clamp(0.0, 255.0) as u8;
    let v = reference::qconv2d(
        &x,
        [1, c, h, w],
        qx.zero,
        &w1,
        2 * k,
        Some(&b1),
        &reference::multiplier(qx.scale, &sw1, qv.scale),
        qv.zero,
        g3,
    );
    let m: Vec<f32> = v
        .iter()
        .map(|&b| {
            let d = dq(b, qv);
            let s = (1.0 / (1.0 + (-(d as f64)).exp())) as f32;
            d * dq(qf(s, qs), qs)
        })
        .collect();
    let half = k * h * w;
    let a: Vec<u8> = m[..half].iter().map(|&f| qf(f, qa)).collect();
    let b: Vec<u8> = m[half..].iter().map(|&f| qf(f, qb)).collect();
    let mut u = vec![0u8; 2 * k * 4 * h * w];
    for ch in 0..2 * k {
        for oy in 0..2 * h {
            for ox in 0..2 * w {
                u[(ch * 2 * h + oy) * 2 * w + ox] = qf(m[(ch * h + oy / 2) * w + ox / 2], qu);
            }
        }
    }
    let v2 = reference::qconv2d(
        &b,
        [1, k, h, w],
        qb.zero,
        &w2,
        k,
        Some(&b2),
        &reference::multiplier(qb.scale, &sw2, qv2.scale),
        qv2.zero,
        g1,
    );
    let hs: Vec<u8> = v2
        .iter()
        .map(|&t| {
            let d = dq(t, qv2);
            qf(d * (d * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0), qh)
        })
        .collect();
    let sum = reference::qadd(&a, qa, &hs, qh, qsum);
    for (name, vals) in [("a", &a), ("b", &b), ("hardswish", &hs), ("sum", &sum), ("u", &u)] {
        let spread = vals.iter().collect::<std::collections::HashSet<_>>().len();
        assert!(spread >= 20, "{name}: only {spread} distinct values: the test would show little");
    }

    let dims = |c: usize, h: usize, w: usize| [Dim::Fixed(1), Dim::Fixed(c), Dim::Fixed(h), Dim::Fixed(w)];
    let qp = |p: QParams, s: &str, z: &str| [tensor_f32(s, &[], &[p.scale]), tensor_raw(z, &[], 2, vec![p.zero])];
    let dq_n = |name: &str, x: &str, p: &str, y: &str| {
        node("DequantizeLinear", name, &[x, &format!("s{p}"), &format!("z{p}")], &[y], vec![])
    };
    let q_n = |name: &str, x: &str, p: &str, y: &str| {
        node("QuantizeLinear", name, &[x, &format!("s{p}"), &format!("z{p}")], &[y], vec![])
    };
    let mut inits = Vec::new();
    for (p, n) in
        [(qx, "x"), (qv, "v"), (qs, "s"), (qa, "a"), (qb, "b"), (qu, "u"), (qv2, "v2"), (qh, "h"), (qsum, "sum")]
    {
        inits.extend(qp(p, &format!("s{n}"), &format!("z{n}")));
    }
    for (i, (wq, bias, s_w, qi, co, ci, kk)) in
        [(&w1, &b1, &sw1, qx, 2 * k, c, 3i64), (&w2, &b2, &sw2, qb, k, k, 1)].into_iter().enumerate()
    {
        inits.extend([
            tensor_raw(&format!("w{i}"), &[co as i64, ci as i64, kk, kk], 3, wq.iter().map(|&v| v as u8).collect()),
            tensor_f32(&format!("sw{i}"), &[co as i64], s_w),
            tensor_raw(&format!("zw{i}"), &[co as i64], 3, vec![0; co]),
            tensor_raw(&format!("bq{i}"), &[co as i64], 6, bias.iter().flat_map(|v| v.to_le_bytes()).collect()),
            tensor_f32(&format!("sb{i}"), &[co as i64], &s_w.iter().map(|s| qi.scale * s).collect::<Vec<_>>()),
        ]);
    }
    inits.push(tensor_i64("split", &[2], &[k as i64, k as i64]));
    inits.push(tensor_f32("scales", &[4], &[1.0, 1.0, 2.0, 2.0]));
    let weights = |i: usize| {
        [
            node(
                "DequantizeLinear",
                &format!("dqw{i}"),
                &[&format!("w{i}"), &format!("sw{i}"), &format!("zw{i}")],
                &[&format!("wd{i}")],
                vec![attr_int("axis", 0)],
            ),
            node(
                "DequantizeLinear",
                &format!("dqb{i}"),
                &[&format!("bq{i}"), &format!("sb{i}")],
                &[&format!("bd{i}")],
                vec![attr_int("axis", 0)],
            ),
        ]
    };
    let mut nodes = vec![dq_n("dqx", "xq", "x", "xd")];
    nodes.extend(weights(0));
    nodes.extend([
        node(
            "Conv",
            "conv0",
            &["xd", "wd0", "bd0"],
            &["c0"],
            vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("pads", &[1; 4])],
        ),
        q_n("qv", "c0", "v", "vq"),
        dq_n("dqv", "vq", "v", "vd"),
        node("Sigmoid", "sig", &["vd"], &["sg"], vec![]),
        q_n("qs", "sg", "s", "sq"),
        dq_n("dqs", "sq", "s", "sd"),
        node("Mul", "mul", &["vd", "sd"], &["m"], vec![]),
        node("Split", "split", &["m", "split"], &["ma", "mb"], vec![attr_int("axis", 1)]),
        q_n("qa", "ma", "a", "aq"),
        q_n("qb", "mb", "b", "bq"),
        node(
            "Resize",
            "up",
            &["m", "", "scales"],
            &["mu"],
            vec![
                attr_string("mode", "nearest"),
                attr_string("coordinate_transformation_mode", "asymmetric"),
                attr_string("nearest_mode", "floor"),
            ],
        ),
        q_n("qu", "mu", "u", "u"),
        dq_n("dqb", "bq", "b", "bd"),
    ]);
    nodes.extend(weights(1));
    nodes.extend([
        node("Conv", "conv1", &["bd", "wd1", "bd1"], &["c1"], vec![attr_ints("kernel_shape", &[1, 1])]),
        q_n("qv2", "c1", "v2", "v2q"),
        dq_n("dqv2", "v2q", "v2", "v2d"),
        node("HardSwish", "hswish", &["v2d"], &["hsw"], vec![]),
        q_n("qh", "hsw", "h", "hq"),
        dq_n("dqa", "aq", "a", "ad"),
        dq_n("dqh", "hq", "h", "hd"),
        node("Add", "add", &["ad", "hd"], &["sm"], vec![]),
        q_n("qsum", "sm", "sum", "sum"),
    ]);
    let mut model = model(
        nodes,
        vec![value_info("xq", 2, &dims(c, h, w))],
        vec![value_info("sum", 2, &dims(k, h, w)), value_info("u", 2, &dims(2 * k, 2 * h, 2 * w))],
        inits,
    );
    model.set_opset("", 14);

    let low = model.lower_for_cpu(true).model;
    let ops: Vec<&str> = low.graph.nodes.iter().map(|n| n.op()).collect();
    assert!(low.graph.nodes.iter().all(|n| n.domain_name() == "ai.edgepack"), "a float op is left: {ops:?}");
    assert_eq!(ops.iter().filter(|o| **o == "EpQTable").count(), 3, "{ops:?}");
    let fused: Vec<&str> =
        low.graph.nodes.iter().filter(|n| n.op() == "EpQConv" && n.attr("table").is_some()).map(|n| n.name()).collect();
    assert_eq!(fused, ["conv1_kernel"], "the HardSwish moves into its convolution: {ops:?}");
    for threads in [1, 2] {
        let s = Session::from_model(&model, &SessionOptions { threads, ..Default::default() }).unwrap();
        let input = || vec![("xq".to_string(), Tensor::from_le_bytes(DType::U8, vec![1, c, h, w], &x).unwrap())];
        let ran = kernel_ops(&s, input());
        assert!(ran.iter().any(|o| o == "EpQTable") && ran.iter().any(|o| o == "EpQAdd"), "{ran:?}");
        let out = s.run(input()).unwrap();
        assert_eq!(u8_data(&out[0].1), sum, "threads {threads}: sum");
        assert_eq!(u8_data(&out[1].1), u, "threads {threads}: upsampled");
    }
}

/// A QuantizeLinear of a float value no integer pattern reads (after a Transpose: a detector's head) runs on the
/// vectorised kernel (`EpQuantizeLinear`, any rank) and equals ONNX's `round_half_even(x / s) + z`, saturated, at 1
/// and 2 threads: ties, both saturation ends, a length that splits across threads.
#[test]
fn a_float_value_s_quantize_linear_runs_on_the_kernel() {
    use edgepack_runtime::onnx::LowerForCpu;
    let mut r = Rng(0x0051_ab1e);
    let (s, z) = (0.037f32, 97u8);
    let shape = [1usize, 4, 128, 160];
    let len: usize = shape.iter().product();
    let x: Vec<f32> = (0..len)
        .map(|i| match i % 5 {
            // Exact ties: (k + 0.5)·s, rounded to f32, divided back.
            0 => (r.range(-140, 200) as f32 + 0.5) * s,
            1 => r.range(-20_000, 20_000) as f32 * 0.001,
            _ => (r.unit() - 0.5) * 12.0,
        })
        .collect();
    let mut model = model(
        vec![
            node("Transpose", "t", &["x"], &["xt"], vec![attr_ints("perm", &[0, 1, 3, 2])]),
            node("QuantizeLinear", "q", &["xt", "s", "z"], &["y"], vec![]),
        ],
        vec![value_info("x", 1, &shape.map(Dim::Fixed))],
        vec![value_info("y", 2, &[1, 4, 160, 128].map(Dim::Fixed))],
        vec![tensor_f32("s", &[], &[s]), tensor_raw("z", &[], 2, vec![z])],
    );
    model.set_opset("", 13);
    let ops: Vec<String> = model.lower_for_cpu(true).model.graph.nodes.iter().map(|n| n.op().to_string()).collect();
    assert_eq!(ops, ["Transpose", "EpQuantizeLinear"]);
    let mut want = vec![0u8; len];
    for c in 0..4 {
        for i in 0..128 {
            for j in 0..160 {
                let v = x[(c * 128 + i) * 160 + j];
                want[(c * 160 + j) * 128 + i] = ((v / s).round_ties_even() + z as f32).clamp(0.0, 255.0) as u8;
            }
        }
    }
    assert!(want.contains(&0) && want.contains(&255), "both saturation ends are tested");
    for threads in [1, 2] {
        let sess = Session::from_model(&model, &SessionOptions { threads, ..Default::default() }).unwrap();
        let input = || vec![("x".to_string(), Tensor::from_f32(shape.to_vec(), x.clone()).unwrap())];
        assert!(kernel_ops(&sess, input()).iter().any(|o| o == "EpQuantizeLinear"));
        let out = sess.run(input()).unwrap();
        assert_eq!(u8_data(&out[0].1), want, "threads {threads}");
    }
}

/// A C2f block (YOLOv8): a convolution's output split into channel halves (`Split`, sizes as an input and, before
/// opset 13, as an attribute), one half through two convolutions and added back to itself, all concatenated, on the
/// kernels (`EpChannels` per half, so the block stays in the NHWC chain) and equal to the graph as written; a Split
/// of the graph's input (not a kernel output) stays tract's.
#[test]
fn lowered_channel_split_equals_the_graph_as_written() {
    for opset in [11, 13] {
        let mut r = Rng(0x0c2f_0000 + opset);
        let mut w = |name: &str, dims: &[i64]| {
            let n: i64 = dims.iter().product();
            tensor_f32(name, dims, &(0..n).map(|_| r.unit() - 0.5).collect::<Vec<_>>())
        };
        let mut inits =
            vec![w("w1", &[8, 3, 1, 1]), w("w2", &[5, 5, 3, 3]), w("w3", &[5, 5, 3, 3]), w("w4", &[4, 13, 1, 1])];
        let split = |name: &str, x: &str, outs: &[&str], sizes: &[i64]| match opset {
            13 => node("Split", name, &[x, &format!("{name}_sizes")], outs, vec![attr_int("axis", 1)]),
            _ => node("Split", name, &[x], outs, vec![attr_int("axis", 1), attr_ints("split", sizes)]),
        };
        if opset == 13 {
            inits.push(tensor_i64("sp_sizes", &[2], &[3, 5]));
            inits.push(tensor_i64("sx_sizes", &[2], &[1, 2]));
        }
        let nodes = vec![
            node("Conv", "c1", &["x", "w1"], &["a0"], vec![]),
            node("Relu", "r1", &["a0"], &["a"], vec![]),
            split("sp", "a", &["h0", "h1"], &[3, 5]),
            node("Conv", "c2", &["h1", "w2"], &["b0"], vec![attr_ints("pads", &[1; 4])]),
            node("Relu", "r2", &["b0"], &["b"], vec![]),
            node("Conv", "c3", &["b", "w3"], &["d"], vec![attr_ints("pads", &[1; 4])]),
            node("Add", "res", &["h1", "d"], &["e"], vec![]),
            node("Concat", "cat", &["h0", "h1", "e"], &["f"], vec![attr_int("axis", 1)]),
            node("Conv", "c4", &["f", "w4"], &["y"], vec![]),
            split("sx", "x", &["x0", "x1"], &[1, 2]),
        ];
        let mut m = model(
            nodes,
            vec![value_info("x", 1, &[Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(9), Dim::Fixed(11)])],
            vec![
                value_info("y", 1, &[Dim::Fixed(2), Dim::Fixed(4), Dim::Fixed(9), Dim::Fixed(11)]),
                value_info("x1", 1, &[Dim::Fixed(2), Dim::Fixed(2), Dim::Fixed(9), Dim::Fixed(11)]),
            ],
            inits,
        );
        m.set_opset("", opset as i64);
        let mut lowered = m.clone();
        lowered.lower_f32_kernels();
        let ops: Vec<&str> = lowered.graph.nodes.iter().map(|n| n.op()).collect();
        assert_eq!(ops.iter().filter(|o| **o == "EpChannels").count(), 2, "opset {opset}: {ops:?}");
        assert_eq!(ops.iter().filter(|o| **o == "Split").count(), 1, "opset {opset}: {ops:?}");
        assert!(!ops.contains(&"Concat") && !ops.contains(&"Add"), "opset {opset}: {ops:?}");
        let x: Vec<f32> = (0..2 * 3 * 9 * 11).map(|_| r.unit() * 2.0 - 1.0).collect();
        assert_kernels_equal_the_graph(
            &m,
            &[2, 3, 9, 11],
            &x,
            &[2 * 4 * 9 * 11, 2 * 2 * 9 * 11],
            "a0",
            &["EpChannels", "EpConcat"],
            1e-5,
        );
    }
}

/// A quantized convolution whose output stays float (a detector's last convolutions: no Q after it, a Reshape
/// reads it) runs on the integer kernel with a float output (`EpQConv` `float_out`: `f32(acc)·s_x·s_w[o]`, as
/// onnxruntime's integer convolution with a float output) and equals that arithmetic, at 1 and 2 threads.
#[test]
fn a_quantized_convolution_with_a_float_output_runs_on_the_kernel() {
    use edgepack_runtime::onnx::LowerForCpu;
    let mut r = Rng(0x00f1_0a70);
    let (c_in, c_out, h, w) = (5usize, 7usize, 6usize, 8usize);
    let x: Vec<u8> = (0..c_in * h * w).map(|_| r.range(0, 255) as u8).collect();
    let wq: Vec<i8> = (0..c_out * c_in * 9).map(|_| r.range(-127, 127) as i8).collect();
    let bias: Vec<i32> = (0..c_out).map(|_| r.range(-2_000, 2_000) as i32).collect();
    let (s_x, z_x) = (0.02f32, 77u8);
    let s_w: Vec<f32> = (0..c_out).map(|_| 0.001 + r.unit() * 0.004).collect();
    let mut want = vec![0f32; c_out * h * w];
    for o in 0..c_out {
        for oy in 0..h {
            for ox in 0..w {
                let mut acc = bias[o] as i64;
                for ci in 0..c_in {
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let (iy, ix) = (oy as isize + ky as isize - 1, ox as isize + kx as isize - 1);
                            if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                let xv = x[(ci * h + iy as usize) * w + ix as usize] as i64 - z_x as i64;
                                acc += xv * wq[((o * c_in + ci) * 3 + ky) * 3 + kx] as i64;
                            }
                        }
                    }
                }
                want[(o * h + oy) * w + ox] = acc as f32 * (s_x * s_w[o]);
            }
        }
    }
    let mut model = model(
        vec![
            // A quantized graph quantizes its activations (a graph that does not is weight-only quantization,
            // whose weights the session unpacks to f32).
            node("QuantizeLinear", "qx", &["x", "sx", "zx"], &["xq"], vec![]),
            node("DequantizeLinear", "dqx", &["xq", "sx", "zx"], &["xd"], vec![]),
            node("DequantizeLinear", "dqw", &["wq", "sw", "zw"], &["wd"], vec![attr_int("axis", 0)]),
            node("DequantizeLinear", "dqb", &["bq", "sb"], &["bd"], vec![attr_int("axis", 0)]),
            node("Conv", "conv", &["xd", "wd", "bd"], &["c"], vec![attr_ints("pads", &[1; 4])]),
            node("Reshape", "flat", &["c", "shape"], &["y"], vec![]),
        ],
        vec![value_info("x", 1, &[1, c_in, h, w].map(Dim::Fixed))],
        vec![value_info("y", 1, &[1, c_out, h * w].map(Dim::Fixed))],
        vec![tensor_f32("sx", &[], &[s_x]), tensor_raw("zx", &[], 2, vec![z_x])]
            .into_iter()
            .chain(qdq_weights(&[c_out as i64, c_in as i64, 3, 3], &wq, &s_w, &bias, s_x))
            .chain([tensor_i64("shape", &[3], &[1, c_out as i64, (h * w) as i64])])
            .collect(),
    );
    model.set_opset("", 13);
    let low = model.lower_for_cpu(true).model;
    let conv = low.graph.nodes.iter().find(|n| n.op() == "EpQConv").expect("the convolution is a kernel");
    assert_eq!(conv.attr_i("float_out"), Some(1));
    for threads in [1, 2] {
        let s = Session::from_model(&model, &SessionOptions { threads, ..Default::default() }).unwrap();
        // Floats that quantize back to `x` exactly.
        let xf: Vec<f32> = x.iter().map(|&v| (v as i32 - z_x as i32) as f32 * s_x).collect();
        let input = || vec![("x".to_string(), Tensor::from_f32(vec![1, c_in, h, w], xf.clone()).unwrap())];
        let ran = kernel_ops(&s, input());
        assert!(ran.iter().any(|o| o == "EpQConv"), "{ran:?}");
        let got = s.run(input()).unwrap()[0].1.to_f32_vec();
        assert_eq!(got, want, "threads {threads}");
    }
}
