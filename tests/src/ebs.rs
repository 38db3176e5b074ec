//! A small EBS direct APIs server for the incremental path of the `aws` adapter.
//!
//! Why not moto: moto's `ListChangedBlocks` is wrong. It walks only the first snapshot's blocks
//! and ignores the blocks that exist only in the second one and the parent relation, so an
//! incremental tested against it would pass while missing every newly written block. moto is
//! still used for the full-read test (`tests/tests/e2e/ebs.rs`); this server follows the AWS API
//! reference ("EBS direct APIs": `ListSnapshotBlocks`, `ListChangedBlocks`, `GetSnapshotBlock`)
//! for the rest:
//!
//! - 512 KiB blocks; `VolumeSize` in GiB; blocks never written are not listed (read as zeros).
//! - Pagination with `maxResults` (100–10000, else `ValidationException`), an opaque
//!   `NextToken`/`pageToken`, and `startingBlockIndex`.
//! - Opaque block tokens (base64, with `+`, `/`, `=`), checked by `GetSnapshotBlock`;
//!   `ExpiryTime` ten minutes ahead.
//! - `GetSnapshotBlock` answers the bytes with `x-amz-Data-Length`, `x-amz-Checksum` (base64
//!   SHA-256) and `x-amz-Checksum-Algorithm: SHA256`.
//! - `ListChangedBlocks` lists every block index whose content differs between the two
//!   snapshots (present in either), with `FirstBlockToken`/`SecondBlockToken` (absent on the
//!   side that does not have the block); without `firstSnapshotId` it lists the second
//!   snapshot's blocks.
//! - Every request must carry a valid AWS Signature Version 4 for service `ebs` (checked here
//!   with its own implementation of the algorithm); otherwise `403 InvalidSignatureException`.
//!
//! Faults can be injected ([`Fault`]) to test what the adapter does with a hostile server.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// The EBS block size.
pub const BLOCK: usize = 512 << 10;

/// A misbehaviour to inject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `GetSnapshotBlock` of this block index answers a checksum of other bytes.
    WrongChecksum(u64),
    /// `GetSnapshotBlock` of this block index answers only half the block (headers say so).
    TruncatedBlock(u64),
    /// `ListSnapshotBlocks` ignores `startingBlockIndex` and `pageToken`: every call answers
    /// the first page with the same `NextToken`, forever.
    LoopingNextToken,
}

#[derive(Debug, Default)]
struct Snapshot {
    volume_gib: u64,
    blocks: BTreeMap<u64, Arc<Vec<u8>>>,
}

#[derive(Debug, Default)]
struct State {
    snapshots: BTreeMap<String, Snapshot>,
    faults: Vec<Fault>,
}

/// The running server; stopped when dropped.
#[derive(Debug)]
pub struct EbsServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    block_reads: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

#[derive(Debug, Clone)]
struct Creds {
    key: String,
    secret: String,
    region: String,
}

