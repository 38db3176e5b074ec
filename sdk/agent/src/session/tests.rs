//! Session tests over `tokio::io::duplex`: the test plays the gateway, decoding the agent's
//! frames with `ferry_proto::frame::decode_agent` and answering with `encode_gateway`, as
//! `docs/agent-protocol.md` §7 says it does. Every check names exact sequence numbers and
//! compares the bytes received with the bytes of the planned frames.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_proto::frame::{
    self, Ack, AgentFrame, Busy, Chunk, Consistency, CycleKind, Decoded, EndOfCycle, ErrorFrame,
    GatewayFrame, Hello, Limits, PointCommitted, Snapshot, Welcome,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use super::*;
use crate::error::{EXIT_REFUSED, EXIT_UNREACHABLE};
use crate::plan::{FrameSource, PlanError};
use crate::progress::{Progress, Style};

const POINT: &str = "20261126T075405.135Z-1c866aa0";
const CYCLE: u64 = 7;

/// Frames from memory: `n` chunks of 100 bytes (chunk `i` filled with `i`), then the
/// `EndOfCycle`.
#[derive(Clone)]
struct VecSource(Arc<Vec<Vec<u8>>>);

impl VecSource {
    fn new(chunks: u64) -> Self {
        let mut frames = Vec::new();
        for seq in 1..=chunks {
            let f = AgentFrame::Chunk(Chunk {
                seq,
                index: seq - 1,
                bytes: Bytes::from(vec![u8::try_from(seq).unwrap(); 100]),
            });
            let mut out = Vec::new();
            frame::encode_agent(&f, &mut out).unwrap();
            frames.push(out);
        }
        let mut out = Vec::new();
        frame::encode_agent(
            &AgentFrame::EndOfCycle(EndOfCycle {
                seq: chunks + 1,
                consistency: Consistency::Crash,
                snapshot: Snapshot::None,
                tags: vec![("ferry.host".into(), "h".into())],
            }),
            &mut out,
        )
        .unwrap();
        frames.push(out);
        Self(Arc::new(frames))
    }

    /// The bytes of frame `seq`.
    fn bytes(&self, seq: u64) -> &[u8] {
        &self.0[usize::try_from(seq - 1).unwrap()]
    }
}

impl FrameSource for VecSource {
    fn last_seq(&self) -> u64 {
        self.0.len() as u64
    }
    fn frame(&self, seq: u64) -> Result<Vec<u8>, PlanError> {
        Ok(self.bytes(seq).to_vec())
    }
}

/// Hands each new connection's far end to the test.
struct Duplexes {
    tx: mpsc::UnboundedSender<DuplexStream>,
}

impl Connect for Duplexes {
    type Io = DuplexStream;
    async fn connect(&mut self) -> Result<Connected<DuplexStream>, SessionError> {
        let (a, b) = tokio::io::duplex(1 << 20);
        self.tx.send(b).map_err(|_| SessionError::Connect {
            addr: "duplex".into(),
            reason: "the test gateway is gone".into(),
        })?;
        Ok(Connected {
            io: a,
            prefix: Vec::new(),
        })
    }
}

/// The gateway's end of one connection.
struct Gw {
    s: DuplexStream,
    buf: Vec<u8>,
}

impl Gw {
    /// The next agent frame and its bytes; `None` when the agent closed.
    async fn next(&mut self) -> Option<(AgentFrame, Vec<u8>)> {
        loop {
            match frame::decode_agent(&self.buf, &Limits::default()).unwrap() {
                Decoded::Frame(f, n) => {
                    let raw: Vec<u8> = self.buf.drain(..n).collect();
                    return Some((f, raw));
                }
                Decoded::NeedMore(_) => {
                    let mut b = [0u8; 4096];
                    let n = self.s.read(&mut b).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    self.buf.extend_from_slice(&b[..n]);
                }
            }
        }
    }

    async fn hello(&mut self) -> Hello {
        match self.next().await {
            Some((AgentFrame::Hello(h), _)) => h,
            other => panic!("expected Hello, got {other:?}"),
        }
    }

    /// The next data frame, checked to be exactly `src`'s frame `seq`.
    async fn expect(&mut self, src: &VecSource, seq: u64) {
        let (f, raw) = self.next().await.expect("a frame");
        assert_eq!(f.seq(), Some(seq), "{f:?}");
        assert_eq!(raw, src.bytes(seq), "frame {seq} bytes");
    }

