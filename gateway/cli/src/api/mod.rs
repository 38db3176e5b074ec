//! The admin client of the appliance: `ferry login|logout`, `ferry vault list`, `ferry point
//! list`, `ferry policy …`, `ferry token …`, `ferry item …` and `ferry job …`, over `ferryd`'s
//! REST API. It exists so that an
//! operator (or a script) manages the appliance without curl and without handling its CA
//! and token by hand; unlike `ferry vault`, it never touches a vault itself.
//!
//! - [`trust`]: the CA pinned at login (by fingerprint or file), the only root afterwards.
//! - [`profile`]: the saved login (`cli.json`, 0600, atomic) and the `FERRY_*` overrides.
//! - [`client`]: HTTP, bounded and typed ([`client::ClientError`] carries the exit code).
//! - [`table`]: text output for people; `--output json` prints the API's JSON instead.
//!
//! This module is glue between clap and the client: it builds request bodies from flags and
//! prints answers. Exit status: 0 ok, 1 failure, 2 usage, 3 not logged in or authentication
//! refused, 4 not found, 5 conflict or precondition failed, 6 refused input, 7 appliance
//! unreachable or TLS refused. Errors are one line on stderr:
//! `ferry: <message> (code <code>[, field <field>])`.

mod agents;
pub mod client;
mod items;
pub mod profile;
pub mod table;
pub mod trust;

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Subcommand, ValueEnum};
use reqwest::{Method, Url};
use serde_json::{Map, Value, json};

use self::client::{Answer, Client, ClientError, Listing, Token};
use self::table::{cell, clean, pairs, render};
use self::trust::{Fingerprint, PinnedCa};
use crate::{human, line};
pub use agents::{AgentCmd, GroupCmd};
pub use items::{FailoverCmd, ItemCmd, JobCmd};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// The API's JSON, one document on one line, for scripts.
    Json,
}

/// `--output`, taken by every command of the admin client.
#[derive(Args, Debug, Clone)]
pub struct OutputArgs {
    /// Output format: `table` for people, `json` for scripts (the API's JSON as it is).
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Options of every listing.
#[derive(Args, Debug, Clone)]
pub struct ListArgs {
    #[command(flatten)]
    out: OutputArgs,
    /// Most entries to show; the listing is followed page by page up to this many.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    limit: u64,
}

/// `ferry login`.
#[derive(Args, Debug)]
pub struct LoginArgs {
    /// The appliance, as `ferryd up` printed it: https://HOST:PORT (a trailing /api/v1 is fine).
    #[arg(value_parser = profile::parse_url)]
    url: Url,
    /// File holding an admin token (the first one is `<data-dir>/admin-token`).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "token_stdin",
        conflicts_with = "token_stdin"
    )]
    token_file: Option<PathBuf>,
    /// Read the admin token from standard input.
    #[arg(long)]
    token_stdin: bool,
    /// The CA fingerprint `ferryd up` printed (`SHA256 AB:CD:…`, or plain hex): the server
    /// is accepted only if it presents that CA and its certificate verifies against it.
    #[arg(
        long,
        value_name = "SHA256",
        value_parser = Fingerprint::parse,
        required_unless_present = "ca_file",
        conflicts_with = "ca_file"
    )]
    ca_fingerprint: Option<Fingerprint>,
    /// The appliance's CA certificate (PEM), e.g. a copy of `<data-dir>/tls/ca.pem`.
    #[arg(long, value_name = "PATH")]
    ca_file: Option<PathBuf>,
    #[command(flatten)]
    out: OutputArgs,
}

