//! Which local device or image file is which disk of which protected item, and how the agent
//! takes its point-in-time view of it: the `[[disk]]` entries and the `[replication]` table of
//! `agent.toml`, and the `ferry-agent disk add | list | remove` commands that edit them.
//!
//! The gateway knows an item's disks by name and size only; the mapping to a path on this
//! machine (a raw block device such as `/dev/sdb`, or an image file) and the snapshot method
//! are local facts, so they live in the agent's state directory next to the enrollment. Every
//! edit rewrites `agent.toml` atomically ([`crate::state::StateDir::update_config`]), under a
//! lock, so two concurrent edits cannot lose one another and a crash leaves the old file or the
//! new one, never a mix. Entries are checked when written and again when read
//! ([`DiskConfig::check`]), so a hand-edited file cannot smuggle in a name the protocol refuses
//! or a quiesce without its thaw command.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::AgentError;
use crate::state::{AgentFile, StateDir};
use crate::throttle::{Schedule, ThrottleWindow};

/// Default window of unacknowledged frame bytes (`docs/agent-protocol.md` §7.5 suggests 16 MiB).
pub const DEFAULT_WINDOW_BYTES: u64 = 16 << 20;
/// Smallest window accepted: one smallest chunk.
pub const MIN_WINDOW_BYTES: u64 = 64 << 10;
/// Default time without an acknowledgement, while frames are in flight, before reconnecting.
pub const DEFAULT_ACK_TIMEOUT_SECONDS: u32 = 60;
/// Default time `ferry-agent run` waits for `PointCommitted` after a cycle's last ack.
pub const DEFAULT_RUN_COMMIT_TIMEOUT_SECONDS: u32 = 60;
/// Default LVM snapshot size (`lvcreate -l`): a tenth of the origin volume.
pub const DEFAULT_LVM_SNAPSHOT_SIZE: &str = "10%ORIGIN";

/// How the agent takes its point-in-time view of a disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// No snapshot: the path is read live (crash consistency only if nothing writes to it).
    #[default]
    None,
    /// A copy-on-write clone (`FICLONE`) of an image file, on a file system that supports it
    /// (btrfs, XFS with reflink); the clone lives in the state directory during the cycle.
    Reflink,
    /// An LVM snapshot of the logical volume `/dev/VG/LV` (`lvcreate --snapshot`), removed
    /// (`lvremove -f`) once the cycle is acknowledged or abandoned.
    Lvm,
    /// The configured `pre_snapshot` command (e.g. `fsfreeze -f /data`), the read, then the
    /// `post_snapshot` command (e.g. `fsfreeze -u /data`), which runs on every path.
    Quiesce,
}

impl SnapshotMode {
    /// Its name in `agent.toml` and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Reflink => "reflink",
            Self::Lvm => "lvm",
            Self::Quiesce => "quiesce",
        }
    }

    /// The value a name stands for.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "reflink" => Ok(Self::Reflink),
            "lvm" => Ok(Self::Lvm),
            "quiesce" => Ok(Self::Quiesce),
            _ => Err(format!(
                "`{s}` is not a snapshot method (none, reflink, lvm, quiesce)"
            )),
        }
    }

    /// The `EndOfCycle` snapshot value.
    pub fn wire(self) -> ferry_proto::frame::Snapshot {
        use ferry_proto::frame::Snapshot;
        match self {
            Self::None => Snapshot::None,
            Self::Reflink => Snapshot::Reflink,
            Self::Lvm => Snapshot::Lvm,
            Self::Quiesce => Snapshot::Quiesce,
        }
    }
}

fn is_default_mode(m: &SnapshotMode) -> bool {
    *m == SnapshotMode::None
}

