//! `physical`: the built-in source adapter for raw block devices and raw disk images.
//!
//! A raw disk is its own virtual disk: byte `n` of the object is byte `n` of the disk. The
//! adapter therefore does three small things the host cannot do generically:
//!
//! - **Layout** ([`Disk::extents`]): the host's allocation map of the object (`SEEK_DATA` /
//!   `SEEK_HOLE` on a sparse image; one `data` extent on a block device), clipped to the request,
//!   in order and without gaps, at most 65536 extents per call. With config `detect-zeros =
//!   "true"` it also reads data extents and reports all-zero 64 KiB blocks as `zero`. This is off
//!   by default: the vault's ingest skips zero chunks anyway, and detection costs one extra read
//!   of every allocated byte. With detection on, one call scans at most [`ZERO_SCAN_BUDGET`]
//!   bytes and may return a short list; the caller asks again from the end of the last extent.
//! - **Data** ([`Disk::read`]): bounds-checked reads of at most 4 MiB, passed to the host reader
//!   in pieces of at most 1 MiB (the host's read cap); a single piece is returned as the host
//!   gave it, without a copy.
//! - **Changes** ([`Disk::changes`]): machines without change tracking get incrementals from a
//!   *checksum list* (one SHA-256 per block, made at the previous backup): the adapter hashes
//!   the current disk and reports the blocks that differ. The format is in [`checksums`].
//!
//! [`Physical::probe`] accepts anything (any bytes are a raw disk), so the host tries this
//! adapter last, after every adapter that recognises a real container format.
//!
//! Config keys: `detect-zeros` (`true` | `false`, default `false`).

pub mod checksums;

use ferry_plugin_sdk::adapter::{
    ChangeSet, Disk, DiskInfo, Error, Location, MAX_EXTENTS, Mapping, PluginInfo, Reader,
    SourceAdapter, check_range, check_read,
};
use ferry_plugin_sdk::config;
use ferry_plugin_sdk::io::{Extent, ExtentKind, HOST_READ_CAP, ReadAt, read_exact_at};
use std::rc::Rc;

pub use checksums::{ChecksumChanges, ChecksumList, checksum_list, parse_checksum_list};

/// Size of the blocks zero detection classifies (64 KiB, aligned to the disk).
pub const ZERO_BLOCK: u64 = 64 << 10;

/// Most bytes one `extents` call reads for zero detection (64 MiB), so that a call on a large
/// disk finishes well within the host's deadline.
pub const ZERO_SCAN_BUDGET: u64 = 64 << 20;

/// Pieces data is read in: the host's read cap.
const PIECE: u64 = HOST_READ_CAP as u64;

/// The adapter.
#[derive(Debug)]
pub struct Physical;

impl SourceAdapter for Physical {
    type Disk = PhysicalDisk;

    fn info() -> PluginInfo {
        PluginInfo {
            name: "physical".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            formats: vec!["raw".to_owned()],
            description:
                "Raw block devices and raw disk images (tried last: any bytes are a raw disk)"
                    .to_owned(),
        }
    }

    /// Always true: any bytes are a raw disk. The host tries this adapter last.
    fn probe(_header: &[u8]) -> bool {
        true
    }

    fn open(reader: Reader) -> Result<PhysicalDisk, Error> {
        Ok(PhysicalDisk::new(reader, Options::from_config()?))
    }
}

/// Settings from the plugin's config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Report all-zero 64 KiB blocks of data extents as `zero` (config `detect-zeros`).
    pub detect_zeros: bool,
}

impl Options {
    /// Read the options from the plugin's config.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming a key whose value is not accepted.
    pub fn from_config() -> Result<Self, Error> {
        Ok(Self {
            detect_zeros: config::get_bool("detect-zeros", false)?,
        })
    }
}

/// An opened raw disk.
#[derive(Debug)]
pub struct PhysicalDisk {
    /// Shared with change sets, which outlive no disk but are separate resources.
    reader: Rc<Reader>,
    size: u64,
    options: Options,
}

impl PhysicalDisk {
    /// The raw disk behind `reader`; its virtual size is the reader's size.
    pub fn new(reader: Reader, options: Options) -> Self {
        let size = reader.size();
        Self {
            reader: Rc::new(reader),
            size,
            options,
        }
    }
}

