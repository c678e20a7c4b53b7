//! The `.edgepack` container: reading and verification. The writer lives in `edgepack-packager`; both share
//! the layout constants and manifest types defined here.
//!
//! Layout (all integers little-endian):
//! ```text
//! 0   magic "EDGEPACK"            8 bytes
//! 8   container version (u32)     = 1
//! 12  flags (u32)                 bit 0: signed
//! 16  manifest length (u64)
//! 24  total file length (u64)     truncation / trailing-garbage check
//! 32  [signed] ed25519 public key (32) + signature (64) over SIGNING_CONTEXT || manifest
//! ..  manifest (UTF-8 JSON, schema: schema/manifest.v1.schema.json)
//! ..  members, each at a 64-byte aligned absolute offset listed in the manifest, sha256 in the manifest
//! ```
//! A member may be stored zstd-compressed (manifest format 2): its `encoding` gives the codec and the size and
//! sha256 of the decoded bytes; the stored bytes' sha256 is checked at open, the decoded bytes' when read.
//! Everything is checked (sizes, versions, signature, every member's hash) before any model code runs.
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

pub mod compress;

use edgepack_core::Dim;
use edgepack_core::tensor::DType;
pub use edgepack_core::{BackendKind, BundleError};
use edgepack_process::{Postprocess, Preprocess, StreamSpec};

pub const MAGIC: &[u8; 8] = b"EDGEPACK";
pub const CONTAINER_VERSION: u32 = 1;
/// The newest manifest format: 2 adds compressed members (`Member::encoding`). Writers use 1 when no member is
/// compressed, so older readers still open those bundles.
pub const MANIFEST_FORMAT_VERSION: u32 = 2;
pub const MANIFEST_FORMAT_VERSION_PLAIN: u32 = 1;
/// Largest decoded size a compressed member may declare.
pub const MAX_DECODED_MEMBER: u64 = 4 << 30;
pub const HEADER_LEN: usize = 32;
pub const SIGNATURE_BLOCK_LEN: usize = 96;
pub const FLAG_SIGNED: u32 = 1;
pub const ALIGN: u64 = 64;
/// Domain separation for signatures, so a manifest signature can never be replayed as another message.
pub const SIGNING_CONTEXT: &[u8] = b"edgepack-manifest-v1\0";
pub const MAX_MANIFEST_LEN: u64 = 4 << 20;
/// Default cap on a bundle file; callers may raise it with [`OpenOptions::max_bundle_size`].
pub const DEFAULT_MAX_BUNDLE_SIZE: u64 = 2 << 30;

/// Numeric precision of a model variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Fp16,
    Int8,
    // 4-bit weights (int8 where a layer needs it), float activations: `edgepack quantize --weight-only 4`.
    Int4,
    Mixed,
}

/// What the bundle's model does (drives the default post-processing and the CLI's output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Classification,
    Detection,
    Custom,
}

impl Precision {
    /// The manifest's word for it: "fp32", "fp16", "int8", "int4", "mixed".
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
            Precision::Int4 => "int4",
            Precision::Mixed => "mixed",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Task {
    /// The manifest's word for it (and `pack --task`'s): "classification", "detection", "custom".
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Classification => "classification",
            Task::Detection => "detection",
            Task::Custom => "custom",
        }
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Name, element type and shape of a model input or output.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Option<DType>,
    /// Dimensions: numbers, or names for symbolic dims ("" when unnamed and unknown).
    pub shape: Vec<Dim>,
}

/// One model file of the bundle (fp32, int8, pruned...).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Variant {
    /// Short identifier: "fp32", "int8", "pruned-int8"...
    pub id: String,
    /// Path of the member holding the ONNX file.
    pub member: String,
    pub precision: Precision,
    pub preferred_backends: Vec<BackendKind>,
    /// sha256 and size of the ONNX file; must equal the member's (decoded, when it is compressed), checked on open.
    pub sha256: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A stored file: where it is and what it hashes to.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Member {
    pub path: String,
    /// Absolute byte offset in the bundle (64-byte aligned).
    pub offset: u64,
    pub size: u64,
    /// Lower-case hex sha256 of the stored bytes.
    pub sha256: String,
    /// IANA-style media type, e.g. "application/onnx", "text/plain", "application/json".
    pub media_type: String,
    /// Present when the stored bytes are compressed (manifest format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
}

