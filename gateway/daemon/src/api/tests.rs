//! The API in process (no TLS, no sockets): authentication, every route, every refusal,
//! pagination over real points in an in-memory vault, and the OpenAPI document against the
//! routes.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use ferry_store::{Backend, ImportOptions, InitOptions, OpenOptions, Secret, Vault};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use crate::auth::Tokens;
use crate::catalog::{Catalog, VaultEntry};

struct Fixture {
    app: Router,
    admin: String,
    _dir: tempfile::TempDir,
}

async fn fixture(points: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (catalog, _) = Catalog::open(&dir.path().join("catalog.redb")).unwrap();
    let catalog = Arc::new(catalog);
    catalog
        .insert_vault(&VaultEntry {
            name: "default".into(),
            url: "memory://".into(),
            created_ms: 1,
        })
        .unwrap();
    let tokens = Tokens::load(catalog).unwrap();
    let (_, admin) = tokens.create("test admin").unwrap();
    let vault = Vault::init(
        Backend::open("memory://", &Vec::new(), false).unwrap(),
        &Secret::KeyFile(vec![7; 32]),
        InitOptions::default(),
        OpenOptions::new(dir.path().join("cache")),
    )
    .await
    .unwrap();
    let disk = dir.path().join("disk.img");
    for (i, item) in points.iter().enumerate() {
        let fill = u8::try_from(i + 1).unwrap();
        std::fs::write(&disk, vec![fill; 256 << 10]).unwrap();
        vault
            .import(ImportOptions::full(*item, &disk), Default::default())
            .await
            .unwrap();
    }
    let mut vaults = BTreeMap::new();
    vaults.insert("default".to_string(), vault);
    Fixture {
        app: router(ApiState::new(tokens, vaults, 1024)),
        admin: admin.expose().to_string(),
        _dir: dir,
    }
}

impl Fixture {
    async fn call(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<(&str, &str)>,
    ) -> (StatusCode, Value) {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = match body {
            Some((ct, text)) => b
                .header(header::CONTENT_TYPE, ct)
                .body(Body::from(text.to_string())),
            None => b.body(Body::empty()),
        }
        .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let is_json = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        assert!(is_json, "{status}: every answer is JSON: {bytes:?}");
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call(Method::GET, uri, Some(&self.admin.clone()), None)
            .await
    }
}

fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn authentication() {
    let f = fixture(&[]).await;
    let (s, v) = f.call(Method::GET, "/api/v1/health", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "ok");
    for uri in [
        "/api/v1/vaults",
        "/api/v1/tokens",
        "/api/v1/vaults/default/points",
    ] {
        let (s, v) = f.call(Method::GET, uri, None, None).await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::UNAUTHORIZED, "unauthorized"),
            "{uri}"
        );
        let (s, v) = f.call(Method::GET, uri, Some("wrong"), None).await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::UNAUTHORIZED, "invalid_token"),
            "{uri}"
        );
        let (s, _) = f.get(uri).await;
        assert_eq!(s, StatusCode::OK, "{uri}");
    }
    // Other schemes and malformed headers.
    let req = Request::builder()
        .uri("/api/v1/vaults")
        .header(header::AUTHORIZATION, format!("Basic {}", f.admin))
        .body(Body::empty())
        .unwrap();
    let r = f.app.clone().oneshot(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().contains_key(header::WWW_AUTHENTICATE));
    let req = Request::builder()
        .uri("/api/v1/vaults")
        .header(header::AUTHORIZATION, format!("bearer {}", f.admin))
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        f.app.clone().oneshot(req).await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn tokens_lifecycle() {
    let f = fixture(&[]).await;
    let (s, created) = f
        .call(
            Method::POST,
            "/api/v1/tokens",
            Some(&f.admin),
            Some(("application/json", r#"{"name":"ci"}"#)),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let secret = created["secret"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["active"], true);
    assert_eq!(created["revoked"], Value::Null);
    // The new token works; the list never shows secrets.
    let (s, list) = f
        .call(Method::GET, "/api/v1/tokens", Some(&secret), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    assert!(!list.to_string().contains(&secret));
    assert!(list["items"][0].get("secret").is_none());
    // Revoked: refused at once.
    let (s, r) = f
        .call(
            Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["active"], false);
    assert!(r["revoked"].is_string());
    let (s, v) = f
        .call(Method::GET, "/api/v1/tokens", Some(&secret), None)
        .await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "invalid_token"));
    // Revoking again is harmless; unknown ids are 404; the last active token stays.
    let (s, _) = f
        .call(
            Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = f
        .call(Method::DELETE, "/api/v1/tokens/nope", Some(&f.admin), None)
        .await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "token_not_found"));
    let (_, list) = f.get("/api/v1/tokens").await;
    let admin_id = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["active"] == true)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = f
        .call(
            Method::DELETE,
            &format!("/api/v1/tokens/{admin_id}"),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "last_active_token"));
    assert_eq!(f.get("/api/v1/tokens").await.0, StatusCode::OK);
}

