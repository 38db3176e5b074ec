//! Raw: the disk byte for byte, as a sparse file.
//!
//! Layout: byte `i` of the file is byte `i` of the disk; the file is exactly as long as the
//! disk (`set_len` first, so holes need no writing). Each chunk is written at `index × chunk
//! size`; zero chunks are never written and all-zero 64 KiB clusters inside a chunk are
//! skipped, so they stay holes and read as zeros. VHD fixed is this plus a footer
//! (`super::vhd`).

use std::ops::Range;

use super::{CLUSTER, FormatWriter, Output, nonzero_runs};
use crate::error::Result;
use crate::restore::{ChunkSink, chunk_span};

/// Writes chunks in place into a sparse file.
#[derive(Debug)]
pub(crate) struct RawWriter {
    pub(crate) out: Output,
    size: u64,
    cs: u64,
}

impl RawWriter {
    /// A writer of a `size`-byte disk in `cs`-byte chunks into `out`, a file of `len` bytes
    /// (`len ≥ size`: the tail past the disk reads as zeros).
    pub fn new(out: Output, size: u64, cs: u64, len: u64) -> Result<Self> {
        out.set_len(len)?;
        Ok(Self { out, size, cs })
    }
}

impl ChunkSink for RawWriter {
    fn chunk(&self, plain: &[u8], indexes: &[u64]) -> Result<()> {
        for &index in indexes {
            let data = &plain[..chunk_span(self.size, self.cs, index, plain.len())];
            let base = index * self.cs;
            for (first, n) in nonzero_runs(data) {
                let a = usize::try_from(first * CLUSTER).expect("chunk fits memory");
                let b = usize::try_from((first + n) * CLUSTER)
                    .expect("chunk fits memory")
                    .min(data.len());
                self.out.write_at(&data[a..b], base + first * CLUSTER)?;
            }
        }
        Ok(())
    }

    fn zeros(&self, _chunks: Range<u64>) -> Result<()> {
        Ok(())
    }
}

impl FormatWriter for RawWriter {
    fn finish(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit;
    use super::super::{ExportFormat, FormatOptions};

    #[tokio::test]
    async fn raw_is_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let size = (40 << 16) + 4321;
        let (src, out) = testkit::export(
            dir.path(),
            256 << 10,
            size,
            FormatOptions {
                format: ExportFormat::Raw,
                vhd_round_up: false,
            },
        )
        .await;
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
    }
}
