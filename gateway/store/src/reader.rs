//! Random access to a recovery point's disk: [`PointReader::read_at`] at any offset and
//! length, without restoring the disk first (instant recovery serves a point over NBD this
//! way, so a hypervisor boots it before anything is copied).
//!
//! A read resolves each chunk it touches to its chunk id by walking the disk's copy-on-write
//! tree from the root (decoded pages kept in a bounded LRU page cache), then fetches the
//! chunks with [`Vault::read_blob`]: every blob is authenticated, decompressed and re-hashed
//! before a byte of it is returned, exactly as on restore. Zero chunks (the zero id, in a
//! leaf or as an all-zero subtree) are never read: they read as zeros. Decoded chunks go to a
//! bounded LRU chunk cache keyed by chunk id (so deduplicated chunks are cached once), and a
//! chunk being fetched is fetched once however many readers want it (single flight).
//!
//! Sequential reads (a read starting where one of the last few ended) start a bounded
//! read-ahead: the next chunks are fetched concurrently in the background into the cache.
//!
//! Memory is bounded by [`ReaderOptions`], never by the disk's size: the chunk cache's byte
//! capacity, the page cache's page count (8 KiB each), plus the chunks in flight — for each
//! concurrent `read_at`, at most `fetch_concurrency` chunks, and at most `read_ahead` chunks
//! of read-ahead for the whole reader. Clones of a [`PointReader`] share the caches.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use tokio::sync::{OnceCell, Semaphore};

use crate::ChunkId;
use crate::error::{Result, StoreError};
use crate::point::{DiskRecord, PointRecord};
use crate::tree::{FANOUT, MAX_LEVELS, decode_page};
use crate::vault::{PointSelector, Vault};

/// Sequential streams remembered for read-ahead (a read starting where one of them ended is
/// sequential).
const STREAMS: usize = 8;

/// Bounds of a [`PointReader`]'s memory and concurrency.
#[derive(Debug, Clone, Copy)]
pub struct ReaderOptions {
    /// Capacity of the decoded-chunk cache, bytes (LRU). 0 disables caching (and read-ahead).
    pub cache_bytes: usize,
    /// Decoded tree pages kept (LRU; each about 8 KiB). At least one is kept.
    pub page_cache_pages: usize,
    /// Chunks fetched ahead of a sequential reader, in the background. Capped so read-ahead
    /// never uses more than a quarter of the chunk cache; 0 disables it.
    pub read_ahead: usize,
    /// Chunks fetched at once by one `read_at`.
    pub fetch_concurrency: usize,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 64 << 20,
            page_cache_pages: 1024,
            read_ahead: 8,
            fetch_concurrency: 4,
        }
    }
}

/// Counters of a reader (shared by its clones), for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Chunk blobs fetched from the vault (including read-ahead).
    pub chunk_fetches: u64,
    /// Chunk reads served by the cache.
    pub cache_hits: u64,
    /// Tree pages fetched from the vault.
    pub page_fetches: u64,
    /// Bytes in the chunk cache now.
    pub cached_bytes: usize,
    /// Chunks in the chunk cache now.
    pub cached_chunks: usize,
}

/// A least-recently-used map with a capacity in caller-defined cost units.
#[derive(Debug)]
struct Lru<K, V> {
    map: HashMap<K, (V, u64, usize)>,
    order: BTreeMap<u64, K>,
    tick: u64,
    cost: usize,
    cap: usize,
}

impl<K: Hash + Eq + Copy, V: Clone> Lru<K, V> {
    fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            cost: 0,
            cap,
        }
    }

    fn get(&mut self, k: &K) -> Option<V> {
        let (v, t, _) = self.map.get_mut(k)?;
        self.order.remove(t);
        self.tick += 1;
        *t = self.tick;
        self.order.insert(self.tick, *k);
        Some(v.clone())
    }

    fn contains(&self, k: &K) -> bool {
        self.map.contains_key(k)
    }

    /// Inserts `v` (replacing any entry for `k`), then evicts the least recently used entries
    /// until the cost is within the capacity. An entry costing more than the capacity is not
    /// kept.
    fn insert(&mut self, k: K, v: V, cost: usize) {
        if let Some((_, t, c)) = self.map.remove(&k) {
            self.order.remove(&t);
            self.cost -= c;
        }
        if cost > self.cap {
            return;
        }
        self.tick += 1;
        self.map.insert(k, (v, self.tick, cost));
        self.order.insert(self.tick, k);
        self.cost += cost;
        while self.cost > self.cap {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, _, c)) = self.map.remove(&old) {
                self.cost -= c;
            }
        }
    }
}

