//! Protected items and their state machine.
//!
//! A protected item is a machine (its disks) that the appliance replicates into a vault under
//! a policy: Site Recovery's "replicated item". Everything that happens to it is an
//! operation run as a job (`crate::jobs`); this module decides, without touching anything,
//! whether an operation may start in the item's state, which state the item holds while the
//! job runs, and where it lands when the job ends — so the API, the job runner and the tests
//! share one table, and an illegal transition is refused with the reason before anything is
//! written.
//!
//! The states follow Site Recovery's replication health and failover states:
//!
//! ```text
//!   enable ─▶ enabling ─▶ initial-replication ─(first point)─▶ protected
//!   protected / initial-replication ─(tracking lost, threshold)─▶ resync-required
//!   resync-required / protected ─resync─▶ resynchronizing ─(point)─▶ protected
//!   resync-required ─(the agent starts a resync cycle)─▶ resynchronizing
//!   protected / resync-required ─failover─▶ failover-pending-commit ─commit─▶ failed-over
//!   protected / resync-required / resynchronizing ─test-failover─▶ (unchanged; a test copy
//!       exists until test-failover-cleanup removes it)
//!   failed-over ─reprotect─▶ reprotecting ─(point)─▶ protected (direction reversed)
//!   any settled state ─disable─▶ disabling ─▶ (removed; its points stay in the vault)
//! ```
//!
//! Events from replication (a point committed, tracking lost) are applied with
//! [`ItemState::on_event`]; they come from the process role.

use serde::{Deserialize, Serialize};

/// Largest number of disks of one item.
pub const MAX_DISKS: usize = 64;
/// Largest item or disk name (the vault's rule: letters, digits, `.`, `_`, `-`).
pub const MAX_NAME_LEN: usize = 128;
/// Largest description.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// Largest disk: 64 TiB (Azure's and VMware's largest managed disk).
pub const MAX_DISK_BYTES: u64 = 64 << 40;

/// Where an item stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ItemState {
    /// The enable job is checking the vault and preparing the item.
    Enabling,
    /// Enabled; waiting for its first complete cycle (the first recovery point).
    InitialReplication,
    /// Replicating, with at least one recovery point.
    Protected,
    /// Change tracking was lost or fell too far behind: a resync must run.
    ResyncRequired,
    /// A resync (checksum comparison of source and replica) is running.
    Resynchronizing,
    /// Failed over to a recovery point; not yet committed.
    FailoverPendingCommit,
    /// The failover is committed: the machine runs at the recovery site.
    FailedOver,
    /// Replicating the failed-over copy back (reverse direction), until its first point.
    Reprotecting,
    /// The disable job is removing the item.
    Disabling,
}

impl ItemState {
    /// Every state, in the order of the diagram above.
    pub const ALL: [ItemState; 9] = [
        ItemState::Enabling,
        ItemState::InitialReplication,
        ItemState::Protected,
        ItemState::ResyncRequired,
        ItemState::Resynchronizing,
        ItemState::FailoverPendingCommit,
        ItemState::FailedOver,
        ItemState::Reprotecting,
        ItemState::Disabling,
    ];

    /// The name used in the API and the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemState::Enabling => "enabling",
            ItemState::InitialReplication => "initial-replication",
            ItemState::Protected => "protected",
            ItemState::ResyncRequired => "resync-required",
            ItemState::Resynchronizing => "resynchronizing",
            ItemState::FailoverPendingCommit => "failover-pending-commit",
            ItemState::FailedOver => "failed-over",
            ItemState::Reprotecting => "reprotecting",
            ItemState::Disabling => "disabling",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<ItemState> {
        ItemState::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Whether the item is held by a running operation (no other may start).
    pub fn is_transient(self) -> bool {
        matches!(self, ItemState::Enabling | ItemState::Disabling)
    }

    /// The state a replication event moves the item to (`None`: the event changes nothing).
    pub fn on_event(self, event: Event) -> Option<ItemState> {
        use ItemState as S;
        match (event, self) {
            (
                Event::PointCommitted,
                S::InitialReplication | S::Resynchronizing | S::Reprotecting,
            ) => Some(S::Protected),
            (Event::TrackingLost, S::InitialReplication | S::Protected | S::Resynchronizing) => {
                Some(S::ResyncRequired)
            }
            (Event::ResyncStarted, S::ResyncRequired) => Some(S::Resynchronizing),
            _ => None,
        }
    }
}

impl std::fmt::Display for ItemState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What replication reports about an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A cycle became a recovery point.
    PointCommitted,
    /// The agent lost change tracking, or pending changes passed the resync threshold.
    TrackingLost,
    /// The agent started a resync cycle (checksum comparison of source and replica).
    ResyncStarted,
}

