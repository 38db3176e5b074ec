//! The built-in VMware and Hyper-V adapters inside the real host (sandbox, limits, related
//! files through `open-related`), through the real `ferry` binary: every format `qemu-img`
//! writes from a real ext4 image is exposed byte for byte as `qemu-img convert -O raw` of the
//! same file, with the adapter picked by `auto` probing where the format can be probed.

use std::path::Path;
use std::process::Command;

use ferry_e2e::{ferry_bin, make_ext4, qemu_img, sha256_file};

fn ferry_run(plugin: &str, disk: &Path, out: &Path, cache: &Path) -> serde_json::Value {
    let o = Command::new(ferry_bin())
        .args(["plugin", "run", plugin, "--disk"])
        .arg(disk)
        .arg("--out")
        .arg(out)
        .arg("--json")
        .env("FERRY_PLUGIN_CACHE", cache)
        .output()
        .expect("run ferry");
    assert!(
        o.status.success(),
        "ferry plugin run {plugin} {}: {}",
        disk.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn vmdk_vhdx_and_vhd_from_qemu_img_are_exposed_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cache = d.join("cache");
    let raw = d.join("disk.raw");
    make_ext4(&raw, "96M");

    // (file, qemu-img -O args, qemu-img input format for the oracle, ferry plugin to use)
    let cases: &[(&str, &[&str], &str, &str)] = &[
        (
            "sparse.vmdk",
            &["-O", "vmdk", "-o", "subformat=monolithicSparse"],
            "vmdk",
            "auto",
        ),
        (
            "stream.vmdk",
            &["-O", "vmdk", "-o", "subformat=streamOptimized"],
            "vmdk",
            "auto",
        ),
        (
            "flat.vmdk",
            &["-O", "vmdk", "-o", "subformat=monolithicFlat"],
            "vmdk",
            "auto",
        ),
        (
            "split.vmdk",
            &["-O", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"],
            "vmdk",
            "auto",
        ),
        (
            "splitflat.vmdk",
            &["-O", "vmdk", "-o", "subformat=twoGbMaxExtentFlat"],
            "vmdk",
            "auto",
        ),
        ("dynamic.vhdx", &["-O", "vhdx"], "vhdx", "auto"),
        (
            "blocks1m.vhdx",
            &["-O", "vhdx", "-o", "block_size=1M"],
            "vhdx",
            "auto",
        ),
        (
            "dynamic.vhd",
            &["-O", "vpc", "-o", "subformat=dynamic,force_size=on"],
            "vpc",
            "auto",
        ),
        // A fixed VHD's footer is at its end: probing the first 64 KiB cannot see it.
        (
            "fixed.vhd",
            &["-O", "vpc", "-o", "subformat=fixed,force_size=on"],
            "vpc",
            "builtin:hyperv",
        ),
        // A raw image is no container: every other adapter's probe declines it.
        ("copy.img", &["-O", "raw"], "raw", "auto"),
    ];
    for (file, args, fmt, plugin) in cases {
        let img = d.join(file);
        let mut a: Vec<&str> = vec!["convert", "-f", "raw"];
        a.extend_from_slice(args);
        a.push(raw.to_str().unwrap());
        a.push(img.to_str().unwrap());
        qemu_img(&a);
        let oracle = d.join(format!("{file}.oracle.raw"));
        qemu_img(&[
            "convert",
            "-f",
            fmt,
            "-O",
            "raw",
            img.to_str().unwrap(),
            oracle.to_str().unwrap(),
        ]);

        let out = d.join(format!("{file}.ferry.raw"));
        let r = ferry_run(plugin, &img, &out, &cache);
        assert_eq!(
            sha256_file(&out),
            sha256_file(&oracle),
            "{file}: the adapter's disk differs from qemu-img's"
        );
        let expected_plugin = if file.ends_with(".vmdk") {
            "vmware"
        } else if file.ends_with(".img") {
            "physical"
        } else {
            "hyperv"
        };
        assert_eq!(r["plugin"], expected_plugin, "{file}: {r}");
        assert!(
            r["bytes_read"].as_u64().unwrap() <= r["disk"]["virtual_size"].as_u64().unwrap(),
            "{file}: {r}"
        );
        // Without --sha256, what the adapter locates in files is copied by the kernel
        // (copy_file_range); only streamOptimized's compressed grains pass through the plugin.
        let expected_copied = if *file == "stream.vmdk" {
            0
        } else {
            r["bytes_read"].as_u64().unwrap()
        };
        assert_eq!(r["bytes_copied"], expected_copied, "{file}: {r}");
    }
}

fn ferry_vault(args: &[&str], d: &Path) -> serde_json::Value {
    let sub = args[0];
    let o = Command::new(ferry_bin())
        .args(["vault", sub, "--repo"])
        .arg(d.join("vault"))
        .arg("--passphrase-file")
        .arg(d.join("pass"))
        .arg("--cache-dir")
        .arg(d.join("vcache"))
        .args(&args[1..])
        .env("FERRY_PLUGIN_CACHE", d.join("cache"))
        .env_remove("FERRY_PASSPHRASE")
        .env_remove("FERRY_REPO")
        .output()
        .expect("run ferry vault");
    assert!(
        o.status.success(),
        "ferry vault {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
}

/// `ferry vault import --format`: a VMDK and a VHDX are imported through their adapters (full),
/// then the image changes, a new container is written and only the areas a CBT (VMDK) or RCT
/// (VHDX) document names are imported (incremental); every point exports byte for byte equal
/// to the image it was taken from.
#[test]
fn vault_import_through_adapters_full_and_incremental() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("pass"), "a long and secret passphrase\n").unwrap();
    ferry_vault(&["init"], d);
    let raw0 = d.join("v0.raw");
    make_ext4(&raw0, "96M");
    let size = std::fs::metadata(&raw0).unwrap().len();
    let raw1 = d.join("v1.raw");
    std::fs::copy(&raw0, &raw1).unwrap();
    let writes = ferry_e2e::random_writes(&raw1, 20, 50_000, 3);

    for (fmt, qfmt, doc) in [("vmdk", "vmdk", "cbt"), ("vhdx", "vhdx", "rct")] {
        let item = format!("vm-{fmt}");
        let c0 = d.join(format!("v0.{fmt}"));
        let c1 = d.join(format!("v1.{fmt}"));
        for (raw, c) in [(&raw0, &c0), (&raw1, &c1)] {
            qemu_img(&[
                "convert",
                "-f",
                "raw",
                "-O",
                qfmt,
                raw.to_str().unwrap(),
                c.to_str().unwrap(),
            ]);
        }
        let r = ferry_vault(
            &[
                "import",
                "--item",
                &item,
                "--disk",
                c0.to_str().unwrap(),
                "--format",
                "auto",
                "--json",
            ],
            d,
        );
        assert!(
            r["bytes_read"].as_u64().unwrap() < size,
            "{fmt}: holes were read: {r}"
        );
        let doc_path = d.join(format!("{fmt}.{doc}.json"));
        let text = if doc == "cbt" {
            let areas: Vec<_> = writes
                .iter()
                .map(|w| serde_json::json!({"start": w.start, "length": w.end - w.start}))
                .collect();
            serde_json::json!({"startOffset": 0, "length": size, "changedArea": areas})
        } else {
            serde_json::json!(writes
                .iter()
                .map(|w| serde_json::json!({"ByteOffset": w.start, "ByteLength": w.end - w.start}))
                .collect::<Vec<_>>())
        };
        std::fs::write(&doc_path, text.to_string()).unwrap();
        let r = ferry_vault(
            &[
                "import",
                "--item",
                &item,
                "--disk",
                c1.to_str().unwrap(),
                "--format",
                fmt,
                "--changes",
                doc_path.to_str().unwrap(),
                "--json",
            ],
            d,
        );
        assert!(
            r["bytes_read"].as_u64().unwrap() <= 40 << 20,
            "{fmt}: an incremental read {r}"
        );
        let points = ferry_vault(&["points", "--item", &item, "--json"], d);
        let ids: Vec<String> = points
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["point"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids.len(), 2, "{points}");
        for (id, raw) in ids.iter().zip([&raw0, &raw1]) {
            let out = d.join(format!("{id}.raw"));
            ferry_vault(
                &[
                    "export",
                    "--item",
                    &item,
                    "--point",
                    id,
                    "--out",
                    out.to_str().unwrap(),
                ],
                d,
            );
            assert_eq!(sha256_file(&out), sha256_file(raw), "{fmt} point {id}");
        }
    }
}
