//! `aws`: the Ferry source adapter for AWS EBS snapshots, read through the EBS direct APIs.
//!
//! An EBS snapshot is not a file the host can open: its blocks live behind an HTTP API. This
//! adapter exists to turn that API into a virtual disk. The host opens a tiny JSON *snapshot
//! reference* (`{"SnapshotId":"snap-..."}`) and hands it over; the adapter lists the snapshot's
//! blocks (`ListSnapshotBlocks`), fetches and verifies the ones read (`GetSnapshotBlock`, with
//! its SHA-256), and translates `ListChangedBlocks` between an earlier snapshot and this one
//! into changed extents for incremental backups.
//!
//! The host holds the AWS credentials and signs every request (SigV4) on the plugin's behalf;
//! the plugin never sets an authentication header and never sees a secret. The operator
//! configures the endpoint (the region's `https://ebs.REGION.amazonaws.com`, or an emulator).
//!
//! - [`api`] builds the request URLs and parses and validates every response (listings, blocks,
//!   AWS error bodies).
//! - [`documents`] parses the snapshot reference and the change document.
//! - `window` keeps one listing page: memory stays bounded whatever the volume size.
//! - [`EbsDisk`] answers `extents`, `locate` and `read` from the window; [`EbsChanges`] pages
//!   through `ListChangedBlocks`.
//! - [`fuzzing`] holds the entry points a fuzzer (and the mutation smoke tests) drives.
//!
//! Config keys: `endpoint` (required), `max-results` (page size of the list calls, 100 to
//! 10000, default 10000).

pub mod api;
mod changes;
pub mod documents;
mod window;

use std::cell::RefCell;

use ferry_plugin_sdk::adapter::{
    ChangeSet, Disk, DiskInfo, Error, Location, MAX_EXTENTS, Mapping, PluginInfo, Reader,
    SourceAdapter, check_range, check_read,
};
use ferry_plugin_sdk::config::{self, InvalidConfig};
use ferry_plugin_sdk::io::{Extent, ExtentKind, IoError, ReadAt, read_exact_at};
use ferry_plugin_sdk::{clock, debug};

pub use api::{Client, Geometry};
pub use changes::EbsChanges;
use documents::{MAX_DOCUMENT, parse_change_document, parse_reference};
use window::Window;

/// Default page size of the list calls (the AWS maximum).
pub const DEFAULT_MAX_RESULTS: u32 = 10_000;
/// Smallest page size AWS accepts.
pub const MIN_MAX_RESULTS: u32 = 100;
/// Most listing pages one `extents` or `locate` call fetches before it stops short.
pub const MAX_PAGES_PER_CALL: usize = 8;

/// The adapter.
#[derive(Debug)]
pub struct Aws;

impl SourceAdapter for Aws {
    type Disk = EbsDisk;

    fn info() -> PluginInfo {
        PluginInfo {
            name: "aws".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            formats: vec!["ebs".to_owned()],
            description:
                "AWS EBS snapshots through the EBS direct APIs (requests signed by the host), with ListChangedBlocks changes"
                    .to_owned(),
        }
    }

    /// True exactly when `header` is a snapshot reference (`{"SnapshotId":"snap-..."}`).
    fn probe(header: &[u8]) -> bool {
        header.len() <= MAX_DOCUMENT && parse_reference("probe", header).is_ok()
    }

    fn open(reader: Reader) -> Result<EbsDisk, Error> {
        let client = Client::from_config()?;
        let what = format!("snapshot reference {}", reader.name());
        let size = reader.size();
        let len = usize::try_from(size)
            .ok()
            .filter(|&n| n <= MAX_DOCUMENT)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{what} is {size} bytes, over {MAX_DOCUMENT}: expected a small JSON object such as {{\"SnapshotId\":\"snap-0123456789abcdef0\"}}"
                ))
            })?;
        let doc = read_exact_at(&reader, 0, len)
            .map_err(|e| Error::Io(IoError::new(e.kind, format!("{what}: {}", e.message))))?;
        let reference = parse_reference(&what, &doc)?;
        EbsDisk::open(client, reference.snapshot_id)
    }
}