/// An operation on an item; each runs as a job of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    /// Start protecting a new item.
    Enable,
    /// Stop protecting an item and remove it (its recovery points stay in the vault).
    Disable,
    /// Compare source and replica chunk digests and send what differs.
    Resync,
    /// Fail over to a recovery point (planned or unplanned).
    Failover,
    /// Make a failover final.
    Commit,
    /// Replicate the failed-over copy back to the original site.
    Reprotect,
    /// Materialise a recovery point into an isolated location while replication goes on.
    TestFailover,
    /// Remove a test failover's copy.
    TestFailoverCleanup,
}

impl Operation {
    /// Every operation.
    pub const ALL: [Operation; 8] = [
        Operation::Enable,
        Operation::Disable,
        Operation::Resync,
        Operation::Failover,
        Operation::Commit,
        Operation::Reprotect,
        Operation::TestFailover,
        Operation::TestFailoverCleanup,
    ];

    /// The name used in the API, the catalog and job kinds.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Enable => "enable",
            Operation::Disable => "disable",
            Operation::Resync => "resync",
            Operation::Failover => "failover",
            Operation::Commit => "commit",
            Operation::Reprotect => "reprotect",
            Operation::TestFailover => "test-failover",
            Operation::TestFailoverCleanup => "test-failover-cleanup",
        }
    }

    /// The operation named `s`.
    pub fn parse(s: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// The states it may start from.
    pub fn allowed_from(self) -> &'static [ItemState] {
        use ItemState as S;
        match self {
            // `enable` creates the item: it has no state before.
            Operation::Enable => &[],
            Operation::Disable => &[
                S::InitialReplication,
                S::Protected,
                S::ResyncRequired,
                S::Resynchronizing,
                S::FailedOver,
                S::Reprotecting,
            ],
            Operation::Resync => &[S::Protected, S::ResyncRequired],
            Operation::Failover => &[S::Protected, S::ResyncRequired],
            Operation::Commit => &[S::FailoverPendingCommit],
            // From `reprotecting` too: to name another agent when the one named cannot
            // replicate (revoked, lost with its site).
            Operation::Reprotect => &[S::FailedOver, S::Reprotecting],
            Operation::TestFailover => &[S::Protected, S::ResyncRequired, S::Resynchronizing],
            // Whether there is a test failover to clean up is the item's, not its state's.
            Operation::TestFailoverCleanup => &[
                S::InitialReplication,
                S::Protected,
                S::ResyncRequired,
                S::Resynchronizing,
                S::FailoverPendingCommit,
                S::FailedOver,
                S::Reprotecting,
            ],
        }
    }

    /// Whether it may start in `state`; the refusal says why and what would help.
    pub fn check(self, state: ItemState) -> Result<(), String> {
        if self.allowed_from().contains(&state) {
            return Ok(());
        }
        let why = match (self, state) {
            (_, ItemState::Enabling | ItemState::Disabling) => {
                "another operation holds the item; wait for its job to end".to_string()
            }
            (Operation::Enable, _) => "the item is already enabled".to_string(),
            (Operation::Disable, ItemState::FailoverPendingCommit) => {
                "a failover is pending: commit it first".to_string()
            }
            (Operation::Resync, ItemState::Resynchronizing) => {
                "a resync is already running".to_string()
            }
            (
                Operation::Resync | Operation::Failover | Operation::TestFailover,
                ItemState::InitialReplication,
            ) => "initial replication has not produced a recovery point yet".to_string(),
            (Operation::Commit, _) => "there is no failover to commit".to_string(),
            (Operation::Reprotect, _) => {
                "only a failed-over (committed) item can be reprotected".to_string()
            }
            _ => format!(
                "it applies only to items that are {}",
                self.allowed_from()
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        Err(format!(
            "`{}` is not possible while the item is {state}: {why}",
            self.as_str()
        ))
    }

    /// The state the item holds while the job runs (`None`: unchanged until it ends).
    pub fn during(self) -> Option<ItemState> {
        match self {
            Operation::Enable => Some(ItemState::Enabling),
            Operation::Disable => Some(ItemState::Disabling),
            Operation::Resync => Some(ItemState::Resynchronizing),
            Operation::Failover
            | Operation::Commit
            | Operation::Reprotect
            | Operation::TestFailover
            | Operation::TestFailoverCleanup => None,
        }
    }

    /// Whether the item returns to the state it had before the job, whatever the outcome
    /// (a test failover and its cleanup leave replication alone).
    pub fn keeps_state(self) -> bool {
        matches!(
            self,
            Operation::TestFailover | Operation::TestFailoverCleanup
        )
    }

    /// The state after the job succeeded (`None`: the item is removed).
    pub fn after_success(self) -> Option<ItemState> {
        match self {
            Operation::Enable => Some(ItemState::InitialReplication),
            Operation::Disable => None,
            // The agent sends what differs; its next point makes the item protected again.
            Operation::Resync => Some(ItemState::Resynchronizing),
            Operation::Failover => Some(ItemState::FailoverPendingCommit),
            Operation::Commit => Some(ItemState::FailedOver),
            Operation::Reprotect => Some(ItemState::Reprotecting),
            // Not used: these keep the state they started from (`keeps_state`).
            Operation::TestFailover | Operation::TestFailoverCleanup => None,
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Replication direction: from the primary site to the recovery site, or back after a
/// reprotect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Primary → recovery (the initial direction).
    PrimaryToRecovery,
    /// Recovery → primary (after a reprotect).
    RecoveryToPrimary,
}

impl Direction {
    /// The other direction.
    pub fn reversed(self) -> Direction {
        match self {
            Direction::PrimaryToRecovery => Direction::RecoveryToPrimary,
            Direction::RecoveryToPrimary => Direction::PrimaryToRecovery,
        }
    }

    /// The name used in the API and the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::PrimaryToRecovery => "primary-to-recovery",
            Direction::RecoveryToPrimary => "recovery-to-primary",
        }
    }

    /// The direction named `s`.
    pub fn parse(s: &str) -> Option<Direction> {
        [Direction::PrimaryToRecovery, Direction::RecoveryToPrimary]
            .into_iter()
            .find(|d| d.as_str() == s)
    }
}

/// One disk of an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Name, unique within the item (the vault's disk name).
    pub name: String,
    /// Size in bytes (a multiple of 512).
    pub size_bytes: u64,
}

