//! Hyper-V Resilient Change Tracking (RCT) documents: the changed ranges that
//! `GetVirtualDiskChanges` (or the WMI `Msvm_ImageManagementService` call behind
//! `Get-VHDChanges`-style tooling) returns between two RCT ids, serialised as JSON.
//!
//! It exists so that `changes` can validate a document from outside the sandbox before any of
//! it is trusted. The shape is a JSON list of objects with non-negative integer `ByteOffset`
//! and `ByteLength` (key case ignored, other keys ignored); a single object (what PowerShell's
//! `ConvertTo-Json` makes of a one-element list) is accepted too, and so is a UTF-8 BOM. Every
//! range must lie within the virtual disk. The result is sorted, with overlapping and adjacent
//! ranges merged, as `data` extents.

use ferry_plugin_sdk::adapter::Error;
use ferry_plugin_sdk::io::Extent;
use serde_json::Value;

/// Most ranges one document may hold (a document this long is already megabytes of JSON).
pub const MAX_RANGES: usize = 1 << 20;

/// Parse and validate an RCT document for a disk of `virtual_size` bytes.
///
/// # Errors
/// [`Error::Invalid`] naming the entry and the field for malformed JSON, a missing or
/// non-integer field, or a range outside the disk.
pub fn parse(document: &[u8], virtual_size: u64) -> Result<Vec<Extent>, Error> {
    let doc = document.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(document);
    let value: Value = serde_json::from_slice(doc)
        .map_err(|e| Error::invalid(format!("RCT document is not JSON: {e}")))?;
    let items = match value {
        Value::Array(items) => items,
        v @ Value::Object(_) => vec![v],
        _ => {
            return Err(Error::invalid(
                "RCT document is neither a list of ranges nor one range",
            ));
        }
    };
    if items.len() > MAX_RANGES {
        return Err(Error::invalid(format!(
            "RCT document lists {} ranges, over {MAX_RANGES}",
            items.len()
        )));
    }
    let mut ranges = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(map) = item else {
            return Err(Error::invalid(format!(
                "RCT document entry {i} is not an object"
            )));
        };
        let field = |key: &str| -> Result<u64, Error> {
            let v = map
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v)
                .ok_or_else(|| Error::invalid(format!("RCT document entry {i} has no {key}")))?;
            v.as_u64().ok_or_else(|| {
                Error::invalid(format!(
                    "RCT document entry {i}: {key} {v} is not a non-negative integer"
                ))
            })
        };
        let offset = field("ByteOffset")?;
        let length = field("ByteLength")?;
        match offset.checked_add(length) {
            Some(end) if end <= virtual_size => {}
            _ => {
                return Err(Error::invalid(format!(
                    "RCT document entry {i}: ByteOffset {offset} + ByteLength {length} is outside the virtual disk of {virtual_size} bytes"
                )));
            }
        }
        if length > 0 {
            ranges.push((offset, offset + length));
        }
    }
    ranges.sort_unstable();
    let mut out: Vec<Extent> = Vec::new();
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if start <= last.end() => {
                let new_end = last.end().max(end);
                last.length = new_end - last.offset;
            }
            _ => out.push(Extent::data(start, end - start)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sorts_and_merges() {
        let doc = br#"[{"ByteOffset": 8192, "ByteLength": 4096},
            {"ByteOffset": 0, "ByteLength": 4096},
            {"ByteOffset": 4096, "ByteLength": 1024},
            {"ByteOffset": 9000, "ByteLength": 100},
            {"byteoffset": 65536, "bytelength": 0, "Other": "x"},
            {"ByteOffset": 1048000, "ByteLength": 576}]"#;
        let e = parse(doc, 1 << 20).unwrap();
        assert_eq!(
            e,
            vec![
                Extent::data(0, 5120),
                Extent::data(8192, 4096),
                Extent::data(1_048_000, 576)
            ]
        );
        assert_eq!(parse(b"[]", 10).unwrap(), vec![]);
        let one = b"\xEF\xBB\xBF{\"ByteOffset\": 512, \"ByteLength\": 512}";
        assert_eq!(parse(one, 1024).unwrap(), vec![Extent::data(512, 512)]);
    }

    #[test]
    fn refuses_bad_documents() {
        let err = |d: &[u8]| parse(d, 1 << 20).unwrap_err().to_string();
        assert!(err(b"not json").contains("not JSON"));
        assert!(err(b"42").contains("neither"));
        assert!(err(b"[1]").contains("entry 0 is not an object"));
        let e = err(br#"[{"ByteOffset": 0}]"#);
        assert!(e.contains("ByteLength"), "{e}");
        let e = err(br#"[{"ByteOffset": -1, "ByteLength": 1}]"#);
        assert!(
            e.contains("ByteOffset -1 is not a non-negative integer"),
            "{e}"
        );
        let e = err(br#"[{"ByteOffset": 1.5, "ByteLength": 1}]"#);
        assert!(e.contains("ByteOffset"), "{e}");
        let e = err(br#"[{"ByteOffset": "0", "ByteLength": 1}]"#);
        assert!(e.contains("ByteOffset"), "{e}");
        let e = err(
            br#"[{"ByteOffset": 0, "ByteLength": 1}, {"ByteOffset": 1048576, "ByteLength": 1}]"#,
        );
        assert!(
            e.contains("entry 1") && e.contains("outside the virtual disk"),
            "{e}"
        );
        let e = err(br#"[{"ByteOffset": 18446744073709551615, "ByteLength": 2}]"#);
        assert!(e.contains("outside"), "{e}");
    }
}
