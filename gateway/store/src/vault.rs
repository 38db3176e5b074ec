//! An open vault: its location, its unwrapped keys, its local index cache.
//!
//! Opening a vault reads `config`, unwraps the keys with the caller's secret and brings the
//! local index cache up to date with the bucket (loading index segments it has not seen). A
//! new machine given only the bucket and the secret therefore restores everything; nothing is
//! written to the bucket by opening.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;

use crate::backend::Backend;
use crate::config::{CONFIG_OBJECT, VaultConfig};
use crate::crypto::{Argon2Params, MasterKeys, Secret};
use crate::error::{Result, StoreError};
use crate::index::{INDEX_PREFIX, LocalIndex, Location, PackInfo, decode_segment};
use crate::pack::{BlobError, open_blob_into, pack_key_label};
use crate::point::{POINTS_PREFIX, PointRecord, point_object};
use crate::sealed::{APPLIANCE_MAGIC, POINT_MAGIC, SEGMENT_MAGIC};
use crate::tree::PageStore;
use crate::{ChunkId, DEFAULT_CHUNK_SIZE, check_name};

/// Where appliance catalog snapshots live: `appliance/<time>-<8 hex>`.
pub const APPLIANCE_PREFIX: &str = "appliance/";
/// Largest appliance snapshot body.
pub const MAX_APPLIANCE_SNAPSHOT: usize = 64 << 20;

/// Performance knobs; every buffer the data paths hold is bounded by these.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Target size of a pack, bytes (16–64 MiB recommended for cloud stores).
    pub pack_target: usize,
    /// Hash/compress/encrypt workers (default: all cores).
    pub workers: usize,
    /// Packs uploading at once.
    pub uploads: usize,
    /// Packs listed per index segment.
    pub packs_per_segment: usize,
    /// zstd level of data chunks.
    pub zstd_level: i32,
    /// Largest coalesced ranged read on restore, bytes.
    pub read_window: usize,
    /// Ranged reads in flight on restore.
    pub fetch_concurrency: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            pack_target: 16 << 20,
            workers: std::thread::available_parallelism().map_or(2, usize::from),
            uploads: 2,
            packs_per_segment: 64,
            zstd_level: 1,
            read_window: 4 << 20,
            fetch_concurrency: 4,
        }
    }
}

impl Tuning {
    /// Upper bound of the memory the ingest pipeline holds in buffers, for a chunk size.
    pub fn ingest_memory_bound(&self, chunk_size: u32) -> usize {
        let chunk = chunk_size as usize;
        // Two open packs (data, pages), one pack queued and `uploads` uploading, chunks
        // between stages (reorder window and buffer pool).
        2 * (self.pack_target + chunk)
            + (self.uploads + 1) * self.pack_target
            + 10 * self.workers * chunk
    }
}

/// How to open a vault.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Directory of the local index cache (one redb file per vault id below it).
    pub cache_dir: PathBuf,
    /// Data-path tuning.
    pub tuning: Tuning,
}

impl OpenOptions {
    /// Options with the given cache dir and default tuning.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            tuning: Tuning::default(),
        }
    }
}

/// How to create a vault.
#[derive(Debug, Clone, Copy)]
pub struct InitOptions {
    /// Default chunk size of new disks.
    pub chunk_size: u32,
    /// Argon2id parameters (passphrase vaults).
    pub argon: Argon2Params,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            argon: Argon2Params::default(),
        }
    }
}

/// Which point of an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PointSelector {
    /// The newest.
    Latest,
    /// The newest application-consistent one.
    LatestAppConsistent,
    /// The newest created at or before this time (Unix milliseconds).
    AtOrBefore(u64),
    /// By id.
    Id(String),
}

