//! The drainer: complete cycles become recovery points, in order.
//!
//! A delta cycle is imported over the item's previous point, so the cycles of a disk are
//! drained oldest first, and an item's disks one at a time (each point carries every disk of
//! the item). Up to `process.drain_workers` items drain at once. Only once the store has
//! committed a cycle's point is its journal removed and the agent's session (if it waits) told
//! `PointCommitted`; a failed drain leaves the journal as it was and is tried again after a
//! pause, its error shown in the item's figures.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::{Pending, ProcessRole, Stream, lock};
use crate::item::Event;

/// Pause before a failed drain is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(15);
/// How often the drainer looks without being woken (retries, missed wake-ups).
const TICK: Duration = Duration::from_secs(5);

type Outcome = (Arc<Stream>, Pending, Result<String, String>);

pub(super) async fn run(role: ProcessRole) {
    let inner = &role.inner;
    let mut running: JoinSet<Outcome> = JoinSet::new();
    // Which stream each drain task drains (a panicked task returns nothing else).
    let mut tasks: HashMap<tokio::task::Id, super::StreamId> = HashMap::new();
    let mut busy: HashSet<String> = HashSet::new();
    // Items whose drain panicked: their later cycles must not be drained over the wrong
    // point; they wait for a restart, which finds the cycle's journal again.
    let mut blocked: HashSet<String> = HashSet::new();
    let mut retry_at: HashMap<super::StreamId, Instant> = HashMap::new();
    let mut stop = inner.stop.subscribe();
    loop {
        let stopping = *stop.borrow();
        if stopping && running.is_empty() {
            return;
        }
        if !stopping {
            let mut streams: Vec<Arc<Stream>> = lock(&inner.streams).values().cloned().collect();
            streams.sort_by(|a, b| a.id.cmp(&b.id));
            for stream in streams {
                if running.len() >= inner.drain_workers {
                    break;
                }
                if busy.contains(&stream.id.0)
                    || blocked.contains(&stream.id.0)
                    || retry_at
                        .get(&stream.id)
                        .is_some_and(|t| *t > Instant::now())
                {
                    continue;
                }
                let Some(pending) = lock(&stream.pending).pop_first().map(|(_, p)| p) else {
                    continue;
                };
                busy.insert(stream.id.0.clone());
                let role = role.clone();
                let id = stream.id.clone();
                let handle = running.spawn(async move {
                    let r = drain_one(&role, &stream, &pending).await;
                    (stream, pending, r)
                });
                tasks.insert(handle.id(), id);
            }
        }
        tokio::select! {
            () = inner.drain_wake.notified() => {}
            Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                match done {
                    Ok((task, (stream, pending, result))) => {
                        tasks.remove(&task);
                        busy.remove(&stream.id.0);
                        match result {
                            Ok(point) => {
                                retry_at.remove(&stream.id);
                                committed(&role, &stream, pending, point);
                            }
                            Err(why) => {
                                eprintln!("ferryd: process role: {why}; tried again in {} s", RETRY_AFTER.as_secs());
                                role.with_figures(&stream.id.0, |f| {
                                    f.last_error = Some((ferry_store::point::now_ms(), why.clone()));
                                });
                                retry_at.insert(stream.id.clone(), Instant::now() + RETRY_AFTER);
                                lock(&stream.pending).insert(pending.info.cycle, pending);
                            }
                        }
                    }
                    Err(e) => {
                        // A drain task panicked: its cycle stays on the cache and is found
                        // again at the next start; until then its item is not drained.
                        let id = tasks.remove(&e.id());
                        eprintln!(
                            "ferryd: process role: draining {id:?} failed unexpectedly ({e}); the item's cycles wait for a restart of ferryd"
                        );
                        if let Some((item, _)) = id {
                            role.with_figures(&item, |f| {
                                f.last_error = Some((
                                    ferry_store::point::now_ms(),
                                    "a drain failed unexpectedly; its cycles wait for a restart of ferryd".into(),
                                ));
                            });
                            blocked.insert(item);
                        }
                    }
                }
            }
            () = tokio::time::sleep(TICK) => role.retry_deferred().await,
            _ = stop.changed(), if !stopping => {}
        }
    }
}

/// Drains one cycle; the point id, or why not.
async fn drain_one(role: &ProcessRole, stream: &Stream, p: &Pending) -> Result<String, String> {
    let inner = &role.inner;
    let info = &p.info;
    let item = {
        let c = inner.catalog.clone();
        let name = info.item.clone();
        tokio::task::spawn_blocking(move || c.item(&name))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
    };
    let Some(item) = item else {
        return Err(format!(
            "cycle {} of `{}`/`{}` waits: the item is not in the catalog (its journal stays on the cache until it is removed by hand or the item is created again)",
            info.cycle, info.item, info.disk
        ));
    };
    let Some(vault) = inner.vaults.get(&item.vault) else {
        return Err(format!(
            "cycle {} of `{}` waits: vault `{}` is not open on this appliance",
            info.cycle, info.item, item.vault
        ));
    };
    let started = Instant::now();
    let live = stream.live.lock().await.take_if(|l| l.cycle == info.cycle);
    if let Some(live) = live {
        // Staged while it was received: only the point is left to commit.
        let committed = match live.finish().await {
            Ok((staged, end)) => vault
                .commit_import(staged, crate::drain::point_meta(info, &end))
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match committed {
            Ok(report) => {
                let bytes = p.journal.bytes();
                role.with_figures(&info.item, |f| {
                    f.upload.add(bytes);
                    f.last_drain_secs = Some(started.elapsed().as_secs_f64());
                });
                return Ok(report.point.id);
            }
            Err(why) => eprintln!(
                "ferryd: process role: the live drain of cycle {} of `{}`/`{}` gave up ({why}); draining it from its journal",
                info.cycle, info.item, info.disk
            ),
        }
    }
    let point = crate::drain::drain_cycle(vault, info, &p.journal, &inner.scratch_dir)
        .await
        .map_err(|e| e.to_string())?;
    let bytes = p.journal.bytes();
    role.with_figures(&info.item, |f| {
        f.upload.add(bytes);
        f.last_drain_secs = Some(started.elapsed().as_secs_f64());
    });
    Ok(point.id)
}

/// A cycle is a point: the journal goes, the stream and the item learn it.
fn committed(role: &ProcessRole, stream: &Stream, pending: Pending, point: String) {
    let inner = &role.inner;
    let Pending { info, journal, .. } = pending;
    if let Err(e) = journal.remove() {
        // The next start finds the point in the vault and removes the journal then.
        eprintln!(
            "ferryd: process role: cycle {} of `{}`/`{}` is point {point}, but its journal was not removed: {e}",
            info.cycle, info.item, info.disk
        );
    }
    stream.update_known(|k| {
        if k.committed.as_ref().is_none_or(|(c, _)| *c < info.cycle) {
            k.committed = Some((info.cycle, point.clone()));
        }
    });
    stream
        .committed
        .send_replace(Some((info.cycle, point.clone())));
    role.with_figures(&info.item, |f| {
        f.last_cycle = Some((info.cycle, point.clone()));
    });
    let now = ferry_store::point::now_ms();
    if let Err(e) = inner
        .catalog
        .apply_event(&info.item, Event::PointCommitted, now)
    {
        eprintln!(
            "ferryd: process role: recording point {point} of `{}` in the catalog: {e}",
            info.item
        );
    }
    inner.drain_wake.notify_one();
}
