//! Bandwidth throttling by time of day: `[replication] max_bytes_per_second` and the
//! `[[replication.throttle]]` windows of `agent.toml`, and the pacing of a session's frames.
//!
//! Why a schedule: the replication link is usually shared with the business's own traffic, so
//! operators limit the agent during office hours and let it run free at night and at weekends.
//! A single rate either starves the night or floods the day.
//!
//! Rules:
//! - a window is `from`–`to` (`HH:MM`, the agent machine's local time: `TZ`, else
//!   `/etc/localtime`, as chrono reads them; UTC when neither is there) on the listed `days`
//!   (every day when left out); `to` before `from` wraps past midnight, and the part after
//!   midnight belongs to the day the window *started* (`days = ["fri"], from = "22:00", to =
//!   "06:00"` covers Friday 22:00 to Saturday 06:00);
//! - the first window that matches wins; outside every window `max_bytes_per_second` applies
//!   (absent: unlimited); a window's `max_bytes_per_second = 0` means unlimited;
//! - the rate in force is read again every [`RECHECK`] while a session sends, so a long cycle
//!   changes pace within a second of crossing a boundary, not at its next cycle.
//!
//! Pacing ([`Pacer`]) is a debt of bytes: every frame sent adds its length, the debt drains at
//! the rate in force, and the next frame waits until it is paid. A wait is never longer than
//! the time to the next recheck, so a rate that goes up (or becomes unlimited) applies at
//! once to the frame that is waiting. Memory is constant. The local time comes from a
//! [`Clock`], injected by the tests.
//!
//! The window itself ([`TimeWindow`]: days, `from`, `to`, the wrap past midnight) is also the
//! policy's `resync_window` (`crate::sync` defers an automatic resync outside it), read with
//! the same [`Clock`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// How often a session reads the rate in force again.
pub const RECHECK: Duration = Duration::from_secs(1);

use ferry_proto::schedule::{DAY_NAMES, parse_day};
const SECONDS_PER_DAY: u32 = 24 * 3600;

/// One `[[replication.throttle]]` entry of `agent.toml`, as written (checked by
/// [`Schedule::parse`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleWindow {
    /// `mon` … `sun` (or the full names); absent: every day. For a window that wraps past
    /// midnight, the day it starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<Vec<String>>,
    /// Start, `HH:MM` local time (included).
    pub from: String,
    /// End, `HH:MM` local time (excluded); before `from`: the next day.
    pub to: String,
    /// Most frame bytes per second per session in the window; 0: unlimited.
    pub max_bytes_per_second: u64,
}

/// A moment of the local week, as windows see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    /// 0 Monday … 6 Sunday.
    pub weekday: u8,
    /// Seconds since local midnight (0 ..= 86399).
    pub second: u32,
}

impl LocalTime {
    /// `weekday` (0 Monday) at `hh:mm:ss`.
    pub fn new(weekday: u8, hh: u32, mm: u32, ss: u32) -> Self {
        Self {
            weekday: weekday % 7,
            second: (hh * 3600 + mm * 60 + ss) % SECONDS_PER_DAY,
        }
    }

    /// The machine's local time now.
    pub fn now() -> Self {
        use chrono::{Datelike, Timelike};
        let t = chrono::Local::now();
        Self {
            weekday: u8::try_from(t.weekday().num_days_from_monday()).unwrap_or(0),
            second: t.num_seconds_from_midnight().min(SECONDS_PER_DAY - 1),
        }
    }
}

/// Where the local time comes from: the system's, or one a test sets.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> LocalTime + Send + Sync>);

impl Clock {
    /// The machine's local time ([`LocalTime::now`]).
    pub fn system() -> Self {
        Self(Arc::new(LocalTime::now))
    }

    /// A clock reading `f`.
    pub fn from_fn(f: impl Fn() -> LocalTime + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// The local time now.
    pub fn now(&self) -> LocalTime {
        (self.0)()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Clock")
    }
}

/// A span of the local week: `from`–`to` on some days, `to` before `from` wrapping past
/// midnight into the next day (which belongs to the day the span *started*). The times of a
/// `[[replication.throttle]]` entry and of a policy's `resync_window` (the replication plan's
/// [`ferry_proto::enroll::ResyncWindow`]) are both this, parsed by [`TimeWindow::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    /// Bit `d` set: the window starts on weekday `d` (0 Monday).
    days: u8,
    /// Seconds since midnight, `from` included.
    from: u32,
    /// Seconds since midnight, `to` excluded; `to < from` wraps.
    to: u32,
}

