//! One replication session on the data port: the HTTP upgrade, then frames
//! (`docs/agent-protocol.md` §2, §7).
//!
//! The upgrade handler checks the client certificate before anything else (an unknown,
//! revoked or expired one is the API's 401 with its code) and takes a session permit (the
//! `process.max_sessions` bound); then the session reads frames into a buffer that never holds
//! more than one frame of the session's chunk size plus one read, decides each by the session
//! rules, appends it to the cycle's journal as received, and — whenever it has consumed all it
//! read — makes the journal durable and acknowledges the highest durable `seq`. Reading stops
//! while the journal syncs, so a slow cache slows the agent through TCP, never fills memory.

use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::BytesMut;
use ferry_proto::frame::{
    self, Ack, AgentFrame, Busy, Decoded, ErrorFrame, FrameError, GatewayFrame, Hello,
    PointCommitted, Welcome, error_code,
};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

use super::{Pending, ProcessRole, Receiving, lock};
use crate::agents::CertCheck;
use crate::api::ApiError;
use crate::drain::CycleInfo;
use crate::journal::{BackpressureReason, JournalError, StreamKey};
use crate::server::ClientCert;
use crate::session::{self, Accepted, Peer, Refusal, StreamState};

/// How long a new session waits for the one it replaces to let go of the stream.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// What `Busy` asks the agent to wait, milliseconds.
const BUSY_RETRY_MS: u32 = 30_000;
/// Longest wait for a complete cycle's point before the session closes (the agent learns
/// the point from its next plan or Hello).
const COMMIT_WAIT: Duration = Duration::from_secs(600);
/// Bytes asked of the socket at a time.
const READ_BYTES: usize = 256 << 10;
/// Most bytes of received chunks a session holds for its live drain until the journal makes
/// them durable. An agent keeps within its window (16 MiB by default); one that does not is
/// not buffered past this: the live drain is given up and the ordinary drain reads the cycle
/// from the journal.
const MAX_HELD_BYTES: usize = 48 << 20;

/// What `batch` holds, as [`MAX_HELD_BYTES`] counts it (a chunk's bytes are a copy of
/// their own, so that nothing else is kept alive with them).
fn held_bytes(batch: &[(u64, AgentFrame)]) -> usize {
    batch
        .iter()
        .map(|(_, f)| match f {
            AgentFrame::Chunk(c) => c.bytes.len() + 64,
            _ => 64,
        })
        .sum()
}

/// The frames a session holds for its live drain until the journal makes them durable, and
/// their [`held_bytes`], kept as they come and go (not summed again for every frame).
#[derive(Default)]
struct Held {
    frames: Vec<(u64, AgentFrame)>,
    bytes: usize,
}

impl Held {
    fn push(&mut self, seq: u64, f: AgentFrame) {
        self.frames.push((seq, f));
        self.bytes += held_bytes(&self.frames[self.frames.len() - 1..]);
    }

    /// Takes out the frames up to `seq`.
    fn drain_through(&mut self, seq: u64) -> std::vec::Drain<'_, (u64, AgentFrame)> {
        let n = self.frames.partition_point(|(s, _)| *s <= seq);
        self.bytes -= held_bytes(&self.frames[..n]);
        self.frames.drain(..n)
    }

    fn clear(&mut self) {
        self.frames.clear();
        self.bytes = 0;
    }
}

/// The data port's routes: `GET /api/v1/replication` (upgrade) and nothing else.
pub fn router(role: ProcessRole) -> Router {
    Router::new()
        .route(frame::REPLICATION_PATH, get(upgrade))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "the data port serves only GET {} (upgrade to {})",
                    frame::REPLICATION_PATH,
                    frame::UPGRADE_PROTOCOL
                ),
            )
        })
        .with_state(role)
}

