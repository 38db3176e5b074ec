//! Typed errors of the plugin host.
//!
//! Three families are kept apart, because a caller reacts to each differently:
//! - refusals before anything runs (bad manifest, digest mismatch, wrong world or version, an
//!   import that was not granted) — the plugin is never instantiated;
//! - limits and traps while a call runs (deadline, memory, fuel, stack, a guest crash) — the
//!   instance is poisoned and never entered again;
//! - errors the guest returns on purpose through its WIT `result` — the instance stays usable.
//!
//! Every variant names the plugin, and none carries a secret.

use std::path::PathBuf;

/// An error the guest returned on purpose (a WIT `error` value of the adapter interface).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestError {
    #[error("invalid container: {0}")]
    Invalid(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("out of range: {0}")]
    OutOfRange(String),
    #[error("host read failed: {0}")]
    Io(String),
}

/// Every failure of the plugin host.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin manifest {origin}: {message}")]
    Manifest { origin: String, message: String },

    #[error("plugin {plugin}: component sha256 is {actual}, the manifest says {expected}")]
    Digest {
        plugin: String,
        expected: String,
        actual: String,
    },

    #[error("plugin {plugin}: not a valid WebAssembly component: {message}")]
    Compile { plugin: String, message: String },

    #[error(
        "plugin {plugin}: built for world {found}, but it is loaded as a {expected} (the component exports {exports})"
    )]
    WrongWorld {
        plugin: String,
        expected: &'static str,
        found: String,
        exports: String,
    },

    #[error(
        "plugin {plugin}: {item} is version {found}; this host implements ferry:plugin {supported} and accepts {supported_range}"
    )]
    Version {
        plugin: String,
        item: String,
        found: String,
        supported: &'static str,
        supported_range: &'static str,
    },

    #[error(
        "plugin {plugin}: imports {import}, which is not granted{hint}; refusing to instantiate"
    )]
    NotGranted {
        plugin: String,
        import: String,
        hint: String,
    },

    #[error("plugin {plugin}: cannot be linked: {message}")]
    Link { plugin: String, message: String },

    #[error("plugin {plugin}: {call} exceeded its deadline of {limit_ms} ms and was stopped")]
    Deadline {
        plugin: String,
        call: &'static str,
        limit_ms: u64,
    },

    #[error(
        "plugin {plugin}: {call} exceeded its memory limit of {limit_mib} MiB (it asked for {requested} bytes) and was stopped"
    )]
    Memory {
        plugin: String,
        call: &'static str,
        limit_mib: u64,
        requested: u64,
    },

    #[error("plugin {plugin}: {call} used up its fuel budget of {budget} and was stopped")]
    Fuel {
        plugin: String,
        call: &'static str,
        budget: u64,
    },

    #[error(
        "plugin {plugin}: {call} overflowed the wasm stack limit of {limit_kib} KiB and was stopped"
    )]
    Stack {
        plugin: String,
        call: &'static str,
        limit_kib: u64,
    },

    #[error("plugin {plugin}: {call} trapped: {message}")]
    Trap {
        plugin: String,
        call: &'static str,
        message: String,
    },

    #[error(
        "plugin {plugin}: this instance stopped after an earlier failure and is not called again (open a new one)"
    )]
    Poisoned { plugin: String },

    #[error("plugin {plugin}: {call} returned an error: {error}")]
    Guest {
        plugin: String,
        call: &'static str,
        error: GuestError,
    },

    #[error("plugin {plugin}: {call} returned a bad result: {message}")]
    BadOutput {
        plugin: String,
        call: &'static str,
        message: String,
    },

    #[error("plugin host: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("plugin host: {0}")]
    Host(String),
}

impl PluginError {
    /// The plugin the error is about, when there is one.
    pub fn plugin(&self) -> Option<&str> {
        match self {
            PluginError::Digest { plugin, .. }
            | PluginError::Compile { plugin, .. }
            | PluginError::WrongWorld { plugin, .. }
            | PluginError::Version { plugin, .. }
            | PluginError::NotGranted { plugin, .. }
            | PluginError::Link { plugin, .. }
            | PluginError::Deadline { plugin, .. }
            | PluginError::Memory { plugin, .. }
            | PluginError::Fuel { plugin, .. }
            | PluginError::Stack { plugin, .. }
            | PluginError::Trap { plugin, .. }
            | PluginError::Poisoned { plugin }
            | PluginError::Guest { plugin, .. }
            | PluginError::BadOutput { plugin, .. } => Some(plugin),
            PluginError::Manifest { .. } | PluginError::Io { .. } | PluginError::Host(_) => None,
        }
    }

    /// True when the instance that produced this error must not be called again.
    pub fn poisons(&self) -> bool {
        matches!(
            self,
            PluginError::Deadline { .. }
                | PluginError::Memory { .. }
                | PluginError::Fuel { .. }
                | PluginError::Stack { .. }
                | PluginError::Trap { .. }
                | PluginError::Poisoned { .. }
                | PluginError::BadOutput { .. }
                | PluginError::Host(_)
        )
    }
}
