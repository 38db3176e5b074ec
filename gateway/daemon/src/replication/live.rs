//! Draining an initial cycle while it is being received.
//!
//! An initial cycle carries the whole disk, and draining it only after its `EndOfCycle` made
//! the agent wait twice: once for the transfer, once for the vault. Its frames come in disk
//! order (the agent reads allocated extents front to back), so the store's ingest can read
//! them as a disk while they arrive: the session hands each frame over once it is durable in
//! the journal, and [`LiveSource`] answers ingest's reads from them (a chunk not sent is a
//! hole). The chunks and tree are *staged* in the vault (`Vault::stage_import`); the point is
//! committed by the drainer once the cycle is complete, as for any cycle — so nothing about
//! what is acknowledged or committed changes: the journal stays the record, and if the live
//! drain fails in any way (frames out of disk order, a gap, the session gone for longer than
//! [`IDLE`], the gateway restarted) the drainer drains the cycle from its journal as before;
//! the staged data is then garbage in the vault, like any crashed import.
//!
//! Memory: [`channel_capacity`] frames between the session and ingest, plus ingest's own
//! bounded pipeline.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferry_proto::frame::{AgentFrame, EndOfCycle};
use ferry_store::{ImportOptions, Progress, StagedImport, StoreError, Vault};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::drain::CycleInfo;

/// How long the live drain waits for the next frame (a session cut waits for the agent's
/// retry) before it gives the cycle up to the ordinary drain.
pub(super) const IDLE: Duration = Duration::from_secs(120);
/// How long a session waits for ingest to take a frame before it gives the live drain up
/// (the journal keeps taking frames; the ordinary drain follows).
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Frames in flight between the session and ingest: about 16 MiB.
fn channel_capacity(chunk_size: u32) -> usize {
    usize::try_from((16u32 << 20) / chunk_size.max(1))
        .unwrap_or(4)
        .max(4)
}

/// What the live drain produced: the staged disk and the cycle's `EndOfCycle`.
pub(crate) type LiveResult = Result<(StagedImport, EndOfCycle), String>;

/// A live drain of one cycle, held by its stream.
#[derive(Debug)]
pub(crate) struct Live {
    /// The cycle.
    pub cycle: u64,
    next_seq: u64,
    tx: Option<mpsc::Sender<(u64, AgentFrame)>>,
    task: JoinHandle<LiveResult>,
}

/// A live drain's share of `process.drain_workers`, held until its staging ends.
pub(crate) type LivePermit = tokio::sync::OwnedSemaphorePermit;

impl Live {
    /// Starts draining cycle `info` (an initial cycle, nothing received yet) into `vault`.
    pub fn start(vault: &Vault, info: &CycleInfo, permit: LivePermit) -> Self {
        let (tx, rx) = mpsc::channel(channel_capacity(info.chunk_size));
        let source = Arc::new(LiveSource {
            name: format!("cycle {} of `{}`/`{}`", info.cycle, info.item, info.disk),
            size: info.disk_size,
            chunk_size: u64::from(info.chunk_size),
            handle: tokio::runtime::Handle::current(),
            cursor: Mutex::new(Cursor {
                rx,
                next_seq: 1,
                ahead: None,
                end: None,
                asked: 0,
            }),
        });
        let opts = ImportOptions {
            item: info.item.clone(),
            disk_name: info.disk.clone(),
            disk_path: std::path::PathBuf::from(&source.name),
            disk: Some(source.clone()),
            changes: None,
            chunk_size: Some(info.chunk_size),
            // The commit sets these from the EndOfCycle.
            consistency: ferry_store::Consistency::Crash,
            source: String::new(),
            tags: Vec::new(),
        };
        let vault = vault.clone();
        let task = tokio::spawn(async move {
            let _permit = permit;
            let staged = vault
                .stage_import(opts, Arc::new(Progress::default()))
                .await
                .map_err(|e| e.to_string())?;
            // Ingest stops at the disk's last chunk; the EndOfCycle may still be on its way.
            let end = tokio::task::spawn_blocking(move || source.wait_end())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            Ok((staged, end))
        });
        Self {
            cycle: info.cycle,
            next_seq: 1,
            tx: Some(tx),
            task,
        }
    }

    /// The sequence number the live drain takes next.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Hands over durable frames in order; `false` if the live drain is gone or cannot
    /// follow (the caller drops it).
    pub async fn forward(&mut self, frames: impl IntoIterator<Item = (u64, AgentFrame)>) -> bool {
        let Some(tx) = &self.tx else { return false };
        for (seq, f) in frames {
            if seq != self.next_seq {
                return false;
            }
            match tokio::time::timeout(SEND_TIMEOUT, tx.send((seq, f))).await {
                Ok(Ok(())) => self.next_seq += 1,
                _ => return false,
            }
        }
        true
    }

