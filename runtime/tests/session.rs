//! Session behaviour on small in-code models and the shipped MNIST model: correct numbers, batch > 1,
//! and a typed error (never a panic) for every kind of bad input.
use edgepack_runtime::onnx::builder::*;
use edgepack_runtime::onnx::{Dim, node};
use edgepack_runtime::{DType, Error, Session, SessionOptions, Tensor};

fn opts() -> SessionOptions {
    SessionOptions { threads: 1, ..Default::default() }
}

fn reference(x: &[f32]) -> Vec<f32> {
    // y = relu(x W^T + b) for the builder's tiny classifier.
    let w: Vec<f32> = (0..12).map(|i| (i as f32 - 6.0) / 4.0).collect();
    let b = [0.1, -0.2, 0.3];
    let w = &w;
    x.chunks(4)
        .flat_map(|row| (0..3).map(move |o| (0..4).map(|k| row[k] * w[o * 4 + k]).sum::<f32>() + b[o]))
        .map(|v| v.max(0.0))
        .collect()
}

#[test]
fn runs_with_batch_one_and_more_and_describes_io() {
    let s = Session::from_model(&tiny_classifier(), &opts()).unwrap();
    assert_eq!(s.inputs()[0].name, "x");
    assert_eq!(s.inputs()[0].dtype, Some(DType::F32));
    assert_eq!(s.inputs()[0].shape, vec![Dim::Symbolic("N".into()), Dim::Fixed(4)]);
    assert_eq!(s.inputs()[0].shape_string(), "[N,4]");
    assert!(s.backend_description().starts_with("cpu (tract"));
    for batch in [1usize, 3, 8] {
        let x: Vec<f32> = (0..batch * 4).map(|i| (i as f32 * 0.37).sin()).collect();
        let out = s.run(vec![("x".into(), Tensor::from_f32(vec![batch, 4], x.clone()).unwrap())]).unwrap();
        assert_eq!(out[0].0, "y");
        assert_eq!(out[0].1.shape(), &[batch, 3]);
        for (a, b) in out[0].1.as_f32().unwrap().iter().zip(reference(&x)) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}

#[test]
fn multithreaded_session_gives_the_same_answer() {
    let one = Session::from_model(&tiny_classifier(), &opts()).unwrap();
    let two = Session::from_model(&tiny_classifier(), &SessionOptions { threads: 2, ..Default::default() }).unwrap();
    let x = Tensor::from_f32(vec![2, 4], vec![0.5; 8]).unwrap();
    assert_eq!(one.run_one(x.clone()).unwrap(), two.run_one(x).unwrap());
    assert!(two.backend_description().contains("2 threads"));
}

#[test]
fn wrong_inputs_are_typed_errors() {
    let s = Session::from_model(&tiny_classifier(), &opts()).unwrap();
    let good = Tensor::from_f32(vec![1, 4], vec![0.0; 4]).unwrap();
    let e = s.run(vec![("nope".into(), good.clone())]).unwrap_err();
    assert!(matches!(e, Error::UnknownInput { ref name, .. } if name == "nope"), "{e}");
    assert!(matches!(s.run(vec![]).unwrap_err(), Error::MissingInput { .. }));
    let e = s.run(vec![("x".into(), Tensor::from_f32(vec![1, 5], vec![0.0; 5]).unwrap())]).unwrap_err();
    assert!(matches!(e, Error::InputShape { .. }), "{e}");
    let e = s.run(vec![("x".into(), Tensor::from_f32(vec![4], vec![0.0; 4]).unwrap())]).unwrap_err();
    assert!(matches!(e, Error::InputShape { .. }), "{e}");
    let e = s.run(vec![("x".into(), good.cast(DType::I64))]).unwrap_err();
    assert!(matches!(e, Error::InputDType { .. }), "{e}");
    let e = s.run(vec![("x".into(), good.clone()), ("x".into(), good)]).unwrap_err();
    assert!(matches!(e, Error::InvalidTensor(_)), "{e}");
}

#[test]
fn malformed_onnx_is_a_typed_error() {
    for bytes in [&b""[..], b"garbage bytes", &[0x08, 0x07, 0x3a, 0xff, 0xff, 0xff, 0x0f][..]] {
        let e = Session::from_onnx_bytes(bytes, &opts()).err().expect("must fail");
        assert!(matches!(e, Error::MalformedModel(_)), "{e}");
    }
    let good = tiny_classifier().to_bytes();
    for cut in [good.len() / 3, good.len() / 2, good.len() - 1] {
        assert!(Session::from_onnx_bytes(&good[..cut], &opts()).is_err());
    }
}

/// Fuzz reproducers that `Model::check` refuses before a backend sees them, each with the reason it gives.
#[test]
fn sizes_that_would_stall_tract_are_refused_by_the_check() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/onnx_structured");
    for (file, why) in [
        ("averagepool-window-of-half-a-million.onnx", "kernel_shape [2, 253782] covers over 262144"),
        // No elements, but tract's transpose loops over the other dims.
        ("transpose-of-an-empty-input-with-a-7e11-dim.onnx", "declares a shape of over 268435456 elements"),
    ] {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let e = Session::from_onnx_bytes(&bytes, &opts()).err().expect("must fail");
        assert!(matches!(&e, Error::MalformedModel(m) if m.contains(why)), "{file}: {e}");
    }
}

