//! Checksum lists: change tracking for machines that have none.
//!
//! At each backup the agent (or `ferry`, natively, with [`checksum_list`]) records one SHA-256
//! per fixed-size block of the disk. At the next backup the list is the change-tracking
//! document handed to [`Disk::changes`](ferry_plugin_sdk::adapter::Disk::changes): the
//! adapter hashes the current disk block by block and reports the blocks whose hash differs,
//! plus everything past the old size, as `data` extents (adjacent ones coalesced). This reads
//! the whole disk once but sends only the changed blocks to the vault.
//!
//! # Format (`ferry-checksums v1`)
//!
//! UTF-8 text, lines separated by `\n` (the final `\n` is optional; no `\r`, no blank lines, no
//! leading or trailing spaces):
//!
//! ```text
//! ferry-checksums v1
//! block-size 1048576
//! size 10737418240
//! 3b5d5c3712955042212316173ccf37be800a6d4bcd2b2e6b4e4b7b1b6a1b7c1d
//! ...
//! ```
//!
//! 1. Line 1 is exactly `ferry-checksums v1`.
//! 2. Line 2 is `block-size N`: `N` in decimal digits, a power of two from 4096 (4 KiB) to
//!    67108864 (64 MiB).
//! 3. Line 3 is `size BYTES`: the disk's size in bytes, in decimal digits, when the list was
//!    made.
//! 4. Then exactly `ceil(BYTES / N)` lines, one per block in disk order: the SHA-256 of the
//!    block's bytes as 64 lowercase hex digits. Block `i` is bytes
//!    `[i * N, min((i + 1) * N, BYTES))`: the last block is shorter when `BYTES` is not a
//!    multiple of `N` (it is not padded).
//!
//! Translating a list against the current disk:
//! - a block whose hash differs is changed (reported up to the old size);
//! - the range from the old size to the current size (a grown disk) is changed;
//! - a disk smaller than the list's size, or a malformed list, is [`Error::Invalid`] naming the
//!   line.
//!
//! Unallocated ranges of the current disk (holes in a sparse image) are hashed as zeros
//! without being read.

use std::fmt::Write as _;

use ferry_plugin_sdk::adapter::{ChangeSet, Error};
use ferry_plugin_sdk::io::{Extent, ReadAt, read_exact_at};
use sha2::{Digest, Sha256};

use crate::{ExtentList, PIECE, to_usize, walk_allocation};

/// Line 1 of a checksum list.
pub const HEADER: &str = "ferry-checksums v1";
/// Smallest block size (4 KiB).
pub const MIN_BLOCK_SIZE: u64 = 4 << 10;
/// Largest block size (64 MiB).
pub const MAX_BLOCK_SIZE: u64 = 64 << 20;

/// A parsed checksum list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChecksumList {
    /// Bytes per block.
    pub block_size: u64,
    /// Disk size in bytes when the list was made.
    pub size: u64,
    /// SHA-256 of each block, in order (`ceil(size / block_size)` of them).
    pub hashes: Vec<[u8; 32]>,
}