/// How a compressed member decodes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Encoding {
    /// Only "zstd".
    pub codec: String,
    /// Size of the decoded bytes.
    pub size: u64,
    /// Lower-case hex sha256 of the decoded bytes.
    pub sha256: String,
}

impl Member {
    /// (size, sha256) of the member's content: decoded when compressed, else as stored.
    pub fn content_identity(&self) -> (u64, &str) {
        match &self.encoding {
            Some(e) => (e.size, &e.sha256),
            None => (self.size, &self.sha256),
        }
    }
}

/// The self-description of a bundle.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Manifest {
    /// Always "edgepack".
    pub format: String,
    pub format_version: u32,
    pub name: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Tool that wrote the bundle, e.g. "edgepack 0.1.0".
    pub created_by: String,
    pub task: Task,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Model variants; the first is the default.
    pub variants: Vec<Variant>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<Preprocess>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postprocess: Option<Postprocess>,
    /// Member holding one label per line (class index = line number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<String>,
    /// How to run the model over a stream of samples, carrying state between calls (e.g. Silero VAD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamSpec>,
    /// Members holding reports (fidelity, pruning, benchmarks).
    #[serde(default)]
    pub reports: Vec<String>,
    pub members: Vec<Member>,
    /// Free-form key/values (license, source, attribution...).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

impl Manifest {
    pub fn member(&self, path: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.path == path)
    }

    pub fn variant(&self, id: Option<&str>) -> Result<&Variant, BundleError> {
        let found = match id {
            None => self.variants.first(),
            Some(id) => self.variants.iter().find(|v| v.id == id),
        };
        found.ok_or_else(|| BundleError::NoSuchVariant {
            wanted: id.unwrap_or("<default>").to_string(),
            available: self.variants.iter().map(|v| v.id.as_str()).collect::<Vec<_>>().join(", "),
        })
    }

    /// The JSON schema of the manifest, as checked in at `schema/manifest.v1.schema.json`.
    pub fn json_schema() -> serde_json::Value {
        serde_json::to_value(schemars::schema_for!(Manifest)).expect("schema serialises")
    }
}

/// Options for [`Bundle::open`].
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Trusted public key: the bundle must be signed by it.
    pub key: Option<PublicKey>,
    pub max_bundle_size: u64,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { key: None, max_bundle_size: DEFAULT_MAX_BUNDLE_SIZE }
    }
}

/// An ed25519 public key, as written by `edgepack keygen` (`<name>.pub`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey(pub VerifyingKey);

pub const PUBLIC_KEY_PREFIX: &str = "edgepack-ed25519-public";
pub const SECRET_KEY_PREFIX: &str = "edgepack-ed25519-secret";

impl PublicKey {
    pub fn from_bytes(b: &[u8; 32]) -> Result<PublicKey, BundleError> {
        VerifyingKey::from_bytes(b).map(PublicKey).map_err(|e| BundleError::Key(e.to_string()))
    }

    /// Parses the text form `edgepack-ed25519-public <64 hex>`.
    pub fn parse(text: &str) -> Result<PublicKey, BundleError> {
        if text.trim_start().starts_with(SECRET_KEY_PREFIX) {
            return Err(BundleError::Key(
                "this is the secret signing key; verifying takes the public key (the `.pub` file `edgepack keygen` \
                 wrote beside it)"
                    .into(),
            ));
        }
        PublicKey::from_bytes(&parse_key_text(text, PUBLIC_KEY_PREFIX)?)
    }

    pub fn load(path: &Path) -> edgepack_core::Result<PublicKey> {
        let text = std::fs::read_to_string(path).map_err(|e| edgepack_core::Error::io(path, e))?;
        Ok(PublicKey::parse(&text)?)
    }