/// A remembered sequential stream: where its last read ended, and the first chunk not yet
/// scheduled for read-ahead.
#[derive(Debug, Clone, Copy)]
struct Stream {
    end: u64,
    ahead_from: u64,
}

type Chunk = Arc<Vec<u8>>;

#[derive(Debug)]
struct State {
    chunks: Lru<ChunkId, Chunk>,
    pages: Lru<ChunkId, Arc<Vec<ChunkId>>>,
    /// Chunks being fetched: later askers wait on the same cell (single flight).
    inflight: HashMap<ChunkId, Arc<OnceCell<Chunk>>>,
    streams: VecDeque<Stream>,
}

#[derive(Debug)]
struct Inner {
    vault: Vault,
    point: PointRecord,
    disk: DiskRecord,
    opts: ReaderOptions,
    /// Read-ahead chunks in flight (permits: the effective read-ahead).
    ahead: Arc<Semaphore>,
    read_ahead: usize,
    state: Mutex<State>,
    chunk_fetches: AtomicU64,
    cache_hits: AtomicU64,
    page_fetches: AtomicU64,
}

/// Random-access reads of one disk of one recovery point. Cheap to clone; clones share the
/// caches and the read-ahead.
#[derive(Debug, Clone)]
pub struct PointReader {
    inner: Arc<Inner>,
}

impl Vault {
    /// Opens `disk` (may be omitted when the point has one) of `item`'s point `point` for
    /// random-access reads, with caches and read-ahead bounded by `opts`. Nothing is read but
    /// the point record; pages and chunks are fetched as reads need them.
    pub async fn open_reader(
        &self,
        item: &str,
        point: &PointSelector,
        disk: Option<&str>,
        opts: ReaderOptions,
    ) -> Result<PointReader> {
        let point = self.point(item, point).await?;
        let disk = point.disk(disk)?.clone();
        PointReader::new(self.clone(), point, disk, opts)
    }
}

impl PointReader {
    /// A reader of `disk` of `point` (which must be one of the point's disks).
    pub fn new(
        vault: Vault,
        point: PointRecord,
        disk: DiskRecord,
        opts: ReaderOptions,
    ) -> Result<Self> {
        let corrupt = |r: String| StoreError::corrupt(point.object_name(), r);
        if disk.levels == 0 || disk.levels > MAX_LEVELS {
            return Err(corrupt(format!(
                "disk `{}` has a tree of {} levels",
                disk.name, disk.levels
            )));
        }
        if crate::check_chunk_size(disk.chunk_size).is_err() {
            return Err(corrupt(format!(
                "disk `{}` has a chunk size of {} bytes",
                disk.name, disk.chunk_size
            )));
        }
        let reach = (FANOUT as u64).saturating_pow(u32::from(disk.levels));
        if reach < disk.chunks() {
            return Err(corrupt(format!(
                "disk `{}` of {} chunks has a tree of {} levels, too few",
                disk.name,
                disk.chunks(),
                disk.levels
            )));
        }
        let cs = disk.chunk_size as usize;
        let read_ahead = opts.read_ahead.min(opts.cache_bytes / cs / 4);
        Ok(Self {
            inner: Arc::new(Inner {
                vault,
                point,
                disk,
                opts,
                ahead: Arc::new(Semaphore::new(read_ahead)),
                read_ahead,
                state: Mutex::new(State {
                    chunks: Lru::new(opts.cache_bytes),
                    pages: Lru::new(opts.page_cache_pages.max(1)),
                    inflight: HashMap::new(),
                    streams: VecDeque::with_capacity(STREAMS),
                }),
                chunk_fetches: AtomicU64::new(0),
                cache_hits: AtomicU64::new(0),
                page_fetches: AtomicU64::new(0),
            }),
        })
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.disk.size
    }

    /// The point read.
    pub fn point(&self) -> &PointRecord {
        &self.inner.point
    }

