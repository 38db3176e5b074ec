//! The wire side of the EBS direct APIs: request URLs, response parsing and the checks every
//! response must pass before the adapter trusts any of it.
//!
//! It exists so that everything a (possibly hostile, possibly buggy) server sends is parsed and
//! validated in one place, with errors that name the call, the snapshot, the block and the
//! field, and so that the parsers can be fuzzed without a disk around them. Nothing here keeps
//! state; paging and the block window live in `lib.rs`, the change set in `changes.rs`.
//!
//! Three calls are used (all `GET`, JSON responses except the block itself):
//!
//! - `ListSnapshotBlocks`: `/snapshots/{SnapshotId}/blocks?maxResults=N[&pageToken=T][&startingBlockIndex=I]`
//! - `GetSnapshotBlock`: `/snapshots/{SnapshotId}/blocks/{BlockIndex}?blockToken=T`
//! - `ListChangedBlocks`: `/snapshots/{SecondSnapshotId}/changedblocks?firstSnapshotId=A&maxResults=N[&pageToken=T][&startingBlockIndex=I]`
//!
//! The host signs every request (SigV4) with the operator's credentials: no authentication
//! header is ever set here.

use base64::Engine as _;
use ferry_plugin_sdk::adapter::Error;
use ferry_plugin_sdk::http::{self, Request, Response};
use ferry_plugin_sdk::io::{IoError, IoErrorKind};
use serde::Deserialize;
use serde_json::Number;
use sha2::{Digest, Sha256};

/// Smallest block size accepted (512 bytes: what moto's emulator reports).
pub const MIN_BLOCK_SIZE: u64 = 512;
/// Largest block size accepted (1 MiB; real EBS uses 512 KiB).
pub const MAX_BLOCK_SIZE: u64 = 1 << 20;
/// Largest volume accepted, in GiB (64 TiB, the EBS limit).
pub const MAX_VOLUME_GIB: u64 = 65_536;
/// Most characters of server-provided text (an error message) quoted in an error.
const MAX_QUOTE: usize = 200;

/// The block size and volume size of a snapshot, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per block: a power of two from [`MIN_BLOCK_SIZE`] to [`MAX_BLOCK_SIZE`].
    pub block_size: u64,
    /// Volume size in GiB, from 1 to [`MAX_VOLUME_GIB`].
    pub volume_gib: u64,
}

impl Geometry {
    /// Check `BlockSize` and `VolumeSize` as a listing reports them; `ctx` names the call.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the field when a value is out of range.
    pub fn new(ctx: &str, block_size: u64, volume_gib: u64) -> Result<Self, Error> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::invalid(format!(
                "{ctx}: BlockSize {block_size} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
            )));
        }
        if !(1..=MAX_VOLUME_GIB).contains(&volume_gib) {
            return Err(Error::invalid(format!(
                "{ctx}: VolumeSize {volume_gib} GiB is not from 1 to {MAX_VOLUME_GIB} GiB"
            )));
        }
        Ok(Self {
            block_size,
            volume_gib,
        })
    }

    /// Size of the volume in bytes (at most 64 TiB).
    #[must_use]
    pub fn virtual_size(&self) -> u64 {
        self.volume_gib << 30
    }

    /// Number of blocks of the volume (a block size divides 1 GiB, so this is exact).
    #[must_use]
    pub fn blocks(&self) -> u64 {
        self.virtual_size() / self.block_size
    }

    /// Check that a later page reports the same geometry (absent fields are not checked).
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the field that differs.
    pub fn check_same(
        &self,
        ctx: &str,
        block_size: Option<u64>,
        volume_gib: Option<u64>,
    ) -> Result<(), Error> {
        if let Some(bs) = block_size
            && bs != self.block_size
        {
            return Err(Error::invalid(format!(
                "{ctx}: BlockSize {bs} differs from {} reported when the snapshot was opened",
                self.block_size
            )));
        }
        if let Some(gib) = volume_gib
            && gib != self.volume_gib
        {
            return Err(Error::invalid(format!(
                "{ctx}: VolumeSize {gib} GiB differs from {} GiB reported when the snapshot was opened",
                self.volume_gib
            )));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- requests

/// Percent-encode `s` for a URL path segment or query value: the unreserved characters
/// `A-Z a-z 0-9 - _ . ~` are kept, every other byte becomes `%XX` (uppercase hex), as SigV4's
/// canonical form expects. Block tokens contain `+`, `/` and `=`.
#[must_use]
pub fn percent_encode(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xF)]));
        }
    }
    out
}