#[tokio::test]
async fn bad_bodies_are_refused_with_json() {
    let f = fixture(&[]).await;
    let post = |ct: &'static str, body: String| {
        let f = &f;
        async move {
            f.call(
                Method::POST,
                "/api/v1/tokens",
                Some(&f.admin),
                Some((ct, &body)),
            )
            .await
        }
    };
    let j = "application/json";
    let cases = [
        (
            j,
            "{\"name\":".to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            j,
            "not json".into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            j,
            r#"{"name":"x","admin":true}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            j,
            r#"{"name":5}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (j, "{}".into(), StatusCode::BAD_REQUEST, "invalid_request"),
        (
            j,
            r#"{"name":""}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            j,
            r#"{"name":"a\nb"}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            j,
            format!(r#"{{"name":"{}"}}"#, "a".repeat(2000)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "text/plain",
            r#"{"name":"x"}"#.into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
    ];
    for (ct, body, status, c) in cases {
        let (s, v) = post(ct, body.clone()).await;
        assert_eq!((s, code(&v)), (status, c), "{body}: {v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Nothing was created by any of them.
    let (_, list) = f.get("/api/v1/tokens").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    // JSON for unknown routes and methods too.
    let (s, v) = f.get("/api/v1/nothing").await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"));
    let (s, v) = f.call(Method::PUT, "/api/v1/health", None, None).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
}

#[tokio::test]
async fn vaults_and_points_paginate() {
    let f = fixture(&["web-01", "web-01", "db-01", "web-01", "db-01"]).await;
    let (s, v) = f.get("/api/v1/vaults").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["items"][0]["name"], "default");
    assert_eq!(v["next_cursor"], Value::Null);

    // All points, two at a time, in (item, time) order, each once.
    let mut seen = Vec::new();
    let mut uri = "/api/v1/vaults/default/points?limit=2".to_string();
    loop {
        let (s, page) = f.get(&uri).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        for p in items {
            assert_eq!(p["disks"][0]["name"], "disk0");
            assert_eq!(p["disks"][0]["size"], 256 << 10);
            assert_eq!(p["consistency"], "crash");
            seen.push((
                p["item"].as_str().unwrap().to_string(),
                p["id"].as_str().unwrap().to_string(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(c) => uri = format!("/api/v1/vaults/default/points?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5);
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted);
    assert_eq!(seen.iter().filter(|(i, _)| i == "db-01").count(), 2);

    let (_, v) = f.get("/api/v1/vaults/default/points?item=web-01").await;
    assert_eq!(v["items"].as_array().unwrap().len(), 3);
    let (_, v) = f.get("/api/v1/vaults/default/points?item=nobody").await;
    assert_eq!(v["items"].as_array().unwrap().len(), 0);

    for (uri, status, c) in [
        (
            "/api/v1/vaults/nope/points",
            StatusCode::NOT_FOUND,
            "vault_not_found",
        ),
        (
            "/api/v1/vaults/default/points?limit=0",
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "/api/v1/vaults/default/points?limit=501",
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "/api/v1/vaults/default/points?limit=-1",
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "/api/v1/vaults/default/points?limit=x",
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "/api/v1/vaults/default/points?colour=red",
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "/api/v1/vaults/default/points?cursor=%21%21",
            StatusCode::BAD_REQUEST,
            "invalid_cursor",
        ),
        (
            "/api/v1/vaults/default/points?item=..%2Fx",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/api/v1/vaults?limit=1000",
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "/api/v1/tokens?cursor=",
            StatusCode::BAD_REQUEST,
            "invalid_cursor",
        ),
    ] {
        let (s, v) = f.get(uri).await;
        assert_eq!((s, code(&v)), (status, c), "{uri}: {v}");
    }
}

#[tokio::test]
async fn empty_vault_has_no_points() {
    let f = fixture(&[]).await;
    let (s, v) = f.get("/api/v1/vaults/default/points").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, json!({"items": [], "next_cursor": null}));
}

/// The OpenAPI document is valid JSON of version 3.1, describes exactly [`ROUTES`], every
/// `$ref` resolves, and every route it describes is served.
#[tokio::test]
async fn openapi_matches_the_routes() {
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut described = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            described.push((method.to_uppercase(), path.clone()));
        }
    }
    described.sort();
    let mut routes: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    routes.sort();
    assert_eq!(described, routes);

    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if k == "$ref" {
                        out.push(x.as_str().unwrap().to_string());
                    } else {
                        refs(x, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let ptr = r.strip_prefix('#').unwrap();
        assert!(doc.pointer(ptr).is_some(), "dangling {r}");
    }

    let f = fixture(&[]).await;
    for (m, p) in ROUTES {
        let uri = p.replace("{name}", "default").replace("{id}", "nope");
        let method = Method::from_bytes(m.as_bytes()).unwrap();
        let body = (*m == "POST").then_some(("application/json", r#"{"name":"x"}"#));
        let (s, v) = f.call(method, &uri, Some(&f.admin), body).await;
        assert!(
            !matches!(code(&v), "not_found" | "method_not_allowed"),
            "{m} {uri}: {s} {v}"
        );
    }
    let (s, served) = f
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(served, doc);
}
