//! Replication policies: the settings a protected item's replication follows (Site Recovery's
//! replication policy). This module is the domain type, its defaults and every rule a policy
//! keeps; the catalog stores policies (`catalog::record`, `docs/catalog-format.md`) and the
//! API reads and writes them (`api::policies`). Neither repeats a rule: both call
//! [`PolicySettings::validate`], [`check_name`] and [`PolicyPatch::apply`].
//!
//! A policy is a name plus [`PolicySettings`]. Settings are only ever changed by applying a
//! [`PolicyPatch`] (creation applies one to the defaults) and the result is validated as a
//! whole, so rules that tie two settings together (the cycle interval within the RPO
//! threshold, app-consistent points on cycle boundaries) hold whatever order a client sets
//! them in. A patch carries wide integers (`i64`): a negative or huge value reaches the rules
//! and is refused naming its field, instead of failing as a type error nobody can act on.
//!
//! Every refusal is a [`PolicyError`] naming the field (dotted for nested members:
//! `retention.hourly_days`, indexed for list entries: `retry_schedule_seconds[2]`) and the
//! rule.
//!
//! The optional [`ResyncWindow`] (`resync_window`) schedules resyncs for off-hours: a resync
//! an agent decides itself (tracking lost, changed geometry, changes over the threshold) waits
//! until the agent's local time is inside it; one the operator asks for starts at once. Its
//! times and days follow the agent's `[[replication.throttle]]` windows (`HH:MM`, `to` before
//! `from` wrapping past midnight, `mon` … `sun`), since the agent evaluates it with the same
//! code (`ferry_agent::throttle::TimeWindow`).

use std::fmt;

/// The policy created at the first start. It cannot be deleted (see
/// `catalog::Catalog::delete_policy`): protected items enabled without naming a policy get it.
pub const DEFAULT_POLICY: &str = "default";
/// Longest policy name.
pub const MAX_NAME_LEN: usize = 63;
/// Longest description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 1024;

/// `rpo_threshold_minutes`: 1 minute to 1 day.
pub const RPO_THRESHOLD_MINUTES: (u32, u32) = (1, 1440);
/// `cycle_interval_seconds`: 30 seconds to 1 day.
pub const CYCLE_INTERVAL_SECONDS: (u32, u32) = (30, 86_400);
/// `retention.keep_all_hours`: up to a week of every point.
pub const KEEP_ALL_HOURS: (u32, u32) = (0, 168);
/// `retention.hourly_days`: up to 90 days of hourly points.
pub const HOURLY_DAYS: (u32, u32) = (0, 90);
/// `retention.every_hours`: buckets of 1 hour to 1 week.
pub const EVERY_HOURS: (u32, u32) = (1, 168);
/// `retention.for_days`: up to 10 years.
pub const FOR_DAYS: (u32, u32) = (0, 3650);
/// `app_consistent_frequency_minutes` when on (0 is off): 15 minutes to 1 day.
pub const APP_CONSISTENT_MINUTES: (u32, u32) = (15, 1440);
/// `compression_level`: zstd levels 1 to 19 (the levels without `--ultra` memory needs).
pub const COMPRESSION_LEVEL: (u32, u32) = (1, 19);
/// Each delay of `retry_schedule_seconds`: 1 second to 1 day.
pub const RETRY_DELAY_SECONDS: (u32, u32) = (1, 86_400);
/// Most entries of `retry_schedule_seconds`.
pub const MAX_RETRY_ENTRIES: usize = 32;
/// `resync_threshold_percent`.
pub const RESYNC_THRESHOLD_PERCENT: (u32, u32) = (1, 100);

/// The days of a [`ResyncWindow`], Monday first, as they are stored and shown (the full names
/// are also accepted, any case: `ferry_proto::schedule`, which the agent reads them with).
pub use ferry_proto::schedule::DAY_NAMES;
/// Longest part of a refused value quoted back in an error.
const MAX_QUOTED: usize = 40;

/// Default `chunk_size`: the store's (256 KiB), chosen by the vault benchmarks (smaller
/// incrementals than 1 MiB chunks, faster restores).
pub const DEFAULT_CHUNK_SIZE: u32 = ferry_store::DEFAULT_CHUNK_SIZE;
/// Default `compression_level`: zstd level 1, the level the store's ingest figures use.
pub const DEFAULT_COMPRESSION_LEVEL: u32 = 1;
/// Default `retry_schedule_seconds`: 1, 2, 4, 8, 10 minutes, then every 30 minutes.
pub const DEFAULT_RETRY_SCHEDULE_SECONDS: [u32; 6] = [60, 120, 240, 480, 600, 1800];

/// Recovery-point retention, with thinning. Ages are measured back from now; tiers follow
/// each other:
///
/// 1. age < `keep_all_hours` hours: every point is kept;
/// 2. the next `hourly_days` days: one point per clock hour (UTC);
/// 3. the next `for_days` days: one point per bucket of `every_hours` hours (buckets aligned
///    to multiples of `every_hours` hours since the Unix epoch, so to UTC midnight when
///    `every_hours` divides 24);
/// 4. older than [`Retention::max_age_hours`] (the sum of the three spans): deleted.
///
/// In a bucket, the point kept is the newest app-consistent one if the bucket has one, else
/// the newest. An item's latest point is always kept, whatever its age (a paused item keeps
/// something to fail over to); with every span 0, only the latest point is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// Hours during which every point is kept (default 24).
    pub keep_all_hours: u32,
    /// Days, after those hours, with one point per hour (default 3).
    pub hourly_days: u32,
    /// Width in hours of the buckets of the third tier (default 4; ≥ 1 even when
    /// `for_days` is 0).
    pub every_hours: u32,
    /// Days, after the hourly ones, with one point per `every_hours` (default 14).
    pub for_days: u32,
}

