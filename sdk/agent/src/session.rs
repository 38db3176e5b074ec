//! The replication session (`docs/agent-protocol.md` §2, §7): one cycle of one disk sent to
//! the gateway's data port, resumed after any disconnect until its `EndOfCycle` is
//! acknowledged.
//!
//! The transport ([`TlsConnector`]) is TCP to the gateway's host at the plan's data port, TLS
//! with the enrollment's mTLS configuration (the pinned appliance CA, the agent's
//! certificate), then an HTTP/1.1 `GET /api/v1/replication` with `Upgrade:
//! ferry-replication/1`, written by hand and answered `101` ([`upgrade`]); any other answer's
//! JSON error is reported. From then on only frames.
//!
//! The session logic ([`replicate`]) is generic over the connection ([`Connect`]: anything
//! `AsyncRead + AsyncWrite`) and over where frames come from ([`FrameSource`]), so tests drive
//! it over `tokio::io::duplex` with a scripted gateway. Per connection: `Hello`, `Welcome`,
//! then frames from `resume_from_seq + 1`, read ahead from the source on a blocking thread,
//! sent while the unacknowledged bytes stay within the window, while a reader task decodes the
//! gateway's `Ack`, `Busy`, `Error` and `PointCommitted` concurrently. What ends a connection
//! decides what follows (§7.6): fatal codes stop, `bad_session` asks for a resync, `Busy` waits
//! the asked time (clamped, jittered), `out_of_sequence` and `stalled` reconnect at once, and
//! everything else transient (including codes this agent does not know) waits the plan's retry
//! schedule. Frames in flight are never kept in memory: a resend rereads them from the source.

use std::collections::VecDeque;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::frame::{
    self, AgentFrame, CycleKind, Decoded, GatewayFrame, Hello, Limits, REPLICATION_PATH,
    UPGRADE_PROTOCOL, error_code,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::error::{EXIT_OTHER, EXIT_REFUSED, EXIT_UNREACHABLE};
use crate::plan::{FrameSource, PlanError};
use crate::progress::Progress;
use crate::throttle::{Pacer, Throttle};

/// Longest HTTP response head read before the upgrade.
pub const MAX_RESPONSE_HEAD: usize = 16 << 10;
/// Longest HTTP error body read.
pub const MAX_ERROR_BODY: usize = 64 << 10;
/// Connecting, the TLS handshake and the upgrade answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Delays between retries when the plan gives none.
pub const DEFAULT_RETRY_SCHEDULE: [u64; 5] = [5, 15, 30, 60, 120];
/// Most frames in flight, whatever their size (a window of small `Zero` frames).
const MAX_INFLIGHT_FRAMES: usize = 4096;
/// Frames read ahead of the socket.
const READ_AHEAD: usize = 2;

/// Why a session ended without its `EndOfCycle` acknowledged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// TCP, TLS or the connection failed.
    #[error("cannot connect to the data port {addr}: {reason}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The upgrade was answered with an HTTP error.
    #[error(
        "the data port {addr} refused the replication upgrade: {message} (HTTP {status}, code {code})"
    )]
    Upgrade {
        /// `host:port`.
        addr: String,
        /// HTTP status.
        status: u16,
        /// The API's error code (`-` without one).
        code: String,
        /// The API's message.
        message: String,
        /// `Retry-After` (a 503 past the gateway's session limit), in milliseconds.
        retry_after_ms: Option<u32>,
    },
    /// The gateway ended the session with an error code.
    #[error("the gateway ended the session: {message} (code {code})")]
    Gateway {
        /// The stable code.
        code: String,
        /// Its message.
        message: String,
    },
    /// The gateway asked the agent to come back later.
    #[error("the gateway is busy (cache over its limits); retry after {retry_after_ms} ms")]
    Busy {
        /// What it asked.
        retry_after_ms: u32,
    },
    /// The connection closed or failed mid-session.
    #[error("the connection to the gateway was lost: {reason}")]
    Lost {
        /// Why.
        reason: String,
    },
    /// No acknowledgement for the configured time while frames were in flight.
    #[error("no acknowledgement for {secs} s with {inflight} frames in flight")]
    AckTimeout {
        /// The timeout.
        secs: u64,
        /// Frames unacknowledged.
        inflight: usize,
    },
    /// The gateway broke the protocol (a frame that cannot be decoded or is out of place).
    #[error("the gateway broke the protocol: {reason}")]
    Protocol {
        /// What it did.
        reason: String,
    },
    /// The gateway's state contradicts the agent's for this cycle (as `bad_session`).
    #[error("the gateway's state contradicts the agent's: {reason}")]
    Inconsistent {
        /// What contradicts.
        reason: String,
    },
    /// The gateway already holds frames of this cycle number from an earlier, forgotten
    /// attempt: the cycle must take a new number.
    #[error(
        "the gateway already holds frames up to seq {resume_from_seq} of cycle {cycle}, which this agent does not know: the cycle takes a new number"
    )]
    ForeignCycle {
        /// The cycle.
        cycle: u64,
        /// What the `Welcome` said.
        resume_from_seq: u64,
    },
    /// Producing a frame failed (reading the view).
    #[error(transparent)]
    Source(#[from] PlanError),
    /// Retries exhausted.
    #[error("gave up after {attempts} failed attempts; the last: {last}")]
    GaveUp {
        /// Attempts without progress.
        attempts: usize,
        /// The last failure.
        last: Box<SessionError>,
    },
    /// The agent is stopping.
    #[error("stopped (the agent is shutting down); the gateway resumes the cycle later")]
    Stopped,
}