/// One `[[disk]]` entry of `agent.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The protected item (a name the enrollment lists).
    pub item: String,
    /// The disk's name in the item (the `Hello`'s `disk`).
    pub name: String,
    /// The raw block device or image file read, absolute.
    pub path: PathBuf,
    /// How the file is read: `raw` (the default: the bytes are the disk), or a disk container
    /// read through its built-in source adapter — `vmdk`, `vhdx`, `vhd` (`crate::source`;
    /// `disk add --format auto` probes once and records the format found).
    #[serde(default = "raw_format", skip_serializing_if = "is_raw")]
    pub format: String,
    /// The command (argv, no shell) that prints the change-tracking document of a delta
    /// cycle (CBT, RCT, a checksum list), translated by the format's adapter; empty: every
    /// allocated chunk is read and compared (`crate::source`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<String>,
    /// How the point-in-time view is taken (default `none`).
    #[serde(default, skip_serializing_if = "is_default_mode")]
    pub snapshot: SnapshotMode,
    /// `lvm` only: the snapshot's size, `lvcreate -l` when it contains `%` (e.g. `10%ORIGIN`,
    /// the default), else `-L` (e.g. `20G`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lvm_snapshot_size: Option<String>,
    /// `quiesce` only: the command run before reading (argv, no shell).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_snapshot: Vec<String>,
    /// `quiesce` only: the command run after reading, whatever happened (argv, no shell).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post_snapshot: Vec<String>,
    /// Application consistency: run before the view is taken (argv, no shell). Needs a
    /// snapshot method other than `none`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub app_pre: Vec<String>,
    /// Application consistency: run once the view is taken, whatever happened (argv).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub app_post: Vec<String>,
}

impl DiskConfig {
    /// A disk read live, without commands.
    pub fn new(item: &str, name: &str, path: impl Into<PathBuf>) -> Self {
        Self {
            item: item.to_string(),
            name: name.to_string(),
            path: path.into(),
            format: raw_format(),
            changes: Vec::new(),
            snapshot: SnapshotMode::None,
            lvm_snapshot_size: None,
            pre_snapshot: Vec::new(),
            post_snapshot: Vec::new(),
            app_pre: Vec::new(),
            app_post: Vec::new(),
        }
    }

    /// `item/name`, as messages show the disk.
    pub fn label(&self) -> String {
        format!("{}/{}", self.item, self.name)
    }

    /// Whether application-consistent cycles are possible (both app commands configured).
    pub fn app_consistent(&self) -> bool {
        !self.app_pre.is_empty() && !self.app_post.is_empty()
    }

    /// The LVM snapshot size to ask for.
    pub fn lvm_size(&self) -> &str {
        self.lvm_snapshot_size
            .as_deref()
            .unwrap_or(DEFAULT_LVM_SNAPSHOT_SIZE)
    }

