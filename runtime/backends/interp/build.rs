//! Selective builds: `EDGEPACK_INTERP_OPS=FILE` (one ONNX op per line, `#` comments; what `edgepack ops` writes)
//! compiles the interpreter with only those ops in its table, so an app's library carries only what its models
//! use (ONNX Runtime's reduced-operator build, TFLite's selective build). Unset: every op.
use std::io::Write;

fn main() {
    println!("cargo:rerun-if-env-changed=EDGEPACK_INTERP_OPS");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("selected_ops.rs");
    let list = match std::env::var("EDGEPACK_INTERP_OPS") {
        Ok(path) if !path.is_empty() => {
            println!("cargo:rerun-if-changed={path}");
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("EDGEPACK_INTERP_OPS={path}: {e} (write it with `edgepack ops`)"));
            let ops: Vec<String> = text
                .lines()
                .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
                .filter(|l| !l.is_empty())
                .collect();
            for op in &ops {
                assert!(op.chars().all(|c| c.is_ascii_alphanumeric()), "{path}: `{op}` is not an op name");
            }
            let quoted: Vec<String> = ops.iter().map(|o| format!("{o:?}")).collect();
            format!("Some(&[{}])", quoted.join(", "))
        }
        _ => "None".into(),
    };
    let mut f = std::fs::File::create(&out).expect("writing selected_ops.rs");
    writeln!(f, "/// The ops of a selective build (`EDGEPACK_INTERP_OPS`); `None`: every op.").unwrap();
    writeln!(f, "pub const SELECTED: Option<&[&str]> = {list};").unwrap();
}
