//! What a component imports and exports, read from its type before anything runs.
//!
//! This is the capability gate: every import must be a `ferry:plugin` interface of a version
//! this host accepts and granted in the manifest. The same summary feeds `ferry plugin inspect`.

use serde::Serialize;
use wasmtime::Engine;
use wasmtime::component::Component;
use wasmtime::component::types::ComponentItem;

use crate::error::PluginError;
use crate::manifest::{Capability, Grants, World};

/// The WIT package version this host implements.
pub const HOST_WIT_VERSION: &str = "0.1.0";
/// The versions it accepts (same major, minor up to the host's).
pub const ACCEPTED_WIT_VERSIONS: &str = ">= 0.0.0, <= 0.1.x";
const HOST_MAJOR: u64 = 0;
const HOST_MINOR: u64 = 1;

/// A parsed component import or export name: `ns:pkg/iface@version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ItemName {
    pub full: String,
    pub package: Option<String>,
    pub interface: String,
    pub version: Option<String>,
}

impl ItemName {
    pub fn parse(full: &str) -> ItemName {
        let (path, version) = match full.split_once('@') {
            Some((p, v)) => (p, Some(v.to_string())),
            None => (full, None),
        };
        let (package, interface) = match path.split_once('/') {
            Some((pkg, i)) => (Some(pkg.to_string()), i.to_string()),
            None => (None, path.to_string()),
        };
        ItemName {
            full: full.to_string(),
            package,
            interface,
            version,
        }
    }

    fn is_ferry(&self) -> bool {
        self.package.as_deref() == Some("ferry:plugin")
    }
}

/// One import of a component and what it takes to satisfy it.
#[derive(Debug, Clone, Serialize)]
pub struct ImportInfo {
    pub name: String,
    /// Functions it imports (empty for a types-only interface).
    pub functions: Vec<String>,
    /// The capability it needs, when it is a grantable `ferry:plugin` interface.
    pub capability: Option<&'static str>,
}

/// What a component is, from its type alone.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The world it targets, recognised from its exports.
    pub world: Option<World>,
    /// The `ferry:plugin` version of its exported interface.
    pub wit_version: Option<String>,
    pub imports: Vec<ImportInfo>,
    pub exports: Vec<String>,
    /// Grants it needs (capability names), sorted.
    pub needs: Vec<&'static str>,
}

/// Does this host accept a plugin built against `ferry:plugin@v`?
pub fn version_ok(v: &str) -> bool {
    let mut parts = v.split(['.', '-', '+']);
    let major = parts.next().and_then(|p| p.parse::<u64>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u64>().ok());
    matches!((major, minor), (Some(HOST_MAJOR), Some(m)) if m <= HOST_MINOR)
}

/// Summarise a compiled component.
pub fn summarize(engine: &Engine, component: &Component) -> Summary {
    let ty = component.component_type();
    let mut imports = Vec::new();
    let mut needs = Vec::new();
    for (name, item) in ty.imports(engine) {
        let parsed = ItemName::parse(name);
        let mut functions = Vec::new();
        match &item.ty {
            ComponentItem::ComponentInstance(inst) => {
                for (fname, fitem) in inst.exports(engine) {
                    if matches!(fitem.ty, ComponentItem::ComponentFunc(_)) {
                        functions.push(fname.to_string());
                    }
                }
            }
            ComponentItem::ComponentFunc(_) => functions.push(name.to_string()),
            _ => {}
        }
        let capability = if parsed.is_ferry() {
            Capability::from_interface(&parsed.interface).map(Capability::interface)
        } else {
            None
        };
        if let Some(c) = capability
            && !functions.is_empty()
            && !needs.contains(&c)
        {
            needs.push(c);
        }
        imports.push(ImportInfo {
            name: name.to_string(),
            functions,
            capability,
        });
    }
    needs.sort();
    let mut exports = Vec::new();
    let mut world = None;
    let mut wit_version = None;
    for (name, _) in ty.exports(engine) {
        let parsed = ItemName::parse(name);
        if parsed.is_ferry() {
            let w = match parsed.interface.as_str() {
                "adapter" => Some(World::SourceAdapter),
                "hook" => Some(World::FailoverHook),
                _ => None,
            };
            if w.is_some() {
                world = w;
                wit_version = parsed.version.clone();
            }
        }
        exports.push(name.to_string());
    }
    Summary {
        world,
        wit_version,
        imports,
        exports,
        needs,
    }
}

/// Refuse a component that is not of `world`, was built against a version this host does not
/// accept, or imports anything `grants` does not cover. Nothing has run yet.
pub fn check(
    plugin: &str,
    summary: &Summary,
    world: World,
    grants: &Grants,
) -> Result<(), PluginError> {
    let exports = if summary.exports.is_empty() {
        "nothing".to_string()
    } else {
        summary.exports.join(", ")
    };
    match summary.world {
        Some(w) if w == world => {}
        other => {
            return Err(PluginError::WrongWorld {
                plugin: plugin.into(),
                expected: world.as_str(),
                found: other.map_or_else(|| "no ferry world".to_string(), |w| w.to_string()),
                exports,
            });
        }
    }
    let version_err = |item: &str, found: &str| PluginError::Version {
        plugin: plugin.into(),
        item: item.into(),
        found: found.into(),
        supported: HOST_WIT_VERSION,
        supported_range: ACCEPTED_WIT_VERSIONS,
    };
    for name in &summary.exports {
        let p = ItemName::parse(name);
        if p.is_ferry() {
            let v = p.version.as_deref().unwrap_or("none");
            if !version_ok(v) {
                return Err(version_err(name, v));
            }
        }
    }
    for import in &summary.imports {
        let p = ItemName::parse(&import.name);
        if !p.is_ferry() {
            let hint = if import.name.starts_with("wasi:") {
                " (WASI is never granted to plugins: build for wasm32-unknown-unknown, or no_std for wasm32-wasip2)".to_string()
            } else {
                " (it is not a ferry:plugin interface)".to_string()
            };
            return Err(PluginError::NotGranted {
                plugin: plugin.into(),
                import: import.name.clone(),
                hint,
            });
        }
        let v = p.version.as_deref().unwrap_or("none");
        if !version_ok(v) {
            return Err(version_err(&import.name, v));
        }
        if import.functions.is_empty() {
            continue; // types only: nothing to grant
        }
        let Some(cap) = Capability::from_interface(&p.interface) else {
            return Err(PluginError::NotGranted {
                plugin: plugin.into(),
                import: import.name.clone(),
                hint: " (this host does not know that interface)".into(),
            });
        };
        if !world.importable().contains(&cap) {
            return Err(PluginError::NotGranted {
                plugin: plugin.into(),
                import: import.name.clone(),
                hint: format!(" (the {world} world cannot import it)"),
            });
        }
        if !grants.has(cap) {
            return Err(PluginError::NotGranted {
                plugin: plugin.into(),
                import: import.name.clone(),
                hint: format!(" (add `{}` to the plugin's grants)", cap.interface()),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_versions() {
        let n = ItemName::parse("ferry:plugin/log@0.1.0");
        assert_eq!(n.package.as_deref(), Some("ferry:plugin"));
        assert_eq!(n.interface, "log");
        assert!(version_ok("0.1.0") && version_ok("0.0.3") && version_ok("0.1.7"));
        assert!(!version_ok("0.2.0") && !version_ok("1.0.0") && !version_ok("x"));
    }
}
