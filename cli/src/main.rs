//! `edgepack`: a thin command line over the library crates. Arguments are parsed here; the work happens in
//! `edgepack-runtime` and `edgepack-packager`.
mod bench;
mod commands;
mod demo;
mod prune;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Exit codes (documented in the README).
pub mod exit {
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const VERIFY: u8 = 3;
    pub const BAD_INPUT: u8 = 4;
    pub const UNSUPPORTED: u8 = 5;
}

#[derive(Parser)]
#[command(
    name = "edgepack",
    version,
    about = "Package, verify, run and benchmark edge ML models (.onnx and .edgepack bundles)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by every command that loads a model.
#[derive(Args, Clone, Debug)]
pub struct LoadArgs {
    /// CPU threads (0 = one per core)
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Backend: auto, cpu or gpu
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
        path: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Run a model on images, .npy files or raw tensors; print top-k, detections or tensors
    Run(commands::RunArgs),
    /// Accuracy on a labelled dataset (labels.csv + images/, one folder per class, or MNIST IDX files)
    Eval(commands::EvalArgs),
    /// Quantize an fp32 model to INT8 (QDQ: per-channel int8 weights, uint8 activations) calibrated on real samples
    Quantize(commands::QuantizeArgs),
    /// Prune an fp32 model: unstructured (magnitude zeros, for a smaller zstd bundle) or structured (whole
    /// channels removed, for speed), repaired by bias correction, by a uniform amount or a plan under a budget
    Prune(prune::PruneArgs),
    /// Pack an ONNX model with its pre/post-processing, labels and reports into a .edgepack bundle
    Pack(commands::PackArgs),
    /// Check a bundle's structure, member hashes and signature
    Verify {
        bundle: PathBuf,
        /// Trusted public key; without it a signature is checked for integrity only
        #[arg(long)]
        key: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Generate an ed25519 signing key pair: <OUT>.key (secret) and <OUT>.pub
    Keygen {
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Measure load time, first run, latency percentiles, throughput and peak memory
    Bench(bench::BenchArgs),
    /// Bulk inference over a folder of images or a JSONL file of KServe v2 requests; JSON lines out, written
    /// atomically and resumable after an interruption
    Batch(commands::BatchArgs),
    /// Serve a repository of bundles over the KServe v2 protocol (HTTP), with dynamic batching and routing
    Serve(commands::ServeArgs),
    /// Offline demo: pack the shipped EfficientNet-Lite0, verify it, classify the shipped photos
    Demo(demo::DemoArgs),
    /// The devices a session can run on: the CPU, and the GPU adapter (or why there is none)
    Devices {
        #[arg(long)]
        json: bool,
    },
    /// Re-write an ONNX file through edgepack's graph type (lossless), optionally applying cleanup passes
    Rewrite {
        input: PathBuf,
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

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    // A closed stdout pipe (`edgepack … --json | head -1`) ends a printing command quietly, as it ends cat or grep,
    // instead of a panic in println!. The server keeps Rust's default (SIGPIPE ignored): its sockets report EPIPE.
    if !matches!(cli.command, Command::Serve(_)) {
        restore_sigpipe();
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
        Command::Devices { json } => commands::devices(json),
        Command::Rewrite { input, output, topo_sort, remove_unused_initializers, opset, free_batch } => {
            commands::rewrite(&input, &output, topo_sort, remove_unused_initializers, opset, free_batch)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Exit code for a runtime error.
fn runtime_exit(err: &edgepack_runtime::Error) -> u8 {
    use edgepack_runtime::Error as E;
    match err {
        E::Bundle(_) => exit::VERIFY,
        E::UnsupportedOp { .. } => exit::UNSUPPORTED,
        E::Backend { backend: "gpu", .. } => exit::UNSUPPORTED,
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

/// Maps an error to an exit code by what caused it.
fn exit_code(e: &anyhow::Error) -> u8 {
    use edgepack_quantize::{calib::CalibError, data::DataError, qdq::QdqError};
    for cause in e.chain() {
        if let Some(err) = cause.downcast_ref::<edgepack_runtime::Error>() {
            return runtime_exit(err);
        }
        if let Some(edgepack_runtime::bundle::BundleError::Signature(_)) = cause.downcast_ref() {
            return exit::VERIFY;
        }
        if let Some(p) = cause.downcast_ref::<edgepack_packager::PackError>() {
            return match p {
                edgepack_packager::PackError::Runtime(err) => runtime_exit(err),
                _ => exit::FAILURE,
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
    }
    exit::FAILURE
}
