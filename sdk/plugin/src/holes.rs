//! Holes of the files a virtual disk is stored in, for an adapter's `extents` (feature
//! `adapter`; the VMware and Hyper-V adapters use it).
//!
//! Where bytes of a virtual disk are stored as is in a file (a flat VMDK extent, the
//! uncompressed grains of a sparse one, a fixed VHD, the payload blocks of a dynamic or
//! differencing disk), a hole of that file reads as zeros: `extents` can report it
//! `unallocated`, so the host never reads it. The file's holes come from the reader's
//! `allocation` (SEEK_DATA/SEEK_HOLE on the host; one `data` extent for readers without holes).
//! Asking once per stored run would cost a host call per grain or block, so [`Holes`] asks for
//! the whole file first (from byte 0 to its end: grains and blocks are stored in the order they
//! were written, not in the order of the disk) and answers every run it covers from that map;
//! only a file with more holes than one answer holds (65536 extents) is asked again, from the
//! first run the map does not cover. One `extents` call should make at most [`MAX_QUERIES`]
//! queries and then stop short.
//!
//! The map is an optimisation, never a source of errors: a failed query, or an answer that does
//! not tile the asked range from its start, is taken as `data` (the bytes are then read, and
//! read as whatever the file holds).

use std::cell::{Cell, RefCell};

use crate::adapter::MAX_EXTENTS;
use crate::io::{ExtentKind, ReadAt};

/// Most allocation queries one `extents` call makes before it stops short.
pub const MAX_QUERIES: usize = 64;

/// The last allocation map read of one file.
#[derive(Debug, Default)]
pub struct Holes {
    /// `[start, runs.last().end)` of the file is known: runs of `(end, allocated)` in order,
    /// adjacent runs of one kind merged.
    window: RefCell<(u64, Vec<(u64, bool)>)>,
    /// A query failed: the file is taken as all data from then on (logged once).
    failed: Cell<bool>,
}

impl Holes {
    /// Whether byte `offset` of `file` is allocated (`true`) or in a hole, and for how many
    /// bytes (at least 1, at most `len`, which is more than 0) that stays so. `None` when the
    /// answer is not known yet and `queries` is spent; a query decrements it.
    pub fn lookup(
        &self,
        file: &(impl ReadAt + ?Sized),
        offset: u64,
        len: u64,
        queries: &mut usize,
    ) -> Option<(bool, u64)> {
        if self.failed.get() {
            return Some((true, len.max(1)));
        }
        if let Some(hit) = self.cached(offset, len) {
            return Some(hit);
        }
        if *queries == 0 {
            return None;
        }
        *queries -= 1;
        let end = offset.saturating_add(len.max(1));
        // The first query covers the whole file, the next ones the file from the first byte
        // the map lacks.
        let first = self.window.borrow().1.is_empty();
        self.fill(file, if first { 0 } else { offset }, end);
        match self.cached(offset, len) {
            Some(hit) => Some(hit),
            // The whole-file answer stopped short of `offset`: ask from there.
            None if first => self.lookup(file, offset, len, queries),
            None => Some((true, end - offset)),
        }
    }

    fn cached(&self, offset: u64, len: u64) -> Option<(bool, u64)> {
        let w = self.window.borrow();
        if offset < w.0 {
            return None;
        }
        let i = w.1.partition_point(|&(end, _)| end <= offset);
        let &(end, allocated) = w.1.get(i)?;
        Some((allocated, (end - offset).min(len.max(1))))
    }