impl EbsServer {
    /// Start on a free port, accepting requests signed with `key`/`secret` for `region`.
    pub fn start(key: &str, secret: &str, region: &str) -> EbsServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let block_reads = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let creds = Creds {
            key: key.into(),
            secret: secret.into(),
            region: region.into(),
        };
        {
            let (state, stop, block_reads, requests) = (
                state.clone(),
                stop.clone(),
                block_reads.clone(),
                requests.clone(),
            );
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (state, creds, block_reads, requests) = (
                        state.clone(),
                        creds.clone(),
                        block_reads.clone(),
                        requests.clone(),
                    );
                    std::thread::spawn(move || {
                        serve_connection(conn, &state, &creds, &block_reads, &requests);
                    });
                }
            });
        }
        EbsServer {
            port,
            state,
            stop,
            block_reads,
            requests,
        }
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Add snapshot `id` of a volume whose content is the file `image`: its non-zero 512 KiB
    /// blocks (a never-written block of a real volume is not in the snapshot either).
    pub fn add_snapshot_from_image(&self, id: &str, image: &Path) {
        let mut f = std::fs::File::open(image).expect("open image");
        let size = f.metadata().expect("metadata").len();
        let mut snap = Snapshot {
            volume_gib: size.div_ceil(1 << 30).max(1),
            blocks: BTreeMap::new(),
        };
        let mut index = 0u64;
        loop {
            let mut buf = vec![0u8; BLOCK];
            let mut got = 0;
            while got < BLOCK {
                let n = f.read(&mut buf[got..]).expect("read image");
                if n == 0 {
                    break;
                }
                got += n;
            }
            if got == 0 {
                break;
            }
            if buf.iter().any(|&b| b != 0) {
                snap.blocks.insert(index, Arc::new(buf));
            }
            index += 1;
            if got < BLOCK {
                break;
            }
        }
        self.state
            .lock()
            .expect("state")
            .snapshots
            .insert(id.into(), snap);
    }

    /// Inject a fault.
    pub fn inject(&self, fault: Fault) {
        self.state.lock().expect("state").faults.push(fault);
    }

    /// Number of blocks in snapshot `id`.
    pub fn block_count(&self, id: &str) -> usize {
        self.state.lock().expect("state").snapshots[id].blocks.len()
    }

    /// Block indices listed in snapshot `id`.
    pub fn blocks(&self, id: &str) -> Vec<u64> {
        self.state.lock().expect("state").snapshots[id]
            .blocks
            .keys()
            .copied()
            .collect()
    }

    /// Block indices whose content differs between two snapshots.
    pub fn changed_blocks(&self, first: &str, second: &str) -> Vec<u64> {
        let st = self.state.lock().expect("state");
        changed(&st.snapshots[first], &st.snapshots[second])
    }

    /// `GetSnapshotBlock` calls answered with data so far.
    pub fn block_reads(&self) -> u64 {
        self.block_reads.load(Ordering::Relaxed)
    }

    /// Requests received so far (any, including refused ones).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for EbsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn changed(a: &Snapshot, b: &Snapshot) -> Vec<u64> {
    let mut out: Vec<u64> = a
        .blocks
        .keys()
        .chain(b.blocks.keys())
        .copied()
        .filter(|i| a.blocks.get(i) != b.blocks.get(i))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn json(status: u16, v: &serde_json::Value) -> Response {
    Response {
        status,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: v.to_string().into_bytes(),
    }
}

fn error(status: u16, kind: &str, message: &str) -> Response {
    let mut r = json(status, &serde_json::json!({ "message": message }));
    r.headers.push(("x-amzn-ErrorType".into(), kind.into()));
    r
}

fn serve_connection(
    conn: TcpStream,
    state: &Mutex<State>,
    creds: &Creds,
    block_reads: &AtomicU64,
    requests: &AtomicU64,
) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(conn);
    loop {
        let Some(req) = read_request(&mut reader) else {
            return;
        };
        requests.fetch_add(1, Ordering::Relaxed);
        let close = req
            .headers
            .iter()
            .any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case("close"));
        let resp = match check_signature(&req, creds) {
            Err(why) => error(403, "InvalidSignatureException", &why),
            Ok(()) => handle(&req, state, block_reads),
        };
        let mut head = format!(
            "HTTP/1.1 {} X\r\nContent-Length: {}\r\n",
            resp.status,
            resp.body.len()
        );
        for (k, v) in &resp.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        if writer.write_all(head.as_bytes()).is_err() || writer.write_all(&resp.body).is_err() {
            return;
        }
        if close {
            return;
        }
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len.min(1 << 20)];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        target,
        headers,
        body,
    })
}

fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(s.get(i + 1..i + 3).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn aws_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn hmac_sha256(key: &[u8], data: &str) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("hmac key");
    m.update(data.as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// Verify the request's SigV4 `Authorization` the way AWS does.
fn check_signature(req: &Request, creds: &Creds) -> Result<(), String> {
    let auth = header(req, "authorization").ok_or("missing Authorization header")?;
    let rest = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("Authorization is not AWS4-HMAC-SHA256")?;
    let mut credential = None;
    let mut signed = None;
    let mut signature = None;
    for part in rest.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or("malformed Authorization")?;
        match k {
            "Credential" => credential = Some(v),
            "SignedHeaders" => signed = Some(v),
            "Signature" => signature = Some(v),
            _ => return Err(format!("unexpected Authorization field {k}")),
        }
    }
    let (credential, signed, signature) = (
        credential.ok_or("no Credential")?,
        signed.ok_or("no SignedHeaders")?,
        signature.ok_or("no Signature")?,
    );
    let scope: Vec<&str> = credential.split('/').collect();
    if scope.len() != 5 || scope[4] != "aws4_request" {
        return Err("malformed credential scope".into());
    }
    if scope[0] != creds.key {
        return Err("The security token included in the request is invalid.".into());
    }
    if scope[2] != creds.region || scope[3] != "ebs" {
        return Err(format!(
            "credential scope {}/{} should be {}/ebs",
            scope[2], scope[3], creds.region
        ));
    }
    let amz_date = header(req, "x-amz-date").ok_or("missing x-amz-date")?;
    if !amz_date.starts_with(scope[1]) {
        return Err("x-amz-date does not match the credential scope date".into());
    }
    let signed_list: Vec<&str> = signed.split(';').collect();
    for must in ["host", "x-amz-date"] {
        if !signed_list.contains(&must) {
            return Err(format!("{must} is not signed"));
        }
    }
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let uri: String = path
        .split('/')
        .map(aws_encode)
        .collect::<Vec<_>>()
        .join("/");
    let mut q: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                aws_encode(&percent_decode(k)),
                aws_encode(&percent_decode(v)),
            )
        })
        .collect();
    q.sort();
    let q = q
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut canon_headers = String::new();
    for name in &signed_list {
        let values: Vec<String> = req
            .headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        if values.is_empty() {
            return Err(format!("signed header {name} is missing"));
        }
        canon_headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    let canonical = format!(
        "{}\n{uri}\n{q}\n{canon_headers}\n{signed}\n{}",
        req.method,
        hex::encode(Sha256::digest(&req.body))
    );
    let sts = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{}\n{}",
        scope[1..].join("/"),
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let mut key = hmac_sha256(format!("AWS4{}", creds.secret).as_bytes(), scope[1]);
    for p in &scope[2..] {
        key = hmac_sha256(&key, p);
    }
    if hex::encode(hmac_sha256(&key, &sts)) != signature {
        return Err("The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.".into());
    }
    Ok(())
}

fn block_token(snapshot: &str, index: u64) -> String {
    let mut h = Sha256::new();
    h.update(snapshot.as_bytes());
    h.update(index.to_le_bytes());
    h.update(b"ferry-ebs-test-server");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

fn page_token(next: u64) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("next={next}"))
}

fn parse_page_token(t: &str) -> Option<u64> {
    let raw = base64::engine::general_purpose::STANDARD.decode(t).ok()?;
    String::from_utf8(raw)
        .ok()?
        .strip_prefix("next=")?
        .parse()
        .ok()
}

fn expiry() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
        + 600.0
}

