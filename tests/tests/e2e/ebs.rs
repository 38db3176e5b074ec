//! `ferry vault import --source ebs`: EBS snapshots read by the built-in `aws` adapter through
//! the EBS direct APIs, with the host signing every request (SigV4) with the operator's
//! credentials.
//!
//! - Full read against moto's server (blocks written with boto3, the way a real snapshot
//!   is filled through `PutSnapshotBlock`).
//! - Full and incremental reads against `ferry_e2e::ebs::EbsServer`, which checks signatures
//!   and pagination and answers `ListChangedBlocks` as AWS does (moto's is wrong; see that
//!   module's docs), from a real ext4 image; every point restores bit-exact.
//! - A hostile or misconfigured server (wrong checksum, truncated block, endless paging, a
//!   signature refused) fails the import with an error naming what is wrong, and leaves the
//!   vault without a new point.

use std::path::Path;
use std::process::{Command, Output};

use ferry_e2e::ebs::{BLOCK, EbsServer, Fault};
use ferry_e2e::{Emulator, Kind, ferry_bin, make_ext4, sha256_file};

const KEY: &str = "AKIDFERRYTEST";
const SECRET: &str = "ferry/test+secret/KEY0123456789abcdefABCDEF";
const REGION: &str = "eu-west-3";

fn ferry(d: &Path, args: &[&str], secret: &str) -> Output {
    Command::new(ferry_bin())
        .args(["vault", args[0], "--repo"])
        .arg(d.join("vault"))
        .arg("--passphrase-file")
        .arg(d.join("pass"))
        .arg("--cache-dir")
        .arg(d.join("vcache"))
        .args(&args[1..])
        .env("FERRY_PLUGIN_CACHE", d.join("cache"))
        .env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_REGION", REGION)
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ENDPOINT_URL_EBS")
        .env_remove("FERRY_PASSPHRASE")
        .env_remove("FERRY_REPO")
        .output()
        .expect("run ferry vault")
}

fn ok(d: &Path, args: &[&str]) -> serde_json::Value {
    let o = ferry(d, args, SECRET);
    assert!(
        o.status.success(),
        "ferry vault {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
}

fn fails(d: &Path, args: &[&str], secret: &str) -> String {
    let o = ferry(d, args, secret);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "ferry vault {args:?} should fail");
    assert!(
        !stderr.contains(SECRET) && !stderr.contains(secret),
        "a secret reached the output: {stderr}"
    );
    stderr
}

fn new_vault() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pass"), "a long and secret passphrase\n").unwrap();
    ok(dir.path(), &["init"]);
    dir
}

