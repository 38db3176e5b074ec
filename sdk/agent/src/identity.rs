//! The agent's identity: an ECDSA P-256 key pair made on this machine (the private key never
//! leaves it), the PKCS#10 certificate signing request sent at enrollment, and the checks of
//! what the gateway returns before anything is saved.
//!
//! The answer is checked, not trusted, because it is about to become the only thing the agent
//! trusts: the returned CA must be exactly the CA pinned by fingerprint; the certificate must
//! carry our public key, be signed by that CA, name the agent the gateway says we are, match
//! the fingerprint the gateway sent, and not be expired already.

use ferry_proto::enroll::EnrollResponse;
use ferry_proto::trust::{self, Fingerprint};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::CertificateDer;
use time::format_description::well_known::Rfc3339;
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::error::{EXIT_OTHER, EXIT_UNREACHABLE};

/// What can go wrong making the identity or checking the gateway's answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Generating the key or the CSR failed.
    #[error("cannot generate the agent's {what}: {source}")]
    Generate {
        /// `key` or `certificate signing request`.
        what: &'static str,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// The CA in the answer is not the one pinned at the command line.
    #[error(
        "the gateway's enrollment answer names a CA other than the pinned one: {reason}; \
         nothing was saved"
    )]
    CaMismatch {
        /// What differs.
        reason: String,
    },
    /// The certificate in the answer fails a check.
    #[error("the certificate the gateway issued is refused: {reason}; nothing was saved")]
    BadCertificate {
        /// Which check failed.
        reason: String,
    },
}

impl IdentityError {
    /// 3 for a CA that is not the pinned one (a trust failure, like TLS), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::CaMismatch { .. } => EXIT_UNREACHABLE,
            _ => EXIT_OTHER,
        }
    }
}

fn bad(reason: impl Into<String>) -> IdentityError {
    IdentityError::BadCertificate {
        reason: reason.into(),
    }
}

/// The agent's key pair. `Debug` shows no key material.
pub struct Identity {
    key: KeyPair,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Identity(ECDSA P-256, <private key redacted>)")
    }
}

impl Identity {
    /// A fresh ECDSA P-256 key pair.
    pub fn generate() -> Result<Self, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| {
            IdentityError::Generate {
                what: "key",
                source,
            }
        })?;
        Ok(Self { key })
    }

    /// The public key as it appears in a certificate's `subjectPublicKey` (the EC point).
    pub fn public_key_raw(&self) -> &[u8] {
        self.key.public_key_raw()
    }

    /// The private key, PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), wiped when dropped.
    pub fn private_key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.key.serialize_pem())
    }

    /// A PEM `CERTIFICATE REQUEST` signed by the key, with common name `common_name` (the
    /// host name; the gateway names the certificate after the agent anyway).
    pub fn csr_pem(&self, common_name: &str) -> Result<String, IdentityError> {
        let generate = |source| IdentityError::Generate {
            what: "certificate signing request",
            source,
        };
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(generate)
    }
}

/// A checked enrollment answer: what is saved, re-encoded from the parsed certificates.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The agent's name (the certificate's common name).
    pub agent: String,
    /// The client certificate (and any intermediates the gateway sent after it), PEM.
    pub certificate_pem: String,
    /// The CA, PEM: exactly the pinned certificate.
    pub ca_pem: String,
    /// The CA's fingerprint.
    pub ca_sha256: Fingerprint,
    /// The client certificate's fingerprint.
    pub certificate_sha256: Fingerprint,
    /// When the client certificate expires, RFC 3339 (read from the certificate itself).
    pub certificate_expires: String,
    /// The protected items the agent acts for.
    pub items: Vec<String>,
}

