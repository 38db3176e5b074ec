//! Fixtures made by qemu-img at test time, read back through the SDK traits and compared with
//! qemu-img's own raw conversion (byte for byte) and map (data coverage).
//!
//! The files are opened as the host opens them ([`HostFile`]): with a host id, and with the
//! allocation map of the file (its holes). Natively `File` has no allocation map (one `data`
//! extent), so the map is qemu-img's view of the file (`qemu-img map -f raw`, which asks
//! SEEK_DATA/SEEK_HOLE like the host does).
#![allow(clippy::cast_possible_truncation)] // test fixtures are small

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_plugin_sdk::adapter::{Disk, Error, Location, Mapping, Reader, SourceAdapter};
use ferry_plugin_sdk::io::{Extent, ExtentKind, IoError, Named, ReadAt};
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

/// A file as the host hands it over: a name, a host id and the file's allocation map.
struct HostFile {
    name: String,
    file: File,
    id: u32,
    /// `(start, end, allocated)`, tiling the file.
    map: Vec<(u64, u64, bool)>,
}

impl HostFile {
    fn open(path: &Path, id: u32) -> Self {
        let map: serde_json::Value = serde_json::from_str(&qemu(&[
            "map",
            "--output=json",
            "-f",
            "raw",
            path.to_str().unwrap(),
        ]))
        .unwrap();
        let map = map
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let s = e["start"].as_u64().unwrap();
                (
                    s,
                    s + e["length"].as_u64().unwrap(),
                    e["data"].as_bool().unwrap(),
                )
            })
            .collect();
        HostFile {
            name: path.file_name().unwrap().to_string_lossy().into_owned(),
            file: File::open(path).unwrap(),
            id,
            map,
        }
    }
}

impl ReadAt for HostFile {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> u64 {
        self.file.size()
    }
    fn read_at(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
        ReadAt::read_at(&self.file, offset, len)
    }
    fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Extent>, IoError> {
        let end = offset + length;
        Ok(self
            .map
            .iter()
            .filter(|&&(s, e, _)| e > offset && s < end)
            .map(|&(s, e, data)| {
                let (s, e) = (s.max(offset), e.min(end));
                let kind = if data {
                    ExtentKind::Data
                } else {
                    ExtentKind::Unallocated
                };
                Extent::new(s, e - s, kind)
            })
            .collect())
    }
    fn host_id(&self) -> Option<u32> {
        Some(self.id)
    }
}

/// Register every file of `dir` except `except` as a related file (its own name); with
/// `host`, as host readers (ids from 100, in name order). Returns the ids.
fn register_related(dir: &Dir, except: &str, host: bool) -> BTreeMap<String, u32> {
    testing::reset();
    let mut names: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != except)
        .collect();
    names.sort();
    let mut ids = BTreeMap::new();
    for (id, name) in (100..).zip(names) {
        let path = dir.path(&name);
        if host {
            testing::add_related(name.clone(), HostFile::open(&path, id));
            ids.insert(name, id);
        } else {
            testing::add_related(name.clone(), Named::new(name, File::open(path).unwrap()));
        }
    }
    ids
}

/// Open `name` of `dir` as the host would (host readers with ids and allocation maps); also
/// returns the related files' ids.
fn open_host(dir: &Dir, name: &str) -> Result<(VmdkDisk, BTreeMap<String, u32>), Error> {
    let ids = register_related(dir, name, true);
    Ok((
        Vmware::open(Reader::new(HostFile::open(&dir.path(name), 1)))?,
        ids,
    ))
}

fn open(dir: &Dir, name: &str) -> Result<VmdkDisk, Error> {
    open_host(dir, name).map(|(d, _)| d)
}

/// Open `name` of `dir` over plain native files (no ids, no holes).
fn open_plain(dir: &Dir, name: &str) -> Result<VmdkDisk, Error> {
    register_related(dir, name, false);
    Vmware::open(Reader::new(Named::new(
        name,
        File::open(dir.path(name)).unwrap(),
    )))
}

