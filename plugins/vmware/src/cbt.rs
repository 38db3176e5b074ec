//! VMware Changed Block Tracking: the `DiskChangeInfo` document.
//!
//! vSphere answers `QueryChangedDiskAreas(snapshot, deviceKey, startOffset, changeId)` with a
//! `DiskChangeInfo`: the range it covers and the areas changed since `changeId`. The backup
//! side hands that object, as JSON, to [`crate::VmdkDisk`]'s `changes`:
//!
//! ```json
//! {"startOffset": 0, "length": 1073741824,
//!  "changedArea": [{"start": 0, "length": 65536}, {"start": 1048576, "length": 4096}]}
//! ```
//!
//! This module exists to validate that untrusted document on its own, as a pure function that
//! can be fuzzed: every number must be a non-negative integer, every area must lie within
//! `[startOffset, startOffset + length)` and within the virtual disk. The areas come out
//! sorted and merged as `data` extents. A query answers at most one range; a caller that
//! queried the disk in several calls concatenates the `changedArea` lists and passes the
//! covering range.

use ferry_plugin_sdk::adapter::Error;
use ferry_plugin_sdk::io::Extent;
use serde_json::Value;

/// Most changed areas accepted in one document.
pub const MAX_AREAS: usize = 4 << 20;

fn integer(v: Option<&Value>, field: &str) -> Result<u64, Error> {
    match v {
        None => Err(Error::invalid(format!(
            "CBT document: `{field}` is missing"
        ))),
        Some(v) => v.as_u64().ok_or_else(|| {
            Error::invalid(format!(
                "CBT document: `{field}` is {v}, not a non-negative integer"
            ))
        }),
    }
}

/// Parse a `DiskChangeInfo` document for a disk of `virtual_size` bytes into sorted, merged
/// `data` extents.
///
/// # Errors
/// [`Error::Invalid`] naming the field (and the area's index) that is missing, not an integer
/// or out of range.
pub fn parse(document: &[u8], virtual_size: u64) -> Result<Vec<Extent>, Error> {
    let doc: Value = serde_json::from_slice(document)
        .map_err(|e| Error::invalid(format!("CBT document: not JSON: {e}")))?;
    let Some(obj) = doc.as_object() else {
        return Err(Error::invalid(
            "CBT document: expected a DiskChangeInfo object",
        ));
    };
    let start = integer(obj.get("startOffset"), "startOffset")?;
    let length = integer(obj.get("length"), "length")?;
    let end = start
        .checked_add(length)
        .filter(|&e| e <= virtual_size)
        .ok_or_else(|| {
            Error::invalid(format!(
                "CBT document: startOffset {start} + length {length} is outside the virtual disk \
                 of {virtual_size} bytes"
            ))
        })?;
    let areas = match obj.get("changedArea") {
        None | Some(Value::Null) => &Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(Error::invalid(
                "CBT document: `changedArea` is not an array",
            ));
        }
    };
    if areas.len() > MAX_AREAS {
        return Err(Error::invalid(format!(
            "CBT document: {} changed areas are over the limit of {MAX_AREAS}",
            areas.len()
        )));
    }
    let mut out = Vec::with_capacity(areas.len());
    for (i, area) in areas.iter().enumerate() {
        let Some(a) = area.as_object() else {
            return Err(Error::invalid(format!(
                "CBT document: changedArea[{i}] is not an object"
            )));
        };
        let a_start = integer(a.get("start"), &format!("changedArea[{i}].start"))?;
        let a_len = integer(a.get("length"), &format!("changedArea[{i}].length"))?;
        if a_start < start || a_start.checked_add(a_len).is_none_or(|e| e > end) {
            return Err(Error::invalid(format!(
                "CBT document: changedArea[{i}] ({a_start}+{a_len}) is outside \
                 [startOffset, startOffset + length) = [{start}, {end})"
            )));
        }
        if a_len > 0 {
            out.push(Extent::data(a_start, a_len));
        }
    }
    out.sort_by_key(|e| e.offset);
    let mut merged: Vec<Extent> = Vec::with_capacity(out.len());
    for e in out {
        match merged.last_mut() {
            Some(last) if e.offset <= last.end() => {
                last.length = last.length.max(e.end() - last.offset);
            }
            _ => merged.push(e),
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sorts_and_merges() {
        let doc = br#"{"startOffset": 0, "length": 1048576, "changeId": "52 3c/7",
            "changedArea": [{"start": 65536, "length": 4096}, {"start": 0, "length": 65536},
                            {"start": 131072, "length": 0}, {"start": 69632, "length": 10},
                            {"start": 500000, "length": 100}, {"start": 500050, "length": 10}]}"#;
        let got = parse(doc, 1 << 20).unwrap();
        assert_eq!(got, vec![Extent::data(0, 69642), Extent::data(500000, 100)]);
        let empty = parse(br#"{"startOffset": 0, "length": 0, "changedArea": []}"#, 10).unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn refuses_bad_documents_naming_the_field() {
        for (doc, needle) in [
            (&br#"{"startOffset": 0, "length": 100, "changedArea": [{"start": 90, "length": 11}]}"#[..], "changedArea[0]"),
            (br#"{"startOffset": 10, "length": 90, "changedArea": [{"start": 0, "length": 5}]}"#, "changedArea[0]"),
            (br#"{"startOffset": 0, "length": 101, "changedArea": []}"#, "outside the virtual disk"),
            (br#"{"startOffset": -1, "length": 1}"#, "startOffset"),
            (br#"{"startOffset": 0.5, "length": 1}"#, "startOffset"),
            (br#"{"length": 1}"#, "startOffset` is missing"),
            (br#"{"startOffset": 0, "length": 10, "changedArea": [{"start": 0, "length": "5"}]}"#, "changedArea[0].length"),
            (br#"{"startOffset": 0, "length": 10, "changedArea": {}}"#, "not an array"),
            (br#"[1]"#, "object"),
            (b"nope", "not JSON"),
            (br#"{"startOffset": 18446744073709551615, "length": 2}"#, "outside"),
        ] {
            let e = parse(doc, 100).unwrap_err();
            assert!(
                matches!(&e, Error::Invalid(m) if m.contains(needle)),
                "{}: {e}",
                String::from_utf8_lossy(doc)
            );
        }
    }
}