fn header_has_token(req: &Request, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

async fn upgrade(State(role): State<ProcessRole>, req: Request) -> Response {
    let unauthorized = |code: &'static str, msg: &str| {
        ApiError::new(StatusCode::UNAUTHORIZED, code, msg.to_string()).into_response()
    };
    let Some(cert) = req.extensions().get::<ClientCert>().copied() else {
        return unauthorized(
            "client_certificate_required",
            "the data port needs the client certificate the agent received at enrollment",
        );
    };
    let agent = match role.inner.agents.check(&cert.sha256) {
        CertCheck::Agent(name) => name,
        CertCheck::Revoked => {
            return unauthorized(
                "certificate_revoked",
                "this agent's certificate was revoked",
            );
        }
        CertCheck::Expired(name) => {
            return unauthorized(
                "certificate_expired",
                &format!("the certificate of agent `{name}` has expired: enroll it again"),
            );
        }
        CertCheck::Unknown => {
            return unauthorized(
                "unknown_certificate",
                "this client certificate belongs to no enrolled agent",
            );
        }
    };
    if !header_has_token(&req, header::UPGRADE, frame::UPGRADE_PROTOCOL)
        || !header_has_token(&req, header::CONNECTION, "upgrade")
    {
        let mut r = ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            format!(
                "replication needs `Connection: Upgrade` and `Upgrade: {}` (the only protocol version this gateway speaks)",
                frame::UPGRADE_PROTOCOL
            ),
        )
        .into_response();
        r.headers_mut().insert(
            header::UPGRADE,
            HeaderValue::from_static(frame::UPGRADE_PROTOCOL),
        );
        return r;
    }
    if *role.inner.stop.borrow() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the gateway is stopping".to_string(),
        )
        .into_response();
    }
    let Ok(permit) = role.inner.sessions.clone().try_acquire_owned() else {
        let mut r = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_sessions",
            "the gateway serves process.max_sessions sessions already; try again later".to_string(),
        )
        .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
        return r;
    };
    let on_upgrade = hyper::upgrade::on(req);
    role.inner
        .active
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            run(
                role.clone(),
                TokioIo::new(upgraded),
                agent,
                cert.sha256,
                permit,
            )
            .await;
        }
        if role
            .inner
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            role.inner.idle_notify.notify_waiters();
        }
    });
    let mut r = StatusCode::SWITCHING_PROTOCOLS.into_response();
    r.headers_mut().insert(
        header::UPGRADE,
        HeaderValue::from_static(frame::UPGRADE_PROTOCOL),
    );
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    r
}

/// Why a session ended early: the frame to send (if any) before closing.
enum End {
    /// Close without a frame (the agent went away, or a newer session took over).
    Quiet,
    /// Send this and close.
    Send(GatewayFrame),
}

fn error(code: &str, message: impl Into<String>) -> End {
    End::Send(GatewayFrame::Error(ErrorFrame {
        code: code.to_string(),
        message: message.into(),
    }))
}

impl From<Refusal> for End {
    fn from(r: Refusal) -> Self {
        error(r.code, r.message)
    }
}

fn frame_refusal(e: &FrameError) -> End {
    match e {
        FrameError::FutureVersion { .. } => error(error_code::UNSUPPORTED_VERSION, e.to_string()),
        _ => error(error_code::BAD_FRAME, e.to_string()),
    }
}

/// The connection: a read buffer and the writing half.
struct Wire<IO> {
    io: IO,
    buf: BytesMut,
    limits: frame::Limits,
    idle: Duration,
    /// The session's `process.max_sessions` permit, given back once the session only waits
    /// for its point.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Wire<IO> {
    /// The next whole frame already in the buffer, and its bytes as received.
    fn try_frame(&mut self) -> Result<Option<(AgentFrame, bytes::Bytes)>, FrameError> {
        match frame::decode_agent(&self.buf, &self.limits)? {
            Decoded::Frame(f, n) => Ok(Some((f, self.buf.split_to(n).freeze()))),
            Decoded::NeedMore(n) => {
                self.buf.reserve(n.max(READ_BYTES));
                Ok(None)
            }
        }
    }

    /// Reads more bytes; `Ok(false)` at the end of the stream.
    async fn fill(&mut self) -> std::io::Result<bool> {
        if self.buf.capacity() - self.buf.len() == 0 {
            self.buf.reserve(READ_BYTES);
        }
        Ok(self.io.read_buf(&mut self.buf).await? > 0)
    }