/// Check `locate` over the whole disk: the mappings tile it, `Source` and `Related` ranges hold
/// the disk's bytes in the file they name (the first and last 64 KiB of each are compared),
/// `Zero` ranges read as zeros. Returns the mappings.
fn check_locate(
    disk: &VmdkDisk,
    dir: &Dir,
    opened: &str,
    ids: &BTreeMap<String, u32>,
) -> Vec<Mapping> {
    let size = disk.info().virtual_size;
    let mut maps = Vec::new();
    let mut pos = 0;
    while pos < size {
        let batch = disk.locate(pos, size - pos).unwrap();
        assert!(!batch.is_empty());
        for m in batch {
            assert_eq!(m.offset, pos, "mappings tile the disk");
            pos += m.length;
            maps.push(m);
        }
    }
    let file = |name: &str| File::open(dir.path(name)).unwrap();
    for m in &maps {
        let piece = m.length.min(64 << 10);
        for at in [0, m.length - piece] {
            let want = disk.read(m.offset + at, piece as u32).unwrap();
            let (f, off) = match m.location {
                Location::Zero => {
                    assert!(want.iter().all(|&b| b == 0), "{m:?}");
                    continue;
                }
                Location::Adapter => continue,
                Location::Source(o) => (file(opened), o),
                Location::Related { reader, offset } => {
                    let (name, _) = ids.iter().find(|(_, id)| **id == reader).unwrap();
                    (file(name), offset)
                }
            };
            let mut got = vec![0u8; piece as usize];
            f.read_exact_at(&mut got, off + at).unwrap();
            assert!(got == want, "{m:?}: bytes differ at +{at}");
        }
    }
    for w in maps.windows(2) {
        let merged = w[0].continues_with(w[1].location);
        assert!(!merged, "not coalesced: {w:?}");
    }
    maps
}

