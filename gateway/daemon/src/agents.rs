//! Enrolled agents at run time: enrollment, the certificate check of every agent request,
//! revocation.
//!
//! An agent proves who it is with the client certificate the appliance CA signed for it at
//! enrollment (the TLS layer verifies the signature and validity, `crate::tls`). Which agent
//! a verified certificate belongs to, and whether it may still be used, is decided here: the
//! SHA-256 of the certificate is looked up among the active agents' fingerprints, held in
//! memory (loaded from the catalog at start, changed only after the catalog commit of an
//! enrollment or a revocation, under one lock). So a revoked agent's certificate, still
//! valid for TLS, is refused from the very next request, including on a connection opened
//! before the revocation.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use crate::auth::{TokenSecret, generate};
use crate::catalog::{Agent, Catalog, CatalogError, CertInfo, EnrollToken};
use crate::tls::{AgentCa, AgentCert};

/// Longest host name or version an agent may report.
pub const MAX_REPORTED_LEN: usize = 253;

/// Who a client certificate is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertCheck {
    /// An active agent.
    Agent(String),
    /// The certificate of an agent that was revoked.
    Revoked,
    /// An active agent's certificate past its expiry (a connection opened before it expired
    /// does not keep it alive).
    Expired(String),
    /// No agent of this appliance has this certificate.
    Unknown,
}

/// Why an enrollment failed before the catalog was asked.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The appliance has no CA (it serves an operator's certificate).
    #[error(
        "this appliance serves an operator-provided TLS certificate and has no CA of its own to sign agent certificates"
    )]
    NoCa,
    /// The request's CSR is unusable (the message says why).
    #[error("{0}")]
    BadCsr(String),
    /// A reported value is unusable.
    #[error("{0}")]
    BadField(String),
    /// The catalog refused (token state, name in use, …) or failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// The agents of a running appliance.
#[derive(Debug)]
pub struct Agents {
    catalog: Arc<Catalog>,
    ca: Option<Arc<AgentCa>>,
    /// Certificate SHA-256 → name, of every active agent.
    active: RwLock<HashMap<[u8; 32], (String, u64)>>,
    /// Certificate SHA-256 of revoked agents (for a precise refusal).
    revoked: RwLock<HashSet<[u8; 32]>>,
    /// Enrollment token SHA-256 → id: a presented token is found without touching the
    /// catalog, so an unknown one costs a hash and a map lookup, and never the catalog's
    /// write lock.
    token_ids: RwLock<HashMap<[u8; 32], String>>,
    /// Serialises enrollments and revocations (catalog commit + cache update).
    write: Mutex<()>,
}

/// Checks a host name or version an agent reports: printable, bounded.
fn check_reported(what: &str, v: Option<&String>) -> Result<(), EnrollError> {
    if let Some(v) = v
        && (v.is_empty()
            || v.len() > MAX_REPORTED_LEN
            || v.chars().any(|c| c.is_control() || c.is_whitespace()))
    {
        return Err(EnrollError::BadField(format!(
            "`{what}` must be 1 to {MAX_REPORTED_LEN} printable characters without spaces"
        )));
    }
    Ok(())
}

