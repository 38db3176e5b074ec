//! Native tests: qemu-img made fixtures checked against qemu's own raw conversion and map, and
//! hand-built files for what qemu-img cannot make (differencing chains, 4 KiB sectors, a
//! non-empty VHDX log, malformed files).
#![allow(clippy::cast_possible_truncation)] // test images are a few MiB

use super::*;
use crate::common::{crc32c, crc32c_without};
use crate::vhdx::*;
use ferry_plugin_sdk::io::Named;
use ferry_plugin_sdk::testing;
use std::cell::Cell;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- helpers

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-hyperv-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().expect("run qemu-img");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A raw disk of `size` bytes with random data at scattered offsets and holes between.
fn make_raw(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut raw = vec![0u8; size as usize];
    for _ in 0..40 {
        let len = (rng.next() % (300 * KIB)) as usize + 1;
        // Data in the first two thirds only: the last third stays a hole.
        let at = (rng.next() % (size * 2 / 3 - len as u64)) as usize;
        raw[at..at + len].copy_from_slice(&rng.bytes(len));
    }
    // A fully written 3 MiB run, crossing block boundaries.
    let at = (size / 3 + 12345) as usize;
    raw[at..at + 3 * MIB as usize].copy_from_slice(&rng.bytes(3 * MIB as usize));
    std::fs::write(path, &raw).unwrap();
    raw
}

fn open_file(path: &Path) -> Result<HypervDisk, Error> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    HyperV::open(Reader::new(Named::new(name, File::open(path).unwrap())))
}

fn open_bytes(name: &str, data: Vec<u8>) -> Result<HypervDisk, Error> {
    HyperV::open(Reader::new(Named::new(name, data)))
}

fn read_all(d: &HypervDisk) -> Vec<u8> {
    let size = d.info().virtual_size;
    let mut out = Vec::with_capacity(size as usize);
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(u64::from(ferry_plugin_sdk::adapter::MAX_DISK_READ));
        out.extend(d.read(pos, n as u32).unwrap());
        pos += n;
    }
    out
}

/// Check `locate` answers against the expected bytes: `Source` ranges read from `file`.
fn check_locate(d: &HypervDisk, file: &[u8], expect: &[u8]) -> Vec<Mapping> {
    check_locate_in(d, file, &[], expect)
}

/// [`check_locate`], `Related` ranges read from the `related` file of their reader id.
fn check_locate_in(
    d: &HypervDisk,
    file: &[u8],
    related: &[(u32, &[u8])],
    expect: &[u8],
) -> Vec<Mapping> {
    let size = d.info().virtual_size;
    let maps = d.locate(0, size).unwrap();
    let mut pos = 0;
    for m in &maps {
        assert_eq!(m.offset, pos, "gap or overlap in {maps:?}");
        let want = &expect[m.offset as usize..(m.offset + m.length) as usize];
        match m.location {
            Location::Source(fo) => {
                assert_eq!(&file[fo as usize..(fo + m.length) as usize], want, "{m:?}");
            }
            Location::Related { reader, offset } => {
                let (_, bytes) = related
                    .iter()
                    .find(|(id, _)| *id == reader)
                    .unwrap_or_else(|| panic!("{m:?} names an unknown reader"));
                assert!(
                    bytes[offset as usize..(offset + m.length) as usize] == *want,
                    "{m:?}"
                );
            }
            Location::Zero => assert!(want.iter().all(|&b| b == 0), "{m:?}"),
            Location::Adapter => {}
        }
        pos += m.length;
    }
    assert_eq!(pos, size);
    for w in maps.windows(2) {
        let coalescable = w[0].continues_with(w[1].location);
        assert!(!coalescable, "not coalesced: {w:?}");
    }
    maps
}

/// A reader that looks like the host's: a host id and (`map: Some`) an allocation map of
/// `(start, end, allocated)` runs. Counts allocation queries.
struct HostLike<R> {
    inner: R,
    id: Option<u32>,
    map: Option<Vec<(u64, u64, bool)>>,
    queries: Rc<Cell<usize>>,
}

impl<R: ReadAt> HostLike<R> {
    fn new(inner: R, id: Option<u32>) -> Self {
        HostLike {
            inner,
            id,
            map: None,
            queries: Rc::new(Cell::new(0)),
        }
    }

    /// With the allocation map of `path` as qemu-img sees it (`qemu-img map -f raw`, which
    /// asks SEEK_DATA/SEEK_HOLE like the host; natively `File` reports no holes).
    fn with_holes_of(mut self, path: &Path) -> Self {
        let out = run(Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(path));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        self.map = Some(
            v.as_array()
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
                .collect(),
        );
        self
    }
}

impl<R: ReadAt> ReadAt for HostLike<R> {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, len: u32) -> Result<Vec<u8>, ferry_plugin_sdk::io::IoError> {
        self.inner.read_at(offset, len)
    }
    fn allocation(
        &self,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, ferry_plugin_sdk::io::IoError> {
        self.queries.set(self.queries.get() + 1);
        let Some(map) = &self.map else {
            return self.inner.allocation(offset, length);
        };
        let end = offset + length;
        Ok(map
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
        self.id
    }
}

/// Open `path` as the host would: a host id (1) and the file's holes.
fn open_host_file(path: &Path) -> Result<HypervDisk, Error> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    HyperV::open(Reader::new(
        HostLike::new(Named::new(name, File::open(path).unwrap()), Some(1)).with_holes_of(path),
    ))
}

/// Merged `[start, end)` ranges of the extents of `kind`.
fn ranges_of(ext: &[Extent], kind: ExtentKind) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in ext.iter().filter(|e| e.kind == kind) {
        match out.last_mut() {
            Some(last) if last.1 == e.offset => last.1 = e.end(),
            _ => out.push((e.offset, e.end())),
        }
    }
    out
}

/// Merged ranges qemu-img's map of `path` says satisfy `pick(data, zero)`.
fn qemu_ranges(fmt: &str, path: &Path, pick: impl Fn(bool, bool) -> bool) -> Vec<(u64, u64)> {
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", fmt])
        .arg(path));
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for m in v.as_array().unwrap() {
        if pick(m["data"].as_bool().unwrap(), m["zero"].as_bool().unwrap()) {
            let s = m["start"].as_u64().unwrap();
            let e = s + m["length"].as_u64().unwrap();
            match ranges.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => ranges.push((s, e)),
            }
        }
    }
    ranges
}

/// Whether every range of `inner` lies within some range of `outer` (both merged, sorted).
fn within(inner: &[(u64, u64)], outer: &[(u64, u64)]) -> bool {
    inner
        .iter()
        .all(|&(s, e)| outer.iter().any(|&(os, oe)| os <= s && e <= oe))
}

fn total(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|(s, e)| e - s).sum()
}

/// Check extents cover the disk in order, and that non-data extents read as zeros.
fn check_extents(d: &HypervDisk, expect: &[u8]) -> Vec<Extent> {
    let size = d.info().virtual_size;
    let ext = d.extents(0, size).unwrap();
    let mut pos = 0;
    for e in &ext {
        assert_eq!(e.offset, pos);
        assert!(e.length > 0);
        if e.kind != ExtentKind::Data {
            assert!(
                expect[e.offset as usize..e.end() as usize]
                    .iter()
                    .all(|&b| b == 0),
                "{e:?} is not zeros"
            );
        }
        pos = e.end();
    }
    assert_eq!(pos, size);
    ext
}

/// Data coverage per `unit` from `qemu-img map --output=json`.
fn qemu_data_units(fmt: &str, path: &Path, size: u64, unit: u64) -> Vec<bool> {
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", fmt])
        .arg(path));
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let mut units = vec![false; size.div_ceil(unit) as usize];
    for m in v.as_array().unwrap() {
        if m["data"].as_bool() == Some(true) {
            let s = m["start"].as_u64().unwrap();
            let l = m["length"].as_u64().unwrap();
            for u in s / unit..(s + l).div_ceil(unit) {
                units[u as usize] = true;
            }
        }
    }
    units
}

fn our_data_units(ext: &[Extent], size: u64, unit: u64) -> Vec<bool> {
    let mut units = vec![false; size.div_ceil(unit) as usize];
    for e in ext.iter().filter(|e| e.kind == ExtentKind::Data) {
        for u in e.offset / unit..e.end().div_ceil(unit) {
            units[u as usize] = true;
        }
    }
    units
}

