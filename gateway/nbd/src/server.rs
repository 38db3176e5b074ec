//! The TCP server: accepts connections (at most `max_connections` at once), runs the fixed
//! newstyle handshake under a deadline, then serves requests one at a time per connection
//! with simple replies.
//!
//! A connection that breaks the framing (a bad magic, an option over the length cap, a write
//! whose payload is over the request cap, an unknown export for `NBD_OPT_EXPORT_NAME`) is
//! closed with one log line naming the peer and what was wrong; a well-framed bad request (a
//! read past the end, a write on a read-only export, an over-long read, an unknown command)
//! gets an error reply and the connection goes on. A connection never affects another: each
//! is its own task, and nothing they share is held across a panic.
//!
//! Memory: each connection holds at most one request's data (`max_request` bytes), so the
//! server holds at most `max_connections × max_request` plus the exports' own bounds.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::export::{Export, IoError};
use crate::proto::*;

/// Largest option data accepted during the handshake (a name is at most 4096 bytes).
const MAX_OPTION_LEN: u32 = 16 << 10;

/// Limits of a [`Server`].
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// Connections served at once; more are closed at once, with a log line.
    pub max_connections: usize,
    /// Largest read or write payload of one request, bytes (also advertised as the maximum
    /// block size).
    pub max_request: u32,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Where log lines go (one line per event, no trailing newline).
    pub log: fn(&str),
}

fn log_stderr(line: &str) {
    eprintln!("ferry-nbd: {line}");
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            max_request: 32 << 20,
            handshake_timeout: Duration::from_secs(10),
            log: log_stderr,
        }
    }
}

/// Errors of the server as a whole (a connection's own errors are logged and end only it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The listening socket failed.
    #[error("listening socket: {0}")]
    Listen(#[source] std::io::Error),
    /// Two exports share a name.
    #[error("export name `{0}` is used twice")]
    DuplicateExport(String),
    /// No export to serve.
    #[error("no export to serve")]
    NoExports,
    /// The options cannot work.
    #[error("invalid server option: {0}")]
    InvalidOption(&'static str),
}

/// What ended a connection other than the client leaving properly; logged.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("unknown client flags {0:#x}")]
    ClientFlags(u32),
    #[error("bad option magic {0:#018x} (expected IHAVEOPT)")]
    OptionMagic(u64),
    #[error("option {opt} with {len} bytes of data, over the {MAX_OPTION_LEN}-byte cap")]
    OptionTooLong { opt: u32, len: u32 },
    #[error("NBD_OPT_EXPORT_NAME for unknown export `{0}`")]
    UnknownExport(String),
    #[error("bad request magic {0:#010x}")]
    RequestMagic(u32),
    #[error("write of {len} bytes, over the {cap}-byte request cap")]
    WriteTooLarge { len: u32, cap: u32 },
}

