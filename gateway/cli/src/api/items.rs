//! `ferry item …` and `ferry job …`: protected items and the jobs that change them.
//!
//! Operations on an item (enable = `create`, disable = `delete`, `resync`) answer at once
//! with the job the appliance queued; `--wait` follows that job to its end (its log lines as
//! they come), and the command then fails (exit 1) if the job failed.

use std::time::Duration;

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use super::client::{Answer, Client, ClientError};
use super::table::{cell, pairs, render};
use super::{ListArgs, Output, OutputArgs, connect, parse_if_match, print_answer, print_listing};
use crate::{human, line};

/// How long `--wait` follows a job at most.
const WAIT_AT_MOST: Duration = Duration::from_secs(3600);

/// A disk of `item create`: `NAME=SIZE`.
#[derive(Debug, Clone)]
pub struct DiskArg {
    name: String,
    size: u64,
}

fn parse_disk(s: &str) -> Result<DiskArg, String> {
    let (name, size) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: a disk is NAME=SIZE, e.g. os=64G"))?;
    Ok(DiskArg {
        name: name.to_string(),
        size: crate::parse_size(size)?,
    })
}

/// `--wait` and `--output` of an operation.
#[derive(Args, Debug, Clone)]
pub struct OpArgs {
    /// Follow the job to its end (its log as it comes); exit 1 if it fails.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    out: OutputArgs,
}

