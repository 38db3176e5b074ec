//! The two small JSON documents that reach the adapter from outside the sandbox: the snapshot
//! reference the host opens for it, and the change document passed to `changes`.
//!
//! They exist as plain text so that the host needs no knowledge of EBS: the operator (or the
//! orchestration above the gateway) writes `{"SnapshotId":"snap-..."}` into the object the
//! host opens, and `{"FirstSnapshotId":"snap-..."}` as the change-tracking document. Both are
//! validated strictly (size, unknown fields, snapshot id syntax) before an id is put in a URL.

use ferry_plugin_sdk::adapter::Error;
use serde::Deserialize;

/// Largest snapshot reference or change document (4 KiB).
pub const MAX_DOCUMENT: usize = 4 << 10;
/// Longest snapshot id accepted.
pub const MAX_SNAPSHOT_ID: usize = 64;

/// The object the host opens for this adapter: `{"SnapshotId":"snap-0123456789abcdef0"}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotReference {
    /// The snapshot to read.
    #[serde(rename = "SnapshotId")]
    pub snapshot_id: String,
}

/// The change document: the changes from `FirstSnapshotId` to the opened snapshot.
/// `SecondSnapshotId`, when given, must be the opened snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeDocument {
    /// The earlier snapshot.
    #[serde(rename = "FirstSnapshotId")]
    pub first_snapshot_id: String,
    /// The later snapshot (the opened one).
    #[serde(rename = "SecondSnapshotId")]
    pub second_snapshot_id: Option<String>,
}

/// Check a snapshot id as it appears in `field` of `what`: non-empty, at most
/// [`MAX_SNAPSHOT_ID`] characters of `A-Z a-z 0-9 -`.
///
/// # Errors
/// [`Error::Invalid`] naming `what`, the field and the rule.
pub fn check_snapshot_id(what: &str, field: &str, id: &str) -> Result<(), Error> {
    let why = if id.is_empty() {
        "is empty"
    } else if id.len() > MAX_SNAPSHOT_ID {
        "is longer than 64 characters"
    } else if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        "may hold only A-Z, a-z, 0-9 and `-`"
    } else {
        return Ok(());
    };
    let shown: String = id.chars().take(MAX_SNAPSHOT_ID).collect();
    Err(Error::invalid(format!(
        "{what}: {field} `{}` {why}",
        shown.escape_debug()
    )))
}

fn parse<T: for<'de> Deserialize<'de>>(what: &str, example: &str, doc: &[u8]) -> Result<T, Error> {
    if doc.len() > MAX_DOCUMENT {
        return Err(Error::invalid(format!(
            "{what} is {} bytes, over {MAX_DOCUMENT}: expected a small JSON object such as {example}",
            doc.len()
        )));
    }
    serde_json::from_slice(doc).map_err(|e| {
        Error::invalid(format!(
            "{what} is not a JSON object such as {example}: {e}"
        ))
    })
}

