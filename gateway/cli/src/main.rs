//! `ferry`: the command-line tool. It holds `ferry vault`, which works directly on a vault
//! with no daemon (offline seeding, export, verification), `ferry plugin`, which inspects and
//! runs WebAssembly plugins standalone, and the admin client of the appliance's REST API
//! (`ferry login|logout`, `ferry vault list`, `ferry point|policy|token …`, in [`api`]).
//!
//! Exit status: 0 on success, 1 on failure with one line on stderr naming what failed, 2 on a
//! usage error. `verify` exits 1 when it finds problems. The admin client adds 3 to 7 (see
//! [`api`]).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use ferry_store::{
    Backend, Consistency, ExportFormat, ExportOptions, FileUploadTuning, FormatOptions,
    ImportOptions, InitOptions, LocationExportOptions, OpenOptions, PointSelector, Progress,
    Secret, UploadTuning, Vault,
};
use serde_json::json;

mod adapted;
mod api;
mod ebs;
mod mount;
mod plugin;

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Ferry disaster recovery: command-line tool"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once per process; boxing would only obscure the clap definitions"
)]
enum Cmd {
    /// Work directly on a vault (no daemon needed), or list the appliance's vaults.
    Vault {
        #[command(subcommand)]
        cmd: VaultCmd,
    },
    /// Inspect and try out WebAssembly plugins (source adapters, failover hooks).
    Plugin {
        #[command(subcommand)]
        cmd: plugin::PluginCmd,
    },
    /// Log in to an appliance: pin its CA, check the token, save both for later commands.
    Login(api::LoginArgs),
    /// Forget the saved login.
    Logout(api::OutputArgs),
    /// Recovery points, through the appliance.
    Point {
        #[command(subcommand)]
        cmd: api::PointCmd,
    },
    /// Replication policies of the appliance.
    Policy {
        #[command(subcommand)]
        cmd: api::PolicyCmd,
    },
    /// Admin tokens of the appliance.
    Token {
        #[command(subcommand)]
        cmd: api::TokenCmd,
    },
    /// Protected items of the appliance (enable, disable, resync: each a job).
    Item {
        #[command(subcommand)]
        cmd: api::ItemCmd,
    },
    /// Enrolled agents and their one-time enrollment tokens.
    Agent {
        #[command(subcommand)]
        cmd: api::AgentCmd,
    },
    /// Replication groups: protected items failed over together.
    Group {
        #[command(subcommand)]
        cmd: api::GroupCmd,
    },
    /// Failover of protected items (target role): test, unplanned, commit, cleanup.
    Failover {
        #[command(subcommand)]
        cmd: api::FailoverCmd,
    },
    /// Jobs of the appliance, with their logs.
    Job {
        #[command(subcommand)]
        cmd: api::JobCmd,
    },
}

#[derive(Args, Debug, Clone)]
struct RepoArgs {
    /// Vault location: a directory, file:///dir, s3://bucket/prefix or az://container/prefix.
    #[arg(long, env = "FERRY_REPO")]
    repo: String,
    /// Backend option KEY=VALUE (e.g. endpoint=http://127.0.0.1:9000, allow_http=true);
    /// credentials belong in the environment (AWS_*, AZURE_*), not here.
    #[arg(long = "repo-option", value_name = "KEY=VALUE")]
    repo_options: Vec<String>,
    /// File holding the vault passphrase (or set FERRY_PASSPHRASE).
    #[arg(long, value_name = "FILE", conflicts_with = "key_file")]
    passphrase_file: Option<PathBuf>,
    /// Key file protecting the vault (at least 32 random bytes).
    #[arg(long, value_name = "FILE", env = "FERRY_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Directory of the local index cache [default: $XDG_CACHE_HOME/ferry or ~/.cache/ferry].
    #[arg(long, env = "FERRY_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Pack target size (e.g. 16M).
    #[arg(long, value_parser = parse_size, hide = true)]
    pack_size: Option<u64>,
    /// Upload objects larger than this in parts (e.g. 32M).
    #[arg(long, value_parser = parse_size, hide = true, env = "FERRY_MULTIPART_THRESHOLD")]
    multipart_threshold: Option<u64>,
    /// Part size of multipart uploads (at least 5M for S3).
    #[arg(long, value_parser = parse_size, hide = true, env = "FERRY_PART_SIZE")]
    part_size: Option<u64>,
    /// Hash/compress/encrypt worker threads [default: all cores].
    #[arg(long, hide = true)]
    workers: Option<usize>,
    /// Packs uploading at once.
    #[arg(long, hide = true)]
    uploads: Option<usize>,
}