    /// Checks the entry: names follow the item naming rule, the path is absolute, the
    /// commands fit the snapshot method. The message names the disk and the field.
    pub fn check(&self) -> Result<(), String> {
        let who = self.label();
        check_name(&self.item).map_err(|e| format!("disk {who}: item: {e}"))?;
        check_name(&self.name).map_err(|e| format!("disk {who}: name: {e}"))?;
        if !self.path.is_absolute() {
            return Err(format!(
                "disk {who}: path `{}` is not absolute",
                self.path.display()
            ));
        }
        let quiesce = self.snapshot == SnapshotMode::Quiesce;
        if quiesce && (self.pre_snapshot.is_empty() || self.post_snapshot.is_empty()) {
            return Err(format!(
                "disk {who}: snapshot `quiesce` needs both `pre_snapshot` and `post_snapshot` commands"
            ));
        }
        if !quiesce && (!self.pre_snapshot.is_empty() || !self.post_snapshot.is_empty()) {
            return Err(format!(
                "disk {who}: `pre_snapshot`/`post_snapshot` are for snapshot `quiesce` only (this disk's is `{}`)",
                self.snapshot.as_str()
            ));
        }
        if self.app_pre.is_empty() != self.app_post.is_empty() {
            return Err(format!(
                "disk {who}: `app_pre` and `app_post` go together (one thaws what the other froze)"
            ));
        }
        if self.app_consistent() && self.snapshot == SnapshotMode::None {
            return Err(format!(
                "disk {who}: application consistency needs a point-in-time view (snapshot reflink, lvm or quiesce), not `none`"
            ));
        }
        ferry_builtin_plugins::for_format(&self.format).map_err(|e| format!("disk {who}: {e}"))?;
        if self.format == "auto" {
            return Err(format!(
                "disk {who}: format `auto` is resolved when the disk is added (`ferry-agent disk add --format auto`); name the disk's format"
            ));
        }
        if self.snapshot == SnapshotMode::Lvm && self.format != "raw" {
            return Err(format!(
                "disk {who}: snapshot `lvm` reads a logical volume, which is format `raw` (this disk's is `{}`)",
                self.format
            ));
        }
        for (field, argv) in [
            ("changes", &self.changes),
            ("pre_snapshot", &self.pre_snapshot),
            ("post_snapshot", &self.post_snapshot),
            ("app_pre", &self.app_pre),
            ("app_post", &self.app_post),
        ] {
            if argv.first().is_some_and(|p| p.is_empty()) {
                return Err(format!("disk {who}: `{field}` has an empty program name"));
            }
        }
        if self.snapshot == SnapshotMode::Lvm {
            lvm_volume(&self.path).map_err(|e| format!("disk {who}: {e}"))?;
            check_lvm_size(self.lvm_size()).map_err(|e| format!("disk {who}: {e}"))?;
        } else if self.lvm_snapshot_size.is_some() {
            return Err(format!(
                "disk {who}: `lvm_snapshot_size` is for snapshot `lvm` only"
            ));
        }
        Ok(())
    }
}

fn raw_format() -> String {
    "raw".to_string()
}

fn is_raw(f: &str) -> bool {
    f == "raw"
}

/// The volume group and logical volume of an LVM path `/dev/VG/LV`.
pub fn lvm_volume(path: &Path) -> Result<(String, String), String> {
    let parts: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    match parts.as_slice() {
        [root, dev, vg, lv] if root == "/" && dev == "dev" && vg != "mapper" => {
            Ok((vg.clone(), lv.clone()))
        }
        _ => Err(format!(
            "snapshot `lvm` needs the logical volume as `/dev/VG/LV`, not `{}`",
            path.display()
        )),
    }
}

fn check_lvm_size(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 32
        && s.chars().next().is_some_and(|c| c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '%' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`lvm_snapshot_size` `{s}` is not an LVM size (e.g. `20G`, `10%ORIGIN`)"
        ))
    }
}

/// The `[replication]` table of `agent.toml`: flow control and pacing of the data port
/// sessions. Every key is optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Most unacknowledged frame bytes in flight per session (default 16 MiB; at least
    /// 64 KiB; one frame is always allowed when none is in flight).
    #[serde(default = "default_window")]
    pub window_bytes: u64,
    /// Seconds without an acknowledgement, while frames are in flight, before reconnecting
    /// (default 60).
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_seconds: u32,
    /// Most frame bytes sent per second, per session (default: unlimited), outside every
    /// `throttle` window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes_per_second: Option<u64>,
    /// Seconds `ferry-agent run` waits for `PointCommitted` after a cycle's last ack
    /// (default 60; `sync --once` has `--commit-timeout`).
    #[serde(default = "default_commit_timeout")]
    pub commit_timeout_seconds: u32,
    /// `host:port` to dial for the data port instead of the gateway's host and the plan's
    /// port (a relay or NAT in between). TLS still verifies the gateway's own name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_address: Option<String>,
    /// `[[replication.throttle]]`: rates by time of day, the first matching window winning
    /// over `max_bytes_per_second` ([`crate::throttle`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub throttle: Vec<ThrottleWindow>,
}