    /// No frame arrives for `d`.
    async fn quiet(&mut self, d: Duration) {
        if let Ok(f) = tokio::time::timeout(d, self.next()).await {
            panic!("expected nothing, got {f:?}");
        }
    }

    async fn send(&mut self, f: impl Into<GatewayFrame>) {
        let mut out = Vec::new();
        frame::encode_gateway(&f.into(), &mut out).unwrap();
        self.s.write_all(&out).await.unwrap();
    }

    async fn welcome(&mut self, resume_from_seq: u64) {
        self.send(Welcome {
            version: frame::VERSION,
            resume_from_seq,
        })
        .await;
    }

    async fn ack(&mut self, seq: u64) {
        self.send(Ack { seq }).await;
    }

    async fn error(&mut self, code: &str, message: &str) {
        self.send(ErrorFrame {
            code: code.into(),
            message: message.into(),
        })
        .await;
    }
}

fn cfg() -> SessionConfig {
    SessionConfig {
        window_bytes: 1 << 20,
        ack_timeout: Duration::from_secs(10),
        throttle: Throttle::fixed(None),
        retry_schedule: vec![Duration::from_millis(10)],
        max_failures: Some(3),
        busy_min: Duration::from_millis(10),
        busy_max: Duration::from_millis(50),
        retry_in_session: true,
    }
}

fn hello_params() -> HelloParams {
    HelloParams {
        agent: "web-01".into(),
        item: "web".into(),
        disk: "sda".into(),
        disk_size: 1000,
        chunk_size: 65536,
        cycle: CYCLE,
        kind: CycleKind::Delta,
    }
}

type Outcome = (Result<(bool, Commit), SessionError>, SessionState);

/// Runs the agent side in a task; the test gets each connection from the receiver.
fn agent(
    src: &VecSource,
    cfg: SessionConfig,
    state: SessionState,
    stop: Stop,
) -> (
    tokio::task::JoinHandle<Outcome>,
    mpsc::UnboundedReceiver<DuplexStream>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let src = src.clone();
    let h = tokio::spawn(async move {
        let mut c = Duplexes { tx };
        let mut state = state;
        let mut p = Progress::new(Style::Quiet, "web/sda", CYCLE, 0, src.last_seq());
        let r = replicate(
            &mut c,
            &src,
            &hello_params(),
            &cfg,
            &mut state,
            &mut p,
            &stop,
        )
        .await;
        let r = match r {
            Ok(a) => {
                let via = a.via_welcome;
                Ok((via, a.wait_commit(Duration::from_secs(5)).await))
            }
            Err(e) => Err(e),
        };
        (r, state)
    });
    (h, rx)
}

async fn accept(rx: &mut mpsc::UnboundedReceiver<DuplexStream>) -> Gw {
    let s = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the agent connects")
        .expect("a connection");
    Gw { s, buf: Vec::new() }
}

fn state() -> SessionState {
    SessionState::default()
}

#[tokio::test]
async fn welcome_resumes_after_its_seq_and_point_committed_is_reported() {
    let src = VecSource::new(10);
    let (h, mut rx) = agent(&src, cfg(), state(), Stop::never());
    let mut gw = accept(&mut rx).await;
    let hello = gw.hello().await;
    assert_eq!(
        hello,
        Hello {
            version: 1,
            agent: "web-01".into(),
            item: "web".into(),
            disk: "sda".into(),
            disk_size: 1000,
            chunk_size: 65536,
            cycle: CYCLE,
            cycle_kind: CycleKind::Delta,
            last_acked_seq: 0,
        }
    );
    gw.welcome(4).await;
    for seq in 5..=11 {
        gw.expect(&src, seq).await;
        gw.ack(seq).await;
        if seq == 6 {
            // An earlier cycle's point, committed meanwhile: not this cycle's.
            gw.send(PointCommitted {
                cycle: CYCLE - 1,
                point_id: "20261126T000000.000Z-00000006".into(),
            })
            .await;
        }
    }
    gw.send(PointCommitted {
        cycle: CYCLE,
        point_id: POINT.into(),
    })
    .await;
    let (r, st) = h.await.unwrap();
    assert_eq!(r.unwrap(), (false, Commit::Committed(POINT.into())));
    assert_eq!((st.last_acked, st.connections), (11, 1));
}

