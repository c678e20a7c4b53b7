//! edgepack packager: writes `.edgepack` bundles (layout in `edgepack_runtime::bundle`) and manages the
//! ed25519 keys that sign them. Writes are atomic: a bundle either appears whole or not at all.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use ed25519_dalek::{Signer, SigningKey};
use edgepack_runtime::bundle::{
    self, ALIGN, BackendKind, CONTAINER_VERSION, FLAG_SIGNED, HEADER_LEN, MAGIC, MANIFEST_FORMAT_VERSION, Manifest,
    Member, Precision, PublicKey, SECRET_KEY_PREFIX, SIGNATURE_BLOCK_LEN, SIGNING_CONTEXT, Task, TensorSpec, Variant,
};
use edgepack_runtime::onnx::Model;
use edgepack_runtime::process::{Postprocess, Preprocess, StreamSpec};

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{0}")]
    Runtime(#[from] edgepack_runtime::Error),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("key: {0}")]
    Key(String),
    /// The bundle's description (pre/post-processing, labels, task) does not fit its model.
    #[error("{0}")]
    Mismatch(String),
}

mod check;
mod ultralytics;

/// zstd level of bundle members. What model weights gain from is libzstd's Huffman coding of literals, which
/// ruzstd's encoder (its only level) leaves about 27 % larger. Matches rarely pay on weights: on the int8 codes of
/// EfficientNet-Lite0 (3.57 bits of entropy each) level 1 stores 3.59 bits per weight, 19 stores 3.60, and the
/// levels between spend 3.75–4.16 on short matches that cost more than they save.
pub const ZSTD_LEVEL: i32 = 1;

/// One zstd frame of `bytes` at [`ZSTD_LEVEL`], readable by the runtime's pure-Rust decoder
/// ([`edgepack_runtime::compress::zstd_decompress`]). Falls back to ruzstd should libzstd fail.
///
/// An ONNX model's frame ends a block at each end of a large initializer's `raw_data` ([`onnx_raw_spans`]): every
/// zstd block has one Huffman table for its literals, and a 128 KiB block that straddles two weights of different
/// statistics (a 3.4-bit classifier after a 5-bit convolution, scales and biases between) codes both with one
/// table. Blocks on tensor bounds take EfficientNet-Lite0 on the 4-bit coded grid from 2.71 to 2.58 MB; the
/// frame is the same standard zstd. Kept only when smaller than the plain frame.
pub fn zstd_compress(bytes: &[u8]) -> Vec<u8> {
    let plain =
        zstd::bulk::compress(bytes, ZSTD_LEVEL).unwrap_or_else(|_| edgepack_runtime::compress::zstd_compress(bytes));
    let cuts: Vec<usize> = onnx_raw_spans(bytes, TENSOR_BLOCK_MIN).into_iter().flat_map(|(s, e)| [s, e]).collect();
    if cuts.is_empty() {
        return plain;
    }
    match zstd_blocks_at(bytes, &cuts) {
        Ok(aligned) if aligned.len() < plain.len() => aligned,
        _ => plain,
    }
}

/// Initializers smaller than this share blocks with their neighbours (a block header and a table cost more).
const TENSOR_BLOCK_MIN: usize = 4096;

/// One zstd frame of `bytes` whose blocks end at each of `cuts` (ascending offsets): a flush at each.
fn zstd_blocks_at(bytes: &[u8], cuts: &[usize]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut enc = zstd::stream::write::Encoder::new(Vec::with_capacity(bytes.len() / 2), ZSTD_LEVEL)?;
    enc.set_pledged_src_size(Some(bytes.len() as u64))?;
    let mut pos = 0;
    for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
        let c = c.min(bytes.len());
        if c > pos {
            enc.write_all(&bytes[pos..c])?;
            enc.flush()?;
            pos = c;
        }
    }
    enc.finish()
}

