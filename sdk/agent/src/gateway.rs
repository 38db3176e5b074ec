//! The HTTP client of the gateway's agent API (`ferry_proto::enroll`'s paths). It exists so
//! every call gets the same guarantees: TLS configured by the caller (the pinned CA at
//! enrollment, mTLS with the saved identity afterwards), a connect and a whole-request
//! timeout, no redirects, no proxies, response bodies read with a cap ([`MAX_BODY`]), and the
//! API's JSON errors (`{"code", "message", "field"}`) turned into a typed [`GatewayError`]
//! naming the URL, the request, the status, and the gateway's code and message.
//!
//! No error holds a request body (the enrollment request carries the token): reqwest's errors
//! name the URL only, and ours name the request by its method and path.

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::enroll::{
    AGENT_ITEMS_PATH, AGENT_PATH, ENROLL_PATH, EnrollRequest, EnrollResponse, HEARTBEAT_PATH,
    Heartbeat, ReplicationPlan, replication_path,
};
use ferry_proto::trust::PinnedCa;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, Url};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{EXIT_OTHER, EXIT_REFUSED, EXIT_UNREACHABLE};

/// Largest response body read.
pub const MAX_BODY: usize = 1 << 20;
/// Connecting and the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole request, body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Most pages of `GET /api/v1/agent/items` followed.
pub const MAX_PAGES: usize = 100;
/// Longest pause between two pieces of a streamed body before the transfer is given up.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// `GET /api/v1/agent/items/{item}/disks/{disk}/digests`: the replica's chunk digests
/// (`docs/agent-protocol.md` §9).
pub fn digests_path(item: &str, disk: &str) -> String {
    format!("{AGENT_ITEMS_PATH}/{item}/disks/{disk}/digests")
}

/// What can go wrong talking to the gateway. No variant holds a request body.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// Connecting, TLS or the transfer failed, or timed out.
    #[error("cannot reach the gateway at {url}: {reason}")]
    Unreachable {
        /// The gateway's base URL.
        url: String,
        /// Why (the error chain, or why the pinned CA refused the server).
        reason: String,
    },
    /// The gateway refused the request with the API's JSON error.
    #[error("the gateway at {url} refused {what}: {message} (HTTP {status}, code {code})")]
    Api {
        /// The gateway's base URL.
        url: String,
        /// The request (`POST /api/v1/enroll`).
        what: &'static str,
        /// HTTP status.
        status: u16,
        /// The API's stable error code.
        code: String,
        /// The API's explanation.
        message: String,
    },
    /// An error status without the API's JSON error body.
    #[error("the gateway at {url} answered {what} with HTTP {status} and no API error body")]
    Status {
        /// The gateway's base URL.
        url: String,
        /// The request.
        what: &'static str,
        /// HTTP status.
        status: u16,
    },
    /// A success whose body is not what the API documents, or too large.
    #[error("unexpected answer from the gateway at {url} to {what}: {reason}")]
    BadResponse {
        /// The gateway's base URL.
        url: String,
        /// The request.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("cannot set up the HTTP client: {0}")]
    Setup(String),
}

impl GatewayError {
    /// 3 unreachable or TLS, 4 refused (401/403), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Unreachable { .. } => EXIT_UNREACHABLE,
            Self::Api { status, .. } | Self::Status { status, .. }
                if matches!(status, 401 | 403) =>
            {
                EXIT_REFUSED
            }
            _ => EXIT_OTHER,
        }
    }
}

/// Checks a gateway URL: `https://host[:port]`, nothing else (no user name or password, path,
/// query or fragment). The error names the problem; it repeats the URL only when the URL holds
/// no credentials.
pub fn parse_base_url(s: &str) -> Result<Url, String> {
    let u = Url::parse(s.trim())
        .map_err(|e| format!("not a URL ({e}); expected `https://host:port`"))?;
    if !u.username().is_empty() || u.password().is_some() {
        return Err(
            "a URL with a user name or password is refused; expected `https://host:port`".into(),
        );
    }
    let refuse = |why: &str| Err(format!("`{u}`: {why}; expected `https://host:port`"));
    if u.scheme() != "https" {
        return refuse("the gateway speaks HTTPS only");
    }
    if u.host_str().is_none_or(str::is_empty) {
        return refuse("no host");
    }
    if u.path() != "/" || u.query().is_some() || u.fragment().is_some() {
        return refuse("a path, query or fragment is not part of a gateway URL");
    }
    Ok(u)
}

/// The API's error body: `{"code", "message", "field"?}`. The nested form
/// `{"error": {"code", "message"}}` is read too.
#[derive(Deserialize)]
struct ErrorBody {
    code: String,
    message: String,
    #[serde(default)]
    field: Option<String>,
}