fn default_window() -> u64 {
    DEFAULT_WINDOW_BYTES
}
fn default_ack_timeout() -> u32 {
    DEFAULT_ACK_TIMEOUT_SECONDS
}
fn default_commit_timeout() -> u32 {
    DEFAULT_RUN_COMMIT_TIMEOUT_SECONDS
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            window_bytes: DEFAULT_WINDOW_BYTES,
            ack_timeout_seconds: DEFAULT_ACK_TIMEOUT_SECONDS,
            max_bytes_per_second: None,
            commit_timeout_seconds: DEFAULT_RUN_COMMIT_TIMEOUT_SECONDS,
            data_address: None,
            throttle: Vec::new(),
        }
    }
}

impl ReplicationConfig {
    /// Checks the values; the message names the key.
    pub fn check(&self) -> Result<(), String> {
        if self.window_bytes < MIN_WINDOW_BYTES {
            return Err(format!(
                "[replication] window_bytes {} is below the smallest window, {MIN_WINDOW_BYTES}",
                self.window_bytes
            ));
        }
        if self.ack_timeout_seconds == 0 {
            return Err("[replication] ack_timeout_seconds must be at least 1".into());
        }
        if self.max_bytes_per_second == Some(0) {
            return Err(
                "[replication] max_bytes_per_second must be at least 1 (leave it out for no limit)"
                    .into(),
            );
        }
        if let Some(a) = &self.data_address {
            parse_address(a).map_err(|e| format!("[replication] data_address: {e}"))?;
        }
        self.schedule()?;
        Ok(())
    }

    /// The rates by time of day: the `throttle` windows over `max_bytes_per_second`. The
    /// message names the window and the key.
    pub fn schedule(&self) -> Result<Schedule, String> {
        Schedule::parse(self.max_bytes_per_second, &self.throttle)
    }
}

/// The `[failover]` table of `agent.toml`: what the agent does for a planned failover.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverConfig {
    /// Run once (argv, no shell) before the first final cycle of an item's planned failover
    /// takes its view: stops the workload writing to the disks (`["systemctl", "stop",
    /// "postgresql"]`), so the final cycle holds every write. Without it, writes made while
    /// the final cycle is sent are lost at failover. Empty: nothing is run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quiesce_command: Vec<String>,
    /// Run once (argv, no shell) after every disk of an item sent its final cycle for a
    /// planned failover: stops the source (`["systemctl", "poweroff"]`, `["virsh",
    /// "shutdown", "web-01"]`) so nothing more is written to it. Empty: nothing is run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop_command: Vec<String>,
}

/// `host:port` (`[v6]:port` for IPv6) split; the host keeps its brackets.
pub fn parse_address(a: &str) -> Result<(String, u16), String> {
    let (host, port) = a
        .rsplit_once(':')
        .ok_or_else(|| format!("`{a}` is not host:port"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("`{a}`: `{port}` is not a port (1 to 65535)"))?;
    if host.is_empty() {
        return Err(format!("`{a}` has no host"));
    }
    Ok((host.to_string(), port))
}

/// The item naming rule of the vault and the protocol: 1 to 128 bytes of `A–Z a–z 0–9 . _ -`,
/// not starting with `.` or `-`.
pub fn check_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("empty name".into());
    }
    if s.len() > ferry_proto::frame::MAX_NAME_LEN {
        return Err(format!(
            "`{}…` is longer than {} bytes",
            &s[..s.floor_char_boundary(32)],
            ferry_proto::frame::MAX_NAME_LEN
        ));
    }
    if s.starts_with('.') || s.starts_with('-') {
        return Err(format!("`{s}` starts with `.` or `-`"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "`{}` holds {c:?}; names are letters, digits, `.`, `_` and `-`",
            s.escape_debug()
        ));
    }
    Ok(())
}

/// `ITEM/DISK=PATH`, as `ferry-agent enroll --disk` takes it.
pub fn parse_disk_arg(s: &str) -> Result<DiskConfig, String> {
    let (left, path) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not ITEM/DISK=PATH"))?;
    let (item, name) = left
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not ITEM/DISK=PATH"))?;
    let d = DiskConfig::new(item, name, path);
    d.check()?;
    Ok(d)
}

