//! Draining: a completed cycle's journal becomes one recovery point in the vault.
//!
//! The process role journals what an agent sends (`crate::journal`); once the cycle's
//! `EndOfCycle` is durable, a drainer replays the journal, puts every chunk at its place in a
//! sparse scratch image of the disk on the cache disk (zero ranges stay holes), and imports
//! that image through the store's pipeline (dedup, zstd, AES-GCM, packs, tree, point record):
//! a full import for an initial cycle, an incremental one for a delta or resync cycle, whose
//! changed ranges are exactly the chunks and zero ranges the cycle carried, applied over the
//! item's previous point. The point exists only when the store has committed its record; only
//! then may the journal be removed. A failure leaves the journal as it was (the drain is run
//! again), never a half point.
//!
//! Memory is bounded by one frame at a time plus the list of changed ranges (coalesced); the
//! scratch image costs cache-disk space for the cycle's data, which the cache guard's limits
//! already account for at twice the journal (journal + scratch).

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_proto::frame::{self, AgentFrame, CycleKind, Decoded};
use ferry_store::{Consistency, ImportOptions, PointMeta, PointRecord, Vault};

use crate::journal::Journal;

/// Point tag: the disk the cycle replicated (a point holds every disk of the item; the one a
/// cycle changed is named here).
pub const TAG_DISK: &str = "disk";
/// Point tag: the cycle number the point was drained from.
pub const TAG_CYCLE: &str = "cycle";
/// Point tag: the `seq` of the cycle's `EndOfCycle` (so a `Hello` for a drained cycle whose
/// last ack was lost can be answered after the journal is gone).
pub const TAG_END_SEQ: &str = "end_seq";
/// Tags the gateway sets on a drained point; an agent's tag of the same name is dropped.
pub const RESERVED_TAGS: &[&str] = &[TAG_DISK, TAG_CYCLE, TAG_END_SEQ, "snapshot"];

/// What the drain needs to know of a cycle that the journal's frames do not say (the
/// session's `Hello`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CycleInfo {
    /// Protected item.
    pub item: String,
    /// Disk name.
    pub disk: String,
    /// Cycle number.
    pub cycle: u64,
    /// Initial, delta or resync.
    pub kind: CycleKind,
    /// Disk size, bytes.
    pub disk_size: u64,
    /// Chunk size, bytes.
    pub chunk_size: u32,
    /// The agent that sent it.
    pub agent: String,
}

/// Why a drain failed. Nothing was committed.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// The journal could not be read.
    #[error("draining cycle {cycle} of `{item}`: {source}")]
    Journal {
        /// The item.
        item: String,
        /// The cycle.
        cycle: u64,
        /// What the journal said.
        #[source]
        source: crate::journal::JournalError,
    },
    /// A journaled record is not a frame the session would have accepted.
    #[error("draining cycle {cycle} of `{item}`: record {seq} {reason}")]
    BadRecord {
        /// The item.
        item: String,
        /// The cycle.
        cycle: u64,
        /// Its sequence number.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// The cycle has no `EndOfCycle`: it is not complete.
    #[error("cycle {cycle} of `{item}` is not complete (no EndOfCycle in its journal)")]
    Incomplete {
        /// The item.
        item: String,
        /// The cycle.
        cycle: u64,
    },
    /// The scratch image could not be written.
    #[error("scratch image {}: {source}", path.display())]
    Scratch {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The store refused or failed.
    #[error("committing cycle {cycle} of `{item}` to the vault: {source}")]
    Store {
        /// The item.
        item: String,
        /// The cycle.
        cycle: u64,
        /// What the store said.
        #[source]
        source: Box<ferry_store::StoreError>,
    },
}

/// Adds `r` to sorted, coalesced `ranges` (frames arrive mostly in disk order).
fn add_range(ranges: &mut Vec<Range<u64>>, r: Range<u64>) {
    if let Some(last) = ranges.last_mut()
        && last.end >= r.start
        && r.end >= last.start
    {
        last.start = last.start.min(r.start);
        last.end = last.end.max(r.end);
        return;
    }
    ranges.push(r);
}

/// Sorts and coalesces ranges.
fn normalise(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        add_range(&mut out, r);
    }
    out
}