/// `ferry point …`.
#[derive(Subcommand, Debug)]
pub enum PointCmd {
    /// List the recovery points of a vault (read from the vault by the appliance).
    List {
        /// Vault name (see `ferry vault list`).
        #[arg(long)]
        vault: String,
        /// Only the points of this protected item.
        #[arg(long)]
        item: Option<String>,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Instant recovery: the appliance serves a recovery point's disk over NBD (read-only,
    /// or writable with a copy-on-write overlay on the appliance), so a hypervisor boots it
    /// before anything is copied. Prints the mount's id and its nbd:// URL.
    Mount {
        /// Item name.
        item: String,
        /// Recovery point: `latest`, `latest-app-consistent`, a time (RFC 3339: the newest
        /// point at or before it) or a point id.
        #[arg(long, default_value = "latest")]
        point: String,
        /// Disk name (needed when the point has several disks).
        #[arg(long)]
        disk: Option<String>,
        /// Accept writes (kept in an overlay, discarded on unmount; the point is never
        /// written).
        #[arg(long)]
        writable: bool,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// The mounts the appliance serves.
    Mounts(ListArgs),
    /// Stop a mount: its NBD server closes every connection; writes are discarded.
    Unmount {
        /// Mount id (`ferry point mounts`).
        id: String,
    },
}

/// `ferry policy …`.
#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// List the replication policies.
    List(ListArgs),
    /// Show one policy (its revision is what --if-match takes).
    Show {
        /// Policy name.
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Create a policy: settings not given get their defaults.
    Create {
        /// Policy name: 1 to 63 of a-z, 0-9 and -.
        name: String,
        #[command(flatten)]
        settings: SettingsArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Change some settings of a policy; the others keep their value.
    Update {
        /// Policy name.
        name: String,
        #[command(flatten)]
        settings: SettingsArgs,
        /// Change it only if its revision is still this one (else exit 5, nothing changed).
        #[arg(long, value_name = "REV", value_parser = parse_if_match)]
        if_match: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Delete a policy (not `default`).
    Delete {
        /// Policy name.
        name: String,
        /// Delete it only if its revision is still this one (else exit 5, nothing changed).
        #[arg(long, value_name = "REV", value_parser = parse_if_match)]
        if_match: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// Policy settings as flags (the API's members; the appliance checks every rule).
#[derive(Args, Debug, Clone)]
pub struct SettingsArgs {
    /// JSON object of settings as the API takes them (`-`: standard input); flags given as
    /// well override its members.
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Free text (at most 1024 characters).
    #[arg(long, conflicts_with = "no_description")]
    description: Option<String>,
    /// Remove the description.
    #[arg(long)]
    no_description: bool,
    /// RPO threshold for alerting, in minutes (1 to 1440).
    #[arg(long, value_name = "MIN", allow_negative_numbers = true)]
    rpo_threshold_minutes: Option<i64>,
    /// A replication cycle starts this often, in seconds (30 to 86400; at most the RPO).
    #[arg(long, value_name = "SEC", allow_negative_numbers = true)]
    cycle_interval_seconds: Option<i64>,
    /// Retention: hours during which every point is kept (0 to 168).
    #[arg(long, value_name = "H", allow_negative_numbers = true)]
    keep_all_hours: Option<i64>,
    /// Retention: days after those with one point per hour (0 to 90).
    #[arg(long, value_name = "D", allow_negative_numbers = true)]
    hourly_days: Option<i64>,
    /// Retention: width in hours of the buckets of the third tier (1 to 168).
    #[arg(long, value_name = "H", allow_negative_numbers = true)]
    every_hours: Option<i64>,
    /// Retention: days of the third tier, one point per --every-hours (0 to 3650).
    #[arg(long, value_name = "D", allow_negative_numbers = true)]
    for_days: Option<i64>,
    /// An app-consistent point every this many minutes (0: off; else 15 to 1440).
    #[arg(long, value_name = "MIN", allow_negative_numbers = true)]
    app_consistent_frequency_minutes: Option<i64>,
    /// Chunk size of disks new to their vault: a power of two from 64K to 4M.
    #[arg(long, value_name = "SIZE", value_parser = parse_signed_size, allow_negative_numbers = true)]
    chunk_size: Option<i64>,
    /// zstd level of data chunks (1 to 19).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    compression_level: Option<i64>,
    /// Delays between retries, in seconds, comma-separated and non-decreasing (60,120,240).
    #[arg(
        long,
        value_name = "SEC,…",
        value_delimiter = ',',
        allow_negative_numbers = true
    )]
    retry_schedule_seconds: Option<Vec<i64>>,
    /// Resynchronise a disk when pending changes exceed this percentage of it (1 to 100).
    #[arg(long, value_name = "PCT", allow_negative_numbers = true)]
    resync_threshold_percent: Option<i64>,
    /// Off-hours for resyncs the agent decides itself (tracking lost, over the threshold):
    /// FROM-TO in the agent's local time, `22:00-06:00` wrapping past midnight. A resync
    /// asked for by hand (`ferry item resync`) starts at once.
    #[arg(
        long,
        value_name = "HH:MM-HH:MM",
        value_parser = parse_window,
        conflicts_with = "no_resync_window"
    )]
    resync_window: Option<(String, String)>,
    /// With --resync-window: only on these days (the day a window wrapping past midnight
    /// starts), comma-separated: mon,tue,…,sun. Default every day.
    #[arg(
        long,
        value_name = "DAY,…",
        value_delimiter = ',',
        requires = "resync_window"
    )]
    resync_window_days: Option<Vec<String>>,
    /// Remove the resync window: resyncs start whenever they are needed.
    #[arg(long)]
    no_resync_window: bool,
}

