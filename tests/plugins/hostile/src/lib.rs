//! `hostile`: a source adapter that misbehaves on purpose, so the plugin host's limits and
//! error paths are tested against a real component.
//!
//! It behaves like a plain raw adapter (name `hostile`, probe always true, virtual size = the
//! reader's size, one `data` extent per request) except where config key `mode` says:
//!
//! | `mode` | Call | What it does |
//! |---|---|---|
//! | `good` or unset | `read` | a correct raw read |
//! | `spin` | `read` | loops forever (deadline / fuel) |
//! | `memory` | `read` | allocates 1 MiB blocks and writes every page of each, forever (memory cap) |
//! | `recurse` | `read` | unbounded non-tail recursion (wasm stack cap) |
//! | `huge-output` | `read` | returns `len * 1024` bytes (at least 1 KiB, at most 3 GiB) instead of `len` |
//! | `log-flood` | `read` | logs 1,000,000 lines of 8 KiB at `info`, then a correct read (log rate limit) |
//! | `out-of-range` | `read` | asks the reader for 2 MiB at 1 GiB past its end; returns the host's error as `error::io` |
//! | `trap` | `read` | one real reader read, then panics with "hostile: trap in the middle of read" |
//! | `huge-log-line` | `read` | logs one 32 MiB line at `warn`, then a correct read (line truncation) |
//! | `huge-extents` | `extents` | returns 10,000,000 one-byte `data` extents (extent cap) |
//!
//! The mode is read in `open`; an unknown mode fails `open` with `error::invalid`. Modes that
//! apply to `read` leave `extents` correct, and the reverse.

use core::hint::black_box;

use ferry_plugin_sdk::adapter::{
    Disk, DiskInfo, Error, Location, Mapping, PluginInfo, Reader, SourceAdapter, check_range,
    check_read,
};
use ferry_plugin_sdk::config;
use ferry_plugin_sdk::io::{Extent, ReadAt, read_exact_at};

/// The message of the `trap` mode's panic.
pub const TRAP_MESSAGE: &str = "hostile: trap in the middle of read";

/// What the plugin does wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nothing.
    Good,
    /// Loop forever in `read`.
    Spin,
    /// Allocate forever in `read`.
    Memory,
    /// Recurse without bound in `read`.
    Recurse,
    /// Return far more than asked from `read`.
    HugeOutput,
    /// Log a million 8 KiB lines in `read`.
    LogFlood,
    /// Read past the end and over the cap in `read`.
    OutOfRange,
    /// Panic in `read` after one host read.
    Trap,
    /// Log one 32 MiB line in `read`.
    HugeLogLine,
    /// Return ten million extents from `extents`.
    HugeExtents,
    /// Point `locate` past the end of the opened object (the host must not read there).
    BadLocate,
}

impl Mode {
    /// Every mode, with its config name.
    pub const ALL: [(&'static str, Mode); 11] = [
        ("good", Mode::Good),
        ("spin", Mode::Spin),
        ("memory", Mode::Memory),
        ("recurse", Mode::Recurse),
        ("huge-output", Mode::HugeOutput),
        ("log-flood", Mode::LogFlood),
        ("out-of-range", Mode::OutOfRange),
        ("trap", Mode::Trap),
        ("huge-log-line", Mode::HugeLogLine),
        ("huge-extents", Mode::HugeExtents),
        ("bad-locate", Mode::BadLocate),
    ];

    /// The mode named `name`.
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
    }
}

/// The adapter.
#[derive(Debug)]
pub struct Hostile;

impl SourceAdapter for Hostile {
    type Disk = HostileDisk;

    fn info() -> PluginInfo {
        PluginInfo {
            name: "hostile".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            formats: vec!["raw".to_owned()],
            description: "Test corpus: misbehaves on purpose (config key `mode`)".to_owned(),
        }
    }

    fn probe(_header: &[u8]) -> bool {
        true
    }

    fn open(reader: Reader) -> Result<HostileDisk, Error> {
        let mode = match config::get("mode") {
            None => Mode::Good,
            Some(name) => Mode::parse(&name).ok_or_else(|| {
                let known: Vec<&str> = Mode::ALL.iter().map(|(n, _)| *n).collect();
                Error::invalid(format!(
                    "hostile: unknown mode `{name}` (known: {})",
                    known.join(", ")
                ))
            })?,
        };
        Ok(HostileDisk::new(reader, mode))
    }
}

/// An opened disk with a mode.
#[derive(Debug)]
pub struct HostileDisk {
    reader: Reader,
    size: u64,
    mode: Mode,
}

impl HostileDisk {
    /// A raw disk over `reader` misbehaving as `mode` says.
    pub fn new(reader: Reader, mode: Mode) -> Self {
        let size = reader.size();
        Self { reader, size, mode }
    }

    fn good_read(&self, offset: u64, len: u32) -> Result<Vec<u8>, Error> {
        check_read(self.size, offset, len)?;
        Ok(read_exact_at(&self.reader, offset, len as usize)?)
    }
}

