//! The HTTP client of the appliance's REST API (`/api/v1`, described by the daemon's
//! `openapi.json`). It exists so that every command gets the same guarantees: the admin
//! token travels only in a sensitive `Authorization` header and never appears in an error,
//! TLS trusts only what [`super::trust`] says, every request has a timeout, no redirect is
//! followed, response bodies are read with a size cap, API errors (`{code, message,
//! field}`) become typed [`ClientError`]s with the CLI's exit code, and listings are paged
//! through `next_cursor` to the end (or to a cap).

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde_json::value::RawValue;
use zeroize::Zeroizing;

/// Largest response body read.
pub const MAX_BODY: usize = 16 << 20;
/// Largest page asked for (the API's own maximum).
pub const MAX_PAGE: u64 = 500;
/// Connecting and the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole request, body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// An admin bearer token. Its text is never printed: `Debug` redacts it and it is wiped
/// from memory when dropped.
pub struct Token(Zeroizing<String>);

impl Token {
    /// Longest token accepted (the appliance's limit is 256 bytes).
    pub const MAX_LEN: usize = 4096;

    /// Checks a token read from `what` (a file, stdin): surrounding whitespace is removed,
    /// the rest must be printable ASCII. The error never contains the text.
    pub fn from_bytes(raw: &[u8], what: &str) -> Result<Self, ClientError> {
        let raw = Zeroizing::new(raw.to_vec());
        let t = raw.trim_ascii();
        if t.is_empty() {
            return Err(ClientError::Local(format!("{what}: the token is empty")));
        }
        if t.len() > Self::MAX_LEN {
            return Err(ClientError::Local(format!("{what}: too long for a token")));
        }
        if !t.iter().all(|b| b.is_ascii_graphic()) {
            return Err(ClientError::Local(format!(
                "{what}: a token is one line of printable ASCII characters"
            )));
        }
        let s = std::str::from_utf8(t).expect("ASCII is UTF-8").to_string();
        Ok(Self(Zeroizing::new(s)))
    }

    /// The text, for the profile file only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn header(&self) -> HeaderValue {
        let v = Zeroizing::new(format!("Bearer {}", &*self.0));
        let mut h = HeaderValue::from_str(&v).expect("checked printable ASCII");
        h.set_sensitive(true);
        h
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// What can go wrong talking to the appliance. No variant ever holds the token.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API refused the request with its JSON error.
    #[error("{message} (code {code}{})", field.as_deref().map(|f| format!(", field {f}")).unwrap_or_default())]
    Api {
        /// HTTP status.
        status: u16,
        /// The API's stable error code.
        code: String,
        /// The API's explanation.
        message: String,
        /// The request member the error is about.
        field: Option<String>,
    },
    /// An error status without the API's JSON error body.
    #[error("the appliance answered HTTP {status} without an API error body")]
    Status {
        /// HTTP status.
        status: u16,
    },
    /// A success status whose body is not what the API documents.
    #[error("unexpected answer from the appliance: {0}")]
    BadResponse(String),
    /// Connecting, TLS or the transfer failed, or timed out.
    #[error("cannot reach the appliance at {url}: {reason}")]
    Unreachable {
        /// The appliance's base URL.
        url: String,
        /// Why (the error chain).
        reason: String,
    },
    /// No saved login and no `FERRY_URL`/`FERRY_TOKEN_FILE`/`FERRY_CA_FILE`.
    #[error("not logged in: {0}")]
    NotLoggedIn(String),
    /// A local file, value or setup problem (named in the message).
    #[error("{0}")]
    Local(String),
}

impl From<ferry_proto::trust::TrustError> for ClientError {
    fn from(e: ferry_proto::trust::TrustError) -> Self {
        Self::Local(e.to_string())
    }
}

impl ClientError {
    /// The CLI's exit status for this error: 3 not logged in or authentication refused,
    /// 4 not found, 5 conflict or precondition failed, 6 refused input, 7 cannot reach the
    /// appliance (or TLS failed), 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Api { status, .. } | Self::Status { status } => match status {
                401 | 403 => 3,
                404 => 4,
                409 | 412 => 5,
                400 | 413 | 415 | 422 => 6,
                _ => 1,
            },
            Self::NotLoggedIn(_) => 3,
            Self::Unreachable { .. } => 7,
            Self::BadResponse(_) | Self::Local(_) => 1,
        }
    }
}

/// One successful answer of the API: the body exactly as sent, and parsed.
#[derive(Debug)]
pub struct Answer {
    /// The JSON body as received.
    pub text: String,
    /// The body, parsed.
    pub json: serde_json::Value,
}

/// All pages of a listing.
#[derive(Debug)]
pub struct Listing {
    /// The items, each exactly as the API sent it.
    pub items: Vec<Box<RawValue>>,
    /// Where the listing stopped, when the cap was reached before its end.
    pub next_cursor: Option<String>,
}

impl Listing {
    /// The listing as one page of the API's shape: `{"items":[…],"next_cursor":…}`.
    pub fn to_json(&self) -> String {
        #[derive(serde::Serialize)]
        struct Page<'a> {
            items: &'a [Box<RawValue>],
            next_cursor: &'a Option<String>,
        }
        serde_json::to_string(&Page {
            items: &self.items,
            next_cursor: &self.next_cursor,
        })
        .expect("raw JSON serialises")
    }

    /// The items, parsed.
    pub fn values(&self) -> Vec<serde_json::Value> {
        self.items
            .iter()
            .map(|r| serde_json::from_str(r.get()).unwrap_or(serde_json::Value::Null))
            .collect()
    }
}