impl Retention {
    /// Age in hours past which points are deleted: `keep_all_hours + 24 × (hourly_days +
    /// for_days)` (432 hours, 18 days, by default).
    pub fn max_age_hours(&self) -> u64 {
        u64::from(self.keep_all_hours)
            + 24 * (u64::from(self.hourly_days) + u64::from(self.for_days))
    }
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            keep_all_hours: 24,
            hourly_days: 3,
            every_hours: 4,
            for_days: 14,
        }
    }
}

/// Everything a policy sets. `Default` is the settings of a policy created without any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySettings {
    /// Free text for people: at most 1024 characters, no control characters but tab and
    /// newline; `None` when empty.
    pub description: Option<String>,
    /// Alert when an item's latest recovery point is older than this (1–1440; default 15).
    pub rpo_threshold_minutes: u32,
    /// A replication cycle starts this often (30–86400; default 300); at most the RPO
    /// threshold, or the threshold would be missed by design.
    pub cycle_interval_seconds: u32,
    /// Which recovery points are kept.
    pub retention: Retention,
    /// Every this many minutes a cycle quiesces applications (app-consistent point): 0 is
    /// off, else 15–1440 and a whole number of cycle intervals, since only a cycle can cut a
    /// point (default 60).
    pub app_consistent_frequency_minutes: u32,
    /// Chunk size in bytes for disks new to their vault: a power of two from 64 KiB to 4 MiB
    /// (`ferry_store::check_chunk_size`; default 256 KiB). A disk keeps the chunk size it was
    /// first stored with: changing it affects only disks protected afterwards.
    pub chunk_size: u32,
    /// zstd level of data chunks (1–19; default 3).
    pub compression_level: u32,
    /// Delays in seconds between retries after a transient error: 1–32 entries, each 1 to
    /// 86400, non-decreasing; the last one repeats until the cycle succeeds.
    pub retry_schedule_seconds: Vec<u32>,
    /// Changes pending above this share of a disk's size force a resync of the disk
    /// (1–100; default 50).
    pub resync_threshold_percent: u32,
    /// When resyncs the agent decides itself may run (`None`, the default: whenever needed).
    pub resync_window: Option<ResyncWindow>,
}

/// `resync_window`: the off-hours window of automatic resyncs (see the module documentation).
/// Built only by [`ResyncWindow::parse`]; [`PolicySettings::validate`] checks it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncWindow {
    /// Start, minutes since local midnight (included; 0–1439).
    pub from_minute: u16,
    /// End, minutes since local midnight (excluded; 0–1439, not `from_minute`); before
    /// `from_minute`: the next day.
    pub to_minute: u16,
    /// The days the window starts on, Monday first; `None`: every day (`days` left out).
    pub days: Option<[bool; 7]>,
}

impl ResyncWindow {
    /// Checks `from` and `to` (`HH:MM` or `H:MM`, 00:00 to 23:59, different) and `days`
    /// (`mon` … `sun` or the full names, any case, each once, at least one; `None`: every
    /// day), naming the member refused: `resync_window.from`, `resync_window.days[2]`.
    pub fn parse(from: &str, to: &str, days: Option<&[String]>) -> Result<Self, PolicyError> {
        let time = |key: &'static str, v: &str| {
            ferry_proto::schedule::parse_time(v).ok_or_else(|| PolicyError::ResyncWindowTime {
                key,
                got: quoted(v),
            })
        };
        let from_minute = time("from", from)?;
        let to_minute = time("to", to)?;
        if from_minute == to_minute {
            return Err(PolicyError::ResyncWindowEmpty {
                at: hhmm(from_minute),
            });
        }
        let days = match days {
            None => None,
            Some([]) => return Err(PolicyError::ResyncWindowNoDays),
            Some(list) => {
                let mut on = [false; 7];
                for (index, d) in list.iter().enumerate() {
                    let n = ferry_proto::schedule::parse_day(d)
                        .map(usize::from)
                        .ok_or_else(|| PolicyError::ResyncWindowDay {
                            index,
                            got: quoted(d),
                        })?;
                    if on[n] {
                        return Err(PolicyError::ResyncWindowDayRepeated {
                            index,
                            day: DAY_NAMES[n],
                        });
                    }
                    on[n] = true;
                }
                Some(on)
            }
        };
        Ok(Self {
            from_minute,
            to_minute,
            days,
        })
    }

    /// `from` as stored and shown: `HH:MM`.
    pub fn from_text(&self) -> String {
        hhmm(self.from_minute)
    }

    /// `to` as stored and shown: `HH:MM`.
    pub fn to_text(&self) -> String {
        hhmm(self.to_minute)
    }

    /// `days` as stored and shown: short names in week order (`None`: every day).
    pub fn day_names(&self) -> Option<Vec<String>> {
        self.days.map(|on| {
            DAY_NAMES
                .iter()
                .zip(on)
                .filter(|(_, on)| *on)
                .map(|(d, _)| (*d).to_string())
                .collect()
        })
    }

    /// Checks what the narrow types can hold but [`Self::parse`] never builds.
    fn check(&self) -> Result<(), PolicyError> {
        let days = self.day_names();
        Self::parse(&self.from_text(), &self.to_text(), days.as_deref()).map(drop)
    }
}

/// Minutes since midnight as `HH:MM` (values past a day show as such, and are refused when
/// parsed back).
fn hhmm(minutes: u16) -> String {
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

/// A refused text value as an error quotes it: at most [`MAX_QUOTED`] characters.
fn quoted(v: &str) -> String {
    if v.chars().count() <= MAX_QUOTED {
        return v.to_string();
    }
    let mut q: String = v.chars().take(MAX_QUOTED).collect();
    q.push('…');
    q
}

impl Default for PolicySettings {
    fn default() -> Self {
        Self {
            description: None,
            rpo_threshold_minutes: 15,
            cycle_interval_seconds: 300,
            retention: Retention::default(),
            app_consistent_frequency_minutes: 60,
            chunk_size: DEFAULT_CHUNK_SIZE,
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            retry_schedule_seconds: DEFAULT_RETRY_SCHEDULE_SECONDS.to_vec(),
            resync_threshold_percent: 50,
            resync_window: None,
        }
    }
}

/// A policy as the catalog keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Unique name ([`check_name`]); never changes.
    pub name: String,
    /// What it sets.
    pub settings: PolicySettings,
    /// Revision: taken from the catalog-wide counter at every change, so it only grows,
    /// also across a delete and a re-create of the same name (clients send it back in
    /// `If-Match`).
    pub revision: u64,
    /// Creation time, Unix ms.
    pub created_ms: u64,
    /// Time of the last change, Unix ms (the creation time until changed).
    pub updated_ms: u64,
}

