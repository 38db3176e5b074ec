//! Replication end to end: the real `ferryd up` (API and data port on port 0), an agent enrolled
//! with the real `ferry-agent`, and sessions on the data port spoken frame by frame with the
//! agent's certificate, as `docs/agent-protocol.md` describes them.
//!
//! `data_port_journals_resumes_and_refuses` walks one disk through an initial cycle cut short
//! (acks only after the journal's fsync, resume from the last durable frame after a
//! disconnect and after `kill -9` of `ferryd`), then a delta cycle, and checks each recovery
//! point bit-exact against the bytes sent. Every refusal the protocol names is provoked —
//! out-of-order and forged sequence numbers, a chunk past the end of the disk, another agent's
//! or an unknown item, a `Hello` contradicting the disk's geometry or its cycles, an oversize
//! frame, a future protocol version, garbage, a session that sends nothing, no or a revoked
//! certificate — and after each the gateway still resumes from the same frame: nothing of a
//! refused frame was applied.
//!
//! Build first: `cargo build -p ferry-daemon -p ferry-cli -p ferry-agent`.

// Offsets of a 1 MiB test disk.
#![allow(clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_e2e::daemon::Daemon;
use ferry_e2e::{ferry_agent_bin, ferry_bin, sha256_file};
use ferry_proto::frame::{
    self, AgentFrame, Chunk, Consistency, CycleKind, Decoded, EndOfCycle, GatewayFrame, Hello,
    Snapshot, Zero, error_code,
};
use ferry_store::{Backend, ExportOptions, OpenOptions, PointSelector, Progress, Secret, Vault};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const CS: u32 = 64 << 10;
const CHUNKS: u64 = 16;
const DISK: u64 = CHUNKS * CS as u64;

/// Settings every replication test gives `ferryd`: this machine's disk may be fuller than
/// Site Recovery's 25% critical threshold, which is not what these tests are about.
pub const ENV: &[(&str, &str)] = &[
    ("FERRY_PROCESS__CACHE__CRITICAL_FREE_PERCENT", "0"),
    ("FERRY_PROCESS__CACHE__WARN_FREE_PERCENT", "0"),
    ("FERRY_PROCESS__IDLE_TIMEOUT_SECS", "5"),
];

fn run(mut c: Command) -> (i32, String, String) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        if k.starts_with("FERRY_") && k != "FERRY_AGENT_DIR" && k != "FERRY_CONFIG_DIR" {
            c.env_remove(k);
        }
    }
    let o = c.stdin(Stdio::null()).output().expect("run the command");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A site: `ferryd` with a logged-in `ferry` CLI.
pub struct Site {
    pub dir: PathBuf,
    pub data: PathBuf,
    pub daemon: Option<Daemon>,
    home: PathBuf,
    /// Fixed (API, data) ports across restarts, or (0, 0) for new ones each time.
    ports: (u16, u16),
    /// `ferryd`'s environment: [`ENV`] and what a test adds.
    env: Vec<(&'static str, &'static str)>,
}

impl Site {
    /// Starts `ferryd` on `dir/data` and logs the CLI in.
    pub fn start(dir: &Path) -> Site {
        Self::start_at(dir, (0, 0))
    }

    /// [`Site::start`] with `ferryd` on fixed ports, kept across restarts.
    pub fn start_at(dir: &Path, ports: (u16, u16)) -> Site {
        Self::start_with(dir, ports, &[])
    }

    /// [`Site::start_at`] with more environment for `ferryd` (configuration keys).
    pub fn start_with(dir: &Path, ports: (u16, u16), env: &[(&'static str, &'static str)]) -> Site {
        let data = dir.join("data");
        let home = dir.join("home");
        std::fs::create_dir_all(&home).unwrap();
        let mut s = Site {
            dir: dir.to_path_buf(),
            data,
            daemon: None,
            home,
            ports,
            env: ENV.iter().chain(env).copied().collect(),
        };
        s.restart();
        s
    }

    /// (Re)starts `ferryd` on the same data directory (new ports) and logs in again.
    pub fn restart(&mut self) {
        self.daemon = None;
        let d = Daemon::start_at(&self.data, &self.env, self.ports.0, self.ports.1);
        let fp = d
            .stdout()
            .lines()
            .find_map(|l| l.trim().strip_prefix("CA fingerprint: SHA256 "))
            .expect("fingerprint")
            .to_string();
        let url = d.url("");
        self.daemon = Some(d);
        let tf = self.data.join("admin-token");
        self.ferry_ok(&[
            "login",
            &url,
            "--token-file",
            tf.to_str().unwrap(),
            "--ca-fingerprint",
            &fp,
        ]);
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("running")
    }

    pub fn data_port(&self) -> u16 {
        self.daemon()
            .data_port
            .expect("the process role's data port")
    }

    /// `kill -9` of `ferryd`.
    pub fn kill(&mut self) {
        if let Some(d) = self.daemon.take() {
            drop(d); // Drop kills with SIGKILL.
        }
    }

    pub fn ferry(&self, args: &[&str]) -> (i32, String, String) {
        let mut c = Command::new(ferry_bin());
        c.args(args)
            .env("HOME", &self.home)
            .env("FERRY_CONFIG_DIR", self.home.join("cfg"));
        run(c)
    }