impl Agents {
    /// Loads the agents' fingerprints from the catalog; `ca` signs new agents' certificates.
    pub fn load(catalog: Arc<Catalog>, ca: Option<Arc<AgentCa>>) -> Result<Self, CatalogError> {
        let mut active = HashMap::new();
        let mut revoked = HashSet::new();
        let mut after: Option<String> = None;
        loop {
            let page = catalog.agents_page(after.as_deref(), crate::catalog::MAX_PAGE)?;
            for a in page.items {
                if a.is_active() {
                    active.insert(a.cert.sha256, (a.name, a.cert.expires_ms));
                } else {
                    revoked.insert(a.cert.sha256);
                }
            }
            match page.next_after {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let token_ids = catalog.enroll_token_hashes()?.into_iter().collect();
        Ok(Self {
            catalog,
            ca,
            active: RwLock::new(active),
            revoked: RwLock::new(revoked),
            token_ids: RwLock::new(token_ids),
            write: Mutex::new(()),
        })
    }

    /// The fingerprint of the CA agents pin (`None`: agents cannot enroll here, the
    /// appliance has no CA of its own).
    pub fn ca_fingerprint(&self) -> Option<String> {
        self.ca.as_ref().map(|c| c.fingerprint.clone())
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> Option<String> {
        self.ca.as_ref().map(|c| c.cert_pem.clone())
    }

    /// Who the verified client certificate with SHA-256 `sha256` is, now.
    pub fn check(&self, sha256: &[u8; 32]) -> CertCheck {
        self.check_at(sha256, ferry_store::point::now_ms())
    }

    /// [`Agents::check`] at `now_ms`.
    pub fn check_at(&self, sha256: &[u8; 32], now_ms: u64) -> CertCheck {
        if let Some((n, expires_ms)) = self
            .active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(sha256)
        {
            if now_ms >= *expires_ms {
                return CertCheck::Expired(n.clone());
            }
            return CertCheck::Agent(n.clone());
        }
        if self
            .revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(sha256)
        {
            return CertCheck::Revoked;
        }
        CertCheck::Unknown
    }

    /// Creates a one-time enrollment token for agent `agent`, acting for `items`, valid
    /// `ttl_secs`. Blocking (one catalog commit).
    pub fn create_token(
        &self,
        agent: &str,
        items: Vec<String>,
        ttl_secs: u64,
    ) -> Result<(EnrollToken, TokenSecret), CatalogError> {
        let now = ferry_store::point::now_ms();
        let (secret, sha256) = generate();
        let tok = EnrollToken {
            id: ferry_store::point::new_point_id(now),
            agent: agent.to_string(),
            items,
            sha256,
            created_ms: now,
            expires_ms: now.saturating_add(ttl_secs.saturating_mul(1000)),
            used_ms: None,
            revoked_ms: None,
        };
        self.catalog.insert_enroll_token(&tok, now)?;
        let mut ids = self.token_ids.write().unwrap_or_else(|p| p.into_inner());
        if ids.len() as u64 >= 2 * crate::catalog::MAX_ENROLL_TOKENS {
            // The catalog drops ended tokens to make room; drop their entries too.
            *ids = self.catalog.enroll_token_hashes()?.into_iter().collect();
        }
        ids.insert(tok.sha256, tok.id.clone());
        Ok((tok, secret))
    }

    /// Enrolls an agent: checks the CSR, then in one catalog transaction spends `token` and
    /// records the agent with the certificate signed for it. Blocking.
    pub fn enroll(
        &self,
        req: &ferry_proto::enroll::EnrollRequest,
    ) -> Result<(Agent, AgentCert), EnrollError> {
        let ca = self.ca.as_ref().ok_or(EnrollError::NoCa)?;
        check_reported("hostname", req.hostname.as_ref())?;
        check_reported("agent_version", req.agent_version.as_ref())?;
        // The request must be usable before the token is looked at: a bad CSR spends
        // nothing. (Signing proper happens inside the transaction, for the token's name.)
        AgentCa::check_csr(&req.csr).map_err(EnrollError::BadCsr)?;
        if req.token.is_empty() || req.token.len() > crate::auth::MAX_PRESENTED_LEN {
            return Err(CatalogError::EnrollRefused(crate::catalog::EnrollRefusal::Unknown).into());
        }
        let sha256 = crate::auth::hash(&req.token);
        let Some(id) = self
            .token_ids
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&sha256)
            .cloned()
        else {
            return Err(CatalogError::EnrollRefused(crate::catalog::EnrollRefusal::Unknown).into());
        };
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let now = ferry_store::point::now_ms();
        let (agent, cert) = self.catalog.enroll(
            &id,
            &sha256,
            now,
            req.hostname.clone(),
            req.agent_version.clone(),
            |tok| {
                let c = ca.sign_csr(&req.csr, &tok.agent)?;
                Ok((
                    CertInfo {
                        sha256: c.sha256,
                        serial: c.serial.clone(),
                        expires_ms: c.expires_ms,
                    },
                    c,
                ))
            },
        )?;
        let mut active = self.active.write().unwrap_or_else(|p| p.into_inner());
        // A re-enrolled name's old certificate (revoked) stays refused.
        active.retain(|_, (n, _)| n != &agent.name);
        active.insert(
            agent.cert.sha256,
            (agent.name.clone(), agent.cert.expires_ms),
        );
        Ok((agent, cert))
    }

    /// Revokes agent `name`: its certificate is refused from the next request on. Blocking.
    pub fn revoke(&self, name: &str, expect: Option<&[u64]>) -> Result<Agent, CatalogError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let a = self
            .catalog
            .revoke_agent(name, expect, ferry_store::point::now_ms())?;
        self.active
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| k != &a.cert.sha256);
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(a.cert.sha256);
        Ok(a)
    }

