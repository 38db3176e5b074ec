//! The real `ferry` binary against real backends (local directory, Azurite, moto) and a real
//! ext4 image of a debootstrap root: init, a full import and three incrementals from
//! DiskChangeInfo files, every point exported and compared by SHA-256, dedup, verify, rebuild
//! on a fresh cache, tamper detection, and bad input that must fail with one clear line.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferry_e2e::{Emulator, Kind, TestRepo, ferry_bin, make_ext4, random_writes, sha256_file};
use object_store::ObjectStoreExt;

struct Cli {
    repo: TestRepo,
    pass: PathBuf,
    cache: PathBuf,
}

impl Cli {
    fn new(kind: Kind, emu: Option<&Emulator>, name: &str) -> Self {
        let repo = TestRepo::new(kind, emu, name);
        let pass = repo.dir.path().join("passphrase");
        std::fs::write(&pass, "a long and secret passphrase\n").unwrap();
        let cache = repo.dir.path().join("cache");
        Self { repo, pass, cache }
    }

    fn run_with(&self, args: &[&str], cache: &Path, pass: &Path) -> Output {
        let mut c = Command::new(ferry_bin());
        c.arg("vault")
            .args(&args[..1])
            .arg("--repo")
            .arg(&self.repo.url)
            .arg("--passphrase-file")
            .arg(pass)
            .arg("--cache-dir")
            .arg(cache)
            .args(&args[1..])
            .env_remove("FERRY_PASSPHRASE")
            .env_remove("FERRY_REPO");
        for (k, v) in &self.repo.env {
            c.env(k, v);
        }
        c.output().expect("run ferry")
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, &self.cache, &self.pass)
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "ferry {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).expect("JSON output")
    }

    async fn data_packs(&self) -> BTreeSet<String> {
        self.objects()
            .await
            .into_iter()
            .filter(|o| o.starts_with("packs/data/"))
            .collect()
    }

    async fn objects(&self) -> BTreeSet<String> {
        self.repo.objects().await
    }
}

/// One failing run: exit 1 and exactly one line on stderr containing `needle`.
fn fails_with(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "`{needle}` in: {err}");
}

/// Random 4 KiB-aligned writes; returns them as a DiskChangeInfo document.
fn mutate(img: &Path, n: usize, len: usize, seed: u64) -> String {
    let size = std::fs::metadata(img).unwrap().len();
    let areas: Vec<_> = random_writes(img, n, len, seed)
        .into_iter()
        .map(|r| serde_json::json!({"start": r.start, "length": r.end - r.start}))
        .collect();
    serde_json::json!({"startOffset": 0, "length": size, "changedArea": areas}).to_string()
}

