//! The tract backend bounds tract's optimiser (`runtime/backends/tract/src/optim.rs`): a model whose rewrites
//! never converge is a typed error, and the bound leaves real models ten times the room they use (they use 0–5 %).
//! It also checks the input rank of tract's NCHW ops before tract reads their axes (`runtime/backends/tract/src/ops.rs`).
#![cfg(feature = "tract")]

use std::path::{Path, PathBuf};

use edgepack_runtime::cpu::CpuBackend;
use edgepack_runtime::onnx::Model;
use edgepack_runtime::{Backend, DType, Session, SessionOptions};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `onnx_structured` found a mangled attention block on which tract's codegen rewrote forever (a 30 s timeout,
/// still running after 5 minutes); its two-node core: `Add([2,3,4,6] score, [2,3,h,8] value)` then `MatMul` by the
/// value, planned for `h` = 1. The shapes cannot agree; tract's analysis lets them through and two of its rewrites
/// undo each other.
#[test]
fn a_model_whose_rewrites_never_converge_is_a_typed_error() {
    let path = root().join("fuzz/regressions/onnx_structured/add-then-matmul-rewrite-loop.onnx");
    let m = Model::load(&path).unwrap();
    let cpu = CpuBackend::load(&m, &[DType::F32, DType::F32], 1).unwrap();
    let t = std::time::Instant::now();
    let e = cpu.prepare(&[vec![2, 3, 4, 6], vec![2, 3, 1, 8]]).unwrap_err().to_string();
    assert!(e.contains("optimiser did not converge"), "{e}");
    assert!(!e.contains('\n'), "{e}");
    eprintln!("refused in {:.2} s: {e}", t.elapsed().as_secs_f64());
}

/// `onnx_structured` found a BatchNormalization of a rank-1 input: tract's NCHW shape reads the channel axis
/// unchecked (`get_unchecked(1)` of a one-dim shape, undefined behaviour). The rank check refuses it first, and a
/// BatchNormalization of `[N, C]` (BatchNorm1d) still runs.
#[test]
fn nchw_ops_of_too_low_a_rank_are_typed_errors_before_tract_reads_their_axes() {
    let path = root().join("fuzz/regressions/onnx_structured/batchnorm-of-a-rank-one-input.onnx");
    let m = Model::load(&path).unwrap();
    let cpu = CpuBackend::load(&m, &[DType::F32; 5], 1).unwrap();
    let e = cpu.prepare(&[vec![2, 3, 4, 5], vec![3], vec![3], vec![3], vec![3]]).unwrap_err().to_string();
    assert!(e.contains("BatchNorm needs an input of rank 2 or more, not 1"), "{e}");

    use edgepack_runtime::onnx::builder::*;
    use edgepack_runtime::onnx::{Dim, node};
    let params =
        [("s", [1.0, 2.0, 3.0]), ("b", [0.5, 0.0, -0.5]), ("mean", [0.0, 1.0, 2.0]), ("var", [1.0, 4.0, 0.25])];
    let bn1d = model(
        vec![node(
            "BatchNormalization",
            "bn",
            &["x", "s", "b", "mean", "var"],
            &["y"],
            vec![attr_float("epsilon", 0.0)],
        )],
        vec![value_info("x", 1, &[Dim::Fixed(2), Dim::Fixed(3)])],
        vec![value_info("y", 1, &[Dim::Fixed(2), Dim::Fixed(3)])],
        params.iter().map(|(n, v)| tensor_f32(n, &[3], v)).collect(),
    );
    let cpu = CpuBackend::load(&bn1d, &[DType::F32], 1).unwrap();
    let x = edgepack_runtime::Tensor::from_f32(vec![2, 3], vec![1.0, 1.0, 1.0, 2.0, 3.0, 4.0]).unwrap();
    let y = cpu.run(vec![x]).unwrap().remove(0);
    // s·(x − mean)/√var + b per channel.
    assert_eq!(y.as_f32().unwrap(), &[1.5, 0.0, -6.5, 2.5, 2.0, 11.5]);
}

/// Every shipped and shared model plans within a tenth of its cap (batch 1, symbolic dims 1). `CpuBackend::load`
/// lowers the file to kernel nodes as in a session; the session's own edits before it (traced shapes forgotten,
/// 4-bit weights unpacked, a freed batch dim) do not apply to these fp32 files with the default options.
#[test]
fn real_models_use_a_tenth_of_the_rewrite_cap_at_most() {
    let mut dirs = vec![root().join("assets/models")];
    let shared = std::env::var_os("EDGEPACK_SHARED").map_or_else(|| root().join("../shared"), PathBuf::from);
    if shared.join("models").is_dir() {
        dirs.push(shared.join("models"));
    } else {
        eprintln!("!!! SKIPPED the shared models: {} not found !!!", shared.display());
    }
    let (mut n, want) = (0, if dirs.len() > 1 { 12 } else { 3 });
    for dir in dirs {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "onnx")) {
            let m = Model::load(f).unwrap();
            let s = Session::from_model(&m, &SessionOptions { threads: 1, ..Default::default() }).unwrap();
            let dtypes: Vec<DType> = s.inputs().iter().map(|i| i.dtype.unwrap_or(DType::F32)).collect();
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            // Silero VAD's STFT needs a real chunk: 512 samples, not 1.
            let shapes: Vec<Vec<usize>> =
                s.inputs()
                    .iter()
                    .map(|i| {
                        if name.starts_with("silero") && i.name == "input" { vec![1, 512] } else { i.concrete_shape(1) }
                    })
                    .collect();
            let cpu = CpuBackend::load(&m, &dtypes, 1).unwrap();
            if let Err(e) = cpu.prepare(&shapes) {
                // silero_vad.onnx: tract's analysis of the 8 kHz branch fails on a 16 kHz chunk; not the optimiser.
                let e = e.to_string();
                assert!(!e.contains("did not converge"), "{name}: {e}");
                eprintln!("{name}: not planned at {shapes:?}: {e}");
                continue;
            }
            let [used, cap] = cpu.optimiser_rewrites().unwrap();
            eprintln!("{name}: {used} rewrites of {cap} allowed");
            assert!(used * 10 <= cap, "{}: {used} rewrites of {cap}", f.display());
            n += 1;
        }
    }
    assert!(n >= want, "only {n} models planned");
}

/// `onnx_structured` found a Gather of a Gather (a mangled NLLLoss expansion) whose output is 30 G floats: tract
/// allocated 120 GB when the node ran, which aborts the process. The plan's typed facts are checked first.
#[test]
fn a_value_over_the_per_value_limit_is_a_typed_error_before_tract_allocates_it() {
    let path = root().join("fuzz/regressions/onnx_structured/gather-of-120-gb.onnx");
    let m = Model::load(&path).unwrap();
    let cpu = CpuBackend::load(&m, &[DType::F32, DType::I64, DType::F32], 1).unwrap();
    let shapes = [vec![3, 5, 6, 6, 5, 3, 4], vec![3, 6, 6, 5, 3, 4], vec![5, 2]];
    let e = cpu.prepare(&shapes).unwrap_err().to_string();
    assert!(e.contains("over the limit of 1073741824 bytes per value"), "{e}");
    assert!(e.contains("[3, 6, 6, 5, 3, 4, 6, 6, 5, 3, 4, 6, 6, 5, 3, 4]"), "{e}");
    eprintln!("{e}");
}
