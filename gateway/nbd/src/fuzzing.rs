//! Entry point for fuzzing the server with whole client conversations.
//!
//! Everything an NBD client sends is attacker-controlled: the client flags of the handshake,
//! every option (magic, code, length, data) and every transmission request (magic, flags,
//! type, cookie, offset, length, payload). [`fuzz_session`] feeds arbitrary bytes, as one
//! client's side of a conversation, to the real connection code ([`crate::server`]'s
//! handshake and transmission, the same functions a TCP connection runs) over an in-memory
//! duplex stream, against small in-memory exports. The only acceptable outcomes are a clean
//! end or a framing error that closes the connection — never a panic, a hang, or an
//! allocation beyond the server's caps ([`fuzz_options`]: 64 KiB requests, so no allocation
//! of a session comes near 1 MiB; run libFuzzer with `-malloc_limit_mb=1` to catch one).
//!
//! The conversation ends when the input is exhausted: the client side is shut down for
//! writing (the server reads EOF) while everything the server sends is drained, and the server
//! must finish within [`SESSION_LIMIT`]; otherwise [`fuzz_session`] panics, so a hang is a
//! finding like a panic. The exports' source panics if the server ever reads outside it (the
//! server promises to check every range first).
//!
//! The cargo-fuzz target `nbd_session` (`fuzz/`) calls [`fuzz_session`], and
//! `tests::mutation_smoke` runs it on a few thousand mutations of [`seeds`] in every
//! `cargo test`.

use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::AsyncWriteExt;

use crate::export::{BlockSource, Export, OVERLAY_BLOCK, SourceError};
use crate::proto::*;
use crate::server::{self, ServerOptions};

/// Longest a session may take, from its first byte to the server's end, before it counts as a
/// hang (the largest inputs libFuzzer makes take milliseconds).
pub const SESSION_LIMIT: Duration = Duration::from_secs(5);

/// Name of the main export (also the default one: the empty name selects it).
pub const DISK: &str = "disk";
/// Name of an export of 0 bytes.
pub const EMPTY: &str = "empty";
/// Name of an export whose every read of its source fails (`NBD_EIO`).
pub const BROKEN: &str = "broken";

/// Size of [`DISK`]: 32 overlay blocks and a short tail, so writes meet partial blocks and
/// the short last block, and a zeroing request can be far longer than the request cap.
pub const DISK_SIZE: u64 = 32 * OVERLAY_BLOCK + 1000;
/// Size of [`BROKEN`].
const BROKEN_SIZE: u64 = 8192;

/// The server's limits while fuzzing: the default ones but for a 64 KiB request cap (the
/// smallest sensible, so the fuzzer meets it and executions stay fast), a handshake deadline
/// longer than [`SESSION_LIMIT`] (so it never hides a hang) and no log output.
pub fn fuzz_options() -> ServerOptions {
    ServerOptions {
        max_request: 64 << 10,
        handshake_timeout: SESSION_LIMIT * 2,
        log: discard,
        ..ServerOptions::default()
    }
}

fn discard(_line: &str) {}

/// A [`BlockSource`] computed from the offset (no buffer, so the only allocations are the
/// server's): byte `i` is [`pattern`]`(i)`, or every read fails when `fail`.
struct MemSource {
    size: u64,
    fail: bool,
}

/// Byte `at` of [`DISK`]: differs at every offset of a block and from one block to the next.
fn pattern(at: u64) -> u8 {
    ((at % 251) ^ (at >> 16)).to_le_bytes()[0]
}

impl BlockSource for MemSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at<'a>(
        &'a self,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        // The server promises to ask only for ranges within the size: hold it to that.
        let end = offset.checked_add(buf.len() as u64);
        assert!(
            end.is_some_and(|end| end <= self.size),
            "the server read {} bytes at {offset} from a source of {} bytes",
            buf.len(),
            self.size
        );
        Box::pin(async move {
            if self.fail {
                return Err("injected read failure".into());
            }
            for (at, b) in (offset..).zip(buf.iter_mut()) {
                *b = pattern(at);
            }
            Ok(())
        })
    }
}

/// The exports of one session: [`DISK`] (the default), [`EMPTY`] and [`BROKEN`], all
/// read-only, or all writable with an overlay in `/dev/shm` or else the temporary directory
/// (created and unlinked at once, gone when the session ends).
fn exports(writable: bool) -> Vec<Arc<Export>> {
    [
        (DISK, DISK_SIZE, false),
        (EMPTY, 0, false),
        (BROKEN, BROKEN_SIZE, true),
    ]
    .into_iter()
    .map(|(name, size, fail)| {
        let src = Arc::new(MemSource { size, fail });
        let e = if writable {
            // Memory-backed when possible: a flush is then free, and fuzzing fast.
            Export::writable(name, src.clone(), Path::new("/dev/shm"))
                .or_else(|_| Export::writable(name, src, &std::env::temp_dir()))
                .expect("an overlay file in /dev/shm or the temporary directory")
        } else {
            Export::read_only(name, src).expect("a short name")
        };
        Arc::new(e.with_description("a fuzzed recovery point"))
    })
    .collect()
}

