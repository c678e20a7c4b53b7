//! `edgepack`: a thin command line over the library crates. Arguments are parsed here; the work happens in
//! `edgepack-runtime` and `edgepack-packager`.
mod bench;
mod commands;
mod config;
mod demo;
mod interrupt;
mod output;
mod prune;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

/// Exit codes (documented in the README and in `edgepack --help`).
pub mod exit {
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const VERIFY: u8 = 3;
    pub const BAD_INPUT: u8 = 4;
    pub const UNSUPPORTED: u8 = 5;
    /// 128 + SIGINT, as shells report it.
    pub const INTERRUPTED: u8 = 130;

    /// The `kind` of an exit code in `--json` error documents.
    pub fn kind(code: u8) -> &'static str {
        match code {
            USAGE => "usage",
            VERIFY => "verification",
            BAD_INPUT => "bad_input",
            UNSUPPORTED => "unsupported",
            INTERRUPTED => "interrupted",
            _ => "failure",
        }
    }
}

const AFTER_HELP: &str = "\
Exit codes: 0 ok, 1 failure, 2 usage (a bad flag or value), 3 bundle verification failed (truncated, tampered,
wrong key), 4 bad input (malformed model, wrong input name/shape/dtype, unreadable or missing file), 5 unsupported
(operator or device), 130 interrupted (SIGINT/SIGTERM; partial files are removed).
With --json, a failure is also a JSON document on stdout: {\"ok\": false, \"error\": {\"code\", \"kind\", \"message\"}}.

Environment:
  EDGEPACK_LOG            log filter of `serve` and the libraries (e.g. info, debug, edgepack_server=trace);
                          --log-level and -v override it
  EDGEPACK_GPU=off        never use the GPU (--device auto runs on the CPU)
  EDGEPACK_GPU_PRECISION  f16: f16 activations (f32 arithmetic) on GPUs with shader-f16
  EDGEPACK_GPU_AUTOTUNE   0: no tile timing at GPU load; 1: time tiles on a software adapter too
  EDGEPACK_CACHE_DIR      where --device auto caches its measured choice and the GPU its tuned tiles
                          (default ~/.cache/edgepack)
  EDGEPACK_ALLOC_CACHE_MB freed large buffers kept for reuse by later runs, in MiB (default 1024; 0: none)";

#[derive(Parser)]
#[command(
    name = "edgepack",
    version,
    about = "Package, verify, run and benchmark edge ML models (.onnx and .edgepack bundles)",
    after_help = AFTER_HELP,
    propagate_version = true
)]
struct Cli {
    /// More detail on stderr: the backend chosen and why, notes; log level debug (-vv: trace)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Print only results and errors: no progress bars, notes or warnings
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Log level of `serve` and the libraries (overrides EDGEPACK_LOG)
    #[arg(long, global = true, value_name = "LEVEL", value_parser = ["error", "warn", "info", "debug", "trace"])]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// Options shared by every command that loads a model.
#[derive(Args, Clone, Debug)]
pub struct LoadArgs {
    /// CPU threads (0 = one per core)
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Backend: auto (the GPU when it runs every op and was measured faster), cpu or gpu
    #[arg(long, default_value = "auto")]
    pub device: edgepack_runtime::Device,
    /// Bundle variant to load (default: the bundle's first, usually fp32)
    #[arg(long)]
    pub variant: Option<String>,
    /// Trusted public key (.pub): the bundle must be signed by it
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Free a leading input dim fixed at 1 so the model takes batches (--batch N); what `serve` does when it
    /// batches requests
    #[arg(long)]
    pub free_batch: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a model or bundle: inputs, outputs, ops, variants, signature
    Inspect {
        /// Model (.onnx) or bundle (.edgepack)
        path: PathBuf,
        /// Print a JSON document instead of text
        #[arg(long)]
        json: bool,
        /// Trusted public key (.pub): the bundle must be signed by it
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Run a model on images, .npy files or raw tensors; print top-k, detections or tensors
    Run(commands::RunArgs),
    /// Accuracy on a labelled dataset (labels.csv + images/, one folder per class, or MNIST IDX files)
    Eval(commands::EvalArgs),
    /// Quantize an fp32 model to INT8 (QDQ: per-channel int8 weights, uint8 activations) calibrated on real samples
    #[command(args_override_self = true)]
    Quantize(commands::QuantizeArgs),
    /// Prune an fp32 model: unstructured (magnitude zeros, for a smaller zstd bundle) or structured (whole
    /// channels removed, for speed), repaired by bias correction, by a uniform amount or a plan under a budget
    Prune(prune::PruneArgs),
    /// Pack an ONNX model with its pre/post-processing, labels and reports into a .edgepack bundle
    Pack(commands::PackArgs),
    /// Check a bundle's structure, member hashes and signature
    Verify {
        /// The .edgepack bundle
        bundle: PathBuf,
        /// Trusted public key; without it a signature is checked for integrity only
        #[arg(long)]
        key: Option<PathBuf>,
        /// Print a JSON document instead of text
        #[arg(long)]
        json: bool,
    },
    /// Generate an ed25519 signing key pair: <OUT>.key (secret) and <OUT>.pub
    Keygen {
        /// Path stem of the pair: writes <OUT>.key and <OUT>.pub
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Measure load time, first run, latency percentiles, throughput and peak memory of a model, or of a running
    /// `edgepack serve` (--url) at a concurrency sweep
    Bench(bench::BenchArgs),
    /// Bulk inference over a folder of images or a JSONL file of KServe v2 requests; JSON lines out, written
    /// atomically and resumable after an interruption
    Batch(commands::BatchArgs),
    /// Merge the outputs of every shard of a `batch --shard I/N` run into one file in input order
    BatchMerge(commands::BatchMergeArgs),
    /// Serve a repository of bundles over the KServe v2 protocol (HTTP), with dynamic batching and routing
    Serve(commands::ServeArgs),
    /// Offline demo: pack the shipped EfficientNet-Lite0, verify it, classify the shipped photos
    Demo(demo::DemoArgs),
    /// The devices a session can run on: the CPU, and the GPU adapter (or why there is none)
    Devices {
        /// Print a JSON document instead of text
        #[arg(long)]
        json: bool,
    },
    /// Re-write an ONNX file through edgepack's graph type (lossless), optionally applying cleanup passes
    Rewrite {
        /// The ONNX model to read
        input: PathBuf,
        /// Where to write the result (atomically)
        output: PathBuf,
        /// Sort nodes topologically
        #[arg(long)]
        topo_sort: bool,
        /// Drop initializers nothing reads
        #[arg(long)]
        remove_unused_initializers: bool,
        /// Upgrade the default-domain opset to this version (e.g. 13)
        #[arg(long)]
        opset: Option<i64>,
        /// Free a leading dim fixed at 1 (inputs, outputs, constant Reshape targets) so that other runtimes take
        /// batches of the model as `serve` and `bench --free-batch` do
        #[arg(long)]
        free_batch: bool,
    },
    /// The ONNX ops the kernel interpreter needs for these models or bundles (every variant): the list a selective
    /// mobile build takes (`EDGEPACK_INTERP_OPS=FILE`, mobile/README.md)
    Ops(commands::OpsArgs),
    /// Shell completions on stdout: `edgepack completions bash > /etc/bash_completion.d/edgepack`
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Man pages: edgepack.1 and edgepack-COMMAND.1 for each command, written into a folder
    Man {
        /// Folder to write the pages into (created)
        #[arg(long, default_value = "man")]
        out: PathBuf,
    },
}

/// `--version`: the version, the commit and what this build has in it.
fn long_version() -> &'static str {
    let v = format!(
        "{} (commit {}; features: {}; tract {})",
        env!("CARGO_PKG_VERSION"),
        env!("EDGEPACK_COMMIT"),
        edgepack_runtime::features().join(", "),
        edgepack_runtime::cpu::TRACT_VERSION,
    );
    Box::leak(v.into_boxed_str())
}

fn command() -> clap::Command {
    Cli::command().long_version(long_version())
}

/// Rust ignores SIGPIPE, so writing to a closed pipe is an error that `println!` turns into a panic; the default
/// disposition ends the process the way Unix filters end.
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: signal(2) with a valid signal number and the default handler, before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Mesa's Vulkan device-selection layer (an implicit layer every Mesa install enables) asks Wayland for the
/// default GPU while adapters are enumerated, and on a headless machine (no `XDG_RUNTIME_DIR`) libwayland prints
/// `error: XDG_RUNTIME_DIR is invalid or not set` once per call, on every run with `--device auto`. edgepack picks
/// its adapter itself, so the layer is turned off there, unless the user steers it (`MESA_VK_DEVICE_SELECT`,
/// `DRI_PRIME`, `NODEVICE_SELECT`).
fn quiet_headless_vulkan() {
    let headless = std::env::var_os("XDG_RUNTIME_DIR").is_none_or(|d| !std::path::Path::new(&d).is_dir());
    let steered =
        ["MESA_VK_DEVICE_SELECT", "DRI_PRIME", "NODEVICE_SELECT"].iter().any(|v| std::env::var_os(v).is_some());
    if headless && !steered {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
}

/// `--log-level` and `-v` set the filter `serve` and the libraries read (EDGEPACK_LOG).
fn set_log_level(level: Option<&str>, verbose: u8) {
    let level = level.or(match verbose {
        0 => None,
        1 => Some("debug"),
        _ => Some("trace"),
    });
    if let Some(l) = level {
        // SAFETY: called in main before any other thread exists.
        unsafe { std::env::set_var("EDGEPACK_LOG", l) };
    }
}

/// Freed large blocks (activations) are kept for the next run instead of being unmapped and faulted in again
/// (`alloc::Recycle`); `EDGEPACK_ALLOC_CACHE_MB` bounds what is kept.
#[global_allocator]
static ALLOC: edgepack_runtime::alloc::Recycle = edgepack_runtime::alloc::Recycle::new(ALLOC_CACHE_MB << 20);
const ALLOC_CACHE_MB: usize = 1024;

fn main() -> ExitCode {
    if let Some(mb) = std::env::var("EDGEPACK_ALLOC_CACHE_MB").ok().and_then(|v| v.trim().parse::<usize>().ok()) {
        ALLOC.set_limit(mb.saturating_mul(1 << 20));
    }
    quiet_headless_vulkan();
    let json_requested = std::env::args_os().any(|a| a == "--json");
    let args = match config::expand(std::env::args_os().collect(), &command()) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("error: {msg}");
            if json_requested {
                output::json_error(exit::USAGE, exit::kind(exit::USAGE), &msg);
            }
            return ExitCode::from(exit::USAGE);
        }
    };
    let cli = match command().try_get_matches_from(args).and_then(|m| Cli::from_arg_matches(&m)) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            if !e.use_stderr() {
                return ExitCode::SUCCESS; // --help, --version
            }
            if json_requested {
                let first = e.to_string().lines().next().unwrap_or_default().trim_start_matches("error: ").to_string();
                output::json_error(exit::USAGE, exit::kind(exit::USAGE), &first);
            }
            return ExitCode::from(exit::USAGE);
        }
    };
    output::set_verbosity(cli.quiet, cli.verbose);
    output::set_json_errors(json_requested);
    set_log_level(cli.log_level.as_deref(), cli.verbose);
    // A closed stdout pipe (`edgepack … --json | head -1`) ends a printing command quietly, as it ends cat or grep,
    // instead of a panic in println!. The server keeps Rust's default (SIGPIPE ignored): its sockets report EPIPE,
    // and it handles SIGINT/SIGTERM itself (graceful shutdown).
    if !matches!(cli.command, Command::Serve(_)) {
        restore_sigpipe();
        interrupt::install();
    }
    let result = match cli.command {
        Command::Inspect { path, json, key } => commands::inspect(&path, json, key.as_deref()),
        Command::Run(a) => commands::run(a),
        Command::Eval(a) => commands::eval(a),
        Command::Quantize(a) => commands::quantize(a),
        Command::Prune(a) => prune::prune(a),
        Command::Pack(a) => commands::pack(a),
        Command::Verify { bundle, key, json } => commands::verify(&bundle, key.as_deref(), json),
        Command::Keygen { out } => commands::keygen(&out),
        Command::Bench(a) => bench::bench(a),
        Command::Demo(a) => demo::demo(a),
        Command::Serve(a) => commands::serve(a),
        Command::Batch(a) => commands::batch(a),
        Command::BatchMerge(a) => commands::batch_merge(a),
        Command::Devices { json } => commands::devices(json),
        Command::Rewrite { input, output, topo_sort, remove_unused_initializers, opset, free_batch } => {
            commands::rewrite(&input, &output, topo_sort, remove_unused_initializers, opset, free_batch)
        }
        Command::Ops(a) => commands::ops(a),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut command(), "edgepack", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { out } => commands::man_pages(command(), &out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
            let line = output::error_line(&e);
            eprintln!("error: {line}");
            if output::json_errors() && !output::json_failure_printed() {
                output::json_error(code, exit::kind(code), &line);
            }
            ExitCode::from(code)
        }
    }
}