impl Disk for PhysicalDisk {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            format: "raw".to_owned(),
            virtual_size: self.size,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            disk_id: None,
            parent: None,
        }
    }

    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, Error> {
        let end = check_range(self.size, offset, length)?;
        let mut out = ExtentList::new(MAX_EXTENTS);
        let mut budget = ZERO_SCAN_BUDGET;
        walk_allocation(&self.reader, offset, end, |segment| {
            if segment.kind == ExtentKind::Data && self.options.detect_zeros {
                self.classify_zeros(segment.offset, segment.end(), &mut out, &mut budget)
            } else {
                Ok(out.push(segment))
            }
        })?;
        Ok(out.into_vec())
    }

    /// A raw disk is stored as is: the host reads every byte itself.
    fn locate(&self, offset: u64, length: u64) -> Result<Vec<Mapping>, Error> {
        check_range(self.size, offset, length)?;
        Ok(vec![Mapping {
            offset,
            length,
            location: Location::Source(offset),
        }])
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, Error> {
        check_read(self.size, offset, len)?;
        // Pieces of at most the host's read cap; one piece is returned without a copy.
        Ok(read_exact_at(&self.reader, offset, len as usize)?)
    }

    fn changes(&self, document: &[u8]) -> Result<Box<dyn ChangeSet>, Error> {
        Ok(Box::new(checksums::ChecksumChanges::new(
            Rc::clone(&self.reader),
            self.size,
            document,
        )?))
    }
}

impl PhysicalDisk {
    /// Push the data range `[start, end)` as `data` and `zero` extents by reading it. Returns
    /// whether to go on (false when the list is full or the scan budget is spent).
    fn classify_zeros(
        &self,
        start: u64,
        end: u64,
        out: &mut ExtentList,
        budget: &mut u64,
    ) -> Result<bool, Error> {
        let mut pos = start;
        while pos < end {
            if *budget == 0 {
                return Ok(false);
            }
            let piece_end = end.min(pos + PIECE);
            // At most PIECE (1 MiB) bytes.
            let buf = read_exact_at(&self.reader, pos, to_usize(piece_end - pos))?;
            *budget = budget.saturating_sub(piece_end - pos);
            let mut block_start = pos;
            while block_start < piece_end {
                let block_end = piece_end.min((block_start / ZERO_BLOCK + 1) * ZERO_BLOCK);
                let bytes = &buf[to_usize(block_start - pos)..to_usize(block_end - pos)];
                let kind = if is_zero(bytes) {
                    ExtentKind::Zero
                } else {
                    ExtentKind::Data
                };
                if !out.push(Extent::new(block_start, block_end - block_start, kind)) {
                    return Ok(false);
                }
                block_start = block_end;
            }
            pos = piece_end;
        }
        Ok(true)
    }
}

/// Whether every byte is zero (no early exit, so it vectorises).
fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |acc, &b| acc | b) == 0
}

/// A length within one piece (at most 1 MiB), as an index.
fn to_usize(v: u64) -> usize {
    usize::try_from(v).expect("at most one piece")
}

/// Call `f` with the reader's allocation of `[start, end)` as extents that are clipped to the
/// range, in order and contiguous, until the range is covered or `f` returns false. A gap in
/// the host's answer is treated as `data` (read, to be safe), and an answer that does not
/// advance ends the walk with the rest as `data`, so the walk always terminates.
pub(crate) fn walk_allocation(
    reader: &(impl ReadAt + ?Sized),
    start: u64,
    end: u64,
    mut f: impl FnMut(Extent) -> Result<bool, Error>,
) -> Result<(), Error> {
    let mut pos = start;
    while pos < end {
        let answer = reader.allocation(pos, end - pos)?;
        let before = pos;
        for e in answer {
            if e.end() <= pos {
                continue;
            }
            if e.offset >= end {
                break;
            }
            if e.offset > pos {
                if !f(Extent::data(pos, e.offset - pos))? {
                    return Ok(());
                }
                pos = e.offset;
            }
            let stop = e.end().min(end);
            if !f(Extent::new(pos, stop - pos, e.kind))? {
                return Ok(());
            }
            pos = stop;
        }
        if pos == before {
            // The host described nothing of what is left: read it all.
            f(Extent::data(pos, end - pos))?;
            return Ok(());
        }
    }
    Ok(())
}

