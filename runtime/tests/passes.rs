//! Graph passes checked by running the graphs: opset upgrade, BatchNorm folding, and the QDQ lowering to exact integer
//! arithmetic (host and f32-device targets) against the scalar reference.
use edgepack_runtime::lower::{LowerFor, QdqInteger};
use edgepack_runtime::onnx::builder::*;
use edgepack_runtime::onnx::*;

#[test]
fn batchnorm_folds_into_conv_with_the_same_results_and_nodes_get_names() {
    let c = 3usize;
    let w: Vec<f32> = (0..c * 2 * 3 * 3).map(|i| ((i * 37 % 19) as f32 - 9.0) / 10.0).collect();
    let mut m = model(
        vec![
            node("Conv", "", &["x", "W", "B"], &["c"], vec![attr_ints("pads", &[1, 1, 1, 1])]),
            node("BatchNormalization", "", &["c", "g", "beta", "mu", "var"], &["y"], vec![attr_float("epsilon", 1e-3)]),
        ],
        vec![value_info("x", 1, &[Dim::Fixed(1), Dim::Fixed(2), Dim::Fixed(5), Dim::Fixed(5)])],
        vec![value_info("y", 1, &[Dim::Fixed(1), Dim::Fixed(3), Dim::Fixed(5), Dim::Fixed(5)])],
        vec![
            tensor_f32("W", &[3, 2, 3, 3], &w),
            tensor_f32("B", &[3], &[0.5, -0.5, 0.0]),
            tensor_f32("g", &[3], &[1.5, 0.5, -2.0]),
            tensor_f32("beta", &[3], &[0.1, 0.2, 0.3]),
            tensor_f32("mu", &[3], &[0.3, -0.1, 1.0]),
            tensor_f32("var", &[3], &[2.0, 0.25, 1.0]),
        ],
    );
    let mut with_const = m.clone();
    let w_init = with_const.graph.initializers.remove(0);
    let mut c = node("Constant", "wc", &[], &["W"], vec![]);
    c.attribute.push(AttributeProto {
        name: Some("value".into()),
        r#type: Some(4),
        t: Some(w_init),
        ..Default::default()
    });
    with_const.graph.nodes.insert(0, c);
    assert_eq!(with_const.graph.constants_to_initializers(), 1);
    assert_eq!(with_const.graph.nodes.len(), 2);
    assert!(with_const.graph.initializer("W").is_some());
    assert_eq!(m.graph.name_unnamed_nodes(), 2);
    assert_eq!(m.graph.nodes[0].name(), "Conv_c");
    assert_eq!(m.graph.name_unnamed_nodes(), 0);
    let mut folded = m.clone();
    assert_eq!(folded.graph.fold_batchnorm(), vec!["BatchNormalization_y".to_string()]);
    assert_eq!(folded.graph.nodes.len(), 1);
    assert_eq!(folded.graph.nodes[0].output[0], "y");
    assert!(folded.graph.initializer("mu").is_none(), "BN parameters are dropped");
    folded.check().unwrap();
    let opts = edgepack_runtime::SessionOptions { threads: 1, ..Default::default() };
    let x = edgepack_runtime::Tensor::from_f32(vec![1, 2, 5, 5], (0..50).map(|i| (i as f32 * 0.37).sin()).collect())
        .unwrap();
    let a = edgepack_runtime::Session::from_model(&m, &opts).unwrap().run_one(x.clone()).unwrap()[0].1.to_f32_vec();
    let b = edgepack_runtime::Session::from_model(&folded, &opts).unwrap().run_one(x).unwrap()[0].1.to_f32_vec();
    for (u, v) in a.iter().zip(&b) {
        assert!((u - v).abs() < 1e-4, "{u} vs {v}");
    }
}

