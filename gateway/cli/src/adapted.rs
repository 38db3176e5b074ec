//! `ferry vault import --format …` and `--source ebs`: a disk read through a source adapter, handed to the store's
//! ingest as a [`DiskSource`].
//!
//! The store reads from one thread with blocking calls; a plugin instance lives in an async
//! `Store` that only one task may drive, so the opened disk is served by a
//! [`BlockingDisk`] (a thread of its own, a bounded request channel). The extents are
//! asked for up front: only `data` extents are read, `zero` and `unallocated` ones become zero
//! chunks without a read.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use ferry_plugin_host::{
    BlockingDisk, FileSource, HostConfig, HttpGrant, PluginHost, SourceObject,
};
use ferry_store::StoreError;
use ferry_store::source::DiskSource;

/// A virtual disk served by a source adapter.
#[derive(Debug)]
pub struct AdaptedDisk {
    data: Vec<Range<u64>>,
    disk: BlockingDisk,
}

/// What opening a disk through an adapter gave: the source for ingest, and the changed
/// ranges when a change document was given.
#[derive(Debug)]
pub struct Opened {
    pub disk: Arc<AdaptedDisk>,
    pub changes: Option<Vec<Range<u64>>>,
    pub adapter: String,
}

/// Where the disk comes from.
#[derive(Debug)]
pub enum Input<'a> {
    /// A disk file in `format` (`auto` probes).
    File { format: &'a str, path: &'a Path },
    /// An EBS snapshot, read by the `aws` adapter through the EBS direct APIs.
    Ebs(crate::ebs::EbsSource),
}

/// Open the disk `input` names through its built-in adapter, translate the change document
/// (a CBT, RCT or checksum-list file for disks; `{"FirstSnapshotId"}` for EBS) through it,
/// and start serving reads.
pub async fn open(input: Input<'_>, changes: Option<Vec<u8>>) -> Result<Opened> {
    let host = PluginHost::new(HostConfig {
        cache_dir: crate::plugin::default_cache(),
        ..HostConfig::default()
    })?;
    let (b, plugin, object, label): (_, _, Arc<dyn SourceObject>, String) = match input {
        Input::File { format, path } => {
            let b = match ferry_builtin_plugins::for_format(format)
                .map_err(|e| anyhow::anyhow!("--{e}"))?
            {
                Some(b) => b,
                None => probe(&host, path).await?,
            };
            let plugin = host.load(b.manifest(), b.wasm)?;
            let object = FileSource::open(path)
                .with_context(|| format!("cannot open --disk `{}`", path.display()))?;
            (b, plugin, Arc::new(object), path.display().to_string())
        }
        Input::Ebs(ebs) => {
            let b =
                ferry_builtin_plugins::get("aws").context("built-in adapter `aws` is missing")?;
            let mut manifest = b.manifest();
            manifest.grants.http = Some(HttpGrant {
                allow: vec![ebs.allow_host()?],
            });
            manifest
                .config
                .insert("endpoint".into(), ebs.endpoint.clone());
            let plugin = host
                .load(manifest, b.wasm)?
                .with_http_signer(ebs.signer.clone());
            let label = format!("ebs:{}", ebs.snapshot);
            (b, plugin, Arc::new(ebs.reference()), label)
        }
    };
    let mut disk = host.open_disk(&plugin, object).await?;
    let data = disk.data_ranges().await?;
    let changes = match changes {
        Some(doc) => {
            let extents = disk.changes(&doc).await?;
            Some(extents.iter().map(|e| e.offset..e.end()).collect())
        }
        None => None,
    };
    let disk = BlockingDisk::serve(disk, format!("{}:{label}", b.name), 4)?;
    Ok(Opened {
        disk: Arc::new(AdaptedDisk { data, disk }),
        changes,
        adapter: b.name.to_string(),
    })
}

/// `auto`: the first built-in source adapter whose `probe` accepts the disk's first 64 KiB
/// (physical, which accepts anything, is tried last).
pub async fn probe(host: &PluginHost, path: &Path) -> Result<ferry_builtin_plugins::Builtin> {
    let header = ferry_builtin_plugins::probe_header(path)
        .with_context(|| format!("cannot read --disk `{}`", path.display()))?;
    ferry_builtin_plugins::probe(host, &header)
        .await?
        .with_context(|| format!("no built-in adapter recognises `{}`", path.display()))
}

impl DiskSource for AdaptedDisk {
    fn name(&self) -> String {
        self.disk.name().to_string()
    }

    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn data_extents(&self) -> ferry_store::Result<Vec<Range<u64>>> {
        Ok(self.data.clone())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> ferry_store::Result<()> {
        self.disk
            .read_exact_at(buf, offset)
            .map_err(|e| StoreError::SourceRead {
                disk: self.name(),
                message: e.to_string(),
            })
    }
}
