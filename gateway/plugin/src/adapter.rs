//! Calling a source adapter: `info`, `probe`, and an opened disk's `extents`, `read`, `changes`.
//!
//! Each opened disk is one job with its own `Store`; `info` and `probe` each get a throwaway
//! store. Every call is armed with the plugin's limits, bounded again by a tokio timeout (a
//! guest blocked in a host import does not tick), and its output is checked before it is
//! believed: extents must tile the asked range inside the virtual size, a read must return
//! exactly what was asked. Any failure other than an error the guest returned on purpose
//! poisons the disk: a plugin that trapped or lied is never called again.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use wasmtime::Store;
use wasmtime::component::ResourceAny;

use crate::bindings::adapter::SourceAdapter as Bindings;
use crate::bindings::adapter::exports::ferry::plugin::adapter as wit;
use crate::bindings::adapter::ferry::plugin::types as wtypes;
use crate::error::{GuestError, PluginError};
use crate::host::{LoadedPlugin, PluginHost, Pre, arm, classify};
use crate::manifest::World;
use crate::source::SourceObject;
use crate::state::State;

/// Largest `disk.read` the host asks for (the WIT documents 4 MiB).
pub const MAX_DISK_READ: u32 = 4 << 20;
/// Most extents one `extents` call may return.
pub const MAX_EXTENTS: usize = 65_536;
/// Most extents a `changes` call may return.
pub const MAX_CHANGE_EXTENTS: usize = 1 << 20;
/// Extents asked of a change set per `next` call.
const BATCH: u32 = 65_536;
/// The probe header size.
pub const PROBE_BYTES: usize = 64 << 10;
/// Extra time past the plugin deadline before the host-side timeout fires (a guest waiting in
/// a host import is not interrupted by epochs).
const GRACE: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExtentKind {
    Data,
    Zero,
    Unallocated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub kind: ExtentKind,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Where the bytes of a virtual range are stored (the adapter's `locate` answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Location {
    /// In the opened object at this offset, stored as is.
    Source(u64),
    Zero,
    /// Only the adapter's `read` produces them.
    Adapter,
    /// In a related object the plugin holds open (its reader id), at this offset, as is.
    Related {
        reader: u32,
        offset: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Mapping {
    pub offset: u64,
    pub length: u64,
    pub location: Location,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub formats: Vec<String>,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskInfo {
    pub format: String,
    pub virtual_size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub disk_id: Option<String>,
    pub parent: Option<String>,
}

fn extent_from(e: wtypes::Extent) -> Extent {
    Extent {
        offset: e.offset,
        length: e.length,
        kind: match e.kind {
            wtypes::ExtentKind::Data => ExtentKind::Data,
            wtypes::ExtentKind::Zero => ExtentKind::Zero,
            wtypes::ExtentKind::Unallocated => ExtentKind::Unallocated,
        },
    }
}

fn guest_error(e: wit::Error) -> GuestError {
    match e {
        wit::Error::Invalid(m) => GuestError::Invalid(m),
        wit::Error::Unsupported(m) => GuestError::Unsupported(m),
        wit::Error::OutOfRange(m) => GuestError::OutOfRange(m),
        wit::Error::Io(io) => GuestError::Io(format!("{:?}: {}", io.kind, io.message)),
    }
}

/// One instance of a plugin in its own store, with the call discipline every call follows.
struct Job {
    store: Store<State>,
    poisoned: bool,
    fuel: bool,
    stack: usize,
    deadline: Duration,
}

impl Job {
    fn new(host: &PluginHost, plugin: &LoadedPlugin, kv: Option<crate::state::PlanKv>) -> Job {
        Job {
            store: host.new_store(plugin, kv),
            poisoned: false,
            fuel: host.config.fuel,
            stack: host.config.max_wasm_stack,
            deadline: plugin.inner.limits.deadline(),
        }
    }

    fn plugin(&self) -> String {
        self.store.data().plugin.to_string()
    }
}

/// Run one guarded call: refuse a poisoned job, arm limits, bound it in time, classify
/// failures, poison on anything but success.
macro_rules! guarded {
    ($job:expr, $call:literal, |$store:ident| $body:expr) => {{
        let job: &mut Job = $job;
        if job.poisoned {
            return Err(PluginError::Poisoned {
                plugin: job.plugin(),
            });
        }
        arm(&mut job.store, job.fuel);
        let limit = job.deadline + GRACE;
        let result = {
            let $store = &mut job.store;
            tokio::time::timeout(limit, $body).await
        };
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                job.poisoned = true;
                Err(classify(&job.store, $call, job.stack, e))
            }
            Err(_) => {
                job.poisoned = true;
                Err(PluginError::Deadline {
                    plugin: job.plugin(),
                    call: $call,
                    limit_ms: job.store.data().limits.deadline_ms,
                })
            }
        }
    }};
}

fn adapter_pre(
    plugin: &LoadedPlugin,
) -> Result<&crate::bindings::adapter::SourceAdapterPre<State>, PluginError> {
    match &plugin.inner.pre {
        Pre::Adapter(p) => Ok(p),
        Pre::Hook(_) => Err(PluginError::WrongWorld {
            plugin: plugin.name().into(),
            expected: World::SourceAdapter.as_str(),
            found: World::FailoverHook.to_string(),
            exports: plugin.summary().exports.join(", "),
        }),
    }
}

async fn instantiate(job: &mut Job, plugin: &LoadedPlugin) -> Result<Bindings, PluginError> {
    let pre = adapter_pre(plugin)?.clone();
    guarded!(job, "instantiate", |store| pre.instantiate_async(store))
}

impl PluginHost {
    /// The adapter's self-description.
    pub async fn adapter_info(&self, plugin: &LoadedPlugin) -> Result<PluginInfo, PluginError> {
        let mut job = Job::new(self, plugin, None);
        let b = instantiate(&mut job, plugin).await?;
        let info = guarded!(&mut job, "info", |store| b
            .ferry_plugin_adapter()
            .call_info(store))?;
        Ok(PluginInfo {
            name: info.name,
            version: info.version,
            formats: info.formats,
            description: info.description,
        })
    }

    /// Could the adapter read an object starting with `header`? (At most 64 KiB is passed.)
    pub async fn probe(&self, plugin: &LoadedPlugin, header: &[u8]) -> Result<bool, PluginError> {
        let header = &header[..header.len().min(PROBE_BYTES)];
        let mut job = Job::new(self, plugin, None);
        let b = instantiate(&mut job, plugin).await?;
        guarded!(&mut job, "probe", |store| b
            .ferry_plugin_adapter()
            .call_probe(store, header))
    }

    /// Open `object` with the adapter: a fresh instance that lives as long as the disk.
    pub async fn open_disk(
        &self,
        plugin: &LoadedPlugin,
        object: Arc<dyn SourceObject>,
    ) -> Result<OpenDisk, PluginError> {
        let mut job = Job::new(self, plugin, None);
        let bindings = instantiate(&mut job, plugin).await?;
        let reader = job
            .store
            .data_mut()
            .push_root(object.clone())
            .map_err(|e| PluginError::Host(format!("registering the reader: {e}")))?;
        let opened = guarded!(&mut job, "open", |store| bindings
            .ferry_plugin_adapter()
            .disk()
            .call_open(store, reader))?;
        let handle = opened.map_err(|e| PluginError::Guest {
            plugin: plugin.name().into(),
            call: "open",
            error: guest_error(e),
        })?;
        let info = guarded!(&mut job, "info", |store| bindings
            .ferry_plugin_adapter()
            .disk()
            .call_info(store, handle))?;
        let sector_ok = |s: u32| s.is_power_of_two() && (512..=65536).contains(&s);
        if !sector_ok(info.logical_sector_size) || !sector_ok(info.physical_sector_size) {
            return Err(PluginError::BadOutput {
                plugin: plugin.name().into(),
                call: "info",
                message: format!(
                    "sector sizes {}/{} must be powers of two from 512 to 65536",
                    info.logical_sector_size, info.physical_sector_size
                ),
            });
        }
        Ok(OpenDisk {
            job,
            bindings,
            handle,
            object,
            info: DiskInfo {
                format: info.format,
                virtual_size: info.virtual_size,
                logical_sector_size: info.logical_sector_size,
                physical_sector_size: info.physical_sector_size,
                disk_id: info.disk_id,
                parent: info.parent,
            },
        })
    }
}

/// A disk opened by a source adapter.
pub struct OpenDisk {
    job: Job,
    bindings: Bindings,
    handle: ResourceAny,
    object: Arc<dyn SourceObject>,
    info: DiskInfo,
}

impl std::fmt::Debug for OpenDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenDisk")
            .field("plugin", &self.job.plugin())
            .field("info", &self.info)
            .field("poisoned", &self.job.poisoned)
            .finish()
    }
}