    async fn send(&mut self, f: &GatewayFrame) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(64);
        frame::encode_gateway(f, &mut out).map_err(std::io::Error::other)?;
        tokio::time::timeout(self.idle, async {
            self.io.write_all(&out).await?;
            self.io.flush().await
        })
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "agent not reading"))?
    }
}

async fn run<IO: AsyncRead + AsyncWrite + Unpin + Send>(
    role: ProcessRole,
    io: IO,
    agent: String,
    cert: [u8; 32],
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let mut wire = Wire {
        io,
        buf: BytesMut::with_capacity(64 << 10),
        limits: frame::Limits::protocol(),
        idle: role.inner.idle,
        permit: Some(permit),
    };
    let mut item_for_figures = None;
    let end = session(&role, &mut wire, agent, cert, &mut item_for_figures).await;
    if let End::Send(f) = end {
        if let (GatewayFrame::Error(e), Some(item)) = (&f, &item_for_figures) {
            role.with_figures(item, |fig| {
                fig.last_error = Some((
                    ferry_store::point::now_ms(),
                    format!("session refused ({}): {}", e.code, e.message),
                ));
            });
        }
        if wire.send(&f).await.is_ok() {
            // The agent may be writing frames still: closing now would reset the connection
            // and could discard the answer before it reads it. Its writes are read and dropped
            // until it closes, for a short while.
            let _ = tokio::time::timeout(Duration::from_secs(5), wire.io.shutdown()).await;
            let _ = tokio::time::timeout(LINGER, async {
                loop {
                    wire.buf.clear();
                    if !matches!(wire.fill().await, Ok(true)) {
                        break;
                    }
                }
            })
            .await;
            return finish(&role, item_for_figures.as_deref());
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), wire.io.shutdown()).await;
    finish(&role, item_for_figures.as_deref());
}

/// How long a refused session's incoming bytes are read and dropped after its `Error` (so the
/// agent reads the answer instead of a reset).
const LINGER: Duration = Duration::from_secs(3);

/// A session is over: the item's figures learn it.
fn finish(role: &ProcessRole, item: Option<&str>) {
    if let Some(item) = item {
        role.with_figures(item, |f| {
            f.sessions = f.sessions.saturating_sub(1);
            f.receiving_bytes = 0;
        });
    }
}

/// The first frame: a `Hello`, within the idle timeout.
async fn read_hello<IO: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<IO>,
) -> Result<(Hello, bytes::Bytes), End> {
    loop {
        match wire.try_frame() {
            Ok(Some((AgentFrame::Hello(h), raw))) => return Ok((h, raw)),
            Ok(Some((f, _))) => {
                return Err(error(
                    error_code::BAD_FRAME,
                    format!(
                        "the first frame of a session must be Hello, not {:?}",
                        f.frame_type()
                    ),
                ));
            }
            Ok(None) => {}
            Err(e) => return Err(frame_refusal(&e)),
        }
        match tokio::time::timeout(wire.idle, wire.fill()).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false) | Err(_)) => return Err(End::Quiet),
            Err(_) => {
                return Err(error(
                    error_code::STALLED,
                    format!("no Hello within {} s", wire.idle.as_secs()),
                ));
            }
        }
    }
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

// Boxed so that its `Send` is proven here, for these lifetimes (rustc cannot prove it for
// every lifetime through the generic `run`).
fn session<'a, IO: AsyncRead + AsyncWrite + Unpin + Send + 'a>(
    role: &'a ProcessRole,
    wire: &'a mut Wire<IO>,
    agent: String,
    cert: [u8; 32],
    figures_item: &'a mut Option<String>,
) -> BoxFuture<'a, End> {
    Box::pin(session_inner(role, wire, agent, cert, figures_item))
}