/// What the agent does after a [`SessionError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Stop replicating the disk until the operator acts.
    Fatal,
    /// Drop the change tracking: the next cycle is a resync.
    Resync,
    /// Reconnect and resume (after a delay, or at once).
    Transient {
        /// Reconnect without waiting (once per lack of progress).
        immediate: bool,
    },
    /// Stop quietly.
    Stopped,
}

/// Fatal error codes (`docs/agent-protocol.md` §7.6).
const FATAL_CODES: [&str; 6] = [
    error_code::BAD_FRAME,
    error_code::UNSUPPORTED_VERSION,
    error_code::FORBIDDEN,
    error_code::UNKNOWN_ITEM,
    error_code::OUT_OF_RANGE,
    error_code::TOO_LARGE,
];

impl SessionError {
    /// What follows this failure.
    pub fn class(&self) -> Class {
        match self {
            Self::Gateway { code, .. } if FATAL_CODES.contains(&code.as_str()) => Class::Fatal,
            Self::Gateway { code, .. } if code == error_code::BAD_SESSION => Class::Resync,
            Self::Gateway { code, .. }
                if code == error_code::OUT_OF_SEQUENCE || code == error_code::STALLED =>
            {
                Class::Transient { immediate: true }
            }
            Self::Upgrade { status, .. } if *status == 503 || *status >= 500 || *status == 429 => {
                Class::Transient { immediate: false }
            }
            Self::Upgrade { .. } => Class::Fatal,
            Self::Inconsistent { .. } => Class::Resync,
            Self::Source(_) | Self::ForeignCycle { .. } => Class::Fatal,
            Self::Stopped => Class::Stopped,
            Self::AckTimeout { .. } => Class::Transient { immediate: true },
            _ => Class::Transient { immediate: false },
        }
    }

    /// The exit status of a command that ends with this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Upgrade {
                status: 401 | 403, ..
            } => EXIT_REFUSED,
            Self::Gateway { code, .. } if code == error_code::FORBIDDEN => EXIT_REFUSED,
            Self::Connect { .. } | Self::Lost { .. } | Self::AckTimeout { .. } => EXIT_UNREACHABLE,
            Self::GaveUp { last, .. } => last.exit_code(),
            _ => EXIT_OTHER,
        }
    }
}

/// A connection, upgraded, and the bytes already read past the upgrade answer.
#[derive(Debug)]
pub struct Connected<Io> {
    /// The stream of frames.
    pub io: Io,
    /// Bytes read after the HTTP head: the first frame bytes.
    pub prefix: Vec<u8>,
}

/// Opens connections to the gateway's data port.
pub trait Connect: Send {
    /// The stream.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// A new, upgraded connection.
    fn connect(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Connected<Self::Io>, SessionError>> + Send;
}

/// What a `Hello` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloParams {
    /// The agent's name.
    pub agent: String,
    /// The protected item.
    pub item: String,
    /// The disk.
    pub disk: String,
    /// Bytes.
    pub disk_size: u64,
    /// Bytes per chunk.
    pub chunk_size: u32,
    /// The cycle.
    pub cycle: u64,
    /// Its kind.
    pub kind: CycleKind,
}

