//! Exporting a recovery point's disk to an object-store location (`ferry vault export --out
//! s3://…|az://…|file://…`).
//!
//! Why it exists: a restored disk is often wanted in the cloud, not on the gateway (a VHD for
//! Azure, a raw or VMDK image to import into EC2 or vSphere from a bucket). Writing the file
//! locally and uploading it by hand doubles the operator's work and loses the guarantees of
//! the vault: an upload left half done looks like a disk. [`Vault::export_to_location`] does
//! both steps with the same guarantees as a local export.
//!
//! Why a staging file: every format is written with positioned writes as chunks complete out
//! of order, and most write their metadata last at the start of the file (qcow2 and VMDK
//! headers, VHDX region tables), while an object is written once, front to back. So the disk
//! is first exported with [`Vault::export_as`] into a uniquely named file under the staging
//! directory (by default the vault's cache directory), then streamed to the location with
//! [`Backend::put_create_file`]: a bounded number of bounded parts (memory `part_size ×
//! concurrency`; past 10,000 parts of `part_size`, i.e. above 160 GiB at the default 16 MiB,
//! the part grows to `size / 10,000` and fewer parts are in flight, at least one: a 1 TiB
//! object holds one part of about 105 MiB at a time), create-only (see
//! [`Backend::put_create_file`] for the one case where that is a check, not atomic). The staging
//! directory needs room for the export; it is removed whatever happens (a drop guard, also
//! when the future is cancelled).
//!
//! Object stores have no holes: a sparse raw export's holes are read back as zeros and
//! uploaded as zeros, so a raw object is the disk's full size. The container formats (qcow2,
//! VMDK, VHDX) hold only their data and are much smaller to upload; VHD fixed is the full
//! size plus a footer.
//!
//! Guarantees: the destination object is checked first and an existing one refused
//! ([`StoreError::ObjectExists`]) before anything is exported; the upload itself is
//! create-only (see [`Backend::put_create_file`]), so a name taken meanwhile is still never
//! overwritten; a failure while exporting (a damaged chunk in the vault) or uploading leaves
//! no object under the name and no staging file. URLs are reported without credentials
//! (user info and query stripped; credentials belong in the environment).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::backend::{Backend, BackendOptions, FileUploadTuning};
use crate::error::{Result, StoreError};
use crate::formats::{ExportFormat, FormatOptions};
use crate::ingest::Progress;
use crate::point::{DiskRecord, PointRecord};
use crate::restore::ExportOptions;
use crate::vault::{PointSelector, Vault};

/// What to export, and where to stage it.
#[derive(Debug, Clone)]
pub struct LocationExportOptions {
    /// Item.
    pub item: String,
    /// Which point.
    pub point: PointSelector,
    /// Which disk (may be omitted when the point has one).
    pub disk: Option<String>,
    /// The format, as for [`Vault::export_as`].
    pub format: FormatOptions,
    /// Object name inside the location (after the location URL's prefix), e.g. `web/disk.vhd`.
    pub object: String,
    /// Directory for the staging file (created if missing); it needs room for the export.
    pub staging_dir: PathBuf,
    /// Part size and concurrency of the upload.
    pub upload: FileUploadTuning,
}

/// What an export to a location did.
#[derive(Debug, Clone)]
pub struct LocationExportReport {
    /// The object's name inside the location.
    pub object: String,
    /// The object as a URL (location URL without credentials, then the name).
    pub url: String,
    /// Bytes uploaded: the object's size.
    pub bytes_uploaded: u64,
    /// The point exported.
    pub point: PointRecord,
    /// The disk exported.
    pub disk: DiskRecord,
    /// The format written.
    pub format: ExportFormat,
    /// Non-zero chunks written.
    pub chunks_written: u64,
    /// Ranged reads made from the vault.
    pub reads: u64,
}