async fn session_inner<IO: AsyncRead + AsyncWrite + Unpin + Send>(
    role: &ProcessRole,
    wire: &mut Wire<IO>,
    agent: String,
    cert: [u8; 32],
    figures_item: &mut Option<String>,
) -> End {
    let inner = &role.inner;
    let (hello, raw_hello) = match read_hello(wire).await {
        Ok(h) => h,
        Err(e) => return e,
    };
    let record = {
        let c = inner.catalog.clone();
        let a = agent.clone();
        blocking(move || c.agent(&a))
    };
    let items = match record {
        Ok(Some(a)) if a.is_active() && a.cert.sha256 == cert => a.items,
        Ok(_) => {
            return error(
                error_code::FORBIDDEN,
                "this certificate is no longer the agent's (revoked or enrolled again)",
            );
        }
        Err(e) => return error(error_code::INTERNAL, format!("reading the catalog: {e}")),
    };
    let peer = Peer {
        agent: agent.clone(),
        items,
    };
    if hello.agent != peer.agent || !peer.items.contains(&hello.item) {
        // The session rules phrase it; nothing about the item is revealed.
        return match session::on_hello(&peer, &hello, &StreamState::default(), |_| Ok(())) {
            Err(r) => r.into(),
            Ok(_) => error(error_code::FORBIDDEN, "not this agent's item"),
        };
    }
    let item = match blocking(|| inner.catalog.item(&hello.item)) {
        Ok(Some(it)) => it,
        Ok(None) => {
            return error(
                error_code::UNKNOWN_ITEM,
                format!("protected item `{}` does not exist", hello.item),
            );
        }
        Err(e) => return error(error_code::INTERNAL, format!("reading the catalog: {e}")),
    };
    if !item.disks.iter().any(|d| d.name == hello.disk) {
        return error(
            error_code::UNKNOWN_ITEM,
            format!(
                "protected item `{}` has no disk `{}`",
                item.name, hello.disk
            ),
        );
    }
    if !super::replicating(item.state) {
        return error(
            error_code::FORBIDDEN,
            format!(
                "protected item `{}` is {}: it takes no replication now",
                item.name, item.state
            ),
        );
    }
    if let Some(src) = item.source_agent.as_deref().filter(|s| *s != peer.agent) {
        return error(
            error_code::FORBIDDEN,
            format!(
                "protected item `{}` is replicated {} from agent `{src}` now (reprotect): this agent sends nothing for it",
                item.name,
                item.direction.as_str()
            ),
        );
    }
    *figures_item = Some(item.name.clone());
    role.with_figures(&item.name, |f| f.sessions += 1);
    if let Err(JournalError::Backpressure { reason, .. }) = inner
        .guard
        .check(u64::from(inner.journal_limits.max_record))
    {
        role.with_figures(&item.name, |f| {
            f.last_error = Some((ferry_store::point::now_ms(), format!("cache: {reason}")));
        });
        return End::Send(GatewayFrame::Busy(Busy {
            retry_after_ms: BUSY_RETRY_MS,
        }));
    }

    // Take the stream over from an older session, if any.
    let stream = role.stream(&hello.item, &hello.disk);
    stream.generation.send_modify(|g| *g += 1);
    let mut generation = stream.generation.subscribe();
    generation.mark_unchanged();
    let Ok(mut receiving) = tokio::time::timeout(TAKEOVER_TIMEOUT, stream.receiving.lock()).await
    else {
        return error(
            error_code::INTERNAL,
            "the previous session of this disk did not end; try again",
        );
    };
    if role.is_deferred(&stream.id) {
        // Its journals wait for the vault (or the cache) to answer at start.
        return End::Send(GatewayFrame::Busy(Busy {
            retry_after_ms: BUSY_RETRY_MS,
        }));
    }
    // The older session may have ended with frames appended and not yet synced (its syncs
    // run beside the reading): they are made durable now, so the Welcome's resume point and
    // the journal's next number agree.
    if let Some(r) = receiving.as_mut()
        && !r.journal.is_poisoned()
    {
        let _ = blocking(|| r.journal.sync());
    }
    if receiving.as_ref().is_some_and(|r| r.journal.is_poisoned()) {
        // A failed write or sync: the handle is dropped and the journal reopened from disk,
        // which says what is durable.
        *receiving = None;
    }
    let mut known = match role.load_known(&stream).await {
        Ok(k) => k,
        Err(e) => return error(error_code::INTERNAL, e.to_string()),
    };
    if receiving.is_none()
        && known.complete.is_none_or(|(c, _)| hello.cycle > c)
        && !lock(&stream.pending).contains_key(&hello.cycle)
    {
        match blocking(|| role.adopt(&stream, &hello)) {
            Ok(r) => *receiving = r,
            Err(e) => return error(error_code::INTERNAL, format!("reopening the journal: {e}")),
        }
        known = stream.known().unwrap_or(known);
    }
    let state = StreamState {
        geometry: known.geometry,
        complete: known.complete,
        receiving: receiving
            .as_ref()
            .map(|r| (r.hello.cycle, r.journal.durable_seq().unwrap_or(0))),
    };
    let welcomed = match session::on_hello(&peer, &hello, &state, |_| Ok(())) {
        Ok(w) => w,
        Err(r) => return r.into(),
    };
    if welcomed.abandon.is_some()
        && let Some(old) = receiving.take()
        && let Err(e) = blocking(|| old.journal.remove())
    {
        return error(
            error_code::INTERNAL,
            format!("dropping the abandoned cycle: {e}"),
        );
    }
    let Some(mut sess) = welcomed.session else {
        // The cycle is complete: the agent learns it from the Welcome, and may wait for its
        // point.
        if wire
            .send(&GatewayFrame::Welcome(Welcome {
                version: frame::VERSION,
                resume_from_seq: welcomed.resume_from_seq,
            }))
            .await
            .is_err()
        {
            return End::Quiet;
        }
        drop(receiving);
        return wait_commit(role, wire, &stream, hello.cycle, &mut generation).await;
    };
    if receiving.is_none() && hello.cycle_kind == frame::CycleKind::Resync {
        let now = ferry_store::point::now_ms();
        let _ = blocking(|| {
            inner
                .catalog
                .apply_event(&item.name, crate::item::Event::ResyncStarted, now)
        });
    }
    let mut fresh = false;
    if receiving.is_none() {
        let opened = blocking(|| -> Result<Receiving, JournalError> {
            let key = StreamKey::new(&hello.item, &hello.disk, hello.cycle)?;
            let dir = key.dir(&inner.cache_dir)?;
            // A directory left by a crash before this cycle's Hello was durable holds
            // nothing acknowledged.
            if dir.exists() {
                let (j, _) = inner.guard.open_journal(&key, inner.journal_limits)?;
                j.remove()?;
            }
            let (mut journal, _) = inner.guard.open_journal(&key, inner.journal_limits)?;
            journal.append(0, &raw_hello)?;
            journal.sync()?;
            Ok(Receiving {
                hello: hello.clone(),
                journal,
            })
        });
        match opened {
            Ok(r) => {
                *receiving = Some(r);
                fresh = true;
            }
            Err(JournalError::Backpressure { reason, .. }) => {
                role.with_figures(&item.name, |f| {
                    f.last_error = Some((ferry_store::point::now_ms(), format!("cache: {reason}")));
                });
                return End::Send(GatewayFrame::Busy(Busy {
                    retry_after_ms: BUSY_RETRY_MS,
                }));
            }
            Err(e) => return error(error_code::INTERNAL, format!("opening the journal: {e}")),
        }
    }
    // An initial cycle is drained while it comes (`live`), when nothing is queued before it.
    let mut live_on = {
        let mut live = stream.live.lock().await;
        if live
            .as_ref()
            .is_some_and(|l| l.cycle != hello.cycle || l.next_seq() != welcomed.resume_from_seq + 1)
        {
            *live = None;
        }
        if fresh
            && hello.cycle_kind == frame::CycleKind::Initial
            && live.is_none()
            && lock(&stream.pending).is_empty()
            && let Some(vault) = inner.vaults.get(&item.vault)
            && let Ok(permit) = inner.live_permits.clone().try_acquire_owned()
        {
            *live = Some(super::live::Live::start(
                vault,
                &super::cycle_info(&hello.item, &hello.disk, hello.cycle, &hello),
                permit,
            ));
        }
        live.is_some()
    };
    let mut batch = Held::default();
    stream.update_known(|k| k.geometry = Some((hello.disk_size, hello.chunk_size)));
    if wire
        .send(&GatewayFrame::Welcome(Welcome {
            version: frame::VERSION,
            resume_from_seq: welcomed.resume_from_seq,
        }))
        .await
        .is_err()
    {
        return End::Quiet;
    }
    wire.limits = frame::Limits::protocol().for_chunk_size(hello.chunk_size);
    let mut stop = inner.stop.subscribe();
    let mut unsynced = false;
    let mut end_seq = None;
    // The journal's sync in flight (`Journal::begin_sync`): frames keep coming while the disk
    // syncs, and the next sync covers all that came meanwhile.
    let mut inflight: Option<tokio::task::JoinHandle<Result<u64, JournalError>>> = None;
    // Ends the sync in flight: acknowledges what it made durable and hands it to the live
    // drain.
    macro_rules! settle {
        ($ran:expr) => {{
            let ran = match $ran {
                Ok(r) => r,
                Err(e) => Err(JournalError::Io {
                    action: "sync",
                    path: receiving
                        .as_ref()
                        .expect("held")
                        .journal
                        .dir()
                        .to_path_buf(),
                    source: std::io::Error::other(e.to_string()),
                }),
            };
            match receiving.as_mut().expect("held").journal.end_sync(ran) {
                Ok(Some(seq)) => {
                    if wire.send(&GatewayFrame::Ack(Ack { seq })).await.is_err() {
                        return End::Quiet;
                    }
                    forward_live(&stream, hello.cycle, seq, &mut batch, &mut live_on).await;
                }
                Ok(None) => {}
                Err(e) => {
                    return error(error_code::INTERNAL, format!("syncing the journal: {e}"));
                }
            }
        }};
    }
    // Makes the journal durable and acknowledges it (before any refusal, so the agent
    // learns how far it got).
    macro_rules! flush {
        () => {
            if let Some(h) = inflight.take() {
                settle!(h.await);
            }
            if let Err(e) = flush(wire, receiving.as_mut().expect("held"), &mut unsynced).await {
                return e;
            }
            forward_live(&stream, hello.cycle, u64::MAX, &mut batch, &mut live_on).await;
        };
    }
    loop {
        loop {
            let (f, raw) = match wire.try_frame() {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => {
                    flush!();
                    return frame_refusal(&e);
                }
            };
            let accepted = match sess.accept(&f) {
                Ok(a) => a,
                Err(refusal) => {
                    flush!();
                    return refusal.into();
                }
            };
            let (seq, is_end) = match accepted {
                Accepted::Data(s) => (s, false),
                Accepted::End(s) => (s, true),
            };
            match blocking(|| receiving.as_mut().expect("held").journal.append(seq, &raw)) {
                Ok(_) => {
                    unsynced = true;
                    if live_on {
                        batch.push(seq, f);
                        if batch.bytes > MAX_HELD_BYTES {
                            give_up_live(&stream, hello.cycle, &mut batch, &mut live_on).await;
                        }
                    }
                }
                Err(JournalError::Backpressure {
                    reason: BackpressureReason::JournalFull { limit, .. },
                    ..
                }) => {
                    flush!();
                    return error(
                        error_code::TOO_LARGE,
                        format!(
                            "cycle {} of `{}`/`{}` is larger than the gateway takes in one cycle ({limit} bytes, process.cache.max_cycle_bytes)",
                            hello.cycle, hello.item, hello.disk
                        ),
                    );
                }
                Err(JournalError::Backpressure { reason, .. }) => {
                    flush!();
                    role.with_figures(&item.name, |f| {
                        f.last_error =
                            Some((ferry_store::point::now_ms(), format!("cache: {reason}")));
                    });
                    return End::Send(GatewayFrame::Busy(Busy {
                        retry_after_ms: BUSY_RETRY_MS,
                    }));
                }
                Err(e) => {
                    flush!();
                    return error(error_code::INTERNAL, format!("journal: {e}"));
                }
            }
            let len = raw.len() as u64;
            let journal_bytes = receiving.as_ref().map_or(0, |r| r.journal.bytes());
            role.with_figures(&item.name, |fig| {
                fig.ingest.add(len);
                fig.receiving_bytes = journal_bytes;
            });
            if is_end {
                end_seq = Some(seq);
                break;
            }
        }
        if let Some(end_seq) = end_seq {
            // Once the EndOfCycle is durable the cycle is the gateway's, whatever happens to
            // the acknowledgement: it is queued for draining before the Ack is sent (a lost
            // Ack is answered by the Welcome of the agent's next Hello).
            if let Some(h) = inflight.take() {
                settle!(h.await);
            }
            match blocking(|| receiving.as_mut().expect("held").journal.sync()) {
                Ok(Some(seq)) if seq >= end_seq => {}
                Ok(other) => {
                    return error(
                        error_code::INTERNAL,
                        format!("the journal holds up to {other:?}, not the EndOfCycle {end_seq}"),
                    );
                }
                Err(e) => return error(error_code::INTERNAL, format!("syncing the journal: {e}")),
            }
            forward_live(&stream, hello.cycle, u64::MAX, &mut batch, &mut live_on).await;
            let r = receiving.take().expect("held");
            let info = CycleInfo {
                item: hello.item.clone(),
                disk: hello.disk.clone(),
                cycle: hello.cycle,
                kind: hello.cycle_kind,
                disk_size: hello.disk_size,
                chunk_size: hello.chunk_size,
                agent: hello.agent.clone(),
            };
            lock(&stream.pending).insert(
                hello.cycle,
                Pending {
                    info,
                    journal: r.journal,
                },
            );
            stream.update_known(|k| k.complete = Some((hello.cycle, end_seq)));
            inner.drain_wake.notify_one();
            drop(receiving);
            if wire
                .send(&GatewayFrame::Ack(Ack { seq: end_seq }))
                .await
                .is_err()
            {
                return End::Quiet;
            }
            return wait_commit(role, wire, &stream, hello.cycle, &mut generation).await;
        }
        if inflight.is_none() && unsynced {
            unsynced = false;
            match blocking(|| receiving.as_mut().expect("held").journal.begin_sync()) {
                Ok(Some(t)) => inflight = Some(tokio::task::spawn_blocking(move || t.run())),
                Ok(None) => {}
                Err(e) => {
                    return error(error_code::INTERNAL, format!("syncing the journal: {e}"));
                }
            }
        }
        let still = match inner.agents.check(&cert) {
            CertCheck::Agent(n) => n == agent,
            _ => false,
        };
        if !still {
            return error(
                error_code::FORBIDDEN,
                "this agent's certificate was revoked or has expired",
            );
        }
        tokio::select! {
            r = tokio::time::timeout(wire.idle, wire.fill()) => match r {
                Ok(Ok(true)) => {}
                Ok(Ok(false) | Err(_)) => return End::Quiet,
                Err(_) => {
                    return error(
                        error_code::STALLED,
                        format!("nothing received for {} s", wire.idle.as_secs()),
                    );
                }
            },
            ran = async { inflight.as_mut().expect("guarded").await }, if inflight.is_some() => {
                inflight = None;
                settle!(ran);
            }
            _ = generation.changed() => return End::Quiet,
            _ = stop.changed() => {
                return error(error_code::SHUTTING_DOWN, "the gateway is stopping");
            }
        }
    }
}

