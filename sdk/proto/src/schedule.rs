//! The syntax of times and days in schedules, shared by the gateway (a policy's
//! `resync_window`) and the agent (its `[[replication.throttle]]` windows and the resync window
//! it reads from its plan), so both read `22:00` and `sat` the same way.

/// Day names as stored and shown, Monday first.
pub const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
/// Full day names, also accepted.
pub const FULL_DAY_NAMES: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// `HH:MM` (or `H:MM`), 00:00 to 23:59, as minutes since midnight.
pub fn parse_time(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    let digits = |p: &str, n: std::ops::RangeInclusive<usize>| {
        n.contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(h, 1..=2) || !digits(m, 2..=2) {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// A day name (short or full, any case, surrounding spaces ignored) as 0 Monday … 6 Sunday.
pub fn parse_day(s: &str) -> Option<u8> {
    let l = s.trim().to_ascii_lowercase();
    DAY_NAMES
        .iter()
        .position(|d| *d == l)
        .or_else(|| FULL_DAY_NAMES.iter().position(|d| *d == l))
        .and_then(|i| u8::try_from(i).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_days() {
        assert_eq!(parse_time("22:00"), Some(22 * 60));
        assert_eq!(parse_time("6:05"), Some(6 * 60 + 5));
        assert_eq!(parse_time("23:59"), Some(23 * 60 + 59));
        for bad in [
            "24:00", "12:60", "1:5", "123:00", "12-00", "", ":", "a1:00", "+1:00",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
        assert_eq!(parse_day(" Sat "), Some(5));
        assert_eq!(parse_day("MONDAY"), Some(0));
        assert_eq!(parse_day("sunday"), Some(6));
        assert_eq!(parse_day("mo"), None);
    }
}