/// Where the calls go and how large their pages are (from the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// `http(s)://host[:port][/prefix]`, without a trailing `/`.
    pub endpoint: String,
    /// `maxResults` of the list calls.
    pub max_results: u32,
}

impl Client {
    /// The `ListSnapshotBlocks` URL. `page_token` continues a listing (AWS then ignores
    /// `startingBlockIndex`, so it is sent only without a token).
    #[must_use]
    pub fn list_snapshot_blocks_url(
        &self,
        snapshot: &str,
        page_token: Option<&str>,
        starting_block_index: u64,
    ) -> String {
        let mut url = format!(
            "{}/snapshots/{}/blocks?maxResults={}",
            self.endpoint,
            percent_encode(snapshot),
            self.max_results
        );
        push_paging(&mut url, page_token, starting_block_index);
        url
    }

    /// The `GetSnapshotBlock` URL.
    #[must_use]
    pub fn get_snapshot_block_url(&self, snapshot: &str, index: u64, token: &str) -> String {
        format!(
            "{}/snapshots/{}/blocks/{index}?blockToken={}",
            self.endpoint,
            percent_encode(snapshot),
            percent_encode(token)
        )
    }

    /// The `ListChangedBlocks` URL for the changes from `first` to `second`.
    #[must_use]
    pub fn list_changed_blocks_url(
        &self,
        first: &str,
        second: &str,
        page_token: Option<&str>,
    ) -> String {
        let mut url = format!(
            "{}/snapshots/{}/changedblocks?firstSnapshotId={}&maxResults={}",
            self.endpoint,
            percent_encode(second),
            percent_encode(first),
            self.max_results
        );
        push_paging(&mut url, page_token, 0);
        url
    }
}

/// `GET url` through the host, which signs it. Any status is returned as a response; a
/// failure to get one is an [`Error::Io`] naming `ctx`.
///
/// # Errors
/// The host's error (denied, timeout, unreachable), with `ctx` prepended.
pub fn get(ctx: &str, url: String) -> Result<Response, Error> {
    http::send(Request::get(url))
        .map_err(|e| Error::Io(IoError::new(e.kind, format!("{ctx}: {}", e.message))))
}

fn push_paging(url: &mut String, page_token: Option<&str>, starting_block_index: u64) {
    match page_token {
        Some(token) => {
            url.push_str("&pageToken=");
            url.push_str(&percent_encode(token));
        }
        None if starting_block_index > 0 => {
            url.push_str(&format!("&startingBlockIndex={starting_block_index}"));
        }
        None => {}
    }
}

// ---------------------------------------------------------------- errors

/// `text` made safe to quote in an error: control characters become spaces, runs of
/// whitespace collapse, and at most 200 characters are kept.
#[must_use]
pub fn quote(text: &str) -> String {
    let mut out = String::new();
    let mut count = 0;
    let mut space = false;
    for c in text.trim().chars() {
        let c = if c.is_control() { ' ' } else { c };
        if c.is_whitespace() {
            space = true;
            continue;
        }
        if count == MAX_QUOTE {
            out.push('…');
            break;
        }
        if space && !out.is_empty() {
            out.push(' ');
            count += 1;
        }
        space = false;
        out.push(c);
        count += 1;
    }
    out
}

/// What an AWS JSON error body may carry.
#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(rename = "Message", alias = "message")]
    message: Option<serde_json::Value>,
    #[serde(rename = "Reason")]
    reason: Option<serde_json::Value>,
    #[serde(rename = "__type")]
    kind: Option<serde_json::Value>,
}