/// How a session behaves.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Most unacknowledged frame bytes in flight (one frame always goes when none is).
    pub window_bytes: u64,
    /// Time without an acknowledgement, frames in flight, before reconnecting; also the wait
    /// for `Welcome`.
    pub ack_timeout: Duration,
    /// Most frame bytes per second, by local time of day; read again every
    /// [`crate::throttle::RECHECK`] while frames are sent.
    pub throttle: Throttle,
    /// Delays between retries without progress; the last repeats.
    pub retry_schedule: Vec<Duration>,
    /// Consecutive failed attempts (without an ack advancing) before giving up; `None`:
    /// never give up.
    pub max_failures: Option<usize>,
    /// Clamp of `Busy.retry_after_ms`, low end.
    pub busy_min: Duration,
    /// Clamp of `Busy.retry_after_ms`, high end.
    pub busy_max: Duration,
    /// Whether a transient failure reconnects within the session (false: it ends the
    /// session, for views that must not be held across waits).
    pub retry_in_session: bool,
}

impl SessionConfig {
    /// The plan's retry schedule, or [`DEFAULT_RETRY_SCHEDULE`] when it is empty.
    pub fn schedule_from(plan_seconds: &[u32]) -> Vec<Duration> {
        if plan_seconds.is_empty() {
            DEFAULT_RETRY_SCHEDULE
                .iter()
                .map(|&s| Duration::from_secs(s))
                .collect()
        } else {
            plan_seconds
                .iter()
                .map(|&s| Duration::from_secs(u64::from(s)))
                .collect()
        }
    }

    fn retry_delay(&self, failures: usize) -> Duration {
        let i = failures
            .saturating_sub(1)
            .min(self.retry_schedule.len().saturating_sub(1));
        self.retry_schedule
            .get(i)
            .copied()
            .unwrap_or(Duration::from_secs(5))
    }

    /// The wait a `Busy` asks for: clamped, plus up to 20% jitter (so agents told the same
    /// time do not come back together).
    pub fn busy_delay(&self, retry_after_ms: u32) -> Duration {
        let asked = Duration::from_millis(u64::from(retry_after_ms));
        let base = asked.clamp(self.busy_min, self.busy_max);
        let jitter = base.mul_f64(rand::random_range(0.0..0.2));
        (base + jitter).min(self.busy_max + self.busy_max / 5)
    }
}

/// Tells sessions to stop (shutdown).
#[derive(Debug, Clone)]
pub struct Stop {
    rx: watch::Receiver<bool>,
}

/// Sets a [`Stop`].
#[derive(Debug)]
pub struct StopHandle {
    tx: watch::Sender<bool>,
}

impl Stop {
    /// A stop signal and its handle.
    pub fn new() -> (StopHandle, Stop) {
        let (tx, rx) = watch::channel(false);
        (StopHandle { tx }, Stop { rx })
    }

    /// A signal that never fires.
    pub fn never() -> Stop {
        let (h, s) = Self::new();
        // The sender is gone: the value stays false.
        drop(h);
        s
    }

    /// Whether stopping was asked.
    pub fn is_set(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once stopping is asked (never if it cannot be).
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        loop {
            if *rx.borrow_and_update() {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl StopHandle {
    /// Asks every [`Stop`] to stop.
    pub fn stop(&self) {
        let _ = self.tx.send(true);
    }
}

/// What the reader task reports.
#[derive(Debug)]
enum Event {
    Frame(GatewayFrame),
    Closed,
    Broken(String),
}

/// The cycle's `EndOfCycle` is acknowledged; the connection stays open for `PointCommitted`.
pub struct Acked<Io> {
    events: mpsc::UnboundedReceiver<Event>,
    reader: tokio::task::JoinHandle<()>,
    _writer: WriteHalf<Io>,
    /// The `Welcome` said the cycle was already complete (its ack had been lost).
    pub via_welcome: bool,
    /// A `PointCommitted` for the cycle that came with the acknowledgement.
    early: Option<String>,
    cycle: u64,
}

impl<Io> fmt::Debug for Acked<Io> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acked")
            .field("via_welcome", &self.via_welcome)
            .field("cycle", &self.cycle)
            .finish_non_exhaustive()
    }
}

impl<Io> Drop for Acked<Io> {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// What became of the point after the acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    /// `PointCommitted { cycle, point_id }` arrived.
    Committed(String),
    /// The gateway did not confirm the point (connection closed, an error, or the wait
    /// ended); the cycle is the gateway's all the same.
    NotConfirmed(String),
}

impl<Io> Acked<Io> {
    /// Waits at most `timeout` for the cycle's `PointCommitted`; other frames are ignored.
    pub async fn wait_commit(mut self, timeout: Duration) -> Commit {
        if let Some(p) = self.early.take() {
            return Commit::Committed(p);
        }
        let cycle = self.cycle;
        let deadline = Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => {
                    return Commit::NotConfirmed(format!(
                        "no PointCommitted within {} s",
                        timeout.as_secs()
                    ));
                }
                Ok(None | Some(Event::Closed)) => {
                    return Commit::NotConfirmed(
                        "the gateway closed the connection before confirming the point".into(),
                    );
                }
                Ok(Some(Event::Broken(r))) => return Commit::NotConfirmed(r),
                Ok(Some(Event::Frame(GatewayFrame::PointCommitted(p)))) if p.cycle == cycle => {
                    return Commit::Committed(p.point_id);
                }
                Ok(Some(Event::Frame(GatewayFrame::Error(e)))) => {
                    return Commit::NotConfirmed(format!(
                        "the gateway ended the session: {} (code {})",
                        e.message, e.code
                    ));
                }
                Ok(Some(Event::Frame(_))) => {}
            }
        }
    }
}

