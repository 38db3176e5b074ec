//! `ferry vault mount`: instant recovery. Serves one disk of a recovery point as an NBD
//! export (through `ferry-nbd`), read-only or writable with a copy-on-write overlay, so a
//! hypervisor boots the point before anything is copied. Offline like `ferry vault export`:
//! it opens the vault directly.
//!
//! It runs in the foreground until SIGINT or SIGTERM. The first line on stdout is for
//! scripts: the export's URL (`nbd://HOST:PORT/NAME`), or with `--json` one JSON object on one
//! line (`url`, `address`, `port`, `export`, `item`, `point`, `disk`, `size`, `writable`) — so
//! `--listen 127.0.0.1:0` can be used and the port read back. Hints for humans and the
//! server's log lines go to stderr.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use ferry_nbd::{Export, Server, ServerOptions};
use ferry_store::{PointSelector, ReaderOptions};
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

use super::{RepoArgs, human, line, open, parse_size};

/// Arguments of `ferry vault mount`.
#[derive(Args, Debug)]
pub(crate) struct MountArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Item.
    #[arg(long)]
    item: String,
    /// Which point: `latest`, `latest-app-consistent`, a time (RFC 3339, e.g.
    /// 2026-11-27T05:20:00Z: the newest point at or before it) or a point id.
    #[arg(long, default_value = "latest")]
    point: String,
    /// Disk name (needed when the point has several disks).
    #[arg(long, visible_alias = "disk-name")]
    disk: Option<String>,
    /// Address to serve NBD on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:10809", value_name = "ADDR")]
    listen: SocketAddr,
    /// Name of the export [default: `<item>-<disk>`]. Clients asking for the empty name get
    /// this export too.
    #[arg(long, value_name = "NAME")]
    export_name: Option<String>,
    /// Accept writes, kept in an overlay file in --overlay-dir (the point itself is never
    /// modified; the overlay is discarded when the server stops).
    #[arg(long, requires = "overlay_dir")]
    writable: bool,
    /// Directory of the writable overlay (a cache disk; the overlay is a sparse file as large
    /// as the disk, unlinked at once so nothing is left behind).
    #[arg(long, value_name = "DIR", requires = "writable")]
    overlay_dir: Option<PathBuf>,
    /// Memory for decoded chunks (LRU cache), e.g. 64M.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    cache_size: u64,
    /// Chunks fetched ahead of a sequential reader.
    #[arg(long, default_value_t = 8)]
    read_ahead: usize,
    /// Connections served at once.
    #[arg(long, default_value_t = 16)]
    max_connections: usize,
}

fn log(line: &str) {
    eprintln!("ferry: nbd: {line}");
}

/// Runs `ferry vault mount` until SIGINT or SIGTERM.
pub(crate) async fn run(a: MountArgs) -> Result<ExitCode> {
    // Signal handlers first: a signal arriving during the setup still stops the server.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    if a.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    let v = open(&a.repo).await?;
    let opts = ReaderOptions {
        cache_bytes: usize::try_from(a.cache_size).context("--cache-size is too large")?,
        read_ahead: a.read_ahead,
        ..ReaderOptions::default()
    };
    let reader = v
        .open_reader(
            &a.item,
            &PointSelector::parse(&a.point),
            a.disk.as_deref(),
            opts,
        )
        .await?;
    let point = reader.point().id.clone();
    let disk = reader.disk().name.clone();
    let size = reader.size();
    let name = a
        .export_name
        .clone()
        .unwrap_or_else(|| format!("{}-{disk}", a.item));
    let base = Arc::new(reader);
    let export = match &a.overlay_dir {
        Some(dir) if a.writable => Export::writable(&name, base, dir)?,
        _ => Export::read_only(&name, base)?,
    }
    .with_description(format!(
        "ferry recovery point {point} of item {}, disk {disk}",
        a.item
    ));
    let server = Server::bind(
        a.listen,
        vec![export],
        ServerOptions {
            max_connections: a.max_connections,
            log,
            ..ServerOptions::default()
        },
    )
    .await?;
    let addr = server.local_addr()?;
    let url = format!("nbd://{addr}/{name}");
    if a.repo.json {
        line(
            &json!({
                "url": url,
                "address": addr.ip().to_string(),
                "port": addr.port(),
                "export": name,
                "item": a.item,
                "point": point,
                "disk": disk,
                "size": size,
                "writable": a.writable,
            })
            .to_string(),
        );
    } else {
        line(&url);
    }
    let mode = match &a.overlay_dir {
        Some(dir) if a.writable => format!(
            "writable (writes go to an overlay in {}, discarded when the server stops)",
            dir.display()
        ),
        _ => "read-only".to_string(),
    };
    eprintln!(
        "ferry: serving point {point} of item {}, disk {disk} ({}), {mode}, as {url}",
        a.item,
        human(size)
    );
    eprintln!(
        "ferry: try `qemu-img convert -O raw {url} disk.raw`, boot it with \
         `qemu-system-x86_64 -drive file={url},format=raw`, or attach it with \
         `nbd-client -N {name} {} {} /dev/nbd0`; stop with Ctrl-C",
        addr.ip(),
        addr.port()
    );
    server
        .run(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
        .await?;
    eprintln!("ferry: NBD server stopped");
    Ok(ExitCode::SUCCESS)
}