    /// The disk read.
    pub fn disk(&self) -> &DiskRecord {
        &self.inner.disk
    }

    /// The options the reader was opened with.
    pub fn options(&self) -> ReaderOptions {
        self.inner.opts
    }

    /// Counters and cache occupancy now.
    pub fn stats(&self) -> ReaderStats {
        let st = self.inner.lock();
        ReaderStats {
            chunk_fetches: self.inner.chunk_fetches.load(Ordering::Relaxed),
            cache_hits: self.inner.cache_hits.load(Ordering::Relaxed),
            page_fetches: self.inner.page_fetches.load(Ordering::Relaxed),
            cached_bytes: st.chunks.cost,
            cached_chunks: st.chunks.map.len(),
        }
    }

    /// Chunk `index`'s id, from the tree (pages through the page cache): `ChunkId::ZERO` for
    /// a zero chunk.
    pub(crate) async fn chunk_id(&self, index: u64) -> Result<ChunkId> {
        self.inner.chunk_id(index).await
    }

    /// Fills `buf` with the disk's bytes at `offset`. A read reaching past the end of the disk
    /// is refused (`InvalidArgument`) and reads nothing. A chunk that cannot be fetched or
    /// fails authentication fails the read with an error naming the point, the disk and the
    /// chunk index (the variant is the underlying one: `Tampered`, `Corrupt`, `MissingChunk`,
    /// `Backend`…).
    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let inner = &self.inner;
        let size = inner.disk.size;
        let len = buf.len() as u64;
        if offset > size || size - offset < len {
            return Err(StoreError::InvalidArgument(format!(
                "read of {len} bytes at offset {offset} is past the end of point {} disk `{}` \
                 ({size} bytes)",
                inner.point.id, inner.disk.name
            )));
        }
        if len == 0 {
            return Ok(());
        }
        let cs = u64::from(inner.disk.chunk_size);
        let first = offset / cs;
        let last = (offset + len - 1) / cs;
        if let Some(range) = inner.note_read(offset, offset + len, last + 1) {
            inner.clone().read_ahead(range);
        }
        let chunks = futures::stream::iter(first..=last)
            .map(|index| {
                let inner = inner.clone();
                async move {
                    let id = inner.chunk_id(index).await?;
                    if id.is_zero() {
                        return Ok((index, None));
                    }
                    inner.chunk(index, id).await.map(|c| (index, Some(c)))
                }
            })
            .buffered(inner.opts.fetch_concurrency.max(1));
        futures::pin_mut!(chunks);
        while let Some(r) = chunks.next().await {
            let (index, data) = r?;
            let start = index * cs;
            let a = start.max(offset);
            let b = (start + cs).min(offset + len);
            let dst = &mut buf[to_usize(a - offset)..to_usize(b - offset)];
            let from = to_usize(a - start);
            let data: &[u8] = data.as_deref().map_or(&[], |d| d.as_slice());
            // A stored chunk may be shorter than its place (the disk's last chunk): the rest
            // reads as zeros.
            let have = data.len().saturating_sub(from).min(dst.len());
            if have > 0 {
                dst[..have].copy_from_slice(&data[from..from + have]);
            }
            dst[have..].fill(0);
        }
        Ok(())
    }
}