/// Why a window's `from`, `to` or `days` is refused (the caller names the window).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WindowError {
    /// `from` or `to` is not `HH:MM` from 00:00 to 23:59.
    #[error("`{key}` = {value:?} is not a time of day (HH:MM, from 00:00 to 23:59)")]
    Time {
        /// `from` or `to`.
        key: &'static str,
        /// What was given.
        value: String,
    },
    /// `from` equals `to`.
    #[error("`from` and `to` are both {value:?}: the window would be empty")]
    Empty {
        /// The time given twice.
        value: String,
    },
    /// `days` is an empty list.
    #[error("`days` is empty (leave it out for every day)")]
    NoDays,
    /// An entry of `days` is not a day.
    #[error("`days`: {value:?} is not a day (mon, tue, wed, thu, fri, sat, sun)")]
    Day {
        /// What was given.
        value: String,
    },
}

impl TimeWindow {
    /// Checks a window's `from` and `to` (`HH:MM`) and `days` (`mon` … `sun` or the full
    /// names, any case; `None`: every day).
    pub fn parse(from: &str, to: &str, days: Option<&[String]>) -> Result<Self, WindowError> {
        let time = |key: &'static str, v: &str| {
            parse_time(v).ok_or_else(|| WindowError::Time {
                key,
                value: v.to_string(),
            })
        };
        let (f, t) = (time("from", from)?, time("to", to)?);
        if f == t {
            return Err(WindowError::Empty {
                value: from.to_string(),
            });
        }
        let days = match days {
            None => 0x7f,
            Some([]) => return Err(WindowError::NoDays),
            Some(list) => {
                let mut mask = 0u8;
                for d in list {
                    let n = parse_day(d).ok_or_else(|| WindowError::Day { value: d.clone() })?;
                    mask |= 1 << n;
                }
                mask
            }
        };
        Ok(Self {
            days,
            from: f,
            to: t,
        })
    }

    /// Whether `t` is inside the window.
    pub fn contains(&self, t: LocalTime) -> bool {
        let on = |d: u8| self.days & (1 << (d % 7)) != 0;
        if self.from < self.to {
            on(t.weekday) && (self.from..self.to).contains(&t.second)
        } else {
            (on(t.weekday) && t.second >= self.from)
                || (on((t.weekday + 6) % 7) && t.second < self.to)
        }
    }

    /// When the window next opens after `t`, if `t` is outside it: the local time of its
    /// next start and the seconds until then (`None` when `t` is inside).
    pub fn next_opening(&self, t: LocalTime) -> Option<(LocalTime, u32)> {
        if self.contains(t) {
            return None;
        }
        // A start is `from` on a listed day; the next one is at most a week away.
        (0..=7u8).find_map(|k| {
            let day = (t.weekday + k) % 7;
            let at = u32::from(k) * SECONDS_PER_DAY + self.from;
            (self.days & (1 << day) != 0 && at > t.second).then(|| {
                (
                    LocalTime {
                        weekday: day,
                        second: self.from,
                    },
                    at - t.second,
                )
            })
        })
    }

    /// `HH:MM-HH:MM`, with the days first when not every day (`fri,sat 22:00-06:00`).
    pub fn describe(&self) -> String {
        let hm = |s: u32| format!("{:02}:{:02}", s / 3600, s / 60 % 60);
        let span = format!("{}-{}", hm(self.from), hm(self.to));
        if self.days == 0x7f {
            return span;
        }
        let days: Vec<&str> = (0..7)
            .filter(|d| self.days & (1 << d) != 0)
            .map(|d| DAY_NAMES[d])
            .collect();
        format!("{} {span}", days.join(","))
    }
}

impl LocalTime {
    /// `ddd HH:MM` (`fri 22:00`).
    pub fn describe(&self) -> String {
        format!(
            "{} {:02}:{:02}",
            DAY_NAMES[usize::from(self.weekday % 7)],
            self.second / 3600,
            self.second / 60 % 60
        )
    }
}

/// A checked throttle window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    /// When it applies.
    span: TimeWindow,
    /// `None`: unlimited.
    rate: Option<u64>,
}

