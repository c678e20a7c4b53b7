use super::builder::*;
use super::*;

fn shared_models() -> Option<std::path::PathBuf> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models");
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("SKIPPED: ../shared/models is absent; byte-identical round trips of the shared models not checked");
        None
    }
}

#[test]
fn round_trip_is_byte_identical_on_every_shared_model() {
    let Some(dir) = shared_models() else { return };
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "onnx") {
            let bytes = std::fs::read(&p).unwrap();
            let m = Model::from_bytes(&bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(m.to_bytes() == bytes, "{} does not round-trip byte for byte", p.display());
            n += 1;
        }
    }
    assert!(n >= 10, "expected the 11 shared models, found {n}");
}

#[test]
fn shipped_mnist_round_trips() {
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/models/mnist_cntk_opset8_simplified.onnx");
    let bytes = std::fs::read(p).unwrap();
    let m = Model::from_bytes(&bytes).unwrap();
    assert_eq!(m.to_bytes(), bytes);
    assert_eq!(m.opset(""), Some(8));
    let t = m.graph.value_type("Input3").unwrap();
    assert_eq!(t.dtype(), Some(DType::F32));
    assert_eq!(t.shape.unwrap(), vec![Dim::Fixed(1), Dim::Fixed(1), Dim::Fixed(28), Dim::Fixed(28)]);
}

#[test]
fn topo_sort_orders_an_unsorted_graph_and_detects_cycles() {
    let mut m = tiny_classifier();
    m.graph.nodes.reverse();
    m.check().unwrap(); // unsorted is legal to read
    m.graph.topo_sort().unwrap();
    assert_eq!(m.graph.nodes[0].op(), "Gemm");
    // Make a cycle: Gemm reads Relu's output.
    m.graph.nodes[0].input[0] = "y".into();
    assert!(matches!(m.graph.topo_sort(), Err(Error::MalformedModel(msg)) if msg.contains("cycle")));
}

#[test]
fn check_rejects_inconsistent_graphs() {
    let mut m = tiny_classifier();
    m.graph.nodes[1].input[0] = "nowhere".into();
    assert!(matches!(m.check(), Err(Error::MalformedModel(msg)) if msg.contains("nowhere")));

    let mut m = tiny_classifier();
    m.graph.outputs[0].name = Some("ghost".into());
    assert!(matches!(m.check(), Err(Error::MalformedModel(msg)) if msg.contains("ghost")));

    let mut m = tiny_classifier();
    m.graph.initializers[0].raw_data.as_mut().unwrap().pop();
    assert!(matches!(m.check(), Err(Error::MalformedModel(msg)) if msg.contains("raw_data")));

    let mut m = tiny_classifier();
    m.graph.initializers[0].dims = vec![1 << 40, 1 << 40];
    assert!(m.check().is_err());

    let mut m = tiny_classifier();
    m.graph.nodes[1].output[0] = "h".into();
    assert!(matches!(m.check(), Err(Error::MalformedModel(msg)) if msg.contains("twice")));
}

#[test]
fn malformed_bytes_never_panic() {
    let good = tiny_classifier().to_bytes();
    assert!(Model::from_bytes(b"").is_err());
    assert!(Model::from_bytes(b"\xff\xff\xff\xff garbage").is_err());
    for cut in 0..good.len() {
        let _ = Model::from_bytes(&good[..cut]);
    }
    let mut rng = 0x2545F4914F6CDD1Du64;
    for _ in 0..3000 {
        let mut b = good.clone();
        for _ in 0..3 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let i = (rng as usize) % b.len();
            b[i] = (rng >> 32) as u8;
        }
        let _ = Model::from_bytes(&b);
    }
}

#[test]
fn rewrite_api_inserts_replaces_and_cleans() {
    let mut m = tiny_classifier();
    let g = &mut m.graph;
    assert_eq!(g.consumers("h"), vec![1]);
    assert_eq!(g.producers()["y"], 1);
    // Insert an Identity between Gemm and Relu.
    let mid = g.unique_name("h");
    assert_ne!(mid, "h");
    g.replace_uses("h", &mid);
    let at = g.insert_node(node("Identity", "id", &["h"], &[&mid], vec![]));
    assert_eq!(at, 1);
    m.check().unwrap();
    m.graph.set_initializer(tensor_f32("unused", &[1], &[0.0]));
    assert_eq!(m.graph.remove_unused_initializers(), 1);
    let bytes = m.to_bytes();
    assert_eq!(Model::from_bytes(&bytes).unwrap(), m);
}