#[test]
fn unsupported_op_names_op_and_node() {
    let m = model(
        vec![node("FrobnicateV9", "mystery_node", &["x"], &["y"], vec![])],
        vec![value_info("x", 1, &[Dim::Fixed(1), Dim::Fixed(4)])],
        vec![value_info("y", 1, &[Dim::Fixed(1), Dim::Fixed(4)])],
        vec![],
    );
    let e = Session::from_model(&m, &opts()).err().unwrap();
    match &e {
        Error::UnsupportedOp { op, node, .. } => {
            assert_eq!(op, "FrobnicateV9");
            assert_eq!(node, "mystery_node");
        }
        other => panic!("expected UnsupportedOp, got {other}"),
    }
    assert!(e.to_string().contains("FrobnicateV9") && e.to_string().contains("mystery_node"));
}

#[test]
fn backend_errors_do_not_panic() {
    // A Reshape to an impossible shape passes the structural checks but fails in the backend.
    let m = model(
        vec![node("Reshape", "bad_reshape", &["x", "shape"], &["y"], vec![])],
        vec![value_info("x", 1, &[Dim::Fixed(2), Dim::Fixed(3)])],
        vec![value_info("y", 1, &[Dim::Fixed(7)])],
        vec![tensor_i64("shape", &[1], &[7])],
    );
    let e = Session::from_model(&m, &opts()).err().expect("reshape 6 -> 7 must fail");
    assert!(matches!(e, Error::Backend { .. } | Error::Internal(_)), "{e}");
}

#[cfg(not(feature = "gpu"))]
#[test]
fn gpu_request_without_gpu_backend_is_a_typed_error() {
    let e =
        Session::from_model(&tiny_classifier(), &SessionOptions { device: edgepack_runtime::Device::Gpu, ..opts() })
            .err()
            .unwrap();
    assert!(matches!(e, Error::Backend { backend: "gpu", .. }), "{e}");
}

/// With the `gpu` feature: a GPU session when there is an adapter, else the same typed error.
#[cfg(feature = "gpu")]
#[test]
fn gpu_request_runs_on_the_adapter_or_is_a_typed_error() {
    let r =
        Session::from_model(&tiny_classifier(), &SessionOptions { device: edgepack_runtime::Device::Gpu, ..opts() });
    match edgepack_runtime::gpu::adapter() {
        Ok(_) => assert!(r.unwrap().backend_description().starts_with("gpu")),
        Err(_) => assert!(matches!(r.err().unwrap(), Error::Backend { backend: "gpu", .. })),
    }
}

#[test]
fn shipped_mnist_model_runs() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models/mnist_cntk_opset8_simplified.onnx");
    let s = Session::open(&p, &opts()).unwrap();
    assert_eq!(s.inputs()[0].shape_string(), "[1,1,28,28]");
    let out = s.run_one(Tensor::from_f32(vec![1, 1, 28, 28], vec![0.0; 784]).unwrap()).unwrap();
    assert_eq!(out[0].1.shape(), &[1, 10]);
    let e = s.run_one(Tensor::from_f32(vec![2, 1, 28, 28], vec![0.0; 1568]).unwrap()).unwrap_err();
    assert!(matches!(e, Error::InputShape { .. }));
}

