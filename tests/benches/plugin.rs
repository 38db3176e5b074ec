//! Plugin host benchmark: what a plugin costs on the gateway.
//!
//!   cargo bench -p ferry-e2e --bench plugin [-- --size-mib 1024 --rounds 3]
//!
//! Prints one table: cold compile of the built-in physical adapter, load from the on-disk
//! compiled cache (what a gateway restart pays), instantiate-and-call (`info` in a fresh store:
//! what every job pays), and sequential read throughput of a disk image through the adapter
//! (1 MiB `disk.read` calls across the WASM boundary) against plain native `pread`s of the same
//! image, both from the page cache. Target: WASM ≥ 70 % of native.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_plugin_host::{FileSource, HostConfig, PluginHost};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn row(what: &str, value: String, note: &str) {
    #[allow(clippy::print_stdout)]
    {
        println!("| {what:<46} | {value:>14} | {note} |");
    }
}

#[allow(clippy::print_stdout)]
fn main() {
    let size_mib = arg("--size-mib", 1024);
    let rounds = arg("--rounds", 3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let physical = ferry_builtin_plugins::PHYSICAL;
    let dir = tempfile::tempdir().unwrap();
    let quiet = HostConfig {
        log: Arc::new(ferry_plugin_host::StderrLog),
        ..HostConfig::default()
    };

    println!("| {:<46} | {:>14} | note |", "measure", "value");
    println!("|{}|{}|------|", "-".repeat(48), "-".repeat(16));

    // Cold compile: a fresh host with no cache, every time.
    let mut cold = Vec::new();
    for _ in 0..rounds.max(3) {
        let host = PluginHost::new(quiet.clone()).unwrap();
        let t = Instant::now();
        host.compile("physical", physical.wasm).unwrap();
        cold.push(t.elapsed());
    }
    row(
        "cold compile (Cranelift), physical adapter",
        format!("{:.1} ms", median(cold).as_secs_f64() * 1e3),
        &format!("{} KiB component", physical.wasm.len() / 1024),
    );

    // Cached load: populate the on-disk cache, then "restart" (new host) and load.
    let cached_cfg = HostConfig {
        cache_dir: Some(dir.path().join("cache")),
        ..quiet.clone()
    };
    PluginHost::new(cached_cfg.clone())
        .unwrap()
        .load(physical.manifest(), physical.wasm)
        .unwrap();
    let mut warm = Vec::new();
    for _ in 0..rounds.max(5) {
        let host = PluginHost::new(cached_cfg.clone()).unwrap();
        let t = Instant::now();
        host.load(physical.manifest(), physical.wasm).unwrap();
        warm.push(t.elapsed());
    }
    row(
        "load from compiled cache (restart)",
        format!("{:.2} ms", median(warm).as_secs_f64() * 1e3),
        "sha256 + deserialize + checks + link",
    );

    let host = PluginHost::new(cached_cfg).unwrap();
    let plugin = host.load(physical.manifest(), physical.wasm).unwrap();
    let n = 500;
    let t = Instant::now();
    rt.block_on(async {
        for _ in 0..n {
            host.adapter_info(&plugin).await.unwrap();
        }
    });
    row(
        "instantiate + call (fresh store, info())",
        format!("{:.1} µs", t.elapsed().as_secs_f64() * 1e6 / f64::from(n)),
        &format!("mean of {n}"),
    );

    // Read throughput: random (incompressible, non-zero) image in the page cache.
    let img = dir.path().join("disk.img");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&img).unwrap());
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..size_mib {
            for c in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block).unwrap();
        }
    }
    let size = size_mib << 20;
    let native = || {
        let f = std::fs::File::open(&img).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut sum = 0u64;
        let t = Instant::now();
        let mut off = 0;
        while off < size {
            f.read_exact_at(&mut buf, off).unwrap();
            sum = sum.wrapping_add(u64::from(buf[17]));
            off += 1 << 20;
        }
        std::hint::black_box(sum);
        t.elapsed()
    };
    native(); // warm the page cache
    let mut nat = Vec::new();
    let mut wasm = Vec::new();
    let mut located = Vec::new();
    for _ in 0..rounds {
        nat.push(native());
        let d = rt.block_on(async {
            let mut disk = host
                .open_disk(&plugin, Arc::new(FileSource::open(&img).unwrap()))
                .await
                .unwrap();
            let mut sum = 0u64;
            let t = Instant::now();
            let mut off = 0;
            while off < size {
                let b = disk.read(off, 1 << 20).await.unwrap();
                sum = sum.wrapping_add(u64::from(b[17]));
                off += 1 << 20;
            }
            std::hint::black_box(sum);
            t.elapsed()
        });
        wasm.push(d);
        let d = rt.block_on(async {
            let mut disk = host
                .open_disk(&plugin, Arc::new(FileSource::open(&img).unwrap()))
                .await
                .unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut sum = 0u64;
            let t = Instant::now();
            let mut off = 0;
            while off < size {
                disk.read_into(off, &mut buf).await.unwrap();
                sum = sum.wrapping_add(u64::from(buf[17]));
                off += 1 << 20;
            }
            std::hint::black_box(sum);
            t.elapsed()
        });
        located.push(d);
    }
    let mbps = |d: Duration| size as f64 / d.as_secs_f64() / 1e6;
    let (n_med, w_med, l_med) = (median(nat), median(wasm), median(located));
    row(
        "native pread, 1 MiB",
        format!("{:.0} MB/s", mbps(n_med)),
        &format!("{size_mib} MiB image, page cache, median of {rounds}"),
    );
    row(
        "adapter data path, 1 MiB (locate + host read)",
        format!("{:.0} MB/s", mbps(l_med)),
        "OpenDisk::read_into: what ingest and `ferry plugin run` use",
    );
    row(
        "adapter disk.read, 1 MiB (bytes through WASM)",
        format!("{:.0} MB/s", mbps(w_med)),
        "host read -> guest memory -> host, checked",
    );
    let verdict = |r: f64| {
        if r >= 0.7 {
            "target >= 70 %: MET"
        } else {
            "target >= 70 %: NOT MET"
        }
    };
    let lr = mbps(l_med) / mbps(n_med);
    let wr = mbps(w_med) / mbps(n_med);
    row(
        "data path / native",
        format!("{:.0} %", lr * 100.0),
        verdict(lr),
    );
    row(
        "disk.read through WASM / native",
        format!("{:.0} %", wr * 100.0),
        "for adapters that transform every byte (compressed formats)",
    );
}