#[derive(Subcommand, Debug)]
enum VaultCmd {
    /// List the appliance's vaults (over its API: needs `ferry login`).
    List(api::ListArgs),
    /// Create a new vault.
    Init {
        #[command(flatten)]
        repo: RepoArgs,
        /// Default chunk size of new disks: a power of two from 64K to 4M.
        #[arg(long, value_parser = parse_size)]
        chunk_size: Option<u64>,
    },
    /// Create a recovery point from a raw disk image or block device.
    Import {
        #[command(flatten)]
        repo: RepoArgs,
        /// Protected item (machine) name.
        #[arg(long)]
        item: String,
        /// Disk image (raw, or the --format's container) or block device.
        #[arg(
            long,
            required_unless_present = "snapshot",
            conflicts_with = "snapshot"
        )]
        disk: Option<PathBuf>,
        /// Where the disk comes from: `disk` (--disk) or `ebs` (--snapshot, read through the
        /// EBS direct APIs by the built-in `aws` adapter; credentials from AWS_ACCESS_KEY_ID /
        /// AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or the shared credentials file, signed by
        /// the host: the adapter never sees them).
        #[arg(long, default_value = "disk", value_parser = ["disk", "ebs"])]
        source: String,
        /// EBS snapshot id to import (with --source ebs).
        #[arg(long, value_name = "ID")]
        snapshot: Option<String>,
        /// Incremental EBS import: only the blocks that changed since this snapshot
        /// (ListChangedBlocks) are read; the rest comes from the item's latest point, which
        /// must be that snapshot's import.
        #[arg(
            long,
            value_name = "ID",
            requires = "snapshot",
            conflicts_with = "changes"
        )]
        base_snapshot: Option<String>,
        /// EBS endpoint (default: AWS_ENDPOINT_URL_EBS, AWS_ENDPOINT_URL, or
        /// https://ebs.REGION.amazonaws.com).
        #[arg(long, value_name = "URL", requires = "snapshot")]
        endpoint: Option<String>,
        /// AWS region (default: AWS_REGION, AWS_DEFAULT_REGION).
        #[arg(long, requires = "snapshot")]
        region: Option<String>,
        /// Read the disk through a built-in source adapter: auto (probe), raw, vmdk, vhdx or
        /// vhd. Without it the disk is a raw image read directly.
        #[arg(long, value_name = "FORMAT")]
        format: Option<String>,
        /// Name of the disk within the item.
        #[arg(long, default_value = "disk0")]
        disk_name: String,
        /// Changed areas since the item's latest point: only these are read; the rest comes
        /// from the previous point. vSphere CBT DiskChangeInfo JSON; with --format also
        /// Hyper-V RCT ranges (vhdx/vhd) or a ferry-checksums list (raw).
        #[arg(long, value_name = "FILE")]
        changes: Option<PathBuf>,
        /// Chunk size for a disk new to the vault: a power of two from 64K to 4M.
        #[arg(long, value_parser = parse_size)]
        chunk_size: Option<u64>,
        /// Mark the point application-consistent.
        #[arg(long)]
        app_consistent: bool,
        /// Tag KEY=VALUE recorded with the point.
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
    },
    /// List recovery points (read from the vault directly).
    Points {
        #[command(flatten)]
        repo: RepoArgs,
        /// Only this item.
        #[arg(long)]
        item: Option<String>,
    },
    /// Write a recovery point's disk out as a raw (sparse) image, a VHD fixed, a VHDX, a qcow2
    /// or a VMDK (monolithicSparse or streamOptimized). Zero chunks are never written; the
    /// file takes its name only once complete. With an object-store URL as --out, the export
    /// is staged locally and uploaded create-only (never replacing an object).
    Export {
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
        #[arg(long)]
        disk: Option<String>,
        /// Output file, or an object-store URL naming the object: s3://bucket/prefix/NAME,
        /// az://container/prefix/NAME or file:///dir/NAME (same syntax and credentials as
        /// --repo: AWS_*/AZURE_* variables or --out-option). A URL is exported to a staging
        /// file (the vault's cache directory, or --staging-dir) and uploaded in parts,
        /// create-only: an existing object is refused, a failed upload leaves no object.
        /// Object stores have no holes: a raw image is uploaded at its full size.
        #[arg(
            long,
            required_unless_present = "in_place",
            conflicts_with = "in_place"
        )]
        out: Option<PathBuf>,
        /// With an --out URL: the directory of the staging file (needs room for the export)
        /// [default: the vault's cache directory].
        #[arg(long, value_name = "DIR", conflicts_with = "in_place")]
        staging_dir: Option<PathBuf>,
        /// With an --out URL: an option of its location KEY=VALUE (as --repo-option, e.g.
        /// endpoint=…, allow_http=true); credentials belong in the environment.
        #[arg(
            long = "out-option",
            value_name = "KEY=VALUE",
            conflicts_with = "in_place"
        )]
        out_options: Vec<String>,
        /// Write the disk onto this existing file or block device instead, only the 4 KiB
        /// blocks that differ from what it holds (failback onto an original disk); raw only.
        #[arg(long, value_name = "TARGET")]
        in_place: Option<PathBuf>,
        /// Output format: `raw` (sparse image), `vhd` (VHD fixed, the format Azure accepts
        /// for uploaded disks), `vhdx` (dynamic, Hyper-V; blocks of the chunk size, at least
        /// 1 MiB), `qcow2` (version 3, 64 KiB clusters), `vmdk` (monolithicSparse, 64 KiB
        /// grains) or `vmdk-stream` (streamOptimized: compressed grains, for OVF/OVA and
        /// vSphere).
        #[arg(long, default_value = "raw", value_parser = parse_export_format)]
        format: ExportFormat,
        /// With --format vhd: Azure requires a virtual size that is a whole MiB, and a disk
        /// that is not is refused; with this flag its VHD is padded with zeros up to the next
        /// MiB instead (the guest sees a disk up to 1 MiB larger, its data unchanged).
        #[arg(long)]
        vhd_round_up: bool,
        /// Replace the output file if it exists.
        #[arg(long, visible_alias = "overwrite")]
        force: bool,
        /// Flush the image to stable storage (fsync) before giving it its final name.
        #[arg(long)]
        sync: bool,
    },
    /// Serve a recovery point's disk over NBD (instant recovery): a hypervisor boots it before
    /// anything is copied. Read-only, or --writable with a copy-on-write overlay; the point is
    /// never modified. Runs until SIGINT/SIGTERM; the first stdout line is the export's URL.
    Mount(mount::MountArgs),
    /// Check the vault; --read-data also decrypts every blob.
    Verify {
        #[command(flatten)]
        repo: RepoArgs,
        /// Download and authenticate every blob, recomputing every id.
        #[arg(long)]
        read_data: bool,
    },
    /// Recreate the local index cache from the bucket alone.
    RebuildIndex {
        #[command(flatten)]
        repo: RepoArgs,
    },
}