/// What [`replicate`] keeps across its attempts; the caller reads it afterwards.
#[derive(Debug, Clone, Default)]
pub struct SessionState {
    /// The highest `Ack` (or `Welcome.resume_from_seq`) received for the cycle.
    pub last_acked: u64,
    /// No `Welcome` was received yet for this cycle number: one that says the gateway holds
    /// frames of it is a [`SessionError::ForeignCycle`].
    pub fresh: bool,
    /// Connections opened.
    pub connections: u64,
}

/// Sends the cycle `hello` describes, frames from `src`, until its `EndOfCycle` is
/// acknowledged; reconnects and resumes per `cfg`. On success the connection is handed back
/// open, for [`Acked::wait_commit`].
pub async fn replicate<C: Connect, F: FrameSource>(
    connector: &mut C,
    src: &F,
    hello: &HelloParams,
    cfg: &SessionConfig,
    state: &mut SessionState,
    progress: &mut Progress,
    stop: &Stop,
) -> Result<Acked<C::Io>, SessionError> {
    let mut failures = 0usize;
    loop {
        if stop.is_set() {
            return Err(SessionError::Stopped);
        }
        let before = state.last_acked;
        let e = match attempt(connector, src, hello, cfg, state, progress, stop).await {
            Ok(a) => return Ok(a),
            Err(e) => e,
        };
        let immediate = match e.class() {
            Class::Transient { immediate } => immediate,
            _ => return Err(e),
        };
        if state.last_acked > before {
            failures = 0;
        }
        failures += 1;
        let label = format!("{}/{}", hello.item, hello.disk);
        let reason = e.to_string();
        if !cfg.retry_in_session {
            return Err(e);
        }
        if cfg.max_failures.is_some_and(|m| failures > m) {
            return Err(SessionError::GaveUp {
                attempts: failures,
                last: Box::new(e),
            });
        }
        let delay = match &e {
            SessionError::Busy { retry_after_ms }
            | SessionError::Upgrade {
                retry_after_ms: Some(retry_after_ms),
                ..
            } => cfg.busy_delay(*retry_after_ms),
            _ if immediate && failures == 1 => Duration::ZERO,
            _ => cfg.retry_delay(failures),
        };
        let (acked, wait) = (state.last_acked.to_string(), delay.as_millis().to_string());
        progress.note(&[
            ("event", "reconnect"),
            ("disk", &label),
            ("cycle", &hello.cycle.to_string()),
            ("last_acked_seq", &acked),
            ("wait_ms", &wait),
            ("reason", &reason),
        ]);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.wait() => return Err(SessionError::Stopped),
        }
    }
}

fn encode(f: &AgentFrame) -> Result<Vec<u8>, SessionError> {
    let mut out = Vec::new();
    frame::encode_agent(f, &mut out)
        .map_err(|source| SessionError::Source(PlanError::Encode { seq: 0, source }))?;
    Ok(out)
}

fn gateway_error(e: frame::ErrorFrame) -> SessionError {
    SessionError::Gateway {
        code: e.code,
        message: e.message,
    }
}

