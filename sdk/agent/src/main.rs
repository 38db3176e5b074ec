//! The `ferry-agent` binary: flags in, one of the library's commands run, its result printed.
//! Exit status: 0 done, 1 usage or other failure, 3 gateway unreachable or TLS refused,
//! 4 refused by the gateway (401/403, `forbidden`), 5 local state problem (see
//! `ferry_agent::error`). Errors are one line on stderr: `ferry-agent: <message>`. `sync
//! --once` exits with the status of the first disk that failed (the others still ran).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_agent::disks::{self, DiskConfig, SnapshotMode};
use ferry_agent::enroll::{self, EnrollArgs, Token};
use ferry_agent::error::EXIT_OTHER;
use ferry_agent::session::{Stop, StopHandle};
use ferry_agent::state::{DEFAULT_DIR, DIR_ENV};
use ferry_agent::sync::{self, SyncArgs};
use ferry_agent::{AgentError, status};
use ferry_proto::trust::Fingerprint;

/// Ferry's agent on a protected machine.
#[derive(Parser, Debug)]
#[command(name = "ferry-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Enroll this machine with a gateway: make a key, get a certificate for it with a
    /// one-time token (`ferry agent token create` prints the whole command), save both.
    Enroll(EnrollCli),
    /// Check the enrollment: send a heartbeat, then show the gateway's record of this agent
    /// and its protected items.
    Status(StatusCli),
    /// Replicate now: one cycle of each configured disk (or those selected), then exit.
    Sync(SyncCli),
    /// The service: a cycle of every configured disk on the gateway's interval, until
    /// SIGTERM or ctrl-c.
    Run(RunCli),
    /// The disks to replicate: which local path is which disk of which item.
    #[command(subcommand)]
    Disk(DiskCmd),
}

#[derive(Args, Debug)]
struct StateDirArg {
    /// The state directory (created 0700).
    #[arg(long, value_name = "DIR", env = DIR_ENV, default_value = DEFAULT_DIR)]
    state_dir: PathBuf,
}

#[derive(Args, Debug)]
struct EnrollCli {
    /// The gateway's URL, `https://host:port`.
    #[arg(long, value_name = "URL")]
    gateway: String,
    /// The one-time enrollment token (never printed). Prefer `FERRY_AGENT_TOKEN` (what
    /// `ferry agent token create` prints): a command line is readable by every local user.
    /// Tokens are base64url and may start with `-`; such a value is taken as the token.
    #[arg(
        long,
        value_name = "TOKEN",
        allow_hyphen_values = true,
        value_parser = Token::from_arg,
        env = "FERRY_AGENT_TOKEN",
        hide_env_values = true
    )]
    token: Token,
    /// The appliance CA's SHA-256 fingerprint, as `ferryd up` prints it; the only CA trusted.
    #[arg(long, value_name = "SHA256", value_parser = Fingerprint::parse)]
    ca_fingerprint: Fingerprint,
    #[command(flatten)]
    dir: StateDirArg,
    /// Replace an existing enrollment in the state directory.
    #[arg(long)]
    force: bool,
    /// A disk to replicate: ITEM/DISK=PATH (a raw block device or image file, read live;
    /// `ferry-agent disk add` sets a snapshot method). Repeatable.
    #[arg(long = "disk", value_name = "ITEM/DISK=PATH", value_parser = disks::parse_disk_arg)]
    disks: Vec<DiskConfig>,
}

#[derive(Args, Debug)]
struct SyncCli {
    /// One cycle, then exit (required: the long-running mode is `ferry-agent run`).
    #[arg(long, required = true)]
    once: bool,
    /// Only the disks of this protected item.
    #[arg(long, value_name = "ITEM")]
    item: Option<String>,
    /// Only the disks of this name.
    #[arg(long, value_name = "DISK")]
    disk: Option<String>,
    #[command(flatten)]
    dir: StateDirArg,
    /// Output format: `table` (one line per disk), `json` (one JSON object per disk and line).
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Seconds to wait for the gateway to confirm the recovery point after it acknowledged
    /// the cycle (0: do not wait).
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    commit_timeout: u64,
}

#[derive(Args, Debug)]
struct RunCli {
    #[command(flatten)]
    dir: StateDirArg,
}

#[derive(Subcommand, Debug)]
enum DiskCmd {
    /// Add a disk: ITEM's disk DISK is read from PATH.
    Add(DiskAddCli),
    /// List the configured disks.
    List(DiskListCli),
    /// Remove a disk's configuration (its replication state stays).
    Remove(DiskRemoveCli),
}