/// An NBD server bound to a TCP address, serving a fixed set of exports.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    exports: Arc<Vec<Arc<Export>>>,
    opts: ServerOptions,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port: see [`Server::local_addr`]). The first export
    /// is also the default one (the empty name selects it).
    pub async fn bind(
        addr: SocketAddr,
        exports: Vec<Export>,
        opts: ServerOptions,
    ) -> Result<Self, ServerError> {
        if exports.is_empty() {
            return Err(ServerError::NoExports);
        }
        if opts.max_connections == 0 {
            return Err(ServerError::InvalidOption(
                "max_connections must be at least 1",
            ));
        }
        if opts.max_request < 4096 {
            return Err(ServerError::InvalidOption(
                "max_request must be at least 4096",
            ));
        }
        for (i, e) in exports.iter().enumerate() {
            if exports[..i].iter().any(|o| o.name() == e.name()) {
                return Err(ServerError::DuplicateExport(e.name().to_string()));
            }
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        Ok(Self {
            listener,
            exports: Arc::new(exports.into_iter().map(Arc::new).collect()),
            opts,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, ServerError> {
        self.listener.local_addr().map_err(ServerError::Listen)
    }

    /// The exports served.
    pub fn exports(&self) -> &[Arc<Export>] {
        &self.exports
    }

    /// Accepts and serves connections until `shutdown` completes; then stops accepting and
    /// closes every connection.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let slots = Arc::new(Semaphore::new(self.opts.max_connections));
        let mut conns = JoinSet::new();
        let log = self.opts.log;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                r = self.listener.accept() => {
                    let (sock, peer) = match r {
                        Ok(x) => x,
                        Err(e) => {
                            // Out of file descriptors and the like: wait, then go on.
                            log(&format!("accept failed: {e}"));
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        log(&format!(
                            "{peer}: refused: already serving {} connections",
                            self.opts.max_connections
                        ));
                        drop(sock);
                        continue;
                    };
                    let _ = sock.set_nodelay(true);
                    let exports = self.exports.clone();
                    let opts = self.opts;
                    conns.spawn(async move {
                        let _permit = permit;
                        if let Err(e) = serve(sock, &exports, &opts).await {
                            (opts.log)(&format!("{peer}: closing connection: {e}"));
                        }
                    });
                }
            }
        }
        conns.shutdown().await;
        Ok(())
    }
}

/// A connection's byte stream: a [`TcpStream`](tokio::net::TcpStream) when serving, an
/// in-memory duplex stream when fuzzing ([`crate::fuzzing`]).
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

type Conn<S> = BufStream<S>;

/// One connection: handshake, then transmission. Returns when the client leaves (EOF between
/// requests, `NBD_CMD_DISC`, `NBD_OPT_ABORT`) or on the first framing error; `sock` is closed
/// (dropped) on return.
pub(crate) async fn serve<S: Stream>(
    sock: S,
    exports: &[Arc<Export>],
    opts: &ServerOptions,
) -> Result<(), ConnError> {
    let mut c = BufStream::new(sock);
    let export = match tokio::time::timeout(
        opts.handshake_timeout,
        handshake(&mut c, exports, opts),
    )
    .await
    {
        Err(_) => return Err(ConnError::HandshakeTimeout(opts.handshake_timeout)),
        Ok(r) => r?,
    };
    match export {
        Some(e) => transmission(&mut c, &e, opts).await,
        None => Ok(()),
    }
}

fn find<'a>(exports: &'a [Arc<Export>], name: &str) -> Option<&'a Arc<Export>> {
    if name.is_empty() {
        return exports.first();
    }
    exports.iter().find(|e| e.name() == name)
}

async fn reply<S: Stream>(
    c: &mut Conn<S>,
    opt: u32,
    typ: u32,
    data: &[u8],
) -> Result<(), ConnError> {
    c.write_u64(NBD_REP_MAGIC).await?;
    c.write_u32(opt).await?;
    c.write_u32(typ).await?;
    c.write_u32(u32::try_from(data.len()).expect("replies are small"))
        .await?;
    c.write_all(data).await?;
    Ok(())
}

async fn reply_error<S: Stream>(
    c: &mut Conn<S>,
    opt: u32,
    typ: u32,
    msg: &str,
) -> Result<(), ConnError> {
    reply(c, opt, typ, msg.as_bytes()).await?;
    c.flush().await?;
    Ok(())
}