/// `ferry token …`.
#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// List admin tokens (never their secrets).
    List(ListArgs),
    /// Create an admin token and print its secret, this once.
    Create {
        /// What the token is for.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Revoke an admin token: refused from its next request on.
    Revoke {
        /// Token id (see `ferry token list`).
        id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// A command of the admin client, as `main` hands it over.
#[derive(Debug)]
pub enum Command {
    /// `ferry login`.
    Login(LoginArgs),
    /// `ferry logout`.
    Logout(OutputArgs),
    /// `ferry vault list`.
    VaultList(ListArgs),
    /// `ferry point …`.
    Point(PointCmd),
    /// `ferry policy …`.
    Policy(PolicyCmd),
    /// `ferry token …`.
    Token(TokenCmd),
    /// `ferry item …`.
    Item(ItemCmd),
    /// `ferry failover …`.
    Failover(FailoverCmd),
    /// `ferry job …`.
    Job(JobCmd),
    /// `ferry agent …`.
    Agent(AgentCmd),
    /// `ferry group …`.
    Group(GroupCmd),
}

/// Runs one command; prints its error and returns its exit status.
pub async fn run(cmd: Command) -> ExitCode {
    match dispatch(cmd).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {}", clean(&e.to_string()));
            ExitCode::from(e.exit_code())
        }
    }
}

fn parse_if_match(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t == "*" {
        return Ok(t.to_string());
    }
    let inner = t
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(t);
    if !inner.is_empty() && inner.len() <= 20 && inner.bytes().all(|b| b.is_ascii_digit()) {
        Ok(format!("\"{inner}\""))
    } else {
        Err("a revision number as `ferry policy show` prints it (or `\"N\"`, or `*`)".into())
    }
}

/// `FROM-TO` of `--resync-window`, split (the appliance checks the times).
fn parse_window(s: &str) -> Result<(String, String), String> {
    match s.trim().split_once('-') {
        Some((from, to)) if !from.trim().is_empty() && !to.trim().is_empty() => {
            Ok((from.trim().to_string(), to.trim().to_string()))
        }
        _ => Err("FROM-TO in local time of day, such as 22:00-06:00".into()),
    }
}

fn parse_signed_size(s: &str) -> Result<i64, String> {
    if s.trim_start().starts_with('-') {
        return s.trim().parse().map_err(|_| format!("`{s}` is not a size"));
    }
    let n = crate::parse_size(s)?;
    i64::try_from(n).map_err(|_| format!("`{s}` is too large"))
}

fn connect() -> Result<Client, ClientError> {
    let s = profile::session()?;
    let cas = trust::certs_from_pem(&s.ca_pem, &s.ca_source)?;
    Client::new(s.url, trust::tls_config(&cas)?, s.token)
}

