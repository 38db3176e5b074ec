//! The web console: a small read-mostly page at `/`, on the API's own HTTPS listener.
//!
//! It exists so that an operator can see the appliance at a glance (health, protected items,
//! jobs, agents, groups, policies, vaults) from a browser, with nothing but the URL
//! `ferryd up` printed and an admin token: no separate server, no build step, and nothing
//! fetched from elsewhere (an appliance is often offline). Changes are made with the `ferry`
//! CLI, whose commands the page shows.
//!
//! The three files (`../web/`) are compiled in. The page is plain HTML, CSS and JavaScript
//! that calls `/api/v1` like any other client: the routes here are public and need no state,
//! and they are not API routes (not in [`super::ROUTES`] nor the OpenAPI document). Every
//! answer carries a strict `Content-Security-Policy` (own scripts, styles and API only; no
//! inline code, no framing, no form submission), `Referrer-Policy: no-referrer` and
//! `X-Frame-Options: DENY`; `server` adds `no-store` and `nosniff` to every answer. The page
//! keeps the admin token in `sessionStorage` and sends it only in the `Authorization` header.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const STYLE_CSS: &str = include_str!("../web/style.css");

/// The console's `Content-Security-Policy`: its own script, style and API, nothing else.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self'; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// `GET` (and `HEAD`) `/`, `/app.js` and `/style.css`. No state is used, so this merges into
/// a router of any state.
pub(super) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/style.css", get(style_css))
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

/// A static file with its content type and the console's security headers.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Method, Request, StatusCode};
    use tower::ServiceExt;

    use super::*;

    const FILES: [(&str, &str, &str); 3] = [
        ("/", "text/html; charset=utf-8", INDEX_HTML),
        ("/app.js", "text/javascript; charset=utf-8", APP_JS),
        ("/style.css", "text/css; charset=utf-8", STYLE_CSS),
    ];

    async fn request(method: Method, path: &str) -> (StatusCode, axum::http::HeaderMap, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let resp = routes::<()>().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    fn header_of(h: &axum::http::HeaderMap, name: header::HeaderName) -> &str {
        h.get(&name)
            .unwrap_or_else(|| panic!("no {name}"))
            .to_str()
            .unwrap()
    }

    #[tokio::test]
    async fn each_file_is_served_with_its_type_and_the_security_headers() {
        for (path, content_type, content) in FILES {
            let (status, h, body) = request(Method::GET, path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(header_of(&h, header::CONTENT_TYPE), content_type, "{path}");
            assert_eq!(
                header_of(&h, header::CONTENT_SECURITY_POLICY),
                CSP,
                "{path}"
            );
            assert_eq!(header_of(&h, header::REFERRER_POLICY), "no-referrer");
            assert_eq!(header_of(&h, header::X_FRAME_OPTIONS), "DENY");
            assert_eq!(body, content, "{path}");
        }
    }

    #[test]
    fn the_csp_is_the_strict_one() {
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "img-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ] {
            assert!(CSP.split(';').any(|d| d.trim() == directive), "{directive}");
        }
        assert!(!CSP.contains("unsafe"));
    }

    #[tokio::test]
    async fn head_answers_without_a_body() {
        for (path, content_type, _) in FILES {
            let (status, h, body) = request(Method::HEAD, path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(header_of(&h, header::CONTENT_TYPE), content_type, "{path}");
            assert_eq!(
                header_of(&h, header::CONTENT_SECURITY_POLICY),
                CSP,
                "{path}"
            );
            assert!(body.is_empty(), "{path}");
        }
    }

    #[tokio::test]
    async fn other_methods_and_paths_are_not_served() {
        let (status, _, _) = request(Method::POST, "/").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        let (status, _, _) = request(Method::GET, "/index.js").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn the_page_loads_only_its_own_files_and_has_no_inline_code() {
        assert!(INDEX_HTML.contains(r#"<script src="/app.js" defer></script>"#));
        assert!(INDEX_HTML.contains(r#"<link rel="stylesheet" href="/style.css">"#));
        assert_eq!(
            INDEX_HTML.matches("<script").count(),
            1,
            "one script, no inline one"
        );
        assert_eq!(INDEX_HTML.matches("<link").count(), 1);
        for bad in [
            "<style",
            " style=",
            "javascript:",
            "src=\"http",
            "href=\"http",
            "src=\"//",
            "href=\"//",
            "<img",
            "<iframe",
            "action=",
        ] {
            assert!(!INDEX_HTML.contains(bad), "index.html has {bad:?}");
        }
        // No event handler attributes (` onclick=` …).
        for (i, _) in INDEX_HTML.match_indices(" on") {
            let name: String = INDEX_HTML[i + 1..]
                .chars()
                .take_while(char::is_ascii_alphabetic)
                .collect();
            let rest = &INDEX_HTML[i + 1 + name.len()..];
            assert!(!rest.starts_with('='), "index.html has an inline {name}");
        }
        for bad in ["@import", "url("] {
            assert!(!STYLE_CSS.contains(bad), "style.css has {bad:?}");
        }
    }

    #[test]
    fn the_script_never_inserts_html_nor_keeps_the_token_beyond_the_tab() {
        for bad in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "localStorage",
            "document.cookie",
            "eval(",
            "new Function",
            "import(",
            "XMLHttpRequest",
        ] {
            assert!(!APP_JS.contains(bad), "app.js has {bad:?}");
        }
        // The token is read in one place, from sessionStorage.
        assert_eq!(APP_JS.matches("sessionStorage.getItem").count(), 1);
    }

    #[test]
    fn the_script_never_builds_urls_from_the_token() {
        // One request site, whose URL is the API prefix and a path of the script's own.
        assert_eq!(APP_JS.matches("fetch(").count(), 1);
        assert!(APP_JS.contains("fetch(API + path, {"));
        assert!(APP_JS.contains("const API = '/api/v1';"));
        // Every path given to `api` is a literal: directly, or a table's `path`.
        for (i, _) in APP_JS.match_indices("api(") {
            let before = &APP_JS[..i];
            if before.ends_with("function ") {
                continue;
            }
            let after = &APP_JS[i + "api(".len()..];
            assert!(
                after.starts_with("'/") || after.starts_with("t.path,"),
                "api called with a computed path: {}",
                &after[..after.len().min(40)]
            );
        }
        for (i, _) in APP_JS.match_indices(" path: ") {
            assert!(
                APP_JS[i + " path: ".len()..].starts_with("'/"),
                "a table path that is not a literal"
            );
        }
        // No line that touches the token touches a URL.
        let code = APP_JS.lines().filter(|l| !l.trim_start().starts_with("//"));
        for line in code.filter(|l| l.to_lowercase().contains("token")) {
            for bad in ["fetch", "API", "path", "location", "URL", "href", "src"] {
                assert!(!line.contains(bad), "{line:?} has {bad:?}");
            }
        }
        // Nor does the script navigate or build URLs at all.
        for bad in [
            "location.href",
            "location.assign",
            "location.replace",
            "location.search",
            "location.hash",
            "history.",
            "window.open",
            "URLSearchParams",
            "new URL(",
            "encodeURI",
        ] {
            assert!(!APP_JS.contains(bad), "app.js has {bad:?}");
        }
    }
}
