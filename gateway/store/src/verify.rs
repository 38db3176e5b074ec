//! Verification and index rebuilding.
//!
//! `verify` checks structure: every point record opens, every page and chunk its trees
//! reference is in the index, and every indexed pack exists with the size the index expects.
//! With `read_data` it also downloads every pack, authenticates every blob and recomputes its
//! id. Each problem names the object and the recovery points it affects; verification itself
//! changes nothing.
//!
//! `rebuild_index` recreates the local index from the bucket alone: index segments, and the
//! trailers of every pack (so packs whose segment was lost are found too). Packs that no
//! segment lists get a new segment, so the next fresh machine finds them without a rebuild.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use futures::StreamExt;

use crate::ChunkId;
use crate::error::{Result, StoreError};
use crate::index::{INDEX_PREFIX, PackInfo, SegmentPack, decode_segment};
use crate::pack::{FOOTER_LEN, PackId, open_blob, open_trailer, pack_key_label, parse_footer};
use crate::sealed::SEGMENT_MAGIC;
use crate::tree::decode_page;
use crate::vault::Vault;

/// One problem found by `verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyProblem {
    /// The object at fault.
    pub object: String,
    /// What is wrong with it.
    pub problem: String,
    /// Recovery points (`item/point`) that cannot be restored because of it.
    pub affected: BTreeSet<String>,
}

/// What `verify` found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Points checked.
    pub points: u64,
    /// Distinct pages visited.
    pub pages: u64,
    /// Chunk references checked.
    pub chunk_refs: u64,
    /// Packs in the bucket.
    pub packs: u64,
    /// Blobs decrypted (with `read_data`).
    pub blobs_read: u64,
    /// Packs present but not in the index (left by interrupted imports).
    pub unindexed_packs: u64,
    /// Problems, sorted by object.
    pub problems: Vec<VerifyProblem>,
}

impl VerifyReport {
    /// Whether nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What `rebuild_index` did.
#[derive(Debug, Clone, Default)]
pub struct RebuildReport {
    /// Packs indexed.
    pub packs: u64,
    /// Blobs indexed.
    pub blobs: u64,
    /// Segments read.
    pub segments: u64,
    /// Packs that no segment listed (a new segment now lists them).
    pub repaired: u64,
    /// Objects that could not be read, with the reason.
    pub unreadable: Vec<(String, String)>,
}

#[derive(Default)]
struct Problems {
    map: BTreeMap<String, (String, BTreeSet<String>)>,
}

impl Problems {
    fn add(&mut self, object: &str, problem: impl Into<String>, point: Option<&str>) {
        let e = self
            .map
            .entry(object.to_string())
            .or_insert_with(|| (problem.into(), BTreeSet::new()));
        if let Some(p) = point {
            e.1.insert(p.to_string());
        }
    }
}

/// The state of one verification walk over every point's trees.
struct Walk<'a> {
    vault: &'a Vault,
    handle: tokio::runtime::Handle,
    reader: crate::index::IndexReader,
    bad_packs: &'a HashMap<PackId, String>,
    bad_blobs: &'a HashMap<ChunkId, String>,
    /// Page id → problem objects found in its subtree.
    memo: HashMap<ChunkId, Vec<String>>,
    chunk_refs: u64,
}

impl Walk<'_> {
    /// Checks one reference; returns the object at fault, if any.
    fn check(&self, id: &ChunkId, what: &str, problems: &mut Problems) -> Result<Option<String>> {
        if let Some(obj) = self.bad_blobs.get(id) {
            return Ok(Some(obj.clone()));
        }
        match self.reader.lookup(id)? {
            None => {
                let key = format!("{what} {id}");
                problems.add(&key, format!("{what} is in no indexed pack"), None);
                Ok(Some(key))
            }
            Some(l) => Ok(self.bad_packs.get(&l.pack).cloned()),
        }
    }

    /// Problem objects in the subtree of page `id` at `level`.
    fn page(&mut self, id: &ChunkId, level: u8, problems: &mut Problems) -> Result<Vec<String>> {
        if let Some(k) = self.memo.get(id) {
            return Ok(k.clone());
        }
        let mut keys = Vec::new();
        if let Some(k) = self.check(id, "page", problems)? {
            keys.push(k);
        } else {
            match self
                .handle
                .block_on(self.vault.read_blob(id, "a disk tree"))
                .and_then(|page| decode_page(id, level, &page))
            {
                Err(e) => {
                    let obj = match &e {
                        StoreError::Tampered { object, .. }
                        | StoreError::Corrupt { object, .. } => object.clone(),
                        StoreError::MissingObject(o) => o.clone(),
                        _ => return Err(e),
                    };
                    problems.add(&obj, e.to_string(), None);
                    keys.push(obj);
                }
                Ok(entries) => {
                    for c in entries.iter().filter(|c| !c.is_zero()) {
                        if level == 0 {
                            self.chunk_refs += 1;
                            keys.extend(self.check(c, "chunk", problems)?);
                        } else {
                            keys.extend(self.page(c, level - 1, problems)?);
                        }
                    }
                }
            }
        }
        keys.sort();
        keys.dedup();
        self.memo.insert(*id, keys.clone());
        Ok(keys)
    }
}

