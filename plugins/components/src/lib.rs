//! The built-in plugins' components as bytes, built for `wasm32-unknown-unknown` by this
//! crate's build script from `plugins/*`.
//!
//! A crate of its own, with no dependencies, so that cargo runs its build script (the nested
//! wasm build, minutes on a small machine) at the very start of a workspace build, in
//! parallel with the host's dependencies; `ferry-builtin-plugins` adds the manifests and
//! depends on the plugin host.

/// `plugins/physical`: raw devices and images.
pub const PHYSICAL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry_plugin_physical.wasm"));
/// `plugins/vmware`: VMDK and CBT.
pub const VMWARE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry_plugin_vmware.wasm"));
/// `plugins/hyperv`: VHDX, VHD and RCT.
pub const HYPERV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry_plugin_hyperv.wasm"));
/// `plugins/aws`: EBS snapshots.
pub const AWS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry_plugin_aws.wasm"));
/// `plugins/webhook`: the failover hook.
pub const WEBHOOK: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry_plugin_webhook.wasm"));
