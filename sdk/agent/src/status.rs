//! `ferry-agent status`: proves the saved identity works and shows what the gateway knows.
//!
//! It loads the state directory, connects over mTLS (the saved certificate and key; the server
//! verified against the saved `ca.pem` with normal webpki chain and host-name checks), sends a
//! heartbeat (`POST /api/v1/agent/heartbeat`), then reads the agent's record
//! (`GET /api/v1/agent`) and its protected items (`GET /api/v1/agent/items`, every page).
//! [`render_table`] prints them for people; [`render_json`] prints the gateway's own JSON,
//! untouched, as one document `{"agent": …, "items": […]}` for scripts.

use std::path::Path;

use ferry_proto::enroll::Heartbeat;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::error::AgentError;
use crate::gateway::{self, Gateway};
use crate::state::{StateDir, StateError};

/// What `status` found.
#[derive(Debug)]
pub struct Report {
    /// The gateway's URL (from `agent.toml`).
    pub gateway: String,
    /// `GET /api/v1/agent`, as sent.
    pub agent: Box<RawValue>,
    /// `GET /api/v1/agent/items`, every item as sent.
    pub items: Vec<Box<RawValue>>,
}

/// Runs `status` against the enrollment saved in `dir`.
pub async fn status(dir: &Path) -> Result<Report, AgentError> {
    let loaded = StateDir::new(dir).load()?;
    let config = dir.join(crate::state::CONFIG_FILE);
    let url = gateway::parse_base_url(&loaded.file.gateway).map_err(|e| StateError::Format {
        path: config,
        reason: format!("`gateway`: {e}"),
    })?;
    let gw = Gateway::new(&url, loaded.tls_config()?)?;
    gw.heartbeat(&Heartbeat {
        hostname: Some(crate::hostname()),
        agent_version: Some(crate::VERSION.to_string()),
    })
    .await?;
    let agent = gw.agent().await?.json;
    let items = gw.items().await?;
    Ok(Report {
        gateway: gw.shown_url(),
        agent,
        items,
    })
}

/// The gateway's JSON as one document: `{"agent": <record>, "items": [<item>…]}`.
pub fn render_json(r: &Report) -> String {
    #[derive(serde::Serialize)]
    struct Doc<'a> {
        agent: &'a RawValue,
        items: &'a [Box<RawValue>],
    }
    serde_json::to_string(&Doc {
        agent: &r.agent,
        items: &r.items,
    })
    .expect("raw JSON serialises")
}

/// The record as `key  value` lines, then the items as aligned columns.
pub fn render_table(r: &Report) -> String {
    let a: Value = serde_json::from_str(r.agent.get()).unwrap_or(Value::Null);
    let cert = &a["certificate"];
    let pairs = [
        ("agent", cell(&a["name"])),
        ("state", cell(&a["state"])),
        ("gateway", clean(&r.gateway)),
        ("hostname", cell(&a["hostname"])),
        ("version", cell(&a["agent_version"])),
        ("enrolled", cell(&a["enrolled"])),
        ("last seen", cell(&a["last_seen"])),
        ("certificate", cell(&cert["sha256"])),
        ("  serial", cell(&cert["serial"])),
        ("  expires", cell(&cert["expires"])),
    ];
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        out.push_str(&format!("{k:<width$}  {v}\n"));
    }
    out.push('\n');
    if r.items.is_empty() {
        out.push_str("no protected items yet\n");
        return out;
    }
    let rows: Vec<Vec<String>> = r
        .items
        .iter()
        .map(|raw| {
            let i: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
            vec![
                cell(&i["name"]),
                cell(&i["state"]),
                cell(&i["vault"]),
                cell(&i["policy"]),
                disks(&i["disks"]),
            ]
        })
        .collect();
    out.push_str(&columns(
        &["ITEM", "STATE", "VAULT", "POLICY", "DISKS"],
        &rows,
    ));
    out
}