#[test]
fn subgraph_outer_references_count_as_uses() {
    // If node whose branches read an outer value `h`.
    let branch = |name: &str| GraphProto {
        name: Some(name.into()),
        node: vec![node("Identity", &format!("{name}_id"), &["h"], &[&format!("{name}_out")], vec![])],
        output: vec![value_info(&format!("{name}_out"), 1, &[])],
        ..Default::default()
    };
    let mut m = tiny_classifier();
    m.graph.initializers.push(TensorProto {
        name: Some("cond".into()),
        data_type: Some(9),
        raw_data: Some(vec![1]),
        ..Default::default()
    });
    let mut iff = node("If", "if", &["cond"], &["z"], vec![]);
    iff.attribute.push(AttributeProto {
        name: Some("then_branch".into()),
        r#type: Some(5),
        g: Some(branch("then")),
        ..Default::default()
    });
    iff.attribute.push(AttributeProto {
        name: Some("else_branch".into()),
        r#type: Some(5),
        g: Some(branch("else")),
        ..Default::default()
    });
    m.graph.nodes.insert(0, iff);
    m.graph.topo_sort().unwrap();
    let pos_if = m.graph.node_by_name("if").unwrap();
    let pos_fc = m.graph.node_by_name("fc").unwrap();
    assert!(pos_if > pos_fc, "If must come after the producer of `h`");
    m.check().unwrap();
}

#[test]
fn element_types_follow_shape_arithmetic() {
    let m = model(
        vec![
            node("Shape", "s", &["x"], &["shape"], vec![]),
            node("Gather", "g", &["shape", "zero"], &["n"], vec![]),
            node("Concat", "c", &["n", "n"], &["dims"], vec![attr_int("axis", 0)]),
            node("Relu", "r", &["x"], &["h"], vec![]),
            node("Reshape", "rs", &["h", "dims"], &["y"], vec![]),
            node("Cast", "cast", &["y"], &["yi"], vec![attr_int("to", 6)]),
        ],
        vec![value_info("x", 1, &[Dim::Fixed(2), Dim::Fixed(2)])],
        vec![value_info("yi", 6, &[Dim::Fixed(2), Dim::Fixed(2)])],
        vec![tensor_i64("zero", &[1], &[0])],
    );
    let t = m.graph.infer_elem_types();
    assert_eq!((t["shape"], t["n"], t["dims"]), (7, 7, 7));
    assert_eq!((t["h"], t["y"], t["yi"]), (1, 1, 6));
}

/// int4 `[-8, 7, 3, -1, 0, 1, 2, -3]` packed low nibble first.
fn int4_tensor(name: &str, dims: &[i64]) -> TensorProto {
    tensor_raw(name, dims, 22, vec![0x78, 0xF3, 0x10, 0xD2])
}

#[test]
fn four_bit_weights_fold_to_f32_blocked_and_per_axis() {
    // Default-domain blocked DequantizeLinear (opset 21 form): [2, 4], axis 1, blocks of 2, scales [2, 2].
    let mut m = model(
        vec![
            node("DequantizeLinear", "dq", &["q", "s"], &["w"], vec![attr_int("axis", 1), attr_int("block_size", 2)]),
            node("MatMul", "mm", &["x", "w"], &["y"], vec![]),
        ],
        vec![value_info("x", 1, &[Dim::Fixed(1), Dim::Fixed(2)])],
        vec![value_info("y", 1, &[Dim::Fixed(1), Dim::Fixed(4)])],
        vec![int4_tensor("q", &[2, 4]), tensor_f32("s", &[2, 2], &[0.5, 1.0, 0.25, 2.0])],
    );
    m.check().unwrap();
    assert_eq!(m.graph.fold_low_bit_weights(), 1);
    let w = m.graph.initializer("w").unwrap();
    assert_eq!(passes::tensor_f32_values(w).unwrap(), vec![-4.0, 3.5, 3.0, -1.0, 0.0, 0.25, 4.0, -6.0]);
    assert_eq!(m.graph.nodes.len(), 1);
    assert!(m.graph.initializer("q").is_none(), "the packed tensor is dropped once unused");

    // com.microsoft form with float16 scales: [4 blocks of 2] → Cast → Reshape [2, 4].
    let s16: Vec<u8> = [0.5f32, 1.0, 0.25, 2.0].iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
    let mut dq = node("DequantizeLinear", "dq", &["q", "s"], &["b"], vec![attr_int("axis", 0)]);
    dq.domain = Some("com.microsoft".into());
    let mut m = model(
        vec![
            dq,
            node("Cast", "cast", &["b"], &["bf"], vec![attr_int("to", 1)]),
            node("Reshape", "r", &["bf", "shape"], &["w"], vec![]),
            node("MatMul", "mm", &["x", "w"], &["y"], vec![]),
        ],
        vec![value_info("x", 1, &[Dim::Fixed(1), Dim::Fixed(2)])],
        vec![value_info("y", 1, &[Dim::Fixed(1), Dim::Fixed(4)])],
        vec![int4_tensor("q", &[4, 2]), tensor_raw("s", &[4], 10, s16), tensor_i64("shape", &[2], &[2, 4])],
    );
    m.set_opset("com.microsoft", 1);
    assert_eq!(m.graph.fold_low_bit_weights(), 3);
    let w = m.graph.initializer("w").unwrap();
    assert_eq!(w.dims, vec![2, 4]);
    assert_eq!(passes::tensor_f32_values(w).unwrap(), vec![-4.0, 3.5, 3.0, -1.0, 0.0, 0.25, 4.0, -6.0]);
    assert_eq!(m.graph.nodes.iter().map(|n| n.op()).collect::<Vec<_>>(), vec!["MatMul"]);
}