    /// Query the map of `file` from `offset` to its end and keep it; when the answer says
    /// nothing usable, `[offset, end)` is taken as data.
    fn fill(&self, file: &(impl ReadAt + ?Sized), offset: u64, end: u64) {
        let want_end = file.size();
        let mut runs: Vec<(u64, bool)> = Vec::new();
        if offset < want_end {
            match file.allocation(offset, want_end - offset) {
                Ok(list) => {
                    let mut pos = offset;
                    for e in list.into_iter().take(MAX_EXTENTS) {
                        if e.offset != pos || e.length == 0 || e.end() > want_end {
                            break;
                        }
                        let allocated = e.kind != ExtentKind::Unallocated;
                        match runs.last_mut() {
                            Some(last) if last.1 == allocated => last.0 = e.end(),
                            _ => runs.push((e.end(), allocated)),
                        }
                        pos = e.end();
                    }
                }
                Err(e) => {
                    self.failed.set(true);
                    crate::log::warn(&format!(
                        "{}: the allocation map failed ({e}); its holes are read as data",
                        file.name()
                    ));
                }
            }
        }
        if runs.is_empty() {
            runs.push((end.max(offset.saturating_add(1)), true));
        }
        *self.window.borrow_mut() = (offset, runs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{Extent, IoError, IoErrorKind};

    /// 1 MiB whose allocation map is `map` (or an error), at most `cap` extents per answer;
    /// counts queries.
    struct Mapped {
        map: Result<Vec<Extent>, IoError>,
        cap: usize,
        calls: Cell<usize>,
    }

    impl Mapped {
        fn new(map: Result<Vec<Extent>, IoError>) -> Self {
            Mapped {
                map,
                cap: usize::MAX,
                calls: Cell::new(0),
            }
        }
    }

    impl ReadAt for Mapped {
        fn name(&self) -> String {
            "m.img".into()
        }
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_at(&self, _: u64, len: u32) -> Result<Vec<u8>, IoError> {
            Ok(vec![0; len as usize])
        }
        fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Extent>, IoError> {
            self.calls.set(self.calls.get() + 1);
            let map = self.map.clone()?;
            Ok(map
                .into_iter()
                .filter(|e| e.end() > offset && e.offset < offset + length)
                .map(|e| {
                    let s = e.offset.max(offset);
                    Extent::new(s, e.end().min(offset + length) - s, e.kind)
                })
                .take(self.cap)
                .collect())
        }
    }

    const K: u64 = 1024;

    fn hole(offset: u64, length: u64) -> Extent {
        Extent::new(offset, length, ExtentKind::Unallocated)
    }

    #[test]
    fn one_query_answers_the_whole_file() {
        let f = Mapped::new(Ok(vec![
            Extent::data(0, 64 * K),
            hole(64 * K, 64 * K),
            hole(128 * K, 64 * K),
            Extent::data(192 * K, 832 * K),
        ]));
        let h = Holes::default();
        let mut q = 2;
        assert_eq!(h.lookup(&f, 200 * K, K, &mut q), Some((true, K)));
        assert_eq!(h.lookup(&f, 62 * K, 100 * K, &mut q), Some((true, 2 * K)));
        // Adjacent unallocated runs are merged.
        assert_eq!(
            h.lookup(&f, 64 * K, 1000 * K, &mut q),
            Some((false, 128 * K))
        );
        assert_eq!(
            h.lookup(&f, 200 * K, 1000 * K, &mut q),
            Some((true, 824 * K))
        );
        // Before the first byte asked for: known all the same.
        assert_eq!(h.lookup(&f, 0, 100, &mut 0), Some((true, 100)));
        assert_eq!((f.calls.get(), q), (1, 1));
    }

    #[test]
    fn short_answers_are_continued_within_the_budget() {
        // Holes every other 4 KiB, two extents per answer.
        let map = (0..256)
            .map(|i| {
                if i % 2 == 0 {
                    Extent::data(i * 4 * K, 4 * K)
                } else {
                    hole(i * 4 * K, 4 * K)
                }
            })
            .collect();
        let mut f = Mapped::new(Ok(map));
        f.cap = 2;
        let h = Holes::default();
        // The whole-file answer stops at 8 KiB: a second query from 96 KiB, which stops at
        // 104 KiB.
        let mut q = 5;
        assert_eq!(h.lookup(&f, 96 * K, K, &mut q), Some((true, K)));
        assert_eq!(h.lookup(&f, 98 * K, 10 * K, &mut q), Some((true, 2 * K)));
        assert_eq!(h.lookup(&f, 101 * K, 10 * K, &mut q), Some((false, 3 * K)));
        assert_eq!((f.calls.get(), q), (2, 3));
        // Past the second answer: one more query; none left, no answer.
        assert_eq!(h.lookup(&f, 104 * K, K, &mut 0), None);
        assert_eq!(h.lookup(&f, 104 * K, K, &mut q), Some((true, K)));
        assert_eq!((f.calls.get(), q), (3, 2));
        // A fresh map with a budget of one: the first answer stops short, so no answer.
        let h = Holes::default();
        assert_eq!(h.lookup(&f, 96 * K, K, &mut 1), None);
    }

    #[test]
    fn failed_or_malformed_maps_are_data() {
        let h = Holes::default();
        let err = Mapped::new(Err(IoError::new(IoErrorKind::Io, "boom")));
        assert_eq!(h.lookup(&err, 100, 50, &mut 1), Some((true, 50)));
        // Once failed, never asked again.
        assert_eq!(h.lookup(&err, 9000, 50, &mut 0), Some((true, 50)));
        assert_eq!(err.calls.get(), 1);
        // A map that does not start at the asked offset.
        let gap = Mapped::new(Ok(vec![hole(4096, 4096)]));
        let h = Holes::default();
        assert_eq!(h.lookup(&gap, 0, 8192, &mut 1), Some((true, 8192)));
        // Past the end of the file.
        assert_eq!(h.lookup(&gap, 2 << 20, 10, &mut 1), Some((true, 10)));
    }
}
