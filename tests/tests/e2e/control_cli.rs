//! The real `ferry` admin client against the real `ferryd up` (port 0, empty data directory):
//! `ferry login` pinned by the CA fingerprint of the banner (a wrong fingerprint and a wrong
//! token refused with nothing saved), then `vault list`, `point list`, the policy lifecycle
//! (create, list, show, update with a stale `--if-match` refused and nothing changed,
//! invalid values refused naming the field, delete), tokens (create, list, revoke, and a
//! revoked token refused), the environment overrides, `--output json` parsed, exit codes,
//! and the admin token never in any output. The saved login lives in a temporary
//! `FERRY_CONFIG_DIR` (and `HOME`), never the developer's.
//!
//! Build the binaries first: `cargo build -p ferry-daemon -p ferry-cli`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ferry_e2e::daemon::Daemon;
use ferry_e2e::ferry_bin;
use serde_json::{Value, json};

/// One run of `ferry`.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

/// Runs `ferry` with a private configuration directory and checks every output for
/// secrets that must never be printed.
struct Ferry {
    home: PathBuf,
    config: PathBuf,
    never_shown: Vec<String>,
}

impl Ferry {
    fn run_with(&self, args: &[&str], env: &[(&str, &Path)], stdin: Option<&str>) -> Run {
        let mut c = Command::new(ferry_bin());
        c.args(args);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().to_string();
            if k.starts_with("FERRY_") || k == "XDG_CONFIG_HOME" {
                c.env_remove(k);
            }
        }
        c.env("HOME", &self.home)
            .env("FERRY_CONFIG_DIR", &self.config);
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = c.spawn().expect("run ferry");
        if let Some(s) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        let o = child.wait_with_output().unwrap();
        let r = Run {
            code: o.status.code().expect("exited"),
            stdout: String::from_utf8(o.stdout).unwrap(),
            stderr: String::from_utf8(o.stderr).unwrap(),
        };
        for s in &self.never_shown {
            assert!(
                !r.stdout.contains(s.as_str()) && !r.stderr.contains(s.as_str()),
                "a token was printed by `ferry {}`",
                args.join(" ")
            );
        }
        r
    }

    fn run(&self, args: &[&str]) -> Run {
        self.run_with(args, &[], None)
    }

    /// Runs and expects exit status `code`.
    fn expect(&self, code: i32, args: &[&str]) -> Run {
        let r = self.run(args);
        assert_eq!(r.code, code, "ferry {}: {r:?}", args.join(" "));
        r
    }

    fn ok_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        self.expect(0, &a).json()
    }

    /// `ferry vault import` of `disk` as `item` straight into the vault of the appliance
    /// [`appliance`] started under `tmp` (offline seeding), which must succeed.
    fn import_offline(&self, tmp: &Path, item: &str, disk: &Path) {
        let data = tmp.join("ferry");
        self.expect(
            0,
            &[
                "vault",
                "import",
                "--repo",
                data.join("vault").to_str().unwrap(),
                "--key-file",
                data.join("vault.key").to_str().unwrap(),
                "--cache-dir",
                tmp.join("cache").to_str().unwrap(),
                "--item",
                item,
                "--disk",
                disk.to_str().unwrap(),
            ],
        );
    }

    fn saved(&self) -> PathBuf {
        self.config.join("cli.json")
    }
}

fn banner_value<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .unwrap_or_else(|| panic!("no `{key}` in:\n{out}"))
        .trim()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// `ferryd up` on `<tmp>/ferry` and a `ferry` with its own configuration directory, not yet
