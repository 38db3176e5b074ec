//! The text descriptor: `createType`, the extent lines, the parent hint and the disk UUID.
//!
//! Every VMDK has one, either as a small text file of its own (monolithicFlat, the twoGb sets,
//! ESXi's `vmfs` layout) or embedded in a sparse extent. This module exists so that the one
//! place that turns untrusted text into *file names the adapter will open* is a pure function
//! that can be fuzzed: a name is accepted only as a plain file name (no absolute path, no path
//! separator, no `..`), and the host's `open_related` applies its own allow-list on top.

use ferry_plugin_sdk::adapter::Error;

use crate::sparse::{MAX_CAPACITY_BYTES, SECTOR};

/// Largest descriptor accepted, in bytes.
pub const MAX_DESCRIPTOR: usize = 64 << 10;
/// First line of a descriptor file.
pub const SIGNATURE: &[u8] = b"# Disk DescriptorFile";

/// The kind of an extent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// A raw file (`FLAT`, or `VMFS` on ESXi), from a sector offset.
    Flat,
    /// A hosted sparse file (`KDMV` header).
    Sparse,
    /// Zeros, no file.
    Zero,
}

/// One extent line: `RW <sectors> <TYPE> "<file>" [offset]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// 1-based line number in the descriptor.
    pub line: usize,
    /// Length in sectors.
    pub sectors: u64,
    /// Its kind.
    pub kind: ExtentType,
    /// The file name (none for `ZERO`).
    pub file: Option<String>,
    /// Start in the file, in sectors (`FLAT` / `VMFS` only).
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Descriptor {
    /// `createType`.
    pub create_type: Option<String>,
    /// `parentCID` (`ffffffff`: no parent).
    pub parent_cid: Option<String>,
    /// `parentFileNameHint`.
    pub parent_hint: Option<String>,
    /// `ddb.uuid.image`.
    pub uuid: Option<String>,
    /// The extent lines, in order.
    pub extents: Vec<ExtentLine>,
}

impl Descriptor {
    /// The parent this descriptor names, if it is a differencing disk.
    #[must_use]
    pub fn parent(&self) -> Option<String> {
        if let Some(hint) = &self.parent_hint {
            return Some(hint.clone());
        }
        match &self.parent_cid {
            Some(cid) if !cid.eq_ignore_ascii_case("ffffffff") => Some(format!("parentCID {cid}")),
            _ => None,
        }
    }

    /// The virtual size in sectors (the sum of the extents; checked at parse time).
    #[must_use]
    pub fn sectors(&self) -> u64 {
        self.extents.iter().map(|e| e.sectors).sum()
    }
}

/// Check that `name` is a plain file name in the descriptor's directory.
fn check_file_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.contains(['/', '\\']) {
        return Err(
            "has a path separator (only plain file names next to the descriptor are opened)",
        );
    }
    if name.contains("..") {
        return Err("contains `..`");
    }
    if name.contains(':') {
        return Err("has a drive or stream separator `:`");
    }
    if name.chars().any(char::is_control) {
        return Err("has a control character");
    }
    Ok(())
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
}

/// Parse a descriptor (`text` may be NUL-padded, as an embedded one is). `name` names the file
/// in errors.
///
/// # Errors
/// [`Error::Invalid`] naming the file and the line; [`Error::Unsupported`] naming an extent
/// type this adapter does not read.
pub fn parse(text: &[u8], name: &str) -> Result<Descriptor, Error> {
    let text = match text.iter().position(|&b| b == 0) {
        Some(end) => &text[..end],
        None => text,
    };
    if text.len() > MAX_DESCRIPTOR {
        return Err(Error::invalid(format!(
            "{name}: descriptor of {} bytes is over the {MAX_DESCRIPTOR}-byte limit",
            text.len()
        )));
    }
    let text = std::str::from_utf8(text)
        .map_err(|e| Error::invalid(format!("{name}: descriptor is not UTF-8: {e}")))?;
    let mut d = Descriptor::default();
    let mut total: u64 = 0;
    for (i, raw) in text.split('\n').enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad =
            |what: String| Error::invalid(format!("{name}: descriptor line {line_no}: {what}"));
        let first = line.split_whitespace().next().unwrap_or("");
        if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
            let e = parse_extent(line, line_no, name)?;
            total = total
                .checked_add(e.sectors)
                .filter(|&t| t <= MAX_CAPACITY_BYTES / SECTOR)
                .ok_or_else(|| {
                    bad("the extents add up to more than the 64 TiB capacity limit".to_owned())
                })?;
            d.extents.push(e);
        } else if let Some((key, value)) = line.split_once('=') {
            let value = unquote(value).to_owned();
            match key.trim() {
                "createType" => d.create_type = Some(value),
                "parentCID" => d.parent_cid = Some(value),
                "parentFileNameHint" => d.parent_hint = Some(value),
                "ddb.uuid.image" => d.uuid = Some(value),
                _ => {}
            }
        } else {
            return Err(bad(format!(
                "{:?} is neither `key = value` nor an extent line",
                truncate(line)
            )));
        }
    }
    Ok(d)
}