/// A command line given as a flag: a JSON array of strings (`["fsfreeze","-f","/data"]`), or
/// words separated by white space (no quoting).
pub fn parse_argv(s: &str) -> Result<Vec<String>, String> {
    let t = s.trim();
    let argv: Vec<String> = if t.starts_with('[') {
        serde_json::from_str(t)
            .map_err(|e| format!("`{s}` is not a JSON array of strings ({e})"))?
    } else {
        t.split_whitespace().map(str::to_string).collect()
    };
    if argv.is_empty() || argv[0].is_empty() {
        return Err("an empty command".into());
    }
    Ok(argv)
}

/// Checks a whole list of disks: each entry, and no (item, disk) or path twice.
pub fn check_all(disks: &[DiskConfig]) -> Result<(), String> {
    for (i, d) in disks.iter().enumerate() {
        d.check()?;
        for e in &disks[..i] {
            if (e.item.as_str(), e.name.as_str()) == (d.item.as_str(), d.name.as_str()) {
                return Err(format!("disk {} is configured twice", d.label()));
            }
            if e.path == d.path {
                return Err(format!(
                    "disks {} and {} have the same path `{}`",
                    e.label(),
                    d.label(),
                    d.path.display()
                ));
            }
        }
    }
    Ok(())
}

/// Refuses a disk of an item the enrollment does not list (when `agent.toml` records the
/// enrollment's items: files written before it did are not checked here; the gateway checks
/// at sync time).
pub fn check_item_listed(file: &AgentFile, item: &str) -> Result<(), String> {
    match &file.items {
        Some(items) if !items.iter().any(|i| i == item) => Err(format!(
            "the enrollment of agent `{}` does not list item `{item}` (it lists: {}); if the operator granted it since, `--force` adds the disk anyway and the gateway decides at sync time",
            file.agent,
            if items.is_empty() {
                "none".to_string()
            } else {
                items.join(", ")
            }
        )),
        _ => Ok(()),
    }
}

/// `ferry-agent disk add`: records `disk` (refused if the (item, disk) or its path is already
/// there, or the enrollment does not list the item, unless `force` for the latter).
pub fn add(dir: &Path, disk: DiskConfig, force: bool) -> Result<DiskConfig, AgentError> {
    disk.check().map_err(AgentError::Usage)?;
    let state = StateDir::new(dir);
    state.update_config::<AgentError>(|file| {
        if !force {
            check_item_listed(file, &disk.item).map_err(AgentError::Usage)?;
        }
        let mut disks = file.disk.clone();
        disks.push(disk.clone());
        check_all(&disks).map_err(AgentError::Usage)?;
        file.disk = disks;
        Ok(())
    })?;
    Ok(disk)
}

/// `ferry-agent disk remove`: forgets the disk's configuration. Its replication state
/// (`disks/ITEM/DISK/`) stays: it describes the replica on the gateway, so adding the disk
/// again (even with another path) continues with deltas.
pub fn remove(dir: &Path, item: &str, name: &str) -> Result<DiskConfig, AgentError> {
    let state = StateDir::new(dir);
    let mut removed = None;
    state.update_config::<AgentError>(|file| {
        let pos = file
            .disk
            .iter()
            .position(|d| d.item == item && d.name == name)
            .ok_or_else(|| AgentError::Usage(format!("no disk {item}/{name} is configured")))?;
        removed = Some(file.disk.remove(pos));
        Ok(())
    })?;
    Ok(removed.expect("set when the update succeeded"))
}

/// `ferry-agent disk list`: the configured disks.
pub fn list(dir: &Path) -> Result<Vec<DiskConfig>, AgentError> {
    Ok(StateDir::new(dir).read_config()?.disk)
}

