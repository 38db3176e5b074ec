//! Whom a client of the appliance trusts. The appliance signs its server certificate with a CA
//! of its own, so the only root a Ferry client ever trusts is that CA. A client meets it once,
//! pinned by the SHA-256 fingerprint `ferryd up` printed ([`Fingerprint`]): the admin CLI at
//! `ferry login --ca-fingerprint`, an agent at `ferry-agent enroll --ca-fingerprint`.
//! [`PinnedCa`] is the verifier of that one first connection; every later connection is plain
//! webpki verification (chain and host name) against the saved CA ([`tls_config`], and
//! [`mtls_config`] when the client also shows a certificate, as an enrolled agent does).
//!
//! It lives here, in the crate both the CLI and the agent build against, so that the two pin
//! the CA in exactly one way.

use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};
use sha2::{Digest, Sha256};

/// What can go wrong setting up trust. Each message names what it is about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// A PEM text that holds no certificate, or a broken one. `what` names it (a file, a flag,
    /// an answer).
    #[error("{what}: {reason}")]
    Pem {
        /// What the text is (`--ca-file \`ca.pem\``, `the gateway's answer`).
        what: String,
        /// Why it is refused.
        reason: String,
    },
    /// A CA certificate rustls refuses as a root.
    #[error("the saved CA certificate is unusable: {0}")]
    UnusableCa(rustls::Error),
    /// A client certificate and key rustls refuses.
    #[error("the client certificate or its key is unusable: {0}")]
    UnusableClientCert(rustls::Error),
    /// The TLS configuration could not be built.
    #[error("TLS setup: {0}")]
    Setup(rustls::Error),
}

/// A SHA-256 certificate fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
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

    /// `AB:CD:…` without the `SHA256 ` prefix [`Display`](std::fmt::Display) adds: the form of
    /// [`crate::enroll::EnrollResponse::certificate_sha256`].
    pub fn colon_hex(&self) -> String {
        let h = hex::encode_upper(self.0);
        let pairs: Vec<&str> = h
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).expect("hex is ASCII"))
            .collect();
        pairs.join(":")
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SHA256 {}", self.colon_hex())
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

/// Certificates of a PEM text; at least one. `what` names the text in errors.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrustError::Pem {
            what: what.to_string(),
            reason: format!("not a PEM certificate file ({e})"),
        })?;
    if certs.is_empty() {
        return Err(TrustError::Pem {
            what: what.to_string(),
            reason: "no certificate in it (expected `-----BEGIN CERTIFICATE-----`)".to_string(),
        });
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

fn builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, TrustError> {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TrustError::Setup)
}

