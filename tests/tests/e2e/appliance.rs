//! The real `ferryd` binary: `ferryd up` on an empty data directory and port 0, then its API
//! over HTTPS with a client that trusts only the CA the appliance generated: health,
//! authentication, tokens, vaults, points, replication policies (the default one, create,
//! read, patch with and without `If-Match`, refusals that change nothing, delete),
//! pagination, bad input, a slowloris client, SIGTERM, and a restart that must find
//! everything as it was. Also `ferryd config check|show` and the
//! refusals of a damaged data directory.
//!
//! Build the binary first: `cargo build -p ferry-daemon`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_e2e::daemon::{Daemon, ferryd};
use ferry_e2e::repo_root;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ca_der(data: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(data.join("tls/ca.pem")).unwrap();
    rustls::pki_types::CertificateDer::from_pem_slice(&pem)
        .unwrap()
        .to_vec()
}

fn fingerprint_line(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("CA fingerprint: SHA256 "))
        .unwrap_or_else(|| panic!("no fingerprint in:\n{stdout}"))
        .to_string()
}

fn client(data: &Path) -> reqwest::Client {
    let ca = std::fs::read(data.join("tls/ca.pem")).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Sends a request and returns (status, JSON body). Every answer must be JSON.
async fn call(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<(&str, String)>,
) -> (u16, Value) {
    let (s, _, v) = request(c, method, url, token, &[], body).await;
    (s, v)
}

/// [`call`] with extra request headers, also returning the response headers.
async fn request(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<(&str, String)>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut r = c.request(method, url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    if let Some((ct, b)) = body {
        r = r.header("content-type", ct).body(b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    assert!(ct.starts_with("application/json"), "{status} {ct}: {text}");
    (status, headers, serde_json::from_str(&text).unwrap())
}

fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appliance_up_serve_stop_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data: PathBuf = tmp.path().join("ferry");
    let env = [
        ("FERRY_API__LIMITS__HEADER_READ_TIMEOUT_SECS", "1"),
        ("FERRY_API__LIMITS__MAX_BODY_BYTES", "4096"),
    ];
    let d = Daemon::start(&data, &env);

    // What the first start made and said.
    let out = d.stdout();
    let token_file = data.join("admin-token");
    assert!(
        out.contains(&format!("written to {}", token_file.display())),
        "{out}"
    );
    assert!(out.contains("curl --cacert"), "{out}");
    let fp = fingerprint_line(&out);
    let expect_fp = hex::encode_upper(Sha256::digest(ca_der(&data)))
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_string())
        .collect::<Vec<_>>()
        .join(":");
    assert_eq!(fp, expect_fp);
    {
        use std::os::unix::fs::PermissionsExt;
        for f in [
            "admin-token",
            "vault.key",
            "catalog.redb",
            "tls/ca.key",
            "tls/server.key",
        ] {
            let mode = std::fs::metadata(data.join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
    }
    let admin = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(admin.len(), 43);
    let c = client(&data);
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;

    // TLS: a client that trusts nothing refuses the appliance.
    let stranger = reqwest::Client::builder()
        .tls_certs_only(Vec::new())
        .build()
        .unwrap();
    assert!(stranger.get(d.url("/api/v1/health")).send().await.is_err());

    // Health needs nothing; everything else needs an active admin token.
    let (s, v) = call(&c, get.clone(), &d.url("/api/v1/health"), None, None).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
    let (s, v) = call(&c, get.clone(), &d.url("/api/v1/vaults"), None, None).await;
    assert_eq!((s, code(&v)), (401, "unauthorized"));
    let (s, v) = call(
        &c,
        get.clone(),
        &d.url("/api/v1/vaults"),
        Some("wrong"),
        None,
    )
    .await;
    assert_eq!((s, code(&v)), (401, "invalid_token"));

    // The default vault, empty.
    let (s, v) = call(
        &c,
        get.clone(),
        &d.url("/api/v1/vaults"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["items"][0]["name"], "default");
    assert_eq!(
        v["items"][0]["url"].as_str().unwrap(),
        data.join("vault").to_str().unwrap()
    );
    let (s, v) = call(
        &c,
        get.clone(),
        &d.url("/api/v1/vaults/default/points"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!((s, v), (200, json!({"items": [], "next_cursor": null})));

    // Tokens: create three, page through all four two at a time, revoke one. Listings are in
    // id order, and an id starts with its creation time in milliseconds: one token per
    // millisecond keeps creation order.
    let mut secrets = Vec::new();
    for name in ["ci", "backup operator", "monitoring"] {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        let (s, v) = call(
            &c,
            post.clone(),
            &d.url("/api/v1/tokens"),
            Some(&admin),
            Some(("application/json", json!({ "name": name }).to_string())),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        secrets.push((
            v["id"].as_str().unwrap().to_string(),
            v["secret"].as_str().unwrap().to_string(),
        ));
    }
    let mut names = Vec::new();
    let mut url = d.url("/api/v1/tokens?limit=2");
    loop {
        let (s, v) = call(&c, get.clone(), &url, Some(&secrets[0].1), None).await;
        assert_eq!(s, 200, "{v}");
        assert!(v["items"].as_array().unwrap().len() <= 2);
        for t in v["items"].as_array().unwrap() {
            assert!(t.get("secret").is_none());
            names.push(t["name"].as_str().unwrap().to_string());
        }
        match v["next_cursor"].as_str() {
            Some(cur) => url = d.url(&format!("/api/v1/tokens?limit=2&cursor={cur}")),
            None => break,
        }
    }
    assert_eq!(names, ["bootstrap", "ci", "backup operator", "monitoring"]);
    let (revoked_id, revoked_secret) = secrets[2].clone();
    let (s, v) = call(
        &c,
        reqwest::Method::DELETE,
        &d.url(&format!("/api/v1/tokens/{revoked_id}")),
        Some(&secrets[1].1),
        None,
    )
    .await;
    assert_eq!((s, v["active"].as_bool()), (200, Some(false)));
    let (s, v) = call(
        &c,
        get.clone(),
        &d.url("/api/v1/tokens"),
        Some(&revoked_secret),
        None,
    )
    .await;
    assert_eq!((s, code(&v)), (401, "invalid_token"));

    // Bad input: 4xx JSON, nothing created.
    let json_ct = "application/json";
    for (body, status, c_) in [
        ("{\"name\":".to_string(), 400, "invalid_json"),
        (
            r#"{"name":"x","role":"root"}"#.to_string(),
            400,
            "unknown_field",
        ),
        (
            format!(r#"{{"name":"{}"}}"#, "a".repeat(5000)),
            413,
            "payload_too_large",
        ),
    ] {
        let (s, v) = call(
            &c,
            post.clone(),
            &d.url("/api/v1/tokens"),
            Some(&admin),
            Some((json_ct, body)),
        )
        .await;
        assert_eq!((s, code(&v)), (status, c_), "{v}");
    }
    let (s, v) = call(
        &c,
        get.clone(),
        &d.url("/api/v1/vaults?limit=0"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!((s, code(&v)), (400, "invalid_query"));
    let (_, v) = call(
        &c,
        get.clone(),
        &d.url("/api/v1/tokens"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 4);

    let policies = policy_lifecycle(&c, &d, &admin).await;

    // A slowloris client: half a request head, then silence. Others are served meanwhile,
    // and it is cut after the 1 s header timeout.
    let mut slow = slow_tls(&data, d.port).await;
    slow.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: local")
        .await
        .unwrap();
    let t = Instant::now();
    let (s, _) = call(&c, get.clone(), &d.url("/api/v1/health"), None, None).await;
    assert_eq!(s, 200);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let t = Instant::now();
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the slowloris connection was never closed");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());

    // SIGTERM: a clean exit 0.
    let (status, log) = d.terminate();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("SIGTERM"), "{log}");

    // Restart: same CA, no new token, the catalog as it was.
    let d = Daemon::start(&data, &env);
    let out = d.stdout();
    assert_eq!(fingerprint_line(&out), fp);
    assert!(!out.contains("written to"), "{out}");
    assert_eq!(std::fs::read_to_string(&token_file).unwrap().trim(), admin);
    let c = client(&data);
    for t in [&admin, &secrets[0].1, &secrets[1].1] {
        let (s, v) = call(&c, get.clone(), &d.url("/api/v1/tokens"), Some(t), None).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["items"].as_array().unwrap().len(), 4);
    }
    let (s, _) = call(
        &c,
        get.clone(),
        &d.url("/api/v1/vaults"),
        Some(&revoked_secret),
        None,
    )
    .await;
    assert_eq!(s, 401);
    let (_, v) = call(
        &c,
        get.clone(),
        &d.url("/api/v1/vaults"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    let (s, v) = call(
        &c,
        get.clone(),
        &d.url("/api/v1/policies"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(
        (s, &v["items"]),
        (200, &policies),
        "policies kept as they were"
    );
    let (status, log) = d.terminate();
    assert!(status.success(), "{status}: {log}");

    // A damaged data directory is refused, never repaired by regenerating secrets.
    refuse_start(
        &data,
        &env,
        |d| {
            use std::os::unix::fs::PermissionsExt;
            let p = d.join("admin-token");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
            Box::new(move || {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap()
            })
        },
        "unsafe permissions",
    );
    refuse_start(
        &data,
        &env,
        |d| {
            let p = d.join("tls/ca.key");
            let saved = std::fs::read(&p).unwrap();
            std::fs::remove_file(&p).unwrap();
            Box::new(move || write_private(&p, &saved))
        },
        "ca.key",
    );
    refuse_start(
        &data,
        &env,
        |d| {
            let p = d.join("admin-token");
            let saved = std::fs::read(&p).unwrap();
            std::fs::write(&p, "not-the-token\n").unwrap();
            Box::new(move || std::fs::write(&p, saved).unwrap())
        },
        "not the first admin token",
    );
    // Put back as it was, it starts again.
    let d = Daemon::start(&data, &env);
    assert_eq!(fingerprint_line(&d.stdout()), fp);
    let (status, _) = d.terminate();
    assert!(status.success());
}

/// Replication policies over the real binary: the default one, create, read, patch with and
/// without `If-Match`, refusals that change nothing, delete, 401s. Returns the policies left
/// (`default` and `gold`), for the restart to compare.
async fn policy_lifecycle(c: &reqwest::Client, d: &Daemon, admin: &str) -> Value {
    use reqwest::Method;
    let url = |p: &str| d.url(&format!("/api/v1/policies{p}"));
    let j = "application/json";
    let tag = |h: &reqwest::header::HeaderMap| h["etag"].to_str().unwrap().to_string();

    // The first start made `default`, with the default settings.
    let (s, v) = call(c, Method::GET, &url(""), Some(admin), None).await;
    assert_eq!(s, 200, "{v}");
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{v}");
    let default = items[0].clone();
    assert_eq!(default["name"], "default");
    assert_eq!(default["revision"], 1);
    assert_eq!(default["rpo_threshold_minutes"], 15);
    assert_eq!(default["cycle_interval_seconds"], 300);
    assert_eq!(default["chunk_size"], 256 << 10);
    assert_eq!(default["retention"]["max_age_hours"], 432);
    assert_eq!(
        default["retry_schedule_seconds"],
        json!([60, 120, 240, 480, 600, 1800])
    );

    // Create and read back.
    let body = json!({
        "name": "gold",
        "description": "tier 1",
        "rpo_threshold_minutes": 5,
        "cycle_interval_seconds": 60,
        "retention": {"keep_all_hours": 48, "for_days": 30},
        "app_consistent_frequency_minutes": 30,
        "chunk_size": 262_144,
        "compression_level": 6,
        "retry_schedule_seconds": [30, 60, 120],
        "resync_threshold_percent": 40
    });
    let (s, h, gold) = request(
        c,
        Method::POST,
        &url(""),
        Some(admin),
        &[],
        Some((j, body.to_string())),
    )
    .await;
    assert_eq!(s, 201, "{gold}");
    assert_eq!(tag(&h), "\"2\"");
    assert_eq!(h["location"], "/api/v1/policies/gold");
    assert_eq!(
        gold["retention"]["hourly_days"], 3,
        "defaults fill the rest"
    );
    let (s, h, v) = request(c, Method::GET, &url("/gold"), Some(admin), &[], None).await;
    assert_eq!((s, tag(&h), &v), (200, "\"2\"".to_string(), &gold));
    let (s, v) = call(
        c,
        Method::POST,
        &url(""),
        Some(admin),
        Some((j, r#"{"name":"gold"}"#.into())),
    )
    .await;
    assert_eq!((s, code(&v)), (409, "policy_exists"));

    // Patch with the current revision, then a stale one (412, nothing changed), then none.
    let patch = |if_match: Option<&'static str>, body: &'static str| {
        let h: Vec<(&str, &str)> = if_match.map(|m| ("if-match", m)).into_iter().collect();
        async move {
            request(
                c,
                Method::PATCH,
                &url("/gold"),
                Some(admin),
                &h,
                Some((j, body.to_string())),
            )
            .await
        }
    };
    let (s, h, v) = patch(Some("\"2\""), r#"{"retention":{"hourly_days":7}}"#).await;
    assert_eq!((s, tag(&h)), (200, "\"3\"".to_string()), "{v}");
    assert_eq!(v["retention"]["hourly_days"], 7);
    assert_eq!(v["retention"]["keep_all_hours"], 48);
    let (s, _, e) = patch(Some("\"2\""), r#"{"compression_level":1}"#).await;
    assert_eq!((s, code(&e)), (412, "revision_mismatch"), "{e}");
    let (s, _, v) = patch(None, r#"{"compression_level":1}"#).await;
    assert_eq!((s, v["revision"].as_u64()), (200, Some(4)), "{v}");
    let gold = v;

    // Out-of-range values and unknown members: 4xx JSON with a stable code, nothing changed.
    for (body, status, c_, field) in [
        (
            r#"{"rpo_threshold_minutes":0}"#,
            400,
            "invalid_value",
            "rpo_threshold_minutes",
        ),
        (
            r#"{"retention":{"for_days":-1}}"#,
            400,
            "invalid_value",
            "retention.for_days",
        ),
        (
            r#"{"chunk_size":100000}"#,
            400,
            "invalid_value",
            "chunk_size",
        ),
        (
            r#"{"retry_schedule_seconds":[60,30]}"#,
            400,
            "invalid_value",
            "retry_schedule_seconds[1]",
        ),
        (
            r#"{"cycle_interval_seconds":600}"#,
            400,
            "invalid_value",
            "cycle_interval_seconds",
        ),
        (r#"{"colour":"gold"}"#, 400, "unknown_field", "colour"),
        (r#"{"name":"platinum"}"#, 400, "read_only_field", "name"),
        (r#"{"rpo_threshold_minutes":"#, 400, "invalid_json", ""),
    ] {
        let (s, _, e) = patch(None, body).await;
        assert_eq!(
            (s, code(&e), e["field"].as_str().unwrap_or("")),
            (status, c_, field),
            "{body}: {e}"
        );
        let (_, v) = call(c, Method::GET, &url("/gold"), Some(admin), None).await;
        assert_eq!(v, gold, "{body} changed nothing");
    }
    let big = json!({ "description": "a".repeat(5000) }).to_string();
    let (s, e) = call(c, Method::PATCH, &url("/gold"), Some(admin), Some((j, big))).await;
    assert_eq!((s, code(&e)), (413, "payload_too_large"));
    let (s, e) = call(
        c,
        Method::POST,
        &url(""),
        Some(admin),
        Some((j, r#"{"name":"silver","compression_level":0}"#.into())),
    )
    .await;
    assert_eq!((s, code(&e)), (400, "invalid_value"));

    // Delete: a new one goes, the default stays.
    let (s, v) = call(
        c,
        Method::POST,
        &url(""),
        Some(admin),
        Some((j, r#"{"name":"scratch"}"#.into())),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = call(c, Method::DELETE, &url("/scratch"), Some(admin), None).await;
    assert_eq!((s, v["name"].as_str()), (200, Some("scratch")));
    let (s, v) = call(c, Method::GET, &url("/scratch"), Some(admin), None).await;
    assert_eq!((s, code(&v)), (404, "policy_not_found"));
    let (s, v) = call(c, Method::DELETE, &url("/default"), Some(admin), None).await;
    assert_eq!((s, code(&v)), (409, "default_policy"));

    // Anonymous: 401 on every policy route.
    for (m, p) in [
        (Method::GET, ""),
        (Method::POST, ""),
        (Method::GET, "/gold"),
        (Method::PATCH, "/gold"),
        (Method::DELETE, "/gold"),
    ] {
        let (s, v) = call(c, m.clone(), &url(p), None, None).await;
        assert_eq!((s, code(&v)), (401, "unauthorized"), "{m} {p}");
    }

    let (_, v) = call(c, Method::GET, &url(""), Some(admin), None).await;
    assert_eq!(v["items"], json!([default, gold]));
    v["items"].clone()
}

/// Damages the data directory with `damage`, checks that `ferryd up` exits 1 naming
/// `expect`, then undoes the damage with what `damage` returned.
fn refuse_start(
    data: &Path,
    env: &[(&str, &str)],
    damage: impl FnOnce(&Path) -> Box<dyn FnOnce()>,
    expect: &str,
) {
    let undo = damage(data);
    let out = ferryd(&[
        "up",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .envs(env.iter().copied())
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{expect}: {err}");
    assert!(err.contains(expect), "{expect}: {err}");
    assert!(!err.contains("listening"), "{err}");
    undo();
}

fn write_private(p: &Path, data: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
        .unwrap()
        .write_all(data)
        .unwrap();
}

/// A raw TLS connection trusting the appliance's CA.
async fn slow_tls(
    data: &Path,
    port: u16,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der(data).into()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

#[test]
fn config_check_and_show() {
    let shipped = repo_root().join("config/ferry.toml");
    let out = ferryd(&["config", "check", "--config", shipped.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[api]\nlisten = \"127.0.0.1:1\"\nlisten_backlog = 5\n",
    )
    .unwrap();
    let out = ferryd(&["config", "check", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("listen_backlog") && err.contains("bad.toml"),
        "{err}"
    );

    let out = ferryd(&["config", "check"])
        .env("FERRY_API__LIMITS__MAX_CONNECTIONS", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("api.limits.max_connections"), "{err}");

    let out = ferryd(&["config", "show", "--config", shipped.to_str().unwrap()])
        .env("FERRY_DATA_DIR", tmp.path())
        .env("FERRY_API__LISTEN", "127.0.0.1:9443")
        .output()
        .unwrap();
    assert!(out.status.success());
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(
        shown.contains(&format!("data_dir = \"{}\"", tmp.path().display())),
        "{shown}"
    );
    assert!(shown.contains("listen = \"127.0.0.1:9443\""), "{shown}");
    // What `show` prints, `check` accepts.
    let again = tmp.path().join("shown.toml");
    std::fs::write(&again, &shown).unwrap();
    let out = ferryd(&["config", "check", "--config", again.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits for job `id` to end and returns it.
async fn job_end(c: &reqwest::Client, d: &Daemon, admin: &str, id: &str) -> Value {
    let t = Instant::now();
    loop {
        let (s, j) = call(
            c,
            reqwest::Method::GET,
            &d.url(&format!("/api/v1/jobs/{id}")),
            Some(admin),
            None,
        )
        .await;
        assert_eq!(s, 200, "{j}");
        if !matches!(j["state"].as_str(), Some("queued" | "running")) {
            return j;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "job never ended: {j}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Protected items and their jobs over the real binary, kept across a restart; then the
/// site is lost: everything but the vault (and its key) is deleted, and `ferryd
/// restore-appliance` rebuilds the appliance from the vault alone — same CA, same policies,
/// items, tokens and points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_jobs_and_restore_from_the_vault_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("site-a");
    let d = Daemon::start(&data, &[]);
    let c = client(&data);
    let admin = std::fs::read_to_string(data.join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let fp = fingerprint_line(&d.stdout());
    let post = |url: String, body: &'static str| {
        let (c, admin) = (c.clone(), admin.clone());
        async move {
            call(
                &c,
                reqwest::Method::POST,
                &url,
                Some(&admin),
                Some(("application/json", body.to_string())),
            )
            .await
        }
    };
    let (s, v) = post(
        d.url("/api/v1/policies"),
        r#"{"name":"gold","rpo_threshold_minutes":5,"cycle_interval_seconds":60}"#,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = post(
        d.url("/api/v1/items"),
        r#"{"name":"web-01","policy":"gold","disks":[{"name":"os","size_bytes":1073741824}]}"#,
    )
    .await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["item"]["state"], "enabling");
    let j = job_end(&c, &d, &admin, v["job"]["id"].as_str().unwrap()).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let (s, v) = call(
        &c,
        reqwest::Method::POST,
        &d.url("/api/v1/items/web-01/resync"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!((s, code(&v)), (409, "illegal_transition"), "{v}");
    let (s, v) = call(
        &c,
        reqwest::Method::DELETE,
        &d.url("/api/v1/policies/gold"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!((s, code(&v)), (409, "policy_in_use"), "{v}");
    let (s, v) = call(
        &c,
        reqwest::Method::POST,
        &d.url("/api/v1/tokens"),
        Some(&admin),
        Some(("application/json", r#"{"name":"ops"}"#.into())),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let ops = v["secret"].as_str().unwrap().to_string();
    let (status, log) = d.terminate();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("catalog snapshot written to vault `default`"),
        "{log}"
    );

    // A point imported offline into the appliance's vault, and the item survives a restart.
    let disk = tmp.path().join("disk.img");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    let o = std::process::Command::new(ferry_e2e::ferry_bin())
        .args(["vault", "import", "--item", "web-01", "--disk"])
        .arg(&disk)
        .arg("--repo")
        .arg(data.join("vault"))
        .env("FERRY_KEY_FILE", data.join("vault.key"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d = Daemon::start(&data, &[]);
    let (_, it) = call(
        &c,
        reqwest::Method::GET,
        &d.url("/api/v1/items/web-01"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(
        (it["state"].as_str(), it["policy"].as_str()),
        (Some("initial-replication"), Some("gold"))
    );
    let (status, _) = d.terminate();
    assert!(status.success());

    // The site is lost: only the vault directory and its key are left.
    let bucket = tmp.path().join("bucket");
    std::fs::rename(data.join("vault"), &bucket).unwrap();
    let key = tmp.path().join("vault.key");
    std::fs::rename(data.join("vault.key"), &key).unwrap();
    std::fs::remove_dir_all(&data).unwrap();

    let site_b = tmp.path().join("site-b");
    let restore = |extra: &[&str]| {
        let mut args = vec![
            "restore-appliance",
            "--data-dir",
            site_b.to_str().unwrap(),
            "--repo",
            bucket.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        ferryd(&args).output().unwrap()
    };
    // Without the key: refused, nothing written.
    let o = restore(&[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no key for the vault"),
        "{o:?}"
    );
    assert!(!site_b.join("catalog.redb").exists());
    // A wrong key: refused.
    let wrong = tmp.path().join("wrong.key");
    write_private(&wrong, &[1u8; 32]);
    let o = restore(&["--key-file", wrong.to_str().unwrap()]);
    assert!(!o.status.success(), "{o:?}");
    assert!(!site_b.join("catalog.redb").exists());
    let o = restore(&["--key-file", key.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains(&format!("CA fingerprint: SHA256 {fp}")),
        "{out}"
    );
    assert!(out.contains("items: 1 record(s)"), "{out}");
    // Restoring over it again is refused.
    let again = restore(&["--key-file", key.to_str().unwrap()]);
    assert!(!again.status.success());

    let env = [
        ("FERRY_VAULT__URL", bucket.to_str().unwrap()),
        ("FERRY_VAULT__KEY_FILE", key.to_str().unwrap()),
    ];
    let d = Daemon::start(&site_b, &env);
    assert_eq!(fingerprint_line(&d.stdout()), fp, "the same CA");
    // The client that trusted site A trusts site B; the old tokens and the new one work.
    let restored = std::fs::read_to_string(site_b.join("restored-admin-token")).unwrap();
    for t in [admin.as_str(), ops.as_str(), restored.trim()] {
        let (s, v) = call(
            &c,
            reqwest::Method::GET,
            &d.url("/api/v1/items"),
            Some(t),
            None,
        )
        .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["items"][0]["name"], "web-01");
        assert_eq!(v["items"][0]["policy"], "gold");
    }
    let (_, p) = call(
        &c,
        reqwest::Method::GET,
        &d.url("/api/v1/policies/gold"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(p["rpo_threshold_minutes"], 5);
    let (_, pts) = call(
        &c,
        reqwest::Method::GET,
        &d.url("/api/v1/vaults/default/points?item=web-01"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(pts["items"].as_array().unwrap().len(), 1, "{pts}");
    // The catalog's point mirror is rebuilt from the vault: the item shows its point, and
    // the metrics its age.
    let point_id = pts["items"][0]["id"].as_str().unwrap().to_string();
    let waited = std::time::Instant::now();
    loop {
        let (_, it) = call(
            &c,
            reqwest::Method::GET,
            &d.url("/api/v1/items/web-01"),
            Some(&admin),
            None,
        )
        .await;
        if it["points"] == 1 {
            assert_eq!(it["latest_point"]["id"], point_id.as_str(), "{it}");
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the mirror never caught up: {it}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its metrics (Prometheus text) count the restored item.
    let text = c
        .get(d.url("/api/v1/metrics"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.lines()
            .any(|l| l == "ferry_items{state=\"initial-replication\"} 1"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("ferry_item_rpo_seconds{item=\"web-01\"} ")),
        "{text}"
    );
    // And it works on: disable the item.
    let (s, v) = call(
        &c,
        reqwest::Method::DELETE,
        &d.url("/api/v1/items/web-01"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let j = job_end(&c, &d, &admin, v["job"]["id"].as_str().unwrap()).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let (status, _) = d.terminate();
    assert!(status.success());
}