/// Replays `journal` into a sparse image at `scratch`; returns the changed byte ranges and
/// the `EndOfCycle`.
fn materialise(
    info: &CycleInfo,
    journal: &Journal,
    scratch: &Path,
) -> Result<(Vec<Range<u64>>, frame::EndOfCycle), DrainError> {
    let bad = |seq: u64, reason: String| DrainError::BadRecord {
        item: info.item.clone(),
        cycle: info.cycle,
        seq,
        reason,
    };
    let io = |source| DrainError::Scratch {
        path: scratch.to_path_buf(),
        source,
    };
    let f: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(scratch)
        .map_err(io)?;
    f.set_len(info.disk_size).map_err(io)?;
    let limits = frame::Limits::protocol().for_chunk_size(info.chunk_size);
    let cs = u64::from(info.chunk_size);
    let mut changed = Vec::new();
    let mut end = None;
    let replay = journal.replay(1).map_err(|source| DrainError::Journal {
        item: info.item.clone(),
        cycle: info.cycle,
        source,
    })?;
    for rec in replay {
        let (seq, payload) = rec.map_err(|source| DrainError::Journal {
            item: info.item.clone(),
            cycle: info.cycle,
            source,
        })?;
        let f_ = match frame::decode_agent(&payload, &limits) {
            Ok(Decoded::Frame(fr, used)) if used == payload.len() => fr,
            Ok(_) => return Err(bad(seq, "is not exactly one frame".into())),
            Err(e) => return Err(bad(seq, e.to_string())),
        };
        if end.is_some() {
            return Err(bad(seq, "follows the EndOfCycle".into()));
        }
        match f_ {
            AgentFrame::Chunk(c) => {
                let off = c.index.checked_mul(cs).filter(|o| *o < info.disk_size);
                let Some(off) = off else {
                    return Err(bad(seq, format!("chunk {} is past the disk", c.index)));
                };
                if off + c.bytes.len() as u64 > info.disk_size {
                    return Err(bad(seq, format!("chunk {} runs past the disk", c.index)));
                }
                f.write_all_at(&c.bytes, off).map_err(io)?;
                add_range(&mut changed, off..off + c.bytes.len() as u64);
            }
            AgentFrame::Zero(z) => {
                let start = z.first_index.saturating_mul(cs);
                let stop = z
                    .first_index
                    .saturating_add(z.count)
                    .saturating_mul(cs)
                    .min(info.disk_size);
                if start >= stop {
                    return Err(bad(seq, "zero range is past the disk".into()));
                }
                // Holes read as zeros; a chunk written earlier in the cycle is zeroed again.
                rustix::fs::fallocate(
                    &f,
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                    start,
                    stop - start,
                )
                .map_err(|e| io(std::io::Error::from(e)))?;
                add_range(&mut changed, start..stop);
            }
            AgentFrame::EndOfCycle(e) => end = Some(e),
            AgentFrame::Hello(_) => return Err(bad(seq, "is a Hello".into())),
        }
    }
    f.sync_data().map_err(io)?;
    let end = end.ok_or_else(|| DrainError::Incomplete {
        item: info.item.clone(),
        cycle: info.cycle,
    })?;
    Ok((normalise(changed), end))
}

/// What the point of cycle `info` says besides its disks: the gateway's tags (disk, cycle,
/// `EndOfCycle` seq, snapshot provider), then the agent's own (never one of the gateway's: a
/// point's cycle must be the one it was drained from), its consistency and source.
pub fn point_meta(info: &CycleInfo, end: &frame::EndOfCycle) -> PointMeta {
    let mut tags = vec![
        (TAG_DISK.to_string(), info.disk.clone()),
        (TAG_CYCLE.to_string(), info.cycle.to_string()),
        (TAG_END_SEQ.to_string(), end.seq.to_string()),
        ("snapshot".to_string(), end.snapshot.as_str().to_string()),
    ];
    tags.extend(
        end.tags
            .iter()
            .filter(|(k, _)| !RESERVED_TAGS.contains(&k.as_str()))
            .cloned(),
    );
    PointMeta {
        consistency: match end.consistency {
            frame::Consistency::Crash => Consistency::Crash,
            frame::Consistency::App => Consistency::App,
        },
        source: format!(
            "agent {} cycle {} ({})",
            info.agent,
            info.cycle,
            info.kind.as_str()
        ),
        tags,
    }
}