#[test]
fn qdq_conv_lowers_to_exact_integer_arithmetic() {
    // x → Q → DQ → Conv(DQ(w int8, per channel), DQ(b int32)) → Relu → Q → DQ → y
    let (c_in, c_out, k) = (3usize, 4usize, 3usize);
    let (sx, zx, sy) = (0.02f32, 120u8, 0.05f32);
    let sw = [0.011f32, 0.007, 0.013, 0.003];
    let w: Vec<i8> = (0..c_out * c_in * k * k).map(|i| ((i * 53 % 255) as i32 - 127) as i8).collect();
    let b: Vec<i32> = vec![1500, -2200, 40, 999];
    let m = model(
        vec![
            node("QuantizeLinear", "qx", &["x", "sx", "zx"], &["xq"], vec![]),
            node("DequantizeLinear", "dqx", &["xq", "sx", "zx"], &["xd"], vec![]),
            node("DequantizeLinear", "dqw", &["wq", "sw", "zw"], &["wd"], vec![attr_int("axis", 0)]),
            node("DequantizeLinear", "dqb", &["bq", "sb"], &["bd"], vec![attr_int("axis", 0)]),
            node("Conv", "conv", &["xd", "wd", "bd"], &["c"], vec![attr_ints("pads", &[1, 1, 1, 1])]),
            node("Relu", "relu", &["c"], &["r"], vec![]),
            node("QuantizeLinear", "qy", &["r", "sy", "zy"], &["yq"], vec![]),
            node("DequantizeLinear", "dqy", &["yq", "sy", "zy"], &["y"], vec![]),
        ],
        vec![value_info("x", 1, &[Dim::Fixed(1), Dim::Fixed(3), Dim::Fixed(6), Dim::Fixed(5)])],
        vec![value_info("y", 1, &[Dim::Fixed(1), Dim::Fixed(4), Dim::Fixed(6), Dim::Fixed(5)])],
        vec![
            tensor_f32("sx", &[], &[sx]),
            tensor_raw("zx", &[], 2, vec![zx]),
            tensor_raw("wq", &[4, 3, 3, 3], 3, w.iter().map(|&v| v as u8).collect()),
            tensor_f32("sw", &[4], &sw),
            tensor_raw("zw", &[4], 3, vec![0; 4]),
            tensor_raw("bq", &[4], 6, b.iter().flat_map(|v| v.to_le_bytes()).collect()),
            tensor_f32("sb", &[4], &sw.map(|s| sx * s)),
            tensor_f32("sy", &[], &[sy]),
            tensor_raw("zy", &[], 2, vec![0]),
        ],
    );
    let mut lowered = m.clone();
    assert_eq!(lowered.graph.lower_qdq_integer(), 2); // the Conv pattern and the input Q (exact division)
    assert!(lowered.graph.nodes.iter().all(|n| n.op() != "Relu"), "the Relu is the Q saturation now");
    lowered.check().unwrap();
    // Scalar reference: exact integer accumulation, one f32 multiply, round half to even.
    let xs: Vec<f32> = (0..90).map(|i| ((i * 37 % 91) as f32 - 45.0) * 0.031).collect();
    let xq: Vec<i32> = xs.iter().map(|&v| ((v / sx).round_ties_even() as i32 + zx as i32).clamp(0, 255)).collect();
    let mut want = vec![0f32; 4 * 6 * 5];
    for o in 0..c_out {
        let mult = (sx * sw[o]) / sy;
        for y in 0..6i32 {
            for xx in 0..5i32 {
                let mut acc = b[o] as i64;
                for ci in 0..c_in {
                    for ky in 0..3i32 {
                        for kx in 0..3i32 {
                            let (iy, ix) = (y + ky - 1, xx + kx - 1);
                            if (0..6).contains(&iy) && (0..5).contains(&ix) {
                                let xv = xq[ci * 30 + (iy * 5 + ix) as usize] - zx as i32;
                                let wv = w[((o * c_in + ci) * 3 + ky as usize) * 3 + kx as usize] as i32;
                                acc += (xv * wv) as i64;
                            }
                        }
                    }
                }
                let q = ((acc as f32 * mult).round_ties_even()).clamp(0.0, 255.0);
                want[o * 30 + (y * 5 + xx) as usize] = q * sy;
            }
        }
    }
    let opts = edgepack_runtime::SessionOptions { threads: 1, ..Default::default() };
    let s = edgepack_runtime::Session::from_model(&m, &opts).unwrap();
    let x = edgepack_runtime::Tensor::from_f32(vec![1, 3, 6, 5], xs).unwrap();
    let got = s.run_one(x.clone()).unwrap()[0].1.to_f32_vec();
    assert_eq!(got, want);
    // For an f32 device: the weights stay int8 behind DequantizeLinear(w, 1); the same integers come out.
    let mut dev = m.clone();
    assert_eq!(dev.graph.lower_qdq_integer_with(LowerFor::F32Device), 2);
    assert_eq!(dev.graph.initializer("wq").and_then(|t| t.data_type), Some(3), "int8 weights kept");
    let sd = edgepack_runtime::Session::from_model(&dev, &opts).unwrap();
    assert_eq!(sd.run_one(x.clone()).unwrap()[0].1.to_f32_vec(), want);
    // Values the lowering removed are still there for calibration and per-layer error (the raw graph runs them).
    let c = s.run_values(vec![("x".into(), x)], &["c"]).unwrap();
    assert_eq!(c[0].1.shape(), &[1, 4, 6, 5]);
}