/// Why a policy or one of its settings is refused. Each names the field (see
/// [`PolicyError::field`]) and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The name breaks the naming rule.
    #[error(
        "`name` must be 1 to 63 of `a-z`, `0-9` and `-`, starting and ending with a letter or digit: {reason}"
    )]
    Name {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The description is longer than [`MAX_DESCRIPTION_CHARS`].
    #[error("`description` must be at most {MAX_DESCRIPTION_CHARS} characters, got {chars}")]
    DescriptionTooLong {
        /// Its length in characters.
        chars: usize,
    },
    /// The description holds a control character other than tab and newline.
    #[error("`description` must not hold control characters other than tab and newline")]
    DescriptionControl,
    /// An integer outside its range.
    #[error("`{field}` must be from {min} to {max}, got {got}")]
    OutOfRange {
        /// Dotted field name.
        field: &'static str,
        /// Smallest value allowed.
        min: u32,
        /// Largest value allowed.
        max: u32,
        /// The value given.
        got: i64,
    },
    /// `app_consistent_frequency_minutes` is neither 0 (off) nor in its range.
    #[error(
        "`app_consistent_frequency_minutes` must be 0 (off) or from {} to {}, got {got}",
        APP_CONSISTENT_MINUTES.0,
        APP_CONSISTENT_MINUTES.1
    )]
    AppConsistentRange {
        /// The value given.
        got: i64,
    },
    /// `chunk_size` is not a power of two from 64 KiB to 4 MiB.
    #[error(
        "`chunk_size` must be a power of two from 65536 (64 KiB) to 4194304 (4 MiB), got {got}"
    )]
    ChunkSize {
        /// The value given.
        got: i64,
    },
    /// The cycle interval is longer than the RPO threshold.
    #[error(
        "`cycle_interval_seconds` ({cycle_interval_seconds}) must not exceed the RPO threshold \
         `rpo_threshold_minutes` ({rpo_threshold_minutes} min = {} s): every cycle would miss it",
        u64::from(*rpo_threshold_minutes) * 60
    )]
    CycleExceedsRpo {
        /// The cycle interval.
        cycle_interval_seconds: u32,
        /// The RPO threshold.
        rpo_threshold_minutes: u32,
    },
    /// App-consistent points are asked for between cycles.
    #[error(
        "`app_consistent_frequency_minutes` ({minutes} min) must be a whole number of cycle \
         intervals `cycle_interval_seconds` ({cycle_interval_seconds} s): only a cycle can cut \
         an app-consistent point"
    )]
    AppConsistentNotMultiple {
        /// The frequency.
        minutes: u32,
        /// The cycle interval.
        cycle_interval_seconds: u32,
    },
    /// The retry schedule is empty.
    #[error("`retry_schedule_seconds` must hold at least one delay")]
    RetryEmpty,
    /// The retry schedule is longer than [`MAX_RETRY_ENTRIES`].
    #[error("`retry_schedule_seconds` must hold at most {MAX_RETRY_ENTRIES} delays, got {got}")]
    RetryTooMany {
        /// Entries given.
        got: usize,
    },
    /// A retry delay outside its range.
    #[error(
        "`retry_schedule_seconds[{index}]` must be from {} to {}, got {got}",
        RETRY_DELAY_SECONDS.0,
        RETRY_DELAY_SECONDS.1
    )]
    RetryDelay {
        /// Position in the list.
        index: usize,
        /// The value given.
        got: i64,
    },
    /// A retry delay shorter than the one before it.
    #[error(
        "`retry_schedule_seconds[{index}]` ({got}) must not be shorter than the delay before \
         it ({previous}): the schedule backs off, it never speeds up"
    )]
    RetryDecreasing {
        /// Position in the list.
        index: usize,
        /// The value given.
        got: u32,
        /// The delay before it.
        previous: u32,
    },
    /// A time of `resync_window` is not a time of day.
    #[error(
        "`resync_window.{key}` must be a time of day HH:MM from 00:00 to 23:59 (the agent's \
         local time), got {got:?}"
    )]
    ResyncWindowTime {
        /// `from` or `to`.
        key: &'static str,
        /// The value given (its first 40 characters).
        got: String,
    },
    /// `resync_window.to` equals `resync_window.from`.
    #[error(
        "`resync_window.to` must differ from `resync_window.from` (both {at}): the window \
         would be empty (for no window, set `resync_window` to null)"
    )]
    ResyncWindowEmpty {
        /// The time given twice, `HH:MM`.
        at: String,
    },
    /// `resync_window.days` is an empty list.
    #[error("`resync_window.days` must list at least one day (leave it out for every day)")]
    ResyncWindowNoDays,
    /// An entry of `resync_window.days` is not a day.
    #[error(
        "`resync_window.days[{index}]` must be a day: mon, tue, wed, thu, fri, sat or sun (or \
         the full name), got {got:?}"
    )]
    ResyncWindowDay {
        /// Position in the list.
        index: usize,
        /// The value given (its first 40 characters).
        got: String,
    },
    /// A day is listed twice in `resync_window.days`.
    #[error("`resync_window.days[{index}]` lists `{day}` again: each day at most once")]
    ResyncWindowDayRepeated {
        /// Position of the repeat in the list.
        index: usize,
        /// The day.
        day: &'static str,
    },
}

