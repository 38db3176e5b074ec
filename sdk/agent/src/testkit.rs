//! Test helpers (compiled for tests only): a CA that signs enrollment requests the way the
//! gateway will, and a fake gateway speaking HTTPS on a loopback port with that CA's server
//! certificate, optionally requiring a client certificate. They let the network code run for
//! real while the gateway side is being written.

use std::sync::{Arc, Mutex};

use ferry_proto::enroll::EnrollResponse;
use ferry_proto::trust::{self, Fingerprint};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A CA like the appliance's.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new() -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "Test CA");
        Self {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    pub fn pem(&self) -> String {
        trust::to_pem(self.issuer.der())
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(self.issuer.der())
    }

    /// What the gateway answers to `csr_pem`: a certificate for `agent`, valid for `days` from
    /// now (expired when negative), items `db` and `web`.
    pub fn answer(&self, agent: &str, csr_pem: &str, days: i64) -> EnrollResponse {
        // As the gateway signs (gateway/daemon/src/tls.rs, `sign_csr`): only the key of the
        // request is used; the subject is the agent, the only usage client authentication.
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::OrganizationName, "Ferry agent");
        p.distinguished_name.push(DnType::CommonName, agent);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = now - time::Duration::days(2);
        p.not_after = now + time::Duration::days(days);
        p.use_authority_key_identifier_extension = true;
        csr.params = p;
        let cert = csr.signed_by(&self.issuer).unwrap();
        EnrollResponse {
            agent: agent.to_string(),
            certificate: cert.pem(),
            ca: self.pem(),
            certificate_sha256: Fingerprint::of(cert.der()).colon_hex(),
            certificate_expires: "2100-01-01T00:00:00Z".into(),
            items: vec!["db".into(), "web".into()],
        }
    }

    /// A server certificate for `127.0.0.1` only (not `localhost`: a test connects by that
    /// name to see the host-name check refuse) and its key.
    fn server(&self) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (
            cert.der().clone(),
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
    }

    /// A fake gateway on a loopback port: answers each request with `handler`'s status and
    /// body. With `client_auth`, the handshake requires a client certificate this CA signed.
    pub async fn serve(
        &self,
        client_auth: bool,
        handler: impl Fn(&Request) -> (u16, String) + Send + Sync + 'static,
    ) -> FakeGateway {
        let provider = trust::provider();
        let verifier = if client_auth {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.der()).unwrap();
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .unwrap()
        } else {
            rustls::server::WebPkiClientVerifier::no_client_auth()
        };
        let (cert, key) = self.server();
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert, self.der()], key)
            .unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let seen = requests.clone();
        let handler = Arc::new(handler);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, seen, handler) = (acceptor.clone(), seen.clone(), handler.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let client_cert = tls.get_ref().1.peer_certificates().map(|c| c[0].to_vec());
                    let Some(mut req) = read_request(&mut tls).await else {
                        return;
                    };
                    req.client_cert = client_cert;
                    let (status, body) = handler(&req);
                    seen.lock().unwrap().push(req);
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = tls.write_all(head.as_bytes()).await;
                    let _ = tls.write_all(body.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        FakeGateway {
            url: format!("https://127.0.0.1:{port}"),
            requests,
            task,
        }
    }
}

/// One request the fake gateway received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub body: Vec<u8>,
    /// The client certificate shown in the handshake, DER.
    pub client_cert: Option<Vec<u8>>,
}

impl Request {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

async fn read_request<S: AsyncReadExt + Unpin>(s: &mut S) -> Option<Request> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.ok()? == 0 || buf.len() > 64 << 10 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).ok()?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let len = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.trim().parse::<usize>().unwrap_or(0));
    let mut body = vec![0; len];
    s.read_exact(&mut body).await.ok()?;
    Some(Request {
        method,
        target,
        body,
        client_cert: None,
    })
}

/// A running fake gateway; stops when dropped.
pub struct FakeGateway {
    pub url: String,
    requests: Arc<Mutex<Vec<Request>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeGateway {
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}