/// A protected item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Name, unique in the appliance; also its name in the vault.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// The vault its points go to.
    pub vault: String,
    /// The replication policy it follows.
    pub policy: String,
    /// Its disks.
    pub disks: Vec<Disk>,
    /// Where it stands.
    pub state: ItemState,
    /// Replication direction.
    pub direction: Direction,
    /// The job holding the item, if one is queued or running.
    pub active_job: Option<String>,
    /// Catalog-wide revision of the last write (also the ETag).
    pub revision: u64,
    /// Creation time, Unix milliseconds.
    pub created_ms: u64,
    /// Last change, Unix milliseconds.
    pub updated_ms: u64,
    /// The operator paused its replication (`ferry item pause`): its agents start no new
    /// cycle until it is resumed (a cycle already running completes).
    pub paused: Option<Paused>,
    /// The test failover's copy, until `test-failover-cleanup` removes it.
    pub test_failover: Option<FailoverRecord>,
    /// The failover pending commit or committed (where the machine now runs from).
    pub failover: Option<FailoverRecord>,
    /// The agent whose cycles the item takes, set by `reprotect` (the agent at the site the
    /// machine now runs at); `None`: any agent the item is listed for.
    pub source_agent: Option<String>,
}

/// Who paused an item's replication, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paused {
    /// The admin token that paused it.
    pub by: String,
    /// When, Unix milliseconds.
    pub at_ms: u64,
}

/// How a failover was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverMode {
    /// A drill: a copy in an isolated location; replication goes on.
    Test,
    /// The source is up: its agent stops the workload (`[failover] quiesce_command`), sends a
    /// final cycle (application-consistent where it can) and stops the source, and the
    /// failover is made from that cycle: nothing written before the workload stopped is lost.
    Planned,
    /// From a chosen recovery point with the source unreachable.
    Unplanned,
}