/// Reads and decodes gateway frames until the connection ends.
async fn read_frames<R: AsyncRead + Unpin>(
    mut rd: R,
    mut buf: Vec<u8>,
    tx: mpsc::UnboundedSender<Event>,
) {
    let limits = Limits::default();
    let mut chunk = vec![0u8; 8192];
    loop {
        loop {
            match frame::decode_gateway(&buf, &limits) {
                Ok(Decoded::Frame(f, n)) => {
                    buf.drain(..n);
                    if tx.send(Event::Frame(f)).is_err() {
                        return;
                    }
                }
                Ok(Decoded::NeedMore(_)) => break,
                Err(e) => {
                    let _ = tx.send(Event::Broken(format!("undecodable frame: {e}")));
                    return;
                }
            }
        }
        match rd.read(&mut chunk).await {
            Ok(0) => {
                let _ = tx.send(Event::Closed);
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                let _ = tx.send(Event::Broken(format!("read failed: {e}")));
                return;
            }
        }
    }
}

/// Frames read ahead on a blocking thread.
struct Producer {
    rx: mpsc::Receiver<(u64, Result<Vec<u8>, PlanError>)>,
    handle: tokio::task::JoinHandle<()>,
}

impl Producer {
    fn start<F: FrameSource>(src: &F, from: u64) -> Self {
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let src = src.clone();
        let last = src.last_seq();
        let handle = tokio::task::spawn_blocking(move || {
            for seq in from..=last {
                let f = src.frame(seq);
                let failed = f.is_err();
                if tx.blocking_send((seq, f)).is_err() || failed {
                    return;
                }
            }
        });
        Self { rx, handle }
    }

    /// Stops it and waits until its thread is done (so that no two producers ever write the
    /// pending digests at once).
    async fn stop(self) {
        drop(self.rx);
        let _ = self.handle.await;
    }
}

/// One connection.
async fn attempt<C: Connect, F: FrameSource>(
    connector: &mut C,
    src: &F,
    hello: &HelloParams,
    cfg: &SessionConfig,
    state: &mut SessionState,
    progress: &mut Progress,
    stop: &Stop,
) -> Result<Acked<C::Io>, SessionError> {
    let conn = tokio::select! {
        c = connector.connect() => c?,
        () = stop.wait() => return Err(SessionError::Stopped),
    };
    state.connections += 1;
    let (rd, mut wr): (ReadHalf<C::Io>, WriteHalf<C::Io>) = tokio::io::split(conn.io);
    let (etx, mut events) = mpsc::unbounded_channel();
    let reader = tokio::spawn(read_frames(rd, conn.prefix, etx));
    let abort = AbortOnDrop(Some(reader));
    let lost = |e: std::io::Error| SessionError::Lost {
        reason: format!("write failed: {e}"),
    };

    let last = src.last_seq();
    let h = AgentFrame::Hello(Hello {
        version: frame::VERSION,
        agent: hello.agent.clone(),
        item: hello.item.clone(),
        disk: hello.disk.clone(),
        disk_size: hello.disk_size,
        chunk_size: hello.chunk_size,
        cycle: hello.cycle,
        cycle_kind: hello.kind,
        last_acked_seq: state.last_acked,
    });
    wr.write_all(&encode(&h)?).await.map_err(lost)?;
    wr.flush().await.map_err(lost)?;

    let first = tokio::select! {
        r = tokio::time::timeout(cfg.ack_timeout, events.recv()) => r,
        () = stop.wait() => return Err(SessionError::Stopped),
    };
    let resume = match first {
        Err(_) => {
            return Err(SessionError::Lost {
                reason: format!("no answer to Hello within {} s", cfg.ack_timeout.as_secs()),
            });
        }
        Ok(None | Some(Event::Closed)) => {
            return Err(SessionError::Lost {
                reason: "the gateway closed the connection before answering Hello".into(),
            });
        }
        Ok(Some(Event::Broken(r))) => return Err(SessionError::Protocol { reason: r }),
        Ok(Some(Event::Frame(f))) => match f {
            GatewayFrame::Welcome(w) => w.resume_from_seq,
            GatewayFrame::Busy(b) => {
                return Err(SessionError::Busy {
                    retry_after_ms: b.retry_after_ms,
                });
            }
            GatewayFrame::Error(e) => return Err(gateway_error(e)),
            other => {
                return Err(SessionError::Protocol {
                    reason: format!("{} before Welcome", other.frame_type()),
                });
            }
        },
    };
    if resume > last {
        return Err(SessionError::Inconsistent {
            reason: format!(
                "the gateway holds cycle {} up to seq {resume}, but the cycle has {last} frames",
                hello.cycle
            ),
        });
    }
    if resume < state.last_acked {
        return Err(SessionError::Inconsistent {
            reason: format!(
                "the gateway holds cycle {} up to seq {resume}, below the acknowledged {}",
                hello.cycle, state.last_acked
            ),
        });
    }
    if state.fresh && resume > 0 {
        return Err(SessionError::ForeignCycle {
            cycle: hello.cycle,
            resume_from_seq: resume,
        });
    }
    state.fresh = false;
    state.last_acked = resume;
    if resume == last {
        return Ok(acked(events, abort, wr, true, None, hello.cycle));
    }

    progress.resume(resume + 1);
    let mut producer = Producer::start(src, resume + 1);
    let r = send_frames(
        &mut wr,
        &mut events,
        &mut producer,
        resume + 1,
        last,
        cfg,
        state,
        progress,
        stop,
        hello.cycle,
    )
    .await;
    producer.stop().await;
    let early = r?;
    Ok(acked(events, abort, wr, false, early, hello.cycle))
}