thread_local! {
    /// One runtime per thread, reused by every session (building one per input would dwarf
    /// the session itself). Single-threaded, so a session's steps are deterministic.
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// Runs `data` as one client's whole conversation with the server: `data[0]` picks the exports
/// (odd: writable, even: read-only), the rest is what the client sends — client flags, options,
/// then requests and their payloads. Panics only on a finding: a panic in the server, or a
/// server still running [`SESSION_LIMIT`] after the session began.
pub fn fuzz_session(data: &[u8]) {
    let Some((&variant, script)) = data.split_first() else {
        return;
    };
    RUNTIME.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a tokio runtime")
        });
        let exports = exports(variant & 1 == 1);
        let opts = fuzz_options();
        // The deadline is made inside the runtime: its timer needs the runtime's clock.
        let finished = rt.block_on(async {
            tokio::time::timeout(SESSION_LIMIT, session(script, &exports, &opts)).await
        });
        assert!(
            finished.is_ok(),
            "the server did not finish within {SESSION_LIMIT:?} of a {}-byte conversation",
            data.len()
        );
    });
}

/// The client writes `script` then shuts its side down; everything the server writes is
/// drained at once (a client that does not read would stall the server, which is TCP's
/// business, not the server's). Returns when the server has returned and both client halves
/// are done.
async fn session(script: &[u8], exports: &[Arc<Export>], opts: &ServerOptions) {
    let (client, srv) = tokio::io::duplex(16 << 10);
    let (mut from_server, mut to_server) = tokio::io::split(client);
    let feed = async move {
        // The server may close first (a framing error): then the rest of the script is moot.
        if to_server.write_all(script).await.is_ok() {
            let _ = to_server.shutdown().await;
        }
        drop(to_server);
    };
    let drain = async move {
        let _ = tokio::io::copy(&mut from_server, &mut tokio::io::sink()).await;
    };
    // A connection's errors are what the server logs and closes on: not findings.
    let serve = async move {
        let _ = server::serve(srv, exports, opts).await;
    };
    tokio::join!(feed, drain, serve);
}

/// A client's side of a conversation, built field by field; remembers where the 32-bit length
/// fields are so mutations can bump them.
#[derive(Debug, Default)]
struct Script {
    bytes: Vec<u8>,
    /// Offsets of the u32 length fields (option lengths, name lengths, request lengths).
    lens: Vec<usize>,
}

impl Script {
    /// Starts a conversation: the variant byte, then the client flags.
    fn new(writable: bool, client_flags: u32) -> Self {
        let mut s = Self::default();
        s.bytes.push(u8::from(writable));
        s.bytes.extend_from_slice(&client_flags.to_be_bytes());
        s
    }

    fn len_field(&mut self, len: usize) {
        self.lens.push(self.bytes.len());
        let len = u32::try_from(len).expect("seed fields are small");
        self.bytes.extend_from_slice(&len.to_be_bytes());
    }

    fn opt(mut self, opt: u32, data: &[u8]) -> Self {
        self.bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
        self.bytes.extend_from_slice(&opt.to_be_bytes());
        self.len_field(data.len());
        self.bytes.extend_from_slice(data);
        self
    }

    /// `NBD_OPT_INFO` or `NBD_OPT_GO` for `name`, asking for `infos`.
    fn info(mut self, opt: u32, name: &str, infos: &[u16]) -> Self {
        self.bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
        self.bytes.extend_from_slice(&opt.to_be_bytes());
        self.len_field(4 + name.len() + 2 + 2 * infos.len());
        self.len_field(name.len());
        self.bytes.extend_from_slice(name.as_bytes());
        let count = u16::try_from(infos.len()).expect("a few infos");
        self.bytes.extend_from_slice(&count.to_be_bytes());
        for i in infos {
            self.bytes.extend_from_slice(&i.to_be_bytes());
        }
        self
    }