impl Vault {
    /// Checks the vault; see the module doc.
    pub async fn verify(&self, read_data: bool) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut problems = Problems::default();
        for (name, why) in self.unreadable_segments() {
            problems.add(
                name,
                format!("index segment unreadable ({why}); run `ferry vault rebuild-index`"),
                None,
            );
        }
        // Packs in the bucket.
        let mut listed: HashMap<PackId, (String, u64)> = HashMap::new();
        for m in self.backend.list("packs/").await? {
            let name = m.location.to_string();
            match PackId::parse_object_name(&name) {
                Some((id, _)) => {
                    listed.insert(id, (name, m.size));
                }
                None => problems.add(&name, "not a pack name", None),
            }
        }
        report.packs = listed.len() as u64;
        // Indexed packs must exist with their size.
        let indexed = {
            let idx = self.index.clone();
            tokio::task::spawn_blocking(move || idx.packs())
                .await
                .map_err(|e| StoreError::Pipeline(e.to_string()))??
        };
        let mut bad_packs: HashMap<PackId, String> = HashMap::new();
        let indexed_ids: HashSet<PackId> = indexed.iter().map(|(id, _)| *id).collect();
        for (id, info) in &indexed {
            let name = id.object_name(info.kind);
            match listed.get(id) {
                None => {
                    bad_packs.insert(*id, name.clone());
                    problems.add(&name, "pack is missing", None);
                }
                Some((_, size)) if *size != info.size => {
                    bad_packs.insert(*id, name.clone());
                    problems.add(
                        &name,
                        format!(
                            "pack is {size} bytes, the index says {} (truncated?)",
                            info.size
                        ),
                        None,
                    );
                }
                Some(_) => {}
            }
        }
        report.unindexed_packs =
            listed.keys().filter(|id| !indexed_ids.contains(id)).count() as u64;

        // With read_data: authenticate every blob of every indexed pack.
        let mut bad_blobs: HashMap<ChunkId, String> = HashMap::new();
        if read_data {
            // One pack at a time (two in flight): memory is bounded by the pack size, not by
            // the size of the vault. Blobs are listed by the pack's own trailer; a pack whose
            // trailer is damaged is checked against the index's entries for it.
            let jobs = indexed
                .iter()
                .copied()
                .filter(|(id, _)| !bad_packs.contains_key(id))
                .map(|(id, info)| {
                    let me = self.clone();
                    async move {
                        let name = id.object_name(info.kind);
                        let bytes = me.backend.get(&name).await?;
                        tokio::task::spawn_blocking(move || me.check_pack(id, info, &bytes))
                            .await
                            .map_err(|e| StoreError::Pipeline(e.to_string()))?
                    }
                });
            let mut s = futures::stream::iter(jobs).buffer_unordered(2);
            while let Some(r) = s.next().await {
                let (name, n, pack_problems, bad) = r?;
                report.blobs_read += n;
                for p in pack_problems {
                    problems.add(&name, p, None);
                }
                for (id, what) in bad {
                    problems.add(&name, what.clone(), None);
                    bad_blobs.insert(id, name.clone());
                }
            }
        }