impl PolicyError {
    /// The field refused, as a client names it: `rpo_threshold_minutes`,
    /// `retention.hourly_days`, `retry_schedule_seconds[2]`.
    pub fn field(&self) -> String {
        match self {
            PolicyError::Name { .. } => "name".into(),
            PolicyError::DescriptionTooLong { .. } | PolicyError::DescriptionControl => {
                "description".into()
            }
            PolicyError::OutOfRange { field, .. } => (*field).into(),
            PolicyError::AppConsistentRange { .. }
            | PolicyError::AppConsistentNotMultiple { .. } => {
                "app_consistent_frequency_minutes".into()
            }
            PolicyError::ChunkSize { .. } => "chunk_size".into(),
            PolicyError::CycleExceedsRpo { .. } => "cycle_interval_seconds".into(),
            PolicyError::RetryEmpty | PolicyError::RetryTooMany { .. } => {
                "retry_schedule_seconds".into()
            }
            PolicyError::RetryDelay { index, .. } | PolicyError::RetryDecreasing { index, .. } => {
                format!("retry_schedule_seconds[{index}]")
            }
            PolicyError::ResyncWindowTime { key, .. } => format!("resync_window.{key}"),
            PolicyError::ResyncWindowEmpty { .. } => "resync_window.to".into(),
            PolicyError::ResyncWindowNoDays => "resync_window.days".into(),
            PolicyError::ResyncWindowDay { index, .. }
            | PolicyError::ResyncWindowDayRepeated { index, .. } => {
                format!("resync_window.days[{index}]")
            }
        }
    }
}

/// Checks a policy name: 1–63 of `a–z 0–9 -`, starting and ending with a letter or digit
/// (a DNS label: it fits in URLs, file names and metric labels, and never reads as a
/// command-line flag).
pub fn check_name(name: &str) -> Result<(), PolicyError> {
    let bad = |reason| Err(PolicyError::Name { reason });
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("it is too long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("it holds another character");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("it starts or ends with `-`");
    }
    Ok(())
}

/// `got` as a `u32` within `min..=max`, or [`PolicyError::OutOfRange`].
fn range(field: &'static str, got: i64, (min, max): (u32, u32)) -> Result<u32, PolicyError> {
    u32::try_from(got)
        .ok()
        .filter(|v| (min..=max).contains(v))
        .ok_or(PolicyError::OutOfRange {
            field,
            min,
            max,
            got,
        })
}

fn description(d: Option<&str>) -> Result<Option<String>, PolicyError> {
    let Some(d) = d.filter(|d| !d.is_empty()) else {
        return Ok(None);
    };
    let chars = d.chars().count();
    if chars > MAX_DESCRIPTION_CHARS {
        return Err(PolicyError::DescriptionTooLong { chars });
    }
    if d.chars().any(|c| c.is_control() && c != '\t' && c != '\n') {
        return Err(PolicyError::DescriptionControl);
    }
    Ok(Some(d.to_string()))
}

fn app_consistent(got: i64) -> Result<u32, PolicyError> {
    if got == 0 {
        return Ok(0);
    }
    range(
        "app_consistent_frequency_minutes",
        got,
        APP_CONSISTENT_MINUTES,
    )
    .map_err(|_| PolicyError::AppConsistentRange { got })
}

fn chunk_size(got: i64) -> Result<u32, PolicyError> {
    u32::try_from(got)
        .ok()
        .filter(|c| ferry_store::check_chunk_size(*c).is_ok())
        .ok_or(PolicyError::ChunkSize { got })
}

fn retry_schedule(delays: &[i64]) -> Result<Vec<u32>, PolicyError> {
    if delays.is_empty() {
        return Err(PolicyError::RetryEmpty);
    }
    if delays.len() > MAX_RETRY_ENTRIES {
        return Err(PolicyError::RetryTooMany { got: delays.len() });
    }
    let mut out: Vec<u32> = Vec::with_capacity(delays.len());
    for (index, &got) in delays.iter().enumerate() {
        let d = u32::try_from(got)
            .ok()
            .filter(|d| (RETRY_DELAY_SECONDS.0..=RETRY_DELAY_SECONDS.1).contains(d))
            .ok_or(PolicyError::RetryDelay { index, got })?;
        if let Some(&previous) = out.last()
            && d < previous
        {
            return Err(PolicyError::RetryDecreasing {
                index,
                got: d,
                previous,
            });
        }
        out.push(d);
    }
    Ok(out)
}

impl PolicySettings {
    /// Checks every rule: each field alone (in declaration order), then the rules between
    /// fields. The first broken rule is returned.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let r = &self.retention;
        description(self.description.as_deref())?;
        range(
            "rpo_threshold_minutes",
            self.rpo_threshold_minutes.into(),
            RPO_THRESHOLD_MINUTES,
        )?;
        range(
            "cycle_interval_seconds",
            self.cycle_interval_seconds.into(),
            CYCLE_INTERVAL_SECONDS,
        )?;
        range(
            "retention.keep_all_hours",
            r.keep_all_hours.into(),
            KEEP_ALL_HOURS,
        )?;
        range("retention.hourly_days", r.hourly_days.into(), HOURLY_DAYS)?;
        range("retention.every_hours", r.every_hours.into(), EVERY_HOURS)?;
        range("retention.for_days", r.for_days.into(), FOR_DAYS)?;
        app_consistent(self.app_consistent_frequency_minutes.into())?;
        chunk_size(self.chunk_size.into())?;
        range(
            "compression_level",
            self.compression_level.into(),
            COMPRESSION_LEVEL,
        )?;
        let delays: Vec<i64> = self
            .retry_schedule_seconds
            .iter()
            .map(|&d| i64::from(d))
            .collect();
        retry_schedule(&delays)?;
        range(
            "resync_threshold_percent",
            self.resync_threshold_percent.into(),
            RESYNC_THRESHOLD_PERCENT,
        )?;
        if let Some(w) = &self.resync_window {
            w.check()?;
        }