#[tokio::test]
async fn acks_advance_the_window() {
    let src = VecSource::new(10);
    let frame_len = src.bytes(1).len() as u64;
    let mut c = cfg();
    c.window_bytes = 3 * frame_len;
    let (h, mut rx) = agent(&src, c, state(), Stop::never());
    let mut gw = accept(&mut rx).await;
    gw.hello().await;
    gw.welcome(0).await;
    let q = Duration::from_millis(150);
    for seq in 1..=3 {
        gw.expect(&src, seq).await;
    }
    gw.quiet(q).await;
    gw.ack(1).await;
    gw.expect(&src, 4).await;
    gw.quiet(q).await;
    gw.ack(4).await;
    for seq in 5..=7 {
        gw.expect(&src, seq).await;
    }
    gw.quiet(q).await;
    gw.ack(7).await;
    for seq in 8..=10 {
        gw.expect(&src, seq).await;
    }
    gw.quiet(q).await;
    gw.ack(9).await;
    // The EndOfCycle is smaller: it fits beside frame 10.
    gw.expect(&src, 11).await;
    gw.ack(11).await;
    drop(gw);
    let (r, st) = h.await.unwrap();
    assert!(matches!(r.unwrap(), (false, Commit::NotConfirmed(_))));
    assert_eq!(st.last_acked, 11);
}

#[tokio::test]
async fn busy_makes_it_reconnect_and_resume() {
    let src = VecSource::new(6);
    let (h, mut rx) = agent(&src, cfg(), state(), Stop::never());
    let mut gw = accept(&mut rx).await;
    assert_eq!(gw.hello().await.last_acked_seq, 0);
    gw.welcome(0).await;
    for seq in 1..=3 {
        gw.expect(&src, seq).await;
    }
    gw.ack(2).await;
    gw.send(Busy { retry_after_ms: 20 }).await;
    drop(gw);
    // Busy in answer to Hello.
    let mut gw = accept(&mut rx).await;
    assert_eq!(gw.hello().await.last_acked_seq, 2);
    gw.send(Busy { retry_after_ms: 1 }).await;
    drop(gw);
    // Frame 3 was journaled although its ack was lost: the agent goes on from 4.
    let mut gw = accept(&mut rx).await;
    assert_eq!(gw.hello().await.last_acked_seq, 2);
    gw.welcome(3).await;
    for seq in 4..=7 {
        gw.expect(&src, seq).await;
    }
    gw.ack(7).await;
    gw.send(PointCommitted {
        cycle: CYCLE,
        point_id: POINT.into(),
    })
    .await;
    let (r, st) = h.await.unwrap();
    assert_eq!(r.unwrap(), (false, Commit::Committed(POINT.into())));
    assert_eq!((st.last_acked, st.connections), (7, 3));
}

#[tokio::test]
async fn forbidden_stops_without_retry() {
    let src = VecSource::new(3);
    let (h, mut rx) = agent(&src, cfg(), state(), Stop::never());
    let mut gw = accept(&mut rx).await;
    gw.hello().await;
    gw.error(
        "forbidden",
        "agent `web-01` does not act for protected item `web`",
    )
    .await;
    let (r, st) = h.await.unwrap();
    let e = r.unwrap_err();
    assert!(
        matches!(&e, SessionError::Gateway { code, .. } if code == "forbidden"),
        "{e:?}"
    );
    assert_eq!(e.class(), Class::Fatal);
    assert_eq!(e.exit_code(), EXIT_REFUSED);
    assert!(e.to_string().contains("does not act for"), "{e}");
    assert_eq!(st.connections, 1);
    assert!(rx.try_recv().is_err(), "no second connection");
}

#[tokio::test]
async fn out_of_sequence_reconnects_and_resumes_from_the_last_ack() {
    let src = VecSource::new(5);
    let (h, mut rx) = agent(&src, cfg(), state(), Stop::never());
    let mut gw = accept(&mut rx).await;
    gw.hello().await;
    gw.welcome(0).await;
    gw.expect(&src, 1).await;
    gw.expect(&src, 2).await;
    gw.ack(1).await;
    gw.error("out_of_sequence", "expected seq 2, got 3").await;
    drop(gw);
    let mut gw = accept(&mut rx).await;
    assert_eq!(gw.hello().await.last_acked_seq, 1);
    gw.welcome(1).await;
    for seq in 2..=6 {
        gw.expect(&src, seq).await;
    }
    gw.ack(6).await;
    drop(gw);
    let (r, st) = h.await.unwrap();
    assert!(r.is_ok());
    assert_eq!((st.last_acked, st.connections), (6, 2));
}

