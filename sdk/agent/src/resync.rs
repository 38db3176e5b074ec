//! Checksum-based resync: a `Resync` cycle sends only the chunks whose content differs from
//! what the gateway holds, instead of every chunk of the disk.
//!
//! A resync happens when the agent's own tracking cannot be trusted as a base (the operator
//! asked for one, the committed digests are lost or damaged, a `bad_session`, another chunk
//! or disk size): the agent no longer knows what the gateway holds. The gateway does, so it
//! is asked (`GET /api/v1/agent/items/{item}/disks/{disk}/digests`, `docs/agent-protocol.md`
//! §9): one SHA-256 per chunk of its newest recovery point of the disk, the same digests the
//! agent's tracking keeps, so the cycle is planned exactly like a delta against them
//! ([`crate::plan::Base::Replica`]). After a long outage or a lost state directory, most of a
//! disk is usually still the same on both sides, and only the difference crosses the link.
//!
//! The list grows with the disk (32 bytes a chunk: 512 MiB for 1 TiB in 64 KiB chunks), so it
//! is streamed to a file of the cycle directory ([`crate::tracking::REPLICA_DIGESTS_FILE`]),
//! never held in memory, with its length bounded by the disk's geometry; then it is read
//! whole once to check its trailer ([`check`]), and its header must give the cycle's chunk
//! size and disk size. Only then is it used, and it is removed once the cycle is planned.
//!
//! Nothing here fails a cycle: any problem ([`Unusable`]: no point holds the disk, the
//! request failed, the list is damaged, truncated, too long or of another geometry) is logged
//! as `event=resync_digests_unusable reason=…` by the caller, and the resync sends every
//! chunk as it always could.

use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_proto::digests::{
    DIGEST_LEN, DigestsError, FIXED_HEADER_LEN, Header, MAX_POINT_ID, Reader,
};
use tokio::io::AsyncWriteExt;

use crate::gateway::{Gateway, GatewayError};
use crate::plan::Geometry;
use crate::session::Stop;

/// Why the replica's digests cannot be used (the resync then sends every chunk).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Unusable {
    /// The gateway holds no recovery point of the disk (`404 no_point`).
    #[error("no recovery point holds the disk: {0}")]
    NoPoint(GatewayError),
    /// The request failed or was refused.
    #[error("{0}")]
    Request(GatewayError),
    /// The list could not be written to the state directory.
    #[error("cannot save the replica's digests to {}: {source}", path.display())]
    Save {
        /// The file.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// The body is longer than any list for the disk can be.
    #[error(
        "the replica's digest list is longer than the {limit} bytes a list for {disk_size} bytes in chunks of {chunk_size} can be"
    )]
    TooLong {
        /// The most bytes accepted.
        limit: u64,
        /// The cycle's disk size.
        disk_size: u64,
        /// The cycle's chunk size.
        chunk_size: u32,
    },
    /// The list is refused by its reader (damaged, truncated, not a list, a newer version).
    #[error("the replica's digests in {} are refused: {source}", path.display())]
    Refused {
        /// The file.
        path: PathBuf,
        /// The reader's refusal.
        source: DigestsError,
    },
    /// The list describes another geometry than the cycle's.
    #[error(
        "the replica's digests (point {point}) are for {found_size} bytes in chunks of {found_chunk}; the disk is {disk_size} bytes in chunks of {chunk_size}"
    )]
    Geometry {
        /// The point the list describes.
        point: String,
        /// The list's disk size.
        found_size: u64,
        /// The list's chunk size.
        found_chunk: u32,
        /// The cycle's disk size.
        disk_size: u64,
        /// The cycle's chunk size.
        chunk_size: u32,
    },
    /// The agent is stopping.
    #[error("the agent is stopping")]
    Stopped,
}

