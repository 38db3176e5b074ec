//! `ferry-agent`, the agent on a protected machine (the Mobility service): how the agent gets
//! an identity the gateway trusts, keeps it, and proves it; then how it reads its disks at a
//! point in time and streams what changed to the gateway's data port (`ferry-agent sync
//! --once`, `ferry-agent run`).
//!
//! - [`enroll`] — `ferry-agent enroll`: a fresh key, a CSR, the one-time token, over TLS that
//!   trusts only the CA pinned by its fingerprint; the answer is checked, then saved.
//! - [`status`] — `ferry-agent status`: a heartbeat, then the agent's record and its items,
//!   over mTLS with the saved identity.
//! - [`identity`] — the key pair, the certificate signing request, and the checks of the
//!   certificate the gateway returns (our key, signed by the pinned CA, named for us).
//! - [`state`] — the state directory (`agent.toml`, `agent.key`, `agent.crt`, `ca.pem`):
//!   private, written atomically, refused when already there unless forced.
//! - [`gateway`] — the HTTP client of the gateway's agent API: bounded bodies, timeouts, no
//!   redirects, the API's JSON errors made typed.
//! - [`disks`] — which local path is which disk of which item, and how its view is taken
//!   (`[[disk]]`, `[replication]` in `agent.toml`; `ferry-agent disk add | list | remove`).
//! - [`tracking`] — each disk's replication state: committed and pending chunk digests, the
//!   cycle in progress, its plan (versioned, `docs/agent-state.md`).
//! - [`view`] — the point-in-time view: live, reflink clone, LVM snapshot, quiesce commands.
//! - [`source`] — how a view is read (a raw disk directly, a VMDK/VHDX/VHD through its
//!   built-in source adapter) and a delta's change list from the disk's `changes` command.
//! - [`plan`] — which frames a cycle sends, decided once so a resume resends exactly them.
//! - [`session`] — the data port: TLS, the HTTP upgrade, `Hello`/`Welcome`, the window of
//!   unacknowledged frames, acks, `Busy`, errors, reconnects.
//! - [`sync`] — cycles: `sync --once` and the `run` service.
//! - [`resync`] — checksum-based resync: the replica's digests fetched from the gateway,
//!   checked whole, and used as the base of a `Resync` cycle.
//! - [`throttle`] — the bandwidth limit by local time of day, and the pacing of frames.
//! - [`progress`] — log lines and the terminal progress bar.
//! - [`error`] — [`AgentError`], what the binary reports, and its exit code.
//!
//! The wire types and the CA pinning come from `ferry-proto`, shared with the gateway and the
//! admin CLI. Secrets (the enrollment token, the private key) never reach a log, an error or a
//! `Debug` output.

pub mod disks;
pub mod enroll;
pub mod error;
pub mod gateway;
pub mod identity;
pub mod plan;
pub mod progress;
pub mod resync;
pub mod session;
pub mod source;
pub mod state;
pub mod status;
pub mod sync;
pub mod throttle;
pub mod tracking;
pub mod view;

#[cfg(test)]
mod testkit;

pub use error::AgentError;

/// The agent's version, sent to the gateway at enrollment and in heartbeats.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// This machine's host name (the kernel's node name), or `localhost` when it has none.
pub fn hostname() -> String {
    let u = rustix::system::uname();
    let n = u.nodename().to_string_lossy().trim().to_string();
    if n.is_empty() {
        "localhost".to_string()
    } else {
        n
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hostname_is_never_empty() {
        assert!(!super::hostname().is_empty());
    }
}
