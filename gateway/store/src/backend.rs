//! The object-store location a vault lives in, chosen by URL.
//!
//! - a plain path or `file:///path`: a local directory (created at `init`);
//! - `s3://bucket[/prefix]`: S3 or an S3-compatible store; options from `AWS_*` environment
//!   variables or `--repo-option` pairs (`endpoint`, `region`, `allow_http`, …);
//! - `az://container[/prefix]`: Azure Blob Storage; options from `AZURE_*` environment
//!   variables or `--repo-option` pairs (`account_name`, `endpoint`, `allow_http`, …);
//! - `memory://`: in-process, for unit tests only.
//!
//! [`Backend`] wraps the store with the few operations the vault needs, each mapping errors to
//! [`StoreError`] naming the object, and uploads that are create-only: a single `PUT` with
//! `If-None-Match: *` semantics for ordinary objects, and for large packs a multipart upload to
//! a staging name followed by a create-only copy (`copy_if_not_exists`).
//! [`Backend::put_create_file`] streams a local file (an export, `crate::upload`) the same
//! way, a bounded number of bounded parts at a time, so memory does not grow with the file.

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::error::{Result, StoreError};

/// Where staged multipart uploads go before their create-only copy.
pub const STAGING_PREFIX: &str = "staging";

/// Tuning of uploads.
#[derive(Debug, Clone, Copy)]
pub struct UploadTuning {
    /// Objects larger than this are uploaded in parts.
    pub multipart_threshold: usize,
    /// Size of each part (S3 requires at least 5 MiB for all but the last).
    pub part_size: usize,
}

impl Default for UploadTuning {
    fn default() -> Self {
        Self {
            multipart_threshold: 32 << 20,
            part_size: 8 << 20,
        }
    }
}

/// Most parts one multipart upload may have (S3's limit; Azure allows 50,000 blocks).
pub const MAX_PARTS: u64 = 10_000;

/// Largest object [`Backend::put_create_file`] publishes on S3 or Azure by a create-only copy
/// of a staged upload: S3 copies an object into a multipart upload as one `UploadPartCopy`
/// (at most 5 GiB), Azure's synchronous copy takes a source of at most 5,000 MiB.
pub const COPY_LIMIT: u64 = 5000 << 20;

/// Tuning of [`Backend::put_create_file`]: memory is bounded by `part_size × concurrency`.
#[derive(Debug, Clone, Copy)]
pub struct FileUploadTuning {
    /// Size of each part (S3 requires at least 5 MiB for all but the last). A file that would
    /// need more than [`MAX_PARTS`] parts gets larger parts, and then fewer of them in flight,
    /// so that `part_size × concurrency` still bounds the memory (at least one part in flight).
    pub part_size: usize,
    /// Parts read and uploading at once, at most.
    pub concurrency: usize,
    /// On S3 and Azure, files up to this size are uploaded to a staging name and published by
    /// a create-only copy (atomic: never overwrites). Larger files are uploaded straight to
    /// their name and completed only if the name is still free just before (checked, not
    /// atomic: a writer racing in that instant would be overwritten). Local directories and
    /// `memory://` ignore it unless it is lowered (their copy has no size limit).
    pub copy_limit: u64,
}

impl Default for FileUploadTuning {
    fn default() -> Self {
        Self {
            part_size: 16 << 20,
            concurrency: 4,
            copy_limit: COPY_LIMIT,
        }
    }
}

impl FileUploadTuning {
    /// The part size and concurrency for a file of `len` bytes: at most [`MAX_PARTS`] parts,
    /// whole MiB when grown, and `part × concurrency` within the configured budget — except
    /// that one part is always in flight, so past `budget × MAX_PARTS` bytes (640 GiB at the
    /// defaults) memory is one part of `len / MAX_PARTS`.
    pub fn plan(&self, len: u64) -> (usize, usize) {
        let part = self.part_size.max(1);
        let conc = self.concurrency.max(1);
        let min_part = usize::try_from(len.div_ceil(MAX_PARTS).next_multiple_of(1 << 20))
            .unwrap_or(usize::MAX);
        if min_part <= part {
            return (part, conc);
        }
        let budget = part.saturating_mul(conc);
        (min_part, (budget / min_part).max(1))
    }
}

/// An opened vault location.
#[derive(Debug, Clone)]
pub struct Backend {
    store: Arc<dyn ObjectStore>,
    url: String,
    tuning: UploadTuning,
    /// Root directory of a local vault: `barrier` syncs its file system.
    local_root: Option<std::path::PathBuf>,
}

/// Options for opening a location: `key=value` pairs handed to the object_store builder, on
/// top of what the environment provides.
pub type BackendOptions = Vec<(String, String)>;