/// Makes glibc return every large buffer (packs, chunk windows) to the kernel when it is freed.
/// By default glibc raises its mmap threshold to the size of the largest block freed, after
/// which 16 MiB pack buffers come from the heap and stay resident: peak RSS then grows with the
/// length of an import instead of being bounded by the configured buffers.
fn bound_allocator() {
    #[allow(unsafe_code)]
    // SAFETY: mallopt only changes allocator tuning; it is called once, before any thread is
    // started, with a valid parameter and value.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn main() -> ExitCode {
    bound_allocator();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("ferry: error: {}", msg.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Parses `--format` of `ferry vault export`; an unknown or unsupported name is refused with
/// the list of formats.
fn parse_export_format(s: &str) -> Result<ExportFormat, String> {
    s.parse()
}

/// Parses `65536`, `64K`, `64KiB`, `1M`, `4MiB`, `2G`.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size"))?;
    let mul = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("`{s}`: unknown unit (use K, M or G)")),
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn secret(repo: &RepoArgs) -> Result<Secret> {
    if let Some(p) = &repo.key_file {
        let b =
            std::fs::read(p).with_context(|| format!("cannot read key file `{}`", p.display()))?;
        return Ok(Secret::KeyFile(b));
    }
    if let Some(p) = &repo.passphrase_file {
        let mut b = std::fs::read(p)
            .with_context(|| format!("cannot read passphrase file `{}`", p.display()))?;
        if b.last() == Some(&b'\n') {
            b.pop();
            if b.last() == Some(&b'\r') {
                b.pop();
            }
        }
        if b.is_empty() {
            bail!("passphrase file `{}` is empty", p.display());
        }
        return Ok(Secret::Passphrase(b));
    }
    match std::env::var_os("FERRY_PASSPHRASE") {
        Some(v) if !v.is_empty() => Ok(Secret::Passphrase(v.into_encoded_bytes())),
        _ => bail!(
            "no vault secret: set FERRY_PASSPHRASE, or pass --passphrase-file FILE or --key-file FILE"
        ),
    }
}

fn cache_dir(repo: &RepoArgs) -> Result<PathBuf> {
    if let Some(d) = &repo.cache_dir {
        return Ok(d.clone());
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("ferry"));
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".cache").join("ferry")),
        None => bail!("no cache directory: pass --cache-dir or set FERRY_CACHE_DIR"),
    }
}