fn acked<Io>(
    events: mpsc::UnboundedReceiver<Event>,
    mut abort: AbortOnDrop,
    wr: WriteHalf<Io>,
    via_welcome: bool,
    early: Option<String>,
    cycle: u64,
) -> Acked<Io> {
    Acked {
        events,
        reader: abort.0.take().expect("the reader is there"),
        _writer: wr,
        via_welcome,
        early,
        cycle,
    }
}

struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// Sends frames `first ..= last` within the window until `last` is acknowledged. Returns a
/// `PointCommitted` point id for the cycle if one came meanwhile.
#[allow(clippy::too_many_arguments)]
async fn send_frames<W: AsyncWrite + Unpin>(
    wr: &mut W,
    events: &mut mpsc::UnboundedReceiver<Event>,
    producer: &mut Producer,
    first: u64,
    last: u64,
    cfg: &SessionConfig,
    state: &mut SessionState,
    progress: &mut Progress,
    stop: &Stop,
    hello_cycle: u64,
) -> Result<Option<String>, SessionError> {
    let mut inflight: VecDeque<(u64, u64)> = VecDeque::new();
    let mut inflight_bytes = 0u64;
    let mut pending: Option<(u64, Vec<u8>)> = None;
    let mut next_seq = first;
    let mut sent_max = first - 1;
    let mut deadline = Instant::now() + cfg.ack_timeout;
    let mut pacer = Pacer::new(&cfg.throttle, Instant::now());
    let mut early = None;
    let lost = |e: std::io::Error| SessionError::Lost {
        reason: format!("write failed: {e}"),
    };

    while state.last_acked < last {
        let now = Instant::now();
        if pacer.refresh(now) {
            let r = pacer
                .rate()
                .map_or_else(|| "unlimited".to_string(), |r| r.to_string());
            progress.note(&[("event", "throttle_changed"), ("max_bytes_per_second", &r)]);
        }
        let send_at = pacer.ready_at(now);
        let fits = pending.as_ref().is_some_and(|(_, b)| {
            inflight.is_empty()
                || (inflight_bytes + b.len() as u64 <= cfg.window_bytes
                    && inflight.len() < MAX_INFLIGHT_FRAMES)
        });
        let want_frame = pending.is_none() && next_seq <= last;
        tokio::select! {
            biased;
            () = stop.wait() => return Err(SessionError::Stopped),
            ev = events.recv() => match ev {
                Some(Event::Frame(GatewayFrame::Ack(a))) => {
                    if a.seq > sent_max {
                        return Err(SessionError::Protocol {
                            reason: format!("Ack of seq {} which was not sent (sent up to {sent_max})", a.seq),
                        });
                    }
                    if a.seq > state.last_acked {
                        state.last_acked = a.seq;
                        while inflight.front().is_some_and(|(s, _)| *s <= a.seq) {
                            let (_, n) = inflight.pop_front().expect("checked");
                            inflight_bytes -= n;
                        }
                        deadline = Instant::now() + cfg.ack_timeout;
                    }
                }
                Some(Event::Frame(GatewayFrame::PointCommitted(p))) => {
                    let (c, id) = (p.cycle.to_string(), p.point_id.clone());
                    progress.note(&[("event", "point_committed"), ("cycle", &c), ("point", &id)]);
                    if p.cycle == hello_cycle {
                        early = Some(p.point_id);
                    }
                }
                Some(Event::Frame(GatewayFrame::Busy(b))) => {
                    return Err(SessionError::Busy { retry_after_ms: b.retry_after_ms });
                }
                Some(Event::Frame(GatewayFrame::Error(e))) => return Err(gateway_error(e)),
                Some(Event::Frame(GatewayFrame::Welcome(_))) => {
                    return Err(SessionError::Protocol { reason: "a second Welcome".into() });
                }
                None | Some(Event::Closed) => {
                    return Err(SessionError::Lost { reason: "the gateway closed the connection".into() });
                }
                Some(Event::Broken(r)) => return Err(SessionError::Protocol { reason: r }),
            },
            f = producer.rx.recv(), if want_frame => match f {
                Some((seq, Ok(bytes))) => {
                    debug_assert_eq!(seq, next_seq);
                    pending = Some((seq, bytes));
                    next_seq += 1;
                }
                Some((_, Err(e))) => return Err(SessionError::Source(e)),
                None => return Err(SessionError::Protocol { reason: "the frame reader ended early".into() }),
            },
            () = tokio::time::sleep_until(send_at), if fits && send_at > now => {}
            () = std::future::ready(()), if fits && send_at <= now => {
                let (seq, bytes) = pending.take().expect("fits implies pending");
                let n = bytes.len() as u64;
                wr.write_all(&bytes).await.map_err(lost)?;
                if seq == last {
                    wr.flush().await.map_err(lost)?;
                }
                if inflight.is_empty() {
                    deadline = Instant::now() + cfg.ack_timeout;
                }
                inflight.push_back((seq, n));
                inflight_bytes += n;
                sent_max = seq;
                pacer.sent(n, Instant::now());
                progress.sent(n);
            },
            () = tokio::time::sleep_until(deadline), if !inflight.is_empty() => {
                return Err(SessionError::AckTimeout {
                    secs: cfg.ack_timeout.as_secs(),
                    inflight: inflight.len(),
                });
            },
        }
        // Flush when nothing more can be written now, so frames do not wait in a buffer.
        if pending.is_none() || !fits {
            wr.flush().await.map_err(lost)?;
        }
    }
    Ok(early)
}

