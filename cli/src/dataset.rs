//! Labelled datasets for `edgepack eval`: `labels.csv` + `images/` (as in shared/data/imagenet_sample), one
//! folder per class, or MNIST IDX files (gzip or raw).
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::DynamicImage;
use indicatif::{ProgressBar, ProgressStyle};

use crate::commands::BadInput;

pub enum Dataset {
    Files(Vec<(PathBuf, usize)>),
    Idx { images: Vec<u8>, rows: usize, cols: usize, labels: Vec<u8> },
}

pub fn progress(n: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} [{elapsed_precise} < {eta_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("gunzip {}", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file: returns (dims, payload).
fn idx<'a>(bytes: &'a [u8], what: &Path) -> Result<(Vec<usize>, &'a [u8])> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        bail!(BadInput(format!("{}: not an unsigned-byte IDX file", what.display())));
    }
    let nd = bytes[3] as usize;
    let head = 4 + 4 * nd;
    if bytes.len() < head {
        bail!(BadInput(format!("{}: truncated IDX header", what.display())));
    }
    let dims: Vec<usize> =
        (0..nd).map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if n != Some(bytes.len() - head) {
        bail!(BadInput(format!("{}: IDX dims {dims:?} do not match the data size", what.display())));
    }
    Ok((dims, &bytes[head..]))
}

/// Class index of a folder name: position among the labels (full line, display name or leading word), else
/// among the sorted folder names.
fn class_of(name: &str, labels: Option<&[String]>, sorted: &[String]) -> usize {
    if let Some(l) = labels
        && let Some(i) = l.iter().position(|x| {
            x == name
                || edgepack_runtime::process::display_label(x) == name
                || x.split_whitespace().next() == Some(name)
        })
    {
        return i;
    }
    sorted.iter().position(|x| x == name).unwrap_or(usize::MAX)
}

impl Dataset {
    pub fn open(path: &Path, idx_labels: Option<&Path>, labels: Option<&[String]>) -> Result<Dataset> {
        if let Some(lp) = idx_labels {
            let ib = read_maybe_gz(path)?;
            let lb = read_maybe_gz(lp)?;
            let (idims, ipix) = idx(&ib, path)?;
            let (ldims, lvals) = idx(&lb, lp)?;
            if idims.len() != 3 || ldims.len() != 1 || idims[0] != ldims[0] {
                bail!(BadInput(format!("IDX images {idims:?} and labels {ldims:?} do not match")));
            }
            return Ok(Dataset::Idx { images: ipix.to_vec(), rows: idims[1], cols: idims[2], labels: lvals.to_vec() });
        }
        if !path.is_dir() {
            bail!(BadInput(format!(
                "{}: not a dataset folder (labels.csv + images/, or class folders)",
                path.display()
            )));
        }
        let csv = path.join("labels.csv");
        let mut items = Vec::new();
        if csv.exists() {
            let text = std::fs::read_to_string(&csv).with_context(|| format!("reading {}", csv.display()))?;
            let mut lines = text.lines();
            let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
            let fcol = header.iter().position(|h| *h == "file");
            let ccol = header.iter().position(|h| *h == "class_index" || *h == "label");
            let (Some(fcol), Some(ccol)) = (fcol, ccol) else {
                bail!(BadInput(format!("{}: needs columns `file` and `class_index`", csv.display())));
            };
            let img_dir = if path.join("images").is_dir() { path.join("images") } else { path.to_path_buf() };
            for (n, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let cells: Vec<&str> = line.split(',').collect();
                let (Some(f), Some(c)) = (cells.get(fcol), cells.get(ccol)) else {
                    bail!(BadInput(format!("{} line {}: too few columns", csv.display(), n + 2)));
                };
                let c: usize = c
                    .trim()
                    .parse()
                    .map_err(|_| BadInput(format!("{} line {}: bad class index `{c}`", csv.display(), n + 2)))?;
                items.push((img_dir.join(f.trim()), c));
            }
        } else {
            let mut classes: Vec<String> = std::fs::read_dir(path)?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect();
            classes.sort();
            for c in &classes {
                let k = class_of(c, labels, &classes);
                let mut files: Vec<PathBuf> =
                    std::fs::read_dir(path.join(c))?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
                files.sort();
                items.extend(files.into_iter().map(|f| (f, k)));
            }
        }
        if items.is_empty() {
            bail!(BadInput(format!("{}: no labelled samples found", path.display())));
        }
        Ok(Dataset::Files(items))
    }

    pub fn len(&self) -> usize {
        match self {
            Dataset::Files(v) => v.len(),
            Dataset::Idx { labels, .. } => labels.len(),
        }
    }

    /// (id, decoded image, label) of sample `k`.
    pub fn get(&self, k: usize) -> Result<(String, DynamicImage, usize)> {
        match self {
            Dataset::Files(v) => {
                let (p, label) = &v[k];
                let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                let img =
                    edgepack_runtime::process::decode_image(&bytes).with_context(|| format!("{}", p.display()))?;
                let id = p.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
                Ok((id, img, *label))
            }
            Dataset::Idx { images, rows, cols, labels } => {
                let n = rows * cols;
                let px = images[k * n..(k + 1) * n].to_vec();
                let img = image::GrayImage::from_raw(*cols as u32, *rows as u32, px).context("IDX image")?;
                Ok((format!("#{k}"), DynamicImage::ImageLuma8(img), labels[k] as usize))
            }
        }
    }
}
