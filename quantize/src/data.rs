//! Datasets for evaluation and calibration, read lazily one sample at a time (memory stays bounded whatever the
//! number of samples):
//! - labelled: `labels.csv` + `images/` (as `shared/data/imagenet_sample`), one folder per class, or MNIST IDX
//!   files (gzip or raw);
//! - unlabelled (calibration): any folder of images (JPEG/PNG), `.npy` tensors and `.npz` files (one array per
//!   input of a multi-input model, by input name), searched recursively.
use std::io::Read;
use std::path::{Path, PathBuf};

use edgepack_runtime::process::{ImagePreprocess, decode_image, display_label};
use edgepack_runtime::{Tensor, npy};
use image::DynamicImage;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The data is not what it claims to be (bad CSV, IDX, empty folder...).
    #[error("{0}")]
    Invalid(String),
    #[error("{id}: {source}")]
    Sample {
        id: String,
        #[source]
        source: edgepack_runtime::Error,
    },
}

type Result<T> = std::result::Result<T, DataError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.to_path_buf(), source }
}

/// What one sample holds before pre-processing.
pub enum SampleData {
    Image(DynamicImage),
    Tensor(Tensor),
    /// One array per model input, by input name (an `.npz` file).
    Feeds(Vec<(String, Tensor)>),
}

pub struct Sample {
    /// File name (or `#index` for IDX samples).
    pub id: String,
    pub data: SampleData,
    pub label: Option<usize>,
}

impl Sample {
    /// The model input for this sample: images go through `pre` (required for images), tensors pass as they are.
    pub fn to_input(&self, pre: Option<&ImagePreprocess>) -> Result<Tensor> {
        let err = |source| DataError::Sample { id: self.id.clone(), source };
        match &self.data {
            SampleData::Image(img) => match pre {
                Some(p) => p.apply(img).map_err(err),
                None => Err(DataError::Invalid(format!(
                    "{}: images need pre-processing (pass --preset or use a bundle)",
                    self.id
                ))),
            },
            SampleData::Tensor(t) => Ok(t.clone()),
            SampleData::Feeds(f) => match f.as_slice() {
                [(_, t)] => Ok(t.clone()),
                _ => Err(DataError::Invalid(format!("{}: {} arrays for a model with one input", self.id, f.len()))),
            },
        }
    }

    /// The feeds of a model whose inputs are `inputs` (names, in order): an `.npz` sample gives each input its
    /// array by name (every input needed, no other array); an image or `.npy` sample feeds a one-input model.
    /// Inputs in `optional` may be absent from an `.npz` sample (a recurrent state the caller carries over).
    pub fn to_inputs(
        &self,
        pre: Option<&ImagePreprocess>,
        inputs: &[String],
        optional: &[String],
    ) -> Result<Vec<(String, Tensor)>> {
        let needed: Vec<&String> = inputs.iter().filter(|n| !optional.contains(n)).collect();
        match (&self.data, needed.as_slice()) {
            (SampleData::Feeds(f), _) => {
                let missing: Vec<&str> =
                    needed.iter().filter(|n| !f.iter().any(|(k, _)| k == **n)).map(|n| n.as_str()).collect();
                let extra: Vec<&str> = f.iter().filter(|(k, _)| !inputs.contains(k)).map(|(k, _)| k.as_str()).collect();
                if !missing.is_empty() || !extra.is_empty() {
                    return Err(DataError::Invalid(format!(
                        "{}: the arrays ({}) must be the model's inputs ({}){}{}",
                        self.id,
                        f.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", "),
                        inputs.join(", "),
                        if missing.is_empty() { String::new() } else { format!("; missing: {}", missing.join(", ")) },
                        if extra.is_empty() { String::new() } else { format!("; not inputs: {}", extra.join(", ")) },
                    )));
                }
                Ok(inputs.iter().filter_map(|n| Some((n.clone(), f.iter().find(|(k, _)| k == n)?.1.clone()))).collect())
            }
            (_, [one]) => Ok(vec![((*one).clone(), self.to_input(pre)?)]),
            (_, more) => Err(DataError::Invalid(format!(
                "{}: the model has {} inputs ({}): give each sample as an .npz file with one array per input name \
                 (numpy.savez(path, {}=..., ...))",
                self.id,
                inputs.len(),
                inputs.join(", "),
                more.first().map(|s| s.as_str()).unwrap_or("x")
            ))),
        }
    }
}