/// Fixed newstyle negotiation. Returns the export chosen, or `None` when the client aborted.
async fn handshake<S: Stream>(
    c: &mut Conn<S>,
    exports: &[Arc<Export>],
    opts: &ServerOptions,
) -> Result<Option<Arc<Export>>, ConnError> {
    c.write_u64(NBDMAGIC).await?;
    c.write_u64(IHAVEOPT).await?;
    c.write_u16(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)
        .await?;
    c.flush().await?;
    let client = c.read_u32().await?;
    if client & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnError::ClientFlags(client));
    }
    let no_zeroes = client & NBD_FLAG_C_NO_ZEROES != 0;
    loop {
        let magic = c.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(ConnError::OptionMagic(magic));
        }
        let opt = c.read_u32().await?;
        let len = c.read_u32().await?;
        if len > MAX_OPTION_LEN {
            return Err(ConnError::OptionTooLong { opt, len });
        }
        let mut data = vec![0u8; len as usize];
        c.read_exact(&mut data).await?;
        match opt {
            NBD_OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(e) = find(exports, &name) else {
                    return Err(ConnError::UnknownExport(name.chars().take(200).collect()));
                };
                c.write_u64(e.size()).await?;
                c.write_u16(e.flags()).await?;
                if !no_zeroes {
                    c.write_all(&[0u8; 124]).await?;
                }
                c.flush().await?;
                return Ok(Some(e.clone()));
            }
            NBD_OPT_ABORT => {
                // The client may already be gone: its leaving is not an error.
                let _ = reply_error(c, opt, NBD_REP_ACK, "").await;
                return Ok(None);
            }
            NBD_OPT_LIST => {
                if !data.is_empty() {
                    reply_error(c, opt, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                for e in exports {
                    let mut d = Vec::with_capacity(4 + e.name().len());
                    d.extend_from_slice(&name_len(e.name()).to_be_bytes());
                    d.extend_from_slice(e.name().as_bytes());
                    reply(c, opt, NBD_REP_SERVER, &d).await?;
                }
                reply_error(c, opt, NBD_REP_ACK, "").await?;
            }
            NBD_OPT_INFO | NBD_OPT_GO => {
                let Some((name, infos)) = parse_info(&data) else {
                    reply_error(
                        c,
                        opt,
                        NBD_REP_ERR_INVALID,
                        "malformed NBD_OPT_INFO/NBD_OPT_GO data",
                    )
                    .await?;
                    continue;
                };
                let Some(e) = find(exports, &name) else {
                    let msg = format!(
                        "no export named `{}`",
                        name.chars().take(200).collect::<String>()
                    );
                    reply_error(c, opt, NBD_REP_ERR_UNKNOWN, &msg).await?;
                    continue;
                };
                let mut d = Vec::with_capacity(12);
                d.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
                d.extend_from_slice(&e.size().to_be_bytes());
                d.extend_from_slice(&e.flags().to_be_bytes());
                reply(c, opt, NBD_REP_INFO, &d).await?;
                // Any byte offset works; 4 KiB is preferred; payloads up to the request cap.
                let mut d = Vec::with_capacity(14);
                d.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
                d.extend_from_slice(&1u32.to_be_bytes());
                d.extend_from_slice(&4096u32.to_be_bytes());
                d.extend_from_slice(&opts.max_request.to_be_bytes());
                reply(c, opt, NBD_REP_INFO, &d).await?;
                for info in infos {
                    let text = match info {
                        NBD_INFO_NAME => e.name(),
                        NBD_INFO_DESCRIPTION => e.description(),
                        _ => continue,
                    };
                    let mut d = Vec::with_capacity(2 + text.len());
                    d.extend_from_slice(&info.to_be_bytes());
                    d.extend_from_slice(text.as_bytes());
                    reply(c, opt, NBD_REP_INFO, &d).await?;
                }
                reply_error(c, opt, NBD_REP_ACK, "").await?;
                if opt == NBD_OPT_GO {
                    return Ok(Some(e.clone()));
                }
            }
            _ => {
                let msg = format!("option {opt} is not supported by this server");
                reply_error(c, opt, NBD_REP_ERR_UNSUP, &msg).await?;
            }
        }
    }
}

fn name_len(name: &str) -> u32 {
    // Names are checked to be at most MAX_NAME_LEN bytes when an export is made.
    u32::try_from(name.len()).expect("export names are at most 4096 bytes")
}

/// `u32 name length | name | u16 count | count × u16 info type`, exactly.
fn parse_info(d: &[u8]) -> Option<(String, Vec<u16>)> {
    let n = usize::try_from(u32::from_be_bytes(d.get(..4)?.try_into().ok()?)).ok()?;
    let name = std::str::from_utf8(d.get(4..4usize.checked_add(n)?)?).ok()?;
    let rest = &d[4 + n..];
    let count = usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?));
    let list = &rest[2..];
    if list.len() != count * 2 {
        return None;
    }
    let infos = list
        .chunks_exact(2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .collect();
    Some((name.to_string(), infos))
}

async fn simple_reply<S: Stream>(
    c: &mut Conn<S>,
    error: u32,
    cookie: u64,
    data: &[u8],
) -> Result<(), ConnError> {
    c.write_u32(NBD_SIMPLE_REPLY_MAGIC).await?;
    c.write_u32(error).await?;
    c.write_u64(cookie).await?;
    if error == 0 {
        c.write_all(data).await?;
    }
    c.flush().await?;
    Ok(())
}

