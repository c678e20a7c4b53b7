//! Typed errors of the runtime. Every failure a caller can cause (bad files, bad inputs, bad bundles) maps to
//! one of these variants; nothing in the public API panics on bad input.
use std::path::PathBuf;

/// Result alias used across the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a valid ONNX model (protobuf decode failure or an inconsistent graph).
    #[error("malformed ONNX model: {0}")]
    MalformedModel(String),
    /// An operator the chosen backend cannot execute.
    #[error("unsupported operator `{op}` (domain `{domain}`) at node `{node}` on the {backend} backend")]
    UnsupportedOp { op: String, domain: String, node: String, backend: &'static str },
    /// The backend failed while analysing, optimising or running the model.
    #[error("{backend} backend: {message}")]
    Backend { backend: &'static str, message: String },
    #[error("unknown input `{name}`; the model's inputs are: {expected}")]
    UnknownInput { name: String, expected: String },
    #[error("no value `{name}` in the model (ask for graph inputs, node outputs or model outputs)")]
    UnknownValue { name: String },
    #[error("missing input `{name}`")]
    MissingInput { name: String },
    #[error("input `{name}`: expected dtype {expected}, got {got}")]
    InputDType { name: String, expected: String, got: String },
    #[error("input `{name}`: expected shape {expected}, got {got:?}")]
    InputShape { name: String, expected: String, got: Vec<usize> },
    /// A tensor whose declared shape does not match its data.
    #[error("invalid tensor: {0}")]
    InvalidTensor(String),
    #[error("{}", bundle_message(.0))]
    Bundle(#[from] BundleError),
    #[error("image: {0}")]
    Image(String),
    #[error("pre/post-processing: {0}")]
    Processing(String),
    #[error("invalid .npy data: {0}")]
    Npy(String),
    /// A bug caught at the API boundary (a panic inside a dependency). Reported, never propagated as a panic.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A bundle error as one line: "invalid bundle: ..." for the bundle's own faults; a wrong key file or variant
/// name is the caller's, and says so without blaming the bundle.
fn bundle_message(e: &BundleError) -> String {
    match e {
        BundleError::Key(_) | BundleError::NoSuchVariant { .. } => e.to_string(),
        _ => format!("invalid bundle: {e}"),
    }
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

/// Runs `f`, turning a panic inside it (from a dependency) into [`Error::Internal`].
pub fn no_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(Error::Internal(format!("{what}: {msg}")))
        }
    }
}

/// Where a panic started, from the text of its backtrace: the innermost frame outside the standard library and
/// outside files containing `skip` (the panic hook's own). The fuzz targets and their regression test tell an
/// engine panic (a bug) from a dependency's panic that [`no_panic`] turns into a typed error with it.
///
/// A release build without debug info resolves no source files (or only C ones, such as libc's thread start, never
/// where a Rust panic began): then the origin is the innermost function after the panic machinery that is not the
/// standard library's, by its symbol (`tract_onnx::ops::einsum::resolve_ellipsis`).
pub fn panic_origin<'a>(backtrace: &'a str, skip: &str) -> Option<&'a str> {
    let file = backtrace.lines().filter_map(|l| l.trim_start().strip_prefix("at ")).find(|f| {
        let file = f.split(':').next().unwrap_or(f);
        let c = [".c", ".h", ".S", ".cc", ".cpp"].iter().any(|e| file.ends_with(e));
        !f.starts_with("/rustc/") && !f.contains("/library/") && !f.contains(skip) && !c
    });
    file.or_else(|| {
        let symbols: Vec<&str> = backtrace
            .lines()
            .filter_map(|l| l.trim_start().split_once(": ").filter(|(n, _)| n.parse::<u32>().is_ok()).map(|(_, s)| s))
            .collect();
        let start = symbols.iter().rposition(|s| s.contains("rust_begin_unwind") || s.contains("panicking::"))?;
        symbols[start + 1..].iter().copied().find(|s| !STD_CRATES.contains(&symbol_crate(s)))
    })
}

/// Whose panic it is, for a panic hook: the panic's own location (`PanicHookInfo::location`) when it lies outside
/// the standard library, since an index, an `unwrap` or an arithmetic overflow reports its caller there
/// (`#[track_caller]`), else [`panic_origin`] of the backtrace. The location comes first because a backtrace may
/// resolve no file for an inlined dependency frame: a tract panic inside a rule called through edgepack's
/// wrapper of that rule showed the wrapper as its innermost file.
pub fn panic_culprit<'a>(location: Option<&'a str>, backtrace: &'a str, skip: &str) -> Option<&'a str> {
    location
        .filter(|f| !f.starts_with("/rustc/") && !f.contains("/library/") && !f.contains(skip))
        .or_else(|| panic_origin(backtrace, skip))
        .or(location)
}

const STD_CRATES: [&str; 6] = ["std", "core", "alloc", "__rustc", "panic_unwind", "test"];