/// Parse and check a snapshot reference; `what` names it in errors (for example
/// `snapshot reference snap.json`).
///
/// # Errors
/// [`Error::Invalid`] for a document over 4 KiB, bad JSON, an unknown or missing field, or a
/// bad snapshot id, naming the field (and the JSON position).
pub fn parse_reference(what: &str, doc: &[u8]) -> Result<SnapshotReference, Error> {
    let r: SnapshotReference = parse(what, r#"{"SnapshotId":"snap-0123456789abcdef0"}"#, doc)?;
    check_snapshot_id(what, "SnapshotId", &r.snapshot_id)?;
    Ok(r)
}

/// Parse and check a change document against the opened snapshot `opened`.
///
/// # Errors
/// As [`parse_reference`], and when `SecondSnapshotId` is not `opened`.
pub fn parse_change_document(doc: &[u8], opened: &str) -> Result<ChangeDocument, Error> {
    const WHAT: &str = "change document";
    let d: ChangeDocument = parse(WHAT, r#"{"FirstSnapshotId":"snap-0123456789abcdef0"}"#, doc)?;
    check_snapshot_id(WHAT, "FirstSnapshotId", &d.first_snapshot_id)?;
    if let Some(second) = &d.second_snapshot_id {
        check_snapshot_id(WHAT, "SecondSnapshotId", second)?;
        if second != opened {
            return Err(Error::invalid(format!(
                "{WHAT}: SecondSnapshotId `{second}` is not the opened snapshot `{opened}`"
            )));
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(r: Result<impl std::fmt::Debug, Error>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn references() {
        let r = parse_reference("ref", br#" {"SnapshotId": "snap-0123abc"} "#).unwrap();
        assert_eq!(r.snapshot_id, "snap-0123abc");
        let e = err(parse_reference(
            "ref",
            br#"{"SnapshotId": "snap-1", "Region": "x"}"#,
        ));
        assert!(
            e.contains("unknown field `Region`") && e.contains("column"),
            "{e}"
        );
        let e = err(parse_reference("ref", br"{}"));
        assert!(e.contains("missing field `SnapshotId`"), "{e}");
        let e = err(parse_reference("ref", br#"{"SnapshotId": "snap/../x"}"#));
        assert!(
            e.contains("ref: SnapshotId `snap/../x` may hold only"),
            "{e}"
        );
        let e = err(parse_reference("ref", br#"{"SnapshotId": ""}"#));
        assert!(e.contains("SnapshotId `` is empty"), "{e}");
        let long = format!(r#"{{"SnapshotId": "{}"}}"#, "a".repeat(65));
        assert!(err(parse_reference("ref", long.as_bytes())).contains("longer than 64"));
        let ok = format!(r#"{{"SnapshotId": "{}"}}"#, "a".repeat(64));
        assert!(parse_reference("ref", ok.as_bytes()).is_ok());
        let big = format!(r#"{{"SnapshotId": "snap-1"{}}}"#, " ".repeat(MAX_DOCUMENT));
        assert!(err(parse_reference("ref", big.as_bytes())).contains("over 4096"));
        let e = err(parse_reference("ref", b"{\"SnapshotId\": 5}"));
        assert!(e.contains("invalid type") && e.contains("column"), "{e}");
        assert!(parse_reference("ref", b"\xff").is_err());
    }

    #[test]
    fn change_documents() {
        let d = parse_change_document(br#"{"FirstSnapshotId": "snap-a"}"#, "snap-b").unwrap();
        assert_eq!(
            (d.first_snapshot_id.as_str(), d.second_snapshot_id),
            ("snap-a", None)
        );
        let d = parse_change_document(
            br#"{"FirstSnapshotId": "snap-a", "SecondSnapshotId": "snap-b"}"#,
            "snap-b",
        )
        .unwrap();
        assert_eq!(d.second_snapshot_id.as_deref(), Some("snap-b"));
        let e = err(parse_change_document(
            br#"{"FirstSnapshotId": "snap-a", "SecondSnapshotId": "snap-c"}"#,
            "snap-b",
        ));
        assert!(
            e.contains("SecondSnapshotId `snap-c` is not the opened snapshot `snap-b`"),
            "{e}"
        );
        let e = err(parse_change_document(
            br#"{"FirstSnapshotId": "snap-a", "x": 1}"#,
            "b",
        ));
        assert!(e.contains("unknown field `x`"), "{e}");
        let e = err(parse_change_document(
            br#"{"FirstSnapshotId": "snap a"}"#,
            "b",
        ));
        assert!(e.contains("FirstSnapshotId `snap a`"), "{e}");
        let e = err(parse_change_document(
            br#"{"FirstSnapshotId": "snap-a""#,
            "b",
        ));
        assert!(
            e.contains("change document is not a JSON object") && e.contains("line 1"),
            "{e}"
        );
    }
}