    pub fn to_text(&self) -> String {
        format!("{PUBLIC_KEY_PREFIX} {}\n", hex::encode(self.0.as_bytes()))
    }

    /// Short fingerprint: first 16 hex digits of sha256(public key).
    pub fn key_id(&self) -> String {
        hex::encode(&Sha256::digest(self.0.as_bytes())[..8])
    }
}

/// The 32 key bytes of a key file's text form `<prefix> <64 hex digits>` (public and secret keys alike).
pub fn parse_key_text(text: &str, prefix: &str) -> Result<[u8; 32], BundleError> {
    let hexpart = text
        .trim()
        .strip_prefix(prefix)
        .ok_or_else(|| BundleError::Key(format!("not a `{prefix}` key file (expected `{prefix} <hex>`)")))?
        .trim();
    hex::decode(hexpart)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| BundleError::Key(format!("`{prefix}` key must be 32 bytes of hex")))
}

/// A bundle that passed every check.
#[derive(Debug, Clone)]
pub struct Bundle {
    manifest: Manifest,
    bytes: std::sync::Arc<[u8]>,
    signer: Option<PublicKey>,
    trusted: bool,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Checks a member path: relative, forward slashes, no `..`, printable.
pub fn check_member_path(p: &str) -> Result<(), BundleError> {
    let ok = !p.is_empty()
        && p.len() <= 255
        && !p.starts_with('/')
        && !p.contains('\\')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && p.chars().all(|c| !c.is_control());
    if ok { Ok(()) } else { Err(BundleError::Manifest(format!("invalid member path `{p}`"))) }
}

impl Bundle {
    /// Opens and fully verifies a bundle file.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> edgepack_core::Result<Bundle> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| edgepack_core::Error::io(path, e))?;
        if meta.len() > opts.max_bundle_size {
            return Err(BundleError::TooLarge(format!(
                "{} bytes exceeds the limit of {} bytes",
                meta.len(),
                opts.max_bundle_size
            ))
            .into());
        }
        let bytes = std::fs::read(path).map_err(|e| edgepack_core::Error::io(path, e))?;
        Ok(Bundle::from_bytes(bytes, opts)?)
    }

