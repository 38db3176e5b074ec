//! `ferry vault export --out s3://…|az://…` with the real `ferry` binary: a real ext4 image is
//! imported into a local vault and exported to S3 on moto and to Azure Blob on Azurite (each
//! emulator started here on a free loopback port, credentials in the environment as for a
//! vault). The raw object, downloaded, has the SHA-256 of the local raw export; the VHD
//! object is identical to it for `qemu-img compare -F vpc`. A second export to the same
//! object is refused naming it, and leaves it unchanged; no staging object and no staging
//! file remain.

use std::path::Path;
use std::process::Output;

use ferry_e2e::{CliVault, Emulator, Kind, TestRepo, make_ext4, qemu_img, sha256_file};

/// `ferry vault export --item vm1 --format FORMAT --out URL`, with the location's credentials
/// in the environment.
fn export(v: &CliVault, dest: &TestRepo, format: &str, url: &str, json: bool) -> Output {
    let mut c = v.command(&["export", "--item", "vm1", "--format", format, "--out", url]);
    c.envs(dest.env.iter().map(|(k, val)| (k, val)));
    if json {
        c.arg("--json");
    }
    c.output().expect("run ferry")
}

fn json_ok(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "ferry failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("JSON output")
}

/// Downloads object `name` of `dest` into `to`.
fn download(dest: &TestRepo, name: &str, to: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let b = rt.block_on(dest.backend().get(name)).expect("download");
    std::fs::write(to, &b).unwrap();
}

/// Every entry under `dir`, recursively, whose name contains `needle`.
fn files_named(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in rd {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(needle) {
            found.push(e.path().display().to_string());
        }
        if e.file_type().unwrap().is_dir() {
            found.extend(files_named(&e.path(), needle));
        }
    }
    found
}

fn export_to(kind: Kind) {
    let emu = Emulator::start(kind);
    let dest = TestRepo::new(kind, Some(&emu), "exports");
    let v = CliVault::new();
    let img = v.path("disk.img");
    make_ext4(&img, "48M");
    let size = std::fs::metadata(&img).unwrap().len();
    v.ok(&["init", "--chunk-size", "1M"]);
    v.ok(&["import", "--item", "vm1", "--disk", img.to_str().unwrap()]);
    let raw = v.path("vm1.raw");
    v.ok(&["export", "--item", "vm1", "--out", raw.to_str().unwrap()]);
    let raw_sha = sha256_file(&raw);

    // Raw: the object is the whole disk (holes uploaded as zeros), byte for byte.
    let url = format!("{}/backups/vm1.raw", dest.url);
    let r = json_ok(&export(&v, &dest, "raw", &url, true));
    assert_eq!(r["object"], "vm1.raw", "{r}");
    assert_eq!(r["out"], url.as_str(), "{r}");
    assert_eq!(r["format"], "raw");
    assert_eq!(r["size"], size);
    assert_eq!(r["bytes_uploaded"], size);
    assert!(r["point"].as_str().is_some_and(|p| !p.is_empty()), "{r}");
    let got = v.path("got.raw");
    download(&dest, "backups/vm1.raw", &got);
    assert_eq!(sha256_file(&got), raw_sha, "{kind:?}: raw object");

    // VHD fixed: identical to the raw export for qemu-img.
    let url = format!("{}/backups/vm1.vhd", dest.url);
    let r = json_ok(&export(&v, &dest, "vhd", &url, true));
    assert_eq!(r["format"], "vhd");
    let vhd = v.path("got.vhd");
    download(&dest, "backups/vm1.vhd", &vhd);
    assert_eq!(r["bytes_uploaded"], std::fs::metadata(&vhd).unwrap().len());
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        raw.to_str().unwrap(),
        "-F",
        "vpc",
        vhd.to_str().unwrap(),
    ]);
    assert!(cmp.contains("Images are identical"), "{kind:?}: {cmp}");
    let vhd_sha = sha256_file(&vhd);

    // A second export to the same object is refused, naming it; the object is unchanged.
    let o = export(&v, &dest, "raw", &url, false);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{kind:?}: {err}");
    assert!(
        err.contains("already exists") && err.contains("backups/vm1.vhd"),
        "{kind:?}: {err}"
    );
    assert!(o.stdout.is_empty());
    let again = v.path("again.vhd");
    download(&dest, "backups/vm1.vhd", &again);
    assert_eq!(sha256_file(&again), vhd_sha, "{kind:?}: object changed");

    // No staging object in the bucket, no staging file in the cache directory.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let objects: Vec<String> = rt.block_on(dest.objects()).into_iter().collect();
    assert_eq!(
        objects,
        ["backups/vm1.raw", "backups/vm1.vhd"],
        "{kind:?}: {objects:?}"
    );
    assert_eq!(
        files_named(&v.path("cache"), ".ferry-export"),
        Vec::<String>::new()
    );

    // A URL that names no object, and --force with a URL, are refused.
    let o = export(&v, &dest, "raw", &format!("{}/", dest.url), false);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("names no object"));
    let o = v.run(&["export", "--item", "vm1", "--out", &url, "--force"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("never replaces an object"));
}

#[test]
fn export_to_s3_on_moto() {
    export_to(Kind::Moto);
}

#[test]
fn export_to_azure_blob_on_azurite() {
    export_to(Kind::Azurite);
}
