//! `ferry vault import --format …` and `--source ebs`: a disk read through a source adapter, handed to the store's
//! ingest as a [`DiskSource`].
//!
//! The store reads from one thread with blocking calls; a plugin instance lives in an async
//! `Store` that only one task may drive. So one task owns the opened disk and serves read
//! requests from a bounded channel, and the ingest thread waits on each reply. The extents are
//! asked for up front: only `data` extents are read, `zero` and `unallocated` ones become zero
//! chunks without a read.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ferry_plugin_host::{
    ExtentKind, FileSource, HostConfig, HttpGrant, OpenDisk, PluginHost, SourceObject, World,
};
use ferry_store::StoreError;
use ferry_store::source::DiskSource;
use tokio::sync::{mpsc, oneshot};

/// `--format` values and the built-in adapter each one means.
pub const FORMATS: &[(&str, Option<&str>)] = &[
    ("auto", None),
    ("raw", Some("physical")),
    ("vmdk", Some("vmware")),
    ("vhdx", Some("hyperv")),
    ("vhd", Some("hyperv")),
];

type Reply = oneshot::Sender<Result<Vec<u8>, String>>;

/// A virtual disk served by a source adapter.
#[derive(Debug)]
pub struct AdaptedDisk {
    name: String,
    size: u64,
    data: Vec<Range<u64>>,
    requests: mpsc::Sender<(u64, usize, Reply)>,
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
            let Some((_, builtin)) = FORMATS.iter().find(|(f, _)| *f == format) else {
                let names: Vec<_> = FORMATS.iter().map(|(f, _)| *f).collect();
                bail!("--format `{format}` is not one of {}", names.join(", "));
            };
            let b = match builtin {
                Some(name) => ferry_builtin_plugins::get(name)
                    .with_context(|| format!("built-in adapter `{name}` is missing"))?,
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
    let size = disk.info().virtual_size;
    let mut data: Vec<Range<u64>> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let batch = disk.extents(pos, size - pos).await?;
        pos = batch.last().map_or(size, |e| e.end());
        for e in batch.into_iter().filter(|e| e.kind == ExtentKind::Data) {
            match data.last_mut() {
                Some(r) if r.end == e.offset => r.end = e.end(),
                _ => data.push(e.offset..e.end()),
            }
        }
    }
    let changes = match changes {
        Some(doc) => {
            let extents = disk.changes(&doc).await?;
            Some(extents.iter().map(|e| e.offset..e.end()).collect())
        }
        None => None,
    };
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(serve(disk, rx, size));
    Ok(Opened {
        disk: Arc::new(AdaptedDisk {
            name: format!("{}:{label}", b.name),
            size,
            data,
            requests: tx,
        }),
        changes,
        adapter: b.name.to_string(),
    })
}

/// `auto`: the first built-in source adapter whose `probe` accepts the disk's first 64 KiB
/// (physical, which accepts anything, is tried last).
pub async fn probe(host: &PluginHost, path: &Path) -> Result<ferry_builtin_plugins::Builtin> {
    use std::io::Read;
    let mut header = Vec::new();
    std::fs::File::open(path)
        .with_context(|| format!("cannot open --disk `{}`", path.display()))?
        .take(ferry_plugin_host::PROBE_BYTES as u64)
        .read_to_end(&mut header)
        .with_context(|| format!("cannot read --disk `{}`", path.display()))?;
    for b in ferry_builtin_plugins::ALL {
        if b.world == World::SourceAdapter {
            let p = host.load(b.manifest(), b.wasm)?;
            if host.probe(&p, &header).await? {
                return Ok(*b);
            }
        }
    }
    bail!("no built-in adapter recognises `{}`", path.display())
}

async fn serve(mut disk: OpenDisk, mut rx: mpsc::Receiver<(u64, usize, Reply)>, size: u64) {
    while let Some((offset, len, reply)) = rx.recv().await {
        let mut buf = vec![0u8; len];
        let within = usize::try_from(size.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(len);
        let r = if within == 0 {
            Ok(buf)
        } else {
            match disk.read_into(offset, &mut buf[..within]).await {
                Ok(()) => Ok(buf),
                Err(e) => Err(e.to_string()),
            }
        };
        let _ = reply.send(r);
    }
}

impl DiskSource for AdaptedDisk {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn data_extents(&self) -> ferry_store::Result<Vec<Range<u64>>> {
        Ok(self.data.clone())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> ferry_store::Result<()> {
        let err = |message: String| StoreError::SourceRead {
            disk: self.name.clone(),
            message,
        };
        let (tx, rx) = oneshot::channel();
        self.requests
            .blocking_send((offset, buf.len(), tx))
            .map_err(|_| err("the adapter task has stopped".into()))?;
        let bytes = rx
            .blocking_recv()
            .map_err(|_| err("the adapter task has stopped".into()))?
            .map_err(err)?;
        buf.copy_from_slice(&bytes);
        Ok(())
    }
}
