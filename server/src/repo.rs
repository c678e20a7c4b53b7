//! The model repository: `REPO/<model>/<version>/<file>.edgepack|.onnx` (one model file per version folder) and
//! an optional `REPO/<model>/config.json` (batching, queue, routing). Scanned at start and polled for changes:
//! a new or changed version is loaded and warmed up before it is swapped in; a removed one stops taking requests
//! and finishes those it accepted.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::engine::BatchConfig;

/// `REPO/<model>/config.json`; every field optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Largest number of samples run together (1 = no dynamic batching).
    pub max_batch_size: usize,
    /// How long the first request of a batch waits for others, in milliseconds.
    pub max_queue_delay_ms: f64,
    /// Requests waiting per version beyond which new ones get 503 + Retry-After.
    pub queue_capacity: usize,
    /// Bundle variant to load ("int8", "fp32"...; default: the bundle's first).
    pub variant: Option<String>,
    /// Worker threads running batches concurrently on one loaded session (1).
    pub instances: usize,
    /// Engine threads per run (default: the server's --threads; 0 = one per core). Several instances with one
    /// thread each suit a loaded CPU server better than one instance spreading each run over every core.
    pub threads: Option<usize>,
    pub routing: Routing,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            max_batch_size: 8,
            max_queue_delay_ms: 2.0,
            queue_capacity: 256,
            variant: None,
            instances: 1,
            threads: None,
            routing: Routing::default(),
        }
    }
}

impl ModelConfig {
    pub fn batch(&self) -> BatchConfig {
        BatchConfig {
            max_batch_size: self.max_batch_size.max(1),
            max_queue_delay: Duration::from_secs_f64(self.max_queue_delay_ms.clamp(0.0, 10_000.0) / 1000.0),
            queue_capacity: self.queue_capacity.max(1),
            instances: self.instances.clamp(1, 64),
        }
    }
}

/// Which version answers `/v2/models/{m}/infer` (a request naming a version always gets that version).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Routing {
    /// The pinned version (default: the highest).
    pub default: Option<String>,
    /// A share of the requests to another version.
    pub canary: Option<Canary>,
    /// A/B test: requests carrying the sticky key header split between two versions by a hash of the key.
    pub ab: Option<AbTest>,
    /// Mirror requests to a version, compare with the answer returned, log and count; never returned.
    pub shadow: Option<Shadow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    pub version: String,
    /// 0-100 (with `auto`: the starting share).
    pub percent: f64,
    /// Promote step by step or roll back by the canary's measured errors and latency (`rollout.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<CanaryAuto>,
}

/// The automatic canary's limits: each window of `min_requests` canary requests within them adds `step_percent`;
/// an error rate over `max_error_rate` (or a p99 over `max_p99_ms`) rolls the canary back to 0 %.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryAuto {
    #[serde(default = "one_percent")]
    pub max_error_rate: f64,
    #[serde(default)]
    pub max_p99_ms: Option<f64>,
    #[serde(default = "hundred")]
    pub min_requests: u64,
    #[serde(default = "ten")]
    pub step_percent: f64,
}

fn one_percent() -> f64 {
    0.01
}

fn hundred() -> u64 {
    100
}

fn ten() -> f64 {
    10.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbTest {
    pub a: String,
    pub b: String,
    /// Share of keys that get `b`, 0-100.
    #[serde(default = "half")]
    pub percent_b: f64,
    /// The request header holding the sticky key (a user or device id).
    #[serde(default = "ab_header")]
    pub header: String,
}

fn half() -> f64 {
    50.0
}

fn ab_header() -> String {
    "x-edgepack-ab-key".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shadow {
    pub version: String,
    /// Share of requests mirrored, 0-100.
    #[serde(default = "all")]
    pub percent: f64,
}

fn all() -> f64 {
    100.0
}

/// What the scan found for one model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDir {
    pub config: ModelConfig,
    /// version → (model file, fingerprint: size and modification time)
    pub versions: BTreeMap<String, (PathBuf, (u64, Option<SystemTime>))>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Orders versions numerically when both are numbers, else by name.
pub fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}

/// Scans the repository. A model whose config does not parse, or a version folder without exactly one model
/// file, is reported in the second list and skipped.
pub fn scan(repo: &Path) -> std::io::Result<(BTreeMap<String, ModelDir>, Vec<String>)> {
    let mut models = BTreeMap::new();
    let mut problems = Vec::new();
    for e in std::fs::read_dir(repo)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if !e.file_type()?.is_dir() || !valid_name(&name) {
            continue;
        }
        let dir = e.path();
        let config = match std::fs::read(dir.join("config.json")) {
            Ok(b) => match serde_json::from_slice::<ModelConfig>(&b) {
                Ok(c) => c,
                Err(err) => {
                    problems.push(format!("{name}/config.json: {err}"));
                    continue;
                }
            },
            Err(_) => ModelConfig::default(),
        };
        let mut versions = BTreeMap::new();
        for v in std::fs::read_dir(&dir)? {
            let v = v?;
            let vname = v.file_name().to_string_lossy().to_string();
            if !v.file_type()?.is_dir() || !valid_name(&vname) {
                continue;
            }
            let files: Vec<PathBuf> = std::fs::read_dir(v.path())?
                .filter_map(|f| f.ok().map(|f| f.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "edgepack" || x == "onnx"))
                .collect();
            match files.as_slice() {
                [f] => {
                    let meta = std::fs::metadata(f)?;
                    versions.insert(vname, (f.clone(), (meta.len(), meta.modified().ok())));
                }
                [] => problems.push(format!("{name}/{vname}: no .edgepack or .onnx file")),
                _ => problems.push(format!("{name}/{vname}: {} model files (one per version folder)", files.len())),
            }
        }
        if !versions.is_empty() {
            models.insert(name, ModelDir { config, versions });
        }
    }
    Ok((models, problems))
}

/// FNV-1a of a string: the sticky hash of an A/B key (stable across processes and restarts).
pub fn sticky_hash(key: &str) -> f64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    (h % 10_000) as f64 / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_strictness() {
        let c: ModelConfig =
            serde_json::from_str(r#"{"max_batch_size": 4, "routing": {"canary": {"version": "2", "percent": 10}}}"#)
                .unwrap();
        assert_eq!(c.max_batch_size, 4);
        assert_eq!(c.queue_capacity, 256);
        assert_eq!(c.routing.canary.unwrap().percent, 10.0);
        assert!(serde_json::from_str::<ModelConfig>(r#"{"max_batch": 4}"#).is_err());
    }

    #[test]
    fn versions_order_numerically() {
        let mut v = vec!["10", "9", "2"];
        v.sort_by(|a, b| version_order(a, b));
        assert_eq!(v, ["2", "9", "10"]);
    }

    #[test]
    fn sticky_hash_is_stable_and_spread() {
        assert_eq!(sticky_hash("user-1"), sticky_hash("user-1"));
        let b = (0..1000).filter(|i| sticky_hash(&format!("user-{i}")) < 30.0).count();
        assert!((230..370).contains(&b), "{b} of 1000 below 30 %");
    }
}
