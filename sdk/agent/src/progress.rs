//! What the agent says while it replicates: structured log lines, and a progress bar on a
//! terminal.
//!
//! A person running `ferry-agent sync --once` in a terminal wants to see a long initial
//! replication move; a service manager's journal wants lines it can search. So on a terminal
//! (standard error is a tty) a cycle draws one line, redrawn in place (`\r`), with bytes sent,
//! rate and time left; elsewhere it writes `key=value` lines to standard error when a cycle
//! starts, about every [`LOG_EVERY`], and when it ends — and nothing else. Standard output
//! stays for the command's result.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often a progress line is logged when standard error is not a terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// How often the bar is redrawn at most.
const DRAW_EVERY: Duration = Duration::from_millis(200);

/// One `key=value` line: values with spaces, quotes, `=` or nothing are quoted (JSON string
/// rules); control characters never reach the log.
pub fn format_line(fields: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(k);
        out.push('=');
        let plain = !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_graphic() && c != '"' && c != '=' && c != '\\');
        if plain {
            out.push_str(v);
        } else {
            out.push_str(&serde_json::to_string(v).expect("a string serialises"));
        }
    }
    out
}

/// Writes one `key=value` line to standard error.
pub fn log(fields: &[(&str, &str)]) {
    let line = format_line(fields);
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "ferry-agent: {line}");
}

/// Bytes as `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn hms(secs: u64) -> String {
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// A line redrawn in place on standard error (a terminal).
    Bar,
    /// `key=value` lines on standard error.
    Log,
    /// Nothing (tests).
    Quiet,
}

impl Style {
    /// [`Style::Bar`] when standard error is a terminal, else [`Style::Log`].
    pub fn detect() -> Self {
        if std::io::stderr().is_terminal() {
            Style::Bar
        } else {
            Style::Log
        }
    }
}

/// The progress of one cycle's session.
#[derive(Debug)]
pub struct Progress {
    style: Style,
    label: String,
    cycle: u64,
    /// Bytes of frames the cycle sends in all (an estimate: chunk bytes and headers).
    total: u64,
    /// Frames of the cycle (the `EndOfCycle`'s seq).
    last_seq: u64,
    /// Bytes counted as done: estimated for frames sent before this run, then counted.
    done: u64,
    /// Bytes sent by this process.
    sent: u64,
    start: Instant,
    last_log: Instant,
    last_draw: Option<Instant>,
    drawn: bool,
}

impl Progress {
    /// Progress of cycle `cycle` of `label`, `total` bytes over `last_seq` frames.
    pub fn new(style: Style, label: &str, cycle: u64, total: u64, last_seq: u64) -> Self {
        let now = Instant::now();
        Self {
            style,
            label: label.to_string(),
            cycle,
            total,
            last_seq: last_seq.max(1),
            done: 0,
            sent: 0,
            start: now,
            last_log: now,
            last_draw: None,
            drawn: false,
        }
    }

    /// Bytes per second sent by this process so far.
    pub fn rate(&self) -> u64 {
        let ms = self.start.elapsed().as_millis();
        (u128::from(self.sent) * 1000)
            .checked_div(ms)
            .map_or(0, |r| u64::try_from(r).unwrap_or(u64::MAX))
    }

    fn eta(&self) -> Option<u64> {
        let rate = self.rate();
        (rate > 0).then(|| self.total.saturating_sub(self.done) / rate)
    }

    /// A session starts sending at `from_seq` (frames before it are held by the gateway).
    pub fn resume(&mut self, from_seq: u64) {
        let before = from_seq.saturating_sub(1).min(self.last_seq);
        let est = u128::from(self.total) * u128::from(before) / u128::from(self.last_seq);
        self.done = self.done.max(u64::try_from(est).unwrap_or(u64::MAX));
    }

