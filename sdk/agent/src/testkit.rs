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

    /// TLS as the gateway serves it, with this CA's server certificate for `127.0.0.1`;
    /// with `client_auth`, a client certificate this CA signed is required.
    fn acceptor(&self, client_auth: bool) -> tokio_rustls::TlsAcceptor {
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
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    }

    /// A fake gateway on a loopback port: answers each request with `handler`'s status and
    /// JSON body. With `client_auth`, the handshake requires a client certificate this CA
    /// signed.
    pub async fn serve(
        &self,
        client_auth: bool,
        handler: impl Fn(&Request) -> (u16, String) + Send + Sync + 'static,
    ) -> FakeGateway {
        self.serve_raw(client_auth, move |r| {
            let (status, body) = handler(r);
            Reply {
                status,
                content_type: "application/json".into(),
                body: body.into_bytes(),
            }
        })
        .await
    }

    /// [`Self::serve`] with any media type and body.
    pub async fn serve_raw(
        &self,
        client_auth: bool,
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> FakeGateway {
        let acceptor = self.acceptor(client_auth);
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
                    let Reply {
                        status,
                        content_type,
                        body,
                    } = handler(&req);
                    seen.lock().unwrap().push(req);
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = tls.write_all(head.as_bytes()).await;
                    let _ = tls.write_all(&body).await;
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

/// What the fake gateway answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
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

/// What the fake data port holds, shared with the test.
#[derive(Debug, Default)]
pub struct DataPortState {
    /// The disk as the gateway holds it after its complete cycles.
    pub replica: Vec<u8>,
    /// The newest complete cycle and its `EndOfCycle`'s seq.
    pub complete: Option<(u64, u64)>,
    /// The cycle being received and its journaled frames.
    pub receiving: Option<(u64, Vec<ferry_proto::frame::AgentFrame>)>,
    /// Every `Hello` received.
    pub hellos: Vec<ferry_proto::frame::Hello>,
    /// Every complete cycle: (cycle, kind, data frames).
    pub cycles: Vec<(u64, ferry_proto::frame::CycleKind, u64)>,
    /// Close the connection once, right after journaling this seq (before acknowledging it).
    pub drop_after: Option<u64>,
    /// Complete the next cycle without acknowledging its `EndOfCycle` (close instead).
    pub lose_end_ack: bool,
    /// Connections accepted.
    pub connections: u64,
    /// The tags of the newest complete cycle's `EndOfCycle`.
    pub last_tags: Vec<(String, String)>,
}

/// A fake data port: TLS (client certificate required), the HTTP upgrade, then the session
/// rules of `docs/agent-protocol.md` §7 over an in-memory journal; a complete cycle is applied
/// to `replica` and announced with `PointCommitted`.
pub struct FakeDataPort {
    pub port: u16,
    pub state: Arc<Mutex<DataPortState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDataPort {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The point id the fake data port gives cycle `c`.
pub fn point_id(c: u64) -> String {
    format!("20260101T000000.000Z-{c:08x}")
}

impl TestCa {
    pub async fn data_port(&self) -> FakeDataPort {
        let acceptor = self.acceptor(true);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state: Arc<Mutex<DataPortState>> = Arc::default();
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                shared.lock().unwrap().connections += 1;
                // One connection at a time: the agent never opens two for a disk.
                data_session(tls, &shared).await;
            }
        });
        FakeDataPort { port, state, task }
    }
}

async fn data_session<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    state: &Mutex<DataPortState>,
) {
    use ferry_proto::frame::{
        self, Ack, AgentFrame, CycleKind, Decoded, GatewayFrame, Limits, PointCommitted, Welcome,
    };
    // The upgrade.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(
        head.starts_with("GET /api/v1/replication HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.contains("\r\nUpgrade: ferry-replication/1\r\n"),
        "{head}"
    );
    let _ = s
        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ferry-replication/1\r\nConnection: Upgrade\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let next = async |s: &mut S, buf: &mut Vec<u8>| -> Option<AgentFrame> {
        loop {
            match frame::decode_agent(buf, &Limits::default()).unwrap() {
                Decoded::Frame(f, n) => {
                    buf.drain(..n);
                    return Some(f);
                }
                Decoded::NeedMore(_) => {
                    let mut b = [0u8; 65536];
                    let n = s.read(&mut b).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    buf.extend_from_slice(&b[..n]);
                }
            }
        }
    };
    let send = async |s: &mut S, f: GatewayFrame| {
        let mut out = Vec::new();
        frame::encode_gateway(&f, &mut out).unwrap();
        let _ = s.write_all(&out).await;
    };
    let Some(AgentFrame::Hello(hello)) = next(&mut s, &mut buf).await else {
        return;
    };
    assert_eq!(hello.agent, "web-01");
    let resume = {
        let mut st = state.lock().unwrap();
        st.hellos.push(hello.clone());
        match (&st.complete, &st.receiving) {
            (Some((c, end)), _) if *c == hello.cycle => Some(*end),
            (_, Some((c, frames))) if *c == hello.cycle => Some(frames.len() as u64),
            _ => {
                st.receiving = Some((hello.cycle, Vec::new()));
                Some(0)
            }
        }
    };
    let resume = resume.unwrap();
    send(
        &mut s,
        GatewayFrame::Welcome(Welcome {
            version: 1,
            resume_from_seq: resume,
        }),
    )
    .await;
    let done = state
        .lock()
        .unwrap()
        .complete
        .is_some_and(|(c, _)| c == hello.cycle);
    if done {
        send(
            &mut s,
            GatewayFrame::PointCommitted(PointCommitted {
                cycle: hello.cycle,
                point_id: point_id(hello.cycle),
            }),
        )
        .await;
        return;
    }
    while let Some(f) = next(&mut s, &mut buf).await {
        let seq = f.seq().expect("a data frame");
        let (close, end) = {
            let mut st = state.lock().unwrap();
            let (_, frames) = st.receiving.as_mut().unwrap();
            assert_eq!(seq, frames.len() as u64 + 1, "out of sequence");
            frames.push(f.clone());
            let end = matches!(f, AgentFrame::EndOfCycle(_));
            if end {
                let (cycle, frames) = st.receiving.take().unwrap();
                let size = usize::try_from(hello.disk_size).unwrap();
                if hello.cycle_kind == CycleKind::Initial {
                    st.replica = vec![0; size];
                }
                st.replica.resize(size, 0);
                let cs = hello.chunk_size as usize;
                for f in &frames {
                    match f {
                        AgentFrame::Chunk(c) => {
                            let at = usize::try_from(c.index).unwrap() * cs;
                            st.replica[at..at + c.bytes.len()].copy_from_slice(&c.bytes);
                        }
                        AgentFrame::Zero(z) => {
                            let from = usize::try_from(z.first_index).unwrap() * cs;
                            let to = (from + usize::try_from(z.count).unwrap() * cs).min(size);
                            st.replica[from..to].fill(0);
                        }
                        AgentFrame::EndOfCycle(e) => st.last_tags.clone_from(&e.tags),
                        _ => {}
                    }
                }
                st.complete = Some((cycle, seq));
                st.cycles
                    .push((cycle, hello.cycle_kind, frames.len() as u64 - 1));
            }
            let close = if st.drop_after == Some(seq) {
                st.drop_after = None;
                true
            } else if end && st.lose_end_ack {
                st.lose_end_ack = false;
                true
            } else {
                false
            };
            (close, end)
        };
        if close {
            return;
        }
        send(&mut s, GatewayFrame::Ack(Ack { seq })).await;
        if end {
            send(
                &mut s,
                GatewayFrame::PointCommitted(PointCommitted {
                    cycle: hello.cycle,
                    point_id: point_id(hello.cycle),
                }),
            )
            .await;
            return;
        }
    }
}