#[test]
fn eight_bit_weights_fold_only_where_no_activation_is_quantized() {
    let q8 = tensor_raw("q", &[2, 2], 3, vec![1, 0xFF, 2, 0x80]);
    let build = |quantized_input: bool| {
        let mut nodes = vec![node("DequantizeLinear", "dq", &["q", "s"], &["w"], vec![attr_int("axis", 1)])];
        let x = if quantized_input {
            nodes.push(node("QuantizeLinear", "qx", &["x", "xs"], &["xq"], vec![]));
            nodes.push(node("DequantizeLinear", "dqx", &["xq", "xs"], &["xd"], vec![]));
            "xd"
        } else {
            "x"
        };
        nodes.push(node("MatMul", "mm", &[x, "w"], &["y"], vec![]));
        model(
            nodes,
            vec![value_info("x", 1, &[Dim::Fixed(1), Dim::Fixed(2)])],
            vec![value_info("y", 1, &[Dim::Fixed(1), Dim::Fixed(2)])],
            vec![q8.clone(), tensor_f32("s", &[2], &[0.5, 0.25]), tensor_f32("xs", &[], &[0.1])],
        )
    };
    let mut wo = build(false);
    assert!(wo.graph.has_low_bit_weights());
    assert_eq!(wo.graph.fold_low_bit_weights(), 1);
    assert!(!wo.graph.has_low_bit_weights());
    assert_eq!(passes::tensor_f32_values(wo.graph.initializer("w").unwrap()).unwrap(), vec![0.5, -0.25, 1.0, -32.0]);
    // A QDQ model keeps its int8 weights for the integer kernels.
    let mut qdq = build(true);
    assert!(!qdq.graph.has_low_bit_weights());
    assert_eq!(qdq.graph.fold_low_bit_weights(), 0);
}

#[test]
fn a_truncated_int4_tensor_is_a_clear_error() {
    let m = model(
        vec![node("DequantizeLinear", "dq", &["q", "s"], &["y"], vec![attr_int("axis", 0)])],
        vec![],
        vec![value_info("y", 1, &[Dim::Fixed(2), Dim::Fixed(4)])],
        vec![tensor_raw("q", &[2, 4], 22, vec![0x78, 0xF3, 0x10]), tensor_f32("s", &[2], &[1.0, 1.0])],
    );
    let e = m.check().unwrap_err().to_string();
    assert!(e.contains("need 4 packed 4-bit bytes"), "{e}");
}