enum Items {
    Files(Vec<(PathBuf, Option<usize>)>),
    /// One folder per model input, `.npy` files of the same names in each: `files[i][k]` feeds input `i` of
    /// sample `k`.
    PerInput {
        inputs: Vec<String>,
        files: Vec<Vec<PathBuf>>,
    },
    Idx {
        images: Vec<u8>,
        rows: usize,
        cols: usize,
        labels: Vec<u8>,
    },
}

/// An indexed, lazily read set of samples.
pub struct Dataset {
    items: Items,
    /// Sample order (a permutation of the stored order), when shuffled.
    order: Option<Vec<usize>>,
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(io(path))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(io(path))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an unsigned-byte IDX file (MNIST's format): its dims, or why it is not one.
pub fn parse_idx(bytes: &[u8]) -> Result<Vec<usize>> {
    idx(bytes, Path::new("<idx>")).map(|(dims, _)| dims)
}

/// Parses an unsigned-byte IDX file: (dims, payload).
fn idx<'a>(bytes: &'a [u8], what: &Path) -> Result<(Vec<usize>, &'a [u8])> {
    let bad = |m: &str| DataError::Invalid(format!("{}: {m}", what.display()));
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(bad("not an unsigned-byte IDX file"));
    }
    let nd = bytes[3] as usize;
    let head = 4 + 4 * nd;
    if bytes.len() < head {
        return Err(bad("truncated IDX header"));
    }
    let dims: Vec<usize> =
        (0..nd).map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if n != Some(bytes.len() - head) {
        return Err(bad(&format!("IDX dims {dims:?} do not match the data size")));
    }
    Ok((dims, &bytes[head..]))
}

/// Class index of a folder name: its position among the labels (full line, display name or leading word such
/// as an ImageNet wnid), else among the sorted folder names.
fn class_of(name: &str, labels: Option<&[String]>, sorted: &[String]) -> usize {
    if let Some(l) = labels
        && let Some(i) =
            l.iter().position(|x| x == name || display_label(x) == name || x.split_whitespace().next() == Some(name))
    {
        return i;
    }
    sorted.iter().position(|x| x == name).unwrap_or(usize::MAX)
}

fn is_sample_file(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref(),
        Some("jpg" | "jpeg" | "png" | "npy" | "npz")
    )
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(dir).map_err(io(dir))?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    v.sort();
    Ok(v)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> Result<()> {
    for p in sorted_entries(dir)? {
        if p.is_dir() && depth < 8 {
            collect_files(&p, out, depth + 1)?;
        } else if is_sample_file(&p) {
            out.push(p);
        }
    }
    Ok(())
}