fn json_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// Check that `response` is a 2xx; otherwise an [`Error::Io`] naming `ctx`, the HTTP status,
/// the AWS error type (header `x-amzn-ErrorType` or the body's `__type`) and message (the
/// body's `Message` / `message`, or the start of a body that is not JSON), quoted short.
///
/// # Errors
/// As described, for a non-2xx status.
pub fn check_status(ctx: &str, response: &Response) -> Result<(), Error> {
    if response.is_success() {
        return Ok(());
    }
    let status = response.status;
    let kind = match status {
        401 | 403 => IoErrorKind::Denied,
        404 => IoErrorKind::NotFound,
        408 | 504 => IoErrorKind::Timeout,
        _ => IoErrorKind::Io,
    };
    let body: Option<ErrorBody> = serde_json::from_slice(&response.body).ok();
    let body = body.unwrap_or_default();
    let error_type = response
        .header("x-amzn-ErrorType")
        .map(|t| t.split(':').next().unwrap_or(t).to_owned())
        .or_else(|| {
            json_text(body.kind.as_ref())
                .map(|t| t.rsplit('#').next().unwrap_or(t.as_str()).to_owned())
        })
        .map(|t| quote(&t))
        .filter(|t| !t.is_empty());
    let message = match json_text(body.message.as_ref()) {
        Some(m) => Some(m),
        None if serde_json::from_slice::<serde_json::Value>(&response.body).is_err() => {
            Some(String::from_utf8_lossy(&response.body).into_owned())
        }
        None => None,
    }
    .map(|m| quote(&m))
    .filter(|m| !m.is_empty());
    let mut text = format!("{ctx}: HTTP {status}");
    if let Some(t) = error_type {
        text.push(' ');
        text.push_str(&t);
    }
    if let Some(m) = message {
        text.push_str(": ");
        text.push_str(&m);
    }
    if let Some(r) = json_text(body.reason.as_ref()) {
        text.push_str(&format!(" (Reason {})", quote(&r)));
    }
    Err(Error::Io(IoError::new(kind, text)))
}

// ---------------------------------------------------------------- listings

/// One parsed page of a listing: the geometry it reports, its entries (block index and, for
/// `ListSnapshotBlocks`, the block token), the token of the next page and when the block
/// tokens expire. Only the page's own consistency is checked here; [`check_indices`] checks it
/// against the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// `BlockSize`, if present.
    pub block_size: Option<u64>,
    /// `VolumeSize` (GiB), if present.
    pub volume_gib: Option<u64>,
    /// The entries, in the order listed.
    pub entries: Vec<T>,
    /// `NextToken`; `None` (or empty) on the last page.
    pub next_token: Option<String>,
    /// `ExpiryTime` in milliseconds since the epoch, if present.
    pub expiry_ms: Option<u64>,
}

