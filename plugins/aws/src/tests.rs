//! Native tests against an in-process emulation of the EBS direct APIs (answered through
//! `testing::set_http_handler`): paging by `maxResults` / `pageToken` / `startingBlockIndex`,
//! block tokens with `+`, `/` and `=` that expire, SHA-256 checksums, and a hook to tamper with
//! any response. Plus recorded moto responses, and the mutation smoke runs of the fuzz entry
//! points.
#![allow(clippy::cast_possible_truncation)] // test volumes and blocks are small

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use base64::Engine as _;
use ferry_plugin_sdk::http::{Request, Response};
use ferry_plugin_sdk::io::{IoErrorKind, Named};
use ferry_plugin_sdk::testing;
use sha2::{Digest, Sha256};

use super::*;

const ENDPOINT: &str = "http://ebs.test";
/// The clock of the tests (ms), and the tokens' default expiry one hour later (s).
const NOW_MS: u64 = 1_700_000_000_000;
const EXPIRY_S: f64 = 1_700_003_600.25;

// ---------------------------------------------------------------- the emulator

/// Which blocks a snapshot has (each with a version, which selects its content).
#[derive(Debug, Clone)]
enum Listed {
    Map(BTreeMap<u64, u8>),
    /// Every `n`th block, version 1 (for volumes too large to enumerate).
    Every(u64),
}

#[derive(Debug, Clone)]
struct Snap {
    gib: u64,
    bs: u64,
    listed: Listed,
}

impl Snap {
    fn new(gib: u64, bs: u64, blocks: impl IntoIterator<Item = (u64, u8)>) -> Self {
        Self {
            gib,
            bs,
            listed: Listed::Map(blocks.into_iter().collect()),
        }
    }

    fn blocks(&self) -> u64 {
        (self.gib << 30) / self.bs
    }

    fn version(&self, index: u64) -> Option<u8> {
        match &self.listed {
            Listed::Map(m) => m.get(&index).copied(),
            Listed::Every(n) => (index.is_multiple_of(*n) && index < self.blocks()).then_some(1),
        }
    }

    /// Up to `max` listed indices from `start`.
    fn listed_from(&self, start: u64, max: usize) -> Vec<u64> {
        match &self.listed {
            Listed::Map(m) => m.range(start..).take(max).map(|(&i, _)| i).collect(),
            Listed::Every(n) => (start.div_ceil(*n)..)
                .map(|k| k * n)
                .take_while(|&i| i < self.blocks())
                .take(max)
                .collect(),
        }
    }

    /// The bytes of block `index` (zeros when it is not listed).
    fn block(&self, index: u64) -> Vec<u8> {
        match self.version(index) {
            Some(v) => content(v, index, self.bs),
            None => vec![0; self.bs as usize],
        }
    }
}

fn content(version: u8, index: u64, bs: u64) -> Vec<u8> {
    (0..bs)
        .map(|k| ((index.wrapping_mul(31) + k * 7 + u64::from(version) * 13) % 251 + 1) as u8)
        .collect()
}

fn sha256_b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(data))
}

type Tamper = Box<dyn FnMut(&Request, &mut Response)>;

struct Emu {
    snaps: BTreeMap<String, Snap>,
    /// Tokens name their generation; a token of an older one is refused as expired.
    generation: u64,
    expiry: Option<f64>,
    tamper: Option<Tamper>,
}

impl Emu {
    fn token(&self, snap: &str, index: u64) -> String {
        format!("tk+{snap}/{index}/{}=", self.generation)
    }

