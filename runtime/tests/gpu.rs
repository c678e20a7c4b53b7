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

/// A session that `Device::Auto` puts on the CPU never starts the GPU device: once started, burn's device server
/// thread wakes every 150 µs for the life of the process and takes turns on the cores the CPU kernels use. The
/// check runs in a child process of this test binary (the other tests here start the device in this one).
#[test]
fn auto_on_the_cpu_starts_no_gpu_device() {
    const NAME: &str = "auto_on_the_cpu_starts_no_gpu_device";
    if std::env::var("EDGEPACK_TEST_CHILD").is_ok_and(|v| v == NAME) {
        assert!(edgepack_runtime::gpu::adapter().is_ok());
        // An op the GPU lacks sends Auto to the CPU whatever the adapter (lavapipe would anyway, being software).
        let mut m = builder::tiny_classifier();
        m.graph.nodes[1].op_type = Some("Mish".into());
        let s = Session::from_model(&m, &opts(Device::Auto)).unwrap();
        assert!(s.backend_description().starts_with("cpu"), "{}", s.backend_description());
        s.run_one(Tensor::from_f32(vec![1, 4], vec![0.5; 4]).unwrap()).unwrap();
        assert!(!edgepack_runtime::gpu::device_started(), "Auto on the CPU started the GPU device");
        // The counter-check: a GPU session does start it.
        Session::from_model(&builder::tiny_classifier(), &opts(Device::Gpu)).unwrap();
        assert!(edgepack_runtime::gpu::device_started());
        return;
    }
    if !gpu_or_skip(NAME) {
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([NAME, "--exact", "--nocapture", "--test-threads", "1"])
        .env("EDGEPACK_TEST_CHILD", NAME)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("1 passed"), "the child test failed:\n{text}");
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
    let cases: [(&str, &str, [usize; 4]); 5] = [
        ("assets/models/efficientnet_lite0_fp32.onnx", "skimage_chelsea.png", [1, 3, 224, 224]),
        ("../shared/models/squeezenet1.0_fp32.onnx", "skimage_coffee.png", [1, 3, 224, 224]),
        ("assets/models/ultraface_rfb_320.onnx", "skimage_astronaut.png", [1, 3, 240, 320]),
        ("assets/models/mnist_cntk_opset8_simplified.onnx", "", [1, 1, 28, 28]),
        ("../shared/models/yolov8n-doclaynet.onnx", "skimage_coffee.png", [1, 3, 1024, 1024]),
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
        gpu.run_one(x.clone()).unwrap();
        let g = gpu.run_one(x.clone()).unwrap();
        let c = cpu.run_one(x.clone()).unwrap();
        // Issue 28: each runs as one fused program: one submission, nothing allocated on the device by a
        // steady-state run; the CNN classifiers in at most 60 dispatches.
        let counters = gpu.run_counters();
        eprintln!("{}: {counters:?}", path.display());
        let k = counters.unwrap_or_else(|| panic!("{}: not fused", path.display()));
        assert!(k.submissions == 1 && k.alloc_bytes == 0, "{}: {k:?}", path.display());
        if path.to_string_lossy().contains("efficientnet") || path.to_string_lossy().contains("squeezenet") {
            assert!(k.dispatches <= 60, "{}: {k:?}", path.display());
        }
        let compare = |g: &[(String, Tensor)], what: &str, min_cos: f64| {
            for ((name, gt), (_, ct)) in g.iter().zip(&c) {
                assert_eq!(gt.shape(), ct.shape(), "{name}");
                let (gv, cv) = (gt.to_f32_vec(), ct.to_f32_vec());
                let cos = cosine(&gv, &cv);
                eprintln!("{}{what}: {name} cosine {cos:.7}", path.display());
                assert!(cos >= min_cos, "{}{what}: {name} cosine {cos}", path.display());
                if gv.len() >= 10 && gt.shape().len() == 2 {
                    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
                    assert_eq!(argmax(&gv), argmax(&cv), "{}{what}: top-1", path.display());
                }
            }
        };
        compare(&g, "", 0.9999);
        // f16 storage (f32 arithmetic) on adapters with shader-f16, for the models that are quick on lavapipe:
        // the same fused program shape, the top-1 kept.
        let quick = !path.to_string_lossy().contains("yolov8n");
        if quick && edgepack_runtime::gpu::adapter().is_ok_and(|a| a.shader_f16) {
            use edgepack_runtime::Backend;
            use edgepack_runtime::gpu::{GpuBackend, Precision};
            let h = GpuBackend::load_with_precision(&model, Precision::F16, edgepack_runtime::session::host_loader())
                .unwrap();
            h.run(vec![x.clone()]).unwrap();
            let hv = h.run(vec![x.clone()]).unwrap();
            let hk = h.run_counters().unwrap_or_else(|| panic!("{}: f16 not fused", path.display()));
            assert_eq!((hk.submissions, hk.alloc_bytes, hk.dispatches), (1, 0, k.dispatches), "{}", path.display());
            let named: Vec<(String, Tensor)> = g.iter().map(|(n, _)| n.clone()).zip(hv).collect();
            compare(&named, " (f16 storage)", 0.999);
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

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// Every kernel of the fused programs and their fusions against the CPU backend: pointwise convolutions
/// (pixel counts with and without a multiple of 4, batch 2), depthwise with strides and asymmetric pads, a grouped
/// 3×3, the stem shape (3 input channels), Clip/Relu/SiLU/HardSwish epilogues, a residual Add, a Concat stored in
/// place by its convolutions and one copied (a pooled input), Max/Average/Global pools, Gemm with transB, bias and
/// alpha/beta, MatMul, Softmax, a standalone broadcast Mul. Each must run as one fused program (counters present)
/// with no device memory allocated by its second run.
#[test]
fn fused_kernels_match_cpu() {
    if !gpu_or_skip("fused_kernels_match_cpu") {
        return;
    }
    let f16 = edgepack_runtime::gpu::adapter().is_ok_and(|a| a.shader_f16);
    if !f16 {
        eprintln!("!!! fused_kernels_match_cpu: the adapter has no shader-f16; f16 storage not tested !!!");
    }
    use builder::{attr_float, attr_int, attr_ints, tensor_f32, value_info};
    use edgepack_runtime::onnx::{Dim, node};
    let conv_w = |name: &str, o: usize, i: usize, k: usize, seed: u32| {
        tensor_f32(name, &[o as i64, i as i64, k as i64, k as i64], &values(o * i * k * k, seed))
    };
    let bias = |name: &str, o: usize, seed: u32| tensor_f32(name, &[o as i64], &values(o, seed));
    let conv = |name: &str, x: &str, w: &str, b: &str, y: &str, k: i64, s: i64, pads: &[i64], group: i64| {
        node(
            "Conv",
            name,
            &[x, w, b],
            &[y],
            vec![
                attr_ints("kernel_shape", &[k, k]),
                attr_ints("strides", &[s, s]),
                attr_ints("pads", pads),
                attr_int("group", group),
            ],
        )
    };
    let fixed = |d: &[usize]| d.iter().map(|&v| Dim::Fixed(v)).collect::<Vec<_>>();
    let out = |name: &str| value_info(name, 1, &[]);
    type Case = (&'static str, edgepack_runtime::onnx::Model, Vec<usize>, usize);
    let mut cases: Vec<Case> = Vec::with_capacity(5);
    // Pointwise 7×7 (49 pixels) with batch 2, Clip; then a pointwise 8×8 with a residual Add.
    cases.push((
        "pointwise+clip, residual add",
        builder::model(
            vec![
                conv("c1", "x", "w1", "b1", "h", 1, 1, &[0, 0, 0, 0], 1),
                node("Clip", "clip", &["h", "lo", "hi"], &["y"], vec![]),
                conv("c2", "x8", "w2", "b2", "g", 1, 1, &[0, 0, 0, 0], 1),
                node("Add", "res", &["g", "x8"], &["y2"], vec![]),
            ],
            vec![value_info("x", 1, &fixed(&[2, 12, 7, 7])), value_info("x8", 1, &fixed(&[2, 12, 8, 8]))],
            vec![out("y"), out("y2")],
            vec![
                conv_w("w1", 18, 12, 1, 1),
                bias("b1", 18, 2),
                conv_w("w2", 12, 12, 1, 3),
                bias("b2", 12, 4),
                tensor_f32("lo", &[], &[0.0]),
                tensor_f32("hi", &[], &[0.5]),
            ],
        ),
        vec![2, 12, 7, 7],
        2,
    ));
    // Depthwise 3×3 stride 2 with asymmetric pads, 5×5 stride 1; stem 3→8 3×3/2; grouped 3×3 + SiLU; HardSwish.
    cases.push((
        "depthwise, stem, grouped, silu, hardswish",
        builder::model(
            vec![
                conv("stem", "x", "ws", "bs", "s", 3, 2, &[0, 0, 1, 1], 1),
                conv("dw", "s", "wd", "bd", "d", 3, 2, &[0, 0, 1, 1], 8),
                conv("dw5", "d", "wd5", "bd5", "d5", 5, 1, &[2, 2, 2, 2], 8),
                conv("grp", "d5", "wg", "bg", "g", 3, 1, &[1, 1, 1, 1], 2),
                node("Sigmoid", "sig", &["g"], &["gs"], vec![]),
                node("Mul", "silu", &["g", "gs"], &["gm"], vec![]),
                node("HardSwish", "hsw", &["gm"], &["y"], vec![]),
            ],
            vec![value_info("x", 1, &fixed(&[1, 3, 19, 21]))],
            vec![out("y")],
            vec![
                conv_w("ws", 8, 3, 3, 5),
                bias("bs", 8, 6),
                conv_w("wd", 8, 1, 3, 7),
                bias("bd", 8, 8),
                conv_w("wd5", 8, 1, 5, 9),
                bias("bd5", 8, 10),
                conv_w("wg", 12, 4, 3, 11),
                bias("bg", 12, 12),
            ],
        ),
        vec![1, 3, 19, 21],
        1,
    ));
    // A fire module: squeeze, two expands concatenated (stored in place), a pooled input concatenated (copied).
    cases.push((
        "concat in place and copied, pools",
        builder::model(
            vec![
                conv("sq", "x", "wq", "bq", "q", 1, 1, &[0, 0, 0, 0], 1),
                node("Relu", "rq", &["q"], &["qr"], vec![]),
                conv("e1", "qr", "we1", "be1", "e1", 1, 1, &[0, 0, 0, 0], 1),
                node("Relu", "r1", &["e1"], &["e1r"], vec![]),
                conv("e3", "qr", "we3", "be3", "e3", 3, 1, &[1, 1, 1, 1], 1),
                node("Relu", "r3", &["e3"], &["e3r"], vec![]),
                node(
                    "MaxPool",
                    "mp",
                    &["x"],
                    &["mp"],
                    vec![
                        attr_ints("kernel_shape", &[3, 3]),
                        attr_ints("strides", &[1, 1]),
                        attr_ints("pads", &[1, 1, 1, 1]),
                    ],
                ),
                node("Concat", "cat", &["e1r", "e3r", "mp"], &["cat"], vec![attr_int("axis", 1)]),
                node(
                    "AveragePool",
                    "ap",
                    &["cat"],
                    &["ap"],
                    vec![
                        attr_ints("kernel_shape", &[2, 2]),
                        attr_ints("strides", &[2, 2]),
                        attr_ints("pads", &[0, 0, 1, 1]),
                    ],
                ),
                node("GlobalAveragePool", "gap", &["ap"], &["y"], vec![]),
                node("GlobalMaxPool", "gmp", &["cat"], &["y2"], vec![]),
            ],
            vec![value_info("x", 1, &fixed(&[2, 6, 9, 9]))],
            vec![out("y"), out("y2")],
            vec![
                conv_w("wq", 4, 6, 1, 13),
                bias("bq", 4, 14),
                conv_w("we1", 8, 4, 1, 15),
                bias("be1", 8, 16),
                conv_w("we3", 8, 4, 3, 17),
                bias("be3", 8, 18),
            ],
        ),
        vec![2, 6, 9, 9],
        2,
    ));
    // Classifier heads: Gemm (transB, alpha, beta, bias) → Softmax; MatMul → standalone broadcast Mul.
    cases.push((
        "gemm, matmul, softmax, broadcast mul",
        builder::model(
            vec![
                node(
                    "Gemm",
                    "fc",
                    &["x", "W", "c"],
                    &["h"],
                    vec![attr_int("transB", 1), attr_float("alpha", 0.5), attr_float("beta", 2.0)],
                ),
                node("Softmax", "sm", &["h"], &["y"], vec![]),
                node("MatMul", "mm", &["x", "M"], &["m"], vec![]),
                node("Mul", "scale", &["m", "sc"], &["y2"], vec![]),
                node("Relu", "r", &["m"], &["y3"], vec![]),
            ],
            vec![value_info("x", 1, &fixed(&[3, 37]))],
            vec![out("y"), out("y2"), out("y3")],
            vec![
                tensor_f32("W", &[10, 37], &values(370, 19)),
                tensor_f32("c", &[10], &values(10, 20)),
                tensor_f32("M", &[37, 6], &values(222, 21)),
                tensor_f32("sc", &[3, 1], &[1.0, -2.0, 0.5]),
            ],
        ),
        vec![3, 37],
        3,
    ));
    // Data movement: Transpose, Softmax along an inner axis, Slice with steps (and reversed), Split, Resize nearest.
    let i64s = |name: &str, v: &[i64]| builder::tensor_i64(name, &[v.len() as i64], v);
    cases.push((
        "transpose, inner softmax, slice, split, resize",
        builder::model(
            vec![
                node("Transpose", "tr", &["x"], &["t"], vec![attr_ints("perm", &[0, 2, 3, 1])]),
                node("Softmax", "sm", &["t"], &["y"], vec![attr_int("axis", 1)]),
                node("Slice", "sl", &["x", "s0", "e0", "a0", "st0"], &["sl"], vec![]),
                node("Split", "sp", &["x", "splits"], &["sp0", "sp1"], vec![attr_int("axis", 1)]),
                node("Add", "add", &["sp0", "sl"], &["y2"], vec![]),
                node("Relu", "relu", &["sp1"], &["y3"], vec![]),
                node(
                    "Resize",
                    "rz",
                    &["x", "", "scales"],
                    &["y4"],
                    vec![
                        builder::attr_string("mode", "nearest"),
                        builder::attr_string("coordinate_transformation_mode", "asymmetric"),
                        builder::attr_string("nearest_mode", "floor"),
                    ],
                ),
                node("Slice", "rev", &["x", "s1", "e1", "a1", "st1"], &["y5"], vec![]),
            ],
            vec![value_info("x", 1, &fixed(&[1, 6, 5, 4]))],
            vec![out("y"), out("y2"), out("y3"), out("y4"), out("y5")],
            vec![
                i64s("s0", &[1, 0]),
                i64s("e0", &[5, 4]),
                i64s("a0", &[1, 3]),
                i64s("st0", &[2, 1]),
                i64s("splits", &[2, 4]),
                tensor_f32("scales", &[4], &[1.0, 1.0, 2.0, 1.5]),
                i64s("s1", &[-1]),
                i64s("e1", &[-1_000_000_000]),
                i64s("a1", &[2]),
                i64s("st1", &[-1]),
            ],
        ),
        vec![1, 6, 5, 4],
        5,
    ));
    for (what, m, shape, outputs) in cases {
        let xs: Vec<Tensor> = m
            .graph
            .inputs
            .iter()
            .enumerate()
            .map(|(k, v)| {
                let dims: Vec<usize> = edgepack_runtime::onnx::value_info_to_type(v)
                    .and_then(|t| t.shape)
                    .map(|s| s.iter().map(|d| if let Dim::Fixed(v) = d { *v } else { 1 }).collect())
                    .unwrap_or_else(|| shape.clone());
                let n = dims.iter().product();
                Tensor::from_f32(dims, values(n, 100 + k as u32)).unwrap()
            })
            .collect();
        let feeds = |s: &Session| -> Vec<(String, Tensor)> {
            s.inputs().iter().map(|i| i.name.clone()).zip(xs.iter().cloned()).collect()
        };
        let gpu = Session::from_model(&m, &opts(Device::Gpu)).unwrap();
        let cpu = Session::from_model(&m, &opts(Device::Cpu)).unwrap();
        let c = cpu.run(feeds(&cpu)).unwrap();
        gpu.run(feeds(&gpu)).unwrap();
        let g = gpu.run(feeds(&gpu)).unwrap();
        let counters = gpu.run_counters().unwrap_or_else(|| panic!("{what}: not run as a fused program"));
        assert_eq!(counters.alloc_bytes, 0, "{what}: {counters:?}");
        assert_eq!(counters.submissions, 1, "{what}: {counters:?}");
        assert_eq!(g.len(), outputs, "{what}");
        for ((name, gt), (_, ct)) in g.iter().zip(&c) {
            assert_eq!(gt.shape(), ct.shape(), "{what}: {name}");
            for (i, (a, b)) in gt.to_f32_vec().iter().zip(ct.to_f32_vec()).enumerate() {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{what}: {name}[{i}] {a} vs {b}");
            }
        }
        eprintln!("{what}: {} dispatches, matches the CPU", counters.dispatches);
        // f16 storage (adapters with shader-f16): the same program with every float activation stored as f16
        // and f32 arithmetic. Each stored value is rounded once to f16 (relative 2^-11), so the outputs stay
        // within a few f16 steps of the CPU's, measured against the output's scale.
        if !f16 {
            continue;
        }
        use edgepack_runtime::Backend;
        use edgepack_runtime::gpu::{GpuBackend, Precision};
        let h = GpuBackend::load_with_precision(&m, Precision::F16, edgepack_runtime::session::host_loader()).unwrap();
        h.run(xs.clone()).unwrap();
        let hv = h.run(xs.clone()).unwrap();
        let k = h.run_counters().unwrap_or_else(|| panic!("{what}: f16 not run as a fused program"));
        assert_eq!((k.alloc_bytes, k.submissions, k.dispatches), (0, 1, counters.dispatches), "{what}: f16 {k:?}");
        for (ht, (name, ct)) in hv.iter().zip(&c) {
            assert_eq!(ht.shape(), ct.shape(), "{what}: f16 {name}");
            let cv = ct.to_f32_vec();
            let scale = cv.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
            let worst = ht.to_f32_vec().iter().zip(&cv).map(|(a, b)| (a - b).abs() / scale).fold(0f32, f32::max);
            eprintln!("{what}: f16 {name}: largest difference {worst:.2e} of the output's scale");
            assert!(worst <= 2e-3, "{what}: f16 {name}: {worst} of the output's scale {scale}");
            // And the values did go through f16 (an f32 program would differ by float rounding only).
            assert!(worst >= 1e-5, "{what}: f16 {name}: {worst}: stored as f32?");
        }
    }
}

/// The convolutions' tiles: every tile computes the same values, bit for bit (one child process per tile fixed by
/// `EDGEPACK_GPU_PW` or `EDGEPACK_GPU_CONV`, each also against the CPU backend); with `EDGEPACK_GPU_AUTOTUNE=1` every tile is
/// timed at load, the fastest kept (the default unless another is 3 % faster), the choice written to the cache
/// directory, and a second process reads it from there instead of timing again.
#[test]
fn pointwise_tiles_are_tuned_and_cached() {
    const NAME: &str = "pointwise_tiles_are_tuned_and_cached";
    if std::env::var("EDGEPACK_TEST_CHILD").is_ok_and(|v| v == NAME) {
        tiles_child();
        return;
    }
    if !gpu_or_skip(NAME) {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let child = |env: &[(&str, &str)]| -> String {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([NAME, "--exact", "--nocapture", "--test-threads", "1"]).env("EDGEPACK_TEST_CHILD", NAME);
        cmd.env("EDGEPACK_CACHE_DIR", cache.path()).env_remove("EDGEPACK_GPU_PW").env_remove("EDGEPACK_GPU_AUTOTUNE");
        let out = cmd.envs(env.iter().copied()).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("1 passed"), "the child test ({env:?}) failed:\n{text}");
        // (libtest may print `test NAME ... ` on the same line.)
        let bits = text.lines().find_map(|l| l.split("OUTPUT BITS ").nth(1)).expect("no output bits");
        bits.chars().take(16).collect()
    };
    let mut seen = Vec::new();
    for tile in ["2x2", "1x1", "2x1", "1x2", "4x2", "2x4"] {
        seen.push((tile, child(&[("EDGEPACK_GPU_PW", tile), ("EDGEPACK_TEST_EXPECT", "fixed")])));
    }
    for ov in ["1", "4"] {
        seen.push((ov, child(&[("EDGEPACK_GPU_CONV", ov), ("EDGEPACK_TEST_EXPECT", "fixed")])));
    }
    seen.push(("tuned", child(&[("EDGEPACK_GPU_AUTOTUNE", "1"), ("EDGEPACK_TEST_EXPECT", "measured")])));
    assert!(cache.path().join("gpu-tiles.json").exists(), "no tile cache written");
    seen.push(("cached", child(&[("EDGEPACK_GPU_AUTOTUNE", "1"), ("EDGEPACK_TEST_EXPECT", "cached")])));
    assert!(seen.iter().all(|(_, b)| *b == seen[0].1), "tiles computed different values: {seen:?}");
}

/// The child of [`pointwise_tiles_are_tuned_and_cached`]: three pointwise convolutions (49 pixels with batch 2
/// and a Relu, a SiLU epilogue, 64 pixels) and two 3×3 ones (20 channels; 2 groups of 6) on the GPU against the
/// CPU; prints a hash of the outputs' bits.
fn tiles_child() {
    use builder::{tensor_f32, value_info};
    use edgepack_runtime::Backend;
    use edgepack_runtime::gpu::{GpuBackend, TuneSource};
    use edgepack_runtime::onnx::{Dim, node};
    let pw = |name: &str, x: &str, w: &str, b: &str, y: &str| node("Conv", name, &[x, w, b], &[y], vec![]);
    let w =
        |name: &str, o: usize, i: usize, seed: u32| tensor_f32(name, &[o as i64, i as i64, 1, 1], &values(o * i, seed));
    let b = |name: &str, o: usize, seed: u32| tensor_f32(name, &[o as i64], &values(o, seed));
    let fixed = |d: &[usize]| d.iter().map(|&v| Dim::Fixed(v)).collect::<Vec<_>>();
    let m = builder::model(
        vec![
            pw("c1", "x", "w1", "b1", "h1"),
            node("Relu", "relu", &["h1"], &["h"], vec![]),
            pw("c2", "h", "w2", "b2", "g"),
            node("Sigmoid", "sig", &["g"], &["gs"], vec![]),
            node("Mul", "silu", &["g", "gs"], &["y"], vec![]),
            pw("c3", "x8", "w3", "b3", "y2"),
            node("Conv", "k3", &["x8", "w4", "b4"], &["y3"], vec![builder::attr_ints("pads", &[1, 1, 1, 1])]),
            node("Conv", "g3", &["y3", "w5", "b5"], &["y4"], vec![builder::attr_int("group", 2)]),
        ],
        vec![value_info("x", 1, &fixed(&[2, 12, 7, 7])), value_info("x8", 1, &fixed(&[1, 24, 8, 8]))],
        vec![value_info("y", 1, &[]), value_info("y2", 1, &[]), value_info("y4", 1, &[])],
        vec![
            w("w1", 18, 12, 1),
            b("b1", 18, 2),
            w("w2", 40, 18, 3),
            b("b2", 40, 4),
            w("w3", 20, 24, 5),
            b("b3", 20, 6),
            tensor_f32("w4", &[20, 24, 3, 3], &values(20 * 24 * 9, 9)),
            b("b4", 20, 10),
            tensor_f32("w5", &[12, 10, 3, 3], &values(12 * 10 * 9, 11)),
            b("b5", 12, 12),
        ],
    );
    let xs = vec![
        Tensor::from_f32(vec![2, 12, 7, 7], values(2 * 12 * 49, 7)).unwrap(),
        Tensor::from_f32(vec![1, 24, 8, 8], values(24 * 64, 8)).unwrap(),
    ];
    let cpu = Session::from_model(&m, &opts(Device::Cpu)).unwrap();
    let feeds: Vec<(String, Tensor)> = cpu.inputs().iter().map(|i| i.name.clone()).zip(xs.iter().cloned()).collect();
    let c = cpu.run(feeds).unwrap();
    let g = GpuBackend::load(&m, edgepack_runtime::session::host_loader()).unwrap();
    g.run(xs.clone()).unwrap();
    let out = g.run(xs).unwrap();
    assert!(g.run_counters().is_some(), "not fused");
    let mut hash = 0xcbf29ce484222325u64;
    for (gt, (name, ct)) in out.iter().zip(&c) {
        for (a, b) in gt.to_f32_vec().iter().zip(ct.to_f32_vec()) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{name}: {a} vs {b}");
            hash = (hash ^ a.to_bits() as u64).wrapping_mul(0x100000001b3);
        }
    }
    let tuning = g.tuning();
    eprintln!("{tuning:?}");
    match std::env::var("EDGEPACK_TEST_EXPECT").unwrap().as_str() {
        "fixed" => assert!(tuning.is_empty(), "{tuning:?}"),
        expect => {
            // Three pointwise kernels (six tiles each), the 3×3 one of 20 channels (three), the grouped one of
            // 6 channels a group (two).
            let counts: Vec<usize> = tuning.iter().map(|t| t.us.len()).collect();
            assert_eq!(counts, [6, 6, 6, 3, 2], "{tuning:?}");
            for t in &tuning {
                let source = if expect == "measured" { TuneSource::Measured } else { TuneSource::Cached };
                assert_eq!(t.source, source, "{t:?}");
                assert!(t.us.iter().all(|(_, us)| *us > 0.0 && us.is_finite()), "{t:?}");
                // The kept tile is the default (listed first) or faster than it.
                let kept = t.us.iter().find(|(tile, _)| *tile == t.tile).unwrap().1;
                assert!(t.tile == t.us[0].0 || kept < t.us[0].1, "{t:?}");
            }
        }
    }
    println!("OUTPUT BITS {hash:016x}");
}