/// Exit code for a runtime error.
fn runtime_exit(err: &edgepack_runtime::Error) -> u8 {
    use edgepack_runtime::Error as E;
    match err {
        // The user named a key file that is not a public key, or a variant the bundle lacks: the argument is wrong.
        E::Bundle(b) => bundle_exit(b),
        E::UnsupportedOp { .. } => exit::UNSUPPORTED,
        E::Backend { backend: "gpu", .. } => exit::UNSUPPORTED,
        E::Io { source, .. } => io_exit(source),
        E::UnknownInput { .. }
        | E::UnknownValue { .. }
        | E::MissingInput { .. }
        | E::InputDType { .. }
        | E::InputShape { .. }
        | E::InvalidTensor(_)
        | E::Image(_)
        | E::Npy(_)
        | E::MalformedModel(_) => exit::BAD_INPUT,
        _ => exit::FAILURE,
    }
}

fn bundle_exit(b: &edgepack_runtime::bundle::BundleError) -> u8 {
    use edgepack_runtime::bundle::BundleError as B;
    match b {
        // The user named a key file that is not a public key, or a variant the bundle lacks: the argument is wrong.
        B::Key(_) | B::NoSuchVariant { .. } => exit::USAGE,
        _ => exit::VERIFY,
    }
}

/// A file the user named that is not there (or not readable) is bad input; other I/O failures are failures.
fn io_exit(e: &std::io::Error) -> u8 {
    match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::IsADirectory | std::io::ErrorKind::InvalidData => {
            exit::BAD_INPUT
        }
        _ => exit::FAILURE,
    }
}

