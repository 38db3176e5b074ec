//! Change lists: which byte ranges of a disk changed since the previous point.
//!
//! The accepted document has the shape of vSphere's `DiskChangeInfo` (what
//! `QueryChangedDiskAreas` returns):
//! `{"startOffset": 0, "length": N, "changedArea": [{"start": S, "length": L}, …]}`.
//! Every area must lie inside `[startOffset, startOffset + length)` and inside the disk; a
//! document that breaks either rule is refused as a whole, naming the offending area.

use std::ops::Range;
use std::path::Path;

use serde::Deserialize;

use crate::error::{Result, StoreError};

/// Largest changes document read (it is parsed in memory).
pub const MAX_CHANGES_FILE: u64 = 256 << 20;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DiskChangeInfo {
    start_offset: u64,
    length: u64,
    changed_area: Vec<Area>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Area {
    start: u64,
    length: u64,
}

/// Reads and validates a changes file against a disk of `disk_size` bytes.
pub fn load_changes(path: &Path, disk_size: u64) -> Result<Vec<Range<u64>>> {
    let io = |source| StoreError::InputIo {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_CHANGES_FILE {
        return Err(StoreError::InvalidChanges {
            path: path.into(),
            reason: format!("file is {len} bytes, larger than the {MAX_CHANGES_FILE}-byte limit"),
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    parse_changes(&bytes, disk_size).map_err(|reason| StoreError::InvalidChanges {
        path: path.into(),
        reason,
    })
}

/// Parses a `DiskChangeInfo` document; returns the changed byte ranges.
pub fn parse_changes(bytes: &[u8], disk_size: u64) -> std::result::Result<Vec<Range<u64>>, String> {
    let doc: DiskChangeInfo =
        serde_json::from_slice(bytes).map_err(|e| format!("not a DiskChangeInfo document: {e}"))?;
    let end = doc
        .start_offset
        .checked_add(doc.length)
        .ok_or("startOffset + length overflows")?;
    if end > disk_size {
        return Err(format!(
            "startOffset + length = {end} is past the end of the {disk_size}-byte disk"
        ));
    }
    let mut out = Vec::with_capacity(doc.changed_area.len());
    for (i, a) in doc.changed_area.iter().enumerate() {
        let a_end = a
            .start
            .checked_add(a.length)
            .ok_or_else(|| format!("changedArea[{i}]: start + length overflows"))?;
        if a.start < doc.start_offset || a_end > end {
            return Err(format!(
                "changedArea[{i}] ({}..{a_end}) is outside the covered range {}..{end}",
                a.start, doc.start_offset
            ));
        }
        if a.length > 0 {
            out.push(a.start..a_end);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_vsphere_shape() {
        let d = br#"{"startOffset":0,"length":1048576,"changedArea":[{"start":4096,"length":512},{"start":0,"length":0}]}"#;
        assert_eq!(parse_changes(d, 1 << 20).unwrap(), vec![4096..4608]);
    }

    #[test]
    fn refuses_areas_past_the_disk_and_malformed_documents() {
        let d = br#"{"startOffset":0,"length":2097152,"changedArea":[]}"#;
        assert!(
            parse_changes(d, 1 << 20)
                .unwrap_err()
                .contains("past the end")
        );
        let d = br#"{"startOffset":0,"length":1048576,"changedArea":[{"start":1048000,"length":4096}]}"#;
        assert!(
            parse_changes(d, 1 << 20)
                .unwrap_err()
                .contains("changedArea[0]")
        );
        let d = br#"{"startOffset":0,"length":18446744073709551615,"changedArea":[{"start":18446744073709551615,"length":2}]}"#;
        assert!(parse_changes(d, u64::MAX).is_err());
        assert!(parse_changes(b"[1,2]", 10).is_err());
        assert!(
            parse_changes(
                br#"{"startOffset":0,"length":1,"changedArea":[],"x":1}"#,
                10
            )
            .is_err()
        );
    }
}
