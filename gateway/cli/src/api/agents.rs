//! `ferry agent …` and `ferry group …`: enrolled agents, their one-time enrollment tokens,
//! and replication groups.
//!
//! `ferry agent token create NAME --item ITEM` prints the `ferry-agent enroll` command line
//! to run on the machine (the token in it is shown only this once); the appliance URL in it
//! is the one this client reached the appliance by.

use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use super::client::ClientError;
use super::table::{cell, pairs};
use super::{ListArgs, Output, OutputArgs, connect, parse_if_match, print_answer, print_listing};
use crate::line;

/// `ferry agent …`.
#[derive(Subcommand, Debug)]
pub enum AgentCmd {
    /// List enrolled agents (active and revoked).
    List(ListArgs),
    /// Show one agent.
    Show {
        /// Agent name.
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Set the protected items an agent acts for (replaces the list).
    Update {
        /// Agent name.
        name: String,
        /// A protected item; repeat for each (none: the agent acts for nothing).
        #[arg(long = "item", value_name = "ITEM")]
        items: Vec<String>,
        /// Only if the agent is still at this revision.
        #[arg(long, value_name = "REV", value_parser = parse_if_match)]
        if_match: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Revoke an agent: its certificate is refused from its next request on.
    Revoke {
        /// Agent name.
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// One-time enrollment tokens.
    Token {
        #[command(subcommand)]
        cmd: AgentTokenCmd,
    },
}

/// `ferry agent token …`.
#[derive(Subcommand, Debug)]
pub enum AgentTokenCmd {
    /// Create a one-time enrollment token and print the command to run on the machine.
    Create {
        /// The name the agent gets (e.g. the machine's).
        name: String,
        /// A protected item the agent will act for; repeat for each.
        #[arg(long = "item", value_name = "ITEM")]
        items: Vec<String>,
        /// How long the token can be used: seconds, or with a unit (`90s`, `30m`, `24h`,
        /// `7d`).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: u64,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// List enrollment tokens (never their secrets).
    List(ListArgs),
    /// Revoke an enrollment token that has not been used.
    Revoke {
        /// Token id (see `ferry agent token list`).
        id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// `ferry group …`.
#[derive(Subcommand, Debug)]
pub enum GroupCmd {
    /// List replication groups.
    List(ListArgs),
    /// Show one group.
    Show {
        /// Group name.
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Create a replication group of protected items (failed over together).
    Create {
        /// Group name.
        name: String,
        /// A protected item; repeat for each (an item is in one group at most).
        #[arg(long = "item", value_name = "ITEM")]
        items: Vec<String>,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Change a group's members or description.
    Update {
        /// Group name.
        name: String,
        /// The new members (replaces the list); repeat for each.
        #[arg(long = "item", value_name = "ITEM")]
        items: Vec<String>,
        /// Remove every member.
        #[arg(long, conflicts_with = "items")]
        no_items: bool,
        /// New description.
        #[arg(long, conflicts_with = "no_description")]
        description: Option<String>,
        /// Remove the description.
        #[arg(long)]
        no_description: bool,
        /// Only if the group is still at this revision.
        #[arg(long, value_name = "REV", value_parser = parse_if_match)]
        if_match: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Delete a group (its items stay protected).
    Delete {
        /// Group name.
        name: String,
        /// Only if the group is still at this revision.
        #[arg(long, value_name = "REV", value_parser = parse_if_match)]
        if_match: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// Seconds of `90`, `90s`, `30m`, `24h` or `7d`.
fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1),
        Some((i, 'm')) => (&t[..i], 60),
        Some((i, 'h')) => (&t[..i], 3600),
        Some((i, 'd')) => (&t[..i], 86_400),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("`{s}` is not a duration (e.g. 3600, 90s, 30m, 24h, 7d)"))
}

fn list_of(v: &Value) -> String {
    v.as_array()
        .map(|a| a.iter().map(cell).collect::<Vec<_>>().join(", "))
        .unwrap_or_default()
}

fn agent_block(a: &Value) -> String {
    pairs(&[
        ("name".into(), cell(&a["name"])),
        ("state".into(), cell(&a["state"])),
        ("items".into(), list_of(&a["items"])),
        ("hostname".into(), cell(&a["hostname"])),
        ("agent version".into(), cell(&a["agent_version"])),
        ("enrolled".into(), cell(&a["enrolled"])),
        ("last seen".into(), cell(&a["last_seen"])),
        ("revoked".into(), cell(&a["revoked"])),
        (
            "certificate".into(),
            format!(
                "SHA256 {} (serial {}, expires {})",
                cell(&a["certificate"]["sha256"]),
                cell(&a["certificate"]["serial"]),
                cell(&a["certificate"]["expires"])
            ),
        ),
        ("revision".into(), cell(&a["revision"])),
    ])
}

fn group_block(g: &Value) -> String {
    pairs(&[
        ("name".into(), cell(&g["name"])),
        ("items".into(), list_of(&g["items"])),
        ("description".into(), cell(&g["description"])),
        ("revision".into(), cell(&g["revision"])),
        ("created".into(), cell(&g["created"])),
        ("updated".into(), cell(&g["updated"])),
    ])
}

/// Runs `ferry agent …`.
pub async fn agent(cmd: AgentCmd) -> Result<(), ClientError> {
    let c = connect()?;
    match cmd {
        AgentCmd::List(l) => {
            let v = c.list(&["agents"], &[], l.limit).await?;
            print_listing(
                &l,
                &v,
                &[
                    "NAME",
                    "STATE",
                    "ITEMS",
                    "HOSTNAME",
                    "LAST SEEN",
                    "CERT EXPIRES",
                ],
                |a| {
                    vec![
                        cell(&a["name"]),
                        cell(&a["state"]),
                        list_of(&a["items"]),
                        cell(&a["hostname"]),
                        cell(&a["last_seen"]),
                        cell(&a["certificate"]["expires"]),
                    ]
                },
            );
        }
        AgentCmd::Show { name, out } => {
            let a = c
                .send(Method::GET, &["agents", &name], &[], None, None)
                .await?;
            print_answer(&out, &a, agent_block);
        }
        AgentCmd::Update {
            name,
            items,
            if_match,
            out,
        } => {
            let a = c
                .send(
                    Method::PATCH,
                    &["agents", &name],
                    &[],
                    if_match.as_deref(),
                    Some(&json!({ "items": items })),
                )
                .await?;
            print_answer(&out, &a, |a| format!("updated agent\n{}", agent_block(a)));
        }
        AgentCmd::Revoke { name, out } => {
            let a = c
                .send(Method::DELETE, &["agents", &name], &[], None, None)
                .await?;
            print_answer(&out, &a, |a| {
                format!(
                    "revoked agent {}: its certificate is refused from now on",
                    cell(&a["name"])
                )
            });
        }
        AgentCmd::Token { cmd } => token(&c, cmd).await?,
    }
    Ok(())
}

async fn token(c: &super::client::Client, cmd: AgentTokenCmd) -> Result<(), ClientError> {
    match cmd {
        AgentTokenCmd::Create {
            name,
            items,
            ttl,
            out,
        } => {
            let a = c
                .send(
                    Method::POST,
                    &["enrollment-tokens"],
                    &[],
                    None,
                    Some(&json!({ "agent": name, "items": items, "ttl_seconds": ttl })),
                )
                .await?;
            // Printing the command (with its one-time token) is this command's purpose.
            match out.output {
                Output::Json => line(a.text.trim()),
                Output::Table => {
                    line(&format!(
                        "enrollment token {} for agent {} (acts for: {}), usable once until {}.\n\
                         Run this on the machine (as root):\n\n  {}\n",
                        cell(&a.json["id"]),
                        cell(&a.json["agent"]),
                        match list_of(&a.json["items"]) {
                            s if s.is_empty() => "no item yet".to_string(),
                            s => s,
                        },
                        cell(&a.json["expires"]),
                        cell(&a.json["command"]),
                    ));
                    eprintln!("ferry: the token is shown only this once");
                }
            }
        }
        AgentTokenCmd::List(l) => {
            let v = c.list(&["enrollment-tokens"], &[], l.limit).await?;
            print_listing(&l, &v, &["ID", "AGENT", "ITEMS", "STATE", "EXPIRES"], |t| {
                vec![
                    cell(&t["id"]),
                    cell(&t["agent"]),
                    list_of(&t["items"]),
                    cell(&t["state"]),
                    cell(&t["expires"]),
                ]
            });
        }
        AgentTokenCmd::Revoke { id, out } => {
            let a = c
                .send(Method::DELETE, &["enrollment-tokens", &id], &[], None, None)
                .await?;
            print_answer(&out, &a, |t| {
                format!(
                    "enrollment token {} for agent {}: {}",
                    cell(&t["id"]),
                    cell(&t["agent"]),
                    cell(&t["state"])
                )
            });
        }
    }
    Ok(())
}

/// Runs `ferry group …`.
pub async fn group(cmd: GroupCmd) -> Result<(), ClientError> {
    let c = connect()?;
    match cmd {
        GroupCmd::List(l) => {
            let v = c.list(&["groups"], &[], l.limit).await?;
            print_listing(&l, &v, &["NAME", "ITEMS", "REVISION", "DESCRIPTION"], |g| {
                vec![
                    cell(&g["name"]),
                    list_of(&g["items"]),
                    cell(&g["revision"]),
                    cell(&g["description"]),
                ]
            });
        }
        GroupCmd::Show { name, out } => {
            let a = c
                .send(Method::GET, &["groups", &name], &[], None, None)
                .await?;
            print_answer(&out, &a, group_block);
        }
        GroupCmd::Create {
            name,
            items,
            description,
            out,
        } => {
            let a = c
                .send(
                    Method::POST,
                    &["groups"],
                    &[],
                    None,
                    Some(&json!({ "name": name, "items": items, "description": description })),
                )
                .await?;
            print_answer(&out, &a, |g| format!("created group\n{}", group_block(g)));
        }
        GroupCmd::Update {
            name,
            items,
            no_items,
            description,
            no_description,
            if_match,
            out,
        } => {
            let mut body = serde_json::Map::new();
            if no_items || !items.is_empty() {
                body.insert("items".into(), json!(items));
            }
            if no_description {
                body.insert("description".into(), Value::Null);
            } else if let Some(d) = description {
                body.insert("description".into(), json!(d));
            }
            if body.is_empty() {
                return Err(ClientError::Local(
                    "nothing to change: give --item, --no-items, --description or --no-description"
                        .into(),
                ));
            }
            let a = c
                .send(
                    Method::PATCH,
                    &["groups", &name],
                    &[],
                    if_match.as_deref(),
                    Some(&Value::Object(body)),
                )
                .await?;
            print_answer(&out, &a, |g| format!("updated group\n{}", group_block(g)));
        }
        GroupCmd::Delete {
            name,
            if_match,
            out,
        } => {
            let a = c
                .send(
                    Method::DELETE,
                    &["groups", &name],
                    &[],
                    if_match.as_deref(),
                    None,
                )
                .await?;
            print_answer(&out, &a, |g| {
                format!(
                    "deleted group {} (its items stay protected)",
                    cell(&g["name"])
                )
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3600").unwrap(), 3600);
        assert_eq!(parse_duration("90s").unwrap(), 90);
        assert_eq!(parse_duration("30m").unwrap(), 1800);
        assert_eq!(parse_duration("24h").unwrap(), 86_400);
        assert_eq!(parse_duration("7d").unwrap(), 604_800);
        for bad in ["", "h", "1.5h", "-1", "1w", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
