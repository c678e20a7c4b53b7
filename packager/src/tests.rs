use super::*;
use edgepack_runtime::bundle::{BundleError, OpenOptions};
use edgepack_runtime::onnx::builder::tiny_classifier;
use edgepack_runtime::process::{ImagePreprocess, Softmax};
use edgepack_runtime::{Bundle, Error};

fn builder() -> BundleBuilder {
    BundleBuilder::new("tiny", "1.2.3", Task::Classification)
        .description("a test bundle")
        .metadata("license", "Apache-2.0")
        .postprocess(Postprocess::Classification { output: None, softmax: Softmax::Auto, top_k: 2, label_offset: 0 })
        .variant("fp32", tiny_classifier().to_bytes(), Precision::Fp32, &[BackendKind::Cpu, BackendKind::Gpu])
        .unwrap()
        .labels(&["a".into(), "b".into(), "c".into()])
        .unwrap()
        .report("notes.json", "application/json", b"{\"ok\":true}".to_vec())
        .unwrap()
}

fn open(bytes: &[u8], key: Option<PublicKey>) -> std::result::Result<Bundle, BundleError> {
    Bundle::from_bytes(bytes.to_vec(), &OpenOptions { key, ..Default::default() })
}

#[test]
fn unsigned_and_signed_round_trip() {
    let (m, bytes) = builder().build(None).unwrap();
    let b = open(&bytes, None).unwrap();
    assert_eq!(b.manifest(), &m);
    assert!(b.signer().is_none());
    assert_eq!(b.labels().unwrap().unwrap(), vec!["a", "b", "c"]);
    assert_eq!(b.model_bytes(None).unwrap().1, tiny_classifier().to_bytes().as_slice());
    assert_eq!(b.member("reports/notes.json").unwrap().as_ref(), b"{\"ok\":true}");
    assert!(m.members.iter().all(|x| x.offset % ALIGN == 0));

    let sk = SecretKey::generate().unwrap();
    let (_, signed) = builder().build(Some(&sk)).unwrap();
    let b = open(&signed, Some(sk.public())).unwrap();
    assert!(b.is_trusted());
    assert_eq!(b.signer().unwrap().key_id(), sk.public().key_id());
    // Without a trusted key, a signed bundle still has its signature checked (integrity), but is not trusted.
    assert!(!open(&signed, None).unwrap().is_trusted());
}

#[test]
fn wrong_key_and_missing_signature_are_rejected() {
    let sk = SecretKey::generate().unwrap();
    let other = SecretKey::generate().unwrap();
    let (_, signed) = builder().build(Some(&sk)).unwrap();
    let e = open(&signed, Some(other.public())).unwrap_err();
    assert!(matches!(e, BundleError::Signature(ref m) if m.contains("wrong key")), "{e}");
    let (_, unsigned) = builder().build(None).unwrap();
    assert!(matches!(open(&unsigned, Some(sk.public())).unwrap_err(), BundleError::Signature(_)));
}

#[test]
fn every_truncation_is_rejected() {
    let (_, bytes) = builder().build(Some(&SecretKey::generate().unwrap())).unwrap();
    for cut in (0..bytes.len()).step_by(7).chain([bytes.len() - 1]) {
        let e = open(&bytes[..cut], None).unwrap_err();
        assert!(matches!(e, BundleError::Truncated(_) | BundleError::NotABundle), "cut at {cut}/{}: {e}", bytes.len());
    }
}

#[test]
fn tampering_is_detected_everywhere() {
    let sk = SecretKey::generate().unwrap();
    let (m, signed) = builder().build(Some(&sk)).unwrap();
    // Flip one byte inside each member: the member hash catches it.
    for mem in &m.members {
        let mut b = signed.clone();
        b[(mem.offset + mem.size / 2) as usize] ^= 0x40;
        match open(&b, Some(sk.public())).unwrap_err() {
            BundleError::Tampered { member, .. } => assert_eq!(member, mem.path),
            e => panic!("{}: {e}", mem.path),
        }
    }
    // Flip a byte in the signed manifest: the signature catches it.
    let mut b = signed.clone();
    b[HEADER_LEN + SIGNATURE_BLOCK_LEN + 20] ^= 1;
    assert!(matches!(open(&b, None).unwrap_err(), BundleError::Signature(_)));
    // Unsigned: edit the manifest's recorded hash of the model to match tampered bytes is impossible without
    // also rewriting the manifest; a rewritten manifest without a key is accepted only if consistent.
    let (_, unsigned) = builder().build(None).unwrap();
    let mut b = unsigned.clone();
    let mid = HEADER_LEN + 40;
    b[mid] ^= 0x20;
    assert!(open(&b, None).is_err());
}

