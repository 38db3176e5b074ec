//! What the agent's commands report when they fail, and the exit status each failure gives.
//!
//! Each module has its own typed error ([`StateError`], [`GatewayError`], [`IdentityError`],
//! and for replication [`SyncError`], which wraps the tracking, view, planning and session
//! errors with the disk and cycle);
//! [`AgentError`] gathers them so the binary can print one line and pick the exit status from
//! the class of failure, which scripts and the installer branch on:
//!
//! | status | meaning |
//! | --- | --- |
//! | 0 | done |
//! | 1 | usage or anything else (an unexpected answer, a gateway error other than 401/403) |
//! | 3 | cannot reach the gateway, or TLS refused it (wrong CA, wrong fingerprint) |
//! | 4 | the gateway refused us (401/403: bad or spent token, unknown certificate) |
//! | 5 | a local state problem (already enrolled, not enrolled, unreadable or unsafe files) |
//!
//! Messages name what failed and on what: the file, the URL, the gateway's error code and
//! message. None ever holds the enrollment token or key material.

use crate::gateway::GatewayError;
use crate::identity::IdentityError;
use crate::state::StateError;
use crate::sync::SyncError;

/// Usage or an unexpected failure.
pub const EXIT_OTHER: u8 = 1;
/// The gateway cannot be reached, or TLS refused it.
pub const EXIT_UNREACHABLE: u8 = 3;
/// The gateway refused the agent (401/403).
pub const EXIT_REFUSED: u8 = 4;
/// The state directory is missing, already there, or unusable.
pub const EXIT_STATE: u8 = 5;

/// A failed command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A flag's value is refused; the message names the flag (never a secret's text).
    #[error("{0}")]
    Usage(String),
    /// The state directory.
    #[error(transparent)]
    State(#[from] StateError),
    /// Talking to the gateway.
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    /// The key, the CSR, or the certificate the gateway returned.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Replicating a disk (`run`, when every disk stopped on a fatal error).
    #[error(transparent)]
    Sync(Box<SyncError>),
}

impl AgentError {
    /// The process exit status for this failure (see the module documentation).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => EXIT_OTHER,
            Self::State(_) => EXIT_STATE,
            Self::Gateway(g) => g.exit_code(),
            Self::Identity(i) => i.exit_code(),
            Self::Sync(s) => s.exit_code(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn exit_codes_by_class() {
        let url = "https://gw:8443".to_string();
        let api = |status| {
            AgentError::from(GatewayError::Api {
                url: url.clone(),
                what: "POST /api/v1/enroll",
                status,
                code: "x".into(),
                message: "m".into(),
            })
        };
        assert_eq!(api(401).exit_code(), EXIT_REFUSED);
        assert_eq!(api(403).exit_code(), EXIT_REFUSED);
        assert_eq!(api(409).exit_code(), EXIT_OTHER);
        assert_eq!(api(500).exit_code(), EXIT_OTHER);
        let status = |status| {
            AgentError::from(GatewayError::Status {
                url: url.clone(),
                what: "GET /api/v1/agent",
                status,
            })
        };
        assert_eq!(status(403).exit_code(), EXIT_REFUSED);
        assert_eq!(status(502).exit_code(), EXIT_OTHER);
        let e = AgentError::from(GatewayError::Unreachable {
            url: url.clone(),
            reason: "connection refused".into(),
        });
        assert_eq!(e.exit_code(), EXIT_UNREACHABLE);
        let e = AgentError::from(StateError::NotEnrolled {
            dir: PathBuf::from("/x"),
        });
        assert_eq!(e.exit_code(), EXIT_STATE);
        assert_eq!(AgentError::Usage("u".into()).exit_code(), EXIT_OTHER);
    }
}