    /// The cycle is complete (its EndOfCycle forwarded): waits for the staged disk.
    pub async fn finish(mut self) -> LiveResult {
        self.tx = None;
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(format!("the live drain failed unexpectedly: {e}")),
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        // Dropping the sender ends the source's wait; the import then fails and stops.
        self.tx = None;
    }
}

/// Where ingest's reader stands in the frames.
#[derive(Debug)]
struct Cursor {
    rx: mpsc::Receiver<(u64, AgentFrame)>,
    next_seq: u64,
    /// The next frame not yet used up (a chunk past the one asked, or a zero range).
    ahead: Option<AgentFrame>,
    end: Option<EndOfCycle>,
    /// The chunk index asked last (frames must not start before it).
    asked: u64,
}

/// A chunk as the frames say it.
enum At {
    Data(Bytes),
    Hole,
}

/// The disk an initial cycle describes, as its frames arrive.
#[derive(Debug)]
struct LiveSource {
    name: String,
    size: u64,
    chunk_size: u64,
    handle: tokio::runtime::Handle,
    cursor: Mutex<Cursor>,
}

impl LiveSource {
    fn err(&self, reason: impl std::fmt::Display) -> StoreError {
        StoreError::InputIo {
            path: std::path::PathBuf::from(&self.name),
            source: std::io::Error::other(format!("live drain: {reason}")),
        }
    }

    /// What chunk `index` is; `take` uses up a data frame.
    fn locate(&self, index: u64, take: bool) -> Result<At, StoreError> {
        let mut c = self.cursor.lock().map_err(|_| self.err("state poisoned"))?;
        if index < c.asked {
            return Err(self.err(format!("chunk {index} asked after {}", c.asked)));
        }
        c.asked = index;
        loop {
            match &c.ahead {
                Some(AgentFrame::Chunk(ch)) if ch.index == index => {
                    let bytes = ch.bytes.clone();
                    if take {
                        c.ahead = None;
                    }
                    return Ok(At::Data(bytes));
                }
                Some(AgentFrame::Chunk(ch)) if ch.index > index => return Ok(At::Hole),
                Some(AgentFrame::Zero(z)) if z.first_index > index => return Ok(At::Hole),
                Some(AgentFrame::Zero(z)) if z.first_index.saturating_add(z.count) > index => {
                    return Ok(At::Hole);
                }
                Some(AgentFrame::Zero(_)) => c.ahead = None,
                Some(other) => {
                    return Err(self.err(format!(
                        "frame {:?} is behind chunk {index} (frames out of disk order)",
                        other.frame_type()
                    )));
                }
                None if c.end.is_some() => return Ok(At::Hole),
                None => {}
            }
            if c.ahead.is_some() {
                continue;
            }
            let got = self
                .handle
                .block_on(async { tokio::time::timeout(IDLE, c.rx.recv()).await });
            let (seq, f) = match got {
                Ok(Some(x)) => x,
                Ok(None) => return Err(self.err("the session handed the cycle to the journal")),
                Err(_) => return Err(self.err(format!("no frame for {} s", IDLE.as_secs()))),
            };
            if seq != c.next_seq {
                return Err(self.err(format!("frame {seq} where {} was due", c.next_seq)));
            }
            c.next_seq += 1;
            match f {
                AgentFrame::EndOfCycle(e) => c.end = Some(e),
                AgentFrame::Chunk(ref ch) if ch.index < index => {
                    return Err(self.err(format!(
                        "chunk {} arrived after chunk {index} (frames out of disk order)",
                        ch.index
                    )));
                }
                AgentFrame::Zero(ref z) if z.first_index < index => {
                    return Err(self.err(format!(
                        "a zero range from chunk {} arrived after chunk {index} (frames out of disk order)",
                        z.first_index
                    )));
                }
                AgentFrame::Hello(_) => return Err(self.err("a Hello among the frames")),
                f => c.ahead = Some(f),
            }
        }
    }
}

impl LiveSource {
    /// Waits for the cycle's `EndOfCycle` once every chunk is read (nothing else may come).
    fn wait_end(&self) -> Result<EndOfCycle, StoreError> {
        let past = self.size.div_ceil(self.chunk_size);
        self.locate(past, false)?;
        self.cursor
            .lock()
            .map_err(|_| self.err("state poisoned"))?
            .end
            .clone()
            .ok_or_else(|| self.err("frames after the disk's last chunk"))
    }
}

impl ferry_store::source::DiskSource for LiveSource {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn data_extents(&self) -> Result<Vec<std::ops::Range<u64>>, StoreError> {
        // Not known before the frames come: every chunk is asked (`is_hole` first).
        Ok(std::iter::once(0..self.size).collect())
    }

