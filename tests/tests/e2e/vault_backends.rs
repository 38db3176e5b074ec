//! The store's shared backend suite: every scenario runs against a local directory, Azurite
//! and moto (each emulator started here on a free loopback port and stopped afterwards), on
//! real ext4 images.
//!
//! Scenarios: bit-exact roundtrip of a full point and three incrementals; dedup; tamper
//! detection; a crash between pack upload and commit; index rebuilt from the bucket alone
//! (segments, and trailers when segments are gone); multipart packs; bad input that must name
//! what is wrong and change nothing.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use ferry_e2e::{Emulator, Kind, TestRepo, make_ext4, random_writes, sha256_file};
use ferry_store::crypto::Argon2Params;
use ferry_store::vault::Tuning;
use ferry_store::{
    Backend, ExportOptions, ImportOptions, InitOptions, OpenOptions, PointSelector, Progress,
    Secret, StoreError, UploadTuning, Vault,
};
use futures::stream::BoxStream;
use object_store::path::Path as OPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

fn secret() -> Secret {
    Secret::Passphrase(b"correct horse battery staple".to_vec())
}

fn init_opts() -> InitOptions {
    InitOptions {
        chunk_size: 64 << 10,
        argon: Argon2Params::default(),
    }
}

fn open_opts(cache: &Path) -> OpenOptions {
    let mut o = OpenOptions::new(cache);
    // Small packs so that even small images span several packs.
    o.tuning = Tuning {
        pack_target: 4 << 20,
        ..Tuning::default()
    };
    o
}

struct Ctx {
    repo: TestRepo,
    work: PathBuf,
}

impl Ctx {
    fn new(kind: Kind, emu: Option<&Emulator>, name: &str) -> Self {
        let repo = TestRepo::new(kind, emu, name);
        let work = repo.dir.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        Self { repo, work }
    }

    fn cache(&self, n: &str) -> PathBuf {
        self.work.join(format!("cache-{n}"))
    }

    async fn init(&self) -> Vault {
        Vault::init(
            self.repo.backend(),
            &secret(),
            init_opts(),
            open_opts(&self.cache("a")),
        )
        .await
        .expect("init")
    }

    async fn open_with_cache(&self, cache: &str) -> Vault {
        Vault::open(
            self.repo.backend(),
            &secret(),
            open_opts(&self.cache(cache)),
        )
        .await
        .expect("open")
    }

    async fn objects(&self) -> BTreeSet<String> {
        self.repo.objects().await
    }
}

async fn import(
    v: &Vault,
    item: &str,
    disk: &Path,
    changes: Option<Vec<Range<u64>>>,
) -> ferry_store::ImportReport {
    let mut o = ImportOptions::full(item, disk);
    o.changes = changes;
    v.import(o, Arc::new(Progress::default()))
        .await
        .expect("import")
}

async fn export(v: &Vault, item: &str, point: &str, out: &Path) -> Result<(), StoreError> {
    v.export(
        ExportOptions {
            item: item.into(),
            point: PointSelector::parse(point),
            disk: None,
            out: out.to_path_buf(),
            overwrite: true,
            sync: true,
        },
        Arc::new(Progress::default()),
    )
    .await
    .map(|_| ())
}

/// Random 4 KiB-aligned writes; returns the changed ranges.
fn mutate(img: &Path, n: usize, len: usize, seed: u64) -> Vec<Range<u64>> {
    random_writes(img, n, len, seed)
}