impl FailoverMode {
    /// The name used in the API and the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverMode::Test => "test",
            FailoverMode::Planned => "planned",
            FailoverMode::Unplanned => "unplanned",
        }
    }

    /// The mode named `s`.
    pub fn parse(s: &str) -> Option<FailoverMode> {
        [
            FailoverMode::Test,
            FailoverMode::Planned,
            FailoverMode::Unplanned,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
    }
}

/// What a failover job is asked to do (kept with the job, so a requeued job is asked the
/// same; a point chosen as `latest` or by time is chosen again when it runs again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverRequest {
    /// Test, planned or unplanned.
    pub mode: FailoverMode,
    /// Which recovery point: `latest`, `latest-app-consistent`, an RFC 3339 time or a
    /// point id (`ferry_store::PointSelector::parse`).
    pub point: String,
    /// The disks' output format (`ferry_store::ExportFormat`'s names).
    pub format: String,
    /// Disks written in place instead (failback onto the original disks): (disk, path of
    /// an existing file or block device on the appliance); only chunks that differ are
    /// written.
    pub in_place: Vec<(String, String)>,
}

/// Where a failover put the machine: kept on the item until cleaned up (a test failover) or
/// for as long as the item is failed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverRecord {
    /// The job that made it.
    pub job: String,
    /// Test, planned or unplanned.
    pub mode: FailoverMode,
    /// The recovery point materialised.
    pub point: String,
    /// The directory holding the disks and `machine.json`.
    pub location: String,
    /// When it was completed, Unix milliseconds.
    pub at_ms: u64,
}

/// Checks an item or disk name against the vault's naming rule (the item's name is its name
/// in the vault).
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    ferry_store::check_name("name", name)
        .map_err(|_| {
            format!(
                "{what} `{}` is not a valid name: 1 to {MAX_NAME_LEN} letters, digits, `.`, `_` or `-`, not starting with `.` or `-`",
                name.chars().take(200).collect::<String>()
            )
        })
}

/// Checks a list of disks: 1 to [`MAX_DISKS`], unique valid names, sizes positive multiples
/// of 512 up to [`MAX_DISK_BYTES`].
pub fn check_disks(disks: &[Disk]) -> Result<(), String> {
    if disks.is_empty() || disks.len() > MAX_DISKS {
        return Err(format!(
            "an item has 1 to {MAX_DISKS} disks, not {}",
            disks.len()
        ));
    }
    for (i, d) in disks.iter().enumerate() {
        check_name("disk", &d.name)?;
        if disks[..i].iter().any(|o| o.name == d.name) {
            return Err(format!("disk `{}` is named twice", d.name));
        }
        if d.size_bytes == 0 || d.size_bytes % 512 != 0 || d.size_bytes > MAX_DISK_BYTES {
            return Err(format!(
                "disk `{}`: size_bytes {} must be a positive multiple of 512 up to {MAX_DISK_BYTES} (64 TiB)",
                d.name, d.size_bytes
            ));
        }
    }
    Ok(())
}