impl Vault {
    /// Exports one disk of a point to the object `opts.object` of the location at `url`
    /// (a path, `file://`, `s3://`, `az://`: the syntax and credentials of vault locations,
    /// [`Backend::open`] with `options`; a missing local directory is created). See
    /// [`Vault::export_to_backend`].
    pub async fn export_to_location(
        &self,
        url: &str,
        options: &BackendOptions,
        opts: LocationExportOptions,
        progress: Arc<Progress>,
    ) -> Result<LocationExportReport> {
        // A local directory is made if missing, as a prefix in a bucket needs no creating.
        let dest = Backend::open(url, options, true).map_err(|e| match e {
            StoreError::BackendConfig { reason, .. } => StoreError::BackendConfig {
                url: redact_url(url),
                reason,
            },
            e => e,
        })?;
        self.export_to_backend(&dest, opts, progress).await
    }

    /// Exports one disk of a point to the object `opts.object` of `dest`: refused if the
    /// object exists, then exported into a staging file under `opts.staging_dir`, uploaded
    /// create-only in bounded parts, and the staging file removed (on failure too).
    /// `progress` follows the export, then restarts for the upload (total: the file's size).
    pub async fn export_to_backend(
        &self,
        dest: &Backend,
        opts: LocationExportOptions,
        progress: Arc<Progress>,
    ) -> Result<LocationExportReport> {
        let base = check_object_name(&opts.object)?;
        let url = object_url(dest.url(), &opts.object);
        let upload_err = |cause| StoreError::Upload {
            object: url.clone(),
            cause: Box::new(cause),
        };
        if dest.exists(&opts.object).await.map_err(upload_err)? {
            return Err(StoreError::ObjectExists { object: url });
        }
        let staging = Staging::create(&opts.staging_dir)?;
        let file = staging.dir.join(base);
        let r = self
            .export_as(
                ExportOptions {
                    item: opts.item,
                    point: opts.point,
                    disk: opts.disk,
                    out: file.clone(),
                    overwrite: false,
                    sync: false,
                },
                opts.format,
                progress.clone(),
            )
            .await?;
        let len = std::fs::metadata(&file)
            .map_err(|source| StoreError::InputIo {
                path: file.clone(),
                source,
            })?
            .len();
        progress.done.store(0, Ordering::Relaxed);
        progress.total.store(len, Ordering::Relaxed);
        let created = dest
            .put_create_file(&opts.object, &file, opts.upload, &progress.done)
            .await
            .map_err(upload_err)?;
        drop(staging);
        if !created {
            return Err(StoreError::ObjectExists { object: url });
        }
        Ok(LocationExportReport {
            object: opts.object,
            url,
            bytes_uploaded: len,
            point: r.point,
            disk: r.disk,
            format: r.format,
            chunks_written: r.chunks_written,
            reads: r.reads,
        })
    }
}

/// Splits an export destination URL (`s3://bucket/prefix/disk.vhd`) into the location
/// (`s3://bucket/prefix`) and the object name (`disk.vhd`). A URL without an object name
/// (`s3://bucket`, `…/`) or carrying a query (credentials belong in the environment) is
/// refused.
pub fn split_location(url: &str) -> Result<(String, String)> {
    let bad = |why: &str| StoreError::InvalidArgument(format!("`{}`: {why}", redact_url(url)));
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(bad("not a URL (scheme://location/name)"));
    };
    if rest.contains(['?', '#']) {
        return Err(bad(
            "must not carry a query or fragment (credentials belong in the environment)",
        ));
    }
    let Some((loc, name)) = rest.rsplit_once('/') else {
        return Err(bad("names no object (use scheme://location/NAME)"));
    };
    if name.is_empty() || (scheme != "file" && loc.is_empty()) {
        return Err(bad("names no object (use scheme://location/NAME)"));
    }
    let loc = if loc.is_empty() { "/" } else { loc };
    Ok((format!("{scheme}://{loc}"), name.to_string()))
}