/// Byte spans `[start, end)` of the initializers' `raw_data` in a serialized ONNX model (`ModelProto.graph` = 7,
/// `GraphProto.initializer` = 5, `TensorProto.raw_data` = 9) of at least `min` bytes, in file order; empty when
/// `bytes` is not a model. A walk of the protobuf wire format: nothing is decoded.
pub fn onnx_raw_spans(bytes: &[u8], min: usize) -> Vec<(usize, usize)> {
    fn varint(b: &[u8], p: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let x = *b.get(*p)?;
            *p += 1;
            v |= u64::from(x & 0x7f) << shift;
            if x < 0x80 {
                return Some(v);
            }
        }
        None
    }
    /// The length-delimited fields numbered `want` of the message in `b[start..end]`; `None` if it does not parse.
    fn fields(b: &[u8], (start, end): (usize, usize), want: u64) -> Option<Vec<(usize, usize)>> {
        let (mut p, mut out) = (start, Vec::new());
        while p < end {
            let key = varint(b, &mut p)?;
            match key & 7 {
                0 => {
                    varint(b, &mut p)?;
                }
                1 => p = p.checked_add(8)?,
                5 => p = p.checked_add(4)?,
                2 => {
                    let n = usize::try_from(varint(b, &mut p)?).ok()?;
                    let s = p;
                    p = p.checked_add(n)?;
                    if p <= end && key >> 3 == want {
                        out.push((s, p));
                    }
                }
                _ => return None,
            }
        }
        (p == end).then_some(out)
    }
    let walk = || -> Option<Vec<(usize, usize)>> {
        let mut spans = Vec::new();
        for g in fields(bytes, (0, bytes.len()), 7)? {
            for t in fields(bytes, g, 5)? {
                spans.extend(fields(bytes, t, 9)?.into_iter().filter(|(s, e)| e - s >= min));
            }
        }
        Some(spans)
    };
    walk().unwrap_or_default()
}
pub use check::ssd_outputs;
pub use ultralytics::{YoloExport, parse_names, yolo_export};

type Result<T> = std::result::Result<T, PackError>;

fn io_err(path: &Path, source: std::io::Error) -> PackError {
    PackError::Io { path: path.display().to_string(), source }
}

/// A secret signing key, as written by [`generate_key`].
pub struct SecretKey(SigningKey);

impl SecretKey {
    pub fn generate() -> Result<SecretKey> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| PackError::Key(format!("no randomness: {e}")))?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    pub fn parse(text: &str) -> Result<SecretKey> {
        let seed = bundle::parse_key_text(text, SECRET_KEY_PREFIX).map_err(|e| PackError::Key(e.to_string()))?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    pub fn load(path: &Path) -> Result<SecretKey> {
        SecretKey::parse(&std::fs::read_to_string(path).map_err(|e| io_err(path, e))?)
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub fn to_text(&self) -> String {
        format!("{SECRET_KEY_PREFIX} {}\n", hex::encode(self.0.to_bytes()))
    }
}

/// Writes `<stem>.key` (mode 0600) and `<stem>.pub`; refuses to overwrite an existing secret key.
pub fn generate_key_files(stem: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf, PublicKey)> {
    let key_path = stem.with_extension("key");
    let pub_path = stem.with_extension("pub");
    if key_path.exists() {
        return Err(PackError::Invalid(format!("{} exists; not overwriting a secret key", key_path.display())));
    }
    let sk = SecretKey::generate()?;
    edgepack_runtime::fsutil::write_atomic_with(&key_path, |f| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        f.write_all(sk.to_text().as_bytes())
    })
    .map_err(|e| io_err(&key_path, e))?;
    let pk = sk.public();
    edgepack_runtime::fsutil::write_atomic(&pub_path, pk.to_text().as_bytes()).map_err(|e| io_err(&pub_path, e))?;
    Ok((key_path, pub_path, pk))
}

struct PendingMember {
    path: String,
    media_type: String,
    bytes: Vec<u8>,
}

/// A member as laid out: stored bytes and, when compressed, how they decode.
struct StoredMember {
    bytes: Vec<u8>,
    encoding: Option<bundle::Encoding>,
}

/// How [`BundleBuilder`] stores members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// As is (manifest format 1: readable by every edgepack version).
    #[default]
    None,
    /// zstd, for each member it makes smaller (manifest format 2). Sparse (pruned) weights shrink the most.
    Zstd,
}

/// Builds a bundle: add variants, processing, labels, reports; then [`BundleBuilder::write`].
pub struct BundleBuilder {
    name: String,
    version: String,
    description: Option<String>,
    task: Task,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    variants: Vec<Variant>,
    preprocess: Option<Preprocess>,
    postprocess: Option<Postprocess>,
    labels: Option<String>,
    label_count: Option<usize>,
    stream: Option<StreamSpec>,
    reports: Vec<String>,
    metadata: BTreeMap<String, String>,
    members: Vec<PendingMember>,
    compression: Compression,
}