/// `ferry item …`.
#[derive(Subcommand, Debug)]
pub enum ItemCmd {
    /// List protected items.
    List(ListArgs),
    /// Show one protected item.
    Show {
        /// Item name.
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Enable protection of a machine (queues an `enable` job).
    Create {
        /// Item name (its name in the vault).
        name: String,
        /// A disk, NAME=SIZE (e.g. `os=64G`); repeat for each disk.
        #[arg(long = "disk", value_name = "NAME=SIZE", value_parser = parse_disk, required = true)]
        disks: Vec<DiskArg>,
        /// Vault of its points (may be left out when the appliance has one vault).
        #[arg(long)]
        vault: Option<String>,
        /// Replication policy [default: the appliance's `default` policy].
        #[arg(long)]
        policy: Option<String>,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        op: OpArgs,
    },
    /// Change an item's policy or description.
    Update {
        /// Item name.
        name: String,
        /// New replication policy.
        #[arg(long)]
        policy: Option<String>,
        /// New description.
        #[arg(long, conflicts_with = "no_description")]
        description: Option<String>,
        /// Remove the description.
        #[arg(long)]
        no_description: bool,
        /// Only if the item is still at this revision (`ferry item show` prints it).
        #[arg(long, value_name = "REV", value_parser = parse_if_match)]
        if_match: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Disable protection (queues a `disable` job; the item's points stay in the vault).
    Delete {
        /// Item name.
        name: String,
        /// Only if the item is still at this revision.
        #[arg(long, value_name = "REV", value_parser = parse_if_match)]
        if_match: Option<String>,
        #[command(flatten)]
        op: OpArgs,
    },
    /// Pause the item's replication: its agents start no new cycle until it is resumed (a
    /// cycle already running completes).
    Pause {
        /// Item name.
        name: String,
        /// Only if the item is still at this revision.
        #[arg(long, value_name = "REV", value_parser = parse_if_match)]
        if_match: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Resume the item's replication after `ferry item pause`.
    Resume {
        /// Item name.
        name: String,
        /// Only if the item is still at this revision.
        #[arg(long, value_name = "REV", value_parser = parse_if_match)]
        if_match: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Start a resynchronisation by hand (queues a `resync` job).
    Resync {
        /// Item name.
        name: String,
        /// Only if the item is still at this revision.
        #[arg(long, value_name = "REV", value_parser = parse_if_match)]
        if_match: Option<String>,
        #[command(flatten)]
        op: OpArgs,
    },
}

/// `ferry failover …`: the target role's operations on an item, each a job.
#[derive(Subcommand, Debug)]
pub enum FailoverCmd {
    /// Test failover: materialise a recovery point into an isolated directory on the
    /// appliance (named after the job) while replication goes on; one at a time.
    Test {
        /// Item name (with `--group`, a replication group's name).
        name: String,
        /// NAME is a replication group: fail over each of its items together, each as its
        /// own job, all queued or none (`test` and `unplanned`: one point time for the
        /// group, each member its newest point at or before it).
        #[arg(long)]
        group: bool,
        #[command(flatten)]
        point: FailoverPointArgs,
        /// Only if the item (with `--group`: the group) is still at this revision.
        #[arg(long, value_name = "REV", value_parser = parse_if_match)]
        if_match: Option<String>,
        #[command(flatten)]
        op: OpArgs,
    },
    /// Planned failover (the source is up): the item's agent sends a final cycle
    /// (application-consistent where it can), runs its `[failover] stop_command`, and the
    /// failover is made from that cycle — nothing written before it is lost. The job waits for
    /// the agent (`[target] planned_failover_timeout_secs`).
    Planned {
        /// Item name (with `--group`, a replication group's name).
        name: String,
        /// NAME is a replication group: fail over each of its items together, each as its
        /// own job, all queued or none (`test` and `unplanned`: one point time for the
        /// group, each member its newest point at or before it).
        #[arg(long)]
        group: bool,
        /// Output format of the disks: raw, vhd, qcow2, vmdk, vhdx or vmdk-stream.
        #[arg(long, default_value = "raw")]
        format: String,
        /// Only if the item (with `--group`: the group) is still at this revision.
        #[arg(long, value_name = "REV", value_parser = parse_if_match)]
        if_match: Option<String>,
        #[command(flatten)]
        op: OpArgs,
    },
    /// Unplanned failover (the source is unreachable): materialise a recovery point; the
    /// item is `failover-pending-commit` and its replication stops.
    Unplanned {
        /// Item name (with `--group`, a replication group's name).
        name: String,
        /// NAME is a replication group: fail over each of its items together, each as its
        /// own job, all queued or none (`test` and `unplanned`: one point time for the
        /// group, each member its newest point at or before it).
        #[arg(long)]
        group: bool,
        #[command(flatten)]
        point: FailoverPointArgs,
        /// Only if the item (with `--group`: the group) is still at this revision.
        #[arg(long, value_name = "REV", value_parser = parse_if_match)]
        if_match: Option<String>,
        #[command(flatten)]
        op: OpArgs,
    },
    /// Failback: a planned failover back onto the original disks, written in place — only
    /// the 4 KiB blocks that differ from what each disk holds are written. Run it on the item
    /// after `reprotect` made the recovery site its source; then `commit` and `reprotect`
    /// with the original site's agent.
    Failback {
        /// Item name.
        name: String,
        /// An original disk to write in place: DISK=PATH (an existing file or block device
        /// on the appliance); repeat for each disk. Disks not named are exported as files.
        #[arg(long = "in-place", value_name = "DISK=PATH", required = true, value_parser = parse_in_place)]
        in_place: Vec<(String, String)>,
        /// Output format of disks not written in place.
        #[arg(long, default_value = "raw")]
        format: String,
        /// Only if the item is still at this revision.
        #[arg(long, value_name = "REV", value_parser = parse_if_match)]
        if_match: Option<String>,
        #[command(flatten)]
        op: OpArgs,
    },
    /// Reprotect a failed-over item: AGENT (listed for the item, at the site the machine now
    /// runs at) becomes its source and replication reverses; its first cycle sends only the
    /// chunks that differ from the vault's newest point.
    Reprotect {
        /// Item name.
        name: String,
        /// The agent that replicates the item from now on.
        #[arg(long)]
        agent: String,
        /// Only if the item is still at this revision.
        #[arg(long, value_name = "REV", value_parser = parse_if_match)]
        if_match: Option<String>,
        #[command(flatten)]
        op: OpArgs,
    },
    /// Make the pending failover final: the item becomes `failed-over`.
    Commit {
        /// Item name.
        name: String,
        /// Only if the item is still at this revision.
        #[arg(long, value_name = "REV", value_parser = parse_if_match)]
        if_match: Option<String>,
        #[command(flatten)]
        op: OpArgs,
    },
    /// Remove the item's test failover copy.
    Cleanup {
        /// Item name.
        name: String,
        /// Only if the item is still at this revision.
        #[arg(long, value_name = "REV", value_parser = parse_if_match)]
        if_match: Option<String>,
        #[command(flatten)]
        op: OpArgs,
    },
}

/// `DISK=PATH` of `--in-place`.
fn parse_in_place(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((d, p)) if !d.is_empty() && p.starts_with('/') => Ok((d.to_string(), p.to_string())),
        _ => Err("DISK=PATH, the path absolute (e.g. os=/dev/vg0/web-os)".into()),
    }
}

/// Which point a failover uses, and the disks' format.
#[derive(Args, Debug, Clone)]
pub struct FailoverPointArgs {
    /// Recovery point: `latest`, `latest-app-consistent`, a time (RFC 3339, e.g.
    /// 2026-11-27T05:20:00Z: the newest point at or before it) or a point id.
    #[arg(long, default_value = "latest")]
    point: String,
    /// Output format of the disks: raw, vhd, qcow2, vmdk, vhdx or vmdk-stream.
    #[arg(long, default_value = "raw")]
    format: String,
}

/// `ferry job …`.
#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// List jobs, newest first.
    List {
        /// Only the jobs of this item.
        #[arg(long)]
        item: Option<String>,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Show one job and its log.
    Show {
        /// Job id.
        id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Follow a job to its end; exit 1 if it fails.
    Wait {
        /// Job id.
        id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Cancel a job that has not started.
    Cancel {
        /// Job id.
        id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

fn item_table(i: &Value) -> String {
    let disks = i["disks"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|d| {
                    format!(
                        "{} ({})",
                        cell(&d["name"]),
                        human(d["size_bytes"].as_u64().unwrap_or(0))
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let mut rows = vec![
        ("name".into(), cell(&i["name"])),
        ("state".into(), cell(&i["state"])),
        (
            "paused".into(),
            if i["paused"].is_object() {
                format!(
                    "yes, since {} (by token {})",
                    cell(&i["paused"]["at"]),
                    cell(&i["paused"]["by"])
                )
            } else {
                "no".to_string()
            },
        ),
        ("vault".into(), cell(&i["vault"])),
        ("policy".into(), cell(&i["policy"])),
        ("disks".into(), disks),
        ("direction".into(), cell(&i["direction"])),
        ("active job".into(), cell(&i["active_job"])),
        ("points".into(), cell(&i["points"])),
        (
            "latest point".into(),
            if i["latest_point"].is_null() {
                "-".to_string()
            } else {
                format!(
                    "{} ({})",
                    cell(&i["latest_point"]["id"]),
                    cell(&i["latest_point"]["created"])
                )
            },
        ),
        (
            "failover".into(),
            if i["failover"].is_object() {
                format!(
                    "{} from point {} at {} ({}, job {})",
                    cell(&i["failover"]["mode"]),
                    cell(&i["failover"]["point"]),
                    cell(&i["failover"]["location"]),
                    cell(&i["failover"]["at"]),
                    cell(&i["failover"]["job"])
                )
            } else {
                "-".to_string()
            },
        ),
        (
            "test failover".into(),
            if i["test_failover"].is_object() {
                format!(
                    "point {} at {} ({}, job {}){}",
                    cell(&i["test_failover"]["point"]),
                    cell(&i["test_failover"]["location"]),
                    cell(&i["test_failover"]["at"]),
                    cell(&i["test_failover"]["job"]),
                    if i["test_failover"]["stale"] == true {
                        " STALE: clean it up (`ferry failover cleanup`)"
                    } else {
                        ""
                    }
                )
            } else {
                "-".to_string()
            },
        ),
        ("description".into(), cell(&i["description"])),
        ("revision".into(), cell(&i["revision"])),
        ("created".into(), cell(&i["created"])),
        ("updated".into(), cell(&i["updated"])),
    ];
    rows.extend(replication_rows(&i["replication"]));
    pairs(&rows)
}

/// The process role's figures of an item (absent when the appliance has no process role).
fn replication_rows(r: &Value) -> Vec<(String, String)> {
    if !r.is_object() {
        return Vec::new();
    }
    let bytes = |v: &Value| v.as_u64().map_or_else(|| "-".to_string(), crate::human);
    // A rate is a non-negative f64 rounded to 0.1: whole bytes are what people read.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rate = |v: &Value| {
        v.as_f64().map_or_else(
            || "-".to_string(),
            |b| format!("{}/s", crate::human(b as u64)),
        )
    };
    let secs = |v: &Value| {
        v.as_f64()
            .map_or_else(|| "-".to_string(), |s| format!("{s:.0} s"))
    };
    vec![
        ("backlog".into(), bytes(&r["backlog_bytes"])),
        ("ingest rate".into(), rate(&r["ingest_bytes_per_second"])),
        ("upload rate".into(), rate(&r["upload_bytes_per_second"])),
        ("time to drain".into(), secs(&r["time_to_drain_seconds"])),
        ("sessions".into(), cell(&r["sessions"])),
        (
            "last cycle".into(),
            if r["last_cycle"].is_null() {
                "-".to_string()
            } else {
                format!(
                    "{} (point {})",
                    cell(&r["last_cycle"]),
                    cell(&r["last_cycle_point"])
                )
            },
        ),
        (
            "last error".into(),
            if r["last_error"].is_null() {
                "-".to_string()
            } else {
                format!("{} ({})", cell(&r["last_error"]), cell(&r["last_error_at"]))
            },
        ),
    ]
}

fn job_table(j: &Value) -> String {
    let mut s = pairs(&[
        ("id".into(), cell(&j["id"])),
        ("kind".into(), cell(&j["kind"])),
        ("item".into(), cell(&j["item"])),
        ("state".into(), cell(&j["state"])),
        ("created".into(), cell(&j["created"])),
        ("started".into(), cell(&j["started"])),
        ("ended".into(), cell(&j["ended"])),
        ("error".into(), cell(&j["error"])),
    ]);
    let log: Vec<Vec<String>> = j["log"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|x| vec![cell(&x["time"]), cell(&x["message"])])
                .collect()
        })
        .unwrap_or_default();
    if !log.is_empty() {
        s.push('\n');
        s.push_str(&render(&["TIME", "LOG"], &log));
    }
    s
}

fn ended(j: &Value) -> bool {
    !matches!(j["state"].as_str(), Some("queued" | "running"))
}

/// Follows job `id` until it ends, printing new log lines (table output); returns the job.
async fn follow(c: &Client, id: &str, out: &OutputArgs) -> Result<Answer, ClientError> {
    let start = std::time::Instant::now();
    let mut shown = 0;
    loop {
        let a = c.send(Method::GET, &["jobs", id], &[], None, None).await?;
        if out.output == Output::Table {
            let lines = a.json["log"].as_array().cloned().unwrap_or_default();
            for l in lines.iter().skip(shown) {
                line(&format!("{}  {}", cell(&l["time"]), cell(&l["message"])));
            }
            shown = shown.max(lines.len());
        }
        if ended(&a.json) {
            return Ok(a);
        }
        if start.elapsed() > WAIT_AT_MOST {
            return Err(ClientError::Local(format!(
                "job {id} is still {} after {} s; follow it with `ferry job wait {id}`",
                cell(&a.json["state"]),
                WAIT_AT_MOST.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// After `--wait`: the job's outcome (an error when it did not succeed).
fn outcome(out: &OutputArgs, j: &Answer) -> Result<(), ClientError> {
    match out.output {
        Output::Json => line(j.text.trim()),
        Output::Table => line(&format!(
            "job {} ({} {}): {}",
            cell(&j.json["id"]),
            cell(&j.json["kind"]),
            cell(&j.json["item"]),
            cell(&j.json["state"])
        )),
    }
    if j.json["state"] == "succeeded" {
        Ok(())
    } else {
        Err(ClientError::Local(format!(
            "job {} {}: {}",
            cell(&j.json["id"]),
            cell(&j.json["state"]),
            cell(&j.json["error"])
        )))
    }
}

/// Prints the answer of an operation (item and job), or follows the job with `--wait`.
async fn operation(c: &Client, a: Answer, op: &OpArgs) -> Result<(), ClientError> {
    let id = a.json["job"]["id"].as_str().unwrap_or_default().to_string();
    if op.wait {
        if op.out.output == Output::Table {
            line(&format!(
                "item {} is {}; job {} ({}) queued",
                cell(&a.json["item"]["name"]),
                cell(&a.json["item"]["state"]),
                id,
                cell(&a.json["job"]["kind"])
            ));
        }
        let j = follow(c, &id, &op.out).await?;
        return outcome(&op.out, &j);
    }
    print_answer(&op.out, &a, |v| {
        format!(
            "item {} is {}; job {} ({}) queued: follow it with `ferry job wait {}`",
            cell(&v["item"]["name"]),
            cell(&v["item"]["state"]),
            id,
            cell(&v["job"]["kind"]),
            id
        )
    });
    Ok(())
}

pub(super) async fn item(cmd: ItemCmd) -> Result<(), ClientError> {
    let c = connect()?;
    match cmd {
        ItemCmd::List(l) => {
            let v = c.list(&["items"], &[], l.limit).await?;
            print_listing(
                &l,
                &v,
                &["NAME", "STATE", "POLICY", "VAULT", "DISKS", "JOB"],
                |i| {
                    vec![
                        cell(&i["name"]),
                        cell(&i["state"]),
                        cell(&i["policy"]),
                        cell(&i["vault"]),
                        i["disks"].as_array().map_or(0, Vec::len).to_string(),
                        cell(&i["active_job"]),
                    ]
                },
            );
        }
        ItemCmd::Show { name, out } => {
            let a = c
                .send(Method::GET, &["items", &name], &[], None, None)
                .await?;
            print_answer(&out, &a, item_table);
        }
        ItemCmd::Create {
            name,
            disks,
            vault,
            policy,
            description,
            op,
        } => {
            let mut body = json!({
                "name": name,
                "disks": disks.iter().map(|d| json!({"name": d.name, "size_bytes": d.size})).collect::<Vec<_>>(),
            });
            for (k, v) in [
                ("vault", vault),
                ("policy", policy),
                ("description", description),
            ] {
                if let Some(v) = v {
                    body[k] = v.into();
                }
            }
            let a = c
                .send(Method::POST, &["items"], &[], None, Some(&body))
                .await?;
            operation(&c, a, &op).await?;
        }
        ItemCmd::Update {
            name,
            policy,
            description,
            no_description,
            if_match,
            out,
        } => {
            let mut body = json!({});
            if let Some(p) = policy {
                body["policy"] = p.into();
            }
            if let Some(d) = description {
                body["description"] = d.into();
            } else if no_description {
                body["description"] = Value::Null;
            }
            let a = c
                .send(
                    Method::PATCH,
                    &["items", &name],
                    &[],
                    if_match.as_deref(),
                    Some(&body),
                )
                .await?;
            print_answer(&out, &a, item_table);
        }
        ItemCmd::Delete { name, if_match, op } => {
            let a = c
                .send(
                    Method::DELETE,
                    &["items", &name],
                    &[],
                    if_match.as_deref(),
                    None,
                )
                .await?;
            operation(&c, a, &op).await?;
        }
        ItemCmd::Pause {
            name,
            if_match,
            out,
        } => set_paused(&c, &name, "pause", if_match.as_deref(), &out).await?,
        ItemCmd::Resume {
            name,
            if_match,
            out,
        } => set_paused(&c, &name, "resume", if_match.as_deref(), &out).await?,
        ItemCmd::Resync { name, if_match, op } => {
            let a = c
                .send(
                    Method::POST,
                    &["items", &name, "resync"],
                    &[],
                    if_match.as_deref(),
                    None,
                )
                .await?;
            operation(&c, a, &op).await?;
        }
    }
    Ok(())
}

pub(super) async fn failover(cmd: FailoverCmd) -> Result<(), ClientError> {
    let c = connect()?;
    let mut group = false;
    let (path, body, if_match, op) = match cmd {
        FailoverCmd::Test {
            name,
            group: g,
            point,
            if_match,
            op,
        } => {
            group = g;
            (
                vec![name, "failover".to_string()],
                Some(
                    serde_json::json!({"type": "test", "point": point.point, "format": point.format}),
                ),
                if_match,
                op,
            )
        }
        FailoverCmd::Planned {
            name,
            group: g,
            format,
            if_match,
            op,
        } => {
            group = g;
            (
                vec![name, "failover".to_string()],
                Some(serde_json::json!({"type": "planned", "format": format})),
                if_match,
                op,
            )
        }
        FailoverCmd::Unplanned {
            name,
            group: g,
            point,
            if_match,
            op,
        } => {
            group = g;
            (
                vec![name, "failover".to_string()],
                Some(
                    serde_json::json!({"type": "unplanned", "point": point.point, "format": point.format}),
                ),
                if_match,
                op,
            )
        }
        FailoverCmd::Failback {
            name,
            in_place,
            format,
            if_match,
            op,
        } => (
            vec![name, "failover".to_string()],
            Some(serde_json::json!({
                "type": "planned",
                "format": format,
                "in_place": in_place
                    .iter()
                    .map(|(d, p)| serde_json::json!({"disk": d, "path": p}))
                    .collect::<Vec<_>>(),
            })),
            if_match,
            op,
        ),
        FailoverCmd::Reprotect {
            name,
            agent,
            if_match,
            op,
        } => (
            vec![name, "reprotect".to_string()],
            Some(serde_json::json!({ "agent": agent })),
            if_match,
            op,
        ),
        FailoverCmd::Commit { name, if_match, op } => {
            (vec![name, "commit".to_string()], None, if_match, op)
        }
        FailoverCmd::Cleanup { name, if_match, op } => (
            vec![name, "test-failover".to_string(), "cleanup".to_string()],
            None,
            if_match,
            op,
        ),
    };
    let mut segments = vec![if group { "groups" } else { "items" }];
    segments.extend(path.iter().map(String::as_str));
    let a = c
        .send(
            Method::POST,
            &segments,
            &[],
            if_match.as_deref(),
            body.as_ref(),
        )
        .await?;
    if group {
        return group_operation(&c, a, &op).await;
    }
    operation(&c, a, &op).await
}

/// The answer to a group failover: one line per member (item, job, point); with `--wait`,
/// follows every member's job to its end and fails if any failed.
async fn group_operation(c: &Client, a: Answer, op: &OpArgs) -> Result<(), ClientError> {
    let members = a.json["members"].as_array().cloned().unwrap_or_default();
    let summary = |v: &Value| {
        let mut out = format!(
            "group {}: {} member(s) queued{}",
            cell(&v["group"]),
            members.len(),
            if v["point_time"].is_string() {
                format!(", points at or before {}", cell(&v["point_time"]))
            } else {
                String::new()
            }
        );
        for m in &members {
            out.push_str(&format!(
                "\n  item {} is {}; job {} ({}), point {}",
                cell(&m["item"]["name"]),
                cell(&m["item"]["state"]),
                cell(&m["job"]["id"]),
                cell(&m["job"]["kind"]),
                if m["point"].is_string() {
                    cell(&m["point"])
                } else {
                    "its final cycle".to_string()
                }
            ));
        }
        out
    };
    if !op.wait {
        print_answer(&op.out, &a, |v| {
            format!("{}\nfollow them with `ferry job wait ID`", summary(v))
        });
        return Ok(());
    }
    if op.out.output == Output::Table {
        line(&summary(&a.json));
    }
    let mut failed = Vec::new();
    for m in &members {
        let id = m["job"]["id"].as_str().unwrap_or_default().to_string();
        let j = follow(c, &id, &op.out).await?;
        if let Err(e) = outcome(&op.out, &j) {
            failed.push(e.to_string());
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(ClientError::Local(failed.join("; ")))
    }
}

/// `ferry item pause|resume`: `verb` is the path's last segment; prints the item.
async fn set_paused(
    c: &Client,
    name: &str,
    verb: &str,
    if_match: Option<&str>,
    out: &OutputArgs,
) -> Result<(), ClientError> {
    let a = c
        .send(Method::POST, &["items", name, verb], &[], if_match, None)
        .await?;
    print_answer(out, &a, item_table);
    Ok(())
}

pub(super) async fn job(cmd: JobCmd) -> Result<(), ClientError> {
    let c = connect()?;
    match cmd {
        JobCmd::List { item, list } => {
            let q: Vec<(&str, String)> = item.into_iter().map(|i| ("item", i)).collect();
            let v = c.list(&["jobs"], &q, list.limit).await?;
            print_listing(
                &list,
                &v,
                &["ID", "KIND", "ITEM", "STATE", "CREATED", "ERROR"],
                |j| {
                    vec![
                        cell(&j["id"]),
                        cell(&j["kind"]),
                        cell(&j["item"]),
                        cell(&j["state"]),
                        cell(&j["created"]),
                        cell(&j["error"]),
                    ]
                },
            );
        }
        JobCmd::Show { id, out } => {
            let a = c.send(Method::GET, &["jobs", &id], &[], None, None).await?;
            print_answer(&out, &a, job_table);
        }
        JobCmd::Wait { id, out } => {
            let j = follow(&c, &id, &out).await?;
            outcome(&out, &j)?;
        }
        JobCmd::Cancel { id, out } => {
            let a = c
                .send(Method::POST, &["jobs", &id, "cancel"], &[], None, None)
                .await?;
            print_answer(&out, &a, job_table);
        }
    }
    Ok(())
}
