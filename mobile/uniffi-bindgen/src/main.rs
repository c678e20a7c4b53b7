//! `uniffi-bindgen`, pinned to the mobile crate's uniffi version. Library mode:
//! `uniffi-bindgen generate --library target/release/libedgepack_mobile.so --language kotlin --out-dir out/`.
fn main() {
    uniffi::uniffi_bindgen_main()
}