    /// A request; `payload` follows the header for writes.
    fn req(mut self, flags: u16, typ: u16, offset: u64, len: usize, payload: &[u8]) -> Self {
        self.bytes
            .extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        self.bytes.extend_from_slice(&flags.to_be_bytes());
        self.bytes.extend_from_slice(&typ.to_be_bytes());
        let cookie = 0xC0FF_EE00 ^ offset;
        self.bytes.extend_from_slice(&cookie.to_be_bytes());
        self.bytes.extend_from_slice(&offset.to_be_bytes());
        self.len_field(len);
        self.bytes.extend_from_slice(payload);
        self
    }
}

/// Valid conversations covering every option and command (for the smoke test, and as a
/// fuzzing corpus).
fn scripts() -> Vec<Script> {
    let both = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    let all_infos = [
        NBD_INFO_EXPORT,
        NBD_INFO_NAME,
        NBD_INFO_DESCRIPTION,
        NBD_INFO_BLOCK_SIZE,
    ];
    let block = OVERLAY_BLOCK;
    vec![
        // GO, reads (across blocks, the tail, past the end, over the cap), DISC.
        Script::new(false, both)
            .info(NBD_OPT_GO, DISK, &all_infos)
            .req(0, NBD_CMD_READ, 0, 4096, &[])
            .req(0, NBD_CMD_READ, block - 3, 10, &[])
            .req(0, NBD_CMD_READ, DISK_SIZE - 1000, 1000, &[])
            .req(0, NBD_CMD_READ, DISK_SIZE - 10, 11, &[])
            .req(0, NBD_CMD_READ, 0, (64 << 10) + 1, &[])
            .req(0, NBD_CMD_WRITE, 0, 4, b"evil")
            .req(0, NBD_CMD_DISC, 0, 0, &[]),
        // EXPORT_NAME without NO_ZEROES on a writable export: writes, zeroes, trim, flush,
        // then reads of what was written.
        Script::new(true, NBD_FLAG_C_FIXED_NEWSTYLE)
            .opt(NBD_OPT_EXPORT_NAME, DISK.as_bytes())
            .req(0, NBD_CMD_WRITE, block - 5, 20, &[0xab; 20])
            .req(NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, DISK_SIZE - 7, 7, &[1; 7])
            .req(0, NBD_CMD_WRITE_ZEROES, 10, 3 * 4096, &[])
            .req(0, NBD_CMD_WRITE_ZEROES, 3, (256 << 10) + 5, &[])
            .req(0, NBD_CMD_TRIM, 0, 4096, &[])
            .req(0, NBD_CMD_FLUSH, 0, 0, &[])
            .req(0, NBD_CMD_READ, block - 100, 200, &[])
            .req(0, NBD_CMD_WRITE, DISK_SIZE - 2, 4, b"xxxx"),
        // LIST, INFO, unsupported options, ABORT.
        Script::new(false, both)
            .opt(NBD_OPT_LIST, &[])
            .info(NBD_OPT_INFO, EMPTY, &[NBD_INFO_NAME])
            .opt(NBD_OPT_STRUCTURED_REPLY, &[])
            .info(NBD_OPT_GO, "nope", &[])
            .opt(NBD_OPT_ABORT, &[]),
        // The default export by the empty name, then a source that fails.
        Script::new(true, both)
            .info(NBD_OPT_INFO, "", &[NBD_INFO_DESCRIPTION])
            .info(NBD_OPT_GO, BROKEN, &[])
            .req(0, NBD_CMD_READ, 100, 100, &[])
            .req(0, NBD_CMD_WRITE, 4096, 8, &[2; 8])
            .req(0, NBD_CMD_WRITE_ZEROES, 0, 4096, &[])
            .req(0, 99, 0, 0, &[]),
        // An empty export: zero-length requests at its end.
        Script::new(true, both)
            .opt(NBD_OPT_EXPORT_NAME, EMPTY.as_bytes())
            .req(0, NBD_CMD_READ, 0, 0, &[])
            .req(0, NBD_CMD_WRITE, 0, 0, &[])
            .req(0, NBD_CMD_WRITE_ZEROES, 0, 0, &[])
            .req(0, NBD_CMD_READ, 0, 1, &[]),
    ]
}

