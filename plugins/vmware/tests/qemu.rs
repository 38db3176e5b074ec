//! Fixtures made by qemu-img at test time, read back through the SDK traits and compared with
//! qemu-img's own raw conversion (byte for byte) and map (data coverage).
#![allow(clippy::cast_possible_truncation)] // test fixtures are small

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_plugin_sdk::adapter::{Disk, Error, Location, Reader, SourceAdapter};
use ferry_plugin_sdk::io::{ExtentKind, Named};
use ferry_plugin_sdk::testing;
use ferry_plugin_vmware::{VmdkDisk, Vmware};

const MIB: u64 = 1 << 20;

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ferry-vmware-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn qemu(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A sparse raw file of `size` bytes with pseudo-random data at scattered, unaligned offsets.
fn make_raw(path: &Path, size: u64, writes: &[(u64, u64)]) {
    let mut f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x = 0x1234_5678_9abc_def0u64;
    for &(at, len) in writes {
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&data).unwrap();
    }
    // An allocated run of zeros: must read back as zeros whatever the format does with it.
    f.seek(SeekFrom::Start(size / 2)).unwrap();
    f.write_all(&vec![0u8; 256 << 10]).unwrap();
}

const SMALL: u64 = 48 * MIB;
const SMALL_WRITES: &[(u64, u64)] = &[
    (0, 64 << 10),
    (MIB + 4096, 300 << 10),
    (7 * MIB + 1000, 5000),
    (20 * MIB, 2 * MIB),
    (33 * MIB + 65536 * 3 + 17, 70000),
    (SMALL - 100 * 1024, 100 * 1024),
];

const BIG: u64 = 2 * 1024 * MIB + 32 * MIB;
const BIG_WRITES: &[(u64, u64)] = &[
    (0, 128 << 10),
    (5 * MIB + 3, 4096),
    (2 * 1024 * MIB - 100_000, 200_000),
    (2 * 1024 * MIB + 10 * MIB, MIB),
    (BIG - 70_000, 70_000),
];

/// Register every file of `dir` except `except` as a related file (its own name).
fn register_related(dir: &Dir, except: &str) {
    testing::reset();
    for e in std::fs::read_dir(&dir.0).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name != except {
            let f = File::open(dir.path(&name)).unwrap();
            testing::add_related(name.clone(), Named::new(name, f));
        }
    }
}

fn open(dir: &Dir, name: &str) -> Result<VmdkDisk, Error> {
    register_related(dir, name);
    Vmware::open(Reader::new(Named::new(
        name,
        File::open(dir.path(name)).unwrap(),
    )))
}

/// The whole virtual disk equals `raw`, read in 4 MiB pieces at an odd alignment.
fn assert_same_bytes(disk: &VmdkDisk, raw: &Path) {
    let mut oracle = File::open(raw).unwrap();
    let size = disk.info().virtual_size;
    assert_eq!(size, oracle.metadata().unwrap().len());
    let mut pos = 0;
    let mut piece = 4 * MIB - 512 * 3 + 7;
    while pos < size {
        let n = piece.min(size - pos);
        let got = disk.read(pos, n as u32).unwrap();
        let mut want = vec![0u8; n as usize];
        oracle.read_exact(&mut want).unwrap();
        assert!(got == want, "bytes differ in {pos}+{n}");
        pos += n;
        piece = 4 * MIB;
    }
}

/// Data ranges, merged.
fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn our_data(disk: &VmdkDisk) -> Vec<(u64, u64)> {
    let size = disk.info().virtual_size;
    let mut pos = 0;
    let mut data = Vec::new();
    while pos < size {
        let ext = disk.extents(pos, size - pos).unwrap();
        assert!(!ext.is_empty());
        for e in ext {
            assert_eq!(e.offset, pos, "extents are contiguous");
            if e.kind == ExtentKind::Data {
                data.push((e.offset, e.end()));
            }
            pos = e.end();
        }
    }
    merge(data)
}