/// `url` without credentials: user info (`user:key@`) and any query or fragment (a SAS
/// token) are replaced by `…`.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let (rest, query) = match rest.find(['?', '#']) {
        Some(i) => (&rest[..i], "?…"),
        None => (rest, ""),
    };
    let rest = match (scheme, rest.split_once('/')) {
        (Some(_), Some((auth, path))) if auth.contains('@') => {
            format!("…@{}/{path}", auth.rsplit_once('@').map_or("", |x| x.1))
        }
        (Some(_), None) if rest.contains('@') => {
            format!("…@{}", rest.rsplit_once('@').map_or("", |x| x.1))
        }
        _ => rest.to_string(),
    };
    match scheme {
        Some(s) => format!("{s}://{rest}{query}"),
        None => format!("{rest}{query}"),
    }
}

/// The object's URL: the location's (without credentials) joined with the name.
fn object_url(location: &str, object: &str) -> String {
    let loc = redact_url(location);
    if loc.ends_with('/') {
        format!("{loc}{object}")
    } else {
        format!("{loc}/{object}")
    }
}

/// Checks an object name; returns its last segment (the staging file's name, which the VMDK
/// descriptor names).
fn check_object_name(name: &str) -> Result<&str> {
    let bad = |why: String| StoreError::InvalidArgument(format!("object name `{name}`: {why}"));
    if name.is_empty() || name.ends_with('/') || name.starts_with('/') {
        return Err(bad(
            "must be a non-empty path that neither starts nor ends with `/`".into(),
        ));
    }
    object_store::path::Path::parse(name).map_err(|e| bad(e.to_string()))?;
    let base = name.rsplit('/').next().unwrap_or(name);
    if base.contains(".ferry-partial") {
        return Err(bad("`.ferry-partial` is reserved for staging names".into()));
    }
    Ok(base)
}

/// A uniquely named directory holding the staging file; removed with everything in it when
/// dropped (success, error or cancellation).
struct Staging {
    dir: PathBuf,
}