/// Convert `raw` with qemu-img and check the adapter against qemu's raw conversion and map.
fn qemu_roundtrip(name: &str, fmt: &str, opts: &[&str], expect_format: &str) -> Vec<Mapping> {
    let dir = tmpdir(name);
    let raw_path = dir.join("disk.raw");
    let size = 48 * MIB;
    make_raw(&raw_path, size, 0x1234_5678 ^ name.len() as u64);
    let img = dir.join(format!("disk.{fmt}"));
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-f", "raw", "-O", fmt]);
    for o in opts {
        cmd.args(["-o", o]);
    }
    run(cmd.arg(&raw_path).arg(&img));
    let back = dir.join("back.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", fmt, "-O", "raw"])
        .arg(&img)
        .arg(&back));
    let oracle = std::fs::read(&back).unwrap();
    let d = open_file(&img).unwrap();
    let info = d.info();
    assert_eq!(info.format, expect_format);
    assert_eq!(info.virtual_size, oracle.len() as u64);
    let got = read_all(&d);
    assert!(
        got == oracle,
        "{name}: virtual disk differs from qemu's raw"
    );
    let file = std::fs::read(&img).unwrap();
    let maps = check_locate(&d, &file, &oracle);
    let ext = check_extents(&d, &oracle);
    // Data coverage agrees with qemu's at 1 MiB granularity (the smallest VHDX block). qemu's
    // VHDX driver has no block status (its map says `data` everywhere), so for VHDX ours must
    // be within qemu's; that every non-data byte reads as zero is checked above.
    let unit = MIB;
    let q = qemu_data_units(fmt, &img, info.virtual_size, unit);
    let ours = our_data_units(&ext, info.virtual_size, unit);
    if fmt == "vpc" {
        assert_eq!(q, ours, "{name}: data coverage differs from qemu-img map");
    } else {
        assert!(
            q.iter().zip(&ours).all(|(q, o)| *q || !*o),
            "{name}: data where qemu has none"
        );
        assert!(ours.iter().any(|o| !o), "{name}: no hole found");
    }

    // As the host opens it: the file's holes (qemu-img leaves the unwritten parts of fixed
    // disks and of allocated blocks as holes) are unallocated too, and still read as zeros.
    let h = open_host_file(&img).unwrap();
    assert!(read_all(&h) == oracle, "{name}: host-like reader");
    let h_ext = check_extents(&h, &oracle);
    let (plain_data, h_data) = (
        ranges_of(&ext, ExtentKind::Data),
        ranges_of(&h_ext, ExtentKind::Data),
    );
    assert!(
        within(&h_data, &plain_data),
        "{name}: data outside the plain data"
    );
    assert!(
        total(&h_data) < total(&plain_data),
        "{name}: no hole of the file found"
    );
    // qemu looks into a fixed VHD's file and calls its holes `zero` (with `data`): what must be
    // read is exactly its `data` and not `zero`.
    if expect_format == "vhd-fixed" {
        assert_eq!(
            h_data,
            qemu_ranges(fmt, &img, |data, zero| data && !zero),
            "{name}: data differs from qemu's data-and-not-zero"
        );
    }
    // The opened file is `Source` whatever its id.
    assert_eq!(h.locate(0, info.virtual_size).unwrap(), maps);
    let _ = std::fs::remove_dir_all(&dir);
    maps
}

// ---------------------------------------------------------------- qemu-made fixtures

#[test]
fn vhdx_dynamic_default_block_size() {
    let maps = qemu_roundtrip("vhdx-dyn", "vhdx", &[], "vhdx-dynamic");
    assert!(
        maps.iter()
            .any(|m| matches!(m.location, Location::Source(_)))
    );
    assert!(maps.iter().any(|m| m.location == Location::Zero));
    assert!(!maps.iter().any(|m| m.location == Location::Adapter));
}

#[test]
fn vhdx_dynamic_1m_blocks_and_small_log() {
    qemu_roundtrip(
        "vhdx-1m",
        "vhdx",
        &["block_size=1M", "log_size=1M"],
        "vhdx-dynamic",
    );
}

#[test]
fn vhdx_fixed() {
    let maps = qemu_roundtrip("vhdx-fixed", "vhdx", &["subformat=fixed"], "vhdx-fixed");
    // qemu marks all-zero blocks of a fixed VHDX as ZERO (its `block_state_zero` default).
    assert!(
        maps.iter().all(|m| m.location != Location::Adapter),
        "{maps:?}"
    );
    assert_eq!(
        maps.iter()
            .filter(|m| matches!(m.location, Location::Source(_)))
            .count(),
        1,
        "{maps:?}"
    );
}

#[test]
fn vhd_fixed() {
    let maps = qemu_roundtrip(
        "vhd-fixed",
        "vpc",
        &["subformat=fixed,force_size=on"],
        "vhd-fixed",
    );
    assert_eq!(maps.len(), 1);
    assert_eq!(maps[0].location, Location::Source(0));
}

#[test]
fn vhd_dynamic() {
    let maps = qemu_roundtrip(
        "vhd-dyn",
        "vpc",
        &["subformat=dynamic,force_size=on"],
        "vhd-dynamic",
    );
    assert!(
        maps.iter()
            .any(|m| matches!(m.location, Location::Source(_)))
    );
}