#[derive(Args, Debug)]
struct DiskAddCli {
    /// The protected item.
    item: String,
    /// The disk's name in the item.
    disk: String,
    /// The raw block device or image file, absolute.
    path: std::path::PathBuf,
    /// How the file is read: raw (the bytes are the disk), or a container read through its
    /// built-in source adapter: vmdk, vhdx, vhd; auto probes now and records what it found.
    #[arg(long, value_name = "FORMAT", default_value = "raw")]
    format: String,
    /// The command that prints a delta's change document (VMware CBT for vmdk, Hyper-V RCT
    /// for vhdx/vhd, a ferry-checksums list for raw); run with FERRY_ITEM, FERRY_DISK,
    /// FERRY_DISK_PATH, FERRY_VIEW, FERRY_FORMAT, FERRY_CYCLE and FERRY_BASE_CYCLE set.
    /// Without it every allocated chunk is read and compared. Pass secrets in files or the
    /// environment, not in the command line (`disk list` shows it).
    #[arg(long, value_name = "CMD", value_parser = argv, allow_hyphen_values = true)]
    changes: Option<Argv>,
    /// How the point-in-time view is taken: none, reflink, lvm, quiesce.
    #[arg(long, value_name = "METHOD", default_value = "none", value_parser = SnapshotMode::parse)]
    snapshot: SnapshotMode,
    /// lvm: the snapshot's size (`10%ORIGIN`, `20G`).
    #[arg(long, value_name = "SIZE")]
    lvm_size: Option<String>,
    /// quiesce: the command run before reading (words, or a JSON array of strings).
    #[arg(long, value_name = "CMD", value_parser = argv, allow_hyphen_values = true)]
    pre_snapshot: Option<Argv>,
    /// quiesce: the command run after reading, always.
    #[arg(long, value_name = "CMD", value_parser = argv, allow_hyphen_values = true)]
    post_snapshot: Option<Argv>,
    /// Application consistency: the command run before the view is taken.
    #[arg(long, value_name = "CMD", value_parser = argv, allow_hyphen_values = true)]
    app_pre: Option<Argv>,
    /// Application consistency: the command run once the view is taken, always.
    #[arg(long, value_name = "CMD", value_parser = argv, allow_hyphen_values = true)]
    app_post: Option<Argv>,
    /// Add it even if the enrollment does not list the item (the gateway decides at sync).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    dir: StateDirArg,
}

/// A command line given as one flag value (see `disks::parse_argv`).
#[derive(Debug, Clone)]
struct Argv(Vec<String>);

fn argv(s: &str) -> Result<Argv, String> {
    disks::parse_argv(s).map(Argv)
}

#[derive(Args, Debug)]
struct DiskListCli {
    #[command(flatten)]
    dir: StateDirArg,
    /// Output format: `table` for people, `json` for scripts.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Args, Debug)]
struct DiskRemoveCli {
    /// The protected item.
    item: String,
    /// The disk's name in the item.
    disk: String,
    #[command(flatten)]
    dir: StateDirArg,
}

#[derive(Args, Debug)]
struct StatusCli {
    #[command(flatten)]
    dir: StateDirArg,
    /// Output format: `table` for people, `json` for scripts (the gateway's JSON as it is).
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Aligned text.
    Table,
    /// JSON, one document per line.
    Json,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_OTHER } else { 0 });
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry-agent: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_OTHER);
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok((text, code)) => {
            let mut o = std::io::stdout().lock();
            // A closed pipe (`ferry-agent status | head`) is not a failure.
            let _ = o.write_all(text.as_bytes()).and_then(|()| o.flush());
            ExitCode::from(code)
        }
        Err(e) => {
            eprintln!("ferry-agent: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Stops `handle`'s sessions on SIGTERM or ctrl-c (after the frame being written).
fn stop_on_signals(handle: StopHandle) {
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = term => {}
        }
        eprintln!(
            "ferry-agent: stopping after the current frame (the gateway resumes the cycle later)"
        );
        handle.stop();
    });
}