// --- transport ---------------------------------------------------------------------------------

/// Connects to the data port over TLS and upgrades.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    host_header: String,
    tls: Arc<rustls::ClientConfig>,
}

impl TlsConnector {
    /// A connector to `host` (the gateway URL's host, `[…]` for IPv6) at `port`, with this
    /// TLS configuration (the enrollment's mTLS).
    pub fn new(host: &str, port: u16, tls: rustls::ClientConfig) -> Result<Self, SessionError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = match bare.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => {
                ServerName::try_from(bare.to_string()).map_err(|e| SessionError::Connect {
                    addr: format!("{host}:{port}"),
                    reason: format!("`{bare}` is not a host name TLS accepts: {e}"),
                })?
            }
        };
        Ok(Self {
            host: bare.to_string(),
            port,
            server_name,
            host_header: format!("{host}:{port}"),
            tls: Arc::new(tls),
        })
    }

    /// Dials `host:port` instead (a relay in between); TLS still verifies the gateway's name
    /// and the request names the gateway.
    pub fn dial_via(&mut self, host: &str, port: u16) {
        self.host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        self.port = port;
    }

    /// `host:port`, for messages.
    pub fn addr(&self) -> &str {
        &self.host_header
    }
}

impl Connect for TlsConnector {
    type Io = tokio_rustls::client::TlsStream<TcpStream>;

    async fn connect(&mut self) -> Result<Connected<Self::Io>, SessionError> {
        let addr = self.host_header.clone();
        let fail = |reason: String| SessionError::Connect {
            addr: addr.clone(),
            reason,
        };
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| fail("timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let mut tls = tokio::time::timeout(
            CONNECT_TIMEOUT,
            connector.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| fail("the TLS handshake timed out".into()))?
        .map_err(|e| fail(format!("TLS: {e}")))?;
        let prefix = tokio::time::timeout(CONNECT_TIMEOUT, upgrade(&mut tls, &addr))
            .await
            .map_err(|_| fail("no answer to the upgrade request".into()))??;
        Ok(Connected { io: tls, prefix })
    }
}