#[test]
fn versions_sizes_and_garbage_are_rejected() {
    let (_, bytes) = builder().build(None).unwrap();
    let mut v2 = bytes.clone();
    v2[8] = 2;
    assert!(matches!(
        open(&v2, None).unwrap_err(),
        BundleError::UnsupportedVersion { what: "container", found: 2, .. }
    ));

    let needle = b"\"format_version\": 1";
    let at = bytes.windows(needle.len()).position(|w| w == needle).unwrap() + needle.len() - 1;
    let mut fv = bytes.clone();
    fv[at] = b'9';
    assert!(matches!(
        open(&fv, None).unwrap_err(),
        BundleError::UnsupportedVersion { what: "manifest format", found: 9, .. }
    ));

    let e = Bundle::from_bytes(bytes.clone(), &OpenOptions { key: None, max_bundle_size: 100 }).unwrap_err();
    assert!(matches!(e, BundleError::TooLarge(_)));
    let mut huge = bytes.clone();
    huge[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(open(&huge, None).unwrap_err(), BundleError::TooLarge(_)));

    let mut trailing = bytes.clone();
    trailing.extend_from_slice(b"junk");
    assert!(matches!(open(&trailing, None).unwrap_err(), BundleError::Corrupt(_)));
    assert!(matches!(open(b"PK\x03\x04 a zip file", None).unwrap_err(), BundleError::NotABundle));
    assert!(matches!(open(b"", None).unwrap_err(), BundleError::NotABundle));
}

#[test]
fn random_corruption_never_panics() {
    let (_, bytes) = builder().build(Some(&SecretKey::generate().unwrap())).unwrap();
    let mut rng = 0x9E3779B97F4A7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for _ in 0..2000 {
        let mut b = bytes.clone();
        for _ in 0..(1 + next() % 4) {
            let i = (next() as usize) % b.len();
            b[i] = next() as u8;
        }
        // Corruption either is detected, or hit only padding; never a panic.
        if let Ok(ok) = open(&b, None) {
            assert_eq!(ok.model_bytes(None).unwrap().1, tiny_classifier().to_bytes().as_slice());
        }
    }
}

#[test]
fn written_bundle_is_atomic_and_loads_as_a_session() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.edgepack");
    let sk = SecretKey::generate().unwrap();
    builder().write(&path, Some(&sk)).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "temp files left behind: {leftovers:?}");
    let opts = edgepack_runtime::SessionOptions { key: Some(sk.public()), threads: 1, ..Default::default() };
    let s = edgepack_runtime::Session::open(&path, &opts).unwrap();
    assert_eq!(s.bundle().unwrap().variant, "fp32");
    assert!(s.bundle().unwrap().trusted);
    let wrong = edgepack_runtime::SessionOptions { key: Some(SecretKey::generate().unwrap().public()), ..opts };
    assert!(matches!(
        edgepack_runtime::Session::open(&path, &wrong).err().unwrap(),
        Error::Bundle(BundleError::Signature(_))
    ));
}

#[test]
fn key_files_round_trip_and_are_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("release");
    let (k, p, pk) = generate_key_files(&stem).unwrap();
    assert_eq!(SecretKey::load(&k).unwrap().public(), pk);
    assert_eq!(PublicKey::load(&p).unwrap(), pk);
    assert!(generate_key_files(&stem).is_err());
    assert!(SecretKey::parse("edgepack-ed25519-secret zz").is_err());
    assert!(PublicKey::parse("ssh-ed25519 AAAA").is_err());
}

#[test]
fn manifest_schema_is_checked_in_and_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema/manifest.v1.schema.json");
    let current = serde_json::to_string_pretty(&Manifest::json_schema()).unwrap() + "\n";
    if std::env::var_os("EDGEPACK_UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &current).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(checked_in == current, "schema/manifest.v1.schema.json is stale: rerun with EDGEPACK_UPDATE_SCHEMA=1");
}