/// Valid conversations, as [`fuzz_session`] inputs: a fuzzing corpus to start from.
pub fn seeds() -> Vec<Vec<u8>> {
    scripts().into_iter().map(|s| s.bytes).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{self, RecvTimeoutError};

    use super::*;

    /// xorshift64*: deterministic and dependency-free.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// In `0..n` (`n > 0`).
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// One to three mutations of `s`: bit flips, truncation, inserted or overwritten random
    /// bytes, a duplicated slice, or a length field set to an interesting value.
    fn mutate(s: &Script, rng: &mut Rng) -> Vec<u8> {
        let mut d = s.bytes.clone();
        for _ in 0..1 + rng.below(3) {
            if d.is_empty() {
                break;
            }
            match rng.below(6) {
                0 => {
                    let i = rng.below(d.len());
                    d[i] ^= 1 << rng.below(8);
                }
                1 => d.truncate(rng.below(d.len())),
                2 => {
                    let at = rng.below(d.len() + 1);
                    let n = 1 + rng.below(16);
                    let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                    d.splice(at..at, junk);
                }
                3 => {
                    for _ in 0..1 + rng.below(8) {
                        let i = rng.below(d.len());
                        d[i] = rng.next() as u8;
                    }
                }
                4 => {
                    let from = rng.below(d.len());
                    let to = from + rng.below(d.len() - from) + 1;
                    let piece = d[from..to].to_vec();
                    let at = rng.below(d.len() + 1);
                    d.splice(at..at, piece);
                }
                _ => {
                    let at = s.lens[rng.below(s.lens.len())];
                    if at + 4 > d.len() {
                        continue;
                    }
                    let old = u32::from_be_bytes(d[at..at + 4].try_into().unwrap());
                    let cap = fuzz_options().max_request;
                    let new = match rng.below(8) {
                        0 => old.wrapping_add(1),
                        1 => old.wrapping_sub(1),
                        2 => 0,
                        3 => u32::MAX,
                        4 => (16 << 10) + 1,
                        5 => cap,
                        6 => cap + 1,
                        _ => rng.next() as u32,
                    };
                    d[at..at + 4].copy_from_slice(&new.to_be_bytes());
                }
            }
        }
        d
    }

    /// Mutations per seed conversation.
    const PER_SCRIPT: usize = 600;

    /// Every seed and a few thousand deterministic mutations of them through
    /// [`fuzz_session`], on a worker thread watched by this one: a panic fails the test, and
    /// so does a session still running after twice [`SESSION_LIMIT`] (a hang that never
    /// yields to the runtime, which the session's own deadline cannot catch).
    #[test]
    fn mutation_smoke() {
        let mut rng = Rng(0x5EED_F0E5_2026_0001);
        let mut cases = Vec::new();
        for s in scripts() {
            cases.push(s.bytes.clone());
            for _ in 0..PER_SCRIPT {
                cases.push(mutate(&s, &mut rng));
            }
        }
        let cases = Arc::new(cases);
        let (tx, rx) = mpsc::channel();
        let worker = {
            let cases = cases.clone();
            std::thread::spawn(move || {
                for (i, case) in cases.iter().enumerate() {
                    fuzz_session(case);
                    if tx.send(i).is_err() {
                        return;
                    }
                }
            })
        };
        let mut done = 0;
        loop {
            match rx.recv_timeout(SESSION_LIMIT * 2) {
                Ok(_) => done += 1,
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("session {done} hung; input: {:02x?}", cases[done]);
                }
            }
        }
        if let Err(p) = worker.join() {
            eprintln!("session {done} panicked; input: {:02x?}", cases[done]);
            std::panic::resume_unwind(p);
        }
        assert_eq!(done, cases.len());
    }

    /// The seeds are well-formed: each reaches the end it was written for (checked on the
    /// server's replies), so the mutations start from deep inside the protocol.
    #[test]
    fn seeds_are_valid_conversations() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        for (i, seed) in seeds().iter().enumerate() {
            let (&variant, script) = seed.split_first().unwrap();
            let exports = exports(variant & 1 == 1);
            let out = rt.block_on(replies(script, &exports));
            assert_eq!(out[..8], NBDMAGIC.to_be_bytes(), "seed {i}");
            // Every seed gets at least one reply beyond the greeting, and the ones in
            // transmission get a simple reply.
            assert!(out.len() > 18, "seed {i}: {} bytes", out.len());
            let simple = NBD_SIMPLE_REPLY_MAGIC.to_be_bytes();
            let in_transmission = out.windows(4).any(|w| w == simple);
            assert_eq!(in_transmission, i != 2, "seed {i}");
        }
    }

    /// What the server sends for `script`.
    async fn replies(script: &[u8], exports: &[Arc<Export>]) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let (client, srv) = tokio::io::duplex(1 << 20);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let opts = fuzz_options();
        let feed = async move {
            to_server.write_all(script).await.unwrap();
            to_server.shutdown().await.unwrap();
        };
        let serve = async move {
            server::serve(srv, exports, &opts).await.unwrap();
        };
        let mut out = Vec::new();
        let read = from_server.read_to_end(&mut out);
        let (_, _, r) = tokio::join!(feed, serve, read);
        r.unwrap();
        out
    }
}
