//! Recovery-point records: `points/<item>/<point id>`.
//!
//! A record is the commit point of a cycle: it is written, create-only, after every pack and
//! the index segment it depends on, so a point that can be listed can be restored. It is a
//! sealed object bound to its path. Body (version 1, little-endian):
//!
//! ```text
//! u8 version | str id | str item | u64 created (Unix ms) | u8 consistency (0 crash, 1 app)
//! | str parent ("" = none) | str source | u32 disk count
//!   per disk: str name | u64 size | u32 chunk size | u8 levels | id[32] root
//!             | u64 bytes read | u64 bytes stored (new, after compression)
//! | u32 tag count, per tag: str key | str value
//! ```
//! (`str` = u16 length + UTF-8.)

use crate::ChunkId;
use crate::codec::{DecodeError, Reader, Writer};
use crate::error::{Result, StoreError};

const RECORD_VERSION: u8 = 1;
/// Prefix of all point records.
pub const POINTS_PREFIX: &str = "points/";

/// Crash- or application-consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Crash-consistent.
    Crash,
    /// Application-consistent.
    App,
}

impl Consistency {
    /// Name for output.
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Crash => "crash",
            Consistency::App => "app",
        }
    }
}

/// One disk of a recovery point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRecord {
    /// Disk name within the item.
    pub name: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Tree levels.
    pub levels: u8,
    /// Tree root (`ChunkId::ZERO` for an all-zero disk).
    pub root: ChunkId,
    /// Bytes read from the source for this point.
    pub bytes_read: u64,
    /// Bytes newly stored in the vault for this point: new data and page blobs after dedup
    /// and compression, including their GCM tags.
    pub bytes_stored: u64,
}

impl DiskRecord {
    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_size))
    }
}

/// A recovery point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointRecord {
    /// Point id (sortable by time).
    pub id: String,
    /// Protected item.
    pub item: String,
    /// Creation time, Unix milliseconds.
    pub created_ms: u64,
    /// Consistency.
    pub consistency: Consistency,
    /// Previous point of the item this one was built on, if any.
    pub parent: Option<String>,
    /// Where the data came from (free text: "import /dev/sdb", "agent", …).
    pub source: String,
    /// Disks.
    pub disks: Vec<DiskRecord>,
    /// Free-form tags.
    pub tags: Vec<(String, String)>,
}

impl PointRecord {
    /// Object path.
    pub fn object_name(&self) -> String {
        point_object(&self.item, &self.id)
    }

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(256);
        w.u8(RECORD_VERSION)
            .str(&self.id)
            .str(&self.item)
            .u64(self.created_ms)
            .u8(match self.consistency {
                Consistency::Crash => 0,
                Consistency::App => 1,
            })
            .str(self.parent.as_deref().unwrap_or(""))
            .str(&self.source);
        #[allow(clippy::cast_possible_truncation)] // validated small counts
        w.u32(self.disks.len() as u32);
        for d in &self.disks {
            w.str(&d.name)
                .u64(d.size)
                .u32(d.chunk_size)
                .u8(d.levels)
                .id(&d.root)
                .u64(d.bytes_read)
                .u64(d.bytes_stored);
        }
        #[allow(clippy::cast_possible_truncation)] // validated small counts
        w.u32(self.tags.len() as u32);
        for (k, v) in &self.tags {
            w.str(k).str(v);
        }
        w.into_inner()
    }

    /// Decodes a body read from `object`, checking it belongs there.
    pub fn decode(object: &str, b: &[u8]) -> Result<Self> {
        let bad = |e: DecodeError| StoreError::corrupt(object, e.to_string());
        let mut r = Reader::new(b);
        let v = r.u8("record version").map_err(bad)?;
        if v != RECORD_VERSION {
            return Err(StoreError::UnsupportedVersion {
                object: object.into(),
                found: v.into(),
                supported: RECORD_VERSION.into(),
            });
        }
        let id = r.str("id").map_err(bad)?;
        let item = r.str("item").map_err(bad)?;
        let created_ms = r.u64("created").map_err(bad)?;
        let consistency = match r.u8("consistency").map_err(bad)? {
            0 => Consistency::Crash,
            1 => Consistency::App,
            c => return Err(StoreError::corrupt(object, format!("consistency {c}"))),
        };
        let parent = Some(r.str("parent").map_err(bad)?).filter(|p| !p.is_empty());
        let source = r.str("source").map_err(bad)?;
        let n = r
            .count("disk count", 4096, 2 + 8 + 4 + 1 + 32 + 16)
            .map_err(bad)?;
        let mut disks = Vec::with_capacity(n);
        for _ in 0..n {
            let d = DiskRecord {
                name: r.str("disk name").map_err(bad)?,
                size: r.u64("disk size").map_err(bad)?,
                chunk_size: r.u32("chunk size").map_err(bad)?,
                levels: r.u8("levels").map_err(bad)?,
                root: r.id("root").map_err(bad)?,
                bytes_read: r.u64("bytes read").map_err(bad)?,
                bytes_stored: r.u64("bytes stored").map_err(bad)?,
            };
            crate::check_chunk_size(d.chunk_size).map_err(|e| StoreError::corrupt(object, e))?;
            if d.levels != crate::tree::levels_for(d.chunks()) {
                return Err(StoreError::corrupt(
                    object,
                    "tree levels do not fit the disk size",
                ));
            }
            disks.push(d);
        }
        let n = r.count("tag count", 4096, 4).map_err(bad)?;
        let mut tags = Vec::with_capacity(n);
        for _ in 0..n {
            tags.push((
                r.str("tag key").map_err(bad)?,
                r.str("tag value").map_err(bad)?,
            ));
        }
        r.finish().map_err(bad)?;
        let rec = Self {
            id,
            item,
            created_ms,
            consistency,
            parent,
            source,
            disks,
            tags,
        };
        if rec.object_name() != object {
            return Err(StoreError::corrupt(
                object,
                "record names another item or point",
            ));
        }
        Ok(rec)
    }

    /// The disk named `name`, or the only disk when `name` is `None`.
    pub fn disk(&self, name: Option<&str>) -> Result<&DiskRecord> {
        match name {
            Some(n) => self.disks.iter().find(|d| d.name == n).ok_or_else(|| {
                StoreError::InvalidArgument(format!(
                    "point {} of `{}` has no disk `{n}` (it has: {})",
                    self.id,
                    self.item,
                    self.disk_names()
                ))
            }),
            None if self.disks.len() == 1 => Ok(&self.disks[0]),
            None => Err(StoreError::InvalidArgument(format!(
                "point {} of `{}` has {} disks ({}); name one",
                self.id,
                self.item,
                self.disks.len(),
                self.disk_names()
            ))),
        }
    }

    fn disk_names(&self) -> String {
        self.disks
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Object path of a point.
pub fn point_object(item: &str, id: &str) -> String {
    format!("{POINTS_PREFIX}{item}/{id}")
}

/// A new point id for time `ms`: `YYYYMMDDTHHMMSS.mmmZ-xxxxxxxx`, sortable by time.
pub fn new_point_id(ms: u64) -> String {
    let r = crate::crypto::random_bytes::<4>();
    format!("{}-{}", compact_time(ms), hex::encode(r))
}

/// `YYYYMMDDTHHMMSS.mmmZ`.
pub fn compact_time(ms: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(ms / 1000);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}.{:03}Z", ms % 1000)
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(ms: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(ms / 1000);
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z",
        ms % 1000
    )
}

