//! Whom the client trusts. The appliance signs its server certificate with its own CA, so
//! the only root `ferry` ever trusts is that CA: taken once at `ferry login` from a file the
//! operator copied (`--ca-file`) or from the server itself, pinned by the SHA-256 fingerprint
//! `ferryd up` printed (`--ca-fingerprint`). [`PinnedCa`] is the verifier of that one first
//! connection; every later connection is plain webpki verification (chain and host name)
//! against the saved CA ([`tls_config`]).

use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};
use sha2::{Digest, Sha256};

use super::client::ClientError;

/// A SHA-256 certificate fingerprint.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// Parses `AB:CD:…`, plain hex, either case, optionally prefixed `SHA256 ` or `sha256:`
    /// (what `ferryd up` prints is accepted as is). A clap value parser.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        let rest = ["sha256:", "sha256 ", "sha-256:", "sha-256 "]
            .iter()
            .find_map(|p| lower.strip_prefix(p))
            .unwrap_or(&lower)
            .trim();
        let hexs: String = rest.chars().filter(|&c| c != ':').collect();
        let bytes = hex::decode(&hexs).map_err(|_| {
            "a CA fingerprint is 32 bytes of hex (`AB:CD:…` as `ferryd up` prints it)".to_string()
        })?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| {
            "a SHA-256 fingerprint is 32 bytes (64 hex digits, `AB:CD:…`)".to_string()
        })?;
        Ok(Self(arr))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = hex::encode_upper(self.0);
        let pairs: Vec<&str> = h
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).expect("hex is ASCII"))
            .collect();
        write!(f, "SHA256 {}", pairs.join(":"))
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The crypto provider of every connection.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Certificates of a PEM text; at least one.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Local(format!("{what}: not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(ClientError::Local(format!(
            "{what}: no certificate in it (expected `-----BEGIN CERTIFICATE-----`)"
        )));
    }
    Ok(certs)
}

/// PEM text of one DER certificate.
pub fn to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

fn finish(
    builder: rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
) -> ClientConfig {
    let mut cfg = builder.with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg
}

/// TLS of every connection after login: these CA certificates are the only roots, and the
/// server's chain and host name are verified as usual (webpki).
pub fn tls_config(cas: &[CertificateDer<'static>]) -> Result<ClientConfig, ClientError> {
    let mut roots = RootCertStore::empty();
    for c in cas {
        roots.add(c.clone()).map_err(|e| {
            ClientError::Local(format!("the saved CA certificate is unusable: {e}"))
        })?;
    }
    let b = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Local(format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    Ok(finish(b))
}

/// TLS of `ferry login --ca-fingerprint`: the connection is accepted only by [`PinnedCa`].
pub fn pinned_config(v: Arc<PinnedCa>) -> Result<ClientConfig, ClientError> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Local(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(v);
    Ok(finish(b))
}

/// Accepts a server only if a certificate of the chain it presents has the expected SHA-256
/// fingerprint and the end-entity certificate verifies, for the host name connected to,
/// against that certificate as the only root. Remembers the certificate it accepted.
#[derive(Debug)]
pub struct PinnedCa {
    want: Fingerprint,
    provider: Arc<CryptoProvider>,
    accepted: Mutex<Option<CertificateDer<'static>>>,
    refused: Mutex<Option<String>>,
}

#[derive(Debug, thiserror::Error)]
#[error("no certificate the appliance presented has the fingerprint {0}")]
struct NoSuchFingerprint(Fingerprint);

impl PinnedCa {
    /// A verifier expecting a CA with fingerprint `want`.
    pub fn new(want: Fingerprint) -> Self {
        Self {
            want,
            provider: provider(),
            accepted: Mutex::new(None),
            refused: Mutex::new(None),
        }
    }

    /// Why the last handshake was refused, in words (rustls' own error shows its internals).
    pub fn refused(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The CA certificate a verified handshake was anchored in.
    pub fn accepted(&self) -> Option<CertificateDer<'static>> {
        self.accepted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl PinnedCa {
    /// [`ServerCertVerifier::verify_server_cert`], remembering why it refused.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let r = self.verify(end_entity, intermediates, server_name, ocsp_response, now);
        if let Err(e) = &r {
            let why = match e {
                rustls::Error::InvalidCertificate(CertificateError::Other(o)) => o.0.to_string(),
                e => format!(
                    "the appliance's certificate does not verify against the pinned CA: {e}"
                ),
            };
            *self
                .refused
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
        }
        r
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = std::iter::once(end_entity)
            .chain(intermediates)
            .find(|c| Fingerprint::of(c.as_ref()) == self.want)
            .ok_or_else(|| {
                rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                    NoSuchFingerprint(self.want),
                ))))
            })?
            .clone()
            .into_owned();
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone())?;
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("verifier: {e}")))?;
        let ok = webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        *self
            .accepted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(ca);
        Ok(ok)
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
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