/// Maps an error to an exit code by what caused it.
fn exit_code(e: &anyhow::Error) -> u8 {
    use edgepack_quantize::{calib::CalibError, data::DataError, qdq::QdqError};
    for cause in e.chain() {
        if cause.downcast_ref::<commands::Usage>().is_some() {
            return exit::USAGE;
        }
        if let Some(err) = cause.downcast_ref::<edgepack_runtime::Error>() {
            return runtime_exit(err);
        }
        if let Some(b) = cause.downcast_ref::<edgepack_runtime::bundle::BundleError>() {
            return bundle_exit(b);
        }
        if let Some(p) = cause.downcast_ref::<edgepack_packager::PackError>() {
            use edgepack_packager::PackError as P;
            return match p {
                P::Runtime(err) => runtime_exit(err),
                P::Mismatch(_) | P::Key(_) => exit::USAGE,
                P::Io { source, .. } => io_exit(source),
                P::Invalid(_) => exit::FAILURE,
            };
        }
        if cause.downcast_ref::<commands::BadInput>().is_some() || cause.downcast_ref::<DataError>().is_some() {
            return exit::BAD_INPUT;
        }
        match cause.downcast_ref::<CalibError>() {
            Some(CalibError::Runtime(err)) => return runtime_exit(err),
            Some(CalibError::Unsupported(_)) => return exit::UNSUPPORTED,
            Some(_) => return exit::BAD_INPUT,
            None => {}
        }
        if let Some(q) = cause.downcast_ref::<QdqError>() {
            return if matches!(q, QdqError::Opset(_)) { exit::UNSUPPORTED } else { exit::FAILURE };
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return io_exit(io);
        }
    }
    exit::FAILURE
}

#[cfg(test)]
mod tests {
    /// `edgepack COMMAND --help` documents every flag and argument (issue 25).
    #[test]
    fn every_flag_and_argument_has_help_text() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in c.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for s in c.get_subcommands() {
                walk(s, &format!("{path} {}", s.get_name()), missing);
            }
        }
        let cmd = super::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "edgepack", &mut missing);
        assert!(missing.is_empty(), "flags without help: {missing:?}");
    }
}
