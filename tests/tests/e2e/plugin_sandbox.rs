//! The hostile-plugin corpus against the real host: every misbehaviour is refused before it
//! runs or stopped within its limit, with an error naming the plugin and the limit; the
//! instance is never entered again; the process survives with its memory back near baseline;
//! and a healthy plugin works right after.
//!
//! Everything runs in one test function, sequentially, so the memory measurement sees only
//! this corpus (each test file is its own process).

#![allow(clippy::cast_possible_truncation)] // test data is a few MiB

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_e2e::{WasmTarget, plugin_wasm};
use ferry_plugin_host::{
    FileSource, GuestError, HostConfig, Level, LogSink, Manifest, PluginError, PluginHost, World,
};

#[derive(Debug, Default)]
struct Captured {
    lines: Mutex<Vec<(String, Level, String)>>,
}

impl LogSink for Captured {
    fn log(&self, plugin: &str, level: Level, message: &str) {
        self.lines
            .lock()
            .unwrap()
            .push((plugin.to_string(), level, message.to_string()));
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn hostile_manifest(mode: &str) -> Manifest {
    let mut m = Manifest::new("hostile", World::SourceAdapter);
    m.grants.add_cli("source").unwrap();
    m.grants.add_cli("log").unwrap();
    m.grants.add_cli("config").unwrap();
    m.limits.deadline_ms = 1000;
    m.limits.memory_mib = 64;
    m.config.insert("mode".into(), mode.into());
    m
}

fn disk(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join("disk.img");
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&data)
        .unwrap();
    (path, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_are_refused_or_stopped_and_the_host_survives() {
    let hostile = std::fs::read(plugin_wasm("ferry-plugin-hostile", WasmTarget::Unknown)).unwrap();
    let future = std::fs::read(plugin_wasm("ferry-plugin-future", WasmTarget::Unknown)).unwrap();
    let wasi = std::fs::read(plugin_wasm("ferry-plugin-hostile", WasmTarget::WasiP2)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = disk(dir.path());
    let sink = Arc::new(Captured::default());
    let host = PluginHost::new(HostConfig {
        cache_dir: Some(dir.path().join("cache")),
        log: sink.clone(),
        ..HostConfig::default()
    })
    .unwrap();
    let open = |m: Manifest| {
        let host = &host;
        let hostile = &hostile;
        let path = path.clone();
        async move {
            let p = host.load(m, hostile).unwrap();
            host.open_disk(&p, Arc::new(FileSource::open(&path).unwrap()))
                .await
                .unwrap()
        }
    };

    // A healthy run first: bit-exact reads, and the baseline for memory.
    let mut good = open(hostile_manifest("good")).await;
    assert_eq!(
        good.read(4096, 65536).await.unwrap(),
        &data[4096..4096 + 65536]
    );
    drop(good);
    let baseline = rss_bytes();

    // --- refused before anything runs ---
    let mut m = hostile_manifest("good");
    m.grants.config = false;
    let e = host.load(m, &hostile).unwrap_err();
    assert!(
        matches!(&e, PluginError::NotGranted { import, .. } if import.starts_with("ferry:plugin/config@")),
        "{e}"
    );
    assert!(e.to_string().contains("plugin hostile"), "{e}");

    let e = host.load(hostile_manifest("good"), &wasi).unwrap_err();
    assert!(
        matches!(&e, PluginError::NotGranted { import, .. } if import.starts_with("wasi:")),
        "{e}"
    );

    let mut m = hostile_manifest("good");
    m.name = "future".into();
    let e = host.load(m, &future).unwrap_err();
    assert!(
        matches!(&e, PluginError::Version { found, .. } if found == "1.0.0"),
        "{e}"
    );

    let webhook = ferry_builtin_plugins::WEBHOOK.wasm;
    let mut m = hostile_manifest("good");
    m.name = "webhook".into();
    m.config.clear();
    let e = host.load(m, webhook).unwrap_err();
    assert!(matches!(&e, PluginError::WrongWorld { .. }), "{e}");

    let mut m = hostile_manifest("good");
    m.sha256 = Some("0".repeat(64));
    assert!(matches!(
        host.load(m, &hostile),
        Err(PluginError::Digest { .. })
    ));

    let e = host
        .load(hostile_manifest("good"), b"\0asm\x01\0\0\0garbage")
        .unwrap_err();
    assert!(
        matches!(&e, PluginError::Compile { message, .. } if message.contains("core module")),
        "{e}"
    );
    let e = host
        .load(hostile_manifest("good"), &hostile[..hostile.len() / 2])
        .unwrap_err();
    assert!(matches!(e, PluginError::Compile { .. }), "{e}");

    // --- stopped within their limits ---
    type Expect = fn(&PluginError) -> bool;
    let cases: &[(&str, Expect)] = &[
        ("spin", |e| {
            matches!(
                e,
                PluginError::Deadline {
                    limit_ms: 1000,
                    call: "read",
                    ..
                }
            )
        }),
        ("memory", |e| {
            matches!(e, PluginError::Memory { limit_mib: 64, .. })
        }),
        ("recurse", |e| matches!(e, PluginError::Stack { .. })),
        ("huge-output", |e| {
            matches!(
                e,
                PluginError::Memory { .. } | PluginError::BadOutput { .. }
            )
        }),
        (
            "trap",
            |e| matches!(e, PluginError::Trap { message, .. } if message.contains("hostile: trap in the middle of read")),
        ),
    ];
    for (mode, expected) in cases {
        let mut d = open(hostile_manifest(mode)).await;
        let t = Instant::now();
        let e = d.read(0, 65536).await.unwrap_err();
        let took = t.elapsed();
        assert!(expected(&e), "mode {mode}: unexpected {e:?}");
        assert!(e.to_string().contains("plugin hostile"), "{e}");
        assert!(e.poisons(), "{mode}: {e}");
        assert!(took < Duration::from_secs(5), "{mode} took {took:?}");
        let again = d.read(0, 4096).await.unwrap_err();
        assert!(
            matches!(again, PluginError::Poisoned { .. }),
            "{mode}: {again}"
        );
    }

    // Huge extents lists are bounded by the memory cap or refused as bad output.
    let mut d = open(hostile_manifest("huge-extents")).await;
    let e = d.extents(0, 4 << 20).await.unwrap_err();
    assert!(
        matches!(
            e,
            PluginError::Memory { .. } | PluginError::BadOutput { .. }
        ),
        "{e}"
    );

    // A lying `locate` (bytes "stored" past the end of the object) is caught before any read.
    let mut d = open(hostile_manifest("bad-locate")).await;
    let mut buf = vec![0u8; 4096];
    let e = d.read_into(0, &mut buf).await.unwrap_err();
    assert!(
        matches!(e, PluginError::BadOutput { call: "locate", .. }),
        "{e}"
    );
    assert!(matches!(
        d.read(0, 4096).await,
        Err(PluginError::Poisoned { .. })
    ));

    // The data path of a healthy adapter: `locate` says "adapter", so bytes come from `read`.
    let mut d = open(hostile_manifest("good")).await;
    let mut buf = vec![0u8; 3 << 20];
    d.read_into(4096, &mut buf).await.unwrap();
    assert_eq!(buf, &data[4096..4096 + (3 << 20)]);

    // Out-of-range reads: the host refuses them and the guest gets the refusal as an error.
    let mut d = open(hostile_manifest("out-of-range")).await;
    let e = d.read(0, 4096).await.unwrap_err();
    match &e {
        PluginError::Guest {
            error: GuestError::Io(m),
            ..
        } => {
            assert!(m.contains("past the end") || m.contains("cap"), "{m}")
        }
        other => panic!("out-of-range: {other:?}"),
    }
    assert!(!e.poisons());

    // Log floods: rate limited and truncated; the call ends (or hits its deadline).
    sink.lines.lock().unwrap().clear();
    let mut d = open(hostile_manifest("log-flood")).await;
    let t = Instant::now();
    let r = d.read(0, 4096).await;
    let secs = t.elapsed().as_secs_f64();
    assert!(
        r.is_ok() || matches!(r, Err(PluginError::Deadline { .. })),
        "{r:?}"
    );
    // Lines the plugin got through (the host's own "N lines dropped" notices aside).
    let lines = sink
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| !l.2.contains("dropped by the rate limit"))
        .count();
    assert!(
        (lines as f64) <= 200.0 + 100.0 * secs + 2.0,
        "{lines} lines passed in {secs:.2}s"
    );
    assert!(d.dropped_log_lines() > 0 || r.is_err());

    sink.lines.lock().unwrap().clear();
    let mut d = open(hostile_manifest("huge-log-line")).await;
    assert_eq!(d.read(0, 4096).await.unwrap(), &data[..4096]);
    let longest = sink
        .lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| l.2.len())
        .max()
        .unwrap_or(0);
    assert!(
        longest > 0 && longest <= 4096 + 64,
        "longest line {longest}"
    );
    drop(d);

    // --- the host is fine: memory back near baseline, a healthy plugin works ---
    let after = rss_bytes();
    assert!(
        after < baseline + (48 << 20),
        "RSS grew from {} MiB to {} MiB",
        baseline >> 20,
        after >> 20
    );
    let mut good = open(hostile_manifest("good")).await;
    let last = (4 << 20) - 65536;
    assert_eq!(
        good.read(last, 65536).await.unwrap(),
        &data[last as usize..]
    );
    let physical = host
        .load(
            ferry_builtin_plugins::PHYSICAL.manifest(),
            ferry_builtin_plugins::PHYSICAL.wasm,
        )
        .unwrap();
    let mut d = host
        .open_disk(&physical, Arc::new(FileSource::open(&path).unwrap()))
        .await
        .unwrap();
    assert_eq!(d.read(0, 1 << 20).await.unwrap(), &data[..1 << 20]);
    // Its data path maps to the source object and is read by the host itself.
    let m = d.locate(0, 4 << 20).await.unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].location, ferry_plugin_host::Location::Source(0));
    let mut buf = vec![0u8; 4 << 20];
    d.read_into(0, &mut buf).await.unwrap();
    assert_eq!(buf, data);
    drop(d);

