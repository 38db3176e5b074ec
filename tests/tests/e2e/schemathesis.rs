//! schemathesis (`st`, a property-based API tester) against the real `ferryd up` (port 0,
//! empty data directory): it loads the OpenAPI document the appliance serves and sends
//! generated requests, valid and invalid, to every operation, over HTTPS verified against the
//! appliance's own CA and with its admin token. Every answer is checked against the
//! document: no 5xx, status codes, content types, headers and bodies as documented, valid
//! requests accepted and invalid ones refused, authentication enforced; its stateful phase
//! chains the operations (create, read, update, delete) along the links it infers. Any
//! failure or error fails the test with schemathesis' report, which gives a `curl` line per
//! failure; so does a run that exercised fewer operations than the document describes.
//!
//! Two runs, so that the fuzzer cannot revoke the token it authenticates with: the first
//! leaves out `DELETE /api/v1/tokens/{id}`; then every other active token is revoked, which
//! makes the run's own the last active one (whose revocation is refused, 409, by design), and
//! a second run exercises the tokens' routes, revocation included. The checks that do not
//! apply to this API by design (an opaque cursor, rules across body members or on other
//! records, a delete that completes in a job) are set off per operation in [`CONFIG`], each
//! with its reason; a new operation gets every check unless it is added there.
//!
//! Needs `st` (schemathesis 4.x; `scripts/install-test-tools.sh` installs it) and the binary:
//! `cargo build -p ferry-daemon`. About a minute; `FERRY_SCHEMATHESIS_SEED` picks another
//! seed than the fixed one.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ferry_e2e::daemon::Daemon;
use serde_json::Value;

/// schemathesis' settings for this API (4.x configuration file).
const CONFIG: &str = r#"
# One worker: more trip a thread-safety bug of CPython 3.11's ast.parse inside hypothesis
# ("AST constructor recursion depth mismatch"), reported as a schemathesis error.
workers = 1

[generation]
# No example database: every run stands alone.
database = "none"

[cache]
enabled = false

[checks]
enabled = true

[checks.positive_data_acceptance]
# The defaults and 412: a well-formed If-Match naming another revision is refused, by design.
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "412", "429", "5xx"]

[checks.negative_data_rejection]
# The defaults, 412 (as above) and 413 (a body over the size limit).
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "412", "413", "415", "422", "428", "429", "5xx"]

# Listings (operation ids `list...`): `cursor` is a token the appliance issued; a random
# well-formed one is refused (400 invalid_cursor) whatever the schema says of its alphabet.
[[operations]]
include-operation-id-regex = "^list"
checks.positive_data_acceptance.enabled = false

# Bodies under rules across members or on other records, which JSON Schema cannot state: a
# policy's cycle interval within its RPO, its app-consistent frequency a whole number of
# cycles, its retry schedule non-decreasing; an item's disk names unique, its policy and
# vault existing; a failover's members depend on each other (a planned failover takes no
# point, a test one no in-place disks) and its in-place targets must be existing files or
# block devices on the appliance.
[[operations]]
include-operation-id = ["createPolicy", "updatePolicy", "enableItem", "updateItem", "failoverItem", "failoverGroup", "mountPoint"]
checks.positive_data_acceptance.enabled = false

# Operations taking If-Match: the coverage phase (schemathesis 4.32) labels positive some
# cases whose If-Match it drew in negative mode (`If-Match: 0`); the fuzzing and stateful
# phases check these operations.
[[operations]]
include-operation-id-regex = "^(update|delete|disable|resync|revoke|pause|resume|failover|commit|cleanup|reprotect)"
phases.coverage.checks.positive_data_acceptance.enabled = false

# Bodies naming other records: a group's or an agent's items must exist (and an item is in
# one group at most); an enrollment token's agent must not be enrolled; an enrollment needs a
# live one-time token and a CSR signed by the requester's key, which no generator draws.
[[operations]]
include-operation-id = ["createGroup", "updateGroup", "createEnrollmentToken", "updateAgent", "enroll"]
checks.positive_data_acceptance.enabled = false

# DELETE /agents/{name} revokes: the agent stays listed (state `revoked`), by design.
[[operations]]
include-operation-id = ["getAgent", "updateAgent"]
checks.use_after_free.enabled = false