#[test]
fn qdq_add_lowers_to_a_table_for_an_f32_device() {
    // DQ(a) + DQ(b) → Q, uint8 graph inputs: every (a, b) pair, through the table form an f32-only device runs.
    let (qa, qb, qc) = ((0.031f32, 121u8), (0.0173f32, 7u8), (0.0419f32, 133u8));
    let m = model(
        vec![
            node("DequantizeLinear", "dqa", &["a", "sa", "za"], &["ad"], vec![]),
            node("DequantizeLinear", "dqb", &["b", "sb", "zb"], &["bd"], vec![]),
            node("Add", "add", &["ad", "bd"], &["c"], vec![]),
            node("QuantizeLinear", "qc", &["c", "sc", "zc"], &["cq"], vec![]),
        ],
        vec![value_info("a", 2, &[Dim::Fixed(256 * 256)]), value_info("b", 2, &[Dim::Fixed(256 * 256)])],
        vec![value_info("cq", 2, &[Dim::Fixed(256 * 256)])],
        vec![
            tensor_f32("sa", &[], &[qa.0]),
            tensor_raw("za", &[], 2, vec![qa.1]),
            tensor_f32("sb", &[], &[qb.0]),
            tensor_raw("zb", &[], 2, vec![qb.1]),
            tensor_f32("sc", &[], &[qc.0]),
            tensor_raw("zc", &[], 2, vec![qc.1]),
        ],
    );
    let mut lowered = m.clone();
    assert_eq!(lowered.graph.lower_qdq_integer_with(LowerFor::F32Device), 1);
    lowered.check().unwrap();
    assert!(lowered.graph.nodes.iter().any(|n| n.op() == "Gather"));
    assert!(lowered.graph.nodes.iter().all(|n| n.op() != "QuantizeLinear"));
    let a: Vec<u8> = (0..256 * 256).map(|k| (k / 256) as u8).collect();
    let b: Vec<u8> = (0..256 * 256).map(|k| (k * 31 % 256) as u8).collect();
    use edgepack_runtime::kernels::reference::{QParams, qadd};
    let p = |(scale, zero)| QParams { scale, zero };
    let want = qadd(&a, p(qa), &b, p(qb), p(qc));
    let opts = edgepack_runtime::SessionOptions { threads: 1, ..Default::default() };
    let s = edgepack_runtime::Session::from_model(&lowered, &opts).unwrap();
    let t =
        |v: &[u8]| edgepack_runtime::Tensor::new(vec![v.len()], edgepack_runtime::TensorData::U8(v.to_vec())).unwrap();
    let got = s.run(vec![("a".into(), t(&a)), ("b".into(), t(&b))]).unwrap();
    assert_eq!(got[0].1.to_f32_vec(), want.iter().map(|&v| v as f32).collect::<Vec<_>>());
}

#[test]
fn shipped_mnist_upgrades_and_still_runs_the_same() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models/mnist_cntk_opset8_simplified.onnx");
    let old = Model::load(&p).unwrap();
    let mut new = old.clone();
    let r = new.upgrade_opset(13).unwrap();
    assert_eq!((r.from, r.to), (8, 13));
    assert_eq!(new.opset(""), Some(13));
    let opts = edgepack_runtime::SessionOptions { threads: 1, ..Default::default() };
    let x =
        edgepack_runtime::Tensor::from_f32(vec![1, 1, 28, 28], (0..784).map(|i| (i % 255) as f32).collect()).unwrap();
    let a = edgepack_runtime::Session::from_model(&old, &opts).unwrap().run_one(x.clone()).unwrap();
    let b = edgepack_runtime::Session::from_model(&new, &opts).unwrap().run_one(x).unwrap();
    assert_eq!(a, b);
    // Idempotent.
    assert!(new.clone().upgrade_opset(13).unwrap().converted.is_empty());
}

#[test]
fn softmax_and_attribute_inputs_are_converted() {
    use edgepack_runtime::onnx::builder::*;
    let mut m = model(
        vec![
            node("Unsqueeze", "u", &["x"], &["ux"], vec![attr_ints("axes", &[0])]),
            node("Softmax", "sm", &["ux"], &["y"], vec![attr_int("axis", 1)]),
            node("Dropout", "drop", &["y"], &["z"], vec![]),
        ],
        vec![value_info("x", 1, &[Dim::Fixed(2), Dim::Fixed(3)])],
        vec![value_info("z", 1, &[])],
        vec![],
    );
    m.set_opset("", 9);
    let r = m.upgrade_opset(13).unwrap();
    assert_eq!(r.converted.len(), 3, "{:?}", r.converted);
    let ops: Vec<&str> = m.graph.nodes.iter().map(|n| n.op()).collect();
    assert!(ops.contains(&"Flatten") && ops.contains(&"Identity") && !ops.contains(&"Dropout"));
    let opts = edgepack_runtime::SessionOptions { threads: 1, ..Default::default() };
    let s = edgepack_runtime::Session::from_model(&m, &opts).unwrap();
    let out =
        s.run_one(edgepack_runtime::Tensor::from_f32(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap()).unwrap();
    // Old Softmax(axis=1) on [1,2,3] normalises over all 6 values.
    let v = out[0].1.as_f32().unwrap();
    assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    assert_eq!(out[0].1.shape(), &[1, 2, 3]);
}