/// Extents in order, adjacent ones of the same kind merged, at most `cap` of them.
#[derive(Debug)]
pub(crate) struct ExtentList {
    extents: Vec<Extent>,
    cap: usize,
}

impl ExtentList {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            extents: Vec::new(),
            cap,
        }
    }

    /// Append `e` (merging it into the last extent when they touch and have the same kind).
    /// Returns false, without appending, when that would exceed the cap.
    pub(crate) fn push(&mut self, e: Extent) -> bool {
        if e.length == 0 {
            return true;
        }
        if let Some(last) = self.extents.last_mut()
            && last.kind == e.kind
            && last.end() == e.offset
        {
            last.length += e.length;
            return true;
        }
        if self.extents.len() == self.cap {
            return false;
        }
        self.extents.push(e);
        true
    }

    pub(crate) fn into_vec(self) -> Vec<Extent> {
        self.extents
    }
}

ferry_plugin_sdk::export_source_adapter!(Physical);

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test disks are a few MiB
mod tests {
    use super::*;
    use ferry_plugin_sdk::io::IoError;

    /// A buffer with an allocation map of its own, like a sparse file.
    pub(crate) struct Sparse {
        pub(crate) data: Vec<u8>,
        pub(crate) map: Vec<Extent>,
        /// Most extents one `allocation` answer holds.
        pub(crate) per_call: usize,
    }

    impl ReadAt for Sparse {
        fn name(&self) -> String {
            "sparse.img".to_owned()
        }
        fn size(&self) -> u64 {
            self.data.size()
        }
        fn read_at(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
            self.data.read_at(offset, len)
        }
        fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Extent>, IoError> {
            let end = offset + length;
            Ok(self
                .map
                .iter()
                .filter(|e| e.end() > offset && e.offset < end)
                .take(self.per_call)
                .copied()
                .collect())
        }
    }