    /// A frame of `bytes` was written.
    pub fn sent(&mut self, bytes: u64) {
        self.sent += bytes;
        self.done = self.done.saturating_add(bytes);
        match self.style {
            Style::Bar => {
                if self.last_draw.is_none_or(|t| t.elapsed() >= DRAW_EVERY) {
                    self.draw();
                }
            }
            Style::Log => {
                if self.last_log.elapsed() >= LOG_EVERY {
                    self.last_log = Instant::now();
                    self.log_progress("progress");
                }
            }
            Style::Quiet => {}
        }
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("disk", self.label.clone()),
            ("cycle", self.cycle.to_string()),
            ("sent_bytes", self.sent.to_string()),
            ("done_bytes", self.done.min(self.total).to_string()),
            ("total_bytes", self.total.to_string()),
            ("rate_bps", self.rate().to_string()),
        ];
        if let Some(e) = self.eta() {
            f.push(("eta_seconds", e.to_string()));
        }
        f
    }

    fn log_progress(&self, event: &str) {
        let f = self.fields();
        let mut all: Vec<(&str, &str)> = vec![("event", event)];
        all.extend(f.iter().map(|(k, v)| (*k, v.as_str())));
        log(&all);
    }

    fn draw(&mut self) {
        self.last_draw = Some(Instant::now());
        self.drawn = true;
        let pct = if self.total == 0 {
            100
        } else {
            u64::try_from(u128::from(self.done.min(self.total)) * 100 / u128::from(self.total))
                .unwrap_or(100)
        };
        let filled = usize::try_from(pct / 5).unwrap_or(20);
        let bar = format!("{}{}", "#".repeat(filled), " ".repeat(20 - filled.min(20)));
        let eta = self.eta().map_or_else(|| "--:--:--".to_string(), hms);
        let line = format!(
            "{} cycle {} [{bar}] {pct:>3}% {} / {} {}/s ETA {eta}",
            self.label,
            self.cycle,
            human_bytes(self.done.min(self.total)),
            human_bytes(self.total),
            human_bytes(self.rate()),
        );
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "\r{line:<100}");
        let _ = e.flush();
    }

    fn clear(&mut self) {
        if self.drawn {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r{:<100}\r", "");
            let _ = e.flush();
            self.drawn = false;
        }
    }

    /// Something worth a line (a reconnect, a `Busy`): logged in every style but quiet, the
    /// bar cleared first and redrawn after.
    pub fn note(&mut self, fields: &[(&str, &str)]) {
        if self.style == Style::Quiet {
            return;
        }
        self.clear();
        log(fields);
    }

    /// The cycle's sending began.
    pub fn begin(&mut self, kind: &str) {
        if self.style != Style::Quiet {
            let total = self.total.to_string();
            let cycle = self.cycle.to_string();
            let frames = self.last_seq.to_string();
            self.note(&[
                ("event", "cycle_start"),
                ("disk", &self.label.clone()),
                ("cycle", &cycle),
                ("kind", kind),
                ("frames", &frames),
                ("total_bytes", &total),
            ]);
        }
    }

    /// The session ended (`outcome`: `acknowledged`, `failed`, …).
    pub fn end(&mut self, outcome: &str) {
        match self.style {
            Style::Quiet => {}
            Style::Bar | Style::Log => {
                if self.style == Style::Bar && self.drawn {
                    self.draw();
                    let mut e = std::io::stderr().lock();
                    let _ = writeln!(e);
                    self.drawn = false;
                }
                self.log_progress(outcome);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_key_value_and_quoted_when_needed() {
        assert_eq!(
            format_line(&[
                ("event", "busy"),
                ("disk", "web/sda"),
                ("message", "cache full, later")
            ]),
            r#"event=busy disk=web/sda message="cache full, later""#
        );
        assert_eq!(
            format_line(&[("a", ""), ("b", "x=y"), ("c", "l\nm")]),
            r#"a="" b="x=y" c="l\nm""#
        );
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(hms(3725), "01:02:05");
    }

    #[test]
    fn resume_counts_what_the_gateway_holds() {
        let mut p = Progress::new(Style::Quiet, "w/a", 1, 1000, 10);
        p.resume(6);
        assert_eq!(p.done, 500);
        p.sent(100);
        assert_eq!((p.done, p.sent), (600, 100));
        p.resume(1);
        assert_eq!(p.done, 600);
    }
}
