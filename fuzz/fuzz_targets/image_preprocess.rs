//! Image bytes (JPEG, PNG): decode, then every preset's pre-processing at a few model input sizes.
#![no_main]
use edgepack_runtime::process::{ImagePreprocess, PRESETS, decode_image};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(img) = decode_image(data) else { return };
    for (k, name) in PRESETS.iter().enumerate() {
        let (h, w) = [(224, 224), (28, 28), (240, 320), (1, 7)][k % 4];
        let p = ImagePreprocess::preset(name, h, w).unwrap();
        let _ = p.apply(&img);
    }
});