impl Staging {
    fn create(parent: &Path) -> Result<Self> {
        let io = |path: &Path, source| StoreError::OutputIo {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        let dir = parent.join(format!(
            ".ferry-export-{}",
            hex::encode(crate::crypto::random_bytes::<8>())
        ));
        std::fs::create_dir(&dir).map_err(|e| io(&dir, e))?;
        Ok(Self { dir })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::formats::testkit::{damage_data_packs, image, vault};
    use crate::{ExportFormat, ImportOptions};

    const SIZE: u64 = 3 << 20;

    fn small_parts() -> FileUploadTuning {
        FileUploadTuning {
            part_size: 256 << 10,
            concurrency: 2,
            ..FileUploadTuning::default()
        }
    }

    fn opts(dir: &Path, object: &str, format: ExportFormat) -> LocationExportOptions {
        LocationExportOptions {
            item: "web".into(),
            point: PointSelector::Latest,
            disk: None,
            format: FormatOptions {
                format,
                vhd_round_up: false,
            },
            object: object.into(),
            staging_dir: dir.join("staging"),
            upload: small_parts(),
        }
    }

    async fn imported(dir: &Path) -> Vault {
        let v = vault(dir, 64 << 10).await;
        let src = image(dir, SIZE);
        v.import(ImportOptions::full("web", &src), Arc::default())
            .await
            .unwrap();
        v
    }

    /// The same point exported to a local file.
    async fn local_export(v: &Vault, dir: &Path, format: ExportFormat) -> Vec<u8> {
        let out = dir.join(format!("local.{format}"));
        v.export_as(
            ExportOptions {
                item: "web".into(),
                point: PointSelector::Latest,
                disk: None,
                out: out.clone(),
                overwrite: true,
                sync: false,
            },
            FormatOptions {
                format,
                vhd_round_up: false,
            },
            Arc::default(),
        )
        .await
        .unwrap();
        std::fs::read(out).unwrap()
    }

    fn staging_empty(dir: &Path) -> bool {
        std::fs::read_dir(dir.join("staging"))
            .map(|d| d.count() == 0)
            .unwrap_or(true)
    }

    #[tokio::test]
    async fn round_trip_to_memory_and_a_directory() {
        let t = tempfile::tempdir().unwrap();
        let v = imported(t.path()).await;
        let mem = Backend::open("memory://", &Vec::new(), false).unwrap();
        let local_dir = t.path().join("bucket");
        std::fs::create_dir(&local_dir).unwrap();
        let file_url = format!("file://{}", local_dir.display());
        let default_limit = FileUploadTuning::default().copy_limit;
        // (format, copy limit, part size): staged and copied in parts; straight to the name
        // above the copy limit; one create-only PUT for one part.
        for (i, (format, copy_limit, part_size)) in [
            (ExportFormat::Raw, default_limit, 256 << 10),
            (ExportFormat::Vhd, default_limit, 256 << 10),
            (ExportFormat::Raw, 1, 256 << 10),
            (ExportFormat::Raw, default_limit, 64 << 20),
        ]
        .into_iter()
        .enumerate()
        {
            let want = local_export(&v, t.path(), format).await;
            // The VHD footer's timestamp and unique id differ from one export to the next.
            let same = |got: &[u8]| {
                let n = if format == ExportFormat::Vhd { 512 } else { 0 };
                got.len() == want.len() && got[..got.len() - n] == want[..want.len() - n]
            };
            let name = format!("exports/{i}/web.{format}");
            let mut o = opts(t.path(), &name, format);
            o.upload.copy_limit = copy_limit;
            o.upload.part_size = part_size;
            let progress = Arc::new(Progress::default());
            let r = v
                .export_to_backend(&mem, o.clone(), progress.clone())
                .await
                .unwrap();
            assert_eq!(r.object, name);
            assert_eq!(r.url, format!("memory://{name}"));
            assert_eq!(r.bytes_uploaded, want.len() as u64, "{format}");
            assert_eq!(progress.done.load(Ordering::Relaxed), want.len() as u64);
            assert_eq!(r.format, format);
            assert_eq!(r.disk.size, SIZE);
            assert!(same(&mem.get(&name).await.unwrap()), "case {i} (memory)");

            let r = v
                .export_to_location(&file_url, &Vec::new(), o, Arc::default())
                .await
                .unwrap();
            assert_eq!(r.url, format!("{file_url}/{name}"));
            assert!(
                same(&std::fs::read(local_dir.join(&name)).unwrap()),
                "case {i} (file://)"
            );
            assert!(staging_empty(t.path()));
        }
        // Only the exports: no staging object is left.
        let names: Vec<String> = mem
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.location.to_string())
            .collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert!(names.iter().all(|n| !n.contains("ferry-partial")));
    }

    #[tokio::test]
    async fn an_existing_object_is_refused_and_unchanged() {
        let t = tempfile::tempdir().unwrap();
        let v = imported(t.path()).await;
        let mem = Backend::open("memory://", &Vec::new(), false).unwrap();
        assert!(
            mem.put_create("web.raw", bytes::Bytes::from_static(b"keep me"))
                .await
                .unwrap()
        );
        let progress = Arc::new(Progress::default());
        let e = v
            .export_to_backend(
                &mem,
                opts(t.path(), "web.raw", ExportFormat::Raw),
                progress.clone(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&e, StoreError::ObjectExists { object } if object == "memory://web.raw"),
            "{e}"
        );
        assert!(e.to_string().contains("already exists"), "{e}");
        // Refused before exporting anything.
        assert_eq!(progress.total.load(Ordering::Relaxed), 0);
        assert_eq!(&mem.get("web.raw").await.unwrap()[..], b"keep me");
        assert!(staging_empty(t.path()));

        // The upload itself refuses a taken name, whichever way it would publish.
        let file = t.path().join("f");
        std::fs::write(&file, vec![1u8; 1 << 20]).unwrap();
        for copy_limit in [u64::MAX - 1, 1] {
            let tuning = FileUploadTuning {
                copy_limit,
                ..small_parts()
            };
            let done = std::sync::atomic::AtomicU64::new(0);
            assert!(
                !mem.put_create_file("web.raw", &file, tuning, &done)
                    .await
                    .unwrap()
            );
            assert_eq!(&mem.get("web.raw").await.unwrap()[..], b"keep me");
        }
    }

    #[tokio::test]
    async fn a_damaged_vault_leaves_no_object_and_no_staging_file() {
        let t = tempfile::tempdir().unwrap();
        let v = imported(t.path()).await;
        damage_data_packs(&v).await;
        let mem = Backend::open("memory://", &Vec::new(), false).unwrap();
        for format in [ExportFormat::Raw, ExportFormat::Qcow2] {
            let e = v
                .export_to_backend(&mem, opts(t.path(), "web.img", format), Arc::default())
                .await
                .unwrap_err();
            assert!(matches!(e, StoreError::Tampered { .. }), "{e}");
            assert!(mem.list("").await.unwrap().is_empty());
            assert!(staging_empty(t.path()));
        }
    }

    #[tokio::test]
    async fn bad_input_leaves_no_object() {
        let t = tempfile::tempdir().unwrap();
        let v = imported(t.path()).await;
        let dest = Backend::open(
            &format!("file://{}", t.path().join("ro").display()),
            &Vec::new(),
            true,
        )
        .unwrap();
        let missing = t.path().join("no-such-file");
        let done = std::sync::atomic::AtomicU64::new(0);
        let e = dest
            .put_create_file("x", &missing, small_parts(), &done)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::InputIo { .. }), "{e}");
        // An invalid object name is refused before anything is exported.
        let e = v
            .export_to_backend(
                &dest,
                opts(t.path(), "a//b", ExportFormat::Raw),
                Arc::default(),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::InvalidArgument(_)), "{e}");
        assert!(dest.list("").await.unwrap().is_empty());
    }

    #[test]
    fn urls() {
        assert_eq!(
            split_location("s3://bucket/pre/fix/disk.vhd").unwrap(),
            ("s3://bucket/pre/fix".into(), "disk.vhd".into())
        );
        assert_eq!(
            split_location("az://c/disk.raw").unwrap(),
            ("az://c".into(), "disk.raw".into())
        );
        assert_eq!(
            split_location("file:///tmp/x/disk.raw").unwrap(),
            ("file:///tmp/x".into(), "disk.raw".into())
        );
        assert_eq!(
            split_location("file:///disk.raw").unwrap(),
            ("file:///".into(), "disk.raw".into())
        );
        for bad in ["s3://bucket", "s3://bucket/", "s3:///x", "disk.raw"] {
            assert!(split_location(bad).is_err(), "{bad}");
        }
        let e = split_location("az://c/d.vhd?sig=SECRET").unwrap_err();
        assert!(!e.to_string().contains("SECRET"), "{e}");
        assert_eq!(redact_url("s3://b/p"), "s3://b/p");
        assert_eq!(redact_url("https://u:KEY@h/p?sig=X"), "https://…@h/p?…");
        assert_eq!(redact_url("s3://KEY@b"), "s3://…@b");
    }

    #[test]
    fn part_plan_bounds_memory() {
        let t = FileUploadTuning::default();
        assert_eq!(t.plan(1 << 30), (16 << 20, 4));
        // 1 TiB needs parts over 100 MiB: fewer in flight, within the same budget.
        let (part, conc) = t.plan(1 << 40);
        assert!(part as u64 * crate::backend::MAX_PARTS >= 1 << 40);
        assert_eq!(conc, 1.max((64 << 20) / part));
        assert!(part * conc <= (64 << 20).max(part));
    }
}