        if u64::from(self.cycle_interval_seconds) > u64::from(self.rpo_threshold_minutes) * 60 {
            return Err(PolicyError::CycleExceedsRpo {
                cycle_interval_seconds: self.cycle_interval_seconds,
                rpo_threshold_minutes: self.rpo_threshold_minutes,
            });
        }
        let app = self.app_consistent_frequency_minutes;
        if app != 0 && (u64::from(app) * 60) % u64::from(self.cycle_interval_seconds) != 0 {
            return Err(PolicyError::AppConsistentNotMultiple {
                minutes: app,
                cycle_interval_seconds: self.cycle_interval_seconds,
            });
        }
        Ok(())
    }
}

/// Changes to a policy's settings: `None` leaves a setting as it is. Integers are wide so
/// that any value a client sends is checked against its rule (and refused naming it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyPatch {
    /// `Some(None)` (or an empty text) removes the description.
    pub description: Option<Option<String>>,
    /// New RPO threshold.
    pub rpo_threshold_minutes: Option<i64>,
    /// New cycle interval.
    pub cycle_interval_seconds: Option<i64>,
    /// Retention members to change (the others stay).
    pub retention: RetentionPatch,
    /// New app-consistent frequency.
    pub app_consistent_frequency_minutes: Option<i64>,
    /// New chunk size.
    pub chunk_size: Option<i64>,
    /// New compression level.
    pub compression_level: Option<i64>,
    /// New retry schedule (replaces the whole list).
    pub retry_schedule_seconds: Option<Vec<i64>>,
    /// New resync threshold.
    pub resync_threshold_percent: Option<i64>,
    /// New resync window, replaced whole: `Some(None)` removes it.
    pub resync_window: Option<Option<ResyncWindowPatch>>,
}

/// A resync window as a client gives it (checked by [`ResyncWindow::parse`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResyncWindowPatch {
    /// `resync_window.from`.
    pub from: String,
    /// `resync_window.to`.
    pub to: String,
    /// `resync_window.days` (`None`: every day).
    pub days: Option<Vec<String>>,
}

/// Changes to a policy's retention: `None` leaves a member as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPatch {
    /// New `keep_all_hours`.
    pub keep_all_hours: Option<i64>,
    /// New `hourly_days`.
    pub hourly_days: Option<i64>,
    /// New `every_hours`.
    pub every_hours: Option<i64>,
    /// New `for_days`.
    pub for_days: Option<i64>,
}

