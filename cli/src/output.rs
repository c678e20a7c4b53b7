//! What the CLI prints besides results: `--json` documents (one schema, versioned), warnings and notes on stderr
//! under `--quiet`/`--verbose`, progress bars, and the one-line error.
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use serde_json::{Map, Value, json};

/// Version of the `--json` documents' layout; bumped when a field changes meaning or goes away.
pub const SCHEMA_VERSION: u32 = 1;

static QUIET: AtomicBool = AtomicBool::new(false);
static VERBOSE: AtomicU8 = AtomicU8::new(0);
static JSON_ERRORS: AtomicBool = AtomicBool::new(false);
static JSON_FAILURE_PRINTED: AtomicBool = AtomicBool::new(false);

pub fn set_verbosity(quiet: bool, verbose: u8) {
    QUIET.store(quiet, Ordering::Relaxed);
    VERBOSE.store(verbose, Ordering::Relaxed);
}

pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

pub fn verbose() -> u8 {
    VERBOSE.load(Ordering::Relaxed)
}

/// Failures are also reported as a JSON document on stdout (`--json`).
pub fn set_json_errors(on: bool) {
    JSON_ERRORS.store(on, Ordering::Relaxed);
}

pub fn json_errors() -> bool {
    JSON_ERRORS.load(Ordering::Relaxed)
}

/// A warning on stderr (hidden by `--quiet`).
pub fn warn(msg: impl std::fmt::Display) {
    if !quiet() {
        eprintln!("warning: {msg}");
    }
}

/// A note on stderr shown with `--verbose`.
pub fn note(msg: impl std::fmt::Display) {
    if verbose() > 0 && !quiet() {
        eprintln!("note: {msg}");
    }
}

/// The fields every `--json` document starts with.
fn header(ok: bool) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("schema_version".into(), json!(SCHEMA_VERSION));
    m.insert("edgepack_version".into(), json!(edgepack_runtime::VERSION));
    m.insert("ok".into(), json!(ok));
    m
}

fn with_header(ok: bool, v: Value) -> Value {
    let mut m = header(ok);
    match v {
        Value::Object(o) => m.extend(o),
        other => {
            m.insert("result".into(), other);
        }
    }
    Value::Object(m)
}

/// Prints a command's `--json` result: an object with `schema_version`, `edgepack_version` and `ok: true` first.
pub fn json(v: Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(&with_header(true, v))?);
    Ok(())
}

/// As [`json`], on one line (large tensors).
pub fn json_line(v: Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(&with_header(true, v))?);
    Ok(())
}

/// A command's own failure document (its results, `ok: false` and the `error`), for a failure that still has
/// results to report (`batch` with failed items); `main` then prints no second document.
pub fn json_failure(code: u8, kind: &str, message: &str, v: Value) -> anyhow::Result<()> {
    let mut doc = with_header(false, v);
    doc["error"] = json!({"code": code, "kind": kind, "message": message});
    println!("{}", serde_json::to_string(&doc)?);
    JSON_FAILURE_PRINTED.store(true, Ordering::Relaxed);
    Ok(())
}

pub fn json_failure_printed() -> bool {
    JSON_FAILURE_PRINTED.load(Ordering::Relaxed)
}

/// The failure document of `--json`: `{"ok": false, "error": {"code", "kind", "message"}}` on stdout.
pub fn json_error(code: u8, kind: &str, message: &str) {
    let v = with_header(false, json!({"error": {"code": code, "kind": kind, "message": message}}));
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

/// One line for an error and its causes, each cause once: a cause whose text its parent already quotes (an I/O
/// error inside "path: error") is not repeated.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// A progress bar on stderr (hidden when stderr is not a terminal, and under `--quiet`).
pub fn progress(n: usize, what: &str) -> indicatif::ProgressBar {
    if quiet() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} [{elapsed_precise} < {eta_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}

/// Who wrote a report: this build's version, the command line as typed (shell-quoted where needed) and the time.
pub fn provenance() -> edgepack_quantize::report::Provenance {
    let quote = |a: String| {
        if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
            a
        } else {
            format!("'{}'", a.replace('\'', r"'\''"))
        }
    };
    let mut args = std::env::args();
    let prog = args
        .next()
        .map(|p| std::path::Path::new(&p).file_name().map_or(p.clone(), |f| f.to_string_lossy().into_owned()));
    let command = prog.into_iter().chain(args.map(quote)).collect::<Vec<_>>().join(" ");
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    edgepack_quantize::report::Provenance {
        edgepack: env!("CARGO_PKG_VERSION").into(),
        command,
        utc: edgepack_runtime::utc_rfc3339(secs, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_quoted_by_its_parent_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)");
        let e = anyhow::Error::new(edgepack_runtime::Error::io("x.onnx", io)).context("loading x.onnx");
        assert_eq!(error_line(&e), "loading x.onnx: x.onnx: No such file or directory (os error 2)");
        let e = anyhow::anyhow!("invalid key: bad length").context("reading key k.pub");
        assert_eq!(error_line(&e), "reading key k.pub: invalid key: bad length");
    }

    #[test]
    fn json_documents_carry_the_schema_and_version() {
        let v = with_header(true, json!({"x": 1}));
        assert_eq!(v["schema_version"], SCHEMA_VERSION);
        assert_eq!(v["ok"], true);
        assert_eq!(v["x"], 1);
    }
}