async fn dispatch(cmd: Command) -> Result<(), ClientError> {
    match cmd {
        Command::Login(a) => login(a).await,
        Command::Logout(out) => {
            let removed = profile::remove()?;
            match out.output {
                Output::Json => line(&json!({ "removed": removed }).to_string()),
                Output::Table => match removed {
                    Some(p) => line(&format!("logged out (removed {})", p.display())),
                    None => line("not logged in; nothing to remove"),
                },
            }
            Ok(())
        }
        Command::VaultList(l) => {
            let c = connect()?;
            let v = c.list(&["vaults"], &[], l.limit).await?;
            print_listing(&l, &v, &["NAME", "URL", "CREATED"], |x| {
                vec![cell(&x["name"]), cell(&x["url"]), cell(&x["created"])]
            });
            Ok(())
        }
        Command::Point(PointCmd::List { vault, item, list }) => {
            let c = connect()?;
            let q: Vec<(&str, String)> = item.into_iter().map(|i| ("item", i)).collect();
            let v = c
                .list(&["vaults", &vault, "points"], &q, list.limit)
                .await?;
            print_listing(
                &list,
                &v,
                &[
                    "ITEM", "POINT", "CREATED", "KIND", "DISKS", "SIZE", "STORED",
                ],
                |p| {
                    let disks = p["disks"].as_array().cloned().unwrap_or_default();
                    let sum = |k: &str| disks.iter().filter_map(|d| d[k].as_u64()).sum::<u64>();
                    vec![
                        cell(&p["item"]),
                        cell(&p["id"]),
                        cell(&p["created"]),
                        cell(&p["consistency"]),
                        disks.len().to_string(),
                        human(sum("size")),
                        human(sum("bytes_stored")),
                    ]
                },
            );
            Ok(())
        }
        Command::Point(PointCmd::Mount {
            item,
            point,
            disk,
            writable,
            out,
        }) => {
            let c = connect()?;
            let body = json!({"point": point, "disk": disk, "writable": writable});
            let a = c
                .send(
                    Method::POST,
                    &["items", &item, "mounts"],
                    &[],
                    None,
                    Some(&body),
                )
                .await?;
            print_answer(&out, &a, |m| {
                format!(
                    "mount {} serves point {} of item {} disk {} ({}, {})\n{}\n\
                     try `qemu-img convert -O raw {} disk.raw`; stop it with `ferry point unmount {}`",
                    cell(&m["id"]),
                    cell(&m["point"]),
                    cell(&m["item"]),
                    cell(&m["disk"]),
                    human(m["size_bytes"].as_u64().unwrap_or(0)),
                    if m["writable"] == true {
                        "writable"
                    } else {
                        "read-only"
                    },
                    cell(&m["url"]),
                    cell(&m["url"]),
                    cell(&m["id"]),
                )
            });
            Ok(())
        }
        Command::Point(PointCmd::Mounts(list)) => {
            let c = connect()?;
            let v = c.list(&["mounts"], &[], list.limit).await?;
            print_listing(
                &list,
                &v,
                &["ID", "ITEM", "POINT", "DISK", "MODE", "URL", "CREATED"],
                |m| {
                    vec![
                        cell(&m["id"]),
                        cell(&m["item"]),
                        cell(&m["point"]),
                        cell(&m["disk"]),
                        if m["writable"] == true {
                            "writable"
                        } else {
                            "read-only"
                        }
                        .to_string(),
                        cell(&m["url"]),
                        cell(&m["created"]),
                    ]
                },
            );
            Ok(())
        }
        Command::Point(PointCmd::Unmount { id }) => {
            let c = connect()?;
            c.send(Method::DELETE, &["mounts", &id], &[], None, None)
                .await?;
            line(&format!("mount {id} stopped"));
            Ok(())
        }
        Command::Policy(p) => policy(p).await,
        Command::Failover(f) => items::failover(f).await,
        Command::Token(t) => token(t).await,
        Command::Item(i) => items::item(i).await,
        Command::Job(j) => items::job(j).await,
        Command::Agent(a) => agents::agent(a).await,
        Command::Group(g) => agents::group(g).await,
    }
}

fn print_listing(l: &ListArgs, v: &Listing, header: &[&str], row: impl Fn(&Value) -> Vec<String>) {
    match l.out.output {
        Output::Json => line(&v.to_json()),
        Output::Table => {
            let rows: Vec<Vec<String>> = v.values().iter().map(row).collect();
            line(&render(header, &rows));
            if v.next_cursor.is_some() {
                eprintln!(
                    "ferry: showing the first {} entries; there are more (raise --limit)",
                    v.items.len()
                );
            }
        }
    }
}

