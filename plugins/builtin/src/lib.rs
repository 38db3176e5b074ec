//! The plugins built into every gateway binary: their components (built for wasm32 from
//! `plugins/*` by `ferry-plugin-components`' build script) and their manifests.
//!
//! Built-in plugins are trusted to the same degree as third-party ones: they get the same
//! sandbox and limits, and only the grants their world needs (related files only by the
//! patterns of their formats, no HTTP hosts until the operator allow-lists some: the `aws`
//! adapter reaches only the EBS endpoint its caller grants, with requests the host signs).

use ferry_plugin_host::{Grants, Manifest, PluginError, PluginHost, World};

/// One built-in plugin.
#[derive(Debug, Clone, Copy)]
pub struct Builtin {
    pub name: &'static str,
    pub world: World,
    pub description: &'static str,
    pub wasm: &'static [u8],
    /// File-name patterns of related files it may open by default (multi-file formats).
    pub related: &'static [&'static str],
    /// It imports `http`: granted with an empty allow-list (nothing reachable) until a caller
    /// allow-lists its endpoint.
    pub http: bool,
}

pub const PHYSICAL: Builtin = Builtin {
    name: "physical",
    world: World::SourceAdapter,
    description: "raw block devices and raw disk images",
    wasm: ferry_plugin_components::PHYSICAL,
    related: &[],
    http: false,
};

pub const VMWARE: Builtin = Builtin {
    name: "vmware",
    world: World::SourceAdapter,
    description: "VMware VMDK: monolithicSparse, streamOptimized, flat, twoGbMaxExtent*, ESXi; CBT",
    wasm: ferry_plugin_components::VMWARE,
    related: &["*.vmdk"],
    http: false,
};

pub const HYPERV: Builtin = Builtin {
    name: "hyperv",
    world: World::SourceAdapter,
    description: "Hyper-V VHDX and VHD: fixed, dynamic, differencing; RCT",
    wasm: ferry_plugin_components::HYPERV,
    related: &["*.vhdx", "*.avhdx", "*.vhd"],
    http: false,
};

pub const AWS: Builtin = Builtin {
    name: "aws",
    world: World::SourceAdapter,
    description: "AWS EBS snapshots through the EBS direct APIs (host-signed); ListChangedBlocks",
    wasm: ferry_plugin_components::AWS,
    related: &[],
    http: true,
};

pub const WEBHOOK: Builtin = Builtin {
    name: "webhook",
    world: World::FailoverHook,
    description: "POSTs a JSON event to an allow-listed URL at a recovery plan step",
    wasm: ferry_plugin_components::WEBHOOK,
    related: &[],
    http: true,
};

/// Every built-in plugin; source adapters in the order `auto` probes them (physical, which
/// accepts anything, last).
pub const ALL: &[Builtin] = &[VMWARE, HYPERV, AWS, PHYSICAL, WEBHOOK];

/// A built-in plugin by name.
pub fn get(name: &str) -> Option<Builtin> {
    ALL.iter().copied().find(|b| b.name == name)
}

/// The disk formats callers accept (`ferry vault import --format`, the agent's `format`), and
/// the built-in source adapter each one means (`auto`: [`probe`] decides).
pub const FORMATS: &[(&str, Option<&str>)] = &[
    ("auto", None),
    ("raw", Some("physical")),
    ("vmdk", Some("vmware")),
    ("vhdx", Some("hyperv")),
    ("vhd", Some("hyperv")),
];

/// The built-in adapter a format names: `Ok(None)` for `auto`, an error listing the formats
/// for an unknown one.
pub fn for_format(format: &str) -> Result<Option<Builtin>, String> {
    match FORMATS.iter().find(|(f, _)| *f == format) {
        // Every adapter `FORMATS` names is built in (a test checks it).
        Some((_, name)) => Ok(name.map(|n| get(n).expect("FORMATS names built-in adapters"))),
        None => {
            let names: Vec<_> = FORMATS.iter().map(|(f, _)| *f).collect();
            Err(format!(
                "format `{format}` is not one of {}",
                names.join(", ")
            ))
        }
    }
}

/// The first bytes of the file at `path` that [`probe`] looks at (at most
/// [`ferry_plugin_host::PROBE_BYTES`]).
///
/// # Errors
/// The file cannot be opened or read.
pub fn probe_header(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut header = Vec::new();
    std::fs::File::open(path)?
        .take(ferry_plugin_host::PROBE_BYTES as u64)
        .read_to_end(&mut header)?;
    Ok(header)
}

/// `auto`: the first built-in source adapter whose `probe` accepts `header` (a disk's first
/// bytes, at most [`ferry_plugin_host::PROBE_BYTES`] used); physical, which accepts
/// anything, is tried last. `None` when none accepts it.
///
/// # Errors
/// Loading or probing a built-in failed.
pub async fn probe(host: &PluginHost, header: &[u8]) -> Result<Option<Builtin>, PluginError> {
    for b in ALL {
        if b.world == World::SourceAdapter {
            let p = host.load(b.manifest(), b.wasm)?;
            if host.probe(&p, header).await? {
                return Ok(Some(*b));
            }
        }
    }
    Ok(None)
}

impl Builtin {
    /// The default manifest: every capability of its world, no HTTP hosts, and the related
    /// files its formats need (VMDK extents, VHDX/VHD parents) next to the opened disk.
    pub fn manifest(&self) -> Manifest {
        let mut m = Manifest::new(self.name, self.world);
        m.version = env!("CARGO_PKG_VERSION").to_string();
        m.grants = Grants::all_for(self.world);
        if let Some(source) = &mut m.grants.source {
            source.related = self.related.iter().map(|p| (*p).to_string()).collect();
        }
        if self.http && m.grants.http.is_none() {
            m.grants.http = Some(ferry_plugin_host::HttpGrant::default());
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_plugin_host::{HostConfig, PluginHost};

    /// Every format names a built-in source adapter (or none, for `auto`).
    #[test]
    fn every_format_names_a_builtin_adapter() {
        for (f, name) in FORMATS {
            let b = for_format(f).unwrap();
            assert_eq!(b.map(|b| b.name), *name, "{f}");
            assert!(b.is_none_or(|b| b.world == World::SourceAdapter), "{f}");
        }
        assert!(for_format("zip").unwrap_err().contains("vmdk"));
    }

    /// Every built-in plugin passes the capability gate with its default manifest (an adapter
    /// importing something its manifest does not grant would break `auto` probing).
    #[test]
    fn every_builtin_loads_with_its_default_manifest() {
        let host = PluginHost::new(HostConfig::default()).unwrap();
        for b in ALL {
            let p = host
                .load(b.manifest(), b.wasm)
                .unwrap_or_else(|e| panic!("built-in {}: {e}", b.name));
            assert_eq!(p.manifest().world, b.world, "{}", b.name);
            assert_eq!(
                p.manifest().grants.http.as_ref().map(|h| h.allow.len()),
                b.http.then_some(0),
                "{}: HTTP is granted only to adapters that need it, and reaches nothing by default",
                b.name
            );
        }
        assert_eq!(get("aws").map(|b| b.name), Some("aws"));
        assert!(get("nope").is_none());
    }
}
