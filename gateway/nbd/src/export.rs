//! What is served: an [`Export`] is a named [`BlockSource`] (a recovery point's disk through
//! [`ferry_store::PointReader`]), read-only or with a copy-on-write [`Overlay`].
//!
//! The overlay is a sparse file on a directory the caller chooses (the appliance's cache
//! disk), as large as the export, and an in-memory bitmap with one bit per
//! [`OVERLAY_BLOCK`] block saying which blocks the overlay holds. A write to a block the
//! overlay does not hold yet first copies the rest of that block from the base
//! (read-modify-write); reads take the overlay's blocks from the overlay and the rest from
//! the base. The recovery point is never written.
//!
//! Bounds: the bitmap takes `size / 64 KiB / 8` bytes (2 MiB for a 1 TiB disk) and is
//! refused over [`MAX_BITMAP_BYTES`] (a 16 TiB disk); a write holds its data plus at most two
//! base blocks. The overlay file is unlinked as soon as it is created: it lives exactly as
//! long as the export (the bitmap that gives it meaning is in memory), and a crash leaves
//! nothing behind on the cache disk.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::BoxFuture;

use crate::proto::MAX_NAME_LEN;

/// Bytes of one overlay block: the unit of copy-on-write.
pub const OVERLAY_BLOCK: u64 = 64 << 10;
/// Largest overlay bitmap (1 bit per block): 32 MiB, a 16 TiB export.
pub const MAX_BITMAP_BYTES: u64 = 32 << 20;
/// Largest piece of an `NBD_CMD_WRITE_ZEROES` written at once.
const ZERO_PIECE: usize = 1 << 20;