fn backend(repo: &RepoArgs, create: bool) -> Result<Backend> {
    let mut opts = Vec::new();
    for kv in &repo.repo_options {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--repo-option `{kv}` is not KEY=VALUE"))?;
        opts.push((k.to_string(), v.to_string()));
    }
    let mut b = Backend::open(&repo.repo, &opts, create)?;
    let mut t = UploadTuning::default();
    if let Some(x) = repo.multipart_threshold {
        t.multipart_threshold = usize::try_from(x)?;
    }
    if let Some(x) = repo.part_size {
        t.part_size = usize::try_from(x)?;
    }
    b.set_tuning(t);
    Ok(b)
}

fn open_options(repo: &RepoArgs) -> Result<OpenOptions> {
    let mut o = OpenOptions::new(cache_dir(repo)?);
    if let Some(p) = repo.pack_size {
        o.tuning.pack_target = usize::try_from(p)?;
    }
    if let Some(w) = repo.workers {
        o.tuning.workers = w.max(1);
    }
    if let Some(u) = repo.uploads {
        o.tuning.uploads = u.max(1);
    }
    Ok(o)
}

async fn open(repo: &RepoArgs) -> Result<Vault> {
    let s = secret(repo)?;
    let b = backend(repo, false)?;
    let v = Vault::open(b, &s, open_options(repo)?).await?;
    for (name, why) in v.unreadable_segments() {
        eprintln!(
            "ferry: warning: index segment `{name}` is unreadable ({why}); \
             run `ferry vault rebuild-index`"
        );
    }
    Ok(v)
}

fn chunk_size_arg(v: Option<u64>) -> Result<Option<u32>> {
    v.map(|v| {
        let v = u32::try_from(v).map_err(|_| anyhow!("chunk size {v} is too large"))?;
        ferry_store::check_chunk_size(v).map_err(|e| anyhow!(e))?;
        Ok(v)
    })
    .transpose()
}

fn kv(list: &[String], what: &str) -> Result<Vec<(String, String)>> {
    list.iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("{what} `{s}` is not KEY=VALUE"))
        })
        .collect()
}

fn out(v: &serde_json::Value) {
    line(&serde_json::to_string_pretty(v).expect("JSON serialises"));
}

/// Prints one line on stdout; a closed pipe (`ferry … | head`) ends the process quietly.
fn line(s: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if writeln!(o, "{s}").is_err() {
        std::process::exit(0);
    }
}

fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Shows a progress bar on a terminal while `fut` runs.
async fn with_progress<T>(
    json: bool,
    label: &str,
    progress: Arc<Progress>,
    fut: impl std::future::Future<Output = T>,
) -> T {
    if json || !std::io::stderr().is_terminal() {
        return fut.await;
    }
    // Hidden until the total is known, so nothing flashes "0 B/0 B".
    let bar =
        indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::hidden());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    let p = progress.clone();
    let b = bar.clone();
    let ticker = tokio::spawn(async move {
        let mut shown = false;
        loop {
            let total = p.total.load(Ordering::Relaxed);
            if total > 0 && !shown {
                b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                shown = true;
            }
            b.set_length(total);
            b.set_position(p.done.load(Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let r = fut.await;
    ticker.abort();
    bar.finish_and_clear();
    r
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let cmd = match cli.cmd {
        Cmd::Vault {
            cmd: VaultCmd::List(a),
        } => return Ok(api::run(api::Command::VaultList(a)).await),
        Cmd::Vault { cmd } => cmd,
        Cmd::Plugin { cmd } => return plugin::run(cmd).await,
        Cmd::Login(a) => return Ok(api::run(api::Command::Login(a)).await),
        Cmd::Logout(a) => return Ok(api::run(api::Command::Logout(a)).await),
        Cmd::Point { cmd } => return Ok(api::run(api::Command::Point(cmd)).await),
        Cmd::Policy { cmd } => return Ok(api::run(api::Command::Policy(cmd)).await),
        Cmd::Token { cmd } => return Ok(api::run(api::Command::Token(cmd)).await),
        Cmd::Item { cmd } => return Ok(api::run(api::Command::Item(cmd)).await),
        Cmd::Job { cmd } => return Ok(api::run(api::Command::Job(cmd)).await),
        Cmd::Failover { cmd } => return Ok(api::run(api::Command::Failover(cmd)).await),
        Cmd::Agent { cmd } => return Ok(api::run(api::Command::Agent(cmd)).await),
        Cmd::Group { cmd } => return Ok(api::run(api::Command::Group(cmd)).await),
    };
    match cmd {
        VaultCmd::List(_) => unreachable!("handled above"),
        VaultCmd::Init { repo, chunk_size } => {
            let s = secret(&repo)?;
            let b = backend(&repo, true)?;
            let mut init = InitOptions::default();
            if let Some(cs) = chunk_size_arg(chunk_size)? {
                init.chunk_size = cs;
            }
            let v = Vault::init(b, &s, init, open_options(&repo)?).await?;
            if repo.json {
                out(
                    &json!({"vault_id": v.id(), "repo": repo.repo, "chunk_size": v.config().chunk_size}),
                );
            } else {
                line(&format!(
                    "created vault {} at {} (chunk size {})",
                    v.id(),
                    repo.repo,
                    human(u64::from(v.config().chunk_size))
                ));
            }
        }
        VaultCmd::Import {
            repo,
            item,
            disk,
            source,
            snapshot,
            base_snapshot,
            endpoint,
            region,
            format,
            disk_name,
            changes,
            chunk_size,
            app_consistent,
            mut tags,
        } => {
            let v = open(&repo).await?;
            let read_doc = |p: &std::path::Path| {
                std::fs::read(p).with_context(|| format!("cannot read --changes `{}`", p.display()))
            };
            let (changes, adapted, label) = match (source.as_str(), snapshot, disk) {
                ("ebs", Some(snapshot), None) => {
                    if format.is_some() {
                        bail!("--format is for --disk; an EBS snapshot is read by the aws adapter");
                    }
                    if let Some(base) = &base_snapshot {
                        // The unchanged blocks come from the latest point: it must be `base`.
                        let latest = v.point(&item, &PointSelector::Latest).await.with_context(
                            || {
                                format!(
                                    "--base-snapshot {base}: item `{item}` has no point to build on"
                                )
                            },
                        )?;
                        let imported = latest
                            .tags
                            .iter()
                            .find(|(k, _)| k == "ebs-snapshot")
                            .map(|(_, v)| v.as_str());
                        if imported != Some(base.as_str()) {
                            bail!(
                                "--base-snapshot {base}: the latest point of `{item}` ({}) was imported from {}, so blocks unchanged since {base} cannot be taken from it",
                                latest.id,
                                imported.map_or("no EBS snapshot".to_string(), |s| format!(
                                    "snapshot {s}"
                                ))
                            );
                        }
                    }
                    let doc = base_snapshot.as_deref().map(ebs::changes_since);
                    let ebs = ebs::EbsSource::resolve(ebs::EbsArgs {
                        snapshot: snapshot.clone(),
                        endpoint,
                        region,
                    })?;
                    let mut opened = adapted::open(adapted::Input::Ebs(ebs), doc).await?;
                    tags.push(format!("ebs-snapshot={snapshot}"));
                    if let Some(base) = &base_snapshot {
                        tags.push(format!("ebs-base-snapshot={base}"));
                    }
                    (
                        opened.changes.take(),
                        Some(opened),
                        PathBuf::from(format!("ebs:{snapshot}")),
                    )
                }
                ("disk", None, Some(disk)) => match &format {
                    Some(f) => {
                        let doc = changes.as_deref().map(read_doc).transpose()?;
                        let input = adapted::Input::File {
                            format: f,
                            path: &disk,
                        };
                        let mut opened = adapted::open(input, doc).await?;
                        (opened.changes.take(), Some(opened), disk)
                    }
                    None => match &changes {
                        Some(f) => {
                            let size = ferry_store::source::SourceDisk::open(&disk)?.size();
                            (
                                Some(ferry_store::changes::load_changes(f, size)?),
                                None,
                                disk,
                            )
                        }
                        None => (None, None, disk),
                    },
                },
                ("ebs", _, _) => bail!("--source ebs takes --snapshot ID, not --disk"),
                _ => bail!("--snapshot needs --source ebs"),
            };
            let mut o = ImportOptions::full(item, label);
            if let Some(a) = adapted {
                o.source = format!("import {} via {}", o.disk_path.display(), a.adapter);
                o.disk = Some(a.disk);
            }
            o.disk_name = disk_name;
            o.changes = changes;
            o.chunk_size = chunk_size_arg(chunk_size)?;
            o.consistency = if app_consistent {
                Consistency::App
            } else {
                Consistency::Crash
            };
            o.tags = kv(&tags, "--tag")?;
            let progress = Arc::new(Progress::default());
            let t0 = Instant::now();
            let r =
                with_progress(repo.json, "import", progress.clone(), v.import(o, progress)).await?;
            let secs = t0.elapsed().as_secs_f64();
            if repo.json {
                out(&json!({
                    "point": r.point.id,
                    "item": r.point.item,
                    "parent": r.point.parent,
                    "bytes_read": r.bytes_read,
                    "bytes_stored": r.bytes_stored,
                    "chunks": r.chunks,
                    "chunks_zero": r.chunks_zero,
                    "chunks_new": r.chunks_new,
                    "pages_written": r.pages_written,
                    "packs": r.packs,
                    "seconds": secs,
                }));
            } else {
                line(&r.point.id);
                #[allow(
                    clippy::cast_precision_loss,
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss
                )] // display only
                let rate = (r.bytes_read as f64 / secs.max(1e-9)) as u64;
                eprintln!(
                    "read {} in {secs:.1}s ({}/s), stored {} new ({} of {} chunks new, {} zero)",
                    human(r.bytes_read),
                    human(rate),
                    human(r.bytes_stored),
                    r.chunks_new,
                    r.chunks,
                    r.chunks_zero
                );
            }
        }
        VaultCmd::Points { repo, item } => {
            let v = open(&repo).await?;
            let points = v.points(item.as_deref()).await?;
            if repo.json {
                let arr: Vec<_> = points
                    .iter()
                    .map(|p| {
                        json!({
                            "item": p.item,
                            "point": p.id,
                            "created": ferry_store::point::rfc3339(p.created_ms),
                            "consistency": p.consistency.as_str(),
                            "parent": p.parent,
                            "source": p.source,
                            "disks": p.disks.iter().map(|d| json!({
                                "name": d.name, "size": d.size, "chunk_size": d.chunk_size,
                                "bytes_read": d.bytes_read, "bytes_stored": d.bytes_stored,
                            })).collect::<Vec<_>>(),
                            "tags": p.tags.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                        })
                    })
                    .collect();
                out(&serde_json::Value::Array(arr));
            } else {
                line(&format!(
                    "{:<20} {:<30} {:<24} {:<6} {:>10} {:>10}",
                    "ITEM", "POINT", "CREATED", "KIND", "SIZE", "STORED"
                ));
                for p in &points {
                    let size: u64 = p.disks.iter().map(|d| d.size).sum();
                    let stored: u64 = p.disks.iter().map(|d| d.bytes_stored).sum();
                    line(&format!(
                        "{:<20} {:<30} {:<24} {:<6} {:>10} {:>10}",
                        p.item,
                        p.id,
                        ferry_store::point::rfc3339(p.created_ms),
                        p.consistency.as_str(),
                        human(size),
                        human(stored)
                    ));
                }
            }
        }
        VaultCmd::Export {
            repo,
            item,
            point,
            disk,
            out: path,
            staging_dir,
            out_options,
            in_place,
            format,
            vhd_round_up,
            force,
            sync,
        } => {
            if vhd_round_up && format != ExportFormat::Vhd {
                bail!("--vhd-round-up applies only to --format vhd");
            }
            let v = open(&repo).await?;
            let progress = Arc::new(Progress::default());
            if let Some(target) = in_place {
                if format != ExportFormat::Raw || force {
                    bail!("--in-place writes a raw disk onto the target: no --format or --force");
                }
                let t0 = Instant::now();
                let r = with_progress(
                    repo.json,
                    "in place",
                    progress.clone(),
                    v.restore_in_place(
                        ferry_store::InPlaceOptions {
                            item,
                            point: PointSelector::parse(&point),
                            disk,
                            target: target.clone(),
                            sync,
                        },
                        progress,
                    ),
                )
                .await?;
                if repo.json {
                    out(&json!({
                        "point": r.point.id,
                        "disk": r.disk.name,
                        "size": r.disk.size,
                        "in_place": target,
                        "chunks_compared": r.chunks_compared,
                        "chunks_written": r.chunks_written,
                        "bytes_written": r.bytes_written,
                        "target_grown": r.target_grown,
                        "seconds": t0.elapsed().as_secs_f64(),
                    }));
                } else {
                    line(&format!(
                        "wrote {} disk {} onto {} in place: {} of {} chunks differed ({} written)",
                        r.point.id,
                        r.disk.name,
                        target.display(),
                        r.chunks_written,
                        r.chunks_compared,
                        human(r.bytes_written)
                    ));
                }
                return Ok(ExitCode::SUCCESS);
            }
            let path = path.context("--out is required")?;
            if let Some(url) = path.to_str().filter(|p| p.contains("://")) {
                if force || sync {
                    bail!(
                        "--force and --sync apply to a local file: an export to an object store \
                         never replaces an object (delete it first)"
                    );
                }
                let (location, object) = ferry_store::upload::split_location(url)?;
                let staging_dir = match staging_dir {
                    Some(d) => d,
                    None => v
                        .index_path()
                        .parent()
                        .map_or_else(|| PathBuf::from("."), std::path::Path::to_path_buf),
                };
                let o = LocationExportOptions {
                    item,
                    point: PointSelector::parse(&point),
                    disk,
                    format: FormatOptions {
                        format,
                        vhd_round_up,
                    },
                    object,
                    staging_dir,
                    upload: FileUploadTuning::default(),
                };
                let t0 = Instant::now();
                let r = with_progress(
                    repo.json,
                    "export",
                    progress.clone(),
                    v.export_to_location(
                        &location,
                        &kv(&out_options, "--out-option")?,
                        o,
                        progress,
                    ),
                )
                .await?;
                if repo.json {
                    out(&json!({
                        "point": r.point.id,
                        "disk": r.disk.name,
                        "size": r.disk.size,
                        "format": r.format.as_str(),
                        "out": r.url,
                        "object": r.object,
                        "bytes_uploaded": r.bytes_uploaded,
                        "chunks_written": r.chunks_written,
                        "reads": r.reads,
                        "seconds": t0.elapsed().as_secs_f64(),
                    }));
                } else {
                    line(&format!(
                        "exported {} disk {} ({}) as {} to {} ({} uploaded)",
                        r.point.id,
                        r.disk.name,
                        human(r.disk.size),
                        r.format,
                        r.url,
                        human(r.bytes_uploaded)
                    ));
                }
                return Ok(ExitCode::SUCCESS);
            }
            if staging_dir.is_some() || !out_options.is_empty() {
                bail!("--staging-dir and --out-option apply only to an object-store --out URL");
            }
            let o = ExportOptions {
                item,
                point: PointSelector::parse(&point),
                disk,
                out: path.clone(),
                overwrite: force,
                sync,
            };
            let t0 = Instant::now();
            let f = FormatOptions {
                format,
                vhd_round_up,
            };
            let r = with_progress(
                repo.json,
                "export",
                progress.clone(),
                v.export_as(o, f, progress),
            )
            .await?;
            if repo.json {
                out(&json!({
                    "point": r.point.id,
                    "disk": r.disk.name,
                    "size": r.disk.size,
                    "format": r.format.as_str(),
                    "out": path,
                    "chunks_written": r.chunks_written,
                    "reads": r.reads,
                    "seconds": t0.elapsed().as_secs_f64(),
                }));
            } else {
                line(&format!(
                    "exported {} disk {} ({}) as {} to {}",
                    r.point.id,
                    r.disk.name,
                    human(r.disk.size),
                    r.format,
                    path.display()
                ));
            }
        }
        VaultCmd::Mount(a) => return mount::run(a).await,
        VaultCmd::Verify { repo, read_data } => {
            let v = open(&repo).await?;
            let r = v.verify(read_data).await?;
            if repo.json {
                out(&json!({
                    "ok": r.is_ok(),
                    "points": r.points,
                    "pages": r.pages,
                    "chunk_refs": r.chunk_refs,
                    "packs": r.packs,
                    "blobs_read": r.blobs_read,
                    "unindexed_packs": r.unindexed_packs,
                    "problems": r.problems.iter().map(|p| json!({
                        "object": p.object, "problem": p.problem, "affected": p.affected,
                    })).collect::<Vec<_>>(),
                }));
            } else {
                line(&format!(
                    "checked {} points, {} pages, {} chunk references, {} packs{}",
                    r.points,
                    r.pages,
                    r.chunk_refs,
                    r.packs,
                    if read_data {
                        format!(", {} blobs decrypted", r.blobs_read)
                    } else {
                        String::new()
                    }
                ));
                if r.unindexed_packs > 0 {
                    line(&format!(
                        "{} packs are not indexed (left by interrupted imports; harmless)",
                        r.unindexed_packs
                    ));
                }
                for p in &r.problems {
                    let affected = if p.affected.is_empty() {
                        "no recovery point".to_string()
                    } else {
                        p.affected.iter().cloned().collect::<Vec<_>>().join(", ")
                    };
                    line(&format!(
                        "PROBLEM {}: {} — affects {affected}",
                        p.object, p.problem
                    ));
                }
            }
            if !r.is_ok() {
                let points: std::collections::BTreeSet<&String> =
                    r.problems.iter().flat_map(|p| p.affected.iter()).collect();
                eprintln!(
                    "ferry: error: verify found {} problems affecting {} recovery points",
                    r.problems.len(),
                    points.len()
                );
                return Ok(ExitCode::FAILURE);
            }
        }
        VaultCmd::RebuildIndex { repo } => {
            let v = open(&repo).await?;
            let r = v.rebuild_index().await?;
            if repo.json {
                out(&json!({
                    "packs": r.packs, "blobs": r.blobs, "segments": r.segments,
                    "repaired": r.repaired,
                    "unreadable": r.unreadable.iter().map(|(o, e)| json!({"object": o, "error": e})).collect::<Vec<_>>(),
                }));
            } else {
                line(&format!(
                    "rebuilt index: {} packs, {} blobs, {} segments{}",
                    r.packs,
                    r.blobs,
                    r.segments,
                    if r.repaired > 0 {
                        format!(", {} packs were in no segment (now listed)", r.repaired)
                    } else {
                        String::new()
                    }
                ));
                for (o, e) in &r.unreadable {
                    eprintln!("unreadable: {o}: {e}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("x").is_err());
        assert!(parse_size("1T").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