    /// Verifies a bundle held in memory.
    pub fn from_bytes(bytes: impl Into<std::sync::Arc<[u8]>>, opts: &OpenOptions) -> Result<Bundle, BundleError> {
        let bytes: std::sync::Arc<[u8]> = bytes.into();
        let b = &bytes[..];
        if b.len() as u64 > opts.max_bundle_size {
            return Err(BundleError::TooLarge(format!(
                "{} bytes exceeds the limit of {}",
                b.len(),
                opts.max_bundle_size
            )));
        }
        if b.len() < 8 || &b[..8] != MAGIC {
            return Err(if b.len() < 8 && MAGIC.starts_with(b) && !b.is_empty() {
                BundleError::Truncated("file ends inside the header".into())
            } else {
                BundleError::NotABundle
            });
        }
        if b.len() < HEADER_LEN {
            return Err(BundleError::Truncated(format!("{} bytes, the header alone is {HEADER_LEN}", b.len())));
        }
        let version = u32_at(b, 8);
        if version != CONTAINER_VERSION {
            return Err(BundleError::UnsupportedVersion {
                what: "container",
                found: version.into(),
                supported: CONTAINER_VERSION,
            });
        }
        let flags = u32_at(b, 12);
        if flags & !FLAG_SIGNED != 0 {
            return Err(BundleError::Corrupt(format!("unknown header flags {flags:#x}")));
        }
        let manifest_len = u64_at(b, 16);
        let total_len = u64_at(b, 24);
        if manifest_len > MAX_MANIFEST_LEN {
            return Err(BundleError::TooLarge(format!("manifest of {manifest_len} bytes (limit {MAX_MANIFEST_LEN})")));
        }
        if total_len > b.len() as u64 {
            return Err(BundleError::Truncated(format!("header says {total_len} bytes, file has {}", b.len())));
        }
        if total_len < b.len() as u64 {
            return Err(BundleError::Corrupt(format!(
                "{} bytes of trailing data after the bundle",
                b.len() as u64 - total_len
            )));
        }
        let signed = flags & FLAG_SIGNED != 0;
        let manifest_start = HEADER_LEN + if signed { SIGNATURE_BLOCK_LEN } else { 0 };
        let manifest_end = manifest_start as u64 + manifest_len;
        if manifest_end > total_len {
            return Err(BundleError::Truncated("file ends inside the manifest".into()));
        }
        let manifest_bytes = &b[manifest_start..manifest_end as usize];

        // Signature before parsing: a signed bundle's manifest is authenticated before it is interpreted.
        let mut signer = None;
        let mut trusted = false;
        if signed {
            let pk: [u8; 32] = b[HEADER_LEN..HEADER_LEN + 32].try_into().unwrap();
            let sig: [u8; 64] = b[HEADER_LEN + 32..HEADER_LEN + 96].try_into().unwrap();
            let embedded = PublicKey::from_bytes(&pk)
                .map_err(|_| BundleError::Signature("embedded public key is invalid".into()))?;
            if let Some(want) = &opts.key
                && want != &embedded
            {
                return Err(BundleError::Signature(format!(
                    "signed by key {} but key {} was required (wrong key)",
                    embedded.key_id(),
                    want.key_id()
                )));
            }
            let msg = [SIGNING_CONTEXT, manifest_bytes].concat();
            embedded
                .0
                .verify(&msg, &Signature::from_bytes(&sig))
                .map_err(|_| BundleError::Signature("signature does not match the manifest (tampered)".into()))?;
            trusted = opts.key.is_some();
            signer = Some(embedded);
        } else if let Some(want) = &opts.key {
            return Err(BundleError::Signature(format!(
                "bundle is not signed, but key {} was required",
                want.key_id()
            )));
        }

        let manifest: Manifest =
            serde_json::from_slice(manifest_bytes).map_err(|e| BundleError::Manifest(e.to_string()))?;
        if manifest.format != "edgepack" {
            return Err(BundleError::Manifest(format!("format is `{}`, expected `edgepack`", manifest.format)));
        }
        if !(MANIFEST_FORMAT_VERSION_PLAIN..=MANIFEST_FORMAT_VERSION).contains(&manifest.format_version) {
            return Err(BundleError::UnsupportedVersion {
                what: "manifest format",
                found: manifest.format_version.into(),
                supported: MANIFEST_FORMAT_VERSION,
            });
        }
        check_layout(&manifest, manifest_end, total_len)?;
        for m in &manifest.members {
            let data = &b[m.offset as usize..(m.offset + m.size) as usize];
            let actual = sha256_hex(data);
            if actual != m.sha256 {
                return Err(BundleError::Tampered { member: m.path.clone(), expected: m.sha256.clone(), actual });
            }
        }
        check_references(&manifest)?;
        Ok(Bundle { manifest, bytes, signer, trusted })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The key that signed the manifest, if signed.
    pub fn signer(&self) -> Option<&PublicKey> {
        self.signer.as_ref()
    }

    /// True when opened with a trusted key and the signature verified against it.
    pub fn is_trusted(&self) -> bool {
        self.trusted
    }

    /// A member's content: borrowed when stored as is, decoded (and its decoded sha256 checked) when compressed.
    pub fn member(&self, path: &str) -> Result<std::borrow::Cow<'_, [u8]>, BundleError> {
        let m = self.manifest.member(path).ok_or_else(|| BundleError::MissingMember(path.to_string()))?;
        let stored = &self.bytes[m.offset as usize..(m.offset + m.size) as usize];
        let Some(e) = &m.encoding else { return Ok(std::borrow::Cow::Borrowed(stored)) };
        let decoded = crate::compress::zstd_decompress(stored, e.size)
            .map_err(|why| BundleError::Corrupt(format!("member `{}`: {why}", m.path)))?;
        let actual = sha256_hex(&decoded);
        if actual != e.sha256 {
            return Err(BundleError::Tampered { member: m.path.clone(), expected: e.sha256.clone(), actual });
        }
        Ok(std::borrow::Cow::Owned(decoded))
    }