/// Ends the stream's live drain of `cycle` (the ordinary drain takes the cycle from the
/// journal) and lets go of what was held for it.
async fn give_up_live(stream: &super::Stream, cycle: u64, batch: &mut Held, live_on: &mut bool) {
    batch.clear();
    *live_on = false;
    let mut live = stream.live.lock().await;
    if live.as_ref().is_some_and(|l| l.cycle == cycle) {
        *live = None;
    }
}

/// Hands the frames of `batch` up to `durable` to the stream's live drain of `cycle`, and
/// drops the live drain if it cannot take them (the ordinary drain follows).
async fn forward_live(
    stream: &super::Stream,
    cycle: u64,
    durable: u64,
    batch: &mut Held,
    live_on: &mut bool,
) {
    if batch.frames.first().is_none_or(|(seq, _)| *seq > durable) {
        return;
    }
    let mut live = stream.live.lock().await;
    let ok = match live.as_mut() {
        Some(l) if l.cycle == cycle => l.forward(batch.drain_through(durable)).await,
        _ => false,
    };
    if !ok {
        drop(live);
        give_up_live(stream, cycle, batch, live_on).await;
    }
}

/// Syncs `r`'s journal if anything was appended since the last sync, and acknowledges the
/// highest durable `seq`.
async fn flush<IO: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<IO>,
    r: &mut Receiving,
    unsynced: &mut bool,
) -> Result<(), End> {
    if !*unsynced {
        return Ok(());
    }
    *unsynced = false;
    match blocking(|| r.journal.sync()) {
        Ok(Some(seq)) if seq > 0 => wire
            .send(&GatewayFrame::Ack(Ack { seq }))
            .await
            .map_err(|_| End::Quiet),
        Ok(_) => Ok(()),
        Err(e) => Err(error(
            error_code::INTERNAL,
            format!("syncing the journal: {e}"),
        )),
    }
}

