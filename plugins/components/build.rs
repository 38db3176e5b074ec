//! Builds the built-in plugins for `wasm32-unknown-unknown` (profile `plugin`) with a nested
//! cargo into `target/plugins-wasm`, and copies the components into OUT_DIR for
//! `include_bytes!`. So the ordinary workspace build yields gateway binaries that carry their
//! plugins, and the default install needs no plugin directory.

use std::path::{Path, PathBuf};
use std::process::Command;

const PLUGINS: &[(&str, &str)] = &[
    ("ferry-plugin-physical", "ferry_plugin_physical"),
    ("ferry-plugin-vmware", "ferry_plugin_vmware"),
    ("ferry-plugin-hyperv", "ferry_plugin_hyperv"),
    ("ferry-plugin-aws", "ferry_plugin_aws"),
    ("ferry-plugin-webhook", "ferry_plugin_webhook"),
];

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest_dir.join("../..");
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => PathBuf::from(t),
        None => root.join("target"),
    }
    .join("plugins-wasm");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));

    for watched in [
        "sdk/wit",
        "sdk/plugin",
        "plugins/physical",
        "plugins/vmware",
        "plugins/hyperv",
        "plugins/aws",
        "plugins/webhook",
        "Cargo.lock",
        ".cargo/config.toml",
    ] {
        println!("cargo::rerun-if-changed={}", root.join(watched).display());
    }

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--locked", "--profile", "plugin"])
        .args(["--target", "wasm32-unknown-unknown", "--target-dir"])
        .arg(&target_dir);
    for (package, _) in PLUGINS {
        cmd.args(["-p", package]);
    }
    // The outer build's flags and wrappers (clippy, a host --target) are not for the guests.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("running cargo for the built-in plugins");
    assert!(
        status.success(),
        "building the built-in plugins for wasm32-unknown-unknown failed ({status}); \
         the target comes with rust-toolchain.toml (or: rustup target add wasm32-unknown-unknown)"
    );
    for (_, file) in PLUGINS {
        let built = target_dir
            .join("wasm32-unknown-unknown/plugin")
            .join(format!("{file}.wasm"));
        copy(&built, &out_dir.join(format!("{file}.wasm")));
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
}
