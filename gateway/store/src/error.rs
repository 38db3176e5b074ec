//! Errors of the store.
//!
//! Error policy: every variant names the object, file or item it is about, so that the one line
//! an operator sees is enough to act on. Variants are grouped by what the caller can do:
//!
//! - `Backend*`: the object store failed or is unreachable. Retrying may help.
//! - `Corrupt*`, `Tampered`, `Missing*`: the vault's content is damaged. Retrying does not help;
//!   `ferry vault verify` tells which recovery points are affected.
//! - `WrongSecret`, `Secret*`: the key material given does not open the vault.
//! - `Input*`, `Invalid*`: the caller's input (a disk, a changes file, a name) is wrong. Nothing
//!   was changed in the vault.
//!
//! Secrets never appear in an error: only the source they came from (a file path, an
//! environment variable name).

use std::path::PathBuf;

/// Shorthand for results of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend reported an error on one object.
    #[error("object store error on `{object}`: {source}")]
    Backend {
        /// Object path inside the vault.
        object: String,
        /// What the backend said.
        #[source]
        source: object_store::Error,
    },
    /// The backend could not be opened from the vault URL.
    #[error("cannot open vault location `{url}`: {reason}")]
    BackendConfig {
        /// The URL as given (credentials are never part of it).
        url: String,
        /// Why it could not be opened.
        reason: String,
    },
    /// An object that must exist is absent.
    #[error("missing object `{0}` in the vault")]
    MissingObject(String),
    /// `init` on a location that already holds a vault.
    #[error("a vault already exists at `{0}`")]
    AlreadyInitialized(String),
    /// There is no vault (no `config` object) at the location.
    #[error("no vault at `{0}` (no `config` object); run `ferry vault init` first")]
    NotAVault(String),
    /// The vault's `config` object is unreadable.
    #[error("vault config is invalid: {0}")]
    InvalidConfig(String),
    /// The vault was written by a newer format version.
    #[error("`{object}` has format version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        /// Object path.
        object: String,
        /// Version found in the object.
        found: u32,
        /// Newest version this build understands.
        supported: u32,
    },
    /// The key material does not unwrap the vault keys.
    #[error("wrong {kind} for vault {vault_id}: the vault keys cannot be unwrapped")]
    WrongSecret {
        /// "passphrase" or "key file".
        kind: &'static str,
        /// The vault's id.
        vault_id: String,
    },
    /// The key material cannot be obtained or is not the kind this vault needs.
    #[error("secret: {0}")]
    Secret(String),
    /// An object failed authentication: it was modified after it was written.
    #[error("`{object}` failed authentication ({what}): it was modified or corrupted")]
    Tampered {
        /// Object path.
        object: String,
        /// Which part failed (e.g. "blob 3f2a… at offset 1234").
        what: String,
    },
    /// An object is structurally broken (truncated, bad magic, bad lengths).
    #[error("`{object}` is corrupt: {reason}")]
    Corrupt {
        /// Object path.
        object: String,
        /// What is wrong.
        reason: String,
    },
    /// A chunk or page referenced by a tree is in no indexed pack.
    #[error("chunk {id} is not in the index (referenced by {context})")]
    MissingChunk {
        /// Hex chunk id.
        id: String,
        /// What referenced it.
        context: String,
    },
    /// No recovery point matches the request.
    #[error("no recovery point {what}")]
    NoSuchPoint {
        /// What was asked for.
        what: String,
    },
    /// A name (item, disk) is not acceptable.
    #[error("invalid {what} `{value}`: {reason}")]
    InvalidName {
        /// "item name", "disk name", …
        what: &'static str,
        /// The offending value.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// A caller-supplied argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Reading an input file failed.
    #[error("cannot read `{path}`: {source}")]
    InputIo {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading a disk from a non-file source (a source adapter) failed.
    #[error("cannot read disk `{disk}`: {message}")]
    SourceRead {
        /// The disk, as its source names it.
        disk: String,
        /// What failed.
        message: String,
    },
    /// Writing an output file failed.
    #[error("cannot write `{path}`: {source}")]
    OutputIo {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A changes document is malformed or does not fit the disk.
    #[error("changes file `{path}`: {reason}")]
    InvalidChanges {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The local index cache failed.
    #[error("local index `{path}`: {reason}")]
    LocalIndex {
        /// The redb file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// An export's destination object already exists; nothing was written.
    #[error(
        "`{object}` already exists: an export never replaces an object (delete it or choose another name)"
    )]
    ObjectExists {
        /// The object, as a URL without credentials.
        object: String,
    },
    /// Uploading an export to an object-store location failed; no object was created under
    /// its name.
    #[error("cannot upload the export to `{object}`: {cause}")]
    Upload {
        /// The destination object, as a URL without credentials.
        object: String,
        /// What failed (the backend, or reading the staging file). Not a `#[source]`: the
        /// message already holds it, and `{:#}` would print it twice.
        cause: Box<StoreError>,
    },
    /// An internal pipeline stage stopped unexpectedly.
    #[error("pipeline: {0}")]
    Pipeline(String),
}

impl StoreError {
    pub(crate) fn backend(object: impl Into<String>, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => StoreError::MissingObject(object.into()),
            source => StoreError::Backend {
                object: object.into(),
                source,
            },
        }
    }

    pub(crate) fn corrupt(object: impl Into<String>, reason: impl Into<String>) -> Self {
        StoreError::Corrupt {
            object: object.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn local_index(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        StoreError::LocalIndex {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }
}