impl Client {
    /// Read the settings from the plugin's config: `endpoint` (required, `http://` or
    /// `https://`, one trailing `/` dropped) and `max-results` (100 to 10000, default 10000).
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the key that is missing or not accepted.
    pub fn from_config() -> Result<Self, Error> {
        let Some(raw) = config::get("endpoint") else {
            return Err(Error::invalid(
                "config key `endpoint` is not set (the EBS direct APIs endpoint, for example https://ebs.us-east-1.amazonaws.com)",
            ));
        };
        let endpoint = raw.strip_suffix('/').unwrap_or(&raw);
        let host = endpoint
            .strip_prefix("https://")
            .or_else(|| endpoint.strip_prefix("http://"))
            .unwrap_or("");
        if host.is_empty()
            || host.starts_with('/')
            || endpoint
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
        {
            return Err(InvalidConfig {
                key: "endpoint".to_owned(),
                value: raw.escape_debug().to_string(),
                expected: "an http:// or https:// URL without query or fragment".to_owned(),
            }
            .into());
        }
        let max_results = match config::get("max-results") {
            None => DEFAULT_MAX_RESULTS,
            Some(v) => v
                .parse::<u32>()
                .ok()
                .filter(|n| (MIN_MAX_RESULTS..=DEFAULT_MAX_RESULTS).contains(n))
                .ok_or_else(|| InvalidConfig {
                    key: "max-results".to_owned(),
                    value: v.escape_debug().to_string(),
                    expected: format!("an integer from {MIN_MAX_RESULTS} to {DEFAULT_MAX_RESULTS}"),
                })?,
        };
        Ok(Self {
            endpoint: endpoint.to_owned(),
            max_results,
        })
    }
}

/// An opened EBS snapshot.
#[derive(Debug)]
pub struct EbsDisk {
    client: Client,
    snapshot: String,
    geometry: Geometry,
    /// The listing page currently held (see `window`).
    window: RefCell<Window>,
    /// The last block fetched and verified, for reads that are not block-aligned.
    last_block: RefCell<Option<(u64, Vec<u8>)>>,
}

impl EbsDisk {
    /// Open `snapshot` through `client`: the first `ListSnapshotBlocks` page gives the block
    /// size and the volume size, and becomes the window.
    ///
    /// # Errors
    /// The call's HTTP or transport error, or [`Error::Invalid`] for a listing that is
    /// malformed or reports an unsupported geometry.
    pub fn open(client: Client, snapshot: String) -> Result<EbsDisk, Error> {
        let (geometry, window) = window::fetch(&client, &snapshot, 0, None)?;
        debug!(
            "aws: opened {snapshot}: {} GiB in blocks of {} bytes",
            geometry.volume_gib, geometry.block_size
        );
        Ok(EbsDisk {
            client,
            snapshot,
            geometry,
            window: RefCell::new(window),
            last_block: RefCell::new(None),
        })
    }

    /// The snapshot id.
    #[must_use]
    pub fn snapshot(&self) -> &str {
        &self.snapshot
    }

    /// Block and volume size, as reported when opened.
    #[must_use]
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// List again from block `index` (fresh tokens, a window that covers it).
    fn refetch(&self, index: u64) -> Result<(), Error> {
        let (_, w) = window::fetch(&self.client, &self.snapshot, index, Some(self.geometry))?;
        if !w.covers(index) {
            // `fetch` always returns a window covering `index`; never loop on one that does not.
            return Err(Error::invalid(format!(
                "ListSnapshotBlocks of {}: the listing does not cover block {index}",
                self.snapshot
            )));
        }
        *self.window.borrow_mut() = w;
        Ok(())
    }

    /// Make the window cover block `index`.
    fn ensure(&self, index: u64) -> Result<(), Error> {
        if self.window.borrow().covers(index) {
            Ok(())
        } else {
            self.refetch(index)
        }
    }

