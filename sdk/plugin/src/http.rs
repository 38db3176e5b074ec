//! HTTP through the host.
//!
//! A hook has no sockets. The host sends requests for it, only to hosts on the manifest's
//! `http.allow` list, and adds credentials it holds (a bearer token, a SigV4 signature) without
//! showing them to the plugin. Response bodies are capped by the host (1 MiB by default).

use crate::io::IoError;

/// An HTTP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, `PUT`, `DELETE`, `HEAD` or `PATCH`.
    pub method: String,
    /// Absolute `http://` or `https://` URL.
    pub url: String,
    /// Header names and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body (empty for none).
    pub body: Vec<u8>,
}

impl Request {
    /// A request with no headers and no body.
    pub fn new(method: impl Into<String>, url: impl Into<String>) -> Self {
        Self {
            method: method.into(),
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A `GET` of `url`.
    pub fn get(url: impl Into<String>) -> Self {
        Self::new("GET", url)
    }

    /// A `POST` of the JSON text `json` to `url`, with `content-type: application/json`.
    pub fn post_json(url: impl Into<String>, json: impl Into<Vec<u8>>) -> Self {
        Self::new("POST", url)
            .with_header("content-type", "application/json")
            .with_body(json)
    }

    /// Add a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Set the body.
    #[must_use]
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// The first value of header `name` (case-insensitive).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// An HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body, up to the host's cap.
    pub body: Vec<u8>,
}

impl Response {
    /// A response with `status` and `body` and no headers (handy for native test handlers).
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Whether the status is 2xx.
    #[must_use]
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first value of header `name` (case-insensitive).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body as text (invalid UTF-8 replaced).
    #[must_use]
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Send `request` and wait for the response. A non-2xx status is a response, not an error.
///
/// # Errors
/// [`crate::io::IoErrorKind::Denied`] for a host not on the allow-list or a body over the cap,
/// `Timeout`, or `Io` when the host could not reach the server.
pub fn send(request: Request) -> Result<Response, IoError> {
    crate::host::http_send(request)
}

/// `POST` the JSON text `json` to `url` ([`Request::post_json`] + [`send`]).
///
/// # Errors
/// As [`send`].
pub fn post_json(url: &str, json: impl Into<Vec<u8>>) -> Result<Response, IoError> {
    send(Request::post_json(url, json))
}