/// Runs a command; returns what to print on stdout and the exit status.
async fn run(cmd: Command) -> Result<(String, u8), AgentError> {
    match cmd {
        Command::Sync(a) => {
            let (handle, stop) = Stop::new();
            stop_on_signals(handle);
            let reports = sync::sync_once(
                &SyncArgs {
                    state_dir: a.dir.state_dir,
                    item: a.item,
                    disk: a.disk,
                    commit_timeout: Duration::from_secs(a.commit_timeout),
                },
                &stop,
            )
            .await?;
            let mut out = String::new();
            let mut code = 0;
            for r in &reports {
                if r.exit_code != 0 {
                    eprintln!("ferry-agent: {}", r.line());
                    if code == 0 {
                        code = r.exit_code;
                    }
                }
                match a.output {
                    Output::Json => {
                        out.push_str(&serde_json::to_string(r).expect("a report serialises"));
                        out.push('\n');
                    }
                    Output::Table if r.exit_code == 0 => {
                        out.push_str(&r.line());
                        out.push('\n');
                    }
                    Output::Table => {}
                }
            }
            Ok((out, code))
        }
        Command::Run(a) => {
            let (handle, stop) = Stop::new();
            stop_on_signals(handle);
            sync::run_service(&a.dir.state_dir, &stop).await?;
            Ok((String::new(), 0))
        }
        Command::Disk(DiskCmd::Add(a)) => {
            let format = if a.format == "auto" {
                ferry_agent::source::resolve_auto(&a.path)
                    .await
                    .map_err(|e| AgentError::Usage(format!("--format auto: {e}")))?
                    .to_string()
            } else {
                a.format
            };
            let mut d = DiskConfig::new(&a.item, &a.disk, a.path);
            d.format = format;
            d.changes = a.changes.map(|a| a.0).unwrap_or_default();
            d.snapshot = a.snapshot;
            d.lvm_snapshot_size = a.lvm_size;
            d.pre_snapshot = a.pre_snapshot.map(|a| a.0).unwrap_or_default();
            d.post_snapshot = a.post_snapshot.map(|a| a.0).unwrap_or_default();
            d.app_pre = a.app_pre.map(|a| a.0).unwrap_or_default();
            d.app_post = a.app_post.map(|a| a.0).unwrap_or_default();
            let d = disks::add(&a.dir.state_dir, d, a.force)?;
            Ok((
                format!(
                    "disk {} added: {} (format {}, snapshot {}{})\n",
                    d.label(),
                    d.path.display(),
                    d.format,
                    d.snapshot.as_str(),
                    if d.changes.is_empty() {
                        ""
                    } else {
                        ", change list by command"
                    }
                ),
                0,
            ))
        }
        Command::Disk(DiskCmd::List(a)) => {
            let list = disks::list(&a.dir.state_dir)?;
            Ok((
                match a.output {
                    Output::Json => format!("{}\n", disks::render_json(&list)),
                    Output::Table => disks::render_table(&list),
                },
                0,
            ))
        }
        Command::Disk(DiskCmd::Remove(a)) => {
            let d = disks::remove(&a.dir.state_dir, &a.item, &a.disk)?;
            Ok((
                format!(
                    "disk {} removed ({}); its replication state stays in {}\n",
                    d.label(),
                    d.path.display(),
                    a.dir
                        .state_dir
                        .join(ferry_agent::tracking::DISKS_DIR)
                        .join(&d.item)
                        .join(&d.name)
                        .display()
                ),
                0,
            ))
        }
        Command::Enroll(a) => {
            let done = enroll::enroll(EnrollArgs {
                gateway: a.gateway,
                token: a.token,
                ca_fingerprint: a.ca_fingerprint,
                state_dir: a.dir.state_dir,
                force: a.force,
                disks: a.disks,
            })
            .await?;
            let items = if done.items.is_empty() {
                "none yet".to_string()
            } else {
                done.items.join(", ")
            };
            let disks = if done.disks.is_empty() {
                "none (`ferry-agent disk add`)".to_string()
            } else {
                done.disks.join(", ")
            };
            Ok((
                format!(
                    "enrolled as agent `{}` with the gateway {}\n\
                     certificate: {}, expires {}\n\
                     protected items: {items}\n\
                     disks: {disks}\n\
                     saved in {}\n",
                    done.agent,
                    done.gateway,
                    done.certificate_sha256,
                    done.certificate_expires,
                    done.state_dir.display()
                ),
                0,
            ))
        }
        Command::Status(a) => {
            let r = status::status(&a.dir.state_dir).await?;
            Ok((
                match a.output {
                    Output::Json => format!("{}\n", status::render_json(&r)),
                    Output::Table => status::render_table(&r),
                },
                0,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
        let names: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect();
        assert_eq!(names, ["enroll", "status", "sync", "run", "disk"]);
    }

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        let mut argv = vec!["ferry-agent"];
        argv.extend(args);
        Cli::try_parse_from(argv).map(|c| c.command)
    }

    #[test]
    fn sync_run_and_disk_flags() {
        let Command::Sync(s) = parse(&[
            "sync",
            "--once",
            "--item",
            "web",
            "--disk",
            "sda",
            "--state-dir",
            "/s",
            "--output",
            "json",
            "--commit-timeout",
            "5",
        ])
        .unwrap() else {
            panic!("not sync")
        };
        assert!(s.once);
        assert_eq!(
            (s.item.as_deref(), s.disk.as_deref()),
            (Some("web"), Some("sda"))
        );
        assert_eq!(s.dir.state_dir, PathBuf::from("/s"));
        assert_eq!((s.output, s.commit_timeout), (Output::Json, 5));
        let Command::Sync(s) = parse(&["sync", "--once"]).unwrap() else {
            panic!()
        };
        assert_eq!((s.output, s.commit_timeout), (Output::Table, 600));
        // `sync` without `--once` is refused (the service is `run`).
        assert!(parse(&["sync"]).is_err());
        assert!(matches!(
            parse(&["run", "--state-dir", "/s"]).unwrap(),
            Command::Run(_)
        ));

        let Command::Disk(DiskCmd::Add(a)) = parse(&[
            "disk",
            "add",
            "web",
            "sda",
            "/dev/vg0/data",
            "--snapshot",
            "lvm",
            "--lvm-size",
            "20G",
            "--app-pre",
            r#"["/usr/bin/psql","-c","select 1"]"#,
            "--app-post",
            "/usr/bin/thaw --now",
        ])
        .unwrap() else {
            panic!("not disk add")
        };
        assert_eq!(a.snapshot, SnapshotMode::Lvm);
        assert_eq!(a.app_pre.unwrap().0, ["/usr/bin/psql", "-c", "select 1"]);
        assert_eq!(a.app_post.unwrap().0, ["/usr/bin/thaw", "--now"]);
        assert!(parse(&["disk", "add", "web", "sda", "/x", "--snapshot", "zfs"]).is_err());
        assert!(matches!(
            parse(&["disk", "list"]).unwrap(),
            Command::Disk(DiskCmd::List(_))
        ));
        assert!(matches!(
            parse(&["disk", "remove", "web", "sda"]).unwrap(),
            Command::Disk(DiskCmd::Remove(_))
        ));

        let fp = "AB".repeat(32);
        let Command::Enroll(e) = parse(&[
            "enroll",
            "--gateway",
            "https://gw:8443",
            "--token",
            "t",
            "--ca-fingerprint",
            &fp,
            "--disk",
            "web/sda=/dev/sda",
            "--disk",
            "db/data=/img/db.raw",
        ])
        .unwrap() else {
            panic!("not enroll")
        };
        assert_eq!(e.disks.len(), 2);
        assert_eq!(e.disks[1].label(), "db/data");
        assert!(
            parse(&[
                "enroll",
                "--gateway",
                "https://gw:8443",
                "--token",
                "t",
                "--ca-fingerprint",
                &fp,
                "--disk",
                "web/sda",
            ])
            .is_err()
        );
    }

    /// Tokens are base64url: one may start with `-`, in either spelling.
    #[test]
    fn a_token_starting_with_a_dash_is_a_token() {
        let fp = "AB".repeat(32);
        for args in [vec!["--token", "-3abc_def"], vec!["--token=-3abc_def"]] {
            let mut argv = vec!["ferry-agent", "enroll", "--gateway", "https://gw:8443"];
            argv.extend(args);
            argv.extend(["--ca-fingerprint", &fp]);
            let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            let Command::Enroll(e) = cli.command else {
                panic!("not enroll")
            };
            assert_eq!(e.token.expose(), "-3abc_def");
        }
    }

    #[test]
    fn a_token_clap_refuses_is_not_echoed_and_debug_redacts_it() {
        let fp = "AB".repeat(32);
        let cli = Cli::try_parse_from([
            "ferry-agent",
            "enroll",
            "--gateway",
            "https://gw:8443",
            "--token",
            "s3cr3t-token",
            "--ca-fingerprint",
            &fp,
            "--state-dir",
            "/tmp/x",
        ])
        .unwrap();
        assert!(!format!("{cli:?}").contains("s3cr3t"));
        // A bad fingerprint is reported; the token next to it is not.
        let e = Cli::try_parse_from([
            "ferry-agent",
            "enroll",
            "--gateway",
            "https://gw:8443",
            "--token",
            "s3cr3t-token",
            "--ca-fingerprint",
            "zz",
        ])
        .unwrap_err();
        assert!(e.use_stderr());
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
    }
}
