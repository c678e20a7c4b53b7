//! `edgepack batch`: bulk inference (the batch transform of a serving stack) over a folder of images or a JSONL
//! file of KServe v2 requests, with the same engine and bundles as `serve`.
//!
//! Output is JSON lines, one per item, keyed by the item (`file` for images, `id` for requests). Lines go to
//! `<OUT>.part`, flushed and fsynced every `sync_every` items; a rerun after an interruption reads the `.part`,
//! keeps its complete lines (a torn last line is dropped) and skips those items. At the end the file is fsynced and
//! renamed to `<OUT>`: the output appears whole or not at all.
//!
//! At scale (`--shard I/N`, one Kubernetes Indexed Job pod per shard): shard `I` of `N` takes the `I`-th of `N`
//! contiguous, balanced slices of the item list (the same on every machine: images in path order, requests in
//! line order), writes its lines to its own output and, before that output appears, a sidecar `<OUT>.shard.json`
//! saying which slice it holds. [`merge_shards`] checks that the sidecars cover every item exactly once and
//! concatenates the shard outputs in input order: the merged file is byte for byte what one unsharded run writes.
use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use edgepack_runtime::Session;
use serde_json::{Value, json};

/// What to run over.
#[derive(Debug, Clone)]
pub enum BatchInput {
    /// Images (JPEG/PNG) under a folder, recursively, in path order; the bundle's pre- and post-processing.
    Images(PathBuf),
    /// One KServe v2 inference request per line (`{"id": ..., "inputs": [...]}`); raw outputs.
    Requests(PathBuf),
}

/// One slice of a sharded run: `index` of `count` (0-based, as Kubernetes' `JOB_COMPLETION_INDEX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}`: expected I/N with 0 ≤ I < N (e.g. 0/4)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) =
            (i.trim().parse::<usize>().map_err(|_| bad())?, n.trim().parse::<usize>().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// The items `[start, end)` of `total` this shard takes: contiguous and balanced (sizes differ by at most one).
    pub fn range(self, total: usize) -> std::ops::Range<usize> {
        let at = |i: usize| (i as u128 * total as u128 / self.count as u128) as usize;
        at(self.index)..at(self.index + 1)
    }
}

/// The sidecar of a shard's output (`<OUT>.shard.json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardInfo {
    pub shard: usize,
    pub of: usize,
    /// Index of the shard's first item in the whole input.
    pub first_item: usize,
    pub items: usize,
    pub total_items: usize,
}

/// The sidecar path of a shard output.
pub fn shard_sidecar(out: &Path) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".shard.json");
    PathBuf::from(p)
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
                    Some(p) if p.is_detection() => {
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
                let sel: Vec<_> =
                    outs.into_iter().map(|(n, t)| (n, crate::kserve::OutValue::Tensor(t), false)).collect();
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

/// Runs `input` (or the `shard` of it) through `session` into `out` (see the module docs). `progress(done,
/// total)` after each item.
pub fn run_batch(
    session: &Session,
    input: &BatchInput,
    out: &Path,
    top_k: Option<usize>,
    sync_every: usize,
    shard: Option<Shard>,
    mut progress: impl FnMut(usize, usize),
) -> std::io::Result<BatchReport> {
    let mut all = items(input)?;
    let whole = all.len();
    let slice = shard.map(|s| s.range(whole)).unwrap_or(0..whole);
    if let Some(s) = shard {
        all = all.drain(slice.clone()).collect();
        let info =
            ShardInfo { shard: s.index, of: s.count, first_item: slice.start, items: slice.len(), total_items: whole };
        // Written before the output appears: an output without its sidecar is never a complete shard.
        let bytes = serde_json::to_vec_pretty(&info).map_err(std::io::Error::other)?;
        edgepack_runtime::fsutil::write_atomic(&shard_sidecar(out), &bytes)?;
    }
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

/// What [`merge_shards`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeReport {
    pub shards: usize,
    pub items: usize,
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// Concatenates the outputs of the shards of one sharded run into `out` in input order, atomically. Every shard
/// `0..N` must be there exactly once, complete (its sidecar, as many lines as items) and from the same input.
pub fn merge_shards(parts: &[PathBuf], out: &Path) -> std::io::Result<MergeReport> {
    let mut shards: Vec<(ShardInfo, &PathBuf)> = Vec::with_capacity(parts.len());
    for p in parts {
        let side = shard_sidecar(p);
        let bytes = std::fs::read(&side).map_err(|e| {
            invalid(format!(
                "{}: no shard sidecar {} ({e}): not the output of a finished `batch --shard` run",
                p.display(),
                side.display()
            ))
        })?;
        let info: ShardInfo =
            serde_json::from_slice(&bytes).map_err(|e| invalid(format!("{}: {e}", side.display())))?;
        shards.push((info, p));
    }
    shards.sort_by_key(|(i, _)| i.shard);
    let Some((first, _)) = shards.first() else { return Err(invalid("no shard outputs given".into())) };
    let (n, total) = (first.of, first.total_items);
    let present: Vec<usize> = shards.iter().map(|(i, _)| i.shard).collect();
    if shards.iter().any(|(i, _)| i.of != n || i.total_items != total) {
        return Err(invalid("the shards come from different runs (their shard counts or item totals differ)".into()));
    }
    if present != (0..n).collect::<Vec<_>>() {
        let missing: Vec<String> = (0..n).filter(|i| !present.contains(i)).map(|i| format!("{i}/{n}")).collect();
        let dup = present.windows(2).find(|w| w[0] == w[1]).map(|w| format!("; shard {}/{n} given twice", w[0]));
        return Err(invalid(format!(
            "shards missing: {}{}",
            if missing.is_empty() { "none".into() } else { missing.join(", ") },
            dup.unwrap_or_default()
        )));
    }
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".part");
    let tmp = PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        let mut next = 0;
        for (info, path) in &shards {
            if info.first_item != next {
                return Err(invalid(format!(
                    "{}: starts at item {}, expected {next}",
                    path.display(),
                    info.first_item
                )));
            }
            let bytes = std::fs::read(path).map_err(|e| {
                invalid(format!("{}: {e} (a shard's output appears only when its run completes)", path.display()))
            })?;
            let lines = bytes.iter().filter(|&&b| b == b'\n').count();
            if lines != info.items || !(bytes.is_empty() || bytes.ends_with(b"\n")) {
                return Err(invalid(format!("{}: {lines} lines for {} items: incomplete", path.display(), info.items)));
            }
            f.write_all(&bytes)?;
            next += info.items;
        }
        if next != total {
            return Err(invalid(format!("the shards hold {next} of {total} items")));
        }
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(MergeReport { shards: n, items: total })
}

#[cfg(test)]
mod shard_tests {
    use super::*;

    #[test]
    fn shards_are_contiguous_balanced_and_cover_everything() {
        for total in [0usize, 1, 3, 7, 100, 1001] {
            for count in [1usize, 2, 3, 4, 7] {
                let mut next = 0;
                for index in 0..count {
                    let r = Shard { index, count }.range(total);
                    assert_eq!(r.start, next);
                    assert!(r.len() == total / count || r.len() == total / count + 1);
                    next = r.end;
                }
                assert_eq!(next, total);
            }
        }
        assert_eq!("2/4".parse::<Shard>(), Ok(Shard { index: 2, count: 4 }));
        for bad in ["4/4", "1/0", "x/2", "3", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }
}