/// Asks for the upgrade on `io` (`host` for the `Host` header and messages); returns the
/// bytes read past the `101` head, or the refusal with the API's JSON error.
pub async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    host: &str,
) -> Result<Vec<u8>, SessionError> {
    let req = format!(
        "GET {REPLICATION_PATH} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE_PROTOCOL}\r\nUser-Agent: ferry-agent/{}\r\n\r\n",
        crate::VERSION
    );
    let lost = |reason: String| SessionError::Connect {
        addr: host.to_string(),
        reason,
    };
    io.write_all(req.as_bytes())
        .await
        .map_err(|e| lost(format!("sending the upgrade request: {e}")))?;
    io.flush()
        .await
        .map_err(|e| lost(format!("sending the upgrade request: {e}")))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(lost(format!(
                "the upgrade answer's head is longer than {MAX_RESPONSE_HEAD} bytes"
            )));
        }
        let n = io
            .read(&mut chunk)
            .await
            .map_err(|e| lost(format!("reading the upgrade answer: {e}")))?;
        if n == 0 {
            return Err(lost(
                "the connection closed before the upgrade answer".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if head_end > MAX_RESPONSE_HEAD {
        return Err(lost(format!(
            "the upgrade answer's head is longer than {MAX_RESPONSE_HEAD} bytes"
        )));
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let rest = buf[head_end..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| {
            lost(format!(
                "not an HTTP answer: `{}`",
                status_line.chars().take(80).collect::<String>()
            ))
        })?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if status == 101 {
        let up = header("upgrade").unwrap_or_default();
        if !up
            .split(',')
            .any(|p| p.trim().eq_ignore_ascii_case(UPGRADE_PROTOCOL))
        {
            return Err(lost(format!(
                "the gateway switched to `{up}`, not {UPGRADE_PROTOCOL}"
            )));
        }
        return Ok(rest);
    }
    let body = read_error_body(
        io,
        rest,
        header("content-length"),
        header("transfer-encoding"),
    )
    .await
    .unwrap_or_default();
    let (code, message) = parse_error_body(&body).unwrap_or_else(|| {
        (
            "-".to_string(),
            format!("HTTP {status} without the API's error body"),
        )
    });
    let retry_after_ms = header("retry-after")
        .and_then(|v| v.parse::<u32>().ok())
        .map(|secs| secs.saturating_mul(1000));
    Err(SessionError::Upgrade {
        addr: host.to_string(),
        status,
        code,
        message,
        retry_after_ms,
    })
}

async fn read_error_body<S: AsyncRead + Unpin>(
    io: &mut S,
    mut body: Vec<u8>,
    length: Option<&str>,
    encoding: Option<&str>,
) -> Option<Vec<u8>> {
    let chunked = encoding.is_some_and(|e| e.to_ascii_lowercase().contains("chunked"));
    let want = length.and_then(|l| l.parse::<usize>().ok());
    if want.is_some_and(|w| w > MAX_ERROR_BODY) {
        return None;
    }
    let mut chunk = [0u8; 4096];
    loop {
        let complete = match (want, chunked) {
            (Some(w), _) => body.len() >= w,
            (None, true) => body.windows(5).any(|w| w == b"0\r\n\r\n"),
            (None, false) => false,
        };
        if complete || body.len() > MAX_ERROR_BODY {
            break;
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, io.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => body.extend_from_slice(&chunk[..n]),
        }
    }
    if let Some(w) = want {
        body.truncate(w);
    }
    if chunked && want.is_none() {
        return Some(dechunk(&body));
    }
    Some(body)
}

/// The data of a chunked body (as much as is well formed).
fn dechunk(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(p) = b[at..].windows(2).position(|w| w == b"\r\n") {
        let size_line = String::from_utf8_lossy(&b[at..at + p]);
        let Ok(n) = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
        else {
            break;
        };
        let start = at + p + 2;
        if n == 0 || start + n > b.len() {
            break;
        }
        out.extend_from_slice(&b[start..start + n]);
        at = start + n + 2;
        if at > b.len() {
            break;
        }
    }
    out
}

fn parse_error_body(b: &[u8]) -> Option<(String, String)> {
    #[derive(serde::Deserialize)]
    struct E {
        code: String,
        message: String,
    }
    #[derive(serde::Deserialize)]
    struct N {
        error: E,
    }
    let e = serde_json::from_slice::<E>(b)
        .or_else(|_| serde_json::from_slice::<N>(b).map(|n| n.error))
        .ok()?;
    let clean =
        |s: String| -> String { s.chars().filter(|c| !c.is_control()).take(1024).collect() };
    Some((clean(e.code), clean(e.message)))
}

#[cfg(test)]
mod tests;
