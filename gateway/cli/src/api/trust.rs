//! Whom the client trusts. The appliance signs its server certificate with its own CA, so
//! the only root `ferry` ever trusts is that CA: taken once at `ferry login` from a file the
//! operator copied (`--ca-file`) or from the server itself, pinned by the SHA-256 fingerprint
//! `ferryd up` printed (`--ca-fingerprint`). [`PinnedCa`] is the verifier of that one first
//! connection; every later connection is plain webpki verification (chain and host name)
//! against the saved CA ([`tls_config`]).
//!
//! The pinning itself lives in [`ferry_proto::trust`], shared with `ferry-agent enroll`; this
//! module re-exports it and turns its errors into the CLI's [`ClientError`].

use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::CertificateDer;

pub use ferry_proto::trust::{Fingerprint, PinnedCa, to_pem};

use super::client::ClientError;

/// Certificates of a PEM text; at least one.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    Ok(ferry_proto::trust::certs_from_pem(pem, what)?)
}

/// TLS of every connection after login: these CA certificates are the only roots, and the
/// server's chain and host name are verified as usual (webpki).
pub fn tls_config(cas: &[CertificateDer<'static>]) -> Result<ClientConfig, ClientError> {
    Ok(ferry_proto::trust::tls_config(cas)?)
}

/// TLS of `ferry login --ca-fingerprint`: the connection is accepted only by [`PinnedCa`].
pub fn pinned_config(v: Arc<PinnedCa>) -> Result<ClientConfig, ClientError> {
    Ok(ferry_proto::trust::pinned_config(v)?)
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::pem::PemObject;

    use super::*;

    #[test]
    fn fingerprints_parse_in_every_spelling() {
        let colon = "79:65:26:AA:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:9D:14";
        let want = Fingerprint::parse(colon).unwrap();
        for s in [
            format!("SHA256 {colon}"),
            format!("sha256:{}", colon.to_lowercase()),
            colon.replace(':', ""),
            format!("  SHA256:{}  ", colon.replace(':', "").to_lowercase()),
        ] {
            assert_eq!(Fingerprint::parse(&s).unwrap(), want, "{s}");
        }
        assert_eq!(want.to_string(), format!("SHA256 {colon}"));
        for bad in ["", "SHA256 ", "AB:CD", "zz", &colon[3..]] {
            assert!(Fingerprint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pem_roundtrip() {
        let der = b"\x30\x03\x02\x01\x05".to_vec();
        let pem = to_pem(&der);
        let back = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(back[0].as_ref(), der.as_slice());
    }
}