/// Parses an RFC 3339 time (`2026-11-27T05:20:00Z`, `2026-11-27T06:20:00.250+01:00`; `t`,
/// `z` and a space for `T` accepted) into Unix milliseconds. `None` when `s` is not one, or
/// is before 1970. Fractions beyond milliseconds are truncated.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = b.get(r)?;
        if t.is_empty() || !t.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(t).ok()?.parse().ok()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo) || d < 1 || d > days_in[usize::try_from(mo - 1).ok()?] {
        return None;
    }
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ms = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        let digits = &s[start..i.min(start + 3)];
        frac_ms = digits.parse::<i64>().ok()? * 10i64.pow(3 - u32::try_from(digits.len()).ok()?);
    }
    let offset_s = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    // Howard Hinnant's days-from-civil.
    let (yy, mm) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec.min(59) - offset_s;
    u64::try_from(secs * 1000 + frac_ms).ok()
}

/// Unix seconds → (year, month, day, hour, minute, second), proleptic Gregorian, UTC.
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    #[allow(clippy::cast_possible_truncation)] // all bounded by the calendar
    (
        y,
        m as u32,
        d as u32,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

/// Current time in Unix milliseconds.
pub fn now_ms() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_parses_what_it_prints_and_refuses_the_rest() {
        for ms in [0, 1_700_000_000_123, 1_795_690_000_000, 951_782_400_000] {
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms), "{}", rfc3339(ms));
        }
        assert_eq!(
            parse_rfc3339("2026-11-27T05:20:00Z"),
            Some(1_795_756_800_000)
        );
        assert_eq!(
            parse_rfc3339("2026-11-27T06:20:00.5+01:00"),
            Some(1_795_756_800_500)
        );
        assert_eq!(
            parse_rfc3339("2026-11-27 05:20:00.123456z"),
            Some(1_795_756_800_123)
        );
        for bad in [
            "",
            "latest",
            "20261127T052000.000Z-0badf00d",
            "2026-11-27T05:20:00",
            "2026-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-27T24:00:00Z",
            "2026-11-27T05:20:00.Z",
            "2026-11-27T05:20:00+0100",
            "1969-12-31T23:59:59Z",
            "2026-11-27T05:20:00Zjunk",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    fn rec() -> PointRecord {
        PointRecord {
            id: new_point_id(1_700_000_000_123),
            item: "web-01".into(),
            created_ms: 1_700_000_000_123,
            consistency: Consistency::App,
            parent: None,
            source: "import".into(),
            disks: vec![DiskRecord {
                name: "disk0".into(),
                size: 10 << 20,
                chunk_size: 1 << 16,
                levels: 1,
                root: ChunkId([4; 32]),
                bytes_read: 5,
                bytes_stored: 6,
            }],
            tags: vec![("k".into(), "v".into())],
        }
    }

    #[test]
    fn record_roundtrip_and_path_binding() {
        let r = rec();
        let b = r.encode();
        assert_eq!(PointRecord::decode(&r.object_name(), &b).unwrap(), r);
        assert!(PointRecord::decode("points/other/x", &b).is_err());
        assert!(PointRecord::decode(&r.object_name(), &b[..b.len() - 2]).is_err());
    }

    #[test]
    fn time_formats() {
        assert_eq!(compact_time(1_700_000_000_123), "20231114T221320.123Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        let a = new_point_id(1_700_000_000_123);
        let b = new_point_id(1_700_000_000_124);
        assert!(a < b);
    }
}