/// Serves requests until the client disconnects.
async fn transmission<S: Stream>(
    c: &mut Conn<S>,
    e: &Export,
    opts: &ServerOptions,
) -> Result<(), ConnError> {
    let log = opts.log;
    let size = e.size();
    let io_error = |what: &str, offset: u64, len: u32, err: &IoError| {
        log(&format!(
            "export `{}`: {what} of {len} bytes at {offset} failed: {err}",
            e.name()
        ));
        NBD_EIO
    };
    loop {
        let mut h = [0u8; REQUEST_LEN];
        match c.read_exact(&mut h).await {
            Ok(_) => {}
            // The client went away between requests: not an error.
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(err) => return Err(err.into()),
        }
        let magic = u32::from_be_bytes(h[0..4].try_into().expect("4 bytes"));
        let flags = u16::from_be_bytes(h[4..6].try_into().expect("2 bytes"));
        let typ = u16::from_be_bytes(h[6..8].try_into().expect("2 bytes"));
        let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
        let offset = u64::from_be_bytes(h[16..24].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(h[24..28].try_into().expect("4 bytes"));
        if magic != NBD_REQUEST_MAGIC {
            return Err(ConnError::RequestMagic(magic));
        }
        let fua = flags & NBD_CMD_FLAG_FUA != 0;
        let in_range = offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= size);
        match typ {
            NBD_CMD_READ => {
                // Over the request cap or past the end: EINVAL (no payload to skip).
                if len > opts.max_request || !in_range {
                    simple_reply(c, NBD_EINVAL, cookie, &[]).await?;
                } else {
                    let mut buf = vec![0u8; len as usize];
                    match e.read(offset, &mut buf).await {
                        Ok(()) => simple_reply(c, 0, cookie, &buf).await?,
                        Err(err) => {
                            let code = io_error("read", offset, len, &err);
                            simple_reply(c, code, cookie, &[]).await?;
                        }
                    }
                }
            }
            NBD_CMD_WRITE => {
                if len > opts.max_request {
                    // The payload cannot be skipped safely: refuse, then close.
                    simple_reply(c, NBD_EINVAL, cookie, &[]).await?;
                    return Err(ConnError::WriteTooLarge {
                        len,
                        cap: opts.max_request,
                    });
                }
                let mut buf = vec![0u8; len as usize];
                c.read_exact(&mut buf).await?;
                let code = if e.is_read_only() {
                    NBD_EPERM
                } else if !in_range {
                    NBD_ENOSPC
                } else {
                    match e.write(offset, &buf, fua).await {
                        Ok(()) => 0,
                        Err(err) => io_error("write", offset, len, &err),
                    }
                };
                simple_reply(c, code, cookie, &[]).await?;
            }
            NBD_CMD_WRITE_ZEROES | NBD_CMD_TRIM => {
                let code = if e.is_read_only() {
                    NBD_EPERM
                } else if !in_range {
                    NBD_ENOSPC
                } else if typ == NBD_CMD_TRIM {
                    // Advisory: the data stays as it was, which the protocol allows.
                    0
                } else {
                    match e
                        .write_zeroes(offset, u64::from(len), opts.max_request, fua)
                        .await
                    {
                        Ok(()) => 0,
                        Err(err) => io_error("write zeroes", offset, len, &err),
                    }
                };
                simple_reply(c, code, cookie, &[]).await?;
            }
            NBD_CMD_FLUSH => {
                let code = match e.flush().await {
                    Ok(()) => 0,
                    Err(err) => io_error("flush", offset, len, &err),
                };
                simple_reply(c, code, cookie, &[]).await?;
            }
            NBD_CMD_DISC => return Ok(()),
            _ => simple_reply(c, NBD_EINVAL, cookie, &[]).await?,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::BufStream;
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;

    use super::*;
    use crate::testkit;

    static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

    fn collect(line: &str) {
        LOG.lock().unwrap().push(line.to_string());
    }

    fn logged(needle: &str) -> bool {
        LOG.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    struct Running {
        addr: SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<Result<(), ServerError>>,
    }

    impl Running {
        async fn stop(mut self) {
            let _ = self.stop.take().unwrap().send(());
            self.task.await.unwrap().unwrap();
        }
    }

    async fn start(exports: Vec<Export>, opts: ServerOptions) -> Running {
        let s = Server::bind("127.0.0.1:0".parse().unwrap(), exports, opts)
            .await
            .unwrap();
        let addr = s.local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(s.run(async {
            let _ = rx.await;
        }));
        Running {
            addr,
            stop: Some(tx),
            task,
        }
    }

    fn opts() -> ServerOptions {
        ServerOptions {
            max_request: 1 << 20,
            log: collect,
            ..ServerOptions::default()
        }
    }

    /// A test client speaking the protocol byte by byte.
    struct Client {
        s: BufStream<TcpStream>,
    }

    impl Client {
        /// Connects and reads the server's greeting; does not answer it.
        async fn greet(addr: SocketAddr) -> Self {
            let mut s = BufStream::new(TcpStream::connect(addr).await.unwrap());
            assert_eq!(s.read_u64().await.unwrap(), NBDMAGIC);
            assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
            assert_eq!(
                s.read_u16().await.unwrap(),
                NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
            );
            Self { s }
        }

        async fn connect(addr: SocketAddr) -> Self {
            let mut c = Self::greet(addr).await;
            c.s.write_u32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
                .await
                .unwrap();
            c
        }

        async fn opt(&mut self, opt: u32, data: &[u8]) {
            self.s.write_u64(IHAVEOPT).await.unwrap();
            self.s.write_u32(opt).await.unwrap();
            self.s.write_u32(data.len() as u32).await.unwrap();
            self.s.write_all(data).await.unwrap();
            self.s.flush().await.unwrap();
        }

        async fn rep(&mut self, opt: u32) -> (u32, Vec<u8>) {
            assert_eq!(self.s.read_u64().await.unwrap(), NBD_REP_MAGIC);
            assert_eq!(self.s.read_u32().await.unwrap(), opt);
            let typ = self.s.read_u32().await.unwrap();
            let len = self.s.read_u32().await.unwrap();
            let mut d = vec![0u8; len as usize];
            self.s.read_exact(&mut d).await.unwrap();
            (typ, d)
        }

        fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
            for i in infos {
                d.extend_from_slice(&i.to_be_bytes());
            }
            d
        }

        /// `NBD_OPT_GO` (or `INFO`): the size and flags, or the error reply type.
        async fn go(&mut self, opt: u32, name: &str) -> Result<(u64, u16, Vec<Vec<u8>>), u32> {
            self.opt(opt, &Self::info_data(name, &[NBD_INFO_NAME]))
                .await;
            let mut export = None;
            let mut infos = Vec::new();
            loop {
                let (typ, d) = self.rep(opt).await;
                match typ {
                    NBD_REP_INFO => {
                        if u16::from_be_bytes([d[0], d[1]]) == NBD_INFO_EXPORT {
                            let size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                            let flags = u16::from_be_bytes([d[10], d[11]]);
                            export = Some((size, flags));
                        }
                        infos.push(d);
                    }
                    NBD_REP_ACK => {
                        let (size, flags) = export.expect("NBD_INFO_EXPORT before the ACK");
                        return Ok((size, flags, infos));
                    }
                    e => return Err(e),
                }
            }
        }

        async fn send(&mut self, typ: u16, offset: u64, len: u32, payload: &[u8]) {
            self.s.write_u32(NBD_REQUEST_MAGIC).await.unwrap();
            self.s.write_u16(0).await.unwrap();
            self.s.write_u16(typ).await.unwrap();
            self.s.write_u64(0xC0FFEE ^ offset).await.unwrap();
            self.s.write_u64(offset).await.unwrap();
            self.s.write_u32(len).await.unwrap();
            self.s.write_all(payload).await.unwrap();
            self.s.flush().await.unwrap();
        }

        /// One request; returns the error number and, for a successful read, the data.
        async fn cmd(&mut self, typ: u16, offset: u64, len: u32, payload: &[u8]) -> (u32, Vec<u8>) {
            self.send(typ, offset, len, payload).await;
            assert_eq!(self.s.read_u32().await.unwrap(), NBD_SIMPLE_REPLY_MAGIC);
            let err = self.s.read_u32().await.unwrap();
            assert_eq!(self.s.read_u64().await.unwrap(), 0xC0FFEE ^ offset);
            let mut d = Vec::new();
            if typ == NBD_CMD_READ && err == 0 {
                d.resize(len as usize, 0);
                self.s.read_exact(&mut d).await.unwrap();
            }
            (err, d)
        }

        async fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
            let (err, d) = self.cmd(NBD_CMD_READ, offset, len, &[]).await;
            assert_eq!(err, 0, "read {len} at {offset}");
            d
        }

        /// Whether the server closed the connection (EOF within a few seconds).
        async fn closed(&mut self) -> bool {
            let mut b = [0u8; 1];
            matches!(
                tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut b)).await,
                Ok(Ok(0) | Err(_))
            )
        }
    }

    #[tokio::test]
    async fn read_only_export_serves_the_point_and_refuses_bad_requests() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, img) = testkit::reader(dir.path()).await;
        let size = img.len() as u64;
        let e = Export::read_only("web-disk0", Arc::new(reader)).unwrap();
        let srv = start(vec![e], opts()).await;
        let mut c = Client::connect(srv.addr).await;
        let (got, flags, infos) = c.go(NBD_OPT_GO, "web-disk0").await.unwrap();
        assert_eq!(got, size);
        for f in [
            NBD_FLAG_HAS_FLAGS,
            NBD_FLAG_READ_ONLY,
            NBD_FLAG_CAN_MULTI_CONN,
            NBD_FLAG_SEND_FLUSH,
            NBD_FLAG_SEND_WRITE_ZEROES,
        ] {
            assert_ne!(flags & f, 0, "flag {f:#x} in {flags:#x}");
        }
        assert!(
            infos
                .iter()
                .any(|d| d[..2] == NBD_INFO_BLOCK_SIZE.to_be_bytes())
        );
        assert!(infos.iter().any(|d| d[..] == *b"\0\x01web-disk0"));
        // Reads at odd offsets and lengths, across chunks, the hole and the tail.
        for (at, len) in [
            (0u64, 4096u32),
            (1, 1),
            (testkit::CS - 3, 10),
            (3 * testkit::CS + 17, 300_000),
            (19 * testkit::CS, 2 * testkit::CS as u32),
            (size - 1000, 1000),
            (size - 1, 1),
        ] {
            assert_eq!(
                c.read(at, len).await,
                img[at as usize..(at + u64::from(len)) as usize],
                "{len} at {at}"
            );
        }
        // Past the end, over the request cap: EINVAL, and the connection goes on.
        assert_eq!(c.cmd(NBD_CMD_READ, size - 10, 11, &[]).await.0, NBD_EINVAL);
        assert_eq!(c.cmd(NBD_CMD_READ, u64::MAX, 1, &[]).await.0, NBD_EINVAL);
        assert_eq!(
            c.cmd(NBD_CMD_READ, 0, (1 << 20) + 1, &[]).await.0,
            NBD_EINVAL
        );
        // Writes of any kind on a read-only export: EPERM.
        assert_eq!(c.cmd(NBD_CMD_WRITE, 0, 4, b"evil").await.0, NBD_EPERM);
        assert_eq!(c.cmd(NBD_CMD_WRITE_ZEROES, 0, 4096, &[]).await.0, NBD_EPERM);
        assert_eq!(c.cmd(NBD_CMD_TRIM, 0, 4096, &[]).await.0, NBD_EPERM);
        // Flush is fine; an unknown command is EINVAL.
        assert_eq!(c.cmd(NBD_CMD_FLUSH, 0, 0, &[]).await.0, 0);
        assert_eq!(c.cmd(99, 0, 0, &[]).await.0, NBD_EINVAL);
        assert_eq!(c.read(0, 8).await, img[..8]);
        c.send(NBD_CMD_DISC, 0, 0, &[]).await;
        assert!(c.closed().await);
        srv.stop().await;
    }

    #[tokio::test]
    async fn option_haggling() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, img) = testkit::reader(dir.path()).await;
        let e = Export::read_only("a", Arc::new(reader.clone()))
            .unwrap()
            .with_description("point X");
        let e2 = Export::read_only("b", Arc::new(reader)).unwrap();
        let srv = start(vec![e, e2], opts()).await;
        let mut c = Client::connect(srv.addr).await;
        // LIST: both names, then ACK.
        c.opt(NBD_OPT_LIST, &[]).await;
        let mut names = Vec::new();
        loop {
            let (typ, d) = c.rep(NBD_OPT_LIST).await;
            if typ == NBD_REP_ACK {
                break;
            }
            assert_eq!(typ, NBD_REP_SERVER);
            names.push(String::from_utf8(d[4..].to_vec()).unwrap());
        }
        assert_eq!(names, ["a", "b"]);
        c.opt(NBD_OPT_LIST, b"x").await;
        assert_eq!(c.rep(NBD_OPT_LIST).await.0, NBD_REP_ERR_INVALID);
        // INFO then unknown names, unknown options, malformed data: errors, connection kept.
        assert_eq!(c.go(NBD_OPT_INFO, "b").await.unwrap().0, img.len() as u64);
        assert_eq!(
            c.go(NBD_OPT_GO, "nope").await.unwrap_err(),
            NBD_REP_ERR_UNKNOWN
        );
        c.opt(NBD_OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(c.rep(NBD_OPT_STRUCTURED_REPLY).await.0, NBD_REP_ERR_UNSUP);
        c.opt(NBD_OPT_STARTTLS, &[]).await;
        assert_eq!(c.rep(NBD_OPT_STARTTLS).await.0, NBD_REP_ERR_UNSUP);
        c.opt(12345, b"whatever").await;
        assert_eq!(c.rep(12345).await.0, NBD_REP_ERR_UNSUP);
        let mut bad = Client::info_data("a", &[1, 2]);
        bad.pop();
        c.opt(NBD_OPT_GO, &bad).await;
        assert_eq!(c.rep(NBD_OPT_GO).await.0, NBD_REP_ERR_INVALID);
        c.opt(NBD_OPT_GO, &[0, 0, 0, 9, b'a']).await;
        assert_eq!(c.rep(NBD_OPT_GO).await.0, NBD_REP_ERR_INVALID);
        // Old-style NBD_OPT_EXPORT_NAME (no zeroes negotiated); the empty name is the first
        // export.
        c.opt(NBD_OPT_EXPORT_NAME, b"").await;
        assert_eq!(c.s.read_u64().await.unwrap(), img.len() as u64);
        let flags = c.s.read_u16().await.unwrap();
        assert_ne!(flags & NBD_FLAG_READ_ONLY, 0);
        assert_eq!(c.read(5, 5).await, img[5..10]);
        // ABORT gets an ACK and the connection ends.
        let mut c = Client::connect(srv.addr).await;
        c.opt(NBD_OPT_ABORT, &[]).await;
        assert_eq!(c.rep(NBD_OPT_ABORT).await.0, NBD_REP_ACK);
        assert!(c.closed().await);
        // Without NO_ZEROES, EXPORT_NAME is followed by 124 zero bytes.
        let mut c = Client::greet(srv.addr).await;
        c.s.write_u32(NBD_FLAG_C_FIXED_NEWSTYLE).await.unwrap();
        c.opt(NBD_OPT_EXPORT_NAME, b"b").await;
        assert_eq!(c.s.read_u64().await.unwrap(), img.len() as u64);
        c.s.read_u16().await.unwrap();
        let mut z = [1u8; 124];
        c.s.read_exact(&mut z).await.unwrap();
        assert_eq!(z, [0u8; 124]);
        assert_eq!(c.read(0, 3).await, img[..3]);
        srv.stop().await;
    }

    #[tokio::test]
    async fn broken_framing_closes_only_that_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, img) = testkit::reader(dir.path()).await;
        let e = Export::read_only("d", Arc::new(reader)).unwrap();
        let srv = start(
            vec![e],
            ServerOptions {
                handshake_timeout: Duration::from_millis(300),
                ..opts()
            },
        )
        .await;
        // A client in transmission all along.
        let mut steady = Client::connect(srv.addr).await;
        steady.go(NBD_OPT_GO, "d").await.unwrap();

        // Unknown client flags.
        let mut c = Client::greet(srv.addr).await;
        c.s.write_u32(0xdead_0000).await.unwrap();
        c.s.flush().await.unwrap();
        assert!(c.closed().await);
        // Garbage instead of an option.
        let mut c = Client::connect(srv.addr).await;
        c.s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        c.s.flush().await.unwrap();
        assert!(c.closed().await);
        // An option over the length cap.
        let mut c = Client::connect(srv.addr).await;
        c.s.write_u64(IHAVEOPT).await.unwrap();
        c.s.write_u32(NBD_OPT_GO).await.unwrap();
        c.s.write_u32(u32::MAX).await.unwrap();
        c.s.flush().await.unwrap();
        assert!(c.closed().await);
        // An unknown name with EXPORT_NAME (which has no error reply).
        let mut c = Client::connect(srv.addr).await;
        c.opt(NBD_OPT_EXPORT_NAME, b"nope").await;
        assert!(c.closed().await);
        // A silent client is cut at the handshake deadline.
        let mut c = Client::greet(srv.addr).await;
        assert!(c.closed().await);
        // A bad request magic in transmission.
        let mut c = Client::connect(srv.addr).await;
        c.go(NBD_OPT_GO, "d").await.unwrap();
        c.s.write_all(&[0x55; 28]).await.unwrap();
        c.s.flush().await.unwrap();
        assert!(c.closed().await);
        // A write over the request cap: EINVAL, then closed (its payload cannot be skipped).
        let mut c = Client::connect(srv.addr).await;
        c.go(NBD_OPT_GO, "d").await.unwrap();
        assert_eq!(
            c.cmd(NBD_CMD_WRITE, 0, (1 << 20) + 1, &[]).await.0,
            NBD_EINVAL
        );
        assert!(c.closed().await);

        for needle in [
            "unknown client flags 0xdead0000",
            "bad option magic",
            "over the 16384-byte cap",
            "unknown export `nope`",
            "handshake not finished within",
            "bad request magic 0x55555555",
            "over the 1048576-byte request cap",
        ] {
            assert!(logged(needle), "`{needle}` in {:?}", LOG.lock().unwrap());
        }
        // The steady client and new ones are served.
        assert_eq!(steady.read(100, 100).await, img[100..200]);
        let mut c = Client::connect(srv.addr).await;
        c.go(NBD_OPT_GO, "d").await.unwrap();
        assert_eq!(c.read(0, 10).await, img[..10]);
        srv.stop().await;
    }

    #[tokio::test]
    async fn connections_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, _img) = testkit::reader(dir.path()).await;
        let e = Export::read_only("d", Arc::new(reader)).unwrap();
        let srv = start(
            vec![e],
            ServerOptions {
                max_connections: 1,
                ..opts()
            },
        )
        .await;
        let mut first = Client::connect(srv.addr).await;
        first.go(NBD_OPT_GO, "d").await.unwrap();
        let mut second = TcpStream::connect(srv.addr).await.unwrap();
        let mut b = [0u8; 1];
        assert_eq!(second.read(&mut b).await.unwrap(), 0);
        assert!(logged("already serving 1 connections"));
        drop(first);
        // The slot comes back once the first connection is gone.
        let mut ok = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut s = TcpStream::connect(srv.addr).await.unwrap();
            if s.read_u64().await.is_ok_and(|m| m == NBDMAGIC) {
                ok = true;
                break;
            }
        }
        assert!(ok);
        srv.stop().await;
    }

    #[tokio::test]
    async fn writable_export_keeps_writes_in_the_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, img) = testkit::reader(dir.path()).await;
        let size = img.len() as u64;
        let e = Export::writable("w", Arc::new(reader.clone()), dir.path()).unwrap();
        let srv = start(vec![e], opts()).await;
        let mut c = Client::connect(srv.addr).await;
        let (got, flags, _) = c.go(NBD_OPT_GO, "w").await.unwrap();
        assert_eq!(got, size);
        assert_eq!(flags & (NBD_FLAG_READ_ONLY | NBD_FLAG_CAN_MULTI_CONN), 0);
        assert_ne!(flags & NBD_FLAG_SEND_TRIM, 0);
        let mut want = img.clone();
        let at = (1u64 << 20) + 3;
        assert_eq!(c.cmd(NBD_CMD_WRITE, at, 70_000, &[0xab; 70_000]).await.0, 0);
        want[at as usize..at as usize + 70_000].fill(0xab);
        assert_eq!(c.cmd(NBD_CMD_WRITE_ZEROES, 10, 20, &[]).await.0, 0);
        want[10..30].fill(0);
        assert_eq!(c.cmd(NBD_CMD_TRIM, 0, 4096, &[]).await.0, 0);
        assert_eq!(c.cmd(NBD_CMD_FLUSH, 0, 0, &[]).await.0, 0);
        // Past the end: ENOSPC, and nothing written.
        assert_eq!(
            c.cmd(NBD_CMD_WRITE, size - 2, 4, b"xxxx").await.0,
            NBD_ENOSPC
        );
        assert_eq!(
            c.cmd(NBD_CMD_WRITE_ZEROES, size, 1, &[]).await.0,
            NBD_ENOSPC
        );
        assert_eq!(c.read(0, 1 << 20).await, want[..1 << 20]);
        // Another connection sees the writes.
        let mut d = Client::connect(srv.addr).await;
        d.go(NBD_OPT_GO, "w").await.unwrap();
        let mut all = Vec::new();
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(1 << 20) as u32;
            all.extend(d.read(off, n).await);
            off += u64::from(n);
        }
        assert_eq!(all, want);
        srv.stop().await;
        // The point is untouched.
        let mut base = vec![0u8; img.len()];
        reader.read_at(0, &mut base).await.unwrap();
        assert_eq!(base, img);
    }

    #[tokio::test]
    async fn bad_server_setups_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, _img) = testkit::reader(dir.path()).await;
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let e = || Export::read_only("same", Arc::new(reader.clone())).unwrap();
        assert!(matches!(
            Server::bind(any, vec![], opts()).await,
            Err(ServerError::NoExports)
        ));
        assert!(matches!(
            Server::bind(any, vec![e(), e()], opts()).await,
            Err(ServerError::DuplicateExport(_))
        ));
        let s = Server::bind(any, vec![e()], opts()).await.unwrap();
        let taken = s.local_addr().unwrap();
        assert!(matches!(
            Server::bind(taken, vec![e()], opts()).await,
            Err(ServerError::Bind { .. })
        ));
        assert!(Export::read_only(&"n".repeat(5000), Arc::new(reader.clone())).is_err());
    }
}
