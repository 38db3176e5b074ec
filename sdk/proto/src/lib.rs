//! The contract between `ferry-agent` and the gateway, in one crate both build against, so the
//! two cannot drift: a change here is a change to both sides at once.
//!
//! - [`enroll`] — `POST /api/v1/enroll`: a one-time enrollment token and a certificate
//!   signing request in, the agent's client certificate and the appliance CA out.
//! - [`frame`] — the replication stream on the data port (agent ⇄ gateway, after an HTTP/1.1
//!   Upgrade to `ferry-replication/1`): versioned, self-delimiting frames with CRC-32C, which
//!   the gateway also keeps as-is in its journal. A pure codec; layout in
//!   `docs/agent-protocol.md`.
//! - [`trust`] — whom a client trusts: the appliance CA pinned once by its SHA-256 fingerprint
//!   ([`trust::Fingerprint`], [`trust::PinnedCa`]), then the only root (plus the agent's client
//!   certificate for mTLS). Shared by the admin CLI (`ferry login`) and the agent
//!   (`ferry-agent enroll`), so the two pin the CA the same way.
//!
//! Every HTTP body is JSON; requests refuse unknown members (`deny_unknown_fields`), answers may
//! grow members (readers ignore what they do not know), so an older agent keeps talking to a
//! newer gateway. The served OpenAPI document (`/api/v1/openapi.json`) describes the same
//! bodies.

pub mod digests;
pub mod enroll;
pub mod frame;
pub mod schedule;
pub mod trust;