#[test]
fn compressed_members_round_trip_and_are_verified() {
    // A sparse weight matrix: most of it zeros, as unstructured pruning leaves it.
    let mut w = vec![0f32; 64 * 256];
    for (i, x) in w.iter_mut().enumerate().step_by(5) {
        *x = (i as f32 * 0.37).sin();
    }
    let sparse = edgepack_runtime::onnx::builder::model(
        vec![edgepack_runtime::onnx::node("MatMul", "mm", &["x", "W"], &["y"], vec![])],
        vec![edgepack_runtime::onnx::builder::value_info(
            "x",
            1,
            &[edgepack_runtime::onnx::Dim::Fixed(1), edgepack_runtime::onnx::Dim::Fixed(64)],
        )],
        vec![edgepack_runtime::onnx::builder::value_info(
            "y",
            1,
            &[edgepack_runtime::onnx::Dim::Fixed(1), edgepack_runtime::onnx::Dim::Fixed(256)],
        )],
        vec![edgepack_runtime::onnx::builder::tensor_f32("W", &[64, 256], &w)],
    )
    .to_bytes();
    let make = |c: Compression| {
        BundleBuilder::new("sparse", "1", Task::Custom)
            .compression(c)
            .variant("fp32", sparse.clone(), Precision::Fp32, &[BackendKind::Cpu])
            .unwrap()
            .report("notes.json", "application/json", b"{}".to_vec())
            .unwrap()
    };
    let (plain_m, plain) = make(Compression::None).build(None).unwrap();
    let sk = SecretKey::generate().unwrap();
    let (m, packed) = make(Compression::Zstd).build(Some(&sk)).unwrap();
    assert_eq!(plain_m.format_version, 1, "uncompressed bundles stay readable by format-1 readers");
    assert_eq!(m.format_version, 2);
    assert!(packed.len() * 2 < plain.len(), "{} vs {}", packed.len(), plain.len());
    let model = m.members.iter().find(|x| x.path == "models/fp32.onnx").unwrap();
    assert!(model.encoding.is_some());
    // A 2-byte report does not shrink: it stays as is.
    assert!(m.members.iter().find(|x| x.path == "reports/notes.json").unwrap().encoding.is_none());
    let b = open(&packed, Some(sk.public())).unwrap();
    assert_eq!(b.model_bytes(None).unwrap().1.as_ref(), sparse.as_slice());
    assert_eq!(b.manifest().variants[0].sha256, edgepack_runtime::bundle::sha256_hex(&sparse));
    // The stored (compressed) bytes are hashed at open.
    let mut t = packed.clone();
    t[(model.offset + model.size / 2) as usize] ^= 0x10;
    assert!(matches!(open(&t, Some(sk.public())).unwrap_err(), BundleError::Tampered { .. }));
    // Runs as a session.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.edgepack");
    std::fs::write(&path, &packed).unwrap();
    let s =
        edgepack_runtime::Session::open(&path, &edgepack_runtime::SessionOptions { threads: 1, ..Default::default() })
            .unwrap();
    let y = s.run(vec![("x".into(), edgepack_runtime::Tensor::from_f32(vec![1, 64], vec![1.0; 64]).unwrap())]).unwrap();
    assert_eq!(y[0].1.shape(), &[1, 256]);
}

#[test]
fn a_description_that_does_not_fit_the_model_is_refused() {
    let tiny = || {
        BundleBuilder::new("tiny", "1", Task::Classification)
            .variant("fp32", tiny_classifier().to_bytes(), Precision::Fp32, &[BackendKind::Cpu])
            .unwrap()
    };
    let mismatch = |b: BundleBuilder| match b.build(None) {
        Err(PackError::Mismatch(m)) => m,
        other => panic!("expected a mismatch, got {:?}", other.map(|(m, _)| m.name)),
    };
    // An image pre-processing on a [N, 4] input.
    let m = mismatch(tiny().preprocess(Preprocess::Image(ImagePreprocess::preset("tf", 2, 2).unwrap())));
    assert!(m.contains("not an image batch"), "{m}");
    // Labels for another model.
    let m =
        mismatch(tiny().labels(&["a".into(), "b".into(), "c".into(), "d".into()]).unwrap().postprocess(
            Postprocess::Classification { output: None, softmax: Softmax::Auto, top_k: 2, label_offset: 0 },
        ));
    assert!(m.contains("4 labels") && m.contains("3 classes"), "{m}");
    // A post-processing reading an output the model lacks.
    let m = mismatch(tiny().postprocess(Postprocess::Classification {
        output: Some("nope".into()),
        softmax: Softmax::Auto,
        top_k: 2,
        label_offset: 0,
    }));
    assert!(m.contains("`nope`") && m.contains("y"), "{m}");
    // What fits is written.
    let ok = tiny().labels(&["a".into(), "b".into(), "c".into()]).unwrap().postprocess(Postprocess::Classification {
        output: None,
        softmax: Softmax::Auto,
        top_k: 2,
        label_offset: 0,
    });
    assert!(ok.build(None).is_ok());
}