/// logged in: the daemon, the client, the API URL, the CA fingerprint and the admin token.
fn appliance(tmp: &Path) -> (Daemon, Ferry, String, String, String) {
    let data = tmp.join("ferry");
    let d = Daemon::start(&data, &[]);
    let banner = d.stdout();
    let url = banner_value(&banner, "API:").to_string();
    assert!(url.ends_with("/api/v1"), "{url}");
    let fp = banner_value(&banner, "CA fingerprint:").to_string();
    assert!(fp.starts_with("SHA256 "), "{fp}");
    let admin = std::fs::read_to_string(data.join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let home = tmp.join("home");
    std::fs::create_dir(&home).unwrap();
    let f = Ferry {
        home,
        config: tmp.join("config").join("ferry"),
        never_shown: vec![admin.clone()],
    };
    (d, f, url, fp, admin)
}

#[test]
fn ferry_cli_drives_the_appliance() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ferry");
    let (d, f, url, fp, admin) = appliance(tmp.path());
    let token_file = data.join("admin-token");
    let tf = token_file.to_str().unwrap();

    // Not logged in yet.
    let r = f.expect(3, &["vault", "list"]);
    assert!(r.stderr.contains("not logged in"), "{r:?}");

    // A wrong fingerprint: TLS refused, exit 7, nothing saved.
    let last = fp.chars().last().unwrap();
    let wrong_fp = format!(
        "{}{}",
        &fp[..fp.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    let r = f.expect(
        7,
        &[
            "login",
            &url,
            "--token-file",
            tf,
            "--ca-fingerprint",
            &wrong_fp,
        ],
    );
    assert!(
        r.stderr.starts_with("ferry: ") && r.stderr.contains("fingerprint"),
        "{r:?}"
    );
    assert!(!f.config.exists(), "nothing saved after a refused login");

    // A wrong token: 401, exit 3, nothing saved.
    let wrong = tmp.path().join("wrong-token");
    std::fs::write(&wrong, "not-the-admin-token\n").unwrap();
    let r = f.expect(
        3,
        &[
            "login",
            &url,
            "--token-file",
            wrong.to_str().unwrap(),
            "--ca-fingerprint",
            &fp,
        ],
    );
    assert!(r.stderr.contains("(code invalid_token)"), "{r:?}");
    assert!(!f.saved().exists());

    // Usage errors are 2: no trust source, a malformed fingerprint, plain http.
    f.expect(2, &["login", &url, "--token-file", tf]);
    f.expect(
        2,
        &[
            "login",
            &url,
            "--token-file",
            tf,
            "--ca-fingerprint",
            "AB:CD",
        ],
    );
    let http = url.replace("https://", "http://");
    f.expect(
        2,
        &["login", &http, "--token-file", tf, "--ca-fingerprint", &fp],
    );

    // The right fingerprint (as plain lowercase hex, token on stdin), then as printed.
    let plain = fp["SHA256 ".len()..].replace(':', "").to_lowercase();
    let r = f.run_with(
        &["login", &url, "--token-stdin", "--ca-fingerprint", &plain],
        &[],
        Some(&format!("{admin}\n")),
    );
    assert_eq!(r.code, 0, "{r:?}");
    let r = f.expect(
        0,
        &["login", &url, "--token-file", tf, "--ca-fingerprint", &fp],
    );
    assert!(r.stdout.contains(&fp), "{r:?}");
    assert_eq!(mode(&f.saved()), 0o600);
    assert_eq!(mode(&f.config), 0o700);
    let saved: Value = serde_json::from_slice(&std::fs::read(f.saved()).unwrap()).unwrap();
    assert_eq!(saved["url"], url.trim_end_matches("/api/v1"));
    {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let saved_ca =
            CertificateDer::from_pem_slice(saved["ca_pem"].as_str().unwrap().as_bytes()).unwrap();
        let ca = CertificateDer::from_pem_file(data.join("tls/ca.pem")).unwrap();
        assert_eq!(saved_ca, ca, "the pinned CA is the appliance's CA");
    }
    assert!(
        std::fs::read_dir(&f.config).unwrap().count() == 1,
        "no temporary file left behind"
    );

    // Vaults and points. A point imported offline into the appliance's vault shows up.
    let v = f.ok_json(&["vault", "list"]);
    assert_eq!(v["items"][0]["name"], "default", "{v}");
    assert_eq!(v["next_cursor"], Value::Null);
    let r = f.expect(0, &["vault", "list"]);
    assert!(
        r.stdout.starts_with("NAME") && r.stdout.contains("default"),
        "{r:?}"
    );
    let v = f.ok_json(&["point", "list", "--vault", "default"]);
    assert_eq!(v, json!({"items": [], "next_cursor": null}));
    let disk = tmp.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 3 << 20]).unwrap();
    ferry_e2e::scribble(&disk, 0, 3 << 20, 7);
    for item in ["web", "db"] {
        f.import_offline(tmp.path(), item, &disk);
    }
    let v = f.ok_json(&["point", "list", "--vault", "default"]);
    assert_eq!(v["items"].as_array().unwrap().len(), 2, "{v}");
    let v = f.ok_json(&["point", "list", "--vault", "default", "--item", "web"]);
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{v}");
    assert_eq!(items[0]["item"], "web");
    assert_eq!(items[0]["disks"][0]["size"], 3 << 20);
    // Pages of one, followed to the end; --limit caps the listing.
    let v = f.ok_json(&["point", "list", "--vault", "default", "--limit", "1"]);
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert!(v["next_cursor"].is_string(), "{v}");
    let r = f.expect(0, &["point", "list", "--vault", "default"]);
    assert!(r.stdout.contains("web") && r.stdout.contains("db"), "{r:?}");
    let r = f.expect(4, &["point", "list", "--vault", "nope"]);
    assert!(r.stderr.contains("(code vault_not_found)"), "{r:?}");

    // Policies: the default one, create, list, show.
    let v = f.ok_json(&["policy", "list"]);
    assert_eq!(v["items"][0]["name"], "default");
    let gold = f.ok_json(&[
        "policy",
        "create",
        "gold",
        "--description",
        "tier 1",
        "--rpo-threshold-minutes",
        "5",
        "--cycle-interval-seconds",
        "60",
        "--keep-all-hours",
        "48",
        "--app-consistent-frequency-minutes",
        "30",
        "--chunk-size",
        "1M",
        "--retry-schedule-seconds",
        "30,60,120",
    ]);
    assert_eq!(gold["name"], "gold");
    assert_eq!(gold["rpo_threshold_minutes"], 5);
    assert_eq!(gold["chunk_size"], 1 << 20);
    assert_eq!(gold["retention"]["keep_all_hours"], 48);
    assert_eq!(
        gold["retention"]["hourly_days"], 3,
        "defaults fill the rest"
    );
    assert_eq!(gold["retry_schedule_seconds"], json!([30, 60, 120]));
    assert_eq!(f.ok_json(&["policy", "show", "gold"]), gold);
    let r = f.expect(5, &["policy", "create", "gold"]);
    assert!(r.stderr.contains("(code policy_exists)"), "{r:?}");
    let r = f.expect(0, &["policy", "show", "gold"]);
    assert!(
        r.stdout.contains("rpo_threshold_minutes:") && r.stdout.contains("tier 1"),
        "{r:?}"
    );
    let from_file = tmp.path().join("silver.json");
    std::fs::write(
        &from_file,
        r#"{"compression_level": 6, "retention": {"for_days": 30}}"#,
    )
    .unwrap();
    let silver = f.ok_json(&[
        "policy",
        "create",
        "silver",
        "--file",
        from_file.to_str().unwrap(),
        "--hourly-days",
        "7",
    ]);
    assert_eq!(silver["compression_level"], 6);
    assert_eq!(silver["retention"]["for_days"], 30);
    assert_eq!(silver["retention"]["hourly_days"], 7);
    let v = f.ok_json(&["policy", "list"]);
    let names: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "gold", "silver"]);
    let r = f.expect(0, &["policy", "list"]);
    assert!(
        r.stdout.lines().count() == 4 && r.stdout.starts_with("NAME"),
        "{r:?}"
    );

    // Update with the current revision, then a stale one: exit 5, nothing changed.
    let rev = gold["revision"].as_u64().unwrap().to_string();
    let gold = f.ok_json(&[
        "policy",
        "update",
        "gold",
        "--if-match",
        &rev,
        "--compression-level",
        "3",
    ]);
    assert_eq!(gold["compression_level"], 3);
    assert_ne!(gold["revision"].as_u64().unwrap().to_string(), rev);
    let r = f.expect(
        5,
        &[
            "policy",
            "update",
            "gold",
            "--if-match",
            &rev,
            "--compression-level",
            "9",
        ],
    );
    assert!(r.stderr.contains("(code revision_mismatch)"), "{r:?}");
    assert_eq!(
        f.ok_json(&["policy", "show", "gold"]),
        gold,
        "nothing changed"
    );

    // Refused input: exit 6, the field named, nothing changed.
    for (args, field) in [
        (
            &["--rpo-threshold-minutes", "0"][..],
            "rpo_threshold_minutes",
        ),
        (&["--for-days", "-1"][..], "retention.for_days"),
        (&["--chunk-size", "100000"][..], "chunk_size"),
        (
            &["--retry-schedule-seconds", "60,30"][..],
            "retry_schedule_seconds[1]",
        ),
    ] {
        let mut a = vec!["policy", "update", "gold"];
        a.extend_from_slice(args);
        let r = f.expect(6, &a);
        assert!(
            r.stderr.starts_with("ferry: ")
                && r.stderr
                    .contains(&format!("(code invalid_value, field {field})")),
            "{args:?}: {r:?}"
        );
        assert_eq!(f.ok_json(&["policy", "show", "gold"]), gold, "{args:?}");
    }
    let r = f.expect(
        6,
        &["policy", "create", "bronze", "--compression-level", "0"],
    );
    assert!(r.stderr.contains("field compression_level"), "{r:?}");
    f.expect(4, &["policy", "show", "bronze"]);
    f.expect(2, &["policy", "create"]);

    // Delete: a stale revision is refused, the current one deletes; `default` stays.
    let r = f.expect(5, &["policy", "delete", "gold", "--if-match", &rev]);
    assert!(r.stderr.contains("revision_mismatch"), "{r:?}");
    let cur = gold["revision"].as_u64().unwrap().to_string();
    let v = f.ok_json(&["policy", "delete", "gold", "--if-match", &cur]);
    assert_eq!(v["name"], "gold");
    f.expect(4, &["policy", "show", "gold"]);
    f.expect(0, &["policy", "delete", "silver"]);
    let r = f.expect(5, &["policy", "delete", "default"]);
    assert!(r.stderr.contains("(code default_policy)"), "{r:?}");

    // Tokens: create (the secret is printed, that once), list, use, revoke.
    let ci = f.ok_json(&["token", "create", "--name", "ci"]);
    let ci_id = ci["id"].as_str().unwrap().to_string();
    let ci_secret = ci["secret"].as_str().unwrap().to_string();
    assert!(ci_secret.len() >= 32);
    let r = f.expect(0, &["token", "create", "--name", "monitoring"]);
    assert!(
        r.stdout.contains("secret:") && r.stderr.contains("only this once"),
        "{r:?}"
    );
    let v = f.ok_json(&["token", "list"]);
    let list = v["items"].as_array().unwrap();
    assert_eq!(list.len(), 3, "{v}");
    assert!(list.iter().all(|t| t.get("secret").is_none()));
    let r = f.expect(0, &["token", "list"]);
    assert!(
        !r.stdout.contains(&ci_secret) && r.stdout.contains("bootstrap"),
        "{r:?}"
    );

    // The environment overrides the saved login: the new token by FERRY_TOKEN_FILE.
    let ci_file = tmp.path().join("ci-token");
    std::fs::write(&ci_file, format!("{ci_secret}\n")).unwrap();
    let with_ci = |args: &[&str]| {
        let f2 = Ferry {
            home: f.home.clone(),
            config: f.config.clone(),
            never_shown: vec![admin.clone(), ci_secret.clone()],
        };
        f2.run_with(args, &[("FERRY_TOKEN_FILE", &ci_file)], None)
    };
    assert_eq!(with_ci(&["vault", "list"]).code, 0);
    let v = f.ok_json(&["token", "revoke", &ci_id]);
    assert_eq!(v["active"], false);
    let r = with_ci(&["vault", "list"]);
    assert_eq!(r.code, 3, "a revoked token is refused: {r:?}");
    assert!(r.stderr.contains("(code invalid_token)"), "{r:?}");
    let v = f.ok_json(&["token", "list"]);
    let revoked = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == ci_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(revoked["active"], false);
    f.expect(4, &["token", "revoke", "no-such-token"]);

    // Protected items and jobs: enable with --wait (the job's log followed), refusals with
    // the state machine's reason, update with --if-match, disable, the job listing.
    let r = f.expect(
        0,
        &[
            "item",
            "create",
            "web-01",
            "--disk",
            "os=1G",
            "--disk",
            "data=512M",
            "--wait",
        ],
    );
    assert!(r.stdout.contains("enable web-01): succeeded"), "{r:?}");
    assert!(
        r.stdout
            .contains("waiting for the agent's initial replication"),
        "{r:?}"
    );
    let it = f.ok_json(&["item", "show", "web-01"]);
    assert_eq!(it["state"], "initial-replication");
    assert_eq!(it["disks"][1]["size_bytes"], 512u64 << 20);
    let r = f.expect(5, &["item", "resync", "web-01"]);
    assert!(r.stderr.contains("illegal_transition"), "{r:?}");
    assert!(r.stderr.contains("initial-replication"), "{r:?}");
    let r = f.expect(6, &["item", "create", "bad", "--disk", "os=1000"]);
    assert!(r.stderr.contains("field disks"), "{r:?}");
    f.expect(2, &["item", "create", "bad", "--disk", "os"]);
    let r = f.expect(6, &["item", "update", "web-01", "--policy", "nope"]);
    assert!(r.stderr.contains("field policy"), "{r:?}");
    let rev = it["revision"].as_u64().unwrap().to_string();
    let stale = (it["revision"].as_u64().unwrap() - 1).to_string();
    f.expect(
        5,
        &[
            "item",
            "update",
            "web-01",
            "--description",
            "x",
            "--if-match",
            &stale,
        ],
    );
    let v = f.ok_json(&[
        "item",
        "update",
        "web-01",
        "--description",
        "front",
        "--if-match",
        &rev,
    ]);
    assert_eq!(v["description"], "front");
    let listed = f.ok_json(&["item", "list"]);
    assert_eq!(listed["items"][0]["name"], "web-01");
    let queued = f.ok_json(&["item", "delete", "web-01"]);
    assert_eq!(queued["item"]["state"], "disabling");
    let job = queued["job"]["id"].as_str().unwrap().to_string();
    let r = f.expect(0, &["job", "wait", &job]);
    assert!(r.stdout.contains("stay in vault"), "{r:?}");
    f.expect(4, &["item", "show", "web-01"]);
    let jobs = f.ok_json(&["job", "list", "--item", "web-01"]);
    let kinds: Vec<&str> = jobs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["disable", "enable"]);
    let shown = f.expect(0, &["job", "show", &job]);
    assert!(shown.stdout.contains("succeeded"), "{shown:?}");
    f.expect(5, &["job", "cancel", &job]);
    f.expect(4, &["job", "show", "no-such-job"]);

    // Scripts without a saved login: all three variables.
    f.expect(0, &["logout"]);
    assert!(!f.saved().exists());
    f.expect(3, &["policy", "list"]);
    let base = url.trim_end_matches("/api/v1");
    let r = f.run_with(
        &["vault", "list", "--output", "json"],
        &[
            ("FERRY_URL", Path::new(base)),
            ("FERRY_TOKEN_FILE", &token_file),
            ("FERRY_CA_FILE", &data.join("tls/ca.pem")),
        ],
        None,
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["items"][0]["name"], "default");

    // Login with the CA file instead of the fingerprint; then the appliance goes away: 7.
    f.expect(
        0,
        &[
            "login",
            &url,
            "--token-file",
            tf,
            "--ca-file",
            data.join("tls/ca.pem").to_str().unwrap(),
        ],
    );
    f.expect(0, &["vault", "list"]);
    let (status, _) = d.terminate();
    assert!(status.success());
    let r = f.expect(7, &["vault", "list"]);
    assert!(r.stderr.contains("cannot reach the appliance"), "{r:?}");
}