impl Unusable {
    /// A short word for the log line's `reason=`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoPoint(_) => "no_point",
            Self::Request(GatewayError::Unreachable { .. }) => "unreachable",
            Self::Request(
                GatewayError::Api { status: 404, .. } | GatewayError::Status { status: 404, .. },
            ) => "not_found",
            Self::Request(GatewayError::Api { .. } | GatewayError::Status { .. }) => "refused",
            Self::Request(_) => "bad_response",
            Self::Save { .. } => "save_failed",
            Self::TooLong { .. } => "too_long",
            Self::Refused { source, .. } => match source {
                DigestsError::Truncated { .. } => "truncated",
                DigestsError::FutureVersion(_) => "future_version",
                DigestsError::Io(_) => "read_failed",
                _ => "damaged",
            },
            Self::Geometry { .. } => "geometry",
            Self::Stopped => "stopped",
        }
    }
}

/// The longest list for `geo`: header with the longest point id, a digest per chunk, the
/// trailer.
pub fn max_len(geo: Geometry) -> u64 {
    (FIXED_HEADER_LEN + MAX_POINT_ID) as u64 + DIGEST_LEN as u64 * (geo.chunks() + 1)
}

/// How long the request may take: the gateway reads its point to answer (10 minutes plus the
/// disk at 100 MiB/s), then the list comes at no less than 256 KiB/s.
pub fn request_timeout(geo: Geometry) -> Duration {
    Duration::from_secs(600 + geo.disk_size / (100 << 20) + max_len(geo) / (256 << 10))
}

/// Downloads the replica's digests of `item`/`disk` to `dest` (created 0600, replaced) and
/// checks them ([`check`]) against `geo`. Returns the list's header.
pub async fn fetch(
    gw: &Gateway,
    item: &str,
    disk: &str,
    geo: Geometry,
    dest: &Path,
    stop: &Stop,
) -> Result<Header, Unusable> {
    tokio::select! {
        r = download(gw, item, disk, geo, dest) => {
            r?;
        }
        () = stop.wait() => return Err(Unusable::Stopped),
    }
    let path = dest.to_path_buf();
    tokio::task::spawn_blocking(move || check(&path, geo))
        .await
        .unwrap_or_else(|e| {
            Err(Unusable::Save {
                path: dest.to_path_buf(),
                source: io::Error::other(format!("the checking thread failed: {e}")),
            })
        })
}

async fn download(
    gw: &Gateway,
    item: &str,
    disk: &str,
    geo: Geometry,
    dest: &Path,
) -> Result<u64, Unusable> {
    let limit = max_len(geo);
    let too_long = || Unusable::TooLong {
        limit,
        disk_size: geo.disk_size,
        chunk_size: geo.chunk_size,
    };
    let mut body = gw
        .replica_digests(item, disk, request_timeout(geo))
        .await
        .map_err(|e| match &e {
            GatewayError::Api {
                status: 404, code, ..
            } if code == "no_point" => Unusable::NoPoint(e),
            _ => Unusable::Request(e),
        })?;
    if body.content_length().is_some_and(|n| n > limit) {
        return Err(too_long());
    }
    let save = |source| Unusable::Save {
        path: dest.to_path_buf(),
        source,
    };
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dest)
        .await
        .map_err(save)?;
    let mut n = 0u64;
    while let Some(piece) = body.chunk().await.map_err(Unusable::Request)? {
        n += piece.len() as u64;
        if n > limit {
            return Err(too_long());
        }
        f.write_all(&piece).await.map_err(save)?;
    }
    f.flush().await.map_err(save)?;
    Ok(n)
}