/// Full point + three incrementals, every point exported and compared; then dedup.
async fn roundtrip_incrementals_and_dedup(c: &Ctx) {
    let img = c.work.join("disk.img");
    make_ext4(&img, "96M");
    let v = c.init().await;
    let mut expected = Vec::new();
    let r = import(&v, "web", &img, None).await;
    assert!(r.chunks_new > 10, "{r:?}");
    expected.push((r.point.id.clone(), sha256_file(&img)));
    for round in 0..3u64 {
        // Mixed: small writes, a write straddling chunks, and zeroing a range.
        let mut changes = mutate(&img, 20, 100 << 10, 100 + round);
        let zero_at = (8 + round * 3) << 20;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; 200 << 10], zero_at).unwrap();
        changes.push(zero_at..zero_at + (200 << 10));
        let r = import(&v, "web", &img, Some(changes)).await;
        assert!(
            r.bytes_read < 12 << 20,
            "incremental read {} bytes",
            r.bytes_read
        );
        expected.push((r.point.id.clone(), sha256_file(&img)));
    }
    let points = v.points(Some("web")).await.unwrap();
    assert_eq!(points.len(), 4);
    for (i, (id, sha)) in expected.iter().enumerate() {
        let out = c.work.join(format!("out-{i}.img"));
        export(&v, "web", id, &out).await.unwrap();
        assert_eq!(
            &sha256_file(&out),
            sha,
            "point {i} ({id}) restores bit-exact"
        );
        std::fs::remove_file(&out).unwrap();
    }
    let rep = v.verify(true).await.unwrap();
    assert!(rep.is_ok(), "{:?}", rep.problems);

    // Dedup: the same image again, as a full import under another item, adds no data pack.
    let data_before: BTreeSet<String> = c
        .objects()
        .await
        .into_iter()
        .filter(|o| o.starts_with("packs/data/"))
        .collect();
    let r = import(&v, "web-clone", &img, None).await;
    assert_eq!(r.chunks_new, 0, "{r:?}");
    let data_after: BTreeSet<String> = c
        .objects()
        .await
        .into_iter()
        .filter(|o| o.starts_with("packs/data/"))
        .collect();
    assert_eq!(data_before, data_after, "no data pack added");
    // And the very same item again: no page is new either; only the record is added.
    let before = c.objects().await;
    let r = import(&v, "web-clone", &img, None).await;
    assert_eq!((r.chunks_new, r.pages_written, r.packs), (0, 0, 0), "{r:?}");
    let added: Vec<String> = c.objects().await.difference(&before).cloned().collect();
    assert_eq!(added.len(), 1, "{added:?}");
    assert!(added[0].starts_with("points/web-clone/"));
}

/// One flipped byte in a pack: read-data verification names it and the affected points; an
/// affected point refuses to export; an unaffected one still exports.
async fn tamper_detection(c: &Ctx) {
    let a = c.work.join("a.img");
    let b = c.work.join("b.img");
    make_ext4(&a, "64M");
    std::fs::copy(&a, &b).unwrap();
    mutate(&b, 30, 64 << 10, 7);
    let v = c.init().await;
    let pa = import(&v, "alpha", &a, None).await.point.id;
    let before = c.objects().await;
    let pb = import(&v, "beta", &b, None).await.point.id;
    let new_data: Vec<String> = c
        .objects()
        .await
        .difference(&before)
        .filter(|o| o.starts_with("packs/data/"))
        .cloned()
        .collect();
    assert!(!new_data.is_empty());
    let victim = &new_data[0];
    let backend = c.repo.backend();
    let mut bytes = backend.get(victim).await.unwrap().to_vec();
    bytes[ferry_store::pack::HEADER_LEN + 10] ^= 0x01;
    backend
        .store()
        .put(&OPath::from(victim.as_str()), PutPayload::from(bytes))
        .await
        .unwrap();

    // Structure alone cannot see it (sizes match); reading the data does.
    let rep = v.verify(false).await.unwrap();
    assert!(rep.is_ok(), "{:?}", rep.problems);
    let rep = v.verify(true).await.unwrap();
    assert!(!rep.is_ok());
    let named: Vec<_> = rep
        .problems
        .iter()
        .filter(|p| &p.object == victim)
        .collect();
    assert_eq!(named.len(), 1, "{:?}", rep.problems);
    let affected: BTreeSet<String> = rep
        .problems
        .iter()
        .flat_map(|p| p.affected.clone())
        .collect();
    assert!(affected.contains(&format!("beta/{pb}")), "{affected:?}");
    assert!(!affected.contains(&format!("alpha/{pa}")), "{affected:?}");

    let out = c.work.join("out.img");
    let err = export(&v, "beta", &pb, &out).await.unwrap_err();
    assert!(matches!(err, StoreError::Tampered { .. }), "{err}");
    assert!(err.to_string().contains(victim.as_str()), "{err}");
    assert!(!out.exists(), "no partial output under the final name");
    export(&v, "alpha", &pa, &out).await.unwrap();
    assert_eq!(sha256_file(&out), sha256_file(&a));

    // A damaged trailer is reported on its pack, but the blobs (checked against the index)
    // are intact: no point is affected and restores still work.
    let alpha_pack = before
        .iter()
        .find(|o| o.starts_with("packs/data/"))
        .unwrap()
        .clone();
    let mut bytes = backend.get(&alpha_pack).await.unwrap().to_vec();
    let n = bytes.len();
    bytes[n - ferry_store::pack::FOOTER_LEN - 3] ^= 0x01;
    backend
        .store()
        .put(&OPath::from(alpha_pack.as_str()), PutPayload::from(bytes))
        .await
        .unwrap();
    let rep = v.verify(true).await.unwrap();
    let p = rep
        .problems
        .iter()
        .find(|p| p.object == alpha_pack)
        .expect("damaged trailer reported");
    assert!(p.problem.contains("trailer"), "{p:?}");
    assert!(p.affected.is_empty(), "{p:?}");
    export(&v, "alpha", &pa, &out).await.unwrap();
    assert_eq!(sha256_file(&out), sha256_file(&a));
}

