//! GPU backend tests. They need a wgpu adapter (Mesa lavapipe counts: `apt-get install mesa-vulkan-drivers
//! libvulkan1`). Without one they say loudly that they were skipped, unless `EDGEPACK_REQUIRE_GPU=1` (set by
//! `.ci/run`), which turns a missing adapter into a failure.
#![cfg(feature = "gpu")]
use std::path::{Path, PathBuf};

use edgepack_runtime::onnx::{Model, builder};
use edgepack_runtime::{Device, Error, Session, SessionOptions, Tensor};

fn gpu_or_skip(test: &str) -> bool {
    match edgepack_runtime::gpu::adapter() {
        Ok(a) => {
            eprintln!("{test}: running on {}", a.short());
            true
        }
        Err(why) => {
            if std::env::var("EDGEPACK_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{test}: EDGEPACK_REQUIRE_GPU=1 but there is no GPU adapter: {why}");
            }
            eprintln!("\n!!! SKIPPED {test}: no GPU adapter ({why}); install mesa-vulkan-drivers for lavapipe !!!\n");
            false
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn opts(device: Device) -> SessionOptions {
    SessionOptions { device, threads: 1, ..Default::default() }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-30)
}

#[test]
fn tiny_model_matches_cpu_and_says_gpu() {
    if !gpu_or_skip("tiny_model_matches_cpu_and_says_gpu") {
        return;
    }
    let m = builder::tiny_classifier();
    let gpu = Session::from_model(&m, &opts(Device::Gpu)).unwrap();
    let cpu = Session::from_model(&m, &opts(Device::Cpu)).unwrap();
    assert!(gpu.backend_description().starts_with("gpu (wgpu "), "{}", gpu.backend_description());
    let x = Tensor::from_f32(vec![3, 4], (0..12).map(|i| i as f32 * 0.3 - 1.0).collect()).unwrap();
    let g = gpu.run_one(x.clone()).unwrap();
    let c = cpu.run_one(x).unwrap();
    assert_eq!(g[0].1.shape(), c[0].1.shape());
    for (a, b) in g[0].1.to_f32_vec().iter().zip(c[0].1.to_f32_vec()) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn unsupported_op_is_a_typed_error_naming_it() {
    if !gpu_or_skip("unsupported_op_is_a_typed_error_naming_it") {
        return;
    }
    let mut m = builder::tiny_classifier();
    m.graph.nodes[1].op_type = Some("Mish".into());
    match Session::from_model(&m, &opts(Device::Gpu)) {
        Err(Error::UnsupportedOp { op, backend, node, .. }) => {
            assert_eq!((op.as_str(), backend, node.as_str()), ("Mish", "gpu", "relu"));
        }
        Err(e) => panic!("expected UnsupportedOp, got {e}"),
        Ok(_) => panic!("expected an error"),
    }
    // Auto falls back to the CPU and says why.
    let s = Session::from_model(&m, &opts(Device::Auto)).unwrap();
    assert!(s.backend_selection().contains("Mish"), "{}", s.backend_selection());
    assert!(s.backend_description().starts_with("cpu"));
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    if !gpu_or_skip("bad_inputs_are_errors_not_panics") {
        return;
    }
    let s = Session::from_model(&builder::tiny_classifier(), &opts(Device::Gpu)).unwrap();
    let wrong = Tensor::from_f32(vec![2, 5], vec![0.0; 10]).unwrap();
    assert!(matches!(s.run_one(wrong), Err(Error::InputShape { .. })));
    // A Reshape to an impossible shape, found when the plan is built.
    let mut m = builder::tiny_classifier();
    m.graph.initializers.push(builder::tensor_i64("shape", &[1], &[7]));
    m.graph.nodes.push(edgepack_runtime::onnx::node("Reshape", "r", &["y", "shape"], &["z"], vec![]));
    m.graph.outputs[0].name = Some("z".into());
    let s = Session::from_model(&m, &opts(Device::Gpu)).unwrap();
    let err = s.run_one(Tensor::from_f32(vec![1, 4], vec![0.0; 4]).unwrap()).unwrap_err();
    assert!(err.to_string().contains("Reshape"), "{err}");
}

/// Shared models: the GPU's outputs against the CPU backend's on real inputs (fp32: cosine ≥ 0.9999, same top-1).
#[test]
fn shared_models_match_cpu() {
    if !gpu_or_skip("shared_models_match_cpu") {
        return;
    }
    let photos = root().join("assets/photos");
    let cases: [(&str, &str, [usize; 4]); 4] = [
        ("assets/models/efficientnet_lite0_fp32.onnx", "skimage_chelsea.png", [1, 3, 224, 224]),
        ("../shared/models/squeezenet1.0_fp32.onnx", "skimage_coffee.png", [1, 3, 224, 224]),
        ("assets/models/ultraface_rfb_320.onnx", "skimage_astronaut.png", [1, 3, 240, 320]),
        ("assets/models/mnist_cntk_opset8_simplified.onnx", "", [1, 1, 28, 28]),
    ];
    for (path, photo, shape) in cases {
        let path = root().join(path);
        if !path.exists() {
            eprintln!("!!! SKIPPED {}: not found (../shared absent?) !!!", path.display());
            continue;
        }
        let model = Model::load(&path).unwrap();
        let n: usize = shape.iter().product();
        // A real photo when there is one, resized crudely (the comparison is GPU vs CPU, not accuracy).
        let data: Vec<f32> = if photo.is_empty() {
            (0..n).map(|i| ((i * 37) % 255) as f32 / 255.0).collect()
        } else {
            let img = image::open(photos.join(photo)).unwrap().to_rgb8();
            let (h, w) = if shape[3] == 3 { (shape[1], shape[2]) } else { (shape[2], shape[3]) };
            let img = image::imageops::resize(&img, w as u32, h as u32, image::imageops::FilterType::Triangle);
            let mut v = vec![0f32; n];
            for (x, y, p) in img.enumerate_pixels() {
                for c in 0..3 {
                    let val = (p[c] as f32 / 255.0 - 0.45) / 0.25;
                    let i = if shape[3] == 3 {
                        (y as usize * w + x as usize) * 3 + c
                    } else {
                        c * h * w + y as usize * w + x as usize
                    };
                    v[i] = val;
                }
            }
            v
        };
        let x = Tensor::from_f32(shape.to_vec(), data).unwrap();
        let gpu = Session::from_model(&model, &opts(Device::Gpu)).unwrap();
        let cpu = Session::from_model(&model, &opts(Device::Cpu)).unwrap();
        let g = gpu.run_one(x.clone()).unwrap();
        let c = cpu.run_one(x).unwrap();
        for ((name, gt), (_, ct)) in g.iter().zip(&c) {
            assert_eq!(gt.shape(), ct.shape(), "{name}");
            let (gv, cv) = (gt.to_f32_vec(), ct.to_f32_vec());
            let cos = cosine(&gv, &cv);
            eprintln!("{}: {name} cosine {cos:.7}", path.display());
            assert!(cos >= 0.9999, "{}: {name} cosine {cos}", path.display());
            if gv.len() >= 10 && gt.shape().len() == 2 {
                let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
                assert_eq!(argmax(&gv), argmax(&cv), "{}: top-1", path.display());
            }
        }
    }
}

/// A QDQ weight (per-channel int8 + DequantizeLinear) stays int8 on the device and is dequantized there.
#[test]
fn int8_weights_stay_int8_on_the_device() {
    if !gpu_or_skip("int8_weights_stay_int8_on_the_device") {
        return;
    }
    use edgepack_runtime::gpu::{GpuBackend, Precision};
    use edgepack_runtime::onnx::{Dim, node};
    let (o, i) = (16usize, 32usize);
    let q: Vec<u8> = (0..o * i).map(|k| ((k * 7 % 255) as i32 - 127) as i8 as u8).collect();
    let scales: Vec<f32> = (0..o).map(|c| 0.01 + c as f32 * 0.001).collect();
    let m = builder::model(
        vec![
            node("DequantizeLinear", "dq", &["wq", "ws"], &["w"], vec![builder::attr_int("axis", 0)]),
            node("Gemm", "fc", &["x", "w"], &["y"], vec![builder::attr_int("transB", 1)]),
        ],
        vec![builder::value_info("x", 1, &[Dim::Fixed(2), Dim::Fixed(i)])],
        vec![builder::value_info("y", 1, &[Dim::Fixed(2), Dim::Fixed(o)])],
        vec![builder::tensor_raw("wq", &[o as i64, i as i64], 3, q), builder::tensor_f32("ws", &[o as i64], &scales)],
    );
    let x = Tensor::from_f32(vec![2, i], (0..2 * i).map(|k| (k as f32 * 0.37).sin()).collect()).unwrap();
    let cpu = Session::from_model(&m, &opts(Device::Cpu)).unwrap().run_one(x.clone()).unwrap();
    let g = GpuBackend::load_with_precision(&m, Precision::F32, edgepack_runtime::session::host_loader()).unwrap();
    use edgepack_runtime::Backend;
    assert!(g.describe().contains("int8 weights"), "{}", g.describe());
    g.prepare(&[vec![2, i]]).unwrap();
    let (float_bytes, int8_bytes) = g.weight_bytes();
    assert_eq!(int8_bytes, o * i, "int8 bytes resident");
    assert!(float_bytes < o * i, "the weight must not be resident as f32 ({float_bytes} bytes)");
    let out = g.run(vec![x]).unwrap();
    for (a, b) in out[0].to_f32_vec().iter().zip(cpu[0].1.to_f32_vec()) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
}

/// Parameters fed at run time: an int64 input that goes through arithmetic before it is a Slice bound, and Resize
/// scales given as a graph input. Both stay on the host (the plan is specialised on their values) and the results
/// match the CPU backend running the same graph with those values as initializers; new values give a new plan.
#[test]
fn run_time_parameters_stay_on_the_host() {
    if !gpu_or_skip("run_time_parameters_stay_on_the_host") {
        return;
    }
    use edgepack_runtime::onnx::{Dim, node};
    // `fed`: n and scales are graph inputs; otherwise initializers holding these values.
    let graph = |fed: Option<(i64, [f32; 4])>| {
        let mut inputs =
            vec![builder::value_info("x", 1, &[Dim::Fixed(1), Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(5)])];
        let mut inits = vec![
            builder::tensor_i64("one", &[1], &[1]),
            builder::tensor_i64("zero", &[1], &[0]),
            builder::tensor_i64("axis3", &[1], &[3]),
        ];
        match fed {
            None => {
                inputs.push(builder::value_info("n", 7, &[Dim::Fixed(1)]));
                inputs.push(builder::value_info("scales", 1, &[Dim::Fixed(4)]));
            }
            Some((n, scales)) => {
                inits.push(builder::tensor_i64("n", &[1], &[n]));
                inits.push(builder::tensor_f32("scales", &[4], &scales));
            }
        }
        builder::model(
            vec![
                node("Add", "end", &["n", "one"], &["end"], vec![]),
                node("Slice", "slice", &["x", "zero", "end", "axis3"], &["s"], vec![]),
                node("Resize", "resize", &["s", "", "scales"], &["y"], vec![builder::attr_string("mode", "linear")]),
            ],
            inputs,
            vec![builder::value_info("y", 1, &["a", "b", "c", "d"].map(|d| Dim::Symbolic(d.into())))],
            inits,
        )
    };
    let gpu = Session::from_model(&graph(None), &opts(Device::Gpu)).unwrap();
    let x = Tensor::from_f32(vec![1, 2, 3, 5], (0..30).map(|i| (i as f32 * 0.7).sin()).collect()).unwrap();
    for (n, scales) in [(3i64, [1.0f32, 1.0, 2.0, 1.5]), (1, [1.0, 1.0, 0.5, 3.0])] {
        let g = gpu
            .run(vec![
                ("x".to_string(), x.clone()),
                ("n".to_string(), Tensor::new(vec![1], edgepack_runtime::TensorData::I64(vec![n])).unwrap()),
                ("scales".to_string(), Tensor::from_f32(vec![4], scales.to_vec()).unwrap()),
            ])
            .unwrap();
        let cpu = Session::from_model(&graph(Some((n, scales))), &opts(Device::Cpu)).unwrap();
        let c = cpu.run_one(x.clone()).unwrap();
        assert_eq!(g[0].1.shape(), c[0].1.shape(), "n={n}");
        for (a, b) in g[0].1.to_f32_vec().iter().zip(c[0].1.to_f32_vec()) {
            assert!((a - b).abs() < 1e-5, "n={n}: {a} vs {b}");
        }
    }
}