#[derive(Deserialize)]
struct NestedErrorBody {
    error: ErrorBody,
}

/// One page of a listing: `{"items": […], "next_cursor": …}`.
#[derive(Deserialize)]
struct Page {
    items: Vec<Box<RawValue>>,
    #[serde(default)]
    next_cursor: Option<String>,
}

/// A JSON answer: the body exactly as received, checked to be JSON.
#[derive(Debug)]
pub struct Answer {
    /// The JSON text as the gateway sent it.
    pub json: Box<RawValue>,
}

/// A streamed answer: its body is read piece by piece ([`Body::chunk`]), never whole.
#[derive(Debug)]
pub struct Body<'a> {
    gw: &'a Gateway,
    what: &'static str,
    resp: reqwest::Response,
}

impl Body<'_> {
    /// The length the gateway announced, if it did.
    pub fn content_length(&self) -> Option<u64> {
        self.resp.content_length()
    }

    /// The next piece of the body; `None` at its end. A pause longer than
    /// [`STALL_TIMEOUT`] is an error.
    pub async fn chunk(&mut self) -> Result<Option<bytes::Bytes>, GatewayError> {
        match tokio::time::timeout(STALL_TIMEOUT, self.resp.chunk()).await {
            Err(_) => Err(GatewayError::Unreachable {
                url: self.gw.shown_url(),
                reason: format!(
                    "{} stalled: nothing received for {} s",
                    self.what,
                    STALL_TIMEOUT.as_secs()
                ),
            }),
            Ok(r) => r.map_err(|e| self.gw.unreachable(&e)),
        }
    }
}

/// A client of one gateway.
#[derive(Debug)]
pub struct Gateway {
    http: reqwest::Client,
    base: Url,
    pinned: Option<Arc<PinnedCa>>,
}

