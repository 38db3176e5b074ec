//! Agents end to end: the real `ferryd up` (port 0, empty data directory), the real `ferry`
//! admin CLI and the real `ferry-agent`.
//!
//! `ferry agent token create` prints the `ferry-agent enroll` command, which is run as
//! printed: the agent pins the CA by fingerprint, sends its CSR with the one-time token and
//! saves its identity; `ferry-agent status` then speaks mTLS and sees its own item. The token
//! does not enroll twice; a wrong fingerprint sends nothing. Over HTTP with the agent's own
//! certificate: the admin API refuses it (403 `admin_only`), the admin token is refused on the
//! agent API (403 `agent_only`), another agent's item is 403 `forbidden_item`. Revocation by
//! `ferry agent revoke` takes effect on the next request. Groups through the CLI. After a
//! restart the catalog is intact; after `ferryd restore-appliance` from the vault alone, the
//! same agent identity is accepted by the restored appliance (same CA) and groups and agents
//! are back.
//!
//! Build first: `cargo build -p ferry-daemon -p ferry-cli -p ferry-agent`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_e2e::daemon::{Daemon, ferryd};
use ferry_e2e::{ferry_agent_bin, ferry_bin};
use serde_json::Value;

/// One finished command.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(mut c: Command) -> Out {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        if k.starts_with("FERRY_") || k == "XDG_CONFIG_HOME" {
            c.env_remove(k);
        }
    }
    let o = c.stdin(Stdio::null()).output().expect("run the command");
    Out {
        code: o.status.code().expect("exited"),
        stdout: String::from_utf8(o.stdout).unwrap(),
        stderr: String::from_utf8(o.stderr).unwrap(),
    }
}

/// `ferry ARGS` with the test's private configuration directory.
fn ferry(home: &Path, args: &[&str]) -> Out {
    let mut c = Command::new(ferry_bin());
    c.args(args)
        .env("HOME", home)
        .env("FERRY_CONFIG_DIR", home.join("cfg"));
    run(c)
}

fn ferry_ok(home: &Path, args: &[&str]) -> Out {
    let o = ferry(home, args);
    assert_eq!(o.code, 0, "ferry {}: {o:?}", args.join(" "));
    o
}

/// `ferry-agent ARGS` on state directory `state`.
fn agent(state: &Path, args: &[&str]) -> Out {
    agent_with(state, None, args)
}

/// [`agent`] with `FERRY_AGENT_TOKEN` set.
fn agent_with(state: &Path, token: Option<&str>, args: &[&str]) -> Out {
    let mut c = Command::new(ferry_agent_bin());
    c.args(args).env("FERRY_AGENT_DIR", state);
    if let Some(t) = token {
        // `run` clears FERRY_* from the test's environment first; set it after.
        return run_with_token(c, t);
    }
    run(c)
}

fn run_with_token(mut c: Command, token: &str) -> Out {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        if k.starts_with("FERRY_") && k != "FERRY_AGENT_DIR" {
            c.env_remove(k);
        }
    }
    let o = c
        .env("FERRY_AGENT_TOKEN", token)
        .stdin(Stdio::null())
        .output()
        .expect("run ferry-agent");
    Out {
        code: o.status.code().expect("exited"),
        stdout: String::from_utf8(o.stdout).unwrap(),
        stderr: String::from_utf8(o.stderr).unwrap(),
    }
}

/// The `FERRY_AGENT_TOKEN=… ferry-agent enroll …` line `ferry agent token create` printed:
/// (the token, the arguments after `ferry-agent`).
fn enroll_command(out: &str) -> (String, Vec<String>) {
    let line = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("FERRY_AGENT_TOKEN="))
        .unwrap_or_else(|| panic!("no enroll command in:\n{out}"));
    let mut words = line.split_whitespace();
    let token = words
        .next()
        .and_then(|w| w.strip_prefix("FERRY_AGENT_TOKEN="))
        .unwrap()
        .to_string();
    assert_eq!(words.next(), Some("ferry-agent"), "{line}");
    let args: Vec<String> = words.map(str::to_string).collect();
    assert!(
        !args.iter().any(|a| a.contains(&token)),
        "the token is not an argument: {line}"
    );
    (token, args)
}