/// Bundle members are written by libzstd and read by the runtime's ruzstd. On weight-like bytes (int8 codes of a
/// narrow bell-shaped distribution, ~3.6 bits of entropy each) libzstd's Huffman literals must come well under
/// ruzstd's encoder, and the frame must decode to the same bytes under the declared-size limit.
#[test]
fn libzstd_frames_decode_with_ruzstd_and_code_weights_tighter() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    // Laplacian codes (scale 2.5 steps), clamped to int8.
    let codes: Vec<u8> = (0..400_000)
        .map(|_| {
            let (u, s) = (next(), if next() < 0.5 { -1.0 } else { 1.0 });
            (s * -2.5 * (1.0 - u).ln()).round().clamp(-127.0, 127.0) as i8 as u8
        })
        .collect();
    let ours = zstd_compress(&codes);
    let ruzstd = edgepack_runtime::compress::zstd_compress(&codes);
    assert_eq!(edgepack_runtime::compress::zstd_decompress(&ours, codes.len() as u64).unwrap(), codes);
    assert!(edgepack_runtime::compress::zstd_decompress(&ours, codes.len() as u64 - 1).is_err());
    let bits = |z: &[u8]| 8.0 * z.len() as f64 / codes.len() as f64;
    let mut hist = [0usize; 256];
    codes.iter().for_each(|&c| hist[c as usize] += 1);
    let n = codes.len() as f64;
    let entropy: f64 = hist.iter().filter(|&&c| c > 0).map(|&c| -(c as f64 / n) * (c as f64 / n).log2()).sum();
    eprintln!("bits per code: entropy {entropy:.2}, libzstd {:.2}, ruzstd {:.2}", bits(&ours), bits(&ruzstd));
    assert!(bits(&ours) < entropy + 0.5 && bits(&ours) < 0.9 * bits(&ruzstd), "{} vs {}", bits(&ours), bits(&ruzstd));
}

/// A model's frame ends its blocks on the bounds of its large initializers: the walk finds exactly their raw
/// bytes, the frame decodes to the model with the runtime's ruzstd, and two weights of different statistics (a
/// 3-bit-entropy classifier after a 5-bit convolution, 96 KiB each, so a plain frame's 128 KiB blocks straddle
/// them) come out smaller than one plain frame. Bytes that are not a model get the plain frame.
#[test]
fn model_frames_end_blocks_on_initializer_bounds_and_code_tighter() {
    use edgepack_runtime::onnx::builder::{model, tensor_raw, value_info};
    use edgepack_runtime::onnx::{Dim, node};
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut laplace = |scale: f64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let u = (state >> 11) as f64 / (1u64 << 53) as f64;
        let s = if state & 1 == 0 { -1.0 } else { 1.0 };
        (s * -scale * (1.0 - u).ln()).round().clamp(-127.0, 127.0) as i8 as u8
    };
    let n = 96 * 1024;
    let wide: Vec<u8> = (0..n).map(|_| laplace(6.0)).collect();
    let narrow: Vec<u8> = (0..n).map(|_| laplace(1.0)).collect();
    let bias: Vec<u8> = (0..64).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let m = model(
        vec![node("MatMul", "a", &["x", "A"], &["h"], vec![]), node("MatMul", "b", &["h", "B"], &["y"], vec![])],
        vec![value_info("x", 1, &[Dim::Fixed(1), Dim::Fixed(384)])],
        vec![value_info("y", 1, &[Dim::Fixed(1), Dim::Fixed(256)])],
        vec![
            tensor_raw("A", &[384, 256], 3, wide.clone()),
            tensor_raw("bias", &[64], 1, bias),
            tensor_raw("B", &[256, 384], 3, narrow.clone()),
        ],
    )
    .to_bytes();
    let spans = onnx_raw_spans(&m, 4096);
    assert_eq!(spans.len(), 2, "{spans:?}");
    assert_eq!(&m[spans[0].0..spans[0].1], wide.as_slice());
    assert_eq!(&m[spans[1].0..spans[1].1], narrow.as_slice());
    let plain = zstd::bulk::compress(&m, ZSTD_LEVEL).unwrap();
    let ours = zstd_compress(&m);
    assert_eq!(edgepack_runtime::compress::zstd_decompress(&ours, m.len() as u64).unwrap(), m);
    eprintln!("model frame: plain {} bytes, blocks on tensor bounds {} bytes", plain.len(), ours.len());
    assert!(ours.len() < plain.len() * 99 / 100, "{} vs {}", ours.len(), plain.len());
    // Not a model (and a truncated one): no spans, the plain frame.
    assert!(onnx_raw_spans(&wide, 16).is_empty());
    assert!(onnx_raw_spans(&m[..m.len() - 7], 16).is_empty());
    assert_eq!(zstd_compress(&narrow), zstd::bulk::compress(&narrow, ZSTD_LEVEL).unwrap());
}