    fn is_hole(&self, offset: u64, _len: u64) -> Result<bool, StoreError> {
        Ok(matches!(
            self.locate(offset / self.chunk_size, false)?,
            At::Hole
        ))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        match self.locate(offset / self.chunk_size, true)? {
            At::Data(b) => {
                let n = b.len().min(buf.len());
                buf[..n].copy_from_slice(&b[..n]);
                buf[n..].fill(0);
            }
            At::Hole => buf.fill(0),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::frame::{Chunk, CycleKind, Snapshot, Zero};
    use ferry_store::{ExportOptions, PointSelector};

    const CS: u32 = 64 << 10;

    fn permit() -> LivePermit {
        Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .unwrap()
    }

    fn info(size: u64) -> CycleInfo {
        CycleInfo {
            item: "web-01".into(),
            disk: "os".into(),
            cycle: 1,
            kind: CycleKind::Initial,
            disk_size: size,
            chunk_size: CS,
            agent: "web-agent".into(),
        }
    }

    fn chunk(seq: u64, index: u64, disk: &[u8]) -> (u64, AgentFrame) {
        let cs = CS as usize;
        let s = usize::try_from(index).unwrap() * cs;
        let e = (s + cs).min(disk.len());
        (
            seq,
            AgentFrame::Chunk(Chunk {
                seq,
                index,
                bytes: Bytes::copy_from_slice(&disk[s..e]),
            }),
        )
    }

    fn end(seq: u64) -> (u64, AgentFrame) {
        (
            seq,
            AgentFrame::EndOfCycle(EndOfCycle {
                seq,
                consistency: ferry_proto::frame::Consistency::App,
                snapshot: Snapshot::Reflink,
                tags: vec![("app".into(), "db".into())],
            }),
        )
    }

    /// Frames handed over as they would arrive (in several batches, the EndOfCycle last and
    /// after ingest read the last chunk): the staged disk, once committed, restores to exactly
    /// the disk; holes, zero ranges and a short last chunk included.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_initial_cycle_is_staged_while_it_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let vault = crate::testkit::memory_vault(dir.path()).await;
        let cs = CS as usize;
        let size = cs * 9 + 1000;
        let mut disk: Vec<u8> = (0..size)
            .map(|i| u8::try_from(i * 13 % 251).unwrap())
            .collect();
        // Chunks 2 and 5..7 are zero (2 sent as a zero range, 5..7 not sent at all: holes).
        disk[2 * cs..3 * cs].fill(0);
        disk[5 * cs..8 * cs].fill(0);
        let info = info(size as u64);
        let mut live = Live::start(&vault, &info, permit());
        assert!(live.forward([chunk(1, 0, &disk), chunk(2, 1, &disk)]).await);
        let zero = (
            3,
            AgentFrame::Zero(Zero {
                seq: 3,
                first_index: 2,
                count: 1,
            }),
        );
        assert!(
            live.forward([zero, chunk(4, 3, &disk), chunk(5, 4, &disk)])
                .await
        );
        assert!(live.forward([chunk(6, 8, &disk), chunk(7, 9, &disk)]).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(live.forward([end(8)]).await);
        let (staged, end) = live.finish().await.unwrap();
        assert_eq!(end.seq, 8);
        let report = vault
            .commit_import(staged, crate::drain::point_meta(&info, &end))
            .await
            .unwrap();
        assert!(report.point.tags.contains(&("cycle".into(), "1".into())));
        assert!(report.point.tags.contains(&("app".into(), "db".into())));
        let out = dir.path().join("out.raw");
        vault
            .export(
                ExportOptions {
                    item: "web-01".into(),
                    point: PointSelector::Id(report.point.id.clone()),
                    disk: None,
                    out: out.clone(),
                    overwrite: true,
                    sync: false,
                },
                Arc::default(),
            )
            .await
            .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), disk);
    }

    /// Frames out of disk order, a gap in the numbers, or the session gone: the live drain
    /// gives up (the drainer then drains the journal); nothing is committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_live_drain_gives_up_rather_than_guess() {
        let dir = tempfile::tempdir().unwrap();
        let vault = crate::testkit::memory_vault(dir.path()).await;
        let cs = CS as usize;
        let disk = vec![7u8; cs * 4];
        let info = info(disk.len() as u64);

        let mut live = Live::start(&vault, &info, permit());
        assert!(live.forward([chunk(1, 2, &disk), chunk(2, 1, &disk)]).await);
        let e = live.finish().await.unwrap_err();
        assert!(e.contains("out of disk order"), "{e}");

        let mut live = Live::start(&vault, &info, permit());
        // The session refuses a gap itself.
        assert!(!live.forward([chunk(1, 0, &disk), chunk(3, 1, &disk)]).await);

        let mut live2 = Live::start(&vault, &info, permit());
        assert!(live2.forward([chunk(1, 0, &disk)]).await);
        drop(live);
        let e = live2.finish().await.unwrap_err();
        assert!(e.contains("handed the cycle to the journal"), "{e}");
        assert!(vault.points(Some("web-01")).await.unwrap().is_empty());
    }
}