/// Checks a description's length, in characters (as the OpenAPI document's `maxLength`
/// counts, and policies' descriptions do).
pub fn check_description(d: &str) -> Result<(), String> {
    let chars = d.chars().count();
    if chars > MAX_DESCRIPTION_LEN {
        return Err(format!(
            "description is {chars} characters; at most {MAX_DESCRIPTION_LEN}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in ItemState::ALL {
            assert_eq!(ItemState::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        for o in Operation::ALL {
            assert_eq!(Operation::parse(o.as_str()), Some(o));
        }
        assert_eq!(ItemState::parse("Protected"), None);
        assert_eq!(Operation::parse("delete"), None);
    }

    /// The whole table: every operation in every state either starts or is refused with a
    /// reason that names the operation and the state.
    #[test]
    fn every_operation_in_every_state() {
        use ItemState as S;
        let allowed = |o: Operation| -> Vec<S> {
            S::ALL.into_iter().filter(|s| o.check(*s).is_ok()).collect()
        };
        assert_eq!(allowed(Operation::Enable), vec![]);
        assert_eq!(
            allowed(Operation::Resync),
            vec![S::Protected, S::ResyncRequired]
        );
        assert_eq!(
            allowed(Operation::Failover),
            vec![S::Protected, S::ResyncRequired]
        );
        assert_eq!(allowed(Operation::Commit), vec![S::FailoverPendingCommit]);
        assert_eq!(
            allowed(Operation::Reprotect),
            vec![S::FailedOver, S::Reprotecting]
        );
        assert_eq!(
            allowed(Operation::TestFailover),
            vec![S::Protected, S::ResyncRequired, S::Resynchronizing]
        );
        assert_eq!(
            allowed(Operation::TestFailoverCleanup).len(),
            7,
            "every settled state"
        );
        assert!(Operation::TestFailover.keeps_state() && !Operation::Failover.keeps_state());
        assert_eq!(
            allowed(Operation::Disable),
            vec![
                S::InitialReplication,
                S::Protected,
                S::ResyncRequired,
                S::Resynchronizing,
                S::FailedOver,
                S::Reprotecting
            ]
        );
        for o in Operation::ALL {
            for s in S::ALL {
                if let Err(why) = o.check(s) {
                    assert!(
                        why.contains(o.as_str()) && why.contains(s.as_str()),
                        "{why}"
                    );
                }
            }
        }
        assert!(
            Operation::Disable
                .check(S::FailoverPendingCommit)
                .unwrap_err()
                .contains("commit it first")
        );
        assert!(
            Operation::Resync
                .check(S::Enabling)
                .unwrap_err()
                .contains("another operation holds the item")
        );
    }

    #[test]
    fn lifecycle_through_operations_and_events() {
        use ItemState as S;
        let run = |s: S, o: Operation| -> Option<S> {
            o.check(s).unwrap();
            o.after_success()
        };
        let s = Operation::Enable.after_success().unwrap();
        assert_eq!(s, S::InitialReplication);
        let s = s.on_event(Event::PointCommitted).unwrap();
        assert_eq!(s, S::Protected);
        let s = s.on_event(Event::TrackingLost).unwrap();
        assert_eq!(s, S::ResyncRequired);
        let s = run(s, Operation::Resync).unwrap();
        assert_eq!(s, S::Resynchronizing);
        let s = s.on_event(Event::PointCommitted).unwrap();
        let s = run(s, Operation::Failover).unwrap();
        assert_eq!(s, S::FailoverPendingCommit);
        assert_eq!(s.on_event(Event::PointCommitted), None);
        assert_eq!(
            ItemState::ResyncRequired.on_event(Event::ResyncStarted),
            Some(ItemState::Resynchronizing)
        );
        assert_eq!(ItemState::Protected.on_event(Event::ResyncStarted), None);
        let s = run(s, Operation::Commit).unwrap();
        let s = run(s, Operation::Reprotect).unwrap();
        assert_eq!(s, S::Reprotecting);
        let s = s.on_event(Event::PointCommitted).unwrap();
        assert_eq!(s, S::Protected);
        assert_eq!(run(s, Operation::Disable), None);
        assert!(S::Enabling.is_transient() && S::Disabling.is_transient());
        assert!(!S::Protected.is_transient());
    }

    #[test]
    fn disks_and_names() {
        let d = |name: &str, size| Disk {
            name: name.into(),
            size_bytes: size,
        };
        assert!(check_disks(&[d("os", 1 << 30), d("data", 512)]).is_ok());
        assert!(check_disks(&[]).unwrap_err().contains("1 to 64 disks"));
        assert!(
            check_disks(&[d("os", 1 << 30), d("os", 512)])
                .unwrap_err()
                .contains("named twice")
        );
        assert!(
            check_disks(&[d("os", 1000)])
                .unwrap_err()
                .contains("multiple of 512")
        );
        assert!(check_disks(&[d("os", 0)]).is_err());
        assert!(check_disks(&[d("os", MAX_DISK_BYTES + 512)]).is_err());
        assert!(
            check_disks(&[d("../x", 512)])
                .unwrap_err()
                .contains("not a valid name")
        );
        assert!(check_name("item", "web-01.prod_a").is_ok());
        assert!(check_name("item", "-x").is_err());
        assert!(check_name("item", &"a".repeat(129)).is_err());
        assert!(check_description(&"x".repeat(1025)).is_err());
    }
}