/// The host ids named by `Related` mappings.
fn readers(maps: &[Mapping]) -> Vec<u32> {
    let mut v: Vec<u32> = maps
        .iter()
        .filter_map(|m| match m.location {
            Location::Related { reader, .. } => Some(reader),
            _ => None,
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
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

/// What qemu says must be read: `data` and not `zero`. For sparse extents that is its `data`
/// (unallocated and zeroed grains are `zero` and not `data`); for flat extents qemu looks into
/// the extent file and reports its holes as `zero` (with `data`, as it does for raw files'
/// holes seen through a format layer): they are what we report `unallocated`.
fn qemu_data(image: &Path) -> Vec<(u64, u64)> {
    let map: serde_json::Value =
        serde_json::from_str(&qemu(&["map", "--output=json", image.to_str().unwrap()])).unwrap();
    merge(
        map.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"].as_bool().unwrap() && !e["zero"].as_bool().unwrap())
            .map(|e| {
                let s = e["start"].as_u64().unwrap();
                (s, s + e["length"].as_u64().unwrap())
            })
            .collect(),
    )
}

/// Convert `raw` to `subformat`, read it back, compare bytes with qemu's raw output and the
/// data map with qemu's map. Returns the disk, its mappings and the related files' ids.
fn roundtrip(
    dir: &Dir,
    raw: &str,
    subformat: &str,
    format: &str,
) -> (VmdkDisk, Vec<Mapping>, BTreeMap<String, u32>) {
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
    let (disk, ids) = open_host(dir, &name).unwrap();
    assert_eq!(disk.info().format, format);
    assert_same_bytes(&disk, &oracle_keep);
    let _ = std::fs::remove_file(&oracle_keep);
    assert_eq!(
        our_data(&disk),
        qemu_data(&image),
        "{subformat}: data coverage"
    );
    let maps = check_locate(&disk, dir, &name, &ids);
    (disk, maps, ids)
}

/// Bytes of `ranges` in all.
fn total(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|(s, e)| e - s).sum()
}

#[test]
fn monolithic_sparse_matches_qemu() {
    let dir = Dir::new("sparse");
    make_raw(&dir.path("disk.raw"), SMALL, SMALL_WRITES);
    let (_, maps, _) = roundtrip(
        &dir,
        "disk.raw",
        "monolithicSparse",
        "vmdk-monolithic-sparse",
    );
    // Uncompressed grains of the opened file are `Source` (checked against the file by
    // `check_locate`), never `Related` or `Adapter`.
    let sources = maps
        .iter()
        .filter(|m| matches!(m.location, Location::Source(_)))
        .count();
    assert!(sources >= 5, "{sources} source mappings");
    assert!(
        maps.iter()
            .all(|m| matches!(m.location, Location::Source(_) | Location::Zero))
    );
}

#[test]
fn stream_optimized_matches_qemu() {
    let dir = Dir::new("stream");
    make_raw(&dir.path("disk.raw"), SMALL, SMALL_WRITES);
    let (_, maps, _) = roundtrip(&dir, "disk.raw", "streamOptimized", "vmdk-stream-optimized");
    assert!(
        maps.iter()
            .all(|m| matches!(m.location, Location::Adapter | Location::Zero))
    );
    assert!(maps.iter().any(|m| m.location == Location::Adapter));
}

#[test]
fn monolithic_flat_matches_qemu() {
    let dir = Dir::new("flat");
    make_raw(&dir.path("disk.raw"), SMALL, SMALL_WRITES);
    let (disk, maps, ids) = roundtrip(&dir, "disk.raw", "monolithicFlat", "vmdk-monolithic-flat");
    // The flat file's holes are unallocated: only the written ranges (rounded to the
    // filesystem's blocks) are data.
    let data = our_data(&disk);
    let written: u64 = SMALL_WRITES.iter().map(|w| w.1).sum();
    assert!(
        (written..written + 64 * MIB / 16).contains(&total(&data)),
        "{data:?}"
    );
    // Everything is read by the host from the flat file, in one mapping.
    assert_eq!(readers(&maps), vec![ids["monolithicFlat-flat.vmdk"]]);
    assert_eq!(maps.len(), 1, "{maps:?}");
    assert_eq!(
        maps[0].location,
        Location::Related {
            reader: ids["monolithicFlat-flat.vmdk"],
            offset: 0
        }
    );
    // Without host ids (native files): `Adapter`, and no holes known.
    let disk = open_plain(&dir, "monolithicFlat.vmdk").unwrap();
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
    let (disk, maps, ids) = roundtrip(&dir, "disk.raw", "twoGbMaxExtentSparse", "vmdk-2gb-sparse");
    assert!(disk.info().virtual_size > 2048 * MIB);
    // Two extent files, both read by the host (grains are uncompressed).
    assert_eq!(
        readers(&maps),
        vec![
            ids["twoGbMaxExtentSparse-s001.vmdk"],
            ids["twoGbMaxExtentSparse-s002.vmdk"]
        ]
    );
    assert!(
        maps.iter()
            .all(|m| matches!(m.location, Location::Related { .. } | Location::Zero))
    );
}

#[test]
fn two_gb_flat_matches_qemu() {
    let dir = Dir::new("2gbflat");
    make_raw(&dir.path("disk.raw"), BIG, BIG_WRITES);
    let (disk, maps, ids) = roundtrip(&dir, "disk.raw", "twoGbMaxExtentFlat", "vmdk-2gb-flat");
    let written: u64 = BIG_WRITES.iter().map(|w| w.1).sum();
    assert!(total(&our_data(&disk)) < written + 4 * MIB);
    // One mapping per extent file, switching files at the extent boundary.
    let (f1, f2) = (
        ids["twoGbMaxExtentFlat-f001.vmdk"],
        ids["twoGbMaxExtentFlat-f002.vmdk"],
    );
    let boundary = File::open(dir.path("twoGbMaxExtentFlat-f001.vmdk"))
        .unwrap()
        .metadata()
        .unwrap()
        .len();
    assert_eq!(
        maps,
        vec![
            Mapping {
                offset: 0,
                length: boundary,
                location: Location::Related {
                    reader: f1,
                    offset: 0
                }
            },
            Mapping {
                offset: boundary,
                length: BIG - boundary,
                location: Location::Related {
                    reader: f2,
                    offset: 0
                }
            },
        ]
    );
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
    let (disk, ids) = open_host(&dir, "vm.vmdk").unwrap();
    assert_eq!(disk.info().format, "vmdk-vmfs");
    assert_eq!(disk.info().disk_id.as_deref(), Some("6000C29a-1b2c-3d4e"));
    assert_same_bytes(&disk, &dir.path("vm-flat.vmdk"));
    // The flat file's holes are unallocated, as qemu sees them; the host reads the rest.
    assert_eq!(our_data(&disk), qemu_data(&dir.path("vm.vmdk")));
    assert!(total(&our_data(&disk)) < SMALL / 4);
    let maps = check_locate(&disk, &dir, "vm.vmdk", &ids);
    assert_eq!(readers(&maps), vec![ids["vm-flat.vmdk"]]);
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
