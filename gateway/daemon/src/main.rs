//! `ferryd`: the Ferry appliance daemon.
//!
//! - `ferryd up [--data-dir DIR] [--config FILE] [--listen ADDR:PORT]` brings the appliance
//!   up (creating everything on the first start) and serves the HTTPS API until SIGTERM or
//!   SIGINT, then drains and exits 0.
//! - `ferryd config check [--config FILE]` validates the effective configuration.
//! - `ferryd config show [--config FILE]` prints it as TOML.
//!
//! Exit status: 0 on success, 1 with one line on stderr naming what failed, 2 on a usage
//! error. Human output goes to stdout; the log (including the line
//! `ferryd: listening on https://ADDR:PORT`) to stderr.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use ferry_daemon::config::{Config, Overrides, Role};
use ferry_daemon::replication::{self, ProcessRole, StartReport};
use ferry_daemon::{api, appliance, server};
use tokio::signal::unix::{SignalKind, signal};

/// Jobs run at once (the control role's jobs are catalog and vault-metadata work).
const JOB_WORKERS: usize = 2;
/// How long running jobs get to end at shutdown.
const JOB_GRACE_SECS: u64 = 10;

#[derive(Parser, Debug)]
#[command(name = "ferryd", version, about = "Ferry appliance daemon")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Bring the appliance up and serve its API (creates everything on the first start).
    Up(UpArgs),
    /// Rebuild a lost appliance's data directory from its vault: the newest catalog snapshot
    /// there, read with the vault key (then `ferryd up` with the same configuration).
    RestoreAppliance(RestoreArgs),
    /// Check or show the configuration.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
}

