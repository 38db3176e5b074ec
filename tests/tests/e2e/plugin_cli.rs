//! `ferry plugin` with the real binary: the built-in physical adapter reproduces a real ext4
//! image bit-exact and skips its unallocated space; the same adapter as a `.wasm` file
//! applies a checksum-list change document; `inspect` reports world, imports and grants;
//! `run-hook` drives the webhook against a local HTTP server, and the allow-list holds; a plugin
//! directory is checked manifest by manifest; the harness runs a built adapter on a fixture.

#![allow(clippy::cast_possible_truncation)] // test data is a few MiB

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

use ferry_e2e::{WasmTarget, ferry_bin, make_ext4, plugin_wasm, scribble, sha256_file};

fn ferry(args: &[&str], cache: &Path) -> Output {
    Command::new(ferry_bin())
        .args(args)
        .env("FERRY_PLUGIN_CACHE", cache)
        .output()
        .expect("run ferry")
}

fn ok(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "ferry failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn physical_adapter_reproduces_an_ext4_image_and_applies_changes() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("plugin-cache");
    let img = dir.path().join("disk.img");
    make_ext4(&img, "256M");
    let size = std::fs::metadata(&img).unwrap().len();
    assert!(
        allocated_bytes(&img) < size,
        "the test image should be sparse"
    );

    let out = dir.path().join("out.raw");
    let r = ok(&ferry(
        &[
            "plugin",
            "run",
            "builtin:physical",
            "--disk",
            img.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
        &cache,
    ));
    assert_eq!(sha256_file(&out), sha256_file(&img), "raw copy differs");
    let read = r["bytes_read"].as_u64().unwrap();
    assert!(
        read < size,
        "read {read} of {size}: unallocated space was not skipped"
    );
    assert!(r["bytes_skipped"].as_u64().unwrap() > 0);
    assert_eq!(r["disk"]["format"], "raw");
    assert_eq!(r["disk"]["virtual_size"].as_u64().unwrap(), size);
    // The compiled cache was filled and is reused by the next process.
    let cached = || walk_count(&cache);
    assert_eq!(cached(), 1, "one compiled component in the cache");

    // The same adapter as a component file, incremental: a checksum list of the copy, changes
    // to the source, and only the changed blocks are read and written.
    let wasm = plugin_wasm("ferry-plugin-physical", WasmTarget::Unknown);
    let list = dir.path().join("checksums.txt");
    let o = ferry(
        &[
            "plugin",
            "checksums",
            "--disk",
            out.to_str().unwrap(),
            "--out",
            list.to_str().unwrap(),
            "--block-size",
            "1M",
        ],
        &cache,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    scribble(&img, 5 << 20, 10_000, 1);
    scribble(&img, size - 3 * 4096, 4096, 2);
    let r = ok(&ferry(
        &[
            "plugin",
            "run",
            wasm.to_str().unwrap(),
            "--disk",
            img.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--changes",
            list.to_str().unwrap(),
            "--json",
        ],
        &cache,
    ));
    assert_eq!(
        sha256_file(&out),
        sha256_file(&img),
        "incremental copy differs"
    );
    let read = r["bytes_read"].as_u64().unwrap();
    assert!(read <= 3 << 20, "read {read} bytes for two small changes");
    // Again with the same (now stale) list: same result, and nothing new in the cache.
    let entries = cached();
    ok(&ferry(
        &[
            "plugin",
            "run",
            wasm.to_str().unwrap(),
            "--disk",
            img.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--changes",
            list.to_str().unwrap(),
            "--json",
        ],
        &cache,
    ));
    assert_eq!(sha256_file(&out), sha256_file(&img));
    assert_eq!(
        cached(),
        entries,
        "the same component is not compiled twice"
    );

    // Bad input is named: a missing disk, a non-component, a plugin of the wrong world.
    let o = ferry(
        &[
            "plugin",
            "run",
            "builtin:physical",
            "--disk",
            "/nonexistent.img",
            "--out",
            out.to_str().unwrap(),
        ],
        &cache,
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent.img"));
    let o = ferry(
        &[
            "plugin",
            "run",
            img.to_str().unwrap(),
            "--disk",
            img.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &cache,
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a WebAssembly binary"));
    let o = ferry(
        &[
            "plugin",
            "run",
            "builtin:webhook",
            "--disk",
            img.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &cache,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("failover-hook") && err.contains("source-adapter"),
        "{err}"
    );
}

fn walk_count(dir: &Path) -> usize {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                n += walk_count(&p);
            } else if p.extension().is_some_and(|x| x == "cwasm") {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn inspect_reports_world_imports_and_grants() {
    let dir = tempfile::tempdir().unwrap();
    let v = ok(&ferry(
        &["plugin", "inspect", "builtin:webhook", "--json"],
        dir.path(),
    ));
    assert_eq!(v["world"], "failover-hook");
    assert_eq!(v["wit_version"], "0.1.0");
    assert_eq!(v["accepted_by_this_host"], true);
    let needs: Vec<&str> = v["needs_grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(
        needs.contains(&"http") && needs.contains(&"log"),
        "{needs:?}"
    );
    assert!(
        !v["imports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"].as_str().unwrap().starts_with("wasi:"))
    );

    let wasi = plugin_wasm("ferry-plugin-hostile", WasmTarget::WasiP2);
    let o = ferry(&["plugin", "inspect", wasi.to_str().unwrap()], dir.path());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("wasi:") && text.contains("NEVER granted"),
        "{text}"
    );
}

/// A one-request-at-a-time HTTP server answering `status` with `body`; returns the port and a
/// receiver of the request bodies it got.
fn http_server(status: u16, body: &'static str) -> (u16, std::sync::mpsc::Receiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let l = line.to_ascii_lowercase();
                if let Some(v) = l.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut buf = vec![0u8; len];
            let _ = r.read_exact(&mut buf);
            let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, rx)
}

#[test]
fn webhook_posts_the_event_and_the_allow_list_holds() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = r#"{"plan":"erp","run_id":"run-1","operation":"planned-failover","phase":"pre",
                  "step":"notify","items":[{"name":"db01","recovery_point":"20261126T101500.000Z-0a1b2c3d"}],
                  "parameters":{"ticket":"CHG-42"}}"#;

    let (port, rx) = http_server(200, "{}");
    let url = format!("http://127.0.0.1:{port}/ferry");
    let v = ok(&ferry(
        &[
            "plugin",
            "run-hook",
            "builtin:webhook",
            "--context",
            ctx,
            "--grant",
            &format!("http=127.0.0.1:{port}"),
            "--config",
            &format!("url={url}"),
            "--json",
        ],
        dir.path(),
    ));
    assert_eq!(v["outcome"], "proceed", "{v}");
    let posted: serde_json::Value = serde_json::from_str(&rx.recv().unwrap()).unwrap();
    assert_eq!(posted["plan"], "erp");
    assert_eq!(posted["operation"], "planned-failover");
    assert_eq!(posted["phase"], "pre");
    assert_eq!(posted["items"][0]["name"], "db01");
    assert_eq!(posted["parameters"]["ticket"], "CHG-42");

    // An endpoint can veto a pre step: exit status 3.
    let (port, _rx) = http_server(200, r#"{"outcome":"abort","message":"change freeze"}"#);
    let o = ferry(
        &[
            "plugin",
            "run-hook",
            "builtin:webhook",
            "--context",
            ctx,
            "--grant",
            &format!("http=127.0.0.1:{port}"),
            "--config",
            &format!("url=http://127.0.0.1:{port}/"),
            "--json",
        ],
        dir.path(),
    );
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["outcome"], "abort");
    assert!(v["message"].as_str().unwrap().contains("change freeze"));

    // A host that is not allow-listed is never contacted.
    let (port, rx) = http_server(200, "{}");
    let o = ferry(
        &[
            "plugin",
            "run-hook",
            "builtin:webhook",
            "--context",
            ctx,
            "--grant",
            "http=hooks.example.com",
            "--grant",
            "config",
            "--grant",
            "kv",
            "--grant",
            "clock",
            "--config",
            &format!("url=http://127.0.0.1:{port}/"),
            "--json",
        ],
        dir.path(),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert_eq!(
        v["outcome"],
        "abort",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(v["message"].as_str().unwrap().contains("allow-list"), "{v}");
    assert!(
        rx.recv_timeout(std::time::Duration::from_millis(200))
            .is_err()
    );

    // Without the http grant the hook is refused before it runs, naming the import.
    let o = ferry(
        &[
            "plugin",
            "run-hook",
            "builtin:webhook",
            "--context",
            ctx,
            "--grant",
            "config",
            "--config",
            "url=http://127.0.0.1:1/",
        ],
        dir.path(),
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("ferry:plugin/http@0.1.0") && err.contains("not granted"),
        "{err}"
    );
}

#[test]
fn a_plugin_directory_is_checked_manifest_by_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins.d");
    std::fs::create_dir(&plugins).unwrap();
    let wasm = ferry_builtin_plugins::WEBHOOK.wasm;
    std::fs::write(plugins.join("notify.wasm"), wasm).unwrap();
    let sha = sha256_file(&plugins.join("notify.wasm"));
    let manifest = |name: &str, sha: &str| {
        format!(
            "name = \"{name}\"\nversion = \"1.2.0\"\nworld = \"failover-hook\"\n\
             component = \"notify.wasm\"\nsha256 = \"{sha}\"\n\
             [grants]\nlog = true\nconfig = true\nclock = true\nkv = true\n\
             http = {{ allow = [\"hooks.example.com\"] }}\n[config]\nurl = \"https://hooks.example.com/x\"\n"
        )
    };
    std::fs::write(plugins.join("a-notify.toml"), manifest("notify", &sha)).unwrap();
    std::fs::write(
        plugins.join("b-tampered.toml"),
        manifest("tampered", &"ab".repeat(32)),
    )
    .unwrap();
    std::fs::write(
        plugins.join("c-ungranted.toml"),
        manifest("ungranted", &sha).replace("kv = true\n", ""),
    )
    .unwrap();
    std::fs::write(plugins.join("README.txt"), "not a manifest").unwrap();

    let o = ferry(
        &[
            "plugin",
            "list",
            "--dir",
            plugins.to_str().unwrap(),
            "--json",
        ],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(1), "a refused plugin makes list fail");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let list = v.as_array().unwrap();
    let by = |needle: &str| {
        list.iter()
            .find(|p| p["manifest"].as_str().is_some_and(|m| m.contains(needle)))
            .unwrap_or_else(|| panic!("{needle} missing from {v}"))
            .clone()
    };
    let ok = by("a-notify.toml");
    assert_eq!(ok["ok"], true);
    assert_eq!(ok["name"], "notify");
    assert_eq!(ok["sha256"], sha.as_str());
    let bad = by("b-tampered.toml");
    assert_eq!(bad["ok"], false);
    assert!(bad["error"].as_str().unwrap().contains("sha256"), "{bad}");
    let ungranted = by("c-ungranted.toml");
    assert!(
        ungranted["error"]
            .as_str()
            .unwrap()
            .contains("ferry:plugin/kv@0.1.0"),
        "{ungranted}"
    );
    assert_eq!(list.len(), ferry_builtin_plugins::ALL.len() + 3);
}

/// The harness plugin authors use: the template adapter, built for wasm, over a fixture in its
/// own container format, exposes exactly the raw disk inside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_runs_a_built_adapter_against_a_fixture() {
    use ferry_plugin_host::{HostConfig, Manifest, PluginHost, World, harness};
    let dir = tempfile::tempdir().unwrap();
    let raw: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
        .collect();
    let mut container = b"FERRYTPL".to_vec();
    container.extend_from_slice(&(raw.len() as u64).to_le_bytes());
    container.resize(512, 0);
    container.extend_from_slice(&raw);
    let fixture = dir.path().join("fixture.tpl");
    std::fs::write(&fixture, &container).unwrap();
    let expected = dir.path().join("expected.raw");
    std::fs::write(&expected, &raw).unwrap();

    let wasm = std::fs::read(plugin_wasm("ferry-plugin-template", WasmTarget::Unknown)).unwrap();
    let host = PluginHost::new(HostConfig::default()).unwrap();
    let mut m = Manifest::new("template", World::SourceAdapter);
    m.grants = ferry_plugin_host::Grants::all_for(World::SourceAdapter);
    let plugin = host.load(m, &wasm).unwrap();
    let out = dir.path().join("out.raw");
    let run = harness::run_adapter(&host, &plugin, &fixture, Some(&out))
        .await
        .unwrap();
    assert_eq!(run.disk.format, "ferry-template");
    assert_eq!(run.disk.virtual_size, raw.len() as u64);
    assert_eq!(run.sha256, Some(harness::sha256_file(&expected).unwrap()));
    assert_eq!(sha256_file(&out), sha256_file(&expected));
}