/// An object store that fails every write under some prefixes: a crash at that moment.
#[derive(Debug)]
struct FailWrites {
    inner: Arc<dyn ObjectStore>,
    prefixes: Vec<&'static str>,
}

impl fmt::Display for FailWrites {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FailWrites({})", self.inner)
    }
}

impl FailWrites {
    fn check(&self, p: &OPath) -> object_store::Result<()> {
        if self.prefixes.iter().any(|x| p.as_ref().starts_with(x)) {
            return Err(object_store::Error::Generic {
                store: "fail-writes",
                source: "injected crash".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for FailWrites {
    async fn put_opts(
        &self,
        l: &OPath,
        p: PutPayload,
        o: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.check(l)?;
        self.inner.put_opts(l, p, o).await
    }
    async fn put_multipart_opts(
        &self,
        l: &OPath,
        o: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.check(l)?;
        self.inner.put_multipart_opts(l, o).await
    }
    async fn get_opts(&self, l: &OPath, o: GetOptions) -> object_store::Result<GetResult> {
        self.inner.get_opts(l, o).await
    }
    fn delete_stream(
        &self,
        s: BoxStream<'static, object_store::Result<OPath>>,
    ) -> BoxStream<'static, object_store::Result<OPath>> {
        self.inner.delete_stream(s)
    }
    fn list(&self, p: Option<&OPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(p)
    }
    async fn list_with_delimiter(&self, p: Option<&OPath>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(p).await
    }
    async fn copy_opts(&self, f: &OPath, t: &OPath, o: CopyOptions) -> object_store::Result<()> {
        self.check(t)?;
        self.inner.copy_opts(f, t, o).await
    }
}

/// A crash after packs (and even the index segment) are uploaded but before the record: no
/// visible point, no damage, and the next import works.
async fn crash_between_upload_and_commit(c: &Ctx) {
    let img = c.work.join("disk.img");
    make_ext4(&img, "64M");
    let v = c.init().await;
    let first = import(&v, "db", &img, None).await.point.id;
    let changes = mutate(&img, 10, 64 << 10, 3);
    for (n, prefixes) in [(0, vec!["index/", "points/"]), (1, vec!["points/"])] {
        let inner = c.repo.backend();
        let crashing = Backend::from_store(
            Arc::new(FailWrites {
                inner: inner.store().clone(),
                prefixes,
            }),
            c.repo.url.clone(),
        );
        let cv = Vault::open(
            crashing,
            &secret(),
            open_opts(&c.cache(&format!("crash{n}"))),
        )
        .await
        .unwrap();
        let mut o = ImportOptions::full("db", &img);
        o.changes = Some(changes.clone());
        let err = cv
            .import(o, Arc::new(Progress::default()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("injected crash"), "{err}");
    }
    // Nothing visible, nothing damaged.
    let fresh = c.open_with_cache("after-crash").await;
    let points = fresh.points(Some("db")).await.unwrap();
    assert_eq!(points.len(), 1);
    assert_eq!(points[0].id, first);
    let rep = fresh.verify(true).await.unwrap();
    assert!(rep.is_ok(), "{:?}", rep.problems);
    assert!(
        rep.unindexed_packs > 0,
        "the crashed import's packs are garbage, not damage"
    );
    // The retry commits, and restores bit-exact.
    let r = import(&fresh, "db", &img, Some(changes)).await;
    let out = c.work.join("out.img");
    export(&fresh, "db", &r.point.id, &out).await.unwrap();
    assert_eq!(sha256_file(&out), sha256_file(&img));
}

/// A new machine with only the bucket and the key restores everything; `rebuild_index` works
/// from segments, and from pack trailers alone when every segment is gone.
async fn rebuild_index_from_bucket_alone(c: &Ctx) {
    let img = c.work.join("disk.img");
    make_ext4(&img, "64M");
    let v = c.init().await;
    let mut expected = vec![];
    expected.push((
        import(&v, "app", &img, None).await.point.id,
        sha256_file(&img),
    ));
    let ch = mutate(&img, 15, 32 << 10, 11);
    expected.push((
        import(&v, "app", &img, Some(ch)).await.point.id,
        sha256_file(&img),
    ));
    drop(v);

    let check = |v: Vault, tag: &'static str| {
        let expected = expected.clone();
        let work = c.work.clone();
        async move {
            for (id, sha) in &expected {
                let out = work.join(format!("{tag}.img"));
                export(&v, "app", id, &out).await.unwrap();
                assert_eq!(&sha256_file(&out), sha, "{tag}: {id}");
            }
        }
    };
    // Fresh cache: opening syncs from the bucket's segments.
    check(c.open_with_cache("fresh").await, "fresh").await;
    // Explicit rebuild.
    let v = c.open_with_cache("fresh").await;
    let r = v.rebuild_index().await.unwrap();
    assert!(
        r.packs >= 2 && r.segments >= 1 && r.unreadable.is_empty(),
        "{r:?}"
    );
    check(v, "rebuilt").await;
    // Every segment gone: trailers alone rebuild the index, and a repair segment is written.
    let b = c.repo.backend();
    for o in c.objects().await {
        if o.starts_with("index/") {
            b.delete(&o).await.unwrap();
        }
    }
    let v = c.open_with_cache("trailers").await;
    let r = v.rebuild_index().await.unwrap();
    assert_eq!(r.segments, 0);
    assert_eq!(r.repaired, r.packs);
    check(v, "trailers").await;
    // And the repair segment serves the next fresh machine without a rebuild.
    check(c.open_with_cache("after-repair").await, "after-repair").await;
}

/// Packs above the multipart threshold go up in parts and appear create-only.
async fn multipart_packs(c: &Ctx) {
    let img = c.work.join("disk.img");
    make_ext4(&img, "64M");
    Vault::init(
        c.repo.backend(),
        &secret(),
        init_opts(),
        open_opts(&c.cache("a")),
    )
    .await
    .unwrap();
    let mut b = c.repo.backend();
    b.set_tuning(UploadTuning {
        multipart_threshold: 6 << 20,
        part_size: 5 << 20,
    });
    let mut o = open_opts(&c.cache("mp"));
    o.tuning.pack_target = 12 << 20;
    let v = Vault::open(b, &secret(), o).await.unwrap();
    let r = import(&v, "big", &img, None).await;
    let objs = c.objects().await;
    assert!(
        objs.iter().all(|o| !o.starts_with("staging/")),
        "staging cleaned: {objs:?}"
    );
    let big = c
        .repo
        .backend()
        .list("packs/data/")
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.size > 6 << 20)
        .count();
    assert!(big > 0, "at least one pack went multipart");
    let out = c.work.join("out.img");
    export(&v, "big", &r.point.id, &out).await.unwrap();
    assert_eq!(sha256_file(&out), sha256_file(&img));
}

/// Bad input gives a clear error naming what is wrong, and changes nothing.
async fn bad_input(c: &Ctx) {
    let img = c.work.join("disk.img");
    make_ext4(&img, "32M");
    let v = c.init().await;
    let good = import(&v, "srv", &img, None).await.point.id;
    let before = c.objects().await;

    // Wrong passphrase.
    let e = Vault::open(
        c.repo.backend(),
        &Secret::Passphrase(b"nope".to_vec()),
        open_opts(&c.cache("x")),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, StoreError::WrongSecret { .. }), "{e}");
    // init over an existing vault.
    let e = Vault::init(
        c.repo.backend(),
        &secret(),
        init_opts(),
        open_opts(&c.cache("y")),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, StoreError::AlreadyInitialized(_)), "{e}");
    // Unreadable disk path.
    let mut o = ImportOptions::full("srv", "/nonexistent/disk.img");
    o.changes = None;
    let e = v
        .import(o, Arc::new(Progress::default()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
    // Changes past the end of the disk.
    let size = std::fs::metadata(&img).unwrap().len();
    let mut o = ImportOptions::full("srv", &img);
    o.changes = Some(std::iter::once(size - 10..size + 10).collect());
    let e = v
        .import(o, Arc::new(Progress::default()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
    // Incremental without a previous point.
    let mut o = ImportOptions::full("nobody", &img);
    o.changes = Some(std::iter::once(0..10).collect());
    let e = v
        .import(o, Arc::new(Progress::default()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no previous point"), "{e}");
    // Bad names.
    let e = v
        .import(
            ImportOptions::full("../etc", &img),
            Arc::new(Progress::default()),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::InvalidName { .. }), "{e}");
    assert_eq!(c.objects().await, before, "bad input changed nothing");

    // A tampered record is refused, naming it.
    let rec = before
        .iter()
        .find(|o| o.starts_with("points/srv/"))
        .unwrap()
        .clone();
    let b = c.repo.backend();
    let orig = b.get(&rec).await.unwrap();
    let mut t = orig.to_vec();
    let n = t.len();
    t[n - 20] ^= 0x80;
    b.store()
        .put(&OPath::from(rec.as_str()), PutPayload::from(t))
        .await
        .unwrap();
    let e = v.points(Some("srv")).await.unwrap_err();
    assert!(
        matches!(e, StoreError::Tampered { .. }) && e.to_string().contains(&rec),
        "{e}"
    );
    let rep = v.verify(false).await.unwrap();
    assert!(
        rep.problems.iter().any(|p| p.object == rec),
        "{:?}",
        rep.problems
    );
    b.store()
        .put(
            &OPath::from(rec.as_str()),
            PutPayload::from(Bytes::from(orig.to_vec())),
        )
        .await
        .unwrap();

    // A junk index segment does not lock anyone out: a fresh machine opens the vault,
    // verify names the object, rebuild-index reports it and restores work.
    b.put_create("index/junk", Bytes::from_static(b"not a segment"))
        .await
        .unwrap();
    let fresh = c.open_with_cache("junk").await;
    assert_eq!(fresh.unreadable_segments().len(), 1);
    let rep = fresh.verify(false).await.unwrap();
    assert!(
        rep.problems.iter().any(|p| p.object == "index/junk"),
        "{:?}",
        rep.problems
    );
    let r = fresh.rebuild_index().await.unwrap();
    assert!(r.unreadable.iter().any(|(o, _)| o == "index/junk"), "{r:?}");
    export(&fresh, "srv", &good, &c.work.join("o.img"))
        .await
        .unwrap();
    assert_eq!(sha256_file(&c.work.join("o.img")), sha256_file(&img));
    b.delete("index/junk").await.unwrap();

    // A missing pack: verify names it and the point; export fails naming it.
    let pack = before
        .iter()
        .find(|o| o.starts_with("packs/data/"))
        .unwrap()
        .clone();
    let saved = b.get(&pack).await.unwrap();
    b.delete(&pack).await.unwrap();
    let rep = v.verify(false).await.unwrap();
    let p = rep
        .problems
        .iter()
        .find(|p| p.object == pack)
        .expect("missing pack reported");
    assert!(p.affected.contains(&format!("srv/{good}")), "{p:?}");
    let e = export(&v, "srv", &good, &c.work.join("o.img"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains(&pack), "{e}");
    // A truncated pack is caught by structure checks too.
    b.store()
        .put(
            &OPath::from(pack.as_str()),
            PutPayload::from(saved.slice(..saved.len() / 2)),
        )
        .await
        .unwrap();
    let rep = v.verify(false).await.unwrap();
    assert!(
        rep.problems
            .iter()
            .any(|p| p.object == pack && p.problem.contains("truncated")),
        "{:?}",
        rep.problems
    );
    let e = export(&v, "srv", &good, &c.work.join("o.img"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains(&pack), "{e}");
}

async fn suite(kind: Kind) {
    let emu = match kind {
        Kind::Local => None,
        k => Some(Emulator::start(k)),
    };
    let emu = emu.as_ref();
    let tag = format!("{kind:?}").to_lowercase();
    roundtrip_incrementals_and_dedup(&Ctx::new(kind, emu, &format!("{tag}-roundtrip"))).await;
    tamper_detection(&Ctx::new(kind, emu, &format!("{tag}-tamper"))).await;
    crash_between_upload_and_commit(&Ctx::new(kind, emu, &format!("{tag}-crash"))).await;
    rebuild_index_from_bucket_alone(&Ctx::new(kind, emu, &format!("{tag}-rebuild"))).await;
    multipart_packs(&Ctx::new(kind, emu, &format!("{tag}-multipart"))).await;
    bad_input(&Ctx::new(kind, emu, &format!("{tag}-bad"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_local_directory() {
    suite(Kind::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_azurite() {
    suite(Kind::Azurite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_moto() {
    suite(Kind::Moto).await;
}