impl PointSelector {
    /// `latest`, `latest-app-consistent`, an RFC 3339 time (`2026-11-27T05:20:00Z`: the
    /// newest point at or before it), or a point id. A point id never parses as a time (ids
    /// are `YYYYMMDDTHHMMSS.mmmZ-…`, without `-` in the date or `:`).
    pub fn parse(s: &str) -> Self {
        match s {
            "latest" => PointSelector::Latest,
            "latest-app-consistent" => PointSelector::LatestAppConsistent,
            _ => match crate::point::parse_rfc3339(s) {
                Some(ms) => PointSelector::AtOrBefore(ms),
                None => PointSelector::Id(s.to_string()),
            },
        }
    }
}

impl std::fmt::Display for PointSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PointSelector::Latest => f.write_str("latest"),
            PointSelector::LatestAppConsistent => f.write_str("latest-app-consistent"),
            PointSelector::AtOrBefore(ms) => f.write_str(&crate::point::rfc3339(*ms)),
            PointSelector::Id(id) => f.write_str(id),
        }
    }
}

/// An open vault.
#[derive(Debug, Clone)]
pub struct Vault {
    pub(crate) backend: Backend,
    pub(crate) keys: Arc<MasterKeys>,
    pub(crate) config: VaultConfig,
    pub(crate) index: Arc<LocalIndex>,
    pub(crate) tuning: Tuning,
    index_path: PathBuf,
    /// Index segments that could not be read when the vault was opened, with the reason.
    unreadable_segments: Arc<Vec<(String, String)>>,
    /// Bumped each time entries are added to the local index (readers refresh on change).
    pub(crate) index_generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Vault {
    /// Creates a new vault at `backend` protected by `secret`. Fails if one exists.
    pub async fn init(
        backend: Backend,
        secret: &Secret,
        init: InitOptions,
        open: OpenOptions,
    ) -> Result<Self> {
        crate::check_chunk_size(init.chunk_size).map_err(StoreError::InvalidArgument)?;
        if backend.get_opt(CONFIG_OBJECT).await?.is_some() {
            return Err(StoreError::AlreadyInitialized(backend.url().to_string()));
        }
        let keys = MasterKeys::generate();
        let created = crate::point::rfc3339(crate::point::now_ms());
        let s = secret.clone();
        let config = tokio::task::spawn_blocking(move || {
            VaultConfig::create(&keys, &s, init.argon, init.chunk_size, created).map(|c| (c, keys))
        })
        .await
        .map_err(|e| StoreError::Pipeline(e.to_string()))??;
        let (config, keys) = config;
        if !backend
            .put_create(CONFIG_OBJECT, Bytes::from(config.to_bytes()))
            .await?
        {
            return Err(StoreError::AlreadyInitialized(backend.url().to_string()));
        }
        backend.barrier().await?;
        Self::finish_open(backend, keys, config, open).await
    }

    /// Opens the vault at `backend` with `secret` and syncs the local index cache.
    pub async fn open(backend: Backend, secret: &Secret, open: OpenOptions) -> Result<Self> {
        let Some(raw) = backend.get_opt(CONFIG_OBJECT).await? else {
            return Err(StoreError::NotAVault(backend.url().to_string()));
        };
        let config = VaultConfig::parse(&raw)?;
        let s = secret.clone();
        let c = config.clone();
        let keys = tokio::task::spawn_blocking(move || c.unwrap_keys(&s))
            .await
            .map_err(|e| StoreError::Pipeline(e.to_string()))??;
        Self::finish_open(backend, keys, config, open).await
    }

    async fn finish_open(
        backend: Backend,
        keys: MasterKeys,
        config: VaultConfig,
        open: OpenOptions,
    ) -> Result<Self> {
        let index_path = open.cache_dir.join(&config.vault_id).join("index.redb");
        let p = index_path.clone();
        let id = config.vault_id.clone();
        let index = tokio::task::spawn_blocking(move || LocalIndex::open(&p, &id))
            .await
            .map_err(|e| StoreError::Pipeline(e.to_string()))??;
        let mut v = Self {
            backend,
            keys: Arc::new(keys),
            config,
            index: Arc::new(index),
            tuning: open.tuning,
            index_path,
            unreadable_segments: Arc::new(Vec::new()),
            index_generation: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        };
        let unreadable = v.sync_index().await?;
        v.unreadable_segments = Arc::new(unreadable);
        Ok(v)
    }

    /// The vault id.
    pub fn id(&self) -> &str {
        &self.config.vault_id
    }

    /// The vault config.
    pub fn config(&self) -> &VaultConfig {
        &self.config
    }

    /// The backend.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The local index file.
    pub fn index_path(&self) -> &std::path::Path {
        &self.index_path
    }

    /// Data-path tuning.
    pub fn tuning(&self) -> Tuning {
        self.tuning
    }

    /// Index segments that could not be read when the vault was opened (name, reason). The
    /// chunks they list are unknown until `rebuild-index` finds them through pack trailers.
    pub fn unreadable_segments(&self) -> &[(String, String)] {
        &self.unreadable_segments
    }

    /// Loads index segments the local cache has not seen. A segment that cannot be read or
    /// authenticated is skipped and returned with the reason, so one damaged object does not
    /// lock the operator out of the vault.
    pub async fn sync_index(&self) -> Result<Vec<(String, String)>> {
        let mut names: Vec<String> = self
            .backend
            .list(INDEX_PREFIX)
            .await?
            .into_iter()
            .map(|m| m.location.to_string())
            .collect();
        names.sort();
        let mut todo = Vec::new();
        for n in names {
            if !self.index.has_segment(&n)? {
                todo.push(n);
            }
        }
        let mut unreadable = Vec::new();
        let mut fetched = futures::stream::iter(todo.into_iter().map(|n| async move {
            let b = self.backend.get(&n).await?;
            Ok::<_, StoreError>((n, b))
        }))
        .buffer_unordered(8);
        while let Some(r) = fetched.next().await {
            let (name, bytes) = r?;
            let packs =
                crate::sealed::open(&self.keys, SEGMENT_MAGIC, &name, &bytes).and_then(|body| {
                    decode_segment(&body).map_err(|e| StoreError::corrupt(&name, e.to_string()))
                });
            match packs {
                Ok(packs) => self.index.insert(Some(&name), &packs)?,
                Err(e) => unreadable.push((name, e.to_string())),
            }
        }
        self.index_generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(unreadable)
    }

    /// Object names of every point record (of `item`, if given), sorted.
    pub async fn point_names(&self, item: Option<&str>) -> Result<Vec<String>> {
        let prefix = match item {
            Some(i) => {
                check_name("item name", i)?;
                format!("{POINTS_PREFIX}{i}/")
            }
            None => POINTS_PREFIX.to_string(),
        };
        let mut names: Vec<String> = self
            .backend
            .list(&prefix)
            .await?
            .into_iter()
            .map(|m| m.location.to_string())
            .collect();
        // Sort by (item, id); ids sort by time.
        names.sort();
        Ok(names)
    }

    /// Stores an appliance catalog snapshot (sealed, create-only, named by time under
    /// [`APPLIANCE_PREFIX`]) and returns its object name. The vault holds it so that an
    /// appliance lost with its site can be rebuilt from the bucket and the key alone; the
    /// store does not look inside `body`. Bounded by [`MAX_APPLIANCE_SNAPSHOT`].
    pub async fn put_appliance_snapshot(&self, body: &[u8]) -> Result<String> {
        if body.len() > MAX_APPLIANCE_SNAPSHOT {
            return Err(StoreError::InvalidArgument(format!(
                "an appliance snapshot of {} bytes is over the {MAX_APPLIANCE_SNAPSHOT}-byte cap",
                body.len()
            )));
        }
        loop {
            let name = format!(
                "{APPLIANCE_PREFIX}{}",
                crate::point::new_point_id(crate::point::now_ms())
            );
            let sealed = crate::sealed::seal(&self.keys, APPLIANCE_MAGIC, &name, body);
            if self.backend.put_create(&name, Bytes::from(sealed)).await? {
                return Ok(name);
            }
        }
    }

    /// The newest appliance snapshot (its object name and body), authenticated; `None` when
    /// the vault holds none.
    pub async fn latest_appliance_snapshot(&self) -> Result<Option<(String, Vec<u8>)>> {
        let Some(name) = self.appliance_snapshot_names().await?.pop() else {
            return Ok(None);
        };
        let b = self.backend.get(&name).await?;
        let body = crate::sealed::open(&self.keys, APPLIANCE_MAGIC, &name, &b)?;
        Ok(Some((name, body)))
    }

    /// Deletes all but the newest `keep` appliance snapshots; returns how many went.
    pub async fn prune_appliance_snapshots(&self, keep: usize) -> Result<usize> {
        let names = self.appliance_snapshot_names().await?;
        let old = names.len().saturating_sub(keep.max(1));
        for n in &names[..old] {
            self.backend.delete(n).await?;
        }
        Ok(old)
    }

    /// Appliance snapshot object names, oldest first (names sort by time).
    async fn appliance_snapshot_names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .backend
            .list(APPLIANCE_PREFIX)
            .await?
            .into_iter()
            .map(|m| m.location.to_string())
            .filter(|n| {
                n.strip_prefix(APPLIANCE_PREFIX)
                    .is_some_and(|id| crate::check_name("snapshot id", id).is_ok())
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// Loads and authenticates one point record.
    pub async fn load_point(&self, object: &str) -> Result<PointRecord> {
        let b = self.backend.get(object).await?;
        let body = crate::sealed::open(&self.keys, POINT_MAGIC, object, &b)?;
        PointRecord::decode(object, &body)
    }

    /// Every point (of `item`, if given), oldest first within each item.
    pub async fn points(&self, item: Option<&str>) -> Result<Vec<PointRecord>> {
        let names = self.point_names(item).await?;
        let mut out = Vec::with_capacity(names.len());
        let mut s = futures::stream::iter(names.iter().map(|n| self.load_point(n))).buffered(8);
        while let Some(p) = s.next().await {
            out.push(p?);
        }
        Ok(out)
    }

    /// One point of `item`.
    pub async fn point(&self, item: &str, sel: &PointSelector) -> Result<PointRecord> {
        check_name("item name", item)?;
        match sel {
            PointSelector::Id(id) => {
                if crate::check_name("point id", id).is_err() {
                    return Err(StoreError::NoSuchPoint {
                        what: format!("`{id}` for item `{item}`"),
                    });
                }
                match self.load_point(&point_object(item, id)).await {
                    Err(StoreError::MissingObject(_)) => Err(StoreError::NoSuchPoint {
                        what: format!("`{id}` for item `{item}`"),
                    }),
                    r => r,
                }
            }
            PointSelector::Latest => {
                let names = self.point_names(Some(item)).await?;
                match names.last() {
                    Some(n) => self.load_point(n).await,
                    None => Err(StoreError::NoSuchPoint {
                        what: format!("for item `{item}` (it has none)"),
                    }),
                }
            }
            PointSelector::LatestAppConsistent => {
                // Newest first; point records are small and an app-consistent point is
                // usually among the last few (the policy's app-consistent frequency).
                let names = self.point_names(Some(item)).await?;
                for n in names.iter().rev() {
                    let p = self.load_point(n).await?;
                    if p.consistency == crate::point::Consistency::App {
                        return Ok(p);
                    }
                }
                Err(StoreError::NoSuchPoint {
                    what: format!(
                        "for item `{item}`: none of its {} point(s) is application-consistent",
                        names.len()
                    ),
                })
            }
            PointSelector::AtOrBefore(ms) => {
                // Ids start with their creation time (`YYYYMMDDTHHMMSS.mmmZ`), which sorts
                // like the time: the candidates are the names whose id prefix is not after
                // `ms`; the record's own time is checked too.
                let names = self.point_names(Some(item)).await?;
                let limit = crate::point::compact_time(*ms);
                let prefix = format!("{POINTS_PREFIX}{item}/");
                for n in names.iter().rev() {
                    let id = n.strip_prefix(&prefix).unwrap_or(n);
                    if id.get(..limit.len()).is_some_and(|t| t > limit.as_str()) {
                        continue;
                    }
                    let p = self.load_point(n).await?;
                    if p.created_ms <= *ms {
                        return Ok(p);
                    }
                }
                Err(StoreError::NoSuchPoint {
                    what: if names.is_empty() {
                        format!("for item `{item}` (it has none)")
                    } else {
                        format!(
                            "for item `{item}` at or before {} (all {} of its points are later)",
                            crate::point::rfc3339(*ms),
                            names.len()
                        )
                    },
                })
            }
        }
    }

    /// Where a blob is, and its pack's info.
    pub(crate) fn locate(&self, id: &ChunkId) -> Result<Option<(Location, PackInfo)>> {
        let r = self.index.reader()?;
        let Some(loc) = r.lookup(id)? else {
            return Ok(None);
        };
        let info = r.pack(&loc.pack)?.ok_or_else(|| {
            StoreError::local_index(
                &self.index_path,
                format!("pack {} of a chunk is unknown", loc.pack),
            )
        })?;
        Ok(Some((loc, info)))
    }

    /// Fetches, authenticates and returns one blob.
    pub async fn read_blob(&self, id: &ChunkId, context: &str) -> Result<Vec<u8>> {
        let (loc, info) = self.locate(id)?.ok_or_else(|| StoreError::MissingChunk {
            id: id.to_string(),
            context: context.to_string(),
        })?;
        let name = loc.pack.object_name(loc.kind);
        let start = loc.entry.offset;
        let bytes = self
            .backend
            .get_range(&name, start..start + u64::from(loc.entry.stored_len))
            .await?;
        let mut ct = bytes.to_vec();
        self.open_located(&loc, &info, &mut ct)
    }

    /// Authenticates and decodes a blob already fetched.
    pub(crate) fn open_located(
        &self,
        loc: &Location,
        info: &PackInfo,
        ct: &mut [u8],
    ) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.open_located_into(loc, info, ct, &mut out)?;
        Ok(out)
    }

    /// [`Vault::open_located`] into a reused buffer; `ct` is decrypted in place.
    pub(crate) fn open_located_into(
        &self,
        loc: &Location,
        info: &PackInfo,
        ct: &mut [u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let cipher = self
            .keys
            .derive_cipher(&info.salt, &pack_key_label(&loc.pack));
        self.open_with_cipher(&cipher, loc, ct, out)
    }

    /// [`Vault::open_located_into`] with the pack's cipher already derived (a restore window
    /// derives it once for all its blobs).
    pub(crate) fn open_with_cipher(
        &self,
        cipher: &crate::crypto::ObjectCipher,
        loc: &Location,
        ct: &mut [u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        open_blob_into(&self.keys, cipher, &loc.pack, loc.kind, &loc.entry, ct, out).map_err(|e| {
            let object = loc.pack.object_name(loc.kind);
            let what = format!("blob {} at offset {}", loc.entry.id, loc.entry.offset);
            match e {
                BlobError::Auth => StoreError::Tampered { object, what },
                other => StoreError::corrupt(object, format!("{what}: {other}")),
            }
        })
    }

    /// A page store for reading trees from a blocking thread.
    pub(crate) fn read_pages(&self, handle: tokio::runtime::Handle) -> ReadPages<'_> {
        ReadPages {
            vault: self,
            handle,
        }
    }
}

/// Reads tree pages from the vault (blocking; used from worker threads).
#[derive(Debug)]
pub(crate) struct ReadPages<'a> {
    vault: &'a Vault,
    handle: tokio::runtime::Handle,
}

impl PageStore for ReadPages<'_> {
    fn load(&mut self, id: &ChunkId) -> Result<Vec<u8>> {
        self.handle
            .block_on(self.vault.read_blob(id, "a disk tree"))
    }

    fn store(&mut self, _page: Vec<u8>) -> Result<ChunkId> {
        Err(StoreError::Pipeline(
            "read-only page store asked to store".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn vault(dir: &std::path::Path) -> Vault {
        Vault::init(
            Backend::open("memory://", &Vec::new(), false).unwrap(),
            &Secret::KeyFile(vec![9; 32]),
            InitOptions::default(),
            OpenOptions::new(dir.join("cache")),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn points_are_chosen_latest_app_consistent_by_time_or_id() {
        use crate::point::Consistency;
        let dir = tempfile::tempdir().unwrap();
        let v = vault(dir.path()).await;
        let img = dir.path().join("disk.img");
        std::fs::write(&img, vec![7u8; 256 << 10]).unwrap();
        let none = v.point("web", &PointSelector::Latest).await.unwrap_err();
        assert!(none.to_string().contains("has none"), "{none}");
        let mut made = Vec::new();
        for c in [Consistency::Crash, Consistency::App, Consistency::Crash] {
            let mut o = crate::ImportOptions::full("web", &img);
            o.consistency = c;
            let r = v
                .import(o, Arc::new(crate::Progress::default()))
                .await
                .unwrap();
            made.push(r.point);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let pick = |sel: PointSelector| {
            let v = v.clone();
            async move { v.point("web", &sel).await.map(|p| p.id) }
        };
        assert_eq!(pick(PointSelector::Latest).await.unwrap(), made[2].id);
        assert_eq!(
            pick(PointSelector::parse("latest-app-consistent"))
                .await
                .unwrap(),
            made[1].id
        );
        // By time: the newest at or before it (its own creation time included).
        let at = |ms: u64| PointSelector::parse(&crate::point::rfc3339(ms));
        assert_eq!(pick(at(made[1].created_ms)).await.unwrap(), made[1].id);
        assert_eq!(pick(at(made[2].created_ms - 1)).await.unwrap(), made[1].id);
        assert_eq!(
            pick(at(made[2].created_ms + 60_000)).await.unwrap(),
            made[2].id
        );
        let early = pick(at(made[0].created_ms - 1)).await.unwrap_err();
        assert!(
            early.to_string().contains("all 3 of its points are later"),
            "{early}"
        );
        assert_eq!(
            pick(PointSelector::parse(&made[0].id)).await.unwrap(),
            made[0].id
        );
        assert_eq!(
            PointSelector::parse(&made[0].id),
            PointSelector::Id(made[0].id.clone())
        );
        // No app-consistent point: said so.
        let mut o = crate::ImportOptions::full("db", &img);
        o.consistency = Consistency::Crash;
        v.import(o, Arc::new(crate::Progress::default()))
            .await
            .unwrap();
        let e = v
            .point("db", &PointSelector::LatestAppConsistent)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("application-consistent"), "{e}");
    }

    #[tokio::test]
    async fn appliance_snapshots_newest_wins_pruned_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let v = vault(dir.path()).await;
        assert_eq!(v.latest_appliance_snapshot().await.unwrap(), None);
        let mut names = Vec::new();
        for i in 0..3u8 {
            names.push(v.put_appliance_snapshot(&[i; 100]).await.unwrap());
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        assert!(names.iter().all(|n| n.starts_with(APPLIANCE_PREFIX)));
        let (name, body) = v.latest_appliance_snapshot().await.unwrap().unwrap();
        assert_eq!((name.as_str(), body), (names[2].as_str(), vec![2u8; 100]));
        assert_eq!(v.prune_appliance_snapshots(2).await.unwrap(), 1);
        assert_eq!(v.appliance_snapshot_names().await.unwrap(), names[1..]);
        // Bound to its name: the newest copied under a later name does not open.
        let sealed = v.backend.get(&names[1]).await.unwrap();
        let later = format!("{APPLIANCE_PREFIX}29991231T000000.000Z-00000000");
        assert!(v.backend.put_create(&later, sealed).await.unwrap());
        assert!(matches!(
            v.latest_appliance_snapshot().await,
            Err(StoreError::Tampered { .. })
        ));
        assert!(matches!(
            v.put_appliance_snapshot(&vec![0; MAX_APPLIANCE_SNAPSHOT + 1])
                .await,
            Err(StoreError::InvalidArgument(_))
        ));
    }
}