    // Fuel, when the host meters it, stops a spinning plugin before its deadline.
    let fueled = PluginHost::new(HostConfig {
        fuel: true,
        log: sink.clone(),
        ..HostConfig::default()
    })
    .unwrap();
    let mut m = hostile_manifest("spin");
    m.limits.deadline_ms = 60_000;
    m.limits.fuel = Some(50_000_000);
    let p = fueled.load(m, &hostile).unwrap();
    let mut d = fueled
        .open_disk(&p, Arc::new(FileSource::open(&path).unwrap()))
        .await
        .unwrap();
    let t = Instant::now();
    let e = d.read(0, 4096).await.unwrap_err();
    assert!(
        matches!(
            e,
            PluginError::Fuel {
                budget: 50_000_000,
                ..
            }
        ),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(30));
}

/// The compiled cache is used only in a directory nobody else can write into, and it survives
/// a restart (a new host loads without compiling: the cache file is not rewritten).
#[test]
fn the_compiled_cache_is_private_and_reused() {
    use std::os::unix::fs::PermissionsExt;
    let wasm = ferry_builtin_plugins::PHYSICAL.wasm;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cfg = HostConfig {
        cache_dir: Some(cache.clone()),
        ..HostConfig::default()
    };
    let entries = || -> Vec<(std::path::PathBuf, std::time::SystemTime)> {
        let mut v = Vec::new();
        for sub in std::fs::read_dir(&cache).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(sub.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                v.push((f.path(), f.metadata().unwrap().modified().unwrap()));
            }
        }
        v
    };
    PluginHost::new(cfg.clone())
        .unwrap()
        .load(ferry_builtin_plugins::PHYSICAL.manifest(), wasm)
        .unwrap();
    let first = entries();
    assert_eq!(first.len(), 1, "{first:?}");
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "cache dir mode {mode:o}");
    PluginHost::new(cfg.clone())
        .unwrap()
        .load(ferry_builtin_plugins::PHYSICAL.manifest(), wasm)
        .unwrap();
    assert_eq!(
        entries(),
        first,
        "a restart loads from the cache without rewriting it"
    );

    // A cache directory others can write into is not trusted: nothing is read or written.
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    PluginHost::new(HostConfig {
        cache_dir: Some(shared.clone()),
        ..HostConfig::default()
    })
    .unwrap()
    .load(ferry_builtin_plugins::PHYSICAL.manifest(), wasm)
    .unwrap();
    assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0);
}