# DELETE /items/{name} answers 202: the item stays (state `disabling`) until its job ends.
[[operations]]
include-operation-id = ["getItem", "updateItem"]
checks.use_after_free.enabled = false
"#;

/// Generated cases per operation and phase: about a minute for both runs on 2 cores.
const MAX_EXAMPLES: u32 = 40;
/// The seed unless `FERRY_SCHEMATHESIS_SEED` says otherwise: CI runs are repeatable.
const SEED: &str = "20261126";
/// Longest one run may take before it is killed and the test fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// Operations the runs need not exercise: schemathesis does not test the document it loads.
const NOT_TESTED: &[&str] = &["GET /api/v1/openapi.json"];
/// Left out of the first run: it could revoke the run's own token.
const REVOKE: &str = "DELETE /api/v1/tokens/{id}";

/// `st` on `PATH`, checked to be schemathesis 4.x (the flags and settings here are 4.x's).
fn st_bin() -> PathBuf {
    let st = std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("st"))
                .find(|f| f.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "`st` (schemathesis) is not installed: run scripts/install-test-tools.sh (the README's test command does)"
            )
        });
    let out = Command::new(&st)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", st.display()));
    // "st, version 4.32.5"
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let version = said.rsplit(' ').next().unwrap_or("");
    assert!(
        out.status.success() && said.starts_with("st, version") && version.starts_with("4."),
        "{} is not schemathesis 4.x (`st --version`: {said:?} {}): run scripts/install-test-tools.sh",
        st.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    st
}

/// One `st run`.
#[derive(Debug)]
struct StRun {
    /// Its exit status; `None` when it was killed after [`RUN_TIMEOUT`].
    status: Option<ExitStatus>,
    /// What it printed (stdout and stderr): the report.
    output: String,
    /// The operations its JUnit report lists as tested.
    tested: BTreeSet<String>,
}

/// Runs `st run URL` with [`CONFIG`] and `selection` (filter flags) in `work`, where its
/// caches and reports land; `name` names the report files.
fn st_run(
    st: &Path,
    work: &Path,
    name: &str,
    url: &str,
    ca: &Path,
    token: &str,
    selection: &[&str],
) -> StRun {
    let config = work.join("schemathesis.toml");
    std::fs::write(&config, CONFIG).expect("write schemathesis.toml");
    let junit = work.join(format!("{name}.xml"));
    let log = work.join(format!("{name}.log"));
    let logf = std::fs::File::create(&log).expect("st log file");
    let seed = std::env::var("FERRY_SCHEMATHESIS_SEED").unwrap_or_else(|_| SEED.to_string());
    let mut cmd = Command::new(st);
    cmd.current_dir(work)
        .arg("--config-file")
        .arg(&config)
        .args(["run", url, "--tls-verify"])
        .arg(ca)
        .arg("--header")
        .arg(format!("Authorization: Bearer {token}"))
        .args(["--max-examples", &MAX_EXAMPLES.to_string()])
        .args(["--seed", &seed])
        .args(["--continue-on-failure", "--no-color"])
        // A keep-alive connection the server closes as idle (after `header_read_timeout`)
        // can race a request the client sends on it; retrying such network-level failures
        // is what any HTTP client does. An appliance that fails every time still fails.
        .args(["--request-retries", "2"])
        .args(["--report", "junit", "--report-junit-path"])
        .arg(&junit)
        .args(selection)
        .stdin(Stdio::null())
        .stdout(logf.try_clone().expect("dup st log"))
        .stderr(logf);
    // Only what the test sets: no schemathesis settings from the developer's shell.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SCHEMATHESIS_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", st.display()));
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for st") {
            break Some(s);
        }
        if t.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    StRun {
        status,
        output: std::fs::read_to_string(&log).unwrap_or_default(),
        tested: tested_operations(&std::fs::read_to_string(&junit).unwrap_or_default()),
    }
}