/// Reads the list at `path` whole (every digest and the trailer: a truncated or damaged list
/// is refused) and checks that it describes `geo`. Memory: one buffer.
pub fn check(path: &Path, geo: Geometry) -> Result<Header, Unusable> {
    let refused = |source| Unusable::Refused {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(|e| refused(DigestsError::Io(e)))?;
    let h = Reader::new(BufReader::with_capacity(64 << 10, f))
        .and_then(Reader::verify)
        .map_err(refused)?;
    if (h.disk_size, h.chunk_size) != (geo.disk_size, geo.chunk_size) {
        return Err(Unusable::Geometry {
            point: h.point,
            found_size: h.disk_size,
            found_chunk: h.chunk_size,
            disk_size: geo.disk_size,
            chunk_size: geo.chunk_size,
        });
    }
    Ok(h)
}

/// Removes the list (best effort: it lives in the cycle directory, which goes with the
/// cycle anyway).
pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::AtomicBool;

    use ferry_proto::digests::{Writer, digest, zero_digest};

    use super::*;
    use crate::plan::tests::{CS, image, plan_and_produce, plan_with, shape};
    use crate::plan::{self, Base, PlanError};

    /// Writes the digest list of the replica image `replica` (its chunks at their lengths).
    fn list_of(replica: &Path, geo: Geometry, out: &Path) {
        let bytes = std::fs::read(replica).unwrap();
        let h = Header {
            chunk_size: geo.chunk_size,
            disk_size: geo.disk_size,
            point: "20261127T020242.957Z-b3e2bebb".into(),
        };
        let mut w = Writer::new(File::create(out).unwrap(), &h).unwrap();
        for c in bytes.chunks(geo.chunk_size as usize) {
            w.push(&digest(c)).unwrap();
        }
        w.finish().unwrap();
    }

    fn overwrite(img: &Path, at: u64, bytes: &[u8]) {
        let f = OpenOptions::new().write(true).open(img).unwrap();
        f.write_all_at(bytes, at).unwrap();
    }

    /// The replica and the source differ in a few chunks, zeros both ways: only those are
    /// planned, a source zero chunk as a `Zero` only where the replica's is not zero, and
    /// the pending digests are the source's.
    #[test]
    fn only_differing_chunks_are_planned() {
        let t = tempfile::tempdir().unwrap();
        let cs = u64::from(CS);
        // The replica: chunks 0..8 hold data except 3 and 6 (zeros); the last is short.
        let replica = t.path().join("replica.img");
        let geo = image(&replica, &[1, 2, 3, 0, 5, 6, 0, 8], 500);
        // The source: chunk 1 changed, chunk 3 now data (replica zero), chunk 4 now zeros
        // (replica data), chunk 5 zeroed by writing zeros (allocated, read, found zero),
        // chunk 6 still zero (a hole on both sides), the short last one changed.
        let src = t.path().join("source.img");
        image(&src, &[1, 9, 3, 4, 0, 6, 0, 8], 500);
        overwrite(&src, 5 * cs, &vec![0u8; CS as usize]);
        overwrite(&src, 7 * cs + 10, b"!");
        let list = t.path().join("replica-digests");
        list_of(&replica, geo, &list);
        assert_eq!(
            check(&list, geo).unwrap().point,
            "20261127T020242.957Z-b3e2bebb"
        );

        let d = t.path().join("c");
        std::fs::create_dir(&d).unwrap();
        let p = plan_with(&d, &src, geo, Some(Base::replica(&list).unwrap()), 5);
        assert_eq!(shape(&p.frames), ["C1", "C3", "Z4+2", "C7", "E"]);
        assert_eq!(p.summary.compared_chunks, 8);
        assert_eq!(p.summary.sent_chunks(), 5);
        assert_eq!(p.summary.changed_bytes, 5 * cs - 500);
        // The pending digests are the source's: those of a full plan of the source.
        let full = t.path().join("full");
        std::fs::create_dir(&full).unwrap();
        assert_eq!(
            plan_and_produce(&full, &src, geo, None, 5)
                .summary
                .compared_chunks,
            0
        );
        let mut ours = crate::tracking::DigestReader::open(&d.join("digests")).unwrap();
        let mut all = crate::tracking::DigestReader::open(&full.join("digests")).unwrap();
        for _ in 0..geo.chunks() {
            assert_eq!(ours.next_digest().unwrap(), all.next_digest().unwrap());
        }
        ours.finish().unwrap();

        // Replica equal to the source: nothing but the EndOfCycle; the zero chunks' digests
        // are those of that many zeros (the short last chunk's too).
        let same = t.path().join("same-digests");
        list_of(&src, geo, &same);
        let mut r = Reader::new(File::open(&same).unwrap()).unwrap();
        let mut i = 0u64;
        while let Some(dg) = r.next_digest().unwrap() {
            if [4, 5, 6].contains(&i) {
                assert_eq!(dg, zero_digest(cs));
            }
            i += 1;
        }
        std::fs::create_dir(t.path().join("s")).unwrap();
        let p = plan_with(
            &t.path().join("s"),
            &src,
            geo,
            Some(Base::replica(&same).unwrap()),
            5,
        );
        assert_eq!(shape(&p.frames), ["E"]);
    }

    /// A replica that is all zeros where the source is zero sends no Zero; a replica of
    /// data where the whole source is zero sends one coalesced range.
    #[test]
    fn zero_handling_both_ways() {
        let t = tempfile::tempdir().unwrap();
        let zeros = t.path().join("zeros.img");
        let geo = image(&zeros, &[0, 0, 0, 0], 7);
        let data = t.path().join("data.img");
        image(&data, &[1, 2, 3, 4], 7);
        let (zl, dl) = (t.path().join("zl"), t.path().join("dl"));
        list_of(&zeros, geo, &zl);
        list_of(&data, geo, &dl);
        let run = |name: &str, src: &Path, list: &Path| {
            let d = t.path().join(name);
            std::fs::create_dir(&d).unwrap();
            shape(&plan_with(&d, src, geo, Some(Base::replica(list).unwrap()), 2).frames)
        };
        assert_eq!(run("a", &zeros, &zl), ["E"]);
        assert_eq!(run("b", &zeros, &dl), ["Z0+4", "E"]);
        assert_eq!(run("c", &data, &zl), ["C0", "C1", "C2", "C3", "E"]);
        assert_eq!(run("d", &data, &dl), ["E"]);
    }

    /// A damaged, truncated, lengthened or other-geometry list is refused by `check` (so
    /// the caller falls back to sending everything), and one damaged after the check is
    /// caught by planning as `ReplicaDigests`, never used.
    #[test]
    fn a_damaged_list_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("disk.img");
        let geo = image(&img, &[1, 2, 3], 0);
        let good = t.path().join("good");
        list_of(&img, geo, &good);
        let bytes = std::fs::read(&good).unwrap();
        let bad = t.path().join("bad");
        let try_with = |b: &[u8]| {
            std::fs::write(&bad, b).unwrap();
            check(&bad, geo).unwrap_err()
        };
        let mut flipped = bytes.clone();
        flipped[bytes.len() - 40] ^= 1;
        let e = try_with(&flipped);
        assert_eq!(e.reason(), "damaged", "{e}");
        let e = try_with(&bytes[..bytes.len() - 33]);
        assert_eq!(e.reason(), "truncated", "{e}");
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(try_with(&longer).reason(), "damaged");
        assert_eq!(try_with(b"<html>").reason(), "damaged");
        let e = check(&t.path().join("absent"), geo).unwrap_err();
        assert_eq!(e.reason(), "read_failed", "{e}");
        // Another geometry.
        let other = Geometry {
            disk_size: geo.disk_size - 1,
            chunk_size: CS,
        };
        let e = check(&good, other).unwrap_err();
        assert_eq!(e.reason(), "geometry");
        assert!(
            e.to_string()
                .contains("point 20261127T020242.957Z-b3e2bebb"),
            "{e}"
        );
        let e = plan::plan(
            &crate::plan::tests::rd(&img),
            &img,
            other,
            2,
            Some(Base::replica(&good).unwrap()),
            None,
            &t.path().join("plan"),
            &t.path().join("digests"),
            &AtomicBool::new(false),
        )
        .unwrap_err();
        assert!(matches!(e, PlanError::ReplicaDigests { .. }), "{e}");
        // Damaged after the check: planning stops at the trailer.
        std::fs::write(&bad, &flipped).unwrap();
        let e = plan::plan(
            &crate::plan::tests::rd(&img),
            &img,
            geo,
            2,
            Some(Base::replica(&bad).unwrap()),
            None,
            &t.path().join("plan"),
            &t.path().join("digests"),
            &AtomicBool::new(false),
        )
        .unwrap_err();
        assert!(
            matches!(
                &e,
                PlanError::ReplicaDigests {
                    source: DigestsError::Damaged,
                    ..
                }
            ),
            "{e}"
        );
        assert!(max_len(geo) >= bytes.len() as u64);
        assert!(request_timeout(geo) >= Duration::from_secs(600));
    }
}