/// An error of a [`BlockSource`]: logged by the server, sent to the client as `NBD_EIO`.
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// Random-access bytes of fixed size: the base of an export.
pub trait BlockSource: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset` (the server only asks for ranges within the size).
    fn read_at<'a>(
        &'a self,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<(), SourceError>>;
}

impl BlockSource for ferry_store::PointReader {
    fn size(&self) -> u64 {
        ferry_store::PointReader::size(self)
    }

    fn read_at<'a>(
        &'a self,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            ferry_store::PointReader::read_at(self, offset, buf)
                .await
                .map_err(SourceError::from)
        })
    }
}

/// Errors setting up an export.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The name cannot be sent over NBD.
    #[error("export name `{name}` is over {MAX_NAME_LEN} bytes")]
    NameTooLong {
        /// The name (truncated).
        name: String,
    },
    /// The overlay file could not be created.
    #[error("cannot create the overlay of export `{name}` in `{dir}`: {source}")]
    OverlayIo {
        /// The export.
        name: String,
        /// The overlay directory.
        dir: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The export is too large for the overlay's bitmap bound.
    #[error(
        "export `{name}` of {size} bytes is too large for a writable overlay: its bitmap \
         would exceed {MAX_BITMAP_BYTES} bytes"
    )]
    OverlayTooLarge {
        /// The export.
        name: String,
        /// Its size.
        size: u64,
    },
}

/// Errors of one request on an export; the server maps them to NBD error numbers.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IoError {
    /// The base could not be read.
    #[error("reading the recovery point: {0}")]
    Base(SourceError),
    /// The overlay file failed.
    #[error("overlay file: {0}")]
    Overlay(std::io::Error),
}

/// The copy-on-write overlay of a writable export.
#[derive(Debug)]
pub struct Overlay {
    file: Arc<File>,
    /// Where it was created (already unlinked).
    path: PathBuf,
    size: u64,
    /// One bit per block: the overlay holds it.
    bits: Vec<AtomicU64>,
    /// Writes are serialised, so two never copy the same block in at once.
    write: tokio::sync::Mutex<()>,
}

impl Overlay {
    /// Creates an unlinked sparse overlay file of `size` bytes in `dir` for export `name`.
    pub fn create(dir: &Path, name: &str, size: u64) -> Result<Self, ExportError> {
        let blocks = size.div_ceil(OVERLAY_BLOCK);
        let words = blocks.div_ceil(64);
        if words.saturating_mul(8) > MAX_BITMAP_BYTES {
            return Err(ExportError::OverlayTooLarge {
                name: name.to_string(),
                size,
            });
        }
        let io = |source| ExportError::OverlayIo {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            source,
        };
        let safe: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(64)
            .collect();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = dir.join(format!(
            ".ferry-overlay-{safe}-{}-{stamp}",
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io)?;
        std::fs::remove_file(&path).map_err(io)?;
        file.set_len(size).map_err(io)?;
        let words = usize::try_from(words).map_err(|_| ExportError::OverlayTooLarge {
            name: name.to_string(),
            size,
        })?;
        Ok(Self {
            file: Arc::new(file),
            path,
            size,
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            write: tokio::sync::Mutex::new(()),
        })
    }

    /// Where the overlay file was created (it is unlinked at once).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Blocks the overlay holds.
    pub fn blocks_written(&self) -> u64 {
        self.bits
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    fn word(&self, block: u64) -> (&AtomicU64, u64) {
        let i = usize::try_from(block / 64).expect("block within the bitmap");
        (&self.bits[i], 1u64 << (block % 64))
    }

    fn has(&self, block: u64) -> bool {
        let (w, bit) = self.word(block);
        w.load(Ordering::Acquire) & bit != 0
    }

    fn set(&self, block: u64) {
        let (w, bit) = self.word(block);
        w.fetch_or(bit, Ordering::Release);
    }

    async fn pread(&self, offset: u64, len: usize) -> Result<Vec<u8>, IoError> {
        let f = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let mut b = vec![0u8; len];
            f.read_exact_at(&mut b, offset).map(|()| b)
        })
        .await
        .map_err(|e| IoError::Overlay(std::io::Error::other(e)))?
        .map_err(IoError::Overlay)
    }

    async fn pwrite(&self, offset: u64, data: Vec<u8>) -> Result<(), IoError> {
        let f = self.file.clone();
        tokio::task::spawn_blocking(move || f.write_all_at(&data, offset))
            .await
            .map_err(|e| IoError::Overlay(std::io::Error::other(e)))?
            .map_err(IoError::Overlay)
    }

    async fn sync(&self) -> Result<(), IoError> {
        let f = self.file.clone();
        tokio::task::spawn_blocking(move || f.sync_data())
            .await
            .map_err(|e| IoError::Overlay(std::io::Error::other(e)))?
            .map_err(IoError::Overlay)
    }

    /// Reads `buf` at `offset`: overlay blocks from the overlay, the rest from `base`.
    async fn read(
        &self,
        base: &dyn BlockSource,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), IoError> {
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let mine = self.has(at / OVERLAY_BLOCK);
            // The run of blocks with the same owner.
            let mut run_end = ((at / OVERLAY_BLOCK) + 1) * OVERLAY_BLOCK;
            while run_end < end && self.has(run_end / OVERLAY_BLOCK) == mine {
                run_end += OVERLAY_BLOCK;
            }
            let run_end = run_end.min(end);
            let dst = &mut buf[to_usize(at - offset)..to_usize(run_end - offset)];
            if mine {
                let b = self.pread(at, dst.len()).await?;
                dst.copy_from_slice(&b);
            } else {
                base.read_at(at, dst).await.map_err(IoError::Base)?;
            }
            at = run_end;
        }
        Ok(())
    }

    /// Writes `data` at `offset` (within the size): partial blocks not yet in the overlay are
    /// completed from `base` first; then one positioned write, then the blocks are marked.
    async fn write(&self, base: &dyn BlockSource, offset: u64, data: &[u8]) -> Result<(), IoError> {
        if data.is_empty() {
            return Ok(());
        }
        let _serial = self.write.lock().await;
        let end = offset + data.len() as u64;
        let first = offset / OVERLAY_BLOCK;
        let last = (end - 1) / OVERLAY_BLOCK;
        // Copy in the head block's bytes before `offset` and the tail block's after `end`
        // when the overlay does not hold those blocks yet.
        let lo = if !offset.is_multiple_of(OVERLAY_BLOCK) && !self.has(first) {
            first * OVERLAY_BLOCK
        } else {
            offset
        };
        let tail_end = ((last + 1) * OVERLAY_BLOCK).min(self.size);
        let hi = if end != tail_end && !self.has(last) {
            tail_end
        } else {
            end
        };
        let mut out = vec![0u8; to_usize(hi - lo)];
        if lo < offset {
            base.read_at(lo, &mut out[..to_usize(offset - lo)])
                .await
                .map_err(IoError::Base)?;
        }
        if hi > end {
            let from = to_usize(end - lo);
            base.read_at(end, &mut out[from..])
                .await
                .map_err(IoError::Base)?;
        }
        out[to_usize(offset - lo)..to_usize(end - lo)].copy_from_slice(data);
        self.pwrite(lo, out).await?;
        for b in first..=last {
            self.set(b);
        }
        Ok(())
    }
}

/// A length within a buffer already in memory.
#[allow(
    clippy::cast_possible_truncation,
    reason = "offsets within a request buffer, which is in memory, fit usize"
)]
fn to_usize(x: u64) -> usize {
    x as usize
}

/// One export: a name, a base and, when writable, an overlay.
pub struct Export {
    name: String,
    description: String,
    base: Arc<dyn BlockSource>,
    overlay: Option<Overlay>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.base.size())
            .field("overlay", &self.overlay)
            .finish_non_exhaustive()
    }
}

impl Export {
    /// A read-only export of `base` named `name`.
    pub fn read_only(name: &str, base: Arc<dyn BlockSource>) -> Result<Self, ExportError> {
        check_name(name)?;
        Ok(Self {
            name: name.to_string(),
            description: String::new(),
            base,
            overlay: None,
        })
    }

    /// A writable export of `base` named `name`, its writes kept in an overlay file created in
    /// `overlay_dir` (see [`Overlay`]); `base` is never written.
    pub fn writable(
        name: &str,
        base: Arc<dyn BlockSource>,
        overlay_dir: &Path,
    ) -> Result<Self, ExportError> {
        check_name(name)?;
        let overlay = Overlay::create(overlay_dir, name, base.size())?;
        Ok(Self {
            name: name.to_string(),
            description: String::new(),
            base,
            overlay: Some(overlay),
        })
    }

    /// Sets the description sent with `NBD_INFO_DESCRIPTION`.
    #[must_use]
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        let mut d: String = description.into();
        if d.len() > MAX_NAME_LEN {
            let mut cut = MAX_NAME_LEN;
            while !d.is_char_boundary(cut) {
                cut -= 1;
            }
            d.truncate(cut);
        }
        self.description = d;
        self
    }

    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The description.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.base.size()
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.overlay.is_none()
    }

    /// The overlay, when writable.
    pub fn overlay(&self) -> Option<&Overlay> {
        self.overlay.as_ref()
    }

    /// Transmission flags: `HAS_FLAGS | SEND_FLUSH | SEND_WRITE_ZEROES`, plus `READ_ONLY |
    /// CAN_MULTI_CONN` when read-only, `SEND_TRIM | SEND_FUA` when writable.
    pub fn flags(&self) -> u16 {
        use crate::proto::*;
        let common = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_WRITE_ZEROES;
        if self.is_read_only() {
            common | NBD_FLAG_READ_ONLY | NBD_FLAG_CAN_MULTI_CONN
        } else {
            common | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_FUA
        }
    }

    /// Reads `buf` at `offset` (the caller checked the range).
    pub(crate) async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        match &self.overlay {
            Some(o) => o.read(self.base.as_ref(), offset, buf).await,
            None => self.base.read_at(offset, buf).await.map_err(IoError::Base),
        }
    }

    /// Writes `data` at `offset` into the overlay (the caller checked the range and that the
    /// export is writable); with `fua`, durably.
    pub(crate) async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), IoError> {
        let Some(o) = &self.overlay else {
            return Ok(());
        };
        o.write(self.base.as_ref(), offset, data).await?;
        if fua {
            o.sync().await?;
        }
        Ok(())
    }

    /// Writes `len` zero bytes at `offset`, in pieces of at most `max_piece` bytes (the
    /// server's request cap: a zeroing request, which has no payload, may be longer than the
    /// cap, but never makes the server hold more than a write could).
    pub(crate) async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        max_piece: u32,
        fua: bool,
    ) -> Result<(), IoError> {
        let Some(o) = &self.overlay else {
            return Ok(());
        };
        let zeros = vec![0u8; zero_piece(len, max_piece)];
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(zeros.len() as u64);
            o.write(self.base.as_ref(), at, &zeros[..to_usize(n)])
                .await?;
            at += n;
        }
        if fua {
            o.sync().await?;
        }
        Ok(())
    }

    /// Makes the overlay's writes durable (nothing to do when read-only).
    pub(crate) async fn flush(&self) -> Result<(), IoError> {
        match &self.overlay {
            Some(o) => o.sync().await,
            None => Ok(()),
        }
    }
}