#[tokio::test]
async fn no_ack_in_time_reconnects() {
    let src = VecSource::new(4);
    let mut c = cfg();
    c.ack_timeout = Duration::from_millis(200);
    let (h, mut rx) = agent(&src, c, state(), Stop::never());
    let mut gw = accept(&mut rx).await;
    gw.hello().await;
    gw.welcome(0).await;
    for seq in 1..=5 {
        gw.expect(&src, seq).await;
    }
    // Never acknowledged: the agent gives this connection up and comes back.
    let mut gw2 = accept(&mut rx).await;
    assert!(gw.next().await.is_none(), "the first connection is closed");
    assert_eq!(gw2.hello().await.last_acked_seq, 0);
    gw2.welcome(2).await;
    for seq in 3..=5 {
        gw2.expect(&src, seq).await;
    }
    gw2.ack(5).await;
    drop(gw2);
    let (r, st) = h.await.unwrap();
    assert!(r.is_ok());
    assert_eq!((st.last_acked, st.connections), (5, 2));
}

#[tokio::test]
async fn bounded_retries_give_up() {
    let src = VecSource::new(2);
    let mut c = cfg();
    c.max_failures = Some(2);
    let (h, mut rx) = agent(&src, c, state(), Stop::never());
    for _ in 0..3 {
        let mut gw = accept(&mut rx).await;
        gw.hello().await;
        drop(gw);
    }
    let (r, st) = h.await.unwrap();
    let e = r.unwrap_err();
    assert!(
        matches!(&e, SessionError::GaveUp { attempts: 3, .. }),
        "{e:?}"
    );
    assert_eq!(e.exit_code(), EXIT_UNREACHABLE);
    assert!(
        e.to_string()
            .contains("closed the connection before answering Hello"),
        "{e}"
    );
    assert_eq!(st.connections, 3);
}

#[tokio::test]
async fn an_unknown_code_is_transient_and_internal_waits_the_schedule() {
    let src = VecSource::new(1);
    let (h, mut rx) = agent(&src, cfg(), state(), Stop::never());
    let mut gw = accept(&mut rx).await;
    gw.hello().await;
    gw.error("quota_exceeded", "a newer gateway's code").await;
    drop(gw);
    let mut gw = accept(&mut rx).await;
    gw.hello().await;
    gw.error("internal", "journal write failed").await;
    drop(gw);
    let mut gw = accept(&mut rx).await;
    gw.hello().await;
    gw.welcome(0).await;
    gw.expect(&src, 1).await;
    gw.expect(&src, 2).await;
    gw.ack(2).await;
    drop(gw);
    let (r, st) = h.await.unwrap();
    assert!(r.is_ok());
    assert_eq!(st.connections, 3);
}

#[tokio::test]
async fn bad_session_and_lost_acks_ask_for_a_resync() {
    let src = VecSource::new(3);
    let (h, mut rx) = agent(&src, cfg(), state(), Stop::never());
    let mut gw = accept(&mut rx).await;
    gw.hello().await;
    gw.error(
        "bad_session",
        "disk `sda` of `web` is 1000 bytes in chunks of 65536",
    )
    .await;
    let (r, _) = h.await.unwrap();
    assert_eq!(r.unwrap_err().class(), Class::Resync);

    // A Welcome below what was acknowledged: the gateway lost frames.
    let st = SessionState {
        last_acked: 3,
        ..SessionState::default()
    };
    let (h, mut rx) = agent(&src, cfg(), st, Stop::never());
    let mut gw = accept(&mut rx).await;
    assert_eq!(gw.hello().await.last_acked_seq, 3);
    gw.welcome(2).await;
    let (r, _) = h.await.unwrap();
    let e = r.unwrap_err();
    assert!(matches!(e, SessionError::Inconsistent { .. }), "{e:?}");
    assert_eq!(e.class(), Class::Resync);
}