#[derive(Deserialize)]
struct PageBody {
    items: Vec<Box<RawValue>>,
    next_cursor: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: String,
    message: String,
    #[serde(default)]
    field: Option<String>,
}

/// A client of one appliance.
#[derive(Debug)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Token,
}

impl Client {
    /// A client of the appliance at `base` (`https://host:port`), with this TLS
    /// configuration and token.
    pub fn new(base: Url, tls: rustls::ClientConfig, token: Token) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Local(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Self { http, base, token })
    }

    /// The token requests carry (for saving a login).
    pub fn token(&self) -> &Token {
        &self.token
    }

    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        let mut u = self.base.clone();
        u.set_query(None);
        u.path_segments_mut()
            .expect("an https URL has a path")
            .clear()
            .extend(["api", "v1"])
            .extend(segments);
        if !query.is_empty() {
            let mut q = u.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        u
    }

    fn unreachable(&self, e: &reqwest::Error) -> ClientError {
        // reqwest's own message names the URL (which never holds the token); the sources
        // say what failed (refused, TLS, timeout).
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
        let mut url = self.base.to_string();
        if url.ends_with('/') {
            url.pop();
        }
        ClientError::Unreachable { url, reason }
    }

    /// Sends one request to `/api/v1/<segments>` and returns a 2xx answer, or the API's
    /// error. `if_match` is sent as `If-Match`.
    pub async fn send(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        if_match: Option<&str>,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, ClientError> {
        let mut headers = HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, self.token.header());
        headers.insert(
            reqwest::header::ACCEPT,
            HeaderValue::from_static("application/json"),
        );
        if let Some(m) = if_match {
            let v = HeaderValue::from_str(m).map_err(|_| {
                ClientError::Local(format!("--if-match `{m}` is not a header value"))
            })?;
            headers.insert(reqwest::header::IF_MATCH, v);
        }
        let mut req = self
            .http
            .request(method, self.url(segments, query))
            .headers(headers);
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(b).expect("JSON serialises"));
        }
        let mut resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
            return Err(ClientError::BadResponse(format!(
                "a body larger than {MAX_BODY} bytes"
            )));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.unreachable(&e))? {
            if bytes.len() + chunk.len() > MAX_BODY {
                return Err(ClientError::BadResponse(format!(
                    "a body larger than {MAX_BODY} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        let text = String::from_utf8(bytes)
            .map_err(|_| ClientError::BadResponse("a body that is not UTF-8".into()))?;
        let json = serde_json::from_str(&text).map_err(|e| {
            ClientError::BadResponse(format!(
                "HTTP {} with a body that is not JSON ({e})",
                status.as_u16()
            ))
        })?;
        Ok(Answer { text, json })
    }

    /// GET of a listing, following `next_cursor` until its end or until `cap` items.
    pub async fn list(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
        cap: u64,
    ) -> Result<Listing, ClientError> {
        let mut items: Vec<Box<RawValue>> = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let have = items.len() as u64;
            let want = cap.saturating_sub(have).clamp(1, MAX_PAGE);
            let mut q = query.to_vec();
            q.push(("limit", want.to_string()));
            if let Some(c) = &cursor {
                q.push(("cursor", c.clone()));
            }
            let a = self.send(Method::GET, segments, &q, None, None).await?;
            let page: PageBody = serde_json::from_str(&a.text).map_err(|e| {
                ClientError::BadResponse(format!("a listing that is not a page ({e})"))
            })?;
            let got = page.items.len();
            items.extend(page.items);
            match page.next_cursor {
                None => {
                    return Ok(Listing {
                        items,
                        next_cursor: None,
                    });
                }
                Some(next) => {
                    if got == 0 || cursor.as_deref() == Some(next.as_str()) {
                        return Err(ClientError::BadResponse(
                            "a listing page that does not advance".into(),
                        ));
                    }
                    if items.len() as u64 >= cap {
                        items.truncate(usize::try_from(cap).unwrap_or(usize::MAX));
                        return Ok(Listing {
                            items,
                            next_cursor: Some(next),
                        });
                    }
                    cursor = Some(next);
                }
            }
        }
    }
}

fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ClientError::Api {
            status: status.as_u16(),
            code: e.code,
            message: e.message,
            field: e.field,
        },
        Err(_) => ClientError::Status {
            status: status.as_u16(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_and_never_shown() {
        let t = Token::from_bytes(b"  abc-DEF_123\n", "file").unwrap();
        assert_eq!(t.expose(), "abc-DEF_123");
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        for bad in [&b""[..], b" \n", b"two words", b"tab\there", b"\xff\xfe"] {
            let e = Token::from_bytes(bad, "file").unwrap_err().to_string();
            assert!(e.starts_with("file: "), "{e}");
        }
        let e = Token::from_bytes(b"secret-value with-space", "f")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret-value"), "{e}");
    }

    #[test]
    fn exit_codes() {
        let api = |status| ClientError::Api {
            status,
            code: "x".into(),
            message: "m".into(),
            field: None,
        };
        for (s, c) in [
            (401, 3),
            (404, 4),
            (409, 5),
            (412, 5),
            (400, 6),
            (422, 6),
            (500, 1),
        ] {
            assert_eq!(api(s).exit_code(), c, "{s}");
        }
        assert_eq!(ClientError::NotLoggedIn(String::new()).exit_code(), 3);
        let e = ClientError::Api {
            status: 400,
            code: "invalid_value".into(),
            message: "must be at least 1".into(),
            field: Some("rpo_threshold_minutes".into()),
        };
        assert_eq!(
            e.to_string(),
            "must be at least 1 (code invalid_value, field rpo_threshold_minutes)"
        );
    }
}
