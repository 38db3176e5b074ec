//! The Ferry plugin host: loads WebAssembly components, checks them against their manifest,
//! and runs their calls in a sandbox.
//!
//! Why a crate of its own: plugins are untrusted code on the data path (a source adapter reads
//! every byte of a disk) and in recovery plans (a hook decides whether a failover goes ahead).
//! Everything that keeps them harmless lives here and nowhere else: the capability gate on
//! imports, the limits on every call, the compiled-component cache, and the typed errors that
//! keep a guest's own errors apart from traps. It knows nothing of the vault, the catalog or
//! HTTP servers; callers hand it source objects and get bytes, extents and outcomes back.
//!
//! ```text
//! PluginHost::new(HostConfig)            engine + epoch ticker + cache
//!   .load(Manifest, &wasm) -> LoadedPlugin   sha256, world, version, grants, link
//!     .with_http_signer(SigV4)            the host signs the plugin's HTTP requests
//!   .adapter_info / .probe / .open_disk -> OpenDisk { extents, each_data_extent, data_ranges, read, changes }
//! BlockingDisk::serve(OpenDisk)          the disk read from blocking threads
//!   .run_hook(&plugin, &HookContext, &PlanKv) -> HookOutcome
//!   .load_dir(dir)                        third-party plugins: *.toml manifests
//! harness::run_adapter(&host, &plugin, disk, out)   what an adapter exposes, for tests
//! ```

mod adapter;
mod bindings;
mod blocking;
mod error;
pub mod harness;
mod hook;
mod host;
mod inspect;
mod manifest;
pub mod sigv4;
mod source;
mod state;

pub use adapter::{
    DiskInfo, Extent, ExtentKind, Location, MAX_DISK_READ, MAX_EXTENTS, Mapping, OpenDisk,
    PROBE_BYTES, PluginInfo,
};
pub use blocking::BlockingDisk;
pub use error::{GuestError, PluginError};
pub use hook::{HookContext, HookItem, HookOutcome, Operation, Phase};
pub use host::{DirEntryLoad, HostConfig, LoadedPlugin, PluginHost};
pub use inspect::{
    ACCEPTED_WIT_VERSIONS, HOST_WIT_VERSION, ImportInfo, Summary,
    version_ok as wit_version_accepted,
};
pub use manifest::{Capability, Grants, HttpGrant, Limits, Manifest, SourceGrant, World};
pub use sigv4::SigV4;
pub use source::{Allocation, BytesSource, FileSource, SourceObject};
pub use state::{Level, LogSink, PlanKv, StderrLog, level_name};