#[derive(Args, Debug)]
struct Sources {
    /// Configuration file [default: /etc/ferry/ferry.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory [default: /var/lib/ferry as root, else ~/.local/share/ferry].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct UpArgs {
    #[command(flatten)]
    sources: Sources,
    /// Address and port to listen on (port 0: any free port) [default: 127.0.0.1:8443].
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Address and port of the data port agents replicate to (`process.listen`; port 0: any
    /// free port) [default: 127.0.0.1:9443].
    #[arg(long, value_name = "ADDR:PORT")]
    data_listen: Option<SocketAddr>,
}

#[derive(Args, Debug)]
struct RestoreArgs {
    #[command(flatten)]
    sources: Sources,
    /// The vault's location (`vault.url`): a directory, s3://bucket/prefix or
    /// az://container/prefix.
    #[arg(long, value_name = "URL")]
    repo: Option<String>,
    /// The vault's key file (`vault.key_file`).
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Validate the effective configuration: exit 0, or 1 with the error.
    Check(Sources),
    /// Print the effective configuration as TOML.
    Show(Sources),
}

/// Prints to stdout; a closed stdout is not an error worth dying for.
fn say(s: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(s.as_bytes());
    let _ = o.flush();
}

fn load(
    s: &Sources,
    listen: Option<SocketAddr>,
    data_listen: Option<SocketAddr>,
) -> Result<Config> {
    Ok(Config::load(
        s.config.as_deref(),
        &Overrides {
            data_dir: s.data_dir.clone(),
            listen,
            data_listen,
            ..Overrides::default()
        },
    )?)
}

async fn up(args: UpArgs) -> Result<()> {
    let cfg = load(&args.sources, args.listen, args.data_listen)?;
    let mut prepared = appliance::prepare(&cfg).await?;
    let listener = tokio::net::TcpListener::bind(cfg.api.listen)
        .await
        .map_err(|source| ferry_daemon::DaemonError::Listen {
            addr: cfg.api.listen,
            source,
        })?;
    let addr = listener.local_addr().context("reading the bound address")?;
    // Handlers are installed before anyone is told where to connect, so a prompt SIGTERM
    // is a clean stop, not a kill.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        eprintln!("ferryd: {which}: stopping (in-flight requests get up to the grace period)");
        let _ = stopping_tx.send(true);
        // A second signal means "now".
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            eprintln!("ferryd: second signal: exiting at once");
            std::process::exit(1);
        });
    };

    let limits = cfg.api.limits;
    let catalog = prepared.tokens.catalog().clone();
    let vaults = std::sync::Arc::new(std::mem::take(&mut prepared.vaults));
    // The process role: its cache is recovered (journals reopened, complete cycles queued
    // for draining) before the data port takes a session.
    let process = if cfg.roles.has(Role::Process) {
        let (role, report, drainer) = ProcessRole::start(
            &cfg,
            catalog.clone(),
            prepared.agents.clone(),
            vaults.clone(),
        )
        .await
        .context("starting the process role")?;
        if report != StartReport::default() {
            eprintln!(
                "ferryd: process cache {}: {} complete cycle(s) to drain, {} to resume, {} journal(s) removed, {} byte(s) of torn tail cut, {} damaged journal(s) set aside, {} stream(s) deferred",
                role.cache_dir().display(),
                report.pending_cycles,
                report.receiving_cycles,
                report.removed,
                report.truncated_bytes,
                report.damaged,
                report.deferred
            );
        }
        let listener = tokio::net::TcpListener::bind(cfg.process.listen)
            .await
            .map_err(|source| ferry_daemon::DaemonError::Listen {
                addr: cfg.process.listen,
                source,
            })?;
        let data_addr = listener
            .local_addr()
            .context("reading the data port's address")?;
        role.set_data_port(data_addr.port());
        let mut stop = stopping.clone();
        let serving = tokio::spawn(server::serve(
            listener,
            prepared.tls.server_config.clone(),
            replication::router(role.clone()),
            limits,
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ));
        Some((role, drainer, serving, data_addr))
    } else {
        None
    };

    say(&appliance::banner(
        &prepared,
        addr,
        process.as_ref().map(|p| p.3),
    ));
    if let Some((_, _, _, a)) = &process {
        eprintln!("ferryd: data port listening on {}", appliance::base_url(*a));
    }
    eprintln!("ferryd: listening on {}", appliance::base_url(addr));

    let target = if cfg.roles.has(Role::Target) {
        Some(ferry_daemon::jobs::TargetRole {
            dir: cfg.target_dir().context("the target role's directory")?,
            planned_timeout: std::time::Duration::from_secs(
                cfg.target.planned_failover_timeout_secs,
            ),
            location: match &cfg.target.location {
                Some(url) => Some(ferry_daemon::jobs::TargetLocation {
                    url: url.clone(),
                    options: cfg
                        .target_location_options()
                        .context("the target location's options")?,
                }),
                None => None,
            },
        })
    } else {
        None
    };
    let (runner, runner_tasks) =
        ferry_daemon::jobs::JobRunner::start(catalog.clone(), vaults.clone(), target, JOB_WORKERS)
            .context("starting the job runner")?;
    let (mirror_stop, mirror_rx) = tokio::sync::watch::channel(false);
    let (_mirror, mirror_task) =
        ferry_daemon::mirror::PointMirror::start(catalog.clone(), vaults.clone(), mirror_rx);
    let metrics = std::sync::Arc::new(ferry_daemon::metrics::Metrics::default());
    let snapshots = ferry_daemon::snapshot::Snapshotter::start(
        catalog.clone(),
        prepared.layout.dir.clone(),
        prepared.vault.0.clone(),
        vaults
            .get(&prepared.vault.0)
            .context("the configured vault is not open")?
            .clone(),
        metrics.clone(),
    );
    let mut state = api::ApiState::new(
        prepared.tokens,
        prepared.agents,
        vaults,
        Some(runner.clone()),
        metrics,
        usize::try_from(limits.max_body_bytes).unwrap_or(usize::MAX),
        &cfg.roles,
    )
    .with_target(&cfg.target)
    .with_mounts(std::sync::Arc::new(ferry_daemon::mounts::Mounts::new(
        cfg.target.nbd_address,
        usize::try_from(cfg.target.max_mounts).unwrap_or(1),
        usize::try_from(u64::from(cfg.target.mount_cache_mib) << 20).unwrap_or(64 << 20),
        cfg.target_dir()?.join("mounts"),
    )));
    if let Some((role, ..)) = &process {
        state = state.with_process(role.clone());
    }
    let report = server::serve(
        listener,
        prepared.tls.server_config,
        api::router(state),
        limits,
        shutdown,
    )
    .await;
    // Running jobs get JOB_GRACE_SECS to end; one still running after it stays `running` in
    // the catalog and is queued again at the next start.
    let busy = runner
        .shutdown(runner_tasks, std::time::Duration::from_secs(JOB_GRACE_SECS))
        .await;
    if busy > 0 {
        eprintln!("ferryd: {busy} job(s) did not end in time: they run again at the next start");
    }
    if let Some((role, drainer, serving, _)) = process {
        // Sessions end with `shutting_down` after their last acks; a drain in progress gets
        // the grace period, else it runs again from the journal at the next start.
        role.shutdown(drainer, limits.shutdown_grace()).await;
        let _ = serving.await;
    }
    let _ = mirror_stop.send(true);
    let _ = mirror_task.await;
    // The last changes go to the vault before the catalog closes.
    snapshots.shutdown().await;
    if report.dropped_at_shutdown > 0 {
        eprintln!(
            "ferryd: {} connection(s) still busy after the grace period were dropped",
            report.dropped_at_shutdown
        );
    }
    // Every request task is gone: this is the last handle, and dropping it closes the
    // catalog (each change was already committed durably).
    match std::sync::Arc::try_unwrap(catalog) {
        Ok(c) => drop(c),
        Err(_) => eprintln!("ferryd: the catalog is still in use by a finishing task"),
    }
    eprintln!(
        "ferryd: stopped ({} connection(s) served)",
        report.connections
    );
    Ok(())
}