    fn disk(reader: impl ReadAt + 'static, detect_zeros: bool) -> PhysicalDisk {
        PhysicalDisk::new(Reader::new(reader), Options { detect_zeros })
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn info_and_probe() {
        assert_eq!(Physical::info().name, "physical");
        assert_eq!(Physical::info().formats, vec!["raw"]);
        assert!(Physical::probe(b""));
        let d = disk(vec![0u8; 4096], false);
        let info = d.info();
        assert_eq!(
            (
                info.virtual_size,
                info.logical_sector_size,
                info.physical_sector_size
            ),
            (4096, 512, 4096)
        );
        assert_eq!(info.format, "raw");
        assert_eq!((info.disk_id, info.parent), (None, None));
    }

    #[test]
    fn open_reads_detect_zeros_from_config() {
        ferry_plugin_sdk::testing::reset();
        ferry_plugin_sdk::testing::set_config("detect-zeros", "yes");
        let e = Physical::open(Reader::new(vec![0u8; 10])).unwrap_err();
        assert!(
            matches!(&e, Error::Invalid(m) if m.contains("detect-zeros")),
            "{e}"
        );
        ferry_plugin_sdk::testing::set_config("detect-zeros", "true");
        let d = Physical::open(Reader::new(vec![0u8; 10])).unwrap();
        assert_eq!(
            d.extents(0, 10).unwrap(),
            vec![Extent::new(0, 10, ExtentKind::Zero)]
        );
        ferry_plugin_sdk::testing::reset();
    }

    #[test]
    fn reads_are_bounds_checked_and_split() {
        let data: Vec<u8> = (0..5 * MIB).map(|i| (i % 251) as u8).collect();
        let d = disk(data.clone(), false);
        assert_eq!(d.read(7, 100).unwrap(), data[7..107]);
        let big = d.read(3, 4 << 20).unwrap();
        assert_eq!(big, data[3..3 + (4 << 20)]);
        assert!(matches!(
            d.read(0, (4 << 20) + 1),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(d.read(5 * MIB - 1, 2), Err(Error::OutOfRange(_))));
        assert!(d.read(5 * MIB, 0).unwrap().is_empty());
    }

    #[test]
    fn extents_follow_the_allocation_map_clipped() {
        let sparse = Sparse {
            data: vec![1u8; 100],
            map: vec![
                Extent::data(0, 30),
                Extent::new(30, 40, ExtentKind::Unallocated),
                Extent::data(70, 30),
            ],
            per_call: 1,
        };
        let d = disk(sparse, false);
        assert_eq!(
            d.extents(10, 80).unwrap(),
            vec![
                Extent::data(10, 20),
                Extent::new(30, 40, ExtentKind::Unallocated),
                Extent::data(70, 20),
            ]
        );
        assert!(d.extents(100, 0).unwrap().is_empty());
        let e = d.extents(50, 51).unwrap_err();
        assert!(
            matches!(&e, Error::OutOfRange(m) if m.contains("50+51")),
            "{e}"
        );
    }

    #[test]
    fn gaps_in_the_host_map_become_data() {
        let sparse = Sparse {
            data: vec![1u8; 100],
            map: vec![Extent::new(20, 10, ExtentKind::Unallocated)],
            per_call: 10,
        };
        let d = disk(sparse, false);
        assert_eq!(
            d.extents(0, 100).unwrap(),
            vec![
                Extent::data(0, 20),
                Extent::new(20, 10, ExtentKind::Unallocated),
                Extent::data(30, 70),
            ]
        );
    }

    #[test]
    fn zero_detection_reports_zero_blocks() {
        let mut data = vec![0u8; 3 * MIB as usize];
        data[5] = 1; // block 0 is data
        data[(ZERO_BLOCK - 3) as usize] = 1; // and so is its end
        data[(2 * ZERO_BLOCK) as usize] = 1; // block 2 is data
        let d = disk(data, true);
        let got = d.extents(0, 3 * MIB).unwrap();
        assert_eq!(
            got,
            vec![
                Extent::data(0, ZERO_BLOCK),
                Extent::new(ZERO_BLOCK, ZERO_BLOCK, ExtentKind::Zero),
                Extent::data(2 * ZERO_BLOCK, ZERO_BLOCK),
                Extent::new(3 * ZERO_BLOCK, 3 * MIB - 3 * ZERO_BLOCK, ExtentKind::Zero),
            ]
        );
        // Unaligned requests classify partial blocks at the edges.
        assert_eq!(
            d.extents(ZERO_BLOCK - 10, 20).unwrap(),
            vec![
                Extent::data(ZERO_BLOCK - 10, 10),
                Extent::new(ZERO_BLOCK, 10, ExtentKind::Zero)
            ]
        );
    }

    #[test]
    fn extent_lists_stop_at_the_cap_and_resume() {
        // Alternating data and holes: 70,000 extents of one byte.
        let n = 70_000u64;
        let map = (0..n)
            .map(|i| {
                let kind = if i % 2 == 0 {
                    ExtentKind::Data
                } else {
                    ExtentKind::Unallocated
                };
                Extent::new(i, 1, kind)
            })
            .collect();
        let d = disk(
            Sparse {
                data: vec![1u8; n as usize],
                map,
                per_call: 65_536,
            },
            false,
        );
        let first = d.extents(0, n).unwrap();
        assert_eq!(first.len(), MAX_EXTENTS);
        let resume = first.last().unwrap().end();
        let rest = d.extents(resume, n - resume).unwrap();
        assert_eq!(first.len() + rest.len(), n as usize);
        assert_eq!(rest.last().unwrap().end(), n);
    }

    #[test]
    fn zero_scan_is_budgeted_per_call() {
        let size = ZERO_SCAN_BUDGET + 3 * MIB;
        let d = disk(vec![0u8; size as usize], true);
        let first = d.extents(0, size).unwrap();
        assert_eq!(
            first,
            vec![Extent::new(0, ZERO_SCAN_BUDGET, ExtentKind::Zero)]
        );
        let rest = d.extents(ZERO_SCAN_BUDGET, 3 * MIB).unwrap();
        assert_eq!(
            rest,
            vec![Extent::new(ZERO_SCAN_BUDGET, 3 * MIB, ExtentKind::Zero)]
        );
    }
}