/// The crate of a symbol: `tract_core` for `<tract_core::ops::X as tract_core::ops::EvalOp>::eval`.
fn symbol_crate(symbol: &str) -> &str {
    symbol.trim_start_matches('<').split("::").next().unwrap_or(symbol)
}

/// Whether a panic origin ([`panic_origin`]) belongs to a dependency: a source path in cargo's registry or git
/// checkouts, or a symbol of a crate that is neither edgepack's nor a test's.
pub fn is_dependency_source(path: &str) -> bool {
    if path.contains('/') || path.ends_with(".rs") {
        return path.contains("/.cargo/registry/") || path.contains("/.cargo/git/");
    }
    let krate = symbol_crate(path);
    !krate.starts_with("edgepack") && !krate.starts_with("fuzz") && !STD_CRATES.contains(&krate)
}

/// Why a bundle was rejected.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not an .edgepack bundle (bad magic)")]
    NotABundle,
    #[error("truncated: {0}")]
    Truncated(String),
    #[error("unsupported {what} version {found} (this build reads version {supported})")]
    UnsupportedVersion { what: &'static str, found: u64, supported: u32 },
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("corrupt structure: {0}")]
    Corrupt(String),
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("member `{member}` is tampered or corrupt: sha256 {actual} does not match the manifest's {expected}")]
    Tampered { member: String, expected: String, actual: String },
    #[error("signature: {0}")]
    Signature(String),
    #[error("no member `{0}` in the bundle")]
    MissingMember(String),
    #[error("no variant `{wanted}`; the bundle has: {available}")]
    NoSuchVariant { wanted: String, available: String },
    #[error("invalid key: {0}")]
    Key(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_origin_is_the_innermost_rust_frame_outside_std() {
        let trace = "   0: std::backtrace::Backtrace::create\n             at /rustc/abc/library/std/src/backtrace.rs:331:13\n   \
                     1: hook\n             at ./fuzz/src/lib.rs:20:21\n   \
                     2: core::panicking::panic_bounds_check\n             at /rustc/abc/library/core/src/panicking.rs:280:5\n   \
                     3: op_split\n             at ./runtime/backends/interp/src/shape.rs:86:15\n";
        assert_eq!(panic_origin(trace, "fuzz/src/lib.rs"), Some("./runtime/backends/interp/src/shape.rs:86:15"));
        // A release build may resolve nothing but libc's thread start: no origin, the caller falls back to the
        // panic's own location.
        let libc_only = "  9: start_thread\n             at ./nptl/pthread_create.c:442:8\n";
        assert_eq!(panic_origin(libc_only, "x"), None);
        // Without source files, the symbols tell: here tract's einsum, past the panic machinery and `core`.
        let symbols = "   0: fuzz_regressions::every::{{closure}}\n   1: std::panicking::panic_with_hook\n   \
                       2: __rustc::rust_begin_unwind\n   3: core::panicking::panic_fmt\n   \
                       4: <core::ops::range::Range<usize> as core::iter::Iterator>::next\n   \
                       5: tract_onnx::ops::einsum::resolve_ellipsis\n   \
                       6: <edgepack_tract::CpuBackend as edgepack_backend::Backend>::prepare\n";
        let origin = panic_origin(symbols, "fuzz_regressions.rs");
        assert_eq!(origin, Some("tract_onnx::ops::einsum::resolve_ellipsis"));
        assert!(is_dependency_source(origin.unwrap()));
        assert!(!is_dependency_source("<edgepack_tract::CpuBackend as edgepack_backend::Backend>::prepare"));
        assert!(!is_dependency_source("edgepack_interp::nn::op_einsum"));
        assert!(is_dependency_source("/root/.cargo/registry/src/index.crates.io-x/ndarray-0.17.2/src/zip/mod.rs"));
        assert!(!is_dependency_source("./runtime/backends/interp/src/shape.rs"));
    }

    #[test]
    fn panic_culprit_is_the_panics_own_location_unless_that_is_std() {
        // tract's conv rules indexed past the inputs, called through edgepack's rank check: the backtrace's
        // innermost file is edgepack's, the panic's location tract's.
        let trace = "   8: rules
   9: rules
             at ./runtime/backends/tract/src/ops.rs:114:29
";
        let tract = "/root/.cargo/registry/src/index.crates.io-x/tract-hir-0.23.9/src/ops/cnn/conv.rs";
        assert_eq!(panic_culprit(Some(tract), trace, "fuzz/src/lib.rs"), Some(tract));
        assert!(is_dependency_source(panic_culprit(Some(tract), trace, "fuzz/src/lib.rs").unwrap()));
        // A panic raised inside std (a capacity overflow) is blamed on the backtrace's innermost frame.
        let std = "/rustc/abc/library/alloc/src/raw_vec/mod.rs";
        assert_eq!(panic_culprit(Some(std), trace, "x"), Some("./runtime/backends/tract/src/ops.rs:114:29"));
        assert_eq!(panic_culprit(Some(std), "", "x"), Some(std));
    }
}
