//! The code `wit-bindgen` generates from `sdk/wit/ferry-plugin.wit`, one module per world.
//!
//! Each world is behind its own Cargo feature so that a plugin links the type information of
//! exactly the world it implements. Plugin authors never use these modules: the rest of the SDK
//! wraps them in plain Rust types, and the `export_*!` macros reach the generated export macros
//! through `ferry_plugin_sdk::__private`.
//!
//! The generated code is full of `unsafe` (it implements the canonical ABI: raw pointers into
//! linear memory, `extern "C"` imports and exports). That is the one place the workspace's
//! `unsafe_code = "deny"` is lifted, and only for these generated modules.

/// Bindings of the `source-adapter` world.
#[cfg(feature = "adapter")]
#[allow(
    unsafe_code,
    reason = "wit-bindgen's generated canonical-ABI glue; no hand-written unsafe lives here"
)]
#[allow(missing_docs, missing_debug_implementations, reason = "generated code")]
#[allow(
    clippy::all,
    clippy::cast_possible_truncation,
    reason = "generated code"
)]
pub mod adapter {
    wit_bindgen::generate!({
        path: "../wit",
        world: "source-adapter",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "$crate::bindings::adapter",
    });
}

/// Bindings of the `failover-hook` world.
#[cfg(feature = "hook")]
#[allow(
    unsafe_code,
    reason = "wit-bindgen's generated canonical-ABI glue; no hand-written unsafe lives here"
)]
#[allow(missing_docs, missing_debug_implementations, reason = "generated code")]
#[allow(
    clippy::all,
    clippy::cast_possible_truncation,
    reason = "generated code"
)]
pub mod hook {
    wit_bindgen::generate!({
        path: "../wit",
        world: "failover-hook",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "$crate::bindings::hook",
    });
}