/// Bytes of zeroes a `write_zeroes` of `len` bytes holds at once: at most [`ZERO_PIECE`] and
/// at most `max_piece`.
fn zero_piece(len: u64, max_piece: u32) -> usize {
    to_usize(len.min(ZERO_PIECE as u64).min(u64::from(max_piece)))
}

fn check_name(name: &str) -> Result<(), ExportError> {
    if name.len() > MAX_NAME_LEN {
        return Err(ExportError::NameTooLong {
            name: name.chars().take(64).collect(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit;

    #[tokio::test]
    async fn overlay_copies_on_write_and_never_touches_the_point() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, img) = testkit::reader(dir.path()).await;
        let size = img.len();
        let overlay_dir = dir.path().join("overlay");
        std::fs::create_dir(&overlay_dir).unwrap();
        let e = Export::writable("x", Arc::new(reader.clone()), &overlay_dir).unwrap();
        // Unlinked at once: nothing in the directory.
        assert_eq!(std::fs::read_dir(&overlay_dir).unwrap().count(), 0);
        let mut want = img.clone();
        // Inside one block, across blocks, in the short last block, in the hole, a whole
        // block.
        for (at, len, v) in [
            (100usize, 10usize, 1u8),
            (OVERLAY_BLOCK as usize - 5, 20, 2),
            (size - 10, 10, 3),
            (7 * OVERLAY_BLOCK as usize + 7, OVERLAY_BLOCK as usize, 4),
            (12 * OVERLAY_BLOCK as usize, OVERLAY_BLOCK as usize, 6),
        ] {
            e.write(at as u64, &vec![v; len], false).await.unwrap();
            want[at..at + len].fill(v);
        }
        e.write_zeroes(2 * OVERLAY_BLOCK + 1, 3, 4096, true)
            .await
            .unwrap();
        want[2 * OVERLAY_BLOCK as usize + 1..2 * OVERLAY_BLOCK as usize + 4].fill(0);
        let mut got = vec![0u8; size];
        e.read(0, &mut got).await.unwrap();
        assert_eq!(got, want);
        for (at, len) in [(0usize, 1usize), (99, 13), (OVERLAY_BLOCK as usize - 6, 30)] {
            let mut b = vec![0u8; len];
            e.read(at as u64, &mut b).await.unwrap();
            assert_eq!(b, want[at..at + len]);
        }
        assert_eq!(e.overlay().unwrap().blocks_written(), 7);
        e.flush().await.unwrap();
        // The point reads as it was.
        let mut base = vec![0u8; size];
        reader.read_at(0, &mut base).await.unwrap();
        assert_eq!(base, img);
    }

    /// A source of `size` bytes, byte `i` being `i % 253`.
    struct Counting(u64);

    impl BlockSource for Counting {
        fn size(&self) -> u64 {
            self.0
        }

        fn read_at<'a>(
            &'a self,
            offset: u64,
            buf: &'a mut [u8],
        ) -> BoxFuture<'a, Result<(), SourceError>> {
            assert!(offset + buf.len() as u64 <= self.0);
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) % 253) as u8;
            }
            Box::pin(async { Ok(()) })
        }
    }

    /// A zeroing request has no payload and may be longer than the request cap; it is done in
    /// pieces of at most the cap (it used to take 1 MiB pieces whatever the cap, so a 28-byte
    /// request made a server capped at 4 KiB allocate over 2 MiB), and the pieces add up.
    #[tokio::test]
    async fn write_zeroes_holds_at_most_the_request_cap() {
        assert_eq!(zero_piece(u64::from(u32::MAX), 32 << 20), ZERO_PIECE);
        assert_eq!(zero_piece(u64::from(u32::MAX), 4096), 4096);
        assert_eq!(zero_piece(10, 4096), 10);
        assert_eq!(zero_piece(0, 4096), 0);
        let size = 3 * ZERO_PIECE as u64 + 1000;
        let dir = tempfile::tempdir().unwrap();
        let e = Export::writable("z", Arc::new(Counting(size)), dir.path()).unwrap();
        let mut want: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        for (at, len, piece) in [
            (
                OVERLAY_BLOCK - 7,
                2 * ZERO_PIECE as u64 + 3 * 4096 + 11,
                4096,
            ),
            (size - 5000, 5000, 4096),
            (3, 1, 1 << 20),
        ] {
            e.write_zeroes(at, len, piece, false).await.unwrap();
            want[at as usize..(at + len) as usize].fill(0);
        }
        let mut got = vec![1u8; size as usize];
        e.read(0, &mut got).await.unwrap();
        assert!(got == want, "zeroed ranges differ");
    }

    #[test]
    fn the_bitmap_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let too_big = MAX_BITMAP_BYTES * 8 * OVERLAY_BLOCK + 1;
        assert!(matches!(
            Overlay::create(dir.path(), "big", too_big),
            Err(ExportError::OverlayTooLarge { .. })
        ));
        assert!(matches!(
            Overlay::create(&dir.path().join("missing"), "x", 10),
            Err(ExportError::OverlayIo { .. })
        ));
    }
}
