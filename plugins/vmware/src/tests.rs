//! Unit tests over small images built in memory (the qemu-img fixtures are in `tests/`).
#![allow(clippy::cast_possible_truncation)] // test images are a few KiB

use super::*;
use ferry_plugin_sdk::io::{IoError, Named};
use std::cell::Cell;

const GRAIN_SECTORS: u64 = 8;
const GRAIN: usize = 4096;
const GTES: u32 = 4;

/// A sparse header.
fn header(capacity: u64, flags: u32, gd_offset: u64, desc: (u64, u64)) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[0..4].copy_from_slice(b"KDMV");
    h[4..8].copy_from_slice(&3u32.to_le_bytes());
    h[8..12].copy_from_slice(&(flags | 1).to_le_bytes());
    h[12..20].copy_from_slice(&capacity.to_le_bytes());
    h[20..28].copy_from_slice(&GRAIN_SECTORS.to_le_bytes());
    h[28..36].copy_from_slice(&desc.0.to_le_bytes());
    h[36..44].copy_from_slice(&desc.1.to_le_bytes());
    h[44..48].copy_from_slice(&GTES.to_le_bytes());
    h[56..64].copy_from_slice(&gd_offset.to_le_bytes());
    h[73..77].copy_from_slice(b"\n \r\n");
    if flags & (1 << 16) != 0 {
        h[77..79].copy_from_slice(&1u16.to_le_bytes());
    }
    h
}

fn pad(v: &mut Vec<u8>) {
    v.resize(v.len().div_ceil(512) * 512, 0);
}

const DESC: &str = "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n\
    createType=\"monolithicSparse\"\nRW 64 SPARSE \"t.vmdk\"\nddb.uuid.image=\"u-1\"\n";

