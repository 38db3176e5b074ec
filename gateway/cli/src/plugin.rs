//! `ferry plugin …`: what plugin authors (and operators vetting a plugin) run before a plugin is
//! installed. `inspect` reads a component's type without running it; `run` drives a source
//! adapter over a disk image and writes the raw virtual disk it exposes; `run-hook` runs a
//! failover hook once with a given context. All three use the same host, sandbox and limits as
//! the gateway.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use ferry_plugin_host::{
    ExtentKind, FileSource, Grants, HookContext, HookOutcome, HostConfig, LoadedPlugin, Manifest,
    PlanKv, PluginHost, World,
};
use serde_json::json;

#[derive(Subcommand, Debug)]
pub enum PluginCmd {
    /// Show a component's world, version and imports, and the grants it needs (runs nothing).
    Inspect {
        /// Component file, or `builtin:NAME`.
        plugin: String,
        #[arg(long)]
        json: bool,
    },
    /// Run a source adapter over a disk and write the raw virtual disk it exposes.
    Run {
        /// Component file, `builtin:NAME`, or `auto` (the first built-in adapter whose probe
        /// accepts the disk; a fixed VHD, whose footer is at its end, needs `builtin:hyperv`).
        plugin: String,
        /// The disk image or block device handed to the adapter.
        #[arg(long, value_name = "PATH")]
        disk: PathBuf,
        /// Where to write the raw virtual disk (a regular file; created sparse).
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
        /// A change-tracking document: only the extents it names are read and written into
        /// an existing --out (the previous copy).
        #[arg(long, value_name = "FILE")]
        changes: Option<PathBuf>,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Run a failover hook once.
    RunHook {
        /// Component file, or `builtin:NAME`.
        plugin: String,
        /// The hook context as JSON, or @FILE.
        #[arg(long, value_name = "JSON|@FILE")]
        context: String,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Make the physical adapter's checksum list of a disk (its change document for the next
    /// `run --changes`).
    Checksums {
        #[arg(long, value_name = "PATH")]
        disk: PathBuf,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Block size (power of two, 4K..64M).
        #[arg(long, default_value = "1M", value_parser = crate::parse_size)]
        block_size: u64,
    },
    /// List the plugins built into this binary, and those of a plugin directory (each
    /// `*.toml` manifest there is checked and loaded as the gateway would).
    List {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct CommonArgs {
    /// Grant a capability: http=HOST[,HOST] (hooks) or related=PATTERN[,PATTERN] (adapters).
    /// The harmless ones are granted without asking: `run` gets source, log, config and clock;
    /// `run-hook` gets log, config, clock and a fresh kv.
    #[arg(long = "grant", value_name = "CAPABILITY")]
    grants: Vec<String>,
    /// Plugin configuration KEY=VALUE (the manifest's [config]).
    #[arg(long = "config", value_name = "KEY=VALUE")]
    config: Vec<String>,
    /// Memory limit per instance, MiB.
    #[arg(long, default_value_t = 64)]
    memory_mib: u64,
    /// Deadline per call, milliseconds.
    #[arg(long, default_value_t = 30_000)]
    deadline_ms: u64,
    /// Fuel per call (turns fuel metering on).
    #[arg(long)]
    fuel: Option<u64>,
    /// Also print the SHA-256 of the whole virtual disk (`run`).
    #[arg(long)]
    sha256: bool,
    /// fsync the output file before exiting (`run`; like `qemu-img convert`, the default
    /// leaves writeback to the kernel).
    #[arg(long)]
    sync: bool,
    /// Plugin instances reading in parallel (`run`) [default: CPUs, at most 4].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: Option<u16>,
    /// Directory of compiled components [default: <cache dir>/plugins].
    #[arg(long, env = "FERRY_PLUGIN_CACHE", value_name = "DIR")]
    plugin_cache: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub(crate) fn default_cache() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("FERRY_CACHE_DIR").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(d).join("plugins"));
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(x).join("ferry/plugins"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|h| PathBuf::from(h).join(".cache/ferry/plugins"))
}

fn host(cache: Option<PathBuf>, fuel: bool) -> Result<PluginHost> {
    Ok(PluginHost::new(HostConfig {
        cache_dir: cache.or_else(default_cache),
        fuel,
        ..HostConfig::default()
    })?)
}

/// A component to run: its display name, bytes, and the built-in it is, if any.
type Component = (String, Vec<u8>, Option<ferry_builtin_plugins::Builtin>);

/// The component bytes and a display name for `FILE` or `builtin:NAME`.
fn component(spec: &str) -> Result<Component> {
    if let Some(name) = spec.strip_prefix("builtin:") {
        let b = ferry_builtin_plugins::get(name).with_context(|| {
            let names: Vec<_> = ferry_builtin_plugins::ALL.iter().map(|b| b.name).collect();
            format!(
                "no built-in plugin `{name}` (built in: {})",
                names.join(", ")
            )
        })?;
        return Ok((b.name.to_string(), b.wasm.to_vec(), Some(b)));
    }
    let path = Path::new(spec);
    let wasm = std::fs::read(path).with_context(|| format!("cannot read component `{spec}`"))?;
    let name: String = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    Ok((
        if name.is_empty() {
            "plugin".into()
        } else {
            name
        },
        wasm,
        None,
    ))
}

fn manifest(
    name: &str,
    world: World,
    builtin: Option<ferry_builtin_plugins::Builtin>,
    common: &CommonArgs,
    implied: &[&str],
) -> Result<Manifest> {
    let mut m = Manifest::new(name, world);
    let mut g = Grants::default();
    // A built-in keeps the related-file patterns of its formats.
    if let Some(b) = builtin.filter(|b| !b.related.is_empty()) {
        g.add_cli(&format!("related={}", b.related.join(",")))?;
    }
    for spec in implied
        .iter()
        .copied()
        .chain(common.grants.iter().map(String::as_str))
    {
        g.add_cli(spec)?;
    }
    m.grants = g;
    let mut config = BTreeMap::new();
    for kv in &common.config {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--config `{kv}` is not KEY=VALUE"))?;
        config.insert(k.to_string(), v.to_string());
    }
    m.config = config;
    m.limits.memory_mib = common.memory_mib;
    m.limits.deadline_ms = common.deadline_ms;
    m.limits.fuel = common.fuel;
    if let Err(e) = m.validate() {
        bail!("{e}");
    }
    Ok(m)
}

fn print(v: &serde_json::Value) {
    #[allow(clippy::print_stdout)]
    {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
}

fn say(s: &str) {
    #[allow(clippy::print_stdout)]
    {
        println!("{s}");
    }
}

pub async fn run(cmd: PluginCmd) -> Result<ExitCode> {
    match cmd {
        PluginCmd::Checksums {
            disk,
            out,
            block_size,
        } => {
            let f = std::fs::File::open(&disk)
                .with_context(|| format!("cannot open --disk `{}`", disk.display()))?;
            let list = tokio::task::spawn_blocking(move || {
                ferry_plugin_physical::checksum_list(&f, block_size)
            })
            .await?
            .map_err(|e| anyhow::anyhow!("checksum list of `{}`: {e}", disk.display()))?;
            std::fs::write(&out, list)
                .with_context(|| format!("cannot write --out `{}`", out.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        PluginCmd::List { dir, json } => {
            let mut list: Vec<_> = ferry_builtin_plugins::ALL
                .iter()
                .map(|b| {
                    json!({"name": format!("builtin:{}", b.name), "world": b.world.as_str(),
                           "description": b.description, "size": b.wasm.len(), "ok": true})
                })
                .collect();
            let mut failed = false;
            if let Some(dir) = dir {
                let h = host(None, false)?;
                for (path, loaded) in h.load_dir(&dir)? {
                    list.push(match loaded {
                        Ok(p) => json!({"name": p.name(), "world": p.manifest().world.as_str(),
                                        "version": p.manifest().version, "sha256": p.sha256(),
                                        "manifest": path, "ok": true}),
                        Err(e) => {
                            failed = true;
                            json!({"manifest": path, "ok": false, "error": e.to_string()})
                        }
                    });
                }
            }
            if json {
                print(&json!(list));
            } else {
                for p in &list {
                    if p["ok"] == true {
                        say(&format!(
                            "{:<20} {:<15} {}",
                            p["name"].as_str().unwrap_or(""),
                            p["world"].as_str().unwrap_or(""),
                            p["description"]
                                .as_str()
                                .or(p["manifest"].as_str())
                                .unwrap_or("")
                        ));
                    } else {
                        say(&format!(
                            "REFUSED {}: {}",
                            p["manifest"].as_str().unwrap_or(""),
                            p["error"].as_str().unwrap_or("")
                        ));
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        PluginCmd::Inspect { plugin, json } => {
            let (name, wasm, _) = component(&plugin)?;
            let h = host(None, false)?;
            let (s, sha) = h.inspect(&wasm)?;
            let accepted = s
                .wit_version
                .as_deref()
                .is_some_and(ferry_plugin_host::wit_version_accepted);
            if json {
                print(&json!({
                    "name": name,
                    "sha256": sha,
                    "size": wasm.len(),
                    "world": s.world.map(|w| w.as_str()),
                    "wit_version": s.wit_version,
                    "accepted_by_this_host": accepted,
                    "host_wit_version": ferry_plugin_host::HOST_WIT_VERSION,
                    "imports": s.imports,
                    "exports": s.exports,
                    "needs_grants": s.needs,
                }));
            } else {
                say(&format!("component   {plugin} ({} bytes)", wasm.len()));
                say(&format!("sha256      {sha}"));
                say(&format!(
                    "world       {}",
                    s.world.map_or("none (not a Ferry plugin)", |w| w.as_str())
                ));
                say(&format!(
                    "wit         ferry:plugin@{} ({} by this host, which implements {})",
                    s.wit_version.as_deref().unwrap_or("?"),
                    if accepted { "accepted" } else { "NOT accepted" },
                    ferry_plugin_host::HOST_WIT_VERSION
                ));
                say("imports");
                for i in &s.imports {
                    let what = match (i.capability, i.functions.is_empty()) {
                        (_, true) => "types only, no grant needed".to_string(),
                        (Some(c), false) => format!("needs grant `{c}`"),
                        (None, false) => "NEVER granted (not a ferry:plugin capability)".into(),
                    };
                    say(&format!("  {:<32} {what}", i.name));
                    if !i.functions.is_empty() {
                        say(&format!("  {:<32}   {}", "", i.functions.join(", ")));
                    }
                }
                say("exports");
                for e in &s.exports {
                    say(&format!("  {e}"));
                }
                say(&format!(
                    "needs       {}",
                    if s.needs.is_empty() {
                        "no grants".to_string()
                    } else {
                        s.needs.join(", ")
                    }
                ));
            }
            Ok(ExitCode::SUCCESS)
        }
        PluginCmd::Run {
            plugin,
            disk,
            out,
            changes,
            common,
        } => run_adapter(&plugin, &disk, &out, changes.as_deref(), &common).await,
        PluginCmd::RunHook {
            plugin,
            context,
            common,
        } => {
            let text = match context.strip_prefix('@') {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read context file `{f}`"))?,
                None => context,
            };
            let ctx: HookContext =
                serde_json::from_str(&text).context("--context is not a valid hook context")?;
            let (name, wasm, builtin) = component(&plugin)?;
            let h = host(common.plugin_cache.clone(), common.fuel.is_some())?;
            let p = h.load(
                manifest(
                    &name,
                    World::FailoverHook,
                    builtin,
                    &common,
                    &["log", "config", "clock", "kv"],
                )?,
                &wasm,
            )?;
            let kv = PlanKv::new();
            let started = Instant::now();
            let outcome = h.run_hook(&p, &ctx, &kv).await?;
            let vetoes = outcome.vetoes(ctx.phase);
            let (kind, message) = match &outcome {
                HookOutcome::Proceed => ("proceed", None),
                HookOutcome::Skip(m) => ("skip", Some(m.as_str())),
                HookOutcome::Abort(m) => ("abort", Some(m.as_str())),
            };
            if common.json {
                let kv: BTreeMap<_, _> = kv
                    .entries()
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                    .collect();
                print(
                    &json!({"outcome": kind, "message": message, "vetoes": vetoes,
                              "elapsed_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "kv": kv}),
                );
            } else {
                say(&format!(
                    "{kind}{}{}",
                    message.map(|m| format!(": {m}")).unwrap_or_default(),
                    if vetoes { " (vetoes the plan)" } else { "" }
                ));
            }
            Ok(if vetoes {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// The previous copy an incremental run writes into.
fn open_previous(out: &Path) -> Result<std::fs::File> {
    if let Ok(m) = std::fs::metadata(out)
        && !m.is_file()
    {
        bail!("--out `{}` exists and is not a regular file", out.display());
    }
    let mut o = std::fs::OpenOptions::new();
    o.write(true).read(true);
    o.open(out)
        .with_context(|| format!("cannot open --out `{}`", out.display()))
}

async fn run_adapter(
    plugin: &str,
    disk: &Path,
    out: &Path,
    changes: Option<&Path>,
    common: &CommonArgs,
) -> Result<ExitCode> {
    let h = host(common.plugin_cache.clone(), common.fuel.is_some())?;
    let (name, wasm, builtin) = if plugin == "auto" {
        let b = crate::adapted::probe(&h, disk).await?;
        (b.name.to_string(), b.wasm.to_vec(), Some(b))
    } else {
        component(plugin)?
    };
    let p: LoadedPlugin = h.load(
        manifest(
            &name,
            World::SourceAdapter,
            builtin,
            common,
            &["source", "log", "config", "clock"],
        )?,
        &wasm,
    )?;
    let started = Instant::now();
    let Some(doc_path) = changes else {
        let object = FileSource::open(disk)
            .with_context(|| format!("cannot open --disk `{}`", disk.display()))?;
        let r = ferry_plugin_host::harness::run_adapter_on(
            &h,
            &p,
            Arc::new(object),
            Some(out),
            ferry_plugin_host::harness::RunOptions {
                hash: common.sha256,
                sync: common.sync,
                workers: common.workers.map_or_else(
                    || ferry_plugin_host::harness::RunOptions::default().workers,
                    usize::from,
                ),
            },
        )
        .await?;
        let secs = started.elapsed().as_secs_f64();
        let data_extents = r
            .extents
            .iter()
            .filter(|e| e.kind == ExtentKind::Data)
            .count();
        if common.json {
            print(&json!({
                "plugin": name, "disk": r.disk, "extents": r.extents.len(),
                "data_extents": data_extents, "bytes_read": r.bytes_read,
                "bytes_skipped": r.bytes_skipped, "bytes_copied": r.bytes_copied, "sha256": r.sha256, "seconds": secs,
                "dropped_log_lines": r.dropped_log_lines, "out": out,
            }));
        } else {
            say(&format!(
                "{name}: {} disk of {} bytes ({} extents, {data_extents} with data); read {} bytes{}, skipped {} unallocated/zero, in {secs:.2} s; wrote {}{}",
                r.disk.format,
                r.disk.virtual_size,
                r.extents.len(),
                r.bytes_read,
                if r.bytes_copied > 0 {
                    format!(" ({} copied by the kernel)", r.bytes_copied)
                } else {
                    String::new()
                },
                r.bytes_skipped,
                out.display(),
                r.sha256
                    .as_deref()
                    .map(|h| format!(" (sha256 {h})"))
                    .unwrap_or_default()
            ));
            if r.dropped_log_lines > 0 {
                say(&format!(
                    "({} plugin log lines were dropped by the rate limit)",
                    r.dropped_log_lines
                ));
            }
        }
        return Ok(ExitCode::SUCCESS);
    };

    // Incremental: only the extents the change document names are read, into the previous
    // copy.
    let object = FileSource::open(disk)
        .with_context(|| format!("cannot open --disk `{}`", disk.display()))?;
    let mut d = h.open_disk(&p, Arc::new(object)).await?;
    let size = d.info().virtual_size;
    let doc = std::fs::read(doc_path)
        .with_context(|| format!("cannot read --changes `{}`", doc_path.display()))?;
    let file = open_previous(out)?;
    let have = file.metadata()?.len();
    if have != size {
        bail!(
            "--out `{}` holds {have} bytes but the disk is {size} bytes: it is not the previous copy",
            out.display()
        );
    }
    let work = d.changes(&doc).await?;
    const PIECE: usize = 1 << 20;
    let zeros = vec![0u8; PIECE];
    let mut buf = vec![0u8; PIECE];
    let mut bytes = 0u64;
    for e in &work {
        let mut pos = e.offset;
        while pos < e.end() {
            let n = usize::try_from((e.end() - pos).min(PIECE as u64))?;
            if e.kind == ExtentKind::Data {
                d.read_into(pos, &mut buf[..n]).await?;
                file.write_all_at(&buf[..n], pos)?;
            } else {
                // The previous copy may hold data there.
                file.write_all_at(&zeros[..n], pos)?;
            }
            bytes += n as u64;
            pos += n as u64;
        }
    }
    file.sync_all()?;
    let secs = started.elapsed().as_secs_f64();
    if common.json {
        print(&json!({
            "plugin": name, "disk": d.info(), "changed_extents": work.len(),
            "bytes_read": bytes, "seconds": secs, "dropped_log_lines": d.dropped_log_lines(),
            "out": out,
        }));
    } else {
        say(&format!(
            "{name}: {} changed extents, {bytes} bytes read and written into {} in {secs:.2} s",
            work.len(),
            out.display()
        ));
    }
    Ok(ExitCode::SUCCESS)
}
