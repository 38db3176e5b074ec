//! Instant recovery served by the appliance: a recovery point's disk as an NBD export, so a
//! hypervisor at the recovery site boots the machine before anything is copied.
//!
//! Why in `ferryd` and not only `ferry vault mount`: the appliance already holds the vault
//! open with its keys, and the operator asks it through the API (`POST /items/{name}/mounts`,
//! `ferry point mount`), without the vault's passphrase on the hypervisor's side.
//!
//! Each mount is one [`ferry_nbd::Server`] with one export (`<item>-<disk>`), bound to
//! `[target] nbd_address` on a port of its own (0: the kernel picks a free one; the URL
//! says which). Reads go through a [`ferry_store::PointReader`] (bounded chunk cache of
//! `[target] mount_cache_mib`, read-ahead). A writable mount keeps its writes in a
//! copy-on-write overlay under `<target dir>/mounts/` (unlinked at once; the point is never
//! written), discarded with the mount.
//!
//! Mounts live in memory: at most `[target] max_mounts` at once; a restart of `ferryd` ends
//! them (the clients see the connection close). NBD has no authentication here: the address
//! must be one only the hypervisors reach (loopback by default).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferry_nbd::{Export, Server, ServerOptions};
use ferry_store::{PointSelector, ReaderOptions, Vault};

/// Why a mount could not be made or found. Each names the item, point or mount.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// `[target] max_mounts` mounts are served already.
    #[error("{0} mounts are served already ([target] max_mounts): unmount one first")]
    TooMany(usize),
    /// No mount has this id.
    #[error("no mount `{0}`")]
    NotFound(String),
    /// The point or disk could not be opened.
    #[error("mounting item `{item}`: {source}")]
    Store {
        /// The item.
        item: String,
        /// What the vault said.
        #[source]
        source: ferry_store::StoreError,
    },
    /// The overlay or the server could not be set up.
    #[error("mounting item `{item}`: {message}")]
    Serve {
        /// The item.
        item: String,
        /// What failed.
        message: String,
    },
}

/// What a mount serves and where.
#[derive(Debug, Clone)]
pub struct MountInfo {
    /// Its id (`m-` and 12 hex digits).
    pub id: String,
    /// The item.
    pub item: String,
    /// The point id.
    pub point: String,
    /// The disk.
    pub disk: String,
    /// The disk's size, bytes.
    pub size: u64,
    /// Whether writes are accepted (into the overlay).
    pub writable: bool,
    /// The export's name.
    pub export: String,
    /// Where it is served: `nbd://ADDR:PORT/EXPORT`.
    pub url: String,
    /// When it was made, Unix milliseconds.
    pub created_ms: u64,
}