impl Dataset {
    /// A labelled dataset: `labels.csv` (+ `images/`), class folders, or an IDX image file with `idx_labels`.
    /// `labels` (the model's, if any) maps class-folder names to indices.
    pub fn labelled(path: &Path, idx_labels: Option<&Path>, labels: Option<&[String]>) -> Result<Dataset> {
        if let Some(lp) = idx_labels {
            let ib = read_maybe_gz(path)?;
            let lb = read_maybe_gz(lp)?;
            let (idims, ipix) = idx(&ib, path)?;
            let (ldims, lvals) = idx(&lb, lp)?;
            if idims.len() != 3 || ldims.len() != 1 || idims[0] != ldims[0] {
                return Err(DataError::Invalid(format!("IDX images {idims:?} and labels {ldims:?} do not match")));
            }
            let items = Items::Idx { images: ipix.to_vec(), rows: idims[1], cols: idims[2], labels: lvals.to_vec() };
            return Ok(Dataset { order: None, items });
        }
        if !path.is_dir() {
            return Err(DataError::Invalid(format!(
                "{}: not a dataset folder (labels.csv + images/, or class folders)",
                path.display()
            )));
        }
        let csv = path.join("labels.csv");
        let mut items = Vec::new();
        if csv.exists() {
            let text = std::fs::read_to_string(&csv).map_err(io(&csv))?;
            let bad = |m: String| DataError::Invalid(format!("{}: {m}", csv.display()));
            let mut lines = text.lines();
            let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
            let fcol = header.iter().position(|h| *h == "file");
            let ccol = header.iter().position(|h| *h == "class_index" || *h == "label");
            let (Some(fcol), Some(ccol)) = (fcol, ccol) else {
                return Err(bad("needs columns `file` and `class_index`".into()));
            };
            let img_dir = if path.join("images").is_dir() { path.join("images") } else { path.to_path_buf() };
            for (n, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let cells: Vec<&str> = line.split(',').collect();
                let (Some(f), Some(c)) = (cells.get(fcol), cells.get(ccol)) else {
                    return Err(bad(format!("line {}: too few columns", n + 2)));
                };
                let c: usize = c.trim().parse().map_err(|_| bad(format!("line {}: bad class index `{c}`", n + 2)))?;
                items.push((img_dir.join(f.trim()), Some(c)));
            }
        } else {
            let classes: Vec<String> = sorted_entries(path)?
                .into_iter()
                .filter(|p| p.is_dir())
                .filter_map(|p| p.file_name().map(|f| f.to_string_lossy().to_string()))
                .collect();
            for c in &classes {
                let k = class_of(c, labels, &classes);
                let files = sorted_entries(&path.join(c))?.into_iter().filter(|p| is_sample_file(p));
                items.extend(files.map(|f| (f, Some(k))));
            }
        }
        if items.is_empty() {
            return Err(DataError::Invalid(format!("{}: no labelled samples found", path.display())));
        }
        Ok(Dataset { order: None, items: Items::Files(items) })
    }

    /// Unlabelled samples for calibration: every image and `.npy` file under `path` (sorted, recursive), or
    /// the images of a labelled layout.
    pub fn samples(path: &Path) -> Result<Dataset> {
        if !path.is_dir() {
            return Err(DataError::Invalid(format!("{}: not a folder of samples", path.display())));
        }
        let mut files = Vec::new();
        collect_files(path, &mut files, 0)?;
        if files.is_empty() {
            return Err(DataError::Invalid(format!("{}: no images, .npy or .npz files found", path.display())));
        }
        Ok(Dataset { order: None, items: Items::Files(files.into_iter().map(|f| (f, None)).collect()) })
    }

    /// As [`Dataset::open`], for a model with these `inputs`: a model with several inputs may also take one
    /// folder per input under `path` (named as the inputs), holding `.npy` files of the same names (a sample is
    /// the files of one name).
    pub fn open_for_inputs(path: &Path, idx_labels: Option<&Path>, inputs: &[String]) -> Result<Dataset> {
        if inputs.len() > 1 && idx_labels.is_none() && inputs.iter().all(|i| path.join(i).is_dir()) {
            return Dataset::per_input(path, inputs);
        }
        Dataset::open(path, idx_labels)
    }