/// Checks the gateway's enrollment answer against our key and the pinned CA fingerprint.
pub fn check_issued(
    resp: &EnrollResponse,
    id: &Identity,
    pinned: Fingerprint,
) -> Result<Issued, IdentityError> {
    // The CA: one certificate, the pinned one.
    let cas = trust::certs_from_pem(resp.ca.as_bytes(), "the `ca` member").map_err(|e| {
        IdentityError::CaMismatch {
            reason: e.to_string(),
        }
    })?;
    let [ca_der] = cas.as_slice() else {
        return Err(IdentityError::CaMismatch {
            reason: format!(
                "the `ca` member holds {} certificates, not the one CA",
                cas.len()
            ),
        });
    };
    let ca_fp = Fingerprint::of(ca_der);
    if ca_fp != pinned {
        return Err(IdentityError::CaMismatch {
            reason: format!("it has the fingerprint {ca_fp}, not {pinned}"),
        });
    }
    let (_, ca) = X509Certificate::from_der(ca_der).map_err(|e| IdentityError::CaMismatch {
        reason: format!("the CA certificate does not parse ({e})"),
    })?;

    // The client certificate: ours, signed by that CA, named for the agent.
    let chain = trust::certs_from_pem(resp.certificate.as_bytes(), "the `certificate` member")
        .map_err(|e| bad(e.to_string()))?;
    let leaf_der: &CertificateDer<'_> = &chain[0];
    let (_, leaf) =
        X509Certificate::from_der(leaf_der).map_err(|e| bad(format!("it does not parse ({e})")))?;
    if leaf.public_key().subject_public_key.data.as_ref() != id.public_key_raw() {
        return Err(bad(
            "it does not carry the public key of the request (another key's certificate)",
        ));
    }
    leaf.verify_signature(Some(ca.public_key()))
        .map_err(|e| bad(format!("it is not signed by the pinned CA ({e})")))?;
    let cn = leaf
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .ok_or_else(|| bad("it has no common name"))?;
    if cn != resp.agent {
        return Err(bad(format!(
            "its common name `{cn}` is not the agent name `{}` the gateway answered",
            resp.agent
        )));
    }
    let leaf_fp = Fingerprint::of(leaf_der);
    match Fingerprint::parse(&resp.certificate_sha256) {
        Ok(fp) if fp == leaf_fp => {}
        _ => {
            return Err(bad(format!(
                "its fingerprint is {leaf_fp}, but the answer says `{}`",
                resp.certificate_sha256
            )));
        }
    }
    let not_after = leaf.validity().not_after.to_datetime();
    if not_after <= time::OffsetDateTime::now_utc() {
        return Err(bad(format!("it expired at {not_after}")));
    }
    let certificate_expires = not_after
        .format(&Rfc3339)
        .map_err(|e| bad(format!("its expiry time cannot be written ({e})")))?;

    Ok(Issued {
        agent: resp.agent.clone(),
        certificate_pem: chain.iter().map(|c| trust::to_pem(c)).collect(),
        ca_pem: trust::to_pem(ca_der),
        ca_sha256: ca_fp,
        certificate_sha256: leaf_fp,
        certificate_expires,
        items: resp.items.clone(),
    })
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateSigningRequestParams, PublicKeyData};

    use super::*;
    use crate::testkit::TestCa;

    #[test]
    fn csr_parses_back_with_our_key_and_host_name() {
        let id = Identity::generate().unwrap();
        let pem = id.csr_pem("web-01.example").unwrap();
        assert!(
            pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
            "{pem}"
        );
        let csr = CertificateSigningRequestParams::from_pem(&pem).unwrap();
        assert_eq!(csr.public_key.der_bytes(), id.public_key_raw());
        assert_eq!(csr.public_key.algorithm(), &PKCS_ECDSA_P256_SHA256);
        let cn = csr
            .params
            .distinguished_name
            .get(&DnType::CommonName)
            .unwrap();
        assert_eq!(cn, &rcgen::DnValue::Utf8String("web-01.example".into()));
        // Each identity is a fresh key.
        assert_ne!(
            Identity::generate().unwrap().public_key_raw(),
            id.public_key_raw()
        );
    }

    #[test]
    fn the_private_key_is_pkcs8_and_never_in_debug() {
        let id = Identity::generate().unwrap();
        let pem = id.private_key_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let back = KeyPair::from_pem(&pem).unwrap();
        assert_eq!(back.public_key_raw(), id.public_key_raw());
        let d = format!("{id:?}");
        assert!(!d.contains("PRIVATE") && d.contains("redacted"), "{d}");
    }

    #[test]
    fn a_good_answer_is_accepted() {
        let ca = TestCa::new();
        let id = Identity::generate().unwrap();
        let resp = ca.answer("web-01", &id.csr_pem("host").unwrap(), 30);
        let ok = check_issued(&resp, &id, ca.fingerprint()).unwrap();
        assert_eq!(ok.agent, "web-01");
        assert_eq!(ok.ca_sha256, ca.fingerprint());
        assert_eq!(ok.items, ["db", "web"]);
        assert_eq!(
            trust::certs_from_pem(ok.ca_pem.as_bytes(), "ca").unwrap()[0].as_ref(),
            ca.der().as_ref()
        );
        assert!(
            ok.certificate_expires.ends_with('Z'),
            "{}",
            ok.certificate_expires
        );
        assert_eq!(ok.certificate_sha256.colon_hex(), resp.certificate_sha256);
    }

    #[test]
    fn answers_that_fail_a_check_are_refused() {
        let ca = TestCa::new();
        let id = Identity::generate().unwrap();
        let csr = id.csr_pem("host").unwrap();
        let good = ca.answer("web-01", &csr, 30);
        let msg = |r: EnrollResponse| check_issued(&r, &id, ca.fingerprint()).unwrap_err();

        // Another CA than the pinned one (also when the pinned one comes along).
        let other = TestCa::new();
        let e = check_issued(&other.answer("web-01", &csr, 30), &id, ca.fingerprint()).unwrap_err();
        assert!(matches!(e, IdentityError::CaMismatch { .. }), "{e}");
        assert_eq!(e.exit_code(), EXIT_UNREACHABLE);
        assert!(e.to_string().contains(&ca.fingerprint().to_string()), "{e}");
        let mut two = good.clone();
        two.ca = format!("{}{}", good.ca, other.pem());
        assert!(matches!(msg(two), IdentityError::CaMismatch { .. }));
        let mut none = good.clone();
        none.ca = "nothing".into();
        assert!(matches!(msg(none), IdentityError::CaMismatch { .. }));

        // A certificate for another key.
        let stranger = Identity::generate().unwrap();
        let mut r = ca.answer("web-01", &stranger.csr_pem("host").unwrap(), 30);
        assert!(
            msg(r.clone()).to_string().contains("public key"),
            "{}",
            msg(r.clone())
        );
        // … or ours, but signed by another CA and sent with the pinned CA.
        r = other.answer("web-01", &csr, 30);
        r.ca = good.ca.clone();
        assert!(
            msg(r).to_string().contains("not signed by the pinned CA"),
            "signature"
        );
        // Named for another agent.
        let mut r = good.clone();
        r.agent = "web-02".into();
        assert!(msg(r).to_string().contains("common name `web-01`"));
        // A fingerprint that is not the certificate's.
        let mut r = good.clone();
        r.certificate_sha256 = ca.fingerprint().colon_hex();
        assert!(msg(r).to_string().contains("fingerprint"));
        // Already expired.
        let e = msg(ca.answer("web-01", &csr, -1));
        assert!(e.to_string().contains("expired"), "{e}");
        assert_eq!(e.exit_code(), EXIT_OTHER);
        // Not a certificate at all.
        let mut r = good;
        r.certificate = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into();
        assert!(msg(r).to_string().contains("does not parse"));
    }
}