#[test]
fn probe_and_info() {
    assert_eq!(HyperV::info().name, "hyperv");
    assert_eq!(HyperV::info().formats, vec!["vhdx", "vhd"]);
    assert!(HyperV::probe(b"vhdxfile\0\0"));
    assert!(HyperV::probe(b"conectix"));
    assert!(!HyperV::probe(b"KDMV"));
    assert!(!HyperV::probe(&[0u8; 65536]));
    let dir = tmpdir("probe");
    let raw = dir.join("d.raw");
    std::fs::write(&raw, vec![0u8; 8 * MIB as usize]).unwrap();
    for (fmt, sub, probe) in [
        ("vhdx", "subformat=dynamic", true),
        ("vpc", "subformat=dynamic", true),
        ("vpc", "subformat=fixed", false),
    ] {
        let img = dir.join(format!("d-{fmt}-{sub}"));
        run(Command::new("qemu-img")
            .args(["convert", "-O", fmt, "-o", sub])
            .arg(&raw)
            .arg(&img));
        let bytes = std::fs::read(&img).unwrap();
        assert_eq!(
            HyperV::probe(&bytes[..bytes.len().min(65536)]),
            probe,
            "{fmt} {sub}"
        );
        // A fixed VHD is opened all the same.
        let d = open_file(&img).unwrap();
        assert_eq!(d.info().parent, None);
        assert!(d.info().disk_id.unwrap().len() == 36);
        assert_eq!(d.info().logical_sector_size, 512);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn read_and_range_checks() {
    let d = open_bytes("t.vhdx", build_vhdx(&VhdxSpec::new(2 * MIB))).unwrap();
    assert!(matches!(
        d.read(2 * MIB - 512, 1024),
        Err(Error::OutOfRange(_))
    ));
    assert!(matches!(
        d.read(0, (4 << 20) + 1),
        Err(Error::OutOfRange(_))
    ));
    assert!(matches!(d.extents(MIB, 2 * MIB), Err(Error::OutOfRange(_))));
    assert!(matches!(d.locate(u64::MAX, 2), Err(Error::OutOfRange(_))));
    assert_eq!(d.read(2 * MIB - 512, 512).unwrap(), vec![0u8; 512]);
    assert_eq!(
        d.extents(0, 2 * MIB).unwrap(),
        vec![Extent::new(0, 2 * MIB, ExtentKind::Unallocated)]
    );
}

// ---------------------------------------------------------------- hand-built VHDX

/// What to build a VHDX from.
#[derive(Clone)]
struct VhdxSpec {
    virtual_size: u64,
    block_size: u64,
    lss: u32,
    pss: u32,
    disk_id: [u8; 16],
    dwg: [u8; 16],
    leave_allocated: bool,
    parent: Option<Vec<(&'static str, String)>>,
    /// Payload blocks: block index, state, content (block_size bytes) when present.
    blocks: Vec<(u64, u64, Option<Vec<u8>>)>,
    /// Per-sector bits of partially present blocks.
    partial: Vec<(u64, Vec<bool>)>,
    /// Offsets of the metadata region, BAT and first payload byte.
    meta_off: u64,
    bat_off: u64,
    data_off: u64,
    /// Log GUID and log bytes (1 MiB at 3 MiB).
    log: Option<([u8; 16], Vec<u8>)>,
    /// Extra file length (for log writes past the payload).
    min_len: u64,
}

impl VhdxSpec {
    fn new(virtual_size: u64) -> Self {
        VhdxSpec {
            virtual_size,
            block_size: MIB,
            lss: 512,
            pss: 4096,
            disk_id: [0x11; 16],
            dwg: [0x22; 16],
            leave_allocated: false,
            parent: None,
            blocks: Vec::new(),
            partial: Vec::new(),
            meta_off: MIB,
            bat_off: 2 * MIB,
            data_off: 4 * MIB,
            log: None,
            min_len: 0,
        }
    }
    fn tiny(virtual_size: u64) -> Self {
        VhdxSpec {
            meta_off: 320 * KIB,
            bat_off: 448 * KIB,
            data_off: MIB,
            ..Self::new(virtual_size)
        }
    }
}

fn put(buf: &mut Vec<u8>, at: u64, b: &[u8]) {
    let at = at as usize;
    if buf.len() < at + b.len() {
        buf.resize(at + b.len(), 0);
    }
    buf[at..at + b.len()].copy_from_slice(b);
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn build_vhdx(s: &VhdxSpec) -> Vec<u8> {
    let mut f = vec![0u8; (s.bat_off + if s.bat_off < MIB { 64 * KIB } else { MIB }) as usize];
    put(&mut f, 0, b"vhdxfile");
    put(&mut f, 8, &utf16le("ferry test"));
    // Headers: the second has a lower sequence number.
    for (i, at) in [(0u64, 64 * KIB), (1, 128 * KIB)] {
        let mut h = vec![0u8; 4096];
        h[..4].copy_from_slice(b"head");
        h[8..16].copy_from_slice(&(10 - i).to_le_bytes());
        h[16..32].copy_from_slice(&[0x33; 16]);
        h[32..48].copy_from_slice(&s.dwg);
        if let Some((g, _)) = &s.log {
            h[48..64].copy_from_slice(g);
        }
        h[66..68].copy_from_slice(&1u16.to_le_bytes());
        h[68..72].copy_from_slice(&(MIB as u32).to_le_bytes());
        h[72..80].copy_from_slice(&(3 * MIB).to_le_bytes());
        let c = crc32c_without(&h, 4);
        h[4..8].copy_from_slice(&c.to_le_bytes());
        put(&mut f, at, &h);
    }
    // Region tables.
    let mut r = vec![0u8; 64 * KIB as usize];
    r[..4].copy_from_slice(b"regi");
    r[8..12].copy_from_slice(&2u32.to_le_bytes());
    let meta_len = if s.meta_off < MIB { 128 * KIB } else { MIB };
    let bat_len = if s.bat_off < MIB { 64 * KIB } else { MIB };
    for (i, (g, off, len)) in [
        (BAT_GUID, s.bat_off, bat_len),
        (METADATA_GUID, s.meta_off, meta_len),
    ]
    .into_iter()
    .enumerate()
    {
        let e = 16 + 32 * i;
        r[e..e + 16].copy_from_slice(&g);
        r[e + 16..e + 24].copy_from_slice(&off.to_le_bytes());
        r[e + 24..e + 28].copy_from_slice(&(len as u32).to_le_bytes());
        r[e + 28..e + 32].copy_from_slice(&1u32.to_le_bytes());
    }
    let c = crc32c_without(&r, 4);
    r[4..8].copy_from_slice(&c.to_le_bytes());
    put(&mut f, 192 * KIB, &r);
    put(&mut f, 256 * KIB, &r);
    // Metadata.
    let mut fp = (s.block_size as u32).to_le_bytes().to_vec();
    let flags = u32::from(s.leave_allocated) | if s.parent.is_some() { 2 } else { 0 };
    fp.extend(flags.to_le_bytes());
    let mut items: Vec<([u8; 16], Vec<u8>)> = vec![
        (FILE_PARAMETERS, fp),
        (VIRTUAL_DISK_SIZE, s.virtual_size.to_le_bytes().to_vec()),
        (VIRTUAL_DISK_ID, s.disk_id.to_vec()),
        (LOGICAL_SECTOR_SIZE, s.lss.to_le_bytes().to_vec()),
        (PHYSICAL_SECTOR_SIZE, s.pss.to_le_bytes().to_vec()),
    ];
    if let Some(kv) = &s.parent {
        let mut loc = VHDX_LOCATOR_TYPE.to_vec();
        loc.extend(0u16.to_le_bytes());
        loc.extend((kv.len() as u16).to_le_bytes());
        let mut data: Vec<u8> = Vec::new();
        let base = 20 + 12 * kv.len();
        let mut entries = Vec::new();
        for (k, v) in kv {
            let (k, v) = (utf16le(k), utf16le(v));
            let ko = base + data.len();
            data.extend(&k);
            let vo = base + data.len();
            data.extend(&v);
            entries.extend((ko as u32).to_le_bytes());
            entries.extend((vo as u32).to_le_bytes());
            entries.extend((k.len() as u16).to_le_bytes());
            entries.extend((v.len() as u16).to_le_bytes());
        }
        loc.extend(entries);
        loc.extend(data);
        items.push((PARENT_LOCATOR, loc));
    }
    let mut t = vec![0u8; 64 * KIB as usize];
    t[..8].copy_from_slice(b"metadata");
    t[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
    let mut off = 64 * KIB;
    for (i, (id, data)) in items.iter().enumerate() {
        let e = 32 + 32 * i;
        t[e..e + 16].copy_from_slice(id);
        t[e + 16..e + 20].copy_from_slice(&(off as u32).to_le_bytes());
        t[e + 20..e + 24].copy_from_slice(&(data.len() as u32).to_le_bytes());
        t[e + 24..e + 28].copy_from_slice(&6u32.to_le_bytes());
        put(&mut f, s.meta_off + off, data);
        off += 4 * KIB;
    }
    put(&mut f, s.meta_off, &t);
    // Payload and BAT.
    let cr = ((1u64 << 23) * u64::from(s.lss)) / s.block_size;
    let mut next = s.data_off;
    let mut bat: Vec<(usize, u64)> = Vec::new();
    for (b, state, data) in &s.blocks {
        let mut e = *state;
        if let Some(d) = data {
            assert_eq!(d.len() as u64, s.block_size);
            put(&mut f, next, d);
            e |= (next >> 20) << 20;
            next += s.block_size;
        }
        bat.push(((b + b / cr) as usize, e));
    }
    let mut bitmaps: std::collections::BTreeMap<u64, Vec<u8>> = Default::default();
    for (b, bits) in &s.partial {
        let chunk = b / cr;
        let bm = bitmaps
            .entry(chunk)
            .or_insert_with(|| vec![0u8; MIB as usize]);
        let first = (b % cr) * (s.block_size / u64::from(s.lss));
        for (i, &set) in bits.iter().enumerate() {
            let bit = first + i as u64;
            if set {
                bm[(bit / 8) as usize] |= 1 << (bit % 8);
            }
        }
    }
    for (chunk, bm) in bitmaps {
        put(&mut f, next, &bm);
        bat.push((
            (chunk * (cr + 1) + cr) as usize,
            SB_PRESENT | ((next >> 20) << 20),
        ));
        next += MIB;
    }
    for (i, e) in bat {
        put(&mut f, s.bat_off + 8 * i as u64, &e.to_le_bytes());
    }
    if let Some((_, log)) = &s.log {
        put(&mut f, 3 * MIB, log);
    }
    if (f.len() as u64) < s.min_len {
        f.resize(s.min_len as usize, 0);
    }
    f
}

/// The DataWriteGuid of a VHDX file (from the header with the higher sequence number).
fn data_write_guid(file: &[u8]) -> String {
    let h1 = &file[64 * KIB as usize..];
    let h2 = &file[128 * KIB as usize..];
    let seq = |h: &[u8]| u64::from_le_bytes(h[8..16].try_into().unwrap());
    let h = if seq(h1) >= seq(h2) { h1 } else { h2 };
    common::guid_le(&h[32..48].try_into().unwrap())
}

fn pattern(n: u64, seed: u64) -> Vec<u8> {
    Rng(seed | 1).bytes(n as usize)
}

#[test]
fn vhdx_differencing_over_a_qemu_parent() {
    testing::reset();
    let dir = tmpdir("vhdx-diff");
    let raw = dir.join("base.raw");
    let base_raw = make_raw(&raw, 8 * MIB, 7);
    let base = dir.join("base.vhdx");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "vhdx", "-o", "block_size=1M"])
        .arg(&raw)
        .arg(&base));
    let base_bytes = std::fs::read(&base).unwrap();
    testing::add_related("base.vhdx", Named::new("base.vhdx", base_bytes.clone()));
    // Child: block 1 full, block 3 zero, block 5 partial (first half child, one sector set in
    // the second half), others from the parent.
    let mut spec = VhdxSpec::new(8 * MIB);
    spec.parent = Some(vec![
        (
            "parent_linkage",
            format!("{{{}}}", data_write_guid(&base_bytes).to_uppercase()),
        ),
        ("relative_path", ".\\base.vhdx".to_owned()),
        ("absolute_win32_path", "C:\\vms\\base.vhdx".to_owned()),
    ]);
    let b1 = pattern(MIB, 1);
    let b5 = pattern(MIB, 5);
    spec.blocks = vec![
        (1, PAYLOAD_FULLY_PRESENT, Some(b1.clone())),
        (3, PAYLOAD_ZERO, None),
        (5, PAYLOAD_PARTIALLY_PRESENT, Some(b5.clone())),
    ];
    let sectors = (MIB / 512) as usize;
    let mut bits = vec![false; sectors];
    bits[..sectors / 2].fill(true);
    bits[sectors - 3] = true;
    spec.partial = vec![(5, bits.clone())];
    let child = build_vhdx(&spec);
    let mut expect = base_raw.clone();
    expect[MIB as usize..2 * MIB as usize].copy_from_slice(&b1);
    expect[3 * MIB as usize..4 * MIB as usize].fill(0);
    for (i, &set) in bits.iter().enumerate() {
        if set {
            let at = 5 * MIB as usize + i * 512;
            expect[at..at + 512].copy_from_slice(&b5[i * 512..i * 512 + 512]);
        }
    }
    let d = open_bytes("child.vhdx", child.clone()).unwrap();
    let info = d.info();
    assert_eq!(info.format, "vhdx-differencing");
    assert_eq!(info.parent.as_deref(), Some("base.vhdx"));
    assert_eq!(
        info.disk_id.as_deref(),
        Some("11111111-1111-1111-1111-111111111111")
    );
    assert!(read_all(&d) == expect);
    let maps = check_locate(&d, &child, &expect);
    // Block 1 is in the child file, block 5's first half too; parent ranges go through `read`.
    assert!(maps.contains(&Mapping {
        offset: MIB,
        length: MIB,
        location: Location::Source(4 * MIB)
    }));
    assert!(maps.iter().any(|m| m.offset == 5 * MIB
        && m.length == MIB / 2
        && m.location == Location::Source(5 * MIB)));
    assert!(maps.iter().any(|m| m.location == Location::Adapter));
    let ext = check_extents(&d, &expect);
    assert!(ext.contains(&Extent::new(3 * MIB, MIB, ExtentKind::Zero)));
    // Parent's unallocated blocks stay unallocated through the child.
    let base_d = open_bytes("base.vhdx", base_bytes.clone()).unwrap();
    let base_ext = base_d.extents(0, 8 * MIB).unwrap();
    for e in base_ext
        .iter()
        .filter(|e| e.kind == ExtentKind::Unallocated)
    {
        if e.end() <= MIB || e.offset >= 6 * MIB {
            let sub = d.extents(e.offset, e.length).unwrap();
            assert_eq!(sub, vec![*e]);
        }
    }

    // A wrong linkage names both GUIDs.
    let mut bad = spec.clone();
    bad.parent = Some(vec![
        (
            "parent_linkage",
            "{00000000-0000-0000-0000-000000000001}".to_owned(),
        ),
        ("relative_path", "base.vhdx".to_owned()),
    ]);
    let e = open_bytes("child.vhdx", build_vhdx(&bad))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("parent_linkage 00000000-0000-0000-0000-000000000001")
            && e.contains(&data_write_guid(&base_bytes)),
        "{e}"
    );
    // Bad parent paths.
    for (path, why) in [
        ("..\\base.vhdx", ".."),
        ("C:\\vms\\base.vhdx", "absolute"),
        ("\\\\srv\\share\\base.vhdx", "absolute"),
    ] {
        let mut bad = spec.clone();
        bad.parent = Some(vec![("relative_path", path.to_owned())]);
        let e = open_bytes("child.vhdx", build_vhdx(&bad)).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        assert!(
            e.to_string().contains("relative_path") && e.to_string().contains(why),
            "{e}"
        );
    }
    // A missing parent.
    testing::reset();
    let e = open_bytes("child.vhdx", child).unwrap_err().to_string();
    assert!(e.contains("opening parent `base.vhdx`"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The host ids `Related` mappings name.
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

#[test]
fn parents_with_host_ids_are_related_locations() {
    testing::reset();
    let dir = tmpdir("related");
    // VHDX: base (qemu) <- mid (block 1, half of block 5) <- top (block 2).
    let raw = dir.join("base.raw");
    let base_raw = make_raw(&raw, 8 * MIB, 7);
    let base = dir.join("base.vhdx");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "vhdx", "-o", "block_size=1M"])
        .arg(&raw)
        .arg(&base));
    let base_bytes = std::fs::read(&base).unwrap();
    testing::add_related(
        "base.vhdx",
        HostLike::new(Named::new("base.vhdx", base_bytes.clone()), Some(5)),
    );
    let mut mid = VhdxSpec::new(8 * MIB);
    mid.parent = Some(vec![
        ("parent_linkage", data_write_guid(&base_bytes)),
        ("relative_path", "base.vhdx".to_owned()),
    ]);
    let (b1, b5) = (pattern(MIB, 41), pattern(MIB, 45));
    mid.blocks = vec![
        (1, PAYLOAD_FULLY_PRESENT, Some(b1.clone())),
        (5, PAYLOAD_PARTIALLY_PRESENT, Some(b5.clone())),
    ];
    let sectors = (MIB / 512) as usize;
    let mut bits = vec![false; sectors];
    bits[..sectors / 2].fill(true);
    mid.partial = vec![(5, bits)];
    let mid_bytes = build_vhdx(&mid);
    testing::add_related(
        "mid.vhdx",
        HostLike::new(Named::new("mid.vhdx", mid_bytes.clone()), Some(6)),
    );
    let mut top = VhdxSpec::new(8 * MIB);
    top.disk_id = [0x44; 16];
    top.dwg = [0x55; 16];
    top.parent = Some(vec![
        ("parent_linkage", common::guid_le(&[0x22; 16])),
        ("relative_path", "mid.vhdx".to_owned()),
    ]);
    let b2 = pattern(MIB, 42);
    top.blocks = vec![(2, PAYLOAD_FULLY_PRESENT, Some(b2.clone()))];
    let top_bytes = build_vhdx(&top);
    let d = open_bytes("top.vhdx", top_bytes.clone()).unwrap();
    let mut expect = base_raw;
    let m = MIB as usize;
    expect[m..2 * m].copy_from_slice(&b1);
    expect[2 * m..3 * m].copy_from_slice(&b2);
    expect[5 * m..5 * m + m / 2].copy_from_slice(&b5[..m / 2]);
    assert!(read_all(&d) == expect);
    let maps = check_locate_in(
        &d,
        &top_bytes,
        &[(5, &base_bytes), (6, &mid_bytes)],
        &expect,
    );
    // Nothing goes through `read`: the top file is `Source`, its parents `Related`.
    assert!(
        maps.iter().all(|m| m.location != Location::Adapter),
        "{maps:?}"
    );
    assert_eq!(readers(&maps), vec![5, 6]);
    for want in [
        Mapping {
            offset: MIB,
            length: MIB,
            location: Location::Related {
                reader: 6,
                offset: 4 * MIB,
            },
        },
        Mapping {
            offset: 2 * MIB,
            length: MIB,
            location: Location::Source(4 * MIB),
        },
        Mapping {
            offset: 5 * MIB,
            length: MIB / 2,
            location: Location::Related {
                reader: 6,
                offset: 5 * MIB,
            },
        },
    ] {
        assert!(maps.contains(&want), "{want:?} not in {maps:?}");
    }
    // The second half of block 5 comes from the base.
    let tail = d.locate(5 * MIB + MIB / 2, 4096).unwrap();
    assert!(
        matches!(
            tail[..],
            [Mapping {
                location: Location::Related { reader: 5, .. },
                ..
            }]
        ),
        "{tail:?}"
    );
    // A sub-range inside a parent's run starts at the right offset.
    assert_eq!(
        d.locate(MIB + 1000, 5000).unwrap(),
        vec![Mapping {
            offset: MIB + 1000,
            length: 5000,
            location: Location::Related {
                reader: 6,
                offset: 4 * MIB + 1000,
            },
        }]
    );

    // VHD: a differencing child (sectors 0..8 and 100 of block 1) over a qemu dynamic parent.
    testing::reset();
    let base = dir.join("base.vhd");
    run(Command::new("qemu-img")
        .args([
            "convert",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
        ])
        .arg(&raw)
        .arg(&base));
    let base_bytes = std::fs::read(&base).unwrap();
    let puid: [u8; 16] = base_bytes[base_bytes.len() - 512 + 68..base_bytes.len() - 512 + 84]
        .try_into()
        .unwrap();
    testing::add_related(
        "base.vhd",
        HostLike::new(Named::new("base.vhd", File::open(&base).unwrap()), Some(8)),
    );
    let bs = 2 * MIB;
    let d1 = pattern(bs, 31);
    let mut bm = vec![0u8; 512];
    bm[0] = 0xff;
    bm[100 / 8] |= 0x80 >> (100 % 8);
    let child = build_vhd(
        8 * MIB,
        bs,
        [0x66; 16],
        Some((puid, vec![(vhd::W2RU, utf16le("base.vhd"))])),
        &[(1, bm, d1.clone())],
    );
    let d = open_bytes("child.vhd", child.clone()).unwrap();
    let mut expect = read_all(&open_file(&base).unwrap());
    for s in (0..8).chain([100]) {
        let at = (bs + s * 512) as usize;
        expect[at..at + 512].copy_from_slice(&d1[s as usize * 512..(s as usize + 1) * 512]);
    }
    assert!(read_all(&d) == expect);
    let maps = check_locate_in(&d, &child, &[(8, &base_bytes)], &expect);
    assert!(
        maps.iter().all(|m| m.location != Location::Adapter),
        "{maps:?}"
    );
    assert_eq!(readers(&maps), vec![8]);
    // Sector runs of block 1 alternate between the child and the parent.
    let run = d.locate(bs, 101 * 512).unwrap();
    let kinds: Vec<(u64, bool)> = run
        .iter()
        .map(|m| (m.length / 512, matches!(m.location, Location::Source(_))))
        .collect();
    assert_eq!(kinds, vec![(8, true), (92, false), (1, true)], "{run:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fixed_vhd_holes_are_unallocated() {
    // A 16 MiB fixed VHD written as a sparse file: data at 1 MiB (8 KiB) and 9 MiB + 4 KiB
    // (4 KiB), everything else a hole.
    let dir = tmpdir("fixed-holes");
    let path = dir.join("sparse.vhd");
    let size = 16 * MIB;
    let (d1, d2) = (pattern(8 * KIB, 51), pattern(4 * KIB, 52));
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = File::create(&path).unwrap();
        f.set_len(size + 512).unwrap();
        for (at, data) in [(MIB, &d1[..]), (9 * MIB + 4 * KIB, &d2[..])] {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(data).unwrap();
        }
        f.seek(SeekFrom::Start(size)).unwrap();
        f.write_all(&vhd_footer(vhd::TYPE_FIXED, size, [7; 16], u64::MAX))
            .unwrap();
        f.sync_all().unwrap();
    }
    let reader = HostLike::new(
        Named::new("sparse.vhd", File::open(&path).unwrap()),
        Some(1),
    )
    .with_holes_of(&path);
    let queries = Rc::clone(&reader.queries);
    let d = HyperV::open(Reader::new(reader)).unwrap();
    assert_eq!(d.info().format, "vhd-fixed");
    let mut expect = vec![0u8; size as usize];
    expect[MIB as usize..(MIB + 8 * KIB) as usize].copy_from_slice(&d1);
    let at = (9 * MIB + 4 * KIB) as usize;
    expect[at..at + 4096].copy_from_slice(&d2);
    assert!(read_all(&d) == expect);
    let ext = check_extents(&d, &expect);
    // One allocation query for the whole disk.
    assert_eq!(queries.get(), 1);
    // The written ranges (on a filesystem with holes: exactly them, at 4 KiB blocks).
    let data = ranges_of(&ext, ExtentKind::Data);
    assert!(
        within(
            &[(MIB, MIB + 8 * KIB), (9 * MIB + 4 * KIB, 9 * MIB + 8 * KIB)],
            &data
        ),
        "{data:?}"
    );
    assert!(total(&data) <= 2 * MIB, "{data:?}");
    assert!(ext.iter().all(|e| e.kind != ExtentKind::Zero));
    assert_eq!(
        ext[0],
        Extent::new(0, data[0].0, ExtentKind::Unallocated),
        "{ext:?}"
    );
    // A sub-range in a hole, and one across a hole's edge.
    assert_eq!(
        d.extents(4 * MIB, MIB).unwrap(),
        vec![Extent::new(4 * MIB, MIB, ExtentKind::Unallocated)]
    );
    assert_eq!(
        d.extents(MIB + 4 * KIB, 8 * KIB).unwrap(),
        vec![
            Extent::data(MIB + 4 * KIB, 4 * KIB),
            Extent::new(MIB + 8 * KIB, 4 * KIB, ExtentKind::Unallocated)
        ]
    );
    // qemu agrees: what must be read is its `data` and not `zero`.
    assert_eq!(data, qemu_ranges("vpc", &path, |data, zero| data && !zero));
    // `locate` is one `Source` mapping (holes read as zeros there too).
    assert_eq!(
        d.locate(0, size).unwrap(),
        vec![Mapping {
            offset: 0,
            length: size,
            location: Location::Source(0)
        }]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vhdx_4k_sectors_and_partial_bitmaps() {
    testing::reset();
    let mut base = VhdxSpec::new(4 * MIB);
    base.lss = 4096;
    base.block_size = 2 * MIB;
    let p0 = pattern(2 * MIB, 9);
    base.blocks = vec![
        (0, PAYLOAD_FULLY_PRESENT, Some(p0.clone())),
        (1, PAYLOAD_FULLY_PRESENT, Some(pattern(2 * MIB, 10))),
    ];
    let base_bytes = build_vhdx(&base);
    testing::add_related("b4k.vhdx", Named::new("b4k.vhdx", base_bytes.clone()));
    let mut child = VhdxSpec::new(4 * MIB);
    child.lss = 4096;
    child.block_size = 2 * MIB;
    child.disk_id = [0x44; 16];
    child.dwg = [0x55; 16];
    child.parent = Some(vec![
        ("parent_linkage", common::guid_le(&[0x22; 16])),
        ("relative_path", "b4k.vhdx".to_owned()),
    ]);
    let c1 = pattern(2 * MIB, 11);
    child.blocks = vec![(1, PAYLOAD_PARTIALLY_PRESENT, Some(c1.clone()))];
    let bits: Vec<bool> = (0..512).map(|i| i % 3 == 0).collect();
    child.partial = vec![(1, bits.clone())];
    let d = open_bytes("c4k.vhdx", build_vhdx(&child)).unwrap();
    assert_eq!(
        (d.info().logical_sector_size, d.info().physical_sector_size),
        (4096, 4096)
    );
    let base_d = open_bytes("b4k.vhdx", base_bytes).unwrap();
    let mut expect = read_all(&base_d);
    for (i, &set) in bits.iter().enumerate() {
        if set {
            let at = 2 * MIB as usize + i * 4096;
            expect[at..at + 4096].copy_from_slice(&c1[i * 4096..(i + 1) * 4096]);
        }
    }
    assert!(read_all(&d) == expect);
    // Unaligned reads across the sector runs.
    assert_eq!(
        d.read(2 * MIB + 1000, 20000).unwrap(),
        expect[(2 * MIB + 1000) as usize..(2 * MIB + 21000) as usize]
    );
    let maps = d.locate(2 * MIB, 16 * KIB).unwrap();
    assert_eq!(maps.len(), 3);
    assert_eq!(maps[0].length, 4096);
    assert!(matches!(maps[0].location, Location::Source(_)));
    assert_eq!(
        maps[1],
        Mapping {
            offset: 2 * MIB + 4096,
            length: 8192,
            location: Location::Adapter
        }
    );
}

/// One log entry at `pos` of the log: data pages and zero ranges.
fn log_entry(
    guid: &[u8; 16],
    seq: u64,
    tail: u32,
    pages: &[(u64, Vec<u8>)],
    zeros: &[(u64, u64)],
    last: u64,
) -> Vec<u8> {
    let count = pages.len() + zeros.len();
    let desc_sectors = (64 + 32 * count).div_ceil(4096);
    let len = (desc_sectors + pages.len()) * 4096;
    let mut e = vec![0u8; len];
    e[..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    e[12..16].copy_from_slice(&tail.to_le_bytes());
    e[16..24].copy_from_slice(&seq.to_le_bytes());
    e[24..28].copy_from_slice(&(count as u32).to_le_bytes());
    e[32..48].copy_from_slice(guid);
    e[48..56].copy_from_slice(&last.to_le_bytes());
    e[56..64].copy_from_slice(&last.to_le_bytes());
    let mut d = 64;
    for (fo, n) in zeros {
        e[d..d + 4].copy_from_slice(b"zero");
        e[d + 8..d + 16].copy_from_slice(&n.to_le_bytes());
        e[d + 16..d + 24].copy_from_slice(&fo.to_le_bytes());
        e[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
        d += 32;
    }
    for (i, (fo, page)) in pages.iter().enumerate() {
        e[d..d + 4].copy_from_slice(b"desc");
        e[d + 4..d + 8].copy_from_slice(&page[4092..]);
        e[d + 8..d + 16].copy_from_slice(&page[..8]);
        e[d + 16..d + 24].copy_from_slice(&fo.to_le_bytes());
        e[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
        d += 32;
        let s = (desc_sectors + i) * 4096;
        e[s..s + 4].copy_from_slice(b"data");
        e[s + 4..s + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
        e[s + 8..s + 4092].copy_from_slice(&page[8..4092]);
        e[s + 4092..s + 4096].copy_from_slice(&(seq as u32).to_le_bytes());
    }
    let c = crc32c(&e);
    e[4..8].copy_from_slice(&c.to_le_bytes());
    e
}

#[test]
fn vhdx_log_is_replayed() {
    let guid = [0x77u8; 16];
    let mut spec = VhdxSpec::new(4 * MIB);
    let b0 = pattern(MIB, 21);
    spec.blocks = vec![(0, PAYLOAD_FULLY_PRESENT, Some(b0.clone()))];
    spec.min_len = 6 * MIB;
    // Entry 1: make block 1 present at 5 MiB (rewrite the BAT's first page) and write a page
    // into it. Entry 2: zero the first 8 KiB of block 0.
    let mut bat_page = vec![0u8; 4096];
    bat_page[..8].copy_from_slice(&(PAYLOAD_FULLY_PRESENT | (4 * MIB)).to_le_bytes());
    bat_page[8..16].copy_from_slice(&(PAYLOAD_FULLY_PRESENT | (5 * MIB)).to_le_bytes());
    let page = pattern(4096, 22);
    let e1 = log_entry(
        &guid,
        0x1_0000_0005,
        0,
        &[(2 * MIB, bat_page), (5 * MIB + 8192, page.clone())],
        &[],
        6 * MIB,
    );
    let e2 = log_entry(&guid, 0x1_0000_0006, 0, &[], &[(4 * MIB, 8192)], 6 * MIB);
    // A stale entry of an older sequence further on, which must not be replayed.
    let stale = log_entry(
        &guid,
        3,
        3 * 4096 * 4,
        &[(4 * MIB + 65536, pattern(4096, 23))],
        &[],
        6 * MIB,
    );
    let mut log = vec![0u8; MIB as usize];
    put(&mut log, 0, &e1);
    put(&mut log, e1.len() as u64, &e2);
    put(&mut log, 3 * 4096 * 4, &stale);
    spec.log = Some((guid, log.clone()));
    let file = build_vhdx(&spec);
    let d = open_bytes("logged.vhdx", file.clone()).unwrap();
    let mut expect = vec![0u8; 4 * MIB as usize];
    expect[..MIB as usize].copy_from_slice(&b0);
    expect[..8192].fill(0);
    expect[(MIB + 8192) as usize..(MIB + 12288) as usize].copy_from_slice(&page);
    assert!(read_all(&d) == expect);
    // Only the pages the log overlays go through the adapter; the rest of the payload is the
    // file's own bytes (checked against the file).
    let maps = check_locate(&d, &file, &expect);
    let at = |offset, length, location| Mapping {
        offset,
        length,
        location,
    };
    assert_eq!(
        maps,
        vec![
            at(0, 8192, Location::Adapter),
            at(8192, MIB, Location::Source(4 * MIB + 8192)),
            at(MIB + 8192, 4096, Location::Adapter),
            at(MIB + 12288, MIB - 12288, Location::Source(5 * MIB + 12288)),
            at(2 * MIB, 2 * MIB, Location::Zero),
        ]
    );
    assert_eq!(d.extents(0, 4 * MIB).unwrap()[0], Extent::data(0, 2 * MIB));
    // A parent with a replayed log: the same pages stay `Adapter`, the rest is `Related`.
    testing::reset();
    testing::add_related(
        "logged.vhdx",
        HostLike::new(Named::new("logged.vhdx", file.clone()), Some(4)),
    );
    let mut child = VhdxSpec::new(4 * MIB);
    child.disk_id = [0x66; 16];
    child.dwg = [0x67; 16];
    child.parent = Some(vec![
        ("parent_linkage", common::guid_le(&spec.dwg)),
        ("relative_path", "logged.vhdx".to_owned()),
    ]);
    let child_bytes = build_vhdx(&child);
    let c = open_bytes("child.vhdx", child_bytes.clone()).unwrap();
    assert!(read_all(&c) == expect);
    let maps = check_locate_in(&c, &child_bytes, &[(4, &file)], &expect);
    assert_eq!(
        maps[..4],
        [
            at(0, 8192, Location::Adapter),
            at(
                8192,
                MIB,
                Location::Related {
                    reader: 4,
                    offset: 4 * MIB + 8192
                }
            ),
            at(MIB + 8192, 4096, Location::Adapter),
            at(
                MIB + 12288,
                MIB - 12288,
                Location::Related {
                    reader: 4,
                    offset: 5 * MIB + 12288
                }
            ),
        ]
    );
    testing::reset();

    // Without the log GUID the log is ignored.
    let mut plain = spec.clone();
    plain.log = None;
    let d = open_bytes("plain.vhdx", build_vhdx(&plain)).unwrap();
    assert_eq!(d.read(0, 4096).unwrap(), b0[..4096]);
    assert_eq!(d.read(MIB, 4096).unwrap(), vec![0u8; 4096]);

    // A corrupt entry (bad CRC) leaves no valid sequence: an error, not a silent misread.
    // A corrupt second entry: the active sequence is the first entry alone (its sequence
    // number is above the stale entry's).
    let mut bad_log = log.clone();
    bad_log[e1.len() + 100] ^= 1;
    let mut bad = spec.clone();
    bad.log = Some((guid, bad_log.clone()));
    let d = open_bytes("bad2.vhdx", build_vhdx(&bad)).unwrap();
    assert_eq!(d.read(0, 8192).unwrap(), b0[..8192]);
    assert_eq!(d.read(MIB + 8192, 4096).unwrap(), page);
    bad_log[100] ^= 1;
    bad_log[3 * 4096 * 4 + 100] ^= 1;
    bad.log = Some((guid, bad_log));
    let e = open_bytes("bad.vhdx", build_vhdx(&bad))
        .unwrap_err()
        .to_string();
    assert!(e.contains("log") && e.contains("no valid sequence"), "{e}");
    // A file shorter than the log's LastFileOffset is refused.
    let mut short = file.clone();
    short.truncate(5 * MIB as usize + 4096);
    assert!(
        open_bytes("short.vhdx", short)
            .unwrap_err()
            .to_string()
            .contains("LastFileOffset")
    );
}

#[test]
fn vhdx_malformed_files_are_invalid() {
    let good = {
        let mut s = VhdxSpec::new(4 * MIB);
        s.blocks = vec![(0, PAYLOAD_FULLY_PRESENT, Some(pattern(MIB, 3)))];
        s
    };
    let file = build_vhdx(&good);
    open_bytes("ok.vhdx", file.clone()).unwrap();
    let err = |name: &str, b: Vec<u8>| {
        let e = open_bytes(name, b).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        e.to_string()
    };
    // Truncated before the region tables, and before the payload.
    let e = err("t1.vhdx", file[..100 * KIB as usize].to_vec());
    assert!(e.contains("t1.vhdx") && e.contains("too small"), "{e}");
    let e = err("t2.vhdx", file[..(4 * MIB + 1000) as usize].to_vec());
    assert!(
        e.contains("t2.vhdx") && e.contains("BAT entry for block 0"),
        "{e}"
    );
    let e = err("t3.vhdx", file[..(1536 * KIB) as usize].to_vec());
    assert!(
        e.contains("region") && e.contains("outside the file"),
        "{e}"
    );
    // Both headers corrupt.
    let mut b = file.clone();
    b[64 * KIB as usize + 100] ^= 1;
    b[128 * KIB as usize + 100] ^= 1;
    assert!(err("h.vhdx", b).contains("no valid header"));
    // One header corrupt: the other is used.
    let mut b = file.clone();
    b[64 * KIB as usize + 100] ^= 1;
    open_bytes("h1.vhdx", b).unwrap();
    // A BAT entry past the end of the file.
    let mut s = good.clone();
    s.blocks.push((2, PAYLOAD_FULLY_PRESENT, None));
    let mut b = build_vhdx(&s);
    put(
        &mut b,
        2 * MIB + 16,
        &(PAYLOAD_FULLY_PRESENT | (100 * MIB)).to_le_bytes(),
    );
    let e = err("bat.vhdx", b);
    assert!(
        e.contains("BAT entry for block 2") && e.contains("past the end"),
        "{e}"
    );
    // A huge virtual size, a bad block size, a bad sector size.
    let mut s = good.clone();
    s.virtual_size = 65 << 40;
    assert!(err("big.vhdx", build_vhdx(&s)).contains("virtual disk size"));
    let mut s = good.clone();
    s.block_size = 512 * KIB;
    s.blocks.clear();
    let e = err("bs.vhdx", build_vhdx(&s));
    assert!(e.contains("block size"), "{e}");
    let mut s = good.clone();
    s.lss = 1024;
    assert!(err("ss.vhdx", build_vhdx(&s)).contains("logical sector size"));
    // A BAT smaller than the disk needs (32 GiB of 1 MiB blocks in a 1 MiB BAT region).
    let mut s = good.clone();
    s.virtual_size = 256 << 30;
    assert!(err("batsz.vhdx", build_vhdx(&s)).contains("BAT region"));
    // Partially present without a parent.
    let mut s = good.clone();
    s.blocks[0].1 = PAYLOAD_PARTIALLY_PRESENT;
    assert!(err("pp.vhdx", build_vhdx(&s)).contains("PARTIALLY_PRESENT"));
}

#[test]
fn parent_loops_and_depth_are_invalid() {
    testing::reset();
    // a.vhdx's parent is b.vhdx, whose parent is a.vhdx.
    let mut a = VhdxSpec::new(2 * MIB);
    a.dwg = [0xaa; 16];
    a.parent = Some(vec![
        ("parent_linkage", common::guid_le(&[0xbb; 16])),
        ("relative_path", "b.vhdx".into()),
    ]);
    let mut b = VhdxSpec::new(2 * MIB);
    b.dwg = [0xbb; 16];
    b.parent = Some(vec![
        ("parent_linkage", common::guid_le(&[0xaa; 16])),
        ("relative_path", "a.vhdx".into()),
    ]);
    let (a, b) = (build_vhdx(&a), build_vhdx(&b));
    testing::add_related("a.vhdx", Named::new("a.vhdx", a.clone()));
    testing::add_related("b.vhdx", Named::new("b.vhdx", b));
    let e = open_bytes("a.vhdx", a).unwrap_err();
    assert!(matches!(e, Error::Invalid(_)));
    assert!(
        e.to_string().contains("loops: a.vhdx -> b.vhdx -> a.vhdx"),
        "{e}"
    );

    // A chain of 20 distinct files is cut at 16.
    testing::reset();
    let mut top = None;
    for i in 0..20u8 {
        let mut s = VhdxSpec::new(2 * MIB);
        s.dwg = [i + 1; 16];
        s.disk_id = [i + 1; 16];
        s.parent = Some(vec![
            ("parent_linkage", common::guid_le(&[i + 2; 16])),
            ("relative_path", format!("d{}.vhdx", i + 1)),
        ]);
        let f = build_vhdx(&s);
        testing::add_related(
            format!("d{i}.vhdx"),
            Named::new(format!("d{i}.vhdx"), f.clone()),
        );
        if i == 0 {
            top = Some(f);
        }
    }
    let e = open_bytes("d0.vhdx", top.unwrap()).unwrap_err().to_string();
    assert!(e.contains("deeper than 16"), "{e}");
}

// ---------------------------------------------------------------- hand-built VHD

fn vhd_footer(disk_type: u32, size: u64, uid: [u8; 16], data_offset: u64) -> Vec<u8> {
    let mut f = vec![0u8; 512];
    f[..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[16..24].copy_from_slice(&data_offset.to_be_bytes());
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    f[60..64].copy_from_slice(&disk_type.to_be_bytes());
    f[68..84].copy_from_slice(&uid);
    let c = vhd::checksum(&f, 64);
    f[64..68].copy_from_slice(&c.to_be_bytes());
    f
}

/// A parent unique id and parent locators (platform code, data).
type VhdParent = ([u8; 16], Vec<(u32, Vec<u8>)>);

/// A dynamic (or, with `parent`, differencing) VHD. Blocks: index, bitmap, data.
fn build_vhd(
    size: u64,
    bs: u64,
    uid: [u8; 16],
    parent: Option<VhdParent>,
    blocks: &[(u64, Vec<u8>, Vec<u8>)],
) -> Vec<u8> {
    let entries = size.div_ceil(bs);
    let disk_type = if parent.is_some() {
        vhd::TYPE_DIFFERENCING
    } else {
        vhd::TYPE_DYNAMIC
    };
    let footer = vhd_footer(disk_type, size, uid, 512);
    let mut f = footer.clone();
    let mut h = vec![0u8; 1024];
    h[..8].copy_from_slice(b"cxsparse");
    h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    h[16..24].copy_from_slice(&1536u64.to_be_bytes());
    h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    h[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
    h[32..36].copy_from_slice(&(bs as u32).to_be_bytes());
    let bat_end = 1536 + (entries * 4).div_ceil(512) * 512;
    let mut next = bat_end;
    let mut tail = Vec::new();
    if let Some((puid, locs)) = &parent {
        h[40..56].copy_from_slice(puid);
        for (i, (code, data)) in locs.iter().enumerate() {
            let e = 576 + 24 * i;
            h[e..e + 4].copy_from_slice(&code.to_be_bytes());
            h[e + 4..e + 8].copy_from_slice(&1u32.to_be_bytes());
            h[e + 8..e + 12].copy_from_slice(&(data.len() as u32).to_be_bytes());
            h[e + 16..e + 24].copy_from_slice(&next.to_be_bytes());
            tail.push((next, data.clone()));
            next += data.len().div_ceil(512) as u64 * 512;
        }
    }
    let c = vhd::checksum(&h, 36);
    h[36..40].copy_from_slice(&c.to_be_bytes());
    put(&mut f, 512, &h);
    let mut bat = vec![0xffu8; (bat_end - 1536) as usize];
    for (at, data) in tail {
        put(&mut f, at, &data);
    }
    let bitmap_size = (bs / 512 / 8).div_ceil(512) * 512;
    for (b, bitmap, data) in blocks {
        put(&mut bat, b * 4, &((next / 512) as u32).to_be_bytes());
        let mut bm = bitmap.clone();
        bm.resize(bitmap_size as usize, 0);
        put(&mut f, next, &bm);
        put(&mut f, next + bitmap_size, data);
        next += bitmap_size + bs;
    }
    put(&mut f, 1536, &bat);
    f.resize(next as usize, 0);
    f.extend(&footer);
    f
}

#[test]
fn vhd_differencing_over_a_qemu_parent() {
    testing::reset();
    let dir = tmpdir("vhd-diff");
    let raw = dir.join("base.raw");
    make_raw(&raw, 8 * MIB, 99);
    let base = dir.join("base.vhd");
    run(Command::new("qemu-img")
        .args([
            "convert",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
        ])
        .arg(&raw)
        .arg(&base));
    let base_bytes = std::fs::read(&base).unwrap();
    let puid: [u8; 16] = base_bytes[base_bytes.len() - 512 + 68..base_bytes.len() - 512 + 84]
        .try_into()
        .unwrap();
    testing::add_related(
        "base.vhd",
        Named::new("base.vhd", File::open(&base).unwrap()),
    );
    let oracle = read_all(&open_file(&base).unwrap());
    let bs = 2 * MIB;
    let d1 = pattern(bs, 31);
    // Block 1: sectors 0..8 and 100 in the child.
    let mut bm = vec![0u8; 512];
    bm[0] = 0xff;
    bm[100 / 8] |= 0x80 >> (100 % 8);
    let locs = vec![
        (vhd::W2RU, utf16le(".\\base.vhd")),
        (vhd::W2KU, utf16le("C:\\vms\\base.vhd")),
    ];
    let child = build_vhd(
        8 * MIB,
        bs,
        [0x66; 16],
        Some((puid, locs)),
        &[(1, bm, d1.clone())],
    );
    let d = open_bytes("child.vhd", child.clone()).unwrap();
    assert_eq!(d.info().format, "vhd-differencing");
    assert_eq!(d.info().parent.as_deref(), Some("base.vhd"));
    let mut expect = oracle.clone();
    for s in (0..8).chain([100]) {
        let at = (bs + s * 512) as usize;
        expect[at..at + 512].copy_from_slice(&d1[s as usize * 512..(s as usize + 1) * 512]);
    }
    assert!(read_all(&d) == expect);
    let maps = check_locate(&d, &child, &expect);
    assert!(
        maps.iter().any(|m| m.offset == bs
            && m.length == 4096
            && matches!(m.location, Location::Source(_)))
    );
    check_extents(&d, &expect);

    // Parent unique id mismatch names both ids.
    let bad = build_vhd(
        8 * MIB,
        bs,
        [0x66; 16],
        Some(([9; 16], vec![(vhd::W2RU, utf16le("base.vhd"))])),
        &[],
    );
    let e = open_bytes("bad.vhd", bad).unwrap_err().to_string();
    assert!(
        e.contains("09090909-0909") && e.contains(&common::uuid_be(&puid)),
        "{e}"
    );
    // `..` and absolute paths in W2ru; only W2ku (absolute) is fine; MacX as UTF-8.
    for (code, path, ok) in [
        (vhd::W2RU, utf16le("..\\base.vhd"), false),
        (vhd::W2RU, utf16le("D:\\base.vhd"), false),
        (vhd::W2KU, utf16le("D:\\x\\base.vhd"), true),
        (
            vhd::MACX,
            b"file://localhost/Users/x/base.vhd".to_vec(),
            true,
        ),
    ] {
        let f = build_vhd(
            8 * MIB,
            bs,
            [0x66; 16],
            Some((puid, vec![(code, path)])),
            &[],
        );
        let r = open_bytes("c.vhd", f);
        if ok {
            assert_eq!(r.unwrap().info().parent.as_deref(), Some("base.vhd"));
        } else {
            let e = r.unwrap_err();
            assert!(matches!(&e, Error::Invalid(m) if m.contains("W2ru")), "{e}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vhd_malformed_files_are_invalid() {
    let good = build_vhd(
        4 * MIB,
        2 * MIB,
        [1; 16],
        None,
        &[(1, vec![0xff; 512], pattern(2 * MIB, 4))],
    );
    let d = open_bytes("ok.vhd", good.clone()).unwrap();
    assert_eq!(
        d.info().disk_id.as_deref(),
        Some("01010101-0101-0101-0101-010101010101")
    );
    let err = |name: &str, b: Vec<u8>| {
        let e = open_bytes(name, b).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        e.to_string()
    };
    // Truncated: the end footer is gone, the copy at 0 points at a BAT entry past the data.
    let e = err("t.vhd", good[..good.len() - 4096].to_vec());
    assert!(
        e.contains("t.vhd") && e.contains("BAT entry for block 1"),
        "{e}"
    );
    assert!(err("t0.vhd", good[..100].to_vec()).contains("too small"));
    let mut b = good.clone();
    b[0] ^= 1;
    let n = b.len();
    b[n - 512] ^= 1;
    assert!(err("f.vhd", b).contains("no valid footer"));
    // Huge size.
    let mut b = vhd_footer(vhd::TYPE_FIXED, 65 << 40, [2; 16], u64::MAX);
    b.splice(0..0, vec![0u8; 4096]);
    assert!(err("big.vhd", b).contains("current size"));
    // Fixed disk longer than the file.
    let mut b = vec![0u8; 4096];
    b.extend(vhd_footer(vhd::TYPE_FIXED, 8192, [2; 16], u64::MAX));
    assert!(err("fx.vhd", b).contains("fixed disk"));
    // Bad block size.
    let b = build_vhd(4 * MIB, 3 * MIB, [1; 16], None, &[]);
    assert!(err("bs.vhd", b).contains("block size"));
}

#[test]
fn vhd_loop_is_invalid() {
    testing::reset();
    let a = build_vhd(
        MIB,
        MIB,
        [0xa; 16],
        Some(([0xb; 16], vec![(vhd::W2RU, utf16le("b.vhd"))])),
        &[],
    );
    let b = build_vhd(
        MIB,
        MIB,
        [0xb; 16],
        Some(([0xa; 16], vec![(vhd::W2RU, utf16le("a.vhd"))])),
        &[],
    );
    testing::add_related("a.vhd", Named::new("a.vhd", a.clone()));
    testing::add_related("b.vhd", Named::new("b.vhd", b));
    let e = open_bytes("a.vhd", a).unwrap_err().to_string();
    assert!(e.contains("loops: a.vhd -> b.vhd -> a.vhd"), "{e}");
}

// ---------------------------------------------------------------- changes and fuzzing

#[test]
fn rct_changes() {
    let d = open_bytes("t.vhdx", build_vhdx(&VhdxSpec::new(2 * MIB))).unwrap();
    let mut cs = d
        .changes(br#"[{"ByteOffset": 1048576, "ByteLength": 4096}, {"ByteOffset": 0, "ByteLength": 512}]"#)
        .unwrap();
    assert_eq!(
        cs.drain().unwrap(),
        vec![Extent::data(0, 512), Extent::data(MIB, 4096)]
    );
    let Err(e) = d.changes(br#"[{"ByteOffset": 2097152, "ByteLength": 1}]"#) else {
        panic!("accepted a range past the end")
    };
    assert!(
        matches!(&e, Error::Invalid(m) if m.contains("ByteOffset 2097152")),
        "{e}"
    );
}

#[test]
fn mutation_smoke() {
    testing::reset();
    let mut s = VhdxSpec::tiny(3 * MIB);
    s.blocks = vec![(1, PAYLOAD_ZERO, None)];
    let tiny = build_vhdx(&s);
    assert!(tiny.len() <= 512 * KIB as usize, "{}", tiny.len());
    let d = open_bytes("tiny.vhdx", tiny.clone()).unwrap();
    assert_eq!(d.extents(0, 3 * MIB).unwrap().len(), 3);
    testing::mutations(&tiny, 2000, fuzzing::vhdx);

    let mut s = VhdxSpec::tiny(2 * MIB);
    s.blocks = vec![(0, PAYLOAD_FULLY_PRESENT, Some(pattern(MIB, 8)))];
    let with_data = build_vhdx(&s);
    open_bytes("data.vhdx", with_data.clone()).unwrap();
    testing::mutations(&with_data, 300, fuzzing::vhdx);

    let vhd = build_vhd(
        64 * KIB,
        4096,
        [3; 16],
        None,
        &[
            (2, vec![0xff; 1], pattern(4096, 5)),
            (5, vec![0xff; 1], pattern(4096, 6)),
        ],
    );
    open_bytes("tiny.vhd", vhd.clone()).unwrap();
    testing::mutations(&vhd, 2000, fuzzing::vhd);
    // A differencing VHD whose parent is registered, so mutations reach the chain code.
    testing::add_related("p.vhd", Named::new("p.vhd", vhd.clone()));
    let mut bm = vec![0u8; 1];
    bm[0] = 0b1010_0000;
    let diff = build_vhd(
        64 * KIB,
        4096,
        [4; 16],
        Some(([3; 16], vec![(vhd::W2RU, utf16le("p.vhd"))])),
        &[(2, bm, pattern(4096, 7))],
    );
    open_bytes("diff.vhd", diff.clone()).unwrap();
    testing::mutations(&diff, 2000, fuzzing::vhd);

    testing::mutations(
        br#"[{"ByteOffset": 4096, "ByteLength": 512}, {"ByteOffset": 0, "ByteLength": 1}]"#,
        2000,
        fuzzing::rct,
    );
}