    /// Walk `[offset, offset + length)` as runs of listed and unlisted blocks, clipped to the
    /// range, calling `push(start, end, listed)` until it returns false, the range is done or
    /// [`MAX_PAGES_PER_CALL`] pages were fetched.
    fn walk(
        &self,
        offset: u64,
        length: u64,
        mut push: impl FnMut(u64, u64, bool) -> bool,
    ) -> Result<(), Error> {
        let end = check_range(self.geometry.virtual_size(), offset, length)?;
        let bs = self.geometry.block_size;
        let mut pages = 0;
        let mut pos = offset;
        while pos < end {
            let index = pos / bs;
            if !self.window.borrow().covers(index) {
                if pages == MAX_PAGES_PER_CALL {
                    break;
                }
                self.refetch(index)?;
                pages += 1;
            }
            let (listed, run_end) = self.window.borrow().run(index);
            let stop = run_end.saturating_mul(bs).min(end);
            if stop <= pos || !push(pos, stop, listed) {
                break;
            }
            pos = stop;
        }
        Ok(())
    }

    /// Make `last_block` hold block `index` if it is listed; false when it is not (zeros).
    fn load(&self, index: u64) -> Result<bool, Error> {
        if matches!(&*self.last_block.borrow(), Some((i, _)) if *i == index) {
            return Ok(true);
        }
        self.ensure(index)?;
        let token = self.window.borrow().token(index).map(str::to_owned);
        let Some(token) = token else {
            return Ok(false);
        };
        let bytes = self.get_block(index, &token)?;
        *self.last_block.borrow_mut() = Some((index, bytes));
        Ok(true)
    }

    /// `GetSnapshotBlock` of block `index`, verified. A 4xx may mean the token expired: the
    /// snapshot is listed again from the block and the call retried once with the new token.
    fn get_block(&self, index: u64, token: &str) -> Result<Vec<u8>, Error> {
        let ctx = format!("block {index} of {}: GetSnapshotBlock", self.snapshot);
        let url = |token: &str| {
            self.client
                .get_snapshot_block_url(&self.snapshot, index, token)
        };
        let mut response = api::get(&ctx, url(token))?;
        if (400..500).contains(&response.status) {
            debug!(
                "aws: {ctx} answered HTTP {}: listing again for a fresh block token",
                response.status
            );
            self.refetch(index)?;
            let fresh = self.window.borrow().token(index).map(str::to_owned);
            let Some(fresh) = fresh else {
                return Err(Error::invalid(format!(
                    "{ctx} answered HTTP {} and the snapshot, listed again, no longer lists the block",
                    response.status
                )));
            };
            response = api::get(&ctx, url(&fresh))?;
        }
        api::check_status(&ctx, &response)?;
        api::verify_block(&self.snapshot, index, self.geometry.block_size, &response)
    }
}