fn check_block_size(block_size: u64) -> Result<(), String> {
    if block_size.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        Ok(())
    } else {
        Err(format!(
            "block size {block_size} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        ))
    }
}

/// Decimal digits only (no sign, no spaces), as a u64.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A short, printable excerpt of a bad line for an error message.
fn excerpt(line: &str) -> String {
    let mut out: String = line.chars().take(40).collect();
    if out.len() < line.len() {
        out.push('…');
    }
    out.escape_debug().to_string()
}

/// Parse a checksum list (format in the [module docs](self)).
///
/// # Errors
/// [`Error::Invalid`] naming the first bad line.
pub fn parse_checksum_list(document: &[u8]) -> Result<ChecksumList, Error> {
    let invalid =
        |line: usize, what: String| Error::invalid(format!("checksum list line {line}: {what}"));
    let text = std::str::from_utf8(document).map_err(|e| {
        let line = document[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        invalid(line, "not UTF-8 text".to_owned())
    })?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    let mut lines = text.split('\n');
    // `split` yields one empty line for an empty document.
    let mut next = |n: usize, what: &str| match lines.next() {
        Some(l) if !(n == 1 && l.is_empty() && document.is_empty()) => Ok(l),
        _ => Err(invalid(n, format!("missing (expected {what})"))),
    };

    let header = next(1, HEADER)?;
    if header != HEADER {
        return Err(invalid(
            1,
            format!("expected `{HEADER}`, found `{}`", excerpt(header)),
        ));
    }
    let line = next(2, "`block-size N`")?;
    let block_size = line
        .strip_prefix("block-size ")
        .and_then(parse_decimal)
        .ok_or_else(|| {
            invalid(
                2,
                format!("expected `block-size N`, found `{}`", excerpt(line)),
            )
        })?;
    check_block_size(block_size).map_err(|m| invalid(2, m))?;
    let line = next(3, "`size BYTES`")?;
    let size = line
        .strip_prefix("size ")
        .and_then(parse_decimal)
        .ok_or_else(|| {
            invalid(
                3,
                format!("expected `size BYTES`, found `{}`", excerpt(line)),
            )
        })?;

    let expected = size.div_ceil(block_size);
    let mut hashes = Vec::new();
    for (i, line) in lines.enumerate() {
        let n = i + 4;
        if hashes.len() as u64 == expected {
            return Err(invalid(
                n,
                format!("more than the {expected} block hashes a {size}-byte disk has"),
            ));
        }
        let mut hash = [0u8; 32];
        let lowercase_hex = line.len() == 64
            && line.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && hex::decode_to_slice(line, &mut hash).is_ok();
        if !lowercase_hex {
            return Err(invalid(
                n,
                format!(
                    "expected a SHA-256 as 64 lowercase hex digits, found `{}`",
                    excerpt(line)
                ),
            ));
        }
        hashes.push(hash);
    }
    if (hashes.len() as u64) < expected {
        return Err(invalid(
            hashes.len() + 4,
            format!(
                "missing: a {size}-byte disk in {block_size}-byte blocks has {expected} block \
                 hashes, the list ends after {}",
                hashes.len()
            ),
        ));
    }
    Ok(ChecksumList {
        block_size,
        size,
        hashes,
    })
}

/// Make the checksum list of the disk behind `r` (natively: `ferry` runs this against the
/// device or image at a backup).
///
/// # Errors
/// [`Error::Invalid`] for a block size outside the format's range; [`Error::Io`] when reading
/// fails.
pub fn checksum_list(r: &(impl ReadAt + ?Sized), block_size: u64) -> Result<String, Error> {
    check_block_size(block_size).map_err(Error::invalid)?;
    let size = r.size();
    let blocks = usize::try_from(size.div_ceil(block_size)).unwrap_or(usize::MAX);
    let mut out = String::with_capacity(blocks.saturating_mul(65).saturating_add(64));
    // Writing to a String cannot fail.
    let _ = write!(out, "{HEADER}\nblock-size {block_size}\nsize {size}\n");
    hash_blocks(r, size, block_size, |_, hash| {
        out.push_str(&hex::encode(hash));
        out.push('\n');
        Ok(())
    })?;
    Ok(out)
}

/// Bytes hashed per [`ChangeSet::next`] call at most: bounded work under each call's deadline.
pub const HASH_BYTES_PER_CALL: u64 = 256 << 20;

/// The changes of a disk since a checksum list was made, found a bounded number of blocks per
/// [`ChangeSet::next`] call.
#[derive(Debug)]
pub struct ChecksumChanges<R> {
    reader: R,
    /// The disk's current size.
    size: u64,
    list: ChecksumList,
    /// The next block to hash.
    next_block: u64,
    /// Whether the grown tail (if any) was reported.
    tail_done: bool,
}

impl<R: ReadAt> ChecksumChanges<R> {
    /// Validate `document` against the disk behind `reader` (of `size` bytes).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a malformed list or a disk smaller than the list's size.
    pub fn new(reader: R, size: u64, document: &[u8]) -> Result<Self, Error> {
        let list = parse_checksum_list(document)?;
        if size < list.size {
            return Err(Error::invalid(format!(
                "checksum list line 3: the list is for a disk of {} bytes; this disk has shrunk \
                 to {size} bytes",
                list.size
            )));
        }
        Ok(Self {
            reader,
            size,
            list,
            next_block: 0,
            tail_done: false,
        })
    }
}

impl<R: ReadAt + 'static> ChangeSet for ChecksumChanges<R> {
    fn next(&mut self, max: usize) -> Result<Option<Vec<Extent>>, Error> {
        let bs = self.list.block_size;
        let blocks = self.list.hashes.len() as u64;
        if self.next_block < blocks {
            // Each changed block is at most one extent, so hashing at most `max` blocks keeps
            // the batch within `max`.
            let per_call = (HASH_BYTES_PER_CALL / bs).max(1).min(max.max(1) as u64);
            let first = self.next_block;
            let last = (first + per_call).min(blocks);
            let list = &self.list;
            let mut out = ExtentList::new(usize::MAX);
            hash_block_range(&self.reader, list.size, bs, first, last, |index, hash| {
                // `index` is below `hashes.len()`: the range is within the list.
                if hash != list.hashes[to_usize(index)] {
                    let start = index * bs;
                    out.push(Extent::data(start, bs.min(list.size - start)));
                }
                Ok(())
            })?;
            self.next_block = last;
            return Ok(Some(out.into_vec()));
        }
        if !self.tail_done {
            self.tail_done = true;
            if self.size > self.list.size {
                return Ok(Some(vec![Extent::data(
                    self.list.size,
                    self.size - self.list.size,
                )]));
            }
        }
        Ok(None)
    }
}

/// Zeros fed to hashes for unallocated ranges. Small on purpose: an immutable static is a data
/// segment of the component.
static ZEROS: [u8; 4096] = [0; 4096];

/// Hash `[0, size)` of `r` in blocks of `block_size`, calling `on_block(index, sha256)` for
/// each block in order. Unallocated ranges are hashed as zeros without being read.
fn hash_blocks(
    r: &(impl ReadAt + ?Sized),
    size: u64,
    block_size: u64,
    on_block: impl FnMut(u64, [u8; 32]) -> Result<(), Error>,
) -> Result<(), Error> {
    hash_block_range(r, size, block_size, 0, size.div_ceil(block_size), on_block)
}

/// [`hash_blocks`] for blocks `[first, last)` only.
fn hash_block_range(
    r: &(impl ReadAt + ?Sized),
    size: u64,
    block_size: u64,
    first: u64,
    last: u64,
    on_block: impl FnMut(u64, [u8; 32]) -> Result<(), Error>,
) -> Result<(), Error> {
    let start = (first * block_size).min(size);
    let end = (last * block_size).min(size);
    let mut hasher = BlockHasher {
        block_size,
        size,
        index: first,
        filled: 0,
        sha: Sha256::new(),
        zero_block_hash: None,
        on_block,
    };
    walk_allocation(r, start, end, |segment| {
        if segment.kind.needs_read() {
            let mut pos = segment.offset;
            while pos < segment.end() {
                let n = PIECE.min(segment.end() - pos);
                hasher.feed(&read_exact_at(r, pos, to_usize(n))?)?;
                pos += n;
            }
        } else {
            hasher.feed_zeros(segment.length)?;
        }
        Ok(true)
    })
}

/// Streams bytes into per-block SHA-256s.
struct BlockHasher<F> {
    block_size: u64,
    size: u64,
    /// The block being hashed.
    index: u64,
    /// Bytes of it hashed so far.
    filled: u64,
    sha: Sha256,
    /// The hash of a whole block of zeros, once needed.
    zero_block_hash: Option<[u8; 32]>,
    on_block: F,
}

impl<F: FnMut(u64, [u8; 32]) -> Result<(), Error>> BlockHasher<F> {
    fn block_len(&self) -> u64 {
        self.block_size
            .min(self.size - self.index * self.block_size)
    }

    fn feed(&mut self, mut data: &[u8]) -> Result<(), Error> {
        while !data.is_empty() {
            let take = to_usize((self.block_len() - self.filled).min(data.len() as u64));
            self.sha.update(&data[..take]);
            self.filled += take as u64;
            data = &data[take..];
            self.finish_if_full()?;
        }
        Ok(())
    }

    fn feed_zeros(&mut self, mut n: u64) -> Result<(), Error> {
        while n > 0 {
            let block_len = self.block_len();
            if self.filled == 0 && block_len == self.block_size && n >= block_len {
                let bs = self.block_size;
                let hash = *self.zero_block_hash.get_or_insert_with(|| zeros_hash(bs));
                (self.on_block)(self.index, hash)?;
                self.index += 1;
                n -= block_len;
                continue;
            }
            let take = (block_len - self.filled).min(n).min(ZEROS.len() as u64);
            self.sha.update(&ZEROS[..to_usize(take)]);
            self.filled += take;
            n -= take;
            self.finish_if_full()?;
        }
        Ok(())
    }

    fn finish_if_full(&mut self) -> Result<(), Error> {
        if self.filled == self.block_len() {
            let hash: [u8; 32] = self.sha.finalize_reset().into();
            (self.on_block)(self.index, hash)?;
            self.index += 1;
            self.filled = 0;
        }
        Ok(())
    }
}

/// SHA-256 of `n` zero bytes.
fn zeros_hash(mut n: u64) -> [u8; 32] {
    let mut sha = Sha256::new();
    while n > 0 {
        let take = n.min(ZEROS.len() as u64);
        sha.update(&ZEROS[..to_usize(take)]);
        n -= take;
    }
    sha.finalize().into()
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test disks are a few MiB
mod tests {
    use super::*;
    use crate::tests::Sparse;
    use crate::{Options, PhysicalDisk};
    use ferry_plugin_sdk::adapter::{Disk, Reader};
    use ferry_plugin_sdk::io::ExtentKind;

    const BS: u64 = 4096;

    fn doc(lines: &[&str]) -> Vec<u8> {
        let mut s = lines.join("\n");
        s.push('\n');
        s.into_bytes()
    }

    fn err_of(document: &[u8]) -> String {
        match parse_checksum_list(document) {
            Err(Error::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[test]
    fn list_matches_independent_hashes() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 249) as u8).collect();
        let list = checksum_list(&data, BS).unwrap();
        let expected = format!(
            "ferry-checksums v1\nblock-size 4096\nsize 10000\n{}\n{}\n{}\n",
            sha(&data[..4096]),
            sha(&data[4096..8192]),
            sha(&data[8192..])
        );
        assert_eq!(list, expected);
        let parsed = parse_checksum_list(list.as_bytes()).unwrap();
        assert_eq!(
            (parsed.block_size, parsed.size, parsed.hashes.len()),
            (4096, 10_000, 3)
        );
        // The final newline is optional.
        assert_eq!(
            parse_checksum_list(list.trim_end().as_bytes()).unwrap(),
            parsed
        );
        let empty = checksum_list(&Vec::new(), BS).unwrap();
        assert_eq!(empty, "ferry-checksums v1\nblock-size 4096\nsize 0\n");
        assert!(
            parse_checksum_list(empty.as_bytes())
                .unwrap()
                .hashes
                .is_empty()
        );
    }

    #[test]
    fn holes_hash_as_zeros() {
        let mut data = vec![0u8; 5 * BS as usize + 100];
        data[BS as usize] = 9;
        let sparse = Sparse {
            data: data.clone(),
            map: vec![
                Extent::new(0, BS, ExtentKind::Unallocated),
                Extent::data(BS, 10),
                Extent::new(BS + 10, 4 * BS + 90, ExtentKind::Unallocated),
            ],
            per_call: 2,
        };
        assert_eq!(
            checksum_list(&sparse, BS).unwrap(),
            checksum_list(&data, BS).unwrap()
        );
    }

    #[test]
    fn parse_errors_name_the_line() {
        let h = sha(b"x");
        assert!(err_of(b"").starts_with("checksum list line 1: missing"));
        assert!(err_of(b"ferry-checksums v2\n").starts_with("checksum list line 1: expected"));
        assert!(err_of(&doc(&[HEADER])).starts_with("checksum list line 2: missing"));
        assert!(
            err_of(&doc(&[HEADER, "block-size 4000", "size 0"]))
                .contains("line 2: block size 4000")
        );
        assert!(err_of(&doc(&[HEADER, "block-size 2048", "size 0"])).contains("line 2"));
        assert!(err_of(&doc(&[HEADER, "block-size 134217728", "size 0"])).contains("line 2"));
        assert!(err_of(&doc(&[HEADER, "block-size +4096", "size 0"])).contains("line 2"));
        assert!(err_of(&doc(&[HEADER, "block-size 4096", "size -1"])).contains("line 3"));
        assert!(err_of(&doc(&[HEADER, "block-size 4096"])).contains("line 3: missing"));
        let m = err_of(&doc(&[HEADER, "block-size 4096", "size 5000", &h]));
        assert!(m.starts_with("checksum list line 5: missing"), "{m}");
        assert!(
            m.contains("has 2 block hashes, the list ends after 1"),
            "{m}"
        );
        let m = err_of(&doc(&[HEADER, "block-size 4096", "size 4096", &h, &h]));
        assert!(
            m.starts_with("checksum list line 5: more than the 1"),
            "{m}"
        );
        let upper = h.to_uppercase();
        let m = err_of(&doc(&[HEADER, "block-size 4096", "size 4096", &upper]));
        assert!(
            m.starts_with("checksum list line 4: expected a SHA-256"),
            "{m}"
        );
        let m = err_of(&doc(&[HEADER, "block-size 4096", "size 4096", ""]));
        assert!(m.contains("line 4"), "{m}");
        let crlf = format!("{HEADER}\r\nblock-size 4096\r\nsize 0\r\n");
        assert!(err_of(crlf.as_bytes()).contains("line 1"));
        let mut bad_utf8 = doc(&[HEADER, "block-size 4096"]);
        bad_utf8.extend_from_slice(b"size \xff\n");
        assert!(err_of(&bad_utf8).starts_with("checksum list line 3: not UTF-8"));
        assert!(matches!(
            checksum_list(&vec![0u8; 10], 1000),
            Err(Error::Invalid(_))
        ));
    }

    fn disk(data: Vec<u8>) -> PhysicalDisk {
        PhysicalDisk::new(Reader::new(data), Options::default())
    }

    #[test]
    fn mutation_smoke() {
        let data: Vec<u8> = (0..5 * BS + 77).map(|i| (i % 253) as u8).collect();
        let list = checksum_list(&data, BS).unwrap();
        ferry_plugin_sdk::testing::mutations(list.as_bytes(), 3000, |d| {
            if let Ok(l) = parse_checksum_list(d) {
                assert_eq!(l.hashes.len() as u64, l.size.div_ceil(l.block_size));
                // A parsed list always drives a change set to the end.
                let _ = disk(data.clone()).changes(d).and_then(|mut c| c.drain());
            }
        });
    }

    #[test]
    fn change_sets_hand_out_bounded_batches() {
        let old: Vec<u8> = (0..8 * BS).map(|i| (i % 251) as u8).collect();
        let list = checksum_list(&old, BS).unwrap();
        let mut new = old.clone();
        for b in 0..8 {
            new[(b * BS) as usize] ^= 1; // every block changed
        }
        let d = disk(new);
        let mut set = d.changes(list.as_bytes()).unwrap();
        let mut calls = 0;
        let mut seen = 0;
        while let Some(batch) = set.next(3).unwrap() {
            assert!(batch.len() <= 3, "{batch:?}");
            seen += batch.iter().map(|e| e.length).sum::<u64>();
            calls += 1;
        }
        assert_eq!(seen, 8 * BS);
        assert!(calls >= 3, "{calls} calls");
        assert!(set.next(3).unwrap().is_none(), "stays finished");
    }

    #[test]
    fn changes_round_trip() {
        let old: Vec<u8> = (0..10 * BS + 123).map(|i| (i % 241) as u8).collect();
        let list = checksum_list(&old, BS).unwrap();
        assert!(
            disk(old.clone())
                .changes(list.as_bytes())
                .unwrap()
                .drain()
                .unwrap()
                .is_empty()
        );

        let mut new = old.clone();
        new[5] ^= 1; // block 0
        new[(3 * BS) as usize] ^= 1; // block 3
        new[(4 * BS + 7) as usize] ^= 1; // block 4: coalesces with 3
        new[(10 * BS + 100) as usize] ^= 1; // last, partial block
        new.extend_from_slice(&[1u8; 1000]); // the disk grew
        let got = disk(new.clone())
            .changes(list.as_bytes())
            .unwrap()
            .drain()
            .unwrap();
        assert_eq!(
            got,
            vec![
                Extent::data(0, BS),
                Extent::data(3 * BS, 2 * BS),
                // The changed short last block and the grown tail coalesce.
                Extent::data(10 * BS, 123 + 1000),
            ]
        );

        // Applying the reported extents to the old disk gives the new one.
        let mut patched = old.clone();
        patched.resize(new.len(), 0);
        for e in &got {
            let (a, b) = (e.offset as usize, e.end() as usize);
            patched[a..b].copy_from_slice(&new[a..b]);
        }
        assert_eq!(patched, new);
    }

    #[test]
    fn grown_disk_with_unchanged_blocks_reports_only_the_tail() {
        let old = vec![7u8; 2 * BS as usize];
        let list = checksum_list(&old, BS).unwrap();
        let mut new = old.clone();
        new.extend_from_slice(&[0u8; 10]);
        assert_eq!(
            disk(new).changes(list.as_bytes()).unwrap().drain().unwrap(),
            vec![Extent::data(2 * BS, 10)]
        );
    }

    #[test]
    fn shrunken_disk_is_invalid() {
        let list = checksum_list(&vec![1u8; 3 * BS as usize], BS).unwrap();
        let e = disk(vec![1u8; 2 * BS as usize])
            .changes(list.as_bytes())
            .and_then(|mut c| c.drain())
            .unwrap_err();
        assert!(
            matches!(&e, Error::Invalid(m) if m.starts_with("checksum list line 3:") && m.contains("shrunk")),
            "{e}"
        );
        let e = disk(vec![1u8; 10])
            .changes(b"nonsense")
            .and_then(|mut c| c.drain())
            .unwrap_err();
        assert!(matches!(e, Error::Invalid(_)));
    }
}
