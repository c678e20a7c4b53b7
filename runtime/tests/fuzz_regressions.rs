//! The reproducers the fuzzers found (`fuzz/regressions/<target>/`, issue 31), replayed as the fuzz targets ran
//! them: every model loaded on the interpreter and on tract and run on small synthetic inputs, every bundle opened
//! and its members read, every image decoded and pre-processed. Each must end in a result or a typed error, and no
//! panic may start in edgepack's own code (a dependency's panic caught at the session's boundary is tolerated, as
//! in the fuzz targets).
//!
//! One test in its own binary: it installs a process-wide panic hook and sets `EDGEPACK_CPU`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use edgepack_runtime::bundle::{Bundle, OpenOptions};
use edgepack_runtime::onnx::Model;
use edgepack_runtime::process::{ImagePreprocess, PRESETS, decode_image};
use edgepack_runtime::{Device, Session, SessionOptions};

static OWN_PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn files(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions").join(target);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir).map_or(vec![], |d| d.flatten().map(|e| e.path()).collect());
    v.sort();
    v
}

fn run_model(model: &Model) {
    for cpu in ["interp", "tract"] {
        // SAFETY: the only test of this binary; nothing reads the environment concurrently.
        unsafe { std::env::set_var("EDGEPACK_CPU", cpu) };
        let opts = SessionOptions { device: Device::Cpu, threads: 1, ..Default::default() };
        let Ok(s) = Session::from_model(model, &opts) else { continue };
        let feeds: Option<Vec<_>> = s
            .inputs()
            .iter()
            .enumerate()
            .map(|(k, i)| {
                let n: usize = i.concrete_shape(1).iter().product();
                (n <= 1 << 16).then(|| i.synthetic(1, k as u64).map(|t| (i.name.clone(), t))).flatten()
            })
            .collect();
        if let Some(feeds) = feeds {
            let _ = s.run(feeds);
        }
    }
}

#[test]
fn every_fuzz_reproducer_ends_in_a_result_or_a_typed_error() {
    std::panic::set_hook(Box::new(|info| {
        let trace = std::backtrace::Backtrace::force_capture().to_string();
        let location = info.location().map(|l| l.file());
        let culprit =
            edgepack_runtime::panic_culprit(location, &trace, "fuzz_regressions.rs").unwrap_or_default().to_string();
        if edgepack_runtime::is_dependency_source(&culprit) {
            eprintln!("tolerated, a dependency's panic: {info} (in {culprit})");
        } else {
            // The test's own assertion failures come through here too: print them.
            eprintln!("{info} (in {culprit})");
            OWN_PANICS.lock().unwrap().push(format!("{info} (in {culprit})"));
        }
    }));
    let mut n = 0;
    for f in files("onnx_load").into_iter().chain(files("onnx_structured")) {
        let bytes = std::fs::read(&f).unwrap();
        if let Ok(m) = Model::from_bytes(&bytes) {
            run_model(&m);
        }
        n += 1;
        let own = std::mem::take(&mut *OWN_PANICS.lock().unwrap());
        assert!(own.is_empty(), "{}: {own:?}", f.display());
    }
    for f in files("bundle_open") {
        if let Ok(b) = Bundle::from_bytes(std::fs::read(&f).unwrap(), &OpenOptions::default()) {
            for m in b.manifest().members.clone() {
                let _ = b.member(&m.path);
            }
            let opts = SessionOptions { device: Device::Cpu, threads: 1, ..Default::default() };
            let _ = Session::from_bundle(b, &opts);
        }
        n += 1;
        let own = std::mem::take(&mut *OWN_PANICS.lock().unwrap());
        assert!(own.is_empty(), "{}: {own:?}", f.display());
    }
    // As the fuzz target runs them: decode, then every preset at four input sizes. (Timeouts are the fuzz run's to
    // catch; here each must finish and end in a tensor or a typed error.)
    for f in files("image_preprocess") {
        if let Ok(img) = decode_image(&std::fs::read(&f).unwrap()) {
            for (k, name) in PRESETS.iter().enumerate() {
                let (h, w) = [(224, 224), (28, 28), (240, 320), (1, 7)][k % 4];
                let _ = ImagePreprocess::preset(name, h, w).unwrap().apply(&img);
            }
        }
        n += 1;
        let own = std::mem::take(&mut *OWN_PANICS.lock().unwrap());
        assert!(own.is_empty(), "{}: {own:?}", f.display());
    }
    let _ = std::panic::take_hook();
    assert!(n > 0, "no reproducer found under fuzz/regressions");
}