fn print_answer(out: &OutputArgs, a: &Answer, table: impl FnOnce(&Value) -> String) {
    match out.output {
        Output::Json => line(a.text.trim()),
        Output::Table => line(&table(&a.json)),
    }
}

async fn login(a: LoginArgs) -> Result<(), ClientError> {
    let token = match &a.token_file {
        Some(f) => {
            let what = format!("--token-file `{}`", f.display());
            Token::from_bytes(&profile::read_small(f, "--token-file")?, &what)?
        }
        None => {
            let mut buf = zeroize::Zeroizing::new(Vec::new());
            std::io::stdin()
                .lock()
                .take(Token::MAX_LEN as u64 + 2)
                .read_to_end(&mut buf)
                .map_err(|e| {
                    ClientError::Local(format!("cannot read the token from stdin: {e}"))
                })?;
            Token::from_bytes(&buf, "the token on stdin")?
        }
    };
    let (tls, pinned, file_pem) = match (a.ca_fingerprint, &a.ca_file) {
        (Some(fp), _) => {
            let v = Arc::new(PinnedCa::new(fp));
            (trust::pinned_config(v.clone())?, Some(v), None)
        }
        (None, Some(f)) => {
            let what = format!("--ca-file `{}`", f.display());
            let pem = profile::read_small(f, "--ca-file")?;
            let certs = trust::certs_from_pem(&pem, &what)?;
            let text = String::from_utf8(pem.to_vec())
                .map_err(|_| ClientError::Local(format!("{what}: not a text file")))?;
            (
                trust::tls_config(&certs)?,
                None,
                Some((text, Fingerprint::of(certs[0].as_ref()))),
            )
        }
        (None, None) => unreachable!("clap requires --ca-fingerprint or --ca-file"),
    };
    let url = a.url;
    let c = Client::new(url.clone(), tls, token)?;
    // The token must work before anything is saved.
    let checked = c
        .send(
            Method::GET,
            &["vaults"],
            &[("limit", "1".into())],
            None,
            None,
        )
        .await;
    if let Err(ClientError::Unreachable { url, reason }) = checked {
        let reason = match pinned.as_ref().and_then(|v| v.refused()) {
            Some(why) => format!("TLS refused: {why}"),
            None => reason,
        };
        return Err(ClientError::Unreachable { url, reason });
    }
    checked?;
    let (ca_pem, fp) = match (pinned, file_pem) {
        (Some(v), _) => {
            let ca = v.accepted().ok_or_else(|| {
                ClientError::Local("the TLS handshake did not pin the CA certificate".into())
            })?;
            (trust::to_pem(ca.as_ref()), Fingerprint::of(ca.as_ref()))
        }
        (None, Some(x)) => x,
        (None, None) => unreachable!("one trust source"),
    };
    let path = profile::save(&url, &ca_pem, c.token())?;
    let shown = profile::show_url(&url);
    match a.out.output {
        Output::Json => line(
            &json!({
                "url": shown,
                "ca_fingerprint": fp.to_string(),
                "profile": path,
            })
            .to_string(),
        ),
        Output::Table => {
            line(&format!("logged in to {shown}"));
            line(&format!("CA fingerprint: {fp}"));
            line(&format!("saved to {}", path.display()));
        }
    }
    Ok(())
}

const POLICY_KEYS: [&str; 11] = [
    "description",
    "rpo_threshold_minutes",
    "cycle_interval_seconds",
    "retention",
    "app_consistent_frequency_minutes",
    "chunk_size",
    "compression_level",
    "retry_schedule_seconds",
    "resync_threshold_percent",
    "resync_window",
    "revision",
];

