//! Format compatibility: a vault written by format version 1 (committed under
//! `tests/fixtures/vault-v1`) must keep opening, listing, verifying and restoring bit-exact.
//! A format change adds a fixture of the new version and keeps this test.

use std::path::PathBuf;
use std::sync::Arc;

use ferry_e2e::{repo_root, sha256_file};
use ferry_store::{
    Backend, ExportOptions, ImportOptions, OpenOptions, PointSelector, Progress, Secret, Vault,
};

fn fixture() -> PathBuf {
    repo_root().join("tests/fixtures/vault-v1")
}

/// The fixture's disks: deterministic content, so expected hashes can be recomputed.
fn disk(version: u32) -> Vec<u8> {
    let mut d = vec![0u8; 1 << 20];
    let mut text = Vec::new();
    let mut n = 0;
    while text.len() < 256 << 10 {
        text.extend_from_slice(format!("ferry fixture v1 line {n}\n").as_bytes());
        n += 1;
    }
    d[..256 << 10].copy_from_slice(&text[..256 << 10]);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for b in &mut d[(512 << 10)..(576 << 10)] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x.to_le_bytes()[0];
    }
    if version == 2 {
        d[700 << 10..704 << 10].fill(0xAB);
        d[0..4096].fill(0);
    }
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_v1_fixture_restores_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    // Work on a copy: opening must not need to write, but tests never touch fixtures.
    let copy = tmp.path().join("vault");
    copy_dir(&fixture().join("vault"), &copy);
    let key = std::fs::read(fixture().join("keyfile")).unwrap();
    let v = Vault::open(
        Backend::open(copy.to_str().unwrap(), &vec![], false).unwrap(),
        &Secret::KeyFile(key),
        OpenOptions::new(tmp.path().join("cache")),
    )
    .await
    .expect("a version-1 vault opens");
    let points = v.points(Some("fixture")).await.unwrap();
    assert_eq!(points.len(), 2);
    assert!(v.verify(true).await.unwrap().is_ok());
    for (p, version) in points.iter().zip([1u32, 2]) {
        let out = tmp.path().join(format!("out-{version}.img"));
        v.export(
            ExportOptions {
                item: "fixture".into(),
                point: PointSelector::Id(p.id.clone()),
                disk: None,
                out: out.clone(),
                overwrite: false,
                sync: false,
            },
            Arc::new(Progress::default()),
        )
        .await
        .unwrap();
        let want = tmp.path().join(format!("want-{version}.img"));
        std::fs::write(&want, disk(version)).unwrap();
        assert_eq!(sha256_file(&out), sha256_file(&want), "point {}", p.id);
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

/// Writes the fixture. Run only when deliberately creating it:
/// `cargo test -p ferry-e2e --test e2e -- --ignored format_v1::make_fixture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes tests/fixtures/vault-v1; run by hand once per format version"]
async fn make_fixture() {
    let dir = fixture();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    std::fs::write(dir.join("keyfile"), &key).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let v = Vault::init(
        Backend::open(dir.join("vault").to_str().unwrap(), &vec![], true).unwrap(),
        &Secret::KeyFile(key),
        ferry_store::InitOptions {
            chunk_size: 64 << 10,
            ..Default::default()
        },
        OpenOptions::new(tmp.path().join("cache")),
    )
    .await
    .unwrap();
    let img = tmp.path().join("disk.img");
    std::fs::write(&img, disk(1)).unwrap();
    v.import(
        ImportOptions::full("fixture", &img),
        Arc::new(Progress::default()),
    )
    .await
    .unwrap();
    std::fs::write(&img, disk(2)).unwrap();
    let mut o = ImportOptions::full("fixture", &img);
    o.changes = Some(vec![0..4096, 700 << 10..704 << 10]);
    v.import(o, Arc::new(Progress::default())).await.unwrap();
}