impl Backend {
    /// Wraps an existing store (tests, fault injection).
    pub fn from_store(store: Arc<dyn ObjectStore>, url: impl Into<String>) -> Self {
        Self {
            store,
            url: url.into(),
            tuning: UploadTuning::default(),
            local_root: None,
        }
    }

    /// Opens the location named by `url`. `create_dir` makes a missing local directory.
    pub fn open(url: &str, options: &BackendOptions, create_dir: bool) -> Result<Self> {
        let cfg_err = |reason: String| StoreError::BackendConfig {
            url: url.to_string(),
            reason,
        };
        let mut local_root = None;
        let store: Arc<dyn ObjectStore> = if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = split_bucket(rest);
            let mut b = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_copy_if_not_exists(object_store::aws::S3CopyIfNotExists::Multipart);
            for (k, v) in options {
                let key: object_store::aws::AmazonS3ConfigKey = k
                    .parse()
                    .map_err(|_| cfg_err(format!("unknown S3 option `{k}`")))?;
                b = b.with_config(key, v);
            }
            let s = b.build().map_err(|e| cfg_err(e.to_string()))?;
            with_prefix(Arc::new(s), prefix)
        } else if let Some(rest) = url.strip_prefix("az://") {
            let (container, prefix) = split_bucket(rest);
            let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_container_name(container);
            for (k, v) in options {
                let key: object_store::azure::AzureConfigKey = k
                    .parse()
                    .map_err(|_| cfg_err(format!("unknown Azure option `{k}`")))?;
                b = b.with_config(key, v);
            }
            let s = b.build().map_err(|e| cfg_err(e.to_string()))?;
            with_prefix(Arc::new(s), prefix)
        } else if url == "memory://" {
            Arc::new(object_store::memory::InMemory::new())
        } else {
            let path = match url.strip_prefix("file://") {
                Some(p) => p,
                None if url.contains("://") => {
                    return Err(cfg_err(
                        "unsupported scheme (use a path, file://, s3:// or az://)".into(),
                    ));
                }
                None => url,
            };
            if !options.is_empty() {
                return Err(cfg_err("a local directory takes no --repo-option".into()));
            }
            if create_dir {
                std::fs::create_dir_all(path).map_err(|e| cfg_err(e.to_string()))?;
            }
            let abs = std::fs::canonicalize(path).map_err(|e| {
                cfg_err(format!(
                    "{e} (a local vault directory must exist; `init` creates it)"
                ))
            })?;
            let s = object_store::local::LocalFileSystem::new_with_prefix(&abs)
                .map_err(|e| cfg_err(e.to_string()))?
                .with_automatic_cleanup(true);
            local_root = Some(abs);
            Arc::new(s)
        };
        Ok(Self {
            store,
            url: url.to_string(),
            tuning: UploadTuning::default(),
            local_root,
        })
    }

    /// Changes upload tuning (tests use small values to exercise multipart).
    pub fn set_tuning(&mut self, t: UploadTuning) {
        self.tuning = t;
    }

    /// The URL this backend was opened from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Whole object.
    pub async fn get(&self, name: &str) -> Result<Bytes> {
        let p = Path::from(name);
        let r = self
            .store
            .get(&p)
            .await
            .map_err(|e| StoreError::backend(name, e))?;
        r.bytes().await.map_err(|e| StoreError::backend(name, e))
    }

    /// Whole object, or `None` if absent.
    pub async fn get_opt(&self, name: &str) -> Result<Option<Bytes>> {
        match self.get(name).await {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::MissingObject(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A byte range of an object; a short read is reported as corruption (truncated object).
    pub async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes> {
        let want = range.end - range.start;
        let b = self
            .store
            .get_range(&Path::from(name), range.clone())
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => StoreError::MissingObject(name.into()),
                e => StoreError::corrupt(
                    name,
                    format!("cannot read bytes {}..{}: {e}", range.start, range.end),
                ),
            })?;
        if b.len() as u64 != want {
            return Err(StoreError::corrupt(
                name,
                format!(
                    "short read: bytes {}..{} gave {} bytes (truncated?)",
                    range.start,
                    range.end,
                    b.len()
                ),
            ));
        }
        Ok(b)
    }

    /// Size and metadata of one object.
    pub async fn head(&self, name: &str) -> Result<ObjectMeta> {
        self.store
            .head(&Path::from(name))
            .await
            .map_err(|e| StoreError::backend(name, e))
    }

    /// Every object under `prefix` (recursive).
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let p = Path::from(prefix);
        self.store
            .list(Some(&p))
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(prefix, e))
    }

    /// Creates `name` only if it does not exist. Returns `Ok(false)` if it already existed.
    pub async fn put_create(&self, name: &str, data: Bytes) -> Result<bool> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&Path::from(name), PutPayload::from_bytes(data), opts)
            .await
        {
            Ok(_) => {
                self.sync_local(name).await?;
                Ok(true)
            }
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(StoreError::backend(name, e)),
        }
    }

    /// On a local directory, flushes one object's data now, so that the disk writes overlap
    /// with the work that follows and the next `barrier` finds little left to flush.
    async fn sync_local(&self, name: &str) -> Result<()> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let path = root.join(name);
        tokio::task::spawn_blocking(move || std::fs::File::open(&path)?.sync_data())
            .await
            .map_err(|e| StoreError::Pipeline(e.to_string()))?
            .map_err(|e| StoreError::Backend {
                object: name.to_string(),
                source: object_store::Error::Generic {
                    store: "local",
                    source: Box::new(e),
                },
            })
    }

    /// Creates `name` from possibly large data: one create-only `PUT` up to the multipart
    /// threshold; above it, a multipart upload to a staging name and a create-only copy.
    /// Returns `Ok(false)` if `name` already existed.
    pub async fn put_create_large(&self, name: &str, data: Bytes) -> Result<bool> {
        if data.len() <= self.tuning.multipart_threshold {
            return self.put_create(name, data).await;
        }
        let staging = format!(
            "{STAGING_PREFIX}/{}-{}",
            name.replace('/', "_"),
            hex::encode(crate::crypto::random_bytes::<8>())
        );
        let sp = Path::from(staging.as_str());
        let mut up = self
            .store
            .put_multipart(&sp)
            .await
            .map_err(|e| StoreError::backend(&staging, e))?;
        let part = self.tuning.part_size.max(1);
        let mut parts = Vec::new();
        let mut off = 0;
        while off < data.len() {
            let end = (off + part).min(data.len());
            parts.push(up.put_part(PutPayload::from_bytes(data.slice(off..end))));
            off = end;
        }
        let res: Result<()> = async {
            // Parts go up concurrently, a bounded number at a time.
            futures::stream::iter(parts)
                .buffer_unordered(4)
                .try_collect::<Vec<()>>()
                .await
                .map_err(|e| StoreError::backend(&staging, e))?;
            up.complete()
                .await
                .map_err(|e| StoreError::backend(&staging, e))?;
            Ok(())
        }
        .await;
        if let Err(e) = res {
            let _ = up.abort().await;
            return Err(e);
        }
        let copied = match self.store.copy_if_not_exists(&sp, &Path::from(name)).await {
            Ok(()) => true,
            Err(object_store::Error::AlreadyExists { .. }) => false,
            Err(e) => {
                let _ = self.store.delete(&sp).await;
                return Err(StoreError::backend(name, e));
            }
        };
        // The pack is in place; a staging copy left behind is garbage, not a failure.
        let _ = self.store.delete(&sp).await;
        Ok(copied)
    }

    /// Whether `name` exists.
    pub async fn exists(&self, name: &str) -> Result<bool> {
        match self.head(name).await {
            Ok(_) => Ok(true),
            Err(StoreError::MissingObject(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates `name` from the local file `path` only if `name` does not exist; returns
    /// `Ok(false)` if it already existed (nothing was changed). Memory is bounded by
    /// `tuning` (see [`FileUploadTuning::plan`]) whatever the file's size; `done` counts the
    /// bytes uploaded.
    ///
    /// Create-only as [`Backend::put_create_large`]: a file of at most one part is one
    /// create-only `PUT`; a larger one is a multipart upload to a staging name next to
    /// `name` (`<name>.ferry-partial-<random>`) published by a create-only copy
    /// (`copy_if_not_exists`: a conditional complete on S3, `If-None-Match: *` on Azure, a
    /// hard link on a local directory), then the staging object is deleted. Above
    /// `tuning.copy_limit` on S3 and Azure, whose copies are limited, the upload goes to
    /// `name` itself and is completed only if `name` is still absent just before. A multipart
    /// upload is invisible until completed, and aborted on any error; a staging object is
    /// deleted on any error. Only a crash can leave an unfinished upload or a staging object
    /// behind, never an object under `name` that is not the whole file.
    pub async fn put_create_file(
        &self,
        name: &str,
        path: &std::path::Path,
        tuning: FileUploadTuning,
        done: &AtomicU64,
    ) -> Result<bool> {
        let in_io = |source| StoreError::InputIo {
            path: path.to_path_buf(),
            source,
        };
        let file = Arc::new(std::fs::File::open(path).map_err(in_io)?);
        let len = file.metadata().map_err(in_io)?.len();
        if self.exists(name).await? {
            return Ok(false);
        }
        let (part, conc) = tuning.plan(len);
        if len <= part as u64 {
            let buf = read_part(&file, path, 0, usize::try_from(len).expect("len ≤ part")).await?;
            let created = self.put_create(name, Bytes::from(buf)).await?;
            if created {
                done.fetch_add(len, Ordering::Relaxed);
            }
            return Ok(created);
        }
        // A local directory's and memory's copies have no size limit.
        let unlimited = self.local_root.is_some() || self.url == "memory://";
        let direct = len > tuning.copy_limit && !(unlimited && tuning.copy_limit == COPY_LIMIT);
        let target = if direct {
            name.to_string()
        } else {
            format!(
                "{name}.ferry-partial-{}",
                hex::encode(crate::crypto::random_bytes::<8>())
            )
        };
        let tp = Path::from(target.as_str());
        let mut up = self
            .store
            .put_multipart(&tp)
            .await
            .map_err(|e| StoreError::backend(&target, e))?;
        let res: Result<bool> = async {
            let mut inflight = futures::stream::FuturesUnordered::new();
            let mut off = 0u64;
            while off < len {
                // At most `conc` parts in memory: one is read only when another is done.
                while inflight.len() >= conc {
                    let n = inflight.next().await.expect("parts in flight")?;
                    done.fetch_add(n, Ordering::Relaxed);
                }
                let n = usize::try_from((len - off).min(part as u64)).expect("≤ part");
                let buf = read_part(&file, path, off, n).await?;
                let fut = up.put_part(PutPayload::from_bytes(Bytes::from(buf)));
                let t = target.clone();
                inflight.push(async move {
                    fut.await
                        .map(|()| n as u64)
                        .map_err(|e| StoreError::backend(t, e))
                });
                off += n as u64;
            }
            while let Some(n) = inflight.next().await {
                done.fetch_add(n?, Ordering::Relaxed);
            }
            if direct && self.exists(name).await? {
                return Ok(false);
            }
            up.complete()
                .await
                .map_err(|e| StoreError::backend(&target, e))?;
            Ok(true)
        }
        .await;
        match res {
            Ok(true) => {}
            Ok(false) => {
                let _ = up.abort().await;
                return Ok(false);
            }
            Err(e) => {
                let _ = up.abort().await;
                return Err(e);
            }
        }
        if direct {
            self.sync_local(name).await?;
            return Ok(true);
        }
        let copied = match self.store.copy_if_not_exists(&tp, &Path::from(name)).await {
            Ok(()) => true,
            Err(object_store::Error::AlreadyExists { .. }) => false,
            Err(e) => {
                let _ = self.store.delete(&tp).await;
                return Err(StoreError::backend(name, e));
            }
        };
        let _ = self.store.delete(&tp).await;
        if copied {
            self.sync_local(name).await?;
        }
        Ok(copied)
    }

    /// Makes every write so far durable before the next one. Cloud stores acknowledge a
    /// `PUT` only once it is durable; a local directory needs its file system synced
    /// (object_store's local backend does not fsync).
    pub async fn barrier(&self) -> Result<()> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || {
            let dir = std::fs::File::open(&root)?;
            rustix::fs::syncfs(&dir)?;
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(|e| StoreError::Pipeline(e.to_string()))?
        .map_err(|e| StoreError::Backend {
            object: self.url.clone(),
            source: object_store::Error::Generic {
                store: "local",
                source: Box::new(e),
            },
        })
    }

    /// Deletes one object (a missing object is fine).
    pub async fn delete(&self, name: &str) -> Result<()> {
        match self.store.delete(&Path::from(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StoreError::backend(name, e)),
        }
    }
}

use futures::StreamExt as _;

/// Reads `n` bytes of `file` at `off` on the blocking pool.
async fn read_part(
    file: &Arc<std::fs::File>,
    path: &std::path::Path,
    off: u64,
    n: usize,
) -> Result<Vec<u8>> {
    let f = file.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; n];
        f.read_exact_at(&mut buf, off).map(|()| buf)
    })
    .await
    .map_err(|e| StoreError::Pipeline(e.to_string()))?
    .map_err(|source| StoreError::InputIo {
        path: path.to_path_buf(),
        source,
    })
}

fn split_bucket(rest: &str) -> (&str, &str) {
    match rest.split_once('/') {
        Some((b, p)) => (b, p.trim_matches('/')),
        None => (rest, ""),
    }
}

fn with_prefix(s: Arc<dyn ObjectStore>, prefix: &str) -> Arc<dyn ObjectStore> {
    if prefix.is_empty() {
        s
    } else {
        Arc::new(object_store::prefix::PrefixStore::new(s, prefix))
    }
}