/// A monolithicSparse (or, `compressed`, streamOptimized) image of 64 sectors, 4 KiB grains,
/// 4 entries per grain table; `grains` are (index, 4 KiB content), `zeros` zeroed grains.
fn build(grains: &[(u64, Vec<u8>)], zeros: &[u64], compressed: bool) -> Vec<u8> {
    let capacity = 64u64;
    let n_grains = capacity / GRAIN_SECTORS;
    let n_gts = n_grains.div_ceil(u64::from(GTES));
    let flags = if compressed {
        (1 << 16) | (1 << 17)
    } else {
        1 << 2
    };
    let mut gte = vec![0u32; n_grains as usize];
    for &z in zeros {
        gte[z as usize] = 1;
    }
    let mut img = vec![0u8; 512];
    let mut desc = DESC.as_bytes().to_vec();
    if compressed {
        desc = DESC
            .replace("monolithicSparse", "streamOptimized")
            .into_bytes();
    }
    pad(&mut desc);
    let desc_at = 1u64;
    let desc_sectors = desc.len() as u64 / 512;
    img.extend_from_slice(&desc);
    let mut gd = vec![0u32; n_gts as usize];
    if !compressed {
        // GD, then the grain tables, then the grains.
        let gd_at = img.len() as u64 / 512;
        img.extend_from_slice(&[0u8; 512]);
        let gt_at = img.len() as u64 / 512;
        img.extend(std::iter::repeat_n(0u8, 512 * n_gts as usize));
        for (i, data) in grains {
            gte[*i as usize] = u32::try_from(img.len() / 512).unwrap();
            img.extend_from_slice(data);
        }
        for t in 0..n_gts {
            gd[t as usize] = u32::try_from(gt_at + t).unwrap();
            for e in 0..u64::from(GTES) {
                let at = (gt_at + t) as usize * 512 + e as usize * 4;
                img[at..at + 4]
                    .copy_from_slice(&gte[(t * u64::from(GTES) + e) as usize].to_le_bytes());
            }
        }
        for (t, v) in gd.iter().enumerate() {
            let at = gd_at as usize * 512 + t * 4;
            img[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        img[..512].copy_from_slice(&header(capacity, flags, gd_at, (desc_at, desc_sectors)));
        return img;
    }
    for (i, data) in grains {
        gte[*i as usize] = u32::try_from(img.len() / 512).unwrap();
        let z = miniz_oxide::deflate::compress_to_vec_zlib(data, 6);
        img.extend_from_slice(&(i * GRAIN_SECTORS).to_le_bytes());
        img.extend_from_slice(&u32::try_from(z.len()).unwrap().to_le_bytes());
        img.extend_from_slice(&z);
        pad(&mut img);
    }
    for t in 0..n_gts {
        if (0..u64::from(GTES)).all(|e| gte[(t * u64::from(GTES) + e) as usize] == 0) {
            continue;
        }
        let mut m = vec![0u8; 512];
        m[0..8].copy_from_slice(&1u64.to_le_bytes());
        m[12..16].copy_from_slice(&stream::MARKER_GT.to_le_bytes());
        img.extend_from_slice(&m);
        gd[t as usize] = u32::try_from(img.len() / 512).unwrap();
        let mut table = vec![0u8; 512];
        for e in 0..GTES as usize {
            table[e * 4..e * 4 + 4]
                .copy_from_slice(&gte[t as usize * GTES as usize + e].to_le_bytes());
        }
        img.extend_from_slice(&table);
    }
    let mut m = vec![0u8; 512];
    m[0..8].copy_from_slice(&1u64.to_le_bytes());
    m[12..16].copy_from_slice(&stream::MARKER_GD.to_le_bytes());
    img.extend_from_slice(&m);
    let gd_at = img.len() as u64 / 512;
    let mut g = vec![0u8; 512];
    for (t, v) in gd.iter().enumerate() {
        g[t * 4..t * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    img.extend_from_slice(&g);
    let mut m = vec![0u8; 512];
    m[0..8].copy_from_slice(&1u64.to_le_bytes());
    m[12..16].copy_from_slice(&stream::MARKER_FOOTER.to_le_bytes());
    img.extend_from_slice(&m);
    img.extend_from_slice(&header(capacity, flags, gd_at, (desc_at, desc_sectors)));
    img.extend_from_slice(&[0u8; 512]);
    img[..512].copy_from_slice(&header(
        capacity,
        flags,
        GD_AT_END_U64,
        (desc_at, desc_sectors),
    ));
    img
}

const GD_AT_END_U64: u64 = sparse::GD_AT_END;

fn content(seed: u8) -> Vec<u8> {
    (0..GRAIN)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn open(img: Vec<u8>) -> Result<VmdkDisk, Error> {
    Vmware::open(Reader::new(Named::new("t.vmdk", img)))
}

fn expected() -> Vec<u8> {
    let mut v = vec![0u8; 64 * 512];
    v[GRAIN..2 * GRAIN].copy_from_slice(&content(1));
    v[2 * GRAIN..3 * GRAIN].copy_from_slice(&content(2));
    v[6 * GRAIN..7 * GRAIN].copy_from_slice(&content(6));
    v
}

fn sample(compressed: bool) -> Vec<u8> {
    build(
        &[(1, content(1)), (2, content(2)), (6, content(6))],
        if compressed { &[] } else { &[4] },
        compressed,
    )
}

#[test]
fn probe_and_info() {
    assert!(Vmware::probe(b"KDMV\x01"));
    assert!(Vmware::probe(b"# Disk DescriptorFile\n"));
    assert!(!Vmware::probe(b"QFI\xfb"));
    assert_eq!(Vmware::info().name, "vmware");
    assert_eq!(Vmware::info().formats, vec!["vmdk"]);
}

#[test]
fn monolithic_sparse_in_memory() {
    let img = sample(false);
    let d = open(img.clone()).unwrap();
    let info = d.info();
    assert_eq!(info.virtual_size, 64 * 512);
    assert_eq!(info.format, "vmdk-monolithic-sparse");
    assert_eq!(info.disk_id.as_deref(), Some("u-1"));
    assert_eq!(d.read(0, 64 * 512).unwrap(), expected());
    assert_eq!(
        d.read(GRAIN as u64 + 7, 5000).unwrap(),
        expected()[GRAIN + 7..GRAIN + 5007]
    );
    let g = GRAIN as u64;
    assert_eq!(
        d.extents(0, 64 * 512).unwrap(),
        vec![
            Extent::new(0, g, ExtentKind::Unallocated),
            Extent::data(g, 2 * g),
            Extent::new(3 * g, g, ExtentKind::Unallocated),
            Extent::new(4 * g, g, ExtentKind::Zero),
            Extent::new(5 * g, g, ExtentKind::Unallocated),
            Extent::data(6 * g, g),
            Extent::new(7 * g, g, ExtentKind::Unallocated),
        ]
    );
    let maps = d.locate(0, 64 * 512).unwrap();
    // Grains 1 and 2 are contiguous in the file: one mapping; zero and unallocated merge.
    assert_eq!(maps[0].location, Location::Zero);
    assert!(matches!(maps[1].location, Location::Source(_)));
    assert_eq!((maps[1].offset, maps[1].length), (g, 2 * g));
    assert_eq!(
        maps[2],
        Mapping {
            offset: 3 * g,
            length: 3 * g,
            location: Location::Zero
        }
    );
    for m in &maps {
        if let Location::Source(o) = m.location {
            assert_eq!(
                img[o as usize..(o + m.length) as usize],
                expected()[m.offset as usize..(m.offset + m.length) as usize]
            );
        }
    }
    assert!(matches!(d.read(64 * 512 - 1, 2), Err(Error::OutOfRange(_))));
    assert!(matches!(d.extents(1, 64 * 512), Err(Error::OutOfRange(_))));
}

#[test]
fn stream_optimized_in_memory() {
    let d = open(sample(true)).unwrap();
    assert_eq!(d.info().format, "vmdk-stream-optimized");
    assert_eq!(d.read(0, 64 * 512).unwrap(), expected());
    assert_eq!(
        d.read(2 * GRAIN as u64 - 3, 10).unwrap(),
        expected()[2 * GRAIN - 3..2 * GRAIN + 7]
    );
    let maps = d.locate(0, 64 * 512).unwrap();
    assert!(
        maps.iter().all(
            |m| m.location != Location::Source(0) && !matches!(m.location, Location::Source(_))
        )
    );
    assert_eq!(maps[1].location, Location::Adapter);
}

#[test]
fn a_grain_table_entry_past_eof_is_invalid() {
    let mut img = sample(false);
    // Grain table 0 is at the sector after the GD; entry 1 is grain 1.
    let d = open(img.clone()).unwrap();
    let PartKind::Sparse { extent, .. } = &d.parts[0].kind else {
        unreachable!()
    };
    let gt_sector = extent.header().gd_offset as usize + 1;
    let at = gt_sector * 512 + 4;
    img[at..at + 4].copy_from_slice(&0x00ff_ffffu32.to_le_bytes());
    let d = open(img).unwrap();
    for e in [d.read(0, 8192).unwrap_err(), d.locate(0, 8192).unwrap_err()] {
        assert!(
            matches!(&e, Error::Invalid(m) if m.contains("t.vmdk") && m.contains("grain table entry for grain 1")),
            "{e}"
        );
    }
}

#[test]
fn header_fields_are_validated() {
    let good = sample(false);
    let patch = |at: usize, bytes: &[u8]| {
        let mut img = good.clone();
        img[at..at + bytes.len()].copy_from_slice(bytes);
        open(img).unwrap_err()
    };
    let cases: Vec<(Error, &str)> = vec![
        (patch(12, &(1u64 << 40).to_le_bytes()), "capacity"),
        (patch(20, &3u64.to_le_bytes()), "grainSize"),
        (patch(20, &4096u64.to_le_bytes()), "grainSize"),
        (patch(44, &0u32.to_le_bytes()), "numGTEsPerGT"),
        (patch(4, &9u32.to_le_bytes()), "version"),
        (patch(56, &1_000_000u64.to_le_bytes()), "gdOffset"),
        (patch(36, &1000u64.to_le_bytes()), "descriptorSize"),
        (patch(73, b"\r\n"), "newline"),
    ];
    for (e, field) in cases {
        assert!(
            matches!(&e, Error::Invalid(m) if m.contains("t.vmdk") && m.contains(field)),
            "{field}: {e}"
        );
    }
    let e = open(good[..300].to_vec()).unwrap_err();
    assert!(
        matches!(&e, Error::Invalid(m) if m.contains("t.vmdk")),
        "{e}"
    );
    // A truncated stream-optimized file loses its footer.
    let s = sample(true);
    let e = open(s[..s.len() - 512].to_vec()).unwrap_err();
    assert!(
        matches!(&e, Error::Invalid(m) if m.contains("footer")),
        "{e}"
    );
}

#[test]
fn corrupt_compressed_grains_are_invalid() {
    let img = sample(true);
    // The first grain marker follows the header and the descriptor.
    let first = 512 + DESC.len().div_ceil(512) * 512;
    let mut bad_lba = img.clone();
    bad_lba[first] ^= 1;
    let e = open(bad_lba).unwrap().read(GRAIN as u64, 10).unwrap_err();
    assert!(matches!(&e, Error::Invalid(m) if m.contains("lba")), "{e}");
    let mut bad_data = img.clone();
    bad_data[first + 20] ^= 0xff;
    let e = open(bad_data).unwrap().read(GRAIN as u64, 10).unwrap_err();
    assert!(
        matches!(&e, Error::Invalid(m) if m.contains("compressed grain")),
        "{e}"
    );
    // A grain that inflates past the grain size is refused.
    let big = miniz_oxide::deflate::compress_to_vec_zlib(&vec![7u8; GRAIN + 1], 6);
    let mut framed = 8u64.to_le_bytes().to_vec();
    framed.extend_from_slice(&u32::try_from(big.len()).unwrap().to_le_bytes());
    framed.extend_from_slice(&big);
    let e = stream::inflate_grain(&framed, "x", 8, GRAIN, GRAIN).unwrap_err();
    assert!(
        matches!(&e, Error::Invalid(m) if m.contains("over 4096")),
        "{e}"
    );
}

#[test]
fn descriptor_files_refuse_unsafe_names_and_parents() {
    ferry_plugin_sdk::testing::reset();
    for (name, needle) in [
        ("/etc/passwd", "line 3"),
        ("../x", "line 3"),
        ("sub/x", "line 3"),
    ] {
        let text = format!(
            "# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"{name}\" 0\n"
        );
        let e = open(text.into_bytes()).unwrap_err();
        assert!(
            matches!(&e, Error::Invalid(m) if m.contains("t.vmdk") && m.contains(needle) && m.contains("file name")),
            "{e}"
        );
    }
    let text = "# Disk DescriptorFile\nparentCID=abcd\nparentFileNameHint=\"base.vmdk\"\nRW 8 SPARSE \"d.vmdk\"\n";
    let e = open(text.as_bytes().to_vec()).unwrap_err();
    assert!(
        matches!(&e, Error::Unsupported(m) if m.contains("differencing") && m.contains("base.vmdk")),
        "{e}"
    );
    let text = "# Disk DescriptorFile\nRW 8 FLAT \"missing-flat.vmdk\" 0\n";
    let e = open(text.as_bytes().to_vec()).unwrap_err();
    assert!(
        matches!(&e, Error::Invalid(m) if m.contains("missing-flat.vmdk")),
        "{e}"
    );
}

#[test]
fn descriptor_with_flat_zero_and_sparse_extents() {
    ferry_plugin_sdk::testing::reset();
    let flat: Vec<u8> = (0..16 * 512).map(|i| (i % 253) as u8).collect();
    ferry_plugin_sdk::testing::add_related("a-flat.vmdk", Named::new("a-flat.vmdk", flat.clone()));
    ferry_plugin_sdk::testing::add_related("b.vmdk", Named::new("b.vmdk", sample(false)));
    let text = "# Disk DescriptorFile\ncreateType=\"custom\"\nRW 8 FLAT \"a-flat.vmdk\" 4\n\
                RW 8 ZERO\nRW 64 SPARSE \"b.vmdk\"\nRW 4 FLAT \"a-flat.vmdk\"\nddb.uuid.image = \"x-y\"\n";
    let d = open(text.as_bytes().to_vec()).unwrap();
    assert_eq!(d.info().virtual_size, (8 + 8 + 64 + 4) * 512);
    assert_eq!(d.info().disk_id.as_deref(), Some("x-y"));
    let mut want = flat[4 * 512..12 * 512].to_vec();
    want.extend_from_slice(&[0u8; 8 * 512]);
    want.extend_from_slice(&expected());
    want.extend_from_slice(&flat[..4 * 512]);
    assert_eq!(d.read(0, u32::try_from(want.len()).unwrap()).unwrap(), want);
    let ext = d.extents(0, want.len() as u64).unwrap();
    assert_eq!(ext[0], Extent::data(0, 4096));
    assert_eq!(ext[1], Extent::new(4096, 4096, ExtentKind::Zero));
    // Everything is in related files: nothing is `Source`.
    assert!(
        d.locate(0, want.len() as u64)
            .unwrap()
            .iter()
            .all(|m| !matches!(m.location, Location::Source(_)))
    );
    // A flat extent larger than its file.
    let text = "# Disk DescriptorFile\nRW 100 FLAT \"a-flat.vmdk\" 0\n";
    let e = open(text.as_bytes().to_vec()).unwrap_err();
    assert!(
        matches!(&e, Error::Invalid(m) if m.contains("line 2")),
        "{e}"
    );
    ferry_plugin_sdk::testing::reset();
}

/// A reader that looks like the host's: it has a host id, and (`data: Some`) an allocation map
/// whose only allocated bytes are the `data` ranges. Counts allocation queries.
struct HostLike<R> {
    inner: R,
    id: Option<u32>,
    data: Option<Vec<(u64, u64)>>,
    /// Most extents per allocation answer.
    cap: usize,
    queries: Rc<Cell<usize>>,
}

impl<R: ReadAt> HostLike<R> {
    fn new(inner: R, id: Option<u32>, data: Option<Vec<(u64, u64)>>) -> Self {
        HostLike {
            inner,
            id,
            data,
            cap: usize::MAX,
            queries: Rc::new(Cell::new(0)),
        }
    }
}

impl<R: ReadAt> ReadAt for HostLike<R> {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
        self.inner.read_at(offset, len)
    }
    fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Extent>, IoError> {
        self.queries.set(self.queries.get() + 1);
        let Some(data) = &self.data else {
            return self.inner.allocation(offset, length);
        };
        let end = offset + length;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        for &(s, e) in data {
            let (s, e) = (s.max(pos), e.min(end));
            if s >= e {
                continue;
            }
            if s > pos {
                out.push(Extent::new(pos, s - pos, ExtentKind::Unallocated));
            }
            out.push(Extent::data(s, e - s));
            pos = e;
        }
        if pos < end {
            out.push(Extent::new(pos, end - pos, ExtentKind::Unallocated));
        }
        out.truncate(self.cap);
        Ok(out)
    }
    fn host_id(&self) -> Option<u32> {
        self.id
    }
}

/// Check every `Related` mapping against the bytes of the reader it names, and `Zero` ones.
fn check_related(d: &VmdkDisk, maps: &[Mapping], files: &[(u32, &[u8])]) {
    for m in maps {
        let want = d.read(m.offset, m.length as u32).unwrap();
        match m.location {
            Location::Related { reader, offset } => {
                let (_, bytes) = files.iter().find(|(id, _)| *id == reader).unwrap();
                assert_eq!(
                    bytes[offset as usize..(offset + m.length) as usize],
                    want[..],
                    "{m:?}"
                );
            }
            Location::Zero => assert!(want.iter().all(|&b| b == 0), "{m:?}"),
            Location::Source(_) | Location::Adapter => {}
        }
    }
}

#[test]
fn extent_files_with_host_ids_are_related_locations() {
    ferry_plugin_sdk::testing::reset();
    let flat: Vec<u8> = (0..16 * 512).map(|i| (i % 253) as u8).collect();
    let sparse = sample(false);
    ferry_plugin_sdk::testing::add_related(
        "a-flat.vmdk",
        HostLike::new(Named::new("a-flat.vmdk", flat.clone()), Some(7), None),
    );
    ferry_plugin_sdk::testing::add_related(
        "b.vmdk",
        HostLike::new(Named::new("b.vmdk", sparse.clone()), Some(9), None),
    );
    // Two lines contiguous in a-flat.vmdk (sectors 4..12 and 12..16), zeros, the sparse
    // extent, then a-flat.vmdk again from sector 0.
    let text = "# Disk DescriptorFile\ncreateType=\"custom\"\nRW 8 FLAT \"a-flat.vmdk\" 4\n\
                RW 4 FLAT \"a-flat.vmdk\" 12\nRW 8 ZERO\nRW 64 SPARSE \"b.vmdk\"\n\
                RW 4 FLAT \"a-flat.vmdk\"\n";
    let d = open(text.as_bytes().to_vec()).unwrap();
    let size = d.info().virtual_size;
    assert_eq!(size, (12 + 8 + 64 + 4) * 512);
    let maps = d.locate(0, size).unwrap();
    let PartKind::Sparse { extent, .. } = &d.parts[3].kind else {
        unreachable!()
    };
    let grain = |g: u64| match extent.at(g * GRAIN as u64).unwrap().0 {
        Slot::Stored(o) => o,
        s => panic!("grain {g}: {s:?}"),
    };
    let g = GRAIN as u64;
    let z = 20 * 512;
    let related = |reader, offset| Location::Related { reader, offset };
    assert_eq!(
        maps,
        vec![
            Mapping {
                offset: 0,
                length: 12 * 512,
                location: related(7, 4 * 512)
            },
            // The ZERO line and the sparse extent's unallocated grain 0.
            Mapping {
                offset: 12 * 512,
                length: 8 * 512 + g,
                location: Location::Zero
            },
            Mapping {
                offset: z + g,
                length: 2 * g,
                location: related(9, grain(1))
            },
            Mapping {
                offset: z + 3 * g,
                length: 3 * g,
                location: Location::Zero
            },
            Mapping {
                offset: z + 6 * g,
                length: g,
                location: related(9, grain(6))
            },
            Mapping {
                offset: z + 7 * g,
                length: g,
                location: Location::Zero
            },
            Mapping {
                offset: z + 8 * g,
                length: 4 * 512,
                location: related(7, 0)
            },
        ]
    );
    check_related(&d, &maps, &[(7, &flat), (9, &sparse)]);
    // A sub-range starts inside a mapping.
    assert_eq!(
        d.locate(100, 1000).unwrap(),
        vec![Mapping {
            offset: 100,
            length: 1000,
            location: related(7, 4 * 512 + 100)
        }]
    );
    // Compressed grains of an extent file stay `Adapter` even with a host id.
    ferry_plugin_sdk::testing::add_related(
        "c.vmdk",
        HostLike::new(Named::new("c.vmdk", sample(true)), Some(11), None),
    );
    let text = "# Disk DescriptorFile\nRW 64 SPARSE \"c.vmdk\"\n";
    let d = open(text.as_bytes().to_vec()).unwrap();
    let maps = d.locate(0, 64 * 512).unwrap();
    assert_eq!(maps[1].location, Location::Adapter);
    assert!(
        maps.iter()
            .all(|m| !matches!(m.location, Location::Related { .. } | Location::Source(_)))
    );
    ferry_plugin_sdk::testing::reset();
}

#[test]
fn holes_of_extent_files_are_unallocated() {
    ferry_plugin_sdk::testing::reset();
    const K: u64 = 1024;
    // A 1 MiB flat file allocated at [0, 4K) and [300K, 308K) only.
    let mut flat = vec![0u8; 1 << 20];
    flat[..4096].fill(1);
    flat[300 * 1024..308 * 1024].fill(2);
    let flat_file = HostLike::new(
        Named::new("f-flat.vmdk", flat),
        Some(3),
        Some(vec![(0, 4 * K), (300 * K, 308 * K)]),
    );
    let queries = Rc::clone(&flat_file.queries);
    ferry_plugin_sdk::testing::add_related("f-flat.vmdk", flat_file);
    // The sparse extent holds grains 1, 2 and 6; the second half of grain 6 is a hole.
    let sparse = sample(false);
    let probe = open(sparse.clone()).unwrap();
    let PartKind::Sparse { extent, .. } = &probe.parts[0].kind else {
        unreachable!()
    };
    let Slot::Stored(g6) = extent.at(6 * GRAIN as u64).unwrap().0 else {
        unreachable!()
    };
    let n = sparse.len() as u64;
    // A hole reads as zeros.
    let mut sparse = sparse;
    sparse[(g6 + 2048) as usize..(g6 + 4096) as usize].fill(0);
    ferry_plugin_sdk::testing::add_related(
        "s.vmdk",
        HostLike::new(
            Named::new("s.vmdk", sparse),
            None,
            Some(vec![(0, g6 + 2048), (g6 + 4096, n)]),
        ),
    );
    // Flat from byte 256 KiB of the file (512 KiB), then the sparse extent.
    let text = "# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\n\
                RW 1024 FLAT \"f-flat.vmdk\" 512\nRW 64 SPARSE \"s.vmdk\"\n";
    let d = open(text.as_bytes().to_vec()).unwrap();
    let g = GRAIN as u64;
    let s0 = 512 * K;
    let want = vec![
        Extent::new(0, 44 * K, ExtentKind::Unallocated),
        Extent::data(44 * K, 8 * K),
        // The flat file's hole, then the sparse extent's unallocated grain 0.
        Extent::new(52 * K, s0 - 52 * K + g, ExtentKind::Unallocated),
        Extent::data(s0 + g, 2 * g),
        Extent::new(s0 + 3 * g, g, ExtentKind::Unallocated),
        Extent::new(s0 + 4 * g, g, ExtentKind::Zero),
        Extent::new(s0 + 5 * g, g, ExtentKind::Unallocated),
        Extent::data(s0 + 6 * g, 2048),
        Extent::new(s0 + 6 * g + 2048, 2048 + g, ExtentKind::Unallocated),
    ];
    let size = d.info().virtual_size;
    assert_eq!(d.extents(0, size).unwrap(), want);
    // One query for the flat file (it is smaller than a window).
    assert_eq!(queries.get(), 1);
    // Holes read as zeros; extents of a sub-range agree.
    let bytes = d.read(0, size as u32).unwrap();
    for e in &want {
        if e.kind != ExtentKind::Data {
            assert!(
                bytes[e.offset as usize..e.end() as usize]
                    .iter()
                    .all(|&b| b == 0)
            );
        }
    }
    assert_eq!(
        d.extents(40 * K, 8 * K).unwrap(),
        vec![
            Extent::new(40 * K, 4 * K, ExtentKind::Unallocated),
            Extent::data(44 * K, 4 * K)
        ]
    );
    // `locate` still points into the files (holes there read as zeros too).
    let maps = d.locate(0, 100 * K).unwrap();
    assert_eq!(
        maps,
        vec![Mapping {
            offset: 0,
            length: 100 * K,
            location: Location::Related {
                reader: 3,
                offset: 256 * K
            }
        }]
    );
    ferry_plugin_sdk::testing::reset();
}

#[test]
fn extents_stop_short_when_the_query_budget_is_spent() {
    ferry_plugin_sdk::testing::reset();
    // 1 MiB allocated every other 4 KiB, one extent per allocation answer: one query per run.
    let data: Vec<(u64, u64)> = (0..128).map(|i| (i * 8192, i * 8192 + 4096)).collect();
    let mut file = HostLike::new(
        Named::new("x-flat.vmdk", vec![0u8; 1 << 20]),
        None,
        Some(data),
    );
    file.cap = 1;
    let queries = Rc::clone(&file.queries);
    ferry_plugin_sdk::testing::add_related("x-flat.vmdk", file);
    let d = open(b"# Disk DescriptorFile\nRW 2048 FLAT \"x-flat.vmdk\" 0\n".to_vec()).unwrap();
    let first = d.extents(0, 1 << 20).unwrap();
    assert_eq!(queries.get(), holes::MAX_QUERIES);
    assert_eq!(first.len(), holes::MAX_QUERIES);
    // The caller asks again from the end of the last extent until the disk is covered.
    let mut all = first;
    let mut calls = 1;
    while let Some(last) = all.last().filter(|e| e.end() < 1 << 20) {
        let before = queries.get();
        let pos = last.end();
        all.extend(d.extents(pos, (1 << 20) - pos).unwrap());
        assert!(queries.get() - before <= holes::MAX_QUERIES);
        calls += 1;
    }
    assert_eq!(calls, 4);
    let want: Vec<Extent> = (0..256)
        .map(|i| {
            let kind = if i % 2 == 0 {
                ExtentKind::Data
            } else {
                ExtentKind::Unallocated
            };
            Extent::new(i * 4096, 4096, kind)
        })
        .collect();
    assert_eq!(all, want);
    ferry_plugin_sdk::testing::reset();
}

#[test]
fn cbt_changes_are_validated_against_the_disk() {
    let d = open(sample(false)).unwrap();
    let doc = br#"{"startOffset": 0, "length": 32768, "changedArea": [{"start": 4096, "length": 8192}, {"start": 0, "length": 512}]}"#;
    let got = d.changes(doc).unwrap().drain().unwrap();
    assert_eq!(got, vec![Extent::data(0, 512), Extent::data(4096, 8192)]);
    let doc = br#"{"startOffset": 0, "length": 32769, "changedArea": []}"#;
    assert!(matches!(d.changes(doc).map(|_| ()), Err(Error::Invalid(_))));
}

#[test]
fn mutation_smoke() {
    ferry_plugin_sdk::testing::reset();
    ferry_plugin_sdk::testing::mutations(&sample(false), 2000, fuzzing::sparse);
    ferry_plugin_sdk::testing::mutations(&sample(true), 2000, fuzzing::stream);
    ferry_plugin_sdk::testing::mutations(
        b"# Disk DescriptorFile\nversion=1\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\n\
          RW 4192256 SPARSE \"a-s001.vmdk\"\nRW 100 FLAT \"a-f001.vmdk\" 7\nRW 9 ZERO\n\
          ddb.uuid.image = \"1 2\"\n",
        2000,
        fuzzing::descriptor,
    );
    ferry_plugin_sdk::testing::mutations(
        br#"{"startOffset": 0, "length": 1048576, "changedArea": [{"start": 0, "length": 65536}, {"start": 131072, "length": 4096}]}"#,
        2000,
        fuzzing::cbt,
    );
}