fn point_ids(d: &Path, item: &str) -> Vec<String> {
    ok(d, &["points", "--item", item, "--json"])
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| p["point"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn export_sha(d: &Path, item: &str, point: &str) -> String {
    let out = d.join(format!("{point}.raw"));
    ok(
        d,
        &[
            "export",
            "--item",
            item,
            "--point",
            point,
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let sha = sha256_file(&out);
    std::fs::remove_file(&out).unwrap();
    sha
}

fn import(endpoint: &str, item: &str, snapshot: &str, base: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = [
        "import",
        "--item",
        item,
        "--source",
        "ebs",
        "--snapshot",
        snapshot,
        "--endpoint",
        endpoint,
        "--json",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    if let Some(b) = base {
        args.extend(["--base-snapshot".to_string(), b.to_string()]);
    }
    args
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A 1 GiB volume holding a real ext4 filesystem in its first 96 MiB.
fn volume(d: &Path, name: &str) -> std::path::PathBuf {
    let img = d.join(name);
    make_ext4(&img, "96M");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    img
}

#[test]
fn ebs_full_and_incremental_restore_bit_exact() {
    let dir = new_vault();
    let d = dir.path();
    let server = EbsServer::start(KEY, SECRET, REGION);
    let ep = server.endpoint();

    let v0 = volume(d, "v0.raw");
    server.add_snapshot_from_image("snap-0aa", &v0);
    let r = ok(d, &strs(&import(&ep, "web", "snap-0aa", None)));
    let full_reads = server.block_reads();
    assert_eq!(
        full_reads,
        server.block_count("snap-0aa") as u64,
        "a full read fetches every listed block once, and nothing else: {r}"
    );
    assert!(
        r["bytes_read"].as_u64().unwrap() < 96 << 20,
        "unlisted blocks were read: {r}"
    );

    // The volume changes: scattered writes inside the filesystem, a block written past it
    // (listed only in the second snapshot), and a block zeroed (listed only in the first).
    let v1 = d.join("v1.raw");
    std::fs::copy(&v0, &v1).unwrap();
    ferry_e2e::random_writes(&v1, 25, 20_000, 11);
    ferry_e2e::scribble(&v1, 900 << 20, 70_000, 12);
    // The last non-zero block of the filesystem, zeroed whole.
    let zeroed = {
        let bytes = std::fs::read(&v0).unwrap();
        (1..96 * 2)
            .rev()
            .find(|&i| bytes[i * BLOCK..(i + 1) * BLOCK].iter().any(|&b| b != 0))
            .expect("a non-zero block")
    };
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&v1).unwrap();
        f.write_all_at(&vec![0u8; BLOCK], (zeroed * BLOCK) as u64)
            .unwrap();
    }
    server.add_snapshot_from_image("snap-1bb", &v1);
    let changed = server.changed_blocks("snap-0aa", "snap-1bb");
    assert!(changed.contains(&((900u64 << 20) / BLOCK as u64)));
    assert!(changed.contains(&(zeroed as u64)));

    let r = ok(d, &strs(&import(&ep, "web", "snap-1bb", Some("snap-0aa"))));
    let incremental_reads = server.block_reads() - full_reads;
    // Only changed blocks are fetched, once each; the zeroed one is not in the new snapshot
    // (it reads as zeros without a fetch).
    assert_eq!(
        incremental_reads,
        changed.len() as u64 - 1,
        "incremental fetched {incremental_reads} blocks for {} changed: {r}",
        changed.len()
    );

    let ids = point_ids(d, "web");
    assert_eq!(ids.len(), 2);
    assert_eq!(export_sha(d, "web", &ids[0]), sha256_file(&v0));
    assert_eq!(export_sha(d, "web", &ids[1]), sha256_file(&v1));

    // An incremental must build on the snapshot the latest point came from.
    server.add_snapshot_from_image("snap-2cc", &v1);
    let e = fails(
        d,
        &strs(&import(&ep, "web", "snap-2cc", Some("snap-0aa"))),
        SECRET,
    );
    assert!(
        e.contains("--base-snapshot snap-0aa") && e.contains("snap-1bb"),
        "{e}"
    );
    assert_eq!(point_ids(d, "web").len(), 2);
}

#[test]
fn ebs_hostile_or_refusing_server_changes_nothing() {
    let dir = new_vault();
    let d = dir.path();
    let server = EbsServer::start(KEY, SECRET, REGION);
    let ep = server.endpoint();
    let v0 = volume(d, "v0.raw");
    server.add_snapshot_from_image("snap-0aa", &v0);

    // Wrong credentials: the server refuses the signature; the secret is never printed.
    let e = fails(
        d,
        &strs(&import(&ep, "web", "snap-0aa", None)),
        "not/the+right/secret",
    );
    assert!(e.contains("403") && e.contains("signature"), "{e}");

    server.inject(Fault::WrongChecksum(0));
    let e = fails(d, &strs(&import(&ep, "web", "snap-0aa", None)), SECRET);
    assert!(
        e.contains("block 0") && e.contains("checksum") && e.contains("snap-0aa"),
        "{e}"
    );

    let server = EbsServer::start(KEY, SECRET, REGION);
    server.add_snapshot_from_image("snap-0aa", &v0);
    let second = server.blocks("snap-0aa")[1];
    server.inject(Fault::TruncatedBlock(second));
    let e = fails(
        d,
        &strs(&import(&server.endpoint(), "web", "snap-0aa", None)),
        SECRET,
    );
    assert!(
        e.contains(&format!("block {second}")) && e.contains("truncated"),
        "{e}"
    );

    let server = EbsServer::start(KEY, SECRET, REGION);
    server.add_snapshot_from_image("snap-0aa", &v0);
    server.inject(Fault::LoopingNextToken);
    let e = fails(
        d,
        &strs(&import(&server.endpoint(), "web", "snap-0aa", None)),
        SECRET,
    );
    assert!(e.to_lowercase().contains("token"), "{e}");

    // A snapshot that does not exist.
    let e = fails(
        d,
        &strs(&import(&server.endpoint(), "web", "snap-missing", None)),
        SECRET,
    );
    assert!(e.contains("404") || e.contains("does not exist"), "{e}");

    assert!(
        point_ids(d, "web").is_empty(),
        "a failed import left a point"
    );
}

/// Blocks written into moto with boto3 (`StartSnapshot`, `PutSnapshotBlock` with SHA-256
/// checksums, `CompleteSnapshot`) read back through `ListSnapshotBlocks`/`GetSnapshotBlock`.
/// moto reports 512-byte blocks (AWS uses 512 KiB); the adapter honours the reported size.
#[test]
fn ebs_full_read_against_moto() {
    let emu = Emulator::start(Kind::Moto);
    let dir = new_vault();
    let d = dir.path();
    let expected = d.join("expected.raw");
    let script = ferry_e2e::repo_root().join("tests/fixtures/moto_ebs_snapshot.py");
    let o = Command::new("python3")
        .arg(&script)
        .arg(format!("http://127.0.0.1:{}", emu.port))
        .arg(&expected)
        .env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_DEFAULT_REGION", REGION)
        .output()
        .expect("python3");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let snapshot = String::from_utf8(o.stdout).unwrap().trim().to_string();
    assert!(snapshot.starts_with("snap-"), "{snapshot}");
    let ep = format!("http://127.0.0.1:{}", emu.port);
    ok(d, &strs(&import(&ep, "db", &snapshot, None)));
    let ids = point_ids(d, "db");
    assert_eq!(export_sha(d, "db", &ids[0]), sha256_file(&expected));
}