/// The rates of `[replication]`: the windows in order, and the rate outside them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    default: Option<u64>,
    windows: Vec<Window>,
}

/// `HH:MM` (or `H:MM`), 00:00 to 23:59, as seconds since midnight.
/// `HH:MM` as seconds since midnight (the syntax is `ferry_proto::schedule`'s, the gateway's).
fn parse_time(s: &str) -> Option<u32> {
    ferry_proto::schedule::parse_time(s).map(|m| u32::from(m) * 60)
}

impl Schedule {
    /// One rate at every hour (`None`: unlimited).
    pub fn fixed(rate: Option<u64>) -> Self {
        Self {
            default: rate,
            windows: Vec::new(),
        }
    }

    /// Checks `windows` (entry `n` of `[[replication.throttle]]` is named `#n`, from 1) and
    /// builds the schedule; `default` applies outside them. The message names the entry and
    /// the key.
    pub fn parse(default: Option<u64>, windows: &[ThrottleWindow]) -> Result<Self, String> {
        let mut out = Vec::with_capacity(windows.len());
        for (i, w) in windows.iter().enumerate() {
            let who = format!("[[replication.throttle]] #{}", i + 1);
            let span = TimeWindow::parse(&w.from, &w.to, w.days.as_deref()).map_err(|e| match e {
                WindowError::Empty { .. } => format!(
                    "{who}: {e} (for all day, leave the window out and set `[replication] max_bytes_per_second`)"
                ),
                e => format!("{who}: {e}"),
            })?;
            out.push(Window {
                span,
                rate: Some(w.max_bytes_per_second).filter(|r| *r > 0),
            });
        }
        Ok(Self {
            default,
            windows: out,
        })
    }

    /// Whether the rate depends on the time (there are windows).
    pub fn has_windows(&self) -> bool {
        !self.windows.is_empty()
    }

    /// The rate in force at `t` (`None`: unlimited): the first matching window's, else the
    /// default.
    pub fn rate_at(&self, t: LocalTime) -> Option<u64> {
        self.windows
            .iter()
            .find(|w| w.span.contains(t))
            .map_or(self.default, |w| w.rate)
    }
}

/// A schedule and the clock it is read with; what a session paces by.
#[derive(Debug, Clone)]
pub struct Throttle {
    schedule: Arc<Schedule>,
    clock: Clock,
}

impl Throttle {
    /// `schedule` read with `clock`.
    pub fn new(schedule: Schedule, clock: Clock) -> Self {
        Self {
            schedule: Arc::new(schedule),
            clock,
        }
    }

    /// One rate at every hour (`None`: unlimited).
    pub fn fixed(rate: Option<u64>) -> Self {
        Self::new(Schedule::fixed(rate), Clock::system())
    }

    /// The rate in force now (the clock is not read when there are no windows).
    pub fn rate_now(&self) -> Option<u64> {
        if self.schedule.has_windows() {
            self.schedule.rate_at(self.clock.now())
        } else {
            self.schedule.default
        }
    }
}

/// Paces one connection's frames (see the module documentation). Times are passed in, so it
/// is tested without sleeping.
#[derive(Debug)]
pub struct Pacer {
    throttle: Throttle,
    rate: Option<u64>,
    /// When the rate was last read.
    checked: Instant,
    /// Bytes sent and not yet paid for at the rate in force.
    debt: f64,
    /// When `debt` was last brought up to date.
    settled: Instant,
}

impl Pacer {
    /// A pacer starting at `now` with no debt.
    pub fn new(throttle: &Throttle, now: Instant) -> Self {
        Self {
            rate: throttle.rate_now(),
            throttle: throttle.clone(),
            checked: now,
            debt: 0.0,
            settled: now,
        }
    }