/// At most 80 characters of `s`, for messages.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn parse_extent(line: &str, line_no: usize, name: &str) -> Result<ExtentLine, Error> {
    let bad = |what: String| Error::invalid(format!("{name}: descriptor line {line_no}: {what}"));
    let mut rest = line;
    let mut token = || {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let (t, r) = rest.split_at(end);
        rest = r;
        t
    };
    let access = token();
    if access == "NOACCESS" {
        return Err(Error::unsupported(format!(
            "{name}: descriptor line {line_no}: NOACCESS extents"
        )));
    }
    let sectors_text = token();
    let sectors: u64 = sectors_text.parse().map_err(|_| {
        bad(format!(
            "extent size {sectors_text:?} is not a sector count"
        ))
    })?;
    if sectors == 0 {
        return Err(bad("extent of 0 sectors".to_owned()));
    }
    let kind_text = token();
    let kind = match kind_text {
        "FLAT" | "VMFS" => ExtentType::Flat,
        "SPARSE" => ExtentType::Sparse,
        "ZERO" => ExtentType::Zero,
        "VMFSSPARSE" | "SESPARSE" | "VMFSRDM" | "VMFSRAW" => {
            return Err(Error::unsupported(format!(
                "{name}: descriptor line {line_no}: extent type {kind_text}"
            )));
        }
        other => return Err(bad(format!("unknown extent type {:?}", truncate(other)))),
    };
    let rest = rest.trim();
    let (file, after) = if let Some(quoted) = rest.strip_prefix('"') {
        let Some(close) = quoted.find('"') else {
            return Err(bad("the extent file name has no closing quote".to_owned()));
        };
        (Some(&quoted[..close]), quoted[close + 1..].trim())
    } else if kind == ExtentType::Zero {
        (None, rest)
    } else {
        return Err(bad("the extent has no quoted file name".to_owned()));
    };
    let offset = if after.is_empty() {
        0
    } else {
        after.parse::<u64>().map_err(|_| {
            bad(format!(
                "extent offset {:?} is not a sector count",
                truncate(after)
            ))
        })?
    };
    match (kind, file) {
        (ExtentType::Zero, _) => {}
        (_, None) => return Err(bad("the extent has no quoted file name".to_owned())),
        (_, Some(f)) => {
            check_file_name(f).map_err(|why| bad(format!("extent file name {f:?} {why}")))?;
        }
    }
    if kind != ExtentType::Flat && offset != 0 {
        return Err(bad(format!("offset {offset} on a {kind_text} extent")));
    }
    if offset
        .checked_add(sectors)
        .is_none_or(|e| e > MAX_CAPACITY_BYTES / SECTOR)
    {
        return Err(bad(format!("extent offset {offset} is out of range")));
    }
    Ok(ExtentLine {
        line: line_no,
        sectors,
        kind,
        file: if kind == ExtentType::Zero {
            None
        } else {
            file.map(str::to_owned)
        },
        offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAT: &str = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
        createType=\"monolithicFlat\"\n\n# Extent description\nRW 2048 FLAT \"my disk-flat.vmdk\" 0\n\
        RW 100 ZERO\n\n# The Disk Data Base\n#DDB\nddb.uuid.image = \"60 00 C2 9a\"\n";

    #[test]
    fn parses_a_flat_descriptor() {
        let d = parse(FLAT.as_bytes(), "d.vmdk").unwrap();
        assert_eq!(d.create_type.as_deref(), Some("monolithicFlat"));
        assert_eq!(d.uuid.as_deref(), Some("60 00 C2 9a"));
        assert_eq!(d.parent(), None);
        assert_eq!(d.extents.len(), 2);
        assert_eq!(d.extents[0].file.as_deref(), Some("my disk-flat.vmdk"));
        assert_eq!((d.extents[0].line, d.extents[0].sectors), (8, 2048));
        assert_eq!(d.extents[1].kind, ExtentType::Zero);
        assert_eq!(d.sectors(), 2148);
    }

    #[test]
    fn refuses_paths_and_bad_lines() {
        for (line, needle) in [
            ("RW 10 FLAT \"/etc/passwd\" 0", "path separator"),
            ("RW 10 FLAT \"../x\" 0", "path separator"),
            ("RW 10 FLAT \"..\" 0", "`..`"),
            ("RW 10 SPARSE \"C:x\"", "drive"),
            ("RW 10 FLAT \"a\" zz", "offset"),
            ("RW x FLAT \"a\"", "sector count"),
            ("RW 10 FLAT a", "quoted file name"),
            ("RW 10 BOGUS \"a\"", "unknown extent type"),
            ("garbage", "neither"),
        ] {
            let text = format!("# Disk DescriptorFile\n{line}\n");
            let e = parse(text.as_bytes(), "d.vmdk").unwrap_err();
            assert!(
                matches!(&e, Error::Invalid(m) if m.contains("d.vmdk: descriptor line 2") && m.contains(needle)),
                "{line}: {e}"
            );
        }
        let e = parse(b"RW 10 VMFSSPARSE \"a\"\n", "d").unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        let e = parse(b"RW 137438953472 FLAT \"a\"\nRW 1 FLAT \"b\"\n", "d").unwrap_err();
        assert!(matches!(e, Error::Invalid(m) if m.contains("64 TiB")));
    }

    #[test]
    fn parent_hint_and_cid() {
        let d = parse(
            b"parentCID=1234abcd\nparentFileNameHint=\"base.vmdk\"\n",
            "d",
        )
        .unwrap();
        assert_eq!(d.parent().as_deref(), Some("base.vmdk"));
        let d = parse(b"parentCID=1234abcd\n", "d").unwrap();
        assert!(d.parent().is_some());
    }
}