    /// Records a heartbeat of agent `name`. Blocking.
    pub fn heartbeat(
        &self,
        name: &str,
        cert_sha256: &[u8; 32],
        hb: ferry_proto::enroll::Heartbeat,
    ) -> Result<Agent, EnrollError> {
        check_reported("hostname", hb.hostname.as_ref())?;
        check_reported("agent_version", hb.agent_version.as_ref())?;
        Ok(self.catalog.agent_heartbeat(
            name,
            cert_sha256,
            hb.hostname,
            hb.agent_version,
            ferry_store::point::now_ms(),
        )?)
    }

    /// The catalog behind these agents.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::enroll::EnrollRequest;

    fn csr() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn setup() -> (tempfile::TempDir, Agents) {
        let d = tempfile::tempdir().unwrap();
        let id =
            crate::tls::load_or_create(d.path(), &crate::config::TlsConfig::default()).unwrap();
        let (c, _) = Catalog::open(&d.path().join("c.redb")).unwrap();
        (d, Agents::load(Arc::new(c), id.agent_ca).unwrap())
    }

    #[test]
    fn enroll_check_revoke_and_reload() {
        let (_d, agents) = setup();
        let (tok, secret) = agents.create_token("web01", vec![], 3600).unwrap();
        assert_eq!(tok.agent, "web01");
        let mut req = EnrollRequest {
            token: secret.expose().to_string(),
            csr: "not a csr".into(),
            hostname: Some("web01.example".into()),
            agent_version: None,
        };
        // A bad CSR spends nothing.
        assert!(matches!(agents.enroll(&req), Err(EnrollError::BadCsr(_))));
        req.csr = csr();
        let (a, cert) = agents.enroll(&req).unwrap();
        assert_eq!(a.name, "web01");
        assert!(cert.pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(agents.check(&cert.sha256), CertCheck::Agent("web01".into()));
        assert_eq!(agents.check(&[0; 32]), CertCheck::Unknown);
        assert_eq!(
            agents.check_at(&cert.sha256, cert.expires_ms),
            CertCheck::Expired("web01".into()),
            "refused from its expiry on, whatever the TLS layer saw at the handshake"
        );
        // The certificate chains to the appliance CA and is good for client auth.
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(cert.pem.as_bytes()).unwrap();
        let ca =
            rustls::pki_types::CertificateDer::from_pem_slice(agents.ca_pem().unwrap().as_bytes())
                .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            crate::tls::provider(),
        )
        .build()
        .unwrap();
        v.verify_client_cert(&der, &[], rustls::pki_types::UnixTime::now())
            .unwrap();
        // Reused token.
        assert!(matches!(
            agents.enroll(&req),
            Err(EnrollError::Catalog(CatalogError::EnrollRefused(_)))
        ));
        // Bad reported values.
        let (_, s2) = agents.create_token("web02", vec![], 3600).unwrap();
        let bad = EnrollRequest {
            token: s2.expose().into(),
            csr: csr(),
            hostname: Some("two words".into()),
            agent_version: None,
        };
        assert!(matches!(agents.enroll(&bad), Err(EnrollError::BadField(_))));
        // Revocation is immediate, and survives a reload.
        agents.revoke("web01", None).unwrap();
        assert!(matches!(agents.check(&cert.sha256), CertCheck::Revoked));
        let again = Agents::load(agents.catalog().clone(), None).unwrap();
        assert!(matches!(again.check(&cert.sha256), CertCheck::Revoked));
        assert!(matches!(again.enroll(&bad), Err(EnrollError::NoCa)));
    }
}