#[test]
fn traced_shapes_are_forgotten_only_in_graphs_with_symbolic_inputs() {
    let build = |batch: Dim| {
        let mut m = model(
            vec![node("Relu", "r", &["x"], &["h"], vec![]), node("Relu", "r2", &["h"], &["y"], vec![])],
            vec![value_info("x", 1, &[batch.clone(), Dim::Fixed(4)])],
            vec![value_info("y", 1, &[batch, Dim::Fixed(4)])],
            vec![],
        );
        // What an exporter traced at batch 1.
        m.graph.value_info.push(value_info("h", 1, &[Dim::Fixed(1), Dim::Fixed(4)]));
        m
    };
    let mut fixed = build(Dim::Fixed(1));
    assert!(!fixed.graph.has_traced_shapes());
    assert_eq!(fixed.graph.forget_traced_shapes(), 0);
    assert_eq!(fixed.graph.value_type("h").and_then(|t| t.shape).map(|s| s.len()), Some(2));

    let mut dynamic = build(Dim::Symbolic("batch".into()));
    assert!(dynamic.graph.has_traced_shapes());
    assert_eq!(dynamic.graph.forget_traced_shapes(), 2);
    let h = dynamic.graph.value_type("h").unwrap();
    assert_eq!((h.elem_type, h.shape), (1, None), "the element type stays, the shape goes");
    let y = dynamic.graph.value_type("y").unwrap().shape.unwrap();
    assert_eq!(y, vec![Dim::Symbolic("batch".into()), Dim::Symbolic(String::new())], "symbolic dims stay");
    assert!(!dynamic.graph.has_traced_shapes());
    dynamic.check().unwrap();
}

#[test]
fn axes_beyond_any_rank_are_malformed() {
    let ln = |axis: i64| {
        model(
            vec![node("LayerNormalization", "ln", &["x", "s"], &["y"], vec![attr_int("axis", axis)])],
            vec![value_info("x", 1, &[Dim::Fixed(2), Dim::Fixed(3)])],
            vec![value_info("y", 1, &[Dim::Fixed(2), Dim::Fixed(3)])],
            vec![tensor_f32("s", &[3], &[1.0, 1.0, 1.0])],
        )
    };
    ln(-1).check().unwrap();
    ln(1).check().unwrap();
    for bad in [2, -3, 1_054_494_063] {
        let e = ln(bad).check().unwrap_err().to_string();
        assert!(e.contains("axis") && e.contains("out of range"), "{bad}: {e}");
    }
}

#[test]
fn nodes_hold_the_inputs_and_outputs_their_op_takes() {
    let one = |n: NodeProto| {
        model(
            vec![n],
            vec![value_info("x", 1, &[Dim::Fixed(2), Dim::Fixed(3)])],
            vec![value_info("y", 1, &[Dim::Fixed(2), Dim::Fixed(3)])],
            vec![tensor_f32("s", &[], &[0.5]), tensor_f32("w", &[3, 3], &[0.0; 9])],
        )
    };
    // What the schemas allow: optional inputs left out or named "", a trailing optional output.
    one(node("Clip", "c", &["x"], &["y"], vec![])).check().unwrap();
    one(node("Clip", "c", &["x", "", "s"], &["y"], vec![])).check().unwrap();
    one(node("Dropout", "d", &["x"], &["y", "mask"], vec![])).check().unwrap();
    one(node("MatMul", "m", &["x", "w"], &["y"], vec![])).check().unwrap();
    one(node("EpAnything", "k", &[], &["y"], vec![])).check().unwrap(); // not an ONNX op: its backend decides
    let bad = [
        (node("DequantizeLinear", "dq", &[], &["y"], vec![]), "has 0 inputs, the op takes 2 to 3"),
        (node("MatMul", "m", &["x", "w", "x"], &["y"], vec![]), "has 3 inputs, the op takes 2"),
        (node("MatMul", "m", &["x", ""], &["y"], vec![]), "leaves its required input 1 empty"),
        (node("Relu", "r", &["x"], &[], vec![]), "has 0 outputs, the op gives 1"),
        (node("Relu", "r", &["x"], &["y", "z"], vec![]), "has 2 outputs, the op gives 1"),
        (node("Sum", "s", &[], &["y"], vec![]), "the op takes at least 1"),
    ];
    for (n, want) in bad {
        let e = one(n).check().unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
}

#[test]
fn a_transpose_perm_must_name_each_axis_once() {
    let transpose = |perm: &[i64]| {
        model(
            vec![node("Transpose", "t", &["x"], &["y"], vec![attr_ints("perm", perm)])],
            vec![value_info("x", 1, &[Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(4)])],
            vec![value_info("y", 1, &[Dim::Fixed(4), Dim::Fixed(2), Dim::Fixed(3)])],
            vec![],
        )
    };
    assert!(transpose(&[2, 0, 1]).check().is_ok());
    for bad in [&[1, 1, 1][..], &[0, 1, 3], &[-1, 0, 1], &[0, 0]] {
        let err = transpose(bad).check().unwrap_err().to_string();
        assert!(err.contains("not a permutation"), "{bad:?}: {err}");
    }
}
