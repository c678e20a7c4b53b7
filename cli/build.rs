//! Records the commit the binary was built from for `edgepack --version` (EDGEPACK_COMMIT overrides; "unknown"
//! outside a git checkout).
use std::process::Command;

fn main() {
    let commit = std::env::var("EDGEPACK_COMMIT").ok().filter(|c| !c.is_empty()).or_else(|| {
        let out = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().ok()?;
        let hash = String::from_utf8(out.stdout).ok()?.trim().to_string();
        if !out.status.success() || hash.is_empty() {
            return None;
        }
        Some(hash)
    });
    println!("cargo:rustc-env=EDGEPACK_COMMIT={}", commit.unwrap_or_else(|| "unknown".into()));
    println!("cargo:rerun-if-env-changed=EDGEPACK_COMMIT");
    for f in ["../.git/HEAD", "../.git/refs/heads", "../.git/packed-refs"] {
        if std::path::Path::new(f).exists() {
            println!("cargo:rerun-if-changed={f}");
        }
    }
}