impl Disk for EbsDisk {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            format: "ebs-snapshot".to_owned(),
            virtual_size: self.geometry.virtual_size(),
            logical_sector_size: 512,
            physical_sector_size: 4096,
            disk_id: Some(self.snapshot.clone()),
            parent: None,
        }
    }

    /// Listed blocks are `data`, the rest `unallocated`; may stop short after
    /// [`MAX_PAGES_PER_CALL`] listing pages or [`MAX_EXTENTS`] extents.
    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, Error> {
        let mut out: Vec<Extent> = Vec::new();
        self.walk(offset, length, |start, end, listed| {
            let full = out.len() == MAX_EXTENTS;
            let kind = if listed {
                ExtentKind::Data
            } else {
                ExtentKind::Unallocated
            };
            match out.last_mut() {
                Some(last) if last.kind == kind && last.end() == start => {
                    last.length += end - start;
                    true
                }
                _ if full => false,
                _ => {
                    out.push(Extent::new(start, end - start, kind));
                    true
                }
            }
        })?;
        Ok(out)
    }

    /// Listed blocks are `Adapter` (only `read` can fetch them), the rest `Zero`.
    fn locate(&self, offset: u64, length: u64) -> Result<Vec<Mapping>, Error> {
        let mut out: Vec<Mapping> = Vec::new();
        self.walk(offset, length, |start, end, listed| {
            let full = out.len() == MAX_EXTENTS;
            let location = if listed {
                Location::Adapter
            } else {
                Location::Zero
            };
            match out.last_mut() {
                Some(last) if last.location == location && last.offset + last.length == start => {
                    last.length += end - start;
                    true
                }
                _ if full => false,
                _ => {
                    out.push(Mapping {
                        offset: start,
                        length: end - start,
                        location,
                    });
                    true
                }
            }
        })?;
        Ok(out)
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, Error> {
        let end = check_read(self.geometry.virtual_size(), offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.window.borrow().stale(clock::now_ms) {
            // The tokens are about to expire: the next block needed lists again.
            *self.window.borrow_mut() = Window::default();
        }
        let bs = self.geometry.block_size;
        let mut out = Vec::with_capacity(len as usize);
        let mut pos = offset;
        while pos < end {
            let index = pos / bs;
            let from = pos - index * bs;
            let n = (end - pos).min(bs - from);
            if self.load(index)? {
                let cached = self.last_block.borrow();
                let piece = cached.as_ref().and_then(|(_, bytes)| {
                    let from = usize::try_from(from).ok()?;
                    bytes.get(from..from.checked_add(usize::try_from(n).ok()?)?)
                });
                let Some(piece) = piece else {
                    return Err(Error::invalid(format!(
                        "block {index} of {}: the verified block is shorter than the block size",
                        self.snapshot
                    )));
                };
                out.extend_from_slice(piece);
            } else {
                // `n` is at most the 4 MiB read.
                out.resize(out.len() + usize::try_from(n).unwrap_or(0), 0);
            }
            pos += n;
        }
        Ok(out)
    }

    /// `document`: `{"FirstSnapshotId":"snap-..."}` (optionally with `"SecondSnapshotId"`, which
    /// must be the opened snapshot). The change set pages through `ListChangedBlocks`.
    fn changes(&self, document: &[u8]) -> Result<Box<dyn ChangeSet>, Error> {
        let doc = parse_change_document(document, &self.snapshot)?;
        Ok(Box::new(EbsChanges::new(
            self.client.clone(),
            doc.first_snapshot_id,
            self.snapshot.clone(),
            self.geometry,
        )))
    }
}

ferry_plugin_sdk::export_source_adapter!(Aws);

/// Fuzz entry points: each serves arbitrary bytes as an API response (or document) to a disk
/// driven through open, `extents`, `locate`, `read` and `changes`. They must never panic; a
/// `cargo fuzz` target is one line calling one of them. Native only: they answer the plugin's
/// HTTP requests with [`ferry_plugin_sdk::testing`] (whose per-thread state they reset).
#[cfg(not(target_arch = "wasm32"))]
pub mod fuzzing {
    use ferry_plugin_sdk::adapter::{Disk, Reader, SourceAdapter};
    use ferry_plugin_sdk::http::{Request, Response};
    use ferry_plugin_sdk::testing;

    use crate::{Aws, Client, EbsDisk, api, documents};

    /// The snapshot the fuzzed disk reads.
    pub const SNAPSHOT: &str = "snap-fuzz";
    /// The block size of [`valid_listing`] (what moto reports).
    pub const BLOCK_SIZE: u64 = 512;

    /// A valid `ListSnapshotBlocks` page of a 1 GiB volume of 512-byte blocks listing blocks
    /// 0, 1 and 7 (tokens with `+`, `/` and `=`).
    #[must_use]
    pub fn valid_listing() -> Vec<u8> {
        br#"{"BlockSize":512,"Blocks":[{"BlockIndex":0,"BlockToken":"AAUB+a/0="},{"BlockIndex":1,"BlockToken":"AAUB+a/1="},{"BlockIndex":7,"BlockToken":"AAUB+a/7="}],"ExpiryTime":1700003600.5,"VolumeSize":1}"#.to_vec()
    }

    /// A valid `GetSnapshotBlock` response for a block of `byte` repeated [`BLOCK_SIZE`] times.
    #[must_use]
    pub fn valid_block(byte: u8) -> Response {
        use base64::Engine as _;
        use sha2::{Digest, Sha256};
        let body = vec![byte; 512];
        let checksum = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&body));
        Response {
            status: 200,
            headers: vec![
                ("x-amz-Data-Length".to_owned(), "512".to_owned()),
                ("x-amz-Checksum".to_owned(), checksum),
                ("x-amz-Checksum-Algorithm".to_owned(), "SHA256".to_owned()),
            ],
            body,
        }
    }

    /// `data` as a `GetSnapshotBlock` response: up to the first blank line (`\n\n`), a status
    /// line (decimal) and `name: value` header lines; after it, the body. Without a blank line
    /// it is all body, with status 200 and no headers.
    #[must_use]
    pub fn response_from(data: &[u8]) -> Response {
        let Some(at) = data.windows(2).position(|w| w == b"\n\n") else {
            return Response::new(200, data.to_vec());
        };
        let head = String::from_utf8_lossy(&data[..at]);
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(200);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Response {
            status,
            headers,
            body: data[at + 2..].to_vec(),
        }
    }

    /// Reset the native state and answer requests: `/changedblocks` with `changed`, block
    /// listings with `listing`, blocks with `block`.
    fn serve(listing: Vec<u8>, changed: Vec<u8>, block: Response) {
        testing::reset();
        testing::set_config("endpoint", "http://ebs.fuzz.invalid/");
        testing::set_config("max-results", "100");
        testing::set_now_ms(1_700_000_000_000);
        testing::set_http_handler(move |req: &Request| {
            let path = req.url.split('?').next().unwrap_or("");
            Ok(if path.ends_with("/changedblocks") {
                Response::new(200, changed.clone())
            } else if path.ends_with("/blocks") {
                Response::new(200, listing.clone())
            } else {
                block.clone()
            })
        });
    }

    fn client() -> Client {
        Client {
            endpoint: "http://ebs.fuzz.invalid".to_owned(),
            max_results: 100,
        }
    }

    /// Everything a host would call, bounded.
    fn exercise(disk: &EbsDisk) {
        let size = disk.info().virtual_size;
        let _ = disk.extents(0, size);
        let _ = disk.locate(0, size);
        let _ = disk.extents(size / 2, size - size / 2);
        let _ = disk.read(0, 4096);
        let _ = disk.read(7 * 512 - 100, 1000);
        let _ = disk.read(size - 4096, 4096);
        if let Ok(mut set) = disk.changes(br#"{"FirstSnapshotId":"snap-first"}"#) {
            for _ in 0..64 {
                match set.next(7) {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }

    /// `data` as every `ListSnapshotBlocks` response: open, then extents, locate, reads.
    pub fn list_blocks(data: &[u8]) {
        serve(
            data.to_vec(),
            br#"{"ChangedBlocks":[]}"#.to_vec(),
            valid_block(1),
        );
        if let Ok(disk) = EbsDisk::open(client(), SNAPSHOT.to_owned()) {
            exercise(&disk);
        }
    }

    /// `data` as the change document, then as every `ListChangedBlocks` response, against a
    /// valid snapshot.
    pub fn changed_blocks(data: &[u8]) {
        serve(valid_listing(), data.to_vec(), valid_block(1));
        if let Ok(disk) = EbsDisk::open(client(), SNAPSHOT.to_owned()) {
            let _ = disk.changes(data);
            exercise(&disk);
        }
    }

    /// `data` as a `GetSnapshotBlock` response ([`response_from`]): verified directly, parsed as
    /// an error body, and served to reads of a valid snapshot (which retry once on a 4xx).
    pub fn block(data: &[u8]) {
        let response = response_from(data);
        let _ = api::verify_block(SNAPSHOT, 0, BLOCK_SIZE, &response);
        let _ = api::check_status("fuzz", &response);
        serve(
            valid_listing(),
            br#"{"ChangedBlocks":[]}"#.to_vec(),
            response,
        );
        if let Ok(disk) = EbsDisk::open(client(), SNAPSHOT.to_owned()) {
            let _ = disk.read(0, 1024);
            let _ = disk.read(7 * 512 + 3, 10);
        }
    }

    /// `data` as the opened object (a snapshot reference): probe, parse, open; also as a
    /// change document.
    pub fn reference(data: &[u8]) {
        let _ = Aws::probe(&data[..data.len().min(64 << 10)]);
        let _ = documents::parse_change_document(data, SNAPSHOT);
        serve(
            valid_listing(),
            br#"{"ChangedBlocks":[]}"#.to_vec(),
            valid_block(1),
        );
        if let Ok(disk) = Aws::open(Reader::new(data.to_vec())) {
            let _ = disk.read(0, 512);
        }
    }
}

#[cfg(test)]
mod tests;