    /// The ONNX bytes of a variant (default: the first), decoded when the member is compressed.
    pub fn model_bytes(&self, variant: Option<&str>) -> Result<(&Variant, std::borrow::Cow<'_, [u8]>), BundleError> {
        let v = self.manifest.variant(variant)?;
        Ok((v, self.member(&v.member)?))
    }

    /// Labels, one per line, if the bundle has any.
    pub fn labels(&self) -> Result<Option<Vec<String>>, BundleError> {
        let Some(p) = &self.manifest.labels else { return Ok(None) };
        let bytes = self.member(p)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| BundleError::Manifest("labels are not UTF-8".into()))?;
        Ok(Some(text.lines().map(|l| l.trim_end_matches('\r').to_string()).collect()))
    }

    pub fn size(&self) -> usize {
        self.bytes.len()
    }
}

fn check_layout(m: &Manifest, data_start: u64, total_len: u64) -> Result<(), BundleError> {
    let mut paths = HashSet::new();
    let mut ranges: Vec<(u64, u64, &str)> = Vec::new();
    for mem in &m.members {
        check_member_path(&mem.path)?;
        if !paths.insert(mem.path.as_str()) {
            return Err(BundleError::Manifest(format!("member `{}` listed twice", mem.path)));
        }
        let end = mem
            .offset
            .checked_add(mem.size)
            .ok_or_else(|| BundleError::Corrupt(format!("member `{}` range overflows", mem.path)))?;
        if mem.offset < data_start || mem.offset % ALIGN != 0 {
            return Err(BundleError::Corrupt(format!("member `{}` has an invalid offset {}", mem.path, mem.offset)));
        }
        if end > total_len {
            return Err(BundleError::Truncated(format!(
                "member `{}` ends at {end}, past the end of the file",
                mem.path
            )));
        }
        if mem.sha256.len() != 64 || !mem.sha256.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) {
            return Err(BundleError::Manifest(format!("member `{}` has a malformed sha256", mem.path)));
        }
        if let Some(e) = &mem.encoding {
            if m.format_version < 2 {
                return Err(BundleError::Manifest(format!(
                    "member `{}` is compressed, which needs manifest format 2 (this one says {})",
                    mem.path, m.format_version
                )));
            }
            if e.codec != "zstd" {
                return Err(BundleError::Manifest(format!("member `{}`: unknown codec `{}`", mem.path, e.codec)));
            }
            if e.size > MAX_DECODED_MEMBER {
                return Err(BundleError::TooLarge(format!(
                    "member `{}` decodes to {} bytes (limit {MAX_DECODED_MEMBER})",
                    mem.path, e.size
                )));
            }
            if e.sha256.len() != 64 || !e.sha256.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) {
                return Err(BundleError::Manifest(format!("member `{}` has a malformed decoded sha256", mem.path)));
            }
        }
        ranges.push((mem.offset, end, &mem.path));
    }
    ranges.sort();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(BundleError::Corrupt(format!("members `{}` and `{}` overlap", w[0].2, w[1].2)));
        }
    }
    Ok(())
}

fn check_references(m: &Manifest) -> Result<(), BundleError> {
    if m.variants.is_empty() {
        return Err(BundleError::Manifest("no model variant".into()));
    }
    let mut ids = HashSet::new();
    for v in &m.variants {
        if !ids.insert(&v.id) {
            return Err(BundleError::Manifest(format!("variant `{}` listed twice", v.id)));
        }
        let mem = m.member(&v.member).ok_or_else(|| BundleError::MissingMember(v.member.clone()))?;
        if mem.content_identity() != (v.size, v.sha256.as_str()) {
            return Err(BundleError::Manifest(format!("variant `{}` disagrees with its member's hash or size", v.id)));
        }
    }
    for r in m.labels.iter().chain(&m.reports) {
        m.member(r).ok_or_else(|| BundleError::MissingMember(r.clone()))?;
    }
    Ok(())
}