/// Drains the complete cycle `info` from `journal` into `vault`, using `scratch_dir` on the
/// cache disk for the scratch image; returns the committed point. The caller removes the
/// journal afterwards (the point is committed: the frames are the vault's now).
pub async fn drain_cycle(
    vault: &Vault,
    info: &CycleInfo,
    journal: &Journal,
    scratch_dir: &Path,
) -> Result<PointRecord, DrainError> {
    let scratch = scratch_dir.join(format!(
        ".drain-{}-{}-{}.img",
        info.item, info.disk, info.cycle
    ));
    // A scratch image left by a crashed drain is redone from the journal.
    let _ = std::fs::remove_file(&scratch);
    let r = async {
        let (changed, end) = tokio::task::block_in_place(|| materialise(info, journal, &scratch))?;
        let meta = point_meta(info, &end);
        let opts = ImportOptions {
            item: info.item.clone(),
            disk_name: info.disk.clone(),
            disk_path: scratch.clone(),
            disk: None,
            changes: match info.kind {
                CycleKind::Initial => None,
                CycleKind::Delta | CycleKind::Resync => Some(changed),
            },
            chunk_size: Some(info.chunk_size),
            consistency: meta.consistency,
            source: meta.source,
            tags: meta.tags,
        };
        vault
            .import(opts, Arc::default())
            .await
            .map(|r| r.point)
            .map_err(|source| DrainError::Store {
                item: info.item.clone(),
                cycle: info.cycle,
                source: Box::new(source),
            })
    }
    .await;
    let _ = std::fs::remove_file(&scratch);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use ferry_proto::frame::{Chunk, EndOfCycle, Snapshot, Zero};
    use ferry_store::ExportOptions;

    const CS: u32 = 64 << 10;

    /// A journal of `frames` (seq from 1) for a cycle.
    fn journal(dir: &Path, frames: &[AgentFrame]) -> Journal {
        let (mut j, _) = Journal::open(dir, crate::journal::Limits::default()).unwrap();
        for (i, f) in frames.iter().enumerate() {
            let mut buf = Vec::new();
            frame::encode_agent(f, &mut buf).unwrap();
            j.append(u64::try_from(i).unwrap() + 1, &buf).unwrap();
        }
        j.sync().unwrap();
        j
    }

    fn chunk(seq: u64, index: u64, data: &[u8]) -> AgentFrame {
        AgentFrame::Chunk(Chunk {
            seq,
            index,
            bytes: Bytes::copy_from_slice(data),
        })
    }

    fn end(seq: u64) -> AgentFrame {
        AgentFrame::EndOfCycle(EndOfCycle {
            seq,
            consistency: frame::Consistency::Crash,
            snapshot: Snapshot::Reflink,
            tags: vec![("app".into(), "test".into())],
        })
    }

    async fn export(vault: &Vault, point: &str, out: &Path) -> Vec<u8> {
        vault
            .export(
                ExportOptions {
                    item: "web-01".into(),
                    point: ferry_store::PointSelector::Id(point.into()),
                    disk: None,
                    out: out.to_path_buf(),
                    overwrite: true,
                    sync: false,
                },
                Arc::default(),
            )
            .await
            .unwrap();
        std::fs::read(out).unwrap()
    }

    /// An initial cycle, then a delta that changes chunks and zeroes a range: each point
    /// restores to exactly the disk the frames describe.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cycles_become_points_that_restore_bit_exact() {
        let dir = tempfile::tempdir().unwrap();
        let vault = crate::testkit::memory_vault(dir.path()).await;
        let cs = CS as usize;
        // Six chunks and a half; chunk 2 is a hole in the source (sent as a zero range).
        let size = cs * 6 + cs / 2;
        let mut disk: Vec<u8> = (0..size)
            .map(|i| u8::try_from(i * 7 % 251).unwrap())
            .collect();
        disk[2 * cs..3 * cs].fill(0);
        let info = CycleInfo {
            item: "web-01".into(),
            disk: "os".into(),
            cycle: 1,
            kind: CycleKind::Initial,
            disk_size: size as u64,
            chunk_size: CS,
            agent: "web-agent".into(),
        };
        let mut frames = Vec::new();
        let mut seq = 0;
        for i in [0usize, 1, 3, 4, 5, 6] {
            seq += 1;
            let s = i * cs;
            frames.push(chunk(seq, i as u64, &disk[s..(s + cs).min(size)]));
        }
        seq += 1;
        frames.push(AgentFrame::Zero(Zero {
            seq,
            first_index: 2,
            count: 1,
        }));
        frames.push(end(seq + 1));
        let j = journal(&dir.path().join("j1"), &frames);
        let scratch = dir.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let p1 = drain_cycle(&vault, &info, &j, &scratch).await.unwrap();
        assert!(p1.tags.contains(&("cycle".into(), "1".into())), "{p1:?}");
        assert!(p1.tags.contains(&("app".into(), "test".into())));
        assert_eq!(
            export(&vault, &p1.id, &dir.path().join("p1.raw")).await,
            disk
        );
        assert_eq!(
            std::fs::read_dir(&scratch).unwrap().count(),
            0,
            "scratch removed"
        );

        // Cycle 2: chunk 1 changes, the short last chunk changes, chunks 4..6 are zeroed.
        let mut disk2 = disk.clone();
        disk2[cs..2 * cs].fill(0xAB);
        disk2[6 * cs..].fill(0xCD);
        disk2[4 * cs..6 * cs].fill(0);
        let frames = vec![
            chunk(1, 1, &disk2[cs..2 * cs]),
            AgentFrame::Zero(Zero {
                seq: 2,
                first_index: 4,
                count: 2,
            }),
            chunk(3, 6, &disk2[6 * cs..]),
            end(4),
        ];
        let j2 = journal(&dir.path().join("j2"), &frames);
        let info2 = CycleInfo {
            cycle: 2,
            kind: CycleKind::Delta,
            ..info.clone()
        };
        let p2 = drain_cycle(&vault, &info2, &j2, &scratch).await.unwrap();
        assert_eq!(p2.parent.as_deref(), Some(p1.id.as_str()));
        assert_eq!(
            export(&vault, &p2.id, &dir.path().join("p2.raw")).await,
            disk2
        );
        // The first point is untouched.
        assert_eq!(
            export(&vault, &p1.id, &dir.path().join("p1b.raw")).await,
            disk
        );

        // A cycle without EndOfCycle is not drained, and commits nothing.
        let j3 = journal(&dir.path().join("j3"), &[chunk(1, 0, &disk2[..cs])]);
        let info3 = CycleInfo {
            cycle: 3,
            ..info2.clone()
        };
        let e = drain_cycle(&vault, &info3, &j3, &scratch)
            .await
            .unwrap_err();
        assert!(matches!(e, DrainError::Incomplete { .. }), "{e}");
        assert_eq!(vault.points(Some("web-01")).await.unwrap().len(), 2);
        // A record that is not a frame is named.
        let (mut jb, _) =
            Journal::open(&dir.path().join("j4"), crate::journal::Limits::default()).unwrap();
        jb.append(1, b"not a frame").unwrap();
        jb.sync().unwrap();
        let e = drain_cycle(&vault, &info3, &jb, &scratch)
            .await
            .unwrap_err();
        assert!(matches!(e, DrainError::BadRecord { seq: 1, .. }), "{e}");
    }

    #[test]
    fn ranges_coalesce() {
        assert_eq!(
            normalise(vec![10..20, 0..5, 5..8, 15..30, 40..41]),
            vec![0..8, 10..30, 40..41]
        );
    }
}
