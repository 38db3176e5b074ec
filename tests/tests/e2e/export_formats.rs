//! `ferry vault export --format raw|vhd|vhdx|qcow2|vmdk|vmdk-stream` with the real `ferry`
//! binary, checked by `qemu-img`: a real ext4 image is imported, exported in every format,
//! and each export is compared with the raw export (`qemu-img compare`, identical), checked
//! (`qemu-img check`, no errors and no leaks for VHDX, qcow2 and both VMDKs) and sized
//! (`qemu-img info`, which also names the streamOptimized create type). Bad input: an
//! existing output without `--force`/`--overwrite` (refused, file untouched), an unknown
//! format (refused with the list), and a disk that is not a whole MiB as VHD (refused naming
//! its size unless `--vhd-round-up`).

use std::path::Path;
use std::process::Output;

use ferry_e2e::{make_ext4, qemu_img, sha256_file};

use ferry_e2e::CliVault as Vault;

/// `ferry vault export` of `item` as `format` into `out`.
trait Export {
    fn export(&self, item: &str, format: &str, out: &Path, extra: &[&str]) -> Output;
}

impl Export for Vault {
    fn export(&self, item: &str, format: &str, out: &Path, extra: &[&str]) -> Output {
        let mut a = vec![
            "export",
            "--item",
            item,
            "--format",
            format,
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        self.run(&a)
    }
}

fn virtual_size(format: &str, file: &Path) -> u64 {
    let info: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "info",
        "-f",
        format,
        "--output",
        "json",
        file.to_str().unwrap(),
    ]))
    .unwrap();
    info["virtual-size"].as_u64().unwrap()
}

