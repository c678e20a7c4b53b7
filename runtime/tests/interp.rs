//! The kernel interpreter (the CPU backend of builds without tract, `EDGEPACK_CPU=interp` otherwise) against the
//! tract backend on the shipped models: the same kernels give the same numbers, batches split per sample, several
//! threads equal one, and ops outside its set are refused at load with a typed error naming the op.
use edgepack_runtime::interp::InterpBackend;
use edgepack_runtime::onnx::builder::*;
use edgepack_runtime::onnx::{Dim, Model, node};
use edgepack_runtime::{Backend, Error, Session, SessionOptions, Tensor};

fn asset(name: &str) -> Model {
    Model::load(format!("{}/../assets/models/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// A deterministic input in [0, 1) of the model's first input shape with batch `n`.
fn input(m: &Model, n: usize) -> Tensor {
    let s = Session::from_model(m, &SessionOptions { threads: 1, ..Default::default() }).unwrap();
    let mut shape = s.inputs()[0].concrete_shape(1);
    shape[0] = n;
    let len: usize = shape.iter().product();
    let mut x = 0x2545f491u32;
    let v = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as f32 / (1u32 << 24) as f32
        })
        .collect();
    Tensor::from_f32(shape, v).unwrap()
}

fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.shape(), b.shape(), "{what}");
    let (a, b) = (a.to_f32_vec(), b.to_f32_vec());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= 1e-5 * scale, "{what}: element {i}: {x} vs {y}");
    }
}

const MODELS: [&str; 3] =
    ["efficientnet_lite0_fp32.onnx", "mnist_cntk_opset8_simplified.onnx", "ultraface_rfb_320.onnx"];

#[test]
fn shipped_models_run_with_finite_outputs() {
    for name in MODELS {
        let m = asset(name);
        let out = InterpBackend::load(&m, 1).unwrap().run(vec![input(&m, 1)]).unwrap();
        assert!(!out.is_empty() && out.iter().all(|t| !t.is_empty() && t.to_f32_vec().iter().all(|v| v.is_finite())));
    }
}

#[cfg(feature = "tract")]
#[test]
fn shipped_models_match_the_tract_backend() {
    for name in MODELS {
        let m = asset(name);
        let x = input(&m, 1);
        let interp = InterpBackend::load(&m, 1).unwrap();
        let tract = edgepack_runtime::cpu::CpuBackend::load(&m, &[x.dtype()], 1).unwrap();
        let (a, b) = (interp.run(vec![x.clone()]).unwrap(), tract.run(vec![x]).unwrap());
        assert_eq!(a.len(), b.len());
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert_close(a, b, &format!("{name} output {i}"));
        }
        assert!(interp.describe().contains("kernel interpreter"));
    }
}

#[test]
fn batches_and_threads_give_the_per_sample_answer() {
    let mut m = asset("efficientnet_lite0_fp32.onnx");
    m.graph.free_batch_dim();
    let x = input(&m, 3);
    let one = InterpBackend::load(&m, 1).unwrap();
    let two = InterpBackend::load(&m, 2).unwrap();
    let batch = one.run(vec![x.clone()]).unwrap().remove(0);
    assert_eq!(batch, two.run(vec![x.clone()]).unwrap().remove(0), "2 threads differ from 1");
    let per = x.len() / 3;
    let v = x.to_f32_vec();
    let mut shape = x.shape().to_vec();
    shape[0] = 1;
    let classes = batch.len() / 3;
    for i in 0..3 {
        let xi = Tensor::from_f32(shape.clone(), v[i * per..(i + 1) * per].to_vec()).unwrap();
        let yi = one.run(vec![xi]).unwrap().remove(0);
        let row = Tensor::from_f32(yi.shape().to_vec(), batch.to_f32_vec()[i * classes..(i + 1) * classes].to_vec());
        assert_close(&row.unwrap(), &yi, &format!("sample {i}"));
    }
}