/// A length within one buffer already in memory.
#[allow(
    clippy::cast_possible_truncation,
    reason = "offsets within a buffer (or chunk) that is in memory fit usize"
)]
fn to_usize(x: u64) -> usize {
    x as usize
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves only caches behind: keep using them.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn context(&self, index: u64) -> String {
        format!(
            "point {} disk `{}` chunk {index}",
            self.point.id, self.disk.name
        )
    }

    /// Records a read of `[start, end)` whose next chunk is `next`. When it continues one of
    /// the remembered streams, returns the chunks to read ahead (those up to the read-ahead
    /// depth past `next` that the stream has not scheduled yet).
    fn note_read(&self, start: u64, end: u64, next: u64) -> Option<std::ops::Range<u64>> {
        if self.read_ahead == 0 {
            return None;
        }
        let stop = next
            .saturating_add(self.read_ahead as u64)
            .min(self.disk.chunks());
        let mut st = self.lock();
        let found = st.streams.iter().position(|s| s.end == start);
        let ahead = found.and_then(|i| st.streams.remove(i)).map(|s| {
            let from = s.ahead_from.max(next);
            from..stop.max(from)
        });
        if st.streams.len() == STREAMS {
            st.streams.pop_front();
        }
        st.streams.push_back(Stream {
            end,
            ahead_from: ahead.as_ref().map_or(next, |r| r.end),
        });
        ahead.filter(|r| !r.is_empty())
    }

    /// Fetches chunks `range` in the background into the cache, as long as read-ahead
    /// permits are free (the rest are left to the reads that need them).
    fn read_ahead(self: Arc<Self>, range: std::ops::Range<u64>) {
        for index in range {
            let Ok(permit) = self.ahead.clone().try_acquire_owned() else {
                break;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                // Errors are left to the read that needs the chunk: it retries and reports.
                if let Ok(id) = me.chunk_id(index).await
                    && !id.is_zero()
                    && !me.cached_or_inflight(&id)
                {
                    let _ = me.chunk(index, id).await;
                }
            });
        }
    }

    fn cached_or_inflight(&self, id: &ChunkId) -> bool {
        let st = self.lock();
        st.chunks.contains(id) || st.inflight.contains_key(id)
    }

    /// Chunk `index`'s id, from the tree (pages through the page cache).
    async fn chunk_id(&self, index: u64) -> Result<ChunkId> {
        let mut id = self.disk.root;
        for level in (0..self.disk.levels).rev() {
            if id.is_zero() {
                return Ok(ChunkId::ZERO);
            }
            let entries = self.page(id, level, index).await?;
            let span = (FANOUT as u64).pow(u32::from(level));
            let slot = usize::try_from((index / span) % FANOUT as u64).expect("below FANOUT");
            id = entries[slot];
        }
        Ok(id)
    }

    async fn page(&self, id: ChunkId, level: u8, index: u64) -> Result<Arc<Vec<ChunkId>>> {
        if let Some(p) = self.lock().pages.get(&id) {
            return Ok(p);
        }
        let ctx = format!("the tree of {}", self.context(index));
        self.page_fetches.fetch_add(1, Ordering::Relaxed);
        let bytes = self
            .vault
            .read_blob(&id, &ctx)
            .await
            .map_err(|e| in_context(e, &ctx))?;
        let entries = Arc::new(decode_page(&id, level, &bytes).map_err(|e| in_context(e, &ctx))?);
        self.lock().pages.insert(id, entries.clone(), 1);
        Ok(entries)
    }

    /// Chunk `id` (non-zero) for chunk `index`: from the cache, or fetched once however many
    /// callers ask at the same time.
    async fn chunk(&self, index: u64, id: ChunkId) -> Result<Chunk> {
        let flight = {
            let mut st = self.lock();
            if let Some(c) = st.chunks.get(&id) {
                self.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(c);
            }
            Flight {
                inner: self,
                id,
                cell: st.inflight.entry(id).or_default().clone(),
            }
        };
        let c = flight
            .cell
            .get_or_try_init(|| async {
                self.chunk_fetches.fetch_add(1, Ordering::Relaxed);
                let ctx = self.context(index);
                let plain = self
                    .vault
                    .read_blob(&id, &ctx)
                    .await
                    .map_err(|e| in_context(e, &ctx))?;
                if plain.len() > self.disk.chunk_size as usize {
                    return Err(StoreError::corrupt(
                        self.point.object_name(),
                        format!(
                            "{ctx}: chunk {id} holds {} bytes, more than the chunk size",
                            plain.len()
                        ),
                    ));
                }
                Ok(Arc::new(plain))
            })
            .await?
            .clone();
        self.lock().chunks.insert(id, c.clone(), c.len());
        Ok(c)
    }
}

/// A caller's share of a chunk fetch. Dropped (done, failed or cancelled), it removes the
/// fetch from the in-flight map once the chunk is fetched or no other caller waits on it, so
/// the map never keeps entries for fetches nobody finishes.
struct Flight<'a> {
    inner: &'a Inner,
    id: ChunkId,
    cell: Arc<OnceCell<Chunk>>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        // Clones of the cell are only made under the lock: the map's and ours are the last
        // when the count is 2.
        if st
            .inflight
            .get(&self.id)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cell))
            && (self.cell.initialized() || Arc::strong_count(&self.cell) == 2)
        {
            st.inflight.remove(&self.id);
        }
    }
}