fn fingerprint(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("CA fingerprint: SHA256 "))
        .unwrap_or_else(|| panic!("no fingerprint in:\n{stdout}"))
        .to_string()
}

/// An HTTPS client trusting the appliance CA, optionally with the agent's identity.
fn client(ca: &Path, identity: Option<&Path>) -> reqwest::Client {
    let ca = std::fs::read(ca).unwrap();
    let mut b = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .timeout(Duration::from_secs(10));
    if let Some(dir) = identity {
        let mut pem = std::fs::read(dir.join("agent.crt")).unwrap();
        pem.extend(std::fs::read(dir.join("agent.key")).unwrap());
        b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

async fn get(c: &reqwest::Client, url: &str, token: Option<&str>) -> (u16, Value) {
    let mut r = c.get(url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.unwrap();
    let s = resp.status().as_u16();
    let b = resp.bytes().await.unwrap();
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_enroll_act_for_their_items_and_are_revoked() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let data = tmp.path().join("site-a");
    let d = Daemon::start(&data, &[]);
    let banner = d.stdout();
    let fp = fingerprint(&banner);
    assert!(
        banner.contains("ferry agent token create MACHINE --item ITEM"),
        "the banner shows how to enroll an agent:\n{banner}"
    );
    let url = d.url("");
    let admin = std::fs::read_to_string(data.join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let token_file = data.join("admin-token");
    ferry_ok(
        &home,
        &[
            "login",
            &url,
            "--token-file",
            token_file.to_str().unwrap(),
            "--ca-fingerprint",
            &fp,
        ],
    );
    for item in ["web-01", "db-01"] {
        ferry_ok(
            &home,
            &["item", "create", item, "--disk", "os=1G", "--wait"],
        );
    }
    ferry_ok(
        &home,
        &[
            "group",
            "create",
            "tier-1",
            "--item",
            "web-01",
            "--item",
            "db-01",
            "--description",
            "failed over together",
        ],
    );
    let o = ferry(&home, &["group", "create", "other", "--item", "web-01"]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("already in group `tier-1`"), "{o:?}");

    // Enroll web-agent for web-01, with the command printed.
    let o = ferry_ok(
        &home,
        &["agent", "token", "create", "web-agent", "--item", "web-01"],
    );
    let (secret, args) = enroll_command(&o.stdout);
    let web = tmp.path().join("agent-web");
    // A wrong fingerprint: nothing is sent, nothing saved, the token still good.
    let mut wrong = args.clone();
    let at = wrong.iter().position(|a| a == "--ca-fingerprint").unwrap() + 1;
    wrong[at] = "00".repeat(32);
    let refs: Vec<&str> = wrong.iter().map(String::as_str).collect();
    let o = agent_with(&web, Some(&secret), &refs);
    assert_eq!(o.code, 3, "{o:?}");
    assert!(!web.join("agent.toml").exists());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = agent_with(&web, Some(&secret), &refs);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        !o.stdout.contains(&secret) && !o.stderr.contains(&secret),
        "{o:?}"
    );
    let o = agent(&web, &["status", "--output", "json"]);
    assert_eq!(o.code, 0, "{o:?}");
    let st: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(st["agent"]["name"], "web-agent");
    assert_eq!(st["items"][0]["name"], "web-01", "{st}");
    // The token does not enroll twice.
    let other = tmp.path().join("agent-other");
    let o = agent_with(&other, Some(&secret), &refs);
    assert_eq!(o.code, 4, "{o:?}");
    assert!(o.stderr.contains("already used"), "{o:?}");

    // db-agent for db-01.
    let o = ferry_ok(
        &home,
        &["agent", "token", "create", "db-agent", "--item", "db-01"],
    );
    let db = tmp.path().join("agent-db");
    let (db_token, args) = enroll_command(&o.stdout);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(agent_with(&db, Some(&db_token), &refs).code, 0);

    // The authorisation matrix over real mTLS.
    let ca = data.join("tls/ca.pem");
    let as_web = client(&ca, Some(&web));
    let anonymous = client(&ca, None);
    let (s, v) = get(&as_web, &d.url("/api/v1/items"), None).await;
    assert_eq!((s, code(&v)), (403, "admin_only"), "{v}");
    let (s, v) = get(&anonymous, &d.url("/api/v1/agent"), Some(&admin)).await;
    assert_eq!((s, code(&v)), (403, "agent_only"), "{v}");
    let (s, v) = get(&anonymous, &d.url("/api/v1/agent"), None).await;
    assert_eq!((s, code(&v)), (401, "client_certificate_required"), "{v}");
    let (s, _) = get(&as_web, &d.url("/api/v1/agent/items/web-01"), None).await;
    assert_eq!(s, 200);
    let (s, v) = get(&as_web, &d.url("/api/v1/agent/items/db-01"), None).await;
    assert_eq!((s, code(&v)), (403, "forbidden_item"), "{v}");

    // The operator's view.
    let list = ferry_ok(&home, &["agent", "list", "--output", "json"]);
    let list: Value = serde_json::from_str(&list.stdout).unwrap();
    let names: Vec<_> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["db-agent", "web-agent"]);
    let tokens = ferry_ok(&home, &["agent", "token", "list", "--output", "json"]);
    assert!(!tokens.stdout.contains(&secret));
    assert!(tokens.stdout.contains("\"used\""), "{}", tokens.stdout);

    // Revocation is immediate: the same connection pool, the next request.
    ferry_ok(&home, &["agent", "revoke", "db-agent"]);
    let o = agent(&db, &["status"]);
    assert_eq!(o.code, 4, "{o:?}");
    assert!(o.stderr.contains("revoked"), "{o:?}");
    let (s, _) = get(&as_web, &d.url("/api/v1/agent"), None).await;
    assert_eq!(s, 200, "the other agent is untouched");

    // A restart keeps everything.
    let (status, log) = d.terminate();
    assert!(status.success(), "{log}");
    let d = Daemon::start(&data, &[]);
    rewrite_gateway(&web, &d.url(""));
    let o = agent(&web, &["status", "--output", "json"]);
    assert_eq!(o.code, 0, "{o:?}");
    rewrite_gateway(&db, &d.url(""));
    assert_eq!(agent(&db, &["status"]).code, 4);
    let (status, log) = d.terminate();
    assert!(status.success(), "{log}");

    // The site is lost; the appliance is restored from the vault and its key alone. The
    // agents' certificates are signed by the same CA and are still recognised.
    let bucket = tmp.path().join("bucket");
    std::fs::rename(data.join("vault"), &bucket).unwrap();
    let key = tmp.path().join("vault.key");
    std::fs::rename(data.join("vault.key"), &key).unwrap();
    std::fs::remove_dir_all(&data).unwrap();
    let site_b = tmp.path().join("site-b");
    let o = ferryd(&[
        "restore-appliance",
        "--data-dir",
        site_b.to_str().unwrap(),
        "--repo",
        bucket.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("agents: 2 record(s)"), "{out}");
    assert!(out.contains("groups: 1 record(s)"), "{out}");
    let b = Daemon::start(
        &site_b,
        &[
            ("FERRY_VAULT__URL", bucket.to_str().unwrap()),
            ("FERRY_VAULT__KEY_FILE", key.to_str().unwrap()),
        ],
    );
    rewrite_gateway(&web, &b.url(""));
    let o = agent(&web, &["status", "--output", "json"]);
    assert_eq!(o.code, 0, "the restored appliance knows the agent: {o:?}");
    rewrite_gateway(&db, &b.url(""));
    assert_eq!(agent(&db, &["status"]).code, 4, "and that it was revoked");
    let restored_token = site_b.join("restored-admin-token");
    let (s, g) = get(
        &client(&site_b.join("tls/ca.pem"), None),
        &b.url("/api/v1/groups/tier-1"),
        Some(std::fs::read_to_string(restored_token).unwrap().trim()),
    )
    .await;
    assert_eq!(s, 200, "{g}");
    assert_eq!(g["items"], serde_json::json!(["web-01", "db-01"]));
    let (status, log) = b.terminate();
    assert!(status.success(), "{log}");
}

/// Points an enrolled agent at the appliance's new address (what DNS does when an appliance
/// moves; here every start gets a new port).
fn rewrite_gateway(state: &Path, base: &str) {
    let p: PathBuf = state.join("agent.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    let base = base.trim_end_matches('/');
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("gateway") {
                format!("gateway = \"{base}\"")
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&p, out.join("\n") + "\n").unwrap();
}