/// Exit status `code` and one line on stderr containing every needle.
fn fails_with(o: &Output, code: i32, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` in: {err}");
    }
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("ferry-partial"))
        .collect()
}

#[test]
fn every_format_matches_the_raw_export() {
    let v = Vault::new();
    let img = v.path("disk.img");
    make_ext4(&img, "160M");
    let size = std::fs::metadata(&img).unwrap().len();
    // 1 MiB chunks: zero 64 KiB clusters inside data chunks are skipped, not written.
    v.ok(&["init", "--chunk-size", "1M"]);
    v.ok(&["import", "--item", "vm1", "--disk", img.to_str().unwrap()]);

    let raw = v.path("vm1.raw");
    let r = v.ok(&["export", "--item", "vm1", "--out", raw.to_str().unwrap()]);
    assert_eq!(r["format"], "raw");
    assert_eq!(sha256_file(&raw), sha256_file(&img));

    // (ferry format, qemu format, file, qemu-img check applies)
    for (format, qemu, name, check) in [
        ("raw", "raw", "vm1-explicit.raw", false),
        ("vhd", "vpc", "vm1.vhd", false),
        ("vhdx", "vhdx", "vm1.vhdx", true),
        ("qcow2", "qcow2", "vm1.qcow2", true),
        ("vmdk", "vmdk", "vm1.vmdk", true),
        ("vmdk-stream", "vmdk", "vm1-stream.vmdk", true),
    ] {
        let out = v.path(name);
        let r = v.ok(&[
            "export",
            "--item",
            "vm1",
            "--format",
            format,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(r["format"], format);
        let cmp = qemu_img(&[
            "compare",
            "-f",
            "raw",
            raw.to_str().unwrap(),
            "-F",
            qemu,
            out.to_str().unwrap(),
        ]);
        assert!(cmp.contains("Images are identical"), "{format}: {cmp}");
        assert_eq!(virtual_size(qemu, &out), size, "{format}");
        if check {
            let c = qemu_img(&["check", "-f", qemu, out.to_str().unwrap()]);
            assert!(c.contains("No errors were found"), "{format}: {c}");
            assert!(!c.contains("leaked"), "{format}: {c}");
        }
        // Sparse containers hold only the data: less than the disk.
        if matches!(format, "qcow2" | "vmdk" | "vmdk-stream") {
            assert!(std::fs::metadata(&out).unwrap().len() < size, "{format}");
        }
    }
    let info = qemu_img(&[
        "info",
        "-f",
        "vmdk",
        v.path("vm1-stream.vmdk").to_str().unwrap(),
    ]);
    assert!(info.contains("create type: streamOptimized"), "{info}");
    // A VHDX's blocks are allocated only for data: the file holds no more than the disk's
    // blocks in use (plus its 4 MiB of headers, log, metadata and BAT).
    let vhdx_len = std::fs::metadata(v.path("vm1.vhdx")).unwrap().len();
    assert!(
        vhdx_len <= size.div_ceil(1 << 20) * (1 << 20) + (4 << 20),
        "{vhdx_len}"
    );
    // A fixed VHD is the raw disk plus a 512-byte footer.
    assert_eq!(
        std::fs::metadata(v.path("vm1.vhd")).unwrap().len(),
        size + 512
    );
    assert!(leftovers(v.dir.path()).is_empty());

    // An existing output is refused without --force / --overwrite, and left untouched.
    let before = sha256_file(&raw);
    let o = v.export("vm1", "qcow2", &raw, &[]);
    fails_with(&o, 1, &["vm1.raw", "already exists"]);
    assert_eq!(sha256_file(&raw), before);
    assert!(leftovers(v.dir.path()).is_empty());
    let copy = v.path("copy.img");
    std::fs::copy(&raw, &copy).unwrap();
    let o = v.export("vm1", "vmdk", &copy, &["--overwrite"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        raw.to_str().unwrap(),
        "-F",
        "vmdk",
        copy.to_str().unwrap(),
    ]);
    assert!(cmp.contains("Images are identical"), "{cmp}");

    // An unknown format: a usage error listing the formats.
    let nope = v.path("nope");
    let o = v.export("vm1", "zip", &nope, &[]);
    fails_with(&o, 2, &["zip", "raw, vhd, vhdx, qcow2, vmdk, vmdk-stream"]);
    assert!(!nope.exists());
}

#[test]
fn vhd_needs_a_whole_mib_or_round_up() {
    let v = Vault::new();
    let img = v.path("odd.img");
    let size: u64 = (3 << 20) + 4096;
    std::fs::write(&img, vec![0u8; usize::try_from(size).unwrap()]).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&[0x5A; 10_000], 12_345).unwrap();
        f.write_all_at(&[0xA5; 4096], size - 4096).unwrap();
    }
    v.ok(&["init", "--chunk-size", "64K"]);
    v.ok(&["import", "--item", "odd", "--disk", img.to_str().unwrap()]);

    let vhd = v.path("odd.vhd");
    let o = v.export("odd", "vhd", &vhd, &[]);
    fails_with(
        &o,
        1,
        &["3149824 bytes", "whole number of MiB", "--vhd-round-up"],
    );
    assert!(!vhd.exists());
    assert!(leftovers(v.dir.path()).is_empty());

    let o = v.export("odd", "vhd", &vhd, &["--vhd-round-up"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(virtual_size("vpc", &vhd), 4 << 20);
    assert_eq!(std::fs::metadata(&vhd).unwrap().len(), (4 << 20) + 512);
    // The padding reads as zeros: equal to the source over its length, zero after.
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        img.to_str().unwrap(),
        "-F",
        "vpc",
        vhd.to_str().unwrap(),
    ]);
    assert!(cmp.contains("Images are identical"), "{cmp}");

    // --vhd-round-up is only for VHD.
    let o = v.export("odd", "qcow2", &v.path("odd.qcow2"), &["--vhd-round-up"]);
    fails_with(&o, 1, &["--vhd-round-up"]);
}

/// `ferry vault export --in-place TARGET`: failback's data path offline. A copy of the disk
/// with 1 MiB scribbled over and a grown tail cut back gets exactly the chunks that differ,
/// ends bit-identical with the image, and a second run writes nothing. A target that does not
/// exist is refused, naming it, and nothing is created.
#[test]
fn in_place_writes_only_what_differs() {
    let v = Vault::new();
    let img = v.path("disk.img");
    make_ext4(&img, "64M");
    v.ok(&["init"]);
    v.ok(&["import", "--item", "vm1", "--disk", img.to_str().unwrap()]);
    let target = v.path("original.img");
    std::fs::copy(&img, &target).unwrap();
    ferry_e2e::scribble(&target, 8 << 20, 1 << 20, 5);
    let target_s = target.to_str().unwrap();
    let r = v.ok(&["export", "--item", "vm1", "--in-place", target_s]);
    let written = r["chunks_written"].as_u64().unwrap();
    assert!(
        written > 0 && written < r["chunks_compared"].as_u64().unwrap(),
        "{r}"
    );
    assert!(r["bytes_written"].as_u64().unwrap() >= 1 << 20, "{r}");
    assert!(
        r["bytes_written"].as_u64().unwrap() <= 3 << 20,
        "only the scribbled chunks: {r}"
    );
    assert_eq!(sha256_file(&target), sha256_file(&img));
    let r = v.ok(&["export", "--item", "vm1", "--in-place", target_s]);
    assert_eq!(r["chunks_written"], 0, "{r}");
    let missing = v.path("nope.img");
    let o = v.run(&[
        "export",
        "--item",
        "vm1",
        "--in-place",
        missing.to_str().unwrap(),
    ]);
    fails_with(&o, 1, &["nope.img"]);
    assert!(!missing.exists());
}