fn handle(req: &Request, state: &Mutex<State>, block_reads: &AtomicU64) -> Response {
    use serde_json::{Map, Value as V, json};
    if req.method != "GET" {
        return error(405, "ValidationException", "only GET is served here");
    }
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let params: BTreeMap<String, String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let segs: Vec<String> = path.split('/').skip(1).map(percent_decode).collect();
    let st = state.lock().expect("state");
    let max_results = match params.get("maxResults").map(|v| v.parse::<u64>()) {
        None => 10_000,
        Some(Ok(n)) if (100..=10_000).contains(&n) => n,
        Some(_) => {
            return error(
                400,
                "ValidationException",
                "maxResults must be between 100 and 10000",
            );
        }
    };
    let start = match params.get("pageToken") {
        Some(t) => match parse_page_token(t) {
            Some(n) => n,
            None => {
                return error(
                    400,
                    "ValidationException",
                    "The pagination token is invalid.",
                );
            }
        },
        None => params
            .get("startingBlockIndex")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    };
    let looping = st.faults.contains(&Fault::LoopingNextToken);
    match segs
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["snapshots", id, "blocks"] => {
            let Some(snap) = st.snapshots.get(*id) else {
                return error(
                    404,
                    "ResourceNotFoundException",
                    "The snapshot does not exist.",
                );
            };
            let start = if looping { 0 } else { start };
            let mut blocks = Vec::new();
            let mut next = None;
            for (&i, _) in snap.blocks.range(start..) {
                if blocks.len() as u64 == max_results {
                    next = Some(i);
                    break;
                }
                blocks.push(json!({ "BlockIndex": i, "BlockToken": block_token(id, i) }));
            }
            if looping {
                next = Some(1);
            }
            let mut fields = json!({
                "BlockSize": BLOCK,
                "Blocks": blocks,
                "ExpiryTime": expiry(),
                "VolumeSize": snap.volume_gib,
            });
            if let Some(n) = next {
                fields["NextToken"] = V::String(page_token(n));
            }
            self::json(200, &fields)
        }
        ["snapshots", id, "changedblocks"] => {
            let Some(second) = st.snapshots.get(*id) else {
                return error(
                    404,
                    "ResourceNotFoundException",
                    "The snapshot does not exist.",
                );
            };
            let first_id = params.get("firstSnapshotId");
            let empty = Snapshot::default();
            let first = match first_id {
                Some(f) => match st.snapshots.get(f) {
                    Some(s) => s,
                    None => {
                        return error(
                            404,
                            "ResourceNotFoundException",
                            "The first snapshot does not exist.",
                        );
                    }
                },
                None => &empty,
            };
            if first_id.is_some() && first.volume_gib > second.volume_gib {
                return error(
                    400,
                    "ValidationException",
                    "the first snapshot's volume is larger than the second's",
                );
            }
            let mut out = Vec::new();
            let mut next = None;
            for i in changed(first, second).into_iter().filter(|&i| i >= start) {
                if out.len() as u64 == max_results {
                    next = Some(i);
                    break;
                }
                let mut f = Map::new();
                f.insert("BlockIndex".into(), json!(i));
                if first_id.is_some() && first.blocks.contains_key(&i) {
                    f.insert(
                        "FirstBlockToken".into(),
                        V::String(block_token(first_id.map_or("", String::as_str), i)),
                    );
                }
                if second.blocks.contains_key(&i) {
                    f.insert("SecondBlockToken".into(), V::String(block_token(id, i)));
                }
                out.push(V::Object(f));
            }
            let mut fields = json!({
                "BlockSize": BLOCK,
                "ChangedBlocks": out,
                "ExpiryTime": expiry(),
                "VolumeSize": second.volume_gib,
            });
            if let Some(n) = next {
                fields["NextToken"] = V::String(page_token(n));
            }
            self::json(200, &fields)
        }
        ["snapshots", id, "blocks", index] => {
            let Some(snap) = st.snapshots.get(*id) else {
                return error(
                    404,
                    "ResourceNotFoundException",
                    "The snapshot does not exist.",
                );
            };
            let Ok(index) = index.parse::<u64>() else {
                return error(400, "ValidationException", "BlockIndex is not a number");
            };
            if params.get("blockToken").map(String::as_str) != Some(block_token(id, index).as_str())
            {
                return error(400, "ValidationException", "The block token is invalid.");
            }
            let Some(data) = snap.blocks.get(&index) else {
                return error(
                    404,
                    "ResourceNotFoundException",
                    "The block does not exist.",
                );
            };
            block_reads.fetch_add(1, Ordering::Relaxed);
            let mut checksum =
                base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&**data));
            let mut body = (**data).clone();
            if st.faults.contains(&Fault::WrongChecksum(index)) {
                checksum =
                    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(b"other"));
            }
            if st.faults.contains(&Fault::TruncatedBlock(index)) {
                body.truncate(BLOCK / 2);
            }
            Response {
                status: 200,
                headers: vec![
                    ("Content-Type".into(), "application/octet-stream".into()),
                    ("x-amz-Data-Length".into(), body.len().to_string()),
                    ("x-amz-Checksum".into(), checksum),
                    ("x-amz-Checksum-Algorithm".into(), "SHA256".into()),
                ],
                body,
            }
        }
        _ => error(404, "ResourceNotFoundException", "no such API"),
    }
}