async fn roundtrip(kind: Kind, emu: Option<&Emulator>) {
    let tag = format!("{kind:?}").to_lowercase();
    let c = Cli::new(kind, emu, &format!("cli-{tag}"));
    let dir = c.repo.dir.path().to_path_buf();
    let img = dir.join("disk.img");
    make_ext4(&img, "1G");
    let img_s = img.to_str().unwrap();

    c.ok(&["init", "--chunk-size", "256K"]);
    let mut expected = Vec::new();
    let r = c.json(&["import", "--item", "vm1", "--disk", img_s]);
    expected.push((r["point"].as_str().unwrap().to_string(), sha256_file(&img)));
    let mut last_packs = BTreeSet::new();
    for round in 1..=3u64 {
        let before = c.data_packs().await;
        let changes = dir.join(format!("changes-{round}.json"));
        std::fs::write(&changes, mutate(&img, 60, 100 << 10, round)).unwrap();
        let r = c.json(&[
            "import",
            "--item",
            "vm1",
            "--disk",
            img_s,
            "--changes",
            changes.to_str().unwrap(),
        ]);
        assert!(r["bytes_read"].as_u64().unwrap() < 40 << 20, "{r}");
        expected.push((r["point"].as_str().unwrap().to_string(), sha256_file(&img)));
        last_packs = c.data_packs().await.difference(&before).cloned().collect();
    }
    let points = c.json(&["points", "--item", "vm1"]);
    let ids: Vec<&str> = points
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["point"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        expected.iter().map(|e| e.0.as_str()).collect::<Vec<_>>()
    );
    for (i, (id, sha)) in expected.iter().enumerate() {
        let out = dir.join(format!("out-{i}.img"));
        c.ok(&[
            "export",
            "--item",
            "vm1",
            "--point",
            id,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(&sha256_file(&out), sha, "point {id} restores bit-exact");
        std::fs::remove_file(&out).unwrap();
    }
    // Dedup: the same image under another item stores no new chunk.
    let r = c.json(&["import", "--item", "vm1-copy", "--disk", img_s]);
    assert_eq!(r["chunks_new"], 0, "{r}");
    c.ok(&["verify", "--read-data"]);
    // A fresh machine: new cache, rebuilt from the bucket alone.
    let fresh = dir.join("cache-fresh");
    let o = c.run_with(&["rebuild-index"], &fresh, &c.pass);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.join("fresh.img");
    let o = c.run_with(
        &["export", "--item", "vm1", "--out", out.to_str().unwrap()],
        &fresh,
        &c.pass,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sha256_file(&out), expected[3].1);

    // Tamper with a pack written only for the last incremental.
    let b = c.repo.backend();
    let victim = last_packs
        .iter()
        .next()
        .expect("the last incremental wrote a data pack")
        .clone();
    let mut bytes = b.get(&victim).await.unwrap().to_vec();
    bytes[ferry_store::pack::HEADER_LEN + 3] ^= 0x40;
    b.store()
        .put(
            &object_store::path::Path::from(victim.as_str()),
            bytes.into(),
        )
        .await
        .unwrap();
    let o = c.run(&["verify", "--read-data"]);
    assert_eq!(o.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("PROBLEM") && l.contains(&victim))
        .unwrap_or_else(|| panic!("no problem names {victim}: {stdout}"));
    assert!(line.contains("vm1/"), "affected points named: {line}");
    // The last point is affected; exporting it fails and names the pack.
    let out = dir.join("bad.img");
    let o = c.run(&[
        "export",
        "--item",
        "vm1",
        "--point",
        &expected[3].0,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        line.contains(&expected[3].0),
        "the last point is affected: {line}"
    );
    fails_with(&o, &victim);
    assert!(!out.exists());
    // The first point never referenced it.
    assert!(!line.contains(&format!("vm1/{}", expected[0].0)), "{line}");
    let o = c.run(&[
        "export",
        "--item",
        "vm1",
        "--point",
        &expected[0].0,
        "--out",
        out.to_str().unwrap(),
        "--force",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sha256_file(&out), expected[0].1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_roundtrip_local_directory() {
    roundtrip(Kind::Local, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_roundtrip_azurite() {
    let e = Emulator::start(Kind::Azurite);
    roundtrip(Kind::Azurite, Some(&e)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_roundtrip_moto() {
    let e = Emulator::start(Kind::Moto);
    roundtrip(Kind::Moto, Some(&e)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_bad_input_fails_with_one_line_and_changes_nothing() {
    let c = Cli::new(Kind::Local, None, "bad");
    let dir = c.repo.dir.path().to_path_buf();
    let img = dir.join("disk.img");
    make_ext4(&img, "32M");
    let img_s = img.to_str().unwrap();
    c.ok(&["init"]);
    c.ok(&["import", "--item", "a", "--disk", img_s]);
    let before = c.objects().await;

    let wrong = dir.join("wrong");
    std::fs::write(&wrong, "not it").unwrap();
    fails_with(
        &c.run_with(&["points"], &c.cache, &wrong),
        "wrong passphrase",
    );
    fails_with(
        &c.run_with(&["points"], &c.cache, &dir.join("absent")),
        "absent",
    );
    fails_with(&c.run(&["init"]), "already exists");
    fails_with(
        &c.run(&["import", "--item", "a", "--disk", "/nonexistent/sdz"]),
        "/nonexistent/sdz",
    );
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        "{\"startOffset\": 0, \"length\": 12, \"changedArea\": [",
    )
    .unwrap();
    fails_with(
        &c.run(&[
            "import",
            "--item",
            "a",
            "--disk",
            img_s,
            "--changes",
            bad.to_str().unwrap(),
        ]),
        "bad.json",
    );
    let size = std::fs::metadata(&img).unwrap().len();
    std::fs::write(
        &bad,
        serde_json::json!({"startOffset": 0, "length": size, "changedArea": [{"start": size - 4096, "length": 8192}]}).to_string(),
    )
    .unwrap();
    fails_with(
        &c.run(&[
            "import",
            "--item",
            "a",
            "--disk",
            img_s,
            "--changes",
            bad.to_str().unwrap(),
        ]),
        "changedArea[0]",
    );
    fails_with(&c.run(&["import", "--item", "a/b", "--disk", img_s]), "a/b");
    fails_with(
        &c.run(&[
            "import",
            "--item",
            "a",
            "--disk",
            img_s,
            "--chunk-size",
            "100K",
        ]),
        "chunk size",
    );
    fails_with(
        &c.run(&[
            "export", "--item", "a", "--point", "nope", "--out", "/tmp/x",
        ]),
        "nope",
    );
    let exists = dir.join("exists.img");
    std::fs::write(&exists, "keep me").unwrap();
    fails_with(
        &c.run(&["export", "--item", "a", "--out", exists.to_str().unwrap()]),
        "already exists",
    );
    assert_eq!(std::fs::read_to_string(&exists).unwrap(), "keep me");
    fails_with(
        &Command::new(ferry_bin())
            .args(["vault", "points", "--repo"])
            .arg(&c.repo.url)
            .env_remove("FERRY_PASSPHRASE")
            .env_remove("FERRY_KEY_FILE")
            .output()
            .unwrap(),
        "FERRY_PASSPHRASE",
    );
    assert_eq!(c.objects().await, before, "failed commands changed nothing");
}