struct Entry {
    info: MountInfo,
    /// Dropping it stops the server (its shutdown future completes).
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// The mounts served, by id.
pub struct Mounts {
    address: IpAddr,
    max: usize,
    cache_bytes: usize,
    overlay_dir: PathBuf,
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl std::fmt::Debug for Mounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounts")
            .field("address", &self.address)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

fn log(line: &str) {
    eprintln!("ferryd: nbd: {line}");
}

impl Mounts {
    /// Mounts served on `address`, at most `max`, each with a chunk cache of `cache_bytes`,
    /// writable ones with their overlay in `overlay_dir` (made when first needed).
    pub fn new(address: IpAddr, max: usize, cache_bytes: usize, overlay_dir: PathBuf) -> Self {
        Self {
            address,
            max,
            cache_bytes,
            overlay_dir,
            entries: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Serves `disk` (may be omitted when the point has one) of `item`'s point `point` until
    /// [`Mounts::stop`]. When the mounts listen on every address (`0.0.0.0`, `::`), the URL
    /// names `host` (the host the API was reached at) instead, if given.
    pub async fn start(
        &self,
        vault: &Vault,
        item: &str,
        point: &PointSelector,
        disk: Option<&str>,
        writable: bool,
        host: Option<&str>,
    ) -> Result<MountInfo, MountError> {
        if self.lock().len() >= self.max {
            return Err(MountError::TooMany(self.max));
        }
        let store = |source| MountError::Store {
            item: item.to_string(),
            source,
        };
        let serve = |message: String| MountError::Serve {
            item: item.to_string(),
            message,
        };
        // Points may have been written by another writer of the bucket (an offline `ferry
        // vault import`, another appliance): bring the local index up to the bucket first.
        for (segment, why) in vault.sync_index().await.map_err(store)? {
            eprintln!("ferryd: mount of item {item}: index segment {segment} unreadable: {why}");
        }
        let reader = vault
            .open_reader(
                item,
                point,
                disk,
                ReaderOptions {
                    cache_bytes: self.cache_bytes,
                    ..ReaderOptions::default()
                },
            )
            .await
            .map_err(store)?;
        let point_id = reader.point().id.clone();
        let disk = reader.disk().name.clone();
        let size = reader.size();
        let export = format!("{item}-{disk}");
        let base = Arc::new(reader);
        let e = if writable {
            std::fs::create_dir_all(&self.overlay_dir).map_err(|e| {
                serve(format!(
                    "creating the overlay directory {}: {e}",
                    self.overlay_dir.display()
                ))
            })?;
            Export::writable(&export, base, &self.overlay_dir)
        } else {
            Export::read_only(&export, base)
        }
        .map_err(|e| serve(e.to_string()))?
        .with_description(format!(
            "ferry recovery point {point_id} of item {item}, disk {disk}"
        ));
        let server = Server::bind(
            SocketAddr::new(self.address, 0),
            vec![e],
            ServerOptions {
                log,
                ..ServerOptions::default()
            },
        )
        .await
        .map_err(|e| serve(e.to_string()))?;
        let addr = server.local_addr().map_err(|e| serve(e.to_string()))?;
        let id = format!(
            "m-{}",
            hex::encode(ferry_store::crypto::random_bytes::<6>())
        );
        let info = MountInfo {
            id: id.clone(),
            item: item.to_string(),
            point: point_id,
            disk,
            size,
            writable,
            url: match host {
                Some(h) if addr.ip().is_unspecified() => {
                    format!("nbd://{h}:{}/{export}", addr.port())
                }
                _ => format!("nbd://{addr}/{export}"),
            },
            export,
            created_ms: ferry_store::point::now_ms(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        {
            let mut entries = self.lock();
            // Checked again: another mount may have been made meanwhile.
            if entries.len() >= self.max {
                return Err(MountError::TooMany(self.max));
            }
            entries.insert(
                id.clone(),
                Entry {
                    info: info.clone(),
                    _stop: stop,
                },
            );
        }
        let shown = info.url.clone();
        tokio::spawn(async move {
            if let Err(e) = server
                .run(async move {
                    let _ = stopped.await;
                })
                .await
            {
                eprintln!("ferryd: nbd: mount {id} ({shown}) stopped: {e}");
            }
        });
        eprintln!(
            "ferryd: mount {} serves point {} of item {} disk {} ({}) at {}",
            info.id,
            info.point,
            info.item,
            info.disk,
            if writable { "writable" } else { "read-only" },
            info.url
        );
        Ok(info)
    }

    /// The mounts served, by id.
    pub fn list(&self) -> Vec<MountInfo> {
        self.lock().values().map(|e| e.info.clone()).collect()
    }

    /// One mount.
    pub fn get(&self, id: &str) -> Result<MountInfo, MountError> {
        self.lock()
            .get(id)
            .map(|e| e.info.clone())
            .ok_or_else(|| MountError::NotFound(id.chars().take(64).collect()))
    }

    /// Stops mount `id`: the server stops accepting and closes its connections; a writable
    /// mount's overlay is discarded.
    pub fn stop(&self, id: &str) -> Result<MountInfo, MountError> {
        let e = self
            .lock()
            .remove(id)
            .ok_or_else(|| MountError::NotFound(id.chars().take(64).collect()))?;
        eprintln!("ferryd: mount {id} ({}) stopped", e.info.url);
        Ok(e.info)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// A mount answers the NBD handshake with its export's size; a second one is refused
    /// past the limit; a stopped mount's port no longer answers.
    #[tokio::test]
    async fn mounts_serve_until_stopped_and_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let vault = crate::testkit::memory_vault(dir.path()).await;
        let disk = dir.path().join("d.img");
        std::fs::write(&disk, vec![7u8; 256 << 10]).unwrap();
        vault
            .import(
                ferry_store::ImportOptions::full("web", &disk),
                Default::default(),
            )
            .await
            .unwrap();
        let m = Mounts::new(
            IpAddr::from([127, 0, 0, 1]),
            1,
            1 << 20,
            dir.path().join("mounts"),
        );
        let e = m
            .start(&vault, "nope", &PointSelector::Latest, None, false, None)
            .await
            .unwrap_err();
        assert!(matches!(e, MountError::Store { .. }), "{e}");
        let info = m
            .start(&vault, "web", &PointSelector::Latest, None, true, None)
            .await
            .unwrap();
        assert_eq!((info.size, info.writable), (256 << 10, true));
        assert_eq!(info.export, "web-disk0");
        let e = m
            .start(&vault, "web", &PointSelector::Latest, None, false, None)
            .await
            .unwrap_err();
        assert!(matches!(e, MountError::TooMany(1)), "{e}");
        let addr: SocketAddr = info
            .url
            .strip_prefix("nbd://")
            .and_then(|u| u.split('/').next())
            .unwrap()
            .parse()
            .unwrap();
        // The server's greeting: "NBDMAGIC" then "IHAVEOPT".
        let greeting = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            let mut b = [0u8; 16];
            s.read_exact(&mut b).unwrap();
            s.write_all(&[0, 0, 0, 3]).unwrap();
            b
        })
        .await
        .unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(m.list().len(), 1);
        m.stop(&info.id).unwrap();
        assert!(matches!(m.get(&info.id), Err(MountError::NotFound(_))));
        let mut refused = false;
        for _ in 0..100 {
            if std::net::TcpStream::connect(addr).is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(refused, "the stopped mount still accepts connections");
        assert!(matches!(m.stop(&info.id), Err(MountError::NotFound(_))));
    }
}