impl Gateway {
    /// A client of the gateway at `base` (`https://host:port`) with this TLS configuration.
    pub fn new(base: &Url, tls: rustls::ClientConfig) -> Result<Self, GatewayError> {
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("ferry-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| GatewayError::Setup(e.to_string()))?;
        Ok(Self {
            http,
            base: base.clone(),
            pinned: None,
        })
    }

    /// A client whose server is accepted only by `pinned` (enrollment); a refused handshake is
    /// reported with the verifier's own reason.
    pub fn pinned(base: &Url, pinned: Arc<PinnedCa>) -> Result<Self, GatewayError> {
        let tls = ferry_proto::trust::pinned_config(pinned.clone())
            .map_err(|e| GatewayError::Setup(e.to_string()))?;
        let mut g = Self::new(base, tls)?;
        g.pinned = Some(pinned);
        Ok(g)
    }

    /// The base URL as shown in messages (no trailing `/`).
    pub fn shown_url(&self) -> String {
        let mut s = self.base.to_string();
        if s.ends_with('/') {
            s.pop();
        }
        s
    }

    fn url(&self, path: &str, cursor: Option<&str>) -> Url {
        let mut u = self.base.clone();
        u.set_path(path);
        u.set_query(None);
        u.set_fragment(None);
        if let Some(c) = cursor {
            u.query_pairs_mut().append_pair("cursor", c);
        }
        u
    }

    fn unreachable(&self, e: &reqwest::Error) -> GatewayError {
        if let Some(why) = self.pinned.as_ref().and_then(|p| p.refused()) {
            return GatewayError::Unreachable {
                url: self.shown_url(),
                reason: format!("TLS refused: {why}"),
            };
        }
        // reqwest's own message names the URL (which never holds a secret); the sources say
        // what failed (refused, TLS, timeout).
        let mut parts: Vec<String> = Vec::new();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
        while let Some(s) = src {
            let m = s.to_string();
            if !parts.iter().any(|p| p.contains(&m)) {
                parts.push(m);
            }
            src = s.source();
        }
        let reason = if e.is_timeout() {
            "timed out".to_string()
        } else if parts.is_empty() {
            e.to_string()
        } else {
            parts.join(": ")
        };
        GatewayError::Unreachable {
            url: self.shown_url(),
            reason,
        }
    }

    fn bad(&self, what: &'static str, reason: impl Into<String>) -> GatewayError {
        GatewayError::BadResponse {
            url: self.shown_url(),
            what,
            reason: reason.into(),
        }
    }

    /// Sends one request and returns the status and body of a 2xx answer, or the API's error.
    async fn send(
        &self,
        what: &'static str,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Vec<u8>), GatewayError> {
        let mut req = self
            .http
            .request(method, url)
            .header(ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(b) = body {
            req = req
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .body(b);
        }
        let mut resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status().as_u16();
        if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
            return Err(self.bad(what, format!("a body larger than {MAX_BODY} bytes")));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.unreachable(&e))? {
            if bytes.len() + chunk.len() > MAX_BODY {
                return Err(self.bad(what, format!("a body larger than {MAX_BODY} bytes")));
            }
            bytes.extend_from_slice(&chunk);
        }
        if !(200..300).contains(&status) {
            return Err(api_error(self.shown_url(), what, status, &bytes));
        }
        Ok((status, bytes))
    }

    async fn get_json(&self, what: &'static str, url: Url) -> Result<Answer, GatewayError> {
        let (status, bytes) = self.send(what, Method::GET, url, None).await?;
        let text =
            String::from_utf8(bytes).map_err(|_| self.bad(what, "a body that is not UTF-8"))?;
        let json = RawValue::from_string(text).map_err(|e| {
            self.bad(
                what,
                format!("HTTP {status} with a body that is not JSON ({e})"),
            )
        })?;
        Ok(Answer { json })
    }

    /// `POST /api/v1/enroll`: the token and CSR in, the certificate and CA out.
    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, GatewayError> {
        const WHAT: &str = "POST /api/v1/enroll";
        let body = serde_json::to_vec(req).expect("JSON serialises");
        let (status, bytes) = self
            .send(WHAT, Method::POST, self.url(ENROLL_PATH, None), Some(body))
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            self.bad(
                WHAT,
                format!("HTTP {status} with a body that is not an enrollment answer ({e})"),
            )
        })
    }

    /// `POST /api/v1/agent/heartbeat`: the gateway notes the agent is alive.
    pub async fn heartbeat(&self, hb: &Heartbeat) -> Result<(), GatewayError> {
        const WHAT: &str = "POST /api/v1/agent/heartbeat";
        let body = serde_json::to_vec(hb).expect("JSON serialises");
        self.send(
            WHAT,
            Method::POST,
            self.url(HEARTBEAT_PATH, None),
            Some(body),
        )
        .await?;
        Ok(())
    }

    /// `GET /api/v1/agent`: the agent's own record, as the gateway sent it.
    pub async fn agent(&self) -> Result<Answer, GatewayError> {
        self.get_json("GET /api/v1/agent", self.url(AGENT_PATH, None))
            .await
    }

    /// `GET /api/v1/agent/items/{item}/replication`: the item's replication plan.
    pub async fn replication_plan(&self, item: &str) -> Result<ReplicationPlan, GatewayError> {
        const WHAT: &str = "GET /api/v1/agent/items/{item}/replication";
        let a = self
            .get_json(WHAT, self.url(&replication_path(item), None))
            .await?;
        let plan: ReplicationPlan = serde_json::from_str(a.json.get())
            .map_err(|e| self.bad(WHAT, format!("a body that is not a replication plan ({e})")))?;
        if plan.item != item {
            return Err(self.bad(
                WHAT,
                format!("the plan of item `{}` when `{item}` was asked", plan.item),
            ));
        }
        Ok(plan)
    }

    /// `GET /api/v1/agent/items/{item}/disks/{disk}/digests`: the replica's digest list,
    /// streamed (`application/vnd.ferry.digests`; any other media type is refused). The whole
    /// request may take `timeout` (the gateway reads a recovery point to answer); the body
    /// may pause at most [`STALL_TIMEOUT`]. `404` with `no_point` says no point holds the disk.
    pub async fn replica_digests(
        &self,
        item: &str,
        disk: &str,
        timeout: Duration,
    ) -> Result<Body<'_>, GatewayError> {
        const WHAT: &str = "GET /api/v1/agent/items/{item}/disks/{disk}/digests";
        let want = ferry_proto::digests::CONTENT_TYPE;
        let mut resp = self
            .http
            .get(self.url(&digests_path(item, disk), None))
            .header(ACCEPT, HeaderValue::from_static(want))
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            // The API's JSON error, read up to MAX_BODY (a longer one is cut: no code).
            let mut bytes = Vec::new();
            while let Ok(Ok(Some(chunk))) = tokio::time::timeout(STALL_TIMEOUT, resp.chunk()).await
            {
                if bytes.len() + chunk.len() > MAX_BODY {
                    break;
                }
                bytes.extend_from_slice(&chunk);
            }
            return Err(api_error(self.shown_url(), WHAT, status, &bytes));
        }
        let ct = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let media = ct.split(';').next().unwrap_or("").trim();
        if !media.eq_ignore_ascii_case(want) {
            return Err(self.bad(
                WHAT,
                format!("HTTP {status} with Content-Type `{ct}`, not `{want}`"),
            ));
        }
        Ok(Body {
            gw: self,
            what: WHAT,
            resp,
        })
    }

    /// The gateway's host, as its URL names it (`[…]` for IPv6).
    pub fn host(&self) -> &str {
        self.base.host_str().unwrap_or_default()
    }

    /// `GET /api/v1/agent/items`, every page (following `next_cursor`, at most [`MAX_PAGES`]):
    /// the items exactly as the gateway sent them.
    pub async fn items(&self) -> Result<Vec<Box<RawValue>>, GatewayError> {
        const WHAT: &str = "GET /api/v1/agent/items";
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let a = self
                .get_json(WHAT, self.url(AGENT_ITEMS_PATH, cursor.as_deref()))
                .await?;
            let page: Page = serde_json::from_str(a.json.get())
                .map_err(|e| self.bad(WHAT, format!("a listing that is not a page ({e})")))?;
            let got = page.items.len();
            items.extend(page.items);
            match page.next_cursor {
                None => return Ok(items),
                Some(next) => {
                    if got == 0 || cursor.as_deref() == Some(next.as_str()) {
                        return Err(self.bad(WHAT, "a listing page that does not advance"));
                    }
                    cursor = Some(next);
                }
            }
        }
        Err(self.bad(WHAT, format!("a listing longer than {MAX_PAGES} pages")))
    }
}