fn roots(cas: &[CertificateDer<'static>]) -> Result<RootCertStore, TrustError> {
    let mut roots = RootCertStore::empty();
    for c in cas {
        roots.add(c.clone()).map_err(TrustError::UnusableCa)?;
    }
    Ok(roots)
}

fn http1(mut cfg: ClientConfig) -> ClientConfig {
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg
}

/// TLS of every connection after the CA was pinned: these CA certificates are the only roots,
/// and the server's chain and host name are verified as usual (webpki).
pub fn tls_config(cas: &[CertificateDer<'static>]) -> Result<ClientConfig, TrustError> {
    Ok(http1(
        builder()?
            .with_root_certificates(roots(cas)?)
            .with_no_client_auth(),
    ))
}

/// [`tls_config`] that also presents a client certificate (`chain`, the end entity first) and
/// proves it holds `key`: how an enrolled agent connects (mTLS).
pub fn mtls_config(
    cas: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ClientConfig, TrustError> {
    let cfg = builder()?
        .with_root_certificates(roots(cas)?)
        .with_client_auth_cert(chain, key)
        .map_err(TrustError::UnusableClientCert)?;
    Ok(http1(cfg))
}

/// TLS of the first connection (`ferry login --ca-fingerprint`, `ferry-agent enroll`): the
/// server is accepted only by [`PinnedCa`].
pub fn pinned_config(v: Arc<PinnedCa>) -> Result<ClientConfig, TrustError> {
    Ok(http1(
        builder()?
            .dangerous()
            .with_custom_certificate_verifier(v)
            .with_no_client_auth(),
    ))
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

    /// The fingerprint it expects.
    pub fn fingerprint(&self) -> Fingerprint {
        self.want
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

    const COLON: &str = "79:65:26:AA:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:9D:14";

    #[test]
    fn fingerprints_parse_in_every_spelling() {
        let want = Fingerprint::parse(COLON).unwrap();
        for s in [
            format!("SHA256 {COLON}"),
            format!("sha256:{}", COLON.to_lowercase()),
            format!("SHA-256 {COLON}"),
            COLON.replace(':', ""),
            format!("  SHA256:{}  ", COLON.replace(':', "").to_lowercase()),
        ] {
            assert_eq!(Fingerprint::parse(&s).unwrap(), want, "{s}");
        }
        assert_eq!(want.to_string(), format!("SHA256 {COLON}"));
        assert_eq!(want.colon_hex(), COLON);
        assert_eq!(format!("{want:?}"), format!("SHA256 {COLON}"));
        for bad in [
            "",
            "SHA256 ",
            "AB:CD",
            "zz",
            &COLON[3..],
            &format!("{COLON}:00"),
        ] {
            assert!(Fingerprint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fingerprint_is_sha256_of_the_der() {
        // SHA-256 of the empty input.
        assert_eq!(
            hex::encode(Fingerprint::of(b"").0),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn pem_roundtrip_and_refusals() {
        let der = b"\x30\x03\x02\x01\x05".to_vec();
        let pem = to_pem(&der);
        let back = certs_from_pem(pem.as_bytes(), "x").unwrap();
        assert_eq!(back[0].as_ref(), der.as_slice());
        let e = certs_from_pem(b"hello", "--ca-file `a.pem`").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--ca-file `a.pem`: no certificate in it (expected `-----BEGIN CERTIFICATE-----`)"
        );
        let e = certs_from_pem(b"-----BEGIN CERTIFICATE-----\n!!\n", "f").unwrap_err();
        assert!(
            e.to_string().starts_with("f: not a PEM certificate file"),
            "{e}"
        );
    }

    #[test]
    fn configs_speak_http1_and_refuse_junk_roots() {
        let v = Arc::new(PinnedCa::new(Fingerprint([7; 32])));
        assert_eq!(v.fingerprint(), Fingerprint([7; 32]));
        assert_eq!(v.accepted(), None);
        assert_eq!(v.refused(), None);
        let c = pinned_config(v).unwrap();
        assert_eq!(c.alpn_protocols, [b"http/1.1".to_vec()]);
        let e = tls_config(&[CertificateDer::from(vec![1, 2, 3])]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the saved CA certificate is unusable"),
            "{e}"
        );
    }

    /// A CA and a server certificate for `localhost` it signed, DER.
    fn chain() -> (CertificateDer<'static>, CertificateDer<'static>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &Issuer::new(ca, ca_key))
            .unwrap();
        (ca_cert.der().clone(), server.der().clone())
    }

    #[test]
    fn pinned_ca_accepts_only_its_fingerprint_and_host() {
        let (ca, server) = chain();
        let name = ServerName::try_from("localhost").unwrap();
        let now = UnixTime::now();

        let v = PinnedCa::new(Fingerprint::of(&ca));
        v.verify_server_cert(&server, std::slice::from_ref(&ca), &name, &[], now)
            .unwrap();
        assert_eq!(v.accepted().as_ref(), Some(&ca));
        assert_eq!(v.refused(), None);

        let other = Fingerprint([9; 32]);
        let v = PinnedCa::new(other);
        assert!(
            v.verify_server_cert(&server, std::slice::from_ref(&ca), &name, &[], now)
                .is_err()
        );
        assert_eq!(
            v.refused().unwrap(),
            format!("no certificate the appliance presented has the fingerprint {other}")
        );
        assert_eq!(v.accepted(), None);

        // The right CA, but the certificate is not for this host name.
        let v = PinnedCa::new(Fingerprint::of(&ca));
        let elsewhere = ServerName::try_from("gateway.example").unwrap();
        assert!(
            v.verify_server_cert(&server, std::slice::from_ref(&ca), &elsewhere, &[], now)
                .is_err()
        );
        assert!(
            v.refused()
                .unwrap()
                .starts_with("the appliance's certificate does not verify against the pinned CA"),
            "{:?}",
            v.refused()
        );

        // Pinning the server certificate itself does not make it its own root.
        let v = PinnedCa::new(Fingerprint::of(&server));
        assert!(v.verify_server_cert(&server, &[], &name, &[], now).is_err());
    }
}