#[test]
fn intermediate_values_can_be_read() {
    let s = Session::from_model(&tiny_classifier(), &opts()).unwrap();
    let x: Vec<f32> = (0..8).map(|i| i as f32 - 4.0).collect();
    let out = s.run_values(vec![("x".into(), Tensor::from_f32(vec![2, 4], x.clone()).unwrap())], &["h", "y"]).unwrap();
    assert_eq!(out[0].0, "h");
    let h = out[0].1.as_f32().unwrap();
    let y = out[1].1.as_f32().unwrap();
    // y = relu(h), and h has negative entries for this input: the pre-activation value really is exposed.
    assert!(h.iter().any(|&v| v < 0.0));
    for (a, b) in h.iter().zip(y) {
        assert_eq!(a.max(0.0), *b);
    }
    assert_eq!(y, reference(&x).as_slice());
    let e =
        s.run_values(vec![("x".into(), Tensor::from_f32(vec![1, 4], vec![0.0; 4]).unwrap())], &["nope"]).unwrap_err();
    assert!(matches!(e, Error::UnknownValue { .. }), "{e}");
}

/// `free_batch`: a model written for one sample (MNIST, leading dim 1, a Reshape to [1, 256]) takes batches, and
/// each row of a batched run equals the single run of that sample.
#[test]
fn free_batch_runs_batches_equal_to_single_runs() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models/mnist_cntk_opset8_simplified.onnx");
    let o = SessionOptions { free_batch: true, device: edgepack_runtime::Device::Cpu, ..opts() };
    let s = Session::open(&path, &o).unwrap();
    assert!(s.accepts_batch(), "{:?}", s.inputs()[0].shape);
    let sample = |k: usize| (0..784).map(|i| ((i * 31 + k * 97) % 256) as f32 / 255.0).collect::<Vec<f32>>();
    let batch: Vec<f32> = (0..3).flat_map(sample).collect();
    let y = s.run_one(Tensor::from_f32(vec![3, 1, 28, 28], batch).unwrap()).unwrap();
    assert_eq!(y[0].1.shape(), &[3, 10]);
    let rows = y[0].1.to_f32_vec();
    for k in 0..3 {
        let one = s.run_one(Tensor::from_f32(vec![1, 1, 28, 28], sample(k)).unwrap()).unwrap()[0].1.to_f32_vec();
        for (a, b) in rows[k * 10..(k + 1) * 10].iter().zip(&one) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "row {k}: {a} vs {b}");
        }
    }
    // Without the option the model keeps its fixed batch of 1.
    let fixed = Session::open(&path, &SessionOptions { device: edgepack_runtime::Device::Cpu, ..opts() }).unwrap();
    assert!(!fixed.accepts_batch());
}

/// A shape computed by tract comes out as i64, as ONNX has it (tract keeps shapes as `TDim` inside). The GPU backend
/// folds host-known nodes such as `Shape` → `Cast` one at a time through the CPU backend, with untyped outputs.
#[test]
fn computed_shapes_come_out_as_i64() {
    use edgepack_runtime::onnx::ValueInfoProto;
    let untyped = |n: &str| ValueInfoProto { name: Some(n.into()), ..Default::default() };
    let m = model(
        vec![
            node("Shape", "shape", &["c"], &["s"], vec![]),
            node("Cast", "cast", &["s"], &["t"], vec![attr_int("to", 7)]),
        ],
        vec![],
        vec![untyped("s"), untyped("t")],
        vec![tensor_f32("c", &[2, 3], &[0.0; 6])],
    );
    let s = Session::from_model(&m, &opts()).unwrap();
    let out = s.run(vec![]).unwrap();
    for (name, t) in &out {
        assert_eq!(t.dtype(), DType::I64, "{name}");
        assert_eq!(t.to_f32_vec(), [2.0, 3.0], "{name}");
    }
}