        // Walk every point.
        let names = self.point_names(None).await?;
        let handle = tokio::runtime::Handle::current();
        let me = self.clone();
        let (walked, problems) = tokio::task::spawn_blocking(move || {
            me.walk_points(handle, &names, &bad_packs, &bad_blobs, problems)
        })
        .await
        .map_err(|e| StoreError::Pipeline(e.to_string()))??;
        report.points = walked.0;
        report.pages = walked.1;
        report.chunk_refs = walked.2;
        report.problems = problems
            .map
            .into_iter()
            .map(|(object, (problem, affected))| VerifyProblem {
                object,
                problem,
                affected,
            })
            .collect();
        Ok(report)
    }

    #[allow(clippy::type_complexity)] // a private tuple of results
    fn check_pack(
        &self,
        id: PackId,
        info: PackInfo,
        bytes: &[u8],
    ) -> Result<(String, u64, Vec<String>, Vec<(ChunkId, String)>)> {
        let name = id.object_name(info.kind);
        let mut problems = Vec::new();
        // The trailer must open, and the footer salt must equal the indexed one.
        let mut entries = None;
        if bytes.len() < FOOTER_LEN {
            problems.push("pack is shorter than its footer".to_string());
        } else {
            match parse_footer(&bytes[bytes.len() - FOOTER_LEN..]) {
                Err(e) => problems.push(format!("footer: {e}")),
                Ok(f) => {
                    let t_end = bytes.len() - FOOTER_LEN;
                    match t_end.checked_sub(f.trailer_len as usize) {
                        None => problems.push("trailer length exceeds the pack".into()),
                        Some(t_start) => {
                            let mut t = bytes[t_start..t_end].to_vec();
                            match open_trailer(&self.keys, &id, &f, t_start as u64, &mut t) {
                                Ok(e) => entries = Some(e),
                                Err(e) => problems.push(format!("trailer: {e}")),
                            }
                        }
                    }
                    if f.salt != info.salt {
                        problems.push("footer salt differs from the index".into());
                    }
                }
            }
        }
        let entries = match entries {
            Some(e) => e,
            None => self.index.entries_of_pack(&id)?,
        };
        let cipher = self.keys.derive_cipher(&info.salt, &pack_key_label(&id));
        let mut bad = Vec::new();
        for e in &entries {
            let a = usize::try_from(e.offset).unwrap_or(usize::MAX);
            let b = a.saturating_add(e.stored_len as usize);
            let what = format!("blob {} at offset {}", e.id, e.offset);
            if b > bytes.len() {
                bad.push((e.id, format!("{what}: past the end of the pack")));
                continue;
            }
            let mut ct = bytes[a..b].to_vec();
            if let Err(err) = open_blob(&self.keys, &cipher, &id, info.kind, e, &mut ct) {
                bad.push((e.id, format!("{what}: {err}")));
            }
        }
        Ok((name, entries.len() as u64, problems, bad))
    }

    fn walk_points(
        &self,
        handle: tokio::runtime::Handle,
        names: &[String],
        bad_packs: &HashMap<PackId, String>,
        bad_blobs: &HashMap<ChunkId, String>,
        mut problems: Problems,
    ) -> Result<((u64, u64, u64), Problems)> {
        let mut w = Walk {
            vault: self,
            handle,
            reader: self.index.reader()?,
            bad_packs,
            bad_blobs,
            memo: HashMap::new(),
            chunk_refs: 0,
        };
        let mut points = 0u64;
        for name in names {
            let label = name
                .strip_prefix(crate::point::POINTS_PREFIX)
                .unwrap_or(name);
            let rec = match w.handle.block_on(self.load_point(name)) {
                Ok(r) => r,
                Err(e) => {
                    problems.add(name, e.to_string(), Some(label));
                    continue;
                }
            };
            points += 1;
            for disk in &rec.disks {
                if disk.root.is_zero() {
                    continue;
                }
                // Every problem under this tree (memoised per page, so a subtree shared by
                // many points is read once and still charged to each of them).
                for key in w.page(&disk.root, disk.levels - 1, &mut problems)? {
                    problems.add(&key, "", Some(label));
                }
            }
        }
        let pages = w.memo.len() as u64;
        Ok(((points, pages, w.chunk_refs), problems))
    }

    /// Recreates the local index from the bucket alone; see the module doc.
    pub async fn rebuild_index(&self) -> Result<RebuildReport> {
        let mut report = RebuildReport::default();
        let idx = self.index.clone();
        let vid = self.config.vault_id.clone();
        tokio::task::spawn_blocking(move || idx.clear(&vid))
            .await
            .map_err(|e| StoreError::Pipeline(e.to_string()))??;
        // Segments first: they list packs even where a trailer is damaged.
        let mut covered: HashSet<PackId> = HashSet::new();
        let seg_names: Vec<String> = self
            .backend
            .list(INDEX_PREFIX)
            .await?
            .into_iter()
            .map(|m| m.location.to_string())
            .collect();
        for name in seg_names {
            let opened = match self.backend.get(&name).await {
                Ok(b) => {
                    crate::sealed::open(&self.keys, SEGMENT_MAGIC, &name, &b).and_then(|body| {
                        decode_segment(&body).map_err(|e| StoreError::corrupt(&name, e.to_string()))
                    })
                }
                Err(e) => Err(e),
            };
            match opened {
                Ok(packs) => {
                    covered.extend(packs.iter().map(|p| p.id));
                    report.segments += 1;
                    let idx = self.index.clone();
                    let n = name.clone();
                    tokio::task::spawn_blocking(move || idx.insert(Some(&n), &packs))
                        .await
                        .map_err(|e| StoreError::Pipeline(e.to_string()))??;
                }
                Err(e) => report.unreadable.push((name, e.to_string())),
            }
        }
        // Then every pack's trailer.
        let packs = self.backend.list("packs/").await?;
        let jobs = packs.into_iter().filter_map(|m| {
            let name = m.location.to_string();
            let (id, kind) = PackId::parse_object_name(&name)?;
            let me = self.clone();
            Some(async move {
                let r = me.read_trailer(&name, id, m.size).await;
                (name, id, kind, m.size, r)
            })
        });
        // Packs are recorded as they are read, in batches, so memory stays bounded by the
        // batch sizes; packs no segment lists go into new segments of their own.
        let mut s = futures::stream::iter(jobs).buffer_unordered(8);
        let mut batch: Vec<SegmentPack> = Vec::new();
        let mut uncovered: Vec<SegmentPack> = Vec::new();
        let per_segment = self.tuning.packs_per_segment.max(1);
        while let Some((name, id, kind, size, r)) = s.next().await {
            match r {
                Ok((salt, entries)) => {
                    report.packs += 1;
                    report.blobs += entries.len() as u64;
                    let p = SegmentPack {
                        id,
                        info: PackInfo { salt, kind, size },
                        entries,
                    };
                    if covered.contains(&id) {
                        batch.push(p);
                    } else {
                        uncovered.push(p);
                    }
                }
                Err(e) => report.unreadable.push((name, e.to_string())),
            }
            if batch.len() >= 64 {
                self.insert_packs(std::mem::take(&mut batch)).await?;
            }
            if uncovered.len() >= per_segment {
                report.repaired += uncovered.len() as u64;
                self.write_segment(std::mem::take(&mut uncovered)).await?;
            }
        }
        self.insert_packs(batch).await?;
        if !uncovered.is_empty() {
            report.repaired += uncovered.len() as u64;
            self.write_segment(uncovered).await?;
        }
        Ok(report)
    }

    async fn insert_packs(&self, packs: Vec<SegmentPack>) -> Result<()> {
        if packs.is_empty() {
            return Ok(());
        }
        let idx = self.index.clone();
        tokio::task::spawn_blocking(move || idx.insert(None, &packs))
            .await
            .map_err(|e| StoreError::Pipeline(e.to_string()))??;
        self.index_generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    async fn read_trailer(
        &self,
        name: &str,
        id: PackId,
        size: u64,
    ) -> Result<([u8; 32], Vec<crate::pack::PackEntry>)> {
        if size < (crate::pack::HEADER_LEN + FOOTER_LEN) as u64 {
            return Err(StoreError::corrupt(
                name,
                "shorter than a pack header and footer",
            ));
        }
        let f = self
            .backend
            .get_range(name, size - FOOTER_LEN as u64..size)
            .await?;
        let footer = parse_footer(&f).map_err(|e| StoreError::corrupt(name, e))?;
        let t_end = size - FOOTER_LEN as u64;
        let t_start = t_end
            .checked_sub(u64::from(footer.trailer_len))
            .ok_or_else(|| StoreError::corrupt(name, "trailer length exceeds the pack"))?;
        let mut t = self.backend.get_range(name, t_start..t_end).await?.to_vec();
        let entries = open_trailer(&self.keys, &id, &footer, t_start, &mut t)
            .map_err(|e| StoreError::corrupt(name, e))?;
        Ok((footer.salt, entries))
    }
}
