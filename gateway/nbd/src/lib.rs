//! Instant recovery over NBD: serves a recovery point's disk as a Network Block Device export,
//! so a hypervisor (QEMU/KVM, or anything with `nbd-client`) boots the point before a byte of
//! it is copied. Restoring a large disk takes as long as copying it; serving it over NBD lets
//! the machine run at once while the data is fetched from the vault on demand (and, later,
//! migrated to its final place in the background).
//!
//! This crate exists apart from the store because the store knows nothing of networks or
//! protocols: it only offers random-access reads of a point's disk
//! ([`ferry_store::PointReader`]: authenticated blobs, bounded caches, read-ahead). This crate
//! adds the protocol and, for a writable export, a copy-on-write overlay so the guest can
//! write while the recovery point itself is never modified.
//!
//! - [`proto`]: the protocol constants, named as in the NBD specification
//!   (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>);
//! - [`export`]: what is served ([`Export`]: a [`BlockSource`], read-only or with an
//!   [`Overlay`] on a directory such as the appliance's cache disk);
//! - [`server`]: the TCP server ([`Server`]): fixed newstyle handshake with
//!   `NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_LIST` and `NBD_OPT_ABORT`;
//!   simple replies to `NBD_CMD_READ`, `WRITE`, `WRITE_ZEROES`, `TRIM`, `FLUSH` and `DISC`.
//! - [`fuzzing`]: the fuzzing entry point ([`fuzzing::fuzz_session`]): arbitrary bytes as a
//!   client's whole conversation with the real connection code, over an in-memory stream
//!   (the `nbd_session` target in `fuzz/`, and a mutation smoke test in every `cargo test`).
//!
//! Everything is bounded: connections (`max_connections`), the handshake's duration, the
//! data of one request (`max_request`, 32 MiB by default), the overlay's bitmap
//! ([`export::MAX_BITMAP_BYTES`]). Bad input never panics and never disturbs another
//! connection: a well-framed bad request gets an error reply, a broken framing closes that
//! connection with a log line naming the peer and what was wrong.

#![cfg_attr(test, allow(clippy::cast_possible_truncation))] // tests build small fixtures

pub mod export;
pub mod fuzzing;
pub mod proto;
pub mod server;
#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "tests build small fixtures"
)]
mod testkit;

pub use export::{BlockSource, Export, ExportError, OVERLAY_BLOCK, Overlay, SourceError};
pub use server::{Server, ServerError, ServerOptions};