/// The typed error of a non-2xx answer.
fn api_error(url: String, what: &'static str, status: u16, body: &[u8]) -> GatewayError {
    let parsed = serde_json::from_slice::<ErrorBody>(body)
        .or_else(|_| serde_json::from_slice::<NestedErrorBody>(body).map(|n| n.error));
    match parsed {
        Ok(e) => GatewayError::Api {
            url,
            what,
            status,
            code: e.code,
            message: match e.field {
                Some(f) => format!("{} (field {f})", e.message),
                None => e.message,
            },
        },
        Err(_) => GatewayError::Status { url, what, status },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_in_both_shapes() {
        let u = || "https://gw:8443".to_string();
        let e = api_error(
            u(),
            "POST /api/v1/enroll",
            401,
            br#"{"code":"invalid_token","message":"the enrollment token is not valid"}"#,
        );
        assert_eq!(
            e.to_string(),
            "the gateway at https://gw:8443 refused POST /api/v1/enroll: the enrollment token \
             is not valid (HTTP 401, code invalid_token)"
        );
        assert_eq!(e.exit_code(), EXIT_REFUSED);
        let e = api_error(
            u(),
            "POST /api/v1/enroll",
            400,
            br#"{"error":{"code":"invalid_value","message":"not a CSR","field":"csr"}}"#,
        );
        assert!(
            matches!(&e, GatewayError::Api { code, message, status: 400, .. }
                if code == "invalid_value" && message == "not a CSR (field csr)"),
            "{e:?}"
        );
        assert_eq!(e.exit_code(), EXIT_OTHER);
        let e = api_error(u(), "GET /api/v1/agent", 502, b"<html>bad gateway</html>");
        assert_eq!(
            e.to_string(),
            "the gateway at https://gw:8443 answered GET /api/v1/agent with HTTP 502 and no API \
             error body"
        );
    }

    #[test]
    fn gateway_urls_are_https_host_port_only() {
        for ok in [
            "https://gw.example:8443",
            "https://10.0.0.1/",
            " https://[::1]:8443 ",
        ] {
            parse_base_url(ok).unwrap();
        }
        for (bad, why) in [
            ("gw.example:8443", "HTTPS only"),
            ("http://gw.example", "HTTPS only"),
            ("https://gw.example/api", "path"),
            ("https://gw.example/?a=1", "query"),
            ("https://gw.example/#x", "fragment"),
            ("nonsense", "not a URL"),
        ] {
            let e = parse_base_url(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = parse_base_url("https://admin:hunter2@gw.example").unwrap_err();
        assert!(
            e.contains("user name or password") && !e.contains("hunter2"),
            "{e}"
        );
    }

    #[test]
    fn urls_are_the_contract_paths() {
        let base = Url::parse("https://gw.example:8443/").unwrap();
        let g = Gateway::new(
            &base,
            ferry_proto::trust::tls_config(&[]).expect("an empty root store builds"),
        )
        .unwrap();
        assert_eq!(g.shown_url(), "https://gw.example:8443");
        assert_eq!(
            g.url(ENROLL_PATH, None).as_str(),
            "https://gw.example:8443/api/v1/enroll"
        );
        assert_eq!(
            g.url(AGENT_ITEMS_PATH, Some("a b/c")).as_str(),
            "https://gw.example:8443/api/v1/agent/items?cursor=a+b%2Fc"
        );
        assert_eq!(
            g.url(&digests_path("web", "sda"), None).as_str(),
            "https://gw.example:8443/api/v1/agent/items/web/disks/sda/digests"
        );
    }
}