#[test]
fn ops_outside_the_set_are_refused_by_name() {
    let d = |n: usize| Dim::Fixed(n);
    // `Det` is outside the interpreter's table (Resize, refused here before issue 26, now runs).
    let m = model(
        vec![node("Det", "det", &["x"], &["y"], vec![])],
        vec![value_info("x", 1, &[d(3), d(3)])],
        vec![value_info("y", 1, &[])],
        vec![],
    );
    match InterpBackend::load(&m, 1) {
        Err(Error::UnsupportedOp { op, backend, node, .. }) => {
            assert_eq!((op.as_str(), backend, node.as_str()), ("Det", "cpu", "det"))
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("Det must be refused"),
    }
}

#[test]
fn wrong_input_shapes_are_errors_not_panics() {
    let m = asset("efficientnet_lite0_fp32.onnx");
    let b = InterpBackend::load(&m, 1).unwrap();
    // The session checks declared shapes first; the backend itself must still fail cleanly on what its kernels cannot take.
    for shape in [vec![1, 224, 224], vec![0, 224, 224, 3], vec![1, 2, 2, 3]] {
        let x = Tensor::from_f32(shape.clone(), vec![0.5; shape.iter().product()]).unwrap();
        assert!(b.run(vec![x]).is_err(), "{shape:?} must be refused");
    }
}

/// A `kernel_shape` that is not the weights' spatial shape is refused (onnxruntime refuses it too): constant
/// weights at load, weights fed at run time when the node runs. Conv 2-D, 1-D and 3-D, and ConvTranspose.
#[test]
fn a_kernel_shape_other_than_the_weights_is_an_error() {
    let d = |n: usize| Dim::Fixed(n);
    let conv = |op: &str, x: &[usize], w: &[usize], k: &[i64], w_input: bool| {
        let xd: Vec<Dim> = x.iter().map(|&n| d(n)).collect();
        let wd: Vec<Dim> = w.iter().map(|&n| d(n)).collect();
        let wn: usize = w.iter().product();
        let mut inputs = vec![value_info("x", 1, &xd)];
        let mut inits = vec![];
        if w_input {
            inputs.push(value_info("w", 1, &wd));
        } else {
            let dims: Vec<i64> = w.iter().map(|&n| n as i64).collect();
            inits.push(tensor_f32("w", &dims, &vec![0.5; wn]));
        }
        model(
            vec![node(op, "c", &["x", "w"], &["y"], vec![attr_ints("kernel_shape", k)])],
            inputs,
            vec![value_info("y", 1, &[])],
            inits,
        )
    };
    // (op, input shape, weight shape, a kernel_shape that disagrees)
    type Case = (&'static str, &'static [usize], &'static [usize], &'static [i64]);
    let cases: [Case; 4] = [
        ("Conv", &[1, 2, 8, 8], &[3, 2, 3, 3], &[5, 5]),
        ("Conv", &[1, 2, 8], &[3, 2, 3], &[3, 3]),
        ("Conv", &[1, 2, 4, 4, 4], &[3, 2, 3, 3, 3], &[3, 3, 2]),
        ("ConvTranspose", &[1, 2, 4, 4], &[2, 3, 3, 3], &[5, 5]),
    ];
    for (op, x, w, k) in cases {
        for w_input in [false, true] {
            let m = conv(op, x, w, k, w_input);
            let feeds = |b: &InterpBackend| {
                let mut v = vec![Tensor::from_f32(x.to_vec(), vec![1.0; x.iter().product()]).unwrap()];
                if w_input {
                    v.push(Tensor::from_f32(w.to_vec(), vec![0.5; w.iter().product()]).unwrap());
                }
                b.run(v)
            };
            let e = match InterpBackend::load(&m, 1) {
                Err(e) => e,
                Ok(b) => feeds(&b).expect_err("must be refused"),
            };
            assert!(
                e.to_string().contains("is not the weights' spatial shape"),
                "{op} {k:?} (weights fed: {w_input}): {e}"
            );
            // The same node with the right kernel_shape runs.
            let good: Vec<i64> = w[2..].iter().map(|&n| n as i64).collect();
            let b = InterpBackend::load(&conv(op, x, w, &good, w_input), 1).unwrap();
            feeds(&b).unwrap_or_else(|e| panic!("{op} {good:?}: {e}"));
        }
    }
}