/// A policy as `key: value` lines, in the API's member names (which the flags follow).
fn policy_block(p: &Value) -> String {
    let mut rows = vec![("name".to_string(), cell(&p["name"]))];
    for k in POLICY_KEYS {
        match (k, &p[k]) {
            ("retention", Value::Object(r)) => {
                for (rk, rv) in [
                    "keep_all_hours",
                    "hourly_days",
                    "every_hours",
                    "for_days",
                    "max_age_hours",
                ]
                .iter()
                .map(|rk| (*rk, r.get(*rk).unwrap_or(&Value::Null)))
                {
                    rows.push((format!("retention.{rk}"), cell(rv)));
                }
            }
            ("chunk_size", v @ Value::Number(n)) => rows.push((
                k.to_string(),
                match n.as_u64() {
                    Some(b) => format!("{b} ({})", human(b)),
                    None => cell(v),
                },
            )),
            ("retry_schedule_seconds", Value::Array(a)) => rows.push((
                k.to_string(),
                a.iter().map(cell).collect::<Vec<_>>().join(","),
            )),
            ("resync_window", w) => rows.push((k.to_string(), window_cell(w))),
            (_, v) => rows.push((k.to_string(), cell(v))),
        }
    }
    for k in ["created", "updated"] {
        rows.push((k.to_string(), cell(&p[k])));
    }
    pairs(&rows)
}

/// A resync window as `--resync-window` takes it, days first (`fri,sat 22:00-06:00`);
/// `none` when there is none.
fn window_cell(w: &Value) -> String {
    match w {
        Value::Object(o) => {
            let span = format!(
                "{}-{}",
                cell(o.get("from").unwrap_or(&Value::Null)),
                cell(o.get("to").unwrap_or(&Value::Null))
            );
            match o.get("days") {
                Some(Value::Array(d)) => format!(
                    "{} {span}",
                    d.iter().map(cell).collect::<Vec<_>>().join(",")
                ),
                _ => span,
            }
        }
        Value::Null => "none".into(),
        other => cell(other),
    }
}

fn policy_row(p: &Value) -> Vec<String> {
    let r = &p["retention"];
    vec![
        cell(&p["name"]),
        cell(&p["revision"]),
        format!("{}m", cell(&p["rpo_threshold_minutes"])),
        format!("{}s", cell(&p["cycle_interval_seconds"])),
        format!(
            "{}h all, {}d hourly, {}h×{}d",
            cell(&r["keep_all_hours"]),
            cell(&r["hourly_days"]),
            cell(&r["every_hours"]),
            cell(&r["for_days"])
        ),
        p["chunk_size"]
            .as_u64()
            .map_or_else(|| cell(&p["chunk_size"]), human),
        cell(&p["compression_level"]),
        cell(&p["description"]),
    ]
}

/// The request body of `create`/`update`: `--file`'s object, then the flags over it.
fn settings_body(s: &SettingsArgs) -> Result<Map<String, Value>, ClientError> {
    let mut m = match &s.file {
        None => Map::new(),
        Some(f) => {
            let raw = if f.as_os_str() == "-" {
                let mut b = zeroize::Zeroizing::new(Vec::new());
                std::io::stdin()
                    .lock()
                    .take(1 << 20)
                    .read_to_end(&mut b)
                    .map_err(|e| ClientError::Local(format!("--file -: {e}")))?;
                b
            } else {
                profile::read_small(f, "--file")?
            };
            match serde_json::from_slice::<Value>(&raw) {
                Ok(Value::Object(m)) => m,
                Ok(_) => {
                    return Err(ClientError::Local(format!(
                        "--file `{}`: not a JSON object",
                        f.display()
                    )));
                }
                Err(e) => {
                    return Err(ClientError::Local(format!(
                        "--file `{}`: not JSON ({e})",
                        f.display()
                    )));
                }
            }
        }
    };
    if let Some(d) = &s.description {
        m.insert("description".into(), json!(d));
    }
    if s.no_description {
        m.insert("description".into(), Value::Null);
    }
    for (k, v) in [
        ("rpo_threshold_minutes", s.rpo_threshold_minutes),
        ("cycle_interval_seconds", s.cycle_interval_seconds),
        (
            "app_consistent_frequency_minutes",
            s.app_consistent_frequency_minutes,
        ),
        ("chunk_size", s.chunk_size),
        ("compression_level", s.compression_level),
        ("resync_threshold_percent", s.resync_threshold_percent),
    ] {
        if let Some(v) = v {
            m.insert(k.into(), json!(v));
        }
    }
    if let Some(r) = &s.retry_schedule_seconds {
        m.insert("retry_schedule_seconds".into(), json!(r));
    }
    if let Some((from, to)) = &s.resync_window {
        let mut w = json!({ "from": from, "to": to });
        if let Some(days) = &s.resync_window_days {
            w["days"] = json!(days);
        }
        m.insert("resync_window".into(), w);
    }
    if s.no_resync_window {
        m.insert("resync_window".into(), Value::Null);
    }
    let retention: Vec<(&str, i64)> = [
        ("keep_all_hours", s.keep_all_hours),
        ("hourly_days", s.hourly_days),
        ("every_hours", s.every_hours),
        ("for_days", s.for_days),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, v)))
    .collect();
    if !retention.is_empty() {
        let r = m
            .entry("retention")
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(r) = r else {
            return Err(ClientError::Local(
                "--file: `retention` is not an object, so retention flags cannot be merged into it"
                    .into(),
            ));
        };
        for (k, v) in retention {
            r.insert(k.into(), json!(v));
        }
    }
    Ok(m)
}

