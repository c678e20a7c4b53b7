//! edgepack's mobile SDK: the runtime behind [uniffi](https://mozilla.github.io/uniffi-rs/) bindings for Swift,
//! Kotlin and Python. An [`Engine`] opens a bundle on the device's backend and, when configured, falls back to
//! `edgepack serve` (KServe v2) under a [`FallbackPolicy`]; every result says where it ran and why.
mod asyncs;
mod cloud;
mod engine;
mod stream;
mod types;

pub use cloud::{
    BreakerState, CloudConfig, FallbackPolicy, HttpHeader, HttpRequest, HttpResponse, HttpTransport, default_transport,
};
pub use engine::{Engine, EngineOptions};
pub use stream::{Stream, StreamStep};
pub use types::*;

uniffi::setup_scaffolding!();

/// The SDK's version (the workspace version).
#[uniffi::export]
pub fn sdk_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}