    fn per_input(path: &Path, inputs: &[String]) -> Result<Dataset> {
        let mut files = Vec::with_capacity(inputs.len());
        for i in inputs {
            let v: Vec<PathBuf> = sorted_entries(&path.join(i))?
                .into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == "npy"))
                .collect();
            files.push(v);
        }
        let names = |v: &Vec<PathBuf>| -> Vec<String> {
            v.iter().map(|p| p.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default()).collect()
        };
        let first = names(&files[0]);
        if first.is_empty() {
            return Err(DataError::Invalid(format!("{}: no .npy files", path.join(&inputs[0]).display())));
        }
        for (i, f) in inputs.iter().zip(&files).skip(1) {
            let these = names(f);
            if these != first {
                let odd = first.iter().chain(&these).find(|n| !(first.contains(n) && these.contains(n)));
                return Err(DataError::Invalid(format!(
                    "{}: the input folders must hold files of the same names ({} has {}, {} has {}; e.g. {})",
                    path.display(),
                    inputs[0],
                    first.len(),
                    i,
                    these.len(),
                    odd.map(String::as_str).unwrap_or("?")
                )));
            }
        }
        Ok(Dataset { order: None, items: Items::PerInput { inputs: inputs.to_vec(), files } })
    }

    /// Labelled when the layout says so (`idx_labels`, or `labels.csv` in `path`), else unlabelled samples.
    pub fn open(path: &Path, idx_labels: Option<&Path>) -> Result<Dataset> {
        if idx_labels.is_some() || path.join("labels.csv").is_file() {
            Dataset::labelled(path, idx_labels, None)
        } else {
            Dataset::samples(path)
        }
    }

    pub fn len(&self) -> usize {
        match &self.items {
            Items::Files(v) => v.len(),
            Items::Idx { labels, .. } => labels.len(),
            Items::PerInput { files, .. } => files[0].len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same samples in a fixed pseudo-random order (seeded Fisher-Yates), so that the first N of a dataset
    /// sorted by class (calibration, then held-out) cover every class instead of the first few.
    pub fn shuffled(mut self, seed: u64) -> Dataset {
        let n = self.len();
        let mut order: Vec<usize> = (0..n).collect();
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        for i in (1..n).rev() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            order.swap(i, (s % (i as u64 + 1)) as usize);
        }
        self.order = Some(order);
        self
    }

    /// Reads and decodes sample `k` (`k < len()`).
    pub fn get(&self, k: usize) -> Result<Sample> {
        let k = match &self.order {
            Some(o) => *o.get(k).ok_or_else(|| DataError::Invalid(format!("no sample {k}")))?,
            None => k,
        };
        match &self.items {
            Items::Files(v) => {
                let (p, label) = v.get(k).ok_or_else(|| DataError::Invalid(format!("no sample {k}")))?;
                let id = p.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
                let bytes = std::fs::read(p).map_err(io(p))?;
                let data = if p.extension().is_some_and(|e| e == "npz") {
                    SampleData::Feeds(crate::npz::read(&bytes).map_err(|m| DataError::Invalid(format!("{id}: {m}")))?)
                } else if p.extension().is_some_and(|e| e == "npy") {
                    SampleData::Tensor(
                        npy::read(&bytes).map_err(|source| DataError::Sample { id: id.clone(), source })?,
                    )
                } else {
                    SampleData::Image(
                        decode_image(&bytes).map_err(|source| DataError::Sample { id: id.clone(), source })?,
                    )
                };
                Ok(Sample { id, data, label: *label })
            }
            Items::PerInput { inputs, files } => {
                let mut feeds = Vec::with_capacity(inputs.len());
                for (name, f) in inputs.iter().zip(files) {
                    let p = f.get(k).ok_or_else(|| DataError::Invalid(format!("no sample {k}")))?;
                    let bytes = std::fs::read(p).map_err(io(p))?;
                    let id = p.display().to_string();
                    feeds.push((name.clone(), npy::read(&bytes).map_err(|source| DataError::Sample { id, source })?));
                }
                let id = files[0][k].file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
                Ok(Sample { id, data: SampleData::Feeds(feeds), label: None })
            }
            Items::Idx { images, rows, cols, labels } => {
                let n = rows * cols;
                let px = images.get(k * n..(k + 1) * n).ok_or_else(|| DataError::Invalid(format!("no sample {k}")))?;
                let img = image::GrayImage::from_raw(*cols as u32, *rows as u32, px.to_vec())
                    .ok_or_else(|| DataError::Invalid("IDX image size".into()))?;
                Ok(Sample {
                    id: format!("#{k}"),
                    data: SampleData::Image(DynamicImage::ImageLuma8(img)),
                    label: Some(labels[k] as usize),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgepack_runtime::DType;

    fn png(path: &Path, v: u8) {
        image::RgbImage::from_pixel(8, 6, image::Rgb([v, v, v])).save(path).unwrap();
    }

    #[test]
    fn class_folders_csv_and_samples() {
        let d = tempfile::tempdir().unwrap();
        for (c, v) in [("cat", 10u8), ("dog", 20)] {
            std::fs::create_dir(d.path().join(c)).unwrap();
            png(&d.path().join(c).join("a.png"), v);
        }
        let labels = vec!["n00000001 dog".to_string(), "n00000002 cat".to_string()];
        let ds = Dataset::labelled(d.path(), None, Some(&labels)).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.get(0).unwrap().label, Some(1)); // "cat" is line 1 of the labels
        assert_eq!(ds.get(1).unwrap().label, Some(0));

        std::fs::write(d.path().join("labels.csv"), "file,class_index\ncat/a.png,7\n").unwrap();
        let ds = Dataset::labelled(d.path(), None, None).unwrap();
        assert_eq!((ds.len(), ds.get(0).unwrap().label), (1, Some(7)));

        let t = Tensor::from_f32(vec![1, 3], vec![1.0, 2.0, 3.0]).unwrap();
        std::fs::write(d.path().join("dog").join("x.npy"), npy::write(&t)).unwrap();
        let ds = Dataset::samples(d.path()).unwrap();
        assert_eq!(ds.len(), 3);
        let inputs: Vec<Tensor> = (0..ds.len())
            .map(|k| ds.get(k).unwrap().to_input(Some(&ImagePreprocess::preset("raw255", 4, 4).unwrap())).unwrap())
            .collect();
        assert!(inputs.iter().any(|x| x == &t));
        assert!(inputs.iter().any(|x| x.shape() == [1, 3, 4, 4] && x.dtype() == DType::F32));
    }

    #[test]
    fn one_folder_per_input() {
        let d = tempfile::tempdir().unwrap();
        let inputs = ["ids".to_string(), "mask".to_string()];
        for (i, name) in inputs.iter().enumerate() {
            std::fs::create_dir(d.path().join(name)).unwrap();
            for k in 0..3 {
                let t = Tensor::from_f32(vec![1, 2], vec![k as f32, i as f32]).unwrap();
                std::fs::write(d.path().join(name).join(format!("{k:02}.npy")), npy::write(&t)).unwrap();
            }
        }
        let ds = Dataset::open_for_inputs(d.path(), None, &inputs).unwrap();
        assert_eq!(ds.len(), 3);
        let f = ds.get(2).unwrap().to_inputs(None, &inputs, &[]).unwrap();
        assert_eq!(f[0].0, "ids");
        assert_eq!((f[0].1.to_f32_vec(), f[1].1.to_f32_vec()), (vec![2.0, 0.0], vec![2.0, 1.0]));
        // A file missing from one input's folder: an error naming the layout.
        std::fs::remove_file(d.path().join("mask").join("01.npy")).unwrap();
        let e = Dataset::open_for_inputs(d.path(), None, &inputs).err().unwrap().to_string();
        assert!(e.contains("same names") && e.contains("01.npy"), "{e}");
        // A one-input model reads the folder as plain samples (recursively).
        assert_eq!(Dataset::open_for_inputs(d.path(), None, &inputs[..1]).unwrap().len(), 5);
    }

    #[test]
    fn bad_data_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(Dataset::samples(d.path()), Err(DataError::Invalid(_))));
        assert!(matches!(Dataset::labelled(d.path(), None, None), Err(DataError::Invalid(_))));
        std::fs::write(d.path().join("broken.png"), b"\x89PNG\r\n\x1a\nnope").unwrap();
        let ds = Dataset::samples(d.path()).unwrap();
        assert!(matches!(ds.get(0), Err(DataError::Sample { .. })));
        std::fs::write(d.path().join("labels.csv"), "name,x\n").unwrap();
        assert!(Dataset::labelled(d.path(), None, None).is_err());
        let idx = d.path().join("imgs.idx");
        std::fs::write(&idx, [0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3]).unwrap();
        assert!(Dataset::labelled(&idx, Some(&idx), None).is_err()); // 3 pixels for a 1x2x2 image
    }
}
