//! The Ferry vault: an encrypted, deduplicating store of disk images on object storage.
//!
//! A vault is one location in an object store (local directory, S3, Azure Blob) holding
//! everything needed to restore every recovery point, given the vault's passphrase or key
//! file: the bucket is self-describing and the local redb index is only a cache. This crate
//! knows nothing of HTTP, plugins or the catalog; it is driven by the `ferry` CLI and (later)
//! by the gateway's process and target roles.
//!
//! Map of the crate, bottom up:
//! - [`codec`], [`crypto`]: byte encoding and every cryptographic operation;
//! - [`backend`]: the object-store location, chosen by URL, with create-only uploads;
//! - [`config`], [`pack`], [`sealed`], [`index`], [`tree`], [`point`]: the persisted formats
//!   (documented byte by byte in `docs/vault-format.md`);
//! - [`vault`]: opening and initialising a vault, reading blobs, listing points;
//! - [`ingest`], [`restore`], [`verify`], [`digests`], [`reader`], [`inplace`]: the data paths;
//! - [`source`], [`changes`]: reading disks and change lists.

#![cfg_attr(test, allow(clippy::cast_possible_truncation))] // tests build small fixtures

pub mod backend;
pub mod changes;
pub mod codec;
pub mod config;
pub mod crypto;
pub mod digests;
pub mod error;
pub mod formats;
pub mod fuzzing;
pub mod index;
pub mod ingest;
pub mod inplace;
pub mod pack;
pub mod point;
pub mod reader;
pub mod restore;
pub mod sealed;
pub mod source;
pub mod tree;
pub mod upload;
pub mod vault;
pub mod verify;

pub use backend::{Backend, BackendOptions, FileUploadTuning, UploadTuning};
pub use crypto::Secret;
pub use digests::{DigestOptions, DigestReport};
pub use error::{Result, StoreError};
pub use formats::{ExportFormat, FormatOptions};
pub use ingest::{ImportOptions, ImportReport, PointMeta, Progress, StagedImport};
pub use inplace::{InPlaceOptions, InPlaceReport};
pub use point::{Consistency, DiskRecord, PointRecord};
pub use reader::{PointReader, ReaderOptions, ReaderStats};
pub use restore::{ExportOptions, ExportReport};
pub use upload::{LocationExportOptions, LocationExportReport};
pub use vault::{InitOptions, OpenOptions, PointSelector, Tuning, Vault};
pub use verify::{VerifyProblem, VerifyReport};

/// Version of the vault format written by this build.
pub const FORMAT_VERSION: u16 = 1;
/// Smallest chunk size.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk size.
pub const MAX_CHUNK_SIZE: u32 = 4 << 20;
/// Default chunk size (chosen from `bench/run.sh --chunk-sizes`; see README).
pub const DEFAULT_CHUNK_SIZE: u32 = 256 << 10;

/// A 256-bit chunk or page id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id that stands for an all-zero chunk (or subtree); never stored.
    pub const ZERO: ChunkId = ChunkId([0; 32]);

    /// Whether this is [`ChunkId::ZERO`].
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 32]
    }
}

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkId({})", &hex::encode(self.0)[..16])
    }
}

/// Checks a chunk size: a power of two from 64 KiB to 4 MiB.
pub fn check_chunk_size(size: u32) -> std::result::Result<(), String> {
    if !size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        return Err(format!(
            "chunk size {size} is not a power of two from 64 KiB to 4 MiB"
        ));
    }
    Ok(())
}

/// Checks an item or disk name: 1–128 of `A–Z a–z 0–9 . _ -`, not starting with `.` or `-`.
pub fn check_name(what: &'static str, value: &str) -> Result<()> {
    let bad = |reason| StoreError::InvalidName {
        what,
        value: value.chars().take(200).collect(),
        reason,
    };
    if value.is_empty() || value.len() > 128 {
        return Err(bad("must be 1 to 128 characters"));
    }
    if value.starts_with(['.', '-']) {
        return Err(bad("must not start with `.` or `-`"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(bad("only letters, digits, `.`, `_` and `-` are allowed"));
    }
    Ok(())
}

/// Whether every byte of `b` is zero (64-byte blocks folded with OR; vectorises well).
pub fn is_all_zero(b: &[u8]) -> bool {
    let mut blocks = b.chunks_exact(64);
    for blk in &mut blocks {
        let mut or = 0u128;
        for w in blk.chunks_exact(16) {
            or |= u128::from_le_bytes(w.try_into().expect("16 bytes"));
        }
        if or != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes() {
        assert!(check_chunk_size(64 << 10).is_ok());
        assert!(check_chunk_size(4 << 20).is_ok());
        assert!(check_chunk_size(32 << 10).is_err());
        assert!(check_chunk_size(8 << 20).is_err());
        assert!(check_chunk_size(100_000).is_err());
    }

    #[test]
    fn names() {
        assert!(check_name("item", "web-01.prod_a").is_ok());
        assert!(check_name("item", "").is_err());
        assert!(check_name("item", "../x").is_err());
        assert!(check_name("item", "a/b").is_err());
        assert!(check_name("item", "-x").is_err());
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 65536 + 7];
        assert!(is_all_zero(&v));
        for i in [0, 63, 64, 65535, 65542] {
            v[i] = 1;
            assert!(!is_all_zero(&v), "{i}");
            v[i] = 0;
        }
        assert!(is_all_zero(&[]));
    }
}