async fn policy(cmd: PolicyCmd) -> Result<(), ClientError> {
    let c = connect()?;
    match cmd {
        PolicyCmd::List(l) => {
            let v = c.list(&["policies"], &[], l.limit).await?;
            print_listing(
                &l,
                &v,
                &[
                    "NAME",
                    "REVISION",
                    "RPO",
                    "CYCLE",
                    "RETENTION",
                    "CHUNK",
                    "ZSTD",
                    "DESCRIPTION",
                ],
                policy_row,
            );
        }
        PolicyCmd::Show { name, out } => {
            let a = c
                .send(Method::GET, &["policies", &name], &[], None, None)
                .await?;
            print_answer(&out, &a, policy_block);
        }
        PolicyCmd::Create {
            name,
            settings,
            out,
        } => {
            let mut body = settings_body(&settings)?;
            match body.get("name") {
                Some(Value::String(n)) if *n == name => {}
                None => {
                    body.insert("name".into(), json!(name));
                }
                Some(other) => {
                    return Err(ClientError::Local(format!(
                        "--file names the policy {}, the command `{name}`",
                        clean(&other.to_string())
                    )));
                }
            }
            let a = c
                .send(
                    Method::POST,
                    &["policies"],
                    &[],
                    None,
                    Some(&Value::Object(body)),
                )
                .await?;
            print_answer(&out, &a, |p| format!("created policy\n{}", policy_block(p)));
        }
        PolicyCmd::Update {
            name,
            settings,
            if_match,
            out,
        } => {
            let body = settings_body(&settings)?;
            if body.is_empty() {
                return Err(ClientError::Local(
                    "nothing to change: give settings as flags or --file (see --help)".into(),
                ));
            }
            let a = c
                .send(
                    Method::PATCH,
                    &["policies", &name],
                    &[],
                    if_match.as_deref(),
                    Some(&Value::Object(body)),
                )
                .await?;
            print_answer(&out, &a, |p| format!("updated policy\n{}", policy_block(p)));
        }
        PolicyCmd::Delete {
            name,
            if_match,
            out,
        } => {
            let a = c
                .send(
                    Method::DELETE,
                    &["policies", &name],
                    &[],
                    if_match.as_deref(),
                    None,
                )
                .await?;
            print_answer(&out, &a, |p| {
                format!(
                    "deleted policy {} (revision {})",
                    cell(&p["name"]),
                    cell(&p["revision"])
                )
            });
        }
    }
    Ok(())
}

