//! The API in process (no TLS, no sockets): authentication, every route, every refusal,
//! pagination over real points in an in-memory vault, the policies' lifecycle, and the
//! OpenAPI document against the routes.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use ferry_store::ImportOptions;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use crate::auth::Tokens;
use crate::catalog::{Catalog, VaultEntry};

struct Fixture {
    app: Router,
    admin: String,
    agents: Arc<crate::agents::Agents>,
    vault: ferry_store::Vault,
    process: Option<crate::replication::ProcessRole>,
    _runners: tokio::task::JoinSet<()>,
    _dir: tempfile::TempDir,
}

async fn fixture(points: &[&str]) -> Fixture {
    fixture_with(points, false).await
}

/// [`fixture`], with the process role when `process` (its cache under the fixture's
/// directory, free-space thresholds off so the test machine's disk does not matter).
async fn fixture_with(points: &[&str], process: bool) -> Fixture {
    fixture_full(points, process, None).await
}

/// [`fixture_with`], the target role writing failovers to `location` when given.
async fn fixture_full(
    points: &[&str],
    process: bool,
    location: Option<crate::jobs::TargetLocation>,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (catalog, _) = Catalog::open(&dir.path().join("catalog.redb")).unwrap();
    let catalog = Arc::new(catalog);
    catalog.ensure_default_policy(1).unwrap();
    catalog
        .insert_vault(&VaultEntry {
            name: "default".into(),
            url: "memory://".into(),
            created_ms: 1,
        })
        .unwrap();
    let tokens = Tokens::load(catalog.clone()).unwrap();
    let (_, admin) = tokens.create("test admin").unwrap();
    let tls = crate::tls::load_or_create(dir.path(), &crate::config::TlsConfig::default()).unwrap();
    let agents = Arc::new(crate::agents::Agents::load(catalog.clone(), tls.agent_ca).unwrap());
    let vault = crate::testkit::memory_vault(dir.path()).await;
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
    let vaults = Arc::new(vaults);
    let (runner, runners) = JobRunner::start(
        catalog.clone(),
        vaults.clone(),
        Some(crate::jobs::TargetRole {
            dir: dir.path().join("target"),
            planned_timeout: std::time::Duration::from_secs(10),
            location,
        }),
        1,
    )
    .unwrap();
    let role = if process {
        let mut cfg = crate::config::Config {
            data_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        cfg.process.cache.warn_free_percent = 0;
        cfg.process.cache.critical_free_percent = 0;
        let (role, _, _drainer) =
            crate::replication::ProcessRole::start(&cfg, catalog, agents.clone(), vaults.clone())
                .await
                .unwrap();
        Some(role)
    } else {
        None
    };
    let vault = vaults["default"].clone();
    let mut state = ApiState::new(
        tokens,
        agents.clone(),
        vaults,
        Some(runner),
        Arc::default(),
        1024,
        &crate::config::Roles::default(),
    )
    .with_mounts(Arc::new(crate::mounts::Mounts::new(
        std::net::IpAddr::from([127, 0, 0, 1]),
        2,
        1 << 20,
        dir.path().join("target").join("mounts"),
    )));
    if let Some(r) = &role {
        state = state.with_process(r.clone());
    }
    Fixture {
        app: router(state),
        admin: admin.expose().to_string(),
        agents,
        vault,
        process: role,
        _runners: runners,
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
        let (s, _, v) = self.request(method, uri, token, &[], body).await;
        (s, v)
    }

    /// [`Fixture::call`] with extra request headers, answering the response headers too.
    async fn request(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<(&str, &str)>,
    ) -> (StatusCode, HeaderMap, Value) {
        self.request_with_cert(method, uri, token, None, headers, body)
            .await
    }

    /// [`Fixture::request`] as a client whose TLS handshake presented a certificate with
    /// SHA-256 `cert` (what the server puts in the request's extensions).
    async fn request_with_cert(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        cert: Option<[u8; 32]>,
        headers: &[(&str, &str)],
        body: Option<(&str, &str)>,
    ) -> (StatusCode, HeaderMap, Value) {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(sha256) = cert {
            b = b.extension(crate::server::ClientCert { sha256 });
        }
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
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
        let headers = resp.headers().clone();
        let is_json = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        if headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"))
        {
            // `/metrics`, the one answer in Prometheus' text format.
            return (
                status,
                headers,
                Value::String(String::from_utf8(bytes.to_vec()).unwrap()),
            );
        }
        if status == StatusCode::NO_CONTENT {
            assert!(bytes.is_empty());
            return (status, headers, Value::Null);
        }
        assert!(is_json, "{status}: every answer is JSON: {bytes:?}");
        (status, headers, serde_json::from_slice(&bytes).unwrap())
    }

    /// `GET uri` with a client certificate, answering the raw body (binary answers).
    async fn get_raw_with_cert(
        &self,
        uri: &str,
        cert: [u8; 32],
    ) -> (StatusCode, HeaderMap, axum::body::Bytes) {
        let req = Request::builder()
            .method(Method::GET)
            .uri(uri)
            .extension(crate::server::ClientCert { sha256: cert })
            .body(Body::empty())
            .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20)
            .await
            .unwrap();
        (status, headers, bytes)
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call(Method::GET, uri, Some(&self.admin.clone()), None)
            .await
    }

    async fn send(&self, method: Method, uri: &str, body: Option<&str>) -> (StatusCode, Value) {
        self.call(
            method,
            uri,
            Some(&self.admin.clone()),
            body.map(|b| ("application/json", b)),
        )
        .await
    }

    /// Waits for job `id` to end (the real runner runs it) and returns it.
    async fn job_end(&self, id: &str) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let (s, j) = self.get(&format!("/api/v1/jobs/{id}")).await;
            assert_eq!(s, StatusCode::OK, "{j}");
            if !matches!(j["state"].as_str(), Some("queued" | "running")) {
                return j;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "job {id} never ended: {j}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
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
        "/api/v1/policies",
        "/api/v1/policies/default",
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
            "unknown_field",
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
        // Plain text, not JSON: served, as `metrics_in_prometheus_text` checks.
        if *p == "/api/v1/metrics" {
            continue;
        }
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

fn etag(h: &HeaderMap) -> String {
    h.get(header::ETAG)
        .expect("an ETag")
        .to_str()
        .unwrap()
        .to_string()
}

/// Create, read, list, patch (with and without `If-Match`), delete; every refusal leaves the
/// policy as it was; the same over anonymous and wrong tokens is 401.
#[tokio::test]
async fn policies_lifecycle() {
    let f = fixture(&[]).await;
    let j = "application/json";
    let admin = Some(f.admin.as_str());

    // The default policy, with the default settings.
    let (s, list) = f.get("/api/v1/policies").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let d = &list["items"][0];
    assert_eq!(d["name"], "default");
    assert_eq!(
        (
            d["rpo_threshold_minutes"].as_u64(),
            d["cycle_interval_seconds"].as_u64(),
            d["app_consistent_frequency_minutes"].as_u64(),
            d["chunk_size"].as_u64(),
            d["compression_level"].as_u64(),
            d["resync_threshold_percent"].as_u64(),
        ),
        (
            Some(15),
            Some(300),
            Some(60),
            Some(256 << 10),
            Some(1),
            Some(50)
        )
    );
    assert_eq!(
        d["retention"],
        json!({"keep_all_hours": 24, "hourly_days": 3, "every_hours": 4, "for_days": 14, "max_age_hours": 432})
    );
    assert_eq!(
        d["retry_schedule_seconds"],
        json!([60, 120, 240, 480, 600, 1800])
    );
    assert_eq!(d["description"], Value::Null);
    assert_eq!(d["revision"], 1);

    // Create: what is given, defaults for the rest; ETag and Location.
    let (s, h, gold) = f
        .request(
            Method::POST,
            "/api/v1/policies",
            admin,
            &[],
            Some((
                j,
                r#"{"name":"gold","description":"tier 1","rpo_threshold_minutes":5,
                    "cycle_interval_seconds":60,"retention":{"for_days":30},
                    "chunk_size":262144,"retry_schedule_seconds":[30,60]}"#,
            )),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{gold}");
    assert_eq!(etag(&h), "\"2\"");
    assert_eq!(h[header::LOCATION], "/api/v1/policies/gold");
    assert_eq!(gold["revision"], 2);
    assert_eq!(gold["description"], "tier 1");
    assert_eq!(gold["retention"]["for_days"], 30);
    assert_eq!(gold["retention"]["hourly_days"], 3);
    assert_eq!(gold["retention"]["max_age_hours"], 24 + 33 * 24);
    assert_eq!(gold["compression_level"], 1);
    assert_eq!(gold["created"], gold["updated"]);
    let (s, v) = f
        .call(
            Method::POST,
            "/api/v1/policies",
            admin,
            Some((j, r#"{"name":"gold"}"#)),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "policy_exists"));

    // Read one.
    let (s, h, got) = f
        .request(Method::GET, "/api/v1/policies/gold", admin, &[], None)
        .await;
    assert_eq!((s, etag(&h)), (StatusCode::OK, "\"2\"".into()));
    assert_eq!(got, gold);

    // Refusals change nothing: each (method, body, If-Match) → (status, code, field).
    let patch = |body: &'static str, if_match: Option<&'static str>| {
        let f = &f;
        async move {
            let h: Vec<(&str, &str)> = if_match.map(|m| ("if-match", m)).into_iter().collect();
            f.request(
                Method::PATCH,
                "/api/v1/policies/gold",
                Some(&f.admin),
                &h,
                Some((j, body)),
            )
            .await
        }
    };
    for (body, if_match, status, c, field) in [
        (
            r#"{"rpo_threshold_minutes":0}"#,
            None,
            400,
            "invalid_value",
            Some("rpo_threshold_minutes"),
        ),
        (
            r#"{"retention":{"hourly_days":-1}}"#,
            None,
            400,
            "invalid_value",
            Some("retention.hourly_days"),
        ),
        (
            r#"{"chunk_size":300000}"#,
            None,
            400,
            "invalid_value",
            Some("chunk_size"),
        ),
        (
            r#"{"compression_level":20}"#,
            None,
            400,
            "invalid_value",
            Some("compression_level"),
        ),
        (
            r#"{"retry_schedule_seconds":[]}"#,
            None,
            400,
            "invalid_value",
            Some("retry_schedule_seconds"),
        ),
        (
            r#"{"retry_schedule_seconds":[60,30]}"#,
            None,
            400,
            "invalid_value",
            Some("retry_schedule_seconds[1]"),
        ),
        (
            r#"{"cycle_interval_seconds":301}"#,
            None,
            400,
            "invalid_value",
            Some("cycle_interval_seconds"),
        ),
        (
            r#"{"app_consistent_frequency_minutes":5}"#,
            None,
            400,
            "invalid_value",
            Some("app_consistent_frequency_minutes"),
        ),
        (
            r#"{"resync_threshold_percent":"50"}"#,
            None,
            400,
            "invalid_value",
            Some("resync_threshold_percent"),
        ),
        (
            r#"{"rpo_threshold_minutes":null}"#,
            None,
            400,
            "invalid_value",
            Some("rpo_threshold_minutes"),
        ),
        (r#"{"rpo":5}"#, None, 400, "unknown_field", Some("rpo")),
        (
            r#"{"retention":{"weekly":1}}"#,
            None,
            400,
            "unknown_field",
            Some("retention.weekly"),
        ),
        (
            r#"{"name":"platinum"}"#,
            None,
            400,
            "read_only_field",
            Some("name"),
        ),
        (
            r#"{"revision":9}"#,
            None,
            400,
            "read_only_field",
            Some("revision"),
        ),
        (r#"[1]"#, None, 400, "invalid_request", None),
        (
            r#"{"rpo_threshold_minutes":"#,
            None,
            400,
            "invalid_json",
            None,
        ),
        (
            r#"{"rpo_threshold_minutes":10}"#,
            Some("\"1\""),
            412,
            "revision_mismatch",
            None,
        ),
        (
            r#"{"rpo_threshold_minutes":10}"#,
            Some("W/\"2\""),
            412,
            "revision_mismatch",
            None,
        ),
        (
            r#"{"rpo_threshold_minutes":10}"#,
            Some("2"),
            400,
            "invalid_header",
            None,
        ),
    ] {
        let (s, _, v) = patch(body, if_match).await;
        assert_eq!(
            (s.as_u16(), code(&v), v["field"].as_str()),
            (status, c, field),
            "{body} {if_match:?}: {v}"
        );
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(f.get("/api/v1/policies/gold").await.1, gold, "{body}");
    }
    let (s, v) = f
        .call(
            Method::PATCH,
            "/api/v1/policies/gold",
            admin,
            Some((j, &format!(r#"{{"description":"{}"}}"#, "a".repeat(2000)))),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
    let (s, v) = f
        .call(
            Method::PATCH,
            "/api/v1/policies/gold",
            admin,
            Some(("text/plain", "{}")),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
    // Creation refuses alike and creates nothing.
    for (body, c, field) in [
        (r#"{"name":"Bad_Name"}"#, "invalid_value", Some("name")),
        (r#"{}"#, "invalid_value", Some("name")),
        (
            r#"{"name":"silver","rpo_threshold_minutes":0}"#,
            "invalid_value",
            Some("rpo_threshold_minutes"),
        ),
        (
            r#"{"name":"silver","created":"now"}"#,
            "read_only_field",
            Some("created"),
        ),
        (
            r#"{"name":"silver","colour":"grey"}"#,
            "unknown_field",
            Some("colour"),
        ),
    ] {
        let (s, v) = f
            .call(Method::POST, "/api/v1/policies", admin, Some((j, body)))
            .await;
        assert_eq!(
            (s, code(&v), v["field"].as_str()),
            (StatusCode::BAD_REQUEST, c, field),
            "{body}: {v}"
        );
    }
    assert_eq!(
        f.get("/api/v1/policies").await.1["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Patch with the right If-Match, then without: merged, revision and ETag move on.
    let (s, h, v) = patch(
        r#"{"retention":{"hourly_days":7},"description":null,"compression_level":9}"#,
        Some("\"2\""),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(etag(&h), "\"3\"");
    assert_eq!(v["revision"], 3);
    assert_eq!(v["description"], Value::Null);
    assert_eq!(v["retention"]["hourly_days"], 7);
    assert_eq!(v["retention"]["for_days"], 30);
    assert_eq!(v["compression_level"], 9);
    assert_eq!(v["rpo_threshold_minutes"], 5);
    assert_eq!(v["created"], gold["created"]);
    let (s, _, v) = patch(r#"{"resync_threshold_percent":30}"#, None).await;
    assert_eq!((s, v["revision"].as_u64()), (StatusCode::OK, Some(4)));
    // A patch that changes nothing keeps the revision; `*` matches any.
    let (s, _, v) = patch(r#"{"resync_threshold_percent":30}"#, Some("*")).await;
    assert_eq!((s, v["revision"].as_u64()), (StatusCode::OK, Some(4)));

    // Paths that cannot name a policy are 404s.
    for uri in [
        "/api/v1/policies/nope",
        "/api/v1/policies/NOPE",
        &format!("/api/v1/policies/{}", "a".repeat(300)),
    ] {
        let (s, v) = f.get(uri).await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::NOT_FOUND, "policy_not_found"),
            "{uri}"
        );
    }

    // Delete: never the default; If-Match; then gone.
    let (s, v) = f
        .call(Method::DELETE, "/api/v1/policies/default", admin, None)
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "default_policy"));
    let (s, _, v) = f
        .request(
            Method::DELETE,
            "/api/v1/policies/gold",
            admin,
            &[("if-match", "\"3\"")],
            None,
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::PRECONDITION_FAILED, "revision_mismatch")
    );
    let (s, _, v) = f
        .request(
            Method::DELETE,
            "/api/v1/policies/gold",
            admin,
            &[("if-match", "\"4\"")],
            None,
        )
        .await;
    assert_eq!((s, v["name"].as_str()), (StatusCode::OK, Some("gold")));
    let (s, v) = f.get("/api/v1/policies/gold").await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "policy_not_found"));
    let (s, v) = f
        .call(Method::DELETE, "/api/v1/policies/gold", admin, None)
        .await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "policy_not_found"));

    // Every policy route needs an admin token.
    for (m, uri) in [
        (Method::POST, "/api/v1/policies"),
        (Method::PATCH, "/api/v1/policies/default"),
        (Method::DELETE, "/api/v1/policies/default"),
    ] {
        let (s, v) = f
            .call(m.clone(), uri, None, Some((j, r#"{"name":"x"}"#)))
            .await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::UNAUTHORIZED, "unauthorized"),
            "{m} {uri}"
        );
    }
    let (_, list) = f.get("/api/v1/policies").await;
    assert_eq!(list["items"][0]["revision"], 1, "the default is untouched");
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn policies_paginate() {
    let f = fixture(&[]).await;
    for n in ["c", "a", "b", "d"] {
        let (s, _) = f
            .call(
                Method::POST,
                "/api/v1/policies",
                Some(&f.admin),
                Some(("application/json", &format!(r#"{{"name":"{n}"}}"#))),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let mut names = Vec::new();
    let mut uri = "/api/v1/policies?limit=2".to_string();
    loop {
        let (s, page) = f.get(&uri).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        for p in page["items"].as_array().unwrap() {
            names.push(p["name"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => uri = format!("/api/v1/policies?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(names, ["a", "b", "c", "d", "default"]);
}

/// Protected items through their state machine, every operation a job run by the real runner:
/// enable (with and without points already in the vault), refusals with reasons, resync,
/// settings with If-Match, a policy in use, disable, and the job listing.
#[tokio::test]
async fn items_and_jobs_lifecycle() {
    let f = fixture(&["db"]).await;
    // Enable: 202 at once, the item enabling, the job queued, Location to the job.
    let (s, h, v) = f
        .request(
            Method::POST,
            "/api/v1/items",
            Some(&f.admin.clone()),
            &[],
            Some((
                "application/json",
                r#"{"name":"web-01","disks":[{"name":"os","size_bytes":1048576}]}"#,
            )),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["item"]["state"], "enabling");
    assert_eq!(v["item"]["vault"], "default");
    assert_eq!(v["item"]["policy"], "default");
    assert_eq!(v["job"]["kind"], "enable");
    let job = v["job"]["id"].as_str().unwrap().to_string();
    assert_eq!(h[header::LOCATION], format!("/api/v1/jobs/{job}").as_str());
    let j = f.job_end(&job).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(
        j["log"][0]["message"]
            .as_str()
            .unwrap()
            .contains("vault `default`")
    );
    let (_, it) = f.get("/api/v1/items/web-01").await;
    assert_eq!(it["state"], "initial-replication");
    assert_eq!(it["active_job"], Value::Null);

    // The vault already holds points of `db`: protected as soon as it is enabled.
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/items",
            Some(r#"{"name":"db","disks":[{"name":"os","size_bytes":262144}]}"#),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let j = f.job_end(v["job"]["id"].as_str().unwrap()).await;
    assert!(
        j["log"]
            .to_string()
            .contains("already holds 1 recovery point"),
        "{j}"
    );
    let (_, it) = f.get("/api/v1/items/db").await;
    assert_eq!(it["state"], "protected");

    // Refusals: each a clear 4xx, nothing created.
    for (body, status, code_, field) in [
        (
            r#"{"name":"db","disks":[{"name":"os","size_bytes":512}]}"#,
            StatusCode::CONFLICT,
            "item_exists",
            None,
        ),
        (
            r#"{"name":"x","disks":[]}"#,
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("disks"),
        ),
        (
            r#"{"name":"x","disks":[{"name":"os","size_bytes":1000}]}"#,
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("disks"),
        ),
        (
            r#"{"name":"../x","disks":[{"name":"os","size_bytes":512}]}"#,
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("name"),
        ),
        (
            r#"{"name":"x","vault":"nope","disks":[{"name":"os","size_bytes":512}]}"#,
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("vault"),
        ),
        (
            r#"{"name":"x","policy":"nope","disks":[{"name":"os","size_bytes":512}]}"#,
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("policy"),
        ),
        (
            r#"{"name":"x","state":"protected","disks":[{"name":"os","size_bytes":512}]}"#,
            StatusCode::BAD_REQUEST,
            "unknown_field",
            Some("state"),
        ),
    ] {
        let (s, v) = f.send(Method::POST, "/api/v1/items", Some(body)).await;
        assert_eq!((s, code(&v)), (status, code_), "{body}: {v}");
        assert_eq!(v["field"].as_str(), field, "{body}: {v}");
    }
    let (_, page) = f.get("/api/v1/items").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2, "{page}");

    // The state machine refuses with the reason.
    let (s, v) = f
        .send(Method::POST, "/api/v1/items/web-01/resync", None)
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "illegal_transition"));
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("while the item is initial-replication"),
        "{v}"
    );
    // Resync of a protected item.
    let (s, v) = f.send(Method::POST, "/api/v1/items/db/resync", None).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let j = f.job_end(v["job"]["id"].as_str().unwrap()).await;
    assert_eq!(j["state"], "succeeded");
    let (_, it) = f.get("/api/v1/items/db").await;
    assert_eq!(it["state"], "resynchronizing");
    let (s, v) = f.send(Method::POST, "/api/v1/items/db/resync", None).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "illegal_transition"));
    assert!(
        v["message"].as_str().unwrap().contains("already running"),
        "{v}"
    );

    // Settings: If-Match, references checked, unknown members named.
    let rev = it["revision"].as_u64().unwrap();
    let (s, _, v) = f
        .request(
            Method::PATCH,
            "/api/v1/items/db",
            Some(&f.admin.clone()),
            &[("if-match", &format!("\"{}\"", rev - 1))],
            Some(("application/json", r#"{"description":"stale"}"#)),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::PRECONDITION_FAILED, "revision_mismatch")
    );
    let (s, v) = f
        .send(
            Method::PATCH,
            "/api/v1/items/db",
            Some(r#"{"policy":"nope"}"#),
        )
        .await;
    assert_eq!(
        (s, v["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("policy"))
    );
    let (s, v) = f
        .send(Method::PATCH, "/api/v1/items/db", Some(r#"{"vault":"x"}"#))
        .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "unknown_field"));
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/policies",
            Some(r#"{"name":"gold","rpo_threshold_minutes":15}"#),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, _, v) = f
        .request(
            Method::PATCH,
            "/api/v1/items/db",
            Some(&f.admin.clone()),
            &[("if-match", &format!("\"{rev}\""))],
            Some((
                "application/json",
                r#"{"policy":"gold","description":"orders"}"#,
            )),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["policy"].as_str(), v["description"].as_str()),
        (Some("gold"), Some("orders"))
    );
    let (s, v) = f.send(Method::DELETE, "/api/v1/policies/gold", None).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "policy_in_use"));

    // Disable: the item goes, its points stay in the vault.
    let (s, v) = f.send(Method::DELETE, "/api/v1/items/db", None).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["item"]["state"], "disabling");
    let j = f.job_end(v["job"]["id"].as_str().unwrap()).await;
    assert!(
        j["log"].to_string().contains("stay in vault `default`"),
        "{j}"
    );
    let (s, v) = f.get("/api/v1/items/db").await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "item_not_found"));
    let (_, pts) = f.get("/api/v1/vaults/default/points?item=db").await;
    assert_eq!(pts["items"].as_array().unwrap().len(), 1);
    let (s, v) = f.send(Method::DELETE, "/api/v1/policies/gold", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // Jobs: newest first, by item, paginated; a finished job cannot be cancelled.
    let (_, all) = f.get("/api/v1/jobs").await;
    let kinds: Vec<&str> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["disable", "resync", "enable", "enable"]);
    let (_, one) = f.get("/api/v1/jobs?item=db&limit=1").await;
    assert_eq!(one["items"][0]["kind"], "disable");
    let cursor = one["next_cursor"].as_str().unwrap().to_string();
    let (_, two) = f
        .get(&format!("/api/v1/jobs?item=db&limit=1&cursor={cursor}"))
        .await;
    assert_eq!(two["items"][0]["kind"], "resync");
    let id = all["items"][0]["id"].as_str().unwrap();
    let (s, v) = f
        .send(Method::POST, &format!("/api/v1/jobs/{id}/cancel"), None)
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "job_state"));
    let (s, v) = f.get("/api/v1/jobs/no-such-job").await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "job_not_found"));
    let (s, v) = f.get("/api/v1/jobs?state=x").await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_query"));
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.serialize_request(&key).unwrap().pem().unwrap()
}

/// Parses `AB:CD:…`.
fn unhex(fp: &str) -> [u8; 32] {
    hex::decode(fp.replace(':', ""))
        .unwrap()
        .try_into()
        .unwrap()
}

impl Fixture {
    /// Enrolls agent `name` acting for `items`; returns its certificate's SHA-256.
    async fn enroll(&self, name: &str, items: &[&str]) -> [u8; 32] {
        let body = json!({"agent": name, "items": items, "ttl_seconds": 600}).to_string();
        let (s, v) = self
            .send(Method::POST, "/api/v1/enrollment-tokens", Some(&body))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert!(
            v["command"]
                .as_str()
                .unwrap()
                .starts_with("FERRY_AGENT_TOKEN="),
            "{v}"
        );
        let secret = v["secret"].as_str().unwrap().to_string();
        let req = json!({"token": secret, "csr": csr(), "hostname": name}).to_string();
        let (s, v) = self
            .call(
                Method::POST,
                "/api/v1/enroll",
                None,
                Some(("application/json", &req)),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(v["agent"], name);
        // The same token never enrolls twice.
        let (s, again) = self
            .call(
                Method::POST,
                "/api/v1/enroll",
                None,
                Some(("application/json", &req)),
            )
            .await;
        assert_eq!(
            (s, code(&again)),
            (StatusCode::FORBIDDEN, "enrollment_token_used")
        );
        unhex(v["certificate_sha256"].as_str().unwrap())
    }
}

/// Who may call what: every route × (anonymous, an unknown token, a revoked admin token, an
/// active admin token, an active agent's certificate, a revoked agent's certificate, a
/// certificate no agent has). Public routes answer everyone; admin routes only an admin
/// token (an agent gets 403 `admin_only`); agent routes only an active agent's certificate
/// (an admin 403 `agent_only`); an agent sees only its own items; revocation is immediate.
#[tokio::test]
async fn authorisation_matrix() {
    let f = fixture(&[]).await;
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/tokens",
            Some(r#"{"name":"soon revoked"}"#),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let revoked = v["secret"].as_str().unwrap().to_string();
    let id = v["id"].as_str().unwrap().to_string();
    let (s, _) = f
        .send(Method::DELETE, &format!("/api/v1/tokens/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    for item in ["web-01", "db-01"] {
        let body = json!({"name": item, "disks": [{"name": "os", "size_bytes": 1048576}]});
        let (s, v) = f
            .send(Method::POST, "/api/v1/items", Some(&body.to_string()))
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    }
    let web = f.enroll("web-agent", &["web-01"]).await;
    let db = f.enroll("db-agent", &["db-01"]).await;
    let gone = f.enroll("gone-agent", &[]).await;
    let (s, v) = f
        .send(Method::DELETE, "/api/v1/agents/gone-agent", None)
        .await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("revoked")));

    #[derive(Debug, Clone, Copy)]
    enum Who<'a> {
        Anonymous,
        Token(&'a str),
        Agent([u8; 32]),
    }
    let admin = f.admin.clone();
    let callers = [
        ("anonymous", Who::Anonymous),
        ("unknown token", Who::Token("not-a-token")),
        ("revoked token", Who::Token(&revoked)),
        ("admin", Who::Token(&admin)),
        ("agent", Who::Agent(web)),
        ("revoked agent", Who::Agent(gone)),
        ("unknown certificate", Who::Agent([9; 32])),
    ];
    for (method, path) in ROUTES {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let body = matches!(*method, "POST" | "PATCH").then_some(("application/json", "{}"));
        let class = if matches!(
            *path,
            "/api/v1/health" | "/api/v1/openapi.json" | "/api/v1/enroll"
        ) {
            "public"
        } else if path.starts_with("/api/v1/agent/") || *path == "/api/v1/agent" {
            "agent"
        } else {
            "admin"
        };
        // Admin calls act on names that do not exist, so that nothing the rest of the test
        // needs is disabled or revoked on the way.
        let uri = path
            .replace(
                "{name}",
                if class == "agent" {
                    "web-01"
                } else {
                    "nothing-here"
                },
            )
            .replace("{id}", "20261126T000000.000Z-00000000");
        for (label, who) in callers {
            let (token, cert) = match who {
                Who::Anonymous => (None, None),
                Who::Token(t) => (Some(t), None),
                Who::Agent(c) => (None, Some(c)),
            };
            let (s, _, v) = f
                .request_with_cert(m.clone(), &uri, token, cert, &[], body)
                .await;
            let what = format!("{method} {uri} as {label}: {s} {v}");
            let refused = |status: StatusCode, c: &str| {
                assert_eq!((s, code(&v)), (status, c), "{what}");
            };
            match (class, label) {
                ("public", _) => assert!(
                    s != StatusCode::UNAUTHORIZED && s != StatusCode::FORBIDDEN,
                    "{what}"
                ),
                ("admin", "admin") | ("agent", "agent") => assert!(
                    s != StatusCode::UNAUTHORIZED && s != StatusCode::FORBIDDEN,
                    "{what}"
                ),
                ("admin", "anonymous" | "revoked agent" | "unknown certificate") => {
                    refused(StatusCode::UNAUTHORIZED, "unauthorized");
                }
                ("admin", "agent") => refused(StatusCode::FORBIDDEN, "admin_only"),
                ("admin", _) => refused(StatusCode::UNAUTHORIZED, "invalid_token"),
                ("agent", "admin") => refused(StatusCode::FORBIDDEN, "agent_only"),
                ("agent", "anonymous" | "unknown token" | "revoked token") => {
                    refused(StatusCode::UNAUTHORIZED, "client_certificate_required");
                }
                ("agent", "revoked agent") => {
                    refused(StatusCode::UNAUTHORIZED, "certificate_revoked");
                }
                ("agent", "unknown certificate") => {
                    refused(StatusCode::UNAUTHORIZED, "unknown_certificate");
                }
                other => panic!("unexpected case {other:?}"),
            }
        }
    }

    // Each agent sees its own items only; another's, or one that does not exist, is the
    // same 403.
    let as_agent = |cert: [u8; 32], uri: String| {
        let f = &f;
        async move {
            let (s, _, v) = f
                .request_with_cert(Method::GET, &uri, None, Some(cert), &[], None)
                .await;
            (s, v)
        }
    };
    let (s, v) = as_agent(web, "/api/v1/agent/items/web-01".into()).await;
    assert_eq!((s, v["name"].as_str()), (StatusCode::OK, Some("web-01")));
    for (cert, uri) in [
        (web, "/api/v1/agent/items/db-01"),
        (web, "/api/v1/agent/items/nothing-here"),
        (db, "/api/v1/agent/items/web-01"),
    ] {
        let (s, v) = as_agent(cert, uri.into()).await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::FORBIDDEN, "forbidden_item"),
            "{uri}"
        );
    }
    let (s, v) = as_agent(db, "/api/v1/agent/items".into()).await;
    assert_eq!(s, StatusCode::OK);
    let names: Vec<_> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].clone())
        .collect();
    assert_eq!(names, [json!("db-01")]);
    let (s, v) = as_agent(web, "/api/v1/agent".into()).await;
    assert_eq!((s, v["name"].as_str()), (StatusCode::OK, Some("web-agent")));
    assert_eq!(v["items"], json!(["web-01"]));

    // An operator moves db-01 to the web agent; revoking the db agent is immediate.
    let (s, v) = f
        .send(
            Method::PATCH,
            "/api/v1/agents/web-agent",
            Some(r#"{"items":["web-01","db-01"]}"#),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = as_agent(web, "/api/v1/agent/items/db-01".into()).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = f
        .send(Method::DELETE, "/api/v1/agents/db-agent", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = as_agent(db, "/api/v1/agent".into()).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "certificate_revoked")
    );
    assert!(matches!(
        f.agents.check(&db),
        crate::agents::CertCheck::Revoked
    ));
}

/// Enrollment tokens: bad values refused naming the field, an unknown or expired or revoked
/// token refused with its own code, a bad CSR refused without spending the token.
#[tokio::test]
async fn enrollment_refusals_change_nothing() {
    let f = fixture(&[]).await;
    for (body, field) in [
        (json!({"agent": "-x"}), "agent"),
        (json!({"agent": "a", "ttl_seconds": 0}), "ttl_seconds"),
        (
            json!({"agent": "a", "ttl_seconds": 99_999_999u64}),
            "ttl_seconds",
        ),
    ] {
        let (s, v) = f
            .send(
                Method::POST,
                "/api/v1/enrollment-tokens",
                Some(&body.to_string()),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["field"], field, "{v}");
    }
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(r#"{"agent":"a","items":["no-such-item"]}"#),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_value"),
        "{v}"
    );
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(r#"{"agent":"a"}"#),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let secret = v["secret"].as_str().unwrap().to_string();
    let id = v["id"].as_str().unwrap().to_string();
    let enroll = |token: String, csr_pem: String| {
        let f = &f;
        async move {
            let b = json!({"token": token, "csr": csr_pem}).to_string();
            f.call(
                Method::POST,
                "/api/v1/enroll",
                None,
                Some(("application/json", &b)),
            )
            .await
        }
    };
    let (s, v) = enroll("nope".into(), csr()).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::FORBIDDEN, "invalid_enrollment_token")
    );
    let (s, v) = enroll(
        secret.clone(),
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n".into(),
    )
    .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_csr"),
        "{v}"
    );
    let (s, v) = f.get("/api/v1/enrollment-tokens").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v["items"][0]["state"], "active",
        "a bad CSR spent nothing: {v}"
    );
    assert!(
        !v.to_string().contains(&secret),
        "the secret is never listed"
    );
    let (s, _) = f
        .send(
            Method::DELETE,
            &format!("/api/v1/enrollment-tokens/{id}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = enroll(secret, csr()).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::FORBIDDEN, "enrollment_token_revoked")
    );
    let (s, v) = f.get("/api/v1/agents").await;
    assert_eq!(
        (s, v["items"].as_array().unwrap().len()),
        (StatusCode::OK, 0)
    );
}

/// Replication groups: lifecycle, one group per item, existing items only, If-Match.
#[tokio::test]
async fn groups_lifecycle() {
    let f = fixture(&[]).await;
    for item in ["web-01", "db-01"] {
        let body = json!({"name": item, "disks": [{"name": "os", "size_bytes": 1048576}]});
        let (s, _) = f
            .send(Method::POST, "/api/v1/items", Some(&body.to_string()))
            .await;
        assert_eq!(s, StatusCode::ACCEPTED);
    }
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/groups",
            Some(r#"{"name":"tier1","description":"web + db","items":["web-01"]}"#),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let rev = v["revision"].as_u64().unwrap();
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/groups",
            Some(r#"{"name":"tier2","items":["web-01"]}"#),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "item_in_group"));
    let (s, v) = f
        .send(Method::POST, "/api/v1/groups", Some(r#"{"name":"tier1"}"#))
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "group_exists"));
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/groups",
            Some(r#"{"name":"x","members":[]}"#),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "unknown_field"));
    // serde reads a struct from an array of its members; the API takes objects only.
    let (s, v) = f
        .send(Method::POST, "/api/v1/groups", Some(r#"["x", null, []]"#))
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_request"),
        "{v}"
    );
    let stale = format!("\"{}\"", rev + 1000);
    let (s, _, v) = f
        .request(
            Method::PATCH,
            "/api/v1/groups/tier1",
            Some(&f.admin),
            &[("if-match", &stale)],
            Some(("application/json", r#"{"items":["web-01","db-01"]}"#)),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::PRECONDITION_FAILED, "revision_mismatch")
    );
    let (s, v) = f
        .send(
            Method::PATCH,
            "/api/v1/groups/tier1",
            Some(r#"{"items":["web-01","db-01"],"description":null}"#),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["items"], json!(["web-01", "db-01"]));
    assert_eq!(v["description"], Value::Null);
    let (s, v) = f.get("/api/v1/groups").await;
    assert_eq!(
        (s, v["items"].as_array().unwrap().len()),
        (StatusCode::OK, 1)
    );
    let (s, _) = f.send(Method::DELETE, "/api/v1/groups/tier1", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = f.get("/api/v1/groups/tier1").await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "group_not_found"));
}

/// `/metrics` is Prometheus text for an admin, counting answers and items by state.
#[tokio::test]
async fn metrics_in_prometheus_text() {
    let f = fixture(&[]).await;
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/items",
            Some(r#"{"name":"web-01","disks":[{"name":"os","size_bytes":1048576}]}"#),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    f.job_end(v["job"]["id"].as_str().unwrap()).await;
    let (s, _) = f.get("/api/v1/nowhere").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let req = Request::builder()
        .uri("/api/v1/metrics")
        .header(header::AUTHORIZATION, format!("Bearer {}", f.admin))
        .body(Body::empty())
        .unwrap();
    let resp = f.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = String::from_utf8(
        axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    for line in [
        "ferry_items{state=\"initial-replication\"} 1",
        "ferry_jobs{state=\"succeeded\"} 1",
        "ferry_admin_tokens_active 1",
        "ferry_http_responses_total{class=\"4xx\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
    }
}

/// `GET /agent/items/{name}/disks/{disk}/digests`: the digest list of the item's newest point
/// decodes with the protocol's reader and holds the SHA-256 of each chunk of the disk (a
/// hole, a zero chunk and a short last chunk included); its temporary files are gone once
/// it is served. A disk or item without a point is 404 `no_point`, another agent's item 403,
/// a full house of computations 503 `digests_busy`, no process role 503 `no_process_role`.
#[tokio::test]
async fn agent_disk_digests() {
    use sha2::Digest;
    use std::os::unix::fs::FileExt;

    let f = fixture_with(&[], true).await;
    for item in ["web-01", "empty-01", "db-01"] {
        let body = json!({"name": item, "disks": [{"name": "disk0", "size_bytes": 1048576}]});
        let (s, v) = f
            .send(Method::POST, "/api/v1/items", Some(&body.to_string()))
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    }
    let web = f.enroll("web-agent", &["web-01", "empty-01"]).await;
    let db = f.enroll("db-agent", &["db-01"]).await;

    // Two points of web-01; the newest counts. Chunks of 256 KiB: data, a hole, zeros
    // written, data, and a short last chunk.
    let cs = 256u64 << 10;
    let img = f._dir.path().join("web.img");
    let size = 4 * cs + 1000;
    std::fs::write(&img, vec![5u8; 4096]).unwrap();
    f.vault
        .import(ImportOptions::full("web-01", &img), Default::default())
        .await
        .unwrap();
    let file = std::fs::File::create(&img).unwrap();
    file.set_len(size).unwrap();
    file.write_all_at(&vec![1u8; 4096], 0).unwrap();
    file.write_all_at(&vec![0u8; 1 << 18], 2 * cs).unwrap();
    file.write_all_at(&[3u8; 70_000], 3 * cs + 100).unwrap();
    file.write_all_at(&[4u8; 999], 4 * cs).unwrap();
    drop(file);
    let point = f
        .vault
        .import(ImportOptions::full("web-01", &img), Default::default())
        .await
        .unwrap()
        .point;

    let uri = "/api/v1/agent/items/web-01/disks/disk0/digests";
    let (s, h, body) = f.get_raw_with_cert(uri, web).await;
    assert_eq!(s, StatusCode::OK, "{body:?}");
    assert_eq!(h[header::CONTENT_TYPE], ferry_proto::digests::CONTENT_TYPE);
    assert_eq!(h[header::CONTENT_LENGTH], body.len().to_string().as_str());
    let mut r = ferry_proto::digests::Reader::new(&body[..]).unwrap();
    assert_eq!(
        r.header(),
        &ferry_proto::digests::Header {
            chunk_size: u32::try_from(cs).unwrap(),
            disk_size: size,
            point: point.id.clone(),
        }
    );
    let image = std::fs::read(&img).unwrap();
    let mut got = Vec::new();
    while let Some(d) = r.next_digest().unwrap() {
        got.push(d);
    }
    let want: Vec<[u8; 32]> = image
        .chunks(usize::try_from(cs).unwrap())
        .map(|c| sha2::Sha256::digest(c).into())
        .collect();
    assert_eq!(got.len(), 5);
    assert_eq!(got, want);
    assert_eq!(got[1], ferry_proto::digests::zero_digest(cs));
    assert_eq!(got[2], got[1]);
    // Nothing is left on the cache disk.
    let scratch = f.process.as_ref().unwrap().cache_dir().join("scratch");
    let left: Vec<_> = std::fs::read_dir(&scratch).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");

    // No point holds the disk, or the item has no point: 404 `no_point`.
    for uri in [
        "/api/v1/agent/items/web-01/disks/disk9/digests",
        "/api/v1/agent/items/web-01/disks/..%2Fx/digests",
        "/api/v1/agent/items/empty-01/disks/disk0/digests",
    ] {
        let (s, _, v) = f
            .request_with_cert(Method::GET, uri, None, Some(web), &[], None)
            .await;
        assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "no_point"), "{uri}");
    }
    // Another agent's item, or an item that does not exist: 403, as for the item itself.
    for (cert, uri) in [
        (db, uri),
        (web, "/api/v1/agent/items/db-01/disks/disk0/digests"),
        (web, "/api/v1/agent/items/nothing-here/disks/disk0/digests"),
    ] {
        let (s, _, v) = f
            .request_with_cert(Method::GET, uri, None, Some(cert), &[], None)
            .await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::FORBIDDEN, "forbidden_item"),
            "{uri}"
        );
    }
    // An admin token is not an agent.
    let (s, v) = f.get(uri).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "agent_only"));

    // Every computation slot taken: 503 `digests_busy`, until one is free.
    let held = super::agents::DIGEST_JOBS
        .try_acquire_many(u32::try_from(super::agents::MAX_DIGEST_JOBS).unwrap())
        .unwrap();
    let (s, _, v) = f
        .request_with_cert(Method::GET, uri, None, Some(web), &[], None)
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::SERVICE_UNAVAILABLE, "digests_busy")
    );
    drop(held);
    let (s, _, again) = f.get_raw_with_cert(uri, web).await;
    assert_eq!((s, &again), (StatusCode::OK, &body));

    // Without the process role: 503 `no_process_role`.
    let g = fixture(&[]).await;
    let body = json!({"name": "web-01", "disks": [{"name": "disk0", "size_bytes": 1048576}]});
    let (s, _) = g
        .send(Method::POST, "/api/v1/items", Some(&body.to_string()))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let web = g.enroll("web-agent", &["web-01"]).await;
    let (s, _, v) = g
        .request_with_cert(Method::GET, uri, None, Some(web), &[], None)
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::SERVICE_UNAVAILABLE, "no_process_role")
    );
}

/// Pause and resume: the item says who paused it and when, its agent's plan says `paused`,
/// both are idempotent, and a stale `If-Match` or an unknown item changes nothing.
#[tokio::test]
async fn pause_and_resume() {
    let f = fixture_with(&[], true).await;
    let body = json!({"name": "web-01", "disks": [{"name": "disk0", "size_bytes": 1048576}]});
    let (s, v) = f
        .send(Method::POST, "/api/v1/items", Some(&body.to_string()))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    f.job_end(v["job"]["id"].as_str().unwrap()).await;
    let agent = f.enroll("web-agent", &["web-01"]).await;
    let plan = || async {
        let (s, _, body) = f
            .get_raw_with_cert("/api/v1/agent/items/web-01/replication", agent)
            .await;
        assert_eq!(s, StatusCode::OK);
        serde_json::from_slice::<Value>(&body).unwrap()
    };
    assert_eq!(plan().await["paused"], false);
    let (_, item) = f.get("/api/v1/items/web-01").await;
    assert_eq!(item["paused"], Value::Null);
    let rev = item["revision"].as_u64().unwrap();

    // A stale If-Match is refused and pauses nothing.
    let (s, _, v) = f
        .request(
            Method::POST,
            "/api/v1/items/web-01/pause",
            Some(&f.admin.clone()),
            &[("if-match", "\"1\"")],
            None,
        )
        .await;
    assert_eq!(s, StatusCode::PRECONDITION_FAILED, "{v}");
    assert_eq!(plan().await["paused"], false);

    let (s, v) = f
        .send(Method::POST, "/api/v1/items/web-01/pause", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["paused"]["by"].is_string(), "{v}");
    assert!(v["paused"]["at"].as_str().unwrap().ends_with('Z'), "{v}");
    let paused_rev = v["revision"].as_u64().unwrap();
    assert!(paused_rev > rev);
    assert_eq!(plan().await["paused"], true);
    // Again: nothing changes.
    let (s, v) = f
        .send(Method::POST, "/api/v1/items/web-01/pause", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["revision"].as_u64().unwrap(), paused_rev);

    let (s, v) = f
        .send(Method::POST, "/api/v1/items/web-01/resume", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["paused"], Value::Null);
    assert_eq!(plan().await["paused"], false);
    let (s, v) = f
        .send(Method::POST, "/api/v1/items/web-01/resume", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["revision"], json!(paused_rev + 1));

    let (s, v) = f.send(Method::POST, "/api/v1/items/nope/pause", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
}

/// A policy's `resync_window`: `null` by default; set by `POST`, replaced and removed by
/// `PATCH`; refusals name the member and change nothing; the plan of an item following the
/// policy carries it (and leaves it out when the policy has none).
#[tokio::test]
async fn policy_resync_window() {
    let f = fixture_with(&[], true).await;
    let (_, d) = f.get("/api/v1/policies/default").await;
    assert_eq!(d["resync_window"], Value::Null);

    let (s, p) = f
        .send(
            Method::POST,
            "/api/v1/policies",
            Some(r#"{"name":"night","resync_window":{"from":"22:00","to":"6:00","days":["Sunday","fri"]}}"#),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    assert_eq!(
        p["resync_window"],
        json!({"from": "22:00", "to": "06:00", "days": ["fri", "sun"]})
    );
    let (_, got) = f.get("/api/v1/policies/night").await;
    assert_eq!(got, p);
    let rev = p["revision"].as_u64().unwrap();

    // Refused, naming the member; nothing changes.
    for (body, field) in [
        (
            r#"{"resync_window":{"from":"24:00","to":"06:00"}}"#,
            "resync_window.from",
        ),
        (
            r#"{"resync_window":{"from":"22:00","to":"22:00"}}"#,
            "resync_window.to",
        ),
        (r#"{"resync_window":{"from":"22:00"}}"#, "resync_window.to"),
        (
            r#"{"resync_window":{"from":"22:00","to":"06:00","days":[]}}"#,
            "resync_window.days",
        ),
        (
            r#"{"resync_window":{"from":"22:00","to":"06:00","days":["fri","someday"]}}"#,
            "resync_window.days[1]",
        ),
        (
            r#"{"resync_window":{"from":"22:00","to":"06:00","at":1}}"#,
            "resync_window.at",
        ),
        (r#"{"resync_window":"22:00-06:00"}"#, "resync_window"),
    ] {
        let (s, v) = f
            .send(Method::PATCH, "/api/v1/policies/night", Some(body))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["field"], field, "{body}: {v}");
    }
    let (_, same) = f.get("/api/v1/policies/night").await;
    assert_eq!(same["revision"].as_u64(), Some(rev));

    // Replaced whole (no days: every day), then the item's plan carries it.
    let (s, p) = f
        .send(
            Method::PATCH,
            "/api/v1/policies/night",
            Some(r#"{"resync_window":{"from":"23:30","to":"05:00"}}"#),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert_eq!(p["resync_window"], json!({"from": "23:30", "to": "05:00"}));
    let body = json!({"name": "web-01", "policy": "night",
        "disks": [{"name": "disk0", "size_bytes": 1048576}]});
    let (s, v) = f
        .send(Method::POST, "/api/v1/items", Some(&body.to_string()))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    f.job_end(v["job"]["id"].as_str().unwrap()).await;
    let agent = f.enroll("web-agent", &["web-01"]).await;
    let plan = || async {
        let (s, _, body) = f
            .get_raw_with_cert("/api/v1/agent/items/web-01/replication", agent)
            .await;
        assert_eq!(s, StatusCode::OK);
        serde_json::from_slice::<ferry_proto::enroll::ReplicationPlan>(&body).unwrap()
    };
    assert_eq!(
        plan().await.resync_window,
        Some(ferry_proto::enroll::ResyncWindow {
            from: "23:30".into(),
            to: "05:00".into(),
            days: None,
        })
    );

    // Removed with null: the record says null, the plan leaves the member out.
    let (s, p) = f
        .send(
            Method::PATCH,
            "/api/v1/policies/night",
            Some(r#"{"resync_window":null}"#),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert_eq!(p["resync_window"], Value::Null);
    let (s, _, raw) = f
        .get_raw_with_cert("/api/v1/agent/items/web-01/replication", agent)
        .await;
    assert_eq!(s, StatusCode::OK);
    let raw: Value = serde_json::from_slice(&raw).unwrap();
    assert!(raw.get("resync_window").is_none(), "{raw}");
    assert_eq!(plan().await.resync_window, None);
}

#[tokio::test]
async fn failover_test_cleanup_unplanned_commit() {
    let f = fixture(&["db"]).await;
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/items",
            Some(r#"{"name":"db","disks":[{"name":"disk0","size_bytes":262144}]}"#),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    f.job_end(v["job"]["id"].as_str().unwrap()).await;
    let target = f._dir.path().join("target");

    // Bad requests change nothing.
    for (body, field) in [
        (r#"{"type":"drill"}"#, "type"),
        (
            r#"{"type":"planned","point":"latest-app-consistent"}"#,
            "point",
        ),
        (r#"{"type":"test","format":"iso"}"#, "format"),
        (r#"{"type":"test","point":""}"#, "point"),
    ] {
        let (s, v) = f
            .send(Method::POST, "/api/v1/items/db/failover", Some(body))
            .await;
        assert_eq!(
            (s, v["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some(field)),
            "{v}"
        );
    }
    let (s, v) = f
        .send(Method::POST, "/api/v1/items/db/test-failover/cleanup", None)
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "illegal_transition"),
        "{v}"
    );
    assert!(
        v["message"].as_str().unwrap().contains("no test failover"),
        "{v}"
    );

    // Test failover: the disk and machine.json in <target>/test/db/<job>/, the item still
    // protected, the copy recorded.
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/items/db/failover",
            Some(r#"{"type":"test","format":"qcow2"}"#),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["job"]["kind"], "test-failover");
    let job = v["job"]["id"].as_str().unwrap().to_string();
    let j = f.job_end(&job).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let dir = target.join("test").join("db").join(&job);
    let m: Value =
        serde_json::from_slice(&std::fs::read(dir.join("machine.json")).unwrap()).unwrap();
    assert_eq!(m["version"], 1);
    assert_eq!(m["name"], "db");
    assert_eq!(m["failover"], "test");
    assert_eq!(m["disks"][0]["file"], "disk0.qcow2");
    assert_eq!(m["disks"][0]["format"], "qcow2");
    assert_eq!(m["disks"][0]["size_bytes"], 262144);
    let qcow = std::fs::read(dir.join("disk0.qcow2")).unwrap();
    assert_eq!(&qcow[..4], b"QFI\xfb");
    let (_, it) = f.get("/api/v1/items/db").await;
    assert_eq!(it["state"], "protected", "{it}");
    assert_eq!(it["test_failover"]["job"], job.as_str());
    assert_eq!(it["test_failover"]["point"], m["point"]["id"]);
    assert_eq!(it["test_failover"]["stale"], false);
    assert_eq!(it["failover"], Value::Null);
    // One at a time; and the item cannot be disabled while its copy exists.
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/items/db/failover",
            Some(r#"{"type":"test"}"#),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "illegal_transition"),
        "{v}"
    );
    assert!(
        v["message"].as_str().unwrap().contains("clean it up first"),
        "{v}"
    );
    let (s, v) = f.send(Method::DELETE, "/api/v1/items/db", None).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "illegal_transition"),
        "{v}"
    );
    // Cleanup removes the directory and the record.
    let (s, v) = f
        .send(Method::POST, "/api/v1/items/db/test-failover/cleanup", None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let j = f.job_end(v["job"]["id"].as_str().unwrap()).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(!dir.exists());
    let (_, it) = f.get("/api/v1/items/db").await;
    assert_eq!(
        (it["state"].as_str(), &it["test_failover"]),
        (Some("protected"), &Value::Null)
    );

    // Commit with nothing pending: refused.
    let (s, v) = f.send(Method::POST, "/api/v1/items/db/commit", None).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "illegal_transition"),
        "{v}"
    );

    // An unplanned failover to a time before every point fails, naming why, and leaves no
    // directory and the item as it was.
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/items/db/failover",
            Some(r#"{"type":"unplanned","point":"2001-01-01T00:00:00Z"}"#),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job"]["id"].as_str().unwrap().to_string();
    let j = f.job_end(&job).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["error"].as_str().unwrap().contains("are later"), "{j}");
    assert!(!target.join("failover").join("db").join(&job).exists());
    let (_, it) = f.get("/api/v1/items/db").await;
    assert_eq!(it["state"], "protected");

    // Unplanned from the latest point, raw: pending commit, replication stopped; commit.
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/items/db/failover",
            Some(r#"{"type":"unplanned","point":"latest"}"#),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job"]["id"].as_str().unwrap().to_string();
    let j = f.job_end(&job).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let dir = target.join("failover").join("db").join(&job);
    assert_eq!(
        std::fs::read(dir.join("disk0.img")).unwrap(),
        vec![1u8; 256 << 10]
    );
    assert!(dir.join("machine.json").is_file());
    let (_, it) = f.get("/api/v1/items/db").await;
    assert_eq!(it["state"], "failover-pending-commit", "{it}");
    assert_eq!(it["failover"]["location"], dir.display().to_string());
    // A test failover is not possible now; commit is.
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/items/db/failover",
            Some(r#"{"type":"test"}"#),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "illegal_transition"),
        "{v}"
    );
    let (s, v) = f.send(Method::POST, "/api/v1/items/db/commit", None).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let j = f.job_end(v["job"]["id"].as_str().unwrap()).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let (_, it) = f.get("/api/v1/items/db").await;
    assert_eq!(it["state"], "failed-over", "{it}");
    assert_eq!(it["failover"]["mode"], "unplanned");

    // Reprotect needs an enrolled agent listed for the item: the job fails saying so and
    // the item stays failed-over, its direction unchanged.
    let (s, v) = f
        .send(Method::POST, "/api/v1/items/db/reprotect", Some(r#"{}"#))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/items/db/reprotect",
            Some(r#"{"agent":"nobody"}"#),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let j = f.job_end(v["job"]["id"].as_str().unwrap()).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["error"].as_str().unwrap().contains("not enrolled"), "{j}");
    let (_, it) = f.get("/api/v1/items/db").await;
    assert_eq!(
        (
            it["state"].as_str(),
            it["direction"].as_str(),
            &it["source_agent"]
        ),
        (
            Some("failed-over"),
            Some("primary-to-recovery"),
            &Value::Null
        ),
        "{it}"
    );
}

/// `POST /groups/{name}/failover`: one time for the whole group, each member pinned to its
/// newest point at or before it; every refusal (a point id, no point at the time, a stale
/// If-Match, one member that cannot fail over, an empty group) queues nothing for anyone.
#[tokio::test]
async fn group_failover_picks_one_time_and_queues_all_or_none() {
    use ferry_store::{Consistency, ImportOptions};
    let f = fixture(&[]).await;
    // a1 (app), b1 (app), a2, b2, a3: each a distinct millisecond.
    let disk = f._dir.path().join("g.img");
    let mut ids = std::collections::BTreeMap::new();
    for (n, (item, app)) in [
        ("a", true),
        ("b", true),
        ("a", false),
        ("b", false),
        ("a", false),
    ]
    .into_iter()
    .enumerate()
    {
        std::fs::write(&disk, vec![u8::try_from(n + 1).unwrap(); 256 << 10]).unwrap();
        let mut o = ImportOptions::full(item, &disk);
        if app {
            o.consistency = Consistency::App;
        }
        let r = f.vault.import(o, Default::default()).await.unwrap();
        ids.insert(format!("{item}{}", n / 2 + 1), r.point.id);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Enabled after their points exist: a and b are `protected`, c (no point) is not.
    for name in ["a", "b", "c"] {
        let (s, v) = f
            .send(
                Method::POST,
                "/api/v1/items",
                Some(&format!(
                    r#"{{"name":"{name}","disks":[{{"name":"disk0","size_bytes":262144}}]}}"#
                )),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        f.job_end(v["job"]["id"].as_str().unwrap()).await;
    }
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/groups",
            Some(r#"{"name":"tier1","items":["a","b"]}"#),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let jobs_before = f.get("/api/v1/jobs").await.1["items"]
        .as_array()
        .unwrap()
        .len();

    // Refusals.
    for (body, status, want) in [
        (
            r#"{"type":"test","point":"20260101T000000.000Z-x"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            r#"{"type":"unplanned","point":"2001-01-01T00:00:00Z"}"#,
            StatusCode::CONFLICT,
            "no_point",
        ),
        (
            r#"{"type":"planned","point":"latest-app-consistent"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            r#"{"type":"test","format":"iso"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
    ] {
        let (s, v) = f
            .send(Method::POST, "/api/v1/groups/tier1/failover", Some(body))
            .await;
        assert_eq!((s, code(&v)), (status, want), "{body}: {v}");
    }
    let (s, _, v) = f
        .request(
            Method::POST,
            "/api/v1/groups/tier1/failover",
            Some(&f.admin.clone()),
            &[("if-match", "\"1\"")],
            Some(("application/json", r#"{"type":"test"}"#)),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::PRECONDITION_FAILED, "revision_mismatch"),
        "{v}"
    );
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/groups/nope/failover",
            Some(r#"{"type":"test"}"#),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::NOT_FOUND, "group_not_found"),
        "{v}"
    );
    nothing_queued(&f, &["a", "b"]).await;

    // `latest`: the group's time is b2's (the older of a3 and b2): a fails over from a2.
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/groups/tier1/failover",
            Some(r#"{"type":"test","format":"raw"}"#),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let b2 = f
        .vault
        .point("b", &ferry_store::PointSelector::Id(ids["b2"].clone()))
        .await
        .unwrap();
    assert_eq!(v["point_time"], ferry_store::point::rfc3339(b2.created_ms));
    let members = v["members"].as_array().unwrap();
    assert_eq!(members.len(), 2);
    for m in members {
        let item = m["item"]["name"].as_str().unwrap();
        let want = if item == "a" { &ids["a2"] } else { &ids["b2"] };
        assert_eq!(m["point"], want.as_str(), "{m}");
        assert_eq!(m["job"]["kind"], "test-failover");
        let j = f.job_end(m["job"]["id"].as_str().unwrap()).await;
        assert_eq!(j["state"], "succeeded", "{j}");
        let (_, it) = f.get(&format!("/api/v1/items/{item}")).await;
        assert_eq!(it["test_failover"]["point"], want.as_str(), "{it}");
    }

    // One member cannot (b's test copy is cleaned up, a's is not): nothing is queued for b.
    let (s, v) = f
        .send(Method::POST, "/api/v1/items/b/test-failover/cleanup", None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    f.job_end(v["job"]["id"].as_str().unwrap()).await;
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/groups/tier1/failover",
            Some(r#"{"type":"test"}"#),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "illegal_transition"),
        "{v}"
    );
    assert!(v["message"].as_str().unwrap().contains("`a`"), "{v}");
    let (_, it) = f.get("/api/v1/items/b").await;
    assert_eq!(
        (it["active_job"].clone(), it["test_failover"].clone()),
        (Value::Null, Value::Null),
        "{it}"
    );
    let (s, v) = f
        .send(Method::POST, "/api/v1/items/a/test-failover/cleanup", None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    f.job_end(v["job"]["id"].as_str().unwrap()).await;
    nothing_queued(&f, &["a", "b"]).await;

    // `latest-app-consistent`, unplanned: each member's own newest app-consistent point; the
    // group's time is the newer (b1's). Both items then wait for commit.
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/groups/tier1/failover",
            Some(r#"{"type":"unplanned","point":"latest-app-consistent"}"#),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let b1 = f
        .vault
        .point("b", &ferry_store::PointSelector::Id(ids["b1"].clone()))
        .await
        .unwrap();
    assert_eq!(v["point_time"], ferry_store::point::rfc3339(b1.created_ms));
    for m in v["members"].as_array().unwrap() {
        let item = m["item"]["name"].as_str().unwrap();
        let want = if item == "a" { &ids["a1"] } else { &ids["b1"] };
        assert_eq!(m["point"], want.as_str(), "{m}");
        let j = f.job_end(m["job"]["id"].as_str().unwrap()).await;
        assert_eq!(j["state"], "succeeded", "{j}");
        let (_, it) = f.get(&format!("/api/v1/items/{item}")).await;
        assert_eq!(it["state"], "failover-pending-commit", "{it}");
        assert_eq!(it["failover"]["point"], want.as_str(), "{it}");
    }

    // An empty group, and a member without points, are refused.
    let (s, v) = f
        .send(Method::POST, "/api/v1/groups", Some(r#"{"name":"empty"}"#))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/groups/empty/failover",
            Some(r#"{"type":"test"}"#),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "illegal_transition"),
        "{v}"
    );
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/groups",
            Some(r#"{"name":"lone","items":["c"]}"#),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/groups/lone/failover",
            Some(r#"{"type":"test"}"#),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "no_point"), "{v}");
    assert!(v["message"].as_str().unwrap().contains("`c`"), "{v}");
    let jobs_after = f.get("/api/v1/jobs").await.1["items"]
        .as_array()
        .unwrap()
        .len();
    // Two test failovers, two cleanups, two unplanned failovers: nothing else.
    assert_eq!(jobs_after, jobs_before + 6);
}

/// Items `names` are protected with no job.
async fn nothing_queued(f: &Fixture, names: &[&str]) {
    for name in names {
        let (_, it) = f.get(&format!("/api/v1/items/{name}")).await;
        assert_eq!(it["state"], "protected", "{it}");
        assert_eq!(it["active_job"], Value::Null, "{it}");
    }
}

/// Mounts through the API: made (201, `Location`, the `nbd://` URL), listed, shown, bounded
/// by `max_mounts`, refused for what does not exist, stopped (200, the mount), then gone.
#[tokio::test]
async fn mounts_lifecycle() {
    let f = fixture(&["db"]).await;
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/items",
            Some(r#"{"name":"db","disks":[{"name":"disk0","size_bytes":262144}]}"#),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    f.job_end(v["job"]["id"].as_str().unwrap()).await;
    for (uri, body, status, want) in [
        (
            "/api/v1/items/nope/mounts",
            "{}",
            StatusCode::NOT_FOUND,
            "item_not_found",
        ),
        (
            "/api/v1/items/db/mounts",
            r#"{"point":"2001-01-01T00:00:00Z"}"#,
            StatusCode::CONFLICT,
            "no_point",
        ),
        (
            "/api/v1/items/db/mounts",
            r#"{"point":""}"#,
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            "/api/v1/items/db/mounts",
            r#"{"disk":"../x"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            "/api/v1/items/db/mounts",
            r#"{"size":1}"#,
            StatusCode::BAD_REQUEST,
            "unknown_field",
        ),
    ] {
        let (s, v) = f.send(Method::POST, uri, Some(body)).await;
        assert_eq!((s, code(&v)), (status, want), "{body}: {v}");
    }
    let (_, v) = f.get("/api/v1/mounts").await;
    assert_eq!(v["items"], serde_json::json!([]), "{v}");

    let (s, h, m) = f
        .request(
            Method::POST,
            "/api/v1/items/db/mounts",
            Some(&f.admin.clone()),
            &[],
            Some(("application/json", r#"{"writable":true}"#)),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{m}");
    let id = m["id"].as_str().unwrap().to_string();
    assert_eq!(h[header::LOCATION], format!("/api/v1/mounts/{id}").as_str());
    assert_eq!(
        (m["item"].as_str(), m["disk"].as_str()),
        (Some("db"), Some("disk0"))
    );
    assert_eq!(
        (m["size_bytes"].as_u64(), m["writable"].as_bool()),
        (Some(262144), Some(true))
    );
    assert!(
        m["url"].as_str().unwrap().starts_with("nbd://127.0.0.1:"),
        "{m}"
    );
    assert!(m["url"].as_str().unwrap().ends_with("/db-disk0"), "{m}");
    let (s, v) = f.get(&format!("/api/v1/mounts/{id}")).await;
    assert_eq!((s, &v), (StatusCode::OK, &m));
    let (s, v) = f
        .send(Method::POST, "/api/v1/items/db/mounts", Some("{}"))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = f
        .send(Method::POST, "/api/v1/items/db/mounts", Some("{}"))
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "too_many_mounts"),
        "{v}"
    );
    let (_, v) = f.get("/api/v1/mounts").await;
    assert_eq!(v["items"].as_array().unwrap().len(), 2, "{v}");

    let (s, v) = f
        .send(Method::DELETE, &format!("/api/v1/mounts/{id}"), None)
        .await;
    assert_eq!((s, &v), (StatusCode::OK, &m));
    let (s, v) = f.get(&format!("/api/v1/mounts/{id}")).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::NOT_FOUND, "mount_not_found"),
        "{v}"
    );
    let (s, v) = f
        .send(Method::DELETE, &format!("/api/v1/mounts/{id}"), None)
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::NOT_FOUND, "mount_not_found"),
        "{v}"
    );
}

/// [`fixture`] for one item `db` (one point), its runner writing failovers to the object-store
/// location `url` (`[target] location`).
async fn fixture_with_location(url: &str) -> Fixture {
    fixture_full(
        &["db"],
        false,
        Some(crate::jobs::TargetLocation {
            url: url.to_string(),
            options: Vec::new(),
        }),
    )
    .await
}

/// With `[target] location` set, failovers are objects: a test failover's disk and
/// `machine.json` under `<location>/test/<item>/<job>/` (the disk the same bytes as a local
/// export), removed by the cleanup; an unplanned failover under `failover/…`; nothing left
/// by a failed one, and nothing written to the target directory but staging.
#[tokio::test]
async fn failover_to_an_object_store_location() {
    let loc = tempfile::tempdir().unwrap();
    let url = format!("file://{}", loc.path().join("bucket").display());
    let f = fixture_with_location(&url).await;
    let backend = ferry_store::Backend::open(&url, &Vec::new(), true).unwrap();
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/items",
            Some(r#"{"name":"db","disks":[{"name":"disk0","size_bytes":262144}]}"#),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    f.job_end(v["job"]["id"].as_str().unwrap()).await;

    // Test failover: disk0.qcow2 then machine.json under test/db/<job>/.
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/items/db/failover",
            Some(r#"{"type":"test","format":"qcow2"}"#),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job"]["id"].as_str().unwrap().to_string();
    let j = f.job_end(&job).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let prefix = format!("test/db/{job}");
    let mut names: Vec<String> = backend
        .list(&prefix)
        .await
        .unwrap()
        .iter()
        .map(|o| o.location.to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            format!("{prefix}/disk0.qcow2"),
            format!("{prefix}/machine.json")
        ]
    );
    let m: Value = serde_json::from_slice(
        &backend
            .get(&format!("{prefix}/machine.json"))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(m["name"], "db");
    assert_eq!(m["failover"], "test");
    assert_eq!(m["job"], job.as_str());
    assert_eq!(m["disks"][0]["name"], "disk0");
    assert_eq!(m["disks"][0]["file"], "disk0.qcow2");
    assert_eq!(m["disks"][0]["format"], "qcow2");
    assert_eq!(m["disks"][0]["size_bytes"], 262144);
    let object = backend.get(&format!("{prefix}/disk0.qcow2")).await.unwrap();
    let local = f._dir.path().join("local.qcow2");
    f.vault
        .export_as(
            ferry_store::ExportOptions {
                item: "db".into(),
                point: ferry_store::PointSelector::Id(m["point"]["id"].as_str().unwrap().into()),
                disk: Some("disk0".into()),
                out: local.clone(),
                overwrite: false,
                sync: false,
            },
            ferry_store::FormatOptions {
                format: "qcow2".parse().unwrap(),
                vhd_round_up: true,
            },
            Arc::default(),
        )
        .await
        .unwrap();
    assert_eq!(object.as_ref(), std::fs::read(&local).unwrap().as_slice());
    let (_, it) = f.get("/api/v1/items/db").await;
    assert_eq!(it["test_failover"]["location"], format!("{url}/{prefix}"));
    // Nothing materialised locally; the staging directory holds nothing.
    let target = f._dir.path().join("target");
    assert!(!target.join("test").exists());
    assert!(
        std::fs::read_dir(target.join("staging"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0
    );

    // Cleanup deletes every object under the prefix.
    let (s, v) = f
        .send(Method::POST, "/api/v1/items/db/test-failover/cleanup", None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let j = f.job_end(v["job"]["id"].as_str().unwrap()).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(backend.list(&prefix).await.unwrap().is_empty());
    assert!(backend.list("test").await.unwrap().is_empty());
    let (_, it) = f.get("/api/v1/items/db").await;
    assert_eq!(it["test_failover"], Value::Null, "{it}");

    // A failed failover leaves no object.
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/items/db/failover",
            Some(r#"{"type":"unplanned","point":"2001-01-01T00:00:00Z"}"#),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let j = f.job_end(v["job"]["id"].as_str().unwrap()).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert!(backend.list("failover").await.unwrap().is_empty());

    // Unplanned, raw: under failover/db/<job>/, the disk's bytes the point's.
    let (s, v) = f
        .send(
            Method::POST,
            "/api/v1/items/db/failover",
            Some(r#"{"type":"unplanned","point":"latest"}"#),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job"]["id"].as_str().unwrap().to_string();
    let j = f.job_end(&job).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let prefix = format!("failover/db/{job}");
    assert_eq!(
        backend
            .get(&format!("{prefix}/disk0.img"))
            .await
            .unwrap()
            .as_ref(),
        vec![1u8; 256 << 10].as_slice()
    );
    let m: Value = serde_json::from_slice(
        &backend
            .get(&format!("{prefix}/machine.json"))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (m["failover"].as_str(), m["disks"][0]["file"].as_str()),
        (Some("unplanned"), Some("disk0.img"))
    );
    let (_, it) = f.get("/api/v1/items/db").await;
    assert_eq!(it["state"], "failover-pending-commit", "{it}");
    assert_eq!(it["failover"]["location"], format!("{url}/{prefix}"));
    assert!(!target.join("failover").exists());
}