/// A listed block of `ListSnapshotBlocks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedBlock {
    /// `BlockIndex`.
    pub index: u64,
    /// `BlockToken`, for `GetSnapshotBlock`.
    pub token: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct BlocksWire {
    block_size: Option<Number>,
    blocks: Option<Vec<BlockWire>>,
    expiry_time: Option<Number>,
    next_token: Option<String>,
    volume_size: Option<Number>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct BlockWire {
    block_index: Number,
    block_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ChangedWire {
    block_size: Option<Number>,
    changed_blocks: Option<Vec<ChangedBlockWire>>,
    expiry_time: Option<Number>,
    next_token: Option<String>,
    volume_size: Option<Number>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ChangedBlockWire {
    block_index: Number,
    // Either may be absent: the block is then not in that snapshot (it reads as zeros there).
    #[allow(dead_code)] // parsed for its type only: a token that is not a string is refused
    first_block_token: Option<String>,
    #[allow(dead_code)] // as above
    second_block_token: Option<String>,
}

/// `n` as a non-negative integer, or an error naming `ctx` and `field`.
fn uint(ctx: &str, field: &str, n: &Number) -> Result<u64, Error> {
    n.as_u64().ok_or_else(|| {
        Error::invalid(format!(
            "{ctx}: {field} {} is not a non-negative integer",
            quote(&n.to_string())
        ))
    })
}

/// `ExpiryTime` (epoch seconds, possibly fractional) in milliseconds.
fn expiry_ms(ctx: &str, n: &Number) -> Result<u64, Error> {
    if let Some(secs) = n.as_u64() {
        return Ok(secs.saturating_mul(1000));
    }
    match n.as_f64() {
        Some(secs) if secs.is_finite() && secs >= 0.0 => {
            let ms = (secs * 1000.0).floor();
            // In range by the check: `as` saturates at u64::MAX for the rest.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Ok(ms as u64)
        }
        _ => Err(Error::invalid(format!(
            "{ctx}: ExpiryTime {} is not a time (epoch seconds)",
            quote(&n.to_string())
        ))),
    }
}

fn not_json(ctx: &str, e: &serde_json::Error) -> Error {
    Error::invalid(format!(
        "{ctx}: the response is not what the API returns: {e}"
    ))
}

fn opt_uint(ctx: &str, field: &str, n: Option<&Number>) -> Result<Option<u64>, Error> {
    n.map(|n| uint(ctx, field, n)).transpose()
}

/// The fields both listings share, around their `entries`.
fn page<T>(
    ctx: &str,
    entries: Vec<T>,
    block_size: Option<&Number>,
    volume_size: Option<&Number>,
    next_token: Option<String>,
    expiry_time: Option<&Number>,
) -> Result<Page<T>, Error> {
    Ok(Page {
        block_size: opt_uint(ctx, "BlockSize", block_size)?,
        volume_gib: opt_uint(ctx, "VolumeSize", volume_size)?,
        entries,
        next_token: next_token.filter(|t| !t.is_empty()),
        expiry_ms: expiry_time.map(|n| expiry_ms(ctx, n)).transpose()?,
    })
}

/// Parse a `ListSnapshotBlocks` response body. `ctx` names the call and snapshot for errors.
///
/// # Errors
/// [`Error::Invalid`] for a body that is not the API's JSON, a number that is not a
/// non-negative integer, or a listed block without a token (naming the block index).
pub fn parse_snapshot_blocks(ctx: &str, body: &[u8]) -> Result<Page<ListedBlock>, Error> {
    let wire: BlocksWire = serde_json::from_slice(body).map_err(|e| not_json(ctx, &e))?;
    let mut entries = Vec::new();
    for b in wire.blocks.unwrap_or_default() {
        let index = uint(ctx, "BlockIndex", &b.block_index)?;
        let token = match b.block_token {
            Some(t) if !t.is_empty() => t,
            _ => {
                return Err(Error::invalid(format!(
                    "{ctx}: BlockIndex {index} has no BlockToken"
                )));
            }
        };
        entries.push(ListedBlock { index, token });
    }
    page(
        ctx,
        entries,
        wire.block_size.as_ref(),
        wire.volume_size.as_ref(),
        wire.next_token,
        wire.expiry_time.as_ref(),
    )
}

/// Parse a `ListChangedBlocks` response body: the entries are the changed block indices.
///
/// # Errors
/// As [`parse_snapshot_blocks`].
pub fn parse_changed_blocks(ctx: &str, body: &[u8]) -> Result<Page<u64>, Error> {
    let wire: ChangedWire = serde_json::from_slice(body).map_err(|e| not_json(ctx, &e))?;
    let entries = wire
        .changed_blocks
        .unwrap_or_default()
        .iter()
        .map(|b| uint(ctx, "BlockIndex", &b.block_index))
        .collect::<Result<Vec<_>, _>>()?;
    page(
        ctx,
        entries,
        wire.block_size.as_ref(),
        wire.volume_size.as_ref(),
        wire.next_token,
        wire.expiry_time.as_ref(),
    )
}

/// Check that `indices` are strictly increasing, follow `after` (the last index of the
/// previous page of the same listing) and lie within a volume of `blocks` blocks.
///
/// # Errors
/// [`Error::Invalid`] naming the offending `BlockIndex`.
pub fn check_indices(
    ctx: &str,
    indices: impl IntoIterator<Item = u64>,
    mut after: Option<u64>,
    blocks: u64,
) -> Result<(), Error> {
    for index in indices {
        if let Some(prev) = after
            && index <= prev
        {
            return Err(Error::invalid(format!(
                "{ctx}: BlockIndex {index} does not follow BlockIndex {prev} (indices must be strictly increasing)"
            )));
        }
        if index >= blocks {
            return Err(Error::invalid(format!(
                "{ctx}: BlockIndex {index} is past the end of the volume ({blocks} blocks)"
            )));
        }
        after = Some(index);
    }
    Ok(())
}

// ---------------------------------------------------------------- blocks

/// Check a `GetSnapshotBlock` response for block `index` of `snapshot` and return its bytes:
/// status 200, a body of exactly the block size, `x-amz-Data-Length` equal to it,
/// `x-amz-Checksum-Algorithm: SHA256` and `x-amz-Checksum` equal to the base64 SHA-256 of the
/// body. Non-2xx statuses are [`check_status`]'s business; call it first.
///
/// # Errors
/// [`Error::Invalid`] starting `block N of snap-X:` and naming what is wrong.
pub fn verify_block(
    snapshot: &str,
    index: u64,
    block_size: u64,
    response: &Response,
) -> Result<Vec<u8>, Error> {
    let bad = |what: String| Error::invalid(format!("block {index} of {snapshot}: {what}"));
    if response.status != 200 {
        return Err(bad(format!(
            "GetSnapshotBlock answered HTTP {}, expected 200",
            response.status
        )));
    }
    let header = |name: &str| {
        response
            .header(name)
            .map(str::trim)
            .ok_or_else(|| bad(format!("the response has no {name} header")))
    };
    let got = response.body.len() as u64;
    if got < block_size {
        return Err(bad(format!(
            "truncated: the body has {got} of {block_size} bytes"
        )));
    }
    if got > block_size {
        return Err(bad(format!(
            "the body has {got} bytes, more than the block size {block_size}"
        )));
    }
    let length = header("x-amz-Data-Length")?;
    if length.parse::<u64>().ok() != Some(block_size) {
        return Err(bad(format!(
            "x-amz-Data-Length is `{}`, expected the block size {block_size}",
            quote(length)
        )));
    }
    let algorithm = header("x-amz-Checksum-Algorithm")?;
    if !algorithm.eq_ignore_ascii_case("SHA256") {
        return Err(bad(format!(
            "x-amz-Checksum-Algorithm is `{}`, expected SHA256",
            quote(algorithm)
        )));
    }
    let checksum = header("x-amz-Checksum")?;
    let expected = base64::engine::general_purpose::STANDARD
        .decode(checksum)
        .ok()
        .filter(|d| d.len() == 32)
        .ok_or_else(|| {
            bad(format!(
                "x-amz-Checksum `{}` is not the base64 of a SHA-256",
                quote(checksum)
            ))
        })?;
    let actual = Sha256::digest(&response.body);
    if actual.as_slice() != expected.as_slice() {
        return Err(bad(format!(
            "checksum mismatch: x-amz-Checksum is {checksum}, the body hashes to {}",
            base64::engine::general_purpose::STANDARD.encode(actual.as_slice())
        )));
    }
    Ok(response.body.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_only_unreserved_characters() {
        assert_eq!(percent_encode("AZaz09-_.~"), "AZaz09-_.~");
        assert_eq!(percent_encode("a+b/c=="), "a%2Bb%2Fc%3D%3D");
        assert_eq!(percent_encode("a b&c?d%"), "a%20b%26c%3Fd%25");
        assert_eq!(percent_encode("é"), "%C3%A9");
        assert_eq!(percent_encode(""), "");
    }

    #[test]
    fn urls() {
        let c = Client {
            endpoint: "http://h:1".to_owned(),
            max_results: 100,
        };
        assert_eq!(
            c.list_snapshot_blocks_url("snap-1", None, 0),
            "http://h:1/snapshots/snap-1/blocks?maxResults=100"
        );
        assert_eq!(
            c.list_snapshot_blocks_url("snap-1", None, 7),
            "http://h:1/snapshots/snap-1/blocks?maxResults=100&startingBlockIndex=7"
        );
        assert_eq!(
            c.list_snapshot_blocks_url("snap-1", Some("a+b"), 7),
            "http://h:1/snapshots/snap-1/blocks?maxResults=100&pageToken=a%2Bb"
        );
        assert_eq!(
            c.get_snapshot_block_url("snap-1", 9, "x/y="),
            "http://h:1/snapshots/snap-1/blocks/9?blockToken=x%2Fy%3D"
        );
        assert_eq!(
            c.list_changed_blocks_url("snap-a", "snap-b", Some("t")),
            "http://h:1/snapshots/snap-b/changedblocks?firstSnapshotId=snap-a&maxResults=100&pageToken=t"
        );
    }

    #[test]
    fn quoting_is_short_and_printable() {
        assert_eq!(quote("  a\n\tb\u{0}c  "), "a b c");
        let long = "x".repeat(500);
        let q = quote(&long);
        assert_eq!(q.chars().count(), MAX_QUOTE + 1);
        assert!(q.ends_with('…'));
    }

    #[test]
    fn geometry_limits() {
        assert!(Geometry::new("c", 512, 1).is_ok());
        assert!(Geometry::new("c", 1 << 20, MAX_VOLUME_GIB).is_ok());
        let e = Geometry::new("c", 1000, 1).unwrap_err().to_string();
        assert!(e.contains("BlockSize 1000"), "{e}");
        assert!(Geometry::new("c", 256, 1).is_err());
        assert!(Geometry::new("c", 2 << 20, 1).is_err());
        let e = Geometry::new("c", 512, 0).unwrap_err().to_string();
        assert!(e.contains("VolumeSize 0"), "{e}");
        assert!(Geometry::new("c", 512, MAX_VOLUME_GIB + 1).is_err());
        let g = Geometry::new("c", 524_288, 8).unwrap();
        assert_eq!((g.virtual_size(), g.blocks()), (8 << 30, 16_384));
    }

    #[test]
    fn expiry_times() {
        let p = parse_snapshot_blocks("c", br#"{"ExpiryTime": 1700000000.123}"#).unwrap();
        assert_eq!(p.expiry_ms, Some(1_700_000_000_123));
        let p = parse_snapshot_blocks("c", br#"{"ExpiryTime": 1700000000}"#).unwrap();
        assert_eq!(p.expiry_ms, Some(1_700_000_000_000));
        let e = parse_snapshot_blocks("c", br#"{"ExpiryTime": -1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ExpiryTime -1"), "{e}");
        let p = parse_snapshot_blocks("c", br#"{"ExpiryTime": 1e300}"#).unwrap();
        assert_eq!(p.expiry_ms, Some(u64::MAX));
    }

    #[test]
    fn listing_fields_are_checked() {
        let e = parse_snapshot_blocks(
            "L",
            br#"{"Blocks": [{"BlockIndex": -1, "BlockToken": "t"}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("L: BlockIndex -1 is not a non-negative integer"),
            "{e}"
        );
        let e = parse_snapshot_blocks("L", br#"{"Blocks": [{"BlockIndex": 3}]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("BlockIndex 3 has no BlockToken"), "{e}");
        let e = parse_snapshot_blocks("L", br#"{"BlockSize": 1.5}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("BlockSize 1.5"), "{e}");
        let p = parse_snapshot_blocks("L", br#"{"NextToken": "", "Extra": [1]}"#).unwrap();
        assert_eq!(p.next_token, None);
        let p = parse_changed_blocks(
            "C",
            br#"{"ChangedBlocks": [{"BlockIndex": 4, "FirstBlockToken": "a"}], "NextToken": null}"#,
        )
        .unwrap();
        assert_eq!(p.entries, vec![4]);
        let e = check_indices("C", [1, 3, 3], None, 10)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("BlockIndex 3 does not follow BlockIndex 3"),
            "{e}"
        );
        let e = check_indices("C", [1], Some(1), 10)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("BlockIndex 1 does not follow BlockIndex 1"),
            "{e}"
        );
        let e = check_indices("C", [10], None, 10).unwrap_err().to_string();
        assert!(
            e.contains("BlockIndex 10 is past the end of the volume (10 blocks)"),
            "{e}"
        );
    }

    #[test]
    fn error_bodies() {
        let mut r = Response::new(
            403,
            r#"{"Message": "User: arn:aws:iam::1:user/x is not authorized"}"#,
        );
        r.headers.push((
            "X-Amzn-ErrorType".to_owned(),
            "AccessDeniedException:http://internal.amazon.com/coral/".to_owned(),
        ));
        let e = check_status("ListSnapshotBlocks of snap-1", &r).unwrap_err();
        assert!(matches!(&e, Error::Io(io) if io.kind == IoErrorKind::Denied));
        assert_eq!(
            e.to_string(),
            "reading the source: denied: ListSnapshotBlocks of snap-1: HTTP 403 AccessDeniedException: User: arn:aws:iam::1:user/x is not authorized"
        );
        let r = Response::new(
            400,
            r#"{"__type": "com.amazon#ValidationException", "message": "bad token", "Reason": "INVALID_BLOCK_TOKEN"}"#,
        );
        let e = check_status("c", &r).unwrap_err().to_string();
        assert!(
            e.ends_with("c: HTTP 400 ValidationException: bad token (Reason INVALID_BLOCK_TOKEN)"),
            "{e}"
        );
        let r = Response::new(500, "<html>\n<title>boom</title>\n</html>");
        let e = check_status("c", &r).unwrap_err().to_string();
        assert!(
            e.ends_with("c: HTTP 500: <html> <title>boom</title> </html>"),
            "{e}"
        );
        let r = Response::new(404, "");
        let e = check_status("c", &r).unwrap_err();
        assert!(
            matches!(&e, Error::Io(io) if io.kind == IoErrorKind::NotFound && io.message == "c: HTTP 404")
        );
        assert!(check_status("c", &Response::new(200, "")).is_ok());
    }
}