/// The operations (`METHOD /path`) a schemathesis JUnit report lists and did not skip; its
/// entry for the stateful phase is not one.
fn tested_operations(xml: &str) -> BTreeSet<String> {
    let mut ops = BTreeSet::new();
    for case in xml.split("<testcase ").skip(1) {
        let Some(tag_end) = case.find('>') else {
            continue;
        };
        let tag = &case[..tag_end];
        // `<testcase .../>` passed; otherwise its children say how it failed or was skipped.
        let body = if tag.ends_with('/') {
            ""
        } else {
            case[tag_end..].split("</testcase>").next().unwrap_or("")
        };
        let Some(name) = tag
            .split("name=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        else {
            continue;
        };
        let is_operation = name.split_once(' ').is_some_and(|(method, path)| {
            path.starts_with('/')
                && !method.is_empty()
                && method.bytes().all(|b| b.is_ascii_uppercase())
        });
        if is_operation && !body.contains("<skipped") {
            ops.insert(name.to_string());
        }
    }
    ops
}

/// The operations (`METHOD /path`) an OpenAPI document describes.
fn operations(doc: &Value) -> BTreeSet<String> {
    const METHODS: &[&str] = &[
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("the document has paths") {
        for method in item.as_object().expect("a path item").keys() {
            if METHODS.contains(&method.as_str()) {
                ops.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    ops
}

/// Fails unless `run` exited 0 (no failure, no error) having tested every one of `expected`.
fn check(run: &StRun, name: &str, expected: &BTreeSet<String>) {
    let status = run.status.map_or_else(
        || format!("killed after {RUN_TIMEOUT:?}"),
        |s| s.to_string(),
    );
    assert!(
        run.status.is_some_and(|s| s.success()),
        "schemathesis ({name} run) reports failures ({status}):\n{}",
        run.output
    );
    let missing: Vec<&String> = expected.difference(&run.tested).collect();
    assert!(
        missing.is_empty(),
        "schemathesis ({name} run) did not exercise {missing:?} (it tested {:?}):\n{}",
        run.tested,
        run.output
    );
}

fn client(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Sends a request with `token` and returns (status, JSON body).
async fn call(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: &str,
) -> (u16, Value) {
    let resp = c
        .request(method, url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{url}: {status} is not JSON ({e}): {text}"));
    (status, v)
}

/// Every admin token, oldest first (all pages).
async fn tokens(c: &reqwest::Client, d: &Daemon, token: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut url = d.url("/api/v1/tokens?limit=500");
    loop {
        let (s, v) = call(c, reqwest::Method::GET, &url, token).await;
        assert_eq!(s, 200, "{v}");
        all.extend(v["items"].as_array().unwrap().iter().cloned());
        match v["next_cursor"].as_str() {
            Some(cur) => url = d.url(&format!("/api/v1/tokens?limit=500&cursor={cur}")),
            None => return all,
        }
    }
}

/// The agent class of operations (`/api/v1/agent…`).
fn all_agent_ops(doc: &Value) -> BTreeSet<String> {
    operations(doc)
        .into_iter()
        .filter(|o| {
            o.split_once(' ')
                .is_some_and(|(_, p)| p.starts_with("/api/v1/agent"))
        })
        .filter(|o| !o.contains("/api/v1/agents"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing() {
    let st = st_bin();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ferry");
    let work = tmp.path().join("schemathesis");
    std::fs::create_dir(&work).unwrap();
    let d = Daemon::start(&data, &[]);
    let ca = data.join("tls/ca.pem");
    let admin = std::fs::read_to_string(data.join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let c = client(&ca);

    // What the appliance serves is what schemathesis tests.
    let (s, doc) = call(
        &c,
        reqwest::Method::GET,
        &d.url("/api/v1/openapi.json"),
        &admin,
    )
    .await;
    assert_eq!(s, 200);
    let all: BTreeSet<String> = operations(&doc)
        .into_iter()
        .filter(|o| !NOT_TESTED.contains(&o.as_str()))
        .collect();
    assert!(all.contains(REVOKE), "{all:?}");
    // A fresh appliance has one token: the one the runs authenticate with.
    let first = tokens(&c, &d, &admin).await;
    assert_eq!(first.len(), 1, "{first:?}");
    let admin_id = first[0]["id"].as_str().unwrap().to_string();
    let url = d.url("/api/v1/openapi.json");

    // 1. Everything but revocation.
    let main = {
        let (st, work, url, ca, admin) = (
            st.clone(),
            work.clone(),
            url.clone(),
            ca.clone(),
            admin.clone(),
        );
        tokio::task::spawn_blocking(move || {
            st_run(
                &st,
                &work,
                "main",
                &url,
                &ca,
                &admin,
                &["--exclude-operation-id", "revokeToken"],
            )
        })
        .await
        .unwrap()
    };
    let mut expected = all;
    expected.remove(REVOKE);
    check(&main, "main", &expected);

    // 2. The run's token made the last active one, then the tokens' routes with revocation.
    for t in tokens(&c, &d, &admin).await {
        let id = t["id"].as_str().unwrap();
        if t["active"] == Value::Bool(true) && id != admin_id {
            let (s, v) = call(
                &c,
                reqwest::Method::DELETE,
                &d.url(&format!("/api/v1/tokens/{id}")),
                &admin,
            )
            .await;
            assert_eq!(s, 200, "{v}");
        }
    }
    let revoke = {
        let (st, work, url, ca, admin) = (
            st.clone(),
            work.clone(),
            url.clone(),
            ca.clone(),
            admin.clone(),
        );
        tokio::task::spawn_blocking(move || {
            st_run(
                &st,
                &work,
                "tokens",
                &url,
                &ca,
                &admin,
                &[
                    "--include-operation-id",
                    "revokeToken",
                    "--include-operation-id",
                    "listTokens",
                ],
            )
        })
        .await
        .unwrap()
    };
    let expected: BTreeSet<String> = [REVOKE.to_string(), "GET /api/v1/tokens".to_string()].into();
    check(&revoke, "tokens", &expected);

    // 3. The agent endpoints as an enrolled agent (mTLS with its certificate), acting for
    // one item: `ferry-agent enroll` as an operator would run it.
    let s = c
        .post(d.url("/api/v1/items"))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body(
            serde_json::json!({"name": "st-agent-item", "disks": [{"name": "os", "size_bytes": 1048576}]})
                .to_string(),
        )
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(s, 202);
    let created: Value = serde_json::from_slice(
        &c.post(d.url("/api/v1/enrollment-tokens"))
            .bearer_auth(&admin)
            .header("content-type", "application/json")
            .body(serde_json::json!({"agent": "st-agent", "items": ["st-agent-item"]}).to_string())
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    let agent_dir = work.join("agent");
    // `FERRY_AGENT_TOKEN=… ferry-agent enroll …`
    let words: Vec<String> = created["command"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .skip(2)
        .map(str::to_string)
        .collect();
    let o = Command::new(ferry_e2e::ferry_agent_bin())
        .args(&words)
        .env("FERRY_AGENT_DIR", &agent_dir)
        .env("FERRY_AGENT_TOKEN", created["secret"].as_str().unwrap())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let agent_run = {
        let (st, work, url, ca, admin) = (
            st.clone(),
            work.clone(),
            url.clone(),
            ca.clone(),
            admin.clone(),
        );
        let (cert, key) = (agent_dir.join("agent.crt"), agent_dir.join("agent.key"));
        tokio::task::spawn_blocking(move || {
            st_run(
                &st,
                &work,
                "agent",
                &url,
                &ca,
                &admin,
                &[
                    "--include-path-regex",
                    "^/api/v1/agent(/|$)",
                    "--request-cert",
                    cert.to_str().unwrap(),
                    "--request-cert-key",
                    key.to_str().unwrap(),
                ],
            )
        })
        .await
        .unwrap()
    };
    let expected: BTreeSet<String> = all_agent_ops(&doc);
    assert_eq!(expected.len(), 6, "{expected:?}");
    check(&agent_run, "agent", &expected);

    // The run's token survived every run; the appliance stops cleanly and logged no
    // internal error.
    let last = tokens(&c, &d, &admin).await;
    let mine = last.iter().find(|t| t["id"] == admin_id.as_str()).unwrap();
    assert_eq!(mine["active"], Value::Bool(true), "{mine}");
    let (status, log) = d.terminate();
    assert!(status.success(), "{status}: {log}");
    assert!(
        !log.contains("internal error") && !log.contains("panicked"),
        "{log}"
    );
}