#[tokio::test]
async fn a_fresh_cycle_the_gateway_already_has_frames_of_is_renumbered() {
    let src = VecSource::new(3);
    let st = SessionState {
        fresh: true,
        ..SessionState::default()
    };
    let (h, mut rx) = agent(&src, cfg(), st, Stop::never());
    let mut gw = accept(&mut rx).await;
    gw.hello().await;
    gw.welcome(2).await;
    let (r, _) = h.await.unwrap();
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            SessionError::ForeignCycle {
                cycle: CYCLE,
                resume_from_seq: 2
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_welcome_at_the_end_of_cycle_means_it_is_complete() {
    let src = VecSource::new(3);
    let st = SessionState {
        last_acked: 2,
        ..SessionState::default()
    };
    let (h, mut rx) = agent(&src, cfg(), st, Stop::never());
    let mut gw = accept(&mut rx).await;
    assert_eq!(gw.hello().await.last_acked_seq, 2);
    gw.welcome(4).await;
    gw.quiet(Duration::from_millis(100)).await;
    drop(gw);
    let (r, st) = h.await.unwrap();
    let (via, commit) = r.unwrap();
    assert!(via);
    assert_eq!(
        commit,
        Commit::NotConfirmed(
            "the gateway closed the connection before confirming the point".into()
        )
    );
    assert_eq!(st.last_acked, 4);
}

#[tokio::test]
async fn the_throttle_paces_frame_bytes() {
    let src = VecSource::new(10);
    let total: usize = (1..=11).map(|s| src.bytes(s).len()).sum();
    let mut c = cfg();
    // About 400 ms for the whole cycle.
    c.throttle = Throttle::fixed(Some((total as u64 * 10) / 4));
    let (h, mut rx) = agent(&src, c, state(), Stop::never());
    let mut gw = accept(&mut rx).await;
    gw.hello().await;
    gw.welcome(0).await;
    let t = std::time::Instant::now();
    for seq in 1..=11 {
        gw.expect(&src, seq).await;
        gw.ack(seq).await;
    }
    let took = t.elapsed();
    drop(gw);
    assert!(h.await.unwrap().0.is_ok());
    assert!(took >= Duration::from_millis(300), "{took:?}");
}

#[tokio::test]
async fn a_stop_ends_the_session_after_the_current_frame() {
    let src = VecSource::new(50);
    let mut c = cfg();
    c.window_bytes = 2 * src.bytes(1).len() as u64;
    let (handle, stop) = Stop::new();
    let (h, mut rx) = agent(&src, c, state(), stop);
    let mut gw = accept(&mut rx).await;
    gw.hello().await;
    gw.welcome(0).await;
    gw.expect(&src, 1).await;
    gw.expect(&src, 2).await;
    handle.stop();
    gw.ack(2).await;
    let (r, st) = h.await.unwrap();
    assert!(matches!(r, Err(SessionError::Stopped)), "{r:?}");
    assert!(st.last_acked <= 2);
    // Nothing after the stop but what was already written.
    while let Some((f, _)) = gw.next().await {
        assert!(f.seq().unwrap() <= 4, "{f:?}");
    }
}

#[test]
fn busy_waits_are_clamped_with_jitter() {
    let c = SessionConfig {
        busy_min: Duration::from_secs(1),
        busy_max: Duration::from_secs(600),
        ..cfg()
    };
    for _ in 0..50 {
        let d = c.busy_delay(10);
        assert!(
            d >= Duration::from_secs(1) && d <= Duration::from_millis(1200),
            "{d:?}"
        );
        let d = c.busy_delay(u32::MAX);
        assert!(
            d >= Duration::from_secs(600) && d <= Duration::from_secs(720),
            "{d:?}"
        );
    }
    assert_eq!(c.retry_delay(1), Duration::from_millis(10));
    assert_eq!(c.retry_delay(9), Duration::from_millis(10));
    assert_eq!(
        SessionConfig::schedule_from(&[]).len(),
        DEFAULT_RETRY_SCHEDULE.len()
    );
}

/// A fake data port answering the upgrade request with `answer`.
async fn upgrade_against(answer: &'static [u8]) -> (Result<Vec<u8>, SessionError>, String) {
    let (mut a, mut b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        let mut req = Vec::new();
        let mut byte = [0u8; 1];
        while !req.ends_with(b"\r\n\r\n") {
            b.read_exact(&mut byte).await.unwrap();
            req.push(byte[0]);
        }
        b.write_all(answer).await.unwrap();
        b.shutdown().await.unwrap();
        String::from_utf8(req).unwrap()
    });
    let r = upgrade(&mut a, "gw.example:9443").await;
    (r, server.await.unwrap())
}

#[tokio::test]
async fn the_upgrade_is_asked_by_hand_and_its_refusal_read() {
    let (r, req) = upgrade_against(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ferry-replication/1\r\nConnection: Upgrade\r\n\r\nFR\x01",
    )
    .await;
    assert!(
        req.starts_with(
            "GET /api/v1/replication HTTP/1.1\r\nHost: gw.example:9443\r\nConnection: Upgrade\r\nUpgrade: ferry-replication/1\r\n"
        ),
        "{req}"
    );
    // Bytes after the head are the first frame's: kept.
    assert_eq!(r.unwrap(), b"FR\x01");

    let (r, _) = upgrade_against(
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n{\"code\":\"agent_revoked\",\"message\":\"this agent was removed\"}",
    )
    .await;
    let e = r.unwrap_err();
    assert_eq!(
        e.to_string(),
        "the data port gw.example:9443 refused the replication upgrade: this agent was removed (HTTP 403, code agent_revoked)"
    );
    assert_eq!((e.class(), e.exit_code()), (Class::Fatal, EXIT_REFUSED));

    let (r, _) = upgrade_against(
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nTransfer-Encoding: chunked\r\n\r\n1f\r\n{\"code\":\"too_many_sessions\",\"me\r\n16\r\nssage\":\"not this one\"}\r\n0\r\n\r\n",
    )
    .await;
    let e = r.unwrap_err();
    assert!(
        matches!(&e, SessionError::Upgrade { status: 503, code, message, retry_after_ms: Some(7000), .. } if code == "too_many_sessions" && message == "not this one"),
        "{e:?}"
    );
    assert_eq!(e.class(), Class::Transient { immediate: false });

    let (r, _) = upgrade_against(b"HTTP/1.1 426 Upgrade Required\r\n\r\n").await;
    let e = r.unwrap_err();
    assert!(e.to_string().contains("HTTP 426"), "{e}");
    assert_eq!(e.class(), Class::Fatal);

    let (r, _) = upgrade_against(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n").await;
    assert!(
        r.unwrap_err()
            .to_string()
            .contains("not ferry-replication/1")
    );
    let (r, _) = upgrade_against(b"SSH-2.0-OpenSSH\r\n\r\n").await;
    assert!(r.unwrap_err().to_string().contains("not an HTTP answer"));
}

#[tokio::test]
async fn an_endless_head_is_refused() {
    let (mut a, mut b) = tokio::io::duplex(1 << 16);
    tokio::spawn(async move {
        let mut sink = [0u8; 1024];
        let _ = b.read(&mut sink).await;
        let junk = vec![b'x'; MAX_RESPONSE_HEAD + 10_000];
        let _ = b.write_all(&junk).await;
    });
    let e = upgrade(&mut a, "gw:9443").await.unwrap_err();
    assert!(e.to_string().contains("longer than"), "{e}");
}

#[test]
fn tls_connector_names_the_server_as_the_url_does() {
    let tls = ferry_proto::trust::tls_config(&[]).unwrap();
    let c = TlsConnector::new("[::1]", 9443, tls.clone()).unwrap();
    assert_eq!(c.addr(), "[::1]:9443");
    assert!(matches!(c.server_name, ServerName::IpAddress(_)));
    let c = TlsConnector::new("gw.example", 9443, tls).unwrap();
    assert!(matches!(c.server_name, ServerName::DnsName(_)));
    assert_eq!(c.host, "gw.example");
}

#[tokio::test]
async fn too_large_stops_without_retry() {
    let src = VecSource::new(3);
    let (h, mut rx) = agent(&src, cfg(), state(), Stop::never());
    let mut gw = accept(&mut rx).await;
    gw.hello().await;
    gw.error(
        "too_large",
        "cycle 1 of `web`/`sda` is larger than the gateway takes in one cycle",
    )
    .await;
    let (r, st) = h.await.unwrap();
    let e = r.unwrap_err();
    assert_eq!(e.class(), Class::Fatal, "{e:?}");
    assert!(e.to_string().contains("larger than"), "{e}");
    assert_eq!(st.connections, 1);
    assert!(rx.try_recv().is_err(), "no second connection");
}