/// Disks as `N (size)`: the count and their total `size_bytes`.
fn disks(v: &Value) -> String {
    match v.as_array() {
        None => cell(v),
        Some(d) => {
            let total: u64 = d.iter().filter_map(|x| x["size_bytes"].as_u64()).sum();
            if total == 0 {
                d.len().to_string()
            } else {
                format!("{} ({})", d.len(), human(total))
            }
        }
    }
}

fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A JSON value as table text: strings bare, `null` or missing as `-`, lists joined.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => clean(s),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(", "),
        other => clean(&other.to_string()),
    }
}

/// Control characters from the gateway are not printed to the terminal.
fn clean(s: &str) -> String {
    let c: String = s.chars().filter(|c| !c.is_control()).collect();
    if c.is_empty() { "-".into() } else { c }
}

fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(w[i] - c.chars().count() + 2));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ferry_proto::enroll::{AGENT_ITEMS_PATH, AGENT_PATH, HEARTBEAT_PATH};

    use super::*;
    use crate::enroll::{EnrollArgs, Token, enroll};
    use crate::error::{EXIT_REFUSED, EXIT_STATE, EXIT_UNREACHABLE};
    use crate::testkit::TestCa;

    const AGENT: &str = r#"{"name":"web-01","state":"active","items":["db","web"],"hostname":"h","agent_version":"0.1.0","enrolled":"2026-01-01T00:00:00Z","last_seen":null,"certificate":{"sha256":"AB:CD","serial":"01","expires":"2027-01-01T00:00:00Z"}}"#;

    fn item(name: &str) -> String {
        format!(
            r#"{{"name":"{name}","state":"protected","vault":"v","policy":"default","disks":[{{"name":"sda","size_bytes":10737418240}}],"direction":"forward"}}"#
        )
    }

    /// Enrolls into a temporary directory against a fake gateway of `ca`.
    async fn enrolled(ca: &Arc<TestCa>, dir: &Path) {
        let signer = ca.clone();
        let gw = ca
            .serve(false, move |r| {
                let resp = signer.answer("web-01", r.json()["csr"].as_str().unwrap(), 30);
                (201, serde_json::to_string(&resp).unwrap())
            })
            .await;
        enroll(EnrollArgs {
            gateway: gw.url.clone(),
            token: Token::from_arg("t0ken").unwrap(),
            ca_fingerprint: ca.fingerprint(),
            state_dir: dir.to_path_buf(),
            force: false,
            disks: Vec::new(),
        })
        .await
        .unwrap();
    }

    fn retarget(dir: &Path, url: &str) {
        let p = dir.join(crate::state::CONFIG_FILE);
        let text = std::fs::read_to_string(&p).unwrap();
        let mut doc: toml::Table = toml::from_str(&text).unwrap();
        doc.insert("gateway".into(), toml::Value::String(url.into()));
        std::fs::write(&p, toml::to_string(&doc).unwrap()).unwrap();
    }

    #[tokio::test]
    async fn heartbeat_then_record_and_every_item_page_over_mtls() {
        let ca = Arc::new(TestCa::new());
        let t = tempfile::tempdir().unwrap();
        enrolled(&ca, t.path()).await;
        let gw = ca
            .serve(true, |r| match (r.method.as_str(), r.target.as_str()) {
                ("POST", HEARTBEAT_PATH) => (204, String::new()),
                ("GET", AGENT_PATH) => (200, AGENT.into()),
                ("GET", AGENT_ITEMS_PATH) => (
                    200,
                    format!(r#"{{"items":[{}],"next_cursor":"c1"}}"#, item("db")),
                ),
                ("GET", p) if p == format!("{AGENT_ITEMS_PATH}?cursor=c1") => (
                    200,
                    format!(r#"{{"items":[{}],"next_cursor":null}}"#, item("web")),
                ),
                _ => (404, r#"{"code":"not_found","message":"no"}"#.into()),
            })
            .await;
        retarget(t.path(), &gw.url);
        let r = status(t.path()).await.unwrap();
        let reqs = gw.requests();
        let seen: Vec<(&str, &str)> = reqs
            .iter()
            .map(|r| (r.method.as_str(), r.target.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                ("POST", HEARTBEAT_PATH),
                ("GET", AGENT_PATH),
                ("GET", AGENT_ITEMS_PATH),
                ("GET", "/api/v1/agent/items?cursor=c1"),
            ]
        );
        let cert = std::fs::read(t.path().join(crate::state::CERT_FILE)).unwrap();
        let der = ferry_proto::trust::certs_from_pem(&cert, "c").unwrap();
        assert!(
            reqs.iter()
                .all(|r| r.client_cert.as_deref() == Some(&*der[0]))
        );
        let hb = reqs[0].json();
        assert_eq!(hb["hostname"], crate::hostname());
        assert_eq!(hb["agent_version"], crate::VERSION);

        let j: Value = serde_json::from_str(&render_json(&r)).unwrap();
        assert_eq!(j["agent"]["name"], "web-01");
        assert_eq!(j["items"][1]["name"], "web");
        let table = render_table(&r);
        assert!(
            table.starts_with("agent        web-01\nstate        active\n"),
            "{table}"
        );
        assert!(table.contains("last seen    -\n"), "{table}");
        assert!(
            table.contains("  expires    2027-01-01T00:00:00Z\n"),
            "{table}"
        );
        assert!(
            table.contains("ITEM  STATE      VAULT  POLICY   DISKS\ndb    protected  v      default  1 (10.0 GiB)\n"),
            "{table}"
        );
    }

    #[tokio::test]
    async fn failures_by_class() {
        let ca = Arc::new(TestCa::new());
        let t = tempfile::tempdir().unwrap();
        // Not enrolled.
        let e = status(t.path()).await.unwrap_err();
        assert_eq!(e.exit_code(), EXIT_STATE, "{e}");
        enrolled(&ca, t.path()).await;

        // A certificate the gateway does not (or no longer) accepts.
        let gw = ca
            .serve(true, |_| {
                (
                    403,
                    r#"{"code":"agent_revoked","message":"this agent was removed"}"#.into(),
                )
            })
            .await;
        retarget(t.path(), &gw.url);
        let e = status(t.path()).await.unwrap_err();
        assert_eq!(e.exit_code(), EXIT_REFUSED, "{e}");
        assert!(
            e.to_string().contains("refused POST /api/v1/agent/heartbeat: this agent was removed (HTTP 403, code agent_revoked)"),
            "{e}"
        );

        // A server whose certificate another CA signed: TLS refuses it.
        let other = TestCa::new();
        let gw = other.serve(false, |_| (204, String::new())).await;
        retarget(t.path(), &gw.url);
        let e = status(t.path()).await.unwrap_err();
        assert_eq!(e.exit_code(), EXIT_UNREACHABLE, "{e}");
        assert!(gw.requests().is_empty());

        // The right CA, but not the host name its certificate names (only `127.0.0.1`).
        let gw = ca.serve(true, |_| (204, String::new())).await;
        retarget(t.path(), &gw.url.replace("127.0.0.1", "localhost"));
        let e = status(t.path()).await.unwrap_err();
        assert_eq!(e.exit_code(), EXIT_UNREACHABLE, "{e}");
        assert!(gw.requests().is_empty());

        // A listing that never ends.
        let gw = ca
            .serve(true, |r| match r.method.as_str() {
                "POST" => (204, String::new()),
                _ if r.target == AGENT_PATH => (200, AGENT.into()),
                _ => (
                    200,
                    format!(r#"{{"items":[{}],"next_cursor":"same"}}"#, item("x")),
                ),
            })
            .await;
        retarget(t.path(), &gw.url);
        let e = status(t.path()).await.unwrap_err();
        assert!(e.to_string().contains("does not advance"), "{e}");
    }

    #[test]
    fn cells_are_cleaned() {
        assert_eq!(cell(&Value::Null), "-");
        assert_eq!(cell(&serde_json::json!("a\u{1b}[31mb\n")), "a[31mb");
        assert_eq!(cell(&serde_json::json!(["a", 2])), "a, 2");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(disks(&serde_json::json!([])), "0");
    }
}
