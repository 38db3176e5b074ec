//! The contract between `ferry-agent` and the gateway, in one crate both build against, so the
//! two cannot drift: a change here is a change to both sides at once.
//!
//! - [`enroll`] — `POST /api/v1/enroll`: a one-time enrollment token and a certificate
//!   signing request in, the agent's client certificate and the appliance CA out.
//!
//! Every body is JSON; requests refuse unknown members (`deny_unknown_fields`), answers may
//! grow members (readers ignore what they do not know), so an older agent keeps talking to a
//! newer gateway. The served OpenAPI document (`/api/v1/openapi.json`) describes the same
//! bodies.

pub mod enroll;