/// After a cycle is complete: tells the agent `PointCommitted` when the drainer has made the
/// cycle a point, unless the agent leaves, a newer session takes over or the gateway stops.
async fn wait_commit<IO: AsyncRead + AsyncWrite + Unpin>(
    role: &ProcessRole,
    wire: &mut Wire<IO>,
    stream: &super::Stream,
    cycle: u64,
    generation: &mut tokio::sync::watch::Receiver<u64>,
) -> End {
    let mut committed = stream.committed.subscribe();
    let mut stop = role.inner.stop.subscribe();
    // Waiting holds no session slot, and not forever (a drain may wait for the vault).
    wire.permit = None;
    wire.buf.clear();
    let deadline = tokio::time::Instant::now() + COMMIT_WAIT;
    loop {
        let point = stream
            .known()
            .and_then(|k| k.committed)
            .filter(|(c, _)| *c >= cycle);
        if let Some((c, point_id)) = point {
            if c == cycle {
                return End::Send(GatewayFrame::PointCommitted(PointCommitted {
                    cycle,
                    point_id,
                }));
            }
            return End::Quiet;
        }
        tokio::select! {
            r = committed.changed() => if r.is_err() { return End::Quiet },
            r = wire.fill() => match r {
                // Nothing may follow the EndOfCycle on this session.
                Ok(true) => {
                    return error(
                        error_code::OUT_OF_SEQUENCE,
                        format!("a frame after the EndOfCycle of cycle {cycle}"),
                    );
                }
                _ => return End::Quiet,
            },
            _ = generation.changed() => return End::Quiet,
            _ = stop.changed() => return End::Quiet,
            () = tokio::time::sleep_until(deadline) => return End::Quiet,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::frame::{Chunk, MIN_CHUNK_SIZE, Zero};

    /// A held chunk counts its bytes, and an agent that keeps to the default window (16 MiB
    /// of frames, `docs/agent-protocol.md` §7.5) never reaches the cap, even with the
    /// smallest chunks (the most frames per byte).
    #[test]
    fn held_frames_count_their_bytes() {
        let chunk = AgentFrame::Chunk(Chunk {
            seq: 1,
            index: 0,
            bytes: bytes::Bytes::from(vec![0; 1000]),
        });
        let zero = AgentFrame::Zero(Zero {
            seq: 2,
            first_index: 1,
            count: 1,
        });
        assert_eq!(held_bytes(&[(1, chunk), (2, zero)]), 1000 + 64 + 64);
        let min = MIN_CHUNK_SIZE as usize;
        let window = 16usize << 20;
        assert!(window / min * (min + 64) <= MAX_HELD_BYTES);
    }
}
