//! A disk opened by a source adapter, read from blocking threads.
//!
//! Why it exists: the callers that read a whole disk (the store's ingest for `ferry vault
//! import --format`, the agent's planning and sending threads) read with blocking calls from
//! threads of their own, while an adapter instance lives in an async `Store` that only one
//! task may drive. So one thread of its own (with a single-threaded runtime) owns the
//! [`OpenDisk`] and serves requests from a bounded channel; each
//! [`BlockingDisk::read_exact_at`] waits for its reply. The adapter's work never runs on the
//! caller's runtime, so a slow adapter cannot delay the caller's other tasks (the agent's
//! acknowledgements and timers). Clones share the thread; it ends when the last clone is
//! dropped.
//!
//! Memory: at most `queue` requests wait, each at most one caller's buffer long (the reply
//! is a buffer of the asked length).

use tokio::sync::{mpsc, oneshot};

use crate::adapter::{Extent, OpenDisk};
use crate::error::PluginError;

enum Request {
    Read {
        offset: u64,
        len: usize,
        reply: oneshot::Sender<Result<Vec<u8>, PluginError>>,
    },
    Changes {
        document: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<Extent>, PluginError>>,
    },
}

/// A disk opened by a source adapter, served to blocking readers by a thread of its own.
#[derive(Debug, Clone)]
pub struct BlockingDisk {
    name: String,
    size: u64,
    requests: mpsc::Sender<Request>,
}

impl BlockingDisk {
    /// Serves `disk` from a thread of its own, with at most `queue` (≥ 1) requests waiting.
    /// `name` labels errors (and the thread).
    ///
    /// # Errors
    /// The thread or its runtime cannot be started.
    pub fn serve(
        disk: OpenDisk,
        name: impl Into<String>,
        queue: usize,
    ) -> Result<Self, PluginError> {
        let name = name.into();
        let size = disk.info().virtual_size;
        let (tx, rx) = mpsc::channel(queue.max(1));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| PluginError::Host(format!("serving {name}: a runtime: {e}")))?;
        std::thread::Builder::new()
            .name("ferry-adapter".into())
            .spawn(move || rt.block_on(serve(disk, rx)))
            .map_err(|e| PluginError::Host(format!("serving {name}: a thread: {e}")))?;
        Ok(Self {
            name,
            size,
            requests: tx,
        })
    }

    /// What errors call the disk (the name it was served under).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The virtual disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fills `buf` from the virtual disk at `offset`; bytes past the end read as zeros.
    /// Blocks the calling thread: call it from a thread of its own (or `spawn_blocking`),
    /// never from an async task.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), PluginError> {
        let stopped = || self.stopped(&format!("reading at {offset}"));
        let (reply, rx) = oneshot::channel();
        self.requests
            .blocking_send(Request::Read {
                offset,
                len: buf.len(),
                reply,
            })
            .map_err(|_| stopped())?;
        let bytes = rx.blocking_recv().map_err(|_| stopped())??;
        buf.copy_from_slice(&bytes);
        Ok(())
    }

    /// [`OpenDisk::changes`] on the served disk: the change-tracking `document` translated
    /// into changed extents (ordered, within the disk).
    pub async fn changes(&self, document: Vec<u8>) -> Result<Vec<Extent>, PluginError> {
        let stopped = || self.stopped("translating changes");
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request::Changes { document, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// The error of a request the serving thread can no longer answer.
    fn stopped(&self, what: &str) -> PluginError {
        PluginError::Host(format!(
            "{what} of {}: the adapter thread has stopped",
            self.name
        ))
    }
}

async fn serve(mut disk: OpenDisk, mut rx: mpsc::Receiver<Request>) {
    let size = disk.info().virtual_size;
    while let Some(request) = rx.recv().await {
        match request {
            Request::Read { offset, len, reply } => {
                let mut buf = vec![0u8; len];
                let within = usize::try_from(size.saturating_sub(offset))
                    .unwrap_or(usize::MAX)
                    .min(len);
                let r = if within == 0 {
                    Ok(buf)
                } else {
                    disk.read_into(offset, &mut buf[..within])
                        .await
                        .map(|()| buf)
                };
                let _ = reply.send(r);
            }
            Request::Changes { document, reply } => {
                let _ = reply.send(disk.changes(&document).await);
            }
        }
    }
}
