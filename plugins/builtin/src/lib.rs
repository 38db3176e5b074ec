//! The plugins built into every gateway binary: their components (built for wasm32 by this
//! crate's build script from `plugins/*`) and their manifests.
//!
//! Built-in plugins are trusted to the same degree as third-party ones: they get the same
//! sandbox and limits, and only the grants their world needs (no related files, no HTTP hosts
//! until the operator allow-lists some).

use ferry_plugin_host::{Grants, Manifest, World};

/// One built-in plugin.
#[derive(Debug, Clone, Copy)]
pub struct Builtin {
    pub name: &'static str,
    pub world: World,
    pub description: &'static str,
    pub wasm: &'static [u8],
}

pub const PHYSICAL: Builtin = Builtin {
    name: "physical",
    world: World::SourceAdapter,
    description: "raw block devices and raw disk images",
    wasm: include_bytes!(concat!(env!("OUT_DIR"), "/ferry_plugin_physical.wasm")),
};

pub const WEBHOOK: Builtin = Builtin {
    name: "webhook",
    world: World::FailoverHook,
    description: "POSTs a JSON event to an allow-listed URL at a recovery plan step",
    wasm: include_bytes!(concat!(env!("OUT_DIR"), "/ferry_plugin_webhook.wasm")),
};

pub const ALL: &[Builtin] = &[PHYSICAL, WEBHOOK];

/// A built-in plugin by name.
pub fn get(name: &str) -> Option<Builtin> {
    ALL.iter().copied().find(|b| b.name == name)
}

impl Builtin {
    /// The default manifest: every capability of its world, nothing allow-listed.
    pub fn manifest(&self) -> Manifest {
        let mut m = Manifest::new(self.name, self.world);
        m.version = env!("CARGO_PKG_VERSION").to_string();
        m.grants = Grants::all_for(self.world);
        m
    }
}