    pub fn ferry_ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.ferry(args);
        assert_eq!(code, 0, "ferry {}: {out}{err}", args.join(" "));
        out
    }

    /// Enrolls agent `name` for `items` into state directory `state` with the real
    /// `ferry-agent`.
    pub fn enroll(&self, name: &str, items: &[&str], state: &Path) {
        self.enroll_with(name, items, state, &[]);
    }

    /// [`Site::enroll`] with `extra` arguments for `ferry-agent enroll` (`--disk …`).
    pub fn enroll_with(&self, name: &str, items: &[&str], state: &Path, extra: &[&str]) {
        let mut args = vec!["agent", "token", "create", name];
        for i in items {
            args.extend(["--item", i]);
        }
        let out = self.ferry_ok(&args);
        let line = out
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("FERRY_AGENT_TOKEN="))
            .expect("the enroll command");
        let mut words = line.split_whitespace();
        let token = words
            .next()
            .unwrap()
            .strip_prefix("FERRY_AGENT_TOKEN=")
            .unwrap();
        assert_eq!(words.next(), Some("ferry-agent"));
        let mut c = Command::new(ferry_agent_bin());
        c.args(words).args(extra).env("FERRY_AGENT_DIR", state);
        let c_token = token.to_string();
        let (code, out, err) = {
            for (k, _) in std::env::vars_os() {
                let k = k.to_string_lossy().to_string();
                if k.starts_with("FERRY_") {
                    c.env_remove(k);
                }
            }
            let o = c
                .env("FERRY_AGENT_DIR", state)
                .env("FERRY_AGENT_TOKEN", c_token)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            (
                o.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        };
        assert_eq!(code, 0, "enroll: {out}{err}");
    }

    /// The vault of the site, opened beside `ferryd` (the bucket is the truth).
    pub async fn vault(&self) -> Vault {
        let key = std::fs::read(self.data.join("vault.key")).unwrap();
        Vault::open(
            Backend::open(self.data.join("vault").to_str().unwrap(), &vec![], false).unwrap(),
            &Secret::KeyFile(key),
            OpenOptions::new(self.dir.join(format!("idx-{}", rand::random::<u32>()))),
        )
        .await
        .expect("open the site's vault")
    }
}

/// Exports point `id` of `item` and returns its SHA-256.
pub async fn point_sha(site: &Site, item: &str, id: &str) -> String {
    let v = site.vault().await;
    let out = site.dir.join(format!("export-{id}.img"));
    v.export(
        ExportOptions {
            item: item.into(),
            point: PointSelector::Id(id.into()),
            disk: None,
            out: out.clone(),
            overwrite: true,
            sync: false,
        },
        Arc::new(Progress::default()),
    )
    .await
    .unwrap_or_else(|e| panic!("export {item} {id}: {e}"));
    let sha = sha256_file(&out);
    std::fs::remove_file(&out).unwrap();
    sha
}

/// A raw session on the data port, with an agent's identity.
struct Raw {
    s: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

fn tls(state: Option<&Path>, ca: &Path) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder().with_root_certificates(roots);
    let cfg = match state {
        Some(dir) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(dir.join("agent.crt"))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
            let key = PrivateKeyDer::from_pem_file(dir.join("agent.key")).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    TlsConnector::from(Arc::new(cfg))
}

/// Connects and asks for the upgrade; the HTTP status and, if not 101, the body.
async fn upgrade(port: u16, state: Option<&Path>, ca: &Path, headers: &str) -> (u16, String, Raw) {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut s = tls(state, ca)
        .connect(
            ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into()),
            tcp,
        )
        .await
        .expect("TLS with the gateway");
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n",
        frame::REPLICATION_PATH
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut b = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut b))
            .await
            .expect("an answer")
            .unwrap();
        assert!(
            n > 0,
            "closed before answering: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&b[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut rest = buf[head_end..].to_vec();
    if status != 101 {
        // A JSON body follows (Content-Length).
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        while rest.len() < len {
            let mut b = [0u8; 4096];
            let n = s.read(&mut b).await.unwrap();
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&b[..n]);
        }
        return (
            status,
            String::from_utf8_lossy(&rest).into_owned(),
            Raw { s, buf: Vec::new() },
        );
    }
    (status, String::new(), Raw { s, buf: rest })
}

const UPGRADE: &str = "Connection: Upgrade\r\nUpgrade: ferry-replication/1\r\n";

impl Raw {
    async fn open(port: u16, state: &Path) -> Raw {
        let (status, body, raw) = upgrade(port, Some(state), &state.join("ca.pem"), UPGRADE).await;
        assert_eq!(status, 101, "{body}");
        raw
    }

    async fn send(&mut self, f: &AgentFrame) {
        let mut out = Vec::new();
        frame::encode_agent(f, &mut out).unwrap();
        self.send_raw(&out).await;
    }

    async fn send_raw(&mut self, b: &[u8]) {
        // The gateway may have closed already (after an Error): what it said is read next.
        let _ = self.s.write_all(b).await;
        let _ = self.s.flush().await;
    }

    /// The next frame, `None` when the gateway closed.
    async fn recv(&mut self) -> Option<GatewayFrame> {
        loop {
            match frame::decode_gateway(&self.buf, &frame::Limits::protocol()).unwrap() {
                Decoded::Frame(f, n) => {
                    self.buf.drain(..n);
                    return Some(f);
                }
                Decoded::NeedMore(_) => {}
            }
            let mut b = vec![0u8; 64 << 10];
            let n = tokio::time::timeout(Duration::from_secs(30), self.s.read(&mut b))
                .await
                .expect("the gateway answers within 30 s")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&b[..n]);
        }
    }

    /// Receives until an `Error`; its code.
    async fn error_code(&mut self) -> String {
        loop {
            match self.recv().await {
                Some(GatewayFrame::Error(e)) => return e.code,
                Some(_) => {}
                None => panic!("closed without an Error frame"),
            }
        }
    }

    /// Receives acks until `seq` is acknowledged.
    async fn acked(&mut self, seq: u64) {
        loop {
            match self.recv().await {
                Some(GatewayFrame::Ack(a)) if a.seq >= seq => return,
                Some(GatewayFrame::Ack(_)) => {}
                other => panic!("waiting for Ack({seq}): {other:?}"),
            }
        }
    }
}

fn hello(cycle: u64, kind: CycleKind, last_acked: u64) -> Hello {
    Hello {
        version: frame::VERSION,
        agent: "agent-1".into(),
        item: "web-01".into(),
        disk: "os".into(),
        disk_size: DISK,
        chunk_size: CS,
        cycle,
        cycle_kind: kind,
        last_acked_seq: last_acked,
    }
}

fn chunk(seq: u64, index: u64, data: &[u8]) -> AgentFrame {
    AgentFrame::Chunk(Chunk {
        seq,
        index,
        bytes: Bytes::copy_from_slice(data),
    })
}

fn end(seq: u64) -> AgentFrame {
    AgentFrame::EndOfCycle(EndOfCycle {
        seq,
        consistency: Consistency::Crash,
        snapshot: Snapshot::None,
        tags: vec![("test".into(), "replication".into())],
    })
}