impl PolicyPatch {
    /// `base` with this patch applied, validated as a whole; `base` itself is never
    /// changed, so a refused patch changes nothing.
    pub fn apply(&self, base: &PolicySettings) -> Result<PolicySettings, PolicyError> {
        let mut s = base.clone();
        if let Some(d) = &self.description {
            s.description = description(d.as_deref())?;
        }
        let set =
            |slot: &mut u32, v: Option<i64>, check: &dyn Fn(i64) -> Result<u32, PolicyError>| {
                if let Some(v) = v {
                    *slot = check(v)?;
                }
                Ok::<(), PolicyError>(())
            };
        set(
            &mut s.rpo_threshold_minutes,
            self.rpo_threshold_minutes,
            &|v| range("rpo_threshold_minutes", v, RPO_THRESHOLD_MINUTES),
        )?;
        set(
            &mut s.cycle_interval_seconds,
            self.cycle_interval_seconds,
            &|v| range("cycle_interval_seconds", v, CYCLE_INTERVAL_SECONDS),
        )?;
        let r = &self.retention;
        set(&mut s.retention.keep_all_hours, r.keep_all_hours, &|v| {
            range("retention.keep_all_hours", v, KEEP_ALL_HOURS)
        })?;
        set(&mut s.retention.hourly_days, r.hourly_days, &|v| {
            range("retention.hourly_days", v, HOURLY_DAYS)
        })?;
        set(&mut s.retention.every_hours, r.every_hours, &|v| {
            range("retention.every_hours", v, EVERY_HOURS)
        })?;
        set(&mut s.retention.for_days, r.for_days, &|v| {
            range("retention.for_days", v, FOR_DAYS)
        })?;
        set(
            &mut s.app_consistent_frequency_minutes,
            self.app_consistent_frequency_minutes,
            &app_consistent,
        )?;
        set(&mut s.chunk_size, self.chunk_size, &chunk_size)?;
        set(&mut s.compression_level, self.compression_level, &|v| {
            range("compression_level", v, COMPRESSION_LEVEL)
        })?;
        if let Some(delays) = &self.retry_schedule_seconds {
            s.retry_schedule_seconds = retry_schedule(delays)?;
        }
        set(
            &mut s.resync_threshold_percent,
            self.resync_threshold_percent,
            &|v| range("resync_threshold_percent", v, RESYNC_THRESHOLD_PERCENT),
        )?;
        if let Some(w) = &self.resync_window {
            s.resync_window = w
                .as_ref()
                .map(|w| ResyncWindow::parse(&w.from, &w.to, w.days.as_deref()))
                .transpose()?;
        }
        s.validate()?;
        Ok(s)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "policy `{}` (revision {})", self.name, self.revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut PolicyPatch)) -> Result<PolicySettings, PolicyError> {
        let mut p = PolicyPatch::default();
        f(&mut p);
        p.apply(&PolicySettings::default())
    }

    #[test]
    fn defaults() {
        let d = PolicySettings::default();
        assert_eq!(d.description, None);
        assert_eq!(d.rpo_threshold_minutes, 15);
        assert_eq!(d.cycle_interval_seconds, 300);
        assert_eq!(
            d.retention,
            Retention {
                keep_all_hours: 24,
                hourly_days: 3,
                every_hours: 4,
                for_days: 14
            }
        );
        assert_eq!(d.retention.max_age_hours(), 24 + 3 * 24 + 14 * 24);
        assert_eq!(d.app_consistent_frequency_minutes, 60);
        assert_eq!(d.chunk_size, 256 << 10);
        assert_eq!(d.compression_level, 1);
        assert_eq!(d.retry_schedule_seconds, [60, 120, 240, 480, 600, 1800]);
        assert_eq!(d.resync_threshold_percent, 50);
        d.validate().unwrap();
        // An empty patch is the defaults.
        assert_eq!(PolicyPatch::default().apply(&d).unwrap(), d);
    }

    #[test]
    fn names() {
        for ok in ["default", "a", "gold-tier-2", "0", &"a".repeat(63)] {
            check_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, why) in [
            ("", "empty"),
            (&"a".repeat(64), "too long"),
            ("Gold", "another character"),
            ("gold_tier", "another character"),
            ("gold tier", "another character"),
            ("gölд", "another character"),
            ("-gold", "starts or ends"),
            ("gold-", "starts or ends"),
        ] {
            let e = check_name(bad).unwrap_err();
            assert!(matches!(e, PolicyError::Name { .. }), "{bad}");
            assert_eq!(e.field(), "name");
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }

    fn out_of_range(field: &'static str, min: u32, max: u32, got: i64) -> PolicyError {
        PolicyError::OutOfRange {
            field,
            min,
            max,
            got,
        }
    }

    /// Every range rule, at both edges and beyond, with the error naming the field.
    #[test]
    fn ranges() {
        type Setter = fn(&mut PolicyPatch, i64);
        let cases: [(&'static str, (u32, u32), Setter); 8] = [
            ("rpo_threshold_minutes", RPO_THRESHOLD_MINUTES, |p, v| {
                p.rpo_threshold_minutes = Some(v);
                // Keep the cycle inside the threshold while the threshold moves.
                p.cycle_interval_seconds = Some(30);
                p.app_consistent_frequency_minutes = Some(0);
            }),
            ("cycle_interval_seconds", CYCLE_INTERVAL_SECONDS, |p, v| {
                p.cycle_interval_seconds = Some(v);
                p.rpo_threshold_minutes = Some(1440);
                p.app_consistent_frequency_minutes = Some(0);
            }),
            ("retention.keep_all_hours", KEEP_ALL_HOURS, |p, v| {
                p.retention.keep_all_hours = Some(v)
            }),
            ("retention.hourly_days", HOURLY_DAYS, |p, v| {
                p.retention.hourly_days = Some(v)
            }),
            ("retention.every_hours", EVERY_HOURS, |p, v| {
                p.retention.every_hours = Some(v)
            }),
            ("retention.for_days", FOR_DAYS, |p, v| {
                p.retention.for_days = Some(v)
            }),
            ("compression_level", COMPRESSION_LEVEL, |p, v| {
                p.compression_level = Some(v)
            }),
            (
                "resync_threshold_percent",
                RESYNC_THRESHOLD_PERCENT,
                |p, v| p.resync_threshold_percent = Some(v),
            ),
        ];
        for (field, (min, max), set) in cases {
            for ok in [min, max] {
                with(|p| set(p, ok.into())).unwrap_or_else(|e| panic!("{field}={ok}: {e}"));
            }
            for bad in [
                i64::from(min) - 1,
                i64::from(max) + 1,
                -1,
                i64::MIN,
                i64::MAX,
            ] {
                if bad >= i64::from(min) && bad <= i64::from(max) {
                    continue;
                }
                let e = with(|p| set(p, bad)).unwrap_err();
                assert_eq!(e, out_of_range(field, min, max, bad), "{field}={bad}");
                assert_eq!(e.field(), field);
                assert!(e.to_string().contains(field), "{e}");
            }
        }
        // The examples of the issue: RPO of zero, negative retention.
        assert_eq!(
            with(|p| p.rpo_threshold_minutes = Some(0)).unwrap_err(),
            out_of_range("rpo_threshold_minutes", 1, 1440, 0)
        );
        assert_eq!(
            with(|p| p.retention.hourly_days = Some(-3)).unwrap_err(),
            out_of_range("retention.hourly_days", 0, 90, -3)
        );
        assert_eq!(
            with(|p| p.retention.every_hours = Some(0)).unwrap_err(),
            out_of_range("retention.every_hours", 1, 168, 0)
        );
    }

    #[test]
    fn app_consistent_frequency() {
        assert_eq!(
            with(|p| p.app_consistent_frequency_minutes = Some(0))
                .unwrap()
                .app_consistent_frequency_minutes,
            0
        );
        for ok in [15, 60, 1440] {
            with(|p| p.app_consistent_frequency_minutes = Some(ok)).unwrap();
        }
        for bad in [-1, 1, 14, 1441, i64::MAX] {
            assert_eq!(
                with(|p| p.app_consistent_frequency_minutes = Some(bad)).unwrap_err(),
                PolicyError::AppConsistentRange { got: bad }
            );
        }
        // A whole number of cycles: 60 min on 7-minute cycles is not; 70 min is.
        let e = with(|p| {
            p.cycle_interval_seconds = Some(420);
            p.app_consistent_frequency_minutes = Some(60);
        })
        .unwrap_err();
        assert_eq!(
            e,
            PolicyError::AppConsistentNotMultiple {
                minutes: 60,
                cycle_interval_seconds: 420
            }
        );
        assert_eq!(e.field(), "app_consistent_frequency_minutes");
        with(|p| {
            p.cycle_interval_seconds = Some(420);
            p.app_consistent_frequency_minutes = Some(70);
        })
        .unwrap();
        // Off needs no multiple; 90 s cycles fit 15 minutes (10 cycles).
        with(|p| {
            p.cycle_interval_seconds = Some(420);
            p.app_consistent_frequency_minutes = Some(0);
        })
        .unwrap();
        with(|p| {
            p.cycle_interval_seconds = Some(90);
            p.app_consistent_frequency_minutes = Some(15);
        })
        .unwrap();
    }

    #[test]
    fn cycle_within_rpo() {
        let e = with(|p| p.cycle_interval_seconds = Some(901)).unwrap_err();
        assert_eq!(
            e,
            PolicyError::CycleExceedsRpo {
                cycle_interval_seconds: 901,
                rpo_threshold_minutes: 15
            }
        );
        assert_eq!(e.field(), "cycle_interval_seconds");
        assert!(e.to_string().contains("900 s"), "{e}");
        let e = with(|p| p.rpo_threshold_minutes = Some(4)).unwrap_err();
        assert!(matches!(e, PolicyError::CycleExceedsRpo { .. }), "{e}");
        // Equal is fine.
        with(|p| {
            p.cycle_interval_seconds = Some(900);
            p.app_consistent_frequency_minutes = Some(15);
        })
        .unwrap();
    }

    #[test]
    fn chunk_sizes() {
        for ok in [64 << 10, 128 << 10, 256 << 10, 1 << 20, 4 << 20] {
            assert_eq!(
                with(|p| p.chunk_size = Some(ok)).unwrap().chunk_size,
                u32::try_from(ok).unwrap()
            );
        }
        for bad in [
            0,
            -1,
            -(1 << 20),
            32 << 10,
            8 << 20,
            100_000,
            (1 << 20) + 1,
            1 << 40,
        ] {
            let e = with(|p| p.chunk_size = Some(bad)).unwrap_err();
            assert_eq!(e, PolicyError::ChunkSize { got: bad });
            assert_eq!(e.field(), "chunk_size");
        }
    }

    #[test]
    fn retry_schedules() {
        let s = |v: &[i64]| with(|p| p.retry_schedule_seconds = Some(v.to_vec()));
        assert_eq!(s(&[5]).unwrap().retry_schedule_seconds, [5]);
        assert_eq!(
            s(&[1, 1, 86_400]).unwrap().retry_schedule_seconds,
            [1, 1, 86_400]
        );
        s(&[60; MAX_RETRY_ENTRIES]).unwrap();
        assert_eq!(s(&[]).unwrap_err(), PolicyError::RetryEmpty);
        assert_eq!(
            s(&[60; MAX_RETRY_ENTRIES + 1]).unwrap_err(),
            PolicyError::RetryTooMany { got: 33 }
        );
        for (v, index, got) in [
            (&[0][..], 0, 0),
            (&[60, -5][..], 1, -5),
            (&[60, 86_401][..], 1, 86_401),
        ] {
            let e = s(v).unwrap_err();
            assert_eq!(e, PolicyError::RetryDelay { index, got });
            assert_eq!(e.field(), format!("retry_schedule_seconds[{index}]"));
        }
        let e = s(&[60, 120, 90]).unwrap_err();
        assert_eq!(
            e,
            PolicyError::RetryDecreasing {
                index: 2,
                got: 90,
                previous: 120
            }
        );
        assert_eq!(e.field(), "retry_schedule_seconds[2]");
    }

    #[test]
    fn descriptions() {
        let d = |s: Option<&str>| with(|p| p.description = Some(s.map(str::to_string)));
        assert_eq!(
            d(Some("tier 1\n\tweb")).unwrap().description.unwrap(),
            "tier 1\n\tweb"
        );
        assert_eq!(d(Some("")).unwrap().description, None);
        assert_eq!(d(None).unwrap().description, None);
        // 1024 characters, not bytes.
        d(Some(&"é".repeat(1024))).unwrap();
        assert_eq!(
            d(Some(&"é".repeat(1025))).unwrap_err(),
            PolicyError::DescriptionTooLong { chars: 1025 }
        );
        for bad in ["a\u{0}b", "bell\u{7}", "cr\r", "\u{9b}"] {
            let e = d(Some(bad)).unwrap_err();
            assert_eq!(e, PolicyError::DescriptionControl, "{bad:?}");
            assert_eq!(e.field(), "description");
        }
    }

    /// A patch changes only what it names; nested retention members merge one by one; the
    /// retry list is replaced whole; the result is checked as a whole.
    #[test]
    fn patch_merge() {
        let base = with(|p| {
            p.description = Some(Some("gold".into()));
            p.rpo_threshold_minutes = Some(30);
            p.retention.for_days = Some(30);
        })
        .unwrap();
        let p = PolicyPatch {
            compression_level: Some(9),
            retention: RetentionPatch {
                hourly_days: Some(7),
                ..Default::default()
            },
            retry_schedule_seconds: Some(vec![30]),
            ..Default::default()
        };
        let got = p.apply(&base).unwrap();
        let mut want = base.clone();
        want.compression_level = 9;
        want.retention.hourly_days = 7;
        want.retry_schedule_seconds = vec![30];
        assert_eq!(got, want);
        assert_eq!(got.retention.for_days, 30);
        assert_eq!(got.description.as_deref(), Some("gold"));
        // Removing the description.
        let cleared = PolicyPatch {
            description: Some(None),
            ..Default::default()
        }
        .apply(&got)
        .unwrap();
        assert_eq!(cleared.description, None);
        // As a whole: 25-minute cycles alone break app-consistency on cycle boundaries
        // (60 min); with the frequency changed in the same patch they are fine.
        let longer = PolicyPatch {
            cycle_interval_seconds: Some(1500),
            ..Default::default()
        };
        assert!(matches!(
            longer.apply(&base).unwrap_err(),
            PolicyError::AppConsistentNotMultiple { .. }
        ));
        let both = PolicyPatch {
            cycle_interval_seconds: Some(1500),
            app_consistent_frequency_minutes: Some(50),
            ..Default::default()
        };
        assert_eq!(both.apply(&base).unwrap().cycle_interval_seconds, 1500);
        // The first bad field is reported; the base is untouched by a refused patch.
        let bad = PolicyPatch {
            compression_level: Some(25),
            resync_threshold_percent: Some(0),
            ..Default::default()
        };
        assert_eq!(bad.apply(&base).unwrap_err().field(), "compression_level");
        assert_eq!(base.compression_level, DEFAULT_COMPRESSION_LEVEL);
    }

    fn window(from: &str, to: &str, days: Option<&[&str]>) -> ResyncWindowPatch {
        ResyncWindowPatch {
            from: from.into(),
            to: to.into(),
            days: days.map(|d| d.iter().map(|s| (*s).to_string()).collect()),
        }
    }

    /// `resync_window`: off by default; set, shown canonically, replaced whole and removed
    /// by a patch; every refusal names the member.
    #[test]
    fn resync_windows() {
        assert_eq!(PolicySettings::default().resync_window, None);
        let set = |w: ResyncWindowPatch| with(|p| p.resync_window = Some(Some(w)));
        let s = set(window("22:00", "6:00", None)).unwrap();
        let w = s.resync_window.unwrap();
        assert_eq!(
            (w.from_minute, w.to_minute, w.days),
            (22 * 60, 6 * 60, None)
        );
        assert_eq!(
            (w.from_text(), w.to_text()),
            ("22:00".into(), "06:00".into())
        );
        assert_eq!(w.day_names(), None);
        // Days in any case and spelling are kept in week order, short names.
        let w = set(window(
            "08:30",
            "17:45",
            Some(&["Sunday", " sat ", "FRI", "mon"]),
        ))
        .unwrap()
        .resync_window
        .unwrap();
        assert_eq!(
            w.day_names().unwrap(),
            ["mon", "fri", "sat", "sun"].map(String::from)
        );
        set(window("00:00", "23:59", Some(&DAY_NAMES))).unwrap();

        let long = "x".repeat(100);
        for (w, field, needle) in [
            (
                window("25:00", "06:00", None),
                "resync_window.from",
                "\"25:00\"",
            ),
            (window("22:00", "6:60", None), "resync_window.to", "6:60"),
            (window("2200", "06:00", None), "resync_window.from", "HH:MM"),
            (
                window("22:00 ", "06:00", None),
                "resync_window.from",
                "HH:MM",
            ),
            (window("", "06:00", None), "resync_window.from", "HH:MM"),
            (window("22:00", "-1:00", None), "resync_window.to", "HH:MM"),
            (
                window("22:00", "22:00", None),
                "resync_window.to",
                "both 22:00",
            ),
            (
                window("7:00", "07:00", None),
                "resync_window.to",
                "would be empty",
            ),
            (
                window("22:00", "06:00", Some(&[])),
                "resync_window.days",
                "at least one",
            ),
            (
                window("22:00", "06:00", Some(&["mon", "fry"])),
                "resync_window.days[1]",
                "\"fry\"",
            ),
            (
                window("22:00", "06:00", Some(&["fri", "sat", "Friday"])),
                "resync_window.days[2]",
                "`fri` again",
            ),
            (window(&long, "06:00", None), "resync_window.from", "x…"),
        ] {
            let e = set(w.clone()).unwrap_err();
            assert_eq!(e.field(), field, "{w:?}: {e}");
            assert!(e.to_string().contains(needle), "{w:?}: {e}");
            assert!(e.to_string().contains(field), "{w:?}: {e}");
        }
        // An overlong value is quoted in part only.
        let e = set(window(&long, "06:00", None)).unwrap_err();
        assert!(e.to_string().len() < 200, "{e}");

        // A patch replaces the window whole, leaves it alone when silent, removes it with
        // `Some(None)`.
        let base = set(window("22:00", "06:00", Some(&["fri"]))).unwrap();
        let other = PolicyPatch {
            resync_window: Some(Some(window("23:00", "05:00", None))),
            ..Default::default()
        }
        .apply(&base)
        .unwrap();
        assert_eq!(other.resync_window.unwrap().days, None);
        let silent = PolicyPatch {
            compression_level: Some(5),
            ..Default::default()
        }
        .apply(&base)
        .unwrap();
        assert_eq!(silent.resync_window, base.resync_window);
        let cleared = PolicyPatch {
            resync_window: Some(None),
            ..Default::default()
        }
        .apply(&base)
        .unwrap();
        assert_eq!(cleared.resync_window, None);

        // What a record could hold and `parse` never builds.
        let d = PolicySettings::default;
        let bad = |w: ResyncWindow| {
            PolicySettings {
                resync_window: Some(w),
                ..d()
            }
            .validate()
            .unwrap_err()
            .field()
        };
        let ok = ResyncWindow::parse("22:00", "06:00", None).unwrap();
        assert_eq!(
            bad(ResyncWindow {
                from_minute: 1440,
                ..ok
            }),
            "resync_window.from"
        );
        assert_eq!(
            bad(ResyncWindow {
                to_minute: 22 * 60,
                ..ok
            }),
            "resync_window.to"
        );
        assert_eq!(
            bad(ResyncWindow {
                days: Some([false; 7]),
                ..ok
            }),
            "resync_window.days"
        );
    }

    #[test]
    fn validate_catches_what_narrow_types_can_hold() {
        let d = PolicySettings::default;
        let s = PolicySettings {
            rpo_threshold_minutes: 0,
            ..d()
        };
        assert_eq!(s.validate().unwrap_err().field(), "rpo_threshold_minutes");
        let s = PolicySettings {
            chunk_size: 3,
            ..d()
        };
        assert_eq!(s.validate().unwrap_err(), PolicyError::ChunkSize { got: 3 });
        let s = PolicySettings {
            retry_schedule_seconds: vec![],
            ..d()
        };
        assert_eq!(s.validate().unwrap_err(), PolicyError::RetryEmpty);
        let s = PolicySettings {
            description: Some("x".repeat(2000)),
            ..d()
        };
        assert!(matches!(
            s.validate().unwrap_err(),
            PolicyError::DescriptionTooLong { .. }
        ));
    }
}
