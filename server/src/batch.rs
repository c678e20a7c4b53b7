//! `edgepack batch`: bulk inference (the batch transform of a serving stack) over a folder of images or a JSONL
//! file of KServe v2 requests, with the same engine and bundles as `serve`.
//!
//! Output is JSON lines, one per item, keyed by the item (`file` for images, `id` for requests). Lines go to
//! `<OUT>.part`, flushed and fsynced every `sync_every` items; a rerun after an interruption reads the `.part`,
//! keeps its complete lines (a torn last line is dropped) and skips those items. At the end the file is fsynced and
//! renamed to `<OUT>`: the output appears whole or not at all.
use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use edgepack_runtime::Session;
use edgepack_runtime::process::Postprocess;
use serde_json::{Value, json};

/// What to run over.
#[derive(Debug, Clone)]
pub enum BatchInput {
    /// Images (JPEG/PNG) under a folder, recursively, in path order; the bundle's pre- and post-processing.
    Images(PathBuf),
    /// One KServe v2 inference request per line (`{"id": ..., "inputs": [...]}`); raw outputs.
    Requests(PathBuf),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    pub total: usize,
    /// Items already in the `.part` file from an earlier, interrupted run.
    pub resumed: usize,
    pub done: usize,
    /// Items of this run whose line records an error (a corrupt image, a request that does not fit the model).
    pub failed: usize,
    /// Resumed items whose line records an error.
    pub resumed_failed: usize,
}

fn images_under(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            images_under(&p, out)?;
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        {
            out.push(p);
        }
    }
    Ok(())
}

/// One item: its key and how to produce its line.
enum Item {
    Image(PathBuf, String),
    Request(String, Vec<u8>),
}

impl Item {
    fn key(&self) -> &str {
        match self {
            Item::Image(_, k) | Item::Request(k, _) => k,
        }
    }
}

fn items(input: &BatchInput) -> std::io::Result<Vec<Item>> {
    match input {
        BatchInput::Images(dir) => {
            let mut files = Vec::new();
            images_under(dir, &mut files)?;
            Ok(files
                .into_iter()
                .map(|p| {
                    let key = p.strip_prefix(dir).unwrap_or(&p).display().to_string();
                    Item::Image(p, key)
                })
                .collect())
        }
        BatchInput::Requests(file) => {
            let f = std::io::BufReader::new(std::fs::File::open(file)?);
            let mut out = Vec::new();
            for (i, line) in f.lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                // The key: the request's id, else its line number (the tensors are skipped, not built).
                #[derive(serde::Deserialize)]
                struct Id {
                    id: Option<String>,
                }
                let id = serde_json::from_str::<Id>(&line)
                    .ok()
                    .and_then(|r| r.id)
                    .unwrap_or_else(|| format!("line {}", i + 1));
                out.push(Item::Request(id, line.into_bytes()));
            }
            Ok(out)
        }
    }
}

fn line_for(s: &Session, item: &Item, top_k: Option<usize>) -> Value {
    match item {
        Item::Image(path, key) => {
            let run = || -> Result<Value, String> {
                let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
                let batch = s.image_input(&[&bytes]).map_err(|e| e.to_string())?;
                let size = batch.sizes[0];
                let outs = s.run(vec![(batch.input, batch.tensor)]).map_err(|e| e.to_string())?;
                Ok(match s.postprocess() {
                    Some(Postprocess::SsdDetection { .. }) => {
                        json!({ "detections": s.detections_from_outputs(&outs, size).map_err(|e| e.to_string())? })
                    }
                    _ => {
                        let top = s.classify_outputs(&outs, top_k).map_err(|e| e.to_string())?;
                        json!({ "top_k": crate::display_top(top) })
                    }
                })
            };
            match run() {
                Ok(mut v) => {
                    v["file"] = json!(key);
                    v
                }
                Err(e) => json!({ "file": key, "error": e }),
            }
        }
        Item::Request(id, body) => {
            let run = || -> Result<Value, String> {
                let req = crate::kserve::parse_request(body, None).map_err(|e| e.message)?;
                let outs = s.run(req.inputs).map_err(|e| e.to_string())?;
                let sel: Vec<_> = outs.into_iter().map(|(n, t)| (n, t, false)).collect();
                let r = crate::kserve::response("batch", "", Some(id), &sel);
                let v: Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
                Ok(json!({ "id": id, "outputs": v["outputs"] }))
            };
            run().unwrap_or_else(|e| json!({ "id": id, "error": e }))
        }
    }
}

/// The keys already written by an interrupted run: complete JSON lines of `part`; the file is cut after the last one.
/// The keys already in a `.part` file (a torn last line is cut off), and which of them recorded an error.
fn resume(part: &Path, key_field: &str) -> std::io::Result<(HashSet<String>, HashSet<String>)> {
    let Ok(bytes) = std::fs::read(part) else { return Ok(Default::default()) };
    let mut keys = HashSet::new();
    let mut failed = HashSet::new();
    let mut good = 0;
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        if !line.ends_with(b"\n") {
            break; // torn write
        }
        match serde_json::from_slice::<Value>(line) {
            Ok(v) => match v.get(key_field).and_then(Value::as_str) {
                Some(k) => {
                    keys.insert(k.to_string());
                    if v.get("error").is_some() {
                        failed.insert(k.to_string());
                    }
                    good += line.len();
                }
                None => break,
            },
            Err(_) => break,
        }
    }
    if good < bytes.len() {
        let f = std::fs::OpenOptions::new().write(true).open(part)?;
        f.set_len(good as u64)?;
        f.sync_all()?;
    }
    Ok((keys, failed))
}

/// Runs `input` through `session` into `out` (see the module docs). `progress(done, total)` after each item.
pub fn run_batch(
    session: &Session,
    input: &BatchInput,
    out: &Path,
    top_k: Option<usize>,
    sync_every: usize,
    mut progress: impl FnMut(usize, usize),
) -> std::io::Result<BatchReport> {
    let all = items(input)?;
    let key_field = if matches!(input, BatchInput::Images(_)) { "file" } else { "id" };
    let mut part = out.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let (done_keys, failed_keys) = resume(&part, key_field)?;
    let mut report = BatchReport { total: all.len(), ..Default::default() };
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&part)?;
    let mut since_sync = 0;
    for (i, item) in all.iter().enumerate() {
        if done_keys.contains(item.key()) {
            report.resumed += 1;
            report.resumed_failed += usize::from(failed_keys.contains(item.key()));
            progress(i + 1, all.len());
            continue;
        }
        let line = line_for(session, item, top_k);
        if line.get("error").is_some() {
            report.failed += 1;
        }
        let mut bytes = serde_json::to_vec(&line).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        f.write_all(&bytes)?;
        report.done += 1;
        since_sync += 1;
        if since_sync >= sync_every.max(1) {
            f.sync_data()?;
            since_sync = 0;
        }
        progress(i + 1, all.len());
    }
    f.sync_all()?;
    drop(f);
    std::fs::rename(&part, out)?;
    // The rename itself is durable once the directory is synced.
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(report)
}