/// Opens a session with `h`; the `Welcome`'s `resume_from_seq`.
async fn welcome(port: u16, state: &Path, h: Hello) -> (Raw, u64) {
    let mut r = Raw::open(port, state).await;
    r.send(&AgentFrame::Hello(h)).await;
    match r.recv().await {
        Some(GatewayFrame::Welcome(w)) => (r, w.resume_from_seq),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// A `Hello` answered by `Error`: its code.
async fn refused_hello(port: u16, state: &Path, h: Hello) -> String {
    let mut r = Raw::open(port, state).await;
    r.send(&AgentFrame::Hello(h)).await;
    r.error_code().await
}

fn sha(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

fn pattern(index: u64, round: u8) -> Vec<u8> {
    (0..CS as usize)
        .map(|i| (i as u64 * 31 + index * 7 + u64::from(round) * 13) as u8 | 1)
        .collect()
}

/// CRC-32C (Castagnoli), to forge frames the codec would never write.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Re-checksums a frame's header after its bytes 0..12 were changed.
fn reseal(f: &mut [u8]) {
    let c = crc32c(&f[..12]);
    f[12..16].copy_from_slice(&c.to_le_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_port_journals_resumes_and_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let mut site = Site::start(tmp.path());
    for item in ["web-01", "db-01"] {
        site.ferry_ok(&["item", "create", item, "--disk", "os=1M", "--wait"]);
    }
    let state = tmp.path().join("agent");
    site.enroll("agent-1", &["web-01"], &state);
    let port = site.data_port();
    let ca = state.join("ca.pem");

    // HTTP refusals before any frame.
    let (st, body, _) = upgrade(port, None, &ca, UPGRADE).await;
    assert_eq!(st, 401, "{body}");
    assert!(body.contains("client_certificate_required"), "{body}");
    let (st, body, _) = upgrade(port, Some(&state), &ca, "").await;
    assert_eq!(st, 426, "{body}");
    assert!(body.contains("upgrade_required"), "{body}");

    // The image the agent replicates: chunks 0..8 data, the rest zero.
    let mut image = vec![0u8; DISK as usize];
    let (mut r, from) = welcome(port, &state, hello(1, CycleKind::Initial, 0)).await;
    assert_eq!(from, 0);
    for i in 0..8u64 {
        let d = pattern(i, 1);
        image[(i * u64::from(CS)) as usize..][..CS as usize].copy_from_slice(&d);
        r.send(&chunk(i + 1, i, &d)).await;
    }
    r.send(&AgentFrame::Zero(Zero {
        seq: 9,
        first_index: 8,
        count: 8,
    }))
    .await;
    r.acked(9).await;
    drop(r);

    // Resume after a disconnect: from the last durable frame.
    let (mut r, from) = welcome(port, &state, hello(1, CycleKind::Initial, 9)).await;
    assert_eq!(from, 9);
    // Out of order (a gap), a duplicate, a chunk past the disk: refused, nothing applied.
    r.send(&chunk(11, 0, &pattern(0, 9))).await;
    assert_eq!(r.error_code().await, error_code::OUT_OF_SEQUENCE);
    let (mut r, from) = welcome(port, &state, hello(1, CycleKind::Initial, 9)).await;
    assert_eq!(from, 9, "the refused frame was not applied");
    r.send(&chunk(9, 0, &pattern(0, 9))).await;
    assert_eq!(r.error_code().await, error_code::OUT_OF_SEQUENCE);
    let (mut r, _) = welcome(port, &state, hello(1, CycleKind::Initial, 9)).await;
    r.send(&chunk(10, CHUNKS, &pattern(0, 9))).await;
    assert_eq!(r.error_code().await, error_code::OUT_OF_RANGE);
    let (mut r, _) = welcome(port, &state, hello(1, CycleKind::Initial, 9)).await;
    r.send(&chunk(10, 3, &pattern(0, 9)[..100])).await;
    assert_eq!(
        r.error_code().await,
        error_code::OUT_OF_RANGE,
        "a short chunk"
    );

    // Frames the codec refuses: oversize for the session's chunk size, a future version,
    // garbage, a data frame first.
    let (mut r, _) = welcome(port, &state, hello(1, CycleKind::Initial, 9)).await;
    let mut big = Vec::new();
    frame::encode_agent(&chunk(10, 0, &vec![1u8; 2 * CS as usize]), &mut big).unwrap();
    r.send_raw(&big[..frame::HEADER_LEN]).await;
    assert_eq!(r.error_code().await, error_code::BAD_FRAME, "oversize");
    let mut r = Raw::open(port, &state).await;
    let mut h = Vec::new();
    frame::encode_agent(&AgentFrame::Hello(hello(1, CycleKind::Initial, 9)), &mut h).unwrap();
    h[2] = 2;
    reseal(&mut h);
    r.send_raw(&h).await;
    assert_eq!(r.error_code().await, error_code::UNSUPPORTED_VERSION);
    let mut r = Raw::open(port, &state).await;
    r.send_raw(b"GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(r.error_code().await, error_code::BAD_FRAME, "garbage");
    let mut r = Raw::open(port, &state).await;
    r.send(&chunk(10, 0, &pattern(0, 9))).await;
    assert_eq!(
        r.error_code().await,
        error_code::BAD_FRAME,
        "no Hello first"
    );

    // Hellos the gateway refuses: another agent's name, another item, an unknown disk, the
    // wrong geometry, a cycle it cannot hold, acknowledged frames it does not have.
    let mut other = hello(1, CycleKind::Initial, 9);
    other.agent = "agent-2".into();
    assert_eq!(
        refused_hello(port, &state, other).await,
        error_code::FORBIDDEN
    );
    let mut other = hello(1, CycleKind::Initial, 0);
    other.item = "db-01".into();
    assert_eq!(
        refused_hello(port, &state, other).await,
        error_code::FORBIDDEN
    );
    let mut other = hello(1, CycleKind::Initial, 0);
    other.disk = "data".into();
    assert_eq!(
        refused_hello(port, &state, other).await,
        error_code::UNKNOWN_ITEM
    );
    let mut other = hello(1, CycleKind::Initial, 9);
    other.disk_size = DISK * 2;
    assert_eq!(
        refused_hello(port, &state, other).await,
        error_code::BAD_SESSION
    );
    assert_eq!(
        refused_hello(port, &state, hello(1, CycleKind::Initial, 12)).await,
        error_code::BAD_SESSION,
        "acknowledged frames the gateway does not hold"
    );
    // A session that sends nothing is ended as stalled (idle timeout 5 s).
    let mut r = Raw::open(port, &state).await;
    assert_eq!(r.error_code().await, error_code::STALLED);

    // kill -9 of ferryd with the cycle half received: the journal keeps every acked frame.
    site.kill();
    site.restart();
    let port = site.data_port();
    let (mut r, from) = welcome(port, &state, hello(1, CycleKind::Initial, 9)).await;
    assert_eq!(from, 9, "every acknowledged frame survived kill -9");
    r.send(&end(10)).await;
    r.acked(10).await;
    let p1 = match r.recv().await {
        Some(GatewayFrame::PointCommitted(p)) => {
            assert_eq!(p.cycle, 1);
            p.point_id
        }
        other => panic!("expected PointCommitted, got {other:?}"),
    };
    assert_eq!(point_sha(&site, "web-01", &p1).await, sha(&image));

    // A delta cycle: one chunk rewritten, one zeroed.
    let (mut r, from) = welcome(port, &state, hello(2, CycleKind::Delta, 0)).await;
    assert_eq!(from, 0);
    let d = pattern(3, 2);
    image[(3 * CS) as usize..][..CS as usize].copy_from_slice(&d);
    image[(5 * CS) as usize..][..CS as usize].fill(0);
    r.send(&chunk(1, 3, &d)).await;
    r.send(&AgentFrame::Zero(Zero {
        seq: 2,
        first_index: 5,
        count: 1,
    }))
    .await;
    r.send(&end(3)).await;
    r.acked(3).await;
    let p2 = match r.recv().await {
        Some(GatewayFrame::PointCommitted(p)) => p.point_id,
        other => panic!("expected PointCommitted, got {other:?}"),
    };
    assert_ne!(p1, p2);
    assert_eq!(point_sha(&site, "web-01", &p2).await, sha(&image));
    // The first point is unchanged.
    let mut first = image.clone();
    first[(3 * CS) as usize..][..CS as usize].copy_from_slice(&pattern(3, 1));
    first[(5 * CS) as usize..][..CS as usize].copy_from_slice(&pattern(5, 1));
    assert_eq!(point_sha(&site, "web-01", &p1).await, sha(&first));

    // The agent missed the last ack: a Hello for the complete cycle learns it is complete
    // (and which point it became); an older cycle is refused.
    let (mut r, from) = welcome(port, &state, hello(2, CycleKind::Delta, 1)).await;
    assert_eq!(from, 3);
    match r.recv().await {
        Some(GatewayFrame::PointCommitted(p)) => assert_eq!((p.cycle, p.point_id), (2, p2.clone())),
        other => panic!("expected PointCommitted, got {other:?}"),
    }
    assert_eq!(
        refused_hello(port, &state, hello(1, CycleKind::Initial, 0)).await,
        error_code::BAD_SESSION
    );
    // After a restart the vault answers for drained cycles (their journals are gone).
    site.restart();
    let port = site.data_port();
    let (_r, from) = welcome(port, &state, hello(2, CycleKind::Delta, 3)).await;
    assert_eq!(from, 3);

    // The operator's view.
    let show = site.ferry_ok(&["item", "show", "web-01", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(v["state"], "protected", "{v}");
    assert_eq!(v["replication"]["backlog_bytes"], 0, "{v}");

    // A journal damaged beyond a torn tail (here: its first record) loses acknowledged
    // frames: ferryd still starts, sets the journal aside and marks the item for resync; the
    // agent's Hello is told its acknowledged frames are gone.
    let (mut r, _) = welcome(port, &state, hello(3, CycleKind::Delta, 0)).await;
    r.send(&chunk(1, 0, &pattern(0, 3))).await;
    r.send(&chunk(2, 1, &pattern(1, 3))).await;
    r.acked(2).await;
    drop(r);
    site.kill();
    let seg = site
        .data
        .join("process/journal/web-01/os/3/00000000000000000000.seg");
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[32 + 16 + 20] ^= 0xFF;
    std::fs::write(&seg, &bytes).unwrap();
    site.restart();
    let port = site.data_port();
    assert!(
        std::fs::read_dir(site.data.join("process/damaged"))
            .unwrap()
            .count()
            == 1,
        "the damaged journal is set aside"
    );
    assert_eq!(
        refused_hello(port, &state, hello(3, CycleKind::Delta, 2)).await,
        error_code::BAD_SESSION
    );
    let show = site.ferry_ok(&["item", "show", "web-01", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(v["state"], "resync-required", "{v}");

    // A revoked agent is refused before any frame.
    site.ferry_ok(&["agent", "revoke", "agent-1"]);
    let (st, body, _) = upgrade(port, Some(&state), &ca, UPGRADE).await;
    assert_eq!(st, 401, "{body}");
    assert!(body.contains("certificate_revoked"), "{body}");
    // Two points exactly: no refused frame or session made one.
    let v = site.vault().await;
    assert_eq!(v.points(Some("web-01")).await.unwrap().len(), 2);
}

/// Sets `[replication]` keys in the agent's `agent.toml` (`data_address` through the fault
/// proxy, short timeouts for the tests).
fn agent_settings(state: &Path, proxy_port: u16) {
    let p = state.join("agent.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    let keys = format!(
        "data_address = \"127.0.0.1:{proxy_port}\"\nack_timeout_seconds = 3\ncommit_timeout_seconds = 30\n"
    );
    let text = if text.contains("\n[replication]\n") {
        text.replacen("\n[replication]\n", &format!("\n[replication]\n{keys}"), 1)
    } else {
        format!("{text}\n[replication]\n{keys}")
    };
    std::fs::write(&p, text).unwrap();
}

fn agent_cmd(state: &Path) -> Command {
    let mut c = Command::new(ferry_agent_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FERRY_") {
            c.env_remove(k);
        }
    }
    c.args([
        "sync",
        "--once",
        "--output",
        "json",
        "--commit-timeout",
        "30",
    ])
    .env("FERRY_AGENT_DIR", state)
    .stdin(Stdio::null());
    c
}

/// The JSON lines `ferry-agent sync --once --output json` printed.
fn sync_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `ferry-agent sync --once`, which must commit a point: (cycle kind, point id).
fn sync_committed(state: &Path) -> (String, String) {
    let o = agent_cmd(state).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "sync --once: {out}{err}");
    let l = sync_lines(&out);
    assert_eq!(l.len(), 1, "{out}");
    assert_eq!(l[0]["status"], "committed", "{out}{err}");
    (
        l[0]["kind"].as_str().unwrap().to_string(),
        l[0]["point_id"].as_str().unwrap().to_string(),
    )
}

/// Real writes into the image: `dd conv=notrunc` of `n` 64 KiB blocks of random data at
/// seeded offsets in the file system's first 60 MiB.
fn dd_writes(img: &Path, src: &Path, n: u64, seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let seek = 16 + x % 944; // 64 KiB blocks, past the superblock, inside 60 MiB
        let skip = (x >> 20) % 64;
        let o = Command::new("dd")
            .arg(format!("if={}", src.display()))
            .arg(format!("of={}", img.display()))
            .args(["bs=64k", "count=1", "conv=notrunc,fsync", "status=none"])
            .arg(format!("seek={seek}"))
            .arg(format!("skip={skip}"))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "dd: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

async fn point_ids(site: &Site) -> std::collections::BTreeSet<String> {
    site.vault()
        .await
        .points(Some("web-01"))
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_replicates_an_ext4_image_through_faults_and_kills() {
    use ferry_e2e::proxy::{Fault, FaultProxy};
    let tmp = tempfile::tempdir().unwrap();
    let mut site = Site::start_at(tmp.path(), (ferry_e2e::free_port(), ferry_e2e::free_port()));
    site.ferry_ok(&[
        "policy",
        "create",
        "fast",
        "--retry-schedule-seconds",
        "1,1,2,2,2",
        "--chunk-size",
        "256K",
    ]);
    let img = tmp.path().join("os.img");
    ferry_e2e::make_ext4(&img, "64M");
    let src = tmp.path().join("random.bin");
    {
        let mut b = vec![0u8; 4 << 20];
        for (i, v) in b.iter_mut().enumerate() {
            *v = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
        }
        std::fs::write(&src, b).unwrap();
    }
    site.ferry_ok(&[
        "item", "create", "web-01", "--disk", "os=64M", "--policy", "fast", "--wait",
    ]);
    let state = tmp.path().join("agent");
    let disk_arg = format!("web-01/os={}", img.display());
    site.enroll_with("agent-1", &["web-01"], &state, &["--disk", &disk_arg]);
    let proxy = FaultProxy::start(site.data_port());
    agent_settings(&state, proxy.port);

    // Initial replication, then a delta after real writes: each point bit-exact.
    let (kind, p) = sync_committed(&state);
    assert_eq!(kind, "initial");
    assert_eq!(point_sha(&site, "web-01", &p).await, sha256_file(&img));
    dd_writes(&img, &src, 8, 1);
    let (kind, p) = sync_committed(&state);
    assert_eq!(kind, "delta");
    assert_eq!(point_sha(&site, "web-01", &p).await, sha256_file(&img));

    // Network faults on the data path: a cut, a reset and a stall in the middle of a frame,
    // a slow link. Each cycle still completes and restores bit-exact.
    for (i, fault) in [
        Fault::CutAfter(300_000),
        Fault::ResetAfter(200_000),
        Fault::StallAfter(150_000),
        Fault::Slow(4 << 20),
    ]
    .into_iter()
    .enumerate()
    {
        dd_writes(&img, &src, 12, 10 + i as u64);
        let before = proxy.accepted.load(std::sync::atomic::Ordering::Relaxed);
        proxy.push(fault);
        let (_, p) = sync_committed(&state);
        assert_eq!(
            point_sha(&site, "web-01", &p).await,
            sha256_file(&img),
            "after {fault:?}"
        );
        let conns = proxy.accepted.load(std::sync::atomic::Ordering::Relaxed) - before;
        if fault != Fault::Slow(4 << 20) {
            assert!(
                conns >= 2,
                "{fault:?}: the agent reconnected ({conns} connections)"
            );
        }
    }

    // kill -9 of the agent or of ferryd at random moments, 20 times. Every point made in a
    // round holds that round's image, reported or not, and the next sync carries on.
    let mut rng_state = 0x5EED_u64;
    let mut rnd = move |n: u64| {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state % n
    };
    let mut kills = (0, 0);
    for round in 0..20u64 {
        let before = point_ids(&site).await;
        dd_writes(&img, &src, 6, 100 + round);
        let want = sha256_file(&img);
        let out_file = tmp.path().join(format!("sync-{round}.out"));
        let mut child = agent_cmd(&state)
            .stdout(std::fs::File::create(&out_file).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(50 + rnd(900)));
        if rnd(2) == 0 {
            let _ = child.kill();
            let _ = child.wait();
            kills.0 += 1;
        } else {
            site.kill();
            site.restart();
            kills.1 += 1;
            // The agent retries on the policy's schedule and finishes (or gives up).
            let t = std::time::Instant::now();
            while child.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(40) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let (_, p) = sync_committed(&state);
        let after = point_ids(&site).await;
        assert!(after.contains(&p));
        for id in after.difference(&before) {
            assert_eq!(
                point_sha(&site, "web-01", id).await,
                want,
                "round {round}: point {id} restores bit-exact"
            );
        }
        // What the killed run reported committed is among them.
        for l in sync_lines(&std::fs::read_to_string(&out_file).unwrap()) {
            if l["status"] == "committed" {
                assert!(
                    after.difference(&before).any(|id| l["point_id"] == **id),
                    "{l}"
                );
            }
        }
    }
    assert!(
        kills.0 > 0 && kills.1 > 0,
        "both victims were killed: {kills:?}"
    );

    // Paused by the operator: the agent sends nothing; resumed: it carries on.
    site.ferry_ok(&["item", "pause", "web-01"]);
    let shown = site.ferry_ok(&["item", "show", "web-01"]);
    assert!(shown.contains("yes, since"), "{shown}");
    dd_writes(&img, &src, 4, 500);
    let before = point_ids(&site).await;
    let l = sync_line(&state);
    assert_eq!(l["status"], "paused", "{l}");
    assert_eq!(point_ids(&site).await, before, "nothing sent while paused");
    site.ferry_ok(&["item", "resume", "web-01"]);
    let (kind, p) = sync_committed(&state);
    assert_eq!(kind, "delta");
    assert_eq!(point_sha(&site, "web-01", &p).await, sha256_file(&img));

    // Tracking lost (the agent's committed digests gone): the resync compares the disk with
    // the replica's digests and sends only the chunks that differ.
    std::fs::remove_file(state.join("disks/web-01/os/digests")).unwrap();
    dd_writes(&img, &src, 3, 600);
    let l = sync_line(&state);
    assert_eq!(
        (&l["status"], &l["kind"]),
        (&"committed".into(), &"resync".into()),
        "{l}"
    );
    assert_eq!(l["resync_compared_chunks"], 256, "{l}");
    let sent = l["resync_sent_chunks"].as_u64().unwrap();
    assert!((1..=3).contains(&sent), "{l}");
    let p = l["point_id"].as_str().unwrap();
    assert_eq!(point_sha(&site, "web-01", p).await, sha256_file(&img));
    // A resync by hand of an unchanged disk: everything compared, nothing sent.
    site.ferry_ok(&["item", "resync", "web-01", "--wait"]);
    let l = sync_line(&state);
    assert_eq!(
        (&l["status"], &l["kind"]),
        (&"committed".into(), &"resync".into()),
        "{l}"
    );
    assert_eq!(
        (&l["resync_compared_chunks"], &l["resync_sent_chunks"]),
        (&256.into(), &0.into()),
        "{l}"
    );
    let p = l["point_id"].as_str().unwrap();
    assert_eq!(point_sha(&site, "web-01", p).await, sha256_file(&img));
    let shown = site.ferry_ok(&["item", "show", "web-01"]);
    assert!(shown.contains("protected"), "{shown}");
}

/// `ferry-agent sync --once` for the one disk: its JSON line.
fn sync_line(state: &Path) -> serde_json::Value {
    let o = agent_cmd(state).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let l = sync_lines(&out);
    assert_eq!(l.len(), 1, "{out}{}", String::from_utf8_lossy(&o.stderr));
    l.into_iter().next().unwrap()
}

/// A cycle larger than the gateway takes in one cycle (`process.cache.max_cycle_bytes`) is
/// refused with `too_large`, naming the key: the agent stops the disk at once instead of
/// sending the same cycle again and again, and no point is made of part of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_larger_than_the_gateway_takes_stops_the_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::start_with(
        tmp.path(),
        (0, 0),
        &[("FERRY_PROCESS__CACHE__MAX_CYCLE_BYTES", "67108864")],
    );
    // 96 MiB of data that does not compress or dedup: more than the 64 MiB a cycle may hold.
    let img = tmp.path().join("big.img");
    let o = Command::new("head")
        .args(["-c", "100663296", "/dev/urandom"])
        .stdout(std::fs::File::create(&img).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success());
    site.ferry_ok(&["item", "create", "web-01", "--disk", "os=96M", "--wait"]);
    let state = tmp.path().join("agent");
    let disk_arg = format!("web-01/os={}", img.display());
    site.enroll_with("agent-1", &["web-01"], &state, &["--disk", &disk_arg]);
    let o = agent_cmd(&state).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    let l = sync_lines(&out);
    assert_eq!(l.len(), 1, "{out}{err}");
    assert_eq!(l[0]["status"], "failed", "{}", l[0]);
    let msg = l[0]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("max_cycle_bytes"), "{msg}");
    assert!(
        !err.contains("event=reconnect"),
        "a refused cycle is not sent again: {err}"
    );
    assert!(!o.status.success());
    assert!(
        point_ids(&site).await.is_empty(),
        "no point of part of a cycle"
    );
    // The item says why.
    let shown = site.ferry_ok(&["item", "show", "web-01"]);
    assert!(shown.contains("max_cycle_bytes"), "{shown}");
}

/// A disk container replicated by the real agent through its source adapter, with change
/// lists from the source's change tracking: an ext4 file system in a monolithicSparse VMDK
/// (`--format auto`, resolved to `vmdk` when the disk is added), changed between cycles with `qemu-io` writes, and a `--changes` command
/// printing the VMware CBT `DiskChangeInfo` of those writes. Each point restores to the
/// virtual disk `qemu-img convert` reads from the VMDK at that moment; a delta reads only the
/// chunks the document lists.
#[tokio::test(flavor = "multi_thread")]
async fn agent_replicates_a_vmdk_with_cbt_change_lists() {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::start(tmp.path());
    let raw = tmp.path().join("os.raw");
    ferry_e2e::make_ext4(&raw, "64M");
    let vmdk = tmp.path().join("os.vmdk");
    let (raw_s, vmdk_s) = (raw.to_str().unwrap(), vmdk.to_str().unwrap());
    ferry_e2e::qemu_img(&["convert", "-f", "raw", "-O", "vmdk", raw_s, vmdk_s]);
    let virtual_sha = || {
        let out = tmp.path().join("virtual.raw");
        let _ = std::fs::remove_file(&out);
        ferry_e2e::qemu_img(&[
            "convert",
            "-f",
            "vmdk",
            "-O",
            "raw",
            vmdk_s,
            out.to_str().unwrap(),
        ]);
        sha256_file(&out)
    };
    let qemu_io = |cmd: &str| {
        let o = Command::new("qemu-io")
            .args(["-f", "vmdk", "-c", cmd, vmdk_s])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "qemu-io {cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    site.ferry_ok(&["item", "create", "web-01", "--disk", "os=64M", "--wait"]);
    let state = tmp.path().join("agent");
    site.enroll_with("agent-1", &["web-01"], &state, &[]);
    let doc = tmp.path().join("cbt.json");
    let changes = format!("cat {}", doc.display());
    let o = Command::new(ferry_agent_bin())
        .args([
            "disk",
            "add",
            "web-01",
            "os",
            vmdk_s,
            "--format",
            "auto",
            "--changes",
            &changes,
        ])
        .env("FERRY_AGENT_DIR", &state)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // `auto` is resolved once, now, and recorded.
    assert!(String::from_utf8_lossy(&o.stdout).contains("format vmdk"));
    let toml = std::fs::read_to_string(state.join("agent.toml")).unwrap();
    assert!(toml.contains("format = \"vmdk\""), "{toml}");

    let (kind, p) = sync_committed(&state);
    assert_eq!(kind, "initial");
    assert_eq!(point_sha(&site, "web-01", &p).await, virtual_sha());

    // Two writes, both in the document: only their chunks are read (the default chunk size
    // is 256 KiB: 256 chunks).
    qemu_io("write -P 0x5a 5M 64k");
    qemu_io("write -P 0xa5 40M 4k");
    std::fs::write(
        &doc,
        r#"{"startOffset": 0, "length": 67108864, "changedArea": [{"start": 5242880, "length": 65536}, {"start": 41943040, "length": 4096}]}"#,
    )
    .unwrap();
    let (line, err) = sync_json(&state);
    assert_eq!(line["status"], "committed", "{line}{err}");
    assert_eq!(line["kind"], "delta");
    assert_eq!(line["change_list"]["ranges"], 2, "{line}");
    assert_eq!(line["change_list"]["read_chunks"], 2, "{line}");
    assert_eq!(line["change_list"]["unlisted_chunks"], 254, "{line}");
    let p = line["point_id"].as_str().unwrap().to_string();
    assert_eq!(point_sha(&site, "web-01", &p).await, virtual_sha());

    // A document that does not parse: reported, and the cycle scans instead.
    qemu_io("write -P 0x11 60M 64k");
    std::fs::write(&doc, "not json").unwrap();
    let (line, err) = sync_json(&state);
    assert_eq!(line["status"], "committed", "{line}{err}");
    let why = line["change_list"]["error"].as_str().unwrap_or_default();
    assert!(why.contains("CBT document"), "{line}");
    assert!(err.contains("event=change_list_failed"), "{err}");
    let p = line["point_id"].as_str().unwrap().to_string();
    assert_eq!(point_sha(&site, "web-01", &p).await, virtual_sha());
}

/// Planned failover with the real agent: writes after the last cycle, `ferry failover
/// planned`, then the agent's next run sends the final cycle (tagged with the job) and runs
/// its `[failover] stop_command`; the job fails over from that cycle, so the failed-over disk
/// is the source's final state bit for bit (nothing written before the failover is lost).
/// The agent then sends nothing more; commit makes the item failed-over.
#[tokio::test(flavor = "multi_thread")]
async fn planned_failover_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::start(tmp.path());
    let img = tmp.path().join("web.img");
    ferry_e2e::make_ext4(&img, "64M");
    site.ferry_ok(&["item", "create", "web-01", "--disk", "os=64M", "--wait"]);
    let state = tmp.path().join("agent");
    let disk_arg = format!("web-01/os={}", img.display());
    site.enroll_with("agent-1", &["web-01"], &state, &["--disk", &disk_arg]);
    let stopped = tmp.path().join("source-stopped");
    let quiesced = tmp.path().join("workload-stopped");
    {
        let p = state.join("agent.toml");
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(
            &p,
            format!(
                "{text}\n[failover]\nquiesce_command = [\"touch\", \"{}\"]\nstop_command = [\"touch\", \"{}\"]\n",
                quiesced.display(),
                stopped.display()
            ),
        )
        .unwrap();
    }
    let (kind, _) = sync_committed(&state);
    assert_eq!(kind, "initial");
    // Writes the last cycle did not carry.
    let src = tmp.path().join("random");
    std::fs::write(
        &src,
        (0..4u32 << 20)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    dd_writes(&img, &src, 8, 42);

    let out = site.ferry_ok(&[
        "failover", "planned", "web-01", "--format", "qcow2", "--output", "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let job = v["job"]["id"].as_str().unwrap().to_string();
    assert_eq!(v["job"]["kind"], "failover");
    // The agent's next run is the final cycle.
    let o = agent_cmd(&state).output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{out}{err}");
    let l = sync_lines(&out);
    assert_eq!(l[0]["status"], "committed", "{out}{err}");
    assert!(
        err.contains("event=final_cycle_sent") && err.contains(&job),
        "{err}"
    );
    assert!(
        err.contains("event=failover_command_ran command=quiesce_command")
            && err.contains("event=failover_command_ran command=stop_command"),
        "{err}"
    );
    assert!(quiesced.exists() && stopped.exists(), "both commands ran");
    assert!(
        err.find("command=quiesce_command") < err.find("event=cycle_start"),
        "the workload is stopped before the final cycle takes its view: {err}"
    );
    let out = site.ferry_ok(&["job", "wait", &job, "--output", "json"]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(j["log"].to_string().contains("final cycle received"), "{j}");
    let item: serde_json::Value =
        serde_json::from_str(&site.ferry_ok(&["item", "show", "web-01", "--output", "json"]))
            .unwrap();
    assert_eq!(item["state"], "failover-pending-commit", "{item}");
    assert_eq!(item["failover"]["mode"], "planned");
    let disk = PathBuf::from(item["failover"]["location"].as_str().unwrap()).join("os.qcow2");
    // Zero data loss: the failed-over disk is the source as it was left.
    ferry_e2e::qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        disk.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    // Nothing more is sent: the item's replication is stopped.
    let o = agent_cmd(&state).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(sync_lines(&out)[0]["status"], "paused", "{out}");
    site.ferry_ok(&["failover", "commit", "web-01", "--wait"]);
    let item: serde_json::Value =
        serde_json::from_str(&site.ferry_ok(&["item", "show", "web-01", "--output", "json"]))
            .unwrap();
    assert_eq!(item["state"], "failed-over", "{item}");
}

/// One agent's `sync --once` as JSON (its single disk's line) and its log.
fn sync_json(state: &Path) -> (serde_json::Value, String) {
    let o = agent_cmd(state).output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    let l = sync_lines(&out);
    assert_eq!(l.len(), 1, "{out}{err}");
    (l[0].clone(), err)
}

fn item_json(site: &Site) -> serde_json::Value {
    serde_json::from_str(&site.ferry_ok(&["item", "show", "web-01", "--output", "json"])).unwrap()
}

/// The whole round trip with the real agents and gateway: replicate from the primary site's
/// agent → planned failover (the recovery site's disk is the source's final state) → commit
/// → the machine runs at the recovery site and 1% of its disk changes → reprotect from the
/// recovery site's agent (a resync against the vault: only differing chunks sent) → more
/// changes replicated back → failback: a planned failover written in place onto the original
/// disk (only differing chunks written) → commit → reprotect from the primary agent again
/// (nothing to send). Every disk is compared bit for bit at each step; the bytes reprotect
/// sent and failback wrote are printed.
#[tokio::test(flavor = "multi_thread")]
async fn failover_reprotect_failback_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::start(tmp.path());
    let a = tmp.path().join("primary.img");
    ferry_e2e::make_ext4(&a, "64M");
    site.ferry_ok(&["item", "create", "web-01", "--disk", "os=64M", "--wait"]);
    let state_p = tmp.path().join("agent-p");
    site.enroll_with(
        "agent-p",
        &["web-01"],
        &state_p,
        &["--disk", &format!("web-01/os={}", a.display())],
    );
    assert_eq!(sync_committed(&state_p).0, "initial");
    let src = tmp.path().join("random");
    std::fs::write(
        &src,
        (0..4u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    dd_writes(&a, &src, 6, 1);

    // Planned failover to the recovery site (raw), then commit.
    let v: serde_json::Value = serde_json::from_str(
        &site.ferry_ok(&["failover", "planned", "web-01", "--output", "json"]),
    )
    .unwrap();
    let job = v["job"]["id"].as_str().unwrap().to_string();
    let (line, err) = sync_json(&state_p);
    assert_eq!(line["status"], "committed", "{line}{err}");
    site.ferry_ok(&["job", "wait", &job]);
    let item = item_json(&site);
    assert_eq!(item["state"], "failover-pending-commit", "{item}");
    let b = PathBuf::from(item["failover"]["location"].as_str().unwrap()).join("os.img");
    assert_eq!(
        sha256_file(&b),
        sha256_file(&a),
        "planned failover lost nothing"
    );
    site.ferry_ok(&["failover", "commit", "web-01", "--wait"]);

    // The machine runs at the recovery site: 10 × 64 KiB written (1% of the disk).
    dd_writes(&b, &src, 10, 2);
    let changed = 10 * (64u64 << 10);
    let state_r = tmp.path().join("agent-r");
    site.enroll_with(
        "agent-r",
        &["web-01"],
        &state_r,
        &["--disk", &format!("web-01/os={}", b.display())],
    );
    site.ferry_ok(&[
        "failover",
        "reprotect",
        "web-01",
        "--agent",
        "agent-r",
        "--wait",
    ]);
    let item = item_json(&site);
    assert_eq!(
        (
            item["state"].as_str(),
            item["direction"].as_str(),
            item["source_agent"].as_str()
        ),
        (
            Some("reprotecting"),
            Some("recovery-to-primary"),
            Some("agent-r")
        ),
        "{item}"
    );
    let (line, err) = sync_json(&state_r);
    assert_eq!(
        (line["status"].as_str(), line["kind"].as_str()),
        (Some("committed"), Some("resync")),
        "{line}{err}"
    );
    let sent = line["chunk_bytes"].as_u64().unwrap();
    let compared = line["resync_compared_chunks"].as_u64().unwrap();
    assert!(
        compared > 0 && line["resync_sent_chunks"].as_u64().unwrap() <= 10,
        "{line}"
    );
    assert_eq!(
        point_sha(&site, "web-01", line["point_id"].as_str().unwrap()).await,
        sha256_file(&b)
    );
    let item = item_json(&site);
    assert_eq!(item["state"], "protected", "{item}");
    // The primary site's agent is not the source now: it sends nothing.
    let (line, _) = sync_json(&state_p);
    assert_eq!(line["status"], "paused", "{line}");
    // More changes at the recovery site, replicated back as a delta.
    dd_writes(&b, &src, 4, 3);
    assert_eq!(sync_committed(&state_r).0, "delta");

    // Failback: a planned failover written in place onto the original disk.
    let v: serde_json::Value = serde_json::from_str(&site.ferry_ok(&[
        "failover",
        "failback",
        "web-01",
        "--in-place",
        &format!("os={}", a.display()),
        "--output",
        "json",
    ]))
    .unwrap();
    let job = v["job"]["id"].as_str().unwrap().to_string();
    let (line, err) = sync_json(&state_r);
    assert_eq!(line["status"], "committed", "{line}{err}");
    let j: serde_json::Value =
        serde_json::from_str(&site.ferry_ok(&["job", "wait", &job, "--output", "json"])).unwrap();
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(
        sha256_file(&a),
        sha256_file(&b),
        "failback: the original disk is the machine's"
    );
    let log = j["log"].to_string();
    let written: u64 = log
        .split(" differed and were written (")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no in-place figures in {log}"));
    site.ferry_ok(&["failover", "commit", "web-01", "--wait"]);
    site.ferry_ok(&[
        "failover",
        "reprotect",
        "web-01",
        "--agent",
        "agent-p",
        "--wait",
    ]);
    let (line, err) = sync_json(&state_p);
    assert_eq!(
        (line["status"].as_str(), line["kind"].as_str()),
        (Some("committed"), Some("resync")),
        "{line}{err}"
    );
    assert_eq!(
        line["resync_sent_chunks"], 0,
        "the original disk already holds the point: {line}"
    );
    let item = item_json(&site);
    assert_eq!(
        (
            item["state"].as_str(),
            item["direction"].as_str(),
            item["source_agent"].as_str()
        ),
        (
            Some("protected"),
            Some("primary-to-recovery"),
            Some("agent-p")
        ),
        "{item}"
    );
    eprintln!(
        "round trip: 1% changed at the recovery site ({changed} bytes); reprotect sent {sent} chunk bytes ({compared} chunks compared); failback wrote {written} bytes in place"
    );
}