impl Disk for HostileDisk {
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
        if self.mode == Mode::HugeExtents {
            return Ok(huge_extents(offset));
        }
        let end = check_range(self.size, offset, length)?;
        Ok(if end > offset {
            vec![Extent::data(offset, end - offset)]
        } else {
            Vec::new()
        })
    }

    fn locate(&self, offset: u64, length: u64) -> Result<Vec<Mapping>, Error> {
        let location = if self.mode == Mode::BadLocate {
            Location::Source(u64::MAX - length)
        } else {
            Location::Adapter
        };
        Ok(vec![Mapping {
            offset,
            length,
            location,
        }])
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, Error> {
        match self.mode {
            Mode::Good | Mode::HugeExtents | Mode::BadLocate => self.good_read(offset, len),
            Mode::Spin => spin(),
            Mode::Memory => exhaust_memory(),
            Mode::Recurse => Ok(vec![recurse_forever()]),
            Mode::HugeOutput => Ok(huge_output(len)),
            Mode::LogFlood => {
                log_flood();
                self.good_read(offset, len)
            }
            Mode::OutOfRange => Err(self.out_of_range_read()),
            Mode::Trap => {
                let _ = self.good_read(offset, len)?;
                panic!("{TRAP_MESSAGE}");
            }
            Mode::HugeLogLine => {
                ferry_plugin_sdk::log::warn(&"y".repeat(32 << 20));
                self.good_read(offset, len)
            }
        }
    }
}

impl HostileDisk {
    /// Ask the host reader for 2 MiB (over its 1 MiB cap) at 1 GiB past its end.
    fn out_of_range_read(&self) -> Error {
        let offset = self.reader.size().saturating_add(1 << 30);
        match self.reader.read_at(offset, 2 << 20) {
            Err(e) => Error::Io(e),
            Ok(bytes) => Error::invalid(format!(
                "hostile: the host returned {} bytes for a read of 2 MiB at {offset}, past the \
                 end and over its cap",
                bytes.len()
            )),
        }
    }
}

/// Ten million one-byte extents from `offset`.
fn huge_extents(offset: u64) -> Vec<Extent> {
    (0..10_000_000u64)
        .map(|i| Extent::data(offset.wrapping_add(i), 1))
        .collect()
}

/// Loop forever (the counter goes through `black_box`, so the loop is not removed).
fn spin() -> ! {
    let mut i = 0u64;
    loop {
        i = black_box(i.wrapping_add(1));
    }
}

/// Allocate 1 MiB blocks and write every 4 KiB page of each until the allocator fails (which
/// aborts: a trap, or the host's memory-cap error).
fn exhaust_memory() -> ! {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut n = 0u8;
    loop {
        let mut block = vec![0u8; 1 << 20];
        for page in block.chunks_mut(4096) {
            page[0] = n;
        }
        n = n.wrapping_add(1);
        blocks.push(black_box(block));
        black_box(&blocks);
    }
}

/// Recurse until the wasm stack cap stops it. The result feeds a non-associative expression
/// after the call (no tail call, no accumulator rewrite), and the bound is opaque.
fn recurse_forever() -> u8 {
    #[inline(never)]
    fn recurse(depth: u64, limit: u64) -> u64 {
        if depth >= limit {
            return depth;
        }
        let below = recurse(depth + 1, limit);
        below.wrapping_mul(31).wrapping_sub(depth).rotate_left(7)
    }
    recurse(0, black_box(u64::MAX)).to_le_bytes()[0]
}

/// `len * 1024` bytes (at least 1 KiB, at most 3 GiB).
fn huge_output(len: u32) -> Vec<u8> {
    let bytes = (u64::from(len.max(1)) * 1024).min(3 << 30);
    // At most 3 GiB, which fits wasm32's usize.
    vec![0xA5; usize::try_from(bytes).unwrap_or(usize::MAX)]
}

/// A million lines of 8 KiB.
fn log_flood() {
    let line = "x".repeat(8 << 10);
    for _ in 0..1_000_000 {
        ferry_plugin_sdk::log::info(&line);
    }
}

ferry_plugin_sdk::export_source_adapter!(Hostile);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!(Mode::parse("huge-output"), Some(Mode::HugeOutput));
        assert_eq!(Mode::parse("nope"), None);
        ferry_plugin_sdk::testing::reset();
        ferry_plugin_sdk::testing::set_config("mode", "nope");
        let e = Hostile::open(Reader::new(vec![0u8; 4])).unwrap_err();
        assert!(
            matches!(&e, Error::Invalid(m) if m.contains("known: good, spin")),
            "{e}"
        );
    }

    #[test]
    fn harmless_modes_natively() {
        let data: Vec<u8> = (0..100u8).collect();
        let d = HostileDisk::new(Reader::new(data.clone()), Mode::Good);
        assert_eq!(d.read(10, 5).unwrap(), data[10..15]);
        assert_eq!(d.extents(0, 100).unwrap(), vec![Extent::data(0, 100)]);
        let d = HostileDisk::new(Reader::new(data.clone()), Mode::HugeOutput);
        assert_eq!(d.read(0, 3).unwrap().len(), 3 * 1024);
        let d = HostileDisk::new(Reader::new(data.clone()), Mode::OutOfRange);
        // The native reader refuses like the host: over the read cap.
        assert!(matches!(d.read(0, 1), Err(Error::Io(_))));
        let d = HostileDisk::new(Reader::new(data), Mode::Trap);
        let panic =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.read(0, 1))).unwrap_err();
        assert_eq!(
            panic.downcast_ref::<String>().map(String::as_str),
            Some(TRAP_MESSAGE)
        );
    }
}