    fn answer(&mut self, req: &Request) -> Response {
        let url = req
            .url
            .strip_prefix(ENDPOINT)
            .expect("the configured endpoint");
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        let q: BTreeMap<String, String> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                (k.to_owned(), percent_decode(v))
            })
            .collect();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match parts.as_slice() {
            ["snapshots", id, "blocks"] => self.list_blocks(id, &q),
            ["snapshots", id, "blocks", index] => self.get_block(id, index.parse().unwrap(), &q),
            ["snapshots", id, "changedblocks"] => self.changed_blocks(id, &q),
            _ => panic!("unexpected request {}", req.url),
        }
    }

    fn not_found(id: &str) -> Response {
        let mut r = Response::new(
            404,
            format!(r#"{{"Message":"The snapshot '{id}' does not exist."}}"#),
        );
        r.headers.push((
            "x-amzn-ErrorType".to_owned(),
            "ResourceNotFoundException:http://internal.amazon.com/".to_owned(),
        ));
        r
    }

    /// Where a page starts and how many entries it may hold (a 400 for a token not ours).
    fn paging(q: &BTreeMap<String, String>) -> Result<(u64, usize), Response> {
        let max: usize = q["maxResults"].parse().unwrap();
        assert!((100..=10_000).contains(&max), "maxResults {max}");
        let start = match q.get("pageToken") {
            Some(t) => t
                .strip_prefix("pg+")
                .and_then(|t| t.strip_suffix("/="))
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| Response::new(400, r#"{"Message":"bad token"}"#))?,
            None => q
                .get("startingBlockIndex")
                .map_or(0, |s| s.parse().unwrap()),
        };
        Ok((start, max))
    }

    fn list_blocks(&mut self, id: &str, q: &BTreeMap<String, String>) -> Response {
        let Some(snap) = self.snaps.get(id) else {
            return Self::not_found(id);
        };
        let (start, max) = match Self::paging(q) {
            Ok(p) => p,
            Err(r) => return r,
        };
        let mut listed = snap.listed_from(start, max + 1);
        let next = (listed.len() > max).then(|| format!("pg+{}/=", listed[max]));
        listed.truncate(max);
        let blocks: Vec<_> = listed
            .iter()
            .map(|&i| serde_json::json!({"BlockIndex": i, "BlockToken": self.token(id, i)}))
            .collect();
        let mut v = serde_json::json!({
            "BlockSize": snap.bs, "Blocks": blocks, "VolumeSize": snap.gib, "NextToken": next,
        });
        if let Some(e) = self.expiry {
            v["ExpiryTime"] = serde_json::json!(e);
        }
        Response::new(200, v.to_string())
    }

    fn get_block(&mut self, id: &str, index: u64, q: &BTreeMap<String, String>) -> Response {
        let Some(snap) = self.snaps.get(id) else {
            return Self::not_found(id);
        };
        if snap.version(index).is_none() || q["blockToken"] != self.token(id, index) {
            let mut r = Response::new(
                400,
                r#"{"Message":"The block token is not valid or has expired.","Reason":"INVALID_BLOCK_TOKEN"}"#,
            );
            r.headers.push((
                "x-amzn-ErrorType".to_owned(),
                "ValidationException".to_owned(),
            ));
            return r;
        }
        let body = snap.block(index);
        Response {
            status: 200,
            headers: vec![
                ("x-amz-Data-Length".to_owned(), body.len().to_string()),
                ("x-amz-Checksum".to_owned(), sha256_b64(&body)),
                ("x-amz-Checksum-Algorithm".to_owned(), "SHA256".to_owned()),
            ],
            body,
        }
    }

    fn changed_blocks(&mut self, second: &str, q: &BTreeMap<String, String>) -> Response {
        let first = &q["firstSnapshotId"];
        let (Some(a), Some(b)) = (self.snaps.get(first.as_str()), self.snaps.get(second)) else {
            return Self::not_found(first);
        };
        let (Listed::Map(ma), Listed::Map(mb)) = (&a.listed, &b.listed) else {
            panic!("changes of generated snapshots");
        };
        let (start, max) = match Self::paging(q) {
            Ok(p) => p,
            Err(r) => return r,
        };
        let mut changed: Vec<u64> = ma.keys().chain(mb.keys()).copied().collect();
        changed.sort_unstable();
        changed.dedup();
        changed.retain(|&i| i >= start && ma.get(&i) != mb.get(&i));
        let next = (changed.len() > max).then(|| format!("pg+{}/=", changed[max]));
        changed.truncate(max);
        let blocks: Vec<_> = changed
            .iter()
            .map(|&i| {
                let mut e = serde_json::json!({"BlockIndex": i});
                if ma.contains_key(&i) {
                    e["FirstBlockToken"] = self.token(first, i).into();
                }
                if mb.contains_key(&i) {
                    e["SecondBlockToken"] = self.token(second, i).into();
                }
                e
            })
            .collect();
        let v = serde_json::json!({
            "BlockSize": b.bs, "ChangedBlocks": blocks, "VolumeSize": b.gib, "NextToken": next,
            "ExpiryTime": EXPIRY_S,
        });
        Response::new(200, v.to_string())
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            assert!(
                b[i].is_ascii_alphanumeric() || b"-_.~".contains(&b[i]),
                "unencoded {:?} in {s}",
                char::from(b[i])
            );
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Reset the native state, configure the adapter (page size 100) and serve `snaps`.
fn emulate(snaps: impl IntoIterator<Item = (&'static str, Snap)>) -> Rc<RefCell<Emu>> {
    testing::reset();
    testing::set_config("endpoint", format!("{ENDPOINT}/"));
    testing::set_config("max-results", "100");
    testing::set_now_ms(NOW_MS);
    let emu = Rc::new(RefCell::new(Emu {
        snaps: snaps
            .into_iter()
            .map(|(id, s)| (id.to_owned(), s))
            .collect(),
        generation: 0,
        expiry: Some(EXPIRY_S),
        tamper: None,
    }));
    let e = Rc::clone(&emu);
    testing::set_http_handler(move |req| {
        assert_eq!(req.method, "GET");
        for h in [
            "authorization",
            "x-amz-date",
            "x-amz-security-token",
            "x-amz-content-sha256",
        ] {
            assert!(req.header(h).is_none(), "the plugin set {h}");
        }
        let mut emu = e.borrow_mut();
        let mut response = emu.answer(req);
        if let Some(t) = emu.tamper.as_mut() {
            t(req, &mut response);
        }
        Ok(response)
    });
    emu
}

fn set_tamper(emu: &Rc<RefCell<Emu>>, f: impl FnMut(&Request, &mut Response) + 'static) {
    emu.borrow_mut().tamper = Some(Box::new(f));
}

fn reference(id: &str) -> Reader {
    Reader::new(Named::new(
        "snap.json",
        format!(r#"{{"SnapshotId":"{id}"}}"#).into_bytes(),
    ))
}

fn open(id: &str) -> Result<EbsDisk, Error> {
    Aws::open(reference(id))
}

fn err<T>(r: Result<T, Error>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn is_list(r: &Request) -> bool {
    r.url.split('?').next().unwrap().ends_with("/blocks")
}

fn is_get(r: &Request) -> bool {
    r.url.contains("/blocks/")
}

fn is_changed(r: &Request) -> bool {
    r.url.contains("/changedblocks")
}

fn count(f: fn(&Request) -> bool) -> usize {
    testing::sent_requests().iter().filter(|r| f(r)).count()
}

/// The expected bytes of `[offset, offset + len)` of `snap`.
fn expected(snap: &Snap, offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut pos = offset;
    while pos < offset + len {
        let index = pos / snap.bs;
        let from = pos - index * snap.bs;
        let n = (offset + len - pos).min(snap.bs - from);
        if snap.version(index).is_some() {
            let b = snap.block(index);
            out.extend_from_slice(&b[from as usize..(from + n) as usize]);
        } else {
            out.resize(out.len() + n as usize, 0);
        }
        pos += n;
    }
    out
}

/// The expected layout of `snap` from its listed set (Map snapshots).
fn expected_extents(snap: &Snap) -> Vec<Extent> {
    let Listed::Map(m) = &snap.listed else {
        panic!()
    };
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = 0;
    let mut push = |e: Extent| match out.last_mut() {
        Some(l) if l.kind == e.kind && l.end() == e.offset => l.length += e.length,
        _ => out.push(e),
    };
    for &i in m.keys() {
        if i * snap.bs > pos {
            push(Extent::new(pos, i * snap.bs - pos, ExtentKind::Unallocated));
        }
        push(Extent::data(i * snap.bs, snap.bs));
        pos = (i + 1) * snap.bs;
    }
    let size = snap.gib << 30;
    if pos < size {
        push(Extent::new(pos, size - pos, ExtentKind::Unallocated));
    }
    out
}

/// All extents of `[offset, end)`, asking again from the end of each (short) answer. Checks
/// every answer starts where asked, is contiguous and non-empty.
fn all_extents(d: &EbsDisk, offset: u64, end: u64) -> (Vec<Extent>, usize) {
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    let mut calls = 0;
    while pos < end {
        let got = d.extents(pos, end - pos).unwrap();
        calls += 1;
        assert!(!got.is_empty());
        for e in got {
            assert_eq!(e.offset, pos, "gap or overlap");
            assert!(e.length > 0);
            pos = e.end();
            match out.last_mut() {
                Some(l) if l.kind == e.kind && l.end() == e.offset => l.length += e.length,
                _ => out.push(e),
            }
        }
    }
    assert_eq!(pos, end);
    (out, calls)
}

/// A 1 GiB volume of 512-byte blocks (2 Mi blocks): a run of 150 blocks from 0 (across the
/// first page boundary), 400 scattered ones, and the last block.
fn sparse_snap() -> Snap {
    let last = (1u64 << 30) / 512 - 1;
    let blocks = (0..150)
        .chain((0..400).map(|k| 1000 + k * 5_003))
        .chain([2_002_000, 2_002_001, last])
        .map(|i| (i, 1));
    Snap::new(1, 512, blocks)
}

// ---------------------------------------------------------------- info, config, references

#[test]
fn info_probe_and_disk_info() {
    let info = Aws::info();
    assert_eq!(
        (info.name.as_str(), info.formats),
        ("aws", vec!["ebs".to_owned()])
    );
    assert!(!info.description.contains('\n'));
    assert!(Aws::probe(br#"{"SnapshotId":"snap-0123456789abcdef0"}"#));
    assert!(Aws::probe(b" {\"SnapshotId\" : \"snap-1\"}\n"));
    assert!(!Aws::probe(br#"{"SnapshotId":"snap-1","x":1}"#));
    assert!(!Aws::probe(br#"{"SnapshotId":"snap 1"}"#));
    assert!(!Aws::probe(b"KDMV\x01\x00\x00\x00"));
    assert!(!Aws::probe(b""));

    emulate([("snap-a", Snap::new(8, 524_288, [(3, 1)]))]);
    let d = open("snap-a").unwrap();
    assert_eq!(
        d.info(),
        DiskInfo {
            format: "ebs-snapshot".to_owned(),
            virtual_size: 8 << 30,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            disk_id: Some("snap-a".to_owned()),
            parent: None,
        }
    );
    assert_eq!(d.geometry().block_size, 524_288);
    // The trailing `/` of the endpoint is dropped; the page size comes from the config.
    let sent = testing::sent_requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].url,
        format!("{ENDPOINT}/snapshots/snap-a/blocks?maxResults=100")
    );
    assert!(sent[0].headers.is_empty() && sent[0].body.is_empty());
}

#[test]
fn config_is_checked_naming_the_key() {
    emulate([("snap-a", Snap::new(1, 512, []))]);
    testing::remove_config("endpoint");
    let e = err(open("snap-a"));
    assert!(e.contains("config key `endpoint` is not set"), "{e}");
    for bad in [
        "ftp://x",
        "https://",
        "http:///x",
        "ebs.us-east-1.amazonaws.com",
        "http://h/?a=b",
        "http://h /",
    ] {
        testing::set_config("endpoint", bad);
        let e = err(open("snap-a"));
        assert!(
            e.contains("config key `endpoint` must be an http:// or https:// URL"),
            "{bad}: {e}"
        );
    }
    testing::set_config("endpoint", ENDPOINT);
    for bad in ["99", "10001", "abc", "-5", ""] {
        testing::set_config("max-results", bad);
        let e = err(open("snap-a"));
        assert!(
            e.contains(&format!(
                "config key `max-results` must be an integer from 100 to 10000, not `{bad}`"
            )),
            "{e}"
        );
    }
    testing::remove_config("max-results");
    open("snap-a").unwrap();
    assert!(
        testing::sent_requests()[0]
            .url
            .ends_with("?maxResults=10000")
    );
    testing::set_config("max-results", "10000");
    assert!(open("snap-a").is_ok());
}

#[test]
fn snapshot_references_are_checked_at_open() {
    emulate([("snap-a", Snap::new(1, 512, []))]);
    let open_doc = |doc: &[u8]| Aws::open(Reader::new(Named::new("ref.json", doc.to_vec())));
    let e = err(open_doc(br#"{"SnapshotId":"snap-a","Region":"eu-west-1"}"#));
    assert!(
        e.contains("snapshot reference ref.json") && e.contains("unknown field `Region`"),
        "{e}"
    );
    let e = err(open_doc(br#"{"SnapshotId":"../x"}"#));
    assert!(
        e.contains("snapshot reference ref.json: SnapshotId `../x` may hold only"),
        "{e}"
    );
    let e = err(open_doc(&vec![b' '; 5000]));
    assert!(
        e.contains("snapshot reference ref.json is 5000 bytes, over 4096"),
        "{e}"
    );
    let e = err(open_doc(b"{"));
    assert!(
        e.contains("EOF while parsing") && e.contains("line 1 column 1"),
        "{e}"
    );
    assert!(
        testing::sent_requests().is_empty(),
        "nothing is sent for a bad reference"
    );
    let e = err(open("snap-missing"));
    assert!(
        e.contains("not found: ListSnapshotBlocks of snap-missing: HTTP 404 ResourceNotFoundException: The snapshot 'snap-missing' does not exist."),
        "{e}"
    );
}

// ---------------------------------------------------------------- reading

#[test]
fn full_read_of_a_sparse_volume_across_pages() {
    let snap = sparse_snap();
    let listed = match &snap.listed {
        Listed::Map(m) => m.len(),
        Listed::Every(_) => unreachable!(),
    };
    emulate([("snap-a", snap.clone())]);
    let d = open("snap-a").unwrap();
    let size = d.info().virtual_size;
    let piece = u64::from(ferry_plugin_sdk::adapter::MAX_DISK_READ);
    let mut pos = 0;
    while pos < size {
        let got = d.read(pos, piece as u32).unwrap();
        assert!(
            got == expected(&snap, pos, piece),
            "bytes differ in {pos}+{piece}"
        );
        assert!(d.window.borrow().len() <= 100, "the window holds one page");
        pos += piece;
    }
    // Every listed block fetched once; one listing per page of 100 (plus the last page).
    assert_eq!(count(is_get), listed);
    let lists = count(is_list);
    assert!(lists <= listed / 100 + 2, "{lists} listings");
}

#[test]
fn unaligned_reads_use_the_last_block_and_check_the_range() {
    let snap = Snap::new(1, 512, [(0, 1), (1, 2), (3, 1)]);
    emulate([("snap-a", snap.clone())]);
    let d = open("snap-a").unwrap();
    assert_eq!(d.read(100, 1000).unwrap(), expected(&snap, 100, 1000));
    assert_eq!(count(is_get), 2);
    // Block 1 again, then the zeros of block 2 and part of block 3.
    assert_eq!(d.read(1100, 1000).unwrap(), expected(&snap, 1100, 1000));
    assert_eq!(count(is_get), 3);
    assert_eq!(d.read(1030, 10).unwrap(), vec![0; 10]);
    assert!(d.read(5, 0).unwrap().is_empty());
    let size = d.info().virtual_size;
    assert!(matches!(d.read(size - 1, 2), Err(Error::OutOfRange(_))));
    assert!(matches!(
        d.read(0, (4 << 20) + 1),
        Err(Error::OutOfRange(_))
    ));
    assert!(matches!(d.extents(size, 1), Err(Error::OutOfRange(_))));
    assert!(d.extents(size, 0).unwrap().is_empty());
    assert!(d.locate(0, 0).unwrap().is_empty());
}

#[test]
fn block_tokens_are_percent_encoded() {
    emulate([("snap-a", Snap::new(1, 512, [(5, 1)]))]);
    let d = open("snap-a").unwrap();
    d.read(5 * 512, 512).unwrap();
    let get = testing::sent_requests().into_iter().find(is_get).unwrap();
    assert_eq!(
        get.url,
        format!("{ENDPOINT}/snapshots/snap-a/blocks/5?blockToken=tk%2Bsnap-a%2F5%2F0%3D")
    );
}

#[test]
fn extents_and_locate_follow_the_listing() {
    let snap = sparse_snap();
    emulate([("snap-a", snap.clone())]);
    let d = open("snap-a").unwrap();
    let size = d.info().virtual_size;
    let (ext, calls) = all_extents(&d, 0, size);
    assert_eq!(ext, expected_extents(&snap));
    assert_eq!(
        &ext[..2],
        &[
            Extent::data(0, 150 * 512),
            Extent::new(150 * 512, 850 * 512, ExtentKind::Unallocated)
        ]
    );
    assert_eq!(calls, 1, "6 pages fit in one call");
    // An unaligned start inside a listed block.
    assert_eq!(d.extents(100, 1000).unwrap(), vec![Extent::data(100, 1000)]);
    assert_eq!(
        d.extents(149 * 512 + 1, 1023).unwrap(),
        vec![
            Extent::data(149 * 512 + 1, 511),
            Extent::new(150 * 512, 512, ExtentKind::Unallocated)
        ]
    );
    // locate: listed → adapter, the rest zero.
    let maps = d.locate(0, size).unwrap();
    let as_extents: Vec<Extent> = maps
        .iter()
        .map(|m| {
            let kind = match m.location {
                Location::Adapter => ExtentKind::Data,
                Location::Zero => ExtentKind::Unallocated,
                other => panic!("nothing is stored as is: {other:?}"),
            };
            Extent::new(m.offset, m.length, kind)
        })
        .collect();
    assert_eq!(as_extents, expected_extents(&snap));
}

#[test]
fn extents_stop_short_after_a_few_pages() {
    // 2,000 isolated blocks: 20 pages of 100, more than one call fetches.
    let snap = Snap::new(1, 512, (0..2000).map(|k| (k * 3, 1)));
    emulate([("snap-a", snap.clone())]);
    let d = open("snap-a").unwrap();
    let size = d.info().virtual_size;
    let before = count(is_list);
    let first = d.extents(0, size).unwrap();
    assert!(first.last().unwrap().end() < size, "stops short");
    assert!(count(is_list) - before <= MAX_PAGES_PER_CALL);
    let (all, calls) = all_extents(&d, 0, size);
    assert_eq!(all, expected_extents(&snap));
    assert!(calls > 1);
}

#[test]
fn a_64_tib_volume_is_walked_in_bounded_memory() {
    // 128 Mi blocks of 512 KiB, every 1000th listed: never enumerated as a whole.
    let snap = Snap {
        gib: 65_536,
        bs: 524_288,
        listed: Listed::Every(1000),
    };
    emulate([("snap-big", snap.clone())]);
    let d = open("snap-big").unwrap();
    let size = d.info().virtual_size;
    assert_eq!(size, 64 << 40);
    let ext = d.extents(0, size).unwrap();
    // The opening page (100 blocks, 199 extents), then 8 more pages of 200 extents each.
    assert_eq!(ext.len(), 199 + 200 * MAX_PAGES_PER_CALL);
    assert_eq!(count(is_list), 1 + MAX_PAGES_PER_CALL);
    assert!(d.window.borrow().len() <= 100);
    // A read at the far end lists from there, once.
    let at = 134_217_000 * 524_288 - 1000;
    assert_eq!(d.read(at, 2000).unwrap(), expected(&snap, at, 2000));
    assert_eq!(count(is_list), MAX_PAGES_PER_CALL + 2);
    let last = testing::sent_requests().into_iter().rfind(is_list).unwrap();
    assert!(
        last.url.ends_with("&startingBlockIndex=134216999"),
        "{}",
        last.url
    );
}

// ---------------------------------------------------------------- block verification

#[test]
fn blocks_are_verified() {
    let emu = emulate([("snap-a", Snap::new(1, 512, [(5, 1), (6, 1)]))]);
    let d = open("snap-a").unwrap();
    type Edit = Box<dyn Fn(&mut Response)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "block 5 of snap-a: checksum mismatch",
            Box::new(|r| r.body[7] ^= 1),
        ),
        (
            "block 5 of snap-a: the response has no x-amz-Checksum header",
            Box::new(|r| r.headers.retain(|(k, _)| k != "x-amz-Checksum")),
        ),
        (
            "block 5 of snap-a: truncated: the body has 300 of 512 bytes",
            Box::new(|r| r.body.truncate(300)),
        ),
        (
            "block 5 of snap-a: truncated: the body has 256 of 512 bytes",
            Box::new(|r| {
                r.body.truncate(256);
                r.headers[0].1 = "256".to_owned();
            }),
        ),
        (
            "block 5 of snap-a: the body has 513 bytes, more than the block size 512",
            Box::new(|r| r.body.push(0)),
        ),
        (
            "block 5 of snap-a: x-amz-Data-Length is `4096`, expected the block size 512",
            Box::new(|r| r.headers[0].1 = "4096".to_owned()),
        ),
        (
            "block 5 of snap-a: the response has no x-amz-Data-Length header",
            Box::new(|r| {
                r.headers.remove(0);
            }),
        ),
        (
            "block 5 of snap-a: x-amz-Checksum-Algorithm is `MD5`, expected SHA256",
            Box::new(|r| r.headers[2].1 = "MD5".to_owned()),
        ),
        (
            "block 5 of snap-a: x-amz-Checksum `!!` is not the base64 of a SHA-256",
            Box::new(|r| r.headers[1].1 = "!!".to_owned()),
        ),
        (
            "block 5 of snap-a: GetSnapshotBlock answered HTTP 206, expected 200",
            Box::new(|r| r.status = 206),
        ),
    ];
    for (want, f) in cases {
        let f = Rc::new(f);
        set_tamper(&emu, move |req, r| {
            if is_get(req) && r.status == 200 {
                f(r);
            }
        });
        let e = d.read(5 * 512, 512).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        assert!(e.to_string().contains(want), "want {want}, got {e}");
    }
    // Header names are case-insensitive.
    set_tamper(&emu, |req, r| {
        if is_get(req) {
            for (k, _) in &mut r.headers {
                *k = k.to_uppercase();
            }
        }
    });
    assert_eq!(d.read(6 * 512, 512).unwrap(), content(1, 6, 512));
}

#[test]
fn http_errors_name_the_call_status_and_aws_message() {
    let emu = emulate([("snap-a", Snap::new(1, 512, [(0, 1)]))]);
    set_tamper(&emu, |_, r| {
        *r = Response::new(
            403,
            r#"{"message":"User: arn:aws:iam::123456789012:user/ferry is not authorized to perform: ebs:ListSnapshotBlocks"}"#,
        );
        r.headers.push((
            "X-Amzn-ErrorType".to_owned(),
            "AccessDeniedException:http://internal.amazon.com/coral/com.amazon.coral.service/"
                .to_owned(),
        ));
    });
    let e = open("snap-a").unwrap_err();
    assert!(
        matches!(&e, Error::Io(io) if io.kind == IoErrorKind::Denied),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "reading the source: denied: ListSnapshotBlocks of snap-a: HTTP 403 AccessDeniedException: User: arn:aws:iam::123456789012:user/ferry is not authorized to perform: ebs:ListSnapshotBlocks"
    );
    // Long server text is cut short.
    set_tamper(&emu, |_, r| *r = Response::new(500, "x".repeat(5000)));
    let e = err(open("snap-a"));
    assert!(
        e.len() < 300 && e.contains("HTTP 500: xxx") && e.ends_with('…'),
        "{e}"
    );
    // The host's own failure (not a response at all).
    testing::set_http_handler(|req| {
        Err(IoError::new(
            IoErrorKind::Timeout,
            format!("{} took too long", req.method),
        ))
    });
    let e = open("snap-a").unwrap_err();
    assert!(
        matches!(&e, Error::Io(io) if io.kind == IoErrorKind::Timeout),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("ListSnapshotBlocks of snap-a: GET took too long"),
        "{e}"
    );
}

#[test]
fn an_expired_token_is_refreshed_once() {
    let emu = emulate([("snap-a", Snap::new(1, 512, [(0, 1), (1, 1), (2, 1)]))]);
    let d = open("snap-a").unwrap();
    d.read(0, 512).unwrap();
    // The tokens expire behind the plugin's back: the GET fails with 400, it lists again and
    // retries with the fresh token.
    emu.borrow_mut().generation = 1;
    let before = testing::sent_requests().len();
    assert_eq!(d.read(512, 512).unwrap(), content(1, 1, 512));
    let kinds: Vec<&str> = testing::sent_requests()[before..]
        .iter()
        .map(|r| if is_get(r) { "get" } else { "list" })
        .collect();
    assert_eq!(kinds, ["get", "list", "get"]);
    let retry = testing::sent_requests().last().unwrap().url.clone();
    assert!(
        retry.ends_with("blockToken=tk%2Bsnap-a%2F1%2F1%3D"),
        "{retry}"
    );
    // A block that keeps failing: one retry, then the server's error.
    set_tamper(&emu, |req, r| {
        if is_get(req) {
            *r = Response::new(403, r#"{"Message":"denied"}"#);
        }
    });
    let before = testing::sent_requests().len();
    let e = err(d.read(1024, 512));
    assert!(
        e.contains("block 2 of snap-a: GetSnapshotBlock: HTTP 403: denied"),
        "{e}"
    );
    assert_eq!(testing::sent_requests().len() - before, 3);
    // A block the fresh listing no longer lists.
    set_tamper(&emu, |req, r| {
        if is_get(req) {
            *r = Response::new(400, "{}");
        } else {
            *r = Response::new(200, r#"{"BlockSize":512,"VolumeSize":1,"Blocks":[]}"#);
        }
    });
    let e = err(d.read(1024, 512));
    assert!(e.contains("block 2 of snap-a: GetSnapshotBlock answered HTTP 400 and the snapshot, listed again, no longer lists the block"), "{e}");
}

#[test]
fn tokens_near_their_expiry_time_are_refreshed_first() {
    let emu = emulate([("snap-a", Snap::new(1, 512, (0..20).map(|i| (i, 1))))]);
    let d = open("snap-a").unwrap();
    d.read(0, 512).unwrap();
    assert_eq!(count(is_list), 1);
    // 30 s before ExpiryTime: within the 60 s margin.
    testing::set_now_ms((EXPIRY_S * 1000.0) as u64 - 30_000);
    emu.borrow_mut().expiry = Some(EXPIRY_S + 3600.0);
    emu.borrow_mut().generation = 1;
    let before = testing::sent_requests().len();
    d.read(512, 4 * 512).unwrap();
    let kinds: Vec<bool> = testing::sent_requests()[before..]
        .iter()
        .map(is_list)
        .collect();
    assert_eq!(
        kinds,
        [true, false, false, false, false],
        "one listing, then the blocks"
    );
    // Fresh again: no listing.
    d.read(5 * 512, 512).unwrap();
    assert_eq!(count(is_list), 2);
    // A server whose tokens are always about to expire costs one listing per read, not per
    // block.
    emu.borrow_mut().expiry = Some(1.0);
    testing::set_now_ms(((EXPIRY_S + 3600.0) * 1000.0) as u64);
    d.read(6 * 512, 512).unwrap();
    d.read(7 * 512, 4 * 512).unwrap();
    assert_eq!(count(is_list), 4);
}

// ---------------------------------------------------------------- hostile listings

/// Serve `body` as every ListSnapshotBlocks answer after the first `valid` ones.
fn tamper_lists(emu: &Rc<RefCell<Emu>>, valid: usize, body: &'static str) {
    let mut seen = 0;
    set_tamper(emu, move |req, r| {
        if is_list(req) {
            seen += 1;
            if seen > valid {
                *r = Response::new(200, body);
            }
        }
    });
}

#[test]
fn malformed_listings_are_refused() {
    let emu = emulate([("snap-a", Snap::new(1, 512, [(0, 1)]))]);
    let cases = [
        (
            r#"{"BlockSize":512,"VolumeSize":1,"Blocks":[{"BlockIndex":2097152,"BlockToken":"t"}]}"#,
            "ListSnapshotBlocks of snap-a: BlockIndex 2097152 is past the end of the volume (2097152 blocks)",
        ),
        (
            r#"{"BlockSize":512,"VolumeSize":1,"Blocks":[{"BlockIndex":4,"BlockToken":"t"},{"BlockIndex":4,"BlockToken":"u"}]}"#,
            "ListSnapshotBlocks of snap-a: BlockIndex 4 does not follow BlockIndex 4 (indices must be strictly increasing)",
        ),
        (
            r#"{"BlockSize":1000,"VolumeSize":1}"#,
            "ListSnapshotBlocks of snap-a: BlockSize 1000 is not a power of two from 512 to 1048576",
        ),
        (
            r#"{"BlockSize":512,"VolumeSize":65537}"#,
            "ListSnapshotBlocks of snap-a: VolumeSize 65537 GiB is not from 1 to 65536 GiB",
        ),
        (
            r#"{"VolumeSize":1}"#,
            "ListSnapshotBlocks of snap-a: the first page reports no BlockSize",
        ),
        (
            r#"{"BlockSize":512,"VolumeSize":1,"Blocks":[{"BlockIndex":0}]}"#,
            "ListSnapshotBlocks of snap-a: BlockIndex 0 has no BlockToken",
        ),
        (
            r#"{"BlockSize":512,"VolumeSize":1,"Blocks":[{"BlockIndex":0,"BlockToken":"t"}"#,
            "ListSnapshotBlocks of snap-a: the response is not what the API returns: EOF while parsing",
        ),
        (
            r#"{"BlockSize":512,"VolumeSize":1,"Blocks":{}}"#,
            "ListSnapshotBlocks of snap-a: the response is not what the API returns: invalid type: map, expected a sequence at line 1 column 41",
        ),
        (
            r#"{"BlockSize":512,"VolumeSize":1,"NextToken":"same"}"#,
            "ListSnapshotBlocks of snap-a: NextToken repeats the page token just sent",
        ),
    ];
    for (body, want) in cases {
        tamper_lists(&emu, 0, body);
        let e = open("snap-a").unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e:?}");
        assert!(e.to_string().contains(want), "want {want}\n got {e}");
    }
    // Empty pages with ever new tokens: the listing is declared stuck.
    let mut n = 0;
    set_tamper(&emu, move |_, r| {
        n += 1;
        *r = Response::new(
            200,
            format!(r#"{{"BlockSize":512,"VolumeSize":1,"NextToken":"t{n}"}}"#),
        );
    });
    let before = count(is_list);
    let e = err(open("snap-a"));
    assert!(
        e.contains("9 pages in a row list no block from index 0"),
        "{e}"
    );
    assert_eq!(count(is_list) - before, 9);
}

#[test]
fn later_pages_must_match_the_opened_snapshot() {
    let emu = emulate([("snap-a", Snap::new(1, 512, (0..150).map(|i| (i, 1))))]);
    let d = open("snap-a").unwrap();
    tamper_lists(&emu, 0, r#"{"BlockSize":1024,"VolumeSize":1}"#);
    let e = err(d.extents(0, 1 << 30));
    assert!(e.contains("ListSnapshotBlocks of snap-a: BlockSize 1024 differs from 512 reported when the snapshot was opened"), "{e}");
    tamper_lists(&emu, 0, r#"{"BlockSize":512,"VolumeSize":2}"#);
    let e = err(d.read(200 * 512, 512));
    assert!(e.contains("VolumeSize 2 GiB differs from 1 GiB"), "{e}");
    // A listing that ignores startingBlockIndex (moto): blocks below it are dropped.
    tamper_lists(
        &emu,
        0,
        r#"{"BlockSize":512,"VolumeSize":1,"Blocks":[{"BlockIndex":0,"BlockToken":"x"},{"BlockIndex":300,"BlockToken":"tk+snap-a/300/0="}]}"#,
    );
    let ext = d.extents(150 * 512, 200 * 512).unwrap();
    assert_eq!(
        ext,
        vec![
            Extent::new(150 * 512, 150 * 512, ExtentKind::Unallocated),
            Extent::data(300 * 512, 512),
            Extent::new(301 * 512, 49 * 512, ExtentKind::Unallocated),
        ]
    );
}

// ---------------------------------------------------------------- changes

fn changes_snaps() -> [(&'static str, Snap); 2] {
    // A: blocks 0..300 version 1. B: 0..300, with every 3rd block rewritten (version 2),
    // blocks 250..300 deleted (only in A: still changed), 1000..1030 added.
    let a = Snap::new(1, 512, (0..300).map(|i| (i, 1)));
    let b = Snap::new(
        1,
        512,
        (0..250)
            .map(|i| (i, if i % 3 == 0 { 2 } else { 1 }))
            .chain((1000..1030).map(|i| (i, 1))),
    );
    [("snap-a", a), ("snap-b", b)]
}

fn expected_changes() -> Vec<Extent> {
    let mut idx: Vec<u64> = (0..250).filter(|i| i % 3 == 0).collect();
    idx.extend(250..300);
    idx.extend(1000..1030);
    let mut out: Vec<Extent> = Vec::new();
    for i in idx {
        match out.last_mut() {
            Some(l) if l.end() == i * 512 => l.length += 512,
            _ => out.push(Extent::data(i * 512, 512)),
        }
    }
    out
}

#[test]
fn changes_page_through_list_changed_blocks() {
    emulate(changes_snaps());
    let d = open("snap-b").unwrap();
    let mut set = d.changes(br#"{"FirstSnapshotId":"snap-a"}"#).unwrap();
    assert_eq!(count(is_changed), 0, "nothing is fetched before next");
    let mut got: Vec<Extent> = Vec::new();
    let mut calls = 0;
    loop {
        let before = count(is_changed);
        let batch = set.next(7).unwrap();
        assert!(count(is_changed) - before <= 1, "one call per next");
        calls += 1;
        let Some(batch) = batch else { break };
        assert!(batch.len() <= 7);
        for e in batch {
            assert!(got.last().is_none_or(|l| l.end() <= e.offset), "in order");
            match got.last_mut() {
                Some(l) if l.end() == e.offset => l.length += e.length,
                _ => got.push(e),
            }
        }
    }
    assert_eq!(got, expected_changes());
    assert!(calls > 3);
    // 84 + 50 + 30 = 164 changed blocks: a full page and one more.
    let urls: Vec<String> = testing::sent_requests()
        .into_iter()
        .filter(is_changed)
        .map(|r| r.url)
        .collect();
    assert_eq!(
        urls,
        [
            format!(
                "{ENDPOINT}/snapshots/snap-b/changedblocks?firstSnapshotId=snap-a&maxResults=100"
            ),
            format!(
                "{ENDPOINT}/snapshots/snap-b/changedblocks?firstSnapshotId=snap-a&maxResults=100&pageToken=pg%2B266%2F%3D"
            ),
        ]
    );
    assert!(set.next(7).unwrap().is_none());
    // With SecondSnapshotId, and a max of 0 (taken as 1).
    let mut set = d
        .changes(br#"{"FirstSnapshotId":"snap-a","SecondSnapshotId":"snap-b"}"#)
        .unwrap();
    assert_eq!(set.next(0).unwrap().unwrap().len(), 1);
    assert_eq!(set.drain().unwrap().len(), expected_changes().len() - 1);
}

#[test]
fn change_documents_and_change_listings_are_checked() {
    let emu = emulate(changes_snaps());
    let d = open("snap-b").unwrap();
    let e = err(d.changes(br#"{"FirstSnapshotId":"snap-a","SecondSnapshotId":"snap-c"}"#));
    assert!(
        e.contains("SecondSnapshotId `snap-c` is not the opened snapshot `snap-b`"),
        "{e}"
    );
    let e = err(d.changes(br#"{"FirstSnapshotId":"snap-a","Since":"x"}"#));
    assert!(
        e.contains("change document") && e.contains("unknown field `Since`"),
        "{e}"
    );
    let e = err(d.changes(b"{\"FirstSnapshotId\":\n\"snap-a\",}"));
    assert!(
        e.contains("change document") && e.contains("line 2 column 10"),
        "{e}"
    );
    let e = err(d.changes(br#"{"FirstSnapshotId":"snap-a?x=1"}"#));
    assert!(
        e.contains("FirstSnapshotId `snap-a?x=1` may hold only"),
        "{e}"
    );

    let drain = || {
        d.changes(br#"{"FirstSnapshotId":"snap-a"}"#)
            .unwrap()
            .drain()
    };
    let ctx = "ListChangedBlocks from snap-a to snap-b";
    let mut pages = 0;
    set_tamper(&emu, move |req, r| {
        if is_changed(req) {
            pages += 1;
            if pages == 2 {
                *r = Response::new(
                    200,
                    r#"{"ChangedBlocks":[{"BlockIndex":20}],"NextToken":null}"#,
                );
            }
        }
    });
    let e = err(drain());
    assert!(
        e.contains(&format!(
            "{ctx}: BlockIndex 20 does not follow BlockIndex 265"
        )),
        "{e}"
    );
    let cases = [
        (
            r#"{"ChangedBlocks":[{"BlockIndex":5},{"BlockIndex":2}]}"#,
            "BlockIndex 2 does not follow BlockIndex 5",
        ),
        (
            r#"{"ChangedBlocks":[{"BlockIndex":2097152}]}"#,
            "BlockIndex 2097152 is past the end of the volume",
        ),
        (
            r#"{"BlockSize":4096,"ChangedBlocks":[]}"#,
            "BlockSize 4096 differs from 512",
        ),
        (r#"{"VolumeSize":8}"#, "VolumeSize 8 GiB differs from 1 GiB"),
        (
            r#"{"ChangedBlocks":[{"BlockIndex":"5"}]}"#,
            "the response is not what the API returns: invalid type: string \"5\", expected a JSON number",
        ),
        (
            r#"{"ChangedBlocks":[{"BlockIndex":1.5}]}"#,
            "BlockIndex 1.5 is not a non-negative integer",
        ),
        (
            r#"not json"#,
            "the response is not what the API returns: expected ident at line 1 column 2",
        ),
    ];
    for (body, want) in cases {
        set_tamper(&emu, move |req, r| {
            if is_changed(req) {
                *r = Response::new(200, body);
            }
        });
        let e = drain().unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e:?}");
        assert!(
            e.to_string().contains(&format!("{ctx}: {want}")),
            "want {want}\n got {e}"
        );
    }
    // A NextToken that repeats, with blocks that do not advance (caught by the ordering) or
    // without blocks.
    set_tamper(&emu, |req, r| {
        if is_changed(req) {
            *r = Response::new(200, r#"{"ChangedBlocks":[],"NextToken":"again"}"#);
        }
    });
    let e = err(drain());
    assert!(
        e.contains(&format!(
            "{ctx}: NextToken repeats the page token just sent"
        )),
        "{e}"
    );
    let mut n = 0;
    set_tamper(&emu, move |req, r| {
        if is_changed(req) {
            n += 1;
            *r = Response::new(200, format!(r#"{{"ChangedBlocks":[],"NextToken":"t{n}"}}"#));
        }
    });
    let e = err(drain());
    assert!(e.contains("9 pages in a row list no block"), "{e}");
    set_tamper(&emu, |req, r| {
        if is_changed(req) {
            *r = Response::new(
                404,
                r#"{"Message":"The snapshot 'snap-a' does not exist."}"#,
            );
        }
    });
    let e = err(drain());
    assert!(
        e.contains(&format!(
            "{ctx}: HTTP 404: The snapshot 'snap-a' does not exist."
        )),
        "{e}"
    );
}

// ---------------------------------------------------------------- moto

/// Responses recorded from moto 5.2 (`moto_server`), which reports 512-byte blocks, ignores
/// `maxResults`, `pageToken` and `startingBlockIndex`, omits `ExpiryTime` and `NextToken`, and
/// leaves `SecondBlockToken` out for blocks missing from the second snapshot.
#[test]
fn moto_responses_are_understood() {
    const LIST: &str = r#"{"Blocks": [{"BlockIndex": 0, "BlockToken": "e8645ae0-8dc5-4b20-bc4a-440eae4bcc71"}, {"BlockIndex": 1, "BlockToken": "9ca24b02-dac1-4bd3-b21d-1f4f79dfc90e"}, {"BlockIndex": 5, "BlockToken": "62f23ea6-119b-46d3-a54f-4e9182cbd686"}], "VolumeSize": 1, "BlockSize": 512}"#;
    const CHANGED: &str = r#"{"ChangedBlocks": [{"BlockIndex": 0, "FirstBlockToken": "e8645ae0-8dc5-4b20-bc4a-440eae4bcc71"}, {"BlockIndex": 1, "FirstBlockToken": "9ca24b02-dac1-4bd3-b21d-1f4f79dfc90e", "SecondBlockToken": "69b6c3d4-b98f-417b-b49a-d0f7431f9ed3"}, {"BlockIndex": 5, "FirstBlockToken": "62f23ea6-119b-46d3-a54f-4e9182cbd686"}], "VolumeSize": 1, "BlockSize": 512}"#;
    testing::reset();
    testing::set_config("endpoint", "http://127.0.0.1:5123");
    testing::set_http_handler(|req| {
        let path = req.url.split('?').next().unwrap();
        Ok(if path.ends_with("/changedblocks") {
            Response::new(200, CHANGED)
        } else if path.ends_with("/blocks") {
            Response::new(200, LIST)
        } else {
            let index: u8 = path.rsplit('/').next().unwrap().parse().unwrap();
            let body = vec![index + 1; 512];
            let mut r = Response::new(200, body.clone());
            for (k, v) in [
                ("Server", "Werkzeug/3.1.8 Python/3.11.7".to_owned()),
                ("x-amz-Data-Length", "512".to_owned()),
                ("x-amz-Checksum", sha256_b64(&body)),
                ("x-amz-Checksum-Algorithm", "SHA256".to_owned()),
                ("Content-Type", "application/json".to_owned()),
            ] {
                r.headers.push((k.to_owned(), v));
            }
            r
        })
    });
    let d = open("snap-21607a526312e1212").unwrap();
    assert_eq!(d.geometry().block_size, 512);
    let mut want = vec![1u8; 512];
    want.extend([2u8; 512]);
    want.extend([0u8; 3 * 512]);
    want.extend([6u8; 512]);
    want.extend([0u8; 512]);
    assert_eq!(d.read(0, 7 * 512).unwrap(), want);
    // Far from the start, moto lists from block 0 again: those are dropped.
    assert_eq!(d.read(900 * 512, 512).unwrap(), vec![0; 512]);
    let ext = d.extents(0, 1 << 30).unwrap();
    assert_eq!(
        ext,
        vec![
            Extent::data(0, 1024),
            Extent::new(1024, 1536, ExtentKind::Unallocated),
            Extent::data(2560, 512),
            Extent::new(3072, (1 << 30) - 3072, ExtentKind::Unallocated),
        ]
    );
    let mut set = d
        .changes(br#"{"FirstSnapshotId":"snap-102c1b96ede9f758e"}"#)
        .unwrap();
    assert_eq!(
        set.drain().unwrap(),
        vec![Extent::data(0, 1024), Extent::data(2560, 512)]
    );
}

// ---------------------------------------------------------------- fuzzing

#[test]
fn fuzz_seeds_reach_the_parsers() {
    // The seeds are valid: the paths past parsing run.
    fuzzing::list_blocks(&fuzzing::valid_listing());
    assert!(testing::sent_requests().iter().any(is_get));
    let block = fuzzing::valid_block(1);
    let mut seed = b"200\n".to_vec();
    for (k, v) in &block.headers {
        seed.extend(format!("{k}: {v}\n").bytes());
    }
    seed.push(b'\n');
    seed.extend(&block.body);
    assert_eq!(fuzzing::response_from(&seed), block);
    assert!(api::verify_block(fuzzing::SNAPSHOT, 0, 512, &fuzzing::response_from(&seed)).is_ok());
}

#[test]
fn mutation_smoke() {
    testing::mutations(&fuzzing::valid_listing(), 2000, fuzzing::list_blocks);
    let next_page = br#"{"BlockSize":512,"VolumeSize":1,"Blocks":[{"BlockIndex":9,"BlockToken":"a"}],"NextToken":"n+/="}"#;
    testing::mutations(next_page, 500, fuzzing::list_blocks);
    let changed = br#"{"BlockSize":512,"ChangedBlocks":[{"BlockIndex":0,"FirstBlockToken":"a","SecondBlockToken":"b"},{"BlockIndex":1,"FirstBlockToken":"c"},{"BlockIndex":7}],"ExpiryTime":1700003600,"NextToken":"x","VolumeSize":1}"#;
    testing::mutations(changed, 2000, fuzzing::changed_blocks);
    testing::mutations(
        br#"{"FirstSnapshotId":"snap-first"}"#,
        500,
        fuzzing::changed_blocks,
    );
    let block = fuzzing::valid_block(1);
    let mut seed = b"200\n".to_vec();
    for (k, v) in &block.headers {
        seed.extend(format!("{k}: {v}\n").bytes());
    }
    seed.push(b'\n');
    seed.extend(&block.body);
    testing::mutations(&seed, 2000, fuzzing::block);
    testing::mutations(
        b"403\nx-amzn-ErrorType: AccessDeniedException:x\n\n{\"Message\":\"no\",\"Reason\":\"R\"}",
        500,
        fuzzing::block,
    );
    testing::mutations(br#"{"SnapshotId":"snap-fuzz"}"#, 1000, fuzzing::reference);
}