/// The target role through the real `ferryd` and `ferry`: test failover to qcow2 (compared
/// with the image by `qemu-img compare`, `machine.json` beside it, one at a time), cleanup,
/// an unplanned failover to VHD from the point chosen by time (the image as it was then),
/// commit, and the operations the failed-over item refuses.
#[test]
fn ferry_failover_through_the_appliance() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ferry");
    let (_d, f, url, fp, _) = appliance(tmp.path());
    let token_file = data.join("admin-token");
    f.expect(
        0,
        &[
            "login",
            &url,
            "--token-file",
            token_file.to_str().unwrap(),
            "--ca-fingerprint",
            &fp,
        ],
    );

    // Two points of a real ext4 image: as made, then after writes.
    let img = tmp.path().join("web.img");
    ferry_e2e::make_ext4(&img, "64M");
    let first = tmp.path().join("web-first.img");
    std::fs::copy(&img, &first).unwrap();
    f.import_offline(tmp.path(), "web", &img);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let between = ferry_store::point::rfc3339(ferry_store::point::now_ms());
    std::thread::sleep(std::time::Duration::from_millis(20));
    ferry_e2e::scribble(&img, 5 << 20, 3 << 20, 11);
    f.import_offline(tmp.path(), "web", &img);

    let v = f.ok_json(&["item", "create", "web", "--disk", "disk0=64M", "--wait"]);
    assert_eq!(v["state"], "succeeded", "{v}");
    let item = f.ok_json(&["item", "show", "web"]);
    assert_eq!(item["state"], "protected", "{item}");

    // Instant recovery through the appliance: the latest point read-only, the first one
    // (by time) writable; real NBD clients read and write them; unmounted, they are gone.
    let m = f.ok_json(&["point", "mount", "web"]);
    let ro = m["url"].as_str().unwrap().to_string();
    assert!(
        ro.starts_with("nbd://127.0.0.1:") && ro.ends_with("/web-disk0"),
        "{m}"
    );
    let cmp = ferry_e2e::qemu_img(&[
        "compare",
        "-f",
        "raw",
        &ro,
        "-F",
        "raw",
        img.to_str().unwrap(),
    ]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let w = f.ok_json(&["point", "mount", "web", "--point", &between, "--writable"]);
    let rw = w["url"].as_str().unwrap().to_string();
    let cmp = ferry_e2e::qemu_img(&[
        "compare",
        "-f",
        "raw",
        &rw,
        "-F",
        "raw",
        first.to_str().unwrap(),
    ]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let io = |args: &[&str]| {
        let o = std::process::Command::new("qemu-io")
            .args(args)
            .output()
            .expect("qemu-io (installed by scripts/install-test-tools.sh)");
        assert!(o.status.success(), "qemu-io {args:?}: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    io(&["-f", "raw", "-c", "write -P 0xcd 1M 64k", &rw]);
    let r = io(&["-f", "raw", "-c", "read -P 0xcd 1M 64k", &rw]);
    assert!(!r.contains("Pattern verification failed"), "{r}");
    let listed = f.ok_json(&["point", "mounts"]);
    assert_eq!(listed["items"].as_array().unwrap().len(), 2, "{listed}");
    for id in [&m["id"], &w["id"]] {
        f.expect(0, &["point", "unmount", id.as_str().unwrap()]);
    }
    let listed = f.ok_json(&["point", "mounts"]);
    assert_eq!(listed["items"], json!([]), "{listed}");
    let r = f.expect(4, &["point", "unmount", m["id"].as_str().unwrap()]);
    assert!(r.stderr.contains("no mount"), "{r:?}");
    let o = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read 0 4k", &ro])
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "the unmounted export still answers: {o:?}"
    );

    // Test failover of the latest point as qcow2, through a replication group of one.
    f.expect(0, &["group", "create", "tier1", "--item", "web"]);
    let g = f.ok_json(&["failover", "test", "tier1", "--group", "--format", "qcow2"]);
    assert_eq!(g["members"].as_array().unwrap().len(), 1, "{g}");
    let job = g["members"][0]["job"]["id"].as_str().unwrap().to_string();
    let v = f.ok_json(&["job", "wait", &job]);
    assert_eq!(
        (v["kind"].as_str(), v["state"].as_str()),
        (Some("test-failover"), Some("succeeded")),
        "{v}"
    );
    let item = f.ok_json(&["item", "show", "web"]);
    assert_eq!(item["state"], "protected", "replication goes on: {item}");
    let loc = PathBuf::from(item["test_failover"]["location"].as_str().unwrap());
    assert!(
        loc.starts_with(data.join("target").join("test").join("web")),
        "{loc:?}"
    );
    let disk = loc.join("disk0.qcow2");
    ferry_e2e::qemu_img(&["check", "-f", "qcow2", disk.to_str().unwrap()]);
    ferry_e2e::qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        disk.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let machine: Value =
        serde_json::from_slice(&std::fs::read(loc.join("machine.json")).unwrap()).unwrap();
    assert_eq!(machine["name"], "web");
    assert_eq!(machine["failover"], "test");
    assert_eq!(machine["point"]["id"], g["members"][0]["point"], "{g}");
    // The latest point: the one made after `between` (the mirror of points may not know it
    // yet: it polls the bucket).
    assert!(
        machine["point"]["created"].as_str().unwrap() > between.as_str(),
        "{machine}"
    );
    assert_eq!(
        machine["disks"],
        json!([{"name": "disk0", "file": "disk0.qcow2", "format": "qcow2", "size_bytes": 64 << 20}])
    );
    let r = f.expect(0, &["item", "show", "web"]);
    assert!(
        r.stdout.contains("test failover") && r.stdout.contains(loc.to_str().unwrap()),
        "{r:?}"
    );
    // One at a time.
    let r = f.expect(5, &["failover", "test", "web"]);
    assert!(r.stderr.contains("clean it up first"), "{r:?}");
    let v = f.ok_json(&["failover", "cleanup", "web", "--wait"]);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(!loc.exists());

    // Unplanned, to the point made before `between`: the image as it was, as VHD.
    let v = f.ok_json(&[
        "failover",
        "unplanned",
        "web",
        "--point",
        &between,
        "--format",
        "vhd",
        "--wait",
    ]);
    assert_eq!(
        (v["kind"].as_str(), v["state"].as_str()),
        (Some("failover"), Some("succeeded")),
        "{v}"
    );
    let item = f.ok_json(&["item", "show", "web"]);
    assert_eq!(item["state"], "failover-pending-commit", "{item}");
    let loc = PathBuf::from(item["failover"]["location"].as_str().unwrap());
    let vhd = loc.join("disk0.vhd");
    ferry_e2e::qemu_img(&[
        "compare",
        "-f",
        "vpc",
        "-F",
        "raw",
        vhd.to_str().unwrap(),
        first.to_str().unwrap(),
    ]);
    let v = f.ok_json(&["failover", "commit", "web", "--wait"]);
    assert_eq!(v["state"], "succeeded", "{v}");
    let item = f.ok_json(&["item", "show", "web"]);
    assert_eq!(item["state"], "failed-over", "{item}");
    // What a failed-over item refuses, with the reason.
    let r = f.expect(5, &["failover", "test", "web"]);
    assert!(r.stderr.contains("failed-over"), "{r:?}");
    let r = f.expect(5, &["failover", "commit", "web"]);
    assert!(r.stderr.contains("no failover to commit"), "{r:?}");
}