async fn restore(args: RestoreArgs) -> Result<()> {
    let cfg = Config::load(
        args.sources.config.as_deref(),
        &Overrides {
            data_dir: args.sources.data_dir.clone(),
            vault_url: args.repo.clone(),
            vault_key_file: args.key_file.clone(),
            ..Overrides::default()
        },
    )?;
    let r = ferry_daemon::snapshot::restore_appliance(&cfg).await?;
    let mut out = format!(
        "ferryd: restored the appliance from snapshot {} (written {})\n",
        r.snapshot.0,
        ferry_store::point::rfc3339(r.snapshot.1)
    );
    for (table, n) in &r.counts {
        out.push_str(&format!("  {table}: {n} record(s)\n"));
    }
    if let Some(fp) = &r.ca_fingerprint {
        out.push_str(&format!(
            "  CA fingerprint: SHA256 {fp} (the same CA: clients and agents keep trusting it)\n"
        ));
    }
    let mut env = String::new();
    if let Some(u) = &args.repo {
        env.push_str(&format!("FERRY_VAULT__URL={} ", shell_word(u)));
    }
    if let Some(k) = &args.key_file {
        env.push_str(&format!(
            "FERRY_VAULT__KEY_FILE={} ",
            shell_word(&k.display().to_string())
        ));
    }
    out.push_str(&format!(
        "  a new admin token is in {} (the old ones work too)\n\nNext: start it with the same vault settings:\n  {env}ferryd up --data-dir {}{}\n",
        r.admin_token_file.display(),
        shell_word(&cfg.data_dir()?.display().to_string()),
        args.sources
            .config
            .as_deref()
            .map(|c| format!(" --config {}", shell_word(&c.display().to_string())))
            .unwrap_or_default(),
    ));
    say(&out);
    Ok(())
}

/// Quotes a word for a POSIX shell when it needs it.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:,@%=".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Up(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(up(args)),
        Cmd::RestoreAppliance(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(restore(args)),
        Cmd::Config {
            cmd: ConfigCmd::Check(s),
        } => {
            load(&s, None, None)?;
            say("configuration OK\n");
            Ok(())
        }
        Cmd::Config {
            cmd: ConfigCmd::Show(s),
        } => {
            let mut t = load(&s, None, None)?.effective()?.to_toml();
            if !t.ends_with('\n') {
                t.push('\n');
            }
            say(&t);
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferryd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