/// Writes an enrollment of `agent` signed by `ca` into `dir`, naming `gateway`.
pub fn enroll_into(ca: &TestCa, dir: &std::path::Path, agent: &str, gateway: &str) {
    use crate::state::{AgentFile, Enrollment, FORMAT_VERSION, Files, StateDir};
    let id = crate::identity::Identity::generate().unwrap();
    let resp = ca.answer(agent, &id.csr_pem("host").unwrap(), 30);
    let issued = crate::identity::check_issued(&resp, &id, ca.fingerprint()).unwrap();
    let e = Enrollment {
        file: AgentFile {
            version: FORMAT_VERSION,
            gateway: gateway.into(),
            agent: agent.into(),
            enrolled: "2026-01-02T03:04:05Z".into(),
            hostname: "host".into(),
            ca_sha256: issued.ca_sha256.to_string(),
            certificate_sha256: issued.certificate_sha256.to_string(),
            certificate_expires: issued.certificate_expires,
            files: Files::default(),
            items: Some(issued.items),
            disk: Vec::new(),
            replication: crate::disks::ReplicationConfig::default(),
            failover: crate::disks::FailoverConfig::default(),
        },
        key_pem: id.private_key_pem(),
        certificate_pem: issued.certificate_pem,
        ca_pem: issued.ca_pem,
    };
    let st = StateDir::new(dir);
    st.prepare(false).unwrap().commit(&e, false).unwrap();
}