/// Adds `ctx` (point, disk, chunk index) to an error from reading one blob, keeping its
/// variant (so callers still tell damage from an unreachable backend).
fn in_context(e: StoreError, ctx: &str) -> StoreError {
    match e {
        StoreError::Tampered { object, what } => StoreError::Tampered {
            object,
            what: format!("{what}, {ctx}"),
        },
        StoreError::Corrupt { object, reason } => StoreError::Corrupt {
            object,
            reason: format!("{reason} ({ctx})"),
        },
        StoreError::MissingObject(object) => StoreError::MissingChunk {
            id: String::from("in a missing pack"),
            context: format!("{ctx}; object `{object}` is missing"),
        },
        StoreError::Backend { object, source } => StoreError::Backend {
            object: format!("{object}` for `{ctx}"),
            source,
        },
        StoreError::LocalIndex { path, reason } => StoreError::LocalIndex {
            path,
            reason: format!("{reason} ({ctx})"),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::ImportOptions;

    const CS: u64 = 64 << 10;

    async fn vault(dir: &Path) -> Vault {
        crate::formats::testkit::vault(dir, u32::try_from(CS).unwrap()).await
    }

    fn noise(len: usize, mut x: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// 300 chunks of 64 KiB (two tree levels) and a short tail: noise, a zero chunk written
    /// as zeros, holes, two equal chunks far apart, data in the last bytes.
    fn image(dir: &Path) -> (PathBuf, Vec<u8>) {
        let size = CS * 300 + 1000;
        let mut img = vec![0u8; size as usize];
        img[..3 * CS as usize].copy_from_slice(&noise(3 * CS as usize, 7));
        // Chunk 3: zeros written explicitly; chunks 4..=9: a hole.
        img[10 * CS as usize..11 * CS as usize].fill(5);
        img[280 * CS as usize..281 * CS as usize].fill(5);
        img[(257 * CS + 100) as usize..(257 * CS + 5000) as usize]
            .copy_from_slice(&noise(4900, 99));
        let tail = size as usize - 700;
        img[tail..].copy_from_slice(&noise(700, 3));
        let path = dir.join("disk.img");
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&img, 0).unwrap();
        (path, img)
    }

    async fn setup(dir: &Path, opts: ReaderOptions) -> (Vault, PointReader, Vec<u8>) {
        let v = vault(dir).await;
        let (src, img) = image(dir);
        v.import(ImportOptions::full("web", &src), Arc::default())
            .await
            .unwrap();
        let r = v
            .open_reader("web", &PointSelector::Latest, None, opts)
            .await
            .unwrap();
        (v, r, img)
    }

    async fn read(r: &PointReader, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0xEEu8; len];
        r.read_at(offset, &mut b).await.unwrap();
        b
    }

    #[tokio::test]
    async fn reads_at_every_alignment_match_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let (_v, r, img) = setup(dir.path(), ReaderOptions::default()).await;
        assert_eq!(r.size(), img.len() as u64);
        assert_eq!(r.disk().levels, 2);
        // Whole disk in one read, then in odd-sized pieces.
        assert_eq!(read(&r, 0, img.len()).await, img);
        for piece in [1usize, 511, 4096, 65_537, 200_000] {
            let mut at = 0usize;
            while at < img.len() {
                let n = piece.min(img.len() - at);
                assert_eq!(
                    read(&r, at as u64, n).await,
                    img[at..at + n],
                    "{piece}@{at}"
                );
                at += n * 7 + 13; // skip around, at every alignment
            }
        }
        // Around every chunk boundary, and the zero, hole, duplicate and tail chunks.
        for boundary in [CS, 3 * CS, 4 * CS, 10 * CS, 256 * CS, 257 * CS, 300 * CS] {
            for (back, len) in [(1u64, 2usize), (100, 300), (CS - 1, CS as usize + 2)] {
                let at = boundary - back;
                let n = len.min(img.len() - at as usize);
                assert_eq!(
                    read(&r, at, n).await,
                    img[at as usize..at as usize + n],
                    "{at}+{n}"
                );
            }
        }
        let last = img.len() as u64 - 1;
        assert_eq!(read(&r, last, 1).await, img[last as usize..]);
        assert!(read(&r, img.len() as u64, 0).await.is_empty());
    }

    #[tokio::test]
    async fn zero_chunks_are_not_fetched_and_duplicates_are_cached_once() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ReaderOptions {
            read_ahead: 0,
            ..ReaderOptions::default()
        };
        let (_v, r, _img) = setup(dir.path(), opts).await;
        // Chunks 3 (zeros) to 9 (hole), and 100..200 (an all-zero run).
        assert_eq!(
            read(&r, 3 * CS, 7 * CS as usize).await,
            vec![0; 7 * CS as usize]
        );
        assert_eq!(
            read(&r, 100 * CS, 100 * CS as usize).await,
            vec![0; 100 * CS as usize]
        );
        assert_eq!(r.stats().chunk_fetches, 0);
        // Chunks 10 and 280 hold the same bytes: fetched once.
        assert_eq!(read(&r, 10 * CS, 10).await, vec![5; 10]);
        assert_eq!(read(&r, 280 * CS + 7, 10).await, vec![5; 10]);
        let s = r.stats();
        assert_eq!((s.chunk_fetches, s.cache_hits, s.cached_chunks), (1, 1, 1));
    }

    #[tokio::test]
    async fn reads_past_the_end_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_v, r, img) = setup(dir.path(), ReaderOptions::default()).await;
        let size = img.len() as u64;
        for (at, len) in [
            (size, 1usize),
            (size - 10, 11),
            (size + 5, 0),
            (u64::MAX, 1),
        ] {
            let mut b = vec![0u8; len];
            let e = r.read_at(at, &mut b).await.unwrap_err();
            assert!(matches!(e, StoreError::InvalidArgument(_)), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("past the end") && msg.contains("disk0"),
                "{msg}"
            );
        }
    }

    #[tokio::test]
    async fn the_cache_stays_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ReaderOptions {
            cache_bytes: 3 * CS as usize,
            page_cache_pages: 1,
            read_ahead: 8,
            fetch_concurrency: 2,
        };
        let (_v, r, img) = setup(dir.path(), opts).await;
        // Sequential reads: read-ahead is capped to a quarter of the cache (0 chunks here).
        let mut at = 0usize;
        while at < img.len() {
            let n = (CS as usize / 2).min(img.len() - at);
            assert_eq!(read(&r, at as u64, n).await, img[at..at + n]);
            at += n;
            assert!(r.stats().cached_bytes <= 3 * CS as usize, "{:?}", r.stats());
        }
        let s = r.stats();
        assert!(s.cached_chunks <= 3, "{s:?}");
        // Chunks 0..3 were evicted: read again, they are fetched again.
        let before = s.chunk_fetches;
        assert_eq!(read(&r, 0, 3 * CS as usize).await, img[..3 * CS as usize]);
        assert!(r.stats().chunk_fetches >= before + 3);
        assert!(r.stats().cached_bytes <= 3 * CS as usize);
        // With a cache too small for one chunk, nothing is kept and reads still work.
        let r0 = PointReader::new(
            r.inner.vault.clone(),
            r.point().clone(),
            r.disk().clone(),
            ReaderOptions {
                cache_bytes: 1000,
                ..opts
            },
        )
        .unwrap();
        assert_eq!(read(&r0, 0, 2 * CS as usize).await, img[..2 * CS as usize]);
        assert_eq!(r0.stats().cached_bytes, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sequential_reads_fetch_ahead_and_concurrent_readers_share() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ReaderOptions {
            cache_bytes: 64 * CS as usize,
            read_ahead: 4,
            ..ReaderOptions::default()
        };
        let (_v, r, img) = setup(dir.path(), opts).await;
        // Two sequential reads of chunk 0 start read-ahead of chunks 1.. (noise, then zeros).
        assert_eq!(read(&r, 0, 4096).await, img[..4096]);
        assert_eq!(read(&r, 4096, 4096).await, img[4096..8192]);
        for _ in 0..200 {
            if r.stats().chunk_fetches >= 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let s = r.stats();
        assert!(s.chunk_fetches >= 3, "{s:?}");
        let hits = s.cache_hits;
        assert_eq!(
            read(&r, CS, 2 * CS as usize).await,
            img[CS as usize..3 * CS as usize]
        );
        assert!(r.stats().cache_hits >= hits + 2);
        // Clones read concurrently and share the cache.
        let tasks: Vec<_> = (0..4)
            .map(|k| {
                let r = r.clone();
                let img = img.clone();
                tokio::spawn(async move {
                    let at = 250 * CS as usize + k * 1000;
                    let n = 20 * CS as usize;
                    assert_eq!(read(&r, at as u64, n).await, img[at..at + n]);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(r.stats().cached_bytes <= 64 * CS as usize);
    }

    #[tokio::test]
    async fn concurrent_reads_of_one_chunk_fetch_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ReaderOptions {
            read_ahead: 0,
            ..ReaderOptions::default()
        };
        let (_v, r, img) = setup(dir.path(), opts).await;
        let (a, b, c) = tokio::join!(read(&r, 0, 100), read(&r, 50, 100), read(&r, 1000, 10));
        assert_eq!(
            (a, b, c),
            (
                img[..100].to_vec(),
                img[50..150].to_vec(),
                img[1000..1010].to_vec()
            )
        );
        assert_eq!(r.stats().chunk_fetches, 1);
        assert!(r.inner.lock().inflight.is_empty());
        // A read dropped mid-fetch leaves nothing in flight.
        let mut b = vec![0u8; 10];
        let mut fut = Box::pin(r.read_at(CS, &mut b));
        let _ = futures::poll!(fut.as_mut());
        drop(fut);
        assert!(r.inner.lock().inflight.is_empty());
    }

    #[tokio::test]
    async fn a_corrupted_blob_fails_naming_the_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ReaderOptions {
            read_ahead: 0,
            ..ReaderOptions::default()
        };
        let (v, r, img) = setup(dir.path(), opts).await;
        let damaged = crate::formats::testkit::damage_data_packs(&v).await;
        // Some chunk now fails; find it by reading chunk by chunk.
        let mut failed = None;
        for index in 0..=300u64 {
            let at = index * CS;
            let n = CS.min(img.len() as u64 - at) as usize;
            let mut b = vec![0u8; n];
            if let Err(e) = r.read_at(at, &mut b).await {
                failed = Some((index, e));
                break;
            }
            assert_eq!(b, img[at as usize..at as usize + n]);
        }
        let (index, e) = failed.expect("a damaged chunk fails");
        assert!(
            matches!(e, StoreError::Tampered { .. } | StoreError::Corrupt { .. }),
            "{e}"
        );
        let msg = e.to_string();
        assert!(msg.contains(&format!("chunk {index}")), "{msg}");
        assert!(
            msg.contains(&r.point().id) && msg.contains("disk0"),
            "{msg}"
        );
        assert!(damaged.iter().any(|n| msg.contains(n.as_str())), "{msg}");
        // The failure is not cached: the same read fails again.
        let mut b = vec![0u8; 10];
        assert!(r.read_at(index * CS, &mut b).await.is_err());
    }

    #[tokio::test]
    async fn unknown_point_or_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (v, _r, _img) = setup(dir.path(), ReaderOptions::default()).await;
        let o = ReaderOptions::default();
        assert!(matches!(
            v.open_reader("nope", &PointSelector::Latest, None, o).await,
            Err(StoreError::NoSuchPoint { .. })
        ));
        assert!(matches!(
            v.open_reader("web", &PointSelector::Latest, Some("disk9"), o)
                .await,
            Err(StoreError::InvalidArgument(_))
        ));
    }

    #[test]
    fn lru_evicts_least_recently_used() {
        let mut l: Lru<u8, u8> = Lru::new(3);
        l.insert(1, 1, 1);
        l.insert(2, 2, 1);
        l.insert(3, 3, 1);
        assert_eq!(l.get(&1), Some(1));
        l.insert(4, 4, 1);
        assert!(!l.contains(&2));
        assert!(l.contains(&1) && l.contains(&3) && l.contains(&4));
        l.insert(5, 5, 2);
        assert_eq!(l.cost, 3);
        assert!(l.contains(&5) && l.contains(&4));
        l.insert(6, 6, 4);
        assert!(!l.contains(&6));
        assert_eq!(l.cost, 3);
    }
}