impl BundleBuilder {
    pub fn new(name: &str, version: &str, task: Task) -> BundleBuilder {
        BundleBuilder {
            name: name.into(),
            version: version.into(),
            description: None,
            task,
            inputs: vec![],
            outputs: vec![],
            variants: vec![],
            preprocess: None,
            postprocess: None,
            labels: None,
            label_count: None,
            stream: None,
            reports: vec![],
            metadata: BTreeMap::new(),
            members: vec![],
            compression: Compression::None,
        }
    }

    /// How members are stored (default: as is).
    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = c;
        self
    }

    pub fn description(mut self, d: &str) -> Self {
        self.description = Some(d.into());
        self
    }

    pub fn metadata(mut self, key: &str, value: &str) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    pub fn preprocess(mut self, p: Preprocess) -> Self {
        self.preprocess = Some(p);
        self
    }

    /// How to run the model over a stream of samples (state carried between calls).
    pub fn stream(mut self, s: StreamSpec) -> Self {
        self.stream = Some(s);
        self
    }

    pub fn postprocess(mut self, p: Postprocess) -> Self {
        self.postprocess = Some(p);
        self
    }

    fn add_member(&mut self, path: String, media_type: &str, bytes: Vec<u8>) -> Result<()> {
        bundle::check_member_path(&path).map_err(|e| PackError::Invalid(e.to_string()))?;
        if self.members.iter().any(|m| m.path == path) {
            return Err(PackError::Invalid(format!("member `{path}` added twice")));
        }
        self.members.push(PendingMember { path, media_type: media_type.into(), bytes });
        Ok(())
    }

    /// Adds a model variant. The ONNX bytes are checked (decoded and validated); the first variant fixes the
    /// bundle's inputs/outputs and later variants must have the same input names.
    pub fn variant(mut self, id: &str, onnx: Vec<u8>, precision: Precision, backends: &[BackendKind]) -> Result<Self> {
        let model = Model::from_bytes(&onnx)?;
        let (inputs, outputs) = edgepack_runtime::session::model_io(&model);
        let (inputs, outputs): (Vec<TensorSpec>, Vec<TensorSpec>) =
            (inputs.iter().map(|i| i.spec()).collect(), outputs.iter().map(|o| o.spec()).collect());
        if self.variants.is_empty() {
            self.inputs = inputs;
            self.outputs = outputs;
        } else if inputs.iter().map(|i| &i.name).ne(self.inputs.iter().map(|i| &i.name)) {
            return Err(PackError::Invalid(format!("variant `{id}` has different inputs than the first variant")));
        }
        if self.variants.iter().any(|v| v.id == id) {
            return Err(PackError::Invalid(format!("variant `{id}` added twice")));
        }
        let path = format!("models/{id}.onnx");
        self.variants.push(Variant {
            id: id.into(),
            member: path.clone(),
            precision,
            preferred_backends: backends.to_vec(),
            sha256: bundle::sha256_hex(&onnx),
            size: onnx.len() as u64,
            description: None,
        });
        self.add_member(path, "application/onnx", onnx)?;
        Ok(self)
    }

    /// Labels, one per line (class index = line number).
    pub fn labels(mut self, lines: &[String]) -> Result<Self> {
        let text = lines.join("\n") + "\n";
        self.add_member("labels.txt".into(), "text/plain", text.into_bytes())?;
        self.labels = Some("labels.txt".into());
        self.label_count = Some(lines.len());
        Ok(self)
    }

    /// A report stored under `reports/<name>`.
    pub fn report(mut self, name: &str, media_type: &str, bytes: Vec<u8>) -> Result<Self> {
        let path = format!("reports/{name}");
        self.add_member(path.clone(), media_type, bytes)?;
        self.reports.push(path);
        Ok(self)
    }

    /// Lays the bundle out and returns (manifest, bytes). Signs the manifest when a key is given.
    pub fn build(self, key: Option<&SecretKey>) -> Result<(Manifest, Vec<u8>)> {
        if self.variants.is_empty() {
            return Err(PackError::Invalid("a bundle needs at least one model variant".into()));
        }
        check::check(
            self.task,
            &self.inputs,
            &self.outputs,
            self.preprocess.as_ref(),
            self.postprocess.as_ref(),
            self.label_count,
        )
        .map_err(PackError::Mismatch)?;
        if let Some(st) = &self.stream {
            check::check_stream(st, &self.inputs, &self.outputs).map_err(PackError::Mismatch)?;
        }
        let stored: Vec<StoredMember> = self
            .members
            .iter()
            .map(|m| {
                if self.compression == Compression::Zstd {
                    let z = zstd_compress(&m.bytes);
                    if z.len() < m.bytes.len() {
                        let encoding = bundle::Encoding {
                            codec: "zstd".into(),
                            size: m.bytes.len() as u64,
                            sha256: bundle::sha256_hex(&m.bytes),
                        };
                        return StoredMember { bytes: z, encoding: Some(encoding) };
                    }
                }
                StoredMember { bytes: m.bytes.clone(), encoding: None }
            })
            .collect();
        let format_version = if stored.iter().any(|s| s.encoding.is_some()) {
            MANIFEST_FORMAT_VERSION
        } else {
            bundle::MANIFEST_FORMAT_VERSION_PLAIN
        };
        let mut manifest = Manifest {
            format: "edgepack".into(),
            format_version,
            name: self.name,
            version: self.version,
            description: self.description,
            created_by: format!("edgepack {}", edgepack_runtime::VERSION),
            task: self.task,
            inputs: self.inputs,
            outputs: self.outputs,
            variants: self.variants,
            preprocess: self.preprocess,
            postprocess: self.postprocess,
            labels: self.labels,
            stream: self.stream,
            reports: self.reports,
            members: vec![],
            metadata: self.metadata,
        };
        let sig_len = if key.is_some() { SIGNATURE_BLOCK_LEN } else { 0 };
        let align = |x: u64| x.div_ceil(ALIGN) * ALIGN;
        // Offsets depend on the manifest's length, which depends on the offsets: iterate to a fixed point
        // (the length only grows with the digits of the offsets, so this ends in a few rounds).
        let mut manifest_json = Vec::new();
        for _ in 0..8 {
            let mut at = align((HEADER_LEN + sig_len) as u64 + manifest_json.len() as u64);
            manifest.members = self
                .members
                .iter()
                .zip(&stored)
                .map(|(m, s)| {
                    let mem = Member {
                        path: m.path.clone(),
                        offset: at,
                        size: s.bytes.len() as u64,
                        sha256: bundle::sha256_hex(&s.bytes),
                        media_type: m.media_type.clone(),
                        encoding: s.encoding.clone(),
                    };
                    at = align(at + s.bytes.len() as u64);
                    mem
                })
                .collect();
            let next = serde_json::to_vec_pretty(&manifest).map_err(|e| PackError::Invalid(e.to_string()))?;
            if next.len() == manifest_json.len() {
                manifest_json = next;
                break;
            }
            manifest_json = next;
        }
        let manifest_end = (HEADER_LEN + sig_len + manifest_json.len()) as u64;
        if manifest.members.first().is_some_and(|m| m.offset < manifest_end) {
            return Err(PackError::Invalid("bundle layout did not converge".into()));
        }
        let total = manifest.members.last().map(|m| m.offset + m.size).unwrap_or(manifest_end);
        let mut out = Vec::with_capacity(total as usize);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&CONTAINER_VERSION.to_le_bytes());
        out.extend_from_slice(&(if key.is_some() { FLAG_SIGNED } else { 0 }).to_le_bytes());
        out.extend_from_slice(&(manifest_json.len() as u64).to_le_bytes());
        out.extend_from_slice(&total.to_le_bytes());
        if let Some(k) = key {
            let sig = k.0.sign(&[SIGNING_CONTEXT, &manifest_json].concat());
            out.extend_from_slice(k.0.verifying_key().as_bytes());
            out.extend_from_slice(&sig.to_bytes());
        }
        out.extend_from_slice(&manifest_json);
        for (s, mem) in stored.iter().zip(&manifest.members) {
            out.resize(mem.offset as usize, 0);
            out.extend_from_slice(&s.bytes);
        }
        debug_assert_eq!(out.len() as u64, total);
        Ok((manifest, out))
    }

    /// Builds and writes the bundle atomically; re-opens it to prove it verifies.
    pub fn write(self, path: &Path, key: Option<&SecretKey>) -> Result<Manifest> {
        let public = key.map(SecretKey::public);
        let (manifest, bytes) = self.build(key)?;
        edgepack_runtime::fsutil::write_atomic(path, &bytes).map_err(|e| io_err(path, e))?;
        edgepack_runtime::Bundle::open(path, &bundle::OpenOptions { key: public, ..Default::default() })?;
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests;