impl OpenDisk {
    pub fn info(&self) -> &DiskInfo {
        &self.info
    }

    pub fn plugin(&self) -> String {
        self.job.plugin()
    }

    /// Log lines of this disk's instance dropped by the rate limit so far.
    pub fn dropped_log_lines(&self) -> u64 {
        self.job.store.data().dropped_log_lines()
    }

    fn guest_err(&self, call: &'static str, e: wit::Error) -> PluginError {
        PluginError::Guest {
            plugin: self.job.plugin(),
            call,
            error: guest_error(e),
        }
    }

    fn bad(&mut self, call: &'static str, message: String) -> PluginError {
        self.job.poisoned = true;
        PluginError::BadOutput {
            plugin: self.job.plugin(),
            call,
            message,
        }
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), PluginError> {
        let size = self.info.virtual_size;
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(PluginError::Host(format!(
                "range {offset}+{length} is outside the virtual disk of {size} bytes"
            )));
        }
        Ok(())
    }

    /// Calls `each` with every `data` extent of the disk, in order, asking the adapter batch
    /// by batch (each batch its own call and deadline). `zero` and `unallocated` extents are
    /// left out: they read as zeros.
    pub async fn each_data_extent(
        &mut self,
        mut each: impl FnMut(Range<u64>),
    ) -> Result<(), PluginError> {
        let size = self.info.virtual_size;
        let mut pos = 0;
        while pos < size {
            let batch = self.extents(pos, size - pos).await?;
            pos = batch.last().map_or(size, |e| e.end());
            for e in batch.into_iter().filter(|e| e.kind == ExtentKind::Data) {
                each(e.offset..e.end());
            }
        }
        Ok(())
    }

    /// Every `data` extent of the disk ([`Self::each_data_extent`]), adjacent ones merged.
    pub async fn data_ranges(&mut self) -> Result<Vec<Range<u64>>, PluginError> {
        let mut data: Vec<Range<u64>> = Vec::new();
        self.each_data_extent(|r| match data.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => data.push(r),
        })
        .await?;
        Ok(data)
    }

    /// The layout of `[offset, offset + length)`; may end early (ask again from its end).
    pub async fn extents(&mut self, offset: u64, length: u64) -> Result<Vec<Extent>, PluginError> {
        self.check_range(offset, length)?;
        let (b, h) = (&self.bindings, self.handle);
        let r = guarded!(&mut self.job, "extents", |store| b
            .ferry_plugin_adapter()
            .disk()
            .call_extents(store, h, offset, length))?;
        let list = r.map_err(|e| self.guest_err("extents", e))?;
        if list.len() > MAX_EXTENTS {
            return Err(self.bad(
                "extents",
                format!(
                    "{} extents, more than the {MAX_EXTENTS} allowed",
                    list.len()
                ),
            ));
        }
        if list.is_empty() && length > 0 {
            return Err(self.bad("extents", "no extents for a non-empty range".into()));
        }
        let mut pos = offset;
        let end = offset + length;
        let mut out = Vec::with_capacity(list.len());
        for e in list {
            let e = extent_from(e);
            if e.offset != pos
                || e.length == 0
                || e.offset.checked_add(e.length).is_none_or(|x| x > end)
            {
                return Err(self.bad(
                    "extents",
                    format!(
                        "extent {}+{} does not continue at {pos} within {offset}+{length}",
                        e.offset, e.length
                    ),
                ));
            }
            pos = e.end();
            out.push(e);
        }
        Ok(out)
    }

    /// Where the bytes of `[offset, offset + length)` are stored; may end early (ask again
    /// from its end). Checked: the mappings tile the range from `offset`, and `source`
    /// locations lie inside the opened object.
    pub async fn locate(&mut self, offset: u64, length: u64) -> Result<Vec<Mapping>, PluginError> {
        self.check_range(offset, length)?;
        let (b, h) = (&self.bindings, self.handle);
        let r = guarded!(&mut self.job, "locate", |store| b
            .ferry_plugin_adapter()
            .disk()
            .call_locate(store, h, offset, length))?;
        let list = r.map_err(|e| self.guest_err("locate", e))?;
        if list.len() > MAX_EXTENTS || (list.is_empty() && length > 0) {
            return Err(self.bad(
                "locate",
                format!(
                    "{} mappings for a non-empty range (1..={MAX_EXTENTS} allowed)",
                    list.len()
                ),
            ));
        }
        let object_size = self.object.size();
        let end = offset + length;
        let mut pos = offset;
        let mut out = Vec::with_capacity(list.len());
        for m in list {
            let location = match m.location {
                wit::Location::Source(o) => Location::Source(o),
                wit::Location::Zero => Location::Zero,
                wit::Location::Adapter => Location::Adapter,
                wit::Location::Related(r) => Location::Related {
                    reader: r.reader,
                    offset: r.offset,
                },
            };
            let tiles = m.offset == pos
                && m.length > 0
                && m.offset.checked_add(m.length).is_some_and(|x| x <= end);
            let inside = match location {
                Location::Source(o) => o.checked_add(m.length).is_some_and(|x| x <= object_size),
                Location::Related { reader, offset } => self
                    .job
                    .store
                    .data()
                    .reader_object(reader)
                    .is_some_and(|r| offset.checked_add(m.length).is_some_and(|x| x <= r.size())),
                Location::Zero | Location::Adapter => true,
            };
            if !tiles || !inside {
                return Err(self.bad(
                    "locate",
                    format!(
                        "mapping {}+{} -> {location:?} does not continue at {pos} within {offset}+{length}, or is not inside the {object_size}-byte object or an open related reader",
                        m.offset, m.length
                    ),
                ));
            }
            pos += m.length;
            out.push(Mapping {
                offset: m.offset,
                length: m.length,
                location,
            });
        }
        Ok(out)
    }

    /// Fill `buf` with the virtual disk's bytes at `offset`: the data path. The adapter says
    /// where the bytes are (`locate`); the host reads `source` ranges itself, fills zeros, and
    /// asks the adapter's `read` only for what only it can produce.
    pub async fn read_into(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), PluginError> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            for m in self.locate(pos, end - pos).await? {
                let lo = usize::try_from(m.offset - offset).unwrap_or(usize::MAX);
                let hi = usize::try_from(m.offset + m.length - offset).unwrap_or(usize::MAX);
                let dst = &mut buf[lo..hi];
                match m.location {
                    Location::Zero => dst.fill(0),
                    Location::Source(at) => read_exact(&*self.object, dst, at)?,
                    Location::Related { reader, offset } => {
                        // Checked by `locate`; the plugin cannot drop it in between.
                        let object =
                            self.job.store.data().reader_object(reader).ok_or_else(|| {
                                PluginError::Host(format!("related reader {reader} is gone"))
                            })?;
                        read_exact(&*object, dst, offset)?;
                    }
                    Location::Adapter => {
                        let mut done = 0;
                        while done < dst.len() {
                            let n = (dst.len() - done).min(MAX_DISK_READ as usize);
                            let len = u32::try_from(n).unwrap_or(MAX_DISK_READ);
                            let bytes = self.read(m.offset + done as u64, len).await?;
                            dst[done..done + n].copy_from_slice(&bytes);
                            done += n;
                        }
                    }
                }
                pos = m.offset + m.length;
            }
        }
        Ok(())
    }

    /// Copy the virtual disk's `[offset, offset + length)` into `out` at the same offsets
    /// without the bytes passing through this process, when the adapter locates all of them
    /// in files (`source` or `related`, copied by the kernel with `copy_file_range`) or as
    /// zeros (skipped: `out` must be a fresh sparse file of the disk's size). Returns
    /// `Ok(false)` when that is not possible — part of the range is produced by the adapter,
    /// an object is not a file, or the kernel cannot copy between these files — and the caller
    /// reads the range instead ([`OpenDisk::read_into`]); bytes already copied are then simply
    /// written again, identical.
    pub async fn copy_into(
        &mut self,
        offset: u64,
        length: u64,
        out: &std::fs::File,
    ) -> Result<bool, PluginError> {
        self.check_range(offset, length)?;
        let end = offset + length;
        let mut plan = Vec::new();
        let mut pos = offset;
        while pos < end {
            for m in self.locate(pos, end - pos).await? {
                let object = match m.location {
                    Location::Zero => None,
                    Location::Adapter => return Ok(false),
                    Location::Source(at) => Some((self.object.clone(), at)),
                    Location::Related { reader, offset } => {
                        let object =
                            self.job.store.data().reader_object(reader).ok_or_else(|| {
                                PluginError::Host(format!("related reader {reader} is gone"))
                            })?;
                        Some((object, offset))
                    }
                };
                pos = m.offset + m.length;
                if let Some((object, at)) = object {
                    if object.file().is_none() {
                        return Ok(false);
                    }
                    plan.push((object, at, m.offset, m.length));
                }
            }
        }
        for (object, mut from, mut to, length) in plan {
            let Some(file) = object.file() else {
                return Ok(false);
            };
            let mut left = length;
            while left > 0 {
                let n = usize::try_from(left.min(1 << 30)).unwrap_or(1 << 30);
                match rustix::fs::copy_file_range(file, Some(&mut from), out, Some(&mut to), n) {
                    Ok(0) => {
                        return Err(PluginError::Host(format!(
                            "{} ended at {from} while copying {left} more bytes",
                            object.name()
                        )));
                    }
                    Ok(done) => left -= done as u64,
                    Err(rustix::io::Errno::INTR) => {}
                    // No kernel copy between these files (another file system, a kernel or
                    // file system without support): read instead.
                    Err(
                        rustix::io::Errno::XDEV
                        | rustix::io::Errno::INVAL
                        | rustix::io::Errno::NOSYS
                        | rustix::io::Errno::OPNOTSUPP
                        | rustix::io::Errno::PERM
                        | rustix::io::Errno::BADF,
                    ) => return Ok(false),
                    Err(e) => {
                        return Err(PluginError::Host(format!(
                            "copying {} at {from} into the output: {e}",
                            object.name()
                        )));
                    }
                }
            }
        }
        Ok(true)
    }

    /// Read exactly `len` bytes at `offset` (within the virtual size; `len` ≤ 4 MiB).
    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, PluginError> {
        if len > MAX_DISK_READ {
            return Err(PluginError::Host(format!(
                "read of {len} bytes is over the {MAX_DISK_READ}-byte cap"
            )));
        }
        self.check_range(offset, u64::from(len))?;
        let (b, h) = (&self.bindings, self.handle);
        let r = guarded!(&mut self.job, "read", |store| b
            .ferry_plugin_adapter()
            .disk()
            .call_read(store, h, offset, len))?;
        let data = r.map_err(|e| self.guest_err("read", e))?;
        if data.len() != len as usize {
            return Err(self.bad(
                "read",
                format!(
                    "returned {} bytes for a {len}-byte read at {offset}",
                    data.len()
                ),
            ));
        }
        Ok(data)
    }

    /// Translate a change-tracking document into changed extents (ordered, within the
    /// disk), draining the plugin's change set batch by batch, each batch under its own
    /// deadline. At most [`MAX_CHANGE_EXTENTS`] extents in all.
    pub async fn changes(&mut self, document: &[u8]) -> Result<Vec<Extent>, PluginError> {
        let (b, h) = (&self.bindings, self.handle);
        let r = guarded!(&mut self.job, "changes", |store| b
            .ferry_plugin_adapter()
            .disk()
            .call_changes(store, h, document))?;
        let set = r.map_err(|e| self.guest_err("changes", e))?;
        let result = self.drain_changes(set).await;
        if !self.job.poisoned {
            let _ = set.resource_drop_async(&mut self.job.store).await;
        }
        result
    }

    async fn drain_changes(&mut self, set: ResourceAny) -> Result<Vec<Extent>, PluginError> {
        let size = self.info.virtual_size;
        let mut last_end = 0;
        let mut out: Vec<Extent> = Vec::new();
        loop {
            let b = &self.bindings;
            let r = guarded!(&mut self.job, "change-set.next", |store| b
                .ferry_plugin_adapter()
                .change_set()
                .call_next(store, set, BATCH))?;
            let Some(batch) = r.map_err(|e| self.guest_err("change-set.next", e))? else {
                return Ok(out);
            };
            if batch.len() > MAX_EXTENTS || out.len() + batch.len() > MAX_CHANGE_EXTENTS {
                return Err(self.bad(
                    "change-set.next",
                    format!(
                        "more than {MAX_EXTENTS} extents in a batch or {MAX_CHANGE_EXTENTS} in all"
                    ),
                ));
            }
            for e in batch {
                let e = extent_from(e);
                if e.offset < last_end || e.offset.checked_add(e.length).is_none_or(|x| x > size) {
                    return Err(self.bad(
                        "change-set.next",
                        format!(
                            "extent {}+{} is out of order or outside the {size}-byte disk",
                            e.offset, e.length
                        ),
                    ));
                }
                last_end = e.end();
                match out.last_mut() {
                    Some(prev) if prev.end() == e.offset && prev.kind == e.kind => {
                        prev.length += e.length;
                    }
                    _ => out.push(e),
                }
            }
        }
    }
}

/// Fill `dst` from `object` at `at`; a short read is an error naming the object.
fn read_exact(object: &dyn SourceObject, dst: &mut [u8], at: u64) -> Result<(), PluginError> {
    let got = object
        .read_at(dst, at)
        .map_err(|e| PluginError::Host(format!("reading {} at {at}: {e}", object.name())))?;
    if got != dst.len() {
        return Err(PluginError::Host(format!(
            "{} ended at {} while reading {} bytes at {at}",
            object.name(),
            at + got as u64,
            dst.len()
        )));
    }
    Ok(())
}