    /// The rate in force (`None`: unlimited), as last read.
    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    fn settle(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.settled).as_secs_f64();
        self.debt = match self.rate {
            Some(r) => (self.debt - elapsed * r as f64).max(0.0),
            None => 0.0,
        };
        self.settled = now.max(self.settled);
    }

    /// Reads the rate again if [`RECHECK`] has passed since the last read; whether it
    /// changed. The debt is settled at the old rate up to `now` first.
    pub fn refresh(&mut self, now: Instant) -> bool {
        if now < self.checked + RECHECK {
            return false;
        }
        self.settle(now);
        self.checked = now;
        let rate = self.throttle.rate_now();
        let changed = rate != self.rate;
        self.rate = rate;
        if rate.is_none() {
            self.debt = 0.0;
        }
        changed
    }

    /// When the next frame may go: `now` when the debt is paid, else when it will be at the
    /// rate in force — but never later than the next recheck (the caller asks again then,
    /// after [`Self::refresh`], which it calls first at every turn).
    pub fn ready_at(&mut self, now: Instant) -> Instant {
        self.settle(now);
        match self.rate {
            Some(r) if self.debt > 0.0 => {
                let pay = Duration::from_secs_f64(self.debt / r as f64);
                (now + pay).min((self.checked + RECHECK).max(now))
            }
            _ => now,
        }
    }

    /// `n` bytes were sent at `now`.
    pub fn sent(&mut self, n: u64, now: Instant) {
        self.settle(now);
        if self.rate.is_some() {
            self.debt += n as f64;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn w(days: Option<&[&str]>, from: &str, to: &str, rate: u64) -> ThrottleWindow {
        ThrottleWindow {
            days: days.map(|d| d.iter().map(|s| (*s).to_string()).collect()),
            from: from.into(),
            to: to.into(),
            max_bytes_per_second: rate,
        }
    }

    const MON: u8 = 0;
    const FRI: u8 = 4;
    const SAT: u8 = 5;
    const SUN: u8 = 6;

    #[test]
    fn windows_match_by_day_and_time_and_the_first_wins() {
        let s = Schedule::parse(
            Some(1000),
            &[
                w(
                    Some(&["mon", "tue", "wed", "thu", "fri"]),
                    "08:00",
                    "18:00",
                    10,
                ),
                w(None, "07:00", "19:00", 20),
            ],
        )
        .unwrap();
        let at = |d, h, m, sec| s.rate_at(LocalTime::new(d, h, m, sec));
        assert_eq!(at(MON, 8, 0, 0), Some(10), "from is included");
        assert_eq!(at(MON, 17, 59, 59), Some(10));
        assert_eq!(
            at(MON, 18, 0, 0),
            Some(20),
            "to is excluded; the next window"
        );
        assert_eq!(at(MON, 7, 59, 59), Some(20));
        assert_eq!(at(MON, 6, 59, 59), Some(1000), "outside every window");
        assert_eq!(at(MON, 19, 0, 0), Some(1000));
        // The weekend is not in the first window's days.
        assert_eq!(at(SAT, 12, 0, 0), Some(20));
        assert_eq!(at(SUN, 12, 0, 0), Some(20));
        // Without windows nor default: unlimited.
        assert_eq!(
            Schedule::fixed(None).rate_at(LocalTime::new(MON, 12, 0, 0)),
            None
        );
    }

    #[test]
    fn windows_wrap_past_midnight_on_the_day_they_start() {
        let s = Schedule::parse(
            Some(5),
            &[
                // Friday night: Friday 22:00 to Saturday 06:00, unlimited.
                w(Some(&["Fri"]), "22:00", "06:00", 0),
                // Every night, another rate.
                w(None, "23:00", "01:00", 77),
            ],
        )
        .unwrap();
        let at = |d, h, m| s.rate_at(LocalTime::new(d, h, m, 0));
        assert_eq!(at(FRI, 21, 59), Some(5));
        assert_eq!(at(FRI, 22, 0), None, "0 is unlimited");
        assert_eq!(at(FRI, 23, 59), None);
        assert_eq!(at(SAT, 0, 0), None, "past midnight: still Friday's window");
        assert_eq!(at(SAT, 5, 59), None);
        assert_eq!(at(SAT, 6, 0), Some(5));
        // Thursday night is not Friday's window; the every-night one applies.
        assert_eq!(at(FRI, 0, 30), Some(77));
        assert_eq!(at(FRI, 1, 0), Some(5));
        assert_eq!(at(SAT, 22, 0), Some(5), "Saturday is not listed");
        assert_eq!(at(SAT, 23, 30), Some(77));
        assert_eq!(at(SUN, 0, 59), Some(77), "Saturday's every-night window");
        // A wrap from Sunday goes into Monday.
        let s = Schedule::parse(None, &[w(Some(&["sunday"]), "20:00", "00:00", 9)]).unwrap();
        assert_eq!(s.rate_at(LocalTime::new(SUN, 20, 0, 0)), Some(9));
        assert_eq!(
            s.rate_at(LocalTime::new(MON, 0, 0, 0)),
            None,
            "to 00:00 ends at midnight"
        );
        let s = Schedule::parse(None, &[w(Some(&["sun"]), "20:00", "02:00", 9)]).unwrap();
        assert_eq!(s.rate_at(LocalTime::new(MON, 1, 0, 0)), Some(9));
        assert_eq!(s.rate_at(LocalTime::new(SUN, 1, 0, 0)), None);
    }

    #[test]
    fn bad_windows_are_refused_naming_the_entry_and_the_key() {
        let ok = w(None, "08:00", "18:00", 1);
        for (bad, want) in [
            (
                w(None, "8:00", "25:00", 1),
                "#2: `to` = \"25:00\" is not a time of day",
            ),
            (w(None, "08:60", "18:00", 1), "#2: `from` = \"08:60\""),
            (w(None, "0800", "18:00", 1), "#2: `from` = \"0800\""),
            (w(None, "08:00 ", "18:00", 1), "#2: `from`"),
            (w(None, "-1:00", "18:00", 1), "#2: `from`"),
            (w(None, "", "18:00", 1), "#2: `from`"),
            (w(None, "08:00", "8:00", 1), "#2: `from` and `to` are both"),
            (
                w(Some(&["mon", "fry"]), "08:00", "18:00", 1),
                "#2: `days`: \"fry\" is not a day",
            ),
            (w(Some(&[]), "08:00", "18:00", 1), "#2: `days` is empty"),
        ] {
            let e = Schedule::parse(None, &[ok.clone(), bad.clone()]).unwrap_err();
            assert!(e.starts_with("[[replication.throttle]] #2"), "{e}");
            assert!(e.contains(want), "{bad:?}: {e}");
        }
        Schedule::parse(None, &[w(None, "0:00", "23:59", 1)]).unwrap();
    }

    /// A window alone (what the resync window is): inside or not, when it opens next, how
    /// it is shown; refusals are typed.
    #[test]
    fn time_windows_say_when_they_open() {
        let days = |d: &[&str]| d.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
        let night = TimeWindow::parse("22:00", "6:00", None).unwrap();
        assert_eq!(night.describe(), "22:00-06:00");
        let at = |d, h, m, sec| LocalTime::new(d, h, m, sec);
        assert!(night.contains(at(MON, 23, 0, 0)) && night.contains(at(SAT, 5, 59, 59)));
        assert_eq!(night.next_opening(at(MON, 23, 0, 0)), None);
        assert_eq!(
            night.next_opening(at(MON, 6, 0, 0)),
            Some((at(MON, 22, 0, 0), 16 * 3600))
        );
        assert_eq!(
            night.next_opening(at(SUN, 21, 59, 59)),
            Some((at(SUN, 22, 0, 0), 1))
        );
        // Friday night only: from Saturday morning, six days and some hours.
        let fri = TimeWindow::parse("22:00", "06:00", Some(&days(&["Friday"]))).unwrap();
        assert_eq!(fri.describe(), "fri 22:00-06:00");
        assert!(fri.contains(at(SAT, 5, 0, 0)));
        assert_eq!(
            fri.next_opening(at(SAT, 6, 0, 0)),
            Some((at(FRI, 22, 0, 0), 6 * 86_400 + 16 * 3600))
        );
        // Later the same day, or a week later at the same time of day.
        assert_eq!(
            fri.next_opening(at(FRI, 21, 0, 0)),
            Some((at(FRI, 22, 0, 0), 3600))
        );
        let mon = TimeWindow::parse("08:00", "09:00", Some(&days(&["mon", "sun"]))).unwrap();
        assert_eq!(mon.describe(), "mon,sun 08:00-09:00");
        assert_eq!(
            mon.next_opening(at(MON, 9, 0, 0)),
            Some((at(SUN, 8, 0, 0), 6 * 86_400 - 3600))
        );
        assert_eq!(at(FRI, 22, 0, 0).describe(), "fri 22:00");
        assert_eq!(
            TimeWindow::parse("22:00", "22:00", None).unwrap_err(),
            WindowError::Empty {
                value: "22:00".into()
            }
        );
        assert_eq!(
            TimeWindow::parse("22:00", "24:00", None).unwrap_err(),
            WindowError::Time {
                key: "to",
                value: "24:00".into()
            }
        );
        assert_eq!(
            TimeWindow::parse("1:00", "2:00", Some(&[])).unwrap_err(),
            WindowError::NoDays
        );
    }

    /// A clock the test moves; the pacer is driven with explicit instants (no sleeping).
    fn clock(t: LocalTime) -> (Arc<Mutex<LocalTime>>, Clock) {
        let now = Arc::new(Mutex::new(t));
        let c = now.clone();
        (now, Clock::from_fn(move || *c.lock().unwrap()))
    }

    #[test]
    fn the_rate_in_use_changes_when_the_clock_crosses_a_boundary() {
        let s = Schedule::parse(
            Some(1000),
            &[w(None, "08:00", "18:00", 10), w(None, "20:00", "21:00", 0)],
        )
        .unwrap();
        let (local, c) = clock(LocalTime::new(MON, 7, 59, 59));
        let t = Throttle::new(s, c);
        let t0 = Instant::now();
        let sec = |n: u64| t0 + Duration::from_secs(n);
        let mut p = Pacer::new(&t, t0);
        assert_eq!(p.rate(), Some(1000));
        assert_eq!(p.ready_at(t0), t0, "no debt yet");
        p.sent(2000, t0);
        // 2000 bytes at 1000/s: 2 s, but the wait stops at the next recheck.
        assert_eq!(p.ready_at(t0), sec(1));
        assert!(
            !p.refresh(t0 + Duration::from_millis(999)),
            "not before RECHECK"
        );
        // 08:00: the day window applies at the next recheck; what was sent before it was
        // paid at the old rate for the time that passed (1000 of 2000 bytes).
        *local.lock().unwrap() = LocalTime::new(MON, 8, 0, 0);
        assert!(p.refresh(sec(1)));
        assert_eq!(p.rate(), Some(10));
        // 1000 bytes left at 10/s: capped at the next recheck again.
        assert_eq!(p.ready_at(sec(1)), sec(2));
        assert!(!p.refresh(sec(2)), "same window, same rate");
        // 18:00: back to the default. Two seconds at 10/s were paid (980 bytes left), now at
        // 1000/s: 0.98 s.
        *local.lock().unwrap() = LocalTime::new(MON, 18, 0, 0);
        assert!(p.refresh(sec(3)));
        assert_eq!(p.rate(), Some(1000));
        let ready = p.ready_at(sec(3));
        let want = sec(3) + Duration::from_millis(980);
        assert!(
            ready.max(want) - ready.min(want) < Duration::from_micros(1),
            "{:?}",
            ready - sec(3)
        );
        // 20:00, an unlimited window: the debt is forgiven, frames go at once.
        *local.lock().unwrap() = LocalTime::new(MON, 20, 0, 0);
        p.sent(1_000_000, sec(3));
        assert!(p.refresh(sec(4)));
        assert_eq!(p.rate(), None);
        assert_eq!(p.ready_at(sec(4)), sec(4));
        p.sent(1_000_000, sec(4));
        assert_eq!(p.ready_at(sec(4)), sec(4));
        // 21:00: limited again, starting without debt.
        *local.lock().unwrap() = LocalTime::new(MON, 21, 0, 0);
        assert!(p.refresh(sec(5)));
        assert_eq!(p.ready_at(sec(5)), sec(5));
        p.sent(500, sec(5));
        assert_eq!(p.ready_at(sec(5)), sec(5) + Duration::from_millis(500));
    }

    #[test]
    fn a_fixed_rate_never_reads_the_clock() {
        let t = Throttle::new(
            Schedule::fixed(Some(7)),
            Clock::from_fn(|| panic!("the clock is not read without windows")),
        );
        let t0 = Instant::now();
        let mut p = Pacer::new(&t, t0);
        assert!(!p.refresh(t0 + Duration::from_secs(60)));
        assert_eq!(p.rate(), Some(7));
        assert_eq!(Throttle::fixed(None).rate_now(), None);
    }

    #[test]
    fn the_system_clock_reads_a_local_time() {
        let t = LocalTime::now();
        assert!(t.weekday < 7 && t.second < SECONDS_PER_DAY, "{t:?}");
    }
}