/// The disks as aligned columns.
pub fn render_table(disks: &[DiskConfig]) -> String {
    if disks.is_empty() {
        return "no disk configured (`ferry-agent disk add ITEM DISK PATH`)\n".into();
    }
    let rows: Vec<[String; 7]> = disks
        .iter()
        .map(|d| {
            let app = if d.app_consistent() {
                d.app_pre.join(" ")
            } else {
                "-".into()
            };
            // The program only: arguments may carry what should not be on a screen.
            let changes = d.changes.first().map_or("-".into(), |p| format!("{p} …"));
            [
                d.item.clone(),
                d.name.clone(),
                d.path.display().to_string(),
                d.format.clone(),
                d.snapshot.as_str().to_string(),
                changes,
                app,
            ]
        })
        .collect();
    let header = [
        "ITEM", "DISK", "PATH", "FORMAT", "SNAPSHOT", "CHANGES", "APP PRE",
    ];
    let mut w = header.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: [&str; 7]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            s.push_str(c);
            if i + 1 < cells.len() {
                s.push_str(&" ".repeat(w[i] - c.chars().count() + 2));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(header);
    for r in &rows {
        out.push_str(&line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5], &r[6]]));
    }
    out
}

/// The disks as one JSON line: `[{"item", "name", "path", "snapshot", …}]`.
pub fn render_json(disks: &[DiskConfig]) -> String {
    serde_json::to_string(disks).expect("disks serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_item_rule() {
        for ok in ["sda", "web-01", "a.b_c", "A9"] {
            check_name(ok).unwrap();
        }
        for bad in ["", ".x", "-x", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn disk_args_and_commands_parse() {
        let d = parse_disk_arg("web/sda=/dev/sda").unwrap();
        assert_eq!((d.item.as_str(), d.name.as_str()), ("web", "sda"));
        assert_eq!(d.path, PathBuf::from("/dev/sda"));
        assert_eq!(d.snapshot, SnapshotMode::None);
        for bad in ["web=/dev/sda", "web/sda", "web/sda=rel/path", "w b/sda=/x"] {
            assert!(parse_disk_arg(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_argv(" fsfreeze -f /data ").unwrap(),
            ["fsfreeze", "-f", "/data"]
        );
        assert_eq!(
            parse_argv(r#"["/bin/sh","-c","echo a b"]"#).unwrap(),
            ["/bin/sh", "-c", "echo a b"]
        );
        assert!(parse_argv("  ").is_err());
        assert!(parse_argv("[1]").is_err());
    }

    #[test]
    fn commands_must_fit_the_snapshot_method() {
        let mut d = DiskConfig::new("web", "sda", "/img/web.raw");
        d.snapshot = SnapshotMode::Quiesce;
        assert!(d.check().unwrap_err().contains("needs both"));
        d.pre_snapshot = vec!["fsfreeze".into(), "-f".into(), "/data".into()];
        d.post_snapshot = vec!["fsfreeze".into(), "-u".into(), "/data".into()];
        d.check().unwrap();
        d.snapshot = SnapshotMode::Reflink;
        assert!(d.check().unwrap_err().contains("quiesce` only"));
        d.pre_snapshot.clear();
        d.post_snapshot.clear();
        d.app_pre = vec!["freeze-db".into()];
        d.app_post = vec!["thaw-db".into()];
        d.snapshot = SnapshotMode::None;
        assert!(d.check().unwrap_err().contains("point-in-time view"));
        d.snapshot = SnapshotMode::Reflink;
        d.app_post.clear();
        assert!(d.check().unwrap_err().contains("go together"));
        d.app_post = vec!["thaw-db".into()];
        d.check().unwrap();
        assert!(d.app_consistent());
        d.snapshot = SnapshotMode::Lvm;
        assert!(d.check().unwrap_err().contains("/dev/VG/LV"));
        d.path = "/dev/vg0/data".into();
        d.check().unwrap();
        assert_eq!(lvm_volume(&d.path).unwrap(), ("vg0".into(), "data".into()));
        d.lvm_snapshot_size = Some("20G; rm -rf".into());
        assert!(d.check().unwrap_err().contains("not an LVM size"));
        d.lvm_snapshot_size = Some("20G".into());
        d.check().unwrap();
        assert!(lvm_volume(Path::new("/dev/mapper/vg0-data")).is_err());
        // A logical volume is raw, and only known formats are accepted.
        d.format = "vhdx".into();
        assert!(d.check().unwrap_err().contains("format `raw`"));
        d.snapshot = SnapshotMode::Reflink;
        d.lvm_snapshot_size = None;
        d.check().unwrap();
        d.format = "zip".into();
        let e = d.check().unwrap_err();
        assert!(e.contains("`zip`") && e.contains("vmdk"), "{e}");
        d.format = "auto".into();
        assert!(
            d.check()
                .unwrap_err()
                .contains("resolved when the disk is added")
        );
        d.format = "vmdk".into();
        d.changes = vec![String::new()];
        assert!(
            d.check()
                .unwrap_err()
                .contains("`changes` has an empty program")
        );
        // A file written before `format` and `changes` existed reads as raw without a list.
        let old: DiskConfig =
            toml::from_str("item = \"web\"\nname = \"sda\"\npath = \"/dev/sda\"\n").unwrap();
        assert_eq!((old.format.as_str(), old.changes.len()), ("raw", 0));
        assert!(!toml::to_string(&old).unwrap().contains("format"));
    }

    #[test]
    fn duplicates_are_refused() {
        let a = DiskConfig::new("web", "sda", "/dev/sda");
        let b = DiskConfig::new("web", "sdb", "/dev/sdb");
        check_all(&[a.clone(), b.clone()]).unwrap();
        assert!(
            check_all(&[a.clone(), a.clone()])
                .unwrap_err()
                .contains("twice")
        );
        let mut c = b.clone();
        c.path = a.path.clone();
        assert!(check_all(&[a, c]).unwrap_err().contains("same path"));
    }

    #[test]
    fn replication_settings_are_checked() {
        ReplicationConfig::default().check().unwrap();
        let mut r = ReplicationConfig {
            window_bytes: 1,
            ..Default::default()
        };
        assert!(r.check().unwrap_err().contains("window_bytes"));
        r.window_bytes = MIN_WINDOW_BYTES;
        r.max_bytes_per_second = Some(0);
        assert!(r.check().unwrap_err().contains("max_bytes_per_second"));
        r.max_bytes_per_second = Some(100);
        r.throttle = vec![ThrottleWindow {
            days: Some(vec!["sat".into(), "someday".into()]),
            from: "22:00".into(),
            to: "06:00".into(),
            max_bytes_per_second: 0,
        }];
        let e = r.check().unwrap_err();
        assert!(
            e.contains("[[replication.throttle]] #1: `days`: \"someday\" is not a day"),
            "{e}"
        );
        r.throttle[0].days = None;
        r.check().unwrap();
    }

    /// `[[replication.throttle]]` reads from and writes back to `agent.toml`; a bad window
    /// refuses the file, naming the key.
    #[test]
    fn throttle_windows_in_agent_toml() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        crate::testkit::enroll_into(
            &crate::testkit::TestCa::new(),
            dir,
            "web-01",
            "https://gw:8443",
        );
        let path = dir.join(crate::state::CONFIG_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let with = format!(
            "{text}\n[replication]\nmax_bytes_per_second = 50000000\n\n\
             [[replication.throttle]]\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\"]\n\
             from = \"08:00\"\nto = \"18:00\"\nmax_bytes_per_second = 10000000\n\n\
             [[replication.throttle]]\nfrom = \"22:00\"\nto = \"06:00\"\nmax_bytes_per_second = 0\n"
        );
        std::fs::write(&path, &with).unwrap();
        let r = StateDir::new(dir).read_config().unwrap().replication;
        assert_eq!(r.throttle.len(), 2);
        assert_eq!(r.throttle[0].days.as_ref().unwrap().len(), 5);
        let s = r.schedule().unwrap();
        use crate::throttle::LocalTime;
        assert_eq!(s.rate_at(LocalTime::new(1, 9, 0, 0)), Some(10_000_000));
        assert_eq!(s.rate_at(LocalTime::new(5, 9, 0, 0)), Some(50_000_000));
        assert_eq!(s.rate_at(LocalTime::new(5, 3, 0, 0)), None);
        // A rewrite (disk add) keeps the windows.
        add(dir, DiskConfig::new("web", "sda", "/dev/sda"), false).unwrap();
        let again = StateDir::new(dir).read_config().unwrap().replication;
        assert_eq!(again, r);
        // A bad time refuses the file, naming the file, the window and the key.
        std::fs::write(&path, with.replace("\"18:00\"", "\"18:0\"")).unwrap();
        let e = StateDir::new(dir).read_config().unwrap_err().to_string();
        assert!(
            e.contains("[[replication.throttle]] #1: `to` = \"18:0\" is not a time of day"),
            "{e}"
        );
        assert!(e.contains("agent.toml"), "{e}");
        std::fs::write(&path, with.replace("from = \"22:00\"", "from = \"06:00\"")).unwrap();
        let e = StateDir::new(dir).read_config().unwrap_err().to_string();
        assert!(e.contains("#2: `from` and `to` are both"), "{e}");
        std::fs::write(&path, with.replace("from = \"22:00\"", "form = \"22:00\"")).unwrap();
        let e = StateDir::new(dir).read_config().unwrap_err().to_string();
        assert!(e.contains("form"), "{e}");
    }

    #[test]
    fn table_lists_every_disk() {
        let mut d = DiskConfig::new("web", "sda", "/dev/sda");
        d.snapshot = SnapshotMode::Lvm;
        d.app_pre = vec!["freeze".into()];
        d.app_post = vec!["thaw".into()];
        let mut v = DiskConfig::new("db", "data", "/img/db.vhdx");
        v.format = "vhdx".into();
        v.changes = vec!["rct".into(), "--since".into()];
        let t = render_table(&[d, v]);
        assert_eq!(
            t,
            "ITEM  DISK  PATH          FORMAT  SNAPSHOT  CHANGES  APP PRE\n\
             web   sda   /dev/sda      raw     lvm       -        freeze\n\
             db    data  /img/db.vhdx  vhdx    none      rct …    -\n"
        );
        assert!(render_table(&[]).contains("no disk configured"));
    }

    #[test]
    fn add_list_and_remove_edit_agent_toml() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        crate::testkit::enroll_into(
            &crate::testkit::TestCa::new(),
            dir,
            "web-01",
            "https://gw:8443",
        );
        add(dir, DiskConfig::new("web", "sda", "/dev/sda"), false).unwrap();
        let e = add(dir, DiskConfig::new("web", "sda", "/dev/sdb"), false).unwrap_err();
        assert!(e.to_string().contains("configured twice"), "{e}");
        let e = add(dir, DiskConfig::new("mail", "sda", "/dev/sdc"), false).unwrap_err();
        assert!(
            e.to_string()
                .contains("does not list item `mail` (it lists: db, web)"),
            "{e}"
        );
        add(dir, DiskConfig::new("mail", "sda", "/dev/sdc"), true).unwrap();
        let e = add(dir, DiskConfig::new("web", "sdd", "relative"), false).unwrap_err();
        assert!(e.to_string().contains("not absolute"), "{e}");
        let all = list(dir).unwrap();
        assert_eq!(
            all.iter().map(DiskConfig::label).collect::<Vec<_>>(),
            ["web/sda", "mail/sda"]
        );
        assert_eq!(
            remove(dir, "web", "sda").unwrap().path,
            PathBuf::from("/dev/sda")
        );
        let e = remove(dir, "web", "sda").unwrap_err();
        assert_eq!(e.to_string(), "no disk web/sda is configured");
        assert_eq!(list(dir).unwrap().len(), 1);
        // The enrollment is intact.
        StateDir::new(dir).load().unwrap();
        assert!(
            render_json(&list(dir).unwrap())
                .starts_with(r#"[{"item":"mail","name":"sda","path":"/dev/sdc"}"#)
        );
    }
}