fn qemu_data(image: &Path) -> Vec<(u64, u64)> {
    let map: serde_json::Value =
        serde_json::from_str(&qemu(&["map", "--output=json", image.to_str().unwrap()])).unwrap();
    merge(
        map.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"].as_bool().unwrap())
            .map(|e| {
                let s = e["start"].as_u64().unwrap();
                (s, s + e["length"].as_u64().unwrap())
            })
            .collect(),
    )
}

/// Convert `raw` to `subformat`, read it back, compare bytes with qemu's raw output and the
/// data map with qemu's map. Returns the disk.
fn roundtrip(dir: &Dir, raw: &str, subformat: &str, format: &str, compare_map: bool) -> VmdkDisk {
    let name = format!("{subformat}.vmdk");
    let image = dir.path(&name);
    qemu(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        &format!("subformat={subformat}"),
        dir.path(raw).to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    let oracle = dir.path(&format!("{subformat}.oracle"));
    qemu(&[
        "convert",
        "-O",
        "raw",
        image.to_str().unwrap(),
        oracle.to_str().unwrap(),
    ]);
    // The oracle must not be mistaken for an extent file.
    let oracle_keep = std::env::temp_dir().join(format!(
        "ferry-vmware-{}-{subformat}.oracle",
        std::process::id()
    ));
    std::fs::rename(&oracle, &oracle_keep).unwrap();
    let disk = open(dir, &name).unwrap();
    assert_eq!(disk.info().format, format);
    assert_same_bytes(&disk, &oracle_keep);
    let _ = std::fs::remove_file(&oracle_keep);
    if compare_map {
        assert_eq!(
            our_data(&disk),
            qemu_data(&image),
            "{subformat}: data coverage"
        );
    }
    disk
}

#[test]
fn monolithic_sparse_matches_qemu() {
    let dir = Dir::new("sparse");
    make_raw(&dir.path("disk.raw"), SMALL, SMALL_WRITES);
    let disk = roundtrip(
        &dir,
        "disk.raw",
        "monolithicSparse",
        "vmdk-monolithic-sparse",
        true,
    );
    // Uncompressed grains of the opened file are `Source` and hold the right bytes.
    let image = std::fs::read(dir.path("monolithicSparse.vmdk")).unwrap();
    let maps = disk.locate(0, SMALL).unwrap();
    let mut sources = 0;
    let mut pos = 0;
    for m in maps {
        assert_eq!(m.offset, pos);
        pos += m.length;
        if let Location::Source(o) = m.location {
            sources += 1;
            let want = disk.read(m.offset, m.length.min(4 * MIB) as u32).unwrap();
            assert_eq!(image[o as usize..o as usize + want.len()], want[..]);
        }
        assert_ne!(m.location, Location::Adapter);
    }
    assert_eq!(pos, SMALL);
    assert!(sources >= 5, "{sources} source mappings");
}

#[test]
fn stream_optimized_matches_qemu() {
    let dir = Dir::new("stream");
    make_raw(&dir.path("disk.raw"), SMALL, SMALL_WRITES);
    let disk = roundtrip(
        &dir,
        "disk.raw",
        "streamOptimized",
        "vmdk-stream-optimized",
        true,
    );
    let maps = disk.locate(0, SMALL).unwrap();
    assert!(
        maps.iter()
            .all(|m| !matches!(m.location, Location::Source(_)))
    );
    assert!(maps.iter().any(|m| m.location == Location::Adapter));
}

#[test]
fn monolithic_flat_matches_qemu() {
    let dir = Dir::new("flat");
    make_raw(&dir.path("disk.raw"), SMALL, SMALL_WRITES);
    let disk = roundtrip(
        &dir,
        "disk.raw",
        "monolithicFlat",
        "vmdk-monolithic-flat",
        false,
    );
    assert_eq!(our_data(&disk), vec![(0, SMALL)]);
    assert!(
        disk.locate(0, SMALL)
            .unwrap()
            .iter()
            .all(|m| m.location == Location::Adapter)
    );
}

#[test]
fn two_gb_sparse_matches_qemu() {
    let dir = Dir::new("2gbsparse");
    make_raw(&dir.path("disk.raw"), BIG, BIG_WRITES);
    let disk = roundtrip(
        &dir,
        "disk.raw",
        "twoGbMaxExtentSparse",
        "vmdk-2gb-sparse",
        true,
    );
    assert!(disk.info().virtual_size > 2048 * MIB);
    // Two extent files.
    assert!(dir.path("twoGbMaxExtentSparse-s002.vmdk").exists());
}

#[test]
fn two_gb_flat_matches_qemu() {
    let dir = Dir::new("2gbflat");
    make_raw(&dir.path("disk.raw"), BIG, BIG_WRITES);
    let disk = roundtrip(
        &dir,
        "disk.raw",
        "twoGbMaxExtentFlat",
        "vmdk-2gb-flat",
        false,
    );
    assert_eq!(our_data(&disk), vec![(0, BIG)]);
    assert!(dir.path("twoGbMaxExtentFlat-f002.vmdk").exists());
}

#[test]
fn esxi_vmfs_layout_reads_the_flat_file() {
    let dir = Dir::new("vmfs");
    make_raw(&dir.path("vm-flat.vmdk"), SMALL, SMALL_WRITES);
    let sectors = SMALL / 512;
    std::fs::write(
        dir.path("vm.vmdk"),
        format!(
            "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\n\
             parentCID=ffffffff\ncreateType=\"vmfs\"\n\n# Extent description\n\
             RW {sectors} VMFS \"vm-flat.vmdk\"\n\n# The Disk Data Base\n#DDB\n\n\
             ddb.adapterType = \"lsilogic\"\nddb.uuid.image = \"6000C29a-1b2c-3d4e\"\n\
             ddb.virtualHWVersion = \"13\"\n"
        ),
    )
    .unwrap();
    let disk = open(&dir, "vm.vmdk").unwrap();
    assert_eq!(disk.info().format, "vmdk-vmfs");
    assert_eq!(disk.info().disk_id.as_deref(), Some("6000C29a-1b2c-3d4e"));
    assert_same_bytes(&disk, &dir.path("vm-flat.vmdk"));
    // qemu agrees.
    let oracle = dir.path("vm.oracle");
    qemu(&[
        "convert",
        "-O",
        "raw",
        dir.path("vm.vmdk").to_str().unwrap(),
        oracle.to_str().unwrap(),
    ]);
    assert_same_bytes(&disk, &oracle);
}

#[test]
fn truncated_and_damaged_qemu_files_are_invalid() {
    let dir = Dir::new("damaged");
    make_raw(&dir.path("disk.raw"), SMALL, SMALL_WRITES);
    for sub in ["monolithicSparse", "streamOptimized"] {
        let image = dir.path(&format!("{sub}.vmdk"));
        qemu(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            dir.path("disk.raw").to_str().unwrap(),
            image.to_str().unwrap(),
        ]);
        let full = std::fs::read(&image).unwrap();
        for keep in [100, 4096, full.len() / 2, full.len() - 700] {
            let name = format!("{sub}-cut.vmdk");
            std::fs::write(dir.path(&name), &full[..keep]).unwrap();
            let result = open(&dir, &name).and_then(|d| {
                let size = d.info().virtual_size;
                let mut pos = 0;
                while pos < size {
                    d.read(pos, (4 * MIB).min(size - pos) as u32)?;
                    d.locate(pos, (4 * MIB).min(size - pos))?;
                    pos += 4 * MIB;
                }
                Ok(())
            });
            let e = result.expect_err(&format!("{sub} cut at {keep} reads"));
            assert!(
                matches!(&e, Error::Invalid(m) if m.contains(&name)),
                "{sub} cut at {keep}: {e}"
            );
        }
    }
}