async fn token(cmd: TokenCmd) -> Result<(), ClientError> {
    let c = connect()?;
    match cmd {
        TokenCmd::List(l) => {
            let v = c.list(&["tokens"], &[], l.limit).await?;
            print_listing(&l, &v, &["ID", "NAME", "CREATED", "STATE"], |t| {
                vec![
                    cell(&t["id"]),
                    cell(&t["name"]),
                    cell(&t["created"]),
                    if t["active"].as_bool() == Some(true) {
                        "active".into()
                    } else {
                        format!("revoked {}", cell(&t["revoked"]))
                    },
                ]
            });
        }
        TokenCmd::Create { name, out } => {
            let a = c
                .send(
                    Method::POST,
                    &["tokens"],
                    &[],
                    None,
                    Some(&json!({ "name": name })),
                )
                .await?;
            // Printing the new secret is this command's purpose; it is shown only here.
            print_answer(&out, &a, |t| {
                pairs(&[
                    ("id".into(), cell(&t["id"])),
                    ("name".into(), cell(&t["name"])),
                    ("secret".into(), cell(&t["secret"])),
                ])
            });
            if out.output == Output::Table {
                eprintln!("ferry: the secret is shown only this once: store it now");
            }
        }
        TokenCmd::Revoke { id, out } => {
            let a = c
                .send(Method::DELETE, &["tokens", &id], &[], None, None)
                .await?;
            print_answer(&out, &a, |t| {
                format!("revoked token {} ({})", cell(&t["id"]), cell(&t["name"]))
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_values() {
        assert_eq!(parse_if_match("7").unwrap(), "\"7\"");
        assert_eq!(parse_if_match("\"12\"").unwrap(), "\"12\"");
        assert_eq!(parse_if_match("*").unwrap(), "*");
        for bad in ["", "x", "\"\"", "-1", "1 2"] {
            assert!(parse_if_match(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_override_the_file_and_merge_retention() {
        let dir = std::env::temp_dir().join(format!("ferry-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.json");
        std::fs::write(
            &f,
            r#"{"compression_level":3,"retention":{"for_days":30},"rpo_threshold_minutes":10}"#,
        )
        .unwrap();
        let s = SettingsArgs {
            file: Some(f),
            description: None,
            no_description: true,
            rpo_threshold_minutes: Some(-1),
            cycle_interval_seconds: None,
            keep_all_hours: Some(48),
            hourly_days: None,
            every_hours: None,
            for_days: None,
            app_consistent_frequency_minutes: None,
            chunk_size: Some(1 << 20),
            compression_level: None,
            retry_schedule_seconds: Some(vec![30, 60]),
            resync_threshold_percent: None,
            resync_window: None,
            resync_window_days: None,
            no_resync_window: true,
        };
        let m = settings_body(&s).unwrap();
        assert_eq!(
            Value::Object(m),
            json!({
                "compression_level": 3,
                "description": null,
                "retention": {"for_days": 30, "keep_all_hours": 48},
                "rpo_threshold_minutes": -1,
                "chunk_size": 1048576,
                "retry_schedule_seconds": [30, 60],
                "resync_window": null,
            })
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `--resync-window FROM-TO` (with `--resync-window-days`) sets the member whole,
    /// `--no-resync-window` removes it; the two conflict; a window shows as the flag takes it.
    #[test]
    fn resync_window_flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            s: SettingsArgs,
        }
        let body = |args: &[&str]| {
            let t = T::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(Value::Object(settings_body(&t.s).unwrap()))
        };
        assert_eq!(
            body(&["--resync-window", "22:00-06:00"]).unwrap(),
            json!({"resync_window": {"from": "22:00", "to": "06:00"}})
        );
        assert_eq!(
            body(&[
                "--resync-window",
                "1:00-5:30",
                "--resync-window-days",
                "sat,sun"
            ])
            .unwrap(),
            json!({"resync_window": {"from": "1:00", "to": "5:30", "days": ["sat", "sun"]}})
        );
        assert_eq!(
            body(&["--no-resync-window"]).unwrap(),
            json!({"resync_window": null})
        );
        for bad in [
            &["--resync-window", "22:00"][..],
            &["--resync-window", "-06:00"],
            &["--resync-window", "22:00-06:00", "--no-resync-window"],
            &["--resync-window-days", "fri"],
        ] {
            assert!(body(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            window_cell(&json!({"from": "22:00", "to": "06:00", "days": ["fri", "sat"]})),
            "fri,sat 22:00-06:00"
        );
        assert_eq!(
            window_cell(&json!({"from": "22:00", "to": "06:00"})),
            "22:00-06:00"
        );
        assert_eq!(window_cell(&Value::Null), "none");
    }
}
