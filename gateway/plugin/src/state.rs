//! Per-instance host state and the host side of every import.
//!
//! One `State` lives in each `Store`, which lives for one job (an opened disk, one hook run).
//! Everything a guest can make the host allocate or wait for is capped here: memory growth
//! (the limiter), read sizes, open readers, log lines (rate limit and truncation), HTTP bodies
//! and headers, kv sizes, and the time of every import (a timeout each).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{ResourceLimiter, StoreContextMut, UpdateDeadline};

use crate::bindings::adapter::ferry::plugin::{clock, config, http, log, source, types};
use crate::bindings::hook::ferry::plugin::kv;
use crate::manifest::Limits;
use crate::source::{MAX_OPEN_READERS, ReaderHandle, SourceObject, check_related_name};

pub use types::Level;

/// Longest log line kept; the rest is cut and marked.
pub const MAX_LOG_LINE: usize = 4096;
/// Most extents returned by `reader.allocation` in one call.
pub const MAX_ALLOCATION_EXTENTS: usize = 65_536;
/// kv caps (documented in the WIT).
pub const KV_MAX_KEY: usize = 256;
pub const KV_MAX_VALUE: usize = 64 << 10;
pub const KV_MAX_KEYS: usize = 256;
const HTTP_MAX_HEADERS: usize = 64;
const HTTP_MAX_HEADER_BYTES: usize = 8 << 10;

/// Where plugin log lines go. Lines arrive truncated and rate limited.
pub trait LogSink: Send + Sync + std::fmt::Debug {
    fn log(&self, plugin: &str, level: Level, message: &str);
}

/// Writes `plugin NAME: LEVEL message` lines to stderr.
#[derive(Debug, Default)]
pub struct StderrLog;

impl LogSink for StderrLog {
    fn log(&self, plugin: &str, level: Level, message: &str) {
        eprintln!("plugin {plugin}: {} {message}", level_name(level));
    }
}

pub fn level_name(level: Level) -> &'static str {
    match level {
        Level::Trace => "TRACE",
        Level::Debug => "DEBUG",
        Level::Info => "INFO",
        Level::Warn => "WARN",
        Level::Error => "ERROR",
    }
}

/// Key-value state of one plan run, shared by the hooks of that run.
#[derive(Debug, Default, Clone)]
pub struct PlanKv {
    inner: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
}

impl PlanKv {
    pub fn new() -> PlanKv {
        PlanKv::default()
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.lock().get(key).cloned()
    }

    pub fn entries(&self) -> BTreeMap<String, Vec<u8>> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, key: String, value: Vec<u8>) -> Result<(), String> {
        if key.is_empty() || key.len() > KV_MAX_KEY {
            return Err(format!("kv key must be 1-{KV_MAX_KEY} bytes"));
        }
        if value.len() > KV_MAX_VALUE {
            return Err(format!(
                "kv value of {} bytes is over the {KV_MAX_VALUE}-byte cap",
                value.len()
            ));
        }
        let mut map = self.lock();
        if !map.contains_key(&key) && map.len() >= KV_MAX_KEYS {
            return Err(format!(
                "kv already holds the maximum of {KV_MAX_KEYS} keys"
            ));
        }
        map.insert(key, value);
        Ok(())
    }

    fn delete(&self, key: &str) {
        self.lock().remove(key);
    }
}

/// The memory limit hit, carried in the trap so the caller can name it.
#[derive(Debug, thiserror::Error)]
#[error("memory limit of {limit} bytes exceeded: the plugin asked for {requested} bytes")]
pub(crate) struct MemoryCapHit {
    pub limit: u64,
    pub requested: u64,
}

/// The wall-clock deadline hit (raised from the epoch callback).
#[derive(Debug, thiserror::Error)]
#[error("deadline exceeded")]
pub(crate) struct DeadlineHit;

#[derive(Debug)]
pub(crate) struct Limiter {
    memory_cap: u64,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let desired = desired as u64;
        if desired > self.memory_cap {
            return Err(wasmtime::Error::new(MemoryCapHit {
                limit: self.memory_cap,
                requested: desired,
            }));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }

    fn instances(&self) -> usize {
        32
    }

    fn tables(&self) -> usize {
        32
    }

    fn memories(&self) -> usize {
        4
    }
}

#[derive(Debug)]
struct LogGate {
    sink: Arc<dyn LogSink>,
    rate: f64,
    tokens: f64,
    last: Instant,
    dropped: u64,
    dropped_total: u64,
    last_error: Option<String>,
}

impl LogGate {
    fn admit(&mut self) -> bool {
        let now = Instant::now();
        let burst = self.rate * 2.0;
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// HTTP access for hooks: an allow-list and a client that never follows redirects.
#[derive(Debug, Clone)]
pub struct HttpAccess {
    pub(crate) allow: Vec<String>,
    pub(crate) client: crate::host::LazyHttpClient,
    /// Credentials the host signs this plugin's requests with (never shown to it).
    pub(crate) signer: Option<Arc<crate::sigv4::SigV4>>,
}

/// Everything one instance may touch.
#[derive(Debug)]
pub(crate) struct State {
    pub plugin: Arc<str>,
    pub limits: Arc<Limits>,
    pub limiter: Limiter,
    pub table: ResourceTable,
    log: LogGate,
    config: Arc<BTreeMap<String, String>>,
    related: Arc<[String]>,
    open_readers: usize,
    /// Open readers by id (for `location.related`); ids are never reused in an instance.
    readers: std::collections::HashMap<u32, Arc<dyn SourceObject>>,
    next_reader: u32,
    root: Option<Arc<dyn SourceObject>>,
    http: Option<HttpAccess>,
    kv: Option<PlanKv>,
    /// End of the current call (checked at every epoch tick).
    pub deadline: Instant,
}

pub(crate) struct StateInit {
    pub plugin: Arc<str>,
    pub limits: Arc<Limits>,
    pub sink: Arc<dyn LogSink>,
    pub config: Arc<BTreeMap<String, String>>,
    pub related: Arc<[String]>,
    pub http: Option<HttpAccess>,
    pub kv: Option<PlanKv>,
}

impl State {
    pub fn new(init: StateInit) -> State {
        let rate = f64::from(init.limits.log_lines_per_sec);
        State {
            limiter: Limiter {
                memory_cap: init.limits.memory_bytes(),
            },
            plugin: init.plugin,
            table: ResourceTable::new(),
            log: LogGate {
                sink: init.sink,
                rate,
                tokens: rate * 2.0,
                last: Instant::now(),
                dropped: 0,
                dropped_total: 0,
                last_error: None,
            },
            config: init.config,
            related: init.related,
            open_readers: 0,
            readers: std::collections::HashMap::new(),
            next_reader: 0,
            root: None,
            http: init.http,
            kv: init.kv,
            limits: init.limits,
            deadline: Instant::now(),
        }
    }

    /// Put the object handed to `disk.open` in the table.
    pub fn push_root(
        &mut self,
        object: Arc<dyn SourceObject>,
    ) -> wasmtime::Result<Resource<ReaderHandle>> {
        self.root = Some(object.clone());
        let handle = self.new_reader(object);
        Ok(self.table.push(handle)?)
    }

    fn new_reader(&mut self, object: Arc<dyn SourceObject>) -> ReaderHandle {
        self.open_readers += 1;
        let id = self.next_reader;
        self.next_reader = self.next_reader.saturating_add(1);
        self.readers.insert(id, object.clone());
        ReaderHandle { object, id }
    }

    /// The object of an open reader, by the id the plugin was told.
    pub fn reader_object(&self, id: u32) -> Option<Arc<dyn SourceObject>> {
        self.readers.get(&id).cloned()
    }

    pub fn dropped_log_lines(&self) -> u64 {
        self.log.dropped_total
    }

    pub fn last_error_log(&self) -> Option<&str> {
        self.log.last_error.as_deref()
    }

    fn import_timeout(&self) -> Duration {
        let left = self.deadline.saturating_duration_since(Instant::now());
        Duration::from_millis(self.limits.import_timeout_ms).min(left.max(Duration::from_millis(1)))
    }

    fn reader(&self, r: &Resource<ReaderHandle>) -> Result<Arc<dyn SourceObject>, types::IoError> {
        self.table
            .get(r)
            .map(|h| h.object.clone())
            .map_err(|e| io_err(types::IoErrorKind::Io, format!("bad reader handle: {e}")))
    }
}

/// Epoch callback: yield to the executor at each tick, stop the call past its deadline.
pub(crate) fn on_epoch(ctx: StoreContextMut<'_, State>) -> wasmtime::Result<UpdateDeadline> {
    if Instant::now() >= ctx.data().deadline {
        Err(wasmtime::Error::new(DeadlineHit))
    } else {
        Ok(UpdateDeadline::Yield(1))
    }
}

fn io_err(kind: types::IoErrorKind, message: impl Into<String>) -> types::IoError {
    types::IoError {
        kind,
        message: message.into(),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl types::Host for State {}

impl log::Host for State {
    async fn log(&mut self, level: Level, message: String) {
        if level == Level::Error {
            self.log.last_error = Some(truncate(&message, 512).to_string());
        }
        if !self.log.admit() {
            self.log.dropped += 1;
            self.log.dropped_total += 1;
            return;
        }
        let gate = &mut self.log;
        if gate.dropped > 0 {
            let n = gate.dropped;
            gate.dropped = 0;
            gate.sink.log(
                &self.plugin,
                Level::Warn,
                &format!("{n} log lines dropped by the rate limit"),
            );
        }
        if message.len() > MAX_LOG_LINE {
            let kept = truncate(&message, MAX_LOG_LINE);
            gate.sink.log(
                &self.plugin,
                level,
                &format!("{kept}… [truncated, {} bytes]", message.len()),
            );
        } else {
            gate.sink.log(&self.plugin, level, &message);
        }
    }
}

impl config::Host for State {
    async fn get(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }

    async fn keys(&mut self) -> Vec<String> {
        self.config.keys().cloned().collect()
    }
}

impl clock::Host for State {
    async fn now_ms(&mut self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

impl source::HostReader for State {
    async fn name(&mut self, r: Resource<ReaderHandle>) -> String {
        self.reader(&r)
            .map(|o| o.name().to_string())
            .unwrap_or_default()
    }

    async fn id(&mut self, r: Resource<ReaderHandle>) -> u32 {
        self.table.get(&r).map_or(u32::MAX, |h| h.id)
    }

    async fn size(&mut self, r: Resource<ReaderHandle>) -> u64 {
        self.reader(&r).map(|o| o.size()).unwrap_or(0)
    }

    async fn read(
        &mut self,
        r: Resource<ReaderHandle>,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, types::IoError> {
        let obj = self.reader(&r)?;
        if len > self.limits.max_read_bytes {
            return Err(io_err(
                types::IoErrorKind::Denied,
                format!(
                    "read of {len} bytes is over the host's cap of {} bytes (max-read-bytes)",
                    self.limits.max_read_bytes
                ),
            ));
        }
        let size = obj.size();
        if offset > size {
            return Err(io_err(
                types::IoErrorKind::OutOfRange,
                format!(
                    "read at {offset} is past the end of {} ({size} bytes)",
                    obj.name()
                ),
            ));
        }
        let n = u64::from(len).min(size - offset);
        let n = usize::try_from(n).unwrap_or(0);
        let timeout = self.import_timeout();
        let job = tokio::task::spawn_blocking(move || obj.read_vec(offset, n));
        match tokio::time::timeout(timeout, job).await {
            Ok(Ok(Ok(buf))) => Ok(buf),
            Ok(Ok(Err(e))) => Err(io_err(types::IoErrorKind::Io, format!("read failed: {e}"))),
            Ok(Err(e)) => Err(io_err(
                types::IoErrorKind::Io,
                format!("read task failed: {e}"),
            )),
            Err(_) => Err(io_err(
                types::IoErrorKind::Timeout,
                format!("read did not finish within {} ms", timeout.as_millis()),
            )),
        }
    }

    async fn allocation(
        &mut self,
        r: Resource<ReaderHandle>,
        offset: u64,
        length: u64,
    ) -> Result<Vec<types::Extent>, types::IoError> {
        let obj = self.reader(&r)?;
        let size = obj.size();
        if offset > size {
            return Err(io_err(
                types::IoErrorKind::OutOfRange,
                format!("allocation at {offset} is past the end ({size} bytes)"),
            ));
        }
        let timeout = self.import_timeout();
        let job = tokio::task::spawn_blocking(move || {
            obj.allocation(offset, length, MAX_ALLOCATION_EXTENTS)
        });
        match tokio::time::timeout(timeout, job).await {
            Ok(Ok(Ok(map))) => Ok(map
                .into_iter()
                .map(|a| types::Extent {
                    offset: a.offset,
                    length: a.length,
                    kind: if a.allocated {
                        types::ExtentKind::Data
                    } else {
                        types::ExtentKind::Unallocated
                    },
                })
                .collect()),
            Ok(Ok(Err(e))) => Err(io_err(
                types::IoErrorKind::Io,
                format!("allocation map failed: {e}"),
            )),
            Ok(Err(e)) => Err(io_err(
                types::IoErrorKind::Io,
                format!("allocation task failed: {e}"),
            )),
            Err(_) => Err(io_err(
                types::IoErrorKind::Timeout,
                "allocation map timed out",
            )),
        }
    }

    async fn drop(&mut self, r: Resource<ReaderHandle>) -> wasmtime::Result<()> {
        let handle = self.table.delete(r)?;
        self.readers.remove(&handle.id);
        self.open_readers = self.open_readers.saturating_sub(1);
        Ok(())
    }
}

impl source::Host for State {
    async fn open_related(
        &mut self,
        name: String,
    ) -> Result<Resource<ReaderHandle>, types::IoError> {
        check_related_name(&name, &self.related)
            .map_err(|m| io_err(types::IoErrorKind::Denied, m))?;
        if self.open_readers >= MAX_OPEN_READERS {
            return Err(io_err(
                types::IoErrorKind::Denied,
                format!("at most {MAX_OPEN_READERS} readers may be open at once"),
            ));
        }
        let Some(root) = self.root.clone() else {
            return Err(io_err(
                types::IoErrorKind::Denied,
                "no source object is open",
            ));
        };
        let timeout = self.import_timeout();
        let n = name.clone();
        let job = tokio::task::spawn_blocking(move || root.open_related(&n));
        let object = match tokio::time::timeout(timeout, job).await {
            Ok(Ok(Ok(o))) => o,
            Ok(Ok(Err(e))) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(io_err(
                    types::IoErrorKind::NotFound,
                    format!("related file {name:?} does not exist"),
                ));
            }
            Ok(Ok(Err(e))) => {
                return Err(io_err(
                    types::IoErrorKind::Io,
                    format!("related file {name:?}: {e}"),
                ));
            }
            Ok(Err(e)) => return Err(io_err(types::IoErrorKind::Io, e.to_string())),
            Err(_) => {
                return Err(io_err(
                    types::IoErrorKind::Timeout,
                    "open-related timed out",
                ));
            }
        };
        let handle = self.new_reader(object);
        self.table
            .push(handle)
            .map_err(|e| io_err(types::IoErrorKind::Io, e.to_string()))
    }
}

impl kv::Host for State {
    async fn get(&mut self, key: String) -> Option<Vec<u8>> {
        self.kv.as_ref().and_then(|kv| kv.get(&key))
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), types::IoError> {
        match &self.kv {
            Some(kv) => kv
                .set(key, value)
                .map_err(|m| io_err(types::IoErrorKind::Denied, m)),
            None => Err(io_err(types::IoErrorKind::Denied, "kv is not available")),
        }
    }

    async fn delete(&mut self, key: String) {
        if let Some(kv) = &self.kv {
            kv.delete(&key);
        }
    }
}

/// Is `url`'s host on the allow-list? Entries are `host` (any port) or `host:port`.
pub(crate) fn http_allowed(allow: &[String], url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = url.port_or_known_default();
    allow.iter().any(|entry| {
        let entry = entry.to_ascii_lowercase();
        match entry.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || entry.starts_with('[') => {
                let h = h.trim_start_matches('[').trim_end_matches(']');
                h == host && p.parse::<u16>().ok() == port
            }
            _ => entry == host,
        }
    })
}

impl http::Host for State {
    async fn send(&mut self, request: http::Request) -> Result<http::Response, types::IoError> {
        let Some(access) = self.http.clone() else {
            return Err(io_err(types::IoErrorKind::Denied, "http is not granted"));
        };
        let url = reqwest::Url::parse(&request.url).map_err(|e| {
            io_err(
                types::IoErrorKind::Denied,
                format!("bad URL {:?}: {e}", request.url),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(io_err(
                types::IoErrorKind::Denied,
                format!(
                    "scheme {:?} is not allowed (http or https only)",
                    url.scheme()
                ),
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(io_err(
                types::IoErrorKind::Denied,
                "URLs with credentials are refused",
            ));
        }
        if !http_allowed(&access.allow, &url) {
            return Err(io_err(
                types::IoErrorKind::Denied,
                format!(
                    "host {} is not on the plugin's http allow-list",
                    url.host_str().unwrap_or("?")
                ),
            ));
        }
        let method = match request.method.to_ascii_uppercase().as_str() {
            "GET" => reqwest::Method::GET,
            "POST" => reqwest::Method::POST,
            "PUT" => reqwest::Method::PUT,
            "DELETE" => reqwest::Method::DELETE,
            "HEAD" => reqwest::Method::HEAD,
            "PATCH" => reqwest::Method::PATCH,
            m => {
                return Err(io_err(
                    types::IoErrorKind::Denied,
                    format!("method {m:?} is not allowed"),
                ));
            }
        };
        let cap = self.limits.max_http_body_bytes as usize;
        if request.body.len() > cap {
            return Err(io_err(
                types::IoErrorKind::Denied,
                format!(
                    "request body of {} bytes is over the {cap}-byte cap",
                    request.body.len()
                ),
            ));
        }
        if request.headers.len() > HTTP_MAX_HEADERS
            || request
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
                > HTTP_MAX_HEADER_BYTES
        {
            return Err(io_err(
                types::IoErrorKind::Denied,
                "too many or too large request headers",
            ));
        }
        let client = access
            .client
            .get()
            .map_err(|m| io_err(types::IoErrorKind::Io, m))?;
        let mut builder = client.request(method.clone(), url.clone());
        let mut headers = request.headers;
        for (k, _) in &headers {
            let lower = k.to_ascii_lowercase();
            let signed =
                access.signer.is_some() && crate::sigv4::SIGNED_BY_HOST.contains(&lower.as_str());
            if signed
                || matches!(
                    lower.as_str(),
                    "host" | "content-length" | "transfer-encoding" | "connection" | "upgrade"
                )
            {
                return Err(io_err(
                    types::IoErrorKind::Denied,
                    format!("header {k:?} is set by the host"),
                ));
            }
        }
        if let Some(signer) = &access.signer {
            signer.sign(
                method.as_str(),
                &url,
                &mut headers,
                &request.body,
                SystemTime::now(),
            );
        }
        for (k, v) in &headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let builder = builder.body(request.body);
        let timeout = self.import_timeout();
        let host = url.host_str().unwrap_or("?").to_string();
        let fut = async move {
            let mut resp = builder.send().await.map_err(|e| {
                io_err(
                    types::IoErrorKind::Io,
                    format!("request to {host} failed: {}", without_url(&e)),
                )
            })?;
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .iter()
                .take(HTTP_MAX_HEADERS)
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            if resp.content_length().is_some_and(|l| l > cap as u64) {
                return Err(io_err(
                    types::IoErrorKind::Denied,
                    format!("response body is over the {cap}-byte cap"),
                ));
            }
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| {
                io_err(
                    types::IoErrorKind::Io,
                    format!("reading the response from {host}: {}", without_url(&e)),
                )
            })? {
                if body.len() + chunk.len() > cap {
                    return Err(io_err(
                        types::IoErrorKind::Denied,
                        format!("response body is over the {cap}-byte cap"),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(http::Response {
                status,
                headers,
                body,
            })
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(io_err(
                types::IoErrorKind::Timeout,
                format!(
                    "HTTP request did not finish within {} ms",
                    timeout.as_millis()
                ),
            )),
        }
    }
}

/// reqwest errors print the URL, which may carry a query token: keep only the cause.
fn without_url(e: &reqwest::Error) -> String {
    let mut msg = String::new();
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = src {
        msg = s.to_string();
        src = s.source();
    }
    if msg.is_empty() {
        if e.is_timeout() {
            "timed out".into()
        } else if e.is_connect() {
            "connection failed".into()
        } else {
            "transport error".into()
        }
    } else {
        msg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list() {
        let allow = vec![
            "hooks.example.com".to_string(),
            "127.0.0.1:8080".to_string(),
        ];
        let ok = |u: &str| http_allowed(&allow, &reqwest::Url::parse(u).unwrap());
        assert!(ok("https://hooks.example.com/x"));
        assert!(ok("http://hooks.example.com:9999/x"));
        assert!(ok("http://127.0.0.1:8080/"));
        assert!(!ok("http://127.0.0.1:8081/"));
        assert!(!ok("https://evil.example.com/"));
        assert!(!ok("https://hooks.example.com.evil.net/"));
    }

    #[test]
    fn kv_caps() {
        let kv = PlanKv::new();
        kv.set("a".into(), vec![1]).unwrap();
        assert_eq!(kv.get("a"), Some(vec![1]));
        assert!(kv.set("b".into(), vec![0; KV_MAX_VALUE + 1]).is_err());
        assert!(kv.set(String::new(), vec![]).is_err());
        for i in 0..KV_MAX_KEYS - 1 {
            kv.set(format!("k{i}"), vec![]).unwrap();
        }
        assert!(kv.set("one-too-many".into(), vec![]).is_err());
        kv.set("a".into(), vec![2]).unwrap(); // replacing is fine at the cap
    }

    /// A plugin whose requests the host signs may not set the signed headers itself, and
    /// the refusal happens before anything is sent.
    #[test]
    fn signed_plugins_cannot_set_signed_headers() {
        let signer = crate::sigv4::SigV4::new("AKID", "s3cret", None, "us-east-1", "ebs").unwrap();
        let mut state = State::new(StateInit {
            plugin: "p".into(),
            limits: Arc::new(Limits::default()),
            sink: Arc::new(StderrLog),
            config: Arc::default(),
            related: Arc::new([]),
            http: Some(HttpAccess {
                allow: vec!["127.0.0.1:9".into()],
                client: crate::host::LazyHttpClient::default(),
                signer: Some(Arc::new(signer)),
            }),
            kv: None,
        });
        state.deadline = Instant::now() + Duration::from_secs(5);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for header in ["Authorization", "X-Amz-Date", "x-amz-security-token"] {
            let e = rt
                .block_on(http::Host::send(
                    &mut state,
                    http::Request {
                        method: "GET".into(),
                        url: "http://127.0.0.1:9/snapshots/s/blocks".into(),
                        headers: vec![(header.into(), "forged".into())],
                        body: vec![],
                    },
                ))
                .unwrap_err();
            assert_eq!(e.kind, types::IoErrorKind::Denied, "{header}");
            assert!(e.message.contains("set by the host"), "{}", e.message);
        }
    }

    #[test]
    fn truncation_keeps_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
